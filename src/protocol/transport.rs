//! How clipft's gRPC peers reach each other: in the clear or over TLS. A client picks by the
//! address (`grpc://` or `host:port` in the clear, `grpcs://` over TLS, trusting the system's
//! roots plus an optional CA file); a server serves TLS only, and so refuses plaintext, when it
//! is given a certificate and key (`--tls-cert`, `--tls-key`). The executor, the trainer and
//! every client command share this one place, and its one way of telling why a connection
//! failed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::transport::{
    Certificate, Channel, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig,
};

/// What can go wrong before a single call is made.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
    #[error("{addr}: {msg}")]
    Address { addr: String, msg: String },
    #[error("{addr}: {msg}")]
    Connect { addr: String, msg: String },
}

/// A server's certificate chain and private key, PEM files.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn read(path: &Path) -> Result<Vec<u8>, TransportError> {
    std::fs::read(path).map_err(|e| TransportError::File {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })
}

impl TlsFiles {
    /// The server side of TLS, read now so that a missing or unreadable file stops the server
    /// at start-up instead of failing every handshake.
    pub fn server_config(&self) -> Result<ServerTlsConfig, TransportError> {
        let cert = read(&self.cert)?;
        let key = read(&self.key)?;
        for (path, text, what) in [
            (&self.cert, &cert, "CERTIFICATE"),
            (&self.key, &key, "PRIVATE KEY"),
        ] {
            if !String::from_utf8_lossy(text).contains(what) {
                return Err(TransportError::File {
                    path: path.clone(),
                    msg: format!("holds no PEM {}", what.to_lowercase()),
                });
            }
        }
        Ok(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))
    }
}

/// A parsed client address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `http://host:port` or `https://host:port`, as tonic dials it.
    pub uri: String,
    pub tls: bool,
}

/// `grpc://host:port`, `host:port` or `http://` in the clear; `grpcs://` or `https://` over
/// TLS. Other schemes are refused by name.
pub fn parse_target(addr: &str) -> Result<Target, TransportError> {
    let bad = |msg: &str| TransportError::Address {
        addr: addr.to_string(),
        msg: msg.to_string(),
    };
    let (tls, rest) = match addr.split_once("://") {
        None => (false, addr),
        Some((scheme, rest)) => match scheme.to_ascii_lowercase().as_str() {
            "grpc" | "http" => (false, rest),
            "grpcs" | "https" => (true, rest),
            _ => return Err(bad("use grpc://host:port, or grpcs://host:port for TLS")),
        },
    };
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() || rest.contains('/') {
        return Err(bad("expected host:port"));
    }
    let scheme = if tls { "https" } else { "http" };
    Ok(Target {
        uri: format!("{scheme}://{rest}"),
        tls,
    })
}

/// An endpoint for `addr`: TLS for `grpcs://`, trusting the system's roots and `ca` (a PEM
/// file) when given. Connects lazily.
pub fn endpoint(addr: &str, ca: Option<&Path>) -> Result<Endpoint, TransportError> {
    let target = parse_target(addr)?;
    let endpoint =
        Endpoint::from_shared(target.uri.clone()).map_err(|e| TransportError::Address {
            addr: addr.to_string(),
            msg: error_chain(&e),
        })?;
    if !target.tls {
        if let Some(ca) = ca {
            tracing::warn!(
                "--tls-ca {} is not used: {addr} is not a grpcs:// address",
                ca.display()
            );
        }
        return Ok(endpoint);
    }
    let mut tls = ClientTlsConfig::new().with_native_roots();
    if let Some(ca) = ca {
        tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
    }
    endpoint
        .tls_config(tls)
        .map_err(|e| TransportError::Address {
            addr: addr.to_string(),
            msg: error_chain(&e),
        })
}

/// Connects to `addr` (see [`endpoint`]) within `timeout`.
pub async fn connect(
    addr: &str,
    ca: Option<&Path>,
    timeout: Duration,
) -> Result<Channel, TransportError> {
    endpoint(addr, ca)?
        .connect_timeout(timeout)
        .connect()
        .await
        .map_err(|e| TransportError::Connect {
            addr: addr.to_string(),
            msg: error_chain(&e),
        })
}

/// An error and its causes as one line, each cause once: tonic's transport errors repeat their
/// source in their own message ("tcp connect error: tcp connect error: Connection refused"). A
/// gRPC status reads as its message and code in words, not tonic's debug dump (`status:
/// NotFound, message: ..., details: [], ...`).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let text = |e: &(dyn std::error::Error + 'static)| match e.downcast_ref::<tonic::Status>() {
        Some(s) => format!("{} ({})", s.message(), s.code().description()),
        None => e.to_string(),
    };
    let mut out = text(e);
    let mut source = e.source();
    while let Some(s) = source {
        let text = text(s);
        if !text.is_empty() && !out.contains(&text) {
            // A cause that repeats the end of what is written adds nothing.
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    // Causes that quote their own source twice ("a: a: b") are folded once more.
    let parts: Vec<&str> = out.split(": ").collect();
    let mut kept: Vec<&str> = Vec::with_capacity(parts.len());
    for p in parts {
        if kept.last() != Some(&p) {
            kept.push(p);
        }
    }
    kept.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes() {
        let t = |a: &str| parse_target(a).unwrap();
        assert_eq!(
            t("grpc://h:1"),
            Target {
                uri: "http://h:1".into(),
                tls: false
            }
        );
        assert_eq!(
            t("h:1"),
            Target {
                uri: "http://h:1".into(),
                tls: false
            }
        );
        assert_eq!(
            t("grpcs://h:1"),
            Target {
                uri: "https://h:1".into(),
                tls: true
            }
        );
        assert_eq!(
            t("https://h:1/"),
            Target {
                uri: "https://h:1".into(),
                tls: true
            }
        );
        assert!(parse_target("ftp://h:1").is_err());
        assert!(parse_target("grpc://h:1/path").is_err());
    }

    #[test]
    fn causes_appear_once() {
        #[derive(Debug)]
        struct E(String, Option<Box<E>>);
        impl std::fmt::Display for E {
            fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl std::error::Error for E {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                self.1.as_deref().map(|e| e as _)
            }
        }
        let e = E(
            "transport error".into(),
            Some(Box::new(E(
                "tcp connect error: tcp connect error".into(),
                Some(Box::new(E("Connection refused".into(), None))),
            ))),
        );
        assert_eq!(
            error_chain(&e),
            "transport error: tcp connect error: Connection refused"
        );
    }
}
