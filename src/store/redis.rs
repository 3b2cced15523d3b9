//! The Redis store, data-compatible with upstream canhazgpu v1.1.x.
//!
//! Every read-modify-write is one Lua script (`lua/*.lua`, each prefixed with
//! `lua/common.lua`), which Redis runs atomically with respect to every other client.
//! The scripts also read GPU states, so upstream's mixed time formats are decoded in
//! one place; Rust only sees normalized JSON. The wait queue (`queue` submodule) uses
//! upstream's keys too, and wakes waiters by pub/sub.

mod queue;

use std::borrow::Cow;
use std::fmt::Display;
use std::sync::LazyLock;
use std::time::Duration;

use redis::{
    Client, Connection, ConnectionAddr, ConnectionInfo, ErrorKind, FromRedisValue,
    IntoConnectionInfo, RedisError, RedisResult, Script,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    AllocRequest, DEFAULT_HISTORY_RETENTION_DAYS, InitOutcome, NewReservation, QueueStep,
    QueueTick, ReassertRequest, Reasserted, RedisConfig, ReleaseScope, Store,
};
use crate::alloc::validate_selection;
use crate::error::{Error, Result};
use crate::queue::QueueEntry;
use crate::report::{Tally, UserUsage, Window};
use crate::state::{
    GpuSlot, Pool, ProviderKind, Reservation, ReservationKind, RunOwner, Selection, UnixTime,
    UsageRecord,
};

const GPU_COUNT_KEY: &str = "canhazgpu:gpu_count";
const PROVIDER_KEY: &str = "canhazgpu:provider";
const HISTORY_KEY: &str = "canhazgpu:usage_history_sorted";

/// At most this many history records per reply (unless they all ended within one
/// second), so that a report over a long history never keeps Redis busy for long.
const SLICE_RECORDS: u64 = 10_000;
const SLICES_PER_ROUND_TRIP: usize = 8;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// A script: `lua/common.lua`, then the given files of `lua/`, in order.
macro_rules! lua_script {
    ($($file:literal),+) => {
        LazyLock::new(|| {
            Script::new(concat!(
                include_str!("lua/common.lua"),
                $(include_str!(concat!("lua/", $file))),+
            ))
        })
    };
}

static INIT_POOL: LazyLock<Script> = lua_script!("queue.lua", "init_pool.lua");
static SLOTS: LazyLock<Script> = lua_script!("slots.lua");
static ALLOCATE: LazyLock<Script> = lua_script!("queue.lua", "allocate.lua");
static RELEASE: LazyLock<Script> = lua_script!("queue.lua", "release.lua");
static HEARTBEAT: LazyLock<Script> = lua_script!("heartbeat.lua");
static QUEUE_STEP: LazyLock<Script> = lua_script!("queue.lua", "queue_step.lua");
static QUEUE_LEAVE: LazyLock<Script> = lua_script!("queue.lua", "queue_leave.lua");
static QUEUE_LIST: LazyLock<Script> = lua_script!("queue.lua", "queue_list.lua");
static REASSERT: LazyLock<Script> = lua_script!("reassert.lua");

pub struct RedisStore {
    client: Client,
    /// Dropped after an I/O error and reopened by the next call, so that a long-running
    /// supervisor survives a Redis restart.
    connection: Option<Connection>,
    /// Where the store lives, without any password, for messages.
    location: String,
    /// Wake-ups for a waiter, once `watch_changes` subscribed.
    watch: Option<queue::Watch>,
    /// Seconds of history kept; the scripts that record history prune older records.
    history_retention: i64,
}

/// Why a Redis call failed.
enum Failure {
    /// An error reply `CODE detail` raised by one of our scripts (or an unknown code).
    Reply {
        code: String,
        detail: String,
    },
    Other(Error),
}

