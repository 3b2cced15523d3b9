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
mod fleet;
mod history;
mod sentinel;
mod transaction;
mod watch;

use std::time::Duration;

use redis::{Commands, Connection, RedisResult};

use super::{
    DEFAULT_HISTORY_RETENTION_DAYS, HostData, PoolView, QueueBeat, RedisConfig, RedisLayout, Store,
    Wake,
};
use crate::error::{Error, Result};
use crate::fleet::{HostRecord, HostSnapshot};
use crate::gpu::procinfo;
use crate::pool::{Operation, Outcome};
use crate::queue::QueueEntry;
use crate::report::UserUsage;
use crate::state::{Pool, UnixTime, UsageRecord};

use connection::{Server, connect_error, one_line, read_only};
pub use connection::{display_location, same_server, url_has_password, uses_tls, without_password};
use transaction::{Backoff, unix_nanos};
use watch::Watch;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// The fleet's registry: host name → its settings as JSON (`{"interval_secs": N}`).
const HOSTS_KEY: &str = "canhazgpu:hosts";
/// Host name → when its latest GPU snapshot was taken (Unix seconds).
const REPORTED_KEY: &str = "canhazgpu:hosts:reported";
/// The users who muted their notifications (`notify --off`): one set for the fleet.
const MUTED_KEY: &str = "canhazgpu:notify:muted";

/// The names of one pool's keys: upstream canhazgpu's, or in the fleet layout the
/// same names under the host's hash tag (`canhazgpu:{gpu1}:gpu:0`), so that one
/// host's transaction touches one Redis Cluster slot.
/// Fields of `Keys::counters`.
const COUNTED_ALLOCATIONS: &str = "allocations";
const COUNTED_FAILURES: &str = "allocation_failures";

struct Keys {
    prefix: String,
}

impl Keys {
    fn upstream() -> Keys {
        Keys {
            prefix: "canhazgpu:".into(),
        }
    }

    fn fleet(host: &str) -> Keys {
        Keys {
            prefix: format!("canhazgpu:{{{host}}}:"),
        }
    }

    fn of(layout: RedisLayout, host: &str) -> Keys {
        match layout {
            RedisLayout::Fleet => Keys::fleet(host),
            RedisLayout::Upstream => Keys::upstream(),
        }
    }

    /// The host's published GPU snapshot (fleet layout only).
    fn snapshot(&self) -> String {
        format!("{}snapshot", self.prefix)
    }

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
    /// The host's allocation counters (`pool::Counted`), a hash.
    fn counters(&self) -> String {
        format!("{}counters", self.prefix)
    }
    fn last_used(&self, account: &str) -> String {
        format!("{}user_last_used:{account}", self.prefix)
    }
    /// Upstream's global lock around its allocations.
    fn allocation_lock(&self) -> String {
        format!("{}allocation_lock", self.prefix)
    }
    /// Published when a change concerns one queue entry.
    fn wake_entry(&self, id: &str) -> String {
        format!("{}queue:wake:{id}", self.prefix)
    }
}

pub struct RedisStore {
    server: Server,
    /// Dropped after an I/O error and reopened by the next call, so that a long-running
    /// supervisor survives a Redis restart. Never shared: `WATCH` belongs to it.
    connection: Option<Connection>,
    /// Set when the last failure lost the connection in a way a Sentinel failover
    /// explains: what failed may run again on the master named next (`patiently`).
    lost: Option<Lost>,
    /// The master the sentinels named for the connection, and whether that changed
    /// since `followed_failover` last asked.
    master: Option<String>,
    moved: bool,
    /// Where the store lives, without any password, for messages.
    location: String,
    keys: Keys,
    layout: RedisLayout,
    /// This machine, whose processes a transaction checks (`PoolState::find_gone`).
    host: String,
    /// The host whose pool `keys` name.
    selected: String,
    /// Wake-ups for a waiter's own entry (`watch_entry`).
    entry_watch: Option<Watch>,
    /// Seconds of history kept; writes that record history prune older records.
    history_retention: i64,
    /// Transactions run again because another client changed what they read.
    retries: u32,
}

