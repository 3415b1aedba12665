//! The service manager's fd store (`FDSTORE=1`): every live buffer's fd and
//! a record of the table, so a restarted broker takes them back.
//!
//! The record is a sealed memfd, rewritten after changes (debounced by the
//! caller). Two names alternate (`state-a`, `state-b`): the new record is
//! stored before the old one is removed, so a crash in between leaves at
//! least one, and the restore picks the higher generation. The name is the
//! one the stored record does not have, not one chosen by the generation:
//! after a record that could not be stored, the next one would otherwise
//! take the name of the one stored, which then stayed (removing a name
//! removes every fd of it, so it could not be removed).
//!
//! The store is bounded (`FileDescriptorStoreMax=`), and systemd closes an
//! fd sent to a full store without telling the sender. So the broker knows
//! the bound ([`Capacity`]) and never sends more fds than fit: two slots
//! stay free for the records, and a buffer that would need a slot beyond
//! the rest is refused (see `State::check_store_slot`).
//!
//! systemd counts every fd in the store, records included, whatever its
//! name (several fds may share one), and drops an fd of a file it holds
//! already. The records take at most two slots from a record's store to
//! the next one's: the new one is stored, then the old one removed. Only
//! older records a restart found (or one whose removal could not be sent)
//! can make more, and they are removed before the next record is stored:
//! [`RecordWriter::record_slots`] is the most the writer's next steps hold
//! at once, and the buffers get every other slot. A record that would not
//! fit (the store over its maximum after `FileDescriptorStoreMax=` was
//! lowered across a restart) is not sent: the one in the store stays until
//! frees make room ([`RecordError::NoRoom`]).

use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};

use sd_notify::NotifyState;

use super::inherited::{BUFFER_PREFIX, RECORD_PREFIX};
use super::notify;
use super::record::{DecodeError, StateRecord};
use crate::held_files::{HeldDup, HeldFd};
use crate::kernel::memfd;

/// Slots of the store kept for the record: the new one is stored before
/// the old one is removed, so for a moment there are two.
pub const RECORD_SLOTS: usize = 2;

/// How many fds the service manager keeps for us.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    /// `FileDescriptorStoreMax=`.
    pub max: usize,
    /// Whether the manager said so (`$FDSTORE`) or `--fd-store-max` did.
    pub from_manager: bool,
}

impl Capacity {
    /// `$FDSTORE` when the manager sets it (systemd ≥ 254 does whenever
    /// `FileDescriptorStoreMax=` is above 0), else `fallback`.
    pub fn from_env(fallback: usize) -> Capacity {
        let told = std::env::var("FDSTORE").ok();
        match told.as_deref().map(str::parse::<usize>) {
            Some(Ok(max)) => Capacity {
                max,
                from_manager: true,
            },
            Some(Err(err)) => {
                tracing::warn!(
                    value = told.as_deref().unwrap_or_default(),
                    error = %err,
                    fallback,
                    "cannot read $FDSTORE; using --fd-store-max"
                );
                Capacity {
                    max: fallback,
                    from_manager: false,
                }
            }
            None => Capacity {
                max: fallback,
                from_manager: false,
            },
        }
    }

    /// Buffers the store can keep besides the records.
    pub fn buffer_slots(&self) -> usize {
        self.max.saturating_sub(RECORD_SLOTS)
    }
}

/// Buffers in and out of the store: cheap notifications the broker sends
/// as buffers come and go.
#[derive(Debug)]
pub struct FdStore {
    pub capacity: Capacity,
    /// Entries whose removal could not be sent (the daemon had no fd for
    /// the notify socket): still in the store, so still taking slots, and
    /// sent again with the next change to the store.
    unremoved: Mutex<Vec<String>>,
    /// Buffers that could not be put in the store (the manager's queue
    /// full, no fd for the message): sent again with the next change to the
    /// store and by the record's writer until they are in.
    unstored: Mutex<Vec<u64>>,
    /// Buffers the record's writer has taken from `unstored` to send off
    /// the broker's thread, and removals of those freed meanwhile, held
    /// until the writer is done: sent now, such a removal could reach the
    /// manager before the writer's late store, which would then put a
    /// freed buffer back. They count as taking a slot.
    in_flight: Mutex<InFlight>,
    /// In a run of failures to store or remove, logged once at its start
    /// and once at its end.
    failing: std::sync::atomic::AtomicBool,
    /// Slots the records may take until the writer says otherwise (see
    /// [`RecordWriter::record_slots`]): [`RECORD_SLOTS`] but for older
    /// records a restart found.
    record_slots: std::sync::atomic::AtomicUsize,
    /// The latest record could not be stored: owed, as a buffer is, so
    /// that a run of failures ends only once it is in.
    record_owed: std::sync::atomic::AtomicBool,
    /// The last removal sent failed for want of a manager (its socket
    /// gone), not of room in its queue.
    unreachable: std::sync::atomic::AtomicBool,
    /// Fds a restart was handed under a name beyond its first, which it
    /// closed (see `Stored::leftovers`): the manager holds and counts them
    /// until the name's removal is sent, and that of a live buffer's name
    /// only goes with the buffer.
    extra_fds: Mutex<std::collections::HashMap<String, usize>>,
}

#[derive(Debug, Default)]
struct InFlight {
    ids: Vec<u64>,
    deferred_removals: Vec<String>,
}

/// How full the store is besides the records, when the writer is to
/// send a record: systemd closes an fd sent to a full store without
/// telling, and the writer would then remove the record before it, so a
/// record that does not fit is not sent (see [`RecordWriter::store`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Room {
    /// Fds in the store that are no record's: every live buffer's (in the
    /// store or on its way: the same count `State::check_store_slot` keeps
    /// below the buffers' slots) and the leftovers.
    pub buffer_fds: usize,
    /// `FileDescriptorStoreMax=`.
    pub max: usize,
}

/// Why a record was not stored.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The store has no slot for it: more buffers than it now keeps
    /// (`FileDescriptorStoreMax=` lowered across a restart). The record
    /// in the store stays, and the next one goes once buffers are freed.
    #[error(
        "the fd store has no slot for a new record of the buffer table: {buffer_fds} buffer fds \
         and {record_fds} record fds in it, FileDescriptorStoreMax={max}"
    )]
    NoRoom {
        buffer_fds: usize,
        record_fds: usize,
        max: usize,
    },
    #[error("cannot encode the buffer table record: {0}")]
    Encode(#[from] postcard::Error),
    /// A send failed: `WouldBlock` while the manager has no room yet.
    #[error(transparent)]
    Send(#[from] std::io::Error),
}

impl RecordError {
    /// Whether the manager only had no room in its queue yet: worth
    /// trying again soon.
    pub fn is_would_block(&self) -> bool {
        matches!(self, RecordError::Send(err) if err.kind() == std::io::ErrorKind::WouldBlock)
    }
}

/// Where a removal still to be sent waits (see `FdStore::await_removal`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Unsent {
    /// Queued for room in the manager's queue, or for a manager at all.
    Queued,
    /// Held back behind the record writer's store of the buffer.
    HeldBack,
}

