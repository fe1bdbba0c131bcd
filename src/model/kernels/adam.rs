//! The Adam / AdamW update over one parameter's buffers, as torch.optim computes it: weight,
//! gradient and both moments in one pass, in place. The trainer's optimiser runs it on the CPU
//! (per chunk, on every core) and its CUDA twin, `cuda/adam.cu`, on the GPU; both perform the
//! same IEEE operations in the same order without fused multiply-adds, so they give the same
//! bits.

/// The scalars of one step, shared by every parameter. They are formed in f64 and rounded once
/// to f32, as torch passes Python floats to its f32 kernels (so `1 - beta2` is f32(0.001), not
/// 1 - f32(0.999)).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamScalars {
    /// AdamW's decoupled decay (`w *= decay`) when true; Adam's L2 term (`g += wd w`) when
    /// false.
    pub decoupled: bool,
    /// 1 - lr * weight_decay
    pub decay: f32,
    /// weight_decay
    pub wd: f32,
    pub one_minus_beta1: f32,
    pub beta2: f32,
    pub one_minus_beta2: f32,
    pub eps: f32,
    /// Gradient multiplier: norm clipping and loss-scale undoing (1 when off).
    pub grad_scale: f32,
    /// lr / (1 - beta1^t)
    pub step_size: f32,
    /// sqrt(1 - beta2^t)
    pub bc2_sqrt: f32,
}

/// One step over a parameter: `w`, `m` and `v` updated in place from `g`. The four buffers
/// are cut to `w`'s length; shorter `g`, `m` or `v` panic (a caller's size bug).
pub fn adam_update(w: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: AdamScalars) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F, checked just above.
        return unsafe { update_avx512(w, g, m, v, s) };
    }
    update_portable(w, g, m, v, s)
}

/// The portable loop compiled for AVX-512: 16 lanes at a time, a quarter of the SSE2
/// baseline's instructions, the same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn update_avx512(w: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: AdamScalars) {
    update_portable(w, g, m, v, s)
}

#[inline(always)]
fn update_portable(w: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: AdamScalars) {
    let n = w.len();
    let (g, m, v) = (&g[..n], &mut m[..n], &mut v[..n]);
    for i in 0..n {
        let mut grad = g[i] * s.grad_scale;
        if s.decoupled {
            w[i] *= s.decay;
        } else {
            grad += s.wd * w[i];
        }
        // torch: exp_avg.lerp_(grad, 1 - beta1); exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2)
        m[i] += (grad - m[i]) * s.one_minus_beta1;
        v[i] = v[i] * s.beta2 + s.one_minus_beta2 * grad * grad;
        let denom = v[i].sqrt() / s.bc2_sqrt + s.eps;
        w[i] -= s.step_size * m[i] / denom;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Reproducible values in [-0.5, 0.5).
    pub(crate) fn val(i: usize, s: u32) -> f32 {
        ((i as u32).wrapping_mul(2_654_435_761) ^ s) as f32 / 4e9 - 0.5
    }

    pub(crate) fn scalars(decoupled: bool) -> AdamScalars {
        AdamScalars {
            decoupled,
            decay: 0.9999,
            wd: 0.01,
            one_minus_beta1: 0.1,
            beta2: 0.999,
            one_minus_beta2: 0.001,
            eps: 1e-8,
            grad_scale: 0.5,
            step_size: 1e-3,
            bc2_sqrt: 0.0447,
        }
    }

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
            for decoupled in [true, false] {
                let s = scalars(decoupled);
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
                    "decoupled {decoupled}"
                );
            }
        }
    }
}
