//! AMD through `amd-smi ... --json`: `metric -m` for memory, `process` for processes.
//! ROCm 7 wraps the per-GPU list as `{"gpu_data": [...]}`, ROCm 6 prints the bare list;
//! both are accepted. amd-smi does not report the GPU name in these two calls, and a
//! third call per check is not worth it, so names stay unknown.

use std::ffi::OsString;
use std::time::Duration;

use serde_json::Value;

use super::tool::Tool;
use super::{GpuProcess, GpuProvider, GpuUsage, procinfo};
use crate::error::{Error, Result};

/// Memory (`-m`) and usage (`-u`: `gfx_activity`, the GPU's busy percentage).
pub const METRIC_QUERY: [&str; 4] = ["metric", "-m", "-u", "--json"];
pub const PROCESS_QUERY: [&str; 2] = ["process", "--json"];

/// What amd-smi prints instead of a process on an idle GPU.
const NO_PROCESSES: &str = "No running processes detected";

pub struct AmdSmi {
    tool: Tool,
}

impl AmdSmi {
    /// `amd-smi` from PATH, given `timeout` (`smi_timeout`, default 10 s).
    pub fn from_path(timeout: Duration) -> Self {
        AmdSmi {
            tool: Tool {
                name: "amd-smi",
                program: "amd-smi".into(),
                timeout,
            },
        }
    }

    /// A specific executable with a fixed timeout (tests, unusual installs).
    pub fn new(program: impl Into<OsString>, timeout: Duration) -> Self {
        AmdSmi {
            tool: Tool {
                name: "amd-smi",
                program: program.into(),
                timeout,
            },
        }
    }

    /// Whether the tool exists and `amd-smi --help` succeeds.
    pub fn answers(&self) -> bool {
        self.tool.answers()
    }

    fn query(&self, args: &[&str]) -> Result<Vec<Value>> {
        let output = self.tool.run(args)?;
        if !output.success {
            return Err(self.tool.exit_error(&output));
        }
        gpu_entries(&output.stdout)
    }
}

impl GpuProvider for AmdSmi {
    fn device_count(&self) -> Result<u32> {
        let gpus = self.query(&METRIC_QUERY)?;
        u32::try_from(gpus.len()).map_err(|_| Error::Gpu("amd-smi listed too many GPUs".into()))
    }

    fn usage(&self) -> Result<Vec<GpuUsage>> {
        let mut usage = parse_metrics(&self.query(&METRIC_QUERY)?);
        for (gpu, process) in parse_processes(&self.query(&PROCESS_QUERY)?) {
            // A process on a GPU the metric call did not list appeared in between: dropped.
            if let Some(entry) = usage.iter_mut().find(|entry| entry.index == gpu) {
                entry.processes.push(process);
            }
        }
        Ok(usage)
    }
}

/// The per-GPU entries of either JSON shape. Anything printed before the JSON
/// (amd-smi warns about missing groups on some installs) is skipped.
fn gpu_entries(text: &str) -> Result<Vec<Value>> {
    let start = text
        .lines()
        .scan(0, |offset, line| {
            let at = *offset;
            *offset += line.len() + 1;
            Some((at, line))
        })
        .find(|(_, line)| line.trim_start().starts_with(['[', '{']))
        .map(|(at, _)| at)
        .ok_or_else(|| Error::Gpu("amd-smi printed no JSON".into()))?;
    let parsed: Value = serde_json::from_str(&text[start..])
        .map_err(|err| Error::Gpu(format!("amd-smi printed invalid JSON: {err}")))?;
    match parsed {
        Value::Array(entries) => Ok(entries),
        Value::Object(mut object) => match object.remove("gpu_data") {
            Some(Value::Array(entries)) => Ok(entries),
            _ => Err(Error::Gpu(
                "amd-smi JSON has neither a GPU list nor 'gpu_data'".into(),
            )),
        },
        _ => Err(Error::Gpu("amd-smi JSON is not a GPU list".into())),
    }
}

/// The GPU index of an entry: its `gpu` field, else its position.
fn gpu_index(entry: &Value, position: usize) -> u32 {
    entry
        .get("gpu")
        .and_then(number)
        .and_then(|gpu| u32::try_from(gpu as u64).ok())
        .unwrap_or_else(|| u32::try_from(position).unwrap_or(u32::MAX))
}