impl Failure {
    /// The error for codes the caller does not handle itself.
    fn into_error(self) -> Error {
        match self {
            Failure::Reply { code, .. } if code == "NOT_INITIALIZED" => Error::NotInitialized,
            Failure::Reply { code, detail } => {
                Error::Store(format!("unexpected Redis error: {code} {detail}"))
            }
            Failure::Other(err) => err,
        }
    }
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
            watch: None,
            history_retention: i64::from(DEFAULT_HISTORY_RETENTION_DAYS) * 86_400,
        };
        store.connection()?;
        Ok(store)
    }

    /// Keeps `seconds` of history instead of the default 90 days.
    pub fn with_history_retention(mut self, seconds: i64) -> Self {
        self.history_retention = seconds;
        self
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

    fn call<T>(
        &mut self,
        command: impl FnOnce(&mut Connection) -> RedisResult<T>,
    ) -> Result<T, Failure> {
        let result = command(self.connection().map_err(Failure::Other)?);
        result.map_err(|err| {
            if err.kind() == ErrorKind::Extension
                && let Some(code) = err.code()
            {
                return Failure::Reply {
                    code: code.to_string(),
                    detail: err.detail().unwrap_or_default().to_string(),
                };
            }
            if err.is_io_error() || err.is_unrecoverable_error() {
                self.connection = None;
            }
            Failure::Other(Error::Store(format!(
                "Redis at {} failed: {}",
                self.location,
                one_line(&err)
            )))
        })
    }

    /// Runs one of our scripts with JSON arguments.
    fn run_script<T: FromRedisValue>(
        &mut self,
        script: &Script,
        args: &[String],
    ) -> Result<T, Failure> {
        self.call(|connection| {
            let mut invocation = script.prepare_invoke();
            for arg in args {
                invocation.arg(arg);
            }
            invocation.invoke(connection)
        })
    }
}

/// History records whose end time (score) is in `[from, to)`; `to: None` is unbounded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ScoreSlice {
    from: UnixTime,
    to: Option<UnixTime>,
}

impl ScoreSlice {
    fn upper_bound(&self) -> String {
        match self.to {
            Some(to) => format!("({to}"),
            None => "+inf".into(),
        }
    }

    /// `parts` slices of (nearly) equal width covering this bounded slice.
    fn split(&self, parts: u64) -> Vec<ScoreSlice> {
        let to = self.to.unwrap_or(self.from + 1);
        let width = ((to - self.from) as u64).div_ceil(parts.max(1)).max(1) as i64;
        (self.from..to)
            .step_by(width as usize)
            .map(|lo| ScoreSlice {
                from: lo,
                to: Some((lo + width).min(to)),
            })
            .collect()
    }
}

impl RedisStore {
    /// Score slices covering `[from, +inf)` with at most `SLICE_RECORDS` records each
    /// (a slice one second wide may hold more), found by rounds of `ZCOUNT`s.
    fn history_slices(&mut self, from: UnixTime, to: UnixTime) -> Result<Vec<ScoreSlice>> {
        let mut ready = vec![ScoreSlice {
            from: to + 1,
            to: None,
        }];
        let mut pending = vec![ScoreSlice {
            from,
            to: Some(to + 1),
        }];
        while !pending.is_empty() {
            let mut pipe = redis::pipe();
            for slice in &pending {
                pipe.cmd("ZCOUNT")
                    .arg(HISTORY_KEY)
                    .arg(slice.from)
                    .arg(slice.upper_bound());
            }
            let counts: Vec<u64> = self
                .call(|connection| pipe.query(connection))
                .map_err(Failure::into_error)?;
            let mut next = Vec::new();
            for (slice, count) in pending.iter().zip(counts) {
                let one_second = slice.to.is_some_and(|to| to - slice.from <= 1);
                if count == 0 {
                    continue;
                } else if count <= SLICE_RECORDS || one_second {
                    ready.push(*slice);
                } else {
                    next.extend(slice.split(count.div_ceil(SLICE_RECORDS) + 1));
                }
            }
            pending = next;
        }
        Ok(ready)
    }
}

impl Store for RedisStore {
    fn init_pool(
        &mut self,
        gpu_count: u32,
        provider: ProviderKind,
        force: bool,
        now: UnixTime,
    ) -> Result<InitOutcome> {
        let request = serde_json::json!({
            "now": now,
            "gpu_count": gpu_count,
            "provider": provider.as_str(),
            "force": force,
            "history_retention": self.history_retention,
        });
        let (previous, cleared): (i64, u32) = self
            .run_script(&INIT_POOL, &[request.to_string()])
            .map_err(|failure| match failure {
            Failure::Reply { code, detail } if code == "ALREADY_INITIALIZED" => {
                Error::Usage(format!(
                    "GPU pool already initialized with {detail} GPUs. Use --force to reinitialize"
                ))
            }
            other => other.into_error(),
        })?;
        Ok(InitOutcome {
            previous_count: u32::try_from(previous).ok(),
            cleared,
        })
    }

