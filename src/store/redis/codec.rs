//! The JSON canhazgpu keeps in Redis, in upstream canhazgpu v1.1.x's formats: GPU
//! states, queue entries and history records. Readers accept every encoding upstream
//! writes (integer or float seconds, numeric strings, RFC 3339 with any offset, nulls);
//! writers use integer Unix seconds and omit absent fields.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::pool::HistoryEntry;
use crate::queue::QueueEntry;
use crate::state::{
    GpuSlot, Reservation, ReservationKind, RunOwner, Selection, UnixTime, UsageRecord,
};

/// A time as upstream stores it: seconds (fraction truncated), as a number or numeric
/// string, or RFC 3339 with any offset. `Some(None)` for null, absent or "".
pub(super) fn parse_time(value: Option<&Value>) -> Option<Option<UnixTime>> {
    let seconds = |float: f64| float.is_finite().then_some(float.trunc() as UnixTime);
    match value {
        None | Some(Value::Null) => Some(None),
        Some(Value::Number(number)) => number
            .as_i64()
            .or_else(|| seconds(number.as_f64()?))
            .map(Some),
        Some(Value::String(text)) if text.is_empty() => Some(None),
        Some(Value::String(text)) => text
            .parse()
            .ok()
            .or_else(|| seconds(text.parse().ok()?))
            .or_else(|| Some(text.parse::<jiff::Timestamp>().ok()?.as_second()))
            .map(Some),
        Some(_) => None,
    }
}

/// A string field: `Ok(None)` when absent, null or empty.
fn text<'a>(doc: &'a Map<String, Value>, field: &str) -> Result<Option<&'a str>, String> {
    match doc.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) if text.is_empty() => Ok(None),
        Some(Value::String(text)) => Ok(Some(text)),
        Some(_) => Err(format!("field '{field}' is not a string")),
    }
}

/// A non-negative whole number field of at most `max`.
fn count(doc: &Map<String, Value>, field: &str, max: u64) -> Result<Option<u64>, String> {
    match doc.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => value
            .as_u64()
            .or_else(|| {
                value
                    .as_f64()
                    .filter(|f| f.fract() == 0.0 && *f >= 0.0)
                    .map(|f| f as u64)
            })
            .filter(|n| *n <= max)
            .map(Some)
            .ok_or_else(|| format!("field '{field}' is not a non-negative integer")),
    }
}

fn time(doc: &Map<String, Value>, field: &str) -> Result<Option<UnixTime>, String> {
    parse_time(doc.get(field)).ok_or_else(|| format!("field '{field}' is not a time"))
}

fn object(raw: &str) -> Result<Map<String, Value>, String> {
    match serde_json::from_str(raw) {
        Ok(Value::Object(doc)) => Ok(doc),
        Ok(_) => Err("not a JSON object".into()),
        Err(_) => Err("invalid JSON".into()),
    }
}

/// A GPU key's value (absent: free and never used), and the queue entry its partial
/// reservation was collected for.
pub(super) fn decode_slot(gpu: u32, raw: Option<&str>) -> (GpuSlot, Option<String>) {
    let Some(raw) = raw else {
        return (
            GpuSlot::Free {
                last_released: None,
            },
            None,
        );
    };
    decode_state(raw).unwrap_or_else(|why| {
        (
            GpuSlot::Corrupt(format!("corrupted GPU state for GPU {gpu}: {why}")),
            None,
        )
    })
}

