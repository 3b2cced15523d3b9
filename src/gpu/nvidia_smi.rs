//! NVIDIA through `nvidia-smi`'s CSV query interface: exactly two invocations per
//! usage check (one per GPU list, one per process list), since each call can take
//! seconds on large machines.

use std::collections::HashMap;
use std::ffi::OsString;
use std::time::Duration;

use super::tool::{Tool, ToolOutput};
use super::{GpuProcess, GpuProvider, GpuUsage, procinfo};
use crate::error::{Error, Result};

pub const GPU_QUERY: [&str; 2] = [
    "--query-gpu=index,gpu_uuid,name,memory.used,utilization.gpu",
    "--format=csv,noheader,nounits",
];
pub const APPS_QUERY: [&str; 2] = [
    "--query-compute-apps=pid,process_name,gpu_uuid,used_memory",
    "--format=csv,noheader,nounits",
];

pub struct NvidiaSmi {
    tool: Tool,
}

/// One row of the GPU query.
#[derive(Debug, PartialEq, Eq)]
struct GpuRow {
    index: u32,
    uuid: String,
    name: String,
    memory_used_mb: Option<u64>,
    utilization_percent: Option<u32>,
}

/// One row of the compute-apps query.
#[derive(Debug, PartialEq, Eq)]
struct AppRow {
    pid: u32,
    name: String,
    uuid: String,
    used_memory_mb: Option<u64>,
}

impl NvidiaSmi {
    /// `nvidia-smi` from PATH, given `timeout` (`smi_timeout`, default 10 s).
    pub fn from_path(timeout: Duration) -> Self {
        NvidiaSmi {
            tool: Tool {
                name: "nvidia-smi",
                program: "nvidia-smi".into(),
                timeout,
            },
        }
    }

    /// A specific executable with a fixed timeout (tests, unusual installs).
    pub fn new(program: impl Into<OsString>, timeout: Duration) -> Self {
        NvidiaSmi {
            tool: Tool {
                name: "nvidia-smi",
                program: program.into(),
                timeout,
            },
        }
    }

    /// Whether the tool exists and `nvidia-smi --help` succeeds.
    pub fn answers(&self) -> bool {
        self.tool.answers()
    }

    fn gpu_rows(&self) -> Result<Vec<GpuRow>> {
        let output = self.tool.run(&GPU_QUERY)?;
        if !output.success {
            return Err(self.tool.exit_error(&output));
        }
        parse_gpu_rows(&output.stdout)
    }

    fn app_rows(&self) -> Result<Vec<AppRow>> {
        let output = self.tool.run(&APPS_QUERY)?;
        app_rows_from(&output).ok_or_else(|| self.tool.exit_error(&output))?
    }
}

impl GpuProvider for NvidiaSmi {
    fn device_count(&self) -> Result<u32> {
        let rows = self.gpu_rows()?;
        u32::try_from(rows.len()).map_err(|_| Error::Gpu("nvidia-smi listed too many GPUs".into()))
    }

    fn usage(&self) -> Result<Vec<GpuUsage>> {
        let gpus = self.gpu_rows()?;
        let apps = self.app_rows()?;
        Ok(combine(gpus, apps))
    }
}

/// Parses the GPU query. Fields are split on commas and trimmed; the name takes
/// whatever lies between the UUID and the memory, so a comma in it does no harm.
fn parse_gpu_rows(text: &str) -> Result<Vec<GpuRow>> {
    data_lines(text)
        .map(|line| {
            let fields: Vec<&str> = line.split(',').map(str::trim).collect();
            let [index, uuid, name @ .., memory, utilization] = fields.as_slice() else {
                return Err(bad_line(line));
            };
            if name.is_empty() {
                return Err(bad_line(line));
            }
            Ok(GpuRow {
                index: index.parse().map_err(|_| bad_line(line))?,
                uuid: (*uuid).to_owned(),
                name: strip_vendor(&name.join(",")).to_owned(),
                memory_used_mb: parse_mib(memory),
                // `[N/A]` or `[Not Supported]` on some devices.
                utilization_percent: utilization
                    .trim_end_matches('%')
                    .trim()
                    .parse()
                    .ok()
                    .filter(|percent| *percent <= 100),
            })
        })
        .collect()
}

/// Parses the compute-apps query; `None` when the call failed for real. nvidia-smi
/// exits non-zero with an empty stderr on some drivers when no process runs.
fn app_rows_from(output: &ToolOutput) -> Option<Result<Vec<AppRow>>> {
    if !output.success {
        return output.stderr.trim().is_empty().then(|| Ok(Vec::new()));
    }
    Some(parse_app_rows(&output.stdout))
}

