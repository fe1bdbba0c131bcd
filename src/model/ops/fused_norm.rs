//! Layer normalisation as one op with its backward, for training on the GPU: candle's fused
//! `layer_norm` records no gradient (a model trained through it silently loses the norms'
//! gradients and everything below them), and the composed form is a dozen kernels each way.
//! On a GPU the forward and backward are `kernels/cuda/layernorm.cu`; on the CPU they run the
//! kernels' twins, which the normal test suite checks. The backward ([`LayerNormBackward`]) is
//! an op itself, so the gradient stays on the device.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use crate::model::kernels::cuda::layernorm::{
    add_residual_grad, layer_norm_backward_twin, layer_norm_twin, residual_layer_norm_twin,
};

/// `(x - mean) / sqrt(var + eps) * w + b` over the last dimension of `x`.
#[derive(Debug, Clone, Copy)]
pub struct FusedLayerNorm {
    pub eps: f32,
}

/// From `x`, `w` and the output's gradient: `[rows + 2, cols]`, the gradient of `x` (rows
/// flattened), then of `w`, then of `b`. With `residual` (shaped as `x`: the gradient that
/// reaches `x` directly, past the norm, in a pre-LN block), `x`'s gradient is the sum of the
/// two, added in the kernel's pass instead of a separate one (the same values).
#[derive(Debug, Clone)]
pub struct LayerNormBackward {
    pub eps: f32,
    pub residual: Option<Tensor>,
}

/// The gradients of a [`FusedLayerNorm`] of `x` with weight `w` for the output's gradient
/// `grad`: `x`'s (plus `residual` where given, see [`LayerNormBackward`]), `w`'s and the
/// bias's.
pub fn layer_norm_backward(
    x: &Tensor,
    w: &Tensor,
    grad: &Tensor,
    eps: f32,
    residual: Option<&Tensor>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let residual = residual.map(Tensor::contiguous).transpose()?;
    let all = x.apply_op3_no_bwd(w, &grad.contiguous()?, &LayerNormBackward { eps, residual })?;
    let rows = all.dim(0)? - 2;
    let dx = all.narrow(0, 0, rows)?.reshape(x.shape())?;
    Ok((dx, all.get(rows)?, all.get(rows + 1)?))
}

/// The residual add that closes a block's branch and the layer norm after it, for inference on
/// the GPU path: from the product `y`, the residual `r` (shaped as `y`) and `params` (`[3,
/// cols]`: the closing linear's bias, the norm's weight and bias), `[2, ..y's shape]`: the
/// residual stream `y + b + r`, then its layer norm. One kernel
/// (`clipft_residual_layernorm_*`) instead of the residual kernel and the norm's pass over
/// what it wrote; on the CPU the kernel's twin. No backward: training keeps the two ops.
#[derive(Debug, Clone, Copy)]
pub struct ResidualNorm {
    pub eps: f32,
}

impl ResidualNorm {
    /// Columns, checking `r` is shaped as `y`, `params` is `[3, cols]`, all contiguous.
    fn check(yl: &Layout, rl: &Layout, pl: &Layout) -> Result<usize> {
        let cols = yl.shape().dims().last().copied().unwrap_or(0);
        if rl.shape() != yl.shape() || pl.shape().dims() != [3, cols] {
            candle_core::bail!(
                "residual norm: a residual {:?} and parameters {:?} for {:?}",
                rl.shape(),
                pl.shape(),
                yl.shape()
            );
        }
        if [yl, rl, pl].iter().any(|l| !l.is_contiguous()) {
            candle_core::bail!("residual norm: contiguous inputs only");
        }
        Ok(cols)
    }

    fn out_shape(yl: &Layout) -> Shape {
        let mut dims = vec![2];
        dims.extend_from_slice(yl.shape().dims());
        Shape::from(dims)
    }
}

