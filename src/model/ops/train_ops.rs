//! Layer norm, quick_gelu, softmax, linear and attention as single CPU ops with their own
//! backward, for training.
//!
//! Composed from candle's basic ops, a layer norm is about ten tensor passes forward and twenty
//! backward, each allocating a full activation-sized buffer; quick_gelu is three and five. These
//! ops do each direction in one pass. Used in `Mode::Train` for f32 CPU tensors; other devices
//! and dtypes keep the composed, differentiable versions. Each op's arithmetic is a slice kernel
//! (`layer_norm_forward`, `linear_backward`, `attention_backward`, ...) that
//! [`super::train_block`] and [`super::train_embed`] call too, so a training step computes the
//! same values whichever of them runs it.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};

pub(crate) use crate::model::cpu::AttnShape;
use rayon::prelude::*;

/// The f32 data of a contiguous CPU tensor's storage, as custom ops receive it.
pub(crate) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{what}: f32 only")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{what}: contiguous input only"),
    }
}

const ROWS_PER_TASK: usize = 8;

/// `LayerNorm(x) * w + b` over the last dimension.
pub struct LayerNormOp {
    pub eps: f32,
}

fn row_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "clipft-layer-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, b) = (
            f32_slice(xs, xl, "layer norm")?,
            f32_slice(ws, wl, "layer norm")?,
            f32_slice(bs, bl, "layer norm")?,
        );
        Ok((
            CpuStorage::F32(layer_norm_forward(x, w, b, self.eps)),
            xl.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (x, w, g) = (x.contiguous()?, w.contiguous()?, grad.contiguous()?);
        let d = w.elem_count();
        let (dx, dw, db) = crate::model::cpu::with_slices(&[&x, &w, &g], |s| {
            let mut dx = vec![0f32; s[0].len()];
            let (dw, db) = layer_norm_backward(s[0], s[1], s[2], self.eps, &mut dx, false);
            Ok((dx, dw, db))
        })?;
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dw, d, dev)?),
            Some(Tensor::from_vec(db, d, dev)?),
        ))
    }
}

/// `LayerNorm(x) * w + b` over rows of `w.len()`.
pub(crate) fn layer_norm_forward(x: &[f32], w: &[f32], b: &[f32], eps: f32) -> Vec<f32> {
    let d = w.len();
    let mut y = vec![0f32; x.len()];
    y.par_chunks_mut(d * ROWS_PER_TASK)
        .zip(x.par_chunks(d * ROWS_PER_TASK))
        .for_each(|(y, x)| {
            for (y, x) in y.chunks_mut(d).zip(x.chunks(d)) {
                let (mean, rstd) = row_stats(x, eps);
                for i in 0..d {
                    y[i] = (x[i] - mean) * rstd * w[i] + b[i];
                }
            }
        });
    y
}

/// The backward pass of `LayerNorm(x) * w + b` over rows of `w.len()`: writes `dx` (adds to it
/// with `accumulate`, for a residual stream that already holds a gradient) and returns the
/// gradients of `w` and `b`.
pub(crate) fn layer_norm_backward(
    x: &[f32],
    w: &[f32],
    g: &[f32],
    eps: f32,
    dx: &mut [f32],
    accumulate: bool,
) -> (Vec<f32>, Vec<f32>) {
    let d = w.len();
    // Per task: dx rows, and partial sums of dw = sum(g * xhat), db = sum(g).
    let partials: Vec<(Vec<f32>, Vec<f32>)> = dx
        .par_chunks_mut(d * ROWS_PER_TASK)
        .zip(
            x.par_chunks(d * ROWS_PER_TASK)
                .zip(g.par_chunks(d * ROWS_PER_TASK)),
        )
        .map(|(dx, (x, g))| {
            let (mut dw, mut db) = (vec![0f32; d], vec![0f32; d]);
            for ((dx, x), g) in dx.chunks_mut(d).zip(x.chunks(d)).zip(g.chunks(d)) {
                let (mean, rstd) = row_stats(x, eps);
                let (mut sum_gw, mut sum_gw_xhat) = (0f32, 0f32);
                for i in 0..d {
                    let xhat = (x[i] - mean) * rstd;
                    let gw = g[i] * w[i];
                    sum_gw += gw;
                    sum_gw_xhat += gw * xhat;
                    dw[i] += g[i] * xhat;
                    db[i] += g[i];
                }
                let (m1, m2) = (sum_gw / d as f32, sum_gw_xhat / d as f32);
                for i in 0..d {
                    let xhat = (x[i] - mean) * rstd;
                    let v = rstd * (g[i] * w[i] - m1 - xhat * m2);
                    dx[i] = if accumulate { dx[i] + v } else { v };
                }
            }
            (dw, db)
        })
        .collect();
    let (mut dw, mut db) = (vec![0f32; d], vec![0f32; d]);
    for (pw, pb) in partials {
        for i in 0..d {
            dw[i] += pw[i];
            db[i] += pb[i];
        }
    }
    (dw, db)
}

/// `x * sigmoid(1.702 x)`.
pub struct QuickGeluOp;

fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
}

