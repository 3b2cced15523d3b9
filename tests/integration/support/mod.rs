//! Fixtures shared by the integration tests.

pub mod cli;
pub mod fake_smi;
pub mod history;
pub mod redis;
pub mod sqlite;
pub mod web;
