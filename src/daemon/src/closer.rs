//! Lets go of big buffers off the broker's thread.
//!
//! The last close of a buffer's fd gives its pages back to the kernel, and
//! that takes time in proportion to the pages: about 60 ms for a touched
//! 1 GiB memfd on the build machine, and a dma-heap frees its pages one by
//! one. The broker's thread serves every client, so closing there would
//! make everyone wait for one client's free (or its disconnect). Small
//! buffers are closed in place: handing them to another thread costs more
//! than the close.

use std::collections::BTreeMap;
use std::sync::mpsc::{channel, Sender};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use crate::client_fds::Uids;

/// Buffers of this size or more are closed on the closer's thread.
pub const CLOSE_APART_BYTES: u64 = 1 << 20;

/// The longest an allocation waits for the closes queued before it.
const EARLIER_CLOSES_WAIT: Duration = Duration::from_secs(5);

type Parcel = (Box<dyn Send>, CloseTicket);

/// Drops `owner` (the last copy of a buffer's fd, or anything holding
/// one) of a buffer of `size` bytes: here if the buffer is small, on the
/// closer's thread otherwise. If that thread cannot be had, here after all.
pub fn close_buffer(owner: impl Send + 'static, size: u64) {
    if size < CLOSE_APART_BYTES {
        drop(owner);
        return;
    }
    close_elsewhere(owner);
}

/// Drops `owner` on the closer's thread, whatever it holds: for fds of
/// buffers of unknown size (a connection's unsent replies).
pub fn close_elsewhere(owner: impl Send + 'static) {
    let parcel: Parcel = (Box::new(owner), ticket());
    match closer() {
        // The thread gone, the parcel comes back and is dropped here.
        Some(sender) => drop(sender.send(parcel)),
        None => drop(parcel),
    }
}

/// A buffer's close that has been handed to another thread and is not
/// done yet: dropped once it is. [`wait_for_earlier_closes`] waits for
/// the tickets taken before it.
#[derive(Debug)]
pub struct CloseTicket(u64);

/// Closes handed elsewhere and not done, by ticket number, each with the
/// users whose closing thread has it (`None`: the closer's) and `true` once
/// an allocation has waited its whole [`EARLIER_CLOSES_WAIT`] for it. A
/// close that takes that long is stuck (its file's release waits on a
/// lock a client holds, see `held_files`), and its pages will not come
/// back by waiting: later allocations do not wait for it again, nor for
/// any close queued behind it on the same thread (`stuck`), until that
/// thread gets through one.
#[derive(Debug, Default)]
struct Tickets {
    next: u64,
    open: BTreeMap<u64, (Option<Uids>, bool)>,
    stuck: std::collections::HashSet<Option<Uids>>,
}

fn tickets() -> (MutexGuard<'static, Tickets>, &'static Condvar) {
    static TICKETS: OnceLock<(Mutex<Tickets>, Condvar)> = OnceLock::new();
    let (tickets, done) = TICKETS.get_or_init(Default::default);
    (tickets.lock().unwrap_or_else(|p| p.into_inner()), done)
}

/// A ticket for a close about to be handed to the closer's thread.
pub fn ticket() -> CloseTicket {
    new_ticket(None)
}

/// A ticket for a close about to be handed to the closing thread of
/// `uids` (see `client_fds::Uids`).
pub fn ticket_of(uids: Uids) -> CloseTicket {
    new_ticket(Some(uids))
}

fn new_ticket(thread: Option<Uids>) -> CloseTicket {
    let (mut tickets, _) = tickets();
    let number = tickets.next;
    tickets.next += 1;
    tickets.open.insert(number, (thread, false));
    CloseTicket(number)
}

impl Drop for CloseTicket {
    fn drop(&mut self) {
        let (mut tickets, done) = tickets();
        if let Some((thread, _)) = tickets.open.remove(&self.0) {
            // That thread got through a close: it is not stuck (now).
            tickets.stuck.remove(&thread);
        }
        done.notify_all();
    }
}