impl CustomOp1 for QuickGeluOp {
    fn name(&self) -> &'static str {
        "clipft-quick-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "quick_gelu")?;
        Ok((CpuStorage::F32(quick_gelu_forward(x)), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (x, g) = (arg.contiguous()?, grad.contiguous()?);
        let dx =
            crate::model::cpu::with_slices(&[&x, &g], |s| Ok(quick_gelu_backward(s[0], s[1])))?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// `x * sigmoid(1.702 x)`.
pub(crate) fn quick_gelu_forward(x: &[f32]) -> Vec<f32> {
    let mut y = vec![0f32; x.len()];
    y.par_chunks_mut(1 << 14)
        .zip(x.par_chunks(1 << 14))
        .for_each(|(y, x)| {
            for (y, x) in y.iter_mut().zip(x) {
                *y = x * sigmoid(1.702 * x);
            }
        });
    y
}

/// `g * d/dx [x sigmoid(1.702 x)]`.
pub(crate) fn quick_gelu_backward(x: &[f32], g: &[f32]) -> Vec<f32> {
    let mut dx = vec![0f32; x.len()];
    dx.par_chunks_mut(1 << 14)
        .zip(x.par_chunks(1 << 14).zip(g.par_chunks(1 << 14)))
        .for_each(|(dx, (x, g))| {
            for ((d, x), g) in dx.iter_mut().zip(x).zip(g) {
                let s = sigmoid(1.702 * x);
                *d = g * (s + 1.702 * x * s * (1.0 - s));
            }
        });
    dx
}

/// Softmax over the last dimension (attention probabilities).
pub struct SoftmaxOp;

impl CustomOp1 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "clipft-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "softmax")?;
        let d = l.dims().last().copied().unwrap_or(1).max(1);
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(d * 64)
            .zip(x.par_chunks(d * 64))
            .for_each(|(y, x)| {
                for (y, x) in y.chunks_mut(d).zip(x.chunks(d)) {
                    y.copy_from_slice(x);
                    crate::model::cpu::softmax_in_place(y);
                }
            });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (y, g) = (res.contiguous()?, grad.contiguous()?);
        let d = y.dims().last().copied().unwrap_or(1).max(1);
        let dx = crate::model::cpu::with_slice(&y, |y| {
            crate::model::cpu::with_slice(&g, |g| {
                let mut dx = vec![0f32; y.len()];
                dx.par_chunks_mut(d * 64)
                    .zip(y.par_chunks(d * 64).zip(g.par_chunks(d * 64)))
                    .for_each(|(dx, (y, g))| {
                        for ((dx, y), g) in dx.chunks_mut(d).zip(y.chunks(d)).zip(g.chunks(d)) {
                            let dot: f32 = y.iter().zip(g).map(|(a, b)| a * b).sum();
                            for i in 0..d {
                                dx[i] = y[i] * (g[i] - dot);
                            }
                        }
                    });
                Ok(dx)
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, y.shape(), y.device())?))
    }
}

/// Multi-head scaled dot-product attention on `[batch, seq, heads * head_dim]` queries, keys and
/// values (the projections' own layout, so no head transposes are materialised), with causal
/// masking for the text tower. The forward pass keeps the probabilities for the backward pass
/// (recomputing them there cost a product and a softmax per (item, head)).
pub struct AttentionOp {
    pub heads: usize,
    pub scale: f32,
    pub causal: bool,
    /// q, k and v are `[rows, d]` holding these sequences end to end (else `[batch, seq, d]`).
    pub packed: Option<std::sync::Arc<super::packed::PackedSeqs>>,
    /// The forward pass's probabilities, taken by the backward pass.
    pub saved: std::sync::Mutex<Option<Vec<f32>>>,
}

impl AttentionOp {
    pub fn new(
        heads: usize,
        scale: f32,
        causal: bool,
        packed: Option<std::sync::Arc<super::packed::PackedSeqs>>,
    ) -> Self {
        Self {
            heads,
            scale,
            causal,
            packed,
            saved: std::sync::Mutex::new(None),
        }
    }
}

struct SendPtr(*mut f32);
// SAFETY: hands disjoint (item, head) blocks of one buffer to rayon tasks.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// `dst[m, n] = beta * lhs[m, k] @ rhs[k, n]` with explicit (row, column) strides.
///
/// # Safety
/// Every pointer must address the whole matrix its strides describe.
#[allow(clippy::too_many_arguments)]
unsafe fn mm(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    lhs: *const f32,
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: *const f32,
    rhs_rs: usize,
    rhs_cs: usize,
    beta: f32,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        false,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        0.0,
        beta,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

/// The backward pass of [`cpu::attention_into`](crate::model::cpu::attention_into): from the saved
/// probabilities and the context's gradient `dout` (`[batch * seq, d]`), writes dQ, dK and dV
/// into `dqkv`, one `[batch * seq, 3 d]` buffer (columns `0..d`, `d..2d`, `2d..3d`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: AttnShape,
    probs: &[f32],
    dout: &[f32],
    dqkv: &mut [f32],
) {
    let (t, hd, ld) = (s.seqs.max_len(), s.head_dim, s.ld);
    let (rows, d) = s.check_inputs(q, k, v);
    assert!(dqkv.len() >= rows * 3 * d && dout.len() >= rows * d);
    assert!(probs.len() >= s.probs_len());
    let gptr = SendPtr(dqkv.as_mut_ptr());
    (0..s.seqs.items() * s.heads).into_par_iter().for_each_init(
        || vec![0f32; t * t],
        |dp, bh| {
            let (item, h) = (bh / s.heads, bh % s.heads);
            let (start, n) = (s.seqs.start(item), s.seqs.len(item));
            let (base, gbase) = (start * ld + h * hd, start * d + h * hd);
            let dbase = start * 3 * d + h * hd;
            let p = &probs[bh * t * t..(bh + 1) * t * t];
            let g = &gptr;
            // SAFETY: reads as in the forward pass (rows start .. start + n, checked by
            // `check_inputs`); each task writes only its own (item, head) block of the three
            // gradient column ranges (rows * 3 d values, asserted).
            unsafe {
                let (qp, kp, vp, gp) = (
                    q.as_ptr().add(base),
                    k.as_ptr().add(base),
                    v.as_ptr().add(base),
                    dout.as_ptr().add(gbase),
                );
                let (dq, dk, dv) = (g.0.add(dbase), g.0.add(dbase + d), g.0.add(dbase + 2 * d));
                // dV = P^T dO
                mm(n, hd, n, dv, 3 * d, p.as_ptr(), 1, t, gp, d, 1, 1.0);
                // dP = dO V^T
                mm(n, n, hd, dp.as_mut_ptr(), t, gp, d, 1, vp, 1, ld, 1.0);
                // dS = P * (dP - rowsum(dP * P))
                for (pr, dr) in p.chunks(t).zip(dp.chunks_mut(t)).take(n) {
                    let (pr, dr) = (&pr[..n], &mut dr[..n]);
                    let dot: f32 = pr.iter().zip(dr.iter()).map(|(a, b)| a * b).sum();
                    for (x, y) in dr.iter_mut().zip(pr) {
                        *x = y * (*x - dot);
                    }
                }
                // dQ = scale dS K;  dK = scale dS^T Q
                mm(n, hd, n, dq, 3 * d, dp.as_ptr(), t, 1, kp, ld, 1, s.scale);
                mm(n, hd, n, dk, 3 * d, dp.as_ptr(), 1, t, qp, ld, 1, s.scale);
            }
        },
    );
}

/// The backward pass of [`cpu::attention_rows_into`](crate::model::cpu::attention_rows_into): adds dQ
/// (at the query rows), dK and dV into `dqkv` (`[batch * seq, 3 d]`, as [`attention_backward`]).
/// One task per item, so rows of one item never race.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_rows_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: AttnShape,
    rows: &[(usize, usize)],
    probs: &[f32],
    dout: &[f32],
    dqkv: &mut [f32],
) {
    let (t, hd, ld) = (s.seqs.max_len(), s.head_dim, s.ld);
    let (rows_total, d) = s.check_inputs(q, k, v);
    assert!(dqkv.len() >= rows_total * 3 * d);
    assert!(
        rows.iter()
            .all(|&(item, pos)| item < s.seqs.items() && pos < s.seqs.len(item)),
        "attention backward: a selected row is outside the batch"
    );
    let mut by_item: Vec<Vec<usize>> = vec![Vec::new(); s.seqs.items()];
    for (i, &(item, _)) in rows.iter().enumerate() {
        by_item[item].push(i);
    }
    // Each item's rows of the gradient, apart, so the items run in parallel.
    let mut grads: Vec<&mut [f32]> = Vec::with_capacity(by_item.len());
    let mut rest = &mut dqkv[..rows_total * 3 * d];
    for item in 0..by_item.len() {
        let (mine, later) = rest.split_at_mut(s.seqs.len(item) * 3 * d);
        grads.push(mine);
        rest = later;
    }
    grads
        .into_par_iter()
        .zip(by_item.par_iter())
        .enumerate()
        .for_each(|(item, (g, mine))| {
            let start = s.seqs.start(item);
            let mut ds = vec![0f32; t];
            for &i in mine {
                let pos = rows[i].1;
                let valid = s.valid(item, pos);
                let qr = &q[(start + pos) * ld..];
                for h in 0..s.heads {
                    let p = &probs[(i * s.heads + h) * t..][..valid];
                    let go = &dout[i * d + h * hd..][..hd];
                    let col = h * hd;
                    // dV_j += p_j dO;  dP_j = dO . V_j
                    for j in 0..valid {
                        let dv = &mut g[j * 3 * d + 2 * d + col..][..hd];
                        for (x, y) in dv.iter_mut().zip(go) {
                            *x += p[j] * y;
                        }
                        ds[j] = crate::model::cpu::dot(go, &v[(start + j) * ld + col..][..hd]);
                    }
                    // dS = P * (dP - P . dP)
                    let dot: f32 = p.iter().zip(&ds[..valid]).map(|(a, b)| a * b).sum();
                    for j in 0..valid {
                        ds[j] = p[j] * (ds[j] - dot) * s.scale;
                    }
                    // dQ += dS K;  dK_j += dS_j Q
                    let qh = &qr[col..col + hd];
                    for j in 0..valid {
                        let kr = &k[(start + j) * ld + col..][..hd];
                        let dq = &mut g[pos * 3 * d + col..][..hd];
                        for (x, y) in dq.iter_mut().zip(kr) {
                            *x += ds[j] * y;
                        }
                        let dk = &mut g[j * 3 * d + d + col..][..hd];
                        for (x, y) in dk.iter_mut().zip(qh) {
                            *x += ds[j] * y;
                        }
                    }
                }
            }
        });
}

impl AttentionOp {
    fn shape(&self, l: &Layout) -> Result<AttnShape<'_>> {
        let (seqs, d) = match &self.packed {
            Some(p) => {
                let (rows, d) = l.shape().dims2()?;
                if rows != p.rows() {
                    candle_core::bail!("attention: {rows} rows for a packed batch of {}", p.rows());
                }
                (p.seqs(), d)
            }
            None => {
                let (batch, seq, d) = l.shape().dims3()?;
                (crate::model::cpu::Seqs::Uniform { batch, seq }, d)
            }
        };
        AttnShape::new(seqs, d, self.heads, self.scale, self.causal, d)
    }
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "clipft-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let sh = self.shape(ql)?;
        if kl.shape() != ql.shape() || vl.shape() != ql.shape() {
            candle_core::bail!("attention: q, k and v must have one shape");
        }
        let (q, k, v) = (
            f32_slice(qs, ql, "attention")?,
            f32_slice(ks, kl, "attention")?,
            f32_slice(vs, vl, "attention")?,
        );
        let mut out = vec![0f32; q.len()];
        let mut probs = vec![0f32; sh.probs_len()];
        crate::model::cpu::attention_into(q, k, v, sh, &mut out, Some(&mut probs));
        *self.saved.lock().unwrap_or_else(|p| p.into_inner()) = Some(probs);
        Ok((CpuStorage::F32(out), ql.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (q, k, v, g) = (
            q.contiguous()?,
            k.contiguous()?,
            v.contiguous()?,
            grad.contiguous()?,
        );
        let sh = self.shape(q.layout())?;
        let saved = self.saved.lock().unwrap_or_else(|p| p.into_inner()).take();
        let n = q.elem_count();
        let d = sh.d();
        let mut dqkv = vec![0f32; 3 * n];
        crate::model::cpu::with_slices(&[&q, &k, &v, &g], |s| {
            let probs = match saved {
                Some(p) => p,
                None => {
                    // Taken by an earlier backward through the same graph: recompute.
                    let mut out = vec![0f32; n];
                    let mut p = vec![0f32; sh.probs_len()];
                    crate::model::cpu::attention_into(s[0], s[1], s[2], sh, &mut out, Some(&mut p));
                    p
                }
            };
            attention_backward(s[0], s[1], s[2], sh, &probs, s[3], &mut dqkv);
            Ok(())
        })?;
        let split = |c: usize| -> Result<Tensor> {
            let mut out = Vec::with_capacity(n);
            for row in dqkv.chunks(3 * d) {
                out.extend_from_slice(&row[c * d..(c + 1) * d]);
            }
            Tensor::from_vec(out, q.shape(), q.device())
        };
        Ok((Some(split(0)?), Some(split(1)?), Some(split(2)?)))
    }
}

/// `y = x W^T + b` for `x` `[rows, in]`, `W` `[out, in]` (bias optional): forward through the
/// fused CPU linear, backward as two strided GEMMs and a column sum, without the transposed
/// copies candle's matmul backward makes. `amx`: the model's AMX precision for its products
/// (see [`crate::model::policy::Kernels`]).
pub struct LinearOp {
    pub amx: Option<crate::model::amx::Precision>,
}

/// `dst[m, n] = lhs[m, k] @ rhs[k, n]` with explicit strides, multi-threaded.
fn gemm_par(
    m: usize,
    n: usize,
    k: usize,
    lhs: (&[f32], usize, usize),
    rhs: (&[f32], usize, usize),
) -> Vec<f32> {
    if k == 0 {
        return vec![0f32; m * n];
    }
    // Not zeroed first: with `read_dst` false the GEMM writes every element without reading
    // any (zeroing a gradient-sized buffer per product was a measurable share of a step).
    let mut dst: Vec<f32> = Vec::with_capacity(m * n);
    let par = crate::model::cpu::parallelism_for(m * n * k);
    // SAFETY: the strides describe `lhs` and `rhs` exactly (callers pass their own shapes) and
    // `dst` has room for `m x n` row-major elements.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            lhs.0.as_ptr(),
            lhs.2 as isize,
            lhs.1 as isize,
            rhs.0.as_ptr(),
            rhs.2 as isize,
            rhs.1 as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            par,
        );
        // SAFETY: the GEMM above wrote all m * n elements.
        dst.set_len(m * n);
    }
    dst
}

