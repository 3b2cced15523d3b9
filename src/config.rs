//! Layered configuration: command-line flags > `CANHAZGPU_*` environment variables >
//! config file > built-in defaults. One `resolve` step turns them into a plain `Config`.
//!
//! Every key lives in one registry (`KEYS`). A key's raw value is taken from the
//! highest layer that gives it and remembers where it came from, so a bad value is
//! reported as `SOURCE: expected WHAT, got "VALUE"` whichever layer it came from.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fmt;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};
use crate::gpu::GpuSettings;
use crate::store::{RedisConfig, RedisLayout, SentinelConfig, StoreConfig};

/// Default location of the embedded store's directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/canhazgpu";
/// Default memory threshold in MiB above which a GPU counts as in use.
pub const DEFAULT_MEMORY_THRESHOLD_MB: u64 = 1024;
pub const DEFAULT_REDIS_HOST: &str = "localhost";
pub const DEFAULT_REDIS_PORT: u16 = 6379;
pub const DEFAULT_REDIS_DB: i64 = 0;
/// The name Sentinel's own examples give the master, and so most installations.
pub const DEFAULT_SENTINEL_MASTER: &str = "mymaster";
/// Directory searched for `config.{yaml,yml,json,toml}` when the user has no file.
pub const SYSTEM_CONFIG_DIR: &str = "/etc/canhazgpu";
/// Environment variable naming the config file, like `--config`.
pub const CONFIG_ENV: &str = "CANHAZGPU_CONFIG";

const ENV_PREFIX: &str = "CANHAZGPU_";
/// Config file extensions in discovery order.
const EXTENSIONS: [&str; 4] = ["yaml", "yml", "json", "toml"];
/// Keys whose presence alone selects the Redis backend.
const REDIS_KEYS: [&str; 7] = [
    "redis.host",
    "redis.port",
    "redis.db",
    "redis.url",
    "redis.password",
    "redis.password_file",
    "redis.sentinels",
];
const REDIS_URL_SCHEMES: [&str; 3] = ["redis://", "rediss://", "redis+unix://"];

/// Settings given on the command line; `None` means "not given".
#[derive(Clone, Default, PartialEq, Eq)]
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

/// Never shows the Redis password, not even inside the URL.
impl fmt::Debug for Overrides {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let url = self
            .redis_url
            .as_deref()
            .map(crate::store::redis::without_password);
        f.debug_struct("Overrides")
            .field("config_file", &self.config_file)
            .field("backend", &self.backend)
            .field("state_dir", &self.state_dir)
            .field("redis_url", &url)
            .field("redis_host", &self.redis_host)
            .field("redis_port", &self.redis_port)
            .field("redis_db", &self.redis_db)
            .field(
                "redis_password",
                &self.redis_password.as_ref().map(|_| "<hidden>"),
            )
            .field("memory_threshold", &self.memory_threshold)
            .finish()
    }
}

/// The resolved configuration every command works from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub store: StoreConfig,
    pub memory_threshold_mb: u64,
    /// `history.retention_days`: how long finished reservations are kept for `report`.
    pub history_retention_days: u32,
    /// `run.wait` and `reserve.wait`: waiting in the queue by default.
    pub run_wait: Option<WaitPolicy>,
    pub reserve_wait: Option<WaitPolicy>,
    /// `smi_timeout` and `nvml`.
    pub gpu: GpuSettings,
    /// `host_name`: this host's name in a fleet (default: the machine's hostname).
    pub host_name: String,
    /// `remote_hosts`: hosts shown by `status --all` in this order; those that are not
    /// in the shared Redis are read over SSH.
    pub remote_hosts: Vec<String>,
    /// The administrator's rules (`policy.*`, system configuration file only).
    pub policy: Policy,
    /// How people are told (`notify.*`, system configuration file only).
    pub notify: crate::notify::Channels,
    /// Non-fatal findings (unknown keys, flags a Redis URL overrides) to print on stderr.
    pub warnings: Vec<String>,
    /// The raw value of every registered key some layer gave, by key name. Commands
    /// read their own keys (`run.wait`, ...) from here with `Setting::parse`.
    pub settings: BTreeMap<&'static str, Setting>,
}

/// A configuration key: its dotted path in config files, from which its environment
/// variable is derived (`redis.port` → `CANHAZGPU_REDIS_PORT`), and the flag that
/// overrides it, if any.
pub struct Key {
    pub name: &'static str,
    /// What a valid value looks like, completing "expected ...".
    pub expected: &'static str,
    flag: Option<Flag>,
    /// The value may hold a password: never shown (`Debug`, messages).
    secret: bool,
    /// A config file may give a list, kept comma-joined like its environment variable.
    list: bool,
    /// Only the system configuration file may set it (the administrator's policy).
    system: bool,
    /// It changes what every user's processes do to the shared store (which
    /// reservations count as this host's for liveness, how much history is pruned):
    /// on a protected install only the system file sets it.
    store_wide: bool,
}

struct Flag {
    name: &'static str,
    value: fn(&Overrides) -> Option<&OsStr>,
}

impl Key {
    const fn new(name: &'static str, expected: &'static str) -> Self {
        Key {
            name,
            expected,
            flag: None,
            secret: false,
            list: false,
            system: false,
            store_wide: false,
        }
    }

    const fn store_wide(self) -> Self {
        Key {
            store_wide: true,
            ..self
        }
    }

    const fn system(self) -> Self {
        Key {
            system: true,
            ..self
        }
    }

    const fn flag(self, name: &'static str, value: fn(&Overrides) -> Option<&OsStr>) -> Self {
        Key {
            flag: Some(Flag { name, value }),
            ..self
        }
    }

    pub fn env_var(&self) -> String {
        env_var_for(self.name)
    }

    const fn secret(self) -> Self {
        Key {
            secret: true,
            ..self
        }
    }

    const fn list(self) -> Self {
        Key { list: true, ..self }
    }

    fn setting(&self, value: String, source: Source) -> Setting {
        Setting {
            value,
            source,
            expected: self.expected,
            secret: self.secret,
        }
    }

    fn flag_setting(&self, overrides: &Overrides) -> Result<Option<Setting>> {
        let Some(flag) = &self.flag else {
            return Ok(None);
        };
        let Some(raw) = (flag.value)(overrides) else {
            return Ok(None);
        };
        let source = Source::Flag(flag.name);
        match raw.to_str() {
            Some(text) => Ok(Some(self.setting(text.to_owned(), source))),
            None => Err(invalid(&source, self.expected, &format!("{raw:?}"))),
        }
    }
}

fn text(value: &Option<String>) -> Option<&OsStr> {
    value.as_deref().map(OsStr::new)
}

/// Every key config files and `CANHAZGPU_*` variables understand. One line here makes
/// a key known to all layers; its users read it from `Config::settings`.
pub static KEYS: &[Key] = &[
    Key::new("backend", "'sqlite' or 'redis'").flag("--backend", |o| text(&o.backend)),
    Key::new("state_dir", "a directory path").flag("--state-dir", |o| {
        o.state_dir.as_deref().map(Path::as_os_str)
    }),
    Key::new("redis.host", "a host name").flag("--redis-host", |o| text(&o.redis_host)),
    Key::new("redis.port", "an integer from 1 to 65535")
        .flag("--redis-port", |o| text(&o.redis_port)),
    Key::new("redis.db", "an integer of at least 0").flag("--redis-db", |o| text(&o.redis_db)),
    Key::new(
        "redis.url",
        "a valid URL starting with redis://, rediss:// or redis+unix://",
    )
    .flag("--redis-url", |o| text(&o.redis_url))
    .secret(),
    Key::new("redis.password", "a non-empty password")
        .flag("--redis-password", |o| text(&o.redis_password))
        .secret(),
    Key::new("redis.password_file", "a file path"),
    Key::new("redis.tls_ca_file", "a file path"),
    Key::new("redis.tls_client_cert", "a file path"),
    Key::new("redis.tls_client_key", "a file path"),
    Key::new(
        "redis.sentinels",
        "a list of sentinel addresses such as 10.0.0.1:26379,10.0.0.2:26379",
    )
    .list(),
    Key::new("redis.sentinel_master", "a master name"),
    Key::new("memory.threshold", "a whole number of MB")
        .flag("--memory-threshold", |o| text(&o.memory_threshold)),
    Key::new(
        "memory.ignore_processes",
        "a list of process names such as Xorg,gnome-shell",
    )
    .list(),
    Key::new(
        "history.retention_days",
        "a whole number of days from 1 to 36500",
    )
    .store_wide(),
    Key::new(
        "run.wait",
        "a duration such as 30m, true (wait without limit) or false",
    ),
    Key::new(
        "reserve.wait",
        "a duration such as 30m, true (wait without limit) or false",
    ),
    Key::new("smi_timeout", "a positive number of seconds"),
    Key::new("nvml", "0 or 1 (false or true)"),
    Key::new(
        "host_name",
        "a host name of letters, digits, '.', '_' and '-'",
    )
    .store_wide(),
    Key::new("redis.layout", "'fleet' or 'upstream'"),
    Key::new(
        "remote_hosts",
        "a list of SSH host names (letters, digits, '.', '_', '-', '@')",
    )
    .list(),
    Key::new("policy.max_duration", "a duration such as 24h").system(),
    Key::new("policy.max_gpus_per_user", "a whole number of GPUs from 1").system(),
    Key::new("policy.caps_only_when_contended", "true or false").system(),
    Key::new(
        "policy.idle_utilization_percent",
        "a whole percentage from 0 to 100",
    )
    .system(),
    Key::new("policy.idle_release_after", "a duration such as 1h").system(),
    Key::new("policy.foreign_use", "'report' or 'terminate'").system(),
    Key::new("policy.unreserved_use", "'report' or 'terminate'").system(),
    Key::new("policy.foreign_grace", "a duration such as 2m").system(),
    Key::new("notify.terminals", "true or false").system(),
    Key::new("notify.webhook_url", "an http:// or https:// URL").system(),
    Key::new("notify.smtp.host", "a host name").system(),
    Key::new("notify.smtp.port", "an integer from 1 to 65535").system(),
    Key::new("notify.smtp.from", "an e-mail address").system(),
    Key::new(
        "notify.smtp.to",
        "an address template such as {user}@example.com",
    )
    .system(),
    Key::new("notify.expiry_warning", "a duration such as 15m").system(),
    Key::new("policy.idle_warning", "a duration such as 15m").system(),
];

/// The environment variable naming another system configuration directory (tests,
/// staging). Ignored while canhazgpu runs with privileges it was given (setgid or
/// setuid), so a user cannot point the policy elsewhere.
pub const SYSTEM_CONFIG_DIR_ENV: &str = "CANHAZGPU_SYSTEM_CONFIG_DIR";

pub use crate::pool::Policy;

/// What to do when the GPUs are not available yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitPolicy {
    /// Fail at once with the reason (the default).
    FailAtOnce,
    /// Wait in the queue for as long as it takes.
    Forever,
    /// Wait in the queue, giving up after this long.
    Limit(std::time::Duration),
}

