//! What one command works with: the configuration, the open store, the pool, the
//! GPU provider and who is asking. Shared by every command that reads or claims GPUs.

use std::io::Read;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::gpu::{self, GpuProvider, procinfo};
use crate::gpu_status::{self, GpuStatus, UsageSnapshot};
use crate::queue::{self, QueueEntry};
use crate::state::{GpuSlot, Pool, RunOwner, Selection, UnixTime};
use crate::store::{self, AllocRequest, NewReservation, Store};

pub struct Session {
    pub config: Config,
    pub store: Box<dyn Store>,
    pub pool: Pool,
    pub provider: Box<dyn GpuProvider>,
    /// The real Unix user running this command.
    pub user: String,
    pub host: String,
}

/// The stored slots and queue and the observed usage, read together.
pub struct Observation {
    pub slots: Vec<GpuSlot>,
    /// The queued entries in order, dead ones included.
    pub queue: Vec<QueueEntry>,
    pub usage: UsageSnapshot,
    /// Reservations and queue entries whose process on this host is gone.
    pub dead_ids: Vec<String>,
    pub now: UnixTime,
}

impl Session {
    /// Opens the store and requires an initialised pool.
    pub fn open(config: &Config) -> Result<Self> {
        let mut store = store::open(config)?;
        let pool = store.pool()?.ok_or(Error::NotInitialized)?;
        Ok(Session {
            config: config.clone(),
            store,
            pool,
            provider: gpu::provider_for(pool.provider, pool.gpu_count, &config.gpu),
            user: procinfo::current_user()?,
            host: config.host_name.clone(),
        })
    }

    pub fn observe(&mut self) -> Result<Observation> {
        let (slots, queue, dead_ids) = self.read_state()?;
        let usage = gpu_status::snapshot(self.provider.as_ref());
        Ok(Observation {
            slots,
            queue,
            usage,
            dead_ids,
            now: now(),
        })
    }

    /// The slots and the queue entries collecting on them, with the IDs of
    /// reservations and entries whose process on this host is gone. The partial reservations of queue entries that
    /// are gone show as free, as the next change leaves them.
    pub fn read_state(&mut self) -> Result<(Vec<GpuSlot>, Vec<QueueEntry>, Vec<String>)> {
        read_state(self.store.as_mut(), &self.host)
    }

    /// This process, as the waiter of a queue entry.
    pub fn this_process(&self) -> Result<RunOwner> {
        let pid = std::process::id();
        let pid_start = procinfo::process_start_time(pid).ok_or_else(|| {
            Error::Runtime("cannot read this process's start time from /proc".into())
        })?;
        Ok(RunOwner {
            host: self.host.clone(),
            pid,
            pid_start,
        })
    }

    pub fn status(&mut self) -> Result<Vec<GpuStatus>> {
        let obs = self.observe()?;
        let mut rows = gpu_status::build(
            &obs.slots,
            &obs.usage,
            self.config.memory_threshold_mb,
            &obs.dead_ids,
            obs.now,
        );
        queue::mark_collected(&mut rows, &obs.queue, &obs.dead_ids, obs.now);
        Ok(rows)
    }

    /// The live queue, as `queue --json` and `/api/queue` show it.
    pub fn queue_report(&mut self) -> Result<queue::QueueReport> {
        let entries = self.store.queue()?;
        let dead_ids = dead_waiter_ids(&entries, &self.host);
        Ok(queue::report(&entries, &dead_ids, now()))
    }

    /// Checks real GPU usage, then claims GPUs atomically (after the waiters of the
    /// queue took what they can use). GPUs in use without reservation are never
    /// handed out; a failed usage check is an error, since claiming blind could hand
    /// out a busy GPU.
    pub fn claim(&mut self, reservation: NewReservation, selection: Selection) -> Result<Vec<u32>> {
        let request = self.alloc_request(reservation, selection)?;
        self.store.allocate(&request)
    }

    /// The request `claim` makes: the selection checked against the pool, usage and
    /// dead processes observed now.
    pub fn alloc_request(
        &mut self,
        reservation: NewReservation,
        selection: Selection,
    ) -> Result<AllocRequest> {
        crate::alloc::validate_selection(&selection, self.pool.gpu_count)?;
        let obs = self.observe()?;
        let usage = obs
            .usage
            .map_err(|e| Error::Gpu(format!("failed to validate GPU usage: {e}")))?;
        let unreserved = gpu_status::unreserved_gpus(
            &obs.slots,
            &usage,
            self.config.memory_threshold_mb,
            &obs.dead_ids,
            obs.now,
        );
        Ok(AllocRequest {
            reservation,
            selection,
            unreserved,
            dead_ids: obs.dead_ids,
            now: obs.now,
        })
    }
}

/// `Session::read_state` for a bare store (`report` needs no pool or provider).
pub fn read_state(
    store: &mut dyn Store,
    host: &str,
) -> Result<(Vec<GpuSlot>, Vec<QueueEntry>, Vec<String>)> {
    let view = store.pool_view()?;
    let queue = view.collecting;
    let mut dead_ids = gpu_status::dead_reservation_ids(&view.slots, host);
    dead_ids.extend(dead_waiter_ids(&queue, host));
    let slots = queue::without_dead_partials(view.slots, &queue, &dead_ids, now());
    Ok((slots, queue, dead_ids))
}

pub fn now() -> UnixTime {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A random identifier for a new reservation.
pub fn new_reservation_id() -> String {
    let mut bytes = [0u8; 12];
    let random = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if random.is_err() {
        // Unique enough without randomness: pid and a nanosecond clock.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        return format!("{:x}-{nanos:x}", std::process::id());
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The report of the `days` days up to `now`: finished reservations from the
/// history plus the ones the store still holds. `host` identifies run reservations
/// supervised on this machine, whose supervisor can be checked directly.
pub fn usage_report(
    store: &mut dyn Store,
    host: &str,
    days: u32,
    now: UnixTime,
    tz: &jiff::tz::TimeZone,
) -> Result<crate::report::Report> {
    let window = crate::report::Window::last_days(days, now);
    // History first, then the held GPUs: a reservation ending in between is left
    // out rather than counted twice.
    let mut usages = store.usage_summary(window.from, window.to)?;
    let (slots, _, dead_ids) = read_state(store, host)?;
    usages.extend(crate::report::tally(
        &crate::report::in_progress(&slots, &dead_ids, now),
        window,
    ));
    Ok(crate::report::build(usages, window, days, tz))
}

/// IDs of queue entries whose waiting process on `host` is gone.
pub fn dead_waiter_ids(entries: &[QueueEntry], host: &str) -> Vec<String> {
    entries
        .iter()
        .filter(|entry| {
            entry.waiter.as_ref().is_some_and(|waiter| {
                waiter.host == host && !procinfo::process_alive(waiter.pid, waiter.pid_start)
            })
        })
        .map(|entry| entry.id.clone())
        .collect()
}