fn parse_app_rows(text: &str) -> Result<Vec<AppRow>> {
    data_lines(text)
        .filter(|line| !line.starts_with("No running"))
        .map(|line| {
            let fields: Vec<&str> = line.split(',').map(str::trim).collect();
            let [pid, name @ .., uuid, memory] = fields.as_slice() else {
                return Err(bad_line(line));
            };
            Ok(AppRow {
                pid: pid.parse().map_err(|_| bad_line(line))?,
                name: name.join(","),
                uuid: (*uuid).to_owned(),
                used_memory_mb: parse_mib(memory),
            })
        })
        .collect()
}

fn data_lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines().map(str::trim).filter(|line| !line.is_empty())
}

fn bad_line(line: &str) -> Error {
    Error::Gpu(format!("unexpected nvidia-smi output line: '{line}'"))
}

/// A MiB figure; `[N/A]`, `[Not Supported]` and the like give `None`. A ` MiB` suffix
/// is tolerated in case `nounits` is ignored.
fn parse_mib(field: &str) -> Option<u64> {
    field.trim_end_matches("MiB").trim().parse().ok()
}

/// `NVIDIA H100 80GB HBM3` → `H100 80GB HBM3`.
pub fn strip_vendor(name: &str) -> &str {
    name.strip_prefix("NVIDIA ").unwrap_or(name)
}

/// Joins processes to GPUs by UUID; a process on a GPU the first query did not list
/// (it appeared in between) is dropped.
fn combine(gpus: Vec<GpuRow>, apps: Vec<AppRow>) -> Vec<GpuUsage> {
    let position: HashMap<String, usize> = gpus
        .iter()
        .enumerate()
        .map(|(position, gpu)| (gpu.uuid.clone(), position))
        .collect();
    let mut usage: Vec<GpuUsage> = gpus
        .into_iter()
        .map(|gpu| GpuUsage {
            index: gpu.index,
            name: Some(gpu.name),
            memory_used_mb: gpu.memory_used_mb,
            utilization_percent: gpu.utilization_percent,
            ..GpuUsage::default()
        })
        .collect();
    for app in apps {
        if let Some(&at) = position.get(&app.uuid) {
            usage[at].processes.push(GpuProcess {
                pid: app.pid,
                name: process_name(app.pid, app.name),
                used_memory_mb: app.used_memory_mb,
                ..GpuProcess::default()
            });
        }
    }
    usage.sort_by_key(|gpu| gpu.index);
    usage
}

