//! A kernel launch described apart from the device that runs it: the kernel's name, its grid,
//! block and dynamic shared memory, and its arguments in the `.cu` signature's order. Each
//! kernel file builds its launches here once (`*_call` functions, generic over the buffer
//! type); the CUDA launchers run them on the GPU (`run`, with the `cuda` feature), and the tests
//! run the very same descriptions through the CPU emulator (`clipft-cuda-emu`), which executes
//! the `.cu` source and checks the arguments against the kernel's C++ signature. So a launch's geometry and
//! argument order are written once and tested without a GPU.

/// One kernel argument. `I` and `O` are the device's buffer types for inputs and outputs
/// (`dyn CudaIn` and `dyn CudaOut` on the GPU, the emulator's host buffers in tests).
pub enum Arg<'a, I: ?Sized, O: ?Sized> {
    /// A buffer the kernel only reads.
    In(&'a I),
    /// A buffer the kernel writes (and may read).
    Out(&'a mut O),
    /// A null pointer (an absent optional buffer).
    Null,
    I32(i32),
    I64(i64),
    F32(f32),
}

/// Dynamic shared memory a block may use without the function's opt-in attribute.
pub const SMEM_DEFAULT: u32 = 48 * 1024;

/// One launch: what `run` (or the emulator) needs to start `kernel`.
pub struct Call<'a, I: ?Sized, O: ?Sized> {
    pub kernel: String,
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    /// Dynamic shared memory per block, bytes. Over [`SMEM_DEFAULT`] the launch sets the
    /// function's opt-in first.
    pub smem: u32,
    pub args: Vec<Arg<'a, I, O>>,
}

impl<'a, I: ?Sized, O: ?Sized> Call<'a, I, O> {
    /// `kernel` over `grid` blocks of `threads` threads, no shared memory yet, no arguments.
    pub fn new(kernel: impl Into<String>, grid: (u32, u32, u32), threads: u32) -> Self {
        Self {
            kernel: kernel.into(),
            grid,
            block: (threads, 1, 1),
            smem: 0,
            args: Vec::new(),
        }
    }

    pub fn smem(mut self, bytes: u32) -> Self {
        self.smem = bytes;
        self
    }

    pub fn input(mut self, b: &'a I) -> Self {
        self.args.push(Arg::In(b));
        self
    }

    pub fn output(mut self, b: &'a mut O) -> Self {
        self.args.push(Arg::Out(b));
        self
    }

    /// An optional input: the buffer, or a null pointer.
    pub fn input_or_null(mut self, b: Option<&'a I>) -> Self {
        self.args.push(b.map_or(Arg::Null, Arg::In));
        self
    }

    pub fn i32(mut self, v: i32) -> Self {
        self.args.push(Arg::I32(v));
        self
    }

    pub fn i64(mut self, v: i64) -> Self {
        self.args.push(Arg::I64(v));
        self
    }

    pub fn f32(mut self, v: f32) -> Self {
        self.args.push(Arg::F32(v));
        self
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, CudaView, CudaViewMut, LaunchArgs, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CudaDevice, Result};

    use super::{Arg, Call, SMEM_DEFAULT};

    /// A device buffer a kernel reads, pushed by shared reference (cudarc then orders the
    /// launch after the buffer's last write).
    pub trait CudaIn {
        fn push<'b>(&'b self, l: &mut LaunchArgs<'b>);
    }

    /// A device buffer a kernel writes, pushed by mutable reference (cudarc then orders the
    /// launch after the buffer's last read and write).
    pub trait CudaOut {
        fn push<'b>(&'b mut self, l: &mut LaunchArgs<'b>);
    }

