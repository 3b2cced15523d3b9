//! `canhazgpu transfer`: hand your manual reservations to another Unix user, with no
//! moment in which the GPUs are free.

use crate::clock::local_zone;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::output;
use crate::session::{Session, new_reservation_id, now};
use crate::state::{GpuSlot, UnixTime};
use crate::store::TransferRequest;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransferArgs {
    pub gpu_ids: Vec<u32>,
    /// The receiving Unix user.
    pub to: String,
    /// Another host's pool (`--host`).
    pub host: Option<String>,
}

pub fn execute(args: &TransferArgs, config: &Config) -> Result<()> {
    if args.to.is_empty()
        || !args
            .to
            .chars()
            .all(|c| c.is_ascii_graphic() && c != ':' && c != '/')
    {
        return Err(Error::Usage(format!("invalid user name {:?}", args.to)));
    }
    // The system's user database decides who exists (on this host: fleets share it).
    match nix::unistd::User::from_name(&args.to) {
        Ok(Some(_)) => {}
        Ok(None) => return Err(Error::Usage(format!("no such user: {}", args.to))),
        Err(e) => {
            return Err(Error::Runtime(format!(
                "cannot look up user {}: {e}",
                args.to
            )));
        }
    }
    let mut session = Session::open_on(config, args.host.as_deref())?;
    let now = now();
    let gpus = session.store.transfer(&TransferRequest {
        actual_user: session.user.clone(),
        ids: args.gpu_ids.clone(),
        to_user: args.to.clone(),
        new_id: new_reservation_id(),
        now,
    })?;
    let on_host = session.on_host();
    let expiry = latest_expiry(&session.store.slots()?, &gpus);
    let mut message = format!(
        "Transferred {} GPU(s): {}{on_host} to {}",
        gpus.len(),
        output::id_list(&gpus),
        args.to
    );
    if let Some(end) = expiry {
        message.push_str(&format!(
            "; {}",
            super::extend::expires(end, now, &local_zone())
        ));
    }
    output::print(&message)?;
    let event = crate::notify::Event {
        event: "transferred",
        host: session.pool_host().to_string(),
        user: args.to.clone(),
        gpus: gpus.clone(),
        text: format!(
            "{} transferred GPU(s) {} on {} to you",
            session.user,
            output::id_list(&gpus),
            session.pool_host()
        ),
    };
    session.notify(vec![event]);
    Ok(())
}

/// The latest expiry among `gpus` as stored now (the transfer keeps each one's).
fn latest_expiry(slots: &[GpuSlot], gpus: &[u32]) -> Option<UnixTime> {
    gpus.iter()
        .filter_map(|&gpu| match slots.get(gpu as usize) {
            Some(GpuSlot::Held(r)) => r.expiry_time,
            _ => None,
        })
        .max()
}