/// Buffers out of the store taken for the record's writer (see
/// [`FdStore::take_batch`]).
#[derive(Debug, Default)]
pub struct Batch {
    /// Each buffer with a copy of its fd, oldest first. A `HeldDup`: a
    /// buffer freed while the batch is out keeps its file through the
    /// dup's anchor, so the dup's close on the writer's thread is never
    /// the file's last release (see `held_files`).
    pub fds: Vec<(u64, HeldDup)>,
    /// Why a buffer could not be taken: its fd could not be copied.
    pub error: Option<std::io::Error>,
}

/// The table's record in the store. Owned by the task that rewrites it, so
/// encoding and storing happen outside the broker's lock.
#[derive(Debug, Default)]
pub struct RecordWriter {
    /// Generation of the latest record copied (or taken back at start).
    generation: u64,
    /// The record most recently stored, to be removed after the next one.
    current: Option<String>,
    /// Fds stored under `current`'s name: one, or more when a restart
    /// found older records of that name (its removal removes them all).
    current_fds: usize,
    /// Previous records whose removal could not be sent, or older ones a
    /// restart found beside the one it kept, each with its fds: removed
    /// before the next record is stored, which would otherwise be a record
    /// fd too many in the store and could be refused (systemd closes an fd
    /// beyond `FileDescriptorStoreMax=` without telling), after which the
    /// kept record would be removed and only an older one left.
    stale: Vec<(String, usize)>,
    /// The latest record, encoded, kept until the table changes: while the
    /// manager has no room, every try would otherwise copy and encode the
    /// whole table again for the same bytes. `None` once the table changed
    /// (see [`RecordWriter::table_changed`]).
    latest: Option<Latest>,
}

/// Where the latest encoded record is on its way to the store.
#[derive(Debug)]
enum Latest {
    /// Encoded; its memfd could not be made yet (out of fds).
    Encoded(Vec<u8>),
    /// In its sealed memfd, not stored yet. Never passed to the manager
    /// while here (a failed send passes no fd), so it may be sent as is.
    Sealed(OwnedFd),
    /// In the store, as far as the daemon can know (a notification has
    /// no answer): nothing to send until the table changes but an offer
    /// of this same memfd now and then ([`RecordWriter::reoffer`]), in
    /// case the manager dropped it.
    Stored(OwnedFd),
}

pub fn buffer_name(id: u64) -> String {
    format!("{BUFFER_PREFIX}{id}")
}

/// The name for the next record: the other one than the stored record's.
fn next_record_name(current: Option<&str>) -> String {
    let a = format!("{RECORD_PREFIX}a");
    if current == Some(a.as_str()) {
        format!("{RECORD_PREFIX}b")
    } else {
        a
    }
}

impl FdStore {
    /// Only under a service manager; `None` means there is nowhere to keep
    /// anything. `fallback_max`: `--fd-store-max`, for a manager that does
    /// not say how many fds it keeps.
    pub fn from_env(fallback_max: usize) -> Option<FdStore> {
        super::notify::enabled().then(|| FdStore {
            capacity: Capacity::from_env(fallback_max),
            unremoved: Mutex::new(Vec::new()),
            unstored: Mutex::new(Vec::new()),
            in_flight: Mutex::new(InFlight::default()),
            failing: std::sync::atomic::AtomicBool::new(false),
            record_slots: std::sync::atomic::AtomicUsize::new(RECORD_SLOTS),
            record_owed: std::sync::atomic::AtomicBool::new(false),
            unreachable: std::sync::atomic::AtomicBool::new(false),
            extra_fds: Mutex::new(std::collections::HashMap::new()),
        })
    }

    /// Slots taken besides the live buffers' and the two kept for the
    /// records: freed buffers perhaps still in the store (their removal not
    /// sent yet, or held back behind the record writer's batch), and
    /// record slots beyond the two while older records are to be removed.
    pub fn unremoved(&self) -> usize {
        self.leftover_fds() + self.extra_record_slots()
    }

    /// What the record's writer still has to do about fds it does not
    /// want in the store: removals not sent yet (or held back behind its
    /// batch), and records beyond the two. Not the fds a restart found
    /// under a live buffer's name beyond the first: they take a slot
    /// (`unremoved`) but can only leave with that buffer's removal.
    pub fn owed_removals(&self) -> usize {
        self.removals_waiting() + self.extra_record_slots()
    }

    /// Fds in the manager's store that are neither a live buffer's nor a
    /// record's: freed buffers whose removal is not sent yet (or held
    /// back behind the writer's batch), and fds a restart closed that are
    /// still there.
    pub fn leftover_fds(&self) -> usize {
        let extra: usize = self.extra_fds().values().sum();
        self.removals_waiting() + extra
    }

    /// Removals not sent yet, or held back behind the writer's batch.
    fn removals_waiting(&self) -> usize {
        // One lock at a time: each guard goes with its statement.
        let unsent = self.unremoved_names().len();
        let deferred = self.in_flight().deferred_removals.len();
        unsent + deferred
    }

    /// Record slots beyond the two while older records are to be removed.
    fn extra_record_slots(&self) -> usize {
        self.record_slots
            .load(std::sync::atomic::Ordering::Acquire)
            .saturating_sub(RECORD_SLOTS)
    }

    /// After the restore: fds it was handed beyond the first of a name
    /// (see `extra_fds`), before any removal of those names is sent.
    pub fn set_extra_fds(&self, extra: std::collections::HashMap<String, usize>) {
        *self.extra_fds() = extra;
    }

