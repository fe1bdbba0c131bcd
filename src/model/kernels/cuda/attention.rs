//! The CPU twin and the launcher of `attention.cu` (see its header for the algorithm).

use candle_core::{bail, Result};

use super::call::Call;
use crate::model::kernels::seqs::Seqs;

/// Keys per shared-memory tile in `attention.cu`.
pub const ATTENTION_TILE: usize = 64;
/// The head dimensions `attention.cu` takes.
pub fn attention_supports(head_dim: usize) -> bool {
    head_dim == 32 || head_dim == 64
}

/// The geometry of one attention call: the batch's sequences (uniform, or packed end to end: a
/// query sees only its own sequence's keys); queries, keys and values are row-major with rows
/// `ld` apart, head `h` at columns `h * head_dim`; the output is `[rows, heads * head_dim]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionShape<'a> {
    pub seqs: Seqs<'a>,
    pub heads: usize,
    pub head_dim: usize,
    pub ld: usize,
    pub scale: f32,
    pub causal: bool,
}

impl AttentionShape<'_> {
    /// Values a q, k or v buffer must hold, and the output's; errors on overflow or a head
    /// width the kernel does not take.
    pub fn sizes(&self) -> Result<(usize, usize)> {
        if !attention_supports(self.head_dim) {
            bail!(
                "fused attention takes head_dim 32 or 64, not {}",
                self.head_dim
            );
        }
        let d = self.heads * self.head_dim;
        if self.ld < d {
            bail!(
                "fused attention: rows {} apart hold fewer than {d} values",
                self.ld
            );
        }
        let rows = self.seqs.rows();
        let input = rows.and_then(|r| match r {
            0 => Some(0),
            r => (r - 1).checked_mul(self.ld)?.checked_add(d),
        });
        let output = rows.and_then(|r| r.checked_mul(d));
        let fits = |x: usize| i32::try_from(x).is_ok();
        match (input, output) {
            // The kernels index rows and statistics with 32-bit sequence lengths and offsets.
            (Some(i), Some(o))
                if fits(self.seqs.max_len().max(self.ld)) && rows.is_some_and(fits) =>
            {
                Ok((i, o))
            }
            _ => bail!("fused attention: the shape overflows"),
        }
    }
}

/// The CPU twin of `attention.cu`: for each (item, head, query row), keys in tiles of
/// [`ATTENTION_TILE`], scores of the pre-scaled query, and the online softmax update of the
/// running maximum, sum and output; the output is the sum over the row's last value.
pub fn attention_twin(q: &[f32], k: &[f32], v: &[f32], s: AttentionShape) -> Result<Vec<f32>> {
    let (need, out_len) = s.sizes()?;
    if [q, k, v].iter().any(|m| m.len() < need) {
        bail!("fused attention: q, k and v need {need} values");
    }
    let (hd, ld) = (s.head_dim, s.ld);
    let d = s.heads * hd;
    let mut out = vec![0f32; out_len];
    let mut scores = vec![0f32; ATTENTION_TILE];
    let mut qr = vec![0f32; hd];
    let mut o = vec![0f32; hd];
    for item in 0..s.seqs.items() {
        let (base, t) = (s.seqs.start(item), s.seqs.len(item));
        for h in 0..s.heads {
            for row in 0..t {
                for (c, x) in qr.iter_mut().enumerate() {
                    *x = q[(base + row) * ld + h * hd + c] * s.scale;
                }
                let (mut m, mut l) = (f32::NEG_INFINITY, 0f32);
                o.fill(0.0);
                // The keys this row sees, tile by tile.
                let kend = if s.causal { row + 1 } else { t };
                for k0 in (0..kend).step_by(ATTENTION_TILE) {
                    let kn = ATTENTION_TILE.min(kend - k0);
                    let mut tmax = f32::NEG_INFINITY;
                    for (j, sj) in scores[..kn].iter_mut().enumerate() {
                        let kr = &k[(base + k0 + j) * ld + h * hd..][..hd];
                        *sj = qr.iter().zip(kr).fold(0f32, |a, (x, y)| x.mul_add(*y, a));
                        tmax = tmax.max(*sj);
                    }
                    let mnew = m.max(tmax);
                    let a = (m - mnew).exp();
                    let mut psum = 0f32;
                    for sj in &mut scores[..kn] {
                        *sj = (*sj - mnew).exp();
                        psum += *sj;
                    }
                    l = a * l + psum;
                    m = mnew;
                    for x in o.iter_mut() {
                        *x *= a;
                    }
                    for (j, p) in scores[..kn].iter().enumerate() {
                        let vr = &v[(base + k0 + j) * ld + h * hd..][..hd];
                        for (x, y) in o.iter_mut().zip(vr) {
                            *x = p.mul_add(*y, *x);
                        }
                    }
                }
                let dst = &mut out[(base + row) * d + h * hd..][..hd];
                for (x, y) in dst.iter_mut().zip(&o) {
                    *x = y / l;
                }
            }
        }
    }
    Ok(out)
}

/// The longest sequence `attention.cu`'s tensor-core forward takes (its shared memory holds
/// the whole sequence's keys, values and score rows).
pub const TC_MAX_LEN: usize = 128;

/// Whether the tensor-core forward (`clipft_attention_tc_*`, f16 and bf16) takes `s`: head
/// width 64, sequences of at most [`TC_MAX_LEN`] rows.
pub fn tc_supports(s: &AttentionShape) -> bool {
    s.head_dim == 64 && s.seqs.max_len() <= TC_MAX_LEN
}

