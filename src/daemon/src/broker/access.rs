//! Ownership transitions: begin and end of accesses, and everything that
//! turns the arbiter's decisions into replies, cache syncs and kernel fence
//! bookkeeping.
//!
//! Two kinds of "sync" meet here and stay apart: fence sync (who may touch
//! the buffer now: the arbiter, plus the kernel's implicit fences) decides
//! *when* a grant is sent; cache sync (`DMA_BUF_IOCTL_SYNC`) is done *at*
//! a CPU grant and at its end, and only for dma-bufs of autofence clients.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dmabroker_fence::{self as fence, AccessId, BeginOutcome, FenceState, Mode};
use dmabroker_ipc::{
    Access, BufferId, ClientId, ErrorCode, Event, Grant, OutstandingFence, ReplyBody, WireError,
};

use super::state::{AccessEntry, PendingGrant, State, WaiterEntry};
use super::waits::{CacheEnd, CacheSyncError};
use super::{Action, TimeoutTarget};
use crate::client_fds::ClientFd;
use crate::held_files::{HeldDup, HeldFd, Release};
use crate::kernel::dma_buf::{self, SyncDirection, SyncPhase};

/// Fence id and holder used in a no-autofence grant for the dma-buf's own
/// implicit kernel fences (set by drivers, not by any broker client).
pub const KERNEL_FENCE_ID: AccessId = 0;
pub const KERNEL_HOLDER: ClientId = 0;

pub(super) fn to_fence_access(access: Access) -> fence::Access {
    match access {
        Access::CpuRead => fence::Access::CpuRead,
        Access::CpuWrite => fence::Access::CpuWrite,
        Access::CpuReadWrite => fence::Access::CpuReadWrite,
        Access::DeviceRead => fence::Access::DeviceRead,
        Access::DeviceWrite => fence::Access::DeviceWrite,
    }
}

pub(super) fn to_wire_access(access: fence::Access) -> Access {
    match access {
        fence::Access::CpuRead => Access::CpuRead,
        fence::Access::CpuWrite => Access::CpuWrite,
        fence::Access::CpuReadWrite => Access::CpuReadWrite,
        fence::Access::DeviceRead => Access::DeviceRead,
        fence::Access::DeviceWrite => Access::DeviceWrite,
    }
}

fn fence_error(err: fence::FenceError) -> WireError {
    match err {
        fence::FenceError::UnknownBuffer(_) => {
            WireError::new(ErrorCode::UnknownBuffer, err.to_string())
        }
        // Not the caller's: answered as if it did not exist (see `end`).
        fence::FenceError::NotHolder { access, .. } => {
            WireError::new(ErrorCode::UnknownAccess, format!("no access {access}"))
        }
        fence::FenceError::NotDeviceAccess(_) | fence::FenceError::AlreadyFenced(_) => {
            WireError::new(ErrorCode::InvalidArgument, err.to_string())
        }
        _ => WireError::new(ErrorCode::UnknownAccess, err.to_string()),
    }
}

/// What a cache sync did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CacheSync {
    /// `DMA_BUF_IOCTL_SYNC` succeeded.
    Done,
    /// Nothing to sync: a memfd buffer, or no CPU access of an autofence
    /// client.
    NotNeeded,
    Failed,
}

/// A dma-buf's cache sync ENDs still running, and the grants held back
/// until they are done (see [`State::park_behind_cache_end`]).
#[derive(Debug, Default)]
pub(super) struct CacheEnds {
    pub(super) running: u32,
    /// In the order the arbiter granted them.
    pub(super) parked: Vec<Parked>,
}

/// A grant held back behind a cache sync END; the grant itself waits in
/// its access's `pending`, as one held back for kernel fences does.
#[derive(Debug)]
pub(super) struct Parked {
    access: AccessId,
    /// What its reply carries (a no-autofence grant's sync_files).
    fds: Vec<Arc<HeldFd>>,
    word_ok: bool,
}

/// What a request handler tells the dispatcher to do with the reply.
pub(super) enum Answer {
    Reply(ReplyBody, Vec<Arc<HeldFd>>),
    /// The reply is (or will be) sent by whoever grants the access.
    Deferred,
}

impl State {
    pub(super) fn begin(
        &mut self,
        client: ClientId,
        request_id: u64,
        buffer: BufferId,
        access: Access,
        timeout_ms: Option<u32>,
    ) -> Result<Answer, WireError> {
        let entry = self
            .clients
            .get(&client)
            .ok_or_else(|| WireError::new(ErrorCode::Internal, "unknown client"))?;
        if !entry.buffers.contains(&buffer) {
            return Err(WireError::new(
                ErrorCode::UnknownBuffer,
                format!("you hold no buffer {buffer}"),
            ));
        }
        let mode = if entry.autofence {
            Mode::Autofence
        } else {
            Mode::NoAutofence
        };
        let limit = entry.resolved.limits.max_queued_requests;
        if mode == Mode::Autofence && self.arbiter.waiting_for(client) >= limit as usize {
            return Err(WireError::new(
                ErrorCode::Busy,
                format!(
                    "rule '{}': at most {limit} queued requests",
                    entry.resolved.rule
                ),
            ));
        }
        // Granted and queued accesses both count (a queued one is granted
        // later). The arbiter's count is cheap but still includes accesses
        // ended through end words and not yet retired: the exact count, a
        // walk over the client's buffers, only settles a begin near the
        // limit.
        let held_limit = entry.resolved.limits.max_held_accesses;
        let held_limit_usize = held_limit as usize;
        let waiting = self.arbiter.waiting_for(client);
        if self.arbiter.held_by(client) + waiting >= held_limit_usize {
            let held = self.live_granted_to(client) + waiting;
            if held >= held_limit_usize {
                let mut err = WireError::new(
                    ErrorCode::QuotaExceeded,
                    format!(
                        "rule '{}': max_held_accesses limit {held_limit}, in use {held}, requested 1",
                        entry.resolved.rule
                    ),
                );
                err.quota = Some(dmabroker_ipc::QuotaDetail {
                    limit: held_limit.into(),
                    in_use: held as u64,
                    requested: 1,
                });
                return Err(err);
            }
        }
        let now = Instant::now();
        // The broker decides now: no fast begin may slip past it. (A client
        // that cannot use the word does not make the broker map it.)
        let map = self.word_eligible(client);
        self.take_over_word(buffer, now, map);
        // Accesses ended through their words are retired before deciding.
        self.settle_buffer(buffer, false, now);
        let in_use = self.arbiter.fence_count(buffer) + self.arbiter.queue_len(buffer);
        if in_use >= dmabroker_ipc::MAX_ACCESSES_PER_BUFFER {
            return Err(WireError::new(
                ErrorCode::Busy,
                format!("buffer {buffer} already has {in_use} accesses held or queued, the most one buffer takes"),
            ));
        }
        let deadline = timeout_ms.map(|ms| now + Duration::from_millis(ms.into()));
        match self
            .arbiter
            .begin(client, buffer, to_fence_access(access), mode, now)
            .map_err(fence_error)?
        {
            BeginOutcome::Granted(grant) => {
                // A no-autofence client was told to wait for these fences:
                // their ends must come as messages (and events).
                let lists_fences = !grant.outstanding.is_empty();
                self.deliver(grant, request_id, now, deadline, true);
                if lists_fences {
                    self.settle_buffer(buffer, true, now);
                    self.start_word_patrol(buffer);
                }
            }
            BeginOutcome::Queued(waiter) => {
                self.waiters.insert(
                    waiter,
                    WaiterEntry {
                        client,
                        request_id,
                        since: now,
                        deadline,
                        ever_planned: false,
                    },
                );
                if let Some(ms) = timeout_ms {
                    self.defer(Action::Timeout {
                        target: TimeoutTarget::Waiter(waiter),
                        after: Duration::from_millis(ms.into()),
                    });
                }
                // Someone waits now: every fence's end must be heard at
                // once. One that ended meanwhile is retired here, which may
                // grant this very waiter.
                self.settle_buffer(buffer, true, now);
                self.start_word_patrol(buffer);
            }
        }
        Ok(Answer::Deferred)
    }

