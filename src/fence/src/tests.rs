//! One test per rule of docs/fences.md; the property test in tests/model.rs
//! covers their interleavings.
#![allow(clippy::unwrap_used)]

use super::*;
use std::time::Duration;

const B: BufferId = 7;
const B2: BufferId = 8;
use Access::*;
use Mode::*;

struct T {
    a: Arbiter,
    t0: Instant,
    tick: u64,
}

impl T {
    fn new() -> Self {
        let mut a = Arbiter::new();
        a.add_buffer(B);
        a.add_buffer(B2);
        T {
            a,
            t0: Instant::now(),
            tick: 0,
        }
    }

    fn now(&mut self) -> Instant {
        self.tick += 1;
        self.t0 + Duration::from_millis(self.tick)
    }

    fn begin_on(&mut self, buffer: BufferId, c: ClientId, acc: Access, mode: Mode) -> BeginOutcome {
        let now = self.now();
        self.a.begin(c, buffer, acc, mode, now).unwrap()
    }

    /// Begin that must be granted at once.
    fn grant(&mut self, c: ClientId, acc: Access) -> Grant {
        match self.begin_on(B, c, acc, Autofence) {
            BeginOutcome::Granted(g) => g,
            BeginOutcome::Queued(w) => panic!("{acc:?} for {c} queued as {w}"),
        }
    }

    /// Begin that must be queued.
    fn queue(&mut self, c: ClientId, acc: Access) -> WaiterId {
        match self.begin_on(B, c, acc, Autofence) {
            BeginOutcome::Queued(w) => w,
            BeginOutcome::Granted(g) => panic!("{acc:?} for {c} granted: {g:?}"),
        }
    }

    fn end(&mut self, c: ClientId, id: AccessId) -> Vec<Grant> {
        let now = self.now();
        self.a.end(c, id, now).unwrap()
    }

    fn holders(&self) -> Vec<ClientId> {
        self.a.fences(B).iter().map(|f| f.holder).collect()
    }
}

fn waiters_of(grants: &[Grant]) -> Vec<WaiterId> {
    grants.iter().map(|g| g.waiter.unwrap()).collect()
}

#[test]
fn access_kinds() {
    let writes: Vec<_> = Access::ALL.into_iter().filter(|a| a.is_write()).collect();
    assert_eq!(writes, [CpuWrite, CpuReadWrite, DeviceWrite]);
    let cpu: Vec<_> = Access::ALL.into_iter().filter(|a| a.is_cpu()).collect();
    assert_eq!(cpu, [CpuRead, CpuWrite, CpuReadWrite]);
    assert_eq!(CpuReadWrite.name(), "cpu-read-write");
    assert!(!CpuRead.conflicts_with(DeviceRead));
    assert!(DeviceRead.conflicts_with(CpuReadWrite));
}

#[test]
fn readers_share() {
    let mut t = T::new();
    t.grant(1, CpuRead);
    t.grant(2, DeviceRead);
    t.grant(3, CpuRead);
    assert_eq!(t.holders(), [1, 2, 3]);
    assert_eq!(t.a.held_by(1), 1);
}

#[test]
fn writer_waits_for_readers() {
    let mut t = T::new();
    let r1 = t.grant(1, CpuRead).access_id;
    let r2 = t.grant(2, DeviceRead).access_id;
    let w = t.queue(3, DeviceWrite);
    assert_eq!(t.a.waiting_for(3), 1);
    assert!(t.end(1, r1).is_empty(), "one reader left");
    let g = t.end(2, r2);
    assert_eq!(waiters_of(&g), [w]);
    assert_eq!((g[0].client, g[0].access), (3, DeviceWrite));
    assert!(g[0].outstanding.is_empty());
    assert_eq!(t.holders(), [3]);
    assert_eq!(t.a.waiting_for(3), 0);
}

#[test]
fn readers_wait_for_writer() {
    let mut t = T::new();
    let w = t.grant(1, CpuReadWrite).access_id;
    let r1 = t.queue(2, CpuRead);
    let r2 = t.queue(3, DeviceRead);
    // A writer excludes other writers too.
    let w2 = t.queue(4, CpuWrite);
    let g = t.end(1, w);
    assert_eq!(
        waiters_of(&g),
        [r1, r2],
        "both readers, FIFO, writer still waits"
    );
    assert_eq!(t.a.waiters(B)[0].id, w2);
}

