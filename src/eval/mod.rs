//! Retrieval evaluation: the nine docarray metrics ([`metrics`]), the text-to-image evaluator
//! ([`evaluator`]), and [`evaluate_model`], which embeds labelled queries and index items with a
//! model and evaluates them (the `eval` command and the trainer's evaluation callback).

pub mod evaluator;
pub mod metrics;
pub mod report;

pub use evaluator::{
    evaluate, evaluate_by, rank, rank_by, Distance, EvalError, Evaluation, LabeledEmbeddings,
};
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

/// One query of Finetuner's example results (EvaluationCallback `gather_examples`): the query's
/// text and its top matches, best first, each named as the index data names it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Example {
    pub query: String,
    pub matches: Vec<String>,
}

/// Example results before and after fine-tuning (empty when none were asked for).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ExampleResults {
    pub before: Vec<Example>,
    pub after: Vec<Example>,
}

impl ExampleResults {
    pub fn is_empty(&self) -> bool {
        self.before.is_empty() && self.after.is_empty()
    }
}

/// The longest text an example keeps of a query or a match name (a `data:` URI holds a whole
/// image).
const MAX_EXAMPLE_CHARS: usize = 256;

fn cut(s: &str) -> String {
    match s.char_indices().nth(MAX_EXAMPLE_CHARS) {
        None => s.to_string(),
        Some((at, _)) => format!("{}...", &s[..at]),
    }
}

/// How an example names an index item: an image file by its path below `base` (the folder of
/// the index data, as a CSV names it; on a trainer this hides where its data folder is), a URI
/// as written, an image held in the data (blob, tensor) by the uri it was loaded from, else
/// its item id.
pub fn item_name(item: &Labeled, base: Option<&std::path::Path>) -> String {
    use crate::docarray::ImageSource;
    let name = match &item.item {
        Item::Text(t) => t.clone(),
        Item::Image(img) => match &img.source {
            ImageSource::Path(p) => match base.and_then(|b| p.strip_prefix(b).ok()) {
                Some(rel) => rel.display().to_string(),
                None => p
                    .file_name()
                    .map_or_else(|| item.id.clone(), |f| f.to_string_lossy().to_string()),
            },
            ImageSource::Remote(u) | ImageSource::DataUri(u) => u.clone(),
            ImageSource::Blob(_) | ImageSource::Pixels { .. } => {
                item.uri.clone().unwrap_or_else(|| item.id.clone())
            }
        },
    };
    cut(&name)
}

/// The first `n` queries of an evaluation with their top `k` matches.
pub fn examples(
    ev: &Evaluation,
    queries: &[Labeled],
    index: &[Labeled],
    base: Option<&std::path::Path>,
    n: usize,
    k: usize,
) -> Vec<Example> {
    ev.per_query
        .iter()
        .zip(queries)
        .take(n)
        .map(|(r, q)| Example {
            query: item_name(q, None),
            matches: r
                .matches
                .iter()
                .take(k)
                .filter_map(|&i| index.get(i))
                .map(|x| item_name(x, base))
                .collect(),
        })
        .collect()
}

/// Embeds queries and index with `enc` and evaluates text-to-image retrieval: the best `limit`
/// matches of each query by `distance`.
pub fn evaluate_model(
    enc: &Encoder,
    queries: &[Labeled],
    index: &[Labeled],
    (limit, distance): (usize, Distance),
    batch: usize,
    http: &crate::docarray::HttpFetch,
    progress: &mut dyn FnMut(Stage, usize),
) -> Result<Evaluation, EvalRunError> {
    let q = embed_queries(enc, queries, batch, &mut |n| progress(Stage::Queries, n))?;
    let x = embed_index(enc, index, batch, http, &mut |n| progress(Stage::Index, n))?;
    Ok(evaluate_by(&q, &x, limit, false, distance)?)
}