impl RedisStore {
    /// Connects to the configured Redis (timeouts: 3 s to connect, 5 s per reply).
    pub fn connect(config: &RedisConfig) -> Result<Self> {
        // rediss:// goes through rustls, which needs a process-wide crypto provider;
        // installing it twice is harmless (the second call reports the first).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let location = display_location(config);
        let server = Server::new(config).map_err(|err| connect_error(&location, err))?;
        let mut store = RedisStore {
            server,
            connection: None,
            lost: None,
            master: None,
            moved: false,
            location,
            keys: Keys::of(config.layout, &procinfo::hostname()),
            layout: config.layout,
            host: procinfo::hostname(),
            selected: procinfo::hostname(),
            entry_watch: None,
            history_retention: i64::from(DEFAULT_HISTORY_RETENTION_DAYS) * 86_400,
            retries: 0,
        };
        store.patiently(|store| store.connection().map(drop))?;
        Ok(store)
    }

    /// Keeps `seconds` of history instead of the default 90 days.
    pub fn with_history_retention(mut self, seconds: i64) -> Self {
        self.history_retention = seconds;
        self
    }

    /// Names this host (`host_name`): its pool, and the processes it can check.
    pub fn with_host(mut self, name: &str) -> Self {
        self.host = name.to_owned();
        self.selected = name.to_owned();
        self.keys = Keys::of(self.layout, name);
        self
    }

    /// A `NotInitialized` refusal, explained where the store can tell more.
    fn explained<T>(&mut self, result: Result<T>) -> Result<T> {
        match result {
            Err(Error::NotInitialized) => Err(self.missing_pool()),
            other => other,
        }
    }

    /// How many transactions ran again because of a concurrent change.
    pub fn retries(&self) -> u32 {
        self.retries
    }

    fn connection(&mut self) -> Result<&mut Connection> {
        let connection = match self.connection.take() {
            Some(connection) => connection,
            None => {
                let (connection, master) = self.server.open(&self.location).map_err(|refused| {
                    if refused.failing_over {
                        self.lost = Some(Lost::Connection);
                    }
                    refused.error
                })?;
                if self.master.is_some() && master != self.master {
                    self.moved = true;
                }
                self.master = master;
                connection
            }
        };
        Ok(self.connection.insert(connection))
    }

    /// Runs Redis commands; an I/O failure or a write refused by a replica drops the
    /// connection (the next call opens a new one) and becomes one line naming the
    /// server.
    fn call<T>(&mut self, command: impl FnOnce(&mut Connection) -> RedisResult<T>) -> Result<T> {
        let result = command(self.connection()?);
        result.map_err(|err| {
            let refused = read_only(&err);
            if err.is_io_error() || err.is_unrecoverable_error() || refused {
                self.connection = None;
                if self.server.follows_failover() {
                    self.lost = Some(match refused {
                        true => Lost::ReadOnly,
                        false => Lost::Connection,
                    });
                }
            }
            if err.is_timeout() {
                // A hung server (stopped, swapping): say so, not "os error 11".
                self.connection = None;
                return Error::Store(format!(
                    "Redis at {} did not answer within {} s",
                    self.location,
                    IO_TIMEOUT.as_secs()
                ));
            }
            Error::Store(format!(
                "Redis at {} failed: {}",
                self.location,
                one_line(&err)
            ))
        })
    }

    /// Runs `attempt` again, after jittered pauses for up to 15 s, while it fails
    /// because the master went away and the sentinels may name a new one.
    fn patiently<T>(&mut self, mut attempt: impl FnMut(&mut Self) -> Result<T>) -> Result<T> {
        let mut backoff = Backoff::new();
        loop {
            self.lost = None;
            match attempt(self) {
                Err(_) if self.lost.is_some() && backoff.wait() => {}
                result => return result,
            }
        }
    }
}

