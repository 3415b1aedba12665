//! The `org.dmabroker.Debug1` object: a read-only view of the broker plus
//! `ReloadPolicy` for administrators.
//!
//! Each handler locks the state only inside [`DebugObject::read`], a synchronous
//! call that copies what it needs into a view and unlocks before anything
//! is awaited or sent. No handler returns an fd: buffers stay reachable only
//! through the broker's own socket, where the policy applies.

use std::sync::Arc;

use zbus::fdo;
use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::Connection;

use super::views::{
    BufferDetail, BufferView, ClientAllocations, ClientView, CloseQueue, HeapView, Statistics,
    Totals,
};
use super::{allocating, auth, closes, snapshot, Reloader};
use crate::broker::{Broker, State};

/// Errors of this interface that have no standard D-Bus name.
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.dmabroker.Error")]
pub enum DebugError {
    #[zbus(error)]
    ZBus(zbus::Error),
    /// No buffer has this id (it was never allocated, or is already freed).
    NoSuchBuffer(String),
    /// The answer would be larger than a bus passes on (see
    /// [`snapshot::ReplySize`]).
    TooLarge(String),
}

#[derive(Debug)]
pub struct DebugObject {
    broker: Arc<Broker>,
    reload: Reloader,
}

impl DebugObject {
    pub fn new(broker: Arc<Broker>, reload: Reloader) -> Self {
        DebugObject { broker, reload }
    }

    /// Runs `f` on the locked state. Synchronous on purpose: the guard
    /// cannot live across an `.await` if there is none.
    fn read<R>(&self, f: impl FnOnce(&State) -> R) -> R {
        let state = self.broker.lock();
        f(&state)
    }

    /// Whether the current policy names `caller` an administrator (an
    /// unidentified caller is not one).
    fn is_admin(&self, caller: Option<&auth::Caller>) -> bool {
        caller.is_some_and(|c| {
            let policy = self.read(|s| Arc::clone(&s.policy));
            policy.is_admin(c.uid, &c.gids)
        })
    }

    /// Runs `visit` on the locked state for each of `ids` in turn (it
    /// returns the work it did), unlocking whenever a hold's work reaches
    /// [`snapshot::BUDGET`], so that the data path never waits for more
    /// than that however large the list or its entries.
    fn read_chunked(&self, ids: &[u64], mut visit: impl FnMut(&State, u64) -> usize) {
        let mut rest = ids;
        while !rest.is_empty() {
            let visited = self.read(|state| snapshot::within_budget(rest, |id| visit(state, id)));
            rest = rest.get(visited..).unwrap_or_default();
            if !rest.is_empty() {
                self.broker.let_waiters_in(LET_WAITERS_IN);
            }
        }
    }
}

/// How long a list waits between two chunks for the broker's thread to
/// take the state, when it waits for it. Microseconds in practice; the
/// bound only keeps a descheduled waiter from stalling the view.
const LET_WAITERS_IN: std::time::Duration = std::time::Duration::from_millis(2);

#[zbus::interface(name = "org.dmabroker.Debug1")]
impl DebugObject {
    /// The daemon's version.
    #[zbus(property(emits_changed_signal = "false"))]
    async fn version(&self) -> String {
        env!("CARGO_PKG_VERSION").to_owned()
    }

    /// A random name of this daemon run, as in share tokens' scope.
    #[zbus(property(emits_changed_signal = "false"))]
    async fn instance(&self) -> String {
        self.read(|s| s.instance.clone())
    }

    /// When the daemon started, in seconds since the epoch.
    #[zbus(property(emits_changed_signal = "false"))]
    async fn started_at(&self) -> u64 {
        self.read(|s| snapshot::unix_seconds(s.started))
    }

    /// Usable heaps in fallback order with what is allocated from each.
    #[zbus(property(emits_changed_signal = "false"))]
    async fn heaps(&self) -> Vec<HeapView> {
        let (mut views, ids) =
            self.read(|state| (snapshot::heaps(state), snapshot::buffer_ids(state)));
        self.read_chunked(&ids, |state, id| {
            snapshot::count_heap(state, id, &mut views)
        });
        views
    }

    #[zbus(property(emits_changed_signal = "false"))]
    async fn totals(&self) -> Totals {
        self.read(snapshot::totals)
    }

    /// Accesses their clients ended through end words, retired without an
    /// `End` message. A property of its own: a new field in `Statistics`
    /// would change that struct's signature under existing tools.
    #[zbus(property(emits_changed_signal = "false"))]
    async fn silent_ends(&self) -> u64 {
        self.read(|s| s.stats.silent_ends)
    }

