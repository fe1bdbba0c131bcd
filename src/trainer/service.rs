//! `clipft trainer`: the gRPC service of `proto/trainer.proto` over a [`Registry`], with
//! `grpc.health.v1`, an optional bearer token on every Trainer call, and the one place where
//! trainer errors become gRPC statuses ([`status`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status, Streaming};

use super::datasets::{DatasetError, DatasetMeta, Format};
use super::fit::FitConfig;
use super::runs::{Experiment, Progress, Registry, RunError, RunRecord, State};
use crate::eval::Metrics;
use crate::protocol::trainer as pb;
use pb::trainer_server::{Trainer, TrainerServer};

/// Every trainer error as the gRPC status a client can act on.
pub fn status(e: &RunError) -> Status {
    use tonic::Code;
    let code = match e {
        RunError::BadName(_) | RunError::BadConfig(_) | RunError::BadExperimentName(_) => {
            Code::InvalidArgument
        }
        RunError::NotFound(_)
        | RunError::ExperimentNotFound(_)
        | RunError::NotInExperiment { .. } => Code::NotFound,
        RunError::Exists(_) | RunError::ExperimentExists(_) => Code::AlreadyExists,
        RunError::WrongState { .. }
        | RunError::DatasetInUse(_)
        | RunError::ArtifactInUse { .. }
        | RunError::ExperimentBusy { .. } => Code::FailedPrecondition,
        RunError::QueueFull(_) | RunError::TooManyExperiments(..) => Code::ResourceExhausted,
        RunError::ModelNotAllowed(..) => Code::PermissionDenied,
        RunError::Dataset(d) => return dataset_status(d),
        RunError::Io { .. } | RunError::Artifact(_) => Code::Internal,
    };
    Status::new(code, e.to_string())
}

fn dataset_status(e: &DatasetError) -> Status {
    use tonic::Code;
    let code = match e {
        DatasetError::BadName(_) | DatasetError::Invalid { .. } => Code::InvalidArgument,
        DatasetError::NotFound(_) => Code::NotFound,
        DatasetError::Exists(_) => Code::AlreadyExists,
        DatasetError::TooLarge(_) | DatasetError::DiskFull(_) => Code::ResourceExhausted,
        DatasetError::Io { .. } => Code::Internal,
    };
    Status::new(code, e.to_string())
}

impl From<RunError> for Status {
    fn from(e: RunError) -> Self {
        status(&e)
    }
}

impl From<DatasetError> for Status {
    fn from(e: DatasetError) -> Self {
        dataset_status(&e)
    }
}

fn state_pb(s: State) -> pb::RunState {
    match s {
        State::Created => pb::RunState::Created,
        State::Started => pb::RunState::Started,
        State::Finished => pb::RunState::Finished,
        State::Failed => pb::RunState::Failed,
        State::Canceled => pb::RunState::Canceled,
    }
}

fn progress_pb(p: &Progress) -> pb::Progress {
    pb::Progress {
        step: p.step,
        total_steps: p.total_steps,
        epoch: p.epoch,
        epochs: p.epochs,
        loss: p.loss,
    }
}

fn run_pb(r: &RunRecord) -> pb::Run {
    pb::Run {
        name: r.name.clone(),
        state: state_pb(r.state) as i32,
        details: r.details.clone(),
        config_json: serde_json::to_string(&r.config).unwrap_or_default(),
        created_unix: r.created_unix,
        started_unix: r.started_unix.unwrap_or(0),
        finished_unix: r.finished_unix.unwrap_or(0),
        progress: Some(progress_pb(&r.progress)),
        experiment: r.experiment().to_string(),
    }
}

fn experiment_pb(x: &Experiment) -> pb::Experiment {
    pb::Experiment {
        name: x.name.clone(),
        status: Experiment::STATUS.into(),
        created_unix: x.created_unix,
        runs: x.runs,
        unfinished_runs: x.unfinished_runs,
    }
}

