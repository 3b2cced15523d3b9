//! One file per command. `execute` dispatches a parsed, clap-free `Command`.

pub mod admin;
mod admin_check;
pub mod adopt;
pub mod agent;
pub mod extend;
pub mod find;
pub mod notify;
pub mod queue;
pub mod release;
pub mod report;
pub mod reserve;
pub mod run;
pub mod status;
pub mod transfer;
pub mod web;

use std::time::Duration;

use crate::config::Config;
use crate::config::WaitPolicy;
use crate::duration::parse_duration;
use crate::error::{Error, Result};
use crate::state::Selection;

/// A command with its arguments, free of any CLI-parser types.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Admin(admin::AdminArgs),
    Status(status::StatusArgs),
    Find(find::FindArgs),
    Agent(agent::AgentArgs),
    Reserve(reserve::ReserveArgs),
    Extend(extend::ExtendArgs),
    Transfer(transfer::TransferArgs),
    Adopt(adopt::AdoptArgs),
    KeepAdopted(adopt::Adopted),
    Notify(notify::NotifyArgs),
    Queue(queue::QueueArgs),
    Release(release::ReleaseArgs),
    Run(run::RunArgs),
    Report(report::ReportArgs),
    Web(web::WebArgs),
    /// A shell completion script to print.
    Completion(String),
    /// Man pages (file name, roff) to write into `dir`.
    Man {
        dir: std::path::PathBuf,
        pages: Vec<(String, Vec<u8>)>,
    },
}

impl Command {
    /// Commands that need no configuration (and no store): they work even where the
    /// configuration is broken, as packaging and shell start-up need.
    pub fn execute_standalone(&self) -> Option<Result<u8>> {
        match self {
            Command::Completion(script) => Some(crate::output::print_raw(script).map(|()| 0)),
            Command::Man { dir, pages } => Some(write_man_pages(dir, pages).map(|()| 0)),
            _ => None,
        }
    }
}

fn write_man_pages(dir: &std::path::Path, pages: &[(String, Vec<u8>)]) -> Result<()> {
    let failed = |err: std::io::Error| {
        Error::Runtime(format!(
            "cannot write man pages to {}: {err}",
            dir.display()
        ))
    };
    std::fs::create_dir_all(dir).map_err(failed)?;
    for (name, page) in pages {
        let path = dir.join(name);
        std::fs::write(&path, page).map_err(failed)?;
        crate::output::print(&path.display().to_string())?;
    }
    Ok(())
}

/// Runs a command; `Ok` carries the process exit code.
pub fn execute(command: Command, config: &Config) -> Result<u8> {
    match command {
        Command::Admin(args) => admin::execute(&args, config).map(|()| 0),
        Command::Status(args) => status::execute(&args, config).map(|()| 0),
        Command::Find(args) => find::execute(&args, config).map(|()| 0),
        Command::Agent(args) => agent::execute(&args, config).map(|()| 0),
        Command::Reserve(args) => reserve::execute(&args, config).map(|()| 0),
        Command::Extend(args) => extend::execute(&args, config).map(|()| 0),
        Command::Transfer(args) => transfer::execute(&args, config).map(|()| 0),
        Command::Adopt(args) => adopt::execute(&args, config).map(|()| 0),
        Command::KeepAdopted(adopted) => adopt::keep(&adopted, config).map(|()| 0),
        Command::Notify(args) => notify::execute(&args, config).map(|()| 0),
        Command::Queue(args) => queue::execute(&args, config).map(|()| 0),
        Command::Release(args) => release::execute(&args, config),
        Command::Run(args) => run::execute(&args, config),
        Command::Report(args) => report::execute(&args, config).map(|()| 0),
        Command::Web(args) => web::execute(&args, config).map(|()| 0),
        standalone @ (Command::Completion(_) | Command::Man { .. }) => {
            standalone.execute_standalone().unwrap_or(Ok(0))
        }
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

/// `--wait [DURATION]` or `--nonblock`, as given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WaitFlag {
    Nonblock,
    Forever,
    Limit(String),
}

/// What `run` and `reserve` accept besides the GPUs: waiting, a note, a display name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestOptions {
    pub wait: Option<WaitFlag>,
    pub note: Option<String>,
    pub user: Option<String>,
}

/// The longest note and display name accepted, in characters.
const MAX_NOTE_CHARS: usize = 200;
const MAX_USER_CHARS: usize = 64;

impl RequestOptions {
    /// The flags' wait policy, else the configured one (`run.wait`, `reserve.wait`),
    /// else fail at once.
    pub fn wait_policy(&self, configured: Option<WaitPolicy>) -> Result<WaitPolicy> {
        match &self.wait {
            Some(WaitFlag::Nonblock) => Ok(WaitPolicy::FailAtOnce),
            Some(WaitFlag::Forever) => Ok(WaitPolicy::Forever),
            Some(WaitFlag::Limit(text)) => {
                parse_duration(text).map(|s| WaitPolicy::Limit(Duration::from_secs(s)))
            }
            None => Ok(configured.unwrap_or(WaitPolicy::FailAtOnce)),
        }
    }

    /// The note, checked: one line of at most 200 characters; empty means none.
    pub fn note(&self) -> Result<Option<String>> {
        let Some(note) = self.note.as_deref().map(str::trim) else {
            return Ok(None);
        };
        check_text("--note", note, MAX_NOTE_CHARS)?;
        Ok(Some(note.to_string()).filter(|note| !note.is_empty()))
    }

    /// The display name: `--user`, checked, or the real user.
    pub fn display_user(&self, real_user: &str) -> Result<String> {
        let Some(name) = self.user.as_deref().map(str::trim) else {
            return Ok(real_user.to_string());
        };
        if name.is_empty() {
            return Err(Error::Usage("--user cannot be empty".into()));
        }
        check_text("--user", name, MAX_USER_CHARS)?;
        Ok(name.to_string())
    }
}

/// Text shown in tables and logs: one line, printable, not too long.
fn check_text(flag: &str, text: &str, max_chars: usize) -> Result<()> {
    if text.chars().any(char::is_control) {
        return Err(Error::Usage(format!(
            "{flag} must be one line of printable text"
        )));
    }
    if text.chars().count() > max_chars {
        return Err(Error::Usage(format!(
            "{flag} is too long (at most {max_chars} characters)"
        )));
    }
    Ok(())
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
    }

    #[test]
    fn notes_and_display_names_are_one_printable_line() {
        let options = |note: &str, user: &str| RequestOptions {
            wait: None,
            note: Some(note.into()),
            user: Some(user.into()),
        };
        let ok = options(" training run ", "svc-ml");
        assert_eq!(ok.note().unwrap().as_deref(), Some("training run"));
        assert_eq!(ok.display_user("alice").unwrap(), "svc-ml");
        assert_eq!(options("", "x").note().unwrap(), None);
        assert_eq!(
            RequestOptions::default().display_user("alice").unwrap(),
            "alice"
        );
        assert!(options("two\nlines", "x").note().is_err());
        assert!(options("x", " ").display_user("alice").is_err());
        assert!(options("x", "a\u{1b}[31m").display_user("alice").is_err());
        assert!(options(&"n".repeat(201), "x").note().is_err());
        assert!(options("x", &"u".repeat(65)).display_user("alice").is_err());
    }
}
