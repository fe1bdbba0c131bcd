//! The trainer's runs: their records in `<data-dir>/runs/<name>/`, the queue that starts at most
//! `max_concurrent` of them at a time (one per device by default), and the worker threads that
//! run [`super::fit::fit`] for each.
//!
//! Layout of a run's folder:
//! ```text
//! run.json        RunRecord: state, details, configuration, progress, metrics (rewritten
//!                 atomically at every state change and epoch end)
//! run.log         the log, appended line by line and streamed to followers
//! work/           TrainingCheckpoint and BestModelCheckpoint files while the run is unfinished
//! artifact/<name>/   the artifact (artifact/<name>.zip once downloaded)
//! ```
//! Runs are grouped in experiments ([`experiments`]); a run's name is unique across them, so
//! every call can find a run by its name alone.
//! After a restart every run is listed again. A run that was STARTED is queued first and resumes
//! from its last checkpoint (from the start when it had none yet); one whose checkpoint cannot be
//! read is FAILED with the reason. On shutdown, running runs write a checkpoint and stay STARTED.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};

use super::datasets::{DatasetError, DatasetMeta, DatasetStore, Trash, Vetted};
use super::fit::{FitConfig, FitControl, FitError, FitEvent, DEFAULT_EXPERIMENT};
use crate::artifact::is_safe_name;
use crate::eval::Metrics;

pub use crate::artifact::unix_now;
pub use experiments::Experiment;

pub mod experiments;

/// Finetuner's run states, plus CANCELED.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum State {
    Created,
    Started,
    Finished,
    Failed,
    Canceled,
}

impl State {
    /// The word `clipft runs status` prints.
    pub fn word(self) -> &'static str {
        match self {
            State::Created => "CREATED",
            State::Started => "STARTED",
            State::Finished => "FINISHED",
            State::Failed => "FAILED",
            State::Canceled => "CANCELED",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, State::Finished | State::Failed | State::Canceled)
    }

    const ALL: [State; 5] = [
        State::Created,
        State::Started,
        State::Finished,
        State::Failed,
        State::Canceled,
    ];
}

/// Where a run stands, for status and progress bars.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Progress {
    pub step: u64,
    pub total_steps: u64,
    /// 1-based; 0 before the first step.
    pub epoch: u32,
    pub epochs: u32,
    /// NaN is written as `null` (JSON has no NaN); read back as NaN.
    #[serde(deserialize_with = "nan_if_null")]
    pub loss: f32,
}

/// A float that JSON may hold as `null` (serde_json writes NaN and infinities so): a run.json
/// with one must still load, or the run would vanish at a restart, its name taken for good.
fn nan_if_null<'de, D: serde::Deserializer<'de>, F: Deserialize<'de> + From<f32>>(
    d: D,
) -> Result<F, D::Error> {
    Ok(Option::<F>::deserialize(d)?.unwrap_or_else(|| F::from(f32::NAN)))
}

/// [`nan_if_null`] for each element.
fn nans_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
    let v = Vec::<Option<f64>>::deserialize(d)?;
    Ok(v.into_iter().map(|x| x.unwrap_or(f64::NAN)).collect())
}

/// What a run measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunResult {
    pub before: Option<Metrics>,
    pub after: Option<Metrics>,
    pub epoch_metrics: Vec<(usize, Metrics)>,
    #[serde(deserialize_with = "nans_if_null")]
    pub epoch_losses: Vec<f64>,
    #[serde(deserialize_with = "nans_if_null")]
    pub eval_losses: Vec<f64>,
    /// Example results (EvaluationCallback `gather_examples`), read from the artifact.
    #[serde(default)]
    pub examples: crate::eval::ExampleResults,
}

/// A run as kept in `run.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    pub name: String,
    pub state: State,
    pub details: String,
    /// As submitted: data fields name datasets in the store.
    pub config: FitConfig,
    pub created_unix: i64,
    pub started_unix: Option<i64>,
    pub finished_unix: Option<i64>,
    pub progress: Progress,
    pub result: RunResult,
    /// Order in the queue (creation order).
    pub seq: u64,
    /// Trainer restarts that found the run training, in a row, with no checkpoint written
    /// between them ([`RunnerOptions::max_interruptions`]).
    #[serde(default)]
    pub interruptions: u32,
}

impl RunRecord {
    /// The experiment the run is listed under.
    pub fn experiment(&self) -> &str {
        &self.config.experiment_name
    }
}

/// The longest failure reason or log line a run keeps: reasons can quote what a client sent,
/// and a record or a log line of megabytes is one no reply can carry (a 70 MB document id made
/// `ListRuns` fail for every client).
const MAX_LINE_BYTES: usize = 4096;

/// `s` cut to [`MAX_LINE_BYTES`] at a character boundary, saying how much was cut.
fn bounded(s: &str) -> String {
    crate::docarray::cut(s, MAX_LINE_BYTES)
}

/// How the trainer runs its queue.
#[derive(Debug, Clone)]
pub struct RunnerOptions {
    pub data_dir: PathBuf,
    /// Runs trained at the same time (each uses the whole device).
    pub max_concurrent: usize,
    /// Runs waiting to start, at most: past it CreateRun is refused.
    pub max_queued: usize,
    /// Experiments kept, at most ("default" included).
    pub max_experiments: usize,
    /// Device for runs whose configuration says `auto`.
    pub device: String,
    /// TrainingCheckpoint interval for runs that do not set one.
    pub checkpoint_seconds: u64,
    /// Largest dataset upload, in bytes.
    pub max_dataset_bytes: u64,
    /// Free space dataset uploads leave on the data folder's disk (0: no floor).
    pub min_free_bytes: u64,
    /// Which hosts the data's http(s) image URIs may resolve to: the datasets come from
    /// clients, the addresses it can reach are the trainer's.
    pub image_hosts: crate::docarray::ImageHosts,
    /// The largest batch_size a run may ask for: a batch's images are held decoded at once
    /// (0.6 MB each at 224 px) with the model's activations on top, and a run that needs more
    /// memory than the trainer has is killed with the process.
    pub max_batch_size: usize,
    /// Trainer restarts in a row a run may be interrupted by without writing a checkpoint
    /// between them before it fails instead of resuming again: a run that kills the process
    /// (out of memory) would otherwise kill every restart.
    pub max_interruptions: u32,
    /// The models runs may start from (hub repo ids, Finetuner names, folders on the trainer);
    /// empty: any. A run's model is what a client names: any hub repo of a CLIP is downloaded
    /// whole, and any folder on the trainer's disk is read.
    pub allowed_models: Vec<String>,
}

impl RunnerOptions {
    /// The service's defaults, with its data in `data_dir`.
    pub fn new(data_dir: PathBuf) -> Self {
        Self {
            data_dir,
            max_concurrent: 1,
            max_queued: 100,
            max_experiments: 1000,
            device: "auto".into(),
            checkpoint_seconds: 300,
            max_dataset_bytes: 16 << 30,
            min_free_bytes: 2 << 30,
            image_hosts: Default::default(),
            max_batch_size: 1024,
            max_interruptions: 3,
            allowed_models: Vec::new(),
        }
    }
}

