//! Waiting for GPUs (`--wait`): join the queue, then take turns whenever something
//! changed until the request is served, the wait limit passes, or a signal ends it.
//! Progress goes to stderr only, so stdout stays clean for `$(canhazgpu reserve --short)`.
//!
//! A turn needs the GPUs' real usage only when some GPU is not held by a live
//! reservation (it may be handed out); otherwise the provider is not queried.

use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use crate::commands::id_list;
use crate::duration::format_duration;
use crate::error::{Error, Result};
use crate::gpu_status;
use crate::queue::WAITER_HEARTBEAT_SECS;
use crate::session::{Session, now};
use crate::state::{GpuSlot, Liveness, Selection, UnixTime};
use crate::store::{NewReservation, QueueStep, QueueTick};

/// What to do when the GPUs are not available yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitPolicy {
    /// Fail at once with the reason (the default).
    FailAtOnce,
    /// Wait in the queue for as long as it takes.
    Forever,
    /// Wait in the queue, giving up after this long.
    Limit(Duration),
}

/// How often a waiter checks for signals and wake-ups.
const TICK: Duration = Duration::from_millis(100);

/// Claims GPUs like `Session::claim`; with a waiting policy, joins the queue when
/// they are not available yet and waits. `interrupted` is asked for a signal that
/// ends the wait every tick. On any failure while queued the request leaves the
/// queue and releases what it collected.
pub fn claim(
    session: &mut Session,
    reservation: NewReservation,
    selection: Selection,
    policy: WaitPolicy,
    interrupted: &mut dyn FnMut() -> Option<Signal>,
) -> Result<Vec<u32>> {
    let limit = match policy {
        WaitPolicy::FailAtOnce => return session.claim(reservation, selection),
        WaitPolicy::Forever => None,
        WaitPolicy::Limit(limit) => Some(limit),
    };
    let started = Instant::now();
    let entry_id = reservation.id.clone();
    let wanted = selection.len();
    let waiter = session.this_process()?;
    let request = session.alloc_request(reservation, selection)?;
    let (position, collected) = match session.store.join_queue(&request, &waiter)? {
        QueueStep::Served(gpus) => return Ok(gpus),
        QueueStep::Waiting {
            position,
            collected,
        } => (position, collected),
    };
    let mut progress = Progress::new(wanted);
    progress.show(position, &collected);
    let outcome = wait_in_queue(
        session,
        &entry_id,
        started,
        limit,
        interrupted,
        &mut progress,
    );
    session.store.stop_watching();
    outcome.map_err(|failure| leave(session, &entry_id, failure, &progress))
}

fn wait_in_queue(
    session: &mut Session,
    entry_id: &str,
    started: Instant,
    limit: Option<Duration>,
    interrupted: &mut dyn FnMut() -> Option<Signal>,
    progress: &mut Progress,
) -> Result<Vec<u32>> {
    session.store.watch_changes()?;
    let deadline = limit.map(|limit| started + limit);
    // A turn at once covers any change between joining and subscribing.
    let mut next_turn = Instant::now();
    let mut woken = false;
    loop {
        if let Some(signal) = interrupted() {
            return Err(Error::Interrupted {
                signal: signal as i32,
                message: format!("interrupted by {signal} while waiting for GPUs"),
            });
        }
        if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
            return Err(Error::WaitTimeout(format!(
                "timed out after {} waiting for GPUs",
                format_duration(started.elapsed().as_secs() as i64)
            )));
        }
        if woken || Instant::now() >= next_turn {
            let (step, next_change) = turn(session, entry_id)?;
            match step {
                QueueStep::Served(gpus) => return Ok(gpus),
                QueueStep::Waiting {
                    position,
                    collected,
                } => progress.show(position, &collected),
            }
            next_turn = Instant::now() + Duration::from_secs(WAITER_HEARTBEAT_SECS as u64);
            if let Some(in_secs) = next_change {
                next_turn = next_turn.min(Instant::now() + Duration::from_secs(in_secs));
            }
        }
        let mut timeout = TICK.min(next_turn.saturating_duration_since(Instant::now()));
        if let Some(deadline) = deadline {
            timeout = timeout.min(deadline.saturating_duration_since(Instant::now()));
        }
        woken = session
            .store
            .wait_for_change(timeout.max(Duration::from_millis(1)))?;
    }
}