/// Closes handed (or about to be handed) to a closing thread `uid` is
/// among and not done yet (tests: a uid of their own sees only theirs).
#[cfg(test)]
pub fn open_tickets_of(uid: u32) -> usize {
    let (tickets, _) = tickets();
    tickets
        .open
        .values()
        .filter(|(thread, _)| thread.as_ref().is_some_and(|t| t.contains(uid)))
        .count()
}

/// Waits (at most a few seconds) until every close handed elsewhere
/// before this call is done. An allocation from a device heap calls it
/// first, on its own thread: the pages a client freed just before must be
/// back before a heap that may run out (CMA) is asked again, as they were
/// when the broker closed them in place.
pub fn wait_for_earlier_closes() {
    wait_for_earlier_closes_within(EARLIER_CLOSES_WAIT);
}

fn wait_for_earlier_closes_within(limit: Duration) {
    let (tickets, done) = tickets();
    let before = tickets.next;
    let pending = |t: &mut Tickets| {
        t.open
            .range(..before)
            .any(|(_, (thread, waited_out))| !waited_out && !t.stuck.contains(thread))
    };
    let (mut tickets, waited) = done
        .wait_timeout_while(tickets, limit, pending)
        .unwrap_or_else(|p| p.into_inner());
    if waited.timed_out() {
        let stuck: Vec<u64> = tickets.open.range(..before).map(|(n, _)| *n).collect();
        tracing::warn!(
            closes = stuck.len(),
            "closes of freed buffers are taking longer than {limit:?}; allocating without waiting for them"
        );
        for number in stuck {
            if let Some((thread, waited_out)) = tickets.open.get_mut(&number) {
                *waited_out = true;
                let thread = thread.clone();
                tickets.stuck.insert(thread);
            }
        }
    }
}

