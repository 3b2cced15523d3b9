//! The real `NvidiaSmi`/`AmdSmi` providers driven through fake tool scripts, with real
//! child processes standing in for GPU jobs; and, where a driver exists, NVML checked
//! against nvidia-smi.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use canhazgpu::error::Error;
use canhazgpu::gpu::amd_smi::AmdSmi;
use canhazgpu::gpu::model::{ModelInfo, detect_for_pid};
use canhazgpu::gpu::nvidia_smi::NvidiaSmi;
use canhazgpu::gpu::{GpuProvider, GpuUsage, detect_among, procinfo};
use canhazgpu::state::ProviderKind;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::support::fake_smi::{FakeSmi, NVIDIA_NAME};

const TIMEOUT: Duration = Duration::from_secs(5);

/// A `sleep 30` whose parent shell carries a model in its command line, like a
/// worker under `vllm serve`. Both are killed (as a process group) on drop.
struct FakeJob {
    shell: Child,
    /// The `sleep` child of the shell.
    worker_pid: u32,
}

impl FakeJob {
    fn start(model_args: &[&str]) -> FakeJob {
        let mut shell = Command::new("bash")
            .args(["-c", "sleep 30 & echo $!; wait", "launcher"])
            .args(model_args)
            .stdout(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("start bash");
        let mut line = String::new();
        BufReader::new(shell.stdout.take().expect("piped stdout"))
            .read_line(&mut line)
            .expect("read worker pid");
        let worker_pid = line.trim().parse().expect("worker pid");
        FakeJob { shell, worker_pid }
    }

    fn shell_pid(&self) -> u32 {
        self.shell.id()
    }
}

impl Drop for FakeJob {
    fn drop(&mut self) {
        let group = Pid::from_raw(i32::try_from(self.shell.id()).expect("pid fits i32"));
        let _ = killpg(group, Signal::SIGKILL);
        let _ = self.shell.wait();
    }
}

fn memory_of(usage: &[GpuUsage]) -> Vec<Option<u64>> {
    usage.iter().map(|gpu| gpu.memory_used_mb).collect()
}

#[test]
fn nvidia_smi_usage_takes_two_calls_and_joins_processes() {
    let dir = tempfile::tempdir().unwrap();
    let mut smi = FakeSmi::nvidia(dir.path(), 4);
    smi.set_memory(1, 20_480)
        .set_memory(3, 512)
        .add_process(1, 4242, "/usr/bin/python3", 20_000)
        .add_process(1, 4243, "vllm", 400)
        .add_process(3, 4244, "python", 500);
    let provider = NvidiaSmi::new(smi.program(), TIMEOUT);

    let usage = provider.usage().unwrap();

    assert_eq!(smi.invocations(), 2, "calls: {:?}", smi.calls());
    assert_eq!(
        memory_of(&usage),
        vec![Some(0), Some(20_480), Some(0), Some(512)]
    );
    let expected_name = NVIDIA_NAME.strip_prefix("NVIDIA ");
    assert!(usage.iter().all(|gpu| gpu.name.as_deref() == expected_name));
    let pids: Vec<Vec<u32>> = usage
        .iter()
        .map(|gpu| gpu.processes.iter().map(|p| p.pid).collect())
        .collect();
    assert_eq!(pids, vec![vec![], vec![4242, 4243], vec![], vec![4244]]);
    assert_eq!(usage[1].processes[0].name, "/usr/bin/python3");
    assert_eq!(usage[1].processes[0].used_memory_mb, Some(20_000));
}

#[test]
fn fake_tools_are_found_through_path() {
    let dir = tempfile::tempdir().unwrap();
    let nvidia = FakeSmi::nvidia(dir.path(), 1);
    let amd = FakeSmi::amd(dir.path(), 1);
    for (smi, name) in [(&nvidia, "nvidia-smi"), (&amd, "amd-smi")] {
        let output = Command::new(name)
            .arg("--help")
            .env("PATH", smi.path_env())
            .output()
            .unwrap();
        assert!(output.status.success(), "{name}: {output:?}");
        assert!(String::from_utf8_lossy(&output.stdout).contains("fake"));
        assert_eq!(smi.calls(), vec!["--help"]);
    }
}

#[test]
fn nvidia_smi_device_count_takes_one_call() {
    let dir = tempfile::tempdir().unwrap();
    let smi = FakeSmi::nvidia(dir.path(), 8);
    let provider = NvidiaSmi::new(smi.program(), TIMEOUT);
    assert_eq!(provider.device_count().unwrap(), 8);
    assert_eq!(smi.invocations(), 1);
}

#[test]
fn nvidia_smi_keeps_gpus_whose_memory_is_not_available() {
    let dir = tempfile::tempdir().unwrap();
    let mut smi = FakeSmi::nvidia(dir.path(), 2);
    smi.set_memory(0, 100).set_memory_unknown(1);
    let usage = NvidiaSmi::new(smi.program(), TIMEOUT).usage().unwrap();
    assert_eq!(memory_of(&usage), vec![Some(100), None]);
}

#[test]
fn nvidia_smi_failure_is_reported_on_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let mut smi = FakeSmi::nvidia(dir.path(), 2);
    smi.fail_with("Failed to initialize NVML: Driver/library version mismatch");
    let err = NvidiaSmi::new(smi.program(), TIMEOUT).usage().unwrap_err();
    assert_eq!(
        err,
        Error::Gpu(
            "nvidia-smi failed: Failed to initialize NVML: Driver/library version mismatch".into()
        )
    );
}

