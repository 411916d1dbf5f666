//! Points in time for the history commands: parsing what people type and printing UTC.

/// Parse a point in time: `2026-11-25T10:00:00Z` (UTC; fractions and a space instead of
/// `T` allowed), `@1764064800` (Unix seconds), or a duration ago: `90s`, `10m`, `2h`, `1d`.
/// Returns ns since the Unix epoch.
pub fn parse_point(s: &str, now_ns: i64) -> Result<i64, String> {
    let s = s.trim();
    let bad = || {
        format!("cannot read time '{s}': use e.g. 10m (ten minutes ago), 2h, 1d, @UNIX-SECONDS or 2026-11-25T10:00:00Z")
    };
    if let Some(secs) = s.strip_prefix('@') {
        let v: f64 = secs.parse().map_err(|_| bad())?;
        return Ok((v * 1e9) as i64);
    }
    if let Some(unit) = s.chars().last().filter(|c| "smhd".contains(*c)) {
        if let Ok(n) = s[..s.len() - 1].parse::<f64>() {
            if !(n.is_finite() && n >= 0.0) {
                return Err(bad());
            }
            let mult = match unit {
                's' => 1e9,
                'm' => 60e9,
                'h' => 3600e9,
                _ => 86400e9,
            };
            return Ok(now_ns - (n * mult) as i64);
        }
    }
    parse_rfc3339(s).ok_or_else(bad)
}

fn parse_rfc3339(s: &str) -> Option<i64> {
    let s = s.strip_suffix('Z').or_else(|| s.strip_suffix("+00:00")).unwrap_or(s);
    let (date, time) = s.split_once(['T', ' '])?;
    let mut d = date.split('-');
    let (y, mo, da): (i64, i64, i64) = (
        d.next()?.parse().ok()?,
        d.next()?.parse().ok()?,
        d.next()?.parse().ok()?,
    );
    if d.next().is_some() || !(1..=12).contains(&mo) || !(1..=31).contains(&da) {
        return None;
    }
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut t = hms.split(':');
    let (h, mi): (i64, i64) = (t.next()?.parse().ok()?, t.next()?.parse().ok()?);
    let sec: i64 = t.next().map(|x| x.parse().ok()).unwrap_or(Some(0))?;
    if t.next().is_some() || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let frac_ns: i64 = if frac.is_empty() {
        0
    } else {
        if !frac.chars().all(|c| c.is_ascii_digit()) {
            return None;
        }
        format!("{:0<9}", &frac[..frac.len().min(9)]).parse().ok()?
    };
    let days = days_from_civil(y, mo, da);
    Some(((days * 86400 + h * 3600 + mi * 60 + sec) * 1_000_000_000) + frac_ns)
}

/// Days since 1970-01-01 (proleptic Gregorian).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// `2026-11-25T10:00:00.123Z`
pub fn format_utc(ns: i64) -> String {
    let secs = ns.div_euclid(1_000_000_000);
    let ms = ns.rem_euclid(1_000_000_000) / 1_000_000;
    let (y, m, d) = civil_from_days(secs.div_euclid(86400));
    let r = secs.rem_euclid(86400);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        r / 3600,
        r % 3600 / 60,
        r % 60
    )
}

/// A duration: `90s`, `30m`, `24h`, `7d` or plain seconds.
pub fn parse_duration_secs(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let bad = || format!("cannot read duration '{s}': use e.g. 90s, 30m, 24h or 7d");
    let (num, mult) = match s.chars().last() {
        Some('s') => (&s[..s.len() - 1], 1),
        Some('m') => (&s[..s.len() - 1], 60),
        Some('h') => (&s[..s.len() - 1], 3600),
        Some('d') => (&s[..s.len() - 1], 86400),
        _ => (s, 1),
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    n.checked_mul(mult).ok_or_else(bad)
}

/// `1d 2h`, `24h`, `90s`.
pub fn format_duration_secs(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86400, secs % 86400 / 3600, secs % 3600 / 60, secs % 60);
    let mut v = Vec::new();
    for (n, u) in [(d, "d"), (h, "h"), (m, "m"), (s, "s")] {
        if n > 0 {
            v.push(format!("{n}{u}"));
        }
    }
    if v.is_empty() {
        "0s".into()
    } else {
        v.join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_in_time() {
        let now = 1_764_064_800_000_000_000; // 2025-11-25T10:00:00Z
        assert_eq!(parse_point("2025-11-25T10:00:00Z", 0), Ok(now));
        assert_eq!(parse_point("2025-11-25 10:00:00.5", 0), Ok(now + 500_000_000));
        assert_eq!(parse_point("@1764064800", 0), Ok(now));
        assert_eq!(parse_point("10m", now), Ok(now - 600_000_000_000));
        assert_eq!(parse_point("1d", now), Ok(now - 86_400_000_000_000));
        assert_eq!(format_utc(now + 123_000_000), "2025-11-25T10:00:00.123Z");
        assert_eq!(format_utc(0), "1970-01-01T00:00:00.000Z");
        for bad in [
            "",
            "yesterday",
            "2025-13-01T00:00:00Z",
            "-5m",
            "10x",
            "2025-11-25T25:00:00Z",
        ] {
            assert!(parse_point(bad, now).is_err(), "{bad}");
        }
        assert_eq!(parse_duration_secs("24h"), Ok(86400));
        assert_eq!(parse_duration_secs("90"), Ok(90));
        assert!(parse_duration_secs("1w").is_err());
        assert_eq!(format_duration_secs(86400 + 7200 + 5), "1d 2h 5s");
        for ns in [0, now, 951_782_400_000_000_000, 4_102_444_800_000_000_000] {
            assert_eq!(parse_point(&format_utc(ns), 0), Ok(ns));
        }
    }
}
