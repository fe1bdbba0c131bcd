//! Parity with Hugging Face transformers on the committed fixtures (made by
//! scripts/make_fixtures.py): token ids, preprocessed pixels and embeddings.

use std::path::{Path, PathBuf};

use clipft::model::{Encoder, LoadOptions, ModelFiles, Towers};
use serde::Deserialize;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

#[derive(Deserialize)]
struct TextRef {
    text: String,
    ids: Vec<u32>,
    embedding: Vec<f32>,
}

#[derive(Deserialize)]
struct TextBatchRef {
    texts: Vec<String>,
    ids_padded: Vec<Vec<u32>>,
    embeddings: Vec<Vec<f32>>,
}

#[derive(Deserialize)]
struct ImageRef {
    file: String,
    pixels: String,
    embedding: Vec<f32>,
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// The L2 norm of every value of `t` (f32).
fn l2_norm(t: &candle_core::Tensor) -> f32 {
    t.sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .sqrt()
}

fn read_json<T: for<'de> Deserialize<'de>>(p: &Path) -> T {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn load(dir: &Path, towers: Towers) -> Encoder {
    let files = ModelFiles::from_dir(dir).unwrap();
    Encoder::load(
        &files,
        &LoadOptions {
            towers,
            ..Default::default()
        },
    )
    .unwrap()
}

/// Runs the text checks against a model folder and its reference folder.
fn check_texts(model: &Path, reference: &Path, min_cos: f64) {
    let enc = load(model, Towers::TEXT);
    let tok = enc.tokenizer().unwrap();
    let refs: Vec<TextRef> = read_json(&reference.join("texts.json"));
    let mut worst = 1f64;
    assert!(refs.len() >= 10);
    for r in &refs {
        assert_eq!(
            tok.encode(&r.text).unwrap(),
            r.ids,
            "token ids of {:?}",
            r.text
        );
        let e = enc.embed_texts(&[&r.text]).unwrap();
        let c = cosine(&e[0], &r.embedding);
        worst = worst.min(c);
        assert!(c >= min_cos, "text {:?}: cosine {c}", r.text);
    }
    eprintln!("{}: lowest text cosine {worst:.9}", model.display());
    if reference.join("text_batch.json").exists() {
        let b: TextBatchRef = read_json(&reference.join("text_batch.json"));
        assert_eq!(tok.encode_batch(&b.texts).unwrap(), b.ids_padded);
        let e = enc.embed_texts(&b.texts).unwrap();
        for (i, (x, y)) in e.iter().zip(&b.embeddings).enumerate() {
            let c = cosine(x, y);
            assert!(c >= min_cos, "batched text {i}: cosine {c}");
        }
    }
}

fn check_images(model: &Path, reference: &Path, min_cos: f64) {
    let enc = load(model, Towers::VISION);
    let pre = enc.image_preprocessor().unwrap();
    let refs: Vec<ImageRef> = read_json(&reference.join("images.json"));
    let images = fixtures().join("reference/images");
    let mut pixels = Vec::new();
    for r in &refs {
        let bytes = std::fs::read(images.join(&r.file)).unwrap();
        let rgb = pre.decode(&bytes).unwrap();
        let ours = pre.resize_and_crop(&rgb).unwrap();
        let theirs = image::open(images.join(&r.pixels)).unwrap().to_rgb8();
        assert_eq!(ours.dimensions(), theirs.dimensions(), "{}", r.file);
        let max_diff = ours
            .as_raw()
            .iter()
            .zip(theirs.as_raw())
            .map(|(a, b)| (*a as i32 - *b as i32).abs())
            .max()
            .unwrap();
        // JPEG decoders differ (IDCT, chroma upsampling); only the embedding is compared there.
        if !r.file.ends_with(".jpg") {
            assert!(
                max_diff <= 2,
                "{}: pixels differ by {max_diff} levels",
                r.file
            );
        }
        pixels.push(pre.preprocess_bytes(&bytes).unwrap());
    }
    let embs = enc.embed_pixels(&pixels).unwrap();
    let mut worst = 1f64;
    for (r, e) in refs.iter().zip(&embs) {
        let c = cosine(e, &r.embedding);
        worst = worst.min(c);
        assert!(c >= min_cos, "image {}: cosine {c}", r.file);
    }
    eprintln!("{}: lowest image cosine {worst:.9}", model.display());
}

#[test]
fn tiny_text_tower_matches_transformers() {
    check_texts(
        &fixtures().join("clip-tiny"),
        &fixtures().join("reference"),
        0.99999,
    );
}

#[test]
fn tiny_vision_tower_matches_transformers() {
    check_images(
        &fixtures().join("clip-tiny"),
        &fixtures().join("reference"),
        0.9999,
    );
}

#[test]
fn both_towers_in_one_model() {
    let enc = load(&fixtures().join("clip-tiny"), Towers::ALL);
    assert_eq!(enc.output_dim(), 32);
    let t = enc.embed_texts(&["a red striped dress"]).unwrap();
    assert_eq!(t[0].len(), 32);
    assert!(enc.clip.logit_scale.is_some());
}

/// Full-size random ViT-B/32 (`python scripts/make_fixtures.py --full-size target/vit-b-32`).
/// Panoramas, banners and strips (scripts/make_strip_fixtures.py): clipft resamples only the
/// window the centre crop keeps, and must give transformers' pixels exactly, so the same
/// embedding.
#[test]
fn extreme_aspect_ratios_match_transformers_pixels() {
    let enc = load(&fixtures().join("clip-tiny"), Towers::VISION);
    let pre = enc.image_preprocessor().unwrap();
    let dir = fixtures().join("reference/strips");
    for name in ["panorama_2400x40", "banner_36x1500", "strip_5000x2"] {
        let bytes = std::fs::read(dir.join(format!("{name}.png"))).unwrap();
        let ours = pre.resize_and_crop(&pre.decode(&bytes).unwrap()).unwrap();
        let theirs = image::open(dir.join(format!("{name}.pixels.png")))
            .unwrap()
            .to_rgb8();
        assert!(ours == theirs, "{name}: pixels differ from Pillow's");
    }
}

fn full_size_dir() -> PathBuf {
    std::env::var_os("CLIPFT_FULL_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/vit-b-32"))
}

#[test]
#[ignore = "needs the full-size model written by scripts/make_fixtures.py --full-size"]
fn full_size_vit_b_32_matches_transformers() {
    let dir = full_size_dir();
    check_texts(&dir, &dir.join("reference"), 0.99999);
    check_images(&dir, &dir.join("reference"), 0.9999);
}

/// The fused CPU kernels (inference) and the differentiable composition (training) are the same
/// model: their outputs agree on both towers.
#[test]
fn inference_and_training_modes_agree() {
    use clipft::model::{Mode, TextBatch};
    let enc = load(&fixtures().join("clip-tiny"), Towers::ALL);
    let rows = enc
        .tokenizer()
        .unwrap()
        .encode_batch(&[
            "a red striped dress",
            "",
            "3 blue shirts, size 42 and more words here",
        ])
        .unwrap();
    let batch = TextBatch::new(&rows, enc.eos_token_id().unwrap(), &enc.device).unwrap();
    let a = enc
        .clip
        .text_features(&batch, Mode::Inference)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let b = enc
        .clip
        .text_features(&batch, Mode::Train)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    for (x, y) in a.iter().zip(&b) {
        assert!(cosine(x, y) > 0.999999, "text: {}", cosine(x, y));
    }
    let pixels = candle_core::Tensor::randn(0f32, 1.0, (3, 3, 224, 224), &enc.device).unwrap();
    let a = enc
        .clip
        .image_features(&pixels, Mode::Inference)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let b = enc
        .clip
        .image_features(&pixels, Mode::Train)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    for (x, y) in a.iter().zip(&b) {
        assert!(cosine(x, y) > 0.999999, "image: {}", cosine(x, y));
    }
}

/// The tiny model with `hidden_act: "gelu"` in both towers (as OpenCLIP/LAION conversions
/// have it), in a folder of its own: the same weights, another activation.
pub fn gelu_copy(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("clipft-gelu-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let src = fixtures().join("clip-tiny");
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    let cfg = std::fs::read_to_string(src.join("config.json")).unwrap();
    assert_eq!(cfg.matches("\"quick_gelu\"").count(), 2);
    std::fs::write(
        dir.join("config.json"),
        cfg.replace("\"quick_gelu\"", "\"gelu\""),
    )
    .unwrap();
    dir
}

/// [`gelu_copy`] with fewer, wider heads (1 in the text tower, 2 in the vision tower): the same
/// weights (q/k/v are `[dim, dim]` whatever the heads), heads 32 and 64 wide instead of the
/// fixture's 8 and 16, which the fused attention kernel takes, so the GPU path runs it.
pub fn wide_heads_copy(name: &str) -> PathBuf {
    let dir = gelu_copy(name);
    let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    json["text_config"]["num_attention_heads"] = 1.into();
    json["vision_config"]["num_attention_heads"] = 2.into();
    std::fs::write(dir.join("config.json"), json.to_string()).unwrap();
    dir
}

/// The fused inference kernels run gelu checkpoints too, with the values of candle's own ops
/// (the training path); the activation is not quietly swapped for quick_gelu.
#[test]
fn gelu_checkpoints_run_fused_with_candles_values() {
    use clipft::model::{Mode, TextBatch};
    let enc = load(&gelu_copy("modes"), Towers::ALL);
    let quick = load(&fixtures().join("clip-tiny"), Towers::ALL);
    let rows = enc
        .tokenizer()
        .unwrap()
        .encode_batch(&["a red striped dress", "3 blue shirts"])
        .unwrap();
    let batch = TextBatch::new(&rows, enc.eos_token_id().unwrap(), &enc.device).unwrap();
    let text = |e: &Encoder, m| {
        e.clip
            .text_features(&batch, m)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap()
    };
    let pixels = candle_core::Tensor::randn(0f32, 1.0, (2, 3, 224, 224), &enc.device).unwrap();
    let image = |e: &Encoder, m| {
        e.clip
            .image_features(&pixels, m)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap()
    };
    for (fused, reference, other) in [
        (
            text(&enc, Mode::Inference),
            text(&enc, Mode::Train),
            text(&quick, Mode::Inference),
        ),
        (
            image(&enc, Mode::Inference),
            image(&enc, Mode::Train),
            image(&quick, Mode::Inference),
        ),
    ] {
        let diff = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max)
        };
        for ((x, y), q) in fused.iter().zip(&reference).zip(&other) {
            assert!(
                cosine(x, y) > 0.999999,
                "fused gelu vs candle: {}",
                cosine(x, y)
            );
            // The two activations are close; what separates them must dwarf rounding.
            assert!(
                diff(x, q) > 100.0 * diff(x, y),
                "gelu gave quick_gelu's values: {} vs {}",
                diff(x, q),
                diff(x, y)
            );
        }
    }
}

