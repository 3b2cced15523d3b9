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

use crate::error::{Error, Result};
use crate::state::ProviderKind;

/// One process using a GPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuProcess {
    pub pid: u32,
    /// Process name as the provider reports it (may be a path).
    pub name: String,
    pub used_memory_mb: Option<u64>,
}

/// The observed usage of one GPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuUsage {
    pub index: u32,
    /// Marketing name without the vendor prefix, e.g. `H100 80GB HBM3`.
    pub name: Option<String>,
    /// Used memory in MiB; `None` where the device does not report it.
    pub memory_used_mb: Option<u64>,
    pub processes: Vec<GpuProcess>,
}

pub trait GpuProvider {
    /// How many GPUs the provider sees.
    fn device_count(&self) -> Result<u32>;
    /// Usage of every GPU the provider sees, ordered by index.
    fn usage(&self) -> Result<Vec<GpuUsage>>;
}

/// The provider a pool was initialised with. `fake_count` is the pool size, used
/// by the fake provider.
pub fn provider_for(kind: ProviderKind, fake_count: u32) -> Box<dyn GpuProvider> {
    match kind {
        ProviderKind::Nvidia => nvidia(),
        ProviderKind::Amd => Box::new(amd_smi::AmdSmi::from_path()),
        ProviderKind::Fake => Box::new(fake::FakeProvider::new(fake_count)),
    }
}

/// NVML when the driver library loads (unless `CANHAZGPU_NVML=0`), else `nvidia-smi`.
fn nvidia() -> Box<dyn GpuProvider> {
    #[cfg(feature = "nvml")]
    if let Some(provider) = nvml_provider() {
        return Box::new(provider);
    }
    Box::new(nvidia_smi::NvidiaSmi::from_path())
}

#[cfg(feature = "nvml")]
fn nvml_provider() -> Option<nvml::NvmlProvider> {
    let disabled = std::env::var_os("CANHAZGPU_NVML").is_some_and(|value| value == "0");
    if disabled {
        return None;
    }
    nvml::NvmlProvider::init().ok()
}

fn nvml_loads() -> bool {
    #[cfg(feature = "nvml")]
    {
        nvml_provider().is_some()
    }
    #[cfg(not(feature = "nvml"))]
    {
        false
    }
}

/// Detects which provider this machine has, for `admin` without `--provider`.
pub fn detect() -> Result<ProviderKind> {
    detect_among(
        nvml_loads(),
        &nvidia_smi::NvidiaSmi::from_path(),
        &amd_smi::AmdSmi::from_path(),
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
