//! `canhazgpu find`: the hosts of the fleet where N GPUs are available right now.

use serde::Serialize;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::fleet;
use crate::output::{self, table::Cell};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FindArgs {
    pub gpus: u32,
    pub json: bool,
    /// Only the best host's name.
    pub short: bool,
}

#[derive(Serialize)]
struct Found<'a> {
    host: &'a str,
    #[serde(flatten)]
    summary: fleet::Summary,
}

pub fn execute(args: &FindArgs, config: &Config) -> Result<()> {
    if args.gpus == 0 {
        return Err(Error::Usage("--gpus must be at least 1".into()));
    }
    let hosts = fleet::read(config, None)?;
    let found: Vec<Found> = fleet::candidates(&hosts, args.gpus)
        .into_iter()
        .map(|(host, summary)| Found {
            host: &host.name,
            summary,
        })
        .collect();
    if args.json {
        output::print_json(&found)?;
    } else if let Some(best) = found.first().filter(|_| args.short) {
        output::print(best.host)?;
    } else if !found.is_empty() {
        let rows: Vec<Vec<Cell>> = found
            .iter()
            .map(|found| {
                vec![
                    Cell::from(found.host.to_string()),
                    Cell::from(found.summary.available.to_string()),
                    Cell::from(found.summary.total.to_string()),
                    Cell::from(found.summary.gpu_models.clone()),
                ]
            })
            .collect();
        output::print(&output::table::render(
            &["HOST", "AVAILABLE", "TOTAL", "GPU MODELS"],
            &rows,
        ))?;
    }
    match found.is_empty() {
        true => Err(Error::NoHost(format!(
            "no host has {} GPU(s) available right now",
            args.gpus
        ))),
        false => Ok(()),
    }
}
