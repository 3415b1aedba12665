//! Filling in the [views](super::views) from the broker's state.
//!
//! The functions taking `&State` run with the state locked, on the D-Bus
//! thread, while the data path may be waiting for the same lock: they only
//! copy what they need. The costlier half (text, ages, percentiles) is done
//! afterwards on the copies ([`RawBuffer::finish`], [`statistics`]).
//!
//! The lists grow with the tables, so they are copied [`CHUNK`] entries per
//! hold of the lock: first the ids, then the entries a chunk at a time
//! ([`buffers_among`], [`clients_among`]). A client's grant then waits for
//! one chunk at most, not for a copy of ten thousand buffers. The price is
//! that a list is not one instant: every entry is consistent in itself,
//! but a buffer freed after its id was taken is left out, and one
//! allocated meanwhile is not listed yet.

use std::collections::{BTreeMap, HashMap};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use dmabroker_fence::{FenceState, FenceView, Mode, WaiterView};

use super::views::{
    BufferDetail, BufferView, ClientView, FenceInfo, HeapView, HolderInfo, Statistics, Totals,
    WaiterInfo,
};
use crate::broker::{BufferEntry, ClientEntry, State};
use crate::stats::Stats;

pub fn unix_seconds(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn micros_since(now: Instant, since: Instant) -> u64 {
    u64::try_from(now.saturating_duration_since(since).as_micros()).unwrap_or(u64::MAX)
}

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Autofence => "autofence",
        Mode::NoAutofence => "no-autofence",
    }
}

/// Usable heaps in fallback order, nothing counted yet; [`count_heaps`]
/// adds the buffers, a chunk at a time.
pub fn heaps(state: &State) -> Vec<HeapView> {
    state
        .heaps
        .heaps()
        .iter()
        .map(|h| HeapView {
            name: h.name.clone(),
            backend: h.backend.name().to_owned(),
            buffers: 0,
            bytes: 0,
        })
        .collect()
}

/// Counts the buffers of `chunk` still alive into `views`, adding any other
/// heap names they carry (adopted buffers), so the buffer counts add up to
/// the totals.
pub fn count_heaps(state: &State, chunk: &[u64], views: &mut Vec<HeapView>) {
    for buffer in chunk.iter().filter_map(|id| state.buffers.get(id)) {
        let index = match views.iter().position(|v| v.name == buffer.heap) {
            Some(index) => index,
            None => {
                views.push(HeapView {
                    name: buffer.heap.clone(),
                    backend: buffer.origin.backend_name().to_owned(),
                    buffers: 0,
                    bytes: 0,
                });
                views.len() - 1
            }
        };
        views[index].buffers += 1;
        views[index].bytes += buffer.size;
    }
}

pub fn totals(state: &State) -> Totals {
    Totals {
        clients: state.clients.len() as u64,
        buffers: state.buffers.len() as u64,
        bytes: state.total_bytes(),
        // One entry per fence the arbiter holds (granted, pending kernel
        // fences, or handed to a kernel fence), less those their clients
        // ended through end words: one atomic load per word in use.
        fences: state.live_fence_count() as u64,
        waiters: state.waiters.len() as u64,
    }
}

fn client_view(state: &State, client: &ClientEntry, longest_wait_us: u64) -> ClientView {
    let identity = &client.peer.identity;
    ClientView {
        id: client.id,
        uid: identity.uid,
        pid: client.peer.pid,
        name: client.name.clone(),
        exe: crate::identity::exe_display(&identity.exe),
        unit: identity.unit.clone().unwrap_or_default(),
        rule: client.resolved.rule.clone(),
        autofence: if client.autofence {
            "autofence"
        } else {
            "no-autofence"
        }
        .to_owned(),
        buffers: client.buffers.len() as u64,
        bytes: client.charged_bytes,
        accesses_held: state.live_held_by(client.id) as u64,
        requests_waiting: state.arbiter.waiting_for(client.id) as u64,
        longest_wait_us,
        connected_at: unix_seconds(client.connected),
    }
}

/// Entries copied per hold of the lock (see the module's documentation).
/// Copying one costs a few hundred nanoseconds (its strings and lists are
/// cloned), so a chunk holds the lock for microseconds.
pub const CHUNK: usize = 16;

