//! `canhazgpu status`: reservations and real usage of every GPU, of this host, one
//! other host or the whole fleet.

use serde::Serialize;

use std::time::Duration;

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
    /// `--watch [INTERVAL]`: redraw every this many seconds.
    pub watch: Option<u64>,
}

pub fn execute(args: &StatusArgs, config: &Config) -> Result<()> {
    if args.all && args.remote.is_some() {
        return Err(Error::Usage(
            "cannot use --all and --remote together".into(),
        ));
    }
    if let Some(every) = args.watch {
        if args.json {
            return Err(Error::Usage(
                "--watch redraws tables: leave out --json".into(),
            ));
        }
        let interval = match (every / 60, every % 60) {
            (0, secs) => format!("{secs}s"),
            (mins, 0) => format!("{mins}m"),
            (mins, secs) => format!("{mins}m{secs}s"),
        };
        return output::screen::watch(Duration::from_secs(every), || {
            watch_frame(args, config, &interval)
        });
    }
    if args.json {
        return print_json(args, config);
    }
    let view = render(args, config)?;
    for warning in &view.warnings {
        eprintln!("warning: {warning}");
    }
    output::print(&view.text)
}

/// What `status` shows as text, with the figures of `--watch`'s header.
struct View {
    text: String,
    /// This host's name, or `N hosts`.
    what: String,
    free: u32,
    total: u32,
    warnings: Vec<String>,
}

/// Where `status` looks: this host alone (live), one other host, or a fleet read.
fn only<'a>(args: &'a StatusArgs, config: &'a Config) -> Option<&'a str> {
    match (&args.remote, args.all) {
        (Some(name), _) => Some(name.as_str()),
        (None, true) => None,
        (None, false) => Some(config.host_name.as_str()),
    }
}

fn render(args: &StatusArgs, config: &Config) -> Result<View> {
    if !args.all && !args.summary {
        let Some(name) = &args.remote else {
            let (rows, warnings) = local_rows(config)?;
            return Ok(View {
                text: render_table(&rows),
                what: config.host_name.clone(),
                free: count_available(&rows),
                total: rows.len() as u32,
                warnings,
            });
        };
        let rows = other_host_rows(config, name)?;
        return Ok(View {
            text: format!("Status for {name}:\n{}", render_table(&rows)),
            what: name.clone(),
            free: count_available(&rows),
            total: rows.len() as u32,
            warnings: Vec::new(),
        });
    }
    let hosts = fleet::read(config, only(args, config))?;
    let summaries: Vec<fleet::Summary> = hosts
        .iter()
        .filter_map(|host| host.view.as_ref().ok().map(fleet::HostView::summary))
        .collect();
    Ok(View {
        text: match args.summary {
            true => render_summary(&hosts),
            false => render_fleet(&hosts),
        },
        what: match hosts.len() {
            1 => hosts[0].name.clone(),
            n => format!("{n} hosts"),
        },
        free: summaries.iter().map(|s| s.available).sum(),
        total: summaries.iter().map(|s| s.total).sum(),
        warnings: Vec::new(),
    })
}

/// This host's rows, observed live, and a warning when its GPU usage could not be
/// checked.
fn local_rows(config: &Config) -> Result<(Vec<GpuStatus>, Vec<String>)> {
    let mut session = Session::open(config)?;
    let obs = session.observe()?;
    let warnings = obs
        .usage
        .as_ref()
        .err()
        .map(|e| format!("could not check GPU usage: {e}"))
        .into_iter()
        .collect();
    Ok((
        session::status_rows(&obs, config.memory_threshold_mb, false),
        warnings,
    ))
}

fn count_available(rows: &[GpuStatus]) -> u32 {
    rows.iter()
        .filter(|row| row.status == StatusKind::Available)
        .count() as u32
}

/// `--watch`'s frame: a header line (where, when, free of total), then the table,
/// or what went wrong this time.
fn watch_frame(args: &StatusArgs, config: &Config, interval: &str) -> String {
    let now = crate::clock::local_zone()
        .to_datetime(jiff::Timestamp::now())
        .strftime("%Y-%m-%d %H:%M:%S")
        .to_string();
    match render(args, config) {
        Ok(view) => {
            let mut text = format!(
                "{} · {now} · {}/{} GPUs free · every {interval} · q to quit\n\n{}",
                view.what, view.free, view.total, view.text
            );
            for warning in &view.warnings {
                text.push_str(&format!("\nwarning: {warning}"));
            }
            text
        }
        Err(err) => format!("{} · {now} · q to quit\n\nError: {err}", config.host_name),
    }
}

fn print_json(args: &StatusArgs, config: &Config) -> Result<()> {
    if !args.all && !args.summary {
        return match &args.remote {
            None => {
                let (rows, warnings) = local_rows(config)?;
                for warning in &warnings {
                    eprintln!("warning: {warning}");
                }
                output::print_json(&rows)
            }
            Some(name) => output::print_json(&other_host_rows(config, name)?),
        };
    }
    let hosts = fleet::read(config, only(args, config))?;
    match args.summary {
        true => output::print_json(&summary_json(&hosts)),
        false => output::print_json(&fleet_json(&hosts)),
    }
}

fn other_host_rows(config: &Config, name: &str) -> Result<Vec<GpuStatus>> {
    let host = fleet::read(config, Some(name))?
        .into_iter()
        .next()
        .ok_or_else(|| Error::Usage(format!("unknown host '{name}'")))?;
    host.view
        .map(|view| view.rows)
        .map_err(|e| Error::Store(format!("{name}: {e}")))
}

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