    fn pool(&mut self) -> Result<Option<Pool>> {
        let (count, provider): (Option<String>, Option<String>) = self
            .call(|connection| {
                redis::cmd("MGET")
                    .arg(GPU_COUNT_KEY)
                    .arg(PROVIDER_KEY)
                    .query(connection)
            })
            .map_err(Failure::into_error)?;
        let Some(count) = count else {
            return Ok(None);
        };
        let gpu_count = count
            .parse()
            .map_err(|_| Error::Store(format!("invalid {GPU_COUNT_KEY} in Redis: '{count}'")))?;
        // Pools created before upstream recorded the provider are NVIDIA pools.
        let provider = match provider {
            None => ProviderKind::Nvidia,
            Some(name) => ProviderKind::parse(&name).ok_or_else(|| {
                Error::Store(format!("unknown GPU provider '{name}' in {PROVIDER_KEY}"))
            })?,
        };
        Ok(Some(Pool {
            gpu_count,
            provider,
        }))
    }

    fn slots(&mut self) -> Result<Vec<GpuSlot>> {
        let slots: Vec<String> = self.run_script(&SLOTS, &[]).map_err(Failure::into_error)?;
        Ok(slots
            .iter()
            .enumerate()
            .map(|(id, json)| decode_slot(id, json))
            .collect())
    }

    fn allocate(&mut self, request: &AllocRequest) -> Result<Vec<u32>> {
        self.run_script(
            &ALLOCATE,
            &allocate_args(request, None, self.history_retention)?,
        )
        .map_err(|failure| reply_error(failure, &request.selection))
    }

    fn join_queue(&mut self, request: &AllocRequest, waiter: &RunOwner) -> Result<QueueStep> {
        let reply: Vec<i64> = self
            .run_script(
                &ALLOCATE,
                &allocate_args(request, Some(waiter), self.history_retention)?,
            )
            .map_err(|failure| reply_error(failure, &request.selection))?;
        queue::decode_step(&reply)
    }

    fn queue_step(&mut self, tick: &QueueTick) -> Result<QueueStep> {
        let reply: Vec<i64> = self
            .run_script(
                &QUEUE_STEP,
                &[queue::step_args(tick, self.history_retention)?],
            )
            .map_err(|failure| match failure {
                Failure::Reply { code, .. } if code == "QUEUE_GONE" => crate::queue::entry_gone(),
                other => other.into_error(),
            })?;
        queue::decode_step(&reply)
    }

    fn leave_queue(&mut self, entry_id: &str, now: UnixTime) -> Result<Vec<u32>> {
        let request = serde_json::json!({
            "now": now, "id": entry_id, "history_retention": self.history_retention,
        });
        self.run_script(&QUEUE_LEAVE, &[request.to_string()])
            .map_err(Failure::into_error)
    }

    fn queue(&mut self) -> Result<Vec<crate::queue::QueueEntry>> {
        let entries: Vec<String> = self
            .run_script(&QUEUE_LIST, &[])
            .map_err(Failure::into_error)?;
        entries
            .iter()
            .map(|json| queue::decode_entry(json))
            .collect()
    }

    fn watch_changes(&mut self) -> Result<()> {
        if self.watch.is_none() {
            self.watch = Some(queue::Watch::start(&self.client, &self.location)?);
        }
        Ok(())
    }

    fn stop_watching(&mut self) {
        self.watch = None;
    }

    fn wait_for_change(&mut self, timeout: Duration) -> Result<bool> {
        match &self.watch {
            Some(watch) => Ok(watch.wait(timeout)),
            None => {
                std::thread::sleep(timeout);
                Ok(false)
            }
        }
    }