fn decode_state(raw: &str) -> Result<(GpuSlot, Option<String>), String> {
    let doc = object(raw)?;
    let user = text(&doc, "user")?;
    let actual_user = text(&doc, "actual_user")?;
    let kind = text(&doc, "type")?;
    let note = text(&doc, "note")?;
    let adopted = text(&doc, "adopted")?;
    let reservation_id = text(&doc, "reservation_id")?;
    let host = text(&doc, "host")?;
    let partial = text(&doc, "partial_queue_id")?;
    let start_time = time(&doc, "start_time")?;
    let last_heartbeat = time(&doc, "last_heartbeat")?;
    let expiry_time = time(&doc, "expiry_time")?;
    let last_released = time(&doc, "last_released")?;
    let pid = count(&doc, "pid", u64::from(u32::MAX))?;
    // 14 digits: the most a JSON number keeps exactly in every upstream reader.
    let pid_start = count(&doc, "pid_start_time", 99_999_999_999_999)?;
    let Some(user) = user else {
        return Ok((GpuSlot::Free { last_released }, None));
    };
    let kind = ReservationKind::parse(kind.unwrap_or_default())
        .ok_or_else(|| format!("unknown reservation type '{}'", kind.unwrap_or_default()))?;
    let start_time = start_time.ok_or("reservation without start_time")?;
    let owner = match (host, pid, pid_start) {
        (Some(host), Some(pid), Some(pid_start)) => Some(RunOwner {
            host: host.to_string(),
            pid: pid as u32,
            pid_start,
        }),
        (Some(_), _, _) => return Err("run owner without pid and pid_start_time".into()),
        (None, _, _) => None,
    };
    let reservation = Reservation {
        id: reservation_id.unwrap_or_default().to_string(),
        user: user.to_string(),
        actual_user: actual_user.unwrap_or_default().to_string(),
        kind,
        start_time,
        last_heartbeat,
        expiry_time,
        note: note.map(str::to_string),
        owner,
        adopted: adopted.map(str::to_string),
        // Measurements only: an unreadable one is dropped, not the reservation.
        activity: doc
            .get("activity")
            .and_then(|value| serde_json::from_value(value.clone()).ok()),
    };
    Ok((GpuSlot::Held(reservation), partial.map(str::to_string)))
}

/// A run owner as stored in GPU states and queue entries.
#[derive(Serialize)]
struct StoredOwner<'a> {
    host: &'a str,
    pid: u32,
    pid_start_time: u64,
}

impl<'a> StoredOwner<'a> {
    fn of(owner: Option<&'a RunOwner>) -> Option<Self> {
        owner.map(|owner| StoredOwner {
            host: &owner.host,
            pid: owner.pid,
            pid_start_time: owner.pid_start,
        })
    }
}

/// A held GPU's state: upstream's fields plus the reservation ID, the run owner and,
/// for a partial reservation, `partial_queue_id` (upstream's name).
#[derive(Serialize)]
struct StoredReservation<'a> {
    user: &'a str,
    actual_user: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    start_time: UnixTime,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_heartbeat: Option<UnixTime>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expiry_time: Option<UnixTime>,
    #[serde(skip_serializing_if = "Option::is_none")]
    note: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reservation_id: Option<&'a str>,
    /// The run owner, as `host`, `pid` and `pid_start_time`.
    #[serde(flatten)]
    owner: Option<StoredOwner<'a>>,
    /// The adopted process's name (`adopt`).
    #[serde(skip_serializing_if = "Option::is_none")]
    adopted: Option<&'a str>,
    /// The agent's measurements (`Activity`).
    #[serde(skip_serializing_if = "Option::is_none")]
    activity: Option<&'a crate::state::Activity>,
    #[serde(skip_serializing_if = "Option::is_none")]
    partial_queue_id: Option<&'a str>,
}

pub(super) fn encode_held(reservation: &Reservation, collected_for: Option<&str>) -> String {
    let owner = reservation.owner.as_ref();
    let stored = StoredReservation {
        user: &reservation.user,
        actual_user: &reservation.actual_user,
        kind: reservation.kind.as_str(),
        start_time: reservation.start_time,
        last_heartbeat: reservation.last_heartbeat,
        expiry_time: reservation.expiry_time,
        note: reservation.note.as_deref().filter(|note| !note.is_empty()),
        reservation_id: Some(reservation.id.as_str()).filter(|id| !id.is_empty()),
        owner: StoredOwner::of(owner),
        adopted: reservation.adopted.as_deref(),
        activity: reservation.activity.as_deref(),
        partial_queue_id: collected_for,
    };
    serde_json::to_string(&stored).unwrap_or_default()
}

pub(super) fn encode_released(at: UnixTime) -> String {
    serde_json::json!({ "last_released": at }).to_string()
}

