//! The fleet layout's registry of hosts and their published GPU snapshots.
//!
//! `canhazgpu:hosts` maps each host with a pool to its settings, and
//! `canhazgpu:hosts:reported` to the time of its latest snapshot, so the whole fleet's
//! liveness is two hash reads. Each snapshot lives under its host's hash tag. The
//! upstream layout has one host and no registry: nobody else reads its snapshot.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::transaction::{decode, decode_pool};
use super::{HOSTS_KEY, Keys, REPORTED_KEY, RedisStore, codec};
use crate::error::{Error, Result};
use crate::fleet::{DEFAULT_INTERVAL_SECS, HostRecord, HostSnapshot};
use crate::pool::PoolState;
use crate::state::Pool;
use crate::store::{HostData, PoolView, RedisLayout};

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

/// `Store::host_views` in three pipelined round trips for any number of hosts: the
/// pools and snapshots, the GPUs, and (rarely) the queue entries collecting on them.
/// A host with GPU keys of the wrong type is read on its own, as `read_view` does.
pub(super) fn host_views(
    store: &mut RedisStore,
    names: &[String],
) -> Result<Vec<Result<HostData>>> {
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let keys: Vec<Keys> = names.iter().map(|name| Keys::fleet(name)).collect();
    let mut first = redis::pipe();
    for host in &keys {
        first
            .cmd("MGET")
            .arg(host.gpu_count())
            .arg(host.provider())
            .cmd("GET")
            .arg(host.snapshot());
    }
    first.ignore_errors();
    let replies: Vec<redis::Value> = store.call(|connection| first.query(connection))?;
    let mut views: Vec<Result<(Pool, Option<HostSnapshot>)>> = Vec::with_capacity(names.len());
    for ((name, host), reply) in names.iter().zip(&keys).zip(replies.chunks(2)) {
        let pool = decode::<(Option<String>, Option<String>)>(&reply[0])
            .and_then(|(count, provider)| decode_pool(host, count, provider))
            .and_then(|pool| {
                pool.ok_or_else(|| Error::NoPool(format!("host '{name}' has no GPU pool")))
            });
        let snapshot = decode::<Option<String>>(&reply[1])
            .ok()
            .flatten()
            .and_then(|raw| serde_json::from_str(&raw).ok());
        views.push(pool.map(|pool| (pool, snapshot)));
    }

    let gpu_keys: Vec<Vec<String>> = views
        .iter()
        .zip(&keys)
        .map(|(view, host)| match view {
            Ok((pool, _)) => (0..pool.gpu_count).map(|id| host.gpu(id)).collect(),
            Err(_) => Vec::new(),
        })
        .collect();
    let mut second = redis::pipe();
    for host_keys in gpu_keys.iter().filter(|keys| !keys.is_empty()) {
        second.cmd("MGET").arg(host_keys);
        // Values missing from MGET: truly absent, or keys of another type.
        second.cmd("EXISTS").arg(host_keys);
    }
    second.ignore_errors();
    let mut replies: std::vec::IntoIter<redis::Value> = match gpu_keys.iter().all(Vec::is_empty) {
        true => Vec::new().into_iter(),
        false => store
            .call(|connection| second.query::<Vec<redis::Value>>(connection))?
            .into_iter(),
    };
    // `None`: read that host on its own (a GPU key holds no string; `read_view`
    // names it), or nothing to read (no pool).
    let mut states: Vec<Option<PoolState>> = Vec::with_capacity(names.len());
    for (view, host_keys) in views.iter().zip(&gpu_keys) {
        if view.is_err() {
            states.push(None);
            continue;
        }
        let (values, existing) = (replies.next(), replies.next());
        let values: Option<Vec<Option<String>>> = values.and_then(|v| decode(&v).ok());
        let existing: Option<usize> = existing.and_then(|v| decode(&v).ok());
        states.push(match (values, existing) {
            (Some(values), Some(existing))
                if values.len() == host_keys.len()
                    && existing == values.iter().filter(|value| value.is_some()).count() =>
            {
                let mut state = PoolState::default();
                for (id, raw) in (0..).zip(&values) {
                    let (slot, partial) = codec::decode_slot(id, raw.as_deref());
                    if let Some(entry) = partial {
                        state.partials.insert(id, entry);
                    }
                    state.slots.push(slot);
                }
                Some(state)
            }
            _ => None,
        });
    }

    let mut third = redis::pipe();
    let mut asked = false;
    for (state, host) in states.iter().zip(&keys) {
        if let Some(state) = state {
            let ids = state.collector_ids();
            if !ids.is_empty() {
                let entry_keys: Vec<String> = ids.iter().map(|id| host.entry(id)).collect();
                third.cmd("MGET").arg(entry_keys);
                asked = true;
            }
        }
    }
    third.ignore_errors();
    let mut entries = match asked {
        false => Vec::new().into_iter(),
        true => store
            .call(|connection| third.query::<Vec<redis::Value>>(connection))?
            .into_iter(),
    };

    let mut answers = Vec::with_capacity(names.len());
    for ((name, view), state) in names.iter().zip(views).zip(states) {
        let (pool, snapshot) = match view {
            Ok(found) => found,
            Err(err) => {
                answers.push(Err(err));
                continue;
            }
        };
        let view = match state {
            Some(mut state) => {
                let ids = state.collector_ids();
                if !ids.is_empty() {
                    let raw: Vec<Option<String>> = entries
                        .next()
                        .map(|reply| decode(&reply))
                        .transpose()?
                        .unwrap_or_default();
                    state.queue = ids
                        .iter()
                        .zip(raw)
                        .filter_map(|(id, raw)| codec::decode_entry(id, raw.as_deref()?))
                        .collect();
                }
                state.link_partials();
                Ok(PoolView {
                    slots: state.slots,
                    collecting: state.queue,
                })
            }
            None => {
                let selected = store.selected.clone();
                crate::store::Store::select_host(store, name)?;
                let view = crate::store::Store::pool_view(store);
                crate::store::Store::select_host(store, &selected)?;
                view
            }
        };
        answers.push(view.map(|view| HostData {
            pool,
            view,
            snapshot,
        }));
    }
    Ok(answers)
}
