//! The domain model shared by every store: reservations, GPU slots, history records,
//! and the rules that decide whether a reservation is still alive.

use serde::{Deserialize, Serialize};

/// Seconds since the Unix epoch.
pub type UnixTime = i64;

/// A run reservation whose heartbeat is older than this is stale (our supervisors).
pub const RUN_STALE_AFTER_SECS: i64 = 60;
/// Reservations written by upstream canhazgpu (no owner fields) heartbeat every 60 s;
/// upstream treats them as stale after 5 minutes, and so do we.
pub const LEGACY_RUN_STALE_AFTER_SECS: i64 = 300;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReservationKind {
    Run,
    Manual,
}

impl ReservationKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ReservationKind::Run => "run",
            ReservationKind::Manual => "manual",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "run" => Some(ReservationKind::Run),
            "manual" => Some(ReservationKind::Manual),
            _ => None,
        }
    }
}

/// Which GPU provider a pool was initialised with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    Nvidia,
    Amd,
    Fake,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Nvidia => "nvidia",
            ProviderKind::Amd => "amd",
            ProviderKind::Fake => "fake",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "nvidia" => Some(ProviderKind::Nvidia),
            "amd" => Some(ProviderKind::Amd),
            "fake" => Some(ProviderKind::Fake),
            _ => None,
        }
    }
}

/// The configured GPU pool of a machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pool {
    pub gpu_count: u32,
    pub provider: ProviderKind,
}

/// The process that supervises a run reservation, so that any canhazgpu on the same
/// host can tell at once whether it is still alive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunOwner {
    pub host: String,
    pub pid: u32,
    /// Start time of `pid` in clock ticks since boot (`/proc/PID/stat` field 22), so a
    /// reused PID is not mistaken for the supervisor.
    pub pid_start: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reservation {
    /// Unique per reservation; empty for reservations written by upstream canhazgpu.
    pub id: String,
    /// Display name (`--user`), normally equal to `actual_user`.
    pub user: String,
    /// The real Unix account that made the reservation.
    pub actual_user: String,
    pub kind: ReservationKind,
    pub start_time: UnixTime,
    pub last_heartbeat: Option<UnixTime>,
    pub expiry_time: Option<UnixTime>,
    pub note: Option<String>,
    pub owner: Option<RunOwner>,
    /// For a job adopted with `adopt`: the name of the adopted process (`owner`).
    pub adopted: Option<String>,
    /// What the agent measured on this GPU while the reservation held it.
    pub activity: Option<Box<Activity>>,
}

/// The measurements of one GPU of a reservation, taken by the agent
/// (`pool::sample`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Activity {
    /// When the GPU was last busy: utilization at or above the idle threshold, or the
    /// holder's processes' memory changed. The reservation's start until then.
    pub last_active: UnixTime,
    pub samples: u32,
    /// Sum and number of the utilization readings (not every GPU reports one).
    pub utilization_sum: u64,
    pub utilization_samples: u32,
    pub peak_memory_mb: u64,
    /// The holder's processes' memory at the last sample, to notice a change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder_memory_mb: Option<u64>,
    /// The idle warning was sent (once per fleet: this record says so).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub idle_warned: bool,
    /// The holder was told the reservation ends soon.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub expiry_warned: bool,
    /// Other users' processes on the GPU that the holder was told about.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reported_squatters: Vec<u32>,
}

impl Activity {
    pub fn mean_utilization_percent(&self) -> Option<u32> {
        self.utilization().mean_percent()
    }

    pub fn utilization(&self) -> Utilization {
        Utilization {
            sum: self.utilization_sum,
            samples: self.utilization_samples,
        }
    }
}

/// Utilization readings added up: their sum and number (a mean once some were taken).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Utilization {
    pub sum: u64,
    pub samples: u32,
}

impl Utilization {
    pub fn add(&mut self, other: Utilization) {
        self.sum += other.sum;
        self.samples += other.samples;
    }

    pub fn mean_percent(&self) -> Option<u32> {
        (self.samples > 0).then(|| (self.sum / u64::from(self.samples)) as u32)
    }

