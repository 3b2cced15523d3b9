//! Two real Unix users sharing one embedded store, through the real binary.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::cli::{BIN, Run};

/// Creates the Unix user if missing; tolerant of a concurrent `useradd`.
pub fn ensure_user(name: &str) {
    for _ in 0..50 {
        let exists = Command::new("id").arg("-u").arg(name).output().unwrap();
        if exists.status.success() {
            return;
        }
        let _ = Command::new("useradd").args(["-m", name]).output();
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("could not create user {name}");
}

/// Runs the binary as `user` (or as root when `None`) against `state_dir`.
fn as_user(user: Option<&str>, state_dir: &Path, args: &[&str]) -> Run {
    as_user_with(user, &[], state_dir, args)
}

/// Like `as_user`, with `KEY=VALUE` variables set after `runuser` has set up the
/// user's environment (it resets USER and LOGNAME itself).
fn as_user_with(user: Option<&str>, vars: &[&str], state_dir: &Path, args: &[&str]) -> Run {
    let mut cmd = match user {
        Some(user) => {
            let mut c = Command::new("runuser");
            c.args(["-u", user, "--", "env"]);
            c
        }
        None => Command::new("env"),
    };
    cmd.args(vars).arg(BIN);
    for (key, _) in std::env::vars() {
        if key.starts_with("CANHAZGPU_") {
            cmd.env_remove(&key);
        }
    }
    cmd.env("HOME", "/nonexistent")
        .env("CANHAZGPU_NVML", "0")
        .arg("--state-dir")
        .arg(state_dir)
        .args(args);
    cmd.output().expect("run canhazgpu").into()
}

/// A shared state directory with a pool of `gpus` fake GPUs, made by root.
fn shared_pool(gpus: u32) -> (tempfile::TempDir, PathBuf) {
    let (dir, state) = shared_state_dir();
    let count = gpus.to_string();
    as_user(
        None,
        &state,
        &["admin", "--gpus", &count, "--provider", "fake"],
    )
    .assert_ok();
    (dir, state)
}

/// A temporary directory every user can traverse, and the state directory in it
/// (not created: `admin` does that).
fn shared_state_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let state = dir.path().join("state");
    (dir, state)
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[test]
fn two_users_share_the_embedded_store() {
    ensure_user("chg_alice");
    ensure_user("chg_bob");
    let (_dir, state) = shared_pool(4);
    assert_eq!(
        mode(&state) & 0o777,
        0o777,
        "store directory usable by everyone"
    );
    assert_eq!(mode(&state.join("state.db")), 0o666);

    let alice = as_user(Some("chg_alice"), &state, &["reserve", "--gpus", "1"]);
    alice.assert_ok();
    assert!(
        alice.stdout.starts_with("Reserved 1 GPU(s): [0]"),
        "{alice:?}"
    );
    let bob = as_user(Some("chg_bob"), &state, &["reserve", "--gpus", "1"]);
    bob.assert_ok();
    assert!(bob.stdout.starts_with("Reserved 1 GPU(s): [1]"), "{bob:?}");
    for file in ["state.db-wal", "state.db-shm", "state.db-journal"] {
        let path = state.join(file);
        if path.exists() {
            assert_eq!(mode(&path), 0o666, "{file} must be writable by every user");
        }
    }

    let status = as_user(Some("chg_bob"), &state, &["status", "--json"]);
    status.assert_ok();
    let rows: Vec<serde_json::Value> = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(rows[0]["user"], "chg_alice");
    assert_eq!(rows[1]["user"], "chg_bob");

    // bob cannot release alice's GPU, not even by claiming to be her.
    let denied = as_user(Some("chg_bob"), &state, &["release", "--gpu-ids", "0"]);
    denied.assert_code(5);
    assert_eq!(denied.stdout, "");
    assert_eq!(
        denied.stderr.trim(),
        "Error: GPU 0 is reserved by chg_alice, not by you"
    );
    let spoof = as_user_with(
        Some("chg_bob"),
        &["USER=chg_alice", "LOGNAME=chg_alice"],
        &state,
        &["release"],
    );
    assert_eq!(spoof.stdout.trim(), "Released 1 GPU(s): [1]", "{spoof:?}");
    let not_root = as_user(
        Some("chg_bob"),
        &state,
        &["release", "--gpu-ids", "0", "--force"],
    );
    not_root.assert_code(2);
    assert!(not_root.stderr.contains("root only"), "{not_root:?}");

    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&as_user(None, &state, &["status", "--json"]).stdout).unwrap();
    assert_eq!(rows[0]["user"], "chg_alice", "alice still holds GPU 0");

    let root = as_user(None, &state, &["release", "--gpu-ids", "0", "--force"]);
    assert_eq!(root.stdout.trim(), "Released 1 GPU(s): [0]", "{root:?}");
}

