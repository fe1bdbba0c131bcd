//! The ONNX export run in ONNX Runtime (the runtime clip-as-service's ONNX executor uses):
//! `clipft export` and `fit --to-onnx` write graphs that give the embeddings clipft gives for
//! the same token ids and pixels, for OpenAI's configuration (quick_gelu, pooling at the
//! arg-max id) and for OpenCLIP's (gelu, pooling at the first end-of-text id). ONNX Runtime
//! comes from PyPI into target/onnx-venv on the first run.

use std::path::{Path, PathBuf};
use std::process::Command;

use clipft::model::{Encoder, LoadOptions, ModelFiles, Towers};

mod common;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_clipft"));
    c.env("HF_HUB_OFFLINE", "1")
        .env("CLIPFT_LOG", "warn")
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    c
}

fn tempdir(name: &str) -> PathBuf {
    common::tempdir("onnx", name)
}

fn ok(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{cmd:?} failed: {err}");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs `model` in ONNX Runtime on `feeds` (name, dtype, shape, values), after converting it to
/// f16 as clip-as-service does on a GPU when `fp16`; returns the graph's declared inputs and
/// its `embedding` output.
fn onnx_runtime(
    model: &Path,
    fp16: bool,
    feeds: &[(&str, &str, Vec<usize>, Vec<f64>)],
) -> (Vec<serde_json::Value>, Vec<Vec<f32>>) {
    let python = common::venv("onnx-venv", "tests/onnx/requirements.txt")
        .unwrap()
        .join("python");
    let feeds: serde_json::Map<String, serde_json::Value> = feeds
        .iter()
        .map(|(n, dtype, shape, data)| {
            let f = serde_json::json!({"dtype": dtype, "shape": shape, "data": data});
            (n.to_string(), f)
        })
        .collect();
    let req = model.with_extension("request.json");
    let body = serde_json::json!({"model": model, "fp16": fp16, "feeds": feeds});
    std::fs::write(&req, body.to_string()).unwrap();
    let script = common::root().join("tests/onnx/run_onnx.py");
    let out = ok(Command::new(python).arg(script).arg(&req));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let inputs = v["inputs"].as_array().unwrap().clone();
    let emb = serde_json::from_value(v["outputs"]["embedding"].clone()).unwrap();
    (inputs, emb)
}

/// The largest difference between two sets of embeddings, relative to the largest value.
fn rel_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = a.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
    let diff = a
        .iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len());
            x.iter().zip(y).map(|(p, q)| (p - q).abs())
        })
        .fold(0f32, f32::max);
    diff / scale
}

/// clipft's text and image embeddings of fixed inputs against ONNX Runtime's on the graphs in
/// `onnx_dir` (`text`, `vision`: file names there).
fn check_parity(model: &ModelFiles, onnx_dir: &Path, text: &str, vision: &str, eos: u32) {
    let opts = LoadOptions {
        towers: Towers::ALL,
        ..LoadOptions::default()
    };
    let enc = Encoder::load(model, &opts).unwrap();
    // Rows of different lengths, padded with 0 (for both); the longest has no
    // end-of-text token at all (pooled at the last position).
    let tok = enc.tokenizer().unwrap();
    let mut rows = tok
        .encode_batch(&[
            "a photo of a cat",
            "red",
            "two dogs playing in the snow at night",
        ])
        .unwrap();
    let mut bare: Vec<u32> = rows[2].iter().copied().filter(|&t| t != eos).collect();
    bare.extend([320, 1125, 539]);
    rows.push(bare);
    let len = rows.iter().map(Vec::len).max().unwrap();
    let (mut ids, mut mask) = (Vec::new(), Vec::new());
    for r in &mut rows {
        mask.extend((0..len).map(|i| if i < r.len() { 1.0 } else { 0.0 }));
        r.resize(len, 0);
        ids.extend(r.iter().map(|&t| t as f64));
    }
    let want = enc.embed_token_rows(&rows).unwrap();
    let shape = vec![rows.len(), len];
    let feeds = [
        ("input_ids", "int32", shape.clone(), ids),
        ("attention_mask", "int32", shape, mask),
    ];
    // The rows differ from each other, so a graph pooling the wrong token cannot pass.
    assert!(rel_diff(&want[..1], &want[1..2]) > 1e-2);
    // f32 as exported; f16 as clip-as-service converts it on a GPU, where a float cast of the
    // ids once made every caption pool its start token (49406 and 49407 are one f16 number).
    for (fp16, tolerance) in [(false, 1e-5), (true, 1e-2)] {
        let (inputs, got) = onnx_runtime(&onnx_dir.join(text), fp16, &feeds);
        assert_eq!(inputs[0][0], "input_ids");
        assert_eq!(inputs[0][1], "tensor(int32)");
        assert_eq!(inputs[1][0], "attention_mask");
        let d = rel_diff(&want, &got);
        eprintln!("text (fp16 {fp16}): relative difference {d}");
        assert!(
            d < tolerance,
            "text (fp16 {fp16}): ONNX Runtime differs from clipft by {d} (relative)"
        );
    }

    let size = 224 * 224 * 3;
    let pixels: Vec<Vec<f32>> = (0..2)
        .map(|i| {
            (0..size)
                .map(|j| ((j * 7919 + i * 104729) % 1000) as f32 / 500.0 - 1.0)
                .collect()
        })
        .collect();
    let want = enc.embed_pixels(&pixels).unwrap();
    let flat = pixels.iter().flatten().map(|&v| v as f64).collect();
    let feeds = [("pixel_values", "float32", vec![2, 3, 224, 224], flat)];
    for (fp16, tolerance) in [(false, 1e-5), (true, 1e-2)] {
        let (inputs, got) = onnx_runtime(&onnx_dir.join(vision), fp16, &feeds);
        assert_eq!(inputs[0][0], "pixel_values");
        let d = rel_diff(&want, &got);
        eprintln!("vision (fp16 {fp16}): relative difference {d}");
        assert!(
            d < tolerance,
            "vision (fp16 {fp16}): ONNX Runtime differs from clipft by {d} (relative)"
        );
    }
}

