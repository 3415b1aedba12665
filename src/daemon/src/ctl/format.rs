//! Numbers as a person reads them in a table cell.

use std::time::{SystemTime, UNIX_EPOCH};

/// Bytes in binary units with at most one decimal (`4 KiB`, `1.5 MiB`).
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else if (value - value.round()).abs() < 0.05 {
        format!("{} {}", value.round(), UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// A short duration from microseconds (`850µs`, `12.3ms`, `4.0s`, `3m05s`).
pub fn micros(us: u64) -> String {
    match us {
        0..=999 => format!("{us}µs"),
        1_000..=999_999 => format!("{:.1}ms", us as f64 / 1e3),
        1_000_000..=59_999_999 => format!("{:.1}s", us as f64 / 1e6),
        _ => seconds(us / 1_000_000),
    }
}

/// A long duration from seconds (`42s`, `3m05s`, `2h03m`, `4d02h`).
pub fn seconds(s: u64) -> String {
    match s {
        0..=59 => format!("{s}s"),
        60..=3_599 => format!("{}m{:02}s", s / 60, s % 60),
        3_600..=86_399 => format!("{}h{:02}m", s / 3_600, (s % 3_600) / 60),
        _ => format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3_600),
    }
}

/// Seconds elapsed since a time given in seconds since the epoch.
pub fn age_of(epoch_seconds: u64) -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    now.saturating_sub(epoch_seconds)
}

/// Text a client chose (its name, its buffers' names, its exe path) as it
/// may reach an admin's terminal: "" as "-", so that empty cells stay
/// visible, and control characters escaped (`\u{1b}`), so that no client
/// can send the terminal escape sequences (write the clipboard, move the
/// cursor over other rows) through `dmabrokerctl`.
pub fn or_dash(text: &str) -> String {
    if text.is_empty() {
        return "-".to_owned();
    }
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if crate::text::is_hidden_control(c) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(4096), "4 KiB");
        assert_eq!(bytes(1536 * 1024), "1.5 MiB");
        assert_eq!(bytes(1 << 30), "1 GiB");
    }

    #[test]
    fn client_text_reaches_the_terminal_without_control_characters() {
        assert_eq!(or_dash(""), "-");
        assert_eq!(or_dash("camera-0 é"), "camera-0 é");
        let shown = or_dash("cam\u{1b}]52;c;QUFB\u{7}\u{9b}2J\n");
        assert!(!shown.chars().any(char::is_control), "{shown:?}");
        assert_eq!(shown, "cam\\u{1b}]52;c;QUFB\\u{7}\\u{9b}2J\\u{a}");
        // A name that would display reversed ("Trojan Source").
        assert_eq!(or_dash("cam\u{202e}0-arem"), "cam\\u{202e}0-arem");
    }

    #[test]
    fn durations() {
        assert_eq!(micros(850), "850µs");
        assert_eq!(micros(12_345), "12.3ms");
        assert_eq!(micros(4_000_000), "4.0s");
        assert_eq!(micros(185_000_000), "3m05s");
        assert_eq!(seconds(7_380), "2h03m");
        assert_eq!(seconds(93_600), "1d02h");
    }
}
