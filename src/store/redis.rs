//! Placeholder: the Redis store.

use super::RedisConfig;

use super::{AllocRequest, InitOutcome, ReleaseScope, Store};
use crate::error::{Error, Result};
use crate::state::{GpuSlot, Pool, ProviderKind, UnixTime, UsageRecord};

pub struct RedisStore;

impl RedisStore {
    pub fn connect(config: &RedisConfig) -> Result<Self> {
        let _ = config;
        Err(Error::Store("not implemented".into()))
    }
}

impl Store for RedisStore {
    fn init_pool(&mut self, _: u32, _: ProviderKind, _: bool, _: UnixTime) -> Result<InitOutcome> {
        Err(Error::Store("not implemented".into()))
    }
    fn pool(&mut self) -> Result<Option<Pool>> {
        Err(Error::Store("not implemented".into()))
    }
    fn slots(&mut self) -> Result<Vec<GpuSlot>> {
        Err(Error::Store("not implemented".into()))
    }
    fn allocate(&mut self, _: &AllocRequest) -> Result<Vec<u32>> {
        Err(Error::Store("not implemented".into()))
    }
    fn release(&mut self, _: &ReleaseScope, _: UnixTime) -> Result<Vec<u32>> {
        Err(Error::Store("not implemented".into()))
    }
    fn heartbeat(&mut self, _: &str, _: &[u32], _: UnixTime) -> Result<Vec<u32>> {
        Err(Error::Store("not implemented".into()))
    }
    fn history(&mut self, _: UnixTime, _: UnixTime) -> Result<Vec<UsageRecord>> {
        Err(Error::Store("not implemented".into()))
    }
}
