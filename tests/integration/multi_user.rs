//! Two real Unix users sharing one embedded store, through the real binary.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::cli::{BIN, Run};
use crate::support::protected::{ProtectedHost, group_gid, ownership};

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

/// How the store is laid out: shared by every user, or protected (a setgid binary,
/// `support::protected`). Every test here runs in both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Shared,
    Protected,
}

/// `mode_matrix! { name => |mode| body, ... }`: `mod shared` and `mod protected`,
/// each with one `#[test] fn name()`.
macro_rules! mode_matrix {
    ($($(#[doc = $doc:literal])* $test:ident => $body:expr),* $(,)?) => {
        mod shared_store {
            use super::*;
            $( $(#[doc = $doc])* #[test] fn $test() { ($body)(Mode::Shared) } )*
        }
        mod protected_store {
            use super::*;
            $( $(#[doc = $doc])* #[test] fn $test() { ($body)(Mode::Protected) } )*
        }
    };
}

/// A state directory (not created: `admin` does that) in a temporary directory every
/// user can traverse, and the binary to reach it with.
struct Host {
    mode: Mode,
    state: PathBuf,
    _shared: Option<tempfile::TempDir>,
    protected: Option<ProtectedHost>,
}

impl Host {
    fn new(mode: Mode) -> Host {
        match mode {
            Mode::Shared => {
                let dir = tempfile::tempdir().unwrap();
                std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
                    .unwrap();
                Host {
                    mode,
                    state: dir.path().join("state"),
                    _shared: Some(dir),
                    protected: None,
                }
            }
            Mode::Protected => {
                let host = ProtectedHost::sqlite();
                Host {
                    mode,
                    state: host.state.clone(),
                    _shared: None,
                    protected: Some(host),
                }
            }
        }
    }

    /// A host with a pool of `gpus` fake GPUs, made by root.
    fn with_pool(mode: Mode, gpus: u32) -> Host {
        let host = Host::new(mode);
        let count = gpus.to_string();
        host.run(None, &["admin", "--gpus", &count, "--provider", "fake"])
            .assert_ok();
        host
    }

    /// Runs the binary as `user` (or as root when `None`) against the state directory.
    fn run(&self, user: Option<&str>, args: &[&str]) -> Run {
        self.run_with(user, &[], args)
    }

    /// Like `run`, with `KEY=VALUE` variables set after `runuser` has set up the
    /// user's environment (it resets USER and LOGNAME itself).
    fn run_with(&self, user: Option<&str>, vars: &[&str], args: &[&str]) -> Run {
        let state = self.state.to_str().unwrap();
        let mut all = vec!["--state-dir", state];
        all.extend(args);
        if let Some(protected) = &self.protected {
            return protected.run_with(user, vars, &all);
        }
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
            .args(&all);
        cmd.output().expect("run canhazgpu").into()
    }

    /// What the directory and each store file must be: `(uid, gid, mode)` in the
    /// protected layout, a mode that includes the shared bits otherwise.
    #[track_caller]
    fn assert_layout(&self, path: &Path) {
        let is_dir = path.is_dir();
        match self.mode {
            Mode::Shared => {
                let wanted = if is_dir { 0o777 } else { 0o666 };
                assert_eq!(mode(path) & wanted, wanted, "{} shared", path.display());
            }
            Mode::Protected => {
                let gid = group_gid().unwrap();
                let (uid, group, bits) = ownership(path);
                assert_eq!(group, gid, "{} belongs to group canhazgpu", path.display());
                assert_eq!(
                    bits,
                    if is_dir { 0o2770 } else { 0o660 },
                    "{} protected",
                    path.display()
                );
                if path == self.state || path.ends_with("state.db") {
                    assert_eq!(uid, 0, "{} is root's", path.display());
                }
            }
        }
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

mode_matrix! {
    two_users_share_the_embedded_store => |mode| {
        ensure_user("chg_alice");
        ensure_user("chg_bob");
        let host = Host::with_pool(mode, 4);
        host.assert_layout(&host.state);
        host.assert_layout(&host.state.join("state.db"));

        let alice = host.run(Some("chg_alice"), &["reserve", "--gpus", "1"]);
        alice.assert_ok();
        assert!(alice.stdout.starts_with("Reserved 1 GPU(s): [0]"), "{alice:?}");
        let bob = host.run(Some("chg_bob"), &["reserve", "--gpus", "1"]);
        bob.assert_ok();
        assert!(bob.stdout.starts_with("Reserved 1 GPU(s): [1]"), "{bob:?}");
        for file in ["state.db-wal", "state.db-shm", "state.db-journal"] {
            let path = host.state.join(file);
            if path.exists() {
                host.assert_layout(&path);
            }
        }

        let status = host.run(Some("chg_bob"), &["status", "--json"]);
        status.assert_ok();
        let rows: Vec<serde_json::Value> = serde_json::from_str(&status.stdout).unwrap();
        assert_eq!(rows[0]["user"], "chg_alice");
        assert_eq!(rows[1]["user"], "chg_bob");

        // bob cannot release alice's GPU, not even by claiming to be her.
        let denied = host.run(Some("chg_bob"), &["release", "--gpu-ids", "0"]);
        denied.assert_code(5);
        assert_eq!(denied.stdout, "");
        assert_eq!(
            denied.stderr.trim(),
            "Error: GPU 0 is reserved by chg_alice, not by you"
        );
        let spoof = host.run_with(
            Some("chg_bob"),
            &["USER=chg_alice", "LOGNAME=chg_alice"],
            &["release"],
        );
        assert_eq!(spoof.stdout.trim(), "Released 1 GPU(s): [1]", "{spoof:?}");
        let not_root = host.run(Some("chg_bob"), &["release", "--gpu-ids", "0", "--force"]);
        not_root.assert_code(2);
        assert!(not_root.stderr.contains("root only"), "{not_root:?}");

        let rows: Vec<serde_json::Value> =
            serde_json::from_str(&host.run(None, &["status", "--json"]).stdout).unwrap();
        assert_eq!(rows[0]["user"], "chg_alice", "alice still holds GPU 0");

        let root = host.run(None, &["release", "--gpu-ids", "0", "--force"]);
        assert_eq!(root.stdout.trim(), "Released 1 GPU(s): [0]", "{root:?}");
    },

    unreadable_store_is_one_clear_line => |mode| {
        ensure_user("chg_bob");
        let host = Host::with_pool(mode, 2);
        std::fs::set_permissions(&host.state, std::fs::Permissions::from_mode(0o700)).unwrap();
        let run = host.run(Some("chg_bob"), &["status"]);
        run.assert_code(1);
        assert_eq!(run.stderr.lines().count(), 1, "{run:?}");
        assert!(
            run.stderr.contains(&host.state.join("state.db").display().to_string()),
            "{run:?}"
        );
    },

    admin_lays_out_an_existing_directory_and_readers_create_nothing => |mode| {
        ensure_user("chg_bob");
        let host = Host::new(mode);

        // Before admin: reading commands report the missing pool and create nothing.
        let status = host.run(None, &["status"]);
        status.assert_code(4);
        assert!(!host.state.exists(), "status must not create the store");

        std::fs::create_dir(&host.state).unwrap();
        std::fs::set_permissions(&host.state, std::fs::Permissions::from_mode(0o755)).unwrap();
        host.run(None, &["admin", "--gpus", "2", "--provider", "fake"])
            .assert_ok();
        host.assert_layout(&host.state);
        let bob = host.run(Some("chg_bob"), &["reserve"]);
        bob.assert_ok();
    },

    /// `admin` ends every user's reservations with `--force`, so it is root's alone, on
    /// both backends; the refusal comes before anything is opened.
    admin_is_for_root_only => |mode| {
        ensure_user("chg_bob");
        let host = Host::with_pool(mode, 4);
        host.run(None, &["reserve", "--gpus", "2"]).assert_ok();
        let server = crate::support::redis::TestRedis::launch();
        let redis_url = server.url();
        for backend in [vec![], vec!["--redis-url", redis_url.as_str()]] {
            let mut args = backend.clone();
            args.extend(["admin", "--gpus", "4", "--provider", "fake", "--force"]);
            let bob = host.run(Some("chg_bob"), &args);
            bob.assert_code(2);
            assert_eq!(
                bob.stderr.trim(),
                "Error: admin changes the GPU pool of every user and is for root only (run it with sudo)"
            );
        }
        let status = host.run(None, &["status", "--json"]);
        let rows: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
        let held = rows
            .as_array()
            .unwrap()
            .iter()
            .filter(|row| row["status"] == "IN_USE")
            .count();
        assert_eq!(held, 2, "root's reservations are untouched");
    },

    /// A store whose permissions went wrong: users are told what is wrong and who fixes
    /// it; root's `admin` repairs it without `--force` and without touching the pool.
    admin_repairs_a_store_with_wrong_permissions => |mode| {
        ensure_user("chg_bob");
        let host = Host::with_pool(mode, 2);
        host.run(None, &["reserve"]).assert_ok();
        let db = host.state.join("state.db");
        std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
        let denied = host.run(Some("chg_bob"), &["reserve"]);
        denied.assert_code(1);
        assert_eq!(denied.stderr.lines().count(), 1, "{denied:?}");
        let who = match mode {
            Mode::Shared => "every user",
            Mode::Protected => "group canhazgpu",
        };
        assert!(
            denied.stderr.contains(&format!(
                "the file is mode 0644, owned by root, not writable by {who}"
            )),
            "{denied:?}"
        );
        assert!(
            denied.stderr.contains("ask root to run 'canhazgpu admin"),
            "{denied:?}"
        );

        let repair = host.run(None, &["admin", "--gpus", "2", "--provider", "fake"]);
        repair.assert_ok();
        let said = match mode {
            Mode::Shared => "Repaired the permissions",
            Mode::Protected => "Protected the canhazgpu store",
        };
        assert!(repair.stderr.contains(said), "{repair:?}");
        assert!(!repair.stderr.contains("--force"), "{repair:?}");
        host.assert_layout(&db);
        host.run(Some("chg_bob"), &["reserve"]).assert_ok();
        let status = host.run(None, &["status", "--json"]);
        assert_eq!(status.stdout.matches("IN_USE").count(), 2, "{status:?}");
    },

    /// Three users reserving and releasing at once on one embedded store: no invocation
    /// ever fails (SQLite's side files are created and removed by whoever comes first,
    /// with a moment where another user cannot open them yet).
    three_users_at_once_never_see_permission_denied => |mode| {
        const LOOPS: usize = 40;
        let users = ["chg_alice", "chg_bob", "chg_carol"];
        for user in users {
            ensure_user(user);
        }
        let host = Host::with_pool(mode, 4);
        let failures: Vec<String> = std::thread::scope(|scope| {
            let workers: Vec<_> = users
                .iter()
                .map(|user| {
                    let host = &host;
                    scope.spawn(move || {
                        let mut failed = Vec::new();
                        for _ in 0..LOOPS {
                            for args in [&["reserve", "-d", "1m", "--short"][..], &["release"]] {
                                let run = host.run(Some(user), args);
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
    },
}
