//! Adam and AdamW as torch.optim computes them, updating parameters in place.
//!
//! candle's stock AdamW runs about ten element-wise tensor ops per parameter per step, each
//! allocating a new tensor (about 5 s per step on ViT-B/32 on two cores; on a GPU a dozen
//! launches per parameter, thousands per step). Here the moments live in buffers owned by the
//! optimiser (host memory for CPU parameters, device memory for CUDA ones) and one fused pass
//! per parameter updates weight and moments together, in place (a candle in-place op on the
//! variable's own storage), with no allocation: [`crate::model::kernels::adam`] on the CPU,
//! its CUDA twin on the GPU (the same bits). Other devices, and `CLIPFT_NO_FUSED`, use tensor
//! ops with the same arithmetic.

use std::sync::Mutex;

use candle_core::{CpuStorage, Layout, Result, Tensor, Var};
use rayon::prelude::*;

use crate::model::kernels::adam::{adam_update, AdamScalars};

/// Which update rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum OptimizerKind {
    /// L2 weight decay added to the gradient (torch.optim.Adam).
    Adam,
    /// Decoupled weight decay (torch.optim.AdamW).
    AdamW,
}

impl OptimizerKind {
    /// Finetuner's names, with what each does (the command line lists them).
    pub const CHOICES: [(&'static str, &'static str, Self); 2] = [
        (
            "Adam",
            "L2 weight decay added to the gradient (torch.optim.Adam)",
            Self::Adam,
        ),
        (
            "AdamW",
            "decoupled weight decay (torch.optim.AdamW)",
            Self::AdamW,
        ),
    ];
}

/// Hyper-parameters, with torch's defaults for the betas and epsilon.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OptimizerParams {
    pub kind: OptimizerKind,
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl OptimizerParams {
    pub fn new(kind: OptimizerKind, lr: f64, weight_decay: f64) -> Self {
        Self {
            kind,
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
        }
    }
}

/// Where a parameter's update runs, decided from its device and dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// The fused pass over host buffers ([`adam_update`]).
    Cpu,
    /// The fused CUDA kernel over device buffers.
    #[cfg(feature = "cuda")]
    Cuda,
    /// Tensor ops on the parameter's device.
    Tensors,
}

fn pass(var: &Var) -> Pass {
    let f32 = var.dtype() == candle_core::DType::F32;
    if var.device().is_cpu() && f32 {
        return Pass::Cpu;
    }
    #[cfg(feature = "cuda")]
    if var.device().is_cuda() && f32 && crate::model::policy::switches().fused {
        return Pass::Cuda;
    }
    Pass::Tensors
}

/// First and second moments, where the parameter's pass reads them. A GPU's moments never
/// travel to the host during training (only for checkpoints).
enum Moments {
    Host {
        m: Vec<f32>,
        v: Vec<f32>,
    },
    #[cfg(feature = "cuda")]
    Cuda {
        m: candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>,
        v: candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>,
    },
    Tensors {
        m: Tensor,
        v: Tensor,
    },
}

/// `n` zeros, written rather than `calloc`ed. A large `calloc` returns untouched pages; the
/// first optimiser step reads each moment before writing it, so every page would first map the
/// shared zero page and then take a copy-on-write fault with a TLB flush on every core (on
/// ViT-B/32's 1.2 GB of moments, seconds of the first step on a VM, where those cross-core
/// interrupts are expensive). Written now, each page faults once, in order.
fn written_zeros(n: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    v.resize(n, 0.0);
    v
}

impl Moments {
    fn zeros(var: &Var) -> Result<Self> {
        let n = var.elem_count();
        match pass(var) {
            Pass::Cpu => Ok(Self::Host {
                m: written_zeros(n),
                v: written_zeros(n),
            }),
            #[cfg(feature = "cuda")]
            Pass::Cuda => {
                let dev = var.device().as_cuda_device()?;
                Ok(Self::Cuda {
                    m: dev.alloc_zeros::<f32>(n)?,
                    v: dev.alloc_zeros::<f32>(n)?,
                })
            }
            Pass::Tensors => {
                let z = Tensor::zeros(var.shape(), candle_core::DType::F32, var.device())?;
                Ok(Self::Tensors { m: z.clone(), v: z })
            }
        }
    }

