//! Buffer words: begin and end an uncontended access without the broker.
//!
//! End words took the `End` message off an uncontended cycle, but every
//! begin was still a round trip, because a begin must see every other
//! client's fences. A buffer word puts the reservation itself where all of
//! the buffer's holders can see it: one 64-bit word in a page past the end
//! of a memfd buffer (only holders can map it, and it adds no fd). When the
//! broker has nothing to arbitrate on the buffer, a client begins by setting
//! its own bit with a compare-and-swap and ends by clearing it: no syscall.
//!
//! The broker stays in charge of everything that is not uncontended. Before
//! any decision about the buffer it *takes the word over* (sets `DAEMON`
//! with one fetch-or, which stops every fast begin), turns the bits it finds
//! into fences of their holders, and decides as it always did. While
//! `DAEMON` is set, a client that ends through the word also sends a
//! message, exactly as with a watched end word. When the buffer's
//! reservation is down to bit-backed accesses, with nobody waiting and no
//! mark owed, the broker hands the word back (clears `DAEMON` by
//! compare-and-swap).
//!
//! **Hand-off.** When the head of the queue waits for one holder's access
//! only, the broker writes the waiter into `NEXT`. The holder's end then
//! moves the access to the waiter in the same compare-and-swap and wakes it
//! with `FUTEX_WAKE` on the word: the waiter, asleep in `FUTEX_WAIT`, wakes
//! holding its access, one hop instead of two. Whichever compare-and-swap
//! comes first, the holder's hand-off or the broker's cancel, decides.
//!
//! Each holder of a buffer gets an index (at most [`MAX_HOLDERS`]); its
//! [`FastSlot`] also names the word's *epoch*, which the broker bumps when
//! it recycles the indices of departed holders, so a stale guard can never
//! clear a bit that now belongs to someone else.
//!
//! Layout (bit 0 is the least significant):
//!
//! | bits | field |
//! |---|---|
//! | 0–31 | READERS: one bit per holder index |
//! | 32–36 | WRITER_IDX |
//! | 37 | WRITER |
//! | 38 | WRITER_RW: the write access is read-write |
//! | 39 | DAEMON: the broker arbitrates; no fast begin |
//! | 40 | NEXT: a hand-off is planned |
//! | 41–42 | NEXT_KIND: 0 read, 1 write, 2 read-write |
//! | 43–47 | NEXT_IDX |
//! | 48–63 | EPOCH |
//!
//! Everything a hand-off waiter waits for (NEXT) is in the high 32 bits,
//! which is the futex word: futexes are 32 bits wide.
//!
//! `docs/fences.md` ("Buffer words") is the normative text.

use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use crate::contention::{self, Contended, Interference};
use crate::mapping::{MapError, Mapping};

/// Bytes past a memfd buffer's end that hold its word (a whole page, so the
/// buffer's own pages stay exactly the client's).
pub const WORD_PAGE: u64 = 4096;
/// Holders of one buffer that can use the word; later holders take the
/// message path for every access.
pub const MAX_HOLDERS: u8 = 32;

const READERS_MASK: u64 = 0xffff_ffff;
const WRITER_IDX_SHIFT: u32 = 32;
const IDX_MASK: u64 = 0x1f;
const WRITER: u64 = 1 << 37;
const WRITER_RW: u64 = 1 << 38;
const DAEMON: u64 = 1 << 39;
const NEXT: u64 = 1 << 40;
const NEXT_KIND_SHIFT: u32 = 41;
const NEXT_IDX_SHIFT: u32 = 43;
const EPOCH_SHIFT: u32 = 48;
const EPOCH_MASK: u64 = 0xffff;
/// Everything that says who holds the buffer or who is next.
const HOLD_MASK: u64 = READERS_MASK | (IDX_MASK << WRITER_IDX_SHIFT) | WRITER | WRITER_RW;
const NEXT_MASK: u64 = NEXT | (0b11 << NEXT_KIND_SHIFT) | (IDX_MASK << NEXT_IDX_SHIFT);

/// A holder's place in its buffer's word: carried in grants held in the
/// word and in `Planned` answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct FastSlot {
    pub index: u8,
    pub epoch: u16,
}

/// The kinds of access a word can carry: CPU accesses only (a device access
/// may end with a sync_file, which needs the broker).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WordAccess {
    Read,
    Write,
    ReadWrite,
}

impl WordAccess {
    /// The word's kind of a wire access; `None` for device accesses.
    pub fn of(access: crate::Access) -> Option<WordAccess> {
        match access {
            crate::Access::CpuRead => Some(WordAccess::Read),
            crate::Access::CpuWrite => Some(WordAccess::Write),
            crate::Access::CpuReadWrite => Some(WordAccess::ReadWrite),
            crate::Access::DeviceRead | crate::Access::DeviceWrite => None,
        }
    }

    /// The wire access a bit of this kind stands for.
    pub fn access(self) -> crate::Access {
        match self {
            WordAccess::Read => crate::Access::CpuRead,
            WordAccess::Write => crate::Access::CpuWrite,
            WordAccess::ReadWrite => crate::Access::CpuReadWrite,
        }
    }

    pub fn is_write(self) -> bool {
        !matches!(self, WordAccess::Read)
    }

