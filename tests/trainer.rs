//! The trainer service over real gRPC: the `clipft trainer` binary on loopback, driven by the
//! library's client and by the `clipft fit/runs/data` commands. Runs use the tiny fixture CLIP on
//! the demo data, so each takes seconds.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use clipft::protocol::trainer as pb;
use clipft::trainer::client::{self, Client};
use common::{free_port, root, sample, scrape, tiny};

type R<T = ()> = Result<T, Box<dyn std::error::Error>>;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_clipft"))
}

fn tempdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("clipft-trainer-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

fn demo(file: &str) -> PathBuf {
    root().join("data/demo").join(file)
}

/// A running `clipft trainer`; killed on drop.
struct Trainer {
    child: Child,
    port: u16,
}

impl Trainer {
    fn start(data_dir: &Path, args: &[&str]) -> R<Self> {
        let monitoring: &[&str] = if args.contains(&"--port-monitoring") {
            &[]
        } else {
            &["--port-monitoring", "0"]
        };
        let mut cmd = bin();
        cmd.args(["trainer", "--host", "127.0.0.1", "--port", "0"])
            .args(monitoring)
            .arg("--data-dir")
            .arg(data_dir)
            .args(args);
        let s = common::spawn_serving(cmd, None)?;
        Ok(Self {
            child: s.child,
            port: s.port,
        })
    }

    fn addr(&self) -> String {
        format!("grpc://127.0.0.1:{}", self.port)
    }

    async fn client(&self, token: Option<&str>) -> R<Client> {
        Ok(client::connect(&self.addr(), token, None).await?)
    }

    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Trainer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config(train: &str, extra: serde_json::Value) -> String {
    let mut c = serde_json::json!({
        "model": tiny(),
        "train_data": train,
        "epochs": 2,
        "batch_size": 32,
        "learning_rate": 1e-3,
        "optimizer": "AdamW",
        "device": "cpu",
    });
    if let (Some(c), Some(e)) = (c.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            c.insert(k.clone(), v.clone());
        }
    }
    c.to_string()
}

async fn create(c: &mut Client, name: &str, cfg: String) -> R<pb::Run> {
    Ok(c.create_run(pb::CreateRunRequest {
        name: name.into(),
        config_json: cfg,
        ..Default::default()
    })
    .await?
    .into_inner())
}

async fn get(c: &mut Client, name: &str) -> R<pb::Run> {
    Ok(c.get_run(pb::GetRunRequest {
        name: name.into(),
        ..Default::default()
    })
    .await?
    .into_inner())
}

/// Polls until `done` holds for the run (generous deadline: CI machines are slow).
async fn wait_for(c: &mut Client, name: &str, done: impl Fn(&pb::Run) -> bool) -> R<pb::Run> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let r = get(c, name).await?;
        if done(&r) {
            return Ok(r);
        }
        if Instant::now() > deadline {
            return Err(format!("run {name} stuck: {r:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn ended(r: &pb::Run) -> bool {
    matches!(
        pb::RunState::try_from(r.state),
        Ok(pb::RunState::Finished | pb::RunState::Failed | pb::RunState::Canceled)
    )
}

async fn log_of(c: &mut Client, name: &str) -> R<String> {
    let mut text = String::new();
    client::stream_logs(c, name, false, &mut |chunk| {
        text.push_str(&chunk.text);
        std::ops::ControlFlow::Continue(())
    })
    .await?;
    Ok(text)
}

fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> tonic::Code {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(s) => s.code(),
    }
}

fn run_cli(args: &[&str], env: &[(&str, &str)]) -> R<String> {
    let out = bin().args(args).envs(env.iter().copied()).output()?;
    if !out.status.success() {
        return Err(format!(
            "clipft {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// The whole life of a run through the commands users type: `fit --trainer --follow` pushes the
/// CSVs, follows the logs to the end, prints the table and unpacks the artifact; `runs` and
/// `data` see it all; the artifact serves; deleting removes it.
#[tokio::test(flavor = "multi_thread")]
async fn fit_follow_status_metrics_artifact_delete() -> R {
    let dir = tempdir("lifecycle");
    let t = Trainer::start(&dir.join("state"), &["--auth-token", "s3cret"])?;
    let env = [
        ("CLIPFT_TRAINER", t.addr()),
        ("CLIPFT_AUTH_TOKEN", "s3cret".to_string()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let out = dir.join("artifacts");
    let printed = run_cli(
        &[
            "fit",
            "--model",
            &tiny(),
            "--train-data",
            demo("train.csv").to_str().ok_or("path")?,
            "--eval-data",
            demo("eval.csv").to_str().ok_or("path")?,
            "--query-data",
            demo("query.csv").to_str().ok_or("path")?,
            "--index-data",
            demo("index.csv").to_str().ok_or("path")?,
            "--epochs",
            "2",
            "--batch-size",
            "32",
            "--learning-rate",
            "1e-3",
            "--run-name",
            "life",
            "--example-queries",
            "1",
            "--follow",
            "--zip",
            "--to-onnx",
            "--output",
            out.to_str().ok_or("path")?,
        ],
        &env,
    )?;
    assert!(printed.contains("run life CREATED"), "{printed}");
    assert!(printed.contains("recall_at_k"), "{printed}");
    // --zip with --trainer: the downloaded artifact is zipped locally too.
    assert!(out.join("life.zip").is_file(), "{printed}");
    let artifact = out.join("life");
    for f in [
        "config.yml",
        "metadata.yml",
        "metrics.yml",
        "report.md",
        "models/clip-text/model.safetensors",
        "models/clip-vision/model.safetensors",
        // --to-onnx travels to the trainer, and the graphs come back with the artifact.
        "models/clip-text/model.onnx",
        "models/clip-vision/model.onnx",
    ] {
        assert!(artifact.join(f).is_file(), "{f} missing from the artifact");
    }

    let status = run_cli(&["runs", "status", "life"], &env)?;
    assert_eq!(status.lines().next(), Some("FINISHED"), "{status}");
    let list = run_cli(&["runs", "list"], &env)?;
    assert!(list.contains("life") && list.contains("FINISHED"), "{list}");
    let data = run_cli(&["data", "list"], &env)?;
    for ds in ["life-train", "life-eval", "life-query", "life-index"] {
        assert!(data.contains(ds), "{data}");
    }
    let metrics: serde_json::Value =
        serde_json::from_str(&run_cli(&["runs", "metrics", "life", "--json"], &env)?)?;
    assert_eq!(metrics["epochs"].as_array().map(Vec::len), Some(2));
    assert_eq!(metrics["eval_losses"].as_array().map(Vec::len), Some(2));
    let before = metrics["before"]["recall_at_k"].as_f64().ok_or("before")?;
    let after = metrics["after"]["recall_at_k"].as_f64().ok_or("after")?;
    assert!(after > before, "recall {before} -> {after}");
    // The last epoch's metrics were measured on the weights the artifact holds.
    let last = &metrics["epochs"][1]["metrics"]["recall_at_k"];
    assert!((last.as_f64().ok_or("epoch")? - after).abs() < 1e-9);
    // Example results travel with the metrics; the bundle's images are named as the pushed
    // CSV named them, not by where the trainer keeps them.
    for stage in ["before", "after"] {
        let ex = &metrics["examples"][stage];
        assert_eq!(ex.as_array().map(Vec::len), Some(1), "{metrics}");
        assert_eq!(ex[0]["query"], "a red plain dress");
        let matches = ex[0]["matches"].as_array().ok_or("matches")?;
        assert_eq!(matches.len(), 20);
        assert!(
            matches[0]
                .as_str()
                .is_some_and(|m| m.starts_with("images/index_")),
            "{ex}"
        );
    }
    assert!(printed.contains("results after fine-tuning:"), "{printed}");

    let logs = run_cli(&["runs", "logs", "life"], &env)?;
    for want in ["started", "epoch 1:", "evaluating (after)", "finished"] {
        assert!(logs.contains(want), "{want:?} not in the log:\n{logs}");
    }

    // A second download lands beside the first; the served artifact answers like the local one.
    let again = dir.join("again");
    let got = run_cli(
        &[
            "runs",
            "artifact",
            "life",
            "--output",
            again.to_str().ok_or("path")?,
        ],
        &env,
    )?;
    assert_eq!(got.trim(), again.join("life").display().to_string());
    // A download that fails leaves no partial files; --zip writes the zip beside the folder.
    assert!(run_cli(
        &[
            "runs",
            "artifact",
            "nosuch",
            "--output",
            again.to_str().ok_or("path")?
        ],
        &env
    )
    .is_err());
    let zipped = dir.join("zipped");
    run_cli(
        &[
            "runs",
            "artifact",
            "life",
            "--zip",
            "--output",
            zipped.to_str().ok_or("path")?,
        ],
        &env,
    )?;
    assert!(zipped.join("life.zip").is_file());
    for d in [&again, &zipped] {
        let hidden: Vec<_> = std::fs::read_dir(d)?
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| n.to_string_lossy().starts_with('.'))
            .collect();
        assert!(hidden.is_empty(), "{hidden:?}");
    }
    let enc = |a: &Path| -> R<String> {
        run_cli(
            &[
                "encode",
                "--artifact",
                a.to_str().ok_or("path")?,
                "--select-model",
                "clip-text",
                "--text",
                "a red striped dress",
            ],
            &[],
        )
    };
    assert_eq!(enc(&artifact)?, enc(&again.join("life"))?);

    // In process, `fit` finds the trainer's datasets by name in its --data-dir.
    let local = run_cli(
        &[
            "fit",
            "--model",
            &tiny(),
            "--train-data",
            "life-train",
            "--data-dir",
            dir.join("state").to_str().ok_or("path")?,
            "--max-steps",
            "2",
            "--run-name",
            "local",
            "--output",
            dir.join("local").to_str().ok_or("path")?,
        ],
        &[],
    )?;
    assert!(local.contains("artifact:"), "{local}");

    // Datasets in use by an unfinished run cannot go; these can.
    run_cli(&["data", "delete", "life-eval"], &env)?;
    run_cli(&["runs", "delete", "life"], &env)?;
    let list = run_cli(&["runs", "list"], &env)?;
    assert!(!list.contains("life "), "{list}");
    assert!(!dir.join("state/runs/life").exists());
    // The datasets fit pushed for the run went with it.
    let data = run_cli(&["data", "list"], &env)?;
    assert!(!data.contains("life-"), "{data}");
    Ok(())
}

/// A token protects every call; health answers without one (probes).
#[tokio::test(flavor = "multi_thread")]
async fn wrong_or_missing_token_is_unauthenticated() -> R {
    let dir = tempdir("auth");
    let t = Trainer::start(&dir, &["--auth-token", "right"])?;
    for token in [None, Some("wrong"), Some("righ"), Some("rightt")] {
        let mut c = t.client(token).await?;
        assert_eq!(
            code(c.list_runs(pb::ListRunsRequest::default()).await),
            tonic::Code::Unauthenticated,
            "{token:?}"
        );
        assert_eq!(
            code(c.list_datasets(pb::ListDatasetsRequest {}).await),
            tonic::Code::Unauthenticated
        );
    }
    let mut c = t.client(Some("right")).await?;
    assert!(c.list_runs(pb::ListRunsRequest::default()).await.is_ok());
    let out = bin().args(["ping", &t.addr()]).output()?;
    assert!(out.status.success(), "health needs no token");
    let out = bin()
        .args(["runs", "list", "--trainer", &t.addr()])
        .env_remove("CLIPFT_AUTH_TOKEN")
        .output()?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bearer token"));
    Ok(())
}

/// Names that would escape the data folder, datasets that do not parse, uploads over the
/// limit, unknown datasets and configuration fields: each a clear error, nothing stored, and
/// the trainer keeps serving.
#[tokio::test(flavor = "multi_thread")]
async fn bad_names_and_bad_datasets_are_refused() -> R {
    let dir = tempdir("bad");
    let state = dir.join("state");
    let t = Trainer::start(&state, &["--max-dataset-bytes", "200000"])?;
    let mut c = t.client(None).await?;

    // Pushes `bytes`, announcing `bytes.len() + more` of them.
    let push_short =
        |name: &str, format: pb::DatasetFormat, file_name: &str, bytes: Vec<u8>, more: u64| {
            let header = pb::PushDatasetRequest {
                part: Some(pb::push_dataset_request::Part::Header(pb::DatasetHeader {
                    name: name.into(),
                    format: format as i32,
                    file_name: file_name.into(),
                    overwrite: false,
                    size: bytes.len() as u64 + more,
                })),
            };
            let data = pb::PushDatasetRequest {
                part: Some(pb::push_dataset_request::Part::Data(bytes.into())),
            };
            futures_util::stream::iter(vec![header, data])
        };
    let push_raw = |name: &str, format: pb::DatasetFormat, file_name: &str, bytes: Vec<u8>| {
        push_short(name, format, file_name, bytes, 0)
    };
    // A push cut short (a client's read error, a proxy) is refused, not stored smaller.
    let e = c
        .push_dataset(push_short(
            "cut",
            pb::DatasetFormat::Docarray,
            "cut.protobuf-array",
            vec![0x0a; 500],
            500,
        ))
        .await
        .expect_err("a cut push stored");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("ended after"), "{}", e.message());
    for bad in ["../escape", "a/b", ".hidden", "", "x".repeat(200).as_str()] {
        let r = c
            .push_dataset(push_raw(
                bad,
                pb::DatasetFormat::Docarray,
                "d.protobuf",
                vec![1],
            ))
            .await;
        assert_eq!(code(r), tonic::Code::InvalidArgument, "{bad:?}");
    }
    // Not a docarray file: the error names the document.
    let r = c
        .push_dataset(push_raw(
            "garbage",
            pb::DatasetFormat::Docarray,
            "g.protobuf",
            vec![1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 9, 1, 2],
        ))
        .await;
    let e = r.expect_err("garbage accepted");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("garbage"), "{}", e.message());
    // Docarray data that unpacks past --max-dataset-bytes (a 40-document bz2 file of 200 MB
    // blobs was 362 KB sent and took the trainer down), and a document whose image is a file
    // on the trainer's disk.
    let docarray_gz = |docs: Vec<clipft::docarray::proto::DocumentProto>| -> R<Vec<u8>> {
        use prost::Message;
        let arr = clipft::docarray::proto::DocumentArrayProto { docs };
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &arr.encode_to_vec())?;
        Ok(gz.finish()?)
    };
    let pair = |image: clipft::docarray::proto::DocumentProto| {
        use clipft::docarray::proto::{document_proto::Content, DocumentProto};
        DocumentProto {
            chunks: vec![
                DocumentProto {
                    content: Some(Content::Text("a red dress".into())),
                    ..Default::default()
                },
                image,
            ],
            ..Default::default()
        }
    };
    let zeros = clipft::docarray::proto::DocumentProto {
        content: Some(clipft::docarray::proto::document_proto::Content::Blob(
            vec![0u8; 150_000].into(),
        )),
        ..Default::default()
    };
    let sent = docarray_gz(vec![pair(zeros.clone()), pair(zeros)])?;
    assert!(sent.len() < 10_000, "{}", sent.len());
    let e = c
        .push_dataset(push_raw(
            "unpacks",
            pb::DatasetFormat::Docarray,
            "u.protobuf-array.gzip",
            sent,
        ))
        .await
        .expect_err("300 kB unpacked accepted under a 200 kB limit");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().contains("--max-dataset-bytes") && e.message().contains("document 1"),
        "{}",
        e.message()
    );
    let local = clipft::docarray::proto::DocumentProto {
        uri: demo("images/train_dress_red_plain_0.png")
            .canonicalize()?
            .display()
            .to_string(),
        ..Default::default()
    };
    let e = c
        .push_dataset(push_raw(
            "local",
            pb::DatasetFormat::Docarray,
            "l.protobuf-array.gzip",
            docarray_gz(vec![pair(local)])?,
        ))
        .await
        .expect_err("a document naming a file on the trainer's disk accepted");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("local file"), "{}", e.message());
    // A bundle whose entry would land outside the data folder.
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    zip.start_file("../../evil.csv", zip::write::SimpleFileOptions::default())?;
    std::io::Write::write_all(&mut zip, b"a,b\n")?;
    let evil = zip.finish()?.into_inner();
    let r = c
        .push_dataset(push_raw(
            "evil",
            pb::DatasetFormat::CsvBundle,
            "e.csv",
            evil,
        ))
        .await;
    assert_eq!(code(r), tonic::Code::InvalidArgument);
    assert!(!state.join("evil.csv").exists() && !dir.join("evil.csv").exists());
    // A bundle whose image does not decode is refused at push, naming the dataset and line,
    // not the trainer's own paths (a client skipping the local checks sends such a bundle).
    // A zipped bundle: `data.csv`, a real image as images/1.png, and `extra` entries.
    let zip_of = |csv: &str, extra: &[(&str, &[u8])]| -> R<Vec<u8>> {
        let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        let real = std::fs::read(demo("images/train_dress_red_plain_0.png"))?;
        for (name, bytes) in [("data.csv", csv.as_bytes()), ("images/1.png", &real[..])]
            .into_iter()
            .chain(extra.iter().copied())
        {
            zip.start_file(name, opts)?;
            std::io::Write::write_all(&mut zip, bytes)?;
        }
        Ok(zip.finish()?.into_inner())
    };
    let bundle = |csv: &str| {
        zip_of(
            csv,
            &[("images/0.png", b"\x89PNG\r\n\x1a\nnot really a png")],
        )
    };
    let r = c
        .push_dataset(push_raw(
            "broken",
            pb::DatasetFormat::CsvBundle,
            "b.csv",
            bundle("a red dress,images/1.png\na broken image,images/0.png\n")?,
        ))
        .await;
    let e = r.expect_err("an undecodable image accepted");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().contains("broken") && e.message().contains(":2"),
        "{}",
        e.message()
    );
    assert!(
        !e.message().contains(&state.display().to_string()),
        "{}",
        e.message()
    );
    // A CSV cell that climbs out of the bundle to an image elsewhere on the trainer's disk
    // (it starts with the bundle's folder as written, and used to be read and trained on).
    let outside = demo("images/train_dress_red_plain_0.png").canonicalize()?;
    let climb = format!(
        "images/{}{}",
        "../".repeat(64),
        outside.display().to_string().trim_start_matches('/')
    );
    let r = c
        .push_dataset(push_raw(
            "climb",
            pb::DatasetFormat::CsvBundle,
            "c.csv",
            bundle(&format!("a red dress,images/1.png\na red dress,{climb}\n"))?,
        ))
        .await;
    let e = r.expect_err("an image outside the bundle accepted");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("not in the bundle"), "{}", e.message());
    // Zeros that compress a thousandfold: an entry no row names is not unpacked (it used to
    // be, whatever its size), and one a row names counts against --max-dataset-bytes as
    // unpacked, not as sent.
    let zeros = vec![0u8; 4 << 20];
    let with_zeros = |csv: &str| zip_of(csv, &[("images/zeros.png", &zeros)]);
    let sent = with_zeros("a red dress,images/1.png\n")?;
    assert!(sent.len() < 200_000, "{}", sent.len());
    let meta = c
        .push_dataset(push_raw(
            "unnamed",
            pb::DatasetFormat::CsvBundle,
            "u.csv",
            sent,
        ))
        .await?
        .into_inner();
    assert!(meta.bytes < 200_000, "{meta:?}");
    let held = state.join("datasets/unnamed/images");
    assert!(held.join("1.png").is_file() && !held.join("zeros.png").exists());
    c.delete_dataset(pb::DeleteDatasetRequest {
        name: "unnamed".into(),
    })
    .await?;
    let r = c
        .push_dataset(push_raw(
            "named",
            pb::DatasetFormat::CsvBundle,
            "n.csv",
            with_zeros("a red dress,images/1.png\nzeros,images/zeros.png\n")?,
        ))
        .await;
    let e = r.expect_err("4 MiB unpacked accepted under a 200 kB limit");
    assert!(
        e.message().contains("--max-dataset-bytes"),
        "{}",
        e.message()
    );
    // A header row is refused, on the trainer and before upload.
    let r = c
        .push_dataset(push_raw(
            "headed",
            pb::DatasetFormat::CsvBundle,
            "h.csv",
            bundle("text,image\na red dress,images/1.png\n")?,
        ))
        .await;
    let e = r.expect_err("a header row accepted");
    assert!(e.message().contains("header"), "{}", e.message());
    let headed = dir.join("headed.csv");
    std::fs::write(
        &headed,
        format!(
            "text,image\na red dress,{}\n",
            demo("images/train_dress_red_plain_0.png").display()
        ),
    )?;
    let e = client::push_dataset(&mut c, "headed", &headed, false)
        .await
        .expect_err("a header row pushed");
    assert!(
        e.to_string().contains("header") && e.to_string().contains("headed.csv:1"),
        "{e}"
    );
    // Over the trainer's size limit.
    let r = c
        .push_dataset(push_raw(
            "big",
            pb::DatasetFormat::Docarray,
            "b.protobuf",
            vec![0; 300_000],
        ))
        .await;
    assert_eq!(code(r), tonic::Code::ResourceExhausted);
    // A CSV naming an image that is not there fails on the client, before anything is sent.
    let missing = root().join("tests/fixtures/data/missing.csv");
    let e = client::push_dataset(&mut c, "missing", &missing, false)
        .await
        .expect_err("missing image pushed");
    assert!(e.to_string().contains("missing.csv"), "{e}");
    let listed = c
        .list_datasets(pb::ListDatasetsRequest {})
        .await?
        .into_inner()
        .datasets;
    assert!(listed.is_empty(), "{listed:?}");
    let leftovers: Vec<_> = std::fs::read_dir(state.join("datasets"))?
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // A good push, then runs with bad names, unknown datasets and unknown fields.
    const ROWS: u64 = 5;
    let small = root().join("tests/fixtures/data/train.csv");
    let d = client::push_dataset(&mut c, "train", &small, false).await?;
    assert_eq!(d.items, ROWS);
    let e = client::push_dataset(&mut c, "train", &small, false)
        .await
        .expect_err("pushed twice");
    assert!(e.to_string().contains("already exists"), "{e}");
    let r = c
        .create_run(pb::CreateRunRequest {
            name: "../run".into(),
            config_json: config("train", serde_json::json!({})),
            ..Default::default()
        })
        .await;
    assert_eq!(code(r), tonic::Code::InvalidArgument);
    let r = c
        .create_run(pb::CreateRunRequest {
            name: "r".into(),
            config_json: config("nope", serde_json::json!({})),
            ..Default::default()
        })
        .await;
    assert_eq!(code(r), tonic::Code::NotFound);
    let r = c
        .create_run(pb::CreateRunRequest {
            name: "r".into(),
            config_json: config("train", serde_json::json!({"epochz": 3})),
            ..Default::default()
        })
        .await;
    let e = r.expect_err("unknown field accepted");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("epochz"), "{}", e.message());
    // A dataset in the wrong role (labelled text queries as training pairs, pairs as the image
    // index) is refused at creation, naming the dataset and not the trainer's files.
    let queries = root().join("tests/fixtures/data/query.protobuf-array.none.bin");
    client::push_dataset(&mut c, "queries", &queries, false).await?;
    for (cfg, role) in [
        (
            config("queries", serde_json::json!({})),
            "train_data queries",
        ),
        (
            config(
                "train",
                serde_json::json!({"query_data": "queries", "index_data": "train"}),
            ),
            "index_data train",
        ),
    ] {
        let e = c
            .create_run(pb::CreateRunRequest {
                name: "wrong-role".into(),
                config_json: cfg,
                ..Default::default()
            })
            .await
            .expect_err("a dataset in the wrong role was accepted");
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains(role), "{}", e.message());
        assert!(
            !e.message().contains(&*state.to_string_lossy()),
            "{}",
            e.message()
        );
    }
    assert_eq!(
        code(
            c.get_run(pb::GetRunRequest {
                name: "never".into(),
                ..Default::default()
            })
            .await
        ),
        tonic::Code::NotFound
    );
    // A run whose model does not load fails with the reason; the trainer goes on.
    create(
        &mut c,
        "nomodel",
        config("train", serde_json::json!({"model": "/nonexistent/model"})),
    )
    .await?;
    let r = wait_for(&mut c, "nomodel", ended).await?;
    assert_eq!(client::state_word(r.state), "FAILED");
    assert!(r.details.contains("/nonexistent/model"), "{}", r.details);
    assert_eq!(
        code(
            c.download_artifact(pb::DownloadArtifactRequest {
                name: "nomodel".into()
            })
            .await
        ),
        tonic::Code::FailedPrecondition
    );
    Ok(())
}

