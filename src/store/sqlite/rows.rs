//! Rows to the pool core's types and back: loading a `PoolState` and writing the
//! `Changes` of one operation, inside the caller's transaction.

use std::collections::{BTreeMap, HashMap};

use rusqlite::types::Value;
use rusqlite::{Connection, Row, params};

use super::history::{prune_history, record_history};
use super::schema::{read_pool, write_pool};
use super::{Fault, SqlResult};
use crate::error::Error;
use crate::pool::{Changes, PoolState, SlotWrite};
use crate::queue::QueueEntry;
use crate::state::{GpuSlot, Reservation, ReservationKind, RunOwner, Selection, UnixTime};

const GPU_COLUMNS: &str = "id, user, actual_user, type, start_time, last_heartbeat, \
     expiry_time, last_released, note, reservation_id, host, pid, pid_start, queue_id, adopted, activity";

const QUEUE_COLUMNS: &str = "id, user, actual_user, type, requested_count, requested_ids, \
     duration, note, host, pid, pid_start, waiter_host, waiter_pid, waiter_pid_start, \
     enqueue_time, last_heartbeat";

/// Everything an operation reads: the pool, its slots, the queue, and the last use of
/// the accounts placement may consult (the requester's and every waiter's).
pub(super) fn load_state(conn: &Connection, requester: Option<&str>) -> SqlResult<PoolState> {
    let Some(pool) = read_pool(conn)? else {
        return Ok(PoolState::default());
    };
    let (slots, partials) = read_slots(conn, pool.gpu_count)?;
    let (queue, unreadable_entries) = read_entries(conn)?;
    let mut state = PoolState {
        pool: Some(pool),
        slots,
        partials,
        queue,
        unreadable_entries,
        ..PoolState::default()
    };
    for account in PoolState::accounts_needed(&state.queue, requester) {
        let used = last_used(conn, &account)?;
        state.last_used.insert(account, used);
    }
    state.link_partials();
    Ok(state)
}

/// The slots of GPUs `0..gpu_count`, and the partial reservations among them.
pub(super) fn read_slots(
    conn: &Connection,
    gpu_count: u32,
) -> SqlResult<(Vec<GpuSlot>, BTreeMap<u32, String>)> {
    let mut slots = vec![
        GpuSlot::Free {
            last_released: None
        };
        gpu_count as usize
    ];
    let mut partials = BTreeMap::new();
    let mut statement = conn.prepare_cached(&format!(
        "SELECT {GPU_COLUMNS} FROM gpus WHERE id >= 0 AND id < ?1"
    ))?;
    let mut rows = statement.query([gpu_count])?;
    while let Some(row) = rows.next()? {
        let id: u32 = row.get("id")?;
        slots[id as usize] = slot_from_row(row).unwrap_or_else(|why| {
            GpuSlot::Corrupt(format!("corrupted GPU state for GPU {id}: {why}"))
        });
        if let (GpuSlot::Held(_), Ok(Some(entry))) = (
            &slots[id as usize],
            column::<Option<String>>(row, "queue_id"),
        ) {
            partials.insert(id, entry);
        }
    }
    Ok((slots, partials))
}

/// Reads one column, describing a value of the wrong type as corruption.
fn column<T: rusqlite::types::FromSql>(row: &Row, name: &str) -> Result<T, String> {
    row.get(name).map_err(|_| format!("invalid {name}"))
}

/// A process stored as (host, pid, start time): all three, or none.
fn process(
    host: Option<String>,
    pid: Option<i64>,
    pid_start: Option<i64>,
) -> Result<Option<RunOwner>, String> {
    match (host, pid, pid_start) {
        (Some(host), Some(pid), Some(pid_start)) => Ok(Some(RunOwner {
            host,
            pid: u32::try_from(pid).map_err(|_| "invalid pid")?,
            pid_start: u64::try_from(pid_start).map_err(|_| "invalid pid_start")?,
        })),
        (None, None, None) => Ok(None),
        _ => Err("incomplete run owner (host, pid, pid_start)".into()),
    }
}

