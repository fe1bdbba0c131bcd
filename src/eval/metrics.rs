//! The nine retrieval metrics of docarray v1 (`docarray.math.evaluation`, v0.21), which Finetuner
//! reported; definitions and edge cases exactly as there, so numbers compare across tools.
//!
//! `r` is the binary relevance of the returned matches in rank order. `k = None` means the whole
//! list (Finetuner evaluated "@k" over all `limit` matches). `max_rel` is the number of relevant
//! documents in the index (the label's count), which may exceed the list length.

use serde::Serialize;

/// A metric that docarray would refuse to compute (it raises `ValueError`).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MetricError {
    #[error("`k` must be >=1 or `None`, {0} is given")]
    BadK(usize),
    #[error("Number of relevant Documents retrieved ({hits}) > {max_rel}")]
    TooManyHits { hits: usize, max_rel: usize },
}

fn check_k(k: Option<usize>) -> Result<(), MetricError> {
    match k {
        Some(0) => Err(MetricError::BadK(0)),
        _ => Ok(()),
    }
}

fn head(r: &[bool], k: Option<usize>) -> &[bool] {
    &r[..k.map_or(r.len(), |k| k.min(r.len()))]
}

/// Fraction of relevant matches in the top `min(k, n)` (divides by the list length when `k` is
/// larger, as docarray does); 0 for an empty list.
pub fn precision_at_k(r: &[bool], k: Option<usize>) -> Result<f64, MetricError> {
    check_k(k)?;
    let h = head(r, k);
    if h.is_empty() {
        return Ok(0.0);
    }
    Ok(h.iter().filter(|x| **x).count() as f64 / h.len() as f64)
}

/// 1 when any of the top `k` is relevant.
pub fn hit_at_k(r: &[bool], k: Option<usize>) -> Result<f64, MetricError> {
    check_k(k)?;
    Ok(if head(r, k).iter().any(|x| *x) {
        1.0
    } else {
        0.0
    })
}

/// Relevant matches in the top `k` over all relevant documents (NaN for `max_rel = 0` with no
/// hits, as numpy's 0/0).
pub fn recall_at_k(r: &[bool], max_rel: usize, k: Option<usize>) -> Result<f64, MetricError> {
    check_k(k)?;
    let hits = head(r, k).iter().filter(|x| **x).count();
    if hits > max_rel {
        return Err(MetricError::TooManyHits { hits, max_rel });
    }
    Ok(hits as f64 / max_rel as f64)
}

pub fn f1_score_at_k(r: &[bool], max_rel: usize, k: Option<usize>) -> Result<f64, MetricError> {
    let p = precision_at_k(r, k)?;
    let rc = recall_at_k(r, max_rel, k)?;
    Ok(if p + rc > 0.0 {
        2.0 * p * rc / (p + rc)
    } else {
        0.0
    })
}

/// Mean of precision@i over the ranks i of relevant matches (denominator: relevant *retrieved*).
pub fn average_precision(r: &[bool]) -> f64 {
    let mut hits = 0usize;
    let mut sum = 0.0;
    for (i, &rel) in r.iter().enumerate() {
        if rel {
            hits += 1;
            sum += hits as f64 / (i + 1) as f64;
        }
    }
    if hits == 0 {
        0.0
    } else {
        sum / hits as f64
    }
}

/// 1 / rank of the first relevant match; 0 when there is none.
pub fn reciprocal_rank(r: &[bool]) -> f64 {
    r.iter()
        .position(|x| *x)
        .map_or(0.0, |i| 1.0 / (i + 1) as f64)
}

/// With R relevant matches in the list, the precision of its first R entries.
pub fn r_precision(r: &[bool]) -> f64 {
    let big_r = r.iter().filter(|x| **x).count();
    if big_r == 0 {
        return 0.0;
    }
    r[..big_r].iter().filter(|x| **x).count() as f64 / big_r as f64
}

/// Discounted cumulative gain, docarray's method 0: `x1 + sum_{i>=2} x_i / log2(i)`.
pub fn dcg_at_k(r: &[bool], k: Option<usize>) -> Result<f64, MetricError> {
    check_k(k)?;
    Ok(dcg(head(r, k)))
}

fn dcg(r: &[bool]) -> f64 {
    r.iter()
        .enumerate()
        .filter(|(_, x)| **x)
        .map(|(i, _)| {
            if i == 0 {
                1.0
            } else {
                1.0 / ((i + 1) as f64).log2()
            }
        })
        .sum()
}

/// DCG over the DCG of the same list sorted relevant-first (the ideal is built from the
/// retrieved list, not from all relevant documents); 0 when nothing is relevant.
pub fn ndcg_at_k(r: &[bool], k: Option<usize>) -> Result<f64, MetricError> {
    check_k(k)?;
    let mut ideal = r.to_vec();
    ideal.sort_by(|a, b| b.cmp(a));
    let best = dcg(head(&ideal, k));
    if best == 0.0 {
        return Ok(0.0);
    }
    Ok(dcg(head(r, k)) / best)
}

/// The nine metrics for one query (or their means over queries).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct Metrics {
    pub average_precision: f64,
    pub dcg_at_k: f64,
    pub f1_score_at_k: f64,
    pub hit_at_k: f64,
    pub ndcg_at_k: f64,
    pub precision_at_k: f64,
    pub r_precision: f64,
    pub recall_at_k: f64,
    pub reciprocal_rank: f64,
}

