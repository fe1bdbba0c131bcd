//! The `clipft` binary driven as users drive it: encode, bench, models, and their errors.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

mod common;
use common::{image, root, tiny};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_clipft"));
    // Never reach for the network in tests, whatever the environment says.
    c.env("HF_HUB_OFFLINE", "1");
    c
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn err(out: Output) -> String {
    assert!(
        !out.status.success(),
        "unexpected success: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stderr).unwrap()
}

fn lines(s: &str) -> Vec<Value> {
    s.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn reference_embedding(file: &str, key: &str, value: &str) -> Vec<f64> {
    let refs: Vec<Value> = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/reference").join(file)).unwrap(),
    )
    .unwrap();
    let r = refs.iter().find(|r| r[key] == value).unwrap();
    r["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect()
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    dot / (a.iter().map(|x| x * x).sum::<f64>().sqrt()
        * b.iter().map(|x| x * x).sum::<f64>().sqrt())
}

fn emb(v: &Value) -> Vec<f64> {
    v["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

#[test]
fn encode_keeps_command_line_order_and_matches_references() {
    let out = ok(bin()
        .args(["encode", "--model", &tiny()])
        .args(["--image", &image("rgb_300x200.png")])
        .args(["--text", "a red striped dress"])
        .args(["--image", &image("grey_200x150.png")])
        .args(["--text", "a photo of a cat"])
        .output()
        .unwrap());
    let l = lines(&out);
    assert_eq!(l.len(), 4);
    assert_eq!(l[0]["image"], image("rgb_300x200.png"));
    assert_eq!(l[1]["text"], "a red striped dress");
    assert_eq!(l[2]["image"], image("grey_200x150.png"));
    assert_eq!(l[3]["text"], "a photo of a cat");
    for v in &l {
        assert_eq!(v["embedding"].as_array().unwrap().len(), 32);
    }
    let c = cosine(
        &emb(&l[1]),
        &reference_embedding("texts.json", "text", "a red striped dress"),
    );
    assert!(c > 0.99999, "{c}");
    let c = cosine(
        &emb(&l[0]),
        &reference_embedding("images.json", "file", "rgb_300x200.png"),
    );
    assert!(c > 0.9999, "{c}");
}

#[test]
fn encode_input_file_and_output_file() {
    let dir = tempdir("input");
    let input = dir.join("inputs.txt");
    std::fs::write(
        &input,
        format!(
            "a photo of a cat\n\n{}\n   \na caption ending in dog.png\n",
            image("tiny_30x20.png")
        ),
    )
    .unwrap();
    let output = dir.join("out.jsonl");
    let stdout = ok(bin()
        .args(["encode", "--model", &tiny(), "--batch-size", "2", "--input"])
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .output()
        .unwrap());
    assert!(stdout.is_empty());
    let l = lines(&std::fs::read_to_string(&output).unwrap());
    // Blank lines are skipped, not embedded as empty texts.
    assert_eq!(l.len(), 3);
    assert_eq!(l[0]["text"], "a photo of a cat");
    assert_eq!(l[1]["image"], image("tiny_30x20.png"));
    assert_eq!(l[2]["text"], "a caption ending in dog.png");

    // A mistyped image path is an error naming the line, not a text embedding.
    std::fs::write(&input, "a photo of a cat\nnot/an/image.png\n").unwrap();
    let e = err(bin()
        .args(["encode", "--model", &tiny(), "--input"])
        .arg(&input)
        .output()
        .unwrap());
    assert!(
        e.contains("line 2") && e.contains("not/an/image.png") && e.contains("no such file"),
        "{e}"
    );
}

/// `--input` lines are read up to a limit, naming the line over it: a file without a newline
/// used to be read whole into one line (`/dev/zero` aborted on a failed 4 GiB allocation). Only a
/// regular file is read: `/dev/zero` never ends and a FIFO would block.
#[test]
fn encode_input_lines_are_capped_and_files_regular() {
    let dir = tempdir("input-limits");
    let input = dir.join("inputs.txt");
    // 64 MiB of zeros (sparse) after a first line: line 2 is over the 1 MiB default.
    let mut f = std::fs::File::create(&input).unwrap();
    std::io::Write::write_all(&mut f, b"a photo of a cat\n").unwrap();
    f.set_len(64 << 20).unwrap();
    drop(f);
    let e = err(bin()
        .args(["encode", "--model", &tiny(), "--input"])
        .arg(&input)
        .output()
        .unwrap());
    assert!(e.contains("line 2 is longer than 1048576 bytes"), "{e}");

    // Below 4096 bytes the limit is the longest image path, so --max-text-bytes 10 still reads
    // a 4096-byte line (the tokenizer then refuses it as a text) but not a 4097-byte one.
    for (len, want) in [
        (4096, "text 1: text of 4096 bytes"),
        (4097, "line 1 is longer than 4096 bytes"),
    ] {
        std::fs::write(&input, "x".repeat(len) + "\r\n").unwrap();
        let e = err(bin()
            .args([
                "encode",
                "--model",
                &tiny(),
                "--max-text-bytes",
                "10",
                "--input",
            ])
            .arg(&input)
            .output()
            .unwrap());
        assert!(e.contains(want), "{len}: {e}");
    }

    let e = err(bin()
        .args(["encode", "--model", &tiny(), "--input", "/dev/zero"])
        .output()
        .unwrap());
    assert!(
        e.contains("/dev/zero") && e.contains("not a regular file"),
        "{e}"
    );
    let fifo = dir.join("fifo.txt");
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: `c` is a NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    let e = err(bin()
        .args(["encode", "--model", &tiny(), "--input"])
        .arg(&fifo)
        .output()
        .unwrap());
    assert!(e.contains("not a regular file"), "{e}");
}

#[test]
fn encode_errors_are_clear() {
    let dir = tempdir("errors");
    let bad = dir.join("broken.png");
    std::fs::write(&bad, b"\x89PNG\r\n\x1a\nthis is not really a png").unwrap();
    let e = err(bin()
        .args(["encode", "--model", &tiny(), "--image"])
        .arg(&bad)
        .output()
        .unwrap());
    assert!(e.contains("broken.png"), "{e}");

    let e = err(bin()
        .args(["encode", "--model", "/nonexistent/folder/x", "--text", "a"])
        .output()
        .unwrap());
    assert!(e.contains("/nonexistent/folder/x"), "{e}");

    let e = err(bin()
        .args([
            "encode",
            "--model",
            "someone/not-cached-clip",
            "--text",
            "a",
        ])
        .env("HF_HOME", dir.join("hf"))
        .output()
        .unwrap());
    assert!(
        e.contains("someone/not-cached-clip") && e.contains("offline"),
        "{e}"
    );

    // A hub repo whose config is no CLIP is refused on its config, before any weights are
    // looked for (online, they would have been downloaded first).
    let snapshot = dir.join("hf/hub/models--someone--bert/snapshots/abc");
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::write(snapshot.join("config.json"), r#"{"model_type": "bert"}"#).unwrap();
    std::fs::create_dir_all(dir.join("hf/hub/models--someone--bert/refs")).unwrap();
    std::fs::write(dir.join("hf/hub/models--someone--bert/refs/main"), "abc").unwrap();
    let e = err(bin()
        .args(["encode", "--model", "someone/bert", "--text", "a"])
        .env("HF_HOME", dir.join("hf"))
        .output()
        .unwrap());
    assert!(e.contains("\"bert\" is not a CLIP model"), "{e}");
    assert!(!e.contains("safetensors"), "{e}");

    let e = err(bin().args(["encode", "--model", &tiny()]).output().unwrap());
    assert!(e.contains("nothing to encode"), "{e}");

    let e = err(bin()
        .args([
            "encode",
            "--model",
            &tiny(),
            "--max-image-pixels",
            "1000",
            "--image",
            &image("rgb_300x200.png"),
        ])
        .output()
        .unwrap());
    assert!(e.contains("over the limit"), "{e}");

    let e = err(bin()
        .args([
            "encode",
            "--model",
            &tiny(),
            "--max-text-bytes",
            "4",
            "--text",
            "a long caption",
        ])
        .output()
        .unwrap());
    assert!(e.contains("over the limit"), "{e}");

    let e = err(bin()
        .args([
            "encode",
            "--model",
            &tiny(),
            "--device",
            "cuda:0",
            "--text",
            "a",
        ])
        .output()
        .unwrap());
    assert!(e.contains("cuda"), "{e}");
}

#[test]
fn flags_read_environment_variables() {
    let out = ok(bin()
        .args(["encode", "--text", "a photo of a cat"])
        .env("CLIPFT_MODEL", tiny())
        .env("CLIPFT_DEVICE", "cpu")
        .output()
        .unwrap());
    assert_eq!(lines(&out).len(), 1);

    // One meaning per variable: fit's artifacts folder does not become encode's output file.
    let dir = tempdir("env");
    let out = ok(bin()
        .args(["encode", "--model", &tiny(), "--text", "a cat"])
        .env("CLIPFT_OUTPUT", &dir)
        .env("CLIPFT_BATCH_SIZE", "64")
        .output()
        .unwrap());
    assert_eq!(lines(&out).len(), 1);
    // Booleans take 1/0; empty means unset.
    let json = ok(bin()
        .arg("models")
        .env("CLIPFT_JSON", "1")
        .output()
        .unwrap());
    assert!(json.trim_start().starts_with('['), "{json}");
    let table = ok(bin()
        .arg("models")
        .env("CLIPFT_JSON", "0")
        .output()
        .unwrap());
    assert!(!table.trim_start().starts_with('['), "{table}");
    let out = ok(bin()
        .args(["encode", "--model", &tiny(), "--text", "a cat"])
        .env("CLIPFT_ENCODE_OUTPUT", "")
        .env("CLIPFT_SELECT_MODEL", "")
        .output()
        .unwrap());
    assert_eq!(lines(&out).len(), 1);
    let e = err(bin()
        .args(["runs", "list", "--trainer", "grpc://127.0.0.1:1"])
        .env("CLIPFT_TRAINER", "")
        .output()
        .unwrap());
    assert!(!e.contains("empty string"), "{e}");
}

/// `--input -` reads stdin, with the same results as a file: texts and images mixed, blank lines
/// skipped, in order. The image tower is loaded when the first image arrives, after a chunk of
/// texts was embedded with the text tower alone.
#[test]
fn encode_reads_stdin_and_loads_a_tower_when_first_needed() {
    use std::io::Write;
    let dir = tempdir("stdin");
    let mut text = String::new();
    for i in 0..20 {
        text.push_str(&format!("caption number {i}\n"));
    }
    text.push_str(&format!("\n{}\na last caption\n", image("tiny_30x20.png")));
    let file = dir.join("inputs.txt");
    std::fs::write(&file, &text).unwrap();
    // Batch 2: chunks of 16 inputs, so the first chunk holds texts only.
    let args = ["encode", "--model", &tiny(), "--batch-size", "2", "--input"];
    let from_file = lines(&ok(bin().args(args).arg(&file).output().unwrap()));
    let mut child = bin()
        .args(args)
        .arg("-")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let from_stdin = lines(&ok(child.wait_with_output().unwrap()));
    assert_eq!(from_stdin.len(), 22);
    assert_eq!(from_stdin[20]["image"], image("tiny_30x20.png"));
    assert_eq!(from_stdin[21]["text"], "a last caption");
    for (a, b) in from_stdin.iter().zip(&from_file) {
        assert_eq!(a["text"], b["text"]);
        assert!(cosine(&emb(a), &emb(b)) > 0.99999);
    }
    // Nothing piped in is nothing to encode.
    let e = err(bin()
        .args(["encode", "--model", &tiny(), "--input", "-"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap());
    assert!(e.contains("nothing to encode"), "{e}");
}

/// Inputs stream: embeddings of the first chunk come out while stdin is still open (the whole
/// input used to be read, and all of it embedded, before the first line was written), and an
/// error part way says how much of the output was written before it.
#[test]
fn encode_streams_and_says_how_far_it_got() {
    use std::io::{BufRead, Write};
    let mut child = bin()
        .args([
            "encode",
            "--model",
            &tiny(),
            "--batch-size",
            "1",
            "--input",
            "-",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    // One chunk (8 inputs at batch 1), and stdin left open.
    for i in 0..8 {
        writeln!(stdin, "caption {i}").unwrap();
    }
    stdin.flush().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    let first = rx
        .recv_timeout(std::time::Duration::from_secs(120))
        .expect("no output while stdin stays open: the input is not streamed");
    assert!(first.contains("\"caption 0\""), "{first}");
    writeln!(stdin, "one more").unwrap();
    drop(stdin);
    let status = child.wait().unwrap();
    reader.join().unwrap();
    assert!(status.success());
    assert_eq!(
        rx.iter().count(),
        8,
        "the other 7 of the first chunk and the last input"
    );

    let dir = tempdir("partial");
    let input = dir.join("inputs.txt");
    let mut text: String = (0..10).map(|i| format!("caption {i}\n")).collect();
    text.push_str("no/such/image.png\n");
    std::fs::write(&input, text).unwrap();
    let output = dir.join("out.jsonl");
    let e = err(bin()
        .args(["encode", "--model", &tiny(), "--batch-size", "1", "--input"])
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .output()
        .unwrap());
    assert!(
        e.contains("stopped after the first 10 inputs") && e.contains("line 11"),
        "{e}"
    );
    let written = lines(&std::fs::read_to_string(&output).unwrap());
    assert_eq!(written.len(), 10);
    assert_eq!(written[9]["text"], "caption 9");
}

/// A reader that leaves early (`| head`) ends the output quietly: no panic, no exit 101.
#[test]
fn a_closed_pipe_ends_output_quietly() {
    use std::io::Read;
    let dir = tempdir("pipe");
    let input = dir.join("texts.txt");
    let texts: String = (0..600).map(|i| format!("caption number {i}\n")).collect();
    std::fs::write(&input, texts).unwrap();
    let mut child = bin()
        .args(["encode", "--model", &tiny(), "--input"])
        .arg(&input)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 64];
    stdout.read_exact(&mut first).unwrap();
    drop(stdout);
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}: {stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
        "{stderr}"
    );
}

#[test]
fn text_only_artifact_loads_without_vision_weights() {
    use candle_core::{safetensors, Device};
    let dir = tempdir("artifact");
    let text_dir = dir.join("run/models/clip-text");
    std::fs::create_dir_all(&text_dir).unwrap();
    let all = safetensors::load(
        root().join("tests/fixtures/clip-tiny/model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let text: std::collections::HashMap<String, candle_core::Tensor> = all
        .into_iter()
        .filter(|(k, _)| {
            k.starts_with("text_model.") || k.starts_with("text_projection") || k == "logit_scale"
        })
        .collect();
    safetensors::save(&text, text_dir.join("model.safetensors")).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(
            root().join("tests/fixtures/clip-tiny").join(f),
            text_dir.join(f),
        )
        .unwrap();
    }
    let encode_text = |artifact: &std::path::Path| {
        let mut cmd = bin();
        cmd.args(["encode", "--select-model", "clip-text"])
            .args(["--text", "a red striped dress", "--artifact"])
            .arg(artifact);
        cmd
    };
    let out = ok(encode_text(&dir.join("run")).output().unwrap());
    let c = cosine(
        &emb(&lines(&out)[0]),
        &reference_embedding("texts.json", "text", "a red striped dress"),
    );
    assert!(c > 0.99999, "{c}");
    let e = err(bin()
        .args([
            "encode",
            "--select-model",
            "clip-vision",
            "--image",
            &image("tiny_30x20.png"),
            "--artifact",
        ])
        .arg(dir.join("run"))
        .output()
        .unwrap());
    assert!(e.contains("clip-vision"), "{e}");

    let e = err(bin()
        .args(["encode", "--text", "x", "--artifact"])
        .arg(dir.join("nosuch"))
        .output()
        .unwrap());
    assert!(e.contains("does not exist"), "{e}");

    // A zipped artifact unpacks into a private folder of this user, removed after use; what a
    // killed process left there goes at the next unpack.
    let zip = clipft::artifact::zip_artifact(&dir.join("run")).unwrap();
    let tmp = dir.join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    // SAFETY: getuid has no preconditions.
    let private = tmp.join(format!("clipft-{}", unsafe { libc::getuid() }));
    let orphan = private.join("artifact-999999999-left");
    std::fs::create_dir_all(&orphan).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    let out = ok(encode_text(&zip).env("TMPDIR", &tmp).output().unwrap());
    assert_eq!(lines(&out).len(), 1);
    let left: Vec<_> = std::fs::read_dir(&private).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn bench_prints_json_last_line() {
    for (tower, extra) in [
        ("clip-text", vec!["--text-tokens", "16"]),
        ("clip-vision", vec![]),
    ] {
        let out = ok(bin()
            .args([
                "bench",
                "--model",
                &tiny(),
                "--select-model",
                tower,
                "--batch-size",
                "2",
                "--seconds",
                "0",
            ])
            .args(extra)
            .output()
            .unwrap());
        let last: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
        assert_eq!(last["tower"], tower);
        assert_eq!(last["batch_size"], 2);
        assert!(last["items_per_second"].as_f64().unwrap() > 0.0);
        assert!(last["model_tflops"].as_f64().unwrap() > 0.0, "{last}");
    }
    let e = err(bin()
        .args(["bench", "--model", &tiny(), "--select-model", "all"])
        .output()
        .unwrap());
    assert!(e.contains("one tower"), "{e}");
    // Captions of mixed lengths: echoed in the result; a shortest over the longest is refused.
    let mixed = |min: &str| {
        bin()
            .args(["bench", "--model", &tiny(), "--select-model", "clip-text"])
            .args(["--batch-size", "3", "--seconds", "0", "--text-tokens", "16"])
            .args(["--text-tokens-min", min])
            .output()
            .unwrap()
    };
    let out = ok(mixed("4"));
    let last: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(
        (
            last["text_tokens"].as_u64(),
            last["text_tokens_min"].as_u64()
        ),
        (Some(16), Some(4))
    );
    let e = err(mixed("17"));
    assert!(
        e.contains("--text-tokens-min 17 is over --text-tokens 16"),
        "{e}"
    );
}

#[test]
fn bench_train_measures_training_steps() {
    let out = ok(bin()
        .args(["bench", "--train", "--model", &tiny(), "--batch-size", "4"])
        .args(["--seconds", "0", "--text-tokens", "12"])
        .output()
        .unwrap());
    let last: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(last["tower"], "clip");
    assert_eq!(last["mode"], "train");
    assert_eq!(last["batch_size"], 4);
    assert_eq!(last["dtype"], "f32");
    assert!(last["iterations"].as_u64().unwrap() >= 2);
    assert!(last["items_per_second"].as_f64().unwrap() > 0.0);
    assert!(last["model_tflops"].as_f64().unwrap() > 0.0, "{last}");
    // Where a step's time goes, phase by phase.
    for phase in ["forward", "backward", "optimizer"] {
        let s = last["phases"][phase].as_f64().unwrap_or(f64::NAN);
        assert!(s > 0.0, "{phase}: {}", last["phases"]);
    }
    // It trains both towers, so a tower choice is a mistake, not something to ignore.
    let e = err(bin()
        .args([
            "bench",
            "--train",
            "--model",
            &tiny(),
            "--select-model",
            "clip-text",
        ])
        .output()
        .unwrap());
    assert!(e.contains("cannot be used with"), "{e}");
    let e = err(bin()
        .args([
            "bench",
            "--train",
            "--model",
            &tiny(),
            "--text-tokens",
            "500",
        ])
        .output()
        .unwrap());
    assert!(e.contains("over the model's context"), "{e}");
    // Without --train a tower is required.
    let e = err(bin().args(["bench", "--model", &tiny()]).output().unwrap());
    assert!(e.contains("--select-model"), "{e}");
}

#[test]
fn models_lists_backbones() {
    let out = ok(bin().args(["models"]).output().unwrap());
    assert!(out.contains("openai/clip-vit-base-patch32"));
    let json: Value =
        serde_json::from_str(&ok(bin().args(["models", "--json"]).output().unwrap())).unwrap();
    assert!(json
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["output_dim"] == 768));
}

fn tempdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("clipft-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn eval_prints_nine_metrics_from_csv_and_docarray_files() {
    let demo = root().join("data/demo");
    let out = ok(bin()
        .args(["eval", "--model", &tiny(), "--json", "--query-data"])
        .arg(demo.join("query.csv"))
        .arg("--index-data")
        .arg(demo.join("index.csv"))
        .output()
        .unwrap());
    let m: Value = serde_json::from_str(out.trim()).unwrap();
    let names = clipft::eval::Metrics::NAMES;
    assert_eq!(m.as_object().unwrap().len(), 9);
    for n in names {
        let v = m[n].as_f64().unwrap();
        assert!(v >= 0.0 && (n == "dcg_at_k" || v <= 1.0), "{n} = {v}");
    }
    let table = ok(bin()
        .args(["eval", "--model", &tiny(), "--limit", "5", "--query-data"])
        .arg(root().join("tests/fixtures/data/query.protobuf-array.none.bin"))
        .arg("--index-data")
        .arg(root().join("tests/fixtures/data/index.protobuf-array.none.bin"))
        .output()
        .unwrap());
    for n in names {
        assert!(table.contains(n), "{table}");
    }
    assert!(
        !table.contains("results"),
        "examples only when asked for: {table}"
    );
    // --example-queries: the first queries' top `limit` matches, named as index.csv names
    // them, under the table (the best 5) and in the JSON (all).
    let args = [
        "eval",
        "--model",
        &tiny(),
        "--limit",
        "7",
        "--example-queries",
        "2",
    ];
    let with = |extra: &[&str]| {
        ok(bin()
            .args(args)
            .args(extra)
            .arg("--query-data")
            .arg(demo.join("query.csv"))
            .arg("--index-data")
            .arg(demo.join("index.csv"))
            .output()
            .unwrap())
    };
    let text = with(&[]);
    assert!(
        text.contains("results of the model:\n  query: a red plain dress\n    1. images/index_"),
        "{text}"
    );
    assert_eq!(text.matches("    5. images/").count(), 2, "{text}");
    assert!(!text.contains("    6. "), "{text}");
    let m: Value = serde_json::from_str(with(&["--json"]).trim()).unwrap();
    let examples = m["examples"].as_array().unwrap();
    assert_eq!(examples.len(), 2);
    assert_eq!(examples[1]["query"], "red dress with stripes");
    assert_eq!(examples[1]["matches"].as_array().unwrap().len(), 7);
    let e = err(bin()
        .args(["eval", "--model", &tiny(), "--query-data"])
        .arg(demo.join("index.csv"))
        .arg("--index-data")
        .arg(demo.join("query.csv"))
        .output()
        .unwrap());
    assert!(
        e.contains("query.csv:1") && e.contains("not an image"),
        "{e}"
    );
}

#[test]
fn demo_runs_offline_on_the_shipped_data() {
    let art = tempdir("demo");
    let out = ok(bin()
        .args(["demo", "--epochs", "2", "--output"])
        .arg(&art)
        .current_dir(root())
        .output()
        .unwrap());
    assert!(
        out.contains("precision_at_k") && out.contains("before") && out.contains("after"),
        "{out}"
    );
    assert_eq!(std::fs::read_dir(&art).unwrap().count(), 1, "one artifact");
    assert!(
        out.contains("serving the artifact: clipft executor on grpc://127.0.0.1:"),
        "{out}"
    );
    assert!(out.contains("\"a red striped dress\""), "{out}");
    assert!(out.contains(".png"), "{out}");
    let e = err(bin()
        .arg("demo")
        .current_dir(std::env::temp_dir())
        .output()
        .unwrap());
    assert!(e.contains("repository root"), "{e}");
}

/// Finetuner's own artifacts (HF CLIP backbone, `model.pt` state dicts with `_model.*` and
/// `_projection.weight`, made by scripts/make_finetuner_artifact.py in float16) load as they are;
/// configuration and tokenizer come from the backbone (`--model`).
#[test]
fn finetuner_pt_artifacts_load() {
    let art = root().join("tests/fixtures/finetuner-artifact");
    let out = ok(bin()
        .args([
            "encode",
            "--model",
            &tiny(),
            "--text",
            "a red striped dress",
            "--image",
            &image("rgb_300x200.png"),
            "--artifact",
        ])
        .arg(&art)
        .output()
        .unwrap());
    let l = lines(&out);
    let c = cosine(
        &emb(&l[0]),
        &reference_embedding("texts.json", "text", "a red striped dress"),
    );
    assert!(c > 0.999, "text {c}");
    let c = cosine(
        &emb(&l[1]),
        &reference_embedding("images.json", "file", "rgb_300x200.png"),
    );
    assert!(c > 0.999, "image {c}");
    // Without --model the backbone is the artifact's descriptor (openai/clip-vit-base-patch32),
    // which is not in this offline cache: a clear error naming it.
    let dir = tempdir("ft-offline");
    let e = err(bin()
        .args([
            "encode",
            "--select-model",
            "clip-text",
            "--text",
            "a",
            "--artifact",
        ])
        .arg(&art)
        .env_remove("CLIPFT_MODEL")
        .env("HF_HOME", dir.join("hf"))
        .output()
        .unwrap());
    assert!(e.contains("openai/clip-vit-base-patch32"), "{e}");
}

/// An executor serving a gelu checkpoint (OpenCLIP/LAION conversions) answers every request, on
/// the AMX precision (which drops the f32 weights once packed) and on plain f32, with the
/// embeddings `clipft encode` gives. The fused path used to refuse gelu after packing had freed
/// the weights, failing every request with "unexpected rank".
#[test]
fn executors_serve_gelu_checkpoints_at_every_precision() {
    let model = tempdir("gelu");
    for e in std::fs::read_dir(root().join("tests/fixtures/clip-tiny")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), model.join(e.file_name())).unwrap();
    }
    let cfg = std::fs::read_to_string(model.join("config.json")).unwrap();
    std::fs::write(
        model.join("config.json"),
        cfg.replace("\"quick_gelu\"", "\"gelu\""),
    )
    .unwrap();
    let png = std::fs::read(image("rgb_300x200.png")).unwrap();
    for precision in ["high", "highest"] {
        let reference = lines(&ok(bin()
            .args(["encode", "--model"])
            .arg(&model)
            .args([
                "--matmul-precision",
                precision,
                "--text",
                "a red striped dress",
            ])
            .args(["--image", &image("rgb_300x200.png")])
            .output()
            .unwrap()));
        let mut served = spawn_executor(&model, &["--matmul-precision", precision]);
        let rt = tokio::runtime::Runtime::new().unwrap();
        let got = rt.block_on(async {
            let channel = connect(served.port).await;
            use clipft::executor::client::{encode, Input};
            encode(
                channel,
                vec![
                    ("t".into(), Input::Text("a red striped dress".into())),
                    ("i".into(), Input::Image(png.clone())),
                ],
                8,
            )
            .await
        });
        let _ = served.child.kill();
        let _ = served.child.wait();
        let got = got.unwrap_or_else(|e| panic!("{precision}: {e:#}"));
        for (id, line) in [("t", &reference[0]), ("i", &reference[1])] {
            let want = emb(line);
            let have = &got[id];
            let c = cosine(&want, &have.iter().map(|v| *v as f64).collect::<Vec<_>>());
            assert!(c > 0.99999, "{precision} {id}: cosine {c}");
        }
    }
}

/// `clipft executor` serving `model` on a free local port, with `extra` flags.
fn spawn_executor(model: &Path, extra: &[&str]) -> common::Spawned {
    let mut cmd = bin();
    cmd.args(["executor", "--model"])
        .arg(model)
        .args([
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--port-monitoring",
            "0",
        ])
        .args(extra)
        .env("CLIPFT_LOG", "warn");
    common::spawn_serving(cmd, None).unwrap()
}

/// A channel to the executor on `port`.
async fn connect(port: u16) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// A `DataRequestProto` whose `data` (field 4) is given as raw wire bytes, so a test can send
/// millions of empty documents without building them.
#[derive(Clone, PartialEq, prost::Message)]
struct RawDataRequest {
    #[prost(bytes = "vec", tag = "4")]
    data: Vec<u8>,
}

/// Any reply (its fields are not read).
#[derive(Clone, PartialEq, prost::Message)]
struct AnyReply {}

/// `data` holding `n` empty documents: `DataContentProto { docs: DocumentArrayProto { docs } }`.
fn empty_docs(n: usize) -> Vec<u8> {
    let len_prefix = |out: &mut Vec<u8>, mut v: usize| loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            break;
        }
        out.push(b | 0x80);
    };
    let mut docs = Vec::with_capacity(2 * n + 8);
    docs.extend(std::iter::repeat_n([0x0a, 0x00], n).flatten());
    let mut data = vec![0x0a];
    len_prefix(&mut data, docs.len());
    data.extend(docs);
    data
}

/// A request of empty documents, two bytes each on the wire and hundreds decoded, is refused
/// before decoding (RESOURCE_EXHAUSTED naming `--max-decoded-bytes`), at the flag's value and
/// at the default (where 1.5 million of them, 3 MB, used to take gigabytes and could take the
/// executor down); the executor then serves the next request.
#[test]
fn requests_over_the_decode_budget_are_refused_before_decoding() {
    for (flag, docs) in [(Some("1000000"), 2_000), (None, 1_500_000)] {
        let extra: &[&str] = match flag {
            Some(v) => &["--max-decoded-bytes", v],
            None => &[],
        };
        let mut served = spawn_executor(&root().join("tests/fixtures/clip-tiny"), extra);
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (refused, after) = rt.block_on(async {
            let channel = connect(served.port).await;
            let mut grpc = tonic::client::Grpc::new(channel.clone());
            grpc.ready().await.unwrap();
            let path = tonic::codegen::http::uri::PathAndQuery::from_static(
                "/jina.JinaSingleDataRequestRPC/process_single_data",
            );
            let raw = RawDataRequest {
                data: empty_docs(docs),
            };
            let codec = tonic_prost::ProstCodec::<RawDataRequest, AnyReply>::default();
            let refused = grpc.unary(tonic::Request::new(raw), path, codec).await;
            use clipft::executor::client::{encode, Input};
            let text = vec![("t".into(), Input::Text("a red dress".into()))];
            (refused, encode(channel, text, 8).await)
        });
        let _ = served.child.kill();
        let _ = served.child.wait();
        let status = refused.expect_err("the request should be refused");
        assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
        assert!(
            status.message().contains("--max-decoded-bytes"),
            "{status:?}"
        );
        assert_eq!(after.expect("the next request")["t"].len(), 32, "{flag:?}");
    }
}
