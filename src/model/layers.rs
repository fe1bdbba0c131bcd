//! The building blocks both towers share: linear, layer norm, attention, MLP, encoder.
//!
//! Every block takes a [`Mode`]. Candle's fused kernels (`layer_norm`, `softmax_last_dim`) record no
//! backward, so a model built from them trains with silently missing gradients. Training therefore
//! runs composed, differentiable ops; inference runs the fused kernels, which are faster. On the
//! CPU inside a training step ([`super::train_ops::with_direct_weight_grads`]), each encoder
//! block is one differentiable op instead ([`super::train_block`]). The weights and the module
//! tree are the same in every mode: there is one model definition.

use candle_core::{DType, Result, Tensor, D};
use candle_nn::VarBuilder;

use std::sync::{Arc, OnceLock};

use super::amx;
use super::config::{Activation, TextConfig, VisionConfig};
use super::cpu;
use super::kernels::cpu_block;
use super::kernels::seqs::Seqs;
use super::ops::gpu_block;
use super::ops::packed::PackedSeqs;
use super::policy::Kernels;
use super::train_block;

/// Which kernels a forward pass may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Fused kernels, no gradient bookkeeping needed.
    Inference,
    /// Only ops that carry gradients.
    Train,
}

/// `y = x W^T + b` over the last dimension, with any leading dimensions flattened into one matrix
/// so that the whole batch is a single GEMM instead of one small GEMM per sequence.
#[derive(Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    /// `[out_dim, in_dim]`, kept apart from `weight` because a serving process may release the
    /// f32 weight once it is packed (see [`Linear::release_packed`]).
    dims: (usize, usize),
    /// The weight in AMX tile layout, made on first use by the fused CPU path when the model's
    /// kernels use AMX; shared by clones.
    packed: Arc<OnceLock<amx::PackedB>>,
    kernels: Kernels,
}

impl std::fmt::Debug for Linear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Linear")
            .field("weight", &self.weight.shape())
            .finish()
    }
}

