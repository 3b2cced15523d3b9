//! Supervising the command of `canhazgpu run` from inside canhazgpu (see
//! docs/design.md, "run"). The command is an ordinary child in canhazgpu's own
//! process group, so the terminal treats the pair like any foreground job: Ctrl-C
//! and Ctrl-Z reach the command directly, and `fg` resumes both. canhazgpu waits
//! for it, passes on SIGTERM/SIGHUP, enforces `--timeout` on the whole process tree,
//! and reports how the command ended.

pub mod keeper;
pub mod proctree;
pub mod spawn;

use std::ffi::OsString;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid, waitpid};
use nix::unistd::Pid;

use self::spawn::{EnvChange, SpawnError};

use crate::error::{Error, Result, exit};
use crate::signals;
use crate::wait::Doorbell;

/// What the supervising loop waits for.
#[derive(Debug)]
pub enum Event {
    /// A signal to canhazgpu; `before_start` when it came before the command was
    /// spawned, so that the terminal's copy cannot have reached the command.
    Signal { signal: Signal, before_start: bool },
    /// The command has exited; it is not reaped yet, so its PID cannot be reused
    /// while a signal might still be sent to it.
    Exited,
}

/// How long the command may run, and how long it gets to stop after SIGINT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub timeout: Option<Duration>,
    pub kill_grace: Duration,
}

/// How the command ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// It exited by itself with this status.
    Exited(i32),
    /// A signal ended it (not one sent because of the timeout).
    Killed(Signal),
    /// `--timeout` expired; `killed` when SIGKILL was needed after the grace period.
    TimedOut { killed: bool },
}

impl Ending {
    /// The exit status of `canhazgpu run`: the command's own, 128+N when a signal
    /// ended it (as a shell reports it), 124 after a timeout (as `timeout(1)`).
    pub fn exit_code(self) -> u8 {
        match self {
            // Exit statuses are 0-255; the kernel keeps only the low byte.
            Ending::Exited(code) => code as u8,
            Ending::Killed(signal) => signals::exit_status(signal),
            Ending::TimedOut { .. } => exit::TIMEOUT,
        }
    }
}

/// Owns the signal thread and the event channel for the lifetime of one run.
pub struct Supervisor {
    sender: Sender<Event>,
    events: Receiver<Event>,
    started: Arc<AtomicBool>,
    /// Rung on every signal, so that a wait in the queue ends at once.
    doorbell: Doorbell,
}

impl Supervisor {
    /// Takes over SIGINT, SIGQUIT, SIGTERM and SIGHUP. Call it first, before the
    /// store is opened or any thread starts, so no signal is lost while allocating.
    pub fn start() -> Result<Self> {
        let (sender, events) = mpsc::channel();
        let started = Arc::new(AtomicBool::new(false));
        let doorbell = Doorbell::default();
        let deliver = std::sync::Mutex::new(sender.clone());
        let (before, bell) = (Arc::clone(&started), doorbell.clone());
        let early = std::sync::atomic::AtomicU32::new(0);
        // Until the command is spawned, a first signal is announced (the caller
        // cancels once the allocation is done), a second ends the process at once.
        // That way out leaves no stuck reservation behind: the reservation names this
        // process as its owner, and every canhazgpu on this host treats a reservation
        // whose owner is gone as free.
        signals::listen(move |signal| {
            let before_start = !before.load(Ordering::SeqCst);
            if before_start {
                if early.fetch_add(1, Ordering::SeqCst) == 0 {
                    eprintln!(
                        "canhazgpu: {signal} received; cancelling as soon as the allocation finishes (repeat it to quit at once)"
                    );
                } else {
                    std::process::exit(i32::from(signals::exit_status(signal)));
                }
            }
            if let Ok(deliver) = deliver.lock() {
                let _ = deliver.send(Event::Signal {
                    signal,
                    before_start,
                });
            }
            bell.ring();
        })?;
        Ok(Supervisor {
            sender,
            events,
            started,
            doorbell,
        })
    }

    /// Rung on every signal (see `wait::claim`).
    pub fn doorbell(&self) -> &Doorbell {
        &self.doorbell
    }

    /// The first signal that arrived before the command was started, if any.
    pub fn pending_signal(&self) -> Option<Signal> {
        self.events.try_iter().find_map(|event| match event {
            Event::Signal { signal, .. } => Some(signal),
            Event::Exited => None,
        })
    }

    /// Starts the command (see `spawn::spawn`). canhazgpu becomes a child subreaper
    /// first, so processes the command leaves behind stay below canhazgpu, where a
    /// timeout finds them.
    pub fn spawn(&self, argv: &[OsString], env: &[EnvChange]) -> Result<Pid, SpawnError> {
        // Best effort: without it a timeout still reaches every process that is
        // below the command when it expires.
        let _ = nix::sys::prctl::set_child_subreaper(true);
        let pid = spawn::spawn(argv, env)?;
        self.started.store(true, Ordering::SeqCst);
        Ok(pid)
    }

