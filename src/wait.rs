//! Waiting for GPUs (`--wait`): join the queue, then take turns until the request is
//! served, the wait limit passes, or a signal ends it. Progress goes to stderr only,
//! so stdout stays clean for `$(canhazgpu reserve --short)`.
//!
//! A waiter costs next to nothing while nothing concerns it. It sleeps until its
//! doorbell rings (a signal, or the store saying its entry changed: it was given
//! GPUs, or GPUs were freed while it is the head of the queue) or its next refresh is
//! due. Every 5 s it refreshes its entry with `Store::queue_beat`, which reads no
//! queue and wakes nobody. Only the head of the queue takes periodic full turns,
//! which hand free GPUs to every waiter; a waiter behind a head that looks dead takes
//! one too, to drop it. A full turn reads the GPUs' real usage only when some GPU is
//! not held by a live reservation.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::duration::format_duration;
use crate::error::{Error, Result};
use crate::gpu::procinfo;
use crate::gpu_status;
use crate::output::id_list;
use crate::queue::{QueueEntry, WAITER_HEARTBEAT_SECS};
use crate::session::{Session, now};
use crate::state::{GpuSlot, Liveness, Selection, UnixTime};
use crate::store::{NewReservation, QueueStep, QueueTick};

pub use crate::config::WaitPolicy;

/// Wakes a sleeping waiter; rung by the signal thread and by the store's wake-ups.
#[derive(Clone, Default)]
pub struct Doorbell(Arc<(Mutex<bool>, Condvar)>);

impl Doorbell {
    pub fn ring(&self) {
        let (rung, bell) = &*self.0;
        if let Ok(mut rung) = rung.lock() {
            *rung = true;
            bell.notify_all();
        }
    }

    /// Sleeps until rung or until `timeout` passed; says whether it was rung (and
    /// silences it).
    pub fn sleep(&self, timeout: Duration) -> bool {
        let (rung, bell) = &*self.0;
        let Ok(guard) = rung.lock() else {
            std::thread::sleep(timeout);
            return false;
        };
        match bell.wait_timeout_while(guard, timeout, |rung| !*rung) {
            Ok((mut rung, _)) => std::mem::take(&mut *rung),
            Err(_) => false,
        }
    }
}

/// Claims GPUs like `Session::claim`; with a waiting policy, joins the queue when
/// they are not available yet and waits. `interrupted` is asked for a signal that
/// ends the wait whenever `doorbell` rings. On any failure while queued the request
/// leaves the queue and releases what it collected.
pub fn claim(
    session: &mut Session,
    reservation: NewReservation,
    selection: Selection,
    policy: WaitPolicy,
    interrupted: &mut dyn FnMut() -> Option<Signal>,
    doorbell: &Doorbell,
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
    let request = session.alloc_request(reservation, selection, false)?;
    let (position, collected) = match session.store.join_queue(&request, &waiter)? {
        QueueStep::Served(gpus) => return Ok(gpus),
        QueueStep::Waiting {
            position,
            collected,
        } => (position, collected),
    };
    let mut progress = Progress::new(wanted);
    progress.show(position, &collected);
    let mut waiting = Waiting {
        entry_id: &entry_id,
        deadline: limit.map(|limit| started + limit),
        started,
        head: position == 1,
    };
    let outcome = waiting.wait(session, interrupted, doorbell, &mut progress);
    session.store.stop_watching();
    if let Ok(gpus) = &outcome {
        // Served after waiting: the user may have walked away from this terminal.
        let event = crate::notify::Event {
            event: "queue_served",
            host: session.pool_host().to_string(),
            user: session.user.clone(),
            gpus: gpus.clone(),
            text: format!(
                "your queued request was served: GPU(s) {} on {}",
                crate::output::id_list(gpus),
                session.pool_host()
            ),
        };
        session.notify(vec![event]);
    }
    outcome.map_err(|failure| leave(session, &entry_id, failure, &progress))
}

/// A request waiting in the queue.
struct Waiting<'a> {
    entry_id: &'a str,
    started: Instant,
    deadline: Option<Instant>,
    /// Whether the entry was first in the queue when last seen.
    head: bool,
}