impl CustomOp3 for ResidualNorm {
    fn name(&self) -> &'static str {
        "clipft-residual-norm"
    }

    fn cpu_fwd(
        &self,
        ys: &CpuStorage,
        yl: &Layout,
        rs: &CpuStorage,
        rl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let cols = Self::check(yl, rl, pl)?;
        let p = super::twin_input(ps, pl, self.name())?;
        let (b, rest) = p.split_at(cols);
        let (w, lb) = rest.split_at(cols);
        let round = super::twin_rounding(ys);
        let out = residual_layer_norm_twin(
            &super::twin_input(ys, yl, self.name())?,
            b,
            &super::twin_input(rs, rl, self.name())?,
            w,
            lb,
            self.eps,
            round,
        )?;
        Ok((super::twin_output(ys, out), Self::out_shape(yl)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        ys: &candle_core::CudaStorage,
        yl: &Layout,
        rs: &candle_core::CudaStorage,
        rl: &Layout,
        ps: &candle_core::CudaStorage,
        pl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::model::kernels::cuda::layernorm;
        let cols = Self::check(yl, rl, pl)?;
        let dev = ys.device.clone();
        let out = by_dtype!(ys, self.name(), |T, suffix| {
            let (y, r, p) = (
                super::cuda_view::<T>(ys, yl)?,
                super::cuda_view::<T>(rs, rl)?,
                super::cuda_view::<T>(ps, pl)?,
            );
            let (b, w, lb) = (
                p.slice(..cols),
                p.slice(cols..2 * cols),
                p.slice(2 * cols..),
            );
            let out =
                layernorm::residual_layer_norm::<T>(suffix, &dev, &y, &b, &r, &w, &lb, self.eps)?;
            candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone())
        });
        Ok((out, Self::out_shape(yl)))
    }
}

/// Columns of `x` and the checks every input shares: `w` (and the third input, a bias or the
/// gradient) per column or shaped as `x`, everything contiguous.
fn check(ls: [&Layout; 3], third_like_x: bool) -> Result<usize> {
    let [x, w, t] = ls;
    let cols = x.shape().dims().last().copied().unwrap_or(0);
    if w.shape().dims() != [cols] {
        candle_core::bail!("layer norm: weight {:?} for rows of {cols}", w.shape());
    }
    let want = if third_like_x {
        x.shape().dims()
    } else {
        w.shape().dims()
    };
    if t.shape().dims() != want {
        candle_core::bail!("layer norm: {:?} where {want:?} was expected", t.shape());
    }
    if ls.iter().any(|l| !l.is_contiguous()) {
        candle_core::bail!("layer norm: contiguous inputs only");
    }
    Ok(cols)
}