/// The CPU twin of `clipft_attention_tc_*`: the same math as [`attention_twin`] with the
/// kernel's roundings through `round` (to f16 or bf16): the pre-scaled queries, keys and
/// values, the probabilities before the product with V, and the output; scores, softmax and
/// both products in f32 (a tensor core's accumulation), the softmax over the whole row.
pub fn attention_tc_twin(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: AttentionShape,
    round: fn(f32) -> f32,
) -> Result<Vec<f32>> {
    let (need, out_len) = s.sizes()?;
    if !tc_supports(&s) {
        bail!("tensor-core attention: head_dim 64 and sequences of at most {TC_MAX_LEN}");
    }
    if [q, k, v].iter().any(|m| m.len() < need) {
        bail!("fused attention: q, k and v need {need} values");
    }
    let (hd, ld) = (s.head_dim, s.ld);
    let d = s.heads * hd;
    let mut out = vec![0f32; out_len];
    for item in 0..s.seqs.items() {
        let (base, t) = (s.seqs.start(item), s.seqs.len(item));
        for h in 0..s.heads {
            let rows = |m: &[f32], sc: f32| -> Vec<f32> {
                (0..t)
                    .flat_map(|r| m[(base + r) * ld + h * hd..][..hd].to_vec())
                    .map(|x| round(x * sc))
                    .collect()
            };
            let (qh, kh, vh) = (rows(q, s.scale), rows(k, 1.0), rows(v, 1.0));
            for row in 0..t {
                let visible = if s.causal { row + 1 } else { t };
                let qr = &qh[row * hd..][..hd];
                let sc: Vec<f32> = (0..visible)
                    .map(|j| qr.iter().zip(&kh[j * hd..][..hd]).map(|(a, b)| a * b).sum())
                    .collect();
                let m = sc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = sc.iter().map(|x| (x - m).exp()).collect();
                let inv = 1.0 / e.iter().sum::<f32>();
                let dst = &mut out[(base + row) * d + h * hd..][..hd];
                for (c, o) in dst.iter_mut().enumerate() {
                    let acc: f32 = e
                        .iter()
                        .enumerate()
                        .map(|(j, p)| round(p * inv) * vh[j * hd + c])
                        .sum();
                    *o = round(acc);
                }
            }
        }
    }
    Ok(out)
}

/// The geometry of a backward call over one stacked projection `qkv` `[batch * seq, ld]`
/// (queries at column 0, keys at `d`, values at `2 d`, `d = heads * head_dim`, `ld >= 3 d`):
/// the values `qkv` must hold, and the forward output's / its gradient's (`[batch * seq, d]`).
fn backward_sizes(s: &AttentionShape) -> Result<(usize, usize)> {
    let d = s.heads * s.head_dim;
    if s.ld < 3 * d {
        bail!(
            "attention backward: rows {} apart cannot hold q, k and v of {d}",
            s.ld
        );
    }
    let (_, out) = s.sizes()?;
    let need = s.seqs.rows().and_then(|r| r.checked_mul(s.ld));
    match need {
        Some(n) => Ok((n, out)),
        None => bail!("attention backward: the shape overflows"),
    }
}

/// The CPU twin of `attention.cu`'s backward, `d qkv` from the stacked projection `qkv`, the
/// forward's output `o` and its gradient `d_o` (layouts in [`AttentionShape`]; queries at
/// column 0 of `qkv`, keys at `d`, values at `2 d`). Two passes, as the two kernels:
/// - per query row (`clipft_attention_dq_*`): the row's softmax statistics again (running
///   maximum and sum over key tiles, as the forward), `lse = m + ln l`, `D = dO . O`; then per
///   key `p = exp(s - lse)`, `dp = dO . v`, `ds = p (dp - D)` and `dq += ds k`, scaled at the
///   end. `lse` and `D` are kept per row for the second pass.
/// - per key row (`clipft_attention_dkv_*`): over the queries that see it, the same `p` and
///   `ds` from the kept statistics, `dv += p dO` and `dk += ds q_scaled`.
///
/// The result has `qkv`'s layout; columns past `3 d` are zero.
pub fn attention_backward_twin(
    qkv: &[f32],
    o: &[f32],
    d_o: &[f32],
    s: AttentionShape,
) -> Result<Vec<f32>> {
    let (need, out_len) = backward_sizes(&s)?;
    if qkv.len() < need || o.len() < out_len || d_o.len() < out_len {
        bail!("attention backward: qkv needs {need} values, o and its gradient {out_len}");
    }
    let (hd, ld) = (s.head_dim, s.ld);
    let d = s.heads * hd;
    let mut grad = vec![0f32; need];
    // Per (item, head), `max_len` statistics, as the kernels lay them out.
    let stride = s.seqs.max_len();
    let stats = s.seqs.items() * s.heads * stride;
    let (mut lse, mut dsum) = (vec![0f32; stats], vec![0f32; stats]);
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).fold(0f32, |acc, (x, y)| x.mul_add(*y, acc));
    let mut qr = vec![0f32; hd];
    let mut acc = vec![0f32; hd];
    let mut dk = vec![0f32; hd];
    let mut scores = vec![0f32; ATTENTION_TILE];
    for item in 0..s.seqs.items() {
        let (base, t) = (s.seqs.start(item), s.seqs.len(item));
        for h in 0..s.heads {
            let col = |r: usize, part: usize| (base + r) * ld + part * d + h * hd;
            let stat = |r: usize| (item * s.heads + h) * stride + r;
            // Pass 1: dq per query row.
            for row in 0..t {
                for (c, x) in qr.iter_mut().enumerate() {
                    *x = qkv[col(row, 0) + c] * s.scale;
                }
                let orow = &o[(base + row) * d + h * hd..][..hd];
                let grow = &d_o[(base + row) * d + h * hd..][..hd];
                let dr = dot(grow, orow);
                let kend = if s.causal { row + 1 } else { t };
                let (mut m, mut l) = (f32::NEG_INFINITY, 0f32);
                for k0 in (0..kend).step_by(ATTENTION_TILE) {
                    let kn = ATTENTION_TILE.min(kend - k0);
                    let mut tmax = f32::NEG_INFINITY;
                    for (j, sj) in scores[..kn].iter_mut().enumerate() {
                        *sj = dot(&qr, &qkv[col(k0 + j, 1)..][..hd]);
                        tmax = tmax.max(*sj);
                    }
                    let mnew = m.max(tmax);
                    let psum: f32 = scores[..kn].iter().map(|sj| (sj - mnew).exp()).sum();
                    l = (m - mnew).exp() * l + psum;
                    m = mnew;
                }
                let lr = m + l.ln();
                acc.fill(0.0);
                for j in 0..kend {
                    let kr = &qkv[col(j, 1)..][..hd];
                    let p = (dot(&qr, kr) - lr).exp();
                    let ds = p * (dot(grow, &qkv[col(j, 2)..][..hd]) - dr);
                    for (a, k) in acc.iter_mut().zip(kr) {
                        *a = ds.mul_add(*k, *a);
                    }
                }
                for (g, a) in grad[col(row, 0)..][..hd].iter_mut().zip(&acc) {
                    *g = a * s.scale;
                }
                lse[stat(row)] = lr;
                dsum[stat(row)] = dr;
            }
            // Pass 2: dk and dv per key row, over the queries that see it.
            for key in 0..t {
                let kr = &qkv[col(key, 1)..][..hd];
                let vr = &qkv[col(key, 2)..][..hd];
                dk.fill(0.0);
                acc.fill(0.0); // dv
                let first = if s.causal { key } else { 0 };
                for row in first..t {
                    for (c, x) in qr.iter_mut().enumerate() {
                        *x = qkv[col(row, 0) + c] * s.scale;
                    }
                    let grow = &d_o[(base + row) * d + h * hd..][..hd];
                    let p = (dot(&qr, kr) - lse[stat(row)]).exp();
                    let ds = p * (dot(grow, vr) - dsum[stat(row)]);
                    for c in 0..hd {
                        acc[c] = p.mul_add(grow[c], acc[c]);
                        dk[c] = ds.mul_add(qr[c], dk[c]);
                    }
                }
                grad[col(key, 1)..][..hd].copy_from_slice(&dk);
                grad[col(key, 2)..][..hd].copy_from_slice(&acc);
            }
        }
    }
    Ok(grad)
}

