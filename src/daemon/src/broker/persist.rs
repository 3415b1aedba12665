//! Keeping buffers across a broker restart: the State's side of the fd
//! store (what to store, how to rebuild from it) and re-attaching clients.
//!
//! A restarted broker takes back every stored buffer whose fd is still the
//! recorded kernel object, with its holders as *orphaned holds*: each
//! remembers only its secret. A client that reconnects presents the secret
//! (`Reattach`) and becomes the holder again. Holds nobody claims within
//! the grace period are dropped like a disconnect. Access state is never
//! stored: every taken-back buffer's next grant carries `writer_lost`.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use dmabroker_ipc::{BufferId, ClientId, ErrorCode, QuotaDetail, ReplyBody, WireError};

use super::access::Answer;
use super::state::{
    Before, BufferEntry, BufferOrigin, Holder, State, MAX_BUFFER_ID, MAX_CLIENT_ID, STORE_LET_GO,
};
use super::words::WordState;
use crate::heaps::Backend;
use crate::held_files::{HeldFd, Release};
use crate::kernel::{dma_buf, memfd};
use crate::service::fdstore::buffer_name;
use crate::service::inherited::{buffer_id_of, RECORD_PREFIX};
use crate::service::record::{
    BufferRecord, HolderRecord, OriginRecord, StateRecord, RECORD_VERSION,
};

/// The client id of a hold nobody has re-attached yet (real ids start at 1).
pub const ORPHAN: ClientId = 0;

/// What a connection has yet to re-attach (see [`State::awaiting`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct Awaiting {
    pub holds: u64,
    pub held_bytes: u64,
    pub charged_bytes: u64,
}

#[derive(Debug, Default)]
pub struct RestoreSummary {
    pub restored: usize,
    /// Recorded buffers whose fd was missing or no longer the same object,
    /// or that had no holder.
    pub lost: usize,
    /// Stored fds no record mentions.
    pub unknown_fds: usize,
    /// The stored fds not taken back, each with its name: let go of by the
    /// caller only once their removal from the fd store is sent (see
    /// [`State::let_go_of_unkept`]).
    pub not_kept: Vec<(String, OwnedFd)>,
}

fn origin_record(origin: &BufferOrigin) -> OriginRecord {
    match origin {
        BufferOrigin::Allocated(Backend::DmaHeap) => OriginRecord::DmaHeap,
        BufferOrigin::Allocated(Backend::Udmabuf) => OriginRecord::Udmabuf,
        BufferOrigin::Allocated(Backend::Memfd) => OriginRecord::Memfd,
        BufferOrigin::Adopted => OriginRecord::Adopted,
    }
}

fn origin_of(record: OriginRecord) -> BufferOrigin {
    match record {
        OriginRecord::DmaHeap => BufferOrigin::Allocated(Backend::DmaHeap),
        OriginRecord::Udmabuf => BufferOrigin::Allocated(Backend::Udmabuf),
        OriginRecord::Memfd => BufferOrigin::Allocated(Backend::Memfd),
        OriginRecord::Adopted => BufferOrigin::Adopted,
    }
}

/// Whether `fd` is still the object the record describes (same inode,
/// same kind, the recorded size) and whether it carries a word page: a
/// memfd allocated by this version is one page longer; one stored by a
/// version before buffer words is not, and is kept, without a word.
pub(crate) fn matches_record(fd: &OwnedFd, record: &BufferRecord) -> Option<bool> {
    let kind_ok = match record.origin {
        OriginRecord::Memfd => memfd::is_memfd(fd.as_fd()),
        _ => dma_buf::is_dma_buf(fd.as_fd()),
    };
    if !kind_ok || dma_buf::inode(fd.as_fd()).ok() != Some(record.inode) {
        return None;
    }
    let size = dma_buf::size(fd.as_fd()).ok()?;
    let with_word = record
        .size
        .checked_add(dmabroker_ipc::bufferword::WORD_PAGE);
    match record.origin {
        OriginRecord::Memfd if Some(size) == with_word => Some(true),
        _ if size == record.size => Some(false),
        _ => None,
    }
}

impl State {
    /// A new buffer needs a slot in the fd store. systemd closes an fd sent
    /// to a full store and tells nobody: that buffer would be lost at the
    /// next restart, and so would every other one, as the next record
    /// would be refused too while the previous one was removed. So a
    /// buffer beyond the store's slots (its maximum less the records' two)
    /// is refused, `QuotaExceeded` as for any other limit on what is held:
    /// it is the daemon's limit on buffers, and freeing any buffer lifts it.
    pub(super) fn check_store_slot(&self) -> Result<(), WireError> {
        let Some(store) = &self.fd_store else {
            return Ok(());
        };
        let slots = store.capacity.buffer_slots() as u64;
        // A freed buffer whose removal could not be sent still takes a
        // slot, until the removal is sent again (now, if it can be).
        store.retry_removals();
        // An allocation being carried out will take a slot.
        let live = (self.buffers.len() + store.unremoved() + self.allocations_in_flight) as u64;
        if live < slots {
            return Ok(());
        }
        let mut err = WireError::new(
            ErrorCode::QuotaExceeded,
            format!(
                "the broker's fd store is full: FileDescriptorStoreMax={} keeps {slots} \
                 buffers (2 slots are for the buffer table's record) and {live} are live; \
                 raise FileDescriptorStoreMax= in dmabroker.service",
                store.capacity.max
            ),
        );
        err.quota = Some(QuotaDetail {
            limit: slots,
            in_use: live,
            requested: 1,
        });
        Err(err)
    }

