//! The broker's side of a connection's end-word page: creating it, handing
//! out its slots, and settling accesses whose clients ended them through
//! their words (see `dmabroker_ipc::endwords` for why and how).
//!
//! Every decision about a buffer first *settles* its fences: an access its
//! client ended through the word is retired there and then, exactly as if
//! its `End` had just arrived. When the decision makes someone wait for the
//! remaining fences (a queued begin, a no-autofence grant that lists them),
//! they are settled again with `watch`, which marks each live word so its
//! end comes as a message.

use std::os::fd::{AsFd, OwnedFd};
use std::time::Instant;

use dmabroker_fence::AccessId;
use dmabroker_ipc::endwords::{BrokerView, EndSlot, EndWords, PAGE_SIZE, SLOTS};
use dmabroker_ipc::{BufferId, ClientId};

use super::state::State;
use crate::kernel::memfd;

/// Grants between two sweeps of a client whose slots ran out, so that a
/// client legitimately holding every slot does not pay a sweep per grant.
const GRANTS_BETWEEN_SWEEPS: u32 = (SLOTS / 4) as u32;

#[derive(Debug, thiserror::Error)]
pub enum EndPageError {
    #[error("cannot create the end-word page: {0}")]
    Create(#[from] crate::kernel::KernelError),
    #[error("cannot map the end-word page: {0}")]
    Map(#[from] dmabroker_ipc::mapping::MapError),
}

#[derive(Debug)]
pub struct EndPage {
    words: EndWords,
    /// Slots given back, reused first (last in, first out), so a client
    /// with a few accesses at a time keeps using the same few words.
    free: Vec<u16>,
    /// Per slot ever taken: the grant using it and its access (indexed,
    /// not hashed: it is touched on every grant and every retirement).
    /// Grows only as far as the client's most concurrent accesses, so an
    /// idle connection costs a few bytes, not a table of every slot, and
    /// scans of the page (the views' counts, sweeps) stop at its end.
    used: Vec<Option<(EndSlot, AccessId)>>,
    next_generation: u64,
    grants_since_sweep: u32,
}

impl EndPage {
    /// A fresh page and the fd to send with the welcome. The memfd is sealed
    /// against shrinking: a client that could truncate it would turn the
    /// broker's next look at a word into a SIGBUS.
    pub fn create() -> Result<(EndPage, OwnedFd), EndPageError> {
        let fd = memfd::create_sealed("dmabroker-end-words", PAGE_SIZE as u64)?;
        let words = EndWords::map(fd.as_fd())?;
        let page = EndPage {
            words,
            free: Vec::new(),
            used: Vec::new(),
            next_generation: 1,
            grants_since_sweep: 0,
        };
        Ok((page, fd))
    }

    fn take(&mut self, access: AccessId) -> Option<EndSlot> {
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None if self.used.len() < SLOTS => {
                self.used.push(None);
                u16::try_from(self.used.len() - 1).ok()?
            }
            None => return None,
        };
        let generation = self.next_generation;
        self.next_generation += 1;
        let at = EndSlot { slot, generation };
        *self.used.get_mut(usize::from(slot))? = Some((at, access));
        Some(at)
    }

    fn exhausted(&self) -> bool {
        self.free.is_empty() && self.used.len() >= SLOTS
    }

    fn give_back(&mut self, at: EndSlot) {
        let Some(entry) = self.used.get_mut(usize::from(at.slot)) else {
            return;
        };
        if entry.is_some_and(|(used, _)| used == at) {
            *entry = None;
            self.words.clear(at);
            self.free.push(at.slot);
        }
    }

    fn in_use(&self) -> impl Iterator<Item = (EndSlot, AccessId)> + '_ {
        self.used.iter().flatten().copied()
    }

