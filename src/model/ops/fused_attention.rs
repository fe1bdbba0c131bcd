//! Attention as one op over the stacked projection: the product `qkv` `[batch, seq, 3 d]`
//! (queries, keys, values side by side, as one GEMM with the three weights stacked makes them)
//! and the stacked bias `[3 d]` in, the context `[batch, seq, d]` out (heads concatenated,
//! ready for `out_proj`). On a GPU the forward is the single kernel of
//! `kernels/cuda/attention.cu`, which adds the bias as it loads q, k and v (the projection
//! writes no biased copy), in place of candle's bias add, head transposes, two batched products,
//! mask, softmax and merge copies; the backward ([`AttentionBackward`], an op itself, so the
//! gradient stays on the device) is that file's two backward kernels (or, in f16 and bf16 with
//! `tensor_cores`, its one tensor-core backward kernel), giving `d qkv` in one buffer, and the
//! bias's gradient is its column sum. On the CPU both run the kernels' twins
//! (on the product with the bias added in f32 first, the same sums the kernels make as they
//! load), which is what the normal test suite checks.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::packed::PackedSeqs;
use crate::model::kernels::seqs::Seqs;

use crate::model::kernels::cuda::attention::{
    attention_backward_twin, attention_tc_backward_twin, attention_tc_twin, tc_supports,
};
use crate::model::kernels::cuda::{attention_twin, AttentionShape};

/// `softmax(q k^T * scale [+ causal mask]) v` per head, from `qkv` and its bias. With
/// `packed`, `qkv` is `[rows, 3 d]` holding those sequences end to end (each query sees only its
/// own sequence's keys) and the context `[rows, d]`.
#[derive(Debug, Clone)]
pub struct FusedAttention {
    pub heads: usize,
    pub scale: f32,
    pub causal: bool,
    pub packed: Option<Arc<PackedSeqs>>,
    /// f16 and bf16 forward and backward on tensor cores where the shape allows
    /// ([`crate::model::kernels::cuda::attention::tc_supports`]), the model's kernels decide
    /// ([`crate::model::policy::Kernels::tc_attention`]); on the CPU its twin.
    pub tensor_cores: bool,
}

/// The gradient of [`FusedAttention`] with respect to `qkv` (and so to its bias, summed over
/// rows), from `qkv`, the forward's output and that output's gradient; `bias` is the stacked
/// bias the forward added.
#[derive(Debug, Clone)]
pub struct AttentionBackward {
    pub op: FusedAttention,
    pub bias: Tensor,
}

impl FusedAttention {
    /// The kernel's geometry for a stacked product of layout `l` (contiguous, `[batch, seq,
    /// 3 d]`, or `[rows, 3 d]` packed; `d` divisible by the heads) and a bias of layout `bl`
    /// (`[3 d]`, contiguous), and the context's shape.
    fn shape(&self, l: &Layout, bl: &Layout) -> Result<(AttentionShape<'_>, Shape)> {
        if !l.is_contiguous() || !bl.is_contiguous() {
            candle_core::bail!("fused attention: a contiguous qkv and bias only");
        }
        let (seqs, w, lead) = match &self.packed {
            Some(p) => {
                let (rows, w) = l.shape().dims2()?;
                if rows != p.rows() {
                    candle_core::bail!(
                        "fused attention: {rows} rows for a packed batch of {}",
                        p.rows()
                    );
                }
                (p.seqs(), w, vec![rows])
            }
            None => {
                let (batch, seq, w) = l.shape().dims3()?;
                (Seqs::Uniform { batch, seq }, w, vec![batch, seq])
            }
        };
        if self.heads == 0 || !w.is_multiple_of(3 * self.heads) {
            candle_core::bail!(
                "fused attention: qkv rows of {w} are not 3 x {} heads",
                self.heads
            );
        }
        if bl.shape().dims() != [w] {
            candle_core::bail!("fused attention: a bias {:?} for rows of {w}", bl.shape());
        }
        let d = w / 3;
        let s = AttentionShape {
            seqs,
            heads: self.heads,
            head_dim: d / self.heads,
            ld: w,
            scale: self.scale,
            causal: self.causal,
        };
        let mut out = lead;
        out.push(d);
        Ok((s, Shape::from(out)))
    }

