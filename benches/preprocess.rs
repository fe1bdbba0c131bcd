//! Image preprocessing, the part Pillow does in transformers' PIL path: resize (bicubic, only the
//! window the centre crop keeps) and crop, then the whole `preprocess_bytes` (decode, resize,
//! crop, normalise), one image at a time on one thread, on the committed fixtures and the
//! extreme-aspect strips. Run with `cargo bench --bench preprocess` (or
//! `scripts/bench_preprocess.sh`, which runs Pillow on the same files beside it). One JSON line
//! per file; a benchmark, not a test.

use std::time::{Duration, Instant};

use clipft::model::{ImageConfig, ImagePreprocessor};

/// The fixtures both sides read (scripts/bench_preprocess_peer.py lists the same).
const FILES: [&str; 5] = [
    "tests/fixtures/reference/images/rgb_640x480.png",
    "tests/fixtures/reference/images/photo_500x375.jpg",
    "tests/fixtures/reference/strips/panorama_2400x40.png",
    "tests/fixtures/reference/strips/banner_36x1500.png",
    "tests/fixtures/reference/strips/strip_5000x2.png",
];

/// Mean milliseconds per call of `f`, over at least `budget` after one warm-up call.
fn time(budget: Duration, mut f: impl FnMut()) -> f64 {
    f();
    let start = Instant::now();
    let mut n = 0u32;
    while n < 5 || start.elapsed() < budget {
        f();
        n += 1;
    }
    start.elapsed().as_secs_f64() * 1e3 / n as f64
}

fn main() {
    let pre = ImagePreprocessor::new(ImageConfig::default());
    let budget = Duration::from_secs_f64(
        std::env::var("CLIPFT_BENCH_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(1.0),
    );
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for file in FILES {
        let bytes = std::fs::read(root.join(file)).expect("fixture");
        let rgb = pre.decode(&bytes).expect("decodable fixture");
        let resize_crop = time(budget, || {
            std::hint::black_box(pre.resize_and_crop(&rgb).expect("resize"));
        });
        let whole = time(budget, || {
            std::hint::black_box(pre.preprocess_bytes(&bytes).expect("preprocess"));
        });
        println!(
            "{{\"impl\": \"clipft\", \"file\": \"{file}\", \"size\": [{}, {}], \"resize_crop_ms\": {resize_crop:.4}, \"preprocess_ms\": {whole:.4}}}",
            rgb.width(),
            rgb.height()
        );
    }
}
