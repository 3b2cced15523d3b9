//! `canhazgpu run`: reserve GPUs, run a command on them, release them when it ends.

use std::ffi::OsString;
use std::time::Duration;

use nix::errno::Errno;

use crate::config::Config;
use crate::duration::{format_duration, parse_duration};
use crate::error::{Error, Result};
use crate::session::{Session, new_reservation_id, now};
use crate::state::{ProviderKind, ReservationKind};
use crate::store::NewReservation;
use crate::supervise::keeper::{self, Keeper, Kept};
use crate::supervise::spawn::{EnvChange, SpawnError};
use crate::supervise::{Ending, Limits, Supervisor};
use crate::wait;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunArgs {
    pub gpus: Option<u32>,
    pub gpu_ids: Option<Vec<u32>>,
    pub timeout: Option<String>,
    pub kill_grace: String,
    pub heartbeat_interval: String,
    /// The program and its arguments.
    pub command: Vec<OsString>,
    /// Words that came before any `--`: a command given without the separator.
    pub unseparated: Vec<OsString>,
    pub request: super::RequestOptions,
}

/// The arguments, checked before anything is reserved.
#[derive(Debug)]
struct Checked {
    selection: crate::state::Selection,
    limits: Limits,
    interval: Duration,
}

fn check(args: &RunArgs) -> Result<Checked> {
    if let Some(first) = args.unseparated.first() {
        return Err(Error::Usage(format!(
            "missing '--' before the command: write canhazgpu run [OPTIONS] -- {} ...",
            first.to_string_lossy()
        )));
    }
    if args
        .command
        .first()
        .is_none_or(|program| program.is_empty())
    {
        return Err(Error::Usage(
            "no command given: put it after '--', e.g. canhazgpu run --gpus 1 -- python train.py"
                .into(),
        ));
    }
    find_program(&args.command[0])?;
    let seconds = |text: &str| parse_duration(text).map(Duration::from_secs);
    let interval = seconds(&args.heartbeat_interval)?;
    if interval > keeper::MAX_INTERVAL {
        return Err(Error::Usage(format!(
            "--heartbeat-interval must be at most {}s, so that a missed heartbeat does not make the reservation look dead",
            keeper::MAX_INTERVAL.as_secs()
        )));
    }
    Ok(Checked {
        selection: super::selection(args.gpus, args.gpu_ids.clone())?,
        limits: Limits {
            timeout: args.timeout.as_deref().map(seconds).transpose()?,
            kill_grace: match args.kill_grace.trim() {
                // No grace at all: SIGKILL at once.
                "0" | "0s" => Duration::ZERO,
                text => seconds(text)?,
            },
        },
        interval,
    })
}

