//! The launcher of `adam.cu`, the optimiser step over one parameter on the GPU. Its CPU twin
//! is [`crate::model::kernels::adam::adam_update`] (the same update, the same bits).

use super::call::Call;
use crate::model::kernels::adam::AdamScalars;

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
    let blocks = n.div_ceil(256).clamp(1, 132 * 16) as u32;
    Call::new("clipft_adam", (blocks, 1, 1), 256)
        .output(w)
        .input(g)
        .output(m)
        .output(v)
        .i64(n as i64)
        .i32(i32::from(s.decoupled))
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
}

#[cfg(feature = "cuda")]
pub use gpu::adam_step;

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
