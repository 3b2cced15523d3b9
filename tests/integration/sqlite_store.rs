//! The embedded SQLite store against real database files, real threads with their own
//! connections, and real Unix users (created with `useradd` when missing; CI runs as root).

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::{SystemTime, UNIX_EPOCH};

use canhazgpu::error::Error;
use canhazgpu::state::{GpuSlot, Pool, ProviderKind, ReservationKind, RunOwner, Selection};
use canhazgpu::store::sqlite::SqliteStore;
use canhazgpu::store::{InitOutcome, NewReservation, ReleaseScope, Store};
use nix::unistd::{Uid, User};

use crate::store_conformance::cases::{manual, request};

fn new_store(dir: &Path, gpus: u32) -> SqliteStore {
    let mut store = SqliteStore::open(&dir.join("state.db")).expect("open store");
    store
        .init_pool(gpus, ProviderKind::Fake, false, 1)
        .expect("init pool");
    store
}

fn run(id: &str, user: &str) -> NewReservation {
    NewReservation {
        id: id.into(),
        user: user.into(),
        actual_user: user.into(),
        kind: ReservationKind::Run,
        expiry_time: None,
        note: Some("training".into()),
        owner: Some(RunOwner {
            host: "node1".into(),
            pid: 4242,
            pid_start: 99,
        }),
        adopted: None,
    }
}

fn holder(store: &mut SqliteStore, gpu: usize) -> Option<String> {
    match &store.slots().unwrap()[gpu] {
        GpuSlot::Held(reservation) => Some(reservation.id.clone()),
        GpuSlot::Free { .. } => None,
        GpuSlot::Corrupt(why) => panic!("GPU {gpu} corrupt: {why}"),
    }
}

/// (user, gpu, start, end, kind) of every record overlapping the window.
fn history(
    store: &mut SqliteStore,
    from: i64,
    to: i64,
) -> Vec<(String, u32, i64, i64, ReservationKind)> {
    store
        .history(from, to)
        .unwrap()
        .into_iter()
        .map(|r| (r.user, r.gpu_id, r.start_time, r.end_time, r.kind))
        .collect()
}

#[test]
fn manual_reservation_lifecycle() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = new_store(dir.path(), 4);
    let mut alice = manual("m1", "alice", 1000);
    alice.note = Some("eval".into());
    assert_eq!(
        store
            .allocate(&request(alice, Selection::Count(2), 100))
            .unwrap(),
        vec![0, 1]
    );
    let slots = store.slots().unwrap();
    assert_eq!(slots.len(), 4);
    let GpuSlot::Held(held) = &slots[1] else {
        panic!("GPU 1 not held: {:?}", slots[1]);
    };
    assert_eq!(
        (
            held.id.as_str(),
            held.user.as_str(),
            held.kind,
            held.start_time
        ),
        ("m1", "alice", ReservationKind::Manual, 100)
    );
    assert_eq!(
        (
            held.expiry_time,
            held.last_heartbeat,
            held.note.as_deref(),
            &held.owner
        ),
        (Some(1000), None, Some("eval"), &None)
    );
    assert_eq!(
        slots[2],
        GpuSlot::Free {
            last_released: None
        }
    );

    let mine = ReleaseScope::OwnManual {
        actual_user: "alice".into(),
    };
    assert_eq!(store.release(&mine, 300).unwrap().freed, vec![0, 1]);
    assert_eq!(
        store.slots().unwrap()[0],
        GpuSlot::Free {
            last_released: Some(300)
        }
    );
    assert_eq!(store.release(&mine, 301).unwrap().freed, Vec::<u32>::new());
    let manual = ReservationKind::Manual;
    assert_eq!(
        history(&mut store, 0, 1000),
        vec![
            ("alice".into(), 0, 100, 300, manual),
            ("alice".into(), 1, 100, 300, manual)
        ]
    );
}

