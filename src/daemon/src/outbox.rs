//! Per-connection outgoing messages: sent at once when the socket has room,
//! queued (up to the client's unread-replies cap) when it does not.
//!
//! Sending directly from whoever produced the message (often another
//! client's request: a writer's end grants a waiting reader) saves a task
//! hop on the hand-off path. A client that never reads fills its socket
//! buffer, then its queue, and is then disconnected: the broker never
//! blocks on it and never grows memory for it without bound.
//!
//! Fds are held back sooner: once a client has [`PER_CONNECTION`] of them
//! unread, a message carrying more waits here until it reads, because fds
//! in flight count against the daemon's own fd limit (`crate::inflight`).

use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use dmabroker_ipc::fdpass::{send_message, SendError};
use nix::errno::Errno;
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;

use crate::held_files::HeldFd;
use crate::inflight::{self, PER_CONNECTION};
use crate::kernel::socket::unread_by_peer;

/// One queued message and the fds that travel with it. The fds are shared
/// handles so a queued message keeps them open until it is really sent.
#[derive(Debug)]
struct Outgoing {
    bytes: Vec<u8>,
    fds: Vec<Arc<HeldFd>>,
    /// Counts against the cap: a reply. An event does not: it is often
    /// another client's doing (ending many fences a no-autofence client
    /// was told to wait for) that the client must not be cut off for.
    /// Events have a bound of their own, `MAX_QUEUED_EVENTS`.
    counted: bool,
}

#[derive(Debug, Default)]
struct Queue {
    messages: VecDeque<Outgoing>,
    /// How many queued messages count against the cap.
    counted: usize,
    /// How many queued messages are events.
    events: usize,
    /// Fds sent since the client was last seen to have read everything:
    /// an upper bound on the fds it has unread.
    fds_unread: usize,
    /// Fds of queued messages: held here, not yet in the socket.
    queued_fds: usize,
    closed: bool,
}

/// Events queued for a client that does not read before it is cut off.
/// Each grant it leaves unread may list up to 1,024 fences, each of which
/// ends in an event, so the reply cap alone bounded a deaf client's queue
/// only at hundreds of thousands of events. A client that reads at all
/// never comes near this: it is sixteen full fence lists.
pub const MAX_QUEUED_EVENTS: usize = 16 * 1024;

enum Flush {
    Drained,
    /// The socket is full.
    Blocked,
    /// The next message carries fds and the client has too many unread.
    FdsUnread,
    Closed,
}

#[derive(Debug)]
pub struct Outbox {
    socket: Arc<AsyncFd<OwnedFd>>,
    queue: Mutex<Queue>,
    notify: Notify,
    cap: AtomicUsize,
    /// Cut off for not reading (an overflow): what it sent meanwhile is
    /// not carried out (see [`Outbox::cut_off`]). Outside the queue's lock:
    /// the connection looks before every message it reads.
    cut_off: AtomicBool,
    /// Tests: how many of the writer's next dups of the socket fail, as
    /// they do when the daemon is out of fds.
    #[cfg(test)]
    failing_dups: AtomicUsize,
}

/// How long a writer that could not wait for room (no fd for the wait, or
/// no room in the reactor) waits before it tries the socket again.
const WRITABLE_RETRY: std::time::Duration = std::time::Duration::from_millis(100);

/// Why a message was not delivered; the connection is closed either way.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("client has {0} unread messages queued; disconnecting it")]
    Overflow(usize),
    #[error("connection is closed")]
    Closed,
    #[error("send failed: {0}")]
    Send(#[from] SendError),
}

impl Outbox {
    pub fn new(socket: Arc<AsyncFd<OwnedFd>>, cap: usize) -> Self {
        Outbox {
            socket,
            queue: Mutex::new(Queue::default()),
            notify: Notify::new(),
            cap: AtomicUsize::new(cap.max(1)),
            cut_off: AtomicBool::new(false),
            #[cfg(test)]
            failing_dups: AtomicUsize::new(0),
        }
    }

