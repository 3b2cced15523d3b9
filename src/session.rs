//! What one command works with: the configuration, the open store, the pool, the
//! GPU provider and who is asking. Shared by every command that reads or claims GPUs.

use std::io::Read;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::fleet::{HostRecord, HostSnapshot, Staleness};
use crate::gpu::{self, GpuProvider, procinfo};
use crate::gpu_status::{self, GpuStatus, UsageSnapshot};
use crate::queue::{self, QueueEntry};
use crate::state::{GpuSlot, Pool, RunOwner, Selection, UnixTime};
use crate::store::{self, AllocRequest, Force, HostData, NewReservation, PoolView, Store};

pub struct Session {
    pub config: Config,
    pub store: Box<dyn Store>,
    pub pool: Pool,
    pub provider: Box<dyn GpuProvider>,
    /// The real Unix user running this command.
    pub user: String,
    /// This host (`host_name`), whose processes can be checked directly.
    pub host: String,
    /// The other host whose pool the session acts on (`--host`), as the registry
    /// knows it; `None` for this host's own pool.
    pub remote: Option<HostRecord>,
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
    /// Another host's pool whose host is not reporting: `usage` is an error then.
    pub stale: Option<Staleness>,
}

impl Session {
    /// Opens the store and requires an initialised pool.
    pub fn open(config: &Config) -> Result<Self> {
        Self::open_on(config, None)
    }

    /// Like `open`, on host `host`'s pool when given (`--host`): its GPU usage is
    /// what that host last published.
    pub fn open_on(config: &Config, host: Option<&str>) -> Result<Self> {
        let mut store = store::open(config)?;
        let remote = match host.filter(|host| *host != config.host_name) {
            None => None,
            Some(name) => {
                store.select_host(name)?;
                let record = store.hosts()?.into_iter().find(|h| h.name == name);
                Some(record.ok_or_else(|| store.missing_pool())?)
            }
        };
        let pool = match store.pool()? {
            Some(pool) => pool,
            None => return Err(store.missing_pool()),
        };
        Ok(Session {
            config: config.clone(),
            store,
            pool,
            provider: gpu::provider_for(pool.provider, pool.gpu_count, &config.gpu),
            user: procinfo::current_user()?,
            host: config.host_name.clone(),
            remote,
        })
    }

    /// The host whose pool this session acts on.
    pub fn pool_host(&self) -> &str {
        self.remote
            .as_ref()
            .map_or(&self.host, |remote| &remote.name)
    }

    /// ` on NAME` for messages about another host's pool; empty for this host's.
    pub fn on_host(&self) -> String {
        self.remote
            .as_ref()
            .map_or_else(String::new, |remote| format!(" on {}", remote.name))
    }

    /// Tells people of `events` (see `notify`), waiting briefly for the delivery:
    /// a command that ends right after must not cut it off, nor be held up by it.
    pub fn notify(&mut self, events: Vec<crate::notify::Event>) {
        let sending = crate::notify::send(&self.config, self.store.as_mut(), events, false);
        crate::notify::finish(sending);
    }

    /// The stored state and the GPUs' usage: queried here (and published for the
    /// rest of the fleet), or for another host, its latest snapshot unless it is
    /// stale.
    pub fn observe(&mut self) -> Result<Observation> {
        observe(
            self.store.as_mut(),
            &self.host,
            self.remote.as_ref(),
            self.provider.as_ref(),
        )
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
        Ok(status_rows(
            &obs,
            self.config.memory_threshold_mb,
            self.remote.is_some(),
        ))
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
        let request = self.alloc_request(reservation, selection, false)?;
        self.store.allocate(&request)
    }

    /// The request `claim` makes: the selection checked against the pool, usage and
    /// dead processes observed now. With `take_over` (`reserve --force`, `adopt`) it
    /// carries who runs the processes on each GPU in use without reservation, for
    /// the pool core to decide which of them the requester may take.
    pub fn alloc_request(
        &mut self,
        reservation: NewReservation,
        selection: Selection,
        take_over: bool,
    ) -> Result<AllocRequest> {
        crate::alloc::validate_selection(&selection, self.pool.gpu_count)?;
        let obs = self.observe()?;
        self.request_from(obs, reservation, selection, take_over)
    }

    /// `alloc_request` on what was observed already.
    pub fn request_from(
        &self,
        obs: Observation,
        reservation: NewReservation,
        selection: Selection,
        take_over: bool,
    ) -> Result<AllocRequest> {
        crate::alloc::validate_selection(&selection, self.pool.gpu_count)?;
        let usage = obs.usage.map_err(|e| match &self.remote {
            None => Error::Gpu(format!("failed to validate GPU usage: {e}")),
            Some(remote) => Error::Gpu(format!(
                "cannot allocate on {}: {e} (is 'canhazgpu agent' running there?)",
                remote.name
            )),
        })?;
        let unreserved = gpu_status::unreserved_gpus(
            &obs.slots,
            &usage,
            self.config.memory_threshold_mb,
            &obs.dead_ids,
            obs.now,
        );
        let force = take_over.then(|| Force {
            process_users: unreserved
                .iter()
                .map(|&gpu| {
                    let users = usage
                        .iter()
                        .filter(|u| u.index == gpu)
                        .flat_map(|u| &u.processes)
                        .map(|p| p.user.clone().unwrap_or_else(|| procinfo::UNKNOWN.into()))
                        .collect();
                    (gpu, users)
                })
                .collect(),
            any_user: nix::unistd::getuid().is_root(),
        });
        Ok(AllocRequest {
            reservation,
            selection,
            unreserved,
            dead_ids: obs.dead_ids,
            now: obs.now,
            force,
            policy: self.config.policy,
        })
    }
}

