//! End words: ending an access without a message when nobody waits for it.
//!
//! An uncontended begin+end used to cost a round trip plus a one-way `End`
//! message, and the `End` (a `sendmsg` for the client, a wake-up, a
//! `recvmsg` and a dispatch for the broker) was a third of the cycle. Yet
//! the broker only needs to hear about an end *promptly* when something
//! depends on it: a queued waiter, a no-autofence client told to wait for
//! the fence. Otherwise learning it at the next decision that involves the
//! buffer is just as correct.
//!
//! So each connection gets one shared page (a sealed memfd the broker
//! creates and sends with the welcome) of [`SLOTS`] 64-bit words. A grant
//! may name a slot and a generation; the word then says whether that access
//! is held or ended, and whether the broker is *watching* it (wants an
//! `End` message). The client ends by compare-and-swap, and sends `End`
//! only if the broker was watching. The broker, before any decision about
//! a buffer, reads the words of its fences: ended ones are retired on the
//! spot, and live ones are marked watched if the decision makes anyone wait
//! for them. Both sides change the word only by compare-and-swap, so
//! exactly one of "the broker saw it ended" and "the client saw it
//! watched" happens: no end is lost and none is counted twice.
//!
//! The page is the client's own: only it and the broker map it, and it
//! holds nothing but the state of that client's accesses. A client that
//! scribbles on it can only misreport its own accesses, which it could do
//! anyway by not ending them; the broker treats a word it does not
//! recognise as "held, end by message" and stops using the slot.
//!
//! Word layout: bits 0–1 state, bit 2 watched, bits 3–63 generation.
//! `docs/fences.md` ("Ending without a message") is the normative text.

use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::contention::{self, Interference};
use crate::mapping::{MapError, Mapping};

/// Size of the page, and so of the memfd the broker creates.
pub const PAGE_SIZE: usize = 4096;
/// Words per page: how many accesses of one connection can end without a
/// message at the same time. Grants beyond that end by message, as before.
pub const SLOTS: usize = PAGE_SIZE / std::mem::size_of::<u64>();

const STATE_MASK: u64 = 0b11;
const FREE: u64 = 0;
const HELD: u64 = 1;
const ENDED: u64 = 2;
const WATCHED: u64 = 1 << 2;
const GEN_SHIFT: u32 = 3;
/// Generations wrap within the 61 bits they have.
const GEN_MASK: u64 = u64::MAX >> GEN_SHIFT;

/// Where a granted access's end word is: carried in the grant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EndSlot {
    pub slot: u16,
    pub generation: u64,
}

impl EndSlot {
    fn held(self) -> u64 {
        ((self.generation & GEN_MASK) << GEN_SHIFT) | HELD
    }

    fn owns(self, word: u64) -> bool {
        word >> GEN_SHIFT == self.generation & GEN_MASK
    }
}

/// What the client must do after trying to end through the word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientEnd {
    /// Ended; the broker will see it when it next looks.
    Silent,
    /// Ended, but the broker is watching: send `End` so it hears now.
    Tell,
    /// The word is not this access's held word (revoked, a new connection,
    /// or scribbled on): end by message as a client without a page would.
    NotMine,
}

/// What the broker learns from an access's word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BrokerView {
    /// Still held. With `watch`, the word is now marked, so the client's end
    /// will come as a message.
    Held,
    /// Ended without the broker watching: retire it now.
    Ended,
    /// Ended after the broker started watching: its `End` message is on its
    /// way (or the client died sending it).
    EndedTelling,
    /// Not a word the broker wrote for this access: rely on messages only.
    Unrecognised,
}

/// One connection's page of end words, mapped by the broker and the client.
#[derive(Debug)]
pub struct EndWords {
    mapping: Mapping,
    interference: Interference,
}

impl EndWords {
    /// Maps the page. The fd must be (at least) [`PAGE_SIZE`] bytes and
    /// sealed against shrinking, or a later access could fault: the broker
    /// creates it so; a client trusts the broker it connected to.
    pub fn map(fd: BorrowedFd<'_>) -> Result<Self, MapError> {
        Ok(EndWords {
            mapping: Mapping::new(fd, PAGE_SIZE)?,
            interference: Interference::default(),
        })
    }

    /// Tests only: `hook` runs before each of the broker's attempts at
    /// changing a word of this page (see [`contention::Hook`]).
    #[cfg(any(test, feature = "contention-hook"))]
    pub fn interfere(&mut self, hook: contention::Hook) {
        self.interference.hook = Some(hook);
    }