    /// On the CPU: the rounding of the tensor-core twins, when the GPU would run the
    /// tensor-core kernels for `storage`'s dtype and `s` (f16 or bf16, a shape they take).
    fn tc_rounding(&self, storage: &CpuStorage, s: &AttentionShape) -> Option<fn(f32) -> f32> {
        if !self.tensor_cores || !tc_supports(s) {
            return None;
        }
        matches!(storage, CpuStorage::F16(_) | CpuStorage::BF16(_))
            .then(|| super::twin_rounding(storage))
    }
}

/// `qkv` with its bias added, in f32: what the twins compute on.
fn biased(qkv: &[f32], bias: &[f32]) -> Vec<f32> {
    let w = bias.len().max(1);
    qkv.chunks(w)
        .flat_map(|row| row.iter().zip(bias).map(|(x, b)| x + b))
        .collect()
}

impl CustomOp2 for FusedAttention {
    fn name(&self) -> &'static str {
        "clipft-fused-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (s, shape) = self.shape(ql, bl)?;
        let qkv = biased(
            &super::twin_input(qs, ql, self.name())?,
            &super::twin_input(bs, bl, self.name())?,
        );
        let d = s.heads * s.head_dim;
        let (k, v) = (&qkv[d.min(qkv.len())..], &qkv[(2 * d).min(qkv.len())..]);
        let out = match self.tc_rounding(qs, &s) {
            Some(round) => attention_tc_twin(&qkv, k, v, s, round)?,
            _ => attention_twin(&qkv, k, v, s)?,
        };
        Ok((super::twin_output(qs, out), shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        qs: &candle_core::CudaStorage,
        ql: &Layout,
        bs: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::model::kernels::cuda;
        use candle_core::backend::BackendStorage;
        let (s, shape) = self.shape(ql, bl)?;
        let dev = qs.device().clone();
        let d = s.heads * s.head_dim;
        let out = by_dtype!(qs, self.name(), |T, suffix| {
            let (qkv, b) = (
                super::cuda_view::<T>(qs, ql)?,
                super::cuda_view::<T>(bs, bl)?,
            );
            let (q, k, v) = (qkv.slice(0..), qkv.slice(d..), qkv.slice(2 * d..));
            let (bq, bk, bv) = (b.slice(0..), b.slice(d..), b.slice(2 * d..));
            let offsets = match &self.packed {
                Some(p) => Some(p.device_offsets(&dev)?),
                None => None,
            };
            let biases = [&bq, &bk, &bv];
            let tc = self.tensor_cores && suffix != "f32" && tc_supports(&s);
            let out =
                cuda::attention::launch::<T>(suffix, &dev, &q, &k, &v, biases, s, offsets, tc)?;
            candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone())
        });
        Ok((out, shape))
    }

    fn bwd(
        &self,
        qkv: &Tensor,
        bias: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let back = AttentionBackward {
            op: self.clone(),
            bias: bias.contiguous()?,
        };
        let grad = qkv.apply_op3_no_bwd(&res.contiguous()?, &grad_res.contiguous()?, &back)?;
        let bias_grad = super::bias_grad(&grad)?;
        Ok((Some(grad), Some(bias_grad)))
    }
}

