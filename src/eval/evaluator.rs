//! Text-to-image retrieval evaluation as Finetuner ran it: queries (texts) against an index
//! (images), top `limit` by cosine, a match relevant when the `finetuner_label`s are equal,
//! `max_rel` = how many index items carry the query's label, the nine metrics averaged over queries.
//!
//! Scores for the whole index come from blocked matrix products (the fused CPU kernels, AMX where
//! present); the best `limit + RERANK_MARGIN` candidates of each query are then re-scored exactly
//! in f64, as Finetuner did after casting embeddings to float64, so rankings agree with docarray's
//! even where f32 rounding would swap near-ties.

use std::collections::HashMap;

use rayon::prelude::*;

use super::metrics::{MetricError, Metrics};
use crate::model::{amx, cpu};

/// Extra candidates re-scored in f64 beyond `limit`.
const RERANK_MARGIN: usize = 16;
/// Queries per matrix product; bounds the score buffer to `QUERY_BLOCK x index size` floats.
const QUERY_BLOCK: usize = 256;

/// How matches are ordered: docarray v1's metrics, as Finetuner's EvaluationCallback named them
/// (`distance='cosine'`, the default, or `'euclidean'`, `'sqeuclidean'`). Cosine compares
/// directions; the other two the raw embeddings, so a longer embedding lies farther away.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Distance {
    #[default]
    Cosine,
    Euclidean,
    Sqeuclidean,
}

impl Distance {
    /// Name, help and value of each, for the command line.
    pub const CHOICES: [(&'static str, &'static str, Self); 3] = [
        (
            "cosine",
            "cosine similarity of the embeddings (Finetuner's default)",
            Self::Cosine,
        ),
        (
            "euclidean",
            "Euclidean distance of the raw embeddings",
            Self::Euclidean,
        ),
        (
            "sqeuclidean",
            "squared Euclidean distance of the raw embeddings",
            Self::Sqeuclidean,
        ),
    ];

    pub fn is_cosine(&self) -> bool {
        *self == Self::Cosine
    }
}

/// Embeddings with the labels that decide relevance.
#[derive(Debug, Clone, Default)]
pub struct LabeledEmbeddings {
    pub ids: Vec<String>,
    pub labels: Vec<String>,
    /// Row-major `[len, dim]`.
    pub embeddings: Vec<f32>,
    pub dim: usize,
}