#[test]
fn pool_must_be_initialised_once_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = SqliteStore::open(&dir.path().join("state.db")).unwrap();
    assert_eq!(store.pool().unwrap(), None);
    assert_eq!(store.slots().unwrap_err(), Error::NotInitialized);
    let alloc = request(manual("m1", "alice", 900), Selection::Count(1), 100);
    assert_eq!(store.allocate(&alloc).unwrap_err(), Error::NotInitialized);
    assert_eq!(
        store
            .init_pool(0, ProviderKind::Fake, false, 1)
            .unwrap_err()
            .to_string(),
        "GPU count must be greater than 0"
    );

    let first = store.init_pool(8, ProviderKind::Nvidia, false, 1).unwrap();
    assert_eq!(
        first,
        InitOutcome {
            previous_count: None,
            cleared: 0
        }
    );
    let again = store
        .init_pool(4, ProviderKind::Fake, false, 2)
        .unwrap_err();
    assert_eq!(
        again.to_string(),
        "GPU pool already initialized with 8 GPUs. Use --force to reinitialize"
    );

    store
        .allocate(&request(
            manual("m1", "alice", 900),
            Selection::Ids(vec![6, 7]),
            100,
        ))
        .unwrap();
    store
        .allocate(&request(
            manual("m2", "bob", 150),
            Selection::Ids(vec![0]),
            100,
        ))
        .unwrap();
    let forced = store.init_pool(4, ProviderKind::Fake, true, 200).unwrap();
    assert_eq!(
        forced,
        InitOutcome {
            previous_count: Some(8),
            cleared: 3
        }
    );
    assert_eq!(
        store.pool().unwrap(),
        Some(Pool {
            gpu_count: 4,
            provider: ProviderKind::Fake
        })
    );
    let slots = store.slots().unwrap();
    assert_eq!(slots.len(), 4);
    assert!(
        slots
            .iter()
            .all(|slot| matches!(slot, GpuSlot::Free { .. }))
    );
    // Active reservations end now; bob's had already expired at 150.
    let manual = ReservationKind::Manual;
    assert_eq!(
        history(&mut store, 0, 1000),
        vec![
            ("bob".into(), 0, 100, 150, manual),
            ("alice".into(), 6, 100, 200, manual),
            ("alice".into(), 7, 100, 200, manual)
        ]
    );
}

#[test]
fn expired_manual_reservation_is_taken_over_with_history() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = new_store(dir.path(), 1);
    store
        .allocate(&request(manual("m1", "bob", 150), Selection::Count(1), 100))
        .unwrap();
    let early = store
        .allocate(&request(
            manual("m2", "alice", 900),
            Selection::Count(1),
            149,
        ))
        .unwrap_err();
    assert_eq!(
        early,
        Error::NotEnough {
            requested: 1,
            available: 0,
            unreserved: 0
        }
    );
    assert_eq!(
        store
            .allocate(&request(
                manual("m2", "alice", 900),
                Selection::Count(1),
                200
            ))
            .unwrap(),
        vec![0]
    );
    assert_eq!(holder(&mut store, 0).as_deref(), Some("m2"));
    assert_eq!(
        history(&mut store, 0, 1000),
        vec![("bob".into(), 0, 100, 150, ReservationKind::Manual)]
    );
}

