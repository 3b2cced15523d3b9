//! A fleet: every host's pool in one shared Redis, and what each host publishes so
//! that the others can show and use its GPUs (its GPU snapshot and when it last
//! reported).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::duration::format_duration;
use crate::error::Result;
use crate::gpu::{self, GpuUsage};
use crate::gpu_status::{GpuStatus, StatusKind, UsageSnapshot};
use crate::session;
use crate::state::{ProviderKind, UnixTime};
use crate::store::{self, Store};

/// How often `agent` publishes unless told otherwise (`--interval`).
pub const DEFAULT_INTERVAL_SECS: u64 = 10;
/// A host whose snapshot is older than this many of its intervals is stale.
pub const STALE_INTERVALS: u64 = 3;

/// A host's GPUs as it last saw them: the provider's answer with each process's
/// user and model, or why the provider failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostSnapshot {
    pub taken_at: UnixTime,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus: Option<Vec<GpuUsage>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl HostSnapshot {
    pub fn new(usage: &UsageSnapshot, taken_at: UnixTime) -> Self {
        let (gpus, error) = match usage {
            Ok(gpus) => (Some(gpus.clone()), None),
            Err(error) => (None, Some(error.clone())),
        };
        HostSnapshot {
            taken_at,
            gpus,
            error,
        }
    }

    pub fn usage(&self) -> UsageSnapshot {
        match (&self.gpus, &self.error) {
            (Some(gpus), _) => Ok(gpus.clone()),
            (None, Some(error)) => Err(error.clone()),
            (None, None) => Err("the host published no GPU data".into()),
        }
    }
}

/// A host of the fleet, as the registry knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostRecord {
    pub name: String,
    /// When its latest snapshot was taken; `None` if it never published one.
    pub reported_at: Option<UnixTime>,
    /// How often it publishes (its agent's `--interval`).
    pub interval_secs: u64,
}

impl HostRecord {
    /// Why the host counts as not reporting at `now`, or `None` while it does.
    pub fn staleness(&self, now: UnixTime) -> Option<Staleness> {
        match self.reported_at {
            None => Some(Staleness::Never),
            Some(at) => {
                let limit = (self.interval_secs.max(1) * STALE_INTERVALS) as i64;
                (now - at > limit).then_some(Staleness::Since(now - at))
            }
        }
    }
}

/// A host that is not reporting: nothing is allocated on it from elsewhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Staleness {
    Never,
    /// Seconds since its last snapshot.
    Since(i64),
}

impl std::fmt::Display for Staleness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Staleness::Never => f.write_str("host not reporting (no GPU snapshot yet)"),
            Staleness::Since(age) => write!(f, "host not reporting for {}", format_duration(*age)),
        }
    }
}

/// One host as `status --all`, `find` and the dashboard show it.
#[derive(Clone, Debug, PartialEq)]
pub struct HostStatus {
    pub name: String,
    pub is_local: bool,
    /// As the registry knows it; `None` for a host read over SSH.
    pub record: Option<HostRecord>,
    /// Its GPUs, or why they cannot be shown.
    pub view: Result<HostView, String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct HostView {
    /// The pool's provider (unknown for a host read over SSH).
    pub provider: Option<ProviderKind>,
    pub rows: Vec<GpuStatus>,
    /// Set when the host is not reporting: nothing is allocated on it from here.
    pub stale: Option<Staleness>,
}

/// `status --summary`'s figures for one host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub total: u32,
    pub available: u32,
    /// Reserved plus in use without reservation.
    pub in_use: u32,
    /// `8 NVIDIA H100 80GB HBM3`, several sorted and comma-joined, or `-`.
    pub gpu_models: String,
}

impl HostView {
    pub fn summary(&self) -> Summary {
        let count = |kind: StatusKind| self.rows.iter().filter(|r| r.status == kind).count() as u32;
        let mut models: BTreeMap<String, u32> = BTreeMap::new();
        for row in &self.rows {
            if let Some(model) = &row.gpu_model {
                *models.entry(model_label(self.provider, model)).or_default() += 1;
            }
        }
        let gpu_models = match models.is_empty() {
            true => "-".to_string(),
            false => models
                .iter()
                .map(|(model, n)| format!("{n} {model}"))
                .collect::<Vec<_>>()
                .join(", "),
        };
        Summary {
            total: self.rows.len() as u32,
            // A stale host's free GPUs are not offered: nobody can check them.
            available: match self.stale {
                Some(_) => 0,
                None => count(StatusKind::Available),
            },
            in_use: count(StatusKind::InUse) + count(StatusKind::Unreserved),
            gpu_models,
        }
    }
}

