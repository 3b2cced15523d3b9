//! The contract of `canhazgpu::store::Store`, checked against every backend.
//!
//! Every case in [`cases`] runs once per backend (`support::backend_matrix!`) on a new,
//! empty store from `support::store_fixture`.
//!
//! The cases use only the `Store` trait and compare with `alloc::plan` and
//! `Reservation::liveness`, which define the semantics every backend must have.

use crate::support::{backend_matrix, store_fixture};

pub use crate::support::StoreFixture;

backend_matrix! {
    init_creates_the_pool => |backend| cases::init_creates_the_pool(store_fixture(backend)),
    init_refuses_an_initialized_pool => |backend| cases::init_refuses_an_initialized_pool(store_fixture(backend)),
    init_force_ends_reservations_with_history => |backend| cases::init_force_ends_reservations_with_history(store_fixture(backend)),
    allocation_prefers_mru_then_never_used_then_lru => |backend| cases::allocation_prefers_mru_then_never_used_then_lru(store_fixture(backend)),
    not_enough_counts_free_and_unreserved => |backend| cases::not_enough_counts_free_and_unreserved(store_fixture(backend)),
    invalid_selections_are_usage_errors => |backend| cases::invalid_selections_are_usage_errors(store_fixture(backend)),
    specific_ids_are_all_or_nothing => |backend| cases::specific_ids_are_all_or_nothing(store_fixture(backend)),
    expired_manual_is_freed_with_one_history_record => |backend| cases::expired_manual_is_freed_with_one_history_record(store_fixture(backend)),
    stale_runs_are_freed => |backend| cases::stale_runs_are_freed(store_fixture(backend)),
    dead_run_reservations_are_freed => |backend| cases::dead_run_reservations_are_freed(store_fixture(backend)),
    allocation_only_ends_reservations_it_claims => |backend| cases::allocation_only_ends_reservations_it_claims(store_fixture(backend)),
    release_own_manual_leaves_runs_and_other_users => |backend| cases::release_own_manual_leaves_runs_and_other_users(store_fixture(backend)),
    release_own_ids_only_where_the_user_holds => |backend| cases::release_own_ids_only_where_the_user_holds(store_fixture(backend)),
    release_any_ids_and_by_reservation => |backend| cases::release_any_ids_and_by_reservation(store_fixture(backend)),
    release_of_expired_manual_ends_at_expiry => |backend| cases::release_of_expired_manual_ends_at_expiry(store_fixture(backend)),
    heartbeat_keeps_run_alive_and_reports_held_gpus => |backend| cases::heartbeat_keeps_run_alive_and_reports_held_gpus(store_fixture(backend)),
    reassert_puts_back_a_lost_run_reservation => |backend| cases::reassert_puts_back_a_lost_run_reservation(store_fixture(backend)),
    reassert_recreates_a_lost_pool => |backend| cases::reassert_recreates_a_lost_pool(store_fixture(backend)),
    history_window_selects_overlapping_records => |backend| cases::history_window_selects_overlapping_records(store_fixture(backend)),
    identical_short_reservations_are_each_recorded => |backend| cases::identical_short_reservations_are_each_recorded(store_fixture(backend)),
    concurrent_allocations_never_share_a_gpu => |backend| cases::concurrent_allocations_never_share_a_gpu(store_fixture(backend)),
    allocation_matches_the_placement_policy => |backend| cases::allocation_matches_the_placement_policy(store_fixture(backend)),
    usage_summary_matches_the_clipped_history => |backend| cases::usage_summary_matches_the_clipped_history(store_fixture(backend)),
    history_is_pruned_in_bounded_batches => |backend| cases::history_is_pruned_in_bounded_batches(store_fixture(backend)),
    concurrent_endings_record_a_reservation_once => |backend| cases::concurrent_endings_record_a_reservation_once(store_fixture(backend)),
    queue_join_is_served_at_once_when_gpus_are_free => |backend| cases::queue_join_is_served_at_once_when_gpus_are_free(store_fixture(backend)),
    queue_serves_waiters_in_order => |backend| cases::queue_serves_waiters_in_order(store_fixture(backend)),
    queue_large_request_collects_until_served => |backend| cases::queue_large_request_collects_until_served(store_fixture(backend)),
    queue_newcomers_get_only_what_waiters_cannot_use => |backend| cases::queue_newcomers_get_only_what_waiters_cannot_use(store_fixture(backend)),
    queue_leaving_releases_what_was_collected => |backend| cases::queue_leaving_releases_what_was_collected(store_fixture(backend)),
    queue_dead_and_silent_waiters_are_dropped => |backend| cases::queue_dead_and_silent_waiters_are_dropped(store_fixture(backend)),
    queue_dead_waiter_collection_ends_at_its_last_sign_of_life => |backend| cases::queue_dead_waiter_collection_ends_at_its_last_sign_of_life(store_fixture(backend)),
    queue_turns_refresh_and_respect_usage => |backend| cases::queue_turns_refresh_and_respect_usage(store_fixture(backend)),
    queue_init_force_empties_the_queue => |backend| cases::queue_init_force_empties_the_queue(store_fixture(backend)),
    queue_watchers_hear_about_releases => |backend| cases::queue_watchers_hear_about_releases(store_fixture(backend)),
    queue_quiet_turns_wake_nobody => |backend| cases::queue_quiet_turns_wake_nobody(store_fixture(backend)),
    queue_distribution_matches_the_policy => |backend| cases::queue_distribution_matches_the_policy(store_fixture(backend)),
}

