//! One pre-LN transformer block as a single training op, forward and backward, on the CPU.
//!
//! Built from `train_ops`' per-op kernels, a block is twelve nodes of candle's graph, and candle's
//! backward pass zero-fills a fresh buffer and adds into it for every gradient that reaches a
//! node, then allocates again for the next op: on a small model (the fixture CLIP, 32-wide text
//! rows) that bookkeeping cost as much as the arithmetic. As one node, the block runs its own
//! backward straight through (residual gradients added in place, the three projections one
//! product against a stacked QKV weight), keeps what the backward pass needs from the forward pass
//! (attention probabilities included), and hands its weight gradients to
//! [`super::train_ops::with_direct_weight_grads`] directly.
//!
//! The last block of a tower can compute only the rows the tower pools (the class token, the end
//! of text): its other rows reach no output, so their queries, attention, projection and MLP are
//! skipped, forward and backward, and the gradients are the same.
//!
//! The arithmetic is the per-op path's ([`super::train_ops`]'s layer norm, linear, attention and
//! quick_gelu kernels); `train_block::tests` checks the two against each other.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use super::train_ops::{self, AttnShape};
use crate::model::cpu;
use crate::model::kernels::seqs::Seqs;

/// The tensors of one block, in the order [`BlockOp`] reads them.
pub(crate) const WEIGHTS: [&str; 16] = [
    "layer_norm1.weight",
    "layer_norm1.bias",
    "self_attn.q_proj.weight",
    "self_attn.q_proj.bias",
    "self_attn.k_proj.weight",
    "self_attn.k_proj.bias",
    "self_attn.v_proj.weight",
    "self_attn.v_proj.bias",
    "self_attn.out_proj.weight",
    "self_attn.out_proj.bias",
    "layer_norm2.weight",
    "layer_norm2.bias",
    "mlp.fc1.weight",
    "mlp.fc1.bias",
    "mlp.fc2.weight",
    "mlp.fc2.bias",
];

const LN1_W: usize = 0;
const LN1_B: usize = 1;
const Q_W: usize = 2;
const Q_B: usize = 3;
const K_W: usize = 4;
const K_B: usize = 5;
const V_W: usize = 6;
const V_B: usize = 7;
const OUT_W: usize = 8;
const OUT_B: usize = 9;
const LN2_W: usize = 10;
const LN2_B: usize = 11;
const FC1_W: usize = 12;
const FC1_B: usize = 13;
const FC2_W: usize = 14;
const FC2_B: usize = 15;

/// A block's shape parameters.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BlockShape {
    pub heads: usize,
    pub scale: f32,
    pub causal: bool,
    pub eps: f32,
}

/// A block's backward result: the input's gradient (None where the input is out of the graph)
/// and each weight's, in [`WEIGHTS`] order (None for a frozen one).
type BlockGrads = (Option<Vec<f32>>, Vec<Option<Vec<f32>>>);

/// What the forward pass keeps for the backward pass (which takes it).
struct Saved {
    h1: Vec<f32>,
    wqkv: Vec<f32>,
    qkv: Vec<f32>,
    probs: Vec<f32>,
    ctx: Vec<f32>,
    x2: Vec<f32>,
    h2: Vec<f32>,
    m: Vec<f32>,
    a: Vec<f32>,
}

/// `x -> x + attn(ln1(x)); x + mlp(ln2(x))` (quick_gelu MLP) over `[batch, seq, dim]`, or over
/// `[rows, dim]` holding the sequences of `packing` end to end; with `pooled`, only those
/// (item, position) rows are returned (`[pooled.len(), dim]`).
pub(crate) struct BlockOp {
    weights: Vec<Tensor>,
    shape: BlockShape,
    pooled: Option<Vec<(usize, usize)>>,
    packing: Option<std::sync::Arc<super::packed::PackedSeqs>>,
    /// The model's AMX precision for the block's products.
    amx: Option<crate::model::amx::Precision>,
    saved: Mutex<Option<Saved>>,
}

/// Whether a block with these weights can run as a [`BlockOp`] in this pass, for a model whose
/// kernels chose block ops ([`crate::model::policy::Kernels::train_blocks`]): inside a
/// [`train_ops::with_direct_weight_grads`] pass, every weight either a variable (its gradient
/// goes to the store directly, which only works for variables) or frozen (out of the graph,
/// `--freeze`: it gets no gradient and its product in the backward pass is skipped). The input
/// may be out of the graph (the embeddings frozen): the op is applied to its input and a
/// trained weight, so candle records it either way (see [`BlockOp::apply`]).
pub(crate) fn applies(weights: &[Tensor]) -> bool {
    train_ops::direct_grads_active()
        && weights.len() == WEIGHTS.len()
        && weights.iter().all(|w| w.is_variable() || !w.track_op())
}

