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
    /// `unsigned long long`: tables of device addresses and lengths.
    U64,
}

impl Elem {
    fn tag(self) -> char {
        match self {
            Elem::F32 => 'f',
            Elem::F16 => 'h',
            Elem::Bf16 => 'b',
            Elem::U32 => 'u',
            Elem::U64 => 'q',
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

impl Element for u64 {
    const ELEM: Elem = Elem::U64;
    const POISON: Self = 0xdead_beef_dead_beef;
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

/// Elements of poison right before and after a [`Buffer`]'s values (more lie before them, up
/// to a page boundary).
const GUARD: usize = 64;

/// A kernel's buffer in host memory between poisoned guard zones and, beyond them,
/// inaccessible pages: a write just outside the buffer is found by [`Buffer::check`], one far
/// outside faults where it happens instead of corrupting the test's heap.
pub struct Buffer<T: Element> {
    /// The mapping: an inaccessible page, the readable body, an inaccessible page.
    map: *mut u8,
    map_len: usize,
    /// The body: poison, the values, GUARD elements of poison that end at the last page.
    body: *mut T,
    body_len: usize,
    /// Where the values start in the body.
    start: usize,
    len: usize,
}

impl<T: Element> Buffer<T> {
    fn with_len(len: usize) -> Self {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let size = std::mem::size_of::<T>();
        let bytes = (len + 2 * GUARD) * size;
        let body_bytes = bytes.div_ceil(page) * page;
        let map_len = body_bytes + 2 * page;
        // SAFETY: an anonymous private mapping of map_len bytes, no address hint.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert!(map != libc::MAP_FAILED, "emulator buffer: mmap failed");
        let map = map.cast::<u8>();
        // SAFETY: page .. page + body_bytes lies inside the mapping just made.
        let rc = unsafe {
            libc::mprotect(
                map.add(page).cast(),
                body_bytes,
                libc::PROT_READ | libc::PROT_WRITE,
            )
        };
        assert_eq!(rc, 0, "emulator buffer: mprotect failed");
        let body_len = body_bytes / size;
        // SAFETY: the body starts at a page boundary inside the mapping (so is aligned for
        // T, whose size divides the page) and holds body_len elements.
        let body = unsafe { map.add(page) }.cast::<T>();
        for i in 0..body_len {
            // SAFETY: i < body_len, inside the readable body.
            unsafe { body.add(i).write(T::POISON) };
        }
        Self {
            map,
            map_len,
            body,
            body_len,
            start: body_len - GUARD - len,
            len,
        }
    }

    /// A buffer holding `values`.
    pub fn from_slice(values: &[T]) -> Self {
        let mut b = Self::with_len(values.len());
        b.values_mut().copy_from_slice(values);
        b
    }

    /// `len` poisoned elements: what a kernel leaves unwritten stays poison.
    pub fn poisoned(len: usize) -> Self {
        Self::with_len(len)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn body(&self) -> &[T] {
        // SAFETY: the body is body_len initialised elements, alive while self is, and written
        // only through `&mut self` (or by a kernel during `launch`, which holds the borrow).
        unsafe { std::slice::from_raw_parts(self.body, self.body_len) }
    }

    pub fn values(&self) -> &[T] {
        &self.body()[self.start..self.start + self.len]
    }

    fn values_mut(&mut self) -> &mut [T] {
        // SAFETY: as `body`, borrowed mutably through `&mut self`.
        let body = unsafe { std::slice::from_raw_parts_mut(self.body, self.body_len) };
        &mut body[self.start..self.start + self.len]
    }

    /// This buffer as an argument the kernel only reads (the address of its first element).
    pub fn arg(&self) -> Arg {
        Arg::Ptr(T::ELEM, self.values().as_ptr() as usize)
    }

    /// This buffer as an argument the kernel writes.
    pub fn arg_mut(&mut self) -> Arg {
        Arg::Ptr(T::ELEM, self.values_mut().as_mut_ptr() as usize)
    }

    /// Whether everything around the values is still poison (nothing written outside).
    pub fn check(&self) -> Result<(), String> {
        let body = self.body();
        let (before, rest) = body.split_at(self.start);
        let after = &rest[self.len..];
        if let Some(i) = before.iter().rposition(|v| !v.same_bits(T::POISON)) {
            return Err(format!(
                "a write {} elements before the buffer",
                self.start - i
            ));
        }
        match after.iter().position(|v| !v.same_bits(T::POISON)) {
            Some(i) => Err(format!("a write {i} elements past the buffer's end")),
            None => Ok(()),
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

impl<T: Element> Drop for Buffer<T> {
    fn drop(&mut self) {
        // SAFETY: the mapping this buffer made, unmapped once.
        unsafe { libc::munmap(self.map.cast(), self.map_len) };
    }
}