    pub(super) fn deliver_grants(&mut self, grants: Vec<fence::Grant>) {
        if grants.is_empty() {
            return;
        }
        let now = Instant::now();
        // In the arbiter's order; grants a withdrawal below makes go after.
        let mut grants = std::collections::VecDeque::from(grants);
        while let Some(grant) = grants.pop_front() {
            let Some(waiter) = grant.waiter.and_then(|w| self.remove_waiter(w)) else {
                tracing::error!(access = grant.access_id, "grant for an unknown waiter");
                continue;
            };
            self.stats
                .waited(now.saturating_duration_since(waiter.since));
            let planned = grant
                .waiter
                .is_some_and(|w| self.planned_waiter(grant.buffer) == Some(w));
            if planned && self.record_hand_off(&grant, waiter.request_id) {
                continue;
            }
            if self.is_leaving(grant.client, grant.buffer) {
                grants.extend(self.refuse_to_leaving(&grant, waiter.request_id, now));
                continue;
            }
            // A waiter once told `Planned` takes a grant by message only:
            // a bit it found in the word must mean the hand-off.
            self.deliver(
                grant,
                waiter.request_id,
                waiter.since,
                waiter.deadline,
                !waiter.ever_planned,
            );
        }
    }

    /// Whether `client` is going from `buffer`: its hang-up, or its free
    /// of that buffer, runs now (see [`State::refuse_to_leaving`]).
    pub(super) fn is_leaving(&self, client: ClientId, buffer: BufferId) -> bool {
        self.leaving
            .is_some_and(|l| l.client == client && l.buffer.is_none_or(|b| b == buffer))
    }

    /// What a begin of the client going is answered instead of a grant:
    /// on a free, what protocol.md gives a queued begin whose buffer its
    /// client freed (`UnknownBuffer`); at a hang-up nothing, nobody reads.
    pub(super) fn leaving_answer(&self) -> Option<WireError> {
        self.leaving
            .and_then(|l| l.buffer)
            .map(|_| freed_while_waiting())
    }

    /// A grant the arbiter made to a client whose hang-up or free (of that
    /// buffer) runs: it is taken back before anyone hears of it. Its
    /// begins leave their queues before any settle serves them
    /// (`take_out_waiters_of`), but a decision the teardown makes on the
    /// way can still serve a queue one of them is in: a word found
    /// tampered with, or kept changing, is broken at the take-over, and
    /// the accesses the break ends let the queue's head in. Granted to the
    /// client going, the begin was answered `Granted` on a buffer being
    /// freed (or at a hang-up, to nobody), and the access, released at
    /// once, marked a lost write it never made. Its news goes back to the
    /// buffer, its begin is answered as [`State::leaving_answer`] says,
    /// and the grants its end makes are returned, to be delivered.
    fn refuse_to_leaving(
        &mut self,
        grant: &fence::Grant,
        request_id: u64,
        now: Instant,
    ) -> Vec<fence::Grant> {
        tracing::debug!(
            client = grant.client,
            buffer = grant.buffer,
            access = grant.access_id,
            "a grant to a client going taken back"
        );
        self.arbiter
            .restore_marks(grant.buffer, grant.writer_lost, grant.revoked);
        let grants = self
            .arbiter
            .end(grant.client, grant.access_id, now)
            .unwrap_or_default();
        self.touched.push(grant.buffer);
        if let Some(answer) = self.leaving_answer() {
            self.reply(grant.client, request_id, Err(answer), Vec::new());
        }
        grants
    }