/// How a connection was lost (Sentinel only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lost {
    /// It failed or could not be opened: a command sent may or may not have run.
    Connection,
    /// A write was refused by a server that is no longer the master: nothing ran.
    ReadOnly,
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        // For benchmarks: how often this process's transactions had to run again.
        if self.retries > 0 && std::env::var_os("CANHAZGPU_REPORT_RETRIES").is_some() {
            eprintln!("canhazgpu: {} Redis transaction retries", self.retries);
        }
    }
}

impl Store for RedisStore {
    fn run(&mut self, operation: &Operation) -> Result<Outcome> {
        let outcome = self.patiently(|store| store.operate(operation));
        self.explained(outcome)
    }

    fn pool(&mut self) -> Result<Option<Pool>> {
        self.patiently(Self::read_pool)
    }

    fn pool_view(&mut self) -> Result<PoolView> {
        let view = self.patiently(Self::read_view);
        self.explained(view)
    }

    fn retire(&mut self, force: bool, now: UnixTime) -> Result<u32> {
        let ended = match self.run(&Operation::Retire { force, now })? {
            Outcome::Retired(ended) => ended,
            other => return Err(super::unexpected(other)),
        };
        self.remove_leftovers()?;
        Ok(ended)
    }

    fn hosts(&mut self) -> Result<Vec<HostRecord>> {
        self.patiently(fleet::hosts)
    }

    fn counted(&mut self) -> Result<crate::pool::Counted> {
        let key = self.keys.counters();
        let (allocations, allocation_failures): (Option<u64>, Option<u64>) =
            self.patiently(|store| {
                store.call(|connection| {
                    redis::cmd("HMGET")
                        .arg(&key)
                        .arg(COUNTED_ALLOCATIONS)
                        .arg(COUNTED_FAILURES)
                        .query(connection)
                })
            })?;
        Ok(crate::pool::Counted {
            allocations: allocations.unwrap_or(0),
            allocation_failures: allocation_failures.unwrap_or(0),
        })
    }

    fn muted_users(&mut self) -> Result<std::collections::BTreeSet<String>> {
        self.patiently(|store| store.call(|connection| connection.smembers(MUTED_KEY)))
    }

    fn set_muted(&mut self, user: &str, muted: bool) -> Result<()> {
        self.patiently(|store| {
            store.call(|connection| match muted {
                true => connection.sadd::<_, _, ()>(MUTED_KEY, user),
                false => connection.srem::<_, _, ()>(MUTED_KEY, user),
            })
        })
    }

    fn selected_host(&self) -> &str {
        &self.selected
    }

    fn select_host(&mut self, name: &str) -> Result<()> {
        if self.layout == RedisLayout::Upstream && name != self.host {
            return Err(Error::Usage(format!(
                "Redis's upstream layout holds only this host's pool ({}): other hosts \
                 need redis.layout: fleet",
                self.host
            )));
        }
        self.selected = name.to_owned();
        self.keys = Keys::of(self.layout, name);
        Ok(())
    }

    fn publish_snapshot(
        &mut self,
        snapshot: &HostSnapshot,
        interval_secs: Option<u64>,
    ) -> Result<()> {
        self.patiently(|store| fleet::publish(store, snapshot, interval_secs))
    }

    fn host_snapshot(&mut self) -> Result<Option<HostSnapshot>> {
        self.patiently(fleet::snapshot)
    }

    fn host_views(&mut self, names: &[String]) -> Result<Vec<Result<HostData>>> {
        match self.layout {
            RedisLayout::Fleet => self.patiently(|store| fleet::host_views(store, names)),
            // This host only (`hosts` names no other): nothing to batch.
            RedisLayout::Upstream => names
                .iter()
                .map(|name| {
                    self.select_host(name)?;
                    Ok(match self.pool()? {
                        None => Err(self.missing_pool()),
                        Some(pool) => self.pool_view().map(|view| HostData {
                            pool,
                            view,
                            snapshot: None,
                        }),
                    })
                })
                .collect(),
        }
    }

    fn missing_pool(&mut self) -> Error {
        fleet::missing_pool(self).unwrap_or_else(|err| err)
    }

