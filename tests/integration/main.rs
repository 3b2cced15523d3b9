//! The integration tests, in one binary.
#![allow(clippy::disallowed_methods)] // tests start their helpers directly

mod activity;
mod browser;
mod cli_config;
mod cli_core;
mod cli_gpu;
mod cli_shell;
mod fleet;
mod follow;
mod gpu_providers;
mod metrics;
mod multi_user;
mod notify;
mod policy;
mod protected;
mod queue;
mod redis_store;
pub mod redis_tls;
mod report;
mod run;
mod sentinel;
mod sqlite_store;
mod store_conformance;
mod support;
mod watch;
mod web;
