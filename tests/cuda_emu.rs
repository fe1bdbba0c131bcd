//! The CUDA emulator (`clipft-cuda-emu`) that the kernel tests run `.cu` sources on: it must
//! compute what a GPU computes for correct kernels, and report, not hide, the bugs a GPU would
//! turn into hangs, garbage or crashes. Its test kernels are in cuda-emu/cxx/selftest.

use clipft_cuda_emu::{launch, Arg, Buffer, Dims};

fn dims(threads: u32, smem: usize) -> Dims {
    Dims {
        grid: [1, 1, 1],
        block: [threads, 1, 1],
        smem,
    }
}

#[test]
fn shuffles_and_barriers_compute_a_block_sum() {
    let values: Vec<f32> = (0..256).map(|i| i as f32).collect();
    let input = Buffer::from_slice(&values);
    let mut out = Buffer::<f32>::poisoned(1);
    // SAFETY: the kernel reads 256 values of `input` and writes out[0].
    unsafe {
        launch(
            "emu_selftest_block_sum",
            dims(256, 0),
            &[input.arg(), out.arg_mut()],
        )
    }
    .unwrap();
    assert_eq!(out.values(), &[(0..256).sum::<i32>() as f32]);
    out.check().unwrap();
}

/// A barrier missing between one phase's reader and the next phase's writer (a shared slot
/// reused in a loop, with warp shuffles between) shows: odd blocks run each warp ahead as far
/// as it goes, so a later warp overwrites its slot before thread 0 has read it.
#[test]
fn a_missing_barrier_before_a_slot_is_reused_shows() {
    let (threads, rounds) = (128usize, 3usize);
    let values: Vec<f32> = (0..threads * rounds).map(|i| (i % 97) as f32).collect();
    let want: Vec<f32> = values
        .chunks(threads)
        .map(|c| c.iter().sum::<f32>())
        .collect();
    let input = Buffer::from_slice(&values);
    let run = |guarded: i32| {
        let mut out = Buffer::<f32>::poisoned(2 * rounds);
        let dims = Dims {
            grid: [2, 1, 1],
            block: [threads as u32, 1, 1],
            smem: 0,
        };
        let args = [
            input.arg(),
            out.arg_mut(),
            Arg::I32(rounds as i32),
            Arg::I32(guarded),
        ];
        // SAFETY: the kernel reads threads x rounds values of `input` and writes 2 x rounds
        // values of `out`.
        unsafe { launch("emu_selftest_block_sums", dims, &args) }.unwrap();
        out.check().unwrap();
        out.values().to_vec()
    };
    let both = [want.clone(), want].concat();
    assert_eq!(run(1), both);
    let unguarded = run(0);
    assert_eq!(
        unguarded[..rounds],
        both[..rounds],
        "the even block runs in step"
    );
    assert_ne!(
        unguarded[rounds..],
        both[rounds..],
        "the odd block shows the race"
    );
}

/// Runs a one-argument self-test kernel on 64 threads and returns its error.
fn error_of(kernel: &str, smem: usize) -> String {
    let mut out = Buffer::<f32>::poisoned(64);
    // SAFETY: the kernels write at most out[0..64].
    let r = unsafe { launch(kernel, dims(64, smem), &[out.arg_mut()]) };
    r.expect_err(kernel)
}

#[test]
fn warp_synchronisation_bugs_are_reported() {
    let e = error_of("emu_selftest_shuffle_after_exit", 0);
    assert!(e.contains("lanes that have exited"), "{e}");
    let e = error_of("emu_selftest_split_warp", 0);
    assert!(e.contains("different warp operations"), "{e}");
    let e = error_of("emu_selftest_deadlock", 0);
    assert!(e.contains("no thread can go on"), "{e}");
    assert!(e.contains("block (0, 0, 0)"), "{e}");
}

#[test]
fn shared_memory_is_poisoned_and_bounded() {
    let mut out = Buffer::<f32>::poisoned(64);
    // SAFETY: the kernel writes out[0..64] and reads 256 bytes of shared memory.
    unsafe { launch("emu_selftest_smem_uninit", dims(64, 256), &[out.arg_mut()]) }.unwrap();
    assert!(out.values().iter().all(|v| v.is_nan()));
    // SAFETY: the kernel writes only shared memory (one float past the 128 bytes, which the
    // emulator's guard zone holds).
    let e = unsafe { launch("emu_selftest_smem_overrun", dims(32, 128), &[Arg::I32(128)]) }
        .expect_err("overrun");
    assert!(e.contains("past the 128 bytes"), "{e}");
}

#[test]
fn arguments_are_checked_against_the_signature() {
    let out = Buffer::<f32>::poisoned(1);
    // SAFETY: refused before it runs (wrong arguments).
    let e = unsafe {
        launch(
            "emu_selftest_block_sum",
            dims(32, 0),
            &[out.arg(), Arg::I32(1)],
        )
    }
    .expect_err("arguments");
    assert!(e.contains("takes arguments *f*f, given *fi"), "{e}");
    let mut out = Buffer::<f32>::poisoned(128);
    // SAFETY: writes out[0..64].
    unsafe { launch("emu_selftest_bounded", dims(64, 0), &[out.arg_mut()]) }.unwrap();
    // SAFETY: refused before it runs (over the kernel's __launch_bounds__).
    let e = unsafe { launch("emu_selftest_bounded", dims(128, 0), &[out.arg_mut()]) }
        .expect_err("bounds");
    assert!(
        e.contains("1 to 64 threads (its __launch_bounds__), not 128"),
        "{e}"
    );
    // SAFETY: refused before it runs (no such kernel).
    let e = unsafe { launch("no_such_kernel", dims(32, 0), &[]) }.expect_err("name");
    assert!(e.contains("no kernel named"), "{e}");
}

#[test]
fn buffers_report_writes_outside_them_and_values_left_unwritten() {
    // smem_uninit writes out[0..64] (NaN from shared memory): past the 8 values of `short`,
    // into its guard zone of 64 elements.
    let mut short = Buffer::<f32>::poisoned(8);
    // SAFETY: writes 64 floats from the start of `short`: its 8 and 56 of its 64-element guard.
    unsafe {
        launch(
            "emu_selftest_smem_uninit",
            dims(64, 256),
            &[short.arg_mut()],
        )
    }
    .unwrap();
    let e = short.check().expect_err("overrun");
    assert!(e.contains("past the buffer's end"), "{e}");

    let input = Buffer::from_slice(&[1.0f32; 32]);
    let mut out = Buffer::<f32>::poisoned(4);
    // SAFETY: reads 32 values of `input`, writes out[0].
    unsafe {
        launch(
            "emu_selftest_block_sum",
            dims(32, 0),
            &[input.arg(), out.arg_mut()],
        )
    }
    .unwrap();
    assert_eq!(out.values()[0], 32.0);
    assert_eq!(out.unwritten(), vec![1, 2, 3]);
    out.check().unwrap();
}
