//! Bounded changes to words that other processes write too.
//!
//! The broker changes buffer words and end words by compare-and-swap, on
//! its one thread and under its lock, in memory that holders (buffer words)
//! or the client (end words) can write as well. A loop "until it sticks" is
//! only as bounded as those writers are kind. On x86 a hostile writer costs
//! a few retries; but on an ARMv8.0 core without LSE atomics (Cortex-A53 and
//! A72, common on camera boards) every read-modify-write is a
//! load-exclusive/store-exclusive loop, and a process storing to any byte
//! of the word's cache line makes each store-exclusive fail: the loop, and
//! with it the broker, never finishes. `fetch_or`, `swap` and a strong
//! `compare_exchange` are such loops themselves there. So every change the
//! broker makes is at most [`ATTEMPTS`] single `compare_exchange_weak`s, and
//! a word that defeats them all is handled as one its writers tampered
//! with (see the callers). A holder's begin and end in a buffer word are
//! bounded the same way: any co-holder can write that word, and an end
//! runs in a guard's drop, so a hostile co-holder could otherwise stall
//! another process for good; a begin that gives up goes by message, an
//! end that gives up tells the broker (`bufferword::WordEnd::Contended`).

use std::sync::atomic::{AtomicU64, Ordering};

/// How many single attempts the broker makes at one change.
///
/// Honest writers cannot use them up. While the broker has a buffer word
/// taken no fast begin succeeds, so during one change of the broker's its
/// holders change it at most 33 times (the end of each of 32 bits, one of
/// them carrying a hand-off, and the end of the access handed off); an end
/// word has one other writer, its client's single end. A word not taken yet
/// (the take-over) sees begins and ends, but an honest change defeats an
/// attempt only by landing in the few instructions between the broker's
/// read and its compare-and-swap, and a failed compare-and-swap hands the
/// broker the new value at once: 64 such landings in a row take a writer
/// doing nothing else. Spurious failures of a weak compare-and-swap (a store-exclusive
/// losing its reservation to an interrupt or an eviction) are rare, and 64
/// leaves room for both. The cost is bounded too: an attempt costs at most
/// a cache-line transfer (some 100 ns on those boards), so a hostile writer
/// holds the broker for microseconds, once per word: a buffer word given up
/// on is broken and never changed again, and an end word given up on ends
/// its access by message.
pub const ATTEMPTS: u32 = 64;

/// Every attempt at a change failed: the word kept changing, or its cache
/// line kept being written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "a shared word changed under each of the broker's {ATTEMPTS} attempts to change it \
     (last read {last:#x})"
)]
pub struct Contended {
    /// The word as the last attempt found it: for the record only, since it
    /// may have changed again since.
    pub last: u64,
}

/// Tests only: called before each attempt at a change (the broker's, and a
/// holder's begin and end in a buffer word). It may write
/// the word, as a hostile holder does on any machine; returning true makes
/// the attempt fail without writing, as a store-exclusive does that lost
/// its reservation to a store elsewhere in the cache line, which no test
/// on x86 could otherwise provoke.
#[cfg(any(test, feature = "contention-hook"))]
pub type Hook = fn(&AtomicU64) -> bool;

/// What interferes with the broker's attempts on one mapping: nothing, but
/// in tests (feature `contention-hook`). Without the feature it has no
/// field, and the check compiles to nothing: the uncontended path costs
/// what it did.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Interference {
    #[cfg(any(test, feature = "contention-hook"))]
    pub(crate) hook: Option<Hook>,
}

impl Interference {
    /// Whether this attempt fails before it is made.
    #[inline(always)]
    fn defeats(&self, _word: &AtomicU64) -> bool {
        #[cfg(any(test, feature = "contention-hook"))]
        if let Some(hook) = self.hook {
            return hook(_word);
        }
        false
    }
}

/// Applies `f` to the word in at most [`ATTEMPTS`] single attempts.
/// `Ok(None)`: `f` left the word alone; `Ok(Some(replaced))`: the change
/// stuck, and `replaced` is the word it replaced in the same step.
/// `expected`: what the caller knows the word to be, if anything; the first
/// attempt then goes without a load, as a single compare-and-swap did (a
/// wrong guess only costs the attempt, which returns the word as it is).
pub(crate) fn update(
    word: &AtomicU64,
    interference: Interference,
    expected: Option<u64>,
    mut f: impl FnMut(u64) -> Option<u64>,
) -> Result<Option<u64>, Contended> {
    let mut current = expected.unwrap_or_else(|| word.load(Ordering::Acquire));
    for _ in 0..ATTEMPTS {
        let Some(wanted) = f(current) else {
            return Ok(None);
        };
        if interference.defeats(word) {
            current = word.load(Ordering::Acquire);
            continue;
        }
        match word.compare_exchange_weak(current, wanted, Ordering::AcqRel, Ordering::Acquire) {
            Ok(replaced) => return Ok(Some(replaced)),
            Err(now) => current = now,
        }
    }
    Err(Contended { last: current })
}