/// The http(s) image URIs of pushed data are fetched only from the hosts `--image-hosts`
/// allows: a trainer limited to public hosts refuses this test's loopback server, naming the
/// address and the flag, and one at the default trains from it.
#[tokio::test(flavor = "multi_thread")]
async fn image_hosts_limit_where_pushed_data_is_fetched_from() -> R {
    let png = std::fs::read(demo("images/train_dress_red_plain_0.png"))?;
    let base = common::http_server(png)?;
    let dir = tempdir("hosts");
    let csv = dir.join("remote.csv");
    std::fs::write(
        &csv,
        (0..4)
            .map(|i| format!("a red dress {i},{base}/img.png\n"))
            .collect::<String>(),
    )?;
    for (args, fails) in [(&["--image-hosts", "public"][..], true), (&[][..], false)] {
        let t = Trainer::start(&dir.join(format!("state-{fails}")), args)?;
        let mut c = t.client(None).await?;
        client::push_dataset(&mut c, "remote", &csv, false).await?;
        let cfg = config("remote", serde_json::json!({"epochs": 1, "batch_size": 4}));
        create(&mut c, "r", cfg).await?;
        let r = wait_for(&mut c, "r", ended).await?;
        let state = pb::RunState::try_from(r.state)?;
        if fails {
            assert_eq!(state, pb::RunState::Failed, "{r:?}");
            assert!(
                r.details.contains("127.0.0.1")
                    && r.details.contains("loopback")
                    && r.details.contains("--image-hosts"),
                "{}",
                r.details
            );
        } else {
            assert_eq!(state, pb::RunState::Finished, "{r:?}");
        }
    }
    Ok(())
}