/// One contrastive step from a VarMap: every trainable tensor, `logit_scale` included, receives a
/// non-zero gradient (candle's fused layer norm would silently drop most of them).
#[test]
fn every_weight_gets_a_gradient() {
    use candle_core::{DType, Device, Tensor, D};
    use candle_nn::{VarBuilder, VarMap};
    use clipft::model::{Clip, ClipConfig, Mode, TextBatch};
    let dir = fixtures().join("clip-tiny");
    let config = ClipConfig::from_file(&dir.join("config.json")).unwrap();
    let mut varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let kernels = clipft::model::policy::Kernels::decide(&Device::Cpu, DType::F32);
    let clip = Clip::new(vb, &config, Towers::ALL, kernels).unwrap();
    varmap.load(dir.join("model.safetensors")).unwrap();
    let enc = load(&dir, Towers::TEXT);
    let rows = enc
        .tokenizer()
        .unwrap()
        .encode_batch(&["a red dress", "a blue shirt", "a cat"])
        .unwrap();
    let batch = TextBatch::new(&rows, 2, &Device::Cpu).unwrap();
    let pixels = Tensor::randn(0f32, 1.0, (3, 3, 224, 224), &Device::Cpu).unwrap();
    let norm = |t: Tensor| {
        t.broadcast_div(
            &t.sqr()
                .unwrap()
                .sum_keepdim(D::Minus1)
                .unwrap()
                .sqrt()
                .unwrap(),
        )
        .unwrap()
    };
    let loss = || -> candle_core::Result<Tensor> {
        let t = norm(clip.text_features(&batch, Mode::Train)?);
        let i = norm(clip.image_features(&pixels, Mode::Train)?);
        let scale = clip.logit_scale.as_ref().unwrap().exp()?;
        let logits = t.matmul(&i.t()?)?.broadcast_mul(&scale)?;
        let labels = Tensor::new(&[0u32, 1, 2], &Device::Cpu)?;
        (candle_nn::loss::cross_entropy(&logits, &labels)?
            + candle_nn::loss::cross_entropy(&logits.t()?, &labels)?)?
            / 2.0
    };
    // Per op (candle's graph of train_ops' kernels), and through the fused block and embedding
    // ops that a training step runs (train_block, train_embed).
    let grads = loss().unwrap().backward().unwrap();
    let (fused_loss, fused) = clipft::model::train_ops::with_direct_weight_grads(|| {
        let l = loss()?;
        let g = l.backward()?;
        candle_core::Result::Ok((l, g))
    })
    .unwrap();
    let plain_loss = loss().unwrap().to_scalar::<f32>().unwrap();
    let fused_loss = fused_loss.to_scalar::<f32>().unwrap();
    assert!(
        (plain_loss - fused_loss).abs() <= 1e-5 * plain_loss.abs(),
        "loss {plain_loss} per op, {fused_loss} fused"
    );
    let vars = varmap.data().lock().unwrap();
    assert!(vars.len() > 40, "{} vars", vars.len());
    let mut missing = Vec::new();
    for (name, var) in vars.iter() {
        // Position rows past the longest text and unused vocabulary rows get no gradient, but
        // every tensor as a whole must.
        let g = grads.get(var.as_tensor());
        let sum_abs = |g: &Tensor| {
            g.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        if g.map(sum_abs).is_none_or(|s| s <= 0.0) {
            missing.push(name.clone());
            continue;
        }
        let (g, f) = (g.unwrap(), fused.get(var.as_tensor()));
        let f = f.unwrap_or_else(|| panic!("{name}: no gradient from the fused ops"));
        let rel = (sum_abs(&(g - f).unwrap().sqr().unwrap()).sqrt()
            / sum_abs(&g.sqr().unwrap()).sqrt())
        .max(0.0);
        // Only the order of additions differs; a key bias's gradient is rounding noise on both
        // sides (softmax ignores it), so it is compared by size only.
        if name.ends_with("k_proj.bias") {
            assert!(sum_abs(f) < 1e-4, "{name}: {}", sum_abs(f));
        } else {
            assert!(
                rel < 1e-4,
                "{name}: fused gradient off by {rel:.2e} (relative)"
            );
        }
    }
    assert!(missing.is_empty(), "no gradient for {missing:?}");
}

/// Half precision runs candle's graph (the path GPUs take): still the same embeddings, to the
/// precision of the format.
#[test]
fn half_precision_weights_agree() {
    use candle_core::DType;
    let dir = fixtures().join("clip-tiny");
    let files = ModelFiles::from_dir(&dir).unwrap();
    let full = load(&dir, Towers::ALL);
    let png = std::fs::read(fixtures().join("reference/images/rgb_300x200.png")).unwrap();
    for (dtype, min_cos) in [(DType::F16, 0.9999), (DType::BF16, 0.999)] {
        let opts = LoadOptions {
            towers: Towers::ALL,
            dtype,
            ..Default::default()
        };
        let half = Encoder::load(&files, &opts).unwrap();
        let texts = ["a red striped dress", "3 blue shirts, size 42"];
        for (a, b) in full
            .embed_texts(&texts)
            .unwrap()
            .iter()
            .zip(half.embed_texts(&texts).unwrap())
        {
            assert!(cosine(a, &b) > min_cos, "{dtype:?} text: {}", cosine(a, &b));
        }
        let px = full
            .image_preprocessor()
            .unwrap()
            .preprocess_bytes(&png)
            .unwrap();
        let a = full.embed_pixels(std::slice::from_ref(&px)).unwrap();
        let b = half.embed_pixels(&[px]).unwrap();
        assert!(
            cosine(&a[0], &b[0]) > min_cos,
            "{dtype:?} image: {}",
            cosine(&a[0], &b[0])
        );
    }
}

/// The GPU inference path of the layers (fused attention, fused linear tails, the embeddings as
/// one op each), run on the CPU
/// through the kernels' twins, gives the embeddings of candle's composed ops and of the fused
/// CPU blocks: the layer plumbing a GPU runs is checked here, not only the kernels. Text (causal)
/// and image towers, quick_gelu and gelu checkpoints.
#[test]
fn the_gpu_layer_path_matches_on_the_cpu() {
    use candle_core::{DType, Device, Tensor};
    use candle_nn::VarBuilder;
    use clipft::model::policy::Kernels;
    use clipft::model::{Clip, ClipConfig, Mode, TextBatch};
    // The fixture's heads are 8 and 16 wide, too narrow for the fused attention kernel; the
    // wide-heads copy runs it too.
    let wide = wide_heads_copy("gpu-path-wide");
    for dir in [fixtures().join("clip-tiny"), gelu_copy("gpu-path"), wide] {
        let config = ClipConfig::from_file(&dir.join("config.json")).unwrap();
        let build = |kernels: Kernels| {
            // SAFETY: the fixture is not modified while the test maps it.
            let vb = unsafe {
                VarBuilder::from_mmaped_safetensors(
                    &[dir.join("model.safetensors")],
                    DType::F32,
                    &Device::Cpu,
                )
            }
            .unwrap();
            Clip::new(vb, &config, Towers::ALL, kernels).unwrap()
        };
        let gpu_path = build(Kernels {
            fused_gpu: true,
            packed_text: true,
            tc_attention: true,
            residual_norm: true,
            embed: true,
            ..Kernels::CANDLE
        });
        let candle = build(Kernels::CANDLE);
        let cpu_fused = build(Kernels::decide(&Device::Cpu, DType::F32));
        let enc = load(&dir, Towers::TEXT);
        let rows = enc
            .tokenizer()
            .unwrap()
            .encode_batch(&["a red striped dress", "3 blue shirts on a chair", "hat"])
            .unwrap();
        let batch = TextBatch::new(&rows, enc.eos_token_id().unwrap(), &Device::Cpu).unwrap();
        let pixels = Tensor::randn(0f32, 1.0, (2, 3, 224, 224), &Device::Cpu).unwrap();
        let features = |c: &Clip| {
            let t = c.text_features(&batch, Mode::Inference).unwrap();
            let i = c.image_features(&pixels, Mode::Inference).unwrap();
            (t.to_vec2::<f32>().unwrap(), i.to_vec2::<f32>().unwrap())
        };
        let (gt, gi) = features(&gpu_path);
        for other in [&candle, &cpu_fused] {
            let (ot, oi) = features(other);
            for (a, b) in gt.iter().zip(&ot).chain(gi.iter().zip(&oi)) {
                let c = cosine(a, b);
                assert!(c > 0.999999, "{}: cosine {c}", dir.display());
            }
        }
    }
}

/// The GPU training path (attention over the stacked projection, layer norm, linear tails and
/// the embeddings as ops with their own backward, the last block on the pooled rows; op by op,
/// and each block
/// as one node), run on the CPU through the kernels' twins, gives candle's loss and every
/// weight's gradient: the backward a GPU
/// runs is checked here, kernels' algorithms and plumbing, not only the forward.
#[test]
fn the_gpu_training_path_matches_on_the_cpu() {
    use candle_core::{DType, Device, Tensor};
    use candle_nn::{VarBuilder, VarMap};
    use clipft::model::policy::Kernels;
    use clipft::model::{Clip, ClipConfig, Mode, TextBatch};
    let wide = wide_heads_copy("gpu-train-wide");
    let pixels = Tensor::randn(0f32, 1.0, (3, 3, 224, 224), &Device::Cpu).unwrap();
    for dir in [fixtures().join("clip-tiny"), wide] {
        let config = ClipConfig::from_file(&dir.join("config.json")).unwrap();
        let enc = load(&dir, Towers::TEXT);
        let rows = enc
            .tokenizer()
            .unwrap()
            .encode_batch(&["a red striped dress", "3 blue shirts on a chair", "hat"])
            .unwrap();
        let batch = TextBatch::new(&rows, enc.eos_token_id().unwrap(), &Device::Cpu).unwrap();
        let step = |kernels: Kernels| {
            let mut varmap = VarMap::new();
            let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
            let clip = Clip::new(vb, &config, Towers::ALL, kernels).unwrap();
            varmap.load(dir.join("model.safetensors")).unwrap();
            // As a training step runs (the GPU path's block nodes need it).
            let (loss, grads) = clipft::model::train_ops::with_direct_weight_grads(|| {
                let t = clip.text_features(&batch, Mode::Train)?;
                let i = clip.image_features(&pixels, Mode::Train)?;
                let scale = clip.logit_scale.clone().unwrap();
                let loss = clipft::trainer::loss::clip_loss(&t, &i, &scale)?;
                let grads = loss.backward()?;
                Ok::<_, candle_core::Error>((loss, grads))
            })
            .unwrap();
            let vars = varmap.data().lock().unwrap();
            let mut out: Vec<(String, Option<Tensor>)> = vars
                .iter()
                .map(|(n, v)| (n.clone(), grads.get(v.as_tensor()).cloned()))
                .collect();
            out.sort_by(|a, b| a.0.cmp(&b.0));
            (loss.to_scalar::<f32>().unwrap(), out)
        };
        let gpu_path = |train_blocks| Kernels {
            fused_gpu: true,
            train_blocks,
            packed_text: true,
            tc_attention: true,
            residual_norm: true,
            embed: true,
            ..Kernels::CANDLE
        };
        let (loss, candle) = step(Kernels::CANDLE);
        // Op by op, and each block as one node.
        for train_blocks in [false, true] {
            let (gpu_loss, gpu) = step(gpu_path(train_blocks));
            let what = format!("{} (blocks as nodes: {train_blocks})", dir.display());
            assert!(
                (gpu_loss - loss).abs() <= 1e-5 * loss.abs(),
                "{what}: loss {gpu_loss} on the GPU path, {loss} with candle's ops"
            );
            for ((name, g), (_, c)) in gpu.iter().zip(&candle) {
                let c = c
                    .as_ref()
                    .unwrap_or_else(|| panic!("{name}: no gradient from candle"));
                let g = g
                    .as_ref()
                    .unwrap_or_else(|| panic!("{name}: no gradient on the GPU path"));
                // A key bias's gradient is rounding noise on both sides (softmax ignores it).
                if name.ends_with("k_proj.bias") {
                    assert!(l2_norm(g) < 1e-4, "{name}: {}", l2_norm(g));
                    continue;
                }
                let rel = l2_norm(&(g - c).unwrap()) / l2_norm(c).max(1e-12);
                assert!(rel < 1e-4, "{what}: {name} off by {rel:.2e}");
            }
        }
    }
}

/// On the GPU path inference multiplies by a stacked copy of the q, k and v weights, and closes
/// each residual branch with copies of the closing bias and the next layer norm's weights
/// (the residual-norm kernel's parameters), all made on first use. A model whose variables
/// changed since (training between evaluations) must not serve the stale copies once
/// `with_fresh_packing` was asked for.
#[test]
fn stacked_projections_follow_weight_updates() {
    use candle_core::{DType, Device};
    use candle_nn::{VarBuilder, VarMap};
    use clipft::model::policy::Kernels;
    use clipft::model::{Clip, ClipConfig, Mode, TextBatch};
    let dir = wide_heads_copy("stacked-fresh");
    let config = ClipConfig::from_file(&dir.join("config.json")).unwrap();
    let mut varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let kernels = Kernels {
        fused_gpu: true,
        packed_text: true,
        tc_attention: true,
        residual_norm: true,
        embed: true,
        ..Kernels::CANDLE
    };
    let clip = Clip::new(vb, &config, Towers::TEXT, kernels).unwrap();
    varmap.load(dir.join("model.safetensors")).unwrap();
    let enc = load(&dir, Towers::TEXT);
    let rows = enc
        .tokenizer()
        .unwrap()
        .encode_batch(&["a red dress", "a hat"])
        .unwrap();
    let batch = TextBatch::new(&rows, enc.eos_token_id().unwrap(), &Device::Cpu).unwrap();
    let features = |c: &Clip| {
        c.text_features(&batch, Mode::Inference)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap()
    };
    let before = features(&clip);
    {
        let vars = varmap.data().lock().unwrap();
        for (name, by) in [
            ("text_model.encoder.layers.0.self_attn.q_proj.weight", 3.0),
            ("text_model.encoder.layers.0.layer_norm2.weight", 0.5),
            ("text_model.encoder.layers.1.layer_norm1.weight", 2.0),
        ] {
            let v = &vars[name];
            v.set(&(v.as_tensor() * by).unwrap()).unwrap();
        }
    }
    let stale = features(&clip);
    let fresh = features(&clip.with_fresh_packing());
    let built = Clip::new(
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
        &config,
        Towers::TEXT,
        kernels,
    )
    .unwrap();
    let want = features(&built);
    // The clone kept its copy (nothing recomputed per call); the fresh one follows the update.
    assert_eq!(stale, before);
    for (a, b) in fresh.iter().zip(&want) {
        assert!(cosine(a, b) > 0.999999, "{}", cosine(a, b));
    }
    assert!(
        cosine(&fresh[0], &before[0]) < 0.9999,
        "the update changed nothing"
    );
}

/// The GPU training path in bf16, the dtype a GPU trains in by default, run on the CPU through
/// the kernels' twins: its loss and gradients agree with candle's ops in bf16 and with f32 to
/// bf16's precision (the twins round each op's output to bf16 as the kernels do).
#[test]
fn the_gpu_training_path_in_bf16_matches_on_the_cpu() {
    use candle_core::{DType, Device, Tensor, Var};
    use candle_nn::VarBuilder;
    use clipft::model::policy::Kernels;
    use clipft::model::{Clip, ClipConfig, Mode, TextBatch};
    let dir = wide_heads_copy("gpu-train-bf16");
    let config = ClipConfig::from_file(&dir.join("config.json")).unwrap();
    let weights =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let enc = load(&dir, Towers::TEXT);
    let rows = enc
        .tokenizer()
        .unwrap()
        .encode_batch(&["a red striped dress", "3 blue shirts on a chair", "hat"])
        .unwrap();
    let batch = TextBatch::new(&rows, enc.eos_token_id().unwrap(), &Device::Cpu).unwrap();
    let pixels = Tensor::randn(0f32, 1.0, (3, 3, 224, 224), &Device::Cpu).unwrap();
    // The loss and each weight's gradient (as f32, by name) of one pass in `dtype`.
    let step = |kernels: Kernels, dtype: DType| {
        let vars: Vec<(String, Var)> = weights
            .iter()
            .map(|(n, t)| {
                (
                    n.clone(),
                    Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap(),
                )
            })
            .collect();
        let tensors = vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        let vb = VarBuilder::from_tensors(tensors, dtype, &Device::Cpu);
        let clip = Clip::new(vb, &config, Towers::ALL, kernels).unwrap();
        let t = clip.text_features(&batch, Mode::Train).unwrap();
        let i = clip.image_features(&pixels, Mode::Train).unwrap();
        let scale = clip.logit_scale.clone().unwrap();
        let loss = clipft::trainer::loss::clip_loss(&t, &i, &scale).unwrap();
        let grads = loss.backward().unwrap();
        let mut out: Vec<(String, Tensor)> = vars
            .iter()
            .filter_map(|(n, v)| {
                let g = grads.get(v.as_tensor())?;
                Some((n.clone(), g.to_dtype(DType::F32).unwrap()))
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        let loss = loss
            .to_dtype(DType::F32)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        (loss, out)
    };
    let gpu = Kernels {
        fused_gpu: true,
        packed_text: true,
        tc_attention: true,
        residual_norm: true,
        embed: true,
        ..Kernels::CANDLE
    };
    let (gpu_loss, gpu_grads) = step(gpu, DType::BF16);
    let (candle_loss, candle_grads) = step(Kernels::CANDLE, DType::BF16);
    let (f32_loss, f32_grads) = step(Kernels::CANDLE, DType::F32);
    for (what, other) in [("candle bf16", candle_loss), ("f32", f32_loss)] {
        assert!(
            (gpu_loss - other).abs() <= 3e-2 * other.abs().max(1.0),
            "loss {gpu_loss} on the GPU path in bf16, {other} with {what}"
        );
    }
    let names: Vec<&String> = f32_grads.iter().map(|(n, _)| n).collect();
    assert_eq!(gpu_grads.len(), f32_grads.len(), "gradients for {names:?}");
    let cos = |a: &Tensor, b: &Tensor| {
        let dot = (a * b)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        dot / (l2_norm(a) * l2_norm(b)).max(1e-20)
    };
    for (((name, g), (_, c)), (_, f)) in gpu_grads.iter().zip(&candle_grads).zip(&f32_grads) {
        // A key bias's gradient is rounding noise everywhere (softmax ignores it).
        if name.ends_with("k_proj.bias") {
            continue;
        }
        let (to_candle, to_f32) = (cos(g, c), cos(g, f));
        assert!(
            to_candle > 0.99 && to_f32 > 0.99,
            "{name}: cosine {to_candle} to candle's bf16 gradient, {to_f32} to f32's"
        );
    }
}

/// Serving on the GPU path releases the separate q, k and v weights once they are stacked
/// (they would double in GPU memory), and the embeddings do not change.
#[test]
fn serving_releases_the_separate_projections_on_the_gpu_path() {
    use candle_core::{DType, Device, Tensor};
    use candle_nn::VarBuilder;
    use clipft::model::policy::Kernels;
    use clipft::model::{Clip, ClipConfig, Mode, TextBatch};
    let dir = wide_heads_copy("gpu-release");
    let config = ClipConfig::from_file(&dir.join("config.json")).unwrap();
    // SAFETY: the fixture is not modified while the test maps it.
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[dir.join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
    }
    .unwrap();
    let kernels = Kernels {
        fused_gpu: true,
        packed_text: true,
        tc_attention: true,
        residual_norm: true,
        embed: true,
        ..Kernels::CANDLE
    };
    let mut clip = Clip::new(vb, &config, Towers::ALL, kernels).unwrap();
    let enc = load(&dir, Towers::TEXT);
    let rows = enc
        .tokenizer()
        .unwrap()
        .encode_batch(&["a red dress", "two hats"])
        .unwrap();
    let batch = TextBatch::new(&rows, enc.eos_token_id().unwrap(), &Device::Cpu).unwrap();
    let pixels = Tensor::randn(0f32, 1.0, (2, 3, 224, 224), &Device::Cpu).unwrap();
    let features = |c: &Clip| {
        (
            c.text_features(&batch, Mode::Inference)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap(),
            c.image_features(&pixels, Mode::Inference)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap(),
        )
    };
    let before = features(&clip);
    let released = clip.release_packed_weights().unwrap();
    // Every layer's q, k and v weights and biases, both towers, f32.
    let (t, v) = (
        config.text.as_ref().unwrap(),
        config.vision.as_ref().unwrap(),
    );
    let per = |d: usize, layers: usize| layers * 3 * (d * d + d) * 4;
    let want = per(t.hidden_size, t.num_hidden_layers) + per(v.hidden_size, v.num_hidden_layers);
    assert_eq!(released, want);
    assert_eq!(features(&clip), before);
}
