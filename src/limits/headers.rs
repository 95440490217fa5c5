//! Rate limits as hosted APIs state them in response headers.
//!
//! - `OpenAI`: `x-ratelimit-limit-{requests,tokens}`, `x-ratelimit-remaining-{requests,tokens}` and
//!   `x-ratelimit-reset-{requests,tokens}`, the time until the limit is whole again as a Go
//!   duration (`20ms`, `1s`, `6m0s`, `1h2m3.5s`).
//! - Anthropic: `anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-{limit,remaining,reset}`,
//!   the reset as an RFC 3339 time (`2026-01-01T00:00:34Z`); token counts are rounded to the thousand.
//! - Both: `retry-after` (seconds, or an HTTP date) on a 429.
//!
//! Every number is a per-minute limit. Values that do not parse, and limits of zero or below (Azure
//! sends `-1` where no limit applies), are ignored, never guessed at.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Longest reset taken from a header: a day (a larger one is a daily quota, not a pacing signal).
const MAX_RESET: Duration = Duration::from_secs(86_400);

/// What a limit is counted in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Requests,
    /// Prompt and completion tokens together (`OpenAI`'s TPM, Anthropic's `tokens-*`).
    Tokens,
    /// Anthropic's input tokens per minute.
    InputTokens,
    /// Anthropic's output tokens per minute.
    OutputTokens,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Requests, Kind::Tokens, Kind::InputTokens, Kind::OutputTokens];

    pub fn label(self) -> &'static str {
        match self {
            Self::Requests => "requests",
            Self::Tokens => "tokens",
            Self::InputTokens => "input_tokens",
            Self::OutputTokens => "output_tokens",
        }
    }

    fn openai(self) -> Option<&'static [&'static str; 3]> {
        match self {
            Self::Requests => {
                Some(&["x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests"])
            }
            Self::Tokens => {
                Some(&["x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"])
            }
            Self::InputTokens | Self::OutputTokens => None,
        }
    }

    fn anthropic(self) -> &'static [&'static str; 3] {
        match self {
            Self::Requests => &[
                "anthropic-ratelimit-requests-limit",
                "anthropic-ratelimit-requests-remaining",
                "anthropic-ratelimit-requests-reset",
            ],
            Self::Tokens => &[
                "anthropic-ratelimit-tokens-limit",
                "anthropic-ratelimit-tokens-remaining",
                "anthropic-ratelimit-tokens-reset",
            ],
            Self::InputTokens => &[
                "anthropic-ratelimit-input-tokens-limit",
                "anthropic-ratelimit-input-tokens-remaining",
                "anthropic-ratelimit-input-tokens-reset",
            ],
            Self::OutputTokens => &[
                "anthropic-ratelimit-output-tokens-limit",
                "anthropic-ratelimit-output-tokens-remaining",
                "anthropic-ratelimit-output-tokens-reset",
            ],
        }
    }
}

/// One limit as a response stated it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Window {
    /// Per minute; `None` when the header is absent or not a positive number.
    pub limit: Option<u64>,
    pub remaining: Option<u64>,
    /// Until the limit is whole again.
    pub reset: Option<Duration>,
}

impl Window {
    fn is_empty(&self) -> bool {
        self.limit.is_none() && self.remaining.is_none() && self.reset.is_none()
    }
}

/// Everything about rate limits one response said.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RateLimitHeaders {
    /// By [`Kind`], in the order of [`Kind::ALL`].
    pub windows: [Option<Window>; 4],
    pub retry_after: Option<Duration>,
}

