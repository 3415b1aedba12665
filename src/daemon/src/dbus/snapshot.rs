//! Filling in the [views](super::views) from the broker's state.
//!
//! The functions taking `&State` run with the state locked, on the D-Bus
//! thread, while the data path may be waiting for the same lock: they only
//! copy what they need. The costlier half (text, ages, percentiles) is done
//! afterwards on the copies ([`RawBuffer::finish`], [`statistics`]).
//!
//! The lists grow with the tables, so they are copied a [`BUDGET`] of work
//! per hold of the lock: first the ids, then the entries, one at a time,
//! until the hold has done that much ([`within_budget`]). An entry's work
//! is what copying it walks: a buffer's fences, waiters and holders, a
//! client's buffers. A client's grant then waits for one hold's work at
//! most, not for a copy of ten thousand buffers, nor for sixteen buffers
//! of a thousand fences each, which any user can make. The price is that
//! a list is not one instant: every entry is consistent in itself, but a
//! buffer freed after its id was taken is left out, and one allocated
//! meanwhile is not listed yet.

use std::collections::BTreeMap;
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

/// Usable heaps in fallback order, nothing counted yet; [`count_heap`]
/// adds the buffers, a [`BUDGET`] at a time.
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

/// Counts buffer `id`, if still alive, into `views`, adding any other
/// heap name it carries (adopted buffers), so the buffer counts add up to
/// the totals; returns the work done (see [`BUDGET`]).
pub fn count_heap(state: &State, id: u64, views: &mut Vec<HeapView>) -> usize {
    if let Some(buffer) = state.buffers.get(&id) {
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
    1
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
        unit: crate::identity::unit_display(&identity.unit),
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

/// Work done per hold of the lock (see the module's documentation), in
/// things copied or looked up: one per entry, plus one per fence, waiter
/// or holder of a buffer and per buffer of a client. One costs up to a
/// few hundred nanoseconds (a fence is looked up among the live
/// accesses; strings are cloned), so a hold lasts tens of microseconds.
/// An entry is never split: one buffer with the most accesses a buffer
/// takes (1,024) is one hold of some 0.1 ms.
pub const BUDGET: usize = 256;

/// Visits `ids` in order, each with `visit`, which returns the work it
/// did, until the work reaches [`BUDGET`]; returns how many it visited
/// (at least one, if there is one).
pub fn within_budget(ids: &[u64], mut visit: impl FnMut(u64) -> usize) -> usize {
    let mut spent = 0;
    let mut visited = 0;
    for &id in ids {
        spent += visit(id);
        visited += 1;
        if spent >= BUDGET {
            break;
        }
    }
    visited
}

/// The ids of all clients, sorted.
pub fn client_ids(state: &State) -> Vec<u64> {
    let mut ids: Vec<u64> = state.clients.keys().copied().collect();
    ids.sort_unstable();
    ids
}

/// Client `id`, if still connected, into `views`; returns the work done
/// (see [`BUDGET`]): its access count reads the word of each of its
/// buffers, and its longest wait looks at each of its queued requests.
/// The wait is found in the same hold as the rest: one found in an
/// earlier hold showed a wait beside no request waiting.
pub fn copy_client(state: &State, id: u64, views: &mut Vec<ClientView>) -> usize {
    let Some(client) = state.clients.get(&id) else {
        return 1;
    };
    let mut waiting = 0;
    let oldest = state
        .arbiter
        .waiters_of(id)
        .inspect(|_| waiting += 1)
        .filter_map(|waiter| state.waiters.get(&waiter))
        .map(|waiter| waiter.since)
        .min();
    let wait = oldest.map_or(0, |since| micros_since(Instant::now(), since));
    views.push(client_view(state, client, wait));
    1 + client.buffers.len() + waiting
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
    /// The copy, and the work it took (see [`BUDGET`]): every fence the
    /// arbiter holds for the buffer is looked up, live or not.
    fn copy(state: &State, buffer: &BufferEntry) -> (RawBuffer, usize) {
        let fences = state.arbiter.fences(buffer.id);
        let looked_up = fences.len();
        let copy = RawBuffer {
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
            fences: fences
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
        };
        let work = 1 + looked_up + copy.word_fences.len() + copy.waiters.len() + copy.holders.len();
        (copy, work)
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

/// The most a list's answer may take on the wire. The system bus passes
/// messages up to 32 MiB and disconnects a sender past that; one user
/// can make a million fences (256 connections of 4,096 accesses), some
/// 80 MiB of `ListBuffers`. Half the bus's limit leaves room for the
/// estimate's error.
pub const MAX_REPLY_BYTES: usize = 16 << 20;

/// What a list of copied buffers will take on the wire, estimated from
/// above while it is copied, so that a copy past [`MAX_REPLY_BYTES`]
/// stops (and takes no more memory) rather than being sent.
#[derive(Debug, Default)]
pub struct ReplySize {
    bytes: usize,
}

impl ReplySize {
    /// A fence is two u64s, an i64 and three short strings, each string
    /// a length, its bytes and a NUL, aligned: under 96 bytes. A waiter
    /// is fewer; a buffer's own fields, with padding, under 128 bytes
    /// beside its strings.
    pub fn add(&mut self, buffer: &RawBuffer) {
        let strings = buffer.heap.len() + buffer.name.len() + buffer.backend.len();
        let lists = 96 * (buffer.fences.len() + buffer.word_fences.len() + buffer.waiters.len())
            + 8 * buffer.holders.len();
        self.bytes = self.bytes.saturating_add(128 + strings + lists);
    }

    pub fn over(&self) -> bool {
        self.bytes > MAX_REPLY_BYTES
    }
}

/// Buffer `id`, if still alive, into `raw` (see [`finish_buffers`]);
/// returns the work done (see [`BUDGET`]).
pub fn copy_buffer(state: &State, id: u64, raw: &mut Vec<RawBuffer>) -> usize {
    let Some(buffer) = state.buffers.get(&id) else {
        return 1;
    };
    let (copy, work) = RawBuffer::copy(state, buffer);
    raw.push(copy);
    work
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
        buffer: RawBuffer::copy(state, entry).0,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::BufferOrigin;
    use crate::heaps::{Backend, HeapConfig, HeapRegistry};
    use crate::held_files::HeldFd;
    use dmabroker_fence::Access;
    use std::path::PathBuf;
    use std::sync::Arc;

    fn state() -> State {
        let heaps = HeapRegistry::discover(&HeapConfig {
            dma_heap_dir: PathBuf::from("/nonexistent"),
            udmabuf_path: PathBuf::from("/nonexistent"),
            order: None,
            enable_memfd: true,
        });
        State::new(
            heaps,
            dmabroker_policy::Policy::builtin(),
            crate::broker::DaemonLimits::default(),
        )
    }

    /// A memfd buffer with `readers` read fences on it.
    fn read_by(state: &mut State, readers: usize) -> u64 {
        let fd = nix::sys::memfd::memfd_create(
            c"snapshot-test",
            nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
        )
        .expect("memfd");
        let id = state.buffers.len() as u64 + 1;
        state.buffers.insert(
            id,
            BufferEntry {
                id,
                fd: Arc::new(HeldFd::from(fd)),
                size: 4096,
                heap: "memfd".into(),
                origin: BufferOrigin::Allocated(Backend::Memfd),
                name: String::new(),
                inode: 0,
                owner: 1,
                holders: Vec::new(),
                created: SystemTime::now(),
                word: None,
            },
        );
        state.arbiter.add_buffer(id);
        for reader in 0..readers {
            let client = reader as u64 + 1;
            let outcome = state
                .arbiter
                .begin(client, id, Access::CpuRead, Mode::Autofence, Instant::now())
                .expect("a read is granted beside reads");
            let dmabroker_fence::BeginOutcome::Granted(grant) = outcome else {
                panic!("a read queued beside reads");
            };
            state.accesses.insert(
                grant.access_id,
                crate::broker::AccessEntry::new(
                    client,
                    id,
                    dmabroker_ipc::Access::CpuRead,
                    true,
                    0,
                ),
            );
        }
        id
    }

    /// A hold of the lock stops once its work reaches the budget, and
    /// always makes progress.
    #[test]
    fn a_hold_visits_entries_until_its_work_reaches_the_budget() {
        let ids: Vec<u64> = (0..1000).collect();
        assert_eq!(within_budget(&ids, |_| 1), BUDGET);
        assert_eq!(within_budget(&ids, |_| 100), 3);
        assert_eq!(within_budget(&ids, |_| 10 * BUDGET), 1);
        assert_eq!(within_budget(&ids[..5], |_| 1), 5);
        assert_eq!(within_budget(&[], |_| 1), 0);
    }

    /// Listing buffers copied 16 per hold of the lock whatever they held:
    /// 16 buffers with a thousand reads each (which one user's few
    /// connections may make) held the lock for some 2 ms per hold, and a
    /// `ListBuffers` in a loop cut the broker to a request per hold. A
    /// buffer's fences count as work: a hold stops after the buffer that
    /// reaches the budget. Found by review.
    #[test]
    fn a_buffer_with_many_fences_is_copied_in_a_hold_of_its_own() {
        let mut state = state();
        let ids: Vec<u64> = (0..16).map(|_| read_by(&mut state, 1000)).collect();
        let mut raw = Vec::new();
        let copied = within_budget(&ids, |id| copy_buffer(&state, id, &mut raw));
        assert_eq!(copied, 1, "a hold went on past a buffer of 1,000 fences");
        assert_eq!(raw.len(), 1);
        // Light buffers still go many to a hold.
        let light: Vec<u64> = (0..64).map(|_| read_by(&mut state, 1)).collect();
        let copied = within_budget(&light, |id| copy_buffer(&state, id, &mut raw));
        assert_eq!(copied, 64, "two units of work each: all fit in one hold");
    }

    /// The estimate of a list's size on the wire is never below what the
    /// bus carries: encoded as D-Bus does, a buffer of a thousand fences
    /// takes less than the estimate says.
    #[test]
    fn a_lists_size_is_estimated_from_above() {
        let mut state = state();
        let busy = read_by(&mut state, 1000);
        let mut raw = Vec::new();
        copy_buffer(&state, busy, &mut raw);
        let mut one = ReplySize::default();
        one.add(&raw[0]);
        assert!(!one.over());
        // Two hundred such buffers, some 19 MB, are too many for one answer.
        let mut many = ReplySize::default();
        (0..200).for_each(|_| many.add(&raw[0]));
        assert!(many.over());
        let views = finish_buffers(raw);
        let ctxt = zbus::zvariant::serialized::Context::new_dbus(zbus::zvariant::LE, 0);
        let encoded = zbus::zvariant::to_bytes(ctxt, &views).expect("encode");
        assert!(
            encoded.len() <= one.bytes,
            "{} bytes encoded, {} estimated",
            encoded.len(),
            one.bytes
        );
    }
}