/// The largest run configuration kept, as JSON: every field of it is in the run's record,
/// rewritten at each epoch and sent in every ListRuns, and a 30 MB model name made listings
/// too large to send.
pub const MAX_CONFIG_BYTES: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("run name {} is not allowed: use letters, digits, '-', '_' and '.', at most 128, not starting with '.'", crate::docarray::quoted(.0))]
    BadName(String),
    #[error("run {0:?} does not exist")]
    NotFound(String),
    #[error("run {0:?} already exists")]
    Exists(String),
    #[error("run {name:?} is {state}: {what}")]
    WrongState {
        name: String,
        state: &'static str,
        what: &'static str,
    },
    #[error("invalid run configuration: {0}")]
    BadConfig(String),
    #[error(
        "dataset {0:?} is used by a run that has not ended; it cannot be replaced or deleted now"
    )]
    DatasetInUse(String),
    /// Runs that have not ended start from this run's artifact (`model_artifact`).
    #[error("run {run:?}'s artifact is where run(s) {} start from (model_artifact), and they have not ended: cancel or delete them first", .users.join(", "))]
    ArtifactInUse { run: String, users: Vec<String> },
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Artifact(String),
    #[error("experiment name {} is not allowed: use letters, digits, '-', '_' and '.', at most 128, not starting with '.'", crate::docarray::quoted(.0))]
    BadExperimentName(String),
    #[error("experiment {0:?} does not exist")]
    ExperimentNotFound(String),
    #[error("experiment {0:?} already exists")]
    ExperimentExists(String),
    #[error("run {run:?} is in experiment {actual:?}, not in {asked:?}")]
    NotInExperiment {
        run: String,
        asked: String,
        actual: String,
    },
    #[error("experiment {name:?} has runs in training ({}): cancel them before deleting it", .runs.join(", "))]
    ExperimentBusy { name: String, runs: Vec<String> },
    #[error("{0} runs are already waiting to start, the most this trainer queues (--max-queued-runs): wait for some to start, or cancel some")]
    QueueFull(usize),
    #[error("the trainer keeps {0} experiments, the most it may (--max-experiments): delete some before creating {1:?}")]
    TooManyExperiments(usize, String),
    #[error("model {} is not one this trainer trains from (--allowed-models: {})", crate::docarray::quoted(.0), .1.join(", "))]
    ModelNotAllowed(String, Vec<String>),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RunError + '_ {
    move |source| RunError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A run taken out of the registry whose files and datasets are still to be removed.
struct Unlinked {
    name: String,
    trash: PathBuf,
    /// The run's own datasets, already out of the store.
    datasets: Vec<(String, Trash)>,
}

/// A run in memory: its record and the handles its worker and followers share.
struct Entry {
    rec: RunRecord,
    cancel: Arc<AtomicBool>,
    /// Bytes in run.log; changes wake log followers (also sent on state changes).
    log_len: watch::Sender<u64>,
    queued: bool,
    resume: bool,
}

struct Inner {
    runs: HashMap<String, Entry>,
    /// Every experiment: name and creation time.
    experiments: experiments::Experiments,
    running: usize,
    next_seq: u64,
    shutting_down: bool,
}

/// Every run of one trainer.
pub struct Registry {
    pub opts: RunnerOptions,
    pub datasets: DatasetStore,
    inner: Mutex<Inner>,
    wake: Notify,
    /// Set on shutdown: running runs checkpoint and stop.
    suspend: Arc<AtomicBool>,
    /// Worker threads still running, for shutdown.
    workers: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// Held (an exclusive `flock`) while this trainer owns `--data-dir`.
    _lock: std::fs::File,
    /// Held while an artifact is zipped, so concurrent first downloads make one zip and the
    /// others serve it (they used to truncate each other's file and fail).
    zipping: Mutex<()>,
}

