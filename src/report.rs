//! `report`: GPU hours per user over the last N days, from finished reservations
//! (the usage history) and reservations still in progress. Pure: no store, no clock.
//!
//! Users are grouped by their real Unix account (`actual_user`), so `--user` display
//! names never split one person into several rows; records written by upstream
//! canhazgpu only know the display name, which is then used. Only the part of a
//! reservation inside the window counts. Counts are per GPU: a reservation of two
//! GPUs is two reservations, as in the history.

use std::collections::BTreeMap;

use jiff::tz::TimeZone;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::state::{GpuSlot, ReservationKind, UnixTime, UsageRecord, Utilization};

pub const DEFAULT_DAYS: u32 = 30;
/// A century: beyond any retention, and far from overflowing seconds.
pub const MAX_DAYS: u32 = 36_500;
const SECONDS_PER_DAY: i64 = 86_400;

/// Parses a number of days: a whole number from 1 to `MAX_DAYS`.
pub fn parse_days(text: &str) -> Result<u32> {
    Some(text)
        .filter(|digits| digits.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|digits| digits.parse::<u32>().ok())
        .filter(|days| (1..=MAX_DAYS).contains(days))
        .ok_or_else(|| {
            Error::Usage(format!(
                "invalid number of days '{text}': expected a whole number from 1 to {MAX_DAYS}"
            ))
        })
}

/// The closed interval `[from, to]` a report covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub from: UnixTime,
    pub to: UnixTime,
}

impl Window {
    /// The `days` days up to `now`.
    pub fn last_days(days: u32, now: UnixTime) -> Self {
        Window {
            from: now - i64::from(days) * SECONDS_PER_DAY,
            to: now,
        }
    }

    /// Whether a reservation over `[start, end]` touches the window (the same rule as
    /// `Store::history`).
    pub fn touches(&self, start: UnixTime, end: UnixTime) -> bool {
        start <= self.to && end >= self.from
    }

    /// Seconds of `[start, end]` inside the window.
    pub fn overlap(&self, start: UnixTime, end: UnixTime) -> i64 {
        (end.min(self.to) - start.max(self.from)).max(0)
    }
}

/// One account's usage inside a window: what stores sum up and the report shows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UserUsage {
    pub user: String,
    pub seconds: i64,
    pub run_count: u64,
    pub manual_count: u64,
    /// The agent's readings of this user's reservations.
    pub utilization: Utilization,
}

impl UserUsage {
    fn add(&mut self, other: &UserUsage) {
        self.seconds += other.seconds;
        self.run_count += other.run_count;
        self.manual_count += other.manual_count;
        self.utilization.add(other.utilization);
    }

    fn count(&self) -> u64 {
        self.run_count + self.manual_count
    }
}

/// The account a record belongs to.
pub fn account(record: &UsageRecord) -> &str {
    if record.actual_user.is_empty() {
        &record.user
    } else {
        &record.actual_user
    }
}

/// Sums records per account, counting only their parts inside a window.
pub struct Tally {
    window: Window,
    by_user: BTreeMap<String, UserUsage>,
}

impl Tally {
    pub fn new(window: Window) -> Self {
        Tally {
            window,
            by_user: BTreeMap::new(),
        }
    }

    pub fn add_record(&mut self, record: &UsageRecord) {
        self.add(
            account(record),
            (record.start_time, record.end_time),
            record.kind,
            record.utilization,
        );
    }

    /// Adds one reservation of `user` over `[start, end]`.
    pub fn add(
        &mut self,
        user: &str,
        (start, end): (UnixTime, UnixTime),
        kind: ReservationKind,
        utilization: Utilization,
    ) {
        if !self.window.touches(start, end) {
            return;
        }
        let usage = match self.by_user.get_mut(user) {
            Some(usage) => usage,
            None => self.by_user.entry(user.to_string()).or_insert(UserUsage {
                user: user.to_string(),
                ..UserUsage::default()
            }),
        };
        usage.seconds += self.window.overlap(start, end);
        usage.utilization.add(utilization);
        match kind {
            ReservationKind::Run => usage.run_count += 1,
            ReservationKind::Manual => usage.manual_count += 1,
        }
    }

    pub fn into_usages(self) -> Vec<UserUsage> {
        self.by_user.into_values().collect()
    }
}

/// `Tally` over `records`.
pub fn tally<'a>(
    records: impl IntoIterator<Item = &'a UsageRecord>,
    window: Window,
) -> Vec<UserUsage> {
    let mut tally = Tally::new(window);
    for record in records {
        tally.add_record(record);
    }
    tally.into_usages()
}