/// An optional experiment from a request: empty means none named.
fn named(experiment: &str) -> Option<&str> {
    Some(experiment).filter(|x| !x.is_empty())
}

fn dataset_pb(m: &DatasetMeta) -> pb::Dataset {
    pb::Dataset {
        name: m.name.clone(),
        format: match m.format {
            Format::Docarray => pb::DatasetFormat::Docarray,
            Format::CsvBundle => pb::DatasetFormat::CsvBundle,
        } as i32,
        bytes: m.bytes,
        items: m.items,
        created_unix: m.created_unix,
    }
}

fn metrics_map(m: &Option<Metrics>) -> std::collections::HashMap<String, f64> {
    m.iter()
        .flat_map(|m| m.named())
        .map(|(k, v)| (k.to_string(), v))
        .collect()
}

fn examples_pb(e: &[crate::eval::Example]) -> Vec<pb::ExampleResult> {
    e.iter()
        .map(|x| pb::ExampleResult {
            query: x.query.clone(),
            matches: x.matches.clone(),
        })
        .collect()
}

type ReplyStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Bytes per artifact chunk and per log chunk.
const CHUNK: usize = 1 << 20;

/// The Trainer service over a registry.
#[derive(Clone)]
pub struct TrainerService {
    reg: Arc<Registry>,
}

