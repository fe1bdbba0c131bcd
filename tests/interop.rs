//! The real Python peers against the `clipft` binary: clip_client (encode, rank, profile) and
//! Jina Flows with clipft as an external executor (tests/interop/*.py). The first run builds a
//! venv under target/ from tests/interop/requirements.txt (PyPI only); later runs reuse it.
//! Also the binary's own life cycle: `ping`, `--uses`, SIGTERM.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{free_port, image, root, sample, scrape, tiny};

type R<T = ()> = Result<T, Box<dyn std::error::Error>>;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_clipft"));
    c.env("CLIPFT_LOG", "warn");
    c
}

/// The interop venv's python, created on first use. `CLIPFT_TEST_PYTHON` picks the interpreter
/// that builds it (default `python3`).
fn python() -> R<PathBuf> {
    Ok(common::venv("interop-venv", "tests/interop/requirements.txt")?.join("python"))
}

fn run(cmd: &mut Command, what: &str) -> R {
    let out = cmd.output().map_err(|e| format!("{what}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{what} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(())
}

/// A running `clipft executor`; killed on drop.
struct Executor {
    child: Child,
    port: u16,
}

impl Executor {
    /// `clipft executor` on the tiny model and a free loopback port, metrics off unless `args`
    /// say otherwise.
    fn start(args: &[&str]) -> R<Self> {
        let monitoring: &[&str] = if args.contains(&"--port-monitoring") {
            &[]
        } else {
            &["--port-monitoring", "0"]
        };
        let all: Vec<&str> = monitoring.iter().chain(args).copied().collect();
        Ok(Self::launch(&all)?.0)
    }

    /// Starts it with exactly `args` after the model and port; returns it once serving, with
    /// what it printed before.
    fn launch(args: &[&str]) -> R<(Self, Vec<String>)> {
        let mut cmd = bin();
        cmd.args(common::tiny_executor_args()).args(args);
        let s = common::spawn_serving(cmd, None)?;
        Ok((
            Self {
                child: s.child,
                port: s.port,
            },
            s.before,
        ))
    }

    fn target(&self) -> String {
        format!("grpc://127.0.0.1:{}", self.port)
    }
}

impl Drop for Executor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reference embeddings from `clipft encode` on the same model.
fn expected(dir: &Path) -> R<PathBuf> {
    let out = dir.join("expected.jsonl");
    run(
        bin()
            .args(["encode", "--model", &tiny(), "--output"])
            .arg(&out)
            .args([
                "--text",
                "a red striped dress",
                "--text",
                "blue jeans on a chair",
                "--text",
                "a photo of a cat",
            ])
            .args([
                "--image",
                &image("rgb_300x200.png"),
                "--image",
                &image("photo_500x375.jpg"),
                "--image",
                &image("rgb_640x480.png"),
            ]),
        "clipft encode",
    )?;
    Ok(out)
}

fn tempdir(name: &str) -> R<PathBuf> {
    let d = std::env::temp_dir().join(format!("clipft-interop-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

#[test]
fn clip_client_encodes_ranks_and_profiles() -> R {
    let py = python()?;
    let dir = tempdir("client")?;
    let want = expected(&dir)?;
    let ex = Executor::start(&[])?;
    run(
        Command::new(py)
            .arg(root().join("tests/interop/check_clip_client.py"))
            .arg(ex.port.to_string())
            .arg(&want),
        "check_clip_client.py",
    )
}

#[test]
fn jina_flows_use_clipft_as_an_external_executor() -> R {
    let py = python()?;
    let dir = tempdir("flow")?;
    let want = expected(&dir)?;
    let all = Executor::start(&["--name", "clip"])?;
    let text = Executor::start(&["--select-model", "clip-text", "--name", "text"])?;
    let vision = Executor::start(&["--select-model", "clip-vision", "--name", "vision"])?;
    run(
        Command::new(py)
            .arg(root().join("tests/interop/check_flow.py"))
            .args([
                all.port.to_string(),
                text.port.to_string(),
                vision.port.to_string(),
            ])
            .arg(&want)
            .env("JINA_LOG_LEVEL", "ERROR")
            .env("JINA_OPTOUT_TELEMETRY", "1"),
        "check_flow.py",
    )
}

/// Replicas share the load: a real Jina gateway in front of three executors (one Deployment
/// with three addresses) spreads its requests over all three.
#[test]
fn a_jina_gateway_spreads_requests_over_replicas() -> R {
    let py = python()?;
    let mut replicas = Vec::new();
    for _ in 0..3 {
        let mport = free_port()?;
        let ex = Executor::start(&["--name", "clip_t", "--port-monitoring", &mport.to_string()])?;
        replicas.push((ex, mport));
    }
    let requests = 24;
    run(
        Command::new(py)
            .arg(root().join("tests/interop/check_replicas.py"))
            .args(replicas.iter().map(|(ex, _)| ex.port.to_string()))
            .arg(requests.to_string())
            .env("JINA_LOG_LEVEL", "ERROR")
            .env("JINA_OPTOUT_TELEMETRY", "1"),
        "check_replicas.py",
    )?;
    let mut served = Vec::new();
    for (_, mport) in &replicas {
        let text = scrape(*mport)?;
        served.push(
            sample(
                &text,
                "jina_document_processed_total{executor=\"CLIPEncoder\",executor_endpoint=\"/encode\",runtime_name=\"clip_t\"}",
            )
            .unwrap_or(0.0),
        );
    }
    assert_eq!(served.iter().sum::<f64>(), requests as f64, "{served:?}");
    assert!(
        served.iter().all(|&n| n >= 1.0),
        "a replica got nothing: {served:?}"
    );
    Ok(())
}

#[test]
fn ping_uses_yaml_and_sigterm() -> R {
    let dir = tempdir("life")?;
    let yml = dir.join("executor.yml");
    std::fs::write(
        &yml,
        "jtype: CLIPEncoder\nwith:\n  minibatch_size: 4\n  select_model: clip-text\nmetas:\n  name: clip_t\n",
    )?;
    let mut ex = Executor::start(&["--uses", yml.to_str().ok_or("path")?])?;
    let out = bin().args(["ping", &ex.target()]).output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("SERVING"));
    // The YAML's name and tower took effect.
    let out = bin()
        .args(["ping", &ex.target(), "--service", "jina.JinaRPC"])
        .output()?;
    assert!(out.status.success());
    // SIGTERM: drains and exits 0.
    let pid = ex.child.id() as i32;
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let start = Instant::now();
    let status = loop {
        if let Some(s) = ex.child.try_wait()? {
            break s;
        }
        if start.elapsed() > Duration::from_secs(60) {
            return Err("executor did not stop after SIGTERM".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    // Nothing listens any more: ping fails with exit 1.
    let out = bin()
        .args(["ping", &ex.target(), "--timeout", "1"])
        .output()?;
    assert_eq!(out.status.code(), Some(1));
    // A bad --uses file is a clear error.
    std::fs::write(&yml, "jtype: X\nwith:\n  batchsize: 3\n")?;
    let out = bin()
        .args(["executor", "--model", &tiny(), "--port", "0", "--uses"])
        .arg(&yml)
        .output()?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("with.batchsize"));
    Ok(())
}

#[test]
fn prometheus_metrics_count_the_traffic() -> R {
    use clipft::executor::client::{encode, Input};
    let mport = free_port()?;
    let ex = Executor::start(&["--name", "clip_t", "--port-monitoring", &mport.to_string()])?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let png = std::fs::read(image("rgb_224x224.png"))?;
    rt.block_on(async {
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{}", ex.port))?
                .connect()
                .await?;
        // 3 requests of texts (10 documents), 1 of images (2 documents).
        let texts = (0..10)
            .map(|i| (format!("t{i}"), Input::Text(format!("caption number {i}"))))
            .collect();
        encode(channel.clone(), texts, 4).await?;
        let images = vec![
            ("i0".to_string(), Input::Image(png.clone())),
            ("i1".to_string(), Input::Image(png)),
        ];
        encode(channel.clone(), images, 8).await?;
        // One bad request.
        let bad = encode(
            channel,
            vec![("bad".to_string(), Input::Image(b"nope".to_vec()))],
            8,
        )
        .await;
        assert!(bad.is_err());
        Ok::<(), Box<dyn std::error::Error>>(())
    })?;
    let text = scrape(mport)?;
    let get =
        |series: &str| sample(&text, series).ok_or_else(|| format!("{series} missing in:\n{text}"));
    assert_eq!(
        get("jina_successful_requests_total{runtime_name=\"clip_t\"}")?,
        4.0
    );
    assert_eq!(
        get("jina_failed_requests_total{runtime_name=\"clip_t\"}")?,
        1.0
    );
    assert_eq!(
        get("jina_document_processed_total{executor=\"CLIPEncoder\",executor_endpoint=\"/encode\",runtime_name=\"clip_t\"}")?,
        12.0
    );
    assert_eq!(
        get("jina_receiving_request_seconds_count{runtime_name=\"clip_t\"}")?,
        5.0
    );
    assert_eq!(
        get("jina_received_request_bytes_count{runtime_name=\"clip_t\"}")?,
        5.0
    );
    assert_eq!(get("clipft_embedded_total{tower=\"text\"}")?, 10.0);
    assert_eq!(get("clipft_embedded_total{tower=\"vision\"}")?, 2.0);
    assert!(get("jina_encode_texts_seconds_count")? >= 1.0);
    assert!(get("jina_preprocess_images_seconds_count")? >= 1.0);
    assert!(get("clipft_batch_size_sum{tower=\"text\"}")? == 10.0);
    assert!(text.contains("# TYPE jina_successful_requests_total counter"));
    assert!(text.contains("clipft_queue_documents{tower=\"text\"}"));
    Ok(())
}

/// The image's `jina` link: the command lines of Jina's generated Kubernetes YAML.
#[test]
fn jina_entry_point_runs_generated_kubernetes_command_lines() -> R {
    let dir = tempdir("jina")?;
    let jina = dir.join("jina");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_clipft"), &jina)?;
    // The YAML real Jina writes for the clipft image, with the model given as a user gives it.
    let py = python()?;
    let out = Command::new(&py)
        .arg(root().join("tests/interop/make_k8s_yaml.py"))
        .arg(dir.join("k8s"))
        .arg(tiny())
        .env("JINA_LOG_LEVEL", "ERROR")
        .env("JINA_OPTOUT_TELEMETRY", "1")
        // Jina's hub lookup goes nowhere: a closed port on this machine.
        .env("HTTPS_PROXY", "http://127.0.0.1:9")
        .env("HTTP_PROXY", "http://127.0.0.1:9")
        .env("NO_PROXY", "")
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The script's last line is the YAML's path (Jina prints its own lines before it).
    let printed = String::from_utf8(out.stdout)?;
    let yaml = std::fs::read_to_string(printed.lines().last().ok_or("no path printed")?.trim())?;
    let mut container = None;
    for doc in serde_yaml_ng::Deserializer::from_str(&yaml) {
        let doc = <serde_yaml_ng::Value as serde::Deserialize>::deserialize(doc)?;
        if doc["kind"].as_str() == Some("Deployment") {
            container = Some(doc["spec"]["template"]["spec"]["containers"][0].clone());
        }
    }
    let container = container.ok_or("no Deployment in Jina's YAML")?;
    let words = |v: &serde_yaml_ng::Value| -> Vec<String> {
        v.as_sequence()
            .into_iter()
            .flatten()
            .filter_map(|w| w.as_str().map(String::from))
            .collect()
    };
    assert_eq!(words(&container["command"]), ["jina"]);
    let mut args = words(&container["args"]);
    assert!(
        args.windows(2).any(|w| w == ["--uses", "config.yml"]),
        "{args:?}"
    );
    // The image's working directory holds the config.yml shipped in docker/ (Dockerfile).
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile"))?;
    let workdir = dockerfile
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("WORKDIR "))
        .ok_or("no WORKDIR")?
        .trim()
        .to_string();
    assert!(
        dockerfile.contains(&format!("COPY docker/config.yml {workdir}/config.yml")),
        "the image must hold config.yml in {workdir}"
    );
    let image_dir = dir.join("workdir");
    std::fs::create_dir_all(&image_dir)?;
    std::fs::copy(
        root().join("docker/config.yml"),
        image_dir.join("config.yml"),
    )?;
    // Only the ports change: this machine may have 8080 and 9090 taken.
    let port = free_port()?;
    for (flag, value) in [
        ("--port", port.to_string()),
        ("--port-monitoring", "0".into()),
    ] {
        let at = args.iter().position(|a| a == flag).ok_or(flag)?;
        args[at + 1] = value;
    }
    let mut child = Command::new(&jina)
        .args(&args)
        .current_dir(&image_dir)
        .env("HF_HUB_OFFLINE", "1")
        .stderr(Stdio::null())
        .spawn()?;
    // `jina executor --help` prints help; it does not load a model.
    let help = Command::new(&jina).args(["executor", "--help"]).output()?;
    assert!(help.status.success() && String::from_utf8_lossy(&help.stdout).contains("--model"));
    let target = format!("grpc://127.0.0.1:{port}");
    let start = Instant::now();
    loop {
        let out = Command::new(&jina)
            .args(["ping", "executor", &target])
            .output()?;
        if out.status.success() {
            break;
        }
        assert_eq!(
            out.status.code(),
            Some(1),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            return Err("the executor never became SERVING".into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // The liveness probe's form: "--timeout 9500" as one word.
    let out = Command::new(&jina)
        .args(["ping", "executor", &target, "--timeout 9500"])
        .output()?;
    assert!(out.status.success());
    let _ = child.kill();
    let _ = child.wait();
    let out = Command::new(&jina)
        .args(["ping", "executor", &target, "--timeout", "500"])
        .output()?;
    assert_eq!(out.status.code(), Some(1));
    let out = Command::new(&jina)
        .args(["flow", "--uses", "x.yml"])
        .output()?;
    assert!(!out.status.success());
    Ok(())
}

/// The default monitoring port taken (a second executor on the host): the executor serves
/// without metrics; a monitoring port the user named must work or the start fails.
#[test]
fn a_taken_monitoring_port_is_fatal_only_when_asked_for() -> R {
    // Hold 9090 (or find it already held).
    let _held = std::net::TcpListener::bind("127.0.0.1:9090");
    let (_ex, seen) = Executor::launch(&[])?;
    assert!(
        seen.iter().any(|l| l.contains("no metrics")),
        "{}",
        seen.join("\n")
    );
    let out = bin()
        .args(common::tiny_executor_args())
        .args(["--port-monitoring", "9090"])
        .output()?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--port-monitoring 9090"));
    Ok(())
}
