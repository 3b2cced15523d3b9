//! The embedded SQLite store: one database file shared by every Unix user of the
//! machine (see `files` for its trust model).
//!
//! Every operation is one `BEGIN IMMEDIATE` transaction: load the state, run the pool
//! core, write its changes. Concurrent processes are serialised by SQLite's lock, so a
//! GPU is never held by two reservations. The wait queue lives in the same file
//! (`queue` table) and changes in the same transactions; waiters are woken through
//! `local_wake`.
//!
//! The system's store (`StoreConfig::Sqlite::system`) is opened and used with a
//! protected install's privilege (`privilege`); any other path as the user.

mod files;
mod history;
mod rows;
mod schema;

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};

use super::local_wake::{self, Listener};
use super::{DEFAULT_HISTORY_RETENTION_DAYS, PoolView, QueueBeat, Store, Wake};
use crate::error::{Error, Result};
use crate::fleet::{DEFAULT_INTERVAL_SECS, HostRecord, HostSnapshot};
use crate::gpu::procinfo;
use crate::pool::{self, Operation, Outcome, PoolState, Transition};
use crate::queue::QueueEntry;
use crate::report::UserUsage;
use crate::state::{Pool, UnixTime, UsageRecord};

/// `meta` keys of the users who muted their notifications (`notify --off`).
const MUTED_PREFIX: &str = "muted:";

use crate::privilege::with_privilege_if;
pub use files::Layout;
use files::{access_denied, open_failure};

/// How long a write waits for another process's transaction before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// One connection to the shared database file; open one per process or thread.
pub struct SqliteStore {
    conn: Connection,
    path: PathBuf,
    /// Names this store's wake-ups (`local_wake`).
    wake_scope: String,
    /// This machine, whose processes a transaction checks (`PoolState::find_gone`).
    host: String,
    /// The wake-ups of the entry this process waits for (`watch_entry`).
    listener: Option<Listener>,
    /// Seconds of history kept; older records are pruned by writes.
    history_retention: i64,
    /// The system's store: its files are reached with a protected install's privilege.
    system: bool,
}

/// What can go wrong inside a store operation: SQLite itself, a connection SQLite
/// quietly opened read-only, or a domain refusal (pool not initialised, not enough
/// GPUs). Turned into an `Error` naming the path.
#[derive(Debug)]
enum Fault {
    Sqlite(rusqlite::Error),
    ReadOnly,
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

type SqlResult<T> = std::result::Result<T, Fault>;

impl Fault {
    fn into_error(self, path: &Path) -> Error {
        use rusqlite::ErrorCode;
        match self {
            Fault::Domain(err) => err,
            Fault::ReadOnly => access_denied(path),
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

    /// Whether SQLite could not open or write a file: another user's process may be
    /// creating one of the side files (`-wal`, `-shm`) this very moment, with its
    /// final mode not yet set.
    fn is_access(&self) -> bool {
        use rusqlite::ErrorCode;
        match self {
            Fault::Sqlite(err) => matches!(
                err.sqlite_error_code(),
                Some(ErrorCode::PermissionDenied | ErrorCode::ReadOnly | ErrorCode::CannotOpen)
            ),
            Fault::ReadOnly => true,
            Fault::Domain(_) => false,
        }
    }
}

/// One connection to the database file, set up as every canhazgpu process uses it.
fn connect(path: &Path) -> SqlResult<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)?;
    // SQLite silently falls back to read-only when the file is not writable.
    if conn.is_readonly(rusqlite::MAIN_DB)? {
        return Err(Fault::ReadOnly);
    }
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // In WAL mode, NORMAL syncs at checkpoints instead of at every commit: a commit
    // survives any process crash, and the database stays consistent after a power
    // loss, which may only undo the last commits. That is the right trade here: a
    // power loss ends every supervised run anyway, and an fsync per commit (10-15 ms on
    // ordinary disks) would dominate `run`.
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    schema::ensure_schema(&conn)?;
    files::share_side_files(path);
    Ok(conn)
}

/// Runs `attempt` again for about a second while it fails to open or write a file, so
/// that the moment between another user creating a side file and giving it its mode
/// is never an error; a store that really is not writable still fails, a second later.
fn with_access_retries<T>(mut attempt: impl FnMut() -> SqlResult<T>) -> SqlResult<T> {
    let mut pause = Duration::from_millis(2);
    let mut waited = Duration::ZERO;
    loop {
        match attempt() {
            Err(fault) if fault.is_access() && waited < Duration::from_secs(1) => {
                std::thread::sleep(pause);
                waited += pause;
                pause = (pause * 2).min(Duration::from_millis(100));
            }
            other => return other,
        }
    }
}

impl SqliteStore {
    /// Opens an existing store; a missing one means `admin` has not run yet, and
    /// nothing is created (a mistyped `--state-dir` leaves no store behind).
    pub fn open_existing(path: &Path, system: bool) -> Result<Self> {
        with_privilege_if(system, || match std::fs::metadata(path) {
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Err(Error::NotInitialized),
            _ => Self::open_as(path, system),
        })
    }

