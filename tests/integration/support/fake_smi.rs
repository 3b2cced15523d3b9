//! A stand-in `nvidia-smi` or `amd-smi`: a real shell script in a temporary directory
//! that answers `--help` and exactly the queries canhazgpu sends, from data files this
//! struct rewrites. Put [`FakeSmi::path_dir`] first on PATH (or use
//! [`FakeSmi::path_env`]) for the CLI, or hand [`FakeSmi::program`] to a provider.
//!
//! ```text
//! let dir = tempfile::tempdir().unwrap();
//! let mut smi = FakeSmi::nvidia(dir.path(), 4);
//! smi.set_memory(1, 20_000).add_process(1, 4242, "python3", 19_000);
//! Command::new(bin).env("PATH", smi.path_env());
//! ```

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use canhazgpu::gpu::{amd_smi, nvidia_smi};
use serde_json::{Value, json};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Vendor {
    Nvidia,
    /// ROCm 7 wraps the per-GPU list in `{"gpu_data": [...]}`, ROCm 6 does not.
    Amd {
        rocm7: bool,
    },
}

#[derive(Clone, Debug)]
struct FakeProcess {
    gpu: u32,
    pid: u32,
    name: String,
    memory_mb: u64,
}

pub struct FakeSmi {
    vendor: Vendor,
    /// Holds `bin/<tool>`, the data files, the call log and the hang/fail switches.
    root: PathBuf,
    /// Used memory per GPU; `None` is reported as not available.
    memory: Vec<Option<u64>>,
    /// GPU utilization per GPU, percent (nvidia-smi's `utilization.gpu`).
    utilization: Vec<u32>,
    processes: Vec<FakeProcess>,
}

/// The GPU name the fake nvidia-smi reports, as the driver spells it.
pub const NVIDIA_NAME: &str = "NVIDIA H100 80GB HBM3";

impl FakeSmi {
    /// A fake `nvidia-smi` with `gpus` idle H100s, under `dir/fake-nvidia-smi/`.
    pub fn nvidia(dir: &Path, gpus: u32) -> FakeSmi {
        FakeSmi::create(dir, Vendor::Nvidia, gpus)
    }

    /// A fake `amd-smi` (ROCm 7 JSON shape) with `gpus` idle GPUs, under `dir/fake-amd-smi/`.
    pub fn amd(dir: &Path, gpus: u32) -> FakeSmi {
        FakeSmi::create(dir, Vendor::Amd { rocm7: true }, gpus)
    }

    /// Switches a fake `amd-smi` to the ROCm 6 shape (bare JSON arrays).
    pub fn rocm6(&mut self) -> &mut Self {
        assert!(
            matches!(self.vendor, Vendor::Amd { .. }),
            "rocm6() is for amd-smi"
        );
        self.vendor = Vendor::Amd { rocm7: false };
        self.write_data()
    }

    fn create(dir: &Path, vendor: Vendor, gpus: u32) -> FakeSmi {
        let root = dir.join(format!("fake-{}", tool_name(vendor)));
        std::fs::create_dir_all(root.join("bin")).expect("create fake smi dir");
        let mut smi = FakeSmi {
            vendor,
            root,
            memory: vec![Some(0); gpus as usize],
            utilization: vec![0; gpus as usize],
            processes: Vec::new(),
        };
        smi.write_script();
        smi.write_data();
        smi
    }

    pub fn set_memory(&mut self, gpu: u32, mb: u64) -> &mut Self {
        self.memory[gpu as usize] = Some(mb);
        self.write_data()
    }

    pub fn set_utilization(&mut self, gpu: u32, percent: u32) -> &mut Self {
        self.utilization[gpu as usize] = percent;
        self.write_data()
    }

    /// Makes `gpu` report its memory as not available (`[N/A]` / `"N/A"`).
    pub fn set_memory_unknown(&mut self, gpu: u32) -> &mut Self {
        self.memory[gpu as usize] = None;
        self.write_data()
    }

    pub fn add_process(&mut self, gpu: u32, pid: u32, name: &str, mb: u64) -> &mut Self {
        assert!((gpu as usize) < self.memory.len(), "no GPU {gpu}");
        self.processes.push(FakeProcess {
            gpu,
            pid,
            name: name.to_owned(),
            memory_mb: mb,
        });
        self.write_data()
    }

    pub fn clear_processes(&mut self) -> &mut Self {
        self.processes.clear();
        self.write_data()
    }

    /// From now on every call sleeps (300 s) instead of answering, like a hung driver.
    pub fn hang(&mut self) -> &mut Self {
        std::fs::write(self.root.join("hang"), "").expect("write hang switch");
        self
    }

    /// From now on every call prints `message` on stderr and exits with status 1.
    pub fn fail_with(&mut self, message: &str) -> &mut Self {
        std::fs::write(self.root.join("fail"), format!("{message}\n")).expect("write fail switch");
        self
    }

