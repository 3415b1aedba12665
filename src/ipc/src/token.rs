//! Share tokens and re-attach secrets: 128 random bits, printable.
//!
//! A token is a capability: whoever has it may import the buffer (subject to
//! policy). It must therefore be unguessable (from the OS's random source)
//! and must not encode the buffer id.

use std::fmt;
use std::str::FromStr;

const PREFIX: &str = "dmab1-";
const BYTES: usize = 16;

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ShareToken([u8; BYTES]);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("share token must look like {PREFIX}<32 hex digits>")]
    Malformed,
    #[error("the OS random source failed: {0}")]
    Random(String),
}

/// Random bytes fetched from the kernel in batches: every allocation and
/// import mints a secret, and a `getrandom` call each would be a syscall on
/// the request path. The bytes are the kernel CSPRNG's own, handed out once
/// each; the batch lives only in this thread.
struct RandomPool {
    bytes: [u8; 4096],
    used: usize,
}

thread_local! {
    static POOL: std::cell::RefCell<RandomPool> = const {
        std::cell::RefCell::new(RandomPool { bytes: [0; 4096], used: 4096 })
    };
}

fn fill_random(out: &mut [u8; BYTES]) -> Result<(), TokenError> {
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.used + BYTES > pool.bytes.len() {
            getrandom::getrandom(&mut pool.bytes).map_err(|e| TokenError::Random(e.to_string()))?;
            pool.used = 0;
        }
        let start = pool.used;
        out.copy_from_slice(&pool.bytes[start..start + BYTES]);
        // Never hand the same bytes out twice.
        pool.bytes[start..start + BYTES].fill(0);
        pool.used += BYTES;
        Ok(())
    })
}

impl ShareToken {
    pub fn random() -> Result<Self, TokenError> {
        let mut bytes = [0u8; BYTES];
        fill_random(&mut bytes)?;
        Ok(ShareToken(bytes))
    }
}

/// Never print the secret in debug output (logs end up in journals).
impl fmt::Debug for ShareToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ShareToken(..)")
    }
}

/// Every allocation and import prints a fresh secret, so the text is built
/// in one stack buffer and written once: a `write!` per byte through the
/// formatting machinery cost more than the rest of the secret's making.
impl fmt::Display for ShareToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut text = [0u8; PREFIX.len() + 2 * BYTES];
        text[..PREFIX.len()].copy_from_slice(PREFIX.as_bytes());
        for (i, b) in self.0.iter().enumerate() {
            text[PREFIX.len() + 2 * i] = DIGITS[usize::from(b >> 4)];
            text[PREFIX.len() + 2 * i + 1] = DIGITS[usize::from(b & 0xf)];
        }
        // Only ASCII went in.
        f.write_str(std::str::from_utf8(&text).map_err(|_| fmt::Error)?)
    }
}

impl FromStr for ShareToken {
    type Err = TokenError;

    fn from_str(s: &str) -> Result<Self, TokenError> {
        let hex = s.trim().strip_prefix(PREFIX).ok_or(TokenError::Malformed)?;
        // Hex digits only: `from_str_radix` alone would take a sign.
        if hex.len() != BYTES * 2 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(TokenError::Malformed);
        }
        let mut bytes = [0u8; BYTES];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
                .map_err(|_| TokenError::Malformed)?;
        }
        Ok(ShareToken(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_text() {
        let t = ShareToken::random().expect("random");
        let text = t.to_string();
        assert!(text.starts_with(PREFIX));
        assert_eq!(text.len(), PREFIX.len() + 32);
        assert_eq!(text.parse::<ShareToken>(), Ok(t));
    }

    #[test]
    fn text_is_the_prefix_and_the_bytes_in_lowercase_hex() {
        let t = ShareToken([
            0x00, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0xf0, 0x0f, 0x10, 0xa5, 0x5a,
            0xfe, 0xff,
        ]);
        assert_eq!(t.to_string(), "dmab1-000123456789abcdeff00f10a55afeff");
    }

    #[test]
    fn tokens_never_repeat_across_pool_refills() {
        let tokens: std::collections::HashSet<ShareToken> = (0..2000)
            .map(|_| ShareToken::random().expect("random"))
            .collect();
        assert_eq!(tokens.len(), 2000);
    }

    #[test]
    fn malformed_tokens_are_refused() {
        for bad in [
            "",
            "dmab1-",
            "dmab1-zz",
            "xxxx-00112233445566778899aabbccddeeff",
            "dmab1-00112233445566778899aabbccddeef",
            "dmab1-00112233445566778899aabbccddeeffff",
            "dmab1-0011223344556677889éaabbccddee",
            "dmab1-+0112233445566778899aabbccddeeff",
            "dmab1-00112233445566778899aabbccddee+f",
        ] {
            assert_eq!(
                bad.parse::<ShareToken>(),
                Err(TokenError::Malformed),
                "{bad}"
            );
        }
    }
}
