//! The broker's side of buffer words (see `dmabroker_ipc::bufferword` for
//! the why and the layout): taking a word over before a decision, turning
//! its bits into fences, handing it back when nothing is left to arbitrate,
//! and planning hand-offs.
//!
//! The invariant everything here keeps: while the broker has *not* taken a
//! buffer's word over, the arbiter has no fence and no waiter on that
//! buffer, so the word alone is the reservation. Every arbiter change on a
//! buffer with a word starts with [`State::take_over_word`], and every
//! decision ends with [`State::settle_touched`], which hands the word back
//! when the reservation holds nothing but bits (no waiter, no mark owed to a
//! grant, no fence a no-autofence client waits on), or plans a hand-off.

use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use dmabroker_fence::{self as fence, AccessId, BeginOutcome, Mode, WaiterId};
use dmabroker_ipc::bufferword::{BufferWord, FastSlot, Word, WordAccess, MAX_HOLDERS};
use dmabroker_ipc::contention::Contended;
use dmabroker_ipc::{Access, BufferId, ClientId, ReplyBody};

use super::access::to_fence_access;
use super::state::{AccessEntry, State};

/// How often the broker looks at the words of buffers someone waits on.
/// Ends in a taken word are told by message, but only while the word says
/// `DAEMON`; a holder that clears it (or rewrites the epoch or a plan) makes
/// them silent, and the waiters would wait until some other decision
/// touched the buffer, even after that holder had gone. The patrol finds
/// such a word within this period and breaks it. It runs only while
/// someone waits on a buffer whose word the broker has taken.
pub const WORD_PATROL: Duration = Duration::from_secs(1);

/// An access held as a bit in its buffer's word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WordBit {
    pub index: u8,
    pub write: bool,
}

/// A hand-off the broker planned: the waiter, and the index and kind it
/// wrote into `NEXT` for it, which are all a `NEXT` in the word may say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Plan {
    waiter: WaiterId,
    index: u8,
    access: WordAccess,
}

/// Per memfd buffer: the mapped word and who owns which index.
#[derive(Debug, Default)]
pub struct WordState {
    /// Mapped at the first begin: a buffer nobody arbitrates costs no
    /// mapping (allocation stays as cheap as before).
    mapped: Option<BufferWord>,
    /// The broker set DAEMON: the arbiter holds the buffer's truth.
    pub taken: bool,
    /// A holder wrote an impossible word, or the word cannot be mapped: the
    /// broker arbitrates every access from now on.
    pub broken: bool,
    epoch: u16,
    /// Indices of departed holders: reusable only once the epoch moves on,
    /// so a stale guard of theirs can never clear a newcomer's bit.
    retired: u32,
    /// The hand-off planned (or carried out and not yet recorded).
    planned: Option<Plan>,
    /// A change of the broker's to the word gave up (see
    /// `dmabroker_ipc::contention`): a holder keeps it changing, which no
    /// honest one does. The word is broken at the next check, where no
    /// decision is half made (the change failed in the middle of one).
    contended: bool,
}

impl WordState {
    /// A word the broker cannot trust: one left by a previous instance
    /// (restored from the fd store). Its holders' clients make no call a
    /// restart would fail while they begin and end in the word, so it is
    /// voided now, before anyone is granted anything by message: a new
    /// epoch (their slots name the old one) and `DAEMON` set. It is reset
    /// again at the first look and stays taken until the reservation is
    /// empty. Unmapped in between: a restart must not map every word.
    pub fn inherited(fd: BorrowedFd<'_>, size: u64) -> Box<WordState> {
        let broken = match BufferWord::map(fd, size) {
            Ok(word) => {
                if let Err(err) = word.reset(word.load().epoch().wrapping_add(1), true) {
                    tracing::warn!(error = %err, "a restored buffer's word kept changing; voided by a plain store");
                }
                false
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot map a restored buffer's word; voiding it by a plain write, and every access goes by message");
                void_unmapped(fd, size);
                true
            }
        };
        Box::new(WordState {
            taken: true,
            broken,
            ..WordState::default()
        })
    }

    /// The word as it is now, if mapped (tests and the views).
    pub fn peek(&self) -> Option<Word> {
        self.mapped.as_ref().map(BufferWord::load)
    }
}

/// Voids a word that cannot be mapped with `pread` and `pwrite` on the
/// memfd: not atomic against a client's compare-and-swap, but its clients
/// must not go on beginning in it while the broker grants by message.
fn void_unmapped(fd: BorrowedFd<'_>, size: u64) {
    let Ok(offset) = i64::try_from(size) else {
        return;
    };
    let mut current = [0u8; 8];
    let written = nix::sys::uio::pread(fd, &mut current, offset).and_then(|_| {
        let voided = Word(u64::from_ne_bytes(current)).voided();
        nix::sys::uio::pwrite(fd, &voided.0.to_ne_bytes(), offset)
    });
    if let Err(err) = written {
        tracing::error!(error = %err, "cannot void a restored buffer's word: its previous clients may still begin in it");
    }
}

/// Whether a holder wrote where only the broker writes while it has the
/// word taken: `DAEMON` (cleared, every end in the word goes silent), the
/// epoch, or a `NEXT` other than the plan the broker made: none recorded,
/// another index or kind (the waiter would be handed what it did not ask
/// for, or another holder what it never waited for), a plan whose waiter
/// left the queue (`plan_queued` false: nobody is owed that hand-off), or
/// a plan beside a bit of its own waiter's (the end that carries a plan
/// out clears `NEXT` in the same step, so that is a plan written again).
fn tampered(ws: &WordState, word: Word, plan_queued: bool) -> bool {
    let planned = ws
        .planned
        .filter(|_| plan_queued)
        .map(|plan| (plan.index, plan.access));
    let forged_next = word
        .next()
        .is_some_and(|(index, access)| planned != Some((index, access)) || word.holds(index));
    ws.taken && (!word.daemon() || word.epoch() != ws.epoch || forged_next)
}

/// The holder of `buffer` whose word index is `index`.
fn owner_of(entry: &super::state::BufferEntry, index: u8) -> Option<ClientId> {
    entry
        .holders
        .iter()
        .find(|h| h.word_index == Some(index))
        .map(|h| h.client)
}

impl State {
    /// The buffer's word, mapped now if it was not yet and `map` says so.
    /// `None` for buffers without one, for broken words, and for words not
    /// mapped yet when `map` is false: nobody can have been given a slot in
    /// a word the broker never mapped, so there is nothing to take over.
    fn word_state(&mut self, buffer: BufferId, map: bool) -> Option<&mut WordState> {
        let entry = self.buffers.get_mut(&buffer)?;
        let ws = entry.word.as_deref_mut()?;
        if ws.broken || (ws.mapped.is_none() && !map) {
            return None;
        }
        if ws.mapped.is_none() {
            match BufferWord::map(std::os::fd::AsFd::as_fd(&*entry.fd), entry.size) {
                Ok(word) => {
                    let inherited = ws.taken;
                    if inherited {
                        // Whatever a previous instance's clients left there
                        // is void: their accesses did not survive.
                        let epoch = word.load().epoch().wrapping_add(1);
                        if let Err(err) = word.reset(epoch, true) {
                            tracing::warn!(buffer, error = %err, "a restored buffer's word kept changing; voided by a plain store");
                        }
                        ws.epoch = epoch;
                    } else {
                        ws.epoch = word.load().epoch();
                    }
                    ws.mapped = Some(word);
                }
                Err(err) => {
                    tracing::warn!(buffer, error = %err, "cannot map the buffer's word; every access goes by message");
                    ws.broken = true;
                    return None;
                }
            }
        }
        Some(ws)
    }

    /// Whether `client` may hold accesses in words: it asked for them, and
    /// no hold limit needs the broker to see its writes.
    pub(super) fn word_eligible(&self, client: ClientId) -> bool {
        self.clients
            .get(&client)
            .is_some_and(|c| c.buffer_words && c.resolved.limits.write_hold_limit.is_none())
    }

    /// The client's slot in the buffer's word, giving it an index if it has
    /// none yet. `None` when it may not use the word or none is free.
    pub(super) fn word_slot(&mut self, buffer: BufferId, client: ClientId) -> Option<FastSlot> {
        if !self.word_eligible(client) {
            return None;
        }
        let holders = &self.buffers.get(&buffer)?.holders;
        let existing = holders.iter().find(|h| h.client == client)?.word_index;
        // Each holder keeps its own index; the ones in use are theirs.
        let in_use = holders
            .iter()
            .filter_map(|h| h.word_index)
            .fold(0u32, |used, index| used | 1 << index);
        let ws = self.word_state(buffer, true)?;
        let index = match existing {
            Some(index) => index,
            None => (0..MAX_HOLDERS).find(|i| (in_use | ws.retired) & (1 << i) == 0)?,
        };
        let epoch = ws.epoch;
        if existing.is_none() {
            let holder = self
                .buffers
                .get_mut(&buffer)?
                .holders
                .iter_mut()
                .find(|h| h.client == client)?;
            holder.word_index = Some(index);
        }
        Some(FastSlot { index, epoch })
    }

    /// The holder is leaving the buffer: its index is retired until the
    /// next epoch, and any bit it still has is taken out.
    pub(super) fn retire_word_index(&mut self, buffer: BufferId, client: ClientId) {
        let Some(entry) = self.buffers.get_mut(&buffer) else {
            return;
        };
        let Some(index) = entry
            .holders
            .iter_mut()
            .find(|h| h.client == client)
            .and_then(|h| h.word_index.take())
        else {
            return;
        };
        let Some(ws) = entry.word.as_deref_mut() else {
            return;
        };
        ws.retired |= 1 << index;
        // A broken word's bits no longer count: nothing to take out.
        let removed = ws
            .mapped
            .as_ref()
            .filter(|_| !ws.broken)
            .map(|word| word.remove_holder(index));
        if let Some(Err(err)) = removed {
            self.word_contended(buffer, err);
        }
    }

