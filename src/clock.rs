//! Clock times in the local time zone: `--until TIME` and the end of a reservation
//! as people read it (`at 2026-12-01 18:30`).

use jiff::civil::{Date, DateTime, Time};
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};

use crate::duration::{MAX_DURATION_SECS, format_limit};
use crate::error::{Error, Result};
use crate::state::UnixTime;

/// The local time zone (`TZ`, else `/etc/localtime`; UTC if neither can be read).
pub fn local_zone() -> TimeZone {
    TimeZone::try_system().unwrap_or(TimeZone::UTC)
}

/// Parses `--until`: `18:00` (today, or tomorrow once that time has passed), a
/// local `2026-12-02 09:00` (or `2026-12-02T09:00`), or RFC 3339 with an offset.
/// The time must be in the future and at most `MAX_DURATION_SECS` away.
pub fn parse_until(input: &str, now: UnixTime, tz: &TimeZone) -> Result<UnixTime> {
    let text = input.trim();
    let invalid = || {
        Error::Usage(format!(
            "invalid time '{input}' (use 18:00, '2026-12-02 09:00' or RFC 3339 such as \
             2026-12-02T09:00:00+01:00)"
        ))
    };
    let now_ts = Timestamp::from_second(now).map_err(|_| invalid())?;
    let at = if let Ok(time) = text.parse::<Time>()
        && !text.contains(['-', 'T', ' '])
    {
        let today = tz.to_datetime(now_ts).date();
        let mut at = local(today.to_datetime(time), tz).ok_or_else(invalid)?;
        if at <= now {
            let tomorrow = today.checked_add(1.day()).map_err(|_| invalid())?;
            at = local(tomorrow.to_datetime(time), tz).ok_or_else(invalid)?;
        }
        at
    } else if let Ok(ts) = text.parse::<Timestamp>() {
        ts.as_second()
    } else if text.parse::<Date>().is_ok() && !text.contains(':') {
        return Err(Error::Usage(format!(
            "invalid time '{input}': give a time of day too, e.g. '{text} 09:00'"
        )));
    } else if let Ok(datetime) = text.replacen(' ', "T", 1).parse::<DateTime>() {
        local(datetime, tz).ok_or_else(invalid)?
    } else {
        return Err(invalid());
    };
    if at <= now {
        return Err(Error::Usage(format!(
            "'{input}' ({}) is in the past",
            format_clock(at, tz)
        )));
    }
    if at - now > MAX_DURATION_SECS as i64 {
        return Err(Error::Usage(format!(
            "'{input}' is more than {} away, the longest a reservation may last",
            format_limit(MAX_DURATION_SECS as i64)
        )));
    }
    Ok(at)
}

/// A local date and time as a moment; a time skipped by a clock change is taken
/// as the moment after the gap.
fn local(datetime: DateTime, tz: &TimeZone) -> Option<UnixTime> {
    tz.to_timestamp(datetime).ok().map(|ts| ts.as_second())
}

/// `2026-12-01 18:30` in `tz`.
pub fn format_clock(at: UnixTime, tz: &TimeZone) -> String {
    match Timestamp::from_second(at) {
        Ok(ts) => tz.to_datetime(ts).strftime("%Y-%m-%d %H:%M").to_string(),
        Err(_) => at.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn berlin() -> TimeZone {
        TimeZone::get("Europe/Berlin").unwrap_or_else(|_| TimeZone::fixed(jiff::tz::offset(1)))
    }

    /// 2026-12-01 12:00 in Berlin (UTC+1).
    const NOON: UnixTime = 1_796_122_800;

    #[test]
    fn times_of_day_are_today_or_tomorrow() {
        let tz = berlin();
        assert_eq!(format_clock(NOON, &tz), "2026-12-01 12:00");
        let evening = parse_until("18:00", NOON, &tz).unwrap();
        assert_eq!(evening - NOON, 6 * 3600);
        let morning = parse_until("09:00", NOON, &tz).unwrap();
        assert_eq!(format_clock(morning, &tz), "2026-12-02 09:00");
    }

    #[test]
    fn dates_and_rfc3339() {
        let tz = berlin();
        let at = parse_until("2026-12-02 09:00", NOON, &tz).unwrap();
        assert_eq!(format_clock(at, &tz), "2026-12-02 09:00");
        assert_eq!(parse_until("2026-12-02T09:00", NOON, &tz).unwrap(), at);
        assert_eq!(
            parse_until("2026-12-02T08:00:00Z", NOON, &tz).unwrap(),
            at,
            "09:00 in Berlin is 08:00 UTC"
        );
    }

    #[test]
    fn past_far_and_malformed_times_are_refused() {
        let tz = berlin();
        assert_eq!(
            parse_until("2026-12-01 11:00", NOON, &tz)
                .unwrap_err()
                .to_string(),
            "'2026-12-01 11:00' (2026-12-01 11:00) is in the past"
        );
        assert_eq!(
            parse_until("2028-01-01 00:00", NOON, &tz)
                .unwrap_err()
                .to_string(),
            "'2028-01-01 00:00' is more than 365d away, the longest a reservation may last"
        );
        assert!(
            parse_until("2026-12-02", NOON, &tz)
                .unwrap_err()
                .to_string()
                .contains("give a time of day too")
        );
        for bad in ["", "25:00", "tomorrow", "18h", "2026-13-01 10:00"] {
            assert!(parse_until(bad, NOON, &tz).is_err(), "{bad:?}");
        }
    }
}
