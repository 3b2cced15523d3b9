//! The wait queue: who waits for which GPUs, in what order, and which free GPU goes
//! to which waiter. Pure functions, used by the SQLite store inside its transaction
//! and mirrored by the Redis Lua scripts (`store/lua/queue.lua`); the conformance
//! tests check both against this module.
//!
//! Policy (first come, first served, no starvation): waiters are served in the order
//! they joined. Whenever GPUs are handed out, each waiter in order first takes the
//! free GPUs it can use, up to what it still lacks, and holds them as a *partial
//! reservation* tied to its queue entry. A request that arrives later, waiting or
//! not, only gets what no earlier waiter can use. A large request therefore collects
//! GPUs as they free up instead of waiting for a moment when enough are free at once,
//! and a waiter whose request cannot use a freed GPU (other IDs) lets it pass to the
//! next one. A waiter is served as soon as it holds everything it asked for.

use std::collections::HashMap;

use serde::Serialize;

use crate::alloc::{self, Ended};
use crate::duration::format_duration;
use crate::gpu_status::{GpuStatus, StatusKind};
use crate::state::{
    GpuSlot, Liveness, NewReservation, Reservation, ReservationKind, RunOwner, Selection, UnixTime,
};

/// How often a waiter refreshes its queue entry (mirrored in `queue.lua`).
pub const WAITER_HEARTBEAT_SECS: i64 = 5;
/// A queue entry of ours whose waiter has not refreshed it for this long is dropped
/// (its waiter is on another host and gone, or frozen). Mirrored in `queue.lua`.
pub const WAITER_STALE_AFTER_SECS: i64 = 20;
/// Entries written by upstream canhazgpu (no waiter fields) heartbeat every 30 s;
/// upstream drops them after 2 minutes, and so do we.
pub const LEGACY_WAITER_STALE_AFTER_SECS: i64 = 120;

/// Why a waiter's turn fails when its entry was dropped by others.
pub const ENTRY_GONE: &str = "left the queue: this request's entry was removed (no heartbeat \
     from its waiter for over 20s, or the pool was re-initialized)";

pub fn entry_gone() -> crate::error::Error {
    crate::error::Error::Runtime(ENTRY_GONE.into())
}

/// One request waiting for GPUs. Its `id` is also the ID of the reservation it
/// becomes, and of the partial reservations it holds meanwhile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueEntry {
    pub id: String,
    /// Display name (`--user`).
    pub user: String,
    /// The real Unix account.
    pub actual_user: String,
    pub kind: ReservationKind,
    pub selection: Selection,
    /// Manual reservations: how long the reservation lasts once served, in seconds.
    pub duration: Option<i64>,
    pub note: Option<String>,
    /// Run reservations: the process the reservation belongs to.
    pub owner: Option<RunOwner>,
    /// The waiting process; `None` for entries written by upstream canhazgpu.
    pub waiter: Option<RunOwner>,
    pub enqueue_time: UnixTime,
    pub last_heartbeat: UnixTime,
    /// GPUs collected so far (held as partial reservations), ascending.
    pub collected: Vec<u32>,
}

impl QueueEntry {
    /// The entry for a request that has to wait: manual reservations keep their
    /// length, counted from when they are served.
    pub fn new(
        reservation: &NewReservation,
        selection: &Selection,
        waiter: &RunOwner,
        now: UnixTime,
    ) -> Self {
        QueueEntry {
            id: reservation.id.clone(),
            user: reservation.user.clone(),
            actual_user: reservation.actual_user.clone(),
            kind: reservation.kind,
            selection: selection.clone(),
            duration: reservation.expiry_time.map(|expiry| (expiry - now).max(1)),
            note: reservation.note.clone(),
            owner: reservation.owner.clone(),
            waiter: Some(waiter.clone()),
            enqueue_time: now,
            last_heartbeat: now,
            collected: Vec::new(),
        }
    }

    /// Whether the entry still waits: its waiter is not known to be gone
    /// (`dead_ids`, checked through /proc by the caller) and has kept it fresh.
    pub fn is_alive(&self, now: UnixTime, dead_ids: &[String]) -> bool {
        let stale_after = if self.waiter.is_some() {
            WAITER_STALE_AFTER_SECS
        } else {
            LEGACY_WAITER_STALE_AFTER_SECS
        };
        !dead_ids.contains(&self.id) && now - self.last_heartbeat <= stale_after
    }

    /// Whether a turn at `now` refreshes the entry. Not every turn does: a write
    /// wakes every other waiter (on SQLite any commit does), and their turns must not
    /// wake each other in turn.
    pub fn heartbeat_due(&self, now: UnixTime) -> bool {
        now - self.last_heartbeat >= WAITER_HEARTBEAT_SECS
    }