pub fn execute(args: &RunArgs, config: &Config) -> Result<u8> {
    let checked = check(args)?;
    let policy = args.request.wait_policy(config.run_wait)?;
    let note = args.request.note()?;
    // Signals first: a Ctrl-C from here on is handled, never lost mid-allocation;
    // while waiting in the queue it ends the wait.
    let supervisor = Supervisor::start()?;
    let mut session = Session::open(config)?;
    let reservation = NewReservation {
        id: new_reservation_id(),
        user: args.request.display_user(&session.user)?,
        actual_user: session.user.clone(),
        kind: ReservationKind::Run,
        expiry_time: None,
        note,
        // This process supervises the command (and waits in the queue before).
        owner: Some(session.this_process()?),
        adopted: None,
    };
    let claimed = wait::claim(
        &mut session,
        reservation.clone(),
        checked.selection,
        policy,
        &mut || supervisor.pending_signal(),
        supervisor.doorbell(),
    );
    let gpus = match claimed {
        Ok(gpus) => gpus,
        // The allocation failed after a signal asked to cancel it: the signal is
        // what ends the command, as a shell would report it.
        Err(err) => match supervisor.pending_signal() {
            Some(signal) => {
                eprintln!(
                    "canhazgpu: {signal} received before the command started; nothing reserved"
                );
                return Ok(crate::signals::exit_status(signal));
            }
            None => return Err(err),
        },
    };
    // The store records its own clock reading; this one is within a second of it
    // (or of the end of the wait) and only used if the reservation ever has to be
    // written again.
    let start_time = now();
    let pool = session.pool;
    let keeper = Keeper::start(
        session.store,
        config.clone(),
        Kept {
            reservation,
            start_time,
            pool,
            gpus: gpus.clone(),
            interval: checked.interval,
        },
    )?;

    if let Some(signal) = supervisor.pending_signal() {
        let freed = release(keeper);
        eprintln!(
            "canhazgpu: {signal} received before the command started; released GPU(s) {}",
            crate::output::id_list(&freed)
        );
        return Ok(crate::signals::exit_status(signal));
    }

    let timeout_note = checked
        .limits
        .timeout
        .map(|t| format!(" (timeout: {})", format_duration(t.as_secs() as i64)))
        .unwrap_or_default();
    eprintln!(
        "Reserved {} GPU(s): {} for command execution{timeout_note}",
        gpus.len(),
        crate::output::id_list(&gpus)
    );

    let pid = match supervisor.spawn(&args.command, &visible_devices(pool.provider, &gpus)) {
        Ok(pid) => pid,
        Err(e) => {
            release(keeper);
            return Err(spawn_error(&args.command[0], e));
        }
    };
    let ending = supervisor.supervise(pid, checked.limits);
    let freed = release(keeper);
    let ending = ending?;
    if let Ending::TimedOut { .. } = ending {
        eprintln!(
            "canhazgpu: command stopped by the timeout; released GPU(s) {}; exit status {}",
            crate::output::id_list(&freed),
            ending.exit_code()
        );
    }
    Ok(ending.exit_code())
}

/// Releases the reservation, with a receipt of what was measured on stderr; a failure
/// is a warning, since the command's own exit status must still come through.
fn release(keeper: Keeper) -> Vec<u32> {
    match keeper.finish() {
        Ok(released) => {
            crate::gpu_status::print_receipts(&released, now());
            released.freed
        }
        Err(e) => {
            eprintln!(
                "canhazgpu: warning: could not release the reservation ({e}); it ends by itself: at once for canhazgpu on this host, after 60s elsewhere"
            );
            Vec::new()
        }
    }
}

/// The environment that restricts the command to the reserved GPUs (`None` removes
/// an inherited variable). IDs are the provider's indices, ascending.
///
/// NVIDIA: `CUDA_VISIBLE_DEVICES`, with `CUDA_DEVICE_ORDER=PCI_BUS_ID` so CUDA
/// numbers GPUs the way nvidia-smi does. AMD: HIP reads `HIP_VISIBLE_DEVICES` (and
/// `CUDA_VISIBLE_DEVICES`) as indices into the devices the ROCr runtime exposes, and
/// ROCr first narrows those by `ROCR_VISIBLE_DEVICES` and renumbers them from 0.
/// Setting both to the same physical IDs would select the wrong GPUs, so an
/// inherited `ROCR_VISIBLE_DEVICES` is removed and HIP gets the physical IDs.
pub fn visible_devices(provider: ProviderKind, gpus: &[u32]) -> Vec<EnvChange> {
    let list = gpus
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let mut vars = vec![
        ("CUDA_VISIBLE_DEVICES", Some(list.clone())),
        ("CUDA_DEVICE_ORDER", Some("PCI_BUS_ID".to_string())),
    ];
    if provider == ProviderKind::Amd {
        vars.push(("HIP_VISIBLE_DEVICES", Some(list)));
        vars.push(("ROCR_VISIBLE_DEVICES", None));
    }
    vars
}