    /// A change of the broker's to `buffer`'s word gave up: some holder
    /// keeps the word (or its cache line) changing. The word is broken as
    /// one a holder tampered with, at the next check (`break_if_contended`):
    /// the change failed in the middle of a decision, which must not be
    /// undone under it. Until then the word's bits are read as they are;
    /// the change that failed (a bit not set or not cleared) is one the
    /// break makes moot.
    fn word_contended(&mut self, buffer: BufferId, err: Contended) {
        tracing::warn!(buffer, error = %err, "a holder keeps the buffer's word changing; breaking it");
        if let Some(ws) = self
            .buffers
            .get_mut(&buffer)
            .and_then(|b| b.word.as_deref_mut())
        {
            ws.contended = !ws.broken;
        }
        self.touched.push(buffer);
    }

    /// Breaks the word if a change of the broker's to it gave up. Returns
    /// whether it did. Called where a decision starts or ends
    /// (`take_over_word`, `check_word`, `hand_back_or_plan`).
    fn break_if_contended(&mut self, buffer: BufferId) -> bool {
        let Some(ws) = self
            .buffers
            .get_mut(&buffer)
            .and_then(|b| b.word.as_deref_mut())
        else {
            return false;
        };
        if !std::mem::take(&mut ws.contended) || ws.broken {
            return false;
        }
        let last = ws.mapped.as_ref().map_or(Word(0), BufferWord::load);
        self.touched.push(buffer);
        self.break_word(buffer, last);
        true
    }

    /// Before any decision on the buffer: stops fast begins, turns the
    /// bits found into fences of their holders, and cancels a planned
    /// hand-off (one already carried out is recorded by the next settle).
    /// `map`: map the word first if nobody did yet (a begin, which may
    /// grant in the word); other decisions need not, see `word_state`.
    pub(super) fn take_over_word(&mut self, buffer: BufferId, now: Instant, map: bool) {
        if self.break_if_contended(buffer) {
            return;
        }
        let plan_queued = self.plan_queued(buffer);
        let Some(ws) = self.word_state(buffer, map) else {
            return;
        };
        let Some(word) = &ws.mapped else {
            return;
        };
        let before = match word.take_over() {
            Ok(before) => before,
            Err(err) => {
                // Fast begins go on in a word not taken: break it now.
                self.word_contended(buffer, err);
                self.break_if_contended(buffer);
                return;
            }
        };
        let first = !ws.taken;
        // Already taken, the word is judged as it was before this
        // take-over: setting `DAEMON` again and cancelling the plan would
        // hide a cleared `DAEMON` (a reader may have begun beside a write
        // by message meanwhile, a bit the broker never recorded) or a
        // `NEXT` nobody planned, and `check_word` would find the word
        // legal. (The first take-over's `mirror` judges it itself.)
        if !first && (before.is_impossible() || tampered(ws, before, plan_queued)) {
            self.touched.push(buffer);
            self.break_word(buffer, before);
            return;
        }
        let epoch = ws.epoch;
        ws.taken = true;
        // Always: a NEXT the broker did not plan (written by a holder) must
        // not be carried out either.
        let cancel = word.cancel_plan();
        let cancel = match cancel {
            Ok(cancel) => cancel,
            Err(err) => {
                // The plan, if any, is still recorded: the break withdraws
                // its waiter as it must.
                self.word_contended(buffer, err);
                self.break_if_contended(buffer);
                return;
            }
        };
        let planned = ws.planned.take();
        let cancelled = Some(cancel).filter(|_| planned.is_some());
        self.touched.push(buffer);
        if first {
            self.mirror(buffer, before, epoch, now);
        }
        if let (Some(plan), Some(cancelled)) = (planned, cancelled) {
            // Nothing to cancel means the holder carried the plan out (the
            // waiter may even have ended the access it was handed since).
            if !cancelled {
                // The next settle finds the holder's bit gone and records
                // the grant as the hand-off.
                if let Some(ws) = self.word_state(buffer, false) {
                    ws.planned = Some(plan);
                }
            }
        }
    }

    /// The waiter a hand-off is planned for on this buffer (or was carried
    /// out for and not yet recorded).
    pub(super) fn planned_waiter(&self, buffer: BufferId) -> Option<WaiterId> {
        Some(self.buffers.get(&buffer)?.word.as_deref()?.planned?.waiter)
    }

    /// Whether the waiter of the hand-off planned on this buffer is still
    /// in its queue.
    fn plan_queued(&self, buffer: BufferId) -> bool {
        self.planned_waiter(buffer)
            .is_some_and(|waiter| self.arbiter.waiter_buffer(waiter) == Some(buffer))
    }

    pub(super) fn index_of(&self, buffer: BufferId, client: ClientId) -> Option<u8> {
        self.buffers
            .get(&buffer)?
            .holders
            .iter()
            .find(|h| h.client == client)?
            .word_index
    }

    /// The word's bits become fences in the (empty) reservation. A word
    /// of another epoch than the broker's is a holder's doing (only the
    /// broker moves it): its bits may be stale guards', so it is broken.
    fn mirror(&mut self, buffer: BufferId, word: Word, epoch: u16, now: Instant) {
        if word.is_impossible() || word.epoch() != epoch {
            self.break_word(buffer, word);
            return;
        }
        for (index, access) in word.holders() {
            let owner = self.buffers.get(&buffer).and_then(|b| owner_of(b, index));
            let Some(client) = owner else {
                // A holder that left (or a reconnected client's stale guard):
                // its access is over as far as the broker is concerned.
                tracing::debug!(buffer, index, "bit of a departed holder cleared");
                let removed = self.mapped_word(buffer).map(|w| w.remove_holder(index));
                if let Some(Err(err)) = removed {
                    self.word_contended(buffer, err);
                    self.break_if_contended(buffer);
                    return;
                }
                continue;
            };
            let kind = access.access();
            let autofence = self.clients.get(&client).is_none_or(|c| c.autofence);
            let mode = if autofence {
                Mode::Autofence
            } else {
                Mode::NoAutofence
            };
            match self
                .arbiter
                .begin(client, buffer, to_fence_access(kind), mode, now)
            {
                Ok(BeginOutcome::Granted(grant)) => {
                    self.insert_word_access(grant.access_id, client, buffer, kind, index, 0);
                    if let Some(entry) = self.accesses.get_mut(&grant.access_id) {
                        entry.autofence = autofence;
                    }
                }
                Ok(BeginOutcome::Queued(waiter)) => {
                    // Only an inconsistent table could get here: the word
                    // was not taken, so the reservation was empty.
                    tracing::error!(buffer, "mirroring a word bit queued; breaking the word");
                    let _ = self.arbiter.cancel(waiter, now);
                    self.break_word(buffer, word);
                    return;
                }
                Err(err) => {
                    tracing::error!(buffer, error = %err, "cannot mirror a word bit");
                }
            }
        }
    }

    pub(super) fn insert_word_access(
        &mut self,
        access: AccessId,
        client: ClientId,
        buffer: BufferId,
        kind: Access,
        index: u8,
        request_id: u64,
    ) {
        self.accesses.insert(
            access,
            AccessEntry {
                word_bit: Some(WordBit {
                    index,
                    write: kind.is_write(),
                }),
                ..AccessEntry::new(client, buffer, kind, true, request_id)
            },
        );
    }

    fn mapped_word(&self, buffer: BufferId) -> Option<&BufferWord> {
        self.buffers.get(&buffer)?.word.as_deref()?.mapped.as_ref()
    }

