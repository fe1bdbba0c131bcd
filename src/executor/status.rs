//! Every executor error, and the one place that maps it to what a Jina peer expects: an in-band
//! `StatusProto` (the request comes back with `header.status` ERROR, gRPC status OK, trailing
//! metadata `is-error: true`), or a gRPC status where Jina itself would fail the call.

use crate::protocol::jina::{status_proto, StatusProto};

/// The exception class the executor reports, as Jina reports its Python executor's class.
pub const EXECUTOR_CLASS: &str = "CLIPEncoder";

/// What can go wrong while serving one request.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ExecutorError {
    /// One document cannot be encoded: the whole request fails, naming it.
    #[error("{at} (id {}): {reason}", crate::docarray::quoted(.id))]
    BadDocument {
        at: String,
        id: String,
        reason: String,
    },
    /// A parameter has the wrong type or value.
    #[error("{0}")]
    BadParameter(String),
    /// `docs_bytes` is docarray's pickle protocol; executing it would run Python pickles.
    #[error("data.docs_bytes (a pickled DocumentArray) is not accepted: send the documents in data.docs, as Jina clients do")]
    PickledDocs,
    /// More documents in one request than the executor accepts.
    #[error(
        "the request holds {docs} documents to encode; the limit is {limit} (--max-request-docs)"
    )]
    TooManyDocs { docs: usize, limit: usize },
    /// `/rank` embeds queries and matches with both towers.
    #[error("/rank needs both towers, but this executor serves only {0}: start it with --select-model all")]
    RankNeedsBothTowers(&'static str),
    /// The tower's queue is full (only unary calls are refused; streams wait).
    #[error("the {tower} queue is full ({depth} documents queued, --queue-depth); retry later")]
    QueueFull { tower: &'static str, depth: usize },
    /// Requests in flight hold the executor's whole memory budget (only unary calls are
    /// refused; streams wait).
    #[error("the executor is busy: requests in flight hold {held} bytes, this one needs {need}, the limit is {limit} (--max-inflight-bytes); retry later")]
    Overloaded { need: u64, held: u64, limit: u64 },
    /// The model failed on a batch.
    #[error("model: {0}")]
    Model(String),
    /// A bug on the request side (a panic while preprocessing): the request fails, the
    /// executor goes on.
    #[error("internal error: {0}")]
    Internal(String),
    /// The executor stopped while the request waited.
    #[error("the executor is shutting down")]
    ShuttingDown,
}

impl ExecutorError {
    /// The exception name Jina clients see in `header.status.exception.name`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::BadDocument { .. } => "BadDocumentError",
            Self::BadParameter(_) => "BadParameterError",
            Self::PickledDocs => "UnsupportedPayloadError",
            Self::TooManyDocs { .. } => "RequestTooLargeError",
            Self::RankNeedsBothTowers(_) => "MissingTowerError",
            Self::QueueFull { .. } => "QueueFullError",
            Self::Overloaded { .. } => "OverloadedError",
            Self::Model(_) => "ModelError",
            Self::Internal(_) => "InternalError",
            Self::ShuttingDown => "ShuttingDownError",
        }
    }

    /// The in-band status Jina's worker writes into a failed request's header.
    pub fn to_status(&self) -> StatusProto {
        let message = self.message();
        StatusProto {
            code: status_proto::StatusCode::Error as i32,
            description: format!("{}({message:?})", self.name()),
            exception: Some(status_proto::ExceptionProto {
                name: self.name().into(),
                args: vec![message],
                stacks: Vec::new(),
                executor: EXECUTOR_CLASS.into(),
            }),
        }
    }

    /// Where a call fails as a whole instead of in-band: a full queue on a unary call is
    /// RESOURCE_EXHAUSTED, so the caller backs off; shutting down is UNAVAILABLE, so a Jina
    /// gateway retries another replica.
    pub fn to_grpc(&self) -> tonic::Status {
        match self {
            Self::QueueFull { .. } | Self::Overloaded { .. } => {
                tonic::Status::resource_exhausted(self.to_string())
            }
            Self::ShuttingDown => tonic::Status::unavailable(self.to_string()),
            _ => tonic::Status::internal(self.message()),
        }
    }

    /// What a client is told: without a backtrace, and cut to [`MAX_MESSAGE_BYTES`]. Reasons
    /// quote what the client sent (URIs, texts, shapes); the status carries the message twice,
    /// once escaped, and a reason of hundreds of megabytes became gigabytes of reply.
    pub fn message(&self) -> String {
        crate::docarray::cut(&without_backtrace(&self.to_string()), MAX_MESSAGE_BYTES)
    }

    /// Whether the error fails the call rather than travelling in-band.
    pub fn fails_call(&self) -> bool {
        matches!(
            self,
            Self::QueueFull { .. } | Self::Overloaded { .. } | Self::ShuttingDown
        )
    }
}