/// The CPU twin of `clipft_attention_tc_backward_*`: the same gradients as
/// [`attention_backward_twin`] with the kernel's roundings through `round` (to f16 or bf16):
/// the scaled queries, keys, values and output gradients, the probabilities `P`, `dS = P (dP -
/// D)` and each output; the products in f32, the softmax over the whole visible row, `D = dO .
/// O` from the unrounded output.
pub fn attention_tc_backward_twin(
    qkv: &[f32],
    o: &[f32],
    d_o: &[f32],
    s: AttentionShape,
    round: fn(f32) -> f32,
) -> Result<Vec<f32>> {
    let (need, out_len) = backward_sizes(&s)?;
    if !tc_supports(&s) {
        bail!("tensor-core attention: head_dim 64 and sequences of at most {TC_MAX_LEN}");
    }
    if qkv.len() < need || o.len() < out_len || d_o.len() < out_len {
        bail!("attention backward: qkv needs {need} values, o and its gradient {out_len}");
    }
    let (hd, ld) = (s.head_dim, s.ld);
    let d = s.heads * hd;
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    let mut grad = vec![0f32; need];
    for item in 0..s.seqs.items() {
        let (base, t) = (s.seqs.start(item), s.seqs.len(item));
        for h in 0..s.heads {
            let col = |r: usize, part: usize| (base + r) * ld + part * d + h * hd;
            let out = |r: usize| (base + r) * d + h * hd;
            let part = |p: usize, sc: f32| -> Vec<f32> {
                (0..t)
                    .flat_map(|r| qkv[col(r, p)..][..hd].iter().map(move |x| round(x * sc)))
                    .collect()
            };
            let (qh, kh, vh) = (part(0, s.scale), part(1, 1.0), part(2, 1.0));
            let gh: Vec<f32> = (0..t)
                .flat_map(|r| d_o[out(r)..][..hd].iter().map(|&x| round(x)))
                .collect();
            let (mut p, mut ds) = (vec![0f32; t * t], vec![0f32; t * t]);
            for row in 0..t {
                let visible = if s.causal { row + 1 } else { t };
                let qr = &qh[row * hd..][..hd];
                let sc: Vec<f32> = (0..visible).map(|j| dot(qr, &kh[j * hd..][..hd])).collect();
                let m = sc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = sc.iter().map(|x| (x - m).exp()).collect();
                let inv = 1.0 / e.iter().sum::<f32>();
                let dr = dot(&d_o[out(row)..][..hd], &o[out(row)..][..hd]);
                let gr = &gh[row * hd..][..hd];
                for (j, ej) in e.iter().enumerate() {
                    let pj = round(ej * inv);
                    p[row * t + j] = pj;
                    ds[row * t + j] = round(pj * (dot(gr, &vh[j * hd..][..hd]) - dr));
                }
            }
            for row in 0..t {
                for c in 0..hd {
                    let acc: f32 = (0..t).map(|j| ds[row * t + j] * kh[j * hd + c]).sum();
                    grad[col(row, 0) + c] = round(acc * s.scale);
                }
            }
            for key in 0..t {
                for c in 0..hd {
                    let dk: f32 = (0..t).map(|i| ds[i * t + key] * qh[i * hd + c]).sum();
                    let dv: f32 = (0..t).map(|i| p[i * t + key] * gh[i * hd + c]).sum();
                    grad[col(key, 1) + c] = round(dk);
                    grad[col(key, 2) + c] = round(dv);
                }
            }
        }
    }
    Ok(grad)
}

/// Warps per block and query (or key) rows per warp of the CUDA-core kernels: `WARPS` and
/// `ROWS` in `attention.cu`.
const WARPS: u32 = 4;
const ROWS: u32 = 4;

