//! OpenTelemetry traces over OTLP/gRPC, for any clipft service (the executor now, the trainer
//! later): [`init`] with a service name and an optional collector address returns a
//! [`TracingGuard`] that flushes and stops the export when dropped.
//!
//! How it fits the logging: the subscriber that `cli::init_logging` installs at start-up always
//! contains [`layer`], an empty slot. While it is empty its filter rejects every callsite, so a
//! process without `--tracing` creates no spans at all (each `info_span!` costs one cached
//! interest check). [`init`] fills the slot once with a `tracing-opentelemetry` layer and
//! re-evaluates the callsites; from then on clipft's own spans (target `clipft::*`, level INFO
//! and above) become OpenTelemetry spans, and the human/JSON logs keep their own `CLIPFT_LOG`
//! filter, unaffected. The slot is filled at most once and never emptied, which is what lets
//! `tracing::Span::set_parent` reach the OpenTelemetry layer through it (a `reload` layer cannot
//! hand out references into itself).
//!
//! Configuration: the standard `OTEL_*` variables as the Rust SDK reads them
//! (`OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, `..._TIMEOUT`,
//! `..._HEADERS`, `..._COMPRESSION`, `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
//! `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG`, `OTEL_BSP_*`); an explicit host or port
//! (Jina's `--traces-exporter-host/--traces-exporter-port`) wins over the endpoint variables.
//! The service name is `OTEL_SERVICE_NAME` (or `service.name` in `OTEL_RESOURCE_ATTRIBUTES`)
//! where set, the caller's name otherwise. Incoming W3C `traceparent`/`tracestate` are read by
//! [`extract`] with the global propagator that [`init`] installs.
//!
//! Export: the SDK's batch span processor runs on its own thread and drives the tonic exporter
//! with a plain `block_on`; the exporter's channel and connection tasks live on the tokio
//! runtime that was current when [`init`] ran, so that runtime must outlive the guard.

use std::sync::OnceLock;
use std::time::Duration;

use opentelemetry::propagation::Extractor;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tracing::level_filters::LevelFilter;
use tracing::subscriber::Interest;
use tracing::{Level, Metadata};
use tracing_opentelemetry::OpenTelemetryLayer;
use tracing_subscriber::layer::{Context, Filter, Layer};
use tracing_subscriber::registry::Registry;

/// The OTLP/gRPC port collectors listen on (and the SDK's default endpoint's).
pub const DEFAULT_OTLP_GRPC_PORT: u16 = 4317;

/// How long the guard waits for the last spans to reach the collector.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// What a service says about itself when it turns tracing on.
#[derive(Debug, Clone, Default)]
pub struct TracingOptions {
    /// `service.name`, unless the environment names the service (see the module doc).
    pub service_name: String,
    /// The collector's host (OTLP over gRPC, plain text). With neither host nor port the
    /// endpoint comes from `OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT`, else `http://localhost:4317`.
    pub exporter_host: Option<String>,
    /// The collector's port; 4317 when only the host is given.
    pub exporter_port: Option<u16>,
}

#[derive(Debug, thiserror::Error)]
pub enum TracingError {
    #[error("tracing is already set up in this process")]
    AlreadyInitialized,
    #[error("tracing must be set up inside a tokio runtime (the OTLP gRPC exporter runs on it)")]
    NoRuntime,
    #[error("OTLP trace exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
}

/// The OpenTelemetry layer, once [`init`] has built it. Never replaced, so references into it
/// (handed out by `downcast_raw`) stay valid for the life of the process.
static OTEL: OnceLock<OpenTelemetryLayer<Registry, SdkTracer>> = OnceLock::new();

/// Whether traces are being exported: request paths skip the work of tracing when not.
pub fn enabled() -> bool {
    OTEL.get().is_some()
}

/// Keeps the trace pipeline alive; dropping it exports what is buffered and stops the export.
/// Drop it before the tokio runtime that [`init`] ran in, and outside that runtime's worker
/// threads where possible (the flush waits for the exporter, which runs on the runtime).
#[must_use = "dropping the guard stops trace export"]
pub struct TracingGuard {
    provider: SdkTracerProvider,
    endpoint: String,
}

impl TracingGuard {
    /// Where spans go (for the start-up line).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    fn stop(&self) {
        let stop = || self.provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT);
        // On a worker of a multi-thread runtime, let the other workers drive the exporter.
        let result = match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(stop)
            }
            _ => stop(),
        };
        if let Err(e) = result {
            tracing::warn!("trace export shutdown: {e}");
        }
    }
}