impl Linear {
    pub fn new(
        vb: VarBuilder,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        kernels: Kernels,
    ) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            dims: (out_dim, in_dim),
            packed: Arc::default(),
            kernels,
        })
    }

    /// For a process that only serves: packs the weight for AMX now and drops the f32 copy,
    /// which the AMX path never reads again (halving the weights' memory). Returns the bytes
    /// released; 0 (and nothing changes) unless the model's kernels multiply on AMX.
    /// Training or the composed path on this layer fails with a shape error afterwards.
    pub fn release_packed(&mut self) -> Result<usize> {
        let Some(prec) = self.kernels.amx else {
            return Ok(0);
        };
        if self.weight.elem_count() == 0 {
            return Ok(0);
        }
        let (n, k) = self.dims;
        cpu::with_slice(&self.weight, |w| {
            self.packed
                .get_or_init(|| amx::PackedB::new(w, n, k, prec == amx::Precision::Bf16x3));
            Ok(())
        })?;
        let packed_ok = self
            .packed
            .get()
            .is_some_and(|p| prec == amx::Precision::Bf16 || p.has_lo());
        if !packed_ok {
            return Ok(0);
        }
        let bytes = self.weight.elem_count() * self.weight.dtype().size_in_bytes();
        self.weight = Tensor::zeros(0, self.weight.dtype(), self.weight.device())?;
        Ok(bytes)
    }

    /// Forgets the packed copy (in this clone only), for weights that changed since it was
    /// made: a model evaluated between training epochs.
    pub(crate) fn forget_packed(&mut self) {
        self.packed = Arc::default();
    }

    /// The AMX-packed weight and its precision when the model's kernels use AMX; `w` is this
    /// weight's data.
    fn packed(&self, w: &[f32]) -> Option<(&amx::PackedB, amx::Precision)> {
        let prec = self.kernels.amx?;
        let (n, k) = self.dims;
        let p = self
            .packed
            .get_or_init(|| amx::PackedB::new(w, n, k, prec == amx::Precision::Bf16x3));
        Some((p, prec))
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let in_dim = dims[dims.len() - 1];
        let rows = x.elem_count() / in_dim.max(1);
        let x2 = x.reshape((rows, in_dim))?;
        let y = if self.kernels.fused_cpu {
            let x2 = x2.contiguous()?;
            let op = super::train_ops::LinearOp {
                amx: self.kernels.amx,
            };
            match &self.bias {
                Some(b) => x2.apply_op3(&self.weight, b, op)?,
                None => x2.apply_op2(&self.weight, op)?,
            }
        } else {
            let y = x2.matmul(&self.weight.t()?)?;
            match &self.bias {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            }
        };
        let mut out_dims = dims.to_vec();
        let last = out_dims.len() - 1;
        out_dims[last] = self.dims.0;
        y.reshape(out_dims)
    }

    /// `x W^T` over the last dimension, without the bias.
    fn product(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let in_dim = dims[dims.len() - 1];
        let rows = x.elem_count() / in_dim.max(1);
        let y = x.reshape((rows, in_dim))?.matmul(&self.weight.t()?)?;
        let mut out_dims = dims.to_vec();
        let last = out_dims.len() - 1;
        out_dims[last] = self.dims.0;
        y.reshape(out_dims)
    }

    /// `act(x W^T + b)` on the GPU path: the product, then bias and activation in one
    /// [`super::ops::fused_tail::BiasAct`] (with its backward in training); composed where
    /// the kernels do not fuse.
    fn forward_act(&self, x: &Tensor, act: Activation, mode: Mode) -> Result<Tensor> {
        match (&self.bias, self.kernels.fused_gpu) {
            (Some(b), true) => {
                let op = super::ops::fused_tail::BiasAct { act: tail_act(act) };
                let y = self.product(x)?;
                match mode {
                    Mode::Inference => y.apply_op2_no_bwd(b, &op),
                    Mode::Train => y.apply_op2(b, op),
                }
            }
            _ => activate(&self.forward(x)?, act, self.kernels.fused_cpu),
        }
    }

    /// `x W^T + b + residual` on the GPU path: the product, then bias and residual in one
    /// [`super::ops::fused_tail::BiasResidual`] (with its backward in training); composed
    /// where the kernels do not fuse.
    fn forward_residual(&self, x: &Tensor, residual: &Tensor, mode: Mode) -> Result<Tensor> {
        use super::ops::fused_tail::BiasResidual;
        match (&self.bias, self.kernels.fused_gpu) {
            (Some(b), true) => {
                let (y, r) = (self.product(x)?, residual.contiguous()?);
                match mode {
                    Mode::Inference => y.apply_op3_no_bwd(b, &r, &BiasResidual),
                    Mode::Train => y.apply_op3(b, &r, BiasResidual),
                }
            }
            _ => self.forward(x)? + residual,
        }
    }

    /// `x W^T + b + residual` and its layer norm on the GPU path in inference: the product,
    /// then one [`super::ops::fused_norm::ResidualNorm`] with `tail` (this layer's bias and
    /// the norm's weight, bias and epsilon); the residual stream and the normed rows.
    fn forward_residual_norm(
        &self,
        x: &Tensor,
        residual: &Tensor,
        tail: &NormTail,
    ) -> Result<(Tensor, Tensor)> {
        let (y, r) = (self.product(x)?, residual.contiguous()?);
        let op = super::ops::fused_norm::ResidualNorm {
            eps: tail.eps as f32,
        };
        let out = y.apply_op3_no_bwd(&r, &tail.params, &op)?;
        Ok((out.get(0)?, out.get(1)?))
    }

    /// A linear map whose weight is given directly (the patch embedding's flattened kernel).
    pub fn from_weight(weight: Tensor, bias: Option<Tensor>, kernels: Kernels) -> Result<Self> {
        let (n, k) = weight.dims2()?;
        Ok(Self {
            weight,
            bias,
            dims: (n, k),
            packed: Arc::default(),
            kernels,
        })
    }

    /// [`Linear::forward`], through the fused CPU kernel (AMX where chosen) in inference mode.
    pub fn forward_t(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        if mode == Mode::Train || !self.kernels.fused_cpu {
            return self.forward(x);
        }
        let dims = x.dims();
        let k = dims[dims.len() - 1];
        let rows = x.elem_count() / k.max(1);
        let n = self.dims.0;
        let x = cpu::to_buf(x)?;
        let y = cpu::with_slice(&self.weight, |w| {
            let packed = self.packed(w);
            match &self.bias {
                Some(b) => cpu::with_slice(b, |b| {
                    Ok(cpu::linear(&x, rows, k, w, n, Some(b), None, packed))
                }),
                None => Ok(cpu::linear(&x, rows, k, w, n, None, None, packed)),
            }
        })?;
        let mut out_dims = dims.to_vec();
        let last = out_dims.len() - 1;
        out_dims[last] = n;
        cpu::to_tensor(&y, &out_dims)
    }
}

/// Layer normalisation over the last dimension: candle's fused kernel for inference; for
/// training the fused CPU op, the GPU path's op, or composed ops, each with its backward.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
    kernels: Kernels,
    /// Training through [`super::ops::fused_norm`]: the GPU path, and a width it takes.
    gpu_op: bool,
}

impl LayerNorm {
    pub fn new(vb: VarBuilder, dim: usize, eps: f64, kernels: Kernels) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            bias: vb.get(dim, "bias")?,
            eps,
            kernels,
            gpu_op: kernels.fused_gpu && super::kernels::cuda::layernorm::norm_supports(dim),
        })
    }

    /// Weight, bias and epsilon, for fused ops that include a layer norm.
    pub(crate) fn parts(&self) -> (&Tensor, &Tensor, f64) {
        (&self.weight, &self.bias, self.eps)
    }

    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        match mode {
            Mode::Inference => candle_nn::ops::layer_norm(
                &x.contiguous()?,
                &self.weight,
                &self.bias,
                self.eps as f32,
            ),
            Mode::Train if self.gpu_op => x.contiguous()?.apply_op3(
                &self.weight,
                &self.bias,
                super::ops::fused_norm::FusedLayerNorm {
                    eps: self.eps as f32,
                },
            ),
            Mode::Train if self.kernels.fused_cpu => x.contiguous()?.apply_op3(
                &self.weight,
                &self.bias,
                super::train_ops::LayerNormOp {
                    eps: self.eps as f32,
                },
            ),
            Mode::Train => {
                // Statistics in f32 even for half-precision activations, as torch does.
                let in_dtype = x.dtype();
                let xf = x.to_dtype(DType::F32)?;
                let mean = xf.mean_keepdim(D::Minus1)?;
                let centered = xf.broadcast_sub(&mean)?;
                let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
                let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?;
                normed
                    .to_dtype(in_dtype)?
                    .broadcast_mul(&self.weight)?
                    .broadcast_add(&self.bias)
            }
        }
    }
}

