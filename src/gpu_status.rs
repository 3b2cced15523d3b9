//! What `status`, `--json` and the web API show for each GPU: the stored
//! reservations combined with the GPUs' real usage.

use std::collections::{BTreeSet, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::duration::format_duration;
use crate::gpu::model::{self, ModelInfo};
use crate::gpu::{GpuProvider, GpuUsage, procinfo};
use crate::state::{GpuSlot, Liveness, Reservation, ReservationKind, UnixTime};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum StatusKind {
    Available,
    InUse,
    Unreserved,
    Error,
}

impl StatusKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StatusKind::Available => "AVAILABLE",
            StatusKind::InUse => "IN_USE",
            StatusKind::Unreserved => "UNRESERVED",
            StatusKind::Error => "ERROR",
        }
    }
}

/// One row of `status`; serialises to the reference's `status --json` shape (and
/// reads it back, from another host's `status --json` over SSH).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GpuStatus {
    pub gpu_id: u32,
    pub status: StatusKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration: Option<String>,
    /// `RUN` or `MANUAL`.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub details: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub validation: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unreserved_users: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub process_info: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_used_mb: Option<u64>,
    /// A manual reservation's end, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiry_time: Option<UnixTime>,
    /// An adopted job's process ID (`adopt`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// The GPU's utilization now, where the provider reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub utilization_percent: Option<u32>,
    /// A reservation's measurements by the agent: seconds since the GPU was last busy,
    /// mean utilization and peak memory while held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_seconds: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_utilization_percent: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_memory_mb: Option<u64>,
    /// Users other than the holder with processes on a reserved GPU (squatters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub foreign_users: Option<Vec<String>>,
}

/// A manual reservation idle for longer than this says so in `status`.
pub const SHOW_IDLE_AFTER_SECS: i64 = 15 * 60;

/// The GPUs' observed usage, or why it could not be read.
pub type UsageSnapshot = Result<Vec<GpuUsage>, String>;

/// Reads the provider once; a failure is kept so the reservations still show.
/// Where a GPU does not report its used memory (`[N/A]`), its processes' memory
/// stands in, so a busy GPU is still seen as busy. Each process's user and AI
/// model are looked up here, while this host can still see the process.
pub fn snapshot(provider: &dyn GpuProvider) -> UsageSnapshot {
    let mut usage = provider.usage().map_err(|e| e.to_string())?;
    for gpu in &mut usage {
        for process in &mut gpu.processes {
            process.user = Some(procinfo::process_user(process.pid));
            process.model = model::detect_for_pid(process.pid);
        }
        if gpu.memory_used_mb.is_none() && !gpu.processes.is_empty() {
            gpu.memory_used_mb = Some(
                gpu.processes
                    .iter()
                    .map(|p| p.used_memory_mb.unwrap_or(0))
                    .sum(),
            );
        }
    }
    Ok(usage)
}

/// A process on a GPU it has no business on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Intruder {
    pub gpu: u32,
    pub pid: u32,
    pub user: String,
    /// On a GPU someone else holds (`true`), or on one in use without reservation.
    pub foreign: bool,
}

/// The processes of users other than the holder on reserved GPUs, and every
/// process on GPUs in use without reservation (ignored processes are not in
/// `usage` at all).
pub fn intruders(
    slots: &[GpuSlot],
    usage: &[GpuUsage],
    threshold_mb: u64,
    dead_ids: &[String],
    now: UnixTime,
) -> Vec<Intruder> {
    let unreserved = unreserved_gpus(slots, usage, threshold_mb, dead_ids, now);
    let mut found = Vec::new();
    for gpu in usage {
        let holder = match slots.get(gpu.index as usize) {
            Some(GpuSlot::Held(r)) if r.liveness(now, dead_ids).is_active() => {
                Some(crate::pool::account(&r.user, &r.actual_user))
            }
            _ => None,
        };
        for process in &gpu.processes {
            let user = process
                .user
                .clone()
                .unwrap_or_else(|| procinfo::UNKNOWN.into());
            let foreign = match &holder {
                Some(holder) if *holder != user => true,
                None if unreserved.contains(&gpu.index) => false,
                _ => continue,
            };
            found.push(Intruder {
                gpu: gpu.index,
                pid: process.pid,
                user,
                foreign,
            });
        }
    }
    found
}