thread_local! {
    /// Set on this thread while [`with_direct_weight_grads`] runs: the fused ops' weight and bias
    /// gradients, collected here instead of passing through candle.
    static DIRECT_GRADS: std::cell::RefCell<Option<Vec<(Tensor, Tensor)>>> =
        const { std::cell::RefCell::new(None) };
}

/// Runs a training step's forward and backward passes (`f`, which returns its backward pass's
/// store) so that the fused ops hand the gradients of their weights (when these are variables)
/// straight to the result instead of to candle's gradient store, which zero-fills a buffer and
/// adds into it for each one: for ViT-B/32's weights that is about half a gigabyte of memory
/// traffic per step. Inside it, the encoder blocks also run as single ops
/// ([`super::train_block`]), whose weight gradients can only arrive this way. The result is the
/// same store, the same values.
pub fn with_direct_weight_grads<T, E: From<candle_core::Error>>(
    f: impl FnOnce() -> std::result::Result<(T, candle_core::backprop::GradStore), E>,
) -> std::result::Result<(T, candle_core::backprop::GradStore), E> {
    let outer = DIRECT_GRADS.with(|d| d.borrow_mut().replace(Vec::new()));
    let out = f();
    let direct = DIRECT_GRADS
        .with(|d| std::mem::replace(&mut *d.borrow_mut(), outer))
        .unwrap_or_default();
    let (value, mut grads) = out?;
    for (t, g) in direct {
        let g = match grads.remove(&t) {
            Some(prev) => (prev + g)?,
            None => g,
        };
        grads.insert(&t, g);
    }
    Ok((value, grads))
}

