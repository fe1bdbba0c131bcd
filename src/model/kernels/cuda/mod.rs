//! CUDA kernels, each beside its CPU twin: a Rust function that follows the kernel's algorithm
//! step for step (same tiling, same online updates, f32 accumulation), which the normal test
//! suite checks against the model's reference ops on any machine, and which GPU runs check the
//! kernel against (`examples/device_check.rs`, the `cuda` tests). The `.cu` sources are compiled
//! to PTX by `build.rs` under the `cuda` feature (nvcc from `CUDA_HOME` or `PATH`, for
//! `CUDA_COMPUTE_CAP`), loaded once per device on first use.
//!
//! Each launch (grid, shared memory, arguments in the kernel's order) is written once, as a
//! [`call::Call`] built by the kernel file's `*_call` functions; the GPU launchers run it with
//! `call::run`, and the `emu_tests` in each file run the same call on the CPU emulator
//! (`cuda-emu/`), which executes the `.cu` source itself (every CUDA thread a fiber, barriers,
//! shuffles and wmma emulated, launches checked against the kernel's C++ signature). So without
//! a GPU the normal test suite checks each kernel's indexing, synchronisation and launch, not
//! only its twin's algorithm.
//!
//! To add a kernel (`embed.cu` with [`embed`] and [`crate::model::ops::embed`] is a small,
//! complete example):
//! 1. the `extern "C"` kernel per element type in a `.cu` file here (`build.rs` compiles every
//!    one; `common.cuh` has the loads, rounded stores and warp reductions);
//! 2. beside it in the `.rs` file: its CPU twin (the same steps in Rust), a `*_call` builder
//!    that writes the launch once, the GPU launcher over it (`mod gpu`, under the `cuda`
//!    feature; it checks every length the kernel's indexing relies on, which its `SAFETY`
//!    comment names), and an `emu_tests` test that runs the call on the emulator against the
//!    twin;
//! 3. the op that uses it in [`crate::model::ops`]: a candle custom op whose `cpu_fwd` runs the
//!    twin and `cuda_fwd` the launcher, with a backward made of such ops, tested against
//!    candle's composed ops on the CPU;
//! 4. the choice in [`crate::model::policy::Kernels`] (a field and its `CLIPFT_NO_*` switch),
//!    read by the layer or tower that applies the op, and the towers' CPU parity tests
//!    (`tests/parity.rs`) with the field on;
//! 5. a `cuda_*` test that compares the op on a GPU with the CPU (it skips without one), and a
//!    `gate` line in `scripts/gpu-check.sh` that runs it first and sets the switch if it fails.
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