/// The ids a chunked list will copy, sorted, with what the client chunks
/// need from the whole table: since when each client's oldest request has
/// waited (one pass over the waiters, which hold no strings to clone).
#[derive(Debug)]
pub struct ClientIds {
    pub ids: Vec<u64>,
    oldest_wait: HashMap<u64, Instant>,
}

pub fn client_ids(state: &State) -> ClientIds {
    let mut oldest_wait: HashMap<u64, Instant> = HashMap::new();
    for waiter in state.waiters.values() {
        oldest_wait
            .entry(waiter.client)
            .and_modify(|since| *since = (*since).min(waiter.since))
            .or_insert(waiter.since);
    }
    let mut ids: Vec<u64> = state.clients.keys().copied().collect();
    ids.sort_unstable();
    ClientIds { ids, oldest_wait }
}

/// The clients of `chunk` still connected, in its order.
pub fn clients_among(state: &State, all: &ClientIds, chunk: &[u64]) -> Vec<ClientView> {
    let now = Instant::now();
    chunk
        .iter()
        .filter_map(|id| state.clients.get(id))
        .map(|c| {
            let wait = all
                .oldest_wait
                .get(&c.id)
                .map_or(0, |since| micros_since(now, *since));
            client_view(state, c, wait)
        })
        .collect()
}

fn fence_info(fence: &FenceView, now: Instant) -> FenceInfo {
    FenceInfo {
        access: fence.id,
        kind: fence.access.name().to_owned(),
        holder: fence.holder,
        state: match fence.state {
            FenceState::Held => "held",
            FenceState::AwaitingKernelFence => "kernel-fence",
        }
        .to_owned(),
        mode: mode_name(fence.mode).to_owned(),
        age_us: micros_since(now, fence.since),
    }
}

fn waiter_info(waiter: &WaiterView, now: Instant) -> WaiterInfo {
    WaiterInfo {
        waiter: waiter.id,
        client: waiter.client,
        kind: waiter.access.name().to_owned(),
        age_us: micros_since(now, waiter.since),
    }
}

/// One buffer as copied under the lock: no text is made and no age is
/// computed until [`RawBuffer::finish`].
#[derive(Debug)]
pub struct RawBuffer {
    id: u64,
    heap: String,
    backend: &'static str,
    name: String,
    size: u64,
    inode: u64,
    owner: u64,
    holders: Vec<u64>,
    fences: Vec<FenceView>,
    /// Accesses held in the buffer's word while the broker does not
    /// arbitrate it: (holder, kind). They have no id and no age.
    word_fences: Vec<(u64, dmabroker_ipc::Access, bool)>,
    waiters: Vec<WaiterView>,
    created: SystemTime,
}

impl RawBuffer {
    fn copy(state: &State, buffer: &BufferEntry) -> RawBuffer {
        RawBuffer {
            id: buffer.id,
            heap: buffer.heap.clone(),
            backend: buffer.origin.backend_name(),
            name: buffer.name.clone(),
            size: buffer.size,
            inode: buffer.inode,
            owner: buffer.owner,
            holders: buffer.holders.iter().map(|h| h.client).collect(),
            // An access its client ended through its end word is over, even
            // if the broker has not looked at the word yet.
            fences: state
                .arbiter
                .fences(buffer.id)
                .into_iter()
                .filter(|f| state.access_is_live(f.id))
                .collect(),
            word_fences: state
                .word_fences(buffer.id)
                .into_iter()
                .map(|(holder, kind)| {
                    let autofence = state.clients.get(&holder).is_none_or(|c| c.autofence);
                    (holder, kind, autofence)
                })
                .collect(),
            waiters: state.arbiter.waiters(buffer.id),
            created: buffer.created,
        }
    }

