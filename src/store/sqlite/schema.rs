//! The schema of the database, its upgrades, and the `meta` table (schema version,
//! pool size and provider).

use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior};

use super::{Fault, SqlResult};
use crate::error::Error;
use crate::state::{Pool, ProviderKind};

/// The version of the schema below; stored as `schema_version` in `meta`.
/// Version 2 added the wait queue (`queue` table, `gpus.queue_id`), version 3 the
/// adopted process's name (`gpus.adopted`), version 4 the agent's measurements
/// (`gpus.activity`, JSON), version 5 why a reservation was ended (`history.reason`).
pub(super) const SCHEMA_VERSION: i64 = 5;

/// A `gpus` row with a NULL `user` is a free GPU; a GPU without a row is free too.
/// `gpus.queue_id` marks a partial reservation collected for that queue entry. The
/// queue's `requested_ids` is a comma-separated list (NULL for a count).
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS gpus (
    id INTEGER PRIMARY KEY,
    user TEXT,
    actual_user TEXT,
    type TEXT,
    start_time INTEGER,
    last_heartbeat INTEGER,
    expiry_time INTEGER,
    last_released INTEGER,
    note TEXT,
    reservation_id TEXT,
    host TEXT,
    pid INTEGER,
    pid_start INTEGER,
    queue_id TEXT,
    adopted TEXT,
    activity TEXT
) STRICT;
CREATE TABLE IF NOT EXISTS user_last_used (
    actual_user TEXT NOT NULL,
    gpu_id INTEGER NOT NULL,
    last_used INTEGER NOT NULL,
    PRIMARY KEY (actual_user, gpu_id)
) STRICT, WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS history (
    id INTEGER PRIMARY KEY,
    user TEXT NOT NULL,
    actual_user TEXT NOT NULL,
    gpu_id INTEGER NOT NULL CHECK (gpu_id >= 0),
    start_time INTEGER NOT NULL,
    end_time INTEGER NOT NULL,
    type TEXT NOT NULL CHECK (type IN ('run', 'manual')),
    reason TEXT,
    utilization_sum INTEGER NOT NULL DEFAULT 0,
    utilization_samples INTEGER NOT NULL DEFAULT 0
) STRICT;
CREATE INDEX IF NOT EXISTS history_by_end ON history (end_time);
-- Covers `usage_summary`: one pass over the index, already grouped by account.
CREATE INDEX IF NOT EXISTS history_by_account
    ON history (actual_user, user, end_time, start_time, type, utilization_sum,
                utilization_samples);
";

const QUEUE_SCHEMA: &str = "
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

const ADOPTED_COLUMN: &str = "ALTER TABLE gpus ADD COLUMN adopted TEXT";
const ACTIVITY_COLUMN: &str = "ALTER TABLE gpus ADD COLUMN activity TEXT";
/// Why reservations ended, and their utilization readings (in the summary's covering
/// index).
const REASON_COLUMN: &str = "ALTER TABLE history ADD COLUMN reason TEXT;
    ALTER TABLE history ADD COLUMN utilization_sum INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE history ADD COLUMN utilization_samples INTEGER NOT NULL DEFAULT 0;
    DROP INDEX IF EXISTS history_by_account;
    CREATE INDEX history_by_account
        ON history (actual_user, user, end_time, start_time, type, utilization_sum,
                    utilization_samples);";

