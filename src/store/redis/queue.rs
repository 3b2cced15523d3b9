//! The wait queue in the Redis store: the JSON of queue entries, the replies of the
//! queue scripts (`lua/queue*.lua`), and the pub/sub subscription that wakes waiters.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::Duration;

use redis::Client;
use serde::{Deserialize, Serialize};

use super::{CONNECT_TIMEOUT, connect_error, one_line, to_json};
use crate::error::{Error, Result};
use crate::queue::QueueEntry;
use crate::state::{ReservationKind, RunOwner, Selection, UnixTime};
use crate::store::{QueueStep, QueueTick};

/// The channel the scripts publish on when something may help a waiter.
const WAKE_CHANNEL: &str = "canhazgpu:queue:wake";

/// How long the subscriber blocks before it checks whether it is still wanted.
const SUBSCRIBER_POLL: Duration = Duration::from_millis(250);

/// A queue entry as stored in `canhazgpu:queue:entry:<id>`: upstream's fields (times
/// as integer Unix seconds) plus the waiter and run owner. The length of a manual
/// reservation is `duration_seconds`; `allocated_gpus` is kept for upstream readers.
#[derive(Serialize)]
struct StoredEntry<'a> {
    id: &'a str,
    user: &'a str,
    actual_user: &'a str,
    requested_count: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    requested_ids: Option<&'a [u32]>,
    allocated_gpus: &'a [u32],
    reservation_type: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    duration_seconds: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    note: Option<&'a str>,
    enqueue_time: UnixTime,
    last_heartbeat: UnixTime,
    #[serde(skip_serializing_if = "Option::is_none")]
    host: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pid_start_time: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    waiter_host: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    waiter_pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    waiter_pid_start_time: Option<u64>,
}

pub(super) fn entry_json(entry: &QueueEntry) -> Result<String> {
    let owner = entry.owner.as_ref();
    let waiter = entry.waiter.as_ref();
    to_json(&StoredEntry {
        id: &entry.id,
        user: &entry.user,
        actual_user: &entry.actual_user,
        requested_count: entry.selection.len(),
        requested_ids: match &entry.selection {
            Selection::Ids(ids) => Some(ids),
            Selection::Count(_) => None,
        },
        allocated_gpus: &entry.collected,
        reservation_type: entry.kind.as_str(),
        duration_seconds: entry.duration,
        note: entry.note.as_deref().filter(|note| !note.is_empty()),
        enqueue_time: entry.enqueue_time,
        last_heartbeat: entry.last_heartbeat,
        host: owner.map(|owner| owner.host.as_str()),
        pid: owner.map(|owner| owner.pid),
        pid_start_time: owner.map(|owner| owner.pid_start),
        waiter_host: waiter.map(|waiter| waiter.host.as_str()),
        waiter_pid: waiter.map(|waiter| waiter.pid),
        waiter_pid_start_time: waiter.map(|waiter| waiter.pid_start),
    })
}

/// An entry as `read_entry` in `lua/queue.lua` normalizes it (`queue_list.lua`).
#[derive(Deserialize)]
struct NormalizedEntry {
    id: String,
    user: String,
    actual_user: String,
    #[serde(rename = "type")]
    kind: ReservationKind,
    count: u32,
    ids: Option<Vec<u32>>,
    duration: Option<i64>,
    note: Option<String>,
    host: Option<String>,
    pid: Option<u32>,
    pid_start_time: Option<u64>,
    waiter: bool,
    waiter_host: Option<String>,
    waiter_pid: Option<u32>,
    waiter_pid_start_time: Option<u64>,
    enqueue_time: UnixTime,
    last_heartbeat: UnixTime,
    /// `0,3`
    collected: String,
}

pub(super) fn decode_entry(json: &str) -> Result<QueueEntry> {
    let entry: NormalizedEntry = serde_json::from_str(json)
        .map_err(|err| Error::store("unexpected queue entry from Redis", err))?;
    let collected = entry
        .collected
        .split(',')
        .filter(|id| !id.is_empty())
        .map(|id| id.parse())
        .collect::<std::result::Result<_, _>>()
        .map_err(|err| Error::store("unexpected queue entry from Redis", err))?;
    let process = |host: Option<String>, pid: Option<u32>, start: Option<u64>| {
        Some(RunOwner {
            host: host?,
            pid: pid?,
            pid_start: start?,
        })
    };
    Ok(QueueEntry {
        selection: match entry.ids {
            Some(ids) => Selection::Ids(ids),
            None => Selection::Count(entry.count),
        },
        owner: process(entry.host, entry.pid, entry.pid_start_time),
        waiter: if entry.waiter {
            process(
                entry.waiter_host,
                entry.waiter_pid,
                entry.waiter_pid_start_time,
            )
        } else {
            None
        },
        id: entry.id,
        user: entry.user,
        actual_user: entry.actual_user,
        kind: entry.kind,
        duration: entry.duration,
        note: entry.note,
        enqueue_time: entry.enqueue_time,
        last_heartbeat: entry.last_heartbeat,
        collected,
    })
}