/// The fused tail's code for an activation.
fn tail_act(act: Activation) -> super::kernels::cuda::elementwise::Act {
    use super::kernels::cuda::elementwise::Act;
    match act {
        Activation::QuickGelu => Act::QuickGelu,
        Activation::Gelu => Act::Gelu,
    }
}

/// `act(x)`; `fused`: through the fused CPU op (see [`Kernels::fused_cpu`]).
fn activate(x: &Tensor, act: Activation, fused: bool) -> Result<Tensor> {
    match act {
        Activation::QuickGelu if fused => x.contiguous()?.apply_op1(super::train_ops::QuickGeluOp),
        Activation::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
        Activation::Gelu => x.gelu_erf(),
    }
}

fn softmax_last(x: &Tensor, mode: Mode, fused: bool) -> Result<Tensor> {
    match mode {
        Mode::Inference => candle_nn::ops::softmax_last_dim(x),
        Mode::Train if fused => x.contiguous()?.apply_op1(super::train_ops::SoftmaxOp),
        Mode::Train => candle_nn::ops::softmax(x, D::Minus1),
    }
}

/// Multi-head self-attention as in transformers' `CLIPAttention`.
#[derive(Debug, Clone)]
pub struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
    head_dim: usize,
    scale: f64,
    kernels: Kernels,
    /// Through [`super::ops::fused_attention`] (inference and training): the kernels ask for
    /// it, the kernel takes this head width and every projection has its bias.
    fused: bool,
    /// The three input projections stacked (`[3 d, d]` weight, `[3 d]` bias) for inference on
    /// the fused path: one GEMM instead of three. Made on first use, shared by clones,
    /// forgotten with [`Attention::forget_stacked`]; training stacks the variables each pass.
    stacked: Arc<OnceLock<(Tensor, Tensor)>>,
}

impl Attention {
    pub(crate) fn linears_mut(&mut self) -> [&mut Linear; 4] {
        [
            &mut self.q_proj,
            &mut self.k_proj,
            &mut self.v_proj,
            &mut self.out_proj,
        ]
    }

    pub fn new(vb: VarBuilder, dim: usize, heads: usize, kernels: Kernels) -> Result<Self> {
        let head_dim = dim / heads;
        let lin = |name: &str| Linear::new(vb.pp(name), dim, dim, true, kernels);
        Ok(Self {
            q_proj: lin("q_proj")?,
            k_proj: lin("k_proj")?,
            v_proj: lin("v_proj")?,
            out_proj: lin("out_proj")?,
            heads,
            head_dim,
            scale: (head_dim as f64).powf(-0.5),
            kernels,
            fused: kernels.fused_gpu && super::kernels::cuda::attention_supports(head_dim),
            stacked: Arc::default(),
        })
    }

    /// Forgets the stacked projection (in this clone only), for weights changed since.
    pub(crate) fn forget_stacked(&mut self) {
        self.stacked = Arc::default();
    }

    /// For a process that only serves, on the fused path: stacks the projections now and
    /// drops the separate q, k and v weights and biases, which that path never reads again
    /// (the stacked copy would otherwise double them in GPU memory). Returns the bytes
    /// released; 0 (and nothing changes) off the fused path. Training, the composed path or
    /// [`Attention::forget_stacked`] on this layer fail afterwards.
    pub(crate) fn release_stacked(&mut self) -> Result<usize> {
        if !self.fused {
            return Ok(0);
        }
        if self.stacked.get().is_none() {
            let Some(s) = self.stack()? else {
                return Ok(0);
            };
            let _ = self.stacked.set(s);
        }
        let mut bytes = 0;
        for l in [&mut self.q_proj, &mut self.k_proj, &mut self.v_proj] {
            let size = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
            bytes += size(&l.weight) + l.bias.as_ref().map_or(0, size);
            l.weight = Tensor::zeros(0, l.weight.dtype(), l.weight.device())?;
            l.bias = None;
        }
        Ok(bytes)
    }

    /// The q, k and v projections' weights and biases stacked, differentiable in the
    /// variables; None if a projection has no bias.
    fn stack(&self) -> Result<Option<(Tensor, Tensor)>> {
        let ps = [&self.q_proj, &self.k_proj, &self.v_proj];
        let Some(biases) = ps
            .iter()
            .map(|l| l.bias.clone())
            .collect::<Option<Vec<_>>>()
        else {
            return Ok(None);
        };
        let weights: Vec<&Tensor> = ps.iter().map(|l| &l.weight).collect();
        Ok(Some((Tensor::cat(&weights, 0)?, Tensor::cat(&biases, 0)?)))
    }

    /// Whether this layer runs the fused attention op (which also takes packed sequences):
    /// the kernels ask for it and the projections can be stacked.
    fn runs_fused(&self) -> bool {
        let biased = [&self.q_proj, &self.k_proj, &self.v_proj]
            .iter()
            .all(|l| l.bias.is_some());
        self.fused && (biased || self.stacked.get().is_some())
    }

