//! The Redis store, data-compatible with upstream canhazgpu v1.1.x.
//!
//! Every change is an optimistic transaction: `WATCH` the keys the operation reads,
//! read them (pipelined), run the pool core, and write its changes with `MULTI`/`EXEC`;
//! when another client changed a watched key meanwhile, `EXEC` does nothing and the
//! whole operation runs again after a short, jittered pause. No decision is made in
//! Redis (there are no scripts). Keys and JSON are upstream's (see `codec`), and an
//! upstream client's `canhazgpu:allocation_lock` is waited for.

mod codec;
mod connection;
mod history;
mod watch;

use std::collections::{BTreeMap, HashMap};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use redis::{Client, Connection, RedisResult};

use super::{
    AllocRequest, DEFAULT_HISTORY_RETENTION_DAYS, HISTORY_PRUNE_BATCH, InitOutcome, PoolView,
    QueueBeat, QueueStep, QueueTick, ReassertRequest, Reasserted, RedisConfig, ReleaseScope, Store,
    Wake,
};
use crate::error::{Error, Result};
use crate::gpu::procinfo;
use crate::pool::{self, Changes, PoolState, SlotWrite, Transition};
use crate::queue::QueueEntry;
use crate::report::UserUsage;
use crate::state::{GpuSlot, Pool, ProviderKind, UnixTime, UsageRecord};

pub use connection::without_password;
use connection::{connect_error, connection_info, display_location, one_line};
use watch::Watch;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// How long an operation keeps trying when other clients keep changing what it read
/// (or upstream holds its allocation lock, which expires after 10 s).
const TRANSACTION_PATIENCE: Duration = Duration::from_secs(15);

/// The names of the keys, as upstream canhazgpu lays them out.
struct Keys {
    prefix: &'static str,
}

impl Keys {
    const UPSTREAM: Keys = Keys {
        prefix: "canhazgpu:",
    };

    fn gpu_count(&self) -> String {
        format!("{}gpu_count", self.prefix)
    }
    fn provider(&self) -> String {
        format!("{}provider", self.prefix)
    }
    fn gpu(&self, id: u32) -> String {
        format!("{}gpu:{id}", self.prefix)
    }
    fn queue(&self) -> String {
        format!("{}queue", self.prefix)
    }
    fn entry(&self, id: &str) -> String {
        format!("{}queue:entry:{id}", self.prefix)
    }
    fn history(&self) -> String {
        format!("{}usage_history_sorted", self.prefix)
    }
    fn last_used(&self, account: &str) -> String {
        format!("{}user_last_used:{account}", self.prefix)
    }
    /// Upstream's global lock around its allocations.
    fn allocation_lock(&self) -> String {
        format!("{}allocation_lock", self.prefix)
    }
    /// Published when GPUs are freed or waiters leave.
    fn wake_pool(&self) -> String {
        format!("{}queue:wake", self.prefix)
    }
    /// Published when a change concerns one queue entry.
    fn wake_entry(&self, id: &str) -> String {
        format!("{}queue:wake:{id}", self.prefix)
    }
}

pub struct RedisStore {
    client: Client,
    /// Dropped after an I/O error and reopened by the next call, so that a long-running
    /// supervisor survives a Redis restart. Never shared: `WATCH` belongs to it.
    connection: Option<Connection>,
    /// Where the store lives, without any password, for messages.
    location: String,
    keys: Keys,
    /// This machine, whose processes a transaction checks (`PoolState::find_gone`).
    host: String,
    /// Wake-ups for a pool watcher (`watch_changes`).
    pool_watch: Option<(Watch, Receiver<()>)>,
    /// Wake-ups for a waiter's own entry (`watch_entry`).
    entry_watch: Option<Watch>,
    /// Seconds of history kept; writes that record history prune older records.
    history_retention: i64,
    /// Transactions run again because another client changed what they read.
    retries: u32,
}

/// What a transaction read besides the state: what it needs to write its changes.
struct Loaded {
    state: PoolState,
    /// The JSON of each readable entry, so an update keeps upstream's fields.
    raw_entries: HashMap<String, String>,
    /// Upstream holds its allocation lock.
    locked: bool,
}