/// IDs of run reservations whose supervisor on this host is gone.
pub fn dead_reservation_ids(slots: &[GpuSlot], host: &str) -> Vec<String> {
    let mut dead = BTreeSet::new();
    for slot in slots {
        if let GpuSlot::Held(r) = slot
            && let Some(owner) = &r.owner
            && owner.host == host
            && !r.id.is_empty()
            && !procinfo::process_alive(owner.pid, owner.pid_start)
        {
            dead.insert(r.id.clone());
        }
    }
    dead.into_iter().collect()
}

/// GPUs whose used memory exceeds the threshold and that no live reservation holds.
pub fn unreserved_gpus(
    slots: &[GpuSlot],
    usage: &[GpuUsage],
    threshold_mb: u64,
    dead_ids: &[String],
    now: UnixTime,
) -> Vec<u32> {
    let busy = usage
        .iter()
        .filter(|u| u.memory_used_mb.is_some_and(|m| m > threshold_mb))
        .filter(|u| match slots.get(u.index as usize) {
            Some(GpuSlot::Held(r)) => !r.liveness(now, dead_ids).is_active(),
            Some(_) => true,
            None => false,
        })
        .map(|u| u.index);
    // A GPU the provider does not report cannot be checked, so it is not handed out.
    let reported: HashSet<u32> = usage.iter().map(|u| u.index).collect();
    let unseen = (0..slots.len() as u32).filter(|id| !reported.contains(id));
    let mut excluded: Vec<u32> = busy.chain(unseen).collect();
    excluded.sort_unstable();
    excluded.dedup();
    excluded
}

/// Builds the rows of `status` from the stored slots and the observed usage.
pub fn build(
    slots: &[GpuSlot],
    usage: &UsageSnapshot,
    threshold_mb: u64,
    dead_ids: &[String],
    now: UnixTime,
) -> Vec<GpuStatus> {
    let by_index: HashMap<u32, &GpuUsage> = match usage {
        Ok(all) => all.iter().map(|u| (u.index, u)).collect(),
        Err(_) => HashMap::new(),
    };
    slots
        .iter()
        .enumerate()
        .map(|(id, slot)| {
            let id = id as u32;
            let gpu_usage = by_index.get(&id).copied();
            build_one(
                id,
                slot,
                gpu_usage,
                usage.is_err(),
                threshold_mb,
                dead_ids,
                now,
            )
        })
        .collect()
}

fn empty_row(gpu_id: u32, status: StatusKind, details: String) -> GpuStatus {
    GpuStatus {
        gpu_id,
        status,
        user: None,
        duration: None,
        kind: None,
        details,
        validation: None,
        unreserved_users: None,
        process_info: None,
        model: None,
        note: None,
        error: None,
        gpu_model: None,
        memory_used_mb: None,
        expiry_time: None,
        pid: None,
        utilization_percent: None,
        idle_seconds: None,
        mean_utilization_percent: None,
        peak_memory_mb: None,
        foreign_users: None,
    }
}

