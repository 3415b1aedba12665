//! Text clients give (their own names, their buffers'), on its way to
//! logs, the D-Bus views and terminals.

/// Whether `c` must not reach a reader as it is: a control character
/// (a NUL ends a D-Bus string, an escape sequence drives a terminal), or
/// a bidirectional formatting character, which reorders the text around
/// it as displayed ("Trojan Source"): a client could make its name show
/// as another's, or a log line say what it does not.
pub fn is_hidden_control(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        )
}

/// Text a client chose, as the views and logs show it: each hidden
/// control (see [`is_hidden_control`]) as U+FFFD, so that every reader of
/// D-Bus, not only `dmabrokerctl`, is spared it.
pub fn shown(raw: &str) -> String {
    raw.chars().map(shown_char).collect()
}

/// `c` as [`shown`] shows it.
pub fn shown_char(c: char) -> char {
    if is_hidden_control(c) {
        '\u{fffd}'
    } else {
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_and_bidirectional_formatting_characters_are_hidden() {
        for c in [
            '\0', '\u{1b}', '\u{9b}', '\u{202e}', '\u{2066}', '\u{2069}', '\u{200f}', '\u{061c}',
        ] {
            assert!(is_hidden_control(c), "{c:?}");
        }
        for c in ['a', 'é', 'ا', '漢', ' ', '\u{fffd}'] {
            assert!(!is_hidden_control(c), "{c:?}");
        }
    }
}
