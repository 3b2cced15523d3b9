//! Parsing user-given durations (`30s`, `2h`, `0.5h`, `1h30m`) and formatting them.

use crate::error::{Error, Result};

/// Parses a duration into whole seconds. Accepts `s`, `m`, `h`, `d` units with
/// optional decimals, and compounds such as `1h30m`. Zero, negative and malformed
/// inputs are rejected.
pub fn parse_duration(input: &str) -> Result<u64> {
    let text = input.trim();
    let invalid = || {
        Error::Usage(format!(
            "invalid duration '{input}' (use formats like 30s, 30m, 2h, 1d, 0.5h or 1h30m)"
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
        if number.starts_with('.') || number.ends_with('.') || number.matches('.').count() > 1 {
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
            _ => return Err(invalid()),
        };
        // `1d1d` is a typo, not two days.
        if units_seen.contains(unit) {
            return Err(invalid());
        }
        units_seen.push_str(unit);
        total += value * factor;
        rest = tail;
    }
    // Reject absurd values (more than ~100 years) rather than overflow later.
    if !total.is_finite() || total > 3.2e9 {
        return Err(invalid());
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
    }

    #[test]
    fn rejects_bad_input() {
        for bad in [
            "",
            "0",
            "0m",
            "0s",
            "-5m",
            "5",
            "h",
            "1x",
            "1.2.3h",
            ".5h",
            "5.h",
            "1h-",
            "abc",
            "1 h",
            "NaNh",
            "1e9d",
            "99999999999d",
            "1d1d",
            "1h30m2h",
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

    proptest! {
        #[test]
        fn single_units_roundtrip(n in 1u64..10_000, unit in prop::sample::select(vec![('s', 1u64), ('m', 60), ('h', 3600), ('d', 86400)])) {
            let text = format!("{n}{}", unit.0);
            prop_assert_eq!(parse_duration(&text).unwrap(), n * unit.1);
        }

        #[test]
        fn never_panics(text in ".{0,12}") {
            let _ = parse_duration(&text);
        }
    }
}
