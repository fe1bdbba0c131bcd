//! `clipft demo`: the story offline, on what the repository ships: the small random-weight CLIP in
//! `tests/fixtures/clip-tiny` and the rendered garments in `data/demo`. It measures text-to-image
//! retrieval on the held-out query/index split, fine-tunes in process (the same code as `fit`),
//! prints the before/after table, writes the artifact, and shows the fine-tuned model's top
//! matches for a few captions.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::docarray::{read_labeled, ImageSource, Item, Modality};
use crate::eval::{embed_index, rank, LabeledEmbeddings};
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
    println!(
        "clipft demo: fine-tune a small random-weight CLIP to search {} by caption",
        data.display()
    );
    let cfg = FitConfig {
        model: args.model.display().to_string(),
        train_data: data.join("train.csv"),
        eval_data: Some(data.join("eval.csv")),
        query_data: Some(data.join("query.csv")),
        index_data: Some(data.join("index.csv")),
        run_name: format!("demo-{}", super::fit::random_run_name()),
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
    };
    let report = super::fit::run_with_progress(&cfg)?;

    // Search with the fine-tuned artifact, as the executor serves it.
    let files = crate::artifact::submodel_files(&report.artifact, Towers::ALL)?;
    let enc = Encoder::load(
        &files,
        &LoadOptions {
            towers: Towers::ALL,
            ..Default::default()
        },
    )?;
    let index = read_labeled(&data.join("index.csv"), Modality::Image)?;
    let x = embed_index(&enc, &index, 64, &mut |_| {})?;
    let captions: Vec<String> = std::fs::read_to_string(data.join("captions_demo.txt"))
        .with_context(|| format!("reading {}", data.join("captions_demo.txt").display()))?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    let cq = LabeledEmbeddings {
        ids: captions.clone(),
        labels: captions.clone(),
        embeddings: enc.embed_texts(&captions)?.into_iter().flatten().collect(),
        dim: enc.output_dim(),
    };
    println!("\ntop {} matches of the fine-tuned model:", args.top);
    for (caption, top) in captions.iter().zip(rank(&cq, &x, args.top, false)?) {
        println!("{caption:?}");
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
            println!("    {score:.3}  {file:<40} ({})", index[i].label);
        }
    }
    Ok(())
}
