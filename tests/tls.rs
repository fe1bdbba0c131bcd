//! TLS on both services: with `--tls-cert`/`--tls-key` the executor and the trainer speak only
//! TLS, and every client reaches them with `grpcs://`, trusting `--tls-ca` besides the system's
//! roots: `clipft ping`, `clipft runs` (whose bearer token no longer travels in clear text) and
//! the real clip_client. The certificates are made here, for 127.0.0.1 and localhost.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};

mod common;
use common::{root, tiny};

type R<T = ()> = Result<T, Box<dyn std::error::Error>>;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_clipft"));
    c.env("CLIPFT_LOG", "warn");
    c
}

fn tempdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("clipft-tls-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A test CA and a server certificate it signed: (ca.pem, cert.pem, key.pem).
fn certificates(dir: &Path) -> R<(PathBuf, PathBuf, PathBuf)> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "clipft test CA");
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca.self_signed(&ca_key)?;
    let mut leaf = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])?;
    leaf.distinguished_name
        .push(DnType::CommonName, "localhost");
    let key = KeyPair::generate()?;
    let cert = leaf.signed_by(&key, &ca_cert, &ca_key)?;
    let paths = (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    );
    std::fs::write(&paths.0, ca_cert.pem())?;
    std::fs::write(&paths.1, cert.pem())?;
    std::fs::write(&paths.2, key.serialize_pem())?;
    Ok(paths)
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn ping(target: &str, ca: Option<&Path>) -> R<(bool, String)> {
    let mut cmd = bin();
    cmd.args(["ping", target, "--timeout", "5"]);
    if let Some(ca) = ca {
        cmd.arg("--tls-ca").arg(ca);
    }
    let out = cmd.output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[test]
fn executor_and_trainer_serve_tls_only() -> R {
    let dir = tempdir("both");
    let (ca, cert, key) = certificates(&dir)?;

    let mut cmd = bin();
    cmd.args(common::tiny_executor_args())
        .args(["--port-monitoring", "0", "--tls-cert"])
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key);
    let spawned = common::spawn_serving(cmd, None)?;
    let executor = Server(spawned.child);
    let port = spawned.port;
    let (ok, e) = ping(&format!("grpcs://127.0.0.1:{port}"), Some(&ca))?;
    assert!(ok, "{e}");
    let (ok, e) = ping(&format!("grpcs://localhost:{port}"), Some(&ca))?;
    assert!(ok, "{e}");
    // Plaintext is refused; an untrusted certificate too.
    let (ok, _) = ping(&format!("grpc://127.0.0.1:{port}"), None)?;
    assert!(!ok, "plaintext answered by a TLS server");
    let (ok, _) = ping(&format!("grpcs://127.0.0.1:{port}"), None)?;
    assert!(!ok, "a certificate of an unknown CA was trusted");

    // The real clip_client over grpcs://, trusting the CA the way gRPC's Python clients do.
    let python = common::venv("interop-venv", "tests/interop/requirements.txt")?.join("python");
    let out = Command::new(python)
        .arg("-c")
        .arg(
            "import sys\n\
             from clip_client import Client\n\
             c = Client(f'grpcs://127.0.0.1:{sys.argv[1]}')\n\
             e = c.encode(['a red striped dress', 'blue jeans'])\n\
             assert e.shape == (2, 32), e.shape\n\
             print('ok')\n",
        )
        .arg(port.to_string())
        .env("GRPC_DEFAULT_SSL_ROOTS_FILE_PATH", &ca)
        .current_dir(root())
        .output()?;
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("ok"),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    drop(executor);

    let mut cmd = bin();
    cmd.args(["trainer", "--host", "127.0.0.1", "--port", "0"])
        .args([
            "--port-monitoring",
            "0",
            "--auth-token",
            "s3cret",
            "--data-dir",
        ])
        .arg(dir.join("state"))
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key);
    let spawned = common::spawn_serving(cmd, None)?;
    let _trainer = Server(spawned.child);
    let port = spawned.port;
    let runs = |target: &str, ca: Option<&Path>| -> R<(bool, String)> {
        let mut cmd = bin();
        cmd.args([
            "runs",
            "list",
            "--trainer",
            target,
            "--auth-token",
            "s3cret",
        ]);
        if let Some(ca) = ca {
            cmd.arg("--tls-ca").arg(ca);
        }
        let out = cmd.output()?;
        Ok((
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        ))
    };
    let (ok, out) = runs(&format!("grpcs://127.0.0.1:{port}"), Some(&ca))?;
    assert!(ok && out.contains("name"), "{out}");
    let (ok, out) = runs(&format!("grpc://127.0.0.1:{port}"), None)?;
    // Refused with an error, not a quiet exit (the connection's broken pipe is not stdout's).
    assert!(!ok && out.contains("error"), "plaintext answered: {out}");
    Ok(())
}

#[test]
fn bad_tls_files_stop_start_up() -> R {
    let dir = tempdir("bad");
    let not_pem = dir.join("cert.pem");
    std::fs::write(&not_pem, "not a certificate")?;
    for (cert, key, want) in [
        (dir.join("missing.pem"), not_pem.clone(), "missing.pem"),
        (not_pem.clone(), not_pem.clone(), "certificate"),
    ] {
        let out = bin()
            .args([
                "trainer",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--data-dir",
            ])
            .arg(dir.join("state"))
            .arg("--tls-cert")
            .arg(&cert)
            .arg("--tls-key")
            .arg(&key)
            .output()?;
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && e.contains(want), "{e}");
    }
    let out = bin()
        .args(["executor", "--model", &tiny(), "--tls-cert"])
        .arg(&not_pem)
        .output()?;
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("--tls-key"), "{e}");
    Ok(())
}