    fn extra_fds(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, usize>> {
        self.extra_fds.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The removal of `names` was sent: every fd of each is out.
    fn removed<S: AsRef<str>>(&self, names: &[S]) {
        let mut extra = self.extra_fds();
        for name in names {
            extra.remove(name.as_ref());
        }
    }

    /// What the store holds besides the records, for the record's writer
    /// (see [`Room`]): `live` buffers (each in the store or on its way)
    /// and the [leftovers](FdStore::leftover_fds).
    pub fn room(&self, live: usize) -> Room {
        Room {
            buffer_fds: live + self.leftover_fds(),
            max: self.capacity.max,
        }
    }

    /// See `record_owed`: set by the record's writer after each try.
    pub fn set_record_owed(&self, owed: bool) {
        self.record_owed
            .store(owed, std::sync::atomic::Ordering::Release);
    }

    /// See `record_slots`: set after the restore, then by the record's
    /// writer after each try. It only ever goes down between two settings
    /// (each of the writer's steps holds fewer records or as many as its
    /// last setting allowed), so a setting made after the steps it counts
    /// never lets a buffer take a slot a record still needs.
    pub fn set_record_slots(&self, slots: usize) {
        self.record_slots
            .store(slots, std::sync::atomic::Ordering::Release);
    }

    fn in_flight(&self) -> std::sync::MutexGuard<'_, InFlight> {
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The start of a run of failures: said once.
    pub fn note_failure(&self, what: &str) {
        use std::sync::atomic::Ordering;
        if !self.failing.swap(true, Ordering::AcqRel) {
            tracing::warn!(
                first = what,
                "cannot put buffers in the fd store or take them out (the service manager has no room or is gone); they will be sent again, and each keeps its slot meanwhile"
            );
        }
    }

    /// The end of a run of failures, once nothing is owed any more.
    pub fn note_progress(&self) {
        use std::sync::atomic::Ordering;
        if !self.failing.load(Ordering::Acquire) {
            return;
        }
        let owed = self.unstored_ids().len()
            + self.unremoved_names().len()
            + usize::from(self.record_owed.load(Ordering::Acquire))
            + {
                let flight = self.in_flight();
                flight.ids.len() + flight.deferred_removals.len()
            };
        if owed == 0 && self.failing.swap(false, Ordering::AcqRel) {
            tracing::info!("every buffer is in the fd store again, and every freed one out");
        }
    }

    fn unremoved_names(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
        self.unremoved.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends the removals that failed before, in order, until one fails
    /// again (the manager's queue is still full: the rest would too).
    pub fn retry_removals(&self) {
        let mut names = self.unremoved_names();
        if names.is_empty() {
            return;
        }
        let sent = names
            .iter()
            .take_while(|name| self.send_removal(name))
            .count();
        let gone: Vec<String> = names.drain(..sent).collect();
        drop(names);
        self.removed(&gone);
        self.note_progress();
    }

    /// Puts a new buffer in the store; one that cannot go in now is
    /// remembered and sent again (see [`FdStore::retry_stores`]), or the
    /// next instance would drop it although a client holds it.
    pub fn store_buffer(&self, id: u64, fd: BorrowedFd<'_>) {
        self.retry_removals();
        let mut ids = self.unstored_ids();
        // Behind the ones still out, whose sends would fail first.
        if !ids.is_empty() || !store(id, fd) {
            ids.push(id);
            drop(ids);
            self.note_failure(&buffer_name(id));
        }
    }

    fn unstored_ids(&self) -> std::sync::MutexGuard<'_, Vec<u64>> {
        self.unstored.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends the buffers that could not be put in the store before, in
    /// order, until one fails again (the rest would too), forgetting freed
    /// ones (`fd_of` gives a live buffer's fd); and the removals that
    /// failed. Returns how many buffers are still out (those in a
    /// sender's batch included).
    pub fn retry_stores<'a>(&self, fd_of: impl Fn(u64) -> Option<BorrowedFd<'a>>) -> usize {
        self.retry_removals();
        let mut ids = self.unstored_ids();
        if ids.is_empty() {
            return 0;
        }
        let mut kept = Vec::with_capacity(ids.len());
        let mut blocked = false;
        for &id in ids.iter() {
            match fd_of(id) {
                None => {}
                Some(_) if blocked => kept.push(id),
                Some(fd) if !store(id, fd) => {
                    blocked = true;
                    kept.push(id);
                }
                Some(_) => {}
            }
        }
        *ids = kept;
        drop(ids);
        self.note_progress();
        self.unstored_count()
    }

    /// Takes up to `limit` of the buffers still out of the store, oldest
    /// first, for a sender that may wait for the manager: while it has
    /// them, no other send of them is made, and removals of those freed
    /// meanwhile wait for it. It hands back what it did
    /// ([`FdStore::finish_batch`]).
    pub fn take_unstored(&self, limit: usize) -> Vec<u64> {
        let mut ids = self.unstored_ids();
        let n = limit.min(ids.len());
        let taken: Vec<u64> = ids.drain(..n).collect();
        self.in_flight().ids.extend_from_slice(&taken);
        taken
    }

    /// [`FdStore::take_unstored`], each buffer with a copy of its fd
    /// (`fd_of` gives a live buffer's), for the record's writer to send
    /// off the broker's thread. A freed buffer is given back (and
    /// forgotten at the next retry); one whose fd cannot be copied (out of
    /// fds) is given back, out of the store still, and the batch says why:
    /// a batch that took nothing for that reason is no reason to try again
    /// soon.
    pub fn take_batch<'a>(
        &self,
        limit: usize,
        fd_of: impl Fn(u64) -> Option<&'a Arc<HeldFd>>,
    ) -> Batch {
        let mut batch = Batch::default();
        let mut not_taken = Vec::new();
        for id in self.take_unstored(limit) {
            match fd_of(id).map(HeldDup::of) {
                Some(Ok(fd)) => batch.fds.push((id, fd)),
                Some(Err(err)) => {
                    not_taken.push(id);
                    batch.error.get_or_insert_with(|| {
                        std::io::Error::new(
                            err.kind(),
                            format!(
                                "cannot copy buffer {id}'s fd to put it in the fd store: {err}"
                            ),
                        )
                    });
                }
                None => not_taken.push(id),
            }
        }
        self.finish_batch(&[], &not_taken);
        batch
    }

    /// The end of a batch: `sent` are in the store, `unsent` out of it
    /// still (ahead of the rest). Removals held back for them go out now,
    /// after the stores they must follow.
    pub fn finish_batch(&self, sent: &[u64], unsent: &[u64]) {
        // Moved from one list to the other under both locks (in the order
        // `note_progress` takes them): a removal is never in neither, where
        // `unsent_removal` would take it for sent.
        let mut unremoved = self.unremoved_names();
        let deferred = {
            let mut flight = self.in_flight();
            flight
                .ids
                .retain(|id| !sent.contains(id) && !unsent.contains(id));
            let names: Vec<String> = sent
                .iter()
                .chain(unsent)
                .map(|id| buffer_name(*id))
                .collect();
            let (mine, others): (Vec<String>, Vec<String>) =
                std::mem::take(&mut flight.deferred_removals)
                    .into_iter()
                    .partition(|name| names.contains(name));
            flight.deferred_removals = others;
            mine
        };
        unremoved.extend(deferred);
        drop(unremoved);
        if !unsent.is_empty() {
            let mut ids = self.unstored_ids();
            let rest = std::mem::take(&mut *ids);
            ids.extend_from_slice(unsent);
            ids.extend(rest);
        }
        self.retry_removals();
        self.note_progress();
    }

    /// Buffers still out of the store, those in a sender's batch included.
    pub fn unstored_count(&self) -> usize {
        self.unstored_ids().len() + self.in_flight().ids.len()
    }

    pub fn remove(&self, name: &str) {
        {
            // A buffer in the writer's batch: its removal follows the
            // writer's store of it (see `in_flight`).
            let mut flight = self.in_flight();
            if flight.ids.iter().any(|id| buffer_name(*id) == name) {
                flight.deferred_removals.push(name.to_owned());
                return;
            }
        }
        self.retry_removals();
        let mut names = self.unremoved_names();
        // Behind the ones still out, whose sends would fail first.
        if names.is_empty() && self.send_removal(name) {
            drop(names);
            self.removed(&[name]);
            return;
        }
        // Not a record's: its name is used again by a later record, which
        // a late removal would delete (the record's writer takes care of
        // its own; see `RecordWriter::stale`). Buffers' and leftovers'
        // names are never given again.
        if !name.starts_with(RECORD_PREFIX) {
            names.push(name.to_owned());
            drop(names);
            self.note_failure(name);
        }
    }

    pub fn remove_buffer(&self, id: u64) {
        self.remove(&buffer_name(id));
    }

    /// Sends the removal of `name`; false when it could not be sent
    /// (logged by the caller, once for a run of failures). Notes whether
    /// the manager could be reached at all (see `await_removal`).
    fn send_removal(&self, name: &str) -> bool {
        use std::sync::atomic::Ordering;
        match remove(name) {
            Ok(()) => {
                self.unreachable.store(false, Ordering::Release);
                true
            }
            Err(err) => {
                // Only a manager whose socket is not there: a failure for
                // want of room or memory says nothing of its copy.
                let gone = matches!(
                    err.raw_os_error(),
                    Some(
                        libc::ECONNREFUSED
                            | libc::ENOENT
                            | libc::ENOTCONN
                            | libc::ECONNRESET
                            | libc::EPIPE
                            | libc::EACCES
                            | libc::EPERM
                    )
                );
                self.unreachable.store(gone, Ordering::Release);
                tracing::debug!(name, error = %err, "cannot remove an entry from the fd store");
                false
            }
        }
    }

    /// Where the removal of `name` is, if it is still to be sent.
    fn unsent_removal(&self, name: &str) -> Option<Unsent> {
        // Both at once (see `finish_batch`).
        let unremoved = self.unremoved_names();
        if self.in_flight().deferred_removals.iter().any(|n| n == name) {
            Some(Unsent::HeldBack)
        } else if unremoved.iter().any(|n| n == name) {
            Some(Unsent::Queued)
        } else {
            None
        }
    }

    /// Waits, until `deadline`, for the manager to have let go of its copy
    /// of `name`'s fd: the removal sent, and a barrier behind it read. The
    /// manager closes its copy when it reads the removal, which comes
    /// after the daemon let go of its own; a dma-buf's last release would
    /// then be PID 1's, and a client that watches it with an epoll whose
    /// lock it holds would stall the service manager (see `held_files`).
    /// A manager that is merely slow (its queue full: any process may
    /// fill it) is waited for, barrier after barrier: giving up early is
    /// what a client would arrange. Only a manager that cannot be reached
    /// (its socket gone: its copy then stays until it is back) or the
    /// deadline ends the wait. Off the broker's thread only: on a closing
    /// thread, where the wait holds up only the uid whose file it is.
    pub fn await_removal(&self, name: &str, deadline: std::time::Instant) {
        use std::time::{Duration, Instant};
        const PATIENCE: Duration = Duration::from_secs(60);
        let started = Instant::now();
        let mut said = false;
        // Sent once, then waited for in turns: another one each turn
        // would only crowd a slow manager's queue.
        let mut barrier: Option<notify::Barrier> = None;
        loop {
            let unsent = self.unsent_removal(name);
            // No manager to send the removal to (the last removal tried,
            // at the head of those waiting, this one among them, found it
            // gone or out of reach): its copy stays until it is back, so
            // the daemon's close is not the last release.
            if unsent == Some(Unsent::Queued)
                && self.unreachable.load(std::sync::atomic::Ordering::Acquire)
            {
                tracing::debug!(
                    name,
                    "the service manager cannot be reached; letting go of the daemon's copy"
                );
                return;
            }
            if unsent.is_none() {
                let one_try = (Instant::now() + Duration::from_secs(5)).min(deadline);
                let waited = match &barrier {
                    Some(sent) => sent.wait(one_try),
                    None => match notify::Barrier::send(one_try) {
                        Ok(Some(sent)) => {
                            let waited = sent.wait(one_try);
                            barrier = Some(sent);
                            waited
                        }
                        // No manager: nobody else holds a copy.
                        Ok(None) => return,
                        Err(err) => Err(err),
                    },
                };
                match waited {
                    Ok(()) => return,
                    Err(err)
                        if matches!(
                            err.kind(),
                            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
                        ) => {}
                    Err(err) => {
                        tracing::warn!(name, error = %err, "cannot tell whether the service manager let go of its copy; letting go of the daemon's");
                        return;
                    }
                }
            } else {
                std::thread::sleep(Duration::from_millis(10));
            }
            if Instant::now() >= deadline {
                tracing::error!(
                    name,
                    "the service manager has not let go of its copy; letting go of the daemon's"
                );
                return;
            }
            if !said && started.elapsed() >= PATIENCE {
                said = true;
                tracing::warn!(name, "waiting for the service manager to let go of its copy of a freed dma-buf before the daemon lets go of its own");
            }
        }
    }
}

/// Why the store could not be emptied at a stop for good (see
/// [`FdStore::take_out`]).
#[derive(Debug, thiserror::Error)]
pub enum TakeOutError {
    #[error("cannot remove {name} from the fd store ({sent} of {total} removals sent): {source}")]
    Remove {
        name: String,
        sent: usize,
        total: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot send a barrier behind the {total} removals from the fd store: {source}")]
    Barrier {
        total: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("the service manager has not read the {total} removals from the fd store: {source}")]
    Unread {
        total: usize,
        #[source]
        source: std::io::Error,
    },
}

impl FdStore {
    /// Every name the daemon may have fds under in the store: the `live`
    /// buffers', the removals still owed (not sent, or held back behind
    /// the record's writer), the names a restart closed fds of, and the
    /// `records`. Each once.
    pub fn names_in_store(
        &self,
        live: impl IntoIterator<Item = u64>,
        records: impl IntoIterator<Item = String>,
    ) -> Vec<String> {
        let mut names: Vec<String> = live.into_iter().map(buffer_name).collect();
        names.extend(self.unremoved_names().iter().cloned());
        names.extend(self.in_flight().deferred_removals.iter().cloned());
        names.extend(self.extra_fds().keys().cloned());
        names.extend(records);
        let mut seen = std::collections::HashSet::new();
        names.retain(|name| seen.insert(name.clone()));
        names
    }