    /// How many more GPUs the entry needs.
    pub fn missing(&self) -> usize {
        (self.selection.len() as usize).saturating_sub(self.collected.len())
    }

    /// The reservation held on a collected GPU until the request is served: no
    /// expiry (it lives as long as the entry), heartbeats for run reservations.
    pub fn partial_reservation(&self) -> NewReservation {
        NewReservation {
            id: self.id.clone(),
            user: self.user.clone(),
            actual_user: self.actual_user.clone(),
            kind: self.kind,
            expiry_time: None,
            note: self.note.clone(),
            owner: self.owner.clone(),
            adopted: None,
        }
    }

    /// The expiry a manual reservation gets when the entry is served at `now`.
    pub fn served_expiry(&self, now: UnixTime) -> Option<UnixTime> {
        match self.kind {
            ReservationKind::Manual => self.duration.map(|duration| now + duration),
            ReservationKind::Run => None,
        }
    }
}

/// The slots as the next change leaves them: the partial reservations of entries
/// that are no longer alive are free (every store drops them first).
pub fn without_dead_partials(
    mut slots: Vec<GpuSlot>,
    entries: &[QueueEntry],
    dead_ids: &[String],
    now: UnixTime,
) -> Vec<GpuSlot> {
    for entry in entries
        .iter()
        .filter(|entry| !entry.is_alive(now, dead_ids))
    {
        for &gpu_id in &entry.collected {
            if let Some(slot) = slots.get_mut(gpu_id as usize) {
                // Free since the waiter's last sign of life.
                *slot = GpuSlot::Free {
                    last_released: Some(entry.last_heartbeat.min(now)),
                };
            }
        }
    }
    slots
}

/// GPUs held for a request that still waits for more say so instead of showing a
/// reservation without expiry.
pub fn mark_collected(
    rows: &mut [GpuStatus],
    queue: &[QueueEntry],
    dead_ids: &[String],
    now: UnixTime,
) {
    for entry in queue.iter().filter(|entry| entry.is_alive(now, dead_ids)) {
        for &gpu_id in &entry.collected {
            if let Some(row) = rows.get_mut(gpu_id as usize)
                && row.status == StatusKind::InUse
            {
                row.details = format!(
                    "collected for a queued request ({}/{})",
                    entry.collected.len(),
                    entry.selection.len()
                );
            }
        }
    }
}

/// A free GPU handed to a waiter, ending the dead reservation it held first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// Index into the entries given to `distribute`.
    pub entry: usize,
    pub gpu_id: u32,
    pub ended: Option<Ended>,
}

/// Inputs of a distribution that do not come from the slots and entries.
pub struct DistributionInput<'a> {
    /// GPUs in use without reservation, never handed out.
    pub unreserved: &'a [u32],
    /// Reservations and queue entries whose process on this host is gone.
    pub dead_ids: &'a [String],
    /// When each waiter's Unix account last used each GPU, by account.
    pub last_used: &'a HashMap<String, HashMap<u32, UnixTime>>,
    pub now: UnixTime,
}

/// Hands free GPUs to waiters: `entries` are the live entries in queue order, with
/// what they collected so far. Each one takes the free GPUs it can use (its IDs, or
/// any GPU ranked as `alloc::plan` ranks them for its account) up to what it lacks.
pub fn distribute(
    slots: &[GpuSlot],
    entries: &[QueueEntry],
    input: &DistributionInput,
) -> Vec<Grant> {
    let gpu_count = slots.len() as u32;
    let mut free: Vec<(u32, Option<UnixTime>, Option<Ended>)> = Vec::new();
    for (id, slot) in (0..).zip(slots) {
        if input.unreserved.contains(&id) {
            continue;
        }
        match slot {
            GpuSlot::Free { last_released } => free.push((id, *last_released, None)),
            GpuSlot::Held(reservation) => {
                if let Some(ended) = ended(id, reservation, input) {
                    free.push((id, Some(ended.ended_at), Some(ended)));
                }
            }
            GpuSlot::Corrupt(_) => {}
        }
    }
    let no_history = HashMap::new();
    let mut grants = Vec::new();
    for (index, entry) in entries.iter().enumerate() {
        if free.is_empty() {
            break;
        }
        if alloc::validate_selection(&entry.selection, gpu_count).is_err() {
            continue;
        }
        let wanted: Vec<u32> = match &entry.selection {
            Selection::Ids(ids) => ids
                .iter()
                .copied()
                .filter(|id| !entry.collected.contains(id))
                .filter(|id| free.iter().any(|(f, _, _)| f == id))
                .collect(),
            Selection::Count(_) => {
                let mut ranked: Vec<(u32, Option<UnixTime>)> = free
                    .iter()
                    .map(|(id, released, _)| (*id, *released))
                    .collect();
                let used = input
                    .last_used
                    .get(&entry.actual_user)
                    .unwrap_or(&no_history);
                alloc::rank(&mut ranked, used);
                ranked
                    .into_iter()
                    .take(entry.missing())
                    .map(|(id, _)| id)
                    .collect()
            }
        };
        for gpu_id in wanted {
            let position = free.iter().position(|(f, _, _)| *f == gpu_id);
            if let Some(position) = position {
                let (_, _, ended) = free.remove(position);
                grants.push(Grant {
                    entry: index,
                    gpu_id,
                    ended,
                });
            }
        }
    }
    grants.sort_by_key(|grant| (grant.entry, grant.gpu_id));
    grants
}

