//! A linear layer's tail as one op over the product `x W^T`: [`BiasAct`] (`act(y + b)`, the
//! MLP's first layer) and [`BiasResidual`] (`y + b + r`, the layers that close a residual
//! branch). On a GPU each is one kernel of `kernels/cuda/elementwise.cu` instead of candle's
//! bias, activation (three kernels for quick_gelu) and residual kernels; on the CPU they run the
//! kernels' twins. Both carry a backward made of ops, so it runs where the tensors are:
//! [`BiasActBackward`] (one kernel) plus the bias's column sum; the residual's is the identity.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::bias_grad;

use crate::model::kernels::cuda::elementwise::{
    bias_act_backward_twin, bias_act_twin, bias_residual_twin, column_sum_twin, Act,
};

/// `act(y + b)` over the last dimension.
#[derive(Debug, Clone, Copy)]
pub struct BiasAct {
    pub act: Act,
}

/// The gradient of [`BiasAct`]'s pre-activation, `dy * act'(y + b)`, from `y`, `b` and `dy`.
#[derive(Debug, Clone, Copy)]
pub struct BiasActBackward {
    pub act: Act,
}

/// The sum over every row of each column of the last dimension (a bias's gradient): one
/// column-sum kernel in the input's dtype with f32 accumulation on a GPU, its twin on the CPU.
#[derive(Debug, Clone, Copy)]
pub struct ColumnSum;

/// `y + b + r` over the last dimension (`r` shaped as `y`).
#[derive(Debug, Clone, Copy)]
pub struct BiasResidual;

/// The bias must match the last dimension of `y`; inputs contiguous.
fn check(ls: &[&Layout]) -> Result<()> {
    let (y, b) = (ls[0], ls[1]);
    let cols = y.shape().dims().last().copied().unwrap_or(0);
    if b.shape().dims() != [cols] {
        candle_core::bail!("fused tail: bias {:?} for rows of {cols}", b.shape());
    }
    if ls.iter().any(|l| !l.is_contiguous()) {
        candle_core::bail!("fused tail: contiguous inputs only");
    }
    if let Some(r) = ls.get(2) {
        if r.shape() != y.shape() {
            candle_core::bail!("fused tail: residual {:?} for {:?}", r.shape(), y.shape());
        }
    }
    Ok(())
}

impl CustomOp2 for BiasAct {
    fn name(&self) -> &'static str {
        "clipft-bias-act"
    }

    fn cpu_fwd(
        &self,
        ys: &CpuStorage,
        yl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        check(&[yl, bl])?;
        let out = bias_act_twin(
            &super::twin_input(ys, yl, self.name())?,
            &super::twin_input(bs, bl, self.name())?,
            self.act,
        )?;
        Ok((super::twin_output(ys, out), yl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        ys: &candle_core::CudaStorage,
        yl: &Layout,
        bs: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::model::kernels::cuda::elementwise;
        check(&[yl, bl])?;
        let dev = ys.device.clone();
        let out = by_dtype!(ys, self.name(), |T, suffix| {
            let (y, b) = (
                super::cuda_view::<T>(ys, yl)?,
                super::cuda_view::<T>(bs, bl)?,
            );
            let out = elementwise::bias_act::<T>(suffix, &dev, &y, &b, self.act)?;
            candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone())
        });
        Ok((out, yl.shape().clone()))
    }

    fn bwd(
        &self,
        y: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dz = y.apply_op3_no_bwd(b, &grad.contiguous()?, &BiasActBackward { act: self.act })?;
        let db = bias_grad(&dz)?;
        Ok((Some(dz), Some(db)))
    }
}

impl CustomOp3 for BiasActBackward {
    fn name(&self) -> &'static str {
        "clipft-bias-act-backward"
    }

    fn cpu_fwd(
        &self,
        ys: &CpuStorage,
        yl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        check(&[yl, bl, gl])?;
        let out = bias_act_backward_twin(
            &super::twin_input(ys, yl, self.name())?,
            &super::twin_input(bs, bl, self.name())?,
            &super::twin_input(gs, gl, self.name())?,
            self.act,
        )?;
        Ok((super::twin_output(ys, out), yl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        ys: &candle_core::CudaStorage,
        yl: &Layout,
        bs: &candle_core::CudaStorage,
        bl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::model::kernels::cuda::elementwise;
        check(&[yl, bl, gl])?;
        let dev = ys.device.clone();
        let out = by_dtype!(ys, self.name(), |T, suffix| {
            let view = super::cuda_view::<T>;
            let (y, b, g) = (view(ys, yl)?, view(bs, bl)?, view(gs, gl)?);
            let out = elementwise::bias_act_backward::<T>(suffix, &dev, &y, &b, &g, self.act)?;
            candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone())
        });
        Ok((out, yl.shape().clone()))
    }
}

