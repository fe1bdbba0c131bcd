//! `clipft fit`: fine-tune CLIP and write the artifact, in process or, with `--trainer`, on a
//! trainer service (local data files are pushed as datasets first; `--follow` streams the logs
//! and downloads the artifact when the run finishes).

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;

use crate::trainer::callbacks::{Mode, Monitor};
use crate::trainer::fit::{fit, EarlyStopping, FitConfig, FitControl, FitError, FitEvent};
use crate::trainer::optim::OptimizerKind;
use crate::trainer::schedule::Scheduler;

#[derive(Args, Debug)]
pub struct FitArgs {
    /// The backbone: Hugging Face repo id or local folder.
    #[arg(long, env = "CLIPFT_MODEL", default_value = super::DEFAULT_MODEL)]
    pub model: String,
    /// Continue from an earlier run's artifact instead of the backbone's weights (Finetuner's
    /// model_artifact): an artifact folder or zip, or the name of a run whose artifact is in
    /// --output; with --trainer, the name of a FINISHED run on that trainer. `--model` still
    /// names the backbone (a Finetuner artifact holds no configuration or tokenizer).
    #[arg(long, env = "CLIPFT_MODEL_ARTIFACT")]
    pub model_artifact: Option<String>,
    /// Caption-image pairs: Finetuner-style CSV or a docarray v1 file.
    #[arg(long, env = "CLIPFT_TRAIN_DATA")]
    pub train_data: PathBuf,
    /// Pairs for the validation loss after each epoch.
    #[arg(long, env = "CLIPFT_EVAL_DATA")]
    pub eval_data: Option<PathBuf>,
    /// Without --eval-data: hold this fraction of the training pairs out for the validation
    /// loss (a choice seeded by --seed; Finetuner's val_split). Ignored with --eval-data.
    #[arg(long, env = "CLIPFT_VAL_SPLIT", default_value_t = 0.0, value_parser = fraction)]
    pub val_split: f64,
    /// Evaluate a sample of this many queries (seeded by --seed, the same before, between
    /// epochs and after) when the query data holds more (Finetuner's query_sample_size).
    #[arg(long, env = "CLIPFT_QUERY_SAMPLE_SIZE", value_parser = clap::value_parser!(u64).range(1..))]
    pub query_sample_size: Option<u64>,
    /// How the retrieval metrics order matches (Finetuner's EvaluationCallback distance).
    #[arg(long, env = "CLIPFT_DISTANCE", value_parser = super::choice(&crate::eval::Distance::CHOICES), default_value = "cosine")]
    pub distance: crate::eval::Distance,
    /// Labelled text queries for the retrieval metrics before and after training.
    #[arg(long, env = "CLIPFT_QUERY_DATA", requires = "index_data")]
    pub query_data: Option<PathBuf>,
    /// Labelled images for the retrieval metrics before and after training.
    #[arg(long, env = "CLIPFT_INDEX_DATA", requires = "query_data")]
    pub index_data: Option<PathBuf>,
    /// Name of the run and of its artifact folder; random and readable by default.
    #[arg(long, env = "CLIPFT_RUN_NAME")]
    pub run_name: Option<String>,
    /// The experiment the run belongs to (Finetuner's experiment_name): a trainer lists and
    /// deletes runs by experiment, creating one on its first run; the artifact's metadata
    /// names it.
    #[arg(long, env = "CLIPFT_EXPERIMENT", default_value = crate::trainer::fit::DEFAULT_EXPERIMENT, value_parser = safe_name)]
    pub experiment: String,
    /// What the run tries, in your words (Finetuner's description): kept in its configuration
    /// (config.yml). At most 4096 bytes.
    #[arg(long, env = "CLIPFT_DESCRIPTION", default_value = "", value_parser = description)]
    pub description: String,
    /// Passes over the training data.
    #[arg(long, env = "CLIPFT_EPOCHS", default_value_t = 5)]
    pub epochs: usize,
    /// Pairs per training step; CLIPLoss contrasts each pair with the others in its batch, so
    /// larger batches give it more negatives (at least 2).
    #[arg(long, env = "CLIPFT_BATCH_SIZE", default_value_t = 64)]
    pub batch_size: usize,
    /// The optimiser's learning rate (positive; 1e-5 to 1e-6 suits fine-tuning CLIP).
    #[arg(long, env = "CLIPFT_LEARNING_RATE", default_value_t = 1e-5, value_parser = positive_f64)]
    pub learning_rate: f64,
    /// The loss; CLIPLoss is the one for CLIP.
    #[arg(long, env = "CLIPFT_LOSS", default_value = "CLIPLoss", value_parser = ["CLIPLoss"])]
    pub loss: String,
    /// Adam (Finetuner's default) or AdamW (decoupled weight decay).
    #[arg(long, env = "CLIPFT_OPTIMIZER", value_parser = super::choice(&OptimizerKind::CHOICES), default_value = "Adam")]
    pub optimizer: OptimizerKind,
    /// Weight decay (L2 for Adam, decoupled for AdamW).
    #[arg(long, env = "CLIPFT_WEIGHT_DECAY", default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Layer-wise learning-rate decay (Finetuner's optimizer_options layer_wise_lr_decay,
    /// "recommended for CLIP"): in each tower block i of L trains at decay^(L-i) of the rate,
    /// the embeddings at decay^(L+1), the projections at the full rate. Within (0, 1].
    #[arg(long, env = "CLIPFT_LAYER_WISE_LR_DECAY", value_parser = positive_f64)]
    pub layer_wise_lr_decay: Option<f64>,
    /// Learning-rate schedule after the warm-up.
    #[arg(long, env = "CLIPFT_SCHEDULER", value_parser = super::choice(&Scheduler::CHOICES), default_value = "constant")]
    pub scheduler: Scheduler,
    /// Steps over which the learning rate rises linearly from 0.
    #[arg(long, env = "CLIPFT_WARMUP_STEPS", default_value_t = 0)]
    pub warmup_steps: u64,
    /// Stop after this many optimiser steps.
    #[arg(long, env = "CLIPFT_MAX_STEPS")]
    pub max_steps: Option<u64>,
    /// Seeds the shuffling, so a run (and its resumption) sees the same batches.
    #[arg(long, env = "CLIPFT_SEED", default_value_t = 0)]
    pub seed: u64,
    /// Keep the file order instead of shuffling every epoch.
    #[arg(long, env = "CLIPFT_NO_SHUFFLE")]
    pub no_shuffle: bool,
    /// `auto` (the first GPU when built with CUDA and one is present, else the CPU), `cpu`,
    /// `cuda` or `cuda:N`.
    #[arg(long, env = "CLIPFT_DEVICE", default_value = "auto")]
    pub device: String,
    /// `--matmul-precision` for training (`highest` keeps every product plain f32); with `--trainer` the trainer's own setting applies.
    #[command(flatten)]
    pub matmul: super::MatmulArgs,
    /// Training compute dtype: auto (bf16 on a GPU, f32 on the CPU; serving's auto is f16 on a
    /// GPU), f32, bf16 or f16 (with dynamic loss scaling). Weights and optimiser state stay f32.
    #[arg(long, env = "CLIPFT_DTYPE", default_value = "auto", value_parser = ["auto", "f32", "bf16", "f16"])]
    pub dtype: String,
    /// Artifacts land in `OUTPUT/<run-name>/`.
    #[arg(long, env = "CLIPFT_OUTPUT", default_value = "artifacts")]
    pub output: PathBuf,
    /// Matches per query in the before/after evaluation.
    #[arg(long, env = "CLIPFT_LIMIT", default_value_t = 20)]
    pub limit: usize,
    /// Keep the top matches of the first N queries before and after training (Finetuner's
    /// gather_examples): printed after the metrics, in the artifact's example-results.yml.
    /// Like --limit, it applies to the evaluation that --query-data and --index-data ask for.
    #[arg(long, env = "CLIPFT_EXAMPLE_QUERIES", default_value_t = 0)]
    pub example_queries: usize,
    /// Weights not to train: name prefixes of whole components (`text_model`,
    /// `vision_model.encoder.layers.0`, ...) or `backbone` (everything but the projections and
    /// logit_scale). Repeatable.
    #[arg(long, env = "CLIPFT_FREEZE", value_delimiter = ',')]
    pub freeze: Vec<String>,
    /// Clip the global gradient norm (off by default, as in Finetuner).
    #[arg(long, env = "CLIPFT_MAX_GRAD_NORM")]
    pub max_grad_norm: Option<f64>,
    /// Also write the artifact as `OUTPUT/<run-name>.zip`.
    #[arg(long, env = "CLIPFT_ZIP")]
    pub zip: bool,
    /// Retrieval metrics on the query/index data every N epochs (Finetuner's
    /// EvaluationCallback); 0: only before and after.
    #[arg(long, env = "CLIPFT_EVAL_EVERY", default_value_t = 1)]
    pub eval_every: usize,
    /// BestModelCheckpoint: keep the weights of the best epoch by this value (train_loss,
    /// val_loss, or a retrieval metric such as recall_at_k) instead of the last.
    #[arg(long, env = "CLIPFT_BEST_MODEL_MONITOR")]
    pub best_model_monitor: Option<String>,
    /// Whether larger (max) or smaller (min) values of the monitor are better; auto: min for
    /// losses, max for retrieval metrics.
    #[arg(
        long,
        env = "CLIPFT_BEST_MODEL_MODE",
        value_parser = super::choice(&Mode::CHOICES),
        default_value = "auto"
    )]
    pub best_model_mode: Mode,
    /// EarlyStopping: stop when this value has not improved for --early-stopping-patience
    /// epochs.
    #[arg(long, env = "CLIPFT_EARLY_STOPPING_MONITOR")]
    pub early_stopping_monitor: Option<String>,
    /// As --best-model-mode, for the early-stopping monitor.
    #[arg(
        long,
        env = "CLIPFT_EARLY_STOPPING_MODE",
        value_parser = super::choice(&Mode::CHOICES),
        default_value = "auto"
    )]
    pub early_stopping_mode: Mode,
    /// Epochs without improvement before the run stops.
    #[arg(long, env = "CLIPFT_EARLY_STOPPING_PATIENCE", default_value_t = 2)]
    pub early_stopping_patience: usize,
    /// Smallest change that counts as an improvement.
    #[arg(long, env = "CLIPFT_EARLY_STOPPING_MIN_DELTA", default_value_t = 0.0)]
    pub early_stopping_min_delta: f64,
    /// Compare every epoch against this value instead of the best so far.
    #[arg(long, env = "CLIPFT_EARLY_STOPPING_BASELINE")]
    pub early_stopping_baseline: Option<f64>,
    /// WiSE-FT: the artifact holds alpha * fine-tuned + (1 - alpha) * pretrained weights.
    #[arg(long, env = "CLIPFT_WISE_FT_ALPHA")]
    pub wise_ft_alpha: Option<f64>,
    /// TrainingCheckpoint: a resumable checkpoint every N seconds, at every epoch end and when
    /// Ctrl-C or SIGTERM stops the run (in `OUTPUT/.<run-name>.work/`, removed once the
    /// artifact is written). 0 keeps none. Default 300 in process; with --trainer, the
    /// trainer's --checkpoint-seconds.
    #[arg(long, env = "CLIPFT_CHECKPOINT_SECONDS")]
    pub checkpoint_seconds: Option<u64>,
    /// Also write each submodel's tower as `model.onnx` (Finetuner's to_onnx), for ONNX
    /// Runtime and clip-as-service's ONNX executor; the safetensors stay beside it.
    #[arg(long, env = "CLIPFT_TO_ONNX")]
    pub to_onnx: bool,
    /// Continue the run `--run-name` from its checkpoint (after a crash, Ctrl-C or SIGTERM),
    /// with the same settings it started with.
    #[arg(long, env = "CLIPFT_RESUME", requires = "run_name")]
    pub resume: bool,
    /// Where datasets named instead of given as files are found (the trainer's --data-dir).
    #[arg(long, env = "CLIPFT_DATA_DIR", default_value = super::trainer::DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// Submit the run to this trainer (`grpc://host:8081`) instead of training here. Data
    /// files are pushed as datasets `<run-name>-train` etc.; other values name datasets the
    /// trainer already has.
    #[arg(long, env = "CLIPFT_TRAINER")]
    pub trainer: Option<String>,
    /// With --trainer: stream the run's logs until it ends, then download the artifact into
    /// OUTPUT.
    #[arg(long, env = "CLIPFT_FOLLOW", requires = "trainer")]
    pub follow: bool,
    /// The trainer's bearer token.
    #[arg(long, env = "CLIPFT_AUTH_TOKEN", hide_env_values = true)]
    pub auth_token: Option<String>,
    /// A CA certificate (PEM) to trust for a grpcs:// trainer, besides the system's roots.
    #[arg(long, env = "CLIPFT_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
}