/// The reservations the store still holds, as records ending now, or when they
/// lapsed for the ones nobody has cleaned up yet (their history record is written
/// with that same end when they are). `dead_ids` are run reservations whose
/// supervisor is known to be gone.
pub fn in_progress(slots: &[GpuSlot], dead_ids: &[String], now: UnixTime) -> Vec<UsageRecord> {
    slots
        .iter()
        .enumerate()
        .filter_map(|(gpu_id, slot)| match slot {
            GpuSlot::Held(r) => Some(UsageRecord {
                user: r.user.clone(),
                actual_user: r.actual_user.clone(),
                gpu_id: gpu_id as u32,
                start_time: r.start_time,
                end_time: r.liveness(now, dead_ids).ended_at().unwrap_or(now),
                kind: r.kind,
                utilization: Utilization::of(r.activity.as_deref()),
            }),
            GpuSlot::Free { .. } | GpuSlot::Corrupt(_) => None,
        })
        .collect()
}

/// The `report --json` document (upstream's shape; `users` is `[]`, never `null`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Report {
    pub users: Vec<UserRow>,
    pub total_gpu_hours: f64,
    pub total_reservations: u64,
    pub unique_users: u64,
    pub start_date: String,
    pub end_date: String,
    pub days: u32,
    /// `report --all`: each host's share of the fleet's hours.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hosts: Option<Vec<HostRow>>,
}

/// One host of `report --all`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HostRow {
    pub name: String,
    pub gpus: u32,
    pub gpu_hours: f64,
    /// GPU hours as a share of what the host's GPUs could give in the period.
    pub capacity_percent: f64,
}

impl HostRow {
    pub fn new(name: &str, gpus: u32, usages: &[UserUsage], window: Window) -> Self {
        let seconds: i64 = usages.iter().map(|usage| usage.seconds.max(0)).sum();
        let capacity = i64::from(gpus) * (window.to - window.from);
        HostRow {
            name: name.to_string(),
            gpus,
            gpu_hours: round_to(seconds as f64 / 3600.0, 2),
            capacity_percent: match capacity {
                0 => 0.0,
                _ => round_to(seconds as f64 * 100.0 / capacity as f64, 1),
            },
        }
    }
}

fn round_to(value: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (value * scale).round() / scale
}

/// One user's row. Hours have two decimals and percentages one, apportioned so that
/// the rows add up exactly to the totals.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct UserRow {
    pub name: String,
    pub gpu_hours: f64,
    pub percentage: f64,
    pub run_count: u64,
    pub manual_count: u64,
    /// The mean GPU utilization of the user's reservations, where the agent measured it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mean_utilization_percent: Option<u32>,
}

/// Builds the report from per-account usages (several entries of one account are
/// merged); dates are calendar dates in `tz`.
pub fn build(
    usages: impl IntoIterator<Item = UserUsage>,
    window: Window,
    days: u32,
    tz: &TimeZone,
) -> Report {
    let mut merged: BTreeMap<String, UserUsage> = BTreeMap::new();
    for usage in usages {
        merged
            .entry(usage.user.clone())
            .or_insert_with(|| UserUsage {
                user: usage.user.clone(),
                ..UserUsage::default()
            })
            .add(&usage);
    }
    let mut users: Vec<UserUsage> = merged.into_values().filter(|u| u.count() > 0).collect();
    users.sort_by(|a, b| b.seconds.cmp(&a.seconds).then_with(|| a.user.cmp(&b.user)));

    let seconds: Vec<u64> = users.iter().map(|u| u.seconds.max(0) as u64).collect();
    let total_seconds: u64 = seconds.iter().sum();
    // Hundredths of an hour are 36 s; tenths of a percent are thousandths.
    let total_centihours = (total_seconds + 18) / 36;
    let centihours = apportion(&seconds, total_centihours);
    // Shares of the time used; reservations too short to measure in whole seconds
    // (the stores' resolution) share by count, so TOTAL is 100 % whenever anything
    // was used, whichever second boundaries those reservations happened to cross.
    let weights = if total_seconds > 0 {
        seconds.clone()
    } else {
        users.iter().map(UserUsage::count).collect()
    };
    let permille = apportion(&weights, if users.is_empty() { 0 } else { 1000 });

    let rows = users
        .iter()
        .zip(centihours.iter().zip(&permille))
        .map(|(usage, (&hours, &share))| UserRow {
            name: usage.user.clone(),
            gpu_hours: hours as f64 / 100.0,
            percentage: share as f64 / 10.0,
            run_count: usage.run_count,
            manual_count: usage.manual_count,
            mean_utilization_percent: usage.utilization.mean_percent(),
        })
        .collect();
    Report {
        users: rows,
        total_gpu_hours: total_centihours as f64 / 100.0,
        total_reservations: users.iter().map(UserUsage::count).sum(),
        unique_users: users.len() as u64,
        start_date: date(window.from, tz),
        end_date: date(window.to, tz),
        days,
        hosts: None,
    }
}

