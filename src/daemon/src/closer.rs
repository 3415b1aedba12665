//! Lets go of big buffers off the broker's thread.
//!
//! The last close of a buffer's fd gives its pages back to the kernel, and
//! that takes time in proportion to the pages: about 60 ms for a touched
//! 1 GiB memfd on the build machine, and a dma-heap frees its pages one by
//! one. The broker's thread serves every client, so closing there would
//! make everyone wait for one client's free (or its disconnect). Small
//! buffers are closed in place: handing them to another thread costs more
//! than the close.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

/// Buffers of this size or more are closed on the closer's thread.
pub const CLOSE_APART_BYTES: u64 = 1 << 20;

/// The longest an allocation waits for the closes queued before it.
const EARLIER_CLOSES_WAIT: Duration = Duration::from_secs(5);

type Parcel = Box<dyn Send>;

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
    let parcel: Parcel = Box::new(owner);
    match closer() {
        Some(closer) => {
            closer.queued.fetch_add(1, Ordering::AcqRel);
            if let Err(returned) = closer.sender.send(parcel) {
                // The thread is gone: counted as done, dropped here.
                closer.count_done();
                drop(returned);
            }
        }
        None => drop(parcel),
    }
}

/// Waits (at most a few seconds) until every close queued before this
/// call is done. An allocation from a device heap calls it first, on its
/// own thread: the pages a client freed just before must be back before
/// a heap that may run out (CMA) is asked again, as they were when the
/// broker closed them in place.
pub fn wait_for_earlier_closes() {
    let Some(closer) = closer() else {
        return;
    };
    let target = closer.queued.load(Ordering::Acquire);
    let done = closer.done.lock().unwrap_or_else(|p| p.into_inner());
    let _ = closer
        .closed
        .wait_timeout_while(done, EARLIER_CLOSES_WAIT, |done| *done < target);
}

struct Closer {
    sender: Sender<Parcel>,
    /// Parcels sent, and parcels dropped: the thread counts `done` up
    /// after each drop, and wakes whoever waits for it.
    queued: AtomicU64,
    done: Mutex<u64>,
    closed: Condvar,
}

impl Closer {
    fn count_done(&self) {
        let mut done = self.done.lock().unwrap_or_else(|p| p.into_inner());
        *done += 1;
        self.closed.notify_all();
    }
}

fn closer() -> Option<&'static Arc<Closer>> {
    static CLOSER: OnceLock<Option<Arc<Closer>>> = OnceLock::new();
    CLOSER
        .get_or_init(|| {
            let (sender, parcels) = channel::<Parcel>();
            let closer = Arc::new(Closer {
                sender,
                queued: AtomicU64::new(0),
                done: Mutex::new(0),
                closed: Condvar::new(),
            });
            let counted = Arc::clone(&closer);
            let spawned = std::thread::Builder::new()
                .name("dmabroker-closer".into())
                .spawn(move || {
                    for parcel in parcels {
                        drop(parcel);
                        counted.count_done();
                    }
                });
            match spawned {
                Ok(_) => Some(closer),
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

    /// A big buffer's close, however long it takes, does not hold up the
    /// caller (the broker's thread): it happens on the closer's thread.
    #[test]
    fn a_big_buffer_is_closed_on_the_closer_thread_without_waiting() {
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
        let (owner, where_dropped, release) = slow_close();
        release.send(()).expect("nothing to wait for");
        close_buffer(owner, CLOSE_APART_BYTES - 1);
        assert_eq!(
            where_dropped.try_recv(),
            Ok(std::thread::current().name().map(str::to_owned))
        );
    }

    /// An allocation waits for the closes queued before it: the pages of
    /// a buffer freed just before are back when it asks its heap.
    #[test]
    fn waiting_for_earlier_closes_returns_once_they_are_done() {
        let (slow, slow_dropped, release) = slow_close();
        close_buffer(slow, CLOSE_APART_BYTES);
        slow_dropped
            .recv_timeout(Duration::from_secs(10))
            .expect("the slow close started");
        let (waited_tx, waited) = channel();
        std::thread::spawn(move || {
            wait_for_earlier_closes();
            let _ = waited_tx.send(());
        });
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
        let (slow, slow_dropped, release) = slow_close();
        close_buffer(slow, CLOSE_APART_BYTES);
        slow_dropped
            .recv_timeout(Duration::from_secs(10))
            .expect("the slow close started");
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