    /// Opens the store for `admin`: created where missing, and in any case made
    /// usable by every user, since SQLite's side files (`-wal`, `-shm`, journal) are
    /// created in the directory by whichever user writes first. Also says whether an
    /// existing store's permissions had to be repaired.
    ///
    /// A protected install (`files::Layout::Protected`) makes it the group's alone
    /// instead: the directory `root:canhazgpu 2770`, the files `0660`.
    pub fn create(path: &Path, system: bool) -> Result<(Self, Layout, bool)> {
        let layout = match system && crate::privilege::protected_install() {
            true => Layout::Protected,
            false => Layout::Shared,
        };
        with_privilege_if(system, || {
            let existed = path.exists();
            files::create_files(path, layout).map_err(|err| open_failure(path, err))?;
            let store = Self::open_as(path, system)?;
            let changed = files::apply_layout(path, layout).map_err(|err| {
                Error::Store(format!(
                    "cannot give the canhazgpu store at {} its {} layout: {err}",
                    path.display(),
                    layout.name()
                ))
            })?;
            Ok((store, layout, existed && changed))
        })
    }

    /// Opens the store at `path`, creating it (and its directory) usable by all users.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_as(path, false)
    }

    fn open_as(path: &Path, system: bool) -> Result<Self> {
        // SQLite would block on a FIFO and call a directory "permission denied".
        if let Ok(meta) = std::fs::metadata(path)
            && !meta.is_file()
        {
            let what = if meta.is_dir() {
                "a directory"
            } else {
                "not a regular file"
            };
            return Err(Error::Store(format!(
                "the canhazgpu store at {} is {what}, not a database file",
                path.display()
            )));
        }
        files::create_files(path, Layout::Shared).map_err(|err| open_failure(path, err))?;
        let conn = with_access_retries(|| connect(path)).map_err(|fault| fault.into_error(path))?;
        let wake_scope = local_wake::scope_of(
            &std::fs::canonicalize(path)
                .unwrap_or_else(|_| path.to_path_buf())
                .to_string_lossy(),
        );
        Ok(SqliteStore {
            conn,
            path: path.to_path_buf(),
            wake_scope,
            host: procinfo::hostname(),
            listener: None,
            history_retention: i64::from(DEFAULT_HISTORY_RETENTION_DAYS) * 86_400,
            system,
        })
    }

    /// Keeps `seconds` of history instead of the default 90 days.
    pub fn with_history_retention(mut self, seconds: i64) -> Self {
        self.history_retention = seconds;
        self
    }

    /// Names this host (`host_name`): its pool, and the processes it can check.
    pub fn with_host(mut self, name: &str) -> Self {
        self.host = name.to_owned();
        self
    }

    /// Runs `body` in one transaction; `Immediate` takes the write lock up front so a
    /// read-decide-write sequence cannot interleave with another process's.
    fn transact<T>(
        &mut self,
        behavior: TransactionBehavior,
        body: impl Fn(&Connection) -> SqlResult<T>,
    ) -> Result<T> {
        with_privilege_if(self.system, || self.transact_as_is(behavior, body))
    }

    fn transact_as_is<T>(
        &mut self,
        behavior: TransactionBehavior,
        body: impl Fn(&Connection) -> SqlResult<T>,
    ) -> Result<T> {
        let attempt = |conn: &mut Connection| -> SqlResult<T> {
            let tx = conn.transaction_with_behavior(behavior)?;
            let value = body(&tx)?;
            tx.commit()?;
            Ok(value)
        };
        let outcome = match attempt(&mut self.conn) {
            // A connection that met a side file it could not open stays read-only,
            // and so does every connection of this process while one of them still
            // has the file open: close it first, then open anew.
            Err(fault) if fault.is_access() => with_access_retries(|| {
                drop(std::mem::replace(
                    &mut self.conn,
                    Connection::open_in_memory()?,
                ));
                self.conn = connect(&self.path)?;
                attempt(&mut self.conn)
            }),
            other => other,
        };
        outcome.map_err(|fault: Fault| fault.into_error(&self.path))
    }

