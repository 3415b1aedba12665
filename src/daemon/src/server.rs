//! The listening socket: created (or inherited), accepted from, removed on
//! shutdown.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use nix::errno::Errno;
use nix::sys::socket::{
    accept4, bind, connect, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
};

use crate::broker::Broker;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot create {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("another dmabrokerd is already serving {0}")]
    InUse(PathBuf),
    #[error("refusing the socket's folder: {0} (remove it, or set XDG_RUNTIME_DIR or --socket)")]
    UntrustedDir(String),
    #[error("cannot {op} socket {path}: {source}")]
    Socket {
        op: &'static str,
        path: PathBuf,
        source: Errno,
    },
    #[error("cannot register the listening socket: {0}")]
    Reactor(std::io::Error),
}

/// A listening SOCK_SEQPACKET socket and the path to remove at exit (none
/// when it was inherited from systemd, which owns the path).
#[derive(Debug)]
pub struct Listener {
    pub fd: OwnedFd,
    pub path: Option<PathBuf>,
}

impl Listener {
    /// Binds `path`, replacing a stale socket file left by a crash but never
    /// one a live daemon is serving.
    pub fn bind(
        path: &Path,
        system: bool,
        mode: Option<u32>,
        group: Option<u32>,
    ) -> Result<Listener, ServerError> {
        let sock_err = |op, source| ServerError::Socket {
            op,
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent() {
            if !dir.exists() {
                let mode = if system { 0o755 } else { 0o700 };
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(mode)
                    .create(dir)
                    .map_err(|source| ServerError::CreateDir {
                        path: dir.to_owned(),
                        source,
                    })?;
                if system {
                    // Not left to the umask: other users' clients must
                    // reach the socket.
                    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode));
                }
            }
            if !system && dmabroker_ipc::paths::in_tmp_dir(path) {
                let uid = nix::unistd::getuid().as_raw();
                if let Some(why) = dmabroker_ipc::paths::tmp_dir_problem(dir, uid) {
                    return Err(ServerError::UntrustedDir(why));
                }
            }
        }
        let addr = UnixAddr::new(path).map_err(|e| sock_err("address", e))?;
        if path.exists() {
            let probe = new_socket().map_err(|e| sock_err("create", e))?;
            // Only a refusal means nobody listens. A live daemon with a
            // full backlog answers EAGAIN, and must keep its socket.
            match connect(probe.as_raw_fd(), &addr) {
                Err(Errno::ECONNREFUSED | Errno::ENOENT) => {
                    let _ = std::fs::remove_file(path);
                }
                _ => return Err(ServerError::InUse(path.to_owned())),
            }
        }
        let fd = new_socket().map_err(|e| sock_err("create", e))?;
        bind(fd.as_raw_fd(), &addr).map_err(|e| sock_err("bind", e))?;
        if let Some(gid) = group {
            // Before `listen`: nobody can connect yet, so nobody gets in
            // under the group the socket was made with.
            nix::unistd::chown(path, None, Some(nix::unistd::Gid::from_raw(gid))).map_err(
                |source| {
                    let _ = std::fs::remove_file(path);
                    ServerError::Socket {
                        op: "give the group to",
                        path: path.to_owned(),
                        source,
                    }
                },
            )?;
        }
        let mode = mode.unwrap_or(if system { 0o660 } else { 0o600 });
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode));
        listen(&fd, Backlog::new(512).unwrap_or(Backlog::MAXCONN))
            .map_err(|e| sock_err("listen", e))?;
        Ok(Listener {
            fd,
            path: Some(path.to_owned()),
        })
    }

    pub fn remove_path(&self) {
        if let Some(path) = &self.path {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn new_socket() -> Result<OwnedFd, Errno> {
    socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
}

/// Connections accepted and not yet ended. Counted from the accept, not
/// from the broker's table: one wake-up accepts every connection waiting
/// in the backlog before any of their tasks has run, and a cap that
/// counted only registered clients let a burst through whole.
#[derive(Debug, Default)]
struct Served(AtomicUsize);

/// One accepted connection's place in [`Served`], given back when its task
/// ends (or is dropped with the runtime).
struct ServedSlot(Arc<Served>);

impl Drop for ServedSlot {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Connections per uid, each counted from its identity to the end of its
/// task (including the wait for a client cut off with fds unread to read
/// them), for the policy's `max_uid_connections`: without it one user
/// could take every connection the daemon serves.
#[derive(Debug, Default)]
pub struct UidConnections(Mutex<HashMap<u32, u32>>);

/// One connection's place in [`UidConnections`], given back on drop.
#[derive(Debug)]
pub struct UidSlot {
    counts: Arc<UidConnections>,
    uid: u32,
}

impl UidConnections {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, u32>> {
        // Every change is one insert or remove: a poisoned map is whole.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A place for one more connection of `uid`, or, when it already has
    /// `limit`, how many it has.
    pub fn take(self: &Arc<Self>, uid: u32, limit: u32) -> Result<UidSlot, u32> {
        let mut counts = self.lock();
        let open = counts.entry(uid).or_insert(0);
        if *open >= limit {
            return Err(*open);
        }
        *open += 1;
        Ok(UidSlot {
            counts: Arc::clone(self),
            uid,
        })
    }

    /// Connections `uid` has now.
    pub fn open(&self, uid: u32) -> u32 {
        self.lock().get(&uid).copied().unwrap_or(0)
    }
}

impl Drop for UidSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock();
        if let Some(open) = counts.get_mut(&self.uid) {
            *open = open.saturating_sub(1);
            if *open == 0 {
                counts.remove(&self.uid);
            }
        }
    }
}

/// How long the accept loop waits before trying again after an error
/// (fds ran out, kernel memory is short).
const ACCEPT_RETRY: std::time::Duration = std::time::Duration::from_millis(100);

/// Accepts connections forever, one task each. Connections over the cap
/// are told `Busy` and closed.
pub async fn accept_loop(broker: Arc<Broker>, listener: OwnedFd) -> Result<(), ServerError> {
    match test_accept_panic_after() {
        Some(after) => tokio::select! {
            accepted = accept_clients(broker, listener) => accepted,
            () = tokio::time::sleep(after) => {
                panic!("test hook: the accept loop panics")
            }
        },
        None => accept_clients(broker, listener).await,
    }
}

/// Test-only hook: `DMABROKER_TEST_ACCEPT_PANIC_AFTER_MS=N` makes the
/// accept loop panic N ms after it started, as a bug in it would, so that
/// tests can show how the daemon exits then (`daemon::accept_loop_ended`).
/// Inert unless that variable is set; warned about when it is.
fn test_accept_panic_after() -> Option<std::time::Duration> {
    let after = std::env::var("DMABROKER_TEST_ACCEPT_PANIC_AFTER_MS")
        .ok()?
        .parse::<u64>()
        .ok()?;
    tracing::warn!(after_ms = after, "test hook: the accept loop will panic");
    Some(std::time::Duration::from_millis(after))
}

async fn accept_clients(broker: Arc<Broker>, listener: OwnedFd) -> Result<(), ServerError> {
    let served = Arc::new(Served::default());
    let uids = Arc::new(UidConnections::default());
    let _ = nix::fcntl::fcntl(
        listener.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    );
    let listener = crate::reactor::register(listener, tokio::io::Interest::READABLE)
        .map_err(ServerError::Reactor)?;
    loop {
        let mut guard = match listener.readable().await {
            Ok(guard) => guard,
            Err(err) => return Err(ServerError::Reactor(err)),
        };
        loop {
            if refusals_backed_up() {
                tracing::error!(
                    max = MAX_RETIRING_REFUSALS,
                    "refused connections are not being closed (a client's closes are stuck); accepting none until they are"
                );
                while refusals_backed_up() {
                    // A closing thread that could not be started is
                    // tried again when another ends or goes idle, or at a
                    // hand-over, which may not come while nobody is
                    // accepted.
                    crate::client_fds::start_stalled_threads();
                    tokio::time::sleep(ACCEPT_RETRY).await;
                }
            }
            match accept4(
                listener.get_ref().as_raw_fd(),
                SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            ) {
                Ok(raw) => {
                    // SAFETY: accept4 just returned this new fd; we own it.
                    let conn = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
                    let max = broker.lock().limits.max_connections;
                    if served.0.fetch_add(1, Ordering::AcqRel) >= max {
                        served.0.fetch_sub(1, Ordering::AcqRel);
                        tracing::warn!(max, "connection refused: at the connection limit");
                        let uid = crate::identity::peer_uid(conn.as_fd());
                        refuse(
                            conn,
                            dmabroker_ipc::WireError::new(
                                dmabroker_ipc::ErrorCode::Busy,
                                format!("the broker serves at most {max} connections"),
                            ),
                            uid,
                        );
                        continue;
                    }
                    let slot = ServedSlot(Arc::clone(&served));
                    let (broker, uids) = (Arc::clone(&broker), Arc::clone(&uids));
                    tokio::spawn(async move {
                        crate::connection::serve(broker, conn, uids).await;
                        drop(slot);
                    });
                }
                Err(Errno::EAGAIN) => {
                    guard.clear_ready();
                    break;
                }
                Err(Errno::EINTR | Errno::ECONNABORTED) => continue,
                // The backlog is not empty: readiness stays set and the
                // accept is tried again. Cleared, it would wait for the next
                // connection's edge, which a full backlog never brings, and
                // the clients already waiting would never be accepted.
                Err(err @ (Errno::EMFILE | Errno::ENFILE)) => {
                    tracing::error!(error = %err, "out of file descriptors; pausing accept");
                    tokio::time::sleep(ACCEPT_RETRY).await;
                }
                Err(err) => {
                    tracing::warn!(error = %err, "accept failed; trying again");
                    tokio::time::sleep(ACCEPT_RETRY).await;
                }
            }
        }
    }
}

/// Refused connections still lingering (see [`refuse`]); beyond this
/// many, a refusal is closed at once.
const MAX_LINGERING: usize = 64;
/// How long a refused connection is kept for its client to read the
/// refusal and hang up.
const LINGER: std::time::Duration = std::time::Duration::from_secs(1);
static LINGERING: AtomicUsize = AtomicUsize::new(0);

/// Tells a connection it is not served, and why (reply id 0: it has sent
/// at most its hello). Closed at once, a socket with its client's hello
/// still unread resets the client's, which then sees `ECONNRESET` instead
/// of the answer; so the socket is shut for writing, read until its client
/// hangs up, and closed then (or after [`LINGER`]).
pub fn refuse(conn: OwnedFd, error: dmabroker_ipc::WireError, uid: u32) {
    use dmabroker_ipc::{codec, Reply, ServerMessage};
    let message = ServerMessage::Reply(Reply {
        id: 0,
        fds: 0,
        result: Err(error),
    });
    if let Ok(bytes) = codec::encode_server_message(&message) {
        let _ = dmabroker_ipc::fdpass::send_message(conn.as_fd(), &bytes, &[], true);
    }
    let _ = nix::sys::socket::shutdown(conn.as_raw_fd(), nix::sys::socket::Shutdown::Write);
    if LINGERING.fetch_add(1, Ordering::AcqRel) >= MAX_LINGERING {
        LINGERING.fetch_sub(1, Ordering::AcqRel);
        retire(conn, uid, None);
        return;
    }
    tokio::spawn(async move {
        match crate::reactor::try_register(conn, tokio::io::Interest::READABLE) {
            Ok(conn) => {
                let _ = tokio::time::timeout(LINGER, linger(&conn, uid)).await;
                retire(conn.into_inner(), uid, None);
            }
            Err((conn, err)) => {
                tracing::warn!(error = %err, "cannot watch a refused connection");
                retire(conn, uid, None);
            }
        }
        LINGERING.fetch_sub(1, Ordering::AcqRel);
    });
}

/// Reads and drops what a refused client sends until it hangs up.
async fn linger(conn: &tokio::io::unix::AsyncFd<OwnedFd>, uid: u32) {
    loop {
        let Ok(mut guard) = conn.readable().await else {
            return;
        };
        match drain(conn.get_ref().as_fd(), uid) {
            Drained::HungUp => return,
            Drained::Empty => guard.clear_ready(),
            // A client sending as fast as this reads must not hold the
            // broker's only thread: others get a turn, and `LINGER` ends it.
            Drained::More => {
                drop(guard);
                tokio::task::yield_now().await;
            }
        }
    }
}

/// Before a connection's socket is closed: no more is taken from its
/// client, and what it had sent is read out, its fds handed to the uid's
/// closing thread. Closed with messages queued, the socket's release
/// would let go of their files on this thread, and the last release of a
/// client's file can wait for good (a file watched by an epoll whose lock
/// a thread of the client holds, behind a FUSE poll nobody answers; see
/// `client_fds`). Read out also keeps the client from being reset ahead
/// of the answers still queued for it (a socket closed with its peer's
/// messages unread resets the peer's). What is queued is bounded once
/// reading is shut; the read-out stops, as reading does, while the uid
/// has too many fds waiting to be closed.
pub fn stop_reading(conn: std::os::fd::BorrowedFd<'_>, uid: u32) {
    let _ = nix::sys::socket::shutdown(conn.as_raw_fd(), nix::sys::socket::Shutdown::Read);
    while drain(conn, uid) == Drained::More {}
}

/// Lets go of a connection's socket (its last fd) for good. Messages its
/// client queued and the daemon did not read out (the read-out stopped at
/// the uid's bound, or at an empty message, which reads like the end) hold
/// the client's files, and the socket's close lets go of them: that can
/// wait for good (see `client_fds`). So the socket goes to the uid's
/// closing thread, which reads out what is left and closes it there;
/// `slot`, the connection's place among its uid's, goes with it, so a uid
/// whose closes are stuck cannot pile up sockets past its connection
/// limit.
///
/// A refusal's socket (`slot` `None`) holds no place under any limit, so
/// refusals waiting for their threads are counted, and while
/// [`MAX_RETIRING_REFUSALS`] wait the daemon accepts no connection (see
/// [`refusals_backed_up`]): new clients wait in the listen queue, clients
/// being served go on, and the fds such sockets keep open stay bounded.
/// Closed here instead, a refusal could hold a file whose release waits
/// for good.
pub fn retire(socket: OwnedFd, uid: u32, slot: Option<UidSlot>) {
    let _ = nix::sys::socket::shutdown(socket.as_raw_fd(), nix::sys::socket::Shutdown::Read);
    let refusal = slot.is_none();
    if refusal {
        RETIRING_REFUSALS.fetch_add(1, Ordering::AcqRel);
    }
    crate::client_fds::release_socket_elsewhere(
        uid,
        Box::new(RetiredSocket {
            socket,
            _slot: slot,
            refusal,
        }),
    );
}

/// Refused connections' sockets handed to closing threads and not closed
/// yet (see [`retire`]).
static RETIRING_REFUSALS: AtomicUsize = AtomicUsize::new(0);
const MAX_RETIRING_REFUSALS: usize = 256;

/// Whether so many refusals wait for their closing threads that no more
/// connections are to be accepted until some are closed (see [`retire`]).
/// The refusals in progress when it turned true (the connections one
/// wake-up accepted, up to the listen backlog, and the lingering ones, at
/// most [`MAX_LINGERING`]) still retire: the count's overshoot is bounded
/// by those.
fn refusals_backed_up() -> bool {
    RETIRING_REFUSALS.load(Ordering::Acquire) >= MAX_RETIRING_REFUSALS
}

/// A connection's socket on its way out, on its uid's closing thread.
struct RetiredSocket {
    socket: OwnedFd,
    _slot: Option<UidSlot>,
    refusal: bool,
}

impl Drop for RetiredSocket {
    fn drop(&mut self) {
        // Its thread has it: no longer waiting (and counted down even if
        // the read-out were to panic).
        if self.refusal {
            RETIRING_REFUSALS.fetch_sub(1, Ordering::AcqRel);
        }
        self.read_out();
    }
}

impl RetiredSocket {
    fn read_out(&self) {
        // Reading is shut, so what is queued is all there will be: a
        // socket's queue holds a few hundred messages at most.
        let mut sink = [0u8; 256];
        loop {
            let (fds, read) = read_one(self.socket.as_fd(), &mut sink);
            // Dropped here, on this uid's thread.
            drop(fds);
            if read != Drained::More {
                break;
            }
        }
    }
}

/// Messages a refused connection's drain reads per turn.
const DRAIN_TURN: usize = 32;

/// What [`drain`] left behind.
#[derive(Debug, PartialEq, Eq)]
enum Drained {
    HungUp,
    Empty,
    More,
}

/// Reads and drops up to [`DRAIN_TURN`] queued messages. Into a small
/// buffer: what they say is not read. Their fds go to the closing thread
/// of the client's uid, never closed or let go of here (see `client_fds`).
fn drain(conn: std::os::fd::BorrowedFd<'_>, uid: u32) -> Drained {
    let mut sink = [0u8; 256];
    for _ in 0..DRAIN_TURN {
        // As a served connection, read no further while the uid has too
        // many fds waiting to be closed: what a client parks stays
        // bounded here too.
        if crate::client_fds::pending(uid) >= crate::client_fds::MAX_PENDING_PER_UID {
            return Drained::HungUp;
        }
        let (fds, read) = read_one(conn, &mut sink);
        crate::client_fds::close_elsewhere(uid, fds);
        if read != Drained::More {
            return read;
        }
    }
    Drained::More
}

/// Reads and drops one queued message into `sink` (what it says is not
/// read), giving back every fd it brought, for the caller to close where
/// it must; and what is left: `More` after a message, `Empty` when none
/// was queued, `HungUp` at the end.
fn read_one(conn: std::os::fd::BorrowedFd<'_>, sink: &mut [u8]) -> (Vec<OwnedFd>, Drained) {
    use dmabroker_ipc::fdpass::{recv_message_into_keeping, RecvError};
    let mut fds = Vec::new();
    let received =
        recv_message_into_keeping(conn, sink, true, &mut fds).map(|(_, got)| fds.extend(got));
    let read = match received {
        Ok(())
        | Err(
            RecvError::Truncated
            | RecvError::ControlTruncated { .. }
            | RecvError::TooManyFds { .. },
        ) => Drained::More,
        Err(RecvError::Os(Errno::EAGAIN)) => Drained::Empty,
        Err(_) => Drained::HungUp,
    };
    (fds, read)
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use nix::sys::socket::{send, socketpair, MsgFlags};

    use super::*;

    /// A refused client that keeps sending must not keep the broker's only
    /// thread: one drain reads a turn's worth and says more is waiting.
    #[test]
    fn a_drain_reads_one_turn_at_most() {
        let (client, refused) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_NONBLOCK,
        )
        .expect("socketpair");
        let queued = DRAIN_TURN + 8;
        for _ in 0..queued {
            send(client.as_raw_fd(), b"x", MsgFlags::MSG_NOSIGNAL).expect("send");
        }
        assert_eq!(drain(refused.as_fd(), 0), Drained::More);
        assert_eq!(drain(refused.as_fd(), 0), Drained::Empty, "8 were left");
        drop(client);
        assert_eq!(drain(refused.as_fd(), 0), Drained::HungUp);
    }
}
