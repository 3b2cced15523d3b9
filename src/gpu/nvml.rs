//! Placeholder, implemented by the GPU providers work.

use super::{GpuProvider, GpuUsage};
use crate::error::{Error, Result};
use crate::state::ProviderKind;

pub struct NvmlProvider;

impl NvmlProvider {
    pub fn init() -> Result<Self> {
        Err(Error::Gpu("not implemented".into()))
    }
}

impl GpuProvider for NvmlProvider {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Nvidia
    }
    fn device_count(&self) -> Result<u32> {
        Err(Error::Gpu("not implemented".into()))
    }
    fn usage(&self) -> Result<Vec<GpuUsage>> {
        Err(Error::Gpu("not implemented".into()))
    }
}