#[test]
fn stale_or_dead_run_reservations_are_reclaimed() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = new_store(dir.path(), 1);
    store
        .allocate(&request(run("r1", "bob"), Selection::Count(1), 100))
        .unwrap();
    assert_eq!(store.heartbeat("r1", &[0], 150).unwrap(), vec![0]);
    let GpuSlot::Held(held) = &store.slots().unwrap()[0] else {
        panic!("GPU 0 not held");
    };
    assert_eq!(held.last_heartbeat, Some(150));
    assert_eq!(
        held.owner.as_ref().map(|o| (o.pid, o.pid_start)),
        Some((4242, 99))
    );

    let take = |now| request(run("r2", "alice"), Selection::Count(1), now);
    assert!(matches!(
        store.allocate(&take(210)),
        Err(Error::NotEnough { .. })
    ));
    assert_eq!(store.allocate(&take(211)).unwrap(), vec![0]);

    // A supervisor known to be gone loses its GPUs at once; its reservation ended
    // at its last heartbeat.
    assert_eq!(store.heartbeat("r2", &[0], 221).unwrap(), vec![0]);
    let mut dead = request(run("r3", "carol"), Selection::Count(1), 230);
    dead.dead_ids = vec!["r2".into()];
    assert_eq!(store.allocate(&dead).unwrap(), vec![0]);
    let kind = ReservationKind::Run;
    assert_eq!(
        history(&mut store, 0, 1000),
        vec![
            ("bob".into(), 0, 100, 150, kind),
            ("alice".into(), 0, 211, 221, kind)
        ]
    );
}

#[test]
fn heartbeat_refreshes_only_the_own_run_reservation() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = new_store(dir.path(), 3);
    store
        .allocate(&request(run("r1", "alice"), Selection::Count(2), 100))
        .unwrap();
    store
        .allocate(&request(
            manual("m1", "alice", 900),
            Selection::Count(1),
            100,
        ))
        .unwrap();
    assert_eq!(store.heartbeat("r1", &[2, 1, 0], 120).unwrap(), vec![0, 1]);
    assert_eq!(store.heartbeat("m1", &[2], 120).unwrap(), Vec::<u32>::new());
    assert_eq!(store.heartbeat("", &[0], 120).unwrap(), Vec::<u32>::new());
    let end = ReleaseScope::Reservation { id: "r1".into() };
    assert_eq!(store.release(&end, 130).unwrap().freed, vec![0, 1]);
    assert_eq!(
        store.heartbeat("r1", &[0, 1], 140).unwrap(),
        Vec::<u32>::new()
    );
    let GpuSlot::Held(manual) = &store.slots().unwrap()[2] else {
        panic!("GPU 2 not held");
    };
    assert_eq!(manual.last_heartbeat, None);
}

#[test]
fn release_scopes() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = new_store(dir.path(), 4);
    let ids = |ids: &[u32]| Selection::Ids(ids.to_vec());
    store
        .allocate(&request(manual("a-m", "alice", 150), ids(&[0]), 100))
        .unwrap();
    store
        .allocate(&request(run("a-r", "alice"), ids(&[1]), 100))
        .unwrap();
    store
        .allocate(&request(manual("b-m", "bob", 900), ids(&[2, 3]), 100))
        .unwrap();

    let alice = || "alice".to_string();
    // Plain release: only manual reservations; the expired one ends at its expiry.
    let own_manual = ReleaseScope::OwnManual {
        actual_user: alice(),
    };
    assert_eq!(store.release(&own_manual, 200).unwrap().freed, vec![0]);
    // By ID: only where alice holds the GPU, run or manual.
    let own_ids = ReleaseScope::OwnIds {
        actual_user: alice(),
        ids: vec![1, 2],
    };
    assert_eq!(store.release(&own_ids, 120).unwrap().freed, vec![1]);
    assert_eq!(holder(&mut store, 2).as_deref(), Some("b-m"));
    // Root's override: whoever holds it.
    let any = ReleaseScope::AnyIds { ids: vec![2] };
    assert_eq!(store.release(&any, 300).unwrap().freed, vec![2]);
    assert_eq!(holder(&mut store, 3).as_deref(), Some("b-m"));
    let reservation = ReleaseScope::Reservation { id: "b-m".into() };
    assert_eq!(store.release(&reservation, 310).unwrap().freed, vec![3]);

    let (manual, run) = (ReservationKind::Manual, ReservationKind::Run);
    assert_eq!(
        history(&mut store, 0, 1000),
        vec![
            ("alice".into(), 1, 100, 120, run),
            ("alice".into(), 0, 100, 150, manual),
            ("bob".into(), 2, 100, 300, manual),
            ("bob".into(), 3, 100, 310, manual)
        ]
    );
}

