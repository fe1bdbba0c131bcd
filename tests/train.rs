//! Training parity with PyTorch (scripts/make_train_reference.py): six AdamW steps of CLIPLoss
//! on the tiny CLIP over the first 24 demo pairs, batch 8, no shuffling; every loss and every
//! updated weight is compared with torch's.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use clipft::docarray::open_pairs;
use clipft::model::ModelFiles;
use clipft::trainer::optim::{OptimizerKind, OptimizerParams};
use clipft::trainer::train::TrainModel;
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

/// The first `n` demo pairs as one batch for `model`: captions tokenized, images preprocessed
/// (f32 pixels).
fn demo_batch(model: &TrainModel, n: usize) -> (clipft::model::TextBatch, Tensor) {
    let pairs: Vec<_> = open_pairs(&root().join("data/demo/train.csv"))
        .unwrap()
        .take(n)
        .collect::<Result<_, _>>()
        .unwrap();
    let captions: Vec<&str> = pairs.iter().map(|p| p.caption.as_str()).collect();
    let text = model.text_batch(&captions).unwrap();
    let px: Vec<f32> = pairs
        .iter()
        .flat_map(|p| {
            p.image
                .preprocess(&model.images, &Default::default())
                .unwrap()
        })
        .collect();
    let pixels = Tensor::from_vec(px, (pairs.len(), 3, 224, 224), &Device::Cpu).unwrap();
    (text, pixels)
}

#[test]
fn six_adamw_steps_match_pytorch() {
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/train/reference.json")).unwrap(),
    )
    .unwrap();
    let after = candle_core::safetensors::load(
        root().join("tests/fixtures/train/after.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let files = ModelFiles::from_dir(&root().join("tests/fixtures/clip-tiny")).unwrap();
    let model = TrainModel::load(&files, &Device::Cpu).unwrap();
    let before: HashMap<String, Tensor> = model
        .named_vars()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().copy().unwrap()))
        .collect();
    let pairs: Vec<_> = open_pairs(&root().join("data/demo/train.csv"))
        .unwrap()
        .take(24)
        .collect::<Result<_, _>>()
        .unwrap();
    let batches: Vec<_> = pairs
        .chunks(8)
        .map(|chunk| {
            let captions: Vec<&str> = chunk.iter().map(|p| p.caption.as_str()).collect();
            let text = model.text_batch(&captions).unwrap();
            let px: Vec<f32> = chunk
                .iter()
                .flat_map(|p| {
                    p.image
                        .preprocess(&model.images, &Default::default())
                        .unwrap()
                })
                .collect();
            let pixels = Tensor::from_vec(px, (chunk.len(), 3, 224, 224), &Device::Cpu).unwrap();
            (text, pixels)
        })
        .collect();
    // The same padded ids as the reference.
    for (b, want) in batches
        .iter()
        .zip(reference["procedure"]["batches"].as_array().unwrap())
    {
        let ids: Vec<Vec<u32>> = b.0.input_ids().unwrap().to_vec2().unwrap();
        let want: Vec<Vec<u32>> = serde_json::from_value(want["input_ids"].clone()).unwrap();
        assert_eq!(ids, want);
    }
    // The validation loss (inference kernels, no graph) is the training loss.
    let frozen = model.frozen().unwrap();
    for (text, pixels) in &batches {
        let train = model
            .loss(text, pixels)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let val = model.loss_without_graph(&frozen, text, pixels).unwrap();
        assert!((train - val).abs() <= 1e-5 * train, "{train} vs {val}");
    }
    drop(frozen);
    let mut opt = model
        .optimizer(OptimizerParams::new(OptimizerKind::AdamW, 1e-3, 0.01))
        .unwrap();
    let want_losses: Vec<f64> = serde_json::from_value(reference["losses"].clone()).unwrap();
    for (step, want) in want_losses.iter().enumerate() {
        let (text, pixels) = &batches[step % 3];
        let loss = model.train_step(&mut opt, text, pixels).unwrap() as f64;
        assert!(
            ((loss - want) / want).abs() < 1e-5,
            "step {step}: loss {loss} vs torch {want}"
        );
    }
    let got: HashMap<String, Tensor> = model
        .named_vars()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect();
    assert_matches_torch(&reference, &before, &got, &after);
}