pub mod cases {
    mod queue;
    pub use queue::*;

    use std::collections::{BTreeSet, HashMap};
    use std::sync::Barrier;

    use canhazgpu::alloc::{PlanInput, plan, validate_selection};
    use canhazgpu::error::{Error, Holder};
    use canhazgpu::report::{Window, tally};
    use canhazgpu::state::{
        GpuSlot, Pool, ProviderKind, ReservationKind, RunOwner, Selection, UnixTime, UsageRecord,
    };
    use canhazgpu::store::{
        AllocRequest, HISTORY_PRUNE_BATCH, InitOutcome, NewReservation, ReassertRequest,
        Reasserted, ReleaseScope, Store,
    };

    use super::StoreFixture;

    const T: UnixTime = 1_700_000_000;

    fn open(fixture: &StoreFixture) -> Box<dyn Store> {
        (fixture.open)()
    }

    fn initialized(fixture: &StoreFixture, gpus: u32) -> Box<dyn Store> {
        let mut store = open(fixture);
        store.init_pool(gpus, ProviderKind::Fake, false, T).unwrap();
        store
    }

    pub(crate) fn manual(id: &str, user: &str, expiry: UnixTime) -> NewReservation {
        NewReservation {
            id: id.into(),
            user: user.into(),
            actual_user: user.into(),
            kind: ReservationKind::Manual,
            expiry_time: Some(expiry),
            note: None,
            owner: None,
            adopted: None,
        }
    }

    /// A run reservation supervised by a local process.
    fn run(id: &str, user: &str) -> NewReservation {
        NewReservation {
            kind: ReservationKind::Run,
            expiry_time: None,
            owner: Some(RunOwner {
                host: "testhost".into(),
                pid: 4242,
                pid_start: 987_654,
            }),
            ..manual(id, user, 0)
        }
    }

    /// A run reservation without owner fields, as upstream canhazgpu writes them.
    fn legacy_run(id: &str, user: &str) -> NewReservation {
        NewReservation {
            owner: None,
            ..run(id, user)
        }
    }

    pub(crate) fn request(
        reservation: NewReservation,
        selection: Selection,
        now: UnixTime,
    ) -> AllocRequest {
        AllocRequest {
            reservation,
            selection,
            unreserved: Vec::new(),
            dead_ids: Vec::new(),
            now,
            force: None,
            policy: Default::default(),
        }
    }

    fn allocate(
        store: &mut dyn Store,
        reservation: NewReservation,
        selection: Selection,
        now: UnixTime,
    ) -> Result<Vec<u32>, Error> {
        store.allocate(&request(reservation, selection, now))
    }

    fn ids(ids: &[u32]) -> Selection {
        Selection::Ids(ids.to_vec())
    }

    /// Who holds each GPU: the reservation's user, "" for free, "?" for corrupt.
    fn holders(store: &mut dyn Store) -> Vec<String> {
        store
            .slots()
            .unwrap()
            .iter()
            .map(|slot| match slot {
                GpuSlot::Held(reservation) => reservation.user.clone(),
                GpuSlot::Free { .. } => String::new(),
                GpuSlot::Corrupt(_) => "?".into(),
            })
            .collect()
    }

    fn all_history(store: &mut dyn Store) -> Vec<UsageRecord> {
        let mut records = store.history(0, UnixTime::MAX).unwrap();
        records.sort_by_key(|record| (record.end_time, record.gpu_id));
        records
    }

    pub(crate) fn record(
        user: &str,
        gpu_id: u32,
        start_time: UnixTime,
        end_time: UnixTime,
        kind: ReservationKind,
    ) -> UsageRecord {
        UsageRecord {
            user: user.into(),
            actual_user: user.into(),
            gpu_id,
            start_time,
            end_time,
            kind,
            utilization: Default::default(),
        }
    }

    pub fn init_creates_the_pool(fixture: StoreFixture) {
        let mut store = open(&fixture);
        assert_eq!(store.pool().unwrap(), None);
        assert_eq!(store.slots(), Err(Error::NotInitialized));
        let err = allocate(
            &mut *store,
            manual("m", "alice", T + 60),
            Selection::Count(1),
            T,
        );
        assert_eq!(err, Err(Error::NotInitialized));
        let scope = ReleaseScope::OwnManual {
            actual_user: "alice".into(),
        };
        assert_eq!(store.release(&scope, T), Err(Error::NotInitialized));

        let outcome = store.init_pool(4, ProviderKind::Fake, false, T).unwrap();
        assert_eq!(
            outcome,
            InitOutcome {
                previous_count: None,
                cleared: 0
            }
        );
        let expected = Pool {
            gpu_count: 4,
            provider: ProviderKind::Fake,
        };
        assert_eq!(store.pool().unwrap(), Some(expected));
        assert_eq!(open(&fixture).pool().unwrap(), Some(expected));
        assert_eq!(
            store.slots().unwrap(),
            vec![
                GpuSlot::Free {
                    last_released: None
                };
                4
            ]
        );
    }

    pub fn init_refuses_an_initialized_pool(fixture: StoreFixture) {
        let mut store = initialized(&fixture, 4);
        let err = store
            .init_pool(2, ProviderKind::Nvidia, false, T)
            .unwrap_err();
        assert_eq!(err, Error::AlreadyInitialized(4));
        assert_eq!(
            err.to_string(),
            "GPU pool already initialized with 4 GPUs. Use --force to reinitialize"
        );
        assert_eq!(err.exit_code(), canhazgpu::error::exit::USAGE);
        assert_eq!(
            store.pool().unwrap(),
            Some(Pool {
                gpu_count: 4,
                provider: ProviderKind::Fake
            })
        );
    }