#[test]
fn prefers_the_users_recent_gpus_then_unused_then_least_recently_released() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = new_store(dir.path(), 4);
    let use_and_release = |store: &mut SqliteStore, user: &str, gpu: u32, at: i64| {
        store
            .allocate(&request(
                manual(user, user, at + 50),
                Selection::Ids(vec![gpu]),
                at,
            ))
            .unwrap();
        let scope = ReleaseScope::OwnManual {
            actual_user: user.into(),
        };
        store.release(&scope, at + 10).unwrap();
    };
    use_and_release(&mut store, "alice", 2, 100);
    use_and_release(&mut store, "bob", 0, 200);
    use_and_release(&mut store, "alice", 3, 300);
    let pick = |store: &mut SqliteStore, user: &str, count: u32| {
        let claimed = store
            .allocate(&request(
                manual(user, user, 900),
                Selection::Count(count),
                400,
            ))
            .unwrap();
        let scope = ReleaseScope::OwnManual {
            actual_user: user.into(),
        };
        store.release(&scope, 401).unwrap();
        claimed
    };
    // Alice: her most recent (3), then her earlier one (2).
    assert_eq!(pick(&mut store, "alice", 1), vec![3]);
    assert_eq!(pick(&mut store, "alice", 2), vec![2, 3]);
    // Carol never used any: the never-used GPU 1 beats the released ones.
    assert_eq!(pick(&mut store, "carol", 1), vec![1]);
    // Dave: none is unused now; GPU 0, released at 210, beats the others (401).
    assert_eq!(pick(&mut store, "dave", 1), vec![0]);
}

#[test]
fn not_enough_counts_free_and_unreserved_gpus() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = new_store(dir.path(), 4);
    store
        .allocate(&request(
            manual("b", "bob", 900),
            Selection::Ids(vec![1]),
            100,
        ))
        .unwrap();
    let mut wanted = request(manual("a", "alice", 900), Selection::Count(3), 110);
    wanted.unreserved = vec![0];
    let err = store.allocate(&wanted).unwrap_err();
    assert_eq!(
        err,
        Error::NotEnough {
            requested: 3,
            available: 2,
            unreserved: 1
        }
    );
    wanted.selection = Selection::Ids(vec![2, 1]);
    assert_eq!(
        store.allocate(&wanted).unwrap_err().to_string(),
        "GPU 1 is already reserved by user 'bob'"
    );
    // All or nothing: the refused requests changed nothing.
    assert_eq!(holder(&mut store, 2), None);
    wanted.selection = Selection::Count(2);
    assert_eq!(store.allocate(&wanted).unwrap(), vec![2, 3]);
}

#[test]
fn history_window_selects_overlapping_records() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = new_store(dir.path(), 3);
    for (gpu, start, end) in [(0, 100, 200), (1, 300, 400), (2, 500, 600)] {
        store
            .allocate(&request(
                manual("m", "alice", 9999),
                Selection::Ids(vec![gpu]),
                start,
            ))
            .unwrap();
        let scope = ReleaseScope::OwnIds {
            actual_user: "alice".into(),
            ids: vec![gpu],
        };
        store.release(&scope, end).unwrap();
    }
    let gpus = |store: &mut SqliteStore, from, to| -> Vec<u32> {
        history(store, from, to).into_iter().map(|r| r.1).collect()
    };
    assert_eq!(gpus(&mut store, 0, 1000), vec![0, 1, 2]);
    assert_eq!(gpus(&mut store, 200, 300), vec![0, 1]);
    assert_eq!(gpus(&mut store, 201, 299), Vec::<u32>::new());
    assert_eq!(gpus(&mut store, 350, 350), vec![1]);
    assert_eq!(gpus(&mut store, 601, 9000), Vec::<u32>::new());
}

