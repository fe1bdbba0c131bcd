//! The training step shared by `clipft fit` and the trainer service: the model in training mode
//! (candle's differentiable graph, every weight a variable), CLIPLoss, backward, the optimiser
//! step in place, and `logit_scale` clamped to [0, ln 100] as OpenCLIP and Finetuner do.
//!
//! Mixed precision (`--dtype bf16|f16`, the default on GPUs): the variables stay f32 (the master
//! weights the optimiser updates, checkpoints and artifacts hold); the passes run on compute
//! copies of them in bf16/f16, variables themselves, made once (`PassModel`). Their
//! gradients are what the optimiser reads, and its update rewrites them from the f32 weights
//! (on the GPU in the same launch), so a step casts no weight and no gradient: llm.c's
//! layout. The values are those of casting the f32 weights every step (the same rounding, the
//! same gradients). The loss and `logit_scale` stay f32; f16 adds dynamic loss scaling
//! ([`super::optim::LossScale`]).

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

use super::loss::clip_loss;
use super::optim::{Optimizer, OptimizerParams};
use crate::model::{
    Clip, ClipConfig, ClipTokenizer, ImageConfig, ImagePreprocessor, Mode, ModelError, ModelFiles,
    TextBatch, Towers,
};

/// Upper bound of `logit_scale` after every step (a temperature of 1/100).
pub const MAX_LOGIT_SCALE: f64 = 4.605_170_185_988_092; // ln(100)

/// The compute dtype `spec` (`--dtype`) means on `dev` for training: auto is f32 on the CPU (its
/// half-precision kernels are slower) and bf16 elsewhere (f32's range, so no loss scaling).
pub fn training_dtype(spec: &str, dev: &Device) -> Result<DType, ModelError> {
    match spec {
        "auto" if dev.is_cpu() => Ok(DType::F32),
        "auto" => Ok(DType::BF16),
        s => crate::model::device::parse_dtype(s, dev),
    }
}

/// Seconds of one training step's phases, each waited for on the device.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct StepPhases {
    /// Both towers, the embeddings and the loss.
    pub forward: f64,
    /// Every gradient.
    pub backward: f64,
    /// Gradient norm and loss-scale checks where asked for, and the update of every weight.
    pub optimizer: f64,
}

/// The model the training passes run on, where it is not [`TrainModel::clip`] itself: over the
/// bf16/f16 copies of the f32 weights (mixed precision), and with the frozen weights as plain
/// tensors, so candle computes no gradient for them (nor, below a frozen backbone, any
/// backward at all). The optimiser rewrites the copies after each update; whoever sets the f32
/// weights otherwise calls [`TrainModel::sync_compute_copies`].
struct PassModel {
    /// The 16-bit copies by weight name (none in f32): every weight but `logit_scale`, which
    /// the loss reads in f32. Frozen ones too (variables, so they can be synced), though the
    /// model reads them detached.
    copies: std::collections::HashMap<String, candle_core::Var>,
    clip: Clip,
}

/// A CLIP whose weights are variables, with its input processing.
pub struct TrainModel {
    pub clip: Clip,
    pub varmap: VarMap,
    pub config: ClipConfig,
    /// The dtype the forward and backward passes compute in (weights stay f32).
    pub compute: DType,
    /// With a 16-bit `compute` or frozen weights: what the passes run on.
    pass: Option<PassModel>,
    /// Name prefixes (or `backbone`) of the weights training leaves alone ([`TrainModel::freeze`]).
    freeze: Vec<String>,
    /// Whether every weight of the text tower, and of the vision tower, below its projection is
    /// frozen: the training passes then run that tower's body through the inference kernels.
    frozen_bodies: [bool; 2],
    pub tokenizer: ClipTokenizer,
    pub images: ImagePreprocessor,
    pub device: Device,
}