    fn from_host(var: &Var, m: Vec<f32>, v: Vec<f32>) -> Result<Self> {
        match pass(var) {
            Pass::Cpu => Ok(Self::Host { m, v }),
            #[cfg(feature = "cuda")]
            Pass::Cuda => {
                let dev = var.device().as_cuda_device()?;
                Ok(Self::Cuda {
                    m: dev.clone_htod(&m)?,
                    v: dev.clone_htod(&v)?,
                })
            }
            Pass::Tensors => {
                let t = |x: Vec<f32>| Tensor::from_vec(x, var.shape(), var.device());
                Ok(Self::Tensors { m: t(m)?, v: t(v)? })
            }
        }
    }

    fn to_host(&self, var: &Var) -> Result<(Vec<f32>, Vec<f32>)> {
        match self {
            Self::Host { m, v } => Ok((m.clone(), v.clone())),
            #[cfg(feature = "cuda")]
            Self::Cuda { m, v } => {
                let dev = var.device().as_cuda_device()?;
                Ok((dev.clone_dtoh(m)?, dev.clone_dtoh(v)?))
            }
            Self::Tensors { m, v } => {
                let _ = var;
                Ok((
                    m.flatten_all()?.to_vec1::<f32>()?,
                    v.flatten_all()?.to_vec1::<f32>()?,
                ))
            }
        }
    }
}

/// One parameter with its moments.
pub struct ParamState {
    pub name: String,
    pub var: Var,
    moments: Mutex<Moments>,
}

/// Adam / AdamW over a fixed list of parameters.
pub struct Optimizer {
    pub params: Vec<ParamState>,
    pub hp: OptimizerParams,
    /// Clip the global gradient L2 norm to this (torch's `clip_grad_norm_`); off when None.
    pub max_grad_norm: Option<f64>,
    /// Dynamic loss scaling for f16 compute (torch.amp's GradScaler); None otherwise.
    pub loss_scale: Option<LossScale>,
    /// Steps skipped because loss-scaled gradients overflowed.
    pub skipped: u64,
    step: u64,
}

/// torch.amp.GradScaler's rule: the loss is multiplied by `scale` before backward so small f16
/// gradients do not flush to zero; a step whose gradients overflowed is skipped and the scale
/// halved; after `growth_interval` good steps in a row it doubles.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossScale {
    pub scale: f64,
    pub growth_interval: u32,
    good_steps: u32,
}

impl Default for LossScale {
    fn default() -> Self {
        Self {
            scale: 65536.0,
            growth_interval: 2000,
            good_steps: 0,
        }
    }
}

impl LossScale {
    fn update(&mut self, finite: bool) {
        if finite {
            self.good_steps += 1;
            if self.good_steps >= self.growth_interval {
                self.scale *= 2.0;
                self.good_steps = 0;
            }
        } else {
            self.scale = (self.scale / 2.0).max(1.0);
            self.good_steps = 0;
        }
    }
}

