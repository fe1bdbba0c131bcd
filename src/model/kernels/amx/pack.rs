//! f32 -> bf16 conversion and packing into AMX tile layouts.
//!
//! Both operands are stored as a sequence of 1 KiB tiles (16 rows x 64 bytes),
//! each tile 64-byte aligned and contiguous, so every `TILELOADD` uses a
//! 64-byte stride and touches exactly 16 consecutive cache lines.
//!
//! * A (activations, [M, K] row-major) -> tile (mt, kc) holds rows
//!   `16*mt .. 16*mt+16`, columns `32*kc .. 32*kc+32` as plain row-major bf16.
//! * B (weights W, [N, K] row-major, used as W^T) -> tile (nt, kc) holds the
//!   "VNNI pair" layout TDPBF16PS expects: row r (0..16) is the k-pair
//!   (32*kc + 2r, 32*kc + 2r + 1), and in it output column n (0..16) occupies
//!   the two bf16 `W[16*nt + n][32*kc + 2r]`, `W[16*nt + n][32*kc + 2r + 1]`.
//!
//! Tiles are ordered with kc fastest, so one 16-row (or 16-column) strip of
//! the matrix is a contiguous run of tiles over K.
//! Out-of-range rows/columns/K are zero padded.

/// One 64-byte cache line holding 32 bf16 values; the unit of storage for
/// packed tiles (16 lines = 1 tile).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub struct Line(pub [u16; 32]);

pub const ZERO_LINE: Line = Line([0; 32]);
/// Elements of the K dimension per tile (32 bf16 = 64 bytes per row).
pub const TK: usize = 32;
/// Rows (A) / columns (B) per tile.
pub const TM: usize = 16;

/// Round-to-nearest-even f32 -> bf16 (bit pattern). NaNs are kept quiet NaNs.
#[inline(always)]
pub fn f32_to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16;
    let nan = ((b >> 16) | 0x40) as u16;
    if x.is_nan() {
        nan
    } else {
        rounded as u16
    }
}

#[inline(always)]
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// Split x into hi = bf16(x) and lo = bf16(x - hi). x ~= hi + lo with
/// about 16 significant bits (vs. 24 for f32).
#[inline(always)]
pub fn split_bf16(x: f32) -> (u16, u16) {
    let hi = f32_to_bf16(x);
    let lo = f32_to_bf16(x - bf16_to_f32(hi));
    (hi, lo)
}

/// Convert 32 consecutive f32 (zero padded if `src` is shorter) into one
/// hi line and (optionally) one lo line.
#[inline(always)]
fn convert_line(src: &[f32], hi: &mut Line, lo: Option<&mut Line>) {
    if src.len() == TK && avx512_bf16() {
        // SAFETY: `src` holds 32 readable f32, and the CPU has the instructions
        // `convert_line_avx512` is compiled for (checked just above).
        unsafe { convert_line_avx512(src.as_ptr(), hi, lo) };
        return;
    }
    let mut buf = [0f32; TK];
    buf[..src.len()].copy_from_slice(src);
    match lo {
        Some(lo) => {
            for ((h, l), x) in hi.0.iter_mut().zip(lo.0.iter_mut()).zip(buf) {
                (*h, *l) = split_bf16(x);
            }
        }
        None => {
            for (h, x) in hi.0.iter_mut().zip(buf) {
                *h = f32_to_bf16(x);
            }
        }
    }
}

/// Whether this CPU runs the AVX-512 BF16 conversions (checked once). Packing is public (weights
/// can be packed on any machine); where this is false the scalar conversions run instead.
pub fn avx512_bf16() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    })
}

/// AVX-512 version of the full-line conversion. VCVTNE2PS2BF16 rounds to
/// nearest even, matching [`f32_to_bf16`] for non-NaN inputs.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn convert_line_avx512(src: *const f32, hi: &mut Line, lo: Option<&mut Line>) {
    use core::arch::x86_64::*;
    let x0 = _mm512_loadu_ps(src);
    let x1 = _mm512_loadu_ps(src.add(16));
    // Lower 16 bf16 come from the second argument.
    let h = _mm512_cvtne2ps_pbh(x1, x0);
    _mm512_store_si512(
        hi.0.as_mut_ptr() as *mut __m512i,
        core::mem::transmute::<__m512bh, __m512i>(h),
    );
    if let Some(lo) = lo {
        let hi_bits: __m512i = core::mem::transmute(h);
        // bf16 -> f32 is a 16-bit left shift of the zero-extended value.
        let h0 = _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(hi_bits)));
        let h1 = _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64::<1>(
            hi_bits,
        )));
        let r0 = _mm512_sub_ps(x0, _mm512_castsi512_ps(h0));
        let r1 = _mm512_sub_ps(x1, _mm512_castsi512_ps(h1));
        let l = _mm512_cvtne2ps_pbh(r1, r0);
        _mm512_store_si512(
            lo.0.as_mut_ptr() as *mut __m512i,
            core::mem::transmute::<__m512bh, __m512i>(l),
        );
    }
}

/// Number of tiles along K for a given K.
pub fn k_tiles(k: usize) -> usize {
    k.div_ceil(TK)
}

/// Pack the 16-row strip `mt` of A ([m, k] row-major) into `hi` / `lo`
/// (each `k_tiles(k) * 16` lines).
pub fn pack_a_strip(
    a: &[f32],
    m: usize,
    k: usize,
    mt: usize,
    hi: &mut [Line],
    mut lo: Option<&mut [Line]>,
) {
    let kcs = k_tiles(k);
    debug_assert_eq!(hi.len(), kcs * TM);
    for r in 0..TM {
        let row = mt * TM + r;
        for kc in 0..kcs {
            let idx = kc * TM + r;
            if row >= m {
                hi[idx] = ZERO_LINE;
                if let Some(lo) = lo.as_deref_mut() {
                    lo[idx] = ZERO_LINE;
                }
                continue;
            }
            let k0 = kc * TK;
            let src = &a[row * k + k0..row * k + k.min(k0 + TK)];
            convert_line(src, &mut hi[idx], lo.as_deref_mut().map(|l| &mut l[idx]));
        }
    }
}

