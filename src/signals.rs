//! Signal handling without handlers, for `run` and for waiting in the queue: the
//! signals canhazgpu cares about are blocked in every thread and collected by one
//! thread with `sigwait`, which passes each on to a callback. Blocked (not ignored)
//! signals do not carry over to a command canhazgpu starts: it is spawned with an
//! empty signal mask.

use nix::sys::signal::{SigSet, Signal};

use crate::error::{Error, Result};

/// Interrupt, quit, terminate, hang up. Job control (SIGTSTP/SIGCONT) keeps its
/// default action, so Ctrl-Z stops canhazgpu together with a command it runs.
pub const HANDLED: [Signal; 4] = [
    Signal::SIGINT,
    Signal::SIGQUIT,
    Signal::SIGTERM,
    Signal::SIGHUP,
];

/// The exit status a shell reports for a process that signal `signal` ended.
pub fn exit_status(signal: Signal) -> u8 {
    128u8.wrapping_add(signal as u8)
}

/// Blocks the handled signals in the calling thread (and so in every thread it starts
/// later), then starts the thread that receives them and calls `deliver` for each.
/// Must run before any other thread is started.
pub fn listen(deliver: impl Fn(Signal) + Send + 'static) -> Result<()> {
    let mut set = SigSet::empty();
    for signal in HANDLED {
        set.add(signal);
    }
    set.thread_block()
        .map_err(|e| Error::Runtime(format!("cannot block signals: {e}")))?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            while let Ok(signal) = set.wait() {
                deliver(signal);
            }
        })
        .map_err(|e| Error::Runtime(format!("cannot start the signal thread: {e}")))?;
    Ok(())
}
