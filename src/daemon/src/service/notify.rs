//! Notifications to the service manager (`sd_notify(3)`), never waiting
//! for it on the broker's thread.
//!
//! Every notify datagram goes to the manager's one notify socket, whose
//! queue holds `net.unix.max_dgram_qlen` datagrams from all services (10 by
//! default, 512 under systemd's sysctl defaults). The `sd-notify` crate
//! sends each on a fresh blocking socket, so with the queue full (PID 1
//! busy, as at boot) a send waits until the manager reads again; the broker
//! puts each new buffer in the fd store from its only thread, under its
//! lock, and every client stalled with it. So the daemon keeps one
//! non-blocking socket. From the broker's thread a datagram the queue has
//! no room for fails (`EAGAIN`) and its sender tries again later: the fd
//! store's entries (see `fdstore`), a watchdog ping (soon), a status line
//! (with the next change). Off it, [`send_waiting`] waits for room (the
//! record's writer, on the blocking pool), and the state changes the
//! manager must see (ready, reloading, stopping) that found no room are
//! sent, in order, by a thread of their own.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    connect, sendmsg, socket, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr,
};
use sd_notify::NotifyState;

const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Whether a service manager listens: without one every call is a no-op.
pub fn enabled() -> bool {
    std::env::var_os(NOTIFY_SOCKET).is_some()
}

/// The datagram for `states`, one `KEY=value` per line.
fn text_of(states: &[NotifyState<'_>]) -> String {
    use std::fmt::Write;
    let mut text = String::new();
    for state in states {
        let _ = writeln!(text, "{state}");
    }
    text
}

/// The daemon's socket to the manager, connected at the first send and
/// again if the manager's socket went away (a send refused).
#[derive(Debug, Default)]
struct Notifier {
    socket: Option<Arc<OwnedFd>>,
}

static NOTIFIER: Mutex<Notifier> = Mutex::new(Notifier { socket: None });

impl Notifier {
    /// Sends one datagram to `address` (a path, or `@name` for an
    /// abstract socket, as `$NOTIFY_SOCKET` says) without waiting. On
    /// `WouldBlock` also gives the socket, to wait on for room.
    fn send(
        &mut self,
        address: &OsStr,
        text: &str,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), (io::Error, Option<Arc<OwnedFd>>)> {
        let mut reconnected = false;
        loop {
            let current = match &self.socket {
                Some(current) => Arc::clone(current),
                None => {
                    let fresh = Arc::new(connected(address).map_err(|e| (e, None))?);
                    self.socket = Some(Arc::clone(&fresh));
                    fresh
                }
            };
            match send_on(&current, text, fds) {
                Ok(()) => return Ok(()),
                Err(Errno::ECONNREFUSED | Errno::ENOTCONN) if !reconnected => {
                    self.socket = None;
                    reconnected = true;
                }
                Err(Errno::EAGAIN) => return Err((Errno::EAGAIN.into(), Some(current))),
                Err(err) => return Err((err.into(), None)),
            }
        }
    }
}

fn connected(address: &OsStr) -> io::Result<OwnedFd> {
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(address);
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => UnixAddr::new_abstract(name)?,
        None => UnixAddr::new(bytes)?,
    };
    let socket = socket(
        AddressFamily::Unix,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    connect(socket.as_raw_fd(), &addr)?;
    Ok(socket)
}

fn send_on(socket: &OwnedFd, text: &str, fds: &[BorrowedFd<'_>]) -> nix::Result<()> {
    let raw: Vec<i32> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let rights = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &rights };
    let sent = sendmsg::<()>(
        socket.as_raw_fd(),
        &[io::IoSlice::new(text.as_bytes())],
        cmsgs,
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
        None,
    )?;
    if sent == text.len() {
        Ok(())
    } else {
        Err(Errno::EMSGSIZE)
    }
}

/// Set once the daemon takes its fds out of the store at a stop for good
/// (see `service::job`): nothing may go in after the removals, or PID 1
/// would hold it when it closes the store.
static NO_MORE_STORES: AtomicBool = AtomicBool::new(false);

/// From now on every `FDSTORE=1` fails: what the daemon still had on its
/// way to the store (a late record, a buffer the record's writer sends)
/// cannot follow the removals of a stop for good. A store being sent now
/// is sent before this returns (the same lock), so before any removal.
pub fn refuse_fd_stores() {
    let _sending = NOTIFIER.lock().unwrap_or_else(|p| p.into_inner());
    NO_MORE_STORES.store(true, Ordering::Release);
}

fn is_fd_store(text: &str) -> bool {
    text.lines().any(|line| line == "FDSTORE=1")
}

/// One attempt on the daemon's socket; `WouldBlock` comes with the socket.
fn send_text(text: &str, fds: &[BorrowedFd<'_>]) -> Result<(), (io::Error, Option<Arc<OwnedFd>>)> {
    let Some(address) = std::env::var_os(NOTIFY_SOCKET) else {
        return Ok(());
    };
    let mut notifier = NOTIFIER.lock().unwrap_or_else(|p| p.into_inner());
    if NO_MORE_STORES.load(Ordering::Acquire) && is_fd_store(text) {
        return Err((
            io::Error::other(
                "the daemon is stopping for good: nothing goes into the fd store any more",
            ),
            None,
        ));
    }
    notifier.send(&address, text, fds)
}

/// Sends `states` (with `fds`) without waiting: `WouldBlock` when the
/// manager's queue is full. A no-op without a manager.
pub fn try_send(states: &[NotifyState<'_>], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    if !enabled() {
        return Ok(());
    }
    send_text(&text_of(states), fds).map_err(|(err, _)| err)
}

/// Sends `states` (with `fds`), waiting until `deadline` for room in the
/// manager's queue. Blocks: never on the broker's thread.
pub fn send_waiting(
    states: &[NotifyState<'_>],
    fds: &[BorrowedFd<'_>],
    deadline: Instant,
) -> io::Result<()> {
    if !enabled() {
        return Ok(());
    }
    send_text_waiting(&text_of(states), fds, deadline)
}

/// A `BARRIER=1` sent to the manager: it comes with the write end of a
/// pipe, which the manager closes once it has read it (`sd_notify_barrier(3)`),
/// so the read end sees every datagram sent before it read.
#[derive(Debug)]
pub struct Barrier {
    read_end: OwnedFd,
}

impl Barrier {
    /// Sends one, waiting until `deadline` for room in the manager's
    /// queue. `None` without a manager. Blocks: never on the broker's
    /// thread.
    pub fn send(deadline: Instant) -> io::Result<Option<Barrier>> {
        if !enabled() {
            return Ok(None);
        }
        let (read_end, write_end) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)?;
        send_text_waiting("BARRIER=1\n", &[write_end.as_fd()], deadline)?;
        Ok(Some(Barrier { read_end }))
    }

    /// Waits until the manager has read it, or `deadline` (`TimedOut`);
    /// may be called again after a timeout, with the same barrier.
    pub fn wait(&self, deadline: Instant) -> io::Result<()> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the service manager did not read a barrier in time",
                ));
            }
            let ms = left.as_millis().clamp(1, u128::from(u16::MAX)) as u16;
            let mut hung_up = [PollFd::new(self.read_end.as_fd(), PollFlags::POLLIN)];
            match poll(&mut hung_up, PollTimeout::from(ms)) {
                Ok(0) | Err(Errno::EINTR) => {}
                // Nobody writes to the pipe: readable means every write
                // end is closed.
                Ok(_) => return Ok(()),
                Err(errno) => return Err(errno.into()),
            }
        }
    }
}