/// A dataset being replaced by an upload that began before a run on it was created is not
/// replaced under that run: the replacement is refused when it is installed (it used to be
/// checked only at its header, and the run then failed on files that were gone).
#[tokio::test(flavor = "multi_thread")]
async fn a_dataset_is_not_replaced_under_a_run_created_during_its_upload() -> R {
    let dir = tempdir("replace");
    let t = Trainer::start(&dir, &[])?;
    let mut c = t.client(None).await?;
    client::push_dataset(&mut c, "train", &demo("train.csv"), false).await?;
    let packed = clipft::trainer::datasets::pack(&demo("train.csv"))?;
    let format = match packed.format {
        clipft::trainer::datasets::Format::Docarray => pb::DatasetFormat::Docarray,
        clipft::trainer::datasets::Format::CsvBundle => pb::DatasetFormat::CsvBundle,
    };
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::PushDatasetRequest {
        part: Some(pb::push_dataset_request::Part::Header(pb::DatasetHeader {
            name: "train".into(),
            format: format as i32,
            file_name: packed.file_name.clone(),
            overwrite: true,
            size: 0,
        })),
    })
    .await?;
    let mut pusher = c.clone();
    let push = tokio::spawn(async move {
        pusher
            .push_dataset(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    // The header is through (no run uses the dataset yet); now a run is created on it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    create(
        &mut c,
        "user",
        config("train", serde_json::json!({"epochs": 40})),
    )
    .await?;
    tx.send(pb::PushDatasetRequest {
        part: Some(pb::push_dataset_request::Part::Data(
            std::fs::read(&packed.file)?.into(),
        )),
    })
    .await?;
    drop(tx);
    let e = push.await?.expect_err("replaced under a run");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("cannot be replaced"),
        "{}",
        e.message()
    );
    let e = c
        .delete_dataset(pb::DeleteDatasetRequest {
            name: "train".into(),
        })
        .await
        .expect_err("deleted under a run");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    c.cancel_run(pb::CancelRunRequest {
        name: "user".into(),
    })
    .await?;
    let r = wait_for(&mut c, "user", ended).await?;
    assert_eq!(
        pb::RunState::try_from(r.state)?,
        pb::RunState::Canceled,
        "{r:?}"
    );
    Ok(())
}

