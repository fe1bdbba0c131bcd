//! The launcher of `adam.cu`, the optimiser step over one parameter on the GPU. Its CPU twin
//! is [`crate::model::kernels::adam::adam_update`] (the same update, the same bits).

#[cfg(feature = "cuda")]
mod gpu {
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, CudaView, CudaViewMut, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CudaDevice, Result};

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
        let func = dev.get_or_load_custom_func("clipft_adam", "clipft_adam", PTX)?;
        let n = n as i64;
        let decoupled = i32::from(s.decoupled);
        let mut l = func.builder();
        l.arg(w);
        l.arg(g);
        l.arg(m);
        l.arg(v);
        l.arg(&n);
        l.arg(&decoupled);
        for x in [
            &s.decay,
            &s.wd,
            &s.one_minus_beta1,
            &s.beta2,
            &s.one_minus_beta2,
            &s.eps,
            &s.grad_scale,
            &s.step_size,
            &s.bc2_sqrt,
        ] {
            l.arg(x);
        }
        // A grid-stride loop: enough blocks to fill an H100 several times over.
        let blocks = (n as usize).div_ceil(256).clamp(1, 132 * 16) as u32;
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the kernel reads and writes the first n values of w, m and v and reads n of
        // g (all n long, checked above); the arguments match `clipft_adam` in order and type.
        unsafe { l.launch(cfg) }.w()?;
        Ok(())
    }
}

#[cfg(feature = "cuda")]
pub use gpu::adam_step;

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
