//! The reads of `report` on the history sorted set (score = end time).

use super::RedisStore;
use super::codec::{parse_usage_entry, parse_usage_record};
use crate::error::Result;
use crate::report::{Tally, UserUsage, Window};
use crate::state::{UnixTime, UsageRecord};

/// At most this many history records per reply (unless they all ended within one
/// second), so that a report over a long history never keeps Redis busy for long.
const SLICE_RECORDS: u64 = 10_000;
const SLICES_PER_ROUND_TRIP: usize = 8;

/// History records whose end time (score) is in `[from, to)`; `to: None` is unbounded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ScoreSlice {
    from: UnixTime,
    to: Option<UnixTime>,
}

impl ScoreSlice {
    fn upper_bound(&self) -> String {
        match self.to {
            Some(to) => format!("({to}"),
            None => "+inf".into(),
        }
    }

    /// `parts` slices of (nearly) equal width covering this bounded slice.
    fn split(&self, parts: u64) -> Vec<ScoreSlice> {
        let to = self.to.unwrap_or(self.from + 1);
        let width = ((to - self.from) as u64).div_ceil(parts.max(1)).max(1) as i64;
        (self.from..to)
            .step_by(width as usize)
            .map(|lo| ScoreSlice {
                from: lo,
                to: Some((lo + width).min(to)),
            })
            .collect()
    }
}

impl RedisStore {
    /// Score slices covering `[from, +inf)` with at most `SLICE_RECORDS` records each
    /// (a slice one second wide may hold more), found by rounds of `ZCOUNT`s.
    fn history_slices(&mut self, from: UnixTime, to: UnixTime) -> Result<Vec<ScoreSlice>> {
        let key = self.keys.history();
        let mut ready = vec![ScoreSlice {
            from: to + 1,
            to: None,
        }];
        let mut pending = vec![ScoreSlice {
            from,
            to: Some(to + 1),
        }];
        while !pending.is_empty() {
            let mut pipe = redis::pipe();
            for slice in &pending {
                pipe.cmd("ZCOUNT")
                    .arg(&key)
                    .arg(slice.from)
                    .arg(slice.upper_bound());
            }
            let counts: Vec<u64> = self.call(|connection| pipe.query(connection))?;
            let mut next = Vec::new();
            for (slice, count) in pending.iter().zip(counts) {
                let one_second = slice.to.is_some_and(|to| to - slice.from <= 1);
                if count == 0 {
                    continue;
                } else if count <= SLICE_RECORDS || one_second {
                    ready.push(*slice);
                } else {
                    next.extend(slice.split(count.div_ceil(SLICE_RECORDS) + 1));
                }
            }
            pending = next;
        }
        Ok(ready)
    }

    /// Records that cannot be read (foreign or damaged entries) are skipped.
    pub(super) fn read_history(
        &mut self,
        from: UnixTime,
        to: UnixTime,
    ) -> Result<Vec<UsageRecord>> {
        let key = self.keys.history();
        let members: Vec<String> = self.call(|connection| {
            redis::cmd("ZRANGEBYSCORE")
                .arg(&key)
                .arg(from)
                .arg("+inf")
                .query(connection)
        })?;
        Ok(members
            .iter()
            .filter_map(|member| parse_usage_record(member))
            .filter(|record| record.end_time >= from && record.start_time <= to)
            .collect())
    }

    /// Fetches the records in slices of end times (scores), several slices per round
    /// trip; the replies are decoded on a second thread while the next ones arrive.
    /// Slices are disjoint score ranges: records written or pruned meanwhile never make
    /// another record count twice or not at all.
    pub(super) fn summarize_history(
        &mut self,
        from: UnixTime,
        to: UnixTime,
    ) -> Result<Vec<UserUsage>> {
        let key = self.keys.history();
        let slices = self.history_slices(from, to)?;
        let (pages, received) = std::sync::mpsc::sync_channel::<Vec<Vec<String>>>(2);
        let decoder = std::thread::spawn(move || {
            let mut tally = Tally::new(Window { from, to });
            for page in received {
                for member in page.iter().flatten() {
                    if let Some(entry) = parse_usage_entry(member) {
                        tally.add(
                            &entry.account,
                            (entry.start_time, entry.end_time),
                            entry.kind,
                            entry.utilization,
                        );
                    }
                }
            }
            tally
        });
        for group in slices.chunks(SLICES_PER_ROUND_TRIP) {
            let mut pipe = redis::pipe();
            for slice in group {
                pipe.cmd("ZRANGEBYSCORE")
                    .arg(&key)
                    .arg(slice.from)
                    .arg(slice.upper_bound());
            }
            let page: Vec<Vec<String>> = self.call(|connection| pipe.query(connection))?;
            if pages.send(page).is_err() {
                break;
            }
        }
        drop(pages);
        let tally = decoder
            .join()
            .map_err(|_| crate::error::Error::Runtime("the history decoder failed".into()))?;
        Ok(tally.into_usages())
    }
}
