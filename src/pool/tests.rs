//! Invariants of the pool core over random operation sequences: the changes describe
//! the transition completely, a GPU is never given to a second live reservation,
//! newcomers never take what a waiter could use, nothing collected by a gone waiter
//! stays held, and every ended reservation is recorded exactly once.

use std::collections::HashMap;

use proptest::prelude::*;

use super::*;
use crate::queue::WAITER_STALE_AFTER_SECS;

const T: UnixTime = 1_700_000_000;

/// What a store does with `changes`: the in-memory store of these tests.
fn apply(state: &PoolState, changes: &Changes) -> PoolState {
    let mut next = state.clone();
    if let Some(pool) = changes.pool {
        next.pool = Some(pool);
        next.slots = vec![
            GpuSlot::Free {
                last_released: None
            };
            pool.gpu_count as usize
        ];
        next.partials.clear();
    }
    for (gpu, write) in &changes.gpus {
        next.partials.remove(gpu);
        next.slots[*gpu as usize] = match write {
            SlotWrite::Free { last_released } => GpuSlot::Free {
                last_released: *last_released,
            },
            SlotWrite::Held {
                reservation,
                collected_for,
            } => {
                if let Some(entry) = collected_for {
                    next.partials.insert(*gpu, entry.clone());
                }
                GpuSlot::Held(reservation.clone())
            }
        };
    }
    next.queue
        .retain(|entry| !changes.entries_removed.contains(&entry.id));
    next.unreadable_entries.clear();
    for updated in &changes.entries_updated {
        if let Some(entry) = next.queue.iter_mut().find(|e| e.id == updated.id) {
            *entry = updated.clone();
        }
    }
    for (account, gpu, at) in &changes.last_used {
        let used = next
            .last_used
            .entry(account.clone())
            .or_default()
            .entry(*gpu)
            .or_insert(*at);
        *used = (*used).max(*at);
    }
    next.link_partials();
    next
}

/// One random step of a busy machine.
#[derive(Clone, Debug)]
enum Op {
    Allocate { user: u8, count: u32, run: bool },
    AllocateIds { user: u8, ids: Vec<u32> },
    Join { user: u8, count: u32 },
    Step { entry: usize, usage_checked: bool },
    Leave { entry: usize },
    Release { user: u8 },
    ReleaseAny { gpu: u32 },
    Heartbeat { reservation: usize },
    Kill { entry: usize },
    Wait { seconds: i64 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..3, 1u32..4, any::<bool>()).prop_map(|(user, count, run)| Op::Allocate {
            user,
            count,
            run
        }),
        (0u8..3, prop::collection::vec(0u32..5, 1..3))
            .prop_map(|(user, ids)| Op::AllocateIds { user, ids }),
        (0u8..3, 1u32..5).prop_map(|(user, count)| Op::Join { user, count }),
        (0usize..8, any::<bool>()).prop_map(|(entry, usage_checked)| Op::Step {
            entry,
            usage_checked
        }),
        (0usize..8).prop_map(|entry| Op::Leave { entry }),
        (0u8..3).prop_map(|user| Op::Release { user }),
        (0u32..4).prop_map(|gpu| Op::ReleaseAny { gpu }),
        (0usize..8).prop_map(|reservation| Op::Heartbeat { reservation }),
        (0usize..8).prop_map(|entry| Op::Kill { entry }),
        (1i64..40).prop_map(|seconds| Op::Wait { seconds }),
    ]
}

fn reservation(id: &str, user: u8, run: bool, now: UnixTime) -> NewReservation {
    let user = format!("user{user}");
    NewReservation {
        id: id.to_string(),
        user: user.clone(),
        actual_user: user,
        kind: if run {
            ReservationKind::Run
        } else {
            ReservationKind::Manual
        },
        expiry_time: (!run).then_some(now + 60),
        note: None,
        owner: run.then(|| RunOwner {
            host: "elsewhere".into(),
            pid: 7,
            pid_start: 7,
        }),
    }
}

fn request(
    reservation: NewReservation,
    selection: Selection,
    dead: &[String],
    now: UnixTime,
) -> AllocRequest {
    AllocRequest {
        reservation,
        selection,
        unreserved: Vec::new(),
        dead_ids: dead.to_vec(),
        now,
    }
}