impl AttentionBackward {
    /// The geometry, checking that the output and its gradient are `[batch, seq, d]` of `qkv`.
    fn shape(&self, ls: [&Layout; 3]) -> Result<AttentionShape<'_>> {
        let (s, out) = self.op.shape(ls[0], self.bias.layout())?;
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
        let (bias, bl) = self.bias.storage_and_layout();
        let candle_core::Storage::Cpu(bias) = &*bias else {
            candle_core::bail!("attention backward: the bias is not on the CPU")
        };
        let qkv = biased(
            &super::twin_input(qs, ql, self.name())?,
            &super::twin_input(bias, bl, self.name())?,
        );
        let (o, g) = (
            super::twin_input(os, ol, self.name())?,
            super::twin_input(gs, gl, self.name())?,
        );
        let grad = match self.op.tc_rounding(qs, &s) {
            Some(round) => attention_tc_backward_twin(&qkv, &o, &g, s, round)?,
            None => attention_backward_twin(&qkv, &o, &g, s)?,
        };
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
        let (bias, bl) = self.bias.storage_and_layout();
        let candle_core::Storage::Cuda(bias) = &*bias else {
            candle_core::bail!("attention backward: the bias is not on the GPU")
        };
        let out = by_dtype!(qs, self.name(), |T, suffix| {
            let view = super::cuda_view::<T>;
            let (qkv, b) = (view(qs, ql)?, view(bias, bl)?);
            let (o, g) = (view(os, ol)?, view(gs, gl)?);
            let offsets = match &self.op.packed {
                Some(p) => Some(p.device_offsets(&dev)?),
                None => None,
            };
            let tc = self.op.tensor_cores && suffix != "f32" && tc_supports(&s);
            let grad = cuda::attention::launch_backward::<T>(
                suffix, &dev, &qkv, &b, &o, &g, s, offsets, tc,
            )?;
            candle_core::CudaStorage::wrap_cuda_slice(grad, dev.clone())
        });
        Ok((out, ql.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Tensor, Var, D};

    /// What the layers compute without the op: the bias added, q, k, v split from the stacked
    /// projection, heads split, scaled scores, mask, softmax, product with v, heads merged.
    fn composed(qkv: &Tensor, bias: &Tensor, heads: usize, causal: bool) -> Result<Tensor> {
        let qkv = qkv.broadcast_add(bias)?;
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
            packed: None,
            tensor_cores: false,
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
            let bias = Tensor::randn(0f32, 0.5, 3 * heads * 64, &dev)?;
            let want = composed(&qkv, &bias, heads, causal)?;
            for (dt, tol) in [(DType::F32, 1e-5), (DType::F16, 2e-2), (DType::BF16, 6e-2)] {
                let got = qkv
                    .to_dtype(dt)?
                    .apply_op2_no_bwd(&bias.to_dtype(dt)?, &op(heads, causal))?;
                let err = max_diff(&got, &want)?;
                assert!(
                    err < tol,
                    "{dt:?} b{b} t{t} causal {causal}: max diff {err}"
                );
            }
        }
        Ok(())
    }