#[test]
fn missing_tools_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let nvidia = NvidiaSmi::new(dir.path().join("nvidia-smi"), TIMEOUT);
    let amd = AmdSmi::new(dir.path().join("amd-smi"), TIMEOUT);
    for (provider, name) in [
        (&nvidia as &dyn GpuProvider, "nvidia-smi"),
        (&amd, "amd-smi"),
    ] {
        let message = provider.usage().unwrap_err().to_string();
        assert!(
            message.starts_with(&format!("{name} not found")),
            "{message}"
        );
    }
}

#[test]
fn hung_tools_are_killed_after_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let mut nvidia = FakeSmi::nvidia(dir.path(), 1);
    let mut amd = FakeSmi::amd(dir.path(), 1);
    nvidia.hang();
    amd.hang();
    let providers: [(&dyn GpuProvider, &FakeSmi, &str); 2] = [
        (
            &NvidiaSmi::new(nvidia.program(), Duration::from_secs(1)),
            &nvidia,
            "nvidia-smi",
        ),
        (
            &AmdSmi::new(amd.program(), Duration::from_secs(1)),
            &amd,
            "amd-smi",
        ),
    ];
    for (provider, smi, name) in providers {
        let started = Instant::now();
        let err = provider.usage().unwrap_err();
        assert_eq!(err, Error::Gpu(format!("{name} did not answer within 1s")));
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{name} took {:?}",
            started.elapsed()
        );
        // The first query hung, so the second was never sent.
        assert_eq!(smi.invocations(), 1);
        let hung = smi.hung_pid().expect("the script recorded its pid");
        assert_eq!(procinfo::stat(hung), None, "{name} still running as {hung}");
    }
}

