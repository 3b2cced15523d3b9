//! The wait queue's contract (`join_queue`, `queue_step`, `leave_queue`, `queue`,
//! change watching), checked against every backend and against `canhazgpu::queue`.

use std::collections::HashMap;
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use canhazgpu::error::Error;
use canhazgpu::queue::{self, DistributionInput, QueueEntry};
use canhazgpu::state::{GpuSlot, ProviderKind, ReservationKind, RunOwner, Selection, UnixTime};
use canhazgpu::store::{AllocRequest, QueueStep, QueueTick, ReleaseScope, Store};

use super::{
    Lcg, StoreFixture, T, all_history, allocate, holders, ids, initialized, manual, open, record,
    run,
};

fn waiter(pid: u32) -> RunOwner {
    RunOwner {
        host: "testhost".into(),
        pid,
        pid_start: 77,
    }
}

/// `id` (a manual reservation of user `id` for 100 s) joins the queue at `now`.
fn join(store: &mut dyn Store, id: &str, selection: Selection, now: UnixTime) -> QueueStep {
    join_request(
        store,
        super::request(manual(id, id, now + 100), selection, now),
    )
}

fn join_request(store: &mut dyn Store, request: AllocRequest) -> QueueStep {
    store.join_queue(&request, &waiter(1000)).unwrap()
}

/// A turn of `id` at `now`, usage checked (nothing in use without reservation).
fn step(store: &mut dyn Store, id: &str, now: UnixTime) -> Result<QueueStep, Error> {
    store.queue_step(&QueueTick {
        entry_id: id.into(),
        unreserved: Some(Vec::new()),
        dead_ids: Vec::new(),
        now,
    })
}

fn waiting(position: u32, collected: &[u32]) -> QueueStep {
    QueueStep::Waiting {
        position,
        collected: collected.to_vec(),
    }
}

fn release(store: &mut dyn Store, gpus: &[u32], now: UnixTime) {
    let scope = ReleaseScope::AnyIds { ids: gpus.to_vec() };
    assert_eq!(store.release(&scope, now).unwrap().freed, gpus);
}

/// The queue as (entry ID, collected GPUs), in order.
fn queued(store: &mut dyn Store) -> Vec<(String, Vec<u32>)> {
    store
        .queue()
        .unwrap()
        .into_iter()
        .map(|entry| (entry.id, entry.collected))
        .collect()
}

fn entry(id: &str, collected: &[u32]) -> (String, Vec<u32>) {
    (id.to_string(), collected.to_vec())
}

/// Holds every GPU of a pool of `gpus` with manual reservations "h0", "h1", ...
fn busy(fixture: &StoreFixture, gpus: u32) -> Box<dyn Store> {
    let mut store = initialized(fixture, gpus);
    for gpu in 0..gpus {
        let id = format!("h{gpu}");
        allocate(&mut *store, manual(&id, &id, T + 10_000), ids(&[gpu]), T).unwrap();
    }
    store
}

pub fn queue_join_is_served_at_once_when_gpus_are_free(fixture: StoreFixture) {
    let mut store = initialized(&fixture, 2);
    assert_eq!(
        join(&mut *store, "w", Selection::Count(2), T),
        QueueStep::Served(vec![0, 1])
    );
    assert_eq!(queued(&mut *store), vec![]);
    assert_eq!(holders(&mut *store), ["w", "w"]);
    // Errors that waiting cannot fix are returned, not queued.
    let request = super::request(manual("x", "x", T + 9), Selection::Count(3), T);
    assert!(matches!(
        store.join_queue(&request, &waiter(1)),
        Err(Error::Usage(_))
    ));
    let request = super::request(manual("x", "x", T + 9), ids(&[5]), T);
    assert!(matches!(
        store.join_queue(&request, &waiter(1)),
        Err(Error::Usage(_))
    ));
    assert_eq!(queued(&mut *store), vec![]);
}