    /// Turns an arbiter grant into a reply: now, or once the kernel's
    /// implicit fences allow it (autofence clients on dma-bufs).
    /// `word_ok`: the grant may be held in the buffer's word.
    fn deliver(
        &mut self,
        grant: fence::Grant,
        request_id: u64,
        since: Instant,
        deadline: Option<Instant>,
        word_ok: bool,
    ) {
        let access = to_wire_access(grant.access);
        let autofence = grant.mode == Mode::Autofence;
        let Some(buffer) = self.buffers.get(&grant.buffer) else {
            return;
        };
        // Only a dma-buf has kernel fences to look at (a memfd's grant,
        // the common case, skips even the reference count).
        let dmabuf_fd = buffer.origin.is_dma_buf().then(|| Arc::clone(&buffer.fd));
        if grant.writer_lost {
            self.stats.writer_lost += 1;
        }
        let mut fds = Vec::new();
        let mut fences = Vec::new();
        if !autofence {
            // A dma-buf's own fence may follow the accesses' sync_files,
            // and it must fit in the same message.
            let slots = dmabroker_ipc::MAX_FDS_PER_MESSAGE - usize::from(dmabuf_fd.is_some());
            let unsignalled = dmabuf_fd
                .as_ref()
                .filter(|fd| !dma_buf::implicit_fences_signalled(fd.as_fd(), access.is_write()));
            let mut kernel_fence = None;
            if let Some(fd) = unsignalled {
                match dma_buf::export_sync_file(fd.as_fd(), access.is_write()) {
                    Ok(sync_file) => kernel_fence = Some(sync_file),
                    // A kernel without the ioctl: nothing to list, and
                    // nothing the daemon could wait on either.
                    Err(err) if err.errno() == Some(nix::errno::Errno::ENOTTY) => {
                        tracing::warn!(buffer = grant.buffer, error = %err, "cannot export the dma-buf's kernel fences");
                    }
                    Err(err) => {
                        // A grant without the device's fence would let its
                        // client touch the buffer while the device still
                        // uses it: refused Busy, as an autofence grant
                        // the daemon cannot wait for is.
                        tracing::warn!(buffer = grant.buffer, error = %err, "cannot export the dma-buf's kernel fences; refusing the grant");
                        self.accesses.insert(
                            grant.access_id,
                            AccessEntry {
                                deadline,
                                ..AccessEntry::new(
                                    grant.client,
                                    grant.buffer,
                                    access,
                                    autofence,
                                    request_id,
                                )
                            },
                        );
                        let news = (grant.writer_lost, grant.revoked);
                        self.withdraw_grant(grant.access_id, news, no_kernel_fence());
                        return;
                    }
                }
            }
            fences = self.outstanding_fences(&grant, &mut fds, slots);
            if let Some(sync_file) = kernel_fence {
                fences.push(OutstandingFence {
                    id: KERNEL_FENCE_ID,
                    kind: Access::DeviceWrite,
                    holder: KERNEL_HOLDER,
                    sync_file_slot: Some(fds.len() as u8),
                });
                // Sent to the client, which may watch it before this
                // copy goes: let go of on its thread.
                let uid = self
                    .clients
                    .get(&grant.client)
                    .map_or(u32::MAX, |c| c.peer.accountable_uid);
                let release = Release::OnThreadOf { uid, buffer: false };
                fds.push(Arc::new(HeldFd::new(sync_file, release)));
            }
        }
        let wire_grant = Grant {
            access: grant.access_id,
            buffer: grant.buffer,
            kind: access,
            writer_lost: grant.writer_lost,
            revoked: grant.revoked,
            fences,
            end_slot: None,
            word: None,
        };
        self.accesses.insert(
            grant.access_id,
            AccessEntry {
                deadline,
                ..AccessEntry::new(grant.client, grant.buffer, access, autofence, request_id)
            },
        );
        let must_wait = dmabuf_fd.as_ref().filter(|fd| {
            autofence && !dma_buf::implicit_fences_signalled(fd.as_fd(), access.is_write())
        });
        if let Some(fd) = must_wait {
            match HeldDup::of(fd) {
                Ok(dup) => {
                    tracing::debug!(
                        buffer = grant.buffer,
                        access = grant.access_id,
                        writer_lost = wire_grant.writer_lost,
                        "grant held back for the dma-buf's kernel fences"
                    );
                    if let Some(entry) = self.accesses.get_mut(&grant.access_id) {
                        entry.pending = Some(PendingGrant {
                            grant: wire_grant,
                            since,
                        });
                    }
                    self.defer(Action::AwaitImplicit {
                        access: grant.access_id,
                        dmabuf: dup,
                        write: access.is_write(),
                    });
                    if let Some(deadline) = deadline {
                        self.defer(Action::Timeout {
                            target: TimeoutTarget::Access(grant.access_id),
                            after: deadline.saturating_duration_since(Instant::now()),
                        });
                    }
                    return;
                }
                Err(err) => {
                    // Granting now would let the access in before the
                    // device is done; waiting in place would stop every
                    // client. The begin is answered Busy instead.
                    tracing::warn!(error = %err, "cannot dup a dma-buf to wait for its fences; refusing the grant");
                    let news = (wire_grant.writer_lost, wire_grant.revoked);
                    self.withdraw_grant(grant.access_id, news, out_of_fds());
                    return;
                }
            }
        }
        self.complete_grant(grant.access_id, wire_grant, fds, word_ok);
    }

    /// The conflicting fences a no-autofence client must wait for itself,
    /// with the sync_files that back them in at most `slots` fds; a fence
    /// beyond those is announced by a `FenceSignalled` event instead.
    fn outstanding_fences(
        &mut self,
        grant: &fence::Grant,
        fds: &mut Vec<Arc<HeldFd>>,
        slots: usize,
    ) -> Vec<OutstandingFence> {
        let mut out = Vec::with_capacity(grant.outstanding.len());
        for view in &grant.outstanding {
            let sync_file = self
                .accesses
                .get(&view.id)
                .and_then(|a| a.sync_file.as_ref())
                .filter(|_| view.state == FenceState::AwaitingKernelFence)
                .map(Arc::clone);
            let slot = match sync_file {
                Some(fd) if fds.len() < slots => {
                    fds.push(fd);
                    Some((fds.len() - 1) as u8)
                }
                _ => {
                    // Once per client, however many of its grants list
                    // the fence: one event is owed, and the list must not
                    // grow with every begin while the fence lasts. Each
                    // grant counts, so that one withdrawn before it is
                    // sent takes back its own (`unsubscribe_unsent`).
                    let subscribers = self.fence_subscribers.entry(view.id).or_default();
                    match subscribers.iter_mut().find(|s| s.client == grant.client) {
                        Some(known) => known.grants = known.grants.saturating_add(1),
                        None => subscribers.push(super::state::Subscriber {
                            client: grant.client,
                            grants: 1,
                        }),
                    }
                    None
                }
            };
            out.push(OutstandingFence {
                id: view.id,
                kind: to_wire_access(view.access),
                holder: view.holder,
                sync_file_slot: slot,
            });
        }
        out
    }

