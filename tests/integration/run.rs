//! `canhazgpu run` end to end: the real binary, real child processes and real
//! signals, against both backends.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, ChildStdout, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::support::cli::{BIN, Backend, CliEnv, Run, wait_until};
use crate::support::redis::TestRedis;
use crate::support::{backend_matrix, cli_env};

backend_matrix! {
    exit_status_is_the_commands => |backend| {
        let (env, _guard) = cli_env(backend);
        exit_status_case(&env);
    },
    child_sees_its_gpus_and_a_run_reservation => |backend| {
        let (env, _guard) = cli_env(backend);
        environment_case(&env);
    },
    stdin_reaches_the_command => |backend| {
        let (env, _guard) = cli_env(backend);
        stdin_case(&env);
    },
    command_that_cannot_start_releases_at_once => |backend| {
        let (env, _guard) = cli_env(backend);
        not_runnable_case(&env);
    },
    signals_are_passed_on_and_waited_for => |backend| {
        let (env, _guard) = cli_env(backend);
        signals_case(&env);
    },
    timeout_stops_the_whole_tree => |backend| {
        let (env, _guard) = cli_env(backend);
        timeout_case(&env);
    },
    kill_9_of_canhazgpu_frees_the_gpu_at_once => |backend| {
        let (env, _guard) = cli_env(backend);
        kill_9_case(&env);
    },
    release_of_own_run_reservation_is_noticed => |backend| {
        let (env, _guard) = cli_env(backend);
        release_notice_case(&env);
    },
    twenty_concurrent_runs_on_eight_gpus => |backend| {
        let (env, _guard) = cli_env(backend);
        concurrent_case(&env);
    },
}

/// A `run` started in the background, in its own process group so that signals
/// reach canhazgpu alone (as `kill PID` from another terminal would), with its
/// stdout readable line by line.
struct Background {
    child: Child,
    stdout: BufReader<ChildStdout>,
}

impl Background {
    fn start(env: &CliEnv, args: &[&str]) -> Self {
        let mut child = env
            .command(args)
            .process_group(0)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn canhazgpu run");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        Background { child, stdout }
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    /// The next line the command printed.
    fn line(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("read stdout");
        line.trim_end().to_string()
    }

    fn signal(&self, signal: Signal) {
        kill(self.pid(), signal).expect("signal canhazgpu");
    }

    fn finish(mut self) -> Run {
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut self.stdout, &mut rest).expect("read stdout");
        let mut run: Run = self.child.wait_with_output().expect("wait").into();
        run.stdout = rest;
        run
    }
}

fn all_available(env: &CliEnv) {
    let statuses = env.statuses();
    assert!(
        statuses.iter().all(|s| s == "AVAILABLE"),
        "every GPU is free again: {statuses:?}"
    );
}

