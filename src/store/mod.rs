//! Persistent state: the GPU pool, reservations and usage history.
//!
//! Two implementations share one contract: `sqlite` (embedded, the default) and
//! `redis` (data compatible with upstream canhazgpu v1.1.x). Neither decides
//! anything: each loads a `pool::PoolState`, runs one operation of the pool core and
//! writes the changes it returns, atomically (one `BEGIN IMMEDIATE` transaction, or
//! one `WATCH`/`MULTI`/`EXEC` optimistic transaction).

pub mod local_wake;
pub mod redis;
pub mod sqlite;

use std::path::PathBuf;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::fleet::{HostRecord, HostSnapshot};
use crate::queue::QueueEntry;
use crate::report::UserUsage;
use crate::state::{GpuSlot, Pool, ProviderKind, RunOwner, UnixTime, UsageRecord};

/// How to reach the store, resolved from flags, environment and config file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreConfig {
    Sqlite {
        path: PathBuf,
        /// The store the system configuration names (its `state_dir`, else the
        /// default): the only one a protected install opens with its privilege.
        system: bool,
    },
    Redis(RedisConfig),
}

#[derive(Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// A full URL (`redis://`, `rediss://`, `redis+unix://`) wins over host/port/db.
    pub url: Option<String>,
    pub host: String,
    pub port: u16,
    pub db: i64,
    pub password: Option<String>,
    /// `redis.password_file`, where `password` was read from.
    pub password_file: Option<PathBuf>,
    /// The server is the one the system configuration names: the only one a
    /// protected install's password file is read for.
    pub system: bool,
    /// `redis.tls_*`: the CA to trust and the client certificate for `rediss://`
    /// (boxed: most configurations have none).
    pub tls: Box<TlsFiles>,
    pub layout: RedisLayout,
    /// Find the master through Redis Sentinel instead of at `url` or `host`.
    pub sentinel: Option<SentinelConfig>,
}

/// `redis.tls_ca_file`, `redis.tls_client_cert` and `redis.tls_client_key`: where
/// they are, and (once the configuration is resolved) what they hold.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// The files' contents (PEM), read by `config::resolve`.
    pub ca: Option<Vec<u8>>,
    pub client: Option<(Vec<u8>, Vec<u8>)>,
}

/// Never shows the client key.
impl std::fmt::Debug for TlsFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsFiles")
            .field("ca_file", &self.ca_file)
            .field("client_cert", &self.client_cert)
            .field("client_key", &self.client_key)
            .field("loaded", &(self.ca.is_some(), self.client.is_some()))
            .finish()
    }
}

/// How pools are laid out in Redis (`redis.layout`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RedisLayout {
    /// One pool per host, its keys under the hash tag `canhazgpu:{HOST}:`, and a
    /// registry of the hosts (`canhazgpu:hosts`).
    Fleet,
    /// Upstream canhazgpu's single pool (`canhazgpu:gpu_count`, ...), shared with an
    /// upstream installation on the same host.
    Upstream,
}

/// `redis.sentinels` and `redis.sentinel_master`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SentinelConfig {
    /// The sentinels' `host:port`.
    pub nodes: Vec<(String, u16)>,
    /// The name the sentinels know the master by.
    pub master: String,
}

/// Never shows the password, not even inside the URL.
impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &self.url.as_deref().map(redis::without_password))
            .field("host", &self.host)
            .field("port", &self.port)
            .field("db", &self.db)
            .field("password", &self.password.as_ref().map(|_| "<hidden>"))
            .field("password_file", &self.password_file)
            .field("system", &self.system)
            .field("tls", &self.tls)
            .field("layout", &self.layout)
            .field("sentinel", &self.sentinel)
            .finish()
    }
}

pub use crate::pool::{
    AllocRequest, ExtendRequest, Force, GpuReading, InitOutcome, NewEnd, NewReservation, Noticed,
    Operation, Outcome, Policy, QueueStep, QueueTick, ReassertRequest, Reasserted, ReleaseScope,
    Released, TickRequest, TransferRequest,
};

/// What a waiter's cheap periodic refresh learns (`Store::queue_beat`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueBeat {
    /// 1-based position among the stored entries (dead ones not dropped yet count).
    pub position: u32,
    /// The first stored entry (this one, at position 1), so a waiter behind a dead
    /// head can take the turn that drops it.
    pub head: Option<QueueEntry>,
}

/// One host's stored pool and published snapshot (`Store::host_views`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostData {
    pub pool: Pool,
    pub view: PoolView,
    pub snapshot: Option<HostSnapshot>,
}

