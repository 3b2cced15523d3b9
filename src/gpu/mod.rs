//! GPU providers: what each GPU's memory and processes look like right now.
//!
//! `nvidia` uses NVML directly and falls back to `nvidia-smi`; `amd` uses
//! `amd-smi --json`; `fake` serves demos with N idle GPUs.

pub mod amd_smi;
pub mod fake;
pub mod model;
pub mod nvidia_smi;
#[cfg(feature = "nvml")]
pub mod nvml;
pub mod procinfo;
pub mod tool;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::state::ProviderKind;

/// One process using a GPU.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuProcess {
    pub pid: u32,
    /// Process name as the provider reports it (may be a path).
    pub name: String,
    pub used_memory_mb: Option<u64>,
    /// Its Unix user and detected AI model, looked up in `/proc` by the host that
    /// saw it (`gpu_status::snapshot`), so other hosts can show them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<model::ModelInfo>,
}

/// The observed usage of one GPU.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuUsage {
    pub index: u32,
    /// Marketing name without the vendor prefix, e.g. `H100 80GB HBM3`.
    pub name: Option<String>,
    /// Used memory in MiB; `None` where the device does not report it.
    pub memory_used_mb: Option<u64>,
    /// GPU utilization in percent, where the provider reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub utilization_percent: Option<u32>,
    pub processes: Vec<GpuProcess>,
}

pub trait GpuProvider {
    /// How many GPUs the provider sees.
    fn device_count(&self) -> Result<u32>;
    /// Usage of every GPU the provider sees, ordered by index.
    fn usage(&self) -> Result<Vec<GpuUsage>>;
}

/// How the GPU tools are used: configuration keys `smi_timeout` and `nvml`
/// (`CANHAZGPU_SMI_TIMEOUT`, `CANHAZGPU_NVML`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuSettings {
    /// How long `nvidia-smi` or `amd-smi` may take before it is killed.
    pub smi_timeout: std::time::Duration,
    /// Whether NVML is tried before `nvidia-smi`.
    pub nvml: bool,
    /// `memory.ignore_processes`: process names (`Xorg`) that never count as usage.
    pub ignore_processes: Vec<String>,
}

impl Default for GpuSettings {
    fn default() -> Self {
        GpuSettings {
            smi_timeout: tool::DEFAULT_TIMEOUT,
            nvml: true,
            ignore_processes: Vec::new(),
        }
    }
}

/// The provider a pool was initialised with. `fake_count` is the pool size, used
/// by the fake provider.
pub fn provider_for(
    kind: ProviderKind,
    fake_count: u32,
    settings: &GpuSettings,
) -> Box<dyn GpuProvider> {
    let provider: Box<dyn GpuProvider> = match kind {
        ProviderKind::Nvidia => nvidia(settings),
        ProviderKind::Amd => Box::new(amd_smi::AmdSmi::from_path(settings.smi_timeout)),
        ProviderKind::Fake => Box::new(fake::FakeProvider::new(fake_count)),
    };
    match settings.ignore_processes.is_empty() {
        true => provider,
        false => Box::new(Ignoring {
            inner: provider,
            names: settings.ignore_processes.clone(),
        }),
    }
}

/// A provider whose processes named in `memory.ignore_processes` (display servers
/// and the like) are left out, their memory with them: they never count as usage.
struct Ignoring {
    inner: Box<dyn GpuProvider>,
    names: Vec<String>,
}

impl GpuProvider for Ignoring {
    fn device_count(&self) -> Result<u32> {
        self.inner.device_count()
    }

    fn usage(&self) -> Result<Vec<GpuUsage>> {
        let mut usage = self.inner.usage()?;
        for gpu in &mut usage {
            let (ignored, kept): (Vec<GpuProcess>, Vec<GpuProcess>) =
                std::mem::take(&mut gpu.processes)
                    .into_iter()
                    .partition(|p| is_ignored(&self.names, &p.name));
            let freed: u64 = ignored.iter().map(|p| p.used_memory_mb.unwrap_or(0)).sum();
            gpu.memory_used_mb = gpu.memory_used_mb.map(|used| used.saturating_sub(freed));
            gpu.processes = kept;
        }
        Ok(usage)
    }
}

/// Whether a process (`/usr/lib/xorg/Xorg` or `Xorg`) is one of `names`.
pub fn is_ignored(names: &[String], process: &str) -> bool {
    let base = process.rsplit('/').next().unwrap_or(process);
    names.iter().any(|name| name == base || name == process)
}

/// NVML when the driver library loads (unless `nvml` is off), else `nvidia-smi`.
fn nvidia(settings: &GpuSettings) -> Box<dyn GpuProvider> {
    #[cfg(feature = "nvml")]
    if let Some(provider) = nvml_provider(settings) {
        return Box::new(provider);
    }
    Box::new(nvidia_smi::NvidiaSmi::from_path(settings.smi_timeout))
}

#[cfg(feature = "nvml")]
fn nvml_provider(settings: &GpuSettings) -> Option<nvml::NvmlProvider> {
    if !settings.nvml {
        return None;
    }
    nvml::NvmlProvider::init().ok()
}

fn nvml_loads(settings: &GpuSettings) -> bool {
    #[cfg(feature = "nvml")]
    {
        nvml_provider(settings).is_some()
    }
    #[cfg(not(feature = "nvml"))]
    {
        let _ = settings;
        false
    }
}

/// Detects which provider this machine has, for `admin` without `--provider`.
pub fn detect(settings: &GpuSettings) -> Result<ProviderKind> {
    detect_among(
        nvml_loads(settings),
        &nvidia_smi::NvidiaSmi::from_path(settings.smi_timeout),
        &amd_smi::AmdSmi::from_path(settings.smi_timeout),
    )
}

/// NVIDIA when NVML loaded or `nvidia-smi --help` answers, AMD when `amd-smi --help`
/// answers; exactly one of them must be present.
pub fn detect_among(
    nvml_loaded: bool,
    nvidia_smi: &nvidia_smi::NvidiaSmi,
    amd_smi: &amd_smi::AmdSmi,
) -> Result<ProviderKind> {
    let nvidia = nvml_loaded || nvidia_smi.answers();
    let amd = amd_smi.answers();
    match (nvidia, amd) {
        (true, false) => Ok(ProviderKind::Nvidia),
        (false, true) => Ok(ProviderKind::Amd),
        (true, true) => Err(Error::Usage(
            "both NVIDIA and AMD GPU tools were found - choose one with \
             'canhazgpu admin --provider nvidia' or '--provider amd'"
                .into(),
        )),
        (false, false) => Err(Error::Gpu(
            "no GPU provider found (NVML, nvidia-smi and amd-smi are missing) - \
             use 'canhazgpu admin --provider fake' for a demo pool"
                .into(),
        )),
    }
}