/// One turn of the waiter. Also returns in how many seconds a reservation ends by
/// itself (expires or goes stale), when one does: nobody announces that.
fn turn(session: &mut Session, entry_id: &str) -> Result<(QueueStep, Option<u64>)> {
    let (slots, _, dead_ids) = session.read_state()?;
    let now = now();
    let mut next_change: Option<UnixTime> = None;
    let mut any_free = false;
    for slot in &slots {
        match slot {
            GpuSlot::Held(reservation) => match reservation.liveness(now, &dead_ids) {
                Liveness::Active => {
                    if let Some(at) = reservation.ends_at() {
                        next_change = Some(next_change.map_or(at, |next| next.min(at)));
                    }
                }
                _ => any_free = true,
            },
            GpuSlot::Free { .. } => any_free = true,
            GpuSlot::Corrupt(_) => {}
        }
    }
    let unreserved = if any_free {
        match gpu_status::snapshot(session.provider.as_ref()) {
            Ok(usage) => Some(gpu_status::unreserved_gpus(
                &slots,
                &usage,
                session.config.memory_threshold_mb,
                &dead_ids,
                now,
            )),
            // No GPU is handed out blind; the next turn tries again.
            Err(e) => {
                eprintln!("warning: could not check GPU usage while waiting: {e}");
                None
            }
        }
    } else {
        None
    };
    let step = session.store.queue_step(&QueueTick {
        entry_id: entry_id.to_string(),
        unreserved,
        dead_ids,
        now,
    })?;
    Ok((step, next_change.map(|at| (at - now).max(1) as u64)))
}

/// Leaves the queue after `failure`, releasing what was collected; the error says so.
fn leave(session: &mut Session, entry_id: &str, failure: Error, progress: &Progress) -> Error {
    let left = session.store.leave_queue(entry_id, now());
    let mut message = failure.to_string();
    if let Some(position) = progress.position {
        message.push_str(&format!(" (queue position: {position})"));
    }
    match left {
        Ok(freed) if freed.is_empty() => message.push_str("; left the queue"),
        Ok(freed) => message.push_str(&format!(
            "; left the queue and released the collected GPU(s) {}",
            id_list(&freed)
        )),
        Err(e) => message.push_str(&format!(
            "; could not leave the queue ({e}): others drop the entry within {}s",
            crate::queue::WAITER_STALE_AFTER_SECS
        )),
    }
    match failure {
        Error::Interrupted { signal, .. } => Error::Interrupted { signal, message },
        Error::WaitTimeout(_) => Error::WaitTimeout(message),
        Error::Runtime(_) => Error::Runtime(message),
        other => other,
    }
}

/// The progress lines on stderr; a line only when something changed.
struct Progress {
    wanted: u32,
    position: Option<u32>,
    collected: Vec<u32>,
}

impl Progress {
    fn new(wanted: u32) -> Self {
        Progress {
            wanted,
            position: None,
            collected: Vec::new(),
        }
    }

    fn show(&mut self, position: u32, collected: &[u32]) {
        if self.position == Some(position) && self.collected == collected {
            return;
        }
        self.position = Some(position);
        self.collected = collected.to_vec();
        if collected.is_empty() {
            eprintln!("Waiting for GPUs... (queue position: {position})");
        } else {
            eprintln!(
                "Waiting for GPUs... (queue position: {position}, collected {}/{}: {})",
                collected.len(),
                self.wanted,
                id_list(collected)
            );
        }
    }
}

/// Takes SIGINT, SIGTERM and SIGHUP while it lives, so that they end a wait cleanly
/// instead of the process: they are blocked and read from a signalfd. Dropping it
/// restores the previous mask; a signal that arrived meanwhile and was not read then
/// takes its default action.
pub struct SignalGuard {
    signals: SignalFd,
    previous: SigSet,
}

impl SignalGuard {
    /// Call before any other thread starts: threads inherit the mask.
    pub fn install() -> Result<Self> {
        let mut mask = SigSet::empty();
        for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
            mask.add(signal);
        }
        let failed = |e: nix::Error| Error::Runtime(format!("cannot take over signals: {e}"));
        let previous = mask
            .thread_swap_mask(SigmaskHow::SIG_BLOCK)
            .map_err(failed)?;
        let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
            .map_err(|e| {
            let _ = previous.thread_set_mask();
            failed(e)
        })?;
        Ok(SignalGuard { signals, previous })
    }

    /// A signal that arrived since the last call, if any.
    pub fn pending(&mut self) -> Option<Signal> {
        let info = self.signals.read_signal().ok()??;
        Signal::try_from(info.ssi_signo as i32).ok()
    }
}

impl Drop for SignalGuard {
    fn drop(&mut self) {
        let _ = self.previous.thread_set_mask();
    }
}
