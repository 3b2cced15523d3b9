//! Keeps a run reservation alive while its command runs: a heartbeat every
//! `interval`, and the release when the command ends. A store problem never touches
//! the command: the keeper warns once, retries with backoff, and re-asserts the
//! reservation when the store answers again.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::output::id_list;
use crate::session::now;
use crate::state::{Pool, UnixTime};
use crate::store::{self, NewReservation, ReassertRequest, ReleaseScope, Released, Store};

/// The longest interval that still leaves room for a missed heartbeat or two.
pub const MAX_INTERVAL: Duration = Duration::from_secs(30);
/// First retry delay after a failed heartbeat; it doubles up to `interval`.
const FIRST_RETRY: Duration = Duration::from_secs(1);
/// Delays between the attempts to release at the end when the store does not answer.
const RELEASE_RETRIES: [Duration; 3] = [
    Duration::ZERO,
    Duration::from_millis(250),
    Duration::from_secs(1),
];

/// The reservation a keeper looks after, with what it takes to write it again.
#[derive(Clone, Debug)]
pub struct Kept {
    pub reservation: NewReservation,
    pub start_time: UnixTime,
    pub pool: Pool,
    pub gpus: Vec<u32>,
    pub interval: Duration,
}

/// The handle of the keeper thread.
pub struct Keeper {
    finish: Sender<Sender<Result<Released>>>,
    thread: JoinHandle<()>,
}

impl Keeper {
    /// Starts heartbeats for `kept`, using `store` (reopened from `config` after a
    /// failure).
    pub fn start(store: Box<dyn Store>, config: Config, kept: Kept) -> Result<Keeper> {
        let (finish, requests) = mpsc::channel();
        let state = KeeperState {
            store: Some(store),
            config,
            held: kept.gpus.clone(),
            kept,
            outage: None,
        };
        let thread = std::thread::Builder::new()
            .name("heartbeat".into())
            .spawn(move || state.run(requests))
            .map_err(|e| Error::Runtime(format!("cannot start the heartbeat thread: {e}")))?;
        Ok(Keeper { finish, thread })
    }

    /// Stops the heartbeats and ends the reservation (recording its history).
    /// Returns the GPUs freed.
    pub fn finish(self) -> Result<Released> {
        let (reply, answer) = mpsc::channel();
        let result = match self.finish.send(reply) {
            Ok(()) => answer.recv().unwrap_or_else(|_| Err(keeper_gone())),
            Err(_) => Err(keeper_gone()),
        };
        let _ = self.thread.join();
        result
    }
}

/// The IDs of `all` that are not in `removed`.
fn without(all: &[u32], removed: &[u32]) -> Vec<u32> {
    all.iter()
        .copied()
        .filter(|id| !removed.contains(id))
        .collect()
}

fn keeper_gone() -> Error {
    Error::Runtime("the heartbeat thread ended unexpectedly".into())
}

/// Why the reservation is written again.
#[derive(Clone, Copy)]
enum Reassert {
    /// The store answers again after a failure; it may have lost data meanwhile.
    AfterOutage,
    /// The store followed a failover to a replica that may have missed the last writes.
    AfterFailover,
}

/// A period during which the store did not answer.
struct Outage {
    next_retry: Duration,
}

struct KeeperState {
    /// `None` after a failure: the next attempt opens a fresh connection.
    store: Option<Box<dyn Store>>,
    config: Config,
    kept: Kept,
    /// The GPUs the reservation still holds, as far as the keeper knows.
    held: Vec<u32>,
    outage: Option<Outage>,
}

impl KeeperState {
    fn run(mut self, requests: Receiver<Sender<Result<Released>>>) {
        loop {
            let wait = self
                .outage
                .as_ref()
                .map_or(self.kept.interval, |o| o.next_retry);
            match requests.recv_timeout(wait) {
                Err(RecvTimeoutError::Timeout) => self.beat(),
                Ok(reply) => {
                    let _ = reply.send(self.release());
                    return;
                }
                // The handle was dropped without `finish`: still end the reservation.
                Err(RecvTimeoutError::Disconnected) => {
                    let _ = self.release();
                    return;
                }
            }
        }
    }

