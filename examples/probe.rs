use candle_core::{DType, Device, Tensor};
use std::time::Instant;
fn main() -> candle_core::Result<()> {
    let d = Device::Cpu;
    for (m, k, n) in [
        (1600usize, 768usize, 768usize),
        (1600, 768, 3072),
        (1600, 3072, 768),
        (2464, 512, 512),
        (2464, 512, 2048),
    ] {
        let a = Tensor::randn(0f32, 1., (m, k), &d)?;
        let w = Tensor::randn(0f32, 1., (n, k), &d)?;
        let _ = a.matmul(&w.t()?)?;
        let t = Instant::now();
        let iters = 10;
        for _ in 0..iters {
            let _ = a.matmul(&w.t()?)?;
        }
        let s = t.elapsed().as_secs_f64() / iters as f64;
        let wc = w.t()?.contiguous()?;
        let t = Instant::now();
        for _ in 0..iters {
            let _ = a.matmul(&wc)?;
        }
        let s2 = t.elapsed().as_secs_f64() / iters as f64;
        println!(
            "{m}x{k}x{n}: w.t() {:.1} GFLOPS, contiguous kxn {:.1} GFLOPS",
            2.0 * (m * k * n) as f64 / s / 1e9,
            2.0 * (m * k * n) as f64 / s2 / 1e9
        );
    }
    let x = Tensor::randn(0f32, 1., (32 * 50, 3072), &d)?;
    let t = Instant::now();
    for _ in 0..10 {
        let _ = (&x * candle_nn::ops::sigmoid(&(&x * 1.702)?)?)?;
    }
    println!(
        "quick_gelu 1600x3072: {:.2} ms",
        t.elapsed().as_secs_f64() * 100.0
    );
    let _ = DType::F32;
    Ok(())
}
