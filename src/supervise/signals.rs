//! Signal handling without handlers: the signals canhazgpu cares about are blocked in
//! every thread and collected by one thread with `sigwait`. Blocked (not ignored)
//! signals do not carry over to the command: the standard library clears the signal
//! mask of the child it spawns.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;

use nix::sys::signal::{SigSet, Signal};

use super::Event;
use crate::error::{Error, Result};

/// Interrupt, quit, terminate, hang up. Job control (SIGTSTP/SIGCONT) keeps its
/// default action, so Ctrl-Z stops canhazgpu together with the command.
pub const HANDLED: [Signal; 4] = [
    Signal::SIGINT,
    Signal::SIGQUIT,
    Signal::SIGTERM,
    Signal::SIGHUP,
];

fn handled_set() -> SigSet {
    let mut set = SigSet::empty();
    for signal in HANDLED {
        set.add(signal);
    }
    set
}

/// Blocks the handled signals in the calling thread (and so in every thread it
/// starts later), then starts the thread that receives them and passes each one on
/// as an `Event::Signal`. Must run before any other thread is started.
///
/// Until `started` becomes true the command has not been spawned yet: a first signal
/// is announced (the caller cancels once the allocation is done), a second ends the
/// process at once. That second way out leaves no stuck reservation behind: the
/// reservation names this process as its owner, and every canhazgpu on this host
/// treats a reservation whose owner is gone as free.
pub fn listen(deliver: Sender<Event>, started: Arc<AtomicBool>) -> Result<()> {
    let set = handled_set();
    set.thread_block()
        .map_err(|e| Error::Runtime(format!("cannot block signals: {e}")))?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut early = 0u32;
            while let Ok(signal) = set.wait() {
                let before_start = !started.load(Ordering::SeqCst);
                if before_start {
                    early += 1;
                    if early == 1 {
                        eprintln!(
                            "canhazgpu: {signal} received; cancelling as soon as the allocation finishes (repeat it to quit at once)"
                        );
                    } else {
                        std::process::exit(128 + signal as i32);
                    }
                }
                let event = Event::Signal {
                    signal,
                    before_start,
                };
                if deliver.send(event).is_err() {
                    break;
                }
            }
        })
        .map_err(|e| Error::Runtime(format!("cannot start the signal thread: {e}")))?;
    Ok(())
}