/// `notify.*`: every channel off unless configured; SMTP needs host, from and to.
fn notify_channels(settings: &BTreeMap<&'static str, Setting>) -> Result<crate::notify::Channels> {
    let url = |v: &str| {
        let v = v.trim();
        (v.starts_with("http://") || v.starts_with("https://"))
            .then(|| v.to_owned())
            .filter(|v| !v.contains(char::is_whitespace))
    };
    let host = parsed(settings, "notify.smtp.host", non_empty)?;
    let port = parsed(settings, "notify.smtp.port", |v| {
        digits(v)?.parse::<u16>().ok().filter(|p| *p > 0)
    })?;
    let from = parsed(settings, "notify.smtp.from", |v| {
        non_empty(v).filter(|v| v.contains('@'))
    })?;
    let to = parsed(settings, "notify.smtp.to", |v| {
        non_empty(v).filter(|v| v.contains('@'))
    })?;
    let smtp = match (host, from, to) {
        (Some(host), Some(from), Some(to)) => Some(crate::notify::Smtp {
            host,
            port: port.unwrap_or(25),
            from,
            to,
        }),
        (None, None, None) => None,
        _ => {
            return Err(Error::Config(
                "notify.smtp: give host, from and to (and port, default 25) together".into(),
            ));
        }
    };
    Ok(crate::notify::Channels {
        terminals: parsed(settings, "notify.terminals", boolean)?.unwrap_or(false),
        webhook_url: parsed(settings, "notify.webhook_url", url)?,
        smtp,
        expiry_warning: parsed(settings, "notify.expiry_warning", |v| {
            crate::duration::parse_duration(v).ok()
        })?
        .unwrap_or(crate::notify::DEFAULT_EXPIRY_WARNING_SECS),
    })
}

/// `report` (false) or `terminate` (true).
fn enforcement(text: &str) -> Option<bool> {
    match text.trim() {
        "report" => Some(false),
        "terminate" => Some(true),
        _ => None,
    }
}

fn boolean(text: &str) -> Option<bool> {
    match text.trim() {
        "1" | "true" | "yes" => Some(true),
        "0" | "false" | "no" => Some(false),
        _ => None,
    }
}

/// `true` or `yes` (no limit), `false` or `no`, or a duration.
fn wait_policy(text: &str) -> Option<WaitPolicy> {
    match text.trim() {
        "true" | "yes" => Some(WaitPolicy::Forever),
        "false" | "no" => Some(WaitPolicy::FailAtOnce),
        other => crate::duration::parse_duration(other)
            .ok()
            .map(|secs| WaitPolicy::Limit(std::time::Duration::from_secs(secs))),
    }
}

/// `smi_timeout` and `nvml`; a bad timeout in the environment keeps the message
/// that names the variable.
fn gpu_settings(settings: &BTreeMap<&'static str, Setting>) -> Result<GpuSettings> {
    let smi_timeout = match settings.get("smi_timeout") {
        None => crate::gpu::tool::DEFAULT_TIMEOUT,
        Some(setting) if matches!(setting.source, Source::Env(_)) => {
            crate::gpu::tool::parse_timeout(Some(&setting.value))?
        }
        Some(setting) => setting.parse(|v| crate::gpu::tool::parse_timeout(Some(v)).ok())?,
    };
    let nvml = parsed(settings, "nvml", boolean)?.unwrap_or(true);
    let ignore_processes = parsed(settings, "memory.ignore_processes", |v| {
        Some(
            v.split(',')
                .map(str::trim)
                .filter(|name| !name.is_empty())
                .map(str::to_owned)
                .collect(),
        )
    })?
    .unwrap_or_default();
    Ok(GpuSettings {
        smi_timeout,
        nvml,
        ignore_processes,
    })
}

fn key(name: &str) -> Option<&'static Key> {
    KEYS.iter().find(|key| key.name == name)
}

/// Where a raw value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Flag(&'static str),
    Env(String),
    File { path: PathBuf, key: &'static str },
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Flag(name) => f.write_str(name),
            Source::Env(name) => f.write_str(name),
            Source::File { path, key } => write!(f, "{}: key '{key}'", path.display()),
        }
    }
}

/// The environment variable of key `name` (`redis.port` → `CANHAZGPU_REDIS_PORT`).
fn env_var_for(name: &str) -> String {
    format!(
        "{ENV_PREFIX}{}",
        name.to_ascii_uppercase().replace('.', "_")
    )
}

impl Config {
    /// The environment that gives another canhazgpu started by this one the same
    /// settings: the values given as flags, as their variables, and the configuration
    /// file that was read. (Variables and files it finds by itself.)
    pub fn child_environment(&self) -> Vec<(String, String)> {
        let mut env = Vec::new();
        let mut file = None;
        for (name, setting) in &self.settings {
            match &setting.source {
                Source::Flag(_) => env.push((env_var_for(name), setting.value.clone())),
                Source::File { path, .. } => file = Some(path.clone()),
                Source::Env(_) => {}
            }
        }
        if let Some(path) = file {
            env.push((CONFIG_ENV.to_string(), path.display().to_string()));
        }
        env
    }
}

/// A key's raw value from the highest layer that gave it.
#[derive(Clone, PartialEq, Eq)]
pub struct Setting {
    pub value: String,
    pub source: Source,
    expected: &'static str,
    secret: bool,
}

impl fmt::Debug for Setting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Setting")
            .field("value", &self.shown())
            .field("source", &self.source)
            .finish()
    }
}

impl Setting {
    /// Converts the value with `parse`; `None` from it becomes an error naming the
    /// source and what the key expects.
    pub fn parse<T>(&self, parse: impl FnOnce(&str) -> Option<T>) -> Result<T> {
        parse(&self.value)
            .ok_or_else(|| invalid(&self.source, self.expected, &format!("{:?}", self.shown())))
    }

    /// The value as messages may show it: a URL without its password, no password.
    fn shown(&self) -> String {
        match self.secret {
            false => self.value.clone(),
            true if self.value.contains("://") => {
                crate::store::redis::without_password(&self.value)
            }
            true => "<hidden>".into(),
        }
    }
}

fn invalid(source: &Source, expected: &str, got: &str) -> Error {
    Error::Config(format!("{source}: expected {expected}, got {got}"))
}

/// Resolves the configuration from flags, the process environment and config files.
pub fn resolve(overrides: &Overrides) -> Result<Config> {
    let env = |name: &str| std::env::var_os(name).map(|v| v.to_string_lossy().into_owned());
    let home = std::env::home_dir().filter(|home| !home.as_os_str().is_empty());
    let system_dir = match env(SYSTEM_CONFIG_DIR_ENV).filter(|dir| !dir.is_empty()) {
        Some(dir) if !crate::privilege::set_id() => PathBuf::from(dir),
        _ => PathBuf::from(SYSTEM_CONFIG_DIR),
    };
    let protected = crate::privilege::available();
    resolve_installed(overrides, &env, home.as_deref(), &system_dir, protected)
}

/// `resolve` with the environment, home directory and system config directory given.
pub fn resolve_with(
    overrides: &Overrides,
    env: &dyn Fn(&str) -> Option<String>,
    home: Option<&Path>,
    system_dir: &Path,
) -> Result<Config> {
    resolve_installed(overrides, env, home, system_dir, false)
}

/// `resolve_with` on a protected install or not: there the keys that steer the shared
/// store (`Key::store_wide`) come from the system file alone.
fn resolve_installed(
    overrides: &Overrides,
    env: &dyn Fn(&str) -> Option<String>,
    home: Option<&Path>,
    system_dir: &Path,
    protected: bool,
) -> Result<Config> {
    let env = |name: &str| env(name).filter(|value| !value.is_empty());
    let mut warnings = Vec::new();
    let path = find_config_file(overrides, &env, home, system_dir)?;
    let mut file = match &path {
        Some(path) => load_file(path, &mut warnings)?,
        None => BTreeMap::new(),
    };
    // The policy comes from the system file alone, whichever file holds the rest.
    let system_path = system_file(system_dir);
    let system_settings = match (&system_path, &path) {
        (Some(system), Some(path)) if system == path => file.clone(),
        (Some(system), _) => load_file(system, &mut warnings)?,
        (None, _) => BTreeMap::new(),
    };
    let mut policy = system_settings.clone();
    policy.retain(|name, _| is_system_key(name));
    for (name, setting) in file.iter().filter(|(name, _)| is_system_key(name)) {
        if !policy.contains_key(name) || path != system_path {
            warnings.push(format!(
                "warning: {}: '{name}' is the administrator's, set only in {}/config.*; ignored here",
                setting.source,
                system_dir.display()
            ));
        }
    }
    file.retain(|name, _| !is_system_key(name));
    let (mut from_env, mut from_flags) = (BTreeMap::new(), BTreeMap::new());
    for key in KEYS {
        if let Some(setting) = key.flag_setting(overrides)? {
            from_flags.insert(key.name, setting);
        }
        let env_var = key.env_var();
        if let Some(value) = env(&env_var) {
            if key.system {
                warnings.push(format!(
                    "warning: {env_var}: '{}' is the administrator's, set only in {}/config.*; ignored here",
                    key.name,
                    system_dir.display()
                ));
                continue;
            }
            from_env.insert(key.name, key.setting(value, Source::Env(env_var)));
        }
    }
    // Every layer must be valid, also where a higher one overrides it: a typo in a
    // config file must not lie in wait for the day the flag is dropped.
    for layer in [&file, &from_env] {
        typed(layer.clone(), &mut Vec::new())?;
    }
    if protected {
        for key in KEYS.iter().filter(|key| key.store_wide) {
            let user_file = match path == system_path {
                true => None,
                false => file.remove(key.name),
            };
            let given = [
                user_file,
                from_env.remove(key.name),
                from_flags.remove(key.name),
            ];
            for setting in given.into_iter().flatten() {
                warnings.push(format!(
                    "warning: {}: '{}' is set only in {}/config.* on a protected install; ignored here",
                    setting.source,
                    key.name,
                    system_dir.display()
                ));
            }
            if let Some(system) = system_settings.get(key.name) {
                policy.insert(key.name, system.clone());
            }
        }
    }
    let mut settings = file;
    settings.append(&mut from_env);
    settings.append(&mut from_flags);
    settings.append(&mut policy);
    let mut config = typed(settings, &mut warnings)?;
    let mut system_store = system_settings;
    system_store.retain(|name, _| *name == "backend" || is_store_key(name));
    let system_store = typed(system_store, &mut Vec::new())?.store;
    mark_system_store(&mut config.store, &system_store);
    read_password_file(&mut config.store, &system_store, &env)?;
    // Checked on the merged settings: a layer may give just one of the two.
    if let (Some(given), None) | (None, Some(given)) = (
        config.settings.get("redis.tls_client_cert"),
        config.settings.get("redis.tls_client_key"),
    ) && matches!(config.store, StoreConfig::Redis(_))
    {
        return Err(Error::Config(format!(
            "{}: redis.tls_client_cert and redis.tls_client_key go together",
            given.source
        )));
    }
    read_tls_files(&mut config.store, &system_store)?;
    config.warnings = warnings;
    Ok(config)
}

/// Where the store lives (`state_dir`, `redis.*`): what names the system's store.
fn is_store_key(name: &str) -> bool {
    name == "state_dir" || name.starts_with("redis.")
}

/// Marks the store as the system's when it is the one the system configuration
/// (or, without one, the default) names.
fn mark_system_store(store: &mut StoreConfig, system_store: &StoreConfig) {
    match (store, system_store) {
        (
            StoreConfig::Sqlite { path, system },
            StoreConfig::Sqlite {
                path: system_path, ..
            },
        ) => *system = path == system_path,
        (StoreConfig::Redis(redis), StoreConfig::Redis(system_redis)) => {
            redis.system = crate::store::redis::same_server(redis, system_redis);
        }
        _ => {}
    }
}

