//! The wait queue in the SQLite store: one `queue` row per waiting request, ordered by
//! `seq`; the GPUs an entry collected are the `gpus` rows whose `queue_id` names it.
//! Every function runs inside the caller's `BEGIN IMMEDIATE` transaction and follows
//! `crate::queue` (which free GPU goes to which waiter) and `alloc::plan`.

use std::collections::HashMap;

use rusqlite::{Connection, Row, params};

use super::{
    Fault, Outcome, claim_gpu, end_reservation, free_gpu, prune_history, read_slots, require_pool,
    touch_last_used, user_last_used,
};
use crate::alloc::{self, PlanInput};
use crate::error::{Error, Result};
use crate::queue::{self, DistributionInput, QueueEntry};
use crate::state::{GpuSlot, ReservationKind, RunOwner, Selection, UnixTime};
use crate::store::{AllocRequest, QueueStep, QueueTick};

/// The queue table; `requested_ids` is a comma-separated list (NULL for a count).
pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS queue (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    user TEXT NOT NULL,
    actual_user TEXT NOT NULL,
    type TEXT NOT NULL CHECK (type IN ('run', 'manual')),
    requested_count INTEGER NOT NULL CHECK (requested_count > 0),
    requested_ids TEXT,
    duration INTEGER,
    note TEXT,
    host TEXT,
    pid INTEGER,
    pid_start INTEGER,
    waiter_host TEXT NOT NULL,
    waiter_pid INTEGER NOT NULL,
    waiter_pid_start INTEGER NOT NULL,
    enqueue_time INTEGER NOT NULL,
    last_heartbeat INTEGER NOT NULL
) STRICT;
";

/// The state a queue-aware change starts from: every slot, and the live entries
/// in order with what they collected.
struct Scene {
    slots: Vec<GpuSlot>,
    entries: Vec<QueueEntry>,
    /// Whether the change recorded history, so that it prunes old records too.
    ended_any: bool,
}

impl Scene {
    /// Ends the reservation on `gpu_id` (with history) and frees the GPU.
    fn end(
        &mut self,
        conn: &Connection,
        gpu_id: u32,
        ended_at: UnixTime,
        now: UnixTime,
    ) -> Outcome<()> {
        let slot = &mut self.slots[gpu_id as usize];
        match slot {
            GpuSlot::Held(reservation) => {
                end_reservation(conn, gpu_id, reservation, ended_at, now)?;
                self.ended_any = true;
            }
            _ => free_gpu(conn, gpu_id, now)?,
        }
        *slot = GpuSlot::Free {
            last_released: Some(now),
        };
        Ok(())
    }

    /// Prunes old history if this change recorded any.
    fn finish(&self, conn: &Connection, prune_before: UnixTime) -> Outcome<()> {
        if self.ended_any {
            prune_history(conn, prune_before)?;
        }
        Ok(())
    }
}

/// Reads the slots and the queue, drops dead entries and ends the partial
/// reservations of entries that are gone.
fn settle(conn: &Connection, dead_ids: &[String], now: UnixTime) -> Outcome<Scene> {
    let pool = require_pool(conn)?;
    let slots = read_slots(conn, pool.gpu_count)?;
    let (entries, dead): (Vec<QueueEntry>, Vec<QueueEntry>) = read_entries(conn, pool.gpu_count)?
        .into_iter()
        .partition(|entry| entry.is_alive(now, dead_ids));
    for entry in &dead {
        conn.prepare_cached("DELETE FROM queue WHERE id = ?1")?
            .execute([&entry.id])?;
    }
    let mut scene = Scene {
        slots,
        entries,
        ended_any: false,
    };
    for (gpu_id, queue_id) in partial_markers(conn, pool.gpu_count)? {
        if !scene.entries.iter().any(|entry| entry.id == queue_id) {
            // What it collected was held until the waiter's last sign of life.
            let last_seen = dead
                .iter()
                .find(|entry| entry.id == queue_id)
                .map_or(now, |entry| entry.last_heartbeat.min(now));
            let ended = match &scene.slots[gpu_id as usize] {
                GpuSlot::Held(r) => last_seen.max(r.start_time),
                _ => last_seen,
            };
            scene.end(conn, gpu_id, ended, now)?;
        }
    }
    Ok(scene)
}