impl RedisStore {
    /// Connects to the configured Redis (timeouts: 3 s to connect, 5 s per reply).
    pub fn connect(config: &RedisConfig) -> Result<Self> {
        // rediss:// goes through rustls, which needs a process-wide crypto provider;
        // installing it twice is harmless (the second call reports the first).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let location = display_location(config);
        let client = connection_info(config)
            .and_then(Client::open)
            .map_err(|err| connect_error(&location, err))?;
        let mut store = RedisStore {
            client,
            connection: None,
            location,
            keys: Keys::UPSTREAM,
            host: procinfo::hostname(),
            pool_watch: None,
            entry_watch: None,
            history_retention: i64::from(DEFAULT_HISTORY_RETENTION_DAYS) * 86_400,
            retries: 0,
        };
        store.connection()?;
        Ok(store)
    }

    /// Keeps `seconds` of history instead of the default 90 days.
    pub fn with_history_retention(mut self, seconds: i64) -> Self {
        self.history_retention = seconds;
        self
    }

    /// How many transactions ran again because of a concurrent change.
    pub fn retries(&self) -> u32 {
        self.retries
    }

    fn connection(&mut self) -> Result<&mut Connection> {
        let connection = match self.connection.take() {
            Some(connection) => connection,
            None => self
                .client
                .get_connection_with_timeout(CONNECT_TIMEOUT)
                .and_then(|connection| {
                    connection.set_read_timeout(Some(IO_TIMEOUT))?;
                    connection.set_write_timeout(Some(IO_TIMEOUT))?;
                    Ok(connection)
                })
                .map_err(|err| connect_error(&self.location, err))?,
        };
        Ok(self.connection.insert(connection))
    }

    /// Runs Redis commands; an I/O failure drops the connection (the next call opens
    /// a new one) and becomes one line naming the server.
    fn call<T>(&mut self, command: impl FnOnce(&mut Connection) -> RedisResult<T>) -> Result<T> {
        let result = command(self.connection()?);
        result.map_err(|err| {
            if err.is_io_error() || err.is_unrecoverable_error() {
                self.connection = None;
            }
            Error::Store(format!(
                "Redis at {} failed: {}",
                self.location,
                one_line(&err)
            ))
        })
    }

    /// Reads the pool, its slots and its queue (and the last use of the accounts
    /// placement may consult), watching every key a decision depends on when `watch`.
    fn load(&mut self, requester: Option<&str>, watch: bool) -> Result<Loaded> {
        let keys = &self.keys;
        let (count_key, provider_key, queue_key, lock_key) = (
            keys.gpu_count(),
            keys.provider(),
            keys.queue(),
            keys.allocation_lock(),
        );
        let mut first = redis::pipe();
        if watch {
            first
                .cmd("WATCH")
                .arg(&count_key)
                .arg(&provider_key)
                .arg(&queue_key)
                .arg(&lock_key)
                .ignore();
        }
        first
            .cmd("MGET")
            .arg(&count_key)
            .arg(&provider_key)
            .cmd("ZRANGE")
            .arg(&queue_key)
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .cmd("EXISTS")
            .arg(&lock_key);
        type First = ((Option<String>, Option<String>), Vec<(String, f64)>, bool);
        let ((count, provider), queued, locked): First =
            self.call(|connection| first.query(connection))?;
        let pool = self.decode_pool(count, provider)?;
        let gpu_count = pool.map_or(0, |pool| pool.gpu_count);

        let gpu_keys: Vec<String> = (0..gpu_count).map(|id| self.keys.gpu(id)).collect();
        let entry_ids: Vec<&String> = queued.iter().map(|(id, _)| id).collect();
        let entry_keys: Vec<String> = entry_ids.iter().map(|id| self.keys.entry(id)).collect();
        let mut second = redis::pipe();
        if watch && !gpu_keys.is_empty() {
            second.cmd("WATCH").arg(&gpu_keys).ignore();
        }
        second.cmd("MGET").arg(&gpu_keys);
        second.cmd("MGET").arg(&entry_keys);
        let (gpus, entries): (Vec<Option<String>>, Vec<Option<String>>) =
            if gpu_keys.is_empty() && entry_keys.is_empty() {
                (Vec::new(), Vec::new())
            } else if entry_keys.is_empty() {
                let mut only_gpus = redis::pipe();
                if watch {
                    only_gpus.cmd("WATCH").arg(&gpu_keys).ignore();
                }
                only_gpus.cmd("MGET").arg(&gpu_keys);
                let (gpus,): (Vec<Option<String>>,) =
                    self.call(|connection| only_gpus.query(connection))?;
                (gpus, Vec::new())
            } else if gpu_keys.is_empty() {
                let entries: Vec<Option<String>> =
                    self.call(|connection| redis::cmd("MGET").arg(&entry_keys).query(connection))?;
                (Vec::new(), entries)
            } else {
                self.call(|connection| second.query(connection))?
            };

        let mut state = PoolState {
            pool,
            ..PoolState::default()
        };
        for (id, raw) in (0..).zip(&gpus) {
            let (slot, partial) = codec::decode_slot(id, raw.as_deref());
            if let Some(entry) = partial {
                state.partials.insert(id, entry);
            }
            state.slots.push(slot);
        }
        let mut raw_entries = HashMap::new();
        for (id, raw) in entry_ids.iter().zip(entries) {
            match raw.as_deref().and_then(|raw| codec::decode_entry(id, raw)) {
                Some(entry) => {
                    raw_entries.insert(entry.id.clone(), raw.unwrap_or_default());
                    state.queue.push(entry);
                }
                None => state.unreadable_entries.push(id.to_string()),
            }
        }
        state.link_partials();
        let accounts = PoolState::accounts_needed(&state.queue, requester);
        if !accounts.is_empty() && pool.is_some() {
            let mut reads = redis::pipe();
            for account in &accounts {
                reads.cmd("HGETALL").arg(self.keys.last_used(account));
            }
            let used: Vec<Vec<(String, String)>> =
                self.call(|connection| reads.query(connection))?;
            for (account, pairs) in accounts.into_iter().zip(used) {
                let used = pairs
                    .iter()
                    .filter_map(|(gpu, at)| Some((gpu.parse().ok()?, at.parse().ok()?)))
                    .collect();
                state.last_used.insert(account, used);
            }
        }
        Ok(Loaded {
            state,
            raw_entries,
            locked,
        })
    }

