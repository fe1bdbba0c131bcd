//! Fused f32 kernels for inference on the CPU.
//!
//! Candle runs a transformer block as some twenty separate ops, each a full pass over memory with
//! a fresh allocation, and most of them on one thread; on a 2-core machine that costs as much as
//! the matrix products themselves. Here one block is a handful of passes: bias (and residual) are
//! written into the output before the GEMM accumulates into it, the activation runs in place, layer
//! norm and attention are single parallel passes. The weights are the model's own tensors, read in
//! place; training never comes here (it needs candle's graph for gradients).

use std::sync::atomic::{AtomicU8, Ordering};

use candle_core::{bail, Device, Result, Storage, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use super::amx;
pub use super::seqs::Seqs;

/// How f32 matrix products may be computed on the CPU, after PyTorch's
/// `torch.set_float32_matmul_precision`: one process-wide choice, made before models run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MatmulPrecision {
    /// Plain f32 products (AVX-512 / AVX2).
    Highest,
    /// bf16x3 on AMX where the CPU has it (relative error ~4e-6 per product), f32 elsewhere.
    High,
    /// One bf16 pass on AMX (relative error ~2e-3), f32 elsewhere.
    Medium,
}

impl MatmulPrecision {
    /// The names a user gives, with what each means (the command line lists them).
    pub const CHOICES: [(&'static str, &'static str, Self); 3] = [
        ("highest", "plain f32 products", Self::Highest),
        (
            "high",
            "bf16x3 on AMX where the CPU has it (relative error ~4e-6), f32 elsewhere",
            Self::High,
        ),
        (
            "medium",
            "one bf16 pass on AMX (relative error ~2e-3), f32 elsewhere",
            Self::Medium,
        ),
    ];
}

static PRECISION: AtomicU8 = AtomicU8::new(1);

pub fn set_matmul_precision(p: MatmulPrecision) {
    PRECISION.store(p as u8, Ordering::Relaxed);
}

pub fn matmul_precision() -> MatmulPrecision {
    match PRECISION.load(Ordering::Relaxed) {
        0 => MatmulPrecision::Highest,
        1 => MatmulPrecision::High,
        _ => MatmulPrecision::Medium,
    }
}

impl MatmulPrecision {
    /// The AMX kernel this precision means on this CPU, if any.
    pub fn amx(self) -> Option<amx::Precision> {
        let p = match self {
            MatmulPrecision::Highest => return None,
            MatmulPrecision::High => amx::Precision::Bf16x3,
            MatmulPrecision::Medium => amx::Precision::Bf16,
        };
        amx::available().then_some(p)
    }
}

/// The AMX kernel the process's matmul precision means, if any: what models built from now on
/// take into their [`crate::model::policy::Kernels`].
pub fn amx_precision() -> Option<amx::Precision> {
    matmul_precision().amx()
}

/// Borrows a contiguous f32 CPU tensor as a slice for the duration of `f`.
pub fn with_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        bail!("fused CPU kernels need CPU tensors")
    };
    let data = cpu.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => f(&data[start..end]),
        None => bail!("fused CPU kernels need contiguous tensors"),
    }
}

/// [`with_slice`] for several tensors at once (a training block reads sixteen weights), without
/// nesting a closure per tensor.
pub fn with_slices<R>(ts: &[&Tensor], f: impl FnOnce(&[&[f32]]) -> Result<R>) -> Result<R> {
    let held: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(held.len());
    for (storage, layout) in &held {
        let Storage::Cpu(cpu) = &**storage else {
            bail!("fused CPU kernels need CPU tensors")
        };
        let data = cpu.as_slice::<f32>()?;
        match layout.contiguous_offsets() {
            Some((start, end)) => slices.push(&data[start..end]),
            None => bail!("fused CPU kernels need contiguous tensors"),
        }
    }
    f(&slices)
}

/// A tensor's data copied into a pooled buffer, for activations entering the fused path.
pub fn to_buf(t: &Tensor) -> Result<Buf> {
    let t = t.contiguous()?;
    with_slice(&t, |s| {
        let mut b = Buf::new(s.len());
        b.copy_from_slice(s);
        Ok(b)
    })
}

pub fn to_tensor(v: &[f32], shape: &[usize]) -> Result<Tensor> {
    Tensor::from_slice(v, shape, &Device::Cpu)
}

