//! Runs a vendor command-line tool (`nvidia-smi`, `amd-smi`) with a deadline, so a hung
//! driver never hangs canhazgpu.

use std::ffi::OsString;
use std::io::ErrorKind;
use std::os::unix::process::CommandExt;
use std::process::{Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::error::{Error, Result};

/// Environment variable overriding how long a tool may take, in seconds.
pub const TIMEOUT_ENV: &str = "CANHAZGPU_SMI_TIMEOUT";
/// nvidia-smi can take 7-15 s on large machines (upstream PR #42), so stay above that.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Parses a timeout in (possibly fractional) seconds; `None` gives the default.
pub fn parse_timeout(value: Option<&str>) -> Result<Duration> {
    let Some(text) = value else {
        return Ok(DEFAULT_TIMEOUT);
    };
    text.trim()
        .parse::<f64>()
        .ok()
        .filter(|secs| *secs > 0.0)
        .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
        .ok_or_else(|| {
            Error::Config(format!(
                "invalid {TIMEOUT_ENV} '{text}': expected a positive number of seconds"
            ))
        })
}

/// How a tool is found and how long it may take.
#[derive(Clone, Debug)]
pub struct Tool {
    /// The name used in messages, e.g. `nvidia-smi`.
    pub name: &'static str,
    /// What to execute: the bare name (looked up on PATH) or a path.
    pub program: OsString,
    pub timeout: Duration,
}

/// What a finished tool printed.
#[derive(Debug)]
pub struct ToolOutput {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Tool {
    /// Runs the tool with `args`, killing it (and anything it started) at the deadline.
    pub fn run(&self, args: &[&str]) -> Result<ToolOutput> {
        let timeout = self.timeout;
        let child = crate::privilege::command(&self.program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so a timeout also kills what a wrapper script started.
            .process_group(0)
            .spawn()
            .map_err(|err| self.spawn_error(&err))?;
        let group = Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
        let (sender, receiver) = mpsc::channel();
        std::thread::spawn(move || {
            // The receiver may be gone after a timeout; nothing is left to tell then.
            let _ = sender.send(child.wait_with_output());
        });
        match receiver.recv_timeout(timeout) {
            Ok(result) => {
                let output = result.map_err(|err| self.failed(&err))?;
                Ok(to_tool_output(output))
            }
            Err(_) => {
                // Killing the group also ends the waiting thread, which reaps the child.
                let _ = killpg(group, Signal::SIGKILL);
                let _ = receiver.recv_timeout(Duration::from_secs(1));
                Err(Error::Gpu(format!(
                    "{} did not answer within {}",
                    self.name,
                    format_timeout(timeout)
                )))
            }
        }
    }

    /// Whether the tool exists and `--help` succeeds, as provider detection wants.
    pub fn answers(&self) -> bool {
        self.run(&["--help"]).is_ok_and(|output| output.success)
    }

    fn spawn_error(&self, err: &std::io::Error) -> Error {
        if err.kind() == ErrorKind::NotFound {
            Error::Gpu(format!(
                "{} not found (looked for '{}')",
                self.name,
                self.program.to_string_lossy()
            ))
        } else {
            self.failed(err)
        }
    }

    fn failed(&self, err: &std::io::Error) -> Error {
        Error::Gpu(format!("cannot run {}: {err}", self.name))
    }

    /// The error for a non-zero exit: its stderr, else its stdout, on one line.
    pub fn exit_error(&self, output: &ToolOutput) -> Error {
        let message = [&output.stderr, &output.stdout]
            .into_iter()
            .map(|text| text.split_whitespace().collect::<Vec<_>>().join(" "))
            .find(|text| !text.is_empty())
            .unwrap_or_else(|| "no output".into());
        Error::Gpu(format!("{} failed: {message}", self.name))
    }
}

fn to_tool_output(output: Output) -> ToolOutput {
    ToolOutput {
        success: output.status.success(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// `10s` for whole seconds, else milliseconds (`500ms`).
fn format_timeout(timeout: Duration) -> String {
    if timeout.subsec_nanos() == 0 {
        format!("{}s", timeout.as_secs())
    } else {
        format!("{}ms", timeout.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeout_defaults_to_ten_seconds() {
        assert_eq!(parse_timeout(None).unwrap(), Duration::from_secs(10));
    }

    #[test]
    fn timeout_accepts_whole_and_fractional_seconds() {
        assert_eq!(parse_timeout(Some("3")).unwrap(), Duration::from_secs(3));
        assert_eq!(
            parse_timeout(Some(" 0.5 ")).unwrap(),
            Duration::from_millis(500)
        );
    }

    #[test]
    fn timeout_rejects_nonsense() {
        for bad in ["", "0", "-1", "ten", "inf", "NaN"] {
            let err = parse_timeout(Some(bad)).unwrap_err();
            assert!(err.to_string().contains(TIMEOUT_ENV), "{bad:?} gave {err}");
        }
    }

    #[test]
    fn timeout_is_formatted_for_humans() {
        assert_eq!(format_timeout(Duration::from_secs(10)), "10s");
        assert_eq!(format_timeout(Duration::from_millis(1500)), "1500ms");
    }

    #[test]
    fn a_missing_tool_is_a_clear_error() {
        let tool = Tool {
            name: "nvidia-smi",
            program: "/nonexistent/nvidia-smi".into(),
            timeout: Duration::from_secs(1),
        };
        let err = tool.run(&["--help"]).unwrap_err();
        assert!(err.to_string().starts_with("nvidia-smi not found"), "{err}");
        assert!(!tool.answers());
    }

    #[test]
    fn a_hung_tool_is_killed_at_the_deadline() {
        let tool = Tool {
            name: "sleeper",
            program: "sleep".into(),
            timeout: Duration::from_millis(200),
        };
        let started = std::time::Instant::now();
        let err = tool.run(&["30"]).unwrap_err();
        assert_eq!(err.to_string(), "sleeper did not answer within 200ms");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn exit_errors_prefer_stderr_and_fold_lines() {
        let tool = Tool {
            name: "nvidia-smi",
            program: "nvidia-smi".into(),
            timeout: DEFAULT_TIMEOUT,
        };
        let output = ToolOutput {
            success: false,
            stdout: "ignored".into(),
            stderr: "Failed to initialize NVML:\n  Driver/library version mismatch\n".into(),
        };
        assert_eq!(
            tool.exit_error(&output).to_string(),
            "nvidia-smi failed: Failed to initialize NVML: Driver/library version mismatch"
        );
    }
}