    /// At a stop for good: removes every fd of `names` from the store and
    /// waits for the manager to have read the removals (a `BARRIER=1`
    /// behind them), each step waiting until `deadline` for room in its
    /// queue. The manager then holds no copy when it closes the store, and
    /// the daemon's own exit (or a client) makes each buffer's last
    /// release, not PID 1. Call [`notify::refuse_fd_stores`] first, so
    /// that nothing goes in behind the removals. Returns how many
    /// removals were sent. Blocks: off the broker's thread.
    pub fn take_out(
        &self,
        names: &[String],
        deadline: std::time::Instant,
    ) -> Result<usize, TakeOutError> {
        let total = names.len();
        for (sent, name) in names.iter().enumerate() {
            notify::send_waiting(
                &[NotifyState::FdStoreRemove, NotifyState::FdName(name)],
                &[],
                deadline,
            )
            .map_err(|source| TakeOutError::Remove {
                name: name.clone(),
                sent,
                total,
                source,
            })?;
        }
        self.removed(names);
        match notify::Barrier::send(deadline) {
            Ok(Some(barrier)) => barrier
                .wait(deadline)
                .map_err(|source| TakeOutError::Unread { total, source })?,
            Ok(None) => {}
            Err(source) => return Err(TakeOutError::Barrier { total, source }),
        }
        Ok(total)
    }
}

/// Puts buffer `id`'s fd in the store; false when the message could not
/// be sent (logged by the caller, once for a run of failures).
fn store(id: u64, fd: BorrowedFd<'_>) -> bool {
    let name = buffer_name(id);
    match notify::try_send(&[NotifyState::FdStore, NotifyState::FdName(&name)], &[fd]) {
        Ok(()) => true,
        Err(err) => {
            tracing::debug!(buffer = id, error = %err, "cannot put a buffer in the fd store");
            false
        }
    }
}

/// [`store`], waiting until `deadline` for room in the manager's queue:
/// off the broker's thread only. The error says why: `WouldBlock` (no
/// room yet) is worth trying again soon, anything else (the manager's
/// socket gone, out of fds) is not.
pub fn store_waiting(
    id: u64,
    fd: BorrowedFd<'_>,
    deadline: std::time::Instant,
) -> std::io::Result<()> {
    let name = buffer_name(id);
    notify::send_waiting(
        &[NotifyState::FdStore, NotifyState::FdName(&name)],
        &[fd],
        deadline,
    )
    .map_err(|err| {
        std::io::Error::new(
            err.kind(),
            format!("cannot put buffer {id} in the fd store: {err}"),
        )
    })
}

/// Removes every fd stored under `name` (`FDSTOREREMOVE=1`).
fn remove(name: &str) -> std::io::Result<()> {
    notify::try_send(
        &[NotifyState::FdStoreRemove, NotifyState::FdName(name)],
        &[],
    )
}

/// [`remove`] for the record's writer, waiting until `deadline` for room.
fn remove_waiting(name: &str, deadline: std::time::Instant) -> std::io::Result<()> {
    notify::send_waiting(
        &[NotifyState::FdStoreRemove, NotifyState::FdName(name)],
        &[],
        deadline,
    )
    .map_err(|err| {
        std::io::Error::new(
            err.kind(),
            format!("cannot remove the old record {name} from the fd store: {err}"),
        )
    })
}

impl RecordWriter {
    /// A writer with no record stored yet, which removes `stale` (records
    /// a restart found and could not read, each with its fds) before its
    /// first record.
    pub fn fresh(stale: Vec<(String, usize)>) -> RecordWriter {
        RecordWriter {
            stale,
            ..RecordWriter::default()
        }
    }

