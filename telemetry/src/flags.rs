//! Flag parsing shared by both binaries.

use std::time::Duration;

/// Parses a duration flag: Go's syntax, as kube-proxy's flags and configuration take it (`30s`,
/// `1m0s`, `1h30m`, `1.5h`, `500ms`: see [`parse_go_duration`]), or a bare number of seconds.
/// Values that do not fit a `Duration` are an error, not a panic.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_digit() || c == '.') {
        let n: f64 = s.parse().map_err(|_| bad(s))?;
        return Duration::try_from_secs_f64(n).map_err(|_| format!("{s:?} is out of range"));
    }
    parse_go_duration(s)
}

/// Go's `time.ParseDuration`, which a KubeProxyConfiguration uses: a sequence of decimal
/// numbers with units (`ns`, `us`, `ms`, `s`, `m`, `h`); `0` alone is zero. Negative durations
/// are refused: none of kube-proxy's durations means anything below zero.
pub fn parse_go_duration(s: &str) -> Result<Duration, String> {
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() || s.starts_with('-') {
        return Err(bad(s));
    }
    let mut rest = s.strip_prefix('+').unwrap_or(s);
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_end = rest.find(|c: char| !c.is_ascii_digit() && c != '.').ok_or_else(|| bad(s))?;
        let (num, tail) = rest.split_at(num_end);
        let n: f64 = num.parse().map_err(|_| bad(s))?;
        let unit_end = tail.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_end);
        let scale = match unit {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad(s)),
        };
        total += n * scale;
        rest = tail;
    }
    Duration::try_from_secs_f64(total).map_err(|_| format!("{s:?} is out of range"))
}

fn bad(s: &str) -> String {
    format!("{s:?} is not a duration like 500ms, 30s, 1m0s or 1h30m")
}

#[cfg(test)]
mod tests {
    use super::{parse_duration, parse_go_duration};
    use std::time::Duration;

    #[test]
    fn flags_take_go_durations_and_bare_seconds() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1.5m"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        // As kube-proxy prints its defaults (`--conntrack-tcp-timeout-established=24h0m0s`).
        assert_eq!(parse_duration("24h0m0s"), Ok(Duration::from_secs(86400)));
        for bad in ["", "-1s", "5d", "s", "1..5", "99999999999999999999999999h", "99999999999999999999999"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_go_duration("1m0s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_go_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_go_duration("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_go_duration("300ms"), Ok(Duration::from_millis(300)));
        assert_eq!(parse_go_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_go_duration("0"), Ok(Duration::ZERO));
        // A bare number is not a Go duration (the configuration file must say its unit).
        for bad in ["", "30", "-1s", "1d", "s", "1m0", "1..5s", "1e3s", "99999999999999999999999h"] {
            assert!(parse_go_duration(bad).is_err(), "{bad}");
        }
    }
}
