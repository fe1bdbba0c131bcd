//! f32 matrix products on Intel AMX tiles (Sapphire Rapids and later), for the fused CPU path.
//!
//! An f32 GEMM on two AVX-512 cores tops out near 400 GFLOPS here, which is where ONNX Runtime
//! and PyTorch already are. AMX multiplies bf16 tiles with f32 accumulation several times faster.
//! To keep f32-grade results each operand is split as `x = hi + lo` (both bf16) and the product is
//! `A_hi B_hi + A_hi B_lo + A_lo B_hi` ("bf16x3", [`Precision::Bf16x3`]): about 16 significant bits
//! per operand, a relative error near 4e-6 per product (f32 GEMM: 4e-7), at 2-3x the speed of the
//! f32 kernels. [`Precision::Bf16`] is the single bf16 pass (error near 2e-3), only on request.
//!
//! Weights are packed once into the tile layout ([`PackedB`]); activations are packed per call.
//! [`available`] checks the CPU (CPUID), the AVX-512 BF16 conversion instructions, and asks Linux
//! for permission to use tile data (`arch_prctl`), once per process.

mod gemm;
mod pack;
mod tiles;

use std::cell::RefCell;
use std::sync::OnceLock;

pub use gemm::{PackedB, Precision};

/// Whether AMX-BF16 can be used in this process (CPU support and kernel permission).
pub fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        if !std::arch::is_x86_feature_detected!("avx512bf16")
            || !std::arch::is_x86_feature_detected!("avx512bw")
        {
            return false;
        }
        match tiles::request_amx_permission() {
            Ok(()) => true,
            Err(e) => {
                tracing::info!("AMX not used: {e}");
                false
            }
        }
    })
}

thread_local! {
    static SCRATCH: RefCell<gemm::Scratch> = RefCell::new(gemm::Scratch::default());
}

/// `c[m, n] (+)= a[m, k] W^T` with `W` packed in `b`; see the module doc for the precision.
///
/// # Panics
/// If [`available`] is false or the sizes do not match `b`.
pub fn matmul(a: &[f32], m: usize, b: &PackedB, c: &mut [f32], prec: Precision, accumulate: bool) {
    assert!(available(), "AMX matmul called where AMX is not available");
    SCRATCH.with(|s| {
        gemm::matmul(
            a,
            m,
            b,
            c,
            prec,
            gemm::Blocking::default(),
            &mut s.borrow_mut(),
            accumulate,
        )
    });
}

#[cfg(test)]
mod tests {
    use super::gemm::{matmul, Blocking, PackedB, Precision, Scratch};
    use super::pack::{bf16_to_f32, f32_to_bf16, pack_a_strip, split_bf16, Line, ZERO_LINE};

    fn normal(n: usize, seed: u64) -> Vec<f32> {
        // Small deterministic generator (xorshift + Box-Muller); enough for kernel tests.
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut u = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        (0..n)
            .map(|_| ((-2.0 * u().ln()).sqrt() * (std::f64::consts::TAU * u()).cos()) as f32)
            .collect()
    }