/// A queue entry (`canhazgpu:queue:entry:<id>`), or `None` when it cannot be read.
/// Upstream entries have no waiter fields and keep the length of a manual reservation
/// in `expiry_duration` (nanoseconds); ours use `duration_seconds`.
pub(super) fn decode_entry(id: &str, raw: &str) -> Option<QueueEntry> {
    let doc = object(raw).ok()?;
    let user = text(&doc, "user").ok()??.to_string();
    let actual_user = text(&doc, "actual_user")
        .ok()?
        .map_or_else(|| user.clone(), str::to_string);
    let kind = ReservationKind::parse(text(&doc, "reservation_type").ok()??)?;
    let number = |field: &str| count(&doc, field, u64::MAX).ok();
    let selection = match doc.get("requested_ids") {
        Some(Value::Array(ids)) if !ids.is_empty() => Selection::Ids(
            ids.iter()
                .map(|id| id.as_u64().and_then(|id| u32::try_from(id).ok()))
                .collect::<Option<_>>()?,
        ),
        None | Some(Value::Null) | Some(Value::Array(_)) => {
            Selection::Count(u32::try_from(number("requested_count")??).ok()?)
        }
        Some(_) => return None,
    };
    if selection.is_empty() {
        return None;
    }
    let duration = match kind {
        ReservationKind::Manual => match number("duration_seconds")? {
            Some(seconds) => Some(i64::try_from(seconds).ok()?),
            None => number("expiry_duration")?.map(|ns| (ns / 1_000_000_000) as i64),
        },
        ReservationKind::Run => None,
    };
    let process = |host: &str, pid: &str, start: &str| -> Option<Option<RunOwner>> {
        let host = text(&doc, host).ok()?;
        let pid = number(pid)?;
        let start = number(start)?;
        Some(match (host, pid, start) {
            (Some(host), Some(pid), Some(start)) => Some(RunOwner {
                host: host.to_string(),
                pid: u32::try_from(pid).ok()?,
                pid_start: start,
            }),
            _ => None,
        })
    };
    let enqueue_time = parse_time(doc.get("enqueue_time"))?;
    let last_heartbeat = parse_time(doc.get("last_heartbeat"))?;
    let last_heartbeat = last_heartbeat.or(enqueue_time)?;
    Some(QueueEntry {
        id: id.to_string(),
        user,
        actual_user,
        kind,
        selection,
        duration,
        note: text(&doc, "note").ok()?.map(str::to_string),
        owner: process("host", "pid", "pid_start_time")?,
        waiter: process("waiter_host", "waiter_pid", "waiter_pid_start_time")?,
        enqueue_time: enqueue_time.unwrap_or(last_heartbeat),
        last_heartbeat,
        collected: Vec::new(),
    })
}

/// A new queue entry as stored: upstream's fields (times as integer Unix seconds)
/// plus the waiter and run owner.
#[derive(Serialize)]
struct StoredEntry<'a> {
    id: &'a str,
    user: &'a str,
    actual_user: &'a str,
    requested_count: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    requested_ids: Option<&'a [u32]>,
    allocated_gpus: &'a [u32],
    reservation_type: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    duration_seconds: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    note: Option<&'a str>,
    enqueue_time: UnixTime,
    last_heartbeat: UnixTime,
    /// The run owner, as `host`, `pid` and `pid_start_time`.
    #[serde(flatten)]
    owner: Option<StoredOwner<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    waiter_host: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    waiter_pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    waiter_pid_start_time: Option<u64>,
}

pub(super) fn encode_entry(entry: &QueueEntry) -> String {
    let owner = entry.owner.as_ref();
    let waiter = entry.waiter.as_ref();
    let stored = StoredEntry {
        id: &entry.id,
        user: &entry.user,
        actual_user: &entry.actual_user,
        requested_count: entry.selection.len(),
        requested_ids: match &entry.selection {
            Selection::Ids(ids) => Some(ids),
            Selection::Count(_) => None,
        },
        allocated_gpus: &entry.collected,
        reservation_type: entry.kind.as_str(),
        duration_seconds: entry.duration,
        note: entry.note.as_deref().filter(|note| !note.is_empty()),
        enqueue_time: entry.enqueue_time,
        last_heartbeat: entry.last_heartbeat,
        owner: StoredOwner::of(owner),
        waiter_host: waiter.map(|waiter| waiter.host.as_str()),
        waiter_pid: waiter.map(|waiter| waiter.pid),
        waiter_pid_start_time: waiter.map(|waiter| waiter.pid_start),
    };
    serde_json::to_string(&stored).unwrap_or_default()
}

