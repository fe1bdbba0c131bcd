//! One pre-LN encoder block of the GPU path as a single training node.
//!
//! Run op by op, a GPU-path block is about twenty nodes of candle's graph (layer norms, the
//! stacked QKV product and its concatenations, the attention op, three more products with their
//! reshapes and transposes, the fused tails). candle's backward pass zero-fills a fresh buffer
//! and adds into it for every gradient that reaches a node, so each of those edges costs two
//! more launches and about four more passes over an activation-sized tensor (on ViT-B/32 at
//! batch 256, 20 to 80 MB each). As one node, the block runs the very same ops forward (on
//! detached tensors, so candle records nothing) and their own backward functions in reverse,
//! keeping each gradient in the buffer its op wrote: the residual gradients are added in the
//! layer norms' backward passes ([`super::fused_norm::LayerNormBackward`]'s `residual`), and
//! the weight gradients go to [`super::train_ops::with_direct_weight_grads`] directly (the q,
//! k and v weights' as views of the stacked product's gradient). With
//! [`crate::model::policy::Kernels::residual_norm`] the attention branch's residual add and
//! `ln2` are one kernel forward ([`super::fused_norm::ResidualNorm`]), as in inference: the
//! issue's residual add fused with the layer norm, forward and backward.
//!
//! Frozen weights (`--freeze` by name prefix, detached in the pass's model) get no gradient
//! and their weight products are skipped, so a block with some of them still runs as one
//! node; so does a block whose input is out of the graph (the layers below it frozen), the
//! node then hanging off one of its trained weights.
//!
//! The node's own forward is the block's last op, the MLP's bias + residual
//! ([`super::fused_tail::BiasResidual`]), so no output is copied. The last block of a tower can
//! take `rows`, the pooled rows: only they leave the block and go through the output projection
//! and the MLP, as on the op-by-op path. The arithmetic is that path's; `tests/parity.rs`
//! checks the two against each other (and candle's composed ops) through the kernels' twins.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::fused_attention::FusedAttention;
use super::fused_norm::{layer_norm_backward, FusedLayerNorm, ResidualNorm};
use super::fused_tail::{BiasAct, BiasResidual};
use super::train_ops;

/// A layer norm's weight, bias and epsilon.
#[derive(Debug, Clone)]
pub(crate) struct Norm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f32,
}

/// A linear layer's weight (`[out, in]`) and bias.
#[derive(Debug, Clone)]
pub(crate) struct Affine {
    pub weight: Tensor,
    pub bias: Tensor,
}

/// The parts of one block, as the GPU path runs them.
#[derive(Debug, Clone)]
pub(crate) struct GpuBlock {
    pub ln1: Norm,
    /// The q, k and v projections, in that order (stacked each pass into one product).
    pub qkv: [Affine; 3],
    pub attention: FusedAttention,
    pub out: Affine,
    pub ln2: Norm,
    pub fc1: Affine,
    pub act: BiasAct,
    pub fc2: Affine,
    /// The attention branch's residual add and `ln2` as one kernel
    /// ([`crate::model::policy::Kernels::residual_norm`]).
    pub residual_norm: bool,
}

impl GpuBlock {
    fn tensors(&self) -> Vec<&Tensor> {
        let mut t = vec![&self.ln1.weight, &self.ln1.bias];
        for a in self.qkv.iter().chain([&self.out]) {
            t.extend([&a.weight, &a.bias]);
        }
        t.extend([&self.ln2.weight, &self.ln2.bias]);
        for a in [&self.fc1, &self.fc2] {
            t.extend([&a.weight, &a.bias]);
        }
        t
    }

    /// Whether this block over `x` can run as one node in this pass: `x` or a weight part of
    /// the graph (else there is nothing to train through it), every weight a variable (their
    /// gradients go to the store directly, which only works for variables) or frozen (out of
    /// the graph: it gets no gradient, and its weight product is skipped), inside a
    /// [`train_ops::with_direct_weight_grads`] pass.
    pub fn applies(&self, x: &Tensor) -> bool {
        let tensors = self.tensors();
        train_ops::direct_grads_active()
            && tensors.iter().all(|t| t.is_variable() || !t.track_op())
            && (x.track_op() || tensors.iter().any(|t| t.is_variable()))
    }

