//! Reaching Redis: connection settings from the configuration, and messages that
//! name the server without its password.

use std::fmt::Display;

use redis::{
    Client, Connection, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, RedisError, RedisResult,
};

use super::sentinel::{self, Sentinels};
use super::{CONNECT_TIMEOUT, IO_TIMEOUT};
use crate::error::Error;
use crate::store::RedisConfig;

/// Where new connections go: the configured server, or the master the sentinels name.
#[derive(Clone)]
pub(super) enum Server {
    Direct(Client),
    Sentinel(Sentinels),
}

/// Why a connection could not be opened.
pub(super) struct Refused {
    pub error: Error,
    /// A failover under way may explain it: the sentinels may name a master soon.
    pub failing_over: bool,
}

impl Server {
    pub(super) fn new(config: &RedisConfig) -> RedisResult<Server> {
        let client = client(config)?;
        Ok(match &config.sentinel {
            None => Server::Direct(client),
            // The master's settings, TLS material included, for whichever master.
            Some(sentinel) => Server::Sentinel(Sentinels::new(
                &sentinel.nodes,
                &sentinel.master,
                client.get_connection_info().clone(),
            )),
        })
    }

    /// A connection with the store's timeouts (3 s to connect, 5 s per reply), and
    /// the master's address when the sentinels named it.
    pub(super) fn open(&self, location: &str) -> Result<(Connection, Option<String>), Refused> {
        match self {
            Server::Direct(client) => client
                .get_connection_with_timeout(CONNECT_TIMEOUT)
                .and_then(|connection| {
                    connection.set_read_timeout(Some(IO_TIMEOUT))?;
                    connection.set_write_timeout(Some(IO_TIMEOUT))?;
                    Ok((connection, None))
                })
                .map_err(|err| Refused {
                    error: connect_error(location, err),
                    failing_over: false,
                }),
            Server::Sentinel(sentinels) => sentinels
                .connect(CONNECT_TIMEOUT, IO_TIMEOUT)
                .map(|(connection, master)| (connection, Some(master)))
                .map_err(|unresolved| Refused {
                    error: Error::Store(format!(
                        "failed to connect to Redis: {}",
                        unresolved.message
                    )),
                    failing_over: unresolved.failing_over,
                }),
        }
    }

    /// Whether a lost connection may be followed to a new master.
    pub(super) fn follows_failover(&self) -> bool {
        matches!(self, Server::Sentinel(_))
    }
}

/// A client for the configured server, with the `redis.tls_*` CA and client
/// certificate when there are any.
fn client(config: &RedisConfig) -> RedisResult<Client> {
    let info = connection_info(config)?;
    let tls = &config.tls;
    if tls.ca.is_none() && tls.client.is_none() {
        return Client::open(info);
    }
    let certificates = redis::TlsCertificates {
        client_tls: tls
            .client
            .as_ref()
            .map(|(cert, key)| redis::ClientTlsConfig {
                client_cert: cert.clone(),
                client_key: key.clone(),
            }),
        root_cert: tls.ca.clone(),
    };
    Client::build_with_tls(info, certificates)
}

pub(super) fn connection_info(config: &RedisConfig) -> RedisResult<ConnectionInfo> {
    let info = match &config.url {
        Some(url) => url.as_str().into_connection_info()?,
        None => ConnectionAddr::Tcp(config.host.clone(), config.port).into_connection_info()?,
    };
    let mut settings = info.redis_settings().clone();
    if config.url.is_none() {
        settings = settings.set_db(config.db);
    }
    if let Some(password) = &config.password {
        settings = settings.set_password(password);
    }
    Ok(info.set_redis_settings(settings))
}

/// Whether two configurations reach the same server (address, TLS verification,
/// user and database; the same sentinels and master), passwords aside.
pub fn same_server(a: &RedisConfig, b: &RedisConfig) -> bool {
    let target = |config: &RedisConfig| {
        let info = connection_info(&RedisConfig {
            password: None,
            password_file: None,
            system: false,
            tls: Default::default(),
            ..config.clone()
        })
        .ok()?;
        let settings = info.redis_settings();
        Some((
            info.addr().clone(),
            settings.db(),
            settings.username().map(str::to_owned),
            config.sentinel.clone(),
        ))
    };
    target(a).is_some_and(|a| Some(a) == target(b))
}