/// Hands free GPUs to the waiters (`crate::queue::distribute`) and writes the grants.
fn grant(
    conn: &Connection,
    scene: &mut Scene,
    unreserved: &[u32],
    dead_ids: &[String],
    now: UnixTime,
) -> Outcome<()> {
    let mut last_used = HashMap::new();
    for entry in &scene.entries {
        if !last_used.contains_key(&entry.actual_user) {
            let used = user_last_used(conn, &entry.actual_user)?;
            last_used.insert(entry.actual_user.clone(), used);
        }
    }
    let grants = queue::distribute(
        &scene.slots,
        &scene.entries,
        &DistributionInput {
            unreserved,
            dead_ids,
            last_used: &last_used,
            now,
        },
    );
    for grant in &grants {
        if let Some(ended) = &grant.ended {
            scene.end(conn, grant.gpu_id, ended.ended_at, now)?;
        }
        let entry = &scene.entries[grant.entry];
        claim_gpu(
            conn,
            grant.gpu_id,
            &entry.partial_reservation(),
            Some(&entry.id),
            now,
            now,
        )?;
        touch_last_used(conn, &entry.actual_user, grant.gpu_id, now)?;
    }
    scene.slots = queue::apply(&scene.slots, &scene.entries, &grants, now);
    for grant in grants {
        let collected = &mut scene.entries[grant.entry].collected;
        collected.push(grant.gpu_id);
        collected.sort_unstable();
    }
    Ok(())
}

/// Plans the request on what the waiters left, and claims it. A refusal is the inner
/// error, so that the transaction still commits what was done for the waiters.
fn claim_leftovers(
    conn: &Connection,
    scene: &mut Scene,
    request: &AllocRequest,
) -> Outcome<Result<Vec<u32>>> {
    let reservation = &request.reservation;
    let used = user_last_used(conn, &reservation.actual_user)?;
    let plan = alloc::plan(
        &scene.slots,
        &PlanInput {
            selection: &request.selection,
            unreserved: &request.unreserved,
            dead_ids: &request.dead_ids,
            user_last_used: &used,
            now: request.now,
        },
    );
    let plan = match plan {
        Ok(plan) => plan,
        Err(refusal) => return Ok(Err(refusal)),
    };
    for ended in &plan.ended {
        scene.end(conn, ended.gpu_id, ended.ended_at, request.now)?;
    }
    for &id in &plan.claim {
        claim_gpu(conn, id, reservation, None, request.now, request.now)?;
        touch_last_used(conn, &reservation.actual_user, id, request.now)?;
    }
    Ok(Ok(plan.claim))
}

/// The queue settled and its waiters given what they can use, before `request`
/// gets anything: the fairness rule every allocation follows.
fn waiters_served_first(conn: &Connection, request: &AllocRequest) -> Outcome<Scene> {
    let mut scene = settle(conn, &request.dead_ids, request.now)?;
    grant(
        conn,
        &mut scene,
        &request.unreserved,
        &request.dead_ids,
        request.now,
    )?;
    Ok(scene)
}

/// `Store::allocate`: waiters first, then the request.
pub(super) fn allocate(
    conn: &Connection,
    request: &AllocRequest,
    prune_before: UnixTime,
) -> Outcome<Result<Vec<u32>>> {
    let mut scene = waiters_served_first(conn, request)?;
    let claimed = claim_leftovers(conn, &mut scene, request)?;
    scene.finish(conn, prune_before)?;
    Ok(claimed)
}

/// `Store::join_queue`: `allocate`, or the end of the queue when that is refused
/// for now.
pub(super) fn join(
    conn: &Connection,
    request: &AllocRequest,
    waiter: &RunOwner,
    prune_before: UnixTime,
) -> Outcome<Result<QueueStep>> {
    let mut scene = waiters_served_first(conn, request)?;
    let step = match claim_leftovers(conn, &mut scene, request)? {
        Ok(claimed) => Ok(QueueStep::Served(claimed)),
        Err(refusal) if !refusal.is_retryable() => Err(refusal),
        Err(_) => {
            let entry = QueueEntry::new(
                &request.reservation,
                &request.selection,
                waiter,
                request.now,
            );
            insert_entry(conn, &entry)?;
            scene.entries.push(entry);
            // Only the new entry can find anything left.
            grant(
                conn,
                &mut scene,
                &request.unreserved,
                &request.dead_ids,
                request.now,
            )?;
            Ok(QueueStep::Waiting {
                position: scene.entries.len() as u32,
                collected: scene
                    .entries
                    .last()
                    .map(|entry| entry.collected.clone())
                    .unwrap_or_default(),
            })
        }
    };
    scene.finish(conn, prune_before)?;
    Ok(step)
}

