//! The pool core: every operation on one host's GPU pool, as a pure function of the
//! stored state, the request and the time. A store loads a [`PoolState`], calls one
//! operation, and persists the [`Changes`] it returns, all in one transaction; no
//! store holds a rule of its own.
//!
//! The rules themselves live in `alloc` (placement), `queue` (who waits for what, and
//! which free GPU goes to which waiter) and `state` (liveness); this module applies
//! them in the order every change follows: drop dead waiters, hand free GPUs to the
//! live ones, then serve the request.
//!
//! Adding an operation: write one function here that changes a [`Work`] and returns
//! its outcome; `Transition` turns the difference into the writes. A store needs no
//! change beyond loading any new key the operation reads.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::alloc::{self, PlanInput};
use crate::error::{Error, Holder, Result};
use crate::queue::{self, DistributionInput, QueueEntry};
pub use crate::state::NewReservation;
use crate::state::{
    GpuSlot, Pool, ProviderKind, Reservation, ReservationKind, RunOwner, Selection, UnixTime,
    UsageRecord,
};

/// Far above any single machine; keeps a typo (or a forged store) from making a
/// huge pool that every command would have to walk.
pub const MAX_GPUS: u32 = 1024;

/// What a store holds for one host's pool, as one operation needs it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PoolState {
    /// `None` before `admin` ran.
    pub pool: Option<Pool>,
    /// Index = GPU ID; as many as the pool has GPUs.
    pub slots: Vec<GpuSlot>,
    /// GPUs holding a partial reservation, with the queue entry it was collected for.
    pub partials: BTreeMap<u32, String>,
    /// The stored queue entries in order, dead ones included, each with the GPUs it
    /// collected (from `partials`).
    pub queue: Vec<QueueEntry>,
    /// IDs of stored queue entries that could not be read; the next change drops them.
    pub unreadable_entries: Vec<String>,
    /// When each account last used each GPU, for the accounts the operation needs
    /// (see `PoolState::accounts_needed`).
    pub last_used: HashMap<String, HashMap<u32, UnixTime>>,
    /// Run reservations and queue entries whose process on the loading host is gone
    /// (see `PoolState::find_gone`); every operation treats them as dead.
    pub gone: Vec<String>,
}

impl PoolState {
    /// The accounts whose last use placement may consult: the requester's and every
    /// waiter's.
    pub fn accounts_needed(queue: &[QueueEntry], requester: Option<&str>) -> Vec<String> {
        let mut accounts: BTreeSet<String> = queue
            .iter()
            .map(|entry| entry.actual_user.clone())
            .collect();
        accounts.extend(requester.map(str::to_string));
        accounts.into_iter().collect()
    }

    /// The queue entries that hold partial reservations, each once, in ID order.
    pub fn collector_ids(&self) -> Vec<String> {
        let ids: BTreeSet<&String> = self.partials.values().collect();
        ids.into_iter().cloned().collect()
    }

    /// Fills each entry's `collected` from `partials`.
    pub fn link_partials(&mut self) {
        for entry in &mut self.queue {
            entry.collected = self
                .partials
                .iter()
                .filter(|(_, queue_id)| **queue_id == entry.id)
                .map(|(gpu, _)| *gpu)
                .collect();
        }
    }

    /// Notes the run reservations and queue entries whose process, on `host`, is not
    /// `alive`: the loading store checks them, so that any change drops what a killed
    /// supervisor or waiter left, whoever makes it.
    pub fn find_gone(&mut self, host: &str, alive: impl Fn(&RunOwner) -> bool) {
        let here = |process: &RunOwner| process.host == host && !alive(process);
        let mut gone: BTreeSet<String> = self
            .slots
            .iter()
            .filter_map(|slot| match slot {
                GpuSlot::Held(r) if !r.id.is_empty() && r.owner.as_ref().is_some_and(here) => {
                    Some(r.id.clone())
                }
                _ => None,
            })
            .collect();
        gone.extend(
            self.queue
                .iter()
                .filter(|entry| entry.waiter.as_ref().is_some_and(here))
                .map(|entry| entry.id.clone()),
        );
        self.gone = gone.into_iter().collect();
    }

    fn require_pool(&self) -> Result<Pool> {
        self.pool.ok_or(Error::NotInitialized)
    }
}

/// The account behind a reservation: its Unix user, or for upstream records that
/// lack one, its display name.
pub fn account(user: &str, actual_user: &str) -> String {
    if actual_user.is_empty() {
        user.to_string()
    } else {
        actual_user.to_string()
    }
}

/// One finished reservation of one GPU, with the ID that keeps two identical short
/// reservations apart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryEntry {
    pub record: UsageRecord,
    pub reservation_id: String,
    /// Why it ended, when not by its holder (`idle for 1h 0m (policy.idle_release_after)`).
    pub reason: Option<String>,
}

/// What a store writes for one GPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SlotWrite {
    /// Free; `None` means never used (a store may delete the record).
    Free { last_released: Option<UnixTime> },
    Held {
        reservation: Box<Reservation>,
        /// Set for a partial reservation: the queue entry it was collected for.
        collected_for: Option<String>,
    },
}

/// Everything one operation changes, for a store to write in one transaction.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// The pool record, when it is created or re-initialised.
    pub pool: Option<Pool>,
    /// The pool record goes: the host left the fleet (`retire`).
    pub pool_removed: bool,
    pub gpus: Vec<(u32, SlotWrite)>,
    /// GPUs beyond a pool that shrank: their records go.
    pub removed_gpus: Vec<u32>,
    /// Entries whose heartbeat or collected GPUs changed. (No operation adds an
    /// entry: joining appends it with `Store::enqueue`.)
    pub entries_updated: Vec<QueueEntry>,
    pub entries_removed: Vec<String>,
    pub history: Vec<HistoryEntry>,
    /// (account, GPU, time): the latest time the operation saw the account use the
    /// GPU, once per pair (a store keeps the later of this and what it has).
    pub last_used: Vec<(String, u32, UnixTime)>,
    /// Queue entries whose waiter should take a turn: they were given GPUs, became
    /// the head of the queue while GPUs were freed, or were removed.
    pub wake_entries: Vec<String>,
    /// What the host's allocation counters go up by (`/metrics`).
    pub counted: Counted,
}

/// Increments of a host's allocation counters, kept in the store since the pool was
/// made: requests granted (at once or from the queue), and requests refused because
/// the GPUs were not there or a cap said no.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counted {
    pub allocations: u64,
    pub allocation_failures: u64,
}

impl Counted {
    pub fn is_empty(&self) -> bool {
        *self == Counted::default()
    }
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.pool.is_none()
            && !self.pool_removed
            && self.gpus.is_empty()
            && self.removed_gpus.is_empty()
            && self.entries_updated.is_empty()
            && self.entries_removed.is_empty()
            && self.history.is_empty()
            && self.last_used.is_empty()
            && self.counted.is_empty()
    }
}

