//! A packed batch as the ops carry it: the sequences' row offsets
//! ([`crate::model::kernels::seqs::Packing`]), and on a GPU the same offsets on the device,
//! uploaded by the first attention op that needs them and shared by every layer of the pass,
//! forward and backward (one small copy per batch, not one per layer).

use crate::model::kernels::seqs::{Packing, Seqs};

/// The offsets of one packed batch, shared (`Arc`) by the ops of every layer.
#[derive(Debug)]
pub struct PackedSeqs {
    packing: Packing,
    #[cfg(feature = "cuda")]
    device: std::sync::OnceLock<(
        candle_core::CudaDevice,
        crate::model::kernels::cuda::DeviceOffsets,
    )>,
}

impl PackedSeqs {
    pub fn new(packing: Packing) -> Self {
        Self {
            packing,
            #[cfg(feature = "cuda")]
            device: std::sync::OnceLock::new(),
        }
    }

    pub fn packing(&self) -> &Packing {
        &self.packing
    }

    pub fn seqs(&self) -> Seqs<'_> {
        Seqs::Packed(&self.packing)
    }

    /// Every row of the batch.
    pub fn rows(&self) -> usize {
        self.packing.offsets().last().copied().unwrap_or(0)
    }

    /// The offsets on `dev`, uploaded on first use.
    #[cfg(feature = "cuda")]
    pub fn device_offsets(
        &self,
        dev: &candle_core::CudaDevice,
    ) -> candle_core::Result<&crate::model::kernels::cuda::DeviceOffsets> {
        use candle_core::backend::BackendDevice;
        if self.device.get().is_none() {
            let up = crate::model::kernels::cuda::DeviceOffsets::upload(dev, &self.packing)?;
            let _ = self.device.set((dev.clone(), up));
        }
        match self.device.get() {
            Some((d, o)) if d.same_device(dev) => Ok(o),
            _ => candle_core::bail!("a packed batch's offsets are on another device"),
        }
    }
}
