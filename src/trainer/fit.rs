//! A training run, in process: read the pairs, fine-tune for the configured epochs with the
//! schedule, measure retrieval before and after, and write the artifact. `clipft fit` without
//! `--trainer` calls this; the trainer service will run the same function.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rayon::prelude::*;

use super::optim::{OptimizerKind, OptimizerParams};
use super::schedule::{learning_rate, Scheduler};
use super::train::TrainModel;
use crate::docarray::{open_pairs, read_labeled, DataError, Modality, Pair};
use crate::eval::{evaluate_model, EvalRunError, Metrics};
use crate::model::{device, Encoder, LoadOptions, ModelError, ModelFiles, Towers};

/// Everything a run is configured with (written to the artifact's config.yml).
#[derive(Debug, Clone, serde::Serialize)]
pub struct FitConfig {
    pub model: String,
    pub train_data: PathBuf,
    pub eval_data: Option<PathBuf>,
    pub query_data: Option<PathBuf>,
    pub index_data: Option<PathBuf>,
    pub run_name: String,
    pub epochs: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub optimizer: OptimizerKind,
    pub weight_decay: f64,
    pub scheduler: Scheduler,
    pub warmup_steps: u64,
    pub max_steps: Option<u64>,
    pub seed: u64,
    pub shuffle: bool,
    pub device: String,
    pub output: PathBuf,
    /// Matches per query in the before/after evaluation.
    pub limit: usize,
    /// Weight-name prefixes (or `backbone`) that are not trained.
    pub freeze: Vec<String>,
    /// Clip the global gradient norm to this; off when None (Finetuner's default).
    pub max_grad_norm: Option<f64>,
    /// Also write the artifact as `<run-name>.zip`.
    pub zip: bool,
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
    #[error("{0}")]
    Config(String),
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
    },
    Evaluating(&'static str),
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
) -> Result<(crate::model::TextBatch, Tensor), FitError> {
    let captions: Vec<&str> = idx.iter().map(|i| pairs[*i].caption.as_str()).collect();
    let text = model.text_batch(&captions)?;
    let px = idx
        .par_iter()
        .map(|i| pairs[*i].image.preprocess(&model.images))
        .collect::<Result<Vec<_>, _>>()?;
    let (h, w) = model.images.output_size();
    let pixels = Tensor::from_vec(px.concat(), (idx.len(), 3, h, w), &model.device)?;
    Ok((text, pixels))
}

fn evaluate_files(
    files: &ModelFiles,
    cfg: &FitConfig,
    dev: &Device,
) -> Result<Option<Metrics>, FitError> {
    let (Some(q), Some(i)) = (&cfg.query_data, &cfg.index_data) else {
        return Ok(None);
    };
    let queries = read_labeled(q, Modality::Text)?;
    let index = read_labeled(i, Modality::Image)?;
    let enc = Encoder::load(
        files,
        &LoadOptions {
            towers: Towers::ALL,
            device: dev.clone(),
            ..Default::default()
        },
    )?;
    let ev = evaluate_model(&enc, &queries, &index, cfg.limit, 64, &mut |_, _| {})?;
    Ok(Some(ev.mean))
}