    /// `x -> x + attn(ln1(x)); x + mlp(ln2(x))` as one node of the graph over `x`
    /// (`[batch, seq, dim]`, or `[rows, dim]` packed as the attention op says); with `rows`,
    /// only those flat rows leave the block (`[rows, dim]`).
    pub fn forward(&self, x: &Tensor, rows: Option<&Tensor>) -> Result<Tensor> {
        #[cfg(test)]
        tests::FORWARDS.with(|c| c.set(c.get() + 1));
        let d = |t: &Tensor| t.detach();
        let x_in = d(x).contiguous()?;
        let norm = |x: &Tensor, n: &Norm| {
            x.apply_op3_no_bwd(&d(&n.weight), &d(&n.bias), &FusedLayerNorm { eps: n.eps })
        };
        let h1 = norm(&x_in, &self.ln1)?;
        let w_qkv = Tensor::cat(
            &self.qkv.iter().map(|a| d(&a.weight)).collect::<Vec<_>>(),
            0,
        )?;
        let b_qkv = Tensor::cat(&self.qkv.iter().map(|a| d(&a.bias)).collect::<Vec<_>>(), 0)?;
        let qkv = product(&h1, &w_qkv)?;
        let ctx = qkv.apply_op2_no_bwd(&b_qkv, &self.attention)?;
        let (ctx_rows, x_rows) = match rows {
            Some(idx) => (pick(&ctx, idx)?, pick(&x_in, idx)?.contiguous()?),
            None => (ctx.clone(), x_in.clone()),
        };
        let y_out = product(&ctx_rows, &d(&self.out.weight))?;
        let (x2, h2) = if self.residual_norm {
            let params = Tensor::stack(
                &[d(&self.out.bias), d(&self.ln2.weight), d(&self.ln2.bias)],
                0,
            )?;
            let eps = self.ln2.eps;
            let both = y_out.apply_op3_no_bwd(&x_rows, &params, &ResidualNorm { eps })?;
            (both.get(0)?, both.get(1)?)
        } else {
            let x2 = y_out.apply_op3_no_bwd(&d(&self.out.bias), &x_rows, &BiasResidual)?;
            let h2 = norm(&x2, &self.ln2)?;
            (x2, h2)
        };
        let y1 = product(&h2, &d(&self.fc1.weight))?;
        let m = y1.apply_op2_no_bwd(&d(&self.fc1.bias), &self.act)?;
        let y2 = product(&m, &d(&self.fc2.weight))?;
        // The node hangs off `x`; with `x` out of the graph (the layers below frozen), off a
        // trained weight instead, so candle still asks it for the weights' gradients.
        let anchor = match x.track_op() {
            true => Some(x),
            false => self.tensors().into_iter().find(|t| t.is_variable()),
        };
        let Some(anchor) = anchor else {
            candle_core::bail!("gpu block: neither the input nor a weight is trained")
        };
        let node = BlockNode {
            block: self.clone(),
            rows: rows.cloned(),
            input_trained: x.track_op(),
            saved: Saved {
                x_in,
                h1,
                w_qkv,
                b_qkv,
                qkv,
                ctx,
                ctx_rows,
                x2: x2.clone(),
                h2,
                y1,
                m,
            },
        };
        anchor.apply_op3(&y2, &x2, node)
    }
}

/// `x W^T` over the last dimension (the op-by-op path's product, without the bias).
fn product(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let mut dims = x.dims().to_vec();
    let Some(k) = dims.pop() else {
        candle_core::bail!("gpu block: a scalar input")
    };
    let rows = x.elem_count() / k.max(1);
    let y = x.reshape((rows, k))?.matmul(&w.t()?)?;
    dims.push(w.dim(0)?);
    y.reshape(dims)
}

/// Rows `idx` of `t` flattened to `[rows, last]`.
fn pick(t: &Tensor, idx: &Tensor) -> Result<Tensor> {
    let d = t.dims().last().copied().unwrap_or(0);
    t.reshape((t.elem_count() / d.max(1), d))?
        .index_select(idx, 0)
}