/// Splits `total` units in proportion to `weights` (largest remainder method): each
/// share is its exact quota rounded down or up, and the shares sum to `total`.
fn apportion(weights: &[u64], total: u64) -> Vec<u64> {
    let sum: u128 = weights.iter().map(|&w| u128::from(w)).sum();
    if sum == 0 {
        return vec![0; weights.len()];
    }
    let quota = |w: u64| u128::from(w) * u128::from(total);
    let mut shares: Vec<u64> = weights.iter().map(|&w| (quota(w) / sum) as u64).collect();
    let mut left = total - shares.iter().sum::<u64>();
    let mut by_remainder: Vec<usize> = (0..weights.len()).collect();
    by_remainder.sort_by_key(|&i| std::cmp::Reverse(quota(weights[i]) % sum));
    for i in by_remainder {
        if left == 0 {
            break;
        }
        shares[i] += 1;
        left -= 1;
    }
    shares
}

fn date(time: UnixTime, tz: &TimeZone) -> String {
    jiff::Timestamp::from_second(time)
        .map(|ts| tz.to_datetime(ts).date().to_string())
        .unwrap_or_else(|_| "-".into())
}

const RULE_WIDTH: usize = 75;

/// The text report, in the reference's layout, with a TOTAL row whose columns are
/// the sums of the rows above it.
/// The users' rows as CSV (RFC 4180) for spreadsheets: a header, then one row per
/// user, with the period on every row so that reports can be pasted together.
pub fn render_csv(report: &Report) -> String {
    let mut out = String::from(
        "user,gpu_hours,percentage,run_count,manual_count,mean_utilization_percent,start_date,end_date\r\n",
    );
    for user in &report.users {
        let utilization = user
            .mean_utilization_percent
            .map(|percent| percent.to_string())
            .unwrap_or_default();
        out.push_str(&format!(
            "{},{:.2},{:.2},{},{},{utilization},{},{}\r\n",
            csv_field(&user.name),
            user.gpu_hours,
            user.percentage,
            user.run_count,
            user.manual_count,
            csv_field(&report.start_date),
            csv_field(&report.end_date),
        ));
    }
    out
}

/// A CSV field, quoted when it holds a comma, a quote or a line break.
fn csv_field(text: &str) -> String {
    match text.contains([',', '"', '\n', '\r']) {
        true => format!("\"{}\"", text.replace('"', "\"\"")),
        false => text.to_owned(),
    }
}

pub fn render_text(report: &Report) -> String {
    let unit = if report.days == 1 { "day" } else { "days" };
    let mut out = format!(
        "\n=== GPU Reservation Report ===\nPeriod: {} to {} ({} {unit})\n\n",
        report.start_date, report.end_date, report.days
    );
    let rule = "-".repeat(RULE_WIDTH);
    if report.users.is_empty() {
        out.push_str("No GPU reservations in this period.\n");
    } else {
        render_users(report, &rule, &mut out);
    }
    if let Some(hosts) = &report.hosts {
        out.push_str(&format!(
            "\n{:<20} {:>6} {:>15} {:>15}\n{rule}\n",
            "Host", "GPUs", "GPU Hours", "Capacity Used"
        ));
        for host in hosts {
            out.push_str(&format!(
                "{:<20} {:>6} {:>15.2} {:>14.1}%\n",
                host.name, host.gpus, host.gpu_hours, host.capacity_percent
            ));
        }
    }
    out
}

