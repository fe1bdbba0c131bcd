//! CUDA kernels, each beside its CPU twin: a Rust function that follows the kernel's algorithm
//! step for step (same tiling, same online updates, f32 accumulation), which the normal test
//! suite checks against the model's reference ops on any machine, and which GPU runs check the
//! kernel against (`examples/device_check.rs`, the `cuda` tests). The `.cu` sources are compiled
//! to PTX by `build.rs` under the `cuda` feature (nvcc from `CUDA_HOME` or `PATH`, for
//! `CUDA_COMPUTE_CAP`), loaded once per device on first use.
//!
//! Each launch (grid, shared memory, arguments in the kernel's order) is written once, as a
//! [`call::Call`] built by the kernel file's `*_call` functions; the GPU launchers run it with
//! [`call::run`], and the `emu_tests` in each file run the same call on the CPU emulator
//! (`cuda-emu/`), which executes the `.cu` source itself (every CUDA thread a fiber, barriers,
//! shuffles and wmma emulated, launches checked against the kernel's C++ signature). So without
//! a GPU the normal test suite checks each kernel's indexing, synchronisation and launch, not
//! only its twin's algorithm. To add a kernel: the `.cu` function, its twin, a `*_call`
//! builder, the GPU launcher over it, and an emulator test against the twin.
//!
//! - [`adam`] (`adam.cu`): the optimiser step over one f32 parameter, giving its CPU twin's
//!   bits.
//! - [`attention`] (`attention.cu`): multi-head attention for CLIP's short sequences, one
//!   forward kernel reading the projections' rows in place, and a two-kernel backward over
//!   the stacked QKV projection.
//! - [`clip_loss`] (`clip_loss.cu`): CLIPLoss's row normalisation and symmetric
//!   cross-entropy, forward and backward, with deterministic sums.
//! - [`embed`] (`embed.cu`): the towers' embeddings: token + position rows and their
//!   backward (rows summed per table row, deterministic), the class token and positions over
//!   the patch product (with the pre-layer-norm in inference) and their backward.
//! - [`elementwise`] (`elementwise.cu`): a linear layer's tail in one pass: bias + activation
//!   and its backward, bias + residual.
//! - [`layernorm`] (`layernorm.cu`): layer norm forward, and backward with the weight's and
//!   bias's gradients summed deterministically (per block, then over blocks).

pub mod adam;
pub mod attention;
/// Launch descriptions shared by the GPU and the emulator.
pub mod call;
pub mod clip_loss;
pub mod elementwise;
pub mod embed;
pub mod layernorm;

#[cfg(feature = "cuda")]
pub use attention::DeviceOffsets;
pub use attention::{attention_supports, attention_twin, AttentionShape, ATTENTION_TILE};