    pub fn init_force_ends_reservations_with_history(fixture: StoreFixture) {
        let mut store = initialized(&fixture, 4);
        allocate(&mut *store, manual("m", "alice", T + 3600), ids(&[0, 1]), T).unwrap();
        allocate(&mut *store, run("r", "bob"), Selection::Count(1), T + 50).unwrap();
        allocate(&mut *store, manual("m2", "carol", T + 10), ids(&[3]), T).unwrap();

        let outcome = store
            .init_pool(2, ProviderKind::Nvidia, true, T + 100)
            .unwrap();
        assert_eq!(
            outcome,
            InitOutcome {
                previous_count: Some(4),
                cleared: 4
            }
        );
        assert_eq!(
            store.pool().unwrap(),
            Some(Pool {
                gpu_count: 2,
                provider: ProviderKind::Nvidia
            })
        );
        assert_eq!(
            store.slots().unwrap(),
            vec![
                GpuSlot::Free {
                    last_released: None
                };
                2
            ]
        );
        // Carol's reservation had expired at T + 10, so it ended then.
        assert_eq!(
            all_history(&mut *store),
            vec![
                record("carol", 3, T, T + 10, ReservationKind::Manual),
                record("alice", 0, T, T + 100, ReservationKind::Manual),
                record("alice", 1, T, T + 100, ReservationKind::Manual),
                record("bob", 2, T + 50, T + 100, ReservationKind::Run),
            ]
        );

        // Growing again leaves no trace of the old GPUs 2 and 3.
        store
            .init_pool(4, ProviderKind::Fake, true, T + 200)
            .unwrap();
        assert_eq!(
            store.slots().unwrap(),
            vec![
                GpuSlot::Free {
                    last_released: None
                };
                4
            ]
        );
    }

    pub fn allocation_prefers_mru_then_never_used_then_lru(fixture: StoreFixture) {
        let mut store = initialized(&fixture, 5);
        allocate(
            &mut *store,
            manual("b", "bob", T + 9999),
            ids(&[0, 1, 2]),
            T,
        )
        .unwrap();
        for (gpu, at) in [(1, T + 10), (0, T + 20), (2, T + 30)] {
            let scope = ReleaseScope::OwnIds {
                actual_user: "bob".into(),
                ids: vec![gpu],
            };
            assert_eq!(store.release(&scope, at).unwrap().freed, vec![gpu]);
        }

        // Never-used GPUs first (ties by ID), then the least recently released.
        let mut alice = |gpus: u32, now: UnixTime| {
            allocate(
                &mut *store,
                manual("a", "alice", T + 9999),
                Selection::Count(gpus),
                now,
            )
        };
        assert_eq!(alice(1, T + 100).unwrap(), vec![3]);
        assert_eq!(alice(1, T + 101).unwrap(), vec![4]);
        assert_eq!(alice(1, T + 102).unwrap(), vec![1]);
        for (gpu, at) in [(4, T + 200), (3, T + 210), (1, T + 220)] {
            let scope = ReleaseScope::OwnIds {
                actual_user: "alice".into(),
                ids: vec![gpu],
            };
            store.release(&scope, at).unwrap();
        }

        // Alice gets the GPUs she used most recently; Carol, who used none, the least
        // recently released ones.
        let mine = allocate(
            &mut *store,
            manual("a2", "alice", T + 9999),
            Selection::Count(2),
            T + 300,
        );
        assert_eq!(mine.unwrap(), vec![1, 3]);
        let carol = allocate(
            &mut *store,
            manual("c", "carol", T + 9999),
            Selection::Count(2),
            T + 300,
        );
        assert_eq!(carol.unwrap(), vec![0, 2]);
        assert_eq!(
            holders(&mut *store),
            ["carol", "alice", "carol", "alice", ""]
        );
    }

    pub fn not_enough_counts_free_and_unreserved(fixture: StoreFixture) {
        let mut store = initialized(&fixture, 4);
        allocate(&mut *store, manual("b", "bob", T + 9999), ids(&[0]), T).unwrap();
        // GPU 0 is held, so its unreserved use is not counted again.
        let mut wanted = request(manual("a", "alice", T + 9999), Selection::Count(3), T);
        wanted.unreserved = vec![0, 1];
        assert_eq!(
            store.allocate(&wanted),
            Err(Error::NotEnough {
                requested: 3,
                available: 2,
                unreserved: 1
            })
        );
        wanted.selection = Selection::Count(2);
        assert_eq!(store.allocate(&wanted).unwrap(), vec![2, 3]);
    }

    pub fn invalid_selections_are_usage_errors(fixture: StoreFixture) {
        let mut store = initialized(&fixture, 4);
        let err = allocate(&mut *store, manual("a", "alice", T + 60), ids(&[0, 9]), T);
        assert_eq!(
            err,
            Err(Error::Usage("GPU ID 9 is out of range (0-3)".into()))
        );
        for selection in [
            Selection::Count(0),
            Selection::Count(5),
            ids(&[]),
            ids(&[1, 2, 1]),
        ] {
            let expected = validate_selection(&selection, 4).unwrap_err();
            assert!(matches!(expected, Error::Usage(_)));
            let err = allocate(&mut *store, manual("a", "alice", T + 60), selection, T);
            assert_eq!(err, Err(expected));
        }
        let scope = ReleaseScope::AnyIds { ids: vec![4] };
        assert_eq!(
            store.release(&scope, T),
            Err(Error::Usage("GPU ID 4 is out of range (0-3)".into()))
        );
        assert_eq!(holders(&mut *store), ["", "", "", ""]);
    }