/// Takes `<data-dir>/trainer.lock` exclusively: two trainers on one folder would run the same
/// runs twice and overwrite each other's records.
fn lock_data_dir(data_dir: &Path) -> Result<std::fs::File, RunError> {
    let path = data_dir.join("trainer.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io(&path))?;
    #[cfg(unix)]
    {
        use std::os::unix::io::AsRawFd;
        // SAFETY: flock on a file descriptor this function owns.
        let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r != 0 {
            return Err(RunError::BadConfig(format!(
                "another trainer is using --data-dir {} (it holds {})",
                data_dir.display(),
                path.display()
            )));
        }
    }
    Ok(f)
}

impl Registry {
    /// Opens `<data-dir>`, lists every run found there and queues the unfinished ones.
    pub fn open(opts: RunnerOptions) -> Result<Arc<Self>, RunError> {
        let runs_dir = opts.data_dir.join("runs");
        std::fs::create_dir_all(&runs_dir).map_err(io(&runs_dir))?;
        let lock = lock_data_dir(&opts.data_dir)?;
        let datasets =
            DatasetStore::open(&opts.data_dir, opts.max_dataset_bytes, opts.min_free_bytes)?;
        let mut runs = HashMap::new();
        let mut next_seq = 0;
        let mut failed = Vec::new();
        for e in std::fs::read_dir(&runs_dir)
            .map_err(io(&runs_dir))?
            .flatten()
        {
            // Run names never start with '.': such folders are set aside runs (below).
            let file_name = e.file_name().to_string_lossy().to_string();
            if file_name.starts_with('.') {
                // A deletion the last process did not finish.
                if file_name.starts_with(".deleted-") {
                    if let Err(err) = std::fs::remove_dir_all(e.path()) {
                        tracing::warn!("{}: {err}", e.path().display());
                    }
                }
                continue;
            }
            let path = e.path().join("run.json");
            let Ok(raw) = std::fs::read(&path) else {
                continue;
            };
            let mut rec: RunRecord = match serde_json::from_slice(&raw) {
                Ok(r) => r,
                Err(err) => {
                    // Kept, but out of the way: left in place, the run was invisible to the API
                    // while its name stayed taken, so it could be neither reused nor deleted.
                    let aside = runs_dir.join(format!(
                        ".unreadable-{}-{}",
                        e.file_name().to_string_lossy(),
                        crate::artifact::unix_now()
                    ));
                    match std::fs::rename(e.path(), &aside) {
                        Ok(()) => tracing::warn!(
                            "{}: unreadable ({err}); moved to {} (its name is free again)",
                            path.display(),
                            aside.display()
                        ),
                        Err(mv) => tracing::warn!(
                            "{}: unreadable ({err}), skipped; cannot move it aside: {mv}",
                            path.display()
                        ),
                    }
                    continue;
                }
            };
            next_seq = next_seq.max(rec.seq + 1);
            let (queued, resume) = match rec.state {
                State::Created => (true, false),
                State::Started if rec.interruptions >= opts.max_interruptions => {
                    rec.state = State::Failed;
                    rec.details = format!(
                        "the trainer stopped {} times in a row while this run trained, each time \
                         before a new checkpoint, so it is not resumed again; a run that needs \
                         more memory than the trainer has ends this way (try a smaller \
                         batch_size)",
                        rec.interruptions + 1
                    );
                    rec.finished_unix = Some(unix_now());
                    failed.push(rec.name.clone());
                    (false, false)
                }
                State::Started => {
                    rec.interruptions += 1;
                    rec.details =
                        "interrupted by a trainer restart; resumes from its last checkpoint".into();
                    (true, true)
                }
                _ => (false, false),
            };
            let log_len = std::fs::metadata(e.path().join("run.log")).map_or(0, |m| m.len());
            runs.insert(
                rec.name.clone(),
                Entry {
                    rec,
                    cancel: Arc::default(),
                    log_len: watch::channel(log_len).0,
                    queued,
                    resume,
                },
            );
        }
        let experiments = experiments::load(&opts.data_dir, runs.values().map(|e| &e.rec));
        let reg = Arc::new(Self {
            opts,
            datasets,
            inner: Mutex::new(Inner {
                runs,
                experiments,
                running: 0,
                next_seq,
                shutting_down: false,
            }),
            wake: Notify::new(),
            suspend: Arc::default(),
            workers: Mutex::default(),
            _lock: lock,
            zipping: Mutex::new(()),
        });
        {
            let inner = reg.lock();
            for e in inner.runs.values().filter(|e| e.resume) {
                reg.append_log(e, "trainer restarted: the run is queued to resume");
                reg.persist(&e.rec);
            }
            for e in failed.iter().filter_map(|n| inner.runs.get(n)) {
                tracing::warn!(run = %e.rec.name, "{}", e.rec.details);
                reg.append_log(e, &format!("failed: {}", e.rec.details));
                reg.persist(&e.rec);
                reg.drop_work(&e.rec.name);
            }
            reg.publish_counts(&inner);
        }
        Ok(reg)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A worker that panicked while holding the lock left consistent data (every update is a
        // plain assignment), so the poison is cleared rather than propagated.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn run_dir(&self, name: &str) -> PathBuf {
        self.opts.data_dir.join("runs").join(name)
    }

    fn persist(&self, rec: &RunRecord) {
        let path = self.run_dir(&rec.name).join("run.json");
        let result = serde_json::to_vec_pretty(rec)
            .map_err(std::io::Error::other)
            .and_then(|json| crate::artifact::replace_file(&path, &json));
        if let Err(e) = result {
            tracing::error!("cannot save run {}: {e}", rec.name);
        }
    }

    fn append_log(&self, e: &Entry, line: &str) {
        let line = bounded(line);
        let path = self.run_dir(&e.rec.name).join("run.log");
        let stamp = crate::artifact::iso_utc(unix_now());
        let result = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| {
                f.write_all(format!("{stamp} {line}\n").as_bytes())?;
                f.metadata()
            });
        match result {
            Ok(m) => {
                e.log_len.send_replace(m.len());
            }
            Err(err) => tracing::error!("{}: {err}", path.display()),
        }
    }

    fn publish_counts(&self, inner: &Inner) {
        for s in State::ALL {
            let n = inner.runs.values().filter(|e| e.rec.state == s).count();
            metrics::gauge!("clipft_trainer_runs", "state" => s.word()).set(n as f64);
        }
    }

    /// Queues a new run in `experiment` (else the configuration's `experiment_name`, else
    /// "default"), creating the experiment if needed. `config` holds dataset names; they must
    /// exist.
    pub fn create(
        &self,
        name: Option<String>,
        experiment: Option<String>,
        mut config: FitConfig,
    ) -> Result<RunRecord, RunError> {
        let name = match name.filter(|n| !n.is_empty()) {
            Some(n) => n,
            None => random_run_name(),
        };
        if !is_safe_name(&name) {
            return Err(RunError::BadName(name));
        }
        let experiment = experiment
            .filter(|e| !e.is_empty())
            .or_else(|| Some(config.experiment_name.clone()).filter(|e| !e.is_empty()))
            .unwrap_or_else(|| DEFAULT_EXPERIMENT.to_string());
        experiments::check_name(&experiment)?;
        config.experiment_name = experiment.clone();
        if config.train_data.as_os_str().is_empty() {
            return Err(RunError::BadConfig("train_data is required".into()));
        }
        if config.model.trim().is_empty() {
            return Err(RunError::BadConfig("model is required".into()));
        }
        let allowed = &self.opts.allowed_models;
        let canonical = crate::model::backbones::canonical;
        if !allowed.is_empty()
            && !allowed
                .iter()
                .any(|a| canonical(a) == canonical(&config.model))
        {
            return Err(RunError::ModelNotAllowed(
                config.model.clone(),
                allowed.clone(),
            ));
        }
        if config.batch_size < 2 || config.epochs == 0 {
            return Err(RunError::BadConfig(
                "batch_size must be at least 2 and epochs at least 1".into(),
            ));
        }
        if config.batch_size > self.opts.max_batch_size {
            return Err(RunError::BadConfig(format!(
                "batch_size {} is over this trainer's limit of {} (--max-batch-size, \
                 CLIPFT_MAX_BATCH_SIZE): a batch's images are held decoded at once, with the \
                 model's activations",
                config.batch_size, self.opts.max_batch_size
            )));
        }
        let json = serde_json::to_vec(&config).map_or(usize::MAX, |j| j.len());
        if json > MAX_CONFIG_BYTES {
            return Err(RunError::BadConfig(format!(
                "the configuration is {json} bytes as JSON; at most {MAX_CONFIG_BYTES} are kept"
            )));
        }
        if config.description.len() > super::fit::MAX_DESCRIPTION_BYTES {
            return Err(RunError::BadConfig(format!(
                "the description has {} bytes; at most {} are kept",
                config.description.len(),
                super::fit::MAX_DESCRIPTION_BYTES
            )));
        }
        // Before the datasets are read, for the first answer.
        super::fit::check_settings(&config).map_err(RunError::BadConfig)?;
        Self::check_artifact_source(&self.lock(), &config)?;
        self.check_shapes(&config)?;
        config.run_name = name.clone();
        let mut inner = self.lock();
        if inner.shutting_down {
            return Err(RunError::BadConfig("the trainer is shutting down".into()));
        }
        // Under the lock that dataset deletion takes, so none is deleted between this check
        // and the run's existence.
        for d in self.data_names(&config) {
            self.datasets.get(&d)?;
        }
        // Again under the lock: the run it names cannot be deleted between here and this
        // run's existence, and after that not while this run has not ended (`unlink`).
        Self::check_artifact_source(&inner, &config)?;
        if inner.runs.contains_key(&name) || self.run_dir(&name).exists() {
            return Err(RunError::Exists(name));
        }
        let waiting = inner.runs.values().filter(|e| e.queued).count();
        if waiting >= self.opts.max_queued.max(1) {
            return Err(RunError::QueueFull(waiting));
        }
        self.ensure_experiment(&mut inner, &experiment)?;
        let dir = self.run_dir(&name);
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let seq = inner.next_seq;
        inner.next_seq += 1;
        let rec = RunRecord {
            name: name.clone(),
            state: State::Created,
            details: "Run submitted and awaits execution".into(),
            progress: Progress {
                epochs: config.epochs as u32,
                ..Default::default()
            },
            config,
            created_unix: unix_now(),
            started_unix: None,
            finished_unix: None,
            result: RunResult::default(),
            seq,
            interruptions: 0,
        };
        self.persist(&rec);
        let entry = Entry {
            rec: rec.clone(),
            cancel: Arc::default(),
            log_len: watch::channel(0).0,
            queued: true,
            resume: false,
        };
        self.append_log(
            &entry,
            &format!("run {name} created in experiment {experiment}"),
        );
        inner.runs.insert(name, entry);
        self.publish_counts(&inner);
        drop(inner);
        self.wake.notify_one();
        Ok(rec)
    }

    /// The first item of each dataset has the shape its role needs (caption-image pairs for
    /// train and eval, labelled texts for query, labelled images for index): a dataset given in
    /// the wrong role is refused here, not when the run starts. Reads one item each.
    fn check_shapes(&self, c: &FitConfig) -> Result<(), RunError> {
        use crate::docarray::{open_labeled, open_pairs, DataError, Modality};
        let bad = |role: &str, name: &Path, e: DataError| {
            RunError::BadConfig(format!(
                "{role}_data {}: {}",
                name.display(),
                self.datasets.redact_paths(&e.to_string())
            ))
        };
        for (role, d) in [
            ("train", Some(&c.train_data)),
            ("eval", c.eval_data.as_ref()),
        ] {
            let Some(d) = d else { continue };
            let file = self.datasets.data_file(&d.to_string_lossy())?;
            match open_pairs(&file).map_err(|e| bad(role, d, e))?.next() {
                Some(Err(e)) => return Err(bad(role, d, e)),
                None => {
                    return Err(RunError::BadConfig(format!(
                        "{role}_data {} is empty",
                        d.display()
                    )))
                }
                Some(Ok(_)) => {}
            }
        }
        for (role, d, want) in [
            ("query", c.query_data.as_ref(), Modality::Text),
            ("index", c.index_data.as_ref(), Modality::Image),
        ] {
            let Some(d) = d else { continue };
            let file = self.datasets.data_file(&d.to_string_lossy())?;
            match open_labeled(&file, want)
                .map_err(|e| bad(role, d, e))?
                .next()
            {
                Some(Err(e)) => return Err(bad(role, d, e)),
                None => {
                    return Err(RunError::BadConfig(format!(
                        "{role}_data {} is empty",
                        d.display()
                    )))
                }
                Some(Ok(_)) => {}
            }
        }
        Ok(())
    }

    fn data_names(&self, c: &FitConfig) -> Vec<String> {
        [
            Some(&c.train_data),
            c.eval_data.as_ref(),
            c.query_data.as_ref(),
            c.index_data.as_ref(),
        ]
        .into_iter()
        .flatten()
        .map(|p| p.to_string_lossy().to_string())
        .collect()
    }

    pub fn get(&self, name: &str) -> Result<RunRecord, RunError> {
        self.lock()
            .runs
            .get(name)
            .map(|e| e.rec.clone())
            .ok_or_else(|| RunError::NotFound(name.to_string()))
    }

    /// The run, when it is in `experiment` (any experiment when None): Finetuner's calls on
    /// one run name its experiment, and a run of another one is not the run asked for.
    pub fn get_in(&self, name: &str, experiment: Option<&str>) -> Result<RunRecord, RunError> {
        let rec = self.get(name)?;
        match experiment {
            Some(asked) if asked != rec.experiment() => Err(RunError::NotInExperiment {
                run: name.to_string(),
                asked: asked.to_string(),
                actual: rec.experiment().to_string(),
            }),
            _ => Ok(rec),
        }
    }

    /// Every run in creation order; only those of `experiment`, which must exist, when given.
    pub fn list(&self, experiment: Option<&str>) -> Result<Vec<RunRecord>, RunError> {
        Ok(self.list_page(experiment, 0, usize::MAX)?.0)
    }

    /// [`Self::list`] from the `skip`th run, at most `take` of them, and how many there are in
    /// all: only the page's records are copied (a client gathering many pages would otherwise
    /// copy every record for each).
    pub fn list_page(
        &self,
        experiment: Option<&str>,
        skip: usize,
        take: usize,
    ) -> Result<(Vec<RunRecord>, usize), RunError> {
        let inner = self.lock();
        if let Some(x) = experiment {
            if !inner.experiments.contains_key(x) {
                return Err(RunError::ExperimentNotFound(x.to_string()));
            }
        }
        let mut v: Vec<&RunRecord> = inner
            .runs
            .values()
            .map(|e| &e.rec)
            .filter(|r| experiment.is_none_or(|x| r.experiment() == x))
            .collect();
        v.sort_by_key(|r| r.seq);
        let total = v.len();
        Ok((
            v.into_iter().skip(skip).take(take).cloned().collect(),
            total,
        ))
    }

    /// A receiver that changes whenever the run's log grows or its state changes.
    pub fn watch_log(&self, name: &str) -> Result<watch::Receiver<u64>, RunError> {
        self.lock()
            .runs
            .get(name)
            .map(|e| e.log_len.subscribe())
            .ok_or_else(|| RunError::NotFound(name.to_string()))
    }

    pub fn cancel(&self, name: &str) -> Result<RunRecord, RunError> {
        let mut inner = self.lock();
        let e = inner
            .runs
            .get_mut(name)
            .ok_or_else(|| RunError::NotFound(name.to_string()))?;
        match e.rec.state {
            // Queued: never started, or interrupted and waiting to resume.
            State::Created | State::Started if e.queued => {
                e.queued = false;
                e.resume = false;
                e.rec.state = State::Canceled;
                e.rec.details = "canceled before it started".into();
                e.rec.finished_unix = Some(unix_now());
                self.append_log(e, "canceled before it started");
            }
            State::Started => {
                e.cancel.store(true, Ordering::Relaxed);
                e.queued = false;
                e.rec.details = "cancel requested; stops before its next step".into();
                self.append_log(e, "cancel requested");
            }
            s => {
                return Err(RunError::WrongState {
                    name: name.into(),
                    state: s.word(),
                    what: "only a CREATED or STARTED run can be canceled",
                })
            }
        }
        let rec = e.rec.clone();
        self.persist(&rec);
        self.publish_counts(&inner);
        Ok(rec)
    }

    /// Removes a run that is not training, with its folder and the datasets pushed for it.
    pub fn delete(&self, name: &str) -> Result<(), RunError> {
        let mut inner = self.lock();
        let gone = self.unlink(&mut inner, name)?;
        self.publish_counts(&inner);
        drop(inner);
        self.clear(gone)
    }

    /// The part of a deletion done under the lock: refused while the run trains; otherwise
    /// its folder is moved aside (so its name is free at once) and it leaves the registry.
    fn unlink(&self, inner: &mut Inner, name: &str) -> Result<Unlinked, RunError> {
        let e = inner
            .runs
            .get(name)
            .ok_or_else(|| RunError::NotFound(name.to_string()))?;
        if e.rec.state == State::Started {
            return Err(RunError::WrongState {
                name: name.into(),
                state: "STARTED",
                what: "cancel it before deleting it",
            });
        }
        let users = Self::artifact_users(inner, name);
        if !users.is_empty() {
            return Err(RunError::ArtifactInUse {
                run: name.into(),
                users,
            });
        }
        let dir = self.run_dir(name);
        let trash = self
            .opts
            .data_dir
            .join("runs")
            .join(format!(".deleted-{name}-{}", rand::random::<u32>()));
        std::fs::rename(&dir, &trash).map_err(io(&dir))?;
        let removed = inner.runs.remove(name);
        // The datasets `fit --trainer` pushed for this run (`<run>-train`, ...) go with it,
        // unless another run uses them: left behind, they would outlive the run and be
        // replaced by the next run of the same name.
        let datasets: Vec<(String, Trash)> = removed
            .as_ref()
            .map(|e| self.data_names(&e.rec.config))
            .unwrap_or_default()
            .into_iter()
            .filter(|d| {
                ["train", "eval", "query", "index"]
                    .iter()
                    .any(|role| *d == format!("{name}-{role}"))
            })
            .filter(|d| {
                !inner
                    .runs
                    .values()
                    .any(|e| self.data_names(&e.rec.config).contains(d))
            })
            // Out of the store under the lock: set aside later, a dataset of this name that a
            // run created meanwhile relied on (or a fresh push of it) was deleted under it.
            .filter_map(|d| match self.datasets.set_aside(&d) {
                Ok(t) => Some((d, t)),
                Err(DatasetError::NotFound(_)) => None,
                Err(e) => {
                    tracing::warn!("run {name} deleted, but not its dataset {d}: {e}");
                    None
                }
            })
            .collect();
        if let Some(e) = removed {
            e.log_len.send_replace(0);
        }
        Ok(Unlinked {
            name: name.to_string(),
            trash,
            datasets,
        })
    }

    /// The rest of a deletion, outside the lock: the run's datasets and files.
    fn clear(&self, gone: Unlinked) -> Result<(), RunError> {
        for (d, trash) in gone.datasets {
            if let Err(e) = trash.remove() {
                tracing::warn!("run {} deleted, but not its dataset {d}: {e}", gone.name);
            }
        }
        std::fs::remove_dir_all(&gone.trash).map_err(io(&gone.trash))
    }

    /// The datasets some unfinished run still needs (they cannot be deleted or replaced).
    pub fn datasets_in_use(&self) -> Vec<String> {
        self.in_use(&self.lock())
    }

    /// A run's `model_artifact`, when it has one, must name a FINISHED run of this trainer.
    fn check_artifact_source(inner: &Inner, config: &FitConfig) -> Result<(), RunError> {
        let Some(src) = &config.model_artifact else {
            return Ok(());
        };
        let source = inner.runs.get(src).map(|e| &e.rec);
        if let Some(rec) = source.filter(|r| r.state == State::Finished) {
            // The artifact holds its own configuration: a run naming another model would train
            // that one while its record, and --allowed-models, said this one.
            let canonical = crate::model::backbones::canonical;
            if canonical(&rec.config.model) != canonical(&config.model) {
                return Err(RunError::BadConfig(format!(
                    "model_artifact {}: that run was trained from {}, not {}; give its model",
                    crate::docarray::quoted(src),
                    crate::docarray::quoted(&rec.config.model),
                    crate::docarray::quoted(&config.model)
                )));
            }
            return Ok(());
        }
        let state = source.map(|r| r.state);
        Err(RunError::BadConfig(format!(
            "model_artifact {}: {}",
            crate::docarray::quoted(src),
            match state {
                None => "no run of that name on this trainer".to_string(),
                Some(s) => format!(
                    "the run is {}; only a FINISHED run has an artifact",
                    s.word()
                ),
            }
        )))
    }

    /// The runs that have not ended and start from `name`'s artifact.
    fn artifact_users(inner: &Inner, name: &str) -> Vec<String> {
        let mut users: Vec<String> = inner
            .runs
            .values()
            .filter(|e| !e.rec.state.is_terminal())
            .filter(|e| e.rec.config.model_artifact.as_deref() == Some(name))
            .map(|e| e.rec.name.clone())
            .collect();
        users.sort();
        users
    }

    fn in_use(&self, inner: &Inner) -> Vec<String> {
        inner
            .runs
            .values()
            .filter(|e| !e.rec.state.is_terminal())
            .flat_map(|e| self.data_names(&e.rec.config))
            .collect()
    }

    /// Installs a vetted upload as its dataset, unless it would replace one that an unfinished
    /// run uses. Checked and done under the registry's lock, as run creation checks its
    /// datasets: checked when the upload began, a run created during a long upload had its
    /// data replaced under it and failed.
    pub fn install_dataset(&self, v: Vetted) -> Result<DatasetMeta, RunError> {
        let inner = self.lock();
        if self.in_use(&inner).iter().any(|d| d == v.name()) {
            return Err(RunError::DatasetInUse(v.name().to_string()));
        }
        let (meta, replaced) = v.install()?;
        drop(inner);
        if let Some(t) = replaced {
            if let Err(e) = t.remove() {
                tracing::warn!(
                    "dataset {} replaced, but not all of the old copy removed: {e}",
                    meta.name
                );
            }
        }
        Ok(meta)
    }

    /// Deletes a dataset no unfinished run uses: checked and taken out of the store under the
    /// registry's lock, its files removed after.
    pub fn delete_dataset(&self, name: &str) -> Result<(), RunError> {
        let inner = self.lock();
        if self.in_use(&inner).iter().any(|d| d == name) {
            return Err(RunError::DatasetInUse(name.to_string()));
        }
        let trash = self.datasets.set_aside(name)?;
        drop(inner);
        Ok(trash.remove()?)
    }

    /// The artifact zip of a finished run, made on first request (blocking).
    pub fn artifact_zip(&self, name: &str) -> Result<PathBuf, RunError> {
        let rec = self.get(name)?;
        if rec.state != State::Finished {
            return Err(RunError::WrongState {
                name: name.into(),
                state: rec.state.word(),
                what: "only a FINISHED run has an artifact",
            });
        }
        let dir = self.run_dir(name).join("artifact").join(name);
        let zip = crate::artifact::zip_path(&dir);
        let _one_at_a_time = self.zipping.lock().unwrap_or_else(|p| p.into_inner());
        if zip.is_file() {
            return Ok(zip);
        }
        crate::artifact::zip_artifact(&dir).map_err(|e| RunError::Artifact(e.to_string()))
    }

    /// Starts queued runs while slots are free; runs until the registry shuts down.
    pub async fn schedule(self: Arc<Self>) {
        loop {
            if !self.start_ready() {
                return;
            }
            self.wake.notified().await;
        }
    }

    /// Starts what the free slots allow; false once shutting down.
    fn start_ready(self: &Arc<Self>) -> bool {
        let mut inner = self.lock();
        if inner.shutting_down {
            return false;
        }
        while inner.running < self.opts.max_concurrent.max(1) {
            // Interrupted runs first, then creation order.
            let next = inner
                .runs
                .values()
                .filter(|e| e.queued)
                .min_by_key(|e| (!e.resume, e.rec.seq))
                .map(|e| e.rec.name.clone());
            let Some(name) = next else { break };
            let Some(e) = inner.runs.get_mut(&name) else {
                break;
            };
            e.queued = false;
            e.cancel.store(false, Ordering::Relaxed);
            let resume = e.resume;
            e.resume = false;
            if e.rec.state == State::Created {
                e.rec.state = State::Started;
                e.rec.started_unix = Some(unix_now());
                e.rec.details = "training".into();
            } else {
                e.rec.details = "resuming after a trainer restart".into();
            }
            self.append_log(e, if resume { "resuming" } else { "started" });
            let rec = e.rec.clone();
            let cancel = e.cancel.clone();
            self.persist(&rec);
            inner.running += 1;
            let reg = self.clone();
            let suspend = self.suspend.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("run-{name}"))
                .spawn(move || reg.execute(rec, resume, cancel, suspend));
            match spawned {
                Ok(h) => {
                    let mut w = self.workers.lock().unwrap_or_else(|p| p.into_inner());
                    w.retain(|h| !h.is_finished());
                    w.push(h);
                }
                Err(err) => {
                    inner.running -= 1;
                    if let Some(e) = inner.runs.get_mut(&name) {
                        e.rec.state = State::Failed;
                        e.rec.details = format!("cannot start a worker thread: {err}");
                        self.persist(&e.rec);
                    }
                }
            }
        }
        self.publish_counts(&inner);
        true
    }

    /// The run's configuration with dataset names turned into files and the trainer's settings.
    fn runnable(&self, rec: &RunRecord) -> Result<FitConfig, RunError> {
        let mut cfg = rec.config.clone();
        let resolve = |p: &PathBuf| -> Result<PathBuf, RunError> {
            Ok(self.datasets.data_file(&p.to_string_lossy())?)
        };
        cfg.train_data = resolve(&cfg.train_data)?;
        for slot in [&mut cfg.eval_data, &mut cfg.query_data, &mut cfg.index_data] {
            if let Some(p) = slot.as_ref() {
                *slot = Some(resolve(p)?);
            }
        }
        if let Some(src) = &cfg.model_artifact {
            let dir = self.run_dir(src).join("artifact").join(src);
            cfg.model_artifact = Some(dir.display().to_string());
        }
        if cfg.device == "auto" {
            cfg.device = self.opts.device.clone();
        }
        cfg.output = self.run_dir(&rec.name).join("artifact");
        cfg.zip = false;
        cfg.checkpoint_seconds = Some(
            cfg.checkpoint_seconds
                .unwrap_or(self.opts.checkpoint_seconds),
        );
        Ok(cfg)
    }

    /// A worker thread: trains one run and records how it ended.
    fn execute(
        self: Arc<Self>,
        rec: RunRecord,
        resume: bool,
        cancel: Arc<AtomicBool>,
        suspend: Arc<AtomicBool>,
    ) {
        let name = rec.name.clone();
        let span = tracing::info_span!("run", run = %name, resume);
        let _enter = span.enter();
        let artifact = self.run_dir(&name).join("artifact").join(&name);
        let outcome = if resume && artifact.join("metrics.yml").is_file() {
            // The process ended after the artifact was complete but before the record said so.
            Ok(None)
        } else {
            self.runnable(&rec)
                .map_err(|e| e.to_string())
                .and_then(|cfg| {
                    let control = FitControl {
                        cancel,
                        work_dir: Some(self.run_dir(&name).join("work")),
                        resume,
                        suspend,
                        http: crate::docarray::HttpFetch {
                            hosts: self.opts.image_hosts,
                            ..crate::docarray::HttpFetch::DATASET
                        },
                    };
                    let mut clocks = Clocks {
                        line: std::time::Instant::now(),
                        step: std::time::Instant::now(),
                    };
                    let run = std::panic::AssertUnwindSafe(|| {
                        super::fit::fit(&cfg, &control, &mut |ev| {
                            self.on_event(&name, ev, &mut clocks)
                        })
                    });
                    match std::panic::catch_unwind(run) {
                        Ok(Ok(report)) => Ok(Some(report)),
                        Ok(Err(e)) => Err(fit_outcome(e, resume)),
                        Err(p) => Err(format!(
                            "internal error: {}",
                            p.downcast_ref::<String>()
                                .map(String::as_str)
                                .or_else(|| p.downcast_ref::<&str>().copied())
                                .unwrap_or("panic")
                        )),
                    }
                })
        };
        let mut inner = self.lock();
        inner.running = inner.running.saturating_sub(1);
        if let Some(e) = inner.runs.get_mut(&name) {
            match outcome {
                Ok(report) => {
                    e.rec.state = State::Finished;
                    e.rec.details = "the artifact is ready".into();
                    if let Some(r) = report {
                        e.rec.result = RunResult {
                            before: r.before,
                            after: r.after,
                            epoch_metrics: r.epoch_metrics,
                            epoch_losses: r.epoch_losses,
                            eval_losses: r.eval_losses,
                            examples: r.examples,
                        };
                    } else {
                        e.rec.result = read_artifact_metrics(&artifact);
                    }
                    e.rec.finished_unix = Some(unix_now());
                    self.append_log(e, "finished");
                }
                Err(msg) if msg == CANCELED => {
                    e.rec.state = State::Canceled;
                    e.rec.details = format!("canceled at step {}", e.rec.progress.step);
                    e.rec.finished_unix = Some(unix_now());
                    self.append_log(e, &e.rec.details.clone());
                }
                Err(msg) if msg.starts_with(SUSPENDED) => {
                    e.rec.details =
                        format!("{msg} by a trainer shutdown; resumes when the trainer restarts");
                    self.append_log(e, &e.rec.details.clone());
                }
                Err(msg) => {
                    let msg = bounded(&self.datasets.redact_paths(&msg));
                    e.rec.state = State::Failed;
                    e.rec.details = msg.clone();
                    e.rec.finished_unix = Some(unix_now());
                    self.append_log(e, &format!("failed: {msg}"));
                }
            }
            let rec = e.rec.clone();
            self.persist(&rec);
            metrics::counter!("clipft_trainer_runs_ended_total", "state" => rec.state.word())
                .increment(1);
        }
        let ended = inner
            .runs
            .get(&name)
            .is_some_and(|e| matches!(e.rec.state, State::Failed | State::Canceled));
        self.publish_counts(&inner);
        drop(inner);
        if ended {
            self.drop_work(&name);
        }
        self.wake.notify_one();
    }

    /// Removes the checkpoints of a run that ended without an artifact: FAILED and CANCELED
    /// runs never resume, and each kept its weights and optimiser state (three times the
    /// model) until deleted.
    fn drop_work(&self, name: &str) {
        let work = self.run_dir(name).join("work");
        match std::fs::remove_dir_all(&work) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("{}: {e}", work.display()),
        }
    }

    /// Logs and progress from a running fit.
    fn on_event(&self, name: &str, ev: FitEvent, clocks: &mut Clocks) {
        let mut inner = self.lock();
        let Some(e) = inner.runs.get_mut(name) else {
            return;
        };
        let line = match ev {
            FitEvent::Started { pairs, steps, done } => {
                e.rec.progress.total_steps = steps;
                e.rec.progress.step = done;
                Some(format!("{pairs} pairs, {steps} steps ({done} done)"))
            }
            FitEvent::Log(l) => Some(l),
            FitEvent::Evaluating(w) => Some(format!("evaluating ({w})")),
            FitEvent::Checkpoint { .. } => {
                if e.rec.interruptions > 0 {
                    e.rec.interruptions = 0;
                    let rec = e.rec.clone();
                    self.persist(&rec);
                }
                None
            }
            FitEvent::Before(m) => {
                e.rec.result.before = Some(m);
                let rec = e.rec.clone();
                self.persist(&rec);
                None
            }
            FitEvent::Step {
                epoch,
                step,
                loss,
                lr,
            } => {
                let p = &mut e.rec.progress;
                let dt = clocks.line.elapsed();
                metrics::histogram!("clipft_trainer_step_seconds")
                    .record(clocks.step.elapsed().as_secs_f64());
                clocks.step = std::time::Instant::now();
                metrics::counter!("clipft_trainer_steps_total").increment(1);
                metrics::gauge!("clipft_trainer_loss", "run" => name.to_string()).set(loss as f64);
                p.step = step;
                p.epoch = epoch as u32 + 1;
                p.loss = loss;
                // A line per step would flood the log of a long run: every 10th step, the last,
                // and at least every 5 seconds.
                (step % 10 == 0 || step == p.total_steps || dt.as_secs() >= 5).then(|| {
                    clocks.line = std::time::Instant::now();
                    format!(
                        "epoch {} step {step}/{} loss {loss:.4} lr {lr:.3e}",
                        epoch + 1,
                        p.total_steps
                    )
                })
            }
            FitEvent::EpochEnd {
                epoch,
                train_loss,
                eval_loss,
                metrics,
            } => {
                e.rec.result.epoch_losses.push(train_loss);
                if let Some(l) = eval_loss {
                    e.rec.result.eval_losses.push(l);
                }
                if let Some(m) = metrics {
                    e.rec.result.epoch_metrics.push((epoch, m));
                }
                let rec = e.rec.clone();
                self.persist(&rec);
                let mut l = format!("epoch {}: train_loss {train_loss:.6}", epoch + 1);
                if let Some(v) = eval_loss {
                    l.push_str(&format!(" val_loss {v:.6}"));
                }
                if let Some(m) = metrics {
                    for (k, v) in m.named() {
                        l.push_str(&format!(" {k} {v:.6}"));
                    }
                }
                Some(l)
            }
        };
        if let Some(l) = line {
            let e = &inner.runs[name];
            self.append_log(e, &l);
        }
    }

    /// Shutdown: no new starts, running runs checkpoint and stop (they stay STARTED and resume
    /// in the next process); waits up to `timeout` for them.
    pub fn shutdown(&self, timeout: std::time::Duration) {
        self.lock().shutting_down = true;
        self.suspend.store(true, Ordering::Relaxed);
        self.wake.notify_one();
        let deadline = std::time::Instant::now() + timeout;
        let handles: Vec<_> =
            std::mem::take(&mut *self.workers.lock().unwrap_or_else(|p| p.into_inner()));
        for h in handles {
            while !h.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            if h.is_finished() {
                let _ = h.join();
            }
        }
    }
}