    /// After a restore: the record taken back (`fds` under `name`) is the
    /// one to replace, and new records must outrank its `generation`.
    /// `stale`: other records the restart found, to be removed before the
    /// next record is stored.
    pub fn continuing(
        name: String,
        generation: u64,
        fds: usize,
        stale: Vec<(String, usize)>,
    ) -> RecordWriter {
        RecordWriter {
            generation,
            current: Some(name),
            current_fds: fds,
            stale,
            latest: None,
        }
    }

    /// The names of the records the store may hold: the stored one's and
    /// those still to be removed, and both names records alternate
    /// between (a removal of a name the store does not have is ignored).
    pub fn record_names(&self) -> Vec<String> {
        let mut names = vec![format!("{RECORD_PREFIX}a"), format!("{RECORD_PREFIX}b")];
        names.extend(self.current.iter().cloned());
        names.extend(self.stale.iter().map(|(name, _)| name.clone()));
        names
    }

    /// Record names still to be removed: the store does not match the
    /// table until they are gone.
    pub fn stale_count(&self) -> usize {
        self.stale.len()
    }

    /// The most record fds the store holds from now until the writer's
    /// next record has replaced the current one: those there now, or the
    /// current name's and the new record once the stale ones are gone (it
    /// is stored before the current one is removed), and never fewer than
    /// [`RECORD_SLOTS`], which every later record needs. A stale record
    /// waiting for its removal thus takes the new record's slot, not one
    /// more: it is removed before the new record is stored.
    pub fn record_slots(&self) -> usize {
        let stale: usize = self.stale.iter().map(|(_, fds)| fds).sum();
        (self.current_fds + stale)
            .max(self.current_fds + 1)
            .max(RECORD_SLOTS)
    }

    /// The table changed since the latest record was copied: the next try
    /// needs a new one.
    pub fn table_changed(&mut self) {
        self.latest = None;
    }

    /// Whether the next try needs a record copied from the table: the
    /// table changed since the latest, or there is none yet. Otherwise it
    /// stores the one it has (or nothing, once that one is in).
    pub fn needs_record(&self) -> bool {
        self.latest.is_none()
    }

    /// A record taken back is of a generation up to `MAX_GENERATION`
    /// (`StateRecord::decode`), as many years of records from the end:
    /// saturating only so that nothing from the store can make it panic.
    pub fn next_generation(&mut self) -> u64 {
        self.generation = self.generation.saturating_add(1);
        self.generation
    }

    /// Removes the stale records, then stores the latest record (`fresh`,
    /// newly copied, replaces it) unless it is in already, then removes the
    /// previous one. On failure nothing is lost: what was not sent is sent
    /// by the next try, without encoding the record again.
    ///
    /// A record is sent only if it fits (`room`, `None` without a bounded
    /// store): sent to a full store, it would be closed by systemd without
    /// a word, and the previous one removed after it, leaving no record at
    /// all. So the previous record stays until frees make room
    /// ([`RecordError::NoRoom`]); at worst it names buffers freed since,
    /// which a restore skips, and lacks holds taken since.
    /// Waits for room in the manager's queue until `deadline`: runs off
    /// the broker's thread.
    pub fn store(
        &mut self,
        fresh: Option<StateRecord>,
        room: Option<Room>,
        deadline: std::time::Instant,
    ) -> Result<(), RecordError> {
        if let Some(record) = fresh {
            self.latest = Some(Latest::Encoded(record.encode()?));
        }
        while let Some((stale, _)) = self.stale.first() {
            remove_waiting(stale, deadline)?;
            self.stale.remove(0);
        }
        if matches!(self.latest, Some(Latest::Stored(_))) {
            return Ok(());
        }
        // Before a memfd is made for it.
        self.check_room(room)?;
        let name = next_record_name(self.current.as_deref());
        let fd = self.take_sealed(&name)?;
        if let Err(err) = notify::send_waiting(
            &[NotifyState::FdStore, NotifyState::FdName(&name)],
            &[fd.as_fd()],
            deadline,
        ) {
            self.latest = Some(Latest::Sealed(fd));
            return Err(std::io::Error::new(
                err.kind(),
                format!("cannot put the record {name} in the fd store: {err}"),
            )
            .into());
        }
        self.latest = Some(Latest::Stored(fd));
        self.replace_current(name, deadline);
        Ok(())
    }