impl BlockOp {
    pub fn new(
        weights: Vec<Tensor>,
        shape: BlockShape,
        pooled: Option<Vec<(usize, usize)>>,
        packing: Option<std::sync::Arc<super::packed::PackedSeqs>>,
        amx: Option<crate::model::amx::Precision>,
    ) -> Self {
        Self {
            weights,
            shape,
            pooled,
            packing,
            amx,
            saved: Mutex::new(None),
        }
    }

    /// The block over `x`: the op applied to `x` and the block's first trained weight, so that
    /// candle records it, and asks it for the weights' gradients, even where `x` is out of the
    /// graph; it returns `x`'s gradient only where `x` is in it. A block with every weight
    /// frozen is recorded through `x` alone (a gradient crossing it to the trained layers below).
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        #[cfg(test)]
        tests::APPLIED.with(|c| c.set(c.get() + 1));
        let anchor = self.weights.iter().find(|w| w.is_variable());
        let Some(anchor) = anchor.or(self.weights.first()).cloned() else {
            candle_core::bail!("encoder block: no weights")
        };
        x.apply_op2(&anchor, self)
    }

    /// The input's sequences and width: `[batch, seq, dim]`, or `[rows, dim]` packed.
    fn geometry(&self, shape: &Shape) -> Result<(Seqs<'_>, usize)> {
        match &self.packing {
            Some(p) => {
                let (rows, d) = shape.dims2()?;
                if rows != p.rows() {
                    candle_core::bail!("encoder block: {rows} rows do not hold the packed batch");
                }
                Ok((p.seqs(), d))
            }
            None => {
                let (batch, seq, d) = shape.dims3()?;
                Ok((Seqs::Uniform { batch, seq }, d))
            }
        }
    }

    fn attn_shape<'s>(&self, seqs: Seqs<'s>, d: usize) -> Result<AttnShape<'s>> {
        let s = self.shape;
        AttnShape::new(seqs, d, s.heads, s.scale, s.causal, 3 * d)
    }

    /// Row indices of the block's output rows, or None for all.
    fn out_rows(&self, seqs: Seqs) -> Result<Option<Vec<usize>>> {
        let Some(p) = &self.pooled else {
            return Ok(None);
        };
        let rows = p.iter().map(|&(i, pos)| seqs.row(i, pos));
        Ok(Some(rows.collect::<Result<Vec<usize>>>()?))
    }

    fn forward(&self, x: &[f32], seqs: Seqs, d: usize, w: &[&[f32]]) -> Result<Vec<f32>> {
        let rows = x.len() / d.max(1);
        let inter = w[FC1_B].len();
        let eps = self.shape.eps;
        let sh = self.attn_shape(seqs, d)?;
        let h1 = train_ops::layer_norm_forward(x, w[LN1_W], w[LN1_B], eps);
        // Stacked along the output dimension, so one product gives the rows [q | k | v].
        let wqkv = [w[Q_W], w[K_W], w[V_W]].concat();
        let bqkv = [w[Q_B], w[K_B], w[V_B]].concat();
        let qkv =
            train_ops::linear_forward(&h1, rows, d, &wqkv, 3 * d, Some(&bqkv), None, self.amx);
        let (q, k, v) = (&qkv[..], &qkv[d..], &qkv[2 * d..]);
        let (ctx, probs, residual) = match self.out_rows(seqs)? {
            None => {
                let mut ctx = vec![0f32; rows * d];
                let mut probs = vec![0f32; sh.probs_len()];
                cpu::attention_into(q, k, v, sh, &mut ctx, Some(&mut probs));
                (ctx, probs, None)
            }
            Some(out) => {
                let pooled = self.pooled.as_deref().unwrap_or_default();
                let mut ctx = vec![0f32; out.len() * d];
                let mut probs = vec![0f32; out.len() * sh.heads * seqs.max_len()];
                let q_at: Vec<usize> = out.iter().map(|r| r * 3 * d).collect();
                cpu::attention_rows_into(q, &q_at, k, v, sh, pooled, &mut ctx, Some(&mut probs));
                (ctx, probs, Some(cpu::gather_rows(x, d, &out)))
            }
        };
        let n = ctx.len() / d;
        let residual = residual.as_deref().unwrap_or(x);
        let x2 = train_ops::linear_forward(
            &ctx,
            n,
            d,
            w[OUT_W],
            d,
            Some(w[OUT_B]),
            Some(residual),
            self.amx,
        );
        let h2 = train_ops::layer_norm_forward(&x2, w[LN2_W], w[LN2_B], eps);
        let m =
            train_ops::linear_forward(&h2, n, d, w[FC1_W], inter, Some(w[FC1_B]), None, self.amx);
        let a = train_ops::quick_gelu_forward(&m);
        let y = train_ops::linear_forward(
            &a,
            n,
            inter,
            w[FC2_W],
            d,
            Some(w[FC2_B]),
            Some(&x2),
            self.amx,
        );
        *self.saved.lock().unwrap_or_else(|p| p.into_inner()) = Some(Saved {
            h1,
            wqkv,
            qkv,
            probs,
            ctx,
            x2,
            h2,
            m,
            a,
        });
        Ok(y)
    }

    /// The gradient of the block's input (where `want_dx`), and of every weight that `trained`
    /// marks (in [`WEIGHTS`] order; None for a frozen one). A frozen weight's product is
    /// skipped, and so is the gradient of any activation below which nothing trains: the
    /// weights are in forward order, so the gradient reaching weight `i`'s input is needed
    /// exactly when the block's input or a weight before `i` is.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        s: &Saved,
        x: &[f32],
        dy: &[f32],
        seqs: Seqs,
        d: usize,
        w: &[&[f32]],
        trained: &[bool],
        want_dx: bool,
    ) -> Result<BlockGrads> {
        let rows = x.len() / d.max(1);
        let inter = w[FC1_B].len();
        let eps = self.shape.eps;
        let sh = self.attn_shape(seqs, d)?;
        let n = dy.len() / d;
        let below = |i: usize| want_dx || trained[..i].iter().any(|&t| t);
        let wants = |wi: usize, bi: usize| train_ops::Wants {
            dx: below(wi),
            dw: trained[wi],
            db: trained[bi],
        };
        let lin = |x: &[f32], m: usize, k: usize, wi: usize, n: usize, g: &[f32]| {
            train_ops::linear_backward(x, m, k, w[wi], n, g, wants(wi, wi + 1), self.amx)
        };
        let mut grads: Vec<Option<Vec<f32>>> = vec![None; WEIGHTS.len()];
        let ln_grads =
            |grads: &mut [Option<Vec<f32>>], wi: usize, (dw, db): (Vec<f32>, Vec<f32>)| {
                grads[wi] = trained[wi].then_some(dw);
                grads[wi + 1] = trained[wi + 1].then_some(db);
            };
        // The MLP branch.
        let (da, dw2, db2) = lin(&s.a, n, inter, FC2_W, d, dy);
        (grads[FC2_W], grads[FC2_B]) = (dw2, db2);
        let Some(da) = da else {
            return Ok((None, grads));
        };
        let dm = train_ops::quick_gelu_backward(&s.m, &da);
        let (dh2, dw1, db1) = lin(&s.h2, n, d, FC1_W, inter, &dm);
        (grads[FC1_W], grads[FC1_B]) = (dw1, db1);
        let Some(dh2) = dh2 else {
            return Ok((None, grads));
        };
        let mut dx2 = dy.to_vec();
        let ln2 = train_ops::layer_norm_backward(&s.x2, w[LN2_W], &dh2, eps, &mut dx2, true);
        ln_grads(&mut grads, LN2_W, ln2);
        // The attention branch.
        let (dctx, dwo, dbo) = lin(&s.ctx, n, d, OUT_W, d, &dx2);
        (grads[OUT_W], grads[OUT_B]) = (dwo, dbo);
        let Some(dctx) = dctx else {
            return Ok((None, grads));
        };
        let (q, k, v) = (&s.qkv[..], &s.qkv[d..], &s.qkv[2 * d..]);
        let mut dqkv = vec![0f32; rows * 3 * d];
        let mut dx = match self.out_rows(seqs)? {
            None => {
                train_ops::attention_backward(q, k, v, sh, &s.probs, &dctx, &mut dqkv);
                dx2
            }
            Some(out) => {
                let pooled = self.pooled.as_deref().unwrap_or_default();
                train_ops::attention_rows_backward(q, k, v, sh, pooled, &s.probs, &dctx, &mut dqkv);
                let mut dx = vec![0f32; rows * d];
                for (g, &r) in dx2.chunks(d).zip(&out) {
                    for (o, g) in dx[r * d..(r + 1) * d].iter_mut().zip(g) {
                        *o += g;
                    }
                }
                dx
            }
        };
        // The three projections as one product against the stacked weight.
        let want = train_ops::Wants {
            dx: below(Q_W),
            dw: [Q_W, K_W, V_W].iter().any(|&i| trained[i]),
            db: [Q_B, K_B, V_B].iter().any(|&i| trained[i]),
        };
        let lin = train_ops::linear_backward;
        let (dh1, dwqkv, dbqkv) = lin(&s.h1, rows, d, &s.wqkv, 3 * d, &dqkv, want, self.amx);
        for (j, (wi, bi)) in [(Q_W, Q_B), (K_W, K_B), (V_W, V_B)].into_iter().enumerate() {
            let part =
                |v: &Option<Vec<f32>>, len: usize| v.as_ref().map(|v| v[j * len..][..len].to_vec());
            grads[wi] = part(&dwqkv, d * d).filter(|_| trained[wi]);
            grads[bi] = part(&dbqkv, d).filter(|_| trained[bi]);
        }
        if let Some(dh1) = dh1 {
            let ln1 = train_ops::layer_norm_backward(x, w[LN1_W], &dh1, eps, &mut dx, true);
            ln_grads(&mut grads, LN1_W, ln1);
        }
        Ok((want_dx.then_some(dx), grads))
    }
}

