//! The embedded SQLite store: one database file shared by every Unix user of the machine.
//!
//! Trust model: every user must be able to reserve and release GPUs, so the store is
//! shared-writable. When this module creates the store's directory it makes it mode
//! 0777 (no sticky bit: SQLite must be able to delete another user's `-wal`/`-shm`
//! files), and the database file 0666; SQLite gives its `-wal`, `-shm` and journal files
//! the database file's mode. Any local user can therefore also edit the file by hand.
//! That is accepted: canhazgpu coordinates cooperating users, it does not enforce
//! quotas against hostile ones.
//!
//! Every state change is one `BEGIN IMMEDIATE` transaction (read slots, decide with
//! `alloc::plan`, write), so concurrent processes are serialised by SQLite's lock and a
//! GPU is never held by two reservations. The wait queue lives in the same file
//! (`queue` table, see the `queue` submodule) and changes in the same transactions.

mod queue;

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rusqlite::{
    Connection, OpenFlags, OptionalExtension, Row, Transaction, TransactionBehavior, params,
};

use super::{
    AllocRequest, DEFAULT_HISTORY_RETENTION_DAYS, HISTORY_PRUNE_BATCH, InitOutcome, NewReservation,
    QueueStep, QueueTick, ReassertRequest, Reasserted, ReleaseScope, Store,
};
use crate::error::{Error, Result};
use crate::report::UserUsage;
use crate::state::{
    GpuSlot, Pool, ProviderKind, Reservation, ReservationKind, RunOwner, UnixTime, UsageRecord,
};

/// The version of the schema below; stored as `schema_version` in `meta`.
/// Version 2 added the wait queue (`queue` table, `gpus.queue_id`).
const SCHEMA_VERSION: i64 = 2;

/// How long a write waits for another process's transaction before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// A `gpus` row with a NULL `user` is a free GPU; a GPU without a row is free too.
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
    queue_id TEXT
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
    type TEXT NOT NULL CHECK (type IN ('run', 'manual'))
) STRICT;
CREATE INDEX IF NOT EXISTS history_by_end ON history (end_time);
-- Covers `usage_summary`: one pass over the index, already grouped by account.
CREATE INDEX IF NOT EXISTS history_by_account
    ON history (actual_user, user, end_time, start_time, type);
";

const GPU_COLUMNS: &str = "id, user, actual_user, type, start_time, last_heartbeat, \
     expiry_time, last_released, note, reservation_id, host, pid, pid_start, queue_id";

/// How often `wait_for_change` looks for commits by other processes.
const CHANGE_POLL: Duration = Duration::from_millis(50);

/// One connection to the shared database file; open one per process or thread.
pub struct SqliteStore {
    conn: Connection,
    path: PathBuf,
    /// `PRAGMA data_version` when changes were last looked for (`watch_changes`).
    seen_version: Option<i64>,
    /// Seconds of history kept; older records are pruned by writes.
    history_retention: i64,
}

/// What can go wrong inside a store operation: SQLite itself, or a domain refusal
/// (pool not initialised, not enough GPUs). Turned into an `Error` naming the path.
#[derive(Debug)]
enum Fault {
    Sqlite(rusqlite::Error),
    Domain(Error),
}

impl From<rusqlite::Error> for Fault {
    fn from(err: rusqlite::Error) -> Self {
        Fault::Sqlite(err)
    }
}

impl From<Error> for Fault {
    fn from(err: Error) -> Self {
        Fault::Domain(err)
    }
}

type Outcome<T> = std::result::Result<T, Fault>;

impl Fault {
    fn into_error(self, path: &Path) -> Error {
        use rusqlite::ErrorCode;
        match self {
            Fault::Domain(err) => err,
            Fault::Sqlite(err) => match err.sqlite_error_code() {
                Some(ErrorCode::PermissionDenied | ErrorCode::ReadOnly | ErrorCode::CannotOpen) => {
                    access_denied(path)
                }
                Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => Error::Store(format!(
                    "the canhazgpu store at {} stayed locked by another process for over {} s",
                    path.display(),
                    BUSY_TIMEOUT.as_secs()
                )),
                _ => Error::Store(format!("canhazgpu store at {}: {err}", path.display())),
            },
        }
    }
}

/// The one line a user sees when the shared store is not usable for them.
fn access_denied(path: &Path) -> Error {
    Error::Store(format!(
        "cannot open the canhazgpu store at {}: permission denied - ask an administrator to \
         run 'canhazgpu admin --gpus <count>' (creates it for all users), or use --state-dir DIR",
        path.display()
    ))
}