    /// Offers the stored record again, the same memfd under the same
    /// name; `false` when there is none to offer (none stored yet, or the
    /// table changed since). A notification has no answer, and the manager
    /// drops an fd it cannot keep without telling (a full store, one it
    /// counts fuller than the daemon does: `FileDescriptorStoreMax=`
    /// changed under a running daemon, or `--fd-store-max` above the real
    /// maximum before systemd 254), so a record counted as stored may not
    /// be. Offering it again loses nothing: systemd keeps one entry per
    /// open file (`service_add_fd_store` drops an fd of a file it holds),
    /// so a record it holds is not stored twice and takes no slot, and one
    /// it dropped goes back in the slot the daemon counts for it, if the
    /// store has room now. But systemd checks for a full store first: to
    /// a store it counts full, even a record it holds is refused, with a
    /// warning in PID 1's log, which is why the offers back off (see
    /// `daemon::persist_loop`). Waits for room in the manager's queue
    /// until `deadline`: off the broker's thread only.
    pub fn reoffer(&self, deadline: std::time::Instant) -> Result<bool, RecordError> {
        let (Some(Latest::Stored(fd)), Some(name)) = (&self.latest, &self.current) else {
            return Ok(false);
        };
        notify::send_waiting(
            &[NotifyState::FdStore, NotifyState::FdName(name)],
            &[fd.as_fd()],
            deadline,
        )
        .map_err(|err| {
            std::io::Error::new(
                err.kind(),
                format!("cannot offer the record {name} to the fd store again: {err}"),
            )
        })?;
        Ok(true)
    }

    /// The latest record in its sealed memfd, taken to be sent (given
    /// back by the caller if the send fails); made now if it was only
    /// encoded.
    fn take_sealed(&mut self, name: &str) -> Result<OwnedFd, RecordError> {
        match self.latest.take() {
            Some(Latest::Sealed(fd)) => Ok(fd),
            Some(Latest::Encoded(bytes)) => match sealed_copy(name, &bytes) {
                Ok(fd) => Ok(fd),
                Err(err) => {
                    self.latest = Some(Latest::Encoded(bytes));
                    Err(err.into())
                }
            },
            // The caller copies one whenever `needs_record` says so and
            // a record `fits`; when none fits, `check_room` said so first.
            other => {
                self.latest = other;
                Err(std::io::Error::other("no record copied to store").into())
            }
        }
    }

    /// Whether the next record fits beside the buffers and the record
    /// fds the store holds now: asked before a record is copied from the
    /// table, which is not worth copying while none would be sent.
    pub fn fits(&self, room: Option<Room>) -> bool {
        self.check_room(room).is_ok()
    }

    /// Whether the next record fits beside the buffers and the record
    /// fds the store holds now (the stale ones are gone by then).
    fn check_room(&self, room: Option<Room>) -> Result<(), RecordError> {
        let Some(room) = room else {
            return Ok(());
        };
        if room.buffer_fds + self.current_fds < room.max {
            return Ok(());
        }
        Err(RecordError::NoRoom {
            buffer_fds: room.buffer_fds,
            record_fds: self.current_fds,
            max: room.max,
        })
    }

