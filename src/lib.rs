//! canhazgpu: GPU reservations for shared multi-user Linux machines.

pub mod alloc;
pub mod config;
pub mod duration;
pub mod error;
pub mod gpu;
pub mod state;
pub mod store;
