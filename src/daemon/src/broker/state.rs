//! The broker's tables and the bookkeeping that keeps them consistent:
//! who holds which buffer, who is charged for it, and how replies reach a
//! client.

use std::collections::{BTreeSet, HashMap};

// Tables keyed by ids the broker hands out in sequence use the fast hash:
// a client cannot choose colliding keys, and SipHash was a measurable part
// of every transition. Tokens, which arrive as client text, keep SipHash.
use rustc_hash::FxHashMap;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use dmabroker_fence::{AccessId, Arbiter, WaiterId};
use dmabroker_ipc::codec::encode_server_message_into;
use dmabroker_ipc::{
    BufferId, ClientId, ErrorCode, Event, EventMessage, Reply, ReplyBody, ServerMessage,
    ShareToken, WireError,
};
use dmabroker_policy::{Policy, Resolved};

use super::notice::{Notice, NoticeSender, NOTICE_BACKLOG};
use super::{Action, TaskOwner};
use crate::heaps::{Backend, HeapRegistry};
use crate::held_files::{HeldFd, Release};
use crate::identity::Peer;
use crate::outbox::Outbox;
use crate::stats::Stats;

/// The longest a freed dma-buf's closing thread waits for the service
/// manager to let go of its fd-store copy first (see
/// `FdStore::await_removal`): a manager that has not read the removal in
/// that long is not coming back to it.
pub(super) const STORE_LET_GO: std::time::Duration = std::time::Duration::from_secs(600);

/// The highest buffer id the daemon hands out. Ids go up by one per
/// buffer and are never reused, and at a billion buffers a second this one
/// is 292 years away: a higher id in a record or an fd-store name is none
/// this daemon gave (a corrupt or hand-written one), and is not taken for
/// one, so the count can neither reach the end of `u64` and wrap nor be
/// made to. It also fits a signed 64-bit integer, for the views' readers.
pub const MAX_BUFFER_ID: BufferId = i64::MAX as BufferId;

/// The highest client (connection) id the daemon hands out, for the same
/// reasons as [`MAX_BUFFER_ID`]: a record's hold naming a higher one (a
/// corrupt or hand-written record) names no connection this daemon had,
/// and is taken for a hold of a connection the record does not name.
/// Before, a hold recorded for `u64::MAX` set the next id to the top: the
/// connection after the next one overflowed the count (a panic on the
/// broker's thread in a debug build; in a release build a wrap to 0,
/// `ORPHAN`, which `held_by` finds in every hold awaiting re-attach).
pub const MAX_CLIENT_ID: ClientId = i64::MAX as ClientId;

/// Every client id up to [`MAX_CLIENT_ID`] was handed out: no connection
/// is taken any more (only a restart with a fresh count cures it, which
/// at one connection a nanosecond is 292 years away).
#[derive(Debug, thiserror::Error)]
#[error(
    "the broker has no connection id left to hand out (the next would be {next}, above the \
     highest, {MAX_CLIENT_ID}); restart the service"
)]
pub struct ClientIdsExhausted {
    pub next: ClientId,
}

impl From<ClientIdsExhausted> for WireError {
    fn from(err: ClientIdsExhausted) -> WireError {
        WireError::new(ErrorCode::Internal, err.to_string())
    }
}

/// Every buffer id up to [`MAX_BUFFER_ID`] was handed out.
#[derive(Debug, thiserror::Error)]
#[error(
    "the broker has no buffer id left to hand out (the next would be {next}, above the \
     highest, {MAX_BUFFER_ID}); a buffer record or fd-store name of a previous instance \
     set the count that high: stop the service for good (systemctl stop) to empty its fd store"
)]
pub struct IdsExhausted {
    pub next: BufferId,
}

impl From<IdsExhausted> for WireError {
    fn from(err: IdsExhausted) -> WireError {
        WireError::new(ErrorCode::Internal, err.to_string())
    }
}

/// Where a buffer's memory came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BufferOrigin {
    Allocated(Backend),
    /// A dma-buf a client registered (from V4L2, a GPU).
    Adopted,
}

impl BufferOrigin {
    /// Only real dma-bufs have CPU caches to sync and kernel fences to honour.
    pub fn is_dma_buf(&self) -> bool {
        !matches!(self, BufferOrigin::Allocated(Backend::Memfd))
    }

    /// Where the daemon's last copy of a buffer of this origin, `size`
    /// bytes, brought in or allocated for a client of `uid`, is let go
    /// of: a dma-buf can be watched with epoll, and a memfd cannot (see
    /// `held_files`).
    pub fn release(&self, size: u64, uid: u32) -> Release {
        if self.is_dma_buf() {
            Release::OnThreadOf { uid, buffer: true }
        } else {
            Release::Pages { size }
        }
    }

    pub fn backend_name(&self) -> &'static str {
        match self {
            BufferOrigin::Allocated(b) => b.name(),
            BufferOrigin::Adopted => "adopted",
        }
    }
}

#[derive(Debug)]
pub struct Holder {
    pub client: ClientId,
    /// Proof of holding, for re-attaching after a broker restart.
    pub secret: String,
    pub since: SystemTime,
    /// Its index in the buffer's word, if it may use it.
    pub word_index: Option<u8>,
    /// A hold taken back from the fd store: the uid that held it, the only
    /// one its secret re-attaches for.
    pub restored_uid: Option<u32>,
    /// A hold taken back from the fd store: the connection the record says
    /// held it (`None`: a record that did not say). Only while orphaned.
    pub restored_client: Option<ClientId>,
    /// A hold taken back from the fd store: the accountable uid it counts
    /// for in `State::uid_held` until it is re-attached or dropped (`None`:
    /// a record that kept no uid for it, and it counts for nobody). Its
    /// user's `max_uid_buffers` must see it meanwhile, or a user could
    /// allocate the value again during the grace period and then
    /// re-attach every hold. Only while orphaned.
    pub counted_for: Option<u32>,
}