pub fn queue_serves_waiters_in_order(fixture: StoreFixture) {
    let mut store = busy(&fixture, 1);
    assert_eq!(
        join(&mut *store, "w1", Selection::Count(1), T + 1),
        waiting(1, &[])
    );
    assert_eq!(
        join(&mut *store, "w2", Selection::Count(1), T + 2),
        waiting(2, &[])
    );
    let entries = store.queue().unwrap();
    assert_eq!(entries[0].enqueue_time, T + 1);
    assert_eq!(entries[0].duration, Some(100));
    assert_eq!(entries[0].waiter, Some(waiter(1000)));

    release(&mut *store, &[0], T + 10);
    // The second waiter's turn hands the GPU to the first.
    assert_eq!(step(&mut *store, "w2", T + 11), Ok(waiting(2, &[])));
    assert_eq!(
        queued(&mut *store),
        vec![entry("w1", &[0]), entry("w2", &[])]
    );
    // A newcomer gets nothing a waiter holds.
    let newcomer = allocate(
        &mut *store,
        manual("n", "n", T + 99),
        Selection::Count(1),
        T + 12,
    );
    assert!(
        matches!(newcomer, Err(Error::NotEnough { .. })),
        "{newcomer:?}"
    );
    // Served: the reservation's time starts now.
    assert_eq!(
        step(&mut *store, "w1", T + 20),
        Ok(QueueStep::Served(vec![0]))
    );
    match &store.slots().unwrap()[0] {
        GpuSlot::Held(reservation) => {
            assert_eq!(reservation.id, "w1");
            assert_eq!(reservation.expiry_time, Some(T + 120));
            assert_eq!(reservation.start_time, T + 11);
        }
        other => panic!("GPU 0 should be held by w1, not {other:?}"),
    }
    // Its waiter exits once served; a caller that still saw the entry and found the
    // process gone does not end the reservation.
    let mut request = super::request(manual("n", "n", T + 99), Selection::Count(1), T + 21);
    request.dead_ids = vec!["w1".into()];
    assert!(matches!(
        store.allocate(&request),
        Err(Error::NotEnough { .. })
    ));
    assert_eq!(step(&mut *store, "w2", T + 21), Ok(waiting(1, &[])));
    assert_eq!(step(&mut *store, "w1", T + 21), Err(queue::entry_gone()));
}

/// A large request collects GPUs as they free up; a smaller one behind it waits.
pub fn queue_large_request_collects_until_served(fixture: StoreFixture) {
    let mut store = busy(&fixture, 3);
    assert_eq!(
        join(&mut *store, "big", Selection::Count(2), T + 1),
        waiting(1, &[])
    );
    assert_eq!(
        join(&mut *store, "small", Selection::Count(1), T + 2),
        waiting(2, &[])
    );
    release(&mut *store, &[1], T + 10);
    assert_eq!(step(&mut *store, "small", T + 11), Ok(waiting(2, &[])));
    assert_eq!(step(&mut *store, "big", T + 11), Ok(waiting(1, &[1])));
    release(&mut *store, &[2], T + 12);
    assert_eq!(
        step(&mut *store, "big", T + 13),
        Ok(QueueStep::Served(vec![1, 2]))
    );
    assert_eq!(step(&mut *store, "small", T + 13), Ok(waiting(1, &[])));
    release(&mut *store, &[0], T + 14);
    assert_eq!(
        step(&mut *store, "small", T + 15),
        Ok(QueueStep::Served(vec![0]))
    );
    assert_eq!(holders(&mut *store), ["small", "big", "big"]);
    assert_eq!(queued(&mut *store), vec![]);
}

/// A GPU the first waiter cannot use goes to the next one; a newcomer only gets what
/// no waiter can use, even when it is refused.
pub fn queue_newcomers_get_only_what_waiters_cannot_use(fixture: StoreFixture) {
    let mut store = busy(&fixture, 3);
    assert_eq!(
        join(&mut *store, "ids", ids(&[0, 1]), T + 1),
        waiting(1, &[])
    );
    assert_eq!(
        join(&mut *store, "any", Selection::Count(1), T + 2),
        waiting(2, &[])
    );
    release(&mut *store, &[2], T + 10);
    assert_eq!(
        step(&mut *store, "any", T + 11),
        Ok(QueueStep::Served(vec![2]))
    );

    release(&mut *store, &[0, 1], T + 12);
    let newcomer = allocate(
        &mut *store,
        manual("n", "n", T + 99),
        Selection::Count(1),
        T + 13,
    );
    assert!(
        matches!(newcomer, Err(Error::NotEnough { .. })),
        "{newcomer:?}"
    );
    // The refused newcomer's call still handed both GPUs to the waiter.
    assert_eq!(queued(&mut *store), vec![entry("ids", &[0, 1])]);
    assert_eq!(
        step(&mut *store, "ids", T + 14),
        Ok(QueueStep::Served(vec![0, 1]))
    );
}

