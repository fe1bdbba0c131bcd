//! CLIPLoss as a few ops with their own backward, in place of the two dozen tensor ops (and as
//! many more in the backward pass) that compose it: [`RowNorm`] (each feature row over its L2
//! norm, in f32), a GEMM for the similarities (candle's matmul), and [`ClipCe`] (the symmetric
//! cross-entropy over the scaled similarities, to the loss). On a GPU they are
//! `kernels/cuda/clip_loss.cu`; elsewhere the kernels' twins, which the normal test suite checks
//! against the composed loss, values and gradients.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::train_ops::f32_slice;
use crate::model::kernels::cuda::clip_loss as k;

/// `x / |x|` over the last dimension of a `[rows, cols]` input, in f32 whatever `x` holds.
#[derive(Debug, Clone, Copy)]
pub struct RowNorm;

/// From `x` and the f32 gradient of [`RowNorm`]'s output: the gradient of `x`, in `x`'s dtype.
#[derive(Debug, Clone, Copy)]
pub struct RowNormBackward;

/// `(CE(L, diag) + CE(L^T, diag)) / 2`, `L = exp(log_scale) x`, from the f32 similarities `x`
/// `[b, b]` and the f32 `log_scale` (one value, any shape): a scalar.
#[derive(Debug, Clone, Copy)]
pub struct ClipCe;

/// From `x`, `log_scale` and the loss's gradient: `b * b + 1` values, the gradient of `x`
/// (row-major), then of `log_scale`.
#[derive(Debug, Clone, Copy)]
pub struct ClipCeBackward;

/// The columns of a contiguous `[rows, cols]` layout.
fn cols_of(l: &Layout, op: &str) -> Result<usize> {
    if !l.is_contiguous() {
        candle_core::bail!("{op}: a contiguous input only");
    }
    Ok(l.shape().dims2()?.1)
}

/// Checks a `[b, b]` f32 similarity layout and a one-value scale.
fn check_ce(xl: &Layout, sl: &Layout) -> Result<usize> {
    let (b, c) = xl.shape().dims2()?;
    if b != c || !xl.is_contiguous() || sl.shape().elem_count() != 1 {
        candle_core::bail!(
            "CLIPLoss: similarities {:?} and a logit scale {:?}",
            xl.shape(),
            sl.shape()
        );
    }
    Ok(b)
}

impl CustomOp1 for RowNorm {
    fn name(&self) -> &'static str {
        "clipft-row-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let cols = cols_of(l, self.name())?;
        let y = k::row_norm_twin(&super::twin_input(s, l, self.name())?, cols)?;
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let cols = cols_of(l, self.name())?;
        let dev = s.device.clone();
        let out = by_dtype!(s, self.name(), |T, suffix| {
            let y = k::row_norm::<T>(suffix, &dev, &super::cuda_view::<T>(s, l)?, cols)?;
            candle_core::CudaStorage::wrap_cuda_slice(y, dev.clone())
        });
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = grad.to_dtype(candle_core::DType::F32)?.contiguous()?;
        Ok(Some(
            x.contiguous()?.apply_op2_no_bwd(&g, &RowNormBackward)?,
        ))
    }
}