    fn release(&mut self, scope: &ReleaseScope, now: UnixTime) -> Result<Vec<u32>> {
        let mut request = match scope {
            ReleaseScope::OwnManual { actual_user } => serde_json::json!({
                "now": now, "scope": "own_manual", "actual_user": actual_user,
            }),
            ReleaseScope::OwnIds { actual_user, ids } => serde_json::json!({
                "now": now, "scope": "own_ids", "actual_user": actual_user, "ids": ids,
            }),
            ReleaseScope::AnyIds { ids } => serde_json::json!({
                "now": now, "scope": "any_ids", "ids": ids,
            }),
            ReleaseScope::Reservation { id } => serde_json::json!({
                "now": now, "scope": "reservation", "id": id,
            }),
        };
        request["history_retention"] = self.history_retention.into();
        self.run_script(&RELEASE, &[request.to_string()])
            .map_err(|failure| match scope {
                ReleaseScope::OwnIds { ids, .. } | ReleaseScope::AnyIds { ids } => {
                    reply_error(failure, &Selection::Ids(ids.clone()))
                }
                _ => failure.into_error(),
            })
    }

    fn heartbeat(&mut self, reservation_id: &str, gpus: &[u32], now: UnixTime) -> Result<Vec<u32>> {
        let request = serde_json::json!({ "now": now, "id": reservation_id, "gpus": gpus });
        self.run_script(&HEARTBEAT, &[request.to_string()])
            .map_err(Failure::into_error)
    }

    fn reassert(&mut self, request: &ReassertRequest) -> Result<Reasserted> {
        let args = serde_json::json!({
            "now": request.now,
            "id": request.reservation.id,
            "gpus": request.gpus,
            "gpu_count": request.pool.gpu_count,
            "provider": request.pool.provider.as_str(),
            "history_retention": self.history_retention,
        });
        let state = StoredReservation::new(&request.reservation, request.start_time, request.now);
        let outcome: Vec<(u32, String)> = self
            .run_script(&REASSERT, &[args.to_string(), to_json(&state)?])
            .map_err(Failure::into_error)?;
        let mut reasserted = Reasserted::default();
        for (id, holder) in outcome {
            if holder.is_empty() {
                reasserted.held.push(id);
                continue;
            }
            let label = match decode_slot(id as usize, &holder) {
                GpuSlot::Held(other) => other.user_label(),
                GpuSlot::Corrupt(reason) => reason,
                GpuSlot::Free { .. } => String::new(),
            };
            reasserted.taken.push((id, label));
        }
        reasserted.held.sort_unstable();
        Ok(reasserted)
    }

    /// Records that cannot be read (foreign or damaged entries) are skipped.
    fn history(&mut self, from: UnixTime, to: UnixTime) -> Result<Vec<UsageRecord>> {
        let members: Vec<String> = self
            .call(|connection| {
                redis::cmd("ZRANGEBYSCORE")
                    .arg(HISTORY_KEY)
                    .arg(from)
                    .arg("+inf")
                    .query(connection)
            })
            .map_err(Failure::into_error)?;
        Ok(members
            .iter()
            .filter_map(|member| parse_usage_record(member))
            .filter(|record| record.end_time >= from && record.start_time <= to)
            .collect())
    }

    /// Fetches the records in slices of end times (scores), several slices per round
    /// trip so that Redis prepares one reply while the previous one is decoded here.
    /// Slices are disjoint score ranges: records written or pruned meanwhile never make
    /// another record count twice or not at all.
    fn usage_summary(&mut self, from: UnixTime, to: UnixTime) -> Result<Vec<UserUsage>> {
        let mut tally = Tally::new(Window { from, to });
        let slices = self.history_slices(from, to)?;
        for group in slices.chunks(SLICES_PER_ROUND_TRIP) {
            let mut pipe = redis::pipe();
            for slice in group {
                pipe.cmd("ZRANGEBYSCORE")
                    .arg(HISTORY_KEY)
                    .arg(slice.from)
                    .arg(slice.upper_bound());
            }
            let pages: Vec<Vec<String>> = self
                .call(|connection| pipe.query(connection))
                .map_err(Failure::into_error)?;
            for member in pages.iter().flatten() {
                if let Some(entry) = parse_usage_entry(member) {
                    tally.add(&entry.account, entry.start_time, entry.end_time, entry.kind);
                }
            }
        }
        Ok(tally.into_usages())
    }
}

/// The arguments of `allocate.lua`.
#[derive(Serialize)]
struct AllocateArgs<'a> {
    now: UnixTime,
    actual_user: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    count: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ids: Option<&'a [u32]>,
    unreserved: &'a [u32],
    dead_ids: &'a [String],
    /// Join the queue when the GPUs are not available yet.
    join: bool,
    history_retention: i64,
}

