//! `clipft bench`: model throughput on inputs that are already tokenized / preprocessed, so the
//! number is comparable with the PyTorch and ONNX Runtime peers (scripts/bench_peers.py).

use std::time::{Duration, Instant};

use clap::Args;
use rand::{Rng, SeedableRng};

use super::{parse_towers, ModelArgs};
use crate::model::{device::device_name, Encoder, Towers};

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// `clip-text` or `clip-vision`.
    #[arg(long, env = "CLIPFT_SELECT_MODEL", value_parser = parse_towers)]
    pub select_model: Towers,
    #[arg(long, env = "CLIPFT_BATCH_SIZE", default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub batch_size: u64,
    /// Measure for at least this long, after one warm-up pass.
    #[arg(long, env = "CLIPFT_SECONDS", default_value_t = 20.0)]
    pub seconds: f64,
    /// Tokens per text, start and end-of-text included.
    #[arg(long, env = "CLIPFT_TEXT_TOKENS", default_value_t = 77, value_parser = clap::value_parser!(u64).range(2..=4096))]
    pub text_tokens: u64,
}

/// One benchmark result, printed as the last line.
#[derive(Debug, serde::Serialize)]
pub struct BenchResult {
    pub tower: &'static str,
    pub batch_size: usize,
    pub items_per_second: f64,
    pub text_tokens: Option<usize>,
    pub iterations: usize,
    pub seconds: f64,
    pub device: String,
    pub dtype: String,
    /// The CPU matmul kernel actually used: `f32`, `amx-bf16x3` or `amx-bf16`.
    pub cpu_matmul: &'static str,
    pub peak_rss_mib: Option<f64>,
}

/// Peak resident memory of this process, from /proc (Linux).
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let towers = args.select_model;
    if towers.text == towers.vision {
        anyhow::bail!("bench measures one tower: --select-model clip-text or clip-vision");
    }
    let (files, opts) = args.model.resolve(towers)?;
    let enc = Encoder::load(&files, &opts)?;
    let b = args.batch_size as usize;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let mut step: Box<dyn FnMut() -> anyhow::Result<()>> = if towers.text {
        let t = args.text_tokens as usize;
        let ctx = enc.tokenizer()?.context_length();
        if t > ctx {
            anyhow::bail!("--text-tokens {t} is over the model's context of {ctx}");
        }
        let eos = enc.tokenizer()?.pad_id();
        let rows: Vec<Vec<u32>> = (0..b)
            .map(|_| {
                let mut r = vec![eos - 1];
                r.extend((0..t - 2).map(|_| rng.gen_range(1..eos - 2)));
                r.push(eos);
                r
            })
            .collect();
        Box::new(move || enc.embed_token_rows(&rows).map(|_| ()).map_err(Into::into))
    } else {
        let (h, w) = enc.image_preprocessor()?.output_size();
        let images: Vec<Vec<f32>> = (0..b)
            .map(|_| {
                (0..3 * h * w)
                    .map(|_| rng.gen_range(-2.0f32..2.0))
                    .collect()
            })
            .collect();
        Box::new(move || enc.embed_pixels(&images).map(|_| ()).map_err(Into::into))
    };
    step()?;
    let budget = Duration::from_secs_f64(args.seconds.max(0.0));
    let start = Instant::now();
    let mut iterations = 0usize;
    while iterations < 2 || start.elapsed() < budget {
        let t0 = Instant::now();
        step()?;
        iterations += 1;
        eprintln!(
            "iteration {iterations}: {:.3} s",
            t0.elapsed().as_secs_f64()
        );
    }
    let seconds = start.elapsed().as_secs_f64();
    let result = BenchResult {
        tower: if towers.text {
            "clip-text"
        } else {
            "clip-vision"
        },
        batch_size: b,
        items_per_second: (iterations * b) as f64 / seconds,
        text_tokens: towers.text.then_some(args.text_tokens as usize),
        iterations,
        seconds,
        device: device_name(&opts.device),
        dtype: format!("{:?}", opts.dtype).to_lowercase(),
        cpu_matmul: match crate::model::cpu::amx_precision() {
            None => "f32",
            Some(crate::model::amx::Precision::Bf16x3) => "amx-bf16x3",
            Some(crate::model::amx::Precision::Bf16) => "amx-bf16",
        },
        peak_rss_mib: peak_rss_mib(),
    };
    println!("{}", serde_json::to_string(&result)?);
    Ok(())
}
