//! The values the D-Bus interface returns, shared by the daemon (which
//! builds them) and `dmabrokerctl` (which decodes and prints them).
//!
//! They are plain data, detached from the broker's state, so that the state
//! lock is held only while they are filled in and never while they are sent.
//! Each struct is one D-Bus struct: adding or reordering a field changes the
//! signature, which is why the interface name carries a version
//! (`org.dmabroker.Debug1`). Ages and waits are microseconds, times since
//! the epoch are seconds; a missing text (no executable, no unit) is "".

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use zbus::zvariant::{OwnedValue, Type, Value};

/// One heap and what is allocated from it now.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, Type, Value, OwnedValue)]
pub struct HeapView {
    pub name: String,
    /// `dma-heap`, `udmabuf`, `memfd`, or `adopted` for buffers clients
    /// registered from elsewhere.
    pub backend: String,
    pub buffers: u64,
    pub bytes: u64,
}

/// Daemon-wide sums.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, Type, Value, OwnedValue)]
pub struct Totals {
    pub clients: u64,
    pub buffers: u64,
    pub bytes: u64,
    /// Fences in force (held accesses and ones awaiting a kernel fence).
    pub fences: u64,
    /// Queued access requests.
    pub waiters: u64,
}

/// One connected client.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, Type)]
pub struct ClientView {
    pub id: u64,
    pub uid: u32,
    pub pid: i32,
    /// The name the client gave in its hello: a label, never trusted.
    pub name: String,
    pub exe: String,
    pub unit: String,
    /// The policy rule whose limits apply.
    pub rule: String,
    /// `autofence` or `no-autofence`.
    pub autofence: String,
    pub buffers: u64,
    /// Bytes the client is charged for.
    pub bytes: u64,
    pub accesses_held: u64,
    pub requests_waiting: u64,
    /// Age of its oldest queued request; 0 when nothing waits.
    pub longest_wait_us: u64,
    pub connected_at: u64,
}

/// One fence (granted access) on a buffer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, Type)]
pub struct FenceInfo {
    pub access: u64,
    /// `cpu-read`, `cpu-write`, `cpu-read-write`, `device-read`, `device-write`.
    pub kind: String,
    pub holder: u64,
    /// `held`, `kernel-fence` when the client is done but its device is
    /// not, or `word` for an access held in the buffer's word while the
    /// broker does not arbitrate it (access id 0, age 0: the broker did
    /// not see it begin).
    pub state: String,
    /// `autofence` or `no-autofence`.
    pub mode: String,
    pub age_us: u64,
}

/// One queued request for a buffer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, Type)]
pub struct WaiterInfo {
    pub waiter: u64,
    pub client: u64,
    pub kind: String,
    pub age_us: u64,
}

/// One buffer, as listed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, Type)]
pub struct BufferView {
    pub id: u64,
    pub heap: String,
    pub backend: String,
    pub name: String,
    pub size: u64,
    pub inode: u64,
    /// The client charged for its bytes.
    pub owner: u64,
    /// Clients holding it, longest-standing first.
    pub holders: Vec<u64>,
    /// Fences in grant order.
    pub fences: Vec<FenceInfo>,
    /// Queue, head first.
    pub waiters: Vec<WaiterInfo>,
    pub created_at: u64,
}

/// One holder of a buffer, in detail.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, Type)]
pub struct HolderInfo {
    pub client: u64,
    pub pid: i32,
    pub name: String,
    pub held_for_us: u64,
}

/// One buffer with everything the debug view knows about it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, Type)]
pub struct BufferDetail {
    pub buffer: BufferView,
    pub holders: Vec<HolderInfo>,
    /// Share tokens that import it now: one for each holder that exported
    /// it. An import does not use a token up; it stays valid, however
    /// often imported, while its exporter holds the buffer.
    pub share_tokens: u64,
    /// Whether the kernel manages caches and implicit fences for it (false
    /// for memfd buffers).
    pub dma_buf: bool,
}

/// Counters since the daemon started.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, Type)]
pub struct Statistics {
    pub allocations: u64,
    pub frees: u64,
    pub imports: u64,
    pub exports: u64,
    pub adoptions: u64,
    pub grants: u64,
    /// Grants that had to wait.
    pub waits: u64,
    /// Over the most recent waits.
    pub wait_p50_us: u64,
    pub wait_p99_us: u64,
    pub cache_syncs: u64,
    pub cache_syncs_skipped: u64,
    pub writer_lost: u64,
    pub revocations: u64,
    pub timeouts: u64,
    pub kernel_fences_imported: u64,
    /// Refused requests by error code name.
    pub refusals: BTreeMap<String, u64>,
}

/// One allocation carried out off the broker's thread (its heap may
/// block) and not answered yet. It counts against its client's quota as
/// the buffer it will be, while `ClientView` counts only buffers in the
/// table, so a client refused `QuotaExceeded` because of these looks
/// under its limit there. A struct of its own: `ClientView` cannot grow.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, Type)]
pub struct AllocationInFlight {
    /// The heap its thread is trying: the first of its fallback order
    /// that may block until the thread starts, then each it falls back to.
    pub heap: String,
    /// Page-rounded bytes: what it counts against `max_total_bytes`.
    pub size: u64,
    /// The name the buffer will have.
    pub name: String,
    /// Since the client asked for it.
    pub age_us: u64,
}

/// One client's allocations in flight.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, Type)]
pub struct ClientAllocations {
    pub client: u64,
    /// What they count against `max_buffers` and `max_total_bytes`.
    pub count: u64,
    pub bytes: u64,
    /// Oldest first.
    pub allocations: Vec<AllocationInFlight>,
}

/// One queue of closes on the daemon's closing threads, with closes
/// waiting or one in hand. A file a client sent or held whose close can
/// wait for good (a FUSE file, a dma-buf watched by an epoll a client
/// holds locked) is closed there, one queue per set of users and lane,
/// and a user with `MAX_PENDING_PER_UID` (64) closes waiting has its
/// connections read no further: these say which user's clients hang so.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, Type)]
pub struct CloseQueue {
    /// The users the closes count for, sorted: one for a user's own
    /// closes, several for a file those users have all held. Uids as the
    /// daemon's bounds count them (a process in a user namespace counts
    /// as the namespace's maker: see `docs/policy.md`,
    /// `max_uid_connections`), which `ClientView::uid` need not be.
    pub users: Vec<u32>,
    /// `files` (files clients sent or held) or `sockets` (connections'
    /// sockets).
    pub lane: String,
    /// Closes queued, and the one in hand.
    pub waiting: u64,
    /// A closing thread runs the queue.
    pub has_thread: bool,
    /// It waits in line for a thread, or, its thread idle, for leave to go
    /// busy again (closing nothing meanwhile): each of its users is among
    /// as many busy shared threads as it may be, the daemon runs as many
    /// closing threads as it may, or none could be started.
    pub in_line: bool,
    /// How long the close in hand has been going on; 0 when none is in
    /// hand. One that keeps growing is stuck.
    pub in_hand_us: u64,
    /// One of its users has so many closes waiting that its connections
    /// are read no further.
    pub held_back: bool,
}
