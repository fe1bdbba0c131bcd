//! The tonic wiring: Jina's services over [`Core`], `grpc.health.v1`, server reflection in both
//! `v1alpha` (the Jina gateway lists services through it before it sends anything) and `v1`,
//! explicit message-size limits, the `is-error` trailer, graceful shutdown, and (with
//! `--tracing`) a span per call that continues the caller's W3C trace
//! ([`crate::telemetry::grpc::TraceLayer`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::codec::CompressionEncoding;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use super::batcher::new_source;
use super::endpoints::{Core, ENDPOINTS};
use super::status;
use crate::protocol::docarray::DocumentArrayProto;
use crate::protocol::jina::{
    data_request_proto, jina_data_request_rpc_server as pd,
    jina_discover_endpoints_rpc_server as de, jina_gateway_dry_run_rpc_server as dr,
    jina_info_rpc_server as info, jina_rpc_server as call,
    jina_single_data_request_rpc_server as psd, jina_single_document_request_rpc_server as sd,
    status_proto, DataRequestListProto, DataRequestProto, EndpointsProto, JinaInfoProto,
    SingleDocumentRequestProto, StatusProto,
};

/// The services a Jina worker registers (and we do), by their full names: set SERVING in
/// health and listed by reflection.
pub const JINA_SERVICES: [&str; 7] = [
    "jina.JinaRPC",
    "jina.JinaSingleDataRequestRPC",
    "jina.JinaDataRequestRPC",
    "jina.JinaGatewayDryRunRPC",
    "jina.JinaSingleDocumentRequestRPC",
    "jina.JinaDiscoverEndpointsRPC",
    "jina.JinaInfoRPC",
];

/// Network-level settings of the server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Largest request or reply message (Jina has none; a limit keeps one client from taking
    /// the memory of all).
    pub max_message_bytes: usize,
    /// The memory a request may take once decoded, estimated from its wire bytes before it is
    /// decoded ([`crate::protocol::budget`]): empty documents are two bytes on the wire and
    /// hundreds decoded, so the message size alone does not bound the memory.
    pub max_decoded_bytes: u64,
    /// Requests of one `Call` stream processed at once (so one clip_client with prefetch feeds
    /// the batcher with many requests).
    pub stream_concurrency: usize,
    /// How long in-flight requests may take to finish after a shutdown signal.
    pub shutdown_timeout: Duration,
    /// Serve TLS only (plaintext connections fail their handshake).
    pub tls: Option<tonic::transport::ServerTlsConfig>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_message_bytes: 256 << 20,
            max_decoded_bytes: crate::protocol::budget::DEFAULT_LIMIT,
            stream_concurrency: 8,
            shutdown_timeout: Duration::from_secs(30),
            tls: None,
        }
    }
}

/// Set by a handler when its reply carries an error status; [`ErrorTrailerLayer`] turns it into
/// the `is-error: true` trailer a Jina gateway looks for.
#[derive(Debug, Clone, Default)]
pub struct ErrorFlag(Arc<AtomicBool>);

