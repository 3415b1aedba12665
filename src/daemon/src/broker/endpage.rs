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
    free: Vec<u16>,
    /// Per slot: the grant using it and its access (indexed, not hashed:
    /// it is touched on every grant and every retirement).
    used: Vec<Option<(EndSlot, AccessId)>>,
    /// One past the highest slot ever taken. Freed slots are reused first,
    /// so a client with a few accesses at a time keeps this small, and
    /// scans of the page (the views' counts, sweeps) stop here.
    high_water: usize,
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
            // Popped from the back: slot 0 first, which keeps a quiet
            // client's words on one cache line.
            free: (0..SLOTS as u16).rev().collect(),
            used: vec![None; SLOTS],
            high_water: 0,
            next_generation: 1,
            grants_since_sweep: 0,
        };
        Ok((page, fd))
    }

    fn take(&mut self, access: AccessId) -> Option<EndSlot> {
        let slot = self.free.pop()?;
        let generation = self.next_generation;
        self.next_generation += 1;
        let at = EndSlot { slot, generation };
        self.used[usize::from(slot)] = Some((at, access));
        self.high_water = self.high_water.max(usize::from(slot) + 1);
        Some(at)
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
        self.used[..self.high_water].iter().flatten().copied()
    }

    /// Accesses whose words say ended but which the broker has not retired
    /// yet: over, though still in its tables.
    fn ended_unsettled(&self) -> impl Iterator<Item = AccessId> + '_ {
        self.in_use()
            .filter(|(at, _)| self.words.check(*at, false) == BrokerView::Ended)
            .map(|(_, access)| access)
    }

    /// How many of them there are (for the views' counts).
    pub fn ended_count(&self) -> usize {
        self.ended_unsettled().count()
    }
}

/// Why an end-word slot is given back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Settled {
    /// The word says the client ended it; retire the access.
    Ended,
    /// Held, or its `End` message is coming; nothing to do now.
    Live,
}

impl State {
    /// Gives a CPU or device grant of `client` a slot, if it has a page and
    /// a slot is free. `watched`: someone already waits on the buffer.
    pub(super) fn assign_end_slot(
        &mut self,
        client: ClientId,
        access: AccessId,
        watched: bool,
    ) -> Option<EndSlot> {
        let page = self.clients.get_mut(&client)?.end_page.as_mut()?;
        page.grants_since_sweep = page.grants_since_sweep.saturating_add(1);
        if page.free.is_empty() && page.grants_since_sweep >= GRANTS_BETWEEN_SWEEPS {
            page.grants_since_sweep = 0;
            self.sweep_client(client);
        }
        let page = self.clients.get_mut(&client)?.end_page.as_mut()?;
        let at = page.take(access)?;
        page.words.grant(at, watched);
        Some(at)
    }

    /// The access is leaving the table: its slot (if any) is free again and
    /// its word cleared, so a late end through it is refused.
    pub(super) fn release_end_slot(&mut self, client: ClientId, at: Option<EndSlot>) {
        let Some(at) = at else { return };
        if let Some(page) = self
            .clients
            .get_mut(&client)
            .and_then(|c| c.end_page.as_mut())
        {
            page.give_back(at);
        }
    }

    /// Reads one access's word (marking it watched with `watch`).
    fn look(&mut self, access: AccessId, watch: bool) -> Settled {
        let Some(entry) = self.accesses.get(&access) else {
            return Settled::Live;
        };
        let (client, Some(at)) = (entry.client, entry.end_slot) else {
            return Settled::Live;
        };
        let Some(page) = self
            .clients
            .get_mut(&client)
            .and_then(|c| c.end_page.as_mut())
        else {
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
        for access in self.arbiter.fence_ids(buffer) {
            if self.look(access, watch) == Settled::Ended {
                self.retire_silent_end(access, now);
            }
        }
    }

    /// An access whose word says ended is retired as if its `End` had
    /// arrived just now.
    fn retire_silent_end(&mut self, access: AccessId, now: Instant) {
        let Some(client) = self.accesses.get(&access).map(|a| a.client) else {
            return;
        };
        match self.arbiter.end(client, access, now) {
            Ok(grants) => {
                self.stats.silent_ends += 1;
                self.finish_released(&[access]);
                self.deliver_grants(grants);
            }
            Err(err) => {
                tracing::error!(client, access, error = %err, "cannot retire an access ended through its word");
            }
        }
    }

    /// Before a client's accesses are torn down (hang-up, free): those it
    /// ended through words are retired normally, so a write it finished is
    /// not reported as lost.
    pub(super) fn settle_client(&mut self, client: ClientId, buffer: Option<BufferId>) {
        let mine: Vec<AccessId> = self
            .clients
            .get(&client)
            .and_then(|c| c.end_page.as_ref())
            .map(|page| page.in_use().map(|(_, access)| access).collect())
            .unwrap_or_default();
        let ended = mine.into_iter().filter(|access| {
            self.accesses
                .get(access)
                .is_some_and(|a| buffer.is_none_or(|b| a.buffer == b))
        });
        for access in ended.collect::<Vec<_>>() {
            let told = self
                .accesses
                .get(&access)
                .and_then(|a| a.end_slot)
                .and_then(|at| {
                    let page = self.clients.get(&client)?.end_page.as_ref()?;
                    Some(page.words.check(at, false))
                });
            // A client that ended and then died before its `End` went out
            // finished its write all the same.
            if matches!(told, Some(BrokerView::Ended | BrokerView::EndedTelling)) {
                self.retire_silent_end(access, Instant::now());
            }
        }
    }

    /// Retires every access a client whose slots ran out ended through
    /// its words.
    fn sweep_client(&mut self, client: ClientId) {
        let ended: Vec<AccessId> = self
            .clients
            .get(&client)
            .and_then(|c| c.end_page.as_ref())
            .map(|page| page.ended_unsettled().collect())
            .unwrap_or_default();
        for access in ended {
            self.retire_silent_end(access, Instant::now());
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
        self.accesses.len().saturating_sub(ended)
    }

    /// The accesses a client holds, by the same rule.
    pub fn live_held_by(&self, client: ClientId) -> usize {
        let ended = self
            .clients
            .get(&client)
            .and_then(|c| c.end_page.as_ref())
            .map_or(0, EndPage::ended_count);
        self.arbiter.held_by(client).saturating_sub(ended)
    }

    /// Whether an access is still in use as far as its word tells: the
    /// D-Bus view shows only these, without retiring anything itself.
    pub fn access_is_live(&self, access: AccessId) -> bool {
        let Some(entry) = self.accesses.get(&access) else {
            return false;
        };
        let Some(at) = entry.end_slot else {
            return true;
        };
        self.clients
            .get(&entry.client)
            .and_then(|c| c.end_page.as_ref())
            .is_none_or(|page| page.words.check(at, false) != BrokerView::Ended)
    }
}
