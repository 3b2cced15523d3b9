//! The thin binary: parse, resolve the configuration, run, map errors to exit codes.

use std::process::ExitCode;

use clap::Parser;

use canhazgpu::cli::Cli;
use canhazgpu::{commands, config};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = config::resolve(&cli.overrides()).and_then(|config| {
        for warning in &config.warnings {
            eprintln!("{warning}");
        }
        commands::execute(cli.into_command(), &config)
    });
    match result {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("Error: {err}");
            ExitCode::from(err.exit_code())
        }
    }
}
