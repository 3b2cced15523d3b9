//! Reservations that follow the work: `extend`, `reserve --until`, `reserve --force`,
//! `adopt`, `transfer` and `release` of GPUs that are not yours, on every backend,
//! with real Unix users and real processes.

use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::cli_gpu::GpuJob;
use crate::multi_user::ensure_user;
use crate::support::cli::{BIN, CliEnv, Run, terminate, wait_until};
use crate::support::fake_smi::FakeSmi;
use crate::support::{BackendKind, backend_matrix, cli_env};

/// The binary as Unix user `user`, with `env`'s settings.
pub fn user_command(env: &CliEnv, user: &str, args: &[&str]) -> Command {
    let inner = env.command(args);
    let mut cmd = Command::new("runuser");
    cmd.args(["-u", user, "--", "env"]);
    for (key, value) in inner.get_envs() {
        if let (Some(key), Some(Some(value))) = (key.to_str(), value.map(|v| v.to_str()))
            && key != "HOME"
        {
            cmd.arg(format!("{key}={value}"));
        }
    }
    cmd.arg("HOME=/nonexistent").arg(BIN).args(args);
    cmd.stdin(Stdio::null());
    cmd
}

/// Runs the binary as Unix user `user` with `env`'s settings.
fn as_user(env: &CliEnv, user: &str, args: &[&str]) -> Run {
    user_command(env, user, args)
        .output()
        .expect("run canhazgpu")
        .into()
}