/// Creates the schema on first use, upgrades an older one, and refuses a store
/// written by a newer canhazgpu.
pub(super) fn ensure_schema(conn: &Connection) -> SqlResult<()> {
    match schema_version(conn)? {
        Some(version) if version >= SCHEMA_VERSION => return check_version(version),
        Some(_) => {}
        // WAL lets readers (status) proceed while a writer holds the lock. The mode is
        // persistent in the file; a filesystem without shared memory keeps the default.
        None => conn.query_row("PRAGMA journal_mode = WAL", [], |_| Ok(()))?,
    }
    let tx = Transaction::new_unchecked(conn, TransactionBehavior::Immediate)?;
    // Again under the write lock: another process may have done it meanwhile.
    match schema_version(&tx)? {
        None => {
            tx.execute_batch(SCHEMA)?;
            tx.execute_batch(QUEUE_SCHEMA)?;
        }
        Some(1) => {
            tx.execute_batch("ALTER TABLE gpus ADD COLUMN queue_id TEXT")?;
            tx.execute_batch(QUEUE_SCHEMA)?;
            tx.execute_batch(ADOPTED_COLUMN)?;
            tx.execute_batch(ACTIVITY_COLUMN)?;
            tx.execute_batch(REASON_COLUMN)?;
        }
        Some(2) => {
            tx.execute_batch(ADOPTED_COLUMN)?;
            tx.execute_batch(ACTIVITY_COLUMN)?;
            tx.execute_batch(REASON_COLUMN)?;
        }
        Some(3) => {
            tx.execute_batch(ACTIVITY_COLUMN)?;
            tx.execute_batch(REASON_COLUMN)?;
        }
        Some(4) => tx.execute_batch(REASON_COLUMN)?,
        Some(version) => return check_version(version),
    }
    set_meta(&tx, "schema_version", &SCHEMA_VERSION.to_string())?;
    tx.commit()?;
    Ok(())
}

fn schema_version(conn: &Connection) -> SqlResult<Option<i64>> {
    let has_meta: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta')",
        [],
        |row| row.get(0),
    )?;
    if !has_meta {
        return Ok(None);
    }
    let Some(text) = meta_value(conn, "schema_version")? else {
        return Ok(None);
    };
    let version = text.parse().map_err(|_| {
        Fault::Domain(Error::Store(format!(
            "corrupted canhazgpu store: schema version '{text}'"
        )))
    })?;
    Ok(Some(version))
}

fn check_version(version: i64) -> SqlResult<()> {
    if version > SCHEMA_VERSION {
        return Err(Fault::Domain(Error::Store(format!(
            "the canhazgpu store has schema version {version}, newer than this canhazgpu \
             understands ({SCHEMA_VERSION}) - upgrade canhazgpu"
        ))));
    }
    Ok(())
}

pub(super) fn meta_value(conn: &Connection, key: &str) -> SqlResult<Option<String>> {
    Ok(conn
        .query_row("SELECT value FROM meta WHERE key = ?1", [key], |row| {
            row.get(0)
        })
        .optional()?)
}

pub(super) fn set_meta(conn: &Connection, key: &str, value: &str) -> SqlResult<()> {
    conn.execute(
        "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)",
        [key, value],
    )?;
    Ok(())
}

/// The pool, validated with the limits `admin` enforces, or `None` before `admin` ran.
pub(super) fn read_pool(conn: &Connection) -> SqlResult<Option<Pool>> {
    let Some(count) = meta_value(conn, "gpu_count")? else {
        return Ok(None);
    };
    let provider = meta_value(conn, "provider")?;
    let corrupt =
        |why: String| Fault::Domain(Error::Store(format!("corrupted GPU pool settings: {why}")));
    let gpu_count = count
        .parse()
        .ok()
        .filter(|count| (1..=crate::pool::MAX_GPUS).contains(count))
        .ok_or_else(|| corrupt(format!("invalid gpu_count '{count}'")))?;
    let provider = match provider {
        Some(text) => ProviderKind::parse(&text)
            .ok_or_else(|| corrupt(format!("invalid provider '{text}'")))?,
        None => return Err(corrupt("no provider".into())),
    };
    Ok(Some(Pool {
        gpu_count,
        provider,
    }))
}

pub(super) fn write_pool(conn: &Connection, pool: Pool) -> SqlResult<()> {
    set_meta(conn, "gpu_count", &pool.gpu_count.to_string())?;
    set_meta(conn, "provider", pool.provider.as_str())
}