/// The slots, with the queue entries that hold partial reservations on them: what
/// `status` needs, however long the queue is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolView {
    pub slots: Vec<GpuSlot>,
    pub collecting: Vec<QueueEntry>,
}

/// The contract every backend implements. All methods are atomic with respect to
/// each other, across processes and (for Redis) machines.
pub trait Store: Send {
    /// Runs one operation of the pool core atomically with respect to every other
    /// client: load the state it needs, `pool::apply`, write the changes (also when
    /// the outcome is a refusal), wake whom they concern.
    fn run(&mut self, operation: &Operation) -> Result<Outcome>;

    /// Creates the pool. Fails if it exists unless `force`, which ends every
    /// reservation (recording history) and sets the new size and provider.
    fn init_pool(
        &mut self,
        gpu_count: u32,
        provider: ProviderKind,
        force: bool,
        now: UnixTime,
    ) -> Result<InitOutcome> {
        match self.run(&Operation::Init {
            gpu_count,
            provider,
            force,
            now,
        })? {
            Outcome::Init(outcome) => Ok(outcome),
            other => Err(unexpected(other)),
        }
    }

    /// The pool, or `None` before `admin` ran.
    fn pool(&mut self) -> Result<Option<Pool>>;

    /// The state of every GPU of the pool, index = GPU ID. A corrupt entry is
    /// reported as `GpuSlot::Corrupt` without failing the others.
    fn slots(&mut self) -> Result<Vec<GpuSlot>> {
        Ok(self.pool_view()?.slots)
    }

    /// Claims GPUs per `alloc::plan`, all or nothing, ending dead reservations on
    /// the claimed GPUs (with history). Waiters come first (see `queue`): dead
    /// entries are dropped, free GPUs are handed to the live ones, and the request
    /// gets only what is left. Returns the claimed IDs, ascending.
    fn allocate(&mut self, request: &AllocRequest) -> Result<Vec<u32>> {
        gpu_ids(self.run(&Operation::Allocate(request))?)
    }

    /// Like `allocate`, but when the GPUs are not available yet (a retryable error)
    /// the request joins the end of the queue, waited for by `waiter`, and collects
    /// what it can at once. Other errors are returned as by `allocate`.
    ///
    /// Three steps, each atomic: the allocation, the append, and the entry's first
    /// turn. When nothing is free, the first and last change nothing, so a crowd
    /// joining at once contends only for the appends, which never conflict.
    fn join_queue(&mut self, request: &AllocRequest, waiter: &RunOwner) -> Result<QueueStep> {
        match self.allocate(request) {
            Ok(claimed) => return Ok(QueueStep::Served(claimed)),
            Err(refusal) if !refusal.is_retryable() => return Err(refusal),
            Err(_) => {}
        }
        let entry = QueueEntry::new(
            &request.reservation,
            &request.selection,
            waiter,
            request.now,
        );
        self.enqueue(&entry)?;
        self.queue_step(&QueueTick {
            entry_id: entry.id,
            unreserved: Some(request.unreserved.clone()),
            dead_ids: request.dead_ids.clone(),
            now: request.now,
        })
    }

    /// Appends `entry` to the queue (a step of `join_queue`).
    fn enqueue(&mut self, entry: &QueueEntry) -> Result<()>;

    /// One turn of the waiter of entry `tick.entry_id` (see `QueueTick`). Fails when
    /// the entry is no longer queued.
    fn queue_step(&mut self, tick: &QueueTick) -> Result<QueueStep> {
        match self.run(&Operation::Step(tick))? {
            Outcome::Step(step) => Ok(step),
            other => Err(unexpected(other)),
        }
    }

    /// Removes the entry from the queue and ends the partial reservations it
    /// collected (with history). Returns the freed IDs; nothing if it is gone.
    fn leave_queue(&mut self, entry_id: &str, now: UnixTime) -> Result<Vec<u32>> {
        gpu_ids(self.run(&Operation::Leave { entry_id, now })?)
    }

    /// The queued entries in order, dead ones included (see `QueueEntry::is_alive`).
    fn queue(&mut self) -> Result<Vec<QueueEntry>>;

    /// The slots and the entries collecting on them, read together.
    fn pool_view(&mut self) -> Result<PoolView>;

    /// A waiter's cheap refresh between turns: keeps its entry fresh and says where it
    /// stands, without reading the queue or waking anyone. Fails when the entry is no
    /// longer queued.
    fn queue_beat(&mut self, entry_id: &str, now: UnixTime) -> Result<QueueBeat>;