#[test]
fn amd_smi_reads_both_rocm_shapes_in_two_calls() {
    for rocm6 in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let mut smi = FakeSmi::amd(dir.path(), 3);
        if rocm6 {
            smi.rocm6();
        }
        smi.set_memory(2, 40_960)
            .set_memory_unknown(0)
            .add_process(2, 777, "python3", 40_000)
            .add_process(2, 778, "vllm", 900);
        let provider = AmdSmi::new(smi.program(), TIMEOUT);

        let usage = provider.usage().unwrap();

        assert_eq!(smi.invocations(), 2, "rocm6={rocm6}");
        assert_eq!(memory_of(&usage), vec![None, Some(0), Some(40_960)]);
        assert!(usage[0].processes.is_empty() && usage[1].processes.is_empty());
        let processes: Vec<(u32, &str, Option<u64>)> = usage[2]
            .processes
            .iter()
            .map(|p| (p.pid, p.name.as_str(), p.used_memory_mb))
            .collect();
        assert_eq!(
            processes,
            vec![(777, "python3", Some(40_000)), (778, "vllm", Some(900))]
        );
        assert_eq!(provider.device_count().unwrap(), 3);
    }
}

#[test]
fn a_real_gpu_process_has_its_owner_name_and_model_found() {
    let job = FakeJob::start(&["--model", "meta-llama/Llama-2-7b"]);
    let dir = tempfile::tempdir().unwrap();
    let mut smi = FakeSmi::nvidia(dir.path(), 2);
    // nvidia-smi cannot name processes of other containers: `[N/A]` makes the
    // provider fall back to /proc.
    smi.set_memory(1, 9_000)
        .add_process(1, job.worker_pid, "[N/A]", 8_800);

    let usage = NvidiaSmi::new(smi.program(), TIMEOUT).usage().unwrap();

    let process = &usage[1].processes[0];
    assert_eq!(process.pid, job.worker_pid);
    assert_eq!(process.name, "sleep");
    assert_eq!(procinfo::parent_pid(job.worker_pid), Some(job.shell_pid()));
    assert_eq!(
        procinfo::process_user(process.pid),
        procinfo::current_user().unwrap()
    );
    let expected = ModelInfo {
        provider: "meta-llama".into(),
        model: "meta-llama/Llama-2-7b".into(),
    };
    // Found in the parent's command line for the worker, directly for the shell.
    assert_eq!(detect_for_pid(job.worker_pid), Some(expected.clone()));
    assert_eq!(detect_for_pid(job.shell_pid()), Some(expected));

    let start = procinfo::process_start_time(job.worker_pid).unwrap();
    assert!(procinfo::process_alive(job.worker_pid, start));
    let worker = job.worker_pid;
    drop(job);
    // SIGKILL is delivered asynchronously to the shell's child.
    let deadline = Instant::now() + TIMEOUT;
    while procinfo::process_alive(worker, start) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!procinfo::process_alive(worker, start));
    smi.clear_processes();
    let usage = NvidiaSmi::new(smi.program(), TIMEOUT).usage().unwrap();
    assert!(usage.iter().all(|gpu| gpu.processes.is_empty()));
}

#[test]
fn a_process_without_a_model_has_none() {
    let job = FakeJob::start(&["--epochs", "3"]);
    assert_eq!(detect_for_pid(job.worker_pid), None);
    assert_eq!(detect_for_pid(job.shell_pid()), None);
}

#[test]
fn detection_needs_exactly_one_vendor() {
    let dir = tempfile::tempdir().unwrap();
    let nvidia = NvidiaSmi::new(FakeSmi::nvidia(dir.path(), 1).program(), TIMEOUT);
    let amd = AmdSmi::new(FakeSmi::amd(dir.path(), 1).program(), TIMEOUT);
    let no_nvidia = NvidiaSmi::new(dir.path().join("missing/nvidia-smi"), TIMEOUT);
    let no_amd = AmdSmi::new(dir.path().join("missing/amd-smi"), TIMEOUT);

    assert_eq!(
        detect_among(false, &nvidia, &no_amd),
        Ok(ProviderKind::Nvidia)
    );
    assert_eq!(
        detect_among(true, &no_nvidia, &no_amd),
        Ok(ProviderKind::Nvidia)
    );
    assert_eq!(detect_among(false, &no_nvidia, &amd), Ok(ProviderKind::Amd));

    let both = detect_among(false, &nvidia, &amd).unwrap_err();
    assert!(matches!(both, Error::Usage(_)), "{both:?}");
    assert!(both.to_string().contains("--provider"), "{both}");

    assert_eq!(
        detect_among(false, &no_nvidia, &no_amd)
            .unwrap_err()
            .to_string(),
        "no GPU provider found (NVML, nvidia-smi and amd-smi are missing) - \
         use 'canhazgpu admin --provider fake' for a demo pool"
    );
}