pub fn queue_leaving_releases_what_was_collected(fixture: StoreFixture) {
    let mut store = busy(&fixture, 2);
    release(&mut *store, &[0], T + 5);
    assert_eq!(
        join(&mut *store, "w", Selection::Count(2), T + 10),
        waiting(1, &[0])
    );
    let history_before = all_history(&mut *store).len();
    assert_eq!(store.leave_queue("w", T + 20).unwrap(), vec![0]);
    assert_eq!(store.leave_queue("w", T + 21).unwrap(), Vec::<u32>::new());
    assert_eq!(queued(&mut *store), vec![]);
    assert_eq!(holders(&mut *store), ["", "h1"]);
    let history = all_history(&mut *store);
    assert_eq!(history.len(), history_before + 1);
    let last = history.last().unwrap();
    assert_eq!((last.user.as_str(), last.gpu_id), ("w", 0));
    assert_eq!((last.start_time, last.end_time), (T + 10, T + 20));
}

/// Entries of waiters known to be gone, or silent for too long, are dropped with
/// their partial reservations by the next change, whoever makes it.
pub fn queue_dead_and_silent_waiters_are_dropped(fixture: StoreFixture) {
    let mut store = busy(&fixture, 2);
    release(&mut *store, &[0], T + 5);
    assert_eq!(
        join(&mut *store, "dead", Selection::Count(2), T + 10),
        waiting(1, &[0])
    );
    assert_eq!(
        join(&mut *store, "silent", Selection::Count(2), T + 10),
        waiting(2, &[])
    );
    let mut request = super::request(manual("n", "n", T + 99), Selection::Count(1), T + 11);
    request.dead_ids = vec!["dead".into()];
    assert_eq!(
        store.allocate(&request),
        Err(Error::NotEnough {
            requested: 1,
            available: 0,
            unreserved: 0
        })
    );
    // The GPU went to the next waiter, not to the newcomer.
    assert_eq!(queued(&mut *store), vec![entry("silent", &[0])]);
    let later = T + 10 + queue::WAITER_STALE_AFTER_SECS + 1;
    let newcomer = allocate(
        &mut *store,
        manual("n", "n", later + 99),
        Selection::Count(1),
        later,
    );
    assert_eq!(newcomer, Ok(vec![0]));
    assert_eq!(queued(&mut *store), vec![]);
    assert_eq!(step(&mut *store, "silent", later), Err(queue::entry_gone()));
}

/// A waiter that died holding a collected GPU held it until its last sign of life,
/// not until somebody noticed: its history record ends at its last heartbeat.
pub fn queue_dead_waiter_collection_ends_at_its_last_sign_of_life(fixture: StoreFixture) {
    let mut store = busy(&fixture, 2);
    release(&mut *store, &[0], T + 5);
    assert_eq!(
        join(&mut *store, "dead", Selection::Count(2), T + 10),
        waiting(1, &[0])
    );
    assert_eq!(step(&mut *store, "dead", T + 20), Ok(waiting(1, &[0])));
    let mut request = super::request(manual("n", "n", T + 999), Selection::Count(1), T + 500);
    request.dead_ids = vec!["dead".into()];
    assert_eq!(store.allocate(&request), Ok(vec![0]));
    let history = all_history(&mut *store);
    assert!(
        history.contains(&record("dead", 0, T + 10, T + 20, ReservationKind::Manual)),
        "{history:?}"
    );
}