    /// Whether the client was cut off for not reading its replies. Its
    /// connection is read no further: the requests it queued meanwhile
    /// would be carried out (allocations, accesses granted) for answers
    /// that can no longer reach it.
    pub fn cut_off(&self) -> bool {
        self.cut_off.load(Ordering::Relaxed)
    }

    /// The policy's `max_unread_replies` may change on reload.
    pub fn set_cap(&self, cap: usize) {
        self.cap.store(cap.max(1), Ordering::Relaxed);
    }

    /// Fds sent that the client may not have read yet (an upper bound:
    /// the count is reset only when the client is seen to have read
    /// everything).
    pub fn fds_maybe_unread(&self) -> usize {
        self.lock().fds_unread
    }

    pub fn queued(&self) -> usize {
        self.lock().messages.len()
    }

    /// Whether `fd` travels with a message still queued here (the socket
    /// was full, or the client had [`PER_CONNECTION`] fds unread). Looks
    /// at the queue only when it holds fds at all, which a client that
    /// reads its answers hardly ever has.
    pub fn has_queued(&self, fd: &Arc<HeldFd>) -> bool {
        let queue = self.lock();
        queue.queued_fds > 0
            && queue
                .messages
                .iter()
                .any(|msg| msg.fds.iter().any(|queued| Arc::ptr_eq(queued, fd)))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        // A panic while holding this lock cannot leave the queue torn (every
        // mutation is a single push/pop), so a poisoned lock is still usable.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn try_send(&self, bytes: &[u8], fds: &[Arc<HeldFd>]) -> Result<(), SendError> {
        let fds: Vec<BorrowedFd<'_>> = fds.iter().map(|fd| fd.as_fd()).collect();
        send_message(self.socket.get_ref().as_fd(), bytes, &fds, true)
    }

    /// Delivers or queues one encoded reply. Never blocks. The bytes are
    /// borrowed: the usual case sends them at once, and only a message that
    /// must wait is copied into the queue. On overflow or a dead socket the
    /// connection is shut down, which its reader sees as a hang-up.
    pub fn send(&self, bytes: &[u8], fds: Vec<Arc<HeldFd>>) -> Result<(), OutboxError> {
        self.deliver(bytes, fds, true)
    }

    /// As [`Outbox::send`], for an event: it waits however long the client
    /// takes to read (see `Outgoing::counted`).
    pub fn send_event(&self, bytes: &[u8]) -> Result<(), OutboxError> {
        self.deliver(bytes, Vec::new(), false)
    }

    fn deliver(
        &self,
        bytes: &[u8],
        fds: Vec<Arc<HeldFd>>,
        counted: bool,
    ) -> Result<(), OutboxError> {
        let mut queue = self.lock();
        if queue.closed {
            return Err(OutboxError::Closed);
        }
        if queue.messages.is_empty() && self.room_for_fds(&mut queue, fds.len()) {
            match self.try_send(bytes, &fds) {
                Ok(()) => {
                    queue.fds_unread += fds.len();
                    return Ok(());
                }
                Err(SendError::Os(Errno::EAGAIN)) => {}
                Err(err) => {
                    self.close_after(queue, &err);
                    return Err(err.into());
                }
            }
        }
        let cap = self.cap.load(Ordering::Relaxed);
        let full = if counted {
            queue.counted >= cap
        } else {
            queue.events >= MAX_QUEUED_EVENTS
        };
        if full {
            queue.closed = true;
            self.cut_off.store(true, Ordering::Relaxed);
            let dropped = std::mem::take(&mut queue.messages);
            let len = dropped.len();
            queue.counted = 0;
            queue.events = 0;
            queue.queued_fds = 0;
            drop(queue);
            close_unsent(dropped);
            self.shutdown();
            return Err(OutboxError::Overflow(len));
        }
        queue.counted += usize::from(counted);
        queue.events += usize::from(!counted);
        queue.queued_fds += fds.len();
        queue.messages.push_back(Outgoing {
            bytes: bytes.to_vec(),
            fds,
            counted,
        });
        drop(queue);
        self.notify.notify_one();
        Ok(())
    }