/// Whether this thread is inside [`with_direct_weight_grads`].
pub(crate) fn direct_grads_active() -> bool {
    DIRECT_GRADS.with(|d| d.borrow().is_some())
}

/// Hands the gradient `g` of the variable `t` to the running [`with_direct_weight_grads`].
pub(crate) fn push_direct_grad(t: &Tensor, g: Tensor) -> Result<()> {
    DIRECT_GRADS.with(|d| match d.borrow_mut().as_mut() {
        Some(direct) => {
            direct.push((t.clone(), g));
            Ok(())
        }
        None => candle_core::bail!(
            "a fused training block's backward pass ran outside with_direct_weight_grads"
        ),
    })
}

/// `g`, unless a [`with_direct_weight_grads`] pass takes it for the variable `t`.
pub(crate) fn divert_grad(t: &Tensor, g: Tensor) -> Option<Tensor> {
    if !t.is_variable() {
        return Some(g);
    }
    DIRECT_GRADS.with(|d| match d.borrow_mut().as_mut() {
        Some(direct) => {
            direct.push((t.clone(), g));
            None
        }
        None => Some(g),
    })
}

/// The AMX kernel a training product of `m` rows, `n` outputs and inner size `k` runs on, if
/// any: the model's `amx` (from `--matmul-precision`, as for inference) (by default bf16x3, PyTorch's "high"
/// float32 matmul precision; `highest` keeps plain f32). Weights change every step, so each
/// call packs its operands: only products with every side at least 128 (32 rows) take AMX.
/// Measured: every ViT-B/32 product gains; on the tiny fixture CLIP, sides from 64 up, or its
/// patch embedding alone (1600 x 3072 x 64), were slower than f32.
fn train_amx(
    m: usize,
    n: usize,
    k: usize,
    amx: Option<crate::model::amx::Precision>,
) -> Option<crate::model::amx::Precision> {
    const MIN_SIDE: usize = 128;
    if m < 32 || n < MIN_SIDE || k < MIN_SIDE {
        return None;
    }
    amx
}