fn process_gone(pid: i32) -> bool {
    // Gone, or a zombie waiting for a parent that is not ours to reap it.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            stat.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

fn exit_status_case(env: &CliEnv) {
    env.init_fake(2);
    let normal = env.run(["run", "--", "true"]);
    normal.assert_ok();
    assert_eq!(normal.stdout, "", "stdout belongs to the command");
    assert!(
        normal.stderr.starts_with("Reserved 1 GPU(s): [")
            && normal.stderr.contains("] for command execution"),
        "{normal:?}"
    );
    env.run(["run", "--gpus", "2", "--", "sh", "-c", "exit 3"])
        .assert_code(3);
    // Deaths by signal are reported as a shell does: 128 + the signal number.
    env.run(["run", "--", "sh", "-c", "kill -KILL $$"])
        .assert_code(137);
    env.run(["run", "--", "sh", "-c", "kill -SEGV $$"])
        .assert_code(139);
    env.run(["run", "--", "sh", "-c", "kill -TERM $$"])
        .assert_code(143);
    all_available(env);
    // Recorded for `report`. (Upstream's Redis history is a set of JSON records, so
    // identical runs ending in the same second count once there.)
    let history = env.store().history(0, i64::MAX).expect("history");
    let gpus: HashSet<u32> = history
        .iter()
        .filter(|r| r.kind == canhazgpu::state::ReservationKind::Run)
        .map(|r| r.gpu_id)
        .collect();
    assert_eq!(gpus, HashSet::from([0, 1]), "{history:?}");
}

fn environment_case(env: &CliEnv) {
    env.init_fake(4);
    let script = r#"echo "$CUDA_VISIBLE_DEVICES|$CUDA_DEVICE_ORDER|${HIP_VISIBLE_DEVICES-unset}"; "$CANHAZGPU_BIN" status --json"#;
    let run: Run = env
        .command(["run", "--gpu-ids", "3,1", "--", "sh", "-c", script])
        .env("CUDA_VISIBLE_DEVICES", "7")
        .env("CANHAZGPU_BIN", BIN)
        .output()
        .expect("run")
        .into();
    run.assert_ok();
    assert_eq!(
        run.stderr.lines().next(),
        Some("Reserved 2 GPU(s): [1, 3] for command execution")
    );
    let (first, json) = run.stdout.split_once('\n').expect("two outputs");
    assert_eq!(
        first, "1,3|PCI_BUS_ID|unset",
        "inherited CUDA_VISIBLE_DEVICES is replaced"
    );
    let rows: Vec<serde_json::Value> = serde_json::from_str(json).expect("status JSON");
    for (id, row) in rows.iter().enumerate() {
        if id == 1 || id == 3 {
            assert_eq!(row["status"], "IN_USE", "{row}");
            assert_eq!(row["type"], "RUN", "{row}");
            assert_eq!(
                row["user"],
                crate::cli_core::current_user().as_str(),
                "{row}"
            );
            let details = row["details"].as_str().unwrap_or_default();
            assert!(
                details.starts_with("heartbeat 0h 0m ") && details.ends_with("s ago"),
                "{row}"
            );
        } else {
            assert_eq!(row["status"], "AVAILABLE", "{row}");
        }
    }
    all_available(env);
}

/// On AMD, HIP gets the same IDs and an inherited ROCR_VISIBLE_DEVICES (which would
/// renumber the GPUs HIP sees) is removed.
#[test]
fn amd_child_sees_hip_visible_devices() {
    let mut env = CliEnv::sqlite();
    let smi = crate::support::fake_smi::FakeSmi::amd(env.dir.path(), 4);
    env.path_prefix.push(smi.path_dir());
    env.run(["admin", "--gpus", "4", "--provider", "amd"])
        .assert_ok();
    let script = r#"echo "$CUDA_VISIBLE_DEVICES|$HIP_VISIBLE_DEVICES|${ROCR_VISIBLE_DEVICES-unset}|$CUDA_DEVICE_ORDER""#;
    let run: Run = env
        .command(["run", "--gpu-ids", "2,0", "--", "sh", "-c", script])
        .env("ROCR_VISIBLE_DEVICES", "3")
        .env("HIP_VISIBLE_DEVICES", "3")
        .output()
        .expect("run")
        .into();
    run.assert_ok();
    assert_eq!(run.stdout, "0,2|0,2|unset|PCI_BUS_ID\n");
}

fn stdin_case(env: &CliEnv) {
    env.init_fake(1);
    let mut child = env
        .command([
            "run",
            "--",
            "sh",
            "-c",
            "read first; echo \"got $first\"; cat",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(b"hello\nworld\n").expect("write stdin");
    drop(stdin);
    let run: Run = child.wait_with_output().expect("wait").into();
    run.assert_ok();
    assert_eq!(run.stdout, "got hello\nworld\n");
    all_available(env);
}

fn not_runnable_case(env: &CliEnv) {
    env.init_fake(1);
    let missing = env.run(["run", "--", "canhazgpu-no-such-command", "--flag"]);
    missing.assert_code(127);
    assert!(
        missing
            .stderr
            .ends_with("Error: command not found: canhazgpu-no-such-command\n"),
        "{missing:?}"
    );
    all_available(env);
    let script = env.dir.path().join("not-executable.sh");
    std::fs::write(&script, "#!/bin/sh\necho never\n").expect("write script");
    let denied = env.run([OsStr::new("run"), OsStr::new("--"), script.as_os_str()]);
    denied.assert_code(126);
    assert!(
        denied.stderr.contains("Error: command not executable: "),
        "{denied:?}"
    );
    assert_eq!(denied.stdout, "");
    all_available(env);
}

fn signals_case(env: &CliEnv) {
    env.init_fake(1);
    // The command cleans up slowly on a signal; canhazgpu must wait for it.
    let script = r#"trap 'sleep 0.3; echo "cleaned up"; exit 5' TERM HUP INT
echo ready
while :; do sleep 0.05; done"#;
    for signal in [Signal::SIGTERM, Signal::SIGHUP, Signal::SIGINT] {
        let mut run = Background::start(env, &["run", "--", "sh", "-c", script]);
        assert_eq!(run.line(), "ready");
        run.signal(signal);
        let ended = run.finish();
        ended.assert_code(5);
        assert_eq!(
            ended.stdout, "cleaned up\n",
            "{signal} was passed on: {ended:?}"
        );
        all_available(env);
    }
}

fn timeout_case(env: &CliEnv) {
    env.init_fake(1);
    // A command that stops on SIGINT: no waiting for the grace period.
    let started = Instant::now();
    let quick = env.run([
        "run",
        "--timeout",
        "1s",
        "--kill-grace",
        "20s",
        "--",
        "sleep",
        "30",
    ]);
    quick.assert_code(124);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "no fixed grace sleep"
    );
    assert!(quick.stderr.contains("(timeout: 0h 0m 1s)"), "{quick:?}");
    assert!(
        quick.stderr.contains("timeout reached; sent SIGINT"),
        "{quick:?}"
    );
    assert!(!quick.stderr.contains("SIGKILL to"), "{quick:?}");
    all_available(env);

    // A grandchild that ignores SIGINT, outliving its parent: SIGKILL after the grace.
    let pid_file = env.dir.path().join("grandchild.pid");
    let script = format!(
        r#"sh -c 'trap "" INT; echo $$ > {}; exec sleep 30' &
wait"#,
        pid_file.display()
    );
    let stubborn = env.run([
        "run",
        "--timeout",
        "1s",
        "--kill-grace",
        "1s",
        "--",
        "sh",
        "-c",
        &script,
    ]);
    stubborn.assert_code(124);
    assert!(stubborn.stderr.contains("sent SIGKILL"), "{stubborn:?}");
    let grandchild: i32 = read_pid(&pid_file);
    assert!(
        wait_until(Duration::from_secs(2), || process_gone(grandchild)),
        "the grandchild {grandchild} was killed"
    );
    all_available(env);
}

fn read_pid(path: &Path) -> i32 {
    let text = std::fs::read_to_string(path).expect("pid file");
    text.trim().parse().expect("pid")
}

fn kill_9_case(env: &CliEnv) {
    env.init_fake(1);
    let mut run = Background::start(env, &["run", "--", "sh", "-c", "echo $$; exec sleep 30"]);
    let command: i32 = run.line().parse().expect("command pid");
    assert_eq!(env.statuses(), vec!["IN_USE"]);
    run.signal(Signal::SIGKILL);
    let killed = Instant::now();
    // Not `finish`: the command still holds the stdout pipe open.
    run.child.wait().expect("reap canhazgpu");
    let reserve = env.run(["reserve", "--gpu-ids", "0", "--duration", "1m"]);
    let took = killed.elapsed();
    reserve.assert_ok();
    assert!(
        took < Duration::from_secs(2),
        "GPU reservable {took:?} after kill -9"
    );
    // The command itself was not killed: canhazgpu never loses a job.
    assert!(!process_gone(command), "the command keeps running");
    kill(Pid::from_raw(command), Signal::SIGKILL).expect("stop the orphaned command");
    env.run(["release"]).assert_ok();
}

fn release_notice_case(env: &CliEnv) {
    env.init_fake(1);
    let script = r#""$CANHAZGPU_BIN" release --gpu-ids "$CUDA_VISIBLE_DEVICES"; sleep 2.5; echo still running"#;
    let run: Run = env
        .command([
            "run",
            "--heartbeat-interval",
            "1s",
            "--",
            "sh",
            "-c",
            script,
        ])
        .env("CANHAZGPU_BIN", BIN)
        .output()
        .expect("run")
        .into();
    run.assert_ok();
    assert_eq!(run.stdout, "Released 1 GPU(s): [0]\nstill running\n");
    assert!(
        run.stderr
            .contains("the reservation of GPU(s) [0] was released from outside"),
        "{run:?}"
    );
    all_available(env);
}

fn concurrent_case(env: &CliEnv) {
    env.init_fake(8);
    let out = env.dir.path().join("gpus");
    let go = env.dir.path().join("go");
    let script = format!(
        r#"echo "$CUDA_VISIBLE_DEVICES" >> {}; while [ ! -e {} ]; do sleep 0.05; done"#,
        out.display(),
        go.display()
    );
    let mut children: Vec<Child> = (0..20)
        .map(|_| {
            env.command(["run", "--", "sh", "-c", &script])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn run")
        })
        .collect();
    // The 12 that get no GPU fail at once; the 8 others wait for `go`.
    assert!(
        wait_until(Duration::from_secs(30), || {
            children
                .iter_mut()
                .filter_map(|c| c.try_wait().ok().flatten())
                .count()
                >= 12
        }),
        "12 runs fail"
    );
    assert!(wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(&out).is_ok_and(|text| text.lines().count() >= 8)
    }));
    let seen = std::fs::read_to_string(&out).expect("gpu list");
    let gpus: HashSet<&str> = seen.lines().collect();
    assert_eq!(seen.lines().count(), 8, "8 commands ran: {seen}");
    assert_eq!(gpus.len(), 8, "none shares a GPU: {seen}");
    std::fs::write(&go, "").expect("go");
    let runs: Vec<Run> = children
        .into_iter()
        .map(|c| c.wait_with_output().expect("wait").into())
        .collect();
    assert_eq!(runs.iter().filter(|r| r.ok()).count(), 8);
    for failed in runs.iter().filter(|r| !r.ok()) {
        failed.assert_code(3);
        assert_eq!(
            failed.stderr,
            "Error: Not enough GPUs available. Requested: 1, Available: 0\n"
        );
    }
    all_available(env);
}

