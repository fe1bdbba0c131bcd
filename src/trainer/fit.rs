//! A training run: read the pairs, fine-tune for the configured epochs with the schedule, run
//! the callbacks at each epoch end (evaluation, BestModelCheckpoint, EarlyStopping,
//! TrainingCheckpoint), apply WiSE-FT, measure retrieval before and after, and write the artifact.
//! `clipft fit` without `--trainer` calls [`fit`] in process; the trainer service runs the same
//! function on its worker threads, with a [`FitControl`] to cancel and resume.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rayon::prelude::*;

use super::callbacks::{BestModel, EarlyStopper, EpochValues, Monitor};
use super::checkpoint::{self, CheckpointError, RunState};
use super::optim::{Optimizer, OptimizerKind, OptimizerParams};
use super::schedule::{learning_rate, Scheduler};
use super::train::TrainModel;
use crate::docarray::{open_pairs, read_labeled, DataError, Modality, Pair};
use crate::eval::{evaluate_model, Distance, EvalRunError, Metrics};
use crate::model::{device, Encoder, LoadOptions, ModelError, ModelFiles, Towers};

/// Everything a run is configured with (written to the artifact's config.yml, and kept by the
/// trainer service to run or resume it).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FitConfig {
    pub model: String,
    /// Finetuner's `model_artifact`: continue from an earlier run's artifact instead of
    /// `model`'s weights (`model` still names the backbone, whose files a Finetuner artifact
    /// lacks). Here a folder or zip; on a trainer, the name of one of its FINISHED runs, which
    /// it turns into that run's artifact folder.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_artifact: Option<String>,
    pub train_data: PathBuf,
    pub eval_data: Option<PathBuf>,
    /// Finetuner's `val_split`: without `eval_data`, this fraction of the training pairs
    /// (a seeded choice) is held out for the validation loss instead of trained on. Ignored
    /// with `eval_data`, as Finetuner ignored it.
    #[serde(skip_serializing_if = "is_zero")]
    pub val_split: f64,
    pub query_data: Option<PathBuf>,
    pub index_data: Option<PathBuf>,
    pub run_name: String,
    /// Finetuner's experiment, the group the run is listed under on a trainer (and named in
    /// the artifact's metadata).
    pub experiment_name: String,
    /// Finetuner's run description: what the run tries, in the user's words (at most
    /// [`MAX_DESCRIPTION_BYTES`]).
    pub description: String,
    pub epochs: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub optimizer: OptimizerKind,
    pub weight_decay: f64,
    /// Finetuner's `optimizer_options={'layer_wise_lr_decay': d}`: block `i` of `L` trains at
    /// `d^(L - i)` of the learning rate, the embeddings at `d^(L + 1)`
    /// ([`super::optim::Optimizer::with_layer_decay`]). None: one rate for all.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layer_wise_lr_decay: Option<f64>,
    pub scheduler: Scheduler,
    pub warmup_steps: u64,
    pub max_steps: Option<u64>,
    pub seed: u64,
    pub shuffle: bool,
    pub device: String,
    pub output: PathBuf,
    /// Matches per query in the before/after evaluation.
    pub limit: usize,
    /// Finetuner's EvaluationCallback `query_sample_size`: with more queries than this, the
    /// metrics are measured on a sample of this many (seeded by `seed`; the same sample before,
    /// between epochs and after). None: every query.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub query_sample_size: Option<usize>,
    /// How the evaluation orders matches (Finetuner's EvaluationCallback `distance`).
    #[serde(skip_serializing_if = "Distance::is_cosine")]
    pub distance: Distance,
    /// Weight-name prefixes (or `backbone`) that are not trained.
    pub freeze: Vec<String>,
    /// Clip the global gradient norm to this; off when None (Finetuner's default).
    pub max_grad_norm: Option<f64>,
    /// Also write the artifact as `<run-name>.zip`.
    pub zip: bool,
    /// Finetuner's EvaluationCallback `gather_examples`: the first this many queries keep
    /// their top `limit` matches before and after training (example-results.yml); 0: none.
    pub example_queries: usize,
    /// Retrieval metrics on the query/index data every this many epochs (Finetuner's
    /// EvaluationCallback); 0 measures only before and after training.
    #[serde(default = "one")]
    pub eval_every: usize,
    /// BestModelCheckpoint: the artifact holds the weights of the best epoch by this monitor.
    #[serde(default)]
    pub best_model: Option<Monitor>,
    #[serde(default)]
    pub early_stopping: Option<EarlyStopping>,
    /// WiSE-FT: the artifact holds `alpha * finetuned + (1 - alpha) * pretrained`.
    #[serde(default)]
    pub wise_ft_alpha: Option<f64>,
    /// Compute dtype: auto (bf16 on a GPU, f32 on the CPU), f32, bf16 or f16. Weights and
    /// optimiser state stay f32 whatever this says.
    pub dtype: String,
    /// TrainingCheckpoint: a resumable checkpoint at every epoch end and, within an epoch,
    /// whenever this many seconds have passed since the last one. None: no checkpoints.
    #[serde(default)]
    pub checkpoint_seconds: Option<u64>,
    /// Finetuner's `to_onnx`: the artifact's submodels also hold `model.onnx` (the safetensors
    /// stay, so clipft still serves it).
    #[serde(skip_serializing_if = "is_false")]
    pub to_onnx: bool,
}