#[test]
fn writer_at_head_holds_back_later_readers() {
    let mut t = T::new();
    let r = t.grant(1, CpuRead).access_id;
    let w = t.queue(2, CpuWrite);
    // Compatible with the current reader, but must not overtake the writer.
    let r2 = t.queue(3, CpuRead);
    assert_eq!(t.holders(), [1]);
    let g = t.end(1, r);
    assert_eq!(waiters_of(&g), [w]);
    let g = t.end(2, g[0].access_id);
    assert_eq!(waiters_of(&g), [r2]);
}

#[test]
fn consecutive_readers_granted_together_up_to_next_writer() {
    let mut t = T::new();
    let w = t.grant(1, DeviceWrite).access_id;
    let r1 = t.queue(2, CpuRead);
    let r2 = t.queue(3, DeviceRead);
    let r3 = t.queue(4, CpuRead);
    let w2 = t.queue(5, CpuWrite);
    let r4 = t.queue(6, CpuRead);
    let g = t.end(1, w);
    assert_eq!(waiters_of(&g), [r1, r2, r3]);
    // Ids are handed out in the order of the grants.
    assert!(g.windows(2).all(|p| p[0].access_id < p[1].access_id));
    assert_eq!(
        t.a.waiters(B).iter().map(|w| w.id).collect::<Vec<_>>(),
        [w2, r4]
    );
}

#[test]
fn no_autofence_is_not_blocked_and_lists_outstanding() {
    let mut t = T::new();
    let r = t.grant(1, CpuRead).access_id;
    let w = t.grant(2, CpuRead).access_id;
    // A read ignores other reads: nothing outstanding.
    let BeginOutcome::Granted(g) = t.begin_on(B, 3, DeviceRead, NoAutofence) else {
        panic!("no-autofence queued")
    };
    assert!(g.outstanding.is_empty());
    assert_eq!(g.mode, NoAutofence);
    // A write lists every fence present, in grant order.
    let BeginOutcome::Granted(gw) = t.begin_on(B, 4, DeviceWrite, NoAutofence) else {
        panic!("no-autofence queued")
    };
    let ids: Vec<_> = gw.outstanding.iter().map(|f| f.id).collect();
    assert_eq!(ids, [r, w, g.access_id]);
    // A read lists only the writes.
    let BeginOutcome::Granted(gr) = t.begin_on(B, 5, CpuRead, NoAutofence) else {
        panic!("no-autofence queued")
    };
    let ids: Vec<_> = gr.outstanding.iter().map(|f| f.id).collect();
    assert_eq!(ids, [gw.access_id]);
}

#[test]
fn no_autofence_does_not_wait_for_queue_but_autofence_waits_for_it() {
    let mut t = T::new();
    let r = t.grant(1, CpuRead).access_id;
    let qw = t.queue(2, CpuWrite);
    let BeginOutcome::Granted(nf) = t.begin_on(B, 3, DeviceWrite, NoAutofence) else {
        panic!("no-autofence queued")
    };
    assert_eq!(nf.outstanding.len(), 1);
    // The queued writer now also waits for the no-autofence fence.
    assert!(t.end(1, r).is_empty());
    let g = t.end(3, nf.access_id);
    assert_eq!(waiters_of(&g), [qw]);

    // And on an idle buffer, an autofence reader waits for a no-autofence writer.
    let BeginOutcome::Granted(nf) = t.begin_on(B2, 3, CpuWrite, NoAutofence) else {
        panic!("no-autofence queued")
    };
    let BeginOutcome::Queued(q) = t.begin_on(B2, 4, CpuRead, Autofence) else {
        panic!("autofence reader granted next to a writer")
    };
    let now = t.now();
    let g = t.a.end(3, nf.access_id, now).unwrap();
    assert_eq!(waiters_of(&g), [q]);
}

#[test]
fn kernel_fence_keeps_reservation_until_signalled() {
    let mut t = T::new();
    let d = t.grant(1, DeviceWrite).access_id;
    let r = t.queue(2, CpuRead);
    t.a.end_with_kernel_fence(1, d).unwrap();
    let f = t.a.fence(d).unwrap();
    assert_eq!(f.state, FenceState::AwaitingKernelFence);
    assert_eq!(t.a.held_by(1), 0, "the device holds it now, not the client");
    assert_eq!(t.a.waiters(B).len(), 1);
    // Neither the client nor a second hand-over can end it.
    assert_eq!(t.a.end(1, d, t.t0), Err(FenceError::AlreadyFenced(d)));
    assert_eq!(
        t.a.end_with_kernel_fence(1, d),
        Err(FenceError::AlreadyFenced(d))
    );
    let now = t.now();
    let g = t.a.kernel_fence_signalled(d, now);
    assert_eq!(waiters_of(&g), [r]);
    assert_eq!(t.a.fence(d), None);
    // A late duplicate signal is harmless.
    assert!(t.a.kernel_fence_signalled(d, now).is_empty());
}