    fn word(&self, slot: u16) -> Option<&AtomicU64> {
        let index = usize::from(slot);
        if index >= SLOTS {
            return None;
        }
        let base = self.mapping.as_slice().as_ptr().cast::<AtomicU64>();
        // SAFETY: the mapping is PAGE_SIZE bytes, page-aligned (so every
        // u64 in it is aligned), lives as long as `self`, and `index` is in
        // bounds. Every access to these bytes, here and in the other
        // process, goes through atomics, so there is no data race.
        Some(unsafe { &*base.add(index) })
    }

    /// Broker side: the access is granted; its word says held (and watched
    /// when someone already waits for it). Returns false for a bad slot.
    pub fn grant(&self, at: EndSlot, watched: bool) -> bool {
        let Some(word) = self.word(at.slot) else {
            return false;
        };
        let value = at.held() | if watched { WATCHED } else { 0 };
        word.store(value, Ordering::Release);
        true
    }

    /// Broker side: the access is gone by other means (end message,
    /// revocation, death, free); a late client end must not succeed.
    pub fn clear(&self, at: EndSlot) {
        if let Some(word) = self.word(at.slot) {
            word.store(FREE, Ordering::Release);
        }
    }

    /// Broker side: reads the access's state; with `watch`, a held word is
    /// marked watched in the same step.
    ///
    /// Marking is bounded (see `contention`): a word that defeats every
    /// attempt is `Unrecognised`, so its access ends by message only. Only
    /// the client writes there besides the broker, and its honest end is a
    /// single change; an end the client made silently while it kept the
    /// word busy is lost to the broker, which is the client's own doing, as
    /// with any word it scribbles on: its access is held until it hangs up.
    pub fn check(&self, at: EndSlot, watch: bool) -> BrokerView {
        let Some(word) = self.word(at.slot) else {
            return BrokerView::Unrecognised;
        };
        let mut view = BrokerView::Unrecognised;
        let marked = contention::update(word, self.interference, None, |current| {
            view = BrokerView::Unrecognised;
            if !at.owns(current) {
                return None;
            }
            match (current & STATE_MASK, current & WATCHED != 0) {
                (ENDED, false) => view = BrokerView::Ended,
                (ENDED, true) => view = BrokerView::EndedTelling,
                (HELD, true) => view = BrokerView::Held,
                (HELD, false) => {
                    view = BrokerView::Held;
                    return watch.then_some(current | WATCHED);
                }
                _ => {}
            }
            None
        });
        match marked {
            Ok(_) => view,
            Err(_) => BrokerView::Unrecognised,
        }
    }

