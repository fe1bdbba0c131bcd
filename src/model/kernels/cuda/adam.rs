//! The launchers of `adam.cu`, the optimiser step on the GPU: over one parameter
//! (`clipft_adam`), or over all of a model's parameters in one launch (`clipft_adam_multi_*`,
//! addresses from a table, each gradient in the compute dtype and its compute copy refreshed in
//! the same pass). Their CPU twin is [`crate::model::kernels::adam::adam_update`] (the same
//! update, the same bits), followed for a compute copy by rounding to nearest even.

use super::call::Call;
use crate::model::kernels::adam::AdamScalars;

/// Elements of one tensor a block of the multi-tensor step updates per table lookup
/// (`kChunk` in `adam.cu`): large enough that the lookup is noise, small enough that a
/// model's smallest tensors (biases) do not leave blocks idle.
pub const CHUNK: usize = 4096;

/// 64-bit words per tensor in the multi-tensor table (`kTableWords` in `adam.cu`).
pub const TABLE_WORDS: usize = 8;

/// Most blocks a step launches: each loops over chunks, and this fills an H100 several times
/// over.
pub const MAX_BLOCKS: usize = 132 * 16;

/// One tensor of a multi-tensor step: device addresses (host addresses in the emulator) and
/// its length in elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MultiEntry {
    /// The f32 weight, updated in place.
    pub w: u64,
    /// The gradient, in the launch's dtype.
    pub g: u64,
    /// The f32 moments, updated in place.
    pub m: u64,
    pub v: u64,
    /// The compute copy in the launch's dtype, rewritten from the new weight; 0 for none.
    pub copy: u64,
    pub len: usize,
}

/// The table `clipft_adam_multi_*` reads for `entries` (tensors without elements left out),
/// and the number of chunks it covers.
pub fn multi_table(entries: &[MultiEntry]) -> (Vec<u64>, usize) {
    let mut table = Vec::with_capacity(entries.len() * TABLE_WORDS);
    let mut chunks = 0usize;
    for e in entries.iter().filter(|e| e.len > 0) {
        table.extend_from_slice(&[e.w, e.g, e.m, e.v, e.copy, e.len as u64, chunks as u64, 0]);
        chunks += e.len.div_ceil(CHUNK);
    }
    (table, chunks)
}

/// `clipft_adam_multi_<suffix>` over `table` (from [`multi_table`]: `tensors` tensors, `chunks`
/// chunks) on at most `max_blocks` blocks ([`MAX_BLOCKS`] on the GPU; tests pass fewer to make
/// blocks loop).
pub fn adam_multi_call<'a, I: ?Sized, O: ?Sized>(
    table: &'a I,
    tensors: usize,
    chunks: usize,
    suffix: &str,
    s: &AdamScalars,
    max_blocks: usize,
) -> Call<'a, I, O> {
    let blocks = chunks.clamp(1, max_blocks.max(1)) as u32;
    let call = Call::new(format!("clipft_adam_multi_{suffix}"), (blocks, 1, 1), 256)
        .input(table)
        .i32(tensors as i32)
        .i32(chunks as i32);
    with_scalars(call, s)
}

/// Threads per block of `clipft_sum_squares_multi_*` (`kSumThreads` in `adam.cu`).
pub const SUM_THREADS: u32 = 256;

/// `clipft_sum_squares_multi_<suffix>` over `table` (from [`multi_table`]; only each entry's
/// gradient and length are read): `partial[c]`, the sum of squares of chunk `c`, for each of
/// the `chunks` chunks, on at most `max_blocks` blocks.
pub fn sum_squares_call<'a, I: ?Sized, O: ?Sized>(
    table: &'a I,
    tensors: usize,
    chunks: usize,
    suffix: &str,
    partial: &'a mut O,
    max_blocks: usize,
) -> Call<'a, I, O> {
    let blocks = chunks.clamp(1, max_blocks.max(1)) as u32;
    Call::new(
        format!("clipft_sum_squares_multi_{suffix}"),
        (blocks, 1, 1),
        SUM_THREADS,
    )
    .input(table)
    .i32(tensors as i32)
    .i32(chunks as i32)
    .output(partial)
}