/// Pack K tile `kc` of the 16-column strip `nt` of W^T (W is [n, k] row-major)
/// into the VNNI pair layout, hi and (optionally) lo parts: the 32-wide K chunk
/// of the strip's 16 rows is converted a line at a time (AVX-512), then the
/// bf16 pairs are transposed into place. Writes all 16 lines, zero padding
/// included (training packs every weight every step).
pub fn pack_b_tile(
    w: &[f32],
    n: usize,
    k: usize,
    nt: usize,
    kc: usize,
    hi: &mut [Line],
    lo: Option<&mut [Line]>,
) {
    debug_assert_eq!(hi.len(), TM);
    let with_lo = lo.is_some();
    let mut th = [ZERO_LINE; TM];
    let mut tl = [ZERO_LINE; TM];
    let k0 = kc * TK;
    for j in 0..TM {
        let col = nt * TM + j;
        if col < n {
            let src = &w[col * k + k0..col * k + k.min(k0 + TK)];
            convert_line(src, &mut th[j], with_lo.then_some(&mut tl[j]));
        }
    }
    transpose_pairs(&th, hi);
    if let Some(lo) = lo {
        transpose_pairs(&tl, lo);
    }
}

/// `dst[r]`'s pair `j` = `src[j]`'s pair `r`: a 16 x 16 transpose of bf16 pairs.
#[inline(always)]
fn transpose_pairs(src: &[Line; TM], dst: &mut [Line]) {
    for (r, d) in dst.iter_mut().enumerate() {
        for (j, s) in src.iter().enumerate() {
            d.0[2 * j] = s.0[2 * r];
            d.0[2 * j + 1] = s.0[2 * r + 1];
        }
    }
}

/// Pack K tile `kc` of the 16-column strip `nt` of B = S^T, where S is [rows, cols] row-major
/// (so B is [cols, rows] and its K is `rows`), into the VNNI pair layout: the two rows of S in
/// each K pair are read 16 columns at a time and interleaved. Writes all 16 lines of `hi` (and
/// `lo`), zero padding included. This is how a gradient GEMM uses a weight or an activation
/// without a transposed copy.
pub fn pack_bt_tile(
    s: &[f32],
    rows: usize,
    cols: usize,
    nt: usize,
    kc: usize,
    hi: &mut [Line],
    mut lo: Option<&mut [Line]>,
) {
    debug_assert_eq!(hi.len(), TM);
    assert!(
        avx512_bf16(),
        "packing a transposed operand needs AVX-512 BF16 (AMX machines have it)"
    );
    assert!(rows.checked_mul(cols).is_some_and(|n| n <= s.len()));
    let c0 = nt * TM;
    let width = cols.saturating_sub(c0).min(TM);
    // The rows' 16-column windows, or None past the last row (zero padding).
    let window = |row: usize| (row < rows && width > 0).then(|| s[row * cols + c0..].as_ptr());
    for r in 0..TM {
        let row = kc * TK + 2 * r;
        // SAFETY: the CPU has AVX-512 BF16 (asserted above); a window starts at row `row` <
        // `rows`, column `c0` < `cols`, and has `width` <= `cols - c0` readable values inside
        // `s` (asserted above), which the masked loads do not pass.
        unsafe {
            interleave_pair_avx512(
                window(row),
                window(row + 1),
                width,
                &mut hi[r],
                lo.as_deref_mut().map(|l| &mut l[r]),
            )
        };
    }
}

/// One VNNI line from the first `width` (at most 16) values of two K-consecutive rows (None: a
/// row of zeros): `hi[2j] = bf16(row0[j])`, `hi[2j + 1] = bf16(row1[j])`, and the same for the
/// low parts; columns from `width` on are zero.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn interleave_pair_avx512(
    row0: Option<*const f32>,
    row1: Option<*const f32>,
    width: usize,
    hi: &mut Line,
    lo: Option<&mut Line>,
) {
    use core::arch::x86_64::*;
    let mask: __mmask16 = if width >= TM {
        0xffff
    } else {
        (1u16 << width) - 1
    };
    let load = |p: Option<*const f32>| match p {
        Some(p) => _mm512_maskz_loadu_ps(mask, p),
        None => _mm512_setzero_ps(),
    };
    let (x0, x1) = (load(row0), load(row1));
    // Element 2j takes x0's j (at j), element 2j + 1 takes x1's j (at 16 + j).
    let idx = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4,
        19, 3, 18, 2, 17, 1, 16, 0,
    );
    let h: __m512i = core::mem::transmute(_mm512_cvtne2ps_pbh(x1, x0));
    _mm512_store_si512(
        hi.0.as_mut_ptr() as *mut __m512i,
        _mm512_permutexvar_epi16(idx, h),
    );
    if let Some(lo) = lo {
        let h0 = _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(h)));
        let h1 = _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64::<1>(h)));
        let r0 = _mm512_sub_ps(x0, _mm512_castsi512_ps(h0));
        let r1 = _mm512_sub_ps(x1, _mm512_castsi512_ps(h1));
        let l: __m512i = core::mem::transmute(_mm512_cvtne2ps_pbh(r1, r0));
        _mm512_store_si512(
            lo.0.as_mut_ptr() as *mut __m512i,
            _mm512_permutexvar_epi16(idx, l),
        );
    }
}
