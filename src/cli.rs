//! Command-line parsing (clap). Nothing outside this file sees clap types: `Cli`
//! turns into `config::Overrides` and a plain `commands::Command`.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

use crate::commands::{
    Command, admin, adopt, agent, extend, find, notify, queue, release, report, reserve, run,
    status, transfer, web,
};
use crate::config::Overrides;
use crate::state::ProviderKind;

#[derive(Debug, Parser)]
#[command(
    name = "canhazgpu",
    version,
    about = "GPU reservations for shared multi-user Linux machines",
    arg_required_else_help = true
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: CliCommand,
}

/// Settings accepted by every command. Environment variables and the config file
/// are read by `config::resolve`, so these are plain optional strings here.
#[derive(Debug, Args)]
#[command(next_help_heading = "Global options")]
pub struct GlobalArgs {
    /// Configuration file (default: ~/.canhazgpu.{yaml,yml,json,toml}, then /etc/canhazgpu/config.*)
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Storage backend: sqlite (embedded, default) or redis [env: CANHAZGPU_BACKEND]
    #[arg(long, global = true, value_name = "BACKEND")]
    pub backend: Option<String>,
    /// Directory of the embedded store (default: /var/lib/canhazgpu) [env: CANHAZGPU_STATE_DIR]
    #[arg(long, global = true, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Redis server hostname (default: localhost) [env: CANHAZGPU_REDIS_HOST]
    #[arg(long, global = true, value_name = "HOST")]
    pub redis_host: Option<String>,
    /// Redis server port (default: 6379) [env: CANHAZGPU_REDIS_PORT]
    #[arg(long, global = true, value_name = "PORT")]
    pub redis_port: Option<String>,
    /// Redis database number (default: 0) [env: CANHAZGPU_REDIS_DB]
    #[arg(long, global = true, value_name = "DB")]
    pub redis_db: Option<String>,
    /// Redis URL: redis://, rediss:// (TLS) or redis+unix:// [env: CANHAZGPU_REDIS_URL]
    #[arg(long, global = true, value_name = "URL")]
    pub redis_url: Option<String>,
    /// Redis password [env: CANHAZGPU_REDIS_PASSWORD]
    #[arg(long, global = true, value_name = "PASSWORD")]
    pub redis_password: Option<String>,
    /// Memory threshold in MB to consider a GPU as "in use" (default: 1024) [env: CANHAZGPU_MEMORY_THRESHOLD]
    #[arg(long, global = true, value_name = "MB")]
    pub memory_threshold: Option<String>,
    /// Colour: auto (on a terminal without NO_COLOR, or with CLICOLOR_FORCE), always, never
    #[arg(long, global = true, value_name = "WHEN", default_value = "auto")]
    pub color: ColorArg,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ColorArg {
    Auto,
    Always,
    Never,
}

/// The command line as people see it: the global options in full once, under the
/// top-level help, and summarised in one line under each subcommand's.
pub fn command() -> clap::Command {
    let plain = Cli::command();
    let globals: Vec<&clap::Arg> = plain
        .get_arguments()
        .filter(|arg| arg.is_global_set())
        .collect();
    let names: Vec<String> = globals
        .iter()
        .filter_map(|arg| arg.get_long().map(|long| format!("--{long}")))
        .collect();
    let summary = format!(
        "Global options: {} (see 'canhazgpu --help')",
        names.join(", ")
    );
    let entries: Vec<(String, String)> = globals
        .iter()
        .filter_map(|arg| {
            let long = arg.get_long()?;
            let value = arg
                .get_value_names()
                .and_then(|names| names.first())
                .map(|name| format!(" <{name}>"))
                .unwrap_or_default();
            let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
            Some((format!("--{long}{value}"), help))
        })
        .collect();
    // Two lines an entry, like clap's long help, so that wrapping keeps the indent.
    let listed: Vec<String> = entries
        .iter()
        .map(|(flag, help)| match help.split_once(" [env: ") {
            Some((text, env)) => format!("  {flag}\n          {text}\n          [env: {env}"),
            None => format!("  {flag}\n          {help}"),
        })
        .collect();
    let ids: Vec<String> = globals.iter().map(|arg| arg.get_id().to_string()).collect();
    let mut command = plain
        .override_usage("canhazgpu [OPTIONS] <COMMAND>")
        .after_help(format!(
            "Global options (every command):\n{}",
            listed.join("\n")
        ))
        .mut_subcommands(|sub| sub.after_help(summary.clone()));
    for id in ids {
        command = command.mut_arg(id, |arg| arg.hide(true));
    }
    command
}

/// Parses the process's arguments with `command()`.
pub fn parse() -> Result<Cli, clap::Error> {
    let matches = command().try_get_matches()?;
    Cli::from_arg_matches(&matches)
}

/// The shell completion script for `shell`, for the whole command line, completing
/// the command `name` (`canhazgpu`, or a link to it such as `chg`).
fn completion_script(shell: clap_complete::Shell, name: &str) -> String {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), name, &mut script);
    String::from_utf8_lossy(&script).into_owned()
}

