//! The towers' embedding layers as single training ops on the CPU, with their own backward.
//!
//! Composed from candle's ops, the vision embedding is a 6-d strided copy (unfolding the patches,
//! single-threaded: the largest non-product cost of a small model's step), a product, a
//! concatenation and a broadcast add, and the text embedding an `index_select` whose backward
//! zero-fills the whole 49,408-row table and copies it once more; each edge between them costs a
//! zero-fill and an add in candle's backward pass. Here each embedding is one op whose weight
//! gradients go straight to [`super::train_ops::with_direct_weight_grads`], like
//! [`super::train_block`]'s.
//!
//! Each op is applied to a weight (a variable), not to its data input (token ids, pixels): candle
//! records an op for backward only when one of its arguments takes part in the graph.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use super::train_ops;
use crate::model::cpu;
use crate::model::kernels::cuda::embed::{
    rows_sum_twin, token_positions_twin, unfold_patches_twin, RowGroups,
};

/// Whether `weights` can take the fused embedding ops in this pass, for a model whose kernels
/// chose them ([`crate::model::policy::Kernels::train_blocks`]): variables, inside a
/// [`train_ops::with_direct_weight_grads`] pass (see [`super::train_block::applies`]).
pub(crate) fn applies(weights: &[&Tensor]) -> bool {
    train_ops::direct_grads_active() && weights.iter().all(|w| w.is_variable())
}

/// `table[ids] + positions[..seq]`: applied as `table.apply_op2(ids)`, ids `[batch, seq]` u32,
/// result `[batch, seq, hidden]`; or, with `row_positions` (packed captions), ids `[rows]` and
/// row `r` at position `row_positions[r]`, result `[rows, hidden]`.
pub(crate) struct TokenEmbedOp {
    pub positions: Tensor,
    pub row_positions: Option<std::sync::Arc<[u32]>>,
}

impl TokenEmbedOp {
    /// The position of each of `n` ids, laid out as `[_, t]` (uniform) or packed.
    fn position_of(&self, n: usize, t: usize) -> Result<Vec<u32>> {
        match &self.row_positions {
            Some(p) if p.len() == n => Ok(p.to_vec()),
            Some(p) => candle_core::bail!("token embedding: {} positions for {n} ids", p.len()),
            None => Ok((0..n).map(|r| (r % t.max(1)) as u32).collect()),
        }
    }
}

impl CustomOp2 for TokenEmbedOp {
    fn name(&self) -> &'static str {
        "clipft-token-embedding"
    }

    fn cpu_fwd(
        &self,
        ts: &CpuStorage,
        tl: &Layout,
        is: &CpuStorage,
        il: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let table = train_ops::f32_slice(ts, tl, "token embedding")?;
        let (_, d) = tl.shape().dims2()?;
        let t = match &self.row_positions {
            Some(_) => il.shape().dims1()?,
            None => il.shape().dims2()?.1,
        };
        let n = il.shape().elem_count();
        let CpuStorage::U32(ids) = is else {
            candle_core::bail!("token embedding: ids must be u32")
        };
        let Some((i0, i1)) = il.contiguous_offsets() else {
            candle_core::bail!("token embedding: contiguous ids only")
        };
        let at = self.position_of(n, t)?;
        // The GPU path's twin is this op's arithmetic (f32: no rounding); it checks the ids and
        // positions against the tables.
        let y = cpu::with_slice(&self.positions, |pos| {
            token_positions_twin(table, pos, &ids[i0..i1], &at, d, |v| v)
        })?;
        let mut shape = il.shape().dims().to_vec();
        shape.push(d);
        Ok((CpuStorage::F32(y), Shape::from(shape)))
    }

    fn bwd(
        &self,
        table: &Tensor,
        ids: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (vocab, d) = table.dims2()?;
        let t = ids.dims().last().copied().unwrap_or(1);
        let ids = ids.flatten_all()?.to_vec1::<u32>()?;
        let at = self.position_of(ids.len(), t)?;
        let g = grad.contiguous()?;
        let pos = &self.positions;
        let pos_rows = pos.dim(0)?;
        // Dense, as torch's nn.Embedding gives AdamW: rows without tokens are 0. Each row's
        // gathered rows summed in order (the GPU path's twin).
        let (dtable, dpos) = cpu::with_slice(&g, |g| {
            Ok((
                rows_sum_twin(g, &RowGroups::by_target(&ids)?, d, vocab)?,
                rows_sum_twin(g, &RowGroups::by_target(&at)?, d, pos_rows)?,
            ))
        })?;
        let dev = table.device();
        train_ops::push_direct_grad(table, Tensor::from_vec(dtable, (vocab, d), dev)?)?;
        train_ops::push_direct_grad(pos, Tensor::from_vec(dpos, pos.shape(), dev)?)?;
        Ok((None, None))
    }
}

/// The vision embedding through the pre-layer-norm: `LN(cat(class, patches K^T) + positions)`,
/// applied as `kernel.apply_op2(pixels)` with the patch convolution's kernel `[hidden, channels,
/// patch, patch]` (stride = kernel size, so the convolution is one product over unfolded
/// patches); pixels `[batch, channels, size, size]`, result `[batch, 1 + grid^2, hidden]`.
pub(crate) struct PatchEmbedOp {
    pub class: Tensor,
    pub positions: Tensor,
    pub ln_weight: Tensor,
    pub ln_bias: Tensor,
    pub eps: f32,
    /// The model's AMX precision for the patch product.
    pub amx: Option<crate::model::amx::Precision>,
    /// The unfolded patches and the layer norm's input, for the backward pass (which takes them).
    saved: Mutex<Option<(Vec<f32>, Vec<f32>)>>,
}

