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
//!
//! Mixed precision: a parameter may have a compute copy ([`Optimizer::with_compute_copies`]),
//! the bf16/f16 variable the forward and backward passes ran on. Its gradient is then the
//! copy's, and the copy is rewritten from the updated f32 weight after every update. On the GPU
//! every parameter's update, and the refresh of its copy, is one launch for the whole model
//! ([`crate::model::kernels::cuda::adam`]'s multi-tensor kernel; `CLIPFT_NO_MULTI_TENSOR_ADAM`
//! keeps one launch per parameter).

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
    /// The f32 weight the update applies to (the master weight under mixed precision).
    pub var: Var,
    /// The compute-dtype variable the passes ran on, if any: its gradient is the one read, and
    /// it follows `var` after every update.
    pub copy: Option<Var>,
    /// This parameter's learning rate over the run's: 1 but under layer-wise decay
    /// ([`Optimizer::with_layer_decay`]).
    pub lr_scale: f64,
    moments: Mutex<Moments>,
}

impl ParamState {
    /// The gradient this parameter's update reads: its compute copy's where the passes ran on
    /// one, its own otherwise.
    fn grad<'g>(&self, grads: &'g candle_core::backprop::GradStore) -> Option<&'g Tensor> {
        self.copy
            .as_ref()
            .and_then(|c| grads.get(c.as_tensor()))
            .or_else(|| grads.get(self.var.as_tensor()))
    }

    /// Rewrites the compute copy from the weight (rounded to nearest even), where the update
    /// did not.
    fn refresh_copy(&self) -> Result<()> {
        match &self.copy {
            Some(c) => c.set(&self.var.as_tensor().to_dtype(c.dtype())?),
            None => Ok(()),
        }
    }
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
                    copy: None,
                    lr_scale: 1.0,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut ids = std::collections::HashSet::new();
        if let Some(p) = params.iter().find(|p| !ids.insert(p.var.as_tensor().id())) {
            candle_core::bail!("optimiser: {} is listed twice", p.name)
        }
        Ok(Self {
            params,
            hp,
            max_grad_norm: None,
            loss_scale: None,
            skipped: 0,
            step: 0,
        })
    }

    /// Mixed precision: the passes run on `copies` (by parameter name, each of its weight's
    /// shape, on its device, in a 16-bit dtype), so the update reads their gradients and
    /// rewrites them from the f32 weights. A parameter without a copy keeps its own gradient.
    pub fn with_compute_copies(
        mut self,
        copies: &std::collections::HashMap<String, Var>,
    ) -> Result<Self> {
        for p in &mut self.params {
            let Some(c) = copies.get(&p.name) else {
                continue;
            };
            if c.shape() != p.var.shape()
                || !c.device().same_device(p.var.device())
                || !matches!(
                    c.dtype(),
                    candle_core::DType::F16 | candle_core::DType::BF16
                )
                || p.var.dtype() != candle_core::DType::F32
            {
                candle_core::bail!(
                    "optimiser: the compute copy of {} ({:?} {:?}) does not fit its weight ({:?} {:?})",
                    p.name,
                    c.dtype(),
                    c.shape(),
                    p.var.dtype(),
                    p.var.shape()
                )
            }
            p.copy = Some(c.clone());
        }
        Ok(self)
    }

    /// Rewrites every compute copy from its weight: after the weights were set from outside
    /// (a checkpoint restored, weights mixed).
    pub fn refresh_copies(&self) -> Result<()> {
        self.params.iter().try_for_each(ParamState::refresh_copy)
    }

    /// Layer-wise learning-rate decay (Finetuner's `layer_wise_lr_decay`, LLRD): in each
    /// tower, block `i` of `L` trains at `decay^(L - i)` of the learning rate and the
    /// embeddings (and the vision tower's pre-norm) at `decay^(L + 1)`, while the last norm,
    /// the projections and the logit scale keep it whole. The layers nearest the input, which
    /// hold the most general features, then move the least. `decay` within (0, 1]. `model` names
    /// every weight of the model, frozen ones included: they fix each tower's `L`, which the
    /// trained parameters alone would understate.
    pub fn with_layer_decay(mut self, decay: f64, model: &[&str]) -> Result<Self> {
        if !(decay > 0.0 && decay <= 1.0) {
            candle_core::bail!("layer-wise learning-rate decay must be within (0, 1], not {decay}")
        }
        let names: Vec<&str> = self.params.iter().map(|p| p.name.as_str()).collect();
        let scales = layer_decay_scales(&names, model, decay);
        for (p, scale) in self.params.iter_mut().zip(scales) {
            p.lr_scale = scale;
        }
        Ok(self)
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
                if let Some(g) = p.grad(grads) {
                    if g.device().is_cpu() {
                        sq += g
                            .to_dtype(candle_core::DType::F64)?
                            .sqr()?
                            .sum_all()?
                            .to_scalar::<f64>()?;
                    } else {
                        on_device.push(g);
                    }
                }
            }
            #[cfg(feature = "cuda")]
            if crate::model::policy::switches().multi_tensor_adam
                && on_device.iter().all(|g| {
                    use candle_core::DType::{BF16, F16, F32};
                    g.device().is_cuda() && matches!(g.dtype(), F32 | F16 | BF16)
                })
            {
                // One launch per gradient dtype over every gradient (the update's table).
                let contiguous = on_device
                    .iter()
                    .map(|g| g.contiguous())
                    .collect::<Result<Vec<_>>>()?;
                return Ok(sq + multi::sum_squares(&contiguous)?);
            }
            let per_tensor = on_device
                .iter()
                .map(|g| g.to_dtype(candle_core::DType::F32)?.sqr()?.sum_all())
                .collect::<Result<Vec<_>>>()?;
            if !per_tensor.is_empty() {
                sq += Tensor::stack(&per_tensor, 0)?
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
        // A parameter's scalars at its share of the learning rate (torch's param groups).
        let scalars = |lr_scale: f64| {
            let lr = hp.lr * lr_scale;
            AdamScalars {
                decoupled: hp.kind == OptimizerKind::AdamW,
                decay: (1.0 - lr * hp.weight_decay) as f32,
                wd: hp.weight_decay as f32,
                one_minus_beta1: (1.0 - hp.beta1) as f32,
                beta2: hp.beta2 as f32,
                one_minus_beta2: (1.0 - hp.beta2) as f32,
                eps: hp.eps as f32,
                grad_scale: grad_scale as f32,
                step_size: (lr / (1.0 - hp.beta1.powi(t))) as f32,
                bc2_sqrt: (1.0 - hp.beta2.powi(t)).sqrt() as f32,
            }
        };
        #[cfg(feature = "cuda")]
        let mut one_launch = Vec::new();
        for p in &self.params {
            let Some(g) = p.grad(grads) else {
                continue;
            };
            let s = scalars(p.lr_scale);
            match pass(&p.var) {
                #[cfg(feature = "cuda")]
                Pass::Cuda if crate::model::policy::switches().multi_tensor_adam => {
                    one_launch.push((p, g.contiguous()?));
                    continue;
                }
                Pass::Tensors => generic_step(p, g, s)?,
                _ => {
                    let g = g.to_dtype(candle_core::DType::F32)?.contiguous()?;
                    p.var.as_tensor().inplace_op2(
                        &g,
                        &AdamStep {
                            s,
                            moments: &p.moments,
                        },
                    )?;
                }
            }
            p.refresh_copy()?;
        }
        // One launch per dtype and learning rate: without layer-wise decay, one per dtype.
        #[cfg(feature = "cuda")]
        {
            let mut groups: Vec<(u64, Vec<(&ParamState, Tensor)>)> = Vec::new();
            for (p, g) in one_launch {
                let key = p.lr_scale.to_bits();
                match groups.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, group)) => group.push((p, g)),
                    None => groups.push((key, vec![(p, g)])),
                }
            }
            for (key, group) in &groups {
                multi::step(group, scalars(f64::from_bits(*key)))?;
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

/// Many variables' storages held mutably at once, for the one-launch update
/// ([`multi`]), which writes every weight and compute copy of a model in one kernel.
#[cfg(any(test, feature = "cuda"))]
mod locks {
    use std::cell::RefCell;

    use candle_core::{CpuStorage, Layout, Result, Tensor};

    /// Calls `f` with the address of each of `ts`' first elements (device addresses on a GPU),
    /// every one of their storages write-locked for the whole call: each through a candle
    /// in-place op nested in the previous one's, the only way candle lends a storage mutably.
    /// `ts` must be distinct storages (a second lock on one would never be granted).
    pub(super) fn with_addresses_mut(ts: &[&Tensor], f: &mut Then<'_>) -> Result<()> {
        let mut got = Vec::with_capacity(ts.len());
        nest(ts, &mut got, f)
    }

    /// What [`with_addresses_mut`] calls with the addresses.
    pub(super) type Then<'b> = dyn FnMut(&[u64]) -> Result<()> + 'b;

    fn nest(ts: &[&Tensor], got: &mut Vec<u64>, f: &mut Then<'_>) -> Result<()> {
        match ts.split_first() {
            None => f(got),
            Some((t, rest)) => t.inplace_op1(&Lock {
                rest,
                got: RefCell::new(got),
                f: RefCell::new(f),
            }),
        }
    }

    /// One level of [`with_addresses_mut`]: records its storage's address, then locks the rest.
    struct Lock<'a, 'b> {
        rest: &'a [&'a Tensor],
        got: RefCell<&'b mut Vec<u64>>,
        f: RefCell<&'b mut Then<'b>>,
    }

    impl candle_core::InplaceOp1 for Lock<'_, '_> {
        fn name(&self) -> &'static str {
            "adam-step-lock"
        }

        /// Host addresses: what the tests check the nesting with.
        fn cpu_fwd(&self, cs: &mut CpuStorage, layout: &Layout) -> Result<()> {
            let Some((start, _)) = layout.contiguous_offsets() else {
                candle_core::bail!("adam step: a non-contiguous tensor")
            };
            let addr = match cs {
                CpuStorage::F32(v) => v[start..].as_ptr() as u64,
                CpuStorage::F16(v) => v[start..].as_ptr() as u64,
                CpuStorage::BF16(v) => v[start..].as_ptr() as u64,
                _ => candle_core::bail!("adam step: an f32, f16 or bf16 tensor only"),
            };
            self.then(addr)
        }

        #[cfg(feature = "cuda")]
        fn cuda_fwd(&self, cs: &mut candle_core::CudaStorage, layout: &Layout) -> Result<()> {
            self.then(super::multi::address_mut(cs, layout)?)
        }
    }

    impl Lock<'_, '_> {
        /// Records this level's address, then locks the rest (or calls `f`).
        fn then(&self, addr: u64) -> Result<()> {
            let mut got = self.got.borrow_mut();
            got.push(addr);
            let mut f = self.f.borrow_mut();
            nest(self.rest, &mut got, &mut **f)
        }
    }

    #[cfg(test)]
    mod tests {
        use candle_core::{DType, Device, Tensor};

        /// The addresses come in the tensors' order, from each one's first element (a view's
        /// offset included), and `f` runs once, inside every lock.
        #[test]
        fn addresses_in_order_and_f_once() -> candle_core::Result<()> {
            let dev = Device::Cpu;
            let a = Tensor::zeros(5, DType::F32, &dev)?;
            let b = Tensor::zeros((2, 3), DType::BF16, &dev)?;
            let c = Tensor::zeros(8, DType::F32, &dev)?.narrow(0, 3, 4)?;
            let want: Vec<u64> = [(&a, 4), (&b, 2), (&c, 4)]
                .iter()
                .map(|(t, size)| {
                    let (s, l) = t.storage_and_layout();
                    let base = match &*s {
                        candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) => {
                            v.as_ptr() as u64
                        }
                        candle_core::Storage::Cpu(candle_core::CpuStorage::BF16(v)) => {
                            v.as_ptr() as u64
                        }
                        _ => unreachable!("the test's dtypes"),
                    };
                    base + (l.start_offset() * size) as u64
                })
                .collect();
            let mut calls = Vec::new();
            super::with_addresses_mut(&[&a, &b, &c], &mut |got| {
                calls.push(got.to_vec());
                Ok(())
            })?;
            assert_eq!(calls, vec![want]);
            Ok(())
        }
    }
}