/// A name that becomes a folder or a label on the trainer: letters, digits, '-', '_' and '.'.
pub(super) fn safe_name(s: &str) -> Result<String, String> {
    match crate::artifact::is_safe_name(s) {
        true => Ok(s.to_string()),
        false => {
            Err("use letters, digits, '-', '_' and '.', at most 128, not starting with '.'".into())
        }
    }
}

/// A run description within [`crate::trainer::fit::MAX_DESCRIPTION_BYTES`].
fn description(s: &str) -> Result<String, String> {
    let max = crate::trainer::fit::MAX_DESCRIPTION_BYTES;
    match s.len() <= max {
        true => Ok(s.to_string()),
        false => Err(format!("{} bytes; at most {max}", s.len())),
    }
}

/// A fraction of the data: within [0, 1).
fn fraction(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if (0.0..1.0).contains(&v) => Ok(v),
        Ok(v) => Err(format!("must be within [0, 1), not {v}")),
        Err(e) => Err(e.to_string()),
    }
}

/// A learning rate must be a positive, finite number: a negative one would train away from the
/// data without a word.
fn positive_f64(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(v),
        Ok(v) => Err(format!("must be a positive number, not {v}")),
        Err(e) => Err(e.to_string()),
    }
}

impl FitArgs {
    pub fn config(&self) -> anyhow::Result<FitConfig> {
        let monitor = |name: &Option<String>, mode| -> anyhow::Result<Option<Monitor>> {
            name.as_deref()
                .map(|n| Monitor::new(n, mode).map_err(anyhow::Error::msg))
                .transpose()
        };
        Ok(FitConfig {
            model: self.model.clone(),
            model_artifact: self.model_artifact.clone(),
            train_data: self.train_data.clone(),
            eval_data: self.eval_data.clone(),
            val_split: self.val_split,
            query_data: self.query_data.clone(),
            index_data: self.index_data.clone(),
            run_name: self
                .run_name
                .clone()
                .unwrap_or_else(crate::trainer::runs::random_run_name),
            experiment_name: self.experiment.clone(),
            description: self.description.clone(),
            epochs: self.epochs,
            batch_size: self.batch_size,
            learning_rate: self.learning_rate,
            optimizer: self.optimizer,
            weight_decay: self.weight_decay,
            layer_wise_lr_decay: self.layer_wise_lr_decay,
            scheduler: self.scheduler,
            warmup_steps: self.warmup_steps,
            max_steps: self.max_steps,
            seed: self.seed,
            shuffle: !self.no_shuffle,
            device: self.device.clone(),
            output: self.output.clone(),
            limit: self.limit,
            query_sample_size: self.query_sample_size.map(|n| n as usize),
            distance: self.distance,
            example_queries: self.example_queries,
            freeze: self.freeze.clone(),
            max_grad_norm: self.max_grad_norm,
            zip: self.zip,
            eval_every: self.eval_every,
            best_model: monitor(&self.best_model_monitor, self.best_model_mode)?,
            early_stopping: monitor(&self.early_stopping_monitor, self.early_stopping_mode)?.map(
                |monitor| EarlyStopping {
                    monitor,
                    patience: self.early_stopping_patience,
                    min_delta: self.early_stopping_min_delta,
                    baseline: self.early_stopping_baseline,
                },
            ),
            wise_ft_alpha: self.wise_ft_alpha,
            dtype: self.dtype.clone(),
            checkpoint_seconds: match (self.checkpoint_seconds, &self.trainer) {
                (Some(0), _) => None,
                (Some(n), _) => Some(n),
                (None, None) => Some(crate::trainer::checkpoint::DEFAULT_CHECKPOINT_SECONDS),
                (None, Some(_)) => None,
            },
            to_onnx: self.to_onnx,
        })
    }
}

