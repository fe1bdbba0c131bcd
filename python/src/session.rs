//! A connection to a trainer: `clipft trainer` at an address, or the same service started in
//! this process over a local run registry. Answers go to Python as JSON text (the Python layer
//! turns them into Finetuner's dicts), so the wire types stay on this side.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pyo3::prelude::*;
use serde_json::{json, Value};

use clipft::protocol::trainer as pb;
use clipft::trainer::client::{self, Client};
use clipft::trainer::runs::{Registry, RunnerOptions};
use clipft::trainer::service::{serve, TrainerServerConfig};

use crate::{client_error, status_error, wait, ClipftError};

/// The trainer service this process runs for local runs, and how to stop it.
struct LocalTrainer {
    data_dir: PathBuf,
    stop: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    served: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// Where runs go: a trainer client, and the in-process trainer behind it when local.
#[pyclass(module = "clipft._native", frozen)]
pub struct Session {
    client: Client,
    address: String,
    local: Option<Arc<LocalTrainer>>,
    /// For a local registry: the process whose trainer serves it.
    pid: Option<u32>,
    /// The registry another Python session holds, when this one sends its runs there.
    shared: Option<PathBuf>,
}

/// `<data-dir>/local-trainer.json`: where the Python session holding a registry serves it, so
/// a second interpreter on the same registry sends its calls there instead of failing on the
/// lock. Readable by the owner only (it holds the bearer token).
const HOLDER_FILE: &str = "local-trainer.json";

fn write_holder(data_dir: &std::path::Path, address: &str, token: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = data_dir.join(format!(".{HOLDER_FILE}.{}", std::process::id()));
    let body = json!({"address": address, "token": token, "pid": std::process::id()});
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(body.to_string().as_bytes())?;
    drop(f);
    std::fs::rename(&tmp, data_dir.join(HOLDER_FILE))
}

/// Starts nothing: connects to the trainer of the Python session holding `data_dir`, if
/// it says where it is and answers.
fn join_holder(py: Python<'_>, data_dir: PathBuf) -> Option<Session> {
    let raw = std::fs::read_to_string(data_dir.join(HOLDER_FILE)).ok()?;
    let v: Value = serde_json::from_str(&raw).ok()?;
    let (address, token) = (v["address"].as_str()?, v["token"].as_str()?);
    let mut s = Session::remote(py, address, Some(token.to_string()), None).ok()?;
    s.pid = v["pid"].as_u64().and_then(|p| u32::try_from(p).ok());
    s.shared = Some(data_dir);
    Some(s)
}

/// Removes the holder file if this process wrote it.
fn remove_holder(data_dir: &std::path::Path) {
    let path = data_dir.join(HOLDER_FILE);
    let ours = std::fs::read_to_string(&path)
        .ok()
        .and_then(|s| serde_json::from_str::<Value>(&s).ok())
        .is_some_and(|v| v["pid"] == json!(std::process::id()));
    if ours {
        let _ = std::fs::remove_file(path);
    }
}

fn run_json(r: &pb::Run) -> Value {
    let p = r.progress.unwrap_or_default();
    let config: Value = serde_json::from_str(&r.config_json).unwrap_or(Value::Null);
    json!({
        "name": r.name,
        "experiment": r.experiment,
        "status": client::state_word(r.state),
        "details": r.details,
        "config": config,
        "created_unix": r.created_unix,
        "started_unix": (r.started_unix != 0).then_some(r.started_unix),
        "finished_unix": (r.finished_unix != 0).then_some(r.finished_unix),
        "progress": {
            "step": p.step, "total_steps": p.total_steps, "epoch": p.epoch,
            "epochs": p.epochs, "loss": p.loss,
        },
    })
}

fn experiment_json(x: &pb::Experiment) -> Value {
    json!({
        "name": x.name,
        "status": x.status,
        "created_unix": x.created_unix,
        "runs": x.runs,
        "unfinished_runs": x.unfinished_runs,
    })
}

fn dataset_json(d: &pb::Dataset) -> Value {
    json!({"name": d.name, "bytes": d.bytes, "items": d.items, "created_unix": d.created_unix})
}

impl Session {
    fn client(&self) -> Client {
        self.client.clone()
    }
}

#[pymethods]
impl Session {
    /// Starts the trainer service in this process over the run registry in `data_dir`
    /// (created if missing), listening on a free loopback port with a random token, and
    /// connects to it. Unfinished runs found there are queued and resume.
    #[staticmethod]
    #[pyo3(signature = (data_dir, device="auto", checkpoint_seconds=300, max_concurrent=1, max_queued=100, max_experiments=1000, max_batch_size=1024, max_interruptions=3))]
    #[allow(clippy::too_many_arguments)]
    fn local(
        py: Python<'_>,
        data_dir: PathBuf,
        device: &str,
        checkpoint_seconds: u64,
        max_concurrent: usize,
        max_queued: usize,
        max_experiments: usize,
        max_batch_size: usize,
        max_interruptions: u32,
    ) -> PyResult<Self> {
        std::fs::create_dir_all(&data_dir).map_err(|e| {
            ClipftError::new_err(format!("run registry {}: {e}", data_dir.display()))
        })?;
        let opts = RunnerOptions {
            max_concurrent,
            max_queued,
            max_experiments,
            device: device.to_string(),
            checkpoint_seconds,
            max_batch_size,
            max_interruptions: max_interruptions.max(1),
            ..RunnerOptions::new(data_dir.clone())
        };
        let reg = match py.detach(|| Registry::open(opts)) {
            Ok(reg) => reg,
            Err(clipft::trainer::runs::RunError::BadConfig(_)) => {
                // Another process holds the registry. If it is a Python session, it said where
                // its trainer listens: runs are sent there (they train in that process).
                return match join_holder(py, data_dir.clone()) {
                    Some(s) => Ok(s),
                    None => Err(ClipftError::new_err(format!(
                        "the run registry {} is in use by another process (a `clipft trainer --data-dir` there); \
                         stop it, pass login(data_dir=...) / CLIPFT_DATA_DIR, or send runs to that trainer with login(trainer=...)",
                        data_dir.display()
                    ))),
                };
            }
            Err(other) => {
                return Err(ClipftError::new_err(format!(
                    "run registry {}: {other}",
                    data_dir.display()
                )))
            }
        };
        let token: String = {
            use rand::Rng;
            let mut rng = rand::thread_rng();
            (0..32)
                .map(|_| char::from(b"0123456789abcdef"[rng.gen_range(0..16)]))
                .collect()
        };
        let listener = wait(py, tokio::net::TcpListener::bind("127.0.0.1:0"))?
            .map_err(|e| ClipftError::new_err(format!("cannot listen on loopback: {e}")))?;
        let port = listener
            .local_addr()
            .map_err(|e| ClipftError::new_err(e.to_string()))?
            .port();
        let config = TrainerServerConfig {
            auth_token: Some(token.clone()),
            max_message_bytes: 64 << 20,
            shutdown_timeout: Duration::from_secs(60),
            tls: None,
        };
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let rt = crate::runtime()?;
        let served = rt.spawn(async move {
            let stop = async move {
                let _ = stop_rx.await;
            };
            if let Err(e) = serve(reg, config, listener, stop).await {
                tracing::error!("the local trainer stopped: {e}");
            }
        });
        let address = format!("grpc://127.0.0.1:{port}");
        let client =
            wait(py, client::connect(&address, Some(&token), None))?.map_err(client_error)?;
        if let Err(e) = write_holder(&data_dir, &address, &token) {
            tracing::warn!("other Python sessions cannot share this registry: {e}");
        }
        Ok(Self {
            client,
            address,
            local: Some(Arc::new(LocalTrainer {
                data_dir,
                stop: Mutex::new(Some(stop_tx)),
                served: Mutex::new(Some(served)),
            })),
            pid: Some(std::process::id()),
            shared: None,
        })
    }

