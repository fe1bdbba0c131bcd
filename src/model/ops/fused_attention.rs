//! Attention as one op over the stacked projection `qkv` `[batch, seq, 3 d]` (queries, keys,
//! values side by side, as one GEMM with the three weights stacked makes them), the context
//! `[batch, seq, d]` out (heads concatenated, ready for `out_proj`). On a GPU the forward is the
//! single kernel of `kernels/cuda/attention.cu` in place of candle's head transposes, two
//! batched products, mask, softmax and merge copies, and the backward ([`AttentionBackward`],
//! an op itself, so the gradient stays on the device) is that file's two backward kernels,
//! giving `d qkv` in one buffer; on the CPU both run the kernels' twins, which is what the
//! normal test suite checks.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};

use crate::model::kernels::cuda::attention::attention_backward_twin;
use crate::model::kernels::cuda::{attention_twin, AttentionShape};

/// `softmax(q k^T * scale [+ causal mask]) v` per head, from `qkv`.
#[derive(Debug, Clone, Copy)]
pub struct FusedAttention {
    pub heads: usize,
    pub scale: f32,
    pub causal: bool,
}

/// The gradient of [`FusedAttention`] with respect to `qkv`, from `qkv`, the forward's output
/// and that output's gradient.
#[derive(Debug, Clone, Copy)]
pub struct AttentionBackward(pub FusedAttention);

impl FusedAttention {
    /// The kernel's geometry for a stacked projection of layout `l` (contiguous, `[batch, seq,
    /// 3 d]`, `d` divisible by the heads), and the context's shape.
    fn shape(&self, l: &Layout) -> Result<(AttentionShape, Shape)> {
        if !l.is_contiguous() {
            candle_core::bail!("fused attention: a contiguous qkv only");
        }
        let (batch, seq, w) = l.shape().dims3()?;
        if self.heads == 0 || !w.is_multiple_of(3 * self.heads) {
            candle_core::bail!(
                "fused attention: qkv rows of {w} are not 3 x {} heads",
                self.heads
            );
        }
        let d = w / 3;
        let s = AttentionShape {
            batch,
            seq,
            heads: self.heads,
            head_dim: d / self.heads,
            ld: w,
            scale: self.scale,
            causal: self.causal,
        };
        Ok((s, Shape::from((batch, seq, d))))
    }
}