/// What `max_uid_buffers` counts for one accountable uid, kept up to date
/// wherever a hold is taken or let go of, so that the check on every
/// allocation, import and adopt reads a number instead of going over the
/// uid's connections and their buffers.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct UidHeld {
    /// Each buffer the uid holds (through its connections, or a hold from
    /// before a restart not re-attached yet), and by how many holds. A
    /// buffer several of them hold counts once: it takes one slot of the
    /// fd store, which the limit shares out, and a camera and a codec of
    /// one user sharing every frame would otherwise have half the room.
    pub buffers: FxHashMap<BufferId, u32>,
    /// Its connections' allocations being carried out, each a buffer to be.
    pub allocating: u64,
}

impl UidHeld {
    /// What the limit compares: its distinct buffers and those to be.
    pub fn count(&self) -> u64 {
        self.buffers.len() as u64 + self.allocating
    }
}

/// The connection from before a restart whose holds a connection
/// re-attaches: only one's (see `State::reattach`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Before {
    /// Holds of a record that did not say whose they were (version 1).
    Unknown,
    Client(ClientId),
}

#[derive(Debug)]
pub struct BufferEntry {
    pub id: BufferId,
    pub fd: Arc<HeldFd>,
    pub size: u64,
    pub heap: String,
    pub origin: BufferOrigin,
    pub name: String,
    pub inode: u64,
    /// The client charged for its bytes.
    pub owner: ClientId,
    /// In the order they got hold of it; the charge moves down this list.
    pub holders: Vec<Holder>,
    pub created: SystemTime,
    /// The reservation word past the end of a memfd buffer (see
    /// `dmabroker_ipc::bufferword`); `None` for dma-bufs.
    pub word: Option<Box<super::words::WordState>>,
}

impl BufferEntry {
    pub fn held_by(&self, client: ClientId) -> bool {
        self.holders.iter().any(|h| h.client == client)
    }
}

#[derive(Debug)]
pub struct ClientEntry {
    pub id: ClientId,
    pub peer: Peer,
    pub name: String,
    pub hello_done: bool,
    pub autofence: bool,
    pub resolved: Resolved,
    pub outbox: Arc<Outbox>,
    pub buffers: BTreeSet<BufferId>,
    /// Bytes of the buffers this client is charged for.
    pub charged_bytes: u64,
    /// Bytes of every buffer it holds, charged to it or not: what it may
    /// be charged for once the others let go, and so what
    /// `max_total_bytes` bounds when it takes a new one.
    pub held_bytes: u64,
    pub protocol_errors: u32,
    pub connected: SystemTime,
    /// Its end-word page, when the client asked for one in its hello.
    pub end_page: Option<super::endpage::EndPage>,
    /// It asked for buffer words in its hello.
    pub buffer_words: bool,
    /// It negotiated `Cancel` (and so knows `ErrorCode::Cancelled`).
    pub cancel: bool,
    /// Its allocations being carried out off the broker's thread, not yet
    /// answered. Each counts against its quota as the buffer it will be.
    pub allocating: Vec<PendingAllocation>,
    /// The connection from before a restart whose holds it re-attaches,
    /// once it re-attached one; that connection's holds still waiting
    /// count against its limits (see `check_quota`). Cleared at the end
    /// of the grace period, when none waits any more.
    pub reattaching: Option<Before>,
    /// The client id its holds are recorded under: its own, or the one of
    /// the connection from before the restart it took over (so that a
    /// restart in the middle of its re-attaches leaves all of them one
    /// connection's, for the next instance too).
    pub recorded_as: ClientId,
    /// It allocated, imported or adopted a buffer itself: a re-attach
    /// after that is checked against its limits (see `State::reattach`).
    pub took_new: bool,
}

/// An allocation on a blocking thread (see `requests::Action::Allocate`).
#[derive(Debug, Clone)]
pub struct PendingAllocation {
    /// The broker's number for it, which names its task.
    pub number: u64,
    /// Page-rounded bytes.
    pub size: u64,
    /// What the D-Bus view shows of it, since a client refused
    /// `QuotaExceeded` because of it must be able to see it there: the
    /// name the buffer will have, the heap its thread is at (read without
    /// waiting for that thread), and when it was asked for.
    pub name: String,
    pub heap: Arc<crate::heaps::HeapInTry>,
    pub since: Instant,
}

impl ClientEntry {
    /// Bytes of its allocations still being carried out.
    pub fn allocating_bytes(&self) -> u64 {
        self.allocating.iter().map(|a| a.size).sum()
    }
}

#[derive(Debug)]
pub struct TokenEntry {
    pub buffer: BufferId,
    pub exporter: ClientId,
}

/// The broker-side facts about a granted access that the pure arbiter does
/// not track: where its reply goes and what the kernel must be told.
#[derive(Debug)]
pub struct AccessEntry {
    pub client: ClientId,
    pub buffer: BufferId,
    pub kind: dmabroker_ipc::Access,
    pub autofence: bool,
    pub request_id: u64,
    /// The grant is decided but waits for kernel implicit fences.
    pub pending: Option<PendingGrant>,
    /// The CPU grant's cache START settled (see `cache_sync`), so its END
    /// is owed when the access ends.
    pub owes_cache_end: bool,
    /// Its cache sync START runs on a blocking thread now: should the
    /// access go meanwhile, the END it will owe holds back the buffer's
    /// grants (see `State::cache_sync_left`).
    pub starting: bool,
    pub sync_file: Option<Arc<HeldFd>>,
    /// The accountable uid whose `State::fences_awaited` counts the
    /// sync_file, while it is kept.
    pub awaited_for: Option<u32>,
    pub deadline: Option<Instant>,
    /// Its word in the client's end-word page, while it may end there.
    pub end_slot: Option<dmabroker_ipc::endwords::EndSlot>,
    /// Held as a bit in the buffer's word: the word, not a message, says
    /// when it ends.
    pub word_bit: Option<super::words::WordBit>,
}