    /// A holder wrote something no legal sequence produces. Its accesses
    /// in the word are dropped (the next grant says `writer_lost`: the
    /// contents may be anything), and the broker arbitrates the buffer by
    /// message for good. A holder whose bit was still there is told its
    /// access is revoked: it may still be reading or writing, and the
    /// next grant does not wait for it. That holds for a bit the broker
    /// never recorded as an access too (see `revoke_unrecorded`).
    ///
    /// `judged` is the word found corrupt. What the holders did after it
    /// was read (a hand-off is legal while the broker has the word) is in
    /// the word the reset replaces, in the same step, and that is the word
    /// whose bits and plan decide who held what: judged from the earlier
    /// read, a waiter handed the buffer after it stayed queued and was
    /// granted by message a request it had dropped, an access held for
    /// good.
    ///
    /// A word that keeps changing (see `word_contended`) may defeat the
    /// reset's attempts too; it is then written with a plain store, and
    /// what it replaced is unknown (`None`). The break then assumes the
    /// worst of it: every access the broker recorded in the word was still
    /// held (its holder is told), every holder with an index may have had
    /// a bit of its own (told, as id 0), and a planned hand-off may have
    /// been carried out (withdrawn, answered `Busy`). Each is at worst a
    /// notice about an access already over, or a begin to make again.
    fn break_word(&mut self, buffer: BufferId, judged: Word) {
        let mut planned = None;
        let mut replaced = Some(judged);
        if let Some(ws) = self
            .buffers
            .get_mut(&buffer)
            .and_then(|b| b.word.as_deref_mut())
        {
            ws.broken = true;
            ws.taken = true;
            planned = ws.planned.take().map(|plan| plan.waiter);
            ws.epoch = ws.epoch.wrapping_add(1);
            if let Some(mapped) = &ws.mapped {
                replaced = mapped.reset(ws.epoch, true).ok();
            }
        }
        let holders: Vec<ClientId> = self
            .buffers
            .get(&buffer)
            .map(|b| b.holders.iter().map(|h| h.client).collect())
            .unwrap_or_default();
        tracing::warn!(
            buffer,
            word = format_args!("{:#x}", judged.0),
            last = ?replaced.map(|w| format!("{:#x}", w.0)),
            ?holders,
            "a holder corrupted the buffer's word; it arbitrates by message from now on"
        );
        let in_word: Vec<(AccessId, bool)> = self
            .accesses
            .iter()
            .filter_map(|(id, a)| {
                let bit = a.word_bit.filter(|_| a.buffer == buffer)?;
                let held = replaced.is_none_or(|w| w.has(bit.index, bit.write));
                Some((*id, held))
            })
            .collect();
        self.revoke_unrecorded(buffer, replaced);
        for (id, _) in &in_word {
            if let Some(entry) = self.accesses.get_mut(id) {
                entry.word_bit = None;
            }
        }
        // Before anything is granted: the grants these releases cause are
        // the ones that must say the contents may be torn.
        self.arbiter.mark_writer_lost(buffer);
        let now = Instant::now();
        if let Some(waiter) = planned {
            self.withdraw_unrecorded_hand_off(buffer, waiter, replaced, now);
        }
        for (id, still_held) in in_word {
            let Some(client) = self.accesses.get(&id).map(|a| a.client) else {
                continue;
            };
            if let Ok(grants) = self.arbiter.end(client, id, now) {
                if still_held {
                    self.tell_revoked(client, id, buffer);
                }
                self.finish_released(&[id]);
                self.deliver_grants(grants);
            }
        }
    }

    /// A hand-off was planned for `waiter` when its buffer's word broke
    /// (as `word`; `None`: unknown, see `break_word`). Still in the word
    /// (`NEXT` names its index), it never
    /// happened: the waiter stays queued and is granted by message like
    /// any other (the reset woke it to read that answer). Otherwise the
    /// holder carried it out and the waiter may be using the access in
    /// the word, or a holder erased the plan: the broker cannot tell, as
    /// in `record_hand_off`. That access went with the word (its holder
    /// told, if its bit was there), so the request leaves the queue before
    /// the holder's fence is ended: that end would grant it by message to
    /// a client that dropped the request at the hand-off, an access held
    /// for good, with the grant's `writer_lost` read by nobody. It is
    /// answered `Busy` instead, which a client that got the buffer drops
    /// and any other reads as its begin's failure; the marks stay on the
    /// buffer for the next grant.
    fn withdraw_unrecorded_hand_off(
        &mut self,
        buffer: BufferId,
        waiter: WaiterId,
        word: Option<Word>,
        now: Instant,
    ) {
        let Some(client) = self.waiters.get(&waiter).map(|w| w.client) else {
            return;
        };
        if self.arbiter.waiter_buffer(waiter) != Some(buffer) {
            return;
        }
        let index = self.index_of(buffer, client);
        // A plan never stands beside a bit of its waiter's: a word showing
        // both is forged, and the waiter may be using the bit.
        let still_planned = word.zip(index).is_some_and(|(word, index)| {
            word.next().is_some_and(|(next, _)| next == index) && !word.holds(index)
        });
        if still_planned {
            return;
        }
        let Some(entry) = self.remove_waiter(waiter) else {
            return;
        };
        let grants = self.arbiter.cancel(waiter, now).unwrap_or_default();
        // A client going is answered as its other begins are.
        let lost = if self.is_leaving(client, buffer) {
            self.leaving_answer()
        } else {
            Some(dmabroker_ipc::WireError::new(
                dmabroker_ipc::ErrorCode::Busy,
                "the buffer's word broke before the hand-off planned for this begin was \
                 recorded; begin again",
            ))
        };
        if let Some(lost) = lost {
            self.reply(client, entry.request_id, Err(lost), Vec::new());
        }
        self.deliver_grants(grants);
    }

    /// The bits of a word being broken that no access of the broker's
    /// stands for: all of them at the first take-over, before the bits
    /// became accesses; later, those set while a holder had cleared
    /// `DAEMON` (an honest holder then begins in the word with no
    /// message), or by a holder for another. Their holders have no id
    /// from the broker, so they are named 0, as their guards are
    /// (`AccessGuard::id`), and told all the same: a writer may be granted
    /// next to them at once. A word whose bits are unknown (`None`, see
    /// `break_word`) may have had a bit of any holder with an index.
    fn revoke_unrecorded(&mut self, buffer: BufferId, word: Option<Word>) {
        let recorded: Vec<WordBit> = self
            .accesses
            .values()
            .filter(|a| a.buffer == buffer)
            .filter_map(|a| a.word_bit)
            .collect();
        let holders: Vec<ClientId> = {
            let Some(entry) = self.buffers.get(&buffer) else {
                return;
            };
            let mut owners: Vec<ClientId> = match word {
                Some(word) => word
                    .holders()
                    .filter(|(index, access)| {
                        let bit = WordBit {
                            index: *index,
                            write: access.is_write(),
                        };
                        !recorded.contains(&bit)
                    })
                    .filter_map(|(index, _)| owner_of(entry, index))
                    .collect(),
                None => entry
                    .holders
                    .iter()
                    .filter(|h| h.word_index.is_some())
                    .map(|h| h.client)
                    .collect(),
            };
            owners.sort_unstable();
            owners.dedup();
            owners
        };
        for client in holders {
            self.tell_revoked(client, 0, buffer);
        }
    }

    /// Whether a bit-backed access still has its bit. A word found
    /// impossible breaks first (and the access is then gone).
    pub(super) fn word_bit_present(&self, buffer: BufferId, bit: WordBit) -> bool {
        self.mapped_word(buffer)
            .is_some_and(|word| word.load().has(bit.index, bit.write))
    }

    /// Settling starts here: a word some holder made impossible, or
    /// changed where only the broker writes while it has the word taken,
    /// is broken before anything is read from it. A broken word is not
    /// looked at again: whatever its holders write there no longer counts.
    pub(super) fn check_word(&mut self, buffer: BufferId) {
        if self.break_if_contended(buffer) {
            return;
        }
        let plan_queued = self.plan_queued(buffer);
        let Some(ws) = self.buffers.get(&buffer).and_then(|b| b.word.as_deref()) else {
            return;
        };
        let Some(word) = ws.mapped.as_ref().filter(|_| !ws.broken) else {
            return;
        };
        let now = word.load();
        if now.is_impossible() || tampered(ws, now, plan_queued) {
            self.break_word(buffer, now);
        }
    }

    /// Whether the broker holds the buffer's truth in its word: taken over,
    /// mapped, and not broken (a broken word is not looked at again).
    fn arbitrates_word(&self, buffer: BufferId) -> bool {
        self.buffers
            .get(&buffer)
            .and_then(|b| b.word.as_deref())
            .is_some_and(|ws| ws.taken && !ws.broken && ws.mapped.is_some())
    }

    /// Stops the word patrol once nobody waits: no begin queued, no fence
    /// handed to a no-autofence client still unsignalled.
    pub(super) fn stop_word_patrol_if_idle(&mut self) {
        let idle = self.word_patrol.is_some()
            && self.waiters.is_empty()
            && self.fence_subscribers.values().all(Vec::is_empty);
        if idle {
            self.word_patrol = None;
            self.abort_tasks(super::TaskOwner::WordPatrol);
        }
    }

    /// Starts the word patrol, unless it runs, when a begin queues on a
    /// buffer whose word the broker has taken, or a no-autofence client is
    /// handed a fence held in one.
    pub(super) fn start_word_patrol(&mut self, buffer: BufferId) {
        let taken = self.arbitrates_word(buffer);
        if taken && self.word_patrol.is_none() {
            self.word_patrols_started += 1;
            self.word_patrol = Some(self.word_patrols_started);
            self.defer(super::Action::PatrolWords(self.word_patrols_started));
        }
    }

    /// One round of word patrol `patrol`: the word of every buffer
    /// someone waits on (in the queue, or for a fence it was handed) is
    /// checked and the buffer settled. Returns whether the patrol goes on
    /// (it is still the running one, and someone still waits on a taken
    /// word).
    pub fn patrol_words(&mut self, patrol: u64) -> bool {
        if self.word_patrol != Some(patrol) {
            return false;
        }
        let queued = self
            .waiters
            .keys()
            .filter_map(|w| self.arbiter.waiter_buffer(*w));
        let fenced = self
            .fence_subscribers
            .iter()
            .filter(|(_, clients)| !clients.is_empty())
            .filter_map(|(fence, _)| self.accesses.get(fence).map(|a| a.buffer));
        let mut buffers: Vec<BufferId> = queued.chain(fenced).collect();
        buffers.sort_unstable();
        buffers.dedup();
        let mut watched = false;
        for buffer in buffers {
            let taken = self.arbitrates_word(buffer);
            if taken {
                self.settle_buffer(buffer, true, Instant::now());
                self.touched.push(buffer);
                watched = true;
            }
        }
        if !watched {
            // Its own task, which returns now: only its handle is left.
            self.word_patrol = None;
            self.abort_tasks(super::TaskOwner::WordPatrol);
        }
        watched
    }