impl CustomOp2 for BlockOp {
    fn name(&self) -> &'static str {
        "clipft-encoder-block"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        _anchor: &CpuStorage,
        _al: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (seqs, d) = self.geometry(l.shape())?;
        let CpuStorage::F32(v) = s else {
            candle_core::bail!("encoder block: f32 only")
        };
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("encoder block: contiguous input only")
        };
        let refs: Vec<&Tensor> = self.weights.iter().collect();
        let y = cpu::with_slices(&refs, |w| {
            if w[LN1_W].len() != d || w[Q_W].len() != d * d || w[FC2_W].len() != w[FC1_W].len() {
                candle_core::bail!("encoder block: weights do not fit a {d}-wide input");
            }
            self.forward(&v[start..end], seqs, d, w)
        })?;
        let shape = match &self.pooled {
            Some(p) => Shape::from((p.len(), d)),
            None => l.shape().clone(),
        };
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _anchor: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (seqs, d) = self.geometry(arg.shape())?;
        let (x, g) = (arg.contiguous()?, grad.contiguous()?);
        // Taken, not borrowed: the activations are freed as soon as this block's backward has
        // run instead of when the step's graph goes (lower peak memory during backward).
        let taken = self.saved.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(saved) = taken.as_ref() else {
            candle_core::bail!(
                "encoder block: backward without a forward pass (or a second backward pass \
                 through the same step)"
            )
        };
        let trained: Vec<bool> = self.weights.iter().map(|w| w.is_variable()).collect();
        let want_dx = arg.track_op();
        let mut refs: Vec<&Tensor> = vec![&x, &g];
        refs.extend(self.weights.iter());
        let (dx, grads) = cpu::with_slices(&refs, |s| {
            self.backward(saved, s[0], s[1], seqs, d, &s[2..], &trained, want_dx)
        })?;
        for (wt, g) in self.weights.iter().zip(grads) {
            if let Some(g) = g {
                train_ops::push_direct_grad(wt, Tensor::from_vec(g, wt.shape(), wt.device())?)?;
            }
        }
        let dx = dx
            .map(|dx| Tensor::from_vec(dx, arg.shape(), arg.device()))
            .transpose()?;
        Ok((dx, None))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Result, Tensor, Var};
    use candle_nn::{VarBuilder, VarMap};

    use crate::model::config::Activation;
    use crate::model::layers::{Encoder, EncoderShape, Mode};
    use crate::model::policy::Kernels;

    /// A random two-block encoder with biases and layer norms away from their defaults.
    fn encoder(varmap: &VarMap, dim: usize) -> Result<Encoder> {
        let vb = VarBuilder::from_varmap(varmap, DType::F32, &Device::Cpu);
        let shape = EncoderShape {
            dim,
            inter: 2 * dim,
            heads: 4,
            layers: 2,
            act: Activation::QuickGelu,
            eps: 1e-5,
        };
        let enc = Encoder::new(vb, shape, Kernels::decide(&Device::Cpu, DType::F32))?;
        for v in varmap.all_vars() {
            let r = Tensor::randn(0f32, 0.3, v.shape(), &Device::Cpu)?;
            v.set(&(v.as_tensor() + r)?)?;
        }
        Ok(enc)
    }

    /// Largest difference relative to the largest magnitude of `a`.
    fn rel_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        let scale = a.abs()?.max_all()?.to_scalar::<f32>()?;
        let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        Ok(d / scale.max(1e-6))
    }

    thread_local! {
        /// Block ops this thread applied (so a test knows they ran).
        pub(super) static APPLIED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    /// `forward_pooled` through the block ops (inside `with_direct_weight_grads`) against the
    /// per-op path: several pooled rows per item, a repeated row, items without any, causal and
    /// not; outputs and the gradients of the input and every weight. With the input out of the
    /// graph (the embeddings frozen) the blocks still run as ops and the weights' gradients are
    /// the same.
    #[test]
    fn block_op_matches_per_op_path() -> Result<()> {
        let (b, t, d) = (3, 7, 16);
        let pooled = [(0, 6), (0, 2), (2, 0), (2, 5), (0, 6)];
        for (causal, input_trained) in [(false, true), (true, true), (true, false)] {
            let varmap = VarMap::new();
            let enc = encoder(&varmap, d)?;
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, t, d), &Device::Cpu)?)?;
            let input = match input_trained {
                true => x.as_tensor().clone(),
                false => x.as_tensor().detach(),
            };
            let probe = Tensor::randn(0f32, 1.0, (pooled.len(), d), &Device::Cpu)?;
            let run = || -> Result<(Tensor, candle_core::backprop::GradStore)> {
                let y = enc.forward_pooled(&input, causal, &pooled, None, Mode::Train)?;
                let g = (&y * &probe)?.sum_all()?.backward()?;
                Ok((y, g))
            };
            let (y_plain, g_plain) = run()?;
            let before = APPLIED.with(|c| c.get());
            let (y_fused, g_fused) = crate::model::train_ops::with_direct_weight_grads(run)?;
            assert_eq!(APPLIED.with(|c| c.get()), before + 2, "one op per block");
            assert!(
                rel_diff(&y_plain, &y_fused)? < 1e-5,
                "output (causal {causal})"
            );
            let mut tensors: Vec<(String, Tensor)> = {
                let data = varmap.data().lock().expect("varmap lock");
                data.iter()
                    .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
                    .collect()
            };
            if input_trained {
                tensors.push(("input".into(), x.as_tensor().clone()));
            } else {
                let none = [&g_plain, &g_fused].map(|g| g.get(x.as_tensor()).is_none());
                assert_eq!(none, [true, true], "a gradient for the frozen input");
            }
            assert_eq!(tensors.len(), 2 * 16 + usize::from(input_trained));
            for (name, t) in tensors {
                let p = g_plain.get(&t).expect("per-op gradient");
                let f = g_fused.get(&t).expect("fused gradient");
                if name.ends_with("k_proj.bias") {
                    continue; // rounding noise on both sides (softmax ignores it)
                }
                let e = rel_diff(p, f)?;
                assert!(e < 1e-4, "{name} (causal {causal}): {e:.2e}");
            }
        }
        Ok(())
    }

    /// A random two-block encoder whose tensors that `frozen` names are out of the graph (as
    /// `--freeze` leaves them); the trained ones by name, and the frozen ones.
    #[allow(clippy::type_complexity)]
    fn partly_frozen(
        d: usize,
        frozen: impl Fn(&str) -> bool,
    ) -> Result<(Encoder, Vec<(String, Tensor)>, Vec<Tensor>)> {
        let varmap = VarMap::new();
        encoder(&varmap, d)?;
        let (mut tensors, mut trained, mut detached) =
            (std::collections::HashMap::new(), Vec::new(), Vec::new());
        for (name, v) in varmap.data().lock().expect("varmap lock").iter() {
            let t = match frozen(name) {
                true => {
                    let f = v.as_tensor().detach();
                    detached.push(f.clone());
                    f
                }
                false => {
                    trained.push((name.clone(), v.as_tensor().clone()));
                    v.as_tensor().clone()
                }
            };
            tensors.insert(name.clone(), t);
        }
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
        let shape = EncoderShape {
            dim: d,
            inter: 2 * d,
            heads: 4,
            layers: 2,
            act: Activation::QuickGelu,
            eps: 1e-5,
        };
        let enc = Encoder::new(vb, shape, Kernels::decide(&Device::Cpu, DType::F32))?;
        Ok((enc, trained, detached))
    }

    /// Runs `enc` on `x` through the per-op path and through the block ops, checks that
    /// `ops` block ops ran, that the outputs agree, that every trained tensor (and the input,
    /// when `x` is a variable) gets the per-op gradient and that no frozen one gets any.
    fn check_against_per_op(
        enc: &Encoder,
        x: &Tensor,
        trained: &[(String, Tensor)],
        frozen: &[Tensor],
        ops: usize,
    ) -> Result<()> {
        let pooled = [(0, 5), (1, 3)];
        let probe = Tensor::randn(0f32, 1.0, (pooled.len(), x.dim(2)?), &Device::Cpu)?;
        let run = || -> Result<(Tensor, candle_core::backprop::GradStore)> {
            let y = enc.forward_pooled(x, true, &pooled, None, Mode::Train)?;
            let g = (&y * &probe)?.sum_all()?.backward()?;
            Ok((y, g))
        };
        let (y_plain, g_plain) = run()?;
        let before = APPLIED.with(|c| c.get());
        let (y_fused, g_fused) = crate::model::train_ops::with_direct_weight_grads(run)?;
        assert_eq!(APPLIED.with(|c| c.get()), before + ops, "block ops");
        assert!(rel_diff(&y_plain, &y_fused)? < 1e-5, "output");
        let input = x.is_variable().then(|| ("input".to_string(), x.clone()));
        for (name, t) in trained.iter().chain(&input) {
            let p = g_plain.get(t).expect("per-op gradient");
            let f = g_fused.get(t).expect("fused gradient");
            if !name.ends_with("k_proj.bias") {
                assert!(rel_diff(p, f)? < 1e-4, "{name}");
            }
        }
        for t in frozen {
            assert!(
                !g_fused.get_ids().any(|id| *id == t.id()),
                "a frozen gradient"
            );
        }
        Ok(())
    }

    /// With the input and the first block frozen (`--freeze` of the embeddings and layer 0),
    /// the first block runs as in inference and only the second as a block op; the output and
    /// the second block's gradients are the per-op path's, and the frozen block gets none.
    #[test]
    fn frozen_lower_blocks_run_as_inference() -> Result<()> {
        let (enc, trained, frozen) = partly_frozen(16, |n| n.starts_with("layers.0."))?;
        assert_eq!((trained.len(), frozen.len()), (16, 16));
        let x = Tensor::randn(0f32, 1.0, (2, 6, 16), &Device::Cpu)?;
        check_against_per_op(&enc, &x, &trained, &frozen, 1)
    }

    /// Frozen weights inside the block ops: a wholly frozen block that the input's gradient
    /// crosses, and blocks with single frozen tensors (a projection of the stacked three, a
    /// layer norm's weight, an MLP bias), over a trained input and a frozen one. Each block
    /// still runs as one op, the trained tensors get the per-op gradients, the frozen none.
    /// Over a frozen input with everything below `fc2` frozen, the backward pass stops after
    /// `fc2`'s products.
    #[test]
    fn frozen_weights_inside_block_ops() -> Result<()> {
        let d = 16;
        let some = |n: &str| {
            n.starts_with("layers.0.")
                || [
                    "layers.1.self_attn.k_proj.weight",
                    "layers.1.layer_norm2.weight",
                    "layers.1.mlp.fc1.bias",
                ]
                .contains(&n)
        };
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 6, d), &Device::Cpu)?)?;
        let (enc, trained, frozen) = partly_frozen(d, some)?;
        assert_eq!((trained.len(), frozen.len()), (13, 19));
        check_against_per_op(&enc, x.as_tensor(), &trained, &frozen, 2)?;
        let x = x.as_tensor().detach();
        let layer0 = |n: &str| {
            n.starts_with("layers.0.self_attn.q_proj") || n == "layers.0.layer_norm1.bias"
        };
        let (enc, trained, frozen) = partly_frozen(d, layer0)?;
        check_against_per_op(&enc, &x, &trained, &frozen, 2)?;
        let only_fc2 = |n: &str| !n.contains("mlp.fc2");
        let (enc, trained, frozen) = partly_frozen(d, only_fc2)?;
        assert_eq!(trained.len(), 4);
        check_against_per_op(&enc, &x, &trained, &frozen, 2)
    }
}
