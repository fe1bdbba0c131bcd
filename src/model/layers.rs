//! The building blocks both towers share: linear, layer norm, attention, MLP, encoder.
//!
//! Every block takes a [`Mode`]. Candle's fused kernels (`layer_norm`, `softmax_last_dim`) record no
//! backward, so a model built from them trains with silently missing gradients. Training therefore
//! runs composed, differentiable ops; inference runs the fused kernels, which are faster. The
//! weights and the module tree are the same in both modes: there is one model definition.

use candle_core::{DType, Result, Tensor, D};
use candle_nn::VarBuilder;

use super::config::Activation;

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
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(vb: VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let in_dim = dims[dims.len() - 1];
        let rows = x.elem_count() / in_dim.max(1);
        let x2 = x.reshape((rows, in_dim))?;
        let mut y = x2.matmul(&self.weight.t()?)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        let mut out_dims = dims.to_vec();
        let last = out_dims.len() - 1;
        out_dims[last] = self.weight.dim(0)?;
        y.reshape(out_dims)
    }
}

/// Layer normalisation over the last dimension, fused for inference and composed for training.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            bias: vb.get(dim, "bias")?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        match mode {
            Mode::Inference => candle_nn::ops::layer_norm(
                &x.contiguous()?,
                &self.weight,
                &self.bias,
                self.eps as f32,
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

fn activate(x: &Tensor, act: Activation) -> Result<Tensor> {
    match act {
        Activation::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
        Activation::Gelu => x.gelu_erf(),
    }
}

fn softmax_last(x: &Tensor, mode: Mode) -> Result<Tensor> {
    match mode {
        Mode::Inference => candle_nn::ops::softmax_last_dim(x),
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
}

impl Attention {
    pub fn new(vb: VarBuilder, dim: usize, heads: usize) -> Result<Self> {
        let head_dim = dim / heads;
        Ok(Self {
            q_proj: Linear::new(vb.pp("q_proj"), dim, dim, true)?,
            k_proj: Linear::new(vb.pp("k_proj"), dim, dim, true)?,
            v_proj: Linear::new(vb.pp("v_proj"), dim, dim, true)?,
            out_proj: Linear::new(vb.pp("out_proj"), dim, dim, true)?,
            heads,
            head_dim,
            scale: (head_dim as f64).powf(-0.5),
        })
    }

    /// `mask`, when given, is added to the attention scores (shape `[T, T]`, broadcast over batch
    /// and heads): the text tower's causal mask.
    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>, mode: Mode) -> Result<Tensor> {
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
        if let Some(m) = mask {
            scores = scores.broadcast_add(m)?;
        }
        let probs = softmax_last(&scores, mode)?;
        let ctx = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, d))?;
        self.out_proj.forward(&ctx)
    }
}

/// The position-wise feed-forward block.
#[derive(Debug, Clone)]
pub struct Mlp {
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl Mlp {
    pub fn new(vb: VarBuilder, dim: usize, inter: usize, act: Activation) -> Result<Self> {
        Ok(Self {
            fc1: Linear::new(vb.pp("fc1"), dim, inter, true)?,
            fc2: Linear::new(vb.pp("fc2"), inter, dim, true)?,
            act,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.fc2
            .forward(&activate(&self.fc1.forward(x)?, self.act)?)
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
    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>, mode: Mode) -> Result<Tensor> {
        let h = self
            .self_attn
            .forward(&self.layer_norm1.forward(x, mode)?, mask, mode)?;
        let x = (x + h)?;
        let h = self.mlp.forward(&self.layer_norm2.forward(&x, mode)?)?;
        x + h
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

/// The stack of transformer blocks, `encoder.layers.N.*` in transformers' names.
#[derive(Debug, Clone)]
pub struct Encoder {
    layers: Vec<EncoderLayer>,
}

impl Encoder {
    pub fn new(vb: VarBuilder, s: EncoderShape) -> Result<Self> {
        let vb = vb.pp("layers");
        let layers = (0..s.layers)
            .map(|i| {
                let vb = vb.pp(i);
                Ok(EncoderLayer {
                    layer_norm1: LayerNorm::new(vb.pp("layer_norm1"), s.dim, s.eps)?,
                    self_attn: Attention::new(vb.pp("self_attn"), s.dim, s.heads)?,
                    layer_norm2: LayerNorm::new(vb.pp("layer_norm2"), s.dim, s.eps)?,
                    mlp: Mlp::new(vb.pp("mlp"), s.dim, s.inter, s.act)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers })
    }

    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>, mode: Mode) -> Result<Tensor> {
        let mut x = x.clone();
        for layer in &self.layers {
            x = layer.forward(&x, mask, mode)?;
        }
        Ok(x)
    }
}