fn closer() -> Option<&'static Sender<Parcel>> {
    static CLOSER: OnceLock<Option<Sender<Parcel>>> = OnceLock::new();
    CLOSER
        .get_or_init(|| {
            let (sender, parcels) = channel::<Parcel>();
            let spawned = std::thread::Builder::new()
                .name("dmabroker-closer".into())
                .spawn(move || {
                    for (owner, ticket) in parcels {
                        drop(owner);
                        drop(ticket);
                    }
                });
            match spawned {
                Ok(_) => Some(sender),
                Err(err) => {
                    tracing::warn!(%err, "no closer thread: big buffers are closed in place");
                    None
                }
            }
        })
        .as_ref()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::Receiver;
    use std::sync::Arc;
    use std::time::Duration;

    /// Stands for a buffer whose close takes as long as the test wants:
    /// its drop reports which thread it ran on, then waits to be let go.
    struct SlowClose {
        dropped_on: Sender<Option<String>>,
        release: Receiver<()>,
    }

    impl Drop for SlowClose {
        fn drop(&mut self) {
            let thread = std::thread::current().name().map(str::to_owned);
            let _ = self.dropped_on.send(thread);
            let _ = self.release.recv_timeout(Duration::from_secs(30));
        }
    }

    fn slow_close() -> (SlowClose, Receiver<Option<String>>, Sender<()>) {
        let (dropped_on, where_dropped) = channel();
        let (release_tx, release) = channel();
        let owner = SlowClose {
            dropped_on,
            release,
        };
        (owner, where_dropped, release_tx)
    }

    /// A big buffer's close that has started on the closer's thread and
    /// waits there until the returned sender lets it finish.
    fn slow_close_under_way() -> Sender<()> {
        let (slow, slow_dropped, release) = slow_close();
        close_buffer(slow, CLOSE_APART_BYTES);
        slow_dropped
            .recv_timeout(Duration::from_secs(10))
            .expect("the slow close started");
        release
    }

    /// A big buffer's close, however long it takes, does not hold up the
    /// caller (the broker's thread): it happens on the closer's thread.
    #[test]
    fn a_big_buffer_is_closed_on_the_closer_thread_without_waiting() {
        let _turn = waiting_turn();
        let (owner, where_dropped, release) = slow_close();
        close_buffer(owner, CLOSE_APART_BYTES);
        // Returned while the close is still blocked.
        let thread = where_dropped
            .recv_timeout(Duration::from_secs(10))
            .expect("the big buffer is closed");
        assert_eq!(thread.as_deref(), Some("dmabroker-closer"));
        release.send(()).expect("let the close finish");
    }

    /// A small buffer is closed before `close_buffer` returns, on the
    /// caller's thread: a free's fd is gone when its reply goes out.
    #[test]
    fn a_small_buffer_is_closed_in_place() {
        let _turn = waiting_turn();
        let (owner, where_dropped, release) = slow_close();
        release.send(()).expect("nothing to wait for");
        close_buffer(owner, CLOSE_APART_BYTES - 1);
        assert_eq!(
            where_dropped.try_recv(),
            Ok(std::thread::current().name().map(str::to_owned))
        );
    }

    /// The tests, one at a time: a test's wait for earlier closes would
    /// wait for (or give up on, and then skip) the others' closes too.
    fn waiting_turn() -> std::sync::MutexGuard<'static, ()> {
        static TURN: Mutex<()> = Mutex::new(());
        TURN.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An allocation's wait for earlier closes (at most `limit`) on a
    /// thread of its own: says when it returns.
    fn waiting_elsewhere(limit: Duration) -> Receiver<()> {
        let (done_tx, done) = channel();
        std::thread::spawn(move || {
            wait_for_earlier_closes_within(limit);
            let _ = done_tx.send(());
        });
        done
    }

    /// A close stuck for good (a dma-buf whose release waits on a lock a
    /// client holds, see `held_files`) holds up the allocation that first
    /// waits for it, for the whole wait, and no allocation after it: its
    /// pages would not come back by waiting.
    #[test]
    fn a_stuck_close_is_waited_out_once() {
        let _turn = waiting_turn();
        let stuck = ticket_of(Uids::of(4_000_000_021));
        let first = std::time::Instant::now();
        wait_for_earlier_closes_within(Duration::from_millis(300));
        assert!(first.elapsed() >= Duration::from_millis(300));
        let done = waiting_elsewhere(Duration::from_secs(30));
        done.recv_timeout(Duration::from_secs(10))
            .expect("a later allocation waited again for the stuck close");
        // A close queued behind it on the same (stuck) thread is not waited
        // for either; one on another thread is.
        let behind = ticket_of(Uids::of(4_000_000_021));
        let elsewhere = ticket_of(Uids::of(4_000_000_022));
        let done = waiting_elsewhere(Duration::from_secs(30));
        assert!(
            done.recv_timeout(Duration::from_millis(200)).is_err(),
            "returned while a close on a thread not known to be stuck was going on"
        );
        drop(elsewhere);
        done.recv_timeout(Duration::from_secs(10))
            .expect("waited for a close behind a stuck one on the same thread");
        drop(behind);
        drop(stuck);
    }

    /// An allocation waits for the closes queued before it: the pages of
    /// a buffer freed just before are back when it asks its heap.
    #[test]
    fn waiting_for_earlier_closes_returns_once_they_are_done() {
        let _turn = waiting_turn();
        let release = slow_close_under_way();
        let waited = waiting_elsewhere(EARLIER_CLOSES_WAIT);
        assert!(
            waited.recv_timeout(Duration::from_millis(200)).is_err(),
            "returned while an earlier close was still going on"
        );
        release.send(()).expect("let the slow close finish");
        // Well within the wait's own limit, which it would also return at.
        waited
            .recv_timeout(EARLIER_CLOSES_WAIT / 5)
            .expect("returns once the earlier close is done");
    }

    /// Closes queue behind a slow one rather than being lost, and every
    /// one of them happens.
    #[test]
    fn big_closes_queue_behind_a_slow_one_and_all_happen() {
        let _turn = waiting_turn();
        let release = slow_close_under_way();
        let fd = Arc::new(std::fs::File::open("/dev/null").expect("open /dev/null"));
        close_buffer(Arc::clone(&fd), u64::MAX);
        assert_eq!(
            Arc::strong_count(&fd),
            2,
            "closed before the slow close ended"
        );
        release.send(()).expect("let the slow close finish");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while Arc::strong_count(&fd) > 1 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(Arc::strong_count(&fd), 1, "the queued close never ran");
    }
}
