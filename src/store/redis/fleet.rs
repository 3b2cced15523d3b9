//! The fleet layout's registry of hosts and their published GPU snapshots.
//!
//! `canhazgpu:hosts` maps each host with a pool to its settings, and
//! `canhazgpu:hosts:reported` to the time of its latest snapshot, so the whole fleet's
//! liveness is two hash reads. Each snapshot lives under its host's hash tag. The
//! upstream layout has one host and no registry: nobody else reads its snapshot.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::{HOSTS_KEY, Keys, REPORTED_KEY, RedisStore};
use crate::error::{Error, Result};
use crate::fleet::{DEFAULT_INTERVAL_SECS, HostRecord, HostSnapshot};
use crate::store::RedisLayout;

/// A host's entry in the registry.
#[derive(Serialize, Deserialize)]
struct Registration {
    interval_secs: u64,
}

fn registration(interval_secs: u64) -> String {
    serde_json::to_string(&Registration { interval_secs }).expect("plain JSON")
}

/// Adds `host` to the registry as part of the transaction that creates its pool
/// (keeping the settings of a host that is re-initialised).
pub(super) fn register(tx: &mut redis::Pipeline, host: &str) {
    tx.hset_nx(HOSTS_KEY, host, registration(DEFAULT_INTERVAL_SECS))
        .ignore();
}

/// Takes `host` out of the registry and drops its snapshot, as part of the
/// transaction that removes its pool.
pub(super) fn unregister(tx: &mut redis::Pipeline, host: &str, keys: &Keys) {
    tx.hdel(HOSTS_KEY, host).ignore();
    tx.hdel(REPORTED_KEY, host).ignore();
    tx.del(keys.snapshot()).ignore();
}

pub(super) fn hosts(store: &mut RedisStore) -> Result<Vec<HostRecord>> {
    if store.layout == RedisLayout::Upstream {
        return Ok(match crate::store::Store::pool(store)? {
            Some(_) => vec![HostRecord {
                name: store.host.clone(),
                reported_at: None,
                interval_secs: DEFAULT_INTERVAL_SECS,
            }],
            None => Vec::new(),
        });
    }
    let (registered, reported): (HashMap<String, String>, HashMap<String, String>) =
        store.call(|connection| {
            redis::pipe()
                .hgetall(HOSTS_KEY)
                .hgetall(REPORTED_KEY)
                .query(connection)
        })?;
    let mut hosts: Vec<HostRecord> = registered
        .into_iter()
        .map(|(name, settings)| {
            let interval_secs = serde_json::from_str::<Registration>(&settings)
                .map_or(DEFAULT_INTERVAL_SECS, |r| r.interval_secs);
            HostRecord {
                // An unreadable time counts as never reported.
                reported_at: reported.get(&name).and_then(|at| at.parse().ok()),
                name,
                interval_secs,
            }
        })
        .collect();
    hosts.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(hosts)
}

pub(super) fn publish(
    store: &mut RedisStore,
    snapshot: &HostSnapshot,
    interval_secs: Option<u64>,
) -> Result<()> {
    if store.layout == RedisLayout::Upstream {
        return Ok(());
    }
    let json = serde_json::to_string(snapshot).expect("plain JSON");
    let mut writes = redis::pipe();
    writes
        .set(store.keys.snapshot(), json)
        .ignore()
        .hset(REPORTED_KEY, &store.selected, snapshot.taken_at)
        .ignore();
    if let Some(interval) = interval_secs {
        writes
            .hset(HOSTS_KEY, &store.selected, registration(interval))
            .ignore();
    }
    store.call(|connection| writes.query::<()>(connection))
}

pub(super) fn snapshot(store: &mut RedisStore) -> Result<Option<HostSnapshot>> {
    if store.layout == RedisLayout::Upstream {
        return Ok(None);
    }
    let key = store.keys.snapshot();
    let raw: Option<String> =
        store.call(|connection| redis::cmd("GET").arg(&key).query(connection))?;
    // An unreadable snapshot is as good as none: the host counts as not reporting.
    Ok(raw.and_then(|raw| serde_json::from_str(&raw).ok()))
}

/// Why the selected host has no pool.
pub(super) fn missing_pool(store: &mut RedisStore) -> Result<Error> {
    if store.layout == RedisLayout::Upstream {
        return Ok(Error::NotInitialized);
    }
    if store.selected != store.host {
        let known: Vec<String> = hosts(store)?.into_iter().map(|host| host.name).collect();
        return Ok(Error::NoPool(match known.is_empty() {
            true => format!(
                "unknown host '{}': the fleet has no hosts yet",
                store.selected
            ),
            false => format!(
                "unknown host '{}': the fleet has {}",
                store.selected,
                known.join(", ")
            ),
        }));
    }
    let upstream_count = Keys::upstream().gpu_count();
    let upstream: bool =
        store.call(|connection| redis::cmd("EXISTS").arg(&upstream_count).query(connection))?;
    if upstream {
        return Ok(Error::NoPool(format!(
            "no GPU pool for host '{}' in the fleet layout, but this Redis database holds \
             an upstream canhazgpu pool ({upstream_count}): set redis.layout: upstream \
             (CANHAZGPU_REDIS_LAYOUT=upstream) to use it, or run 'canhazgpu admin --gpus \
             <count>' to create this host's pool",
            store.host
        )));
    }
    let others: Vec<String> = hosts(store)?.into_iter().map(|host| host.name).collect();
    Ok(match others.is_empty() {
        true => Error::NotInitialized,
        // A login node without GPUs: point at the fleet.
        false => Error::NoPool(format!(
            "GPU pool not initialized for host '{}' - run 'canhazgpu admin --gpus <count>' \
             to create it, or use --all or --host NAME for the fleet ({})",
            store.host,
            others.join(", ")
        )),
    })
}

impl RedisStore {
    /// After a retirement: the host's remaining keys (last uses), except its
    /// history, which `report` still counts.
    pub(super) fn remove_leftovers(&mut self) -> Result<()> {
        if self.layout == RedisLayout::Upstream {
            return Ok(());
        }
        let pattern = format!("{}*", self.keys.prefix);
        let history = self.keys.history();
        let mut cursor: u64 = 0;
        loop {
            let (next, found): (u64, Vec<String>) = self.call(|connection| {
                redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000)
                    .query(connection)
            })?;
            let doomed: Vec<String> = found.into_iter().filter(|key| *key != history).collect();
            if !doomed.is_empty() {
                self.call(|connection| redis::cmd("DEL").arg(&doomed).query::<()>(connection))?;
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }
}