/// A data argument: an existing file, or the name of a dataset in `data_dir`.
fn resolve_local(p: &Path, data_dir: &Path) -> anyhow::Result<PathBuf> {
    if p.exists() {
        return Ok(p.to_path_buf());
    }
    let name = p.to_string_lossy();
    if crate::artifact::is_safe_name(&name) {
        if let Ok(store) = crate::trainer::datasets::DatasetStore::open(data_dir, u64::MAX, 0) {
            if let Ok(f) = store.data_file(&name) {
                return Ok(f);
            }
        }
    }
    anyhow::bail!(
        "{}: no such file, and no dataset of that name in {}",
        p.display(),
        data_dir.display()
    )
}

/// `--model-artifact` without a trainer: an existing folder or zip, or a run name whose
/// artifact is in `output` (where `fit` wrote it).
fn local_artifact(a: &str, output: &Path) -> anyhow::Result<String> {
    if Path::new(a).exists() {
        return Ok(a.to_string());
    }
    if crate::artifact::is_safe_name(a) {
        for p in [output.join(a), crate::artifact::zip_path(&output.join(a))] {
            if p.exists() {
                return Ok(p.display().to_string());
            }
        }
    }
    anyhow::bail!(
        "--model-artifact {a}: no such folder or zip, and no artifact of that run in {}",
        output.display()
    )
}