/// Activation buffers cycle through a small per-thread pool: a fresh allocation per op costs a
/// memset and page faults on every layer (about a tenth of the run time), a reused one neither.
const POOLED_BUFFERS: usize = 16;

thread_local! {
    static POOL: std::cell::RefCell<Vec<Vec<f32>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// An f32 buffer from the pool, returned to it on drop. Its contents on creation are whatever a
/// previous user left (always initialised, never meaningful): every kernel here writes its whole
/// output before reading it.
pub struct Buf {
    v: Vec<f32>,
}

impl Buf {
    pub fn new(len: usize) -> Self {
        let mut v = POOL
            .with(|p| {
                let mut p = p.borrow_mut();
                // Best fit: the smallest pooled buffer that is large enough.
                let i = (0..p.len())
                    .filter(|&i| p[i].capacity() >= len)
                    .min_by_key(|&i| p[i].capacity())?;
                Some(p.swap_remove(i))
            })
            .unwrap_or_default();
        if v.len() >= len {
            v.truncate(len);
        } else {
            v.resize(len, 0.0);
        }
        Self { v }
    }

    /// A buffer whose contents are zero.
    pub fn zeroed(len: usize) -> Self {
        let mut b = Self::new(len);
        b.fill(0.0);
        b
    }
}

impl Buf {
    /// The values as a plain vector, leaving the pool (for handing a result to candle without a
    /// copy).
    pub fn into_vec(mut self) -> Vec<f32> {
        std::mem::take(&mut self.v)
    }
}

impl std::ops::Deref for Buf {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.v
    }
}

impl std::ops::DerefMut for Buf {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.v
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        let v = std::mem::take(&mut self.v);
        if v.capacity() == 0 {
            return;
        }
        // `try_with`: during thread teardown the pool may already be gone; then just free.
        let _ = POOL.try_with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < POOLED_BUFFERS {
                p.push(v);
            }
        });
    }
}

fn parallelism() -> Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => Parallelism::None,
        n => Parallelism::Rayon(n),
    }
}

/// Threads for a product of `macs` multiply-adds: below about four million (tens of
/// microseconds on one core) waking the pool costs more than it saves.
pub fn parallelism_for(macs: usize) -> Parallelism {
    if macs < 1 << 22 {
        Parallelism::None
    } else {
        parallelism()
    }
}

/// Rows handed to one rayon task in the element-wise passes.
const ROW_CHUNK: usize = 16;

/// `out[rows, n] = x[rows, k] W^T (+ bias) (+ residual)` with `W` laid out `[n, k]` as in a
/// PyTorch Linear. Bias and residual are written first and the GEMM accumulates onto them. With
/// `amx` (W in AMX tile layout and the precision the model's [`crate::model::policy::Kernels`]
/// chose) the product runs on AMX; `w` may then be empty (released after packing).
///
/// Panics when the slices do not have the sizes the shape says (a caller bug; the products
/// read through raw pointers, so a wrong size is refused rather than read past).
#[allow(clippy::too_many_arguments)]
pub fn linear(
    x: &[f32],
    rows: usize,
    k: usize,
    w: &[f32],
    n: usize,
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    amx: Option<(&amx::PackedB, amx::Precision)>,
) -> Buf {
    assert_eq!(
        Some(x.len()),
        rows.checked_mul(k),
        "linear: x is not [rows, k]"
    );
    assert!(bias.is_none_or(|b| b.len() == n), "linear: bias is not [n]");
    assert!(
        residual.is_none_or(|r| Some(r.len()) == rows.checked_mul(n)),
        "linear: residual is not [rows, n]"
    );
    // AMX runs when the packed copy can give the precision asked for (bf16x3 needs the low
    // halves); otherwise the f32 weight is read.
    let amx = amx
        .filter(|(p, prec)| p.n == n && p.k == k && (*prec == amx::Precision::Bf16 || p.has_lo()));
    assert!(
        amx.is_some() || Some(w.len()) == n.checked_mul(k),
        "linear: W is not [n, k] and no usable packed copy was given"
    );
    let mut out = Buf::new(rows * n);
    let prefill = bias.is_some() || residual.is_some();
    if prefill {
        out.par_chunks_mut(n * ROW_CHUNK)
            .enumerate()
            .for_each(|(c, block)| {
                for (i, row) in block.chunks_mut(n).enumerate() {
                    let r = c * ROW_CHUNK + i;
                    match (bias, residual) {
                        (Some(b), Some(res)) => {
                            for ((o, b), x) in row.iter_mut().zip(b).zip(&res[r * n..(r + 1) * n]) {
                                *o = b + x;
                            }
                        }
                        (Some(b), None) => row.copy_from_slice(b),
                        (None, Some(res)) => row.copy_from_slice(&res[r * n..(r + 1) * n]),
                        (None, None) => {}
                    }
                }
            });
    }
    if let Some((p, prec)) = amx {
        amx::matmul(x, rows, p, &mut out, prec, prefill);
        return out;
    }
    if rows <= small_m_rows() {
        small_m_linear(x, rows, k, w, n, &mut out, prefill);
        return out;
    }
    // SAFETY: the pointers, sizes and strides describe the slices above exactly: x is
    // [rows, k] row-major, W^T is read from W [n, k] row-major (element (kk, j) at j*k + kk),
    // out is [rows, n] row-major.
    unsafe {
        gemm::gemm(
            rows,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            prefill,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism_for(rows * n * k),
        );
    }
    out
}