/// Variables that change which TLS servers are trusted; with one set, a `rediss://`
/// server may not be the one the system configuration means.
const TLS_TRUST_VARS: [&str; 2] = ["SSL_CERT_FILE", "SSL_CERT_DIR"];

/// Reads `redis.password_file` into the password, unless the URL has one. The system
/// configuration's own file is read with a protected install's privilege, and only
/// for the server that configuration names; any other file as the user.
fn read_password_file(
    store: &mut StoreConfig,
    system_store: &StoreConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<()> {
    let StoreConfig::Redis(redis) = store else {
        return Ok(());
    };
    let Some(path) = redis.password_file.clone() else {
        return Ok(());
    };
    if crate::store::redis::url_has_password(redis) {
        return Ok(());
    }
    let system_file = system_redis(system_store).and_then(|system| system.password_file.as_deref());
    let is_system_file = system_file == Some(path.as_path());
    if is_system_file && !redis.system {
        // Another server: the system's password is not for it.
        redis.password_file = None;
        return Ok(());
    }
    let trust_steered =
        crate::privilege::available() && !trust_is_systems(redis, system_store, env);
    let unreadable = |reason: String| {
        Error::Config(format!(
            "cannot read the Redis password file {}: {reason}",
            path.display()
        ))
    };
    if is_system_file && trust_steered {
        return Err(unreadable(
            "it is not used while SSL_CERT_FILE or SSL_CERT_DIR chooses which TLS servers to trust"
                .into(),
        ));
    }
    let text = crate::privilege::with_privilege_if(is_system_file, || read_regular_file(&path))
        .map_err(|err| unreadable(io_reason(&err)))?;
    let password = text.trim_end_matches(['\n', '\r']);
    if password.is_empty() {
        return Err(Error::Config(format!(
            "the Redis password file {} is empty",
            path.display()
        )));
    }
    redis.password = Some(password.to_owned());
    Ok(())
}

/// The system configuration's Redis settings, when its store is Redis.
fn system_redis(system_store: &StoreConfig) -> Option<&crate::store::RedisConfig> {
    match system_store {
        StoreConfig::Redis(system) => Some(system),
        StoreConfig::Sqlite { .. } => None,
    }
}

/// Whether the TLS servers trusted are the ones the system configuration trusts:
/// the same `redis.tls_ca_file`, or the system's store with none of the variables
/// that change it (`SSL_CERT_FILE`, `SSL_CERT_DIR`) set. Plain connections trust no one.
fn trust_is_systems(
    redis: &crate::store::RedisConfig,
    system_store: &StoreConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> bool {
    if !crate::store::redis::uses_tls(redis) {
        return true;
    }
    let system_ca = system_redis(system_store).and_then(|system| system.tls.ca_file.as_deref());
    match (redis.tls.ca_file.as_deref(), system_ca) {
        (Some(ca), Some(system_ca)) => ca == system_ca,
        (None, None) => TLS_TRUST_VARS.iter().all(|name| env(name).is_none()),
        _ => false,
    }
}

/// Reads the `redis.tls_*` files. The CA and the client certificate are public and
/// read as the user. The client key is read like the password file: the system
/// configuration's own one with a protected install's privilege, only for the server
/// that configuration names (not at all for another one); any other as the user.
fn read_tls_files(store: &mut StoreConfig, system_store: &StoreConfig) -> Result<()> {
    let StoreConfig::Redis(redis) = store else {
        return Ok(());
    };
    let read = |path: &Path, privileged: bool| {
        crate::privilege::with_privilege_if(privileged, || std::fs::read(path)).map_err(|err| {
            Error::Config(format!(
                "cannot read the Redis TLS file {}: {}",
                path.display(),
                io_reason(&err)
            ))
        })
    };
    if let Some(ca) = redis.tls.ca_file.clone() {
        redis.tls.ca = Some(read(&ca, false)?);
    }
    let (Some(cert), Some(key)) = (redis.tls.client_cert.clone(), redis.tls.client_key.clone())
    else {
        return Ok(());
    };
    let system_key = system_redis(system_store).and_then(|system| system.tls.client_key.as_deref());
    let is_system_key = system_key == Some(key.as_path());
    if is_system_key && !redis.system {
        // Another server: the system's client key is not for it.
        redis.tls.client_cert = None;
        redis.tls.client_key = None;
        return Ok(());
    }
    redis.tls.client = Some((read(&cert, false)?, read(&key, is_system_key)?));
    Ok(())
}

/// An I/O error without its `(os error N)` tail.
fn io_reason(err: &std::io::Error) -> String {
    let text = err.to_string();
    match text.find(" (os error") {
        Some(end) => text[..end].to_lowercase(),
        None => text,
    }
}

/// The typed configuration from the raw settings of one or more layers.
fn typed(settings: BTreeMap<&'static str, Setting>, warnings: &mut Vec<String>) -> Result<Config> {
    let backend = parsed(&settings, "backend", |v| match v {
        "sqlite" => Some(Backend::Sqlite),
        "redis" => Some(Backend::Redis),
        _ => None,
    })?;
    let state_dir = parsed(&settings, "state_dir", |v| non_empty(v).map(PathBuf::from))?
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
    let redis = redis_config(&settings, warnings)?;
    let memory_threshold_mb = parsed(&settings, "memory.threshold", |v| digits(v)?.parse().ok())?
        .unwrap_or(DEFAULT_MEMORY_THRESHOLD_MB);
    let history_retention_days = parsed(&settings, "history.retention_days", |v| {
        digits(v)?
            .parse::<u32>()
            .ok()
            .filter(|days| (1..=crate::report::MAX_DAYS).contains(days))
    })?
    .unwrap_or(crate::store::DEFAULT_HISTORY_RETENTION_DAYS);
    let run_wait = parsed(&settings, "run.wait", wait_policy)?;
    let reserve_wait = parsed(&settings, "reserve.wait", wait_policy)?;
    let gpu = gpu_settings(&settings)?;
    let host_name = parsed(&settings, "host_name", |v| {
        valid_host_name(v).then(|| v.to_owned())
    })?
    .unwrap_or_else(crate::gpu::procinfo::hostname);
    let remote_hosts = parsed(&settings, "remote_hosts", |v| {
        let hosts: Vec<String> = v.split(',').map(|h| h.trim().to_owned()).collect();
        hosts.iter().all(|h| valid_ssh_host(h)).then_some(hosts)
    })?
    .unwrap_or_default();
    let policy = Policy {
        max_duration: parsed(&settings, "policy.max_duration", |v| {
            crate::duration::parse_duration(v).ok()
        })?,
        max_gpus_per_user: parsed(&settings, "policy.max_gpus_per_user", |v| {
            digits(v)?.parse().ok().filter(|n| *n >= 1)
        })?,
        caps_only_when_contended: parsed(&settings, "policy.caps_only_when_contended", boolean)?
            .unwrap_or(false),
        idle_utilization_percent: parsed(&settings, "policy.idle_utilization_percent", |v| {
            digits(v)?.parse().ok().filter(|percent| *percent <= 100)
        })?
        .unwrap_or(crate::pool::DEFAULT_IDLE_UTILIZATION_PERCENT),
        idle_release_after: parsed(&settings, "policy.idle_release_after", |v| {
            crate::duration::parse_duration(v).ok()
        })?,
        idle_warning: parsed(&settings, "policy.idle_warning", |v| {
            crate::duration::parse_duration(v).ok()
        })?
        .unwrap_or(crate::pool::DEFAULT_IDLE_WARNING_SECS),
        terminate_foreign: parsed(&settings, "policy.foreign_use", enforcement)?.unwrap_or(false),
        terminate_unreserved: parsed(&settings, "policy.unreserved_use", enforcement)?
            .unwrap_or(false),
        foreign_grace: parsed(&settings, "policy.foreign_grace", |v| {
            crate::duration::parse_duration(v).ok()
        })?
        .unwrap_or(crate::pool::DEFAULT_FOREIGN_GRACE_SECS),
    };

    let redis_given = REDIS_KEYS.iter().any(|key| settings.contains_key(key));
    let store = match backend {
        Some(Backend::Redis) => StoreConfig::Redis(redis),
        None if redis_given => StoreConfig::Redis(redis),
        Some(Backend::Sqlite) | None => StoreConfig::Sqlite {
            path: state_dir.join("state.db"),
            system: false,
        },
    };
    Ok(Config {
        store,
        memory_threshold_mb,
        history_retention_days,
        run_wait,
        reserve_wait,
        gpu,
        host_name,
        remote_hosts,
        policy,
        notify: notify_channels(&settings)?,
        warnings: Vec::new(),
        settings,
    })
}

enum Backend {
    Sqlite,
    Redis,
}

fn parsed<T>(
    settings: &BTreeMap<&'static str, Setting>,
    key: &str,
    parse: impl FnOnce(&str) -> Option<T>,
) -> Result<Option<T>> {
    settings
        .get(key)
        .map(|setting| setting.parse(parse))
        .transpose()
}

/// A whole number as written by a person: digits only (`+1`, ` 1`, `1e3` are not).
fn digits(value: &str) -> Option<&str> {
    (!value.is_empty() && value.bytes().all(|byte| byte.is_ascii_digit())).then_some(value)
}

/// A fleet member's name: it goes into Redis key names (between `{` `}`) and URLs.
pub fn valid_host_name(name: &str) -> bool {
    name.len() <= 253
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// An SSH destination from `remote_hosts`: never an option (`-o...`), never a path.
fn valid_ssh_host(name: &str) -> bool {
    name.len() <= 253
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'))
}

fn non_empty(value: &str) -> Option<String> {
    (!value.is_empty()).then(|| value.to_owned())
}

/// Validates every Redis key, whichever backend is chosen, so a typo never hides.
fn redis_config(
    settings: &BTreeMap<&'static str, Setting>,
    warnings: &mut Vec<String>,
) -> Result<RedisConfig> {
    let host = parsed(settings, "redis.host", |v| {
        non_empty(v).filter(|v| !v.contains(char::is_whitespace))
    })?;
    let port = parsed(settings, "redis.port", |v| {
        digits(v)?.parse::<u16>().ok().filter(|port| *port != 0)
    })?;
    let db = parsed(settings, "redis.db", |v| digits(v)?.parse::<i64>().ok())?;
    let url = parsed(settings, "redis.url", |v| {
        let known_scheme = REDIS_URL_SCHEMES.iter().any(|scheme| v.starts_with(scheme));
        // The client's own parser: a bad port or db number is a usage error here,
        // not a connection failure later.
        let parses = redis::IntoConnectionInfo::into_connection_info(v).is_ok();
        (known_scheme && parses).then(|| v.to_owned())
    })?;
    let password = parsed(settings, "redis.password", non_empty)?;
    let password_file = parsed(settings, "redis.password_file", |v| {
        non_empty(v).map(PathBuf::from)
    })?;
    if let (Some(_), Some(file), Some(password)) = (
        &password_file,
        settings.get("redis.password_file"),
        settings.get("redis.password"),
    ) {
        warnings.push(format!(
            "warning: {} ignored because redis.password is set ({})",
            file.source, password.source
        ));
    }
    let layout = parsed(settings, "redis.layout", |v| match v {
        "fleet" => Some(RedisLayout::Fleet),
        "upstream" => Some(RedisLayout::Upstream),
        _ => None,
    })?;
    let path = |key: &str| parsed(settings, key, |v| non_empty(v).map(PathBuf::from));
    let tls = Box::new(crate::store::TlsFiles {
        ca_file: path("redis.tls_ca_file")?,
        client_cert: path("redis.tls_client_cert")?,
        client_key: path("redis.tls_client_key")?,
        ca: None,
        client: None,
    });
    let sentinels = parsed(settings, "redis.sentinels", sentinel_nodes)?;
    let sentinel_master = parsed(settings, "redis.sentinel_master", |v| {
        non_empty(v).filter(|v| !v.contains(char::is_whitespace))
    })?;

    // The sentinels name the master's address.
    match (
        settings.get("redis.sentinels"),
        settings.get("redis.sentinel_master"),
    ) {
        (Some(sentinels_setting), _) => {
            for name in ["redis.host", "redis.port"] {
                if let Some(ignored) = settings.get(name) {
                    warnings.push(format!(
                        "warning: {} ignored because redis.sentinels is set ({})",
                        ignored.source, sentinels_setting.source
                    ));
                }
            }
        }
        (None, Some(master)) => warnings.push(format!(
            "warning: {} ignored because redis.sentinels is not set",
            master.source
        )),
        (None, None) => {}
    }
    // The URL wins over host/port/db; say so rather than silently drop a flag.
    if let Some(url_setting) = settings.get("redis.url") {
        for name in ["redis.host", "redis.port", "redis.db"] {
            if let Some(ignored) = settings.get(name) {
                warnings.push(format!(
                    "warning: {} ignored because redis.url is set ({})",
                    ignored.source, url_setting.source
                ));
            }
        }
    }
    Ok(RedisConfig {
        url,
        host: host.unwrap_or_else(|| DEFAULT_REDIS_HOST.to_owned()),
        port: port.unwrap_or(DEFAULT_REDIS_PORT),
        db: db.unwrap_or(DEFAULT_REDIS_DB),
        password_file: password_file.filter(|_| password.is_none()),
        password,
        system: false,
        tls,
        layout: layout.unwrap_or(RedisLayout::Fleet),
        sentinel: sentinels.map(|nodes| SentinelConfig {
            nodes,
            master: sentinel_master.unwrap_or_else(|| DEFAULT_SENTINEL_MASTER.to_owned()),
        }),
    })
}

/// `host:port,host:port` (an IPv6 host in brackets), spaces around commas allowed.
fn sentinel_nodes(value: &str) -> Option<Vec<(String, u16)>> {
    value
        .split(',')
        .map(|node| {
            let (host, port) = node.trim().rsplit_once(':')?;
            let port = digits(port)?
                .parse::<u16>()
                .ok()
                .filter(|port| *port != 0)?;
            let host = match host.strip_prefix('[') {
                Some(bracketed) => bracketed.strip_suffix(']')?,
                None if host.contains(':') => return None,
                None => host,
            };
            let valid = !host.is_empty()
                && !host.contains(|c: char| c.is_whitespace() || "[]/@".contains(c));
            valid.then(|| (host.to_owned(), port))
        })
        .collect()
}

fn is_system_key(name: &str) -> bool {
    KEYS.iter().any(|key| key.name == name && key.system)
}

/// The system configuration file: the first existing `SYSTEM_DIR/config.EXT`.
fn system_file(system_dir: &Path) -> Option<PathBuf> {
    EXTENSIONS
        .map(|ext| system_dir.join(format!("config.{ext}")))
        .into_iter()
        .find(|path| path.exists())
}

/// The explicitly named file (`--config`, then `CANHAZGPU_CONFIG`), else the first
/// existing `~/.canhazgpu.EXT`, else the first existing `SYSTEM_DIR/config.EXT`.
fn find_config_file(
    overrides: &Overrides,
    env: &dyn Fn(&str) -> Option<String>,
    home: Option<&Path>,
    system_dir: &Path,
) -> Result<Option<PathBuf>> {
    let explicit = match &overrides.config_file {
        Some(path) => Some((path.clone(), "--config")),
        None => env(CONFIG_ENV).map(|path| (PathBuf::from(path), CONFIG_ENV)),
    };
    if let Some((path, source)) = explicit {
        if !path.exists() {
            return Err(Error::Config(format!(
                "{source}: config file {} does not exist",
                path.display()
            )));
        }
        return Ok(Some(path));
    }
    let in_home = home
        .into_iter()
        .flat_map(|home| EXTENSIONS.map(|ext| home.join(format!(".canhazgpu.{ext}"))));
    Ok(in_home
        .into_iter()
        .find(|path| path.exists())
        .or_else(|| system_file(system_dir)))
}

#[derive(Clone, Copy)]
enum Format {
    Yaml,
    Json,
    Toml,
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Yaml => "YAML",
            Format::Json => "JSON",
            Format::Toml => "TOML",
        })
    }
}