impl TrainModel {
    /// Both towers from a checkpoint, as f32 variables on `device`.
    pub fn load(files: &ModelFiles, device: &Device) -> Result<Self, ModelError> {
        let config = ClipConfig::from_file(&files.config)?;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let kernels = crate::model::policy::Kernels::decide(device, DType::F32);
        let clip = Clip::new(vb, &config, Towers::ALL, kernels)?;
        let weights = files.var_builder(Towers::ALL, DType::F32, device)?;
        {
            let vars = varmap.data().lock().map_err(|_| ModelError::InvalidInput {
                msg: "poisoned".into(),
            })?;
            for (name, var) in vars.iter() {
                // A checkpoint without `logit_scale` keeps the config's initial value.
                if name == "logit_scale" && !weights.contains_tensor(name) {
                    continue;
                }
                let t =
                    weights
                        .get(var.shape().clone(), name)
                        .map_err(|e| ModelError::Weights {
                            files: files.source.clone(),
                            msg: format!("{name}: {e}"),
                        })?;
                var.set(&t)?;
            }
        }
        let text = clip
            .text
            .as_ref()
            .map(|t| t.config().max_position_embeddings)
            .unwrap_or(77);
        let tokenizer = ClipTokenizer::from_file(
            files
                .tokenizer
                .as_ref()
                .ok_or_else(|| ModelError::NotFound {
                    what: files.source.clone(),
                    msg: "has no tokenizer.json".into(),
                })?,
            text,
        )?;
        let images = ImagePreprocessor::new(match &config.vision {
            Some(v) => crate::model::image_config(files, v)?,
            None => ImageConfig::default(),
        });
        Ok(Self {
            clip,
            varmap,
            config,
            compute: DType::F32,
            pass: None,
            freeze: Vec::new(),
            frozen_bodies: [false; 2],
            tokenizer,
            images,
            device: device.clone(),
        })
    }