    pub fn specific_ids_are_all_or_nothing(fixture: StoreFixture) {
        let mut store = initialized(&fixture, 4);
        allocate(&mut *store, manual("b", "bob", T + 9999), ids(&[1]), T).unwrap();
        let err = allocate(&mut *store, manual("a", "alice", T + 60), ids(&[0, 1]), T);
        assert_eq!(
            err,
            Err(Error::GpuTaken {
                gpu: 1,
                holder: Holder::User("bob".into())
            })
        );
        assert_eq!(
            err.unwrap_err().to_string(),
            "GPU 1 is already reserved by user 'bob'"
        );
        let mut wanted = request(manual("a", "alice", T + 60), ids(&[2, 0]), T);
        wanted.unreserved = vec![0];
        assert_eq!(
            store.allocate(&wanted),
            Err(Error::GpuTaken {
                gpu: 0,
                holder: Holder::Unreserved
            })
        );
        assert_eq!(
            store.allocate(&wanted).unwrap_err().to_string(),
            "GPU 0 is in use without reservation"
        );
        assert_eq!(holders(&mut *store), ["", "bob", "", ""]);
        let claimed = allocate(&mut *store, manual("a", "alice", T + 60), ids(&[3, 0]), T);
        assert_eq!(claimed.unwrap(), vec![0, 3]);
        assert_eq!(holders(&mut *store), ["alice", "bob", "", "alice"]);
    }

    pub fn expired_manual_is_freed_with_one_history_record(fixture: StoreFixture) {
        let mut store = initialized(&fixture, 1);
        allocate(&mut *store, manual("b", "bob", T + 50), ids(&[0]), T).unwrap();
        let early = allocate(
            &mut *store,
            manual("a", "alice", T + 999),
            Selection::Count(1),
            T + 49,
        );
        assert_eq!(
            early,
            Err(Error::NotEnough {
                requested: 1,
                available: 0,
                unreserved: 0
            })
        );
        let early = allocate(
            &mut *store,
            manual("a", "alice", T + 999),
            ids(&[0]),
            T + 49,
        );
        assert!(matches!(early, Err(Error::GpuTaken { gpu: 0, .. })));

        let claimed = allocate(
            &mut *store,
            manual("a", "alice", T + 999),
            Selection::Count(1),
            T + 50,
        );
        assert_eq!(claimed.unwrap(), vec![0]);
        assert_eq!(
            all_history(&mut *store),
            vec![record("bob", 0, T, T + 50, ReservationKind::Manual)]
        );
        assert_eq!(holders(&mut *store), ["alice"]);
    }

    pub fn stale_runs_are_freed(fixture: StoreFixture) {
        let mut store = initialized(&fixture, 2);
        allocate(&mut *store, run("r-bob", "bob"), ids(&[0]), T).unwrap();
        allocate(&mut *store, legacy_run("r-dave", "dave"), ids(&[1]), T).unwrap();
        assert_eq!(store.heartbeat("r-bob", &[0], T + 30).unwrap(), vec![0]);

        let mut carol = |now: UnixTime| {
            allocate(
                &mut *store,
                manual("c", "carol", T + 9999),
                Selection::Count(1),
                now,
            )
        };
        // Supervised runs go stale 60 s after their last heartbeat...
        assert!(matches!(carol(T + 90), Err(Error::NotEnough { .. })));
        assert_eq!(carol(T + 91).unwrap(), vec![0]);
        // ...runs without owner fields (upstream's) after 300 s.
        assert!(matches!(carol(T + 300), Err(Error::NotEnough { .. })));
        assert_eq!(carol(T + 301).unwrap(), vec![1]);
        assert_eq!(
            all_history(&mut *store),
            vec![
                record("dave", 1, T, T, ReservationKind::Run),
                record("bob", 0, T, T + 30, ReservationKind::Run),
            ]
        );
    }

    pub fn dead_run_reservations_are_freed(fixture: StoreFixture) {
        let mut store = initialized(&fixture, 2);
        allocate(&mut *store, run("r-bob", "bob"), ids(&[0]), T).unwrap();
        allocate(&mut *store, run("r-dave", "dave"), ids(&[1]), T).unwrap();
        assert_eq!(store.heartbeat("r-bob", &[0], T + 4).unwrap(), vec![0]);
        let mut wanted = request(manual("c", "carol", T + 999), Selection::Count(2), T + 10);
        wanted.dead_ids = vec!["r-bob".into()];
        assert_eq!(
            store.allocate(&wanted),
            Err(Error::NotEnough {
                requested: 2,
                available: 1,
                unreserved: 0
            })
        );
        wanted.selection = Selection::Count(1);
        assert_eq!(store.allocate(&wanted).unwrap(), vec![0]);
        assert_eq!(
            all_history(&mut *store),
            // Ended at its last sign of life, not when it was noticed.
            vec![record("bob", 0, T, T + 4, ReservationKind::Run)]
        );
        assert_eq!(holders(&mut *store), ["carol", "dave"]);
    }

