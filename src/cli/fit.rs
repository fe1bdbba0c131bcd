//! `clipft fit`: fine-tune CLIP in process and write the artifact.

use std::path::PathBuf;

use clap::Args;

use crate::trainer::fit::{fit, FitConfig, FitEvent};
use crate::trainer::optim::OptimizerKind;
use crate::trainer::schedule::Scheduler;

#[derive(Args, Debug)]
pub struct FitArgs {
    /// The backbone: Hugging Face repo id or local folder.
    #[arg(long, env = "CLIPFT_MODEL", default_value = super::DEFAULT_MODEL)]
    pub model: String,
    /// Caption-image pairs: Finetuner-style CSV or a docarray v1 file.
    #[arg(long, env = "CLIPFT_TRAIN_DATA")]
    pub train_data: PathBuf,
    /// Pairs for the validation loss after each epoch.
    #[arg(long, env = "CLIPFT_EVAL_DATA")]
    pub eval_data: Option<PathBuf>,
    /// Labelled text queries for the retrieval metrics before and after training.
    #[arg(long, env = "CLIPFT_QUERY_DATA", requires = "index_data")]
    pub query_data: Option<PathBuf>,
    /// Labelled images for the retrieval metrics before and after training.
    #[arg(long, env = "CLIPFT_INDEX_DATA", requires = "query_data")]
    pub index_data: Option<PathBuf>,
    /// Name of the run and of its artifact folder; random and readable by default.
    #[arg(long, env = "CLIPFT_RUN_NAME")]
    pub run_name: Option<String>,
    #[arg(long, env = "CLIPFT_EPOCHS", default_value_t = 5)]
    pub epochs: usize,
    #[arg(long, env = "CLIPFT_BATCH_SIZE", default_value_t = 64)]
    pub batch_size: usize,
    #[arg(long, env = "CLIPFT_LEARNING_RATE", default_value_t = 1e-5)]
    pub learning_rate: f64,
    /// The loss; CLIPLoss is the one for CLIP.
    #[arg(long, env = "CLIPFT_LOSS", default_value = "CLIPLoss", value_parser = ["CLIPLoss"])]
    pub loss: String,
    #[arg(long, env = "CLIPFT_OPTIMIZER", value_enum, default_value = "Adam")]
    pub optimizer: OptimizerKind,
    #[arg(long, env = "CLIPFT_WEIGHT_DECAY", default_value_t = 0.0)]
    pub weight_decay: f64,
    #[arg(long, env = "CLIPFT_SCHEDULER", value_enum, default_value = "constant")]
    pub scheduler: Scheduler,
    #[arg(long, env = "CLIPFT_WARMUP_STEPS", default_value_t = 0)]
    pub warmup_steps: u64,
    /// Stop after this many optimiser steps.
    #[arg(long, env = "CLIPFT_MAX_STEPS")]
    pub max_steps: Option<u64>,
    #[arg(long, env = "CLIPFT_SEED", default_value_t = 0)]
    pub seed: u64,
    /// Keep the file order instead of shuffling every epoch.
    #[arg(long, env = "CLIPFT_NO_SHUFFLE")]
    pub no_shuffle: bool,
    #[arg(long, env = "CLIPFT_DEVICE", default_value = "auto")]
    pub device: String,
    /// Artifacts land in `OUTPUT/<run-name>/`.
    #[arg(long, env = "CLIPFT_OUTPUT", default_value = "artifacts")]
    pub output: PathBuf,
    /// Matches per query in the before/after evaluation.
    #[arg(long, env = "CLIPFT_LIMIT", default_value_t = 20)]
    pub limit: usize,
    /// Weights not to train: name prefixes (`text_model`, `vision_model.encoder.layers.0`, ...)
    /// or `backbone` (everything but the projections and logit_scale). Repeatable.
    #[arg(long, env = "CLIPFT_FREEZE", value_delimiter = ',')]
    pub freeze: Vec<String>,
    /// Clip the global gradient norm (off by default, as in Finetuner).
    #[arg(long, env = "CLIPFT_MAX_GRAD_NORM")]
    pub max_grad_norm: Option<f64>,
    /// Also write the artifact as `OUTPUT/<run-name>.zip`.
    #[arg(long, env = "CLIPFT_ZIP")]
    pub zip: bool,
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

impl FitArgs {
    pub fn config(&self) -> FitConfig {
        FitConfig {
            model: self.model.clone(),
            train_data: self.train_data.clone(),
            eval_data: self.eval_data.clone(),
            query_data: self.query_data.clone(),
            index_data: self.index_data.clone(),
            run_name: self.run_name.clone().unwrap_or_else(random_run_name),
            epochs: self.epochs,
            batch_size: self.batch_size,
            learning_rate: self.learning_rate,
            optimizer: self.optimizer,
            weight_decay: self.weight_decay,
            scheduler: self.scheduler,
            warmup_steps: self.warmup_steps,
            max_steps: self.max_steps,
            seed: self.seed,
            shuffle: !self.no_shuffle,
            device: self.device.clone(),
            output: self.output.clone(),
            limit: self.limit,
            freeze: self.freeze.clone(),
            max_grad_norm: self.max_grad_norm,
            zip: self.zip,
        }
    }
}

/// Runs `cfg` with a progress bar on a terminal and plain log lines otherwise; prints the
/// before/after table.
pub fn run_with_progress(cfg: &FitConfig) -> anyhow::Result<crate::trainer::fit::FitReport> {
    let mut bar: Option<indicatif::ProgressBar> = None;
    let report = fit(cfg, &mut |e| match e {
        FitEvent::Started { pairs, steps } => {
            eprintln!("run {}: {pairs} pairs, {steps} steps", cfg.run_name);
            bar = super::eval::progress_bar(steps as usize);
        }
        FitEvent::Evaluating(when) => eprintln!("evaluating ({when})"),
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
                eprintln!("epoch {} step {step} loss {loss:.4} lr {lr:.2e}", epoch + 1)
            }
            None => {}
        },
        FitEvent::EpochEnd {
            epoch,
            train_loss,
            eval_loss,
        } => {
            let ev = eval_loss.map_or(String::new(), |l| format!(", eval loss {l:.4}"));
            let line = format!("epoch {}: train loss {train_loss:.4}{ev}", epoch + 1);
            match &bar {
                Some(b) => b.println(line),
                None => eprintln!("{line}"),
            }
        }
    })?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if let (Some(b), Some(a)) = (&report.before, &report.after) {
        println!(
            "{}",
            super::eval::metrics_table(&[("before", b), ("after", a)])
        );
    }
    println!("artifact: {}", report.artifact.display());
    Ok(report)
}

pub fn run(args: FitArgs) -> anyhow::Result<()> {
    run_with_progress(&args.config()).map(|_| ())
}
