//! The CLIP pair: whichever towers were loaded, plus `logit_scale`.

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

use super::config::ClipConfig;
use super::layers::Mode;
use super::policy::Kernels;
use super::text::{TextBatch, TextTower};
use super::vision::VisionTower;

pub use super::config::Towers;

/// One CLIP model definition, used for serving and for training.
#[derive(Debug, Clone)]
pub struct Clip {
    pub text: Option<TextTower>,
    pub vision: Option<VisionTower>,
    /// Log of the contrastive temperature's inverse; `None` when the checkpoint has none (a
    /// single-tower export) and it was not needed.
    pub logit_scale: Option<Tensor>,
    pub config: ClipConfig,
    /// The kernels every layer was built to run (see [`Kernels`]).
    pub kernels: Kernels,
}

impl Clip {
    /// For serving only: packs every linear weight for AMX and releases the f32 copies (see
    /// [`super::layers::Linear::release_packed`]); on the fused GPU path, stacks the attention
    /// projections and releases the separate ones. Returns the bytes released; 0 where neither
    /// applies. The model can no longer be trained afterwards.
    pub fn release_packed_weights(&mut self) -> candle_core::Result<usize> {
        use rayon::prelude::*;
        let mut stacked = 0;
        if let Some(t) = &mut self.text {
            stacked += t.release_stacked()?;
        }
        if let Some(v) = &mut self.vision {
            stacked += v.release_stacked()?;
        }
        let mut linears = Vec::new();
        if let Some(t) = &mut self.text {
            linears.extend(t.linears_mut());
        }
        if let Some(v) = &mut self.vision {
            v.drop_training_kernel();
            linears.extend(v.linears_mut());
        }
        // Packing is a pass over every weight: spread it over the cores (startup time).
        let packed = linears
            .into_par_iter()
            .map(|l| l.release_packed())
            .try_reduce(|| 0, |a, b| Ok(a + b))?;
        Ok(stacked + packed)
    }

    /// A copy sharing the weights but not the copies the fused paths made of them (AMX
    /// packing, stacked projections), so it sees weights changed in place since (training
    /// updates them between evaluations).
    pub fn with_fresh_packing(&self) -> Self {
        let mut c = self.clone();
        if let Some(t) = &mut c.text {
            t.forget_derived();
        }
        if let Some(v) = &mut c.vision {
            v.forget_derived();
        }
        c
    }

    /// Builds the requested towers from `vb`. Missing configs for a requested tower are an error;
    /// `logit_scale` is read when present and otherwise initialised from the config, so that
    /// training can start from a checkpoint that lacks it. `kernels` is decided by the caller
    /// for `vb`'s device and dtype ([`Kernels::decide`]) and carried by every layer.
    pub fn new(
        vb: VarBuilder,
        config: &ClipConfig,
        towers: Towers,
        kernels: Kernels,
    ) -> Result<Self> {
        let proj = config.projection_dim;
        let text = match (towers.text, &config.text) {
            (true, Some(c)) => Some(TextTower::new(vb.clone(), c, proj, kernels)?),
            (true, None) => candle_core::bail!("the checkpoint's config has no text tower"),
            _ => None,
        };
        let vision = match (towers.vision, &config.vision) {
            (true, Some(c)) => Some(VisionTower::new(vb.clone(), c, proj, kernels)?),
            (true, None) => candle_core::bail!("the checkpoint's config has no vision tower"),
            _ => None,
        };
        let logit_scale = if vb.contains_tensor("logit_scale") {
            vb.get((), "logit_scale")?
        } else {
            // A VarMap creates the variable (so training learns it); a read-only checkpoint
            // without the tensor gets the config's initial value as a constant.
            let init = config.logit_scale_init_value;
            match vb.get_with_hints((), "logit_scale", candle_nn::Init::Const(init)) {
                Ok(t) => t,
                Err(_) => Tensor::new(init as f32, vb.device())?.to_dtype(vb.dtype())?,
            }
        };
        let logit_scale = Some(logit_scale);
        Ok(Self {
            text,
            vision,
            logit_scale,
            config: config.clone(),
            kernels,
        })
    }

    pub fn output_dim(&self) -> usize {
        self.config.projection_dim
    }

    pub fn text_features(&self, batch: &TextBatch, mode: Mode) -> Result<Tensor> {
        self.text_features_modes(batch, mode, mode)
    }

    pub fn image_features(&self, pixel_values: &Tensor, mode: Mode) -> Result<Tensor> {
        self.image_features_modes(pixel_values, mode, mode)
    }

    /// The text features with the tower in `body` mode and its projection in `head` mode
    /// (training with a frozen text tower: `body` inference).
    pub fn text_features_modes(&self, batch: &TextBatch, body: Mode, head: Mode) -> Result<Tensor> {
        match &self.text {
            Some(t) => t.forward_modes(batch, body, head),
            None => candle_core::bail!("this model was loaded without its text tower"),
        }
    }

    /// The image features with the tower in `body` mode and its projection in `head` mode.
    pub fn image_features_modes(
        &self,
        pixel_values: &Tensor,
        body: Mode,
        head: Mode,
    ) -> Result<Tensor> {
        match &self.vision {
            Some(v) => v.forward_modes(pixel_values, body, head),
            None => candle_core::bail!("this model was loaded without its vision tower"),
        }
    }

    /// The dtype the weights are held in.
    pub fn dtype(&self) -> DType {
        self.logit_scale
            .as_ref()
            .map(|t| t.dtype())
            .unwrap_or(DType::F32)
    }

    pub fn device(&self) -> Option<&Device> {
        self.logit_scale.as_ref().map(|t| t.device())
    }
}
