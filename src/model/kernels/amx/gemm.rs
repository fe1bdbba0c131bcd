//! Blocked GEMM C[M,N] = A[M,K] * W^T (W is [N,K], a Linear layer weight)
//! on AMX-BF16 tiles, in two precisions:
//!
//! * [`Precision::Bf16`]: one pass, C = bf16(A) * bf16(W)^T, f32 accumulate.
//! * [`Precision::Bf16x3`]: split each operand X = X_hi + X_lo (both bf16) and
//!   compute C = A_hi*B_hi + A_hi*B_lo + A_lo*B_hi (A_lo*B_lo, ~2^-16 relative,
//!   is dropped), all accumulated in the same f32 tiles.
//!
//! Micro-kernel: a 32x32 block of C lives in 4 accumulator tiles for the
//! whole K block:
//!
//! ```text
//!   tmm0 = C[ 0..16,  0..16]   tmm1 = C[ 0..16, 16..32]
//!   tmm2 = C[16..32,  0..16]   tmm3 = C[16..32, 16..32]
//!   tmm4 = A rows  0..16 (x32 K)      tmm6 = B cols  0..16 (x32 K)
//!   tmm5 = A rows 16..32 (x32 K)      tmm7 = B cols 16..32 (x32 K)
//! ```
//!
//! Per 32-wide K step, the 1-pass kernel does 4 tile loads + 4 TDPBF16PS.
//! The x3 kernel orders its products as (A_hi,B_lo), (A_hi,B_hi), (A_lo,B_hi)
//! so that only one operand changes between groups: 8 loads + 12 TDPBF16PS.
//!
//! Cache blocking (per thread; threads own disjoint column ranges of C):
//! `for K block (KB) { for N panel (NB cols) { for 32-row strip of A { for
//! 32-col strip in panel { micro-kernel } } } }` - the A strip (32 x KB) is
//! reused from L2 across the panel, the B panel (NB x KB) stays in L2 across
//! all of M. C partial sums are spilled to memory between K blocks.
//! Defaults (KB = 768, NB = 256) came from a quick sweep on a 2-core Sapphire
//! Rapids VM; the micro-kernel reaches 75-88% of TDPBF16PS peak when its
//! operands stream from L2, so the remaining gap is in the outer blocking.

use super::pack::{self, k_tiles, Line, TM, ZERO_LINE};
use super::tiles::{self as amx, tdpbf16ps, tile_load, tile_store, tile_zero, TileConfig};
use rayon::prelude::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    Bf16,
    Bf16x3,
}

/// Bytes per tile row, used as the TILELOADD stride for packed operands.
const ROW_BYTES: usize = 64;
/// Lines (= bf16 rows of 64 bytes) per tile.
const TILE_LINES: usize = TM;

/// Cache-blocking parameters (in units of 32-wide K tiles and 32-wide column
/// pairs of tiles).
#[derive(Clone, Copy, Debug)]
pub struct Blocking {
    /// K tiles per K block.
    pub kb_tiles: usize,
    /// 32-column micro-panels per N panel.
    pub nb_pairs: usize,
    /// Loop order: false = K block outermost (C spilled once per K block,
    /// B panel reused over all of M); true = N panel outermost, K blocks
    /// inside it (the C panel M x NB is revisited per K block while hot).
    pub n_outer: bool,
}

impl Default for Blocking {
    fn default() -> Self {
        Blocking {
            kb_tiles: 24,
            nb_pairs: 8,
            n_outer: false,
        }
    }
}

/// W packed once (at model load) into the B tile layout.
pub struct PackedB {
    pub n: usize,
    pub k: usize,
    /// Number of 16-column tile strips (padded to an even count).
    n_tiles: usize,
    hi: Vec<Line>,
    lo: Option<Vec<Line>>,
}

impl PackedB {
    /// Pack W ([n, k] row-major). `with_lo` also stores the low bf16 part,
    /// needed for [`Precision::Bf16x3`]. Each task takes one 16-row strip of W.
    pub fn new(w: &[f32], n: usize, k: usize, with_lo: bool) -> Self {
        assert_eq!(w.len(), n * k);
        Self::build(n, k, with_lo, true, |nt, kc, h, l| {
            pack::pack_b_tile(w, n, k, nt, kc, h, l)
        })
    }

    /// Pack B = S^T for S [rows, cols] row-major: B has `cols` output columns and K = `rows`.
    /// Gradient GEMMs use it: `dX = dY W` packs W this way, `dW = dY^T X` packs X. Each task
    /// takes a band of 32 rows of S and reads them front to back, writing that K tile of every
    /// column strip, so S streams through once in order.
    pub fn from_transposed(s: &[f32], rows: usize, cols: usize, with_lo: bool) -> Self {
        assert_eq!(s.len(), rows * cols);
        Self::build(cols, rows, with_lo, false, |nt, kc, h, l| {
            pack::pack_bt_tile(s, rows, cols, nt, kc, h, l)
        })
    }