/// A push that would leave the data folder's disk below `--min-free-bytes` is refused (here a
/// floor no disk has), and leaves nothing behind; with no floor the same push is stored.
#[tokio::test(flavor = "multi_thread")]
async fn pushes_leave_the_disk_its_free_space() -> R {
    let dir = tempdir("floor");
    let t = Trainer::start(
        &dir.join("state"),
        &["--min-free-bytes", "1152921504606846976"],
    )?;
    let mut c = t.client(None).await?;
    let e = client::push_dataset(&mut c, "train", &demo("train.csv"), false)
        .await
        .expect_err("pushed past the disk's floor");
    assert!(e.to_string().contains("--min-free-bytes"), "{e}");
    let left: Vec<_> = std::fs::read_dir(dir.join("state/datasets"))?.collect();
    assert!(left.is_empty(), "{left:?}");
    let t = Trainer::start(&dir.join("state2"), &["--min-free-bytes", "0"])?;
    let mut c = t.client(None).await?;
    client::push_dataset(&mut c, "train", &demo("train.csv"), false).await?;
    Ok(())
}

/// Two runs on a one-run trainer: the second waits CREATED until the first ended. A queued run
/// is canceled at once, a started one before its next step.
#[tokio::test(flavor = "multi_thread")]
async fn runs_queue_and_cancel_mid_epoch() -> R {
    let dir = tempdir("queue");
    let t = Trainer::start(&dir, &[])?;
    let mut c = t.client(None).await?;
    client::push_dataset(&mut c, "train", &demo("train.csv"), false).await?;
    create(
        &mut c,
        "long",
        config("train", serde_json::json!({"epochs": 40})),
    )
    .await?;
    create(
        &mut c,
        "next",
        config("train", serde_json::json!({"epochs": 1})),
    )
    .await?;
    create(&mut c, "dropped", config("train", serde_json::json!({}))).await?;
    let long = wait_for(&mut c, "long", |r| {
        r.progress.as_ref().is_some_and(|p| p.step >= 3)
    })
    .await?;
    assert_eq!(client::state_word(long.state), "STARTED");
    let next = get(&mut c, "next").await?;
    assert_eq!(client::state_word(next.state), "CREATED", "{next:?}");
    // A dataset that queued or running runs still read cannot be replaced.
    let e = client::push_dataset(&mut c, "train", &demo("eval.csv"), true)
        .await
        .expect_err("replaced a dataset in use");
    assert!(e.to_string().contains("cannot be replaced"), "{e}");
    let dropped = c
        .cancel_run(pb::CancelRunRequest {
            name: "dropped".into(),
        })
        .await?
        .into_inner();
    assert_eq!(client::state_word(dropped.state), "CANCELED");
    // A started run cannot be deleted; cancel first.
    assert_eq!(
        code(
            c.delete_run(pb::DeleteRunRequest {
                name: "long".into(),
                ..Default::default()
            })
            .await
        ),
        tonic::Code::FailedPrecondition
    );
    c.cancel_run(pb::CancelRunRequest {
        name: "long".into(),
    })
    .await?;
    let long = wait_for(&mut c, "long", ended).await?;
    assert_eq!(client::state_word(long.state), "CANCELED", "{long:?}");
    let steps = long.progress.as_ref().map_or(0, |p| p.step);
    assert!(steps < 600, "canceled after {steps} of 600 steps");
    assert!(
        long.details.contains("canceled at step"),
        "{}",
        long.details
    );
    assert!(log_of(&mut c, "long").await?.contains("cancel requested"));
    let next = wait_for(&mut c, "next", ended).await?;
    assert_eq!(client::state_word(next.state), "FINISHED", "{next:?}");
    assert!(next.started_unix >= long.finished_unix);
    // Canceling what has ended is refused; so is a second trainer on the same folder.
    let second = Trainer::start(&dir, &[])
        .err()
        .ok_or("a second trainer started")?;
    assert!(second.to_string().contains("another trainer"), "{second}");
    assert_eq!(
        code(
            c.cancel_run(pb::CancelRunRequest {
                name: "next".into()
            })
            .await
        ),
        tonic::Code::FailedPrecondition
    );
    let dropped = get(&mut c, "dropped").await?;
    assert_eq!(
        dropped.started_unix, 0,
        "a canceled queued run never starts"
    );
    Ok(())
}