    pub fn finish(self, now: Instant) -> BufferView {
        BufferView {
            id: self.id,
            heap: self.heap,
            backend: self.backend.to_owned(),
            name: self.name,
            size: self.size,
            inode: self.inode,
            owner: self.owner,
            holders: self.holders,
            fences: self
                .fences
                .iter()
                .map(|f| fence_info(f, now))
                .chain(self.word_fences.iter().map(|(holder, kind, autofence)| {
                    FenceInfo {
                        access: 0,
                        kind: kind.name().to_owned(),
                        holder: *holder,
                        state: "word".to_owned(),
                        mode: mode_name(if *autofence {
                            Mode::Autofence
                        } else {
                            Mode::NoAutofence
                        })
                        .to_owned(),
                        age_us: 0,
                    }
                }))
                .collect(),
            waiters: self.waiters.iter().map(|w| waiter_info(w, now)).collect(),
            created_at: unix_seconds(self.created),
        }
    }
}

/// The ids of all buffers, sorted.
pub fn buffer_ids(state: &State) -> Vec<u64> {
    let mut ids: Vec<u64> = state.buffers.keys().copied().collect();
    ids.sort_unstable();
    ids
}

/// The buffers of `chunk` still alive, in its order; see [`finish_buffers`].
pub fn buffers_among(state: &State, chunk: &[u64]) -> Vec<RawBuffer> {
    chunk
        .iter()
        .filter_map(|id| state.buffers.get(id))
        .map(|b| RawBuffer::copy(state, b))
        .collect()
}

/// Buffers in the order copied (by id).
pub fn finish_buffers(raw: Vec<RawBuffer>) -> Vec<BufferView> {
    let now = Instant::now();
    raw.into_iter().map(|b| b.finish(now)).collect()
}

/// One buffer in detail, copied under the lock; see [`RawDetail::finish`].
#[derive(Debug)]
pub struct RawDetail {
    buffer: RawBuffer,
    /// (client, pid, name, holding since)
    holders: Vec<(u64, i32, String, SystemTime)>,
    share_tokens: u64,
    dma_buf: bool,
}

pub fn buffer(state: &State, id: u64) -> Option<RawDetail> {
    let entry = state.buffers.get(&id)?;
    let holders = entry
        .holders
        .iter()
        .map(|h| {
            let client = state.clients.get(&h.client);
            (
                h.client,
                client.map_or(0, |c| c.peer.pid),
                client.map(|c| c.name.clone()).unwrap_or_default(),
                h.since,
            )
        })
        .collect();
    Some(RawDetail {
        buffer: RawBuffer::copy(state, entry),
        holders,
        // Through its holders (each exports one token at most), not every
        // token of the daemon: this runs under the broker's lock.
        share_tokens: entry
            .holders
            .iter()
            .filter(|h| state.exports.contains_key(&(id, h.client)))
            .count() as u64,
        dma_buf: entry.origin.is_dma_buf(),
    })
}

impl RawDetail {
    pub fn finish(self) -> BufferDetail {
        let wall = SystemTime::now();
        BufferDetail {
            buffer: self.buffer.finish(Instant::now()),
            holders: self
                .holders
                .into_iter()
                .map(|(client, pid, name, since)| HolderInfo {
                    client,
                    pid,
                    name,
                    held_for_us: wall
                        .duration_since(since)
                        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
                })
                .collect(),
            share_tokens: self.share_tokens,
            dma_buf: self.dma_buf,
        }
    }
}

/// The counters as they are, copied while locked; the percentiles are
/// computed by [`statistics`] afterwards, since sorting the wait samples is
/// the one costly step.
pub fn stats(state: &State) -> Stats {
    state.stats.clone()
}

pub fn statistics(stats: &Stats) -> Statistics {
    let (p50, p99) = stats.wait_percentiles();
    let micros = |d: std::time::Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    Statistics {
        allocations: stats.allocations,
        frees: stats.frees,
        imports: stats.imports,
        exports: stats.exports,
        adoptions: stats.adoptions,
        grants: stats.grants,
        waits: stats.waits,
        wait_p50_us: micros(p50),
        wait_p99_us: micros(p99),
        cache_syncs: stats.cache_syncs,
        cache_syncs_skipped: stats.cache_syncs_skipped,
        writer_lost: stats.writer_lost,
        revocations: stats.revocations,
        timeouts: stats.timeouts,
        kernel_fences_imported: stats.kernel_fences_imported,
        refusals: stats
            .refusals
            .iter()
            .map(|(k, v)| ((*k).to_owned(), *v))
            .collect::<BTreeMap<_, _>>(),
    }
}