/// When a run last wrote a step line, and when its last step ended.
struct Clocks {
    line: std::time::Instant,
    step: std::time::Instant,
}

const CANCELED: &str = "canceled";
const SUSPENDED: &str = "suspended at step";

fn fit_outcome(e: FitError, resumed: bool) -> String {
    match e {
        FitError::Canceled => CANCELED.into(),
        FitError::Suspended(step) => format!("{SUSPENDED} {step}"),
        FitError::Checkpoint(c) if resumed => format!("cannot resume: {c}"),
        e => e.to_string(),
    }
}

/// before/after from an artifact's metrics.yml (a run whose record missed its end).
fn read_artifact_metrics(artifact: &Path) -> RunResult {
    #[derive(Deserialize)]
    struct M {
        before: Option<Metrics>,
        after: Option<Metrics>,
    }
    let m: Option<M> = std::fs::read_to_string(artifact.join("metrics.yml"))
        .ok()
        .and_then(|s| serde_yaml_ng::from_str(&s).ok());
    let examples = std::fs::read_to_string(artifact.join(crate::artifact::EXAMPLES_FILE))
        .ok()
        .and_then(|s| serde_yaml_ng::from_str(&s).ok())
        .unwrap_or_default();
    RunResult {
        before: m.as_ref().and_then(|m| m.before),
        after: m.and_then(|m| m.after),
        examples,
        ..Default::default()
    }
}