/// The GPU's update of many parameters in one launch per gradient dtype
/// ([`crate::model::kernels::cuda::adam::adam_multi_step`]).
#[cfg(feature = "cuda")]
mod multi {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};
    use candle_core::{CudaStorage, DType, Layout, Result, Storage, Tensor};

    use super::locks::with_addresses_mut;
    use super::{Moments, ParamState};
    use crate::model::kernels::adam::AdamScalars;
    use crate::model::kernels::cuda::adam::{adam_multi_step, sum_squares_multi, MultiEntry};

    /// The sum of squares of every value of `grads` (contiguous, on one GPU), one launch per
    /// dtype.
    pub(super) fn sum_squares(grads: &[Tensor]) -> Result<f64> {
        let Some(first) = grads.first() else {
            return Ok(0.0);
        };
        let dev = first.device().as_cuda_device()?.clone();
        let mut sq = 0f64;
        for (dtype, group) in by_dtype(grads, |g| g) {
            // Read-locked until the launch is queued.
            let guards: Vec<_> = group.iter().map(|g| g.storage_and_layout()).collect();
            let entries = guards
                .iter()
                .zip(&group)
                .map(|((storage, layout), g)| {
                    let Storage::Cuda(cs) = &**storage else {
                        candle_core::bail!("gradient norm: a gradient is not on the GPU")
                    };
                    if !g.device().same_device(first.device()) {
                        candle_core::bail!("gradient norm: gradients on two GPUs")
                    }
                    Ok(MultiEntry {
                        w: 0,
                        g: address(cs, layout)?,
                        m: 0,
                        v: 0,
                        copy: 0,
                        len: g.elem_count(),
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            // SAFETY: each entry's gradient is on `dev`, contiguous (`address` checks) and
            // holds len values of `dtype`, read-locked until the launch is queued on the stream
            // all of candle's work uses.
            sq += unsafe { sum_squares_multi(&dev, &entries, dtype) }?;
            drop(guards);
        }
        Ok(sq)
    }

    /// Updates every `(parameter, contiguous gradient)` of `batch` (all on one GPU, f32 weights
    /// with their moments on it) and refreshes their compute copies.
    pub(super) fn step(batch: &[(&ParamState, Tensor)], s: AdamScalars) -> Result<()> {
        for (dtype, group) in by_dtype(batch, |(_, g)| g) {
            launch(&group, dtype, s)?;
            // A copy of another dtype than the gradient (its weight's own gradient was read)
            // is not written by the launch.
            for (p, _) in &group {
                if p.copy.as_ref().is_some_and(|c| c.dtype() != dtype) {
                    p.refresh_copy()?;
                }
            }
        }
        Ok(())
    }

    /// One launch over `group`, whose gradients are all `dtype`.
    fn launch(group: &[&(&ParamState, Tensor)], dtype: DType, s: AdamScalars) -> Result<()> {
        let Some((first, _)) = group.first() else {
            return Ok(());
        };
        let dev = first.var.device().as_cuda_device()?.clone();
        // The moments: every parameter's lock held until the launch is queued.
        let mut moments = group
            .iter()
            .map(|(p, _)| {
                p.moments
                    .lock()
                    .map_err(|_| candle_core::Error::Msg("poisoned optimiser state".into()))
            })
            .collect::<Result<Vec<_>>>()?;
        let stream = dev.cuda_stream();
        let mut mv = Vec::with_capacity(group.len());
        for ((p, _), mom) in group.iter().zip(moments.iter_mut()) {
            let Moments::Cuda { m, v } = &mut **mom else {
                candle_core::bail!("adam step: the moments of {} are not on the GPU", p.name)
            };
            if m.len() != p.var.elem_count() || v.len() != p.var.elem_count() {
                candle_core::bail!("adam step: the moments of {} are of another size", p.name)
            }
            let (m, _) = m.device_ptr_mut(&stream);
            let (v, _) = v.device_ptr_mut(&stream);
            mv.push((m, v));
        }
        // The gradients, read-locked until the launch is queued.
        let grads = group
            .iter()
            .map(|(p, g)| {
                if g.shape() != p.var.shape() || !g.device().same_device(p.var.device()) {
                    candle_core::bail!("adam step: the gradient of {} does not fit it", p.name)
                }
                Ok(g.storage_and_layout())
            })
            .collect::<Result<Vec<_>>>()?;
        let g_addr = grads
            .iter()
            .map(|(storage, layout)| match &**storage {
                Storage::Cuda(cs) => address(cs, layout),
                _ => candle_core::bail!("adam step: a gradient is not on the GPU"),
            })
            .collect::<Result<Vec<u64>>>()?;
        // The weights and the copies this launch writes, write-locked until it is queued.
        let copies: Vec<bool> = group
            .iter()
            .map(|(p, _)| p.copy.as_ref().is_some_and(|c| c.dtype() == dtype))
            .collect();
        let mut written: Vec<&Tensor> = group.iter().map(|(p, _)| p.var.as_tensor()).collect();
        written.extend(
            group
                .iter()
                .zip(&copies)
                .filter(|(_, &c)| c)
                .filter_map(|((p, _), _)| p.copy.as_ref().map(|c| c.as_tensor())),
        );
        with_addresses_mut(&written, &mut |addr| {
            let (w_addr, mut copy_addr) = addr.split_at(group.len());
            let mut entries = Vec::with_capacity(group.len());
            for (i, (p, _)) in group.iter().enumerate() {
                let copy = match copies[i] {
                    true => {
                        let Some((&c, rest)) = copy_addr.split_first() else {
                            candle_core::bail!("adam step: a compute copy went missing")
                        };
                        copy_addr = rest;
                        c
                    }
                    false => 0,
                };
                entries.push(MultiEntry {
                    w: w_addr[i],
                    g: g_addr[i],
                    m: mv[i].0,
                    v: mv[i].1,
                    copy,
                    len: p.var.elem_count(),
                });
            }
            // SAFETY: each entry's buffers are on `dev` and hold len values of their types:
            // the weight (f32, checked contiguous by its address), the gradient (`dtype`,
            // contiguous, of the weight's shape, checked above), the moments (f32, len each,
            // checked above) and the copy (`dtype`, the weight's shape, as `with_compute_copies`
            // checked). The written buffers are distinct storages (distinct variables, the
            // optimiser's own moments), none shared with a gradient. Every one is locked
            // until the launch is queued on the stream all of candle's work uses.
            unsafe { adam_multi_step(&dev, &entries, dtype, s) }
        })?;
        drop(grads);
        drop(moments);
        Ok(())
    }

    /// `items` in groups of one gradient dtype (each `grad` of), in a fixed order of dtypes.
    fn by_dtype<T>(items: &[T], grad: impl Fn(&T) -> &Tensor) -> Vec<(DType, Vec<&T>)> {
        let mut groups: Vec<(DType, Vec<&T>)> = Vec::new();
        for item in items {
            let dtype = grad(item).dtype();
            match groups.iter_mut().find(|(d, _)| *d == dtype) {
                Some((_, group)) => group.push(item),
                None => groups.push((dtype, vec![item])),
            }
        }
        groups.sort_by_key(|(d, _)| d.as_str());
        groups
    }

    /// Bytes from a storage's start to the first element `layout` takes, which must be
    /// contiguous there.
    fn offset_bytes(dtype: DType, layout: &Layout) -> Result<u64> {
        let Some((start, _)) = layout.contiguous_offsets() else {
            candle_core::bail!("adam step: a non-contiguous tensor")
        };
        Ok((start * dtype.size_in_bytes()) as u64)
    }

    /// The device address of the first element `layout` takes from `cs`, which must be
    /// contiguous there.
    fn address(cs: &CudaStorage, layout: &Layout) -> Result<u64> {
        let stream = cs.device().cuda_stream();
        let base = match cs.dtype() {
            DType::F32 => cs.as_cuda_slice::<f32>()?.device_ptr(&stream).0,
            DType::F16 => cs.as_cuda_slice::<half::f16>()?.device_ptr(&stream).0,
            DType::BF16 => cs.as_cuda_slice::<half::bf16>()?.device_ptr(&stream).0,
            d => candle_core::bail!("adam step: a {d:?} tensor"),
        };
        Ok(base + offset_bytes(cs.dtype(), layout)?)
    }

    /// [`address`] through the mutable borrow a writer holds.
    pub(super) fn address_mut(cs: &mut CudaStorage, layout: &Layout) -> Result<u64> {
        let stream = cs.device().cuda_stream();
        let dtype = cs.dtype();
        let base = match dtype {
            DType::F32 => cs.as_cuda_slice_mut::<f32>()?.device_ptr_mut(&stream).0,
            DType::F16 => {
                cs.as_cuda_slice_mut::<half::f16>()?
                    .device_ptr_mut(&stream)
                    .0
            }
            DType::BF16 => {
                cs.as_cuda_slice_mut::<half::bf16>()?
                    .device_ptr_mut(&stream)
                    .0
            }
            d => candle_core::bail!("adam step: a {d:?} tensor"),
        };
        Ok(base + offset_bytes(dtype, layout)?)
    }
}

/// [`Optimizer::with_layer_decay`]'s scale of each of `names` (Hugging Face CLIP names), in
/// order: each tower's depth counted from its own number of blocks among `model`'s weights.
fn layer_decay_scales(names: &[&str], model: &[&str], decay: f64) -> Vec<f64> {
    // (tower, depth): depth 0 the embeddings, i + 1 block i, None above the last block.
    let place = |name: &str| -> Option<(bool, usize)> {
        let text = name.starts_with("text_model.");
        if !text && !name.starts_with("vision_model.") {
            return None;
        }
        let rest = name.split_once('.').map_or("", |(_, r)| r);
        if rest.starts_with("embeddings.") || rest.starts_with("pre_layrnorm.") {
            return Some((text, 0));
        }
        let block = rest.strip_prefix("encoder.layers.")?;
        let i: usize = block.split('.').next()?.parse().ok()?;
        Some((text, i + 1))
    };
    let blocks = |tower: bool| {
        model
            .iter()
            .chain(names)
            .filter_map(|n| place(n))
            .filter(|(t, _)| *t == tower)
            .map(|(_, d)| d)
            .max()
            .unwrap_or(0)
    };
    let (text_blocks, vision_blocks) = (blocks(true), blocks(false));
    names
        .iter()
        .map(|n| match place(n) {
            Some((text, depth)) => {
                let top = if text { text_blocks } else { vision_blocks } + 1;
                decay.powi((top - depth) as i32)
            }
            None => 1.0,
        })
        .collect()
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

    /// Layer-wise decay: each tower counts its own blocks; embeddings lowest, the last block
    /// one factor below the top, norms after the last block, projections and the logit scale
    /// whole; a step moves each weight by its scale of the full-rate move (AdamW's first step
    /// moves every weight by its learning rate, the decoupled decay at that rate too).
    #[test]
    fn layer_decay_scales_each_parameters_rate() -> Result<()> {
        let names = [
            "logit_scale",
            "text_model.embeddings.token_embedding.weight",
            "text_model.encoder.layers.0.mlp.fc1.weight",
            "text_model.encoder.layers.1.self_attn.q_proj.weight",
            "text_model.final_layer_norm.weight",
            "text_projection.weight",
            "vision_model.embeddings.patch_embedding.weight",
            "vision_model.pre_layrnorm.bias",
            "vision_model.encoder.layers.0.layer_norm1.weight",
            "vision_model.encoder.layers.2.mlp.fc2.bias",
            "vision_model.post_layernorm.weight",
            "visual_projection.weight",
        ];
        let d: f64 = 0.5;
        let want = [
            1.0,
            d.powi(3),
            d.powi(2),
            d,
            1.0,
            1.0,
            d.powi(4),
            d.powi(4),
            d.powi(3),
            d,
            1.0,
            1.0,
        ];
        assert_eq!(layer_decay_scales(&names, &names, d), want);
        // Frozen blocks above the trained ones still count: with text block 1 frozen, block 0
        // keeps its d^2.
        let trained = [names[2]];
        assert_eq!(layer_decay_scales(&trained, &names, d), vec![d.powi(2)]);

        let vars: Vec<(String, Var)> = names
            .iter()
            .map(|n| Ok((n.to_string(), Var::new(&[1.0f32, -2.0], &Device::Cpu)?)))
            .collect::<Result<_>>()?;
        let mut opt = Optimizer::new(
            vars.clone(),
            OptimizerParams::new(OptimizerKind::AdamW, 0.1, 0.01),
        )?
        .with_layer_decay(d, &names)?;
        let loss = vars
            .iter()
            .map(|(_, v)| v.as_tensor().sum_all())
            .collect::<Result<Vec<_>>>()?;
        let loss = Tensor::stack(&loss, 0)?.sum_all()?;
        opt.step(&loss.backward()?)?;
        for ((name, v), scale) in vars.iter().zip(want) {
            let lr = 0.1 * scale;
            let got = v.as_tensor().to_vec1::<f32>()?;
            for (w, w0) in got.iter().zip([1.0f64, -2.0]) {
                let expect = w0 * (1.0 - lr * 0.01) - lr;
                assert!((*w as f64 - expect).abs() < 1e-6, "{name}: {w} vs {expect}");
            }
        }
        assert!(
            Optimizer::new(vars, OptimizerParams::new(OptimizerKind::Adam, 0.1, 0.0))?
                .with_layer_decay(1.5, &names)
                .is_err()
        );
        Ok(())
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

    /// A parameter after some steps: its weight, first and second moments, and compute copy
    /// (empty without one).
    type After = (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>);

    /// Three steps over parameters with bf16 compute copies (their gradients the copies') and
    /// one without, of sizes around the GPU's chunk: every weight, moment and copy after them.
    /// With `decay`, layer-wise decay gives each parameter another rate (on a GPU, a launch
    /// per dtype and rate).
    fn steps_with_copies(dev: &Device, decay: Option<f64>) -> Result<Vec<After>> {
        use candle_core::DType;
        let sizes = [5usize, 4099, 300];
        let val = |n: usize, seed: usize| -> Vec<f32> {
            (0..n)
                .map(|i| ((i * 7919 + seed * 104_729) % 2000) as f32 / 1000.0 - 0.9995)
                .collect()
        };
        let mut vars = Vec::new();
        let mut copies = std::collections::HashMap::new();
        let mut targets = Vec::new();
        // Block 0, block 1 and the projection of a two-block text tower.
        let names = [
            "text_model.encoder.layers.0.mlp.fc1.weight",
            "text_model.encoder.layers.1.mlp.fc1.weight",
            "text_projection.weight",
        ];
        for (i, &n) in sizes.iter().enumerate() {
            let name = names[i].to_string();
            let var = Var::from_tensor(&Tensor::from_vec(val(n, i), n, dev)?)?;
            let target = Tensor::from_vec(val(n, i + 10), n, dev)?;
            // The last parameter has no copy: its own f32 gradient, in its own launch.
            if i + 1 < sizes.len() {
                let copy = Var::from_tensor(&var.as_tensor().to_dtype(DType::BF16)?)?;
                copies.insert(name.clone(), copy);
                targets.push(target.to_dtype(DType::BF16)?);
            } else {
                targets.push(target);
            }
            vars.push((name, var));
        }
        let mut opt = Optimizer::new(vars, OptimizerParams::new(OptimizerKind::AdamW, 1e-2, 0.1))?
            .with_compute_copies(&copies)?;
        if let Some(d) = decay {
            opt = opt.with_layer_decay(d, &names)?;
        }
        for _ in 0..3 {
            // Linear in each weight: the gradients are the targets (none zero), exactly, on
            // every device.
            let mut loss = Tensor::new(0f32, dev)?;
            for (p, t) in opt.params.iter().zip(&targets) {
                let w = p.copy.as_ref().unwrap_or(&p.var).as_tensor();
                loss = (loss + (w * t)?.to_dtype(DType::F32)?.sum_all()?)?;
            }
            assert!(opt.step(&loss.backward()?)?);
        }
        let f32s = |t: &Tensor| t.to_dtype(DType::F32)?.to_vec1::<f32>();
        opt.params
            .iter()
            .map(|p| {
                let (m, v) = opt.moments(&p.name).expect("moments");
                let copy = match &p.copy {
                    Some(c) => f32s(c.as_tensor())?,
                    None => Vec::new(),
                };
                Ok((f32s(p.var.as_tensor())?, m, v, copy))
            })
            .collect()
    }

    /// On the CPU: each compute copy is its weight rounded after every step, and the weights
    /// moved.
    #[test]
    fn compute_copies_follow_their_weights() -> Result<()> {
        // Layer-wise decay moves the two blocks at their own rates, the projection at the full
        // one (so the GPU test's decayed case checks other numbers than its plain one).
        let (plain, decayed) = (
            steps_with_copies(&Device::Cpu, None)?,
            steps_with_copies(&Device::Cpu, Some(0.5))?,
        );
        assert!(plain[0].0 != decayed[0].0 && plain[1].0 != decayed[1].0);
        assert!(plain[2].0 == decayed[2].0);
        for (w, m, _, copy) in plain {
            assert!(m.iter().all(|&x| x != 0.0), "every value was updated");
            if !copy.is_empty() {
                let rounded: Vec<f32> = w
                    .iter()
                    .map(|&x| half::bf16::from_f32(x).to_f32())
                    .collect();
                assert_eq!(copy, rounded);
            }
        }
        Ok(())
    }

    /// On a GPU (CUDA builds): the gradients' sum of squares in one launch per dtype (f32 and
    /// bf16 tensors around the chunk size) is the CPU's f64 sum of the same values, to f32's
    /// rounding of the chunks' partial sums. Without a GPU it says so and checks nothing.
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_multi_tensor_norm_matches_the_cpu() -> Result<()> {
        use candle_core::DType;
        let Ok(gpu) = Device::new_cuda(0) else {
            eprintln!("cuda_multi_tensor_norm_matches_the_cpu: skipped, no GPU");
            return Ok(());
        };
        let mut grads = Vec::new();
        let mut want = 0f64;
        for (i, n) in [5usize, 4099, 300, 12_289].into_iter().enumerate() {
            let dtype = if i % 2 == 0 { DType::BF16 } else { DType::F32 };
            let t = Tensor::randn(0f32, 1.0, n, &Device::Cpu)?.to_dtype(dtype)?;
            want += t
                .to_dtype(DType::F64)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f64>()?;
            grads.push(t.to_device(&gpu)?);
        }
        let got = super::multi::sum_squares(&grads)?;
        assert!((got - want).abs() <= 1e-5 * want, "{got} against {want}");
        Ok(())
    }

    /// On a GPU (CUDA builds): the one-launch update (bf16 gradients and copies in one launch,
    /// the f32 parameter in another; under layer-wise decay one launch per dtype and rate)
    /// gives the CPU's bits for every weight, moment and copy. Without a GPU it says so and
    /// checks nothing.
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_multi_tensor_step_matches_the_cpu() -> Result<()> {
        let Ok(gpu) = Device::new_cuda(0) else {
            eprintln!("cuda_multi_tensor_step_matches_the_cpu: skipped, no GPU");
            return Ok(());
        };
        for decay in [None, Some(0.5)] {
            let (want, got) = (
                steps_with_copies(&Device::Cpu, decay)?,
                steps_with_copies(&gpu, decay)?,
            );
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            for (i, (a, b)) in want.iter().zip(&got).enumerate() {
                assert!(bits(&a.0) == bits(&b.0), "p{i} {decay:?}: weight differs");
                assert!(
                    bits(&a.1) == bits(&b.1),
                    "p{i} {decay:?}: first moment differs"
                );
                assert!(
                    bits(&a.2) == bits(&b.2),
                    "p{i} {decay:?}: second moment differs"
                );
                assert!(bits(&a.3) == bits(&b.3), "p{i} {decay:?}: copy differs");
            }
        }
        Ok(())
    }
}