/// Runs `cfg` in process with a progress bar on a terminal and plain log lines otherwise;
/// prints the before/after table.
pub fn run_with_progress(
    cfg: &FitConfig,
    control: &FitControl,
) -> anyhow::Result<crate::trainer::fit::FitReport> {
    let mut bar: Option<indicatif::ProgressBar> = None;
    let say = |bar: &Option<indicatif::ProgressBar>, line: String| match bar {
        Some(b) => b.println(line),
        None => errln!("{line}"),
    };
    let report = fit(cfg, control, &mut |e| match e {
        FitEvent::Started { pairs, steps, done } => {
            errln!("run {}: {pairs} pairs, {steps} steps", cfg.run_name);
            bar = super::eval::progress_bar(steps as usize);
            if let Some(b) = &bar {
                b.set_position(done);
            }
        }
        FitEvent::Log(line) => say(&bar, line),
        FitEvent::Evaluating(when) => say(&bar, format!("evaluating ({when})")),
        FitEvent::Before(_) | FitEvent::Checkpoint { .. } => {}
        FitEvent::Step {
            epoch,
            step,
            loss,
            lr,
        } => match &bar {
            Some(b) => {
                b.set_message(format!("epoch {} loss {loss:.4}", epoch + 1));
                b.set_position(step);
            }
            None if step % 10 == 0 => {
                errln!("epoch {} step {step} loss {loss:.4} lr {lr:.2e}", epoch + 1)
            }
            None => {}
        },
        FitEvent::EpochEnd {
            epoch,
            train_loss,
            eval_loss,
            metrics,
        } => {
            let ev = eval_loss.map_or(String::new(), |l| format!(", eval loss {l:.4}"));
            let m = metrics.map_or(String::new(), |m| {
                format!(
                    ", recall_at_k {:.4}, reciprocal_rank {:.4}",
                    m.recall_at_k, m.reciprocal_rank
                )
            });
            say(
                &bar,
                format!("epoch {}: train loss {train_loss:.4}{ev}{m}", epoch + 1),
            );
        }
    })?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if let (Some(b), Some(a)) = (&report.before, &report.after) {
        outln!(
            "{}",
            super::eval::metrics_table(&[("before", b), ("after", a)])
        );
    }
    super::output::out_raw(&super::eval::examples_text(&report.examples));
    outln!("artifact: {}", report.artifact.display());
    Ok(report)
}