fn ended(gpu_id: u32, reservation: &Reservation, input: &DistributionInput) -> Option<Ended> {
    match reservation.liveness(input.now, input.dead_ids) {
        Liveness::Active => None,
        other => Some(Ended {
            gpu_id,
            reservation: reservation.clone(),
            ended_at: other.ended_at().unwrap_or(input.now),
        }),
    }
}

/// The slots as they are after `grants`: each granted GPU held by its waiter's
/// partial reservation. `alloc::plan` on the result gives a newcomer only what no
/// waiter can use.
pub fn apply(
    slots: &[GpuSlot],
    entries: &[QueueEntry],
    grants: &[Grant],
    now: UnixTime,
) -> Vec<GpuSlot> {
    let mut after = slots.to_vec();
    for grant in grants {
        let held = entries[grant.entry].partial_reservation().held_from(now);
        after[grant.gpu_id as usize] = GpuSlot::Held(held);
    }
    after
}

/// The queue as `canhazgpu queue --json` and the web dashboard show it. Field names
/// follow upstream's `/api/queue`, plus `position`, `actual_user` and `enqueue_time`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct QueueReport {
    pub entries: Vec<QueueRow>,
    pub total_waiting: usize,
    pub total_gpus_requested: u32,
    pub total_gpus_allocated: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct QueueRow {
    pub position: usize,
    pub id: String,
    pub user: String,
    pub actual_user: String,
    pub requested_count: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requested_ids: Option<Vec<u32>>,
    pub allocated_gpus: Vec<u32>,
    pub allocated_count: usize,
    pub reservation_type: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Unix seconds.
    pub enqueue_time: UnixTime,
    pub wait_time: String,
    pub wait_time_seconds: i64,
}

impl QueueRow {
    /// `alice`, or `alice (svc)` with a display name, as `status` shows users.
    pub fn user_label(&self) -> String {
        crate::state::user_label(&self.user, &self.actual_user)
    }

    /// `2 GPUs`, or `IDs: [1, 3]`.
    pub fn requested(&self) -> String {
        match &self.requested_ids {
            Some(ids) => format!("IDs: {}", crate::output::id_list(ids)),
            None if self.requested_count == 1 => "1 GPU".into(),
            None => format!("{} GPUs", self.requested_count),
        }
    }
}