    /// The process whose trainer serves the local registry (this one, or the Python session
    /// that held it first); None for a remote trainer.
    #[getter]
    fn holder_pid(&self) -> Option<u32> {
        self.pid
    }

    /// Connects to `clipft trainer` at `address` (`grpc://` or `grpcs://host:port`), sending
    /// `token` as its bearer token and trusting `ca` besides the system roots for TLS.
    #[staticmethod]
    #[pyo3(signature = (address, token=None, ca=None))]
    fn remote(
        py: Python<'_>,
        address: &str,
        token: Option<String>,
        ca: Option<PathBuf>,
    ) -> PyResult<Self> {
        let client = wait(
            py,
            client::connect(address, token.as_deref(), ca.as_deref()),
        )?
        .map_err(client_error)?;
        let s = Self {
            client,
            address: address.to_string(),
            local: None,
            pid: None,
            shared: None,
        };
        // A wrong token or a closed port shows at login, not at the first run.
        let mut c = s.client();
        wait(py, async move {
            c.list_runs(pb::ListRunsRequest {
                size: 1,
                ..Default::default()
            })
            .await
        })?
        .map_err(|e| status_error(&e))?;
        Ok(s)
    }

    /// The trainer's address (a loopback one for local runs).
    #[getter]
    fn address(&self) -> &str {
        &self.address
    }