fn build_one(
    id: u32,
    slot: &GpuSlot,
    usage: Option<&GpuUsage>,
    usage_failed: bool,
    threshold_mb: u64,
    dead_ids: &[String],
    now: UnixTime,
) -> GpuStatus {
    let (live, freed_at) = match slot {
        GpuSlot::Corrupt(reason) => {
            let mut row = empty_row(id, StatusKind::Error, reason.clone());
            row.error = Some(reason.clone());
            return row;
        }
        GpuSlot::Free { last_released } => (None, *last_released),
        GpuSlot::Held(r) => match r.liveness(now, dead_ids) {
            Liveness::Active => (Some(r), None),
            ended => (None, ended.ended_at()),
        },
    };
    let memory = usage.and_then(|u| u.memory_used_mb);
    let in_use = memory.is_some_and(|m| m > threshold_mb);
    let mut row = match live {
        Some(r) => reserved_row(id, r, usage, threshold_mb, now),
        None if in_use => unreserved_row(id, usage.expect("in_use implies usage")),
        None if usage.is_none() && !usage_failed => {
            let reason = "not reported by the GPU provider, so never allocated".to_string();
            let mut row = empty_row(id, StatusKind::Error, reason.clone());
            row.error = Some(reason);
            row
        }
        None => {
            let details = match freed_at {
                Some(t) => format!("free for {}", format_duration(now - t)),
                None => "never used".to_string(),
            };
            let mut row = empty_row(id, StatusKind::Available, details);
            row.validation = Some(match memory {
                Some(m) => format!("{m}MB used"),
                None => "no usage data".into(),
            });
            row
        }
    };
    if usage_failed {
        row.validation = Some("usage unknown".into());
    }
    if let Some(u) = usage {
        row.gpu_model = u.name.clone();
        row.memory_used_mb = u.memory_used_mb;
        row.utilization_percent = u.utilization_percent;
        if row.model.is_none() {
            row.model = u.processes.iter().find_map(|p| p.model.clone());
        }
    }
    row
}

fn reserved_row(
    id: u32,
    r: &Reservation,
    usage: Option<&GpuUsage>,
    threshold_mb: u64,
    now: UnixTime,
) -> GpuStatus {
    let details = match r.kind {
        ReservationKind::Run => match (&r.adopted, &r.owner, r.last_heartbeat) {
            (Some(name), Some(owner), _) => format!("adopted PID {} ({name})", owner.pid),
            (_, _, Some(hb)) => format!("heartbeat {} ago", format_duration(now - hb)),
            _ => "active".into(),
        },
        ReservationKind::Manual => match r.expiry_time {
            Some(exp) => format!(
                "expires in {} (at {})",
                format_duration(exp - now),
                crate::clock::format_clock(exp, &crate::clock::local_zone())
            ),
            None => "manual reservation".into(),
        },
    };
    let mut row = empty_row(id, StatusKind::InUse, details);
    row.user = Some(r.user_label());
    row.duration = Some(format_duration(now - r.start_time));
    row.kind = Some(
        match r.kind {
            ReservationKind::Run => "RUN",
            ReservationKind::Manual => "MANUAL",
        }
        .to_string(),
    );
    row.note = r.note.clone();
    row.expiry_time = r.expiry_time;
    row.pid = r
        .adopted
        .as_ref()
        .and(r.owner.as_ref())
        .map(|owner| owner.pid);
    if let Some(activity) = &r.activity {
        let idle = (now - activity.last_active).max(0);
        row.idle_seconds = Some(idle);
        row.mean_utilization_percent = activity.mean_utilization_percent();
        row.peak_memory_mb = Some(activity.peak_memory_mb);
        if r.kind == ReservationKind::Manual && idle > SHOW_IDLE_AFTER_SECS {
            row.details
                .push_str(&format!(", idle {}", format_hours_minutes(idle)));
        }
    }
    row.validation = Some(match usage {
        Some(u) if !u.processes.is_empty() => format!(
            "{}MB, {} processes",
            u.memory_used_mb.unwrap_or(0),
            u.processes.len()
        ),
        Some(u) if u.memory_used_mb.is_some_and(|m| m > threshold_mb) => {
            format!("{}MB used", u.memory_used_mb.unwrap_or(0))
        }
        _ => "no usage detected".into(),
    });
    if let (Some(validation), Some(percent)) = (
        row.validation.as_mut(),
        usage.and_then(|u| u.utilization_percent),
    ) {
        validation.push_str(&format!(", {percent}% util"));
    }
    let holder = crate::pool::account(&r.user, &r.actual_user);
    let squatters: Vec<&crate::gpu::GpuProcess> = usage
        .map(|u| &u.processes[..])
        .unwrap_or_default()
        .iter()
        .filter(|p| p.user.as_deref().unwrap_or(procinfo::UNKNOWN) != holder)
        .collect();
    if !squatters.is_empty() {
        let mut users: Vec<String> = squatters
            .iter()
            .map(|p| p.user.clone().unwrap_or_else(|| procinfo::UNKNOWN.into()))
            .collect();
        users.sort();
        users.dedup();
        let who: Vec<String> = squatters
            .iter()
            .map(|p| {
                format!(
                    "{} (PID {})",
                    p.user.as_deref().unwrap_or(procinfo::UNKNOWN),
                    p.pid
                )
            })
            .collect();
        if let Some(validation) = row.validation.as_mut() {
            validation.push_str(&format!(", also used by {}", who.join(", ")));
        }
        row.foreign_users = Some(users);
    }
    row
}