/// `t[n, m]` = `s[m, n]` transposed: each task fills 32 rows of `t`, reading a 32-wide column
/// band of `s` row by row, so it writes 32 cache lines at a time.
fn transpose(s: &[f32], m: usize, n: usize) -> Vec<f32> {
    const B: usize = 32;
    let mut t = vec![0f32; m * n];
    t.par_chunks_mut(B * m).enumerate().for_each(|(bj, rows)| {
        let j0 = bj * B;
        let jn = rows.len() / m;
        for i in 0..m {
            for (dj, v) in s[i * n + j0..i * n + j0 + jn].iter().enumerate() {
                rows[dj * m + i] = *v;
            }
        }
    });
    t
}

/// `c[m, n] = a[m, k] b^T` on AMX, `b` packed.
fn amx_product(
    a: &[f32],
    m: usize,
    b: &crate::model::amx::PackedB,
    prec: crate::model::amx::Precision,
) -> Vec<f32> {
    let mut c = vec![0f32; m * b.n];
    crate::model::amx::matmul(a, m, b, &mut c, prec, false);
    c
}

/// `y[rows, n] = x[rows, k] W^T (+ b) (+ residual)`, on AMX where [`train_amx`] says so.
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_forward(
    x: &[f32],
    rows: usize,
    k: usize,
    w: &[f32],
    n: usize,
    b: Option<&[f32]>,
    residual: Option<&[f32]>,
    amx: Option<crate::model::amx::Precision>,
) -> Vec<f32> {
    let prec = train_amx(rows, n, k, amx);
    let packed = prec.map(|p| {
        crate::model::amx::PackedB::new(w, n, k, p == crate::model::amx::Precision::Bf16x3)
    });
    let amx = packed.as_ref().zip(prec);
    crate::model::cpu::linear(x, rows, k, w, n, b, residual, amx).into_vec()
}

/// Which gradients a [`linear_backward`] computes: a frozen weight's product is skipped, and so
/// is the input's where nothing below it trains.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Wants {
    pub dx: bool,
    pub dw: bool,
    pub db: bool,
}

/// The gradients of [`linear_forward`] from `g` (`[m, n]`), each where `want` asks for it:
/// `dx = g W`, `dW = g^T x`, `db` = column sums of `g`.
#[allow(clippy::type_complexity, clippy::too_many_arguments)]
pub(crate) fn linear_backward(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    n: usize,
    g: &[f32],
    want: Wants,
    amx: Option<crate::model::amx::Precision>,
) -> (Option<Vec<f32>>, Option<Vec<f32>>, Option<Vec<f32>>) {
    let (dx, dw) = match train_amx(m, n, k, amx) {
        Some(p) => {
            use crate::model::amx::{PackedB, Precision};
            let lo = p == Precision::Bf16x3;
            // dx = g (W^T)^T;  dW = (g^T) (x^T)^T.
            let dx = want
                .dx
                .then(|| amx_product(g, m, &PackedB::from_transposed(w, n, k, lo), p));
            let dw = want.dw.then(|| {
                let gt = transpose(g, m, n);
                amx_product(&gt, n, &PackedB::from_transposed(x, m, k, lo), p)
            });
            (dx, dw)
        }
        None => (
            want.dx.then(|| gemm_par(m, k, n, (g, n, 1), (w, k, 1))),
            want.dw.then(|| gemm_par(n, k, m, (g, 1, n), (x, k, 1))),
        ),
    };
    let db = want.db.then(|| column_sums(g, n));
    (dx, dw, db)
}

/// Sums of the columns of a row-major `[_, n]` matrix.
fn column_sums(g: &[f32], n: usize) -> Vec<f32> {
    let mut db = vec![0f32; n];
    for row in g.chunks(n) {
        for (d, v) in db.iter_mut().zip(row) {
            *d += v;
        }
    }
    db
}

impl LinearOp {
    fn forward(
        &self,
        x: &[f32],
        xl: &Layout,
        w: &[f32],
        wl: &Layout,
        b: Option<&[f32]>,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, k) = xl.shape().dims2()?;
        let (n, k2) = wl.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("linear: input has {k} features, weight expects {k2}");
        }
        let y = linear_forward(x, rows, k, w, n, b, None, self.amx);
        Ok((CpuStorage::F32(y), Shape::from((rows, n))))
    }

    /// `dx` is None when `x` needs no gradient (the patch embedding's pixels): its product is
    /// the largest one of a small model's step. `dw` (`db`) is None for a frozen weight (bias),
    /// which candle would drop anyway: a frozen layer that a gradient crosses costs one product.
    fn backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let want = Wants {
            dx: x.track_op(),
            dw: w.track_op(),
            db: b.is_some_and(|b| b.track_op()),
        };
        let (x, w, g) = (x.contiguous()?, w.contiguous()?, g.contiguous()?);
        let (m, k) = x.dims2()?;
        let n = w.dim(0)?;
        let dev = x.device().clone();
        let (dx, dw, db) = crate::model::cpu::with_slices(&[&x, &w, &g], |s| {
            Ok(linear_backward(s[0], m, k, s[1], n, s[2], want, self.amx))
        })?;
        Ok((
            dx.map(|dx| Tensor::from_vec(dx, (m, k), &dev))
                .transpose()?,
            dw.map(|dw| Tensor::from_vec(dw, (n, k), &dev))
                .transpose()?,
            db.map(|d| Tensor::from_vec(d, n, &dev)).transpose()?,
        ))
    }
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "clipft-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.forward(
            f32_slice(xs, xl, "linear")?,
            xl,
            f32_slice(ws, wl, "linear")?,
            wl,
            Some(f32_slice(bs, bl, "linear")?),
        )
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = self.backward(x, w, Some(b), g)?;
        Ok((
            dx,
            dw.and_then(|dw| divert_grad(w, dw)),
            db.and_then(|db| divert_grad(b, db)),
        ))
    }
}