/// The stored state of the selected host's pool and its GPUs' usage: queried here
/// with `provider` (and published for the rest of the fleet), or for another host,
/// its latest snapshot unless it is stale.
pub fn observe(
    store: &mut dyn Store,
    host: &str,
    remote: Option<&HostRecord>,
    provider: &dyn GpuProvider,
) -> Result<Observation> {
    let (slots, queue, dead_ids) = read_state(store, host)?;
    let now = now();
    let (usage, stale) = match remote {
        None => {
            let usage = gpu_status::snapshot(provider);
            // A hint for other hosts: failing to publish must not fail the command.
            let _ = store.publish_snapshot(&HostSnapshot::new(&usage, now), None);
            (usage, None)
        }
        Some(remote) => remote_usage(store.host_snapshot()?, remote, now),
    };
    Ok(Observation {
        slots,
        queue,
        usage,
        dead_ids,
        now,
        stale,
    })
}

/// Another host's published usage, or why there is none to trust.
fn remote_usage(
    snapshot: Option<HostSnapshot>,
    remote: &HostRecord,
    now: UnixTime,
) -> (UsageSnapshot, Option<Staleness>) {
    let record = HostRecord {
        reported_at: snapshot.as_ref().map(|s| s.taken_at),
        ..remote.clone()
    };
    match (record.staleness(now), snapshot) {
        (None, Some(snapshot)) => (snapshot.usage(), None),
        (stale, _) => {
            let stale = stale.unwrap_or(Staleness::Never);
            (Err(stale.to_string()), Some(stale))
        }
    }
}

/// `observe` for another host whose stored state was read already
/// (`Store::host_views`); `host` is this host.
pub fn remote_observation(data: HostData, host: &str, remote: &HostRecord) -> Observation {
    let (slots, queue, dead_ids) = state_of(data.view, host);
    let now = now();
    let (usage, stale) = remote_usage(data.snapshot, remote, now);
    Observation {
        slots,
        queue,
        usage,
        dead_ids,
        now,
        stale,
    }
}

/// The rows of `status` for an observation; on another host's pool, a missing or
/// stale snapshot is every GPU's validation.
pub fn status_rows(obs: &Observation, threshold_mb: u64, remote: bool) -> Vec<GpuStatus> {
    let mut rows = gpu_status::build(&obs.slots, &obs.usage, threshold_mb, &obs.dead_ids, obs.now);
    queue::mark_collected(&mut rows, &obs.queue, &obs.dead_ids, obs.now);
    if let (true, Err(why)) = (remote, &obs.usage) {
        for row in &mut rows {
            row.validation = Some(why.clone());
        }
    }
    rows
}

/// `Session::read_state` for a bare store (`report` needs no pool or provider).
pub fn read_state(
    store: &mut dyn Store,
    host: &str,
) -> Result<(Vec<GpuSlot>, Vec<QueueEntry>, Vec<String>)> {
    Ok(state_of(store.pool_view()?, host))
}

/// The slots (partial reservations of gone waiters shown free), the collecting
/// entries, and the IDs of reservations and entries whose process on `host` is gone.
fn state_of(view: PoolView, host: &str) -> (Vec<GpuSlot>, Vec<QueueEntry>, Vec<String>) {
    let queue = view.collecting;
    let mut dead_ids = gpu_status::dead_reservation_ids(&view.slots, host);
    dead_ids.extend(dead_waiter_ids(&queue, host));
    let slots = queue::without_dead_partials(view.slots, &queue, &dead_ids, now());
    (slots, queue, dead_ids)
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
    let usages = usage_in(store, host, window, now)?;
    Ok(crate::report::build(usages, window, days, tz))
}

/// The selected pool's usage per account in `window`: finished reservations from
/// the history plus the ones the store still holds.
pub fn usage_in(
    store: &mut dyn Store,
    host: &str,
    window: crate::report::Window,
    now: UnixTime,
) -> Result<Vec<crate::report::UserUsage>> {
    // History first, then the held GPUs: a reservation ending in between is left
    // out rather than counted twice.
    let mut usages = store.usage_summary(window.from, window.to)?;
    let (slots, _, dead_ids) = read_state(store, host)?;
    usages.extend(crate::report::tally(
        &crate::report::in_progress(&slots, &dead_ids, now),
        window,
    ));
    Ok(usages)
}

/// `report --all`: every host of the fleet added up, with each host's share.
pub fn fleet_report(
    store: &mut dyn Store,
    host: &str,
    days: u32,
    now: UnixTime,
    tz: &jiff::tz::TimeZone,
) -> Result<crate::report::Report> {
    let window = crate::report::Window::last_days(days, now);
    let mut all = Vec::new();
    let mut hosts = Vec::new();
    for record in store.hosts()? {
        store.select_host(&record.name)?;
        // A host removed meanwhile has nothing to add.
        let Some(pool) = store.pool()? else {
            continue;
        };
        let usages = usage_in(store, host, window, now)?;
        hosts.push(crate::report::HostRow::new(
            &record.name,
            pool.gpu_count,
            &usages,
            window,
        ));
        all.extend(usages);
    }
    let mut report = crate::report::build(all, window, days, tz);
    report.hosts = Some(hosts);
    Ok(report)
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