/// `GPU 1: held 2h 3m, mean utilization 87%, peak memory 71.2 GB`: what a
/// reservation's end reports, with only what was measured.
pub fn receipt(gpu: u32, reservation: &Reservation, ended_at: UnixTime) -> String {
    let mut text = format!(
        "GPU {gpu}: held {}",
        format_hours_minutes(ended_at - reservation.start_time)
    );
    if let Some(activity) = &reservation.activity {
        if let Some(mean) = activity.mean_utilization_percent() {
            text.push_str(&format!(", mean utilization {mean}%"));
        }
        if activity.peak_memory_mb > 0 {
            text.push_str(&format!(
                ", peak memory {:.1} GB",
                activity.peak_memory_mb as f64 / 1024.0
            ));
        }
    }
    text
}

/// The receipts of a release, on stderr.
pub fn print_receipts(released: &crate::store::Released, now: UnixTime) {
    for (gpu, reservation) in &released.ended {
        eprintln!("{}", receipt(*gpu, reservation, now));
    }
}

/// `1h 20m`: an idle time or a holding time, to the minute.
pub fn format_hours_minutes(seconds: i64) -> String {
    let minutes = seconds.max(0) / 60;
    format!("{}h {}m", minutes / 60, minutes % 60)
}

fn unreserved_row(id: u32, usage: &GpuUsage) -> GpuStatus {
    let mut users: Vec<String> = Vec::new();
    for p in &usage.processes {
        let user = p.user.as_deref().unwrap_or(procinfo::UNKNOWN);
        if !users.iter().any(|known| known == user) {
            users.push(user.to_owned());
        }
    }
    if users.is_empty() {
        users.push("unknown".into());
    }
    users.sort();
    let memory = usage.memory_used_mb.unwrap_or(0);
    let process_info = if usage.processes.is_empty() {
        format!("{memory}MB used")
    } else {
        let list: Vec<String> = usage
            .processes
            .iter()
            .map(|p| format!("PID {} ({})", p.pid, process_label(&p.name)))
            .collect();
        format!("{memory}MB used by {}", list.join(", "))
    };
    let mut row = empty_row(id, StatusKind::Unreserved, "WITHOUT RESERVATION".into());
    row.unreserved_users = Some(users);
    row.process_info = Some(process_info);
    row
}

/// `python3` for `/usr/bin/python3`: providers may report full paths.
fn process_label(name: &str) -> &str {
    name.rsplit('/').next().unwrap_or(name)
}