impl candle_core::CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "clipft-linear-nobias"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.forward(
            f32_slice(xs, xl, "linear")?,
            xl,
            f32_slice(ws, wl, "linear")?,
            wl,
            None,
        )
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = self.backward(x, w, None, g)?;
        Ok((dx, dw.and_then(|dw| divert_grad(w, dw))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Packed sequences (end to end, of lengths 5, 1, 9 and 3) give each sequence what it gets
    /// alone, through every attention kernel the CPU runs: all queries and selected ones,
    /// forward (context and probabilities) and backward; a query never sees another sequence.
    #[test]
    fn packed_attention_is_each_sequence_alone() -> R {
        use crate::model::cpu::{attention_into, attention_rows_into, Seqs};
        use crate::model::kernels::seqs::Packing;
        let lens = [5usize, 1, 9, 3];
        let (heads, d) = (2, 8);
        let ld = 3 * d;
        let packing = Packing::from_lens(&lens)?;
        let rows: usize = lens.iter().sum();
        let wave = |n: usize, s: f32| -> Vec<f32> {
            (0..n).map(|i| (i as f32 * 0.61 + s).sin()).collect()
        };
        let (qkv, dout) = (wave(rows * ld, 0.3), wave(rows * d, 1.7));
        let close = |a: &[f32], b: &[f32], what: &str| {
            let e = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(a.len() == b.len() && e < 1e-5, "{what}: {e}");
        };
        for causal in [true, false] {
            let shape = |seqs| AttnShape::new(seqs, d, heads, 0.5, causal, ld);
            let sh = shape(Seqs::Packed(&packing))?;
            let (q, k, v) = (&qkv[..], &qkv[d..], &qkv[2 * d..]);
            let mut out = vec![0f32; rows * d];
            let mut probs = vec![0f32; sh.probs_len()];
            attention_into(q, k, v, sh, &mut out, Some(&mut probs));
            let mut dqkv = vec![0f32; rows * ld];
            attention_backward(q, k, v, sh, &probs, &dout, &mut dqkv);
            // The last row of each sequence, and the first of the longest.
            let mut picked: Vec<(usize, usize)> =
                lens.iter().enumerate().map(|(i, &n)| (i, n - 1)).collect();
            picked.push((2, 0));
            let starts = packing.offsets();
            let q_at: Vec<usize> = picked.iter().map(|&(i, p)| (starts[i] + p) * ld).collect();
            let mut picked_out = vec![0f32; picked.len() * d];
            let mut picked_probs = vec![0f32; picked.len() * heads * sh.seqs.max_len()];
            attention_rows_into(
                q,
                &q_at,
                k,
                v,
                sh,
                &picked,
                &mut picked_out,
                Some(&mut picked_probs),
            );
            let picked_dout = wave(picked.len() * d, 2.9);
            let mut picked_grad = vec![0f32; rows * ld];
            attention_rows_backward(
                q,
                k,
                v,
                sh,
                &picked,
                &picked_probs,
                &picked_dout,
                &mut picked_grad,
            );
            for (i, &n) in lens.iter().enumerate() {
                let (r0, r1) = (starts[i], starts[i + 1]);
                let one = shape(Seqs::Uniform { batch: 1, seq: n })?;
                let x = &qkv[r0 * ld..r1 * ld];
                let (q1, k1, v1) = (x, &x[d..], &x[2 * d..]);
                let mut o1 = vec![0f32; n * d];
                let mut p1 = vec![0f32; one.probs_len()];
                attention_into(q1, k1, v1, one, &mut o1, Some(&mut p1));
                close(
                    &out[r0 * d..r1 * d],
                    &o1,
                    &format!("context of {i} (causal {causal})"),
                );
                let mut g1 = vec![0f32; n * ld];
                attention_backward(q1, k1, v1, one, &p1, &dout[r0 * d..r1 * d], &mut g1);
                close(
                    &dqkv[r0 * ld..r1 * ld],
                    &g1,
                    &format!("d qkv of {i} (causal {causal})"),
                );
                // The selected rows of this sequence, alone.
                let mine: Vec<usize> = (0..picked.len()).filter(|&j| picked[j].0 == i).collect();
                let rows1: Vec<(usize, usize)> = mine.iter().map(|&j| (0, picked[j].1)).collect();
                let at1: Vec<usize> = rows1.iter().map(|&(_, p)| p * ld).collect();
                let mut o1 = vec![0f32; mine.len() * d];
                let mut p1 = vec![0f32; mine.len() * heads * n];
                attention_rows_into(q1, &at1, k1, v1, one, &rows1, &mut o1, Some(&mut p1));
                let want: Vec<f32> = mine
                    .iter()
                    .flat_map(|&j| picked_out[j * d..][..d].to_vec())
                    .collect();
                close(
                    &want,
                    &o1,
                    &format!("selected rows of {i} (causal {causal})"),
                );
                let g_in: Vec<f32> = mine
                    .iter()
                    .flat_map(|&j| picked_dout[j * d..][..d].to_vec())
                    .collect();
                let mut g1 = vec![0f32; n * ld];
                attention_rows_backward(q1, k1, v1, one, &rows1, &p1, &g_in, &mut g1);
                close(
                    &picked_grad[r0 * ld..r1 * ld],
                    &g1,
                    &format!("selected d qkv of {i} (causal {causal})"),
                );
            }
        }
        Ok(())
    }

    /// The linear op on plain f32 products.
    const LINEAR: LinearOp = LinearOp { amx: None };
    use candle_core::{Device, Var, D};

    type R = Result<()>;

    /// Largest absolute difference between two tensors.
    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    /// `sum(y * probe)` differentiated, for comparing gradients of two implementations.
    fn grads(y: &Tensor, probe: &Tensor) -> Result<candle_core::backprop::GradStore> {
        (y * probe)?.sum_all()?.backward()
    }

    fn grad<'a>(g: &'a candle_core::backprop::GradStore, v: &Var) -> &'a Tensor {
        g.get(v.as_tensor()).expect("a gradient for every input")
    }

    fn var(t: Tensor) -> Result<Var> {
        Var::from_tensor(&t)
    }

    fn composed_ln(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let c = x.broadcast_sub(&mean)?;
        let var = c.sqr()?.mean_keepdim(D::Minus1)?;
        c.broadcast_div(&(var + 1e-5)?.sqrt()?)?
            .broadcast_mul(w)?
            .broadcast_add(b)
    }

    /// Values and gradients (input, weight, bias) equal the composed layer norm's.
    #[test]
    fn layer_norm_matches_composed() -> R {
        let dev = Device::Cpu;
        let x = var(Tensor::randn(0f32, 2.0, (3, 5, 16), &dev)?)?;
        let w = var(Tensor::randn(1f32, 0.3, 16, &dev)?)?;
        let b = var(Tensor::randn(0f32, 0.3, 16, &dev)?)?;
        let probe = Tensor::randn(0f32, 1.0, (3, 5, 16), &dev)?;
        let fused =
            x.as_tensor()
                .apply_op3(w.as_tensor(), b.as_tensor(), LayerNormOp { eps: 1e-5 })?;
        let plain = composed_ln(x.as_tensor(), w.as_tensor(), b.as_tensor())?;
        assert!(max_diff(&fused, &plain)? < 1e-4);
        let (gf, gp) = (grads(&fused, &probe)?, grads(&plain, &probe)?);
        for v in [&x, &w, &b] {
            let d = max_diff(grad(&gf, v), grad(&gp, v))?;
            assert!(d < 1e-4, "max diff {d}");
        }
        Ok(())
    }

    /// Values and gradients equal candle's matmul + bias, with and without bias, for few rows
    /// (the dot-product path) and many.
    #[test]
    fn linear_matches_composed() -> R {
        let dev = Device::Cpu;
        for rows in [3, 130] {
            let x = var(Tensor::randn(0f32, 1.0, (rows, 24), &dev)?)?;
            let w = var(Tensor::randn(0f32, 0.2, (40, 24), &dev)?)?;
            let b = var(Tensor::randn(0f32, 0.2, 40, &dev)?)?;
            let probe = Tensor::randn(0f32, 1.0, (rows, 40), &dev)?;
            let (xt, wt, bt) = (x.as_tensor(), w.as_tensor(), b.as_tensor());
            let fused = xt.apply_op3(wt, bt, LINEAR)?;
            let plain = xt.matmul(&wt.t()?)?.broadcast_add(bt)?;
            assert!(max_diff(&fused, &plain)? < 1e-4, "{rows} rows: output");
            let (gf, gp) = (grads(&fused, &probe)?, grads(&plain, &probe)?);
            for (v, what) in [(&x, "dx"), (&w, "dw"), (&b, "db")] {
                let d = max_diff(grad(&gf, v), grad(&gp, v))?;
                assert!(d < 1e-4, "{what} ({rows} rows): max diff {d}");
            }
            let nb = xt.apply_op2(wt, LINEAR)?;
            assert!(
                max_diff(&nb, &xt.matmul(&wt.t()?)?)? < 1e-4,
                "no-bias output"
            );
        }
        Ok(())
    }

    /// Sizes that take the AMX path (every side >= 128, rows and outputs not multiples of 32):
    /// the output and all three gradients within bf16x3's error of plain f32; with
    /// `--matmul-precision highest` the same op runs plain f32.
    #[test]
    fn linear_on_amx_matches_composed() -> R {
        use crate::model::cpu::MatmulPrecision;
        let dev = Device::Cpu;
        let (rows, k, n) = (100, 200, 160);
        let x = var(Tensor::randn(0f32, 1.0, (rows, k), &dev)?)?;
        let w = var(Tensor::randn(0f32, 0.2, (n, k), &dev)?)?;
        let b = var(Tensor::randn(0f32, 0.2, n, &dev)?)?;
        let probe = Tensor::randn(0f32, 1.0, (rows, n), &dev)?;
        let (xt, wt, bt) = (x.as_tensor(), w.as_tensor(), b.as_tensor());
        let plain = xt.matmul(&wt.t()?)?.broadcast_add(bt)?;
        let gp = grads(&plain, &probe)?;
        for (prec, tol) in [
            (MatmulPrecision::High, 2e-4),
            (MatmulPrecision::Highest, 2e-5),
        ] {
            let fused = xt.apply_op3(wt, bt, LinearOp { amx: prec.amx() })?;
            let gf = grads(&fused, &probe)?;
            let rel = |a: &Tensor, b: &Tensor| -> Result<f32> {
                Ok(max_diff(a, b)? / b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
            };
            assert!(rel(&fused, &plain)? < tol, "{prec:?} output");
            for (v, what) in [(&x, "dx"), (&w, "dw"), (&b, "db")] {
                let d = rel(grad(&gf, v), grad(&gp, v))?;
                assert!(d < tol, "{prec:?} {what}: relative max diff {d}");
            }
        }
        Ok(())
    }

    /// Weight and bias gradients that skip candle's store arrive in it all the same, a weight
    /// used twice summed; an input that needs no gradient gets none, and the weight's is
    /// unchanged by that.
    #[test]
    fn direct_weight_grads_equal_plain_backward() -> R {
        let dev = Device::Cpu;
        let x = var(Tensor::randn(0f32, 1.0, (6, 24), &dev)?)?;
        let w = var(Tensor::randn(0f32, 0.2, (40, 24), &dev)?)?;
        let b = var(Tensor::randn(0f32, 0.2, 40, &dev)?)?;
        let probe = Tensor::randn(0f32, 1.0, (6, 40), &dev)?;
        let (xt, wt, bt) = (x.as_tensor(), w.as_tensor(), b.as_tensor());
        let y = (xt.apply_op3(wt, bt, LINEAR)? + xt.apply_op2(wt, LINEAR)?)?;
        let loss = (&y * &probe)?.sum_all()?;
        let plain = loss.backward()?;
        let direct = with_direct_weight_grads(|| Result::Ok(((), loss.backward()?)))?.1;
        for (v, what) in [(&x, "dx"), (&w, "dw"), (&b, "db")] {
            let d = max_diff(grad(&plain, v), grad(&direct, v))?;
            assert!(d <= 1e-6, "{what}: {d}");
        }
        // A constant input (the patch embedding's pixels): no dx, the same dW.
        let c = xt.detach();
        let loss = (c.apply_op3(wt, bt, LINEAR)? * &probe)?.sum_all()?;
        let g = with_direct_weight_grads(|| Result::Ok(((), loss.backward()?)))?.1;
        assert!(g.get(&c).is_none());
        let once = (xt.apply_op3(wt, bt, LINEAR)? * &probe)?
            .sum_all()?
            .backward()?;
        assert!(max_diff(grad(&g, &w), grad(&once, &w))? <= 1e-6);
        Ok(())
    }

    /// Values and all three gradients equal candle's composed attention, causal or not.
    #[test]
    fn attention_matches_composed() -> R {
        let dev = Device::Cpu;
        let (b, t, h, hd) = (2, 5, 3, 4);
        let d = h * hd;
        let scale = (hd as f64).powf(-0.5);
        for causal in [false, true] {
            let (q, k, v) = (
                var(Tensor::randn(0f32, 1.0, (b, t, d), &dev)?)?,
                var(Tensor::randn(0f32, 1.0, (b, t, d), &dev)?)?,
                var(Tensor::randn(0f32, 1.0, (b, t, d), &dev)?)?,
            );
            let probe = Tensor::randn(0f32, 1.0, (b, t, d), &dev)?;
            let op = AttentionOp::new(h, scale as f32, causal, None);
            let fused = q.as_tensor().apply_op3(k.as_tensor(), v.as_tensor(), op)?;
            let split = |x: &Tensor| x.reshape((b, t, h, hd))?.transpose(1, 2)?.contiguous();
            let qs = split(&(q.as_tensor() * scale)?)?;
            let (ks, vs) = (split(k.as_tensor())?, split(v.as_tensor())?);
            let mut s = qs.matmul(&ks.t()?)?;
            if causal {
                let mask: Vec<f32> = (0..t)
                    .flat_map(|i| (0..t).map(move |j| if j > i { f32::MIN } else { 0.0 }))
                    .collect();
                s = s.broadcast_add(&Tensor::from_vec(mask, (t, t), &dev)?)?;
            }
            let p = candle_nn::ops::softmax(&s, D::Minus1)?;
            let plain = p.matmul(&vs)?.transpose(1, 2)?.reshape((b, t, d))?;
            assert!(max_diff(&fused, &plain)? < 1e-5, "output (causal {causal})");
            let (gf, gp) = (grads(&fused, &probe)?, grads(&plain, &probe)?);
            for (x, what) in [(&q, "dq"), (&k, "dk"), (&v, "dv")] {
                let m = max_diff(grad(&gf, x), grad(&gp, x))?;
                assert!(m < 1e-5, "{what} (causal {causal}): max diff {m}");
            }
        }
        Ok(())
    }

    #[test]
    fn softmax_matches_composed() -> R {
        let dev = Device::Cpu;
        let x = var(Tensor::randn(0f32, 3.0, (2, 3, 7), &dev)?)?;
        let probe = Tensor::randn(0f32, 1.0, (2, 3, 7), &dev)?;
        let fused = x.as_tensor().apply_op1(SoftmaxOp)?;
        let plain = candle_nn::ops::softmax(x.as_tensor(), D::Minus1)?;
        assert!(max_diff(&fused, &plain)? < 1e-6);
        let (gf, gp) = (grads(&fused, &probe)?, grads(&plain, &probe)?);
        assert!(max_diff(grad(&gf, &x), grad(&gp, &x))? < 1e-6);
        Ok(())
    }

    #[test]
    fn quick_gelu_matches_composed() -> R {
        let dev = Device::Cpu;
        let x = var(Tensor::randn(0f32, 3.0, (4, 33), &dev)?)?;
        let probe = Tensor::randn(0f32, 1.0, (4, 33), &dev)?;
        let xt = x.as_tensor();
        let fused = xt.apply_op1(QuickGeluOp)?;
        let plain = (xt * candle_nn::ops::sigmoid(&(xt * 1.702)?)?)?;
        assert!(max_diff(&fused, &plain)? < 1e-5);
        let (gf, gp) = (grads(&fused, &probe)?, grads(&plain, &probe)?);
        assert!(max_diff(grad(&gf, &x), grad(&gp, &x))? < 1e-5);
        Ok(())
    }
}
