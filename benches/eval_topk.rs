//! Exact text-to-image evaluation at scale: 10,000 queries against 100,000 index embeddings of
//! 512 dimensions (precomputed), 100 labels, top 20. Run with `cargo bench --bench eval_topk`.
//! Prints the wall time of `clipft::eval::evaluate`; a benchmark, not a test.

use std::time::Instant;

use clipft::eval::{evaluate, LabeledEmbeddings};

fn random(n: usize, dim: usize, labels: usize, seed: u64) -> LabeledEmbeddings {
    let mut s = seed;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    LabeledEmbeddings {
        ids: (0..n).map(|i| format!("{seed}-{i}")).collect(),
        labels: (0..n).map(|i| (i % labels).to_string()).collect(),
        embeddings: (0..n * dim).map(|_| next()).collect(),
        dim,
    }
}

fn main() {
    let (nq, nx, dim) = (10_000, 100_000, 512);
    let q = random(nq, dim, 100, 1);
    let x = random(nx, dim, 100, 2);
    let start = Instant::now();
    let ev = evaluate(&q, &x, 20, false).expect("evaluation");
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{{\"queries\": {nq}, \"index\": {nx}, \"dim\": {dim}, \"seconds\": {secs:.2}, \"precision_at_k\": {:.4}}}",
        ev.mean.precision_at_k
    );
}