    /// Queued begins told to wait on the buffer's word for a hand-off, and
    /// of those, the ones the holder's end granted there (the rest were
    /// cancelled and granted by message). Properties of their own, as
    /// `SilentEnds`.
    #[zbus(property(emits_changed_signal = "false"))]
    async fn hand_offs_planned(&self) -> u64 {
        self.read(|s| s.stats.hand_offs_planned)
    }

    #[zbus(property(emits_changed_signal = "false"))]
    async fn hand_offs(&self) -> u64 {
        self.read(|s| s.stats.hand_offs)
    }

    /// Allocations carried out off the broker's thread (heaps that may
    /// block) and not answered yet, every client's. Each counts against
    /// its client's quota as the buffer it will be, though neither
    /// `Totals` nor `ListClients` counts it: properties and a method of
    /// their own, as `SilentEnds`.
    #[zbus(property(emits_changed_signal = "false"))]
    async fn allocations_in_flight(&self) -> u64 {
        self.read(|s| s.allocations_in_flight() as u64)
    }

    /// `DMA_BUF_IOCTL_SYNC` calls that failed (each is logged; the access
    /// goes on, and an END that failed holds back no grant). A property
    /// of its own, as `SilentEnds`.
    #[zbus(property(emits_changed_signal = "false"))]
    async fn cache_syncs_failed(&self) -> u64 {
        self.read(|s| s.stats.cache_syncs_failed)
    }

    /// Cache sync ENDs running off the broker's thread now; their
    /// buffers' grants wait for them. A property of its own, as
    /// `SilentEnds`.
    #[zbus(property(emits_changed_signal = "false"))]
    async fn cache_ends_running(&self) -> u64 {
        self.read(|s| s.cache_ends_running())
    }

    /// Threads carrying out allocations, those of clients gone included
    /// (their heap has not returned yet): at the daemon's bound, an
    /// allocation that may block is refused `Busy`.
    #[zbus(property(emits_changed_signal = "false"))]
    async fn allocations_running(&self) -> u64 {
        self.read(|s| s.allocations_running() as u64)
    }

    /// The clients with allocations in flight, by id, each with its count,
    /// bytes and allocations (heap being tried, size, name, age).
    #[zbus(out_args("clients"))]
    async fn list_allocations_in_flight(&self) -> Vec<ClientAllocations> {
        allocating::finish(self.read(allocating::copy))
    }

    /// Closes waiting on the daemon's closing threads, every user's, those
    /// in hand included: files clients sent or held whose close may wait
    /// for good (see `ListCloses`). Properties and a method of their own,
    /// as `SilentEnds`; they need no state lock.
    #[zbus(property(emits_changed_signal = "false"))]
    async fn closes_waiting(&self) -> u64 {
        crate::client_fds::waiting_now() as u64
    }

    /// Closing threads running or lingering for more, stuck ones included.
    #[zbus(property(emits_changed_signal = "false"))]
    async fn closing_threads(&self) -> u64 {
        crate::client_fds::threads_now() as u64
    }

    /// The closing threads' queues with closes waiting or one in hand, by
    /// users then lane: users, lane, closes waiting, whether a thread runs
    /// it, whether it waits in line for one, age of the close in hand,
    /// whether a user of it is held back. Users are the ids the bounds
    /// count: a container's (its namespace's inode) only for
    /// administrators (see `auth::hide_container_ids`).
    #[zbus(out_args("queues"))]
    async fn list_closes(
        &self,
        #[zbus(connection)] connection: &Connection,
        #[zbus(header)] header: Header<'_>,
    ) -> Vec<CloseQueue> {
        let caller = auth::caller(connection, &header).await.ok();
        let mut queues = closes::list();
        if !self.is_admin(caller.as_ref()) {
            auth::hide_container_ids(&mut queues);
        }
        queues
    }

    /// Every client; another uid's executable and unit only for
    /// administrators (see `hide_foreign_executables`).
    #[zbus(out_args("clients"))]
    async fn list_clients(
        &self,
        #[zbus(connection)] connection: &Connection,
        #[zbus(header)] header: Header<'_>,
    ) -> Vec<ClientView> {
        let caller = auth::caller(connection, &header).await.ok();
        let ids = self.read(snapshot::client_ids);
        let mut views = Vec::with_capacity(ids.len());
        self.read_chunked(&ids, |state, id| {
            snapshot::copy_client(state, id, &mut views)
        });
        if !self.is_admin(caller.as_ref()) {
            auth::hide_foreign_executables(&mut views, caller.map(|c| c.uid));
        }
        views
    }