/// An existing entry's JSON with its heartbeat and collected GPUs brought up to date,
/// every other field (upstream's too) kept as it was.
pub(super) fn patch_entry(raw: &str, entry: &QueueEntry) -> String {
    patched(
        raw,
        [
            ("last_heartbeat", entry.last_heartbeat.into()),
            ("allocated_gpus", entry.collected.clone().into()),
        ],
    )
    .unwrap_or_else(|| encode_entry(entry))
}

/// An entry's JSON with `last_heartbeat` set, every other field as it was (an
/// unreadable one as it was: the next change drops it).
pub(super) fn patch_heartbeat(raw: &str, now: UnixTime) -> String {
    patched(raw, [("last_heartbeat", now.into())]).unwrap_or_else(|| raw.to_string())
}

/// The JSON object `raw` with `fields` set; `None` when it is no object.
fn patched<const N: usize>(raw: &str, fields: [(&str, Value); N]) -> Option<String> {
    let mut doc = object(raw).ok()?;
    for (field, value) in fields {
        doc.insert(field.into(), value);
    }
    Some(Value::Object(doc).to_string())
}

/// A history member: upstream's record plus the account and the reservation ID, which
/// keeps two identical short runs on one GPU distinct members of the set.
pub(super) fn encode_history(entry: &HistoryEntry) -> String {
    let record = &entry.record;
    let mut doc = serde_json::json!({
        "user": record.user,
        "actual_user": record.actual_user,
        "gpu_id": record.gpu_id,
        "start_time": record.start_time,
        "end_time": record.end_time,
        "duration_seconds": (record.end_time - record.start_time).max(0),
        "reservation_type": record.kind.as_str(),
    });
    if !entry.reservation_id.is_empty() {
        doc["reservation_id"] = entry.reservation_id.clone().into();
    }
    if let Some(reason) = &entry.reason {
        doc["reason"] = reason.clone().into();
    }
    if record.utilization.samples > 0 {
        doc["utilization_sum"] = record.utilization.sum.into();
        doc["utilization_samples"] = record.utilization.samples.into();
    }
    doc.to_string()
}

/// One history entry as stored, borrowed from the member where possible: written by
/// us (integer seconds) or upstream (RFC 3339 strings, float durations, possibly no
/// `actual_user`). Other fields (`duration_seconds`) are ignored.
#[derive(Deserialize)]
struct StoredUsage<'a> {
    #[serde(borrow)]
    user: Cow<'a, str>,
    #[serde(borrow, default)]
    actual_user: Option<Cow<'a, str>>,
    gpu_id: u64,
    start_time: Value,
    end_time: Value,
    #[serde(borrow)]
    reservation_type: Cow<'a, str>,
    #[serde(default)]
    utilization_sum: u64,
    #[serde(default)]
    utilization_samples: u32,
}

/// A readable history entry: its account, GPU, times and type.
pub(super) struct UsageEntry<'a> {
    pub user: Cow<'a, str>,
    pub account: Cow<'a, str>,
    pub gpu_id: u32,
    pub start_time: UnixTime,
    pub end_time: UnixTime,
    pub kind: ReservationKind,
    pub utilization: crate::state::Utilization,
}

/// Decodes a history member; `None` for entries that cannot be read.
pub(super) fn parse_usage_entry(member: &str) -> Option<UsageEntry<'_>> {
    let stored: StoredUsage = serde_json::from_str(member).ok()?;
    let account = match stored.actual_user {
        Some(actual_user) if !actual_user.is_empty() => actual_user,
        _ => stored.user.clone(),
    };
    Some(UsageEntry {
        gpu_id: u32::try_from(stored.gpu_id).ok()?,
        start_time: parse_time(Some(&stored.start_time))??,
        end_time: parse_time(Some(&stored.end_time))??,
        kind: ReservationKind::parse(&stored.reservation_type)?,
        utilization: crate::state::Utilization {
            sum: stored.utilization_sum,
            samples: stored.utilization_samples,
        },
        user: stored.user,
        account,
    })
}