/// Shared memory the CUDA-core forward asks for at `head_dim`: K and V tiles with padded rows,
/// and the block's scaled queries.
fn smem_bytes(head_dim: usize) -> u32 {
    let tile = ATTENTION_TILE * (head_dim + 1);
    ((2 * tile + (WARPS * ROWS) as usize * head_dim) * 4) as u32
}

/// Shared memory the tensor-core forward asks for with sequences of up to `seq` rows (the
/// layout at the top of the kernel: keys, values, and per warp a query tile, an f32 score tile
/// and a probability tile, in 2-byte elements but the scores).
fn tc_smem_bytes(seq: usize) -> u32 {
    const WARPS: usize = 4;
    const LDH: usize = 64 + 8;
    let tp = seq.div_ceil(16) * 16;
    let (lds, ldp) = (tp.max(64) + 4, tp + 8);
    let halves = 2 * tp * LDH + WARPS * 16 * LDH + WARPS * 16 * ldp;
    (halves * 2 + WARPS * 16 * lds * 4) as u32
}

/// Shared memory the tensor-core backward asks for with sequences of up to `seq` rows (the
/// layout at the top of the kernel: queries, keys, values and output gradients, P and dS, in
/// 2-byte elements; per warp an f32 scratch tile, and D per row).
fn tc_backward_smem_bytes(seq: usize) -> u32 {
    const WARPS: usize = 4;
    const LDH: usize = 64 + 8;
    let tp = seq.div_ceil(16) * 16;
    let (lds, ldp) = (tp.max(64) + 4, tp + 8);
    let halves = 4 * tp * LDH + 2 * tp * ldp;
    (halves * 2 + (WARPS * 16 * lds + tp) * 4) as u32
}

/// Shared memory of the backward kernels at `head_dim`: two tiles with padded rows and two
/// rows per query (dq) or key (dkv) of the block, plus the dkv kernel's per-query statistics.
fn backward_smem_bytes(head_dim: usize) -> (u32, u32) {
    let tile = ATTENTION_TILE * (head_dim + 1);
    let rows = 2 * (WARPS * ROWS) as usize * head_dim;
    let dq = (2 * tile + rows) * 4;
    let dkv = dq + 2 * ATTENTION_TILE * 4;
    (dq as u32, dkv as u32)
}

/// The statistics (`lse` and `D`) the backward keeps between its two kernels: one per
/// (item, head, row of the longest sequence).
pub fn backward_stats(s: &AttentionShape) -> usize {
    s.seqs.items() * s.heads * s.seqs.max_len()
}

/// The forward, `clipft_attention_<suffix>` on CUDA cores or with `tensor_cores`
/// `clipft_attention_tc_<suffix>` (the same arguments): `out` from `q`, `k`, `v` and their
/// biases, the sequences' row offsets for a packed batch (`offsets`, null for a uniform one).
#[allow(clippy::too_many_arguments)]
pub fn forward_call<'a, I: ?Sized, O: ?Sized>(
    suffix: &str,
    q: &'a I,
    k: &'a I,
    v: &'a I,
    bias: [&'a I; 3],
    out: &'a mut O,
    offsets: Option<&'a I>,
    s: &AttentionShape,
    tensor_cores: bool,
) -> Call<'a, I, O> {
    let seq = s.seqs.max_len();
    let blocks = (s.seqs.items() * s.heads) as u32;
    let call = if tensor_cores {
        Call::new(
            format!("clipft_attention_tc_{suffix}"),
            (blocks, 1, 1),
            4 * 32,
        )
        .smem(tc_smem_bytes(seq))
    } else {
        let groups = (seq as u32).div_ceil(WARPS * ROWS).max(1);
        Call::new(
            format!("clipft_attention_{suffix}"),
            (blocks, groups, 1),
            WARPS * 32,
        )
        .smem(smem_bytes(s.head_dim))
    };
    shape_args(
        call.input(q)
            .input(k)
            .input(v)
            .input(bias[0])
            .input(bias[1])
            .input(bias[2])
            .output(out)
            .input_or_null(offsets),
        s,
    )
}

/// The arguments every attention kernel ends with: `seq, heads, hd, ld, scale, causal`.
fn shape_args<'a, I: ?Sized, O: ?Sized>(
    call: Call<'a, I, O>,
    s: &AttentionShape,
) -> Call<'a, I, O> {
    call.i32(s.seqs.max_len() as i32)
        .i32(s.heads as i32)
        .i32(s.head_dim as i32)
        .i32(s.ld as i32)
        .f32(s.scale)
        .i32(i32::from(s.causal))
}

/// The grid of both backward kernels: (item, head) by groups of 16 rows.
fn backward_grid(s: &AttentionShape) -> (u32, u32, u32) {
    (
        (s.seqs.items() * s.heads) as u32,
        (s.seqs.max_len() as u32).div_ceil(WARPS * ROWS).max(1),
        1,
    )
}

/// The tensor-core backward, `clipft_attention_tc_backward_<suffix>` (f16 or bf16,
/// [`tc_supports`] shapes): all of `dqkv` (dq, dk and dv columns) in one kernel, from the same
/// inputs as [`dq_call`] without the statistics.
#[allow(clippy::too_many_arguments)]
pub fn tc_backward_call<'a, I: ?Sized, O: ?Sized>(
    suffix: &str,
    qkv: &'a I,
    bias: &'a I,
    o: &'a I,
    dout: &'a I,
    dqkv: &'a mut O,
    offsets: Option<&'a I>,
    s: &AttentionShape,
) -> Call<'a, I, O> {
    let blocks = (s.seqs.items() * s.heads) as u32;
    let call = Call::new(
        format!("clipft_attention_tc_backward_{suffix}"),
        (blocks, 1, 1),
        4 * 32,
    )
    .smem(tc_backward_smem_bytes(s.seqs.max_len()))
    .input(qkv)
    .input(bias)
    .input(o)
    .input(dout)
    .output(dqkv)
    .input_or_null(offsets);
    shape_args(call, s)
}