    /// What a reservation's measurements add to its history record.
    pub fn of(activity: Option<&Activity>) -> Utilization {
        activity.map(Activity::utilization).unwrap_or_default()
    }
}

/// Whether a reservation still holds its GPU, and if not, when it ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Liveness {
    Active,
    /// A manual reservation past its expiry time.
    Expired {
        ended_at: UnixTime,
    },
    /// A run reservation without a recent heartbeat.
    Stale {
        ended_at: UnixTime,
    },
    /// A run reservation whose supervisor on this host is gone.
    OwnerGone {
        ended_at: UnixTime,
    },
}

impl Liveness {
    pub fn is_active(self) -> bool {
        matches!(self, Liveness::Active)
    }

    pub fn ended_at(self) -> Option<UnixTime> {
        match self {
            Liveness::Active => None,
            Liveness::Expired { ended_at }
            | Liveness::Stale { ended_at }
            | Liveness::OwnerGone { ended_at } => Some(ended_at),
        }
    }
}

impl Reservation {
    /// Decides liveness from stored data alone; `dead_ids` lists reservations whose
    /// local supervisor is known to be gone (checked by the caller through /proc).
    /// Only run reservations have a supervisor: a manual reservation outlives the
    /// process that made it, even one whose ID is in `dead_ids` (a waiter that was
    /// served and has exited).
    pub fn liveness(&self, now: UnixTime, dead_ids: &[String]) -> Liveness {
        match self.kind {
            ReservationKind::Manual => match self.expiry_time {
                Some(expiry) if now >= expiry => Liveness::Expired { ended_at: expiry },
                _ => Liveness::Active,
            },
            ReservationKind::Run => {
                let last = self.last_heartbeat.unwrap_or(self.start_time);
                if !self.id.is_empty() && dead_ids.contains(&self.id) {
                    // Its last sign of life, not the moment somebody noticed: a GPU
                    // nobody takes for hours must not count as used all that time.
                    return Liveness::OwnerGone {
                        ended_at: last.max(self.start_time),
                    };
                }
                let stale_after = if self.owner.is_some() {
                    RUN_STALE_AFTER_SECS
                } else {
                    LEGACY_RUN_STALE_AFTER_SECS
                };
                if now - last > stale_after {
                    Liveness::Stale {
                        ended_at: last.max(self.start_time),
                    }
                } else {
                    Liveness::Active
                }
            }
        }
    }

    /// When the reservation ends by itself unless renewed: a manual one at its
    /// expiry, a run one when its heartbeat goes stale. `liveness` says `Active`
    /// before that time (unless its process is gone) and not from then on.
    pub fn ends_at(&self) -> Option<UnixTime> {
        match self.kind {
            ReservationKind::Manual => self.expiry_time,
            ReservationKind::Run => {
                let last = self.last_heartbeat.unwrap_or(self.start_time);
                let stale_after = if self.owner.is_some() {
                    RUN_STALE_AFTER_SECS
                } else {
                    LEGACY_RUN_STALE_AFTER_SECS
                };
                Some(last + stale_after + 1)
            }
        }
    }

    /// The agent's measurements, started (idle since the reservation began) when
    /// there are none yet.
    pub fn activity_mut(&mut self) -> &mut Activity {
        let start = self.start_time;
        self.activity.get_or_insert_with(|| {
            Box::new(Activity {
                last_active: start,
                ..Default::default()
            })
        })
    }

    /// `alice`, or `alice (svc)` when a display name was given with `--user`.
    pub fn user_label(&self) -> String {
        user_label(&self.user, &self.actual_user)
    }
}

/// `alice`, or `alice (svc)` for display name `svc` of Unix user `alice`.
pub fn user_label(user: &str, actual_user: &str) -> String {
    if user == actual_user || actual_user.is_empty() {
        user.to_string()
    } else {
        format!("{actual_user} ({user})")
    }
}