/// The result of one operation: what to write, and what to answer. The changes are
/// written even when the outcome is a refusal (a refused request still hands free
/// GPUs to the waiters).
#[derive(Debug)]
pub struct Transition<T> {
    /// The state as the changes leave it.
    pub after: PoolState,
    pub changes: Changes,
    pub outcome: Result<T>,
}

/// An operation in progress: the state as it will be, and what it recorded.
pub struct Work {
    pub state: PoolState,
    history: Vec<HistoryEntry>,
    /// The latest use of each (account, GPU) this operation recorded.
    last_used: BTreeMap<(String, u32), UnixTime>,
    granted: BTreeSet<String>,
    /// The entry whose own turn this is: it needs no wake-up.
    caller: Option<String>,
    /// Reservations and entries whose process is known to be gone.
    dead_ids: Vec<String>,
}

impl Work {
    fn new(state: &PoolState, dead_ids: &[String]) -> Self {
        let mut dead: Vec<String> = state.gone.clone();
        dead.extend(dead_ids.iter().cloned());
        Work {
            state: state.clone(),
            history: Vec::new(),
            last_used: BTreeMap::new(),
            granted: BTreeSet::new(),
            caller: None,
            dead_ids: dead,
        }
    }

    /// Ends whatever holds `gpu` (one history record, the account's last use) and
    /// frees it, released at `now`.
    fn end(&mut self, gpu: u32, ended_at: UnixTime, now: UnixTime) {
        self.end_because(gpu, ended_at, now, None);
    }

    /// `end`, with the reason the history records.
    fn end_because(&mut self, gpu: u32, ended_at: UnixTime, now: UnixTime, reason: Option<&str>) {
        let freed = GpuSlot::Free {
            last_released: Some(now),
        };
        let slot = std::mem::replace(&mut self.state.slots[gpu as usize], freed);
        if let GpuSlot::Held(reservation) = slot {
            let account = account(&reservation.user, &reservation.actual_user);
            self.history.push(HistoryEntry {
                record: UsageRecord {
                    user: reservation.user.clone(),
                    actual_user: account.clone(),
                    gpu_id: gpu,
                    start_time: reservation.start_time,
                    end_time: ended_at,
                    kind: reservation.kind,
                    utilization: crate::state::Utilization::of(reservation.activity.as_deref()),
                },
                reservation_id: reservation.id.clone(),
                reason: reason.map(str::to_string),
            });
            self.touch(&account, gpu, ended_at);
        }
        if let Some(entry_id) = self.state.partials.remove(&gpu)
            && let Some(entry) = self.state.queue.iter_mut().find(|e| e.id == entry_id)
        {
            entry.collected.retain(|collected| *collected != gpu);
        }
    }

    fn touch(&mut self, account: &str, gpu: u32, at: UnixTime) {
        let used = self
            .state
            .last_used
            .entry(account.to_string())
            .or_default()
            .entry(gpu)
            .or_insert(at);
        *used = (*used).max(at);
        let recorded = self
            .last_used
            .entry((account.to_string(), gpu))
            .or_insert(at);
        *recorded = (*recorded).max(at);
    }

    /// Puts `reservation` on `gpu`; `collected_for` marks a partial reservation.
    fn hold(&mut self, gpu: u32, reservation: Reservation, collected_for: Option<&str>) {
        self.state.slots[gpu as usize] = GpuSlot::Held(reservation);
        match collected_for {
            Some(entry) => self.state.partials.insert(gpu, entry.to_string()),
            None => self.state.partials.remove(&gpu),
        };
    }

    /// Drops dead and unreadable entries and ends the partial reservations of every
    /// entry that is gone; what a gone waiter collected was held until its last sign
    /// of life.
    fn settle(&mut self, now: UnixTime) {
        let dead_ids = self.dead_ids.clone();
        let (live, dead): (Vec<QueueEntry>, Vec<QueueEntry>) =
            std::mem::take(&mut self.state.queue)
                .into_iter()
                .partition(|entry| entry.is_alive(now, &dead_ids));
        self.state.queue = live;
        self.state.unreadable_entries.clear();
        let orphans: Vec<(u32, String)> = self
            .state
            .partials
            .iter()
            .filter(|(_, entry)| !self.state.queue.iter().any(|live| live.id == **entry))
            .map(|(gpu, entry)| (*gpu, entry.clone()))
            .collect();
        for (gpu, entry_id) in orphans {
            let last_seen = dead
                .iter()
                .find(|entry| entry.id == entry_id)
                .map_or(now, |entry| entry.last_heartbeat.min(now));
            let ended_at = match &self.state.slots[gpu as usize] {
                GpuSlot::Held(reservation) => last_seen.max(reservation.start_time),
                _ => last_seen,
            };
            self.end(gpu, ended_at, now);
        }
    }

    /// Hands free GPUs to the live waiters (`queue::distribute`).
    fn grant(&mut self, unreserved: &[u32], now: UnixTime) {
        let grants = queue::distribute(
            &self.state.slots,
            &self.state.queue,
            &DistributionInput {
                unreserved,
                dead_ids: &self.dead_ids,
                last_used: &self.state.last_used,
                now,
            },
        );
        for grant in grants {
            if let Some(ended) = &grant.ended {
                self.end(grant.gpu_id, ended.ended_at, now);
            }
            let entry = &self.state.queue[grant.entry];
            let (entry_id, account) = (entry.id.clone(), entry.actual_user.clone());
            let held = entry.partial_reservation().held_from(now);
            self.hold(grant.gpu_id, held, Some(&entry_id));
            self.touch(&account, grant.gpu_id, now);
            let collected = &mut self.state.queue[grant.entry].collected;
            collected.push(grant.gpu_id);
            collected.sort_unstable();
            self.granted.insert(entry_id);
        }
    }

    /// Refuses `request` where the policy forbids it: a manual reservation longer than
    /// `max_duration`, or more GPUs than `max_gpus_per_user` for its account (what it
    /// holds, what its waiters still miss, and the request), while the cap applies.
    fn within_policy(&self, request: &AllocRequest) -> Result<()> {
        let policy = &request.policy;
        let reservation = &request.reservation;
        if let Some(expiry) = reservation.expiry_time {
            policy.check_duration((expiry - request.now).max(0) as u64)?;
        }
        let Some(cap) = policy.max_gpus_per_user else {
            return Ok(());
        };
        let account = &reservation.actual_user;
        let contended = self.state.queue.iter().any(|e| e.actual_user != *account);
        if policy.caps_only_when_contended && !contended {
            return Ok(());
        }
        let held = self
            .state
            .slots
            .iter()
            .filter(|slot| {
                matches!(slot, GpuSlot::Held(r)
                if crate::pool::account(&r.user, &r.actual_user) == *account
                    && r.liveness(request.now, &self.dead_ids).is_active())
            })
            .count() as u32;
        let missing: u32 = self
            .state
            .queue
            .iter()
            .filter(|e| e.actual_user == *account)
            .map(|e| e.missing() as u32)
            .sum();
        if held + missing + request.selection.len() > cap {
            let waiting = match missing {
                0 => String::new(),
                n => format!(" and wait for {n} more"),
            };
            return Err(Error::PolicyLimit(format!(
                "at most {cap} GPU(s) per user{} (policy.max_gpus_per_user): you hold {held}{waiting} and asked for {}",
                if policy.caps_only_when_contended {
                    " while others wait"
                } else {
                    ""
                },
                request.selection.len()
            )));
        }
        Ok(())
    }