/// Every weight after the six steps against torch's (`after`), from the weights `before` them;
/// the tolerances are explained inside.
fn assert_matches_torch(
    reference: &Value,
    before: &HashMap<String, Tensor>,
    got_all: &HashMap<String, Tensor>,
    after: &HashMap<String, Tensor>,
) {
    let noise: Vec<String> =
        serde_json::from_value(reference["gradient_is_rounding_noise"].clone()).unwrap();
    let decay = (1.0f64 - 1e-3 * 0.01).powi(6);
    let mut compared = 0;
    let mut names: Vec<&String> = got_all.keys().collect();
    names.sort();
    for name in names {
        let name = name.clone();
        let got = got_all[&name]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let start = before[&name]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        if noise.contains(&name) {
            // A zero gradient computed as rounding noise (softmax ignores a key bias): torch's
            // update is noise too, so only its size is bounded.
            for (g, s) in got.iter().zip(&start) {
                assert!((g - s).abs() <= 6.0 * 1e-3 + 1e-6, "{name}");
            }
            continue;
        }
        let want: Vec<f32> = if name == "text_model.embeddings.token_embedding.weight" {
            let rows = after[&format!("{name}.rows")].to_vec2::<f32>().unwrap();
            let ids = after[&format!("{name}.row_ids")].to_vec1::<i64>().unwrap();
            let dim = rows[0].len();
            // Rows without gradient only decay.
            let mut w: Vec<f32> = start.iter().map(|v| (*v as f64 * decay) as f32).collect();
            for (id, row) in ids.iter().zip(rows) {
                w[*id as usize * dim..(*id as usize + 1) * dim].copy_from_slice(&row);
            }
            w
        } else {
            after[&name]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(got.len(), want.len(), "{name}");
        // Every tensor within 1e-4 relative (Frobenius) error of torch's. Element-wise, Adam's
        // first step moves a weight by lr * g / (|g| + eps): where torch's gradient is itself at
        // rounding level (one element of text_projection has g = -1e-7 against an RMS of 0.08),
        // float rounding moves that ratio, so single elements may exceed 1e-4 of the tensor's
        // scale; they stay within 1e-3, and at most one element in 10,000 does so.
        let norm = |v: &mut dyn Iterator<Item = f64>| v.map(|x| x * x).sum::<f64>().sqrt();
        let diff = norm(&mut got.iter().zip(&want).map(|(g, w)| (*g - *w) as f64));
        let frob = diff / norm(&mut want.iter().map(|w| *w as f64)).max(1e-12);
        assert!(frob < 1e-4, "{name}: relative error {frob:.2e}");
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-3);
        let mut over = 0;
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let e = ((g - w) / scale).abs();
            assert!(e < 1e-3, "{name}[{i}]: {g} vs torch {w} (scale {scale})");
            over += usize::from(e >= 1e-4);
        }
        assert!(
            over <= (want.len() / 10_000).max(1),
            "{name}: {over} elements off by more than 1e-4"
        );
        compared += 1;
    }
    assert!(compared >= 70, "{compared}");
}

