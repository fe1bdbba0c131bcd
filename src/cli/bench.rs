//! `clipft bench`: model throughput on inputs that are already tokenized / preprocessed and on
//! the model's device (the batch is made before the clock starts; the embeddings come back to
//! the host inside it), so the number is comparable with the PyTorch and ONNX Runtime peers
//! (scripts/bench_peers.py), which time the same. Uploads and preprocessing are measured end
//! to end by the executor's benchmark.
//! `--train` measures training instead: AdamW steps of CLIPLoss over both towers, the step
//! `clipft fit` takes, against scripts/bench_train_peer.py.

use std::time::{Duration, Instant};

use clap::Args;
use rand::{Rng, SeedableRng};

use super::{parse_towers, ModelArgs};
use crate::model::{device::device_name, Encoder, Towers};

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// `clip-text` or `clip-vision` (not with `--train`, which trains both).
    #[arg(long, env = "CLIPFT_SELECT_MODEL", value_parser = parse_towers, required_unless_present = "train", conflicts_with = "train")]
    pub select_model: Option<Towers>,
    /// Training steps (CLIPLoss, backward, AdamW) on pairs of random texts and pixels instead of
    /// inference; `--dtype` is then the compute dtype (auto: bf16 on a GPU, f32 on the CPU) and
    /// `items_per_second` counts pairs.
    #[arg(long, env = "CLIPFT_BENCH_TRAIN")]
    pub train: bool,
    /// Items per timed pass (pairs with --train).
    #[arg(long, env = "CLIPFT_BENCH_BATCH_SIZE", default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub batch_size: u64,
    /// Measure for at least this long, after one warm-up pass.
    #[arg(long, env = "CLIPFT_SECONDS", default_value_t = 20.0)]
    pub seconds: f64,
    /// Tokens per text, start and end-of-text included.
    #[arg(long, env = "CLIPFT_TEXT_TOKENS", default_value_t = 77, value_parser = clap::value_parser!(u64).range(2..=4096))]
    pub text_tokens: u64,
    /// Captions of mixed lengths: row i of a batch of b has
    /// `min + i * (text_tokens - min) / (b - 1)` tokens (evenly spread; the peers' scripts make
    /// the same rows), padded with end-of-text to the longest, as a tokenizer pads a batch.
    /// Default: every row `--text-tokens` long.
    #[arg(long, env = "CLIPFT_TEXT_TOKENS_MIN", value_parser = clap::value_parser!(u64).range(2..=4096))]
    pub text_tokens_min: Option<u64>,
    /// With `--train`: weights left out of training, as `clipft fit --freeze` (name prefixes, or
    /// `backbone`), so the step of a frozen fine-tune is measured (`model_tflops` still counts
    /// a whole step's products, so it compares with an unfrozen step's items/s).
    #[arg(
        long,
        env = "CLIPFT_BENCH_FREEZE",
        requires = "train",
        value_delimiter = ','
    )]
    pub freeze: Vec<String>,
}

impl BenchArgs {
    /// Token rows for a batch of `b`: every row `--text-tokens` long, or spread from
    /// `--text-tokens-min`; checked against the model's context.
    fn text_rows(
        &self,
        rng: &mut impl Rng,
        b: usize,
        ctx: usize,
        eos: u32,
    ) -> anyhow::Result<Vec<Vec<u32>>> {
        let t = self.text_tokens as usize;
        if t > ctx {
            anyhow::bail!("--text-tokens {t} is over the model's context of {ctx}");
        }
        let min = self.text_tokens_min.map_or(t, |m| m as usize);
        if min > t {
            anyhow::bail!("--text-tokens-min {min} is over --text-tokens {t}");
        }
        let lens: Vec<usize> = (0..b)
            .map(|i| min + (i * (t - min)).checked_div(b - 1).unwrap_or(0))
            .collect();
        Ok(crate::model::tokenizer::pad_rows(
            random_rows(rng, &lens, eos),
            eos,
        ))
    }
}

