//! dmabroker's fence rules: one reader-writer reservation per shared buffer,
//! as a pure state machine.
//!
//! The daemon owns all I/O (sockets, sync_file polling, timers) and calls
//! into an [`Arbiter`] under its own mutex. Keeping the rules free of I/O
//! and of the clock (every operation that can grant takes `now` from the
//! caller) is what lets them be tested exhaustively against a reference
//! model, and keeps the time spent under that mutex short and predictable:
//! each operation costs O(fences + waiters of the buffer it touches) plus
//! hash lookups, never a scan of the whole broker.
//!
//! `docs/fences.md` is the normative description of the rules and of the
//! reasons behind them; keep both in step.
#![forbid(unsafe_code)]

use std::collections::{BTreeSet, VecDeque};

// Every key here is an id the daemon hands out in sequence, so a client
// cannot pick colliding keys: the fast hash is safe, and SipHash cost about
// 4 % of an uncontended begin+end (perf, benches/broker.rs begin_end).
use rustc_hash::FxHashMap as HashMap;
use std::time::Instant;

#[cfg(test)]
mod tests;

pub type ClientId = u64;
pub type BufferId = u64;
/// Identifies a granted access. It doubles as the fence id because a granted
/// access *is* the fence other clients wait for: one name for one thing.
pub type AccessId = u64;
pub type WaiterId = u64;

/// What a client wants to do with a buffer.
///
/// The CPU/device split matters beyond the reader-writer rule: only device
/// accesses can be handed over to a kernel fence, because only hardware
/// keeps working on a buffer after its client says it is done.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    CpuRead,
    CpuWrite,
    CpuReadWrite,
    DeviceRead,
    DeviceWrite,
}

impl Access {
    /// Every access kind, for exhaustive tests and tables.
    pub const ALL: [Access; 5] = [
        Access::CpuRead,
        Access::CpuWrite,
        Access::CpuReadWrite,
        Access::DeviceRead,
        Access::DeviceWrite,
    ];

    /// Read-write counts as a write: it can change the contents, so it needs
    /// the buffer to itself just like a pure write.
    pub fn is_write(self) -> bool {
        matches!(
            self,
            Access::CpuWrite | Access::CpuReadWrite | Access::DeviceWrite
        )
    }

    pub fn is_cpu(self) -> bool {
        matches!(
            self,
            Access::CpuRead | Access::CpuWrite | Access::CpuReadWrite
        )
    }

    pub fn is_device(self) -> bool {
        !self.is_cpu()
    }

    /// Whether the two accesses may not overlap in time. Symmetric; only two
    /// reads can share, since reads never change what another one sees.
    pub fn conflicts_with(self, other: Access) -> bool {
        self.is_write() || other.is_write()
    }

    /// Stable spelling for logs and metrics (the same as the wire protocol's).
    pub fn name(self) -> &'static str {
        match self {
            Access::CpuRead => "cpu-read",
            Access::CpuWrite => "cpu-write",
            Access::CpuReadWrite => "cpu-read-write",
            Access::DeviceRead => "device-read",
            Access::DeviceWrite => "device-write",
        }
    }
}

/// Whether the broker makes the client wait for conflicting fences.
///
/// `NoAutofence` exists for clients that synchronise themselves (typically
/// by waiting on the sync_files of the outstanding fences in their own GPU
/// command stream): making them block in the broker would serialise work
/// the hardware could pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Autofence,
    NoAutofence,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FenceState {
    /// The client is still using the buffer.
    Held,
    /// The client is done, but the device it queued work on is not: the
    /// reservation lasts until the kernel fence signals.
    AwaitingKernelFence,
}

/// A snapshot of one fence, detached from the arbiter so the daemon can keep
/// it across the mutex.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FenceView {
    pub id: AccessId,
    pub buffer: BufferId,
    pub access: Access,
    pub holder: ClientId,
    pub mode: Mode,
    pub state: FenceState,
    /// When the access was granted (not when it was requested), so that hold
    /// limits measure holding, not waiting. Handing over to a kernel fence
    /// does not reset it: the device's time counts against the hold limit.
    pub since: Instant,
}