fn slot_from_row(row: &Row) -> Result<GpuSlot, String> {
    let user: Option<String> = column(row, "user")?;
    let kind: Option<String> = column(row, "type")?;
    let Some(user) = user else {
        if kind.is_some() {
            return Err("reservation type set on a free GPU".into());
        }
        return Ok(GpuSlot::Free {
            last_released: column(row, "last_released")?,
        });
    };
    let kind = kind.ok_or("reservation without a type")?;
    let kind = ReservationKind::parse(&kind)
        .ok_or_else(|| format!("invalid reservation type '{kind}'"))?;
    let start_time: Option<UnixTime> = column(row, "start_time")?;
    let owner = process(
        column(row, "host")?,
        column(row, "pid")?,
        column(row, "pid_start")?,
    )?;
    Ok(GpuSlot::Held(Reservation {
        id: column::<Option<String>>(row, "reservation_id")?.unwrap_or_default(),
        actual_user: column::<Option<String>>(row, "actual_user")?.unwrap_or_default(),
        user,
        kind,
        start_time: start_time.ok_or("reservation without a start time")?,
        last_heartbeat: column(row, "last_heartbeat")?,
        expiry_time: column(row, "expiry_time")?,
        note: column(row, "note")?,
        owner,
        adopted: column(row, "adopted")?,
        // Measurements only: an unreadable one is dropped, not the reservation.
        activity: column::<Option<String>>(row, "activity")?
            .and_then(|text| serde_json::from_str(&text).ok()),
    }))
}

/// Every queue entry in order; rows that cannot be read are returned by ID, for the
/// next change to drop.
pub(super) fn read_entries(conn: &Connection) -> SqlResult<(Vec<QueueEntry>, Vec<String>)> {
    let mut statement =
        conn.prepare_cached(&format!("SELECT {QUEUE_COLUMNS} FROM queue ORDER BY seq"))?;
    let mut rows = statement.query([])?;
    let (mut entries, mut unreadable) = (Vec::new(), Vec::new());
    while let Some(row) = rows.next()? {
        match entry_from_row(row) {
            Ok(entry) => entries.push(entry),
            Err(_) => unreadable.push(row.get::<_, Value>("id").map_or_else(
                |_| String::new(),
                |id| match id {
                    Value::Text(id) => id,
                    _ => String::new(),
                },
            )),
        }
    }
    Ok((entries, unreadable))
}

/// The entries whose IDs are given, in queue order (what `status` needs).
pub(super) fn read_entries_by_id(conn: &Connection, ids: &[String]) -> SqlResult<Vec<QueueEntry>> {
    let mut statement =
        conn.prepare_cached(&format!("SELECT {QUEUE_COLUMNS} FROM queue WHERE id = ?1"))?;
    let mut entries = Vec::new();
    for id in ids {
        let mut rows = statement.query([id])?;
        if let Some(row) = rows.next()?
            && let Ok(entry) = entry_from_row(row)
        {
            entries.push(entry);
        }
    }
    Ok(entries)
}

fn entry_from_row(row: &Row) -> Result<QueueEntry, String> {
    let get = |name: &str| -> Result<Value, String> {
        row.get(name).map_err(|_| format!("invalid {name}"))
    };
    let text = |name: &str| -> Result<Option<String>, String> {
        match get(name)? {
            Value::Null => Ok(None),
            Value::Text(text) => Ok(Some(text)),
            _ => Err(format!("invalid {name}")),
        }
    };
    let integer = |name: &str| -> Result<Option<i64>, String> {
        match get(name)? {
            Value::Null => Ok(None),
            Value::Integer(n) => Ok(Some(n)),
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
                .collect::<Result<_, _>>()?,
        ),
    };
    Ok(QueueEntry {
        id: text("id")?.ok_or("no id")?,
        user: text("user")?.unwrap_or_default(),
        actual_user: text("actual_user")?.unwrap_or_default(),
        kind,
        selection,
        duration: integer("duration")?,
        note: text("note")?,
        owner: process(text("host")?, integer("pid")?, integer("pid_start")?)?,
        waiter: process(
            text("waiter_host")?,
            integer("waiter_pid")?,
            integer("waiter_pid_start")?,
        )?,
        enqueue_time: required("enqueue_time")?,
        last_heartbeat: required("last_heartbeat")?,
        collected: Vec::new(),
    })
}

/// When `account` last used each GPU; rows that cannot be read are passed over.
fn last_used(conn: &Connection, account: &str) -> SqlResult<HashMap<u32, UnixTime>> {
    let mut statement =
        conn.prepare_cached("SELECT gpu_id, last_used FROM user_last_used WHERE actual_user = ?1")?;
    let mut rows = statement.query([account])?;
    let mut used = HashMap::new();
    while let Some(row) = rows.next()? {
        if let (Ok(gpu), Ok(at)) = (row.get::<_, u32>(0), row.get::<_, i64>(1)) {
            used.insert(gpu, at);
        }
    }
    Ok(used)
}

fn process_start(process: Option<&RunOwner>) -> SqlResult<Option<i64>> {
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
}

/// Writes what one operation changed; prunes a batch of old history when it recorded
/// any.
/// `meta` keys of the allocation counters (`Counted`).
const ALLOCATIONS_KEY: &str = "count:allocations";
const ALLOCATION_FAILURES_KEY: &str = "count:allocation_failures";

