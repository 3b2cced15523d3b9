//! Reaching Redis: connection settings from the configuration, and messages that
//! name the server without its password.

use std::fmt::Display;

use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo, RedisError, RedisResult};

use crate::error::Error;
use crate::store::RedisConfig;

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

pub(super) fn connect_error(location: &str, err: RedisError) -> Error {
    Error::Store(format!(
        "failed to connect to Redis at {location}: {}",
        one_line(&err)
    ))
}

/// The configured Redis as a URL without password, for messages.
pub(super) fn display_location(config: &RedisConfig) -> String {
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
            layout: crate::store::RedisLayout::Fleet,
        };
        assert_eq!(display_location(&config), "redis://[::1]:6379/4");
    }
}