/// Starts `run` (heartbeat every second) of a command that prints `started`, waits
/// until the returned path exists, then prints `finished`.
fn gated_run(env: &CliEnv) -> (Background, std::path::PathBuf) {
    let go = env.dir.path().join("go");
    let script = format!(
        "echo started; while [ ! -e {} ]; do sleep 0.05; done; echo finished",
        go.display()
    );
    let mut run = Background::start(
        env,
        &[
            "run",
            "--heartbeat-interval",
            "1s",
            "--",
            "sh",
            "-c",
            &script,
        ],
    );
    assert_eq!(run.line(), "started");
    (run, go)
}

/// Redis stopped and restarted empty while a command runs: the command keeps
/// running, canhazgpu warns once and puts its reservation back, pool included.
#[test]
fn redis_restart_with_data_loss_during_a_run() {
    let mut server = TestRedis::launch();
    let env = CliEnv::redis(&server.url());
    env.init_fake(2);
    let (run, go) = gated_run(&env);
    server.stop();
    std::thread::sleep(Duration::from_millis(2500));
    server.start();
    assert!(
        wait_until(Duration::from_secs(5), || {
            let status = env.run(["status", "--json"]);
            status.ok() && status.stdout.matches("\"type\": \"RUN\"").count() == 1
        }),
        "the run reservation is back, in a pool recreated by it"
    );
    std::fs::write(&go, "").expect("go");
    let ended = run.finish();
    ended.assert_ok();
    assert_eq!(
        ended.stdout, "finished\n",
        "the command was never disturbed"
    );
    assert_eq!(
        ended.stderr.matches("cannot reach the store").count(),
        1,
        "warned once: {ended:?}"
    );
    assert!(ended.stderr.contains("re-asserted"), "{ended:?}");
    all_available(&env);
}