/// ARGV of `allocate.lua`: the request, the state to store on claimed GPUs, and with
/// a waiter the queue entry to add if needed.
fn allocate_args(
    request: &AllocRequest,
    waiter: Option<&RunOwner>,
    history_retention: i64,
) -> Result<Vec<String>> {
    let new = &request.reservation;
    let (count, ids) = match &request.selection {
        Selection::Count(count) => (Some(*count), None),
        Selection::Ids(ids) => (None, Some(ids.as_slice())),
    };
    let args = AllocateArgs {
        now: request.now,
        actual_user: &new.actual_user,
        count,
        ids,
        unreserved: &request.unreserved,
        dead_ids: &request.dead_ids,
        join: waiter.is_some(),
        history_retention,
    };
    let state = StoredReservation::new(new, request.now, request.now);
    let mut argv = vec![to_json(&args)?, to_json(&state)?];
    if let Some(waiter) = waiter {
        let entry = QueueEntry::new(new, &request.selection, waiter, request.now);
        argv.push(queue::entry_json(&entry)?);
    }
    Ok(argv)
}

/// A held GPU's state as stored in `canhazgpu:gpu:<id>`: upstream's fields (integer
/// Unix seconds, absent fields omitted) plus the reservation ID and run owner.
#[derive(Serialize)]
struct StoredReservation<'a> {
    user: &'a str,
    actual_user: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    start_time: UnixTime,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_heartbeat: Option<UnixTime>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expiry_time: Option<UnixTime>,
    #[serde(skip_serializing_if = "Option::is_none")]
    note: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reservation_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    host: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pid_start_time: Option<u64>,
}

impl<'a> StoredReservation<'a> {
    /// The state of a GPU that `new` holds since `start_time`, with a heartbeat at
    /// `now` for run reservations.
    fn new(new: &'a NewReservation, start_time: UnixTime, now: UnixTime) -> Self {
        StoredReservation {
            user: &new.user,
            actual_user: &new.actual_user,
            kind: new.kind.as_str(),
            start_time,
            last_heartbeat: (new.kind == ReservationKind::Run).then_some(now),
            expiry_time: new.expiry_time,
            note: new.note.as_deref().filter(|note| !note.is_empty()),
            reservation_id: Some(new.id.as_str()).filter(|id| !id.is_empty()),
            host: new.owner.as_ref().map(|owner| owner.host.as_str()),
            pid: new.owner.as_ref().map(|owner| owner.pid),
            pid_start_time: new.owner.as_ref().map(|owner| owner.pid_start),
        }
    }
}

/// A slot as `read_slot` in `lua/common.lua` normalizes it.
#[derive(Deserialize)]
#[serde(tag = "state", rename_all = "lowercase")]
enum NormalizedSlot {
    Free {
        last_released: Option<UnixTime>,
    },
    Held {
        reservation_id: String,
        user: String,
        actual_user: String,
        #[serde(rename = "type")]
        kind: ReservationKind,
        start_time: UnixTime,
        last_heartbeat: Option<UnixTime>,
        expiry_time: Option<UnixTime>,
        note: Option<String>,
        host: Option<String>,
        pid: Option<u32>,
        pid_start_time: Option<u64>,
    },
    Corrupt {
        reason: String,
    },
}

fn decode_slot(id: usize, json: &str) -> GpuSlot {
    let slot = match serde_json::from_str(json) {
        Ok(slot) => slot,
        Err(err) => {
            return GpuSlot::Corrupt(format!("corrupted GPU state for GPU {id}: {err}"));
        }
    };
    match slot {
        NormalizedSlot::Free { last_released } => GpuSlot::Free { last_released },
        NormalizedSlot::Corrupt { reason } => GpuSlot::Corrupt(reason),
        NormalizedSlot::Held {
            reservation_id,
            user,
            actual_user,
            kind,
            start_time,
            last_heartbeat,
            expiry_time,
            note,
            host,
            pid,
            pid_start_time,
        } => GpuSlot::Held(Reservation {
            id: reservation_id,
            user,
            actual_user,
            kind,
            start_time,
            last_heartbeat,
            expiry_time,
            note,
            owner: host
                .zip(pid.zip(pid_start_time))
                .map(|(host, (pid, pid_start))| RunOwner {
                    host,
                    pid,
                    pid_start,
                }),
        }),
    }
}

