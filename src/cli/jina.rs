//! The `jina` entry point: the same binary, called as `jina` (a link in the image), understands
//! the two command lines that `Flow.to_kubernetes_yaml` writes into its manifests, so Jina's
//! generated YAML runs clipft with only the image swapped:
//! `jina executor --name N --uses config.yml --port 8080 --port-monitoring 9090 ...` and the
//! probes' `jina ping executor grpc://127.0.0.1:8080`. Other Jina flags are accepted and ignored,
//! as Jina's own parser ignores unknown ones.

use std::ffi::OsString;

/// Jina executor flags clipft maps, with whether they take a value.
const MAPPED: [&str; 7] = [
    "--name",
    "--uses",
    "--port",
    "--host",
    "--port-monitoring",
    "--uses-with",
    "--uses-metas",
];

/// Jina flags that take a value and have no meaning for clipft.
const IGNORED_WITH_VALUE: [&str; 14] = [
    "--k8s-namespace",
    "--workspace",
    "--py-modules",
    "--replicas",
    "--shards",
    "--timeout-ready",
    "--retries",
    "--protocol",
    "--uses-requests",
    "--uses-dynamic-batching",
    "--env",
    "--log-config",
    "--exit-on-exceptions",
    "--grpc-server-options",
];

/// Turns a `jina ...` command line into the clipft one, or explains why it cannot.
pub fn translate(args: &[OsString]) -> Result<Vec<OsString>, String> {
    let words: Vec<String> = args
        .iter()
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let mut out: Vec<OsString> = vec!["clipft".into()];
    // `jina executor --help` shows clipft's help for the command, not a model loading.
    if words.iter().any(|w| w == "--help" || w == "-h") {
        out.extend(
            words
                .first()
                .filter(|w| !w.starts_with('-'))
                .map(OsString::from),
        );
        out.push("--help".into());
        return Ok(out);
    }
    match words.first().map(String::as_str) {
        Some("ping") => {
            // jina ping executor|gateway <url> [--timeout ms] (the liveness probe passes
            // "--timeout 9500" as one word, which Jina ignores; so do we).
            let mut rest = words[1..].iter();
            let kind = rest.next().ok_or("usage: jina ping executor <grpc://host:port>")?;
            if kind != "executor" && kind != "gateway" {
                return Err(format!("jina ping {kind}: only `executor` and `gateway` are supported"));
            }
            let target = rest.next().ok_or("usage: jina ping executor <grpc://host:port>")?;
            out.extend(["ping".into(), target.into()]);
            let mut rest = rest.peekable();
            while let Some(w) = rest.next() {
                if w == "--timeout" {
                    if let Some(ms) = rest.next().and_then(|v| v.parse::<f64>().ok()) {
                        out.extend(["--timeout".into(), format!("{}", ms / 1000.0).into()]);
                    }
                }
            }
            Ok(out)
        }
        Some("executor") => {
            out.push("executor".into());
            let mut rest = words[1..].iter();
            while let Some(w) = rest.next() {
                let (flag, inline) = match w.split_once('=') {
                    Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
                    _ => (w.clone(), None),
                };
                let flag = flag.replace('_', "-");
                if MAPPED.contains(&flag.as_str()) {
                    let value = match inline {
                        Some(v) => v,
                        None => rest.next().cloned().ok_or(format!("{flag} needs a value"))?,
                    };
                    out.extend([flag.into(), value.into()]);
                } else if IGNORED_WITH_VALUE.contains(&flag.as_str()) {
                    if inline.is_none() {
                        rest.next();
                    }
                } else if flag.starts_with("--") {
                    // Boolean Jina flags (--native, --quiet-error, ...): nothing to do.
                } else {
                    return Err(format!("jina executor: unexpected argument {w:?}"));
                }
            }
            Ok(out)
        }
        Some("-v" | "--version" | "-vf") => Ok(vec!["clipft".into(), "--version".into()]),
        Some(other) => Err(format!(
            "jina {other}: this image runs clipft, whose `jina` entry point understands `jina executor ...` and `jina ping executor <url>`"
        )),
        None => Err("usage: jina executor [...] | jina ping executor <grpc://host:port>".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(args: &[&str]) -> Result<Vec<String>, String> {
        let a: Vec<OsString> = args.iter().map(OsString::from).collect();
        translate(&a).map(|v| {
            v.into_iter()
                .map(|s| s.to_string_lossy().into_owned())
                .collect()
        })
    }

    #[test]
    fn kubernetes_yaml_command_lines() -> Result<(), String> {
        let got = t(&[
            "jina",
            "executor",
            "--name",
            "clip",
            "--k8s-namespace",
            "ns",
            "--uses",
            "config.yml",
            "--port",
            "8080",
            "--port-monitoring",
            "9090",
            "--uses-with",
            "{\"minibatch_size\": 8}",
            "--uses-metas",
            "{}",
            "--native",
        ])?;
        assert_eq!(
            got,
            [
                "clipft",
                "executor",
                "--name",
                "clip",
                "--uses",
                "config.yml",
                "--port",
                "8080",
                "--port-monitoring",
                "9090",
                "--uses-with",
                "{\"minibatch_size\": 8}",
                "--uses-metas",
                "{}"
            ]
        );
        assert_eq!(
            t(&["jina", "executor", "--uses", "config.yml", "--help"])?,
            ["clipft", "executor", "--help"]
        );
        assert_eq!(t(&["jina", "-h"])?, ["clipft", "--help"]);
        assert_eq!(
            t(&["jina", "ping", "executor", "grpc://127.0.0.1:8080"])?,
            ["clipft", "ping", "grpc://127.0.0.1:8080"]
        );
        assert_eq!(
            t(&[
                "jina",
                "ping",
                "executor",
                "grpc://127.0.0.1:8080",
                "--timeout 9500"
            ])?,
            ["clipft", "ping", "grpc://127.0.0.1:8080"]
        );
        assert_eq!(
            t(&[
                "jina",
                "ping",
                "executor",
                "grpc://h:1",
                "--timeout",
                "1500"
            ])?,
            ["clipft", "ping", "grpc://h:1", "--timeout", "1.5"]
        );
        assert!(t(&["jina", "flow", "--uses", "x"]).is_err());
        assert!(t(&["jina", "ping", "flow", "grpc://h:1"]).is_err());
        Ok(())
    }
}