/// A GPU taken by someone else while the store had lost the run reservation is
/// left to them, with a loud warning; the command still runs to its end.
#[test]
fn redis_restart_gpu_taken_meanwhile_is_reported() {
    let mut server = TestRedis::launch();
    let env = CliEnv::redis(&server.url());
    env.init_fake(1);
    let (run, go) = gated_run(&env);
    // Frozen, canhazgpu cannot re-assert before the other reservation is made.
    run.signal(Signal::SIGSTOP);
    server.stop();
    server.start();
    env.init_fake(1);
    env.run(["reserve", "--gpu-ids", "0", "--duration", "1h"])
        .assert_ok();
    run.signal(Signal::SIGCONT);
    std::thread::sleep(Duration::from_secs(3));
    std::fs::write(&go, "").expect("go");
    let ended = run.finish();
    ended.assert_ok();
    let user = crate::cli_core::current_user();
    assert!(
        ended.stderr.contains(&format!(
            "WARNING: GPU 0 was taken by {user} while the store was unreachable"
        )),
        "{ended:?}"
    );
    let rows = env.status_json();
    assert_eq!(
        rows[0]["type"], "MANUAL",
        "the other reservation stands: {rows:?}"
    );
}

/// Ctrl-C while the allocation waits for the store: the allocation is let finish
/// and released at once; a second Ctrl-C quits without waiting.
#[test]
fn interrupt_while_allocating_leaks_nothing() {
    let env = CliEnv::sqlite();
    env.init_fake(1);
    let Backend::Sqlite(state) = &env.backend else {
        unreachable!("a SQLite environment")
    };
    let lock = rusqlite::Connection::open(state.join("state.db")).expect("open database");
    for interrupts in [1, 2] {
        // Another writer holds the database: the allocation waits for it.
        lock.execute_batch("BEGIN IMMEDIATE").expect("lock");
        let run = Background::start(&env, &["run", "--", "echo", "must not run"]);
        std::thread::sleep(Duration::from_millis(300));
        for _ in 0..interrupts {
            run.signal(Signal::SIGINT);
            std::thread::sleep(Duration::from_millis(100));
        }
        if interrupts == 2 {
            let mut run = run;
            let code = run.child.wait().expect("wait").code();
            assert_eq!(code, Some(130), "the second interrupt quits at once");
            lock.execute_batch("COMMIT").expect("unlock");
        } else {
            lock.execute_batch("COMMIT").expect("unlock");
            let ended = run.finish();
            ended.assert_code(130);
            assert_eq!(ended.stdout, "", "the command never started");
            assert!(
                ended
                    .stderr
                    .contains("received before the command started; released GPU(s) [0]"),
                "{ended:?}"
            );
        }
        all_available(&env);
    }
}