/// The same six steps through `clipft fit` as a user runs it (`--no-shuffle --max-steps 6` on a
/// CSV of the 24 pairs): the per-step losses it records and the artifact's weights match torch's.
#[test]
fn clipft_fit_takes_the_same_steps_as_pytorch() {
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/train/reference.json")).unwrap(),
    )
    .unwrap();
    let dir = std::env::temp_dir().join(format!("clipft-train-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let demo = root().join("data/demo");
    let mut csv = csv::Writer::from_path(dir.join("pairs.csv")).unwrap();
    let mut rows = csv::ReaderBuilder::new()
        .has_headers(false)
        .from_path(demo.join("train.csv"))
        .unwrap();
    for rec in rows.records().take(24) {
        let rec = rec.unwrap();
        csv.write_record([&rec[0], demo.join(&rec[1]).to_str().unwrap()])
            .unwrap();
    }
    csv.flush().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_clipft"))
        .args(["fit", "--model"])
        .arg(root().join("tests/fixtures/clip-tiny"))
        .arg("--train-data")
        .arg(dir.join("pairs.csv"))
        .args([
            "--no-shuffle",
            "--max-steps",
            "6",
            "--epochs",
            "2",
            "--batch-size",
            "8",
        ])
        .args([
            "--optimizer",
            "AdamW",
            "--learning-rate",
            "1e-3",
            "--weight-decay",
            "0.01",
        ])
        .args(["--device", "cpu", "--run-name", "parity", "--output"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let artifact = dir.join("parity");
    let metrics: serde_json::Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(artifact.join("metrics.yml")).unwrap())
            .unwrap();
    let losses: Vec<f64> = serde_json::from_value(metrics["train_loss_per_step"].clone()).unwrap();
    let want: Vec<f64> = serde_json::from_value(reference["losses"].clone()).unwrap();
    assert_eq!(losses.len(), want.len());
    for (step, (l, w)) in losses.iter().zip(&want).enumerate() {
        assert!(((l - w) / w).abs() < 1e-5, "step {step}: {l} vs torch {w}");
    }
    let dev = Device::Cpu;
    let mut got = HashMap::new();
    for tower in ["clip-text", "clip-vision"] {
        got.extend(
            candle_core::safetensors::load(
                artifact
                    .join("models")
                    .join(tower)
                    .join("model.safetensors"),
                &dev,
            )
            .unwrap(),
        );
    }
    let before = candle_core::safetensors::load(
        root().join("tests/fixtures/clip-tiny/model.safetensors"),
        &dev,
    )
    .unwrap();
    let after =
        candle_core::safetensors::load(root().join("tests/fixtures/train/after.safetensors"), &dev)
            .unwrap();
    assert_matches_torch(&reference, &before, &got, &after);
}

/// Mixed precision as `--dtype bf16` trains (the GPU default): each step computes in bf16
/// copies of the f32 weights and updates the f32 weights. Same losses as f32 to bf16's
/// precision, the weights stay f32, and they move the way f32 training moves them.
#[test]
fn bf16_compute_trains_the_f32_weights() {
    use candle_core::DType;
    let files = ModelFiles::from_dir(&root().join("tests/fixtures/clip-tiny")).unwrap();
    let f32_model = TrainModel::load(&files, &Device::Cpu).unwrap();
    let bf16_model = TrainModel::load(&files, &Device::Cpu)
        .unwrap()
        .with_compute_dtype(DType::BF16)
        .unwrap();
    let (text, pixels) = demo_batch(&f32_model, 8);
    let snapshot = |m: &TrainModel| -> HashMap<String, Tensor> {
        m.named_vars()
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().copy().unwrap()))
            .collect()
    };
    let before = snapshot(&f32_model);
    let hp = OptimizerParams::new(OptimizerKind::AdamW, 1e-3, 0.01);
    let (mut o32, mut o16) = (
        f32_model.optimizer(hp).unwrap(),
        bf16_model.optimizer(hp).unwrap(),
    );
    for step in 0..4 {
        let a = f32_model.train_step(&mut o32, &text, &pixels).unwrap();
        let b = bf16_model.train_step(&mut o16, &text, &pixels).unwrap();
        assert!(
            (a - b).abs() <= 3e-2 * a.abs().max(1.0),
            "step {step}: loss {a} in f32, {b} in bf16"
        );
    }
    let (w32, w16) = (snapshot(&f32_model), snapshot(&bf16_model));
    // The whole update, every weight end to end, points the same way.
    let (mut dot, mut n32, mut n16) = (0f64, 0f64, 0f64);
    for (name, start) in &before {
        assert_eq!(w16[name].dtype(), DType::F32, "{name}");
        let d32 = (&w32[name] - start).unwrap().flatten_all().unwrap();
        let d16 = (&w16[name] - start).unwrap().flatten_all().unwrap();
        let (d32, d16) = (d32.to_vec1::<f32>().unwrap(), d16.to_vec1::<f32>().unwrap());
        for (x, y) in d32.iter().zip(&d16) {
            dot += (*x as f64) * (*y as f64);
            n32 += (*x as f64).powi(2);
            n16 += (*y as f64).powi(2);
        }
    }
    let cos = dot / (n32.sqrt() * n16.sqrt());
    assert!(n16 > 0.0 && cos > 0.97, "update cosine {cos}");
}