impl Waiting<'_> {
    fn wait(
        &mut self,
        session: &mut Session,
        interrupted: &mut dyn FnMut() -> Option<Signal>,
        doorbell: &Doorbell,
        progress: &mut Progress,
    ) -> Result<Vec<u32>> {
        let bell = doorbell.clone();
        if let Err(e) = session
            .store
            .watch_entry(self.entry_id, Arc::new(move || bell.ring()))
        {
            // Wake-ups are hints: without them the periodic refreshes still serve.
            eprintln!("warning: {e}; checking the queue every {WAITER_HEARTBEAT_SECS}s instead");
        }
        let period = Duration::from_secs(WAITER_HEARTBEAT_SECS as u64);
        // A turn at once covers any change between joining and watching.
        let mut full_turn_due = true;
        let mut next_turn = Instant::now() + period;
        let mut next_beat = Instant::now() + period;
        loop {
            if let Some(signal) = interrupted() {
                return Err(Error::Interrupted {
                    signal,
                    message: format!("interrupted by {signal} while waiting for GPUs"),
                });
            }
            if self
                .deadline
                .is_some_and(|deadline| Instant::now() >= deadline)
            {
                return Err(Error::WaitTimeout(format!(
                    "timed out after {} waiting for GPUs",
                    format_duration(self.started.elapsed().as_secs() as i64)
                )));
            }
            if full_turn_due || (self.head && Instant::now() >= next_turn) {
                full_turn_due = false;
                let (step, next_change) = turn(session, self.entry_id)?;
                match step {
                    QueueStep::Served(gpus) => return Ok(gpus),
                    QueueStep::Waiting {
                        position,
                        collected,
                    } => {
                        self.head = position == 1;
                        progress.show(position, &collected);
                    }
                }
                next_turn = Instant::now() + period;
                if let Some(in_secs) = next_change {
                    next_turn = next_turn.min(Instant::now() + Duration::from_secs(in_secs));
                }
                next_beat = Instant::now() + period;
            } else if Instant::now() >= next_beat {
                let beat = session.store.queue_beat(self.entry_id, now())?;
                self.head = beat.position == 1;
                progress.show(beat.position, &progress.collected.clone());
                // A dead head drives nothing: the turn that drops it falls to us.
                full_turn_due = beat
                    .head
                    .is_some_and(|head| head.id != self.entry_id && looks_dead(&head, session));
                next_beat = Instant::now() + period;
            }
            let mut wake_at = next_beat;
            if self.head {
                wake_at = wake_at.min(next_turn);
            }
            if let Some(deadline) = self.deadline {
                wake_at = wake_at.min(deadline);
            }
            let timeout = wake_at.saturating_duration_since(Instant::now());
            if doorbell.sleep(timeout.max(Duration::from_millis(1))) {
                full_turn_due = true;
            }
        }
    }
}

/// Whether the entry's waiter is gone: its process on this host has exited, or it
/// has not refreshed the entry in time.
fn looks_dead(entry: &QueueEntry, session: &Session) -> bool {
    let gone_here = entry.waiter.as_ref().is_some_and(|waiter| {
        waiter.host == session.host && !procinfo::process_alive(waiter.pid, waiter.pid_start)
    });
    gone_here || !entry.is_alive(now(), &[])
}

/// One full turn of the waiter. Also returns in how many seconds a reservation ends
/// by itself (expires or goes stale), when one does: nobody announces that.
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

/// Signals that end a wait cleanly (leaving the queue) instead of the process: for
/// `reserve --wait`, which has no supervisor of its own.
pub struct WaitSignals {
    pending: Arc<Mutex<Option<Signal>>>,
    doorbell: Doorbell,
}

impl WaitSignals {
    /// Call before any other thread starts: threads inherit the signal mask.
    pub fn install() -> Result<Self> {
        let pending = Arc::new(Mutex::new(None));
        let doorbell = Doorbell::default();
        let (first, bell) = (Arc::clone(&pending), doorbell.clone());
        crate::signals::listen(move |signal| {
            if let Ok(mut first) = first.lock() {
                first.get_or_insert(signal);
            }
            bell.ring();
        })?;
        Ok(WaitSignals { pending, doorbell })
    }

    /// The first signal that arrived, if any.
    pub fn pending(&self) -> Option<Signal> {
        self.pending.lock().ok().and_then(|first| *first)
    }

    pub fn doorbell(&self) -> &Doorbell {
        &self.doorbell
    }
}