    /// Why `gpu`, named by `account`, is not one of its reservations.
    fn not_yours(&self, gpu: u32, account: &str, now: UnixTime) -> String {
        match &self.state.slots[gpu as usize] {
            GpuSlot::Held(r) if r.liveness(now, &self.dead_ids).is_active() => {
                if crate::pool::account(&r.user, &r.actual_user) == account {
                    format!("GPU {gpu} is yours but was not released")
                } else {
                    format!("GPU {gpu} is reserved by {}, not by you", r.user_label())
                }
            }
            GpuSlot::Corrupt(reason) => format!("GPU {gpu} has unreadable state: {reason}"),
            _ => format!("GPU {gpu} is not reserved"),
        }
    }

    /// The active manual reservations of `account` on `ids` (all of them when
    /// `None`), ascending; refused as a whole, one clause per GPU, when any named GPU
    /// is not one (`action` completes "a run reservation ... cannot be").
    fn own_manual(
        &self,
        ids: Option<&[u32]>,
        account: &str,
        pool: Pool,
        now: UnixTime,
        action: &str,
    ) -> Result<Vec<u32>> {
        let owned = |gpu: u32| match &self.state.slots[gpu as usize] {
            GpuSlot::Held(r) => {
                crate::pool::account(&r.user, &r.actual_user) == account
                    && r.liveness(now, &self.dead_ids).is_active()
            }
            _ => false,
        };
        let Some(ids) = ids else {
            let gpus: Vec<u32> = (0..self.state.slots.len() as u32)
                .filter(|&gpu| owned(gpu) && !self.state.partials.contains_key(&gpu))
                .filter(|&gpu| {
                    matches!(&self.state.slots[gpu as usize],
                        GpuSlot::Held(r) if r.kind == ReservationKind::Manual)
                })
                .collect();
            if gpus.is_empty() {
                return Err(Error::Usage(format!(
                    "you have no manual reservations to be {action}"
                )));
            }
            return Ok(gpus);
        };
        alloc::validate_selection(&Selection::Ids(ids.to_vec()), pool.gpu_count)?;
        let mut gpus = ids.to_vec();
        gpus.sort_unstable();
        let refused: Vec<String> = gpus
            .iter()
            .filter_map(|&gpu| match &self.state.slots[gpu as usize] {
                _ if !owned(gpu) => Some(self.not_yours(gpu, account, now)),
                _ if self.state.partials.contains_key(&gpu) => Some(format!(
                    "GPU {gpu} is collected by your queued request, not reserved yet"
                )),
                GpuSlot::Held(r) if r.kind == ReservationKind::Run => Some(format!(
                    "GPU {gpu} is a run reservation, which ends with its command: it cannot be {action}"
                )),
                _ => None,
            })
            .collect();
        match refused.is_empty() {
            true => Ok(gpus),
            false => Err(Error::NotYours(refused)),
        }
    }

    /// Plans `request` on what the waiters left and claims it.
    fn claim(&mut self, request: &AllocRequest) -> Result<Vec<u32>> {
        let reservation = &request.reservation;
        let no_history = HashMap::new();
        let used = self
            .state
            .last_used
            .get(&reservation.actual_user)
            .unwrap_or(&no_history);
        let plan = alloc::plan(
            &self.state.slots,
            &PlanInput {
                selection: &request.selection,
                unreserved: &request.unreserved,
                dead_ids: &self.dead_ids,
                user_last_used: used,
                requester: &reservation.actual_user,
                now: request.now,
            },
        )?;
        for ended in &plan.ended {
            self.end(ended.gpu_id, ended.ended_at, request.now);
        }
        for &gpu in &plan.claim {
            self.hold(gpu, reservation.clone().held_from(request.now), None);
            self.touch(&reservation.actual_user, gpu, request.now);
        }
        Ok(plan.claim)
    }

