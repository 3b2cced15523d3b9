//! One file per command. `execute` dispatches a parsed, clap-free `Command`.

pub mod admin;
pub mod release;
pub mod report;
pub mod reserve;
pub mod run;
pub mod status;
pub mod web;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::state::Selection;

/// A command with its arguments, free of any CLI-parser types.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Admin(admin::AdminArgs),
    Status(status::StatusArgs),
    Reserve(reserve::ReserveArgs),
    Release(release::ReleaseArgs),
    Run(run::RunArgs),
    Report(report::ReportArgs),
    Web(web::WebArgs),
}

/// Runs a command; `Ok` carries the process exit code.
pub fn execute(command: Command, config: &Config) -> Result<u8> {
    match command {
        Command::Admin(args) => admin::execute(&args, config).map(|()| 0),
        Command::Status(args) => status::execute(&args, config).map(|()| 0),
        Command::Reserve(args) => reserve::execute(&args, config).map(|()| 0),
        Command::Release(args) => release::execute(&args, config).map(|()| 0),
        Command::Run(args) => run::execute(&args, config),
        Command::Report(args) => report::execute(&args, config).map(|()| 0),
        Command::Web(args) => web::execute(&args, config).map(|()| 0),
    }
}

/// Combines `--gpus` and `--gpu-ids` as the reference allows: either alone, or both
/// when the count matches the number of IDs or is 1 (the default).
pub fn selection(gpus: Option<u32>, gpu_ids: Option<Vec<u32>>) -> Result<Selection> {
    match (gpus, gpu_ids) {
        (Some(0), _) => Err(Error::Usage("--gpus must be at least 1".into())),
        (count, Some(ids)) => {
            if let Some(n) = count
                && n != 1
                && n as usize != ids.len()
            {
                return Err(Error::Usage(format!(
                    "conflicting --gpus ({n}) and --gpu-ids ({} IDs): give one of them, or make them match",
                    ids.len()
                )));
            }
            Ok(Selection::Ids(ids))
        }
        (count, None) => Ok(Selection::Count(count.unwrap_or(1))),
    }
}

/// `[0, 2]`, the way the reference prints GPU lists.
pub fn id_list(ids: &[u32]) -> String {
    let items: Vec<String> = ids.iter().map(u32::to_string).collect();
    format!("[{}]", items.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_rules_follow_the_reference() {
        assert_eq!(selection(None, None).unwrap(), Selection::Count(1));
        assert_eq!(selection(Some(3), None).unwrap(), Selection::Count(3));
        assert_eq!(
            selection(Some(1), Some(vec![1, 3])).unwrap(),
            Selection::Ids(vec![1, 3])
        );
        assert_eq!(
            selection(Some(2), Some(vec![1, 3])).unwrap(),
            Selection::Ids(vec![1, 3])
        );
        assert!(selection(Some(3), Some(vec![1, 3])).is_err());
        assert!(selection(Some(0), None).is_err());
        assert_eq!(id_list(&[0, 2]), "[0, 2]");
    }
}