/// Turns keep a waiter fresh; without a usage check nothing is handed out, and GPUs
/// in use without reservation never are.
pub fn queue_turns_refresh_and_respect_usage(fixture: StoreFixture) {
    let mut store = busy(&fixture, 2);
    let mut request = super::request(run("r", "rita"), Selection::Count(2), T + 1);
    request.reservation.owner = Some(waiter(1000));
    assert_eq!(join_request(&mut *store, request), waiting(1, &[]));
    release(&mut *store, &[0, 1], T + 2);
    let tick = |unreserved: Option<Vec<u32>>, now| QueueTick {
        entry_id: "r".into(),
        unreserved,
        dead_ids: Vec::new(),
        now,
    };
    assert_eq!(store.queue_step(&tick(None, T + 3)), Ok(waiting(1, &[])));
    assert_eq!(
        store.queue_step(&tick(Some(vec![1]), T + 4)),
        Ok(waiting(1, &[0]))
    );
    // Far past the staleness of the entry and of run reservations, but refreshed.
    let mut now = T + 4;
    for _ in 0..10 {
        now += queue::WAITER_STALE_AFTER_SECS - 5;
        assert_eq!(store.queue_step(&tick(None, now)), Ok(waiting(1, &[0])));
    }
    match &store.slots().unwrap()[0] {
        GpuSlot::Held(reservation) => {
            assert_eq!(reservation.kind, ReservationKind::Run);
            assert_eq!(reservation.last_heartbeat, Some(now));
            assert!(reservation.liveness(now, &[]).is_active());
        }
        other => panic!("GPU 0 should be collected, not {other:?}"),
    }
    assert_eq!(
        store.queue_step(&tick(Some(vec![]), now + 1)),
        Ok(QueueStep::Served(vec![0, 1]))
    );
    assert_eq!(
        store.heartbeat("r", &[0, 1], now + 2).unwrap(),
        vec![0, 1],
        "served as a run reservation"
    );
}

pub fn queue_init_force_empties_the_queue(fixture: StoreFixture) {
    let mut store = busy(&fixture, 1);
    assert_eq!(
        join(&mut *store, "w", Selection::Count(1), T + 1),
        waiting(1, &[])
    );
    store.init_pool(2, ProviderKind::Fake, true, T + 2).unwrap();
    assert_eq!(queued(&mut *store), vec![]);
    assert_eq!(step(&mut *store, "w", T + 3), Err(queue::entry_gone()));
}

/// Wake-ups of one entry, counted: what `Store::watch_entry` calls.
fn watch(store: &mut dyn Store, entry: &str) -> Receiver<()> {
    let (woken, wakes) = mpsc::channel();
    let woken = Mutex::new(woken);
    store
        .watch_entry(
            entry,
            Arc::new(move || {
                let _ = woken.lock().unwrap().send(());
            }),
        )
        .unwrap();
    wakes
}

/// The head of the queue hears about a release by another connection, at once.
pub fn queue_watchers_hear_about_releases(fixture: StoreFixture) {
    let mut watcher = busy(&fixture, 1);
    let mut other = open(&fixture);
    assert_eq!(
        join(&mut *watcher, "w", Selection::Count(1), T + 1),
        waiting(1, &[])
    );
    let wakes = watch(&mut *watcher, "w");
    assert!(wakes.recv_timeout(Duration::from_millis(150)).is_err());
    let started = Instant::now();
    std::thread::scope(|scope| {
        scope.spawn(|| {
            std::thread::sleep(Duration::from_millis(100));
            release(&mut *other, &[0], T + 2);
        });
        assert!(
            wakes.recv_timeout(Duration::from_secs(3)).is_ok(),
            "no wake-up within 3 s"
        );
    });
    assert!(started.elapsed() < Duration::from_secs(2));
}

/// A turn that changes nothing wakes no other waiter (else waiters would keep waking
/// each other), nor does a heartbeat; the heartbeat is written only when due.
pub fn queue_quiet_turns_wake_nobody(fixture: StoreFixture) {
    let mut store = busy(&fixture, 1);
    let mut other = open(&fixture);
    assert_eq!(
        join(&mut *store, "w", Selection::Count(1), T + 1),
        waiting(1, &[])
    );
    assert_eq!(
        join(&mut *other, "v", Selection::Count(1), T + 1),
        waiting(2, &[])
    );
    let wakes = watch(&mut *other, "v");
    for now in [T + 2, T + 3, T + 5] {
        assert_eq!(step(&mut *store, "w", now), Ok(waiting(1, &[])));
    }
    assert_eq!(step(&mut *store, "w", T + 6), Ok(waiting(1, &[])));
    assert_eq!(store.queue().unwrap()[0].last_heartbeat, T + 6);
    assert_eq!(
        store.queue_beat("v", T + 7).unwrap().position,
        2,
        "a refresh says where the entry stands"
    );
    assert!(wakes.recv_timeout(Duration::from_millis(150)).is_err());
    assert_eq!(store.queue().unwrap()[1].last_heartbeat, T + 7);
}