    /// Client side: ends the access through its word.
    pub fn end(&self, at: EndSlot) -> ClientEnd {
        let Some(word) = self.word(at.slot) else {
            return ClientEnd::NotMine;
        };
        let mut current = word.load(Ordering::Acquire);
        loop {
            if !at.owns(current) || current & STATE_MASK != HELD {
                return ClientEnd::NotMine;
            }
            let ended = (current & !STATE_MASK) | ENDED;
            match word.compare_exchange_weak(current, ended, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) if current & WATCHED != 0 => return ClientEnd::Tell,
                Ok(_) => return ClientEnd::Silent,
                Err(now) => current = now,
            }
        }
    }

    /// Tests and fuzzing: write a raw word, as a misbehaving client could.
    pub fn scribble(&self, slot: u16, value: u64) {
        if let Some(word) = self.word(slot) {
            word.store(value, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsFd, OwnedFd};

    fn page() -> (OwnedFd, EndWords) {
        let fd = nix::sys::memfd::memfd_create(
            c"endwords-test",
            nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
        )
        .expect("memfd");
        nix::unistd::ftruncate(&fd, PAGE_SIZE as i64).expect("ftruncate");
        let words = EndWords::map(fd.as_fd()).expect("map");
        (fd, words)
    }

    const AT: EndSlot = EndSlot {
        slot: 7,
        generation: 42,
    };

    #[test]
    fn an_unwatched_end_is_silent_and_the_broker_retires_it() {
        let (_fd, words) = page();
        assert!(words.grant(AT, false));
        assert_eq!(words.check(AT, false), BrokerView::Held);
        assert_eq!(words.end(AT), ClientEnd::Silent);
        assert_eq!(words.check(AT, true), BrokerView::Ended);
    }

    #[test]
    fn a_watched_end_tells_the_broker() {
        let (_fd, words) = page();
        words.grant(AT, false);
        assert_eq!(words.check(AT, true), BrokerView::Held);
        assert_eq!(words.end(AT), ClientEnd::Tell);
        assert_eq!(words.check(AT, true), BrokerView::EndedTelling);
    }

    #[test]
    fn a_grant_can_start_watched() {
        let (_fd, words) = page();
        words.grant(AT, true);
        assert_eq!(words.end(AT), ClientEnd::Tell);
    }

    #[test]
    fn an_end_happens_once() {
        let (_fd, words) = page();
        words.grant(AT, false);
        assert_eq!(words.end(AT), ClientEnd::Silent);
        assert_eq!(words.end(AT), ClientEnd::NotMine);
    }

    #[test]
    fn a_cleared_or_reused_slot_refuses_the_old_generation() {
        let (_fd, words) = page();
        words.grant(AT, false);
        words.clear(AT);
        assert_eq!(words.end(AT), ClientEnd::NotMine);
        let next = EndSlot {
            generation: AT.generation + 1,
            ..AT
        };
        words.grant(next, false);
        assert_eq!(words.end(AT), ClientEnd::NotMine);
        assert_eq!(words.check(AT, true), BrokerView::Unrecognised);
        assert_eq!(words.end(next), ClientEnd::Silent);
    }

    #[test]
    fn scribbled_words_are_unrecognised_by_both_sides() {
        let (_fd, words) = page();
        words.grant(AT, false);
        for garbage in [0, u64::MAX, AT.held() | 3, AT.held() ^ (1 << 40)] {
            words.scribble(AT.slot, garbage);
            assert_eq!(
                words.check(AT, true),
                BrokerView::Unrecognised,
                "{garbage:#x}"
            );
            assert_eq!(words.end(AT), ClientEnd::NotMine, "{garbage:#x}");
        }
    }

    /// A client storing to its page's cache line, where atomics are
    /// load/store-exclusive loops, fails every attempt of the broker's to
    /// mark its word watched. The broker gives up after `ATTEMPTS` and no
    /// longer trusts the word (the access ends by message); unbounded, it
    /// spun for as long as the client went on. A look without marking
    /// makes no attempt at all.
    #[test]
    fn a_watch_that_never_sticks_gives_the_word_up() {
        let (_fd, mut words) = page();
        words.grant(AT, false);
        words.interfere(|_| {
            ATTEMPTS_SEEN.with(|n| n.set(n.get() + 1));
            true
        });
        assert_eq!(words.check(AT, false), BrokerView::Held);
        assert_eq!(ATTEMPTS_SEEN.with(|n| n.get()), 0);
        assert_eq!(words.check(AT, true), BrokerView::Unrecognised);
        assert_eq!(ATTEMPTS_SEEN.with(|n| n.get()), crate::contention::ATTEMPTS);
        assert_eq!(
            words.end(AT),
            ClientEnd::Silent,
            "the word was left as it was"
        );
    }

    thread_local! {
        static ATTEMPTS_SEEN: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
    }

    #[test]
    fn slots_past_the_page_are_refused() {
        let (_fd, words) = page();
        let outside = EndSlot {
            slot: SLOTS as u16,
            generation: 1,
        };
        assert!(!words.grant(outside, false));
        assert_eq!(words.end(outside), ClientEnd::NotMine);
        assert_eq!(words.check(outside, true), BrokerView::Unrecognised);
    }

    /// The race the design rests on: a client ending while the broker
    /// starts watching. Whatever the interleaving, exactly one side learns
    /// that a message is owed or that the access is over: the end is seen
    /// either as `Ended` (no message) or as `Tell` + `EndedTelling`.
    #[test]
    fn racing_end_and_watch_never_lose_the_end() {
        let (_fd, words) = page();
        let words = std::sync::Arc::new(words);
        for round in 0..20_000u64 {
            let at = EndSlot {
                slot: (round % SLOTS as u64) as u16,
                generation: round,
            };
            words.grant(at, false);
            let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
            let client = {
                let (words, barrier) = (words.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    words.end(at)
                })
            };
            barrier.wait();
            let watched = words.check(at, true);
            let ended = client.join().expect("client thread");
            let after = words.check(at, true);
            match (watched, ended) {
                // The broker marked it first: the client must tell.
                (BrokerView::Held, ClientEnd::Tell) => {
                    assert_eq!(after, BrokerView::EndedTelling)
                }
                // The client ended first: the broker saw it, no message.
                (BrokerView::Ended, ClientEnd::Silent) => assert_eq!(after, BrokerView::Ended),
                other => panic!("round {round}: inconsistent outcome {other:?}"),
            }
        }
    }
}