/// The trainer killed mid-run (SIGKILL, no chance to save anything) and started again on the
/// same folder: every run is listed, the interrupted one resumes from its last checkpoint and
/// finishes with the same per-epoch losses as an uninterrupted run of the same configuration.
/// Its dataset is a docarray file whose images are local uris (pushed with blobs inlined).
#[tokio::test(flavor = "multi_thread")]
async fn killed_trainer_resumes_runs_after_restart() -> R {
    let dir = tempdir("restart");
    let args = ["--checkpoint-seconds", "1"];
    let t = Trainer::start(&dir, &args)?;
    let mut c = t.client(None).await?;
    let file = root().join("tests/fixtures/data/train.protobuf.lz4.bin");
    let d = client::push_dataset(&mut c, "pairs", &file, false).await?;
    assert!(d.items >= 4, "{d:?}");
    client::push_dataset(&mut c, "train", &demo("train.csv"), false).await?;
    // Batches of 2 (240 steps an epoch), so an epoch outlasts --checkpoint-seconds 1 and a
    // mid-epoch checkpoint is written on a fast, idle machine too: at 32 (and at 8) an epoch of
    // the tiny model took under a second run alone, and the test only passed while other tests
    // slowed it down.
    let cfg = config(
        "train",
        serde_json::json!({"epochs": 5, "seed": 7, "eval_data": "pairs", "batch_size": 2}),
    );
    create(&mut c, "interrupted", cfg.clone()).await?;
    create(
        &mut c,
        "queued",
        config("pairs", serde_json::json!({"epochs": 1})),
    )
    .await?;
    // Kill once a mid-epoch checkpoint exists and the run is past it.
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let log = log_of(&mut c, "interrupted").await?;
        let step = get(&mut c, "interrupted")
            .await?
            .progress
            .map_or(0, |p| p.step);
        if log.contains("checkpoint at step") && step >= 20 {
            break;
        }
        assert!(Instant::now() < deadline, "no checkpoint: {log}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    t.kill();
    // A run whose run.json no longer parses is moved aside at the restart, kept, its name
    // free again (it used to stay taken while the API could not see the run).
    let runs = dir.join("runs");
    std::fs::create_dir_all(runs.join("garbled"))?;
    std::fs::write(
        runs.join("garbled/run.json"),
        b"{\"name\": \"garbled\", trunc",
    )?;

    let t = Trainer::start(&dir, &args)?;
    let mut c = t.client(None).await?;
    let names: Vec<String> = c
        .list_runs(pb::ListRunsRequest::default())
        .await?
        .into_inner()
        .runs
        .into_iter()
        .map(|r| r.name)
        .collect();
    assert_eq!(names, ["interrupted", "queued"]);
    let aside: Vec<String> = std::fs::read_dir(&runs)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("garbled"))
        .collect();
    assert!(
        aside.len() == 1 && aside[0].starts_with(".unreadable-garbled-"),
        "{aside:?}"
    );
    let r = wait_for(&mut c, "interrupted", ended).await?;
    assert_eq!(client::state_word(r.state), "FINISHED", "{r:?}");
    let log = log_of(&mut c, "interrupted").await?;
    assert!(log.contains("trainer restarted"), "{log}");
    let resumed_at: u64 = log
        .split("resumed from the checkpoint at step ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .ok_or("no resume line")?
        .parse()?;
    assert!(resumed_at > 0, "{log}");
    let other = wait_for(&mut c, "queued", ended).await?;
    assert_eq!(client::state_word(other.state), "FINISHED", "{other:?}");

    create(&mut c, "uninterrupted", cfg).await?;
    let u = wait_for(&mut c, "uninterrupted", ended).await?;
    assert_eq!(client::state_word(u.state), "FINISHED", "{u:?}");
    let losses = |name: &str| {
        let name = name.to_string();
        let mut c = c.clone();
        async move {
            let m = c
                .get_metrics(pb::GetMetricsRequest { name })
                .await?
                .into_inner();
            R::Ok((m.epoch_losses, m.eval_losses))
        }
    };
    let (a, b) = (losses("interrupted").await?, losses("uninterrupted").await?);
    assert_eq!(a.0.len(), 5);
    for (x, y) in a.0.iter().chain(&a.1).zip(b.0.iter().chain(&b.1)) {
        assert!((x - y).abs() <= 1e-6 * y.abs(), "{a:?} vs {b:?}");
    }
    assert!(
        !dir.join("runs/interrupted/work").exists(),
        "work folder left"
    );
    Ok(())
}

/// SIGTERM: running runs write a checkpoint and stay STARTED; the next trainer continues them
/// from exactly that step.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_suspends_and_the_next_trainer_continues() -> R {
    let dir = tempdir("sigterm");
    let t = Trainer::start(&dir, &[])?;
    let mut c = t.client(None).await?;
    client::push_dataset(&mut c, "train", &demo("train.csv"), false).await?;
    create(
        &mut c,
        "r",
        config("train", serde_json::json!({"epochs": 3})),
    )
    .await?;
    wait_for(&mut c, "r", |r| {
        r.progress.as_ref().is_some_and(|p| p.step >= 5)
    })
    .await?;
    let pid = t.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()?
        .success());
    let mut t = t;
    let status = t.child.wait()?;
    assert!(status.success(), "{status:?}");
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("runs/r/run.json"))?)?;
    assert_eq!(rec["state"], "STARTED");
    let details = rec["details"].as_str().unwrap_or_default().to_string();
    assert!(details.contains("suspended at step"), "{details}");
    let step: u64 = details
        .split("suspended at step ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .ok_or("no step")?
        .parse()?;

    let t = Trainer::start(&dir, &[])?;
    let mut c = t.client(None).await?;
    let r = wait_for(&mut c, "r", ended).await?;
    assert_eq!(client::state_word(r.state), "FINISHED", "{r:?}");
    let log = log_of(&mut c, "r").await?;
    assert!(
        log.contains(&format!("resumed from the checkpoint at step {step} ")),
        "{log}"
    );
    Ok(())
}