/// An environment that other Unix users can reach too.
pub fn shared_env(backend: BackendKind) -> (CliEnv, Option<crate::support::redis::TestRedis>) {
    let (env, server) = cli_env(backend);
    let mut dirs = vec![env.dir.path().to_path_buf()];
    dirs.extend(
        server
            .iter()
            .filter_map(|s| s.socket().parent().map(Into::into)),
    );
    for dir in dirs {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    if let Some(server) = &server {
        std::fs::set_permissions(server.socket(), std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    (env, server)
}

fn row(env: &CliEnv, gpu: usize) -> Value {
    env.status_json()[gpu].clone()
}

fn expiry(env: &CliEnv, gpu: usize) -> i64 {
    row(env, gpu)["expiry_time"]
        .as_i64()
        .expect("a manual reservation has expiry_time")
}

backend_matrix! {
    extend_lengthens_in_place => |backend| {
        let (env, _server) = cli_env(backend);
        env.init_fake(4);
        env.run(["reserve", "--gpu-ids", "1, 3", "--duration", "1h"]).assert_ok();
        let before = expiry(&env, 1);
        let extended = env.run(["extend", "2h"]);
        extended.assert_ok();
        assert!(
            extended.stdout.starts_with("Extended 2 GPU(s): [1, 3]; expires in 2h 59m")
                || extended.stdout.starts_with("Extended 2 GPU(s): [1, 3]; expires in 3h 0m 0s"),
            "{extended:?}"
        );
        assert!(extended.stdout.contains(" (at 20"), "{extended:?}");
        assert_eq!(expiry(&env, 1), before + 7200);
        assert_eq!(expiry(&env, 3), before + 7200);
        let details = row(&env, 1)["details"].as_str().unwrap().to_string();
        assert!(details.starts_with("expires in 2h 59m") || details.starts_with("expires in 3h 0m"), "{details}");
        assert!(details.contains("(at 20"), "{details}");

        let until = env.run(["extend", "--gpu-ids", "3", "--until", "2099-01-01 00:00"]);
        until.assert_code(2);
        assert!(until.stderr.contains("is more than 365d away"), "{until:?}");
        let too_far = env.run(["extend", "--gpu-ids", "3", "365d"]);
        too_far.assert_code(5);
        assert!(too_far.stderr.contains("longest a reservation may last"), "{too_far:?}");
        let free = env.run(["extend", "-G", "0", "1h"]);
        free.assert_code(5);
        assert_eq!(free.stderr.trim(), "Error: GPU 0 is not reserved");
        let too_long = env.run(["extend", "100000000d"]);
        too_long.assert_code(2);
        assert_eq!(too_long.stderr.trim(), "Error: duration '100000000d' is too long (at most 365d)");
        let neither = env.run(["extend"]);
        neither.assert_code(2);
        assert_eq!(expiry(&env, 3), before + 7200, "refusals change nothing");

        // A run reservation ends with its command.
        let mut run = env
            .command(["run", "--gpu-ids", "2", "--", "sleep", "30"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        assert!(wait_until(Duration::from_secs(10), || row(&env, 2)["type"] == "RUN"));
        let refused = env.run(["extend", "-G", "2", "1h"]);
        refused.assert_code(5);
        assert!(refused.stderr.contains("GPU 2 is a run reservation, which ends with its command"), "{refused:?}");
        // SIGTERM: the supervisor ends its command too.
        terminate(&mut run);
    },
    reserve_until_a_clock_time => |backend| {
        let (mut env, _server) = cli_env(backend);
        env.set_var("TZ", "UTC");
        env.init_fake(2);
        let reserved = env.run(["reserve", "--until", "23:59"]);
        reserved.assert_ok();
        assert!(reserved.stdout.contains(" 23:59)"), "{reserved:?}");
        let end = expiry(&env, 0);
        assert_eq!(end % 86400, 23 * 3600 + 59 * 60, "23:59 UTC");
        let past = env.run(["reserve", "--until", "2001-01-01 10:00"]);
        past.assert_code(2);
        assert!(past.stderr.contains("is in the past"), "{past:?}");
        let both = env.run(["reserve", "--until", "23:00", "--duration", "1h"]);
        both.assert_code(2);
        let bad = env.run(["reserve", "--until", "soon"]);
        bad.assert_code(2);
        assert!(bad.stderr.starts_with("Error: invalid time 'soon'"), "{bad:?}");
    },
    force_takes_over_your_own_busy_gpu => |backend| {
        let (mut env, _server) = cli_env(backend);
        let mut smi = FakeSmi::nvidia(env.dir.path(), 2);
        env.path_prefix.push(smi.path_dir());
        env.run(["admin", "--gpus", "2"]).assert_ok();
        let job = GpuJob::start(&[]);
        smi.set_memory(1, 20_000).add_process(1, job.pid(), "python3", 19_000);
        let plain = env.run(["reserve", "-G", "1"]);
        plain.assert_code(3);
        assert_eq!(plain.stderr.trim(), "Error: GPU 1 is in use without reservation");
        let forced = env.run(["reserve", "-G", "1", "--force"]);
        forced.assert_ok();
        assert_eq!(row(&env, 1)["type"], "MANUAL");
        let with_wait = env.run(["reserve", "-G", "0", "--force", "--wait"]);
        with_wait.assert_code(2);
    },
    adopt_follows_a_real_process => |backend| {
        let (mut env, _server) = cli_env(backend);
        let mut smi = FakeSmi::nvidia(env.dir.path(), 4);
        env.path_prefix.push(smi.path_dir());
        env.run(["admin", "--gpus", "4"]).assert_ok();
        let job = GpuJob::start(&[]);
        let pid = job.pid();
        smi.set_memory(1, 20_000)
            .add_process(1, pid, "python3", 19_000)
            .set_memory(2, 20_000)
            .add_process(2, pid, "python3", 19_000);
        assert_eq!(row(&env, 1)["status"], "UNRESERVED");

        let adopted = env.run(["adopt", &pid.to_string(), "--note", "found it"]);
        adopted.assert_ok();
        assert!(adopted.stdout.contains("run reservation of 2 GPU(s): [1, 2]"), "{adopted:?}");
        let rows = env.status_json();
        for gpu in [1, 2] {
            assert_eq!(rows[gpu]["status"], "IN_USE");
            assert_eq!(rows[gpu]["type"], "RUN");
            assert_eq!(rows[gpu]["pid"], pid);
            assert_eq!(rows[gpu]["details"], format!("adopted PID {pid} (python3)"));
            assert_eq!(rows[gpu]["note"], "found it");
        }
        let table = env.run(["status"]);
        assert!(table.stdout.contains(&format!("adopted PID {pid} (python3)")), "{table:?}");
        let again = env.run(["adopt", &pid.to_string()]);
        again.assert_code(3);
        assert!(again.stderr.contains("you already hold GPU 1"), "{again:?}");

        // The job exits: its GPUs are free at once here, and in the store soon.
        drop(job);
        smi.clear_processes().set_memory(1, 0).set_memory(2, 0);
        let rows = env.status_json();
        assert_eq!(rows[1]["status"], "AVAILABLE", "{}", rows[1]);
        assert_eq!(rows[2]["status"], "AVAILABLE");
        let mut store = env.store();
        assert!(
            wait_until(Duration::from_secs(10), || store
                .slots()
                .unwrap()
                .iter()
                .all(|slot| matches!(slot, canhazgpu::state::GpuSlot::Free { .. }))),
            "the keeper releases the GPUs in the store"
        );

        let missing = env.run(["adopt", "4194300"]);
        missing.assert_code(2);
        assert_eq!(missing.stderr.trim(), "Error: no process with PID 4194300");
        let idle = GpuJob::start(&[]);
        let no_gpu = env.run(["adopt", &idle.pid().to_string()]);
        no_gpu.assert_code(2);
        assert!(no_gpu.stderr.contains("use no GPU"), "{no_gpu:?}");
    },
    transfer_between_real_users => |backend| {
        ensure_user("chg_alice");
        ensure_user("chg_bob");
        let (env, _server) = shared_env(backend);
        env.init_fake(4);
        as_user(&env, "chg_alice", &["reserve", "-G", "0,1", "-d", "2h"]).assert_ok();
        let end = expiry(&env, 0);
        let given = as_user(&env, "chg_alice", &["transfer", "-G", "1", "--to", "chg_bob"]);
        given.assert_ok();
        assert!(given.stdout.starts_with("Transferred 1 GPU(s): [1] to chg_bob; expires in "), "{given:?}");
        let rows = env.status_json();
        assert_eq!(rows[0]["user"], "chg_alice");
        assert_eq!(rows[1]["user"], "chg_bob");
        assert_eq!(rows[1]["expiry_time"], end, "the expiry is kept");

        let not_hers = as_user(&env, "chg_alice", &["transfer", "-G", "1", "--to", "chg_alice"]);
        not_hers.assert_code(2);
        let not_yours = as_user(&env, "chg_alice", &["transfer", "-G", "1", "--to", "root"]);
        not_yours.assert_code(5);
        assert_eq!(not_yours.stderr.trim(), "Error: GPU 1 is reserved by chg_bob, not by you");
        let nobody = as_user(&env, "chg_alice", &["transfer", "-G", "0", "--to", "no_such_user_x"]);
        nobody.assert_code(2);
        assert_eq!(nobody.stderr.trim(), "Error: no such user: no_such_user_x");

        let bob_releases = as_user(&env, "chg_bob", &["release", "-G", "0,1"]);
        bob_releases.assert_code(5);
        assert_eq!(bob_releases.stdout.trim(), "Released 1 GPU(s): [1]");
        assert_eq!(
            bob_releases.stderr,
            "GPU 1: held 0h 0m\nError: GPU 0 is reserved by chg_alice, not by you\n"
        );
        as_user(&env, "chg_alice", &["release"]).assert_ok();

        // Each person is credited with their own part.
        let report = env.run(["report", "--json"]);
        report.assert_ok();
        let report: Value = serde_json::from_str(&report.stdout).unwrap();
        let users: Vec<&str> = report["users"]
            .as_array()
            .unwrap()
            .iter()
            .map(|user| user["name"].as_str().unwrap())
            .collect();
        assert!(users.contains(&"chg_alice") && users.contains(&"chg_bob"), "{report}");
    },
    adopt_and_force_respect_other_users => |backend| {
        ensure_user("chg_alice");
        ensure_user("chg_bob");
        let (mut env, _server) = shared_env(backend);
        let mut smi = FakeSmi::nvidia(env.dir.path(), 2);
        std::fs::set_permissions(smi.path_dir().parent().unwrap(), std::fs::Permissions::from_mode(0o755)).unwrap();
        env.path_prefix.push(smi.path_dir());
        env.run(["admin", "--gpus", "2"]).assert_ok();
        let bobs = BobsJob::start();
        smi.set_memory(0, 20_000).add_process(0, bobs.pid(), "sleep", 19_000);
        let adopt = as_user(&env, "chg_alice", &["adopt", &bobs.pid().to_string()]);
        adopt.assert_code(2);
        assert_eq!(adopt.stderr.trim(), format!("Error: PID {} belongs to chg_bob: only its owner or root may adopt it", bobs.pid()));
        let force = as_user(&env, "chg_alice", &["reserve", "-G", "0", "--force"]);
        force.assert_code(3);
        assert!(force.stderr.contains("by processes of chg_bob"), "{force:?}");
        // Root adopts it for bob.
        let adopted = env.run(["adopt", &bobs.pid().to_string()]);
        adopted.assert_ok();
        assert_eq!(row(&env, 0)["user"], "chg_bob");
    },
    extend_racing_a_reserve_storm_never_frees => |backend| {
        ensure_user("chg_bob");
        let (env, _server) = shared_env(backend);
        env.init_fake(1);
        env.run(["reserve", "-G", "0", "-d", "1m"]).assert_ok();
        let storm: Vec<Child> = (0..20)
            .map(|_| {
                user_command(&env, "chg_bob", &["reserve", "-G", "0", "-d", "1m"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for _ in 0..10 {
            env.run(["extend", "1m"]).assert_ok();
        }
        for mut child in storm {
            assert_eq!(child.wait().unwrap().code(), Some(3), "a storm reserve got the GPU");
        }
        assert_eq!(row(&env, 0)["user"], crate::cli_core::current_user());
        let report = env.run(["report", "--json"]);
        let report: Value = serde_json::from_str(&report.stdout).unwrap();
        assert!(
            report["users"].as_array().unwrap().iter().all(|user| user["name"] != "chg_bob"),
            "{report}"
        );
    },
}

/// `sleep` running as chg_bob, killed on drop.
pub struct BobsJob {
    runuser: Child,
    /// The `sleep` itself: runuser's child.
    sleep: u32,
}

impl BobsJob {
    pub fn start() -> Self {
        let runuser = Command::new("runuser")
            .args(["-u", "chg_bob", "--", "sleep", "60"])
            .spawn()
            .unwrap();
        let mut found = None;
        assert!(wait_until(Duration::from_secs(10), || {
            found = canhazgpu::supervise::proctree::live_descendants(runuser.id())
                .into_iter()
                .next();
            found.is_some()
        }));
        BobsJob {
            runuser,
            sleep: found.unwrap(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.sleep
    }
}

impl Drop for BobsJob {
    fn drop(&mut self) {
        // Only this job's own processes: other tests run chg_bob's jobs too.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.sleep as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.runuser.kill();
        let _ = self.runuser.wait();
    }
}

#[test]
fn durations_and_id_lists_accept_what_people_type() {
    let env = CliEnv::sqlite();
    env.init_fake(4);
    for duration in [".5h", "1h 30m", "1w"] {
        let reserved = env.run(["reserve", "-G", "1, 2", "-d", duration]);
        reserved.assert_ok();
        env.run(["release"]).assert_ok();
    }
    let absurd = env.run(["reserve", "-d", "100000000d"]);
    absurd.assert_code(2);
    assert_eq!(
        absurd.stderr.trim(),
        "Error: duration '100000000d' is too long (at most 365d)"
    );
}

#[test]
fn run_looks_the_command_up_before_reserving() {
    let env = CliEnv::sqlite();
    env.init_fake(1);
    let missing = env.run(["run", "--", "no-such-command-here"]);
    missing.assert_code(127);
    assert_eq!(
        missing.stderr.trim(),
        "Error: command not found: no-such-command-here"
    );
    assert_eq!(
        env.run(["report", "--json"])
            .stdout
            .matches("\"user\"")
            .count(),
        0
    );
}

#[test]
fn kill_grace_zero_kills_at_once() {
    let env = CliEnv::sqlite();
    env.init_fake(1);
    let started = std::time::Instant::now();
    let run = env.run([
        "run",
        "--timeout",
        "1s",
        "--kill-grace",
        "0",
        "--",
        "sh",
        "-c",
        "trap '' INT; sleep 20",
    ]);
    run.assert_code(124);
    assert!(run.stderr.contains("sent SIGKILL"), "{run:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn several_users_on_one_gpu_are_listed_alike() {
    ensure_user("chg_bob");
    let mut env = CliEnv::sqlite();
    let mut smi = FakeSmi::nvidia(env.dir.path(), 1);
    env.path_prefix.push(smi.path_dir());
    env.run(["admin", "--gpus", "1"]).assert_ok();
    let bobs = BobsJob::start();
    let mine = GpuJob::start(&[]);
    smi.set_memory(0, 30_000)
        .add_process(0, mine.pid(), "python3", 10_000)
        .add_process(0, bobs.pid(), "sleep", 10_000);
    let me = crate::cli_core::current_user();
    let mut users = vec![me.clone(), "chg_bob".to_string()];
    users.sort();
    assert_eq!(row(&env, 0)["unreserved_users"], serde_json::json!(users));
    let table = env.run(["status"]);
    assert!(
        table.stdout.contains(&format!("user {}", users.join(", "))),
        "{table:?}"
    );
}

#[test]
fn extend_and_transfer_act_on_another_host() {
    ensure_user("chg_bob");
    let server = crate::support::redis::TestRedis::launch();
    let on = |name: &str| {
        let mut env = CliEnv::redis(&server.url());
        env.set_var("CANHAZGPU_HOST_NAME", name);
        env
    };
    let (b, login) = (on("b"), on("login"));
    b.init_fake(2);
    b.run(["status"]).assert_ok(); // publishes b's snapshot
    login
        .run(["reserve", "--host", "b", "-G", "1", "-d", "1h"])
        .assert_ok();
    let before = expiry(&b, 1);
    let extended = login.run(["extend", "--host", "b", "30m"]);
    extended.assert_ok();
    assert!(
        extended
            .stdout
            .starts_with("Extended 1 GPU(s): [1] on b; expires in "),
        "{extended:?}"
    );
    assert_eq!(expiry(&b, 1), before + 1800);
    let given = login.run(["transfer", "--host", "b", "-G", "1", "--to", "chg_bob"]);
    given.assert_ok();
    assert!(
        given
            .stdout
            .starts_with("Transferred 1 GPU(s): [1] on b to chg_bob"),
        "{given:?}"
    );
    assert_eq!(row(&b, 1)["user"], "chg_bob");
}