    impl<T> CudaIn for CudaSlice<T> {
        fn push<'b>(&'b self, l: &mut LaunchArgs<'b>) {
            l.arg(self);
        }
    }

    impl<T> CudaIn for CudaView<'_, T> {
        fn push<'b>(&'b self, l: &mut LaunchArgs<'b>) {
            l.arg(self);
        }
    }

    impl<T> CudaOut for CudaSlice<T> {
        fn push<'b>(&'b mut self, l: &mut LaunchArgs<'b>) {
            l.arg(self);
        }
    }

    impl<T> CudaOut for CudaViewMut<'_, T> {
        fn push<'b>(&'b mut self, l: &mut LaunchArgs<'b>) {
            l.arg(self);
        }
    }

    /// A launch on the GPU.
    pub type GpuCall<'a> = Call<'a, dyn CudaIn + 'a, dyn CudaOut + 'a>;

    /// What the kernels read as "no buffer": a null device pointer.
    const NULL: u64 = 0;

    /// Runs `call` from the PTX module `module` (`ptx`, loaded once per device) on `dev`'s
    /// stream.
    ///
    /// # Safety
    /// The kernel's reads and writes with these arguments must lie within the buffers: the
    /// caller checks the lengths that the kernel's indexing relies on.
    pub unsafe fn run(
        dev: &CudaDevice,
        module: &str,
        ptx: &'static str,
        mut call: GpuCall<'_>,
    ) -> Result<()> {
        let func = dev.get_or_load_custom_func(&call.kernel, module, ptx)?;
        if call.smem > SMEM_DEFAULT {
            // Above 48 KB a launch needs the function's opt-in, set with its context current.
            dev.cuda_stream().context().bind_to_thread().w()?;
            func.set_attribute(
                CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                call.smem as i32,
            )
            .w()?;
        }
        let cfg = LaunchConfig {
            grid_dim: call.grid,
            block_dim: call.block,
            shared_mem_bytes: call.smem,
        };
        let mut l = func.builder();
        for a in call.args.iter_mut() {
            match a {
                Arg::In(b) => b.push(&mut l),
                Arg::Out(b) => b.push(&mut l),
                Arg::Null => {
                    l.arg(&NULL);
                }
                Arg::I32(v) => {
                    l.arg(&*v);
                }
                Arg::I64(v) => {
                    l.arg(&*v);
                }
                Arg::F32(v) => {
                    l.arg(&*v);
                }
            }
        }
        // SAFETY: the arguments are in the order and of the kinds the call's builder wrote
        // for this kernel (which the emulator tests check against its C++ signature); the
        // bounds are the caller's contract.
        unsafe { l.launch(cfg) }.w()?;
        Ok(())
    }
}

#[cfg(feature = "cuda")]
pub use gpu::{run, CudaIn, CudaOut, GpuCall};

/// Test support: [`Call`]s on the emulator's host buffers, run by `clipft-cuda-emu`.
#[cfg(test)]
pub mod emu {
    use clipft_cuda_emu as e;

    use super::{Arg, Call};

    /// A host buffer as an emulated kernel argument, and what the tests read back from it.
    pub trait EmuArg {
        fn arg(&self) -> e::Arg;
        fn arg_mut(&mut self) -> e::Arg;
        /// The values, as f32.
        fn to_f32(&self) -> Vec<f32>;
        /// Whether the kernel wrote outside the buffer.
        fn check(&self) -> Result<(), String>;
        /// Indices the kernel left unwritten (still poison).
        fn unwritten(&self) -> Vec<usize>;
    }

    macro_rules! emu_arg {
        ($t:ty, $to:expr) => {
            impl EmuArg for e::Buffer<$t> {
                fn arg(&self) -> e::Arg {
                    e::Buffer::arg(self)
                }
                fn arg_mut(&mut self) -> e::Arg {
                    e::Buffer::arg_mut(self)
                }
                fn to_f32(&self) -> Vec<f32> {
                    self.values().iter().map(|&v| $to(v)).collect()
                }
                fn check(&self) -> Result<(), String> {
                    e::Buffer::check(self)
                }
                fn unwritten(&self) -> Vec<usize> {
                    e::Buffer::unwritten(self)
                }
            }
        };
    }
    emu_arg!(f32, |v: f32| v);
    emu_arg!(u32, |v: u32| v as f32);
    emu_arg!(u64, |v: u64| v as f32);
    emu_arg!(e::F16Bits, |v: e::F16Bits| half::f16::from_bits(v.0)
        .to_f32());
    emu_arg!(e::Bf16Bits, |v: e::Bf16Bits| half::bf16::from_bits(v.0)
        .to_f32());