fn send_text_waiting(text: &str, fds: &[BorrowedFd<'_>], deadline: Instant) -> io::Result<()> {
    loop {
        let socket = match send_text(text, fds) {
            Ok(()) => return Ok(()),
            Err((err, Some(socket))) if Instant::now() < deadline => {
                let _ = err;
                socket
            }
            Err((err, _)) => return Err(err),
        };
        // Writable once the manager's queue has room: a connected
        // datagram socket polls its peer's queue. Woken or not, try again
        // within a bounded wait (the manager's socket may be a new one).
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = left.as_millis().clamp(1, 100) as u16;
        let mut ready = [PollFd::new(socket.as_fd(), PollFlags::POLLOUT)];
        let _ = poll(&mut ready, PollTimeout::from(ms));
    }
}

/// State changes handed to the notify thread and not sent yet: while there
/// are any, later ones queue behind them (a `READY=1` overtaking its
/// `RELOADING=1` would leave the unit "reloading").
static STATE_PENDING: AtomicUsize = AtomicUsize::new(0);

/// The notify thread's queue: state changes the manager had no room for,
/// sent in order as soon as it has, however long that takes (systemd's
/// start timeout, not ours, decides when waiting is over).
fn state_queue() -> &'static Mutex<Sender<String>> {
    static QUEUE: OnceLock<Mutex<Sender<String>>> = OnceLock::new();
    QUEUE.get_or_init(|| {
        let (tx, rx) = channel::<String>();
        let spawned = std::thread::Builder::new()
            .name("dmabroker-notify".into())
            .spawn(move || {
                for text in rx {
                    loop {
                        let hour = Instant::now() + Duration::from_secs(3600);
                        match send_text_waiting(&text, &[], hour) {
                            Ok(()) => break,
                            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                            Err(err) => {
                                tracing::warn!(error = %err, state = text.trim_end(), "cannot notify the service manager");
                                break;
                            }
                        }
                    }
                    STATE_PENDING.fetch_sub(1, Ordering::AcqRel);
                }
            });
        if let Err(err) = spawned {
            tracing::error!(error = %err, "cannot start the thread that notifies the service manager");
        }
        Mutex::new(tx)
    })
}

