//! Prometheus `/metrics`. Names follow Jina's runtime (`jina_receiving_request_seconds`,
//! `jina_successful_requests_total`, `jina_failed_requests_total`, `jina_document_processed_total`,
//! `jina_received_request_bytes`, `jina_sent_response_bytes`, `jina_process_request_seconds`) and
//! clip_server's executor (`jina_preprocess_texts_seconds`, `jina_encode_images_seconds`, ...);
//! clipft's own queue and batch metrics are `clipft_*`. Summaries are rendered with quantiles,
//! `_sum` and `_count`, as `prometheus_client` renders Jina's. Until [`install`] is called every
//! recording is a no-op, so the library and tests pay nothing.

use std::future::Future;
use std::net::SocketAddr;

use metrics_exporter_prometheus::PrometheusBuilder;

/// Installs the global recorder and returns the HTTP exporter to run on the async runtime.
/// The exporter answers `GET /metrics` (any path) on `addr`.
pub fn install(addr: SocketAddr) -> Result<impl Future<Output = ()> + Send, String> {
    let (recorder, exporter) = PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_quantiles(&[0.5, 0.9, 0.99])
        .map_err(|e| e.to_string())?
        .build()
        .map_err(|e| format!("cannot serve metrics on {addr}: {e}"))?;
    metrics::set_global_recorder(recorder).map_err(|e| e.to_string())?;
    describe();
    Ok(async move {
        if let Err(e) = exporter.await {
            tracing::error!("metrics exporter stopped: {e:?}");
        }
    })
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_histogram!(
        "jina_receiving_request_seconds",
        Unit::Seconds,
        "Time from receiving a request to sending its reply"
    );
    describe_counter!(
        "jina_successful_requests_total",
        "Requests answered without an error status"
    );
    describe_counter!(
        "jina_failed_requests_total",
        "Requests answered with an error status or refused"
    );
    describe_counter!(
        "jina_document_processed_total",
        "Documents embedded, by endpoint"
    );
    describe_histogram!(
        "jina_received_request_bytes",
        Unit::Bytes,
        "Size of received requests"
    );
    describe_histogram!(
        "jina_sent_response_bytes",
        Unit::Bytes,
        "Size of sent replies"
    );
    describe_histogram!(
        "jina_process_request_seconds",
        Unit::Seconds,
        "Time the executor spent on a request, by endpoint"
    );
    describe_histogram!(
        "jina_preprocess_texts_seconds",
        Unit::Seconds,
        "Tokenizing one request's texts"
    );
    describe_histogram!(
        "jina_preprocess_images_seconds",
        Unit::Seconds,
        "Decoding and resizing one request's images"
    );
    describe_histogram!(
        "jina_encode_texts_seconds",
        Unit::Seconds,
        "One text batch in the model"
    );
    describe_histogram!(
        "jina_encode_images_seconds",
        Unit::Seconds,
        "One image batch in the model"
    );
    describe_gauge!(
        "clipft_queue_documents",
        "Documents queued or in compute, by tower"
    );
    describe_histogram!("clipft_batch_size", "Documents per model batch, by tower");
    describe_histogram!(
        "clipft_queue_wait_seconds",
        Unit::Seconds,
        "Longest wait of a batch's requests before compute, by tower"
    );
    describe_counter!(
        "clipft_embedded_total",
        "Documents through the model, by tower"
    );
    describe_counter!(
        "clipft_abandoned_requests_total",
        "Queued requests dropped before compute because the caller left, by tower"
    );
    describe_gauge!("clipft_trainer_runs", "Trainer runs by state");
    describe_counter!(
        "clipft_trainer_runs_ended_total",
        "Trainer runs that ended, by final state"
    );
    describe_counter!("clipft_trainer_steps_total", "Optimiser steps taken");
    describe_histogram!(
        "clipft_trainer_step_seconds",
        Unit::Seconds,
        "Time per training step (data, forward, backward, optimiser)"
    );
    describe_gauge!("clipft_trainer_loss", "Loss of the latest step, by run");
}