    fn next_kind(self) -> u64 {
        match self {
            WordAccess::Read => 0,
            WordAccess::Write => 1,
            WordAccess::ReadWrite => 2,
        }
    }

    fn from_next_kind(bits: u64) -> Option<WordAccess> {
        match bits {
            0 => Some(WordAccess::Read),
            1 => Some(WordAccess::Write),
            2 => Some(WordAccess::ReadWrite),
            _ => None,
        }
    }
}

/// A decoded word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Word(pub u64);

impl Word {
    /// The word a broker that cannot trust this one leaves instead: no
    /// access, no plan, the next epoch (every slot handed out names an
    /// older one) and `DAEMON` set.
    pub fn voided(self) -> Word {
        Word(u64::from(self.epoch().wrapping_add(1)) << EPOCH_SHIFT | DAEMON)
    }

    pub fn epoch(self) -> u16 {
        ((self.0 >> EPOCH_SHIFT) & EPOCH_MASK) as u16
    }

    pub fn daemon(self) -> bool {
        self.0 & DAEMON != 0
    }

    pub fn readers(self) -> u32 {
        (self.0 & READERS_MASK) as u32
    }

    /// The writer's index and whether it also reads.
    pub fn writer(self) -> Option<(u8, WordAccess)> {
        (self.0 & WRITER != 0).then(|| {
            let index = ((self.0 >> WRITER_IDX_SHIFT) & IDX_MASK) as u8;
            let kind = if self.0 & WRITER_RW != 0 {
                WordAccess::ReadWrite
            } else {
                WordAccess::Write
            };
            (index, kind)
        })
    }

    /// The planned hand-off: the waiter's index and access.
    pub fn next(self) -> Option<(u8, WordAccess)> {
        if self.0 & NEXT == 0 {
            return None;
        }
        let kind = WordAccess::from_next_kind((self.0 >> NEXT_KIND_SHIFT) & 0b11)?;
        Some((((self.0 >> NEXT_IDX_SHIFT) & IDX_MASK) as u8, kind))
    }

    /// No access held through the word.
    pub fn is_idle(self) -> bool {
        self.0 & HOLD_MASK == 0
    }

    /// A state no sequence of legal steps produces: a writer together with
    /// readers, garbage in the write-kind bit, or an unknown next kind.
    pub fn is_impossible(self) -> bool {
        let writer_with_readers = self.0 & WRITER != 0 && self.readers() != 0;
        let stray_rw =
            self.0 & WRITER == 0 && self.0 & (WRITER_RW | (IDX_MASK << WRITER_IDX_SHIFT)) != 0;
        let bad_next = self.0 & NEXT != 0 && self.next().is_none();
        let stray_next = self.0 & NEXT == 0 && self.0 & NEXT_MASK != 0;
        writer_with_readers || stray_rw || bad_next || stray_next
    }

    /// The holder indices with a bit in the word, and what each holds.
    pub fn holders(self) -> impl Iterator<Item = (u8, WordAccess)> {
        let readers = self.readers();
        let writer = self.writer();
        (0..MAX_HOLDERS)
            .filter(move |i| readers & (1 << i) != 0)
            .map(|i| (i, WordAccess::Read))
            .chain(writer)
    }

    /// Whether `index` has any access in the word.
    pub fn holds(self, index: u8) -> bool {
        self.has(index, false) || self.has(index, true)
    }

    /// Whether `index` holds exactly `access`: what a hand-off planned for
    /// `access` leaves. Another kind there is a holder's doing (a changed
    /// plan), not the hand-off.
    pub fn holds_as(self, index: u8, access: WordAccess) -> bool {
        match access {
            WordAccess::Read => self.has(index, false),
            WordAccess::Write | WordAccess::ReadWrite => self.writer() == Some((index, access)),
        }
    }

    /// Whether `index` holds the write (`write`) or a read.
    pub fn has(self, index: u8, write: bool) -> bool {
        if write {
            self.writer().is_some_and(|(writer, _)| writer == index)
        } else {
            self.readers() & bit(index) as u32 != 0
        }
    }

    fn with_access(self, index: u8, access: WordAccess) -> Word {
        match access {
            WordAccess::Read => Word(self.0 | bit(index)),
            WordAccess::Write | WordAccess::ReadWrite => {
                let rw = if access == WordAccess::ReadWrite {
                    WRITER_RW
                } else {
                    0
                };
                Word(self.0 | WRITER | rw | (u64::from(index) & IDX_MASK) << WRITER_IDX_SHIFT)
            }
        }
    }

    fn without_access(self, index: u8, write: bool) -> Word {
        if write {
            Word(self.0 & !(WRITER | WRITER_RW | (IDX_MASK << WRITER_IDX_SHIFT)))
        } else {
            Word(self.0 & !bit(index))
        }
    }

    /// Whether `access` conflicts with what the word holds.
    fn conflicts(self, access: WordAccess) -> bool {
        match access {
            WordAccess::Read => self.0 & WRITER != 0,
            WordAccess::Write | WordAccess::ReadWrite => !self.is_idle(),
        }
    }
}

fn bit(index: u8) -> u64 {
    1u64 << (index & 31)
}

/// An access held through the word: what its end needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WordHold {
    pub slot: FastSlot,
    pub write: bool,
}