    /// The local run registry's folder; None for a remote trainer.
    #[getter]
    fn data_dir(&self) -> Option<PathBuf> {
        match &self.local {
            Some(l) => Some(l.data_dir.clone()),
            None => self.shared.clone(),
        }
    }

    /// Packs a local dataset file (CSV with its images, or a docarray file, local image URIs
    /// inlined) and stores it on the trainer as `name`. Returns the dataset as JSON.
    #[pyo3(signature = (name, path, overwrite=true))]
    fn push_dataset(
        &self,
        py: Python<'_>,
        name: &str,
        path: PathBuf,
        overwrite: bool,
    ) -> PyResult<String> {
        let mut c = self.client();
        let d = wait(py, async move {
            client::push_dataset(&mut c, name, &path, overwrite).await
        })?
        .map_err(client_error)?;
        Ok(dataset_json(&d).to_string())
    }

    /// The trainer's datasets as a JSON list.
    fn list_datasets(&self, py: Python<'_>) -> PyResult<String> {
        let mut c = self.client();
        let r = wait(py, async move {
            c.list_datasets(pb::ListDatasetsRequest {}).await
        })?
        .map_err(|e| status_error(&e))?;
        Ok(Value::from_iter(r.into_inner().datasets.iter().map(dataset_json)).to_string())
    }

    fn delete_dataset(&self, py: Python<'_>, name: String) -> PyResult<()> {
        let mut c = self.client();
        wait(py, async move {
            c.delete_dataset(pb::DeleteDatasetRequest { name }).await
        })?
        .map_err(|e| status_error(&e))?;
        Ok(())
    }

    /// Queues a run in `experiment` (created if new; empty: "default"); `config_json` holds
    /// `clipft fit`'s fields with data fields naming datasets. Returns the run as JSON.
    #[pyo3(signature = (name, config_json, experiment=String::new()))]
    fn create_run(
        &self,
        py: Python<'_>,
        name: String,
        config_json: String,
        experiment: String,
    ) -> PyResult<String> {
        let mut c = self.client();
        let r = wait(py, async move {
            c.create_run(pb::CreateRunRequest {
                name,
                config_json,
                experiment,
            })
            .await
        })?
        .map_err(|e| status_error(&e))?;
        Ok(run_json(&r.into_inner()).to_string())
    }

    /// The run as JSON; with `experiment`, only if the run is in it (else NotFoundError).
    #[pyo3(signature = (name, experiment=String::new()))]
    fn get_run(&self, py: Python<'_>, name: String, experiment: String) -> PyResult<String> {
        let mut c = self.client();
        let r = wait(py, async move {
            c.get_run(pb::GetRunRequest { name, experiment }).await
        })?
        .map_err(|e| status_error(&e))?;
        Ok(run_json(&r.into_inner()).to_string())
    }