/// Runs training as configured and writes the artifact to `output/run_name`.
pub fn fit(cfg: &FitConfig, progress: &mut dyn FnMut(FitEvent)) -> Result<FitReport, FitError> {
    let start = Instant::now();
    let started_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    if cfg.batch_size < MIN_BATCH {
        return Err(FitError::Config(format!(
            "--batch-size must be at least {MIN_BATCH} for CLIPLoss"
        )));
    }
    crate::artifact::validate_run_name(&cfg.run_name)?;
    let dev = device::parse_device(&cfg.device)?;
    let files = ModelFiles::resolve(&cfg.model)?;
    let pairs: Vec<Pair> = open_pairs(&cfg.train_data)?.collect::<Result<_, _>>()?;
    if pairs.len() < MIN_BATCH {
        return Err(FitError::Config(format!(
            "{} holds {} pairs; CLIPLoss needs at least {MIN_BATCH}",
            cfg.train_data.display(),
            pairs.len()
        )));
    }
    let eval_pairs: Vec<Pair> = match &cfg.eval_data {
        Some(p) => open_pairs(p)?.collect::<Result<_, _>>()?,
        None => Vec::new(),
    };
    let per_epoch = batches(&(0..pairs.len()).collect::<Vec<_>>(), cfg.batch_size).len() as u64;
    let total = cfg.max_steps.map_or(per_epoch * cfg.epochs as u64, |m| {
        m.min(per_epoch * cfg.epochs as u64)
    });
    progress(FitEvent::Started {
        pairs: pairs.len(),
        steps: total,
    });

    progress(FitEvent::Evaluating("before"));
    let before = evaluate_files(&files, cfg, &dev)?;

    let model = TrainModel::load(&files, &dev)?;
    let mut opt = model.optimizer_with_frozen(
        OptimizerParams::new(cfg.optimizer, cfg.learning_rate, cfg.weight_decay),
        &cfg.freeze,
    )?;
    opt.max_grad_norm = cfg.max_grad_norm;
    let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
    let (mut losses, mut epoch_losses, mut eval_losses) = (Vec::new(), Vec::new(), Vec::new());
    let mut step = 0u64;
    'epochs: for epoch in 0..cfg.epochs {
        let mut order: Vec<usize> = (0..pairs.len()).collect();
        if cfg.shuffle {
            order.shuffle(&mut rng);
        }
        let mut sum = 0.0;
        let mut n = 0usize;
        for idx in batches(&order, cfg.batch_size) {
            if step >= total {
                break 'epochs;
            }
            let lr = learning_rate(
                cfg.learning_rate,
                cfg.scheduler,
                step,
                cfg.warmup_steps,
                total,
            );
            opt.set_learning_rate(lr);
            let (text, pixels) = collate(&model, &pairs, &idx)?;
            let loss = model.train_step(&mut opt, &text, &pixels)?;
            step += 1;
            losses.push(loss);
            sum += loss as f64;
            n += 1;
            progress(FitEvent::Step {
                epoch,
                step,
                loss,
                lr,
            });
        }
        let train_loss = sum / n.max(1) as f64;
        epoch_losses.push(train_loss);
        let eval_loss = if eval_pairs.len() >= MIN_BATCH {
            let order: Vec<usize> = (0..eval_pairs.len()).collect();
            let mut s = 0.0;
            let bs = batches(&order, cfg.batch_size);
            for idx in &bs {
                let (text, pixels) = collate(&model, &eval_pairs, idx)?;
                s += model.loss(&text, &pixels)?.detach().to_scalar::<f32>()? as f64;
            }
            let l = s / bs.len().max(1) as f64;
            eval_losses.push(l);
            Some(l)
        } else {
            None
        };
        progress(FitEvent::EpochEnd {
            epoch,
            train_loss,
            eval_loss,
        });
    }

    let staged = crate::artifact::Staged::write(&crate::artifact::RunOutput {
        output: &cfg.output,
        run_name: &cfg.run_name,
        files: &files,
        weights: model
            .named_vars()
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().clone()))
            .collect(),
        config: serde_json::to_value(cfg).unwrap_or_default(),
        device: device::device_name(&dev),
        started_unix,
    })?;
    drop(opt);
    drop(model);
    progress(FitEvent::Evaluating("after"));
    let after = evaluate_files(
        &crate::artifact::submodel_files(staged.dir(), Towers::ALL)?,
        cfg,
        &dev,
    )?;
    let artifact = staged.finish(&crate::artifact::RunSummary {
        seconds: start.elapsed().as_secs_f64(),
        losses: &losses,
        epoch_losses: &epoch_losses,
        eval_losses: &eval_losses,
        before: before.as_ref(),
        after: after.as_ref(),
    })?;
    if cfg.zip {
        crate::artifact::zip_artifact(&artifact)?;
    }
    Ok(FitReport {
        losses,
        epoch_losses,
        eval_losses,
        before,
        after,
        artifact,
        seconds: start.elapsed().as_secs_f64(),
    })
}