    /// The access ended or was taken away: its bit leaves the word (a
    /// no-op when its holder cleared it).
    pub(super) fn clear_word_bit(&mut self, buffer: BufferId, bit: Option<WordBit>) {
        let (Some(bit), Some(word)) = (bit, self.mapped_word(buffer)) else {
            return;
        };
        if let Err(err) = word.remove_access(bit.index, bit.write) {
            self.word_contended(buffer, err);
        }
    }

    /// A grant by message that may live in the word: the bit is set and the
    /// slot returned, or `None` (end slot or message, as before).
    pub(super) fn grant_in_word(
        &mut self,
        buffer: BufferId,
        client: ClientId,
        kind: Access,
    ) -> Option<FastSlot> {
        let access = WordAccess::of(kind)?;
        if !self.buffers.get(&buffer)?.word.as_deref()?.taken {
            return None;
        }
        // Another request of the same client on this buffer was told
        // `Planned` (two threads sharing a `Buffer`): a bit of its index
        // now would read to that waiter as its hand-off.
        let planned_sibling = self.arbiter.waiting_for(client) > 0
            && self.waiters.iter().any(|(id, w)| {
                w.client == client
                    && w.ever_planned
                    && self.arbiter.waiter_buffer(*id) == Some(buffer)
            });
        if planned_sibling {
            return None;
        }
        let slot = self.word_slot(buffer, client)?;
        match self.mapped_word(buffer)?.grant(slot, access) {
            Ok(granted) => granted.then_some(slot),
            Err(err) => {
                self.word_contended(buffer, err);
                None
            }
        }
    }

    /// A hand-off the arbiter now grants: recorded if the holder carried it
    /// out (returns true), else the plan is cancelled (waking the waiter)
    /// and the grant goes by message.
    ///
    /// Recorded, the grant is never sent, so the news it took from the
    /// buffer (`writer_lost`, `revoked`) goes back for the next grant, as
    /// for a grant withdrawn (`withdraw_grant`). No path is known to bring
    /// marks here (no plan is made while marks are owed, and the one fence
    /// the waiter waits for is a bit-backed access, whose client has no
    /// hold limit), but a grant that carried them must not drop them.
    pub(super) fn record_hand_off(&mut self, grant: &fence::Grant, request_id: u64) -> bool {
        let kind = super::access::to_wire_access(grant.access);
        let Some(index) = self.index_of(grant.buffer, grant.client) else {
            return false;
        };
        if let Some(ws) = self
            .buffers
            .get_mut(&grant.buffer)
            .and_then(|b| b.word.as_deref_mut())
        {
            ws.planned = None;
        }
        let Some(word) = self.mapped_word(grant.buffer) else {
            return false;
        };
        // A plan the broker could not cancel: the word breaks, and whether
        // the holder carried the plan out is unknown; answered as a
        // hand-off the broker cannot tell (below), and the break tells the
        // waiter its access went.
        let (handed, contended) = match word.cancel_plan() {
            Ok(true) => return false,
            Ok(false) => {
                let now = word.load();
                let handed = WordAccess::of(kind).is_some_and(|access| now.holds_as(index, access));
                (handed, None)
            }
            Err(err) => (false, Some(err)),
        };
        // No plan left, and the waiter's bit there: carried out. Without
        // the bit, either the waiter got it and has ended already, or a
        // holder erased the plan and the waiter, finding neither plan nor
        // bit, waits for a reply. The broker cannot tell which, so it
        // answers the request too: a waiter that was handed the buffer has
        // dropped the request and ignores the answer; the other learns
        // its begin failed instead of waiting forever. The access recorded
        // below has no bit, so the next settle retires it either way.
        // A bit of another kind is no hand-off of ours (a holder changed
        // the plan): the waiter does not take it for one either, and it
        // leaves the word, or nobody would ever clear it.
        if let Some(err) = contended {
            self.word_contended(grant.buffer, err);
        } else if !handed {
            self.clear_unbacked_bits(grant.buffer, index);
        }
        // A client going (its hang-up, or its free of the buffer) is
        // answered as its other begins are: `UnknownBuffer` on a free
        // (a begin again could only fail), nothing at a hang-up.
        let lost = if self.is_leaving(grant.client, grant.buffer) {
            self.leaving_answer()
        } else {
            Some(dmabroker_ipc::WireError::new(
                dmabroker_ipc::ErrorCode::Busy,
                "the hand-off planned for this begin was taken out of the buffer's word, or \
                 changed, by another holder; begin again",
            ))
        };
        // Not counted as a refusal: in a healthy pipeline the waiter was
        // handed the buffer and has ended already far more often than a
        // holder erased its plan, and `status` showed `busy` climbing.
        if let Some(lost) = lost.filter(|_| !handed) {
            self.reply_uncounted(grant.client, request_id, Err(lost), Vec::new());
        }
        self.insert_word_access(
            grant.access_id,
            grant.client,
            grant.buffer,
            kind,
            index,
            request_id,
        );
        self.arbiter
            .restore_marks(grant.buffer, grant.writer_lost, grant.revoked);
        self.touched.push(grant.buffer);
        self.stats.grants += 1;
        self.stats.hand_offs += 1;
        true
    }

    /// Takes out of the word whatever `index` holds there that no access
    /// of the broker's stands for: a bit a holder put there, which its
    /// owner does not know it has and so will never end.
    fn clear_unbacked_bits(&mut self, buffer: BufferId, index: u8) {
        let backed = |write: bool| {
            self.accesses
                .values()
                .any(|a| a.buffer == buffer && a.word_bit == Some(WordBit { index, write }))
        };
        let (read_backed, write_backed) = (backed(false), backed(true));
        let Some(word) = self.mapped_word(buffer) else {
            return;
        };
        let contended = [(false, read_backed), (true, write_backed)]
            .into_iter()
            .filter(|(_, is_backed)| !is_backed)
            .find_map(|(write, _)| word.remove_access(index, write).err());
        if let Some(err) = contended {
            self.word_contended(buffer, err);
        }
    }

    /// After every decision: each touched word is handed back if nothing
    /// is left to arbitrate, or a hand-off is planned.
    pub fn settle_touched(&mut self) {
        while let Some(buffer) = self.touched.pop() {
            self.hand_back_or_plan(buffer);
        }
    }

    fn hand_back_or_plan(&mut self, buffer: BufferId) {
        // Taken or not (a holder's bit left behind by a retired index).
        if self.break_if_contended(buffer) {
            return;
        }
        // A client moving the word between our look and our swap only
        // costs another look; a few are plenty.
        for _ in 0..4 {
            let taken = self.arbitrates_word(buffer);
            if !taken {
                return;
            }
            let now = Instant::now();
            self.settle_buffer(buffer, false, now);
            // The settle may have broken it: a broken word stays taken.
            if !self.arbitrates_word(buffer) {
                return;
            }
            let Some(word) = self.mapped_word(buffer).map(BufferWord::load) else {
                return;
            };
            if word.next().is_some() || !word.daemon() {
                return;
            }
            if !self.only_bits_left(buffer) {
                self.plan_hand_off(buffer, word);
                return;
            }
            if self.hand_back(buffer, word, now) {
                return;
            }
        }
    }

    /// Nothing the word cannot say itself: no waiter, no mark owed, and
    /// every fence a bit that no no-autofence client waits on.
    fn only_bits_left(&self, buffer: BufferId) -> bool {
        if self.arbiter.has_waiters(buffer) || self.arbiter.owes_marks(buffer) {
            return false;
        }
        let mut index = 0;
        while let Some(id) = self.arbiter.fence_id_at(buffer, index) {
            let in_word = self
                .accesses
                .get(&id)
                .is_some_and(|a| a.word_bit.is_some() && a.pending.is_none());
            if !in_word || self.fence_subscribers.contains_key(&id) {
                return false;
            }
            index += 1;
        }
        true
    }

    fn hand_back(&mut self, buffer: BufferId, word: Word, now: Instant) -> bool {
        let Some(ws) = self
            .buffers
            .get_mut(&buffer)
            .and_then(|b| b.word.as_deref_mut())
        else {
            return true;
        };
        let new_epoch = (word.is_idle() && ws.retired != 0).then(|| ws.epoch.wrapping_add(1));
        let Some(mapped) = &ws.mapped else {
            return true;
        };
        match mapped.hand_back(word, new_epoch) {
            Ok(true) => {}
            Ok(false) => return false,
            Err(err) => {
                self.word_contended(buffer, err);
                self.break_if_contended(buffer);
                return true;
            }
        }
        ws.taken = false;
        if let Some(epoch) = new_epoch {
            ws.epoch = epoch;
            ws.retired = 0;
        }
        // The bits are the reservation again; the arbiter forgets them.
        while let Some(id) = self.arbiter.fence_id_at(buffer, 0) {
            let client = self.remove_access(id).map(|a| a.client);
            let ended = client.map(|c| self.arbiter.end(c, id, now));
            if !matches!(ended, Some(Ok(_))) {
                tracing::error!(
                    buffer,
                    access = id,
                    "cannot forget a fence handed back to the word"
                );
                break;
            }
        }
        true
    }

