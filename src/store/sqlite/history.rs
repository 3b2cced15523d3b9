//! The usage history table: appending, bounded pruning, and the reads of `report`.

use std::collections::BTreeMap;

use rusqlite::{Connection, params};

use super::{Fault, SqlResult};
use crate::error::Error;
use crate::report::UserUsage;
use crate::state::{ReservationKind, UnixTime, UsageRecord};
use crate::store::HISTORY_PRUNE_BATCH;

/// Appends a history record, in the transaction that ends the reservation, so a
/// reservation is recorded once however many processes end it at the same time.
/// Records a finished reservation, with why it ended when not by its holder.
pub(super) fn record_history(
    conn: &Connection,
    record: &UsageRecord,
    reason: Option<&str>,
) -> SqlResult<()> {
    conn.prepare_cached(
        "INSERT INTO history (user, actual_user, gpu_id, start_time, end_time, type, reason,
                              utilization_sum, utilization_samples)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?
    .execute(params![
        record.user,
        record.actual_user,
        record.gpu_id,
        record.start_time,
        record.end_time,
        record.kind.as_str(),
        reason,
        record.utilization.sum as i64,
        record.utilization.samples,
    ])?;
    Ok(())
}

/// Deletes a bounded batch of the records that ended before `before`. Every write
/// that records history runs it, so pruning is continuous and each write cheap.
pub(super) fn prune_history(conn: &Connection, before: UnixTime) -> SqlResult<()> {
    conn.prepare_cached(
        "DELETE FROM history WHERE id IN
         (SELECT id FROM history WHERE end_time < ?1 ORDER BY end_time LIMIT ?2)",
    )?
    .execute(params![before, HISTORY_PRUNE_BATCH])?;
    Ok(())
}

/// Finished reservations overlapping `[from, to]`.
pub(super) fn history(
    conn: &Connection,
    from: UnixTime,
    to: UnixTime,
) -> SqlResult<Vec<UsageRecord>> {
    let mut statement = conn.prepare_cached(
        "SELECT id, user, actual_user, gpu_id, start_time, end_time, type,
                utilization_sum, utilization_samples FROM history
         WHERE end_time >= ?1 AND start_time <= ?2 ORDER BY end_time, id",
    )?;
    let mut rows = statement.query([from, to])?;
    let mut records = Vec::new();
    while let Some(row) = rows.next()? {
        let kind: String = row.get("type")?;
        let Some(kind) = ReservationKind::parse(&kind) else {
            let id: i64 = row.get("id")?;
            return Err(Fault::Domain(Error::Store(format!(
                "corrupted usage history record {id}: invalid reservation type '{kind}'"
            ))));
        };
        records.push(UsageRecord {
            user: row.get("user")?,
            actual_user: row.get("actual_user")?,
            gpu_id: row.get("gpu_id")?,
            start_time: row.get("start_time")?,
            end_time: row.get("end_time")?,
            kind,
            utilization: crate::state::Utilization {
                sum: row.get::<_, i64>("utilization_sum")?.max(0) as u64,
                samples: row
                    .get::<_, i64>("utilization_samples")?
                    .clamp(0, u32::MAX.into()) as u32,
            },
        });
    }
    Ok(records)
}

/// Per-account seconds inside `[from, to]` and reservation counts, in one pass over
/// the covering index.
pub(super) fn usage_summary(
    conn: &Connection,
    from: UnixTime,
    to: UnixTime,
) -> SqlResult<Vec<UserUsage>> {
    // Grouped by index columns (no sort); the few (account, display name) groups are
    // merged per account below.
    let mut statement = conn.prepare_cached(
        "SELECT actual_user, user,
                SUM(MAX(0, MIN(end_time, ?2) - MAX(start_time, ?1))),
                SUM(type = 'run'), SUM(type = 'manual'),
                SUM(utilization_sum), SUM(utilization_samples)
         FROM history INDEXED BY history_by_account
         WHERE end_time >= ?1 AND start_time <= ?2
         GROUP BY actual_user, user",
    )?;
    let mut tally: BTreeMap<String, UserUsage> = BTreeMap::new();
    let mut rows = statement.query([from, to])?;
    while let Some(row) = rows.next()? {
        let actual_user: String = row.get(0)?;
        let user = if actual_user.is_empty() {
            row.get(1)?
        } else {
            actual_user
        };
        let count = |index| row.get::<_, i64>(index).map(|n| n.max(0) as u64);
        let usage = tally.entry(user.clone()).or_insert_with(|| UserUsage {
            user,
            ..UserUsage::default()
        });
        usage.seconds += row.get::<_, i64>(2)?;
        usage.run_count += count(3)?;
        usage.manual_count += count(4)?;
        usage.utilization.add(crate::state::Utilization {
            sum: count(5)?,
            samples: count(6)?.min(u32::MAX.into()) as u32,
        });
    }
    Ok(tally.into_values().collect())
}
