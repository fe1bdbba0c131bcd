//! Observability: Prometheus metrics on the monitoring port ([`metrics`]), with Jina's metric
//! names where Jina has one, so existing dashboards keep working; and OpenTelemetry traces
//! exported over OTLP/gRPC when a service runs with `--tracing` ([`tracing`]: the set-up, shared
//! by every service; [`grpc`]: a span per gRPC call that continues the caller's W3C trace, and
//! spans around protobuf decoding and encoding). The executor adds spans for admission,
//! preprocessing, queue wait and model batches (`executor::endpoints`, `executor::batcher`).

pub mod grpc;
pub mod metrics;
pub mod tracing;
