//! The thin binary: parse, resolve the configuration, run, map errors to exit codes.

use std::process::ExitCode;

use clap::error::ErrorKind;

use canhazgpu::{cli, commands, config};

fn main() -> ExitCode {
    // Before anything reads a file: a protected install's group is lowered at once.
    if let Err(err) = canhazgpu::privilege::init() {
        eprintln!("Error: {err}");
        return ExitCode::from(err.exit_code());
    }
    let cli = match cli::parse() {
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
            // One line, like every other error, and clap's tip ("a similar argument
            // exists: '--gpus'") under it; `--help` has the rest.
            let text = err.render().to_string();
            let message: Vec<&str> = text
                .lines()
                .take_while(|line| !line.trim().is_empty())
                .map(str::trim)
                .collect();
            eprintln!("Error: {}", message.join(" ").trim_start_matches("error: "));
            // Only the "did you mean" tips: the one for a negative number ("use '-- -1'")
            // would lead away from the real fix, a positive value.
            let did_you_mean = |line: &&str| {
                line.starts_with("tip: a similar ") || line.starts_with("tip: some similar ")
            };
            for tip in text.lines().map(str::trim).filter(did_you_mean) {
                eprintln!("  {tip}");
            }
            return ExitCode::from(canhazgpu::error::exit::USAGE);
        }
    };
    canhazgpu::output::set_color(cli.color());
    let overrides = cli.overrides();
    let command = cli.into_command();
    let result = match command.execute_standalone() {
        Some(result) => result,
        None => config::resolve(&overrides).and_then(|config| {
            for warning in &config.warnings {
                eprintln!("{warning}");
            }
            commands::execute(command, &config)
        }),
    };
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