/// A snapshot of one queued request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WaiterView {
    pub id: WaiterId,
    pub buffer: BufferId,
    pub client: ClientId,
    pub access: Access,
    /// When the request was queued, for the daemon's timeouts.
    pub since: Instant,
}

/// A granted access, to be sent to its client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub access_id: AccessId,
    /// `Some` when the request had been queued, so the daemon can find the
    /// pending reply (and cancel its timeout) by the id it got from
    /// [`BeginOutcome::Queued`].
    pub waiter: Option<WaiterId>,
    pub buffer: BufferId,
    pub client: ClientId,
    pub access: Access,
    pub mode: Mode,
    /// A writer died holding the buffer since the last grant on it: the
    /// contents may be torn.
    pub writer_lost: bool,
    /// A writer was revoked (hold limit) since the last grant on it: the
    /// contents may be torn, and the revoked client may not have noticed yet.
    pub revoked: bool,
    /// `NoAutofence` only: the conflicting fences present at grant time,
    /// which the client must wait for itself. Empty for `Autofence`, whose
    /// grant already means "nothing conflicts".
    pub outstanding: Vec<FenceView>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BeginOutcome {
    Granted(Grant),
    /// The request waits in the buffer's queue; its grant will come out of
    /// a later operation carrying this id in [`Grant::waiter`].
    Queued(WaiterId),
}

#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum FenceError {
    #[error("unknown buffer {0}: it has no reservation (never added, or removed)")]
    UnknownBuffer(BufferId),
    #[error("unknown access {0}: never granted, already ended, revoked or signalled")]
    UnknownAccess(AccessId),
    #[error("access {access} is not held by client {client}")]
    NotHolder { access: AccessId, client: ClientId },
    #[error(
        "access {0} is a CPU access: only device accesses can be handed over with a kernel fence"
    )]
    NotDeviceAccess(AccessId),
    #[error(
        "access {0} was already handed over with a kernel fence: only the kernel can end it now"
    )]
    AlreadyFenced(AccessId),
    #[error("unknown waiter {0}: not queued (never was, already granted or cancelled)")]
    UnknownWaiter(WaiterId),
}

/// A grant the arbiter made whose client never heard of it (the daemon
/// held it back, for kernel fences or a cache sync) when the client died
/// or freed the buffer, with the news it took from its buffer. Its access
/// was never the client's to use: it is no lost writer, and the news goes
/// back to the buffer for the next grant instead of vanishing with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unsent {
    pub access: AccessId,
    pub writer_lost: bool,
    pub revoked: bool,
}

/// What became of a client's accesses and requests when it died or freed a
/// buffer, so the daemon can answer the new grantees and log the rest.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientGone {
    /// Grants to other clients that this unblocked, in FIFO order.
    pub grants: Vec<Grant>,
    /// Device accesses already handed over to the kernel: the hardware still
    /// uses the buffer, so these stay until [`Arbiter::kernel_fence_signalled`].
    pub kept_kernel_fences: Vec<AccessId>,
    /// Fences that were held and are now gone.
    pub released: Vec<AccessId>,
    /// Its queued requests, withdrawn.
    pub cancelled_waiters: Vec<WaiterId>,
}

/// Full record of a fence; the reservation only keeps id and access.
#[derive(Debug)]
struct Fence {
    buffer: BufferId,
    access: Access,
    holder: ClientId,
    mode: Mode,
    state: FenceState,
    since: Instant,
}

/// A fence as the reservation sees it: the access is copied here so that
/// compatibility checks scan one small vector instead of doing a hash
/// lookup per fence.
#[derive(Clone, Copy, Debug)]
struct Slot {
    id: AccessId,
    access: Access,
}

#[derive(Debug)]
struct Waiter {
    id: WaiterId,
    client: ClientId,
    access: Access,
    since: Instant,
}

#[derive(Debug, Default)]
struct Reservation {
    /// In grant order, which is id order: views come out sorted for free.
    fences: Vec<Slot>,
    queue: VecDeque<Waiter>,
    /// Sticky until the next grant batch, so that the news reaches whoever
    /// touches the buffer next, even if nobody was waiting when it happened.
    writer_lost: bool,
    revoked: bool,
}