/// Prometheus on the monitoring port: run states, steps, step time and loss after a short run.
#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_runs_steps_and_loss() -> R {
    let dir = tempdir("metrics");
    let mport = free_port()?;
    let t = Trainer::start(&dir, &["--port-monitoring", &mport.to_string()])?;
    let mut c = t.client(None).await?;
    client::push_dataset(&mut c, "train", &demo("train.csv"), false).await?;
    create(
        &mut c,
        "m",
        config("train", serde_json::json!({"max_steps": 3})),
    )
    .await?;
    create(&mut c, "gone", config("train", serde_json::json!({}))).await?;
    c.cancel_run(pb::CancelRunRequest {
        name: "gone".into(),
    })
    .await?;
    let r = wait_for(&mut c, "m", ended).await?;
    assert_eq!(client::state_word(r.state), "FINISHED", "{r:?}");
    let text = scrape(mport)?;
    let v = |series: &str| sample(&text, series).ok_or_else(|| format!("no {series} in\n{text}"));
    assert_eq!(v("clipft_trainer_runs{state=\"FINISHED\"}")?, 1.0);
    assert_eq!(v("clipft_trainer_runs{state=\"CANCELED\"}")?, 1.0);
    assert_eq!(v("clipft_trainer_runs{state=\"STARTED\"}")?, 0.0);
    assert_eq!(
        v("clipft_trainer_runs_ended_total{state=\"FINISHED\"}")?,
        1.0
    );
    assert_eq!(v("clipft_trainer_steps_total")?, 3.0);
    assert_eq!(v("clipft_trainer_step_seconds_count")?, 3.0);
    assert!(v("clipft_trainer_loss{run=\"m\"}")? > 0.0);
    Ok(())
}