    /// `[.., 3 d]` (`x`'s leading dimensions): the q, k and v products of `x` (without their
    /// biases, which the attention op adds as it loads them) as one GEMM, and the stacked bias.
    fn qkv(&self, x: &Tensor, mode: Mode) -> Result<Option<(Tensor, Tensor)>> {
        let (w, b) = match (mode, self.stacked.get()) {
            (Mode::Inference, Some(s)) => s.clone(),
            _ => match self.stack()? {
                Some(s) => {
                    if mode == Mode::Inference {
                        let _ = self.stacked.set(s.clone());
                    }
                    s
                }
                None => return Ok(None),
            },
        };
        let mut dims = x.dims().to_vec();
        let Some(d) = dims.pop() else {
            candle_core::bail!("attention: a scalar input");
        };
        let rows = x.elem_count() / d.max(1);
        let y = x.reshape((rows, d))?.matmul(&w.t()?)?;
        dims.push(3 * d);
        Ok(Some((y.reshape(dims)?, b)))
    }

    /// `mask`: the text tower's causal mask, or none (vision).
    fn forward(&self, x: &Tensor, mask: &Mask, mode: Mode) -> Result<Tensor> {
        self.out_proj.forward(&self.context(x, mask, mode)?)
    }

    /// The attention's output before `out_proj`: `x`'s shape (`[batch, seq, dim]`, or
    /// `[rows, dim]` for packed sequences), heads concatenated.
    fn context(&self, x: &Tensor, mask: &Mask, mode: Mode) -> Result<Tensor> {
        if self.fused {
            if let Some((qkv, bias)) = self.qkv(x, mode)? {
                // The only mask used is the text tower's causal one.
                let op = super::ops::fused_attention::FusedAttention {
                    heads: self.heads,
                    scale: self.scale as f32,
                    causal: mask.causal(),
                    packed: mask.packed.clone(),
                    tensor_cores: self.kernels.tc_attention,
                };
                return match mode {
                    Mode::Inference => qkv.apply_op2_no_bwd(&bias, &op),
                    Mode::Train => qkv.apply_op2(&bias, op),
                };
            }
        }
        if mode == Mode::Train && self.kernels.fused_cpu {
            // One op with its own backward; the only mask used is the text tower's causal one.
            let op = super::train_ops::AttentionOp::new(
                self.heads,
                self.scale as f32,
                mask.causal(),
                mask.packed.clone(),
            );
            let (q, k, v) = (
                self.q_proj.forward(x)?,
                self.k_proj.forward(x)?,
                self.v_proj.forward(x)?,
            );
            return q
                .contiguous()?
                .apply_op3(&k.contiguous()?, &v.contiguous()?, op);
        }
        if mask.packed.is_some() {
            candle_core::bail!(
                "packed sequences need clipft's attention kernels, not candle's ops"
            );
        }
        let (b, t, d) = x.dims3()?;
        let split = |y: Tensor| -> Result<Tensor> {
            y.reshape((b, t, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split((self.q_proj.forward(x)? * self.scale)?)?;
        let k = split(self.k_proj.forward(x)?)?;
        let v = split(self.v_proj.forward(x)?)?;
        let mut scores = q.matmul(&k.t()?)?;
        if let Some(m) = mask.tensor()? {
            scores = scores.broadcast_add(m)?;
        }
        let probs = softmax_last(&scores, mode, self.kernels.fused_cpu)?;
        probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, d))
    }
}

/// The position-wise feed-forward block.
#[derive(Debug, Clone)]
pub struct Mlp {
    fc1: Linear,
    fc2: Linear,
    act: Activation,
    kernels: Kernels,
}

impl Mlp {
    pub(crate) fn linears_mut(&mut self) -> [&mut Linear; 2] {
        [&mut self.fc1, &mut self.fc2]
    }

    pub fn new(
        vb: VarBuilder,
        dim: usize,
        inter: usize,
        act: Activation,
        kernels: Kernels,
    ) -> Result<Self> {
        Ok(Self {
            fc1: Linear::new(vb.pp("fc1"), dim, inter, true, kernels)?,
            fc2: Linear::new(vb.pp("fc2"), inter, dim, true, kernels)?,
            act,
            kernels,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = activate(&self.fc1.forward(x)?, self.act, self.kernels.fused_cpu)?;
        self.fc2.forward(&h)
    }
}

/// One pre-LN transformer block.
#[derive(Debug, Clone)]
pub struct EncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: Attention,
    layer_norm2: LayerNorm,
    mlp: Mlp,
}

impl EncoderLayer {
    /// This block's tensors in [`train_block::WEIGHTS`] order, and its shape; None for a linear
    /// layer without bias (no CLIP checkpoint has one).
    fn block(&self, causal: bool) -> Option<(Vec<Tensor>, train_block::BlockShape)> {
        let a = &self.self_attn;
        let ln = |n: &LayerNorm| [n.weight.clone(), n.bias.clone()];
        let mut w = Vec::with_capacity(train_block::WEIGHTS.len());
        w.extend(ln(&self.layer_norm1));
        for l in [&a.q_proj, &a.k_proj, &a.v_proj, &a.out_proj] {
            w.extend([l.weight.clone(), l.bias.clone()?]);
        }
        w.extend(ln(&self.layer_norm2));
        for l in [&self.mlp.fc1, &self.mlp.fc2] {
            w.extend([l.weight.clone(), l.bias.clone()?]);
        }
        let shape = train_block::BlockShape {
            heads: a.heads,
            scale: a.scale as f32,
            causal,
            eps: self.layer_norm1.eps as f32,
        };
        Some((w, shape))
    }