impl RateLimitHeaders {
    /// Reads the headers through `get` (a lookup by lower-case name), at wall-clock time `now`
    /// (Anthropic's resets are times, not durations).
    pub fn parse<'a>(get: impl Fn(&str) -> Option<&'a str>, now: SystemTime) -> Self {
        let mut out = Self::default();
        for (slot, kind) in out.windows.iter_mut().zip(Kind::ALL) {
            let mut window = Window::default();
            if let Some([limit, remaining, reset]) = kind.openai() {
                window.limit = get(limit).and_then(positive);
                window.remaining = get(remaining).and_then(count);
                window.reset = get(reset).and_then(go_duration);
            }
            let [limit, remaining, reset] = kind.anthropic();
            window.limit = window.limit.or_else(|| get(limit).and_then(positive));
            window.remaining = window.remaining.or_else(|| get(remaining).and_then(count));
            window.reset = window.reset.or_else(|| get(reset).and_then(|v| rfc3339_until(v, now)));
            *slot = (!window.is_empty()).then_some(window);
        }
        out.retry_after = get("retry-after").and_then(|v| parse_retry_after(v, now)).map(|d| d.min(MAX_RESET));
        out
    }

    pub fn window(&self, kind: Kind) -> Option<&Window> {
        self.windows.get(kind as usize).and_then(Option::as_ref)
    }

    /// Whether the response said anything about rate limits.
    pub fn is_empty(&self) -> bool {
        self.retry_after.is_none() && self.windows.iter().all(Option::is_none)
    }
}

/// `Retry-After` as delay-seconds or an HTTP-date (RFC 9110 10.2.3). A date in the past means now.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    // Not in the RFC, but some proxies send fractional seconds.
    if let Ok(secs) = value.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(86_400.0)));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
}

fn count(value: &str) -> Option<u64> {
    value.trim().parse::<u64>().ok()
}

fn positive(value: &str) -> Option<u64> {
    count(value).filter(|n| *n > 0)
}

/// A Go `time.Duration` string as `OpenAI` sends it: `20ms`, `1s`, `6m0s`, `1h2m3.5s`, `0s`.
pub fn go_duration(value: &str) -> Option<Duration> {
    let mut rest = value.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total = 0.0f64;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        if digits == 0 {
            return None;
        }
        let (number, after) = rest.split_at(digits);
        let number: f64 = number.parse().ok()?;
        let unit_len = after.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let seconds = match unit {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        total += number * seconds;
        rest = after;
    }
    (total.is_finite() && total >= 0.0).then(|| Duration::from_secs_f64(total).min(MAX_RESET))
}

/// How long from `now` until an RFC 3339 time (`2026-01-01T00:00:34Z`, fractions and offsets
/// allowed); zero for a time already past.
pub fn rfc3339_until(value: &str, now: SystemTime) -> Option<Duration> {
    let at = parse_rfc3339(value)?;
    let now = now.duration_since(UNIX_EPOCH).ok()?.as_secs_f64();
    Some(Duration::from_secs_f64((at - now).clamp(0.0, MAX_RESET.as_secs_f64())))
}

/// Seconds since the Unix epoch of an RFC 3339 date-time.
pub fn parse_rfc3339(value: &str) -> Option<f64> {
    let v = value.trim().as_bytes();
    let num = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = v.get(range)?;
        if part.is_empty() || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(part).ok()?.parse().ok()
    };
    if v.len() < 20 || v.get(4) != Some(&b'-') || v.get(7) != Some(&b'-') || v.get(13) != Some(&b':') {
        return None;
    }
    if !matches!(v.get(10), Some(b'T' | b't' | b' ')) || v.get(16) != Some(&b':') {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let mut i = 19;
    let mut fraction = 0.0;
    if v.get(i) == Some(&b'.') {
        let start = i + 1;
        i = start;
        while v.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        let digits = std::str::from_utf8(v.get(start..i)?).ok()?;
        if digits.is_empty() {
            return None;
        }
        fraction = format!("0.{digits}").parse().ok()?;
    }
    let offset = match v.get(i..)? {
        b"Z" | b"z" => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let hh = i64::from(h1.checked_sub(b'0')?) * 10 + i64::from(h2.checked_sub(b'0')?);
            let mm = i64::from(m1.checked_sub(b'0')?) * 10 + i64::from(m2.checked_sub(b'0')?);
            if hh > 23 || mm > 59 {
                return None;
            }
            let minutes = hh * 60 + mm;
            if *sign == b'+' {
                minutes
            } else {
                -minutes
            }
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second - offset * 60;
    Some(seconds as f64 + fraction)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil date of a day count since 1970-01-01 (the inverse of [`days_from_civil`]).
pub(crate) fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (if month <= 2 { yoe + era * 400 + 1 } else { yoe + era * 400 }, month, day)
}

/// `at` as RFC 3339 in UTC with whole seconds, as Anthropic sends its resets.
pub fn format_rfc3339(at: SystemTime) -> String {
    let secs = at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let secs = i64::try_from(secs).unwrap_or(i64::MAX / 2);
    let (year, month, day) = civil_from_days(secs.div_euclid(86_400));
    let rest = secs.rem_euclid(86_400);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rest / 3600, rest % 3600 / 60, rest % 60)
}

