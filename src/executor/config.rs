//! `--uses executor.yml`: Jina's executor YAML (`jtype`, `with:`, `metas:`), and clip_server's
//! one-executor Flow YAML, read into the executor's own settings so an existing deployment's
//! configuration keeps working. Keys are clip_server's (`name: ViT-B-32::openai`,
//! `minibatch_size`, `access_paths`, `num_worker_preprocess`, `device`, `dtype`) or clipft's flag
//! names with underscores; unknown keys are an error that names them.

use std::collections::BTreeMap;
use std::path::Path;

use serde_yaml_ng::Value;

/// Settings found in the YAML, by the executor flag they set (`model`, `select_model`, ...).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UsesConfig {
    pub values: BTreeMap<String, String>,
    /// Keys that clip_server has and clipft does not need (`jit`, `py_modules`), for a warning.
    pub ignored: Vec<String>,
}

/// Flags the `with:` block may set, with clip_server's spellings mapped to them.
fn flag_for(key: &str) -> Option<&'static str> {
    Some(match key {
        "model" => "model",
        "artifact" => "artifact",
        "select_model" => "select_model",
        "device" => "device",
        "dtype" => "dtype",
        "minibatch_size" => "minibatch_size",
        "access_paths" | "traversal_paths" => "access_paths",
        "num_worker_preprocess" | "preprocess_threads" => "preprocess_threads",
        "queue_depth" => "queue_depth",
        "max_request_docs" => "max_request_docs",
        "max_decoded_bytes" => "max_decoded_bytes",
        "max_inflight_bytes" => "max_inflight_bytes",
        "max_image_pixels" => "max_image_pixels",
        "max_text_bytes" => "max_text_bytes",
        "image_root" => "image_root",
        "allow_http_images" => "allow_http_images",
        "image_hosts" => "image_hosts",
        _ => return None,
    })
}

impl UsesConfig {
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let doc: Value = serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?;
        let mut doc = doc;
        // clip_server's flow YAML: one executor whose `uses` is the executor YAML.
        if get_str(&doc, "jtype") == Some("Flow") {
            let execs = doc
                .get("executors")
                .and_then(Value::as_sequence)
                .ok_or("a Flow YAML needs an `executors` list")?;
            let [exec] = execs.as_slice() else {
                return Err(format!(
                    "the Flow has {} executors; clipft serves one, so give it that executor's YAML",
                    execs.len()
                ));
            };
            let mut uses = exec.get("uses").cloned().unwrap_or(Value::Null);
            if !uses.is_mapping() {
                return Err("the Flow's executor needs an inline `uses:` block".into());
            }
            if let Some(name) = get_str(exec, "name") {
                let metas = uses.as_mapping_mut().map(|m| {
                    m.entry("metas".into())
                        .or_insert(Value::Mapping(Default::default()))
                });
                if let Some(Value::Mapping(m)) = metas {
                    m.entry("name".into()).or_insert(Value::String(name.into()));
                }
            }
            doc = uses;
        }
        let mut out = UsesConfig::default();
        if let Some(with) = doc.get("with") {
            let map = with.as_mapping().ok_or("`with:` must be a mapping")?;
            for (k, v) in map {
                let key = k.as_str().ok_or("`with:` keys must be strings")?;
                let value =
                    scalar(v).ok_or_else(|| format!("with.{key} must be a single value"))?;
                if key == "name" {
                    // clip_server's model name.
                    let repo = crate::model::backbones::canonical(&value).to_string();
                    out.values.insert("model".into(), repo);
                } else if key == "jit" {
                    out.ignored.push("with.jit".into());
                } else if let Some(flag) = flag_for(key) {
                    let value = match (flag, value.as_str()) {
                        ("dtype", "fp16") => "f16".to_string(),
                        ("dtype", "fp32") => "f32".to_string(),
                        ("dtype", "bf16") => "bf16".to_string(),
                        _ => value,
                    };
                    out.values.insert(flag.into(), value);
                } else {
                    return Err(format!("unknown key with.{key}"));
                }
            }
        }
        if let Some(metas) = doc.get("metas") {
            let map = metas.as_mapping().ok_or("`metas:` must be a mapping")?;
            for (k, v) in map {
                match k.as_str() {
                    Some("name") => {
                        let name = scalar(v).ok_or("metas.name must be a string")?;
                        out.values.insert("name".into(), name);
                    }
                    Some(other @ ("py_modules" | "workspace" | "description")) => {
                        out.ignored.push(format!("metas.{other}"))
                    }
                    Some(other) => return Err(format!("unknown key metas.{other}")),
                    None => return Err("`metas:` keys must be strings".into()),
                }
            }
        }
        for key in doc.as_mapping().into_iter().flat_map(|m| m.keys()) {
            match key.as_str() {
                Some("jtype" | "with" | "metas" | "requests" | "version") => {}
                Some(other) => return Err(format!("unknown top-level key {other:?}")),
                None => return Err("top-level keys must be strings".into()),
            }
        }
        Ok(out)
    }
}

fn get_str<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn executor_yaml_maps_to_flags() -> Result<(), String> {
        let c = UsesConfig::parse(
            "jtype: CLIPEncoder\nwith:\n  name: ViT-B-32::openai\n  minibatch_size: 16\n  device: cpu\n  dtype: fp16\n  traversal_paths: '@c'\n  num_worker_preprocess: 4\n  jit: false\nmetas:\n  name: clip_t\n  py_modules:\n    - clip_server.executors.clip_torch\n",
        )?;
        let get = |k: &str| c.values.get(k).map(String::as_str);
        assert_eq!(get("model"), Some("openai/clip-vit-base-patch32"));
        assert_eq!(get("minibatch_size"), Some("16"));
        assert_eq!(get("dtype"), Some("f16"));
        assert_eq!(get("access_paths"), Some("@c"));
        assert_eq!(get("preprocess_threads"), Some("4"));
        assert_eq!(get("name"), Some("clip_t"));
        assert_eq!(c.ignored, vec!["with.jit", "metas.py_modules"]);
        Ok(())
    }

    #[test]
    fn clip_server_flow_yaml_is_read() -> Result<(), String> {
        let c = UsesConfig::parse(
            "jtype: Flow\nversion: '1'\nwith:\n  port: 51000\nexecutors:\n  - name: clip_t\n    uses:\n      jtype: CLIPEncoder\n      with:\n        minibatch_size: 8\n      metas:\n        py_modules:\n          - clip_server.executors.clip_torch\n",
        )?;
        assert_eq!(c.values.get("name").map(String::as_str), Some("clip_t"));
        assert_eq!(
            c.values.get("minibatch_size").map(String::as_str),
            Some("8")
        );
        Ok(())
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = UsesConfig::parse("jtype: X\nwith:\n  batch: 3\n").unwrap_err();
        assert!(e.contains("with.batch"), "{e}");
        assert!(UsesConfig::parse("with: [1]").is_err());
        assert!(UsesConfig::parse("jtype: X\nfoo: 1\n")
            .unwrap_err()
            .contains("foo"));
    }
}