/// On a machine with an NVIDIA driver, NVML and nvidia-smi must agree; elsewhere NVML
/// must fail to load rather than pretend. `scripts/device-check.sh` runs this on a GPU.
#[test]
#[cfg(feature = "nvml")]
fn nvml_matches_nvidia_smi_when_present() {
    use canhazgpu::gpu::nvml::NvmlProvider;
    /// Tolerance between NVML and nvidia-smi memory figures, taken moments apart.
    const MEMORY_TOLERANCE_MB: u64 = 1024;

    let smi = NvidiaSmi::from_path(canhazgpu::gpu::tool::DEFAULT_TIMEOUT);
    let smi_answers = smi.answers();
    let nvml = match NvmlProvider::init() {
        Ok(nvml) => nvml,
        Err(err) => {
            let message = err.to_string();
            assert!(
                !smi_answers,
                "nvidia-smi answers but NVML failed: {message}"
            );
            assert!(
                message.contains("libnvidia-ml.so.1") || message.contains("driver is not loaded"),
                "unexpected NVML error: {message}"
            );
            return;
        }
    };
    let started = Instant::now();
    let from_nvml = nvml.usage().unwrap();
    println!("NVML usage took {:?}", started.elapsed());
    assert_eq!(nvml.device_count().unwrap() as usize, from_nvml.len());
    report("NVML", &from_nvml);
    if !smi_answers {
        println!("nvidia-smi is not on PATH: NVML checked alone");
        return;
    }
    let started = Instant::now();
    let from_smi = smi.usage().unwrap();
    println!("nvidia-smi usage took {:?}", started.elapsed());
    report("nvidia-smi", &from_smi);
    assert_eq!(from_nvml.len(), from_smi.len(), "device counts differ");
    for (a, b) in from_nvml.iter().zip(&from_smi) {
        assert_eq!(a.index, b.index);
        assert_eq!(a.name, b.name, "GPU {} name", a.index);
        let (Some(x), Some(y)) = (a.memory_used_mb, b.memory_used_mb) else {
            panic!(
                "GPU {} memory unknown: NVML {:?}, nvidia-smi {:?}",
                a.index, a.memory_used_mb, b.memory_used_mb
            );
        };
        println!(
            "GPU {}: memory NVML {x} MiB, nvidia-smi {y} MiB, delta {} MiB",
            a.index,
            x.abs_diff(y)
        );
        assert!(
            x.abs_diff(y) <= MEMORY_TOLERANCE_MB,
            "GPU {} memory {x} vs {y}",
            a.index
        );
        let pids = |usage: &GpuUsage| {
            let mut pids: Vec<u32> = usage.processes.iter().map(|p| p.pid).collect();
            pids.sort_unstable();
            pids
        };
        assert_eq!(pids(a), pids(b), "GPU {} processes", a.index);
    }
}

#[cfg(feature = "nvml")]
fn report(source: &str, usage: &[GpuUsage]) {
    for gpu in usage {
        println!(
            "{source}: GPU {} {:?} {:?} MiB",
            gpu.index, gpu.name, gpu.memory_used_mb
        );
        for process in &gpu.processes {
            println!(
                "{source}:   pid {} {} {:?} MiB user={} model={:?}",
                process.pid,
                process.name,
                process.used_memory_mb,
                procinfo::process_user(process.pid),
                detect_for_pid(process.pid)
            );
        }
    }
}