    /// Flushes queued messages as the socket drains. Runs for the life of
    /// the connection.
    pub async fn run_writer(self: Arc<Self>) {
        loop {
            self.notify.notified().await;
            loop {
                match self.flush_some() {
                    Flush::Drained => break,
                    Flush::Closed => return,
                    Flush::Blocked => {
                        if !self.until_writable().await {
                            return;
                        }
                    }
                    // An error means a broken socket, which the next send
                    // reports.
                    Flush::FdsUnread => {
                        let socket = self.socket.get_ref();
                        let _ = inflight::until_read(socket, inflight::RECHECK_LIVE).await;
                    }
                }
            }
        }
    }

    /// Waits until the full socket has room again. The connection is
    /// registered for readability only (see `connection`), so a dup of it
    /// is registered for writability for just this wait. Without an fd for
    /// the dup (the daemon out of fds) or room in the reactor it waits a
    /// moment and has the socket tried again: ending the writer instead
    /// left this one connection's replies queued for good once the
    /// shortage passed, its client waiting for an answer that never came.
    /// False only when the reactor is going away.
    async fn until_writable(&self) -> bool {
        let waiter = self
            .socket_dup()
            .and_then(|dup| crate::reactor::register(dup, tokio::io::Interest::WRITABLE));
        match waiter {
            Ok(waiter) => waiter.writable().await.is_ok(),
            Err(err) => {
                tracing::debug!(error = %err, "cannot wait for a client's socket to have room; trying it again shortly");
                tokio::time::sleep(WRITABLE_RETRY).await;
                true
            }
        }
    }

    fn socket_dup(&self) -> std::io::Result<OwnedFd> {
        #[cfg(test)]
        if self
            .failing_dups
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(std::io::Error::from_raw_os_error(nix::libc::EMFILE));
        }
        self.socket.get_ref().try_clone()
    }

    /// Sends queued messages until the queue is empty or the socket is full.
    fn flush_some(&self) -> Flush {
        let mut queue = self.lock();
        loop {
            if queue.closed {
                return Flush::Closed;
            }
            let Some(fds) = queue.messages.front().map(|msg| msg.fds.len()) else {
                return Flush::Drained;
            };
            if !self.room_for_fds(&mut queue, fds) {
                return Flush::FdsUnread;
            }
            let Some(msg) = queue.messages.pop_front() else {
                return Flush::Drained;
            };
            match self.try_send(&msg.bytes, &msg.fds) {
                Ok(()) => {
                    queue.fds_unread += fds;
                    queue.counted -= usize::from(msg.counted);
                    queue.events -= usize::from(!msg.counted);
                    queue.queued_fds -= fds;
                }
                Err(SendError::Os(Errno::EAGAIN)) => {
                    queue.messages.push_front(msg);
                    return Flush::Blocked;
                }
                Err(err) => {
                    if is_fd_shortage(&err) {
                        tracing::error!(error = %err, "cannot pass fds to a client; disconnecting it");
                    } else {
                        tracing::debug!(error = %err, "dropping connection after send failure");
                    }
                    self.close_after(queue, &err);
                    return Flush::Closed;
                }
            }
        }
    }

    /// Whether a message with `fds` fds may go out now: by the count of
    /// fds sent since the client last had nothing unread or, when that
    /// count is at the bound, by asking the kernel whether it has read
    /// everything since. (A failed ask lets the send find the broken
    /// socket.)
    fn room_for_fds(&self, queue: &mut Queue, fds: usize) -> bool {
        if fds == 0 || queue.fds_unread + fds <= PER_CONNECTION {
            return true;
        }
        match unread_by_peer(self.socket.get_ref().as_fd()) {
            Ok(0) | Err(_) => {
                queue.fds_unread = 0;
                true
            }
            Ok(_) => false,
        }
    }

    /// Closes the outbox after a send failed with `err`. A client the
    /// daemon had no fds for is alive, but cut off as one that does not
    /// read: its backlog is not carried out for it.
    fn close_after(&self, mut queue: std::sync::MutexGuard<'_, Queue>, err: &SendError) {
        queue.closed = true;
        if is_fd_shortage(err) {
            self.cut_off.store(true, Ordering::Relaxed);
        }
        drop(queue);
        self.shutdown();
    }

    /// Makes the reader see end-of-file so the connection is torn down in
    /// one place.
    pub fn shutdown(&self) {
        let _ = nix::sys::socket::shutdown(
            std::os::fd::AsRawFd::as_raw_fd(self.socket.get_ref()),
            nix::sys::socket::Shutdown::Both,
        );
        self.notify.notify_one();
    }

    /// Ends the connection's sending for good, leaving the queue to
    /// [`Outbox::close`].
    pub fn stop(&self) {
        self.lock().closed = true;
        self.shutdown();
    }

    /// Ends the connection's sending for good. What is still queued will
    /// never be sent, so it goes now, with its fds: a cut-off connection
    /// may be kept a long time after (see `connection`).
    pub fn close(&self) {
        let dropped = {
            let mut queue = self.lock();
            queue.closed = true;
            queue.counted = 0;
            queue.events = 0;
            queue.queued_fds = 0;
            std::mem::take(&mut queue.messages)
        };
        close_unsent(dropped);
        self.shutdown();
    }
}

