//! The agent's measurements: utilization scripted over time through the stand-in
//! `nvidia-smi`, attributed to the reservations, shown by `status` and reported when
//! a reservation ends, on every backend.

use std::process::Stdio;
use std::time::Duration;

use crate::cli_gpu::GpuJob;
use crate::support::cli::{CliEnv, terminate, wait_until};
use crate::support::fake_smi::FakeSmi;
use crate::support::{backend_matrix, cli_env};

/// `agent --interval 1s`, its stderr (the agent's log) in `log`.
fn agent_logging_to(env: &CliEnv, log: &std::path::Path) -> std::process::Child {
    env.command(["agent", "--interval", "1s"])
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

/// Writes the system configuration and points the environment at it.
pub fn with_policy(env: &mut CliEnv, yaml: &str) {
    let dir = env.dir.path().join("etc");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.yaml"), yaml).unwrap();
    env.set_var("CANHAZGPU_SYSTEM_CONFIG_DIR", dir.to_str().unwrap());
}

backend_matrix! {
    the_agent_measures_each_reservation => |backend| {
        let (mut env, _server) = cli_env(backend);
        let mut smi = FakeSmi::nvidia(env.dir.path(), 3);
        env.path_prefix.push(smi.path_dir());
        env.run(["admin", "--gpus", "3"]).assert_ok();
        env.run(["reserve", "-G", "1,2", "-d", "1h"]).assert_ok();
        let job = GpuJob::start(&[]);
        smi.set_memory(1, 20_000)
            .add_process(1, job.pid(), "python3", 19_968)
            .set_utilization(1, 90)
            .set_utilization(2, 1);
        let mut agent = env
            .command(["agent", "--interval", "1s"])
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Measured, and sampled long enough for GPU 2 to have been idle a while.
        let measured = |env: &CliEnv| {
            let rows = env.status_json();
            rows[1]["mean_utilization_percent"] == 90
                && rows[2]["idle_seconds"].as_i64().is_some_and(|idle| idle >= 2)
        };
        assert!(wait_until(Duration::from_secs(15), || measured(&env)));
        terminate(&mut agent);

        let rows = env.status_json();
        assert_eq!(rows[1]["utilization_percent"], 90);
        assert!(rows[1]["validation"].as_str().unwrap().ends_with(", 90% util"), "{}", rows[1]);
        assert_eq!(rows[1]["peak_memory_mb"], 20_000);
        assert!(rows[1]["idle_seconds"].as_i64().unwrap() <= 5, "{}", rows[1]);
        assert_eq!(rows[2]["mean_utilization_percent"], 1);
        assert!(rows[2]["idle_seconds"].as_i64().unwrap() >= 2, "{}", rows[2]);
        assert!(rows[0].get("idle_seconds").is_none(), "a free GPU has no measurements");

        let released = env.run(["release", "-G", "1"]);
        released.assert_ok();
        assert!(
            released.stderr.contains("GPU 1: held 0h 0m, mean utilization 90%, peak memory 19.5 GB"),
            "{released:?}"
        );
        // The report weighs the user's readings: GPU 1 (finished, 90%) with GPU 2
        // (still held, 1%).
        let report = env.run(["report", "--json"]);
        let report: serde_json::Value = serde_json::from_str(&report.stdout).unwrap();
        let mean = report["users"][0]["mean_utilization_percent"].as_u64().unwrap();
        assert!((2..90).contains(&mean), "{report}");
        env.run(["release"]).assert_ok();
        let report = env.run(["report", "--json"]);
        let report: serde_json::Value = serde_json::from_str(&report.stdout).unwrap();
        assert_eq!(report["users"][0]["mean_utilization_percent"].as_u64(), Some(mean), "{report}");
    },
    idle_reservations_are_warned_then_released => |backend| {
        let (mut env, _server) = cli_env(backend);
        with_policy(&mut env, "policy:\n  idle_release_after: 4s\n  idle_warning: 2s\n");
        let mut smi = FakeSmi::nvidia(env.dir.path(), 3);
        env.path_prefix.push(smi.path_dir());
        env.run(["admin", "--gpus", "3"]).assert_ok();
        env.run(["reserve", "-G", "0,1", "-d", "1h"]).assert_ok();
        let mut run = env
            .command(["run", "-G", "2", "--", "sleep", "30"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        assert!(wait_until(Duration::from_secs(10), || env.status_json()[2]["type"] == "RUN"));
        smi.set_utilization(1, 80);
        let log = env.dir.path().join("agent.log");
        let mut agent = agent_logging_to(&env, &log);
        let released = || env.status_json()[0]["status"] == "AVAILABLE";
        assert!(wait_until(Duration::from_secs(20), released), "idle GPU 0 released");
        // Flagging the run comes with the same interval.
        assert!(wait_until(Duration::from_secs(5), || std::fs::read_to_string(&log)
            .unwrap()
            .contains("idle_run")));
        terminate(&mut agent);
        let log = std::fs::read_to_string(&log).unwrap();
        let me = crate::cli_core::current_user();
        assert_eq!(log.matches(&format!("idle_warning {me}: your reservation of GPU(s) [0]")).count(), 1, "{log}");
        assert_eq!(log.matches(&format!("idle_release {me}: your reservation of GPU(s) [0]")).count(), 1, "{log}");
        assert!(!log.contains("GPU(s) [1]"), "the busy GPU is left alone: {log}");
        let rows = env.status_json();
        assert_eq!(rows[1]["status"], "IN_USE");
        assert_eq!(rows[2]["type"], "RUN", "a run is never ended by policy");
        assert!(run.try_wait().unwrap().is_none(), "the command still runs");
        terminate(&mut run);
    },
}

/// A process of chg_bob that ignores SIGTERM (the trap is inherited by `sleep`).
fn stubborn_bob() -> std::process::Child {
    std::process::Command::new("runuser")
        .args([
            "-u",
            "chg_bob",
            "--",
            "sh",
            "-c",
            "trap '' TERM; exec sleep 60",
        ])
        .spawn()
        .unwrap()
}

/// The process runuser started for chg_bob.
fn bobs_pid(runuser: &std::process::Child) -> u32 {
    let mut found = None;
    assert!(wait_until(Duration::from_secs(5), || {
        found = canhazgpu::supervise::proctree::live_descendants(runuser.id())
            .into_iter()
            .next();
        found.is_some()
    }));
    found.unwrap()
}

#[test]
fn squatters_are_reported_then_stopped_while_ignored_processes_survive() {
    crate::multi_user::ensure_user("chg_bob");
    let mut env = CliEnv::sqlite();
    with_policy(
        &mut env,
        "policy:\n  foreign_use: terminate\n  unreserved_use: terminate\n  foreign_grace: 2s\n",
    );
    env.set_var("CANHAZGPU_MEMORY_IGNORE_PROCESSES", "Xorg");
    let mut smi = FakeSmi::nvidia(env.dir.path(), 2);
    env.path_prefix.push(smi.path_dir());
    env.run(["admin", "--gpus", "2"]).assert_ok();
    env.run(["reserve", "-G", "0", "-d", "1h"]).assert_ok();
    let mut squatter = stubborn_bob();
    let display = crate::follow::BobsJob::start();
    let mut unreserved = stubborn_bob();
    let (squatter_pid, display_pid, unreserved_pid) =
        (bobs_pid(&squatter), display.pid(), bobs_pid(&unreserved));
    smi.set_memory(0, 12_000)
        .add_process(0, squatter_pid, "python3", 10_000)
        .add_process(0, display_pid, "Xorg", 2_000)
        .set_memory(1, 8_000)
        .add_process(1, unreserved_pid, "python3", 8_000);

    let row = env.status_json()[0].clone();
    assert_eq!(row["foreign_users"], serde_json::json!(["chg_bob"]));
    assert!(
        row["validation"]
            .as_str()
            .unwrap()
            .ends_with(&format!(", also used by chg_bob (PID {squatter_pid})")),
        "{row}"
    );
    assert_eq!(env.status_json()[1]["status"], "UNRESERVED");

    let log = env.dir.path().join("agent.log");
    let mut agent = agent_logging_to(&env, &log);
    // SIGTERM is ignored; SIGKILL follows after the grace.
    assert!(wait_until(Duration::from_secs(20), || {
        squatter.try_wait().unwrap().is_some() && unreserved.try_wait().unwrap().is_some()
    }));
    terminate(&mut agent);
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(
        log.contains(&format!(
            "sent SIGTERM to PID {squatter_pid} of chg_bob on GPU 0"
        )),
        "{log}"
    );
    assert!(
        log.contains(&format!("sent SIGKILL to PID {squatter_pid} of chg_bob")),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "sent SIGTERM to PID {unreserved_pid} of chg_bob on GPU 1"
        )),
        "{log}"
    );
    assert_eq!(
        log.matches(&format!(
            "squatter {}: GPU 0",
            crate::cli_core::current_user()
        ))
        .count(),
        1,
        "the holder is told once: {log}"
    );
    assert!(!log.contains(&format!("PID {display_pid}")), "{log}");
    assert!(
        canhazgpu::gpu::procinfo::process_start_time(display_pid).is_some(),
        "an ignored process survives"
    );
}