/// The arguments of `queue_step.lua`.
pub(super) fn step_args(tick: &QueueTick, history_retention: i64) -> Result<String> {
    #[derive(Serialize)]
    struct StepArgs<'a> {
        now: UnixTime,
        id: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        unreserved: Option<&'a [u32]>,
        dead_ids: &'a [String],
        history_retention: i64,
    }
    to_json(&StepArgs {
        now: tick.now,
        id: &tick.entry_id,
        unreserved: tick.unreserved.as_deref(),
        dead_ids: &tick.dead_ids,
        history_retention,
    })
}

/// `{1, ids...}` (served) or `{0, position, collected...}` (waiting).
pub(super) fn decode_step(reply: &[i64]) -> Result<QueueStep> {
    let ids = |list: &[i64]| -> Result<Vec<u32>> {
        list.iter()
            .map(|id| u32::try_from(*id).map_err(|_| unexpected_step(reply)))
            .collect()
    };
    match reply {
        [1, served @ ..] => Ok(QueueStep::Served(ids(served)?)),
        [0, position, collected @ ..] => Ok(QueueStep::Waiting {
            position: u32::try_from(*position).map_err(|_| unexpected_step(reply))?,
            collected: ids(collected)?,
        }),
        _ => Err(unexpected_step(reply)),
    }
}

fn unexpected_step(reply: &[i64]) -> Error {
    Error::Store(format!("unexpected reply from a queue script: {reply:?}"))
}

/// A subscription to the wake-up channel, on its own connection and thread (a
/// subscribed connection can do nothing else). Dropping it ends the thread.
pub(super) struct Watch {
    wakes: Receiver<()>,
    stop: Arc<AtomicBool>,
}

impl Watch {
    /// Subscribes, and returns once the subscription is in place, so no wake-up
    /// published afterwards is missed.
    pub(super) fn start(client: &Client, location: &str) -> Result<Watch> {
        let (wake, wakes) = mpsc::channel();
        let (ready, subscribed) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let client = client.clone();
        let location = location.to_string();
        std::thread::Builder::new()
            .name("queue-wake".into())
            .spawn(move || {
                let mut ready = Some(ready);
                while !stopped.load(Ordering::Relaxed) {
                    let outcome = subscribe(&client, &location, &mut ready, &stopped, &wake);
                    match (outcome, ready.take()) {
                        // Failed before subscribing: the waiter hears why.
                        (Err(err), Some(ready)) => {
                            let _ = ready.send(Err(err));
                            return;
                        }
                        // Lost later: wake the waiter (its turn tells whether Redis is
                        // back) and subscribe again.
                        (Err(_), None) => {
                            if wake.send(()).is_err() {
                                return;
                            }
                            std::thread::sleep(SUBSCRIBER_POLL);
                        }
                        (Ok(()), _) => return,
                    }
                }
            })
            .map_err(|err| Error::Runtime(format!("cannot start the queue thread: {err}")))?;
        subscribed
            .recv()
            .unwrap_or_else(|_| Err(Error::Runtime("the queue thread ended".into())))?;
        Ok(Watch { wakes, stop })
    }

    /// Waits up to `timeout` for a wake-up; extra ones are folded into this one.
    pub(super) fn wait(&self, timeout: Duration) -> bool {
        let woken = match self.wakes.recv_timeout(timeout) {
            Ok(()) => true,
            Err(RecvTimeoutError::Timeout) => false,
            // The thread is gone; a turn now tells the waiter what happened.
            Err(RecvTimeoutError::Disconnected) => true,
        };
        while self.wakes.try_recv().is_ok() {}
        woken
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Subscribes on a new connection and forwards messages until stopped (`Ok`) or the
/// connection fails (`Err`). Reports the subscription through `ready` once.
fn subscribe(
    client: &Client,
    location: &str,
    ready: &mut Option<mpsc::Sender<Result<()>>>,
    stop: &AtomicBool,
    wake: &mpsc::Sender<()>,
) -> Result<()> {
    let failed = |err: redis::RedisError| {
        Error::Store(format!("Redis at {location} failed: {}", one_line(&err)))
    };
    let mut connection = client
        .get_connection_with_timeout(CONNECT_TIMEOUT)
        .map_err(|err| connect_error(location, err))?;
    connection
        .set_read_timeout(Some(SUBSCRIBER_POLL))
        .map_err(failed)?;
    let mut pubsub = connection.as_pubsub();
    pubsub.subscribe(WAKE_CHANNEL).map_err(failed)?;
    if let Some(ready) = ready.take() {
        let _ = ready.send(Ok(()));
    }
    while !stop.load(Ordering::Relaxed) {
        match pubsub.get_message() {
            Ok(_) => {
                if wake.send(()).is_err() {
                    return Ok(());
                }
            }
            Err(err) if err.is_timeout() => {}
            Err(err) => return Err(failed(err)),
        }
    }
    Ok(())
}
