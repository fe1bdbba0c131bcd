//! CLIPLoss: the symmetric contrastive loss over a batch of matching text-image pairs.

use candle_core::{DType, Result, Tensor};

use crate::model::ops::clip_loss::{ClipCe, RowNorm};

/// `(CE(logits, diag) + CE(logits^T, diag)) / 2` with `logits = exp(logit_scale) * t @ i^T` over
/// L2-normalised features: pair `k` is the right answer for row and column `k`. In f32 whatever
/// the features hold, as three ops with their own backward (`model::ops::clip_loss`: the row
/// norms, the similarity GEMM, the cross-entropy) instead of two dozen small ones each way.
pub fn clip_loss(text: &Tensor, image: &Tensor, logit_scale: &Tensor) -> Result<Tensor> {
    let b = text.dim(0)?;
    if image.dim(0)? != b {
        candle_core::bail!(
            "CLIPLoss needs as many images as texts ({} vs {b})",
            image.dim(0)?
        );
    }
    let t = text.contiguous()?.apply_op1(RowNorm)?;
    let i = image.contiguous()?.apply_op1(RowNorm)?;
    let similarities = t.matmul(&i.t()?)?;
    similarities.apply_op2(&logit_scale.to_dtype(DType::F32)?.contiguous()?, ClipCe)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn perfect_alignment_has_low_loss_and_swaps_high() -> Result<()> {
        let d = Device::Cpu;
        let t = Tensor::new(&[[1f32, 0.0], [0.0, 1.0]], &d)?;
        let ls = Tensor::new(100f32.ln(), &d)?;
        let good = clip_loss(&t, &t, &ls)?.to_scalar::<f32>()?;
        let swapped = Tensor::new(&[[0f32, 1.0], [1.0, 0.0]], &d)?;
        let bad = clip_loss(&t, &swapped, &ls)?.to_scalar::<f32>()?;
        assert!(good < 1e-6, "{good}");
        assert!((bad - 100.0).abs() < 1e-3, "{bad}");
        Ok(())
    }
}