    /// The pool from `canhazgpu:gpu_count` and `canhazgpu:provider`, validated with
    /// the limits `admin` enforces.
    fn decode_pool(&self, count: Option<String>, provider: Option<String>) -> Result<Option<Pool>> {
        let Some(count) = count else {
            return Ok(None);
        };
        let gpu_count = count
            .parse()
            .ok()
            .filter(|count| (1..=pool::MAX_GPUS).contains(count))
            .ok_or_else(|| {
                Error::Store(format!(
                    "invalid {} in Redis: '{count}'",
                    self.keys.gpu_count()
                ))
            })?;
        // Pools created before upstream recorded the provider are NVIDIA pools.
        let provider = match provider {
            None => ProviderKind::Nvidia,
            Some(name) => ProviderKind::parse(&name).ok_or_else(|| {
                Error::Store(format!(
                    "unknown GPU provider '{name}' in {}",
                    self.keys.provider()
                ))
            })?,
        };
        Ok(Some(Pool {
            gpu_count,
            provider,
        }))
    }

    /// Runs one operation of the pool core as an optimistic transaction, again and
    /// again while other clients change what it read.
    fn operate<T>(
        &mut self,
        requester: Option<&str>,
        now: UnixTime,
        operation: impl Fn(&PoolState) -> Transition<T>,
    ) -> Result<T> {
        let started = Instant::now();
        let mut pause = Duration::from_millis(2);
        loop {
            let mut loaded = self.load(requester, true)?;
            loaded.state.find_gone(&self.host, |process| {
                procinfo::process_alive(process.pid, process.pid_start)
            });
            let transition = (!loaded.locked).then(|| operation(&loaded.state));
            let committed = match &transition {
                None => {
                    self.call(|connection| redis::cmd("UNWATCH").query::<()>(connection))?;
                    false
                }
                Some(transition) if transition.changes.is_empty() => {
                    self.call(|connection| redis::cmd("UNWATCH").query::<()>(connection))?;
                    true
                }
                Some(transition) => self.commit(&loaded, &transition.changes, now)?,
            };
            if committed && let Some(transition) = transition {
                return transition.outcome;
            }
            if started.elapsed() > TRANSACTION_PATIENCE {
                return Err(Error::Store(if loaded.locked {
                    format!(
                        "Redis at {}: upstream canhazgpu held {} for over {} s",
                        self.location,
                        self.keys.allocation_lock(),
                        TRANSACTION_PATIENCE.as_secs()
                    )
                } else {
                    format!(
                        "Redis at {}: other clients kept changing the pool for over {} s",
                        self.location,
                        TRANSACTION_PATIENCE.as_secs()
                    )
                }));
            }
            self.retries += 1;
            std::thread::sleep(jittered(pause));
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }

    /// Writes `changes` in one `MULTI`/`EXEC`; false when a watched key changed.
    fn commit(&mut self, loaded: &Loaded, changes: &Changes, now: UnixTime) -> Result<bool> {
        let prune = if changes.history.is_empty() {
            None
        } else {
            Some(self.prune_bound(now - self.history_retention)?)
        };
        let keys = &self.keys;
        let mut tx = redis::pipe();
        tx.atomic();
        if let Some(pool) = changes.pool {
            tx.set(keys.gpu_count(), pool.gpu_count).ignore();
            tx.set(keys.provider(), pool.provider.as_str()).ignore();
        }
        for &gpu in &changes.removed_gpus {
            tx.del(keys.gpu(gpu)).ignore();
        }
        for (gpu, write) in &changes.gpus {
            match write {
                SlotWrite::Free {
                    last_released: None,
                } => tx.del(keys.gpu(*gpu)).ignore(),
                SlotWrite::Free {
                    last_released: Some(at),
                } => tx.set(keys.gpu(*gpu), codec::encode_released(*at)).ignore(),
                SlotWrite::Held {
                    reservation,
                    collected_for,
                } => tx
                    .set(
                        keys.gpu(*gpu),
                        codec::encode_held(reservation, collected_for.as_deref()),
                    )
                    .ignore(),
            };
        }
        for id in &changes.entries_removed {
            tx.zrem(keys.queue(), id).ignore();
            tx.del(keys.entry(id)).ignore();
        }
        for entry in &changes.entries_updated {
            let json = match loaded.raw_entries.get(&entry.id) {
                Some(raw) => codec::patch_entry(raw, entry),
                None => codec::encode_entry(entry),
            };
            tx.set(keys.entry(&entry.id), json).ignore();
        }
        let mut last_used: BTreeMap<(&str, u32), UnixTime> = BTreeMap::new();
        for (account, gpu, at) in &changes.last_used {
            let latest = last_used.entry((account.as_str(), *gpu)).or_insert(*at);
            *latest = (*latest).max(*at);
        }
        for ((account, gpu), at) in last_used {
            tx.hset(keys.last_used(account), gpu, at).ignore();
        }
        for entry in &changes.history {
            tx.zadd(
                keys.history(),
                codec::encode_history(entry),
                entry.record.end_time,
            )
            .ignore();
        }
        if let Some(bound) = prune {
            tx.cmd("ZREMRANGEBYSCORE")
                .arg(keys.history())
                .arg("-inf")
                .arg(bound)
                .ignore();
        }
        for id in &changes.wake_entries {
            tx.publish(keys.wake_entry(id), 1).ignore();
        }
        if changes.wake_pool {
            tx.publish(keys.wake_pool(), 1).ignore();
        }
        let done: Option<()> = self.call(|connection| tx.query(connection))?;
        Ok(done.is_some())
    }

    /// The highest score a write may prune: records that ended before `cutoff`, at
    /// most `HISTORY_PRUNE_BATCH` of them (more only when they share an end second).
    fn prune_bound(&mut self, cutoff: UnixTime) -> Result<String> {
        let key = self.keys.history();
        let batch_end: Vec<(String, f64)> = self.call(|connection| {
            redis::cmd("ZRANGEBYSCORE")
                .arg(&key)
                .arg("-inf")
                .arg(format!("({cutoff}"))
                .arg("WITHSCORES")
                .arg("LIMIT")
                .arg(HISTORY_PRUNE_BATCH - 1)
                .arg(1)
                .query(connection)
        })?;
        Ok(match batch_end.first() {
            Some((_, score)) => format!("{score}"),
            None => format!("({cutoff}"),
        })
    }

    fn read<T>(&mut self, read: impl FnOnce(PoolState) -> Result<T>) -> Result<T> {
        let loaded = self.load(None, false)?;
        read(loaded.state)
    }

    /// The slots and the entries collecting on them: the queue's length does not
    /// matter here.
    fn read_view(&mut self) -> Result<PoolView> {
        let pool = self.pool()?.ok_or(Error::NotInitialized)?;
        let gpu_keys: Vec<String> = (0..pool.gpu_count).map(|id| self.keys.gpu(id)).collect();
        let gpus: Vec<Option<String>> =
            self.call(|connection| redis::cmd("MGET").arg(&gpu_keys).query(connection))?;
        let mut state = PoolState::default();
        for (id, raw) in (0..).zip(&gpus) {
            let (slot, partial) = codec::decode_slot(id, raw.as_deref());
            if let Some(entry) = partial {
                state.partials.insert(id, entry);
            }
            state.slots.push(slot);
        }
        let mut ids: Vec<&String> = state.partials.values().collect();
        ids.sort();
        ids.dedup();
        if !ids.is_empty() {
            let entry_keys: Vec<String> = ids.iter().map(|id| self.keys.entry(id)).collect();
            let entries: Vec<Option<String>> =
                self.call(|connection| redis::cmd("MGET").arg(&entry_keys).query(connection))?;
            state.queue = ids
                .iter()
                .zip(entries)
                .filter_map(|(id, raw)| codec::decode_entry(id, raw.as_deref()?))
                .collect();
        }
        state.link_partials();
        Ok(PoolView {
            slots: state.slots,
            collecting: state.queue,
        })
    }
}

fn unix_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_nanos())
        .unwrap_or(0)
}