    fn forward(&self, x: &Tensor, mask: &Mask, mode: Mode) -> Result<Tensor> {
        if self.mlp.kernels.fused_gpu {
            return Ok(self.forward_gpu(x, None, mask, mode, None, None)?.0);
        }
        let h = self
            .self_attn
            .forward(&self.layer_norm1.forward(x, mode)?, mask, mode)?;
        let x = (x + h)?;
        let h = self.mlp.forward(&self.layer_norm2.forward(&x, mode)?)?;
        x + h
    }
}

impl EncoderLayer {
    /// The GPU path: attention as one op over the stacked projection, each residual branch
    /// closed inside its last linear's fused tail. `rows` (flat indices into `[batch * seq]`):
    /// only those rows leave the block, `[rows, dim]`, and only they go through the output
    /// projection and the MLP (the last block of a tower, which pools one row per item).
    ///
    /// With `tails` (inference, [`Encoder::norm_tails`]) each residual add and the layer norm
    /// after it are one kernel: the attention branch's with `layer_norm2`, the MLP branch's
    /// with the next block's `layer_norm1`, whose result is returned beside the block's output
    /// and taken by the next block as `normed` (its `layer_norm1` of `x`).
    fn forward_gpu(
        &self,
        x: &Tensor,
        normed: Option<Tensor>,
        mask: &Mask,
        mode: Mode,
        rows: Option<&Tensor>,
        tails: Option<&LayerTails>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        if mode == Mode::Train && self.mlp.kernels.gpu_train_blocks() && normed.is_none() {
            if let Some(block) = self.gpu_block(mask).filter(|b| b.applies(x)) {
                return Ok((block.forward(x, rows)?, None));
            }
        }
        let a = &self.self_attn;
        let h1 = match normed {
            Some(h) => h,
            None => self.layer_norm1.forward(x, mode)?,
        };
        let ctx = a.context(&h1, mask, mode)?;
        let (ctx, x) = match rows {
            Some(idx) => {
                let d = x.dim(D::Minus1)?;
                let n = x.elem_count() / d.max(1);
                let pick = |y: &Tensor| y.reshape((n, d))?.index_select(idx, 0);
                (pick(&ctx)?, pick(x)?)
            }
            None => (ctx, x.clone()),
        };
        let (x, h) = match tails {
            Some(t) => a.out_proj.forward_residual_norm(&ctx, &x, &t.attn)?,
            None => {
                let x = a.out_proj.forward_residual(&ctx, &x, mode)?;
                let h = self.layer_norm2.forward(&x, mode)?;
                (x, h)
            }
        };
        let m = self.mlp.fc1.forward_act(&h, self.mlp.act, mode)?;
        match tails.and_then(|t| t.mlp.as_ref()) {
            Some(t) => {
                let (x, n) = self.mlp.fc2.forward_residual_norm(&m, &x, t)?;
                Ok((x, Some(n)))
            }
            _ => Ok((self.mlp.fc2.forward_residual(&m, &x, mode)?, None)),
        }
    }
}

impl EncoderLayer {
    /// This block's parts for [`gpu_block::GpuBlock`], the GPU path's block as one training
    /// node; None where a part would not run through the GPU path's ops (a layer norm width
    /// or head width the kernels do not take, a projection without bias).
    fn gpu_block(&self, mask: &Mask) -> Option<gpu_block::GpuBlock> {
        let a = &self.self_attn;
        let norm = |n: &LayerNorm| {
            n.gpu_op.then(|| gpu_block::Norm {
                weight: n.weight.clone(),
                bias: n.bias.clone(),
                eps: n.eps as f32,
            })
        };
        let affine = |l: &Linear| {
            Some(gpu_block::Affine {
                weight: l.weight.clone(),
                bias: l.bias.clone()?,
            })
        };
        if !a.fused || !self.mlp.kernels.fused_gpu {
            return None;
        }
        Some(gpu_block::GpuBlock {
            ln1: norm(&self.layer_norm1)?,
            qkv: [affine(&a.q_proj)?, affine(&a.k_proj)?, affine(&a.v_proj)?],
            attention: super::ops::fused_attention::FusedAttention {
                heads: a.heads,
                scale: a.scale as f32,
                causal: mask.causal(),
                packed: mask.packed.clone(),
                tensor_cores: a.kernels.tc_attention,
            },
            out: affine(&a.out_proj)?,
            ln2: norm(&self.layer_norm2)?,
            fc1: affine(&self.mlp.fc1)?,
            act: super::ops::fused_tail::BiasAct {
                act: tail_act(self.mlp.act),
            },
            fc2: affine(&self.mlp.fc2)?,
            residual_norm: self.mlp.kernels.residual_norm,
        })
    }
}

/// Shape parameters of an encoder stack, shared by the text and vision configs.
#[derive(Debug, Clone, Copy)]
pub struct EncoderShape {
    pub dim: usize,
    pub inter: usize,
    pub heads: usize,
    pub layers: usize,
    pub act: Activation,
    pub eps: f64,
}

impl EncoderShape {
    pub fn of_text(c: &TextConfig) -> Self {
        Self {
            dim: c.hidden_size,
            inter: c.intermediate_size,
            heads: c.num_attention_heads,
            layers: c.num_hidden_layers,
            act: c.hidden_act,
            eps: c.layer_norm_eps,
        }
    }