impl CustomOp1 for FusedAttention {
    fn name(&self) -> &'static str {
        "clipft-fused-attention"
    }

    fn cpu_fwd(&self, qs: &CpuStorage, ql: &Layout) -> Result<(CpuStorage, Shape)> {
        let (s, shape) = self.shape(ql)?;
        let qkv = super::twin_input(qs, ql, self.name())?;
        let d = s.heads * s.head_dim;
        let out = attention_twin(
            &qkv,
            &qkv[d.min(qkv.len())..],
            &qkv[(2 * d).min(qkv.len())..],
            s,
        )?;
        Ok((super::twin_output(qs, out), shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        qs: &candle_core::CudaStorage,
        ql: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::model::kernels::cuda;
        use candle_core::backend::BackendStorage;
        let (s, shape) = self.shape(ql)?;
        let dev = qs.device().clone();
        let d = s.heads * s.head_dim;
        macro_rules! run {
            ($t:ty, $name:literal) => {{
                let qkv = qs.as_cuda_slice::<$t>()?.slice(ql.start_offset()..);
                let qkv = qkv.slice(..ql.shape().elem_count());
                let (q, k, v) = (qkv.slice(0..), qkv.slice(d..), qkv.slice(2 * d..));
                let out = cuda::attention::launch::<$t>($name, &dev, &q, &k, &v, s)?;
                candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        let out = match qs.dtype() {
            candle_core::DType::F32 => run!(f32, "clipft_attention_f32"),
            candle_core::DType::F16 => run!(half::f16, "clipft_attention_f16"),
            candle_core::DType::BF16 => run!(half::bf16, "clipft_attention_bf16"),
            dt => candle_core::bail!("fused attention: f32, f16 or bf16 only, not {dt:?}"),
        };
        Ok((out, shape))
    }

    fn bwd(&self, qkv: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let grad = qkv.apply_op3_no_bwd(
            &res.contiguous()?,
            &grad_res.contiguous()?,
            &AttentionBackward(*self),
        )?;
        Ok(Some(grad))
    }
}

impl AttentionBackward {
    /// The geometry, checking that the output and its gradient are `[batch, seq, d]` of `qkv`.
    fn shape(&self, ls: [&Layout; 3]) -> Result<AttentionShape> {
        let (s, out) = self.0.shape(ls[0])?;
        for l in &ls[1..] {
            if l.shape() != &out || !l.is_contiguous() {
                candle_core::bail!(
                    "attention backward: output gradient {:?} for an output of {out:?}",
                    l.shape()
                );
            }
        }
        Ok(s)
    }
}

impl CustomOp3 for AttentionBackward {
    fn name(&self) -> &'static str {
        "clipft-fused-attention-backward"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        os: &CpuStorage,
        ol: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let s = self.shape([ql, ol, gl])?;
        let grad = attention_backward_twin(
            &super::twin_input(qs, ql, self.name())?,
            &super::twin_input(os, ol, self.name())?,
            &super::twin_input(gs, gl, self.name())?,
            s,
        )?;
        Ok((super::twin_output(qs, grad), ql.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        qs: &candle_core::CudaStorage,
        ql: &Layout,
        os: &candle_core::CudaStorage,
        ol: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::model::kernels::cuda;
        use candle_core::backend::BackendStorage;
        let s = self.shape([ql, ol, gl])?;
        let dev = qs.device().clone();
        macro_rules! run {
            ($t:ty, $suffix:literal) => {{
                let view = super::cuda_view::<$t>;
                let (qkv, o, g) = (view(qs, ql)?, view(os, ol)?, view(gs, gl)?);
                let grad = cuda::attention::launch_backward::<$t>($suffix, &dev, &qkv, &o, &g, s)?;
                candle_core::CudaStorage::wrap_cuda_slice(grad, dev.clone())
            }};
        }
        let out = match qs.dtype() {
            candle_core::DType::F32 => run!(f32, "f32"),
            candle_core::DType::F16 => run!(half::f16, "f16"),
            candle_core::DType::BF16 => run!(half::bf16, "bf16"),
            dt => candle_core::bail!("attention backward: f32, f16 or bf16 only, not {dt:?}"),
        };
        Ok((out, ql.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Tensor, Var, D};

    /// What the layers compute without the op: q, k, v split from the stacked projection,
    /// heads split, scaled scores, mask, softmax, product with v, heads merged.
    fn composed(qkv: &Tensor, heads: usize, causal: bool) -> Result<Tensor> {
        let (b, t, w) = qkv.dims3()?;
        let d = w / 3;
        let split = |i: usize| {
            qkv.narrow(2, i * d, d)?
                .reshape((b, t, heads, d / heads))?
                .transpose(1, 2)?
                .contiguous()
        };
        let scale = ((d / heads) as f64).powf(-0.5);
        let mut scores = (split(0)? * scale)?.matmul(&split(1)?.t()?)?;
        if causal {
            let mask: Vec<f32> = (0..t)
                .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
                .collect();
            scores = scores.broadcast_add(&Tensor::from_vec(mask, (t, t), qkv.device())?)?;
        }
        let p = candle_nn::ops::softmax(&scores, D::Minus1)?;
        p.matmul(&split(2)?)?.transpose(1, 2)?.reshape((b, t, d))
    }

    fn op(heads: usize, causal: bool) -> FusedAttention {
        FusedAttention {
            heads,
            scale: 64f32.powf(-0.5),
            causal,
        }
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()
    }

    /// The op on the CPU (the kernel's twin) equals the composed ops, in f32 and through f16
    /// and bf16 inputs.
    #[test]
    fn op_matches_composed_attention() -> Result<()> {
        let dev = Device::Cpu;
        for (b, t, heads, causal) in [(2, 77, 8, true), (3, 50, 12, false)] {
            let qkv = Tensor::randn(0f32, 1.0, (b, t, 3 * heads * 64), &dev)?;
            let want = composed(&qkv, heads, causal)?;
            for (dt, tol) in [(DType::F32, 1e-5), (DType::F16, 2e-2), (DType::BF16, 6e-2)] {
                let got = qkv.to_dtype(dt)?.apply_op1_no_bwd(&op(heads, causal))?;
                let err = max_diff(&got, &want)?;
                assert!(
                    err < tol,
                    "{dt:?} b{b} t{t} causal {causal}: max diff {err}"
                );
            }
        }
        Ok(())
    }

    /// The op's backward (the backward kernels' twin) gives candle's autograd gradient of the
    /// composed attention, for text (causal, 77: two key tiles), image (50) and a sequence of
    /// three tiles, with a loss that weighs every output differently.
    #[test]
    fn backward_matches_autograd() -> Result<()> {
        let dev = Device::Cpu;
        for (b, t, heads, causal) in [(2, 77, 4, true), (2, 50, 3, false), (1, 130, 2, true)] {
            let qkv = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, t, 3 * heads * 64), &dev)?)?;
            let weights = Tensor::randn(0f32, 1.0, (b, t, heads * 64), &dev)?;
            let want = composed(qkv.as_tensor(), heads, causal)?
                .mul(&weights)?
                .sum_all()?
                .backward()?;
            let want = want.get(qkv.as_tensor()).expect("composed gradient");
            let got = qkv
                .as_tensor()
                .apply_op1(op(heads, causal))?
                .mul(&weights)?
                .sum_all()?
                .backward()?;
            let got = got.get(qkv.as_tensor()).expect("op gradient");
            let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
            let err = max_diff(got, want)?;
            assert!(
                err < 2e-5 * scale.max(1.0),
                "b{b} t{t} causal {causal}: {err} of {scale}"
            );
        }
        Ok(())
    }

    #[test]
    fn refuses_what_it_cannot_take() -> Result<()> {
        let dev = Device::Cpu;
        // Rows that are not three blocks of whole heads.
        let bad = Tensor::zeros((1, 4, 3 * 64 + 1), DType::F32, &dev)?;
        assert!(bad.apply_op1_no_bwd(&op(1, false)).is_err());
        // A head width the kernel does not take (48).
        let bad = Tensor::zeros((1, 4, 3 * 48), DType::F32, &dev)?;
        assert!(bad.apply_op1_no_bwd(&op(1, false)).is_err());
        // An output gradient of another shape.
        let qkv = Tensor::zeros((1, 4, 3 * 64), DType::F32, &dev)?;
        let o = Tensor::zeros((1, 4, 64), DType::F32, &dev)?;
        let g = Tensor::zeros((1, 3, 64), DType::F32, &dev)?;
        assert!(qkv
            .apply_op3_no_bwd(&o, &g, &AttentionBackward(op(1, false)))
            .is_err());
        Ok(())
    }

    /// On a GPU (CUDA builds): the kernels against their CPU twins, forward and backward, every
    /// dtype, text and image shapes. Without a GPU it says so and checks nothing.
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_kernel_matches_its_twin() -> Result<()> {
        let Ok(gpu) = Device::new_cuda(0) else {
            eprintln!("cuda_kernel_matches_its_twin: skipped, no GPU");
            return Ok(());
        };
        for (b, t, heads, causal) in [(4, 77, 8, true), (4, 50, 12, false), (2, 257, 16, false)] {
            let d = heads * 64;
            let op = op(heads, causal);
            let qkv = Tensor::randn(0f32, 1.0, (b, t, 3 * d), &Device::Cpu)?;
            let dout = Tensor::randn(0f32, 1.0, (b, t, d), &Device::Cpu)?;
            for (dt, tol, gtol) in [
                (DType::F32, 1e-4, 1e-4),
                (DType::F16, 5e-3, 2e-2),
                (DType::BF16, 3e-2, 1e-1),
            ] {
                let (c, g) = (qkv.to_dtype(dt)?, dout.to_dtype(dt)?);
                let twin = c.apply_op1_no_bwd(&op)?;
                let (cg, gg) = (c.to_device(&gpu)?, g.to_device(&gpu)?);
                let got = cg.apply_op1_no_bwd(&op)?;
                let err = max_diff(&got.to_device(&Device::Cpu)?, &twin)?;
                assert!(
                    err < tol,
                    "{dt:?} b{b} t{t} causal {causal}: max diff {err}"
                );
                // The backward from the same output on both sides.
                let back = AttentionBackward(op);
                let twin = c.apply_op3_no_bwd(&twin, &g, &back)?;
                let got = cg.apply_op3_no_bwd(&got, &gg, &back)?;
                let scale = twin
                    .to_dtype(DType::F32)?
                    .abs()?
                    .max_all()?
                    .to_scalar::<f32>()?;
                let err = max_diff(&got.to_device(&Device::Cpu)?, &twin)?;
                assert!(
                    err < gtol * scale.max(1.0),
                    "{dt:?} b{b} t{t} causal {causal} backward: max diff {err} of {scale}"
                );
            }
        }
        Ok(())
    }
}