/// The update's scalars, the last arguments of every Adam kernel.
fn with_scalars<'a, I: ?Sized, O: ?Sized>(call: Call<'a, I, O>, s: &AdamScalars) -> Call<'a, I, O> {
    call.i32(i32::from(s.decoupled))
        .f32(s.decay)
        .f32(s.wd)
        .f32(s.one_minus_beta1)
        .f32(s.beta2)
        .f32(s.one_minus_beta2)
        .f32(s.eps)
        .f32(s.grad_scale)
        .f32(s.step_size)
        .f32(s.bc2_sqrt)
}

/// `clipft_adam` over the first `n` values of `w`, `g`, `m` and `v`.
pub fn adam_call<'a, I: ?Sized, O: ?Sized>(
    w: &'a mut O,
    g: &'a I,
    m: &'a mut O,
    v: &'a mut O,
    n: usize,
    s: &AdamScalars,
) -> Call<'a, I, O> {
    // A grid-stride loop: enough blocks to fill an H100 several times over.
    let blocks = n.div_ceil(256).clamp(1, MAX_BLOCKS) as u32;
    let call = Call::new("clipft_adam", (blocks, 1, 1), 256)
        .output(w)
        .input(g)
        .output(m)
        .output(v)
        .i64(n as i64);
    with_scalars(call, s)
}

#[cfg(feature = "cuda")]
mod gpu {
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, CudaViewMut};
    use candle_core::{CudaDevice, Result};

    use super::super::call::{self, CudaIn, CudaOut};
    use crate::model::kernels::adam::AdamScalars;

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/adam.ptx"));

    /// One step: `w`, `m` and `v` updated in place from `g`, all of one length.
    pub fn adam_step(
        dev: &CudaDevice,
        w: &mut CudaViewMut<'_, f32>,
        g: &CudaView<'_, f32>,
        m: &mut CudaSlice<f32>,
        v: &mut CudaSlice<f32>,
        s: AdamScalars,
    ) -> Result<()> {
        let n = w.len();
        if g.len() != n || m.len() != n || v.len() != n {
            candle_core::bail!(
                "adam step: a weight of {n}, a gradient of {} and moments of {} and {}",
                g.len(),
                m.len(),
                v.len()
            );
        }
        if n == 0 {
            return Ok(());
        }
        let call = super::adam_call::<dyn CudaIn + '_, dyn CudaOut + '_>(w, g, m, v, n, &s);
        // SAFETY: the kernel reads and writes the first n values of w, m and v and reads n of
        // g (all n long, checked above).
        unsafe { call::run(dev, "clipft_adam", PTX, call) }
    }

    /// One step over every tensor of `entries` in one launch, their gradients and compute
    /// copies in `dtype` (f32, f16 or bf16).
    ///
    /// # Safety
    /// Each entry's addresses must be `dev`'s memory holding `len` values (f32 for `w`, `m` and
    /// `v`, `dtype` for `g` and a non-zero `copy`), no buffer an entry writes may overlap
    /// another buffer of the launch, and nothing may use them outside `dev`'s stream until the
    /// launch is done.
    pub unsafe fn adam_multi_step(
        dev: &CudaDevice,
        entries: &[super::MultiEntry],
        dtype: candle_core::DType,
        s: AdamScalars,
    ) -> Result<()> {
        let suffix = match dtype {
            candle_core::DType::F32 => "f32",
            candle_core::DType::F16 => "f16",
            candle_core::DType::BF16 => "bf16",
            d => candle_core::bail!("adam step: no kernel for {d:?} gradients"),
        };
        let (table, chunks) = super::multi_table(entries);
        if chunks == 0 {
            return Ok(());
        }
        let tensors = table.len() / super::TABLE_WORDS;
        if chunks > i32::MAX as usize {
            candle_core::bail!("adam step: {chunks} chunks, more than one launch indexes");
        }
        let table = dev.clone_htod(&table)?;
        let call = super::adam_multi_call::<dyn CudaIn + '_, dyn CudaOut + '_>(
            &table,
            tensors,
            chunks,
            suffix,
            &s,
            super::MAX_BLOCKS,
        );
        // SAFETY: the kernel reads the table (tensors x TABLE_WORDS words, as uploaded) and,
        // for each chunk it covers, elements below the entry's len of the entry's buffers,
        // which the caller guarantees.
        unsafe { call::run(dev, "clipft_adam", PTX, call) }
    }

    /// The sum of squares of every gradient of `entries` (their `g` and `len`; the other
    /// addresses are not read), in `dtype`: one partial sum per chunk on the GPU, added here in
    /// order in f64.
    ///
    /// # Safety
    /// Each entry's `g` must be `dev`'s memory holding `len` values of `dtype`, not written
    /// until the launch is done.
    pub unsafe fn sum_squares_multi(
        dev: &CudaDevice,
        entries: &[super::MultiEntry],
        dtype: candle_core::DType,
    ) -> Result<f64> {
        let suffix = match dtype {
            candle_core::DType::F32 => "f32",
            candle_core::DType::F16 => "f16",
            candle_core::DType::BF16 => "bf16",
            d => candle_core::bail!("sum of squares: no kernel for {d:?} gradients"),
        };
        let (table, chunks) = super::multi_table(entries);
        if chunks == 0 {
            return Ok(0.0);
        }
        if chunks > i32::MAX as usize {
            candle_core::bail!("sum of squares: {chunks} chunks, more than one launch indexes");
        }
        let tensors = table.len() / super::TABLE_WORDS;
        let table = dev.clone_htod(&table)?;
        // SAFETY: the kernel writes every one of the chunks values (each chunk's block) before
        // they are read back below.
        let mut partial = unsafe { dev.alloc::<f32>(chunks)? };
        let call = super::sum_squares_call::<dyn CudaIn + '_, dyn CudaOut + '_>(
            &table,
            tensors,
            chunks,
            suffix,
            &mut partial,
            super::MAX_BLOCKS,
        );
        // SAFETY: the kernel reads the table as uploaded, for each chunk the entry's gradient
        // below its len (the caller's guarantee), and writes partial[0..chunks].
        unsafe { call::run(dev, "clipft_adam", PTX, call) }?;
        let partial = dev.clone_dtoh(&partial)?;
        Ok(partial.iter().map(|&p| f64::from(p)).sum())
    }
}