/// What the client must do after ending through the word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WordEnd {
    /// Ended; nobody needs to know.
    Silent,
    /// Ended, but the broker arbitrates the buffer now: send `WordEnded`.
    Tell,
    /// Ended and handed the buffer to the planned waiter (woken already);
    /// the broker arbitrates, so send `WordEnded` as well.
    HandedOff,
    /// The bit was not there (the broker took the access away: the holder
    /// freed the buffer, died or reconnected, or the epoch moved on).
    NotMine,
    /// Not ended: the word changed under each of [`contention::ATTEMPTS`]
    /// attempts (another holder writing it without pause). The access is
    /// still held in the word; send `WordEnded` so that a broker
    /// arbitrating the buffer looks at the word, and breaks it if it keeps
    /// changing under the broker's attempts too (which revokes the
    /// accesses in it).
    Contended,
}

/// What a hand-off waiter found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Planned {
    /// The holder handed the buffer over: the access is ours.
    Granted,
    /// The broker cancelled the plan: its answer comes by message.
    Cancelled,
    /// Still planned after the wait's time slice.
    Waiting,
}

/// One buffer's word, mapped by the broker and by each holder.
#[derive(Debug)]
pub struct BufferWord {
    mapping: Mapping,
    interference: Interference,
}

impl BufferWord {
    /// Maps the word page of a buffer of `size` bytes (the page starts at
    /// `size`). The memfd must be sealed against shrinking, as the broker
    /// creates it, or a later access could fault.
    pub fn map(fd: BorrowedFd<'_>, size: u64) -> Result<Self, MapError> {
        Ok(BufferWord {
            mapping: Mapping::at(fd, size, WORD_PAGE as usize)?,
            interference: Interference::default(),
        })
    }

    /// Tests only: `hook` runs before each attempt at changing this word,
    /// the broker's and a holder's (see [`contention::Hook`]).
    #[cfg(any(test, feature = "contention-hook"))]
    pub fn interfere(&mut self, hook: contention::Hook) {
        self.interference.hook = Some(hook);
    }

    fn atom(&self) -> &AtomicU64 {
        let base = self.mapping.as_slice().as_ptr().cast::<AtomicU64>();
        // SAFETY: the mapping is WORD_PAGE bytes and page-aligned (so the
        // first u64 is aligned), lives as long as `self`, and every access
        // to these bytes, here and in other processes, is atomic.
        unsafe { &*base }
    }

    /// The high half of the word, which holds NEXT: the futex.
    fn futex(&self) -> &AtomicU32 {
        let base = self.mapping.as_slice().as_ptr().cast::<AtomicU32>();
        let high = if cfg!(target_endian = "little") { 1 } else { 0 };
        // SAFETY: as in `atom`; the two u32 halves of an aligned u64 are
        // aligned u32s inside the same mapping. Mixed-size atomic access to
        // the same bytes is what futexes on 64-bit words rely on; the
        // kernel only reads the 32 bits.
        unsafe { &*base.add(high) }
    }

    pub fn load(&self) -> Word {
        Word(self.atom().load(Ordering::Acquire))
    }

    // ---- client side ----

    /// Begins `access` with no syscall, if the broker is not arbitrating
    /// the buffer and nothing conflicts. `None`: take the message path,
    /// also when the word changed under each of [`contention::ATTEMPTS`]
    /// attempts (any co-holder can write it: unbounded, the loop was
    /// theirs to stall).
    pub fn try_begin(&self, slot: FastSlot, access: WordAccess) -> Option<WordHold> {
        let begun = self.update(|current| {
            let refused = current.epoch() != slot.epoch
                || current.daemon()
                || current.next().is_some()
                || current.holds(slot.index)
                || current.conflicts(access)
                || slot.index >= MAX_HOLDERS;
            (!refused).then(|| current.with_access(slot.index, access))
        });
        match begun {
            Ok(Some(_)) => Some(WordHold {
                slot,
                write: access.is_write(),
            }),
            Ok(None) | Err(Contended { .. }) => None,
        }
    }

    /// Ends an access held through the word, handing the buffer to a
    /// planned waiter when this was the last access in its way. Bounded
    /// as the broker's changes are ([`contention::ATTEMPTS`]): a word that
    /// defeats every attempt is [`WordEnd::Contended`], the access still
    /// held in it.
    pub fn end(&self, hold: WordHold) -> WordEnd {
        let ended = |current: Word| {
            let mine =
                current.epoch() == hold.slot.epoch && current.has(hold.slot.index, hold.write);
            if !mine {
                return None;
            }
            let ended = current.without_access(hold.slot.index, hold.write);
            Some(match current.next() {
                Some((next, kind)) if !ended.conflicts(kind) && !ended.holds(next) => {
                    (Word(ended.0 & !NEXT_MASK).with_access(next, kind), true)
                }
                _ => (ended, false),
            })
        };
        let replaced = match self.update(|current| ended(current).map(|(word, _)| word)) {
            Ok(Some(replaced)) => replaced,
            Ok(None) => return WordEnd::NotMine,
            Err(Contended { .. }) => return WordEnd::Contended,
        };
        match ended(replaced) {
            Some((_, true)) => {
                futex_wake(self.futex());
                WordEnd::HandedOff
            }
            _ if replaced.daemon() => WordEnd::Tell,
            _ => WordEnd::Silent,
        }
    }