/// The longest error message a client is sent.
pub const MAX_MESSAGE_BYTES: usize = 4096;

/// The text of a caught panic's payload (`panic!` with a literal or a formatted message).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

/// An error message cut before a captured backtrace: clients get the reason, the executor's log
/// keeps the rest. Backtraces reach messages through libraries that format them into their
/// `Display` (candle does, when `RUST_BACKTRACE` is set); they reveal the server's build paths
/// and mean nothing to a client.
pub fn without_backtrace(message: &str) -> String {
    let mut kept = Vec::new();
    for line in message.lines() {
        let t = line.trim_start();
        let frame = t
            .split_once(": ")
            .is_some_and(|(n, _)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        if t.starts_with("stack backtrace:") || (frame && line.starts_with(' ')) {
            break;
        }
        kept.push(line);
    }
    kept.join("\n").trim_end().to_string()
}

/// The success status.
pub fn success() -> StatusProto {
    StatusProto {
        code: status_proto::StatusCode::Success as i32,
        description: String::new(),
        exception: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_to_clients_are_bounded() {
        let e = ExecutorError::BadDocument {
            at: "docs[0]".into(),
            id: "\u{1}".repeat(1_000_000),
            reason: "x".repeat(1_000_000),
        };
        let status = e.to_status();
        let args = status.exception.map(|x| x.args).unwrap_or_default();
        assert_eq!(args.len(), 1);
        assert!(args[0].len() < MAX_MESSAGE_BYTES + 100, "{}", args[0].len());
        assert!(
            args[0].starts_with("docs[0] (id \"\\u{1}"),
            "{}",
            &args[0][..40]
        );
        assert!(args[0].ends_with("more bytes cut)"));
        assert!(status.description.len() < 3 * MAX_MESSAGE_BYTES);
        assert!(e.to_grpc().message().len() < MAX_MESSAGE_BYTES + 100);
    }

    /// A candle error carrying a backtrace (as candle makes them under RUST_BACKTRACE=1) reaches
    /// the client without it.
    #[test]
    fn statuses_carry_no_backtrace() {
        let e = candle_core::Error::WithBacktrace {
            inner: Box::new(candle_core::Error::Msg("shape mismatch in matmul".into())),
            backtrace: Box::new(std::backtrace::Backtrace::force_capture()),
        };
        let err = ExecutorError::Model(crate::model::ModelError::Compute(e).to_string());
        let status = err.to_status();
        assert!(
            status.description.contains("shape mismatch in matmul"),
            "{}",
            status.description
        );
        for text in [
            &status.description,
            &status.exception.as_ref().unwrap().args[0],
        ] {
            assert!(!text.contains("backtrace"), "{text}");
            assert!(!text.contains(".rs:"), "{text}");
            assert!(!text.contains('\n'), "{text}");
        }
        assert!(!err.to_grpc().message().contains(".rs:"));
    }

    #[test]
    fn messages_keep_their_own_lines() {
        assert_eq!(without_backtrace("a\nb: c"), "a\nb: c");
        assert_eq!(
            without_backtrace("boom\nstack backtrace:\n   0: f\n             at x.rs:1"),
            "boom"
        );
        assert_eq!(
            without_backtrace("boom\n   0: std::backtrace\n   1: g"),
            "boom"
        );
    }
}