    pub fn allocation_only_ends_reservations_it_claims(fixture: StoreFixture) {
        let mut store = initialized(&fixture, 2);
        allocate(&mut *store, manual("b", "bob", T + 10), ids(&[0]), T).unwrap();
        // GPU 1 was never used, so it wins over GPU 0, free since T + 10.
        let claimed = allocate(
            &mut *store,
            manual("c", "carol", T + 99),
            Selection::Count(1),
            T + 20,
        );
        assert_eq!(claimed.unwrap(), vec![1]);
        assert_eq!(holders(&mut *store), ["bob", "carol"]);
        assert_eq!(all_history(&mut *store), vec![]);
    }

    pub fn release_own_manual_leaves_runs_and_other_users(fixture: StoreFixture) {
        let mut store = initialized(&fixture, 4);
        allocate(&mut *store, manual("m", "alice", T + 999), ids(&[0]), T).unwrap();
        allocate(&mut *store, run("r", "alice"), ids(&[1]), T).unwrap();
        allocate(&mut *store, manual("b", "bob", T + 999), ids(&[2]), T).unwrap();
        let display_name = NewReservation {
            user: "svc".into(),
            ..manual("s", "alice", T + 999)
        };
        allocate(&mut *store, display_name, ids(&[3]), T).unwrap();

        let mine = |user: &str| ReleaseScope::OwnManual {
            actual_user: user.into(),
        };
        assert_eq!(
            store.release(&mine("svc"), T + 10).unwrap().freed,
            Vec::<u32>::new()
        );
        assert_eq!(
            store.release(&mine("alice"), T + 10).unwrap().freed,
            vec![0, 3]
        );
        assert_eq!(
            store.release(&mine("alice"), T + 11).unwrap().freed,
            Vec::<u32>::new()
        );
        let slots = store.slots().unwrap();
        assert_eq!(
            slots[0],
            GpuSlot::Free {
                last_released: Some(T + 10)
            }
        );
        assert_eq!(
            slots[3],
            GpuSlot::Free {
                last_released: Some(T + 10)
            }
        );
        assert_eq!(holders(&mut *store), ["", "alice", "bob", ""]);
        let history = all_history(&mut *store);
        assert_eq!(
            history,
            vec![
                record("alice", 0, T, T + 10, ReservationKind::Manual),
                UsageRecord {
                    user: "svc".into(),
                    ..record("alice", 3, T, T + 10, ReservationKind::Manual)
                },
            ]
        );
    }

    pub fn release_own_ids_only_where_the_user_holds(fixture: StoreFixture) {
        let mut store = initialized(&fixture, 3);
        allocate(&mut *store, manual("m", "alice", T + 999), ids(&[0]), T).unwrap();
        allocate(&mut *store, run("r", "alice"), ids(&[1]), T).unwrap();
        allocate(&mut *store, manual("b", "bob", T + 999), ids(&[2]), T).unwrap();
        let scope = |ids: &[u32]| ReleaseScope::OwnIds {
            actual_user: "alice".into(),
            ids: ids.to_vec(),
        };
        assert_eq!(
            store.release(&scope(&[1, 2]), T + 5).unwrap().freed,
            vec![1]
        );
        assert_eq!(holders(&mut *store), ["alice", "", "bob"]);
        assert!(matches!(
            store.release(&scope(&[0, 9]), T + 5),
            Err(Error::Usage(_))
        ));
        assert_eq!(holders(&mut *store), ["alice", "", "bob"]);
        assert_eq!(
            all_history(&mut *store),
            vec![record("alice", 1, T, T + 5, ReservationKind::Run)]
        );
    }

    pub fn release_any_ids_and_by_reservation(fixture: StoreFixture) {
        let mut store = initialized(&fixture, 4);
        allocate(&mut *store, run("r1", "alice"), ids(&[0, 1]), T).unwrap();
        allocate(&mut *store, manual("m2", "bob", T + 999), ids(&[2]), T).unwrap();
        allocate(&mut *store, manual("", "carol", T + 999), ids(&[3]), T).unwrap();

        let any = ReleaseScope::AnyIds { ids: vec![2, 1] };
        assert_eq!(store.release(&any, T + 5).unwrap().freed, vec![1, 2]);
        let reservation = |id: &str| ReleaseScope::Reservation { id: id.into() };
        // An empty ID (upstream reservations have none) names no reservation.
        assert_eq!(
            store.release(&reservation(""), T + 6).unwrap().freed,
            Vec::<u32>::new()
        );
        assert_eq!(
            store.release(&reservation("r1"), T + 6).unwrap().freed,
            vec![0]
        );
        assert_eq!(
            store.release(&reservation("r1"), T + 7).unwrap().freed,
            Vec::<u32>::new()
        );
        assert_eq!(holders(&mut *store), ["", "", "", "carol"]);
        assert_eq!(all_history(&mut *store).len(), 3);
    }

    pub fn release_of_expired_manual_ends_at_expiry(fixture: StoreFixture) {
        let mut store = initialized(&fixture, 1);
        allocate(&mut *store, manual("b", "bob", T + 50), ids(&[0]), T).unwrap();
        let scope = ReleaseScope::OwnManual {
            actual_user: "bob".into(),
        };
        assert_eq!(store.release(&scope, T + 100).unwrap().freed, vec![0]);
        assert_eq!(
            all_history(&mut *store),
            vec![record("bob", 0, T, T + 50, ReservationKind::Manual)]
        );
        assert_eq!(
            store.slots().unwrap(),
            vec![GpuSlot::Free {
                last_released: Some(T + 100)
            }]
        );
    }

