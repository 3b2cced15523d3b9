//! `canhazgpu extend`: lengthen your manual reservations in place.

use std::collections::BTreeMap;

use crate::clock::{format_clock, local_zone, parse_until};
use crate::config::Config;
use crate::duration::{format_duration, parse_duration};
use crate::error::Result;
use crate::output;
use crate::session::{Session, now};
use crate::state::UnixTime;
use crate::store::{ExtendRequest, NewEnd};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtendArgs {
    /// These GPUs; all of the caller's manual reservations when `None`.
    pub gpu_ids: Option<Vec<u32>>,
    pub by: End,
    /// Another host's pool (`--host`).
    pub host: Option<String>,
}

/// How much longer: by a duration, or until a clock time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    By(String),
    Until(String),
}

pub fn execute(args: &ExtendArgs, config: &Config) -> Result<()> {
    let tz = local_zone();
    let now = now();
    let end = match &args.by {
        End::By(duration) => NewEnd::By(parse_duration(duration)? as i64),
        End::Until(time) => NewEnd::At(parse_until(time, now, &tz)?),
    };
    let mut session = Session::open_on(config, args.host.as_deref())?;
    let ends = session.store.extend(&ExtendRequest {
        actual_user: session.user.clone(),
        ids: args.gpu_ids.clone(),
        end,
        max_seconds: config.policy.longest() as i64,
        now,
    })?;
    let on_host = session.on_host();
    // One line per new end: GPUs that ended at different times still do.
    let mut by_end: BTreeMap<UnixTime, Vec<u32>> = BTreeMap::new();
    for (gpu, end) in ends {
        by_end.entry(end).or_default().push(gpu);
    }
    let lines: Vec<String> = by_end
        .iter()
        .map(|(end, gpus)| {
            format!(
                "Extended {} GPU(s): {}{on_host}; {}",
                gpus.len(),
                output::id_list(gpus),
                expires(*end, now, &tz)
            )
        })
        .collect();
    output::print(&lines.join("\n"))
}

/// `expires in 6h 0m 0s (at 2026-12-01 18:30)`.
pub fn expires(end: UnixTime, now: UnixTime, tz: &jiff::tz::TimeZone) -> String {
    format!(
        "expires in {} (at {})",
        format_duration(end - now),
        format_clock(end, tz)
    )
}
