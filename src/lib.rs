//! canhazgpu: GPU reservations for shared multi-user Linux machines.

pub mod alloc;
pub mod cli;
pub mod clock;
pub mod commands;
pub mod config;
pub mod duration;
pub mod error;
pub mod fleet;
pub mod gpu;
pub mod gpu_status;
pub mod metrics;
pub mod notify;
pub mod output;
pub mod pool;
pub mod privilege;
pub mod queue;
pub mod report;
pub mod session;
pub mod signals;
pub mod state;
pub mod store;
pub mod supervise;
pub mod wait;
pub mod web;