    /// Runs one operation of the pool core: load, decide, write what changed (also
    /// when the outcome is a refusal), then wake whom the change concerns. It decides
    /// first in a read transaction, which takes no lock: an operation that changes
    /// nothing (a refused request with nothing to hand out, a quiet turn) is done
    /// then. Otherwise it runs again under the write lock (`BEGIN IMMEDIATE`).
    fn operate(&mut self, operation: &Operation) -> Result<Outcome> {
        let (requester, now) = (operation.requester(), operation.now());
        let host = self.host.clone();
        let decide = |conn: &Connection| -> SqlResult<Transition<Outcome>> {
            let mut state = rows::load_state(conn, requester)?;
            state.find_gone(&host, |process| {
                procinfo::process_alive(process.pid, process.pid_start)
            });
            Ok(pool::apply(&state, operation))
        };
        let quiet = self.transact(TransactionBehavior::Deferred, |conn| {
            let transition = decide(conn)?;
            Ok(transition.changes.is_empty().then_some(transition))
        })?;
        if let Some(transition) = quiet {
            return transition.outcome;
        }
        let prune_before = now - self.history_retention;
        let transition = self.transact(TransactionBehavior::Immediate, |conn| {
            let transition = decide(conn)?;
            rows::apply(conn, &transition.changes, prune_before)?;
            Ok(transition)
        })?;
        with_privilege_if(self.system, || files::share_side_files(&self.path));
        local_wake::notify(&self.wake_scope, &transition.changes.wake_entries);
        transition.outcome
    }
}

/// Closing may checkpoint and remove the `-wal` file, in the protected directory too.
impl Drop for SqliteStore {
    fn drop(&mut self) {
        if self.system
            && let Ok(blank) = Connection::open_in_memory()
        {
            crate::privilege::with_privilege(|| drop(std::mem::replace(&mut self.conn, blank)));
        }
    }
}

impl Store for SqliteStore {
    fn run(&mut self, operation: &Operation) -> Result<Outcome> {
        self.operate(operation)
    }

    fn pool(&mut self) -> Result<Option<Pool>> {
        self.transact(TransactionBehavior::Deferred, schema::read_pool)
    }

    fn muted_users(&mut self) -> Result<std::collections::BTreeSet<String>> {
        self.transact(TransactionBehavior::Deferred, |conn| {
            let mut statement =
                conn.prepare_cached("SELECT key FROM meta WHERE key LIKE 'muted:%'")?;
            let keys = statement.query_map([], |row| row.get::<_, String>(0))?;
            let mut users = std::collections::BTreeSet::new();
            for key in keys {
                users.insert(key?.trim_start_matches(MUTED_PREFIX).to_string());
            }
            Ok(users)
        })
    }

    fn set_muted(&mut self, user: &str, muted: bool) -> Result<()> {
        let key = format!("{MUTED_PREFIX}{user}");
        self.transact(TransactionBehavior::Immediate, |conn| {
            match muted {
                true => schema::set_meta(conn, &key, "1")?,
                false => {
                    conn.execute("DELETE FROM meta WHERE key = ?1", [&key])?;
                }
            }
            Ok(())
        })
    }

    fn counted(&mut self) -> Result<pool::Counted> {
        self.transact(TransactionBehavior::Deferred, rows::read_counted)
    }

    fn hosts(&mut self) -> Result<Vec<HostRecord>> {
        Ok(match self.pool()? {
            Some(_) => vec![HostRecord {
                name: self.host.clone(),
                reported_at: None,
                interval_secs: DEFAULT_INTERVAL_SECS,
            }],
            None => Vec::new(),
        })
    }

    fn selected_host(&self) -> &str {
        &self.host
    }

    fn select_host(&mut self, name: &str) -> Result<()> {
        match name == self.host {
            true => Ok(()),
            false => Err(Error::Usage(format!(
                "the embedded store holds only this host's pool ({}): other hosts need \
                 a shared Redis (backend: redis)",
                self.host
            ))),
        }
    }

    /// Nobody else reads this store.
    fn publish_snapshot(&mut self, _: &HostSnapshot, _: Option<u64>) -> Result<()> {
        Ok(())
    }

    fn host_snapshot(&mut self) -> Result<Option<HostSnapshot>> {
        Ok(None)
    }

    fn pool_view(&mut self) -> Result<PoolView> {
        self.transact(TransactionBehavior::Deferred, |conn| {
            let pool = schema::read_pool(conn)?.ok_or(Fault::Domain(Error::NotInitialized))?;
            let (slots, partials) = rows::read_slots(conn, pool.gpu_count)?;
            let mut state = PoolState {
                slots,
                partials,
                ..PoolState::default()
            };
            state.queue = rows::read_entries_by_id(conn, &state.collector_ids())?;
            state.link_partials();
            Ok(PoolView {
                slots: state.slots,
                collecting: state.queue,
            })
        })
    }

