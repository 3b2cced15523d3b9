//! What /proc says about a process: owner, start time, parent, command line.
//!
//! Identities always come from real UIDs resolved through NSS (so LDAP/SSSD users
//! work), never from environment variables such as `$USER`.

use std::path::Path;

use nix::unistd::{Uid, User};

use crate::error::{Error, Result};

/// Shown when a process's owner or name cannot be found.
pub const UNKNOWN: &str = "unknown";

/// The fields of `/proc/PID/stat` canhazgpu uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    /// One-letter state: `R`, `S`, `Z` (zombie), ...
    pub state: char,
    pub parent_pid: u32,
    /// Process group (field 5).
    pub process_group: i32,
    /// Foreground process group of the controlling terminal, -1 without one (field 8).
    pub terminal_group: i32,
    /// Clock ticks since boot (field 22).
    pub start_time: u64,
}

/// Parses `/proc/PID/stat`. The command name (field 2) may hold spaces and
/// parentheses, so fields are counted from after its last `)`.
pub fn parse_stat(text: &str) -> Option<Stat> {
    let (_, rest) = text.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `fields[0]` is field 3 of the whole line.
    Some(Stat {
        state: fields.first()?.chars().next()?,
        parent_pid: fields.get(1)?.parse().ok()?,
        process_group: fields.get(2)?.parse().ok()?,
        terminal_group: fields.get(5)?.parse().ok()?,
        start_time: fields.get(19)?.parse().ok()?,
    })
}

pub fn stat(pid: u32) -> Option<Stat> {
    parse_stat(&std::fs::read_to_string(proc_path(pid, "stat")).ok()?)
}

/// The start time of `pid` in clock ticks since boot, to tell a reused PID apart.
pub fn process_start_time(pid: u32) -> Option<u64> {
    stat(pid).map(|stat| stat.start_time)
}

/// Whether `pid` exists, is not a zombie, and is the process that started at `start_time`.
pub fn process_alive(pid: u32, start_time: u64) -> bool {
    stat(pid).is_some_and(|stat| !matches!(stat.state, 'Z' | 'X') && stat.start_time == start_time)
}

pub fn parent_pid(pid: u32) -> Option<u32> {
    stat(pid).map(|stat| stat.parent_pid)
}

/// The arguments of `pid`; `None` when unreadable or empty (kernel threads, zombies).
pub fn cmdline(pid: u32) -> Option<Vec<String>> {
    let raw = std::fs::read(proc_path(pid, "cmdline")).ok()?;
    let args: Vec<String> = raw
        .split(|byte| *byte == 0)
        .map(|arg| String::from_utf8_lossy(arg).into_owned())
        .collect();
    // The kernel terminates every argument with a NUL, which leaves one empty tail.
    let args = match args.split_last() {
        Some((last, init)) if last.is_empty() => init.to_vec(),
        _ => args,
    };
    (!args.is_empty()).then_some(args)
}

/// A short name for `pid`: the basename of its first argument, else `comm` (which
/// is cut at 15 characters and often renamed, e.g. `pt_main_thread` under PyTorch).
pub fn process_name(pid: u32) -> Option<String> {
    let from_args = cmdline(pid).and_then(|args| {
        let program = args.into_iter().next()?;
        let base = program.rsplit('/').next().unwrap_or_default().to_owned();
        (!base.is_empty()).then_some(base)
    });
    from_args.or_else(|| {
        let comm = std::fs::read_to_string(proc_path(pid, "comm")).ok()?;
        let comm = comm.trim_end_matches('\n');
        (!comm.is_empty()).then(|| comm.to_owned())
    })
}

/// The real UID of `pid`: the first number on the `Uid:` line of /proc/PID/status.
pub fn process_uid(pid: u32) -> Option<u32> {
    parse_status_uid(&std::fs::read_to_string(proc_path(pid, "status")).ok()?)
}

fn parse_status_uid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The user name owning `pid` (real UID, resolved through NSS), or `unknown` when the
/// process is gone, lives in another PID namespace, or its UID has no passwd entry.
pub fn process_user(pid: u32) -> String {
    process_uid(pid)
        .and_then(user_name)
        .unwrap_or_else(|| UNKNOWN.to_owned())
}

/// The user name of this process's real UID.
pub fn current_user() -> Result<String> {
    let uid = nix::unistd::getuid().as_raw();
    user_name(uid).ok_or_else(|| {
        Error::Runtime(format!(
            "cannot resolve the user name of uid {uid} (no passwd entry)"
        ))
    })
}

fn user_name(uid: u32) -> Option<String> {
    User::from_uid(Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|user| user.name)
}

/// This machine's host name, or `localhost` when it has none.
pub fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|name| name.into_string().ok())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

fn proc_path(pid: u32, file: &str) -> std::path::PathBuf {
    Path::new("/proc").join(pid.to_string()).join(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT_WITH_TRICKY_NAME: &str = "4242 (my (odd) prog) S 4100 4242 4100 34816 4242 \
        4194304 120 0 0 0 3 1 0 0 20 0 1 0 987654 12345678 456 18446744073709551615 \
        1 1 0 0 0 0 0 0 0 0 0 0 17 3 0 0 0 0 0";

    #[test]
    fn stat_fields_are_counted_after_the_last_parenthesis() {
        assert_eq!(
            parse_stat(STAT_WITH_TRICKY_NAME),
            Some(Stat {
                state: 'S',
                parent_pid: 4100,
                process_group: 4242,
                terminal_group: 4242,
                start_time: 987_654,
            })
        );
    }

    #[test]
    fn truncated_stat_is_rejected() {
        assert_eq!(parse_stat("1 (init) S 0 1"), None);
        assert_eq!(parse_stat("no parenthesis"), None);
    }

    #[test]
    fn status_uid_is_the_real_uid() {
        let status = "Name:\tbash\nUmask:\t0022\nUid:\t1001\t0\t0\t0\nGid:\t100\t100\t100\t100\n";
        assert_eq!(parse_status_uid(status), Some(1001));
        assert_eq!(parse_status_uid("Name:\tbash\n"), None);
    }

    #[test]
    fn this_process_is_alive_and_well_described() {
        let me = std::process::id();
        let start = process_start_time(me).expect("own start time");
        assert!(process_alive(me, start));
        assert!(!process_alive(me, start + 1));
        assert_eq!(
            parent_pid(me),
            Some(nix::unistd::getppid().as_raw().unsigned_abs())
        );
        let args = cmdline(me).expect("own cmdline");
        let exe = std::env::current_exe().unwrap();
        let exe_name = exe.file_name().unwrap().to_string_lossy();
        assert!(args[0].ends_with(exe_name.as_ref()), "{args:?}");
        assert_eq!(process_name(me).as_deref(), Some(exe_name.as_ref()));
        assert_eq!(process_user(me), current_user().unwrap());
    }

    #[test]
    fn a_missing_process_is_unknown_and_dead() {
        // PIDs never exceed 2^22 on Linux.
        let missing = u32::MAX - 1;
        assert_eq!(process_user(missing), UNKNOWN);
        assert!(!process_alive(missing, 0));
        assert_eq!(process_start_time(missing), None);
        assert_eq!(cmdline(missing), None);
        assert_eq!(process_name(missing), None);
    }

    #[test]
    fn hostname_is_not_empty() {
        assert!(!hostname().is_empty());
    }
}
