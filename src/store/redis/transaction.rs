//! The optimistic transaction every change runs in: `WATCH` what the operation reads,
//! read it (pipelined), decide with the pool core, and write the changes in one
//! `MULTI`/`EXEC`, again after a jittered pause while other clients change what was
//! read. Also the plain reads, which watch nothing.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use super::{Keys, Lost, RedisStore, codec, fleet};
use crate::error::{Error, Result};
use crate::gpu::procinfo;
use crate::pool::{self, Changes, Operation, Outcome, PoolState, SlotWrite};
use crate::state::{GpuSlot, Pool, ProviderKind, UnixTime};
use crate::store::{HISTORY_PRUNE_BATCH, PoolView, RedisLayout};

/// How long an operation keeps trying when other clients keep changing what it read
/// (or upstream holds its allocation lock, which expires after 10 s).
const TRANSACTION_PATIENCE: Duration = Duration::from_secs(15);

/// What a transaction read besides the state: what it needs to write its changes.
struct Loaded {
    state: PoolState,
    /// The JSON of each readable entry, so an update keeps upstream's fields.
    raw_entries: HashMap<String, String>,
    /// Upstream holds its allocation lock.
    locked: bool,
}

impl RedisStore {
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
            .cmd("EXISTS")
            .arg(&count_key)
            .cmd("EXISTS")
            .arg(&provider_key)
            .cmd("ZRANGE")
            .arg(&queue_key)
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .cmd("EXISTS")
            .arg(&lock_key);
        // A key of the wrong type must not fail the whole read: replies are looked at
        // one by one.
        first.ignore_errors();
        let replies: Vec<redis::Value> = self.call(|connection| first.query(connection))?;
        let [values, count_exists, provider_exists, queued, locked] = &replies[..] else {
            return Err(Error::Store(format!(
                "Redis at {}: unexpected reply to a read",
                self.location
            )));
        };
        let (count, provider): (Option<String>, Option<String>) = decode(values)?;
        self.check_strings(&[
            (&count, decode(count_exists)?, self.keys.gpu_count()),
            (&provider, decode(provider_exists)?, self.keys.provider()),
        ])?;
        // A queue key of another type is no queue: nobody waits, and it is replaced
        // by the next entry to join (`Store::enqueue`).
        let queued: Vec<(String, f64)> = decode(queued).unwrap_or_default();
        let locked: bool = decode(locked)?;
        let pool = self.decode_pool(count, provider)?;
        let gpu_count = pool.map_or(0, |pool| pool.gpu_count);

        let gpu_keys: Vec<String> = (0..gpu_count).map(|id| self.keys.gpu(id)).collect();
        let entry_ids: Vec<&String> = queued.iter().map(|(id, _)| id).collect();
        let entry_keys: Vec<String> = entry_ids.iter().map(|id| self.keys.entry(id)).collect();
        // `MGET` with no keys is an error: only the lists that have keys are read.
        let mut second = redis::pipe();
        if watch && !gpu_keys.is_empty() {
            second.cmd("WATCH").arg(&gpu_keys).ignore();
        }
        for keys in [&gpu_keys, &entry_keys] {
            if !keys.is_empty() {
                second.cmd("MGET").arg(keys);
            }
        }
        let mut replies: Vec<Vec<Option<String>>> = if gpu_keys.is_empty() && entry_keys.is_empty()
        {
            Vec::new()
        } else {
            self.call(|connection| second.query(connection))?
        };
        let entries = match entry_keys.is_empty() {
            true => Vec::new(),
            false => replies.pop().unwrap_or_default(),
        };
        let gpus = replies.pop().unwrap_or_default();