/// `Store::queue_step`. A gone entry is the inner error, so that the transaction
/// still commits the settling.
pub(super) fn step(
    conn: &Connection,
    tick: &QueueTick,
    prune_before: UnixTime,
) -> Outcome<Result<QueueStep>> {
    let mut scene = settle(conn, &tick.dead_ids, tick.now)?;
    let Some(index) = scene.entries.iter().position(|e| e.id == tick.entry_id) else {
        scene.finish(conn, prune_before)?;
        return Ok(Err(queue::entry_gone()));
    };
    if scene.entries[index].heartbeat_due(tick.now) {
        conn.prepare_cached("UPDATE queue SET last_heartbeat = ?1 WHERE id = ?2")?
            .execute(params![tick.now, tick.entry_id])?;
        conn.prepare_cached(
            "UPDATE gpus SET last_heartbeat = ?1 WHERE queue_id = ?2 AND type = 'run'",
        )?
        .execute(params![tick.now, tick.entry_id])?;
    }
    if let Some(unreserved) = &tick.unreserved {
        grant(conn, &mut scene, unreserved, &tick.dead_ids, tick.now)?;
    }
    scene.finish(conn, prune_before)?;
    let entry = &scene.entries[index];
    if entry.missing() > 0 {
        return Ok(Ok(QueueStep::Waiting {
            position: index as u32 + 1,
            collected: entry.collected.clone(),
        }));
    }
    // Served: the partial reservations become the reservation.
    conn.prepare_cached(
        "UPDATE gpus SET queue_id = NULL, expiry_time = ?1,
             last_heartbeat = CASE type WHEN 'run' THEN ?2 ELSE last_heartbeat END
         WHERE queue_id = ?3",
    )?
    .execute(params![entry.served_expiry(tick.now), tick.now, entry.id])?;
    conn.prepare_cached("DELETE FROM queue WHERE id = ?1")?
        .execute([&entry.id])?;
    Ok(Ok(QueueStep::Served(entry.collected.clone())))
}

/// `Store::leave_queue`.
pub(super) fn leave(
    conn: &Connection,
    entry_id: &str,
    now: UnixTime,
    prune_before: UnixTime,
) -> Outcome<Vec<u32>> {
    let pool = require_pool(conn)?;
    conn.prepare_cached("DELETE FROM queue WHERE id = ?1")?
        .execute([entry_id])?;
    let mut scene = Scene {
        slots: read_slots(conn, pool.gpu_count)?,
        entries: Vec::new(),
        ended_any: false,
    };
    let mut freed = Vec::new();
    for (gpu_id, queue_id) in partial_markers(conn, pool.gpu_count)? {
        if queue_id == entry_id {
            scene.end(conn, gpu_id, now, now)?;
            freed.push(gpu_id);
        }
    }
    scene.finish(conn, prune_before)?;
    Ok(freed)
}