/// The reservation an allocation creates on each claimed GPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewReservation {
    pub id: String,
    pub user: String,
    pub actual_user: String,
    pub kind: ReservationKind,
    /// Manual reservations only.
    pub expiry_time: Option<UnixTime>,
    pub note: Option<String>,
    /// Run reservations only: the supervising process (the job itself when adopted).
    pub owner: Option<RunOwner>,
    /// The adopted process's name (`adopt`).
    pub adopted: Option<String>,
}

impl NewReservation {
    /// The reservation as a store holds it after claiming a GPU at `now`.
    pub fn held_from(self, now: UnixTime) -> Reservation {
        Reservation {
            last_heartbeat: (self.kind == ReservationKind::Run).then_some(now),
            id: self.id,
            user: self.user,
            actual_user: self.actual_user,
            kind: self.kind,
            start_time: now,
            expiry_time: self.expiry_time,
            note: self.note,
            owner: self.owner,
            adopted: self.adopted,
            activity: None,
        }
    }
}

/// What the store holds for one GPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GpuSlot {
    Free {
        last_released: Option<UnixTime>,
    },
    Held(Reservation),
    /// The stored state could not be read; the reason says why.
    Corrupt(String),
}

/// One finished reservation of one GPU, as kept for `report`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRecord {
    pub user: String,
    pub actual_user: String,
    pub gpu_id: u32,
    pub start_time: UnixTime,
    pub end_time: UnixTime,
    pub kind: ReservationKind,
    /// The agent's utilization readings while it was held (none without an agent).
    #[serde(default)]
    pub utilization: Utilization,
}

/// How many GPUs a request wants: a count, or specific IDs (all or nothing).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selection {
    Count(u32),
    Ids(Vec<u32>),
}

impl Selection {
    pub fn len(&self) -> u32 {
        match self {
            Selection::Count(n) => *n,
            Selection::Ids(ids) => ids.len() as u32,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_reservation(owner: bool) -> Reservation {
        Reservation {
            id: "r1".into(),
            user: "alice".into(),
            actual_user: "alice".into(),
            kind: ReservationKind::Run,
            start_time: 1000,
            last_heartbeat: Some(1100),
            expiry_time: None,
            note: None,
            owner: owner.then(|| RunOwner {
                host: "h".into(),
                pid: 1,
                pid_start: 1,
            }),
            adopted: None,
            activity: None,
        }
    }

    #[test]
    fn run_staleness_depends_on_owner_fields() {
        let ours = run_reservation(true);
        assert!(ours.liveness(1160, &[]).is_active());
        assert_eq!(ours.liveness(1161, &[]), Liveness::Stale { ended_at: 1100 });
        let legacy = run_reservation(false);
        assert!(legacy.liveness(1400, &[]).is_active());
        assert!(!legacy.liveness(1401, &[]).is_active());
        assert_eq!(
            ours.liveness(1105, &["r1".to_string()]),
            Liveness::OwnerGone { ended_at: 1100 }
        );
    }

    #[test]
    fn ends_at_is_when_liveness_ends() {
        let mut manual = run_reservation(false);
        manual.kind = ReservationKind::Manual;
        manual.expiry_time = Some(2000);
        for r in [run_reservation(true), run_reservation(false), manual] {
            let at = r.ends_at().unwrap();
            assert!(r.liveness(at - 1, &[]).is_active(), "{r:?}");
            assert!(!r.liveness(at, &[]).is_active(), "{r:?}");
        }
    }

    #[test]
    fn a_gone_process_ends_only_run_reservations() {
        let mut manual = run_reservation(false);
        manual.kind = ReservationKind::Manual;
        manual.expiry_time = Some(2000);
        assert!(manual.liveness(1500, &["r1".to_string()]).is_active());
    }

    #[test]
    fn manual_expiry() {
        let mut r = run_reservation(false);
        r.kind = ReservationKind::Manual;
        r.expiry_time = Some(2000);
        assert!(r.liveness(1999, &[]).is_active());
        assert_eq!(r.liveness(2000, &[]), Liveness::Expired { ended_at: 2000 });
    }
}