    /// The head of the queue waits for one holder's bit only: let that
    /// holder's end hand the buffer over (one hop instead of two).
    /// `word` has no `NEXT` (see `hand_back_or_plan`).
    fn plan_hand_off(&mut self, buffer: BufferId, word: Word) {
        if self.arbiter.fence_count(buffer) != 1 || self.arbiter.owes_marks(buffer) {
            return;
        }
        // A plan for a waiter still queued, and no `NEXT` left: the
        // holder carried it out after the settle's look at its bit (the
        // waiter may even have ended the access since, leaving no bit).
        // The holder's `WordEnded` records it. Planning that waiter again
        // would answer `Planned` to a request its client has dropped, and
        // the recording would then cancel that plan and grant the begin by
        // message: an access nobody ends, held until its client hangs up.
        if self.plan_queued(buffer) {
            return;
        }
        let Some(holder) = self.arbiter.fence_id_at(buffer, 0) else {
            return;
        };
        let in_word = self
            .accesses
            .get(&holder)
            .is_some_and(|a| a.word_bit.is_some());
        if !in_word {
            return;
        }
        let Some(head) = self.arbiter.head_waiter(buffer) else {
            return;
        };
        let kind = super::access::to_wire_access(head.access);
        let Some(access) = WordAccess::of(kind) else {
            return;
        };
        let autofence = self.clients.get(&head.client).is_some_and(|c| c.autofence);
        let Some(request_id) = self.waiters.get(&head.id).map(|w| w.request_id) else {
            return;
        };
        if !autofence {
            return;
        }
        let Some(slot) = self.word_slot(buffer, head.client) else {
            return;
        };
        if word.holds(slot.index) {
            return;
        }
        let Some(mapped) = self.mapped_word(buffer) else {
            return;
        };
        match mapped.plan(word, slot.index, access) {
            Ok(true) => {}
            // The holder moved meanwhile; its end message brings us back.
            Ok(false) => return,
            Err(err) => {
                self.word_contended(buffer, err);
                self.break_if_contended(buffer);
                return;
            }
        }
        if let Some(ws) = self
            .buffers
            .get_mut(&buffer)
            .and_then(|b| b.word.as_deref_mut())
        {
            ws.planned = Some(Plan {
                waiter: head.id,
                index: slot.index,
                access,
            });
        }
        if let Some(w) = self.waiters.get_mut(&head.id) {
            w.ever_planned = true;
        }
        self.stats.hand_offs_planned += 1;
        self.reply(
            head.client,
            request_id,
            Ok(ReplyBody::Planned { word: slot }),
            Vec::new(),
        );
    }

    /// Accesses held in the word of a buffer the broker does not arbitrate
    /// right now (for the views, which show them as fences without ids).
    pub fn word_fences(&self, buffer: BufferId) -> Vec<(ClientId, Access)> {
        let Some(entry) = self.buffers.get(&buffer) else {
            return Vec::new();
        };
        let Some(ws) = entry.word.as_deref() else {
            return Vec::new();
        };
        let Some(word) = ws.mapped.as_ref().filter(|_| !ws.taken) else {
            return Vec::new();
        };
        word.load()
            .holders()
            .filter_map(|(index, access)| Some((owner_of(entry, index)?, access.access())))
            .collect()
    }

    /// For the views' counts, over `buffers` (all, or one client's), and
    /// for accesses of `client` only when given: (accesses held in words
    /// the broker does not arbitrate now, accesses in its tables whose bit
    /// is already gone). One look at each mapped word; no scan of the
    /// access table.
    pub(super) fn word_counts<'a>(
        &self,
        buffers: impl Iterator<Item = &'a BufferId>,
        client: Option<ClientId>,
    ) -> (usize, usize) {
        let (mut held, mut ended) = (0, 0);
        for buffer in buffers {
            let Some(entry) = self.buffers.get(buffer) else {
                continue;
            };
            let Some(ws) = entry.word.as_deref() else {
                continue;
            };
            let Some(word) = ws.mapped.as_ref().map(BufferWord::load) else {
                continue;
            };
            if !ws.taken {
                held += word
                    .holders()
                    .filter(|(index, _)| client.is_none_or(|c| owner_of(entry, *index) == Some(c)))
                    .count();
                continue;
            }
            let mut index = 0;
            while let Some(id) = self.arbiter.fence_id_at(*buffer, index) {
                index += 1;
                let Some(access) = self.accesses.get(&id) else {
                    continue;
                };
                if client.is_some_and(|c| c != access.client) {
                    continue;
                }
                if let Some(bit) = access.word_bit {
                    if !self.word_bit_present(*buffer, bit) {
                        ended += 1;
                    }
                }
            }
        }
        (held, ended)
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use dmabroker_ipc::bufferword::{BufferWord, FastSlot, WordAccess};

    /// Without a mapping, the restored word is voided by a plain write: a
    /// holder's slot of the old epoch no longer begins in it.
    #[test]
    fn an_unmapped_word_is_voided_by_a_write() {
        const SIZE: u64 = 4096;
        let fd = nix::sys::memfd::memfd_create(
            c"words-test",
            nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
        )
        .expect("memfd");
        nix::unistd::ftruncate(&fd, 2 * SIZE as i64).expect("ftruncate");
        let word = BufferWord::map(fd.as_fd(), SIZE).expect("map");
        let slot = FastSlot { index: 3, epoch: 0 };
        word.try_begin(slot, WordAccess::Read)
            .expect("a read in the word");
        super::void_unmapped(fd.as_fd(), SIZE);
        let now = word.load();
        assert_eq!(now.epoch(), 1, "a new epoch");
        assert!(!now.holds(3), "no access left: {now:?}");
        assert!(
            word.try_begin(slot, WordAccess::Write).is_none(),
            "the old slot begins nothing"
        );
    }

    /// While the broker has the word taken, `DAEMON`, the epoch and `NEXT`
    /// are its own: a holder's change to any of them is tampering (their
    /// ends would go silent, or the broker would stop settling the buffer
    /// for a plan it never made). Not taken, the word is the holders'.
    #[test]
    fn only_the_broker_writes_daemon_epoch_and_plan_while_it_has_the_word() {
        use super::{tampered, Plan, Word, WordAccess, WordState};
        const DAEMON: u64 = 1 << 39;
        const EPOCH_7: u64 = 7 << 48;
        const NEXT_READ_FOR_9: u64 = 1 << 40 | 9 << 43;
        const NEXT_WRITE_FOR_9: u64 = NEXT_READ_FOR_9 | 1 << 41;
        const NEXT_READ_FOR_8: u64 = 1 << 40 | 8 << 43;
        let taken = WordState {
            taken: true,
            epoch: 7,
            ..WordState::default()
        };
        let two_readers = EPOCH_7 | 0b11;
        assert!(!tampered(&taken, Word(two_readers | DAEMON), false));
        assert!(tampered(&taken, Word(two_readers), false), "DAEMON cleared");
        assert!(
            tampered(&taken, Word(8 << 48 | 0b11 | DAEMON), false),
            "another epoch"
        );
        assert!(
            tampered(&taken, Word(two_readers | DAEMON | NEXT_READ_FOR_9), false),
            "a plan nobody made"
        );
        let planned = WordState {
            planned: Some(Plan {
                waiter: 4,
                index: 9,
                access: WordAccess::Read,
            }),
            ..taken
        };
        let as_planned = Word(two_readers | DAEMON | NEXT_READ_FOR_9);
        assert!(!tampered(&planned, as_planned, true));
        assert!(
            tampered(&planned, as_planned, false),
            "a plan whose waiter left"
        );
        assert!(
            tampered(&planned, Word(two_readers | DAEMON | NEXT_READ_FOR_8), true),
            "a plan for another index"
        );
        assert!(
            tampered(
                &planned,
                Word(two_readers | DAEMON | NEXT_WRITE_FOR_9),
                true
            ),
            "a plan of another kind"
        );
        assert!(
            tampered(&planned, Word(as_planned.0 | 1 << 9), true),
            "a plan beside its waiter's bit"
        );
        let handed_back = WordState {
            taken: false,
            ..WordState::default()
        };
        assert!(!tampered(
            &handed_back,
            Word(1 << 48 | 0b11 | NEXT_READ_FOR_9),
            false
        ));
    }
}

/// The word's rules driven through `State` as a connection task drives
/// it, on the cache-sync tests' bench; the test plays the holders' side
/// of the word through its own mapping.
#[cfg(test)]
mod state_tests {
    use std::os::fd::AsFd;

    use dmabroker_ipc::bufferword::{BufferWord, FastSlot, WordAccess, WordEnd, WordHold};
    use dmabroker_ipc::{
        Access, BufferId, ClientId, ErrorCode, Event, Grant, ReplyBody, ServerMessage,
    };

    use super::super::cache_end_tests::Bench;

    const DAEMON: u64 = 1 << 39;
    const NEXT: u64 = 1 << 40;
    const NEXT_IDX_SHIFT: u32 = 43;

    /// A client that asked for buffer words.
    fn words_client(bench: &mut Bench) -> ClientId {
        let client = bench.client();
        if let Some(entry) = bench.state.clients.get_mut(&client) {
            entry.buffer_words = true;
        }
        client
    }

    /// The buffer's word as a holder maps it.
    fn holders_word(bench: &Bench, buffer: BufferId) -> BufferWord {
        let entry = bench.state.buffers.get(&buffer).expect("the buffer");
        BufferWord::map(entry.fd.as_fd(), entry.size).expect("map the word")
    }

    /// What the broker's thread does after every decision.
    fn settle(bench: &mut Bench) {
        let _entered = bench._runtime.enter();
        bench.state.settle_touched();
    }

    /// A begin by message, its decision settled.
    fn begin(bench: &mut Bench, client: ClientId, buffer: BufferId, access: Access) -> u64 {
        let request = bench.begin(client, buffer, access);
        settle(bench);
        request
    }