    pub fn heartbeat_keeps_run_alive_and_reports_held_gpus(fixture: StoreFixture) {
        let mut store = initialized(&fixture, 3);
        allocate(&mut *store, run("r1", "alice"), ids(&[0, 1]), T).unwrap();
        allocate(&mut *store, manual("m2", "bob", T + 999), ids(&[2]), T).unwrap();
        assert_eq!(store.heartbeat("r1", &[0, 1], T + 50).unwrap(), vec![0, 1]);
        match &store.slots().unwrap()[0] {
            GpuSlot::Held(reservation) => {
                assert_eq!(reservation.last_heartbeat, Some(T + 50));
                assert_eq!(reservation.start_time, T);
                assert_eq!(reservation.id, "r1");
            }
            other => panic!("GPU 0 should be held, not {other:?}"),
        }
        let taken = allocate(
            &mut *store,
            manual("c", "carol", T + 999),
            Selection::Count(1),
            T + 100,
        );
        assert!(matches!(taken, Err(Error::NotEnough { .. })));

        store
            .release(&ReleaseScope::AnyIds { ids: vec![1] }, T + 100)
            .unwrap();
        assert_eq!(store.heartbeat("r1", &[0, 1], T + 101).unwrap(), vec![0]);
        assert_eq!(
            store.heartbeat("m2", &[2], T + 101).unwrap(),
            Vec::<u32>::new()
        );
        assert_eq!(
            store.heartbeat("r-other", &[0], T + 101).unwrap(),
            Vec::<u32>::new()
        );
    }

    fn reassert_request(pool: Pool, gpus: &[u32], now: UnixTime) -> ReassertRequest {
        ReassertRequest {
            pool,
            reservation: run("r1", "alice"),
            start_time: T,
            gpus: gpus.to_vec(),
            now,
        }
    }

    pub fn reassert_puts_back_a_lost_run_reservation(fixture: StoreFixture) {
        let mut store = initialized(&fixture, 4);
        let pool = store.pool().unwrap().unwrap();
        allocate(&mut *store, run("r1", "alice"), ids(&[0, 1, 2]), T).unwrap();
        // Lost meanwhile: GPU 1 to a live reservation of bob's, GPU 2 to one of
        // carol's that has expired since.
        store
            .release(&ReleaseScope::AnyIds { ids: vec![1, 2] }, T + 10)
            .unwrap();
        allocate(&mut *store, manual("b", "bob", T + 999), ids(&[1]), T + 10).unwrap();
        allocate(&mut *store, manual("c", "carol", T + 20), ids(&[2]), T + 10).unwrap();

        let outcome = store
            .reassert(&reassert_request(pool, &[0, 1, 2, 9], T + 30))
            .unwrap();
        assert_eq!(
            outcome,
            Reasserted {
                held: vec![0, 2],
                taken: vec![(1, "bob".into())],
            }
        );
        assert_eq!(holders(&mut *store), vec!["alice", "bob", "alice", ""]);
        for id in [0, 2] {
            match &store.slots().unwrap()[id] {
                GpuSlot::Held(reservation) => {
                    assert_eq!(reservation.id, "r1");
                    assert_eq!(reservation.start_time, T, "the original start is kept");
                    assert_eq!(reservation.last_heartbeat, Some(T + 30));
                    assert!(reservation.owner.is_some());
                }
                other => panic!("GPU {id} should be held, not {other:?}"),
            }
        }
        let carol = record("carol", 2, T + 10, T + 20, ReservationKind::Manual);
        assert!(
            all_history(&mut *store).contains(&carol),
            "carol's reservation ended"
        );
        assert_eq!(store.heartbeat("r1", &[0, 2], T + 40).unwrap(), vec![0, 2]);
    }

    pub fn reassert_recreates_a_lost_pool(fixture: StoreFixture) {
        let mut store = open(&fixture);
        let pool = Pool {
            gpu_count: 4,
            provider: ProviderKind::Fake,
        };
        let outcome = store
            .reassert(&reassert_request(pool, &[3, 1], T + 5))
            .unwrap();
        assert_eq!(outcome.held, vec![1, 3]);
        assert!(outcome.taken.is_empty());
        assert_eq!(store.pool().unwrap(), Some(pool));
        assert_eq!(holders(&mut *store), vec!["", "alice", "", "alice"]);
        let released = store
            .release(&ReleaseScope::Reservation { id: "r1".into() }, T + 50)
            .unwrap();
        assert_eq!(released.freed, vec![1, 3]);
        assert!(all_history(&mut *store).contains(&record(
            "alice",
            3,
            T,
            T + 50,
            ReservationKind::Run
        )));
    }

    /// Two runs on one GPU that start and end in the same second are two records.
    pub fn identical_short_reservations_are_each_recorded(fixture: StoreFixture) {
        let mut store = initialized(&fixture, 1);
        for id in ["first", "second"] {
            allocate(&mut *store, run(id, "alice"), ids(&[0]), T).unwrap();
            let scope = ReleaseScope::Reservation { id: id.into() };
            assert_eq!(store.release(&scope, T).unwrap().freed, vec![0]);
        }
        assert_eq!(all_history(&mut *store).len(), 2);
    }