    /// Allocates the packed parts and has `fill(nt, kc, hi, lo)` write each (strip, K tile) of
    /// 16 lines, padding included, in parallel over strips (`by_strip`) or over K tiles,
    /// whichever reads the source in order. Nothing is zero-filled first: every line is written
    /// once.
    fn build(
        n: usize,
        k: usize,
        with_lo: bool,
        by_strip: bool,
        fill: impl Fn(usize, usize, &mut [Line], Option<&mut [Line]>) + Sync,
    ) -> Self {
        let n_tiles = n.div_ceil(2 * TM) * 2;
        let kcs = k_tiles(k);
        let strip = kcs * TILE_LINES;
        let len = n_tiles * strip;
        let mut hi: Vec<Line> = Vec::with_capacity(len);
        let mut lo: Option<Vec<Line>> = with_lo.then(|| Vec::with_capacity(len));
        let hi_ptr = SendPtr(hi.as_mut_ptr().cast());
        let lo_ptr = lo.as_mut().map(|l| SendPtr(l.as_mut_ptr().cast()));
        let tile = |nt: usize, kc: usize| {
            let (hp, lp) = (hi_ptr, lo_ptr);
            let at = nt * strip + kc * TILE_LINES;
            // SAFETY: lines `at .. at + 16` belong to this (strip, K tile) alone, each is
            // visited once below, and both vectors have room for `len` lines.
            unsafe {
                let h = std::slice::from_raw_parts_mut((hp.0 as *mut Line).add(at), TILE_LINES);
                let l = lp.map(|l| {
                    std::slice::from_raw_parts_mut((l.0 as *mut Line).add(at), TILE_LINES)
                });
                fill(nt, kc, h, l);
            }
        };
        if by_strip {
            (0..n_tiles)
                .into_par_iter()
                .for_each(|nt| (0..kcs).for_each(|kc| tile(nt, kc)));
        } else {
            (0..kcs)
                .into_par_iter()
                .for_each(|kc| (0..n_tiles).for_each(|nt| tile(nt, kc)));
        }
        // SAFETY: every (strip, K tile) above wrote its 16 lines, padding included.
        unsafe {
            hi.set_len(len);
            if let Some(l) = lo.as_mut() {
                l.set_len(len);
            }
        }
        PackedB {
            n,
            k,
            n_tiles,
            hi,
            lo,
        }
    }

    #[cfg(test)]
    pub(super) fn hi_lines(&self) -> &[Line] {
        &self.hi
    }

    #[cfg(test)]
    pub(super) fn lo_lines(&self) -> Option<&[Line]> {
        self.lo.as_deref()
    }

    /// Whether the low parts are stored, as [`Precision::Bf16x3`] needs.
    pub fn has_lo(&self) -> bool {
        self.lo.is_some()
    }
}

/// Reusable per-call scratch: packed A (hi/lo) and a padded C when needed.
#[derive(Default)]
pub struct Scratch {
    a_hi: Vec<Line>,
    a_lo: Vec<Line>,
    c_pad: Vec<f32>,
}