/// The bf16 compute copies give exactly what casting the f32 weights every step gives: the
/// same loss, and each weight's gradient (its copy's) bit for bit the gradient that flows
/// through a cast; after each step every copy is its new f32 weight rounded to nearest even,
/// and weights set from outside reach the copies through `sync_compute_copies`.
#[test]
fn compute_copies_match_casting_the_weights() {
    use candle_core::DType;
    use clipft::model::{policy::Kernels, Clip, Mode, Towers};
    let dev = Device::Cpu;
    let files = ModelFiles::from_dir(&root().join("tests/fixtures/clip-tiny")).unwrap();
    let mut model = TrainModel::load(&files, &dev)
        .unwrap()
        .with_compute_dtype(DType::BF16)
        .unwrap();
    let (text, pixels) = demo_batch(&model, 4);
    let pixels = pixels.to_dtype(DType::BF16).unwrap();
    let mut opt = model
        .optimizer(OptimizerParams::new(OptimizerKind::AdamW, 1e-3, 0.01))
        .unwrap();
    let copied = opt.params.iter().filter(|p| p.copy.is_some()).count();
    assert_eq!(copied, opt.params.len() - 1, "every weight but logit_scale");
    let bits = |t: &Tensor| -> Vec<u32> {
        t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    };
    let start: Vec<Vec<u32>> = opt.params.iter().map(|p| bits(p.var.as_tensor())).collect();
    for step in 0..2 {
        // The reference: the model over casts of the f32 variables, as before copies.
        let casts: HashMap<String, Tensor> = model
            .named_vars()
            .into_iter()
            .map(|(n, v)| {
                let t = match n.as_str() {
                    "logit_scale" => v.as_tensor().clone(),
                    _ => v.as_tensor().to_dtype(DType::BF16).unwrap(),
                };
                (n, t)
            })
            .collect();
        let vb = candle_nn::VarBuilder::from_tensors(casts, DType::BF16, &dev);
        let mut cast = Clip::new(
            vb,
            &model.config,
            Towers::ALL,
            Kernels::decide(&dev, DType::BF16),
        )
        .unwrap();
        cast.logit_scale = model.clip.logit_scale.clone();
        let loss_of = |clip: &Clip| {
            let t = clip.text_features(&text, Mode::Train).unwrap();
            let i = clip.image_features(&pixels, Mode::Train).unwrap();
            clipft::trainer::loss::clip_loss(&t, &i, clip.logit_scale.as_ref().unwrap()).unwrap()
        };
        let want_loss = loss_of(&cast);
        let want = want_loss.backward().unwrap();
        let got_loss = model.loss(&text, &pixels).unwrap();
        assert_eq!(bits(&got_loss), bits(&want_loss), "step {step}: loss");
        let got = got_loss.backward().unwrap();
        for p in &opt.params {
            let want_g = want
                .get(p.var.as_tensor())
                .expect("a gradient through the cast");
            let got_g = match &p.copy {
                Some(c) => got.get(c.as_tensor()),
                None => got.get(p.var.as_tensor()),
            }
            .expect("a gradient");
            assert_eq!(want_g.dtype(), DType::F32);
            assert!(
                bits(got_g) == bits(want_g),
                "step {step}: the gradient of {}",
                p.name
            );
        }
        opt.step(&got).unwrap();
        for p in &opt.params {
            if let Some(c) = &p.copy {
                let rounded = p.var.as_tensor().to_dtype(DType::BF16).unwrap();
                assert!(
                    bits(c.as_tensor()) == bits(&rounded),
                    "step {step}: copy of {}",
                    p.name
                );
            }
        }
    }
    // Every weight moved (decoupled weight decay alone moves each one).
    for (p, start) in opt.params.iter().zip(&start) {
        assert!(bits(p.var.as_tensor()) != *start, "{} did not move", p.name);
    }
    let p = &opt.params[1];
    p.var.set(&p.var.as_tensor().ones_like().unwrap()).unwrap();
    model.sync_compute_copies().unwrap();
    let copy = p.copy.as_ref().unwrap().as_tensor();
    assert!(
        bits(copy) == bits(&copy.ones_like().unwrap()),
        "{} synced",
        p.name
    );
}