/// Whether the server is reached over TLS (`rediss://`).
pub fn uses_tls(config: &RedisConfig) -> bool {
    connection_info(config).is_ok_and(|info| matches!(info.addr(), ConnectionAddr::TcpTls { .. }))
}

/// Whether the URL itself carries a password.
pub fn url_has_password(config: &RedisConfig) -> bool {
    config
        .url
        .as_deref()
        .and_then(|url| url.into_connection_info().ok())
        .is_some_and(|info| info.redis_settings().password().is_some())
}

/// A write refused because the server is a replica now (a failover demoted it).
pub(super) fn read_only(err: &RedisError) -> bool {
    err.clone()
        .into_server_errors()
        .is_some_and(|errors| errors.iter().any(|(_, error)| error.code() == "READONLY"))
}

pub(super) fn connect_error(location: &str, err: RedisError) -> Error {
    Error::Store(format!(
        "failed to connect to Redis at {location}: {}",
        one_line(&err)
    ))
}

/// The configured Redis as a URL without password, for messages.
pub fn display_location(config: &RedisConfig) -> String {
    if let Some(sentinel) = &config.sentinel {
        return sentinel::location(sentinel);
    }
    match &config.url {
        Some(url) => without_password(url),
        None if config.host.contains(':') => {
            format!("redis://[{}]:{}/{}", config.host, config.port, config.db)
        }
        None => format!("redis://{}:{}/{}", config.host, config.port, config.db),
    }
}

/// Drops the password from a Redis URL: `redis://user:secret@host` → `redis://user@host`,
/// and `?pass=`/`?password=` query parameters (Unix-socket URLs).
pub fn without_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let rest = match rest.rfind('@') {
        Some(at) if !rest.starts_with('/') => {
            let (userinfo, host) = (&rest[..at], &rest[at..]);
            match userinfo.split_once(':') {
                Some(("", _)) => host[1..].to_string(),
                Some((user, _)) => format!("{user}{host}"),
                None => rest.to_string(),
            }
        }
        _ => rest.to_string(),
    };
    let rest = match rest.split_once('?') {
        Some((path, query)) => {
            let kept: Vec<&str> = query
                .split('&')
                .filter(|param| {
                    let key = param.split('=').next().unwrap_or_default();
                    key != "pass" && key != "password"
                })
                .collect();
            if kept.is_empty() {
                path.to_string()
            } else {
                format!("{path}?{}", kept.join("&"))
            }
        }
        None => rest,
    };
    format!("{scheme}://{rest}")
}

pub(super) fn one_line(err: &impl Display) -> String {
    err.to_string()
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_hidden_from_locations() {
        for (url, shown) in [
            (
                "redis://alice:s3cret@db.example:6380/2",
                "redis://alice@db.example:6380/2",
            ),
            ("redis://:s3cret@db.example", "redis://db.example"),
            ("rediss://alice@db.example", "rediss://alice@db.example"),
            (
                "redis+unix:///run/r.sock?db=3&pass=s3cret",
                "redis+unix:///run/r.sock?db=3",
            ),
            (
                "redis+unix:///run/r.sock?password=s3cret",
                "redis+unix:///run/r.sock",
            ),
            ("redis://:p@ss/w@rd@host/0", "redis://host/0"),
        ] {
            assert_eq!(without_password(url), shown, "{url}");
        }
        let config = RedisConfig {
            url: None,
            host: "::1".into(),
            port: 6379,
            db: 4,
            password: Some("s3cret".into()),
            password_file: None,
            system: false,
            tls: Default::default(),
            layout: crate::store::RedisLayout::Fleet,
            sentinel: None,
        };
        assert_eq!(display_location(&config), "redis://[::1]:6379/4");
    }
}