    /// `WordEnded`, as a holder sends it after an end in a taken word.
    fn word_ended(bench: &mut Bench, client: ClientId, buffer: BufferId) {
        let message = dmabroker_ipc::codec::encode_request(&dmabroker_ipc::Request {
            head: dmabroker_ipc::RequestHead {
                id: 9_000,
                fds: 0,
                flags: 0,
            },
            body: dmabroker_ipc::RequestBody::WordEnded { buffer },
        })
        .expect("encode");
        {
            let _entered = bench._runtime.enter();
            let answered = bench.state.handle_message(client, &message, Vec::new());
            assert_eq!(answered, super::super::Disposition::Continue);
        }
        settle(bench);
    }

    /// The grant `messages` answer `request` with, if any.
    fn grant_of(messages: &[ServerMessage], request: u64) -> Option<Grant> {
        messages.iter().find_map(|message| match message {
            ServerMessage::Reply(reply) if reply.id == request => match &reply.result {
                Ok(ReplyBody::Granted(grant)) => Some(grant.clone()),
                _ => None,
            },
            _ => None,
        })
    }

    /// The accesses of `buffer` that `messages` say were revoked.
    fn revoked(messages: &[ServerMessage], buffer: BufferId) -> Vec<u64> {
        messages
            .iter()
            .filter_map(|message| match message {
                ServerMessage::Event(event) => match event.event {
                    Event::AccessRevoked { access, buffer: b } if b == buffer => Some(access),
                    _ => None,
                },
                _ => None,
            })
            .collect()
    }

    fn broken(bench: &Bench, buffer: BufferId) -> bool {
        bench
            .state
            .buffers
            .get(&buffer)
            .and_then(|b| b.word.as_deref())
            .is_some_and(|ws| ws.broken)
    }

    /// `reader`'s slot in `buffer`'s word, from a read granted in the word
    /// and ended there (the word handed back meanwhile).
    fn slot_by_a_read(bench: &mut Bench, reader: ClientId, buffer: BufferId) -> FastSlot {
        let read = begin(bench, reader, buffer, Access::CpuRead);
        let grant = grant_of(&bench.received(reader), read).expect("the read is granted");
        let slot = grant.word.expect("held in the word");
        let hold = WordHold { slot, write: false };
        holders_word(bench, buffer).end(hold);
        slot
    }

    /// The broker holds the word taken for a write by message (its client
    /// does not use words); a holder clears `DAEMON`, and an honest reader
    /// begins in the word beside the write. The next take-over must judge
    /// the word as it was before it set `DAEMON` again: the word breaks,
    /// the reader is told, and the write queued behind is granted with
    /// the news that the contents may be torn.
    #[test]
    fn a_cleared_daemon_bit_is_seen_by_the_next_take_over() {
        let mut bench = Bench::new();
        let (reader, writer, next) = (words_client(&mut bench), bench.client(), bench.client());
        let frame = bench.buffer_with_word(&[reader, writer, next]);
        let slot = slot_by_a_read(&mut bench, reader, frame);
        let write = begin(&mut bench, writer, frame, Access::CpuWrite);
        assert!(bench.granted(writer, write), "the write is granted");
        let word = holders_word(&bench, frame);
        assert!(word.load().daemon(), "taken for the write by message");

        word.scribble(word.load().0 & !DAEMON);
        assert!(
            word.try_begin(slot, WordAccess::Read).is_some(),
            "the reader begins in a word that looks handed back"
        );
        let queued = begin(&mut bench, next, frame, Access::CpuWrite);
        assert!(broken(&bench, frame), "the word breaks at the take-over");
        assert_eq!(
            revoked(&bench.received(reader), frame),
            vec![0],
            "the reader, whose access the broker never recorded, is told"
        );

        bench.end(writer, bench.access_of(writer, write));
        settle(&mut bench);
        let grant = grant_of(&bench.received(next), queued).expect("the queued write");
        assert!(grant.writer_lost, "the contents may be torn");
        assert!(grant.word.is_none(), "a broken word holds nothing");
    }

    /// A no-autofence client handed a fence held in a buffer's word keeps
    /// the word taken (its end must come to the broker, to be told), even
    /// once its own access has ended. When the client hangs up, nobody
    /// waits for the fence and the word goes back to its holders at once;
    /// before, the hang-up dropped the subscription without marking the
    /// buffer for the hand-back (it had no access there left to mark it),
    /// and the word stayed taken until the next decision on the buffer,
    /// every begin in it a round trip meanwhile. Found by review.
    #[test]
    fn a_word_kept_taken_for_a_no_autofence_client_goes_back_when_it_hangs_up() {
        let mut bench = Bench::new();
        let (writer, manual) = (words_client(&mut bench), bench.client());
        if let Some(entry) = bench.state.clients.get_mut(&manual) {
            entry.autofence = false;
        }
        let frame = bench.buffer_with_word(&[writer, manual]);
        let write = begin(&mut bench, writer, frame, Access::CpuWrite);
        let grant = grant_of(&bench.received(writer), write).expect("the write is granted");
        assert!(grant.word.is_some(), "held in the word");
        let word = holders_word(&bench, frame);
        assert!(!word.load().daemon(), "the word is the holders'");

        let read = begin(&mut bench, manual, frame, Access::CpuRead);
        let listed = grant_of(&bench.received(manual), read).expect("granted at once");
        assert_eq!(listed.fences.len(), 1, "listing the write: {listed:?}");
        assert!(
            word.load().daemon(),
            "taken while the reader waits for the write"
        );
        // Done reading (it waits for the write's end itself): it is still
        // to be told of that end, so the word stays taken.
        bench.end(manual, bench.access_of(manual, read));
        settle(&mut bench);
        assert!(word.load().daemon(), "taken while the reader is to be told");

        {
            let _entered = bench._runtime.enter();
            bench.state.disconnect(manual);
        }
        settle(&mut bench);
        assert!(
            !word.load().daemon(),
            "nobody waits for the write: the word goes back to its holders"
        );
    }

    /// A `NEXT` the broker did not plan, written by a holder while the
    /// broker has the word taken, breaks the word at the next take-over
    /// (the take-over's cancel would otherwise erase it unseen).
    #[test]
    fn a_plan_nobody_made_is_seen_by_the_next_take_over() {
        let mut bench = Bench::new();
        let (reader, writer, next) = (words_client(&mut bench), bench.client(), bench.client());
        let frame = bench.buffer_with_word(&[reader, writer, next]);
        let slot = slot_by_a_read(&mut bench, reader, frame);
        let write = begin(&mut bench, writer, frame, Access::CpuWrite);
        assert!(bench.granted(writer, write), "the write is granted");
        let word = holders_word(&bench, frame);

        let forged = NEXT | u64::from(slot.index) << NEXT_IDX_SHIFT;
        word.scribble(word.load().0 | forged);
        assert!(
            word.load().next().is_some(),
            "a read planned for the reader"
        );
        begin(&mut bench, next, frame, Access::CpuWrite);
        assert!(broken(&bench, frame), "the word breaks at the take-over");
    }

    /// A holder rewrites the `NEXT` the broker planned while it has the
    /// word taken: another index (the holder's end would hand the buffer
    /// to someone who never waited for it) or another kind (the waiter
    /// would be handed what it did not ask for). The next take-over must
    /// break the word; it took any `NEXT` for the broker's own while a
    /// plan was recorded, and cancelled it unseen. Found by review.
    #[test]
    fn a_plan_a_holder_rewrote_is_seen_by_the_next_take_over() {
        // Bits flipped in the word: NEXT_IDX's high bit, NEXT_KIND's low bit.
        let forgeries = [
            ("another index", 16 << NEXT_IDX_SHIFT),
            ("another kind", 1 << 41),
        ];
        for (what, flipped) in forgeries {
            let PlannedWrite {
                mut bench,
                later,
                frame,
                ..
            } = planned_write();
            let word = holders_word(&bench, frame);
            let planned = word.load();
            word.scribble(planned.0 ^ flipped);
            assert_ne!(word.load().next(), planned.next(), "{what}");
            assert!(word.load().next().is_some(), "{what}: still a plan");

            begin(&mut bench, later, frame, Access::CpuRead);
            assert!(broken(&bench, frame), "{what}: the word breaks");
        }
    }

    /// News the arbiter attaches to the grant of a hand-off the holder
    /// carried out (here a `writer_lost` marked while the plan stood) goes
    /// back to the buffer when the hand-off is recorded, and the next grant
    /// carries it: the hand-off's grant is never sent. Before, the
    /// recording dropped it, and nobody heard that the contents may be
    /// torn.
    #[test]
    fn news_taken_by_a_recorded_hand_off_reaches_the_next_grant() {
        let HandedOff {
            mut bench,
            holder,
            waiter,
            later,
            frame,
            slot,
            word,
            ..
        } = handed_off();
        bench.state.arbiter.mark_writer_lost(frame);
        word_ended(&mut bench, holder, frame);
        assert_eq!(bench.state.stats.hand_offs, 1, "recorded");
        assert_eq!(
            word.end(WordHold { slot, write: true }),
            WordEnd::Tell,
            "the word stays taken while the news is owed (not handed back)"
        );
        word_ended(&mut bench, waiter, frame);

        let next = begin(&mut bench, later, frame, Access::CpuRead);
        let grant = grant_of(&bench.received(later), next).expect("the buffer is free");
        assert!(grant.writer_lost, "the news reaches the next grant");
    }

    /// A holder's read held in the word, a waiter's write planned behind
    /// it (once), and the holder's end in the word handing the buffer over,
    /// which the broker has not recorded yet; `later` uses no words.
    struct HandedOff {
        /// The word just before the holder's end: its bit, and the plan.
        before: dmabroker_ipc::bufferword::Word,
        bench: Bench,
        holder: ClientId,
        waiter: ClientId,
        later: ClientId,
        frame: BufferId,
        write: u64,
        slot: FastSlot,
        word: BufferWord,
    }