/// Between half and all of `pause`, so that clients that collided do not collide
/// again in step.
fn jittered(pause: Duration) -> Duration {
    let noise =
        (unix_nanos() as u64 ^ u64::from(std::process::id()).wrapping_mul(0x9e37_79b9)) % 1000;
    pause / 2 + pause * noise as u32 / 2000
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        // For benchmarks: how often this process's transactions had to run again.
        if self.retries > 0 && std::env::var_os("CANHAZGPU_REPORT_RETRIES").is_some() {
            eprintln!("canhazgpu: {} Redis transaction retries", self.retries);
        }
    }
}

fn not_initialized<T>(state: &PoolState, value: impl FnOnce(&PoolState) -> T) -> Result<T> {
    if state.pool.is_none() {
        return Err(Error::NotInitialized);
    }
    Ok(value(state))
}

impl Store for RedisStore {
    fn init_pool(
        &mut self,
        gpu_count: u32,
        provider: ProviderKind,
        force: bool,
        now: UnixTime,
    ) -> Result<InitOutcome> {
        self.operate(None, now, |state| {
            pool::init(state, gpu_count, provider, force, now)
        })
    }

    fn pool(&mut self) -> Result<Option<Pool>> {
        let (count, provider): (Option<String>, Option<String>) = self.call(|connection| {
            redis::cmd("MGET")
                .arg(Keys::UPSTREAM.gpu_count())
                .arg(Keys::UPSTREAM.provider())
                .query(connection)
        })?;
        self.decode_pool(count, provider)
    }