impl Drop for TracingGuard {
    fn drop(&mut self) {
        self.stop();
    }
}

impl std::fmt::Debug for TracingGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TracingGuard")
    }
}

/// The collector endpoint the options name, if they name one.
pub fn endpoint(host: Option<&str>, port: Option<u16>) -> Option<String> {
    if host.is_none() && port.is_none() {
        return None;
    }
    let host = host.filter(|h| !h.is_empty()).unwrap_or("localhost");
    let port = port.unwrap_or(DEFAULT_OTLP_GRPC_PORT);
    // An IPv6 literal needs brackets in a URI.
    Some(if host.contains(':') && !host.starts_with('[') {
        format!("http://[{host}]:{port}")
    } else {
        format!("http://{host}:{port}")
    })
}

/// The service name to set: `None` where `OTEL_SERVICE_NAME` or `service.name` in
/// `OTEL_RESOURCE_ATTRIBUTES` already names the service (the SDK applies those itself).
pub fn service_name_override(
    default: &str,
    otel_service_name: Option<&str>,
    otel_resource_attributes: Option<&str>,
) -> Option<String> {
    let named_by_env = otel_service_name.is_some_and(|s| !s.trim().is_empty())
        || otel_resource_attributes.is_some_and(|attrs| {
            attrs
                .split(',')
                .any(|kv| kv.split('=').next().map(str::trim) == Some("service.name"))
        });
    if named_by_env {
        None
    } else if default.is_empty() {
        Some("clipft".into())
    } else {
        Some(default.to_string())
    }
}

/// Starts exporting clipft's spans. Call it once, inside the tokio runtime that will outlive
/// the returned guard.
pub fn init(opts: TracingOptions) -> Result<TracingGuard, TracingError> {
    if enabled() {
        return Err(TracingError::AlreadyInitialized);
    }
    tokio::runtime::Handle::try_current().map_err(|_| TracingError::NoRuntime)?;
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let mut exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic();
    let url = match endpoint(opts.exporter_host.as_deref(), opts.exporter_port) {
        Some(url) => {
            exporter = exporter.with_endpoint(url.clone());
            url
        }
        // The exporter's own order.
        None => env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"))
            .unwrap_or_else(|| format!("http://localhost:{DEFAULT_OTLP_GRPC_PORT}")),
    };
    let exporter = exporter.build()?;
    let mut resource = Resource::builder();
    if let Some(name) = service_name_override(
        &opts.service_name,
        env("OTEL_SERVICE_NAME").as_deref(),
        env("OTEL_RESOURCE_ATTRIBUTES").as_deref(),
    ) {
        resource = resource.with_service_name(name);
    }
    // The sampler and the batch settings come from the environment (SDK defaults:
    // parent-based always-on, so a caller's "not sampled" is respected).
    let provider = SdkTracerProvider::builder()
        .with_resource(resource.build())
        .with_batch_exporter(exporter)
        .build();
    let tracer = provider.tracer("clipft");
    let layer = OpenTelemetryLayer::new(tracer).with_tracked_inactivity(false);
    OTEL.set(layer)
        .map_err(|_| TracingError::AlreadyInitialized)?;
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    opentelemetry::global::set_tracer_provider(provider.clone());
    // Callsites seen so far were told "never" by the empty slot: ask them again.
    tracing::callsite::rebuild_interest_cache();
    Ok(TracingGuard {
        provider,
        endpoint: url,
    })
}

/// The parent context a caller sent in `traceparent` / `tracestate` (W3C), read with the global
/// propagator that [`init`] installs (empty when tracing is off, or the headers are absent or
/// malformed).
pub fn extract(headers: &http::HeaderMap) -> opentelemetry::Context {
    opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderCarrier(headers)))
}

/// Request headers (gRPC metadata) as a propagator reads them.
struct HeaderCarrier<'a>(&'a http::HeaderMap);

impl Extractor for HeaderCarrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// The layer to put first on the `Registry` of the process's subscriber; inert until [`init`].
pub fn layer() -> impl Layer<Registry> + Send + Sync {
    Slot.with_filter(SlotFilter)
}

/// Whether a callsite is one of ours and detailed enough to export.
fn exported(meta: &Metadata<'_>) -> bool {
    let target = meta.target();
    enabled()
        && *meta.level() <= Level::INFO
        && (target == "clipft" || target.starts_with("clipft::"))
}

/// The slot's filter: nothing while empty, clipft's INFO-and-above spans and events after.
struct SlotFilter;