/// Without AMX, up to this many rows a linear layer is a set of dot products over the weight's rows
/// (read once, in its stored layout) instead of a GEMM: the GEMM repacks the whole weight on every
/// call, which costs more than the arithmetic when there are few rows (one query's tokens, one
/// image's patches). The AMX path keeps its weights packed, so it does not need this.
fn small_m_rows() -> usize {
    static ROWS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *ROWS.get_or_init(|| {
        std::env::var("CLIPFT_SMALL_M_ROWS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(64)
    })
}

/// `out[r, j] (+)= x[r, :] . w[j, :]` for few rows: columns are split over the threads, each
/// weight row is read once and used for every input row while it is in cache.
fn small_m_linear(
    x: &[f32],
    rows: usize,
    k: usize,
    w: &[f32],
    n: usize,
    out: &mut [f32],
    accumulate: bool,
) {
    // Work on the transposed output so each task owns contiguous memory, then scatter back.
    let mut out_t = Buf::new(n * rows);
    const COLS: usize = 32;
    out_t
        .par_chunks_mut(COLS * rows)
        .enumerate()
        .for_each(|(c, block)| {
            for (jj, col) in block.chunks_mut(rows).enumerate() {
                let j = c * COLS + jj;
                let wr = &w[j * k..(j + 1) * k];
                for (r, o) in col.iter_mut().enumerate() {
                    *o = simd::dot_f32(&x[r * k..(r + 1) * k], wr);
                }
            }
        });
    for r in 0..rows {
        let row = &mut out[r * n..(r + 1) * n];
        for (j, o) in row.iter_mut().enumerate() {
            let v = out_t[j * rows + r];
            *o = if accumulate { *o + v } else { v };
        }
    }
}

/// Layer normalisation over rows of `dim`, statistics in f32 with two passes (as torch).
pub fn layer_norm(x: &[f32], dim: usize, weight: &[f32], bias: &[f32], eps: f32) -> Buf {
    let mut out = Buf::new(x.len());
    out.par_chunks_mut(dim * ROW_CHUNK)
        .zip(x.par_chunks(dim * ROW_CHUNK))
        .for_each(|(o, x)| {
            for (o, x) in o.chunks_mut(dim).zip(x.chunks(dim)) {
                simd::layer_norm_row(x, o, weight, bias, eps);
            }
        });
    out
}

/// `x * sigmoid(1.702 x)` in place.
pub fn quick_gelu(x: &mut [f32]) {
    x.par_chunks_mut(4096).for_each(simd::quick_gelu);
}

/// `x * (1 + erf(x / sqrt 2)) / 2` in place: the exact GELU of OpenCLIP/LAION checkpoints
/// (`hidden_act: "gelu"`), with candle's own `erf`, so it equals candle's `gelu_erf` op.
pub fn gelu_erf(x: &mut [f32]) {
    x.par_chunks_mut(4096).for_each(|c| {
        for v in c {
            *v = (candle_core::cpu::erf::erf_f32(*v * std::f32::consts::FRAC_1_SQRT_2) + 1.0)
                * 0.5
                * *v;
        }
    });
}

struct SendPtr(*mut f32);
// SAFETY: used only to hand disjoint output regions to rayon tasks (see `attention`).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// Geometry of one attention call: the batch's sequences ([`Seqs`]: uniform, or packed end to
/// end), and queries, keys and values as row-major matrices whose rows are `ld` apart (`d` for
/// separate projections, `3 d` inside one fused QKV buffer).
#[derive(Clone, Copy, Debug)]
pub struct AttnShape<'a> {
    pub seqs: Seqs<'a>,
    pub heads: usize,
    pub head_dim: usize,
    pub scale: f32,
    pub causal: bool,
    pub ld: usize,
}