/// A state change: sent now if the manager has room (and nothing is
/// queued before it), else by the notify thread as soon as it has. The
/// check, the send and the queueing are one step under the queue's lock:
/// a reload from the D-Bus thread and a signal on the broker's must not
/// overtake each other (a `READY=1` ahead of its `RELOADING=1`).
fn send_state_change(states: &[NotifyState<'_>]) {
    if !enabled() {
        return;
    }
    let text = text_of(states);
    let queue = state_queue().lock().unwrap_or_else(|p| p.into_inner());
    if STATE_PENDING.load(Ordering::Acquire) == 0 {
        match send_text(&text, &[]) {
            Ok(()) => return,
            Err((err, _)) if err.kind() == io::ErrorKind::WouldBlock => {}
            Err((err, _)) => {
                tracing::warn!(error = %err, state = text.trim_end(), "cannot notify the service manager");
                return;
            }
        }
    }
    STATE_PENDING.fetch_add(1, Ordering::AcqRel);
    if queue.send(text).is_err() {
        STATE_PENDING.fetch_sub(1, Ordering::AcqRel);
        tracing::warn!("cannot notify the service manager: its thread is gone");
    }
}

/// Waits until every state change handed to the notify thread is sent, or
/// `patience` is over: before the daemon exits, so its `STOPPING=1` is
/// not lost with the thread.
pub fn flush(patience: Duration) {
    let until = Instant::now() + patience;
    while STATE_PENDING.load(Ordering::Acquire) > 0 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `READY=1`, once the socket is served.
pub fn ready(status: &str) {
    send_state_change(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A one-line summary shown by `systemctl status`; whether it was sent
/// (the manager may have had no room: send it again later). Not while a
/// state change waits in the notify thread's queue: its own `STATUS=`
/// would arrive later and win.
pub fn status(line: &str) -> bool {
    STATE_PENDING.load(Ordering::Acquire) == 0
        && try_send(&[NotifyState::Status(line)], &[]).is_ok()
}

pub fn stopping() {
    send_state_change(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send_state_change(&[NotifyState::Reloading, now]),
        Err(_) => send_state_change(&[NotifyState::Reloading]),
    }
}

pub fn reloaded(status_line: &str) {
    send_state_change(&[NotifyState::Ready, NotifyState::Status(status_line)]);
}

/// `WATCHDOG=1`; whether it was sent (see `watchdog::run`).
pub fn watchdog() -> bool {
    try_send(&[NotifyState::Watchdog], &[]).is_ok()
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixDatagram;

    use super::*;

    fn abstract_receiver(name: &str) -> UnixDatagram {
        let addr = nix::sys::socket::UnixAddr::new_abstract(name.as_bytes()).expect("address");
        let socket = socket(
            AddressFamily::Unix,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .expect("socket");
        nix::sys::socket::bind(socket.as_raw_fd(), &addr).expect("bind");
        UnixDatagram::from(socket)
    }

    /// Containers' managers give an abstract `@name`; a manager whose
    /// socket was closed and bound again is reached on the new one.
    #[test]
    fn an_abstract_socket_is_reached_and_a_new_one_after_the_old_went_away() {
        let name = format!("dmabroker-notify-test-{}", std::process::id());
        let address = std::ffi::OsString::from(format!("@{name}"));
        let mut notifier = Notifier::default();
        let mut buf = [0u8; 64];

        let first = abstract_receiver(&name);
        notifier
            .send(&address, "STATUS=one\n", &[])
            .map_err(|(e, _)| e)
            .expect("send");
        let n = first.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"STATUS=one\n");

        drop(first);
        let second = abstract_receiver(&name);
        notifier
            .send(&address, "STATUS=two\n", &[])
            .expect("send after a rebind");
        let n = second.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"STATUS=two\n");
    }

    /// A full queue is the caller's to retry, not a wait.
    #[test]
    fn a_full_queue_fails_at_once_with_would_block() {
        let name = format!("dmabroker-notify-full-{}", std::process::id());
        let address = std::ffi::OsString::from(format!("@{name}"));
        let _receiver = abstract_receiver(&name);
        let mut notifier = Notifier::default();
        let err = (0..100_000)
            .find_map(|_| notifier.send(&address, "X=1\n", &[]).err().map(|(e, _)| e))
            .expect("the queue fills");
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock, "{err}");
    }
}