/// Per-client index so that `client_gone`, `held_by` and `waiting_for` do not
/// scan every buffer. Ordered sets keep the ids in creation order, which
/// makes the lists returned to the daemon deterministic.
#[derive(Debug, Default)]
struct ClientIndex {
    held: BTreeSet<AccessId>,
    awaiting: BTreeSet<AccessId>,
    waiting: BTreeSet<WaiterId>,
    /// The client hung up: drop the index once it is empty. A live client's
    /// index stays even when empty, so a begin+end cycle does not allocate
    /// and free it (and its sets' nodes) every time.
    gone: bool,
}

impl ClientIndex {
    fn is_empty(&self) -> bool {
        self.held.is_empty() && self.awaiting.is_empty() && self.waiting.is_empty()
    }
}

/// A waiter taken off its queue in a serving pass, not yet turned into a
/// fence. Installing is separate so that passes over several buffers can be
/// merged into one FIFO order before ids are handed out.
#[derive(Debug)]
struct Pending {
    buffer: BufferId,
    waiter: Waiter,
    writer_lost: bool,
    revoked: bool,
}

/// The whole fence state of the broker.
#[derive(Debug)]
pub struct Arbiter {
    /// One counter for accesses and waiters alike: an id can never be taken
    /// for the other kind, and stale ids held by the daemon (say, a timeout
    /// for a waiter granted since) can never hit something new.
    next_id: u64,
    buffers: HashMap<BufferId, Reservation>,
    fences: HashMap<AccessId, Fence>,
    waiters: HashMap<WaiterId, BufferId>,
    clients: HashMap<ClientId, ClientIndex>,
}

impl Default for Arbiter {
    fn default() -> Self {
        Self::new()
    }
}

/// Whether `access` may be granted next to fences summarised as "some write
/// among them" and "how many": reads only need no writer, a write needs
/// the buffer to itself.
fn admits(access: Access, has_write: bool, count: usize) -> bool {
    if access.is_write() {
        count == 0
    } else {
        !has_write
    }
}

impl Arbiter {
    pub fn new() -> Self {
        Arbiter {
            // 0 is never handed out, so the daemon may use it as "none".
            next_id: 1,
            buffers: HashMap::default(),
            fences: HashMap::default(),
            waiters: HashMap::default(),
            clients: HashMap::default(),
        }
    }

    /// Gives the buffer an empty reservation. Adding a known buffer again
    /// changes nothing: replacing its reservation would silently forget
    /// fences that clients still hold.
    pub fn add_buffer(&mut self, buffer: BufferId) {
        self.buffers.entry(buffer).or_default();
    }

    pub fn has_buffer(&self, buffer: BufferId) -> bool {
        self.buffers.contains_key(&buffer)
    }

    /// Marks the buffer `writer_lost` for its next grant batch, as if a
    /// writer had died holding it. A restarted broker does this for every
    /// buffer it takes back: it cannot know which writes were in flight when
    /// the previous instance died, and a spurious warning costs a consumer
    /// one frame while a missed one costs it a torn frame.
    pub fn mark_writer_lost(&mut self, buffer: BufferId) {
        if let Some(res) = self.buffers.get_mut(&buffer) {
            res.writer_lost = true;
        }
    }

    /// Gives back the news a grant took (see [`Grant::writer_lost`] and
    /// [`Grant::revoked`]) when the daemon withdraws that grant before its
    /// client heard of it: the next grant carries it instead.
    pub fn restore_marks(&mut self, buffer: BufferId, writer_lost: bool, revoked: bool) {
        if let Some(res) = self.buffers.get_mut(&buffer) {
            res.writer_lost |= writer_lost;
            res.revoked |= revoked;
        }
    }

    /// Removes the buffer's reservation: all its fences and waiters are
    /// dropped and returned (the daemon calls this when the last holder
    /// frees it, and must then answer the dropped waiters with an error).
    /// Returned in grant order and queue order. Kernel signals that arrive
    /// later for the dropped fences are ignored.
    pub fn remove_buffer(&mut self, buffer: BufferId) -> (Vec<FenceView>, Vec<WaiterView>) {
        let Some(res) = self.buffers.remove(&buffer) else {
            return (Vec::new(), Vec::new());
        };
        let mut fences = Vec::with_capacity(res.fences.len());
        for slot in &res.fences {
            if let Some(f) = self.fences.remove(&slot.id) {
                self.unindex_fence(f.holder, slot.id);
                fences.push(view(slot.id, &f));
            }
        }
        let mut waiters = Vec::with_capacity(res.queue.len());
        for w in &res.queue {
            self.waiters.remove(&w.id);
            self.unindex_waiter(w.client, w.id);
            waiters.push(waiter_view(buffer, w));
        }
        (fences, waiters)
    }