#[test]
fn signal_for_a_fence_never_handed_over_is_ignored() {
    let mut t = T::new();
    let d = t.grant(1, DeviceRead).access_id;
    let now = t.now();
    assert!(t.a.kernel_fence_signalled(d, now).is_empty());
    assert_eq!(t.a.fence(d).unwrap().state, FenceState::Held);
}

#[test]
fn only_device_accesses_take_a_kernel_fence() {
    let mut t = T::new();
    let c = t.grant(1, CpuRead).access_id;
    assert_eq!(
        t.a.end_with_kernel_fence(1, c),
        Err(FenceError::NotDeviceAccess(c))
    );
    assert_eq!(t.a.fence(c).unwrap().state, FenceState::Held);
}

#[test]
fn client_death_releases_cpu_fences_with_writer_lost_and_keeps_kernel_fences() {
    let mut t = T::new();
    let w = t.grant(1, CpuWrite).access_id;
    let now = t.now();
    let BeginOutcome::Granted(dw) = t.a.begin(1, B2, DeviceWrite, Autofence, now).unwrap() else {
        panic!("idle buffer queued")
    };
    let now = t.now();
    let BeginOutcome::Granted(dr) = t.a.begin(1, B2, DeviceRead, NoAutofence, now).unwrap() else {
        panic!("no-autofence queued")
    };
    t.a.end_with_kernel_fence(1, dw.access_id).unwrap();
    let r1 = t.queue(2, CpuRead);
    let r2 = t.queue(3, CpuRead);
    let now = t.now();
    let BeginOutcome::Queued(r3) = t.a.begin(4, B2, CpuRead, Autofence, now).unwrap() else {
        panic!("reader granted next to a kernel-fenced writer")
    };
    let my_wait = t.queue(1, CpuRead);

    let now = t.now();
    let gone = t.a.client_gone(1, now, &[]);
    assert_eq!(gone.released, [w, dr.access_id]);
    assert_eq!(gone.kept_kernel_fences, [dw.access_id]);
    assert_eq!(gone.cancelled_waiters, [my_wait]);
    assert_eq!(waiters_of(&gone.grants), [r1, r2], "B2 still kernel-fenced");
    assert!(gone.grants.iter().all(|g| g.writer_lost && !g.revoked));
    assert_eq!(t.a.waiting_for(1), 0);
    assert_eq!(t.a.held_by(1), 0);

    // The mark cleared with that batch.
    let g = t.grant(5, CpuRead);
    assert!(!g.writer_lost);

    // The kernel fence outlives its client; a dropped read sets no mark.
    let now = t.now();
    let g = t.a.kernel_fence_signalled(dw.access_id, now);
    assert_eq!(waiters_of(&g), [r3]);
    assert!(!g[0].writer_lost);
}

#[test]
fn writer_lost_waits_for_the_next_grant_even_without_waiters() {
    let mut t = T::new();
    t.grant(1, DeviceWrite);
    let now = t.now();
    let gone = t.a.client_gone(1, now, &[]);
    assert!(gone.grants.is_empty());
    // Next grant, of either mode, hears about it; the one after does not.
    let BeginOutcome::Granted(g) = t.begin_on(B, 2, CpuRead, NoAutofence) else {
        panic!("no-autofence queued")
    };
    assert!(g.writer_lost);
    assert!(!t.grant(3, CpuRead).writer_lost);
}

/// A grant the daemon held back (for kernel fences or a cache sync) and
/// never sent took the buffer's news; its client going, by a hang-up or a
/// free, dropped that news with it, and the next reader was told nothing
/// of the writer lost before. Nor was a write it never heard of a lost one.
#[test]
fn a_grant_never_sent_gives_its_news_back_and_loses_no_writer() {
    for freed in [false, true] {
        let mut t = T::new();
        t.grant(1, DeviceWrite);
        let now = t.now();
        t.a.client_gone(1, now, &[]);
        let read = t.grant(2, CpuRead);
        assert!(read.writer_lost);
        let unsent = [Unsent {
            access: read.access_id,
            writer_lost: read.writer_lost,
            revoked: read.revoked,
        }];
        let now = t.now();
        if freed {
            t.a.release_client_buffer(2, B, now, &unsent);
        } else {
            t.a.client_gone(2, now, &unsent);
        }
        assert!(t.grant(3, CpuRead).writer_lost, "freed: {freed}");
    }
    // A write never sent: no lost writer.
    let mut t = T::new();
    let write = t.grant(1, CpuWrite);
    let unsent = [Unsent {
        access: write.access_id,
        writer_lost: false,
        revoked: false,
    }];
    let now = t.now();
    t.a.client_gone(1, now, &unsent);
    assert!(!t.grant(2, CpuRead).writer_lost);
}

