//! Placeholder: process owner lookup, implemented by the GPU providers work.

/// The user name owning `pid` (real UID, resolved through NSS), or `unknown`.
pub fn process_user(pid: u32) -> String {
    let _ = pid;
    "unknown".into()
}