    /// A holder's read held in the word and a waiter's write planned
    /// behind it; `later` uses no words.
    struct PlannedWrite {
        bench: Bench,
        holder: ClientId,
        waiter: ClientId,
        later: ClientId,
        frame: BufferId,
        /// The holder's read request.
        read: u64,
        /// The waiter's write request.
        write: u64,
        /// What the waiter received: the write's `Planned` among it.
        waiter_got: Vec<ServerMessage>,
    }

    fn planned_write() -> PlannedWrite {
        let mut bench = Bench::new();
        let (holder, waiter, later) = (
            words_client(&mut bench),
            words_client(&mut bench),
            bench.client(),
        );
        let frame = bench.buffer_with_word(&[holder, waiter, later]);
        let read = begin(&mut bench, holder, frame, Access::CpuRead);
        let write = begin(&mut bench, waiter, frame, Access::CpuWrite);
        let waiter_got = bench.received(waiter);
        assert_eq!(plans(&waiter_got, write), 1, "the write is planned");
        PlannedWrite {
            bench,
            holder,
            waiter,
            later,
            frame,
            read,
            write,
            waiter_got,
        }
    }

    fn handed_off() -> HandedOff {
        let PlannedWrite {
            bench,
            holder,
            waiter,
            later,
            frame,
            read,
            write,
            waiter_got: messages,
        } = planned_write();
        let held = grant_of(&bench.received(holder), read)
            .and_then(|g| g.word)
            .expect("the read is held in the word");
        let Some(ServerMessage::Reply(reply)) = messages.first() else {
            panic!("no answer to the write: {messages:?}")
        };
        let Ok(ReplyBody::Planned { word: slot }) = reply.result else {
            panic!("not planned: {reply:?}")
        };
        let word = holders_word(&bench, frame);
        let before = word.load();
        word.end(WordHold {
            slot: held,
            write: false,
        });
        let handed = word.await_plan(slot, WordAccess::Write, std::time::Duration::ZERO);
        assert_eq!(handed, dmabroker_ipc::bufferword::Planned::Granted);
        HandedOff {
            before,
            bench,
            holder,
            waiter,
            later,
            frame,
            write,
            slot,
            word,
        }
    }

    /// A hand-off the broker had not recorded when the word broke: the
    /// waiter's request (`write`) is answered `Busy`, not granted by
    /// message; the waiter is told its bit went (id 0); nobody is left
    /// queued; and the next grant (to `later`) carries `writer_lost`.
    fn assert_hand_off_withdrawn(
        bench: &mut Bench,
        waiter: ClientId,
        write: u64,
        later: ClientId,
        frame: BufferId,
    ) {
        let answers = bench.received(waiter);
        assert!(
            grant_of(&answers, write).is_none(),
            "no grant by message for the hand-off: {answers:?}"
        );
        assert!(answered_busy(&answers, write), "answered: {answers:?}");
        assert_eq!(revoked(&answers, frame), vec![0], "the writer is told");
        assert_eq!(bench.state.arbiter.queue_len(frame), 0, "nobody queued");
        let next = begin(bench, later, frame, Access::CpuRead);
        let grant = grant_of(&bench.received(later), next).expect("the buffer is free");
        assert!(
            grant.writer_lost,
            "the torn write is told to the next grant"
        );
    }

    /// Whether `request` was answered `Busy` among `answers`.
    fn answered_busy(answers: &[ServerMessage], request: u64) -> bool {
        answers.iter().any(|message| {
            matches!(message, ServerMessage::Reply(reply)
                if reply.id == request
                    && reply.result.as_ref().is_err_and(|e| e.code == ErrorCode::Busy))
        })
    }

    /// Every `Planned` among `messages` answering `request`.
    fn plans(messages: &[ServerMessage], request: u64) -> usize {
        messages
            .iter()
            .filter(|message| {
                matches!(message, ServerMessage::Reply(reply)
                    if reply.id == request && matches!(reply.result, Ok(ReplyBody::Planned { .. })))
            })
            .count()
    }

    /// A hand-off carried out between the settle's look at the holder's
    /// bit and the load `hand_back_or_plan` plans from (the holder ended
    /// and handed over, and the waiter ended the access it was handed):
    /// the word has no `NEXT` and no bit, but the arbiter still has the
    /// holder's fence and the waiter queued. The waiter must not be
    /// planned again: the recording of the hand-off would cancel that
    /// plan and grant by message a begin its client has dropped, and the
    /// arbiter would keep that access for good.
    #[test]
    fn a_hand_off_carried_out_is_not_planned_again() {
        let HandedOff {
            mut bench,
            holder,
            waiter,
            later,
            frame,
            write,
            slot,
            word,
            ..
        } = handed_off();
        word.end(WordHold { slot, write: true });

        // What `hand_back_or_plan` does after a settle that found the
        // holder's bit still there.
        bench.state.plan_hand_off(frame, word.load());
        assert_eq!(bench.state.stats.hand_offs_planned, 1, "planned once");
        assert!(word.load().next().is_none(), "no plan in the word");
        assert_eq!(plans(&bench.received(waiter), write), 0);

        word_ended(&mut bench, holder, frame);
        let answers = bench.received(waiter);
        assert!(
            grant_of(&answers, write).is_none(),
            "no grant by message for the hand-off"
        );
        let busy = answered_busy(&answers, write);
        assert!(
            busy,
            "recorded as a hand-off the broker cannot tell: {answers:?}"
        );
        // Most often the waiter was handed the buffer and has ended it:
        // no refusal to show in `status`.
        assert_eq!(
            bench.state.stats.refusals.get("busy"),
            None,
            "an answer the broker cannot tell is needed is not a refusal"
        );
        assert_eq!(bench.state.arbiter.fence_count(frame), 0, "nothing held");
        let next = begin(&mut bench, later, frame, Access::CpuWrite);
        assert!(bench.granted(later, next), "the buffer is free");
    }

    /// A word broken after a hand-off the broker has not recorded yet:
    /// the waiter holds the write in the word, the arbiter still has the
    /// holder's fence and the waiter queued. Breaking the word ends that
    /// fence, which must not grant the waiter by message (its client
    /// dropped the request at the hand-off: the arbiter would keep the
    /// write for good, and the grant's `writer_lost` would be read by
    /// nobody). The waiter is told its access is revoked, its request is
    /// answered `Busy`, and the news goes to the next grant.
    #[test]
    fn a_word_broken_before_a_hand_off_is_recorded_grants_nothing_unseen() {
        let HandedOff {
            mut bench,
            holder,
            waiter,
            later,
            frame,
            write,
            word,
            ..
        } = handed_off();

        // A reader's bit beside the write: no legal sequence makes it.
        word.scribble(word.load().0 | 1 << 31);
        word_ended(&mut bench, holder, frame);
        assert!(broken(&bench, frame), "the word breaks");
        assert_eq!(bench.state.arbiter.fence_count(frame), 0, "nothing held");
        assert_hand_off_withdrawn(&mut bench, waiter, write, later, frame);
    }

    /// A word judged corrupt as it was before a hand-off the holders then
    /// carried out (legal while the broker has the word), before the
    /// broker reset it: the waiter, planned in the word judged, was left
    /// queued and granted by message a request it had dropped at the
    /// hand-off (an access held for good), and not told that the bit it
    /// was using went. The word the reset replaces decides. Found by
    /// review.
    #[test]
    fn a_hand_off_after_the_look_that_breaks_the_word_is_seen() {
        let HandedOff {
            before,
            mut bench,
            waiter,
            later,
            frame,
            write,
            ..
        } = handed_off();
        assert!(before.next().is_some(), "the plan is in the word judged");
        bench.state.break_word(frame, before);
        assert_hand_off_withdrawn(&mut bench, waiter, write, later, frame);
    }

    /// A word broken while the hand-off it plans is still in it: the
    /// waiter was handed nothing and stays queued, and the holder's fence,
    /// ended by the break, grants it by message with the news.
    #[test]
    fn a_word_broken_with_its_plan_still_in_it_grants_the_waiter_by_message() {
        let PlannedWrite {
            mut bench,
            holder,
            waiter,
            later,
            frame,
            write,
            ..
        } = planned_write();
        let word = holders_word(&bench, frame);

        word.scribble(word.load().0 & !DAEMON);
        begin(&mut bench, later, frame, Access::CpuRead);
        assert!(broken(&bench, frame), "the word breaks at the take-over");
        let revoked_read = revoked(&bench.received(holder), frame);
        assert!(
            matches!(revoked_read[..], [id] if id != 0),
            "the holder is told, by the id the broker gave its read: {revoked_read:?}"
        );
        let grant = grant_of(&bench.received(waiter), write).expect("granted by message");
        assert!(grant.writer_lost, "with the news");
    }

    /// Every attempt of the broker's at changing `buffer`'s word fails from
    /// now on, as under a holder storing to the word's cache line on a core
    /// whose atomics are load/store-exclusive loops (no LSE).
    fn keep_changing(bench: &mut Bench, buffer: BufferId) {
        fn lost_reservation(_: &std::sync::atomic::AtomicU64) -> bool {
            true
        }
        bench
            .state
            .buffers
            .get_mut(&buffer)
            .and_then(|b| b.word.as_deref_mut())
            .and_then(|ws| ws.mapped.as_mut())
            .expect("the broker maps the word")
            .interfere(lost_reservation);
    }

