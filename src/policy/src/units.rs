//! Sizes and durations as administrators write them, and back.
//!
//! Binary multiples only: dma-heap memory is page-granular and every figure a
//! kernel or GPU driver prints is in powers of two, so `K` means 1024 here
//! exactly as it does in systemd's `MemoryMax=`. SI spellings (`KB`, `MB`) are
//! refused rather than guessed at, because a factor-of-1.05 surprise in a
//! memory limit is the kind of bug nobody notices until it matters.

use std::fmt;
use std::time::Duration;

const UNITS: [(&str, &str, u32); 4] = [
    ("K", "KiB", 10),
    ("M", "MiB", 20),
    ("G", "GiB", 30),
    ("T", "TiB", 40),
];

/// Parses `"256MiB"`, `"256 MiB"`, `"1G"`, `"4096"` or `"4096 B"`.
///
/// Returns a message (not an error type) because the caller attaches the
/// file position; the message alone must tell the administrator what to type.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let s = text.trim();
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, suffix) = s.split_at(digits_end);
    if digits.is_empty() {
        return Err(format!(
            "invalid size {text:?}: expected a whole number of bytes, optionally with a suffix K, M, G, T (or KiB, MiB, GiB, TiB)"
        ));
    }
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("invalid size {text:?}: number too large"))?;
    let suffix = suffix.trim_start();
    let shift = match suffix {
        "" | "B" => 0,
        _ => match UNITS
            .iter()
            .find(|(short, long, _)| suffix == *short || suffix == *long)
        {
            Some((_, _, shift)) => *shift,
            None => {
                let hint = if suffix.contains('.') || suffix.starts_with(',') {
                    " (fractions are not accepted: use the next smaller unit)"
                } else {
                    ""
                };
                return Err(format!(
                    "invalid size {text:?}: unknown suffix {suffix:?}{hint}; use K, M, G, T or KiB, MiB, GiB, TiB (all powers of 1024)"
                ));
            }
        },
    };
    number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("invalid size {text:?}: too large"))
}

/// A byte count for humans: refusal messages and logs.
///
/// Exact where the value is a whole number of some unit (which is the case
/// for anything written in a policy file), so that the figure in a refusal
/// can be searched for in the policy; approximate with one decimal otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        if let Some((unit, shift)) = exact_unit(n) {
            return write!(f, "{} {unit}", n >> shift);
        }
        if n < 1024 {
            return write!(f, "{n} bytes");
        }
        let (_, unit, shift) = UNITS
            .iter()
            .rev()
            .find(|(_, _, shift)| n >= 1u64 << shift)
            .copied()
            .unwrap_or(UNITS[0]);
        let div = 1u128 << shift;
        let tenths = (u128::from(n) * 10 + div / 2) / div;
        write!(f, "{}.{} {unit}", tenths / 10, tenths % 10)
    }
}

/// Convenience for callers composing messages.
pub fn format_size(bytes: u64) -> String {
    ByteSize(bytes).to_string()
}

/// The largest binary unit that divides `n`, if any (and `n` is not zero).
fn exact_unit(n: u64) -> Option<(&'static str, u32)> {
    if n == 0 {
        return None;
    }
    UNITS
        .iter()
        .rev()
        .find(|(_, _, shift)| n.trailing_zeros() >= *shift)
        .map(|(_, long, shift)| (*long, *shift))
}

/// A size as a TOML value that parses back to exactly `n`.
pub(crate) fn size_literal(n: u64) -> String {
    match exact_unit(n) {
        Some((unit, shift)) => format!("\"{} {unit}\"", n >> shift),
        None if i64::try_from(n).is_ok() => n.to_string(),
        // TOML integers are signed 64-bit; the string form has no such limit.
        None => format!("\"{n}\""),
    }
}

