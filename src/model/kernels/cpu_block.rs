//! A CLIP encoder block as the fused CPU kernels of [`super::cpu`] run it for inference: pre-LN
//! attention and MLP in a handful of passes over f32 slices; the last block of a tower computes
//! only the rows the tower pools. The model's layers hand over their weights
//! as slices ([`BlockWeights`]); nothing here knows the layer types, so a kernel set for
//! another device takes the same description.

use candle_core::Result;

use super::amx;
use super::cpu::{self, Buf};
use super::seqs::Seqs;

/// A linear layer's weight `[n, k]`, bias `[n]` and, where the model multiplies on AMX, its
/// packed copy with the precision (the f32 weight may then be empty: released after packing).
pub struct LinearWeights<'a> {
    pub w: &'a [f32],
    pub b: Option<&'a [f32]>,
    pub n: usize,
    pub amx: Option<(&'a amx::PackedB, amx::Precision)>,
}

impl LinearWeights<'_> {
    /// `x[rows, k] W^T + b (+ residual)`.
    fn apply(&self, x: &[f32], k: usize, residual: Option<&[f32]>) -> Buf {
        let rows = x.len() / k.max(1);
        cpu::linear(x, rows, k, self.w, self.n, self.b, residual, self.amx)
    }
}

/// A layer norm's weight, bias and epsilon.
pub struct NormWeights<'a> {
    pub w: &'a [f32],
    pub b: &'a [f32],
    pub eps: f32,
}

/// One pre-LN block: `x + attn(ln1(x))`, then `x + mlp(ln2(x))`.
pub struct BlockWeights<'a> {
    pub ln1: NormWeights<'a>,
    pub q: LinearWeights<'a>,
    pub k: LinearWeights<'a>,
    pub v: LinearWeights<'a>,
    pub out: LinearWeights<'a>,
    pub ln2: NormWeights<'a>,
    pub fc1: LinearWeights<'a>,
    pub fc2: LinearWeights<'a>,
    /// The MLP's activation, in place ([`cpu::quick_gelu`] or [`cpu::gelu_erf`]).
    pub act: fn(&mut [f32]),
    pub heads: usize,
    /// Attention score scale, `head_dim^-0.5`.
    pub scale: f32,
}

/// Batch geometry: the sequences ([`Seqs`]: `b` items of `t` positions, or packed) of
/// `d`-wide rows; `causal` masks later positions.
#[derive(Debug, Clone, Copy)]
pub struct Geometry<'a> {
    pub seqs: Seqs<'a>,
    pub d: usize,
    pub causal: bool,
}

/// One block over `x` (`[rows, d]`, the rows `g.seqs` covers). With `pooled` ((item, position)
/// pairs), only those rows are computed past the keys and values, and returned
/// (`[pooled.len(), d]`).
pub fn block(
    x: Buf,
    g: Geometry,
    w: &BlockWeights,
    pooled: Option<&[(usize, usize)]>,
) -> Result<Buf> {
    let Geometry { seqs, d, causal } = g;
    let rows = seqs.rows().unwrap_or(usize::MAX);
    if x.len() != rows.saturating_mul(d) {
        candle_core::bail!(
            "encoder block: {} values are not {rows} rows of {d}",
            x.len()
        );
    }
    let ln = |n: &NormWeights, x: &[f32]| cpu::layer_norm(x, d, n.w, n.b, n.eps);
    let h = ln(&w.ln1, &x);
    let k = w.k.apply(&h, d, None);
    let v = w.v.apply(&h, d, None);
    let sh = cpu::AttnShape::new(seqs, d, w.heads, w.scale, causal, d)?;
    let (ctx, x) = match pooled {
        None => {
            let q = w.q.apply(&h, d, None);
            let mut ctx = Buf::new(rows * d);
            cpu::attention_into(&q, &k, &v, sh, &mut ctx, None);
            (ctx, x)
        }
        Some(picked) => {
            let idx = picked
                .iter()
                .map(|&(i, p)| seqs.row(i, p))
                .collect::<Result<Vec<usize>>>()?;
            let q = w.q.apply(&cpu::gather_rows(&h, d, &idx), d, None);
            // q holds only the pooled rows, one after the other.
            let q_at: Vec<usize> = (0..picked.len()).map(|i| i * d).collect();
            let mut ctx = Buf::new(picked.len() * d);
            cpu::attention_rows_into(&q, &q_at, &k, &v, sh, picked, &mut ctx, None);
            (ctx, cpu::gather_rows(&x, d, &idx))
        }
    };
    drop((h, k, v));
    let x = w.out.apply(&ctx, d, Some(&x));
    let h = ln(&w.ln2, &x);
    let mut m = w.fc1.apply(&h, d, None);
    (w.act)(&mut m);
    Ok(w.fc2.apply(&m, w.fc1.n, Some(&x)))
}