#[cfg(feature = "cuda")]
pub use gpu::{adam_multi_step, adam_step, sum_squares_multi};

/// `adam.cu` itself, run by the CPU emulator with the launcher's grid and arguments: it gives
/// its twin's bits, both kinds, a ragged length, several grid-stride rounds.
#[cfg(test)]
mod emu_tests {
    use clipft_cuda_emu::Buffer;

    use super::super::call::emu::{self, EmuArg};
    use crate::model::kernels::adam::adam_update;
    use crate::model::kernels::adam::tests::{scalars, val};

    #[test]
    fn emulated_kernel_gives_the_twins_bits() {
        // Over 132 * 16 blocks of 256, so threads loop.
        let n = 132 * 16 * 256 + 777;
        for decoupled in [true, false] {
            let s = scalars(decoupled);
            let start = |seed| (0..n).map(|i| val(i, seed)).collect::<Vec<f32>>();
            let (mut w, g, mut m) = (start(2), start(1), start(3));
            let mut v: Vec<f32> = start(4).iter().map(|x| x.abs()).collect();
            let mut dw = Buffer::from_slice(&w);
            let dg = Buffer::from_slice(&g);
            let (mut dm, mut dv) = (Buffer::from_slice(&m), Buffer::from_slice(&v));
            adam_update(&mut w, &g, &mut m, &mut v, s);
            let call =
                super::adam_call::<dyn EmuArg, dyn EmuArg>(&mut dw, &dg, &mut dm, &mut dv, n, &s);
            // SAFETY: all four buffers hold n values, what the kernel indexes.
            unsafe { emu::run(call) }.unwrap();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            for (name, host, dev) in [("w", &w, &dw), ("m", &m, &dm), ("v", &v, &dv)] {
                dev.check().unwrap();
                assert!(
                    bits(host) == bits(dev.values()),
                    "decoupled {decoupled}: {name} differs"
                );
            }
        }
    }
}