/// Maps the error replies of `allocate.lua` and `release.lua` to our errors, with the
/// exact messages of `alloc::plan` and `alloc::validate_selection`.
fn reply_error(failure: Failure, selection: &Selection) -> Error {
    let Failure::Reply { code, detail } = failure else {
        return failure.into_error();
    };
    let unexpected = || Error::Store(format!("unexpected Redis error: {code} {detail}"));
    match code.as_str() {
        "BAD_SELECTION" => match detail.parse() {
            Ok(gpu_count) => validate_selection(selection, gpu_count).err(),
            Err(_) => None,
        }
        .unwrap_or_else(unexpected),
        "NOT_ENOUGH" => {
            let numbers: Vec<u32> = detail
                .split(' ')
                .filter_map(|number| number.parse().ok())
                .collect();
            match numbers[..] {
                [requested, available, unreserved] => Error::NotEnough {
                    requested,
                    available,
                    unreserved,
                },
                _ => unexpected(),
            }
        }
        "UNRESERVED" => Error::GpuTaken(format!("GPU {detail} is in use without reservation")),
        "RESERVED" => match detail.split_once(' ') {
            Some((id, user)) => {
                Error::GpuTaken(format!("GPU {id} is already reserved by user '{user}'"))
            }
            None => unexpected(),
        },
        "CORRUPT" => match detail.split_once(' ') {
            Some((id, reason)) => Error::Store(format!("GPU {id} has unreadable state: {reason}")),
            None => unexpected(),
        },
        _ => Failure::Reply { code, detail }.into_error(),
    }
}

/// One history entry as stored, borrowed from the member where possible: written by
/// us (integer seconds) or upstream (RFC 3339 strings, float durations, possibly no
/// `actual_user`). Other fields (`duration_seconds`) are ignored.
#[derive(Deserialize)]
struct StoredUsage<'a> {
    #[serde(borrow)]
    user: Cow<'a, str>,
    #[serde(borrow, default)]
    actual_user: Option<Cow<'a, str>>,
    gpu_id: u64,
    start_time: Value,
    end_time: Value,
    #[serde(borrow)]
    reservation_type: Cow<'a, str>,
}

/// A readable history entry: its account, GPU, times and type.
struct UsageEntry<'a> {
    user: Cow<'a, str>,
    account: Cow<'a, str>,
    gpu_id: u32,
    start_time: UnixTime,
    end_time: UnixTime,
    kind: ReservationKind,
}

/// Decodes a history member; `None` for entries that cannot be read.
fn parse_usage_entry(member: &str) -> Option<UsageEntry<'_>> {
    let stored: StoredUsage = serde_json::from_str(member).ok()?;
    let account = match stored.actual_user {
        Some(actual_user) if !actual_user.is_empty() => actual_user,
        _ => stored.user.clone(),
    };
    Some(UsageEntry {
        gpu_id: u32::try_from(stored.gpu_id).ok()?,
        start_time: parse_time(&stored.start_time)?,
        end_time: parse_time(&stored.end_time)?,
        kind: ReservationKind::parse(&stored.reservation_type)?,
        user: stored.user,
        account,
    })
}

fn parse_usage_record(member: &str) -> Option<UsageRecord> {
    let entry = parse_usage_entry(member)?;
    Some(UsageRecord {
        user: entry.user.into_owned(),
        actual_user: entry.account.into_owned(),
        gpu_id: entry.gpu_id,
        start_time: entry.start_time,
        end_time: entry.end_time,
        kind: entry.kind,
    })
}

/// A time as upstream stores it: seconds (fraction truncated), as a number or numeric
/// string, or RFC 3339 with any offset.
fn parse_time(value: &Value) -> Option<UnixTime> {
    let seconds = |float: f64| float.is_finite().then_some(float.trunc() as UnixTime);
    match value {
        Value::Number(number) => number.as_i64().or_else(|| seconds(number.as_f64()?)),
        Value::String(text) => text
            .parse()
            .ok()
            .or_else(|| seconds(text.parse().ok()?))
            .or_else(|| Some(text.parse::<jiff::Timestamp>().ok()?.as_second())),
        _ => None,
    }
}

fn to_json(value: &impl Serialize) -> Result<String> {
    serde_json::to_string(value).map_err(|err| Error::store("cannot encode Redis request", err))
}