    pub fn of_vision(c: &VisionConfig) -> Self {
        Self {
            dim: c.hidden_size,
            inter: c.intermediate_size,
            heads: c.num_attention_heads,
            layers: c.num_hidden_layers,
            act: c.hidden_act,
            eps: c.layer_norm_eps,
        }
    }
}

/// One residual branch's closing for [`super::ops::fused_norm::ResidualNorm`]: the closing
/// linear's bias stacked with the following layer norm's weight and bias (`[3, dim]`), and that
/// norm's epsilon.
#[derive(Debug, Clone)]
struct NormTail {
    params: Tensor,
    eps: f64,
}

impl NormTail {
    /// None where the closing linear has no bias (no CLIP checkpoint lacks one).
    fn new(bias: &Option<Tensor>, norm: &LayerNorm) -> Result<Option<Self>> {
        let Some(b) = bias else { return Ok(None) };
        Ok(Some(Self {
            params: Tensor::stack(&[b, &norm.weight, &norm.bias], 0)?,
            eps: norm.eps,
        }))
    }
}

/// A block's two closings: the attention branch's with its `layer_norm2`, and (all blocks but
/// the last) the MLP branch's with the next block's `layer_norm1`.
#[derive(Debug, Clone)]
struct LayerTails {
    attn: NormTail,
    mlp: Option<NormTail>,
}

/// The stack of transformer blocks, `encoder.layers.N.*` in transformers' names.
#[derive(Debug, Clone)]
pub struct Encoder {
    layers: Vec<EncoderLayer>,
    kernels: Kernels,
    /// [`LayerTails`] per block for inference on the GPU path, made on first use (copies of
    /// the weights: forgotten with [`Encoder::forget_stacked`]); empty where they do not apply.
    tails: Arc<OnceLock<Vec<LayerTails>>>,
}

impl Encoder {
    /// The residual-norm parameters of every block, for inference on the GPU path where the
    /// kernels use it ([`Kernels::residual_norm`]), the kernel takes the width and every
    /// closing linear has a bias; None elsewhere.
    fn norm_tails(&self) -> Result<Option<&[LayerTails]>> {
        let Some(first) = self.layers.first() else {
            return Ok(None);
        };
        let dim = first.layer_norm1.weight.dim(0)?;
        let k = &self.kernels;
        if !k.fused_gpu || !k.residual_norm || !super::kernels::cuda::layernorm::norm_supports(dim)
        {
            return Ok(None);
        }
        if let Some(t) = self.tails.get() {
            return Ok((!t.is_empty()).then_some(t.as_slice()));
        }
        let l = &self.layers;
        let tails = (0..l.len())
            .map(|i| {
                let attn = NormTail::new(&l[i].self_attn.out_proj.bias, &l[i].layer_norm2)?;
                // None: a closing that cannot be fused; Some(None): the last block's MLP.
                let mlp = match l.get(i + 1) {
                    Some(next) => NormTail::new(&l[i].mlp.fc2.bias, &next.layer_norm1)?.map(Some),
                    None => Some(None),
                };
                Ok(attn.zip(mlp).map(|(attn, mlp)| LayerTails { attn, mlp }))
            })
            .collect::<Result<Vec<Option<LayerTails>>>>()?
            .into_iter()
            .collect::<Option<Vec<_>>>()
            .unwrap_or_default();
        let t = self.tails.get_or_init(|| tails);
        Ok((!t.is_empty()).then_some(t.as_slice()))
    }

    /// [`Attention::release_stacked`] for every layer; the bytes released.
    pub(crate) fn release_stacked(&mut self) -> Result<usize> {
        let mut bytes = 0;
        for l in &mut self.layers {
            bytes += l.self_attn.release_stacked()?;
        }
        Ok(bytes)
    }

    /// Forgets the attention layers' stacked projections and the residual-norm parameters
    /// (in this clone only).
    pub(crate) fn forget_stacked(&mut self) {
        for l in &mut self.layers {
            l.self_attn.forget_stacked();
        }
        self.tails = Arc::default();
    }

    /// Every linear layer, for [`Linear::release_packed`].
    pub(crate) fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut out = Vec::new();
        for l in &mut self.layers {
            out.extend(l.self_attn.linears_mut());
            out.extend(l.mlp.linears_mut());
        }
        out
    }

