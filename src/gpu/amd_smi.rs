//! Placeholder, implemented by the GPU providers work.

use super::{GpuProvider, GpuUsage};
use crate::error::{Error, Result};
use crate::state::ProviderKind;

pub struct AmdSmi;

impl AmdSmi {
    pub fn from_path() -> Self {
        AmdSmi
    }
}

impl GpuProvider for AmdSmi {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Amd
    }
    fn device_count(&self) -> Result<u32> {
        Err(Error::Gpu("not implemented".into()))
    }
    fn usage(&self) -> Result<Vec<GpuUsage>> {
        Err(Error::Gpu("not implemented".into()))
    }
}