/// Random pools, holders and queues: one waiter's turn hands out exactly what
/// `queue::distribute` decides on the same state, after dropping the dead entries.
pub fn queue_distribution_matches_the_policy(fixture: StoreFixture) {
    let mut store = open(&fixture);
    let mut rng = Lcg(11);
    for round in 0..120 {
        let now = T + round * 10_000;
        let gpus = 1 + rng.below(6) as u32;
        store
            .init_pool(gpus, ProviderKind::Fake, true, now - 1000)
            .unwrap();
        for gpu in 0..gpus {
            if rng.below(4) == 0 {
                continue;
            }
            let id = format!("h{round}-{gpu}");
            let expiry = now - 100 + rng.below(300) as i64;
            allocate(
                &mut *store,
                manual(&id, "holder", expiry),
                ids(&[gpu]),
                now - 900,
            )
            .unwrap();
        }
        // Waiters join (collecting what they can), then some holders release.
        let waiters = 1 + rng.below(4);
        let mut dead_ids = Vec::new();
        for w in 0..waiters {
            let id = format!("w{round}-{w}");
            let selection = if rng.below(2) == 0 {
                Selection::Count(1 + rng.below(gpus as u64) as u32)
            } else {
                let mut wanted: Vec<u32> = (0..gpus).filter(|_| rng.below(2) == 0).collect();
                if wanted.is_empty() {
                    wanted.push(rng.below(gpus as u64) as u32);
                }
                wanted.reverse();
                Selection::Ids(wanted)
            };
            let joined_at = match rng.below(5) {
                0 => now - queue::WAITER_STALE_AFTER_SECS - 5,
                _ => now - 10 + w as i64,
            };
            if rng.below(5) == 0 {
                dead_ids.push(id.clone());
            }
            let request = super::request(manual(&id, &id, now + 500), selection, joined_at);
            store.join_queue(&request, &waiter(1000)).unwrap();
        }
        for gpu in 0..gpus {
            if rng.below(2) == 0 {
                let scope = ReleaseScope::AnyIds { ids: vec![gpu] };
                store.release(&scope, now - rng.below(50) as i64).unwrap();
            }
        }
        let unreserved: Vec<u32> = (0..gpus).filter(|_| rng.below(5) == 0).collect();

        let mut slots = store.slots().unwrap();
        let entries = store.queue().unwrap();
        let (live, gone): (Vec<QueueEntry>, Vec<QueueEntry>) = entries
            .into_iter()
            .partition(|entry| entry.is_alive(now, &dead_ids));
        for entry in &gone {
            for &gpu in &entry.collected {
                slots[gpu as usize] = GpuSlot::Free {
                    last_released: Some(now),
                };
            }
        }
        let grants = queue::distribute(
            &slots,
            &live,
            &DistributionInput {
                unreserved: &unreserved,
                dead_ids: &dead_ids,
                last_used: &HashMap::new(),
                now,
            },
        );
        let mut expected: Vec<(String, Vec<u32>)> = live
            .iter()
            .map(|entry| (entry.id.clone(), entry.collected.clone()))
            .collect();
        for grant in &grants {
            expected[grant.entry].1.push(grant.gpu_id);
            expected[grant.entry].1.sort_unstable();
        }

        let Some(stepper) = live.get(rng.below(live.len().max(1) as u64) as usize) else {
            continue;
        };
        let position = live.iter().position(|e| e.id == stepper.id).unwrap();
        let result = store.queue_step(&QueueTick {
            entry_id: stepper.id.clone(),
            unreserved: Some(unreserved.clone()),
            dead_ids: dead_ids.clone(),
            now,
        });
        let mine = expected[position].1.clone();
        if mine.len() == stepper.selection.len() as usize {
            assert_eq!(result, Ok(QueueStep::Served(mine)), "round {round}");
            expected.remove(position);
        } else {
            assert_eq!(
                result,
                Ok(waiting(position as u32 + 1, &mine)),
                "round {round}"
            );
        }
        assert_eq!(queued(&mut *store), expected, "round {round}: {slots:?}");
    }
}
