//! The fake provider: N idle GPUs, for demos and tests of the store.

use super::{GpuProvider, GpuUsage};
use crate::error::Result;

pub struct FakeProvider {
    count: u32,
}

impl FakeProvider {
    pub fn new(count: u32) -> Self {
        FakeProvider { count }
    }
}

impl GpuProvider for FakeProvider {
    fn device_count(&self) -> Result<u32> {
        Ok(self.count)
    }

    fn usage(&self) -> Result<Vec<GpuUsage>> {
        Ok((0..self.count)
            .map(|index| GpuUsage {
                index,
                name: Some("Fake GPU".into()),
                memory_used_mb: Some(0),
                utilization_percent: Some(0),
                processes: Vec::new(),
            })
            .collect())
    }
}