/// One benchmark result, printed as the last line.
#[derive(Debug, serde::Serialize)]
pub struct BenchResult {
    /// `clip-text`, `clip-vision`, or `clip` for a training step over both.
    pub tower: &'static str,
    /// `inference` or `train`.
    pub mode: &'static str,
    pub batch_size: usize,
    pub items_per_second: f64,
    pub text_tokens: Option<usize>,
    /// `--text-tokens-min`: the shortest caption of the spread.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text_tokens_min: Option<usize>,
    pub iterations: usize,
    pub seconds: f64,
    pub device: String,
    pub dtype: String,
    /// The CPU matmul kernel actually used: `f32`, `amx-bf16x3` or `amx-bf16`.
    pub cpu_matmul: &'static str,
    pub peak_rss_mib: Option<f64>,
    /// Model FLOPs per second, in TFLOP/s: the forward passes' products (each caption up to its
    /// end-of-text token, every block in full; `--train` counts the backward as twice the
    /// forward), the same useful work whoever computes it; divided by the GPU's peak, the
    /// fraction of it reached.
    pub model_tflops: f64,
    /// `--train`: where a step's time goes, mean seconds per phase over a few extra steps
    /// each waited for on the device (not part of `items_per_second`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phases: Option<crate::trainer::train::StepPhases>,
}

/// Peak resident memory of this process, from /proc (Linux).
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// The text tower's model FLOPs over `batch`: each caption up to its end-of-text token.
fn text_flops(
    t: &crate::model::config::TextConfig,
    batch: &crate::model::TextBatch,
    proj: usize,
) -> f64 {
    batch
        .pool_positions
        .iter()
        .map(|p| t.forward_flops(p + 1, proj))
        .sum()
}

/// Random token rows of these lengths: start of text, ids below it, end of text.
fn random_rows(rng: &mut impl Rng, lens: &[usize], eos: u32) -> Vec<Vec<u32>> {
    lens.iter()
        .map(|&tokens| {
            let mut r = vec![eos - 1];
            r.extend((0..tokens.saturating_sub(2)).map(|_| rng.gen_range(1..eos - 2)));
            r.push(eos);
            r
        })
        .collect()
}

/// Calls `step` once to warm up, then until `seconds` have passed (at least twice); returns the
/// timed iterations and seconds.
fn time_steps(
    seconds: f64,
    mut step: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<(usize, f64)> {
    step()?;
    let budget = Duration::from_secs_f64(seconds.max(0.0));
    let start = Instant::now();
    let mut iterations = 0usize;
    // A line every few seconds, not one per iteration (thousands over the default duration).
    let mut last_report = start;
    while iterations < 2 || start.elapsed() < budget {
        step()?;
        iterations += 1;
        if last_report.elapsed() >= Duration::from_secs(5) {
            last_report = Instant::now();
            let s = start.elapsed().as_secs_f64();
            errln!(
                "{iterations} iterations in {s:.0} s ({:.3} s each)",
                s / iterations as f64
            );
        }
    }
    Ok((iterations, start.elapsed().as_secs_f64()))
}

fn cpu_matmul() -> &'static str {
    match crate::model::cpu::amx_precision() {
        None => "f32",
        Some(crate::model::amx::Precision::Bf16x3) => "amx-bf16x3",
        Some(crate::model::amx::Precision::Bf16) => "amx-bf16",
    }
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.train {
        return run_train(args);
    }
    let towers = args.select_model.unwrap_or(Towers::ALL);
    if towers.text == towers.vision {
        anyhow::bail!("bench measures one tower: --select-model clip-text or clip-vision");
    }
    let (files, opts) = args.model.resolve(towers)?;
    let enc = Encoder::load(&files, &opts)?;
    let b = args.batch_size as usize;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let config = &enc.clip.config;
    let proj = config.projection_dim;
    // Model FLOPs of one timed pass.
    let mut flops = 0f64;
    let step: Box<dyn FnMut() -> anyhow::Result<()>> = if towers.text {
        let tok = enc.tokenizer()?;
        let rows = args.text_rows(&mut rng, b, tok.context_length(), tok.pad_id())?;
        let batch = enc.text_batch(&rows)?;
        if let Some(t) = &config.text {
            flops = text_flops(t, &batch, proj);
        }
        Box::new(move || enc.embed_text_batch(&batch).map(|_| ()).map_err(Into::into))
    } else {
        let (h, w) = enc.image_preprocessor()?.output_size();
        let images: Vec<Vec<f32>> = (0..b)
            .map(|_| {
                (0..3 * h * w)
                    .map(|_| rng.gen_range(-2.0f32..2.0))
                    .collect()
            })
            .collect();
        let pixels = enc.pixel_batch(&images)?;
        if let Some(v) = &config.vision {
            flops = b as f64 * v.forward_flops(proj);
        }
        Box::new(move || {
            enc.embed_pixel_batch(&pixels)
                .map(|_| ())
                .map_err(Into::into)
        })
    };
    let (iterations, seconds) = time_steps(args.seconds, step)?;
    let result = BenchResult {
        tower: if towers.text {
            "clip-text"
        } else {
            "clip-vision"
        },
        mode: "inference",
        batch_size: b,
        items_per_second: (iterations * b) as f64 / seconds,
        text_tokens: towers.text.then_some(args.text_tokens as usize),
        text_tokens_min: args
            .text_tokens_min
            .filter(|_| towers.text)
            .map(|m| m as usize),
        iterations,
        seconds,
        device: device_name(&opts.device),
        dtype: format!("{:?}", opts.dtype).to_lowercase(),
        cpu_matmul: cpu_matmul(),
        peak_rss_mib: peak_rss_mib(),
        model_tflops: flops * iterations as f64 / seconds / 1e12,
        phases: None,
    };
    outln!("{}", serde_json::to_string(&result)?);
    Ok(())
}

