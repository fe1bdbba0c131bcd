//! Kernels, per device, apart from the model definition: [`cpu`] (GEMM with bias and residual,
//! layer norm, attention, activations, pooled buffers), [`cpu_block`] (a whole encoder block
//! from those, over weights the layers describe as slices) and [`amx`] beside them (bf16x3 /
//! bf16 products on Intel AMX tiles, `--matmul-precision`). Every kernel here is a
//! slice function; the model reaches them through its layers and the ops in [`super::ops`].
//! [`seqs`]: where a batch's sequences lie in its rows (uniform, or packed end to end), for the
//! attention kernels.
//! [`adam`]: the optimiser's update over one parameter's buffers (the trainer runs it).
//! [`cuda`]: the CUDA kernels (`.cu`, compiled to PTX under the `cuda` feature), each with the
//! CPU twin the normal test suite runs.

pub mod adam;
#[cfg(target_arch = "x86_64")]
pub mod amx;
#[cfg(not(target_arch = "x86_64"))]
#[path = "amx_none.rs"]
pub mod amx;
pub mod cpu;
pub mod cpu_block;
pub mod cuda;
pub mod seqs;
