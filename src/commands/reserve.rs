//! `canhazgpu reserve`: hold GPUs for interactive work until released or expired.

use crate::clock::{format_clock, local_zone, parse_until};
use crate::config::Config;
use crate::duration::{format_duration, parse_duration};
use crate::error::Result;
use crate::output;
use crate::session::{Session, new_reservation_id, now};
use crate::state::ReservationKind;
use crate::store::NewReservation;
use crate::wait::{self, WaitPolicy, WaitSignals};

use super::RequestOptions;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReserveArgs {
    pub gpus: Option<u32>,
    pub gpu_ids: Option<Vec<u32>>,
    pub duration: String,
    /// `--until TIME`, instead of the duration.
    pub until: Option<String>,
    /// `--force`: also take GPUs in use without reservation by the caller's own
    /// processes (any, for root).
    pub force: bool,
    pub request: RequestOptions,
    /// Print only the IDs, comma-separated.
    pub short: bool,
    /// Another host's pool (`--host`).
    pub host: Option<String>,
}

pub fn execute(args: &ReserveArgs, config: &Config) -> Result<()> {
    let selection = super::selection(args.gpus, args.gpu_ids.clone())?;
    let tz = local_zone();
    let started = now();
    let seconds = match &args.until {
        Some(time) => (parse_until(time, started, &tz)? - started) as u64,
        None => parse_duration(&args.duration)?,
    };
    let policy = match args.force {
        // Taking over a busy GPU is now or never: the queue hands out only free ones.
        true => WaitPolicy::FailAtOnce,
        false => args.request.wait_policy(config.reserve_wait)?,
    };
    let note = args.request.note()?;
    // Signals end a wait cleanly (leaving the queue); taken before any thread starts.
    let signals = match policy {
        WaitPolicy::FailAtOnce => None,
        _ => Some(WaitSignals::install()?),
    };
    let mut session = Session::open_on(config, args.host.as_deref())?;
    let reservation = NewReservation {
        id: new_reservation_id(),
        user: args.request.display_user(&session.user)?,
        actual_user: session.user.clone(),
        kind: ReservationKind::Manual,
        expiry_time: Some(started + seconds as i64),
        note,
        owner: None,
        adopted: None,
    };
    let doorbell = signals
        .as_ref()
        .map_or_else(wait::Doorbell::default, |signals| {
            signals.doorbell().clone()
        });
    let mut interrupted = || signals.as_ref().and_then(WaitSignals::pending);
    let ids = match args.force {
        true => {
            let request = session.alloc_request(reservation, selection, true)?;
            session.store.allocate(&request)?
        }
        false => wait::claim(
            &mut session,
            reservation,
            selection,
            policy,
            &mut interrupted,
            &doorbell,
        )?,
    };
    let list: Vec<String> = ids.iter().map(u32::to_string).collect();
    if args.short {
        return output::print(&list.join(","));
    }
    let on_host = session.on_host();
    output::print(&format!(
        "Reserved {} GPU(s): {}{on_host} for {} (until {})\n\nRun the following command to run only on these GPUs:\nexport CUDA_VISIBLE_DEVICES={}",
        ids.len(),
        crate::output::id_list(&ids),
        format_duration(seconds as i64),
        format_clock(started + seconds as i64, &tz),
        list.join(",")
    ))
}
