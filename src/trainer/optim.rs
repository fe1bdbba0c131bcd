//! Adam and AdamW as torch.optim computes them, updating parameters in place.
//!
//! candle's stock AdamW runs about ten element-wise tensor ops per parameter per step, each
//! allocating a new tensor (about 5 s per step on ViT-B/32 on two cores). Here the moments live
//! in plain buffers owned by the optimiser and one fused pass per parameter updates weight and
//! moments together, in place (a candle in-place op on the variable's own storage), with no
//! allocation. Other devices fall back to tensor ops with the same arithmetic.

use std::sync::Mutex;

use candle_core::{CpuStorage, Layout, Result, Tensor, Var};
use rayon::prelude::*;

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

/// First and second moments: plain buffers for the fused CPU pass, f32 tensors on the
/// parameter's device otherwise (a GPU's moments never travel to the host during training).
struct Moments {
    m: Vec<f32>,
    v: Vec<f32>,
    on_device: Option<(Tensor, Tensor)>,
}

fn fused_cpu(var: &Var) -> bool {
    var.device().is_cpu() && var.dtype() == candle_core::DType::F32
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
        if fused_cpu(var) {
            return Ok(Self {
                m: written_zeros(n),
                v: written_zeros(n),
                on_device: None,
            });
        }
        let z = Tensor::zeros(var.shape(), candle_core::DType::F32, var.device())?;
        Ok(Self {
            m: Vec::new(),
            v: Vec::new(),
            on_device: Some((z.clone(), z)),
        })
    }

    fn from_host(var: &Var, m: Vec<f32>, v: Vec<f32>) -> Result<Self> {
        if fused_cpu(var) {
            return Ok(Self {
                m,
                v,
                on_device: None,
            });
        }
        let t = |x: Vec<f32>| Tensor::from_vec(x, var.shape(), var.device());
        Ok(Self {
            m: Vec::new(),
            v: Vec::new(),
            on_device: Some((t(m)?, t(v)?)),
        })
    }

    fn to_host(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        match &self.on_device {
            Some((m, v)) => Ok((
                m.flatten_all()?.to_vec1::<f32>()?,
                v.flatten_all()?.to_vec1::<f32>()?,
            )),
            None => Ok((self.m.clone(), self.v.clone())),
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

/// The scalars of one step, shared by every parameter.
#[derive(Clone, Copy)]
/// Scalars are formed in f64 and rounded once to f32, as torch passes Python floats to its f32
/// kernels (so `1 - beta2` is f32(0.001), not 1 - f32(0.999)).
struct StepScalars {
    /// 1 - lr * weight_decay (AdamW's decoupled decay factor)
    decay: f32,
    /// weight_decay (Adam's L2 term)
    wd: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    eps: f32,
    kind: OptimizerKind,
    /// Gradient multiplier from norm clipping (1 when off).
    grad_scale: f32,
    /// lr / (1 - beta1^t)
    step_size: f32,
    /// sqrt(1 - beta2^t)
    bc2_sqrt: f32,
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
            for p in &self.params {
                if let Some(g) = grads.get(p.var.as_tensor()) {
                    sq += g
                        .to_dtype(candle_core::DType::F64)?
                        .sqr()?
                        .sum_all()?
                        .to_scalar::<f64>()?;
                }
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
        let s = StepScalars {
            decay: (1.0 - hp.lr * hp.weight_decay) as f32,
            wd: hp.weight_decay as f32,
            one_minus_beta1: (1.0 - hp.beta1) as f32,
            beta2: hp.beta2 as f32,
            one_minus_beta2: (1.0 - hp.beta2) as f32,
            eps: hp.eps as f32,
            kind: hp.kind,
            grad_scale: grad_scale as f32,
            step_size: (hp.lr / (1.0 - hp.beta1.powi(t))) as f32,
            bc2_sqrt: (1.0 - hp.beta2.powi(t)).sqrt() as f32,
        };
        for p in &self.params {
            let Some(g) = grads.get(p.var.as_tensor()) else {
                continue;
            };
            if fused_cpu(&p.var) {
                let g = g.contiguous()?;
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
        m.to_host().ok()
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

struct AdamStep<'a> {
    s: StepScalars,
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
        let Moments { m, v, .. } = &mut *mom;
        if m.len() != w.len() || g.len() != w.len() {
            candle_core::bail!("adam-step: size mismatch");
        }
        let s = self.s;
        const CHUNK: usize = 1 << 14;
        w.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
            .for_each(|((w, g), (m, v))| update(w, g, m, v, s));
        Ok(())
    }
}

/// One chunk of the AdamW pass, in 16-wide AVX-512 where the CPU has it (the same IEEE
/// operations in the same order, so the same bits as the portable loop, at a quarter of the
/// instructions of the SSE2 baseline build).
fn update(w: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: StepScalars) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F, checked just above.
        return unsafe { update_avx512(w, g, m, v, s) };
    }
    update_portable(w, g, m, v, s)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn update_avx512(w: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: StepScalars) {
    update_portable(w, g, m, v, s)
}

#[inline(always)]
fn update_portable(w: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: StepScalars) {
    let n = w.len();
    let (g, m, v) = (&g[..n], &mut m[..n], &mut v[..n]);
    for i in 0..n {
        let mut grad = g[i] * s.grad_scale;
        match s.kind {
            OptimizerKind::AdamW => w[i] *= s.decay,
            OptimizerKind::Adam => grad += s.wd * w[i],
        }
        // torch: exp_avg.lerp_(grad, 1 - beta1); exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2)
        m[i] += (grad - m[i]) * s.one_minus_beta1;
        v[i] = v[i] * s.beta2 + s.one_minus_beta2 * grad * grad;
        let denom = v[i].sqrt() / s.bc2_sqrt + s.eps;
        w[i] -= s.step_size * m[i] / denom;
    }
}

/// The same update with tensor ops, for devices the fused pass does not cover.
fn generic_step(p: &ParamState, g: &Tensor, s: StepScalars) -> Result<()> {
    let mut mom = p
        .moments
        .lock()
        .map_err(|_| candle_core::Error::Msg("poisoned".into()))?;
    let dev = p.var.device();
    let shape = p.var.shape().clone();
    let dtype = p.var.dtype();
    let w = p.var.as_tensor().to_dtype(candle_core::DType::F32)?;
    let (m, v) = match &mom.on_device {
        Some((m, v)) => (m.clone(), v.clone()),
        None => (
            Tensor::from_slice(&mom.m, &shape, dev)?,
            Tensor::from_slice(&mom.v, &shape, dev)?,
        ),
    };
    let mut grad = (g.to_dtype(candle_core::DType::F32)? * s.grad_scale as f64)?;
    let mut w = match s.kind {
        OptimizerKind::AdamW => (w * s.decay as f64)?,
        OptimizerKind::Adam => {
            grad = (grad + (&w * s.wd as f64)?)?;
            w
        }
    };
    let m = (&m + ((&grad - &m)? * s.one_minus_beta1 as f64)?)?;
    let v = ((v * s.beta2 as f64)? + (grad.sqr()? * s.one_minus_beta2 as f64)?)?;
    let denom = ((v.sqrt()? / s.bc2_sqrt as f64)? + s.eps as f64)?;
    w = (w - ((&m / denom)? * s.step_size as f64)?)?;
    mom.on_device = Some((m, v));
    p.var.set(&w.to_dtype(dtype)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The AVX-512 build of the update gives the portable loop's bits (no fused multiply-adds,
    /// the same operations in the same order), for both kinds and a ragged tail.
    #[test]
    fn vectorised_update_is_bit_identical() {
        #[cfg(target_arch = "x86_64")]
        {
            if !std::arch::is_x86_feature_detected!("avx512f") {
                eprintln!("skipped: no AVX-512 here");
                return;
            }
            let n = 1000 + 7;
            let val =
                |i: usize, s: u32| ((i as u32).wrapping_mul(2_654_435_761) ^ s) as f32 / 4e9 - 0.5;
            for kind in [OptimizerKind::AdamW, OptimizerKind::Adam] {
                let s = StepScalars {
                    decay: 0.9999,
                    wd: 0.01,
                    one_minus_beta1: 0.1,
                    beta2: 0.999,
                    one_minus_beta2: 0.001,
                    eps: 1e-8,
                    kind,
                    grad_scale: 0.5,
                    step_size: 1e-3,
                    bc2_sqrt: 0.0447,
                };
                let g: Vec<f32> = (0..n).map(|i| val(i, 1)).collect();
                let start = |seed| (0..n).map(|i| val(i, seed)).collect::<Vec<f32>>();
                let (mut w1, mut m1, mut v1) = (
                    start(2),
                    start(3),
                    start(4).iter().map(|x| x.abs()).collect::<Vec<_>>(),
                );
                let (mut w2, mut m2, mut v2) = (w1.clone(), m1.clone(), v1.clone());
                update_portable(&mut w1, &g, &mut m1, &mut v1, s);
                // SAFETY: AVX-512F checked above.
                unsafe { update_avx512(&mut w2, &g, &mut m2, &mut v2, s) };
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert!(
                    bits(&w1) == bits(&w2) && bits(&m1) == bits(&m2) && bits(&v1) == bits(&v2),
                    "{kind:?}"
                );
            }
        }
    }

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