impl Format {
    fn of(path: &Path) -> Option<Format> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "yaml" | "yml" => Some(Format::Yaml),
            "json" => Some(Format::Json),
            "toml" => Some(Format::Toml),
            _ => None,
        }
    }

    /// Parses `text` into a generic tree, or returns the parser's message.
    fn parse(self, text: &str) -> Result<Value, String> {
        match self {
            Format::Yaml => {
                let options = serde_saphyr::options! { with_snippet: false };
                serde_saphyr::from_str_with_options(text, options).map_err(|e| e.to_string())
            }
            Format::Json => serde_json::from_str(text).map_err(|e| e.to_string()),
            Format::Toml => toml::from_str(text).map_err(|e| {
                let position = e.span().map(|span| line_column(text, span.start));
                match position {
                    Some((line, column)) => {
                        format!("{} at line {line} column {column}", e.message())
                    }
                    None => e.message().to_owned(),
                }
            }),
        }
    }
}

/// 1-based line and column of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    (line, column)
}

/// Joins a multi-line message into one line.
fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Reads a config file into settings; unknown keys become warnings.
/// Reads a file that must be a regular file; opened without blocking, so a FIFO or a
/// device in its place is refused instead of hanging.
fn read_regular_file(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut text = String::new();
    file.read_to_string(&mut text)?;
    Ok(text)
}

fn load_file(path: &Path, warnings: &mut Vec<String>) -> Result<BTreeMap<&'static str, Setting>> {
    let shown = path.display();
    let format = Format::of(path).ok_or_else(|| {
        Error::Config(format!(
            "{shown}: unsupported config file format (expected a .yaml, .yml, .json or .toml file)"
        ))
    })?;
    let text = read_regular_file(path)
        .map_err(|e| Error::Config(format!("{shown}: cannot read config file: {e}")))?;
    let tree = format
        .parse(&text)
        .map_err(|msg| Error::Config(format!("{shown}: invalid {format}: {}", one_line(&msg))))?;
    let top = match tree {
        Value::Object(map) => map,
        // An empty YAML document.
        Value::Null => serde_json::Map::new(),
        other => {
            return Err(Error::Config(format!(
                "{shown}: expected a map of settings, got {}",
                describe(&other)
            )));
        }
    };

    let mut leaves = Vec::new();
    flatten("", top, &mut leaves);
    let mut settings = BTreeMap::new();
    for (name, value) in leaves {
        let Some(key) = key(&name) else {
            warnings.push(format!("warning: {shown}: unknown key '{name}' ignored"));
            continue;
        };
        let source = Source::File {
            path: path.to_owned(),
            key: key.name,
        };
        let text = match value {
            // `port:` with no value leaves the key unset.
            Value::Null => continue,
            Value::Bool(b) => b.to_string(),
            Value::Number(n) => n.to_string(),
            Value::String(s) => s,
            Value::Array(items) if key.list => match list_items(items) {
                Some(joined) => joined,
                None => return Err(invalid(&source, key.expected, "a list of non-strings")),
            },
            other @ (Value::Array(_) | Value::Object(_)) => {
                return Err(invalid(&source, key.expected, describe(&other)));
            }
        };
        if settings
            .insert(key.name, key.setting(text, source))
            .is_some()
        {
            return Err(Error::Config(format!(
                "{shown}: key '{}' is given twice",
                key.name
            )));
        }
    }
    Ok(settings)
}

/// A list of strings as one comma-separated value; `None` if an item is not a
/// string or holds a comma.
fn list_items(items: Vec<Value>) -> Option<String> {
    let texts: Option<Vec<String>> = items
        .into_iter()
        .map(|item| match item {
            Value::String(text) if !text.contains(',') => Some(text),
            _ => None,
        })
        .collect();
    Some(texts?.join(","))
}

fn describe(value: &Value) -> &'static str {
    match value {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a map",
    }
}