    /// Asks for `access` to `buffer`.
    ///
    /// Autofence: granted at once only if it conflicts with no fence *and*
    /// nobody is queued, since overtaking a waiter could starve a writer
    /// behind a stream of readers. NoAutofence: always granted at once, with
    /// the conflicting fences listed for the client to wait on itself.
    pub fn begin(
        &mut self,
        client: ClientId,
        buffer: BufferId,
        access: Access,
        mode: Mode,
        now: Instant,
    ) -> Result<BeginOutcome, FenceError> {
        let res = self
            .buffers
            .get(&buffer)
            .ok_or(FenceError::UnknownBuffer(buffer))?;
        let outstanding = match mode {
            Mode::Autofence => {
                let has_write = res.fences.iter().any(|s| s.access.is_write());
                if !res.queue.is_empty() || !admits(access, has_write, res.fences.len()) {
                    let id = self.fresh_id();
                    if let Some(res) = self.buffers.get_mut(&buffer) {
                        res.queue.push_back(Waiter {
                            id,
                            client,
                            access,
                            since: now,
                        });
                    }
                    self.waiters.insert(id, buffer);
                    self.clients.entry(client).or_default().waiting.insert(id);
                    return Ok(BeginOutcome::Queued(id));
                }
                Vec::new()
            }
            Mode::NoAutofence => res
                .fences
                .iter()
                .filter(|s| s.access.conflicts_with(access))
                .filter_map(|s| self.fence(s.id))
                .collect(),
        };
        // An immediate grant is a batch of one: it is the next grant on the
        // buffer, so it is the one that must hear about a lost writer.
        let (writer_lost, revoked) = self.take_marks(buffer);
        Ok(BeginOutcome::Granted(self.install(
            buffer,
            client,
            access,
            mode,
            None,
            writer_lost,
            revoked,
            outstanding,
            now,
        )))
    }

    /// Ends a held access. Only its holder may end it, so one client cannot
    /// pull the buffer out from under another; a fence already handed to the
    /// kernel cannot be ended again (`AlreadyFenced`), because the device may
    /// still be using the buffer.
    pub fn end(
        &mut self,
        client: ClientId,
        access: AccessId,
        now: Instant,
    ) -> Result<Vec<Grant>, FenceError> {
        let f = self.held_fence(client, access)?;
        if f.state == FenceState::AwaitingKernelFence {
            return Err(FenceError::AlreadyFenced(access));
        }
        let buffer = f.buffer;
        self.remove_fence(access);
        Ok(self.serve(buffer, now))
    }

    /// Device access handed over with a sync_file: the fence stays (state
    /// AwaitingKernelFence) until kernel_fence_signalled. This lets the
    /// client move on as soon as its work is queued while the buffer stays
    /// protected until the hardware has really finished.
    pub fn end_with_kernel_fence(
        &mut self,
        client: ClientId,
        access: AccessId,
    ) -> Result<(), FenceError> {
        let f = self.held_fence(client, access)?;
        if !f.access.is_device() {
            return Err(FenceError::NotDeviceAccess(access));
        }
        if f.state == FenceState::AwaitingKernelFence {
            return Err(FenceError::AlreadyFenced(access));
        }
        if let Some(f) = self.fences.get_mut(&access) {
            f.state = FenceState::AwaitingKernelFence;
        }
        if let Some(idx) = self.clients.get_mut(&client) {
            idx.held.remove(&access);
            idx.awaiting.insert(access);
        }
        Ok(())
    }

