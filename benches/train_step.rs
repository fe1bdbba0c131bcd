//! Training throughput: AdamW steps of CLIPLoss on a model folder (default: the random ViT-B/32
//! that `scripts/make_fixtures.py --full-size target/vit-b-32` writes) with random tokens and
//! pixels. `cargo bench --bench train_step -- [MODEL] [BATCH] [STEPS]`; prints pairs per second.
//! scripts/bench_train_peer.py runs the same steps in PyTorch.

use std::time::Instant;

use candle_core::{Device, Tensor};
use clipft::model::ModelFiles;
use clipft::trainer::optim::{OptimizerKind, OptimizerParams};
use clipft::trainer::train::TrainModel;
use rand::{Rng, SeedableRng};

fn main() {
    // The allocator settings the clipft binary runs with.
    clipft::cli::tune_allocator();
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let model = args
        .first()
        .cloned()
        .unwrap_or_else(|| format!("{}/target/vit-b-32", env!("CARGO_MANIFEST_DIR")));
    let batch: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(8);
    let steps: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(5);
    let files = ModelFiles::from_dir(std::path::Path::new(&model)).expect("model folder");
    let m = TrainModel::load(&files, &Device::Cpu).expect("load");
    let mut opt = m
        .optimizer(OptimizerParams::new(OptimizerKind::AdamW, 1e-5, 0.01))
        .expect("optimizer");
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let rows: Vec<Vec<u32>> = (0..batch)
        .map(|_| {
            let mut r = vec![49406];
            r.extend((0..75).map(|_| rng.gen_range(1..49400)));
            r.push(49407);
            r
        })
        .collect();
    let text = clipft::model::TextBatch::new(&rows, 2, &Device::Cpu).unwrap();
    let (h, w) = m.images.output_size();
    let pixels = Tensor::randn(0f32, 1.0, (batch, 3, h, w), &Device::Cpu).unwrap();
    m.train_step(&mut opt, &text, &pixels).unwrap();
    let t = Instant::now();
    for _ in 0..steps {
        let s = Instant::now();
        let loss = m.train_step(&mut opt, &text, &pixels).unwrap();
        eprintln!("step: {:.2} s, loss {loss:.4}", s.elapsed().as_secs_f64());
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "{{\"peer\": \"clipft\", \"batch_size\": {batch}, \"steps\": {steps}, \"text_tokens\": 77, \"pairs_per_second\": {:.3}}}",
        (steps * batch) as f64 / secs
    );
}