    /// The changes from `before` to the state now, with what was recorded.
    fn finish<T>(self, before: &PoolState, outcome: Result<T>) -> Transition<T> {
        let after = &self.state;
        let mut changes = Changes {
            history: self.history,
            last_used: self
                .last_used
                .into_iter()
                .map(|((account, gpu), at)| (account, gpu, at))
                .collect(),
            ..Changes::default()
        };
        if after.pool != before.pool {
            changes.pool = after.pool;
            changes.pool_removed = after.pool.is_none();
        }
        let never_used = GpuSlot::Free {
            last_released: None,
        };
        let mut freed = false;
        for gpu in 0..before.slots.len().max(after.slots.len()) as u32 {
            let old = before.slots.get(gpu as usize);
            let Some(new) = after.slots.get(gpu as usize) else {
                changes.removed_gpus.push(gpu);
                continue;
            };
            let old_marker = before.partials.get(&gpu);
            let new_marker = after.partials.get(&gpu);
            if old.unwrap_or(&never_used) == new && old_marker == new_marker {
                continue;
            }
            if matches!(old, Some(GpuSlot::Held(_) | GpuSlot::Corrupt(_)))
                && matches!(new, GpuSlot::Free { .. })
            {
                freed = true;
            }
            let write = match new {
                GpuSlot::Free { last_released } => SlotWrite::Free {
                    last_released: *last_released,
                },
                GpuSlot::Held(reservation) => SlotWrite::Held {
                    reservation: Box::new(reservation.clone()),
                    collected_for: new_marker.cloned(),
                },
                // Never produced by an operation: corrupt slots are only freed.
                GpuSlot::Corrupt(_) => continue,
            };
            changes.gpus.push((gpu, write));
        }
        let old_entries: HashMap<&str, &QueueEntry> = before
            .queue
            .iter()
            .map(|entry| (entry.id.as_str(), entry))
            .collect();
        for entry in &after.queue {
            if old_entries
                .get(entry.id.as_str())
                .is_some_and(|old| *old != entry)
            {
                changes.entries_updated.push(entry.clone());
            }
        }
        let kept: BTreeSet<&str> = after.queue.iter().map(|entry| entry.id.as_str()).collect();
        changes.entries_removed = before
            .queue
            .iter()
            .map(|entry| entry.id.clone())
            .chain(before.unreadable_entries.iter().cloned())
            .filter(|id| !kept.contains(id.as_str()))
            .collect();
        let left = !changes.entries_removed.is_empty();
        let mut wake: BTreeSet<String> = self.granted;
        wake.extend(changes.entries_removed.iter().cloned());
        if freed || left {
            // The head drives the queue: its turn hands freed GPUs to every waiter.
            if let Some(head) = after.queue.first() {
                wake.insert(head.id.clone());
            }
        }
        if let Some(caller) = &self.caller {
            wake.remove(caller);
        }
        changes.wake_entries = wake.into_iter().collect();
        Transition {
            after: self.state,
            changes,
            outcome,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllocRequest {
    pub reservation: NewReservation,
    pub selection: Selection,
    /// GPUs in use without reservation, never to be handed out.
    pub unreserved: Vec<u32>,
    /// Reservation and queue entry IDs whose process on this host is known to be gone.
    pub dead_ids: Vec<String>,
    /// Take over GPUs in use without reservation (`reserve --force`, `adopt`).
    pub force: Option<Force>,
    pub policy: Policy,
    pub now: UnixTime,
}

/// What the administrator allows (`policy.*` in the system configuration file); every
/// rule is off by default. The pool core applies it to every request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// `policy.max_duration`: the longest a manual reservation may last, in seconds.
    pub max_duration: Option<u64>,
    /// `policy.max_gpus_per_user`: GPUs one Unix user may hold at once (run, manual
    /// and collected by a waiter together, counting what its waiters still miss).
    pub max_gpus_per_user: Option<u32>,
    /// `policy.caps_only_when_contended`: the cap applies only while someone else waits.
    pub caps_only_when_contended: bool,
    /// `policy.idle_utilization_percent`: at or above it a GPU counts as busy.
    pub idle_utilization_percent: u32,
    /// `policy.idle_release_after`: a manual reservation idle this long is released.
    pub idle_release_after: Option<u64>,
    /// `policy.idle_warning`: how long before that its holder is warned.
    pub idle_warning: u64,
    /// `policy.foreign_use: terminate`: the agent (as root) stops other users'
    /// processes on a reserved GPU.
    pub terminate_foreign: bool,
    /// `policy.unreserved_use: terminate`: and processes on GPUs in use without
    /// reservation.
    pub terminate_unreserved: bool,
    /// `policy.foreign_grace`: seconds between SIGTERM and SIGKILL.
    pub foreign_grace: u64,
}

/// `policy.foreign_grace` when unset: 2 minutes.
pub const DEFAULT_FOREIGN_GRACE_SECS: u64 = 120;

/// `policy.idle_warning` when unset: 15 minutes.
pub const DEFAULT_IDLE_WARNING_SECS: u64 = 15 * 60;

/// `policy.idle_utilization_percent` when unset.
pub const DEFAULT_IDLE_UTILIZATION_PERCENT: u32 = 5;

impl Default for Policy {
    fn default() -> Self {
        Policy {
            max_duration: None,
            max_gpus_per_user: None,
            caps_only_when_contended: false,
            idle_utilization_percent: DEFAULT_IDLE_UTILIZATION_PERCENT,
            idle_release_after: None,
            idle_warning: DEFAULT_IDLE_WARNING_SECS,
            terminate_foreign: false,
            terminate_unreserved: false,
            foreign_grace: DEFAULT_FOREIGN_GRACE_SECS,
        }
    }
}

impl Policy {
    /// The longest a reservation may last from now, in seconds.
    pub fn longest(&self) -> u64 {
        self.max_duration
            .unwrap_or(crate::duration::MAX_DURATION_SECS)
            .min(crate::duration::MAX_DURATION_SECS)
    }

    /// Refuses a reservation of `seconds` beyond `policy.max_duration`.
    pub fn check_duration(&self, seconds: u64) -> Result<()> {
        match self.max_duration {
            Some(max) if seconds > max => Err(Error::Usage(format!(
                "the longest reservation allowed here is {} (policy.max_duration)",
                crate::duration::format_limit(max as i64)
            ))),
            _ => Ok(()),
        }
    }
}

/// Who runs the processes on the GPUs in use without reservation, for a request
/// that may take them over: only GPUs whose processes all belong to the requester,
/// or any for root.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Force {
    /// The users of the processes on each GPU in use without reservation (a process
    /// whose user could not be told counts as someone else's).
    pub process_users: BTreeMap<u32, Vec<String>>,
    /// The requester is root: every such GPU may be taken.
    pub any_user: bool,
}

impl Force {
    /// The GPUs in use without reservation that `requester` may not take, with the
    /// other users on each.
    fn foreign(&self, requester: &str) -> BTreeMap<u32, Vec<String>> {
        if self.any_user {
            return BTreeMap::new();
        }
        self.process_users
            .iter()
            .filter_map(|(gpu, users)| {
                let others: Vec<String> = users
                    .iter()
                    .filter(|user| *user != requester)
                    .cloned()
                    .collect();
                (!others.is_empty() || users.is_empty()).then(|| {
                    let mut others = others;
                    others.sort();
                    others.dedup();
                    if others.is_empty() {
                        others.push(crate::gpu::procinfo::UNKNOWN.to_string());
                    }
                    (*gpu, others)
                })
            })
            .collect()
    }
}

/// How `extend` moves the end of a manual reservation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NewEnd {
    /// This many seconds later than it ends now.
    By(i64),
    /// At this time.
    At(UnixTime),
}

/// `extend`: lengthen the requester's manual reservations in place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtendRequest {
    pub actual_user: String,
    /// These GPUs; every manual reservation of the requester when `None`.
    pub ids: Option<Vec<u32>>,
    pub end: NewEnd,
    /// The longest a reservation may last from now, in seconds.
    pub max_seconds: i64,
    pub now: UnixTime,
}

/// `transfer`: hand manual reservations to another Unix user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransferRequest {
    pub actual_user: String,
    pub ids: Vec<u32>,
    pub to_user: String,
    /// The ID of the receiver's reservation.
    pub new_id: String,
    pub now: UnixTime,
}

/// One GPU as the agent read it (`tick`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GpuReading {
    pub gpu: u32,
    pub utilization_percent: Option<u32>,
    pub memory_used_mb: Option<u64>,
    /// Memory of the processes on it, per Unix user.
    pub memory_by_user: BTreeMap<String, u64>,
    /// Its processes: PID and Unix user (ignored processes left out).
    pub processes: Vec<(u32, String)>,
}

/// The agent's periodic turn (`tick`): its readings of every GPU, the policy, and
/// how long before its end a manual reservation's holder is told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TickRequest {
    pub readings: Vec<GpuReading>,
    pub policy: Policy,
    /// `notify.expiry_warning`, in seconds.
    pub expiry_warning: u64,
    pub now: UnixTime,
}

/// What a release did: the GPUs it freed, and why each other named GPU was left.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Released {
    /// Ascending.
    pub freed: Vec<u32>,
    /// What each freed GPU held, with its measurements (for the receipt).
    pub ended: Vec<(u32, Reservation)>,
    /// One line per named GPU that is not the caller's (`GPU 0 is reserved by
    /// alice, not by you`), in ID order.
    pub refused: Vec<String>,
}

/// One turn of a waiter: refresh its entry when due (`QueueEntry::heartbeat_due`),
/// hand out free GPUs, and serve it if it has everything.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueTick {
    pub entry_id: String,
    /// GPUs in use without reservation; `None` when usage was not checked, and then
    /// no GPU is handed out in this turn.
    pub unreserved: Option<Vec<u32>>,
    /// Reservation and queue entry IDs whose process on this host is known to be gone.
    pub dead_ids: Vec<String>,
    pub now: UnixTime,
}