    /// Cache sync START for CPU grants on dma-bufs of autofence clients,
    /// then the reply, then the hold-limit timer. START waits in the kernel
    /// for fences a device may have added since the broker looked, so on a
    /// dma-buf it is issued off the broker's thread and the grant is sent
    /// when it returns ([`State::cache_sync_started`]).
    ///
    /// Every grant the broker sends by message comes through here, so this
    /// is where a grant waits for the buffer's cache sync ENDs still
    /// running ([`State::park_behind_cache_end`]), whatever its client's
    /// mode or its kind.
    fn complete_grant(
        &mut self,
        access_id: AccessId,
        grant: Grant,
        fds: Vec<Arc<HeldFd>>,
        word_ok: bool,
    ) {
        let Some(entry) = self.accesses.get(&access_id) else {
            return;
        };
        let (kind, autofence, buffer, deadline) =
            (entry.kind, entry.autofence, entry.buffer, entry.deadline);
        let Some((grant, fds)) =
            self.park_behind_cache_end(access_id, buffer, grant, fds, word_ok, deadline)
        else {
            return;
        };
        let mut synced = CacheSync::NotNeeded;
        if kind.is_cpu() && autofence {
            let dmabuf = self
                .buffers
                .get(&buffer)
                .filter(|b| b.origin.is_dma_buf())
                .map(|b| HeldDup::of(&b.fd));
            match dmabuf {
                Some(Ok(dup)) => {
                    if let Some(entry) = self.accesses.get_mut(&access_id) {
                        entry.pending = Some(PendingGrant {
                            grant,
                            since: Instant::now(),
                        });
                        entry.starting = true;
                    }
                    tracing::debug!(buffer, access = access_id, "cache sync START sent off");
                    self.defer(Action::CacheSyncStart {
                        access: access_id,
                        buffer,
                        dmabuf: dup,
                        direction: SyncDirection::of(kind),
                    });
                    if let Some(deadline) = deadline {
                        self.defer(Action::Timeout {
                            target: TimeoutTarget::Access(access_id),
                            after: deadline.saturating_duration_since(Instant::now()),
                        });
                    }
                    return;
                }
                Some(Err(err)) => {
                    // A sync in place waits for the device on the broker's
                    // only thread: the begin is answered Busy instead.
                    tracing::warn!(error = %err, "cannot dup a dma-buf for its cache sync; refusing the grant");
                    let news = (grant.writer_lost, grant.revoked);
                    self.withdraw_grant(access_id, news, out_of_fds());
                    return;
                }
                None => synced = self.cache_sync(buffer, kind, SyncPhase::Start),
            }
            if let Some(entry) = self.accesses.get_mut(&access_id) {
                entry.owes_cache_end = synced != CacheSync::Failed;
            }
        }
        self.send_grant(access_id, grant, fds, word_ok, synced);
    }

    /// The cache sync START issued for a grant returned: the grant goes
    /// out. If its access went meanwhile, the START's END is owed all the
    /// same, and the buffer's grants have waited for it since the access
    /// went ([`State::cache_sync_left`]): it runs off the broker's thread
    /// as any END does, and a START that failed owes none and lets them go
    /// at once.
    pub(super) fn cache_sync_started(
        &mut self,
        access: AccessId,
        buffer: BufferId,
        started: Result<super::waits::StartedSync, CacheSyncError>,
    ) {
        let synced = match &started {
            Ok(_) => {
                self.stats.cache_syncs += 1;
                tracing::debug!(buffer, phase = ?SyncPhase::Start, "cache sync");
                CacheSync::Done
            }
            Err(err) => {
                self.stats.cache_syncs_failed += 1;
                tracing::warn!(buffer, phase = ?SyncPhase::Start, error = %err, "DMA_BUF_IOCTL_SYNC failed");
                CacheSync::Failed
            }
        };
        let Some(entry) = self.accesses.get_mut(&access) else {
            tracing::debug!(
                buffer,
                access,
                "cache sync START returned for an access that went; its END is owed"
            );
            match started.ok().and_then(|started| started.into_end()) {
                // Counted when its access went.
                Some(end) => self.defer(Action::CacheSyncEnd { buffer, end }),
                None => self.cache_end_returned(buffer),
            }
            return;
        };
        entry.starting = false;
        let started = match started {
            Ok(started) => started,
            // A START that never ran (no thread for it) is no failed
            // ioctl: the grant would go out unsynced for want of a thread
            // only, stale lines and all on a SoC that does not snoop.
            // The begin is answered Busy, as for want of an fd.
            Err(CacheSyncError::NoThread | CacheSyncError::Thread) => {
                if let Some(news) = self.held_back_news(access) {
                    let busy = WireError::new(
                        ErrorCode::Busy,
                        "the daemon has no thread to sync the buffer's caches on: try again",
                    );
                    self.withdraw_grant(access, news, busy);
                }
                return;
            }
            Err(CacheSyncError::Kernel(_)) => {
                self.send_held_back_grant(access, synced);
                return;
            }
        };
        started.keep();
        entry.owes_cache_end = true;
        self.send_held_back_grant(access, synced);
    }

    /// Sends the grant held back for its START (see `cache_sync_started`).
    fn send_held_back_grant(&mut self, access: AccessId, synced: CacheSync) {
        let Some(pending) = self
            .accesses
            .get_mut(&access)
            .and_then(|entry| entry.pending.take())
        else {
            return;
        };
        self.send_grant(access, pending.grant, Vec::new(), false, synced);
    }

    /// The grant's end path (buffer word, end word or message), then the
    /// reply and the hold-limit timer.
    fn send_grant(
        &mut self,
        access_id: AccessId,
        mut grant: Grant,
        fds: Vec<Arc<HeldFd>>,
        word_ok: bool,
        synced: CacheSync,
    ) {
        let Some(entry) = self.accesses.get(&access_id) else {
            return;
        };
        let (client, request_id, kind, buffer) =
            (entry.client, entry.request_id, entry.kind, entry.buffer);
        // Held in the buffer's word when it can be: its end then needs no
        // message at all once the broker hands the word back. Not a
        // no-autofence grant that lists fences: the word cannot hold
        // conflicting accesses together.
        if word_ok && synced == CacheSync::NotNeeded && grant.fences.is_empty() {
            grant.word = self.grant_in_word(buffer, client, kind);
            if let (Some(slot), Some(entry)) = (grant.word, self.accesses.get_mut(&access_id)) {
                entry.word_bit = Some(super::words::WordBit {
                    index: slot.index,
                    write: kind.is_write(),
                });
            }
        }
        // A real cache END must happen when the access ends, not when the
        // broker next looks: such accesses end by message.
        if synced != CacheSync::Done && grant.word.is_none() {
            // Watched also when a no-autofence client already waits for it:
            // a grant held back by kernel fences or a cache sync may have
            // been listed to one before it had a slot to mark.
            let watched =
                self.arbiter.has_waiters(buffer) || self.fence_subscribers.contains_key(&access_id);
            grant.end_slot = self.assign_end_slot(client, access_id, watched);
            if let Some(entry) = self.accesses.get_mut(&access_id) {
                entry.end_slot = grant.end_slot;
            }
        }
        self.stats.grants += 1;
        if kind.is_write() {
            let hold_limit = self
                .clients
                .get(&client)
                .and_then(|c| c.resolved.limits.write_hold_limit);
            if let Some(after) = hold_limit {
                self.defer(Action::HoldLimit {
                    access: access_id,
                    after,
                });
            }
        }
        self.reply(client, request_id, Ok(ReplyBody::Granted(grant)), fds);
    }

