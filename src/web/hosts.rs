//! The fleet's JSON for the dashboard: `/api/hosts` (who is there, who reports) and
//! `/api/hosts/status` (each host's GPUs and summary, as upstream's dashboard reads
//! them), both made from one cached `fleet::read`.

use serde::Serialize;

use super::backend::ApiError;
use crate::fleet::{HostStatus, Summary};
use crate::gpu_status::GpuStatus;
use crate::state::UnixTime;

/// One host of `/api/hosts`.
#[derive(Serialize)]
pub struct HostEntry<'a> {
    name: &'a str,
    is_local: bool,
    /// When its latest snapshot was taken (Unix seconds); `None` if never, or read
    /// over SSH.
    reported_at: Option<UnixTime>,
    stale: bool,
    /// `redis` (the shared store) or `ssh` (a `remote_hosts` entry not in it).
    source: &'static str,
}

/// One host of `/api/hosts/status`.
#[derive(Serialize)]
pub struct HostStatusEntry<'a> {
    host: &'a str,
    is_local: bool,
    stale: bool,
    /// As `status --json` on that host; empty when it cannot be shown.
    statuses: &'a [GpuStatus],
    summary: Summary,
    error: Option<&'a str>,
}

/// The hosts as a read at `read_at` found them.
pub fn overview(hosts: &[HostStatus], read_at: UnixTime) -> Vec<HostEntry<'_>> {
    hosts
        .iter()
        .map(|host| HostEntry {
            name: &host.name,
            is_local: host.is_local,
            reported_at: host.record.as_ref().and_then(|r| r.reported_at),
            stale: stale(host, read_at),
            source: match host.record {
                Some(_) => "redis",
                None => "ssh",
            },
        })
        .collect()
}

/// Every host, or only `only`, which must be one of them.
pub fn statuses<'a>(
    hosts: &'a [HostStatus],
    read_at: UnixTime,
    only: Option<&str>,
) -> Result<Vec<HostStatusEntry<'a>>, ApiError> {
    let chosen: Vec<&HostStatus> = match only {
        None => hosts.iter().collect(),
        Some(name) => match hosts.iter().find(|host| host.name == name) {
            Some(host) => vec![host],
            None => {
                let known: Vec<String> = hosts.iter().map(|h| h.name.clone()).collect();
                return Err(ApiError::unknown_host(name, &known));
            }
        },
    };
    Ok(chosen
        .into_iter()
        .map(|host| {
            let (statuses, summary, error) = match &host.view {
                Ok(view) => (view.rows.as_slice(), view.summary(), None),
                Err(error) => (
                    &[][..],
                    Summary {
                        total: 0,
                        available: 0,
                        in_use: 0,
                        gpu_models: "-".into(),
                    },
                    Some(error.as_str()),
                ),
            };
            HostStatusEntry {
                host: &host.name,
                is_local: host.is_local,
                stale: stale(host, read_at),
                statuses,
                summary,
                error,
            }
        })
        .collect())
}

/// Whether the host is not reporting: as its view says, or, where it has none,
/// as its registry record says.
fn stale(host: &HostStatus, now: UnixTime) -> bool {
    match &host.view {
        Ok(view) => view.stale.is_some(),
        Err(_) => host
            .record
            .as_ref()
            .is_some_and(|record| record.staleness(now).is_some()),
    }
}
