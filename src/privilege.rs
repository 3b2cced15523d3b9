//! The one privilege of a protected install: the binary is setgid to the group
//! `canhazgpu`, and only that group may enter the store's directory or read the Redis
//! password. Users then change the store only through canhazgpu, which acts as their
//! real UID.
//!
//! The privilege is lowered first thing (the effective group becomes the real one;
//! the privileged group stays the saved one, so it can come back) and raised only
//! while the system's store is opened or used, or the system's Redis password file
//! is read. Everything else, config files included, runs as the user. Programs
//! canhazgpu starts get the real group only (`command`, and `POSIX_SPAWN_RESETIDS`
//! for `run`), and the process is never dumpable (no core dump, no ptrace, `/proc`
//! files owned by root), since it may hold the store's files open.

use std::ffi::OsStr;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use nix::unistd::{Gid, getresgid, setresgid};

use crate::error::{Error, Result};

/// The system group a protected install is setgid to.
pub const GROUP: &str = "canhazgpu";

/// The groups of a process started setgid.
#[derive(Clone, Copy, Debug)]
struct Held {
    real: Gid,
    privileged: Gid,
}

/// What this process was started with: `None` means no setgid privilege.
#[derive(Clone, Copy, Debug)]
struct Start {
    held: Option<Held>,
    /// Started setgid or setuid: the environment must not steer trusted paths.
    set_id: bool,
}

static START: OnceLock<Start> = OnceLock::new();
/// How many callers have the privilege raised now (threads share it).
static RAISED: Mutex<usize> = Mutex::new(0);

/// Takes note of a setgid start and lowers the privilege. `main` calls it before
/// anything else; the first use of this module would otherwise.
pub fn init() -> Result<()> {
    match START.get() {
        Some(_) => Ok(()),
        None => {
            let start = lower_at_start()?;
            let _ = START.set(start);
            Ok(())
        }
    }
}

fn lower_at_start() -> Result<Start> {
    let groups = getresgid().map_err(|err| failed("read the process groups", err))?;
    let set_id = groups.effective != groups.real || nix::unistd::geteuid() != nix::unistd::getuid();
    if groups.effective == groups.real {
        return Ok(Start { held: None, set_id });
    }
    let held = Held {
        real: groups.real,
        privileged: groups.effective,
    };
    set_effective(held, held.real)?;
    Ok(Start {
        held: Some(held),
        set_id,
    })
}

fn start() -> Start {
    if let Err(err) = init() {
        // Going on could mean going on privileged.
        eprintln!("Error: {err}");
        std::process::abort();
    }
    START.get().copied().unwrap_or(Start {
        held: None,
        set_id: false,
    })
}

fn held() -> Option<Held> {
    start().held
}

/// Whether this process was started with the setgid privilege.
pub fn available() -> bool {
    held().is_some()
}

/// Whether this process was started setgid or setuid, so the environment must not
/// choose trusted paths (the system config directory, the utmp file).
pub fn set_id() -> bool {
    start().set_id
}

/// Runs `body` with the privilege raised, when this process has it; threads that
/// overlap share one raise, and the last one out lowers it.
pub fn with_privilege<T>(body: impl FnOnce() -> T) -> T {
    let Some(held) = held() else {
        return body();
    };
    let _raised = Raised::enter(held);
    body()
}

/// Whether the privilege is raised at this moment (in this or another thread).
pub fn raised() -> bool {
    held().is_some_and(|held| nix::unistd::getegid() == held.privileged)
}

/// `with_privilege` when `raise`, else `body` as the user: for paths that are the
/// system's (its store, its secret files) on one call and not on another.
pub fn with_privilege_if<T>(raise: bool, body: impl FnOnce() -> T) -> T {
    match raise {
        true => with_privilege(body),
        false => body(),
    }
}

struct Raised(Held);

impl Raised {
    fn enter(held: Held) -> Raised {
        let mut count = RAISED
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if *count == 0 {
            // When it fails the body runs unprivileged and meets "permission denied".
            let _ = set_effective(held, held.privileged);
        }
        *count += 1;
        Raised(held)
    }
}

impl Drop for Raised {
    fn drop(&mut self) {
        let mut count = RAISED
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *count -= 1;
        if *count == 0
            && let Err(err) = set_effective(self.0, self.0.real)
        {
            eprintln!("Error: {err}");
            std::process::abort();
        }
    }
}

/// Sets the effective group, keeping the privileged one as the saved group, and
/// makes the process undumpable again (a credential change resets that flag).
fn set_effective(held: Held, effective: Gid) -> Result<()> {
    setresgid(held.real, effective, held.privileged)
        .map_err(|err| failed("change the effective group", err))?;
    nix::sys::prctl::set_dumpable(false).map_err(|err| failed("turn off core dumps", err))
}

fn failed(what: &str, err: nix::errno::Errno) -> Error {
    Error::Runtime(format!("cannot {what}: {err}"))
}

/// A command for a program canhazgpu starts (`nvidia-smi`, `ssh`, ...): it runs
/// with the real group only, whatever this process holds at the moment.
#[allow(clippy::disallowed_methods)]
pub fn command(program: impl AsRef<OsStr>) -> Command {
    let mut command = Command::new(program);
    if let Some(held) = held() {
        command.gid(held.real.as_raw());
    }
    command
}

/// Whether this is a protected install: the binary is setgid to the group
/// `canhazgpu`, and this process was started with that privilege.
pub fn protected_install() -> bool {
    available() && binary_is_setgid()
}

/// The gid of the group `canhazgpu`, when it exists.
pub fn group_gid() -> Option<Gid> {
    nix::unistd::Group::from_name(GROUP)
        .ok()
        .flatten()
        .map(|group| group.gid)
}

/// Whether the running binary itself is setgid to the group `canhazgpu`.
pub fn binary_is_setgid() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(gid) = group_gid() else {
        return false;
    };
    std::fs::metadata("/proc/self/exe")
        .is_ok_and(|meta| meta.mode() & 0o2000 != 0 && meta.gid() == gid.as_raw())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_setgid_nothing_is_held_and_bodies_run() {
        assert!(!available(), "tests do not run setgid");
        assert_eq!(with_privilege(|| 41 + 1), 42);
        let groups = getresgid().unwrap();
        assert_eq!(groups.effective, groups.real);
    }
}