/// Drops messages that will never be sent. Their fds may be the last
/// copies of buffers freed meanwhile, of any size: the pages go back on
/// the closer's thread, not the broker's.
fn close_unsent(dropped: VecDeque<Outgoing>) {
    if dropped.iter().any(|m| !m.fds.is_empty()) {
        crate::closer::close_elsewhere(dropped);
    }
}

/// Whether a send failed for the daemon's own lack of fds rather than
/// the client's departure: the kernel refusing fds in flight over the fd
/// limit (left by an earlier run, say: see `crate::inflight`). Worth an
/// operator's eye.
pub fn is_fd_shortage(err: &SendError) -> bool {
    matches!(
        err,
        SendError::Os(Errno::ETOOMANYREFS | Errno::EMFILE | Errno::ENFILE)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An outbox on one end of a socket pair whose other end never reads,
    /// in a runtime (the outbox registers with tokio's reactor).
    fn deaf_outbox(cap: usize) -> (tokio::runtime::Runtime, Outbox, OwnedFd) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let (ours, deaf) = crate::kernel::testutil::seqpacket_pair(true);
        let socket = runtime.block_on(async {
            crate::reactor::register(ours, tokio::io::Interest::READABLE).expect("register")
        });
        (runtime, Outbox::new(Arc::new(socket), cap), deaf)
    }

    #[test]
    fn a_client_that_never_reads_its_events_is_cut_off_at_the_bound() {
        let (_runtime, outbox, _deaf) = deaf_outbox(8);
        let event = [0u8; 48];
        let mut sent = 0usize;
        let overflow = loop {
            match outbox.send_event(&event) {
                Ok(()) => sent += 1,
                Err(err) => break err,
            }
            assert!(sent <= 1_000_000, "a million events queued without a bound");
        };
        assert!(matches!(overflow, OutboxError::Overflow(_)), "{overflow}");
        assert_eq!(
            outbox.queued(),
            0,
            "the queue is dropped with the connection"
        );
        assert!(
            sent >= MAX_QUEUED_EVENTS,
            "cut off after {sent} events, before the bound"
        );
    }

    /// Reads every message waiting on `socket`, returning how many came and
    /// how many fds came with them.
    fn read_all(socket: &OwnedFd) -> (usize, usize) {
        let mut buf = [0u8; 256];
        let (mut messages, mut fds) = (0, 0);
        while let Ok((_, received)) =
            dmabroker_ipc::fdpass::recv_message_into(socket.as_fd(), &mut buf, true)
        {
            messages += 1;
            fds += received.len();
        }
        (messages, fds)
    }

    /// Fds sitting unread in a client's socket count against the daemon's
    /// fd limit; past it, no fd reaches any client. A client that does not
    /// read gets no more than the bound, the rest waits (and counts as
    /// unread replies), and reading gets it all, in order.
    #[test]
    fn a_client_has_at_most_the_bound_of_fds_unread() {
        let (runtime, outbox, client) = deaf_outbox(1000);
        let outbox = Arc::new(outbox);
        let _writer = runtime.spawn(Arc::clone(&outbox).run_writer());
        let fd = Arc::new(HeldFd::from(OwnedFd::from(
            std::fs::File::open("/dev/null").expect("open"),
        )));
        let extra = 10;
        for _ in 0..PER_CONNECTION + extra {
            outbox
                .send(&[7u8; 48], vec![Arc::clone(&fd)])
                .expect("send");
        }
        outbox
            .send(&[8u8; 48], Vec::new())
            .expect("a reply with no fds");
        assert_eq!(outbox.queued(), extra + 1, "held back after the bound");
        assert_eq!(
            read_all(&client),
            (PER_CONNECTION, PER_CONNECTION),
            "the reply without fds waits its turn"
        );
        // The writer sees the client has read everything and goes on.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let mut rest = (0, 0);
        while rest.0 < extra + 1 {
            assert!(std::time::Instant::now() < deadline, "got {rest:?}");
            runtime
                .block_on(async { tokio::time::sleep(std::time::Duration::from_millis(5)).await });
            let (messages, fds) = read_all(&client);
            rest = (rest.0 + messages, rest.1 + fds);
        }
        assert_eq!(rest, (extra + 1, extra));
        assert_eq!(outbox.queued(), 0);
    }

    /// Out of fds at the moment a client's socket was full, the writer
    /// could not dup the socket to wait for room and ended for good: the
    /// client's replies stayed queued though it read everything.
    #[test]
    fn a_writer_without_an_fd_to_wait_with_goes_on_once_the_client_reads() {
        let (runtime, outbox, client) = deaf_outbox(1000);
        let outbox = Arc::new(outbox);
        outbox.failing_dups.store(1, Ordering::SeqCst);
        let writer = runtime.spawn(Arc::clone(&outbox).run_writer());
        let mut sent = 0;
        while outbox.queued() < 5 {
            outbox.send(&[7u8; 48], Vec::new()).expect("send");
            sent += 1;
        }
        // The writer finds the socket full and cannot dup it.
        runtime.block_on(async { tokio::time::sleep(std::time::Duration::from_millis(20)).await });
        assert_eq!(
            outbox.failing_dups.load(Ordering::SeqCst),
            0,
            "the dup was tried"
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let mut read = 0;
        while read < sent {
            assert!(
                std::time::Instant::now() < deadline,
                "{read} of {sent} replies reached the client; writer ended: {}",
                writer.is_finished()
            );
            read += read_all(&client).0;
            runtime
                .block_on(async { tokio::time::sleep(std::time::Duration::from_millis(5)).await });
        }
        assert_eq!(outbox.queued(), 0);
        assert!(
            !writer.is_finished(),
            "the writer lives as long as the outbox"
        );
    }

    #[test]
    fn a_client_cut_off_for_not_reading_is_marked_so() {
        let (_runtime, outbox, _deaf) = deaf_outbox(4);
        assert!(!outbox.cut_off());
        while outbox.send(&[1u8; 48], Vec::new()).is_ok() {}
        assert!(outbox.cut_off());
    }

    #[test]
    fn events_do_not_use_up_the_reply_cap() {
        let (_runtime, outbox, _deaf) = deaf_outbox(8);
        // Fill the socket, then queue events well past the reply cap.
        while outbox.queued() == 0 {
            outbox.send_event(&[0u8; 48]).expect("event");
        }
        for _ in 0..100 {
            outbox.send_event(&[0u8; 48]).expect("event");
        }
        for _ in 0..8 {
            outbox
                .send(&[1u8; 48], Vec::new())
                .expect("reply within the cap");
        }
        assert!(matches!(
            outbox.send(&[1u8; 48], Vec::new()),
            Err(OutboxError::Overflow(_))
        ));
    }
}
