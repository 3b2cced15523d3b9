//! `canhazgpu report`: GPU hours per user over the last N days, on this host,
//! another one, or the whole fleet.

use jiff::tz::TimeZone;

use crate::config::Config;
use crate::error::Result;
use crate::output;
use crate::report;
use crate::session;
use crate::store;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReportArgs {
    /// As given; validated by `report::parse_days`.
    pub days: String,
    pub json: bool,
    pub csv: bool,
    pub scope: Scope,
}

/// Whose usage a report adds up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    Local,
    /// Another host of the fleet (`--host`).
    Host(String),
    /// Every host (`--all`), with a table per host.
    Fleet,
}

pub fn execute(args: &ReportArgs, config: &Config) -> Result<()> {
    let days = report::parse_days(&args.days)?;
    let mut store = store::open(config)?;
    let (now, tz) = (session::now(), TimeZone::system());
    let report = match &args.scope {
        Scope::Fleet => session::fleet_report(store.as_mut(), &config.host_name, days, now, &tz)?,
        scope => {
            if let Scope::Host(name) = scope {
                store.select_host(name)?;
            }
            if store.pool()?.is_none() {
                return Err(store.missing_pool());
            }
            session::usage_report(store.as_mut(), &config.host_name, days, now, &tz)?
        }
    };
    if args.json {
        output::print_json(&report)
    } else if args.csv {
        output::print_raw(&report::render_csv(&report))
    } else {
        output::print(report::render_text(&report).trim_end_matches('\n'))
    }
}
