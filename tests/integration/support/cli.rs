//! Runs the real `canhazgpu` binary in an isolated environment: its own HOME, its
//! own store (a SQLite directory or a Redis URL), and no inherited CANHAZGPU_* settings.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use tempfile::TempDir;

pub const BIN: &str = env!("CARGO_BIN_EXE_canhazgpu");

/// The result of one invocation, with text output.
#[derive(Debug)]
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }

    #[track_caller]
    pub fn assert_ok(&self) -> &Self {
        assert!(self.ok(), "expected success, got {self:?}");
        self
    }

    #[track_caller]
    pub fn assert_code(&self, code: i32) -> &Self {
        assert_eq!(self.code, Some(code), "unexpected exit code: {self:?}");
        self
    }
}

impl From<Output> for Run {
    fn from(out: Output) -> Self {
        Run {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// Which store an environment points the binary at.
#[derive(Clone, Debug)]
pub enum Backend {
    Sqlite(PathBuf),
    Redis(String),
    /// The sentinels' `host:port,host:port`.
    Sentinel(String),
}

pub struct CliEnv {
    /// Holds the temporary directory for as long as the environment lives.
    pub dir: TempDir,
    pub home: PathBuf,
    pub backend: Backend,
    /// Directories put in front of PATH (fake nvidia-smi and friends).
    pub path_prefix: Vec<PathBuf>,
    pub vars: Vec<(String, String)>,
}

impl CliEnv {
    /// An environment with an embedded store in a fresh temporary directory.
    pub fn sqlite() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        Self::with_backend(dir, Backend::Sqlite(state))
    }

    /// An environment pointing at a Redis server (the default fleet layout).
    pub fn redis(url: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::with_backend(dir, Backend::Redis(url.to_string()))
    }

    /// An environment finding its Redis master through these sentinels.
    pub fn sentinel(addresses: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::with_backend(dir, Backend::Sentinel(addresses.to_string()))
    }

    /// An environment pointing at a Redis server in upstream canhazgpu's layout.
    pub fn redis_upstream(url: &str) -> Self {
        let mut env = Self::redis(url);
        env.vars
            .push(("CANHAZGPU_REDIS_LAYOUT".into(), "upstream".into()));
        env
    }

    fn with_backend(dir: TempDir, backend: Backend) -> Self {
        let home = dir.path().join("home");
        std::fs::create_dir_all(&home).expect("home");
        CliEnv {
            dir,
            home,
            backend,
            path_prefix: Vec::new(),
            vars: Vec::new(),
        }
    }

    pub fn set_var(&mut self, key: &str, value: &str) {
        self.vars.push((key.to_string(), value.to_string()));
    }

    /// A `Command` for the binary with this environment applied.
    pub fn command<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(BIN);
        for (key, _) in std::env::vars() {
            if key.starts_with("CANHAZGPU_") {
                cmd.env_remove(&key);
            }
        }
        cmd.env("HOME", &self.home).env("CANHAZGPU_NVML", "0");
        match &self.backend {
            Backend::Sqlite(state) => cmd.env("CANHAZGPU_STATE_DIR", state),
            Backend::Redis(url) => cmd.env("CANHAZGPU_REDIS_URL", url),
            Backend::Sentinel(addresses) => cmd.env("CANHAZGPU_REDIS_SENTINELS", addresses),
        };
        if !self.path_prefix.is_empty() {
            let mut paths = self.path_prefix.clone();
            paths.extend(std::env::split_paths(
                &std::env::var_os("PATH").unwrap_or_default(),
            ));
            cmd.env("PATH", std::env::join_paths(paths).expect("PATH"));
        }
        for (key, value) in &self.vars {
            cmd.env(key, value);
        }
        cmd.args(args).stdin(Stdio::null());
        cmd
    }

    pub fn run<I, S>(&self, args: I) -> Run
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.command(args).output().expect("run canhazgpu").into()
    }

    /// `admin --gpus N --provider fake`.
    pub fn init_fake(&self, gpus: u32) {
        self.run(["admin", "--gpus", &gpus.to_string(), "--provider", "fake"])
            .assert_ok();
    }

    /// `status --json`, parsed.
    pub fn status_json(&self) -> Vec<serde_json::Value> {
        let run = self.run(["status", "--json"]);
        run.assert_ok();
        serde_json::from_str(&run.stdout)
            .unwrap_or_else(|e| panic!("status --json is not JSON ({e}): {}", run.stdout))
    }

    /// The status strings of every GPU, in order.
    pub fn statuses(&self) -> Vec<String> {
        self.status_json()
            .iter()
            .map(|row| row["status"].as_str().unwrap_or_default().to_string())
            .collect()
    }
}

impl CliEnv {
    /// The store this environment's binary uses, opened in this process with the
    /// configuration the binary would resolve from this environment's variables.
    pub fn store(&self) -> Box<dyn canhazgpu::store::Store> {
        let mut vars = self.vars.clone();
        vars.push(match &self.backend {
            Backend::Sqlite(dir) => ("CANHAZGPU_STATE_DIR".into(), dir.display().to_string()),
            Backend::Redis(url) => ("CANHAZGPU_REDIS_URL".into(), url.clone()),
            Backend::Sentinel(addresses) => ("CANHAZGPU_REDIS_SENTINELS".into(), addresses.clone()),
        });
        let lookup = move |name: &str| {
            vars.iter()
                .rev()
                .find(|(key, _)| key == name)
                .map(|(_, value)| value.clone())
        };
        let config = canhazgpu::config::resolve_with(
            &canhazgpu::config::Overrides::default(),
            &lookup,
            None,
            Path::new("/nonexistent"),
        )
        .expect("resolve the test configuration");
        canhazgpu::store::open(&config).expect("open the store")
    }
}

/// Sends SIGTERM to `child` (a canhazgpu that stops cleanly on it) and waits for it.
pub fn terminate(child: &mut std::process::Child) -> std::process::ExitStatus {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("send SIGTERM");
    child.wait().expect("wait for the child")
}

/// Polls `condition` every 20 ms until it holds or `timeout` passes; returns
/// whether it held.
pub fn wait_until(timeout: std::time::Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