    /// The runs, oldest first, as a JSON list; only `experiment`'s when given; page `page`
    /// of `size` runs (counting from 1), or every run when `size` is 0.
    #[pyo3(signature = (experiment=String::new(), page=1, size=0))]
    fn list_runs(
        &self,
        py: Python<'_>,
        experiment: String,
        page: u32,
        size: u32,
    ) -> PyResult<String> {
        let mut c = self.client();
        let runs = wait(py, async move {
            match size {
                0 => client::list_runs(&mut c, &experiment).await,
                size => c
                    .list_runs(pb::ListRunsRequest {
                        experiment,
                        page,
                        size,
                    })
                    .await
                    .map(|r| r.into_inner().runs)
                    .map_err(client::ClientError::from),
            }
        })?
        .map_err(client_error)?;
        Ok(Value::from_iter(runs.iter().map(run_json)).to_string())
    }

    fn cancel_run(&self, py: Python<'_>, name: String) -> PyResult<String> {
        let mut c = self.client();
        let r = wait(py, async move {
            c.cancel_run(pb::CancelRunRequest { name }).await
        })?
        .map_err(|e| status_error(&e))?;
        Ok(run_json(&r.into_inner()).to_string())
    }

    /// Deletes a run that is not training; with `experiment`, only if the run is in it.
    #[pyo3(signature = (name, experiment=String::new()))]
    fn delete_run(&self, py: Python<'_>, name: String, experiment: String) -> PyResult<()> {
        let mut c = self.client();
        wait(py, async move {
            c.delete_run(pb::DeleteRunRequest { name, experiment })
                .await
        })?
        .map_err(|e| status_error(&e))?;
        Ok(())
    }

    /// A new, empty experiment as JSON (AlreadyExistsError when the name is taken).
    fn create_experiment(&self, py: Python<'_>, name: String) -> PyResult<String> {
        let mut c = self.client();
        let r = wait(py, async move {
            c.create_experiment(pb::CreateExperimentRequest { name })
                .await
        })?
        .map_err(|e| status_error(&e))?;
        Ok(experiment_json(&r.into_inner()).to_string())
    }

    fn get_experiment(&self, py: Python<'_>, name: String) -> PyResult<String> {
        let mut c = self.client();
        let r = wait(py, async move {
            c.get_experiment(pb::GetExperimentRequest { name }).await
        })?
        .map_err(|e| status_error(&e))?;
        Ok(experiment_json(&r.into_inner()).to_string())
    }

    /// Every experiment, oldest first, as a JSON list.
    fn list_experiments(&self, py: Python<'_>) -> PyResult<String> {
        let mut c = self.client();
        let r = wait(py, async move {
            c.list_experiments(pb::ListExperimentsRequest {}).await
        })?
        .map_err(|e| status_error(&e))?;
        Ok(Value::from_iter(r.into_inner().experiments.iter().map(experiment_json)).to_string())
    }

    /// Deletes the experiment with its runs; returns it as it was, as JSON.
    fn delete_experiment(&self, py: Python<'_>, name: String) -> PyResult<String> {
        let mut c = self.client();
        let r = wait(py, async move {
            c.delete_experiment(pb::DeleteExperimentRequest { name })
                .await
        })?
        .map_err(|e| status_error(&e))?;
        Ok(experiment_json(&r.into_inner()).to_string())
    }

    /// The run's log from byte `offset` as far as it is written: `(text, next_offset)`.
    #[pyo3(signature = (name, offset=0))]
    fn read_logs(&self, py: Python<'_>, name: String, offset: u64) -> PyResult<(String, u64)> {
        let mut c = self.client();
        wait(py, async move {
            let mut stream = c
                .stream_logs(pb::StreamLogsRequest {
                    name,
                    follow: false,
                    offset,
                })
                .await?
                .into_inner();
            let (mut text, mut at) = (String::new(), offset);
            while let Some(chunk) = stream.message().await? {
                text.push_str(&chunk.text);
                at = chunk.offset;
            }
            Ok::<_, tonic::Status>((text, at))
        })?
        .map_err(|e| status_error(&e))
    }