impl AccessEntry {
    /// A granted access as it starts out: nothing pending, no cache sync
    /// owed, no fence handed over, no deadline, and ending by message.
    pub fn new(
        client: ClientId,
        buffer: BufferId,
        kind: dmabroker_ipc::Access,
        autofence: bool,
        request_id: u64,
    ) -> AccessEntry {
        AccessEntry {
            client,
            buffer,
            kind,
            autofence,
            request_id,
            pending: None,
            owes_cache_end: false,
            starting: false,
            sync_file: None,
            awaited_for: None,
            deadline: None,
            end_slot: None,
            word_bit: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct PendingGrant {
    pub grant: dmabroker_ipc::Grant,
    pub since: Instant,
}

/// A client going while its teardown runs: its hang-up (`buffer` `None`)
/// or its free of `buffer`. Nothing is granted to it there, whatever the
/// teardown serves (see `State::deliver_grants`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Leaving {
    pub(super) client: ClientId,
    pub(super) buffer: Option<BufferId>,
}

#[derive(Debug)]
pub struct WaiterEntry {
    pub client: ClientId,
    pub request_id: u64,
    pub since: Instant,
    pub deadline: Option<Instant>,
    /// It was told `Planned` at least once: a grant by message must then
    /// not set its bit in the word, or it could take that grant for the
    /// hand-off (see `words`).
    pub ever_planned: bool,
}

/// A client to tell when a fence ends (`FenceSignalled`): it was listed
/// the fence without a sync_file by `grants` of its no-autofence grants.
/// One event is owed however many list it, but each grant counts: a grant
/// withdrawn before it was sent (a `Cancel`, a timeout, a free while it
/// was parked) takes back its own subscription at once, and the others'
/// stay (see `State::unsubscribe_unsent`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Subscriber {
    pub client: ClientId,
    /// Its grants listing the fence; a sent one keeps its count until the
    /// fence ends (the client was told to wait for it).
    pub grants: u32,
}

/// Limits that do not come from the policy but protect the daemon itself.
#[derive(Debug, Clone)]
pub struct DaemonLimits {
    pub max_connections: usize,
    /// Consecutive malformed messages before a client is disconnected.
    pub max_protocol_errors: u32,
    /// How long a connection may go without a hello (`--hello-timeout`).
    pub hello_timeout: std::time::Duration,
}

impl Default for DaemonLimits {
    fn default() -> Self {
        DaemonLimits {
            max_connections: 4096,
            max_protocol_errors: 8,
            hello_timeout: std::time::Duration::from_secs(10),
        }
    }
}

#[derive(Debug)]
pub struct State {
    pub arbiter: Arbiter,
    /// Shared with the threads that carry out allocations which may block.
    pub heaps: Arc<HeapRegistry>,
    pub policy: Arc<Policy>,
    pub clients: FxHashMap<ClientId, ClientEntry>,
    pub buffers: FxHashMap<BufferId, BufferEntry>,
    pub tokens: HashMap<ShareToken, TokenEntry>,
    /// The token each holder exported for a buffer (at most one).
    pub exports: FxHashMap<(BufferId, ClientId), ShareToken>,
    pub accesses: FxHashMap<AccessId, AccessEntry>,
    pub waiters: FxHashMap<WaiterId, WaiterEntry>,
    /// Clients to tell when a fence without kernel backing ends.
    pub fence_subscribers: FxHashMap<AccessId, Vec<Subscriber>>,
    /// For each accountable uid, its accesses ended with a sync_file whose
    /// fence has not signalled, connections gone included: each keeps the
    /// sync_file open here (two fds), and an access handed to its device
    /// no longer counts among its client's, so this is what bounds them
    /// (see `access::State::end_with_fence`).
    pub(super) fences_awaited: FxHashMap<u32, usize>,
    /// For each accountable uid (`Peer::accountable_uid`) holding or
    /// allocating anything, what `max_uid_buffers` counts (see [`UidHeld`]).
    /// Kept where a connection's `buffers` or `allocating` change and
    /// where an orphaned hold is taken back, re-attached or dropped;
    /// [`State::check_uid_held`] counts it again from the tables.
    pub(super) uid_held: FxHashMap<u32, UidHeld>,
    /// Dma-bufs with cache sync ENDs running off the broker's thread, and
    /// the grants each holds back (see `access::State::park_behind_cache_end`).
    pub(super) cache_ends: FxHashMap<BufferId, super::access::CacheEnds>,
    pub stats: Stats,
    pub limits: DaemonLimits,
    pub instance: String,
    pub started: SystemTime,
    /// The service manager's fd store, when there is one.
    pub fd_store: Option<Arc<crate::service::fdstore::FdStore>>,
    /// Wakes the task that rewrites the stored record (debounced).
    pub persist_wanted: Arc<tokio::sync::Notify>,
    /// Goes up whenever a connection's `recorded_as` changes: a record
    /// copied a chunk at a time across such a change would name one
    /// connection's holds by two ids (see `daemon::copy_record`).
    recorded_as_epoch: u64,
    /// For each connection from before the restart, the buffers the
    /// restore gave an orphaned hold of it: [`State::awaiting`] looks at
    /// these only, not at every buffer (it runs on every allocation and
    /// re-attach of a connection re-attaching, during the grace period).
    /// Never fewer than those that still have one (such holds are made
    /// only by the restore); a buffer whose hold was re-attached or
    /// freed may stay, and is passed over. Emptied at the grace
    /// period's end.
    pub(super) awaiting_index: HashMap<ClientId, BTreeSet<BufferId>>,
    /// The daemon is stopping: no more client messages are handled, so
    /// that the last record of the table holds everything clients were
    /// told (see `connection::serve`).
    pub stopping: bool,
    notices: NoticeSender,
    next_client: ClientId,
    next_buffer: BufferId,
    actions: Vec<Action>,
    /// The timers and waits started for each access and waiter, aborted
    /// when it goes: a sleeping task must not outlive what it is for.
    tasks: FxHashMap<TaskOwner, Vec<tokio::task::AbortHandle>>,
    /// Every outgoing message is encoded here; the outbox copies it only if
    /// it has to queue it.
    encoded: Vec<u8>,
    /// Buffers whose words the broker arbitrates and that a decision
    /// touched: after the decision, each is handed back or planned.
    pub(super) touched: Vec<BufferId>,
    /// The running word patrol's number (see `words::WORD_PATROL`), if one
    /// runs: a patrol task stopped while it waited for the lock finds
    /// another number and does nothing.
    pub(super) word_patrol: Option<u64>,
    pub(super) word_patrols_started: u64,
    /// Allocations being carried out off the broker's thread, every
    /// client's (see `ClientEntry::allocating`).
    pub(super) allocations_in_flight: usize,
    pub(super) allocations_started: u64,
    /// Threads carrying out allocations, those of clients gone included
    /// (see `allocate::MAX_ALLOCATIONS_RUNNING`).
    pub(super) allocations_running: Arc<std::sync::atomic::AtomicUsize>,
    /// The client whose hang-up or free runs now, if one does.
    pub(super) leaving: Option<Leaving>,
}

impl State {
    pub fn new(heaps: HeapRegistry, policy: Policy, limits: DaemonLimits) -> Self {
        let instance = ShareToken::random()
            .map(|t| t.to_string())
            .unwrap_or_else(|_| format!("pid{}", std::process::id()));
        State {
            arbiter: Arbiter::new(),
            heaps: Arc::new(heaps),
            policy: Arc::new(policy),
            clients: FxHashMap::default(),
            buffers: FxHashMap::default(),
            tokens: HashMap::new(),
            exports: FxHashMap::default(),
            accesses: FxHashMap::default(),
            waiters: FxHashMap::default(),
            fence_subscribers: FxHashMap::default(),
            fences_awaited: FxHashMap::default(),
            uid_held: FxHashMap::default(),
            cache_ends: FxHashMap::default(),
            stats: Stats::default(),
            limits,
            instance,
            started: SystemTime::now(),
            fd_store: None,
            persist_wanted: Arc::new(tokio::sync::Notify::new()),
            recorded_as_epoch: 0,
            awaiting_index: HashMap::new(),
            stopping: false,
            notices: tokio::sync::broadcast::channel(NOTICE_BACKLOG).0,
            next_client: 1,
            next_buffer: 1,
            actions: Vec::new(),
            tasks: FxHashMap::default(),
            encoded: Vec::with_capacity(256),
            touched: Vec::new(),
            word_patrol: None,
            word_patrols_started: 0,
            allocations_in_flight: 0,
            allocations_started: 0,
            allocations_running: Arc::default(),
            leaving: None,
        }
    }