fn render_users(report: &Report, rule: &str, out: &mut String) {
    out.push_str(&format!(
        "{:<20} {:>15} {:>15} {:>10} {:>10}\n{rule}\n",
        "User", "GPU Hours", "Percentage", "Run", "Manual"
    ));
    let row = |name: &str, hours: f64, percentage: f64, run: u64, manual: u64| {
        format!("{name:<20} {hours:>15.2} {percentage:>14.1}% {run:>10} {manual:>10}\n")
    };
    for user in &report.users {
        out.push_str(&row(
            &user.name,
            user.gpu_hours,
            user.percentage,
            user.run_count,
            user.manual_count,
        ));
    }
    out.push_str(rule);
    out.push('\n');
    out.push_str(&row(
        "TOTAL",
        report.total_gpu_hours,
        report.users.iter().map(|u| u.percentage).sum(),
        report.users.iter().map(|u| u.run_count).sum(),
        report.users.iter().map(|u| u.manual_count).sum(),
    ));
    out.push_str(&format!(
        "\nTotal reservations: {}\nUnique users: {}\n",
        report.total_reservations, report.unique_users
    ));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Reservation;
    use proptest::prelude::*;

    const HOUR: i64 = 3600;
    const NOW: i64 = 1_750_000_000;

    fn record(user: &str, start: i64, end: i64, kind: ReservationKind) -> UsageRecord {
        UsageRecord {
            user: user.into(),
            actual_user: user.into(),
            gpu_id: 0,
            start_time: start,
            end_time: end,
            kind,
            utilization: Default::default(),
        }
    }

    fn report_of(records: &[UsageRecord], days: u32) -> Report {
        let window = Window::last_days(days, NOW);
        build(tally(records, window), window, days, &TimeZone::UTC)
    }

    #[test]
    fn days_must_be_a_positive_whole_number() {
        assert_eq!(parse_days("7").unwrap(), 7);
        assert_eq!(parse_days("90").unwrap(), 90);
        for bad in [
            "0",
            "-1",
            "1.5",
            "abc",
            "",
            " 7",
            "+7",
            "36501",
            "99999999999",
        ] {
            let err = parse_days(bad).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{bad}");
            assert!(err.to_string().contains("whole number"), "{err}");
        }
    }

    #[test]
    fn only_the_part_inside_the_window_counts() {
        let window = Window::last_days(1, NOW);
        let from = window.from;
        let records = [
            // Started two hours before the window, ended one hour into it.
            record(
                "alice",
                from - 2 * HOUR,
                from + HOUR,
                ReservationKind::Manual,
            ),
            // Entirely before the window.
            record(
                "alice",
                from - 5 * HOUR,
                from - 4 * HOUR,
                ReservationKind::Run,
            ),
            // Entirely inside.
            record("bob", NOW - 3 * HOUR, NOW - HOUR, ReservationKind::Run),
        ];
        let usages = tally(&records, window);
        assert_eq!(
            usages,
            vec![
                UserUsage {
                    user: "alice".into(),
                    seconds: HOUR,
                    run_count: 0,
                    manual_count: 1,
                    utilization: Default::default(),
                },
                UserUsage {
                    user: "bob".into(),
                    seconds: 2 * HOUR,
                    run_count: 1,
                    manual_count: 0,
                    utilization: Default::default(),
                },
            ]
        );
    }

    #[test]
    fn totals_are_the_sums_of_the_rows_and_users_sorted_by_hours() {
        let records = [
            record(
                "alice",
                NOW - 10 * HOUR,
                NOW - 9 * HOUR,
                ReservationKind::Run,
            ),
            record(
                "bob",
                NOW - 10 * HOUR,
                NOW - 8 * HOUR,
                ReservationKind::Manual,
            ),
            record("bob", NOW - 5 * HOUR, NOW - 4 * HOUR, ReservationKind::Run),
            record("carol", NOW - 100, NOW - 40, ReservationKind::Manual),
        ];
        let report = report_of(&records, 30);
        let names: Vec<&str> = report.users.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(names, ["bob", "alice", "carol"]);
        assert_eq!(report.users[0].gpu_hours, 3.0);
        assert_eq!(report.users[1].gpu_hours, 1.0);
        assert_eq!(report.users[2].gpu_hours, 0.02);
        assert_eq!(report.total_gpu_hours, 4.02);
        assert_eq!(report.total_reservations, 4);
        assert_eq!(report.unique_users, 3);
        assert_eq!(report.users[0].percentage, 74.7);
        assert_eq!(report.users[1].percentage, 24.9);
        assert_eq!(report.users[2].percentage, 0.4);
        assert_eq!(report.start_date, "2025-05-16");
        assert_eq!(report.end_date, "2025-06-15");

        let text = render_text(&report);
        assert!(text.contains("Period: 2025-05-16 to 2025-06-15 (30 days)"));
        let total = text.lines().find(|l| l.starts_with("TOTAL")).unwrap();
        assert_eq!(
            total,
            "TOTAL                           4.02          100.0%          2          2"
        );
        assert!(text.contains("Total reservations: 4\nUnique users: 3\n"));
    }

    #[test]
    fn display_names_are_grouped_under_the_account() {
        let mut as_service = record("svc", NOW - HOUR, NOW, ReservationKind::Run);
        as_service.actual_user = "alice".into();
        let mut upstream = record("alice", NOW - HOUR, NOW, ReservationKind::Manual);
        upstream.actual_user = String::new();
        let report = report_of(&[as_service, upstream], 1);
        assert_eq!(report.users.len(), 1);
        assert_eq!(report.users[0].name, "alice");
        assert_eq!(report.users[0].gpu_hours, 2.0);
        assert_eq!(
            (report.users[0].run_count, report.users[0].manual_count),
            (1, 1)
        );
    }

    #[test]
    fn in_progress_reservations_count_up_to_now_or_their_lapse() {
        let held = |kind, start, heartbeat, expiry| {
            GpuSlot::Held(Reservation {
                id: "r".into(),
                user: "alice".into(),
                actual_user: "alice".into(),
                kind,
                start_time: start,
                last_heartbeat: heartbeat,
                expiry_time: expiry,
                note: None,
                owner: None,
                adopted: None,
                activity: None,
            })
        };
        let slots = [
            held(ReservationKind::Run, NOW - 2 * HOUR, Some(NOW - 10), None),
            GpuSlot::Free {
                last_released: None,
            },
            held(
                ReservationKind::Manual,
                NOW - 3 * HOUR,
                None,
                Some(NOW - HOUR),
            ),
            GpuSlot::Corrupt("bad".into()),
        ];
        let records = in_progress(&slots, &[], NOW);
        assert_eq!(records.len(), 2);
        assert_eq!((records[0].gpu_id, records[0].end_time), (0, NOW));
        assert_eq!((records[1].gpu_id, records[1].end_time), (2, NOW - HOUR));
        let report = report_of(&records, 1);
        assert_eq!(report.total_gpu_hours, 4.0);
        assert_eq!(
            (report.users[0].run_count, report.users[0].manual_count),
            (1, 1)
        );
    }

    #[test]
    fn an_empty_period_says_so_without_nan() {
        let report = report_of(&[], 7);
        assert!(report.users.is_empty());
        assert_eq!(report.total_gpu_hours, 0.0);
        let text = render_text(&report);
        assert!(
            text.contains("No GPU reservations in this period."),
            "{text}"
        );
        assert!(!text.contains("NaN"));
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["users"], serde_json::json!([]));
        assert_eq!(json["days"], 7);
    }

    #[test]
    fn zero_length_reservations_count_without_nan() {
        let report = report_of(
            &[record("alice", NOW - 5, NOW - 5, ReservationKind::Run)],
            1,
        );
        assert_eq!(report.total_reservations, 1);
        // Too short to measure: shared by count, so the total is still 100 %.
        assert_eq!(report.users[0].percentage, 100.0);
        let text = render_text(&report);
        assert!(!text.contains("NaN"), "{text}");
        assert!(
            text.contains("TOTAL                           0.00          100.0%"),
            "{text}"
        );
    }

    proptest! {
        #[test]
        fn rows_always_add_up_to_the_totals(
            spans in prop::collection::vec((0usize..5, 0i64..200_000, 0i64..50_000, any::<bool>()), 0..40),
        ) {
            let names = ["a", "b", "c", "d", "e"];
            let records: Vec<UsageRecord> = spans
                .iter()
                .map(|&(user, ago, length, run)| {
                    let kind = if run { ReservationKind::Run } else { ReservationKind::Manual };
                    record(names[user], NOW - ago, NOW - ago + length, kind)
                })
                .collect();
            let report = report_of(&records, 1);
            let hours: i64 = report.users.iter().map(|u| (u.gpu_hours * 100.0).round() as i64).sum();
            prop_assert_eq!(hours, (report.total_gpu_hours * 100.0).round() as i64);
            let counts: u64 = report.users.iter().map(|u| u.run_count + u.manual_count).sum();
            prop_assert_eq!(counts, report.total_reservations);
            let permille: i64 = report.users.iter().map(|u| (u.percentage * 10.0).round() as i64).sum();
            if report.total_gpu_hours > 0.0 || report.users.iter().any(|u| u.percentage > 0.0) {
                prop_assert_eq!(permille, 1000);
            }
            let window = Window::last_days(1, NOW);
            let exact: i64 = records.iter().map(|r| window.overlap(r.start_time, r.end_time)).sum();
            prop_assert!((report.total_gpu_hours - exact as f64 / 3600.0).abs() <= 0.005 + 1e-9);
        }
    }
}