impl candle_core::CustomOp1 for ColumnSum {
    fn name(&self) -> &'static str {
        "clipft-column-sum"
    }

    fn cpu_fwd(&self, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let cols = gl.shape().dims().last().copied().unwrap_or(0);
        let sums = column_sum_twin(&super::twin_input(gs, gl, self.name())?, cols)?;
        Ok((super::twin_output(gs, sums), Shape::from(cols)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::model::kernels::cuda::elementwise;
        if !gl.is_contiguous() {
            candle_core::bail!("column sum: a contiguous input only");
        }
        let cols = gl.shape().dims().last().copied().unwrap_or(0);
        let dev = gs.device.clone();
        let out = by_dtype!(gs, self.name(), |T, suffix| {
            let g = super::cuda_view::<T>(gs, gl)?;
            let out = elementwise::column_sum::<T>(suffix, &dev, &g, cols)?;
            candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone())
        });
        Ok((out, Shape::from(cols)))
    }
}

impl CustomOp3 for BiasResidual {
    fn name(&self) -> &'static str {
        "clipft-bias-residual"
    }

    fn cpu_fwd(
        &self,
        ys: &CpuStorage,
        yl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
        rs: &CpuStorage,
        rl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        check(&[yl, bl, rl])?;
        let out = bias_residual_twin(
            &super::twin_input(ys, yl, self.name())?,
            &super::twin_input(bs, bl, self.name())?,
            &super::twin_input(rs, rl, self.name())?,
        )?;
        Ok((super::twin_output(ys, out), yl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        ys: &candle_core::CudaStorage,
        yl: &Layout,
        bs: &candle_core::CudaStorage,
        bl: &Layout,
        rs: &candle_core::CudaStorage,
        rl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::model::kernels::cuda::elementwise;
        check(&[yl, bl, rl])?;
        let dev = ys.device.clone();
        let out = by_dtype!(ys, self.name(), |T, suffix| {
            let view = super::cuda_view::<T>;
            let (y, b, r) = (view(ys, yl)?, view(bs, bl)?, view(rs, rl)?);
            let out = elementwise::bias_residual::<T>(suffix, &dev, &y, &b, &r)?;
            candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone())
        });
        Ok((out, yl.shape().clone()))
    }

    fn bwd(
        &self,
        _y: &Tensor,
        _b: &Tensor,
        _r: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        Ok((
            Some(grad.clone()),
            Some(bias_grad(grad)?),
            Some(grad.clone()),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Tensor};

    /// The ops (on the CPU: the kernels' twins) equal candle's composed ops, in three dtypes.
    #[test]
    fn ops_match_composed() -> Result<()> {
        let dev = Device::Cpu;
        let y = Tensor::randn(0f32, 2.0, (3, 5, 24), &dev)?;
        let b = Tensor::randn(0f32, 1.0, 24, &dev)?;
        let r = Tensor::randn(0f32, 1.0, (3, 5, 24), &dev)?;
        let z = y.broadcast_add(&b)?;
        let want = [
            (
                Act::QuickGelu,
                (&z * candle_nn::ops::sigmoid(&(&z * 1.702)?)?)?,
            ),
            (Act::Gelu, z.gelu_erf()?),
            (Act::Identity, z.clone()),
        ];
        let residual = (&z + &r)?;
        for (dt, tol) in [(DType::F32, 1e-5), (DType::F16, 2e-2), (DType::BF16, 1e-1)] {
            let (yd, bd, rd) = (y.to_dtype(dt)?, b.to_dtype(dt)?, r.to_dtype(dt)?);
            for (act, w) in &want {
                let got = yd.apply_op2_no_bwd(&bd, &BiasAct { act: *act })?;
                let err = (got.to_dtype(DType::F32)? - w)?
                    .abs()?
                    .max_all()?
                    .to_scalar::<f32>()?;
                assert!(err < tol, "{dt:?} {act:?}: {err}");
            }
            let got = yd.apply_op3_no_bwd(&bd, &rd, &BiasResidual)?;
            let err = (got.to_dtype(DType::F32)? - &residual)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert!(err < tol, "{dt:?} residual: {err}");
        }
        let bad = Tensor::zeros(23, DType::F32, &dev)?;
        assert!(y
            .apply_op2_no_bwd(&bad, &BiasAct { act: Act::Gelu })
            .is_err());
        Ok(())
    }

    /// The ops' backward gives candle's autograd gradients of the composed ops: product, bias
    /// and residual, each activation.
    #[test]
    fn backward_matches_autograd() -> Result<()> {
        use candle_core::Var;
        let dev = Device::Cpu;
        let y = Var::from_tensor(&Tensor::randn(0f32, 2.0, (3, 5, 24), &dev)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f32, 1.0, 24, &dev)?)?;
        let r = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 5, 24), &dev)?)?;
        let w = Tensor::randn(0f32, 1.0, (3, 5, 24), &dev)?;
        let vars = [&y, &b, &r];
        let grads = |loss: Tensor| -> Result<Vec<Tensor>> {
            let g = loss.mul(&w)?.sum_all()?.backward()?;
            vars.iter()
                .map(|v| match g.get(v.as_tensor()) {
                    Some(t) => Ok(t.clone()),
                    None => v.zeros_like(),
                })
                .collect()
        };
        let z = || y.as_tensor().broadcast_add(b.as_tensor());
        for act in [Act::QuickGelu, Act::Gelu, Act::Identity] {
            let want = match act {
                Act::QuickGelu => {
                    let z = z()?;
                    (&z * candle_nn::ops::sigmoid(&(&z * 1.702)?)?)?
                }
                Act::Gelu => z()?.gelu_erf()?,
                Act::Identity => z()?,
            };
            let want = grads(want)?;
            let got = grads(y.as_tensor().apply_op2(b.as_tensor(), BiasAct { act })?)?;
            for (g, w) in got.iter().zip(&want) {
                let err = (g - w)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(err < 1e-4, "{act:?}: {err}");
            }
        }
        let want = grads((z()? + r.as_tensor())?)?;
        let got = grads(
            y.as_tensor()
                .apply_op3(b.as_tensor(), r.as_tensor(), BiasResidual)?,
        )?;
        for (g, w) in got.iter().zip(&want) {
            let err = (g - w)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(err < 1e-5, "residual: {err}");
        }
        Ok(())
    }

    /// On a GPU (CUDA builds): each kernel against its twin, every dtype. Without a GPU it says
    /// so and checks nothing.
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_kernel_tails_match_their_twins() -> Result<()> {
        let Ok(gpu) = Device::new_cuda(0) else {
            eprintln!("cuda_kernel_tails_match_their_twins: skipped, no GPU");
            return Ok(());
        };
        let y = Tensor::randn(0f32, 2.0, (256, 50, 3072), &Device::Cpu)?;
        let b = Tensor::randn(0f32, 1.0, 3072, &Device::Cpu)?;
        // Both sides compute in f32 from the same inputs and round once: at most a unit in the
        // last place apart (exp and erf differ in their last bits), relative to the value.
        let rel = |got: Tensor, twin: Tensor| -> Result<f32> {
            let scale = twin.abs()?.maximum(1f32)?;
            ((got - twin)?.abs()? / scale)?
                .max_all()?
                .to_scalar::<f32>()
        };
        for (dt, tol) in [(DType::F32, 1e-5), (DType::F16, 1e-3), (DType::BF16, 8e-3)] {
            let (yc, bc) = (y.to_dtype(dt)?, b.to_dtype(dt)?);
            let (yg, bg) = (yc.to_device(&gpu)?, bc.to_device(&gpu)?);
            for act in [Act::QuickGelu, Act::Gelu, Act::Identity] {
                let op = BiasAct { act };
                let twin = yc.apply_op2_no_bwd(&bc, &op)?.to_dtype(DType::F32)?;
                let got = yg.apply_op2_no_bwd(&bg, &op)?;
                let got = got.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
                let err = rel(got, twin)?;
                assert!(err <= tol, "{dt:?} {act:?}: {err}");
            }
            for act in [Act::QuickGelu, Act::Gelu] {
                let op = BiasActBackward { act };
                let twin = yc.apply_op3_no_bwd(&bc, &yc, &op)?.to_dtype(DType::F32)?;
                let got = yg.apply_op3_no_bwd(&bg, &yg, &op)?;
                let got = got.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
                let err = rel(got, twin)?;
                assert!(err <= tol, "{dt:?} {act:?} backward: {err}");
            }
            // A bias's gradient over 12800 rows: f32 sums in a different order on each side.
            let twin = yc.apply_op1_no_bwd(&ColumnSum)?.to_dtype(DType::F32)?;
            let got = yg.apply_op1_no_bwd(&ColumnSum)?;
            let got = got.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
            let scale = twin.abs()?.max_all()?.to_scalar::<f32>()?.max(1.0);
            let err = (got - &twin)?.abs()?.max_all()?.to_scalar::<f32>()? / scale;
            assert!(err <= tol.max(1e-4), "{dt:?} column sum: {err}");
            let twin = yc
                .apply_op3_no_bwd(&bc, &yc, &BiasResidual)?
                .to_dtype(DType::F32)?;
            let got = yg.apply_op3_no_bwd(&bg, &yg, &BiasResidual)?;
            let got = got.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
            let err = rel(got, twin)?;
            assert!(err <= tol, "{dt:?} residual: {err}");
        }
        Ok(())
    }
}