/// Settings added after a field's first release are left out of the JSON at their default, so
/// a trainer of before them (which refuses unknown fields) still takes the runs that do not
/// use them, and reads the run records written by this one.
fn is_zero(v: &f64) -> bool {
    *v == 0.0
}

fn is_false(v: &bool) -> bool {
    !*v
}

/// The experiment of runs that name none, as in Finetuner 0.8.
pub const DEFAULT_EXPERIMENT: &str = "default";

/// The longest run description: it is in every listing of the run.
pub const MAX_DESCRIPTION_BYTES: usize = 4096;

fn one() -> usize {
    1
}

/// `clipft fit`'s defaults (Finetuner's where it had one), for configurations given as JSON.
impl Default for FitConfig {
    fn default() -> Self {
        Self {
            model: crate::model::DEFAULT_MODEL.into(),
            model_artifact: None,
            train_data: PathBuf::new(),
            eval_data: None,
            val_split: 0.0,
            query_data: None,
            index_data: None,
            run_name: String::new(),
            experiment_name: DEFAULT_EXPERIMENT.into(),
            description: String::new(),
            epochs: 5,
            batch_size: 64,
            learning_rate: 1e-5,
            optimizer: OptimizerKind::Adam,
            weight_decay: 0.0,
            layer_wise_lr_decay: None,
            scheduler: Scheduler::Constant,
            warmup_steps: 0,
            max_steps: None,
            seed: 0,
            shuffle: true,
            device: "auto".into(),
            output: PathBuf::from("artifacts"),
            limit: 20,
            query_sample_size: None,
            distance: Distance::Cosine,
            example_queries: 0,
            freeze: Vec::new(),
            max_grad_norm: None,
            zip: false,
            eval_every: 1,
            best_model: None,
            early_stopping: None,
            wise_ft_alpha: None,
            dtype: "auto".into(),
            checkpoint_seconds: None,
            to_onnx: false,
        }
    }
}

/// EarlyStopping's settings.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EarlyStopping {
    pub monitor: Monitor,
    pub patience: usize,
    #[serde(default)]
    pub min_delta: f64,
    #[serde(default)]
    pub baseline: Option<f64>,
}

/// How a caller steers a running [`fit`]: the trainer service cancels runs and resumes them
/// after a restart.
#[derive(Debug, Clone, Default)]
pub struct FitControl {
    /// Set to stop the run before its next step ([`FitError::Canceled`]).
    pub cancel: Arc<AtomicBool>,
    /// Folder for checkpoints and the best model's weights; `<output>/.<run-name>.work` when
    /// None. Removed when the run succeeds.
    pub work_dir: Option<PathBuf>,
    /// Continue from the checkpoint in the work folder, when there is one.
    pub resume: bool,
    /// Set when the process is shutting down: the run writes a checkpoint (when it keeps them)
    /// and returns [`FitError::Suspended`], to be resumed by the next process.
    pub suspend: Arc<AtomicBool>,
    /// How the data's http(s) image URIs are fetched. The service's to set, not the run's
    /// configuration's: which hosts a process may reach is its operator's decision.
    pub http: crate::docarray::HttpFetch,
}