        let mut state = PoolState {
            pool,
            ..PoolState::default()
        };
        (state.slots, state.partials) = self.decode_gpus(&gpu_keys, &gpus)?;
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
        // Only a decision consults last uses; a plain read (`watch` off) needs none.
        let accounts = match watch {
            true => PoolState::accounts_needed(&state.queue, requester),
            false => Vec::new(),
        };
        if !accounts.is_empty() && pool.is_some() {
            let mut reads = redis::pipe();
            for account in &accounts {
                reads.cmd("HGETALL").arg(self.keys.last_used(account));
            }
            reads.ignore_errors();
            let used: Vec<redis::Value> = self.call(|connection| reads.query(connection))?;
            for (account, pairs) in accounts.into_iter().zip(used) {
                // Not a hash: no last use is known for the account.
                let pairs: Vec<(String, String)> = decode(&pairs).unwrap_or_default();
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

    /// `MGET` gives nothing for a key of another type: such a pool key is an error
    /// that names it, not a missing value.
    pub(super) fn check_strings(&self, keys: &[(&Option<String>, bool, String)]) -> Result<()> {
        for (value, exists, key) in keys {
            if value.is_none() && *exists {
                return Err(Error::Store(format!(
                    "invalid {key} in Redis: the key holds no string (fix it with redis-cli)"
                )));
            }
        }
        Ok(())
    }

    /// The slots from the GPU keys' values (`MGET` gives nothing for a key of another
    /// type: those are told apart from missing keys and shown as unreadable).
    fn decode_gpus(
        &mut self,
        keys: &[String],
        values: &[Option<String>],
    ) -> Result<(Vec<GpuSlot>, BTreeMap<u32, String>)> {
        let mut slots = Vec::with_capacity(values.len());
        let mut partials = BTreeMap::new();
        for (id, raw) in (0..).zip(values) {
            let (slot, partial) = codec::decode_slot(id, raw.as_deref());
            if let Some(entry) = partial {
                partials.insert(id, entry);
            }
            slots.push(slot);
        }
        let missing: Vec<(usize, &String)> = keys
            .iter()
            .enumerate()
            .filter(|(index, _)| values[*index].is_none())
            .collect();
        if missing.is_empty() {
            return Ok((slots, partials));
        }
        let existing: usize = self.call(|connection| {
            redis::cmd("EXISTS")
                .arg(missing.iter().map(|(_, key)| *key).collect::<Vec<_>>())
                .query(connection)
        })?;
        if existing == 0 {
            return Ok((slots, partials));
        }
        let mut types = redis::pipe();
        for (_, key) in &missing {
            types.cmd("TYPE").arg(*key);
        }
        let kinds: Vec<String> = self.call(|connection| types.query(connection))?;
        for ((index, _), kind) in missing.iter().zip(kinds) {
            if kind != "none" {
                slots[*index] = GpuSlot::Corrupt(format!(
                    "corrupted GPU state for GPU {index}: the key holds a {kind}, not a JSON string"
                ));
            }
        }
        Ok((slots, partials))
    }

    /// The pool from `canhazgpu:gpu_count` and `canhazgpu:provider`, validated with
    /// the limits `admin` enforces.
    pub(super) fn decode_pool(
        &self,
        count: Option<String>,
        provider: Option<String>,
    ) -> Result<Option<Pool>> {
        decode_pool(&self.keys, count, provider)
    }

    /// Runs one operation of the pool core as an optimistic transaction, again and
    /// again while other clients change what it read.
    pub(super) fn operate(&mut self, operation: &Operation) -> Result<Outcome> {
        let (requester, now) = (operation.requester(), operation.now());
        let mut backoff = Backoff::new();
        loop {
            let mut loaded = self.load(requester, true)?;
            loaded.state.find_gone(&self.host, |process| {
                procinfo::process_alive(process.pid, process.pid_start)
            });
            let transition = (!loaded.locked).then(|| pool::apply(&loaded.state, operation));
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
            if !backoff.wait() {
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
            if self.layout == RedisLayout::Fleet {
                fleet::register(&mut tx, &self.selected);
            }
        }
        if changes.pool_removed {
            tx.del(keys.gpu_count()).ignore();
            tx.del(keys.provider()).ignore();
            fleet::unregister(&mut tx, &self.selected, keys);
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
        for (field, by) in [
            (super::COUNTED_ALLOCATIONS, changes.counted.allocations),
            (super::COUNTED_FAILURES, changes.counted.allocation_failures),
        ] {
            if by > 0 {
                tx.hincr(keys.counters(), field, by).ignore();
            }
        }
        for (account, gpu, at) in &changes.last_used {
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
        // A key of the wrong type (a history or last-use key someone overwrote) fails
        // its own command only: that record is skipped, the rest is written.
        tx.ignore_errors();
        let done: Result<Option<Vec<redis::Value>>> = self.call(|connection| tx.query(connection));
        if done.is_err() && self.lost == Some(Lost::Connection) {
            // The write may have been made before the connection died: running the
            // operation again could make it twice.
            self.lost = None;
        }
        Ok(done?.is_some())
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

    /// The whole queue, watching nothing.
    pub(super) fn read_queue(&mut self) -> Result<Vec<crate::queue::QueueEntry>> {
        let state = self.load(None, false)?.state;
        if state.pool.is_none() {
            return Err(Error::NotInitialized);
        }
        Ok(state.queue)
    }

    /// The slots and the entries collecting on them: the queue's length does not
    /// matter here.
    pub(super) fn read_view(&mut self) -> Result<PoolView> {
        let pool = self.read_pool()?.ok_or(Error::NotInitialized)?;
        let gpu_keys: Vec<String> = (0..pool.gpu_count).map(|id| self.keys.gpu(id)).collect();
        let gpus: Vec<Option<String>> =
            self.call(|connection| redis::cmd("MGET").arg(&gpu_keys).query(connection))?;
        let mut state = PoolState::default();
        (state.slots, state.partials) = self.decode_gpus(&gpu_keys, &gpus)?;
        let ids = state.collector_ids();
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

/// The pool named by `keys` from its count and provider, validated with the limits
/// `admin` enforces.
pub(super) fn decode_pool(
    keys: &Keys,
    count: Option<String>,
    provider: Option<String>,
) -> Result<Option<Pool>> {
    let Some(count) = count else {
        return Ok(None);
    };
    let gpu_count = count
        .parse()
        .ok()
        .filter(|count| (1..=pool::MAX_GPUS).contains(count))
        .ok_or_else(|| Error::Store(format!("invalid {} in Redis: '{count}'", keys.gpu_count())))?;
    // Pools created before upstream recorded the provider are NVIDIA pools.
    let provider = match provider {
        None => ProviderKind::Nvidia,
        Some(name) => ProviderKind::parse(&name).ok_or_else(|| {
            Error::Store(format!(
                "unknown GPU provider '{name}' in {}",
                keys.provider()
            ))
        })?,
    };
    Ok(Some(Pool {
        gpu_count,
        provider,
    }))
}

/// One reply of a pipeline that ignores errors, converted.
pub(super) fn decode<T: redis::FromRedisValue>(value: &redis::Value) -> Result<T> {
    redis::FromRedisValue::from_redis_value(value.clone())
        .map_err(|err| Error::Store(format!("unexpected reply from Redis: {err}")))
}

pub(super) fn unix_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_nanos())
        .unwrap_or(0)
}

/// The pauses between the attempts of an operation: between half and all of a pause
/// that starts at 2 ms and doubles up to 200 ms, for at most `TRANSACTION_PATIENCE`.
pub(super) struct Backoff {
    started: Instant,
    pause: Duration,
}

impl Backoff {
    pub(super) fn new() -> Self {
        Backoff {
            started: Instant::now(),
            pause: Duration::from_millis(2),
        }
    }

    /// Pauses before the next attempt; false, at once, when patience has run out.
    pub(super) fn wait(&mut self) -> bool {
        if self.started.elapsed() > TRANSACTION_PATIENCE {
            return false;
        }
        std::thread::sleep(jittered(self.pause));
        self.pause = (self.pause * 2).min(Duration::from_millis(200));
        true
    }
}

/// Between half and all of `pause`, so that clients that collided do not collide
/// again in step.
fn jittered(pause: Duration) -> Duration {
    let noise =
        (unix_nanos() as u64 ^ u64::from(std::process::id()).wrapping_mul(0x9e37_79b9)) % 1000;
    pause / 2 + pause * noise as u32 / 2000
}
