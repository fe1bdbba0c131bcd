//! `clipft fit` in process, driven as a user drives it: fine-tuning the tiny CLIP on the demo
//! garments improves every retrieval metric, and the artifact has the promised layout.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_clipft"));
    c.env("HF_HUB_OFFLINE", "1")
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    c
}

fn tempdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("clipft-fit-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn fit(out: &Path, extra: &[&str]) -> Output {
    bin()
        .args([
            "fit",
            "--model",
            "tests/fixtures/clip-tiny",
            "--train-data",
            "data/demo/train.csv",
        ])
        .args([
            "--batch-size",
            "32",
            "--learning-rate",
            "1e-3",
            "--optimizer",
            "AdamW",
            "--device",
            "cpu",
        ])
        .arg("--output")
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

/// [`fit`] that must succeed: its log.
fn fit_ok(out: &Path, extra: &[&str]) -> String {
    let o = fit(out, extra);
    let log = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{log}");
    log
}

/// [`fit`] that must fail: its error output.
fn fit_err(out: &Path, extra: &[&str]) -> String {
    let o = fit(out, extra);
    let log = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success(), "{extra:?} succeeded: {log}");
    log
}

fn yaml_number(text: &str, section: &str, key: &str) -> f64 {
    let body = text.split(&format!("{section}:\n")).nth(1).unwrap();
    let line = body
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("{key}:")))
        .unwrap();
    line.split(':').nth(1).unwrap().trim().parse().unwrap()
}