impl ErrorFlag {
    fn set(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Jina's services over one [`Core`].
#[derive(Clone)]
pub struct JinaServices {
    core: Arc<Core>,
    stream_concurrency: usize,
}

type ReplyStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn flagged<T>(reply: T, failed: bool) -> Response<T> {
    let mut r = Response::new(reply);
    let flag = ErrorFlag::default();
    if failed {
        flag.set();
    }
    r.extensions_mut().insert(flag);
    r
}

#[tonic::async_trait]
impl call::JinaRpc for JinaServices {
    type CallStream = ReplyStream<DataRequestProto>;

    /// clip_client's call. Unlike Jina's worker, which answers a stream one request at a time,
    /// requests of one stream are processed concurrently (up to `stream_concurrency`) so they
    /// batch together; replies come in completion order unless `__results_in_order__` is set.
    async fn call(
        &self,
        request: Request<Streaming<DataRequestProto>>,
    ) -> Result<Response<Self::CallStream>, Status> {
        let in_order = request
            .metadata()
            .get("__results_in_order__")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"));
        let inbound = request.into_inner();
        let flag = ErrorFlag::default();
        let limit = self.stream_concurrency.max(1);
        let (tx, rx) = mpsc::channel(limit);
        let core = self.core.clone();
        let task_flag = flag.clone();
        // The call's span (when traced): the stream's messages are decoded inside it, and each
        // request of the stream gets a `data_request` span of its own under it.
        let call_span = tracing::Span::current();
        let task_span = call_span.clone();
        let replies = tx.clone();
        // The stream's requests are one caller for the towers' fair batching.
        let source = new_source();
        let task = async move {
            let work = inbound.map(move |item| {
                let core = core.clone();
                let flag = task_flag.clone();
                let replies = replies.clone();
                let span = tracing::info_span!(
                    parent: &call_span,
                    "data_request",
                    endpoint = tracing::field::Empty,
                    request_id = tracing::field::Empty,
                    docs = tracing::field::Empty,
                    embedded = tracing::field::Empty,
                    otel.status_code = tracing::field::Empty,
                );
                async move {
                    // Room for the reply first, the request after. A client that stops reading
                    // replies then stops its stream's requests before they take queue room:
                    // when the reply waited instead, requests polled only through `out` froze
                    // holding (or first in line for) the queue, and every client waited on
                    // them. None: the client is gone.
                    let slot = replies.reserve_owned().await.ok()?;
                    let reply = match item {
                        Err(status) => Err(status),
                        Ok(req) => match core.handle(req, true, source).await {
                            Ok(h) => {
                                if h.failed {
                                    flag.set();
                                }
                                Ok(h.reply)
                            }
                            Err(e) => Err(e.to_grpc()),
                        },
                    };
                    Some((slot, reply))
                }
                .instrument(span)
            });
            type Reply = Result<DataRequestProto, Status>;
            type Done = Option<(mpsc::OwnedPermit<Reply>, Reply)>;
            let mut out: Pin<Box<dyn Stream<Item = Done> + Send>> = if in_order {
                Box::pin(work.buffered(limit))
            } else {
                Box::pin(work.buffer_unordered(limit))
            };
            // Never waits on a reply (each has its room), so requests in flight always progress.
            loop {
                tokio::select! {
                    item = out.next() => {
                        let Some(Some((slot, reply))) = item else { break };
                        let stop = reply.is_err();
                        slot.send(reply);
                        if stop {
                            break;
                        }
                    }
                    // The client went away: dropping `out` withdraws its queued work.
                    _ = tx.closed() => break,
                }
            }
        };
        tokio::spawn(task.instrument(task_span));
        let mut r = Response::new(Box::pin(ReceiverStream::new(rx)) as Self::CallStream);
        r.extensions_mut().insert(flag);
        Ok(r)
    }
}

#[tonic::async_trait]
impl psd::JinaSingleDataRequestRpc for JinaServices {
    /// What a Jina gateway calls for each request. A full queue answers RESOURCE_EXHAUSTED.
    async fn process_single_data(
        &self,
        request: Request<DataRequestProto>,
    ) -> Result<Response<DataRequestProto>, Status> {
        let h = self
            .core
            .handle(request.into_inner(), false, new_source())
            .await
            .map_err(|e| e.to_grpc())?;
        Ok(flagged(h.reply, h.failed))
    }
}

#[tonic::async_trait]
impl pd::JinaDataRequestRpc for JinaServices {
    /// Several parts of one request (a gateway's fan-in): their documents are processed as one
    /// request with the first part's header and parameters, as Jina's worker does.
    async fn process_data(
        &self,
        request: Request<DataRequestListProto>,
    ) -> Result<Response<DataRequestProto>, Status> {
        let mut parts = request.into_inner().requests.into_iter();
        let Some(mut first) = parts.next() else {
            return Err(Status::invalid_argument(
                "process_data got an empty request list",
            ));
        };
        let mut docs = Vec::new();
        let mut pickled = None;
        let mut rest: Vec<DataRequestProto> = parts.collect();
        for part in std::iter::once(&mut first).chain(rest.iter_mut()) {
            match part.data.take().and_then(|d| d.documents) {
                Some(data_request_proto::data_content_proto::Documents::Docs(da)) => {
                    docs.extend(da.docs)
                }
                Some(data_request_proto::data_content_proto::Documents::DocsBytes(b)) => {
                    pickled.get_or_insert(b);
                }
                None => {}
            }
        }
        // A pickled part is refused in-band; the reply then carries that payload back.
        first.data =
            Some(data_request_proto::DataContentProto {
                documents: Some(match pickled {
                    Some(b) => data_request_proto::data_content_proto::Documents::DocsBytes(b),
                    None => data_request_proto::data_content_proto::Documents::Docs(
                        DocumentArrayProto { docs },
                    ),
                }),
            });
        let h = self
            .core
            .handle(first, false, new_source())
            .await
            .map_err(|e| e.to_grpc())?;
        Ok(flagged(h.reply, h.failed))
    }
}

#[tonic::async_trait]
impl sd::JinaSingleDocumentRequestRpc for JinaServices {
    type stream_docStream = ReplyStream<SingleDocumentRequestProto>;

    /// One document in, its processed version out, as one streamed reply.
    async fn stream_doc(
        &self,
        request: Request<SingleDocumentRequestProto>,
    ) -> Result<Response<Self::stream_docStream>, Status> {
        let single = request.into_inner();
        let req = DataRequestProto {
            header: single.header,
            parameters: single.parameters,
            routes: single.routes,
            data: Some(data_request_proto::DataContentProto {
                documents: Some(data_request_proto::data_content_proto::Documents::Docs(
                    DocumentArrayProto {
                        docs: single.document.into_iter().collect(),
                    },
                )),
            }),
        };
        let h = self
            .core
            .handle(req, true, new_source())
            .await
            .map_err(|e| e.to_grpc())?;
        let mut reply = h.reply;
        let document = match reply.data.take().and_then(|d| d.documents) {
            Some(data_request_proto::data_content_proto::Documents::Docs(da)) => {
                da.docs.into_iter().next()
            }
            _ => None,
        };
        let out = SingleDocumentRequestProto {
            header: reply.header,
            parameters: reply.parameters,
            routes: reply.routes,
            document,
        };
        let stream: Self::stream_docStream =
            Box::pin(futures_util::stream::once(async move { Ok(out) }));
        Ok(flagged(stream, h.failed))
    }
}

#[tonic::async_trait]
impl de::JinaDiscoverEndpointsRpc for JinaServices {
    async fn endpoint_discovery(&self, _: Request<()>) -> Result<Response<EndpointsProto>, Status> {
        Ok(Response::new(EndpointsProto {
            endpoints: ENDPOINTS.iter().map(|s| s.to_string()).collect(),
            write_endpoints: Vec::new(),
            schemas: None,
        }))
    }
}

#[tonic::async_trait]
impl dr::JinaGatewayDryRunRpc for JinaServices {
    /// SUCCESS when every tower's model worker is running.
    async fn dry_run(&self, _: Request<()>) -> Result<Response<StatusProto>, Status> {
        let alive = [&self.core.text, &self.core.vision]
            .into_iter()
            .flatten()
            .all(|b| b.is_running());
        Ok(Response::new(if alive {
            status::success()
        } else {
            status::ExecutorError::ShuttingDown.to_status()
        }))
    }
}

/// The `JINA_*` variables Jina's `_status` reports, `(unset)` when unset.
const JINA_ENVS: [&str; 12] = [
    "JINA_LOG_LEVEL",
    "JINA_DEFAULT_HOST",
    "JINA_MP_START_METHOD",
    "JINA_RANDOM_PORT_MIN",
    "JINA_RANDOM_PORT_MAX",
    "JINA_DEPLOYMENT_NAME",
    "JINA_GRPC_SEND_BYTES",
    "JINA_GRPC_RECV_BYTES",
    "JINA_K8S_ACCESS_MODES",
    "JINA_K8S_STORAGE_CLASS_NAME",
    "JINA_K8S_STORAGE_CAPACITY",
    "JINA_OPTOUT_TELEMETRY",
];

#[tonic::async_trait]
impl info::JinaInfoRpc for JinaServices {
    async fn status(&self, _: Request<()>) -> Result<Response<JinaInfoProto>, Status> {
        let mut jina = std::collections::HashMap::new();
        for (k, v) in [
            ("clipft", env!("CARGO_PKG_VERSION")),
            ("jina-proto", "0.1.27"),
            ("docarray", "0.21.1"),
            ("proto-backend", "prost"),
            ("platform", std::env::consts::OS),
            ("platform-machine", std::env::consts::ARCH),
        ] {
            jina.insert(k.to_string(), v.to_string());
        }
        jina.insert("executor".into(), self.core.name.clone());
        let mut envs: std::collections::HashMap<String, String> = JINA_ENVS
            .iter()
            .map(|k| {
                (
                    k.to_string(),
                    std::env::var(k).unwrap_or_else(|_| "(unset)".into()),
                )
            })
            .collect();
        envs.extend(std::env::vars().filter(|(k, _)| k.starts_with("JINA_")));
        Ok(Response::new(JinaInfoProto { jina, envs }))
    }
}

/// Serves the executor on `listener` until `shutdown` resolves; then health turns NOT_SERVING,
/// new work is refused, and in-flight requests get `shutdown_timeout` to finish.
pub async fn serve(
    core: Arc<Core>,
    config: ServerConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let (health, health_service) = tonic_health::server::health_reporter();
    for name in JINA_SERVICES
        .iter()
        .chain(["", "grpc.reflection.v1alpha.ServerReflection"].iter())
    {
        health
            .set_service_status(*name, tonic_health::ServingStatus::Serving)
            .await;
    }
    let reflection = || {
        let mut b = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::protocol::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
        for name in JINA_SERVICES.iter().chain(
            [
                "grpc.health.v1.Health",
                "grpc.reflection.v1alpha.ServerReflection",
                "grpc.reflection.v1.ServerReflection",
            ]
            .iter(),
        ) {
            b = b.with_service_name(*name);
        }
        b
    };
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| tracing::error!("reflection: {e}"))
        .ok();
    let reflection_v1 = reflection()
        .build_v1()
        .map_err(|e| tracing::error!("reflection: {e}"))
        .ok();

    let svc = JinaServices {
        core: core.clone(),
        stream_concurrency: config.stream_concurrency,
    };
    let limit = config.max_message_bytes;
    crate::protocol::budget::set_limit(config.max_decoded_bytes);
    macro_rules! limited {
        ($server:expr) => {
            $server
                .max_decoding_message_size(limit)
                .max_encoding_message_size(limit)
                .accept_compressed(CompressionEncoding::Gzip)
                .accept_compressed(CompressionEncoding::Deflate)
        };
    }
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = config.tls.clone() {
        builder = builder.tls_config(tls)?;
    }
    let router = builder
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        // Outermost, so a call's span also sees the `is-error` trailer added inside it.
        .layer(crate::telemetry::grpc::TraceLayer)
        .layer(ErrorTrailerLayer)
        .add_service(health_service)
        .add_service(limited!(call::JinaRpcServer::new(svc.clone())))
        .add_service(limited!(psd::JinaSingleDataRequestRpcServer::new(
            svc.clone()
        )))
        .add_service(limited!(pd::JinaDataRequestRpcServer::new(svc.clone())))
        .add_service(limited!(sd::JinaSingleDocumentRequestRpcServer::new(
            svc.clone()
        )))
        .add_service(de::JinaDiscoverEndpointsRpcServer::new(svc.clone()))
        .add_service(dr::JinaGatewayDryRunRpcServer::new(svc.clone()))
        .add_service(info::JinaInfoRpcServer::new(svc))
        .add_optional_service(reflection_v1alpha)
        .add_optional_service(reflection_v1);

    // A tower whose model thread has died cannot answer: health says so, so probes and load
    // balancers move traffic away instead of sending it to a replica that only fails.
    let _watchdog = {
        let health = health.clone();
        let core = core.clone();
        AbortOnDrop(tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let dead = [&core.text, &core.vision]
                    .into_iter()
                    .flatten()
                    .any(|b| !b.is_running());
                if dead {
                    tracing::error!("a model thread has stopped: health NOT_SERVING");
                    for name in JINA_SERVICES.iter().chain([""].iter()) {
                        health
                            .set_service_status(*name, tonic_health::ServingStatus::NotServing)
                            .await;
                    }
                    break;
                }
            }
        }))
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (closing_tx, mut closing_rx) = tokio::sync::watch::channel(false);
    let timeout = config.shutdown_timeout;
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("shutting down: health NOT_SERVING, draining");
        for name in JINA_SERVICES
            .iter()
            .chain(["", "grpc.reflection.v1alpha.ServerReflection"].iter())
        {
            health
                .set_service_status(*name, tonic_health::ServingStatus::NotServing)
                .await;
        }
        let _ = closing_tx.send(true);
        let _ = stop_tx.send(());
    });
    let incoming = TcpListenerStream::new(listener);
    let serving = router.serve_with_incoming_shutdown(incoming, async {
        let _ = stop_rx.await;
    });
    tokio::pin!(serving);
    // Once shutdown starts, give in-flight requests `timeout`, then stop regardless (clients
    // that keep idle connections open must not hold the process).
    let mut deadline: Option<Pin<Box<tokio::time::Sleep>>> = None;
    loop {
        tokio::select! {
            r = &mut serving => return r,
            _ = async { match &mut deadline { Some(d) => d.await, None => std::future::pending().await } } => {
                tracing::warn!("shutdown timeout: {timeout:?} passed with requests in flight");
                return Ok(());
            }
            _ = closing_rx.changed(), if deadline.is_none() => {
                deadline = Some(Box::pin(tokio::time::sleep(timeout)));
            }
        }
    }
}