/// `x`'s gradient as a 2-D matrix `[rows, last]` (contiguous).
fn flat(t: &Tensor) -> Result<Tensor> {
    let d = t.dims().last().copied().unwrap_or(0);
    t.reshape((t.elem_count() / d.max(1), d))?.contiguous()
}

/// The backward of [`product`] for its output's gradient `g`: the input's gradient (shaped as
/// `x`) and, where `weight` is trained, the weight's, `g^T x` (a frozen weight's product is
/// skipped).
fn product_backward(
    g: &Tensor,
    x: &Tensor,
    w: &Tensor,
    weight: &Tensor,
) -> Result<(Tensor, Option<Tensor>)> {
    let g2 = flat(g)?;
    let dx = g2.matmul(w)?.reshape(x.shape())?;
    let dw = match trained(weight) {
        true => Some(g2.t()?.matmul(&flat(x)?)?),
        false => None,
    };
    Ok((dx, dw))
}

/// Whether a block's weight takes a gradient: a variable (a frozen weight is a detached copy).
fn trained(t: &Tensor) -> bool {
    t.is_variable()
}

/// What the forward pass keeps for the backward pass.
struct Saved {
    /// The block's input (detached, contiguous).
    x_in: Tensor,
    h1: Tensor,
    w_qkv: Tensor,
    b_qkv: Tensor,
    qkv: Tensor,
    ctx: Tensor,
    ctx_rows: Tensor,
    x2: Tensor,
    h2: Tensor,
    y1: Tensor,
    m: Tensor,
}

/// The block's node: inputs `x` (or a trained weight, see [`GpuBlock::forward`]), the last
/// product `y2` and the residual stream `x2` (both detached); forward `y2 + fc2.bias + x2`,
/// backward through the whole block to `x`.
struct BlockNode {
    block: GpuBlock,
    rows: Option<Tensor>,
    /// Whether the first input is the block's input (whose gradient the node returns) rather
    /// than a trained weight it hangs off (see [`GpuBlock::forward`]).
    input_trained: bool,
    saved: Saved,
}