    pub fn new(vb: VarBuilder, s: EncoderShape, kernels: Kernels) -> Result<Self> {
        let vb = vb.pp("layers");
        let layers = (0..s.layers)
            .map(|i| {
                let vb = vb.pp(i);
                let k = kernels;
                Ok(EncoderLayer {
                    layer_norm1: LayerNorm::new(vb.pp("layer_norm1"), s.dim, s.eps, k)?,
                    self_attn: Attention::new(vb.pp("self_attn"), s.dim, s.heads, k)?,
                    layer_norm2: LayerNorm::new(vb.pp("layer_norm2"), s.dim, s.eps, k)?,
                    mlp: Mlp::new(vb.pp("mlp"), s.dim, s.inter, s.act, k)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            kernels,
            tails: Arc::default(),
        })
    }

    /// Whether [`Encoder::forward_pooled`] takes packed sequences in this model: the kernels
    /// ask for packed captions ([`Kernels::packed_text`]) and every path it may run goes
    /// through clipft's attention kernels, which honour them (the fused CPU kernels and
    /// training ops, or the GPU path's attention op on every layer); candle's composed
    /// attention takes only uniform batches.
    pub fn takes_packed(&self) -> bool {
        let k = &self.kernels;
        k.packed_text
            && (k.fused_cpu
                || (k.fused_gpu && self.layers.iter().all(|l| l.self_attn.runs_fused())))
    }

    /// Runs every block over `x` and returns the hidden states of the rows `pooled` names
    /// (`(item, position)` pairs), `[pooled.len(), dim]`: the towers only use one row per item,
    /// so the fused paths compute the last block's queries, attention output and MLP for those
    /// rows alone. `x` is `[batch, seq, dim]`, or with `packed` (where
    /// [`Encoder::takes_packed`]) `[rows, dim]` holding those sequences end to end. `causal`
    /// masks later positions (text).
    pub fn forward_pooled(
        &self,
        x: &Tensor,
        causal: bool,
        pooled: &[(usize, usize)],
        packed: Option<&Arc<PackedSeqs>>,
        mode: Mode,
    ) -> Result<Tensor> {
        let (seqs, d) = match packed {
            Some(p) => {
                let (rows, d) = x.dims2()?;
                if rows != p.rows() {
                    candle_core::bail!("{rows} rows for a packed batch of {}", p.rows());
                }
                (p.seqs(), d)
            }
            None => {
                let (batch, seq, d) = x.dims3()?;
                (Seqs::Uniform { batch, seq }, d)
            }
        };
        let idx = pooled
            .iter()
            .map(|&(i, p)| seqs.row(i, p).map(|r| r as u32))
            .collect::<Result<Vec<u32>>>()?;
        // The fused kernels cover quick_gelu (OpenAI checkpoints) and gelu (OpenCLIP/LAION)
        // alike. The model's kernels decide, as they decide for `Linear::release_packed`, which
        // drops the f32 weights that candle's ops would need.
        if mode == Mode::Inference && self.kernels.fused_cpu {
            return self.forward_fused_cpu(x, seqs, d, causal, pooled);
        }
        if mode == Mode::Train && self.kernels.cpu_train_blocks() {
            let g = cpu_block::Geometry { seqs, d, causal };
            if let Some(out) = self.forward_train_blocks(x, g, pooled, packed)? {
                return Ok(out);
            }
        }
        let mask = Mask::new(causal, seqs.max_len(), x.dtype(), x.device(), packed);
        let idx = Tensor::from_vec(idx, pooled.len(), x.device())?;
        let mut x = x.clone();
        if self.kernels.fused_gpu {
            let tails = match mode {
                Mode::Inference => self.norm_tails()?,
                Mode::Train => None,
            };
            if let Some((last, rest)) = self.layers.split_last() {
                let mut normed = None;
                for (i, layer) in rest.iter().enumerate() {
                    let t = tails.map(|t| &t[i]);
                    (x, normed) = layer.forward_gpu(&x, normed, &mask, mode, None, t)?;
                }
                let t = tails.and_then(|t| t.last());
                return Ok(last.forward_gpu(&x, normed, &mask, mode, Some(&idx), t)?.0);
            }
        }
        for layer in &self.layers {
            x = layer.forward(&x, &mask, mode)?;
        }
        let rows = x.elem_count() / d.max(1);
        x.reshape((rows, d))?.index_select(&idx, 0)
    }

    /// Training through one [`train_block::BlockOp`] per block, the last one computing only the
    /// pooled rows; None where the block op does not apply (see [`train_block::applies`]).
    /// Leading blocks that are frozen over an input out of the graph (`--freeze` of the
    /// embeddings and the lower layers) train nothing and pass no gradient: they run as in
    /// inference, through the fused CPU blocks, keeping nothing for the backward pass.
    fn forward_train_blocks(
        &self,
        x: &Tensor,
        g: cpu_block::Geometry,
        pooled: &[(usize, usize)],
        packed: Option<&Arc<PackedSeqs>>,
    ) -> Result<Option<Tensor>> {
        let Some(mut blocks) = self
            .layers
            .iter()
            .map(|l| l.block(g.causal))
            .collect::<Option<Vec<_>>>()
        else {
            return Ok(None);
        };
        let frozen = match x.track_op() {
            true => 0,
            false => blocks
                .iter()
                .take_while(|(w, _)| w.iter().all(|t| !t.track_op()))
                .count(),
        };
        let (below, trained) = self.layers.split_at(frozen);
        blocks.drain(..frozen);
        let usable = !blocks.is_empty()
            && trained.iter().all(|l| l.mlp.act == Activation::QuickGelu)
            && blocks.iter().all(|(w, _)| train_block::applies(w));
        if !usable {
            return Ok(None);
        }
        let last = blocks.len() - 1;
        let mut x = x.contiguous()?;
        if !below.is_empty() {
            let mut h = cpu::to_buf(&x)?;
            for layer in below {
                h = layer.with_block_weights(|w| cpu_block::block(h, g, w, None))?;
            }
            x = cpu::to_tensor(&h, x.dims())?;
        }
        for (i, (weights, shape)) in blocks.into_iter().enumerate() {
            let rows = (i == last).then(|| pooled.to_vec());
            x = train_block::BlockOp::new(weights, shape, rows, packed.cloned(), self.kernels.amx)
                .apply(&x)?;
        }
        Ok(Some(x))
    }

    /// Inference through [`cpu_block::block`], one block at a time.
    fn forward_fused_cpu(
        &self,
        x: &Tensor,
        seqs: Seqs,
        d: usize,
        causal: bool,
        pooled: &[(usize, usize)],
    ) -> Result<Tensor> {
        let mut h = cpu::to_buf(x)?;
        let Some((last, rest)) = self.layers.split_last() else {
            let rows = pooled
                .iter()
                .map(|&(i, p)| seqs.row(i, p))
                .collect::<Result<Vec<usize>>>()?;
            return cpu::to_tensor(&cpu::gather_rows(&h, d, &rows), &[pooled.len(), d]);
        };
        let g = cpu_block::Geometry { seqs, d, causal };
        for layer in rest {
            h = layer.with_block_weights(|w| cpu_block::block(h, g, w, None))?;
        }
        let out = last.with_block_weights(|w| cpu_block::block(h, g, w, Some(pooled)))?;
        cpu::to_tensor(&out, &[pooled.len(), d])
    }
}

impl EncoderLayer {
    /// This block's weights as the CPU block kernel takes them, borrowed for `f` (packing the
    /// linear weights for AMX on first use where the model multiplies on AMX).
    fn with_block_weights<R>(
        &self,
        f: impl FnOnce(&cpu_block::BlockWeights) -> Result<R>,
    ) -> Result<R> {
        let a = &self.self_attn;
        let linears = [
            &a.q_proj,
            &a.k_proj,
            &a.v_proj,
            &a.out_proj,
            &self.mlp.fc1,
            &self.mlp.fc2,
        ];
        let norms = [&self.layer_norm1, &self.layer_norm2];
        // Every tensor in one list: norms' weight and bias, then each linear's weight and bias
        // (a bias-less linear lends its weight twice and reads no bias).
        let mut ts: Vec<&Tensor> = Vec::with_capacity(16);
        for n in norms {
            ts.extend([&n.weight, &n.bias]);
        }
        for l in linears {
            ts.extend([&l.weight, l.bias.as_ref().unwrap_or(&l.weight)]);
        }
        cpu::with_slices(&ts, |s| {
            let norm = |i: usize| cpu_block::NormWeights {
                w: s[2 * i],
                b: s[2 * i + 1],
                eps: norms[i].eps as f32,
            };
            let lin = |i: usize| {
                let l = linears[i];
                let w = s[4 + 2 * i];
                cpu_block::LinearWeights {
                    w,
                    b: l.bias.as_ref().map(|_| s[5 + 2 * i]),
                    n: l.dims.0,
                    amx: l.packed(w),
                }
            };
            let act: fn(&mut [f32]) = match self.mlp.act {
                Activation::QuickGelu => cpu::quick_gelu,
                Activation::Gelu => cpu::gelu_erf,
            };
            f(&cpu_block::BlockWeights {
                ln1: norm(0),
                q: lin(0),
                k: lin(1),
                v: lin(2),
                out: lin(3),
                ln2: norm(1),
                fc1: lin(4),
                fc2: lin(5),
                act,
                heads: a.heads,
                scale: a.scale as f32,
            })
        })
    }
}

/// Which keys each query sees in one pass: the text tower's causal flag the fused attention ops
/// take, and the additive `[t, t]` tensor candle's composed attention adds to its scores, made
/// (and uploaded to the device) only if a layer asks for it; for packed sequences, their
/// offsets (a query sees only its own sequence).
struct Mask {
    causal: bool,
    t: usize,
    dtype: DType,
    device: candle_core::Device,
    tensor: OnceLock<Tensor>,
    packed: Option<Arc<PackedSeqs>>,
}

impl Mask {
    fn new(
        causal: bool,
        t: usize,
        dtype: DType,
        device: &candle_core::Device,
        packed: Option<&Arc<PackedSeqs>>,
    ) -> Self {
        Self {
            causal,
            t,
            dtype,
            device: device.clone(),
            tensor: OnceLock::new(),
            packed: packed.cloned(),
        }
    }

    fn causal(&self) -> bool {
        self.causal
    }

    /// The additive mask; None without one (vision).
    fn tensor(&self) -> Result<Option<&Tensor>> {
        if !self.causal {
            return Ok(None);
        }
        if self.tensor.get().is_none() {
            let _ = self
                .tensor
                .set(causal_mask(self.t, self.dtype, &self.device)?);
        }
        Ok(self.tensor.get())
    }
}

/// `[t, t]` additive mask: 0 on and below the diagonal, the dtype's minimum above it.
fn causal_mask(t: usize, dtype: DType, device: &candle_core::Device) -> Result<Tensor> {
    let min = match dtype {
        DType::F16 => -65504.0f32,
        DType::BF16 => -3.38e38f32,
        _ => f32::MIN,
    };
    let data: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j > i { min } else { 0.0 }))
        .collect();
    Tensor::from_vec(data, (t, t), device)?.to_dtype(dtype)
}
