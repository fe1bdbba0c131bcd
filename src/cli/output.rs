//! What the commands print, and what happens when nobody reads it any more. `clipft runs logs
//! --follow | head` or `clipft fit ... | head` close the pipe early; Rust's `println!` then
//! panics ("Broken pipe", exit 101), which in `fit` would also stop training. Here a closed
//! stdout or stderr ends that output quietly: [`stdout_closed`] tells streaming commands to stop
//! following, and long jobs go on with nothing printed.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

static STDOUT_CLOSED: AtomicBool = AtomicBool::new(false);

/// Whether a write to stdout found the reader gone.
pub fn stdout_closed() -> bool {
    STDOUT_CLOSED.load(Ordering::Relaxed)
}

/// Writes one line to stdout; a closed pipe is remembered and later lines are dropped.
pub fn out(args: std::fmt::Arguments) {
    write_stdout(|o| o.write_fmt(args).and_then(|_| o.write_all(b"\n")));
}

/// Writes text to stdout as it is (no newline added), as [`out`] does.
pub fn out_raw(text: &str) {
    write_stdout(|o| o.write_all(text.as_bytes()));
}

fn write_stdout(f: impl FnOnce(&mut std::io::StdoutLock) -> std::io::Result<()>) {
    if stdout_closed() {
        return;
    }
    let mut o = std::io::stdout().lock();
    if f(&mut o).and_then(|_| o.flush()).is_err() {
        STDOUT_CLOSED.store(true, Ordering::Relaxed);
    }
}

/// Writes one line to stderr, ignoring a closed pipe (there is nowhere left to report it).
pub fn err(args: std::fmt::Arguments) {
    let mut e = std::io::stderr().lock();
    let _ = e.write_fmt(args).and_then(|_| e.write_all(b"\n"));
}

/// An error as the user reads it ([`crate::protocol::transport::error_chain`]: each cause once,
/// a gRPC status as its message and code).
pub fn describe(e: &anyhow::Error) -> String {
    crate::protocol::transport::error_chain(e.as_ref())
}

/// Whether an error is a write to our stdout after its reader has gone: the command then ends
/// quietly. A broken pipe elsewhere (a network peer that closed) is an error like any other, so
/// stdout itself must be the pipe that lost its reader.
pub fn is_closed_stdout(e: &anyhow::Error) -> bool {
    (stdout_closed() || stdout_reader_gone()) && is_broken_pipe(e)
}

/// Whether stdout is a pipe or socket whose reading end has closed (poll reports an error on
/// the write end then).
fn stdout_reader_gone() -> bool {
    let mut fd = libc::pollfd {
        fd: libc::STDOUT_FILENO,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call, a zero timeout; poll only reads
    // the descriptor's state.
    let n = unsafe { libc::poll(&mut fd, 1, 0) };
    n == 1 && fd.revents & libc::POLLERR != 0
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    use std::io::ErrorKind::BrokenPipe;
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == BrokenPipe)
            || c.downcast_ref::<serde_json::Error>()
                .is_some_and(|j| j.io_error_kind() == Some(BrokenPipe))
    })
}

/// The user pressed Ctrl-C and was told what it means; the command exits with 130, as shells
/// report an interrupted program, and prints nothing more.
#[derive(Debug, thiserror::Error)]
#[error("interrupted")]
pub struct Interrupted;

/// Follows a run's log until it ends or the user presses Ctrl-C. Stopping a follower changes
/// nothing on the trainer, so this says so, and how to follow again.
pub async fn follow_or_detach(
    name: &str,
    follow: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    tokio::select! {
        r = follow => r,
        _ = tokio::signal::ctrl_c() => {
            err(format_args!(
                "\nstopped following; run {name} goes on on the trainer. Follow it again with: clipft runs logs {name} --follow"
            ));
            Err(Interrupted.into())
        }
    }
}

/// `println!` that survives a closed stdout.
macro_rules! outln {
    () => { $crate::cli::output::out(format_args!("")) };
    ($($t:tt)*) => { $crate::cli::output::out(format_args!($($t)*)) };
}

/// `eprintln!` that survives a closed stderr.
macro_rules! errln {
    ($($t:tt)*) => { $crate::cli::output::err(format_args!($($t)*)) };
}
