//! CLIPLoss: the symmetric contrastive loss over a batch of matching text-image pairs.

use candle_core::{Result, Tensor, D};

fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    x.broadcast_div(&x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?)
}

/// `(CE(logits, diag) + CE(logits^T, diag)) / 2` with `logits = exp(logit_scale) * t @ i^T` over
/// L2-normalised features: pair `k` is the right answer for row and column `k`.
pub fn clip_loss(text: &Tensor, image: &Tensor, logit_scale: &Tensor) -> Result<Tensor> {
    let b = text.dim(0)?;
    if image.dim(0)? != b {
        candle_core::bail!(
            "CLIPLoss needs as many images as texts ({} vs {b})",
            image.dim(0)?
        );
    }
    let t = l2_normalize(&text.to_dtype(candle_core::DType::F32)?)?;
    let i = l2_normalize(&image.to_dtype(candle_core::DType::F32)?)?;
    let scale = logit_scale.to_dtype(candle_core::DType::F32)?.exp()?;
    let logits = t.matmul(&i.t()?)?.broadcast_mul(&scale)?;
    let labels = Tensor::arange(0u32, b as u32, text.device())?;
    let a = candle_nn::loss::cross_entropy(&logits, &labels)?;
    let c = candle_nn::loss::cross_entropy(&logits.t()?, &labels)?;
    (a + c)? / 2.0
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