    /// What the kernel computes up to f32 summation order: products of the bf16 parts in f64.
    fn emulated(a: &[f32], w: &[f32], m: usize, n: usize, k: usize, x3: bool) -> Vec<f64> {
        let sp = |x: f32| {
            let (h, l) = split_bf16(x);
            (bf16_to_f32(h) as f64, bf16_to_f32(l) as f64)
        };
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for p in 0..k {
                    let (ah, al) = sp(a[i * k + p]);
                    let (bh, bl) = sp(w[j * k + p]);
                    s += ah * bh;
                    if x3 {
                        s += ah * bl + al * bh;
                    }
                }
                c[i * n + j] = s;
            }
        }
        c
    }

    #[test]
    fn bf16_rounding() {
        assert_eq!(f32_to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 lies halfway between bf16 1.0 and 1 + 2^-7: ties go to even.
        assert_eq!(f32_to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(f32_to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        let x = 0.123_456_7f32;
        let (h, l) = split_bf16(x);
        assert!(((bf16_to_f32(h) + bf16_to_f32(l)) - x).abs() <= x.abs() * 2f32.powi(-16));
    }

    #[test]
    fn small_shapes_match_reference() {
        if !super::available() {
            eprintln!("skipped: no AMX on this machine");
            return;
        }
        let shapes = [
            (32, 32, 32),
            (16, 32, 16),
            (1, 5, 3),
            (33, 70, 45),
            (64, 96, 128),
            (100, 300, 97),
        ];
        let mut scratch = Scratch::default();
        for (i, &(m, k, n)) in shapes.iter().enumerate() {
            let a = normal(m * k, 2 * i as u64 + 1);
            let w = normal(n * k, 2 * i as u64 + 2);
            let b = PackedB::new(&w, n, k, true);
            let bias = normal(m * n, 99);
            for (prec, x3) in [(Precision::Bf16, false), (Precision::Bf16x3, true)] {
                for blk in [
                    Blocking::default(),
                    Blocking {
                        kb_tiles: 1,
                        nb_pairs: 1,
                        n_outer: false,
                    },
                    Blocking {
                        kb_tiles: 2,
                        nb_pairs: 1,
                        n_outer: true,
                    },
                ] {
                    for accumulate in [false, true] {
                        let mut c = if accumulate {
                            bias.clone()
                        } else {
                            vec![f32::NAN; m * n]
                        };
                        matmul(&a, m, &b, &mut c, prec, blk, &mut scratch, accumulate);
                        let e = emulated(&a, &w, m, n, k, x3);
                        let tol = 1e-5 * (k as f64).sqrt() * 4.0;
                        for idx in 0..m * n {
                            let want = e[idx] + if accumulate { bias[idx] as f64 } else { 0.0 };
                            assert!(
                                (c[idx] as f64 - want).abs() <= tol,
                                "{prec:?} {m}x{k}x{n} {blk:?} acc {accumulate} idx {idx}: {} vs {want}",
                                c[idx]
                            );
                        }
                    }
                }
            }
        }
    }

    /// W^T in the VNNI layout element by element: line (nt, kc, r) holds W[16nt + j][32kc + 2r + p]
    /// at 2j + p.
    fn vnni_reference(w: &[f32], n: usize, k: usize) -> (Vec<u16>, Vec<u16>) {
        let n_tiles = n.div_ceil(32) * 2;
        let kcs = k.div_ceil(32);
        let (mut hi, mut lo) = (
            vec![0u16; n_tiles * kcs * 16 * 32],
            vec![0u16; n_tiles * kcs * 16 * 32],
        );
        for col in 0..n {
            for kk in 0..k {
                let (nt, j) = (col / 16, col % 16);
                let (kc, r, p) = (kk / 32, (kk % 32) / 2, kk % 2);
                let at = ((nt * kcs + kc) * 16 + r) * 32 + 2 * j + p;
                (hi[at], lo[at]) = split_bf16(w[col * k + kk]);
            }
        }
        (hi, lo)
    }

    fn lines(p: &PackedB) -> (Vec<u16>, Vec<u16>) {
        let flat = |v: &[Line]| v.iter().flat_map(|l| l.0).collect::<Vec<u16>>();
        (flat(p.hi_lines()), flat(p.lo_lines().expect("with_lo")))
    }

    #[test]
    fn packed_b_matches_the_vnni_layout_both_ways() {
        if !super::available() {
            return;
        }
        // Partial K chunks, partial 16-column strips, an odd row count.
        for (n, k) in [(16, 32), (40, 70), (33, 97), (96, 64)] {
            let w = normal(n * k, (n * k) as u64);
            let want = vnni_reference(&w, n, k);
            assert!(lines(&PackedB::new(&w, n, k, true)) == want, "new {n}x{k}");
            // The same B from its transpose S = W^T ([k, n]).
            let s: Vec<f32> = (0..k)
                .flat_map(|kk| (0..n).map(move |col| (kk, col)))
                .map(|(kk, col)| w[col * k + kk])
                .collect();
            assert!(
                lines(&PackedB::from_transposed(&s, k, n, true)) == want,
                "transposed {n}x{k}"
            );
        }
    }

    #[test]
    fn packed_a_matches_scalar_split() {
        if !super::available() {
            return;
        }
        // K = 70: two full 32-wide lines (AVX-512 path) and one partial (scalar path).
        let (m, k) = (16, 70);
        let mut a = normal(m * k, 3);
        a[0] = 1.0 + 1.0 / 256.0;
        a[1] = 1.0 + 3.0 / 256.0;
        let mut hi = vec![ZERO_LINE; 3 * 16];
        let mut lo = vec![ZERO_LINE; 3 * 16];
        pack_a_strip(&a, m, k, 0, &mut hi, Some(&mut lo[..]));
        let get = |v: &[Line], r: usize, c: usize| v[(c / 32) * 16 + r].0[c % 32];
        for r in 0..m {
            for c in 0..96 {
                let (h, l) = if c < k {
                    split_bf16(a[r * k + c])
                } else {
                    (0, 0)
                };
                assert_eq!((get(&hi, r, c), get(&lo, r, c)), (h, l), "r {r} c {c}");
            }
        }
    }
}