/// `freeze(["backbone"])` (Finetuner's `freeze=True`), in f32 and with bf16 compute copies: the
/// passes compute gradients for the projections and `logit_scale` only, the same ones as with
/// nothing frozen (the heads' gradients do not depend on the backbone's; the frozen towers run
/// the inference kernels, so in bf16 to its rounding), the optimiser holds only them, and a
/// step leaves every other weight as it was.
#[test]
fn a_frozen_backbone_gets_no_gradients() {
    use candle_core::DType;
    let files = ModelFiles::from_dir(&root().join("tests/fixtures/clip-tiny")).unwrap();
    let heads = |n: &str| {
        ["text_projection.", "visual_projection.", "logit_scale"]
            .iter()
            .any(|h| n.starts_with(h))
    };
    for dtype in [DType::F32, DType::BF16] {
        let load = || {
            TrainModel::load(&files, &Device::Cpu)
                .unwrap()
                .with_compute_dtype(dtype)
                .unwrap()
        };
        let (full, frozen) = (load(), load().freeze(&["backbone".into()]).unwrap());
        let (text, pixels) = demo_batch(&frozen, 4);
        let pixels = pixels.to_dtype(dtype).unwrap();
        let hp = OptimizerParams::new(OptimizerKind::AdamW, 1e-3, 0.01);
        let (opt_full, mut opt) = (full.optimizer(hp).unwrap(), frozen.optimizer(hp).unwrap());
        let g_full = full.loss(&text, &pixels).unwrap().backward().unwrap();
        let g = frozen.loss(&text, &pixels).unwrap().backward().unwrap();
        assert!(opt.params.iter().all(|p| heads(&p.name)), "{dtype:?}");
        assert_eq!(
            opt.params.len(),
            3,
            "{dtype:?}: the two projections and logit_scale"
        );
        // A parameter's gradient is its compute copy's, where it has one.
        let grad = |o: &clipft::trainer::optim::Optimizer,
                    name: &str,
                    g: &candle_core::backprop::GradStore| {
            let p = o.params.iter().find(|p| p.name == name)?;
            let t = p.copy.as_ref().unwrap_or(&p.var);
            g.get(t.as_tensor())
                .map(|t| t.to_dtype(DType::F32).unwrap())
        };
        for p in &opt_full.params {
            let full_g = grad(&opt_full, &p.name, &g_full).expect("every weight trains unfrozen");
            match grad(&opt, &p.name, &g) {
                Some(got) => {
                    let diff = (&got - &full_g).unwrap().abs().unwrap().max_all().unwrap();
                    let scale = full_g.abs().unwrap().max_all().unwrap();
                    let (diff, scale) = (
                        diff.to_scalar::<f32>().unwrap(),
                        scale.to_scalar::<f32>().unwrap(),
                    );
                    // The frozen towers run the inference kernels: bf16 rounds differently.
                    let tol = if dtype == DType::F32 { 1e-4 } else { 5e-2 };
                    assert!(
                        diff <= tol * scale.max(1e-6),
                        "{dtype:?}: {} off by {diff}",
                        p.name
                    );
                }
                None => assert!(!heads(&p.name), "{dtype:?}: no gradient for {}", p.name),
            }
        }
        // Frozen weights, and the towers below them, are not in the graph at all: the backward
        // pass reaches a handful of tensors instead of every one of the towers'.
        let (reached, reached_full) = (g.get_ids().count(), g_full.get_ids().count());
        assert!(
            reached * 5 < reached_full,
            "{dtype:?}: {reached} tensors got gradients frozen, {reached_full} not"
        );
        let masters: HashMap<String, candle_core::Var> = frozen.named_vars().into_iter().collect();
        for (n, v) in &masters {
            assert_eq!(
                g.get(v.as_tensor()).is_some(),
                n == "logit_scale" || (heads(n) && dtype == DType::F32),
                "{dtype:?}: {n}"
            );
        }
        let before: HashMap<String, Vec<f32>> = frozen
            .named_vars()
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()))
            .collect();
        frozen.train_step(&mut opt, &text, &pixels).unwrap();
        for (n, v) in frozen.named_vars() {
            let now: Vec<f32> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(heads(&n), now != before[&n], "{dtype:?}: {n}");
        }
    }
}