impl PatchEmbedOp {
    pub fn new(
        class: Tensor,
        positions: Tensor,
        ln_weight: Tensor,
        ln_bias: Tensor,
        eps: f32,
        amx: Option<crate::model::amx::Precision>,
    ) -> Self {
        Self {
            class,
            positions,
            ln_weight,
            ln_bias,
            eps,
            amx,
            saved: Mutex::new(None),
        }
    }

    /// All weights but the kernel.
    pub fn others(&self) -> [&Tensor; 4] {
        [&self.class, &self.positions, &self.ln_weight, &self.ln_bias]
    }
}

impl CustomOp2 for PatchEmbedOp {
    fn name(&self) -> &'static str {
        "clipft-patch-embedding"
    }

    fn cpu_fwd(
        &self,
        ks: &CpuStorage,
        kl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let kernel = train_ops::f32_slice(ks, kl, "patch embedding")?;
        let px = train_ops::f32_slice(ps, pl, "patch embedding")?;
        let (d, c, p, p2) = kl.shape().dims4()?;
        let (b, c2, h, w) = pl.shape().dims4()?;
        if p != p2 || c != c2 || h != w || p == 0 || h % p != 0 {
            candle_core::bail!(
                "patch embedding: {b}x{c2}x{h}x{w} pixels do not fit a {c}x{p}x{p2} kernel"
            );
        }
        let (g, k) = (h / p, c * p * p);
        let t = g * g + 1;
        let patches = unfold_patches_twin(px, b, c, h, p);
        let y = train_ops::linear_forward(&patches, b * g * g, k, kernel, d, None, None, self.amx);
        let [cls, pos, lnw, lnb] = self.others();
        let (x, out) = cpu::with_slices(&[cls, pos, lnw, lnb], |s| {
            let (cls, pos) = (s[0], s[1]);
            if cls.len() != d || pos.len() != t * d {
                candle_core::bail!(
                    "patch embedding: class/position embeddings do not fit {t} x {d}"
                );
            }
            let mut x = vec![0f32; b * t * d];
            for (bi, item) in x.chunks_mut(t * d).enumerate() {
                for (j, row) in item.chunks_mut(d).enumerate() {
                    let e = if j == 0 {
                        cls
                    } else {
                        &y[(bi * g * g + j - 1) * d..][..d]
                    };
                    for ((o, e), q) in row.iter_mut().zip(e).zip(&pos[j * d..][..d]) {
                        *o = e + q;
                    }
                }
            }
            let out = train_ops::layer_norm_forward(&x, s[2], s[3], self.eps);
            Ok((x, out))
        })?;
        *self.saved.lock().unwrap_or_else(|p| p.into_inner()) = Some((patches, x));
        Ok((CpuStorage::F32(out), Shape::from((b, t, d))))
    }

    fn bwd(
        &self,
        kernel: &Tensor,
        pixels: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (d, c, p, _) = kernel.dims4()?;
        let (b, _, h, _) = pixels.dims4()?;
        let (g, k) = (h / p, c * p * p);
        let t = g * g + 1;
        // Taken (freed after this backward), as the blocks' activations are.
        let taken = self.saved.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some((patches, x)) = taken.as_ref() else {
            candle_core::bail!(
                "patch embedding: backward without a forward pass (or a second backward pass \
                 through the same step)"
            )
        };
        let (gr, kc) = (grad.contiguous()?, kernel.contiguous()?);
        let grads = cpu::with_slices(&[&gr, &kc, &self.ln_weight], |s| {
            let mut dx = vec![0f32; b * t * d];
            let (dlnw, dlnb) =
                train_ops::layer_norm_backward(x, s[2], s[0], self.eps, &mut dx, false);
            let mut dcls = vec![0f32; d];
            let mut dpos = vec![0f32; t * d];
            let mut dpatch = Vec::with_capacity(b * g * g * d);
            for item in dx.chunks(t * d) {
                for (j, row) in item.chunks(d).enumerate() {
                    for (o, v) in dpos[j * d..][..d].iter_mut().zip(row) {
                        *o += v;
                    }
                    if j == 0 {
                        for (o, v) in dcls.iter_mut().zip(row) {
                            *o += v;
                        }
                    } else {
                        dpatch.extend_from_slice(row);
                    }
                }
            }
            let want = train_ops::Wants {
                dx: false,
                dw: true,
                db: false,
            };
            let (_, dk, _) =
                train_ops::linear_backward(patches, b * g * g, k, s[1], d, &dpatch, want, self.amx);
            Ok([dk.unwrap_or_default(), dcls, dpos, dlnw, dlnb])
        })?;
        let targets = [
            kernel,
            &self.class,
            &self.positions,
            &self.ln_weight,
            &self.ln_bias,
        ];
        for (wt, g) in targets.into_iter().zip(grads) {
            train_ops::push_direct_grad(wt, Tensor::from_vec(g, wt.shape(), wt.device())?)?;
        }
        Ok((None, None))
    }
}