fn open_failure(path: &Path, err: io::Error) -> Error {
    if err.kind() == io::ErrorKind::PermissionDenied {
        access_denied(path)
    } else {
        Error::Store(format!(
            "cannot open the canhazgpu store at {}: {err}",
            path.display()
        ))
    }
}

impl SqliteStore {
    /// Opens an existing store; a missing one means `admin` has not run yet, and
    /// nothing is created (a mistyped `--state-dir` leaves no store behind).
    pub fn open_existing(path: &Path) -> Result<Self> {
        match fs::metadata(path) {
            Err(err) if err.kind() == io::ErrorKind::NotFound => Err(Error::NotInitialized),
            _ => Self::open(path),
        }
    }

    /// Opens the store for `admin`: created where missing, and in any case made
    /// usable by every user, since SQLite's side files (`-wal`, `-shm`, journal) are
    /// created in the directory by whichever user writes first.
    pub fn create(path: &Path) -> Result<Self> {
        let store = Self::open(path)?;
        let dir = path.parent().filter(|dir| !dir.as_os_str().is_empty());
        add_permissions(dir.unwrap_or(Path::new(".")), 0o777)
            .and_then(|()| add_permissions(path, 0o666))
            .map_err(|err| {
                Error::Store(format!(
                    "cannot make the canhazgpu store at {} usable by every user: {err}",
                    path.display()
                ))
            })?;
        Ok(store)
    }

    /// Opens the store at `path`, creating it (and its directory) usable by all users.
    pub fn open(path: &Path) -> Result<Self> {
        create_shared(path).map_err(|err| open_failure(path, err))?;
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let connect = || -> Outcome<Connection> {
            let conn = Connection::open_with_flags(path, flags)?;
            // SQLite silently falls back to read-only when the file is not writable.
            if conn.is_readonly(rusqlite::MAIN_DB)? {
                return Err(Fault::Domain(access_denied(path)));
            }
            conn.busy_timeout(BUSY_TIMEOUT)?;
            // In WAL mode, NORMAL syncs at checkpoints instead of at every commit: a
            // commit survives any process crash, and the database stays consistent
            // after a power loss, which may only undo the last commits. That is the
            // right trade here: a power loss ends every supervised run anyway, and an
            // fsync per commit (10-15 ms on ordinary disks) would dominate `run`.
            conn.pragma_update(None, "synchronous", "NORMAL")?;
            ensure_schema(&conn)?;
            Ok(conn)
        };
        let conn = connect().map_err(|fault| fault.into_error(path))?;
        Ok(SqliteStore {
            conn,
            path: path.to_path_buf(),
            seen_version: None,
            history_retention: i64::from(DEFAULT_HISTORY_RETENTION_DAYS) * 86_400,
        })
    }

    /// Keeps `seconds` of history instead of the default 90 days.
    pub fn with_history_retention(mut self, seconds: i64) -> Self {
        self.history_retention = seconds;
        self
    }

    fn data_version(&self) -> Result<i64> {
        self.conn
            .query_row("PRAGMA data_version", [], |row| row.get(0))
            .map_err(|err| Fault::Sqlite(err).into_error(&self.path))
    }

    /// Runs `body` in one transaction; `Immediate` takes the write lock up front so a
    /// read-decide-write sequence cannot interleave with another process's.
    fn transact<T>(
        &mut self,
        behavior: TransactionBehavior,
        body: impl FnOnce(&Connection) -> Outcome<T>,
    ) -> Result<T> {
        let outcome = (|| {
            let tx = self.conn.transaction_with_behavior(behavior)?;
            let value = body(&tx)?;
            tx.commit()?;
            Ok(value)
        })();
        outcome.map_err(|fault: Fault| fault.into_error(&self.path))
    }
}

/// Adds `bits` to the permissions of `path` where they are missing (keeping any
/// sticky bit, as on /tmp).
fn add_permissions(path: &Path, bits: u32) -> io::Result<()> {
    let mode = fs::metadata(path)?.permissions().mode();
    if mode & bits != bits {
        fs::set_permissions(path, Permissions::from_mode((mode & 0o7777) | bits))?;
    }
    Ok(())
}