    /// Syncs the buffer's CPU caches for one phase of an access, on this
    /// thread: a memfd's START (it has no caches to manage: counted as
    /// skipped, no ioctl), or an END the daemon had no fd to run elsewhere.
    /// Only a START that did not fail is owed an END.
    fn cache_sync(&mut self, buffer: BufferId, kind: Access, phase: SyncPhase) -> CacheSync {
        let Some(entry) = self.buffers.get(&buffer) else {
            return CacheSync::Failed;
        };
        if !entry.origin.is_dma_buf() {
            self.stats.cache_syncs_skipped += 1;
            return CacheSync::NotNeeded;
        }
        if let (SyncPhase::End, Some(delay)) = (phase, super::cache_sync_delay(phase)) {
            std::thread::sleep(delay);
        }
        match dma_buf::sync(entry.fd.as_fd(), SyncDirection::of(kind), phase) {
            Ok(()) => {
                self.stats.cache_syncs += 1;
                tracing::debug!(buffer, ?phase, "cache sync");
                CacheSync::Done
            }
            Err(err) => {
                self.stats.cache_syncs_failed += 1;
                tracing::warn!(buffer, ?phase, error = %err, "DMA_BUF_IOCTL_SYNC failed");
                CacheSync::Failed
            }
        }
    }

    /// The cache sync END owed by a CPU access that had its START. A memfd
    /// has no caches (counted as skipped, as its START was, and nothing
    /// else: the memfd paths stay as fast as they were). On a dma-buf END
    /// cleans the CPU's caches of the buffer, which on a SoC whose devices
    /// do not snoop them takes time in proportion to the buffer; on the
    /// broker's one thread every client waited for it. It runs on a
    /// blocking thread instead, and until it is done the buffer's grants
    /// are held back (see [`State::park_behind_cache_end`]).
    fn end_cache_sync(&mut self, buffer: BufferId, kind: Access) {
        let Some(entry) = self.buffers.get(&buffer) else {
            return;
        };
        if !entry.origin.is_dma_buf() {
            self.stats.cache_syncs_skipped += 1;
            return;
        }
        match HeldDup::of(&entry.fd) {
            Ok(dmabuf) => {
                self.cache_ends.entry(buffer).or_default().running += 1;
                self.defer(Action::CacheSyncEnd {
                    buffer,
                    end: CacheEnd::new(dmabuf, SyncDirection::of(kind)),
                });
            }
            Err(err) => {
                // Skipping it would let a device read lines still dirty in
                // the CPU's caches: a stall is the lesser harm.
                tracing::warn!(buffer, error = %err, "cannot dup a dma-buf for its cache sync END; it runs on the broker's thread");
                self.cache_sync(buffer, kind, SyncPhase::End);
            }
        }
    }

    /// What an access leaving the table (ended, withdrawn, its buffer
    /// freed, its client gone) leaves behind of its cache syncs; every
    /// caller delivers the arbiter's grants only after this.
    ///
    /// A START still running is not stopped (nothing could stop the ioctl,
    /// and its END is owed once it returns): it is counted as an END of
    /// the buffer's from now, so that the grants made by the access's
    /// going wait for it and for its END, which [`State::cache_sync_started`]
    /// runs off the broker's thread. A grant parked behind an END goes
    /// from the parked list at once, with the fds its reply would have
    /// carried: a begin withdrawn again and again while one END runs must
    /// not pile them up.
    pub(super) fn cache_sync_left(&mut self, access: AccessId, entry: &AccessEntry) {
        if entry.starting {
            self.cache_ends.entry(entry.buffer).or_default().running += 1;
            return;
        }
        if entry.pending.is_none() || self.cache_ends.is_empty() {
            return;
        }
        if let Some(ends) = self.cache_ends.get_mut(&entry.buffer) {
            ends.parked.retain(|parked| parked.access != access);
        }
    }

    /// Whether `buffer` has cache sync ENDs (or STARTs of accesses gone)
    /// running, whose copies of its fd keep its file open.
    pub(super) fn cache_ends_running_on(&self, buffer: BufferId) -> bool {
        self.cache_ends
            .get(&buffer)
            .is_some_and(|ends| ends.running > 0)
    }

    /// Cache sync ENDs running now, every buffer's (the D-Bus view).
    pub fn cache_ends_running(&self) -> u64 {
        self.cache_ends.values().map(|e| u64::from(e.running)).sum()
    }

    /// Holds a grant back while its buffer has cache sync ENDs running,
    /// until they are done; gives it back, to go on now, otherwise. A
    /// device must not read lines still dirty in the CPU's caches, and a
    /// CPU access's START must not run before the previous access's END.
    /// The arbiter has made the grant, so, like one held back for kernel
    /// fences, it is `pending`: its client cannot end it, a `Cancel` or its
    /// begin's timeout withdraws it, a free or a hang-up drops it, and
    /// [`State::cache_end_done`] skips what went meanwhile.
    ///
    /// Parking cannot last for good: only an access granted before the
    /// buffer's first END began can end with another (no grant goes out
    /// while one runs), so the ENDs still to come are a number that only
    /// falls. One such access may still have its START running: its grant
    /// goes out when START returns, unparked. It was granted while the
    /// access that ended was held, so both are reads, and neither's cache
    /// sync concerns the other.
    ///
    /// (The map is nearly always empty: a memfd's grant pays one look at
    /// its length.)
    fn park_behind_cache_end(
        &mut self,
        access: AccessId,
        buffer: BufferId,
        grant: Grant,
        fds: Vec<Arc<HeldFd>>,
        word_ok: bool,
        deadline: Option<Instant>,
    ) -> Option<(Grant, Vec<Arc<HeldFd>>)> {
        if self.cache_ends.is_empty() {
            return Some((grant, fds));
        }
        let Some(ends) = self.cache_ends.get_mut(&buffer) else {
            return Some((grant, fds));
        };
        ends.parked.push(Parked {
            access,
            fds,
            word_ok,
        });
        if let Some(entry) = self.accesses.get_mut(&access) {
            entry.pending = Some(PendingGrant {
                grant,
                since: Instant::now(),
            });
        }
        if let Some(deadline) = deadline {
            self.defer(Action::Timeout {
                target: TimeoutTarget::Access(access),
                after: deadline.saturating_duration_since(Instant::now()),
            });
        }
        None
    }

    /// A cache sync END of `buffer` returned. A failed one is logged and
    /// counted, and holds nothing back: the grants it held go on as they
    /// would after any failed sync. Once the buffer's last END is done, its
    /// parked grants go on in the order they were parked (the arbiter's),
    /// to their own START and reply.
    pub(super) fn cache_end_done(&mut self, buffer: BufferId, ended: Result<(), CacheSyncError>) {
        match ended {
            Ok(()) => {
                self.stats.cache_syncs += 1;
                tracing::debug!(buffer, phase = ?SyncPhase::End, "cache sync");
            }
            Err(err) => {
                self.stats.cache_syncs_failed += 1;
                tracing::warn!(buffer, phase = ?SyncPhase::End, error = %err, "DMA_BUF_IOCTL_SYNC failed");
            }
        }
        self.cache_end_returned(buffer);
    }