    /// The planned waiter: sleeps until the plan resolves or `slice`
    /// passes. `access` is what it asked for.
    pub fn await_plan(&self, slot: FastSlot, access: WordAccess, slice: Duration) -> Planned {
        let planned = |word: Word| word.next() == Some((slot.index, access));
        let mut current = self.load();
        if planned(current) {
            let high = (current.0 >> 32) as u32;
            futex_wait(self.futex(), high, slice);
            current = self.load();
        }
        if planned(current) {
            Planned::Waiting
        } else if current.epoch() == slot.epoch && current.holds_as(slot.index, access) {
            Planned::Granted
        } else {
            Planned::Cancelled
        }
    }

    // ---- broker side ----
    //
    // Every change here is bounded (`contention`): `Err(Contended)` means
    // the word was left as it was, and the broker breaks it.

    /// Stops fast begins; returns the word as it was just before.
    pub fn take_over(&self) -> Result<Word, Contended> {
        self.update(|w| Some(Word(w.0 | DAEMON)))
            .map(|replaced| replaced.unwrap_or_else(|| self.load()))
    }

    /// Gives the word back when it is still exactly `expected` (which has
    /// DAEMON set and no plan); with `new_epoch`, the epoch moves on in the
    /// same step. False when a client changed it meanwhile.
    pub fn hand_back(&self, expected: Word, new_epoch: Option<u16>) -> Result<bool, Contended> {
        let mut released = expected.0 & !DAEMON;
        if let Some(epoch) = new_epoch {
            released = (released & !(EPOCH_MASK << EPOCH_SHIFT)) | u64::from(epoch) << EPOCH_SHIFT;
        }
        self.update_from(Some(expected), |w| {
            (w == expected).then_some(Word(released))
        })
        .map(|replaced| replaced.is_some())
    }

    /// Broker side, while it arbitrates: grants `index` an access in the
    /// word (a grant that ends through the word). False if the word moved
    /// on in a way that forbids it (another epoch, a conflict).
    pub fn grant(&self, slot: FastSlot, access: WordAccess) -> Result<bool, Contended> {
        self.update(|w| {
            (w.daemon() && w.epoch() == slot.epoch && !w.holds(slot.index) && !w.conflicts(access))
                .then(|| w.with_access(slot.index, access))
        })
        .map(|replaced| replaced.is_some())
    }

    /// Broker side: takes every access of `index` out of the word (its
    /// holder died, freed the buffer or reconnected). Returns what it held.
    pub fn remove_holder(&self, index: u8) -> Result<Vec<WordAccess>, Contended> {
        let mut removed = Vec::new();
        self.update(|w| {
            removed.clear();
            let mut out = w;
            if w.has(index, false) {
                removed.push(WordAccess::Read);
                out = out.without_access(index, false);
            }
            if let Some((_, kind)) = w.writer().filter(|(writer, _)| *writer == index) {
                removed.push(kind);
                out = out.without_access(index, true);
            }
            Some(out)
        })?;
        Ok(removed)
    }

    /// Broker side: takes one access out of the word, if it is there.
    pub fn remove_access(&self, index: u8, write: bool) -> Result<(), Contended> {
        self.update(|w| w.has(index, write).then(|| w.without_access(index, write)))
            .map(drop)
    }

    /// Broker side: plans a hand-off to `index`, if the word is still
    /// exactly `expected`.
    pub fn plan(&self, expected: Word, index: u8, access: WordAccess) -> Result<bool, Contended> {
        let planned = Word(expected.0 & !NEXT_MASK).0
            | NEXT
            | access.next_kind() << NEXT_KIND_SHIFT
            | (u64::from(index) & IDX_MASK) << NEXT_IDX_SHIFT;
        self.update_from(Some(expected), |w| (w == expected).then_some(Word(planned)))
            .map(|replaced| replaced.is_some())
    }

    /// Broker side: cancels a planned hand-off (and wakes the waiter, who
    /// then reads its answer from the socket). True if a plan was there
    /// to cancel; false if there was none, i.e. the holder carried it out
    /// first (the waiter then holds its access, or already ended it).
    pub fn cancel_plan(&self) -> Result<bool, Contended> {
        let cancelled = self
            .update(|w| (w.0 & NEXT_MASK != 0).then_some(Word(w.0 & !NEXT_MASK)))?
            .is_some();
        if cancelled {
            futex_wake(self.futex());
        }
        Ok(cancelled)
    }

    /// Broker side: resets a word it cannot trust (garbage written by a
    /// holder, or left by a previous broker): no access, no plan, the
    /// given epoch, and DAEMON as asked. Wakes any sleeper. Returns the
    /// word it replaced, in the same step: what the holders last did
    /// before the reset ended it (a hand-off carried out after the broker
    /// last looked is in it, and none can follow: no plan is left).
    ///
    /// The reset happens either way. `Err`: the word kept changing, so it
    /// was written with a plain store (one instruction, which always
    /// succeeds) and what it replaced is unknown: the caller must assume
    /// the worst of it.
    pub fn reset(&self, epoch: u16, daemon: bool) -> Result<Word, Contended> {
        let value = u64::from(epoch) << EPOCH_SHIFT | if daemon { DAEMON } else { 0 };
        let replaced = self.update(|_| Some(Word(value))).map(|replaced| {
            // `Some` always: the closure never declines.
            replaced.unwrap_or(Word(value))
        });
        if replaced.is_err() {
            self.atom().store(value, Ordering::Release);
        }
        futex_wake(self.futex());
        replaced
    }