impl LabeledEmbeddings {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    fn row(&self, i: usize) -> &[f32] {
        &self.embeddings[i * self.dim..(i + 1) * self.dim]
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("no {0} to evaluate")]
    Empty(&'static str),
    #[error("queries have {0}-d embeddings but the index {1}-d")]
    DimMismatch(usize, usize),
    #[error("query {id} has label {label:?}, which no index item has: its ground truth is empty")]
    NoRelevant { id: String, label: String },
    #[error("query {id}: {source}")]
    Metric { id: String, source: MetricError },
    #[error("{0}")]
    Shape(String),
}

/// One query's result.
#[derive(Debug, Clone)]
pub struct QueryResult {
    /// Index positions of the top matches, best first.
    pub matches: Vec<usize>,
    /// Each match's cosine similarity (higher is better) or, under another [`Distance`], its
    /// distance (lower is better).
    pub scores: Vec<f64>,
    pub metrics: Metrics,
}

/// The evaluation of a query set against an index.
#[derive(Debug, Clone)]
pub struct Evaluation {
    pub mean: Metrics,
    pub per_query: Vec<QueryResult>,
    pub limit: usize,
}

fn norms(e: &LabeledEmbeddings) -> Vec<f64> {
    (0..e.len())
        .map(|i| {
            e.row(i)
                .iter()
                .map(|v| (*v as f64) * (*v as f64))
                .sum::<f64>()
                .sqrt()
        })
        .collect()
}

fn unit_rows(e: &LabeledEmbeddings, n: &[f64]) -> Vec<f32> {
    let mut out = e.embeddings.clone();
    for (row, norm) in out.chunks_mut(e.dim).zip(n) {
        let inv = if *norm > 0.0 { 1.0 / *norm } else { 0.0 };
        row.iter_mut().for_each(|v| *v = (*v as f64 * inv) as f32);
    }
    out
}

/// Evaluates `queries` against `index`, keeping the best `limit` matches per query.
/// `exclude_self` drops index items whose id equals the query's (matching a set against itself);
/// as in docarray, they still count in `max_rel`.
pub fn evaluate(
    queries: &LabeledEmbeddings,
    index: &LabeledEmbeddings,
    limit: usize,
    exclude_self: bool,
) -> Result<Evaluation, EvalError> {
    evaluate_by(queries, index, limit, exclude_self, Distance::Cosine)
}

/// [`evaluate`], matches ordered by `distance`.
pub fn evaluate_by(
    queries: &LabeledEmbeddings,
    index: &LabeledEmbeddings,
    limit: usize,
    exclude_self: bool,
    distance: Distance,
) -> Result<Evaluation, EvalError> {
    let mut label_counts: HashMap<&str, usize> = HashMap::new();
    for l in &index.labels {
        *label_counts.entry(l.as_str()).or_default() += 1;
    }
    for (i, l) in queries.labels.iter().enumerate() {
        if !label_counts.contains_key(l.as_str()) {
            return Err(EvalError::NoRelevant {
                id: query_id(queries, i),
                label: l.clone(),
            });
        }
    }
    let limit = limit.max(1);
    let ranked = rank_by(queries, index, limit, exclude_self, distance)?;
    let per_query = ranked
        .into_iter()
        .enumerate()
        .map(|(qi, top)| {
            let label = queries.labels[qi].as_str();
            let r: Vec<bool> = top.iter().map(|(c, _)| index.labels[*c] == label).collect();
            let metrics = Metrics::compute(&r, label_counts[label], None).map_err(|source| {
                EvalError::Metric {
                    id: query_id(queries, qi),
                    source,
                }
            })?;
            Ok(QueryResult {
                matches: top.iter().map(|(c, _)| *c).collect(),
                scores: top.iter().map(|(_, s)| *s).collect(),
                metrics,
            })
        })
        .collect::<Result<Vec<_>, EvalError>>()?;
    let mean = Metrics::mean(&per_query.iter().map(|q| q.metrics).collect::<Vec<_>>());
    Ok(Evaluation {
        mean,
        per_query,
        limit,
    })
}

/// The best `limit` index positions for each query with their cosine similarity (docarray's
/// formula), best first. Labels are not used.
pub fn rank(
    queries: &LabeledEmbeddings,
    index: &LabeledEmbeddings,
    limit: usize,
    exclude_self: bool,
) -> Result<Vec<Vec<(usize, f64)>>, EvalError> {
    rank_by(queries, index, limit, exclude_self, Distance::Cosine)
}

/// [`rank`] by `distance`: for the Euclidean ones, the best `limit` by smallest distance, with
/// that distance (docarray's formulas, in f64).
pub fn rank_by(
    queries: &LabeledEmbeddings,
    index: &LabeledEmbeddings,
    limit: usize,
    exclude_self: bool,
    distance: Distance,
) -> Result<Vec<Vec<(usize, f64)>>, EvalError> {
    if queries.is_empty() {
        return Err(EvalError::Empty("queries"));
    }
    if index.is_empty() {
        return Err(EvalError::Empty("index items"));
    }
    if queries.dim != index.dim {
        return Err(EvalError::DimMismatch(queries.dim, index.dim));
    }
    for e in [queries, index] {
        if e.embeddings.len() != e.len() * e.dim {
            return Err(EvalError::Shape(format!(
                "{} embeddings of dim {} but {} values",
                e.len(),
                e.dim,
                e.embeddings.len()
            )));
        }
    }
    let limit = limit.max(1);
    let (qn, xn) = (norms(queries), norms(index));
    // Candidates come from one matrix product: of unit rows for cosine; of the raw rows for the
    // Euclidean distances, where `q.x - |x|^2 / 2` orders the index as `-|q - x|^2` does.
    use std::borrow::Cow;
    let (qu, xu): (Cow<[f32]>, Cow<[f32]>) = match distance {
        Distance::Cosine => (unit_rows(queries, &qn).into(), unit_rows(index, &xn).into()),
        _ => (
            queries.embeddings.as_slice().into(),
            index.embeddings.as_slice().into(),
        ),
    };
    let half_sq: Vec<f32> = match distance {
        Distance::Cosine => Vec::new(),
        _ => xn.iter().map(|n| (n * n / 2.0) as f32).collect(),
    };
    let (n, d) = (index.len(), index.dim);
    let prec = cpu::amx_precision();
    let packed = prec.map(|p| amx::PackedB::new(&xu, n, d, p == amx::Precision::Bf16x3));
    let keep = (limit + RERANK_MARGIN + usize::from(exclude_self)).min(n);
    let mut out = Vec::with_capacity(queries.len());
    for start in (0..queries.len()).step_by(QUERY_BLOCK) {
        let rows = QUERY_BLOCK.min(queries.len() - start);
        let block = &qu[start * d..(start + rows) * d];
        let scores = cpu::linear(
            block,
            rows,
            d,
            &xu,
            n,
            None,
            None,
            packed.as_ref().zip(prec),
        );
        let ranked: Vec<Vec<(usize, f64)>> = scores
            .par_chunks(n)
            .enumerate()
            .map(|(j, row)| {
                let qi = start + j;
                let q = queries.row(qi);
                let qid = queries.ids.get(qi);
                let candidates = match distance {
                    Distance::Cosine => top_candidates(row, keep),
                    _ => {
                        let adjusted: Vec<f32> =
                            row.iter().zip(&half_sq).map(|(s, h)| s - h).collect();
                        top_candidates(&adjusted, keep)
                    }
                };
                // Exact f64 scores for the candidates, then the final order.
                let mut exact: Vec<(usize, f64)> = candidates
                    .into_iter()
                    .filter(|c| !(exclude_self && qid.is_some() && index.ids.get(*c) == qid))
                    .map(|c| {
                        let x = index.row(c);
                        let score = match distance {
                            Distance::Cosine => {
                                let dot: f64 =
                                    q.iter().zip(x).map(|(a, b)| *a as f64 * *b as f64).sum();
                                docarray_cosine(dot, qn[qi] * xn[c])
                            }
                            Distance::Euclidean | Distance::Sqeuclidean => {
                                let sq: f64 = q
                                    .iter()
                                    .zip(x)
                                    .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
                                    .sum();
                                match distance {
                                    Distance::Euclidean => sq.sqrt(),
                                    _ => sq,
                                }
                            }
                        };
                        (c, score)
                    })
                    .collect();
                match distance {
                    Distance::Cosine => {
                        exact.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)))
                    }
                    _ => exact.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0))),
                }
                exact.truncate(limit);
                exact
            })
            .collect();
        out.extend(ranked);
    }
    Ok(out)
}