    /// Starts noticing the changes that concern queue entry `entry_id` alone: it was
    /// given GPUs, removed, or is the head of the queue when GPUs are freed. Calls
    /// `wake` for each (from another thread).
    fn watch_entry(&mut self, entry_id: &str, wake: Wake) -> Result<()>;

    /// Stops what `watch_entry` started.
    fn stop_watching(&mut self);

    /// Ends the reservations in `scope`, recording history. Answers the freed IDs
    /// and why each other GPU named by the scope was not the caller's.
    fn release(&mut self, scope: &ReleaseScope, now: UnixTime) -> Result<Released> {
        match self.run(&Operation::Release { scope, now })? {
            Outcome::Released(released) => Ok(released),
            other => Err(unexpected(other)),
        }
    }

    /// Lengthens manual reservations in place, as `pool::extend` decides. Answers
    /// each GPU with its new end.
    fn extend(&mut self, request: &ExtendRequest) -> Result<Vec<(u32, UnixTime)>> {
        match self.run(&Operation::Extend(request))? {
            Outcome::Extended(ends) => Ok(ends),
            other => Err(unexpected(other)),
        }
    }

    /// The agent's periodic turn (`pool::tick`): measurements, the idle policy and
    /// what people must be told.
    fn tick(&mut self, request: &TickRequest) -> Result<Noticed> {
        match self.run(&Operation::Tick(request))? {
            Outcome::Noticed(noticed) => Ok(noticed),
            other => Err(unexpected(other)),
        }
    }

    /// Hands manual reservations to another user in one change (`pool::transfer`).
    fn transfer(&mut self, request: &TransferRequest) -> Result<Vec<u32>> {
        gpu_ids(self.run(&Operation::Transfer(request))?)
    }

    /// Refreshes the heartbeat of a run reservation on `gpus`. Returns the GPUs it
    /// still holds; the others were released or taken meanwhile.
    fn heartbeat(&mut self, reservation_id: &str, gpus: &[u32], now: UnixTime) -> Result<Vec<u32>> {
        gpu_ids(self.run(&Operation::Heartbeat {
            reservation_id,
            gpus,
            now,
        })?)
    }

    /// Puts a run reservation back where the store lost it (a Redis restart without
    /// persistence, a stale-reservation cleanup during a long outage). Recreates the
    /// pool record if it is missing. Each requested GPU of the pool that is free,
    /// holds this reservation, or holds one that has ended (which is ended, with
    /// history) gets the reservation with a fresh heartbeat; a GPU that another live
    /// reservation holds is left alone and reported as taken.
    fn reassert(&mut self, request: &ReassertRequest) -> Result<Reasserted> {
        match self.run(&Operation::Reassert(request))? {
            Outcome::Reasserted(outcome) => Ok(outcome),
            other => Err(unexpected(other)),
        }
    }

    /// Takes the selected host's pool out of the fleet (`admin --remove-host`), as
    /// `pool::retire` decides: its history stays for `report`. Answers how many
    /// reservations `force` ended.
    fn retire(&mut self, force: bool, now: UnixTime) -> Result<u32> {
        match self.run(&Operation::Retire { force, now })? {
            Outcome::Retired(ended) => Ok(ended),
            other => Err(unexpected(other)),
        }
    }

    /// The selected host's allocation counters (`pool::Counted`), since its pool was made.
    fn counted(&mut self) -> Result<crate::pool::Counted>;

    /// The Unix users who muted their notifications (`notify --off`), fleet-wide.
    fn muted_users(&mut self) -> Result<std::collections::BTreeSet<String>>;

    /// Mutes or unmutes `user`'s notifications.
    fn set_muted(&mut self, user: &str, muted: bool) -> Result<()>;

    /// The hosts whose pools this store holds, by name: the fleet's registry, or
    /// just this host (the embedded store, Redis's upstream layout).
    fn hosts(&mut self) -> Result<Vec<HostRecord>>;

    /// The host whose pool the operations act on: this host unless `select_host`.
    fn selected_host(&self) -> &str;

    /// Makes the operations act on host `name`'s pool. Only the fleet layout holds
    /// other hosts' pools; a name it does not know fails at the first read, with
    /// `missing_pool`.
    fn select_host(&mut self, name: &str) -> Result<()>;

    /// Publishes the selected host's GPU snapshot for the rest of the fleet and,
    /// with `interval_secs`, how often it will from now on. Does nothing where no
    /// other host reads it.
    fn publish_snapshot(
        &mut self,
        snapshot: &HostSnapshot,
        interval_secs: Option<u64>,
    ) -> Result<()>;