    fn enqueue(&mut self, entry: &QueueEntry) -> Result<()> {
        self.transact(TransactionBehavior::Immediate, |conn| {
            if schema::read_pool(conn)?.is_none() {
                return Err(Fault::Domain(Error::NotInitialized));
            }
            rows::insert_entry(conn, entry)
        })
    }

    fn queue(&mut self) -> Result<Vec<QueueEntry>> {
        self.transact(TransactionBehavior::Deferred, |conn| {
            let pool = schema::read_pool(conn)?.ok_or(Fault::Domain(Error::NotInitialized))?;
            let (_, partials) = rows::read_slots(conn, pool.gpu_count)?;
            let mut state = PoolState {
                partials,
                queue: rows::read_entries(conn)?.0,
                ..PoolState::default()
            };
            state.link_partials();
            Ok(state.queue)
        })
    }

    fn queue_beat(&mut self, entry_id: &str, now: UnixTime) -> Result<QueueBeat> {
        self.transact(TransactionBehavior::Immediate, |conn| {
            let seq: Option<i64> = conn
                .prepare_cached("SELECT seq FROM queue WHERE id = ?1")?
                .query_row([entry_id], |row| row.get(0))
                .optional()?;
            let Some(seq) = seq else {
                return Err(Fault::Domain(crate::queue::entry_gone()));
            };
            conn.prepare_cached("UPDATE queue SET last_heartbeat = ?1 WHERE id = ?2")?
                .execute(params![now, entry_id])?;
            let position: u32 = conn
                .prepare_cached("SELECT count(*) FROM queue WHERE seq <= ?1")?
                .query_row([seq], |row| row.get(0))?;
            let head: Option<String> = conn
                .prepare_cached("SELECT id FROM queue ORDER BY seq LIMIT 1")?
                .query_row([], |row| row.get(0))
                .optional()?;
            let head = match head {
                Some(id) => rows::read_entries_by_id(conn, &[id])?.pop(),
                None => None,
            };
            Ok(QueueBeat { position, head })
        })
    }

    fn watch_entry(&mut self, entry_id: &str, wake: Wake) -> Result<()> {
        let listener = Listener::start(&self.wake_scope, entry_id, wake)
            .map_err(|err| Error::Runtime(format!("cannot listen for queue wake-ups: {err}")))?;
        self.listener = Some(listener);
        Ok(())
    }

    fn stop_watching(&mut self) {
        self.listener = None;
    }

    fn history(&mut self, from: UnixTime, to: UnixTime) -> Result<Vec<UsageRecord>> {
        self.transact(TransactionBehavior::Deferred, |conn| {
            history::history(conn, from, to)
        })
    }

    fn usage_summary(&mut self, from: UnixTime, to: UnixTime) -> Result<Vec<UserUsage>> {
        self.transact(TransactionBehavior::Deferred, |conn| {
            history::usage_summary(conn, from, to)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::history::{prune_history, record_history};
    use super::schema::{meta_value, set_meta};
    use super::*;
    use crate::state::{GpuSlot, ProviderKind, ReservationKind};
    use crate::store::HISTORY_PRUNE_BATCH;
    use std::fs;
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
        set_meta(&store.conn, "schema_version", "6").unwrap();
        drop(store);
        let err = SqliteStore::open(&path).err().unwrap();
        assert_eq!(
            err.to_string(),
            "the canhazgpu store has schema version 6, newer than this canhazgpu understands (5) - upgrade canhazgpu"
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
                 ALTER TABLE gpus DROP COLUMN adopted;
                 ALTER TABLE gpus DROP COLUMN activity;
                 DROP INDEX history_by_account;
                 ALTER TABLE history DROP COLUMN reason;
                 ALTER TABLE history DROP COLUMN utilization_sum;
                 ALTER TABLE history DROP COLUMN utilization_samples;
                 CREATE INDEX history_by_account
                     ON history (actual_user, user, end_time, start_time, type);
                 UPDATE meta SET value = '1' WHERE key = 'schema_version';",
            )
            .unwrap();
        drop(store);
        let mut store = SqliteStore::open(&dir.path().join("store/state.db")).unwrap();
        assert_eq!(
            meta_value(&store.conn, "schema_version")
                .unwrap()
                .as_deref(),
            Some("5")
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
            utilization: Default::default(),
        };
        for _ in 0..150 {
            record_history(&store.conn, &old, None).unwrap();
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