/// Finetuner's experiments: created explicitly or by a run's first use, listed with their run
/// counts, scoping get/list/delete of runs, deleted with their runs (refused while one trains),
/// kept across a restart; run names stay unique across experiments. Through gRPC and the CLI.
#[tokio::test(flavor = "multi_thread")]
async fn experiments_group_runs_and_go_with_them() -> R {
    let dir = tempdir("experiments");
    let t = Trainer::start(&dir, &[])?;
    let mut c = t.client(None).await?;
    let names = |l: &[pb::Experiment]| l.iter().map(|x| x.name.clone()).collect::<Vec<_>>();
    let list = c
        .list_experiments(pb::ListExperimentsRequest {})
        .await?
        .into_inner()
        .experiments;
    assert_eq!(
        names(&list),
        ["default"],
        "a fresh trainer has the default experiment"
    );

    let a = c
        .create_experiment(pb::CreateExperimentRequest {
            name: "exp-a".into(),
        })
        .await?
        .into_inner();
    assert_eq!((a.runs, a.status.as_str()), (0, "ACTIVE"));
    for (name, want) in [
        ("exp-a", tonic::Code::AlreadyExists),
        ("default", tonic::Code::AlreadyExists),
        ("../up", tonic::Code::InvalidArgument),
        ("", tonic::Code::InvalidArgument),
    ] {
        let got = code(
            c.create_experiment(pb::CreateExperimentRequest { name: name.into() })
                .await,
        );
        assert_eq!(got, want, "create_experiment({name:?})");
    }

    // A run in an unknown experiment creates it; one without goes to "default".
    client::push_dataset(&mut c, "shared", &demo("train.csv"), false).await?;
    client::push_dataset(&mut c, "long-train", &demo("train.csv"), false).await?;
    let long = c
        .create_run(pb::CreateRunRequest {
            name: "long".into(),
            config_json: config("long-train", serde_json::json!({"epochs": 40})),
            experiment: "exp-b".into(),
        })
        .await?
        .into_inner();
    assert_eq!(long.experiment, "exp-b");
    let cfg: serde_json::Value = serde_json::from_str(&long.config_json)?;
    assert_eq!(cfg["experiment_name"], "exp-b");
    let plain = create(
        &mut c,
        "plain",
        config(
            "shared",
            serde_json::json!({"epochs": 1, "description": "the baseline"}),
        ),
    )
    .await?;
    assert_eq!(plain.experiment, "default");
    let cfg: serde_json::Value = serde_json::from_str(&plain.config_json)?;
    assert_eq!(cfg["description"], "the baseline");
    let wordy = create(
        &mut c,
        "wordy",
        config(
            "shared",
            serde_json::json!({"description": "x".repeat(4097)}),
        ),
    )
    .await;
    let e = wordy.expect_err("a 4097-byte description was kept");
    assert!(e.to_string().contains("4097 bytes"), "{e}");
    // The configuration's experiment_name serves when the request names none.
    let in_a = create(
        &mut c,
        "in-a",
        config(
            "shared",
            serde_json::json!({"epochs": 1, "experiment_name": "exp-a"}),
        ),
    )
    .await?;
    assert_eq!(in_a.experiment, "exp-a");
    let bad = c
        .create_run(pb::CreateRunRequest {
            name: "x".into(),
            config_json: config("shared", serde_json::json!({})),
            experiment: "no/slash".into(),
        })
        .await;
    assert_eq!(code(bad), tonic::Code::InvalidArgument);
    // Run names are unique across experiments.
    let again = c
        .create_run(pb::CreateRunRequest {
            name: "long".into(),
            config_json: config("shared", serde_json::json!({})),
            experiment: "exp-a".into(),
        })
        .await;
    assert_eq!(code(again), tonic::Code::AlreadyExists);

    // get / list / delete scoped by experiment.
    let get_in = |name: &str, experiment: &str| pb::GetRunRequest {
        name: name.into(),
        experiment: experiment.into(),
    };
    assert_eq!(
        c.get_run(get_in("long", "exp-b")).await?.into_inner().name,
        "long"
    );
    assert_eq!(
        c.get_run(get_in("long", "")).await?.into_inner().name,
        "long"
    );
    let wrong = c.get_run(get_in("long", "exp-a")).await;
    let e = wrong.expect_err("found a run in another experiment");
    assert_eq!(e.code(), tonic::Code::NotFound);
    assert!(
        e.message().contains("is in experiment \"exp-b\""),
        "{}",
        e.message()
    );
    let in_b = c
        .list_runs(pb::ListRunsRequest {
            experiment: "exp-b".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .runs;
    assert_eq!(
        in_b.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
        ["long"]
    );
    let all = c
        .list_runs(pb::ListRunsRequest::default())
        .await?
        .into_inner();
    assert_eq!((all.runs.len(), all.total), (3, 3));
    // Pages in creation order; the client gathers them.
    let page = |page, size| pb::ListRunsRequest {
        page,
        size,
        ..Default::default()
    };
    let second = c.list_runs(page(2, 2)).await?.into_inner();
    let run_names = |runs: &[pb::Run]| runs.iter().map(|r| r.name.clone()).collect::<Vec<_>>();
    assert_eq!(
        (run_names(&second.runs), second.total),
        (vec!["in-a".to_string()], 3)
    );
    assert!(c.list_runs(page(9, 2)).await?.into_inner().runs.is_empty());
    for size in [1, 2, 3] {
        let gathered = client::list_runs_in_pages(&mut c, "", size).await?;
        assert_eq!(
            run_names(&gathered),
            ["long", "plain", "in-a"],
            "pages of {size}"
        );
    }
    let none = c
        .list_runs(pb::ListRunsRequest {
            experiment: "nope".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(code(none), tonic::Code::NotFound);
    let other = c
        .delete_run(pb::DeleteRunRequest {
            name: "plain".into(),
            experiment: "exp-a".into(),
        })
        .await;
    assert_eq!(code(other), tonic::Code::NotFound);
    assert_eq!(get(&mut c, "plain").await?.name, "plain", "kept");

    // The CLI lists them.
    let env = [("CLIPFT_TRAINER", t.addr())];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let listed = run_cli(&["experiments", "list"], &env)?;
    let rows: Vec<Vec<&str>> = listed
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows.iter().map(|r| &r[..3]).collect::<Vec<_>>(),
        [
            ["default", "1", "1"],
            ["exp-a", "1", "1"],
            ["exp-b", "1", "1"]
        ]
        .iter()
        .map(|r| &r[..])
        .collect::<Vec<_>>(),
        "{listed}"
    );
    let runs_b = run_cli(&["runs", "list", "--experiment", "exp-b"], &env)?;
    assert_eq!(runs_b.lines().count(), 2, "{runs_b}");
    assert!(runs_b
        .lines()
        .nth(1)
        .is_some_and(|l| l.starts_with("long ") && l.contains(" exp-b ")));

    // An experiment with a run in training is not deleted; once it ended, it goes with its
    // runs and the datasets pushed for them, not those other runs use.
    wait_for(&mut c, "long", |r| client::state_word(r.state) == "STARTED").await?;
    let busy = c
        .delete_experiment(pb::DeleteExperimentRequest {
            name: "exp-b".into(),
        })
        .await
        .expect_err("deleted an experiment whose run trains");
    assert_eq!(busy.code(), tonic::Code::FailedPrecondition);
    assert!(busy.message().contains("long"), "{}", busy.message());
    c.cancel_run(pb::CancelRunRequest {
        name: "long".into(),
    })
    .await?;
    wait_for(&mut c, "long", ended).await?;
    let out = run_cli(&["experiments", "delete", "exp-b"], &env)?;
    assert_eq!(out.trim(), "deleted exp-b (1 runs)");
    assert_eq!(
        code(c.get_run(get_in("long", "")).await),
        tonic::Code::NotFound
    );
    assert!(!dir.join("runs/long").exists());
    let datasets = client::dataset_names(&mut c).await?;
    assert_eq!(datasets, ["shared"], "the run's own dataset went with it");
    assert_eq!(
        code(
            c.get_experiment(pb::GetExperimentRequest {
                name: "exp-b".into()
            })
            .await
        ),
        tonic::Code::NotFound
    );

    // Experiments outlive a restart, the empty ones too; "default" stays when deleted.
    wait_for(&mut c, "in-a", ended).await?;
    wait_for(&mut c, "plain", ended).await?;
    run_cli(&["experiments", "create", "empty"], &env)?;
    t.kill();
    let t = Trainer::start(&dir, &[])?;
    let mut c = t.client(None).await?;
    let list = c
        .list_experiments(pb::ListExperimentsRequest {})
        .await?
        .into_inner()
        .experiments;
    assert_eq!(names(&list), ["default", "exp-a", "empty"]);
    assert_eq!(list[1].runs, 1);
    let d = c
        .delete_experiment(pb::DeleteExperimentRequest {
            name: "default".into(),
        })
        .await?
        .into_inner();
    assert_eq!(d.runs, 1);
    assert_eq!(
        code(c.get_run(get_in("plain", "")).await),
        tonic::Code::NotFound
    );
    let x = c
        .get_experiment(pb::GetExperimentRequest {
            name: "default".into(),
        })
        .await?
        .into_inner();
    assert_eq!(x.runs, 0);
    assert_eq!(get(&mut c, "in-a").await?.experiment, "exp-a");
    Ok(())
}

/// `--max-queued-runs`: runs waiting to start are limited, a run in training does not count,
/// and a canceled one frees its place.
#[tokio::test(flavor = "multi_thread")]
async fn the_run_queue_is_bounded() -> R {
    let dir = tempdir("queue-limit");
    let t = Trainer::start(&dir, &["--max-queued-runs", "1"])?;
    let mut c = t.client(None).await?;
    client::push_dataset(&mut c, "train", &demo("train.csv"), false).await?;
    let long = || config("train", serde_json::json!({"epochs": 40}));
    create(&mut c, "training", long()).await?;
    wait_for(&mut c, "training", |r| {
        client::state_word(r.state) == "STARTED"
    })
    .await?;
    create(&mut c, "waiting", long()).await?;
    let full = create(&mut c, "refused", long()).await;
    let e = full.expect_err("a second run was queued past --max-queued-runs 1");
    let status = e.downcast_ref::<tonic::Status>().ok_or("not a status")?;
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert!(status.message().contains("--max-queued-runs"), "{status}");
    assert_eq!(
        code(get_raw(&mut c, "refused").await),
        tonic::Code::NotFound
    );
    c.cancel_run(pb::CancelRunRequest {
        name: "waiting".into(),
    })
    .await?;
    create(&mut c, "next", long()).await?;
    for name in ["next", "training"] {
        c.cancel_run(pb::CancelRunRequest { name: name.into() })
            .await?;
    }
    Ok(())
}

async fn get_raw(c: &mut Client, name: &str) -> Result<pb::Run, tonic::Status> {
    Ok(c.get_run(pb::GetRunRequest {
        name: name.into(),
        ..Default::default()
    })
    .await?
    .into_inner())
}

/// `--max-experiments`: "default" counts; past the limit neither CreateExperiment nor a run in
/// a new experiment creates one, and deleting one frees its place.
#[tokio::test(flavor = "multi_thread")]
async fn experiments_are_bounded() -> R {
    let dir = tempdir("experiment-limit");
    let t = Trainer::start(&dir, &["--max-experiments", "2"])?;
    let mut c = t.client(None).await?;
    let make = |name: &str| pb::CreateExperimentRequest { name: name.into() };
    c.create_experiment(make("first")).await?;
    let e = c
        .create_experiment(make("second"))
        .await
        .expect_err("a third experiment past --max-experiments 2");
    assert_eq!(e.code(), tonic::Code::ResourceExhausted);
    assert!(e.message().contains("--max-experiments"), "{}", e.message());
    client::push_dataset(&mut c, "train", &demo("train.csv"), false).await?;
    let run = c
        .create_run(pb::CreateRunRequest {
            name: "r".into(),
            config_json: config("train", serde_json::json!({})),
            experiment: "second".into(),
        })
        .await;
    assert_eq!(code(run), tonic::Code::ResourceExhausted);
    assert_eq!(code(get_raw(&mut c, "r").await), tonic::Code::NotFound);
    c.delete_experiment(pb::DeleteExperimentRequest {
        name: "first".into(),
    })
    .await?;
    c.create_experiment(make("second")).await?;
    Ok(())
}
