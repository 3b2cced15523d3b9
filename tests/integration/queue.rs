//! Waiting for GPUs through the real binary, with real concurrent processes, on both
//! backends: first come first served, no starvation, prompt wake-ups, waiters that
//! die or are interrupted, wait limits, errors that must not wait, notes and
//! display names.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

use crate::browser::{assert_contains, rendered_dom};
use crate::support::cli::{BIN, CliEnv, Run};
use crate::support::fake_smi::FakeSmi;
use crate::support::redis::TestRedis;
use crate::support::web::WebServer;
use crate::support::{BackendKind, backend_matrix, cli_env};

/// A test environment with an initialised fake pool; holds its Redis server.
struct Setup {
    env: CliEnv,
    _redis: Option<TestRedis>,
}

impl Setup {
    /// A store on `backend` with a pool of `gpus` fake GPUs (none: no pool yet).
    fn on(backend: BackendKind, gpus: u32) -> Self {
        let (env, redis) = cli_env(backend);
        if gpus > 0 {
            env.init_fake(gpus);
        }
        Setup { env, _redis: redis }
    }

    fn sqlite(gpus: u32) -> Self {
        Self::on(BackendKind::Sqlite, gpus)
    }

    fn redis(gpus: u32) -> Self {
        Self::on(BackendKind::Redis, gpus)
    }

    fn redis_upstream(gpus: u32) -> Self {
        Self::on(BackendKind::RedisUpstream, gpus)
    }

    fn run(&self, args: &[&str]) -> Run {
        self.env.run(args)
    }

    /// Starts `canhazgpu reserve --wait --short --duration 1h --note NOTE ARGS...`.
    fn waiter(&self, note: &str, args: &[&str]) -> Waiter {
        let mut command = self
            .env
            .command(["reserve", "--wait", "--short", "-d", "1h"]);
        command.args(["--note", note]).args(args);
        Waiter::spawn(command)
    }

    /// The queue as (note, collected GPUs), in order.
    fn queue(&self) -> Vec<(String, Vec<u64>)> {
        let run = self.run(&["queue", "--json"]);
        run.assert_ok();
        let report: Value = serde_json::from_str(&run.stdout).expect("queue --json");
        report["entries"]
            .as_array()
            .expect("entries")
            .iter()
            .map(|entry| {
                let collected = entry["allocated_gpus"].as_array().expect("allocated_gpus");
                (
                    entry["note"].as_str().unwrap_or_default().to_string(),
                    collected.iter().filter_map(Value::as_u64).collect(),
                )
            })
            .collect()
    }

    /// Waits until `queue` shows exactly `expected`.
    #[track_caller]
    fn expect_queue(&self, expected: &[(&str, &[u64])]) {
        let expected: Vec<(String, Vec<u64>)> = expected
            .iter()
            .map(|(note, gpus)| (note.to_string(), gpus.to_vec()))
            .collect();
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            seen = self.queue();
            if seen == expected {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("queue is {seen:?}, expected {expected:?}");
    }

    /// `status --json` statuses, e.g. ["AVAILABLE", "IN_USE"].
    fn statuses(&self) -> Vec<String> {
        self.env.statuses()
    }
}

/// A `canhazgpu` process started in the background.
struct Waiter {
    child: Option<Child>,
}

impl Waiter {
    fn spawn(mut command: Command) -> Self {
        let child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start canhazgpu");
        Waiter { child: Some(child) }
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().expect("running").id() as i32)
    }

    fn is_running(&mut self) -> bool {
        let child = self.child.as_mut().expect("not waited for yet");
        child.try_wait().expect("try_wait").is_none()
    }