/// Creates the directory (0777) and an empty database file (0666) where missing. The
/// file is created under a temporary name and linked into place, so no other process
/// can open it (and create `-wal`/`-shm` from its mode) before it is world-writable.
fn create_shared(path: &Path) -> io::Result<()> {
    if path.exists() {
        return Ok(());
    }
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        if let Some(above) = dir.parent() {
            fs::create_dir_all(above)?;
        }
        match fs::create_dir(dir) {
            Ok(()) => fs::set_permissions(dir, Permissions::from_mode(0o777))?,
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
            Err(err) => return Err(err),
        }
    }
    let file_name = path.file_name().unwrap_or_default().to_string_lossy();
    // Unique per process and call, so concurrent creators never share a staging file.
    static CREATIONS: AtomicU32 = AtomicU32::new(0);
    let staging = dir.join(format!(
        ".{file_name}.{}.{}.new",
        std::process::id(),
        CREATIONS.fetch_add(1, Ordering::Relaxed)
    ));
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o666)
        .open(&staging)?;
    let published = fs::set_permissions(&staging, Permissions::from_mode(0o666))
        .and_then(|()| fs::hard_link(&staging, path));
    fs::remove_file(&staging)?;
    match published {
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        other => other,
    }
}

/// Creates the schema on first use, upgrades an older one, and refuses a store
/// written by a newer canhazgpu.
fn ensure_schema(conn: &Connection) -> Outcome<()> {
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
            tx.execute_batch(queue::SCHEMA)?;
        }
        Some(1) => {
            tx.execute_batch("ALTER TABLE gpus ADD COLUMN queue_id TEXT")?;
            tx.execute_batch(queue::SCHEMA)?;
        }
        Some(version) => return check_version(version),
    }
    set_meta(&tx, "schema_version", &SCHEMA_VERSION.to_string())?;
    tx.commit()?;
    Ok(())
}

fn schema_version(conn: &Connection) -> Outcome<Option<i64>> {
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

fn check_version(version: i64) -> Outcome<()> {
    if version > SCHEMA_VERSION {
        return Err(Fault::Domain(Error::Store(format!(
            "the canhazgpu store has schema version {version}, newer than this canhazgpu \
             understands ({SCHEMA_VERSION}) - upgrade canhazgpu"
        ))));
    }
    Ok(())
}

fn meta_value(conn: &Connection, key: &str) -> Outcome<Option<String>> {
    Ok(conn
        .query_row("SELECT value FROM meta WHERE key = ?1", [key], |row| {
            row.get(0)
        })
        .optional()?)
}

fn set_meta(conn: &Connection, key: &str, value: &str) -> Outcome<()> {
    conn.execute(
        "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)",
        [key, value],
    )?;
    Ok(())
}

fn read_pool(conn: &Connection) -> Outcome<Option<Pool>> {
    let Some(count) = meta_value(conn, "gpu_count")? else {
        return Ok(None);
    };
    let provider = meta_value(conn, "provider")?;
    let corrupt =
        |why: String| Fault::Domain(Error::Store(format!("corrupted GPU pool settings: {why}")));
    let gpu_count = count
        .parse()
        .map_err(|_| corrupt(format!("invalid gpu_count '{count}'")))?;
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

/// Writes a fresh pool: every GPU free and never used, as on Redis, and nobody
/// waiting (waiters find their entry gone and stop).
fn create_pool(conn: &Connection, pool: Pool) -> Outcome<()> {
    conn.execute("DELETE FROM gpus", [])?;
    conn.execute("DELETE FROM queue", [])?;
    let mut add = conn.prepare_cached("INSERT OR IGNORE INTO gpus (id) VALUES (?1)")?;
    for id in 0..pool.gpu_count {
        add.execute([id])?;
    }
    set_meta(conn, "gpu_count", &pool.gpu_count.to_string())?;
    set_meta(conn, "provider", pool.provider.as_str())
}

fn require_pool(conn: &Connection) -> Outcome<Pool> {
    read_pool(conn)?.ok_or(Fault::Domain(Error::NotInitialized))
}

fn read_slots(conn: &Connection, gpu_count: u32) -> Outcome<Vec<GpuSlot>> {
    let mut slots = vec![
        GpuSlot::Free {
            last_released: None
        };
        gpu_count as usize
    ];
    let mut statement = conn.prepare_cached(&format!(
        "SELECT {GPU_COLUMNS} FROM gpus WHERE id >= 0 AND id < ?1"
    ))?;
    let mut rows = statement.query([gpu_count])?;
    while let Some(row) = rows.next()? {
        let id: u32 = row.get("id")?;
        slots[id as usize] = slot_from_row(row).unwrap_or_else(|why| {
            GpuSlot::Corrupt(format!("corrupted GPU state for GPU {id}: {why}"))
        });
    }
    Ok(slots)
}

/// Reads one column, describing a value of the wrong type as corruption.
fn column<T: rusqlite::types::FromSql>(row: &Row, name: &str) -> std::result::Result<T, String> {
    row.get(name).map_err(|_| format!("invalid {name}"))
}

fn slot_from_row(row: &Row) -> std::result::Result<GpuSlot, String> {
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
    let owner = match (
        column::<Option<String>>(row, "host")?,
        column::<Option<u32>>(row, "pid")?,
        column::<Option<i64>>(row, "pid_start")?,
    ) {
        (Some(host), Some(pid), Some(pid_start)) => Some(RunOwner {
            host,
            pid,
            pid_start: u64::try_from(pid_start).map_err(|_| "invalid pid_start")?,
        }),
        (None, None, None) => None,
        _ => return Err("incomplete run owner (host, pid, pid_start)".into()),
    };
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
    }))
}

