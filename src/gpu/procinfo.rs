//! Placeholder: process owner lookup, implemented by the GPU providers work.

use crate::error::Result;

/// The user name owning `pid` (real UID, resolved through NSS), or `unknown`.
pub fn process_user(pid: u32) -> String {
    let _ = pid;
    "unknown".into()
}

/// The real user of this process.
pub fn current_user() -> Result<String> {
    Ok(std::env::var("USER").unwrap_or_default())
}

pub fn hostname() -> String {
    "localhost".into()
}

pub fn process_start_time(pid: u32) -> Option<u64> {
    let _ = pid;
    None
}

pub fn process_alive(pid: u32, start_time: u64) -> bool {
    let _ = (pid, start_time);
    true
}