    /// Waits up to `timeout` for the process to exit.
    #[track_caller]
    fn finish(&mut self, timeout: Duration) -> Run {
        let deadline = Instant::now() + timeout;
        while self.is_running() {
            if Instant::now() > deadline {
                panic!("canhazgpu still running after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let child = self.child.take().expect("running");
        child.wait_with_output().expect("collect output").into()
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        // Our own child only, by PID.
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

const SERVED_WITHIN: Duration = Duration::from_secs(10);

/// Four waiters started at once queue in some order; releases serve them in exactly
/// that order, and a newcomer that does not wait never jumps ahead of them.
fn fcfs_order_under_contention(setup: &Setup) {
    setup.run(&["reserve", "-d", "1h"]).assert_ok();
    let mut waiters: Vec<(String, Waiter)> = (1..=4)
        .map(|n| {
            let note = format!("w{n}");
            let waiter = setup.waiter(&note, &[]);
            (note, waiter)
        })
        .collect();
    let deadline = Instant::now() + SERVED_WITHIN;
    let order: Vec<String> = loop {
        let queue = setup.queue();
        if queue.len() == 4 {
            break queue.into_iter().map(|(note, _)| note).collect();
        }
        assert!(
            Instant::now() < deadline,
            "waiters did not queue: {queue:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    for (served, note) in order.iter().enumerate() {
        setup.run(&["release", "-G", "0"]).assert_ok();
        let newcomer = setup.run(&["reserve"]);
        newcomer.assert_code(3);
        assert!(
            newcomer.stderr.contains("Not enough GPUs available"),
            "{newcomer:?}"
        );
        let index = waiters.iter().position(|(n, _)| n == note).unwrap();
        let (_, mut waiter) = waiters.remove(index);
        let run = waiter.finish(SERVED_WITHIN);
        run.assert_ok();
        assert_eq!(run.stdout, "0\n", "--short prints only the IDs");
        assert!(
            run.stderr.contains("Waiting for GPUs... (queue position: "),
            "{run:?}"
        );
        let rest: Vec<(&str, &[u64])> = order[served + 1..]
            .iter()
            .map(|note| (note.as_str(), &[][..]))
            .collect();
        setup.expect_queue(&rest);
        // Time for a waiter to take a GPU it must not get.
        std::thread::sleep(Duration::from_millis(200));
        for (note, waiter) in &mut waiters {
            assert!(waiter.is_running(), "{note} was served out of order");
        }
    }
}

/// A request for both GPUs collects them one by one; a later one-GPU request waits
/// behind it instead of taking the first GPU that frees up.
fn large_request_is_not_starved(setup: &Setup) {
    setup.run(&["reserve", "-G", "0", "-d", "1h"]).assert_ok();
    setup.run(&["reserve", "-G", "1", "-d", "1h"]).assert_ok();
    let mut big = setup.waiter("big", &["--gpus", "2"]);
    setup.expect_queue(&[("big", &[])]);
    let mut small = setup.waiter("small", &[]);
    setup.expect_queue(&[("big", &[]), ("small", &[])]);

    setup.run(&["release", "-G", "1"]).assert_ok();
    setup.expect_queue(&[("big", &[1]), ("small", &[])]);
    std::thread::sleep(Duration::from_millis(300));
    assert!(small.is_running() && big.is_running());

    setup.run(&["release", "-G", "0"]).assert_ok();
    let run = big.finish(SERVED_WITHIN);
    run.assert_ok();
    assert_eq!(run.stdout, "0,1\n");
    assert!(
        run.stderr
            .contains("Waiting for GPUs... (queue position: 1, collected 1/2: [1])"),
        "{run:?}"
    );
    setup.expect_queue(&[("small", &[])]);

    setup.run(&["release", "-G", "0"]).assert_ok();
    let run = small.finish(SERVED_WITHIN);
    run.assert_ok();
    assert_eq!(run.stdout, "0\n");
}

/// A waiter holds the GPU soon after a release, not after some slow poll.
fn release_wakes_the_waiter_promptly(setup: &Setup) {
    setup.run(&["reserve", "-d", "1h"]).assert_ok();
    let mut waiter = setup.waiter("w", &[]);
    setup.expect_queue(&[("w", &[])]);
    let released = Instant::now();
    setup.run(&["release", "-G", "0"]).assert_ok();
    waiter.finish(SERVED_WITHIN).assert_ok();
    let latency = released.elapsed();
    assert!(
        latency < Duration::from_secs(2),
        "served {latency:?} after the release"
    );
}

/// A waiter killed with SIGKILL leaves the queue and holds nothing.
fn killed_waiter_leaves_the_queue(setup: &Setup) {
    setup.run(&["reserve", "-G", "1", "-d", "1h"]).assert_ok();
    let mut waiter = setup.waiter("doomed", &["--gpus", "2"]);
    setup.expect_queue(&[("doomed", &[0])]);
    assert_eq!(setup.statuses(), ["IN_USE", "IN_USE"]);
    kill(waiter.pid(), Signal::SIGKILL).expect("kill the waiter");
    let run = waiter.finish(SERVED_WITHIN);
    assert_eq!(run.code, None, "killed by a signal");
    setup.expect_queue(&[]);
    assert_eq!(setup.statuses(), ["AVAILABLE", "IN_USE"]);
    let newcomer = setup.run(&["reserve", "--short"]);
    newcomer.assert_ok();
    assert_eq!(newcomer.stdout, "0\n");
}

/// Ctrl-C (SIGINT) while waiting leaves the queue and releases what was collected.
fn interrupted_waiter_leaves_and_releases(setup: &Setup) {
    setup.run(&["reserve", "-G", "1", "-d", "1h"]).assert_ok();
    let mut waiter = setup.waiter("impatient", &["--gpus", "2"]);
    setup.expect_queue(&[("impatient", &[0])]);
    kill(waiter.pid(), Signal::SIGINT).expect("interrupt the waiter");
    let run = waiter.finish(SERVED_WITHIN);
    run.assert_code(130);
    assert_eq!(run.stdout, "");
    assert!(
        run.stderr.contains(
            "interrupted by SIGINT while waiting for GPUs (queue position: 1); left the queue and released the collected GPU(s) [0]"
        ),
        "{run:?}"
    );
    assert_eq!(setup.queue(), []);
    assert_eq!(setup.statuses(), ["AVAILABLE", "IN_USE"]);
}

/// `--wait 5s` gives up after five seconds with exit code 3.
fn wait_limit_times_out(setup: &Setup) {
    setup.run(&["reserve", "-d", "1h"]).assert_ok();
    let started = Instant::now();
    let run = setup.run(&["reserve", "--wait", "5s", "--short"]);
    let took = started.elapsed();
    run.assert_code(3);
    assert_eq!(run.stdout, "");
    assert!(
        run.stderr.contains(
            "Error: timed out after 0h 0m 5s waiting for GPUs (queue position: 1); left the queue"
        ),
        "{run:?}"
    );
    assert!(
        took >= Duration::from_secs(5) && took < Duration::from_secs(9),
        "{took:?}"
    );
    assert_eq!(setup.queue(), []);
}

/// Requests that can never succeed, or any error but "not available yet", fail at
/// once instead of waiting; without `--wait` (or config) nothing waits.
fn errors_that_waiting_cannot_fix_fail_at_once(setup: &Setup) {
    setup.run(&["reserve", "-d", "1h"]).assert_ok();
    let started = Instant::now();
    let too_many = setup.run(&["reserve", "--wait", "--gpus", "3"]);
    too_many.assert_code(2);
    assert!(
        too_many
            .stderr
            .contains("Requested 3 GPUs but this machine's pool has only 2"),
        "{too_many:?}"
    );
    let out_of_range = setup.run(&["reserve", "--wait", "-G", "7"]);
    out_of_range.assert_code(2);
    assert!(
        out_of_range
            .stderr
            .contains("GPU ID 7 is out of range (0-1)")
    );
    let busy = setup.run(&["reserve", "-G", "0"]);
    busy.assert_code(3);
    assert_eq!(
        busy.stderr.trim(),
        "Error: you already hold GPU 0",
        "{busy:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(setup.queue(), []);
}

/// `reserve.wait` in the configuration makes waiting the default; `--nonblock`
/// overrides it.
fn configured_wait_and_nonblock(setup: &Setup) {
    setup
        .run(&["reserve", "--gpus", "2", "-d", "1h"])
        .assert_ok();
    let mut command = setup.env.command(["reserve"]);
    command.env("CANHAZGPU_RESERVE_WAIT", "1s");
    let run = Run::from(command.output().expect("run canhazgpu"));
    run.assert_code(3);
    assert!(
        run.stderr
            .contains("Waiting for GPUs... (queue position: 1)"),
        "{run:?}"
    );
    assert!(run.stderr.contains("timed out after 0h 0m 1s"), "{run:?}");
    let mut command = setup.env.command(["reserve", "--nonblock"]);
    command.env("CANHAZGPU_RESERVE_WAIT", "true");
    let run = Run::from(command.output().expect("run canhazgpu"));
    run.assert_code(3);
    assert!(!run.stderr.contains("Waiting"), "{run:?}");
}

/// A note and a display name are stored with the reservation; the real user is
/// still recorded and releases it.
fn notes_and_display_names_are_shown(setup: &Setup) {
    setup
        .run(&["reserve", "--note", "fine-tune llama", "--user", "svc-ml"])
        .assert_ok();
    let rows = setup.env.status_json();
    let me = canhazgpu::gpu::procinfo::current_user().unwrap();
    assert_eq!(rows[0]["note"], "fine-tune llama");
    assert_eq!(rows[0]["user"], format!("{me} (svc-ml)"));
    assert!(rows[1].get("note").is_none());
    let table = setup.run(&["status"]);
    assert!(
        table.stdout.lines().next().unwrap().ends_with("NOTE"),
        "{table:?}"
    );
    assert!(table.stdout.contains("fine-tune llama"));
    let released = setup.run(&["release"]);
    released.assert_ok();
    assert_eq!(released.stdout, "Released 1 GPU(s): [0]\n");
    let bad = setup.run(&["reserve", "--note", "two\nlines"]);
    bad.assert_code(2);
}

/// `run --wait` waits its turn, then runs the command on the GPU and releases it;
/// SIGINT while it waits ends the wait without running anything.
fn run_waits_for_its_turn(setup: &Setup) {
    setup.run(&["reserve", "-d", "1h"]).assert_ok();
    let script = "echo \"GPUS=$CUDA_VISIBLE_DEVICES\"";
    let mut command = setup
        .env
        .command(["run", "--wait", "--note", "job", "--", "sh", "-c"]);
    command.arg(script);
    let mut job = Waiter::spawn(command);
    setup.expect_queue(&[("job", &[])]);
    let command = setup
        .env
        .command(["run", "--wait", "--note", "later", "--", "true"]);
    let mut later = Waiter::spawn(command);
    setup.expect_queue(&[("job", &[]), ("later", &[])]);
    kill(later.pid(), Signal::SIGINT).expect("interrupt the second run");
    let run = later.finish(SERVED_WITHIN);
    run.assert_code(130);
    assert!(
        run.stderr
            .contains("interrupted by SIGINT while waiting for GPUs"),
        "{run:?}"
    );
    setup.expect_queue(&[("job", &[])]);

    setup.run(&["release", "-G", "0"]).assert_ok();
    let run = job.finish(SERVED_WITHIN);
    run.assert_ok();
    assert_eq!(run.stdout, "GPUS=0\n");
    assert!(
        run.stderr
            .contains("Waiting for GPUs... (queue position: 1)")
            && run
                .stderr
                .contains("Reserved 1 GPU(s): [0] for command execution"),
        "{run:?}"
    );
    assert_eq!(setup.statuses(), ["AVAILABLE"]);
}

/// A free GPU in use without reservation is never handed to a waiter; once its
/// memory is released, the waiter gets it by its next turn. While every GPU is held,
/// waiting queries no GPU at all.
fn waiters_respect_real_gpu_usage(setup: &Setup, smi: &mut FakeSmi) {
    setup.run(&["reserve", "-G", "1", "-d", "1h"]).assert_ok();
    smi.set_memory(0, 30_000);
    let mut waiter = setup.waiter("w", &[]);
    setup.expect_queue(&[("w", &[])]);
    std::thread::sleep(Duration::from_millis(300));
    assert!(waiter.is_running());
    assert_eq!(setup.statuses(), ["UNRESERVED", "IN_USE"]);
    smi.set_memory(0, 0);
    let run = waiter.finish(Duration::from_secs(10));
    run.assert_ok();
    assert_eq!(run.stdout, "0\n");

    let mut waiter = setup.waiter("idle", &[]);
    setup.expect_queue(&[("idle", &[])]);
    let queries = smi.invocations();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(waiter.is_running());
    assert_eq!(smi.invocations(), queries, "{:?}", smi.calls());
}

/// `/api/queue` serves what `queue --json` prints; `status` says which GPUs are
/// collected for a waiting request.
fn web_api_serves_the_queue(setup: &Setup) {
    setup.run(&["reserve", "-G", "1", "-d", "1h"]).assert_ok();
    let _waiter = setup.waiter("pair", &["--gpus", "2", "--user", "svc"]);
    setup.expect_queue(&[("pair", &[0])]);
    let server = WebServer::start(&setup.env, 1);
    let cli = || -> Value {
        let run = setup.run(&["queue", "--json"]);
        serde_json::from_str(&run.stdout).expect("queue --json")
    };
    // Waiting times tick every second: retry until both agree.
    let mut last = (Value::Null, Value::Null);
    for _ in 0..20 {
        last = (server.get_json("/api/queue", 200), cli());
        if last.0 == last.1 {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(last.0, last.1);
    let entry = &last.0["entries"][0];
    assert_eq!(entry["user"], "svc");
    assert_eq!(entry["requested_count"], 2);
    assert_eq!(entry["allocated_gpus"], serde_json::json!([0]));
    assert_eq!(last.0["total_waiting"], 1);
    let status = server.get_json("/api/status", 200);
    assert_eq!(status[0]["details"], "collected for a queued request (1/2)");
}

/// Both backends with a fake `nvidia-smi` showing two idle GPUs.
fn with_fake_smi(backend: fn(u32) -> Setup, case: fn(&Setup, &mut FakeSmi)) {
    let mut setup = backend(0);
    let mut smi = FakeSmi::nvidia(setup.env.dir.path(), 2);
    setup.env.path_prefix.push(smi.path_dir());
    setup.run(&["admin", "--gpus", "2"]).assert_ok();
    case(&setup, &mut smi);
}

#[test]
fn sqlite_waiters_respect_real_gpu_usage() {
    with_fake_smi(Setup::sqlite, waiters_respect_real_gpu_usage);
}

#[test]
fn redis_waiters_respect_real_gpu_usage() {
    with_fake_smi(Setup::redis, waiters_respect_real_gpu_usage);
}

/// Upstream canhazgpu's queue entries in a shared Redis are waiters like ours (served
/// first); unreadable entries are dropped instead of breaking the queue.
#[test]
fn redis_upstream_entries_wait_and_unreadable_ones_are_dropped() {
    let setup = Setup::redis_upstream(1);
    let redis = setup._redis.as_ref().unwrap();
    let mut raw = redis.raw();
    let upstream = serde_json::json!({
        "id": "u1", "user": "alice", "actual_user": "alice", "requested_count": 1,
        "allocated_gpus": [], "reservation_type": "manual",
        "expiry_duration": 3_600_000_000_000_i64,
        "enqueue_time": "2026-05-14T16:36:44.123-04:00",
        "last_heartbeat": jiff::Timestamp::now().to_string(),
    });
    for (score, id, json) in [
        (1, "u1", upstream.to_string()),
        (
            2,
            "bad",
            r#"{"user":"x","requested_ids":"abc","reservation_type":"run"}"#.into(),
        ),
        (3, "worse", "not json".into()),
    ] {
        ::redis::cmd("ZADD")
            .arg("canhazgpu:queue")
            .arg(score)
            .arg(id)
            .exec(&mut raw)
            .unwrap();
        ::redis::cmd("SET")
            .arg(format!("canhazgpu:queue:entry:{id}"))
            .arg(json)
            .exec(&mut raw)
            .unwrap();
    }
    assert_eq!(setup.queue(), [(String::new(), vec![])]);
    setup.run(&["reserve"]).assert_code(3);
    assert_eq!(setup.queue(), [(String::new(), vec![0])]);
    let members: Vec<String> = ::redis::cmd("ZRANGE")
        .arg("canhazgpu:queue")
        .arg(0)
        .arg(-1)
        .query(&mut raw)
        .unwrap();
    assert_eq!(members, ["u1"]);
    let entry: String = ::redis::cmd("GET")
        .arg("canhazgpu:queue:entry:u1")
        .query(&mut raw)
        .unwrap();
    let entry: Value = serde_json::from_str(&entry).unwrap();
    assert_eq!(entry["allocated_gpus"], serde_json::json!([0]));
}

backend_matrix! {
    fcfs_order_under_contention => |backend| super::fcfs_order_under_contention(&Setup::on(backend, 1)),
    large_request_is_not_starved => |backend| super::large_request_is_not_starved(&Setup::on(backend, 2)),
    release_wakes_the_waiter_promptly => |backend| super::release_wakes_the_waiter_promptly(&Setup::on(backend, 1)),
    killed_waiter_leaves_the_queue => |backend| super::killed_waiter_leaves_the_queue(&Setup::on(backend, 2)),
    interrupted_waiter_leaves_and_releases => |backend| super::interrupted_waiter_leaves_and_releases(&Setup::on(backend, 2)),
    wait_limit_times_out => |backend| super::wait_limit_times_out(&Setup::on(backend, 1)),
    errors_that_waiting_cannot_fix_fail_at_once => |backend| super::errors_that_waiting_cannot_fix_fail_at_once(&Setup::on(backend, 2)),
    configured_wait_and_nonblock => |backend| super::configured_wait_and_nonblock(&Setup::on(backend, 2)),
    notes_and_display_names_are_shown => |backend| super::notes_and_display_names_are_shown(&Setup::on(backend, 2)),
    web_api_serves_the_queue => |backend| super::web_api_serves_the_queue(&Setup::on(backend, 2)),
    run_waits_for_its_turn => |backend| super::run_waits_for_its_turn(&Setup::on(backend, 1)),
}

/// The dashboard lists the waiters, with user names and notes as text, never markup.
#[test]
fn dashboard_shows_the_queue_as_text() {
    let setup = Setup::sqlite(1);
    setup.run(&["reserve", "-d", "1h"]).assert_ok();
    let note = "<img src=x onerror=alert(3)>";
    let mut command = setup.env.command(["reserve", "--wait", "-d", "1h"]);
    command.args(["--note", note, "--user", "<b>svc</b>"]);
    let _waiter = Waiter::spawn(command);
    setup.expect_queue(&[(note, &[])]);
    let server = WebServer::start(&setup.env, 1);
    let dom = rendered_dom(&server.url("/"));
    assert_contains(&dom, r#"<tr data-position="1">"#);
    assert_contains(
        &dom,
        r#"<td class="note">&lt;img src=x onerror=alert(3)&gt;</td>"#,
    );
    assert_contains(
        &dom,
        "(&lt;b&gt;svc&lt;/b&gt;)</td><td>1 GPU</td><td>0/1</td>",
    );
    assert!(!dom.contains("<img") && !dom.contains("<b>svc"), "{dom}");
}

/// Another Unix user cannot release a reservation made under a display name; its
/// real owner can.
#[test]
fn display_names_do_not_grant_release() {
    crate::multi_user::ensure_user("chg_alice");
    crate::multi_user::ensure_user("chg_bob");
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let state = dir.path().join("state");
    let as_user = |user: &str, args: &[&str]| -> Run {
        let mut command = Command::new("runuser");
        command.args(["-u", user, "--", BIN]);
        for (key, _) in std::env::vars() {
            if key.starts_with("CANHAZGPU_") {
                command.env_remove(&key);
            }
        }
        command
            .env("HOME", "/nonexistent")
            .env("CANHAZGPU_NVML", "0")
            .arg("--state-dir")
            .arg(&state)
            .args(args);
        command.output().expect("run canhazgpu").into()
    };
    as_user("root", &["admin", "--gpus", "1", "--provider", "fake"]).assert_ok();
    as_user("chg_alice", &["reserve", "--user", "chg_bob"]).assert_ok();
    let bob = as_user("chg_bob", &["release", "-G", "0"]);
    bob.assert_code(5);
    assert_eq!(
        bob.stderr,
        "Error: GPU 0 is reserved by chg_alice (chg_bob), not by you\n"
    );
    let status = as_user("chg_bob", &["status", "--json"]);
    let rows: Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(rows[0]["user"], "chg_alice (chg_bob)");
    let alice = as_user("chg_alice", &["release"]);
    assert_eq!(alice.stdout, "Released 1 GPU(s): [0]\n");
}
