//! The vision tower: patch embedding, class token, positions, pre-LN, encoder, post-LN on the
//! class token, visual projection.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::config::VisionConfig;
use super::layers::{Encoder, EncoderShape, LayerNorm, Linear, Mode};
use super::ops::embed::{ClassPositions, UnfoldPatches};
use super::ops::gpu_block::Norm;
use super::policy::Kernels;

/// `vision_model.*` plus `visual_projection`.
#[derive(Debug, Clone)]
pub struct VisionTower {
    /// The patch convolution's kernel flattened to `[hidden, channels * patch * patch]`: with
    /// stride equal to the kernel size the convolution is one matrix product over unfolded
    /// patches, which is faster and has a cheaper backward than `conv2d`.
    patch_embedding: Linear,
    /// The same kernel as `[hidden, channels, patch, patch]`, sharing its storage: the variable
    /// itself in training (the flattened one is a reshape of it), which the fused training op
    /// updates. None once a serving process released the f32 weights.
    patch_kernel: Option<Tensor>,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    encoder: Encoder,
    post_layernorm: LayerNorm,
    projection: Linear,
    config: VisionConfig,
    kernels: Kernels,
}

impl VisionTower {
    /// Forgets every copy made of the weights (AMX packing of every linear layer, the
    /// encoder's stacked projections), in this clone only: for weights changed in place since.
    pub(crate) fn forget_derived(&mut self) {
        self.encoder.forget_stacked();
        self.linears_mut()
            .into_iter()
            .for_each(Linear::forget_packed);
    }

    /// The encoder's separate q, k and v weights, for serving on the fused GPU path
    /// ([`super::layers::Attention::release_stacked`]); the bytes released.
    pub(crate) fn release_stacked(&mut self) -> Result<usize> {
        self.encoder.release_stacked()
    }