    /// The PID of the last call that hung, once it has started sleeping.
    pub fn hung_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.root.join("hang.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// The script itself.
    pub fn program(&self) -> PathBuf {
        self.path_dir().join(tool_name(self.vendor))
    }

    /// The directory to put first on PATH.
    pub fn path_dir(&self) -> PathBuf {
        self.root.join("bin")
    }

    /// A PATH value with [`Self::path_dir`] in front of the current PATH.
    pub fn path_env(&self) -> OsString {
        let current = std::env::var_os("PATH").unwrap_or_default();
        std::env::join_paths(
            std::iter::once(self.path_dir()).chain(std::env::split_paths(&current)),
        )
        .expect("PATH entries without ':'")
    }

    /// The arguments of every call so far, one string per call.
    pub fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(self.root.join("calls.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// How many times the tool has been run, `--help` included.
    pub fn invocations(&self) -> usize {
        self.calls().len()
    }

    fn write_script(&self) {
        let root = self.root.to_str().expect("UTF-8 temp path");
        assert!(!root.contains('\''), "temp path with a quote: {root}");
        let (first, second) = match self.vendor {
            Vendor::Nvidia => (
                (nvidia_smi::GPU_QUERY.join(" "), "gpus.csv"),
                (nvidia_smi::APPS_QUERY.join(" "), "apps.csv"),
            ),
            Vendor::Amd { .. } => (
                (amd_smi::METRIC_QUERY.join(" "), "metric.json"),
                (amd_smi::PROCESS_QUERY.join(" "), "process.json"),
            ),
        };
        let name = tool_name(self.vendor);
        let script = format!(
            r#"#!/bin/sh
# Fake {name} written by the canhazgpu tests.
data='{root}'
printf '%s\n' "$*" >> "$data/calls.log"
if [ -e "$data/hang" ]; then
    echo $$ > "$data/hang.pid"
    exec sleep 300
fi
if [ -e "$data/fail" ]; then
    cat "$data/fail" >&2
    exit 1
fi
case "$*" in
    --help) echo "{name} (fake, for tests)" ;;
    "{first_args}") cat "$data/{first_file}" ;;
    "{second_args}") cat "$data/{second_file}" ;;
    *) echo "fake {name}: unsupported arguments: $*" >&2; exit 2 ;;
esac
"#,
            first_args = first.0,
            first_file = first.1,
            second_args = second.0,
            second_file = second.1,
        );
        let program = self.program();
        write_atomically(&program, &script);
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755))
            .expect("make fake smi executable");
    }

    fn write_data(&mut self) -> &mut Self {
        match self.vendor {
            Vendor::Nvidia => {
                write_atomically(&self.root.join("gpus.csv"), &self.nvidia_gpus_csv());
                write_atomically(&self.root.join("apps.csv"), &self.nvidia_apps_csv());
            }
            Vendor::Amd { rocm7 } => {
                let wrap = |entries: Vec<Value>| {
                    let json = if rocm7 {
                        json!({ "gpu_data": entries })
                    } else {
                        Value::Array(entries)
                    };
                    serde_json::to_string_pretty(&json).expect("serialise fake amd-smi JSON")
                };
                write_atomically(&self.root.join("metric.json"), &wrap(self.amd_metrics()));
                write_atomically(&self.root.join("process.json"), &wrap(self.amd_processes()));
            }
        }
        self
    }

    fn nvidia_gpus_csv(&self) -> String {
        self.memory
            .iter()
            .enumerate()
            .map(|(index, memory)| {
                let memory = memory.map_or_else(|| "[N/A]".to_owned(), |mb| mb.to_string());
                let utilization = self.utilization[index];
                format!(
                    "{index}, {}, {NVIDIA_NAME}, {memory}, {utilization}\n",
                    nvidia_uuid(index)
                )
            })
            .collect()
    }

    fn nvidia_apps_csv(&self) -> String {
        self.processes
            .iter()
            .map(|process| {
                format!(
                    "{}, {}, {}, {}\n",
                    process.pid,
                    process.name,
                    nvidia_uuid(process.gpu as usize),
                    process.memory_mb
                )
            })
            .collect()
    }

    fn amd_metrics(&self) -> Vec<Value> {
        self.memory
            .iter()
            .enumerate()
            .map(|(gpu, memory)| {
                let used = memory.map_or_else(|| json!("N/A"), |mb| json!(mb));
                json!({
                    "gpu": gpu,
                    "mem_usage": {
                        "total_vram": { "value": 196_592, "unit": "MB" },
                        "used_vram": { "value": used, "unit": "MB" },
                    },
                    "usage": {
                        "gfx_activity": { "value": self.utilization[gpu], "unit": "%" },
                    },
                })
            })
            .collect()
    }

    fn amd_processes(&self) -> Vec<Value> {
        (0..self.memory.len())
            .map(|gpu| {
                let mut list: Vec<Value> = self
                    .processes
                    .iter()
                    .filter(|process| process.gpu as usize == gpu)
                    .map(|process| {
                        json!({ "process_info": {
                            "name": process.name,
                            "pid": process.pid,
                            "memory_usage": {
                                "gtt_mem": { "value": 0, "unit": "B" },
                                "vram_mem": { "value": process.memory_mb * 1024 * 1024, "unit": "B" },
                            },
                        }})
                    })
                    .collect();
                if list.is_empty() {
                    list.push(json!({ "process_info": "No running processes detected" }));
                }
                json!({ "gpu": gpu, "process_list": list })
            })
            .collect()
    }
}

fn tool_name(vendor: Vendor) -> &'static str {
    match vendor {
        Vendor::Nvidia => "nvidia-smi",
        Vendor::Amd { .. } => "amd-smi",
    }
}

/// A stable, valid-looking UUID per GPU index.
pub fn nvidia_uuid(index: usize) -> String {
    format!("GPU-00000000-0000-4000-8000-{index:012}")
}

/// Replaces `path` in one step, so a concurrent call never reads half a file.
fn write_atomically(path: &Path, contents: &str) {
    let partial = path.with_extension("partial");
    std::fs::write(&partial, contents).expect("write fake smi file");
    std::fs::rename(&partial, path).expect("move fake smi file in place");
}