#[derive(Debug, thiserror::Error)]
pub enum FitError {
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Eval(#[from] EvalRunError),
    #[error(transparent)]
    Artifact(#[from] crate::artifact::ArtifactError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("{0}")]
    Config(String),
    #[error("canceled")]
    Canceled,
    #[error("suspended at step {0}")]
    Suspended(u64),
    /// The loss stopped being a number and the step was taken: the weights are ruined, so the
    /// run stops instead of training on (and handing out) NaN weights.
    #[error("training diverged at step {step}: the loss is {loss} (try a lower --learning-rate)")]
    Diverged { step: u64, loss: f32 },
}

impl From<candle_core::Error> for FitError {
    fn from(e: candle_core::Error) -> Self {
        FitError::Model(ModelError::Compute(e))
    }
}

/// What happened during a run, for progress display and logs.
#[derive(Debug, Clone)]
pub enum FitEvent {
    Started {
        pairs: usize,
        steps: u64,
        /// Steps already done (a resumed run).
        done: u64,
    },
    /// A line for the run's log: callbacks' decisions, checkpoints, resumption.
    Log(String),
    Evaluating(&'static str),
    /// The backbone's retrieval metrics, measured before the first step (or read back from the
    /// checkpoint of a resumed run).
    Before(Metrics),
    Step {
        epoch: usize,
        step: u64,
        loss: f32,
        lr: f64,
    },
    EpochEnd {
        epoch: usize,
        train_loss: f64,
        eval_loss: Option<f64>,
        metrics: Option<Metrics>,
    },
    /// A resumable checkpoint was written at this step: the work up to it survives the
    /// process.
    Checkpoint {
        step: u64,
    },
}

/// The outcome of a run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FitReport {
    pub losses: Vec<f32>,
    pub epoch_losses: Vec<f64>,
    pub eval_losses: Vec<f64>,
    pub before: Option<Metrics>,
    pub after: Option<Metrics>,
    /// Metrics measured at the end of these epochs (0-based).
    pub epoch_metrics: Vec<(usize, Metrics)>,
    /// Finetuner's example results (`example_queries`).
    pub examples: crate::eval::ExampleResults,
    /// The epoch whose weights BestModelCheckpoint kept.
    pub best_epoch: Option<usize>,
    /// The epoch after which EarlyStopping ended the run.
    pub stopped_early: Option<usize>,
    pub artifact: PathBuf,
    pub seconds: f64,
}

/// Contrastive batches of one pair carry no signal (the loss is zero), so a last partial batch
/// smaller than this is dropped rather than trained on.
const MIN_BATCH: usize = 2;

fn batches(order: &[usize], batch: usize) -> Vec<Vec<usize>> {
    order
        .chunks(batch)
        .filter(|c| c.len() >= MIN_BATCH)
        .map(<[usize]>::to_vec)
        .collect()
}

fn collate(
    model: &TrainModel,
    pairs: &[Pair],
    idx: &[usize],
    http: &crate::docarray::HttpFetch,
) -> Result<(crate::model::TextBatch, Tensor), FitError> {
    let captions: Vec<&str> = idx.iter().map(|i| pairs[*i].caption.as_str()).collect();
    let text = model.text_batch(&captions)?;
    let px = idx
        .par_iter()
        .map(|i| pairs[*i].image.preprocess(&model.images, http))
        .collect::<Result<Vec<_>, _>>()?;
    let (h, w) = model.images.output_size();
    let pixels = Tensor::from_vec(px.concat(), (idx.len(), 3, h, w), &model.device)?;
    Ok((text, pixels))
}

/// The run's settings as config.yml records them: FitConfig plus the loss (CLIPLoss is the only
/// one, but an artifact should say what it was trained with).
fn artifact_config(cfg: &FitConfig) -> serde_json::Value {
    let mut v = serde_json::to_value(cfg).unwrap_or_default();
    if let Some(m) = v.as_object_mut() {
        m.insert("loss".into(), "CLIPLoss".into());
    }
    v
}

/// `1 epoch`, `2 epochs`.
pub fn plural(n: usize, noun: &str) -> String {
    match n {
        1 => format!("1 {noun}"),
        n => format!("{n} {noun}s"),
    }
}

/// Decodes every image the run will use before its first step: a missing or broken file on
/// the last line fails now, naming it, instead of after hours of training.
fn check_all_images(
    pairs: &[Pair],
    eval_pairs: &[Pair],
    eval: Option<&EvalData>,
) -> Result<(), FitError> {
    let pre = crate::model::ImagePreprocessor::new(crate::model::image::ImageConfig::default());
    let index = eval.into_iter().flat_map(|e| &e.index);
    let images: Vec<&crate::docarray::ImageRef> = pairs
        .iter()
        .chain(eval_pairs)
        .map(|p| &p.image)
        .chain(index.filter_map(|l| match &l.item {
            crate::docarray::Item::Image(i) => Some(i),
            crate::docarray::Item::Text(_) => None,
        }))
        .collect();
    Ok(crate::docarray::check_images(&images, &pre)?)
}

/// Labelled query and index items, read once per run.
struct EvalData {
    /// The queries evaluated: all, or `query_sample_size` of them.
    queries: Vec<crate::docarray::Labeled>,
    /// How many the query data holds.
    all_queries: usize,
    distance: Distance,
    index: Vec<crate::docarray::Labeled>,
    /// The index data's folder: examples name its image files relative to it.
    base: Option<PathBuf>,
    http: crate::docarray::HttpFetch,
}

/// One evaluation: the mean metrics and, when asked for, example results.
struct Scored {
    metrics: Metrics,
    examples: Vec<crate::eval::Example>,
}

impl EvalData {
    fn read(cfg: &FitConfig, http: crate::docarray::HttpFetch) -> Result<Option<Self>, FitError> {
        let (Some(q), Some(i)) = (&cfg.query_data, &cfg.index_data) else {
            return Ok(None);
        };
        let mut queries = read_labeled(q, Modality::Text)?;
        let all_queries = queries.len();
        if let Some(n) = cfg.query_sample_size {
            queries = sample_in_order(queries, n, cfg.seed);
        }
        Ok(Some(Self {
            queries,
            all_queries,
            distance: cfg.distance,
            index: read_labeled(i, Modality::Image)?,
            base: i.parent().map(Path::to_path_buf),
            http,
        }))
    }

    /// Metrics (and the first `examples` queries' matches) of the model `enc`.
    fn evaluate(&self, enc: &Encoder, limit: usize, examples: usize) -> Result<Scored, FitError> {
        let ev = evaluate_model(
            enc,
            &self.queries,
            &self.index,
            (limit, self.distance),
            64,
            &self.http,
            &mut |_, _| {},
        )?;
        Ok(Scored {
            examples: crate::eval::examples(
                &ev,
                &self.queries,
                &self.index,
                self.base.as_deref(),
                examples,
                limit,
            ),
            metrics: ev.mean,
        })
    }

    /// Metrics of the checkpoint in `files`, loaded as the executor would load it.
    fn evaluate_files(
        &self,
        files: &ModelFiles,
        dev: &Device,
        limit: usize,
        examples: usize,
    ) -> Result<Scored, FitError> {
        let enc = Encoder::load(
            files,
            &LoadOptions {
                towers: Towers::ALL,
                device: dev.clone(),
                ..Default::default()
            },
        )?;
        self.evaluate(&enc, limit, examples)
    }
}

/// The order of epoch `epoch`'s pairs: file order, or a shuffle seeded by the run's seed and the
/// epoch, so a resumed run sees the same batches as an uninterrupted one.
fn epoch_order(n: usize, cfg: &FitConfig, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    if cfg.shuffle {
        let seed = cfg.seed ^ (epoch as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    }
    order
}

/// `n` of `items` chosen by `seed`, in their order; all of them when there are no more.
fn sample_in_order<T>(items: Vec<T>, n: usize, seed: u64) -> Vec<T> {
    if items.len() <= n {
        return items;
    }
    seeded_split(items, n, seed ^ 0x0051_A3E5_0F0E_0E01).0
}

/// `n` of `items` (at most all) chosen by `seed`, and the rest; each part in the items' order.
fn seeded_split<T>(items: Vec<T>, n: usize, seed: u64) -> (Vec<T>, Vec<T>) {
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    let mut chosen = vec![false; items.len()];
    for &i in order.iter().take(n) {
        chosen[i] = true;
    }
    let (a, b): (Vec<_>, Vec<_>) = items.into_iter().zip(chosen).partition(|(_, c)| *c);
    (
        a.into_iter().map(|(x, _)| x).collect(),
        b.into_iter().map(|(x, _)| x).collect(),
    )
}

/// Takes `val_split` of `pairs` out for validation: a choice seeded by the run's seed, so a
/// resumed run holds out the same pairs; the rest keep their order.
fn split_off_validation<T>(pairs: &mut Vec<T>, cfg: &FitConfig) -> Result<Vec<T>, FitError> {
    // Out of [0, 1) (refused before, by `check_settings`) holds out 0 or every pair: refused.
    let n = (pairs.len() as f64 * cfg.val_split).round() as usize;
    if n < MIN_BATCH || pairs.len() - n < MIN_BATCH {
        return Err(FitError::Config(format!(
            "val_split {} of {} pairs holds out {n}: the validation loss and training each need at least {MIN_BATCH}",
            cfg.val_split,
            pairs.len()
        )));
    }
    let (val, train) = seeded_split(std::mem::take(pairs), n, cfg.seed ^ 0x5EED_5A11_DA7E_0F00);
    *pairs = train;
    Ok(val)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The numbers of a configuration that must lie in a range. Configurations also arrive as
/// JSON (the trainer), past the command line's own checks: the trainer calls this when a run
/// is created, not only when it starts.
pub fn check_settings(cfg: &FitConfig) -> Result<(), String> {
    if !(cfg.learning_rate > 0.0 && cfg.learning_rate.is_finite()) {
        return Err(format!(
            "--learning-rate must be a positive number, not {}",
            cfg.learning_rate
        ));
    }
    if !(0.0..1.0).contains(&cfg.val_split) {
        return Err(format!(
            "--val-split must be within [0, 1), not {}",
            cfg.val_split
        ));
    }
    if cfg.query_sample_size == Some(0) {
        return Err("--query-sample-size must be at least 1".into());
    }
    if let Some(d) = cfg.layer_wise_lr_decay {
        if !(d > 0.0 && d <= 1.0) {
            return Err(format!(
                "--layer-wise-lr-decay must be within (0, 1], not {d}"
            ));
        }
    }
    if let Some(a) = cfg.wise_ft_alpha {
        if !(0.0..=1.0).contains(&a) {
            return Err(format!("--wise-ft-alpha must be within 0..=1, not {a}"));
        }
    }
    Ok(())
}

/// Refuses configurations that would fail only after training started.
fn validate(cfg: &FitConfig, has_eval_pairs: bool) -> Result<(), FitError> {
    if cfg.batch_size < MIN_BATCH {
        return Err(FitError::Config(format!(
            "--batch-size must be at least {MIN_BATCH} for CLIPLoss"
        )));
    }
    if cfg.epochs == 0 {
        return Err(FitError::Config("--epochs must be at least 1".into()));
    }
    let metrics_each_epoch =
        cfg.query_data.is_some() && cfg.index_data.is_some() && cfg.eval_every == 1;
    let monitors = cfg
        .best_model
        .iter()
        .chain(cfg.early_stopping.as_ref().map(|e| &e.monitor));
    for m in monitors {
        m.check_available(has_eval_pairs, metrics_each_epoch)
            .map_err(FitError::Config)?;
    }
    if cfg.early_stopping.as_ref().is_some_and(|e| e.patience == 0) {
        return Err(FitError::Config(
            "--early-stopping-patience must be at least 1".into(),
        ));
    }
    Ok(())
}

/// The mean loss over `pairs` in batches, without gradients.
fn eval_loss(
    model: &TrainModel,
    pairs: &[Pair],
    batch: usize,
    http: &crate::docarray::HttpFetch,
) -> Result<Option<f64>, FitError> {
    if pairs.len() < MIN_BATCH {
        return Ok(None);
    }
    let order: Vec<usize> = (0..pairs.len()).collect();
    let bs = batches(&order, batch);
    let frozen = model.frozen()?;
    let mut s = 0.0;
    for idx in &bs {
        let (text, pixels) = collate(model, pairs, idx, http)?;
        s += model.loss_without_graph(&frozen, &text, &pixels)? as f64;
    }
    Ok(Some(s / bs.len().max(1) as f64))
}

/// Replaces every weight by WiSE-FT's mix with the pretrained one.
fn apply_wise_ft(
    model: &mut TrainModel,
    files: &ModelFiles,
    alpha: f64,
    dev: &Device,
) -> Result<(), FitError> {
    let pre = files.var_builder(Towers::ALL, candle_core::DType::F32, dev)?;
    for (name, var) in model.named_vars() {
        // A checkpoint without logit_scale started from the config's value; keep the trained one.
        if !pre.contains_tensor(&name) {
            continue;
        }
        let p = pre
            .get(var.shape().clone(), &name)
            .map_err(|e| ModelError::Weights {
                files: files.source.clone(),
                msg: format!("{name}: {e}"),
            })?;
        var.set(&super::callbacks::wise_ft(var.as_tensor(), &p, alpha)?)?;
    }
    Ok(model.sync_compute_copies()?)
}

/// The encoder view of the weights being trained, for evaluation between epochs.
fn training_encoder(model: &TrainModel) -> Encoder {
    Encoder::from_parts(
        model.clip.with_fresh_packing(),
        Some(model.tokenizer.clone()),
        Some(model.images.clone()),
        model.device.clone(),
        "the model being trained",
    )
}

/// Where an in-process run keeps its checkpoints when [`FitControl::work_dir`] names no other
/// folder: `<output>/.<run-name>.work`, beside the artifact it becomes.
pub fn local_work_dir(cfg: &FitConfig) -> PathBuf {
    cfg.output.join(format!(".{}.work", cfg.run_name))
}

/// Runs training as configured and writes the artifact to `output/run_name`.
pub fn fit(
    cfg: &FitConfig,
    control: &FitControl,
    progress: &mut dyn FnMut(FitEvent),
) -> Result<FitReport, FitError> {
    let start = Instant::now();
    // A taken name would otherwise be found when the artifact is written, after training.
    crate::artifact::ensure_free(&cfg.output, &cfg.run_name)?;
    check_settings(cfg).map_err(FitError::Config)?;
    let dev = device::parse_device(&cfg.device)?;
    let files = crate::artifact::model_or_artifact(
        &cfg.model,
        cfg.model_artifact.as_deref().map(Path::new),
        Towers::ALL,
    )?;
    if cfg.to_onnx {
        // Refused now, not when the artifact is written after training.
        let config = crate::model::ClipConfig::from_file(&files.config)?;
        crate::model::onnx::check_exportable(&config, &files.source)?;
    }
    if let Some(a) = &cfg.model_artifact {
        progress(FitEvent::Log(format!(
            "starting from the weights of the artifact {a} (model_artifact)"
        )));
    }
    let mut pairs: Vec<Pair> = open_pairs(&cfg.train_data)?.collect::<Result<_, _>>()?;
    let eval_pairs: Vec<Pair> = match &cfg.eval_data {
        Some(p) => open_pairs(p)?.collect::<Result<_, _>>()?,
        None if cfg.val_split != 0.0 => {
            let held_out = split_off_validation(&mut pairs, cfg)?;
            progress(FitEvent::Log(format!(
                "val_split {}: {} of the training pairs held out for the validation loss",
                cfg.val_split,
                held_out.len()
            )));
            held_out
        }
        None => Vec::new(),
    };
    if pairs.len() < MIN_BATCH {
        return Err(FitError::Config(format!(
            "{} holds {} pairs to train on; CLIPLoss needs at least {MIN_BATCH}",
            cfg.train_data.display(),
            pairs.len()
        )));
    }
    validate(cfg, eval_pairs.len() >= MIN_BATCH)?;
    let eval_data = EvalData::read(cfg, control.http)?;
    if let Some(ev) = eval_data
        .as_ref()
        .filter(|e| e.queries.len() < e.all_queries)
    {
        progress(FitEvent::Log(format!(
            "query_sample_size {n}: {n} of the {all} queries are evaluated",
            n = ev.queries.len(),
            all = ev.all_queries
        )));
    }
    check_all_images(&pairs, &eval_pairs, eval_data.as_ref())?;
    let per_epoch = batches(&(0..pairs.len()).collect::<Vec<_>>(), cfg.batch_size).len() as u64;
    let all_epochs = per_epoch.checked_mul(cfg.epochs as u64).ok_or_else(|| {
        FitError::Config(format!(
            "{} epochs of {per_epoch} steps is more steps than can be counted",
            cfg.epochs
        ))
    })?;
    let total = cfg.max_steps.map_or(all_epochs, |m| m.min(all_epochs));
    let work = control
        .work_dir
        .clone()
        .unwrap_or_else(|| local_work_dir(cfg));
    let needs_work = cfg.checkpoint_seconds.is_some() || cfg.best_model.is_some();
    if needs_work {
        std::fs::create_dir_all(&work).map_err(|e| CheckpointError {
            path: work.clone(),
            msg: e.to_string(),
        })?;
    }

    let mut model = TrainModel::load(&files, &dev)?
        .with_compute_dtype(super::train::training_dtype(&cfg.dtype, &dev)?)?
        .freeze(&cfg.freeze)?;
    let vars = model.named_vars();
    let mut opt: Optimizer = model.optimizer(OptimizerParams::new(
        cfg.optimizer,
        cfg.learning_rate,
        cfg.weight_decay,
    ))?;
    opt.max_grad_norm = cfg.max_grad_norm;
    if let Some(d) = cfg.layer_wise_lr_decay {
        let names: Vec<&str> = vars.iter().map(|(n, _)| n.as_str()).collect();
        opt = opt.with_layer_decay(d, &names)?;
        let lowest = opt.params.iter().map(|p| p.lr_scale).fold(1.0, f64::min);
        progress(FitEvent::Log(format!(
            "layer-wise learning-rate decay {d}: from {:.3e} (embeddings) to {:.3e} (projections)",
            cfg.learning_rate * lowest,
            cfg.learning_rate
        )));
    }

    let resumed = match control.resume {
        true => checkpoint::load(&work, &dev)?,
        false => None,
    };
    let cfg_json = serde_json::to_value(cfg).unwrap_or_default();
    let mut st = match resumed {
        Some(mut c) => {
            let src = work.join("checkpoint");
            if let Some(then) = &c.state.config {
                let changes = checkpoint::config_changes(then, &cfg_json);
                if !changes.is_empty() {
                    return Err(FitError::Config(format!(
                        "run {} cannot resume with other settings ({}): give the ones it started with, or start a new run under another name",
                        cfg.run_name,
                        changes.join(", ")
                    )));
                }
            }
            checkpoint::restore_vars(&vars, &c.weights, &src)?;
            model.sync_compute_copies()?;
            opt.restore(c.optimizer_step, &mut c.moments)
                .map_err(|msg| CheckpointError {
                    path: src.clone(),
                    msg,
                })?;
            progress(FitEvent::Log(format!(
                "resumed from the checkpoint at step {} (epoch {}, batch {})",
                c.state.step,
                c.state.epoch + 1,
                c.state.batch
            )));
            c.state
        }
        None => {
            if control.resume {
                progress(FitEvent::Log(format!(
                    "no checkpoint in {}: starting from the beginning",
                    work.display()
                )));
            }
            RunState {
                best: cfg.best_model.clone().map(BestModel::new),
                early: cfg.early_stopping.as_ref().map(|e| {
                    EarlyStopper::new(e.monitor.clone(), e.patience, e.min_delta, e.baseline)
                }),
                started_unix: unix_now(),
                config: Some(cfg_json.clone()),
                ..Default::default()
            }
        }
    };
    progress(FitEvent::Started {
        pairs: pairs.len(),
        steps: total,
        done: st.step,
    });
    if st.step == 0 && st.before.is_none() {
        if let Some(ev) = &eval_data {
            progress(FitEvent::Evaluating("before"));
            let s = ev.evaluate_files(&files, &dev, cfg.limit, cfg.example_queries)?;
            st.before = Some(s.metrics);
            st.before_examples = s.examples;
        }
    }
    if let Some(b) = st.before {
        progress(FitEvent::Before(b));
    }

    let checkpoint_every = cfg.checkpoint_seconds.map(std::time::Duration::from_secs);
    let mut last_checkpoint = Instant::now();
    let mut stopped_early = None;
    let first_epoch = st.epoch;
    'epochs: for epoch in first_epoch..cfg.epochs {
        let _span =
            tracing::info_span!("epoch", epoch = epoch as i64 + 1, run = %cfg.run_name).entered();
        let order = epoch_order(pairs.len(), cfg, epoch);
        let skip = if epoch == first_epoch { st.batch } else { 0 };
        if skip == 0 {
            st.epoch_start_step = st.step;
        }
        for (bi, idx) in batches(&order, cfg.batch_size)
            .iter()
            .enumerate()
            .skip(skip)
        {
            if st.step >= total {
                break 'epochs;
            }
            if control.cancel.load(Ordering::Relaxed) {
                return Err(FitError::Canceled);
            }
            if control.suspend.load(Ordering::Relaxed) {
                if checkpoint_every.is_some() {
                    st.epoch = epoch;
                    st.batch = bi;
                    checkpoint::save(&work, &vars, &opt, &st)?;
                    progress(FitEvent::Checkpoint { step: st.step });
                }
                return Err(FitError::Suspended(st.step));
            }
            let lr = learning_rate(
                cfg.learning_rate,
                cfg.scheduler,
                st.step,
                cfg.warmup_steps,
                total,
            );
            opt.set_learning_rate(lr);
            let (text, pixels) = collate(&model, &pairs, idx, &control.http)?;
            let skipped = opt.skipped;
            let loss = model.train_step(&mut opt, &text, &pixels)?;
            // Under f16 loss scaling a non-finite step is skipped and the weights are intact.
            if !loss.is_finite() && opt.skipped == skipped {
                // Its checkpoints would resume into the same divergence: nothing to keep.
                remove_work_dir(&work);
                return Err(FitError::Diverged {
                    step: st.step + 1,
                    loss,
                });
            }
            if opt.skipped > skipped {
                progress(FitEvent::Log(format!(
                    "f16: the gradients overflowed, step skipped; loss scale now {}",
                    opt.loss_scale.map_or(0.0, |l| l.scale)
                )));
            }
            st.step += 1;
            st.losses.push(loss);
            progress(FitEvent::Step {
                epoch,
                step: st.step,
                loss,
                lr,
            });
            if checkpoint_every.is_some_and(|d| last_checkpoint.elapsed() >= d) {
                st.epoch = epoch;
                st.batch = bi + 1;
                checkpoint::save(&work, &vars, &opt, &st)?;
                last_checkpoint = Instant::now();
                progress(FitEvent::Log(format!("checkpoint at step {}", st.step)));
                progress(FitEvent::Checkpoint { step: st.step });
            }
        }
        let epoch_losses = &st.losses[st.epoch_start_step as usize..];
        let train_loss =
            epoch_losses.iter().map(|l| *l as f64).sum::<f64>() / epoch_losses.len().max(1) as f64;
        st.epoch_losses.push(train_loss);
        let val_loss = eval_loss(&model, &eval_pairs, cfg.batch_size, &control.http)?;
        if let Some(l) = val_loss {
            st.eval_losses.push(l);
        }
        let metrics = match &eval_data {
            Some(ev) if cfg.eval_every > 0 && (epoch + 1) % cfg.eval_every == 0 => {
                let m = ev
                    .evaluate(&training_encoder(&model), cfg.limit, 0)?
                    .metrics;
                st.epoch_metrics.push((epoch, m));
                Some(m)
            }
            _ => None,
        };
        progress(FitEvent::EpochEnd {
            epoch,
            train_loss,
            eval_loss: val_loss,
            metrics,
        });
        let values = EpochValues {
            train_loss,
            val_loss,
            metrics,
        };
        if let Some(best) = &mut st.best {
            let (improved, line) = best.observe(epoch, &values);
            if improved {
                checkpoint::save_best(&work, &vars)?;
            }
            progress(FitEvent::Log(line));
        }
        let stop = st.early.as_mut().is_some_and(|e| e.observe(&values));
        st.epoch = epoch + 1;
        st.batch = 0;
        if checkpoint_every.is_some() {
            checkpoint::save(&work, &vars, &opt, &st)?;
            last_checkpoint = Instant::now();
            progress(FitEvent::Checkpoint { step: st.step });
        }
        if stop {
            progress(FitEvent::Log(format!(
                "EarlyStopping: no improvement of {} for {}; stopping after epoch {}",
                cfg.early_stopping
                    .as_ref()
                    .map_or("", |e| e.monitor.name.as_str()),
                plural(
                    cfg.early_stopping.as_ref().map_or(0, |e| e.patience),
                    "epoch"
                ),
                epoch + 1
            )));
            stopped_early = Some(epoch);
            break;
        }
    }

    let best_epoch = st.best.as_ref().and_then(|b| b.best_epoch);
    if let Some(e) = best_epoch {
        checkpoint::restore_vars(&vars, &checkpoint::load_best(&work, &dev)?, &work)?;
        model.sync_compute_copies()?;
        progress(FitEvent::Log(format!(
            "BestModelCheckpoint: the artifact holds epoch {}'s weights",
            e + 1
        )));
    }
    if let Some(alpha) = cfg.wise_ft_alpha {
        apply_wise_ft(&mut model, &files, alpha, &dev)?;
        progress(FitEvent::Log(format!(
            "WiSE-FT: weights = {alpha} * fine-tuned + {} * pretrained",
            1.0 - alpha
        )));
    }

    let staged = crate::artifact::Staged::write(&crate::artifact::RunOutput {
        output: &cfg.output,
        run_name: &cfg.run_name,
        experiment: &cfg.experiment_name,
        files: &files,
        continued_from: cfg
            .model_artifact
            .as_deref()
            .map(|a| (cfg.model.as_str(), Path::new(a))),
        weights: vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect(),
        config: artifact_config(cfg),
        device: device::device_name(&dev),
        started_unix: st.started_unix,
        to_onnx: cfg.to_onnx,
    })?;
    drop(opt);
    drop(vars);
    drop(model);
    let mut after = match &eval_data {
        Some(ev) => {
            progress(FitEvent::Evaluating("after"));
            Some(ev.evaluate_files(
                &crate::artifact::submodel_files(staged.dir(), Towers::ALL)?,
                &dev,
                cfg.limit,
                cfg.example_queries,
            )?)
        }
        None => None,
    };
    let examples = crate::eval::ExampleResults {
        before: std::mem::take(&mut st.before_examples),
        after: after
            .as_mut()
            .map_or_else(Vec::new, |a| std::mem::take(&mut a.examples)),
    };
    let after = after.map(|a| a.metrics);
    let artifact = staged.finish(&crate::artifact::RunSummary {
        seconds: start.elapsed().as_secs_f64(),
        losses: &st.losses,
        epoch_losses: &st.epoch_losses,
        eval_losses: &st.eval_losses,
        before: st.before.as_ref(),
        after: after.as_ref(),
        epoch_metrics: &st.epoch_metrics,
        examples: &examples,
    })?;
    if cfg.zip {
        crate::artifact::zip_artifact(&artifact)?;
    }
    if needs_work {
        remove_work_dir(&work);
    }
    Ok(FitReport {
        losses: st.losses,
        epoch_losses: st.epoch_losses,
        eval_losses: st.eval_losses,
        before: st.before,
        after,
        epoch_metrics: st.epoch_metrics,
        examples,
        best_epoch,
        stopped_early,
        artifact,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// The work folder is only scaffolding once the artifact exists; failing to remove it loses
/// nothing, so it is logged, not raised.
fn remove_work_dir(work: &Path) {
    if let Err(e) = std::fs::remove_dir_all(work) {
        tracing::warn!("cannot remove {}: {e}", work.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The held-out part is the configured fraction, the same for the same seed (a resumed run
    /// validates on what it validated on), another for another seed; the rest keep their order;
    /// fractions out of range or leaving too few pairs are refused (JSON configurations reach
    /// here past the command line's check).
    #[test]
    fn val_split_and_query_samples_are_seeded() {
        let cfg = |val_split: f64, seed: u64| FitConfig {
            val_split,
            seed,
            ..Default::default()
        };
        let split = |c: &FitConfig| {
            let mut train: Vec<usize> = (0..40).collect();
            let val = split_off_validation(&mut train, c).expect("split");
            (train, val)
        };
        let (train, val) = split(&cfg(0.25, 7));
        assert_eq!((train.len(), val.len()), (30, 10));
        assert!(train.windows(2).all(|w| w[0] < w[1]));
        assert!(val.iter().all(|v| !train.contains(v)));
        assert_eq!(split(&cfg(0.25, 7)).1, val);
        assert_ne!(split(&cfg(0.25, 8)).1, val);
        // The query sample: seeded, in order, everything when there are no more.
        let sample = sample_in_order((0..50).collect::<Vec<usize>>(), 10, 3);
        assert_eq!(sample.len(), 10);
        assert!(sample.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(sample, sample_in_order((0..50).collect(), 10, 3));
        assert_ne!(sample, sample_in_order((0..50).collect(), 10, 4));
        assert_eq!(sample_in_order(vec![1, 2], 10, 3), vec![1, 2]);
        for bad in [1.0, -0.1, f64::NAN, 0.01, 0.99] {
            let mut train: Vec<usize> = (0..40).collect();
            assert!(
                split_off_validation(&mut train, &cfg(bad, 0)).is_err(),
                "{bad}"
            );
        }
    }
}
