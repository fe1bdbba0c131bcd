//! `clipft demo`: the story offline, on what the repository ships: the small random-weight CLIP in
//! `tests/fixtures/clip-tiny` and the rendered garments in `data/demo`. It measures text-to-image
//! retrieval on the held-out query/index split, fine-tunes in process (the same code as `fit`),
//! prints the before/after table, writes the artifact, serves it with the executor on loopback and
//! shows the top matches for a few captions, embedded over gRPC.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::docarray::{read_labeled, ImageSource, Item, Modality};
use crate::eval::{rank, LabeledEmbeddings};
use crate::executor::client::{self, Input};
use crate::executor::{Core, ExecutorOptions, ServerConfig};
use crate::model::{Encoder, LoadOptions, Towers};
use crate::trainer::fit::FitConfig;
use crate::trainer::optim::OptimizerKind;
use crate::trainer::schedule::Scheduler;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// The demo data set (train.csv, eval.csv, query.csv, index.csv, captions_demo.txt).
    #[arg(long, env = "CLIPFT_DEMO_DATA", default_value = "data/demo")]
    pub data: PathBuf,
    /// The model to start from.
    #[arg(long, env = "CLIPFT_MODEL", default_value = "tests/fixtures/clip-tiny")]
    pub model: PathBuf,
    /// Matches shown per caption.
    #[arg(long, env = "CLIPFT_TOP", default_value_t = 3)]
    pub top: usize,
    /// Fine-tuning epochs over the 480 training pairs (about 2 s each on two cores).
    #[arg(long, env = "CLIPFT_EPOCHS", default_value_t = 30)]
    pub epochs: usize,
    /// Where the fine-tuned artifact is written.
    #[arg(long, env = "CLIPFT_OUTPUT", default_value = "artifacts")]
    pub output: PathBuf,
}

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    for p in [&args.data, &args.model] {
        if !p.exists() {
            anyhow::bail!(
                "{} not found: run the demo from the repository root",
                p.display()
            );
        }
    }
    let data = &args.data;
    outln!(
        "clipft demo: fine-tune a small random-weight CLIP to search {} by caption",
        data.display()
    );
    let cfg = FitConfig {
        model: args.model.display().to_string(),
        train_data: data.join("train.csv"),
        eval_data: Some(data.join("eval.csv")),
        query_data: Some(data.join("query.csv")),
        index_data: Some(data.join("index.csv")),
        run_name: format!("demo-{}", crate::trainer::runs::random_run_name()),
        epochs: args.epochs,
        batch_size: 32,
        learning_rate: 1e-3,
        optimizer: OptimizerKind::AdamW,
        weight_decay: 0.01,
        scheduler: Scheduler::Cosine,
        warmup_steps: 10,
        max_steps: None,
        seed: 0,
        shuffle: true,
        device: "cpu".into(),
        output: args.output.clone(),
        limit: 20,
        freeze: Vec::new(),
        max_grad_norm: None,
        zip: false,
        // Metrics before and after only: the demo should stay within a couple of minutes.
        eval_every: 0,
        ..Default::default()
    };
    let report = super::fit::run_with_progress(&cfg, &Default::default())?;

    // Serve the fine-tuned artifact with the executor and search through it over gRPC, as
    // clip_client would: index images and captions go out as documents, embeddings come back.
    let files = crate::artifact::submodel_files(&report.artifact, Towers::ALL)?;
    let enc = Encoder::load(
        &files,
        &LoadOptions {
            towers: Towers::ALL,
            ..Default::default()
        },
    )?;
    let dim = enc.output_dim();
    let index = read_labeled(&data.join("index.csv"), Modality::Image)?;
    let captions: Vec<String> = std::fs::read_to_string(data.join("captions_demo.txt"))
        .with_context(|| format!("reading {}", data.join("captions_demo.txt").display()))?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    let mut images = Vec::with_capacity(index.len());
    for (i, item) in index.iter().enumerate() {
        let Item::Image(img) = &item.item else {
            anyhow::bail!("index item {i} is not an image");
        };
        let ImageSource::Path(p) = &img.source else {
            anyhow::bail!("index item {i} is not an image file");
        };
        let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
        images.push((i.to_string(), Input::Image(bytes)));
    }
    let texts: Vec<(String, Input)> = captions
        .iter()
        .enumerate()
        .map(|(i, c)| (format!("q{i}"), Input::Text(c.clone())))
        .collect();
    let core = Core::start(
        enc,
        &ExecutorOptions {
            name: "demo".into(),
            ..Default::default()
        },
    )?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let (image_rows, text_rows) = runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(crate::executor::serve(
            core,
            ServerConfig::default(),
            listener,
            async {
                let _ = stopped.await;
            },
        ));
        outln!(
            "\nserving the artifact: clipft executor on grpc://{addr}; sending {} images and {} captions",
            images.len(),
            texts.len()
        );
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .connect()
            .await?;
        let image_rows = client::encode(channel.clone(), images, 8).await?;
        let text_rows = client::encode(channel, texts, 8).await?;
        let _ = stop.send(());
        server.await??;
        anyhow::Ok((image_rows, text_rows))
    })?;
    let rows = |prefix: &str, n: usize, got: &std::collections::HashMap<String, Vec<f32>>| {
        (0..n)
            .map(|i| {
                got.get(&format!("{prefix}{i}"))
                    .cloned()
                    .ok_or_else(|| anyhow::anyhow!("no embedding for {prefix}{i}"))
            })
            .collect::<anyhow::Result<Vec<_>>>()
            .map(|v| v.into_iter().flatten().collect::<Vec<f32>>())
    };
    let x = LabeledEmbeddings {
        ids: index.iter().map(|l| l.id.clone()).collect(),
        labels: index.iter().map(|l| l.label.clone()).collect(),
        embeddings: rows("", index.len(), &image_rows)?,
        dim,
    };
    let cq = LabeledEmbeddings {
        ids: captions.clone(),
        labels: captions.clone(),
        embeddings: rows("q", captions.len(), &text_rows)?,
        dim,
    };
    outln!("\ntop {} matches of the fine-tuned model:", args.top);
    for (caption, top) in captions.iter().zip(rank(&cq, &x, args.top, false)?) {
        outln!("{caption:?}");
        for (i, score) in top {
            let file = match &index[i].item {
                Item::Image(img) => match &img.source {
                    ImageSource::Path(p) => p
                        .file_name()
                        .map(|f| f.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    _ => index[i].id.clone(),
                },
                Item::Text(_) => index[i].id.clone(),
            };
            outln!("    {score:.3}  {file:<40} ({})", index[i].label);
        }
    }
    Ok(())
}