/// `canhazgpu(1)` and one page per visible subcommand (`canhazgpu-NAME(1)`), as roff.
fn man_pages() -> std::io::Result<Vec<(String, Vec<u8>)>> {
    let top = Cli::command();
    let mut pages = Vec::new();
    let mut page = Vec::new();
    clap_mangen::Man::new(top.clone()).render(&mut page)?;
    pages.push(("canhazgpu.1".to_owned(), page));
    for sub in top.get_subcommands().filter(|sub| !sub.is_hide_set()) {
        let name = format!("canhazgpu-{}", sub.get_name());
        let mut page = Vec::new();
        clap_mangen::Man::new(sub.clone().name(name.clone())).render(&mut page)?;
        pages.push((format!("{name}.1"), page));
    }
    Ok(pages)
}

#[derive(Debug, Subcommand)]
pub enum CliCommand {
    /// Initialize GPU pool for this machine
    Admin {
        /// Number of GPUs available on this machine
        #[arg(short, long, value_parser = whole_number, required_unless_present_any = ["remove_host", "check"])]
        gpus: Option<u32>,
        /// Force reinitialization even if already initialized (ends all reservations)
        #[arg(long)]
        force: bool,
        /// GPU provider (auto-detected when omitted)
        #[arg(short, long, value_enum)]
        provider: Option<ProviderArg>,
        /// Take a decommissioned host out of the fleet (refused while it has
        /// reservations, unless --force, which ends them)
        #[arg(long, value_name = "NAME", value_parser = host_name, conflicts_with_all = ["gpus", "provider"])]
        remove_host: Option<String>,
        /// Say which trust mode is in force (shared or protected) and whether the
        /// store's files match it; exit 1 when they do not (any user may ask)
        #[arg(long, conflicts_with_all = ["gpus", "provider", "remove_host", "force"])]
        check: bool,
    },
    /// Show current GPU allocation status
    Status {
        /// Output status as JSON array instead of table format
        #[arg(short, long)]
        json: bool,
        /// Show every host of the fleet
        #[arg(long)]
        all: bool,
        /// Show one other host of the fleet (or of remote_hosts)
        #[arg(short, long, value_name = "HOST", value_parser = host_name)]
        remote: Option<String>,
        /// One line per host: total, GPU models, available, in use
        #[arg(short, long)]
        summary: bool,
        /// Do not colour the output (like --color never)
        #[arg(long)]
        no_color: bool,
        /// Redraw the table in place every INTERVAL (default 2s) until q or Ctrl-C
        #[arg(short, long, value_name = "INTERVAL", num_args = 0..=1, default_missing_value = "2s",
              value_parser = watch_interval)]
        watch: Option<u64>,
    },
    /// Find the hosts of the fleet where GPUs are available now, most available first
    Find {
        /// How many GPUs are needed
        #[arg(short, long, value_parser = whole_number)]
        gpus: u32,
        /// Output the hosts as JSON
        #[arg(short, long)]
        json: bool,
        /// Print only the best host's name, for `ssh $(canhazgpu find --gpus 4 --short)`
        #[arg(short, long)]
        short: bool,
    },
    /// Keep this host's GPU snapshot and heartbeat fresh for the rest of the fleet
    Agent {
        /// Time between snapshots (the host is stale after three missed ones)
        #[arg(long, default_value = "10s", value_name = "DURATION")]
        interval: String,
        /// Also serve Prometheus metrics on ADDR (host:port) at /metrics
        #[arg(long, value_name = "ADDR")]
        metrics_listen: Option<String>,
    },
    /// Reserve GPUs manually for a specified duration
    Reserve {
        /// Number of GPUs to reserve (default: 1)
        #[arg(short, long, value_parser = whole_number)]
        gpus: Option<u32>,
        /// Specific GPU IDs to reserve (comma-separated, e.g. 1,3,5)
        #[arg(short = 'G', long, value_delimiter = ',', num_args = 1.., value_parser = gpu_id)]
        gpu_ids: Option<Vec<u32>>,
        /// Duration to reserve GPUs: 30s, 30m, 2h, 1d, 1w, .5h, 1h30m (at most 365d)
        #[arg(short, long, default_value = "8h", allow_hyphen_values = true)]
        duration: String,
        /// Reserve until a clock time instead: 18:00 (today, or tomorrow once past),
        /// '2026-12-02 09:00' (local time) or RFC 3339
        #[arg(long, value_name = "TIME", conflicts_with = "duration")]
        until: Option<String>,
        /// Also take GPUs in use without reservation, when every process on them is
        /// yours (root: anyone's); never waits
        #[arg(short, long, conflicts_with = "wait")]
        force: bool,
        #[command(flatten)]
        request: RequestArgs,
        /// Print only the reserved IDs (`1,3`), for `$(canhazgpu reserve --short)`
        #[arg(short, long)]
        short: bool,
        #[command(flatten)]
        target: HostArg,
    },
    /// Lengthen your manual reservations in place (all of them unless --gpu-ids)
    Extend {
        /// Specific GPU IDs to extend (comma-separated)
        #[arg(short = 'G', long, value_delimiter = ',', num_args = 1, value_parser = gpu_id)]
        gpu_ids: Option<Vec<u32>>,
        /// How much longer: 30m, 2h, 1d, 1h 30m
        #[arg(
            value_name = "DURATION",
            required_unless_present = "until",
            conflicts_with = "until"
        )]
        duration: Option<String>,
        /// Until a clock time instead: 18:00, '2026-12-02 09:00' or RFC 3339
        #[arg(long, value_name = "TIME")]
        until: Option<String>,
        #[command(flatten)]
        target: HostArg,
    },
    /// Hand your manual reservations to another user, keeping their expiry
    Transfer {
        /// The GPU IDs to hand over (comma-separated)
        #[arg(short = 'G', long, value_delimiter = ',', num_args = 1.., value_parser = gpu_id, required = true)]
        gpu_ids: Vec<u32>,
        /// The Unix user who receives them
        #[arg(long, value_name = "USER")]
        to: String,
        #[command(flatten)]
        target: HostArg,
    },
    /// Turn a job started without canhazgpu into a run reservation of the GPUs it uses;
    /// the reservation ends when the process exits
    Adopt {
        /// The job's process ID (its descendants' GPUs count too)
        #[arg(value_parser = pid)]
        pid: u32,
        /// A note shown with the reservation
        #[arg(short, long, value_name = "TEXT")]
        note: Option<String>,
    },
    /// Mute or unmute your own notifications (terminal, e-mail, webhook), fleet-wide
    Notify {
        /// Stop notifying you
        #[arg(long, conflicts_with = "on")]
        off: bool,
        /// Notify you again
        #[arg(long)]
        on: bool,
    },
    /// Print the shell completion script (bash, zsh, fish, elvish or powershell)
    Completion {
        /// The shell to complete for
        shell: clap_complete::Shell,
        /// The command name to complete (the package also completes `chg`)
        #[arg(long, value_name = "NAME", default_value = "canhazgpu", value_parser = command_name)]
        name: String,
    },
    /// Write the man pages (canhazgpu.1 and one per command) into DIR
    #[command(hide = true)]
    Man {
        /// Where to write them (created if missing)
        dir: PathBuf,
    },
    /// Keeps an adopted job's reservation alive while the job runs (started by `adopt`)
    #[command(name = "keep-adopted", hide = true)]
    KeepAdopted {
        reservation_id: String,
        #[arg(value_parser = pid)]
        pid: u32,
        pid_start: u64,
        #[arg(value_delimiter = ',', value_parser = gpu_id)]
        gpus: Vec<u32>,
    },
    /// Show the requests waiting for GPUs, in the order they will be served
    Queue {
        /// Output the queue as JSON
        #[arg(short, long)]
        json: bool,
        #[command(flatten)]
        target: HostArg,
    },
    /// Reserve GPUs and run a command with CUDA_VISIBLE_DEVICES set
    Run {
        /// Number of GPUs to reserve (default: 1)
        #[arg(short, long, value_parser = whole_number)]
        gpus: Option<u32>,
        /// Specific GPU IDs to reserve (comma-separated, e.g. 1,3,5)
        #[arg(short = 'G', long, value_delimiter = ',', num_args = 1.., value_parser = gpu_id)]
        gpu_ids: Option<Vec<u32>>,
        /// Maximum time to run the command before stopping it: 30s, 30m, 2h, 1d, 0.5h (default: none)
        #[arg(short, long)]
        timeout: Option<String>,
        /// After a timeout, how long the command gets to exit after SIGINT before SIGKILL
        #[arg(long, default_value = "30s", value_name = "DURATION")]
        kill_grace: String,
        /// Time between heartbeats of the reservation (at most 30s)
        #[arg(long, default_value = "10s", value_name = "DURATION")]
        heartbeat_interval: String,
        #[command(flatten)]
        request: RequestArgs,
        /// Words given without `--` in front, only to point at the missing `--`
        #[arg(hide = true, value_name = "WORDS")]
        unseparated: Vec<OsString>,
        /// The command to run and its arguments, after `--`
        #[arg(last = true, value_name = "COMMAND")]
        command: Vec<OsString>,
    },
    /// Release manually reserved GPUs held by the current user
    Release {
        /// Specific GPU IDs to release (comma-separated); includes run reservations
        #[arg(short = 'G', long, value_delimiter = ',', num_args = 1.., value_parser = gpu_id)]
        gpu_ids: Option<Vec<u32>>,
        /// Release the given GPUs whoever holds them (root only)
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        target: HostArg,
    },
    /// Generate GPU usage reports
    Report {
        /// Number of days to include in the report (a whole number from 1)
        #[arg(long, default_value = "30", allow_hyphen_values = true)]
        days: String,
        /// Output the report as JSON
        #[arg(short, long)]
        json: bool,
        /// Output the users' rows as CSV, for spreadsheets
        #[arg(long, conflicts_with = "json")]
        csv: bool,
        /// Add up the whole fleet, with a table per host
        #[arg(long, conflicts_with = "host")]
        all: bool,
        /// Report on another host of the fleet
        #[arg(long, value_name = "NAME", value_parser = host_name)]
        host: Option<String>,
    },
    /// Start a web server for GPU status monitoring
    Web {
        /// Port to run the web server on
        #[arg(long, default_value_t = 8080, value_parser = port_number)]
        port: u16,
        /// Host to bind the web server to
        #[arg(long, default_value = "0.0.0.0")]
        host: String,
        /// Seconds one GPU snapshot is shared between requests
        #[arg(long, default_value_t = crate::web::DEFAULT_SNAPSHOT_SECONDS, value_name = "SECONDS",
              value_parser = whole_seconds)]
        cache_seconds: u64,
    },
}