pub(super) fn parse_usage_record(member: &str) -> Option<UsageRecord> {
    let entry = parse_usage_entry(member)?;
    Some(UsageRecord {
        user: entry.user.into_owned(),
        actual_user: entry.account.into_owned(),
        gpu_id: entry.gpu_id,
        start_time: entry.start_time,
        end_time: entry.end_time,
        kind: entry.kind,
        utilization: entry.utilization,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_times_in_every_upstream_encoding() {
        let go = r#"{"user":"bob","gpu_id":3,"start_time":"2026-05-14T16:36:44-04:00","end_time":"2026-05-14T20:46:44.9Z","duration_seconds":600.5,"reservation_type":"run"}"#;
        let record = parse_usage_record(go).unwrap();
        assert_eq!(record.actual_user, "bob");
        assert_eq!(record.end_time - record.start_time, 600);
        assert_eq!(record.start_time, 1_778_791_004);
        let at = |value: Value| parse_time(Some(&value));
        assert_eq!(at(serde_json::json!(1.9)), Some(Some(1)));
        assert_eq!(
            at(serde_json::json!("1700000000")),
            Some(Some(1_700_000_000))
        );
        assert_eq!(at(serde_json::json!("17.5")), Some(Some(17)));
        assert_eq!(at(Value::Null), Some(None));
        assert_eq!(at(serde_json::json!("yesterday")), None);
        assert!(parse_usage_record(r#"{"user":"bob","gpu_id":-1}"#).is_none());
    }

    #[test]
    fn gpu_states_of_every_writer() {
        let go = r#"{"user":"alice","actual_user":"alice","start_time":"2026-05-14T16:36:44-04:00","last_heartbeat":"2026-05-14T16:37:44.12345-04:00","type":"run","expiry_time":null,"last_released":null}"#;
        match decode_slot(0, Some(go)).0 {
            GpuSlot::Held(r) => {
                assert_eq!(r.kind, ReservationKind::Run);
                assert_eq!(r.last_heartbeat, Some(r.start_time + 60));
                assert_eq!(r.owner, None);
            }
            other => panic!("{other:?}"),
        }
        let released = r#"{"start_time":null,"last_heartbeat":null,"expiry_time":null,"last_released":"2026-05-14T16:36:44Z"}"#;
        assert!(matches!(
            decode_slot(1, Some(released)).0,
            GpuSlot::Free {
                last_released: Some(_)
            }
        ));
        let partial = r#"{"user":"a","type":"manual","start_time":5,"partial_queue_id":"q1"}"#;
        assert_eq!(decode_slot(2, Some(partial)).1.as_deref(), Some("q1"));
        assert_eq!(
            decode_slot(
                3,
                Some(r#"{"user":"a","type":"run","start_time":1,"host":"h"}"#)
            )
            .0,
            GpuSlot::Corrupt(
                "corrupted GPU state for GPU 3: run owner without pid and pid_start_time".into()
            )
        );
    }

    #[test]
    fn entries_of_upstream_and_ours() {
        let upstream = r#"{"id":"u1","user":"bob","requested_count":2,"allocated_gpus":[],"reservation_type":"manual","expiry_duration":3600000000000,"enqueue_time":"2026-05-14T16:36:44Z","last_heartbeat":"2026-05-14T16:37:14Z"}"#;
        let entry = decode_entry("u1", upstream).unwrap();
        assert_eq!(entry.duration, Some(3600));
        assert_eq!(entry.actual_user, "bob");
        assert_eq!(entry.waiter, None);
        assert_eq!(entry.last_heartbeat - entry.enqueue_time, 30);
        let again = decode_entry("u1", &encode_entry(&entry)).unwrap();
        assert_eq!(again, entry);
        let patched = patch_entry(
            upstream,
            &QueueEntry {
                collected: vec![1],
                ..entry
            },
        );
        assert!(patched.contains("expiry_duration") && patched.contains("\"allocated_gpus\":[1]"));
        assert!(decode_entry("x", r#"{"user":"a","reservation_type":"run"}"#).is_none());
        assert!(decode_entry("x", "[]").is_none());
    }
}