/// `--train`: the training step of `clipft fit` (AdamW, lr 1e-5, weight decay 0.01) on one fixed
/// batch, so only the model, the loss and the optimiser are timed.
fn run_train(args: BenchArgs) -> anyhow::Result<()> {
    use crate::trainer::optim::{OptimizerKind, OptimizerParams};
    use crate::trainer::train::{training_dtype, TrainModel};
    // The model flags resolve as for inference; only the dtype means the compute dtype here.
    let (files, opts) = args.model.resolve(Towers::ALL)?;
    let device = opts.device;
    let dtype = training_dtype(&args.model.dtype, &device)?;
    let m = TrainModel::load(&files, &device)?
        .with_compute_dtype(dtype)?
        .freeze(&args.freeze)?;
    let mut opt = m.optimizer(OptimizerParams::new(OptimizerKind::AdamW, 1e-5, 0.01))?;
    let b = args.batch_size as usize;
    let t = args.text_tokens as usize;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let rows = args.text_rows(
        &mut rng,
        b,
        m.tokenizer.context_length(),
        m.tokenizer.pad_id(),
    )?;
    let text = crate::model::TextBatch::new(&rows, m.eos_token_id(), &device)?;
    // Model FLOPs of one step: forward, and the backward as twice the forward.
    let (cfg, proj) = (&m.config, m.config.projection_dim);
    let forward = cfg
        .text
        .as_ref()
        .map_or(0.0, |t| text_flops(t, &text, proj))
        + cfg
            .vision
            .as_ref()
            .map_or(0.0, |v| b as f64 * v.forward_flops(proj));
    let flops = 3.0 * forward;
    let (h, w) = m.images.output_size();
    let pixels = candle_core::Tensor::randn(0f32, 1.0, (b, 3, h, w), &device)?;
    let mut last_loss = f32::NAN;
    let (iterations, seconds) = time_steps(args.seconds, || {
        last_loss = m.train_step(&mut opt, &text, &pixels)?;
        Ok(())
    })?;
    errln!("last loss {last_loss:.4}");
    // A few more steps, phase by phase.
    const PROFILED: usize = 3;
    let mut sum = [0f64; 3];
    for _ in 0..PROFILED {
        let (_, p) = m.train_step_timed(&mut opt, &text, &pixels)?;
        for (s, v) in sum.iter_mut().zip([p.forward, p.backward, p.optimizer]) {
            *s += v / PROFILED as f64;
        }
    }
    let phases = crate::trainer::train::StepPhases {
        forward: sum[0],
        backward: sum[1],
        optimizer: sum[2],
    };
    let result = BenchResult {
        tower: "clip",
        mode: "train",
        batch_size: b,
        items_per_second: (iterations * b) as f64 / seconds,
        text_tokens: Some(t),
        text_tokens_min: args.text_tokens_min.map(|m| m as usize),
        iterations,
        seconds,
        device: device_name(&device),
        dtype: format!("{dtype:?}").to_lowercase(),
        cpu_matmul: cpu_matmul(),
        peak_rss_mib: peak_rss_mib(),
        model_tflops: flops * iterations as f64 / seconds / 1e12,
        phases: Some(phases),
    };
    outln!("{}", serde_json::to_string(&result)?);
    Ok(())
}