fn parse_metrics(entries: &[Value]) -> Vec<GpuUsage> {
    let mut usage: Vec<GpuUsage> = entries
        .iter()
        .enumerate()
        .map(|(position, entry)| GpuUsage {
            index: gpu_index(entry, position),
            name: None,
            memory_used_mb: entry.pointer("/mem_usage/used_vram").and_then(quantity_mib),
            utilization_percent: entry
                .pointer("/usage/gfx_activity")
                .and_then(|activity| match activity {
                    Value::Object(_) => activity.get("value").and_then(number),
                    other => number(other),
                })
                .filter(|percent| (0.0..=100.0).contains(percent))
                .map(|percent| percent.round() as u32),
            ..GpuUsage::default()
        })
        .collect();
    usage.sort_by_key(|gpu| gpu.index);
    usage
}

/// `(gpu index, process)` pairs. Each `process_list` item is `{"process_info": {...}}`
/// (or the bare object); the idle marker string is skipped.
fn parse_processes(entries: &[Value]) -> Vec<(u32, GpuProcess)> {
    entries
        .iter()
        .enumerate()
        .flat_map(|(position, entry)| {
            let gpu = gpu_index(entry, position);
            let items = entry
                .get("process_list")
                .and_then(Value::as_array)
                .map(Vec::as_slice)
                .unwrap_or_default();
            items.iter().filter_map(move |item| {
                let info = item.get("process_info").unwrap_or(item);
                Some((gpu, parse_process(info)?))
            })
        })
        .collect()
}

fn parse_process(info: &Value) -> Option<GpuProcess> {
    if info
        .as_str()
        .is_some_and(|text| text.trim() == NO_PROCESSES)
        || !info.is_object()
    {
        return None;
    }
    let pid = u32::try_from(info.get("pid").and_then(number)? as u64).ok()?;
    let reported = info
        .get("name")
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|name| !name.is_empty() && *name != "N/A");
    let name = reported
        .map(str::to_owned)
        .or_else(|| procinfo::process_name(pid))
        .unwrap_or_else(|| procinfo::UNKNOWN.to_owned());
    Some(GpuProcess {
        pid,
        name,
        used_memory_mb: info
            .pointer("/memory_usage/vram_mem")
            .and_then(quantity_mib),
        ..GpuProcess::default()
    })
}

/// A number, or a string holding one (amd-smi versions differ); `N/A` gives `None`.
fn number(value: &Value) -> Option<f64> {
    match value {
        Value::Number(number) => number.as_f64(),
        Value::String(text) => text.trim().parse().ok(),
        _ => None,
    }
}