impl Optimizer {
    pub fn new(vars: Vec<(String, Var)>, hp: OptimizerParams) -> Result<Self> {
        let params = vars
            .into_iter()
            .map(|(name, var)| {
                Ok(ParamState {
                    moments: Mutex::new(Moments::zeros(&var)?),
                    name,
                    var,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            params,
            hp,
            max_grad_norm: None,
            loss_scale: None,
            skipped: 0,
            step: 0,
        })
    }

    pub fn set_learning_rate(&mut self, lr: f64) {
        self.hp.lr = lr;
    }

    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Applies one update from `grads`; parameters without a gradient are left alone (as torch
    /// skips parameters whose `.grad` is None). With loss scaling, gradients are unscaled first
    /// and a step whose gradients are not finite is skipped (returns false).
    pub fn step(&mut self, grads: &candle_core::backprop::GradStore) -> Result<bool> {
        let unscale = self.loss_scale.map_or(1.0, |l| 1.0 / l.scale);
        let sum_sq = || -> Result<f64> {
            let mut sq = 0f64;
            // Off the CPU: each gradient's sum of squares stays on its device (f32, as torch's
            // clip_grad_norm_ over f32 gradients) and the step waits for the device once.
            let mut on_device = Vec::new();
            for p in &self.params {
                if let Some(g) = grads.get(p.var.as_tensor()) {
                    if g.device().is_cpu() {
                        sq += g
                            .to_dtype(candle_core::DType::F64)?
                            .sqr()?
                            .sum_all()?
                            .to_scalar::<f64>()?;
                    } else {
                        on_device.push(g.to_dtype(candle_core::DType::F32)?.sqr()?.sum_all()?);
                    }
                }
            }
            if !on_device.is_empty() {
                sq += Tensor::stack(&on_device, 0)?
                    .to_dtype(candle_core::DType::F64)?
                    .sum_all()?
                    .to_scalar::<f64>()?;
            }
            Ok(sq)
        };
        let sq = match (self.max_grad_norm, self.loss_scale) {
            (None, None) => None,
            _ => Some(sum_sq()?),
        };
        if let Some(ls) = &mut self.loss_scale {
            let finite = sq.is_some_and(f64::is_finite);
            ls.update(finite);
            if !finite {
                self.skipped += 1;
                return Ok(false);
            }
        }
        self.step += 1;
        let t = self.step as i32;
        let hp = self.hp;
        let grad_scale = match (self.max_grad_norm, sq) {
            // torch: clip_coef = max_norm / (total_norm + 1e-6), clamped to 1, on the unscaled
            // gradients.
            (Some(max), Some(sq)) => unscale * (max / (sq.sqrt() * unscale + 1e-6)).min(1.0),
            _ => unscale,
        };
        let s = AdamScalars {
            decoupled: hp.kind == OptimizerKind::AdamW,
            decay: (1.0 - hp.lr * hp.weight_decay) as f32,
            wd: hp.weight_decay as f32,
            one_minus_beta1: (1.0 - hp.beta1) as f32,
            beta2: hp.beta2 as f32,
            one_minus_beta2: (1.0 - hp.beta2) as f32,
            eps: hp.eps as f32,
            grad_scale: grad_scale as f32,
            step_size: (hp.lr / (1.0 - hp.beta1.powi(t))) as f32,
            bc2_sqrt: (1.0 - hp.beta2.powi(t)).sqrt() as f32,
        };
        for p in &self.params {
            let Some(g) = grads.get(p.var.as_tensor()) else {
                continue;
            };
            if pass(&p.var) != Pass::Tensors {
                let g = g.to_dtype(candle_core::DType::F32)?.contiguous()?;
                p.var.as_tensor().inplace_op2(
                    &g,
                    &AdamStep {
                        s,
                        moments: &p.moments,
                    },
                )?;
            } else {
                generic_step(p, g, s)?;
            }
        }
        Ok(true)
    }

    /// One parameter's first and second moments (for checkpoints and tests).
    pub fn moments(&self, name: &str) -> Option<(Vec<f32>, Vec<f32>)> {
        let p = self.params.iter().find(|p| p.name == name)?;
        let m = p.moments.lock().ok()?;
        m.to_host(&p.var).ok()
    }

    /// Continues from a checkpoint: the step count (bias correction depends on it) and every
    /// parameter's moments. A parameter missing from `moments`, or of another size, is an error:
    /// resuming with fresh moments would silently change the run.
    pub fn restore(
        &mut self,
        step: u64,
        moments: &mut std::collections::HashMap<String, (Vec<f32>, Vec<f32>)>,
    ) -> std::result::Result<(), String> {
        for p in &self.params {
            let (m, v) = moments
                .remove(&p.name)
                .ok_or_else(|| format!("checkpoint has no optimiser state for {}", p.name))?;
            let n = p.var.elem_count();
            if m.len() != n || v.len() != n {
                return Err(format!(
                    "optimiser state for {} has {} values, the weight {n}",
                    p.name,
                    m.len()
                ));
            }
            let mut slot = p.moments.lock().map_err(|_| "poisoned optimiser state")?;
            *slot = Moments::from_host(&p.var, m, v).map_err(|e| e.to_string())?;
        }
        self.step = step;
        Ok(())
    }
}

/// The fused update of one parameter as a candle in-place op on the variable's storage.
struct AdamStep<'a> {
    s: AdamScalars,
    moments: &'a Mutex<Moments>,
}

impl candle_core::InplaceOp2 for AdamStep<'_> {
    fn name(&self) -> &'static str {
        "adam-step"
    }

