//! The CPU twin and the launcher of `attention.cu` (see its header for the algorithm).

use candle_core::{bail, Result};

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

#[cfg(feature = "cuda")]
mod gpu {
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
    };
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CudaDevice, Result};

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

    /// What the kernels read as "no offsets": a null device pointer.
    const NULL: u64 = 0;

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/attention.ptx"));
    const WARPS: u32 = 4;
    const ROWS: u32 = 4;

    /// Shared memory `attention.cu` asks for at `head_dim`: K and V tiles with padded rows, and
    /// the block's scaled queries.
    fn smem_bytes(head_dim: usize) -> u32 {
        let tile = super::ATTENTION_TILE * (head_dim + 1);
        ((2 * tile + (WARPS * ROWS) as usize * head_dim) * 4) as u32
    }

    /// Shared memory `clipft_attention_tc_*` asks for with sequences of up to `seq` rows (the
    /// layout at the top of the kernel: keys, values, and per warp a query tile, an f32 score
    /// tile and a probability tile).
    fn tc_smem_bytes(seq: usize) -> u32 {
        const WARPS: usize = 4;
        const LDH: usize = 64 + 8;
        let tp = seq.div_ceil(16) * 16;
        let (lds, ldp) = (tp.max(64) + 4, tp + 8);
        let halves = 2 * tp * LDH + WARPS * 16 * LDH + WARPS * 16 * ldp;
        (halves * 2 + WARPS * 16 * lds * 4) as u32
    }

    /// Runs `attention.cu`'s forward for the element type `T` (kernel suffix `suffix`) on the
    /// device: `clipft_attention_<suffix>` on CUDA cores, or with `tensor_cores`
    /// `clipft_attention_tc_<suffix>` (f16 or bf16, [`super::tc_supports`] shapes). `bias`: the
    /// q, k and v projections' biases, added as the kernel loads them. Both kernels take the
    /// same arguments.
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
        use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum;
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
        let seq = s.seqs.max_len();
        let (name, cfg) = if tensor_cores {
            let smem = tc_smem_bytes(seq);
            let cfg = LaunchConfig {
                grid_dim: ((s.seqs.items() * s.heads) as u32, 1, 1),
                block_dim: (4 * 32, 1, 1),
                shared_mem_bytes: smem,
            };
            (format!("clipft_attention_tc_{suffix}"), cfg)
        } else {
            let groups = (seq as u32).div_ceil(WARPS * ROWS);
            let cfg = LaunchConfig {
                grid_dim: ((s.seqs.items() * s.heads) as u32, groups.max(1), 1),
                block_dim: (WARPS * 32, 1, 1),
                shared_mem_bytes: smem_bytes(s.head_dim),
            };
            (format!("clipft_attention_{suffix}"), cfg)
        };
        let func = dev.get_or_load_custom_func(&name, "clipft_attention", PTX)?;
        if tensor_cores {
            // Above 48 KB a launch needs the function's opt-in, set with its context current.
            dev.cuda_stream().context().bind_to_thread().w()?;
            func.set_attribute(
                CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                cfg.shared_mem_bytes as i32,
            )
            .w()?;
        }
        // SAFETY: every element is written by the kernel below (each (item, head, row) of
        // the output is written once, and the sequences cover every row).
        let out = unsafe { dev.alloc::<T>(out_len)? };
        let (seq, heads, hd, ld) = (seq as i32, s.heads as i32, s.head_dim as i32, s.ld as i32);
        let causal = i32::from(s.causal);
        let mut b = func.builder();
        b.arg(q);
        b.arg(k);
        b.arg(v);
        for x in bias {
            b.arg(x);
        }
        b.arg(&out);
        match offs {
            Some(o) => b.arg(o),
            None => b.arg(&NULL),
        };
        b.arg(&seq);
        b.arg(&heads);
        b.arg(&hd);
        b.arg(&ld);
        b.arg(&s.scale);
        b.arg(&causal);
        if out_len > 0 {
            // SAFETY: the kernel reads the rows of each sequence (item * seq + r, or from the
            // device offsets, which are the checked host offsets: `offsets_arg`) of q, k and v
            // at columns `h * hd .. h * hd + hd` (within `need`, checked above) and the first d
            // values of each bias, writes `out_len` values of `out`, and takes its arguments in
            // this order and these types (attention.cu); the tensor-core kernel's shared memory
            // is the `cfg` bytes it is launched with, sized for the longest sequence (at most
            // 128 rows, checked).
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok(out)
    }

    /// Shared memory of the backward kernels at `head_dim`: two tiles with padded rows and two
    /// rows per query (dq) or key (dkv) of the block, plus the dkv kernel's per-query
    /// statistics.
    fn backward_smem_bytes(head_dim: usize) -> (u32, u32) {
        let tile = super::ATTENTION_TILE * (head_dim + 1);
        let rows = 2 * (WARPS * ROWS) as usize * head_dim;
        let dq = (2 * tile + rows) * 4;
        let dkv = dq + 2 * super::ATTENTION_TILE * 4;
        (dq as u32, dkv as u32)
    }

    /// Runs `attention.cu`'s backward (`clipft_attention_dq_<suffix>`, then
    /// `clipft_attention_dkv_<suffix>`): `d qkv` in `qkv`'s layout from the stacked product,
    /// its stacked bias (`3 d`), the forward's output `o` and its gradient `dout`
    /// (`[batch * seq, d]`).
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
    ) -> Result<CudaSlice<T>> {
        let (need, out_len) = super::backward_sizes(&s)?;
        let offs = offsets_arg(&s, offsets)?;
        let d = s.heads * s.head_dim;
        if qkv.len() < need || o.len() < out_len || dout.len() < out_len || bias.len() < 3 * d {
            candle_core::bail!(
                "attention backward: qkv needs {need} values, o and its gradient {out_len}, \
                 the bias {}",
                3 * d
            );
        }
        let load = |name: &str| {
            dev.get_or_load_custom_func(&format!("{name}_{suffix}"), "clipft_attention", PTX)
        };
        let (dq, dkv) = (load("clipft_attention_dq")?, load("clipft_attention_dkv")?);
        let grad = if s.ld == 3 * d {
            // SAFETY: with rows exactly 3 d wide, the two kernels write every value: the dq
            // columns of every (item, head, row) in the first, dk and dv in the second.
            unsafe { dev.alloc::<T>(need)? }
        } else {
            dev.alloc_zeros::<T>(need)?
        };
        let seq = s.seqs.max_len();
        let stats = s.seqs.items() * s.heads * seq;
        if stats == 0 || out_len == 0 {
            return Ok(grad);
        }
        // SAFETY: the first kernel writes lse and D of every (item, head, row) before the
        // second, on the same stream, reads them (rows past a shorter sequence are neither
        // written nor read).
        let (lse, dsum) = unsafe { (dev.alloc::<f32>(stats)?, dev.alloc::<f32>(stats)?) };
        let (smem_dq, smem_dkv) = backward_smem_bytes(s.head_dim);
        let cfg = |smem| LaunchConfig {
            grid_dim: (
                (s.seqs.items() * s.heads) as u32,
                (seq as u32).div_ceil(WARPS * ROWS),
                1,
            ),
            block_dim: (WARPS * 32, 1, 1),
            shared_mem_bytes: smem,
        };
        let (seq, heads, hd, ld) = (seq as i32, s.heads as i32, s.head_dim as i32, s.ld as i32);
        let causal = i32::from(s.causal);
        let mut b = dq.builder();
        b.arg(qkv);
        b.arg(bias);
        b.arg(o);
        b.arg(dout);
        b.arg(&grad);
        b.arg(&lse);
        b.arg(&dsum);
        match offs {
            Some(o) => b.arg(o),
            None => b.arg(&NULL),
        };
        b.arg(&seq);
        b.arg(&heads);
        b.arg(&hd);
        b.arg(&ld);
        b.arg(&s.scale);
        b.arg(&causal);
        // SAFETY: reads the rows of each sequence (as in `launch`) of qkv at columns below
        // 3 d <= ld (within `need`, checked above), 3 d values of the bias, and rows of o and dout at columns
        // below d (within `out_len`);
        // writes the dq columns of `grad` and `stats` values of lse and dsum; arguments in the
        // kernel's order and types (attention.cu).
        unsafe { b.launch(cfg(smem_dq)) }.w()?;
        let mut b = dkv.builder();
        b.arg(qkv);
        b.arg(bias);
        b.arg(dout);
        b.arg(&lse);
        b.arg(&dsum);
        b.arg(&grad);
        match offs {
            Some(o) => b.arg(o),
            None => b.arg(&NULL),
        };
        b.arg(&seq);
        b.arg(&heads);
        b.arg(&hd);
        b.arg(&ld);
        b.arg(&s.scale);
        b.arg(&causal);
        // SAFETY: as above for qkv, the bias and dout; reads the `stats` values of lse and dsum the
        // first kernel wrote; writes the dk and dv columns of `grad`.
        unsafe { b.launch(cfg(smem_dkv)) }.w()?;
        Ok(grad)
    }
}

#[cfg(feature = "cuda")]
pub use gpu::{launch, launch_backward, DeviceOffsets};

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