#[test]
fn unreadable_store_is_one_clear_line() {
    ensure_user("chg_bob");
    let (_dir, state) = shared_pool(2);
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
    let run = as_user(Some("chg_bob"), &state, &["status"]);
    run.assert_code(1);
    assert_eq!(run.stderr.lines().count(), 1, "{run:?}");
    assert!(
        run.stderr
            .contains(&state.join("state.db").display().to_string()),
        "{run:?}"
    );
}

#[test]
fn admin_shares_an_existing_directory_and_readers_create_nothing() {
    ensure_user("chg_bob");
    let (_dir, state) = shared_state_dir();

    // Before admin: reading commands report the missing pool and create nothing.
    let status = as_user(None, &state, &["status"]);
    status.assert_code(4);
    assert!(!state.exists(), "status must not create the store");

    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    as_user(
        None,
        &state,
        &["admin", "--gpus", "2", "--provider", "fake"],
    )
    .assert_ok();
    assert_eq!(
        mode(&state),
        0o777,
        "admin makes an existing directory shared"
    );
    let bob = as_user(Some("chg_bob"), &state, &["reserve"]);
    bob.assert_ok();
}

/// `admin` ends every user's reservations with `--force`, so it is root's alone, on
/// both backends; the refusal comes before anything is opened.
#[test]
fn admin_is_for_root_only() {
    ensure_user("chg_bob");
    let (_dir, state) = shared_pool(4);
    as_user(None, &state, &["reserve", "--gpus", "2"]).assert_ok();
    let server = crate::support::redis::TestRedis::launch();
    let redis_url = server.url();
    for backend in [vec![], vec!["--redis-url", redis_url.as_str()]] {
        let mut args = backend.clone();
        args.extend(["admin", "--gpus", "4", "--provider", "fake", "--force"]);
        let bob = as_user(Some("chg_bob"), &state, &args);
        bob.assert_code(2);
        assert_eq!(
            bob.stderr.trim(),
            "Error: admin changes the GPU pool of every user and is for root only (run it with sudo)"
        );
    }
    let status = as_user(None, &state, &["status", "--json"]);
    let rows: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    let held = rows
        .as_array()
        .unwrap()
        .iter()
        .filter(|row| row["status"] == "IN_USE")
        .count();
    assert_eq!(held, 2, "root's reservations are untouched");
}

/// A store whose permissions went wrong: users are told what is wrong and who fixes
/// it; root's `admin` repairs it without `--force` and without touching the pool.
#[test]
fn admin_repairs_a_store_with_wrong_permissions() {
    ensure_user("chg_bob");
    let (_dir, state) = shared_pool(2);
    as_user(None, &state, &["reserve"]).assert_ok();
    let db = state.join("state.db");
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
    let denied = as_user(Some("chg_bob"), &state, &["reserve"]);
    denied.assert_code(1);
    assert_eq!(denied.stderr.lines().count(), 1, "{denied:?}");
    assert!(
        denied
            .stderr
            .contains("the file is mode 0644, owned by root, not writable by every user"),
        "{denied:?}"
    );
    assert!(
        denied.stderr.contains("ask root to run 'canhazgpu admin"),
        "{denied:?}"
    );

    let repair = as_user(
        None,
        &state,
        &["admin", "--gpus", "2", "--provider", "fake"],
    );
    repair.assert_ok();
    assert!(
        repair.stderr.contains("Repaired the permissions"),
        "{repair:?}"
    );
    assert!(!repair.stderr.contains("--force"), "{repair:?}");
    assert_eq!(mode(&db), 0o666);
    as_user(Some("chg_bob"), &state, &["reserve"]).assert_ok();
    let status = as_user(None, &state, &["status", "--json"]);
    assert_eq!(status.stdout.matches("IN_USE").count(), 2, "{status:?}");
}

/// Three users reserving and releasing at once on one embedded store: no invocation
/// ever fails (SQLite's side files are created and removed by whoever comes first,
/// with a moment where another user cannot open them yet).
#[test]
fn three_users_at_once_never_see_permission_denied() {
    const LOOPS: usize = 40;
    let users = ["chg_alice", "chg_bob", "chg_carol"];
    for user in users {
        ensure_user(user);
    }
    let (_dir, state) = shared_pool(4);
    let failures: Vec<String> = std::thread::scope(|scope| {
        let workers: Vec<_> = users
            .iter()
            .map(|user| {
                let state = &state;
                scope.spawn(move || {
                    let mut failed = Vec::new();
                    for _ in 0..LOOPS {
                        for args in [&["reserve", "-d", "1m", "--short"][..], &["release"]] {
                            let run = as_user(Some(user), state, args);
                            if !run.ok() {
                                failed.push(format!("{user} {args:?}: {}", run.stderr.trim()));
                            }
                        }
                    }
                    failed
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|worker| worker.join().unwrap())
            .collect()
    });
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(3)]
    );
}