    /// A holder keeps the word changing under the broker's take-over. The
    /// take-over gives up after a bounded number of attempts and breaks
    /// the word: the reader holding in it is told its access is revoked
    /// (by its id, and as id 0 for any bit of its own: what the word held
    /// when it was voided is unknown), and the write queued behind is
    /// granted with the news that the contents may be torn. Before, the
    /// take-over (a fetch-or, a loop of its own on such cores) spun on the
    /// broker's thread for as long as the holder went on.
    #[test]
    fn a_word_that_no_change_sticks_to_is_broken_and_its_holders_told() {
        let mut bench = Bench::new();
        let (reader, writer, later) = (words_client(&mut bench), bench.client(), bench.client());
        let frame = bench.buffer_with_word(&[reader, writer, later]);
        let slot = slot_by_a_read(&mut bench, reader, frame);
        holders_word(&bench, frame)
            .try_begin(slot, WordAccess::Read)
            .expect("the reader begins in the word");
        let write = begin(&mut bench, writer, frame, Access::CpuWrite);
        assert!(
            !bench.granted(writer, write),
            "the write waits for the read"
        );
        let read = bench.access_of(reader, 0);

        keep_changing(&mut bench, frame);
        begin(&mut bench, later, frame, Access::CpuRead);
        assert!(broken(&bench, frame), "the word breaks");
        let mut told = revoked(&bench.received(reader), frame);
        told.sort_unstable();
        assert_eq!(told, vec![0, read], "the reader is told");
        let grant = grant_of(&bench.received(writer), write).expect("the write is granted");
        assert!(grant.writer_lost, "with the news");
        assert!(grant.word.is_none(), "a broken word holds nothing");
        let now = holders_word(&bench, frame).load();
        assert!(now.is_idle() && now.daemon(), "voided: {now:?}");
        assert_ne!(now.epoch(), slot.epoch, "the reader's slot is void");
    }

    /// The waiter of a hand-off its holder carried out (it holds the write
    /// in the word, and may be writing) goes, by hang-up or free, before
    /// the broker read the holder's `WordEnded`. The write is its, and a
    /// lost one: the next grant must carry `writer_lost`. Before, taking
    /// its queued begins out cancelled the waiter in the queue without
    /// recording the hand-off, the write was nobody's in the table (not
    /// released as lost) and its bit left with the holder's index: the next
    /// reader was granted contents that may be torn with no warning. Found
    /// by review. Returns whether the next grant carries `writer_lost`.
    fn next_reader_told_of_a_hand_off_whose_waiter_goes(frees: bool) -> bool {
        let HandedOff {
            mut bench,
            holder,
            waiter,
            later,
            frame,
            ..
        } = handed_off();
        {
            let _entered = bench._runtime.enter();
            if frees {
                let free = super::super::cache_end_tests::free_request(frame);
                let answered = bench.state.handle_message(waiter, &free, Vec::new());
                assert_eq!(answered, super::super::Disposition::Continue);
            } else {
                bench.state.disconnect(waiter);
            }
        }
        settle(&mut bench);
        assert_eq!(bench.state.stats.hand_offs, 1, "the hand-off is recorded");
        word_ended(&mut bench, holder, frame);
        let next = begin(&mut bench, later, frame, Access::CpuRead);
        grant_of(&bench.received(later), next)
            .expect("the next read is granted")
            .writer_lost
    }

    #[test]
    fn a_hand_off_whose_waiter_hangs_up_is_a_lost_write() {
        assert!(next_reader_told_of_a_hand_off_whose_waiter_goes(false));
    }

    #[test]
    fn a_hand_off_whose_waiter_frees_the_buffer_is_a_lost_write() {
        assert!(next_reader_told_of_a_hand_off_whose_waiter_goes(true));
    }

    /// How `client` goes in the teardown tests below.
    #[derive(Clone, Copy, Debug)]
    enum Goes {
        HangsUp,
        Frees,
    }

    /// `client` hangs up, or frees `frame`, and the broker's thread then
    /// settles as after any decision.
    fn goes(bench: &mut Bench, client: ClientId, frame: BufferId, how: Goes) {
        {
            let _entered = bench._runtime.enter();
            match how {
                Goes::Frees => {
                    let free = super::super::cache_end_tests::free_request(frame);
                    let answered = bench.state.handle_message(client, &free, Vec::new());
                    assert_eq!(answered, super::super::Disposition::Continue);
                }
                Goes::HangsUp => bench.state.disconnect(client),
            }
        }
        settle(bench);
    }

    /// The answer among `messages` to `request`, if any: `Ok(())` for a
    /// grant, else the error's code (or a `Planned`'s absence of one).
    fn answer_to(messages: &[ServerMessage], request: u64) -> Option<Result<(), ErrorCode>> {
        messages.iter().find_map(|message| match message {
            ServerMessage::Reply(reply) if reply.id == request => match &reply.result {
                Ok(ReplyBody::Granted(_)) => Some(Ok(())),
                Ok(_) => None,
                Err(err) => Some(Err(err.code)),
            },
            _ => None,
        })
    }

    /// A holder's read held in the word; `client` (no buffer words, so
    /// no hand-off is planned for it) queues a write behind it, `later` a
    /// read behind that; the holder clears `DAEMON`, and `client` goes.
    /// The take-over its going makes finds the word tampered with and
    /// breaks it, ending the holder's read: that served the queue while
    /// `client`'s write was still in it, and granted it to the client
    /// going (a `Granted` answer to a begin on a buffer being freed, sent
    /// before the `Freed`; at a hang-up a grant sent to nobody), whose
    /// release then marked a lost write it never made. Nothing may be
    /// granted to it: its write goes, answered `UnknownBuffer` on a free
    /// (nothing at a hang-up), and `later`'s read is granted, told
    /// `writer_lost` by the break. Returns the answer to the write.
    fn a_tampered_word_at_a_teardown(how: Goes) -> Option<Result<(), ErrorCode>> {
        let mut bench = Bench::new();
        let (holder, client, later) = (words_client(&mut bench), bench.client(), bench.client());
        let frame = bench.buffer_with_word(&[holder, client, later]);
        let read = begin(&mut bench, holder, frame, Access::CpuRead);
        grant_of(&bench.received(holder), read)
            .and_then(|g| g.word)
            .expect("the read is held in the word");
        let write = begin(&mut bench, client, frame, Access::CpuWrite);
        let queued = begin(&mut bench, later, frame, Access::CpuRead);
        assert!(bench.received(client).is_empty(), "the write waits");
        assert!(bench.received(later).is_empty(), "the read waits");
        let word = holders_word(&bench, frame);
        assert!(word.load().next().is_none(), "no hand-off planned");
        let grants = bench.state.stats.grants;

        word.scribble(word.load().0 & !DAEMON);
        goes(&mut bench, client, frame, how);
        assert!(broken(&bench, frame), "the word breaks at the take-over");
        let answers = bench.received(client);
        let answer = answer_to(&answers, write);
        assert_ne!(
            answer,
            Some(Ok(())),
            "granted to a client going: {answers:?}"
        );
        assert_eq!(
            bench.state.stats.grants,
            grants + 1,
            "one grant: the later read"
        );
        let grant = grant_of(&bench.received(later), queued).expect("the later read");
        assert!(grant.writer_lost, "with the break's news");
        answer
    }

    #[test]
    fn a_word_tampered_with_at_a_free_grants_the_client_freeing_nothing() {
        assert_eq!(
            a_tampered_word_at_a_teardown(Goes::Frees),
            Some(Err(ErrorCode::UnknownBuffer))
        );
    }

    #[test]
    fn a_word_tampered_with_at_a_hang_up_grants_the_client_going_nothing() {
        assert_eq!(a_tampered_word_at_a_teardown(Goes::HangsUp), None);
    }

    /// The waiter of a hand-off its holder carried out ends the access it
    /// was handed in the word, then goes before the broker read the
    /// holder's `WordEnded`. The recording finds no bit and cannot tell
    /// an ended hand-off from an erased plan, so it answers the begin; on
    /// a free that answer is the one protocol.md gives a queued begin
    /// whose buffer its client freed, `UnknownBuffer` (it was `Busy`,
    /// "begin again", on a buffer the client no longer holds), and at a
    /// hang-up there is nobody to answer. Nothing is lost: the write
    /// ended. Returns the answer to the waiter's write.
    fn an_ended_hand_off_at_a_teardown(how: Goes) -> Option<Result<(), ErrorCode>> {
        let HandedOff {
            mut bench,
            holder,
            waiter,
            later,
            frame,
            write,
            slot,
            word,
            ..
        } = handed_off();
        assert_eq!(word.end(WordHold { slot, write: true }), WordEnd::Tell);
        bench.received(waiter);
        goes(&mut bench, waiter, frame, how);
        assert_eq!(bench.state.stats.hand_offs, 1, "the hand-off is recorded");
        let answer = answer_to(&bench.received(waiter), write);
        word_ended(&mut bench, holder, frame);
        let next = begin(&mut bench, later, frame, Access::CpuRead);
        let grant = grant_of(&bench.received(later), next).expect("the buffer is free");
        assert!(!grant.writer_lost, "the handed write ended");
        answer
    }

    #[test]
    fn an_ended_hand_off_whose_waiter_frees_is_answered_unknown_buffer() {
        assert_eq!(
            an_ended_hand_off_at_a_teardown(Goes::Frees),
            Some(Err(ErrorCode::UnknownBuffer))
        );
    }

    #[test]
    fn an_ended_hand_off_whose_waiter_hangs_up_is_answered_nothing() {
        assert_eq!(an_ended_hand_off_at_a_teardown(Goes::HangsUp), None);
    }
}