fn query_id(q: &LabeledEmbeddings, i: usize) -> String {
    q.ids.get(i).cloned().unwrap_or_else(|| format!("#{i}"))
}

/// docarray v1's cosine similarity, `1 - cosine distance` with its epsilon and clipping:
/// `clip((x.y + 1e-7) / (|x||y| + 1e-7), -1, 1)`. Ranking by it reproduces docarray's order.
fn docarray_cosine(dot: f64, norms: f64) -> f64 {
    ((dot + 1e-7) / (norms + 1e-7)).clamp(-1.0, 1.0)
}

/// Positions of the `keep` largest scores (any order).
fn top_candidates(row: &[f32], keep: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..row.len()).collect();
    if keep < row.len() {
        idx.select_nth_unstable_by(keep - 1, |a, b| row[*b].total_cmp(&row[*a]));
        idx.truncate(keep);
    }
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, dim: usize, labels: usize, seed: u64) -> LabeledEmbeddings {
        let mut s = seed;
        let mut next = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        };
        LabeledEmbeddings {
            ids: (0..n).map(|i| format!("d{i}")).collect(),
            labels: (0..n).map(|i| format!("l{}", i % labels)).collect(),
            embeddings: (0..n * dim).map(|_| next()).collect(),
            dim,
        }
    }

    /// Brute force in f64: every score, full sort.
    fn brute(q: &LabeledEmbeddings, x: &LabeledEmbeddings, limit: usize) -> Vec<Vec<usize>> {
        (0..q.len())
            .map(|i| {
                let qi = q.row(i);
                let qn: f64 = qi.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
                let mut s: Vec<(f64, usize)> = (0..x.len())
                    .map(|j| {
                        let xj = x.row(j);
                        let dot: f64 = qi.iter().zip(xj).map(|(a, b)| *a as f64 * *b as f64).sum();
                        let xn: f64 = xj.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
                        (dot / (qn * xn), j)
                    })
                    .collect();
                s.sort_by(|a, b| b.0.total_cmp(&a.0));
                s.into_iter().take(limit).map(|(_, j)| j).collect()
            })
            .collect()
    }

    /// The Euclidean distances rank as a brute-force f64 sort of every distance, and
    /// differently from cosine where the embeddings' lengths differ.
    #[test]
    fn euclidean_ranks_match_brute_force() {
        let q = data(60, 16, 5, 11);
        let mut x = data(200, 16, 5, 12);
        // Lengths from 0.5x to 2x: cosine ignores them, the distances do not.
        for (i, row) in x.embeddings.chunks_mut(16).enumerate() {
            let f = 0.5 + (i % 7) as f32 / 4.0;
            row.iter_mut().for_each(|v| *v *= f);
        }
        for distance in [Distance::Euclidean, Distance::Sqeuclidean] {
            let got = rank_by(&q, &x, 10, false, distance).unwrap();
            for (qi, top) in got.iter().enumerate() {
                let mut all: Vec<(f64, usize)> = (0..x.len())
                    .map(|j| {
                        let sq: f64 = q
                            .row(qi)
                            .iter()
                            .zip(x.row(j))
                            .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
                            .sum();
                        let d = if distance == Distance::Euclidean {
                            sq.sqrt()
                        } else {
                            sq
                        };
                        (d, j)
                    })
                    .collect();
                all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                let want: Vec<usize> = all.iter().take(10).map(|(_, j)| *j).collect();
                assert_eq!(top.iter().map(|(j, _)| *j).collect::<Vec<_>>(), want);
                assert!((top[0].1 - all[0].0).abs() < 1e-9);
            }
        }
        let cos = rank_by(&q, &x, 10, false, Distance::Cosine).unwrap();
        let euc = rank_by(&q, &x, 10, false, Distance::Euclidean).unwrap();
        assert_ne!(cos, euc);
    }

    #[test]
    fn matches_brute_force() {
        let q = data(300, 24, 7, 1);
        let x = data(500, 24, 7, 2);
        let ev = evaluate(&q, &x, 20, false).unwrap();
        let want = brute(&q, &x, 20);
        for (got, want) in ev.per_query.iter().zip(&want) {
            assert_eq!(&got.matches, want);
        }
        assert!(ev.mean.precision_at_k > 0.0 && ev.mean.precision_at_k < 1.0);
    }

    #[test]
    fn identical_embeddings_rank_first() {
        let x = data(50, 8, 5, 3);
        let mut q = x.clone();
        q.ids = (0..50).map(|i| format!("q{i}")).collect();
        let ev = evaluate(&q, &x, 5, false).unwrap();
        for (i, r) in ev.per_query.iter().enumerate() {
            assert_eq!(r.matches[0], i);
            assert!((r.scores[0] - 1.0).abs() < 1e-12);
        }
        assert_eq!(ev.mean.reciprocal_rank, 1.0);
    }

    #[test]
    fn limit_larger_than_index_and_errors() {
        let q = data(3, 4, 2, 4);
        let x = data(4, 4, 2, 5);
        let ev = evaluate(&q, &x, 20, false).unwrap();
        assert!(ev.per_query.iter().all(|r| r.matches.len() == 4));
        let mut bad = q.clone();
        bad.labels[1] = "unknown".into();
        assert!(matches!(
            evaluate(&bad, &x, 20, false),
            Err(EvalError::NoRelevant { .. })
        ));
        let mut wide = q.clone();
        wide.dim = 2;
        wide.embeddings.truncate(6);
        assert!(evaluate(&wide, &x, 20, false).is_err());
    }
}
