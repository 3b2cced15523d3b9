//! NVIDIA through NVML, loaded from `libnvidia-ml.so.1` at run time: no process
//! spawn per check, and no build-time dependency on the driver.

use nvml_wrapper::Nvml;
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::error::NvmlError;

use super::nvidia_smi::strip_vendor;
use super::{GpuProcess, GpuProvider, GpuUsage, procinfo};
use crate::error::{Error, Result};

const MIB: u64 = 1024 * 1024;

pub struct NvmlProvider {
    nvml: Nvml,
}

impl NvmlProvider {
    /// Loads and initialises NVML; fails where the library or the driver is missing.
    pub fn init() -> Result<Self> {
        Nvml::init()
            .map(|nvml| NvmlProvider { nvml })
            .map_err(|err| Error::Gpu(format!("cannot initialise NVML: {err}")))
    }

    fn gpu_usage(&self, index: u32) -> Result<GpuUsage> {
        let device = self.nvml.device_by_index(index).map_err(failed)?;
        let memory_used_mb = match device.memory_info() {
            Ok(memory) => Some(memory.used / MIB),
            Err(NvmlError::NotSupported) => None,
            Err(err) => return Err(failed(err)),
        };
        let processes = match device.running_compute_processes() {
            Ok(processes) => processes,
            Err(NvmlError::NotSupported) => Vec::new(),
            Err(err) => return Err(failed(err)),
        };
        Ok(GpuUsage {
            index,
            // The name is decoration; a device that cannot tell is still usable.
            name: device
                .name()
                .ok()
                .map(|name| strip_vendor(&name).to_owned()),
            memory_used_mb,
            utilization_percent: device.utilization_rates().ok().map(|rates| rates.gpu),
            processes: processes
                .into_iter()
                .map(|process| GpuProcess {
                    pid: process.pid,
                    // NVML gives no names; a process in another PID namespace has none here.
                    name: procinfo::process_name(process.pid)
                        .unwrap_or_else(|| procinfo::UNKNOWN.to_owned()),
                    used_memory_mb: match process.used_gpu_memory {
                        UsedGpuMemory::Used(bytes) => Some(bytes / MIB),
                        UsedGpuMemory::Unavailable => None,
                    },
                    ..GpuProcess::default()
                })
                .collect(),
        })
    }
}

fn failed(err: NvmlError) -> Error {
    Error::Gpu(format!("NVML query failed: {err}"))
}

impl GpuProvider for NvmlProvider {
    fn device_count(&self) -> Result<u32> {
        self.nvml.device_count().map_err(failed)
    }

    fn usage(&self) -> Result<Vec<GpuUsage>> {
        (0..self.device_count()?)
            .map(|index| self.gpu_usage(index))
            .collect()
    }
}