/// Turns nested maps into `(dotted.path, leaf)` pairs. A registered key is a leaf even
/// when its value is a map, so that mistake is reported rather than warned about.
fn flatten(prefix: &str, map: serde_json::Map<String, Value>, leaves: &mut Vec<(String, Value)>) {
    for (name, value) in map {
        let path = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}.{name}")
        };
        match value {
            Value::Object(inner) if key(&path).is_none() => flatten(&path, inner, leaves),
            value => leaves.push((path, value)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use tempfile::TempDir;

    use super::*;

    /// A home directory, a system config directory and an environment, all private.
    struct World {
        home: TempDir,
        system: TempDir,
        env: HashMap<String, String>,
    }

    impl World {
        fn new() -> Self {
            World {
                home: TempDir::new().unwrap(),
                system: TempDir::new().unwrap(),
                env: HashMap::new(),
            }
        }

        fn env(mut self, name: &str, value: &str) -> Self {
            self.env.insert(name.to_owned(), value.to_owned());
            self
        }

        fn home_file(&self, name: &str, text: &str) -> PathBuf {
            write(self.home.path(), name, text)
        }

        fn system_file(&self, name: &str, text: &str) -> PathBuf {
            write(self.system.path(), name, text)
        }

        fn resolve(&self, overrides: &Overrides) -> Result<Config> {
            let env = |name: &str| self.env.get(name).cloned();
            resolve_with(overrides, &env, Some(self.home.path()), self.system.path())
        }

        fn config(&self) -> Config {
            self.resolve(&Overrides::default()).unwrap()
        }

        fn error(&self, overrides: &Overrides) -> String {
            match self.resolve(overrides) {
                Err(Error::Config(msg)) => msg,
                other => panic!("expected a config error, got {other:?}"),
            }
        }
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/config")
            .join(name)
    }

    fn redis(config: &Config) -> &RedisConfig {
        match &config.store {
            StoreConfig::Redis(redis) => redis,
            other => panic!("expected Redis, got {other:?}"),
        }
    }

    fn sqlite_path(config: &Config) -> &Path {
        match &config.store {
            StoreConfig::Sqlite { path, .. } => path,
            other => panic!("expected SQLite, got {other:?}"),
        }
    }

    fn flag_config(path: PathBuf) -> Overrides {
        Overrides {
            config_file: Some(path),
            ..Overrides::default()
        }
    }

    // --- defaults -------------------------------------------------------------

    #[test]
    fn defaults_without_any_layer() {
        let config = World::new().config();
        assert_eq!(
            config,
            Config {
                store: StoreConfig::Sqlite {
                    path: PathBuf::from("/var/lib/canhazgpu/state.db"),
                    system: true,
                },
                memory_threshold_mb: 1024,
                history_retention_days: 90,
                run_wait: None,
                reserve_wait: None,
                gpu: GpuSettings {
                    smi_timeout: std::time::Duration::from_secs(10),
                    nvml: true,
                    ignore_processes: Vec::new(),
                },
                host_name: crate::gpu::procinfo::hostname(),
                remote_hosts: vec![],
                warnings: vec![],
                settings: BTreeMap::new(),
                policy: Policy::default(),
                notify: Default::default(),
            }
        );
    }

    #[test]
    fn typed_settings_come_from_every_layer() {
        let config = World::new()
            .env("CANHAZGPU_SMI_TIMEOUT", "2.5")
            .env("CANHAZGPU_NVML", "0")
            .env("CANHAZGPU_RUN_WAIT", "5m")
            .env("CANHAZGPU_HISTORY_RETENTION_DAYS", "7")
            .config();
        assert_eq!(
            config.gpu.smi_timeout,
            std::time::Duration::from_millis(2500)
        );
        assert!(!config.gpu.nvml);
        assert_eq!(
            config.run_wait,
            Some(WaitPolicy::Limit(std::time::Duration::from_secs(300)))
        );
        assert_eq!(config.reserve_wait, None);
        assert_eq!(config.history_retention_days, 7);
    }

    #[test]
    fn env_names_derive_from_keys() {
        let names: Vec<String> = KEYS.iter().map(Key::env_var).collect();
        assert_eq!(
            names,
            [
                "CANHAZGPU_BACKEND",
                "CANHAZGPU_STATE_DIR",
                "CANHAZGPU_REDIS_HOST",
                "CANHAZGPU_REDIS_PORT",
                "CANHAZGPU_REDIS_DB",
                "CANHAZGPU_REDIS_URL",
                "CANHAZGPU_REDIS_PASSWORD",
                "CANHAZGPU_REDIS_PASSWORD_FILE",
                "CANHAZGPU_REDIS_TLS_CA_FILE",
                "CANHAZGPU_REDIS_TLS_CLIENT_CERT",
                "CANHAZGPU_REDIS_TLS_CLIENT_KEY",
                "CANHAZGPU_REDIS_SENTINELS",
                "CANHAZGPU_REDIS_SENTINEL_MASTER",
                "CANHAZGPU_MEMORY_THRESHOLD",
                "CANHAZGPU_MEMORY_IGNORE_PROCESSES",
                "CANHAZGPU_HISTORY_RETENTION_DAYS",
                "CANHAZGPU_RUN_WAIT",
                "CANHAZGPU_RESERVE_WAIT",
                "CANHAZGPU_SMI_TIMEOUT",
                "CANHAZGPU_NVML",
                "CANHAZGPU_HOST_NAME",
                "CANHAZGPU_REDIS_LAYOUT",
                "CANHAZGPU_REMOTE_HOSTS",
                "CANHAZGPU_POLICY_MAX_DURATION",
                "CANHAZGPU_POLICY_MAX_GPUS_PER_USER",
                "CANHAZGPU_POLICY_CAPS_ONLY_WHEN_CONTENDED",
                "CANHAZGPU_POLICY_IDLE_UTILIZATION_PERCENT",
                "CANHAZGPU_POLICY_IDLE_RELEASE_AFTER",
                "CANHAZGPU_POLICY_FOREIGN_USE",
                "CANHAZGPU_POLICY_UNRESERVED_USE",
                "CANHAZGPU_POLICY_FOREIGN_GRACE",
                "CANHAZGPU_NOTIFY_TERMINALS",
                "CANHAZGPU_NOTIFY_WEBHOOK_URL",
                "CANHAZGPU_NOTIFY_SMTP_HOST",
                "CANHAZGPU_NOTIFY_SMTP_PORT",
                "CANHAZGPU_NOTIFY_SMTP_FROM",
                "CANHAZGPU_NOTIFY_SMTP_TO",
                "CANHAZGPU_NOTIFY_EXPIRY_WARNING",
                "CANHAZGPU_POLICY_IDLE_WARNING",
            ]
        );
    }

    #[test]
    fn policy_comes_from_the_system_file_alone() {
        let world = World::new();
        world.system_file(
            "config.yaml",
            "policy:\n  max_duration: 24h\n  max_gpus_per_user: 2\nmemory:\n  threshold: 10\n",
        );
        let config = world.config();
        assert_eq!(config.policy.max_duration, Some(86400));
        assert_eq!(config.policy.max_gpus_per_user, Some(2));
        assert_eq!(config.warnings, Vec::<String>::new());
        // A user file takes over the ordinary keys, never the policy.
        world.home_file(".canhazgpu.yaml", "policy:\n  max_duration: 30d\n");
        let world = world.env("CANHAZGPU_POLICY_MAX_GPUS_PER_USER", "9");
        let config = world.config();
        assert_eq!(config.policy.max_duration, Some(86400));
        assert_eq!(config.policy.max_gpus_per_user, Some(2));
        assert_eq!(config.memory_threshold_mb, DEFAULT_MEMORY_THRESHOLD_MB);
        assert_eq!(config.warnings.len(), 2, "{:?}", config.warnings);
        assert!(
            config
                .warnings
                .iter()
                .all(|w| w.contains("is the administrator's"))
        );
        let world = World::new();
        world.system_file("config.yaml", "policy:\n  max_gpus_per_user: 0\n");
        assert!(
            world
                .error(&Overrides::default())
                .contains("policy.max_gpus_per_user")
        );
    }

    #[test]
    fn fleet_settings() {
        let world = World::new()
            .env("CANHAZGPU_HOST_NAME", "gpu-7.lab")
            .env("CANHAZGPU_REDIS_LAYOUT", "upstream")
            .env("CANHAZGPU_BACKEND", "redis");
        let config = world.config();
        assert_eq!(config.host_name, "gpu-7.lab");
        assert_eq!(redis(&config).layout, RedisLayout::Upstream);

        world.home_file(
            ".canhazgpu.yaml",
            "remote_hosts:\n  - gpu-a\n  - alice@gpu-b\n",
        );
        assert_eq!(world.config().remote_hosts, ["gpu-a", "alice@gpu-b"]);
        let world = world.env("CANHAZGPU_REMOTE_HOSTS", "x, y");
        assert_eq!(world.config().remote_hosts, ["x", "y"]);

        for (name, value, message) in [
            (
                "CANHAZGPU_HOST_NAME",
                "a{b}",
                "CANHAZGPU_HOST_NAME: expected a host name of letters, digits, '.', '_' and \
                 '-', got \"a{b}\"",
            ),
            (
                "CANHAZGPU_REMOTE_HOSTS",
                "ok,-oProxyCommand=x",
                "CANHAZGPU_REMOTE_HOSTS: expected a list of SSH host names (letters, digits, \
                 '.', '_', '-', '@'), got \"ok,-oProxyCommand=x\"",
            ),
            (
                "CANHAZGPU_REDIS_LAYOUT",
                "cluster",
                "CANHAZGPU_REDIS_LAYOUT: expected 'fleet' or 'upstream', got \"cluster\"",
            ),
        ] {
            let world = World::new().env(name, value);
            assert_eq!(world.error(&Overrides::default()), message);
        }
        let world = World::new();
        world.home_file(".canhazgpu.yaml", "remote_hosts: [a, [b]]\n");
        assert!(
            world
                .error(&Overrides::default())
                .ends_with("key 'remote_hosts': expected a list of SSH host names (letters, digits, '.', '_', '-', '@'), got a list of non-strings"),
            "{}",
            world.error(&Overrides::default())
        );
    }

    // --- one test per environment variable ------------------------------------

    #[test]
    fn env_redis_host() {
        let config = World::new()
            .env("CANHAZGPU_REDIS_HOST", "redis.example.com")
            .config();
        assert_eq!(redis(&config).host, "redis.example.com");
    }

    #[test]
    fn env_redis_port() {
        let config = World::new().env("CANHAZGPU_REDIS_PORT", "6380").config();
        assert_eq!(redis(&config).port, 6380);
    }

    #[test]
    fn env_redis_db() {
        let config = World::new().env("CANHAZGPU_REDIS_DB", "3").config();
        assert_eq!(redis(&config).db, 3);
    }

    #[test]
    fn env_redis_url() {
        let config = World::new()
            .env("CANHAZGPU_REDIS_URL", "redis+unix:///run/redis.sock")
            .config();
        assert_eq!(
            redis(&config).url.as_deref(),
            Some("redis+unix:///run/redis.sock")
        );
    }

    #[test]
    fn overridden_layers_are_validated_too() {
        let world = World::new();
        world.home_file(".canhazgpu.yaml", "redis:\n  port: abc\n");
        let flags = Overrides {
            redis_port: Some("6380".into()),
            ..Overrides::default()
        };
        let err = world.resolve(&flags).unwrap_err();
        assert!(err.to_string().contains("key 'redis.port'"), "{err}");
        let world = World::new().env("CANHAZGPU_MEMORY_THRESHOLD", "lots");
        let flags = Overrides {
            memory_threshold: Some("512".into()),
            ..Overrides::default()
        };
        let err = world.resolve(&flags).unwrap_err();
        assert!(
            err.to_string().contains("CANHAZGPU_MEMORY_THRESHOLD"),
            "{err}"
        );
    }

    #[test]
    fn passwords_never_show_in_debug_output_or_messages() {
        let overrides = Overrides {
            redis_url: Some("redis://:url-secret@db.example/0".into()),
            redis_password: Some("flag-secret".into()),
            ..Overrides::default()
        };
        let config = resolve_with(&overrides, &|_| None, None, Path::new("/nonexistent")).unwrap();
        let shown = format!("{overrides:?} {config:?}");
        assert!(!shown.contains("secret"), "{shown}");
        assert!(shown.contains("redis://db.example/0"), "{shown}");
        let bad = Overrides {
            redis_url: Some("redis://:url-secret@db.example:notaport/0".into()),
            ..Overrides::default()
        };
        let err = resolve_with(&bad, &|_| None, None, Path::new("/nonexistent")).unwrap_err();
        assert!(!err.to_string().contains("secret"), "{err}");
    }

    #[test]
    fn env_redis_password() {
        let config = World::new()
            .env("CANHAZGPU_REDIS_PASSWORD", "hunter2")
            .config();
        assert_eq!(redis(&config).password.as_deref(), Some("hunter2"));
    }

    #[test]
    fn env_memory_threshold() {
        let config = World::new()
            .env("CANHAZGPU_MEMORY_THRESHOLD", "512")
            .config();
        assert_eq!(config.memory_threshold_mb, 512);
    }

    #[test]
    fn env_backend() {
        let config = World::new().env("CANHAZGPU_BACKEND", "redis").config();
        assert_eq!(redis(&config).host, "localhost");
    }

    #[test]
    fn env_state_dir() {
        let config = World::new()
            .env("CANHAZGPU_STATE_DIR", "/srv/gpus")
            .config();
        assert_eq!(sqlite_path(&config), Path::new("/srv/gpus/state.db"));
    }

    #[test]
    fn env_config_names_the_file() {
        let world = World::new();
        let path = world.home_file("elsewhere.json", r#"{"memory": {"threshold": 7}}"#);
        let config = world.env(CONFIG_ENV, path.to_str().unwrap()).config();
        assert_eq!(config.memory_threshold_mb, 7);
    }

    #[test]
    fn empty_env_values_count_as_unset() {
        let world = World::new();
        world.home_file(".canhazgpu.yaml", "memory:\n  threshold: 300\n");
        let config = world
            .env("CANHAZGPU_MEMORY_THRESHOLD", "")
            .env("CANHAZGPU_REDIS_HOST", "")
            .env(CONFIG_ENV, "")
            .config();
        assert_eq!(config.memory_threshold_mb, 300);
        assert!(matches!(config.store, StoreConfig::Sqlite { .. }));
    }

    // --- precedence -------------------------------------------------------------

    #[test]
    fn memory_threshold_precedence_flag_env_file_default() {
        let world = World::new();
        assert_eq!(world.config().memory_threshold_mb, 1024);

        world.home_file(".canhazgpu.yaml", "memory:\n  threshold: 100\n");
        assert_eq!(world.config().memory_threshold_mb, 100);

        let world = world.env("CANHAZGPU_MEMORY_THRESHOLD", "200");
        assert_eq!(world.config().memory_threshold_mb, 200);

        let flags = Overrides {
            memory_threshold: Some("300".into()),
            ..Overrides::default()
        };
        assert_eq!(world.resolve(&flags).unwrap().memory_threshold_mb, 300);
    }

    #[test]
    fn redis_port_precedence_flag_env_file_default() {
        let world = World::new().env("CANHAZGPU_BACKEND", "redis");
        assert_eq!(redis(&world.config()).port, 6379);

        world.home_file(".canhazgpu.toml", "[redis]\nport = 7001\n");
        assert_eq!(redis(&world.config()).port, 7001);

        let world = world.env("CANHAZGPU_REDIS_PORT", "7002");
        assert_eq!(redis(&world.config()).port, 7002);

        let flags = Overrides {
            redis_port: Some("7003".into()),
            ..Overrides::default()
        };
        assert_eq!(redis(&world.resolve(&flags).unwrap()).port, 7003);
    }

    /// A valid value per layer (file, env, flag) for every registered key.
    const LAYER_VALUES: [(&str, [&str; 3]); 39] = [
        ("backend", ["sqlite", "redis", "sqlite"]),
        ("state_dir", ["/f", "/e", "/c"]),
        ("redis.host", ["f", "e", "c"]),
        ("redis.port", ["1", "2", "3"]),
        ("redis.db", ["1", "2", "3"]),
        ("redis.url", ["redis://f", "redis://e", "redis://c"]),
        ("redis.password", ["f", "e", "c"]),
        // Files that exist everywhere: the password file is read.
        (
            "redis.password_file",
            ["/etc/passwd", "/etc/group", "/etc/hosts"],
        ),
        (
            "redis.tls_ca_file",
            ["/etc/passwd", "/etc/group", "/etc/hosts"],
        ),
        (
            "redis.tls_client_cert",
            ["/etc/passwd", "/etc/group", "/etc/hosts"],
        ),
        (
            "redis.tls_client_key",
            ["/etc/passwd", "/etc/group", "/etc/hosts"],
        ),
        ("redis.sentinels", ["f:1", "e:2", "c:3"]),
        ("redis.sentinel_master", ["f", "e", "c"]),
        ("memory.threshold", ["1", "2", "3"]),
        ("memory.ignore_processes", ["a", "b", "c"]),
        ("history.retention_days", ["1", "2", "3"]),
        ("run.wait", ["1m", "2m", "3m"]),
        ("reserve.wait", ["true", "false", "3m"]),
        ("smi_timeout", ["1", "2", "3"]),
        ("nvml", ["0", "1", "0"]),
        ("host_name", ["f", "e", "c"]),
        ("redis.layout", ["fleet", "upstream", "fleet"]),
        ("remote_hosts", ["f", "e", "c"]),
        ("policy.max_duration", ["1h", "2h", "3h"]),
        ("policy.max_gpus_per_user", ["1", "2", "3"]),
        ("policy.caps_only_when_contended", ["true", "false", "true"]),
        ("policy.idle_utilization_percent", ["1", "2", "3"]),
        ("policy.idle_release_after", ["1h", "2h", "3h"]),
        ("policy.foreign_use", ["report", "terminate", "report"]),
        ("policy.unreserved_use", ["report", "terminate", "report"]),
        ("policy.foreign_grace", ["1m", "2m", "3m"]),
        ("notify.terminals", ["true", "false", "true"]),
        ("notify.webhook_url", ["http://a", "http://b", "http://c"]),
        ("notify.smtp.host", ["a", "b", "c"]),
        ("notify.smtp.port", ["1", "2", "3"]),
        ("notify.smtp.from", ["a@x", "b@x", "c@x"]),
        ("notify.smtp.to", ["{user}@a", "{user}@b", "{user}@c"]),
        ("notify.expiry_warning", ["1m", "2m", "3m"]),
        ("policy.idle_warning", ["1m", "2m", "3m"]),
    ];

    /// Flags giving `key` the value, or `None` for keys only files and the
    /// environment set.
    fn flag(key: &str, value: &str) -> Option<Overrides> {
        let mut flags = Overrides::default();
        let value = Some(value.to_owned());
        match key {
            "backend" => flags.backend = value,
            "state_dir" => flags.state_dir = value.map(PathBuf::from),
            "redis.host" => flags.redis_host = value,
            "redis.port" => flags.redis_port = value,
            "redis.db" => flags.redis_db = value,
            "redis.url" => flags.redis_url = value,
            "redis.password" => flags.redis_password = value,
            "memory.threshold" => flags.memory_threshold = value,
            "history.retention_days"
            | "smi_timeout"
            | "nvml"
            | "host_name"
            | "redis.layout"
            | "remote_hosts"
            | "redis.sentinels"
            | "redis.sentinel_master"
            | "redis.password_file"
            | "redis.tls_ca_file"
            | "redis.tls_client_cert"
            | "redis.tls_client_key"
            | "memory.ignore_processes" => return None,
            // `--wait`/`--nonblock` belong to the commands (see commands::RequestOptions).
            "run.wait" | "reserve.wait" => return None,
            other => panic!("no flag for {other}"),
        }
        Some(flags)
    }

    #[test]
    fn every_layer_outranks_the_one_below_for_every_key() {
        let names: Vec<&str> = LAYER_VALUES.iter().map(|(name, _)| *name).collect();
        let registered: Vec<&str> = KEYS.iter().map(|key| key.name).collect();
        assert_eq!(names, registered);

        for (key, [in_file, in_env, in_flag]) in LAYER_VALUES {
            if is_system_key(key) {
                continue; // not layered: see `policy_comes_from_the_system_file_alone`
            }
            let world = World::new();
            let path = world.home_file(".canhazgpu.json", &format!(r#"{{"{key}": "{in_file}"}}"#));
            let setting = world.config().settings[key].clone();
            assert_eq!(setting.value, in_file);
            assert_eq!(setting.source, Source::File { path, key });

            let env_var = KEYS.iter().find(|k| k.name == key).unwrap().env_var();
            let world = world.env(&env_var, in_env);
            let setting = world.config().settings[key].clone();
            assert_eq!(setting.value, in_env);
            assert_eq!(setting.source, Source::Env(env_var));

            let Some(flags) = flag(key, in_flag) else {
                continue;
            };
            let config = world.resolve(&flags).unwrap();
            let setting = &config.settings[key];
            assert_eq!(setting.value, in_flag);
            let flag_name = format!("--{}", key.replace(['.', '_'], "-"));
            assert!(matches!(setting.source, Source::Flag(name) if name == flag_name));
        }
    }

    // --- file formats -----------------------------------------------------------

    fn assert_full_fixture(config: &Config) {
        assert_eq!(
            config.store,
            StoreConfig::Redis(RedisConfig {
                url: None,
                host: "redis.example.com".into(),
                port: 6380,
                db: 2,
                password: Some("s3cret".into()),
                password_file: None,
                system: false,
                tls: Default::default(),
                layout: RedisLayout::Fleet,
                sentinel: None,
            })
        );
        assert_eq!(config.memory_threshold_mb, 512);
        assert_eq!(config.settings["state_dir"].value, "/srv/canhazgpu");
        assert_eq!(config.warnings, Vec::<String>::new());
    }

    #[test]
    fn yaml_file() {
        let config = World::new()
            .resolve(&flag_config(fixture("full.yaml")))
            .unwrap();
        assert_full_fixture(&config);
    }

    #[test]
    fn yml_file() {
        let world = World::new();
        let text = std::fs::read_to_string(fixture("full.yaml")).unwrap();
        world.home_file(".canhazgpu.yml", &text);
        assert_full_fixture(&world.config());
    }

    #[test]
    fn json_file() {
        let config = World::new()
            .resolve(&flag_config(fixture("full.json")))
            .unwrap();
        assert_full_fixture(&config);
    }

    #[test]
    fn toml_file() {
        let config = World::new()
            .resolve(&flag_config(fixture("full.toml")))
            .unwrap();
        assert_full_fixture(&config);
    }

    #[test]
    fn dotted_keys_work_like_nested_maps() {
        let world = World::new();
        world.home_file(".canhazgpu.yaml", "redis.port: 6390\nmemory.threshold: 5\n");
        let config = world.config();
        assert_eq!(redis(&config).port, 6390);
        assert_eq!(config.memory_threshold_mb, 5);
    }

    #[test]
    fn quoted_numbers_are_accepted() {
        let world = World::new();
        world.home_file(".canhazgpu.yaml", "redis:\n  port: \"6390\"\n");
        assert_eq!(redis(&world.config()).port, 6390);
    }

    #[test]
    fn empty_yaml_file_and_null_values_leave_defaults() {
        let world = World::new();
        let path = world.home_file(".canhazgpu.yaml", "");
        assert_eq!(world.config().memory_threshold_mb, 1024);
        std::fs::write(&path, "redis:\n  host:\nmemory:\n  threshold: ~\n").unwrap();
        let config = world.config();
        assert_eq!(config.memory_threshold_mb, 1024);
        assert!(matches!(config.store, StoreConfig::Sqlite { .. }));
    }

    // --- discovery --------------------------------------------------------------

    #[test]
    fn home_file_wins_over_system_file() {
        let world = World::new();
        world.system_file("config.yaml", "memory:\n  threshold: 1\n");
        assert_eq!(world.config().memory_threshold_mb, 1);
        world.home_file(".canhazgpu.toml", "memory = { threshold = 2 }\n");
        assert_eq!(world.config().memory_threshold_mb, 2);
    }

    #[test]
    fn home_extensions_are_tried_yaml_yml_json_toml() {
        let world = World::new();
        let order = [
            (".canhazgpu.toml", "memory = { threshold = 4 }\n", 4),
            (".canhazgpu.json", r#"{"memory": {"threshold": 3}}"#, 3),
            (".canhazgpu.yml", "memory: {threshold: 2}\n", 2),
            (".canhazgpu.yaml", "memory: {threshold: 1}\n", 1),
        ];
        // Adding a file earlier in the order takes over from the ones found before.
        for (name, text, expected) in order {
            world.home_file(name, text);
            assert_eq!(world.config().memory_threshold_mb, expected, "{name}");
        }
    }

    #[test]
    fn system_extensions_are_tried_yaml_before_toml() {
        let world = World::new();
        world.system_file("config.toml", "memory = { threshold = 4 }\n");
        assert_eq!(world.config().memory_threshold_mb, 4);
        world.system_file("config.yaml", "memory: {threshold: 1}\n");
        assert_eq!(world.config().memory_threshold_mb, 1);
    }

    #[test]
    fn system_file_is_used_without_a_home() {
        let world = World::new();
        world.system_file("config.json", r#"{"memory": {"threshold": 9}}"#);
        let env = |_: &str| None;
        let config = resolve_with(&Overrides::default(), &env, None, world.system.path()).unwrap();
        assert_eq!(config.memory_threshold_mb, 9);
    }

    #[test]
    fn explicit_file_replaces_discovery() {
        let world = World::new();
        world.home_file(".canhazgpu.yaml", "memory: {threshold: 1}\n");
        let by_env = world.home_file("env.yaml", "memory: {threshold: 2}\n");
        let by_flag = world.home_file("flag.yaml", "memory: {threshold: 3}\n");
        let world = world.env(CONFIG_ENV, by_env.to_str().unwrap());
        assert_eq!(world.config().memory_threshold_mb, 2);
        let config = world.resolve(&flag_config(by_flag)).unwrap();
        assert_eq!(config.memory_threshold_mb, 3);
    }

    // --- errors -----------------------------------------------------------------

    #[test]
    fn missing_explicit_file_is_an_error_naming_it() {
        let world = World::new();
        let missing = world.home.path().join("nope.yaml");
        assert_eq!(
            world.error(&flag_config(missing.clone())),
            format!("--config: config file {} does not exist", missing.display())
        );
        let world = world.env(CONFIG_ENV, missing.to_str().unwrap());
        assert_eq!(
            world.error(&Overrides::default()),
            format!(
                "CANHAZGPU_CONFIG: config file {} does not exist",
                missing.display()
            )
        );
    }

    #[test]
    fn explicit_file_with_other_extension_is_an_error() {
        let world = World::new();
        let path = world.home_file("config.ini", "[redis]\n");
        assert_eq!(
            world.error(&flag_config(path.clone())),
            format!(
                "{}: unsupported config file format (expected a .yaml, .yml, .json or .toml file)",
                path.display()
            )
        );
    }

    fn assert_malformed(name: &str, text: &str, format: &str, detail: &str) {
        let world = World::new();
        let path = world.home_file(name, text);
        let msg = world.error(&Overrides::default());
        let prefix = format!("{}: invalid {format}: ", path.display());
        assert!(msg.starts_with(&prefix), "{msg}");
        assert!(msg.contains(detail), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
    }

    #[test]
    fn malformed_yaml_names_the_file_on_one_line() {
        assert_malformed(
            ".canhazgpu.yaml",
            "redis:\n  host: [unclosed\n",
            "YAML",
            "unclosed bracket '[' at line 2, column 9",
        );
    }

    #[test]
    fn malformed_json_names_the_file_on_one_line() {
        assert_malformed(
            ".canhazgpu.json",
            "{\"redis\": {\"port\": }}",
            "JSON",
            "line 1 column 20",
        );
    }

    #[test]
    fn malformed_toml_names_the_file_on_one_line() {
        assert_malformed(
            ".canhazgpu.toml",
            "[redis]\nhost = \n",
            "TOML",
            "string values must be quoted, expected literal string at line 2 column 8",
        );
    }

    #[test]
    fn top_level_must_be_a_map() {
        let world = World::new();
        let path = world.home_file(".canhazgpu.yaml", "- a\n- b\n");
        assert_eq!(
            world.error(&Overrides::default()),
            format!("{}: expected a map of settings, got a list", path.display())
        );
    }

    #[test]
    fn bad_port_in_file_names_file_and_key() {
        let world = World::new();
        let path = world.home_file(".canhazgpu.yaml", "redis:\n  port: abc\n");
        assert_eq!(
            world.error(&Overrides::default()),
            format!(
                "{}: key 'redis.port': expected an integer from 1 to 65535, got \"abc\"",
                path.display()
            )
        );
    }

    #[test]
    fn bad_threshold_in_env_names_the_variable() {
        let world = World::new().env("CANHAZGPU_MEMORY_THRESHOLD", "lots");
        assert_eq!(
            world.error(&Overrides::default()),
            "CANHAZGPU_MEMORY_THRESHOLD: expected a whole number of MB, got \"lots\""
        );
    }

    #[test]
    fn bad_backend_flag_names_the_flag() {
        let flags = Overrides {
            backend: Some("mongo".into()),
            ..Overrides::default()
        };
        assert_eq!(
            World::new().error(&flags),
            "--backend: expected 'sqlite' or 'redis', got \"mongo\""
        );
    }

    #[test]
    fn value_ranges_are_checked() {
        let cases = [
            ("CANHAZGPU_REDIS_PORT", "0", "an integer from 1 to 65535"),
            (
                "CANHAZGPU_REDIS_PORT",
                "65536",
                "an integer from 1 to 65535",
            ),
            ("CANHAZGPU_REDIS_DB", "-1", "an integer of at least 0"),
            ("CANHAZGPU_MEMORY_THRESHOLD", "-5", "a whole number of MB"),
            ("CANHAZGPU_MEMORY_THRESHOLD", "1.5", "a whole number of MB"),
            (
                "CANHAZGPU_REDIS_URL",
                "http://redis:6379",
                "a valid URL starting with redis://, rediss:// or redis+unix://",
            ),
            (
                "CANHAZGPU_REDIS_URL",
                "redis://127.0.0.1:99999",
                "a valid URL starting with redis://, rediss:// or redis+unix://",
            ),
            (
                "CANHAZGPU_REDIS_URL",
                "redis+unix:///run/redis.sock?db=abc",
                "a valid URL starting with redis://, rediss:// or redis+unix://",
            ),
            ("CANHAZGPU_REDIS_HOST", "two words", "a host name"),
        ];
        for (name, value, expected) in cases {
            let world = World::new().env(name, value);
            assert_eq!(
                world.error(&Overrides::default()),
                format!("{name}: expected {expected}, got {value:?}")
            );
        }
    }

    #[test]
    fn range_edges_are_accepted() {
        let config = World::new()
            .env("CANHAZGPU_REDIS_PORT", "65535")
            .env("CANHAZGPU_REDIS_DB", "0")
            .env("CANHAZGPU_MEMORY_THRESHOLD", "0")
            .config();
        assert_eq!((redis(&config).port, redis(&config).db), (65535, 0));
        assert_eq!(config.memory_threshold_mb, 0);
        for url in ["redis://h:1/2", "rediss://h", "redis+unix:///s.sock"] {
            let config = World::new().env("CANHAZGPU_REDIS_URL", url).config();
            assert_eq!(redis(&config).url.as_deref(), Some(url));
        }
    }

    #[test]
    fn empty_flag_values_are_errors() {
        let flags = Overrides {
            redis_host: Some(String::new()),
            ..Overrides::default()
        };
        assert_eq!(
            World::new().error(&flags),
            "--redis-host: expected a host name, got \"\""
        );
    }

    #[test]
    fn non_utf8_flag_path_is_an_error() {
        use std::os::unix::ffi::OsStrExt;
        let flags = Overrides {
            state_dir: Some(PathBuf::from(OsStr::from_bytes(b"/data/\xff"))),
            ..Overrides::default()
        };
        assert_eq!(
            World::new().error(&flags),
            "--state-dir: expected a directory path, got \"/data/\\xFF\""
        );
    }

    #[test]
    fn map_or_list_for_a_key_is_an_error() {
        let world = World::new();
        let path = world.home_file(".canhazgpu.yaml", "redis:\n  host: [a, b]\n");
        assert_eq!(
            world.error(&Overrides::default()),
            format!(
                "{}: key 'redis.host': expected a host name, got a list",
                path.display()
            )
        );
        std::fs::write(&path, "memory:\n  threshold:\n    mb: 5\n").unwrap();
        assert_eq!(
            world.error(&Overrides::default()),
            format!(
                "{}: key 'memory.threshold': expected a whole number of MB, got a map",
                path.display()
            )
        );
    }

    #[test]
    fn a_key_given_twice_is_an_error() {
        let world = World::new();
        let path = world.home_file(".canhazgpu.yaml", "redis:\n  port: 1\nredis.port: 2\n");
        assert_eq!(
            world.error(&Overrides::default()),
            format!("{}: key 'redis.port' is given twice", path.display())
        );
    }

    #[test]
    fn redis_values_are_checked_even_when_sqlite_is_chosen() {
        let world = World::new()
            .env("CANHAZGPU_BACKEND", "sqlite")
            .env("CANHAZGPU_REDIS_PORT", "x");
        assert_eq!(
            world.error(&Overrides::default()),
            "CANHAZGPU_REDIS_PORT: expected an integer from 1 to 65535, got \"x\""
        );
    }

    // --- warnings ---------------------------------------------------------------

    #[test]
    fn unknown_keys_warn_and_are_ignored() {
        let world = World::new();
        let path = world.home_file(
            ".canhazgpu.yaml",
            "redis:\n  hots: h\n  port: 6390\nremote_host:\n  - gpu1\n  - gpu2\n",
        );
        let config = world.config();
        assert_eq!(
            config.warnings,
            [
                format!(
                    "warning: {}: unknown key 'redis.hots' ignored",
                    path.display()
                ),
                format!(
                    "warning: {}: unknown key 'remote_host' ignored",
                    path.display()
                ),
            ]
        );
        assert_eq!(redis(&config).port, 6390);
        assert_eq!(redis(&config).host, "localhost");
    }

    #[test]
    fn host_next_to_url_warns_that_the_url_wins() {
        let world = World::new();
        let path = world.home_file(".canhazgpu.yaml", "redis:\n  url: redis://a:1/0\n");
        let flags = Overrides {
            redis_host: Some("b".into()),
            ..Overrides::default()
        };
        let config = world.resolve(&flags).unwrap();
        assert_eq!(redis(&config).url.as_deref(), Some("redis://a:1/0"));
        assert_eq!(
            config.warnings,
            [format!(
                "warning: --redis-host ignored because redis.url is set ({}: key 'redis.url')",
                path.display()
            )]
        );
    }

    // --- backend selection ------------------------------------------------------

    #[test]
    fn sqlite_lives_in_the_state_dir() {
        let world = World::new();
        world.home_file(".canhazgpu.yaml", "state_dir: /data/gpu\n");
        assert_eq!(
            sqlite_path(&world.config()),
            Path::new("/data/gpu/state.db")
        );
        let flags = Overrides {
            state_dir: Some(PathBuf::from("/flag/dir")),
            ..Overrides::default()
        };
        let config = world.resolve(&flags).unwrap();
        assert_eq!(sqlite_path(&config), Path::new("/flag/dir/state.db"));
    }

    // --- the system's store and its password -----------------------------------

    fn is_system(config: &Config) -> bool {
        match &config.store {
            StoreConfig::Sqlite { system, .. } => *system,
            StoreConfig::Redis(redis) => redis.system,
        }
    }

    #[test]
    fn the_system_store_is_the_path_the_system_file_names() {
        assert!(is_system(&World::new().config()), "the default path");
        let world = World::new();
        world.system_file("config.yaml", "state_dir: /srv/gpus\n");
        assert!(is_system(&world.config()));
        let same = Overrides {
            state_dir: Some(PathBuf::from("/srv/gpus")),
            ..Overrides::default()
        };
        assert!(is_system(&world.resolve(&same).unwrap()), "the same path");
        let world = world.env("CANHAZGPU_STATE_DIR", "/srv/gpus/../gpus");
        assert!(
            !is_system(&world.config()),
            "another spelling is another path"
        );
        let world = World::new();
        world.system_file("config.yaml", "state_dir: /srv/gpus\n");
        world.home_file(".canhazgpu.yaml", "memory.threshold: 10\n");
        assert!(
            !is_system(&world.config()),
            "the default is not the system's here"
        );
    }

    #[test]
    fn a_password_file_gives_the_password() {
        let world = World::new();
        let file = world.home_file("pw", "s3cret\n");
        world.home_file(
            ".canhazgpu.yaml",
            &format!(
                "redis.url: redis://h\nredis.password_file: {}\n",
                file.display()
            ),
        );
        let config = world.config();
        assert_eq!(redis(&config).password.as_deref(), Some("s3cret"));
        assert_eq!(
            redis(&config).password_file.as_deref(),
            Some(file.as_path())
        );

        let given = world.env("CANHAZGPU_REDIS_PASSWORD", "other");
        let config = given.config();
        assert_eq!(redis(&config).password.as_deref(), Some("other"));
        assert!(
            config
                .warnings
                .iter()
                .any(|w| w.contains("ignored because redis.password is set"))
        );

        let world = World::new();
        let empty = world.home_file("pw", "\n");
        world.home_file(
            ".canhazgpu.yaml",
            &format!(
                "redis.url: redis://h\nredis.password_file: {}\n",
                empty.display()
            ),
        );
        assert_eq!(
            world.error(&Overrides::default()),
            format!("the Redis password file {} is empty", empty.display())
        );
        let world = World::new();
        world.home_file(
            ".canhazgpu.yaml",
            "redis.url: redis://h\nredis.password_file: /nonexistent/pw\n",
        );
        assert_eq!(
            world.error(&Overrides::default()),
            "cannot read the Redis password file /nonexistent/pw: no such file or directory"
        );
    }

    #[test]
    fn the_system_password_file_is_only_for_the_system_server() {
        let world = World::new();
        let file = world.system_file("pw", "s3cret\n");
        world.system_file(
            "config.yaml",
            &format!(
                "redis.url: redis://10.0.0.5:6379/0\nredis.password_file: {}\n",
                file.display()
            ),
        );
        let config = world.config();
        assert!(redis(&config).system);
        assert_eq!(redis(&config).password.as_deref(), Some("s3cret"));

        for other in [
            "redis://10.0.0.6:6379/0",
            "redis://10.0.0.5:6380/0",
            "redis://10.0.0.5:6379/1",
            "rediss://10.0.0.5:6379/0",
        ] {
            let flags = Overrides {
                redis_url: Some(other.into()),
                ..Overrides::default()
            };
            let config = world.resolve(&flags).unwrap();
            assert!(!redis(&config).system, "{other}");
            assert_eq!(redis(&config).password, None, "{other}");
        }
        // The same server, spelled in the user's own file, with the same file.
        world.home_file(
            ".canhazgpu.yaml",
            &format!(
                "redis.host: 10.0.0.5\nredis.password_file: {}\n",
                file.display()
            ),
        );
        let config = world.config();
        assert!(redis(&config).system);
        assert_eq!(redis(&config).password.as_deref(), Some("s3cret"));
    }

    #[test]
    fn a_protected_install_takes_store_wide_keys_from_the_system_file_alone() {
        let world = World::new()
            .env("CANHAZGPU_HOST_NAME", "nodeb")
            .env("CANHAZGPU_HISTORY_RETENTION_DAYS", "1");
        world.system_file("config.yaml", "host_name: nodea\n");
        let env = |name: &str| world.env.get(name).cloned();
        let resolve = |protected| {
            resolve_installed(
                &Overrides::default(),
                &env,
                Some(world.home.path()),
                world.system.path(),
                protected,
            )
            .unwrap()
        };
        let shared = resolve(false);
        assert_eq!(shared.host_name, "nodeb");
        assert_eq!(shared.history_retention_days, 1);
        let protected = resolve(true);
        assert_eq!(protected.host_name, "nodea");
        assert_eq!(
            protected.history_retention_days,
            crate::store::DEFAULT_HISTORY_RETENTION_DAYS
        );
        assert!(
            protected
                .warnings
                .iter()
                .any(|w| w.starts_with("warning: CANHAZGPU_HOST_NAME: 'host_name' is set only in")),
            "{:?}",
            protected.warnings
        );
    }

    #[test]
    fn any_redis_setting_selects_redis() {
        for key in REDIS_KEYS {
            let world = World::new();
            let password_file = world.home_file("password", "s3cret\n");
            let value = match key {
                "redis.url" => "redis://h",
                "redis.sentinels" => "h:26379",
                "redis.password_file" => password_file.to_str().unwrap(),
                _ => "1",
            };
            world.home_file(".canhazgpu.json", &format!(r#"{{"{key}": "{value}"}}"#));
            assert!(
                matches!(world.config().store, StoreConfig::Redis(_)),
                "{key}"
            );
        }
    }

    #[test]
    fn redis_defaults_when_only_the_backend_says_redis() {
        let flags = Overrides {
            backend: Some("redis".into()),
            ..Overrides::default()
        };
        let config = World::new().resolve(&flags).unwrap();
        assert_eq!(
            config.store,
            StoreConfig::Redis(RedisConfig {
                url: None,
                host: "localhost".into(),
                port: 6379,
                db: 0,
                password: None,
                password_file: None,
                system: false,
                tls: Default::default(),
                layout: RedisLayout::Fleet,
                sentinel: None,
            })
        );
    }

    #[test]
    fn explicit_sqlite_wins_over_redis_settings() {
        let world = World::new().env("CANHAZGPU_REDIS_HOST", "redis.example.com");
        world.home_file(".canhazgpu.yaml", "backend: sqlite\n");
        assert!(matches!(world.config().store, StoreConfig::Sqlite { .. }));
    }

    #[test]
    fn backend_precedence_flag_env_file() {
        let world = World::new().env("CANHAZGPU_BACKEND", "redis");
        world.home_file(".canhazgpu.yaml", "backend: sqlite\n");
        assert!(matches!(world.config().store, StoreConfig::Redis(_)));
        let flags = Overrides {
            backend: Some("sqlite".into()),
            ..Overrides::default()
        };
        let config = world.resolve(&flags).unwrap();
        assert!(matches!(config.store, StoreConfig::Sqlite { .. }));
    }

    // --- Redis Sentinel ---------------------------------------------------------

    fn sentinel(config: &Config) -> &SentinelConfig {
        redis(config)
            .sentinel
            .as_ref()
            .expect("a Sentinel configuration")
    }

    fn nodes(list: &[(&str, u16)]) -> Vec<(String, u16)> {
        list.iter()
            .map(|(host, port)| (host.to_string(), *port))
            .collect()
    }

    #[test]
    fn sentinels_from_the_environment_are_comma_separated() {
        let config = World::new()
            .env(
                "CANHAZGPU_REDIS_SENTINELS",
                "10.0.0.1:26379, sentinel-b:26380,[::1]:26381",
            )
            .config();
        assert_eq!(
            sentinel(&config),
            &SentinelConfig {
                nodes: nodes(&[("10.0.0.1", 26379), ("sentinel-b", 26380), ("::1", 26381)]),
                master: "mymaster".into(),
            }
        );
        let config = World::new()
            .env("CANHAZGPU_REDIS_SENTINELS", "s:1")
            .env("CANHAZGPU_REDIS_SENTINEL_MASTER", "gpus")
            .config();
        assert_eq!(sentinel(&config).master, "gpus");
    }

    #[test]
    fn sentinels_in_files_are_lists_or_comma_separated() {
        let expected = nodes(&[("a", 1), ("b", 2)]);
        for (name, text) in [
            (
                ".canhazgpu.yaml",
                "redis:\n  sentinels:\n    - a:1\n    - b:2\n",
            ),
            (".canhazgpu.yaml", "redis:\n  sentinels: a:1,b:2\n"),
            (
                ".canhazgpu.json",
                r#"{"redis": {"sentinels": ["a:1", "b:2"]}}"#,
            ),
            (
                ".canhazgpu.toml",
                "[redis]\nsentinels = [\"a:1\", \"b:2\"]\n",
            ),
        ] {
            let world = World::new();
            world.home_file(name, text);
            assert_eq!(sentinel(&world.config()).nodes, expected, "{text}");
        }
    }

    #[test]
    fn bad_sentinel_addresses_name_their_source() {
        let expected = "a list of sentinel addresses such as 10.0.0.1:26379,10.0.0.2:26379";
        for value in [
            "",
            "host",
            "host:0",
            "host:65536",
            "host:+1",
            ":26379",
            "a:1,",
            "a:1,,b:2",
            "::1:26379",
            "[::1:26379",
            "two words:1",
            "redis://h:1",
        ] {
            let world = World::new().env("CANHAZGPU_REDIS_SENTINELS", value);
            // An empty variable counts as unset.
            if value.is_empty() {
                assert!(matches!(world.config().store, StoreConfig::Sqlite { .. }));
                continue;
            }
            assert_eq!(
                world.error(&Overrides::default()),
                format!("CANHAZGPU_REDIS_SENTINELS: expected {expected}, got {value:?}")
            );
        }
        let world = World::new();
        let path = world.home_file(".canhazgpu.yaml", "redis:\n  sentinels: [a:1, 2]\n");
        assert_eq!(
            world.error(&Overrides::default()),
            format!(
                "{}: key 'redis.sentinels': expected {expected}, got a list of non-strings",
                path.display()
            )
        );
        std::fs::write(&path, "redis:\n  sentinels: []\n").unwrap();
        assert_eq!(
            world.error(&Overrides::default()),
            format!(
                "{}: key 'redis.sentinels': expected {expected}, got \"\"",
                path.display()
            )
        );
        let world = World::new()
            .env("CANHAZGPU_REDIS_SENTINELS", "a:1")
            .env("CANHAZGPU_REDIS_SENTINEL_MASTER", "my master");
        assert_eq!(
            world.error(&Overrides::default()),
            "CANHAZGPU_REDIS_SENTINEL_MASTER: expected a master name, got \"my master\""
        );
    }

    #[test]
    fn other_keys_take_no_list() {
        let world = World::new();
        let path = world.home_file(".canhazgpu.yaml", "redis:\n  sentinel_master: [a]\n");
        assert_eq!(
            world.error(&Overrides::default()),
            format!(
                "{}: key 'redis.sentinel_master': expected a master name, got a list",
                path.display()
            )
        );
    }

    #[test]
    fn sentinels_replace_host_and_port_with_a_warning() {
        let world = World::new().env("CANHAZGPU_REDIS_SENTINELS", "s:26379");
        let flags = Overrides {
            redis_host: Some("h".into()),
            redis_db: Some("3".into()),
            redis_password: Some("pw".into()),
            ..Overrides::default()
        };
        let config = world.resolve(&flags).unwrap();
        assert_eq!(
            config.warnings,
            [
                "warning: --redis-host ignored because redis.sentinels is set (CANHAZGPU_REDIS_SENTINELS)"
            ]
        );
        assert_eq!(
            (redis(&config).db, redis(&config).password.as_deref()),
            (3, Some("pw"))
        );
        let shown = format!("{config:?}");
        assert!(
            shown.contains("\"s\", 26379") && !shown.contains("pw"),
            "{shown}"
        );

        let config = World::new()
            .env("CANHAZGPU_REDIS_SENTINEL_MASTER", "gpus")
            .config();
        assert_eq!(
            config.warnings,
            ["warning: CANHAZGPU_REDIS_SENTINEL_MASTER ignored because redis.sentinels is not set"]
        );
        assert!(matches!(config.store, StoreConfig::Sqlite { .. }));
    }

    // --- settings for later keys -----------------------------------------------

    #[test]
    fn setting_parse_names_source_and_expectation() {
        let world = World::new().env("CANHAZGPU_MEMORY_THRESHOLD", "64");
        let config = world.config();
        let setting = &config.settings["memory.threshold"];
        assert_eq!(setting.parse(|v| v.parse::<u32>().ok()).unwrap(), 64);
        assert_eq!(
            setting.parse(|_| None::<u32>),
            Err(Error::Config(
                "CANHAZGPU_MEMORY_THRESHOLD: expected a whole number of MB, got \"64\"".into()
            ))
        );
    }
}
