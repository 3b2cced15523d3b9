//! Starting the command with `posix_spawnp`. canhazgpu blocks the signals it waits
//! for with `sigwait`, and a child inherits its parent's signal mask;
//! `std::process::Command` leaves that mask as it is, so the command would start
//! with SIGINT, SIGTERM and friends blocked. `posix_spawn` sets the child's mask
//! (to empty) and resets SIGPIPE, which Rust programs ignore, to its default, all
//! without `fork` or unsafe code. `POSIX_SPAWN_RESETIDS` gives it the real group
//! and user, never a protected install's group (`privilege`).

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr, OsString};
use std::os::unix::ffi::OsStrExt;

use nix::errno::Errno;
use nix::spawn::{PosixSpawnAttr, PosixSpawnFileActions, PosixSpawnFlags, posix_spawnp};
use nix::sys::signal::{SigSet, Signal};
use nix::unistd::Pid;

/// Why the command could not be started.
#[derive(Debug, PartialEq, Eq)]
pub enum SpawnError {
    /// From `posix_spawnp`: `ENOENT` (not found), `EACCES` (not executable), ...
    Os(Errno),
    /// An argument or variable holds a NUL byte, which `exec` cannot pass on.
    Nul(OsString),
}

/// A variable to set (`Some`) or remove (`None`) in the command's environment.
pub type EnvChange = (&'static str, Option<String>);

/// Starts `argv[0]` (looked up in `PATH`) with `argv` and canhazgpu's own
/// environment plus `changes`. stdin, stdout and stderr are inherited.
pub fn spawn(argv: &[OsString], changes: &[EnvChange]) -> Result<Pid, SpawnError> {
    let program = argv.first().ok_or(SpawnError::Os(Errno::ENOENT))?;
    let program = c_string(program)?;
    let args = argv
        .iter()
        .map(|arg| c_string(arg))
        .collect::<Result<Vec<_>, _>>()?;
    let env = environment(std::env::vars_os(), changes)
        .iter()
        .map(|(key, value)| {
            let mut entry = key.clone();
            entry.push("=");
            entry.push(value);
            c_string(&entry)
        })
        .collect::<Result<Vec<_>, _>>()?;

    let mut attr = PosixSpawnAttr::init().map_err(SpawnError::Os)?;
    let mut defaults = SigSet::empty();
    defaults.add(Signal::SIGPIPE);
    attr.set_sigmask(&SigSet::empty()).map_err(SpawnError::Os)?;
    attr.set_sigdefault(&defaults).map_err(SpawnError::Os)?;
    // RESETIDS: the command gets the real group, never a protected install's.
    attr.set_flags(
        PosixSpawnFlags::POSIX_SPAWN_SETSIGMASK
            | PosixSpawnFlags::POSIX_SPAWN_SETSIGDEF
            | PosixSpawnFlags::POSIX_SPAWN_RESETIDS,
    )
    .map_err(SpawnError::Os)?;
    let actions = PosixSpawnFileActions::init().map_err(SpawnError::Os)?;
    posix_spawnp(&program, &actions, &attr, &args, &env).map_err(SpawnError::Os)
}

fn c_string(text: &OsStr) -> Result<CString, SpawnError> {
    CString::new(text.as_bytes()).map_err(|_| SpawnError::Nul(text.to_os_string()))
}

/// The inherited environment with `changes` applied, sorted by name.
fn environment(
    inherited: impl Iterator<Item = (OsString, OsString)>,
    changes: &[EnvChange],
) -> BTreeMap<OsString, OsString> {
    let mut env: BTreeMap<OsString, OsString> = inherited.collect();
    for (key, value) in changes {
        match value {
            Some(value) => env.insert(key.into(), value.into()),
            None => env.remove(OsStr::new(key)),
        };
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_replace_and_remove_inherited_variables() {
        let inherited = [
            ("CUDA_VISIBLE_DEVICES", "7"),
            ("ROCR_VISIBLE_DEVICES", "1"),
            ("PATH", "/bin"),
        ]
        .map(|(k, v)| (OsString::from(k), OsString::from(v)));
        let env = environment(
            inherited.into_iter(),
            &[
                ("CUDA_VISIBLE_DEVICES", Some("1,3".into())),
                ("ROCR_VISIBLE_DEVICES", None),
            ],
        );
        let pairs: Vec<(&str, &str)> = env
            .iter()
            .map(|(k, v)| (k.to_str().unwrap(), v.to_str().unwrap()))
            .collect();
        assert_eq!(
            pairs,
            vec![("CUDA_VISIBLE_DEVICES", "1,3"), ("PATH", "/bin")]
        );
    }

    #[test]
    fn reports_what_exec_says() {
        let missing = spawn(&[OsString::from("canhazgpu-no-such-program")], &[]);
        assert_eq!(missing, Err(SpawnError::Os(Errno::ENOENT)));
        let nul = spawn(&[OsString::from("a\0b")], &[]);
        assert!(matches!(nul, Err(SpawnError::Nul(_))));
    }
}
