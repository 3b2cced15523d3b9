//! `canhazgpu status`: reservations and real usage of every GPU.

use crate::config::Config;
use crate::error::Result;
use crate::gpu_status::{GpuStatus, StatusKind, join_users};
use crate::output::{self, table::Cell};
use crate::session::Session;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusArgs {
    pub json: bool,
}

pub fn execute(args: &StatusArgs, config: &Config) -> Result<()> {
    let mut session = Session::open(config)?;
    let obs = session.observe()?;
    if let Err(e) = &obs.usage {
        eprintln!("warning: could not check GPU usage: {e}");
    }
    let mut rows = crate::gpu_status::build(
        &obs.slots,
        &obs.usage,
        config.memory_threshold_mb,
        &obs.dead_ids,
        obs.now,
    );
    crate::queue::mark_collected(&mut rows, &obs.queue, &obs.dead_ids, obs.now);
    if args.json {
        output::print_json(&rows)
    } else {
        output::print(&render_table(&rows))
    }
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
                Cell::from(r.kind.unwrap_or("-")),
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
