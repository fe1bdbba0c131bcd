//! `clipft demo`: the story offline, on what the repository ships: the small CLIP in
//! `tests/fixtures/clip-tiny` and the rendered garments in `data/demo`. It evaluates text-to-image
//! retrieval on the held-out query/index split, prints the metrics table, and shows the top
//! matches for a few captions.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::docarray::{read_labeled, Item, Labeled, Modality};
use crate::eval::{embed_index, evaluate, rank, LabeledEmbeddings};
use crate::model::{Encoder, LoadOptions, ModelFiles, Towers};

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
}

fn label_of(l: &Labeled) -> &str {
    &l.label
}

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    let need = |p: PathBuf| -> anyhow::Result<PathBuf> {
        if p.exists() {
            Ok(p)
        } else {
            anyhow::bail!(
                "{} not found: run the demo from the repository root",
                p.display()
            )
        }
    };
    let data = need(args.data.clone())?;
    let model_dir = need(args.model.clone())?;
    println!(
        "clipft demo: text-to-image search on {} rendered garments",
        data.display()
    );
    let files = ModelFiles::from_dir(&model_dir)?;
    let enc = Encoder::load(
        &files,
        &LoadOptions {
            towers: Towers::ALL,
            ..Default::default()
        },
    )?;
    println!(
        "model: {} ({}-d embeddings)",
        model_dir.display(),
        enc.output_dim()
    );

    let queries = read_labeled(&data.join("query.csv"), Modality::Text)?;
    let index = read_labeled(&data.join("index.csv"), Modality::Image)?;
    println!(
        "evaluating {} caption queries against {} images ...",
        queries.len(),
        index.len()
    );
    let q = crate::eval::embed_queries(&enc, &queries, 64, &mut |_| {})?;
    let x = embed_index(&enc, &index, 64, &mut |_| {})?;
    let eval = evaluate(&q, &x, 20, false)?;
    println!(
        "\n{}\n",
        super::eval::metrics_table(&[("model", &eval.mean)])
    );

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
    for (caption, top) in captions.iter().zip(rank(&cq, &x, args.top, false)?) {
        println!("{caption:?}");
        for (i, score) in top {
            let file = match &index[i].item {
                Item::Image(img) => match &img.source {
                    crate::docarray::ImageSource::Path(p) => p
                        .file_name()
                        .map(|f| f.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    _ => index[i].id.clone(),
                },
                Item::Text(_) => index[i].id.clone(),
            };
            println!("    {score:.3}  {file:<40} ({})", label_of(&index[i]));
        }
    }
    Ok(())
}
