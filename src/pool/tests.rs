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
                GpuSlot::Held((**reservation).clone())
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
    Extend { user: u8, seconds: i64 },
    Transfer { user: u8, gpu: u32, to: u8 },
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
        (0u8..3, 1i64..100).prop_map(|(user, seconds)| Op::Extend { user, seconds }),
        (0u8..3, 0u32..4, 0u8..3).prop_map(|(user, gpu, to)| Op::Transfer { user, gpu, to }),
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
        adopted: None,
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
        force: None,
        policy: Default::default(),
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
    check_handover(before, transition, dead, now, recorded, false)
}

/// `check`, where `handover` allows a live manual reservation to pass to another
/// user in place, its expiry kept (`transfer`).
fn check_handover<T: std::fmt::Debug>(
    before: &PoolState,
    transition: &Transition<T>,
    dead: &[String],
    now: UnixTime,
    recorded: &mut HashMap<(String, u32, UnixTime), u32>,
    handover: bool,
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
            if let GpuSlot::Held(new) = &after.slots[gpu] {
                if handover && old.liveness(now, dead).is_active() {
                    prop_assert_eq!(new.expiry_time, old.expiry_time);
                    prop_assert_eq!(new.kind, ReservationKind::Manual);
                    prop_assert_eq!(new.start_time, now);
                    continue;
                }
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
                Op::Extend { user, seconds } => {
                    let request = ExtendRequest {
                        actual_user: format!("user{user}"),
                        ids: None,
                        end: NewEnd::By(seconds),
                        max_seconds: 120,
                        now,
                    };
                    let t = extend(&state, &request);
                    let next = check(&state, &t, &dead, now, &mut recorded)?;
                    match &t.outcome {
                        Ok(ends) => for (gpu, end) in ends {
                            let extended = matches!(&next.slots[*gpu as usize],
                                GpuSlot::Held(r) if r.expiry_time == Some(*end) && *end <= now + 120);
                            prop_assert!(extended, "GPU {} not extended", gpu);
                        },
                        // All or nothing: a refusal changes no reservation.
                        Err(_) => prop_assert_eq!(&next.slots, &state.slots),
                    }
                    state = next;
                }
                Op::Transfer { user, gpu, to } => {
                    let request = TransferRequest {
                        actual_user: format!("user{user}"),
                        ids: vec![gpu],
                        to_user: format!("user{to}"),
                        new_id: id.clone(),
                        now,
                    };
                    let t = transfer(&state, &request);
                    let next = check_handover(&state, &t, &dead, now, &mut recorded, true)?;
                    if t.outcome.is_ok() {
                        let received = matches!(&next.slots[gpu as usize],
                            GpuSlot::Held(r) if r.actual_user == request.to_user && r.id == id);
                        prop_assert!(received, "GPU {} not handed over", gpu);
                    }
                    state = next;
                }
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
    assert_eq!(
        t.changes.counted,
        Counted {
            allocations: 0,
            allocation_failures: 1
        }
    );

    // The waiter's turn serves it: one allocation, from the queue.
    let served = step(
        &t.after,
        &QueueTick {
            entry_id: "w".into(),
            unreserved: None,
            dead_ids: Vec::new(),
            now: T + 2,
        },
    );
    assert!(
        matches!(served.outcome, Ok(QueueStep::Served(_))),
        "{:?}",
        served.outcome
    );
    assert_eq!(served.changes.counted.allocations, 1);
    let granted = allocate(
        &PoolState::default(),
        &request(reservation("x", 2, false, T), Selection::Count(1), &[], T),
    );
    assert!(granted.outcome.is_err(), "no pool");
    assert!(
        granted.changes.counted.is_empty(),
        "no pool is not a refused request"
    );
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

fn held(user: &str, kind: ReservationKind, expiry: Option<UnixTime>) -> GpuSlot {
    GpuSlot::Held(Reservation {
        id: format!("id-{user}"),
        user: user.into(),
        actual_user: user.into(),
        kind,
        start_time: T,
        last_heartbeat: Some(T),
        expiry_time: expiry,
        note: None,
        owner: None,
        adopted: None,
        activity: None,
    })
}

fn pool_of(slots: Vec<GpuSlot>) -> PoolState {
    PoolState {
        pool: Some(Pool {
            gpu_count: slots.len() as u32,
            provider: ProviderKind::Fake,
        }),
        slots,
        ..PoolState::default()
    }
}

#[test]
fn extend_lengthens_only_own_manual_reservations_all_or_nothing() {
    let state = pool_of(vec![
        held("alice", ReservationKind::Manual, Some(T + 3600)),
        held("bob", ReservationKind::Manual, Some(T + 3600)),
        held("alice", ReservationKind::Run, None),
        GpuSlot::Free {
            last_released: None,
        },
    ]);
    let request = |ids: Option<Vec<u32>>, end| ExtendRequest {
        actual_user: "alice".into(),
        ids,
        end,
        max_seconds: 86400,
        now: T + 10,
    };
    let t = extend(&state, &request(None, NewEnd::By(7200)));
    assert_eq!(t.outcome.unwrap(), vec![(0, T + 3600 + 7200)]);
    assert_eq!(t.changes.history, Vec::new(), "never freed in between");
    let t = extend(&state, &request(Some(vec![0, 1, 2, 3]), NewEnd::By(60)));
    assert_eq!(
        t.outcome.unwrap_err(),
        Error::NotYours(vec![
            "GPU 1 is reserved by bob, not by you".into(),
            "GPU 2 is a run reservation, which ends with its command: it cannot be extended".into(),
            "GPU 3 is not reserved".into(),
        ])
    );
    assert!(t.changes.gpus.is_empty());
    let t = extend(&state, &request(Some(vec![0]), NewEnd::At(T + 60)));
    assert!(
        matches!(t.outcome, Err(Error::NotYours(_))),
        "shortening is refused"
    );
    let t = extend(&state, &request(Some(vec![0]), NewEnd::At(T + 10 + 86401)));
    assert_eq!(
        t.outcome.unwrap_err().to_string(),
        "GPU 0 would stay reserved for more than 1d from now, the longest a reservation may last"
    );
}

#[test]
fn transfer_hands_over_in_place_and_splits_the_history() {
    let state = pool_of(vec![
        held("alice", ReservationKind::Manual, Some(T + 3600)),
        held("alice", ReservationKind::Run, None),
    ]);
    let request = TransferRequest {
        actual_user: "alice".into(),
        ids: vec![0],
        to_user: "bob".into(),
        new_id: "new".into(),
        now: T + 600,
    };
    let t = transfer(&state, &request);
    assert_eq!(t.outcome.unwrap(), vec![0]);
    let GpuSlot::Held(received) = &t.after.slots[0] else {
        panic!("GPU 0 freed");
    };
    assert_eq!(
        (received.actual_user.as_str(), received.start_time),
        ("bob", T + 600)
    );
    assert_eq!(received.expiry_time, Some(T + 3600));
    assert_eq!(t.changes.gpus.len(), 1, "one write: never free in between");
    assert_eq!(t.changes.history.len(), 1);
    let given = &t.changes.history[0].record;
    assert_eq!(
        (given.actual_user.as_str(), given.start_time, given.end_time),
        ("alice", T, T + 600)
    );
    let run = TransferRequest {
        ids: vec![1],
        ..request.clone()
    };
    assert!(matches!(
        transfer(&state, &run).outcome,
        Err(Error::NotYours(_))
    ));
    let by_bob = TransferRequest {
        actual_user: "bob".into(),
        to_user: "carol".into(),
        ..request
    };
    assert_eq!(
        transfer(&state, &by_bob).outcome.unwrap_err().to_string(),
        "GPU 0 is reserved by alice, not by you"
    );
}

#[test]
fn release_names_each_gpu_that_is_not_yours() {
    let state = pool_of(vec![
        held("alice", ReservationKind::Manual, Some(T + 3600)),
        held("bob", ReservationKind::Manual, Some(T + 3600)),
        GpuSlot::Free {
            last_released: None,
        },
    ]);
    let scope = ReleaseScope::OwnIds {
        actual_user: "alice".into(),
        ids: vec![2, 1, 0],
    };
    let released = release(&state, &scope, T + 5).outcome.unwrap();
    assert_eq!(released.freed, vec![0]);
    assert_eq!(
        released.refused,
        vec![
            "GPU 1 is reserved by bob, not by you".to_string(),
            "GPU 2 is not reserved".to_string()
        ]
    );
}

#[test]
fn force_takes_only_gpus_whose_processes_are_all_the_requesters() {
    let state = pool_of(vec![
        GpuSlot::Free {
            last_released: None,
        },
        GpuSlot::Free {
            last_released: None,
        },
    ]);
    let mut own = reservation("f", 0, false, T);
    own.actual_user = "alice".into();
    let force = |any_user| Force {
        process_users: BTreeMap::from([
            (0, vec!["alice".to_string()]),
            (1, vec!["alice".to_string(), "bob".to_string()]),
        ]),
        any_user,
    };
    let forced = |ids: Vec<u32>, any_user| AllocRequest {
        unreserved: vec![0, 1],
        force: Some(force(any_user)),
        ..request(own.clone(), Selection::Ids(ids), &[], T)
    };
    assert_eq!(
        allocate(&state, &forced(vec![0], false)).outcome.unwrap(),
        vec![0]
    );
    assert_eq!(
        allocate(&state, &forced(vec![0, 1], false))
            .outcome
            .unwrap_err()
            .to_string(),
        "GPU 1 is in use without reservation by processes of bob - only a GPU whose \
         processes are all yours can be taken over"
    );
    assert_eq!(
        allocate(&state, &forced(vec![1], true)).outcome.unwrap(),
        vec![1]
    );
    let unforced = AllocRequest {
        force: None,
        ..forced(vec![0], false)
    };
    assert!(matches!(
        allocate(&state, &unforced).outcome,
        Err(Error::GpuTaken {
            gpu: 0,
            holder: Holder::Unreserved
        })
    ));
    let by_count = AllocRequest {
        selection: Selection::Count(2),
        ..forced(vec![0], false)
    };
    assert!(matches!(
        allocate(&state, &by_count).outcome,
        Err(Error::NotEnough { available: 1, .. })
    ));
}

#[test]
fn reserving_your_own_gpu_again_says_so() {
    let state = pool_of(vec![held("user0", ReservationKind::Manual, Some(T + 3600))]);
    let again = request(
        reservation("x", 0, false, T),
        Selection::Ids(vec![0]),
        &[],
        T,
    );
    assert_eq!(
        allocate(&state, &again).outcome.unwrap_err().to_string(),
        "you already hold GPU 0"
    );
}

#[test]
fn samples_measure_each_held_gpu_and_notice_activity() {
    let state = pool_of(vec![
        held("alice", ReservationKind::Manual, Some(T + 3600)),
        held("bob", ReservationKind::Manual, Some(T + 3600)),
        GpuSlot::Free {
            last_released: None,
        },
    ]);
    let reading = |gpu, utilization, alice_mb| GpuReading {
        gpu,
        utilization_percent: utilization,
        memory_used_mb: Some(alice_mb + 100),
        memory_by_user: BTreeMap::from([("alice".to_string(), alice_mb)]),
        processes: Vec::new(),
    };
    let request = |readings, now| TickRequest {
        readings,
        policy: Policy::default(),
        expiry_warning: 0,
        now,
    };
    let first = tick(
        &state,
        &request(
            vec![
                reading(0, Some(90), 1000),
                reading(1, Some(2), 0),
                reading(2, Some(50), 0),
            ],
            T + 10,
        ),
    );
    let activity = |t: &Transition<Noticed>, gpu: usize| match &t.after.slots[gpu] {
        GpuSlot::Held(r) => r.activity.clone().unwrap(),
        _ => panic!("GPU {gpu} not held"),
    };
    assert_eq!(
        activity(&first, 0).last_active,
        T + 10,
        "busy by utilization"
    );
    assert_eq!(activity(&first, 1).last_active, T, "idle since its start");
    assert!(matches!(first.after.slots[2], GpuSlot::Free { .. }));
    // Utilization below the threshold, but alice's memory changed: still busy.
    let second = tick(
        &first.after,
        &request(vec![reading(0, Some(1), 2000), reading(1, None, 0)], T + 20),
    );
    let alice = activity(&second, 0);
    assert_eq!(alice.last_active, T + 20);
    assert_eq!(
        (alice.samples, alice.mean_utilization_percent()),
        (2, Some(45))
    );
    assert_eq!(alice.peak_memory_mb, 2100);
    let bob = activity(&second, 1);
    assert_eq!((bob.last_active, bob.utilization_samples), (T, 1));
    // Nothing changes: idle from now on.
    let third = tick(
        &second.after,
        &request(vec![reading(0, Some(1), 2000)], T + 30),
    );
    assert_eq!(activity(&third, 0).last_active, T + 20);
    assert!(third.changes.history.is_empty());
}

#[test]
fn reclaim_warns_once_then_releases_idle_manual_reservations_and_only_flags_runs() {
    let measured = |slot: GpuSlot, last_active| match slot {
        GpuSlot::Held(mut r) => {
            r.activity = Some(Box::new(crate::state::Activity {
                last_active,
                samples: 1,
                ..Default::default()
            }));
            GpuSlot::Held(r)
        }
        other => other,
    };
    let state = pool_of(vec![
        measured(held("alice", ReservationKind::Manual, Some(T + 86400)), T),
        measured(
            held("bob", ReservationKind::Manual, Some(T + 86400)),
            T + 3000,
        ),
        measured(held("carol", ReservationKind::Run, None), T),
    ]);
    let mut state = state;
    if let GpuSlot::Held(run) = &mut state.slots[2] {
        run.last_heartbeat = Some(T + 3590); // its supervisor is alive
    }
    let policy = Policy {
        idle_release_after: Some(3600),
        idle_warning: 900,
        ..Policy::default()
    };
    let at = |now| TickRequest {
        readings: Vec::new(),
        policy,
        expiry_warning: 0,
        now,
    };
    // 50 minutes in: alice is warned, nobody released.
    let warned = tick(&state, &at(T + 3000));
    let outcome = warned.outcome.as_ref().unwrap();
    assert_eq!(outcome.idle_warned.len(), 1);
    assert_eq!(outcome.idle_warned[0].0, 0);
    assert!(outcome.idle_released.is_empty() && outcome.idle_runs.is_empty());
    let again = tick(&warned.after, &at(T + 3100));
    assert!(again.outcome.unwrap().idle_warned.is_empty(), "warned once");
    // An hour in: alice's GPU is released (the history says why); carol's run flagged.
    let later = tick(&warned.after, &at(T + 3600));
    let outcome = later.outcome.as_ref().unwrap();
    assert_eq!(outcome.idle_released.len(), 1);
    assert!(matches!(later.after.slots[0], GpuSlot::Free { .. }));
    assert_eq!(
        later.changes.history[0].reason.as_deref(),
        Some("idle for 1h 0m (policy.idle_release_after)")
    );
    assert!(
        matches!(later.after.slots[1], GpuSlot::Held(_)),
        "bob was busy"
    );
    assert_eq!(outcome.idle_runs.len(), 1);
    assert!(
        matches!(later.after.slots[2], GpuSlot::Held(_)),
        "a run is never ended"
    );
    let off = tick(
        &state,
        &TickRequest {
            policy: Policy::default(),
            ..at(T + 99_999)
        },
    );
    let off = off.outcome.unwrap();
    assert!(off.idle_released.is_empty() && off.idle_warned.is_empty());
}