    /// The element types the kernels come in (their name suffixes).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Dt {
        F32,
        F16,
        Bf16,
    }

    impl Dt {
        pub const ALL: [Dt; 3] = [Dt::F32, Dt::F16, Dt::Bf16];

        pub fn suffix(self) -> &'static str {
            match self {
                Dt::F32 => "f32",
                Dt::F16 => "f16",
                Dt::Bf16 => "bf16",
            }
        }

        /// `v` rounded to this type (to nearest even) and back.
        pub fn round(self, v: f32) -> f32 {
            match self {
                Dt::F32 => v,
                Dt::F16 => half::f16::from_f32(v).to_f32(),
                Dt::Bf16 => half::bf16::from_f32(v).to_f32(),
            }
        }

        pub fn round_all(self, v: &[f32]) -> Vec<f32> {
            v.iter().map(|&x| self.round(x)).collect()
        }

        /// A buffer of `v` rounded to this type.
        pub fn buffer(self, v: &[f32]) -> Box<dyn EmuArg> {
            match self {
                Dt::F32 => Box::new(e::Buffer::from_slice(v)),
                Dt::F16 => Box::new(e::Buffer::from_slice(
                    &v.iter()
                        .map(|&x| e::F16Bits(half::f16::from_f32(x).to_bits()))
                        .collect::<Vec<_>>(),
                )),
                Dt::Bf16 => Box::new(e::Buffer::from_slice(
                    &v.iter()
                        .map(|&x| e::Bf16Bits(half::bf16::from_f32(x).to_bits()))
                        .collect::<Vec<_>>(),
                )),
            }
        }

        /// `n` poisoned values of this type.
        pub fn poisoned(self, n: usize) -> Box<dyn EmuArg> {
            match self {
                Dt::F32 => Box::new(e::Buffer::<f32>::poisoned(n)),
                Dt::F16 => Box::new(e::Buffer::<e::F16Bits>::poisoned(n)),
                Dt::Bf16 => Box::new(e::Buffer::<e::Bf16Bits>::poisoned(n)),
            }
        }

        /// The relative tolerance of a kernel's output in this type against its twin's
        /// (rounded to the type): a few units in the last place, for sums in another order and
        /// the GPU's approximate intrinsics.
        pub fn tol(self) -> f32 {
            match self {
                Dt::F32 => 2e-5,
                Dt::F16 => 2e-3,
                Dt::Bf16 => 1.6e-2,
            }
        }
    }

    /// Reproducible values in [-2.5, 2.5).
    pub fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 2000) as f32 / 400.0 - 2.5)
            .collect()
    }

    /// An output the kernel wrote whole and only: every value written, nothing outside.
    pub fn written(what: &str, b: &dyn EmuArg) -> Vec<f32> {
        if let Err(e) = b.check() {
            panic!("{what}: {e}");
        }
        let missing = b.unwritten();
        assert!(
            missing.is_empty(),
            "{what}: {} values unwritten, from index {}",
            missing.len(),
            missing[0]
        );
        b.to_f32()
    }

    /// `got` within `tol` of `want`, relative to the larger of 1 and the largest |want|.
    pub fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
        assert_eq!(got.len(), want.len(), "{what}: lengths");
        let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= tol * scale,
                "{what}[{i}]: {g} against {w} (tolerance {tol} x {scale})"
            );
        }
    }

    /// A launch in the emulator.
    pub type EmuCall<'a> = Call<'a, dyn EmuArg + 'a, dyn EmuArg + 'a>;

    /// Runs `call` in the emulator.
    ///
    /// # Safety
    /// The kernel's reads and writes with these arguments must lie within the buffers (or
    /// their guard zones, which [`e::Buffer::check`] then reports).
    pub unsafe fn run(mut call: EmuCall<'_>) -> Result<(), String> {
        let args: Vec<e::Arg> = call
            .args
            .iter_mut()
            .map(|a| match a {
                Arg::In(b) => b.arg(),
                Arg::Out(b) => b.arg_mut(),
                Arg::Null => e::Arg::Null,
                Arg::I32(v) => e::Arg::I32(*v),
                Arg::I64(v) => e::Arg::I64(*v),
                Arg::F32(v) => e::Arg::F32(*v),
            })
            .collect();
        if call.smem > 227 * 1024 {
            return Err(format!(
                "{}: {} bytes of shared memory",
                call.kernel, call.smem
            ));
        }
        let dims = e::Dims {
            grid: [call.grid.0, call.grid.1, call.grid.2],
            block: [call.block.0, call.block.1, call.block.2],
            smem: call.smem as usize,
        };
        // SAFETY: the buffers are borrowed for the call (outputs mutably); the bounds are this
        // function's contract.
        unsafe { e::launch(&call.kernel, dims, &args) }
    }
}
