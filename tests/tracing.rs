//! OpenTelemetry traces over real gRPC: the `clipft executor` binary with `--tracing` exports to
//! an OTLP collector run here (opentelemetry-proto's TraceService on loopback). Requests carry a
//! W3C `traceparent`; the spans must continue that trace, under the caller's span, with the
//! request's phases (decode, admission, preprocess, queue, model, encode) as children carrying
//! document counts and batch sizes. The batch export delay is set to an hour, so every span
//! here reaches the collector through the flush on SIGTERM.

use std::collections::HashMap;

use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clipft::protocol::docarray::{document_proto::Content, DocumentArrayProto, DocumentProto};
use clipft::protocol::jina::{
    data_request_proto::{data_content_proto::Documents, DataContentProto},
    jina_rpc_client::JinaRpcClient,
    jina_single_data_request_rpc_client::JinaSingleDataRequestRpcClient,
    DataRequestProto, HeaderProto,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value::Value as AnyValue, KeyValue};
use opentelemetry_proto::tonic::trace::v1::{span::SpanKind, Span};
use tonic::transport::Channel;

mod common;
use common::{image, tiny};

type R<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// What the collector received: (service.name, span) pairs.
type Received = Arc<Mutex<Vec<(String, Span)>>>;

struct Collector(Received);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .as_ref()
                .and_then(|r| string_of(&r.attributes, "service.name"))
                .unwrap_or_default()
                .to_string();
            for ss in rs.scope_spans {
                got.extend(ss.spans.into_iter().map(|s| (service.clone(), s)));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// Starts the collector on a free loopback port.
async fn collector() -> R<(Received, u16)> {
    let received = Received::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let svc = TraceServiceServer::new(Collector(received.clone()));
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await;
    });
    Ok((received, port))
}

fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a AnyValue> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

fn string_of<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a str> {
    match attr(attrs, key) {
        Some(AnyValue::StringValue(s)) => Some(s),
        _ => None,
    }
}

fn int_of(attrs: &[KeyValue], key: &str) -> Option<i64> {
    match attr(attrs, key) {
        Some(AnyValue::IntValue(i)) => Some(*i),
        _ => None,
    }
}

fn text(s: &str) -> DocumentProto {
    DocumentProto {
        id: s.into(),
        content: Some(Content::Text(s.into())),
        ..Default::default()
    }
}

fn encode_request(docs: Vec<DocumentProto>) -> DataRequestProto {
    DataRequestProto {
        header: Some(HeaderProto {
            request_id: "traced".into(),
            exec_endpoint: Some("/encode".into()),
            ..Default::default()
        }),
        parameters: None,
        routes: Vec::new(),
        data: Some(DataContentProto {
            documents: Some(Documents::Docs(DocumentArrayProto { docs })),
        }),
    }
}

/// Adds W3C trace context to a request's metadata.
fn traced<T>(msg: T, trace_id: &str, parent: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    let md = r.metadata_mut();
    if let Ok(v) = format!("00-{trace_id}-{parent}-01").parse() {
        md.insert("traceparent", v);
    }
    md.insert(
        "tracestate",
        tonic::metadata::MetadataValue::from_static("clipft=test"),
    );
    r
}

/// The executor binary with tracing on; killed on drop if still running.
struct Executor {
    child: Child,
    port: u16,
}

impl Executor {
    fn start(collector_port: u16) -> R<Self> {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_clipft"));
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("OTEL_") {
                cmd.env_remove(&k);
            }
        }
        cmd.args(["executor", "--model", &tiny(), "--host", "127.0.0.1"])
            .args([
                "--port",
                "0",
                "--port-monitoring",
                "0",
                "--name",
                "traced_exec",
            ])
            .args(["--tracing", "--traces-exporter-host", "127.0.0.1"])
            .args(["--traces-exporter-port", &collector_port.to_string()])
            // Nothing leaves before shutdown: what arrives came with the flush on SIGTERM.
            .env("OTEL_BSP_SCHEDULE_DELAY", "3600000")
            .env("CLIPFT_LOG", "warn");
        let s = common::spawn_serving(cmd, Some("executor"))?;
        Ok(Self {
            child: s.child,
            port: s.port,
        })
    }

    /// SIGTERM, then the exit status.
    fn terminate(&mut self) -> R<std::process::ExitStatus> {
        let pid = i32::try_from(self.child.id())?;
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        Ok(self.child.wait()?)
    }
}

