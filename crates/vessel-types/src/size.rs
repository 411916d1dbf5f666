//! Byte sizes as people write them: `512M`, `1G`, `1.5G`, `4096`.

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad size '{0}': use a number with an optional K, M, G or T suffix, e.g. 256M")]
pub struct SizeError(pub String);

/// Parse a size with binary suffixes (K = 1024). Fractions are allowed with a suffix.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let err = || SizeError(s.to_string());
    let t = s.trim();
    let (num, mult) = match t.char_indices().last().ok_or_else(err)? {
        (i, c) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'B' => 1,
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(err()),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    let num = num.strip_suffix(['i', 'I']).unwrap_or(num);
    if num.is_empty() || num.starts_with('-') || num.starts_with('+') {
        return Err(err());
    }
    if let Ok(n) = num.parse::<u64>() {
        return n.checked_mul(mult).ok_or_else(err);
    }
    let f: f64 = num.parse().map_err(|_| err())?;
    let v = f * mult as f64;
    if !f.is_finite() || v < 0.0 || v > u64::MAX as f64 {
        return Err(err());
    }
    Ok(v as u64)
}

/// Format bytes for people: `256M`, `1.5G`, `812K`.
pub fn format_size(b: u64) -> String {
    const UNITS: [(&str, u64); 4] = [("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)];
    for (u, m) in UNITS {
        if b >= m {
            return if b.is_multiple_of(m) {
                format!("{}{u}", b / m)
            } else {
                format!("{:.1}{u}", b as f64 / m as f64)
            };
        }
    }
    format!("{b}B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("256m"), Ok(256 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1GiB"), Err(SizeError("1GiB".into())));
        assert_eq!(parse_size("1Gi"), Err(SizeError("1Gi".into())));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("2Ki".trim_end_matches('i')), Ok(2048));
    }

    #[test]
    fn rejects_garbage() {
        for bad in ["", "M", "-1M", "abc", "1X", "99999999999999999999T", "nanM", "infG"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn formats_round_trip() {
        for s in ["256M", "1G", "4K", "3T"] {
            assert_eq!(format_size(parse_size(s).unwrap()), s);
        }
        assert_eq!(format_size(1536 << 20), "1.5G");
        assert_eq!(format_size(12), "12B");
    }
}