    /// `name` is the stored record now; the previous one goes, or is stale
    /// until it can.
    fn replace_current(&mut self, name: String, deadline: std::time::Instant) {
        let old_fds = std::mem::replace(&mut self.current_fds, 1);
        if let Some(old) = self.current.replace(name) {
            if remove_waiting(&old, deadline).is_err() {
                self.stale.push((old, old_fds));
            }
        }
    }
}

pub(crate) fn sealed_copy(name: &str, bytes: &[u8]) -> std::io::Result<OwnedFd> {
    // Sized exactly and sealed against growing or shrinking: the record
    // cannot be truncated under the next instance's reader.
    let fd = memfd::create_sealed(&format!("dmabroker-{name}"), bytes.len().max(1) as u64)
        .map_err(std::io::Error::other)?;
    let mut file = std::fs::File::from(fd);
    file.write_all(bytes)?;
    Ok(OwnedFd::from(file))
}

/// The most bytes of a stored record that are read. The largest record
/// the shipped limits allow: every one of 4,096 connections
/// (`--max-connections`) holding 4,096 buffers (`max_buffers`), 2^24 holds
/// of at most 60 bytes each (a 38-byte secret and its length, a uid of at
/// most 5, the owner flag, a client id of at most 10, and the accountable
/// uid of at most 5 after the record), and 16,382 buffers
/// (the store's slots) of at most about 360 (a name of 64 characters of
/// up to 4 bytes, a heap's, the numbers), about 966 MiB; up to twice that while the previous
/// instance's holds nobody re-attached yet are kept beside new ones. 2 GiB
/// is above both. What it is for: a `state-*` fd read to its end before
/// `READY=1` must have an end (a character device has none, a sparse
/// memfd may be terabytes), or the start runs out of memory or time, and
/// starts that fail again and again lose the store.
pub const MAX_RECORD_BYTES: u64 = 2 << 30;

/// Why a stored record was not taken: the start goes on as without it.
#[derive(Debug, thiserror::Error)]
pub enum ReadRecordError {
    #[error("it is not a memfd (this daemon stores its records in sealed memfds); not read")]
    NotMemfd,
    #[error("it is {size} bytes, more than any record ({MAX_RECORD_BYTES}); not read")]
    TooLarge { size: u64 },
    #[error("cannot size it: {0}")]
    Size(#[from] crate::kernel::KernelError),
    #[error("cannot read it: {0}")]
    Read(#[source] std::io::Error),
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

/// Reads a stored record back: only a memfd of at most
/// [`MAX_RECORD_BYTES`], and no more than that of it (one not sealed
/// against growing may grow while it is read).
pub fn read_record(fd: &OwnedFd) -> Result<StateRecord, ReadRecordError> {
    use std::io::{Read, Seek};
    if !memfd::is_memfd(fd.as_fd()) {
        return Err(ReadRecordError::NotMemfd);
    }
    let size = crate::kernel::dma_buf::size(fd.as_fd())?;
    if size > MAX_RECORD_BYTES {
        return Err(ReadRecordError::TooLarge { size });
    }
    let mut file = std::fs::File::from(fd.try_clone().map_err(ReadRecordError::Read)?);
    file.rewind().map_err(ReadRecordError::Read)?;
    let mut bytes = Vec::new();
    file.take(MAX_RECORD_BYTES.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(ReadRecordError::Read)?;
    let read = bytes.len() as u64;
    if read > MAX_RECORD_BYTES {
        return Err(ReadRecordError::TooLarge { size: read });
    }
    Ok(StateRecord::decode(&bytes)?)
}

/// An fd store with nothing in it and no manager behind it, for the
/// broker's tests of when a record is asked for.
#[cfg(test)]
pub(crate) fn store_for_tests() -> FdStore {
    FdStore {
        capacity: Capacity {
            max: 16,
            from_manager: false,
        },
        unremoved: Mutex::new(Vec::new()),
        unstored: Mutex::new(Vec::new()),
        in_flight: Mutex::new(InFlight::default()),
        failing: std::sync::atomic::AtomicBool::new(false),
        record_slots: std::sync::atomic::AtomicUsize::new(RECORD_SLOTS),
        record_owed: std::sync::atomic::AtomicBool::new(false),
        unreachable: std::sync::atomic::AtomicBool::new(false),
        extra_fds: Mutex::new(std::collections::HashMap::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store_with(unstored: &[u64]) -> FdStore {
        FdStore {
            capacity: Capacity {
                max: 16,
                from_manager: false,
            },
            unremoved: Mutex::new(Vec::new()),
            unstored: Mutex::new(unstored.to_vec()),
            in_flight: Mutex::new(InFlight::default()),
            failing: std::sync::atomic::AtomicBool::new(false),
            record_slots: std::sync::atomic::AtomicUsize::new(RECORD_SLOTS),
            record_owed: std::sync::atomic::AtomicBool::new(false),
            unreachable: std::sync::atomic::AtomicBool::new(false),
            extra_fds: Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// A removal that cannot be sent for want of a manager (its socket
    /// gone) leaves the manager's copy in place, so the daemon's close is
    /// not the last release: not waited for. It was, for the whole
    /// deadline (ten minutes a freed dma-buf), since such a removal stays
    /// unsent. Found by review.
    #[test]
    fn a_removal_with_no_manager_to_send_it_to_is_not_waited_for() {
        let store = store_with(&[]);
        store.unremoved_names().push(buffer_name(3));
        store
            .unreachable
            .store(true, std::sync::atomic::Ordering::Release);
        let started = std::time::Instant::now();
        store.await_removal(
            &buffer_name(3),
            started + std::time::Duration::from_secs(30),
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }

    /// Buffers a sender took are no one else's to send while it has them
    /// (but still count as out of the store), and those it could not send
    /// come back ahead of the rest, in order.
    #[test]
    fn taken_buffers_are_out_of_the_list_until_handed_back_in_order() {
        let store = store_with(&[1, 2, 3, 4]);
        assert_eq!(store.take_unstored(2), vec![1, 2]);
        assert_eq!(store.unstored_count(), 4, "taken ones are still out");
        assert_eq!(
            store.retry_stores(|_| None),
            2,
            "only 3 and 4 were there to try (and were forgotten as freed); 1 and 2 are in flight"
        );
        store.finish_batch(&[1], &[2]);
        assert_eq!(store.take_unstored(10), vec![2]);
    }

    /// A buffer freed while it is in the writer's batch: its removal waits
    /// for the batch (sent first, it could reach the manager before the
    /// writer's late store, which would put the freed buffer back), and it
    /// counts as taking a slot meanwhile.
    #[test]
    fn a_removal_of_a_buffer_in_flight_waits_for_its_batch_and_keeps_its_slot() {
        let store = store_with(&[7]);
        assert_eq!(store.take_unstored(1), vec![7]);
        store.remove_buffer(7);
        assert_eq!(
            store.unremoved(),
            1,
            "the freed buffer still takes its slot"
        );
        assert_eq!(store.in_flight().deferred_removals, vec![buffer_name(7)]);
        // No manager here: the removal is sent (a no-op) once the batch
        // is done, and nothing is owed after it.
        store.finish_batch(&[7], &[]);
        assert_eq!(store.unremoved(), 0);
        assert_eq!(store.unstored_count(), 0);
    }

    fn stale(names: &[(&str, usize)]) -> Vec<(String, usize)> {
        names
            .iter()
            .map(|(n, fds)| ((*n).to_owned(), *fds))
            .collect()
    }

    /// systemd counts every record fd, and the writer removes stale
    /// records before it stores the next, which it stores before it
    /// removes the current one: the most at once is what the store holds
    /// now or the current name's fds and the new record, and never fewer
    /// than the two every later record needs. An older record of the other
    /// name waiting for its removal was counted as a third, and the last
    /// buffer that fitted was refused.
    #[test]
    fn records_take_the_most_fds_the_writer_holds_at_once() {
        let cases = [
            ("nothing stored yet", RecordWriter::default(), 2),
            (
                "an unreadable record to remove first",
                RecordWriter::fresh(stale(&[("state-a", 1)])),
                2,
            ),
            (
                "one record",
                RecordWriter::continuing("state-a".into(), 7, 1, Vec::new()),
                2,
            ),
            (
                "an older record of the other name, its removal pending",
                RecordWriter::continuing("state-a".into(), 7, 1, stale(&[("state-b", 1)])),
                2,
            ),
            (
                "an older record of the kept name, gone with the next record",
                RecordWriter::continuing("state-a".into(), 7, 2, Vec::new()),
                3,
            ),
            (
                "two older records of the other name",
                RecordWriter::continuing("state-a".into(), 7, 1, stale(&[("state-b", 2)])),
                3,
            ),
        ];
        for (what, writer, slots) in cases {
            assert_eq!(writer.record_slots(), slots, "{what}");
        }
    }

    /// Allocs are refused once the live buffers would take more than the
    /// slots the records leave (`State::check_store_slot`): with as many
    /// buffers as that admits, the writer's next record always fits, so
    /// the no-slot rule only ever holds a record back when the store was
    /// over before (`FileDescriptorStoreMax=` lowered across a restart).
    #[test]
    fn the_buffers_allocs_admit_leave_room_for_the_next_record() {
        const MAX: usize = 8;
        let writers = [
            RecordWriter::default(),
            RecordWriter::fresh(stale(&[("state-a", 1)])),
            RecordWriter::continuing("state-a".into(), 7, 1, Vec::new()),
            RecordWriter::continuing("state-a".into(), 7, 1, stale(&[("state-b", 1)])),
            RecordWriter::continuing("state-a".into(), 7, 2, Vec::new()),
            RecordWriter::continuing("state-a".into(), 7, 1, stale(&[("state-b", 2)])),
        ];
        for writer in writers {
            let admitted = MAX - writer.record_slots();
            let room = |buffer_fds| Room {
                buffer_fds,
                max: MAX,
            };
            assert!(
                writer.check_room(Some(room(admitted))).is_ok(),
                "{writer:?}"
            );
            assert!(
                writer
                    .check_room(Some(room(MAX - writer.current_fds)))
                    .is_err(),
                "{writer:?}"
            );
        }
    }

    /// A record that does not fit is not sent (systemd would close it
    /// silently, and the one before it would then be removed): the
    /// record in the store stays, and the new one, kept encoded, goes in
    /// once there is room.
    #[test]
    fn a_record_that_does_not_fit_waits_and_the_stored_one_stays() {
        let deadline = std::time::Instant::now();
        let mut writer = RecordWriter::continuing("state-a".into(), 7, 1, Vec::new());
        let record = empty_record(&mut writer);
        let full = Room {
            buffer_fds: 3,
            max: 4,
        };
        let refused = writer.store(Some(record), Some(full), deadline);
        assert!(
            matches!(
                refused,
                Err(RecordError::NoRoom {
                    buffer_fds: 3,
                    record_fds: 1,
                    max: 4
                })
            ),
            "{refused:?}"
        );
        assert_eq!(writer.current.as_deref(), Some("state-a"), "still in");
        assert!(!writer.needs_record(), "the new record waits, encoded");
        let freed = Room {
            buffer_fds: 2,
            max: 4,
        };
        writer.store(None, Some(freed), deadline).expect("fits now");
        assert_eq!(writer.current.as_deref(), Some("state-b"));
    }

    /// Fds a restart closed but the manager still holds take slots until
    /// their name's removal is sent: then every fd of it is out.
    #[test]
    fn fds_a_restart_closed_take_slots_until_their_name_is_removed() {
        let store = store_with(&[]);
        store.set_extra_fds(std::collections::HashMap::from([
            ("buf-1".to_owned(), 1),
            ("stray".to_owned(), 2),
        ]));
        assert_eq!(store.leftover_fds(), 3);
        assert_eq!(store.unremoved(), 3, "allocs count them");
        assert_eq!(store.room(4).buffer_fds, 7, "the record's writer too");
        // No manager here: the removal is sent at once.
        store.remove("stray");
        assert_eq!(store.leftover_fds(), 1, "buf-1's goes with the buffer");
        store.remove_buffer(1);
        assert_eq!(store.leftover_fds(), 0);
    }

    /// The store counts record slots beyond the two as taken, and only
    /// those.
    #[test]
    fn record_slots_beyond_the_two_take_buffer_slots() {
        let store = store_with(&[]);
        assert_eq!(store.unremoved(), 0);
        store.set_record_slots(3);
        assert_eq!(store.unremoved(), 1);
        store.set_record_slots(RECORD_SLOTS);
        assert_eq!(store.unremoved(), 0);
    }

    /// Without a manager every send succeeds: a record copied once is
    /// stored once, and later tries with the table unchanged send nothing
    /// and need no copy; a change asks for a new one.
    /// The record of an empty table, in `writer`'s next generation.
    fn empty_record(writer: &mut RecordWriter) -> StateRecord {
        StateRecord {
            version: crate::service::record::RECORD_VERSION,
            generation: writer.next_generation(),
            next_buffer: 1,
            buffers: Vec::new(),
        }
    }

    #[test]
    fn a_stored_record_is_not_sent_again_until_the_table_changes() {
        let deadline = std::time::Instant::now();
        let mut writer = RecordWriter::default();
        assert!(writer.needs_record());
        let record = empty_record(&mut writer);
        writer.store(Some(record), None, deadline).expect("stored");
        assert_eq!(writer.current.as_deref(), Some("state-a"));
        writer
            .store(None, None, deadline)
            .expect("nothing to store");
        assert_eq!(
            writer.current.as_deref(),
            Some("state-a"),
            "the same record stored again under the other name"
        );
        assert!(!writer.needs_record());
        writer.table_changed();
        assert!(writer.needs_record());
    }

    /// Only a stored record is offered again, and none once the table
    /// changed (the next record replaces it). Without a manager every send
    /// succeeds.
    #[test]
    fn only_the_stored_record_is_offered_again() {
        let deadline = std::time::Instant::now();
        let mut writer = RecordWriter::default();
        assert!(!writer.reoffer(deadline).expect("nothing to offer"));
        let record = empty_record(&mut writer);
        writer.store(Some(record), None, deadline).expect("stored");
        assert!(writer.reoffer(deadline).expect("offered"));
        writer.table_changed();
        assert!(!writer.reoffer(deadline).expect("nothing to offer"));
    }

    /// At a stop for good every name the store may hold fds under goes:
    /// live buffers', removals still owed or held back, names a restart
    /// closed fds of, and every record name; each once.
    #[test]
    fn a_stop_for_good_removes_every_name_the_store_may_hold() {
        let store = store_with(&[5]);
        store.unremoved_names().push(buffer_name(3));
        assert_eq!(store.take_unstored(1), vec![5]);
        store.remove_buffer(5);
        store.set_extra_fds(std::collections::HashMap::from([
            ("buf-1".to_owned(), 1),
            ("stray".to_owned(), 1),
        ]));
        let writer = RecordWriter::continuing("state-b".into(), 7, 1, stale(&[("state-x", 1)]));
        let mut names = store.names_in_store([1, 2], writer.record_names());
        names.sort();
        assert_eq!(
            names,
            ["buf-1", "buf-2", "buf-3", "buf-5", "state-a", "state-b", "state-x", "stray"]
        );
    }

    fn record_bytes(generation: u64) -> Vec<u8> {
        StateRecord {
            version: crate::service::record::RECORD_VERSION,
            generation,
            next_buffer: 1,
            buffers: Vec::new(),
        }
        .encode()
        .expect("encode")
    }

    /// A `state-*` fd that is not a memfd (a character device, which reads
    /// without end) is not read: read to its end before READY, it took all
    /// memory or the start's time, and a start that fails again and again
    /// loses the store. Found by review.
    #[test]
    fn a_record_that_is_no_memfd_is_not_read() {
        let zero = OwnedFd::from(std::fs::File::open("/dev/zero").expect("/dev/zero"));
        let refused = read_record(&zero);
        assert!(
            matches!(refused, Err(ReadRecordError::NotMemfd)),
            "{refused:?}"
        );
    }

    /// A memfd larger than any record is not read either, even with a
    /// record at its start. Found by review.
    #[test]
    fn a_record_larger_than_any_is_not_read() {
        let fd = memfd::create_sealed("state-a", MAX_RECORD_BYTES + 1).expect("sparse memfd");
        let mut file = std::fs::File::from(fd);
        file.write_all(&record_bytes(1)).expect("write");
        let fd = OwnedFd::from(file);
        let refused = read_record(&fd);
        assert!(
            matches!(
                refused,
                Err(ReadRecordError::TooLarge { size }) if size == MAX_RECORD_BYTES + 1
            ),
            "{refused:?}"
        );
        let fits = sealed_copy("state-a", &record_bytes(1)).expect("memfd");
        assert_eq!(read_record(&fits).expect("a record").generation, 1);
    }

    /// A record's generation at the top of the range is no generation
    /// this daemon wrote: the next record's overflowed (a panic in a
    /// debug build). Found by review.
    #[test]
    fn a_record_of_a_generation_no_writer_reaches_is_not_taken() {
        use crate::service::record::MAX_GENERATION;
        let fd = sealed_copy("state-a", &record_bytes(MAX_GENERATION + 1)).expect("memfd");
        let refused = read_record(&fd);
        assert!(
            matches!(
                refused,
                Err(ReadRecordError::Decode(DecodeError::Generation { .. }))
            ),
            "{refused:?}"
        );
        let fd = sealed_copy("state-a", &record_bytes(MAX_GENERATION)).expect("memfd");
        let taken = read_record(&fd).expect("the highest generation is taken");
        let mut writer =
            RecordWriter::continuing("state-a".into(), taken.generation, 1, Vec::new());
        assert_eq!(writer.next_generation(), MAX_GENERATION + 1);
        let mut writer = RecordWriter::continuing("state-a".into(), u64::MAX, 1, Vec::new());
        assert_eq!(writer.next_generation(), u64::MAX, "no overflow");
    }

    #[test]
    fn the_next_record_takes_the_name_the_stored_one_does_not_have() {
        assert_eq!(next_record_name(None), "state-a");
        assert_eq!(next_record_name(Some("state-a")), "state-b");
        assert_eq!(next_record_name(Some("state-b")), "state-a");
    }
}