/// The live entries of `entries` (in queue order) as rows.
pub fn report(entries: &[QueueEntry], dead_ids: &[String], now: UnixTime) -> QueueReport {
    let rows: Vec<QueueRow> = entries
        .iter()
        .filter(|entry| entry.is_alive(now, dead_ids))
        .enumerate()
        .map(|(index, entry)| {
            let waited = (now - entry.enqueue_time).max(0);
            QueueRow {
                position: index + 1,
                id: entry.id.clone(),
                user: entry.user.clone(),
                actual_user: entry.actual_user.clone(),
                requested_count: entry.selection.len(),
                requested_ids: match &entry.selection {
                    Selection::Ids(ids) => Some(ids.clone()),
                    Selection::Count(_) => None,
                },
                allocated_gpus: entry.collected.clone(),
                allocated_count: entry.collected.len(),
                reservation_type: entry.kind.as_str(),
                note: entry.note.clone(),
                enqueue_time: entry.enqueue_time,
                wait_time: format_duration(waited),
                wait_time_seconds: waited,
            }
        })
        .collect();
    QueueReport {
        total_waiting: rows.len(),
        total_gpus_requested: rows.iter().map(|row| row.requested_count).sum(),
        total_gpus_allocated: rows.iter().map(|row| row.allocated_count).sum(),
        entries: rows,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, selection: Selection, collected: &[u32]) -> QueueEntry {
        QueueEntry {
            id: id.into(),
            user: id.into(),
            actual_user: id.into(),
            kind: ReservationKind::Manual,
            selection,
            duration: Some(60),
            note: None,
            owner: None,
            waiter: Some(RunOwner {
                host: "h".into(),
                pid: 1,
                pid_start: 1,
            }),
            enqueue_time: 100,
            last_heartbeat: 100,
            collected: collected.to_vec(),
        }
    }

    fn free(released: Option<UnixTime>) -> GpuSlot {
        GpuSlot::Free {
            last_released: released,
        }
    }

    fn held(id: &str, expiry: UnixTime) -> GpuSlot {
        GpuSlot::Held(Reservation {
            id: id.into(),
            user: id.into(),
            actual_user: id.into(),
            kind: ReservationKind::Manual,
            start_time: 0,
            last_heartbeat: None,
            expiry_time: Some(expiry),
            note: None,
            owner: None,
            adopted: None,
            activity: None,
        })
    }

    fn granted(slots: &[GpuSlot], entries: &[QueueEntry], unreserved: &[u32]) -> Vec<(usize, u32)> {
        let input = DistributionInput {
            unreserved,
            dead_ids: &[],
            last_used: &HashMap::new(),
            now: 110,
        };
        distribute(slots, entries, &input)
            .iter()
            .map(|grant| (grant.entry, grant.gpu_id))
            .collect()
    }

    #[test]
    fn earlier_waiters_take_what_they_can_use_first() {
        // GPU 2 was released long ago, GPU 0 never used: the first waiter (any 2)
        // prefers the never-used one; the second (ID 1) gets what it named.
        let slots = [free(None), free(Some(50)), free(Some(10)), held("x", 999)];
        let entries = [
            entry("a", Selection::Count(2), &[]),
            entry("b", Selection::Ids(vec![1]), &[]),
            entry("c", Selection::Count(1), &[]),
        ];
        assert_eq!(granted(&slots, &entries, &[]), [(0, 0), (0, 2), (1, 1)]);
        // In use without reservation: never handed out.
        assert_eq!(granted(&slots, &entries, &[0]), [(0, 1), (0, 2)]);
    }

    #[test]
    fn waiters_take_only_what_they_lack_and_can_use() {
        // GPU 2's reservation expired at 105; GPU 3 is already collected by "ids".
        let slots = [free(None), free(None), held("x", 105), held("ids", 999)];
        let entries = [
            entry("ids", Selection::Ids(vec![1, 3]), &[3]),
            entry("two", Selection::Count(2), &[]),
            entry("too-many", Selection::Count(5), &[]),
        ];
        let input = DistributionInput {
            unreserved: &[],
            dead_ids: &[],
            last_used: &HashMap::new(),
            now: 110,
        };
        let grants = distribute(&slots, &entries, &input);
        let pairs: Vec<(usize, u32)> = grants.iter().map(|g| (g.entry, g.gpu_id)).collect();
        assert_eq!(pairs, [(0, 1), (1, 0), (1, 2)]);
        // The expired reservation is ended for the waiter that takes its GPU.
        let ended = grants[2].ended.as_ref().expect("GPU 2's reservation ended");
        assert_eq!((ended.reservation.id.as_str(), ended.ended_at), ("x", 105));
        assert!(grants[0].ended.is_none() && grants[1].ended.is_none());
        let after = apply(&slots, &entries, &grants, 110);
        match &after[1] {
            GpuSlot::Held(r) => assert_eq!((r.id.as_str(), r.expiry_time), ("ids", None)),
            other => panic!("GPU 1 should be collected, not {other:?}"),
        }
    }

    #[test]
    fn liveness_report_and_partials_of_dead_waiters() {
        let mut upstream = entry("old", Selection::Count(1), &[0]);
        upstream.waiter = None;
        let entries = [
            entry("dead", Selection::Ids(vec![1]), &[1]),
            upstream,
            entry("live", Selection::Count(2), &[]),
        ];
        let dead = ["dead".to_string()];
        let now = 100 + WAITER_STALE_AFTER_SECS + 1;
        assert!(!entries[0].is_alive(now, &dead));
        assert!(
            entries[1].is_alive(now, &dead),
            "upstream entries get 2 minutes"
        );
        assert!(!entries[2].is_alive(now, &dead), "silent for too long");
        assert!(entries[2].is_alive(100 + WAITER_STALE_AFTER_SECS, &dead));

        let report = report(&entries, &dead, 110);
        assert_eq!(report.total_waiting, 2);
        assert_eq!(report.entries[0].id, "old");
        assert_eq!(report.entries[1].position, 2);
        assert_eq!(report.entries[1].wait_time, "0h 0m 10s");
        assert_eq!(report.total_gpus_requested, 3);
        assert_eq!(report.total_gpus_allocated, 1);
        assert_eq!(report.entries[1].requested(), "2 GPUs");

        let slots = vec![held("old", 999), held("dead", 999)];
        let settled = without_dead_partials(slots, &entries, &dead, 130);
        assert_eq!(settled[0], held("old", 999));
        // Free since the dead waiter's last heartbeat (100), not since it was noticed.
        assert_eq!(settled[1], free(Some(100)));
    }
}