/// A duration as a Go `time.Duration` prints it, as `OpenAI` sends its resets: `20ms`, `1s`,
/// `1.5s`, `6m0s`, `1h0m0s`.
pub fn format_go_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let total = d.as_secs_f64();
    let hours = (total / 3600.0).floor();
    let minutes = ((total - hours * 3600.0) / 60.0).floor();
    let seconds = total - hours * 3600.0 - minutes * 60.0;
    let seconds = (seconds * 1000.0).round() / 1000.0;
    let seconds = if seconds.fract() == 0.0 { format!("{seconds:.0}") } else { format!("{seconds}") };
    if hours >= 1.0 {
        format!("{hours:.0}h{minutes:.0}m{seconds}s")
    } else if minutes >= 1.0 {
        format!("{minutes:.0}m{seconds}s")
    } else {
        format!("{seconds}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// 2026-01-01T00:00:00Z.
    const NEW_YEAR: u64 = 1_767_225_600;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn parse(pairs: &[(&str, &str)], now: SystemTime) -> RateLimitHeaders {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        RateLimitHeaders::parse(|name| map.get(name).map(String::as_str), now)
    }

    #[test]
    fn openai_headers() {
        let h = parse(
            &[
                ("x-ratelimit-limit-requests", "5000"),
                ("x-ratelimit-remaining-requests", "4999"),
                ("x-ratelimit-reset-requests", "12ms"),
                ("x-ratelimit-limit-tokens", "160000"),
                ("x-ratelimit-remaining-tokens", "159976"),
                ("x-ratelimit-reset-tokens", "6m0s"),
            ],
            at(0),
        );
        assert_eq!(
            h.window(Kind::Requests),
            Some(&Window { limit: Some(5000), remaining: Some(4999), reset: Some(Duration::from_millis(12)) })
        );
        assert_eq!(
            h.window(Kind::Tokens),
            Some(&Window { limit: Some(160_000), remaining: Some(159_976), reset: Some(Duration::from_secs(360)) })
        );
        assert_eq!(h.window(Kind::InputTokens), None);
        assert_eq!(h.retry_after, None);
    }

    #[test]
    fn anthropic_headers_with_retry_after() {
        let h = parse(
            &[
                ("anthropic-ratelimit-requests-limit", "50"),
                ("anthropic-ratelimit-requests-remaining", "0"),
                ("anthropic-ratelimit-requests-reset", "2026-01-01T00:00:34Z"),
                ("anthropic-ratelimit-input-tokens-limit", "40000"),
                ("anthropic-ratelimit-input-tokens-remaining", "18000"),
                ("anthropic-ratelimit-input-tokens-reset", "2026-01-01T01:00:00.5+01:00"),
                ("retry-after", "7"),
            ],
            at(NEW_YEAR),
        );
        assert_eq!(
            h.window(Kind::Requests),
            Some(&Window { limit: Some(50), remaining: Some(0), reset: Some(Duration::from_secs(34)) })
        );
        assert_eq!(h.window(Kind::InputTokens).and_then(|w| w.reset), Some(Duration::from_millis(500)));
        assert_eq!(h.window(Kind::Tokens), None);
        assert_eq!(h.retry_after, Some(Duration::from_secs(7)));
    }

    #[test]
    fn nonsense_is_ignored() {
        let h = parse(
            &[
                ("x-ratelimit-limit-tokens", "-1"),
                ("x-ratelimit-remaining-tokens", "-1"),
                ("x-ratelimit-reset-tokens", "soon"),
                ("x-ratelimit-limit-requests", "0"),
            ],
            at(0),
        );
        assert!(h.is_empty());
        assert!(parse(&[], at(0)).is_empty());
    }

    #[test]
    fn go_durations() {
        assert_eq!(go_duration("20ms"), Some(Duration::from_millis(20)));
        assert_eq!(go_duration("1s"), Some(Duration::from_secs(1)));
        assert_eq!(go_duration("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(go_duration("1h2m3.5s"), Some(Duration::from_secs_f64(3723.5)));
        assert_eq!(go_duration("0s"), Some(Duration::ZERO));
        assert_eq!(go_duration("250us"), Some(Duration::from_micros(250)));
        for bad in ["", "s", "5", "5x", "1.2.3s", "-1s", "1s2"] {
            assert_eq!(go_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn rfc3339_round_trip_and_offsets() {
        assert_eq!(format_rfc3339(at(NEW_YEAR + 34)), "2026-01-01T00:00:34Z");
        assert_eq!(parse_rfc3339("2026-01-01T00:00:34Z"), Some((NEW_YEAR + 34) as f64));
        assert_eq!(parse_rfc3339("2025-12-31T19:00:00-05:00"), Some(NEW_YEAR as f64));
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0.0));
        assert_eq!(rfc3339_until("2025-01-01T00:00:00Z", at(NEW_YEAR)), Some(Duration::ZERO));
        for bad in ["2026-13-01T00:00:00Z", "2026-01-01 00:00:00", "yesterday", "2026-01-01T00:00:00+5:00"] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn go_duration_formatting() {
        for (d, text) in [
            (Duration::from_millis(20), "20ms"),
            (Duration::from_secs(1), "1s"),
            (Duration::from_millis(1500), "1.5s"),
            (Duration::from_secs(360), "6m0s"),
            (Duration::from_secs(3600), "1h0m0s"),
        ] {
            assert_eq!(format_go_duration(d), text);
        }
    }

    proptest::proptest! {
        #[test]
        fn formatted_durations_parse_back(ms in 0u64..86_400_000) {
            let d = Duration::from_millis(ms);
            let back = go_duration(&format_go_duration(d)).expect("parses");
            proptest::prop_assert!((back.as_secs_f64() - d.as_secs_f64()).abs() < 1e-3);
        }

        #[test]
        fn formatted_times_parse_back(secs in 0u64..8_000_000_000) {
            proptest::prop_assert_eq!(parse_rfc3339(&format_rfc3339(at(secs))), Some(secs as f64));
        }

        #[test]
        fn parsing_never_panics(name in "[a-z-]{1,40}", value in "\\PC{0,40}") {
            let h = parse(&[(name.as_str(), value.as_str())], at(NEW_YEAR));
            for kind in Kind::ALL {
                if let Some(w) = h.window(kind) {
                    proptest::prop_assert!(w.limit != Some(0));
                    proptest::prop_assert!(w.reset.is_none_or(|r| r <= MAX_RESET));
                }
            }
        }

        #[test]
        fn headers_state_what_they_say(limit in 1u64..10_000_000, used in 0u64..10_000_000, reset_ms in 0u64..3_600_000) {
            let remaining = limit.saturating_sub(used);
            let reset = format_go_duration(Duration::from_millis(reset_ms));
            let (limit_s, remaining_s) = (limit.to_string(), remaining.to_string());
            let h = parse(
                &[("x-ratelimit-limit-tokens", limit_s.as_str()), ("x-ratelimit-remaining-tokens", remaining_s.as_str()),
                  ("x-ratelimit-reset-tokens", reset.as_str())],
                at(0),
            );
            let w = h.window(Kind::Tokens).copied().unwrap_or_default();
            proptest::prop_assert_eq!((w.limit, w.remaining), (Some(limit), Some(remaining)));
            let back = w.reset.map_or(-1.0, |r| r.as_secs_f64());
            proptest::prop_assert!((back - reset_ms as f64 / 1000.0).abs() < 1e-3);
        }
    }
}