/// Where a queued request stands after a change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QueueStep {
    /// The reservation is complete on these GPUs (ascending) and the entry is gone.
    Served(Vec<u32>),
    /// Still waiting: 1-based position among the waiters, GPUs collected so far.
    Waiting { position: u32, collected: Vec<u32> },
}

/// A run reservation to put back after the store lost it (see `Store::reassert`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReassertRequest {
    /// The pool the reservation was made in; recreated if the store has none.
    pub pool: Pool,
    pub reservation: NewReservation,
    /// When the reservation started, kept so that its history stays right.
    pub start_time: UnixTime,
    pub gpus: Vec<u32>,
    pub now: UnixTime,
}

/// What `reassert` found on each GPU.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reasserted {
    /// GPUs that hold the reservation (again), ascending.
    pub held: Vec<u32>,
    /// GPUs another live reservation holds, with its holder (`Reservation::user_label`),
    /// or unreadable ones, with the reason.
    pub taken: Vec<(u32, String)>,
}

/// Which reservations a release ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReleaseScope {
    /// Every manual reservation of this Unix user (plain `release`).
    OwnManual { actual_user: String },
    /// These GPUs, run or manual, where this Unix user holds them (`release --gpu-ids`).
    OwnIds { actual_user: String, ids: Vec<u32> },
    /// These GPUs, whoever holds them (root's explicit override).
    AnyIds { ids: Vec<u32> },
    /// Every GPU held by one reservation (a run supervisor at exit, or a dead one's
    /// reservation reclaimed).
    Reservation { id: String },
}

