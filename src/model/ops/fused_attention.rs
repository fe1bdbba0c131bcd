//! Inference attention as one op over the projections' outputs: `q`, `k`, `v` `[batch, seq, d]`
//! in, the context `[batch, seq, d]` out (heads concatenated, ready for `out_proj`). On a GPU
//! it is the single kernel of `kernels/cuda/attention.cu` in place of candle's head transposes,
//! two batched products, mask, softmax and merge copies; on the CPU it runs that kernel's twin
//! (which is what the normal test suite checks). No backward: training runs the composed ops.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape};

use crate::model::kernels::cuda::{attention_twin, AttentionShape};

/// `softmax(q k^T * scale [+ causal mask]) v` per head.
#[derive(Debug, Clone, Copy)]
pub struct FusedAttention {
    pub heads: usize,
    pub scale: f32,
    pub causal: bool,
}

impl FusedAttention {
    /// The kernel's geometry for inputs of layout `l` (each of q, k, v), checking that the
    /// three agree and are contiguous.
    fn shape(&self, ls: [&Layout; 3]) -> Result<(AttentionShape, Shape)> {
        let [ql, kl, vl] = ls;
        if kl.shape() != ql.shape() || vl.shape() != ql.shape() {
            candle_core::bail!(
                "fused attention: q {:?}, k {:?} and v {:?} differ",
                ql.shape(),
                kl.shape(),
                vl.shape()
            );
        }
        if ls.iter().any(|l| !l.is_contiguous()) {
            candle_core::bail!("fused attention: contiguous q, k and v only");
        }
        let (batch, seq, d) = ql.shape().dims3()?;
        if self.heads == 0 || !d.is_multiple_of(self.heads) {
            candle_core::bail!(
                "fused attention: {d} is not divisible by {} heads",
                self.heads
            );
        }
        let s = AttentionShape {
            batch,
            seq,
            heads: self.heads,
            head_dim: d / self.heads,
            ld: d,
            scale: self.scale,
            causal: self.causal,
        };
        Ok((s, ql.shape().clone()))
    }
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "clipft-fused-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (s, shape) = self.shape([ql, kl, vl])?;
        let out = attention_twin(
            &super::twin_input(qs, ql, self.name())?,
            &super::twin_input(ks, kl, self.name())?,
            &super::twin_input(vs, vl, self.name())?,
            s,
        )?;
        let out = super::twin_output(qs, out);
        Ok((out, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        qs: &candle_core::CudaStorage,
        ql: &Layout,
        ks: &candle_core::CudaStorage,
        kl: &Layout,
        vs: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::model::kernels::cuda;
        use candle_core::backend::BackendStorage;
        let (s, shape) = self.shape([ql, kl, vl])?;
        let dev = qs.device().clone();
        macro_rules! run {
            ($t:ty, $name:literal) => {{
                let q = qs.as_cuda_slice::<$t>()?.slice(ql.start_offset()..);
                let k = ks.as_cuda_slice::<$t>()?.slice(kl.start_offset()..);
                let v = vs.as_cuda_slice::<$t>()?.slice(vl.start_offset()..);
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Tensor, D};

    /// What the layers compute without the op: heads split, scaled scores, mask, softmax,
    /// product with v, heads merged.
    fn composed(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, causal: bool) -> Result<Tensor> {
        let (b, t, d) = q.dims3()?;
        let split = |x: &Tensor| {
            x.reshape((b, t, heads, d / heads))?
                .transpose(1, 2)?
                .contiguous()
        };
        let scale = ((d / heads) as f64).powf(-0.5);
        let mut scores = (split(q)? * scale)?.matmul(&split(k)?.t()?)?;
        if causal {
            let mask: Vec<f32> = (0..t)
                .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
                .collect();
            scores = scores.broadcast_add(&Tensor::from_vec(mask, (t, t), q.device())?)?;
        }
        let p = candle_nn::ops::softmax(&scores, D::Minus1)?;
        p.matmul(&split(v)?)?.transpose(1, 2)?.reshape((b, t, d))
    }

    /// On a GPU (CUDA builds): the kernel against its CPU twin, every dtype, text and image
    /// shapes. Without a GPU it says so and checks nothing.
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_kernel_matches_its_twin() -> Result<()> {
        let Ok(gpu) = Device::new_cuda(0) else {
            eprintln!("cuda_kernel_matches_its_twin: skipped, no GPU");
            return Ok(());
        };
        for (b, t, heads, causal) in [(4, 77, 8, true), (4, 50, 12, false), (2, 257, 16, false)] {
            let d = heads * 64;
            let op = FusedAttention {
                heads,
                scale: 64f32.powf(-0.5),
                causal,
            };
            let qkv: Vec<Tensor> = (0..3)
                .map(|_| Tensor::randn(0f32, 1.0, (b, t, d), &Device::Cpu))
                .collect::<Result<_>>()?;
            for (dt, tol) in [(DType::F32, 1e-4), (DType::F16, 5e-3), (DType::BF16, 3e-2)] {
                let c: Vec<Tensor> = qkv.iter().map(|x| x.to_dtype(dt)).collect::<Result<_>>()?;
                let twin = c[0]
                    .apply_op3_no_bwd(&c[1], &c[2], &op)?
                    .to_dtype(DType::F32)?;
                let g: Vec<Tensor> = c.iter().map(|x| x.to_device(&gpu)).collect::<Result<_>>()?;
                let got = g[0].apply_op3_no_bwd(&g[1], &g[2], &op)?;
                let got = got.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
                let err = (got - &twin)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(
                    err < tol,
                    "{dt:?} b{b} t{t} causal {causal}: max diff {err}"
                );
            }
        }
        Ok(())
    }

    /// The op on the CPU (the kernel's twin) equals the composed ops, in f32 and through f16
    /// and bf16 inputs.
    #[test]
    fn op_matches_composed_attention() -> Result<()> {
        let dev = Device::Cpu;
        for (b, t, heads, causal) in [(2, 77, 8, true), (3, 50, 12, false)] {
            let d = heads * 64;
            let qkv: Vec<Tensor> = (0..3)
                .map(|_| Tensor::randn(0f32, 1.0, (b, t, d), &dev))
                .collect::<Result<_>>()?;
            let op = FusedAttention {
                heads,
                scale: 64f32.powf(-0.5),
                causal,
            };
            let want = composed(&qkv[0], &qkv[1], &qkv[2], heads, causal)?;
            for (dt, tol) in [(DType::F32, 1e-5), (DType::F16, 2e-2), (DType::BF16, 6e-2)] {
                let c: Vec<Tensor> = qkv.iter().map(|x| x.to_dtype(dt)).collect::<Result<_>>()?;
                let got = c[0]
                    .apply_op3_no_bwd(&c[1], &c[2], &op)?
                    .to_dtype(DType::F32)?;
                let err = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(
                    err < tol,
                    "{dt:?} b{b} t{t} causal {causal}: max diff {err}"
                );
            }
        }
        Ok(())
    }
}