    /// The accesses in use whose words `wanted` accepts (read, not marked).
    fn whose_word<'a>(
        &'a self,
        wanted: impl Fn(BrokerView) -> bool + 'a,
    ) -> impl Iterator<Item = AccessId> + 'a {
        self.in_use()
            .filter(move |(at, _)| wanted(self.words.check(*at, false)))
            .map(|(_, access)| access)
    }

    /// Accesses whose words say ended but which the broker has not retired
    /// yet: over, though still in its tables.
    fn ended_unsettled(&self) -> impl Iterator<Item = AccessId> + '_ {
        self.whose_word(|view| view == BrokerView::Ended)
    }

    /// What a word says, without marking it (invariant checks).
    pub fn peek(&self, at: EndSlot) -> BrokerView {
        self.words.check(at, false)
    }

    /// How many of them there are (for the views' counts).
    pub fn ended_count(&self) -> usize {
        self.ended_unsettled().count()
    }
}

/// What a look at an access's end word found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Settled {
    /// The word says the client ended it; retire the access.
    Ended,
    /// Held, or its `End` message is coming; nothing to do now.
    Live,
}

impl State {
    fn end_page(&self, client: ClientId) -> Option<&EndPage> {
        self.clients.get(&client)?.end_page.as_ref()
    }

    fn end_page_mut(&mut self, client: ClientId) -> Option<&mut EndPage> {
        self.clients.get_mut(&client)?.end_page.as_mut()
    }

    /// Gives a CPU or device grant of `client` a slot, if it has a page and
    /// a slot is free. `watched`: someone already waits on the buffer.
    pub(super) fn assign_end_slot(
        &mut self,
        client: ClientId,
        access: AccessId,
        watched: bool,
    ) -> Option<EndSlot> {
        let page = self.end_page_mut(client)?;
        page.grants_since_sweep = page.grants_since_sweep.saturating_add(1);
        if page.exhausted() && page.grants_since_sweep >= GRANTS_BETWEEN_SWEEPS {
            page.grants_since_sweep = 0;
            self.sweep_client(client);
        }
        let page = self.end_page_mut(client)?;
        let at = page.take(access)?;
        page.words.grant(at, watched);
        Some(at)
    }

    /// The access is leaving the table: its slot (if any) is free again and
    /// its word cleared, so a late end through it is refused.
    pub(super) fn release_end_slot(&mut self, client: ClientId, at: Option<EndSlot>) {
        if let (Some(at), Some(page)) = (at, self.end_page_mut(client)) {
            page.give_back(at);
        }
    }

    /// Reads one access's word (marking it watched with `watch`).
    fn look(&mut self, access: AccessId, watch: bool) -> Settled {
        let Some(entry) = self.accesses.get(&access) else {
            return Settled::Live;
        };
        if let Some(bit) = entry.word_bit {
            // Held in the buffer's word: the bit is the truth.
            return if self.word_bit_present(entry.buffer, bit) {
                Settled::Live
            } else {
                Settled::Ended
            };
        }
        let (client, Some(at)) = (entry.client, entry.end_slot) else {
            return Settled::Live;
        };
        let Some(page) = self.end_page_mut(client) else {
            return Settled::Live;
        };
        match page.words.check(at, watch) {
            BrokerView::Ended => Settled::Ended,
            BrokerView::Held | BrokerView::EndedTelling => Settled::Live,
            BrokerView::Unrecognised => {
                tracing::warn!(
                    client,
                    access,
                    "end word overwritten by its client; this access now ends by message only"
                );
                page.give_back(at);
                if let Some(entry) = self.accesses.get_mut(&access) {
                    entry.end_slot = None;
                }
                Settled::Live
            }
        }
    }

    /// Retires every fence of `buffer` whose client ended it through its
    /// word; with `watch`, marks the others so their ends come as messages.
    /// `now`: the caller's clock reading, reused (a clock read costs about
    /// as much as the rest of a settle).
    pub(super) fn settle_buffer(&mut self, buffer: BufferId, watch: bool, now: Instant) {
        self.check_word(buffer);
        let mut index = 0;
        while let Some(access) = self.arbiter.fence_id_at(buffer, index) {
            // A retired fence leaves the list, so the next one moves into
            // this index (grants it causes are appended at the end, held).
            let retired =
                self.look(access, watch) == Settled::Ended && self.retire_silent_end(access, now);
            if !retired {
                index += 1;
            }
        }
    }