impl ReleaseScope {
    fn covers(&self, gpu: u32, reservation: &Reservation) -> bool {
        let owner = || account(&reservation.user, &reservation.actual_user);
        match self {
            ReleaseScope::OwnManual { actual_user } => {
                reservation.kind == ReservationKind::Manual && owner() == *actual_user
            }
            ReleaseScope::OwnIds { actual_user, ids } => {
                ids.contains(&gpu) && owner() == *actual_user
            }
            ReleaseScope::AnyIds { ids } => ids.contains(&gpu),
            ReleaseScope::Reservation { id } => !id.is_empty() && reservation.id == *id,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitOutcome {
    /// The size of the pool before, when it was re-initialised.
    pub previous_count: Option<u32>,
    /// How many active reservations `--force` ended.
    pub cleared: u32,
}

/// When a release ends `reservation`: now, or earlier if it had already ended by itself.
fn release_time(reservation: &Reservation, now: UnixTime) -> UnixTime {
    reservation.liveness(now, &[]).ended_at().unwrap_or(now)
}

/// Creates the pool, or with `force` ends every reservation (with history), empties
/// the queue and sets the new size and provider. Every GPU starts never used.
pub fn init(
    state: &PoolState,
    gpu_count: u32,
    provider: ProviderKind,
    force: bool,
    now: UnixTime,
) -> Transition<InitOutcome> {
    let mut work = Work::new(state, &[]);
    let outcome = (|| {
        if gpu_count == 0 {
            return Err(Error::Usage("GPU count must be greater than 0".into()));
        }
        if gpu_count > MAX_GPUS {
            return Err(Error::Usage(format!("--gpus must be at most {MAX_GPUS}")));
        }
        let previous = state.pool;
        if let Some(pool) = previous
            && !force
        {
            return Err(Error::AlreadyInitialized(pool.gpu_count));
        }
        let mut cleared = 0;
        for gpu in 0..work.state.slots.len() as u32 {
            if let GpuSlot::Held(reservation) = &work.state.slots[gpu as usize] {
                let ended_at = release_time(reservation, now);
                work.end(gpu, ended_at, now);
                cleared += 1;
            }
        }
        work.state.pool = Some(Pool {
            gpu_count,
            provider,
        });
        work.state.slots = vec![
            GpuSlot::Free {
                last_released: None
            };
            gpu_count as usize
        ];
        work.state.partials.clear();
        work.state.queue.clear();
        work.state.unreadable_entries.clear();
        Ok(InitOutcome {
            previous_count: previous.map(|pool| pool.gpu_count),
            cleared,
        })
    })();
    work.finish(state, outcome)
}

/// Takes the pool out of service (`admin --remove-host`). Refused while reservations
/// or waiters are on it, unless `force`, which ends them (with history). Answers how
/// many reservations it ended.
pub fn retire(state: &PoolState, force: bool, now: UnixTime) -> Transition<u32> {
    let mut work = Work::new(state, &[]);
    let outcome = (|| {
        state.require_pool()?;
        let holders: BTreeSet<String> = state
            .slots
            .iter()
            .filter_map(|slot| match slot {
                GpuSlot::Held(r) if r.liveness(now, &work.dead_ids).is_active() => {
                    Some(r.user_label())
                }
                _ => None,
            })
            .collect();
        let waiters = state
            .queue
            .iter()
            .filter(|entry| entry.is_alive(now, &work.dead_ids))
            .count();
        if !force && (!holders.is_empty() || waiters > 0) {
            let mut present = Vec::new();
            if !holders.is_empty() {
                let holders: Vec<String> = holders.into_iter().collect();
                present.push(format!("reservations of {}", holders.join(", ")));
            }
            if waiters > 0 {
                present.push(format!("{waiters} waiting request(s)"));
            }
            return Err(Error::Usage(format!(
                "the host still has {} - use --force to end them (recorded in the history)",
                present.join(" and ")
            )));
        }
        let mut ended = 0;
        for gpu in 0..work.state.slots.len() as u32 {
            if let GpuSlot::Held(reservation) = &work.state.slots[gpu as usize] {
                let ended_at = release_time(reservation, now);
                work.end(gpu, ended_at, now);
                ended += 1;
            }
        }
        work.state.pool = None;
        work.state.slots.clear();
        work.state.partials.clear();
        work.state.queue.clear();
        Ok(ended)
    })();
    work.finish(state, outcome)
}

/// Claims GPUs per `alloc::plan`, all or nothing, after the waiters took what they
/// can use. Returns the claimed IDs, ascending.
pub fn allocate(state: &PoolState, request: &AllocRequest) -> Transition<Vec<u32>> {
    let mut work = Work::new(state, &request.dead_ids);
    let outcome = state.require_pool().and_then(|_| {
        // Waiters never get a busy GPU, not even one the requester may take over.
        waiters_first(&mut work, &request.unreserved, request.now);
        work.within_policy(request)?;
        match &request.force {
            None => work.claim(request),
            Some(force) => {
                let foreign = force.foreign(&request.reservation.actual_user);
                if let Selection::Ids(ids) = &request.selection
                    && let Some((gpu, users)) = foreign.iter().find(|(gpu, _)| ids.contains(gpu))
                {
                    return Err(Error::GpuTaken {
                        gpu: *gpu,
                        holder: Holder::ProcessesOf(users.clone()),
                    });
                }
                let forced = AllocRequest {
                    unreserved: request
                        .unreserved
                        .iter()
                        .copied()
                        .filter(|gpu| foreign.contains_key(gpu))
                        .collect(),
                    ..request.clone()
                };
                work.claim(&forced)
            }
        }
    });
    let mut transition = work.finish(state, outcome);
    match &transition.outcome {
        Ok(_) => transition.changes.counted.allocations += 1,
        Err(Error::NotEnough { .. } | Error::GpuTaken { .. } | Error::PolicyLimit(_)) => {
            transition.changes.counted.allocation_failures += 1;
        }
        Err(_) => {}
    }
    transition
}

/// The fairness rule every allocation follows: dead waiters dropped, the live ones
/// given what they can use, before the request gets anything.
fn waiters_first(work: &mut Work, unreserved: &[u32], now: UnixTime) {
    work.settle(now);
    work.grant(unreserved, now);
}

/// One turn of a waiter (see `QueueTick`). Fails when the entry is no longer queued
/// (the settling is still written).
pub fn step(state: &PoolState, tick: &QueueTick) -> Transition<QueueStep> {
    let mut work = Work::new(state, &tick.dead_ids);
    work.caller = Some(tick.entry_id.clone());
    let outcome = state.require_pool().and_then(|_| step_in(&mut work, tick));
    let mut transition = work.finish(state, outcome);
    if let Ok(QueueStep::Served(_)) = &transition.outcome {
        transition.changes.counted.allocations += 1;
    }
    transition
}

fn step_in(work: &mut Work, tick: &QueueTick) -> Result<QueueStep> {
    let now = tick.now;
    work.settle(now);
    let Some(index) = work.state.queue.iter().position(|e| e.id == tick.entry_id) else {
        return Err(queue::entry_gone());
    };
    if work.state.queue[index].heartbeat_due(now) {
        work.state.queue[index].last_heartbeat = now;
        for gpu in work.state.queue[index].collected.clone() {
            if let GpuSlot::Held(reservation) = &mut work.state.slots[gpu as usize]
                && reservation.kind == ReservationKind::Run
            {
                reservation.last_heartbeat = Some(now);
            }
        }
    }
    if let Some(unreserved) = &tick.unreserved {
        work.grant(unreserved, now);
    }
    let entry = work.state.queue[index].clone();
    if entry.missing() > 0 {
        return Ok(QueueStep::Waiting {
            position: index as u32 + 1,
            collected: entry.collected,
        });
    }
    // Served: the partial reservations become the reservation, its time starting now.
    for &gpu in &entry.collected {
        if let GpuSlot::Held(reservation) = &mut work.state.slots[gpu as usize] {
            reservation.expiry_time = entry.served_expiry(now);
            if reservation.kind == ReservationKind::Run {
                reservation.last_heartbeat = Some(now);
            }
        }
        work.state.partials.remove(&gpu);
    }
    work.state.queue.remove(index);
    Ok(QueueStep::Served(entry.collected))
}

/// Removes the entry from the queue and ends the partial reservations it collected
/// (with history). Returns the freed IDs; nothing if it is gone.
pub fn leave(state: &PoolState, entry_id: &str, now: UnixTime) -> Transition<Vec<u32>> {
    let mut work = Work::new(state, &[]);
    work.caller = Some(entry_id.to_string());
    let outcome = state.require_pool().map(|_| {
        work.state.queue.retain(|entry| entry.id != entry_id);
        let collected: Vec<u32> = work
            .state
            .partials
            .iter()
            .filter(|(_, entry)| *entry == entry_id)
            .map(|(gpu, _)| *gpu)
            .collect();
        for &gpu in &collected {
            work.end(gpu, now, now);
        }
        collected
    });
    work.finish(state, outcome)
}

/// Ends the reservations in `scope`, recording history. Answers the freed IDs and,
/// for the GPUs it names, why each one left alone was not the caller's.
pub fn release(state: &PoolState, scope: &ReleaseScope, now: UnixTime) -> Transition<Released> {
    let mut work = Work::new(state, &[]);
    let outcome = state.require_pool().and_then(|pool| {
        if let ReleaseScope::OwnIds { ids, .. } | ReleaseScope::AnyIds { ids } = scope {
            alloc::validate_selection(&Selection::Ids(ids.clone()), pool.gpu_count)?;
        }
        // Dead waiters go first, so that the wake-up reaches a live head.
        work.settle(now);
        let mut released = Released::default();
        for gpu in 0..work.state.slots.len() as u32 {
            match &work.state.slots[gpu as usize] {
                GpuSlot::Held(reservation) if scope.covers(gpu, reservation) => {
                    let ended_at = release_time(reservation, now);
                    released.ended.push((gpu, reservation.clone()));
                    work.end(gpu, ended_at, now);
                    released.freed.push(gpu);
                }
                // An unreadable GPU has no owner to check; only an explicit
                // any-holder release (root) resets it.
                GpuSlot::Corrupt(_)
                    if matches!(scope, ReleaseScope::AnyIds { ids } if ids.contains(&gpu)) =>
                {
                    work.end(gpu, now, now);
                    released.freed.push(gpu);
                }
                _ => {}
            }
        }
        let named = match scope {
            ReleaseScope::OwnIds { ids, actual_user } => Some((ids, actual_user.as_str())),
            // Root freed every held one: what is left was not reserved.
            ReleaseScope::AnyIds { ids } => Some((ids, "")),
            _ => None,
        };
        if let Some((ids, actual_user)) = named {
            let mut left: Vec<u32> = ids
                .iter()
                .copied()
                .filter(|gpu| !released.freed.contains(gpu))
                .collect();
            left.sort_unstable();
            released.refused = left
                .into_iter()
                .map(|gpu| work.not_yours(gpu, actual_user, now))
                .collect();
        }
        Ok(released)
    });
    work.finish(state, outcome)
}

/// What the idle policy does with one reservation in an agent's turn.
enum IdleAction {
    None,
    /// Warn its holder (once).
    Warn,
    /// End a manual reservation.
    Release,
    /// Report an idle `run` (once): never ended by policy.
    Flag,
}

/// What the agent's turn found for people to be told, each with the reservation as
/// it was, and each once: the turn that records it in the reservation's `Activity`
/// (in the same transaction) is the one that reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Noticed {
    /// Manual reservations warned now that they will be released for being idle.
    pub idle_warned: Vec<(u32, Reservation)>,
    /// Manual reservations released for being idle (`policy.idle_release_after`).
    pub idle_released: Vec<(u32, Reservation)>,
    /// `run` reservations idle for as long: never ended by policy, flagged once.
    pub idle_runs: Vec<(u32, Reservation)>,
    /// Manual reservations ending within `notify.expiry_warning`.
    pub expiring: Vec<(u32, Reservation)>,
    /// Processes of other users on a reserved GPU, seen for the first time.
    pub squatters: Vec<Squatting>,
}

/// Other users' processes on a reserved GPU: the GPU, its reservation, and each
/// process's user and PID.
pub type Squatting = (u32, Reservation, Vec<(String, u32)>);

/// The agent's periodic turn, in one change: record each reading in the live
/// reservation holding the GPU (its `Activity`: busy when utilization reaches
/// `policy.idle_utilization_percent` or the holder's processes' memory changed),
/// then apply the idle policy (warn once `idle_warning` before, release a manual
/// reservation idle for `idle_release_after` with the reason in the history, flag an
/// idle `run`), and notice what ends soon and who squats.
pub fn tick(state: &PoolState, request: &TickRequest) -> Transition<Noticed> {
    let mut work = Work::new(state, &[]);
    let mut noticed = Noticed::default();
    let now = request.now;
    let policy = &request.policy;
    for reading in &request.readings {
        if state.partials.contains_key(&reading.gpu) {
            continue;
        }
        let Some(GpuSlot::Held(reservation)) = work.state.slots.get_mut(reading.gpu as usize)
        else {
            continue;
        };
        if !reservation.liveness(now, &work.dead_ids).is_active() {
            continue;
        }
        let account = account(&reservation.user, &reservation.actual_user);
        let holder_memory = reading.memory_by_user.get(&account).copied();
        let activity = reservation.activity_mut();
        let busy = reading
            .utilization_percent
            .is_some_and(|percent| percent >= policy.idle_utilization_percent)
            || (activity.samples > 0 && holder_memory != activity.holder_memory_mb);
        activity.samples += 1;
        if let Some(percent) = reading.utilization_percent {
            activity.utilization_sum += u64::from(percent);
            activity.utilization_samples += 1;
        }
        activity.peak_memory_mb = activity
            .peak_memory_mb
            .max(reading.memory_used_mb.unwrap_or(0));
        activity.holder_memory_mb = holder_memory;
        if busy {
            activity.last_active = now;
            activity.idle_warned = false;
        }
        let new_squatters: Vec<(String, u32)> = reading
            .processes
            .iter()
            .filter(|(pid, user)| *user != account && !activity.reported_squatters.contains(pid))
            .map(|(pid, user)| (user.clone(), *pid))
            .collect();
        if !new_squatters.is_empty() {
            activity
                .reported_squatters
                .extend(new_squatters.iter().map(|(_, pid)| *pid));
            noticed
                .squatters
                .push((reading.gpu, reservation.clone(), new_squatters));
        }
    }
    let release_after = policy.idle_release_after.map(|secs| secs as i64);
    let warn_after = release_after.map(|after| after - policy.idle_warning as i64);
    for gpu in 0..work.state.slots.len() as u32 {
        if state.partials.contains_key(&gpu) {
            continue;
        }
        let GpuSlot::Held(reservation) = &mut work.state.slots[gpu as usize] else {
            continue;
        };
        if !reservation.liveness(now, &work.dead_ids).is_active() {
            continue;
        }
        let kind = reservation.kind;
        let ends_soon = reservation
            .expiry_time
            .is_some_and(|end| end - now <= request.expiry_warning as i64);
        let activity = reservation.activity_mut();
        let idle = now - activity.last_active;
        let expiring = kind == ReservationKind::Manual && ends_soon && !activity.expiry_warned;
        activity.expiry_warned |= expiring;
        let idle_for =
            |after: Option<i64>| activity.samples > 0 && after.is_some_and(|a| idle >= a);
        let action = match kind {
            ReservationKind::Manual if idle_for(release_after) => IdleAction::Release,
            _ if activity.idle_warned => IdleAction::None,
            ReservationKind::Manual if idle_for(warn_after) => IdleAction::Warn,
            ReservationKind::Run if idle_for(release_after) => IdleAction::Flag,
            _ => IdleAction::None,
        };
        activity.idle_warned |= matches!(action, IdleAction::Warn | IdleAction::Flag);
        let held = reservation.clone();
        if expiring {
            noticed.expiring.push((gpu, held.clone()));
        }
        match action {
            IdleAction::Release => {
                let reason = format!(
                    "idle for {} (policy.idle_release_after)",
                    crate::gpu_status::format_hours_minutes(idle)
                );
                work.end_because(gpu, now, now, Some(&reason));
                noticed.idle_released.push((gpu, held));
            }
            IdleAction::Warn => noticed.idle_warned.push((gpu, held)),
            IdleAction::Flag => noticed.idle_runs.push((gpu, held)),
            IdleAction::None => {}
        }
    }
    work.finish(state, Ok(noticed))
}

/// Lengthens manual reservations of the requester in place (`ExtendRequest`), all
/// or nothing. Answers each GPU with its new end, ascending.
pub fn extend(state: &PoolState, request: &ExtendRequest) -> Transition<Vec<(u32, UnixTime)>> {
    let mut work = Work::new(state, &[]);
    let now = request.now;
    let outcome = state.require_pool().and_then(|pool| {
        let gpus = work.own_manual(
            request.ids.as_deref(),
            &request.actual_user,
            pool,
            now,
            "extended",
        )?;
        let latest = now.saturating_add(request.max_seconds);
        let mut ends = Vec::new();
        let mut refused = Vec::new();
        for gpu in gpus {
            let GpuSlot::Held(reservation) = &work.state.slots[gpu as usize] else {
                continue;
            };
            let current = reservation.expiry_time.unwrap_or(now);
            let end = match request.end {
                NewEnd::By(seconds) => current.saturating_add(seconds),
                NewEnd::At(at) => at,
            };
            if end <= current {
                refused.push(format!(
                    "GPU {gpu} is already reserved for longer (expires in {})",
                    crate::duration::format_duration(current - now)
                ));
            } else if end > latest {
                refused.push(format!(
                    "GPU {gpu} would stay reserved for more than {} from now, the longest a \
                     reservation may last",
                    crate::duration::format_limit(request.max_seconds)
                ));
            } else {
                ends.push((gpu, end));
            }
        }
        if !refused.is_empty() {
            return Err(Error::NotYours(refused));
        }
        for &(gpu, end) in &ends {
            if let GpuSlot::Held(reservation) = &mut work.state.slots[gpu as usize] {
                reservation.expiry_time = Some(end);
            }
        }
        Ok(ends)
    });
    work.finish(state, outcome)
}

/// Hands manual reservations of the requester to another user in one change: the
/// giver's part ends now in the history, the receiver's starts now and keeps the
/// expiry. Answers the GPUs, ascending.
pub fn transfer(state: &PoolState, request: &TransferRequest) -> Transition<Vec<u32>> {
    let mut work = Work::new(state, &[]);
    let now = request.now;
    let outcome = state.require_pool().and_then(|pool| {
        if request.to_user == request.actual_user {
            return Err(Error::Usage("the reservation is yours already".into()));
        }
        let gpus = work.own_manual(
            Some(&request.ids),
            &request.actual_user,
            pool,
            now,
            "transferred",
        )?;
        for &gpu in &gpus {
            let GpuSlot::Held(given) = &work.state.slots[gpu as usize] else {
                continue;
            };
            let received = Reservation {
                id: request.new_id.clone(),
                user: request.to_user.clone(),
                actual_user: request.to_user.clone(),
                start_time: now,
                // The receiver's part is measured afresh.
                activity: None,
                ..given.clone()
            };
            work.end(gpu, now, now);
            work.hold(gpu, received, None);
            work.touch(&request.to_user, gpu, now);
        }
        Ok(gpus)
    });
    work.finish(state, outcome)
}

/// Refreshes the heartbeat of a run reservation on `gpus`. Returns the GPUs it still
/// holds; the others were released or taken meanwhile.
pub fn heartbeat(
    state: &PoolState,
    reservation_id: &str,
    gpus: &[u32],
    now: UnixTime,
) -> Transition<Vec<u32>> {
    let mut work = Work::new(state, &[]);
    let mut held = BTreeSet::new();
    if !reservation_id.is_empty() {
        for &gpu in gpus {
            if let Some(GpuSlot::Held(reservation)) = work.state.slots.get_mut(gpu as usize)
                && reservation.id == reservation_id
                && reservation.kind == ReservationKind::Run
            {
                reservation.last_heartbeat = Some(now);
                held.insert(gpu);
            }
        }
    }
    work.finish(state, Ok(held.into_iter().collect()))
}

/// Puts a run reservation back where the store lost it (a Redis restart without
/// persistence, a stale-reservation cleanup during a long outage). Recreates a
/// missing pool. Each requested GPU that is free, holds this reservation, or holds
/// one that has ended (ended now, with history) gets the reservation with a fresh
/// heartbeat; a GPU another live reservation holds is left alone and reported.
pub fn reassert(state: &PoolState, request: &ReassertRequest) -> Transition<Reasserted> {
    let mut work = Work::new(state, &[]);
    let now = request.now;
    if work.state.pool.is_none() {
        work.state.pool = Some(request.pool);
        work.state.slots = vec![
            GpuSlot::Free {
                last_released: None
            };
            request.pool.gpu_count as usize
        ];
        work.state.partials.clear();
        work.state.queue.clear();
    }
    let mut outcome = Reasserted::default();
    for &gpu in &request.gpus {
        let Some(slot) = work.state.slots.get(gpu as usize) else {
            continue;
        };
        match slot {
            GpuSlot::Free { .. } => {}
            GpuSlot::Held(held) if held.id == request.reservation.id => {}
            GpuSlot::Held(other) => match other.liveness(now, &[]).ended_at() {
                Some(ended_at) => work.end(gpu, ended_at, now),
                None => {
                    outcome.taken.push((gpu, other.user_label()));
                    continue;
                }
            },
            GpuSlot::Corrupt(reason) => {
                outcome.taken.push((gpu, reason.clone()));
                continue;
            }
        }
        let mut reservation = request.reservation.clone().held_from(request.start_time);
        if reservation.kind == ReservationKind::Run {
            reservation.last_heartbeat = Some(now);
        }
        work.hold(gpu, reservation, None);
        outcome.held.push(gpu);
    }
    outcome.held.sort_unstable();
    outcome.held.dedup();
    work.finish(state, Ok(outcome))
}

/// One operation, as a store runs it: `Store::run` loads the state, calls `apply` and
/// writes the changes. A new operation is a variant here, its function above, and a
/// line in `apply`; the stores need nothing more.
#[derive(Clone, Copy, Debug)]
pub enum Operation<'a> {
    Init {
        gpu_count: u32,
        provider: ProviderKind,
        force: bool,
        now: UnixTime,
    },
    Allocate(&'a AllocRequest),
    Step(&'a QueueTick),
    Leave {
        entry_id: &'a str,
        now: UnixTime,
    },
    Release {
        scope: &'a ReleaseScope,
        now: UnixTime,
    },
    Heartbeat {
        reservation_id: &'a str,
        gpus: &'a [u32],
        now: UnixTime,
    },
    Reassert(&'a ReassertRequest),
    Retire {
        force: bool,
        now: UnixTime,
    },
    Extend(&'a ExtendRequest),
    Transfer(&'a TransferRequest),
    Tick(&'a TickRequest),
}

/// What an operation answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Init(InitOutcome),
    /// GPU IDs, ascending: claimed, freed or still held.
    Gpus(Vec<u32>),
    Step(QueueStep),
    Reasserted(Reasserted),
    /// Reservations a retirement ended.
    Retired(u32),
    Released(Released),
    /// GPU IDs, ascending, each with its new end.
    Extended(Vec<(u32, UnixTime)>),
    Noticed(Noticed),
}

impl Operation<'_> {
    /// The time the operation happens at.
    pub fn now(&self) -> UnixTime {
        match self {
            Operation::Init { now, .. }
            | Operation::Leave { now, .. }
            | Operation::Release { now, .. }
            | Operation::Heartbeat { now, .. }
            | Operation::Retire { now, .. } => *now,
            Operation::Allocate(request) => request.now,
            Operation::Step(tick) => tick.now,
            Operation::Reassert(request) => request.now,
            Operation::Extend(request) => request.now,
            Operation::Transfer(request) => request.now,
            Operation::Tick(request) => request.now,
        }
    }

    /// The account whose last use placement consults, besides the waiters'.
    pub fn requester(&self) -> Option<&str> {
        match self {
            Operation::Allocate(request) => Some(&request.reservation.actual_user),
            _ => None,
        }
    }
}

impl<T> Transition<T> {
    fn map(self, answer: impl FnOnce(T) -> Outcome) -> Transition<Outcome> {
        Transition {
            after: self.after,
            changes: self.changes,
            outcome: self.outcome.map(answer),
        }
    }
}

/// Runs `operation` on `state`.
pub fn apply(state: &PoolState, operation: &Operation) -> Transition<Outcome> {
    match *operation {
        Operation::Init {
            gpu_count,
            provider,
            force,
            now,
        } => init(state, gpu_count, provider, force, now).map(Outcome::Init),
        Operation::Allocate(request) => allocate(state, request).map(Outcome::Gpus),
        Operation::Step(tick) => step(state, tick).map(Outcome::Step),
        Operation::Leave { entry_id, now } => leave(state, entry_id, now).map(Outcome::Gpus),
        Operation::Release { scope, now } => release(state, scope, now).map(Outcome::Released),
        Operation::Heartbeat {
            reservation_id,
            gpus,
            now,
        } => heartbeat(state, reservation_id, gpus, now).map(Outcome::Gpus),
        Operation::Reassert(request) => reassert(state, request).map(Outcome::Reasserted),
        Operation::Retire { force, now } => retire(state, force, now).map(Outcome::Retired),
        Operation::Extend(request) => extend(state, request).map(Outcome::Extended),
        Operation::Transfer(request) => transfer(state, request).map(Outcome::Gpus),
        Operation::Tick(request) => tick(state, request).map(Outcome::Noticed),
    }
}

#[cfg(test)]
mod tests;
