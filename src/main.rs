//! The thin binary: parse, resolve the configuration, run, map errors to exit codes.

use std::process::ExitCode;

use clap::Parser;
use clap::error::ErrorKind;

use canhazgpu::cli::Cli;
use canhazgpu::{commands, config};

fn main() -> ExitCode {
    // Before anything reads a file: a protected install's group is lowered at once.
    if let Err(err) = canhazgpu::privilege::init() {
        eprintln!("Error: {err}");
        return ExitCode::from(err.exit_code());
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) if err.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            // `canhazgpu` alone: the usage, as a reminder, on stderr.
            let _ = err.print();
            return ExitCode::from(canhazgpu::error::exit::USAGE);
        }
        Err(err) if !err.use_stderr() => {
            // --help and --version
            let _ = err.print();
            return ExitCode::SUCCESS;
        }
        Err(err) => {
            // One line, like every other error; `--help` has the rest.
            let text = err.render().to_string();
            let message: Vec<&str> = text
                .lines()
                .take_while(|line| !line.trim().is_empty())
                .map(str::trim)
                .collect();
            eprintln!("Error: {}", message.join(" ").trim_start_matches("error: "));
            return ExitCode::from(canhazgpu::error::exit::USAGE);
        }
    };
    let result = config::resolve(&cli.overrides()).and_then(|config| {
        for warning in &config.warnings {
            eprintln!("{warning}");
        }
        commands::execute(cli.into_command(), &config)
    });
    match result {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            if err.is_reported() {
                eprintln!("Error: {err}");
            }
            ExitCode::from(err.exit_code())
        }
    }
}
