//! Request parameters as Jina hands them to an executor: a `google.protobuf.Struct` in which
//! every number is a double, `parameters[<executor name>]` (a dict) overrides the shared keys for
//! that executor, and `<executor name>__<key>` names one key for one executor.

use std::collections::BTreeMap;

use prost_types::{value::Kind, Struct, Value};

/// The parameters one executor sees, after Jina's per-executor overrides.
#[derive(Debug, Clone, Default)]
pub struct Params(BTreeMap<String, Value>);

impl Params {
    /// Applies Jina's rules for the executor called `name`: shared keys first, then
    /// `name__key` keys, then the entries of a `name` dict. Other executors' keys are dropped.
    pub fn for_executor(parameters: Option<&Struct>, name: &str) -> Self {
        let mut out = BTreeMap::new();
        let Some(p) = parameters else {
            return Self(out);
        };
        let prefix = format!("{name}__");
        let mut scoped = Vec::new();
        for (k, v) in &p.fields {
            if let Some(key) = k.strip_prefix(&prefix) {
                scoped.push((key.to_string(), v.clone()));
            } else if k.contains("__") && !k.starts_with("__") {
                // Meant for another executor.
            } else if k == name && matches!(v.kind, Some(Kind::StructValue(_))) {
                // Merged below.
            } else {
                out.insert(k.clone(), v.clone());
            }
        }
        out.extend(scoped);
        if let Some(Value {
            kind: Some(Kind::StructValue(own)),
        }) = p.fields.get(name)
        {
            out.extend(own.fields.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        Self(out)
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0
            .get(key)
            .filter(|v| !matches!(v.kind, Some(Kind::NullValue(_)) | None))
    }

    /// A string parameter; an error names the key when it has another type.
    pub fn str(&self, key: &str) -> Result<Option<&str>, String> {
        match self.get(key).and_then(|v| v.kind.as_ref()) {
            None => Ok(None),
            Some(Kind::StringValue(s)) => Ok(Some(s)),
            Some(other) => Err(format!(
                "parameter {key:?} must be a string, got {}",
                kind_name(other)
            )),
        }
    }

    /// A boolean parameter (Python truthiness is not guessed: it must be a bool).
    pub fn bool(&self, key: &str) -> Result<Option<bool>, String> {
        match self.get(key).and_then(|v| v.kind.as_ref()) {
            None => Ok(None),
            Some(Kind::BoolValue(b)) => Ok(Some(*b)),
            Some(other) => Err(format!(
                "parameter {key:?} must be true or false, got {}",
                kind_name(other)
            )),
        }
    }

    /// A positive whole number (Jina sends every number as a double).
    pub fn positive(&self, key: &str) -> Result<Option<usize>, String> {
        match self.get(key).and_then(|v| v.kind.as_ref()) {
            None => Ok(None),
            Some(Kind::NumberValue(n)) if n.fract() == 0.0 && *n >= 1.0 && *n <= 1e9 => {
                Ok(Some(*n as usize))
            }
            Some(Kind::NumberValue(n)) => Err(format!(
                "parameter {key:?} must be a positive whole number, got {n}"
            )),
            Some(other) => Err(format!(
                "parameter {key:?} must be a number, got {}",
                kind_name(other)
            )),
        }
    }
}

fn kind_name(k: &Kind) -> &'static str {
    match k {
        Kind::NullValue(_) => "null",
        Kind::NumberValue(_) => "a number",
        Kind::StringValue(_) => "a string",
        Kind::BoolValue(_) => "a bool",
        Kind::StructValue(_) => "a dict",
        Kind::ListValue(_) => "a list",
    }
}

/// Builds a Struct from key/value pairs (for tests and clients).
pub fn to_struct<'a>(pairs: impl IntoIterator<Item = (&'a str, Value)>) -> Struct {
    Struct {
        fields: pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &str) -> Value {
        Value {
            kind: Some(Kind::StringValue(v.into())),
        }
    }

    #[test]
    fn executor_overrides_follow_jina() {
        let nested = Value {
            kind: Some(Kind::StructValue(to_struct([("access_paths", s("@m"))]))),
        };
        let p = to_struct([
            ("access_paths", s("@r")),
            (
                "clip__drop_image_content",
                Value {
                    kind: Some(Kind::BoolValue(true)),
                },
            ),
            ("other__access_paths", s("@c")),
            (
                "minibatch_size",
                Value {
                    kind: Some(Kind::NumberValue(8.0)),
                },
            ),
        ]);
        let mine = Params::for_executor(Some(&p), "clip");
        assert_eq!(mine.str("access_paths"), Ok(Some("@r")));
        assert_eq!(mine.bool("drop_image_content"), Ok(Some(true)));
        assert_eq!(mine.positive("minibatch_size"), Ok(Some(8)));
        let mut p2 = p.clone();
        p2.fields.insert("clip".into(), nested);
        assert_eq!(
            Params::for_executor(Some(&p2), "clip").str("access_paths"),
            Ok(Some("@m"))
        );
        assert_eq!(
            Params::for_executor(Some(&p2), "other").str("access_paths"),
            Ok(Some("@c"))
        );
    }

    #[test]
    fn wrong_types_are_named() {
        let p = to_struct([
            (
                "minibatch_size",
                Value {
                    kind: Some(Kind::NumberValue(2.5)),
                },
            ),
            ("x", s("y")),
        ]);
        let mine = Params::for_executor(Some(&p), "clip");
        assert!(mine
            .positive("minibatch_size")
            .unwrap_err()
            .contains("minibatch_size"));
        assert!(mine.bool("x").unwrap_err().contains("\"x\""));
    }
}