/// `adam.cu`'s one-launch step in the emulator: see the test.
#[cfg(test)]
mod emu_multi_tests {
    /// What `clipft_sum_squares_multi_*` computes for one chunk's values, in its order: each
    /// of 256 threads accumulates its strided elements with fused multiply-adds, each warp adds
    /// its lanes by the xor butterfly, and the warps' sums are added in order.
    fn chunk_sum_squares_twin(values: &[f32]) -> f32 {
        let threads = super::SUM_THREADS as usize;
        let mut acc = vec![0f32; threads];
        for (i, v) in values.iter().enumerate() {
            acc[i % threads] = v.mul_add(*v, acc[i % threads]);
        }
        let mut total = 0f32;
        for warp in acc.chunks(32) {
            let mut lanes = warp.to_vec();
            for o in [16, 8, 4, 2, 1] {
                let before = lanes.clone();
                for (l, v) in lanes.iter_mut().enumerate() {
                    *v = before[l] + before[l ^ o];
                }
            }
            total += lanes[0];
        }
        total
    }

    /// The sum of squares over the same kind of table: every chunk's partial sum is its twin's
    /// bits, in each dtype, on fewer blocks than chunks; the Adam-only words of the table are
    /// not read (they are zero here).
    #[test]
    fn emulated_sum_of_squares_gives_the_twins_bits() {
        let lens = [1, CHUNK - 1, 0, CHUNK, CHUNK + 1, 3 * CHUNK + 5, 7];
        for dt in Dt::ALL {
            let grads: Vec<Vec<f32>> = lens
                .iter()
                .enumerate()
                .map(|(t, &n)| dt.round_all(&emu::values(n, 7 + t as u32)))
                .collect();
            let bufs: Vec<Box<dyn EmuArg>> = grads.iter().map(|g| dt.buffer(g)).collect();
            let entries: Vec<MultiEntry> = bufs
                .iter()
                .zip(&lens)
                .map(|(b, &len)| MultiEntry {
                    w: 0,
                    g: addr(b.arg()),
                    m: 0,
                    v: 0,
                    copy: 0,
                    len,
                })
                .collect();
            let (table, chunks) = multi_table(&entries);
            let tensors = lens.iter().filter(|&&n| n > 0).count();
            let table = Buffer::from_slice(&table);
            let mut partial = Dt::F32.poisoned(chunks);
            let call = super::sum_squares_call::<dyn EmuArg, dyn EmuArg>(
                &table,
                tensors,
                chunks,
                dt.suffix(),
                &mut *partial,
                3,
            );
            // SAFETY: every table entry names a live gradient buffer of its len values of the
            // launch's dtype; partial holds one value per chunk.
            unsafe { emu::run(call) }.unwrap();
            let got = emu::written("partial", &*partial);
            let want: Vec<f32> = grads
                .iter()
                .flat_map(|g| g.chunks(CHUNK).map(chunk_sum_squares_twin))
                .collect();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert!(
                bits(&got) == bits(&want),
                "{dt:?}: {got:?} against {want:?}"
            );
        }
    }

    use clipft_cuda_emu::{self as e, Buffer};

    use super::super::call::emu::{self, Dt, EmuArg};
    use super::{adam_multi_call, multi_table, MultiEntry, CHUNK};
    use crate::model::kernels::adam::adam_update;
    use crate::model::kernels::adam::tests::{scalars, val};

    fn addr(a: e::Arg) -> u64 {
        match a {
            e::Arg::Ptr(_, at) => at as u64,
            other => panic!("not a buffer: {other:?}"),
        }
    }