/// `NVIDIA H100 80GB HBM3` from the provider and the name without its vendor.
fn model_label(provider: Option<ProviderKind>, name: &str) -> String {
    let vendor = match provider {
        Some(ProviderKind::Nvidia) => "NVIDIA",
        Some(ProviderKind::Amd) => "AMD",
        Some(ProviderKind::Fake) | None => return name.to_string(),
    };
    match name.starts_with(vendor) {
        true => name.to_string(),
        false => format!("{vendor} {name}"),
    }
}

/// Which hosts `status --all` shows, in order: this host, then `remote_hosts` in
/// their order, then the rest of the registry by name.
pub fn host_order(local: &str, configured: &[String], registered: &[HostRecord]) -> Vec<String> {
    let mut order: Vec<String> = Vec::new();
    let known = |name: &str| registered.iter().any(|host| host.name == name);
    if known(local) {
        order.push(local.to_string());
    }
    for name in configured {
        if !order.contains(name) && name != local {
            order.push(name.clone());
        }
    }
    let mut rest: Vec<&HostRecord> = registered
        .iter()
        .filter(|host| !order.contains(&host.name))
        .collect();
    rest.sort_by(|a, b| a.name.cmp(&b.name));
    order.extend(rest.into_iter().map(|host| host.name.clone()));
    order
}

/// Reads the given hosts (all of them with `None`) from the store, and those only
/// listed in `remote_hosts` over SSH.
pub fn read(config: &Config, only: Option<&str>) -> Result<Vec<HostStatus>> {
    let mut store = match store::open(config) {
        Ok(store) => store,
        Err(err) if !config.remote_hosts.is_empty() && only.is_none() => {
            eprintln!("Warning: store not available locally ({err}), showing remote hosts only");
            return Ok(over_ssh(&config.remote_hosts, config));
        }
        Err(err) => return Err(err),
    };
    let registered = store.hosts()?;
    let names = match only {
        Some(name) => {
            let known = registered.iter().any(|host| host.name == name)
                || config.remote_hosts.iter().any(|host| host == name);
            if !known {
                store.select_host(name)?;
                return Err(store.missing_pool());
            }
            vec![name.to_string()]
        }
        None => host_order(&config.host_name, &config.remote_hosts, &registered),
    };
    if names.is_empty() {
        return Err(store.missing_pool());
    }
    let (in_store, by_ssh): (Vec<String>, Vec<String>) = names
        .into_iter()
        .partition(|name| registered.iter().any(|host| host.name == *name));
    // SSH answers take seconds: ask them all while the store is read.
    let ssh = std::thread::scope(|scope| -> Result<_> {
        let remote = scope.spawn(|| over_ssh(&by_ssh, config));
        let mut hosts = Vec::new();
        let record = |name: &str| registered.iter().find(|host| host.name == name).cloned();
        // This host's GPUs are queried here; the others' state is read in one go.
        let (local, others): (Vec<String>, Vec<String>) = in_store
            .into_iter()
            .partition(|name| *name == config.host_name);
        for name in local {
            let view = read_local(store.as_mut(), config);
            hosts.push(HostStatus {
                record: record(&name),
                name,
                is_local: true,
                view: view.map_err(|err| err.to_string()),
            });
        }
        for (name, data) in others.iter().zip(store.host_views(&others)?) {
            let record = record(name);
            let view = data.map(|data| {
                // Every name here came from the registry.
                let remote = record.clone().unwrap_or(HostRecord {
                    name: name.clone(),
                    reported_at: None,
                    interval_secs: DEFAULT_INTERVAL_SECS,
                });
                let provider = Some(data.pool.provider);
                let obs = session::remote_observation(data, &config.host_name, &remote);
                HostView {
                    provider,
                    rows: session::status_rows(&obs, config.memory_threshold_mb, true),
                    stale: obs.stale,
                }
            });
            hosts.push(HostStatus {
                name: name.clone(),
                is_local: false,
                record,
                view: view.map_err(|err| err.to_string()),
            });
        }
        Ok((hosts, remote.join().unwrap_or_default()))
    });
    let (mut hosts, remote) = ssh?;
    hosts.extend(remote);
    let position = |name: &str| {
        host_order(&config.host_name, &config.remote_hosts, &registered)
            .iter()
            .position(|n| n == name)
    };
    hosts.sort_by_key(|host| position(&host.name));
    Ok(hosts)
}

