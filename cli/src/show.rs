//! Text for people: store times as UTC dates, ages, message content in
//! one line. Shared by `migrate`, `inspect` and `chats`.

use std::fmt::Write as _;
use std::time::Duration;

use chatstate_model::{Part, Timestamp};

/// Turns a library error into the CLI's, in one line: a store error's
/// text already carries its causes, which anyhow's chain would repeat.
pub(crate) fn flat<E: std::fmt::Display>(context: &'static str) -> impl FnOnce(E) -> anyhow::Error {
    move |e| anyhow::anyhow!("{context}: {e}")
}

/// A store time as `2026-12-03 13:40:01.123456Z` (UTC).
pub(crate) fn utc(t: Timestamp) -> String {
    let secs = t.0.div_euclid(1_000_000);
    let micros = t.0.rem_euclid(1_000_000);
    let days = secs.div_euclid(86_400);
    let of_day = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{micros:06}Z",
        of_day / 3600,
        of_day % 3600 / 60,
        of_day % 60
    )
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard
/// Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// An age in microseconds, rounded for reading (`850 ms`, `12.3 s`,
/// `4 min 05 s`, `2 h 03 min`). A negative age (a clock step) reads 0.
pub(crate) fn age(us: i64) -> String {
    let d = Duration::from_micros(u64::try_from(us).unwrap_or(0));
    let s = d.as_secs();
    if s == 0 {
        format!("{} ms", d.as_millis())
    } else if s < 120 {
        format!("{:.1} s", d.as_secs_f64())
    } else if s < 7200 {
        format!("{} min {:02} s", s / 60, s % 60)
    } else {
        format!("{} h {:02} min", s / 3600, s % 3600 / 60)
    }
}

/// Message content in one line: text quoted and cut at `max` characters,
/// tool parts by name and call id.
pub(crate) fn content(parts: &[Part], max: usize) -> String {
    let mut out = String::new();
    for part in parts {
        if !out.is_empty() {
            out.push(' ');
        }
        match part {
            Part::Text { text } => {
                let cut: String = text.chars().take(max).collect();
                let more = if cut.len() < text.len() { "…" } else { "" };
                let _ = write!(out, "{:?}{more}", cut);
            }
            Part::ToolCall {
                tool_call_id,
                tool_name,
                ..
            } => {
                let _ = write!(out, "[tool-call {tool_name} {tool_call_id}]");
            }
            Part::ToolResult {
                tool_call_id,
                tool_name,
                is_error,
                ..
            } => {
                let error = if *is_error { " error" } else { "" };
                let _ = write!(out, "[tool-result {tool_name} {tool_call_id}{error}]");
            }
            Part::Other(_) => out.push_str("[other part]"),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_times_read_as_utc_dates() {
        let cases = [
            (0, "1970-01-01 00:00:00.000000Z"),
            (951_782_400_000_001, "2000-02-29 00:00:00.000001Z"),
            (1_796_304_001_500_000, "2026-12-03 13:20:01.500000Z"),
            (-1, "1969-12-31 23:59:59.999999Z"),
        ];
        for (us, want) in cases {
            assert_eq!(utc(Timestamp(us)), want, "{us}");
        }
    }

    #[test]
    fn ages_round_for_reading() {
        let cases = [
            (-5, "0 ms"),
            (850_000, "850 ms"),
            (12_340_000, "12.3 s"),
            (245_000_000, "4 min 05 s"),
            (7_380_000_000, "2 h 03 min"),
        ];
        for (us, want) in cases {
            assert_eq!(age(us), want, "{us}");
        }
    }

    #[test]
    fn content_reads_in_one_line() {
        let parts = [Part::text("hello there"), Part::tool_call("c1", "ask_user")];
        assert_eq!(content(&parts, 5), "\"hello\"… [tool-call ask_user c1]");
    }
}
