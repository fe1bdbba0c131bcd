//! Retrieval evaluation: the nine docarray metrics ([`metrics`]), the text-to-image evaluator
//! ([`evaluator`]), and [`evaluate_model`], which embeds labelled queries and index items with a
//! model and evaluates them (the `eval` command and the trainer's evaluation callback).

pub mod evaluator;
pub mod metrics;
pub mod report;

pub use evaluator::{evaluate, rank, EvalError, Evaluation, LabeledEmbeddings};
pub use metrics::Metrics;

use crate::docarray::{DataError, Item, Labeled};
use crate::model::{Encoder, ModelError};

/// What went wrong in a model evaluation.
#[derive(Debug, thiserror::Error)]
pub enum EvalRunError {
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Eval(#[from] EvalError),
    #[error("{0}")]
    Input(String),
}

/// Which side is being embedded, for progress reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Queries,
    Index,
}

/// Embeds labelled texts (queries) with the text tower.
pub fn embed_queries(
    enc: &Encoder,
    items: &[Labeled],
    batch: usize,
    progress: &mut dyn FnMut(usize),
) -> Result<LabeledEmbeddings, EvalRunError> {
    let texts = items
        .iter()
        .map(|l| match &l.item {
            Item::Text(t) => Ok(t.as_str()),
            Item::Image(_) => Err(EvalRunError::Input(format!(
                "query {} is an image, not a text",
                l.id
            ))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let e = enc.embed_texts_batched(&texts, batch, progress)?;
    Ok(labeled(items, e, enc.output_dim()))
}

/// Embeds labelled images (the index) with the vision tower, fetching remote ones as `http`
/// allows.
pub fn embed_index(
    enc: &Encoder,
    items: &[Labeled],
    batch: usize,
    http: &crate::docarray::HttpFetch,
    progress: &mut dyn FnMut(usize),
) -> Result<LabeledEmbeddings, EvalRunError> {
    let e = enc.embed_images_batched(
        items,
        batch,
        |l: &Labeled, pre| match &l.item {
            Item::Image(img) => img.preprocess(pre, http).map_err(EvalRunError::from),
            Item::Text(_) => Err(EvalRunError::Input(format!(
                "index item {} is a text, not an image",
                l.id
            ))),
        },
        progress,
    )?;
    Ok(labeled(items, e, enc.output_dim()))
}

fn labeled(items: &[Labeled], embeddings: Vec<Vec<f32>>, dim: usize) -> LabeledEmbeddings {
    LabeledEmbeddings {
        ids: items.iter().map(|l| l.id.clone()).collect(),
        labels: items.iter().map(|l| l.label.clone()).collect(),
        embeddings: embeddings.into_iter().flatten().collect(),
        dim,
    }
}

/// Embeds queries and index with `enc` and evaluates text-to-image retrieval.
pub fn evaluate_model(
    enc: &Encoder,
    queries: &[Labeled],
    index: &[Labeled],
    limit: usize,
    batch: usize,
    http: &crate::docarray::HttpFetch,
    progress: &mut dyn FnMut(Stage, usize),
) -> Result<Evaluation, EvalRunError> {
    let q = embed_queries(enc, queries, batch, &mut |n| progress(Stage::Queries, n))?;
    let x = embed_index(enc, index, batch, http, &mut |n| progress(Stage::Index, n))?;
    Ok(evaluate(&q, &x, limit, false)?)
}