    /// An access whose word says ended is retired as if its `End` had
    /// arrived just now. Returns whether it was retired.
    fn retire_silent_end(&mut self, access: AccessId, now: Instant) -> bool {
        let Some(client) = self.accesses.get(&access).map(|a| a.client) else {
            return false;
        };
        match self.arbiter.end(client, access, now) {
            Ok(grants) => {
                self.stats.silent_ends += 1;
                self.finish_released(&[access]);
                self.deliver_grants(grants);
                true
            }
            Err(err) => {
                tracing::error!(client, access, error = %err, "cannot retire an access ended through its word");
                false
            }
        }
    }

    /// Before a client's accesses are torn down (hang-up, free): those it
    /// ended through words are retired normally, so a write it finished is
    /// not reported as lost.
    pub(super) fn settle_client(&mut self, client: ClientId, buffer: Option<BufferId>) {
        // A client that ended and then died before its `End` went out
        // finished its write all the same.
        let finished: Vec<AccessId> = self
            .end_page(client)
            .map(|page| {
                page.whose_word(|view| matches!(view, BrokerView::Ended | BrokerView::EndedTelling))
                    .collect()
            })
            .unwrap_or_default();
        let now = Instant::now();
        for access in finished {
            let on_buffer = self
                .accesses
                .get(&access)
                .is_some_and(|a| buffer.is_none_or(|b| a.buffer == b));
            if on_buffer {
                self.retire_silent_end(access, now);
            }
        }
    }

    /// A hold limit is up: whether the access was in fact ended through its
    /// word (and is now retired), so there is nothing to revoke.
    pub(super) fn retired_if_ended(&mut self, access: AccessId) -> bool {
        self.look(access, false) == Settled::Ended && self.retire_silent_end(access, Instant::now())
    }

    /// Retires every access a client whose slots ran out ended through
    /// its words.
    fn sweep_client(&mut self, client: ClientId) {
        let ended: Vec<AccessId> = self
            .end_page(client)
            .map(|page| page.ended_unsettled().collect())
            .unwrap_or_default();
        let now = Instant::now();
        for access in ended {
            self.retire_silent_end(access, now);
        }
    }

    /// Fences in the table that are live: those ended through words and not
    /// yet retired do not count.
    pub fn live_fence_count(&self) -> usize {
        let ended: usize = self
            .clients
            .values()
            .filter_map(|c| c.end_page.as_ref())
            .map(EndPage::ended_count)
            .sum();
        let (in_words, ended_in_words) = self.word_counts(self.buffers.keys(), None);
        (self.accesses.len() + in_words).saturating_sub(ended + ended_in_words)
    }

    /// The accesses a client holds, by the same rule.
    pub fn live_held_by(&self, client: ClientId) -> usize {
        let ended = self.end_page(client).map_or(0, EndPage::ended_count);
        let (in_words, ended_in_words) = self
            .clients
            .get(&client)
            .map_or((0, 0), |c| self.word_counts(c.buffers.iter(), Some(client)));
        (self.arbiter.held_by(client) + in_words).saturating_sub(ended + ended_in_words)
    }

    /// The accesses the broker granted a client (by message or into a
    /// word) that it has not ended: what `max_held_accesses` bounds. Not
    /// those it took in buffer words on its own (at most one per buffer).
    pub fn live_granted_to(&self, client: ClientId) -> usize {
        let ended = self.end_page(client).map_or(0, EndPage::ended_count);
        let (_, ended_in_words) = self
            .clients
            .get(&client)
            .map_or((0, 0), |c| self.word_counts(c.buffers.iter(), Some(client)));
        self.arbiter
            .held_by(client)
            .saturating_sub(ended + ended_in_words)
    }