/// Parses `"500ms"`, `"2s"`, `"5min"`, `"1h"`; `"none"`/`"infinity"` give `None`.
///
/// `m` alone is refused: half of the people who write `500m` mean
/// milliseconds and the other half minutes, and a hold limit off by a factor
/// of 60000 either way is worse than an error at load time.
pub fn parse_duration(text: &str) -> Result<Option<Duration>, String> {
    let s = text.trim();
    if s == "none" || s == "infinity" {
        return Ok(None);
    }
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, suffix) = s.split_at(digits_end);
    if digits.is_empty() {
        return Err(format!(
            "invalid duration {text:?}: expected a whole number with a unit (ms, s, min, h), or \"none\""
        ));
    }
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("invalid duration {text:?}: number too large"))?;
    let ms_per_unit: u64 = match suffix.trim_start() {
        "ms" => 1,
        "s" => 1000,
        "min" => 60_000,
        "h" => 3_600_000,
        "" => {
            return Err(format!(
                "invalid duration {text:?}: a unit is required (ms, s, min, h)"
            ))
        }
        "m" => {
            return Err(format!(
                "invalid duration {text:?}: \"m\" is ambiguous; write \"ms\" or \"min\""
            ))
        }
        other => {
            return Err(format!(
                "invalid duration {text:?}: unknown unit {other:?}; use ms, s, min or h"
            ))
        }
    };
    if number == 0 {
        return Err(format!(
            "invalid duration {text:?}: must be positive; write \"none\" for no limit"
        ));
    }
    let ms = number
        .checked_mul(ms_per_unit)
        .ok_or_else(|| format!("invalid duration {text:?}: too large"))?;
    Ok(Some(Duration::from_millis(ms)))
}

/// A duration as a TOML string that parses back to the same value (to the
/// millisecond, the file format's resolution).
pub(crate) fn duration_literal(d: Option<Duration>) -> String {
    let Some(d) = d else {
        return "\"none\"".to_string();
    };
    let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1);
    for (unit, per) in [("h", 3_600_000), ("min", 60_000), ("s", 1000)] {
        if ms % per == 0 {
            return format!("\"{}{unit}\"", ms / per);
        }
    }
    format!("\"{ms}ms\"")
}

/// A duration for humans, in the same spelling the file uses.
pub fn format_duration(d: Duration) -> String {
    duration_literal(Some(d)).trim_matches('"').to_string()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("4096 B").unwrap(), 4096);
        assert_eq!(parse_size("1K").unwrap(), 1024);
        assert_eq!(parse_size("1KiB").unwrap(), 1024);
        assert_eq!(parse_size("256MiB").unwrap(), 256 << 20);
        assert_eq!(parse_size(" 256 MiB ").unwrap(), 256 << 20);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("1TiB").unwrap(), 1 << 40);
        for bad in [
            "",
            "MiB",
            "12 MB",
            "1.5G",
            "-1",
            "1 GB",
            "99999999999999999999",
            "20000000T",
            "1 mib",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
        assert!(parse_size("1.5G").unwrap_err().contains("fractions"));
    }

    #[test]
    fn size_display() {
        assert_eq!(format_size(512 << 20), "512 MiB");
        assert_eq!(format_size(1 << 30), "1 GiB");
        assert_eq!(format_size(1536 << 20), "1536 MiB");
        assert_eq!(format_size(1000), "1000 bytes");
        assert_eq!(format_size(0), "0 bytes");
        assert_eq!(format_size(1_500_000), "1.4 MiB");
        assert_eq!(format_size(u64::MAX), "16777216.0 TiB");
    }

    #[test]
    fn size_literals_round_trip() {
        for n in [
            0,
            1,
            1000,
            1024,
            4097,
            256 << 20,
            u64::MAX,
            u64::MAX - 1,
            1 << 63,
        ] {
            let lit = size_literal(n);
            let back = match lit.strip_prefix('"') {
                Some(s) => parse_size(s.trim_end_matches('"')).unwrap(),
                None => lit.parse::<u64>().unwrap(),
            };
            assert_eq!(back, n, "{lit}");
        }
    }

    #[test]
    fn durations() {
        let ms = |n| Some(Duration::from_millis(n));
        assert_eq!(parse_duration("500ms").unwrap(), ms(500));
        assert_eq!(parse_duration("2s").unwrap(), ms(2000));
        assert_eq!(parse_duration("2 s").unwrap(), ms(2000));
        assert_eq!(parse_duration("5min").unwrap(), ms(300_000));
        assert_eq!(parse_duration("1h").unwrap(), ms(3_600_000));
        assert_eq!(parse_duration("none").unwrap(), None);
        assert_eq!(parse_duration("infinity").unwrap(), None);
        for bad in [
            "",
            "500",
            "0s",
            "5m",
            "1.5s",
            "2 sec",
            "s",
            "99999999999999999999h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
        assert!(parse_duration("5m").unwrap_err().contains("ambiguous"));
    }

    #[test]
    fn duration_literals_round_trip() {
        for n in [1, 999, 1000, 1500, 60_000, 90_000, 3_600_000, 7_200_001] {
            let d = Some(Duration::from_millis(n));
            let lit = duration_literal(d);
            assert_eq!(parse_duration(lit.trim_matches('"')).unwrap(), d, "{lit}");
        }
        assert_eq!(duration_literal(None), "\"none\"");
        assert_eq!(format_duration(Duration::from_millis(500)), "500ms");
    }
}