    pub fn history_window_selects_overlapping_records(fixture: StoreFixture) {
        let mut store = initialized(&fixture, 3);
        for (gpu, start) in [(0, T), (1, T + 200), (2, T + 400)] {
            allocate(
                &mut *store,
                manual("m", "alice", T + 9999),
                ids(&[gpu]),
                start,
            )
            .unwrap();
            let scope = ReleaseScope::AnyIds { ids: vec![gpu] };
            store.release(&scope, start + 100).unwrap();
        }
        let mut window = |from: UnixTime, to: UnixTime| {
            let gpus: BTreeSet<u32> = store
                .history(from, to)
                .unwrap()
                .iter()
                .map(|record| record.gpu_id)
                .collect();
            gpus.into_iter().collect::<Vec<_>>()
        };
        assert_eq!(window(T + 100, T + 200), vec![0, 1]);
        assert_eq!(window(T + 101, T + 199), Vec::<u32>::new());
        assert_eq!(window(T + 150, T + 450), vec![1, 2]);
        assert_eq!(window(T, T + 1000), vec![0, 1, 2]);
    }

    pub fn concurrent_allocations_never_share_a_gpu(fixture: StoreFixture) {
        const CLIENTS: usize = 32;
        initialized(&fixture, 8);
        let barrier = Barrier::new(CLIENTS);
        let results: Vec<(String, Result<Vec<u32>, Error>)> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..CLIENTS)
                .map(|client| {
                    let (barrier, open) = (&barrier, &fixture.open);
                    scope.spawn(move || {
                        let mut store = open();
                        let id = format!("r{client}");
                        let reservation = run(&id, &format!("user{client}"));
                        barrier.wait();
                        let result = allocate(&mut *store, reservation, Selection::Count(1), T + 1);
                        (id, result)
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).collect()
        });

        let mut claimed = HashMap::new();
        for (id, result) in results {
            match result {
                Ok(gpus) => {
                    assert_eq!(gpus.len(), 1);
                    assert!(
                        claimed.insert(gpus[0], id).is_none(),
                        "GPU handed out twice"
                    );
                }
                Err(err) => assert_eq!(
                    err,
                    Error::NotEnough {
                        requested: 1,
                        available: 0,
                        unreserved: 0
                    }
                ),
            }
        }
        assert_eq!(claimed.len(), 8);
        let slots = open(&fixture).slots().unwrap();
        for (gpu, slot) in slots.iter().enumerate() {
            match slot {
                GpuSlot::Held(reservation) => assert_eq!(reservation.id, claimed[&(gpu as u32)]),
                other => panic!("GPU {gpu} should be held, not {other:?}"),
            }
        }
    }

    /// A small deterministic generator (64-bit LCG), so failures reproduce.
    struct Lcg(u64);

    impl Lcg {
        fn below(&mut self, bound: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (self.0 >> 33) % bound
        }
    }

    /// Random pools and requests: the store claims (or refuses) exactly what
    /// `alloc::plan` decides on the same slots, ends exactly the dead reservations on
    /// the claimed GPUs, and changes nothing when it refuses.
    pub fn allocation_matches_the_placement_policy(fixture: StoreFixture) {
        let mut store = open(&fixture);
        let mut rng = Lcg(7);
        let users = ["ann", "ben", "cid"];
        for round in 0..200 {
            let now = T + round * 10_000;
            let gpus = 1 + rng.below(6) as u32;
            store
                .init_pool(gpus, ProviderKind::Fake, true, now)
                .unwrap();
            let mut dead_ids = Vec::new();
            for gpu in 0..gpus {
                let user = users[rng.below(3) as usize];
                let id = format!("r{round}-{gpu}");
                let at = now - 500;
                let reservation = match rng.below(6) {
                    0 => continue,
                    1 => {
                        let released = at + rng.below(400) as i64;
                        allocate(&mut *store, manual(&id, user, now), ids(&[gpu]), at).unwrap();
                        let scope = ReleaseScope::AnyIds { ids: vec![gpu] };
                        store.release(&scope, released).unwrap();
                        continue;
                    }
                    2 => manual(&id, user, now + 100),
                    3 => manual(&id, user, now - rng.below(100) as i64),
                    4 => run(&id, user),
                    _ => {
                        if rng.below(2) == 0 {
                            dead_ids.push(id.clone());
                        }
                        legacy_run(&id, user)
                    }
                };
                let kind = reservation.kind;
                allocate(&mut *store, reservation, ids(&[gpu]), at).unwrap();
                if kind == ReservationKind::Run {
                    let beat = now - rng.below(120) as i64;
                    store.heartbeat(&id, &[gpu], beat).unwrap();
                }
            }
            // Mostly valid requests; now and then one too large or out of range.
            let selection = if rng.below(2) == 0 {
                Selection::Count(1 + rng.below(gpus as u64 + 1) as u32)
            } else {
                let span = gpus as u64 + u64::from(rng.below(5) == 0);
                let mut wanted: Vec<u32> = (0..span as u32).filter(|_| rng.below(2) == 0).collect();
                if wanted.is_empty() {
                    wanted.push(rng.below(span) as u32);
                }
                wanted.reverse();
                Selection::Ids(wanted)
            };
            let unreserved: Vec<u32> = (0..gpus).filter(|_| rng.below(4) == 0).collect();

            let before = store.slots().unwrap();
            let history_before = all_history(&mut *store).len();
            let user_last_used = HashMap::new();
            let requester = format!("newcomer{round}");
            let expected = plan(
                &before,
                &PlanInput {
                    selection: &selection,
                    unreserved: &unreserved,
                    dead_ids: &dead_ids,
                    user_last_used: &user_last_used,
                    requester: &requester,
                    now,
                },
            );
            let mut wanted = request(manual("new", &requester, now + 60), selection, now);
            wanted.unreserved = unreserved;
            wanted.dead_ids = dead_ids;
            let actual = store.allocate(&wanted);
            let history_added = all_history(&mut *store).len() - history_before;
            match expected {
                Ok(plan) => {
                    assert_eq!(actual, Ok(plan.claim), "round {round}: {before:?}");
                    assert_eq!(history_added, plan.ended.len(), "round {round}");
                }
                Err(err) => {
                    assert_eq!(actual, Err(err), "round {round}: {before:?}");
                    assert_eq!(store.slots().unwrap(), before, "round {round}");
                    assert_eq!(history_added, 0, "round {round}");
                }
            }
        }
    }

