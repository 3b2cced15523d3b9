//! `canhazgpu agent`: keeps this host's GPU snapshot and heartbeat fresh for the rest
//! of the fleet, until SIGTERM (or SIGINT, SIGHUP, SIGQUIT).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::duration::{format_duration, parse_duration};
use crate::error::{Error, Result};
use crate::fleet::HostSnapshot;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::gpu::{self, GpuProvider, GpuUsage, procinfo};
use crate::gpu_status;
use crate::notify;
use crate::session::now;
use crate::state::GpuSlot;
use crate::store::{self, GpuReading, Store, TickRequest};
use crate::wait::WaitSignals;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentArgs {
    pub interval: String,
    /// `--metrics-listen ADDR`: serve `/metrics` there too.
    pub metrics_listen: Option<String>,
}

/// Longer than this, and a host would be "reporting" with hour-old data.
const MAX_INTERVAL_SECS: u64 = 3600;

pub fn execute(args: &AgentArgs, config: &Config) -> Result<()> {
    let interval = parse_duration(&args.interval)?;
    if !(1..=MAX_INTERVAL_SECS).contains(&interval) {
        return Err(Error::Usage(format!(
            "--interval must be from 1s to {}",
            format_duration(MAX_INTERVAL_SECS as i64)
        )));
    }
    let signals = WaitSignals::install()?;
    // After the signals are blocked: the server's thread inherits the mask.
    if let Some(address) = &args.metrics_listen {
        let bound = crate::metrics::serve_in_background(address, config.clone())?;
        eprintln!("canhazgpu agent: Prometheus metrics on http://{bound}/metrics");
    }
    let mut agent = Agent::start(config, interval, "canhazgpu agent")?;
    let what = match &config.store {
        crate::store::StoreConfig::Redis(_) => "publishing",
        // Nobody else reads the embedded store; the queries still show failures.
        crate::store::StoreConfig::Sqlite { .. } => "checking (embedded store: nothing to publish)",
    };
    eprintln!(
        "canhazgpu agent: {what} {}'s GPUs every {}",
        config.host_name,
        format_duration(interval as i64)
    );
    let period = Duration::from_secs(interval);
    loop {
        let started = Instant::now();
        agent.publish(config);
        while let Some(left) = period.checked_sub(started.elapsed()) {
            if signals.pending().is_some() {
                break;
            }
            signals.doorbell().sleep(left);
        }
        if let Some(signal) = signals.pending() {
            eprintln!("canhazgpu agent: stopped by {signal}");
            return Ok(());
        }
    }
}

/// What `pool::tick` needs of each GPU's usage.
fn readings(gpus: &[GpuUsage]) -> Vec<GpuReading> {
    gpus.iter()
        .map(|gpu| {
            let mut memory_by_user: BTreeMap<String, u64> = BTreeMap::new();
            let mut processes = Vec::new();
            for process in &gpu.processes {
                let user = process.user.clone().unwrap_or_default();
                *memory_by_user.entry(user.clone()).or_default() +=
                    process.used_memory_mb.unwrap_or(0);
                processes.push((process.pid, user));
            }
            GpuReading {
                gpu: gpu.index,
                utilization_percent: gpu.utilization_percent,
                memory_used_mb: gpu.memory_used_mb,
                memory_by_user,
                processes,
            }
        })
        .collect()
}

/// The agent's store connection (reopened after a failure) and GPU provider.
pub struct Agent {
    store: Option<Box<dyn Store>>,
    provider: Box<dyn GpuProvider>,
    interval_secs: u64,
    /// Who says so in messages: `agent` itself, or `web` publishing for its host.
    who: &'static str,
    /// The last failure reported, so an outage is one line, not one per interval.
    failing: Option<String>,
    /// Processes sent SIGTERM by policy, by (PID, start time), with when.
    terminated: HashMap<(u32, u64), Instant>,
}