    /// Follows the run's log from the start until the run ends: an iterator of
    /// `(text, status word)` chunks of whole lines.
    fn follow_logs(&self, name: String) -> PyResult<LogFollower> {
        let mut c = self.client();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let task = crate::runtime()?.spawn(async move {
            let mut on_chunk = |chunk: &pb::LogChunk| {
                let item = Ok((
                    chunk.text.clone(),
                    client::state_word(chunk.state).to_string(),
                ));
                match tx.send(item) {
                    Ok(()) => std::ops::ControlFlow::Continue(()),
                    Err(_) => std::ops::ControlFlow::Break(()),
                }
            };
            if let Err(e) = client::stream_logs(&mut c, &name, true, &mut on_chunk).await {
                let _ = tx.send(Err(e));
            }
        });
        Ok(LogFollower {
            rx: tokio::sync::Mutex::new(rx),
            task,
        })
    }

    /// before/after/per-epoch retrieval metrics as JSON.
    fn metrics(&self, py: Python<'_>, name: String) -> PyResult<String> {
        let mut c = self.client();
        let m = wait(py, async move {
            c.get_metrics(pb::GetMetricsRequest { name }).await
        })?
        .map_err(|e| status_error(&e))?
        .into_inner();
        let epochs: Vec<Value> = m
            .epochs
            .iter()
            .map(|e| json!({"epoch": e.epoch, "metrics": e.metrics}))
            .collect();
        Ok(json!({
            "before": m.before, "after": m.after, "epochs": epochs,
            "examples": client::examples_from(&m),
        })
        .to_string())
    }

    /// Downloads the finished run's artifact as the zip `dest`; returns its path.
    fn download_artifact(&self, py: Python<'_>, name: String, dest: PathBuf) -> PyResult<PathBuf> {
        let mut c = self.client();
        wait(py, async move {
            client::download_artifact_zip(&mut c, &name, &dest, &mut |_, _| {}).await
        })?
        .map_err(client_error)
    }

    /// Stops the local trainer: running runs write a checkpoint (within `timeout` seconds) and
    /// resume in the next session. Nothing for a remote trainer.
    #[pyo3(signature = (timeout=60.0))]
    fn shutdown(&self, py: Python<'_>, timeout: f64) -> PyResult<()> {
        let Some(local) = &self.local else {
            return Ok(());
        };
        remove_holder(&local.data_dir);
        if let Some(stop) = local.stop.lock().ok().and_then(|mut s| s.take()) {
            let _ = stop.send(());
        }
        let served = local.served.lock().ok().and_then(|mut s| s.take());
        if let Some(h) = served {
            let limit = Duration::from_secs_f64(timeout.max(0.0) + 5.0);
            let _ = wait(py, async move { tokio::time::timeout(limit, h).await })?;
        }
        Ok(())
    }

    fn __repr__(&self) -> String {
        match (&self.local, &self.shared) {
            (Some(l), _) => format!("Session(local, {})", l.data_dir.display()),
            (None, Some(d)) => format!(
                "Session(local, {}, held by process {})",
                d.display(),
                self.pid.unwrap_or_default()
            ),
            (None, None) => format!("Session({})", self.address),
        }
    }
}

/// A followed log: `(text, status)` chunks until the run ends; dropping it stops following
/// (the run goes on).
#[pyclass(module = "clipft._native")]
pub struct LogFollower {
    rx: tokio::sync::Mutex<
        tokio::sync::mpsc::UnboundedReceiver<Result<(String, String), client::ClientError>>,
    >,
    task: tokio::task::JoinHandle<()>,
}

#[pymethods]
impl LogFollower {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<(String, String)>> {
        let rx = &self.rx;
        let next = wait(py, async move { rx.lock().await.recv().await })?;
        match next {
            None => Ok(None),
            Some(Ok(item)) => Ok(Some(item)),
            Some(Err(e)) => Err(client_error(e)),
        }
    }
}

impl Drop for LogFollower {
    fn drop(&mut self) {
        self.task.abort();
    }
}