/// The reported name, or the one from /proc where nvidia-smi cannot tell (`[N/A]`).
fn process_name(pid: u32, reported: String) -> String {
    if reported.is_empty() || reported.starts_with('[') {
        procinfo::process_name(pid).unwrap_or(reported)
    } else {
        reported
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GPUS_FIXTURE: &str = include_str!("../../tests/fixtures/nvidia-smi-gpus.csv");
    const APPS_FIXTURE: &str = include_str!("../../tests/fixtures/nvidia-smi-apps.csv");

    fn success(stdout: &str) -> ToolOutput {
        ToolOutput {
            success: true,
            stdout: stdout.into(),
            stderr: String::new(),
        }
    }

    #[test]
    fn parses_recorded_gpu_query() {
        let rows = parse_gpu_rows(GPUS_FIXTURE).unwrap();
        assert_eq!(rows.len(), 4);
        assert_eq!(
            rows[0],
            GpuRow {
                index: 0,
                uuid: "GPU-6f2b1c3e-8a41-4b7e-9d52-0c1f7a3e9b10".into(),
                name: "H100 80GB HBM3".into(),
                memory_used_mb: Some(4),
                utilization_percent: Some(0),
            }
        );
        assert_eq!(rows[1].memory_used_mb, Some(71234));
        assert_eq!(rows[1].utilization_percent, Some(87));
        assert_eq!(rows[3].index, 3);
    }

    /// Recorded on an H200 (driver 580.159.04) with a 2 GiB PyTorch allocation.
    #[test]
    fn parses_a_real_h200_recording() {
        let gpus = parse_gpu_rows(include_str!(
            "../../tests/fixtures/nvidia-smi-h200-gpus.csv"
        ));
        let apps = parse_app_rows(include_str!(
            "../../tests/fixtures/nvidia-smi-h200-apps.csv"
        ));
        let usage = combine(gpus.unwrap(), apps.unwrap());
        assert_eq!(
            usage,
            vec![GpuUsage {
                index: 0,
                name: Some("H200".into()),
                memory_used_mb: Some(2575),
                utilization_percent: Some(0),
                processes: vec![GpuProcess {
                    pid: 542,
                    name: "python3".into(),
                    used_memory_mb: Some(2566),
                    ..GpuProcess::default()
                }],
            }]
        );
    }

    #[test]
    fn unknown_memory_keeps_the_gpu() {
        let rows = parse_gpu_rows(
            "0, GPU-a, NVIDIA A100-SXM4-40GB, [N/A], [N/A]\n1, GPU-b, Tesla T4, [Not Supported], [Not Supported]\n",
        )
        .unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].memory_used_mb, None);
        assert_eq!(rows[1].memory_used_mb, None);
        assert_eq!(rows[1].utilization_percent, None);
        assert_eq!(rows[1].name, "Tesla T4");
    }

    #[test]
    fn odd_spacing_and_units_are_tolerated() {
        let rows = parse_gpu_rows("\n  2 ,GPU-c,   NVIDIA L4  ,  512 MiB  , 12 %\r\n\n").unwrap();
        assert_eq!(
            rows,
            vec![GpuRow {
                index: 2,
                uuid: "GPU-c".into(),
                name: "L4".into(),
                memory_used_mb: Some(512),
                utilization_percent: Some(12),
            }]
        );
    }

    #[test]
    fn empty_gpu_output_means_no_gpus() {
        assert!(parse_gpu_rows("").unwrap().is_empty());
        assert!(parse_gpu_rows(" \n\n").unwrap().is_empty());
    }

    #[test]
    fn malformed_gpu_lines_are_errors() {
        for bad in ["garbage", "x, GPU-a, H100, 4", "0, GPU-a, 12"] {
            let err = parse_gpu_rows(bad).unwrap_err();
            assert!(
                err.to_string()
                    .contains("unexpected nvidia-smi output line"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn parses_recorded_apps_query() {
        let rows = parse_app_rows(APPS_FIXTURE).unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(
            rows[0],
            AppRow {
                pid: 48213,
                name: "/usr/bin/python3".into(),
                uuid: "GPU-9a7d0e55-13c2-4f0b-8e6a-5b4c3d2e1f00".into(),
                used_memory_mb: Some(70112),
            }
        );
        assert_eq!(rows[2].used_memory_mb, None);
    }

    #[test]
    fn failed_apps_query_without_stderr_means_no_processes() {
        let quiet_failure = ToolOutput {
            success: false,
            stdout: String::new(),
            stderr: "  \n".into(),
        };
        assert!(app_rows_from(&quiet_failure).unwrap().unwrap().is_empty());
        let loud_failure = ToolOutput {
            success: false,
            stdout: String::new(),
            stderr: "Unable to determine the device handle".into(),
        };
        assert!(app_rows_from(&loud_failure).is_none());
        assert!(app_rows_from(&success("")).unwrap().unwrap().is_empty());
        assert!(
            app_rows_from(&success("No running processes found\n"))
                .unwrap()
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn processes_join_their_gpu_by_uuid() {
        let gpus = parse_gpu_rows(GPUS_FIXTURE).unwrap();
        let apps = parse_app_rows(APPS_FIXTURE).unwrap();
        let usage = combine(gpus, apps);
        let counts: Vec<usize> = usage.iter().map(|gpu| gpu.processes.len()).collect();
        assert_eq!(counts, vec![0, 2, 0, 1]);
        assert_eq!(usage[1].processes[1].name, "vllm");
        assert_eq!(usage[3].processes[0].pid, 51877);
    }

    #[test]
    fn processes_on_unlisted_gpus_are_dropped() {
        let gpus = parse_gpu_rows("0, GPU-a, H100, 10, 0").unwrap();
        let apps = parse_app_rows("7, python, GPU-zzz, 10").unwrap();
        assert!(combine(gpus, apps)[0].processes.is_empty());
    }

    #[test]
    fn usage_is_ordered_by_index() {
        let gpus = parse_gpu_rows("1, GPU-b, H100, 10, 5\n0, GPU-a, H100, 20, 0").unwrap();
        let indexes: Vec<u32> = combine(gpus, Vec::new()).iter().map(|g| g.index).collect();
        assert_eq!(indexes, vec![0, 1]);
    }
}