#[test]
fn release_client_buffer_touches_only_that_buffer() {
    let mut t = T::new();
    let w = t.grant(1, CpuWrite).access_id;
    let now = t.now();
    let BeginOutcome::Granted(other) = t.a.begin(1, B2, CpuRead, Autofence, now).unwrap() else {
        panic!("idle buffer queued")
    };
    let q = t.queue(2, CpuRead);
    let now = t.now();
    let gone = t.a.release_client_buffer(1, B, now, &[]);
    assert_eq!(gone.released, [w]);
    assert_eq!(waiters_of(&gone.grants), [q]);
    assert!(gone.grants[0].writer_lost);
    assert_eq!(t.a.fence(other.access_id).unwrap().holder, 1);
    assert_eq!(t.a.held_by(1), 1);
}

#[test]
fn revoke_sets_revoked_on_next_batch() {
    let mut t = T::new();
    let w = t.grant(1, CpuWrite).access_id;
    let r1 = t.queue(2, CpuRead);
    let r2 = t.queue(3, DeviceRead);
    let now = t.now();
    let g = t.a.revoke(w, now).unwrap();
    assert_eq!(waiters_of(&g), [r1, r2]);
    assert!(g.iter().all(|g| g.revoked && !g.writer_lost));
    assert_eq!(t.a.held_by(1), 0);
    // Revoking a reader leaves the contents intact: no mark.
    let now = t.now();
    assert!(t.a.revoke(g[0].access_id, now).unwrap().is_empty());
    let now = t.now();
    let g = t.a.end(3, g[1].access_id, now).unwrap();
    assert!(g.is_empty());
    assert!(!t.grant(4, CpuWrite).revoked);
    assert_eq!(t.a.revoke(w, now), Err(FenceError::UnknownAccess(w)));
}

#[test]
fn cancel_of_head_writer_releases_readers_behind_it() {
    let mut t = T::new();
    t.grant(1, CpuRead);
    let w = t.queue(2, CpuWrite);
    let r1 = t.queue(3, CpuRead);
    let r2 = t.queue(4, DeviceRead);
    let now = t.now();
    let g = t.a.cancel(w, now).unwrap();
    assert_eq!(waiters_of(&g), [r1, r2]);
    assert_eq!(t.holders(), [1, 3, 4]);
    assert_eq!(t.a.cancel(w, now), Err(FenceError::UnknownWaiter(w)));
}

#[test]
fn not_holder_is_refused_and_changes_nothing() {
    let mut t = T::new();
    let r = t.grant(1, DeviceRead).access_id;
    let q = t.queue(2, CpuWrite);
    let before = (t.a.fences(B), t.a.waiters(B));
    let now = t.now();
    let not_holder = FenceError::NotHolder {
        access: r,
        client: 2,
    };
    assert_eq!(t.a.end(2, r, now), Err(not_holder.clone()));
    assert_eq!(t.a.end_with_kernel_fence(2, r), Err(not_holder));
    assert_eq!((t.a.fences(B), t.a.waiters(B)), before);
    assert_eq!(t.a.end(1, 999, now), Err(FenceError::UnknownAccess(999)));
    // A waiter id is not an access id.
    assert_eq!(t.a.end(2, q, now), Err(FenceError::UnknownAccess(q)));
    assert_eq!(
        t.a.begin(1, 404, CpuRead, Autofence, now),
        Err(FenceError::UnknownBuffer(404))
    );
    assert_eq!(t.a.end(1, r, now).unwrap().len(), 1);
}