    /// Waits for the command to end, passing on signals and enforcing the timeout.
    pub fn supervise(&self, pid: Pid, limits: Limits) -> Result<Ending> {
        self.watch_exit(pid)?;
        let mut timeout_at = limits.timeout.map(|t| Instant::now() + t);
        let mut grace_until = None;
        let mut timed_out = false;
        let mut killed = false;
        loop {
            let event = match grace_until.or(timeout_at) {
                Some(at) => match self
                    .events
                    .recv_timeout(at.saturating_duration_since(Instant::now()))
                {
                    Ok(event) => Some(event),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => unreachable_channel(),
                },
                // `self` holds a sender, so the channel never disconnects.
                None => Some(self.events.recv().unwrap_or_else(|_| unreachable_channel())),
            };
            match event {
                Some(Event::Signal {
                    signal,
                    before_start,
                }) => pass_on(pid, signal, before_start),
                Some(Event::Exited) => {
                    let ending = reap(pid)?;
                    if !timed_out {
                        return Ok(ending);
                    }
                    if let Some(until) = grace_until {
                        killed |= stop_leftovers(until, limits.kill_grace);
                    }
                    return Ok(Ending::TimedOut { killed });
                }
                None if !timed_out && limits.kill_grace.is_zero() => {
                    // `--kill-grace 0`: no SIGINT first.
                    timed_out = true;
                    timeout_at = None;
                    killed = true;
                    let reached = kill_tree();
                    eprintln!(
                        "canhazgpu: timeout reached; sent SIGKILL to the command ({reached} process(es))"
                    );
                }
                None if !timed_out => {
                    timed_out = true;
                    timeout_at = None;
                    let reached = interrupt_tree();
                    eprintln!(
                        "canhazgpu: timeout reached; sent SIGINT to the command ({reached} process(es)), SIGKILL follows in {}s if it is still running",
                        limits.kill_grace.as_secs()
                    );
                    grace_until = Some(Instant::now() + limits.kill_grace);
                }
                None => {
                    grace_until = None;
                    killed = true;
                    let reached = kill_tree();
                    eprintln!(
                        "canhazgpu: still running after the {}s grace period; sent SIGKILL to {reached} process(es)",
                        limits.kill_grace.as_secs()
                    );
                }
            }
        }
    }

    /// Reports the command's exit on the event channel without reaping it.
    fn watch_exit(&self, pid: Pid) -> Result<()> {
        let sender = self.sender.clone();
        std::thread::Builder::new()
            .name("wait".into())
            .spawn(move || {
                let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT;
                // EINTR cannot happen (signals are blocked in this thread); any other
                // error means the child is gone, which the main thread then finds out.
                while waitid(Id::Pid(pid), flags) == Err(nix::errno::Errno::EINTR) {}
                let _ = sender.send(Event::Exited);
            })
            .map(drop)
            .map_err(|e| Error::Runtime(format!("cannot start the wait thread: {e}")))
    }
}

/// Collects the exit status of the command, which has exited.
fn reap(pid: Pid) -> Result<Ending> {
    loop {
        match waitpid(pid, None) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(Ending::Exited(code)),
            Ok(WaitStatus::Signaled(_, signal, _)) => return Ok(Ending::Killed(signal)),
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                return Err(Error::Runtime(format!(
                    "cannot collect the command's exit status: {e}"
                )));
            }
        }
    }
}

fn unreachable_channel() -> ! {
    panic!("the supervisor's event channel cannot disconnect while it holds a sender")
}

/// Passes a signal sent to canhazgpu on to the command. SIGINT and SIGQUIT from the
/// terminal already reached the command (it is in the foreground process group
/// with canhazgpu), so they are passed on only when canhazgpu is not in the
/// terminal's foreground, i.e. when someone sent them to canhazgpu alone, or when
/// they came before the command existed.
fn pass_on(pid: Pid, signal: Signal, before_start: bool) {
    let from_terminal = matches!(signal, Signal::SIGINT | Signal::SIGQUIT)
        && !before_start
        && proctree::in_terminal_foreground(std::process::id());
    if !from_terminal {
        let _ = kill(pid, signal);
    }
}

/// SIGINT, then SIGCONT so that stopped processes see it, to every process below
/// canhazgpu (the command, its children, and orphans it left behind).
fn interrupt_tree() -> usize {
    let me = std::process::id();
    let reached = proctree::signal_descendants(me, Signal::SIGINT);
    proctree::signal_descendants(me, Signal::SIGCONT);
    reached
}

/// SIGKILL to every process below canhazgpu, repeated while processes that were
/// forking meanwhile keep appearing.
fn kill_tree() -> usize {
    let me = std::process::id();
    let mut total = 0;
    for _ in 0..20 {
        let reached = proctree::signal_descendants(me, Signal::SIGKILL);
        if reached == 0 {
            break;
        }
        total += reached;
        std::thread::sleep(Duration::from_millis(5));
    }
    total
}

/// After a timeout the command itself has exited; processes it left behind get the
/// rest of the grace period, then SIGKILL. Returns whether SIGKILL was needed.
fn stop_leftovers(until: Instant, grace: Duration) -> bool {
    let me = std::process::id();
    while Instant::now() < until {
        if proctree::live_descendants(me).is_empty() {
            return false;
        }
        // Each look scans /proc; ten a second is prompt enough and costs little.
        std::thread::sleep(Duration::from_millis(100));
    }
    let reached = kill_tree();
    if reached > 0 {
        eprintln!(
            "canhazgpu: {reached} process(es) left by the command still running after the {}s grace period; sent SIGKILL",
            grace.as_secs()
        );
    }
    reached > 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_shell() {
        assert_eq!(Ending::Exited(0).exit_code(), 0);
        assert_eq!(Ending::Exited(255).exit_code(), 255);
        assert_eq!(Ending::Killed(Signal::SIGKILL).exit_code(), 137);
        assert_eq!(Ending::Killed(Signal::SIGINT).exit_code(), 130);
        assert_eq!(Ending::TimedOut { killed: false }.exit_code(), 124);
    }
}