    /// One of `buffer`'s counted ENDs is over (or, for a START whose
    /// access went and that failed, will never be owed): once none is
    /// left, its parked grants go on in the order they were parked.
    fn cache_end_returned(&mut self, buffer: BufferId) {
        let Some(ends) = self.cache_ends.get_mut(&buffer) else {
            tracing::error!(buffer, "a cache sync END returned that was never counted");
            return;
        };
        ends.running = ends.running.saturating_sub(1);
        if ends.running > 0 {
            return;
        }
        let parked = self
            .cache_ends
            .remove(&buffer)
            .map(|ends| ends.parked)
            .unwrap_or_default();
        for Parked {
            access,
            fds,
            word_ok,
        } in parked
        {
            let Some(pending) = self
                .accesses
                .get_mut(&access)
                .and_then(|entry| entry.pending.take())
            else {
                continue;
            };
            self.complete_grant(access, pending.grant, fds, word_ok);
        }
    }

    pub(super) fn end(
        &mut self,
        client: ClientId,
        access_id: AccessId,
        sync_file: Option<ClientFd>,
    ) -> Result<Answer, WireError> {
        // Someone else's access looks exactly like a missing one: ids are
        // guessable, existence is not to be revealed (as for buffers). So
        // does one whose grant is still held back by kernel fences: its
        // client has not been told it exists.
        let entry = self
            .accesses
            .get(&access_id)
            .filter(|a| a.client == client && a.pending.is_none())
            .ok_or_else(|| {
                WireError::new(ErrorCode::UnknownAccess, format!("no access {access_id}"))
            })?;
        if entry.sync_file.is_some() {
            return Err(WireError::new(
                ErrorCode::InvalidArgument,
                format!("access {access_id} already ended with a fence"),
            ));
        }
        match sync_file {
            Some(fd) => self.end_with_fence(client, access_id, fd)?,
            None => {
                let grants = self
                    .arbiter
                    .end(client, access_id, Instant::now())
                    .map_err(fence_error)?;
                self.finish_released(&[access_id]);
                self.deliver_grants(grants);
            }
        }
        Ok(Answer::Reply(ReplyBody::Ended, Vec::new()))
    }

    fn end_with_fence(
        &mut self,
        client: ClientId,
        access_id: AccessId,
        sync_file: ClientFd,
    ) -> Result<(), WireError> {
        let Some(sync_file) = sync_file.keep_held_if(
            |fd| crate::kernel::sync_file::foreign_status(fd).is_ok(),
            false,
        ) else {
            return Err(WireError::new(
                ErrorCode::InvalidArgument,
                "the fd handed over is not a sync_file",
            ));
        };
        // Everything that can fail comes before the arbiter's hand-over:
        // after it, the access waits for a wait that must then exist.
        let uid = self.fences_awaited_check(client)?;
        let sync_file = Arc::new(sync_file);
        let waiter = HeldDup::of(&sync_file).map_err(|e| {
            WireError::new(
                ErrorCode::Internal,
                format!("cannot dup the sync_file: {e}"),
            )
        })?;
        self.arbiter
            .end_with_kernel_fence(client, access_id)
            .map_err(fence_error)?;
        let Some(entry) = self.accesses.get_mut(&access_id) else {
            return Ok(());
        };
        entry.sync_file = Some(Arc::clone(&sync_file));
        entry.awaited_for = Some(uid);
        *self.fences_awaited.entry(uid).or_default() += 1;
        let (holder, slot) = (entry.client, entry.end_slot.take());
        self.release_end_slot(holder, slot);
        let Some(entry) = self.accesses.get(&access_id) else {
            return Ok(());
        };
        let (buffer, write) = (entry.buffer, entry.kind.is_write());
        // Drivers that rely on implicit sync see the hardware's fence too.
        if let Some(buf) = self.buffers.get(&buffer) {
            if buf.origin.is_dma_buf() {
                match dma_buf::import_sync_file(buf.fd.as_fd(), sync_file.as_fd(), write) {
                    Ok(dma_buf::ImportOutcome::Imported) => self.stats.kernel_fences_imported += 1,
                    Ok(dma_buf::ImportOutcome::Unsupported) => {}
                    Err(err) => {
                        tracing::warn!(buffer, error = %err, "DMA_BUF_IOCTL_IMPORT_SYNC_FILE failed")
                    }
                }
            }
        }
        self.defer(Action::AwaitSyncFile {
            access: access_id,
            sync_file: waiter,
        });
        Ok(())
    }

    /// The accountable uid whose count of awaited kernel fences the
    /// client's next one joins, or `QuotaExceeded` when that count is at
    /// the client's `max_held_accesses`. An access ended with a fence is
    /// its device's and leaves its client's count, and stays when the
    /// client goes (the device still works): counted per connection, one
    /// client could end accesses with fences that never signal, reconnect
    /// and do it again, each keeping two of the daemon's fds, until the
    /// daemon's fd table is full and every client is refused.
    fn fences_awaited_check(&self, client: ClientId) -> Result<u32, WireError> {
        let Some(entry) = self.clients.get(&client) else {
            return Err(WireError::new(
                ErrorCode::Internal,
                format!("no client {client}"),
            ));
        };
        let uid = entry.peer.accountable_uid;
        let limit = entry.resolved.limits.max_held_accesses;
        let awaited = self.fences_awaited.get(&uid).copied().unwrap_or(0);
        if awaited >= limit as usize {
            let mut err = WireError::new(
                ErrorCode::QuotaExceeded,
                format!(
                    "rule '{}': max_held_accesses limit {limit}, in use {awaited} \
                     (accesses ended with a kernel fence not yet signalled, \
                     every connection of uid {uid}), requested 1",
                    entry.resolved.rule
                ),
            );
            err.quota = Some(dmabroker_ipc::QuotaDetail {
                limit: limit.into(),
                in_use: awaited as u64,
                requested: 1,
            });
            return Err(err);
        }
        Ok(uid)
    }