    /// Tensors of one element, a chunk's edges, several chunks and none, on fewer blocks than
    /// chunks (so blocks loop and look tensors up again): each weight and its moments get the
    /// twin's bits from the gradient in the launch's dtype, each compute copy is its new
    /// weight rounded to nearest even, written whole; f32 gradients run without copies.
    #[test]
    fn emulated_multi_tensor_step_gives_the_twins_bits() {
        let lens = [1, CHUNK - 1, 0, CHUNK, CHUNK + 1, 3 * CHUNK + 5, 7];
        for dt in Dt::ALL {
            for decoupled in [true, false] {
                let s = scalars(decoupled);
                let start = |n: usize, seed: u32| (0..n).map(|i| val(i, seed)).collect::<Vec<_>>();
                let mut host = Vec::new();
                let mut dev = Vec::new();
                for (t, &n) in lens.iter().enumerate() {
                    let seed = 10 * t as u32;
                    let g = dt.round_all(&start(n, seed + 1));
                    let (w, m) = (start(n, seed + 2), start(n, seed + 3));
                    let v: Vec<f32> = start(n, seed + 4).iter().map(|x| x.abs()).collect();
                    dev.push((
                        Buffer::from_slice(&w),
                        dt.buffer(&g),
                        Buffer::from_slice(&m),
                        Buffer::from_slice(&v),
                        (dt != Dt::F32).then(|| dt.poisoned(n)),
                    ));
                    host.push((w, g, m, v));
                }
                let entries: Vec<MultiEntry> = dev
                    .iter_mut()
                    .zip(&lens)
                    .map(|((w, g, m, v, copy), &len)| MultiEntry {
                        w: addr(w.arg_mut()),
                        g: addr(g.arg()),
                        m: addr(m.arg_mut()),
                        v: addr(v.arg_mut()),
                        copy: copy.as_mut().map_or(0, |c| addr(c.arg_mut())),
                        len,
                    })
                    .collect();
                let (table, chunks) = multi_table(&entries);
                assert_eq!(chunks, 1 + 1 + 1 + 2 + 4 + 1, "chunks");
                let table = Buffer::from_slice(&table);
                let tensors = lens.iter().filter(|&&n| n > 0).count();
                let call = adam_multi_call::<dyn EmuArg, dyn EmuArg>(
                    &table,
                    tensors,
                    chunks,
                    dt.suffix(),
                    &s,
                    3,
                );
                assert_eq!(call.grid, (3, 1, 1));
                // SAFETY: every table entry names live buffers of its len values, f32 for the
                // weight and moments and the launch's dtype for the gradient and copy; none
                // is borrowed elsewhere during the launch.
                unsafe { emu::run(call) }.unwrap();
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                for (t, ((w, g, m, v), (dw, _, dm, dv, copy))) in
                    host.iter_mut().zip(&dev).enumerate()
                {
                    adam_update(w, g, m, v, s);
                    let what = format!("{dt:?}, decoupled {decoupled}, tensor {t}");
                    for (name, want, got) in [("w", &*w, dw), ("m", &*m, dm), ("v", &*v, dv)] {
                        got.check().unwrap();
                        assert!(bits(want) == bits(got.values()), "{what}: {name} differs");
                    }
                    if let Some(copy) = copy {
                        let got = emu::written(&format!("{what}: copy"), copy.as_ref());
                        assert!(bits(&got) == bits(&dt.round_all(w)), "{what}: copy differs");
                    }
                }
            }
        }
    }
}

#[cfg(all(test, feature = "cuda"))]
mod tests {
    use crate::model::kernels::adam::adam_update;
    use crate::model::kernels::adam::tests::{scalars, val};
    use candle_core::{Device, Result};

    /// On a GPU (CUDA builds): the kernel gives its CPU twin's bits, both kinds, a ragged
    /// length. Without a GPU it says so and checks nothing.
    #[test]
    fn cuda_step_matches_the_cpu_bits() -> Result<()> {
        let Ok(Device::Cuda(dev)) = Device::new_cuda(0) else {
            eprintln!("cuda_step_matches_the_cpu_bits: skipped, no GPU");
            return Ok(());
        };
        let n = 100_003;
        for decoupled in [true, false] {
            let s = scalars(decoupled);
            let start = |seed| (0..n).map(|i| val(i, seed)).collect::<Vec<f32>>();
            let (mut w, g, mut m) = (start(2), start(1), start(3));
            let mut v: Vec<f32> = start(4).iter().map(|x| x.abs()).collect();
            let mut dw = dev.clone_htod(&w)?;
            let dg = dev.clone_htod(&g)?;
            let (mut dm, mut dv) = (dev.clone_htod(&m)?, dev.clone_htod(&v)?);
            for _ in 0..3 {
                adam_update(&mut w, &g, &mut m, &mut v, s);
                let mut wv = dw.slice_mut(..);
                super::adam_step(&dev, &mut wv, &dg.slice(..), &mut dm, &mut dv, s)?;
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            for (name, host, gpu) in [("w", &w, &dw), ("m", &m, &dm), ("v", &v, &dv)] {
                let got = dev.clone_dtoh(gpu)?;
                assert!(
                    bits(host) == bits(&got),
                    "decoupled {decoupled}: {name} differs"
                );
            }
        }
        Ok(())
    }
}