/// Raw pointer wrapper so disjoint column ranges of C can be written from
/// several rayon tasks.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: the pointer is only dereferenced by tasks that each write their own disjoint column
// range of C (or packed strip), while the buffer it points into outlives the parallel section.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// 32x32 micro-kernel over `nk` K tiles.
///
/// * `a_hi`/`a_lo`: first K tile of the upper 16-row A strip; the lower strip
///   starts `a_strip` lines later.
/// * `b_hi`/`b_lo`: first K tile of the left 16-column B strip; the right
///   strip starts `b_strip` lines later.
/// * `c`: top-left of the 32x32 C block, `ldc_bytes` between rows.
/// * `load_c`: accumulate into existing C (false: start from zero).
///
/// # Safety
/// Tile config [`TileConfig::all_full`] must be loaded on this thread; all
/// pointers must cover the accessed ranges.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn micro_kernel<const X3: bool>(
    nk: usize,
    a_hi: *const Line,
    a_lo: *const Line,
    a_strip: usize,
    b_hi: *const Line,
    b_lo: *const Line,
    b_strip: usize,
    c: *mut f32,
    ldc_bytes: usize,
    load_c: bool,
) {
    let c00 = c as *mut u8;
    let c01 = c.add(16) as *mut u8;
    let c10 = c00.add(16 * ldc_bytes);
    let c11 = c01.add(16 * ldc_bytes);
    if load_c {
        tile_load::<0>(c00, ldc_bytes);
        tile_load::<1>(c01, ldc_bytes);
        tile_load::<2>(c10, ldc_bytes);
        tile_load::<3>(c11, ldc_bytes);
    } else {
        tile_zero::<0>();
        tile_zero::<1>();
        tile_zero::<2>();
        tile_zero::<3>();
    }
    for kc in 0..nk {
        let off = kc * TILE_LINES;
        let ah0 = a_hi.add(off) as *const u8;
        let ah1 = a_hi.add(off + a_strip) as *const u8;
        let bh0 = b_hi.add(off) as *const u8;
        let bh1 = b_hi.add(off + b_strip) as *const u8;
        if X3 {
            let al0 = a_lo.add(off) as *const u8;
            let al1 = a_lo.add(off + a_strip) as *const u8;
            let bl0 = b_lo.add(off) as *const u8;
            let bl1 = b_lo.add(off + b_strip) as *const u8;
            // A_hi * B_lo
            tile_load::<4>(ah0, ROW_BYTES);
            tile_load::<6>(bl0, ROW_BYTES);
            tile_load::<7>(bl1, ROW_BYTES);
            tile_load::<5>(ah1, ROW_BYTES);
            tdpbf16ps::<0, 4, 6>();
            tdpbf16ps::<1, 4, 7>();
            tdpbf16ps::<2, 5, 6>();
            tdpbf16ps::<3, 5, 7>();
            // A_hi * B_hi (A tiles kept)
            tile_load::<6>(bh0, ROW_BYTES);
            tile_load::<7>(bh1, ROW_BYTES);
            tdpbf16ps::<0, 4, 6>();
            tdpbf16ps::<1, 4, 7>();
            tdpbf16ps::<2, 5, 6>();
            tdpbf16ps::<3, 5, 7>();
            // A_lo * B_hi (B tiles kept)
            tile_load::<4>(al0, ROW_BYTES);
            tile_load::<5>(al1, ROW_BYTES);
            tdpbf16ps::<0, 4, 6>();
            tdpbf16ps::<1, 4, 7>();
            tdpbf16ps::<2, 5, 6>();
            tdpbf16ps::<3, 5, 7>();
        } else {
            tile_load::<4>(ah0, ROW_BYTES);
            tile_load::<6>(bh0, ROW_BYTES);
            tile_load::<7>(bh1, ROW_BYTES);
            tile_load::<5>(ah1, ROW_BYTES);
            tdpbf16ps::<0, 4, 6>();
            tdpbf16ps::<1, 4, 7>();
            tdpbf16ps::<2, 5, 6>();
            tdpbf16ps::<3, 5, 7>();
        }
    }
    tile_store::<0>(c00, ldc_bytes);
    tile_store::<1>(c01, ldc_bytes);
    tile_store::<2>(c10, ldc_bytes);
    tile_store::<3>(c11, ldc_bytes);
}

/// Compute the column pairs `p0..p1` (32 columns each) of the padded C.
///
/// # Safety
/// AMX permission granted; `c` points to an `mp x ldc` f32 buffer with
/// `mp = 32 * m_pairs`, `ldc >= 32 * p1`; packed buffers sized consistently.
#[allow(clippy::too_many_arguments)]
unsafe fn run_columns<const X3: bool>(
    a_hi: &[Line],
    a_lo: &[Line],
    m_pairs: usize,
    b: &PackedB,
    c: *mut f32,
    ldc: usize,
    p0: usize,
    p1: usize,
    blk: Blocking,
    accumulate: bool,
) {
    let kcs = k_tiles(b.k);
    let strip = kcs * TILE_LINES; // lines per 16-row / 16-col strip
    let b_hi = b.hi.as_ptr();
    let b_lo = b.lo.as_ref().map_or(core::ptr::null(), |v| v.as_ptr());
    let a_hi = a_hi.as_ptr();
    let a_lo = if X3 { a_lo.as_ptr() } else { core::ptr::null() };
    let ldc_bytes = ldc * 4;

    let cfg = TileConfig::all_full();
    cfg.load();
    // One (K block, N panel) step: all 32-row strips of A against the
    // panel's 32-column strips of B.
    let block = |k0: usize, nk: usize, np0: usize, np1: usize| {
        let kl = k0 * TILE_LINES; // line offset of this K block inside a strip
        for mp in 0..m_pairs {
            let ao = 2 * mp * strip + kl;
            for np in np0..np1 {
                let bo = 2 * np * strip + kl;
                micro_kernel::<X3>(
                    nk,
                    a_hi.add(ao),
                    if X3 { a_lo.add(ao) } else { a_lo },
                    strip,
                    b_hi.add(bo),
                    if X3 { b_lo.add(bo) } else { b_lo },
                    strip,
                    c.add(32 * mp * ldc + 32 * np),
                    ldc_bytes,
                    k0 > 0 || accumulate,
                );
            }
        }
    };
    let k_blocks = (0..kcs)
        .step_by(blk.kb_tiles)
        .map(|k0| (k0, blk.kb_tiles.min(kcs - k0)));
    let n_panels = (p0..p1)
        .step_by(blk.nb_pairs)
        .map(|n0| (n0, (n0 + blk.nb_pairs).min(p1)));
    if blk.n_outer {
        for (np0, np1) in n_panels {
            for (k0, nk) in k_blocks.clone() {
                block(k0, nk, np0, np1);
            }
        }
    } else {
        for (k0, nk) in k_blocks {
            for (np0, np1) in n_panels.clone() {
                block(k0, nk, np0, np1);
            }
        }
    }
    amx::tile_release();
}