    fn enqueue(&mut self, entry: &QueueEntry) -> Result<()> {
        self.patiently(|store| store.append(entry))
    }

    fn queue(&mut self) -> Result<Vec<QueueEntry>> {
        let queue = self.patiently(Self::read_queue);
        self.explained(queue)
    }

    fn queue_beat(&mut self, entry_id: &str, now: UnixTime) -> Result<QueueBeat> {
        self.patiently(|store| store.beat(entry_id, now))
    }

    fn watch_entry(&mut self, entry_id: &str, wake: Wake) -> Result<()> {
        let channel = self.keys.wake_entry(entry_id);
        self.entry_watch = Some(Watch::start(&self.server, &self.location, channel, wake)?);
        Ok(())
    }

    fn stop_watching(&mut self) {
        self.entry_watch = None;
    }

    fn history(&mut self, from: UnixTime, to: UnixTime) -> Result<Vec<UsageRecord>> {
        self.patiently(|store| store.read_history(from, to))
    }

    fn followed_failover(&mut self) -> bool {
        std::mem::take(&mut self.moved)
    }

    fn usage_summary(&mut self, from: UnixTime, to: UnixTime) -> Result<Vec<UserUsage>> {
        self.patiently(|store| store.summarize_history(from, to))
    }
}

/// The store's own commands outside a transaction; `Store` runs them `patiently`.
impl RedisStore {
    fn read_pool(&mut self) -> Result<Option<Pool>> {
        // One command in the usual case: on a hung server each command of a pipeline
        // waits out the reply timeout.
        let (count_key, provider_key) = (self.keys.gpu_count(), self.keys.provider());
        let (count, provider): (Option<String>, Option<String>) = self.call(|connection| {
            redis::cmd("MGET")
                .arg(&count_key)
                .arg(&provider_key)
                .query(connection)
        })?;
        if count.is_none() || provider.is_none() {
            let (count_exists, provider_exists): (bool, bool) = self.call(|connection| {
                redis::pipe()
                    .exists(&count_key)
                    .exists(&provider_key)
                    .query(connection)
            })?;
            self.check_strings(&[
                (&count, count_exists, count_key),
                (&provider, provider_exists, provider_key),
            ])?;
        }
        self.decode_pool(count, provider)
    }

    /// Appends without `WATCH`: an append conflicts with no other append, and every
    /// decision that depends on the queue watches it.
    fn append(&mut self, entry: &QueueEntry) -> Result<()> {
        let (count_key, queue_key) = (self.keys.gpu_count(), self.keys.queue());
        let (count, kind): (Option<String>, String) = self.call(|connection| {
            redis::pipe()
                .get(&count_key)
                .cmd("TYPE")
                .arg(&queue_key)
                .query(connection)
        })?;
        if count.is_none() {
            return Err(self.missing_pool());
        }
        let tail: Vec<(String, f64)> = match kind.as_str() {
            "zset" => self.call(|connection| {
                redis::cmd("ZRANGE")
                    .arg(&queue_key)
                    .arg(-1)
                    .arg(-1)
                    .arg("WITHSCORES")
                    .query(connection)
            })?,
            _ => Vec::new(),
        };
        // Upstream's score: Unix nanoseconds, after every entry.
        let tail = tail.first().map_or(0.0, |(_, score)| *score);
        let score = (unix_nanos() as f64).max(tail + 1000.0);
        let entry_key = self.keys.entry(&entry.id);
        let mut append = redis::pipe();
        append.atomic();
        if kind != "zset" && kind != "none" {
            // Not a queue: replaced (see `transaction::load`).
            append.del(&queue_key).ignore();
        }
        self.call(|connection| {
            append
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

    /// Refreshes the entry's JSON in place (`SET … XX`, so a removed entry stays
    /// removed); entry keys are watched by nobody, so this wakes no one.
    fn beat(&mut self, entry_id: &str, now: UnixTime) -> Result<QueueBeat> {
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
            .arg(codec::patch_heartbeat(&raw, now))
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
}