    fn slots(&mut self) -> Result<Vec<GpuSlot>> {
        Ok(self.read_view()?.slots)
    }

    fn pool_view(&mut self) -> Result<PoolView> {
        self.read_view()
    }

    fn allocate(&mut self, request: &AllocRequest) -> Result<Vec<u32>> {
        self.operate(
            Some(&request.reservation.actual_user),
            request.now,
            |state| pool::allocate(state, request),
        )
    }

    /// Appends without `WATCH`: an append conflicts with no other append, and every
    /// decision that depends on the queue watches it.
    fn enqueue(&mut self, entry: &QueueEntry) -> Result<()> {
        let (count_key, queue_key) = (self.keys.gpu_count(), self.keys.queue());
        let (count, tail): (Option<String>, Vec<(String, f64)>) = self.call(|connection| {
            redis::pipe()
                .get(&count_key)
                .cmd("ZRANGE")
                .arg(&queue_key)
                .arg(-1)
                .arg(-1)
                .arg("WITHSCORES")
                .query(connection)
        })?;
        if count.is_none() {
            return Err(Error::NotInitialized);
        }
        // Upstream's score: Unix nanoseconds, after every entry.
        let tail = tail.first().map_or(0.0, |(_, score)| *score);
        let score = (unix_nanos() as f64).max(tail + 1000.0);
        let entry_key = self.keys.entry(&entry.id);
        self.call(|connection| {
            redis::pipe()
                .atomic()
                .set(&entry_key, codec::encode_entry(entry))
                .ignore()
                .cmd("ZADD")
                .arg(&queue_key)
                .arg(format!("{score:.0}"))
                .arg(&entry.id)
                .ignore()
                .query::<()>(connection)
        })
    }

    fn queue_step(&mut self, tick: &QueueTick) -> Result<QueueStep> {
        self.operate(None, tick.now, |state| pool::step(state, tick))
    }

    fn leave_queue(&mut self, entry_id: &str, now: UnixTime) -> Result<Vec<u32>> {
        self.operate(None, now, |state| pool::leave(state, entry_id, now))
    }

    fn queue(&mut self) -> Result<Vec<QueueEntry>> {
        self.read(|state| not_initialized(&state, |state| state.queue.clone()))
    }

