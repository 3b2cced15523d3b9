//! Persistent state: the GPU pool, reservations and usage history.
//!
//! Two implementations share one contract: `sqlite` (embedded, the default) and
//! `redis` (data compatible with upstream canhazgpu v1.1.x). Every change of a GPU's
//! state is atomic: one `BEGIN IMMEDIATE` transaction or one Lua script.

pub mod redis;
pub mod sqlite;

use std::path::PathBuf;
use std::time::Duration;

use crate::config::Config;
use crate::error::Result;
use crate::queue::QueueEntry;
use crate::report::{self, UserUsage};
use crate::state::{
    GpuSlot, Pool, ProviderKind, Reservation, ReservationKind, RunOwner, Selection, UnixTime,
    UsageRecord,
};

/// How to reach the store, resolved from flags, environment and config file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreConfig {
    Sqlite { path: PathBuf },
    Redis(RedisConfig),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedisConfig {
    /// A full URL (`redis://`, `rediss://`, `redis+unix://`) wins over host/port/db.
    pub url: Option<String>,
    pub host: String,
    pub port: u16,
    pub db: i64,
    pub password: Option<String>,
}

/// The reservation an allocation creates on each claimed GPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewReservation {
    pub id: String,
    pub user: String,
    pub actual_user: String,
    pub kind: ReservationKind,
    /// Manual reservations only.
    pub expiry_time: Option<UnixTime>,
    pub note: Option<String>,
    /// Run reservations only: the supervising process.
    pub owner: Option<RunOwner>,
}

impl NewReservation {
    /// The reservation as a store holds it after claiming a GPU at `now`.
    pub fn held_from(self, now: UnixTime) -> Reservation {
        Reservation {
            last_heartbeat: (self.kind == ReservationKind::Run).then_some(now),
            id: self.id,
            user: self.user,
            actual_user: self.actual_user,
            kind: self.kind,
            start_time: now,
            expiry_time: self.expiry_time,
            note: self.note,
            owner: self.owner,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllocRequest {
    pub reservation: NewReservation,
    pub selection: Selection,
    /// GPUs in use without reservation, never to be handed out.
    pub unreserved: Vec<u32>,
    /// Reservation and queue entry IDs whose process on this host is known to be gone.
    pub dead_ids: Vec<String>,
    pub now: UnixTime,
}

/// One turn of a waiter: refresh its entry when due (`QueueEntry::heartbeat_due`),
/// hand out free GPUs, and serve it if it has everything.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueTick {
    pub entry_id: String,
    /// GPUs in use without reservation; `None` when usage was not checked, and then
    /// no GPU is handed out in this turn.
    pub unreserved: Option<Vec<u32>>,
    /// Reservation and queue entry IDs whose process on this host is known to be gone.
    pub dead_ids: Vec<String>,
    pub now: UnixTime,
}

/// Where a queued request stands after a change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QueueStep {
    /// The reservation is complete on these GPUs (ascending) and the entry is gone.
    Served(Vec<u32>),
    /// Still waiting: 1-based position among the waiters, GPUs collected so far.
    Waiting { position: u32, collected: Vec<u32> },
}

/// A run reservation to put back after the store lost it (see `Store::reassert`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReassertRequest {
    /// The pool the reservation was made in; recreated if the store has none.
    pub pool: Pool,
    pub reservation: NewReservation,
    /// When the reservation started, kept so that its history stays right.
    pub start_time: UnixTime,
    pub gpus: Vec<u32>,
    pub now: UnixTime,
}

/// What `Store::reassert` found on each GPU.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reasserted {
    /// GPUs that hold the reservation (again), ascending.
    pub held: Vec<u32>,
    /// GPUs another live reservation holds, with its holder (`Reservation::user_label`),
    /// or unreadable ones, with the reason.
    pub taken: Vec<(u32, String)>,
}

/// Which reservations a release ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReleaseScope {
    /// Every manual reservation of this Unix user (plain `release`).
    OwnManual { actual_user: String },
    /// These GPUs, run or manual, where this Unix user holds them (`release --gpu-ids`).
    OwnIds { actual_user: String, ids: Vec<u32> },
    /// These GPUs, whoever holds them (root's explicit override).
    AnyIds { ids: Vec<u32> },
    /// Every GPU held by one reservation (a run supervisor at exit, or a dead one's
    /// reservation reclaimed).
    Reservation { id: String },
}

/// The contract every backend implements. All methods are atomic with respect to
/// each other, across processes and (for Redis) machines.
pub trait Store: Send {
    /// Creates the pool. Fails if it exists unless `force`, which ends every
    /// reservation (recording history) and sets the new size and provider.
    fn init_pool(
        &mut self,
        gpu_count: u32,
        provider: ProviderKind,
        force: bool,
        now: UnixTime,
    ) -> Result<InitOutcome>;

    /// The pool, or `None` before `admin` ran.
    fn pool(&mut self) -> Result<Option<Pool>>;

    /// The state of every GPU of the pool, index = GPU ID. A corrupt entry is
    /// reported as `GpuSlot::Corrupt` without failing the others.
    fn slots(&mut self) -> Result<Vec<GpuSlot>>;