/// Several users on one GPU, as the table, the JSON and the dashboard all list them:
/// each once, by name, comma-separated.
pub fn join_users(users: &[String]) -> String {
    users.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::GpuProcess;

    fn usage(index: u32, mb: u64, pids: &[u32]) -> GpuUsage {
        GpuUsage {
            index,
            name: Some("H100".into()),
            memory_used_mb: Some(mb),
            processes: pids
                .iter()
                .map(|&pid| GpuProcess {
                    pid,
                    name: "/usr/bin/python3".into(),
                    used_memory_mb: Some(mb),
                    ..GpuProcess::default()
                })
                .collect(),
            ..GpuUsage::default()
        }
    }

    fn manual(user: &str, start: i64, expiry: i64) -> GpuSlot {
        GpuSlot::Held(Reservation {
            id: "x".into(),
            user: user.into(),
            actual_user: user.into(),
            kind: ReservationKind::Manual,
            start_time: start,
            last_heartbeat: None,
            expiry_time: Some(expiry),
            note: None,
            owner: None,
            adopted: None,
            activity: None,
        })
    }

    #[test]
    fn measured_reservations_show_idleness_and_receipts() {
        let now = 100_000;
        let mut slot = manual("alice", now - 7200, now + 3600);
        if let GpuSlot::Held(r) = &mut slot {
            r.activity = Some(Box::new(crate::state::Activity {
                last_active: now - 4800,
                samples: 10,
                utilization_sum: 870,
                utilization_samples: 10,
                peak_memory_mb: 72_908,
                ..Default::default()
            }));
        }
        let mut busy = usage(0, 100, &[]);
        busy.utilization_percent = Some(3);
        let rows = build(&[slot.clone()], &Ok(vec![busy]), 1024, &[], now);
        assert!(
            rows[0].details.ends_with(", idle 1h 20m"),
            "{}",
            rows[0].details
        );
        assert_eq!(
            rows[0].validation.as_deref(),
            Some("no usage detected, 3% util")
        );
        assert_eq!(rows[0].idle_seconds, Some(4800));
        assert_eq!(rows[0].mean_utilization_percent, Some(87));
        let GpuSlot::Held(r) = &slot else {
            unreachable!()
        };
        assert_eq!(
            receipt(1, r, now - 7200 + 7380),
            "GPU 1: held 2h 3m, mean utilization 87%, peak memory 71.2 GB"
        );
    }

    #[test]
    fn rows_follow_the_reference() {
        let now = 100_000;
        let slots = vec![
            GpuSlot::Free {
                last_released: Some(now - 1815),
            },
            manual("charlie", now - 3735, now + 11745),
            GpuSlot::Free {
                last_released: None,
            },
            manual("dave", now - 100, now - 1),
        ];
        let snap: UsageSnapshot = Ok(vec![
            usage(0, 45, &[]),
            usage(1, 0, &[]),
            usage(2, 2048, &[4_000_000]),
            usage(3, 10, &[]),
        ]);
        let rows = build(&slots, &snap, 1024, &[], now);
        assert_eq!(rows[0].status, StatusKind::Available);
        assert_eq!(rows[0].details, "free for 0h 30m 15s");
        assert_eq!(rows[0].validation.as_deref(), Some("45MB used"));
        assert_eq!(rows[1].status, StatusKind::InUse);
        assert_eq!(rows[1].duration.as_deref(), Some("1h 2m 15s"));
        assert!(
            rows[1].details.starts_with("expires in 3h 15m 45s (at "),
            "{}",
            rows[1].details
        );
        assert_eq!(rows[1].validation.as_deref(), Some("no usage detected"));
        assert_eq!(rows[2].status, StatusKind::Unreserved);
        assert_eq!(rows[2].details, "WITHOUT RESERVATION");
        assert_eq!(
            rows[2].process_info.as_deref(),
            Some("2048MB used by PID 4000000 (python3)")
        );
        assert_eq!(rows[2].unreserved_users, Some(vec!["unknown".to_string()]));
        assert_eq!(rows[3].status, StatusKind::Available, "expired is free");
        assert_eq!(rows[3].details, "free for 0h 0m 1s");
        assert_eq!(
            unreserved_gpus(&slots, snap.as_ref().unwrap(), 1024, &[], now),
            vec![2]
        );
    }

    #[test]
    fn corrupt_slot_is_an_error_row_and_failed_usage_is_marked() {
        let rows = build(
            &[
                GpuSlot::Corrupt("bad json".into()),
                GpuSlot::Free {
                    last_released: None,
                },
            ],
            &Err("nvidia-smi failed".into()),
            1024,
            &[],
            0,
        );
        assert_eq!(rows[0].status, StatusKind::Error);
        assert_eq!(rows[0].error.as_deref(), Some("bad json"));
        assert_eq!(rows[1].validation.as_deref(), Some("usage unknown"));
    }

    #[test]
    fn several_users_are_listed_alike() {
        let u = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(join_users(&u(&["a"])), "a");
        assert_eq!(join_users(&u(&["a", "b"])), "a, b");
    }
}
