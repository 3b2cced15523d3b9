//! The one error type of the library and its mapping to exit codes.

use std::fmt;

/// Exit codes, documented in the README ("Exit codes").
pub mod exit {
    /// A runtime failure: store unreachable, GPU query failed, permission problem.
    pub const FAILURE: u8 = 1;
    /// Bad usage: invalid flags, values or configuration.
    pub const USAGE: u8 = 2;
    /// The requested GPUs are not available right now.
    pub const UNAVAILABLE: u8 = 3;
    /// The pool has not been initialised with `canhazgpu admin`.
    pub const NOT_INITIALIZED: u8 = 4;
    /// `release`, `extend`, `transfer`: a named GPU is not the caller's reservation
    /// (held by someone else, not reserved, or of a kind the command cannot change).
    pub const NOT_YOURS: u8 = 5;
    /// `run`: the command was stopped because `--timeout` expired (as `timeout(1)`).
    pub const TIMEOUT: u8 = 124;
    /// `run`: the command exists but cannot be executed (as a shell).
    pub const NOT_EXECUTABLE: u8 = 126;
    /// `run`: the command was not found (as a shell).
    pub const NOT_FOUND: u8 = 127;
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Invalid arguments or values given by the user.
    #[error("{0}")]
    Usage(String),
    /// A malformed configuration file or environment variable.
    #[error("{0}")]
    Config(String),
    /// Not enough free GPUs for a by-count request.
    #[error("{}", not_enough_message(*.requested, *.available, *.unreserved))]
    NotEnough {
        requested: u32,
        available: u32,
        unreserved: u32,
    },
    /// A specific GPU is held or in use; retrying later may succeed.
    #[error("{}", gpu_taken_message(*.gpu, .holder))]
    GpuTaken { gpu: u32, holder: Holder },
    #[error("GPU pool not initialized - run 'canhazgpu admin --gpus <count>' first")]
    NotInitialized,
    /// No pool, with what the store knows about why (another host, another layout).
    #[error("{0}")]
    NoPool(String),
    /// No host of the fleet can serve a request now (`find`).
    #[error("{0}")]
    NoHost(String),
    /// GPUs named by the caller that are not the caller's to change: one clause per
    /// GPU (`GPU 0 is reserved by alice, not by you`).
    #[error("{}", .0.join("; "))]
    NotYours(Vec<String>),
    /// The administrator's policy forbids the request now (`policy.max_gpus_per_user`).
    #[error("{0}")]
    PolicyLimit(String),
    /// `admin` without `--force` on a pool of this many GPUs.
    #[error("GPU pool already initialized with {0} GPUs. Use --force to reinitialize")]
    AlreadyInitialized(u32),
    /// The store could not be opened or answered with an error.
    #[error("{0}")]
    Store(String),
    /// The GPU provider failed.
    #[error("{0}")]
    Gpu(String),
    /// `--wait DURATION` passed before the GPUs became available.
    #[error("{0}")]
    WaitTimeout(String),
    /// A signal ended the wait for GPUs.
    #[error("{message}")]
    Interrupted {
        signal: nix::sys::signal::Signal,
        message: String,
    },
    /// `run`: the command was not found.
    #[error("{0}")]
    CommandNotFound(String),
    /// `run`: the command exists but cannot be executed.
    #[error("{0}")]
    CommandNotExecutable(String),
    /// stdout was closed by its reader (`canhazgpu status | head -1`): not a failure,
    /// so nothing is printed and the exit status is 0.
    #[error("stdout was closed")]
    StdoutClosed,
    /// Anything else that went wrong at run time.
    #[error("{0}")]
    Runtime(String),
}

/// Who stands in the way of a specific GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    /// A reservation of this (display) user.
    User(String),
    /// A process that holds memory on it without any reservation.
    Unreserved,
    /// The requester's own reservation.
    Yourself,
    /// Processes of these users, without reservation (`reserve --force`, `adopt`).
    ProcessesOf(Vec<String>),
}

fn gpu_taken_message(gpu: u32, holder: &Holder) -> String {
    match holder {
        Holder::User(user) => format!("GPU {gpu} is already reserved by user '{user}'"),
        Holder::Unreserved => format!("GPU {gpu} is in use without reservation"),
        Holder::Yourself => format!("you already hold GPU {gpu}"),
        Holder::ProcessesOf(users) => format!(
            "GPU {gpu} is in use without reservation by processes of {} - only a GPU whose \
             processes are all yours can be taken over",
            users.join(", ")
        ),
    }
}

fn not_enough_message(requested: u32, available: u32, unreserved: u32) -> String {
    let mut msg =
        format!("Not enough GPUs available. Requested: {requested}, Available: {available}");
    if unreserved > 0 {
        msg.push_str(&format!(
            " ({unreserved} GPUs in use without reservation - run 'canhazgpu status' for details)"
        ));
    }
    msg
}

impl Error {
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Usage(_) | Error::Config(_) | Error::AlreadyInitialized(_) => exit::USAGE,
            Error::NotEnough { .. }
            | Error::GpuTaken { .. }
            | Error::WaitTimeout(_)
            | Error::PolicyLimit(_)
            | Error::NoHost(_) => exit::UNAVAILABLE,
            // As a shell reports a process ended by a signal.
            Error::Interrupted { signal, .. } => crate::signals::exit_status(*signal),
            Error::NotInitialized | Error::NoPool(_) => exit::NOT_INITIALIZED,
            Error::NotYours(_) => exit::NOT_YOURS,
            Error::CommandNotFound(_) => exit::NOT_FOUND,
            Error::CommandNotExecutable(_) => exit::NOT_EXECUTABLE,
            Error::Store(_) | Error::Gpu(_) | Error::Runtime(_) => exit::FAILURE,
            Error::StdoutClosed => 0,
        }
    }

    /// Whether the error is worth a line on stderr.
    pub fn is_reported(&self) -> bool {
        !matches!(self, Error::StdoutClosed)
    }

    /// Whether waiting could make the same request succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::NotEnough { .. } | Error::GpuTaken { .. })
    }

    pub fn store(context: &str, err: impl fmt::Display) -> Self {
        Error::Store(format!("{context}: {err}"))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
