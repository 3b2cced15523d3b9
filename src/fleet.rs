//! A fleet: every host's pool in one shared Redis, and what each host publishes so
//! that the others can show and use its GPUs (its GPU snapshot and when it last
//! reported).

use serde::{Deserialize, Serialize};

use crate::duration::format_duration;
use crate::gpu::GpuUsage;
use crate::gpu_status::UsageSnapshot;
use crate::state::UnixTime;

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