    /// Tests and fuzzing: write a raw word, as a misbehaving holder could.
    pub fn scribble(&self, value: u64) {
        self.atom().store(value, Ordering::Release);
    }

    /// Applies `f` in at most [`contention::ATTEMPTS`] single attempts;
    /// `None` from `f` leaves the word alone. Returns the word replaced.
    fn update(&self, f: impl FnMut(Word) -> Option<Word>) -> Result<Option<Word>, Contended> {
        self.update_from(None, f)
    }

    /// `update`, starting from `expected` instead of a load when the caller
    /// knows what the word should be (see `contention::update`).
    fn update_from(
        &self,
        expected: Option<Word>,
        mut f: impl FnMut(Word) -> Option<Word>,
    ) -> Result<Option<Word>, Contended> {
        let expected = expected.map(|w| w.0);
        contention::update(self.atom(), self.interference, expected, |w| {
            f(Word(w)).map(|n| n.0)
        })
        .map(|replaced| replaced.map(Word))
    }
}

/// `FUTEX_WAKE` for every sleeper on a word shared between processes (so
/// not `FUTEX_PRIVATE_FLAG`).
fn futex_wake(word: &AtomicU32) {
    // SAFETY: FUTEX_WAKE only reads the address, which is a live, aligned
    // u32 of a shared mapping; the other arguments are ignored for WAKE.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            i32::MAX,
            std::ptr::null::<libc::timespec>(),
        );
    }
}