    /// The kernel fence of a handed-over access signalled: the device is
    /// done, the reservation goes. Anything else (unknown id, a fence that
    /// was revoked or whose buffer was removed meanwhile, a fence never
    /// handed over) is ignored and grants nothing: the sync_file poll races
    /// with those operations, and a late signal must not end a live access.
    pub fn kernel_fence_signalled(&mut self, access: AccessId, now: Instant) -> Vec<Grant> {
        match self.fences.get(&access) {
            Some(f) if f.state == FenceState::AwaitingKernelFence => {
                let buffer = f.buffer;
                self.remove_fence(access);
                self.serve(buffer, now)
            }
            _ => Vec::new(),
        }
    }

    /// A queued request timed out or was withdrawn; removing it may unblock
    /// those behind it (a waiting writer at the head holds back the readers
    /// queued after it).
    pub fn cancel(&mut self, waiter: WaiterId, now: Instant) -> Result<Vec<Grant>, FenceError> {
        let buffer = self
            .remove_waiter(waiter)
            .ok_or(FenceError::UnknownWaiter(waiter))?;
        Ok(self.serve(buffer, now))
    }

    /// Several queued requests withdrawn together (a client going): all
    /// leave their queues before any queue is served, so none is granted
    /// by the leaving of another (a read queued behind the client's own
    /// write, say). Unknown ids are skipped. Grants in FIFO order across
    /// the buffers, as [`Arbiter::client_gone`] makes them.
    pub fn cancel_all(&mut self, waiters: &[WaiterId], now: Instant) -> Vec<Grant> {
        let touched: BTreeSet<BufferId> = waiters
            .iter()
            .filter_map(|&id| self.remove_waiter(id))
            .collect();
        let mut pending = Vec::new();
        for buffer in touched {
            pending.extend(self.pop_grantable(buffer));
        }
        pending.sort_by_key(|p| p.waiter.id);
        self.install_all(pending, now)
    }

    /// Ends the client's accesses and withdraws its waiters on ONE buffer
    /// (the client freed that buffer). Same rules as [`Arbiter::client_gone`],
    /// restricted to that buffer: a write it still held never got ended, so
    /// it counts as a lost writer, unless it is among `unsent`. An unknown
    /// buffer yields an empty result.
    pub fn release_client_buffer(
        &mut self,
        client: ClientId,
        buffer: BufferId,
        now: Instant,
        unsent: &[Unsent],
    ) -> ClientGone {
        let mut gone = ClientGone::default();
        let Some(res) = self.buffers.get(&buffer) else {
            return gone;
        };
        for slot in &res.fences {
            if let Some(f) = self.fences.get(&slot.id) {
                if f.holder == client {
                    match f.state {
                        FenceState::Held => gone.released.push(slot.id),
                        FenceState::AwaitingKernelFence => gone.kept_kernel_fences.push(slot.id),
                    }
                }
            }
        }
        gone.cancelled_waiters = res
            .queue
            .iter()
            .filter(|w| w.client == client)
            .map(|w| w.id)
            .collect();
        for &id in &gone.released {
            self.release_unended(id, unsent);
        }
        for &id in &gone.cancelled_waiters {
            self.remove_waiter(id);
        }
        gone.grants = self.serve(buffer, now);
        gone
    }

    /// The client died. Its held fences go at once (a dead process touches
    /// nothing, and waiting for it would block the buffer forever), device
    /// ones included unless already handed to the kernel: those stay, as
    /// the hardware may still be writing. Its waiters vanish. A write it
    /// held marks the buffer `writer_lost` for the next grant batch; a grant
    /// among `unsent`, which it never heard of, gives its news back instead.
    /// Its waiters go in the same step, so no grant this makes is its own.
    pub fn client_gone(&mut self, client: ClientId, now: Instant, unsent: &[Unsent]) -> ClientGone {
        let Some(idx) = self.clients.get(&client) else {
            return ClientGone::default();
        };
        let mut gone = ClientGone {
            grants: Vec::new(),
            released: idx.held.iter().copied().collect(),
            kept_kernel_fences: idx.awaiting.iter().copied().collect(),
            cancelled_waiters: idx.waiting.iter().copied().collect(),
        };
        let mut touched = BTreeSet::new();
        for &id in &gone.released {
            if let Some(buffer) = self.release_unended(id, unsent) {
                touched.insert(buffer);
            }
        }
        for &id in &gone.cancelled_waiters {
            if let Some(buffer) = self.remove_waiter(id) {
                touched.insert(buffer);
            }
        }
        let mut pending = Vec::new();
        for buffer in touched {
            pending.extend(self.pop_grantable(buffer));
        }
        // Queued ids grow with time, so sorting by them merges the buffers'
        // queues into one FIFO order across the broker.
        pending.sort_by_key(|p| p.waiter.id);
        gone.grants = self.install_all(pending, now);
        // What is left are its kernel-fenced accesses; the index goes with
        // the last of them (or now).
        if let Some(idx) = self.clients.get_mut(&client) {
            idx.gone = true;
            if idx.is_empty() {
                self.clients.remove(&client);
            }
        }
        gone
    }

