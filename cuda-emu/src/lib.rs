//! Runs clipft's CUDA kernels on the CPU: the `.cu` sources themselves, compiled as C++ by
//! `build.rs` with a prelude (`cxx/emu.h`) that gives them CUDA's thread coordinates,
//! barriers, shuffles, wmma and intrinsics. Each block's threads run as fibers that switch at
//! barriers, so the emulator checks what a twin cannot: a kernel's indexing, its shared-memory
//! layout and size, its synchronisation (a barrier in divergent code or a shuffle with exited
//! lanes is an error, not a hang), and that a launch's arguments match the kernel's C++
//! signature. It does not model timing, memory ordering without barriers, or the GPU's
//! approximate intrinsics (`__expf` is `expf` here).
//!
//! Test-only: clipft's kernel tests launch through [`launch`] with the same grid, shared
//! memory and argument list the CUDA launcher uses, on [`Buffer`]s whose guard zones catch
//! writes out of bounds and whose poison catches values a kernel should have written but
//! did not.

use std::ffi::{c_char, CString};

/// The element type behind a pointer argument: the tag the kernel's signature is checked by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Elem {
    F32,
    F16,
    Bf16,
    U32,
}

impl Elem {
    fn tag(self) -> char {
        match self {
            Elem::F32 => 'f',
            Elem::F16 => 'h',
            Elem::Bf16 => 'b',
            Elem::U32 => 'u',
        }
    }
}

/// One kernel argument, in the kernel's order.
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    /// An address of elements of `elem`.
    Ptr(Elem, usize),
    /// A null pointer (to any type).
    Null,
    I32(i32),
    I64(i64),
    F32(f32),
}

/// A launch's geometry: blocks, threads per block, dynamic shared memory in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub smem: usize,
}

extern "C" {
    fn clipft_emu_launch(
        name: *const c_char,
        tags: *const c_char,
        args: *const u64,
        grid: *const u32,
        block: *const u32,
        smem: usize,
        err: *mut c_char,
        errlen: usize,
    ) -> i32;
}

/// Runs kernel `name` to completion on the calling thread, or says why it could not (an
/// unknown kernel, arguments that do not match its signature, a synchronisation error).
///
/// # Safety
/// Every pointer in `args` must be valid for each read and write the kernel makes with these
/// arguments and `dims`, and the memory must not be used elsewhere during the call.
pub unsafe fn launch(name: &str, dims: Dims, args: &[Arg]) -> Result<(), String> {
    let mut tags = String::new();
    let slots: Vec<u64> = args
        .iter()
        .map(|a| match *a {
            Arg::Ptr(e, addr) => {
                tags.push('*');
                tags.push(e.tag());
                addr as u64
            }
            Arg::Null => {
                tags.push_str("*0");
                0
            }
            Arg::I32(v) => {
                tags.push('i');
                v as i64 as u64
            }
            Arg::I64(v) => {
                tags.push('l');
                v as u64
            }
            Arg::F32(v) => {
                tags.push('F');
                u64::from(v.to_bits())
            }
        })
        .collect();
    let name_c = CString::new(name).map_err(|e| e.to_string())?;
    let tags_c = CString::new(tags).map_err(|e| e.to_string())?;
    let mut err = vec![0u8; 8192];
    // SAFETY: the strings are NUL-terminated, `slots` holds one value per tag, grid and block
    // are three values each, err is errlen bytes; the kernel's own accesses are the caller's
    // contract.
    let rc = unsafe {
        clipft_emu_launch(
            name_c.as_ptr(),
            tags_c.as_ptr(),
            slots.as_ptr(),
            dims.grid.as_ptr(),
            dims.block.as_ptr(),
            dims.smem,
            err.as_mut_ptr().cast(),
            err.len(),
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let end = err.iter().position(|&b| b == 0).unwrap_or(err.len());
    Err(String::from_utf8_lossy(&err[..end]).into_owned())
}

/// An element type a [`Buffer`] holds: its tag, and a poison value (a NaN for the float
/// types) that no kernel writes by accident.
pub trait Element: Copy + 'static {
    const ELEM: Elem;
    const POISON: Self;
    fn same_bits(self, other: Self) -> bool;
}

impl Element for f32 {
    const ELEM: Elem = Elem::F32;
    const POISON: Self = f32::from_bits(0x7fc0_dead);
    fn same_bits(self, other: Self) -> bool {
        self.to_bits() == other.to_bits()
    }
}

impl Element for u32 {
    const ELEM: Elem = Elem::U32;
    const POISON: Self = 0xdead_beef;
    fn same_bits(self, other: Self) -> bool {
        self == other
    }
}

/// Raw 16-bit storage for f16 (`__half`) and bf16 (`__nv_bfloat16`) elements: the emulator
/// knows only their bits; the caller converts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(transparent)]
pub struct F16Bits(pub u16);

/// See [`F16Bits`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(transparent)]
pub struct Bf16Bits(pub u16);

impl Element for F16Bits {
    const ELEM: Elem = Elem::F16;
    const POISON: Self = F16Bits(0x7e5a);
    fn same_bits(self, other: Self) -> bool {
        self == other
    }
}

impl Element for Bf16Bits {
    const ELEM: Elem = Elem::Bf16;
    const POISON: Self = Bf16Bits(0x7fda);
    fn same_bits(self, other: Self) -> bool {
        self == other
    }
}

/// Elements of poison on each side of a [`Buffer`].
const GUARD: usize = 64;

/// A kernel's buffer in host memory with poisoned guard zones on both sides, so that
/// [`Buffer::check`] can tell whether a kernel wrote outside it.
pub struct Buffer<T: Element> {
    data: Vec<T>,
    len: usize,
}

impl<T: Element> Buffer<T> {
    /// A buffer holding `values`.
    pub fn from_slice(values: &[T]) -> Self {
        let mut data = vec![T::POISON; values.len() + 2 * GUARD];
        data[GUARD..GUARD + values.len()].copy_from_slice(values);
        Self {
            data,
            len: values.len(),
        }
    }

    /// `len` poisoned elements: what a kernel leaves unwritten stays poison.
    pub fn poisoned(len: usize) -> Self {
        Self {
            data: vec![T::POISON; len + 2 * GUARD],
            len,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn values(&self) -> &[T] {
        &self.data[GUARD..GUARD + self.len]
    }

    /// This buffer as an argument the kernel only reads (the address of its first element).
    pub fn arg(&self) -> Arg {
        Arg::Ptr(T::ELEM, self.data[GUARD..].as_ptr() as usize)
    }

    /// This buffer as an argument the kernel writes.
    pub fn arg_mut(&mut self) -> Arg {
        Arg::Ptr(T::ELEM, self.data[GUARD..].as_mut_ptr() as usize)
    }

    /// Whether both guard zones are still poison (nothing written outside the buffer).
    pub fn check(&self) -> Result<(), String> {
        let (before, rest) = self.data.split_at(GUARD);
        let after = &rest[self.len..];
        match before
            .iter()
            .rposition(|v| !v.same_bits(T::POISON))
            .map(|i| GUARD - i)
        {
            Some(n) => Err(format!("a write {n} elements before the buffer")),
            None => match after.iter().position(|v| !v.same_bits(T::POISON)) {
                Some(i) => Err(format!("a write {i} elements past the buffer's end")),
                None => Ok(()),
            },
        }
    }

    /// Indices the kernel left poisoned.
    pub fn unwritten(&self) -> Vec<usize> {
        self.values()
            .iter()
            .enumerate()
            .filter(|(_, v)| v.same_bits(T::POISON))
            .map(|(i, _)| i)
            .collect()
    }
}