/// Stops a background task when the server it watches returns.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Adds the `is-error: true` trailer to replies whose handler set an [`ErrorFlag`], as Jina's
/// worker does with `context.set_trailing_metadata`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ErrorTrailerLayer;

impl<S> tower::Layer<S> for ErrorTrailerLayer {
    type Service = ErrorTrailer<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ErrorTrailer { inner }
    }
}

/// The service [`ErrorTrailerLayer`] makes.
#[derive(Debug, Clone)]
pub struct ErrorTrailer<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for ErrorTrailer<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            let Some(flag) = resp.extensions().get::<ErrorFlag>().cloned() else {
                return Ok(resp);
            };
            let (parts, body) = resp.into_parts();
            Ok(http::Response::from_parts(
                parts,
                tonic::body::Body::new(FlaggedBody { inner: body, flag }),
            ))
        })
    }
}

pin_project_lite::pin_project! {
    /// A reply body that appends `is-error: true` to the trailers when its flag is set.
    struct FlaggedBody {
        #[pin]
        inner: tonic::body::Body,
        flag: ErrorFlag,
    }
}

impl http_body::Body for FlaggedBody {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame)))
                if frame.is_trailers() && this.flag.0.load(Ordering::Relaxed) =>
            {
                let mut trailers = frame.into_trailers().unwrap_or_default();
                trailers.insert("is-error", http::HeaderValue::from_static("true"));
                Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers))))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Whether a status code is the error one (for clients and tests).
pub fn is_error(s: &StatusProto) -> bool {
    s.code == status_proto::StatusCode::Error as i32
}