    /// Random `qkv` `[b, t, 3 d]` and bias variables for `heads` of width 64, per-output loss
    /// weights, and candle's autograd gradients of the composed attention's weighted sum.
    fn autograd_case(
        b: usize,
        t: usize,
        heads: usize,
        causal: bool,
    ) -> Result<(Var, Var, Tensor, candle_core::backprop::GradStore)> {
        let dev = Device::Cpu;
        let qkv = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, t, 3 * heads * 64), &dev)?)?;
        let bias = Var::from_tensor(&Tensor::randn(0f32, 0.5, 3 * heads * 64, &dev)?)?;
        let weights = Tensor::randn(0f32, 1.0, (b, t, heads * 64), &dev)?;
        let want = composed(qkv.as_tensor(), bias.as_tensor(), heads, causal)?
            .mul(&weights)?
            .sum_all()?
            .backward()?;
        Ok((qkv, bias, weights, want))
    }

    /// The op's backward (the backward kernels' twin, and the bias's column sum) gives candle's
    /// autograd gradients of the composed attention, for text (causal, 77: two key tiles),
    /// image (50) and a sequence of three tiles, with a loss that weighs every output
    /// differently.
    #[test]
    fn backward_matches_autograd() -> Result<()> {
        for (b, t, heads, causal) in [(2, 77, 4, true), (2, 50, 3, false), (1, 130, 2, true)] {
            let (qkv, bias, weights, want) = autograd_case(b, t, heads, causal)?;
            let (x, bt) = (qkv.as_tensor(), bias.as_tensor());
            let got = x
                .apply_op2(bt, op(heads, causal))?
                .mul(&weights)?
                .sum_all()?
                .backward()?;
            for (name, v) in [("qkv", x), ("bias", bt)] {
                let (g, w) = (
                    got.get(v).expect("op gradient"),
                    want.get(v).expect("composed"),
                );
                let scale = w.abs()?.max_all()?.to_scalar::<f32>()?;
                let err = max_diff(g, w)?;
                assert!(
                    err < 2e-5 * scale.max(1.0),
                    "{name} b{b} t{t} causal {causal}: {err} of {scale}"
                );
            }
        }
        Ok(())
    }

    /// The tensor-core forward's twin (f16 and bf16 roundings of q, k, v and the
    /// probabilities) stays within those dtypes' precision of the composed attention, for
    /// text (causal), image and packed captions.
    #[test]
    fn tensor_core_twin_matches_composed_attention() -> Result<()> {
        let dev = Device::Cpu;
        let packing = crate::model::kernels::seqs::Packing::from_lens(&[77, 5, 1, 40])?;
        let packed = Arc::new(PackedSeqs::new(packing));
        for (b, t, heads, causal) in [(2, 77, 4, true), (3, 50, 2, false)] {
            let qkv = Tensor::randn(0f32, 1.0, (b, t, 3 * heads * 64), &dev)?;
            let bias = Tensor::randn(0f32, 0.5, 3 * heads * 64, &dev)?;
            let want = composed(&qkv, &bias, heads, causal)?;
            for (dt, tol) in [(DType::F16, 2e-2), (DType::BF16, 8e-2)] {
                let tc = FusedAttention {
                    tensor_cores: true,
                    ..op(heads, causal)
                };
                let got = qkv
                    .to_dtype(dt)?
                    .apply_op2_no_bwd(&bias.to_dtype(dt)?, &tc)?;
                let err = max_diff(&got, &want)?;
                assert!(
                    err < tol,
                    "{dt:?} b{b} t{t} causal {causal}: max diff {err}"
                );
            }
        }
        // Packed: each caption alone through the same twin.
        let heads = 2;
        let rows = packed.rows();
        let qkv = Tensor::randn(0f32, 1.0, (rows, 3 * heads * 64), &dev)?.to_dtype(DType::F16)?;
        let bias = Tensor::randn(0f32, 0.5, 3 * heads * 64, &dev)?.to_dtype(DType::F16)?;
        let tc = |packed: Option<Arc<PackedSeqs>>| FusedAttention {
            tensor_cores: true,
            packed,
            ..op(heads, true)
        };
        let all = qkv.apply_op2_no_bwd(&bias, &tc(Some(packed.clone())))?;
        let offsets = packed.packing().offsets().to_vec();
        for w in offsets.windows(2) {
            let one = qkv.narrow(0, w[0], w[1] - w[0])?.unsqueeze(0)?;
            let alone = one.apply_op2_no_bwd(&bias, &tc(None))?.squeeze(0)?;
            let err = max_diff(&all.narrow(0, w[0], w[1] - w[0])?, &alone)?;
            assert!(err == 0.0, "caption at {}: {err}", w[0]);
        }
        Ok(())
    }

    /// The tensor-core backward's twin (f16 and bf16 roundings of q, k, v, the output
    /// gradient, P and dS) stays within those dtypes' precision of candle's autograd gradients
    /// of the composed attention in f32, for text (causal) and image shapes; packed captions
    /// get exactly what each caption gets alone.
    #[test]
    fn tensor_core_backward_matches_autograd() -> Result<()> {
        let dev = Device::Cpu;
        for (b, t, heads, causal) in [(2, 77, 2, true), (2, 50, 3, false)] {
            let (qkv, bias, weights, want) = autograd_case(b, t, heads, causal)?;
            let (x, bt) = (qkv.as_tensor(), bias.as_tensor());
            let w = want.get(x).expect("composed");
            let scale = w.abs()?.max_all()?.to_scalar::<f32>()?;
            let tc = FusedAttention {
                tensor_cores: true,
                ..op(heads, causal)
            };
            for (dt, tol) in [(DType::F16, 1e-2), (DType::BF16, 6e-2)] {
                let (xd, bd) = (x.to_dtype(dt)?, bt.to_dtype(dt)?);
                let out = xd.apply_op2_no_bwd(&bd, &tc)?;
                let g = weights.to_dtype(dt)?;
                let back = AttentionBackward {
                    op: tc.clone(),
                    bias: bd.clone(),
                };
                let got = xd.apply_op3_no_bwd(&out, &g, &back)?;
                let err = max_diff(&got, w)?;
                assert!(
                    err < tol * scale.max(1.0),
                    "{dt:?} b{b} t{t} causal {causal}: {err} of {scale}"
                );
            }
        }
        let packing = crate::model::kernels::seqs::Packing::from_lens(&[77, 5, 1, 40])?;
        let packed = Arc::new(PackedSeqs::new(packing));
        let heads = 2;
        let rows = packed.rows();
        let bf = |t: Tensor| t.to_dtype(DType::BF16);
        let qkv = bf(Tensor::randn(0f32, 1.0, (rows, 3 * heads * 64), &dev)?)?;
        let bias = bf(Tensor::randn(0f32, 0.5, 3 * heads * 64, &dev)?)?;
        let g = bf(Tensor::randn(0f32, 1.0, (rows, heads * 64), &dev)?)?;
        let tc = |packed: Option<Arc<PackedSeqs>>| FusedAttention {
            tensor_cores: true,
            packed,
            ..op(heads, true)
        };
        let back = |op: FusedAttention| AttentionBackward {
            op,
            bias: bias.clone(),
        };
        let out = qkv.apply_op2_no_bwd(&bias, &tc(Some(packed.clone())))?;
        let all = qkv.apply_op3_no_bwd(&out, &g, &back(tc(Some(packed.clone()))))?;
        let offsets = packed.packing().offsets().to_vec();
        for w in offsets.windows(2) {
            let cut =
                |t: &Tensor| -> Result<Tensor> { t.narrow(0, w[0], w[1] - w[0])?.unsqueeze(0) };
            let alone = cut(&qkv)?.apply_op3_no_bwd(&cut(&out)?, &cut(&g)?, &back(tc(None)))?;
            let err = max_diff(&all.narrow(0, w[0], w[1] - w[0])?, &alone.squeeze(0)?)?;
            assert!(err == 0.0, "caption at {}: {err}", w[0]);
        }
        Ok(())
    }

    #[test]
    fn refuses_what_it_cannot_take() -> Result<()> {
        let dev = Device::Cpu;
        let bias = |w: usize| Tensor::zeros(w, DType::F32, &dev);
        // Rows that are not three blocks of whole heads.
        let bad = Tensor::zeros((1, 4, 3 * 64 + 1), DType::F32, &dev)?;
        assert!(bad
            .apply_op2_no_bwd(&bias(3 * 64 + 1)?, &op(1, false))
            .is_err());
        // A head width the kernel does not take (48).
        let bad = Tensor::zeros((1, 4, 3 * 48), DType::F32, &dev)?;
        assert!(bad.apply_op2_no_bwd(&bias(3 * 48)?, &op(1, false)).is_err());
        // A bias of the wrong width.
        let qkv = Tensor::zeros((1, 4, 3 * 64), DType::F32, &dev)?;
        assert!(qkv.apply_op2_no_bwd(&bias(64)?, &op(1, false)).is_err());
        // An output gradient of another shape.
        let o = Tensor::zeros((1, 4, 64), DType::F32, &dev)?;
        let g = Tensor::zeros((1, 3, 64), DType::F32, &dev)?;
        let back = AttentionBackward {
            op: op(1, false),
            bias: bias(3 * 64)?,
        };
        assert!(qkv.apply_op3_no_bwd(&o, &g, &back).is_err());
        Ok(())
    }

    /// `op` on the GPU against its twin on the CPU from the same inputs (`qkv`, its bias and
    /// an output gradient, in the dtype under test): the forward within `tol`, the backward
    /// (from each side's own output) within `gtol` of the largest gradient.
    #[cfg(feature = "cuda")]
    fn gpu_matches_twin(
        gpu: &Device,
        op: &FusedAttention,
        inputs: [Result<Tensor>; 3],
        tol: f32,
        gtol: f32,
        what: &str,
    ) -> Result<()> {
        let [c, cb, g] = inputs;
        let (c, cb, g) = (c?, cb?, g?);
        let twin = c.apply_op2_no_bwd(&cb, op)?;
        let (cg, bg, gg) = (c.to_device(gpu)?, cb.to_device(gpu)?, g.to_device(gpu)?);
        let got = cg.apply_op2_no_bwd(&bg, op)?;
        let err = max_diff(&got.to_device(&Device::Cpu)?, &twin)?;
        assert!(err < tol, "{what}: max diff {err}");
        let back = |bias: &Tensor| AttentionBackward {
            op: op.clone(),
            bias: bias.clone(),
        };
        let twin = c.apply_op3_no_bwd(&twin, &g, &back(&cb))?;
        let got = cg.apply_op3_no_bwd(&got, &gg, &back(&bg))?;
        let scale = twin
            .to_dtype(DType::F32)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        let err = max_diff(&got.to_device(&Device::Cpu)?, &twin)?;
        assert!(
            err < gtol * scale.max(1.0),
            "{what} backward: max diff {err} of {scale}"
        );
        Ok(())
    }

    /// On a GPU (CUDA builds): the tensor-core forward and backward against their twins (the
    /// same roundings), f16 and bf16, text (causal), image and packed captions. Without a GPU it says so and
    /// checks nothing. `scripts/gpu-check.sh` runs it on its own and turns the tensor-core
    /// path off (`CLIPFT_NO_TC_ATTENTION=1`) for the benchmarks if it fails.
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_tc_attention_matches_its_twin() -> Result<()> {
        let Ok(gpu) = Device::new_cuda(0) else {
            eprintln!("cuda_tc_attention_matches_its_twin: skipped, no GPU");
            return Ok(());
        };
        let packing = crate::model::kernels::seqs::Packing::from_lens(&[77, 5, 1, 40, 16, 17])?;
        let packed = Arc::new(PackedSeqs::new(packing));
        let cases = [
            (
                Tensor::randn(0f32, 1.0, (4, 77, 3 * 8 * 64), &Device::Cpu)?,
                8,
                true,
                None,
            ),
            (
                Tensor::randn(0f32, 1.0, (4, 50, 3 * 12 * 64), &Device::Cpu)?,
                12,
                false,
                None,
            ),
            (
                Tensor::randn(0f32, 1.0, (1, 128, 3 * 2 * 64), &Device::Cpu)?,
                2,
                true,
                None,
            ),
            (
                Tensor::randn(0f32, 1.0, (packed.rows(), 3 * 8 * 64), &Device::Cpu)?,
                8,
                true,
                Some(packed.clone()),
            ),
        ];
        for (qkv, heads, causal, packed) in cases {
            let bias = Tensor::randn(0f32, 0.5, 3 * heads * 64, &Device::Cpu)?;
            let op = FusedAttention {
                tensor_cores: true,
                packed,
                ..op(heads, causal)
            };
            let dout = Tensor::randn(0f32, 1.0, (qkv.elem_count() / 3,), &Device::Cpu)?;
            let mut out_shape = qkv.dims().to_vec();
            if let Some(w) = out_shape.last_mut() {
                *w /= 3;
            }
            let dout = dout.reshape(out_shape)?;
            for (dt, tol, gtol) in [(DType::F16, 4e-3, 2e-2), (DType::BF16, 3e-2, 1e-1)] {
                let inputs = [&qkv, &bias, &dout].map(|t| t.to_dtype(dt));
                let what = format!("{dt:?} {:?} causal {causal}", qkv.shape());
                gpu_matches_twin(&gpu, &op, inputs, tol, gtol, &what)?;
            }
        }
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
            let bias = Tensor::randn(0f32, 0.5, 3 * d, &Device::Cpu)?;
            let dout = Tensor::randn(0f32, 1.0, (b, t, d), &Device::Cpu)?;
            for (dt, tol, gtol) in [
                (DType::F32, 1e-4, 1e-4),
                (DType::F16, 5e-3, 2e-2),
                (DType::BF16, 3e-2, 1e-1),
            ] {
                let inputs = [&qkv, &bias, &dout].map(|t| t.to_dtype(dt));
                let what = format!("{dt:?} b{b} t{t} causal {causal}");
                gpu_matches_twin(&gpu, &op, inputs, tol, gtol, &what)?;
            }
        }
        Ok(())
    }
}