fn user_last_used(conn: &Connection, actual_user: &str) -> Outcome<HashMap<u32, UnixTime>> {
    let mut statement =
        conn.prepare_cached("SELECT gpu_id, last_used FROM user_last_used WHERE actual_user = ?1")?;
    let used = statement
        .query_map([actual_user], |row| Ok((row.get(0)?, row.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    Ok(used)
}

fn touch_last_used(conn: &Connection, actual_user: &str, gpu_id: u32, at: UnixTime) -> Outcome<()> {
    conn.prepare_cached(
        "INSERT INTO user_last_used (actual_user, gpu_id, last_used) VALUES (?1, ?2, ?3)
         ON CONFLICT (actual_user, gpu_id) DO UPDATE SET last_used = max(last_used, excluded.last_used)",
    )?
    .execute(params![actual_user, gpu_id, at])?;
    Ok(())
}

fn free_gpu(conn: &Connection, gpu_id: u32, now: UnixTime) -> Outcome<()> {
    conn.prepare_cached("INSERT OR REPLACE INTO gpus (id, last_released) VALUES (?1, ?2)")?
        .execute(params![gpu_id, now])?;
    Ok(())
}

/// Writes `reservation` on `gpu_id`; `queue_id` marks a partial reservation
/// collected for that queue entry.
fn claim_gpu(
    conn: &Connection,
    gpu_id: u32,
    reservation: &NewReservation,
    queue_id: Option<&str>,
    start_time: UnixTime,
    now: UnixTime,
) -> Outcome<()> {
    let owner = reservation.owner.as_ref();
    let pid_start = owner
        .map(|owner| {
            i64::try_from(owner.pid_start).map_err(|_| {
                Error::Usage(format!(
                    "process start time {} is out of range",
                    owner.pid_start
                ))
            })
        })
        .transpose()?;
    let last_heartbeat = (reservation.kind == ReservationKind::Run).then_some(now);
    conn.prepare_cached(&format!(
        "INSERT OR REPLACE INTO gpus ({GPU_COLUMNS})
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, NULL, ?8, ?9, ?10, ?11, ?12, ?13)"
    ))?
    .execute(params![
        gpu_id,
        reservation.user,
        reservation.actual_user,
        reservation.kind.as_str(),
        start_time,
        last_heartbeat,
        reservation.expiry_time,
        reservation.note,
        reservation.id,
        owner.map(|owner| &owner.host),
        owner.map(|owner| owner.pid),
        pid_start,
        queue_id,
    ])?;
    Ok(())
}

/// Ends `reservation` on `gpu_id`: one history record, the user's last use, a free row.
fn end_reservation(
    conn: &Connection,
    gpu_id: u32,
    reservation: &Reservation,
    ended_at: UnixTime,
    now: UnixTime,
) -> Outcome<()> {
    record_history(
        conn,
        &UsageRecord {
            user: reservation.user.clone(),
            actual_user: reservation.actual_user.clone(),
            gpu_id,
            start_time: reservation.start_time,
            end_time: ended_at,
            kind: reservation.kind,
        },
    )?;
    touch_last_used(conn, &reservation.actual_user, gpu_id, ended_at)?;
    free_gpu(conn, gpu_id, now)
}

/// Appends a history record, in the transaction that ends the reservation, so a
/// reservation is recorded once however many processes end it at the same time.
fn record_history(conn: &Connection, record: &UsageRecord) -> Outcome<()> {
    conn.prepare_cached(
        "INSERT INTO history (user, actual_user, gpu_id, start_time, end_time, type)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        record.user,
        record.actual_user,
        record.gpu_id,
        record.start_time,
        record.end_time,
        record.kind.as_str(),
    ])?;
    Ok(())
}

/// Deletes a bounded batch of the records that ended before `before`. Every write
/// that records history runs it, so pruning is continuous and each write cheap.
fn prune_history(conn: &Connection, before: UnixTime) -> Outcome<()> {
    conn.prepare_cached(
        "DELETE FROM history WHERE id IN
         (SELECT id FROM history WHERE end_time < ?1 ORDER BY end_time LIMIT ?2)",
    )?
    .execute(params![before, HISTORY_PRUNE_BATCH])?;
    Ok(())
}

/// When a release ends `reservation`: now, or earlier if it had already ended by itself.
fn release_time(reservation: &Reservation, now: UnixTime) -> UnixTime {
    reservation.liveness(now, &[]).ended_at().unwrap_or(now)
}

fn in_scope(scope: &ReleaseScope, gpu_id: u32, reservation: &Reservation) -> bool {
    match scope {
        ReleaseScope::OwnManual { actual_user } => {
            reservation.actual_user == *actual_user && reservation.kind == ReservationKind::Manual
        }
        ReleaseScope::OwnIds { actual_user, ids } => {
            ids.contains(&gpu_id) && reservation.actual_user == *actual_user
        }
        ReleaseScope::AnyIds { ids } => ids.contains(&gpu_id),
        ReleaseScope::Reservation { id } => !id.is_empty() && reservation.id == *id,
    }
}

impl Store for SqliteStore {
    fn init_pool(
        &mut self,
        gpu_count: u32,
        provider: ProviderKind,
        force: bool,
        now: UnixTime,
    ) -> Result<InitOutcome> {
        if gpu_count == 0 {
            return Err(Error::Usage("GPU count must be greater than 0".into()));
        }
        let prune_before = now - self.history_retention;
        self.transact(TransactionBehavior::Immediate, |conn| {
            let previous = read_pool(conn)?;
            if let Some(pool) = previous
                && !force
            {
                return Err(Fault::Domain(Error::Usage(format!(
                    "GPU pool already initialized with {} GPUs. Use --force to reinitialize",
                    pool.gpu_count
                ))));
            }
            let mut cleared = 0;
            if let Some(pool) = previous {
                for (id, slot) in (0..).zip(read_slots(conn, pool.gpu_count)?) {
                    match slot {
                        GpuSlot::Held(reservation) => {
                            end_reservation(
                                conn,
                                id,
                                &reservation,
                                release_time(&reservation, now),
                                now,
                            )?;
                            cleared += 1;
                        }
                        GpuSlot::Corrupt(_) => free_gpu(conn, id, now)?,
                        GpuSlot::Free { .. } => {}
                    }
                }
            }
            create_pool(
                conn,
                Pool {
                    gpu_count,
                    provider,
                },
            )?;
            if cleared > 0 {
                prune_history(conn, prune_before)?;
            }
            Ok(InitOutcome {
                previous_count: previous.map(|pool| pool.gpu_count),
                cleared,
            })
        })
    }

    fn pool(&mut self) -> Result<Option<Pool>> {
        self.transact(TransactionBehavior::Deferred, read_pool)
    }

    fn slots(&mut self) -> Result<Vec<GpuSlot>> {
        self.transact(TransactionBehavior::Deferred, |conn| {
            let pool = require_pool(conn)?;
            read_slots(conn, pool.gpu_count)
        })
    }

    fn allocate(&mut self, request: &AllocRequest) -> Result<Vec<u32>> {
        let prune_before = request.now - self.history_retention;
        // A refused request still commits what it did for the waiters.
        self.transact(TransactionBehavior::Immediate, |conn| {
            queue::allocate(conn, request, prune_before)
        })?
    }

    fn join_queue(&mut self, request: &AllocRequest, waiter: &RunOwner) -> Result<QueueStep> {
        let prune_before = request.now - self.history_retention;
        self.transact(TransactionBehavior::Immediate, |conn| {
            queue::join(conn, request, waiter, prune_before)
        })?
    }

    fn queue_step(&mut self, tick: &QueueTick) -> Result<QueueStep> {
        let prune_before = tick.now - self.history_retention;
        self.transact(TransactionBehavior::Immediate, |conn| {
            queue::step(conn, tick, prune_before)
        })?
    }

    fn leave_queue(&mut self, entry_id: &str, now: UnixTime) -> Result<Vec<u32>> {
        let prune_before = now - self.history_retention;
        self.transact(TransactionBehavior::Immediate, |conn| {
            queue::leave(conn, entry_id, now, prune_before)
        })
    }

    fn queue(&mut self) -> Result<Vec<crate::queue::QueueEntry>> {
        self.transact(TransactionBehavior::Deferred, |conn| {
            let pool = require_pool(conn)?;
            queue::read_entries(conn, pool.gpu_count)
        })
    }

    fn watch_changes(&mut self) -> Result<()> {
        self.seen_version = Some(self.data_version()?);
        Ok(())
    }

    fn stop_watching(&mut self) {
        self.seen_version = None;
    }

    /// Polls `PRAGMA data_version`, which changes when another connection commits.
    fn wait_for_change(&mut self, timeout: Duration) -> Result<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            let version = self.data_version()?;
            if self.seen_version != Some(version) {
                self.seen_version = Some(version);
                return Ok(true);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            std::thread::sleep(left.min(CHANGE_POLL));
        }
    }

    fn release(&mut self, scope: &ReleaseScope, now: UnixTime) -> Result<Vec<u32>> {
        let prune_before = now - self.history_retention;
        self.transact(TransactionBehavior::Immediate, |conn| {
            let pool = require_pool(conn)?;
            if let ReleaseScope::OwnIds { ids, .. } | ReleaseScope::AnyIds { ids } = scope
                && let Some(bad) = ids.iter().find(|id| **id >= pool.gpu_count)
            {
                return Err(Fault::Domain(Error::Usage(format!(
                    "GPU ID {bad} is out of range (0-{})",
                    pool.gpu_count - 1
                ))));
            }
            let mut freed = Vec::new();
            for (id, slot) in (0..).zip(read_slots(conn, pool.gpu_count)?) {
                match slot {
                    GpuSlot::Held(reservation) if in_scope(scope, id, &reservation) => {
                        end_reservation(conn, id, &reservation, release_time(&reservation, now), now)?;
                        freed.push(id);
                    }
                    // An unreadable GPU has no owner to check; only an explicit
                    // any-holder release (root) resets it.
                    GpuSlot::Corrupt(_)
                        if matches!(scope, ReleaseScope::AnyIds { ids } if ids.contains(&id)) =>
                    {
                        free_gpu(conn, id, now)?;
                        freed.push(id);
                    }
                    _ => {}
                }
            }
            if !freed.is_empty() {
                prune_history(conn, prune_before)?;
            }
            Ok(freed)
        })
    }

    fn heartbeat(&mut self, reservation_id: &str, gpus: &[u32], now: UnixTime) -> Result<Vec<u32>> {
        if reservation_id.is_empty() {
            return Ok(Vec::new());
        }
        self.transact(TransactionBehavior::Immediate, |conn| {
            let mut beat = conn.prepare_cached(
                "UPDATE gpus SET last_heartbeat = ?1
                 WHERE id = ?2 AND reservation_id = ?3 AND type = 'run' AND user IS NOT NULL",
            )?;
            let mut held = Vec::new();
            for &id in gpus {
                if beat.execute(params![now, id, reservation_id])? > 0 && !held.contains(&id) {
                    held.push(id);
                }
            }
            held.sort_unstable();
            Ok(held)
        })
    }

    fn reassert(&mut self, request: &ReassertRequest) -> Result<Reasserted> {
        let now = request.now;
        let prune_before = now - self.history_retention;
        self.transact(TransactionBehavior::Immediate, |conn| {
            let pool = match read_pool(conn)? {
                Some(pool) => pool,
                None => {
                    create_pool(conn, request.pool)?;
                    request.pool
                }
            };
            let slots = read_slots(conn, pool.gpu_count)?;
            let mut outcome = Reasserted::default();
            let mut ended_any = false;
            for &id in &request.gpus {
                let ended = match slots.get(id as usize) {
                    None => continue,
                    Some(GpuSlot::Free { .. }) => None,
                    Some(GpuSlot::Held(held)) if held.id == request.reservation.id => None,
                    Some(GpuSlot::Held(other)) => match other.liveness(now, &[]).ended_at() {
                        Some(ended_at) => Some((other, ended_at)),
                        None => {
                            outcome.taken.push((id, other.user_label()));
                            continue;
                        }
                    },
                    Some(GpuSlot::Corrupt(reason)) => {
                        outcome.taken.push((id, reason.clone()));
                        continue;
                    }
                };
                if let Some((other, ended_at)) = ended {
                    end_reservation(conn, id, other, ended_at, now)?;
                    ended_any = true;
                }
                claim_gpu(
                    conn,
                    id,
                    &request.reservation,
                    None,
                    request.start_time,
                    now,
                )?;
                outcome.held.push(id);
            }
            if ended_any {
                prune_history(conn, prune_before)?;
            }
            outcome.held.sort_unstable();
            Ok(outcome)
        })
    }

    fn history(&mut self, from: UnixTime, to: UnixTime) -> Result<Vec<UsageRecord>> {
        self.transact(TransactionBehavior::Deferred, |conn| {
            let mut statement = conn.prepare_cached(
                "SELECT id, user, actual_user, gpu_id, start_time, end_time, type FROM history
                 WHERE end_time >= ?1 AND start_time <= ?2 ORDER BY end_time, id",
            )?;
            let mut rows = statement.query([from, to])?;
            let mut records = Vec::new();
            while let Some(row) = rows.next()? {
                let kind: String = row.get("type")?;
                let Some(kind) = ReservationKind::parse(&kind) else {
                    let id: i64 = row.get("id")?;
                    return Err(Fault::Domain(Error::Store(format!(
                        "corrupted usage history record {id}: invalid reservation type '{kind}'"
                    ))));
                };
                records.push(UsageRecord {
                    user: row.get("user")?,
                    actual_user: row.get("actual_user")?,
                    gpu_id: row.get("gpu_id")?,
                    start_time: row.get("start_time")?,
                    end_time: row.get("end_time")?,
                    kind,
                });
            }
            Ok(records)
        })
    }

    fn usage_summary(&mut self, from: UnixTime, to: UnixTime) -> Result<Vec<UserUsage>> {
        let tally = self.transact(TransactionBehavior::Deferred, |conn| {
            // Grouped by index columns (no sort); the few (account, display name)
            // groups are merged per account below.
            let mut statement = conn.prepare_cached(
                "SELECT actual_user, user,
                        SUM(MAX(0, MIN(end_time, ?2) - MAX(start_time, ?1))),
                        SUM(type = 'run'), SUM(type = 'manual')
                 FROM history INDEXED BY history_by_account
                 WHERE end_time >= ?1 AND start_time <= ?2
                 GROUP BY actual_user, user",
            )?;
            let mut tally: BTreeMap<String, UserUsage> = BTreeMap::new();
            let mut rows = statement.query([from, to])?;
            while let Some(row) = rows.next()? {
                let actual_user: String = row.get(0)?;
                let user = if actual_user.is_empty() {
                    row.get(1)?
                } else {
                    actual_user
                };
                let count = |index| row.get::<_, i64>(index).map(|n| n.max(0) as u64);
                let usage = tally.entry(user.clone()).or_insert_with(|| UserUsage {
                    user,
                    ..UserUsage::default()
                });
                usage.seconds += row.get::<_, i64>(2)?;
                usage.run_count += count(3)?;
                usage.manual_count += count(4)?;
            }
            Ok(tally)
        })?;
        Ok(tally.into_values().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn fresh() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("store/state.db")).unwrap();
        (dir, store)
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().mode() & 0o7777
    }

    #[test]
    fn creates_directory_and_database_for_all_users() {
        let (dir, store) = fresh();
        assert_eq!(mode(&dir.path().join("store")), 0o777);
        assert_eq!(mode(&dir.path().join("store/state.db")), 0o666);
        let journal: String = store
            .conn
            .query_row("PRAGMA journal_mode", [], |row| row.get(0))
            .unwrap();
        assert_eq!(journal, "wal");
        let leftovers: Vec<_> = fs::read_dir(dir.path().join("store"))
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .filter(|name| name.ends_with(".new"))
            .collect();
        assert!(leftovers.is_empty(), "staging files left: {leftovers:?}");
    }

    #[test]
    fn reopening_keeps_data_and_refuses_newer_schema() {
        let (dir, mut store) = fresh();
        store.init_pool(2, ProviderKind::Fake, false, 10).unwrap();
        drop(store);
        let path = dir.path().join("store/state.db");
        let mut store = SqliteStore::open(&path).unwrap();
        assert_eq!(
            store.pool().unwrap(),
            Some(Pool {
                gpu_count: 2,
                provider: ProviderKind::Fake
            })
        );
        set_meta(&store.conn, "schema_version", "3").unwrap();
        drop(store);
        let err = SqliteStore::open(&path).err().unwrap();
        assert_eq!(
            err.to_string(),
            "the canhazgpu store has schema version 3, newer than this canhazgpu understands (2) - upgrade canhazgpu"
        );
    }

    /// A store written before the queue existed gets it on first open, data kept.
    #[test]
    fn version_1_stores_are_upgraded() {
        let (dir, mut store) = fresh();
        store.init_pool(2, ProviderKind::Fake, false, 10).unwrap();
        store
            .conn
            .execute_batch(
                "DROP TABLE queue; ALTER TABLE gpus DROP COLUMN queue_id;
                 UPDATE meta SET value = '1' WHERE key = 'schema_version';",
            )
            .unwrap();
        drop(store);
        let mut store = SqliteStore::open(&dir.path().join("store/state.db")).unwrap();
        assert_eq!(
            meta_value(&store.conn, "schema_version")
                .unwrap()
                .as_deref(),
            Some("2")
        );
        assert_eq!(store.slots().unwrap().len(), 2);
        assert_eq!(store.queue().unwrap(), Vec::new());
    }

    #[test]
    fn corrupt_pool_settings_are_reported() {
        let (_dir, mut store) = fresh();
        store.init_pool(2, ProviderKind::Fake, false, 10).unwrap();
        set_meta(&store.conn, "provider", "tpu").unwrap();
        assert_eq!(
            store.pool().unwrap_err().to_string(),
            "corrupted GPU pool settings: invalid provider 'tpu'"
        );
    }

    /// Each inconsistent row is reported with its reason, for that GPU only.
    #[test]
    fn inconsistent_rows_are_corrupt_slots() {
        let (_dir, mut store) = fresh();
        store.init_pool(6, ProviderKind::Fake, false, 10).unwrap();
        let damage = [
            (
                0,
                "user = 'a', type = 'gpu', start_time = 1",
                "invalid reservation type 'gpu'",
            ),
            (1, "type = 'run'", "reservation type set on a free GPU"),
            (
                2,
                "user = 'a', start_time = 1",
                "reservation without a type",
            ),
            (
                3,
                "user = 'a', type = 'run'",
                "reservation without a start time",
            ),
            (
                4,
                "user = 'a', type = 'run', start_time = 1, host = 'h'",
                "incomplete run owner (host, pid, pid_start)",
            ),
        ];
        for (id, set, _) in damage {
            store
                .conn
                .execute(&format!("UPDATE gpus SET {set} WHERE id = {id}"), [])
                .unwrap();
        }
        let slots = store.slots().unwrap();
        for (id, _, why) in damage {
            assert_eq!(
                slots[id],
                GpuSlot::Corrupt(format!("corrupted GPU state for GPU {id}: {why}"))
            );
        }
        assert_eq!(
            slots[5],
            GpuSlot::Free {
                last_released: None
            }
        );
    }

    #[test]
    fn history_pruning_is_bounded_per_write() {
        let (_dir, store) = fresh();
        let old = UsageRecord {
            user: "a".into(),
            actual_user: "a".into(),
            gpu_id: 0,
            start_time: 0,
            end_time: 1,
            kind: ReservationKind::Manual,
        };
        for _ in 0..150 {
            record_history(&store.conn, &old).unwrap();
        }
        let count = |store: &SqliteStore| -> i64 {
            store
                .conn
                .query_row("SELECT count(*) FROM history WHERE end_time = 1", [], |r| {
                    r.get(0)
                })
                .unwrap()
        };
        assert_eq!(count(&store), 150);
        prune_history(&store.conn, 1).unwrap();
        assert_eq!(count(&store), 150, "records ending at the cutoff are kept");
        prune_history(&store.conn, 2).unwrap();
        assert_eq!(count(&store), 150 - i64::from(HISTORY_PRUNE_BATCH));
        prune_history(&store.conn, 2).unwrap();
        assert_eq!(count(&store), 0);
    }
}