    fn cpu_fwd(&self, w: &mut CpuStorage, lw: &Layout, g: &CpuStorage, lg: &Layout) -> Result<()> {
        let (CpuStorage::F32(w), CpuStorage::F32(g)) = (w, g) else {
            candle_core::bail!("adam-step: f32 parameters only")
        };
        let (Some((w0, w1)), Some((g0, g1))) = (lw.contiguous_offsets(), lg.contiguous_offsets())
        else {
            candle_core::bail!("adam-step: contiguous parameters only")
        };
        let (w, g) = (&mut w[w0..w1], &g[g0..g1]);
        let mut mom = self
            .moments
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned".into()))?;
        let Moments::Host { m, v } = &mut *mom else {
            candle_core::bail!("adam-step: the moments are not in host memory")
        };
        if m.len() != w.len() || v.len() != w.len() || g.len() != w.len() {
            candle_core::bail!("adam-step: size mismatch");
        }
        let s = self.s;
        const CHUNK: usize = 1 << 14;
        w.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
            .for_each(|((w, g), (m, v))| adam_update(w, g, m, v, s));
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        w: &mut candle_core::CudaStorage,
        lw: &Layout,
        g: &candle_core::CudaStorage,
        lg: &Layout,
    ) -> Result<()> {
        use candle_core::backend::BackendStorage;
        let (Some((w0, w1)), Some((g0, g1))) = (lw.contiguous_offsets(), lg.contiguous_offsets())
        else {
            candle_core::bail!("adam-step: contiguous parameters only")
        };
        let dev = w.device().clone();
        let mut mom = self
            .moments
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned".into()))?;
        let Moments::Cuda { m, v } = &mut *mom else {
            candle_core::bail!("adam-step: the moments are not on the GPU")
        };
        let g = g.as_cuda_slice::<f32>()?.slice(g0..g1);
        let mut w = w.as_cuda_slice_mut::<f32>()?.slice_mut(w0..w1);
        crate::model::kernels::cuda::adam::adam_step(&dev, &mut w, &g, m, v, self.s)
    }
}