/// C[M,N] = A[M,K] * W^T with W pre-packed in `b`. `c` is [M, N] row-major; it is overwritten,
/// or added to when `accumulate` (how bias and residual enter). Uses the current rayon pool (one
/// task per thread, each owning a contiguous range of C columns).
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    a: &[f32],
    m: usize,
    b: &PackedB,
    c: &mut [f32],
    prec: Precision,
    blk: Blocking,
    scratch: &mut Scratch,
    accumulate: bool,
) {
    let (n, k) = (b.n, b.k);
    assert_eq!(a.len(), m * k);
    assert_eq!(c.len(), m * n);
    let x3 = prec == Precision::Bf16x3;
    assert!(!x3 || b.lo.is_some(), "Bf16x3 needs PackedB built with_lo");
    if m == 0 || n == 0 {
        return;
    }

    // ---- pack A (16-row strips, in parallel) ----
    let m_pairs = m.div_ceil(32);
    let strip = k_tiles(k) * TILE_LINES;
    let a_lines = 2 * m_pairs * strip;
    scratch.a_hi.resize(a_lines, ZERO_LINE);
    if x3 {
        scratch.a_lo.resize(a_lines, ZERO_LINE);
        scratch
            .a_hi
            .par_chunks_mut(strip)
            .zip(scratch.a_lo.par_chunks_mut(strip))
            .enumerate()
            .for_each(|(mt, (h, l))| pack::pack_a_strip(a, m, k, mt, h, Some(l)));
    } else {
        scratch
            .a_hi
            .par_chunks_mut(strip)
            .enumerate()
            .for_each(|(mt, h)| pack::pack_a_strip(a, m, k, mt, h, None));
    }

    // ---- C target: write in place when M, N are multiples of 32 ----
    let padded = !m.is_multiple_of(32) || !n.is_multiple_of(32);
    let ldc = if padded { b.n_tiles * TM } else { n };
    let c_ptr = if padded {
        scratch.c_pad.clear();
        scratch.c_pad.resize(32 * m_pairs * ldc, 0.0);
        if accumulate {
            for (i, row) in c.chunks_exact(n).enumerate() {
                scratch.c_pad[i * ldc..i * ldc + n].copy_from_slice(row);
            }
        }
        SendPtr(scratch.c_pad.as_mut_ptr())
    } else {
        SendPtr(c.as_mut_ptr())
    };

    // ---- split the 32-column pairs over the rayon threads ----
    let n_pairs = b.n_tiles / 2;
    let threads = rayon::current_num_threads().max(1).min(n_pairs);
    let (a_hi, a_lo) = (&scratch.a_hi[..], &scratch.a_lo[..]);
    (0..threads).into_par_iter().for_each(|t| {
        let p0 = n_pairs * t / threads;
        let p1 = n_pairs * (t + 1) / threads;
        let c = c_ptr;
        // SAFETY: each task writes a disjoint column range [32*p0, 32*p1).
        unsafe {
            if x3 {
                run_columns::<true>(a_hi, a_lo, m_pairs, b, c.0, ldc, p0, p1, blk, accumulate)
            } else {
                run_columns::<false>(a_hi, a_lo, m_pairs, b, c.0, ldc, p0, p1, blk, accumulate)
            }
        }
    });

    if padded {
        for (i, row) in c.chunks_exact_mut(n).enumerate() {
            row.copy_from_slice(&scratch.c_pad[i * ldc..i * ldc + n]);
        }
    }
}