#[test]
fn concurrent_allocations_never_share_a_gpu() {
    let dir = tempfile::tempdir().unwrap();
    drop(new_store(dir.path(), 8));
    let path = dir.path().join("state.db");
    let start = Arc::new(Barrier::new(16));
    let workers: Vec<_> = (0..16)
        .map(|i| {
            let (path, start) = (path.clone(), Arc::clone(&start));
            thread::spawn(move || {
                let mut store = SqliteStore::open(&path).unwrap();
                let user = format!("user{i}");
                start.wait();
                store.allocate(&request(
                    manual(&user, &user, 900),
                    Selection::Count(1),
                    100,
                ))
            })
        })
        .collect();
    let mut claimed = Vec::new();
    for worker in workers {
        match worker.join().unwrap() {
            Ok(ids) => claimed.extend(ids),
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
    claimed.sort_unstable();
    assert_eq!(claimed, (0..8).collect::<Vec<u32>>());
    let mut store = SqliteStore::open(&path).unwrap();
    let holders: Vec<_> = (0..8).map(|gpu| holder(&mut store, gpu).unwrap()).collect();
    let mut distinct = holders.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 8, "holders: {holders:?}");
}

#[test]
fn corrupt_row_affects_only_that_gpu() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = new_store(dir.path(), 4);
    rusqlite::Connection::open(dir.path().join("state.db"))
        .unwrap()
        .execute(
            "UPDATE gpus SET user = 'eve', type = 'borrowed', start_time = 5 WHERE id = 1",
            [],
        )
        .unwrap();
    let slots = store.slots().unwrap();
    assert_eq!(
        slots[1],
        GpuSlot::Corrupt(
            "corrupted GPU state for GPU 1: invalid reservation type 'borrowed'".into()
        )
    );
    assert!([0, 2, 3].iter().all(|&i| slots[i]
        == GpuSlot::Free {
            last_released: None
        }));

    let alice = |selection| request(manual("a", "alice", 900), selection, 100);
    assert_eq!(
        store
            .allocate(&alice(Selection::Ids(vec![1])))
            .unwrap_err()
            .to_string(),
        "GPU 1 has unreadable state: corrupted GPU state for GPU 1: invalid reservation type 'borrowed'"
    );
    assert_eq!(
        store.allocate(&alice(Selection::Count(3))).unwrap(),
        vec![0, 2, 3]
    );
    let own = ReleaseScope::OwnIds {
        actual_user: "eve".into(),
        ids: vec![1],
    };
    assert_eq!(store.release(&own, 200).unwrap().freed, Vec::<u32>::new());
    // Root's explicit release resets it, without inventing history.
    let any = ReleaseScope::AnyIds { ids: vec![1] };
    assert_eq!(store.release(&any, 200).unwrap().freed, vec![1]);
    assert_eq!(
        store.slots().unwrap()[1],
        GpuSlot::Free {
            last_released: Some(200)
        }
    );
    assert_eq!(history(&mut store, 0, 1000), vec![]);
}

/// Unix users for the permission tests, created once if missing.
fn unix_user(name: &str) -> User {
    static CREATING: Mutex<()> = Mutex::new(());
    let _serial = CREATING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(user) = User::from_name(name).unwrap() {
        return user;
    }
    let status = Command::new("useradd").args(["-m", name]).status().unwrap();
    User::from_name(name)
        .unwrap()
        .unwrap_or_else(|| panic!("useradd {name} failed: {status}"))
}

/// A directory other users can traverse, holding the store directory `store/`.
fn shared_tempdir() -> (tempfile::TempDir, PathBuf) {
    assert!(
        Uid::effective().is_root(),
        "the multi-user tests run as root"
    );
    let dir = tempfile::tempdir().unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let db = dir.path().join("store/state.db");
    (dir, db)
}

