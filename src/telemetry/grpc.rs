//! Spans for a tonic server, whatever its services: [`TraceLayer`] opens one span per gRPC call,
//! continuing the caller's trace from the W3C `traceparent`/`tracestate` metadata, and keeps it
//! current while the call runs and while its reply body is written; [`TracedCodec`] (the codec
//! of the generated Jina services, see build.rs) adds `decode` and `encode` spans around the
//! protobuf work inside it. With tracing off both are a pass-through behind one check.

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::future::Either;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Status;
use tonic_prost::{ProstDecoder, ProstEncoder};
use tracing::field::Empty;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::tracing::{enabled, extract};

/// Opens the `request` span of each gRPC call (the health and reflection services excepted:
/// probes every few seconds would bury the traces).
#[derive(Debug, Clone, Copy, Default)]
pub struct TraceLayer;

impl<S> tower::Layer<S> for TraceLayer {
    type Service = Traced<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Traced { inner }
    }
}

/// The service [`TraceLayer`] makes.
#[derive(Debug, Clone)]
pub struct Traced<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// The call's span: named after the RPC as OpenTelemetry's RPC conventions ask
/// (`package.Service/method`), with `rpc.*` attributes; `endpoint`, `docs` and `embedded` are
/// filled in by the handler, `rpc.grpc.status_code` from the reply.
fn request_span(path: &str, headers: &http::HeaderMap) -> tracing::Span {
    let name = path.trim_start_matches('/');
    let (service, method) = name.split_once('/').unwrap_or((name, ""));
    let span = tracing::info_span!(
        parent: None,
        "request",
        otel.name = name,
        otel.kind = "server",
        otel.status_code = Empty,
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = method,
        rpc.grpc.status_code = Empty,
        endpoint = Empty,
        request_id = Empty,
        docs = Empty,
        embedded = Empty,
    );
    // A malformed or absent traceparent leaves the span a root; nothing to report.
    let _ = span.set_parent(extract(headers));
    span
}

/// Records the gRPC status of a reply, from its headers (trailers-only replies) or trailers.
/// Jina's in-band errors travel with status 0 and `is-error: true`; both count as errors.
fn record_status(span: &tracing::Span, map: &http::HeaderMap) {
    if let Some(code) = map
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i64>().ok())
    {
        span.record("rpc.grpc.status_code", code);
        if code != 0 {
            span.record("otel.status_code", "error");
        }
    }
    if map.get("is-error").is_some_and(|v| v.as_bytes() == b"true") {
        span.record("otel.status_code", "error");
    }
}

impl<S, B> tower::Service<http::Request<B>> for Traced<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Either<S::Future, BoxFuture<Result<Self::Response, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if !enabled() || req.uri().path().starts_with("/grpc.") {
            return Either::Left(self.inner.call(req));
        }
        let span = request_span(req.uri().path(), req.headers());
        let fut = {
            let _entered = span.enter();
            self.inner.call(req)
        };
        let body_span = span.clone();
        Either::Right(Box::pin(
            async move {
                let resp = fut.await?;
                record_status(&body_span, resp.headers());
                let (parts, body) = resp.into_parts();
                Ok(http::Response::from_parts(
                    parts,
                    tonic::body::Body::new(TracedBody {
                        inner: body,
                        span: Some(body_span),
                    }),
                ))
            }
            .instrument(span),
        ))
    }
}

pin_project_lite::pin_project! {
    /// A reply body written inside the call's span (so the `encode` spans of its messages are
    /// children of it); the span ends with the body.
    struct TracedBody {
        #[pin]
        inner: tonic::body::Body,
        span: Option<tracing::Span>,
    }
}

impl http_body::Body for TracedBody {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let _entered = this.span.as_ref().map(|s| s.enter());
        let frame = this.inner.poll_frame(cx);
        match &frame {
            Poll::Ready(Some(Ok(f))) => {
                if let (Some(trailers), Some(span)) = (f.trailers_ref(), this.span.as_ref()) {
                    record_status(span, trailers);
                }
            }
            Poll::Ready(Some(Err(e))) => {
                if let Some(span) = this.span.as_ref() {
                    span.record("rpc.grpc.status_code", e.code() as i64);
                    span.record("otel.status_code", "error");
                }
            }
            Poll::Ready(None) => {
                drop(_entered);
                this.span.take();
            }
            Poll::Pending => {}
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// tonic's prost codec with a `decode` / `encode` span around each message, inside whatever
/// span is current (the call's); outside one, or with tracing off, it is the prost codec.
#[derive(Debug, Clone)]
pub struct TracedCodec<T, U> {
    _types: PhantomData<(T, U)>,
}

impl<T, U> Default for TracedCodec<T, U> {
    fn default() -> Self {
        Self {
            _types: PhantomData,
        }
    }
}

impl<T, U> Codec for TracedCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = TracedEncoder<T>;
    type Decoder = TracedDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        TracedEncoder(ProstEncoder::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        TracedDecoder(ProstDecoder::default())
    }
}

/// The message type's own name (`DataRequestProto`), for span attributes.
fn short_name<M>() -> &'static str {
    let full = std::any::type_name::<M>();
    full.rsplit("::").next().unwrap_or(full)
}

/// Whether codec work should get a span: tracing on, and inside a traced call.
fn in_traced_call() -> bool {
    enabled() && !tracing::Span::current().is_none()
}

/// [`TracedCodec`]'s encoder.
#[derive(Debug)]
pub struct TracedEncoder<T>(ProstEncoder<T>);

impl<T: prost::Message> Encoder for TracedEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        if !in_traced_call() {
            return self.0.encode(item, dst);
        }
        let span = tracing::info_span!(
            "encode",
            message = short_name::<T>(),
            bytes = item.encoded_len() as i64
        );
        let _entered = span.enter();
        self.0.encode(item, dst)
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}

/// A request refused before decoding: over the budget is RESOURCE_EXHAUSTED (as a message over
/// the size limit is), malformed is INVALID_ARGUMENT.
fn budget_status(e: crate::protocol::budget::BudgetError) -> Status {
    use crate::protocol::budget::BudgetError;
    metrics::counter!("clipft_requests_over_decode_budget_total").increment(1);
    match e {
        BudgetError::OverBudget { .. } => Status::resource_exhausted(e.to_string()),
        BudgetError::Malformed(_) => Status::invalid_argument(e.to_string()),
    }
}

/// [`TracedCodec`]'s decoder.
#[derive(Debug)]
pub struct TracedDecoder<U>(ProstDecoder<U>);

impl<U: prost::Message + Default + 'static> Decoder for TracedDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        // A request that carries documents is checked against the decode budget first: prost
        // would otherwise build every message before anything could count them. tonic hands
        // the decoder the whole message as one contiguous buffer (its `DecodeBuf` is a window
        // on one `BytesMut`), so `chunk` is all of it.
        if let Some(root) = crate::protocol::budget::Root::of::<U>() {
            let buf = bytes::Buf::chunk(src);
            if buf.len() == bytes::Buf::remaining(src) {
                crate::protocol::budget::check(root, buf).map_err(budget_status)?;
            }
        }
        if !in_traced_call() {
            return self.0.decode(src);
        }
        let span = tracing::info_span!(
            "decode",
            message = short_name::<U>(),
            bytes = bytes::Buf::remaining(src) as i64
        );
        let _entered = span.enter();
        self.0.decode(src)
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
