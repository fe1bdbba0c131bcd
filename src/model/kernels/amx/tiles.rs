//! Intel AMX instructions for a bf16 matrix multiply, as stable `core::arch::asm!` wrappers.
//!
//! AMX state model (summary):
//! * There are 8 tile registers `tmm0..tmm7`, each up to 16 rows x 64 bytes.
//! * `LDTILECFG` loads a 64-byte configuration (palette 1) that gives each
//!   tile its row count and bytes-per-row. Tiles are per-thread state, so each
//!   thread that uses AMX must load a config first and should `TILERELEASE`
//!   when done (this returns the tile state to INIT so XSAVE stays cheap).
//! * Linux keeps AMX tile data disabled until the process asks for it with
//!   `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`; executing a tile
//!   instruction without permission raises SIGILL.
//!
//! The tile register numbers used in the asm strings are compile-time
//! constants (const generics), because Rust's `asm!` cannot allocate tmm
//! registers; the compiler never touches them, so no clobbers are needed.

use core::arch::asm;

const ARCH_GET_XCOMP_PERM: libc::c_long = 0x1022;
const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
const XFEATURE_XTILEDATA: libc::c_long = 18;

/// True if CPUID reports AMX-TILE and AMX-BF16 (leaf 7, subleaf 0, EDX bits 24 and 22).
pub fn cpu_has_amx_bf16() -> bool {
    let r = core::arch::x86_64::__cpuid_count(7, 0);
    let amx_bf16 = (r.edx >> 22) & 1 == 1;
    let amx_tile = (r.edx >> 24) & 1 == 1;
    amx_bf16 && amx_tile
}

/// Ask the Linux kernel for permission to use AMX tile data in this process
/// (applies to all threads, current and future), then read the permission
/// mask back to verify. Idempotent.
pub fn request_amx_permission() -> Result<(), String> {
    if !cpu_has_amx_bf16() {
        return Err("CPUID does not report AMX-TILE + AMX-BF16".into());
    }
    // SAFETY: plain syscalls; the GET variant writes one u64 into `mask`.
    unsafe {
        let rc = libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        );
        if rc != 0 {
            return Err(format!(
                "arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA) failed: {}",
                std::io::Error::last_os_error()
            ));
        }
        let mut mask: u64 = 0;
        let rc = libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_GET_XCOMP_PERM,
            &mut mask as *mut u64,
        );
        if rc != 0 {
            return Err(format!(
                "arch_prctl(ARCH_GET_XCOMP_PERM) failed: {}",
                std::io::Error::last_os_error()
            ));
        }
        if mask & (1u64 << XFEATURE_XTILEDATA) == 0 {
            return Err(format!("XTILEDATA not in permitted mask {mask:#x}"));
        }
    }
    Ok(())
}

/// The 64-byte LDTILECFG memory operand (palette 1 layout).
#[repr(C, align(64))]
pub struct TileConfig {
    palette_id: u8,
    start_row: u8,
    _reserved: [u8; 14],
    /// Bytes per row for tiles 0..15 (only 0..7 exist in palette 1).
    colsb: [u16; 16],
    /// Rows for tiles 0..15.
    rows: [u8; 16],
}

const _: () = assert!(core::mem::size_of::<TileConfig>() == 64);

impl TileConfig {
    /// All 8 tiles configured as full 16 rows x 64 bytes. That serves as
    /// 16x32 bf16 (A / B operands) or 16x16 f32 (accumulators).
    pub fn all_full() -> Self {
        let mut cfg = TileConfig {
            palette_id: 1,
            start_row: 0,
            _reserved: [0; 14],
            colsb: [0; 16],
            rows: [0; 16],
        };
        for t in 0..8 {
            cfg.colsb[t] = 64;
            cfg.rows[t] = 16;
        }
        cfg
    }

    /// Load this configuration into the current thread's tile state.
    ///
    /// # Safety
    /// AMX permission must have been granted (see [`request_amx_permission`]).
    #[inline]
    pub unsafe fn load(&self) {
        asm!("ldtilecfg [{}]", in(reg) self as *const Self, options(nostack, preserves_flags, readonly));
    }
}

/// Release all tile state of the current thread (back to INIT).
///
/// # Safety
/// AMX must be available.
#[inline]
pub unsafe fn tile_release() {
    asm!("tilerelease", options(nostack, preserves_flags, nomem));
}

/// `tmm{T} = 0`.
///
/// # Safety
/// A tile config must be loaded on this thread (after AMX permission was
/// granted); memory operands must cover 16 rows of `stride` bytes.
#[inline(always)]
pub unsafe fn tile_zero<const T: u8>() {
    asm!("tilezero tmm{t}", t = const T, options(nostack, preserves_flags, nomem));
}

/// Load tile `T` from `ptr`, consecutive rows `stride` bytes apart.
///
/// # Safety
/// A tile config must be loaded on this thread (after AMX permission was
/// granted); memory operands must cover 16 rows of `stride` bytes.
#[inline(always)]
pub unsafe fn tile_load<const T: u8>(ptr: *const u8, stride: usize) {
    asm!(
        "tileloadd tmm{t}, [{p} + {s}*1]",
        t = const T, p = in(reg) ptr, s = in(reg) stride,
        options(nostack, preserves_flags, readonly)
    );
}

/// Store tile `T` to `ptr`, consecutive rows `stride` bytes apart.
///
/// # Safety
/// A tile config must be loaded on this thread (after AMX permission was
/// granted); memory operands must cover 16 rows of `stride` bytes.
#[inline(always)]
pub unsafe fn tile_store<const T: u8>(ptr: *mut u8, stride: usize) {
    asm!(
        "tilestored [{p} + {s}*1], tmm{t}",
        t = const T, p = in(reg) ptr, s = in(reg) stride,
        options(nostack, preserves_flags)
    );
}

/// `tmm{C} += tmm{A} * tmm{B}` with bf16 inputs and f32 accumulation:
/// C[m][n] += sum_{k2} A[m][2*k2]*B[k2][2n] + A[m][2*k2+1]*B[k2][2n+1].
///
/// # Safety
/// A tile config must be loaded on this thread (after AMX permission was
/// granted); memory operands must cover 16 rows of `stride` bytes.
#[inline(always)]
pub unsafe fn tdpbf16ps<const C: u8, const A: u8, const B: u8>() {
    asm!(
        "tdpbf16ps tmm{c}, tmm{a}, tmm{b}",
        c = const C, a = const A, b = const B,
        options(nostack, preserves_flags, nomem)
    );
}
