//! The agent's measurements: utilization scripted over time through the stand-in
//! `nvidia-smi`, attributed to the reservations, shown by `status` and reported when
//! a reservation ends, on every backend.

use std::process::Stdio;
use std::time::Duration;

use crate::cli_gpu::GpuJob;
use crate::support::cli::{CliEnv, wait_until};
use crate::support::fake_smi::FakeSmi;
use crate::support::{backend_matrix, cli_env};

fn terminate(child: &mut std::process::Child) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    child.wait().unwrap();
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
    },
}