/// A random, readable run name such as `brisk-heron-4821`.
pub fn random_run_name() -> String {
    use rand::seq::SliceRandom;
    use rand::Rng;
    const A: &[&str] = &[
        "brisk", "calm", "eager", "gentle", "lucid", "nimble", "quiet", "sunny", "swift", "vivid",
        "bold", "keen",
    ];
    const N: &[&str] = &[
        "heron", "otter", "falcon", "maple", "comet", "river", "lynx", "cedar", "orbit", "willow",
        "badger", "quartz",
    ];
    let mut rng = rand::thread_rng();
    format!(
        "{}-{}-{:04}",
        A.choose(&mut rng).copied().unwrap_or("calm"),
        N.choose(&mut rng).copied().unwrap_or("heron"),
        rng.gen_range(0..10000)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_reasons_are_cut_at_a_character() {
        assert_eq!(bounded("short"), "short");
        let long = "é".repeat(MAX_LINE_BYTES);
        let cut = bounded(&long);
        assert!(cut.len() < MAX_LINE_BYTES + 40, "{}", cut.len());
        assert!(
            cut.ends_with(&format!("({} more bytes cut)", MAX_LINE_BYTES)),
            "{cut}"
        );
    }

    /// serde_json writes a NaN loss as `null`; it reads back as NaN, so a run whose loss went
    /// NaN still loads after a restart (it used to be skipped, its name taken for good).
    #[test]
    fn nan_losses_survive_a_round_trip() {
        let p = Progress {
            loss: f32::NAN,
            ..Default::default()
        };
        let json = serde_json::to_string(&p).expect("write");
        assert!(json.contains("null"), "{json}");
        let back: Progress = serde_json::from_str(&json).expect("read");
        assert!(back.loss.is_nan());
        let r = RunResult {
            epoch_losses: vec![f64::NAN, 1.5],
            eval_losses: vec![f64::INFINITY],
            ..Default::default()
        };
        let back: RunResult =
            serde_json::from_str(&serde_json::to_string(&r).expect("write")).expect("read");
        assert!(back.epoch_losses[0].is_nan() && back.epoch_losses[1] == 1.5);
        assert!(back.eval_losses[0].is_nan());
    }

    fn options(dir: &Path) -> RunnerOptions {
        RunnerOptions {
            device: "cpu".into(),
            min_free_bytes: 0,
            ..RunnerOptions::new(dir.to_path_buf())
        }
    }

    /// A run.json of a run that was training when its trainer stopped, with a checkpoint.
    fn started_run(dir: &Path, name: &str, interruptions: u32) {
        let rec = RunRecord {
            name: name.into(),
            state: State::Started,
            details: "training".into(),
            config: FitConfig {
                run_name: name.into(),
                ..Default::default()
            },
            created_unix: 1,
            started_unix: Some(1),
            finished_unix: None,
            progress: Progress::default(),
            result: RunResult::default(),
            seq: 0,
            interruptions,
        };
        let run = dir.join("runs").join(name);
        std::fs::create_dir_all(run.join("work")).unwrap();
        std::fs::write(run.join("work/checkpoint.bin"), b"weights").unwrap();
        std::fs::write(run.join("run.json"), serde_json::to_vec(&rec).unwrap()).unwrap();
    }

    /// A run the trainer keeps stopping in (killed, out of memory) before a new checkpoint
    /// resumes `max_interruptions` times, then fails; a checkpoint starts the count again.
    #[test]
    fn runs_that_keep_stopping_the_trainer_stop_resuming() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path();
        started_run(dir, "fresh", 0);
        started_run(dir, "again", 2);
        started_run(dir, "doomed", 3);
        let leftover = dir.join("runs/.deleted-old-7/work");
        std::fs::create_dir_all(&leftover).unwrap();
        let reg = Registry::open(options(dir)).unwrap();
        let fresh = reg.get("fresh").unwrap();
        assert_eq!((fresh.state, fresh.interruptions), (State::Started, 1));
        let again = reg.get("again").unwrap();
        assert_eq!((again.state, again.interruptions), (State::Started, 3));
        assert!(
            dir.join("runs/again/work").is_dir(),
            "it resumes from there"
        );
        let doomed = reg.get("doomed").unwrap();
        assert_eq!(doomed.state, State::Failed);
        assert!(
            doomed.details.contains("stopped 4 times in a row")
                && doomed.details.contains("batch_size"),
            "{}",
            doomed.details
        );
        assert!(doomed.finished_unix.is_some());
        assert!(
            !dir.join("runs/doomed/work").exists(),
            "its checkpoints are gone"
        );
        assert!(
            !dir.join("runs/.deleted-old-7").exists(),
            "an unfinished deletion is finished"
        );
        let mut clocks = Clocks {
            line: std::time::Instant::now(),
            step: std::time::Instant::now(),
        };
        reg.on_event("again", FitEvent::Checkpoint { step: 9 }, &mut clocks);
        assert_eq!(reg.get("again").unwrap().interruptions, 0);
        drop(reg);
        // Each of those states is on disk: the next start sees them.
        let reg = Registry::open(options(dir)).unwrap();
        assert_eq!(reg.get("again").unwrap().interruptions, 1);
        assert_eq!(reg.get("fresh").unwrap().interruptions, 2);
        assert_eq!(reg.get("doomed").unwrap().state, State::Failed);
    }

    /// What a run may ask for is bounded before anything is read: the batch by
    /// `max_batch_size`, the whole configuration by MAX_CONFIG_BYTES.
    #[test]
    fn run_configurations_are_bounded() {
        let root = tempfile::tempdir().unwrap();
        let reg = Registry::open(RunnerOptions {
            max_batch_size: 256,
            ..options(root.path())
        })
        .unwrap();
        let config = |batch_size: usize, model: String| FitConfig {
            model,
            train_data: "train".into(),
            batch_size,
            ..Default::default()
        };
        let e = reg
            .create(Some("big".into()), None, config(257, "m".into()))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("batch_size 257") && e.contains("--max-batch-size"),
            "{e}"
        );
        let e = reg
            .create(
                Some("long".into()),
                None,
                config(8, "m".repeat(MAX_CONFIG_BYTES)),
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("bytes as JSON"), "{e}");
        // Within both, the next check speaks: the dataset does not exist.
        let e = reg
            .create(Some("ok".into()), None, config(256, "m".into()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("train"), "{e}");
        assert!(reg.list(None).unwrap().is_empty());
    }

    /// `allowed_models` names what runs may start from, by any of its names.
    #[test]
    fn only_allowed_models_are_trained() {
        let root = tempfile::tempdir().unwrap();
        let reg = Registry::open(RunnerOptions {
            allowed_models: vec!["clip-base-en".into(), "/models/ours".into()],
            ..options(root.path())
        })
        .unwrap();
        let config = |model: &str| FitConfig {
            model: model.into(),
            train_data: "train".into(),
            ..Default::default()
        };
        let e = reg
            .create(None, None, config("someone/huge-clip"))
            .unwrap_err();
        assert!(matches!(e, RunError::ModelNotAllowed(..)), "{e}");
        let e = e.to_string();
        assert!(
            e.contains("--allowed-models: clip-base-en, /models/ours"),
            "{e}"
        );
        // Allowed, by the repo id behind the Finetuner name: the next check speaks.
        for m in [
            "openai/clip-vit-base-patch32",
            "clip-base-en",
            "/models/ours",
        ] {
            let e = reg.create(None, None, config(m)).unwrap_err();
            assert!(!matches!(e, RunError::ModelNotAllowed(..)), "{m}: {e}");
        }
    }

    /// A run.json of a run in `state`, in `experiment`, starting from `from`'s artifact.
    fn record(
        dir: &Path,
        name: &str,
        state: State,
        experiment: &str,
        from: Option<&str>,
        seq: u64,
    ) {
        let rec = RunRecord {
            name: name.into(),
            state,
            details: String::new(),
            config: FitConfig {
                run_name: name.into(),
                experiment_name: experiment.into(),
                model_artifact: from.map(String::from),
                ..Default::default()
            },
            created_unix: 1,
            started_unix: None,
            finished_unix: None,
            progress: Progress::default(),
            result: RunResult::default(),
            seq,
            interruptions: 0,
        };
        let run = dir.join("runs").join(name);
        std::fs::create_dir_all(&run).unwrap();
        std::fs::write(run.join("run.json"), serde_json::to_vec(&rec).unwrap()).unwrap();
    }

    /// model_artifact names a FINISHED run of this trainer; a run others will start from
    /// cannot be deleted (alone or with its experiment) until they have ended; an experiment
    /// holding both goes whole; the runner reads the artifact from the named run's folder.
    #[test]
    fn runs_started_from_an_artifact_keep_it() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path();
        record(dir, "base", State::Finished, "a", None, 0);
        record(dir, "next", State::Created, "b", Some("base"), 1);
        record(dir, "inner", State::Finished, "b", None, 2);
        record(dir, "user", State::Created, "b", Some("inner"), 3);
        let reg = Registry::open(options(dir)).unwrap();
        let config = |from: &str| FitConfig {
            train_data: "train".into(),
            model_artifact: Some(from.into()),
            ..Default::default()
        };
        for (from, want) in [
            ("nope", "no run of that name"),
            (
                "next",
                "the run is CREATED; only a FINISHED run has an artifact",
            ),
            ("../../etc", "no run of that name"),
        ] {
            let e = reg.create(None, None, config(from)).unwrap_err();
            assert!(matches!(e, RunError::BadConfig(_)), "{e}");
            assert!(e.to_string().contains(want), "{from}: {e}");
        }
        // Named FINISHED run: the next check speaks (the dataset does not exist).
        let e = reg.create(None, None, config("base")).unwrap_err();
        assert!(matches!(e, RunError::Dataset(_)), "{e}");
        // ...unless the run names another model than the artifact was trained from.
        let other = FitConfig {
            model: "someone/other-clip".into(),
            ..config("base")
        };
        let e = reg.create(None, None, other).unwrap_err().to_string();
        assert!(e.contains("was trained from"), "{e}");
        // Settings out of range are refused when the run is created, not when it starts.
        let bad = FitConfig {
            val_split: 1.5,
            ..config("base")
        };
        let e = reg.create(None, None, bad).unwrap_err().to_string();
        assert!(e.contains("--val-split"), "{e}");

        let e = reg.delete("base").unwrap_err();
        assert!(
            matches!(&e, RunError::ArtifactInUse { users, .. } if users == &["next"]),
            "{e}"
        );
        let e = reg.delete_experiment("a").unwrap_err();
        assert!(matches!(e, RunError::ArtifactInUse { .. }), "{e}");
        assert!(reg.get("base").is_ok() && dir.join("runs/base").is_dir());
        // Experiment b holds "inner" and the run that starts from it: it goes whole, and then
        // "base" has no user left.
        reg.delete_experiment("b").unwrap();
        assert!(reg.get("inner").is_err() && reg.get("user").is_err());
        reg.delete("base").unwrap();
    }
}