    /// Every buffer, unless the answer would be too large for the bus
    /// (see [`snapshot::ReplySize`]): then an error, which leaves the
    /// daemon on the bus, where a message past the bus's limit would
    /// have cost it its connection.
    #[zbus(out_args("buffers"))]
    async fn list_buffers(&self) -> Result<Vec<BufferView>, DebugError> {
        let ids = self.read(snapshot::buffer_ids);
        let mut raw = Vec::with_capacity(ids.len());
        let mut size = snapshot::ReplySize::default();
        self.read_chunked(&ids, |state, id| {
            if size.over() {
                return 0;
            }
            let work = snapshot::copy_buffer(state, id, &mut raw);
            if let Some(last) = raw.last() {
                size.add(last);
            }
            work
        });
        if size.over() {
            return Err(DebugError::TooLarge(format!(
                "the list of {} buffers would be over {} MiB, more than a bus passes on; \
                 GetBuffer shows one buffer",
                ids.len(),
                snapshot::MAX_REPLY_BYTES >> 20
            )));
        }
        Ok(snapshot::finish_buffers(raw))
    }

    // Structs are returned as 1-tuples: a bare struct would go out as its
    // fields, one argument each, contradicting the introspected signature.

    #[zbus(out_args("buffer"))]
    async fn get_buffer(&self, id: u64) -> Result<(BufferDetail,), DebugError> {
        self.read(|s| snapshot::buffer(s, id))
            .map(|raw| (raw.finish(),))
            .ok_or_else(|| DebugError::NoSuchBuffer(format!("no buffer has id {id}")))
    }

    #[zbus(out_args("statistics"))]
    async fn statistics(&self) -> (Statistics,) {
        let stats = self.read(snapshot::stats);
        (snapshot::statistics(&stats),)
    }

    /// Re-reads the policy files, for callers the current policy names as
    /// administrators. A broken file keeps the policy in force and fails.
    async fn reload_policy(
        &self,
        #[zbus(connection)] connection: &Connection,
        #[zbus(header)] header: Header<'_>,
    ) -> fdo::Result<()> {
        let caller = auth::caller(connection, &header).await?;
        if !self.is_admin(Some(&caller)) {
            // Any user on the bus may call it, over and over.
            static REFUSALS: crate::logging::Throttle =
                crate::logging::Throttle::new(std::time::Duration::from_secs(60));
            if let Some(held_back) = REFUSALS.admit(std::time::Instant::now()) {
                tracing::warn!(
                    uid = caller.uid,
                    held_back,
                    "ReloadPolicy refused: not an administrator (one such line a minute at \
                     most; held_back counts the others)"
                );
            }
            return Err(fdo::Error::AccessDenied(format!(
                "uid {} is not an administrator of dmabroker (see `admins` in the policy)",
                caller.uid
            )));
        }
        tracing::info!(uid = caller.uid, "ReloadPolicy requested over D-Bus");
        if self.reload.run().await {
            Ok(())
        } else {
            Err(fdo::Error::Failed(
                "the policy files could not be loaded; the previous policy stays in force \
                 (the daemon's log says why)"
                    .into(),
            ))
        }
    }

    #[zbus(signal)]
    pub async fn client_connected(
        emitter: &SignalEmitter<'_>,
        client: u64,
        uid: u32,
        pid: i32,
    ) -> zbus::Result<()>;

    #[zbus(signal)]
    pub async fn client_disconnected(emitter: &SignalEmitter<'_>, client: u64) -> zbus::Result<()>;

    #[zbus(signal)]
    pub async fn buffer_allocated(
        emitter: &SignalEmitter<'_>,
        buffer: u64,
        size: u64,
        heap: &str,
        owner: u64,
    ) -> zbus::Result<()>;

    #[zbus(signal)]
    pub async fn buffer_freed(emitter: &SignalEmitter<'_>, buffer: u64) -> zbus::Result<()>;

    /// A client died holding write access: the contents may be torn.
    #[zbus(signal)]
    pub async fn writer_lost(
        emitter: &SignalEmitter<'_>,
        buffer: u64,
        client: u64,
    ) -> zbus::Result<()>;

    /// A write access outlived the client's hold limit and was taken away.
    #[zbus(signal)]
    pub async fn access_revoked(
        emitter: &SignalEmitter<'_>,
        buffer: u64,
        access: u64,
        client: u64,
    ) -> zbus::Result<()>;
}