pub fn run(args: FitArgs) -> anyhow::Result<()> {
    args.matmul.apply();
    let mut cfg = args.config()?;
    match args.trainer.clone() {
        Some(addr) => super::runtime()?.block_on(run_remote(&args, cfg, &addr)),
        None => {
            cfg.train_data = resolve_local(&cfg.train_data, &args.data_dir)?;
            if let Some(a) = &cfg.model_artifact {
                cfg.model_artifact = Some(local_artifact(a, &cfg.output)?);
            }
            for slot in [&mut cfg.eval_data, &mut cfg.query_data, &mut cfg.index_data] {
                if let Some(p) = slot.as_ref() {
                    *slot = Some(resolve_local(p, &args.data_dir)?);
                }
            }
            let work = crate::trainer::fit::local_work_dir(&cfg);
            if args.resume && !crate::trainer::checkpoint::exists(&work) {
                anyhow::bail!(
                    "run {} has no checkpoint to resume in {}: run without --resume to start it",
                    cfg.run_name,
                    work.display()
                );
            }
            let control = FitControl {
                resume: args.resume,
                ..Default::default()
            };
            suspend_on_signals(control.suspend.clone())?;
            match run_with_progress(&cfg, &control) {
                Ok(_) => Ok(()),
                Err(e) => match e.downcast_ref::<FitError>() {
                    Some(FitError::Suspended(step)) => {
                        match cfg.checkpoint_seconds {
                            Some(_) => errln!(
                                "stopped at step {step}; checkpoint saved in {}. Continue with the same command plus --resume --run-name {}",
                                work.display(),
                                cfg.run_name
                            ),
                            None => errln!(
                                "stopped at step {step}; no checkpoint was kept (--checkpoint-seconds 0)"
                            ),
                        }
                        Err(super::output::Interrupted.into())
                    }
                    _ => Err(e),
                },
            }
        }
    }
}