/// The backward's first kernel, `clipft_attention_dq_<suffix>`: the query columns of `dqkv`,
/// and each row's `lse` and `D` ([`backward_stats`] each), from the stacked projection `qkv`,
/// its stacked bias (`3 d`), the forward's output `o` and its gradient `dout`.
#[allow(clippy::too_many_arguments)]
pub fn dq_call<'a, I: ?Sized, O: ?Sized>(
    suffix: &str,
    qkv: &'a I,
    bias: &'a I,
    o: &'a I,
    dout: &'a I,
    dqkv: &'a mut O,
    lse: &'a mut O,
    dsum: &'a mut O,
    offsets: Option<&'a I>,
    s: &AttentionShape,
) -> Call<'a, I, O> {
    let call = Call::new(
        format!("clipft_attention_dq_{suffix}"),
        backward_grid(s),
        WARPS * 32,
    )
    .smem(backward_smem_bytes(s.head_dim).0)
    .input(qkv)
    .input(bias)
    .input(o)
    .input(dout)
    .output(dqkv)
    .output(lse)
    .output(dsum)
    .input_or_null(offsets);
    shape_args(call, s)
}

/// The backward's second kernel, `clipft_attention_dkv_<suffix>`: the key and value columns
/// of `dqkv`, from the statistics the first wrote.
#[allow(clippy::too_many_arguments)]
pub fn dkv_call<'a, I: ?Sized, O: ?Sized>(
    suffix: &str,
    qkv: &'a I,
    bias: &'a I,
    dout: &'a I,
    lse: &'a I,
    dsum: &'a I,
    dqkv: &'a mut O,
    offsets: Option<&'a I>,
    s: &AttentionShape,
) -> Call<'a, I, O> {
    let call = Call::new(
        format!("clipft_attention_dkv_{suffix}"),
        backward_grid(s),
        WARPS * 32,
    )
    .smem(backward_smem_bytes(s.head_dim).1)
    .input(qkv)
    .input(bias)
    .input(dout)
    .input(lse)
    .input(dsum)
    .output(dqkv)
    .input_or_null(offsets);
    shape_args(call, s)
}