/// Checks one transition and returns the state it leaves.
fn check<T: std::fmt::Debug>(
    before: &PoolState,
    transition: &Transition<T>,
    dead: &[String],
    now: UnixTime,
    recorded: &mut HashMap<(String, u32, UnixTime), u32>,
) -> Result<PoolState, TestCaseError> {
    let applied = apply(before, &transition.changes);
    let after = &transition.after;
    prop_assert_eq!(
        &applied.slots,
        &after.slots,
        "the changes describe the slots"
    );
    prop_assert_eq!(&applied.partials, &after.partials);
    prop_assert_eq!(
        &applied.queue,
        &after.queue,
        "the changes describe the queue"
    );

    for (gpu, slot) in before.slots.iter().enumerate() {
        let GpuSlot::Held(old) = slot else { continue };
        let still_held = matches!(&after.slots[gpu], GpuSlot::Held(new) if new.id == old.id
            && new.start_time == old.start_time);
        let records = transition
            .changes
            .history
            .iter()
            .filter(|entry| {
                entry.reservation_id == old.id
                    && entry.record.gpu_id == gpu as u32
                    && entry.record.start_time == old.start_time
            })
            .count();
        if still_held {
            prop_assert_eq!(records, 0, "a held reservation has no history yet");
        } else {
            prop_assert_eq!(records, 1, "an ended reservation is recorded once");
            // Taken over only once it had ended: never two live holders.
            if matches!(&after.slots[gpu], GpuSlot::Held(_)) {
                let entry_gone = before
                    .partials
                    .get(&(gpu as u32))
                    .is_some_and(|entry| !after.queue.iter().any(|live| live.id == *entry));
                prop_assert!(
                    !old.liveness(now, dead).is_active() || entry_gone,
                    "GPU {} taken from live {:?}",
                    gpu,
                    old
                );
            }
        }
    }
    for entry in &transition.changes.history {
        prop_assert!(entry.record.end_time >= entry.record.start_time);
        // A waiter's collected GPU released by its user is collected again, maybe
        // within the same second: only periods that lasted identify a reservation.
        if entry.record.end_time == entry.record.start_time {
            continue;
        }
        let key = (
            entry.reservation_id.clone(),
            entry.record.gpu_id,
            entry.record.start_time,
        );
        let count = recorded.entry(key).or_default();
        *count += 1;
        prop_assert_eq!(*count, 1, "recorded twice: {:?}", entry);
    }
    Ok(applied)
}