/// This host's view: its pool from the store, its GPUs queried now.
fn read_local(store: &mut dyn Store, config: &Config) -> Result<HostView> {
    store.select_host(&config.host_name)?;
    let pool = match store.pool()? {
        Some(pool) => pool,
        None => return Err(store.missing_pool()),
    };
    let provider = gpu::provider_for(pool.provider, pool.gpu_count, &config.gpu);
    let obs = session::observe(store, &config.host_name, None, provider.as_ref())?;
    Ok(HostView {
        provider: Some(pool.provider),
        rows: session::status_rows(&obs, config.memory_threshold_mb, false),
        stale: obs.stale,
    })
}

/// The hosts in `names` as their own `canhazgpu status --json` shows them, over SSH.
/// Only names from the configuration get here, after `--`, so none is an option.
fn over_ssh(names: &[String], config: &Config) -> Vec<HostStatus> {
    std::thread::scope(|scope| {
        let asks: Vec<_> = names
            .iter()
            .map(|name| scope.spawn(move || ssh_status(name)))
            .collect();
        names
            .iter()
            .zip(asks)
            .map(|(name, ask)| HostStatus {
                name: name.clone(),
                is_local: *name == config.host_name,
                record: None,
                view: ask
                    .join()
                    .unwrap_or_else(|_| Err("the SSH query failed".into())),
            })
            .collect()
    })
}

/// How long one host may take to answer over SSH, connection included.
const SSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

fn ssh_status(name: &str) -> Result<HostView, String> {
    let ssh = gpu::tool::Tool {
        name: "ssh",
        program: "ssh".into(),
        timeout: SSH_TIMEOUT,
    };
    let args = [
        "-o",
        "BatchMode=yes",
        "-o",
        "ConnectTimeout=10",
        "--",
        name,
        "canhazgpu",
        "status",
        "--json",
    ];
    let output = ssh.run(&args).map_err(|err| err.to_string())?;
    if !output.success {
        return Err(ssh.exit_error(&output).to_string());
    }
    let rows: Vec<GpuStatus> = serde_json::from_str(&output.stdout)
        .map_err(|err| format!("unexpected answer from canhazgpu on {name}: {err}"))?;
    Ok(HostView {
        provider: None,
        rows,
        stale: None,
    })
}

/// The hosts with at least `gpus` GPUs available now, most available first (`find`).
pub fn candidates(hosts: &[HostStatus], gpus: u32) -> Vec<(&HostStatus, Summary)> {
    let mut found: Vec<(&HostStatus, Summary)> = hosts
        .iter()
        .filter_map(|host| {
            let summary = host.view.as_ref().ok()?.summary();
            (summary.available >= gpus).then_some((host, summary))
        })
        .collect();
    found.sort_by(|(a, x), (b, y)| y.available.cmp(&x.available).then(a.name.cmp(&b.name)));
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_is_stale_after_three_intervals() {
        let host = HostRecord {
            name: "gpu1".into(),
            reported_at: Some(1000),
            interval_secs: 10,
        };
        assert_eq!(host.staleness(1030), None);
        assert_eq!(host.staleness(1031), Some(Staleness::Since(31)));
        assert_eq!(
            HostRecord {
                reported_at: Some(0),
                ..host.clone()
            }
            .staleness(303)
            .unwrap()
            .to_string(),
            "host not reporting for 0h 5m 3s"
        );
        let never = HostRecord {
            reported_at: None,
            ..host
        };
        assert_eq!(never.staleness(0), Some(Staleness::Never));
    }

    #[test]
    fn snapshots_keep_the_usage_or_the_error() {
        let failed: UsageSnapshot = Err("nvidia-smi timed out".into());
        let snapshot = HostSnapshot::new(&failed, 5);
        let json = serde_json::to_string(&snapshot).unwrap();
        let back: HostSnapshot = serde_json::from_str(&json).unwrap();
        assert_eq!(back.usage(), failed);
        let fine: UsageSnapshot = Ok(vec![GpuUsage {
            index: 0,
            memory_used_mb: Some(10),
            ..GpuUsage::default()
        }]);
        let back: HostSnapshot =
            serde_json::from_str(&serde_json::to_string(&HostSnapshot::new(&fine, 5)).unwrap())
                .unwrap();
        assert_eq!(back.usage(), fine);
    }
}