/// `{"value": V, "unit": U}` (or a bare number in MB) in MiB, rounded down.
fn quantity_mib(quantity: &Value) -> Option<u64> {
    let (value, unit) = match quantity {
        Value::Object(_) => (
            number(quantity.get("value")?)?,
            quantity.get("unit").and_then(Value::as_str).unwrap_or("MB"),
        ),
        other => (number(other)?, "MB"),
    };
    if !value.is_finite() || value < 0.0 {
        return None;
    }
    let mib = match unit.trim() {
        "B" => value / (1024.0 * 1024.0),
        "KB" | "KiB" => value / 1024.0,
        "GB" | "GiB" => value * 1024.0,
        _ => value,
    };
    Some(mib as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROCM6_METRIC: &str = include_str!("../../tests/fixtures/amd-smi-rocm6-metric.json");
    const ROCM6_PROCESS: &str = include_str!("../../tests/fixtures/amd-smi-rocm6-process.json");
    const ROCM7_METRIC: &str = include_str!("../../tests/fixtures/amd-smi-rocm7-metric.json");
    const ROCM7_PROCESS: &str = include_str!("../../tests/fixtures/amd-smi-rocm7-process.json");

    fn usage_of(metric: &str, process: &str) -> Vec<GpuUsage> {
        let mut usage = parse_metrics(&gpu_entries(metric).unwrap());
        for (gpu, process) in parse_processes(&gpu_entries(process).unwrap()) {
            usage[gpu as usize].processes.push(process);
        }
        usage
    }

    #[test]
    fn rocm6_bare_arrays() {
        let usage = usage_of(ROCM6_METRIC, ROCM6_PROCESS);
        let memory: Vec<Option<u64>> = usage.iter().map(|gpu| gpu.memory_used_mb).collect();
        assert_eq!(memory, vec![Some(283), Some(153_872)]);
        assert!(usage[0].processes.is_empty());
        assert_eq!(
            usage[1].processes,
            vec![GpuProcess {
                pid: 91_234,
                name: "python3".into(),
                used_memory_mb: Some(153_600),
                ..GpuProcess::default()
            }]
        );
        assert!(usage.iter().all(|gpu| gpu.name.is_none()));
    }

    #[test]
    fn rocm7_gpu_data_objects() {
        let usage = usage_of(ROCM7_METRIC, ROCM7_PROCESS);
        let memory: Vec<Option<u64>> = usage.iter().map(|gpu| gpu.memory_used_mb).collect();
        // GPU 1 reports GB, GPU 3 reports N/A.
        assert_eq!(memory, vec![Some(12), Some(65_536), Some(0), None]);
        let pids: Vec<Vec<u32>> = usage
            .iter()
            .map(|gpu| gpu.processes.iter().map(|p| p.pid).collect())
            .collect();
        assert_eq!(pids, vec![vec![], vec![4711, 4712], vec![], vec![]]);
        let second = &usage[1].processes[1];
        assert_eq!(second.name, "vllm");
        assert_eq!(second.used_memory_mb, Some(2));
    }

    #[test]
    fn process_memory_units() {
        let cases = [
            (r#"{"value": 1073741824, "unit": "B"}"#, Some(1024)),
            (r#"{"value": 2048, "unit": "KB"}"#, Some(2)),
            (r#"{"value": 300, "unit": "MB"}"#, Some(300)),
            (r#"{"value": 1.5, "unit": "GB"}"#, Some(1536)),
            (r#"{"value": "512", "unit": "MB"}"#, Some(512)),
            (r#"{"value": "N/A", "unit": "MB"}"#, None),
            (r#"{"value": -1, "unit": "MB"}"#, None),
            (r#""N/A""#, None),
        ];
        for (json, expected) in cases {
            let value: Value = serde_json::from_str(json).unwrap();
            assert_eq!(quantity_mib(&value), expected, "{json}");
        }
    }

    #[test]
    fn warnings_before_the_json_are_skipped() {
        let text = "WARNING: User is missing the following required groups: render\n[{\"gpu\": 0}]";
        assert_eq!(gpu_entries(text).unwrap().len(), 1);
    }

    #[test]
    fn malformed_json_is_a_clear_error() {
        for (bad, message) in [
            ("", "amd-smi printed no JSON"),
            ("[{\"gpu\": 0", "amd-smi printed invalid JSON"),
            ("{\"something\": 1}", "neither a GPU list nor 'gpu_data'"),
        ] {
            let err = gpu_entries(bad).unwrap_err().to_string();
            assert!(err.contains(message), "{bad:?} gave {err}");
        }
    }

    #[test]
    fn idle_marker_and_junk_processes_are_skipped() {
        let entries: Vec<Value> = serde_json::from_str(
            r#"[{"gpu": 2, "process_list": [
                {"process_info": "No running processes detected"},
                {"process_info": {"name": "python3"}},
                {"pid": 77, "name": "N/A", "memory_usage": {"vram_mem": {"value": 0, "unit": "B"}}}
            ]}]"#,
        )
        .unwrap();
        let processes = parse_processes(&entries);
        assert_eq!(processes.len(), 1);
        let (gpu, process) = &processes[0];
        assert_eq!(
            (*gpu, process.pid, process.used_memory_mb),
            (2, 77, Some(0))
        );
    }

    #[test]
    fn gfx_activity_is_the_utilization() {
        let entries: Vec<Value> = serde_json::from_str(
            r#"[{"gpu": 0, "usage": {"gfx_activity": {"value": 87, "unit": "%"}}},
                {"gpu": 1, "usage": {"gfx_activity": "N/A"}},
                {"gpu": 2, "usage": {"gfx_activity": 250}}]"#,
        )
        .unwrap();
        let usage = parse_metrics(&entries);
        let percents: Vec<Option<u32>> = usage.iter().map(|g| g.utilization_percent).collect();
        assert_eq!(percents, vec![Some(87), None, None]);
    }
}
