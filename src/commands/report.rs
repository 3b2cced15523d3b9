//! `canhazgpu report`: GPU hours per user over the last N days.

use jiff::tz::TimeZone;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::output;
use crate::report;
use crate::session;
use crate::store;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReportArgs {
    /// As given; validated by `report::parse_days`.
    pub days: String,
    pub json: bool,
}

pub fn execute(args: &ReportArgs, config: &Config) -> Result<()> {
    let days = report::parse_days(&args.days)?;
    let mut store = store::open(config)?;
    store.pool()?.ok_or(Error::NotInitialized)?;
    let report = session::usage_report(
        store.as_mut(),
        &config.host_name,
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