impl Agent {
    /// Needs this host's pool: its provider says how to read the GPUs.
    pub fn start(config: &Config, interval_secs: u64, who: &'static str) -> Result<Self> {
        let mut store = store::open(config)?;
        let pool = match store.pool()? {
            Some(pool) => pool,
            None => return Err(store.missing_pool()),
        };
        Ok(Agent {
            store: Some(store),
            provider: gpu::provider_for(pool.provider, pool.gpu_count, &config.gpu),
            interval_secs,
            who,
            failing: None,
            terminated: HashMap::new(),
        })
    }

    /// `policy.foreign_use` / `policy.unreserved_use: terminate`: SIGTERM to each
    /// intruding process when first seen, SIGKILL once `policy.foreign_grace` has
    /// passed and it is still there.
    fn enforce(&mut self, config: &Config, slots: &[GpuSlot], gpus: &[GpuUsage]) {
        let policy = &config.policy;
        let dead_ids = gpu_status::dead_reservation_ids(slots, &config.host_name);
        let grace = Duration::from_secs(policy.foreign_grace);
        let intruders =
            gpu_status::intruders(slots, gpus, config.memory_threshold_mb, &dead_ids, now());
        for intruder in intruders {
            let wanted = match intruder.foreign {
                true => policy.terminate_foreign,
                false => policy.terminate_unreserved,
            };
            let Some(start) = procinfo::process_start_time(intruder.pid).filter(|_| wanted) else {
                continue;
            };
            let pid = Pid::from_raw(intruder.pid as i32);
            let why = match intruder.foreign {
                true => "on a GPU reserved by someone else",
                false => "on a GPU in use without reservation",
            };
            match self.terminated.get(&(intruder.pid, start)) {
                None => {
                    let _ = kill(pid, Signal::SIGTERM);
                    eprintln!(
                        "canhazgpu agent: sent SIGTERM to PID {} of {} on GPU {} ({why}, policy)",
                        intruder.pid, intruder.user, intruder.gpu
                    );
                    self.terminated
                        .insert((intruder.pid, start), Instant::now());
                }
                Some(since) if since.elapsed() >= grace => {
                    let _ = kill(pid, Signal::SIGKILL);
                    eprintln!(
                        "canhazgpu agent: sent SIGKILL to PID {} of {} on GPU {} after the grace period",
                        intruder.pid, intruder.user, intruder.gpu
                    );
                }
                Some(_) => {}
            }
        }
        self.terminated
            .retain(|(pid, start), _| procinfo::process_alive(*pid, *start));
    }

    /// Queries the GPUs and publishes the snapshot (the host's heartbeat). A
    /// failure is reported once and retried at the next interval.
    pub fn publish(&mut self, config: &Config) {
        let usage = gpu_status::snapshot(self.provider.as_ref());
        let snapshot = HostSnapshot::new(&usage, now());
        let result = match self.store.take() {
            Some(store) => Ok(store),
            None => store::open(config),
        }
        .and_then(|mut store| {
            store.publish_snapshot(&snapshot, Some(self.interval_secs))?;
            let noticed = store.tick(&TickRequest {
                // Without usage nothing is measured; the policy still applies.
                readings: usage.as_deref().map(readings).unwrap_or_default(),
                policy: config.policy,
                expiry_warning: config.notify.expiry_warning,
                now: snapshot.taken_at,
            })?;
            let events = notify::noticed_events(&noticed, &config.host_name, snapshot.taken_at);
            notify::send(config, store.as_mut(), events, true);
            Ok(store)
        });

        match result {
            Ok(store) => {
                self.store = Some(store);
                if self.failing.take().is_some() {
                    eprintln!("{}: publishing again", self.who);
                }
            }
            Err(err) => {
                let message = err.to_string();
                if self.failing.as_ref() != Some(&message) {
                    eprintln!("{}: cannot publish: {message}", self.who);
                }
                self.failing = Some(message);
            }
        }
        let policy = &config.policy;
        if (policy.terminate_foreign || policy.terminate_unreserved)
            && nix::unistd::geteuid().is_root()
            && let Ok(gpus) = &usage
            && let Some(Ok(slots)) = self.store.as_mut().map(|store| store.slots())
        {
            self.enforce(config, &slots, gpus);
        }
    }
}