impl Metrics {
    /// Names in the order Finetuner listed them.
    pub const NAMES: [&'static str; 9] = [
        "average_precision",
        "dcg_at_k",
        "f1_score_at_k",
        "hit_at_k",
        "ndcg_at_k",
        "precision_at_k",
        "r_precision",
        "recall_at_k",
        "reciprocal_rank",
    ];

    /// All nine for one ranked list, as `DocumentArray.evaluate` computes them.
    pub fn compute(r: &[bool], max_rel: usize, k: Option<usize>) -> Result<Self, MetricError> {
        Ok(Self {
            average_precision: average_precision(r),
            dcg_at_k: dcg_at_k(r, k)?,
            f1_score_at_k: f1_score_at_k(r, max_rel, k)?,
            hit_at_k: hit_at_k(r, k)?,
            ndcg_at_k: ndcg_at_k(r, k)?,
            precision_at_k: precision_at_k(r, k)?,
            r_precision: r_precision(r),
            recall_at_k: recall_at_k(r, max_rel, k)?,
            reciprocal_rank: reciprocal_rank(r),
        })
    }

    pub fn values(&self) -> [f64; 9] {
        [
            self.average_precision,
            self.dcg_at_k,
            self.f1_score_at_k,
            self.hit_at_k,
            self.ndcg_at_k,
            self.precision_at_k,
            self.r_precision,
            self.recall_at_k,
            self.reciprocal_rank,
        ]
    }

    /// (name, value) pairs, in [`Metrics::NAMES`] order.
    pub fn named(&self) -> Vec<(&'static str, f64)> {
        Self::NAMES.iter().copied().zip(self.values()).collect()
    }

    /// Mean over queries; the zero metrics when there are none.
    pub fn mean(all: &[Metrics]) -> Metrics {
        let n = all.len().max(1) as f64;
        let mut sum = [0f64; 9];
        for m in all {
            for (s, v) in sum.iter_mut().zip(m.values()) {
                *s += v;
            }
        }
        let v = sum.map(|s| s / n);
        Metrics {
            average_precision: v[0],
            dcg_at_k: v[1],
            f1_score_at_k: v[2],
            hit_at_k: v[3],
            ndcg_at_k: v[4],
            precision_at_k: v[5],
            r_precision: v[6],
            recall_at_k: v[7],
            reciprocal_rank: v[8],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(bits: &str) -> Vec<bool> {
        bits.chars().map(|c| c == '1').collect()
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn hand_worked_list() -> Result<(), MetricError> {
        // Relevant at ranks 1, 3 and 6 of 6; 4 relevant documents exist.
        let x = r("101001");
        assert!(close(precision_at_k(&x, None)?, 0.5));
        assert!(close(precision_at_k(&x, Some(2))?, 0.5));
        assert!(close(precision_at_k(&x, Some(100))?, 0.5));
        assert!(close(recall_at_k(&x, 4, None)?, 0.75));
        assert!(close(recall_at_k(&x, 4, Some(3))?, 0.5));
        assert!(close(f1_score_at_k(&x, 4, None)?, 2.0 * 0.5 * 0.75 / 1.25));
        assert!(close(
            average_precision(&x),
            (1.0 + 2.0 / 3.0 + 3.0 / 6.0) / 3.0
        ));
        assert!(close(reciprocal_rank(&x), 1.0));
        assert!(close(r_precision(&x), 2.0 / 3.0));
        let dcg = 1.0 + 1.0 / 3f64.log2() + 1.0 / 6f64.log2();
        assert!(close(dcg_at_k(&x, None)?, dcg));
        let ideal = 1.0 + 1.0 / 2f64.log2() + 1.0 / 3f64.log2();
        assert!(close(ndcg_at_k(&x, None)?, dcg / ideal));
        assert_eq!(hit_at_k(&x, Some(1))?, 1.0);
        Ok(())
    }

    #[test]
    fn nothing_relevant_and_empty() -> Result<(), MetricError> {
        let x = r("0000");
        let m = Metrics::compute(&x, 3, None)?;
        assert_eq!(m.values(), [0.0; 9]);
        assert_eq!(precision_at_k(&[], None)?, 0.0);
        assert_eq!(dcg_at_k(&[], None)?, 0.0);
        Ok(())
    }

    #[test]
    fn errors_as_docarray_raises_them() -> Result<(), MetricError> {
        assert_eq!(precision_at_k(&r("1"), Some(0)), Err(MetricError::BadK(0)));
        assert!(recall_at_k(&r("111"), 2, None).is_err());
        assert!(recall_at_k(&r("000"), 0, None)?.is_nan());
        assert_eq!(f1_score_at_k(&r("000"), 0, None)?, 0.0);
        Ok(())
    }

    #[test]
    fn late_first_hit() -> Result<(), MetricError> {
        let x = r("0001");
        assert!(close(reciprocal_rank(&x), 0.25));
        assert!(close(r_precision(&x), 0.0));
        assert!(close(ndcg_at_k(&x, None)?, 0.5));
        assert_eq!(hit_at_k(&x, Some(3))?, 0.0);
        Ok(())
    }
}