impl Drop for Executor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const TRACE_UNARY: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_UNARY: &str = "00f067aa0ba902b7";
const TRACE_STREAM: &str = "0af7651916cd43dd8448eb211c80319c";
const PARENT_STREAM: &str = "b7ad6b7169203331";

/// The spans of one trace.
struct Trace<'a> {
    spans: Vec<&'a Span>,
}

impl<'a> Trace<'a> {
    fn of(all: &'a [(String, Span)], trace_id: &str) -> Self {
        Self {
            spans: all
                .iter()
                .map(|(_, s)| s)
                .filter(|s| hex(&s.trace_id) == trace_id)
                .collect(),
        }
    }

    fn named(&self, name: &str) -> Vec<&'a Span> {
        self.spans
            .iter()
            .copied()
            .filter(|s| s.name == name)
            .collect()
    }

    fn children(&self, parent: &Span, name: &str) -> Vec<&'a Span> {
        self.named(name)
            .into_iter()
            .filter(|s| s.parent_span_id == parent.span_id)
            .collect()
    }

    /// The child called `name` of `parent` for `tower`.
    fn tower_child(&self, parent: &Span, name: &str, tower: &str) -> R<&'a Span> {
        self.children(parent, name)
            .into_iter()
            .find(|s| string_of(&s.attributes, "tower") == Some(tower))
            .ok_or_else(|| format!("no {name} span for the {tower} tower").into())
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Waits (generously) until the collector holds spans of every trace in `ids`.
async fn wait_for(received: &Received, ids: &[&str]) -> Vec<(String, Span)> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = received.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let complete = ids.iter().all(|id| {
            got.iter()
                .any(|(_, s)| hex(&s.trace_id) == *id && s.kind == SpanKind::Server as i32)
        });
        if complete || Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_continue_the_callers_trace_and_reach_the_collector() -> R {
    let (received, collector_port) = collector().await?;
    let mut exec = Executor::start(collector_port)?;
    let channel = Channel::from_shared(format!("http://127.0.0.1:{}", exec.port))?
        .connect()
        .await?;

    // A gateway's call: two texts and an image in one unary request.
    let png = std::fs::read(image("rgb_300x200.png"))?;
    let image_doc = DocumentProto {
        id: "img".into(),
        content: Some(Content::Blob(png.into())),
        ..Default::default()
    };
    let reply = JinaSingleDataRequestRpcClient::new(channel.clone())
        .process_single_data(traced(
            encode_request(vec![text("a red dress"), text("blue jeans"), image_doc]),
            TRACE_UNARY,
            PARENT_UNARY,
        ))
        .await?
        .into_inner();
    let status = reply.header.as_ref().and_then(|h| h.status.as_ref());
    assert!(status.is_none_or(|s| s.code == 0), "{status:?}");

    // clip_client's call: a stream of two requests.
    let requests = vec![
        encode_request(vec![text("a cat"), text("a dog")]),
        encode_request(vec![text("a striped shirt")]),
    ];
    let mut replies = JinaRpcClient::new(channel.clone())
        .call(traced(
            tokio_stream::iter(requests),
            TRACE_STREAM,
            PARENT_STREAM,
        ))
        .await?
        .into_inner();
    let mut n = 0;
    while let Some(r) = replies.message().await? {
        assert!(r.header.and_then(|h| h.status).is_none_or(|s| s.code == 0));
        n += 1;
    }
    assert_eq!(n, 2);

    // A call without trace context starts a trace of its own; health checks are not traced.
    JinaSingleDataRequestRpcClient::new(channel.clone())
        .process_single_data(encode_request(vec![text("untraced caller")]))
        .await?;
    tonic_health::pb::health_client::HealthClient::new(channel.clone())
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await?;
    drop(channel);

    let exit = exec.terminate()?;
    assert!(exit.success(), "executor exit: {exit:?}");
    let all = wait_for(&received, &[TRACE_UNARY, TRACE_STREAM]).await;
    assert!(!all.is_empty(), "no spans reached the collector");
    assert!(
        all.iter().all(|(service, _)| service == "traced_exec"),
        "service.name: {:?}",
        all.iter()
            .map(|(s, _)| s)
            .collect::<std::collections::BTreeSet<_>>()
    );
    let summary: Vec<String> = all
        .iter()
        .map(|(_, s)| {
            format!(
                "{} {} <- {}",
                hex(&s.trace_id),
                s.name,
                hex(&s.parent_span_id)
            )
        })
        .collect();
    let context = summary.join("\n");

    // The unary call.
    let t = Trace::of(&all, TRACE_UNARY);
    let requests = t.named("jina.JinaSingleDataRequestRPC/process_single_data");
    assert_eq!(requests.len(), 1, "{context}");
    let req = requests[0];
    assert_eq!(hex(&req.parent_span_id), PARENT_UNARY, "{context}");
    assert_eq!(req.kind, SpanKind::Server as i32);
    assert_eq!(req.trace_state, "clipft=test");
    let a = &req.attributes;
    assert_eq!(string_of(a, "rpc.system"), Some("grpc"));
    assert_eq!(
        string_of(a, "rpc.service"),
        Some("jina.JinaSingleDataRequestRPC")
    );
    assert_eq!(string_of(a, "rpc.method"), Some("process_single_data"));
    assert_eq!(string_of(a, "endpoint"), Some("/encode"));
    assert_eq!(string_of(a, "request_id"), Some("traced"));
    assert_eq!(int_of(a, "docs"), Some(3));
    assert_eq!(int_of(a, "embedded"), Some(3));
    assert_eq!(int_of(a, "rpc.grpc.status_code"), Some(0));
    let decode = t.children(req, "decode");
    assert_eq!(decode.len(), 1, "{context}");
    assert_eq!(
        string_of(&decode[0].attributes, "message"),
        Some("DataRequestProto")
    );
    assert!(int_of(&decode[0].attributes, "bytes").is_some_and(|b| b > 1000));
    let encode = t.children(req, "encode");
    assert_eq!(encode.len(), 1, "{context}");
    assert!(int_of(&encode[0].attributes, "bytes").is_some_and(|b| b > 0));
    for (tower, docs) in [("text", 2), ("vision", 1)] {
        for phase in ["admission", "preprocess", "queue"] {
            let s = t.tower_child(req, phase, tower)?;
            assert_eq!(int_of(&s.attributes, "docs"), Some(docs), "{phase} {tower}");
        }
        let model = t.tower_child(req, "model", tower)?;
        assert_eq!(
            int_of(&model.attributes, "docs"),
            Some(docs),
            "model {tower}"
        );
        assert_eq!(
            int_of(&model.attributes, "batch_size"),
            Some(docs),
            "model {tower}"
        );
        assert_eq!(
            int_of(&model.attributes, "requests"),
            Some(1),
            "model {tower}"
        );
    }
    assert!(t.spans.iter().all(|s| s.trace_state == "clipft=test"));

    // The stream: one span for the call, one per request under it, the phases under those.
    let t = Trace::of(&all, TRACE_STREAM);
    let calls = t.named("jina.JinaRPC/Call");
    assert_eq!(calls.len(), 1, "{context}");
    let call = calls[0];
    assert_eq!(hex(&call.parent_span_id), PARENT_STREAM, "{context}");
    assert_eq!(string_of(&call.attributes, "rpc.method"), Some("Call"));
    assert_eq!(t.children(call, "decode").len(), 2, "{context}");
    assert_eq!(t.children(call, "encode").len(), 2, "{context}");
    let mut per_request: HashMap<i64, &Span> = HashMap::new();
    for dr in t.children(call, "data_request") {
        assert_eq!(string_of(&dr.attributes, "endpoint"), Some("/encode"));
        let docs = int_of(&dr.attributes, "docs").ok_or("data_request without docs")?;
        assert_eq!(int_of(&dr.attributes, "embedded"), Some(docs));
        per_request.insert(docs, dr);
    }
    assert_eq!(per_request.len(), 2, "{context}");
    for (docs, dr) in per_request {
        for phase in ["admission", "preprocess", "queue", "model"] {
            let s = t.tower_child(dr, phase, "text")?;
            assert_eq!(int_of(&s.attributes, "docs"), Some(docs), "{phase}");
        }
        let model = t.tower_child(dr, "model", "text")?;
        // The two requests may or may not have shared a batch.
        let batch = int_of(&model.attributes, "batch_size").ok_or("no batch_size")?;
        assert!(
            batch == docs || batch == 3,
            "batch_size {batch} for {docs} docs"
        );
    }

    // The untraced caller: a root span in a trace of its own. No health-check spans.
    let roots: Vec<&Span> = all
        .iter()
        .map(|(_, s)| s)
        .filter(|s| s.kind == SpanKind::Server as i32 && s.parent_span_id.is_empty())
        .collect();
    assert_eq!(roots.len(), 1, "{context}");
    let own = hex(&roots[0].trace_id);
    assert!(own != TRACE_UNARY && own != TRACE_STREAM);
    assert!(
        all.iter()
            .all(|(_, s)| string_of(&s.attributes, "rpc.service") != Some("grpc.health.v1.Health")),
        "{context}"
    );
    Ok(())
}