/// Runs `as_other_user` in a copy of this test binary as `user`: opens the store at
/// `db` and reserves one GPU. Returns the claimed IDs, or the error line.
fn reserve_as(user: &str, db: &Path) -> Result<String, String> {
    unix_user(user);
    let exe = std::env::current_exe().unwrap();
    let output = Command::new("runuser")
        .args(["-u", user, "--"])
        .arg(exe)
        .args(["--exact", "sqlite_store::as_other_user", "--nocapture"])
        .env("CHG_PROBE_DB", db)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .find_map(|line| line.strip_prefix("PROBE "))
        .unwrap_or_else(|| {
            panic!(
                "no probe result as {user}: {stdout}\n{}",
                String::from_utf8_lossy(&output.stderr)
            )
        });
    match line.split_once(' ') {
        Some(("OK", ids)) => Ok(ids.to_string()),
        Some(("ERR", message)) => Err(message.to_string()),
        _ => panic!("bad probe line: {line}"),
    }
}

/// Not a check of its own: the body `reserve_as` runs as another Unix user. Without
/// `CHG_PROBE_DB` (a normal test run) it has nothing to do.
#[test]
fn as_other_user() {
    let Some(db) = std::env::var_os("CHG_PROBE_DB") else {
        return;
    };
    let name = User::from_uid(Uid::current()).unwrap().unwrap().name;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let reservation = manual(&format!("probe-{name}"), &name, now + 3600);
    let outcome = SqliteStore::open(Path::new(&db))
        .and_then(|mut store| store.allocate(&request(reservation, Selection::Count(1), now)));
    match outcome {
        Ok(ids) => println!("PROBE OK {ids:?}"),
        Err(err) => println!("PROBE ERR {err}"),
    }
}

#[test]
fn store_unusable_for_a_user_says_what_to_do() {
    let (dir, db) = shared_tempdir();
    let expected = |db: &Path, why: &str| {
        format!(
            "cannot open the canhazgpu store at {}: permission denied ({why}) - ask root to \
             run 'canhazgpu admin --gpus <count>', which creates or repairs it for every user, \
             or use --state-dir DIR",
            db.display()
        )
    };
    // Not created yet, and alice may not create it.
    let missing = dir.path().join("missing/state.db");
    assert_eq!(
        reserve_as("chg_alice", &missing),
        Err(expected(
            &missing,
            "there is no store yet and you may not create one"
        ))
    );
    assert!(!missing.parent().unwrap().exists());

    new_store(db.parent().unwrap(), 2);
    assert_eq!(reserve_as("chg_alice", &db).as_deref(), Ok("[0]"));
    // A database file she may not write (SQLite would quietly open it read-only).
    fs::set_permissions(&db, fs::Permissions::from_mode(0o644)).unwrap();
    assert_eq!(
        reserve_as("chg_bob", &db),
        Err(expected(
            &db,
            "the file is mode 0644, owned by root, not writable by every user"
        ))
    );
    // A directory she may not write: no `-wal`/`-shm` files can be created.
    fs::set_permissions(&db, fs::Permissions::from_mode(0o666)).unwrap();
    fs::set_permissions(db.parent().unwrap(), fs::Permissions::from_mode(0o755)).unwrap();
    assert_eq!(
        reserve_as("chg_bob", &db),
        Err(expected(
            &db,
            "its directory is mode 0755, owned by root, not writable by every user"
        ))
    );
}

/// The permission bits in octal, and the owner's UID.
fn mode_and_owner(path: &Path) -> (String, u32) {
    let meta = fs::metadata(path).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
    (format!("{:o}", meta.mode() & 0o7777), meta.uid())
}

fn sidecar(db: &Path, suffix: &str) -> PathBuf {
    PathBuf::from(format!("{}{suffix}", db.display()))
}