/// The allocation counters so far.
pub(super) fn read_counted(conn: &Connection) -> SqlResult<crate::pool::Counted> {
    let read = |key: &str| -> SqlResult<u64> {
        let value = super::schema::meta_value(conn, key)?;
        Ok(value.and_then(|v| v.parse().ok()).unwrap_or(0))
    };
    Ok(crate::pool::Counted {
        allocations: read(ALLOCATIONS_KEY)?,
        allocation_failures: read(ALLOCATION_FAILURES_KEY)?,
    })
}

pub(super) fn apply(conn: &Connection, changes: &Changes, prune_before: UnixTime) -> SqlResult<()> {
    if let Some(pool) = changes.pool {
        // A new pool: one row per GPU, every one free and never used.
        conn.execute("DELETE FROM gpus", [])?;
        let mut add = conn.prepare_cached("INSERT INTO gpus (id) VALUES (?1)")?;
        for id in 0..pool.gpu_count {
            add.execute([id])?;
        }
        write_pool(conn, pool)?;
    }
    if changes.pool_removed {
        conn.execute(
            "DELETE FROM meta WHERE key IN ('gpu_count', 'provider')",
            [],
        )?;
    }
    for gpu in &changes.removed_gpus {
        conn.prepare_cached("DELETE FROM gpus WHERE id = ?1")?
            .execute([gpu])?;
    }
    for (gpu, write) in &changes.gpus {
        write_slot(conn, *gpu, write)?;
    }
    for (key, by) in [
        (ALLOCATIONS_KEY, changes.counted.allocations),
        (ALLOCATION_FAILURES_KEY, changes.counted.allocation_failures),
    ] {
        if by > 0 {
            conn.prepare_cached(
                "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) \
                 DO UPDATE SET value = CAST(meta.value AS INTEGER) + CAST(excluded.value AS INTEGER)",
            )?
            .execute(params![key, by.to_string()])?;
        }
    }
    for id in &changes.entries_removed {
        conn.prepare_cached("DELETE FROM queue WHERE id = ?1")?
            .execute([id])?;
    }
    for entry in &changes.entries_updated {
        conn.prepare_cached("UPDATE queue SET last_heartbeat = ?1 WHERE id = ?2")?
            .execute(params![entry.last_heartbeat, entry.id])?;
    }
    for (account, gpu, at) in &changes.last_used {
        conn.prepare_cached(
            "INSERT INTO user_last_used (actual_user, gpu_id, last_used) VALUES (?1, ?2, ?3)
             ON CONFLICT (actual_user, gpu_id) DO UPDATE SET last_used = max(last_used, excluded.last_used)",
        )?
        .execute(params![account, gpu, at])?;
    }
    for entry in &changes.history {
        record_history(conn, &entry.record, entry.reason.as_deref())?;
    }
    if !changes.history.is_empty() {
        prune_history(conn, prune_before)?;
    }
    Ok(())
}

fn write_slot(conn: &Connection, gpu: u32, write: &SlotWrite) -> SqlResult<()> {
    match write {
        SlotWrite::Free { last_released } => {
            conn.prepare_cached("INSERT OR REPLACE INTO gpus (id, last_released) VALUES (?1, ?2)")?
                .execute(params![gpu, last_released])?;
        }
        SlotWrite::Held {
            reservation,
            collected_for,
        } => {
            let owner = reservation.owner.as_ref();
            conn.prepare_cached(&format!(
                "INSERT OR REPLACE INTO gpus ({GPU_COLUMNS})
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, NULL, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)"
            ))?
            .execute(params![
                gpu,
                reservation.user,
                reservation.actual_user,
                reservation.kind.as_str(),
                reservation.start_time,
                reservation.last_heartbeat,
                reservation.expiry_time,
                reservation.note,
                reservation.id,
                owner.map(|owner| &owner.host),
                owner.map(|owner| owner.pid),
                process_start(owner)?,
                collected_for,
                reservation.adopted,
                reservation
                    .activity
                    .as_ref()
                    .and_then(|activity| serde_json::to_string(activity).ok()),
            ])?;
        }
    }
    Ok(())
}

pub(super) fn insert_entry(conn: &Connection, entry: &QueueEntry) -> SqlResult<()> {
    let requested_ids = match &entry.selection {
        Selection::Ids(ids) => Some(ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")),
        Selection::Count(_) => None,
    };
    let owner = entry.owner.as_ref();
    let waiter = entry
        .waiter
        .as_ref()
        .ok_or_else(|| Fault::Domain(Error::Runtime("a queue entry needs a waiter".into())))?;
    conn.prepare_cached(&format!(
        "INSERT INTO queue ({QUEUE_COLUMNS})
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)"
    ))?
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
        process_start(owner)?,
        waiter.host,
        waiter.pid,
        process_start(Some(waiter))?,
        entry.enqueue_time,
        entry.last_heartbeat,
    ])?;
    Ok(())
}