/// What a bare `--wait` stands for: no command line can contain a NUL, so an explicit
/// `--wait ''` is an (invalid) duration, not "without limit".
const WAIT_WITHOUT_LIMIT: &str = "\0";

/// A count or GPU ID: digits only (`+1`, ` 1` and `1e3` are not numbers here).
fn whole_number(text: &str) -> Result<u32, String> {
    if text.is_empty() || !text.bytes().all(|byte| byte.is_ascii_digit()) {
        return Err(format!("'{text}' is not a whole number"));
    }
    text.parse().map_err(|_| format!("'{text}' is too large"))
}

/// One GPU ID of a comma-separated list: spaces around it are fine (`"1, 2"`).
fn gpu_id(text: &str) -> Result<u32, String> {
    whole_number(text.trim())
}

/// A process ID.
fn pid(text: &str) -> Result<u32, String> {
    match whole_number(text)? {
        0 => Err("PID 0 is not a process".into()),
        pid => Ok(pid),
    }
}

/// A port: digits only, at most 65535.
fn port_number(text: &str) -> Result<u16, String> {
    u16::try_from(whole_number(text)?).map_err(|_| format!("'{text}' is not a port (0-65535)"))
}

/// A fleet member's name (`host_name`'s rules).
fn host_name(text: &str) -> Result<String, String> {
    match crate::config::valid_host_name(text) {
        true => Ok(text.to_string()),
        false => Err(format!(
            "'{text}' is not a host name (letters, digits, '.', '_' and '-')"
        )),
    }
}