/// After a change that settles the queue, only live entries hold partial
/// reservations.
fn no_orphans(state: &PoolState, now: UnixTime, dead: &[String]) -> Result<(), TestCaseError> {
    for entry_id in state.partials.values() {
        let entry = state.queue.iter().find(|entry| entry.id == *entry_id);
        prop_assert!(
            entry.is_some_and(|entry| entry.is_alive(now, dead)),
            "partial of gone entry {}",
            entry_id
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn random_sequences_keep_every_invariant(ops in prop::collection::vec(op(), 1..40)) {
        let mut now = T;
        let start = init(&PoolState::default(), 4, ProviderKind::Fake, false, now);
        let mut state = apply(&PoolState::default(), &start.changes);
        let mut recorded = HashMap::new();
        let mut dead: Vec<String> = Vec::new();
        let mut made = 0;
        let mut joined: Vec<String> = Vec::new();
        for op in ops {
            made += 1;
            let id = format!("r{made}");
            match op {
                Op::Allocate { user, count, run } => {
                    let request = request(reservation(&id, user, run, now), Selection::Count(count), &dead, now);
                    let t = allocate(&state, &request);
                    let next = check(&state, &t, &dead, now, &mut recorded)?;
                    if let Ok(claim) = &t.outcome {
                        prop_assert_eq!(claim.len() as u32, count);
                        // Fairness: every waiter still missing GPUs could use none of these.
                        for entry in &next.queue {
                            if entry.missing() > 0 {
                                prop_assert!(!matches!(entry.selection, Selection::Count(_)),
                                    "newcomer served while {:?} waits", entry);
                            }
                        }
                    }
                    no_orphans(&next, now, &dead)?;
                    state = next;
                }
                Op::AllocateIds { user, ids } => {
                    let request = request(reservation(&id, user, false, now), Selection::Ids(ids), &dead, now);
                    let t = allocate(&state, &request);
                    state = check(&state, &t, &dead, now, &mut recorded)?;
                    no_orphans(&state, now, &dead)?;
                }
                Op::Join { user, count } => {
                    let request = request(reservation(&id, user, false, now), Selection::Count(count), &dead, now);
                    let t = allocate(&state, &request);
                    state = check(&state, &t, &dead, now, &mut recorded)?;
                    if t.outcome.as_ref().is_err_and(Error::is_retryable) {
                        let waiter = RunOwner { host: "elsewhere".into(), pid: made, pid_start: 1 };
                        state.queue.push(QueueEntry::new(&request.reservation, &request.selection, &waiter, now));
                        joined.push(id);
                    }
                }
                Op::Step { entry, usage_checked } => {
                    if let Some(id) = joined.get(entry) {
                        let tick = QueueTick {
                            entry_id: id.clone(),
                            unreserved: usage_checked.then(Vec::new),
                            dead_ids: dead.clone(),
                            now,
                        };
                        let t = step(&state, &tick);
                        state = check(&state, &t, &dead, now, &mut recorded)?;
                        no_orphans(&state, now, &dead)?;
                        if let Ok(QueueStep::Served(gpus)) = &t.outcome {
                            for gpu in gpus {
                                let ours = matches!(&state.slots[*gpu as usize],
                                    GpuSlot::Held(r) if r.id == *id);
                                prop_assert!(ours, "GPU {} not served", gpu);
                                prop_assert!(!state.partials.contains_key(gpu));
                            }
                        }
                    }
                }
                Op::Leave { entry } => {
                    if let Some(id) = joined.get(entry) {
                        let t = leave(&state, id, now);
                        state = check(&state, &t, &dead, now, &mut recorded)?;
                        prop_assert!(!state.partials.values().any(|e| e == id));
                    }
                }
                Op::Release { user } => {
                    let scope = ReleaseScope::OwnManual { actual_user: format!("user{user}") };
                    let t = release(&state, &scope, now);
                    state = check(&state, &t, &dead, now, &mut recorded)?;
                }
                Op::ReleaseAny { gpu } => {
                    let t = release(&state, &ReleaseScope::AnyIds { ids: vec![gpu] }, now);
                    state = check(&state, &t, &dead, now, &mut recorded)?;
                    let freed = matches!(state.slots[gpu as usize], GpuSlot::Free { .. });
                    prop_assert!(freed, "GPU {} not freed", gpu);
                }
                Op::Heartbeat { reservation } => {
                    let id = format!("r{}", reservation + 1);
                    let t = heartbeat(&state, &id, &[0, 1, 2, 3], now);
                    state = check(&state, &t, &dead, now, &mut recorded)?;
                }
                Op::Kill { entry } => {
                    if let Some(id) = joined.get(entry) {
                        dead.push(id.clone());
                    }
                }
                Op::Wait { seconds } => now += seconds,
            }
        }
        // Long after everyone went silent, one change frees every collected GPU.
        let later = now + WAITER_STALE_AFTER_SECS + 100;
        let t = release(&state, &ReleaseScope::AnyIds { ids: vec![0] }, later);
        let state = check(&state, &t, &dead, later, &mut recorded)?;
        prop_assert!(state.partials.is_empty(), "{:?}", state.partials);
        prop_assert!(state.queue.is_empty());
    }
}

#[test]
fn a_refused_request_still_serves_the_waiters() {
    let mut state = apply(
        &PoolState::default(),
        &init(&PoolState::default(), 2, ProviderKind::Fake, false, T).changes,
    );
    let waiter = RunOwner {
        host: "h".into(),
        pid: 1,
        pid_start: 1,
    };
    let wants_two = request(reservation("w", 0, false, T), Selection::Count(2), &[], T);
    state.queue.push(QueueEntry::new(
        &wants_two.reservation,
        &wants_two.selection,
        &waiter,
        T,
    ));
    let newcomer = request(
        reservation("n", 1, false, T),
        Selection::Count(1),
        &[],
        T + 1,
    );
    let t = allocate(&state, &newcomer);
    assert!(matches!(t.outcome, Err(Error::NotEnough { .. })));
    assert_eq!(t.after.queue[0].collected, vec![0, 1]);
    assert_eq!(t.changes.wake_entries, vec!["w".to_string()]);
}

#[test]
fn init_refuses_out_of_range_sizes_and_existing_pools() {
    let empty = PoolState::default();
    assert!(matches!(
        init(&empty, 0, ProviderKind::Fake, false, T).outcome,
        Err(Error::Usage(_))
    ));
    assert!(matches!(
        init(&empty, MAX_GPUS + 1, ProviderKind::Fake, false, T).outcome,
        Err(Error::Usage(_))
    ));
    let state = apply(
        &empty,
        &init(&empty, 3, ProviderKind::Fake, false, T).changes,
    );
    assert_eq!(
        init(&state, 2, ProviderKind::Fake, false, T)
            .outcome
            .unwrap_err(),
        Error::AlreadyInitialized(3)
    );
    let forced = init(&state, 2, ProviderKind::Fake, true, T);
    assert_eq!(forced.changes.removed_gpus, vec![2]);
}