/// Looks the command up as `execvp` will (a name with a `/` as it is, else on PATH),
/// so that a missing one fails before anything is reserved, as a shell says it.
fn find_program(program: &OsString) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::PermissionsExt;
    let executable = |path: &std::path::Path| {
        std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    let name = program.to_string_lossy();
    if program.as_bytes().contains(&b'/') {
        let path = std::path::Path::new(program);
        return match (path.exists(), executable(path)) {
            (false, _) => Err(Error::CommandNotFound(format!("command not found: {name}"))),
            (true, false) => Err(Error::CommandNotExecutable(format!(
                "command not executable: {name}"
            ))),
            (true, true) => Ok(()),
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    match std::env::split_paths(&path).any(|dir| executable(&dir.join(program))) {
        true => Ok(()),
        false => Err(Error::CommandNotFound(format!("command not found: {name}"))),
    }
}

fn spawn_error(program: &OsString, error: SpawnError) -> Error {
    let name = program.to_string_lossy();
    match error {
        SpawnError::Os(Errno::ENOENT) => {
            Error::CommandNotFound(format!("command not found: {name}"))
        }
        SpawnError::Os(errno @ (Errno::EACCES | Errno::EPERM)) => {
            Error::CommandNotExecutable(format!("command not executable: {name}: {}", errno.desc()))
        }
        SpawnError::Os(errno) => {
            Error::CommandNotExecutable(format!("cannot run {name}: {}", errno.desc()))
        }
        SpawnError::Nul(text) => Error::Usage(format!(
            "cannot pass {} to the command: it contains a NUL byte",
            text.to_string_lossy()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(command: &[&str]) -> RunArgs {
        RunArgs {
            gpus: None,
            gpu_ids: None,
            timeout: None,
            kill_grace: "30s".into(),
            heartbeat_interval: "10s".into(),
            command: command.iter().map(OsString::from).collect(),
            unseparated: Vec::new(),
            request: Default::default(),
        }
    }

    #[test]
    fn checks_arguments_before_reserving() {
        assert!(check(&args(&["true"])).is_ok());
        assert!(matches!(check(&args(&[])), Err(Error::Usage(_))));
        assert!(matches!(check(&args(&[""])), Err(Error::Usage(_))));
        let mut unseparated = args(&[]);
        unseparated.unseparated = vec!["python".into()];
        let err = check(&unseparated).unwrap_err().to_string();
        assert!(err.contains("missing '--'"), "{err}");
        let mut bad = args(&["true"]);
        bad.timeout = Some("soon".into());
        assert!(matches!(check(&bad), Err(Error::Usage(_))));
        let mut slow = args(&["true"]);
        slow.heartbeat_interval = "1m".into();
        assert!(matches!(check(&slow), Err(Error::Usage(_))));
        let mut limited = args(&["true"]);
        limited.timeout = Some("0.5h".into());
        limited.kill_grace = "2s".into();
        let checked = check(&limited).unwrap();
        assert_eq!(checked.limits.timeout, Some(Duration::from_secs(1800)));
        assert_eq!(checked.limits.kill_grace, Duration::from_secs(2));
    }

    #[test]
    fn environment_per_provider() {
        let nvidia = visible_devices(ProviderKind::Nvidia, &[1, 3]);
        assert_eq!(
            nvidia,
            vec![
                ("CUDA_VISIBLE_DEVICES", Some("1,3".to_string())),
                ("CUDA_DEVICE_ORDER", Some("PCI_BUS_ID".to_string())),
            ]
        );
        let amd = visible_devices(ProviderKind::Amd, &[0, 2]);
        assert!(amd.contains(&("HIP_VISIBLE_DEVICES", Some("0,2".to_string()))));
        assert!(amd.contains(&("ROCR_VISIBLE_DEVICES", None)));
    }

    #[test]
    fn spawn_errors_map_to_shell_codes() {
        let program = OsString::from("nope");
        let not_found = spawn_error(&program, SpawnError::Os(Errno::ENOENT));
        assert_eq!(not_found.exit_code(), 127);
        assert_eq!(not_found.to_string(), "command not found: nope");
        let denied = spawn_error(&program, SpawnError::Os(Errno::EACCES));
        assert_eq!(denied.exit_code(), 126);
        assert_eq!(
            denied.to_string(),
            "command not executable: nope: Permission denied"
        );
        let format = spawn_error(&program, SpawnError::Os(Errno::ENOEXEC));
        assert_eq!(format.exit_code(), 126);
    }
}
