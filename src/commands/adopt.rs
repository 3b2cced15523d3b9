//! `canhazgpu adopt PID`: turn a job started without canhazgpu into a run
//! reservation of the GPUs it uses, ending when the job exits.
//!
//! On this host the reservation is the job's: every canhazgpu here checks the
//! process itself (as it checks a `run` supervisor), so it ends the moment the job
//! does. Other hosts sharing the Redis see only its heartbeat, which a small keeper
//! process started by `adopt` (`canhazgpu keep-adopted`, detached) refreshes every
//! 10 s while the job lives; it also releases the GPUs in the store when the job
//! exits. If the keeper is killed, the reservation goes stale after a minute.

use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::gpu::procinfo;
use crate::output;
use crate::session::{Session, new_reservation_id, now};
use crate::state::{ReservationKind, RunOwner, Selection};
use crate::store::{self, NewReservation, ReleaseScope, Store};
use crate::supervise::proctree;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdoptArgs {
    pub pid: u32,
    pub note: Option<String>,
}

/// An adopted job's reservation, as its keeper keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Adopted {
    pub reservation_id: String,
    pub pid: u32,
    /// The job's start time (`/proc/PID/stat`), so a reused PID is not the job.
    pub pid_start: u64,
    pub gpus: Vec<u32>,
}

/// How often the keeper refreshes the heartbeat (stale after 60 s).
const HEARTBEAT_EVERY: Duration = Duration::from_secs(10);
/// How long the keeper tries to release the GPUs of a job that exited.
const GIVE_UP_AFTER: Duration = Duration::from_secs(300);
/// How often the keeper checks whether the job is still there.
const CHECK_EVERY: Duration = Duration::from_millis(500);

pub fn execute(args: &AdoptArgs, config: &Config) -> Result<()> {
    let pid = args.pid;
    let pid_start = procinfo::process_start_time(pid)
        .ok_or_else(|| Error::Usage(format!("no process with PID {pid}")))?;
    let owner = procinfo::process_user(pid);
    let caller = nix::unistd::getuid();
    if !caller.is_root() && procinfo::process_uid(pid) != Some(caller.as_raw()) {
        return Err(Error::Usage(format!(
            "PID {pid} belongs to {owner}: only its owner or root may adopt it"
        )));
    }
    let note = args
        .note
        .as_deref()
        .map(str::trim)
        .filter(|n| !n.is_empty());
    let mut session = Session::open(config)?;
    let obs = session.observe()?;
    let usage = obs
        .usage
        .as_ref()
        .map_err(|e| Error::Gpu(format!("failed to query the GPUs: {e}")))?;
    let mut job = proctree::live_descendants(pid);
    job.push(pid);
    let gpus: Vec<u32> = usage
        .iter()
        .filter(|gpu| gpu.processes.iter().any(|p| job.contains(&p.pid)))
        .map(|gpu| gpu.index)
        .collect();
    // As the GPU query names it (what `status` shows), else as /proc does.
    let name = usage
        .iter()
        .flat_map(|gpu| &gpu.processes)
        .find(|p| p.pid == pid)
        .map(|p| p.name.rsplit('/').next().unwrap_or(&p.name).to_string())
        .or_else(|| procinfo::process_name(pid))
        .unwrap_or_else(|| procinfo::UNKNOWN.into());
    if gpus.is_empty() {
        return Err(Error::Usage(format!(
            "PID {pid} ({name}) and its children use no GPU that the GPU query can see"
        )));
    }
    let reservation = NewReservation {
        id: new_reservation_id(),
        user: owner.clone(),
        actual_user: owner.clone(),
        kind: ReservationKind::Run,
        expiry_time: None,
        note: note.map(str::to_string),
        owner: Some(RunOwner {
            host: session.host.clone(),
            pid,
            pid_start,
        }),
        adopted: Some(name.clone()),
    };
    let adopted = Adopted {
        reservation_id: reservation.id.clone(),
        pid,
        pid_start,
        gpus: gpus.clone(),
    };
    let request = session.request_from(obs, reservation, Selection::Ids(gpus), true)?;
    let claimed = session.store.allocate(&request)?;
    if let Err(e) = start_keeper(&adopted, config) {
        let scope = ReleaseScope::Reservation {
            id: adopted.reservation_id.clone(),
        };
        let _ = session.store.release(&scope, now());
        return Err(Error::Runtime(format!(
            "cannot start the process that keeps the reservation: {e}"
        )));
    }
    output::print(&format!(
        "Adopted PID {pid} ({name}) of {owner}: run reservation of {} GPU(s): {}; it ends when the process exits",
        claimed.len(),
        output::id_list(&claimed)
    ))
}

/// Starts `canhazgpu keep-adopted` detached: its own process group, no terminal
/// streams, the same settings.
fn start_keeper(adopted: &Adopted, config: &Config) -> std::io::Result<()> {
    let gpus: Vec<String> = adopted.gpus.iter().map(u32::to_string).collect();
    crate::privilege::command(std::env::current_exe()?)
        .arg("keep-adopted")
        .arg(&adopted.reservation_id)
        .arg(adopted.pid.to_string())
        .arg(adopted.pid_start.to_string())
        .arg(gpus.join(","))
        .envs(config.child_environment())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map(|_| ())
}

/// The keeper: refreshes the heartbeat while the job lives, releases the GPUs when
/// it exits, and stops when the reservation is gone (released by hand). A store
/// that does not answer is opened again on the next round.
pub fn keep(adopted: &Adopted, config: &Config) -> Result<()> {
    let scope = ReleaseScope::Reservation {
        id: adopted.reservation_id.clone(),
    };
    let mut store: Option<Box<dyn Store>> = None;
    let mut next_beat = Instant::now();
    let mut gone_since: Option<Instant> = None;
    loop {
        let alive = procinfo::process_alive(adopted.pid, adopted.pid_start);
        if !alive && gone_since.get_or_insert_with(Instant::now).elapsed() > GIVE_UP_AFTER {
            // The store stayed away: the reservation goes stale by itself.
            return Ok(());
        }
        if alive && Instant::now() < next_beat {
            std::thread::sleep(CHECK_EVERY);
            continue;
        }
        let open = match store.as_mut() {
            Some(open) => open,
            None => match store::open(config) {
                Ok(opened) => store.insert(opened),
                Err(_) => {
                    std::thread::sleep(CHECK_EVERY);
                    continue;
                }
            },
        };
        if !alive {
            match open.release(&scope, now()) {
                Ok(_) => return Ok(()),
                Err(_) => store = None,
            }
            std::thread::sleep(CHECK_EVERY);
            continue;
        }
        match open.heartbeat(&adopted.reservation_id, &adopted.gpus, now()) {
            Ok(held) if held.is_empty() => return Ok(()),
            Ok(_) => next_beat = Instant::now() + HEARTBEAT_EVERY,
            Err(_) => store = None,
        }
    }
}