    /// Claims GPUs per `alloc::plan`, all or nothing, ending dead reservations on
    /// the claimed GPUs (with history). Waiters come first (see `queue`): dead
    /// entries are dropped, free GPUs are handed to the live ones, and the request
    /// gets only what is left. Returns the claimed IDs, ascending.
    fn allocate(&mut self, request: &AllocRequest) -> Result<Vec<u32>>;

    /// Like `allocate`, but when the GPUs are not available yet (a retryable error)
    /// the request joins the end of the queue, waited for by `waiter`, and collects
    /// what it can at once. Other errors are returned as by `allocate`.
    fn join_queue(&mut self, request: &AllocRequest, waiter: &RunOwner) -> Result<QueueStep>;

    /// One turn of the waiter of entry `tick.entry_id` (see `QueueTick`). Fails when
    /// the entry is no longer queued.
    fn queue_step(&mut self, tick: &QueueTick) -> Result<QueueStep>;

    /// Removes the entry from the queue and ends the partial reservations it
    /// collected (with history). Returns the freed IDs; nothing if it is gone.
    fn leave_queue(&mut self, entry_id: &str, now: UnixTime) -> Result<Vec<u32>>;

    /// The queued entries in order, dead ones included (see `QueueEntry::is_alive`).
    fn queue(&mut self) -> Result<Vec<QueueEntry>>;

    /// Starts noticing changes made by other processes that may help a waiter: GPUs
    /// freed, waiters served or gone.
    fn watch_changes(&mut self) -> Result<()>;

    /// Waits up to `timeout` for a change since `watch_changes` or the last call;
    /// returns whether one happened. May also return true for unrelated changes.
    fn wait_for_change(&mut self, timeout: Duration) -> Result<bool>;

    /// Stops what `watch_changes` started (Redis: the subscription and its thread).
    fn stop_watching(&mut self);

    /// Ends the reservations in `scope`, recording history. Returns the freed IDs.
    fn release(&mut self, scope: &ReleaseScope, now: UnixTime) -> Result<Vec<u32>>;

    /// Refreshes the heartbeat of a run reservation on `gpus`. Returns the GPUs it
    /// still holds; the others were released or taken meanwhile.
    fn heartbeat(&mut self, reservation_id: &str, gpus: &[u32], now: UnixTime) -> Result<Vec<u32>>;

    /// Puts a run reservation back where the store lost it (a Redis restart without
    /// persistence, a stale-reservation cleanup during a long outage). Recreates the
    /// pool record if it is missing. Each requested GPU of the pool that is free,
    /// holds this reservation, or holds one that has ended (which is ended, with
    /// history) gets the reservation with a fresh heartbeat; a GPU that another live
    /// reservation holds is left alone and reported as taken.
    fn reassert(&mut self, request: &ReassertRequest) -> Result<Reasserted>;

    /// Finished reservations overlapping `[from, to]` (end ≥ from, start ≤ to).
    fn history(&mut self, from: UnixTime, to: UnixTime) -> Result<Vec<UsageRecord>>;

    /// What `report::tally` makes of `history(from, to)`: per-account seconds inside
    /// `[from, to]` and counts, computed without holding every record in memory.
    fn usage_summary(&mut self, from: UnixTime, to: UnixTime) -> Result<Vec<UserUsage>>;
}

/// Days of usage history kept unless `history.retention_days` says otherwise.
pub const DEFAULT_HISTORY_RETENTION_DAYS: u32 = 90;
/// Every write that records history prunes at most this many expired records, so
/// pruning is continuous and never one long pause.
pub const HISTORY_PRUNE_BATCH: u32 = 100;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitOutcome {
    /// The size of the pool before, when it was re-initialised.
    pub previous_count: Option<u32>,
    /// How many active reservations `--force` ended.
    pub cleared: u32,
}

/// Opens the configured store, keeping history for the configured retention (every
/// writer prunes, so every opener must use the same setting).
pub fn open(config: &Config) -> Result<Box<dyn Store>> {
    connect(config, sqlite::SqliteStore::open_existing)
}

/// Opens the configured store, creating the embedded one (shared by every user of
/// the machine) where it does not exist yet: for `admin`.
pub fn create(config: &Config) -> Result<Box<dyn Store>> {
    connect(config, sqlite::SqliteStore::create)
}

fn connect(
    config: &Config,
    open_sqlite: fn(&std::path::Path) -> Result<sqlite::SqliteStore>,
) -> Result<Box<dyn Store>> {
    let retention = history_retention_secs(config)?;
    match &config.store {
        StoreConfig::Sqlite { path } => Ok(Box::new(
            open_sqlite(path)?.with_history_retention(retention),
        )),
        StoreConfig::Redis(redis) => Ok(Box::new(
            redis::RedisStore::connect(redis)?.with_history_retention(retention),
        )),
    }
}

/// `history.retention_days` (default 90) in seconds.
pub fn history_retention_secs(config: &Config) -> Result<i64> {
    let days = match config.settings.get("history.retention_days") {
        Some(setting) => setting.parse(|value| {
            value
                .parse::<u32>()
                .ok()
                .filter(|days| (1..=report::MAX_DAYS).contains(days))
        })?,
        None => DEFAULT_HISTORY_RETENTION_DAYS,
    };
    Ok(i64::from(days) * 86_400)
}