/// Makes Ctrl-C and SIGTERM stop a local run gracefully: the flag makes `fit` checkpoint before
/// its next step and return. A second Ctrl-C quits at once (losing the steps since the last
/// checkpoint), for a user who does not want to wait for the step to end.
fn suspend_on_signals(flag: std::sync::Arc<std::sync::atomic::AtomicBool>) -> anyhow::Result<()> {
    use std::sync::atomic::Ordering;
    use tokio::signal::unix::{signal, SignalKind};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Registered before returning, so a signal from now on is caught.
    let (mut int, mut term) = {
        let _entered = rt.enter();
        (
            signal(SignalKind::interrupt())?,
            signal(SignalKind::terminate())?,
        )
    };
    std::thread::Builder::new()
        .name("clipft-signals".into())
        .spawn(move || {
            rt.block_on(async move {
                loop {
                    tokio::select! {
                        _ = int.recv() => {}
                        _ = term.recv() => {}
                    }
                    if flag.swap(true, Ordering::SeqCst) {
                        errln!("stopping now, without a checkpoint");
                        std::process::exit(130);
                    }
                    errln!("stopping after this step and saving a checkpoint (Ctrl-C again quits at once)");
                }
            })
        })?;
    Ok(())
}

/// Submits the run to a trainer; with --follow, waits for it and fetches the artifact.
async fn run_remote(args: &FitArgs, mut cfg: FitConfig, addr: &str) -> anyhow::Result<()> {
    use crate::trainer::client;
    let mut c = client::connect(addr, args.auth_token.as_deref(), args.tls_ca.as_deref()).await?;
    let name = cfg.run_name.clone();
    if c.get_run(crate::protocol::trainer::GetRunRequest {
        name: name.clone(),
        experiment: String::new(),
    })
    .await
    .is_ok()
    {
        anyhow::bail!("run {name:?} already exists on {addr}; choose another --run-name");
    }
    // Local files travel as datasets named after the run; anything else names a dataset.
    let roles: [(&str, &mut Option<PathBuf>); 4] = [
        ("train", &mut Some(cfg.train_data.clone())),
        ("eval", &mut cfg.eval_data),
        ("query", &mut cfg.query_data),
        ("index", &mut cfg.index_data),
    ];
    // Datasets an earlier run of this name pushed (they are replaced, and the user is told).
    let existing = client::dataset_names(&mut c).await?;
    let mut train = None;
    for (role, slot) in roles {
        let Some(p) = slot.clone() else { continue };
        if p.is_file() {
            let ds = format!("{name}-{role}");
            if existing.contains(&ds) {
                errln!("dataset {ds} exists (pushed for an earlier run {name}): replacing it");
            }
            errln!("pushing {} as dataset {ds}", p.display());
            let d = client::push_dataset(&mut c, &ds, &p, true)
                .await
                .with_context(|| format!("pushing {}", p.display()))?;
            errln!("dataset {ds}: {} items, {} bytes", d.items, d.bytes);
            *slot = Some(PathBuf::from(ds));
        }
        if role == "train" {
            train = slot.clone();
        }
    }
    if let Some(t) = train {
        cfg.train_data = t;
    }
    let run = c
        .create_run(crate::protocol::trainer::CreateRunRequest {
            name: name.clone(),
            config_json: serde_json::to_string(&cfg)?,
            experiment: cfg.experiment_name.clone(),
        })
        .await?
        .into_inner();
    outln!("run {} {}", run.name, client::state_word(run.state));
    if !args.follow {
        if args.zip {
            errln!(
                "--zip: the artifact is made on the trainer; download it with --follow, or later with `clipft runs artifact {} --zip`",
                run.name
            );
        }
        return Ok(());
    }
    let dir = follow_run(&mut c, &run.name, &args.output).await?;
    if args.zip {
        let zip = crate::artifact::zip_artifact(&dir)?;
        outln!("zip: {}", zip.display());
    }
    Ok(())
}

