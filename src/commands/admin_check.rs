//! `canhazgpu admin --check`: which trust mode is in force, and whether the store's
//! files match it. Any user may ask; the report goes to stdout, and a mismatch exits 1.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::output;
use crate::privilege;
use crate::store::{RedisConfig, StoreConfig};

pub fn execute(config: &Config) -> Result<()> {
    let protected = privilege::protected_install();
    let mut lines = vec![format!(
        "Mode: {}",
        if protected { "protected" } else { "shared" }
    )];
    lines.push(format!("Binary: {}", binary_line()));
    let mut problems = Vec::new();
    match &config.store {
        StoreConfig::Sqlite { path, system } => {
            lines.push(format!("Store: {}", sqlite_line(path, *system)));
            problems.extend(sqlite_problems(path, *system, protected));
        }
        StoreConfig::Redis(redis) => {
            lines.push(format!("Store: {}", redis_line(redis)));
            problems.extend(redis_problems(config, redis, protected));
        }
    }
    lines.push(
        match protected {
            true => "Users change the store only through canhazgpu, which acts as their real user.",
            false => {
                "Every user can also change the store directly (sqlite3, redis-cli); see \"Trust model\" in the README to protect it."
            }
        }
        .to_owned(),
    );
    lines.extend(problems.iter().map(|problem| format!("Problem: {problem}")));
    output::print(&lines.join("\n"))?;
    match problems.len() {
        0 => Ok(()),
        count => Err(Error::Runtime(format!(
            "the store does not match the {} mode ({count} problem(s) above)",
            if protected { "protected" } else { "shared" }
        ))),
    }
}

fn binary_line() -> String {
    let path = std::env::current_exe()
        .map(|path| path.display().to_string())
        .unwrap_or_else(|_| "canhazgpu".into());
    let state = match (privilege::group_gid(), privilege::binary_is_setgid()) {
        (None, _) => format!("not setgid (there is no group {})", privilege::GROUP),
        (Some(_), true) if privilege::available() => format!("setgid {}", privilege::GROUP),
        (Some(_), true) => format!(
            "setgid {}, but started without it (a nosuid mount?)",
            privilege::GROUP
        ),
        (Some(_), false) => format!("not setgid {}", privilege::GROUP),
    };
    format!("{path} ({state})")
}

/// `owner:group MODE` of a file, read with the privilege for the system's store.
fn describe(path: &Path, system: bool) -> Option<String> {
    let meta = read_meta(path, system)?;
    let name_of_user = nix::unistd::User::from_uid(meta.uid().into())
        .ok()
        .flatten()
        .map_or_else(|| meta.uid().to_string(), |user| user.name);
    let name_of_group = nix::unistd::Group::from_gid(meta.gid().into())
        .ok()
        .flatten()
        .map_or_else(|| meta.gid().to_string(), |group| group.name);
    Some(format!(
        "{name_of_user}:{name_of_group} {:04o}",
        meta.mode() & 0o7777
    ))
}

fn read_meta(path: &Path, system: bool) -> Option<fs::Metadata> {
    privilege::with_privilege_if(system, || fs::metadata(path).ok())
}

/// Whether `path` exists, when that can be known.
fn exists(path: &Path, system: bool) -> Option<bool> {
    privilege::with_privilege_if(system, || path.try_exists().ok())
}