/// `--host NAME`: another host's pool in the fleet.
#[derive(Debug, Args)]
pub struct HostArg {
    /// Act on another host's pool in the shared Redis (default: this host)
    #[arg(long = "host", value_name = "NAME", value_parser = host_name)]
    pub host: Option<String>,
}

fn whole_seconds(text: &str) -> Result<u64, String> {
    whole_number(text).map(u64::from)
}

/// A command name to complete: it goes into shell function names.
fn command_name(text: &str) -> Result<String, String> {
    let valid = !text.is_empty()
        && text.len() <= 64
        && text.starts_with(|c: char| c.is_ascii_alphabetic())
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    match valid {
        true => Ok(text.to_owned()),
        false => Err("expected a command name of letters, digits, '-' and '_'".into()),
    }
}

/// `status --watch`'s interval: a duration from 1s to 1h.
fn watch_interval(text: &str) -> Result<u64, String> {
    crate::duration::parse_duration(text)
        .ok()
        .filter(|secs| (1..=3600).contains(secs))
        .ok_or_else(|| "expected a duration from 1s to 1h, such as 2s or 1m".to_owned())
}

/// Waiting, note and display name: shared by `run` and `reserve`.
#[derive(Debug, Args)]
pub struct RequestArgs {
    /// When the GPUs are not available, wait in the queue (first come, first served)
    /// for up to DURATION, or without limit when no DURATION is given
    #[arg(short, long, value_name = "DURATION", num_args = 0..=1,
          default_missing_value = WAIT_WITHOUT_LIMIT, conflicts_with = "nonblock")]
    pub wait: Option<String>,
    /// Fail at once when the GPUs are not available, even if the configuration
    /// (run.wait / reserve.wait) says to wait
    #[arg(long)]
    pub nonblock: bool,
    /// A note shown with the reservation by status, queue and the dashboard
    #[arg(short, long, value_name = "TEXT")]
    pub note: Option<String>,
    /// A display name for the reservation (e.g. for a shared service account); your
    /// Unix user is still recorded and stays the one who may release it
    #[arg(short, long, value_name = "NAME")]
    pub user: Option<String>,
}

