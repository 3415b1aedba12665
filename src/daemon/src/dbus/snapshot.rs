//! Filling in the [views](super::views) from the broker's state.
//!
//! The functions taking `&State` run with the state locked, on the D-Bus
//! thread, while the data path may be waiting for the same lock: they only
//! copy what they need. The costlier half (text, ages, percentiles) is done
//! afterwards on the copies ([`RawBuffer::finish`], [`statistics`]).

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

/// Usable heaps in fallback order, then any other heap names buffers carry
/// (adopted buffers), so the buffer counts always add up to the totals.
pub fn heaps(state: &State) -> Vec<HeapView> {
    let mut views: Vec<HeapView> = state
        .heaps
        .heaps()
        .iter()
        .map(|h| HeapView {
            name: h.name.clone(),
            backend: h.backend.name().to_owned(),
            buffers: 0,
            bytes: 0,
        })
        .collect();
    for buffer in state.buffers.values() {
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
    views
}

pub fn totals(state: &State) -> Totals {
    Totals {
        clients: state.clients.len() as u64,
        buffers: state.buffers.len() as u64,
        bytes: state.total_bytes(),
        // One entry per fence the arbiter holds (granted, pending kernel
        // fences, or handed to a kernel fence): counting them is O(1).
        fences: state.accesses.len() as u64,
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
        accesses_held: state.arbiter.held_by(client.id) as u64,
        requests_waiting: state.arbiter.waiting_for(client.id) as u64,
        longest_wait_us,
        connected_at: unix_seconds(client.connected),
    }
}

/// Clients by id.
pub fn clients(state: &State) -> Vec<ClientView> {
    let now = Instant::now();
    let mut oldest: HashMap<u64, Instant> = HashMap::new();
    for waiter in state.waiters.values() {
        oldest
            .entry(waiter.client)
            .and_modify(|since| *since = (*since).min(waiter.since))
            .or_insert(waiter.since);
    }
    let mut views: Vec<ClientView> = state
        .clients
        .values()
        .map(|c| {
            let wait = oldest
                .get(&c.id)
                .map_or(0, |since| micros_since(now, *since));
            client_view(state, c, wait)
        })
        .collect();
    views.sort_by_key(|c| c.id);
    views
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
            fences: state.arbiter.fences(buffer.id),
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
            fences: self.fences.iter().map(|f| fence_info(f, now)).collect(),
            waiters: self.waiters.iter().map(|w| waiter_info(w, now)).collect(),
            created_at: unix_seconds(self.created),
        }
    }
}

/// Buffers in no particular order; see [`finish_buffers`].
pub fn buffers(state: &State) -> Vec<RawBuffer> {
    state
        .buffers
        .values()
        .map(|b| RawBuffer::copy(state, b))
        .collect()
}

/// Buffers by id.
pub fn finish_buffers(raw: Vec<RawBuffer>) -> Vec<BufferView> {
    let now = Instant::now();
    let mut views: Vec<BufferView> = raw.into_iter().map(|b| b.finish(now)).collect();
    views.sort_by_key(|b| b.id);
    views
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
        share_tokens: state.tokens.values().filter(|t| t.buffer == id).count() as u64,
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
