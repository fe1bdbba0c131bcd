//! Helpers shared by the integration tests.
#![allow(dead_code)]

/// A one-file HTTP server on loopback: `/img.png` is the PNG, anything else 404.
pub fn http_server(png: Vec<u8>) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let mut buf = [0u8; 2048];
            let n = s.read(&mut buf).unwrap_or(0);
            let req = String::from_utf8_lossy(&buf[..n]);
            let ok = req.starts_with("GET /img.png ");
            let head = if ok {
                format!("HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", png.len())
            } else {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    .to_string()
            };
            let _ = s.write_all(head.as_bytes());
            if ok {
                let _ = s.write_all(&png);
            }
        }
    });
    Ok(format!("http://{addr}"))
}

/// The repository root.
pub fn root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The tiny CLIP fixture's folder.
pub fn tiny() -> String {
    root()
        .join("tests/fixtures/clip-tiny")
        .display()
        .to_string()
}

/// A reference image fixture's path.
pub fn image(name: &str) -> String {
    root()
        .join("tests/fixtures/reference/images")
        .join(name)
        .display()
        .to_string()
}

/// A venv under `target/<name>` with `requirements` (a file under the repository) installed from
/// PyPI, built on first use and rebuilt when the file changes; returns its `bin/` folder.
/// `CLIPFT_TEST_PYTHON` picks the interpreter (default `python3`). Where the interpreter lacks
/// the venv module (Debian without python3-venv), virtualenv from PyPI builds it instead.
pub fn venv(name: &str, requirements: &str) -> Result<std::path::PathBuf, String> {
    use std::process::Command;
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = root().join("target").join(name);
    let bin = dir.join("bin");
    let reqs = root().join(requirements);
    let stamp = dir.join("requirements.txt");
    let wanted = std::fs::read_to_string(&reqs).map_err(|e| format!("{requirements}: {e}"))?;
    if bin.join("python").exists()
        && std::fs::read_to_string(&stamp).ok().as_deref() == Some(wanted.as_str())
    {
        return Ok(bin);
    }
    let run = |cmd: &mut Command, what: &str| -> Result<(), String> {
        let out = cmd.output().map_err(|e| format!("{what}: {e}"))?;
        if out.status.success() {
            return Ok(());
        }
        Err(format!(
            "{what} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    };
    let base = std::env::var("CLIPFT_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(first) = run(
        Command::new(&base).args(["-m", "venv"]).arg(&dir),
        "python3 -m venv",
    ) {
        let _ = std::fs::remove_dir_all(&dir);
        let tools = root().join("target/virtualenv-tool");
        run(
            Command::new(&base)
                .args([
                    "-m",
                    "pip",
                    "install",
                    "-q",
                    "--disable-pip-version-check",
                    "--target",
                ])
                .arg(&tools)
                .arg("virtualenv"),
            "pip install virtualenv (python3 has no venv module)",
        )
        .map_err(|e| format!("{first}\n{e}"))?;
        run(
            Command::new(&base)
                .args(["-m", "virtualenv"])
                .arg(&dir)
                .env("PYTHONPATH", &tools),
            "python3 -m virtualenv",
        )?;
    }
    run(
        Command::new(bin.join("python"))
            .args([
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
                "-r",
            ])
            .arg(&reqs),
        &format!("pip install -r {requirements}"),
    )?;
    std::fs::write(&stamp, wanted).map_err(|e| e.to_string())?;
    Ok(bin)
}

/// A fresh, empty folder `clipft-<suite>-<pid>-<name>` in the system's temporary folder.
pub fn tempdir(suite: &str, name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("clipft-{suite}-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A loopback port free right now.
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The body of `GET /metrics` on a loopback port.
pub fn scrape(port: u16) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body)
}

/// The value of the sample whose line starts with `series` (name and labels as rendered).
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The arguments that start `clipft executor` on the tiny model and a free loopback port.
pub fn tiny_executor_args() -> Vec<String> {
    [
        "executor",
        "--model",
        &tiny(),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// A server process (`clipft executor` / `clipft trainer`) that announced where it serves.
pub struct Spawned {
    pub child: std::process::Child,
    pub port: u16,
    /// What it printed to stderr before it was serving.
    pub before: Vec<String>,
}

/// Spawns `cmd` with stderr piped, waits for its "serving on HOST:PORT" line and returns the
/// port; the rest of stderr keeps being drained (echoed with `echo` as prefix when given) so the
/// server never blocks on a full pipe.
pub fn spawn_serving(
    mut cmd: std::process::Command,
    echo: Option<&'static str>,
) -> Result<Spawned, String> {
    use std::io::BufRead;
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let stderr = child.stderr.take().ok_or("no stderr")?;
    let mut lines = std::io::BufReader::new(stderr).lines();
    let mut before = Vec::new();
    let port = loop {
        let Some(line) = lines.next() else {
            let _ = child.wait();
            return Err(format!("the server exited: {}", before.join("\n")));
        };
        let line = line.map_err(|e| e.to_string())?;
        if let Some(rest) = line.split("serving on ").nth(1) {
            let addr = rest.split_whitespace().next().ok_or("no address")?;
            let port = addr.rsplit(':').next().ok_or("no port")?;
            break port.parse::<u16>().map_err(|e| format!("{line}: {e}"))?;
        }
        before.push(line);
    };
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if let Some(prefix) = echo {
                eprintln!("{prefix}: {line}");
            }
        }
    });
    Ok(Spawned {
        child,
        port,
        before,
    })
}