impl From<RequestArgs> for crate::commands::RequestOptions {
    fn from(args: RequestArgs) -> Self {
        crate::commands::RequestOptions {
            wait: match (args.nonblock, args.wait) {
                (true, _) => Some(crate::commands::WaitFlag::Nonblock),
                (false, Some(limit)) if limit == WAIT_WITHOUT_LIMIT => {
                    Some(crate::commands::WaitFlag::Forever)
                }
                (false, Some(limit)) => Some(crate::commands::WaitFlag::Limit(limit)),
                (false, None) => None,
            },
            note: args.note,
            user: args.user,
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ProviderArg {
    Nvidia,
    Amd,
    Fake,
}

impl From<ProviderArg> for ProviderKind {
    fn from(arg: ProviderArg) -> Self {
        match arg {
            ProviderArg::Nvidia => ProviderKind::Nvidia,
            ProviderArg::Amd => ProviderKind::Amd,
            ProviderArg::Fake => ProviderKind::Fake,
        }
    }
}

impl Cli {
    /// `--color`, and `status --no-color`.
    pub fn color(&self) -> crate::output::ColorMode {
        use crate::output::ColorMode;
        match (&self.command, self.global.color) {
            (CliCommand::Status { no_color: true, .. }, _) | (_, ColorArg::Never) => {
                ColorMode::Never
            }
            (_, ColorArg::Always) => ColorMode::Always,
            (_, ColorArg::Auto) => ColorMode::Auto,
        }
    }

    pub fn overrides(&self) -> Overrides {
        let g = &self.global;
        Overrides {
            config_file: g.config.clone(),
            backend: g.backend.clone(),
            state_dir: g.state_dir.clone(),
            redis_url: g.redis_url.clone(),
            redis_host: g.redis_host.clone(),
            redis_port: g.redis_port.clone(),
            redis_db: g.redis_db.clone(),
            redis_password: g.redis_password.clone(),
            memory_threshold: g.memory_threshold.clone(),
        }
    }

    pub fn into_command(self) -> Command {
        match self.command {
            CliCommand::Admin {
                gpus,
                force,
                provider,
                remove_host,
                check,
            } => Command::Admin(match remove_host {
                _ if check => admin::AdminArgs::Check,
                Some(name) => admin::AdminArgs::RemoveHost { name, force },
                None => admin::AdminArgs::Init {
                    gpus: gpus.unwrap_or_default(),
                    force,
                    provider: provider.map(Into::into),
                },
            }),
            CliCommand::Completion { shell, name } => {
                Command::Completion(completion_script(shell, &name))
            }
            CliCommand::Man { dir } => Command::Man {
                dir,
                pages: man_pages().unwrap_or_default(),
            },
            CliCommand::Status {
                json,
                all,
                remote,
                summary,
                no_color: _,
                watch,
            } => Command::Status(status::StatusArgs {
                json,
                all,
                remote,
                summary,
                watch,
            }),
            CliCommand::Find { gpus, json, short } => {
                Command::Find(find::FindArgs { gpus, json, short })
            }
            CliCommand::Agent {
                interval,
                metrics_listen,
            } => Command::Agent(agent::AgentArgs {
                interval,
                metrics_listen,
            }),
            CliCommand::Reserve {
                gpus,
                gpu_ids,
                duration,
                until,
                force,
                request,
                short,
                target,
            } => Command::Reserve(reserve::ReserveArgs {
                gpus,
                gpu_ids,
                duration,
                until,
                force,
                request: request.into(),
                short,
                host: target.host,
            }),
            CliCommand::Extend {
                gpu_ids,
                duration,
                until,
                target,
            } => Command::Extend(extend::ExtendArgs {
                gpu_ids,
                by: match (duration, until) {
                    (_, Some(time)) => extend::End::Until(time),
                    (duration, None) => extend::End::By(duration.unwrap_or_default()),
                },
                host: target.host,
            }),
            CliCommand::Transfer {
                gpu_ids,
                to,
                target,
            } => Command::Transfer(transfer::TransferArgs {
                gpu_ids,
                to,
                host: target.host,
            }),
            CliCommand::Adopt { pid, note } => Command::Adopt(adopt::AdoptArgs { pid, note }),
            CliCommand::Notify { off, on } => Command::Notify(notify::NotifyArgs {
                on: match (off, on) {
                    (true, _) => Some(false),
                    (false, true) => Some(true),
                    (false, false) => None,
                },
            }),
            CliCommand::KeepAdopted {
                reservation_id,
                pid,
                pid_start,
                gpus,
            } => Command::KeepAdopted(adopt::Adopted {
                reservation_id,
                pid,
                pid_start,
                gpus,
            }),
            CliCommand::Queue { json, target } => Command::Queue(queue::QueueArgs {
                json,
                host: target.host,
            }),
            CliCommand::Run {
                gpus,
                gpu_ids,
                timeout,
                kill_grace,
                heartbeat_interval,
                request,
                unseparated,
                command,
            } => Command::Run(run::RunArgs {
                gpus,
                gpu_ids,
                timeout,
                kill_grace,
                heartbeat_interval,
                command,
                unseparated,
                request: request.into(),
            }),
            CliCommand::Release {
                gpu_ids,
                force,
                target,
            } => Command::Release(release::ReleaseArgs {
                gpu_ids,
                force,
                host: target.host,
            }),
            CliCommand::Report {
                days,
                json,
                csv,
                all,
                host,
            } => Command::Report(report::ReportArgs {
                days,
                json,
                csv,
                scope: match (all, host) {
                    (true, _) => report::Scope::Fleet,
                    (false, Some(name)) => report::Scope::Host(name),
                    (false, None) => report::Scope::Local,
                },
            }),
            CliCommand::Web {
                port,
                host,
                cache_seconds,
            } => Command::Web(web::WebArgs {
                host,
                port,
                cache_seconds,
            }),
        }
    }
}