    /// The ids of every buffer, for a record copied a chunk at a time
    /// (see [`State::buffer_records`]).
    pub fn buffer_ids(&self) -> Vec<BufferId> {
        let mut ids: Vec<BufferId> = self.buffers.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// The records of those of `ids` that still exist, as the next
    /// instance needs them.
    pub fn buffer_records(&self, ids: &[BufferId]) -> Vec<BufferRecord> {
        let uid_of = |client: ClientId| {
            self.clients
                .get(&client)
                .map_or(u32::MAX, |c| c.peer.identity.uid)
        };
        ids.iter()
            .filter_map(|id| self.buffers.get(id))
            .map(|b| BufferRecord {
                id: b.id,
                size: b.size,
                heap: b.heap.clone(),
                origin: origin_record(&b.origin),
                name: b.name.clone(),
                inode: b.inode,
                holders: b
                    .holders
                    .iter()
                    .map(|h| HolderRecord {
                        secret: h.secret.clone(),
                        // A hold nobody re-attached yet keeps the uid it
                        // was taken back with: another restart before its
                        // client comes back must not lose it.
                        uid: h.restored_uid.unwrap_or_else(|| uid_of(h.client)),
                        // While the owner has not re-attached, every
                        // unclaimed hold is ORPHAN: none is marked, and the
                        // order (the owner first) says it.
                        owner: h.client == b.owner && b.owner != ORPHAN,
                        // A hold nobody re-attached yet keeps the client
                        // it was taken back with, as its uid.
                        client: if h.client == ORPHAN {
                            h.restored_client.unwrap_or(0)
                        } else {
                            self.clients
                                .get(&h.client)
                                .map_or(h.client, |c| c.recorded_as)
                        },
                        // Whom it counts for, also until it is re-attached
                        // after the next restart (see `Holder::counted_for`).
                        accountable_uid: if h.client == ORPHAN {
                            h.counted_for
                        } else {
                            self.clients.get(&h.client).map(|c| c.peer.accountable_uid)
                        },
                    })
                    .collect(),
            })
            .collect()
    }

    /// The record's header: taken after the last chunk, so that every
    /// recorded id is below `next_buffer`.
    pub fn record_of(&self, generation: u64, buffers: Vec<BufferRecord>) -> StateRecord {
        StateRecord {
            version: RECORD_VERSION,
            generation,
            next_buffer: self.peek_next_buffer_id(),
            buffers,
        }
    }

    /// Rebuilds the table from a record and the stored fds (consumed: fds
    /// it does not keep come back in the summary's `not_kept`, to be let
    /// go of after their removal from the store).
    pub fn restore(
        &mut self,
        record: &StateRecord,
        mut fds: HashMap<String, OwnedFd>,
    ) -> RestoreSummary {
        let mut summary = RestoreSummary::default();
        // A buffer allocated after the record was written is stored but
        // not recorded, and is dropped below: its id must not be handed
        // out again (its client may still name it), so ids go on above
        // every stored one as well as the record's.
        // Ids above the ones this daemon hands out are none it gave (see
        // `MAX_BUFFER_ID`): neither a buffer of that id nor the count.
        let above_stored = fds
            .keys()
            .filter_map(|name| buffer_id_of(name))
            .max()
            .map_or(0, |id| id.saturating_add(1));
        let above_recorded = record
            .buffers
            .iter()
            .map(|b| b.id)
            .filter(|&id| id <= MAX_BUFFER_ID)
            .max()
            .map_or(0, |id| id.saturating_add(1));
        let recorded_next = if record.next_buffer <= MAX_BUFFER_ID.saturating_add(1) {
            record.next_buffer
        } else {
            tracing::warn!(
                next_buffer = record.next_buffer,
                "the record's next buffer id is above any this daemon hands out; ignoring it"
            );
            0
        };
        for buffer in &record.buffers {
            if buffer.id > MAX_BUFFER_ID {
                tracing::warn!(
                    buffer = buffer.id,
                    "recorded buffer id is above any this daemon hands out; dropping it"
                );
                summary.lost += 1;
                continue;
            }
            let name = buffer_name(buffer.id);
            let Some(fd) = fds.remove(&name) else {
                summary.lost += 1;
                continue;
            };
            let Some(has_word) = matches_record(&fd, buffer) else {
                tracing::warn!(
                    buffer = buffer.id,
                    "stored fd is not the recorded buffer; dropping it"
                );
                summary.lost += 1;
                summary.not_kept.push((name, fd));
                continue;
            };
            // Nothing would ever release a buffer nobody holds: the grace
            // period's end drops orphaned holds, and their last frees the
            // buffer. Only a corrupt or hand-written record has one.
            if buffer.holders.is_empty() {
                tracing::warn!(
                    buffer = buffer.id,
                    "recorded buffer has no holder; dropping it"
                );
                summary.lost += 1;
                summary.not_kept.push((name, fd));
                continue;
            }
            // The owner first: the charge is its, and moves down the list
            // (see `reattach`).
            let mut recorded: Vec<_> = buffer.holders.iter().collect();
            recorded.sort_by_key(|h| !h.owner);
            let holders = recorded
                .into_iter()
                .map(|h| Holder {
                    client: ORPHAN,
                    secret: h.secret.clone(),
                    since: SystemTime::now(),
                    word_index: None,
                    // u32::MAX: an older daemon's record of a hold nobody
                    // had re-attached, whose uid it did not keep.
                    restored_uid: (h.uid != u32::MAX).then_some(h.uid),
                    restored_client: known_client(buffer.id, h.client),
                    // A record of a daemon that did not keep it: counted
                    // for the uid, whom a process outside a user
                    // namespace counts as.
                    counted_for: h.accountable_uid.or((h.uid != u32::MAX).then_some(h.uid)),
                })
                .collect::<Vec<Holder>>();
            // The previous instance's clients may have left bits, and may
            // still be beginning there.
            let word = has_word.then(|| WordState::inherited(fd.as_fd(), buffer.size));
            // Let go of on its owner's thread, as when it was allocated
            // (u32::MAX, a uid an older daemon did not record, is a
            // thread of its own), shared with its other holders' users.
            let origin = origin_of(buffer.origin);
            let owner_uid = owner_uid_of(&buffer.holders);
            let fd = HeldFd::new(fd, origin.release(buffer.size, owner_uid));
            // Every recorded holder has the file, and can stall its release
            // (one whose uid an older daemon did not keep as u32::MAX).
            for holder in &buffer.holders {
                fd.sent_to(holder.uid);
            }
            for holder in &holders {
                if let Some(before) = holder.restored_client {
                    self.awaiting_index
                        .entry(before)
                        .or_default()
                        .insert(buffer.id);
                }
                if let Some(uid) = holder.counted_for {
                    self.uid_hold_taken(uid, buffer.id);
                }
            }
            self.buffers.insert(
                buffer.id,
                BufferEntry {
                    id: buffer.id,
                    fd: Arc::new(fd),
                    size: buffer.size,
                    // Shown on D-Bus and sent to clients as it is: what a
                    // record says is shown as names are (a NUL ends a
                    // D-Bus string). A heap's own name has no such
                    // character, and is kept as it was.
                    heap: super::requests::shown_name(&buffer.heap),
                    origin,
                    // Written by an older daemon, which kept names as sent.
                    name: super::requests::shown_name(&buffer.name),
                    inode: buffer.inode,
                    owner: ORPHAN,
                    holders,
                    created: SystemTime::now(),
                    word,
                },
            );
            self.arbiter.add_buffer(buffer.id);
            self.arbiter.mark_writer_lost(buffer.id);
            summary.restored += 1;
        }
        summary.unknown_fds = fds
            .keys()
            .filter(|name| !name.starts_with(RECORD_PREFIX))
            .count();
        summary.not_kept.extend(fds);
        self.bump_next_buffer_id(recorded_next.max(above_recorded).max(above_stored));
        // A new connection's id is none the record names, or it would be
        // taken for that connection when its holds are recorded again.
        let above_clients = record
            .buffers
            .iter()
            .flat_map(|b| &b.holders)
            .map(|h| h.client)
            .filter(|&id| id <= MAX_CLIENT_ID)
            .max()
            .map_or(0, |id| id.saturating_add(1));
        self.bump_next_client_id(above_clients);
        summary
    }

    /// Lets go of a stored fd the restore did not keep (`name` in the fd
    /// store): call it only once the name's removal is sent. A client may
    /// still hold such a buffer (one allocated after the last record, or
    /// one dropped as not what the record says) and watch it with an
    /// epoll it keeps locked, and the manager closes its copy when it
    /// reads the removal: closed here, before that, PID 1 would make the
    /// last release (see `held_files`). So a dma-buf goes as a freed one
    /// does: on a closing thread that first waits for the manager to have
    /// read the removal (`FdStore::await_removal`), one of its own
    /// (`u32::MAX`: whose it is is not known). A memfd cannot be watched,
    /// and its pages go back where a freed one's do.
    pub fn let_go_of_unkept(&self, name: &str, fd: OwnedFd) {
        let Some(store) = &self.fd_store else {
            drop(fd);
            return;
        };
        if !dma_buf::is_dma_buf(fd.as_fd()) {
            let size = dma_buf::size(fd.as_fd()).unwrap_or(0);
            crate::closer::close_buffer(fd, size);
            return;
        }
        let held = HeldFd::new(
            fd,
            Release::OnThreadOf {
                uid: u32::MAX,
                buffer: true,
            },
        );
        let store = Arc::clone(store);
        let name = name.to_owned();
        held.first_wait_for(Box::new(move || {
            store.await_removal(&name, Instant::now() + STORE_LET_GO)
        }));
        drop(held);
    }

    /// Holds still unclaimed after the grace period are released like a
    /// disconnect (freeing buffers nobody reclaimed).
    pub fn drop_orphans(&mut self) -> usize {
        let orphaned: Vec<BufferId> = self
            .buffers
            .values()
            .filter(|b| b.holders.iter().any(|h| h.client == ORPHAN))
            .map(|b| b.id)
            .collect();
        let count = orphaned.len();
        for buffer in orphaned {
            let counted: Vec<u32> = self.buffers.get(&buffer).map_or_else(Vec::new, |entry| {
                entry
                    .holders
                    .iter()
                    .filter(|h| h.client == ORPHAN)
                    .filter_map(|h| h.counted_for)
                    .collect()
            });
            for uid in counted {
                self.uid_hold_gone(uid, buffer);
            }
            if let Some(entry) = self.buffers.get_mut(&buffer) {
                entry.holders.retain(|h| h.client != ORPHAN);
                if entry.owner == ORPHAN {
                    if let Some(next) = entry.holders.first().map(|h| h.client) {
                        entry.owner = next;
                        let size = entry.size;
                        if let Some(c) = self.clients.get_mut(&next) {
                            c.charged_bytes += size;
                        }
                    }
                }
                if entry.holders.is_empty() {
                    self.release_hold(ORPHAN, buffer);
                }
            }
        }
        // Nothing waits to be re-attached any more: no connection counts
        // waiting holds against its limits (each allocation would look
        // for them), and its holds are recorded under its own id.
        self.awaiting_index.clear();
        let mut renamed = false;
        for c in self.clients.values_mut() {
            c.reattaching = None;
            renamed |= c.recorded_as != c.id;
            c.recorded_as = c.id;
        }
        // A connection's holds now recorded under its own id: the record
        // must say so, and one being copied must start again. Before, with
        // no hold dropped no record was asked for, and one copied across
        // this point named the connection's holds by both ids (the
        // earlier chunks by the id it took over, the later by its own),
        // with no record after it to put that right: after a restart, the
        // client's second group of holds was refused and lost.
        if renamed {
            self.recorded_as_changed();
        }
        // Buffers kept by other holders changed too: without a new record
        // the dropped holds would come back with the next restart.
        if count > 0 {
            self.persist_changed();
        }
        count
    }

    /// The holds of connection `before` (from before the restart) nobody
    /// re-attached yet, but `except`'s: they count against the limits of
    /// the connection that took `before` over (see `reattach`), which
    /// will have them back, and so record them, unless the grace period
    /// ends first.
    pub(super) fn awaiting(&self, before: ClientId, except: Option<BufferId>) -> Awaiting {
        let mut awaiting = Awaiting::default();
        let Some(buffers) = self.awaiting_index.get(&before) else {
            return awaiting;
        };
        for entry in buffers.iter().filter_map(|id| self.buffers.get(id)) {
            if Some(entry.id) == except {
                continue;
            }
            for (position, h) in entry.holders.iter().enumerate() {
                if h.client == ORPHAN && h.restored_client == Some(before) {
                    awaiting.holds += 1;
                    awaiting.held_bytes += entry.size;
                    if entry.owner == ORPHAN && position == 0 {
                        awaiting.charged_bytes += entry.size;
                    }
                }
            }
        }
        awaiting
    }

    /// A client proves it held `buffer` before the restart.
    pub(super) fn reattach(
        &mut self,
        client: ClientId,
        buffer: BufferId,
        secret: &str,
    ) -> Result<Answer, WireError> {
        let unknown = || {
            WireError::new(
                ErrorCode::UnknownBuffer,
                format!("no buffer {buffer} is waiting to be re-attached with that secret"),
            )
        };
        if secret.is_empty() {
            return Err(unknown());
        }
        // The secret proves a hold only for the uid that held it: leaked
        // (a core dump, a log), it would otherwise hand another user the
        // hold, and the owner's charge, past its rules' import_from and
        // the holder's may_export.
        let uid = self.clients.get(&client).map(|c| c.peer.identity.uid);
        let entry = self.buffers.get(&buffer).ok_or_else(unknown)?;
        let position = entry
            .holders
            .iter()
            .position(|h| {
                h.client == ORPHAN
                    && h.restored_uid.is_none_or(|held_by| Some(held_by) == uid)
                    && same_secret(&h.secret, secret)
            })
            .ok_or_else(unknown)?;
        // One hold per buffer and connection, as for an import.
        if entry.held_by(client) {
            return Err(WireError::new(
                ErrorCode::InvalidArgument,
                format!("you already hold buffer {buffer}"),
            ));
        }
        let size = entry.size;
        let charge = entry.owner == ORPHAN && position == 0;
        let before = entry.holders[position]
            .restored_client
            .map_or(Before::Unknown, Before::Client);
        let Some(c) = self.clients.get(&client) else {
            return Err(WireError::new(ErrorCode::Internal, "unknown client"));
        };
        // The holds of one connection from before the restart only: the
        // limits are not checked on a connection that only re-attaches
        // (below), so one that gathered the holds of several was charged
        // their sum, several times its limits, and the next restart's
        // record had them all as one connection's, to be gathered with
        // more at the restart after.
        //
        // A hold of a connection the record does not name (a version 1
        // record's, or one whose id was none of ours) goes with the holds
        // of any one connection: an honest client's holds were split so
        // after an upgrade (those it had re-attached named in the next
        // record, those still waiting not), and the second group was
        // refused and lost. Such holds come only from a record that did
        // not name their connections, and the next record names every one
        // re-attached: there are never more of them, so no connection
        // gathers more at every restart.
        let bound = match (c.reattaching, before) {
            (None, before) => before,
            (Some(taken), before) if taken == before => taken,
            (Some(taken @ Before::Client(_)), Before::Unknown) => taken,
            (Some(Before::Unknown), before @ Before::Client(_)) => before,
            (Some(taken), _) => {
                return Err(WireError::new(
                    ErrorCode::PermissionDenied,
                    format!(
                        "buffer {buffer} was held by {} before the broker restarted, and this \
                         connection re-attaches the holds of {}: re-attach it on a connection \
                         of its own",
                        before_name(before),
                        before_name(taken)
                    ),
                ));
            }
        };
        // The id the connection's holds will be recorded under: the one
        // before the restart, unless another connection took that over
        // already (one closing, its end not yet read: it hands the id on
        // when it goes, see `State::hand_on_recorded_id`). Two connections
        // recording their holds under one id would have them gathered
        // onto one connection after the next restart.
        let recorded_as = match (c.reattaching, bound) {
            (Some(Before::Client(_)), _) => c.recorded_as,
            (_, Before::Client(id))
                if !self
                    .clients
                    .values()
                    .any(|other| other.id != client && other.recorded_as == id) =>
            {
                id
            }
            _ => c.recorded_as,
        };
        // The limits are not checked on a connection that has only
        // re-attached: each hold was within them when it was taken, a
        // departure may have moved a charge onto the owner since (which
        // is allowed), and a reload may have lowered them; refused here,
        // the hold would be lost with the buffer it keeps. A connection
        // that took a buffer of its own first is checked as for that
        // buffer (an allocation for the owner's hold, an import for
        // another), together with the holds it has yet to re-attach: it
        // would otherwise add a restart's holds to a full quota, again at
        // every restart. The client crate re-attaches before anything.
        if c.took_new || !c.allocating.is_empty() {
            let awaiting = match bound {
                Before::Client(id) => self.awaiting(id, Some(buffer)),
                Before::Unknown => Awaiting::default(),
            };
            self.check_quota_with(client, size, charge, Some(buffer), awaiting)?;
        }
        let Some(entry) = self.buffers.get_mut(&buffer) else {
            return Err(unknown());
        };
        entry.holders[position].client = client;
        entry.holders[position].restored_client = None;
        // Counted for the connection's uid from now on, as its other holds
        // (below).
        let counted_for = entry.holders[position].counted_for.take();
        if let Before::Client(id) = before {
            let still = entry
                .holders
                .iter()
                .any(|h| h.client == ORPHAN && h.restored_client == Some(id));
            if !still {
                if let Some(buffers) = self.awaiting_index.get_mut(&id) {
                    buffers.remove(&buffer);
                    if buffers.is_empty() {
                        self.awaiting_index.remove(&id);
                    }
                }
            }
        }
        // Only the owner takes its charge back (it comes first, see
        // `restore`). Whoever re-attaches first is not charged for it; if
        // the owner never comes back, the grace period's end moves the
        // charge down the list, as a departure would.
        if charge {
            entry.owner = client;
        }
        if let Some(was) = counted_for {
            self.uid_hold_gone(was, buffer);
        }
        let mut renamed = false;
        let mut now_counted_for = None;
        if let Some(c) = self.clients.get_mut(&client) {
            if c.buffers.insert(buffer) {
                c.held_bytes += size;
                now_counted_for = Some(c.peer.accountable_uid);
            }
            if charge {
                c.charged_bytes += size;
            }
            c.reattaching = Some(bound);
            renamed = c.recorded_as != recorded_as;
            c.recorded_as = recorded_as;
        }
        if let Some(uid) = now_counted_for {
            self.uid_hold_taken(uid, buffer);
        }
        if renamed {
            self.recorded_as_changed();
        }
        self.persist_changed();
        Ok(Answer::Reply(
            ReplyBody::Buffer(self.buffer_info(buffer, secret.to_owned())),
            Vec::new(),
        ))
    }
}

/// The connection a record says held a hold of `buffer`: none for 0 (a
/// record that did not say) and none for an id above any this daemon
/// hands out (see [`MAX_CLIENT_ID`]: a corrupt or hand-written record),
/// whose hold is one of a connection the record does not name.
fn known_client(buffer: BufferId, client: ClientId) -> Option<ClientId> {
    if client > MAX_CLIENT_ID {
        tracing::warn!(
            buffer,
            client,
            "recorded holder's connection id is above any this daemon hands out; \
             taking it for one the record does not name"
        );
        return None;
    }
    (client != 0).then_some(client)
}

/// How a connection from before the restart is named in an answer.
fn before_name(before: Before) -> String {
    match before {
        Before::Client(id) => format!("connection {id}"),
        Before::Unknown => "a connection the record does not name".to_owned(),
    }
}

/// The uid whose thread lets go of a restored buffer (and whose closes it
/// counts among): its owner's, as when it was allocated; with no holder
/// marked owner (a record written before the owner re-attached), the
/// first known holder's, then the first's. u32::MAX, a uid an older
/// daemon did not record, is a thread of its own.
fn owner_uid_of(holders: &[HolderRecord]) -> u32 {
    holders
        .iter()
        .find(|h| h.owner)
        .or_else(|| holders.iter().find(|h| h.uid != u32::MAX))
        .or_else(|| holders.first())
        .map_or(u32::MAX, |h| h.uid)
}

/// Compares a presented secret with a holder's in time that does not
/// depend on where they first differ, so that answers to guesses teach
/// nothing about the secret.
fn same_secret(kept: &str, presented: &str) -> bool {
    kept.len() == presented.len()
        && kept
            .bytes()
            .zip(presented.bytes())
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A restored buffer is let go of on its owner's thread; with none
    /// marked, on the first known holder's rather than the unknown one's.
    /// Found by review.
    #[test]
    fn a_restored_buffer_goes_to_its_owners_thread_or_a_known_holders() {
        let holder = |uid: u32, owner: bool| HolderRecord {
            secret: String::new(),
            uid,
            owner,
            client: 0,
            accountable_uid: None,
        };
        assert_eq!(
            owner_uid_of(&[holder(1001, false), holder(1000, true)]),
            1000
        );
        assert_eq!(
            owner_uid_of(&[holder(u32::MAX, false), holder(1000, false)]),
            1000
        );
        assert_eq!(owner_uid_of(&[holder(u32::MAX, false)]), u32::MAX);
        assert_eq!(owner_uid_of(&[]), u32::MAX);
    }

    #[test]
    fn secrets_match_only_when_equal() {
        let kept = "dmab1-00112233445566778899aabbccddeeff";
        assert!(same_secret(kept, kept));
        assert!(!same_secret(kept, "dmab1-00112233445566778899aabbccddeefe"));
        assert!(!same_secret(kept, "xmab1-00112233445566778899aabbccddeeff"));
        assert!(!same_secret(kept, "dmab1-00112233445566778899aabbccddeef"));
        assert!(!same_secret(kept, ""));
    }

    fn record_of(fd: &OwnedFd, size: u64) -> BufferRecord {
        BufferRecord {
            id: 1,
            size,
            heap: "memfd".into(),
            origin: OriginRecord::Memfd,
            name: "frame".into(),
            inode: dma_buf::inode(fd.as_fd()).expect("inode"),
            holders: Vec::new(),
        }
    }

    /// A state with no clients and a memfd heap only.
    fn state() -> State {
        let heaps = crate::heaps::HeapRegistry::discover(&crate::heaps::HeapConfig {
            dma_heap_dir: std::path::PathBuf::from("/nonexistent"),
            udmabuf_path: std::path::PathBuf::from("/nonexistent"),
            order: None,
            enable_memfd: true,
        });
        State::new(
            heaps,
            dmabroker_policy::Policy::builtin(),
            super::super::DaemonLimits::default(),
        )
    }

    /// A stored memfd buffer of this version (with its word page), as
    /// recorded under `id` with one holder, and its fd.
    fn stored_buffer(id: BufferId) -> (BufferRecord, OwnedFd) {
        let page = dmabroker_ipc::bufferword::WORD_PAGE;
        let fd = memfd::create_sealed("frame", 4096 + page).expect("memfd");
        let mut record = record_of(&fd, 4096);
        record.id = id;
        record.holders = vec![HolderRecord {
            secret: "dmab1-00112233445566778899aabbccddeeff".into(),
            uid: 1000,
            owner: true,
            client: 0,
            accountable_uid: None,
        }];
        (record, fd)
    }

    fn table_of(buffers: Vec<BufferRecord>, next_buffer: u64) -> StateRecord {
        StateRecord {
            version: RECORD_VERSION,
            generation: 1,
            next_buffer,
            buffers,
        }
    }

    /// A recorded buffer with no holder (only a corrupt or hand-written
    /// record has one) is not taken back: nothing would ever release it,
    /// as the grace period's end drops only orphaned holds. It was kept
    /// for good. Found by review.
    #[test]
    fn a_recorded_buffer_with_no_holder_is_not_taken_back() {
        let (mut record, fd) = stored_buffer(1);
        record.holders.clear();
        let mut state = state();
        let summary = state.restore(
            &table_of(vec![record], 2),
            HashMap::from([(buffer_name(1), fd)]),
        );
        assert_eq!((summary.restored, summary.lost), (0, 1));
        assert!(state.buffers.is_empty());
        state.drop_orphans();
        assert!(state.buffers.is_empty(), "nor kept after the grace");
    }

    /// A record's `next_buffer` or a stored `buf-<id>` at the top of the
    /// ids is no id this daemon gave: the next id handed out was
    /// u64::MAX, and the one after it overflowed (a panic in a debug
    /// build, a wrap to 0 and then ids of taken-back buffers in a release
    /// build). Found by review.
    #[test]
    fn ids_at_the_top_from_a_record_or_the_store_are_not_taken_for_ours() {
        let (record, fd) = stored_buffer(5);
        let stray = memfd::create_sealed("stray", 4096).expect("memfd");
        let mut state = state();
        let summary = state.restore(
            &table_of(vec![record], u64::MAX),
            HashMap::from([(buffer_name(5), fd), (buffer_name(u64::MAX), stray)]),
        );
        assert_eq!(summary.restored, 1);
        let first = state.allocate_buffer_id().expect("an id");
        let second = state.allocate_buffer_id().expect("an id");
        assert_eq!(
            (first, second),
            (6, 7),
            "ids go on above the buffers taken back"
        );
    }

    /// A recorded hold of connection `u64::MAX` (or just below, above any
    /// id this daemon hands out) is one of a connection the record does
    /// not name: before, the next client id was set to `u64::MAX`, and the
    /// second connection after the restart overflowed the count (a panic
    /// on the broker's thread in a debug build, in a release build id 0,
    /// `ORPHAN`, which every hold awaiting re-attach is held by). Found
    /// by review.
    #[test]
    fn recorded_client_ids_at_the_top_are_unknown_and_no_new_id_wraps() {
        let uid = nix::unistd::getuid().as_raw();
        let mut bench = super::super::cache_end_tests::Bench::new();
        let (mut top, top_fd) = stored_buffer(1);
        top.holders[0].client = u64::MAX;
        top.holders[0].uid = uid;
        let (mut below, below_fd) = stored_buffer(2);
        below.holders[0].client = u64::MAX - 1;
        below.holders[0].uid = uid;
        let secret = top.holders[0].secret.clone();
        let summary = bench.state.restore(
            &table_of(vec![top, below], 3),
            HashMap::from([(buffer_name(1), top_fd), (buffer_name(2), below_fd)]),
        );
        assert_eq!(summary.restored, 2);
        for buffer in [1, 2] {
            let holder = &bench.state.buffers.get(&buffer).expect("restored").holders[0];
            assert_eq!(holder.restored_client, None, "buffer {buffer}");
        }
        let first = bench.client();
        let second = bench.client();
        assert_eq!((first, second), (1, 2), "ids start where they always do");
        for buffer in [1, 2] {
            assert!(
                bench.state.reattach(first, buffer, &secret).is_ok(),
                "buffer {buffer} is re-attached as an unknown connection's"
            );
        }
        let c = bench.state.clients.get(&first).expect("connected");
        assert_eq!(c.reattaching, Some(Before::Unknown));
        assert_ne!(second, ORPHAN);
    }

    /// After an upgrade from a version 1 record, a client's holds it had
    /// re-attached are named in the next record (its connection's) and
    /// those still waiting are not: in the instance after, the first
    /// group's re-attach bound the connection, and the second's was
    /// refused PermissionDenied, in whichever order it came, and the
    /// buffer lost. Both orders re-attach now, and the next record names
    /// every hold the connection's. Found by review.
    #[test]
    fn holds_of_an_unnamed_connection_go_with_a_named_ones() {
        let uid = nix::unistd::getuid().as_raw();
        let mut bench = super::super::cache_end_tests::Bench::new();
        // Buffer 1 recorded for connection 6, 2 for none; 3 for none, 4
        // for connection 7.
        let mut records = Vec::new();
        let mut fds = HashMap::new();
        for (id, client) in [(1, 6), (2, 0), (3, 0), (4, 7)] {
            let (mut record, fd) = stored_buffer(id);
            record.holders[0].client = client;
            record.holders[0].uid = uid;
            records.push(record);
            fds.insert(buffer_name(id), fd);
        }
        let secret = records[0].holders[0].secret.clone();
        let summary = bench.state.restore(&table_of(records, 5), fds);
        assert_eq!(summary.restored, 4);
        let named_first = bench.client();
        let unnamed_first = bench.client();
        for (client, buffer) in [
            (named_first, 1),
            (named_first, 2),
            (unnamed_first, 3),
            (unnamed_first, 4),
        ] {
            let answer = bench.state.reattach(client, buffer, &secret);
            assert!(
                answer.is_ok(),
                "buffer {buffer} on connection {client}: {:?}",
                answer.err()
            );
        }
        let recorded: Vec<(BufferId, ClientId)> = bench
            .state
            .buffer_records(&[1, 2, 3, 4])
            .iter()
            .map(|b| (b.id, b.holders[0].client))
            .collect();
        assert_eq!(recorded, [(1, 6), (2, 6), (3, 7), (4, 7)]);
    }

    /// The grace period's end with no hold left to drop still changes
    /// the record: a connection that took over the id of one from before
    /// the restart has its holds recorded under its own id from then on.
    /// No record was asked for then, so one copied a chunk at a time
    /// across that point named the client's holds by both ids, with
    /// nothing to put it right, and the next instance refused the second
    /// group's re-attach. Found by review.
    #[test]
    fn the_grace_periods_end_asks_for_a_record_when_only_ids_change() {
        let uid = nix::unistd::getuid().as_raw();
        let mut bench = super::super::cache_end_tests::Bench::new();
        let (mut record, fd) = stored_buffer(1);
        record.holders[0].client = 5;
        record.holders[0].uid = uid;
        let secret = record.holders[0].secret.clone();
        bench.state.restore(
            &table_of(vec![record], 2),
            HashMap::from([(buffer_name(1), fd)]),
        );
        bench.state.fd_store = Some(Arc::new(crate::service::fdstore::store_for_tests()));
        let client = bench.client();
        assert!(bench.state.reattach(client, 1, &secret).is_ok());
        let recorded_as = |state: &State| state.buffer_records(&[1])[0].holders[0].client;
        assert_eq!(recorded_as(&bench.state), 5);
        let wanted = Arc::clone(&bench.state.persist_wanted);
        let asked = |bench: &super::super::cache_end_tests::Bench| {
            bench._runtime.block_on(async {
                tokio::time::timeout(std::time::Duration::ZERO, wanted.notified())
                    .await
                    .is_ok()
            })
        };
        assert!(asked(&bench), "the re-attach asked for a record");
        let epoch = bench.state.recorded_as_epoch();
        assert_eq!(bench.state.drop_orphans(), 0);
        assert_eq!(recorded_as(&bench.state), client);
        assert!(asked(&bench), "the grace period's end asked for a record");
        assert_ne!(
            bench.state.recorded_as_epoch(),
            epoch,
            "a record being copied starts again"
        );
    }

    /// A hold of another connection from before the restart is refused
    /// with a message that reads as one sentence: it had runs of some 20
    /// spaces in it (a string continued without its backslash). Found by
    /// review.
    #[test]
    fn a_hold_of_another_connection_is_refused_with_a_plain_message() {
        let uid = nix::unistd::getuid().as_raw();
        let mut bench = super::super::cache_end_tests::Bench::new();
        let mut records = Vec::new();
        let mut fds = HashMap::new();
        for (id, client) in [(1, 6), (2, 7)] {
            let (mut record, fd) = stored_buffer(id);
            record.holders[0].client = client;
            record.holders[0].uid = uid;
            records.push(record);
            fds.insert(buffer_name(id), fd);
        }
        let secret = records[0].holders[0].secret.clone();
        bench.state.restore(&table_of(records, 3), fds);
        let client = bench.client();
        assert!(bench.state.reattach(client, 1, &secret).is_ok());
        let Err(refused) = bench.state.reattach(client, 2, &secret) else {
            panic!("a hold of connection 7 re-attached on connection 6's");
        };
        assert_eq!(refused.code, ErrorCode::PermissionDenied);
        assert_eq!(
            refused.message,
            "buffer 2 was held by connection 7 before the broker restarted, and this \
             connection re-attaches the holds of connection 6: re-attach it on a connection \
             of its own"
        );
    }

    /// What `awaiting` counted by looking at every buffer, before it
    /// looked at the restore's index only.
    fn awaiting_by_scan(state: &State, before: ClientId, except: Option<BufferId>) -> Awaiting {
        let mut awaiting = Awaiting::default();
        for entry in state.buffers.values().filter(|e| Some(e.id) != except) {
            for (position, h) in entry.holders.iter().enumerate() {
                if h.client == ORPHAN && h.restored_client == Some(before) {
                    awaiting.holds += 1;
                    awaiting.held_bytes += entry.size;
                    if entry.owner == ORPHAN && position == 0 {
                        awaiting.charged_bytes += entry.size;
                    }
                }
            }
        }
        awaiting
    }

    /// `awaiting` looks only at the buffers the restore gave a hold of
    /// the connection (it ran over every buffer, on every allocation and
    /// re-attach during the grace period), and counts what a look at
    /// every buffer counts, as holds are re-attached; once none waits,
    /// the connection has no entry left. A performance change, found by
    /// review: this test passes with the scan too.
    #[test]
    fn awaiting_counts_what_a_scan_of_every_buffer_counts() {
        let uid = nix::unistd::getuid().as_raw();
        let mut bench = super::super::cache_end_tests::Bench::new();
        let second_secret = "dmab1-ffeeddccbbaa99887766554433221100";
        let mut records = Vec::new();
        let mut fds = HashMap::new();
        // Buffers 1 and 2 owned by connection 5, 3 by 6; 6 also holds 1,
        // and 5 holds 3.
        for (id, owner, other) in [(1, 5, Some(6)), (2, 5, None), (3, 6, Some(5))] {
            let (mut record, fd) = stored_buffer(id);
            record.holders[0].client = owner;
            record.holders[0].uid = uid;
            if let Some(other) = other {
                record.holders.push(HolderRecord {
                    secret: second_secret.into(),
                    uid,
                    owner: false,
                    client: other,
                    accountable_uid: None,
                });
            }
            records.push(record);
            fds.insert(buffer_name(id), fd);
        }
        let secret = records[0].holders[0].secret.clone();
        bench.state.restore(&table_of(records, 4), fds);
        let same = |state: &State| {
            for before in [5, 6, 7] {
                for except in [None, Some(1), Some(2), Some(3)] {
                    let (index, scan) = (
                        state.awaiting(before, except),
                        awaiting_by_scan(state, before, except),
                    );
                    assert_eq!(
                        (index.holds, index.held_bytes, index.charged_bytes),
                        (scan.holds, scan.held_bytes, scan.charged_bytes),
                        "connection {before}, but buffer {except:?}"
                    );
                }
            }
        };
        same(&bench.state);
        assert_eq!(bench.state.awaiting(5, None).holds, 3);
        let five = bench.client();
        let six = bench.client();
        for (client, buffer, secret) in [
            (five, 1, secret.as_str()),
            (six, 1, second_secret),
            (five, 3, second_secret),
            (six, 3, secret.as_str()),
        ] {
            assert!(bench.state.reattach(client, buffer, secret).is_ok());
            same(&bench.state);
        }
        assert_eq!(bench.state.awaiting(5, None).holds, 1, "buffer 2 waits");
        assert!(!bench.state.awaiting_index.contains_key(&6));
        assert!(bench.state.reattach(five, 2, &secret).is_ok());
        same(&bench.state);
        assert!(bench.state.awaiting_index.is_empty());
    }

    /// After a restart, the holds from before it that nobody has
    /// re-attached yet count for the user who held them
    /// (`max_uid_buffers`), each buffer once however many of the user's
    /// holds keep it, and a re-attach does not count one again: they
    /// counted for nobody until a connection began re-attaching them, so
    /// a user allocating during the grace period could end up with up to
    /// twice the limit once its clients re-attached. Failed before (the
    /// new connection's allocation was allowed, nothing in use).
    #[test]
    fn holds_awaiting_reattach_count_for_their_user() {
        let uid = nix::unistd::getuid().as_raw();
        let mut bench = super::super::cache_end_tests::Bench::new();
        bench.use_policy("[default]\nmax_uid_buffers = 3\n");
        // Buffers 1 and 2 held by connections 5 (a camera, the owner) and
        // 6 (a codec) of the user, 3 by 5 only.
        let second_secret = "dmab1-ffeeddccbbaa99887766554433221100";
        let mut records = Vec::new();
        let mut fds = HashMap::new();
        for id in 1..=3 {
            let (mut record, fd) = stored_buffer(id);
            record.holders[0].client = 5;
            record.holders[0].uid = uid;
            if id < 3 {
                record.holders.push(HolderRecord {
                    secret: second_secret.into(),
                    uid,
                    owner: false,
                    client: 6,
                    accountable_uid: None,
                });
            }
            records.push(record);
            fds.insert(buffer_name(id), fd);
        }
        let secret = records[0].holders[0].secret.clone();
        assert_eq!(bench.state.restore(&table_of(records, 4), fds).restored, 3);
        bench
            .state
            .check_uid_held()
            .expect("the count matches the tables");
        let other = bench.client();
        let counted = |state: &State| state.uid_held(uid).map_or(0, |held| held.count());
        assert_eq!(counted(&bench.state), 3, "three buffers, not five holds");
        let err = bench
            .state
            .check_quota(other, 4096, true, None)
            .expect_err("the user's three buffers await re-attach");
        assert!(
            err.message.starts_with(
                "rule 'default': max_uid_buffers limit 3, in use 3, requested 1 (uid "
            ),
            "{}",
            err.message
        );
        let camera = bench.client();
        assert!(bench.state.reattach(camera, 1, &secret).is_ok());
        assert_eq!(counted(&bench.state), 3, "re-attached, counted once");
        bench
            .state
            .check_uid_held()
            .expect("the count matches the tables");
        assert_eq!(bench.state.drop_orphans(), 3);
        assert_eq!(counted(&bench.state), 1, "the camera's re-attached one");
        bench
            .state
            .check_uid_held()
            .expect("the count matches the tables");
        assert!(bench.state.check_quota(other, 4096, true, None).is_ok());
    }

    /// A hold of a process of a user namespace (or of a container)
    /// counts, until it is re-attached, for whom it counted before the
    /// restart, as the record keeps it: counted for the uid it had there,
    /// which no connection counts as, it counted for nobody, and its user
    /// could allocate the value again during the grace period. A record
    /// of a daemon that did not keep it counts a hold for its uid. The
    /// next record keeps whom each hold counts for, re-attached or not.
    /// Failed before (buffer 1 counted for uid 100000: one in use, and
    /// the user's allocation allowed).
    #[test]
    fn a_restored_hold_counts_for_the_user_it_counted_for() {
        let uid = nix::unistd::getuid().as_raw();
        let mut bench = super::super::cache_end_tests::Bench::new();
        bench.use_policy("[default]\nmax_uid_buffers = 2\n");
        // Buffer 1 held by a process of a namespace the user made, 2 by
        // the user, recorded by a daemon that did not keep whom it
        // counted for.
        let (mut namespaced, namespaced_fd) = stored_buffer(1);
        namespaced.holders[0].client = 5;
        namespaced.holders[0].uid = 100_000;
        namespaced.holders[0].accountable_uid = Some(uid);
        let (mut own, own_fd) = stored_buffer(2);
        own.holders[0].client = 6;
        own.holders[0].uid = uid;
        let secret = own.holders[0].secret.clone();
        bench.state.restore(
            &table_of(vec![namespaced, own], 3),
            HashMap::from([(buffer_name(1), namespaced_fd), (buffer_name(2), own_fd)]),
        );
        bench
            .state
            .check_uid_held()
            .expect("the count matches the tables");
        let client = bench.client();
        let err = bench
            .state
            .check_quota(client, 4096, true, None)
            .expect_err("both count for the user");
        assert!(
            err.message.starts_with(
                "rule 'default': max_uid_buffers limit 2, in use 2, requested 1 (uid "
            ),
            "{}",
            err.message
        );
        assert!(bench.state.reattach(client, 2, &secret).is_ok());
        let accountable = bench.state.clients[&client].peer.accountable_uid;
        let counted_for: Vec<Option<u32>> = bench
            .state
            .buffer_records(&[1, 2])
            .iter()
            .map(|b| b.holders[0].accountable_uid)
            .collect();
        assert_eq!(counted_for, [Some(uid), Some(accountable)]);
        bench
            .state
            .check_uid_held()
            .expect("the count matches the tables");
    }

    /// Every id up to the highest handed out, the next allocation is
    /// refused, not given an id that wrapped (a panic in a debug build).
    /// Found by review.
    #[test]
    fn with_no_id_left_an_allocation_is_refused_not_wrapped() {
        let mut state = state();
        state.bump_next_buffer_id(u64::MAX);
        assert!(state.allocate_buffer_id().is_err());
        let mut state = super::super::State::new(
            crate::heaps::HeapRegistry::discover(&crate::heaps::HeapConfig {
                dma_heap_dir: std::path::PathBuf::from("/nonexistent"),
                udmabuf_path: std::path::PathBuf::from("/nonexistent"),
                order: None,
                enable_memfd: false,
            }),
            dmabroker_policy::Policy::builtin(),
            super::super::DaemonLimits::default(),
        );
        state.bump_next_buffer_id(MAX_BUFFER_ID);
        assert_eq!(
            state.allocate_buffer_id().expect("the last id"),
            MAX_BUFFER_ID
        );
        assert!(state.allocate_buffer_id().is_err());
        assert!(state.allocate_buffer_id().is_err(), "and stays refused");
    }

    /// The fds the restore does not keep (one that is not the recorded
    /// buffer, one no record names) are handed back, not closed: closed
    /// before their removal from the fd store is sent, PID 1's close of
    /// its copy would be a dma-buf's last release, which the free path
    /// takes care never to let it be. Found by review.
    #[test]
    fn fds_the_restore_does_not_keep_are_handed_back_open() {
        use std::os::fd::AsRawFd;
        let (mut record, fd) = stored_buffer(1);
        record.inode = record.inode.wrapping_add(1);
        let (_, unknown) = stored_buffer(2);
        let watched: Vec<(i32, u64)> = [&fd, &unknown]
            .iter()
            .map(|fd| {
                let inode = dma_buf::inode(fd.as_fd()).expect("inode");
                (fd.as_raw_fd(), inode)
            })
            .collect();
        let mut state = state();
        let summary = state.restore(
            &table_of(vec![record], 3),
            HashMap::from([(buffer_name(1), fd), (buffer_name(2), unknown)]),
        );
        assert_eq!(
            (summary.restored, summary.lost, summary.unknown_fds),
            (0, 1, 1)
        );
        let mut names: Vec<&str> = summary.not_kept.iter().map(|(n, _)| n.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["buf-1", "buf-2"]);
        for (raw, inode) in watched {
            let still = nix::sys::stat::fstat(raw).map(|st| st.st_ino);
            assert_eq!(still, Ok(inode), "fd {raw} is still open");
        }
    }

    /// A recorded heap is shown on D-Bus and sent to clients as is, so it
    /// gets what names get: a NUL in a D-Bus string once made the bus
    /// drop the daemon's connection. Found by review.
    #[test]
    fn a_recorded_heap_is_restored_without_control_characters() {
        let (mut record, fd) = stored_buffer(1);
        record.heap = "mem\0fd\u{1b}[2J\u{202e}".into();
        let mut state = state();
        state.restore(
            &table_of(vec![record], 2),
            HashMap::from([(buffer_name(1), fd)]),
        );
        let heap = &state.buffers.get(&1).expect("restored").heap;
        assert!(
            !heap.chars().any(crate::text::is_hidden_control),
            "{heap:?}"
        );
    }

    /// A memfd of this version carries the word page; one stored by a
    /// daemon from before buffer words does not, and must survive an
    /// upgrade all the same (without a word); any other size is not the
    /// recorded buffer.
    #[test]
    fn stored_memfds_with_and_without_a_word_page_are_recognised() {
        let page = dmabroker_ipc::bufferword::WORD_PAGE;
        let with_word = memfd::create_sealed("frame", 4096 + page).expect("memfd");
        assert_eq!(
            matches_record(&with_word, &record_of(&with_word, 4096)),
            Some(true)
        );
        let before = memfd::create_sealed("frame", 4096).expect("memfd");
        assert_eq!(
            matches_record(&before, &record_of(&before, 4096)),
            Some(false)
        );
        assert_eq!(matches_record(&before, &record_of(&before, 8192)), None);
        assert_eq!(
            matches_record(&with_word, &record_of(&with_word, 12288)),
            None
        );
    }
}
