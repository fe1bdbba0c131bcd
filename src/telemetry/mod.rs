//! Observability: Prometheus metrics on the monitoring port ([`metrics`]), with Jina's metric
//! names where Jina has one, so existing dashboards keep working.

pub mod metrics;
