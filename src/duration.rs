//! Parsing user-given durations (`30s`, `2h`, `.5h`, `1h 30m`, `1w`) and formatting them.

use crate::error::{Error, Result};

/// The longest duration anything accepts (a reservation, a wait, a timeout): 365 days.
/// Longer is a typo, and would outlive any machine's maintenance window.
pub const MAX_DURATION_SECS: u64 = 365 * 86400;

/// Parses a duration into whole seconds. Accepts `s`, `m`, `h`, `d` and `w` units
/// with optional decimals (`0.5h`, `.5h`), and compounds such as `1h30m` or `1h 30m`.
/// Zero, negative and malformed inputs are rejected, and so is anything longer than
/// `MAX_DURATION_SECS`.
pub fn parse_duration(input: &str) -> Result<u64> {
    let text = input.trim();
    let invalid = || {
        Error::Usage(format!(
            "invalid duration '{input}' (use formats like 30s, 30m, 2h, 1d, 1w, .5h or 1h 30m)"
        ))
    };
    if text.is_empty() {
        return Err(invalid());
    }
    let mut total = 0f64;
    let mut rest = text;
    let mut units_seen = String::new();
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(invalid)?;
        if number_len == 0 {
            return Err(invalid());
        }
        let (number, tail) = rest.split_at(number_len);
        if number == "." || number.ends_with('.') || number.matches('.').count() > 1 {
            return Err(invalid());
        }
        let value: f64 = number.parse().map_err(|_| invalid())?;
        let unit_len = tail
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let factor = match unit {
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "d" => 86400.0,
            "w" => 7.0 * 86400.0,
            _ => return Err(invalid()),
        };
        // `1d1d` is a typo, not two days.
        if units_seen.contains(unit) {
            return Err(invalid());
        }
        units_seen.push_str(unit);
        total += value * factor;
        // Components may be separated by spaces (`1h 30m`), but a unit never.
        rest = tail.trim_start();
    }
    if !total.is_finite() || total > MAX_DURATION_SECS as f64 {
        return Err(Error::Usage(format!(
            "duration '{input}' is too long (at most {})",
            format_limit(MAX_DURATION_SECS as i64)
        )));
    }
    let seconds = total.round() as u64;
    if seconds == 0 {
        return Err(Error::Usage(format!(
            "invalid duration '{input}': must be longer than zero"
        )));
    }
    Ok(seconds)
}

/// A limit as it was most likely written: `365d`, `24h`, `90m`, `45s`.
pub fn format_limit(seconds: i64) -> String {
    match seconds {
        s if s % 86400 == 0 => format!("{}d", s / 86400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// Formats seconds as `0h 15m 30s` (hours unbounded), as the reference shows.
pub fn format_duration(seconds: i64) -> String {
    let s = seconds.max(0);
    format!("{}h {}m {}s", s / 3600, (s % 3600) / 60, s % 60)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_reference_formats() {
        assert_eq!(parse_duration("30s").unwrap(), 30);
        assert_eq!(parse_duration("30m").unwrap(), 1800);
        assert_eq!(parse_duration("2h").unwrap(), 7200);
        assert_eq!(parse_duration("1d").unwrap(), 86400);
        assert_eq!(parse_duration("0.5h").unwrap(), 1800);
        assert_eq!(parse_duration("1.5d").unwrap(), 129600);
        assert_eq!(parse_duration("1h30m").unwrap(), 5400);
        assert_eq!(parse_duration(" 2h ").unwrap(), 7200);
        assert_eq!(parse_duration(".5h").unwrap(), 1800);
        assert_eq!(parse_duration("1h 30m").unwrap(), 5400);
        assert_eq!(parse_duration("1w").unwrap(), 604800);
        assert_eq!(parse_duration("365d").unwrap(), MAX_DURATION_SECS);
    }

    #[test]
    fn absurd_lengths_are_too_long_not_malformed() {
        for long in ["100000000d", "99999999999d", "366d", "53w"] {
            assert_eq!(
                parse_duration(long).unwrap_err().to_string(),
                format!("duration '{long}' is too long (at most 365d)")
            );
        }
    }

    #[test]
    fn rejects_bad_input() {
        for bad in [
            "", "0", "0m", "0s", "-5m", "5", "h", "1x", "1.2.3h", ".h", "5.h", "1h-", "abc", "1 h",
            "NaNh", "1e9d", "1d1d", "1h30m2h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn formats_like_reference() {
        assert_eq!(format_duration(930), "0h 15m 30s");
        assert_eq!(format_duration(3735), "1h 2m 15s");
        assert_eq!(format_duration(95520), "26h 32m 0s");
        assert_eq!(format_duration(-4), "0h 0m 0s");
    }

    #[test]
    fn limits_read_as_written() {
        assert_eq!(format_limit(86400), "1d");
        assert_eq!(format_limit(7200), "2h");
        assert_eq!(format_limit(90 * 60), "90m");
        assert_eq!(format_limit(45), "45s");
    }

    proptest! {
        #[test]
        fn single_units_roundtrip(n in 1u64..52, unit in prop::sample::select(vec![('s', 1u64), ('m', 60), ('h', 3600), ('d', 86400), ('w', 604800)])) {
            let text = format!("{n}{}", unit.0);
            prop_assert_eq!(parse_duration(&text).unwrap(), n * unit.1);
        }

        #[test]
        fn never_panics(text in ".{0,12}") {
            let _ = parse_duration(&text);
        }
    }
}