    /// Every linear layer, for [`Linear::release_packed`].
    pub(crate) fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut out = self.encoder.linears_mut();
        out.push(&mut self.patch_embedding);
        out.push(&mut self.projection);
        out
    }

    /// Drops the training view of the patch kernel, which would keep its f32 data alive after
    /// [`Linear::release_packed`] (serving only).
    pub(crate) fn drop_training_kernel(&mut self) {
        self.patch_kernel = None;
    }

    pub fn new(
        vb: VarBuilder,
        c: &VisionConfig,
        projection_dim: usize,
        kernels: Kernels,
    ) -> Result<Self> {
        let m = vb.pp("vision_model");
        let e = m.pp("embeddings");
        let p = c.patch_size;
        let patch_kernel = e
            .pp("patch_embedding")
            .get((c.hidden_size, c.num_channels, p, p), "weight")?;
        let patch_weight = patch_kernel.reshape((c.hidden_size, c.num_channels * p * p))?;
        let positions = c.grid() * c.grid() + 1;
        let shape = EncoderShape::of_vision(c);
        Ok(Self {
            patch_embedding: Linear::from_weight(patch_weight, None, kernels)?,
            patch_kernel: Some(patch_kernel),
            class_embedding: e.get(c.hidden_size, "class_embedding")?,
            position_embedding: e
                .pp("position_embedding")
                .get((positions, c.hidden_size), "weight")?,
            pre_layrnorm: LayerNorm::new(
                m.pp("pre_layrnorm"),
                c.hidden_size,
                c.layer_norm_eps,
                kernels,
            )?,
            encoder: Encoder::new(m.pp("encoder"), shape, kernels)?,
            post_layernorm: LayerNorm::new(
                m.pp("post_layernorm"),
                c.hidden_size,
                c.layer_norm_eps,
                kernels,
            )?,
            projection: Linear::new(
                vb.pp("visual_projection"),
                c.hidden_size,
                projection_dim,
                false,
                kernels,
            )?,
            config: c.clone(),
            kernels,
        })
    }

    pub fn config(&self) -> &VisionConfig {
        &self.config
    }

    /// `pixel_values` is `[batch, channels, size, size]`, already normalised; returns the projected
    /// (not normalised) image features `[batch, projection_dim]`.
    pub fn forward(&self, pixel_values: &Tensor, mode: Mode) -> Result<Tensor> {
        self.forward_modes(pixel_values, mode, mode)
    }

    /// [`VisionTower::forward`] with the tower (embeddings, encoder, norms) in `body` mode and
    /// the projection in `head` mode (see `TextTower::forward_modes`).
    pub fn forward_modes(&self, pixel_values: &Tensor, body: Mode, head: Mode) -> Result<Tensor> {
        let mode = body;
        let c = &self.config;
        let (b, ch, h, w) = pixel_values.dims4()?;
        if ch != c.num_channels || h != c.image_size || w != c.image_size {
            candle_core::bail!(
                "pixel_values must be [batch, {}, {}, {}], got [{b}, {ch}, {h}, {w}]",
                c.num_channels,
                c.image_size,
                c.image_size
            );
        }
        let (p, g, d) = (c.patch_size, c.grid(), c.hidden_size);
        let x = pixel_values.to_dtype(self.patch_embedding.weight().dtype())?;
        let (lnw, lnb, eps) = self.pre_layrnorm.parts();
        let fused = self.patch_kernel.as_ref().filter(|k| {
            mode == Mode::Train
                && self.kernels.cpu_train_blocks()
                && super::train_embed::applies(&[
                    k,
                    &self.class_embedding,
                    &self.position_embedding,
                    lnw,
                    lnb,
                ])
        });
        let x = if let Some(kernel) = fused {
            // Unfold, product, class token, positions and pre-LN in one op (see `train_embed`).
            let op = super::train_embed::PatchEmbedOp::new(
                self.class_embedding.clone(),
                self.position_embedding.clone(),
                lnw.clone(),
                lnb.clone(),
                eps as f32,
                self.kernels.amx,
            );
            kernel.apply_op2(&x.contiguous()?, op)?
        } else {
            let ours = self.kernels.fused_gpu && self.kernels.embed;
            let patches = if ours {
                x.contiguous()?
                    .apply_op1_no_bwd(&UnfoldPatches { patch: p })?
            } else {
                // [b, c, g, p, g, p] -> [b, g, g, c, p, p]: each row is one patch in the
                // kernel's layout.
                x.reshape((b, ch, g, p, g, p))?
                    .permute((0, 2, 4, 1, 3, 5))?
                    .contiguous()?
                    .reshape((b * g * g, ch * p * p))?
            };
            let embedded =
                self.patch_embedding
                    .forward_t(&patches, mode)?
                    .reshape((b, g * g, d))?;
            if ours {
                // Class token and positions as one op, with the pre-LN in inference (see
                // `ops::embed`).
                let (cls, pos) = (&self.class_embedding, &self.position_embedding);
                match mode {
                    Mode::Train => {
                        let op = ClassPositions { norm: None };
                        self.pre_layrnorm
                            .forward(&embedded.apply_op3(cls, pos, op)?, mode)?
                    }
                    Mode::Inference => {
                        let norm = Norm {
                            weight: lnw.clone(),
                            bias: lnb.clone(),
                            eps: eps as f32,
                        };
                        embedded.apply_op3_no_bwd(cls, pos, &ClassPositions { norm: Some(norm) })?
                    }
                }
            } else {
                let cls = self
                    .class_embedding
                    .reshape((1, 1, d))?
                    .broadcast_as((b, 1, d))?;
                let x =
                    Tensor::cat(&[&cls, &embedded], 1)?.broadcast_add(&self.position_embedding)?;
                self.pre_layrnorm.forward(&x, mode)?
            }
        };
        let cls_rows: Vec<(usize, usize)> = (0..b).map(|i| (i, 0)).collect();
        let pooled = self
            .encoder
            .forward_pooled(&x, false, &cls_rows, None, mode)?;
        let pooled = self.post_layernorm.forward(&pooled, mode)?;
        self.projection.forward_t(&pooled, head)
    }
}