/// Root creates the store (as `admin` would); then alice and bob, each holding the
/// other's `-wal`/`-shm` files open, both write to it.
#[test]
fn users_share_a_store_created_by_root() {
    let (_dir, db) = shared_tempdir();
    let alice = unix_user("chg_alice");
    let bob = unix_user("chg_bob");
    let root_store = new_store(db.parent().unwrap(), 4);
    assert_eq!(mode_and_owner(db.parent().unwrap()).0, "777");
    assert_eq!(mode_and_owner(&db), ("666".to_string(), 0));
    for suffix in ["-wal", "-shm"] {
        assert_eq!(
            mode_and_owner(&sidecar(&db, suffix)),
            ("666".to_string(), 0),
            "{suffix}"
        );
    }
    // Alice writes through root's -wal/-shm while root's connection is open.
    assert_eq!(reserve_as("chg_alice", &db).as_deref(), Ok("[0]"));
    drop(root_store);
    assert!(
        !sidecar(&db, "-wal").exists(),
        "the last connection removes -wal"
    );

    // Alice's sqlite3 holds the store open, so she creates -wal/-shm, from the db's mode.
    let mut sqlite3 = Command::new("runuser")
        .args(["-u", "chg_alice", "--", "sqlite3"])
        .arg(&db)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut to_sqlite3 = sqlite3.stdin.take().unwrap();
    let mut from_sqlite3 = BufReader::new(sqlite3.stdout.take().unwrap());
    let mut ask = |sql: &str| {
        writeln!(to_sqlite3, "{sql}").unwrap();
        let mut answer = String::new();
        from_sqlite3.read_line(&mut answer).unwrap();
        answer.trim_end().to_string()
    };
    let held = "SELECT group_concat(user, ',') FROM (SELECT user FROM gpus WHERE user IS NOT NULL ORDER BY id);";
    assert_eq!(ask(held), "chg_alice");
    for suffix in ["-wal", "-shm"] {
        let file = sidecar(&db, suffix);
        assert_eq!(
            mode_and_owner(&file),
            ("666".to_string(), alice.uid.as_raw()),
            "{suffix}"
        );
    }
    // Bob writes through alice's files while she holds them; she sees his reservation.
    assert_eq!(reserve_as("chg_bob", &db).as_deref(), Ok("[1]"));
    assert_eq!(ask(held), "chg_alice,chg_bob");
    drop(to_sqlite3);
    assert!(sqlite3.wait().unwrap().success());

    let mut root_store = SqliteStore::open(&db).unwrap();
    let users: Vec<_> = root_store
        .slots()
        .unwrap()
        .into_iter()
        .map(|slot| match slot {
            GpuSlot::Held(r) => Some(r.actual_user),
            _ => None,
        })
        .collect();
    assert_eq!(
        users,
        vec![Some(alice.name.clone()), Some(bob.name.clone()), None, None]
    );
}

/// A bad queue row or last-use row hurts nobody: the queue row is dropped by the next
/// change, the last-use row is passed over; reservations go on.
#[test]
fn bad_queue_and_last_use_rows_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = new_store(dir.path(), 2);
    let db = dir.path().join("state.db");
    let raw = rusqlite::Connection::open(&db).unwrap();
    raw.execute_batch(
        "INSERT INTO queue (id, user, actual_user, type, requested_count, requested_ids,
             waiter_host, waiter_pid, waiter_pid_start, enqueue_time, last_heartbeat)
         VALUES ('bad', 'x', 'x', 'manual', 1, 'not json', 'h', 1, 1, 1, 1);
         INSERT INTO user_last_used (actual_user, gpu_id, last_used) VALUES ('al', -5, 1);",
    )
    .unwrap();
    assert_eq!(store.queue().unwrap(), Vec::new());
    let claimed = store.allocate(&request(
        manual("m", "al", 1_700_000_060),
        Selection::Count(1),
        1_700_000_000,
    ));
    assert_eq!(claimed, Ok(vec![0]));
    let left: i64 = raw
        .query_row("SELECT count(*) FROM queue", [], |row| row.get(0))
        .unwrap();
    assert_eq!(left, 0, "the unreadable queue row was dropped");
}