    /// Whether an access is still in use as far as its word tells: the
    /// D-Bus view shows only these, without retiring anything itself.
    pub fn access_is_live(&self, access: AccessId) -> bool {
        let Some(entry) = self.accesses.get(&access) else {
            return false;
        };
        if let Some(bit) = entry.word_bit {
            return self.word_bit_present(entry.buffer, bit);
        }
        let Some(at) = entry.end_slot else {
            return true;
        };
        self.end_page(entry.client)
            .is_none_or(|page| page.words.check(at, false) != BrokerView::Ended)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn slots_are_reused_before_new_ones_are_taken() {
        let (mut page, _fd) = EndPage::create().unwrap();
        let a = page.take(1).unwrap();
        let b = page.take(2).unwrap();
        assert_eq!((a.slot, b.slot), (0, 1));
        page.give_back(a);
        let c = page.take(3).unwrap();
        assert_eq!(c.slot, 0, "the freed slot first");
        assert_ne!(c.generation, a.generation, "with a new generation");
        assert_eq!(page.used.len(), 2, "the table grows only as needed");
    }

    #[test]
    fn a_stale_give_back_does_not_free_a_reused_slot() {
        let (mut page, _fd) = EndPage::create().unwrap();
        let old = page.take(1).unwrap();
        page.give_back(old);
        let new = page.take(2).unwrap();
        assert_eq!(new.slot, old.slot);
        page.give_back(old);
        assert_eq!(page.in_use().count(), 1, "the new grant keeps its slot");
        assert!(page.free.is_empty());
    }

    #[test]
    fn the_page_runs_out_after_every_slot_and_recovers() {
        let (mut page, _fd) = EndPage::create().unwrap();
        let taken: Vec<EndSlot> = (0..SLOTS as u64).map(|i| page.take(i).unwrap()).collect();
        assert!(page.exhausted());
        assert_eq!(page.take(9999), None);
        page.give_back(taken[100]);
        assert_eq!(page.take(10_000).map(|at| at.slot), Some(100));
    }

    /// A client keeps its end word (or its cache line) changing while a
    /// begin queues behind its write, as it can on a core whose atomics
    /// are load/store-exclusive loops: the broker's watch gives up after a
    /// bounded number of attempts and stops using the word. The write ends
    /// by message (the client's end through the word finds it is not its
    /// own), and the waiter is granted then. Before, the watch spun on the
    /// broker's thread for as long as the client went on.
    #[test]
    fn a_word_no_watch_sticks_to_ends_its_access_by_message() {
        use dmabroker_ipc::endwords::ClientEnd;
        use dmabroker_ipc::{Access, ReplyBody};

        let mut bench = super::super::cache_end_tests::Bench::new();
        let (writer, reader) = (bench.client(), bench.client());
        let (mut page, fd) = EndPage::create().unwrap();
        page.words.interfere(|_| true);
        bench.state.clients.get_mut(&writer).unwrap().end_page = Some(page);
        let frame = bench.buffer(&[writer, reader], false);
        let write = bench.begin(writer, frame, Access::CpuWrite);
        let at = bench
            .replies(writer)
            .into_iter()
            .find_map(|(id, reply)| match reply {
                Ok(ReplyBody::Granted(grant)) if id == write => grant.end_slot,
                _ => None,
            })
            .expect("the write is granted with an end word");

        let read = bench.begin(reader, frame, Access::CpuRead);
        let access = bench.access_of(writer, write);
        assert_eq!(
            bench.state.accesses.get(&access).unwrap().end_slot,
            None,
            "the word is given up"
        );
        let client_view = EndWords::map(fd.as_fd()).unwrap();
        assert_eq!(client_view.end(at), ClientEnd::NotMine, "end by message");
        assert!(!bench.granted(reader, read), "the read waits for the write");
        bench.end(writer, access);
        assert!(bench.granted(reader, read), "granted at the write's end");
    }

    #[test]
    fn ended_words_are_counted_until_retired() {
        let (mut page, fd) = EndPage::create().unwrap();
        let client_view = EndWords::map(fd.as_fd()).unwrap();
        let a = page.take(1).unwrap();
        let b = page.take(2).unwrap();
        page.words.grant(a, false);
        page.words.grant(b, false);
        assert_eq!(page.ended_count(), 0);
        client_view.end(a);
        assert_eq!(page.ended_unsettled().collect::<Vec<_>>(), vec![1]);
        page.give_back(a);
        assert_eq!(page.ended_count(), 0);
    }
}