    /// Bookkeeping for accesses the arbiter has removed: cache sync END for
    /// CPU grants that had START, subscribers told. Every caller delivers
    /// the arbiter's grants only after this, so an END begun here is
    /// counted before any of them can be sent.
    pub(super) fn finish_released(&mut self, released: &[AccessId]) {
        for access in released {
            if let Some(entry) = self.remove_access(*access) {
                if entry.owes_cache_end {
                    self.end_cache_sync(entry.buffer, entry.kind);
                }
                self.release_end_slot(entry.client, entry.end_slot);
                self.clear_word_bit(entry.buffer, entry.word_bit);
                self.touched.push(entry.buffer);
            }
            self.fence_ended(*access);
        }
    }

    pub(super) fn timed_out(&mut self, target: TimeoutTarget) {
        let now = Instant::now();
        match target {
            TimeoutTarget::Waiter(waiter) => {
                let timed_out = self.withdraw_waiter(waiter, now, |entry| {
                    WireError::new(
                        ErrorCode::Timeout,
                        format!(
                            "not granted within {} ms",
                            now.saturating_duration_since(entry.since).as_millis()
                        ),
                    )
                });
                if timed_out {
                    self.stats.timeouts += 1;
                }
            }
            TimeoutTarget::Access(access) => {
                let Some(news) = self.held_back_news(access) else {
                    return;
                };
                self.stats.timeouts += 1;
                let timeout = WireError::new(
                    ErrorCode::Timeout,
                    "the buffer's kernel fences or cache syncs did not finish in time",
                );
                self.withdraw_grant(access, news, timeout);
            }
        }
    }

    /// Takes a queued begin out of its buffer's queue and answers it with
    /// `error`; whoever waited behind it is served. A hand-off planned for
    /// it is cancelled first (which wakes its client on the word), or, if
    /// the holder already carried it out, recorded: the waiter then holds
    /// the access and is no longer waiting. Returns whether it was.
    fn withdraw_waiter(
        &mut self,
        waiter: fence::WaiterId,
        now: Instant,
        error: impl FnOnce(&WaiterEntry) -> WireError,
    ) -> bool {
        if let Some(buffer) = self.arbiter.waiter_buffer(waiter) {
            self.take_over_word(buffer, now, false);
            self.settle_buffer(buffer, false, now);
        }
        self.take_out_waiter(waiter, now, |entry| Some(error(entry)))
    }

    /// [`State::withdraw_waiter`] without the settle, answered with what
    /// `answer` says (nothing for a client that is gone). Returns whether
    /// the waiter was still waiting.
    fn take_out_waiter(
        &mut self,
        waiter: fence::WaiterId,
        now: Instant,
        answer: impl FnOnce(&WaiterEntry) -> Option<WireError>,
    ) -> bool {
        let Some(entry) = self.remove_waiter(waiter) else {
            return false;
        };
        let grants = self.arbiter.cancel(waiter, now).unwrap_or_default();
        if let Some(error) = answer(&entry) {
            self.reply(entry.client, entry.request_id, Err(error), Vec::new());
        }
        self.deliver_grants(grants);
        true
    }

    /// Takes `client`'s queued begins (on `buffer` only, for a free) out of
    /// their queues before its hang-up or free settles its buffers. A
    /// settle retires what they wait for (an access the client ended in
    /// its word, say), and serving the queue then granted them to the
    /// client that is going: a write so granted was released at once as a
    /// lost one, and the next reader told `writer_lost` for nothing. A
    /// hand-off planned for one is cancelled first, as at any withdrawal;
    /// one the holder already carried out is recorded instead (the access
    /// is the client's, and released with its others). All others leave
    /// their queues before any queue is served: taken out one at a time,
    /// the leaving of one (a write) granted the next (a read queued behind
    /// it) to the client going. Whoever waited behind them is served;
    /// `answer` says what each begin is answered.
    pub(super) fn take_out_waiters_of(
        &mut self,
        client: ClientId,
        buffer: Option<BufferId>,
        answer: impl Fn(&WaiterEntry) -> Option<WireError>,
    ) {
        let now = Instant::now();
        let waiters: Vec<(fence::WaiterId, BufferId)> = self
            .arbiter
            .waiters_of(client)
            .filter_map(|w| Some((w, self.arbiter.waiter_buffer(w)?)))
            .filter(|(_, b)| buffer.is_none_or(|only| *b == only))
            .collect();
        let mut buffers: Vec<BufferId> = waiters.iter().map(|(_, on)| *on).collect();
        buffers.sort_unstable();
        buffers.dedup();
        for on in buffers {
            self.take_over_word(on, now, false);
        }
        // A plan the take-over left standing was carried out: the holder's
        // end handed the buffer over, and the waiter may be writing.
        let (handed, waiters): (Vec<_>, Vec<_>) = waiters
            .into_iter()
            .partition(|(waiter, on)| self.planned_waiter(*on) == Some(*waiter));
        let mut out = Vec::with_capacity(waiters.len());
        for (waiter, _) in waiters {
            let Some(entry) = self.remove_waiter(waiter) else {
                continue;
            };
            if let Some(error) = answer(&entry) {
                self.reply(entry.client, entry.request_id, Err(error), Vec::new());
            }
            out.push(waiter);
        }
        let grants = self.arbiter.cancel_all(&out, now);
        self.deliver_grants(grants);
        // The hand-off is recorded (the settle retires the holder's ended
        // access, which grants the waiter): the access is the client's,
        // and its hang-up or free releases it as any other (a write as a
        // lost one). Cancelled instead, the write was nobody's in the
        // table, and the next grant did not carry `writer_lost`. Its other
        // begins are out of the queues by now: the settle grants none.
        for (waiter, on) in handed {
            self.settle_buffer(on, false, now);
            // Not recorded (the word broke meanwhile, say): it leaves the
            // queue as the others did.
            self.take_out_waiter(waiter, now, &answer);
        }
    }

    /// `Cancel`: the client no longer waits for its begin `request`. A
    /// queued one leaves the queue (its plan in the buffer's word
    /// cancelled) and a grant still held back for the dma-buf's kernel
    /// fences or a cache sync is withdrawn, each answered `Cancelled`, as a
    /// timeout would be. Anything else it may name (a begin already
    /// answered, a hand-off carried out, an id never sent, another
    /// client's request) is left alone: the cancel crossed the answer, as
    /// happens. It never fails but for a client that did not negotiate it.
    pub(super) fn cancel(&mut self, client: ClientId, request: u64) -> Result<Answer, WireError> {
        let negotiated = self.clients.get(&client).is_some_and(|c| c.cancel);
        if !negotiated {
            return Err(WireError::new(
                ErrorCode::Unsupported,
                "cancel needs feature bit 5 (cancel) in the hello",
            ));
        }
        let cancelled = || {
            WireError::new(
                ErrorCode::Cancelled,
                format!("begin {request} cancelled by its client"),
            )
        };
        // Its own queue only, at most its queue limit long: a request id
        // is the client's, and another client's may be equal.
        let waiters: Vec<fence::WaiterId> = self
            .arbiter
            .waiters_of(client)
            .filter(|w| {
                self.waiters
                    .get(w)
                    .is_some_and(|entry| entry.request_id == request)
            })
            .collect();
        let now = Instant::now();
        for waiter in waiters {
            self.withdraw_waiter(waiter, now, |_| cancelled());
        }
        let held_back: Vec<AccessId> = self
            .arbiter
            .held_of(client)
            .filter(|a| {
                self.accesses
                    .get(a)
                    .is_some_and(|entry| entry.request_id == request && entry.pending.is_some())
            })
            .collect();
        for access in held_back {
            let Some(news) = self.held_back_news(access) else {
                continue;
            };
            self.withdraw_grant(access, news, cancelled());
        }
        Ok(Answer::Reply(ReplyBody::Ended, Vec::new()))
    }