const TRACE_TRAINER: &str = "5b8aa5a2d2c872e8321cf37308d69df2";
const PARENT_TRAINER: &str = "051581bf3cb55c13";

/// The trainer with `--tracing`: its calls continue the caller's trace, and every run is a
/// `run` trace with one `epoch` span per epoch, flushed on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trainer_traces_calls_runs_and_epochs() -> R {
    use clipft::protocol::trainer as pb;
    let (received, collector_port) = collector().await?;
    let data = std::env::temp_dir().join(format!("clipft-traced-trainer-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_clipft"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("OTEL_") {
            cmd.env_remove(&k);
        }
    }
    cmd.args(["trainer", "--host", "127.0.0.1", "--port", "0"])
        .args(["--port-monitoring", "0", "--data-dir"])
        .arg(&data)
        .args(["--tracing", "--traces-exporter-host", "127.0.0.1"])
        .args(["--traces-exporter-port", &collector_port.to_string()])
        .env("OTEL_BSP_SCHEDULE_DELAY", "3600000")
        .env("CLIPFT_LOG", "warn");
    let spawned = common::spawn_serving(cmd, Some("trainer"))?;
    let (mut child, port) = (spawned.child, spawned.port);
    let mut c = clipft::trainer::client::connect(&format!("grpc://127.0.0.1:{port}"), None, None)
        .await
        .map_err(|e| e.to_string())?;
    let demo = common::root().join("data/demo/train.csv");
    clipft::trainer::client::push_dataset(&mut c, "train", &demo, false)
        .await
        .map_err(|e| e.to_string())?;
    let config = serde_json::json!({
        "model": tiny(), "train_data": "train", "epochs": 2, "batch_size": 32,
        "max_steps": 20, "device": "cpu",
    });
    c.create_run(traced(
        pb::CreateRunRequest {
            name: "traced".into(),
            config_json: config.to_string(),
            ..Default::default()
        },
        TRACE_TRAINER,
        PARENT_TRAINER,
    ))
    .await?;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let r = c
            .get_run(pb::GetRunRequest {
                name: "traced".into(),
                ..Default::default()
            })
            .await?
            .into_inner();
        if r.state == pb::RunState::Finished as i32 {
            break;
        }
        assert!(
            r.state != pb::RunState::Failed as i32 && Instant::now() < deadline,
            "{r:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pid = i32::try_from(child.id())?;
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    assert!(child.wait()?.success());
    let _ = std::fs::remove_dir_all(&data);

    let all = wait_for(&received, &[TRACE_TRAINER]).await;
    assert!(
        all.iter().all(|(svc, _)| svc == "clipft-trainer"),
        "service.name"
    );
    let call = Trace::of(&all, TRACE_TRAINER);
    let create = call.named("clipft.trainer.v1.Trainer/CreateRun");
    assert_eq!(create.len(), 1, "{:?}", call.spans);
    assert_eq!(hex(&create[0].parent_span_id), PARENT_TRAINER);
    let run = all
        .iter()
        .map(|(_, s)| s)
        .find(|s| s.name == "run" && string_of(&s.attributes, "run") == Some("traced"))
        .ok_or("no run span")?;
    let epochs: Vec<&Span> = all
        .iter()
        .map(|(_, s)| s)
        .filter(|s| s.name == "epoch" && s.parent_span_id == run.span_id)
        .collect();
    let mut numbers: Vec<i64> = epochs
        .iter()
        .filter_map(|s| int_of(&s.attributes, "epoch"))
        .collect();
    numbers.sort_unstable();
    assert_eq!(numbers, [1, 2], "{epochs:?}");
    Ok(())
}