/// Streams a run's log until it ends; prints the metrics and downloads the artifact when it
/// finished, fails when it did not.
pub async fn follow_run(
    c: &mut crate::trainer::client::Client,
    name: &str,
    output: &Path,
) -> anyhow::Result<PathBuf> {
    use crate::protocol::trainer as pb;
    use crate::trainer::client;
    let mut bar: Option<indicatif::ProgressBar> = None;
    let mut on_chunk = |chunk: &pb::LogChunk| {
        if let Some(p) = &chunk.progress {
            if bar.is_none() && p.total_steps > 0 {
                bar = super::eval::progress_bar(p.total_steps as usize);
            }
            if let Some(b) = &bar {
                b.set_position(p.step);
                b.set_message(format!("epoch {} loss {:.4}", p.epoch, p.loss));
            }
        }
        for line in chunk.text.lines() {
            match &bar {
                Some(b) => b.println(line),
                None => errln!("{line}"),
            }
        }
        std::ops::ControlFlow::Continue(())
    };
    let logs = client::stream_logs(c, name, true, &mut on_chunk);
    super::output::follow_or_detach(name, async { Ok(logs.await?) }).await?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let run = c
        .get_run(pb::GetRunRequest {
            name: name.into(),
            experiment: String::new(),
        })
        .await?
        .into_inner();
    if run.state != pb::RunState::Finished as i32 {
        anyhow::bail!(
            "run {name} {}: {}",
            client::state_word(run.state),
            run.details
        );
    }
    let m = c
        .get_metrics(pb::GetMetricsRequest { name: name.into() })
        .await?
        .into_inner();
    if let (Some(b), Some(a)) = (
        client::metrics_from_map(&m.before),
        client::metrics_from_map(&m.after),
    ) {
        outln!(
            "{}",
            super::eval::metrics_table(&[("before", &b), ("after", &a)])
        );
    }
    super::output::out_raw(&super::eval::examples_text(&client::examples_from(&m)));
    let dir = client::download_artifact(c, name, output, &mut |_, _| {}).await?;
    outln!("artifact: {}", dir.display());
    Ok(dir)
}