    /// Hold limit exceeded: the fence is removed; if it was a write, the next
    /// grant batch on that buffer carries `revoked`, because the revoked
    /// writer may have left the contents half-written (and may not have
    /// stopped yet). A revoked read leaves the contents intact, so it sets
    /// nothing. The arbiter would take a kernel-fenced access too, but the
    /// daemon never asks it to: its hold limit stops at the hand-over, and a
    /// device that never signals keeps the buffer until the buffer is freed
    /// by all its holders (taking the fence from it would let the next
    /// access in while the hardware may still write).
    pub fn revoke(&mut self, access: AccessId, now: Instant) -> Result<Vec<Grant>, FenceError> {
        let f = self
            .remove_fence(access)
            .ok_or(FenceError::UnknownAccess(access))?;
        if f.access.is_write() {
            if let Some(res) = self.buffers.get_mut(&f.buffer) {
                res.revoked = true;
            }
        }
        Ok(self.serve(f.buffer, now))
    }

    /// The buffer's fences in grant order (empty for an unknown buffer).
    pub fn fences(&self, buffer: BufferId) -> Vec<FenceView> {
        self.buffers
            .get(&buffer)
            .map(|res| res.fences.iter().filter_map(|s| self.fence(s.id)).collect())
            .unwrap_or_default()
    }

    /// The id of the buffer's `index`th fence in grant order. The daemon
    /// walks them before every decision on the buffer, ending some on the
    /// way, so it indexes rather than holding an iterator (or a copy).
    pub fn fence_id_at(&self, buffer: BufferId, index: usize) -> Option<AccessId> {
        self.buffers.get(&buffer)?.fences.get(index).map(|s| s.id)
    }

    /// Whether anyone is queued on the buffer.
    pub fn has_waiters(&self, buffer: BufferId) -> bool {
        self.buffers
            .get(&buffer)
            .is_some_and(|res| !res.queue.is_empty())
    }

    /// Whether the buffer's next grant will carry `writer_lost` or
    /// `revoked`: news that only a grant can deliver.
    pub fn owes_marks(&self, buffer: BufferId) -> bool {
        self.buffers
            .get(&buffer)
            .is_some_and(|res| res.writer_lost || res.revoked)
    }

    /// The buffer a queued request waits on.
    pub fn waiter_buffer(&self, waiter: WaiterId) -> Option<BufferId> {
        self.waiters.get(&waiter).copied()
    }

    /// The head of the buffer's queue, if anyone waits.
    pub fn head_waiter(&self, buffer: BufferId) -> Option<WaiterView> {
        let res = self.buffers.get(&buffer)?;
        res.queue.front().map(|w| waiter_view(buffer, w))
    }

    /// How many fences the buffer has.
    pub fn fence_count(&self, buffer: BufferId) -> usize {
        self.buffers.get(&buffer).map_or(0, |res| res.fences.len())
    }

    /// How many requests wait on the buffer.
    pub fn queue_len(&self, buffer: BufferId) -> usize {
        self.buffers.get(&buffer).map_or(0, |res| res.queue.len())
    }

    /// The buffer's queue, head first (empty for an unknown buffer).
    pub fn waiters(&self, buffer: BufferId) -> Vec<WaiterView> {
        self.buffers
            .get(&buffer)
            .map(|res| res.queue.iter().map(|w| waiter_view(buffer, w)).collect())
            .unwrap_or_default()
    }

