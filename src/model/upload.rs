//! Preprocessed images into one `[n, 3, h, w]` batch on the model's device, in the model's
//! dtype. On the CPU that is one buffer. On a GPU it goes through a page-locked staging
//! buffer, kept between batches and converted to the model's dtype on the host (half the bytes
//! for f16 / bf16): one DMA copy instead of one pageable copy per image, a device-side stack
//! and a dtype conversion (a batch of 256 is 154 MB of f32). The next batch is decoded,
//! preprocessed and converted on the host while the current one runs; its copy then queues on
//! the device's one stream behind that forward pass, and the staging buffer is free again once
//! the copy is done.

use candle_core::{DType, Device, Tensor};

use super::ModelError;

/// The staging buffer of one model's uploads; clones share it.
#[derive(Debug, Clone, Default)]
pub struct PixelUpload {
    #[cfg(feature = "cuda")]
    staging: std::sync::Arc<std::sync::Mutex<Option<gpu::Pinned>>>,
}

impl PixelUpload {
    /// `images` (each `3 * h * w` values) as one batch on `device` in `dtype`.
    pub fn batch(
        &self,
        images: &[Vec<f32>],
        (h, w): (usize, usize),
        device: &Device,
        dtype: DType,
    ) -> Result<Tensor, ModelError> {
        let per = 3 * h * w;
        if let Some(bad) = images.iter().position(|i| i.len() != per) {
            return Err(ModelError::InvalidInput {
                msg: format!(
                    "image {bad} has {} values, expected {per}",
                    images[bad].len()
                ),
            });
        }
        let shape = (images.len(), 3, h, w);
        #[cfg(feature = "cuda")]
        if let Device::Cuda(dev) = device {
            if super::policy::switches().fused && !images.is_empty() {
                let mut slot = self.staging.lock().map_err(|_| ModelError::InvalidInput {
                    msg: "poisoned upload buffer".into(),
                })?;
                return Ok(gpu::upload(dev, &mut slot, images, shape, dtype)?);
            }
        }
        if device.is_cpu() {
            let mut flat = Vec::with_capacity(images.len() * per);
            for image in images {
                flat.extend_from_slice(image);
            }
            return Ok(Tensor::from_vec(flat, shape, device)?.to_dtype(dtype)?);
        }
        // Elsewhere: one upload per image and a copy on the device, no host-side batch buffer.
        let each = images
            .iter()
            .map(|i| Tensor::from_slice(i, (3, h, w), device))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::stack(&each, 0)?.to_dtype(dtype)?)
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, PinnedHostSlice, ValidAsZeroBits};
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CudaDevice, DType, Result, Tensor};
    use half::slice::HalfFloatSliceExt;
    use rayon::prelude::*;

    /// The page-locked staging buffer, in the element type of the last upload.
    #[derive(Debug)]
    pub enum Pinned {
        F32(PinnedHostSlice<f32>),
        F16(PinnedHostSlice<half::f16>),
        Bf16(PinnedHostSlice<half::bf16>),
    }

    pub fn upload(
        dev: &CudaDevice,
        slot: &mut Option<Pinned>,
        images: &[Vec<f32>],
        shape: (usize, usize, usize, usize),
        dtype: DType,
    ) -> Result<Tensor> {
        macro_rules! take {
            ($variant:ident, $t:ty, $convert:expr) => {{
                let mut buf = match slot.take() {
                    Some(Pinned::$variant(p)) => Some(p),
                    _ => None,
                };
                let t = copy::<$t>(dev, &mut buf, images, shape, $convert);
                *slot = buf.map(Pinned::$variant);
                t
            }};
        }
        match dtype {
            DType::F32 => take!(F32, f32, |d: &mut [f32], s: &[f32]| d.copy_from_slice(s)),
            DType::F16 => take!(F16, half::f16, |d: &mut [half::f16], s: &[f32]| d
                .convert_from_f32_slice(s)),
            DType::BF16 => take!(Bf16, half::bf16, |d: &mut [half::bf16], s: &[f32]| d
                .convert_from_f32_slice(s)),
            dt => candle_core::bail!("pixels in {dt:?}: f32, f16 or bf16 only"),
        }
    }

    /// Converts `images` into the staging buffer (grown when too small), copies its first
    /// values into a new device buffer and wraps that as a tensor.
    fn copy<T: DeviceRepr + ValidAsZeroBits + CudaDType + Copy + Send + Sync + 'static>(
        dev: &CudaDevice,
        buf: &mut Option<PinnedHostSlice<T>>,
        images: &[Vec<f32>],
        shape: (usize, usize, usize, usize),
        convert: impl Fn(&mut [T], &[f32]) + Sync,
    ) -> Result<Tensor> {
        let per = shape.1 * shape.2 * shape.3;
        let n = images.len() * per;
        if buf.as_ref().is_none_or(|p| p.len() < n) {
            *buf = None; // free the old one first
                         // SAFETY: the memory starts unset; the first n values are written below before the
                         // copy reads them, and nothing reads past n.
            let p = unsafe { dev.cuda_stream().context().alloc_pinned::<T>(n) }.w()?;
            *buf = Some(p);
        }
        let Some(pinned) = buf.as_mut() else {
            candle_core::bail!("no staging buffer")
        };
        let host = pinned.as_mut_slice().w()?;
        host[..n]
            .par_chunks_mut(per)
            .zip(images.par_iter())
            .for_each(|(dst, img)| convert(dst, img));
        // SAFETY: the copy below writes all n values before anything reads them.
        let mut dst = unsafe { dev.alloc::<T>(n)? };
        // One DMA from page-locked memory, asynchronous: wait for it before the staging buffer
        // can take the next batch (the forward pass queued after it would wait for it anyway).
        dev.memcpy_htod(&host[..n], &mut dst)?;
        dev.cuda_stream().synchronize().w()?;
        let storage =
            candle_core::Storage::Cuda(candle_core::CudaStorage::wrap_cuda_slice(dst, dev.clone()));
        Ok(Tensor::from_storage(
            storage,
            shape,
            candle_core::op::BackpropOp::none(),
            false,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_batches_are_checked_and_in_the_models_dtype() -> Result<(), ModelError> {
        let up = PixelUpload::default();
        let images = vec![vec![0.5f32; 3 * 2 * 2], vec![-1.0f32; 3 * 2 * 2]];
        let t = up.batch(&images, (2, 2), &Device::Cpu, DType::F16)?;
        assert_eq!(t.dims(), &[2, 3, 2, 2]);
        assert_eq!(t.dtype(), DType::F16);
        let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!((v[0], v[12]), (0.5, -1.0));
        let short = vec![vec![0.0f32; 11]];
        assert!(up.batch(&short, (2, 2), &Device::Cpu, DType::F32).is_err());
        Ok(())
    }

    /// On a GPU (CUDA builds): the staged upload gives the CPU batch's values, in each dtype,
    /// and a smaller batch after a larger one reuses the buffer correctly. Without a GPU it
    /// says so and checks nothing.
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_upload_matches_the_cpu_batch() -> Result<(), ModelError> {
        let Ok(gpu) = Device::new_cuda(0) else {
            eprintln!("cuda_upload_matches_the_cpu_batch: skipped, no GPU");
            return Ok(());
        };
        let up = PixelUpload::default();
        for (n, dt) in [
            (5, DType::F16),
            (3, DType::F16),
            (4, DType::BF16),
            (2, DType::F32),
        ] {
            let images: Vec<Vec<f32>> = (0..n)
                .map(|i| {
                    (0..3 * 8 * 8)
                        .map(|j| (i * 1000 + j) as f32 / 777.0)
                        .collect()
                })
                .collect();
            let want = up.batch(&images, (8, 8), &Device::Cpu, dt)?;
            let got = up.batch(&images, (8, 8), &gpu, dt)?;
            assert_eq!(got.dtype(), dt);
            let (a, b) = (
                want.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
                got.to_device(&Device::Cpu)?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?,
            );
            assert_eq!(a, b, "{n} images in {dt:?}");
        }
        Ok(())
    }
}