    fn store(&mut self) -> Result<&mut Box<dyn Store>> {
        if self.store.is_none() {
            self.store = Some(store::open(&self.config)?);
        }
        Ok(self.store.as_mut().expect("just opened"))
    }

    /// One heartbeat; during an outage, a re-assertion instead, which also puts
    /// back what the store lost meanwhile.
    fn beat(&mut self) {
        if self.held.is_empty() {
            return;
        }
        let result = if self.outage.is_some() {
            self.reassert(Reassert::AfterOutage)
        } else {
            let id = self.kept.reservation.id.clone();
            let held = self.held.clone();
            self.store()
                .and_then(|store| {
                    let still_held = store.heartbeat(&id, &held, now())?;
                    Ok((still_held, store.followed_failover()))
                })
                .and_then(|(still_held, failed_over)| match failed_over {
                    // A promoted replica may have missed the reservation: put it back
                    // rather than take its absence for a release.
                    true => self.reassert(Reassert::AfterFailover),
                    false => {
                        self.confirmed(still_held);
                        Ok(())
                    }
                })
        };
        if let Err(e) = result {
            self.failed(&e);
        }
    }

    /// Between two heartbeats only a release can end the reservation on a GPU.
    fn confirmed(&mut self, still_held: Vec<u32>) {
        let lost = without(&self.held, &still_held);
        if !lost.is_empty() {
            eprintln!(
                "canhazgpu: the reservation of GPU(s) {} was released from outside (canhazgpu release); the command keeps running",
                id_list(&lost)
            );
        }
        self.held = still_held;
    }

    fn reassert(&mut self, after: Reassert) -> Result<()> {
        let request = ReassertRequest {
            pool: self.kept.pool,
            reservation: self.kept.reservation.clone(),
            start_time: self.kept.start_time,
            gpus: self.held.clone(),
            now: now(),
        };
        let outcome = self.store()?.reassert(&request)?;
        self.outage = None;
        let (event, meanwhile) = match after {
            Reassert::AfterOutage => ("the store answers again", "while the store was unreachable"),
            Reassert::AfterFailover => (
                "the store moved to a new Redis master",
                "on the new Redis master",
            ),
        };
        if !outcome.held.is_empty() {
            eprintln!(
                "canhazgpu: {event}; reservation of GPU(s) {} re-asserted",
                id_list(&outcome.held)
            );
        }
        for (gpu, holder) in &outcome.taken {
            eprintln!(
                "canhazgpu: WARNING: GPU {gpu} was taken by {holder} {meanwhile}; this command is still running on it"
            );
        }
        let taken: Vec<u32> = outcome.taken.iter().map(|(gpu, _)| *gpu).collect();
        let gone = without(&without(&self.held, &outcome.held), &taken);
        if !gone.is_empty() {
            eprintln!(
                "canhazgpu: warning: GPU(s) {} are no longer in the pool; the command keeps running on them",
                id_list(&gone)
            );
        }
        self.held = outcome.held;
        Ok(())
    }

    fn failed(&mut self, error: &Error) {
        self.store = None;
        let interval = self.kept.interval;
        match &mut self.outage {
            Some(outage) => outage.next_retry = (outage.next_retry * 2).min(interval),
            None => {
                eprintln!(
                    "canhazgpu: warning: cannot reach the store ({error}); the command keeps running, retrying"
                );
                self.outage = Some(Outage {
                    next_retry: FIRST_RETRY.min(interval),
                });
            }
        }
    }

    /// Ends the reservation, retrying briefly when the store does not answer (once
    /// only if it has not been answering already, so the user is not kept waiting).
    fn release(&mut self) -> Result<Released> {
        let scope = ReleaseScope::Reservation {
            id: self.kept.reservation.id.clone(),
        };
        let attempts = if self.outage.is_some() {
            &RELEASE_RETRIES[..1]
        } else {
            &RELEASE_RETRIES[..]
        };
        let mut last_error = keeper_gone();
        for &delay in attempts {
            std::thread::sleep(delay);
            match self.store().and_then(|store| store.release(&scope, now())) {
                Ok(released) => return Ok(released),
                Err(e) => {
                    self.store = None;
                    last_error = e;
                }
            }
        }
        Err(last_error)
    }
}