impl<'a> AttnShape<'a> {
    /// The shape of attention over `seqs` of `dim`-wide rows `ld` apart.
    pub fn new(
        seqs: Seqs<'a>,
        dim: usize,
        heads: usize,
        scale: f32,
        causal: bool,
        ld: usize,
    ) -> Result<Self> {
        if heads == 0 || !dim.is_multiple_of(heads) {
            bail!("attention: {dim} is not divisible by {heads} heads");
        }
        Ok(Self {
            seqs,
            heads,
            head_dim: dim / heads,
            scale,
            causal,
            ld,
        })
    }

    pub fn d(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Keys a query at `pos` of sequence `item` sees.
    pub fn valid(&self, item: usize, pos: usize) -> usize {
        if self.causal {
            pos + 1
        } else {
            self.seqs.len(item)
        }
    }

    /// Checks that `q`, `k` and `v` hold every row the shape reads (row `r` at
    /// `[r * ld + h * hd, .. + hd)` for every head `h`), without overflow whatever the fields
    /// say; returns the rows and `d`. Panics otherwise: a safe kernel must not read past them.
    pub(crate) fn check_inputs(&self, q: &[f32], k: &[f32], v: &[f32]) -> (usize, usize) {
        let overflow = "attention: the shape overflows usize";
        let d = self.heads.checked_mul(self.head_dim).expect(overflow);
        let rows = self.seqs.rows().expect(overflow);
        let read = match rows {
            0 => 0,
            r => (r - 1)
                .checked_mul(self.ld)
                .and_then(|x| x.checked_add(d))
                .expect(overflow),
        };
        assert!(
            [q, k, v].iter().all(|m| m.len() >= read),
            "attention: q, k and v need {read} values"
        );
        (rows, d)
    }

    /// Values of the per-(item, head) probability blocks, `max_len`-square each.
    pub(crate) fn probs_len(&self) -> usize {
        let t = self.seqs.max_len();
        t.checked_mul(t)
            .and_then(|tt| tt.checked_mul(self.seqs.items()))
            .and_then(|x| x.checked_mul(self.heads))
            .expect("attention: the shape overflows usize")
    }
}

/// Multi-head scaled dot-product attention over every query: writes the context `out`
/// (`[rows, d]`, heads concatenated, ready for `out_proj`) and, for a training step's backward
/// pass, the probabilities (one `max_len`-square block per (item, head), row-major with stride
/// `max_len`; masked entries 0, entries past a shorter sequence untouched). `causal` masks out
/// keys after the query's position (the text tower); a query sees only its own sequence's keys.
pub fn attention_into(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: AttnShape,
    out: &mut [f32],
    probs: Option<&mut [f32]>,
) {
    let (t, hd, ld) = (s.seqs.max_len(), s.head_dim, s.ld);
    // The extents the unsafe block below reads and writes, checked without overflow.
    let (rows, d) = s.check_inputs(q, k, v);
    assert!(
        out.len()
            >= rows
                .checked_mul(d)
                .expect("attention: the shape overflows usize")
    );
    let tasks = s.seqs.items() * s.heads;
    let kept = probs.map(|p| {
        assert!(p.len() >= s.probs_len());
        SendPtr(p.as_mut_ptr())
    });
    let optr = SendPtr(out.as_mut_ptr());
    (0..tasks).into_par_iter().for_each_init(
        || vec![0f32; if kept.is_some() { 0 } else { t * t }],
        |scratch, bh| {
            let (item, h) = (bh / s.heads, bh % s.heads);
            let (start, n) = (s.seqs.start(item), s.seqs.len(item));
            let (base, obase) = (start * ld + h * hd, start * d + h * hd);
            let (o, kept) = (&optr, &kept);
            // SAFETY: the reads are rows start .. start + n (n <= t, inside the `rows` the
            // sequences cover) of q, k and v at columns h * hd .. h * hd + hd, inside what
            // `check_inputs` asserted; the writes cover this (item, head) block of `out` (rows * d
            // values, asserted) and of the kept probabilities (t * t per task, asserted), which
            // no other task touches.
            unsafe {
                let p: &mut [f32] = match kept {
                    Some(k) => std::slice::from_raw_parts_mut(k.0.add(bh * t * t), t * t),
                    None => scratch,
                };
                gemm::gemm(
                    n,
                    n,
                    hd,
                    p.as_mut_ptr(),
                    1,
                    t as isize,
                    false,
                    q.as_ptr().add(base),
                    1,
                    ld as isize,
                    k.as_ptr().add(base),
                    ld as isize,
                    1,
                    0.0,
                    s.scale,
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
                for (i, row) in p.chunks_mut(t).take(n).enumerate() {
                    let valid = s.valid(item, i);
                    simd::softmax_row(&mut row[..valid]);
                    row[valid..n].fill(0.0);
                }
                gemm::gemm(
                    n,
                    hd,
                    n,
                    o.0.add(obase),
                    1,
                    d as isize,
                    false,
                    p.as_ptr(),
                    1,
                    t as isize,
                    v.as_ptr().add(base),
                    1,
                    ld as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
            }
        },
    );
}

/// Attention for selected queries only (`rows[i]` = (item, position); query `i` starts at
/// `q[q_at[i]..]`), against every key of its item: the last block of a tower, whose other rows no
/// output reads. Writes the context `out` (`[rows.len(), d]`) and, for training, the
/// probabilities (`[rows.len(), heads, seq]`, masked entries 0).
#[allow(clippy::too_many_arguments)]
pub fn attention_rows_into(
    q: &[f32],
    q_at: &[usize],
    k: &[f32],
    v: &[f32],
    s: AttnShape,
    rows: &[(usize, usize)],
    out: &mut [f32],
    probs: Option<&mut [f32]>,
) {
    let (t, d, hd, ld) = (s.seqs.max_len(), s.d(), s.head_dim, s.ld);
    assert!(
        rows.iter()
            .all(|&(item, pos)| item < s.seqs.items() && pos < s.seqs.len(item)),
        "attention: a selected row is outside the batch"
    );
    let row = |(out, probs): (&mut [f32], &mut [f32]), (&(item, pos), &at): (_, &usize)| {
        let valid = s.valid(item, pos);
        let start = s.seqs.start(item);
        let qr = &q[at..];
        for h in 0..s.heads {
            let qh = &qr[h * hd..(h + 1) * hd];
            let p = &mut probs[h * t..(h + 1) * t];
            for (j, pj) in p[..valid].iter_mut().enumerate() {
                *pj = simd::dot_f32(qh, &k[(start + j) * ld + h * hd..][..hd]) * s.scale;
            }
            simd::softmax_row(&mut p[..valid]);
            p[valid..].fill(0.0);
            let oh = &mut out[h * hd..(h + 1) * hd];
            oh.fill(0.0);
            for (j, pj) in p[..valid].iter().enumerate() {
                let vr = &v[(start + j) * ld + h * hd..][..hd];
                for (o, x) in oh.iter_mut().zip(vr) {
                    *o += pj * x;
                }
            }
        }
    };
    let queries = rows.par_iter().zip(q_at.par_iter());
    match probs {
        Some(p) => out
            .par_chunks_mut(d)
            .zip(p.par_chunks_mut(s.heads * t))
            .zip(queries)
            .for_each(|(o, r)| row(o, r)),
        None => out.par_chunks_mut(d).zip(queries).for_each_init(
            || vec![0f32; s.heads * t],
            |scratch, (o, r)| row((o, scratch), r),
        ),
    }
}

/// Copies the given rows of a `[_, dim]` matrix.
pub fn gather_rows(x: &[f32], dim: usize, rows: &[usize]) -> Buf {
    let mut out = Buf::new(rows.len() * dim);
    for (o, &r) in out.chunks_mut(dim).zip(rows) {
        o.copy_from_slice(&x[r * dim..(r + 1) * dim]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(n: usize, seed: f32) -> Vec<f32> {
        (0..n)
            .map(|i| (i as f32 * 0.37 + seed).sin() * 0.5)
            .collect()
    }

    /// q, k and v one head's width short of their last row (what the bound used to accept) are
    /// refused before any read: a safe function must not read past its slices.
    #[test]
    fn attention_refuses_short_inputs() {
        let (b, t, d, heads, ld) = (2, 3, 8, 2, 24);
        let s =
            AttnShape::new(Seqs::Uniform { batch: b, seq: t }, d, heads, 0.5, false, ld).unwrap();
        let full = (b * t - 1) * ld + d;
        let ok = seq(full, 0.1);
        let mut out = vec![0f32; b * t * d];
        attention_into(&ok, &ok, &ok, s, &mut out, None);
        let short = seq(full - d, 0.2);
        let r = std::panic::catch_unwind(|| {
            let mut out = vec![0f32; b * t * d];
            attention_into(&short, &ok, &ok, s, &mut out, None);
        });
        assert!(r.is_err(), "a short q was read");
        // Fields set by hand cannot widen the reads past what is checked either.
        let wide = AttnShape { head_dim: 64, ..s };
        let r = std::panic::catch_unwind(|| {
            let mut out = vec![0f32; b * t * 128];
            attention_into(&ok, &ok, &ok, wide, &mut out, None);
        });
        assert!(r.is_err(), "a widened shape was read");
    }

    /// Both paths of `linear` (few rows: dot products; many rows: GEMM) against a plain loop,
    /// with and without bias/residual.
    #[test]
    fn linear_paths_match_a_plain_loop() {
        for rows in [5, 200] {
            let (k, n) = (70, 45);
            let (x, w, b, res) = (
                seq(rows * k, 0.1),
                seq(n * k, 0.7),
                seq(n, 0.3),
                seq(rows * n, 0.9),
            );
            for (bias, residual) in [
                (None, None),
                (Some(&b[..]), None),
                (Some(&b[..]), Some(&res[..])),
            ] {
                let got = linear(&x, rows, k, &w, n, bias, residual, None);
                for r in 0..rows {
                    for j in 0..n {
                        let mut want =
                            bias.map_or(0.0, |b| b[j]) + residual.map_or(0.0, |v| v[r * n + j]);
                        want += (0..k).map(|i| x[r * k + i] * w[j * k + i]).sum::<f32>();
                        assert!(
                            (got[r * n + j] - want).abs() < 1e-4,
                            "rows {rows}: {} vs {want}",
                            got[r * n + j]
                        );
                    }
                }
            }
        }
    }
}

/// `a . b`, vectorised.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    simd::dot_f32(a, b)
}

/// Softmax of one row in place, vectorised (the training ops share the inference kernel).
pub fn softmax_in_place(row: &mut [f32]) {
    simd::softmax_row(row);
}

/// Element-wise loops written so the compiler vectorises them, compiled once for AVX-512, once
/// for AVX2+FMA and once for the baseline, and picked at run time.
mod simd {
    macro_rules! multiversion {
        ($(#[$m:meta])* fn $name:ident($($arg:ident: $ty:ty),*) $body:block) => {
            multiversion! { $(#[$m])* fn $name($($arg: $ty),*) -> () $body }
        };
        ($(#[$m:meta])* fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty $body:block) => {
            $(#[$m])*
            pub fn $name($($arg: $ty),*) -> $ret {
                #[inline(always)]
                fn imp($($arg: $ty),*) -> $ret $body
                #[cfg(target_arch = "x86_64")]
                {
                    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                    unsafe fn v4($($arg: $ty),*) -> $ret { imp($($arg),*) }
                    #[target_feature(enable = "avx2,fma")]
                    unsafe fn v3($($arg: $ty),*) -> $ret { imp($($arg),*) }
                    if std::arch::is_x86_feature_detected!("avx512f") {
                        // SAFETY: the CPU supports the features v4 was compiled for.
                        return unsafe { v4($($arg),*) };
                    }
                    if std::arch::is_x86_feature_detected!("avx2")
                        && std::arch::is_x86_feature_detected!("fma")
                    {
                        // SAFETY: as above, for v3.
                        return unsafe { v3($($arg),*) };
                    }
                }
                imp($($arg),*)
            }
        };
    }

    /// exp(x) for f32 without libm calls (Cephes-style: 2^n * p(r), |r| <= ln2/2), about 2 ulp.
    /// Branch-free and without float-to-int casts (Rust's saturating `as` does not vectorise):
    /// adding 1.5 * 2^23 rounds `x log2(e)` to an integer that then sits in the low mantissa bits.
    #[inline(always)]
    pub fn exp(x: f32) -> f32 {
        const MAGIC: f32 = 12_582_912.0;
        let x = x.clamp(-87.3, 88.3);
        let t = x * std::f32::consts::LOG2_E + MAGIC;
        let n = t - MAGIC;
        let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
        let p = 1.987_569_1e-4_f32;
        let p = p * r + 1.398_199_9e-3;
        let p = p * r + 8.333_452e-3;
        let p = p * r + 4.166_579_6e-2;
        let p = p * r + 1.666_666_5e-1;
        let p = p * r + 5e-1;
        let y = p * r * r + r + 1.0;
        let pow2n = t.to_bits().wrapping_sub(MAGIC.to_bits()).wrapping_add(127) << 23;
        y * f32::from_bits(pow2n)
    }

    #[inline(always)]
    fn sum(x: &[f32]) -> f32 {
        let mut acc = [0f32; 16];
        let chunks = x.chunks_exact(16);
        let tail = chunks.remainder();
        for c in chunks {
            for i in 0..16 {
                acc[i] += c[i];
            }
        }
        acc.iter().sum::<f32>() + tail.iter().sum::<f32>()
    }

    #[inline(always)]
    fn max(x: &[f32]) -> f32 {
        let mut acc = [f32::NEG_INFINITY; 16];
        let chunks = x.chunks_exact(16);
        let tail = chunks.remainder();
        for c in chunks {
            for i in 0..16 {
                acc[i] = acc[i].max(c[i]);
            }
        }
        acc.iter()
            .chain(tail)
            .fold(f32::NEG_INFINITY, |a, b| a.max(*b))
    }

    #[inline(always)]
    pub fn dot(a: &[f32], b: &[f32]) -> f32 {
        let mut acc = [0f32; 16];
        let ca = a.chunks_exact(16);
        let tail: f32 = ca
            .remainder()
            .iter()
            .zip(&b[a.len() / 16 * 16..])
            .map(|(x, y)| x * y)
            .sum();
        for (x, y) in ca.zip(b.chunks_exact(16)) {
            for i in 0..16 {
                acc[i] += x[i] * y[i];
            }
        }
        acc.iter().sum::<f32>() + tail
    }

    multiversion! {
        /// [`dot`] compiled for the best instruction set available.
        fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
            dot(a, b)
        }
    }

    multiversion! {
        fn quick_gelu(x: &mut [f32]) {
            for v in x.iter_mut() {
                *v /= 1.0 + exp(-1.702 * *v);
            }
        }
    }

    multiversion! {
        fn softmax_row(x: &mut [f32]) {
            let m = max(x);
            for v in x.iter_mut() {
                *v = exp(*v - m);
            }
            let inv = 1.0 / sum(x);
            for v in x.iter_mut() {
                *v *= inv;
            }
        }
    }

    multiversion! {
        fn layer_norm_row(x: &[f32], out: &mut [f32], w: &[f32], b: &[f32], eps: f32) {
            let n = x.len() as f32;
            let mean = sum(x) / n;
            for (o, x) in out.iter_mut().zip(x) {
                *o = x - mean;
            }
            let mut acc = [0f32; 16];
            let chunks = out.chunks_exact(16);
            let tail: f32 = chunks.remainder().iter().map(|v| v * v).sum();
            for c in chunks {
                for i in 0..16 {
                    acc[i] += c[i] * c[i];
                }
            }
            let var = (acc.iter().sum::<f32>() + tail) / n;
            let inv = 1.0 / (var + eps).sqrt();
            for ((o, w), b) in out.iter_mut().zip(w).zip(b) {
                *o = *o * inv * w + b;
            }
        }
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn exp_is_accurate() {
            let mut worst = 0f32;
            let mut x = -80.0f32;
            while x < 80.0 {
                let rel = ((super::exp(x) - x.exp()) / x.exp()).abs();
                worst = worst.max(rel);
                x += 0.01;
            }
            assert!(worst < 1e-6, "worst relative error {worst}");
            assert_eq!(super::exp(-1000.0), super::exp(-87.3));
        }
    }
}

/// Hands memory freed inside the allocator's heaps back to the system (glibc keeps it
/// otherwise, more so with the thresholds `cli::tune_allocator` sets).
pub fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages of the allocator's own heaps to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}