/// `FUTEX_WAIT` while the word still reads `expected`, for at most `slice`.
/// Returns on a wake, a timeout, a signal or a changed word alike: the
/// caller looks at the word again.
fn futex_wait(word: &AtomicU32, expected: u32, slice: Duration) {
    let timeout = libc::timespec {
        tv_sec: slice.as_secs().try_into().unwrap_or(libc::time_t::MAX),
        tv_nsec: slice.subsec_nanos().into(),
    };
    // SAFETY: the address is a live, aligned u32 of a shared mapping, and
    // `timeout` outlives the call; the kernel only reads both.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &timeout as *const libc::timespec,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsFd, OwnedFd};
    use std::sync::{Arc, Barrier};

    const SIZE: u64 = 4096;

    fn word() -> (OwnedFd, BufferWord) {
        let fd = nix::sys::memfd::memfd_create(
            c"bufferword-test",
            nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
        )
        .expect("memfd");
        nix::unistd::ftruncate(&fd, (SIZE + WORD_PAGE) as i64).expect("ftruncate");
        let word = BufferWord::map(fd.as_fd(), SIZE).expect("map");
        (fd, word)
    }

    fn slot(index: u8) -> FastSlot {
        FastSlot { index, epoch: 0 }
    }

    #[test]
    fn readers_share_and_a_writer_excludes_everyone() {
        let (_fd, w) = word();
        let a = w
            .try_begin(slot(0), WordAccess::Read)
            .expect("first reader");
        let b = w
            .try_begin(slot(5), WordAccess::Read)
            .expect("second reader");
        assert_eq!(w.try_begin(slot(7), WordAccess::Write), None);
        assert_eq!(w.end(a), WordEnd::Silent);
        assert_eq!(w.try_begin(slot(7), WordAccess::ReadWrite), None);
        assert_eq!(w.end(b), WordEnd::Silent);
        let c = w.try_begin(slot(7), WordAccess::ReadWrite).expect("writer");
        assert_eq!(w.load().writer(), Some((7, WordAccess::ReadWrite)));
        assert_eq!(w.try_begin(slot(0), WordAccess::Read), None);
        assert_eq!(w.try_begin(slot(1), WordAccess::Write), None);
        assert_eq!(w.end(c), WordEnd::Silent);
        assert!(w.load().is_idle());
    }

    #[test]
    fn a_holder_cannot_hold_twice_or_end_twice() {
        let (_fd, w) = word();
        let a = w.try_begin(slot(3), WordAccess::Read).expect("reader");
        assert_eq!(
            w.try_begin(slot(3), WordAccess::Read),
            None,
            "second access: message path"
        );
        assert_eq!(w.end(a), WordEnd::Silent);
        assert_eq!(w.end(a), WordEnd::NotMine);
    }

    #[test]
    fn a_taken_over_word_refuses_fast_begins_and_ends_tell() {
        let (_fd, w) = word();
        let a = w.try_begin(slot(0), WordAccess::Write).expect("writer");
        let before = w.take_over().expect("uncontended");
        assert!(!before.daemon());
        assert_eq!(before.writer(), Some((0, WordAccess::Write)));
        assert_eq!(w.try_begin(slot(1), WordAccess::Read), None);
        assert_eq!(w.end(a), WordEnd::Tell);
        let now = w.load();
        assert!(now.daemon() && now.is_idle());
        assert!(w.hand_back(now, None).expect("uncontended"));
        assert!(w.try_begin(slot(1), WordAccess::Read).is_some());
    }

    #[test]
    fn hand_back_fails_if_a_client_moved_first() {
        let (_fd, w) = word();
        let a = w.try_begin(slot(2), WordAccess::Read).expect("reader");
        w.take_over().expect("uncontended");
        let seen = w.load();
        assert_eq!(w.end(a), WordEnd::Tell);
        assert!(
            !w.hand_back(seen, None).expect("uncontended"),
            "the broker must settle again first"
        );
    }

    #[test]
    fn a_new_epoch_makes_old_slots_useless() {
        let (_fd, w) = word();
        let old = w.try_begin(slot(4), WordAccess::Read).expect("reader");
        w.take_over().expect("uncontended");
        w.remove_holder(4).expect("uncontended");
        let seen = w.load();
        assert!(w.hand_back(seen, Some(1)).expect("uncontended"));
        assert_eq!(w.load().epoch(), 1);
        assert_eq!(w.try_begin(slot(4), WordAccess::Read), None, "epoch 0 slot");
        let new = FastSlot { index: 4, epoch: 1 };
        let fresh = w.try_begin(new, WordAccess::Read).expect("current slot");
        assert_eq!(
            w.end(old),
            WordEnd::NotMine,
            "a stale guard cannot end the new access"
        );
        assert_eq!(w.end(fresh), WordEnd::Silent);
    }

    #[test]
    fn the_broker_grants_and_removes_accesses_in_the_word() {
        let (_fd, w) = word();
        assert!(
            !w.grant(slot(1), WordAccess::Read).expect("uncontended"),
            "only while it arbitrates"
        );
        w.take_over().expect("uncontended");
        assert!(w.grant(slot(1), WordAccess::Read).expect("uncontended"));
        assert!(
            !w.grant(slot(2), WordAccess::Write).expect("uncontended"),
            "conflicts with the reader"
        );
        assert!(w.grant(slot(2), WordAccess::Read).expect("uncontended"));
        assert_eq!(
            w.remove_holder(1).expect("uncontended"),
            vec![WordAccess::Read]
        );
        assert_eq!(
            w.load().holders().collect::<Vec<_>>(),
            vec![(2, WordAccess::Read)]
        );
        assert_eq!(w.remove_holder(1).expect("uncontended"), vec![]);
    }

    #[test]
    fn the_last_holder_hands_the_buffer_to_the_planned_waiter() {
        let (_fd, w) = word();
        let writer = w.try_begin(slot(0), WordAccess::Write).expect("writer");
        w.take_over().expect("uncontended");
        let seen = w.load();
        assert!(w.plan(seen, 6, WordAccess::Read).expect("uncontended"));
        assert_eq!(
            w.await_plan(slot(6), WordAccess::Read, Duration::from_millis(1)),
            Planned::Waiting
        );
        assert_eq!(w.end(writer), WordEnd::HandedOff);
        let now = w.load();
        assert_eq!(now.next(), None);
        assert_eq!(
            now.holders().collect::<Vec<_>>(),
            vec![(6, WordAccess::Read)]
        );
        assert_eq!(
            w.await_plan(slot(6), WordAccess::Read, Duration::from_secs(1)),
            Planned::Granted
        );
        let reader = WordHold {
            slot: slot(6),
            write: false,
        };
        assert_eq!(w.end(reader), WordEnd::Tell);
    }

    /// A holder changed the plan's kind: the end hands over a write where
    /// a read was planned. The waiter must not take that for its
    /// hand-off (it would read under a write bit it does not know it
    /// holds); it goes back to its socket, where the broker answers.
    #[test]
    fn a_hand_off_of_another_kind_is_not_the_waiters() {
        let (_fd, w) = word();
        let writer = w.try_begin(slot(0), WordAccess::Write).expect("writer");
        w.take_over().expect("uncontended");
        assert!(w.plan(w.load(), 6, WordAccess::Read).expect("uncontended"));
        let planned = w.load().0;
        w.scribble(planned | 1 << NEXT_KIND_SHIFT);
        assert_eq!(w.end(writer), WordEnd::HandedOff);
        assert_eq!(w.load().writer(), Some((6, WordAccess::Write)));
        assert!(!w.load().holds_as(6, WordAccess::Read));
        assert_eq!(
            w.await_plan(slot(6), WordAccess::Read, Duration::from_millis(1)),
            Planned::Cancelled
        );
    }

    #[test]
    fn a_reader_that_is_not_the_last_does_not_hand_off_to_a_writer() {
        let (_fd, w) = word();
        let a = w.try_begin(slot(0), WordAccess::Read).expect("reader a");
        let b = w.try_begin(slot(1), WordAccess::Read).expect("reader b");
        w.take_over().expect("uncontended");
        assert!(w.plan(w.load(), 9, WordAccess::Write).expect("uncontended"));
        assert_eq!(w.end(a), WordEnd::Tell);
        assert_eq!(w.end(b), WordEnd::HandedOff);
        assert_eq!(w.load().writer(), Some((9, WordAccess::Write)));
    }

    #[test]
    fn a_cancelled_plan_leaves_the_waiter_to_the_socket() {
        let (_fd, w) = word();
        let writer = w.try_begin(slot(0), WordAccess::Write).expect("writer");
        w.take_over().expect("uncontended");
        assert!(w.plan(w.load(), 6, WordAccess::Read).expect("uncontended"));
        assert!(
            w.cancel_plan().expect("uncontended"),
            "there was a plan to cancel"
        );
        assert_eq!(w.load().next(), None);
        assert!(
            !w.cancel_plan().expect("uncontended"),
            "nothing left to cancel"
        );
        assert_eq!(
            w.await_plan(slot(6), WordAccess::Read, Duration::from_secs(1)),
            Planned::Cancelled
        );
        assert_eq!(w.end(writer), WordEnd::Tell);
        assert!(w.load().is_idle());
    }

    thread_local! {
        /// Attempts the hooks below saw, on this test's thread.
        static ATTEMPTS_SEEN: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
    }

    fn attempts_seen() -> u32 {
        ATTEMPTS_SEEN.with(|n| n.replace(0))
    }

    /// A holder storing to the word's cache line on a machine whose atomics
    /// are load/store-exclusive loops: every attempt of the broker's fails.
    fn lost_reservation(_: &AtomicU64) -> bool {
        ATTEMPTS_SEEN.with(|n| n.set(n.get() + 1));
        true
    }

    /// A holder rewriting the word before each attempt (a stray reader bit
    /// flipped), but only before the first `ATTEMPTS - 1`.
    fn flips_all_but_the_last(word: &AtomicU64) -> bool {
        let seen = ATTEMPTS_SEEN.with(|n| n.replace(n.get() + 1));
        if seen + 1 < contention::ATTEMPTS {
            word.fetch_xor(1 << 30, Ordering::Relaxed);
        }
        false
    }

    /// As above, before every attempt.
    fn flips_every_time(word: &AtomicU64) -> bool {
        ATTEMPTS_SEEN.with(|n| n.set(n.get() + 1));
        word.fetch_xor(1 << 30, Ordering::Relaxed);
        false
    }

    /// Every change the broker makes gives up after `ATTEMPTS` single
    /// attempts against a word that never lets one stick, and leaves the
    /// word as it was (the broker then breaks it). Unbounded, each of these
    /// calls spun for as long as the holder went on: the broker's thread,
    /// and every client, stalled.
    #[test]
    fn the_brokers_changes_give_up_on_a_word_that_never_lets_them_stick() {
        let (_fd, mut w) = word();
        w.try_begin(slot(3), WordAccess::Read).expect("a reader");
        let plain = w.load();
        w.interfere(lost_reservation);
        let contended = Some(Contended { last: plain.0 });
        assert_eq!(w.take_over().err(), contended);
        assert_eq!(attempts_seen(), contention::ATTEMPTS);
        assert_eq!(w.remove_holder(3).err(), contended);
        assert_eq!(w.remove_access(3, false).err(), contended);
        assert_eq!(attempts_seen(), 2 * contention::ATTEMPTS);
        assert_eq!(w.load(), plain, "left as it was");

        w.scribble(plain.0 | DAEMON);
        let taken = w.load();
        let contended = Some(Contended { last: taken.0 });
        assert_eq!(w.grant(slot(4), WordAccess::Read).err(), contended);
        assert_eq!(w.plan(taken, 4, WordAccess::Write).err(), contended);
        assert_eq!(w.hand_back(taken, None).err(), contended);
        w.scribble(taken.0 | NEXT | 4 << NEXT_IDX_SHIFT);
        let planned = w.load();
        assert_eq!(w.cancel_plan(), Err(Contended { last: planned.0 }));
        assert_eq!(attempts_seen(), 4 * contention::ATTEMPTS);
        assert_eq!(w.load(), planned, "left as it was");

        // A reset cannot learn what it replaced, but resets all the same.
        assert_eq!(w.reset(9, true), Err(Contended { last: planned.0 }));
        assert_eq!(attempts_seen(), contention::ATTEMPTS);
        assert_eq!(w.load(), Word(9 << EPOCH_SHIFT | DAEMON));
    }

    /// A holder's begin and end in the word are bounded too: any co-holder
    /// can write the word, and an end runs in a guard's drop. A begin
    /// that never sticks takes the message path (`None`); an end that
    /// never sticks says so and leaves the access in the word. Unbounded,
    /// both spun for as long as the other holder went on (here: the hooks
    /// went unasked, the begin was granted and the end silent).
    #[test]
    fn a_holders_begin_and_end_give_up_on_a_word_that_never_lets_them_stick() {
        let (_fd, mut w) = word();
        let held = w.try_begin(slot(3), WordAccess::Read).expect("a reader");
        let plain = w.load();
        w.interfere(lost_reservation);
        assert_eq!(w.try_begin(slot(4), WordAccess::Read), None);
        assert_eq!(attempts_seen(), contention::ATTEMPTS);
        assert_eq!(w.end(held), WordEnd::Contended);
        assert_eq!(attempts_seen(), contention::ATTEMPTS);
        assert_eq!(w.load(), plain, "left as it was: still held");

        w.interfere(flips_every_time);
        assert_eq!(w.try_begin(slot(4), WordAccess::Read), None);
        assert_eq!(attempts_seen(), contention::ATTEMPTS);
        assert_eq!(w.end(held), WordEnd::Contended);
        assert_eq!(attempts_seen(), contention::ATTEMPTS);
        assert!(w.load().has(3, false), "still held");
    }

    /// The bound is a bound, not a first failure: a word that changes under
    /// every attempt but the last is changed; one more and the broker gives
    /// up. What the change replaced is the word as it was at that last
    /// attempt.
    #[test]
    fn the_last_of_the_attempts_may_still_stick() {
        let (_fd, mut w) = word();
        w.try_begin(slot(3), WordAccess::Read).expect("a reader");
        let plain = w.load();
        w.interfere(flips_all_but_the_last);
        let replaced = w.take_over().expect("the last attempt sticks");
        assert_eq!(attempts_seen(), contention::ATTEMPTS);
        // An odd number of flips (ATTEMPTS - 1) left the stray bit set.
        assert_eq!(replaced, Word(plain.0 | 1 << 30));
        assert_eq!(w.load(), Word(plain.0 | 1 << 30 | DAEMON));

        let (_fd, mut w) = word();
        w.interfere(flips_every_time);
        assert!(w.take_over().is_err(), "one change too many");
        assert_eq!(attempts_seen(), contention::ATTEMPTS);
    }

    #[test]
    fn impossible_words_are_recognised() {
        for value in [
            WRITER | 1,
            WRITER_RW,
            3 << WRITER_IDX_SHIFT,
            3 << NEXT_KIND_SHIFT | NEXT,
            1 << NEXT_IDX_SHIFT,
        ] {
            assert!(Word(value).is_impossible(), "{value:#x}");
        }
        for value in [
            0,
            0xff,
            WRITER | WRITER_RW | 4 << WRITER_IDX_SHIFT,
            DAEMON | NEXT | 1,
        ] {
            assert!(!Word(value).is_impossible(), "{value:#x}");
        }
    }

    /// A fast begin racing the broker's take-over: either the begin landed
    /// first (and the broker sees the bit) or it fails; never a bit the
    /// broker did not see.
    #[test]
    fn racing_begin_and_take_over_never_hide_a_bit() {
        let (_fd, w) = word();
        let w = Arc::new(w);
        for round in 0..20_000u32 {
            w.reset(0, false).expect("uncontended");
            let barrier = Arc::new(Barrier::new(2));
            let client = {
                let (w, barrier) = (w.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    w.try_begin(slot((round % 32) as u8), WordAccess::Write)
                })
            };
            barrier.wait();
            let seen = w.take_over().expect("uncontended");
            let began = client.join().expect("client thread");
            let now = w.load();
            match began {
                Some(_) => assert!(now.holds((round % 32) as u8), "round {round}"),
                None => assert!(
                    now.is_idle() && !seen.holds((round % 32) as u8),
                    "round {round}"
                ),
            }
            if began.is_some() && !seen.holds((round % 32) as u8) {
                // The begin came after the take-over: impossible.
                panic!("round {round}: a begin succeeded past DAEMON");
            }
        }
    }

    /// The holder's end racing the broker's cancel of a plan: exactly one
    /// of "the waiter holds the access" and "the plan was cancelled".
    #[test]
    fn racing_hand_off_and_cancel_decide_once() {
        let (_fd, w) = word();
        let w = Arc::new(w);
        for round in 0..20_000u32 {
            w.reset(0, false).expect("uncontended");
            let hold = w.try_begin(slot(0), WordAccess::Write).expect("writer");
            w.take_over().expect("uncontended");
            assert!(w.plan(w.load(), 1, WordAccess::Read).expect("uncontended"));
            let barrier = Arc::new(Barrier::new(2));
            let holder = {
                let (w, barrier) = (w.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    w.end(hold)
                })
            };
            barrier.wait();
            let cancelled = w.cancel_plan().expect("uncontended");
            let ended = holder.join().expect("holder thread");
            let waiter = w.await_plan(slot(1), WordAccess::Read, Duration::from_millis(1));
            match (cancelled, ended, waiter) {
                (false, WordEnd::HandedOff, Planned::Granted) => assert!(w.load().holds(1)),
                (true, WordEnd::Tell, Planned::Cancelled) => assert!(w.load().is_idle()),
                other => panic!("round {round}: inconsistent outcome {other:?}"),
            }
        }
    }

    /// The waiter really sleeps in the kernel and the holder's end wakes it.
    #[test]
    fn the_hand_off_wakes_a_sleeping_waiter() {
        let (_fd, w) = word();
        let w = Arc::new(w);
        let hold = w.try_begin(slot(0), WordAccess::Write).expect("writer");
        w.take_over().expect("uncontended");
        assert!(w.plan(w.load(), 1, WordAccess::Read).expect("uncontended"));
        let waiter = {
            let w = w.clone();
            std::thread::spawn(move || loop {
                match w.await_plan(slot(1), WordAccess::Read, Duration::from_secs(5)) {
                    Planned::Waiting => continue,
                    outcome => return (outcome, std::time::Instant::now()),
                }
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        let ended_at = std::time::Instant::now();
        assert_eq!(w.end(hold), WordEnd::HandedOff);
        let (outcome, woke_at) = waiter.join().expect("waiter thread");
        assert_eq!(outcome, Planned::Granted);
        assert!(woke_at >= ended_at);
        assert!(
            woke_at - ended_at < Duration::from_secs(4),
            "woken by the end, not the time slice"
        );
    }
}
