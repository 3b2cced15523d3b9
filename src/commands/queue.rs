//! `canhazgpu queue`: the requests waiting for GPUs, in the order they will be served.

use crate::config::Config;
use crate::error::Result;
use crate::output::{self, table::Cell};
use crate::queue::QueueReport;
use crate::session::Session;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueArgs {
    pub json: bool,
    /// Another host's queue (`--host`).
    pub host: Option<String>,
}

pub fn execute(args: &QueueArgs, config: &Config) -> Result<()> {
    let report = Session::open_on(config, args.host.as_deref())?.queue_report()?;
    if args.json {
        output::print_json(&report)
    } else {
        output::print(&render(&report))
    }
}

pub fn render(report: &QueueReport) -> String {
    if report.entries.is_empty() {
        return "No entries waiting in queue.".into();
    }
    let with_notes = report.entries.iter().any(|row| row.note.is_some());
    let mut headers = vec!["POSITION", "USER", "REQUESTED", "COLLECTED", "WAITING"];
    if with_notes {
        headers.push("NOTE");
    }
    let rows: Vec<Vec<Cell>> = report
        .entries
        .iter()
        .map(|row| {
            let mut collected = format!("{}/{}", row.allocated_count, row.requested_count);
            if !row.allocated_gpus.is_empty() {
                collected.push_str(&format!(" {}", crate::output::id_list(&row.allocated_gpus)));
            }
            let mut cells = vec![
                Cell::from(row.position.to_string()),
                Cell::from(row.user_label()),
                Cell::from(row.requested()),
                Cell::from(collected),
                Cell::from(row.wait_time.clone()),
            ];
            if with_notes {
                cells.push(Cell::from(row.note.clone().unwrap_or_else(|| "-".into())));
            }
            cells
        })
        .collect();
    format!(
        "{}\nTotal: {} waiting for {} GPU(s), {} collected so far",
        output::table::render(&headers, &rows),
        report.total_waiting,
        report.total_gpus_requested,
        report.total_gpus_allocated
    )
}