#[test]
fn remove_buffer_returns_everything_and_forgets_it() {
    let mut t = T::new();
    let r = t.grant(1, CpuRead).access_id;
    let d = t.grant(2, DeviceRead).access_id;
    t.a.end_with_kernel_fence(2, d).unwrap();
    let q = t.queue(3, CpuWrite);
    let (fences, waiters) = t.a.remove_buffer(B);
    assert_eq!(fences.iter().map(|f| f.id).collect::<Vec<_>>(), [r, d]);
    assert_eq!(waiters.iter().map(|w| w.id).collect::<Vec<_>>(), [q]);
    assert!(!t.a.has_buffer(B));
    assert_eq!((t.a.held_by(1), t.a.waiting_for(3)), (0, 0));
    let now = t.now();
    assert!(t.a.kernel_fence_signalled(d, now).is_empty());
    assert_eq!(t.a.cancel(q, now), Err(FenceError::UnknownWaiter(q)));
    // Re-adding gives a fresh, empty reservation; ids are never reused.
    t.a.add_buffer(B);
    assert!(t.grant(1, CpuWrite).access_id > q);
}

#[test]
fn add_buffer_twice_keeps_the_reservation() {
    let mut t = T::new();
    t.grant(1, CpuWrite);
    t.a.add_buffer(B);
    assert_eq!(t.holders(), [1]);
}

#[test]
fn multi_buffer_grants_come_out_in_fifo_order() {
    let mut t = T::new();
    let now = t.now();
    let BeginOutcome::Granted(_) = t.a.begin(1, B2, CpuWrite, Autofence, now).unwrap() else {
        panic!()
    };
    t.grant(1, CpuWrite);
    let now = t.now();
    let BeginOutcome::Queued(q2) = t.a.begin(2, B2, CpuRead, Autofence, now).unwrap() else {
        panic!()
    };
    let q1 = t.queue(3, CpuRead);
    let now = t.now();
    let BeginOutcome::Queued(q3) = t.a.begin(4, B2, CpuRead, Autofence, now).unwrap() else {
        panic!()
    };
    let now = t.now();
    let gone = t.a.client_gone(1, now, &[]);
    assert_eq!(waiters_of(&gone.grants), [q2, q1, q3]);
    assert!(gone
        .grants
        .windows(2)
        .all(|p| p[0].access_id < p[1].access_id));
}

#[test]
fn errors_read_well() {
    assert_eq!(
        FenceError::NotHolder {
            access: 3,
            client: 9
        }
        .to_string(),
        "access 3 is not held by client 9"
    );
}

#[test]
fn a_buffer_marked_writer_lost_warns_its_next_grant_only() {
    let mut t = T::new();
    t.a.mark_writer_lost(B);
    let first = t.grant(1, CpuRead);
    assert!(first.writer_lost);
    let now = t.now();
    t.a.end(1, first.access_id, now).unwrap();
    assert!(!t.grant(2, CpuRead).writer_lost);
}

/// A live client's index outlives its last access (so a begin+end cycle
/// does not rebuild it), but a departed client's goes: at once, or with its
/// last kernel-fenced access.
#[test]
fn a_departed_clients_index_goes_with_its_last_fence() {
    let mut t = T::new();
    let g = t.grant(1, CpuWrite);
    t.end(1, g.access_id);
    assert_eq!(t.a.indexed_clients(), 1, "a live client keeps its index");
    let now = t.now();
    t.a.client_gone(1, now, &[]);
    assert_eq!(t.a.indexed_clients(), 0, "nothing held: gone at once");

    let d = t.grant(2, DeviceWrite).access_id;
    t.a.end_with_kernel_fence(2, d).unwrap();
    let now = t.now();
    let gone = t.a.client_gone(2, now, &[]);
    assert_eq!(gone.kept_kernel_fences, vec![d]);
    assert_eq!(t.a.indexed_clients(), 1, "kept for its kernel fence");
    let now = t.now();
    t.a.kernel_fence_signalled(d, now);
    assert_eq!(t.a.indexed_clients(), 0, "gone with its last fence");
}

/// Withdrawn together, a client's queued write and the read behind it
/// both leave before the queue is served: the read is not granted by the
/// write's leaving; a later reader of another client is.
#[test]
fn waiters_cancelled_together_leave_before_the_queue_is_served() {
    let mut t = T::new();
    t.grant(1, CpuRead);
    let w = t.queue(2, CpuWrite);
    let r = t.queue(2, CpuRead);
    let other = t.queue(3, CpuRead);
    let now = t.now();
    let g = t.a.cancel_all(&[w, r, 99], now);
    assert_eq!(waiters_of(&g), [other]);
    assert_eq!(t.a.waiting_for(2), 0);
    assert_eq!(t.holders(), [1, 3]);
}