    /// Every variable with its checkpoint name, sorted by name (a stable order for optimisers
    /// and checkpoints).
    pub fn named_vars(&self) -> Vec<(String, candle_core::Var)> {
        let vars = self.varmap.data().lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<(String, candle_core::Var)> =
            vars.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// A text batch for the text tower: tokenized, padded to the longest caption.
    pub fn text_batch<S: AsRef<str>>(&self, captions: &[S]) -> Result<TextBatch, ModelError> {
        let rows = self.tokenizer.encode_batch(captions)?;
        Ok(TextBatch::new(&rows, self.eos_token_id(), &self.device)?)
    }

    /// The text config's end-of-text id, which decides where a text is pooled.
    pub fn eos_token_id(&self) -> u32 {
        self.clip
            .text
            .as_ref()
            .map(|t| t.config().eos_token_id)
            .unwrap_or(2)
    }

    /// Computes in `dtype` from now on (f32 weights kept; see the module doc): for a 16-bit
    /// dtype, makes the compute copies of the weights as they are now.
    pub fn with_compute_dtype(mut self, dtype: DType) -> Result<Self, ModelError> {
        self.compute = dtype;
        self.rebuild_pass_model()?;
        Ok(self)
    }

    /// Leaves the weights `freeze` names out of training: each entry is a name prefix of whole
    /// components (`text_model`, `vision_model.encoder.layers.1`, which is layer 1 and not 10
    /// or 11, ...) or `backbone`, which freezes every
    /// layer except the projections and `logit_scale` (Finetuner's `freeze=True`). Frozen
    /// weights are not variables of the passes: no gradient is computed for them, and none
    /// flows below the lowest trainable weight (with `backbone`, the towers run forward only).
    pub fn freeze(mut self, freeze: &[String]) -> Result<Self, ModelError> {
        let vars = self.named_vars();
        for f in freeze {
            if f != "backbone" && !vars.iter().any(|(n, _)| under_prefix(n, f)) {
                return Err(ModelError::InvalidInput {
                    msg: format!("--freeze {f:?} matches no weight (use a name prefix such as text_model or vision_model.encoder.layers.0, or backbone)"),
                });
            }
        }
        self.freeze = freeze.to_vec();
        self.frozen_bodies = ["text_model.", "vision_model."].map(|body| {
            let mut names = vars.iter().map(|(n, _)| n).filter(|n| n.starts_with(body));
            names.clone().next().is_some() && names.all(|n| self.is_frozen(n))
        });
        self.rebuild_pass_model()?;
        Ok(self)
    }

    /// Whether `--freeze` leaves the weight `name` out of training.
    fn is_frozen(&self, name: &str) -> bool {
        const HEADS: [&str; 3] = ["text_projection.", "visual_projection.", "logit_scale"];
        self.freeze.iter().any(|f| match f.as_str() {
            "backbone" => !HEADS.iter().any(|h| name.starts_with(h)),
            f => under_prefix(name, f),
        })
    }

    /// [`PassModel`] for the compute dtype and the frozen weights (keeping compute copies made
    /// before), or none where the passes run on [`TrainModel::clip`] itself.
    fn rebuild_pass_model(&mut self) -> Result<(), ModelError> {
        let old = self.pass.take().map(|p| p.copies).unwrap_or_default();
        if self.compute == DType::F32 && self.freeze.is_empty() {
            return Ok(());
        }
        let mut copies = std::collections::HashMap::new();
        let mut tensors = std::collections::HashMap::new();
        for (name, var) in self.named_vars() {
            let t = if self.compute == DType::F32 || name == "logit_scale" {
                var.as_tensor().clone()
            } else {
                let copy = match old.get(&name) {
                    Some(c) if c.dtype() == self.compute => c.clone(),
                    _ => candle_core::Var::from_tensor(&var.as_tensor().to_dtype(self.compute)?)?,
                };
                let t = copy.as_tensor().clone();
                copies.insert(name.clone(), copy);
                t
            };
            let t = if self.is_frozen(&name) { t.detach() } else { t };
            tensors.insert(name, t);
        }
        let scale = tensors.get("logit_scale").cloned();
        let vb = VarBuilder::from_tensors(tensors, self.compute, &self.device);
        let kernels = crate::model::policy::Kernels::decide(&self.device, self.compute);
        let mut clip = Clip::new(vb, &self.config, Towers::ALL, kernels)?;
        // The loss reads the f32 variable itself (no cast of it anywhere).
        if scale.is_some() {
            clip.logit_scale = scale;
        }
        self.pass = Some(PassModel { copies, clip });
        Ok(())
    }

    /// Rewrites the compute copies from the f32 weights, which were set from outside the
    /// optimiser (a checkpoint restored, weights mixed): the next pass sees them.
    pub fn sync_compute_copies(&mut self) -> Result<(), ModelError> {
        let vars = self.named_vars();
        let Some(p) = &mut self.pass else {
            return Ok(());
        };
        for (name, var) in vars {
            if let Some(copy) = p.copies.get(&name) {
                copy.set(&var.as_tensor().to_dtype(copy.dtype())?)?;
            }
        }
        // A frozen tower's inference kernels keep packed copies of its weights.
        p.clip = p.clip.with_fresh_packing();
        Ok(())
    }

    /// The model the passes run on: the variables themselves in f32, or [`PassModel`]'s.
    fn compute_clip(&self) -> &Clip {
        self.pass.as_ref().map_or(&self.clip, |p| &p.clip)
    }

    /// The loss of one batch, with the graph kept for backward.
    pub fn loss(&self, text: &TextBatch, pixels: &Tensor) -> Result<Tensor, ModelError> {
        self.loss_of(self.compute_clip(), Mode::Train, text, pixels)
    }

    /// A model for passes without gradients (validation loss): the same weights (cast to the
    /// compute dtype), and none of the packed copies the inference kernels keep, which the
    /// next step would make stale. Make one per pass, not per batch (packing is a pass over
    /// every weight).
    pub fn frozen(&self) -> Result<Clip, ModelError> {
        Ok(self.compute_clip().with_fresh_packing())
    }

    /// The loss of one batch on `frozen`'s model through the inference kernels: no graph, a
    /// fraction of the training forward's time.
    pub fn loss_without_graph(
        &self,
        frozen: &Clip,
        text: &TextBatch,
        pixels: &Tensor,
    ) -> Result<f32, ModelError> {
        let loss = self.loss_of(frozen, Mode::Inference, text, pixels)?;
        Ok(loss.to_dtype(DType::F32)?.to_scalar::<f32>()?)
    }

    fn loss_of(
        &self,
        clip: &Clip,
        mode: Mode,
        text: &TextBatch,
        pixels: &Tensor,
    ) -> Result<Tensor, ModelError> {
        // A frozen tower's body keeps no graph either way: the inference kernels are faster.
        let body = |frozen: bool| match mode {
            Mode::Train if frozen => Mode::Inference,
            m => m,
        };
        let t = clip.text_features_modes(text, body(self.frozen_bodies[0]), mode)?;
        let i = clip.image_features_modes(pixels, body(self.frozen_bodies[1]), mode)?;
        let scale = clip.logit_scale.as_ref().ok_or(ModelError::InvalidInput {
            msg: "model has no logit_scale".into(),
        })?;
        let scale = match mode {
            Mode::Train => scale.clone(),
            Mode::Inference => scale.detach(),
        };
        Ok(clip_loss(&t, &i, &scale)?)
    }

    /// One optimiser step on one batch; returns the batch's loss before the update.
    pub fn train_step(
        &self,
        opt: &mut Optimizer,
        text: &TextBatch,
        pixels: &Tensor,
    ) -> Result<f32, ModelError> {
        self.step(opt, text, pixels, &mut || Ok(()))
    }

    /// [`TrainModel::train_step`], waiting for the device after the forward pass (with the
    /// loss), after the backward pass and after the optimiser step, and timing each: where a
    /// step's time goes (`clipft bench --train`). The waits keep the phases from overlapping,
    /// so the three add up to a little more than an unobserved step.
    pub fn train_step_timed(
        &self,
        opt: &mut Optimizer,
        text: &TextBatch,
        pixels: &Tensor,
    ) -> Result<(f32, StepPhases), ModelError> {
        self.device.synchronize()?;
        let mut marks = vec![std::time::Instant::now()];
        let loss = self.step(opt, text, pixels, &mut || {
            self.device.synchronize()?;
            marks.push(std::time::Instant::now());
            Ok(())
        })?;
        let secs = |i: usize| match (marks.get(i), marks.get(i + 1)) {
            (Some(a), Some(b)) => b.duration_since(*a).as_secs_f64(),
            _ => f64::NAN,
        };
        Ok((
            loss,
            StepPhases {
                forward: secs(0),
                backward: secs(1),
                optimizer: secs(2),
            },
        ))
    }

    /// The step; `mark` is called after the forward pass, the backward pass and the update.
    fn step(
        &self,
        opt: &mut Optimizer,
        text: &TextBatch,
        pixels: &Tensor,
        mark: &mut dyn FnMut() -> candle_core::Result<()>,
    ) -> Result<f32, ModelError> {
        let (loss, grads) = crate::model::train_ops::with_direct_weight_grads(|| {
            let loss = self.loss(text, pixels)?;
            mark()?;
            let grads = match opt.loss_scale {
                Some(ls) => (&loss * ls.scale)?.backward()?,
                None => loss.backward()?,
            };
            mark()?;
            Ok::<_, ModelError>((loss, grads))
        })?;
        opt.step(&grads)?;
        mark()?;
        if let Some(ls) = &self.clip.logit_scale {
            let v = ls.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            if !(0.0..=MAX_LOGIT_SCALE).contains(&v) {
                let vars = self
                    .varmap
                    .data()
                    .lock()
                    .map_err(|_| ModelError::InvalidInput {
                        msg: "poisoned".into(),
                    })?;
                if let Some(var) = vars.get("logit_scale") {
                    var.set(&Tensor::new(
                        v.clamp(0.0, MAX_LOGIT_SCALE) as f32,
                        &self.device,
                    )?)?;
                }
            }
        }
        Ok(loss.to_dtype(DType::F32)?.to_scalar::<f32>()?)
    }

    /// An optimiser over every variable [`TrainModel::freeze`] leaves trainable, reading the
    /// compute copies' gradients and refreshing them, with f16's loss scaling.
    pub fn optimizer(&self, hp: OptimizerParams) -> Result<Optimizer, ModelError> {
        let vars = self
            .named_vars()
            .into_iter()
            .filter(|(n, _)| !self.is_frozen(n))
            .collect();
        let mut opt = Optimizer::new(vars, hp)?;
        if let Some(p) = &self.pass {
            opt = opt.with_compute_copies(&p.copies)?;
        }
        if self.compute == DType::F16 {
            opt.loss_scale = Some(Default::default());
        }
        Ok(opt)
    }
}
/// Whether the weight `name` lies under the `--freeze` prefix `prefix`, whole name components
/// only: `vision_model.encoder.layers.1` is layer 1's weights, not layers 10 and 11 too (a
/// trailing dot is allowed).
fn under_prefix(name: &str, prefix: &str) -> bool {
    let prefix = prefix.trim_end_matches('.');
    name.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
}

#[cfg(test)]
mod tests {
    use super::under_prefix;

    #[test]
    fn freeze_prefixes_match_whole_name_components() {
        let name = "vision_model.encoder.layers.10.mlp.fc1.weight";
        assert!(under_prefix(name, "vision_model"));
        assert!(under_prefix(name, "vision_model.encoder.layers.10"));
        assert!(under_prefix(name, "vision_model.encoder.layers.10."));
        assert!(under_prefix(name, name));
        assert!(!under_prefix(name, "vision_model.encoder.layers.1"));
        assert!(!under_prefix(name, "vision_mod"));
        assert!(!under_prefix("logit_scale", "logit"));
    }
}
