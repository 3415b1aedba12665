//! Numbers as a person reads them in a table cell.

use std::time::{SystemTime, UNIX_EPOCH};

/// Bytes in binary units with at most one decimal (`4 KiB`, `1.5 MiB`).
/// A unit is left once the value shown in it would reach 1024: 4 KiB short
/// of 1 GiB is `1 GiB`, not `1024 MiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while unit + 1 < UNITS.len() && tenths(value) >= 10_240.0 {
        value /= 1024.0;
        unit += 1;
    }
    let shown = tenths(value);
    if unit == 0 {
        format!("{n} B")
    } else if shown % 10.0 == 0.0 {
        format!("{} {}", shown / 10.0, UNITS[unit])
    } else {
        format!("{:.1} {}", shown / 10.0, UNITS[unit])
    }
}

/// `value` in tenths, rounded: one rounding for the unit and the figure.
fn tenths(value: f64) -> f64 {
    (value * 10.0).round()
}

/// A short duration from microseconds (`850µs`, `12.3ms`, `4.0s`, `3m05s`).
/// A unit is left once the value rounded in it would reach the next one:
/// 999,999 µs is `1.0s`, not `1000.0ms`, and 59,999,999 µs `1m00s`, not
/// `60.0s`.
pub fn micros(us: u64) -> String {
    let tenths_ms = rounded_div(us, 100);
    let tenths_s = rounded_div(us, 100_000);
    if us < 1_000 {
        format!("{us}µs")
    } else if tenths_ms < 10_000 {
        format!("{}.{}ms", tenths_ms / 10, tenths_ms % 10)
    } else if tenths_s < 600 {
        format!("{}.{}s", tenths_s / 10, tenths_s % 10)
    } else {
        seconds(rounded_div(us, 1_000_000))
    }
}

/// `n / d` rounded half up, without overflowing near `u64::MAX`.
fn rounded_div(n: u64, d: u64) -> u64 {
    n / d + u64::from(n % d >= d.div_ceil(2))
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

/// `value` as JSON text, one field per line when `pretty`, with every
/// hidden control (`text::is_hidden_control`) written as a `\uXXXX`
/// escape: serde_json escapes only C0 controls, and `--json` output reaches
/// terminals too, where a C1 CSI (U+009B) drives them and a bidirectional
/// override reorders what they show. The daemon shows client text without
/// these, but one older than that still sends them. The value read back is
/// the same.
pub fn json<T: serde::Serialize + ?Sized>(value: &T, pretty: bool) -> serde_json::Result<String> {
    let text = if pretty {
        serde_json::to_string_pretty(value)?
    } else {
        serde_json::to_string(value)?
    };
    // Outside strings JSON text is ASCII with no control but whitespace,
    // which serde_json writes as space and newline only: every hidden
    // control is in a string, where an escape stands for it.
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if crate::text::is_hidden_control(c) && c != '\n' {
            for unit in c.encode_utf16(&mut [0; 2]) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        } else {
            out.push(c);
        }
    }
    Ok(out)
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

    /// A value that rounds up to the next unit is shown in it: "1024 MiB"
    /// and "1000.0ms" read as the wrong unit's worth.
    #[test]
    fn rounding_up_to_a_unit_boundary_moves_to_the_next_unit() {
        assert_eq!(bytes((1 << 30) - 4096), "1 GiB");
        assert_eq!(bytes((1 << 20) - 1), "1 MiB");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1023 * 1024 + 900), "1023.9 KiB");
        assert_eq!(bytes(u64::MAX), "16384 PiB");
        assert_eq!(micros(999_999), "1.0s");
        assert_eq!(micros(999_949), "999.9ms");
        assert_eq!(micros(59_999_999), "1m00s");
        assert_eq!(micros(59_949_999), "59.9s");
        assert_eq!(micros(60_000_000), "1m00s");
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

    /// `--json` goes to terminals too: what a client chose reaches them
    /// with no character that drives or reorders them, as `\uXXXX`.
    #[test]
    fn json_escapes_what_could_drive_or_reorder_a_terminal() {
        use crate::dbus::views::ClientView;
        let exe = "/tmp/x\u{9b}2J\u{202e}gpj.exe";
        let client = ClientView {
            name: "cam\u{1b}]0;x\u{7}".into(),
            exe: exe.into(),
            unit: "a\u{2066}b\u{7f}.scope".into(),
            ..Default::default()
        };
        for pretty in [true, false] {
            let text = json(&[&client], pretty).expect("json");
            // Pretty JSON breaks its lines between fields, never in a string.
            assert!(
                !text
                    .chars()
                    .any(|c| c != '\n' && crate::text::is_hidden_control(c)),
                "{text:?}"
            );
            let back: Vec<ClientView> = serde_json::from_str(&text).expect("parse");
            assert_eq!(
                back.as_slice(),
                std::slice::from_ref(&client),
                "nothing is lost"
            );
        }
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