    /// One finished reservation of `reservation` on `gpu` over `[start, end]`.
    fn finished(
        store: &mut dyn Store,
        reservation: NewReservation,
        gpu: u32,
        start: UnixTime,
        end: UnixTime,
    ) {
        let id = reservation.id.clone();
        let run = reservation.kind == ReservationKind::Run;
        allocate(store, reservation, ids(&[gpu]), start).unwrap();
        if run {
            store.heartbeat(&id, &[gpu], end).unwrap();
        }
        store
            .release(&ReleaseScope::Reservation { id }, end)
            .unwrap();
    }

    pub fn usage_summary_matches_the_clipped_history(fixture: StoreFixture) {
        let mut store = initialized(&fixture, 2);
        let as_service = NewReservation {
            user: "svc".into(),
            ..manual("s", "alice", T + 99_999)
        };
        finished(&mut *store, as_service, 0, T, T + 3600);
        finished(&mut *store, legacy_run("r", "alice"), 1, T + 100, T + 400);
        finished(
            &mut *store,
            manual("b", "bob", T + 99_999),
            0,
            T + 4000,
            T + 4100,
        );
        finished(
            &mut *store,
            manual("c", "carol", T + 99_999),
            1,
            T + 5000,
            T + 5000,
        );

        for (from, to) in [
            (0, UnixTime::MAX / 2),
            (T + 1800, T + 4050),
            (T + 4100, T + 4100),
            (T + 6000, T + 7000),
        ] {
            let window = Window { from, to };
            let expected = tally(&store.history(from, to).unwrap(), window);
            assert_eq!(
                store.usage_summary(from, to).unwrap(),
                expected,
                "[{from}, {to}]"
            );
        }
        let summary = store.usage_summary(T + 1800, T + 4050).unwrap();
        let figures: Vec<(&str, i64, u64, u64)> = summary
            .iter()
            .map(|u| (u.user.as_str(), u.seconds, u.run_count, u.manual_count))
            .collect();
        assert_eq!(figures, [("alice", 1800, 0, 1), ("bob", 50, 0, 1)]);
    }

    pub fn history_is_pruned_in_bounded_batches(fixture: StoreFixture) {
        const OLD: u32 = 150;
        let mut store = initialized(&fixture, 1);
        for n in 0..OLD {
            let start = T + UnixTime::from(n) * 10;
            finished(
                &mut *store,
                manual(&format!("m{n}"), "old", start + 9),
                0,
                start,
                start + 5,
            );
        }
        assert_eq!(all_history(&mut *store).len(), OLD as usize);
        // 91 days later every one of them is past the default 90-day retention.
        let later = T + 91 * 86_400;
        let old_left = |store: &mut dyn Store| {
            all_history(store)
                .iter()
                .filter(|r| r.user == "old")
                .count() as u32
        };
        finished(
            &mut *store,
            manual("n1", "new", later + 99),
            0,
            later,
            later + 1,
        );
        assert_eq!(old_left(&mut *store), OLD - HISTORY_PRUNE_BATCH);
        finished(
            &mut *store,
            manual("n2", "new", later + 99),
            0,
            later + 2,
            later + 3,
        );
        assert_eq!(old_left(&mut *store), 0);
        assert_eq!(all_history(&mut *store).len(), 2);
    }

    pub fn concurrent_endings_record_a_reservation_once(fixture: StoreFixture) {
        const CLIENTS: usize = 16;
        initialized(&fixture, 1);
        allocate(
            &mut *open(&fixture),
            manual("x", "bob", T + 10),
            ids(&[0]),
            T,
        )
        .unwrap();
        let barrier = Barrier::new(CLIENTS);
        // Half release the expired reservation, half claim its GPU; each ends it if
        // it gets there first.
        std::thread::scope(|scope| {
            for client in 0..CLIENTS {
                let (barrier, open) = (&barrier, &fixture.open);
                scope.spawn(move || {
                    let mut store = open();
                    barrier.wait();
                    if client % 2 == 0 {
                        store
                            .release(&ReleaseScope::AnyIds { ids: vec![0] }, T + 20)
                            .map(|released| released.freed)
                    } else {
                        let wanted = manual(&format!("c{client}"), "carol", T + 99);
                        allocate(&mut *store, wanted, ids(&[0]), T + 20)
                    }
                });
            }
        });
        let bob: Vec<UsageRecord> = all_history(&mut *open(&fixture))
            .into_iter()
            .filter(|record| record.user == "bob")
            .collect();
        assert_eq!(
            bob,
            vec![record("bob", 0, T, T + 10, ReservationKind::Manual)]
        );
    }
}