impl CustomOp2 for RowNormBackward {
    fn name(&self) -> &'static str {
        "clipft-row-norm-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let cols = cols_of(xl, self.name())?;
        if gl.shape() != xl.shape() {
            candle_core::bail!(
                "{}: a gradient {:?} for {:?}",
                self.name(),
                gl.shape(),
                xl.shape()
            );
        }
        let dx = k::row_norm_backward_twin(
            &super::twin_input(xs, xl, self.name())?,
            f32_slice(gs, gl, self.name())?,
            cols,
        )?;
        Ok((super::twin_output(xs, dx), xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let cols = cols_of(xl, self.name())?;
        if gl.shape() != xl.shape() || !gl.is_contiguous() {
            candle_core::bail!(
                "{}: a gradient {:?} for {:?}",
                self.name(),
                gl.shape(),
                xl.shape()
            );
        }
        let dev = xs.device.clone();
        let g = super::cuda_view::<f32>(gs, gl)?;
        let out = by_dtype!(xs, self.name(), |T, suffix| {
            let x = super::cuda_view::<T>(xs, xl)?;
            let dx = k::row_norm_backward::<T>(suffix, &dev, &x, &g, cols)?;
            candle_core::CudaStorage::wrap_cuda_slice(dx, dev.clone())
        });
        Ok((out, xl.shape().clone()))
    }
}

impl CustomOp2 for ClipCe {
    fn name(&self) -> &'static str {
        "clipft-clip-ce"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        check_ce(xl, sl)?;
        let scale = f32_slice(ss, sl, self.name())?[0];
        let loss = k::clip_ce_twin(f32_slice(xs, xl, self.name())?, scale)?;
        Ok((CpuStorage::F32(vec![loss]), Shape::from(())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ss: &candle_core::CudaStorage,
        sl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        check_ce(xl, sl)?;
        let dev = xs.device.clone();
        let loss = k::clip_ce(
            &dev,
            &super::cuda_view::<f32>(xs, xl)?,
            &super::cuda_view::<f32>(ss, sl)?,
        )?;
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(loss, dev),
            Shape::from(()),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        log_scale: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let b = x.dim(0)?;
        let g = grad.to_dtype(candle_core::DType::F32)?.contiguous()?;
        let all = x.apply_op3_no_bwd(&log_scale.contiguous()?, &g, &ClipCeBackward)?;
        let dx = all.narrow(0, 0, b * b)?.reshape((b, b))?;
        let ds = all.narrow(0, b * b, 1)?.reshape(log_scale.shape())?;
        Ok((Some(dx), Some(ds)))
    }
}

impl CustomOp3 for ClipCeBackward {
    fn name(&self) -> &'static str {
        "clipft-clip-ce-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let b = check_ce(xl, sl)?;
        let scale = f32_slice(ss, sl, self.name())?[0];
        let g = match f32_slice(gs, gl, self.name())? {
            [g] => *g,
            g => candle_core::bail!("{}: one upstream gradient, not {}", self.name(), g.len()),
        };
        let out = k::clip_ce_backward_twin(f32_slice(xs, xl, self.name())?, scale, g)?;
        Ok((CpuStorage::F32(out), Shape::from(b * b + 1)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ss: &candle_core::CudaStorage,
        sl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let b = check_ce(xl, sl)?;
        let dev = xs.device.clone();
        let (x, s, g) = (
            super::cuda_view::<f32>(xs, xl)?,
            super::cuda_view::<f32>(ss, sl)?,
            super::cuda_view::<f32>(gs, gl)?,
        );
        let out = k::clip_ce_backward(&dev, &x, &s, &g)?;
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(out, dev),
            Shape::from(b * b + 1),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var, D};

    /// The loss as tensor ops (what `trainer::loss` composed before these ops).
    fn composed(t: &Tensor, i: &Tensor, ls: &Tensor) -> Result<Tensor> {
        let norm = |x: &Tensor| -> Result<Tensor> {
            let x = x.to_dtype(DType::F32)?;
            x.broadcast_div(&x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?)
        };
        let logits = norm(t)?.matmul(&norm(i)?.t()?)?.broadcast_mul(&ls.exp()?)?;
        let labels = Tensor::arange(0u32, t.dim(0)? as u32, t.device())?;
        let a = candle_nn::loss::cross_entropy(&logits, &labels)?;
        let c = candle_nn::loss::cross_entropy(&logits.t()?, &labels)?;
        (a + c)? / 2.0
    }

    fn fused(t: &Tensor, i: &Tensor, ls: &Tensor) -> Result<Tensor> {
        let x = t.apply_op1(RowNorm)?.matmul(&i.apply_op1(RowNorm)?.t()?)?;
        x.apply_op2(ls, ClipCe)
    }

    /// The ops give the composed loss and its gradients (features in f32, f16 and bf16; the
    /// logit scale's too), over more pairs than a warp has lanes.
    #[test]
    fn ops_match_the_composed_loss() -> Result<()> {
        let dev = Device::Cpu;
        for (b, d) in [(3, 8), (45, 64)] {
            let t0 = Tensor::randn(0f32, 1.0, (b, d), &dev)?;
            let i0 = (t0.clone() * 0.3 + Tensor::randn(0f32, 1.0, (b, d), &dev)?)?;
            for (dt, tol) in [(DType::F32, 2e-5), (DType::F16, 1e-2), (DType::BF16, 5e-2)] {
                let t = Var::from_tensor(&t0.to_dtype(dt)?)?;
                let i = Var::from_tensor(&i0.to_dtype(dt)?)?;
                let ls = Var::from_tensor(&Tensor::new(2.5f32, &dev)?)?;
                let (tt, it, lt) = (t.as_tensor(), i.as_tensor(), ls.as_tensor());
                let want = composed(tt, it, lt)?;
                let got = fused(tt, it, lt)?;
                let (w, g) = (want.to_scalar::<f32>()?, got.to_scalar::<f32>()?);
                assert!(
                    (w - g).abs() < 1e-5 * w.abs().max(1.0),
                    "{dt:?} b{b}: {g} vs {w}"
                );
                let (gw, gg) = (want.backward()?, got.backward()?);
                for (name, v) in [("text", tt), ("image", it), ("logit_scale", lt)] {
                    let a = gg.get(v).expect("op gradient").to_dtype(DType::F32)?;
                    let e = gw.get(v).expect("composed gradient").to_dtype(DType::F32)?;
                    // Gradients are sums whose terms can cancel to near zero in a random draw
                    // (three pairs whose features already match), so rounding is measured
                    // against a floor of the terms' size, not against the sum alone: the logit
                    // scale's terms are logits times their gradients, logits up to
                    // exp(2.5) = 12 here.
                    let floor = if name == "logit_scale" { 1.0 } else { 0.05 };
                    let scale = e.abs()?.max_all()?.to_scalar::<f32>()?.max(floor);
                    let err = (a - e)?.abs()?.max_all()?.to_scalar::<f32>()?;
                    assert!(err <= tol * scale, "{dt:?} b{b} {name}: {err} of {scale}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn refuses_what_it_cannot_take() -> Result<()> {
        let dev = Device::Cpu;
        let ls = Tensor::new(1f32, &dev)?;
        let rect = Tensor::zeros((2, 3), DType::F32, &dev)?;
        assert!(rect.apply_op2_no_bwd(&ls, &ClipCe).is_err());
        let two = Tensor::zeros(2, DType::F32, &dev)?;
        let square = Tensor::zeros((2, 2), DType::F32, &dev)?;
        assert!(square.apply_op2_no_bwd(&two, &ClipCe).is_err());
        assert!(Tensor::zeros(4, DType::F32, &dev)?
            .apply_op1_no_bwd(&RowNorm)
            .is_err());
        Ok(())
    }

    /// On a GPU (CUDA builds): the kernels against their twins, values and gradients, every
    /// feature dtype. Without a GPU it says so and checks nothing.
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_clip_loss_matches_its_twin() -> Result<()> {
        let Ok(gpu) = Device::new_cuda(0) else {
            eprintln!("cuda_clip_loss_matches_its_twin: skipped, no GPU");
            return Ok(());
        };
        let cpu = Device::Cpu;
        for (b, d) in [(5, 64), (256, 512)] {
            let t0 = Tensor::randn(0f32, 1.0, (b, d), &cpu)?;
            let i0 = (t0.clone() * 0.3 + Tensor::randn(0f32, 1.0, (b, d), &cpu)?)?;
            for dt in [DType::F32, DType::F16, DType::BF16] {
                let run = |dev: &Device| -> Result<Vec<Vec<f32>>> {
                    let t = Var::from_tensor(&t0.to_dtype(dt)?.to_device(dev)?)?;
                    let i = Var::from_tensor(&i0.to_dtype(dt)?.to_device(dev)?)?;
                    let ls = Var::from_tensor(&Tensor::new(2.5f32, dev)?)?;
                    let loss = fused(t.as_tensor(), i.as_tensor(), ls.as_tensor())?;
                    let g = loss.backward()?;
                    let mut out = vec![vec![loss.to_scalar::<f32>()?]];
                    for v in [t.as_tensor(), i.as_tensor(), ls.as_tensor()] {
                        let x = g.get(v).expect("gradient").to_dtype(DType::F32)?;
                        out.push(x.flatten_all()?.to_device(&cpu)?.to_vec1::<f32>()?);
                    }
                    Ok(out)
                };
                let (want, got) = (run(&cpu)?, run(&gpu)?);
                for (n, (w, g)) in want.iter().zip(&got).enumerate() {
                    let scale = w.iter().fold(1e-6f32, |m, x| m.max(x.abs()));
                    let err = w.iter().zip(g).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                    let tol = if dt == DType::F32 { 1e-4 } else { 2e-2 };
                    assert!(
                        err <= tol * scale,
                        "{dt:?} b{b} output {n}: {err} of {scale}"
                    );
                }
            }
        }
        Ok(())
    }
}