/// GPUs holding a partial reservation, with the queue entry it was collected for.
fn partial_markers(conn: &Connection, gpu_count: u32) -> Outcome<Vec<(u32, String)>> {
    let mut statement = conn.prepare_cached(
        "SELECT id, queue_id FROM gpus WHERE queue_id IS NOT NULL AND id >= 0 AND id < ?1
         ORDER BY id",
    )?;
    let markers = statement
        .query_map([gpu_count], |row| Ok((row.get(0)?, row.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    Ok(markers)
}

/// Every queue entry in order, with the GPUs it collected. A row that cannot be read
/// is a store error naming it.
pub(super) fn read_entries(conn: &Connection, gpu_count: u32) -> Outcome<Vec<QueueEntry>> {
    let markers = partial_markers(conn, gpu_count)?;
    let mut statement = conn.prepare_cached(
        "SELECT id, user, actual_user, type, requested_count, requested_ids, duration, note,
             host, pid, pid_start, waiter_host, waiter_pid, waiter_pid_start, enqueue_time,
             last_heartbeat
         FROM queue ORDER BY seq",
    )?;
    let mut rows = statement.query([])?;
    let mut entries = Vec::new();
    while let Some(row) = rows.next()? {
        let id: String = row.get("id")?;
        let mut entry = entry_from_row(row).map_err(|why| {
            Fault::Domain(Error::Store(format!("corrupted queue entry '{id}': {why}")))
        })?;
        entry.collected = markers
            .iter()
            .filter(|(_, queue_id)| *queue_id == entry.id)
            .map(|(gpu_id, _)| *gpu_id)
            .collect();
        entries.push(entry);
    }
    Ok(entries)
}

fn entry_from_row(row: &Row) -> std::result::Result<QueueEntry, String> {
    let get = |name: &str| -> std::result::Result<rusqlite::types::Value, String> {
        row.get(name).map_err(|_| format!("invalid {name}"))
    };
    let text = |name: &str| -> std::result::Result<Option<String>, String> {
        match get(name)? {
            rusqlite::types::Value::Null => Ok(None),
            rusqlite::types::Value::Text(text) => Ok(Some(text)),
            _ => Err(format!("invalid {name}")),
        }
    };
    let integer = |name: &str| -> std::result::Result<Option<i64>, String> {
        match get(name)? {
            rusqlite::types::Value::Null => Ok(None),
            rusqlite::types::Value::Integer(n) => Ok(Some(n)),
            _ => Err(format!("invalid {name}")),
        }
    };
    let required = |name: &str| integer(name)?.ok_or_else(|| format!("no {name}"));
    let kind = text("type")?.unwrap_or_default();
    let kind = ReservationKind::parse(&kind).ok_or_else(|| format!("invalid type '{kind}'"))?;
    let count = u32::try_from(required("requested_count")?)
        .map_err(|_| "invalid requested_count".to_string())?;
    let selection = match text("requested_ids")? {
        None => Selection::Count(count),
        Some(list) => Selection::Ids(
            list.split(',')
                .map(|id| {
                    id.parse()
                        .map_err(|_| format!("invalid requested_ids '{list}'"))
                })
                .collect::<std::result::Result<_, _>>()?,
        ),
    };
    let process = |host: &str, pid: &str, start: &str| -> std::result::Result<_, String> {
        Ok(match (text(host)?, integer(pid)?, integer(start)?) {
            (Some(host), Some(pid), Some(pid_start)) => Some(RunOwner {
                host,
                pid: u32::try_from(pid).map_err(|_| "invalid pid".to_string())?,
                pid_start: u64::try_from(pid_start).map_err(|_| "invalid pid_start")?,
            }),
            _ => None,
        })
    };
    Ok(QueueEntry {
        id: text("id")?.unwrap_or_default(),
        user: text("user")?.unwrap_or_default(),
        actual_user: text("actual_user")?.unwrap_or_default(),
        kind,
        selection,
        duration: integer("duration")?,
        note: text("note")?,
        owner: process("host", "pid", "pid_start")?,
        waiter: process("waiter_host", "waiter_pid", "waiter_pid_start")?,
        enqueue_time: required("enqueue_time")?,
        last_heartbeat: required("last_heartbeat")?,
        collected: Vec::new(),
    })
}

fn insert_entry(conn: &Connection, entry: &QueueEntry) -> Outcome<()> {
    let requested_ids = match &entry.selection {
        Selection::Ids(ids) => Some(ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")),
        Selection::Count(_) => None,
    };
    let start = |process: Option<&RunOwner>| -> Outcome<Option<i64>> {
        process
            .map(|process| {
                i64::try_from(process.pid_start).map_err(|_| {
                    Fault::Domain(Error::Usage(format!(
                        "process start time {} is out of range",
                        process.pid_start
                    )))
                })
            })
            .transpose()
    };
    let owner = entry.owner.as_ref();
    let waiter = entry
        .waiter
        .as_ref()
        .ok_or_else(|| Fault::Domain(Error::Runtime("a queue entry needs a waiter".into())))?;
    conn.prepare_cached(
        "INSERT INTO queue (id, user, actual_user, type, requested_count, requested_ids,
             duration, note, host, pid, pid_start, waiter_host, waiter_pid, waiter_pid_start,
             enqueue_time, last_heartbeat)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
    )?
    .execute(params![
        entry.id,
        entry.user,
        entry.actual_user,
        entry.kind.as_str(),
        entry.selection.len(),
        requested_ids,
        entry.duration,
        entry.note,
        owner.map(|owner| &owner.host),
        owner.map(|owner| owner.pid),
        start(owner)?,
        waiter.host,
        waiter.pid,
        start(Some(waiter))?,
        entry.enqueue_time,
        entry.last_heartbeat,
    ])?;
    Ok(())
}