    /// The selected host's latest published snapshot.
    fn host_snapshot(&mut self) -> Result<Option<HostSnapshot>>;

    /// The pools of `names` with their latest snapshots, for the fleet's views: a
    /// host that cannot be read fails alone. The selected host stays as it was.
    fn host_views(&mut self, names: &[String]) -> Result<Vec<Result<HostData>>> {
        let selected = self.selected_host().to_string();
        let mut views = Vec::with_capacity(names.len());
        for name in names {
            self.select_host(name)?;
            views.push(match self.pool()? {
                None => Err(self.missing_pool()),
                Some(pool) => self.pool_view().and_then(|view| {
                    Ok(HostData {
                        pool,
                        view,
                        snapshot: self.host_snapshot()?,
                    })
                }),
            });
        }
        self.select_host(&selected)?;
        Ok(views)
    }

    /// Why the selected host has no pool: `NotInitialized`, or more where the store
    /// can tell (an unknown host, an upstream pool in the other layout).
    fn missing_pool(&mut self) -> Error {
        Error::NotInitialized
    }

    /// Whether the store moved to another server since this was last asked (Redis
    /// followed a Sentinel failover): that server may have missed the latest writes.
    fn followed_failover(&mut self) -> bool {
        false
    }

    /// Finished reservations overlapping `[from, to]` (end ≥ from, start ≤ to).
    fn history(&mut self, from: UnixTime, to: UnixTime) -> Result<Vec<UsageRecord>>;

    /// What `report::tally` makes of `history(from, to)`: per-account seconds inside
    /// `[from, to]` and counts, computed without holding every record in memory.
    fn usage_summary(&mut self, from: UnixTime, to: UnixTime) -> Result<Vec<UserUsage>>;
}

/// The GPU IDs an operation answered.
fn gpu_ids(outcome: Outcome) -> Result<Vec<u32>> {
    match outcome {
        Outcome::Gpus(gpus) => Ok(gpus),
        other => Err(unexpected(other)),
    }
}

/// An answer of the wrong kind: `pool::apply` never gives one.
fn unexpected(outcome: Outcome) -> crate::error::Error {
    crate::error::Error::Runtime(format!("unexpected answer from the pool core: {outcome:?}"))
}

/// Called when a watched entry may have changed; cheap, from any thread.
pub type Wake = std::sync::Arc<dyn Fn() + Send + Sync>;

/// Days of usage history kept unless `history.retention_days` says otherwise.
pub const DEFAULT_HISTORY_RETENTION_DAYS: u32 = 90;
/// Every write that records history prunes at most this many expired records, so
/// pruning is continuous and never one long pause.
pub const HISTORY_PRUNE_BATCH: u32 = 100;

/// Opens the configured store on this host's pool, keeping the configured days of
/// history (every writer prunes, so every opener must use the same setting).
pub fn open(config: &Config) -> Result<Box<dyn Store>> {
    let retention = i64::from(config.history_retention_days) * 86_400;
    match &config.store {
        StoreConfig::Sqlite { path, system } => Ok(Box::new(
            sqlite::SqliteStore::open_existing(path, *system)?
                .with_history_retention(retention)
                .with_host(&config.host_name),
        )),
        StoreConfig::Redis(redis) => Ok(Box::new(
            redis::RedisStore::connect(redis)?
                .with_history_retention(retention)
                .with_host(&config.host_name),
        )),
    }
}

/// An existing embedded store whose files `admin` gave their layout again.
pub struct Relaid {
    pub path: PathBuf,
    pub layout: sqlite::Layout,
}

/// Opens the configured store, creating the embedded one where it does not exist
/// yet (shared by every user, or protected on a protected install), or giving an
/// existing one its layout again: for `admin`. Says which store it re-laid.
pub fn create(config: &Config) -> Result<(Box<dyn Store>, Option<Relaid>)> {
    match &config.store {
        StoreConfig::Sqlite { path, system } => {
            let (store, layout, changed) = sqlite::SqliteStore::create(path, *system)?;
            let store = store
                .with_history_retention(i64::from(config.history_retention_days) * 86_400)
                .with_host(&config.host_name);
            let relaid = changed.then(|| Relaid {
                path: path.clone(),
                layout,
            });
            Ok((Box::new(store), relaid))
        }
        StoreConfig::Redis(_) => Ok((open(config)?, None)),
    }
}