    /// Observers subscribe here; see [`Notice`].
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Notice> {
        self.notices.subscribe()
    }

    pub(super) fn notice(&self, notice: Notice) {
        if self.notices.receiver_count() > 0 {
            let _ = self.notices.send(notice);
        }
    }

    pub(super) fn defer(&mut self, action: Action) {
        self.actions.push(action);
    }

    pub(super) fn take_actions(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.actions)
    }

    /// Keeps a started action's task, to abort it with its owner. An owner
    /// already gone (the action outlived it within one locked step) has it
    /// aborted at once.
    pub(super) fn adopt_task(&mut self, owner: TaskOwner, task: tokio::task::AbortHandle) {
        let alive = match owner {
            TaskOwner::Access(id) => self.accesses.contains_key(&id),
            TaskOwner::Waiter(id) => self.waiters.contains_key(&id),
            TaskOwner::WordPatrol => self.word_patrol.is_some(),
            TaskOwner::Allocation { client, number } => self
                .clients
                .get(&client)
                .is_some_and(|c| c.allocating.iter().any(|a| a.number == number)),
        };
        if alive {
            self.tasks.entry(owner).or_default().push(task);
        } else {
            task.abort();
        }
    }

    /// Removes an access and stops its timers and waits (not a cache sync
    /// START it has running: see `State::cache_sync_left`).
    pub(super) fn remove_access(&mut self, id: AccessId) -> Option<AccessEntry> {
        self.abort_tasks(TaskOwner::Access(id));
        let entry = self.accesses.remove(&id)?;
        self.cache_sync_left(id, &entry);
        self.unsubscribe_unsent(&entry);
        if let Some(uid) = entry.awaited_for {
            if let Some(count) = self.fences_awaited.get_mut(&uid) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    self.fences_awaited.remove(&uid);
                }
            }
        }
        Some(entry)
    }

    /// Removes a waiter and stops its timeout (and the word patrol, if it
    /// was the last thing the patrol watched for).
    pub(super) fn remove_waiter(&mut self, id: WaiterId) -> Option<WaiterEntry> {
        self.abort_tasks(TaskOwner::Waiter(id));
        let entry = self.waiters.remove(&id);
        self.stop_word_patrol_if_idle();
        entry
    }

    pub(super) fn abort_tasks(&mut self, owner: TaskOwner) {
        for task in self.tasks.remove(&owner).into_iter().flatten() {
            task.abort();
        }
    }

    /// Forgets the tasks of `owner`, which are done (one is running its
    /// last step): nothing is left of them to abort.
    pub(super) fn tasks_done(&mut self, owner: TaskOwner) {
        self.tasks.remove(&owner);
    }

    /// Timers and waits in flight (tests: none may outlive its owner).
    pub fn task_count(&self) -> usize {
        self.tasks.values().map(Vec::len).sum()
    }

    /// Whether `client` has said hello (a client gone counts as having:
    /// there is nothing left to close).
    pub fn said_hello(&self, client: ClientId) -> bool {
        self.clients.get(&client).is_none_or(|c| c.hello_done)
    }

    pub fn connection_count(&self) -> usize {
        self.clients.len()
    }

    pub fn total_bytes(&self) -> u64 {
        self.buffers.values().map(|b| b.size).sum()
    }

    pub fn total_charged(&self) -> u64 {
        self.clients.values().map(|c| c.charged_bytes).sum()
    }

    /// Client ids from here on are at least `next`: a restored record's
    /// holds name the connections of earlier instances by their ids, and
    /// a new connection must not be taken for one of them.
    /// Never beyond `MAX_CLIENT_ID + 1` (see [`MAX_CLIENT_ID`]).
    pub(super) fn bump_next_client_id(&mut self, next: ClientId) {
        self.next_client = self.next_client.max(next.min(MAX_CLIENT_ID + 1));
    }

    /// A connection that took over the id of one from before the restart
    /// (`gone`, disconnected) hands it to another connection re-attaching
    /// that one's holds (a client's next connection, come while this one
    /// was still open), so that the holds both re-attached and those
    /// still waiting stay one connection's in the next record. Safe for
    /// the limits: that connection counts the holds still waiting as its
    /// own (see `check_quota`).
    fn hand_on_recorded_id(&mut self, gone: &ClientEntry) {
        if gone.recorded_as == gone.id {
            return;
        }
        let next = self
            .clients
            .values_mut()
            .filter(|c| {
                c.reattaching == Some(Before::Client(gone.recorded_as)) && c.recorded_as == c.id
            })
            .min_by_key(|c| c.id);
        if let Some(next) = next {
            next.recorded_as = gone.recorded_as;
            self.recorded_as_changed();
        }
    }

    /// One more hold of `buffer` counts for `uid` (see `uid_held`).
    pub(super) fn uid_hold_taken(&mut self, uid: u32, buffer: BufferId) {
        *self
            .uid_held
            .entry(uid)
            .or_default()
            .buffers
            .entry(buffer)
            .or_insert(0) += 1;
    }

    /// A hold of `buffer` counted for `uid` is gone; the buffer stops
    /// counting with the uid's last hold of it, and the uid's entry with
    /// its last buffer or allocation.
    pub(super) fn uid_hold_gone(&mut self, uid: u32, buffer: BufferId) {
        let Some(held) = self.uid_held.get_mut(&uid) else {
            return;
        };
        if let Some(holds) = held.buffers.get_mut(&buffer) {
            *holds = holds.saturating_sub(1);
            if *holds == 0 {
                held.buffers.remove(&buffer);
            }
        }
        if held.count() == 0 {
            self.uid_held.remove(&uid);
        }
    }

    /// `started` allocations of `uid`'s connections are being carried out
    /// now, and `ended` no longer are (answered, or their client gone).
    pub(super) fn uid_allocations(&mut self, uid: u32, started: usize, ended: usize) {
        let held = self.uid_held.entry(uid).or_default();
        held.allocating = (held.allocating + started as u64).saturating_sub(ended as u64);
        if held.count() == 0 {
            self.uid_held.remove(&uid);
        }
    }

    /// What `max_uid_buffers` counts for `uid` now (see [`UidHeld`]).
    pub fn uid_held(&self, uid: u32) -> Option<&UidHeld> {
        self.uid_held.get(&uid)
    }

    /// `uid_held` as the tables say it should be, counted from scratch:
    /// the holds of every connection under its accountable uid, every
    /// orphaned hold under the uid it counts for, and the allocations
    /// being carried out. An error names the first difference. For tests
    /// (the request sequences check it after every step): it looks at
    /// every hold.
    pub fn check_uid_held(&self) -> Result<(), String> {
        let mut expected: FxHashMap<u32, UidHeld> = FxHashMap::default();
        for c in self.clients.values() {
            let held = expected.entry(c.peer.accountable_uid).or_default();
            for buffer in &c.buffers {
                *held.buffers.entry(*buffer).or_insert(0) += 1;
            }
            held.allocating += c.allocating.len() as u64;
        }
        for b in self.buffers.values() {
            for h in &b.holders {
                if let (super::ORPHAN, Some(uid)) = (h.client, h.counted_for) {
                    *expected
                        .entry(uid)
                        .or_default()
                        .buffers
                        .entry(b.id)
                        .or_insert(0) += 1;
                }
            }
        }
        expected.retain(|_, held| held.count() > 0);
        if expected == self.uid_held {
            return Ok(());
        }
        let mut uids: Vec<u32> = expected
            .keys()
            .chain(self.uid_held.keys())
            .copied()
            .collect();
        uids.sort_unstable();
        uids.dedup();
        for uid in uids {
            let (want, kept) = (expected.get(&uid), self.uid_held.get(&uid));
            if want != kept {
                return Err(format!(
                    "uid {uid}: the tables hold {want:?}, max_uid_buffers counts {kept:?}"
                ));
            }
        }
        Ok(())
    }

    /// Registers a new connection. Its limits come from the policy now and
    /// again after every reload. Refused, not given an id that wrapped,
    /// once every id up to [`MAX_CLIENT_ID`] is used: a wrapped id would
    /// be `ORPHAN` or a live connection's.
    pub fn connect(
        &mut self,
        peer: Peer,
        outbox: Arc<Outbox>,
    ) -> Result<ClientId, ClientIdsExhausted> {
        let id = self.next_client;
        self.next_client = id
            .checked_add(1)
            .filter(|_| id <= MAX_CLIENT_ID)
            .ok_or(ClientIdsExhausted { next: id })?;
        let resolved = self.policy.resolve(&peer.identity);
        outbox.set_cap(resolved.limits.max_unread_replies as usize);
        tracing::info!(
            client = id,
            uid = peer.identity.uid,
            pid = peer.pid,
            exe = %crate::identity::exe_display(&peer.identity.exe),
            rule = %resolved.rule,
            "client connected"
        );
        self.notice(Notice::ClientConnected {
            client: id,
            uid: peer.identity.uid,
            pid: peer.pid,
        });
        self.clients.insert(
            id,
            ClientEntry {
                id,
                peer,
                name: String::new(),
                hello_done: false,
                autofence: true,
                resolved,
                outbox,
                buffers: BTreeSet::new(),
                charged_bytes: 0,
                held_bytes: 0,
                allocating: Vec::new(),
                protocol_errors: 0,
                connected: SystemTime::now(),
                end_page: None,
                buffer_words: false,
                cancel: false,
                reattaching: None,
                recorded_as: id,
                took_new: false,
            },
        );
        Ok(id)
    }

    /// Swaps in a new policy: connected clients get its limits for new
    /// requests; what they already hold stays valid.
    pub fn replace_policy(&mut self, policy: Policy) {
        self.policy = Arc::new(policy);
        for client in self.clients.values_mut() {
            client.resolved = self.policy.resolve(&client.peer.identity);
            client
                .outbox
                .set_cap(client.resolved.limits.max_unread_replies as usize);
        }
    }

    /// The next buffer id, or none when every id up to [`MAX_BUFFER_ID`]
    /// is used (only a record or a store name from outside can bring the
    /// count there: see `bump_next_buffer_id`). Refused rather than
    /// wrapped: a wrapped id would name, and overwrite, a live buffer.
    pub(super) fn allocate_buffer_id(&mut self) -> Result<BufferId, IdsExhausted> {
        let id = self.next_buffer;
        let next = id
            .checked_add(1)
            .filter(|_| id <= MAX_BUFFER_ID)
            .ok_or(IdsExhausted { next: id })?;
        self.next_buffer = next;
        Ok(id)
    }

    pub(super) fn peek_next_buffer_id(&self) -> BufferId {
        self.next_buffer
    }

    /// Ids of a previous instance's buffers are never handed out again.
    /// Never beyond `MAX_BUFFER_ID + 1`: the callers take only ids up to
    /// [`MAX_BUFFER_ID`] for ours (see `service::inherited::buffer_id_of`).
    pub fn bump_next_buffer_id(&mut self, next: BufferId) {
        self.next_buffer = self.next_buffer.max(next.min(MAX_BUFFER_ID + 1));
    }

    /// How many times a connection's `recorded_as` changed (see
    /// `recorded_as_epoch`).
    pub fn recorded_as_epoch(&self) -> u64 {
        self.recorded_as_epoch
    }

    /// A connection's `recorded_as` changed: a record being copied must
    /// start again, and a new one is wanted.
    pub(super) fn recorded_as_changed(&mut self) {
        self.recorded_as_epoch = self.recorded_as_epoch.wrapping_add(1);
        self.persist_changed();
    }

    /// The buffer table changed in a way the stored record must reflect.
    pub(super) fn persist_changed(&self) {
        if self.fd_store.is_some() {
            self.persist_wanted.notify_one();
        }
    }

    /// A new buffer goes into the fd store at once (after any that could
    /// not go in before); the record follows.
    pub(super) fn store_buffer(&self, buffer: BufferId) {
        self.retry_buffer_stores();
        if let (Some(store), Some(entry)) = (&self.fd_store, self.buffers.get(&buffer)) {
            store.store_buffer(buffer, entry.fd.as_fd());
        }
    }

    /// Sends again the buffers that could not be put in the fd store (and
    /// the removals that failed), without waiting; returns how many
    /// buffers are still out.
    pub fn retry_buffer_stores(&self) -> usize {
        match &self.fd_store {
            Some(store) => store.retry_stores(|id| self.buffers.get(&id).map(|e| e.fd.as_fd())),
            None => 0,
        }
    }

    /// The record writer's sends: `sent` are in the fd store, `unsent` out
    /// of it still. Removals of those freed meanwhile, held back until
    /// now so as not to overtake the late stores, go out.
    pub fn buffers_sent(&self, sent: &[BufferId], unsent: &[BufferId]) {
        if let Some(store) = &self.fd_store {
            store.finish_batch(sent, unsent);
        }
    }

    /// Buffers still out of the fd store, and removals still owed (see
    /// `FdStore::owed_removals`): what the record's writer has left to do.
    pub fn buffers_out_of_store(&self) -> usize {
        self.fd_store
            .as_ref()
            .map_or(0, |store| store.unstored_count() + store.owed_removals())
    }

    /// Sends one message to a client; a client whose queue overflows is
    /// shut down (its connection task then cleans up).
    pub(super) fn send(
        &mut self,
        client: ClientId,
        message: &ServerMessage,
        fds: Vec<Arc<HeldFd>>,
    ) {
        let Some(entry) = self.clients.get(&client) else {
            return;
        };
        let mut fds = fds;
        if let Err(err) = encode_server_message_into(message, &mut self.encoded) {
            tracing::error!(client, error = %err, "cannot encode a message for a client");
            // A reply must still answer its request, or its client waits
            // forever. (Replies are bounded so that this is not reached:
            // error texts by `reply`, grants by the per-buffer access cap.)
            let ServerMessage::Reply(reply) = message else {
                return;
            };
            let fallback = ServerMessage::Reply(Reply {
                id: reply.id,
                fds: 0,
                result: Err(WireError::new(
                    ErrorCode::Internal,
                    format!("the reply could not be sent: {err}"),
                )),
            });
            if encode_server_message_into(&fallback, &mut self.encoded).is_err() {
                return;
            }
            fds = Vec::new();
        }
        // Once the client has a file, it can stall its release: let go of
        // on a thread of its user's too (`held_files`).
        for fd in &fds {
            fd.sent_to(entry.peer.accountable_uid);
        }
        let sent = match message {
            ServerMessage::Event(_) => entry.outbox.send_event(&self.encoded),
            ServerMessage::Reply(_) => entry.outbox.send(&self.encoded, fds),
        };
        match sent {
            Ok(()) => {}
            Err(err @ crate::outbox::OutboxError::Overflow(_)) => {
                tracing::warn!(client, error = %err, "client not reading its replies; disconnecting it");
            }
            Err(crate::outbox::OutboxError::Send(err)) if crate::outbox::is_fd_shortage(&err) => {
                tracing::error!(client, error = %err, "cannot pass fds to a client; disconnecting it");
            }
            Err(err) => {
                tracing::debug!(client, error = %err, "message to a departing client dropped")
            }
        }
    }

    pub(super) fn reply(
        &mut self,
        client: ClientId,
        id: u64,
        result: Result<ReplyBody, WireError>,
        fds: Vec<Arc<HeldFd>>,
    ) {
        if let Err(err) = &result {
            self.stats.refused(err.code);
        }
        self.reply_uncounted(client, id, result, fds);
    }

    /// [`State::reply`], not counted among the refusals whatever it says:
    /// for an answer the broker sends because it cannot tell whether the
    /// request is still waiting (see `words::State::record_hand_off`).
    pub(super) fn reply_uncounted(
        &mut self,
        client: ClientId,
        id: u64,
        result: Result<ReplyBody, WireError>,
        fds: Vec<Arc<HeldFd>>,
    ) {
        let result = result.map_err(shorten_error_text);
        let message = ServerMessage::Reply(Reply {
            id,
            fds: fds.len() as u8,
            result,
        });
        self.send(client, &message, fds);
    }

    pub(super) fn event(&mut self, client: ClientId, event: Event) {
        let message = ServerMessage::Event(EventMessage { fds: 0, event });
        self.send(client, &message, Vec::new());
    }

    /// Adds `client` as a holder of `buffer`, returning its re-attach secret.
    pub(super) fn add_holder(&mut self, buffer: BufferId, client: ClientId) -> String {
        let secret = ShareToken::random()
            .map(|t| t.to_string())
            .unwrap_or_default();
        let mut size = 0;
        if let Some(entry) = self.buffers.get_mut(&buffer) {
            entry.holders.push(Holder {
                client,
                secret: secret.clone(),
                since: SystemTime::now(),
                word_index: None,
                restored_uid: None,
                restored_client: None,
                counted_for: None,
            });
            size = entry.size;
        }

        let mut counted_for = None;
        if let Some(c) = self.clients.get_mut(&client) {
            if c.buffers.insert(buffer) {
                c.held_bytes += size;
                counted_for = Some(c.peer.accountable_uid);
            }
            c.took_new = true;
        }
        if let Some(uid) = counted_for {
            self.uid_hold_taken(uid, buffer);
        }
        self.persist_changed();
        secret
    }

    /// Drops `client`'s hold on `buffer` (its accesses on it must already be
    /// released). The last holder's release frees the buffer; an owner's
    /// release moves the charge to the longest-standing remaining holder, so
    /// the sum of charges always equals the bytes of live buffers.
    pub(super) fn release_hold(&mut self, client: ClientId, buffer: BufferId) {
        let size = self.buffers.get(&buffer).map_or(0, |b| b.size);
        let mut counted_for = None;
        if let Some(c) = self.clients.get_mut(&client) {
            if c.buffers.remove(&buffer) {
                c.held_bytes = c.held_bytes.saturating_sub(size);
                counted_for = Some(c.peer.accountable_uid);
            }
        }
        if let Some(uid) = counted_for {
            self.uid_hold_gone(uid, buffer);
        }
        // A token dies with its exporter's hold.
        if let Some(token) = self.exports.remove(&(buffer, client)) {
            self.tokens.remove(&token);
        }
        self.retire_word_index(buffer, client);
        let Some(entry) = self.buffers.get_mut(&buffer) else {
            return;
        };
        entry.holders.retain(|h| h.client != client);
        let size = entry.size;
        if entry.owner == client {
            if let Some(c) = self.clients.get_mut(&client) {
                c.charged_bytes = c.charged_bytes.saturating_sub(size);
            }
            if let Some(next) = entry.holders.first().map(|h| h.client) {
                entry.owner = next;
                if let Some(c) = self.clients.get_mut(&next) {
                    c.charged_bytes += size;
                }
            }
        }
        if entry.holders.is_empty() {
            self.free_buffer(buffer);
        }
        self.persist_changed();
    }

    fn free_buffer(&mut self, buffer: BufferId) {
        let (fences, waiters) = self.arbiter.remove_buffer(buffer);
        for fence in fences {
            if let Some(entry) = self.remove_access(fence.id) {
                self.release_end_slot(entry.client, entry.end_slot);
            }
            self.fence_ended(fence.id);
        }
        for waiter in waiters {
            self.remove_waiter(waiter.id);
        }
        if let Some(entry) = self.buffers.remove(&buffer) {
            if self.cache_ends_running_on(buffer) {
                // A cache sync's copy of the fd keeps the file (and its
                // pages) until the sync returns, and its close is handed
                // over only then: an allocation started meanwhile must
                // wait for it as for a close handed over now.
                entry.fd.take_close_ticket();
            }
            if let Some(store) = &self.fd_store {
                store.remove_buffer(buffer);
                // The manager's copy goes when it reads the removal: a
                // dma-buf's closing thread waits for that, so that the
                // last release is never PID 1's.
                if matches!(entry.fd.release(), Release::OnThreadOf { .. }) {
                    let store = Arc::clone(store);
                    let name = crate::service::fdstore::buffer_name(buffer);
                    entry.fd.first_wait_for(Box::new(move || {
                        store.await_removal(&name, Instant::now() + STORE_LET_GO)
                    }));
                }
            }
            self.stats.frees += 1;
            self.notice(Notice::BufferFreed { buffer });
            tracing::debug!(buffer, size = entry.size, heap = %entry.heap, "buffer freed");
            // Its pages go back at the last close of its file, which its
            // `HeldFd` makes where it must (`held_files`): not on this
            // thread for a big memfd or any dma-buf. A queued reply may
            // still hold a copy and make that close when it goes. The
            // word's mapping goes first: unmapped after, it could be what
            // holds the file last, here.
            let BufferEntry { fd, word, .. } = entry;
            drop(word);
            drop(fd);
        }
    }

    /// A grant never sent leaves (withdrawn, or dropped by a free or a
    /// hang-up while it was held back): the subscriptions it made for the
    /// fences it lists without a sync_file go with it, at once. They were
    /// kept once per client and fence, so they stayed until each fence
    /// ended: an event for a fence the client was never told of, and the
    /// fence counted as watched meanwhile (its end by message, its
    /// buffer's word kept taken). Another grant of the client listing the
    /// same fence keeps its own.
    fn unsubscribe_unsent(&mut self, entry: &AccessEntry) {
        let Some(pending) = &entry.pending else {
            return;
        };
        let mut unwatched = false;
        for listed in pending
            .grant
            .fences
            .iter()
            .filter(|f| f.sync_file_slot.is_none())
        {
            let Some(subscribers) = self.fence_subscribers.get_mut(&listed.id) else {
                continue;
            };
            if let Some(at) = subscribers.iter().position(|s| s.client == entry.client) {
                subscribers[at].grants = subscribers[at].grants.saturating_sub(1);
                if subscribers[at].grants == 0 {
                    subscribers.remove(at);
                }
            }
            if subscribers.is_empty() {
                self.fence_subscribers.remove(&listed.id);
                unwatched = true;
                // Its buffer's word may go back now (see `only_bits_left`).
                if let Some(buffer) = self.accesses.get(&listed.id).map(|a| a.buffer) {
                    self.touched.push(buffer);
                }
            }
        }
        if unwatched {
            self.stop_word_patrol_if_idle();
        }
    }

    /// Tells no-autofence clients that a fence they were handed has ended.
    pub(super) fn fence_ended(&mut self, fence: AccessId) {
        if let Some(subscribers) = self.fence_subscribers.remove(&fence) {
            for subscriber in subscribers {
                self.event(subscriber.client, Event::FenceSignalled { fence });
            }
            self.stop_word_patrol_if_idle();
        }
    }

    /// Everything a disconnected client held is released: CPU accesses at
    /// once, kernel-fenced device accesses when their fence signals, queued
    /// requests dropped, holds dropped (freeing buffers nobody else holds).
    pub fn disconnect(&mut self, client: ClientId) {
        let outer = self.leaving.replace(Leaving {
            client,
            buffer: None,
        });
        self.tear_down(client);
        self.leaving = outer;
    }

    /// [`State::disconnect`], while nothing may be granted to `client`.
    fn tear_down(&mut self, client: ClientId) {
        // Its queued begins go before anything settles, which could grant
        // them to it (nobody reads the answers now).
        self.take_out_waiters_of(client, None, |_| None);
        let now = Instant::now();
        // Its accesses held in buffer words become fences first (a write
        // among them is a lost one), and plans for it are cancelled.
        let in_words: Vec<BufferId> = self
            .clients
            .get(&client)
            .map(|c| {
                c.buffers
                    .iter()
                    .copied()
                    .filter(|b| self.index_of(*b, client).is_some())
                    .collect()
            })
            .unwrap_or_default();
        for buffer in in_words {
            self.take_over_word(buffer, now, false);
            self.settle_buffer(buffer, false, now);
        }
        self.settle_client(client, None);
        // A write it was never sent (held back) is no lost one.
        let lost_writes: Vec<BufferId> = self
            .accesses
            .values()
            .filter(|a| a.client == client && a.kind.is_write() && a.sync_file.is_none())
            .filter(|a| a.pending.is_none())
            .map(|a| a.buffer)
            .collect();
        for buffer in lost_writes {
            self.notice(Notice::WriterLost { buffer, client });
        }
        let unsent = self.unsent_grants(client, None);
        let gone = self.arbiter.client_gone(client, now, &unsent);
        self.finish_released(&gone.released);
        for waiter in &gone.cancelled_waiters {
            self.remove_waiter(*waiter);
        }
        let writer_lost = gone.grants.iter().filter(|g| g.writer_lost).count();
        self.deliver_grants(gone.grants);
        let Some(entry) = self.clients.get(&client) else {
            return;
        };
        let buffers: Vec<BufferId> = entry.buffers.iter().copied().collect();
        for buffer in buffers {
            self.release_hold(client, buffer);
        }
        // A fence nobody else waits for goes from the map: its key alone
        // counts it as watched (its end sent as a message, its buffer's
        // word kept taken).
        // Its buffer's word may go back now (see `only_bits_left`): the
        // client may have no access there left whose release marks it.
        let (accesses, touched) = (&self.accesses, &mut self.touched);
        self.fence_subscribers.retain(|fence, subscribers| {
            subscribers.retain(|s| s.client != client);
            let watched = !subscribers.is_empty();
            if !watched {
                touched.extend(accesses.get(fence).map(|a| a.buffer));
            }
            watched
        });
        self.stop_word_patrol_if_idle();
        self.abandon_allocations(client);
        if let Some(entry) = self.clients.remove(&client) {
            self.hand_on_recorded_id(&entry);
            // Not `close`: its queue may hold the last copies of freed
            // buffers, not to be freed under the broker's lock. The
            // connection's task drops it.
            entry.outbox.stop();
            self.notice(Notice::ClientDisconnected { client });
            tracing::info!(
                client,
                pid = entry.peer.pid,
                released = gone.released.len(),
                writer_lost,
                "client disconnected"
            );
        }
    }
}

/// The most of an error's text a reply carries. Refusals quote what was
/// asked for (a heap name, a token), and a request near the size limit
/// must still get an answer that fits.
const MAX_ERROR_TEXT: usize = 1024;

fn shorten_error_text(mut err: WireError) -> WireError {
    if err.message.len() > MAX_ERROR_TEXT {
        let mut end = MAX_ERROR_TEXT;
        while !err.message.is_char_boundary(end) {
            end -= 1;
        }
        err.message.truncate(end);
        err.message.push('…');
    }
    err
}