fn parent(path: &Path) -> &Path {
    path.parent()
        .filter(|dir| !dir.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

fn sqlite_line(path: &Path, system: bool) -> String {
    let shown = |path: &Path| {
        describe(path, system).unwrap_or_else(|| match exists(path, system) {
            Some(false) => "missing".into(),
            _ => "not visible to you".into(),
        })
    };
    let (dir, file) = (shown(parent(path)), shown(path));
    let whose = match system {
        true => "",
        false => ", not the one the system configuration names",
    };
    format!(
        "{} (directory {dir}, database {file}{whose})",
        path.display()
    )
}

fn sqlite_problems(path: &Path, system: bool, protected: bool) -> Vec<String> {
    let (dir, file) = (read_meta(parent(path), system), read_meta(path, system));
    let group = privilege::group_gid().map(|gid| gid.as_raw());
    let is_protected = |meta: &Option<fs::Metadata>, mode: u32| {
        meta.as_ref()
            .is_some_and(|m| m.uid() == 0 && Some(m.gid()) == group && m.mode() & 0o7777 == mode)
    };
    let laid_protected = is_protected(&dir, 0o2770) && is_protected(&file, 0o660);
    let fix = "run 'sudo canhazgpu admin --gpus <count>' with this binary";
    let mut problems = Vec::new();
    let dir_protected = dir
        .as_ref()
        .is_some_and(|m| Some(m.gid()) == group && m.mode() & 0o007 == 0);
    if !protected && dir_protected {
        problems.push(format!(
            "the store is protected but this binary is not setgid {}: users cannot open it",
            privilege::GROUP
        ));
    } else if file.is_none() {
        problems.push(format!("there is no store yet: {fix}"));
    } else if protected && system && !laid_protected {
        problems.push(format!(
            "the store's files are not root:{} (directory 2770, database 0660), so users can \
             reach them directly: {fix}",
            privilege::GROUP
        ));
    } else if protected && !system {
        problems.push(
            "this store is not the one the system configuration names, so canhazgpu opens it \
             without the privilege and users can reach it directly"
                .into(),
        );
    } else if !protected
        && dir
            .as_ref()
            .is_some_and(|m| Some(m.gid()) == group && m.mode() & 0o007 == 0)
    {
        problems.push(format!(
            "the store is protected but this binary is not setgid {}: users cannot open it",
            privilege::GROUP
        ));
    }
    problems
}

fn redis_line(redis: &RedisConfig) -> String {
    let password = match (&redis.password_file, &redis.password) {
        (Some(file), _) => format!(
            ", password from {} ({})",
            file.display(),
            describe(file, redis.system).unwrap_or_else(|| "unreadable".into())
        ),
        (None, Some(_)) => ", password in the configuration".into(),
        (None, None) => ", no password".into(),
    };
    let client = match &redis.tls.client_key {
        Some(key) => format!(
            ", client key {} ({})",
            key.display(),
            describe(key, redis.system).unwrap_or_else(|| "unreadable".into())
        ),
        None => String::new(),
    };
    let whose = match redis.system {
        true => "",
        false => ", not the server the system configuration names",
    };
    format!(
        "Redis {}{password}{client}{whose}",
        crate::store::redis::display_location(redis)
    )
}

fn redis_problems(config: &Config, redis: &RedisConfig, protected: bool) -> Vec<String> {
    if !protected {
        return Vec::new();
    }
    let mut problems = Vec::new();
    if !redis.system {
        problems.push(
            "this is not the Redis server the system configuration names, so the protected \
             password is not used for it"
                .into(),
        );
        return problems;
    }
    let secrets = [
        ("password file", redis.password_file.as_deref()),
        ("TLS client key", redis.tls.client_key.as_deref()),
    ];
    let group = privilege::group_gid().map(|gid| gid.as_raw());
    for (what, file) in secrets {
        let Some(file) = file else { continue };
        let readable_by_others = read_meta(file, redis.system)
            .is_some_and(|m| m.mode() & 0o004 != 0 || Some(m.gid()) != group);
        if readable_by_others {
            problems.push(format!(
                "the {what} {} should be root:{} 0640: other users can read it",
                file.display(),
                privilege::GROUP
            ));
        }
    }
    match (&redis.password_file, &redis.tls.client_key) {
        (Some(_), _) | (None, Some(_)) => {}
        (None, None) => {
            let inline = config
                .settings
                .get("redis.password")
                .map(|setting| setting.source.to_string());
            problems.push(match inline {
                Some(source) => format!(
                    "the Redis password is given by {source}, which other users can read: put it in a root:{} 0640 file named by redis.password_file",
                    privilege::GROUP
                ),
                None => format!(
                    "no redis.password_file: every user can reach the Redis server with redis-cli unless it asks for a password kept in a root:{} 0640 file",
                    privilege::GROUP
                ),
            });
        }
    }
    problems
}