    pub fn fence(&self, access: AccessId) -> Option<FenceView> {
        self.fences.get(&access).map(|f| view(access, f))
    }

    /// Fences the client holds (state Held): what its quota and hold limits
    /// are about. Kernel-fenced ones are the device's, not the client's.
    pub fn held_by(&self, client: ClientId) -> usize {
        self.clients.get(&client).map_or(0, |i| i.held.len())
    }

    /// How many fences the arbiter holds, every buffer's (the daemon's
    /// tests: each must stand for an access of its tables, and no more).
    pub fn fence_total(&self) -> usize {
        self.fences.len()
    }

    /// How many requests wait, on every buffer (as `fence_total`).
    pub fn waiter_total(&self) -> usize {
        self.waiters.len()
    }

    /// Clients the arbiter keeps an index for (tests: nothing of a departed
    /// client may stay behind).
    #[cfg(test)]
    fn indexed_clients(&self) -> usize {
        self.clients.len()
    }

    /// Its queued requests.
    pub fn waiting_for(&self, client: ClientId) -> usize {
        self.clients.get(&client).map_or(0, |i| i.waiting.len())
    }

    /// The ids of its queued requests, oldest first: at most its queue
    /// limit, so a lookup among them does not scan every waiter.
    pub fn waiters_of(&self, client: ClientId) -> impl Iterator<Item = WaiterId> + '_ {
        self.clients
            .get(&client)
            .into_iter()
            .flat_map(|i| i.waiting.iter().copied())
    }

    /// The ids of the fences it holds (state Held), oldest first.
    pub fn held_of(&self, client: ClientId) -> impl Iterator<Item = AccessId> + '_ {
        self.clients
            .get(&client)
            .into_iter()
            .flat_map(|i| i.held.iter().copied())
    }

    // ----- internals -----

    fn fresh_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// The fence, if it exists and `client` holds it. Checked before any
    /// change so a refused call leaves the state untouched.
    fn held_fence(&self, client: ClientId, access: AccessId) -> Result<&Fence, FenceError> {
        let f = self
            .fences
            .get(&access)
            .ok_or(FenceError::UnknownAccess(access))?;
        if f.holder != client {
            return Err(FenceError::NotHolder { access, client });
        }
        Ok(f)
    }

    fn take_marks(&mut self, buffer: BufferId) -> (bool, bool) {
        self.buffers.get_mut(&buffer).map_or((false, false), |res| {
            (
                std::mem::take(&mut res.writer_lost),
                std::mem::take(&mut res.revoked),
            )
        })
    }

    /// Removes a fence from every index; the caller decides what follows.
    fn remove_fence(&mut self, id: AccessId) -> Option<Fence> {
        let f = self.fences.remove(&id)?;
        if let Some(res) = self.buffers.get_mut(&f.buffer) {
            if let Some(pos) = res.fences.iter().position(|s| s.id == id) {
                // `remove`, not `swap_remove`: grant order is part of the views.
                res.fences.remove(pos);
            }
        }
        self.unindex_fence(f.holder, id);
        Some(f)
    }

    /// Removes a fence whose holder never ended it: a lost writer, or, for
    /// a grant its holder never heard of (`unsent`), its news given back.
    fn release_unended(&mut self, id: AccessId, unsent: &[Unsent]) -> Option<BufferId> {
        let Some(grant) = unsent.iter().find(|u| u.access == id) else {
            return self.release_lost(id);
        };
        let buffer = self.remove_fence(id)?.buffer;
        self.restore_marks(buffer, grant.writer_lost, grant.revoked);
        Some(buffer)
    }

    /// Removes a fence whose holder never ended it, marking a lost writer.
    fn release_lost(&mut self, id: AccessId) -> Option<BufferId> {
        let f = self.remove_fence(id)?;
        if f.access.is_write() {
            if let Some(res) = self.buffers.get_mut(&f.buffer) {
                res.writer_lost = true;
            }
        }
        Some(f.buffer)
    }

    fn remove_waiter(&mut self, id: WaiterId) -> Option<BufferId> {
        let buffer = self.waiters.remove(&id)?;
        let mut client = None;
        if let Some(res) = self.buffers.get_mut(&buffer) {
            if let Some(pos) = res.queue.iter().position(|w| w.id == id) {
                client = res.queue.remove(pos).map(|w| w.client);
            }
        }
        if let Some(client) = client {
            self.unindex_waiter(client, id);
        }
        Some(buffer)
    }

    fn unindex_fence(&mut self, client: ClientId, id: AccessId) {
        if let Some(idx) = self.clients.get_mut(&client) {
            idx.held.remove(&id);
            idx.awaiting.remove(&id);
            if idx.gone && idx.is_empty() {
                self.clients.remove(&client);
            }
        }
    }

    fn unindex_waiter(&mut self, client: ClientId, id: WaiterId) {
        if let Some(idx) = self.clients.get_mut(&client) {
            idx.waiting.remove(&id);
            if idx.gone && idx.is_empty() {
                self.clients.remove(&client);
            }
        }
    }

    /// One serving pass over one buffer.
    fn serve(&mut self, buffer: BufferId, now: Instant) -> Vec<Grant> {
        let pending = self.pop_grantable(buffer);
        self.install_all(pending, now)
    }

    /// Takes waiters off the head of the queue while each is compatible with
    /// the fences plus those taken before it; stops at the first conflict so
    /// a waiting writer holds back the readers queued after it (no writer
    /// starvation), while a run of readers goes through together. The
    /// buffer's marks go to every grant of the pass, then clear.
    fn pop_grantable(&mut self, buffer: BufferId) -> Vec<Pending> {
        let Some(res) = self.buffers.get_mut(&buffer) else {
            return Vec::new();
        };
        let mut has_write = res.fences.iter().any(|s| s.access.is_write());
        let mut count = res.fences.len();
        let mut taken = Vec::new();
        while let Some(head) = res.queue.front() {
            if !admits(head.access, has_write, count) {
                break;
            }
            has_write |= head.access.is_write();
            count += 1;
            taken.extend(res.queue.pop_front());
        }
        if taken.is_empty() {
            return Vec::new();
        }
        let writer_lost = std::mem::take(&mut res.writer_lost);
        let revoked = std::mem::take(&mut res.revoked);
        for w in &taken {
            self.waiters.remove(&w.id);
            self.unindex_waiter(w.client, w.id);
        }
        taken
            .into_iter()
            .map(|waiter| Pending {
                buffer,
                waiter,
                writer_lost,
                revoked,
            })
            .collect()
    }

    fn install_all(&mut self, pending: Vec<Pending>, now: Instant) -> Vec<Grant> {
        pending
            .into_iter()
            .map(|p| {
                self.install(
                    p.buffer,
                    p.waiter.client,
                    p.waiter.access,
                    Mode::Autofence,
                    Some(p.waiter.id),
                    p.writer_lost,
                    p.revoked,
                    Vec::new(),
                    now,
                )
            })
            .collect()
    }

    #[allow(clippy::too_many_arguments)]
    fn install(
        &mut self,
        buffer: BufferId,
        client: ClientId,
        access: Access,
        mode: Mode,
        waiter: Option<WaiterId>,
        writer_lost: bool,
        revoked: bool,
        outstanding: Vec<FenceView>,
        now: Instant,
    ) -> Grant {
        let id = self.fresh_id();
        self.fences.insert(
            id,
            Fence {
                buffer,
                access,
                holder: client,
                mode,
                state: FenceState::Held,
                since: now,
            },
        );
        if let Some(res) = self.buffers.get_mut(&buffer) {
            res.fences.push(Slot { id, access });
        }
        self.clients.entry(client).or_default().held.insert(id);
        Grant {
            access_id: id,
            waiter,
            buffer,
            client,
            access,
            mode,
            writer_lost,
            revoked,
            outstanding,
        }
    }
}

fn view(id: AccessId, f: &Fence) -> FenceView {
    FenceView {
        id,
        buffer: f.buffer,
        access: f.access,
        holder: f.holder,
        mode: f.mode,
        state: f.state,
        since: f.since,
    }
}

fn waiter_view(buffer: BufferId, w: &Waiter) -> WaiterView {
    WaiterView {
        id: w.id,
        buffer,
        client: w.client,
        access: w.access,
        since: w.since,
    }
}