impl CustomOp3 for FusedLayerNorm {
    fn name(&self) -> &'static str {
        "clipft-layer-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        check([xl, wl, bl], false)?;
        let y = layer_norm_twin(
            &super::twin_input(xs, xl, self.name())?,
            &super::twin_input(ws, wl, self.name())?,
            &super::twin_input(bs, bl, self.name())?,
            self.eps,
        )?;
        Ok((super::twin_output(xs, y), xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
        bs: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::model::kernels::cuda::layernorm;
        check([xl, wl, bl], false)?;
        let dev = xs.device.clone();
        let out = by_dtype!(xs, self.name(), |T, suffix| {
            let (x, w, b) = (
                super::cuda_view::<T>(xs, xl)?,
                super::cuda_view::<T>(ws, wl)?,
                super::cuda_view::<T>(bs, bl)?,
            );
            let y = layernorm::layer_norm::<T>(suffix, &dev, &x, &w, &b, self.eps)?;
            candle_core::CudaStorage::wrap_cuda_slice(y, dev.clone())
        });
        Ok((out, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = layer_norm_backward(x, w, grad, self.eps, None)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

impl CustomOp3 for LayerNormBackward {
    fn name(&self) -> &'static str {
        "clipft-layer-norm-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let cols = check([xl, wl, gl], true)?;
        let mut out = layer_norm_backward_twin(
            &super::twin_input(xs, xl, self.name())?,
            &super::twin_input(ws, wl, self.name())?,
            &super::twin_input(gs, gl, self.name())?,
            self.eps,
        )?;
        if let Some(r) = &self.residual {
            let dres = super::twin_tensor(r, self.name())?;
            let n = xl.shape().elem_count();
            if dres.len() != n || r.dtype() != candle_core::backend::BackendStorage::dtype(xs) {
                candle_core::bail!("layer norm backward: a residual gradient unlike the input");
            }
            add_residual_grad(&mut out[..n], &dres, super::twin_rounding(xs));
        }
        let rows = out.len() / cols;
        Ok((super::twin_output(xs, out), Shape::from((rows, cols))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::model::kernels::cuda::layernorm;
        let cols = check([xl, wl, gl], true)?;
        let rows = xl.shape().elem_count() / cols.max(1);
        let dev = xs.device.clone();
        use candle_core::backend::BackendStorage;
        let residual = self.residual.as_ref().map(|r| r.storage_and_layout());
        let residual = match &residual {
            Some((rs, rl)) => match &**rs {
                candle_core::Storage::Cuda(rs) if rs.dtype() == xs.dtype() => Some((rs, *rl)),
                _ => candle_core::bail!(
                    "layer norm backward: the residual gradient is not on the GPU in the input's type"
                ),
            },
            None => None,
        };
        let out = by_dtype!(xs, self.name(), |T, suffix| {
            let (x, w, g) = (
                super::cuda_view::<T>(xs, xl)?,
                super::cuda_view::<T>(ws, wl)?,
                super::cuda_view::<T>(gs, gl)?,
            );
            let r = residual
                .map(|(rs, rl)| super::cuda_view::<T>(rs, rl))
                .transpose()?;
            let out = layernorm::layer_norm_backward::<T>(
                suffix,
                &dev,
                &x,
                &w,
                &g,
                r.as_ref(),
                self.eps,
            )?;
            candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone())
        });
        Ok((out, Shape::from((rows + 2, cols))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var, D};

    /// What the layers compute without the op.
    fn composed(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let c = x.broadcast_sub(&mean)?;
        let var = c.sqr()?.mean_keepdim(D::Minus1)?;
        c.broadcast_div(&(var + eps)?.sqrt()?)?
            .broadcast_mul(w)?
            .broadcast_add(b)
    }

    /// Forward and gradients (input, weight, bias) equal candle's autograd over the composed
    /// ops, over more rows than one backward block.
    #[test]
    fn op_matches_composed_with_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&(Tensor::randn(0f32, 2.0, (3, 25, 96), &dev)? + 0.5)?)?;
        let w = Var::from_tensor(&Tensor::randn(1f32, 0.3, 96, &dev)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f32, 0.3, 96, &dev)?)?;
        let weights = Tensor::randn(0f32, 1.0, (3, 25, 96), &dev)?;
        let (xt, wt, bt) = (x.as_tensor(), w.as_tensor(), b.as_tensor());
        let want = composed(xt, wt, bt, 1e-5)?;
        let got = xt.apply_op3(wt, bt, FusedLayerNorm { eps: 1e-5 })?;
        let err = (&got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err < 1e-5, "forward: {err}");
        let gw = want.mul(&weights)?.sum_all()?.backward()?;
        let gg = got.mul(&weights)?.sum_all()?.backward()?;
        for (name, v) in [("x", xt), ("w", wt), ("b", bt)] {
            let (a, e) = (
                gg.get(v).expect("op grad"),
                gw.get(v).expect("composed grad"),
            );
            let scale = e.abs()?.max_all()?.to_scalar::<f32>()?;
            let err = (a - e)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(err < 1e-4 * scale.max(1.0), "{name}: {err} of {scale}");
        }
        // Half precision in, f32 statistics: close to the f32 result.
        for dt in [DType::F16, DType::BF16] {
            let got = xt.to_dtype(dt)?.apply_op3_no_bwd(
                &wt.to_dtype(dt)?,
                &bt.to_dtype(dt)?,
                &FusedLayerNorm { eps: 1e-5 },
            )?;
            let err = (got.to_dtype(DType::F32)? - &want)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert!(err < 0.1, "{dt:?}: {err}");
        }
        let bad = Tensor::zeros(95, DType::F32, &dev)?;
        assert!(xt
            .apply_op3_no_bwd(&bad, bt, &FusedLayerNorm { eps: 1e-5 })
            .is_err());
        Ok(())
    }

    /// The residual norm gives exactly what the two ops it replaces give (the residual tail,
    /// then the norm over its rounded output), in each dtype, and refuses mismatched inputs.
    #[test]
    fn residual_norm_is_the_two_ops() -> Result<()> {
        use crate::model::ops::fused_tail::BiasResidual;
        let dev = Device::Cpu;
        let (rows, cols) = (7, 96);
        let y = Tensor::randn(0f32, 1.0, (rows, cols), &dev)?;
        let r = Tensor::randn(0f32, 1.0, (rows, cols), &dev)?;
        let b = Tensor::randn(0f32, 0.5, cols, &dev)?;
        let w = Tensor::randn(1f32, 0.2, cols, &dev)?;
        let lb = Tensor::randn(0f32, 0.2, cols, &dev)?;
        for dt in [DType::F32, DType::F16, DType::BF16] {
            let [y, r, b, w, lb] = [&y, &r, &b, &w, &lb].map(|t| t.to_dtype(dt).unwrap());
            let params = Tensor::stack(&[&b, &w, &lb], 0)?;
            let out = y.apply_op3_no_bwd(&r, &params, &ResidualNorm { eps: 1e-5 })?;
            let h = y.apply_op3_no_bwd(&b, &r, &BiasResidual)?;
            let n = h.apply_op3_no_bwd(&w, &lb, &FusedLayerNorm { eps: 1e-5 })?;
            let diff = |a: &Tensor, b: &Tensor| -> Result<f32> {
                let (a, b) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
                (a - b)?.abs()?.max_all()?.to_scalar::<f32>()
            };
            assert_eq!(diff(&out.get(0)?, &h)?, 0.0, "{dt:?} residual");
            assert_eq!(diff(&out.get(1)?, &n)?, 0.0, "{dt:?} norm");
            assert!(y
                .apply_op3_no_bwd(&r.narrow(0, 0, 3)?, &params, &ResidualNorm { eps: 1e-5 })
                .is_err());
            assert!(y
                .apply_op3_no_bwd(&r, &params.narrow(0, 0, 2)?, &ResidualNorm { eps: 1e-5 })
                .is_err());
        }
        Ok(())
    }

    /// On a GPU (CUDA builds): both kernels against their twins, every dtype, CLIP's widths.
    /// Without a GPU it says so and checks nothing.
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_kernels_match_their_twins() -> Result<()> {
        let Ok(gpu) = Device::new_cuda(0) else {
            eprintln!("cuda_kernels_match_their_twins: skipped, no GPU");
            return Ok(());
        };
        for (rows, cols) in [(256 * 50, 768), (256 * 77, 512), (37, 1024)] {
            let x = (Tensor::randn(0f32, 2.0, (rows, cols), &Device::Cpu)? + 0.5)?;
            let w = Tensor::randn(1f32, 0.3, cols, &Device::Cpu)?;
            let b = Tensor::randn(0f32, 0.3, cols, &Device::Cpu)?;
            let g = Tensor::randn(0f32, 1.0, (rows, cols), &Device::Cpu)?;
            for (dt, tol) in [(DType::F32, 1e-4), (DType::F16, 1e-2), (DType::BF16, 5e-2)] {
                let c: Vec<Tensor> = [&x, &w, &b, &g]
                    .iter()
                    .map(|t| t.to_dtype(dt))
                    .collect::<Result<_>>()?;
                let d: Vec<Tensor> = c.iter().map(|t| t.to_device(&gpu)).collect::<Result<_>>()?;
                let op = FusedLayerNorm { eps: 1e-5 };
                let back = LayerNormBackward {
                    eps: 1e-5,
                    residual: None,
                };
                // With a residual stream's gradient added (the input's own, as any tensor
                // shaped like it).
                let with_res = |t: &Tensor| LayerNormBackward {
                    eps: 1e-5,
                    residual: Some(t.clone()),
                };
                let pairs = [
                    (
                        c[0].apply_op3_no_bwd(&c[1], &c[2], &op)?,
                        d[0].apply_op3_no_bwd(&d[1], &d[2], &op)?,
                    ),
                    (
                        c[0].apply_op3_no_bwd(&c[1], &c[3], &back)?,
                        d[0].apply_op3_no_bwd(&d[1], &d[3], &back)?,
                    ),
                    (
                        c[0].apply_op3_no_bwd(&c[1], &c[3], &with_res(&c[0]))?,
                        d[0].apply_op3_no_bwd(&d[1], &d[3], &with_res(&d[0]))?,
                    ),
                ];
                for (i, (twin, got)) in pairs.into_iter().enumerate() {
                    let twin = twin.to_dtype(DType::F32)?;
                    let got = got.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
                    let scale = twin.abs()?.maximum(1f32)?;
                    let err = ((got - &twin)?.abs()? / scale)?
                        .max_all()?
                        .to_scalar::<f32>()?;
                    assert!(
                        err < tol,
                        "{dt:?} {rows}x{cols} {}: {err}",
                        ["forward", "backward"][i]
                    );
                }
            }
        }
        Ok(())
    }

    /// On a GPU (CUDA builds): the residual norm against its twin, every dtype, CLIP's widths.
    /// Without a GPU it says so and checks nothing. `scripts/gpu-check.sh` runs it on its own
    /// and turns the fusion off (`CLIPFT_NO_RESIDUAL_NORM=1`) for the benchmarks if it fails.
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_residual_norm_matches_its_twin() -> Result<()> {
        let Ok(gpu) = Device::new_cuda(0) else {
            eprintln!("cuda_residual_norm_matches_its_twin: skipped, no GPU");
            return Ok(());
        };
        for (rows, cols) in [(256 * 50, 768), (256 * 77, 512), (37, 1024)] {
            let y = Tensor::randn(0f32, 2.0, (rows, cols), &Device::Cpu)?;
            let r = Tensor::randn(0f32, 1.0, (rows, cols), &Device::Cpu)?;
            let b = Tensor::randn(0f32, 0.3, cols, &Device::Cpu)?;
            let w = Tensor::randn(1f32, 0.3, cols, &Device::Cpu)?;
            let lb = Tensor::randn(0f32, 0.3, cols, &Device::Cpu)?;
            let params = Tensor::stack(&[&b, &w, &lb], 0)?;
            for (dt, tol) in [(DType::F32, 1e-4), (DType::F16, 1e-2), (DType::BF16, 5e-2)] {
                let c: Vec<Tensor> = [&y, &r, &params]
                    .iter()
                    .map(|t| t.to_dtype(dt))
                    .collect::<Result<_>>()?;
                let d: Vec<Tensor> = c.iter().map(|t| t.to_device(&gpu)).collect::<Result<_>>()?;
                let op = ResidualNorm { eps: 1e-5 };
                let twin = c[0]
                    .apply_op3_no_bwd(&c[1], &c[2], &op)?
                    .to_dtype(DType::F32)?;
                let got = d[0]
                    .apply_op3_no_bwd(&d[1], &d[2], &op)?
                    .to_device(&Device::Cpu)?
                    .to_dtype(DType::F32)?;
                let scale = twin.abs()?.maximum(1f32)?;
                let err = ((got - &twin)?.abs()? / scale)?
                    .max_all()?
                    .to_scalar::<f32>()?;
                assert!(err < tol, "{dt:?} {rows}x{cols}: {err}");
            }
        }
        Ok(())
    }
}
