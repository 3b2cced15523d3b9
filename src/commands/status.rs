//! `canhazgpu status`: reservations and real usage of every GPU, of this host, one
//! other host or the whole fleet.

use serde::Serialize;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::fleet::{self, HostStatus};
use crate::gpu_status::{GpuStatus, StatusKind, join_users};
use crate::output::{self, table::Cell};
use crate::session::{self, Session};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusArgs {
    pub json: bool,
    /// Every host of the fleet.
    pub all: bool,
    /// One other host.
    pub remote: Option<String>,
    /// One line per host.
    pub summary: bool,
}

pub fn execute(args: &StatusArgs, config: &Config) -> Result<()> {
    if args.all && args.remote.is_some() {
        return Err(Error::Usage(
            "cannot use --all and --remote together".into(),
        ));
    }
    if !args.all && !args.summary {
        return match &args.remote {
            None => this_host(args, config),
            Some(name) => other_host(args, config, name),
        };
    }
    let only = match (&args.remote, args.all) {
        (Some(name), _) => Some(name.as_str()),
        (None, true) => None,
        (None, false) => Some(config.host_name.as_str()),
    };
    let hosts = fleet::read(config, only)?;
    match (args.summary, args.json) {
        (true, true) => output::print_json(&summary_json(&hosts)),
        (true, false) => output::print(&render_summary(&hosts)),
        (false, true) => output::print_json(&fleet_json(&hosts)),
        (false, false) => output::print(&render_fleet(&hosts)),
    }
}

fn this_host(args: &StatusArgs, config: &Config) -> Result<()> {
    let mut session = Session::open(config)?;
    let obs = session.observe()?;
    if let Err(e) = &obs.usage {
        eprintln!("warning: could not check GPU usage: {e}");
    }
    let rows = session::status_rows(&obs, config.memory_threshold_mb, false);
    match args.json {
        true => output::print_json(&rows),
        false => output::print(&render_table(&rows)),
    }
}

/// `--remote NAME`: from the shared store, or over SSH for a host only listed in
/// `remote_hosts`.
fn other_host(args: &StatusArgs, config: &Config, name: &str) -> Result<()> {
    let host = fleet::read(config, Some(name))?
        .into_iter()
        .next()
        .ok_or_else(|| Error::Usage(format!("unknown host '{name}'")))?;
    let view = host
        .view
        .map_err(|e| Error::Store(format!("{name}: {e}")))?;
    match args.json {
        true => output::print_json(&view.rows),
        false => output::print(&format!("Status for {name}:\n{}", render_table(&view.rows))),
    }
}

/// Each host as upstream prints it: a blank line, a title, then its table or error.
fn render_fleet(hosts: &[HostStatus]) -> String {
    let mut text = String::new();
    for host in hosts {
        text.push_str(&format!("\n┌─ {} ─┐\n", host.name));
        match &host.view {
            Ok(view) => text.push_str(&render_table(&view.rows)),
            Err(error) => text.push_str(&format!("│ ERROR: {error}\n└────────────┘")),
        }
        text.push('\n');
    }
    text.trim_end_matches('\n').to_string()
}

/// `--all --json`: host name → its `status --json` array, or `{"error": ...}`.
fn fleet_json(hosts: &[HostStatus]) -> serde_json::Map<String, serde_json::Value> {
    hosts
        .iter()
        .map(|host| {
            let value = match &host.view {
                Ok(view) => serde_json::to_value(&view.rows).unwrap_or_default(),
                Err(error) => serde_json::json!({ "error": error }),
            };
            (host.name.clone(), value)
        })
        .collect()
}

#[derive(Serialize)]
struct SummaryRow<'a> {
    host: &'a str,
    #[serde(flatten)]
    summary: Option<fleet::Summary>,
    stale: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

fn summary_json(hosts: &[HostStatus]) -> Vec<SummaryRow<'_>> {
    hosts
        .iter()
        .map(|host| SummaryRow {
            host: &host.name,
            summary: host.view.as_ref().ok().map(fleet::HostView::summary),
            stale: host.view.as_ref().is_ok_and(|view| view.stale.is_some()),
            error: host.view.as_ref().err().map(String::as_str),
        })
        .collect()
}

/// `HOST  TOTAL  GPU MODELS  AVAILABLE  IN USE`, as upstream's summary.
fn render_summary(hosts: &[HostStatus]) -> String {
    let headers = ["HOST", "TOTAL", "GPU MODELS", "AVAILABLE", "IN USE"];
    let rows: Vec<Vec<Cell>> = hosts
        .iter()
        .map(|host| match &host.view {
            Ok(view) => {
                let summary = view.summary();
                let name = match view.stale {
                    Some(_) => format!("{} (not reporting)", host.name),
                    None => host.name.clone(),
                };
                let available = match summary.available {
                    0 => Cell {
                        text: "✗ 0".into(),
                        style: Some(output::red()),
                    },
                    n => Cell {
                        text: format!("✓ {n}"),
                        style: Some(output::green()),
                    },
                };
                vec![
                    Cell::from(name),
                    Cell::from(summary.total.to_string()),
                    Cell::from(summary.gpu_models),
                    available,
                    Cell::from(summary.in_use.to_string()),
                ]
            }
            Err(error) => {
                // A long message would widen every row: it goes to stderr.
                eprintln!("warning: {}: {error}", host.name);
                vec![
                    Cell::from(format!("{} (error)", host.name)),
                    Cell::from("-"),
                    Cell::from("-"),
                    Cell {
                        text: "✗ 0".into(),
                        style: Some(output::red()),
                    },
                    Cell::from("-"),
                ]
            }
        })
        .collect();
    output::table::render(&headers, &rows)
}

pub fn render_table(rows: &[GpuStatus]) -> String {
    let with_notes = rows.iter().any(|r| r.note.is_some());
    let mut headers = vec![
        "GPU",
        "STATUS",
        "USER",
        "DURATION",
        "TYPE",
        "MODEL",
        "DETAILS",
        "VALIDATION",
    ];
    if with_notes {
        headers.push("NOTE");
    }
    let dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let cells: Vec<Vec<Cell>> = rows
        .iter()
        .map(|r| {
            let style = match r.status {
                StatusKind::Available => output::green(),
                StatusKind::InUse => output::blue(),
                StatusKind::Unreserved => output::yellow(),
                StatusKind::Error => output::red(),
            };
            let details = match r.status {
                StatusKind::Unreserved => dash(&r.process_info),
                _ => r.details.clone(),
            };
            let mut row = vec![
                Cell::from(r.gpu_id.to_string()),
                Cell {
                    text: r.status.as_str().to_string(),
                    style: Some(style),
                },
                Cell::from(match &r.unreserved_users {
                    // As the reference's table shows it: `user bob`.
                    Some(users) => format!("user {}", join_users(users)),
                    None => dash(&r.user),
                }),
                Cell::from(dash(&r.duration)),
                Cell::from(r.kind.as_deref().unwrap_or("-")),
                Cell::from(dash(&r.model.as_ref().map(|m| m.model.clone()))),
                Cell::from(details),
                Cell::from(dash(&r.validation)),
            ];
            if with_notes {
                row.push(Cell::from(dash(&r.note)));
            }
            row
        })
        .collect();
    output::table::render(&headers, &cells)
}
