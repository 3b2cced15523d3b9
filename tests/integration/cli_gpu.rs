//! `status`, `reserve` and `admin` against a fake `nvidia-smi` on PATH and real
//! processes: UNRESERVED detection, owners, model detection, provider failures.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::cli_core::current_user;
use crate::support::cli::CliEnv;
use crate::support::fake_smi::FakeSmi;

/// A real process whose command line names a model, killed on drop.
pub struct GpuJob(Child);

impl GpuJob {
    pub fn start(args: &[&str]) -> Self {
        let child = Command::new("python3")
            .args(["-c", "import time; time.sleep(60)"])
            .args(args)
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn python3");
        GpuJob(child)
    }

    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for GpuJob {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn env_with_smi(gpus: u32) -> (CliEnv, FakeSmi) {
    let mut env = CliEnv::sqlite();
    let smi = FakeSmi::nvidia(env.dir.path(), gpus);
    env.path_prefix.push(smi.path_dir());
    (env, smi)
}

#[test]
fn unreserved_gpu_is_shown_and_never_allocated() {
    let (env, mut smi) = env_with_smi(4);
    let admin = env.run(["admin", "--gpus", "4"]);
    admin.assert_ok();
    assert!(admin.stderr.contains("found nvidia"), "{admin:?}");
    let too_many = env.run(["admin", "--gpus", "5", "--force"]);
    too_many.assert_code(2);
    assert!(too_many.stderr.contains("sees only 4"), "{too_many:?}");

    let job = GpuJob::start(&["--model", "meta-llama/Llama-2-7b-chat-hf"]);
    smi.set_memory(0, 45)
        .set_memory(2, 2048)
        .add_process(2, job.pid(), "python3", 2040);

    let rows = env.status_json();
    assert_eq!(rows[0]["status"], "AVAILABLE");
    assert_eq!(rows[0]["validation"], "45MB used");
    let me = current_user();
    assert_eq!(rows[2]["status"], "UNRESERVED");
    assert_eq!(rows[2]["details"], "WITHOUT RESERVATION");
    assert_eq!(rows[2]["unreserved_users"], serde_json::json!([me]));
    assert!(
        rows[2].get("user").is_none(),
        "as in the reference's JSON: {}",
        rows[2]
    );
    assert_eq!(
        rows[2]["process_info"],
        format!("2048MB used by PID {} (python3)", job.pid())
    );
    assert_eq!(rows[2]["model"]["provider"], "meta-llama");
    assert_eq!(rows[2]["model"]["model"], "meta-llama/Llama-2-7b-chat-hf");

    let table = env.run(["status"]);
    let row2 = table.stdout.lines().nth(4).unwrap();
    assert!(row2.starts_with("2    UNRESERVED"), "{row2}");
    assert!(row2.contains(&format!("user {me}")), "{row2}");
    assert!(row2.contains("meta-llama/Llama-2-7b-chat-hf"), "{row2}");

    let not_enough = env.run(["reserve", "--gpus", "4"]);
    not_enough.assert_code(3);
    assert_eq!(
        not_enough.stderr.trim(),
        "Error: Not enough GPUs available. Requested: 4, Available: 3 (1 GPUs in use without reservation - run 'canhazgpu status' for details)"
    );
    let busy = env.run(["reserve", "--gpu-ids", "2"]);
    busy.assert_code(3);
    assert_eq!(
        busy.stderr.trim(),
        "Error: GPU 2 is in use without reservation"
    );
    let three = env.run(["reserve", "--gpus", "3"]);
    assert!(
        three.stdout.starts_with("Reserved 3 GPU(s): [0, 1, 3]"),
        "{three:?}"
    );

    // A higher threshold makes the same GPU count as free.
    let rows = {
        let run = env.run(["--memory-threshold", "4096", "status", "--json"]);
        serde_json::from_str::<Vec<serde_json::Value>>(&run.stdout).unwrap()
    };
    assert_eq!(rows[2]["status"], "AVAILABLE");
    let mut with_env = env.command(["status", "--json"]);
    with_env.env("CANHAZGPU_MEMORY_THRESHOLD", "4096");
    let out = String::from_utf8(with_env.output().unwrap().stdout).unwrap();
    assert!(
        out.contains("\"gpu_id\": 2,\n    \"status\": \"AVAILABLE\""),
        "{out}"
    );
}

#[test]
fn hung_nvidia_smi_is_a_clear_error_not_a_hang() {
    let (mut env, mut smi) = env_with_smi(2);
    env.run(["admin", "--gpus", "2"]).assert_ok();
    smi.hang();
    env.set_var("CANHAZGPU_SMI_TIMEOUT", "1");
    let started = Instant::now();
    let reserve = env.run(["reserve"]);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    reserve.assert_code(1);
    assert_eq!(
        reserve.stderr.trim(),
        "Error: failed to validate GPU usage: nvidia-smi did not answer within 1s"
    );
    // status still shows the reservations, and says the usage is unknown.
    let status = env.run(["status", "--json"]);
    status.assert_ok();
    assert!(
        status.stderr.contains("could not check GPU usage"),
        "{status:?}"
    );
    let rows: Vec<serde_json::Value> = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(rows[0]["validation"], "usage unknown");
}

#[test]
fn colour_only_on_a_terminal_and_never_with_no_color() {
    let env = CliEnv::sqlite();
    env.init_fake(1);
    let on_tty = |no_color: bool| {
        let cmd = env.command(["status"]);
        let args = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>();
        let mut script = Command::new("script");
        script
            .args(["-q", "-e", "-c"])
            .arg(format!("{} {}", crate::support::cli::BIN, args.join(" ")))
            .arg("/dev/null");
        for (key, value) in cmd.get_envs() {
            match value {
                Some(v) => script.env(key, v),
                None => script.env_remove(key),
            };
        }
        script.env_remove("CLICOLOR_FORCE").env_remove("NO_COLOR");
        if no_color {
            script.env("NO_COLOR", "1");
        }
        String::from_utf8(script.output().expect("script").stdout).unwrap()
    };
    assert!(on_tty(false).contains("\u{1b}["), "colour on a terminal");
    assert!(
        !on_tty(true).contains("\u{1b}["),
        "NO_COLOR turns colour off"
    );
    let piped = env.run(["status"]);
    assert!(!piped.stdout.contains("\u{1b}["), "no colour when piped");
}

/// GPUs whose usage cannot be checked are never handed out: one the provider stopped
/// reporting, and one that reports no memory figure while a process uses it.
#[test]
fn unverifiable_gpus_are_not_allocated() {
    let (mut env, mut smi) = env_with_smi(4);
    env.run(["admin", "--gpus", "4"]).assert_ok();
    let job = GpuJob::start(&[]);
    smi.set_memory_unknown(1)
        .add_process(1, job.pid(), "python3", 2048);
    let rows = env.status_json();
    assert_eq!(rows[1]["status"], "UNRESERVED", "{}", rows[1]);

    // The driver now shows only GPUs 0-1 of the pool's 4.
    let smaller_dir = env.dir.path().join("smaller");
    std::fs::create_dir(&smaller_dir).unwrap();
    let smaller = FakeSmi::nvidia(&smaller_dir, 2);
    env.path_prefix = vec![smaller.path_dir()];
    let rows = env.status_json();
    assert_eq!(rows[3]["status"], "ERROR", "{}", rows[3]);
    assert_eq!(
        rows[3]["error"],
        "not reported by the GPU provider, so never allocated"
    );
    let taken = env.run(["reserve", "--gpu-ids", "3"]);
    taken.assert_code(3);
    let two = env.run(["reserve", "--gpus", "2"]);
    assert!(
        two.stdout.starts_with("Reserved 2 GPU(s): [0, 1]"),
        "{two:?}"
    );
}

/// Ctrl-C while a hung nvidia-smi holds up the allocation: once the check gives up,
/// `run` ends as interrupted (130), not with the GPU error, and reserves nothing.
#[test]
fn interrupting_run_during_a_hung_gpu_check_exits_130() {
    let (mut env, mut smi) = env_with_smi(1);
    env.run(["admin", "--gpus", "1"]).assert_ok();
    smi.hang();
    env.set_var("CANHAZGPU_SMI_TIMEOUT", "1");
    let child = env
        .command(["run", "--", "true"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("nothing reserved"), "{stderr}");
    assert!(!stderr.contains("Error:"), "{stderr}");
}
