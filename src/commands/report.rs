//! `canhazgpu report`: GPU hours per user over the last N days.

use jiff::tz::TimeZone;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::gpu::procinfo;
use crate::output;
use crate::report::{self, Report, Window};
use crate::session;
use crate::state::UnixTime;
use crate::store::{self, Store};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReportArgs {
    /// As given; validated by `report::parse_days`.
    pub days: String,
    pub json: bool,
}

pub fn execute(args: &ReportArgs, config: &Config) -> Result<()> {
    let days = report::parse_days(&args.days)?;
    let mut store = store::open(&config.store, config.history_retention_days)?;
    store.pool()?.ok_or(Error::NotInitialized)?;
    let report = generate(
        store.as_mut(),
        &procinfo::hostname(),
        days,
        session::now(),
        &TimeZone::system(),
    )?;
    if args.json {
        output::print_json(&report)
    } else {
        output::print(report::render_text(&report).trim_end_matches('\n'))
    }
}

/// The report of the `days` days up to `now`: finished reservations from the
/// history plus the ones the store still holds. `host` identifies run reservations
/// supervised on this machine, whose supervisor can be checked directly.
pub fn generate(
    store: &mut dyn Store,
    host: &str,
    days: u32,
    now: UnixTime,
    tz: &TimeZone,
) -> Result<Report> {
    let window = Window::last_days(days, now);
    // History first, then the held GPUs: a reservation ending in between is left
    // out rather than counted twice.
    let mut usages = store.usage_summary(window.from, window.to)?;
    let (slots, _, dead_ids) = crate::session::read_state(store, host)?;
    usages.extend(report::tally(
        &report::in_progress(&slots, &dead_ids, now),
        window,
    ));
    Ok(report::build(usages, window, days, tz))
}