impl<S> Filter<S> for SlotFilter {
    fn enabled(&self, meta: &Metadata<'_>, _: &Context<'_, S>) -> bool {
        exported(meta)
    }

    fn callsite_enabled(&self, meta: &'static Metadata<'static>) -> Interest {
        if exported(meta) {
            Interest::always()
        } else {
            Interest::never()
        }
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(if enabled() {
            LevelFilter::INFO
        } else {
            LevelFilter::OFF
        })
    }
}

/// Forwards everything to the OpenTelemetry layer once there is one.
struct Slot;

impl Layer<Registry> for Slot {
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: Context<'_, Registry>,
    ) {
        if let Some(l) = OTEL.get() {
            l.on_new_span(attrs, id, ctx)
        }
    }

    fn on_record(
        &self,
        span: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        ctx: Context<'_, Registry>,
    ) {
        if let Some(l) = OTEL.get() {
            l.on_record(span, values, ctx)
        }
    }

    fn on_follows_from(
        &self,
        span: &tracing::span::Id,
        follows: &tracing::span::Id,
        ctx: Context<'_, Registry>,
    ) {
        if let Some(l) = OTEL.get() {
            l.on_follows_from(span, follows, ctx)
        }
    }

    fn on_event(&self, event: &tracing::Event<'_>, ctx: Context<'_, Registry>) {
        if let Some(l) = OTEL.get() {
            l.on_event(event, ctx)
        }
    }

    fn on_enter(&self, id: &tracing::span::Id, ctx: Context<'_, Registry>) {
        if let Some(l) = OTEL.get() {
            l.on_enter(id, ctx)
        }
    }

    fn on_exit(&self, id: &tracing::span::Id, ctx: Context<'_, Registry>) {
        if let Some(l) = OTEL.get() {
            l.on_exit(id, ctx)
        }
    }

    fn on_close(&self, id: tracing::span::Id, ctx: Context<'_, Registry>) {
        if let Some(l) = OTEL.get() {
            l.on_close(id, ctx)
        }
    }

    fn on_id_change(
        &self,
        old: &tracing::span::Id,
        new: &tracing::span::Id,
        ctx: Context<'_, Registry>,
    ) {
        if let Some(l) = OTEL.get() {
            l.on_id_change(old, new, ctx)
        }
    }

    /// Lets `Span::set_parent` and `Span::context` find the OpenTelemetry layer.
    ///
    /// # Safety
    /// The pointers point into `OTEL`, a static that is set once and never moved or dropped.
    unsafe fn downcast_raw(&self, id: std::any::TypeId) -> Option<*const ()> {
        if id == std::any::TypeId::of::<Self>() {
            return Some(self as *const Self as *const ());
        }
        // SAFETY: forwarded to a layer that lives for the rest of the process (see above).
        OTEL.get().and_then(|l| unsafe { l.downcast_raw(id) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_make_the_endpoint() {
        assert_eq!(endpoint(None, None), None);
        assert_eq!(
            endpoint(Some("otel"), None).as_deref(),
            Some("http://otel:4317")
        );
        assert_eq!(
            endpoint(None, Some(4000)).as_deref(),
            Some("http://localhost:4000")
        );
        assert_eq!(
            endpoint(Some("::1"), Some(1)).as_deref(),
            Some("http://[::1]:1")
        );
    }

    #[test]
    fn the_environment_names_the_service_first() {
        assert_eq!(
            service_name_override("clip_t", None, None).as_deref(),
            Some("clip_t")
        );
        assert_eq!(service_name_override("clip_t", Some("svc"), None), None);
        assert_eq!(
            service_name_override("clip_t", Some(""), Some("a=b")).as_deref(),
            Some("clip_t")
        );
        assert_eq!(
            service_name_override("clip_t", None, Some("a=b, service.name=x")),
            None
        );
    }

    #[test]
    fn traceparent_is_read() {
        use opentelemetry::propagation::TextMapPropagator;
        use opentelemetry::trace::TraceContextExt;
        let mut h = http::HeaderMap::new();
        h.insert(
            "traceparent",
            http::HeaderValue::from_static(
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            ),
        );
        let cx = TraceContextPropagator::new().extract(&HeaderCarrier(&h));
        let sc = cx.span().span_context().clone();
        assert!(sc.is_remote() && sc.is_sampled());
        assert_eq!(
            sc.trace_id().to_string(),
            "0af7651916cd43dd8448eb211c80319c"
        );
        assert_eq!(sc.span_id().to_string(), "b7ad6b7169203331");
    }
}