#[tonic::async_trait]
impl Trainer for TrainerService {
    async fn push_dataset(
        &self,
        req: Request<Streaming<pb::PushDatasetRequest>>,
    ) -> Result<Response<pb::Dataset>, Status> {
        use pb::push_dataset_request::Part;
        let mut s = req.into_inner();
        let header = match s.message().await?.and_then(|m| m.part) {
            Some(Part::Header(h)) => h,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message of PushDataset must be the header",
                ))
            }
        };
        let format = match header.format() {
            pb::DatasetFormat::Docarray => Format::Docarray,
            pb::DatasetFormat::CsvBundle => Format::CsvBundle,
            pb::DatasetFormat::Unspecified => {
                return Err(Status::invalid_argument("dataset format is unspecified"))
            }
        };
        // Refused early when it is already clear; checked again when the upload is installed.
        if header.overwrite && self.reg.datasets_in_use().contains(&header.name) {
            return Err(status(&RunError::DatasetInUse(header.name)));
        }
        let mut upload = tokio::task::block_in_place(|| {
            self.reg
                .datasets
                .begin(&header.name, format, &header.file_name, header.overwrite)
        })?;
        while let Some(m) = s.message().await? {
            match m.part {
                Some(Part::Data(d)) => tokio::task::block_in_place(|| upload.write(&d))?,
                _ => {
                    return Err(Status::invalid_argument(
                        "only the first message of PushDataset may be a header",
                    ))
                }
            }
        }
        if header.size > 0 && upload.received() != header.size {
            return Err(Status::invalid_argument(format!(
                "the push of dataset {:?} ended after {} of the {} bytes its header announced",
                header.name,
                upload.received(),
                header.size
            )));
        }
        let reg = self.reg.clone();
        let meta = tokio::task::spawn_blocking(move || {
            let vetted = upload.vet()?;
            reg.install_dataset(vetted).map_err(|e| status(&e))
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))??;
        tracing::info!(dataset = %meta.name, items = meta.items, "dataset stored");
        Ok(Response::new(dataset_pb(&meta)))
    }

    async fn list_datasets(
        &self,
        _: Request<pb::ListDatasetsRequest>,
    ) -> Result<Response<pb::ListDatasetsResponse>, Status> {
        let list = self.reg.datasets.list()?;
        Ok(Response::new(pb::ListDatasetsResponse {
            datasets: list.iter().map(dataset_pb).collect(),
        }))
    }

    async fn delete_dataset(
        &self,
        req: Request<pb::DeleteDatasetRequest>,
    ) -> Result<Response<pb::DeleteDatasetResponse>, Status> {
        let name = req.into_inner().name;
        let reg = self.reg.clone();
        tokio::task::block_in_place(|| reg.delete_dataset(&name)).map_err(|e| status(&e))?;
        Ok(Response::new(pb::DeleteDatasetResponse {}))
    }

    async fn create_run(
        &self,
        req: Request<pb::CreateRunRequest>,
    ) -> Result<Response<pb::Run>, Status> {
        let r = req.into_inner();
        let config: FitConfig = serde_json::from_str(&r.config_json)
            .map_err(|e| Status::invalid_argument(format!("invalid run configuration: {e}")))?;
        let reg = self.reg.clone();
        // Reads the first item of each dataset: off the async threads.
        let rec = tokio::task::spawn_blocking(move || {
            reg.create(Some(r.name), Some(r.experiment), config)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))??;
        tracing::info!(run = %rec.name, experiment = %rec.experiment(), "run created");
        Ok(Response::new(run_pb(&rec)))
    }

    async fn get_run(&self, req: Request<pb::GetRunRequest>) -> Result<Response<pb::Run>, Status> {
        let r = req.into_inner();
        Ok(Response::new(run_pb(
            &self.reg.get_in(&r.name, named(&r.experiment))?,
        )))
    }

    async fn list_runs(
        &self,
        req: Request<pb::ListRunsRequest>,
    ) -> Result<Response<pb::ListRunsResponse>, Status> {
        let r = req.into_inner();
        let (skip, take) = match r.size as usize {
            0 => (0, usize::MAX),
            size => ((r.page.max(1) as usize - 1).saturating_mul(size), size),
        };
        let (runs, total) = self.reg.list_page(named(&r.experiment), skip, take)?;
        Ok(Response::new(pb::ListRunsResponse {
            runs: runs.iter().map(run_pb).collect(),
            total: u32::try_from(total).unwrap_or(u32::MAX),
        }))
    }

    async fn cancel_run(
        &self,
        req: Request<pb::CancelRunRequest>,
    ) -> Result<Response<pb::Run>, Status> {
        Ok(Response::new(run_pb(
            &self.reg.cancel(&req.into_inner().name)?,
        )))
    }

    async fn delete_run(
        &self,
        req: Request<pb::DeleteRunRequest>,
    ) -> Result<Response<pb::DeleteRunResponse>, Status> {
        let r = req.into_inner();
        // A run's experiment never changes, so it is checked before, not under, the deletion.
        self.reg.get_in(&r.name, named(&r.experiment))?;
        let reg = self.reg.clone();
        tokio::task::spawn_blocking(move || reg.delete(&r.name))
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(pb::DeleteRunResponse {}))
    }

    async fn create_experiment(
        &self,
        req: Request<pb::CreateExperimentRequest>,
    ) -> Result<Response<pb::Experiment>, Status> {
        let x = self.reg.create_experiment(&req.into_inner().name)?;
        tracing::info!(experiment = %x.name, "experiment created");
        Ok(Response::new(experiment_pb(&x)))
    }

    async fn get_experiment(
        &self,
        req: Request<pb::GetExperimentRequest>,
    ) -> Result<Response<pb::Experiment>, Status> {
        Ok(Response::new(experiment_pb(
            &self.reg.get_experiment(&req.into_inner().name)?,
        )))
    }

    async fn list_experiments(
        &self,
        _: Request<pb::ListExperimentsRequest>,
    ) -> Result<Response<pb::ListExperimentsResponse>, Status> {
        Ok(Response::new(pb::ListExperimentsResponse {
            experiments: self
                .reg
                .list_experiments()
                .iter()
                .map(experiment_pb)
                .collect(),
        }))
    }

    async fn delete_experiment(
        &self,
        req: Request<pb::DeleteExperimentRequest>,
    ) -> Result<Response<pb::Experiment>, Status> {
        let name = req.into_inner().name;
        let reg = self.reg.clone();
        let x = tokio::task::spawn_blocking(move || reg.delete_experiment(&name))
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        tracing::info!(experiment = %x.name, runs = x.runs, "experiment deleted");
        Ok(Response::new(experiment_pb(&x)))
    }

    type StreamLogsStream = ReplyStream<pb::LogChunk>;

    async fn stream_logs(
        &self,
        req: Request<pb::StreamLogsRequest>,
    ) -> Result<Response<Self::StreamLogsStream>, Status> {
        let r = req.into_inner();
        let mut changes = self.reg.watch_log(&r.name)?;
        let path = self.reg.run_dir(&r.name).join("run.log");
        let reg = self.reg.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            let mut offset = r.offset;
            // The state is read before the log: a run that has ended wrote its last line before
            // its state changed, so an empty read after an ended state is the end.
            while let Ok(rec) = reg.get(&r.name) {
                let text = match read_lines(&path, offset).await {
                    Ok(t) => t,
                    Err(e) => {
                        let _ = tx.send(Err(Status::internal(e.to_string()))).await;
                        break;
                    }
                };
                if text.is_empty() {
                    if !r.follow || rec.state.is_terminal() {
                        break;
                    }
                    tokio::select! {
                        _ = changes.changed() => {}
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = tx.closed() => break,
                    }
                    continue;
                }
                offset += text.len() as u64;
                let chunk = pb::LogChunk {
                    text,
                    offset,
                    progress: Some(progress_pb(&rec.progress)),
                    state: state_pb(rec.state) as i32,
                };
                if tx.send(Ok(chunk)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn get_metrics(
        &self,
        req: Request<pb::GetMetricsRequest>,
    ) -> Result<Response<pb::RunMetrics>, Status> {
        let rec = self.reg.get(&req.into_inner().name)?;
        let r = &rec.result;
        Ok(Response::new(pb::RunMetrics {
            before: metrics_map(&r.before),
            after: metrics_map(&r.after),
            epochs: r
                .epoch_metrics
                .iter()
                .map(|(e, m)| pb::EpochMetrics {
                    epoch: *e as u32 + 1,
                    metrics: metrics_map(&Some(*m)),
                })
                .collect(),
            epoch_losses: r.epoch_losses.clone(),
            eval_losses: r.eval_losses.clone(),
            example_before: examples_pb(&r.examples.before),
            example_after: examples_pb(&r.examples.after),
        }))
    }

    type DownloadArtifactStream = ReplyStream<pb::ArtifactChunk>;

    async fn download_artifact(
        &self,
        req: Request<pb::DownloadArtifactRequest>,
    ) -> Result<Response<Self::DownloadArtifactStream>, Status> {
        let name = req.into_inner().name;
        let reg = self.reg.clone();
        let zip = tokio::task::spawn_blocking(move || reg.artifact_zip(&name))
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        let mut file = tokio::fs::File::open(&zip)
            .await
            .map_err(|e| Status::internal(format!("{}: {e}", zip.display())))?;
        let total = file
            .metadata()
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .len();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut buf = vec![0u8; CHUNK];
            loop {
                match file.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => {
                        let chunk = pb::ArtifactChunk {
                            data: buf[..n].to_vec().into(),
                            total_bytes: total,
                        };
                        if tx.send(Ok(chunk)).await.is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(Status::internal(e.to_string()))).await;
                        break;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// Whole lines of the log from `offset`, at most about [`CHUNK`] bytes; a line longer than
/// that comes in pieces (cut at character boundaries), so a follower always moves on.
async fn read_lines(path: &std::path::Path, offset: u64) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let mut f = match tokio::fs::File::open(path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(String::new()),
        Err(e) => return Err(e),
    };
    f.seek(std::io::SeekFrom::Start(offset)).await?;
    let mut buf = Vec::new();
    f.take(CHUNK as u64).read_to_end(&mut buf).await?;
    let end = match buf.iter().rposition(|b| *b == b'\n') {
        Some(i) => i + 1,
        None if buf.len() == CHUNK => match std::str::from_utf8(&buf) {
            Ok(_) => buf.len(),
            Err(e) => e.valid_up_to(),
        },
        None => 0,
    };
    buf.truncate(end);
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// Checks `authorization: Bearer <token>` on every Trainer call.
#[derive(Clone)]
pub struct BearerAuth {
    token: Option<Arc<str>>,
}

impl BearerAuth {
    pub fn new(token: Option<String>) -> Self {
        Self {
            token: token.filter(|t| !t.is_empty()).map(Into::into),
        }
    }
}

impl tonic::service::Interceptor for BearerAuth {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(want) = &self.token else {
            return Ok(req);
        };
        let got = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        // Compared in time independent of where they differ.
        let same = got.len() == want.len()
            && got
                .bytes()
                .zip(want.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        if same {
            Ok(req)
        } else {
            Err(Status::unauthenticated(
                "missing or wrong bearer token (set --auth-token / CLIPFT_AUTH_TOKEN)",
            ))
        }
    }
}

/// How the service listens.
#[derive(Debug, Clone)]
pub struct TrainerServerConfig {
    pub auth_token: Option<String>,
    /// Largest gRPC message (dataset chunks are far smaller).
    pub max_message_bytes: usize,
    /// How long running runs get to write their checkpoint on shutdown.
    pub shutdown_timeout: Duration,
    /// Serve TLS only; the bearer token then never travels in the clear.
    pub tls: Option<tonic::transport::ServerTlsConfig>,
}

const SERVICE_NAME: &str = "clipft.trainer.v1.Trainer";

/// Serves the trainer on `listener` until `shutdown` resolves; then health turns NOT_SERVING,
/// running runs checkpoint and stop (they resume in the next process), and the server returns.
pub async fn serve(
    reg: Arc<Registry>,
    config: TrainerServerConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let (health, health_service) = tonic_health::server::health_reporter();
    for name in ["", SERVICE_NAME] {
        health
            .set_service_status(name, tonic_health::ServingStatus::Serving)
            .await;
    }
    let scheduler = tokio::spawn(reg.clone().schedule());
    let svc = tonic::service::interceptor::InterceptedService::new(
        TrainerServer::new(TrainerService { reg: reg.clone() })
            .max_decoding_message_size(config.max_message_bytes)
            .max_encoding_message_size(config.max_message_bytes),
        BearerAuth::new(config.auth_token.clone()),
    );
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (closing_tx, mut closing_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("shutting down: health NOT_SERVING, checkpointing running runs");
        for name in ["", SERVICE_NAME] {
            health
                .set_service_status(name, tonic_health::ServingStatus::NotServing)
                .await;
        }
        let _ = closing_tx.send(true);
        let _ = stop_tx.send(());
    });
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = config.tls.clone() {
        builder = builder.tls_config(tls)?;
    }
    let served = builder
        .layer(crate::telemetry::grpc::TraceLayer)
        .add_service(health_service)
        .add_service(svc)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
            let _ = stop_rx.await;
        });
    // Followers of a log never end by themselves; shutdown must not wait for them.
    let result = tokio::select! {
        r = served => r,
        _ = async {
            let _ = closing_rx.wait_for(|c| *c).await;
            tokio::time::sleep(Duration::from_secs(2)).await;
        } => Ok(()),
    };
    scheduler.abort();
    let timeout = config.shutdown_timeout;
    let r2 = reg.clone();
    let _ = tokio::task::spawn_blocking(move || r2.shutdown(timeout)).await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A follower reads a log line longer than a chunk in pieces, cut at characters, and then
    /// the lines after it; it used to get nothing, and stop, at such a line.
    #[tokio::test]
    async fn a_line_longer_than_a_chunk_comes_in_pieces() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("run.log");
        let long = "é".repeat(CHUNK);
        let all = format!("first\n{long}\nlast\n");
        std::fs::write(&path, &all).expect("write");
        let mut offset = 0u64;
        let mut text = String::new();
        for _ in 0..10 {
            let piece = read_lines(&path, offset).await.expect("read");
            if piece.is_empty() {
                break;
            }
            offset += piece.len() as u64;
            text.push_str(&piece);
        }
        assert_eq!(text, all);
    }
}