impl CustomOp3 for BlockNode {
    fn name(&self) -> &'static str {
        "clipft-gpu-block"
    }

    fn cpu_fwd(
        &self,
        _x: &CpuStorage,
        _xl: &Layout,
        y: &CpuStorage,
        yl: &Layout,
        r: &CpuStorage,
        rl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let bias = self.block.fc2.bias.detach();
        let (b, bl) = bias.storage_and_layout();
        let candle_core::Storage::Cpu(b) = &*b else {
            candle_core::bail!("gpu block: the bias is not on the CPU")
        };
        BiasResidual.cpu_fwd(y, yl, b, bl, r, rl)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _x: &candle_core::CudaStorage,
        _xl: &Layout,
        y: &candle_core::CudaStorage,
        yl: &Layout,
        r: &candle_core::CudaStorage,
        rl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let bias = self.block.fc2.bias.detach();
        let (b, bl) = bias.storage_and_layout();
        let candle_core::Storage::Cuda(b) = &*b else {
            candle_core::bail!("gpu block: the bias is not on the GPU")
        };
        BiasResidual.cuda_fwd(y, yl, b, bl, r, rl)
    }

    fn bwd(
        &self,
        _anchor: &Tensor,
        _y2: &Tensor,
        _x2: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, s) = (&self.block, &self.saved);
        let d = |t: &Tensor| t.detach();
        // The weights' gradients, None for frozen weights.
        let mut out: Vec<(&Tensor, Option<Tensor>)> = Vec::with_capacity(16);
        // out = y2 + fc2.bias + x2
        let g = grad.contiguous()?;
        let bias_grad = |bias: &Tensor, g: &Tensor| -> Result<Option<Tensor>> {
            trained(bias).then(|| super::bias_grad(g)).transpose()
        };
        out.push((&b.fc2.bias, bias_grad(&b.fc2.bias, &g)?));
        let (dm, dw2) = product_backward(&g, &s.m, &d(&b.fc2.weight), &b.fc2.weight)?;
        out.push((&b.fc2.weight, dw2));
        // m = act(y1 + fc1.bias)
        let (dy1, db1) = b.act.bwd(&s.y1, &d(&b.fc1.bias), &s.m, &dm)?;
        let (Some(dy1), Some(db1)) = (dy1, db1) else {
            candle_core::bail!("gpu block: the activation gave no gradient")
        };
        out.push((&b.fc1.bias, Some(db1)));
        let (dh2, dw1) = product_backward(&dy1, &s.h2, &d(&b.fc1.weight), &b.fc1.weight)?;
        out.push((&b.fc1.weight, dw1));
        // h2 = ln2(x2); x2 also reaches the output directly (added in the norm's pass).
        let ln2 = &b.ln2;
        let (dx2, dw, db) = layer_norm_backward(&s.x2, &d(&ln2.weight), &dh2, ln2.eps, Some(&g))?;
        out.extend([(&ln2.weight, Some(dw)), (&ln2.bias, Some(db))]);
        // x2 = ctx_rows out^T + out.bias + x_rows
        out.push((&b.out.bias, bias_grad(&b.out.bias, &dx2)?));
        let (dctx_rows, dwo) =
            product_backward(&dx2, &s.ctx_rows, &d(&b.out.weight), &b.out.weight)?;
        out.push((&b.out.weight, dwo));
        // The rows the block kept, back in place among all of them.
        let (dctx, dx_res) = match &self.rows {
            Some(idx) => {
                let spread = |g: &Tensor, like: &Tensor| -> Result<Tensor> {
                    flat(&like.zeros_like()?)?
                        .index_add(idx, g, 0)?
                        .reshape(like.shape())
                };
                (spread(&dctx_rows, &s.ctx)?, spread(&dx2, &s.x_in)?)
            }
            None => (dctx_rows, dx2),
        };
        // ctx = attention(qkv + b_qkv)
        let (dqkv, dbqkv) = b.attention.bwd(&s.qkv, &s.b_qkv, &s.ctx, &dctx)?;
        let (Some(dqkv), Some(dbqkv)) = (dqkv, dbqkv) else {
            candle_core::bail!("gpu block: the attention gave no gradient")
        };
        // The stacked product's weight gradient unless all three are frozen (then skipped).
        let any_qkv = b.qkv.iter().find(|a| trained(&a.weight));
        let weight = any_qkv.map_or(&b.qkv[0].weight, |a| &a.weight);
        let (dh1, dwqkv) = product_backward(&dqkv, &s.h1, &s.w_qkv, weight)?;
        let dim = b.out.weight.dim(0)?;
        for (i, a) in b.qkv.iter().enumerate() {
            let part = |g: &Tensor| g.narrow(0, i * dim, dim);
            out.push((&a.weight, dwqkv.as_ref().map(part).transpose()?));
            out.push((&a.bias, Some(part(&dbqkv)?)));
        }
        // h1 = ln1(x); x also reaches x2 directly (added in the norm's pass).
        let ln1 = &b.ln1;
        let (dx, dw, db) =
            layer_norm_backward(&s.x_in, &d(&ln1.weight), &dh1, ln1.eps, Some(&dx_res))?;
        out.extend([(&ln1.weight, Some(dw)), (&ln1.bias, Some(db))]);
        for (t, g) in out {
            if let (true, Some(g)) = (trained(t), g) {
                train_ops::push_direct_grad(t, g)?;
            }
        }
        Ok((self.input_trained.then_some(dx), None, None))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Result, Tensor, Var};
    use candle_nn::{VarBuilder, VarMap};

    use crate::model::config::Activation;
    use crate::model::layers::{Encoder, EncoderShape};
    use crate::model::policy::Kernels;
    use crate::model::train_ops::with_direct_weight_grads;
    use crate::model::Mode;

    thread_local! {
        /// Blocks this thread ran as one node (so a test knows the node ran).
        pub(super) static FORWARDS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    /// A two-block encoder on the GPU path (run here through the kernels' twins), trained one
    /// step as one node per block (with the residual norm and without) and op by op: the same
    /// output and the same gradient for the input and every weight, the last block computing
    /// only the pooled rows; causal or not, quick_gelu and gelu, f32 and bf16. With some
    /// weights frozen the blocks still run as nodes, the others' gradients are the same, and
    /// the frozen ones get none.
    #[test]
    fn one_node_gives_the_op_by_op_gradients() -> Result<()> {
        node_against_ops(&Device::Cpu, 64, [2e-5, 2e-2])
    }

    /// On a GPU (CUDA builds), the same with heads 64 wide (the tensor-core attention in bf16):
    /// gpu-check runs it first and trains op by op if it fails. Without a GPU it says so and
    /// checks nothing.
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_gpu_block_matches_op_by_op() -> Result<()> {
        let Ok(dev) = Device::new_cuda(0) else {
            eprintln!("cuda_gpu_block_matches_op_by_op: skipped, no GPU");
            return Ok(());
        };
        node_against_ops(&dev, 128, [1e-4, 3e-2])
    }

    /// [`one_node_gives_the_op_by_op_gradients`] on `dev`, blocks `dim` wide (two heads), with
    /// these tolerances in f32 and bf16.
    fn node_against_ops(dev: &Device, dim: usize, tols: [f32; 2]) -> Result<()> {
        let dev = dev.clone();
        for (dtype, tol) in [(DType::F32, tols[0]), (DType::BF16, tols[1])] {
            for (causal, act) in [(false, Activation::QuickGelu), (true, Activation::Gelu)] {
                let varmap = VarMap::new();
                let shape = EncoderShape {
                    dim,
                    inter: 2 * dim,
                    heads: 2,
                    layers: 2,
                    act,
                    eps: 1e-5,
                };
                let kernels = |blocks: bool, residual_norm: bool| Kernels {
                    fused_gpu: true,
                    train_blocks: blocks,
                    tc_attention: true,
                    residual_norm,
                    ..Kernels::CANDLE
                };
                let vb = VarBuilder::from_varmap(&varmap, dtype, &dev);
                let ops = Encoder::new(vb.clone(), shape, kernels(false, true))?;
                let nodes = [
                    Encoder::new(vb.clone(), shape, kernels(true, false))?,
                    Encoder::new(vb, shape, kernels(true, true))?,
                ];
                for (i, v) in varmap.all_vars().iter().enumerate() {
                    let r = Tensor::randn(0f32, 0.3, v.shape(), &dev)?;
                    let one = v.dims().len() == 1 && i % 2 == 0;
                    v.set(&(if one { (r + 1.0)? } else { r }).to_dtype(dtype)?)?;
                }
                let x = Var::from_tensor(
                    &Tensor::randn(0f32, 1.0, (2, 5, dim), &dev)?.to_dtype(dtype)?,
                )?;
                let r = Tensor::randn(0f32, 1.0, (2, dim), &dev)?.to_dtype(dtype)?;
                let run_on = |enc: &Encoder, input: &Tensor| {
                    with_direct_weight_grads(|| {
                        let out = enc.forward_pooled(
                            input,
                            causal,
                            &[(0, 4), (1, 2)],
                            None,
                            Mode::Train,
                        )?;
                        let loss = (&out * &r)?.to_dtype(DType::F32)?.sum_all()?;
                        let grads = loss.backward()?;
                        Ok::<_, candle_core::Error>((out, grads))
                    })
                };
                let run = |enc: &Encoder| run_on(enc, x.as_tensor());
                let before = FORWARDS.with(|c| c.get());
                let (out_ops, g_ops) = run(&ops)?;
                assert_eq!(
                    FORWARDS.with(|c| c.get()),
                    before,
                    "the op-by-op run used nodes"
                );
                for (k, node) in nodes.iter().enumerate() {
                    let (out_node, g_node) = run(node)?;
                    assert_eq!(
                        FORWARDS.with(|c| c.get()),
                        before + 2 * (k + 1),
                        "one node per block"
                    );
                    let what = format!("{dtype:?}, causal {causal}, residual norm {}", k == 1);
                    let close = |name: &str, a: &Tensor, b: &Tensor| -> Result<()> {
                        let (a, b) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
                        let scale = b
                            .abs()?
                            .max_keepdim(0)?
                            .flatten_all()?
                            .max(0)?
                            .to_scalar::<f32>()?
                            .max(1e-6);
                        let diff = (&a - &b)?
                            .abs()?
                            .flatten_all()?
                            .max(0)?
                            .to_scalar::<f32>()?;
                        assert!(
                            diff <= tol * scale,
                            "{what}: {name} off by {diff} (of {scale})"
                        );
                        Ok(())
                    };
                    close("output", &out_node, &out_ops)?;
                    let mut vars: Vec<(String, Tensor)> = varmap
                        .data()
                        .lock()
                        .expect("varmap")
                        .iter()
                        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
                        .collect();
                    vars.push(("input".into(), x.as_tensor().clone()));
                    for (name, t) in &vars {
                        let (Some(a), Some(b)) = (g_node.get(t), g_ops.get(t)) else {
                            panic!("{what}: no gradient for {name}");
                        };
                        close(name, a, b)?;
                    }
                }
                // Some weights frozen (detached, as `TrainModel::freeze` passes them): the
                // blocks still run as nodes, and the trained weights' and the input's gradients
                // are the op-by-op ones.
                let frozen = [
                    "layers.0.self_attn.q_proj.weight",
                    "layers.0.mlp.fc1.weight",
                    "layers.0.mlp.fc1.bias",
                    "layers.1.self_attn.out_proj.weight",
                    "layers.1.layer_norm2.weight",
                ];
                let mut trained = vec![("input".to_string(), x.as_tensor().clone())];
                let mut detached = Vec::new();
                let mut tensors = std::collections::HashMap::new();
                for (name, v) in varmap.data().lock().expect("varmap").iter() {
                    let t = v.as_tensor();
                    match frozen.contains(&name.as_str()) {
                        true => {
                            let f = t.detach();
                            detached.push((name.clone(), f.clone()));
                            tensors.insert(name.clone(), f)
                        }
                        false => {
                            trained.push((name.clone(), t.clone()));
                            tensors.insert(name.clone(), t.clone())
                        }
                    };
                }
                assert_eq!(tensors.len(), trained.len() - 1 + frozen.len());
                let vb = VarBuilder::from_tensors(tensors, dtype, &dev);
                let ops = Encoder::new(vb.clone(), shape, kernels(false, true))?;
                let node = Encoder::new(vb, shape, kernels(true, true))?;
                let err = |a: &Tensor, b: &Tensor| -> Result<f32> {
                    let (a, b) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
                    let scale = b
                        .abs()?
                        .flatten_all()?
                        .max(0)?
                        .to_scalar::<f32>()?
                        .max(1e-6);
                    Ok((&a - &b)?
                        .abs()?
                        .flatten_all()?
                        .max(0)?
                        .to_scalar::<f32>()?
                        / scale)
                };
                // The input trained, and frozen too (the layers below frozen): then the first
                // block's node hangs off a trained weight.
                for input in [x.as_tensor().clone(), x.as_tensor().detach()] {
                    let (out_ops, g_ops) = run_on(&ops, &input)?;
                    let at = FORWARDS.with(|c| c.get());
                    let (out_node, grads) = run_on(&node, &input)?;
                    let input_trained = input.track_op();
                    let what = format!(
                        "{dtype:?}, causal {causal}, frozen weights, input trained {input_trained}"
                    );
                    assert_eq!(
                        FORWARDS.with(|c| c.get()),
                        at + 2,
                        "{what}: one node per block"
                    );
                    assert!(err(&out_node, &out_ops)? <= tol, "{what}: output");
                    for (name, t) in &trained {
                        match (grads.get(t), g_ops.get(t)) {
                            (Some(a), Some(b)) => assert!(err(a, b)? <= tol, "{what}: {name}"),
                            (None, None) if name == "input" && !input_trained => {}
                            _ => panic!("{what}: a gradient for {name} on one side only"),
                        }
                    }
                    // The frozen weights' products were skipped: nothing reached the store
                    // for them.
                    for (name, t) in &detached {
                        let none = !grads.get_ids().any(|id| *id == t.id());
                        assert!(none, "{what}: a gradient for the frozen {name}");
                    }
                }
            }
        }
        Ok(())
    }
}