#[test]
fn fine_tuning_improves_every_metric_and_writes_the_artifact() {
    let out = tempdir("ok");
    let o = fit(
        &out,
        &[
            "--epochs",
            "8",
            "--run-name",
            "garments",
            "--experiment",
            "fashion",
            "--eval-data",
            "data/demo/eval.csv",
            "--query-data",
            "data/demo/query.csv",
            "--index-data",
            "data/demo/index.csv",
            "--example-queries",
            "2",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8(o.stdout).unwrap();
    assert!(
        stdout.contains("before") && stdout.contains("after"),
        "{stdout}"
    );
    // Finetuner's example results: the first 2 queries with their top `limit` (20) matches,
    // named as index.csv names the images; the 5 best are printed.
    assert!(
        stdout.contains("results after fine-tuning:\n  query: a red plain dress\n    1. images/"),
        "{stdout}"
    );
    let run = out.join("garments");
    let examples: clipft::eval::ExampleResults =
        serde_yaml_ng::from_str(&std::fs::read_to_string(run.join("example-results.yml")).unwrap())
            .unwrap();
    let queries: Vec<&str> = examples.after.iter().map(|x| x.query.as_str()).collect();
    assert_eq!(queries, ["a red plain dress", "red dress with stripes"]);
    assert_eq!(examples.before.len(), 2);
    let index = std::fs::read_to_string("data/demo/index.csv").unwrap();
    for x in examples.before.iter().chain(&examples.after) {
        assert_eq!(x.matches.len(), 20);
        assert!(
            x.matches.iter().all(|m| index.contains(&format!("{m},"))),
            "{x:?}"
        );
    }
    assert_ne!(
        examples.before, examples.after,
        "training changed the rankings"
    );
    for f in [
        "config.yml",
        "metadata.yml",
        "metrics.yml",
        "report.md",
        "models/clip-text/config.json",
        "models/clip-text/model.safetensors",
        "models/clip-text/tokenizer.json",
        "models/clip-text/metadata.yml",
        "models/clip-vision/config.json",
        "models/clip-vision/model.safetensors",
        "models/clip-vision/preprocessor_config.json",
        "models/clip-vision/metadata.yml",
    ] {
        assert!(run.join(f).is_file(), "missing {f}");
    }
    let metrics = std::fs::read_to_string(run.join("metrics.yml")).unwrap();
    for m in clipft::eval::Metrics::NAMES {
        let (b, a) = (
            yaml_number(&metrics, "before", m),
            yaml_number(&metrics, "after", m),
        );
        assert!(a > b, "{m}: after {a} <= before {b}");
    }
    // Each submodel holds only its own tower (and logit_scale), under HF names.
    let dev = candle_core::Device::Cpu;
    let text = candle_core::safetensors::load(run.join("models/clip-text/model.safetensors"), &dev)
        .unwrap();
    assert!(text.keys().all(|k| k.starts_with("text_model.")
        || k.starts_with("text_projection")
        || k == "logit_scale"));
    let vision =
        candle_core::safetensors::load(run.join("models/clip-vision/model.safetensors"), &dev)
            .unwrap();
    assert!(vision.keys().all(|k| k.starts_with("vision_model.")
        || k.starts_with("visual_projection")
        || k == "logit_scale"));
    assert!(vision.contains_key("vision_model.embeddings.class_embedding"));
    let meta = std::fs::read_to_string(run.join("metadata.yml")).unwrap();
    for k in [
        "name:",
        "backbone:",
        "device:",
        "started_unix:",
        "finished_unix:",
        "duration_seconds:",
        "clipft_version:",
        "experiment: \"fashion\"",
    ] {
        assert!(meta.contains(k), "{meta}");
    }
    // ISO times beside the Unix ones.
    for k in ["started:", "finished:"] {
        let line = meta
            .lines()
            .find(|l| l.starts_with(k))
            .unwrap_or_else(|| panic!("{meta}"));
        let v = line[k.len()..].trim().trim_matches('"');
        assert!(
            v.len() == 20 && v.ends_with('Z') && v.as_bytes()[10] == b'T',
            "{line}"
        );
    }
    let config = std::fs::read_to_string(run.join("config.yml")).unwrap();
    assert!(config.contains("learning_rate: 0.001"), "{config}");
    assert!(config.contains("loss: \"CLIPLoss\""), "{config}");
    // The retrieval metrics of every epoch (measured with query and index data).
    let parsed: serde_yaml_ng::Value = serde_yaml_ng::from_str(&metrics).unwrap();
    let per_epoch = parsed["per_epoch"].as_sequence().unwrap();
    assert_eq!(per_epoch.len(), 8, "{metrics}");
    assert_eq!(per_epoch[7]["epoch"].as_u64(), Some(8));
    assert!(per_epoch[7]["metrics"]["recall_at_k"].as_f64().is_some());
    // A model card: backbone, data, hyperparameters, before/after.
    let report = std::fs::read_to_string(run.join("report.md")).unwrap();
    for want in [
        "backbone: `tests/fixtures/clip-tiny`",
        "training pairs: `data/demo/train.csv`",
        "queries: `data/demo/query.csv`",
        "| learning_rate | 0.001 |",
        "| optimizer | AdamW |",
        "| loss | CLIPLoss |",
        "| metric | before | after |",
        "experiment: fashion",
        "## Example results\n\nquery: a red plain dress\n\n| match | before | after |",
        "| 5 | images/",
    ] {
        assert!(
            report.contains(want),
            "{want:?} not in report.md:\n{report}"
        );
    }
    // The artifact serves: one tower at a time.
    let e = bin()
        .args([
            "encode",
            "--select-model",
            "clip-text",
            "--text",
            "a red dress",
            "--artifact",
        ])
        .arg(&run)
        .output()
        .unwrap();
    assert!(e.status.success(), "{}", String::from_utf8_lossy(&e.stderr));
    // Nothing temporary is left next to it.
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);
}

#[test]
fn bad_runs_fail_clearly_and_leave_nothing() {
    let out = tempdir("bad");
    let err = |o: Output| {
        assert!(!o.status.success());
        String::from_utf8(o.stderr).unwrap()
    };
    let e = err(fit(&out, &["--epochs", "1", "--run-name", "../escape"]));
    assert!(e.contains("run name"), "{e}");
    let e = err(fit(&out, &["--epochs", "1", "--batch-size", "1"]));
    assert!(e.contains("batch-size"), "{e}");
    for lr in ["-1e-5", "0", "nan"] {
        let e = err(bin()
            .args(["fit", "--model", "tests/fixtures/clip-tiny"])
            .args(["--train-data", "data/demo/train.csv"])
            .arg(format!("--learning-rate={lr}"))
            .output()
            .unwrap());
        assert!(e.contains("learning-rate") && e.contains("positive"), "{e}");
    }
    let e = err(bin()
        .args([
            "fit",
            "--model",
            "tests/fixtures/clip-tiny",
            "--train-data",
            "no/such.csv",
        ])
        .output()
        .unwrap());
    assert!(e.contains("no/such.csv"), "{e}");
    let bad_csv = out.join("bad.csv");
    std::fs::write(&bad_csv, "a caption,images/x.png\njust words,more words\n").unwrap();
    let e = err(bin()
        .args(["fit", "--model", "tests/fixtures/clip-tiny", "--output"])
        .arg(&out)
        .arg("--train-data")
        .arg(&bad_csv)
        .output()
        .unwrap());
    assert!(e.contains("bad.csv:2"), "{e}");
    let o = fit(&out, &["--max-steps", "1", "--run-name", "once"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let e = err(fit(&out, &["--max-steps", "1", "--run-name", "once"]));
    assert!(e.contains("already exists"), "{e}");
    assert!(
        !e.contains("pairs,"),
        "a taken name must fail before training: {e}"
    );
    // A learning rate that blows the weights up fails the run at the first NaN loss, naming
    // the step, instead of finishing with NaN weights as its artifact.
    let e = err(bin()
        .args(["fit", "--model", "tests/fixtures/clip-tiny", "--output"])
        .arg(&out)
        .args(["--train-data", "data/demo/train.csv", "--device", "cpu"])
        .args(["--learning-rate", "1e30", "--max-steps", "6"])
        .args(["--run-name", "diverges"])
        .output()
        .unwrap());
    assert!(e.contains("diverged at step") && e.contains("NaN"), "{e}");
    assert!(!out.join("diverges").exists(), "{e}");
    // A missing or undecodable image on the last line fails before the first step, naming it.
    let demo = std::fs::read_to_string("data/demo/train.csv").unwrap();
    let images = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/demo");
    let rewrite = |extra: &str| {
        let mut text: String = demo
            .lines()
            .map(|l| {
                let (caption, image) = l.rsplit_once(',').unwrap();
                format!("{caption},{}\n", images.join(image).display())
            })
            .collect();
        text.push_str(extra);
        let p = out.join("late.csv");
        std::fs::write(&p, text).unwrap();
        p
    };
    std::fs::write(out.join("broken.png"), b"\x89PNG\r\n\x1a\nnot really").unwrap();
    let lines = demo.lines().count();
    for (extra, what) in [
        ("a last caption,missing.png\n", "missing.png"),
        ("a last caption,broken.png\n", "broken.png"),
    ] {
        let csv = rewrite(extra);
        let e = err(bin()
            .args(["fit", "--model", "tests/fixtures/clip-tiny", "--output"])
            .arg(&out)
            .arg("--train-data")
            .arg(&csv)
            .output()
            .unwrap());
        assert!(e.contains(&format!("late.csv:{}", lines + 1)), "{e}");
        assert!(e.contains(what) || e.contains("decode"), "{e}");
        assert!(
            !e.contains("pairs,"),
            "bad data must fail before training: {e}"
        );
        assert!(!e.contains("image: image:"), "{e}");
    }
    let names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
}

#[test]
fn frozen_backbone_clipping_and_zipped_artifacts() {
    let out = tempdir("freeze");
    let o = fit(
        &out,
        &[
            "--max-steps",
            "2",
            "--freeze",
            "backbone",
            "--max-grad-norm",
            "1.0",
            "--zip",
            "--run-name",
            "frozen",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let dev = candle_core::Device::Cpu;
    let before =
        candle_core::safetensors::load("tests/fixtures/clip-tiny/model.safetensors", &dev).unwrap();
    let after =
        candle_core::safetensors::load(out.join("frozen/models/clip-text/model.safetensors"), &dev)
            .unwrap();
    let same = |name: &str| {
        let d = (&before[name] - &after[name])
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        d == 0.0
    };
    assert!(
        same("text_model.encoder.layers.0.mlp.fc1.weight"),
        "frozen layer changed"
    );
    assert!(
        same("text_model.embeddings.token_embedding.weight"),
        "frozen embedding changed"
    );
    assert!(!same("text_projection.weight"), "projection did not train");
    // The zip serves like the folder.
    let zip = out.join("frozen.zip");
    assert!(zip.is_file());
    let enc = |artifact: &Path| {
        let o = bin()
            .args([
                "encode",
                "--select-model",
                "clip-text",
                "--text",
                "a red dress",
                "--artifact",
            ])
            .arg(artifact)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    };
    assert_eq!(enc(&zip), enc(&out.join("frozen")));
    let e = fit(
        &out,
        &[
            "--max-steps",
            "1",
            "--freeze",
            "no_such_layer",
            "--run-name",
            "x",
        ],
    );
    assert!(!e.status.success());
    assert!(String::from_utf8_lossy(&e.stderr).contains("no_such_layer"));
    let bad = out.join("bad.zip");
    std::fs::write(&bad, b"PK\x03\x04 not really a zip").unwrap();
    let o = bin()
        .args([
            "encode",
            "--select-model",
            "clip-text",
            "--text",
            "a",
            "--artifact",
        ])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("bad.zip"));
}

fn tensors(path: &Path) -> std::collections::HashMap<String, candle_core::Tensor> {
    candle_core::safetensors::load(path, &candle_core::Device::Cpu).unwrap()
}

/// Largest element-wise difference between `a` and `f(b, c)` over every tensor of `a`.
fn max_diff(
    a: &std::collections::HashMap<String, candle_core::Tensor>,
    b: &std::collections::HashMap<String, candle_core::Tensor>,
    c: &std::collections::HashMap<String, candle_core::Tensor>,
    f: impl Fn(&candle_core::Tensor, &candle_core::Tensor) -> candle_core::Tensor,
) -> f32 {
    a.iter()
        .map(|(k, t)| max_abs(&(t - f(&b[k], &c[k])).unwrap()))
        .fold(0.0, f32::max)
}

/// The largest absolute value of `t`.
fn max_abs(t: &candle_core::Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn callbacks_best_model_early_stopping_and_wise_ft() {
    let out = tempdir("callbacks");
    let ok = |o: Output| {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stderr).unwrap()
    };
    // EarlyStopping: no epoch improves train_loss by 100, so patience 1 ends the run after the
    // second epoch.
    let log = ok(fit(
        &out,
        &[
            "--epochs",
            "5",
            "--early-stopping-monitor",
            "train_loss",
            "--early-stopping-min-delta",
            "100",
            "--early-stopping-patience",
            "1",
            "--run-name",
            "early",
        ],
    ));
    assert!(log.contains("stopping after epoch 2"), "{log}");
    assert_eq!(log.matches(": train loss").count(), 2, "{log}");

    // BestModelCheckpoint with the highest train loss keeps epoch 1: the artifact equals a run
    // of one epoch (same seed, same batches, constant learning rate).
    let log = ok(fit(
        &out,
        &[
            "--epochs",
            "3",
            "--best-model-monitor",
            "train_loss",
            "--best-model-mode",
            "max",
            "--run-name",
            "best",
        ],
    ));
    assert!(log.contains("Model saved: first value"), "{log}");
    assert!(!log.contains("inf"), "no 'improved from -inf': {log}");
    assert!(log.contains("Model did not improve"), "{log}");
    assert!(log.contains("holds epoch 1's weights"), "{log}");
    ok(fit(&out, &["--epochs", "1", "--run-name", "one"]));
    let file = |run: &str, tower: &str| {
        out.join(run)
            .join("models")
            .join(tower)
            .join("model.safetensors")
    };
    let pre = tensors(Path::new("tests/fixtures/clip-tiny/model.safetensors"));
    for tower in ["clip-text", "clip-vision"] {
        let (best, one) = (tensors(&file("best", tower)), tensors(&file("one", tower)));
        assert_eq!(
            max_diff(&best, &one, &one, |b, _| b.clone()),
            0.0,
            "{tower}"
        );
        assert!(
            max_diff(&one, &pre, &pre, |p, _| p.clone()) > 0.0,
            "did not train"
        );
    }

    // WiSE-FT: alpha 0 is the pretrained model, 0.5 the midpoint of it and the fine-tuned one.
    ok(fit(
        &out,
        &["--epochs", "1", "--wise-ft-alpha", "0", "--run-name", "w0"],
    ));
    ok(fit(
        &out,
        &[
            "--epochs",
            "1",
            "--wise-ft-alpha",
            "0.5",
            "--run-name",
            "w5",
        ],
    ));
    for tower in ["clip-text", "clip-vision"] {
        let (w0, w5, one) = (
            tensors(&file("w0", tower)),
            tensors(&file("w5", tower)),
            tensors(&file("one", tower)),
        );
        assert_eq!(max_diff(&w0, &pre, &pre, |p, _| p.clone()), 0.0, "{tower}");
        let mid = max_diff(&w5, &one, &pre, |f, p| ((f + p).unwrap() * 0.5).unwrap());
        assert!(mid < 1e-6, "{tower}: {mid}");
    }

    // Monitors that cannot see a value, and alphas outside 0..=1, fail before training.
    let err = |o: Output| {
        assert!(!o.status.success());
        String::from_utf8(o.stderr).unwrap()
    };
    let e = err(fit(
        &out,
        &["--best-model-monitor", "val_loss", "--run-name", "x"],
    ));
    assert!(e.contains("--eval-data"), "{e}");
    let e = err(fit(
        &out,
        &["--early-stopping-monitor", "recall_at_k", "--run-name", "x"],
    ));
    assert!(e.contains("--query-data"), "{e}");
    let e = err(fit(
        &out,
        &["--best-model-monitor", "accuracy", "--run-name", "x"],
    ));
    assert!(e.contains("cannot monitor"), "{e}");
    let e = err(fit(&out, &["--wise-ft-alpha", "1.5", "--run-name", "x"]));
    assert!(e.contains("wise-ft-alpha"), "{e}");
}

/// Mixed precision: bf16 and f16 compute (f16 with loss scaling) train the f32 weights; the
/// losses follow f32's, and the artifact stays f32.
#[test]
fn bf16_and_f16_compute_keep_f32_weights() {
    let out = tempdir("dtype");
    let mut epoch1 = Vec::new();
    for dtype in ["f32", "bf16", "f16"] {
        let o = fit(
            &out,
            &[
                "--epochs",
                "2",
                "--no-shuffle",
                "--dtype",
                dtype,
                "--run-name",
                dtype,
            ],
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let log = String::from_utf8(o.stderr).unwrap();
        let losses: Vec<f64> = log
            .lines()
            .filter_map(|l| l.split(": train loss ").nth(1))
            .map(|v| v.trim().parse().unwrap())
            .collect();
        assert_eq!(losses.len(), 2, "{log}");
        assert!(losses[1] < losses[0], "{dtype}: {losses:?}");
        epoch1.push(losses[0]);
        let t = tensors(&out.join(dtype).join("models/clip-text/model.safetensors"));
        assert!(t.values().all(|t| t.dtype() == candle_core::DType::F32));
    }
    assert!((epoch1[1] - epoch1[0]).abs() < 0.02, "bf16 {epoch1:?}");
    // f16 skips the first steps while the loss scale settles, as torch's GradScaler does.
    assert!((epoch1[2] - epoch1[0]).abs() < 0.2, "f16 {epoch1:?}");
}

/// Runs `cmd` until its log shows `marker` (plain log lines, a line every 10 steps), sends
/// `signal`, and returns the log before and after; the run must exit 130.
fn interrupt(cmd: &mut Command, marker: &str, signal: i32) -> (String, String) {
    use std::io::{BufRead, BufReader, Read};
    let mut child = cmd.stderr(std::process::Stdio::piped()).spawn().unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let (mut seen, mut line) = (String::new(), String::new());
    while stderr.read_line(&mut line).unwrap() > 0 {
        seen.push_str(&line);
        if line.contains(marker) {
            break;
        }
        line.clear();
    }
    // SAFETY: kill only sends a signal to our own child process.
    assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
    let mut rest = String::new();
    stderr.read_to_string(&mut rest).unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(130), "{seen}{rest}");
    (seen, rest)
}

/// Ctrl-C stops a local run after its current step with a checkpoint; `--resume` continues it
/// to the artifact, and refuses other settings or a run without a checkpoint.
#[test]
fn interrupted_runs_checkpoint_and_resume() {
    let out = tempdir("interrupt");
    let args = |lr: &str| -> Vec<String> {
        [
            "fit",
            "--model",
            "tests/fixtures/clip-tiny",
            "--train-data",
            "data/demo/train.csv",
            "--batch-size",
            "32",
            "--optimizer",
            "AdamW",
            "--device",
            "cpu",
            "--epochs",
            "20",
            "--run-name",
            "stopped",
            "--learning-rate",
            lr,
            "--output",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([out.display().to_string()])
        .collect()
    };
    let e = String::from_utf8(
        bin()
            .args(args("1e-4"))
            .arg("--resume")
            .output()
            .unwrap()
            .stderr,
    )
    .unwrap();
    assert!(e.contains("no checkpoint to resume"), "{e}");

    let (seen, rest) = interrupt(bin().args(args("1e-4")), "step 10 ", libc::SIGINT);
    assert!(seen.contains("step 10 "), "{seen}");
    assert!(rest.contains("checkpoint saved"), "{rest}");
    assert!(rest.contains("--resume"), "{rest}");
    assert!(out.join(".stopped.work/checkpoint/state.json").is_file());
    assert!(!out.join("stopped").exists());

    // Other settings are refused, naming what changed.
    let o = bin().args(args("5e-4")).arg("--resume").output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("learning_rate"), "{e}");

    let o = bin()
        .args(args("1e-4"))
        .args(["--resume", "--max-steps", "20"])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("max_steps"), "{e}");

    // SIGTERM (a container stopping) stops the resumed run the same way.
    let (seen, rest) = interrupt(
        bin().args(args("1e-4")).arg("--resume"),
        "step 30 ",
        libc::SIGTERM,
    );
    assert!(seen.contains("resumed from the checkpoint"), "{seen}");
    assert!(rest.contains("checkpoint saved"), "{rest}");

    let o = bin().args(args("1e-4")).arg("--resume").output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{e}");
    assert!(e.contains("resumed from the checkpoint"), "{e}");
    assert!(out
        .join("stopped/models/clip-text/model.safetensors")
        .is_file());
    assert!(!out.join(".stopped.work").exists());

    // Every file of the artifact has the permissions the umask gives, so other users (and the
    // non-root image) can read it; safetensors alone writes 0600.
    use std::os::unix::fs::PermissionsExt;
    let umask = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Umask:"))
        .map(|v| u32::from_str_radix(v.trim(), 8).unwrap())
        .unwrap();
    for sub in ["clip-text", "clip-vision"] {
        let f = out
            .join("stopped/models")
            .join(sub)
            .join("model.safetensors");
        let mode = std::fs::metadata(&f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o666 & !umask, "{}", f.display());
    }
}

/// `--model-artifact` continues from an earlier run's artifact (Finetuner's model_artifact):
/// with the backbone frozen, the second run's backbone is the first run's trained one, not the
/// base model's; by run name (its artifact in --output) or by folder; a name with no artifact
/// is a clear error.
#[test]
fn model_artifact_continues_from_an_earlier_run() {
    let out = tempdir("continue");
    fit_ok(&out, &["--max-steps", "2", "--run-name", "first"]);
    let first_dir = out.join("first").display().to_string();
    for (run, source) in [("by-name", "first"), ("by-folder", first_dir.as_str())] {
        let log = fit_ok(
            &out,
            &[
                "--max-steps",
                "2",
                "--freeze",
                "backbone",
                "--model-artifact",
                source,
                "--run-name",
                run,
            ],
        );
        assert!(
            log.contains("model_artifact"),
            "the log says where the weights came from"
        );
        let w = |dir: &str| tensors(&out.join(dir).join("models/clip-text/model.safetensors"));
        let (base, first, second) = (
            tensors(Path::new("tests/fixtures/clip-tiny/model.safetensors")),
            w("first"),
            w(run),
        );
        let diff = |a: &candle_core::Tensor, b: &candle_core::Tensor| {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        let frozen = "text_model.encoder.layers.0.mlp.fc1.weight";
        assert_eq!(diff(&first[frozen], &second[frozen]), 0.0, "{run}");
        assert!(
            diff(&base[frozen], &second[frozen]) > 0.0,
            "{run}: started from the base model"
        );
        let head = "text_projection.weight";
        assert!(
            diff(&first[head], &second[head]) > 0.0,
            "{run}: did not train"
        );
        // The metadata names the backbone and the run continued from, not where it lay.
        let meta = std::fs::read_to_string(out.join(run).join("metadata.yml")).unwrap();
        assert!(
            meta.contains("backbone: \"tests/fixtures/clip-tiny\""),
            "{meta}"
        );
        assert!(meta.contains("model_artifact: \"first\""), "{meta}");
    }
    let args = "--max-steps 1 --model-artifact no-such-run --run-name x";
    let msg = fit_err(&out, &args.split(' ').collect::<Vec<_>>());
    assert!(msg.contains("--model-artifact no-such-run"), "{msg}");
}

/// `--val-split` (Finetuner's val_split) holds a seeded part of the training pairs out for the
/// validation loss: trained on the rest, the loss of each epoch recorded, val_loss monitorable;
/// ignored beside --eval-data; a split leaving too few pairs on either side is refused.
#[test]
fn val_split_holds_out_pairs_for_the_validation_loss() {
    let out = tempdir("val-split");
    let args = "--epochs 2 --val-split 0.25 --best-model-monitor val_loss --run-name split";
    let log = fit_ok(&out, &args.split(' ').collect::<Vec<_>>());
    assert!(log.contains("120 of the training pairs held out"), "{log}");
    assert!(log.contains("360 pairs"), "trained on the rest: {log}");
    let summary = std::fs::read_to_string(out.join("split/metrics.yml")).unwrap();
    let losses = summary.split("eval_loss_per_epoch:").nth(1).unwrap_or("");
    assert_eq!(
        losses
            .lines()
            .skip(1)
            .take_while(|l| l.trim_start().starts_with("- "))
            .count(),
        2,
        "{summary}"
    );
    for (split, words) in [("0.001", "holds out 0"), ("1", "within [0, 1)")] {
        let msg = fit_err(
            &out,
            &[
                "--max-steps",
                "1",
                "--val-split",
                split,
                "--run-name",
                "bad",
            ],
        );
        assert!(msg.contains(words), "{split}: {msg}");
    }
}

/// `--layer-wise-lr-decay` (Finetuner's LLRD): after one AdamW step, which moves each weight by
/// its learning rate, the embeddings moved by a fraction of what the projection moved; a decay
/// above 1 is refused.
#[test]
fn layer_wise_lr_decay_slows_the_layers_near_the_input() {
    let out = tempdir("llrd");
    let args = "--max-steps 1 --layer-wise-lr-decay 0.5 --run-name llrd";
    let log = fit_ok(&out, &args.split(' ').collect::<Vec<_>>());
    assert!(log.contains("layer-wise learning-rate decay 0.5"), "{log}");
    let base = tensors(Path::new("tests/fixtures/clip-tiny/model.safetensors"));
    let after = tensors(&out.join("llrd/models/clip-text/model.safetensors"));
    let moved = |name: &str| max_abs(&(&after[name] - &base[name]).unwrap());
    let (emb, head) = (
        moved("text_model.embeddings.position_embedding.weight"),
        moved("text_projection.weight"),
    );
    assert!(head > 0.0 && emb > 0.0, "{emb} {head}");
    assert!(
        emb <= 0.26 * head,
        "embeddings moved {emb}, the projection {head}"
    );
    let args = "--max-steps 1 --layer-wise-lr-decay 1.5 --run-name bad";
    let msg = fit_err(&out, &args.split(' ').collect::<Vec<_>>());
    assert!(msg.contains("within (0, 1]"));
}