/// The same update with tensor ops, for devices the fused pass does not cover.
fn generic_step(p: &ParamState, g: &Tensor, s: AdamScalars) -> Result<()> {
    let mut mom = p
        .moments
        .lock()
        .map_err(|_| candle_core::Error::Msg("poisoned".into()))?;
    let dtype = p.var.dtype();
    let w = p.var.as_tensor().to_dtype(candle_core::DType::F32)?;
    let Moments::Tensors { m, v } = &*mom else {
        candle_core::bail!("adam step: {} keeps its moments elsewhere", p.name)
    };
    let (m, v) = (m.clone(), v.clone());
    let mut grad = (g.to_dtype(candle_core::DType::F32)? * s.grad_scale as f64)?;
    let mut w = if s.decoupled {
        (w * s.decay as f64)?
    } else {
        grad = (grad + (&w * s.wd as f64)?)?;
        w
    };
    let m = (&m + ((&grad - &m)? * s.one_minus_beta1 as f64)?)?;
    let v = ((v * s.beta2 as f64)? + (grad.sqr()? * s.one_minus_beta2 as f64)?)?;
    let denom = ((v.sqrt()? / s.bc2_sqrt as f64)? + s.eps as f64)?;
    w = (w - ((&m / denom)? * s.step_size as f64)?)?;
    *mom = Moments::Tensors { m, v };
    p.var.set(&w.to_dtype(dtype)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// With clipping, the first Adam step is unchanged (Adam normalises the gradient) but the
    /// moments are scaled: the second step differs from the unclipped one.
    #[test]
    fn gradient_clipping_scales_the_gradient() -> Result<()> {
        let run = |clip: Option<f64>| -> Result<Vec<f32>> {
            let var = Var::new(&[3.0f32, -4.0], &Device::Cpu)?;
            let mut opt = Optimizer::new(
                vec![("w".into(), var.clone())],
                OptimizerParams::new(OptimizerKind::AdamW, 0.1, 0.0),
            )?;
            opt.max_grad_norm = clip;
            for _ in 0..2 {
                let loss = var.as_tensor().sqr()?.sum_all()?;
                opt.step(&loss.backward()?)?;
            }
            Ok(opt.moments("w").expect("moments of w").0)
        };
        let (plain, clipped) = (run(None)?, run(Some(1.0))?);
        // The gradient [6, -8] (norm 10) is scaled to norm 1.
        assert!(
            clipped[0].abs() < plain[0].abs() / 5.0,
            "{clipped:?} vs {plain:?}"
        );
        assert_eq!(run(Some(1e9))?, plain);
        Ok(())
    }

    /// Two steps on a quadratic, checked against the formulas computed by hand in f64, through
    /// the fused in-place pass (f32) and the tensor-op fallback (f64 parameters).
    #[test]
    fn matches_torch_formulas() -> Result<()> {
        for (kind, dtype) in [
            (OptimizerKind::AdamW, candle_core::DType::F32),
            (OptimizerKind::Adam, candle_core::DType::F32),
            (OptimizerKind::AdamW, candle_core::DType::F64),
        ] {
            let init = Tensor::new(&[1.0f32, -2.0, 0.5], &Device::Cpu)?.to_dtype(dtype)?;
            let var = Var::from_tensor(&init)?;
            let mut opt = Optimizer::new(
                vec![("w".into(), var.clone())],
                OptimizerParams::new(kind, 0.1, 0.01),
            )?;
            let (mut w, mut m, mut v) = ([1.0f64, -2.0, 0.5], [0f64; 3], [0f64; 3]);
            for t in 1..=2 {
                let loss = var.as_tensor().sqr()?.sum_all()?;
                opt.step(&loss.backward()?)?;
                for i in 0..3 {
                    let mut g = 2.0 * w[i];
                    match kind {
                        OptimizerKind::AdamW => w[i] *= 1.0 - 0.1 * 0.01,
                        OptimizerKind::Adam => g += 0.01 * w[i],
                    }
                    m[i] = 0.9 * m[i] + 0.1 * g;
                    v[i] = 0.999 * v[i] + 0.001 * g * g;
                    let denom = v[i].sqrt() / (1.0 - 0.999f64.powi(t)).sqrt() + 1e-8;
                    w[i] -= 0.1 / (1.0 - 0.9f64.powi(t)) * m[i] / denom;
                }
            }
            let got = var
                .as_tensor()
                .to_dtype(candle_core::DType::F32)?
                .to_vec1::<f32>()?;
            for (g, w) in got.iter().zip(w) {
                assert!(
                    (*g as f64 - w).abs() < 1e-6 * w.abs().max(1.0),
                    "{kind:?}: {g} vs {w}"
                );
            }
        }
        Ok(())
    }

    /// f16 loss scaling: an overflowed step changes nothing and halves the scale; good steps
    /// unscale the gradient exactly and grow the scale after the interval.
    #[test]
    fn loss_scaling_skips_overflow_and_unscales() -> Result<()> {
        let var = Var::new(&[1.0f32, -2.0], &Device::Cpu)?;
        let mut opt = Optimizer::new(
            vec![("w".into(), var.clone())],
            OptimizerParams::new(OptimizerKind::Adam, 0.1, 0.0),
        )?;
        opt.loss_scale = Some(LossScale {
            scale: 8.0,
            growth_interval: 2,
            good_steps: 0,
        });
        let inf = (var.as_tensor() * f64::INFINITY)?.sum_all()?;
        assert!(!opt.step(&inf.backward()?)?);
        assert_eq!(var.as_tensor().to_vec1::<f32>()?, [1.0, -2.0]);
        assert_eq!(opt.loss_scale.map(|l| l.scale), Some(4.0));
        assert_eq!((opt.skipped, opt.step_count()), (1, 0));
        // Scaled by 4 then unscaled: the same first moment as the plain gradient 2w.
        let scaled = (var.as_tensor().sqr()?.sum_all()? * 4.0)?;
        assert!(opt.step(&scaled.backward()?)?);
        let (m, _) = opt.moments("w").expect("moments of w");
        assert!(
            (m[0] - 0.2).abs() < 1e-6 && (m[1] + 0.4).abs() < 1e-6,
            "{m:?}"
        );
        let again = (var.as_tensor().sqr()?.sum_all()? * 4.0)?;
        opt.step(&again.backward()?)?;
        assert_eq!(
            opt.loss_scale.map(|l| l.scale),
            Some(8.0),
            "grew after 2 good steps"
        );
        Ok(())
    }
}