fn connection_info(config: &RedisConfig) -> RedisResult<ConnectionInfo> {
    let info = match &config.url {
        Some(url) => url.as_str().into_connection_info()?,
        None => ConnectionAddr::Tcp(config.host.clone(), config.port).into_connection_info()?,
    };
    let mut settings = info.redis_settings().clone();
    if config.url.is_none() {
        settings = settings.set_db(config.db);
    }
    if let Some(password) = &config.password {
        settings = settings.set_password(password);
    }
    Ok(info.set_redis_settings(settings))
}

fn connect_error(location: &str, err: RedisError) -> Error {
    Error::Store(format!(
        "failed to connect to Redis at {location}: {}",
        one_line(&err)
    ))
}

/// The configured Redis as a URL without password, for messages.
fn display_location(config: &RedisConfig) -> String {
    match &config.url {
        Some(url) => without_password(url),
        None if config.host.contains(':') => {
            format!("redis://[{}]:{}/{}", config.host, config.port, config.db)
        }
        None => format!("redis://{}:{}/{}", config.host, config.port, config.db),
    }
}

/// Drops the password from a Redis URL: `redis://user:secret@host` → `redis://user@host`,
/// and `?pass=`/`?password=` query parameters (Unix-socket URLs).
fn without_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let rest = match rest.rfind('@') {
        Some(at) if !rest.starts_with('/') => {
            let (userinfo, host) = (&rest[..at], &rest[at..]);
            match userinfo.split_once(':') {
                Some(("", _)) => host[1..].to_string(),
                Some((user, _)) => format!("{user}{host}"),
                None => rest.to_string(),
            }
        }
        _ => rest.to_string(),
    };
    let rest = match rest.split_once('?') {
        Some((path, query)) => {
            let kept: Vec<&str> = query
                .split('&')
                .filter(|param| {
                    let key = param.split('=').next().unwrap_or_default();
                    key != "pass" && key != "password"
                })
                .collect();
            if kept.is_empty() {
                path.to_string()
            } else {
                format!("{path}?{}", kept.join("&"))
            }
        }
        None => rest,
    };
    format!("{scheme}://{rest}")
}

fn one_line(err: &impl Display) -> String {
    err.to_string()
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_hidden_from_locations() {
        for (url, shown) in [
            (
                "redis://alice:s3cret@db.example:6380/2",
                "redis://alice@db.example:6380/2",
            ),
            ("redis://:s3cret@db.example", "redis://db.example"),
            ("rediss://alice@db.example", "rediss://alice@db.example"),
            (
                "redis+unix:///run/r.sock?db=3&pass=s3cret",
                "redis+unix:///run/r.sock?db=3",
            ),
            (
                "redis+unix:///run/r.sock?password=s3cret",
                "redis+unix:///run/r.sock",
            ),
            ("redis://:p@ss/w@rd@host/0", "redis://host/0"),
        ] {
            assert_eq!(without_password(url), shown, "{url}");
        }
        let config = RedisConfig {
            url: None,
            host: "::1".into(),
            port: 6379,
            db: 4,
            password: Some("s3cret".into()),
        };
        assert_eq!(display_location(&config), "redis://[::1]:6379/4");
    }

    #[test]
    fn history_times_in_every_upstream_encoding() {
        let go = r#"{"user":"bob","gpu_id":3,"start_time":"2026-05-14T16:36:44-04:00","end_time":"2026-05-14T20:46:44.9Z","duration_seconds":600.5,"reservation_type":"run"}"#;
        let record = parse_usage_record(go).unwrap();
        assert_eq!(record.actual_user, "bob");
        assert_eq!(record.end_time - record.start_time, 600);
        assert_eq!(record.start_time, 1_778_791_004);
        assert_eq!(parse_time(&serde_json::json!(1.9)), Some(1));
        assert_eq!(
            parse_time(&serde_json::json!("1700000000")),
            Some(1_700_000_000)
        );
        assert_eq!(parse_time(&serde_json::json!("17.5")), Some(17));
        assert_eq!(parse_time(&Value::Null), None);
        assert_eq!(parse_time(&serde_json::json!("yesterday")), None);
        assert!(parse_usage_record(r#"{"user":"bob","gpu_id":-1}"#).is_none());
    }
}