#[test]
fn exported_towers_match_clipft_in_onnx_runtime() {
    let out = tempdir("export");
    let stdout = ok(bin()
        .args(["export", "--model", &common::tiny(), "--output"])
        .arg(&out));
    assert!(
        stdout.contains("textual.onnx") && stdout.contains("visual.onnx"),
        "{stdout}"
    );
    let tiny = ModelFiles::from_dir(Path::new(&common::tiny())).unwrap();
    check_parity(&tiny, &out, "textual.onnx", "visual.onnx", 49407);

    // OpenCLIP's conventions: exact gelu, and pooling at the first end-of-text id (not the
    // arg-max id: the bare row's largest id is then not where it pools).
    let variant = tempdir("gelu-model");
    for f in std::fs::read_dir(common::tiny()).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, variant.join(f.file_name().unwrap())).unwrap();
    }
    let cfg_path = variant.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["text_config"]["hidden_act"] = "gelu".into();
    cfg["text_config"]["eos_token_id"] = 49407.into();
    cfg["vision_config"]["hidden_act"] = "gelu".into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let gelu_out = tempdir("gelu");
    ok(bin()
        .args(["export", "--select-model", "clip-text", "--model"])
        .arg(&variant)
        .arg("--output")
        .arg(&gelu_out));
    assert!(
        !gelu_out.join("visual.onnx").exists(),
        "only the selected tower is written"
    );
    ok(bin()
        .args(["export", "--select-model", "clip-vision", "--model"])
        .arg(&variant)
        .arg("--output")
        .arg(&gelu_out));
    let files = ModelFiles::from_dir(&variant).unwrap();
    check_parity(&files, &gelu_out, "textual.onnx", "visual.onnx", 49407);
    let _ = std::fs::remove_dir_all(&out);
    let _ = std::fs::remove_dir_all(&variant);
    let _ = std::fs::remove_dir_all(&gelu_out);
}

#[test]
fn fit_to_onnx_puts_model_onnx_in_each_submodel() {
    let out = tempdir("fit");
    ok(bin()
        .args([
            "fit",
            "--model",
            "tests/fixtures/clip-tiny",
            "--train-data",
            "data/demo/train.csv",
            "--batch-size",
            "16",
            "--max-steps",
            "2",
            "--learning-rate",
            "1e-3",
            "--device",
            "cpu",
            "--run-name",
            "onnx-run",
            "--to-onnx",
            "--zip",
            "--output",
        ])
        .arg(&out));
    let art = out.join("onnx-run");
    let models = art.join("models");
    for sub in ["clip-text", "clip-vision"] {
        // The safetensors stay: clipft serves the same artifact.
        assert!(models.join(sub).join("model.safetensors").is_file());
        assert!(models.join(sub).join("model.onnx").is_file(), "{sub}");
    }
    let config = std::fs::read_to_string(art.join("config.yml")).unwrap();
    assert!(config.contains("to_onnx: true"), "{config}");
    // The graphs hold the weights the artifact holds.
    let files = clipft::artifact::submodel_files(&art, Towers::ALL).unwrap();
    let text = Path::new("clip-text").join("model.onnx");
    let vision = Path::new("clip-vision").join("model.onnx");
    let (t, v) = (text.to_str().unwrap(), vision.to_str().unwrap());
    check_parity(&files, &models, t, v, 49407);
    // Loading the zip unpacks the weights, not the graphs (as large, and never read).
    let zipped = clipft::artifact::submodel_files(&out.join("onnx-run.zip"), Towers::ALL).unwrap();
    let unpacked = zipped.unpacked.as_ref().unwrap().path().to_path_buf();
    let names = files_under(&unpacked);
    assert!(names.iter().any(|n| n == "model.safetensors"), "{names:?}");
    assert!(!names.iter().any(|n| n == "model.onnx"), "{names:?}");
    let _ = std::fs::remove_dir_all(&out);
}

/// The names of the files under `dir`, at any depth.
fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    out
}
