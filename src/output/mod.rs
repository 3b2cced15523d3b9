//! Rendering results for people (aligned tables, colour on terminals) and for
//! programs (JSON). Everything here writes to stdout; diagnostics go to stderr.

pub mod screen;
pub mod table;

use std::io::Write;

use anstyle::{AnsiColor, Style};

use crate::error::{Error, Result};

/// `--color`: whether results carry colour codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ColorMode {
    /// On a terminal, unless `NO_COLOR` is set; `CLICOLOR_FORCE` forces it.
    Auto,
    Always,
    Never,
}

/// Chooses colour for everything this process prints from now on.
pub fn set_color(mode: ColorMode) {
    let choice = match mode {
        ColorMode::Auto => anstream::ColorChoice::Auto,
        ColorMode::Always => anstream::ColorChoice::Always,
        ColorMode::Never => anstream::ColorChoice::Never,
    };
    choice.write_global();
}

/// Writes text to stdout as it is (a script, a page), without adding a newline.
pub fn print_raw(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes()).map_err(stdout_error)
}

/// Writes a line to stdout; colour codes are stripped when stdout is not a
/// terminal or `NO_COLOR` is set (anstream).
pub fn print(text: &str) -> Result<()> {
    let mut out = anstream::stdout().lock();
    writeln!(out, "{text}").map_err(stdout_error)
}

/// Writes pretty-printed JSON to stdout.
pub fn print_json(value: &impl serde::Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| Error::Runtime(format!("cannot encode JSON: {e}")))?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}").map_err(stdout_error)
}

fn stdout_error(e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        return Error::StdoutClosed;
    }
    Error::Runtime(format!("cannot write to stdout: {e}"))
}

/// `[0, 2]`, the way the reference prints GPU lists.
pub fn id_list(ids: &[u32]) -> String {
    let items: Vec<String> = ids.iter().map(u32::to_string).collect();
    format!("[{}]", items.join(", "))
}

pub fn green() -> Style {
    Style::new().fg_color(Some(AnsiColor::Green.into())).bold()
}

pub fn blue() -> Style {
    Style::new().fg_color(Some(AnsiColor::Blue.into())).bold()
}

pub fn red() -> Style {
    Style::new().fg_color(Some(AnsiColor::Red.into())).bold()
}

pub fn yellow() -> Style {
    Style::new().fg_color(Some(AnsiColor::Yellow.into())).bold()
}

/// `text` wrapped in `style`'s escape codes.
pub fn paint(style: Style, text: &str) -> String {
    format!("{style}{text}{style:#}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn id_lists_as_the_reference_prints_them() {
        assert_eq!(super::id_list(&[0, 2]), "[0, 2]");
        assert_eq!(super::id_list(&[]), "[]");
    }
}