    /// Refreshes the entry's JSON in place (`SET … XX`, so a removed entry stays
    /// removed); entry keys are watched by nobody, so this wakes no one.
    fn queue_beat(&mut self, entry_id: &str, now: UnixTime) -> Result<QueueBeat> {
        let (entry_key, queue_key) = (self.keys.entry(entry_id), self.keys.queue());
        let (raw, rank, head): (Option<String>, Option<u32>, Vec<String>) =
            self.call(|connection| {
                redis::pipe()
                    .get(&entry_key)
                    .cmd("ZRANK")
                    .arg(&queue_key)
                    .arg(entry_id)
                    .cmd("ZRANGE")
                    .arg(&queue_key)
                    .arg(0)
                    .arg(0)
                    .query(connection)
            })?;
        let (Some(raw), Some(rank)) = (raw, rank) else {
            return Err(crate::queue::entry_gone());
        };
        let mut beat = redis::pipe();
        beat.cmd("SET")
            .arg(&entry_key)
            .arg(patch_heartbeat(&raw, now))
            .arg("XX")
            .ignore();
        let head_id = head.into_iter().next();
        if let Some(head_id) = &head_id {
            beat.get(self.keys.entry(head_id));
        }
        let head_raw: Vec<Option<String>> = self.call(|connection| beat.query(connection))?;
        let head = head_id
            .zip(head_raw.into_iter().next().flatten())
            .and_then(|(id, raw)| codec::decode_entry(&id, &raw));
        Ok(QueueBeat {
            position: rank + 1,
            head,
        })
    }

    fn watch_changes(&mut self) -> Result<()> {
        if self.pool_watch.is_none() {
            let (woken, wakes) = mpsc::channel();
            let woken = std::sync::Mutex::new(woken);
            let wake: Wake = std::sync::Arc::new(move || {
                if let Ok(woken) = woken.lock() {
                    let _ = woken.send(());
                }
            });
            let channel = self.keys.wake_pool();
            let watch = Watch::start(&self.client, &self.location, channel, wake)?;
            self.pool_watch = Some((watch, wakes));
        }
        Ok(())
    }

    fn watch_entry(&mut self, entry_id: &str, wake: Wake) -> Result<()> {
        let channel = self.keys.wake_entry(entry_id);
        self.entry_watch = Some(Watch::start(&self.client, &self.location, channel, wake)?);
        Ok(())
    }

    fn stop_watching(&mut self) {
        self.pool_watch = None;
        self.entry_watch = None;
    }

    fn wait_for_change(&mut self, timeout: Duration) -> Result<bool> {
        let Some((_, wakes)) = &self.pool_watch else {
            std::thread::sleep(timeout);
            return Ok(false);
        };
        let woken = match wakes.recv_timeout(timeout) {
            Ok(()) => true,
            Err(RecvTimeoutError::Timeout) => false,
            // The thread is gone; a turn now tells the waiter what happened.
            Err(RecvTimeoutError::Disconnected) => true,
        };
        while wakes.try_recv().is_ok() {}
        Ok(woken)
    }

    fn release(&mut self, scope: &ReleaseScope, now: UnixTime) -> Result<Vec<u32>> {
        self.operate(None, now, |state| pool::release(state, scope, now))
    }

    fn heartbeat(&mut self, reservation_id: &str, gpus: &[u32], now: UnixTime) -> Result<Vec<u32>> {
        self.operate(None, now, |state| {
            pool::heartbeat(state, reservation_id, gpus, now)
        })
    }

    fn reassert(&mut self, request: &ReassertRequest) -> Result<Reasserted> {
        self.operate(None, request.now, |state| pool::reassert(state, request))
    }

    fn history(&mut self, from: UnixTime, to: UnixTime) -> Result<Vec<UsageRecord>> {
        self.read_history(from, to)
    }

    fn usage_summary(&mut self, from: UnixTime, to: UnixTime) -> Result<Vec<UserUsage>> {
        self.summarize_history(from, to)
    }
}

/// The entry's JSON with `last_heartbeat` set, every other field as it was.
fn patch_heartbeat(raw: &str, now: UnixTime) -> String {
    match serde_json::from_str::<serde_json::Value>(raw) {
        Ok(serde_json::Value::Object(mut doc)) => {
            doc.insert("last_heartbeat".into(), now.into());
            serde_json::Value::Object(doc).to_string()
        }
        _ => raw.to_string(),
    }
}