#[cfg(feature = "cuda")]
mod gpu {
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, CudaView, DeviceRepr, ValidAsZeroBits,
    };
    use candle_core::{CudaDevice, Result};

    use super::super::call::{self, CudaIn, CudaOut};
    use super::AttentionShape;
    use crate::model::kernels::seqs::{Packing, Seqs};

    /// A packed batch's row offsets on a device, made from (and kept with) the host's, so a
    /// launch can check that the offsets the kernel reads are the ones its bounds were checked
    /// against.
    pub struct DeviceOffsets {
        host: Packing,
        dev: CudaSlice<u32>,
    }

    impl std::fmt::Debug for DeviceOffsets {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("DeviceOffsets")
                .field("host", &self.host)
                .finish()
        }
    }

    impl DeviceOffsets {
        /// Copies the offsets to `dev` (32-bit: the kernels' row indices).
        pub fn upload(dev: &CudaDevice, packing: &Packing) -> Result<Self> {
            let offsets = packing
                .offsets()
                .iter()
                .map(|&o| i32::try_from(o).map(|o| o as u32))
                .collect::<std::result::Result<Vec<u32>, _>>()
                .map_err(|_| candle_core::Error::Msg("packed batch over 2^31 rows".into()))?;
            Ok(Self {
                host: packing.clone(),
                dev: dev.clone_htod(&offsets)?,
            })
        }
    }

    /// The device offsets the kernels take for `s`'s sequences: those of a packed batch (which
    /// must be the ones `offsets` holds), none (a null pointer) for a uniform one.
    fn offsets_arg<'o>(
        s: &AttentionShape,
        offsets: Option<&'o DeviceOffsets>,
    ) -> Result<Option<&'o CudaSlice<u32>>> {
        match (s.seqs, offsets) {
            (Seqs::Uniform { .. }, None) => Ok(None),
            (Seqs::Packed(p), Some(o)) if *p == o.host => Ok(Some(&o.dev)),
            _ => candle_core::bail!("fused attention: device offsets that are not the batch's"),
        }
    }

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/attention.ptx"));
    const MODULE: &str = "clipft_attention";

    /// Runs `attention.cu`'s forward for the element type `T` (kernel suffix `suffix`) on the
    /// device: `clipft_attention_<suffix>` on CUDA cores, or with `tensor_cores`
    /// `clipft_attention_tc_<suffix>` (f16 or bf16, [`super::tc_supports`] shapes). `bias`: the
    /// q, k and v projections' biases, added as the kernel loads them.
    #[allow(clippy::too_many_arguments)]
    pub fn launch<T: DeviceRepr>(
        suffix: &str,
        dev: &CudaDevice,
        q: &CudaView<'_, T>,
        k: &CudaView<'_, T>,
        v: &CudaView<'_, T>,
        bias: [&CudaView<'_, T>; 3],
        s: AttentionShape,
        offsets: Option<&DeviceOffsets>,
        tensor_cores: bool,
    ) -> Result<CudaSlice<T>> {
        let (need, out_len) = s.sizes()?;
        if tensor_cores && (!super::tc_supports(&s) || !matches!(suffix, "f16" | "bf16")) {
            candle_core::bail!("tensor-core attention: f16 or bf16, head_dim 64, at most 128 rows");
        }
        if [q.len(), k.len(), v.len()].iter().any(|&n| n < need) {
            candle_core::bail!("fused attention: q, k and v need {need} values");
        }
        let d = s.heads * s.head_dim;
        if bias.iter().any(|b| b.len() < d) {
            candle_core::bail!("fused attention: each bias needs {d} values");
        }
        let offs = offsets_arg(&s, offsets)?;
        // SAFETY: every element is written by the kernel below (each (item, head, row) of
        // the output is written once, and the sequences cover every row).
        let mut out = unsafe { dev.alloc::<T>(out_len)? };
        if out_len > 0 {
            let bias: [&(dyn CudaIn + '_); 3] = [bias[0], bias[1], bias[2]];
            let call = super::forward_call::<dyn CudaIn + '_, dyn CudaOut + '_>(
                suffix,
                q,
                k,
                v,
                bias,
                &mut out,
                offs.map(|o| o as &dyn CudaIn),
                &s,
                tensor_cores,
            );
            // SAFETY: the kernel reads the rows of each sequence (item * seq + r, or from the
            // device offsets, which are the checked host offsets: `offsets_arg`) of q, k and v
            // at columns `h * hd .. h * hd + hd` (within `need`, checked above) and the first d
            // values of each bias, writes `out_len` values of `out`; the tensor-core kernel's
            // shared memory is the call's, sized for the longest sequence (at most 128 rows,
            // checked).
            unsafe { call::run(dev, MODULE, PTX, call) }?;
        }
        Ok(out)
    }

    /// Runs `attention.cu`'s backward (`clipft_attention_dq_<suffix>`, then
    /// `clipft_attention_dkv_<suffix>`; or with `tensor_cores` the one kernel
    /// `clipft_attention_tc_backward_<suffix>`, f16 or bf16, [`super::tc_supports`] shapes):
    /// `d qkv` in `qkv`'s layout from the stacked product, its stacked bias (`3 d`), the
    /// forward's output `o` and its gradient `dout` (`[batch * seq, d]`).
    #[allow(clippy::too_many_arguments)]
    pub fn launch_backward<T: DeviceRepr + ValidAsZeroBits>(
        suffix: &str,
        dev: &CudaDevice,
        qkv: &CudaView<'_, T>,
        bias: &CudaView<'_, T>,
        o: &CudaView<'_, T>,
        dout: &CudaView<'_, T>,
        s: AttentionShape,
        offsets: Option<&DeviceOffsets>,
        tensor_cores: bool,
    ) -> Result<CudaSlice<T>> {
        let (need, out_len) = super::backward_sizes(&s)?;
        if tensor_cores && (!super::tc_supports(&s) || !matches!(suffix, "f16" | "bf16")) {
            candle_core::bail!("tensor-core attention: f16 or bf16, head_dim 64, at most 128 rows");
        }
        let offs = offsets_arg(&s, offsets)?;
        let d = s.heads * s.head_dim;
        if qkv.len() < need || o.len() < out_len || dout.len() < out_len || bias.len() < 3 * d {
            candle_core::bail!(
                "attention backward: qkv needs {need} values, o and its gradient {out_len}, \
                 the bias {}",
                3 * d
            );
        }
        let mut grad = if s.ld == 3 * d {
            // SAFETY: with rows exactly 3 d wide, the two kernels write every value: the dq
            // columns of every (item, head, row) in the first, dk and dv in the second.
            unsafe { dev.alloc::<T>(need)? }
        } else {
            dev.alloc_zeros::<T>(need)?
        };
        let stats = super::backward_stats(&s);
        if stats == 0 || out_len == 0 {
            return Ok(grad);
        }
        let offs = offs.map(|o| o as &dyn CudaIn);
        if tensor_cores {
            let call = super::tc_backward_call::<dyn CudaIn + '_, dyn CudaOut + '_>(
                suffix, qkv, bias, o, dout, &mut grad, offs, &s,
            );
            // SAFETY: reads the rows of each sequence (as in `launch`) of qkv at columns below
            // 3 d <= ld (within `need`, checked above), 3 d values of the bias, and rows of o
            // and dout at columns below d (within `out_len`); writes the dq, dk and dv columns
            // of those rows of `grad`; its shared memory is the call's, sized for the longest
            // sequence (at most 128 rows, checked).
            unsafe { call::run(dev, MODULE, PTX, call) }?;
            return Ok(grad);
        }
        // SAFETY: the first kernel writes lse and D of every (item, head, row) before the
        // second, on the same stream, reads them (rows past a shorter sequence are neither
        // written nor read).
        let (mut lse, mut dsum) = unsafe { (dev.alloc::<f32>(stats)?, dev.alloc::<f32>(stats)?) };
        let call = super::dq_call::<dyn CudaIn + '_, dyn CudaOut + '_>(
            suffix, qkv, bias, o, dout, &mut grad, &mut lse, &mut dsum, offs, &s,
        );
        // SAFETY: reads the rows of each sequence (as in `launch`) of qkv at columns below
        // 3 d <= ld (within `need`, checked above), 3 d values of the bias, and rows of o and
        // dout at columns below d (within `out_len`); writes the dq columns of `grad` and
        // `stats` values of lse and dsum.
        unsafe { call::run(dev, MODULE, PTX, call) }?;
        let call = super::dkv_call::<dyn CudaIn + '_, dyn CudaOut + '_>(
            suffix, qkv, bias, dout, &lse, &dsum, &mut grad, offs, &s,
        );
        // SAFETY: as above for qkv, the bias and dout; reads the `stats` values of lse and dsum
        // the first kernel wrote; writes the dk and dv columns of `grad`.
        unsafe { call::run(dev, MODULE, PTX, call) }?;
        Ok(grad)
    }
}

#[cfg(feature = "cuda")]
pub use gpu::{launch, launch_backward, DeviceOffsets};

/// `attention.cu` itself, run by the CPU emulator with the launchers' grids, shared memory and
/// arguments, in each type, uniform and packed, against the twins: the CUDA-core forward, the
/// tensor-core forward (f16, bf16) and both backward kernels.
#[cfg(test)]
mod emu_tests {
    use super::super::call::emu::{self, assert_close, values, written, Dt, EmuArg};
    use super::*;
    use crate::model::kernels::seqs::Packing;

    /// `m` with `bias` added to the first `bias.len()` columns of each row of `ld`, in f32 (as
    /// the kernels add it on load).
    fn biased(m: &[f32], bias: &[f32], ld: usize) -> Vec<f32> {
        m.iter()
            .enumerate()
            .map(|(i, x)| x + bias.get(i % ld).copied().unwrap_or(0.0))
            .collect()
    }

    fn offsets_of(s: &AttentionShape) -> Option<Box<dyn EmuArg>> {
        match s.seqs {
            Seqs::Uniform { .. } => None,
            Seqs::Packed(p) => {
                let o: Vec<u32> = p.offsets().iter().map(|&o| o as u32).collect();
                Some(Box::new(clipft_cuda_emu::Buffer::from_slice(&o)))
            }
        }
    }

    fn round_f16(x: f32) -> f32 {
        Dt::F16.round(x)
    }

    fn round_bf16(x: f32) -> f32 {
        Dt::Bf16.round(x)
    }

    #[test]
    fn emulated_kernels_match_their_twins() {
        let packing = Packing::from_lens(&[5, 77, 1, 40]).unwrap();
        let shapes = [
            // text: causal, two tiles of keys for the last rows
            (Seqs::Uniform { batch: 2, seq: 77 }, 2, 64, true),
            // image: one tile
            (Seqs::Uniform { batch: 2, seq: 50 }, 2, 64, false),
            // packed captions, a one-token one among them
            (Seqs::Packed(&packing), 2, 64, true),
            (Seqs::Packed(&packing), 1, 32, false),
            // three tiles, narrow heads
            (Seqs::Uniform { batch: 1, seq: 130 }, 3, 32, true),
        ];
        for (seqs, heads, head_dim, causal) in shapes {
            let d = heads * head_dim;
            let s = AttentionShape {
                seqs,
                heads,
                head_dim,
                ld: 3 * d,
                scale: (head_dim as f32).powf(-0.5),
                causal,
            };
            let (need, out_len) = s.sizes().unwrap();
            let offsets = offsets_of(&s);
            for dt in Dt::ALL {
                let what = format!("{dt:?} {seqs:?} heads {heads} x {head_dim} causal {causal}");
                let (q, k, v) = (
                    dt.round_all(&values(need, 11)),
                    dt.round_all(&values(need, 12)),
                    dt.round_all(&values(need, 13)),
                );
                let bias: Vec<Vec<f32>> =
                    (0..3).map(|i| dt.round_all(&values(d, 20 + i))).collect();
                let (dq_, dk_, dv_) = (dt.buffer(&q), dt.buffer(&k), dt.buffer(&v));
                let dbias: Vec<Box<dyn EmuArg>> = bias.iter().map(|b| dt.buffer(b)).collect();
                let (qb, kb, vb) = (
                    biased(&q, &bias[0], s.ld),
                    biased(&k, &bias[1], s.ld),
                    biased(&v, &bias[2], s.ld),
                );
                let mut kinds = vec![false];
                if dt != Dt::F32 && tc_supports(&s) {
                    kinds.push(true);
                }
                for tensor_cores in kinds {
                    let mut out = dt.poisoned(out_len);
                    let call = forward_call::<dyn EmuArg, dyn EmuArg>(
                        dt.suffix(),
                        &*dq_,
                        &*dk_,
                        &*dv_,
                        [&*dbias[0], &*dbias[1], &*dbias[2]],
                        &mut *out,
                        offsets.as_deref(),
                        &s,
                        tensor_cores,
                    );
                    // SAFETY: q, k and v hold `need` values, each bias d, out `out_len`, the
                    // offsets the packing's (what `launch` checks).
                    unsafe { emu::run(call) }.unwrap();
                    let want = if tensor_cores {
                        let round = if dt == Dt::F16 { round_f16 } else { round_bf16 };
                        attention_tc_twin(&qb, &kb, &vb, s, round).unwrap()
                    } else {
                        dt.round_all(&attention_twin(&qb, &kb, &vb, s).unwrap())
                    };
                    let got = written("out", &*out);
                    let what = format!("forward {what} tensor cores {tensor_cores}");
                    assert_close(&what, &got, &want, dt.tol());
                }

                // The backward over one stacked projection (queries, keys and values of the
                // forward above side by side in each row).
                let (need, _) = backward_sizes(&s).unwrap();
                let (q, k, v) = (
                    dt.round_all(&values(need, 11)),
                    dt.round_all(&values(need, 12)),
                    dt.round_all(&values(need, 13)),
                );
                let qkv: Vec<f32> = (0..need)
                    .map(|i| match (i % s.ld) / d {
                        0 => q[i],
                        1 => k[i],
                        _ => v[i],
                    })
                    .collect();
                let stacked: Vec<f32> = bias.concat();
                let (qb, kb, vb) = (
                    biased(&q, &bias[0], s.ld),
                    biased(&k, &bias[1], s.ld),
                    biased(&v, &bias[2], s.ld),
                );
                let o = dt.round_all(&attention_twin(&qb, &kb, &vb, s).unwrap());
                let dout = dt.round_all(&values(out_len, 14));
                let (dqkv_, dstacked, do_, ddout) = (
                    dt.buffer(&qkv),
                    dt.buffer(&stacked),
                    dt.buffer(&o),
                    dt.buffer(&dout),
                );
                let stats = backward_stats(&s);
                let mut grad = dt.poisoned(need);
                let (mut lse, mut dsum) = (Dt::F32.poisoned(stats), Dt::F32.poisoned(stats));
                let call = dq_call::<dyn EmuArg, dyn EmuArg>(
                    dt.suffix(),
                    &*dqkv_,
                    &*dstacked,
                    &*do_,
                    &*ddout,
                    &mut *grad,
                    &mut *lse,
                    &mut *dsum,
                    offsets.as_deref(),
                    &s,
                );
                // SAFETY: qkv and the gradient hold `need` values (ld = 3 d), the bias 3 d, o
                // and dout `out_len`, lse and dsum `stats`.
                unsafe { emu::run(call) }.unwrap();
                lse.check().unwrap();
                dsum.check().unwrap();
                let call = dkv_call::<dyn EmuArg, dyn EmuArg>(
                    dt.suffix(),
                    &*dqkv_,
                    &*dstacked,
                    &*ddout,
                    &*lse,
                    &*dsum,
                    &mut *grad,
                    offsets.as_deref(),
                    &s,
                );
                // SAFETY: as above; lse and dsum as the first kernel wrote them.
                unsafe { emu::run(call) }.unwrap();
                let qkv_b = biased(&qkv, &stacked, s.ld);
                let want = dt.round_all(&attention_backward_twin(&qkv_b, &o, &dout, s).unwrap());
                let got = written("d qkv", &*grad);
                assert_close(&format!("backward {what}"), &got, &want, dt.tol());

                if dt != Dt::F32 && tc_supports(&s) {
                    let mut grad = dt.poisoned(need);
                    let call = tc_backward_call::<dyn EmuArg, dyn EmuArg>(
                        dt.suffix(),
                        &*dqkv_,
                        &*dstacked,
                        &*do_,
                        &*ddout,
                        &mut *grad,
                        offsets.as_deref(),
                        &s,
                    );
                    // SAFETY: as the dq call, without statistics.
                    unsafe { emu::run(call) }.unwrap();
                    let round = if dt == Dt::F16 { round_f16 } else { round_bf16 };
                    let want = attention_tc_backward_twin(&qkv_b, &o, &dout, s, round).unwrap();
                    let got = written("d qkv", &*grad);
                    assert_close(
                        &format!("tensor-core backward {what}"),
                        &got,
                        &want,
                        dt.tol(),
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kernels::seqs::Packing;

    /// Plain attention, row by row: softmax over the visible keys of the scaled scores.
    fn reference(q: &[f32], k: &[f32], v: &[f32], s: AttentionShape) -> Vec<f32> {
        let (hd, ld) = (s.head_dim, s.ld);
        let d = s.heads * hd;
        let mut out = vec![0f32; s.seqs.rows().unwrap_or(0) * d];
        for item in 0..s.seqs.items() {
            let (base, t) = (s.seqs.start(item), s.seqs.len(item));
            for h in 0..s.heads {
                for row in 0..t {
                    let at = |m: &[f32], r: usize| -> Vec<f64> {
                        m[(base + r) * ld + h * hd..][..hd]
                            .iter()
                            .map(|&x| x as f64)
                            .collect()
                    };
                    let qr = at(q, row);
                    let n = if s.causal { row + 1 } else { t };
                    let sc: Vec<f64> = (0..n)
                        .map(|j| {
                            at(k, j).iter().zip(&qr).map(|(a, b)| a * b).sum::<f64>()
                                * s.scale as f64
                        })
                        .collect();
                    let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = sc.iter().map(|x| (x - mx).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for c in 0..hd {
                        let y: f64 = (0..n).map(|j| e[j] / z * at(v, j)[c]).sum();
                        out[(base + row) * d + h * hd + c] = y as f32;
                    }
                }
            }
        }
        out
    }

    fn values(n: usize, seed: f32) -> Vec<f32> {
        (0..n)
            .map(|i| (i as f32 * 0.731 + seed).sin() * 1.3)
            .collect()
    }

    /// Text (77 causal), image (50), a sequence over several tiles (130, both masks) and packed
    /// captions of several lengths (a query sees only its own caption), with separate
    /// projections (ld = d) and one stacked QKV buffer (ld = 3 d).
    #[test]
    fn twin_matches_plain_attention() -> Result<()> {
        let packing = Packing::from_lens(&[5, 77, 1, 70, 33])?;
        for (seqs, heads, head_dim, causal) in [
            (Seqs::Uniform { batch: 2, seq: 77 }, 4, 64, true),
            (Seqs::Uniform { batch: 3, seq: 50 }, 2, 64, false),
            (Seqs::Uniform { batch: 1, seq: 130 }, 2, 32, true),
            (Seqs::Uniform { batch: 1, seq: 130 }, 2, 32, false),
            (Seqs::Packed(&packing), 2, 64, true),
            (Seqs::Packed(&packing), 2, 32, false),
        ] {
            let d = heads * head_dim;
            for ld in [d, 3 * d] {
                let s = AttentionShape {
                    seqs,
                    heads,
                    head_dim,
                    ld,
                    scale: (head_dim as f32).powf(-0.5),
                    causal,
                };
                let n = (seqs.rows().unwrap_or(0) - 1) * ld + d;
                let (q, k, v) = (values(n, 0.1), values(n, 0.7), values(n, 1.9));
                let got = attention_twin(&q, &k, &v, s)?;
                let want = reference(&q, &k, &v, s);
                let err = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(err < 1e-5, "{s:?}: max diff {err}");
            }
        }
        Ok(())
    }

    #[test]
    fn twin_refuses_what_the_kernel_cannot_take() {
        let s = AttentionShape {
            seqs: Seqs::Uniform { batch: 1, seq: 4 },
            heads: 1,
            head_dim: 48,
            ld: 48,
            scale: 1.0,
            causal: false,
        };
        assert!(attention_twin(&[0.0; 192], &[0.0; 192], &[0.0; 192], s).is_err());
        let s = AttentionShape {
            head_dim: 32,
            ld: 32,
            ..s
        };
        // One value short of the last row.
        assert!(attention_twin(&[0.0; 127], &[0.0; 128], &[0.0; 128], s).is_err());
        assert!(attention_twin(&[0.0; 128], &[0.0; 128], &[0.0; 128], s).is_ok());
    }
}