    /// The grants of `client` still held back (on `buffer`, or on any):
    /// made by the arbiter, never sent. When the client goes (a hang-up, a
    /// free) the news they took from their buffers goes back to it, for
    /// the next grant, and a write among them is no lost writer: the
    /// client never had it. Their news is no longer counted as told.
    pub(super) fn unsent_grants(
        &mut self,
        client: ClientId,
        buffer: Option<BufferId>,
    ) -> Vec<fence::Unsent> {
        let unsent: Vec<fence::Unsent> = self
            .accesses
            .iter()
            .filter(|(_, a)| a.client == client && buffer.is_none_or(|b| a.buffer == b))
            .filter_map(|(id, a)| {
                let pending = a.pending.as_ref()?;
                Some(fence::Unsent {
                    access: *id,
                    writer_lost: pending.grant.writer_lost,
                    revoked: pending.grant.revoked,
                })
            })
            .collect();
        let told = unsent.iter().filter(|u| u.writer_lost).count() as u64;
        self.stats.writer_lost = self.stats.writer_lost.saturating_sub(told);
        unsent
    }

    /// A grant still held back: the news it carries for its client
    /// (writer lost, revoked), which goes back to the buffer if it is
    /// withdrawn.
    fn held_back_news(&self, access: AccessId) -> Option<(bool, bool)> {
        self.accesses
            .get(&access)
            .and_then(|e| e.pending.as_ref())
            .map(|p| (p.grant.writer_lost, p.grant.revoked))
    }

    /// Takes back a grant the arbiter made but the client was not sent
    /// (held back for kernel fences or a cache sync), answering its begin
    /// with `error`; whoever waited behind it is served.
    /// `news`: the grant's `writer_lost` and `revoked`, which the arbiter
    /// took from the buffer for it; they go back, for the next grant.
    fn withdraw_grant(&mut self, access: AccessId, news: (bool, bool), error: WireError) {
        let Some(entry) = self.accesses.get(&access) else {
            return;
        };
        let (client, request_id, buffer) = (entry.client, entry.request_id, entry.buffer);
        if news.0 {
            // Counted when it was delivered; counted again when it is.
            self.stats.writer_lost = self.stats.writer_lost.saturating_sub(1);
        }
        self.arbiter.restore_marks(buffer, news.0, news.1);
        let grants = self
            .arbiter
            .end(client, access, Instant::now())
            .unwrap_or_default();
        if let Some(entry) = self.remove_access(access) {
            self.release_end_slot(entry.client, entry.end_slot);
        }
        self.fence_ended(access);
        self.reply(client, request_id, Err(error), Vec::new());
        self.deliver_grants(grants);
    }

    pub(super) fn implicit_fences_done(&mut self, access: AccessId) {
        let Some(entry) = self.accesses.get_mut(&access) else {
            return;
        };
        let Some(pending) = entry.pending.take() else {
            return;
        };
        self.stats
            .waited(Instant::now().saturating_duration_since(pending.since));
        self.complete_grant(access, pending.grant, Vec::new(), false);
    }

    pub(super) fn kernel_fence_signalled(&mut self, access: AccessId) {
        let grants = self.arbiter.kernel_fence_signalled(access, Instant::now());
        if let Some(entry) = self.remove_access(access) {
            self.release_end_slot(entry.client, entry.end_slot);
            // Its buffer's word, taken while the device worked, goes back
            // if nothing else holds it (as after any other end), rather
            // than at the buffer's next decision: meanwhile every begin in
            // the word would take a round trip.
            self.touched.push(entry.buffer);
        }
        self.fence_ended(access);
        self.deliver_grants(grants);
    }

    /// A write held past the client's hold limit is taken away: the holder
    /// is told, the next grant carries `revoked`.
    pub(super) fn hold_limit_exceeded(&mut self, access: AccessId) {
        let Some(entry) = self.accesses.get(&access) else {
            return;
        };
        if entry.sync_file.is_some() || entry.pending.is_some() {
            return;
        }
        let (client, buffer) = (entry.client, entry.buffer);
        if self.retired_if_ended(access) {
            return;
        }
        let Ok(grants) = self.arbiter.revoke(access, Instant::now()) else {
            return;
        };
        tracing::warn!(
            client,
            buffer,
            access,
            "write access held past its limit: revoked"
        );
        self.tell_revoked(client, access, buffer);
        self.finish_released(&[access]);
        self.deliver_grants(grants);
    }

    /// Tells `client` (and the D-Bus observers) its access was taken away,
    /// and counts it.
    pub(super) fn tell_revoked(&mut self, client: ClientId, access: AccessId, buffer: BufferId) {
        self.stats.revocations += 1;
        self.event(client, Event::AccessRevoked { access, buffer });
        self.notice(super::Notice::AccessRevoked {
            buffer,
            access,
            client,
        });
    }
}

/// The answer to a begin whose client freed its buffer while it waited
/// (protocol.md: `UnknownBuffer`, "a queued `Begin` whose buffer you
/// freed").
pub(super) fn freed_while_waiting() -> WireError {
    WireError::new(ErrorCode::UnknownBuffer, "buffer freed while waiting")
}

/// The answer to a no-autofence grant on a dma-buf whose kernel fences the
/// daemon could not export for its client (out of fds, of memory).
fn no_kernel_fence() -> WireError {
    WireError::new(
        ErrorCode::Busy,
        "the daemon cannot hand over the buffer's kernel fences now: try again",
    )
}

/// The answer to a begin whose grant the daemon could not wait on safely
/// for want of a file descriptor.
fn out_of_fds() -> WireError {
    WireError::new(
        ErrorCode::Busy,
        "the daemon is out of file descriptors to wait for the buffer's fences: try again",
    )
}
