//! The client's end of the socket: requests out, replies matched to their
//! request ids, events queued, and reconnection after a broker restart.
//!
//! Any thread may call; whichever thread needs a message first becomes the
//! reader and files what it receives for the others (a condvar wakes them),
//! so there is no runtime, and a background thread only while a one-way
//! message waits for room in the socket (see [`Owed`]).
//!
//! When the connection breaks, the next call reconnects (bounded back-off),
//! says hello again and re-attaches every buffer this client holds with the
//! secret the broker gave it, then retries once. A broker restarted by
//! systemd keeps the buffers in its fd store, so they survive; accesses do
//! not (the next grant on each buffer carries `writer_lost`).

use std::collections::{HashMap, HashSet, VecDeque};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use dmabroker_ipc::codec::{decode_reply_id, decode_server_message, encode_request};
use dmabroker_ipc::endwords::EndWords;
use dmabroker_ipc::fdpass::{recv_message, recv_message_into, send_message, RecvError, SendError};
use dmabroker_ipc::{
    features, ErrorCode, Event, Hello, Reply, ReplyBody, Request, RequestBody, RequestHead,
    ServerMessage, Welcome, WireError, FLAG_NO_REPLY,
};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{connect, socket, sockopt, AddressFamily, SockFlag, SockType, UnixAddr};

use crate::error::Error;

/// Requests sent without waiting for success get ids with this bit set, so
/// an error answering one is recognised as belonging to no waiting caller.
const UNWAITED: u64 = 1 << 63;
/// Most asynchronous errors remembered for `take_errors`.
const MAX_ASYNC_ERRORS: usize = 64;
/// Events kept for a program that does not read them (a no-autofence
/// client that waits on its sync_files and never asks for
/// `FenceSignalled`): as many as the broker queues for a client. Past
/// that the oldest go, with their fds.
const MAX_QUEUED_EVENTS: usize = 16 * 1024;
/// Most give-backs kept waiting for room in the socket (see [`Owed`]).
/// One each time the fd table is full as an answer with fds arrives, so a
/// program that keeps asking while out of fds cannot grow it forever.
/// Frees and ends have no bound of their own: each is one of the
/// program's holds or accesses, and every call that waits for an answer
/// sends all that is owed before its request.
const MAX_OWED: usize = 64;
/// How long the flusher (see [`Connection::flush_later`]) waits for room
/// at a time before it looks whether anyone still needs it.
const FLUSH_POLL_MS: u16 = 100;
/// How long a send that failed for want of memory, not of room, waits
/// before it tries again.
const ROOM_RETRY: Duration = Duration::from_millis(10);
/// How long a connection the program lets go of waits for room for what
/// it owes: an end the broker never gets reads as a writer lost.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
const FIRST_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_millis(500);
/// How often a caller waiting for a reconnect on its own thread looks
/// whether anyone still wants the call (see [`Connection::reconnect_for`]).
const ASIDE_LOOK: Duration = Duration::from_millis(20);

/// A reply, its fds, and the request id and connection generation it
/// answers.
pub(crate) type Answered = (ReplyBody, Vec<OwnedFd>, (u64, u64));

/// A reply and the fds that came with it. An error may be the client's
/// own: an answer it could not take (see [`Error::FdTableFull`]).
#[derive(Debug)]
pub(crate) struct Incoming {
    pub result: Result<ReplyBody, Error>,
    pub fds: Vec<OwnedFd>,
}

impl Incoming {
    fn into_answer(self) -> Result<(ReplyBody, Vec<OwnedFd>), Error> {
        self.result.map(|body| (body, self.fds))
    }
}

#[derive(Debug, Default)]
struct Mailbox {
    replies: HashMap<u64, Incoming>,
    events: VecDeque<(Event, Vec<OwnedFd>)>,
    /// Whether events were dropped since the program last read one: it is
    /// told once (`take_errors`), not once per event.
    events_dropped: bool,
    errors: VecDeque<WireError>,
    reading: bool,
    /// Threads asleep on `arrived`. Waking nobody would still cost the
    /// reader a futex syscall per message, a tenth of an uncontended
    /// begin+end, so it only notifies when someone sleeps.
    sleepers: usize,
    /// Why the current socket stopped working, if it did.
    closed: Option<String>,
    /// An error that answered no request (id 0) and was the last message
    /// read: a broker refusing the connection (busy) says so before it
    /// hangs up. One followed by anything else was not that (a message the
    /// broker could not read). Errors of unwaited requests are not that
    /// either, and stay for `take_errors`.
    refusal: Option<WireError>,
    /// Requests a caller will still collect an answer to. A reply to any
    /// other (one answered through a buffer word, whose late `Busy` or
    /// stale `Planned` may still come) is dropped with its fds: filed, it
    /// would stay for the life of the connection.
    awaited: HashSet<u64>,
    /// The accesses `AccessRevoked` named (by the broker's id, not 0), the
    /// newest [`MAX_REVOKED`]: their guards hand out no bytes.
    revoked: VecDeque<u64>,
}

/// How many revoked access ids a connection remembers. A revocation is
/// rare (a write held past its limit, a corrupted word); a guard of an
/// access revoked more than this many revocations ago is only told by its
/// end.
const MAX_REVOKED: usize = 256;

/// The reader's 64 KiB buffer, shown by its size: `{:?}` of a client
/// printed every byte of it.
struct ReadBuf(Vec<u8>);

impl std::fmt::Debug for ReadBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{} bytes]", self.0.len())
    }
}

/// What the broker needs to hear again after a reconnect.
#[derive(Clone)]
struct Hold {
    secret: String,
    inode: u64,
    /// Which `Buffer` this hold is: a broker restarted without an fd store
    /// numbers buffers anew, so after a reconnect the same id may name
    /// another buffer of this client.
    serial: u64,
}

/// Without the secret (see `BufferInfo`'s `Debug`).
impl std::fmt::Debug for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hold")
            .field("inode", &self.inode)
            .field("serial", &self.serial)
            .finish_non_exhaustive()
    }
}

/// A request that could not be sent, and the connection generation it
/// was for: a call reconnects from that one (see [`Connection::call_with`]).
struct Unsent {
    error: Error,
    generation: u64,
}

/// A one-way request on its way out: a give-back (see
/// [`Connection::give_back`]) the reader made, a free or an end a drop
/// made, or a cancel (see [`Connection::send_one_way`]), none of which
/// may wait for a broker that does not read. The encoded request, and
/// the connection generation whose broker it is owed to. Every one is
/// queued, and sent from the queue at once if the socket has room, so
/// they go out in the order they were made, and ahead of any request
/// made after them; what finds no room goes out ahead of the next
/// request sent on that connection, or by the flusher thread as soon as
/// the socket has room, so that a program that goes quiet after the drop
/// does not keep the buffer (or, for an end, everyone else out of it). A
/// new connection drops it, since the old broker's holds ended with the
/// old connection and its ids mean nothing to a new one.
#[derive(Debug)]
struct Owed {
    generation: u64,
    bytes: Vec<u8>,
    /// A give-back, which counts towards [`MAX_OWED`].
    given_back: bool,
}

/// Whether a send failed because the connection is gone (nothing sent on
/// it will ever be read), rather than for want of room or for a moment.
fn is_dead(err: &SendError) -> bool {
    matches!(
        err,
        SendError::Os(Errno::EPIPE | Errno::ECONNRESET | Errno::ENOTCONN)
    )
}

/// Whether a send failed only for a moment: no room in the socket, or the
/// kernel short of memory for the message. Any other failure (not a
/// hang-up either, see [`is_dead`]) will fail again every time.
fn is_for_a_moment(err: &SendError) -> bool {
    matches!(
        err,
        SendError::Os(Errno::EAGAIN | Errno::ENOBUFS | Errno::ENOMEM | Errno::EINTR)
    )
}

/// How long a blocking receive or send (`option`) on `socket` may wait
/// (`None`: forever).
fn set_timeout<O>(socket: &OwnedFd, option: O, timeout: Option<Duration>) -> Result<(), Error>
where
    O: nix::sys::socket::SetSockOpt<Val = nix::sys::time::TimeVal>,
{
    let timeout = timeout.unwrap_or_default();
    let value = nix::sys::time::TimeVal::new(
        timeout.as_secs() as nix::libc::time_t,
        timeout.subsec_micros() as nix::libc::suseconds_t,
    );
    nix::sys::socket::setsockopt(socket, option, &value)
        .map_err(|e| Error::Protocol(format!("cannot set a socket timeout: {e}")))
}

/// The longest a handshake's receive waits before it looks again whether
/// the call it serves is still wanted (see [`SentHook::wanted`]).
const HANDSHAKE_SLICE: Duration = Duration::from_millis(50);

/// When a wait of `timeout` from now ends; `None`, no end, when that is
/// past what an `Instant` can hold: `Duration::MAX` is how a caller says
/// "no limit", and adding it panicked.
pub(crate) fn deadline_after(timeout: Duration) -> Option<Instant> {
    Instant::now().checked_add(timeout)
}

/// A century: the end of a reconnect window too long to end.
const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// When a reconnect window of `window` from now ends. One too long for an
/// `Instant` (`Duration::MAX`: keep trying) ends in a century, which no
/// process sees, instead of having no end: the handshake keeps waiting in
/// slices up to a time, so a call nobody waits for still stops.
fn end_of_window(window: Duration) -> Instant {
    let now = Instant::now();
    deadline_after(window)
        .or_else(|| now.checked_add(CENTURY))
        .unwrap_or(now)
}

/// A reconnect its caller's time ran out for.
fn out_of_time() -> Error {
    Error::Broker(WireError::new(
        ErrorCode::Timeout,
        "the time ran out while reconnecting to the broker",
    ))
}

/// The serial of a hold that was lost before it was recorded.
const LOST: u64 = 0;

/// Whether the book still has hold `serial` of `buffer`.
fn is_hold(holds: &HashMap<u64, Hold>, buffer: u64, serial: u64) -> bool {
    holds.get(&buffer).is_some_and(|hold| hold.serial == serial)
}

/// The refusal of a request on a buffer the broker lost in a restart.
fn lost_buffer(buffer: u64) -> Error {
    Error::Broker(WireError::new(
        ErrorCode::UnknownBuffer,
        format!("buffer {buffer} was lost when the broker restarted without keeping it"),
    ))
}

/// What a call that may be cancelled (see [`Connection::call_for_until`])
/// does around each send of its request.
pub(crate) trait SentHook {
    /// Before a send: an error stops the call without sending.
    fn before(&self) -> Result<(), Error>;
    /// After a send: the request's id and connection generation.
    fn after(&self, request: (u64, u64));
    /// Whether anyone still waits for the call: a reconnect for a call
    /// nobody waits for is not made, or given up between attempts, and
    /// within a slice of its connect or hello (a wedged broker can keep
    /// either waiting until the deadline).
    fn wanted(&self) -> bool {
        self.before().is_ok()
    }
    /// A hook of its own saying what `wanted` says, for a reconnect run
    /// on a thread of its own (see [`Connection::reconnect_for`]); `None`
    /// reconnects on the caller's thread.
    fn aside(&self) -> Option<Arc<dyn SentHook + Send + Sync>> {
        None
    }
}

/// A call nobody cancels.
pub(crate) struct NoHook;

impl SentHook for NoHook {
    fn before(&self) -> Result<(), Error> {
        Ok(())
    }

    fn after(&self, _: (u64, u64)) {}
}

#[derive(Debug)]
pub(crate) struct Connection {
    path: PathBuf,
    hello: Hello,
    /// How long a reconnect may take in all; `None` disables it.
    reconnect_window: Option<Duration>,
    socket: Mutex<Arc<OwnedFd>>,
    /// Bumped with every new socket; requests of an old one never complete.
    generation: AtomicU64,
    next_id: AtomicU64,
    mailbox: Mutex<Mailbox>,
    arrived: Condvar,
    read_buf: Mutex<ReadBuf>,
    welcome: Mutex<Welcome>,
    /// The end-word page of the current socket, with that socket's
    /// generation: a grant may only use the page it was granted on.
    end_words: Mutex<(u64, Option<Arc<EndWords>>)>,
    holds: Mutex<HashMap<u64, Hold>>,
    next_serial: AtomicU64,
    /// The connection generation `next_event` last told its caller about.
    events_seen: AtomicU64,
    reconnecting: Mutex<()>,
    reconnects: AtomicU64,
    /// One-way requests waiting for room in the socket, oldest first (see
    /// [`Owed`]). Its lock is never held while another is taken or while
    /// anything waits for room (a message is sent under it only without
    /// waiting): the reader takes it, and must never wait for a thread
    /// blocked on the broker.
    owed: Mutex<VecDeque<Owed>>,
    /// Whether `owed` may hold anything: every send looks, and this spares
    /// it a lock when nothing is owed, which is nearly always.
    owing: AtomicBool,
    /// Whether a flusher thread runs (see [`Connection::flush_later`]).
    flushing: AtomicBool,
    /// The program's handles on it (see [`ProgramHandle`]).
    handles: AtomicUsize,
    /// Whether [`Connection::let_go`] has run: once is enough, and the
    /// `Drop` after the last handle's let-go waited a second grace.
    let_go: AtomicBool,
    /// This connection, for the flusher, which must not keep it (and its
    /// socket) alive once the program has let go of it.
    this: Weak<Connection>,
    /// A test's stand-in for a process that cannot start a thread.
    #[cfg(test)]
    no_threads: AtomicBool,
    /// A test's hold on the next `next_event_async` thread that finds an
    /// event, before the future is given it: told there (the sender),
    /// it goes on when the receiver's other end is dropped or sends.
    #[cfg(all(test, feature = "tokio"))]
    pub(crate) event_seam:
        Mutex<Option<(std::sync::mpsc::Sender<()>, std::sync::mpsc::Receiver<()>)>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section here leaves its data consistent; a panic in
    // another thread is no reason to stop talking to the broker.
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// A connected socket. With `deadline`, a `connect` the broker does not
/// take in time (its listen queue is full: a wedged broker) fails instead
/// of waiting for it with no bound; and it waits in slices, so that one
/// for a call nobody waits for any more (`hook`) stops within a slice
/// (`Disconnected`), not at the deadline.
fn open_socket(
    path: &Path,
    deadline: Option<Instant>,
    hook: &dyn SentHook,
) -> Result<OwnedFd, Error> {
    let connect_err = |source: std::io::Error| Error::Connect {
        path: path.to_owned(),
        source,
    };
    let socket = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| connect_err(e.into()))?;
    let addr = UnixAddr::new(path).map_err(|e| connect_err(e.into()))?;
    loop {
        if let Some(deadline) = deadline {
            // Linux bounds a blocking Unix-socket connect by the send
            // timeout. At least a moment: an attempt made late still
            // connects to a broker that takes it at once.
            let left = deadline.saturating_duration_since(Instant::now());
            let slice = left.clamp(Duration::from_millis(1), HANDSHAKE_SLICE);
            set_timeout(&socket, sockopt::SendTimeout, Some(slice))?;
        }
        match connect(std::os::fd::AsRawFd::as_raw_fd(&socket), &addr) {
            Ok(()) => break,
            // The queue stayed full for a slice; the socket may try again.
            Err(Errno::EAGAIN) if !hook.wanted() => return Err(Error::Disconnected),
            Err(Errno::EAGAIN) if deadline.is_some_and(|d| Instant::now() < d) => {}
            Err(err) => return Err(connect_err(err.into())),
        }
    }
    if deadline.is_some() {
        set_timeout(&socket, sockopt::SendTimeout, None)?;
    }
    Ok(socket)
}

fn encode(id: u64, flags: u8, body: RequestBody, fds: usize) -> Result<Vec<u8>, Error> {
    let request = Request {
        head: RequestHead {
            id,
            fds: fds as u8,
            flags,
        },
        body,
    };
    encode_request(&request).map_err(|e| Error::Protocol(e.to_string()))
}

fn send_error(err: SendError) -> Error {
    if is_dead(&err) {
        Error::Disconnected
    } else {
        Error::Protocol(err.to_string())
    }
}

/// One request and its reply on a socket nobody else uses yet (the hello
/// and re-attaches of a fresh connection), given up as `Disconnected` at
/// `deadline`: a reconnect's whole handshake shares its caller's time, not
/// each exchange the time left at its start.
fn exchange(
    socket: &OwnedFd,
    id: u64,
    body: RequestBody,
    deadline: Option<Instant>,
    hook: &dyn SentHook,
) -> Result<(ReplyBody, Vec<OwnedFd>), Error> {
    let bytes = encode(id, 0, body, 0)?;
    send_message(socket.as_fd(), &bytes, &[], false).map_err(send_error)?;
    let mut read_late = false;
    loop {
        if let Some(deadline) = deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() && std::mem::replace(&mut read_late, true) {
                // A broker streaming other messages keeps it no longer.
                return Err(Error::Disconnected);
            }
            // At least a moment, as the connect gets: an answer already on
            // its way (a refusal) is still read by an attempt made late.
            // At most a slice: a call nobody waits for stops between them.
            let left = left.clamp(Duration::from_millis(1), HANDSHAKE_SLICE);
            set_timeout(socket, sockopt::ReceiveTimeout, Some(left))?;
        }
        let received = match recv_message(socket.as_fd(), false) {
            Ok(received) => received,
            // Reported once, ahead of the broker's last answers (see
            // `receive`): read on.
            Err(RecvError::Os(Errno::ECONNRESET)) => continue,
            // A slice over, with time left for a call still wanted.
            Err(RecvError::Os(Errno::EAGAIN))
                if deadline.is_some_and(|d| Instant::now() < d) && hook.wanted() =>
            {
                continue
            }
            // No answer within the handshake's time (see `fresh_connection`).
            Err(RecvError::Closed | RecvError::Os(Errno::EAGAIN)) => {
                return Err(Error::Disconnected)
            }
            Err(other) => return Err(Error::Protocol(other.to_string())),
        };
        match decode_server_message(&received.bytes).map_err(|e| Error::Protocol(e.to_string()))? {
            ServerMessage::Reply(reply) if reply.id == id => {
                return reply
                    .result
                    .map(|body| (body, received.fds))
                    .map_err(Error::Broker)
            }
            // A refusal of the connection itself (busy) is answered with id 0.
            ServerMessage::Reply(reply) if reply.id == 0 => {
                if let Err(err) = reply.result {
                    return Err(Error::Broker(err));
                }
            }
            _ => {}
        }
    }
}

/// The hello, and the end-word page when the broker sent one.
fn say_hello(
    socket: &OwnedFd,
    hello: &Hello,
    deadline: Option<Instant>,
    hook: &dyn SentHook,
) -> Result<(Welcome, Option<Arc<EndWords>>), Error> {
    match exchange(socket, 1, RequestBody::Hello(hello.clone()), deadline, hook)? {
        (ReplyBody::Welcome(welcome), fds) => {
            let page = match fds.first() {
                Some(fd) if welcome.features & features::END_WORDS != 0 => Some(Arc::new(
                    EndWords::map(fd.as_fd()).map_err(|e| Error::Protocol(e.to_string()))?,
                )),
                _ => None,
            };
            Ok((welcome, page))
        }
        (other, _) => Err(Error::UnexpectedReply {
            expected: "welcome",
            got: other.kind().to_owned(),
        }),
    }
}

/// How long a first connect waits for the broker when there is no
/// reconnect window to bound it (`ClientOptions::reconnect` is `None`):
/// the default window's length.
pub const CONNECT_WINDOW: Duration = Duration::from_secs(10);

impl Connection {
    /// Connects and says hello, within the reconnect window (or
    /// [`CONNECT_WINDOW`] without one; no bound for a window too long to
    /// end, `Duration::MAX`): a socket whose listener takes the connection
    /// and never answers (a broker stopped or wedged, something else
    /// listening), or whose listen queue stays full, fails the connect
    /// (`Error::Connect`, timed out) instead of blocking for ever.
    pub fn open(
        path: &Path,
        hello: Hello,
        reconnect_window: Option<Duration>,
    ) -> Result<Arc<Self>, Error> {
        let window = reconnect_window.unwrap_or(CONNECT_WINDOW);
        let deadline = deadline_after(window);
        // Only a wait that ran out is told as one: a socket that is not
        // there, refuses or is forbidden keeps its own error, however
        // short the window.
        let ran_out = |err: &Error| match err {
            Error::Disconnected => true,
            Error::Connect { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            _ => false,
        };
        let timed_out = |err: Error| match err {
            err if ran_out(&err) && deadline.is_some_and(|d| Instant::now() >= d) => {
                Error::Connect {
                    path: path.to_owned(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no welcome within {window:?}"),
                    ),
                }
            }
            other => other,
        };
        let socket = open_socket(path, deadline, &NoHook).map_err(timed_out)?;
        let (welcome, page) = say_hello(&socket, &hello, deadline, &NoHook).map_err(timed_out)?;
        if deadline.is_some() {
            set_timeout(&socket, sockopt::ReceiveTimeout, None)?;
        }
        Ok(Connection::welcomed(
            path,
            hello,
            reconnect_window,
            socket,
            welcome,
            page,
        ))
    }

    /// A connection on `socket`, which has been welcomed already.
    fn welcomed(
        path: &Path,
        hello: Hello,
        reconnect_window: Option<Duration>,
        socket: OwnedFd,
        welcome: Welcome,
        page: Option<Arc<EndWords>>,
    ) -> Arc<Self> {
        Arc::new_cyclic(|this| Connection {
            path: path.to_owned(),
            hello,
            reconnect_window,
            socket: Mutex::new(Arc::new(socket)),
            generation: AtomicU64::new(0),
            next_id: AtomicU64::new(2),
            mailbox: Mutex::new(Mailbox::default()),
            arrived: Condvar::new(),
            read_buf: Mutex::new(ReadBuf(vec![0; dmabroker_ipc::MAX_MESSAGE_SIZE])),
            welcome: Mutex::new(welcome),
            end_words: Mutex::new((0, page)),
            holds: Mutex::new(HashMap::new()),
            next_serial: AtomicU64::new(1),
            events_seen: AtomicU64::new(0),
            reconnecting: Mutex::new(()),
            reconnects: AtomicU64::new(0),
            owed: Mutex::new(VecDeque::new()),
            owing: AtomicBool::new(false),
            flushing: AtomicBool::new(false),
            handles: AtomicUsize::new(0),
            let_go: AtomicBool::new(false),
            this: this.clone(),
            #[cfg(test)]
            no_threads: AtomicBool::new(false),
            #[cfg(all(test, feature = "tokio"))]
            event_seam: Mutex::new(None),
        })
    }

    pub fn welcome(&self) -> Welcome {
        lock(&self.welcome).clone()
    }

    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    /// Records a new hold, granted on connection `generation`; returns its
    /// serial, which the `Buffer` shows with every request on it (see
    /// [`Connection::send_for`]). A hold granted on a connection that has
    /// been replaced meanwhile was not re-attached (the reconnect did not
    /// know it yet) and its id may name another buffer on the new one: it
    /// is recorded as lost (serial 0, which no hold has), and must not
    /// displace a hold of that id made since.
    pub fn remember_hold(&self, buffer: u64, secret: &str, inode: u64, generation: u64) -> u64 {
        let mut holds = lock(&self.holds);
        if self.generation() != generation {
            return LOST;
        }
        let serial = self.next_serial.fetch_add(1, Ordering::Relaxed);
        let hold = Hold {
            secret: secret.to_owned(),
            inode,
            serial,
        };
        holds.insert(buffer, hold);
        serial
    }

    /// Records a new hold as [`Connection::remember_hold`] does, and one
    /// granted on a connection replaced meanwhile is re-attached on the
    /// current one by its secret, as the reconnect would have done had it
    /// known it: the broker kept it if it kept the others. An error (the
    /// broker refused the re-attach, or the re-attach's own reconnect
    /// failed) fails the call that got the hold: the hold is gone.
    pub fn keep_hold(
        &self,
        buffer: u64,
        secret: &str,
        inode: u64,
        mut generation: u64,
    ) -> Result<u64, Error> {
        // Each turn needs a reconnect in between to fail: a few at most.
        for _ in 0..3 {
            let serial = self.remember_hold(buffer, secret, inode, generation);
            if serial != LOST {
                return Ok(serial);
            }
            if secret.is_empty() {
                return Err(lost_buffer(buffer));
            }
            let reattach = RequestBody::Reattach {
                buffer,
                secret: secret.to_owned(),
            };
            generation = match self.call_on(reattach, &[])? {
                (ReplyBody::Buffer(info), _, (_, now)) if info.inode == inode => now,
                (ReplyBody::Buffer(info), _, _) => {
                    return Err(Error::Protocol(format!(
                        "buffer {buffer} re-attached as inode {}, not {inode}",
                        info.inode
                    )))
                }
                (other, _, _) => {
                    return Err(Error::UnexpectedReply {
                        expected: "buffer",
                        got: other.kind().to_owned(),
                    })
                }
            };
        }
        Err(Error::Disconnected)
    }

    /// Frees a hold the caller dropped. Decided under the holds lock, so
    /// that a reconnect re-attaching it either finds it gone (and frees it
    /// on the new connection, see `reconnect`) or has already installed
    /// the new socket, whose generation this `Free` is then owed to: sent
    /// to the dead one, it was lost, and the re-attach kept the buffer for
    /// nobody. A hold the broker lost is not freed: its id is not this
    /// buffer's any more. Never waits for the broker (see
    /// [`Connection::send`]).
    pub fn release_hold(&self, buffer: u64, serial: u64) {
        let generation = {
            let mut holds = lock(&self.holds);
            if !is_hold(&holds, buffer, serial) {
                return;
            }
            holds.remove(&buffer);
            self.generation()
        };
        let _ = self.send_one_way(generation, RequestBody::Free { buffer });
    }

    /// As [`Connection::send`], for a request on hold `serial` of buffer
    /// `buffer`: refused without a word to the broker when the broker lost
    /// that hold. The hold is checked, and the socket taken, under the
    /// holds lock, which a reconnect holds while it installs the new
    /// socket, so the request cannot reach a new broker on which the id
    /// names another buffer: it goes to the socket current at the check,
    /// dead by then if replaced. Sent without the lock, so that a request
    /// waiting for room never holds up another thread's drop.
    /// A request not sent says which connection it was for (see
    /// [`Unsent`]).
    fn send_for(
        &self,
        (buffer, serial): (u64, u64),
        body: RequestBody,
        fds: &[BorrowedFd<'_>],
        wait: bool,
    ) -> Result<(u64, u64), Unsent> {
        let (socket, generation) = {
            let holds = lock(&self.holds);
            if !is_hold(&holds, buffer, serial) {
                return Err(Unsent {
                    error: lost_buffer(buffer),
                    generation: self.generation(),
                });
            }
            self.current_socket()
        };
        self.send_at(&socket, generation, body, fds, wait)
    }

    /// As [`Connection::send`], for a request that only means something on
    /// connection `generation` (ending an access by its id): `None`, and
    /// nothing sent, once that connection has been replaced. Checked
    /// under the holds lock, which a reconnect holds while it installs
    /// the new socket, and sent on the socket current then (see
    /// [`Connection::send_for`]), so the request cannot reach a new
    /// broker, on which the id may name another access of this client.
    pub fn send_on(
        &self,
        generation: u64,
        body: RequestBody,
        fds: &[BorrowedFd<'_>],
        wait: bool,
    ) -> Result<Option<(u64, u64)>, Error> {
        let socket = {
            let _holds = lock(&self.holds);
            let (socket, current) = self.current_socket();
            if current != generation {
                return Ok(None);
            }
            socket
        };
        self.send_at(&socket, generation, body, fds, wait)
            .map(Some)
            .map_err(|unsent| unsent.error)
    }

    /// As [`Connection::call_on`], for a request on a hold (see
    /// [`Connection::send_for`]); checked again before a retry on a new
    /// connection.
    pub fn call_for(
        &self,
        hold: (u64, u64),
        body: RequestBody,
        fds: &[BorrowedFd<'_>],
    ) -> Result<Answered, Error> {
        self.call_for_until(hold, || body.clone(), fds, None, &NoHook)
    }

    /// As [`Connection::call_for`], with the request made anew for the
    /// retry (a begin's timeout is what is left of it by then), and a
    /// reconnect given up at `limit`. `sent` hears of each request sent
    /// (its id and connection generation) before its answer is waited
    /// for, and may refuse to send one (a begin cancelled meanwhile).
    pub fn call_for_until(
        &self,
        hold: (u64, u64),
        body: impl Fn() -> RequestBody,
        fds: &[BorrowedFd<'_>],
        limit: Option<Instant>,
        sent: &dyn SentHook,
    ) -> Result<Answered, Error> {
        self.call_with(
            || {
                sent.before().map_err(|error| Unsent {
                    error,
                    generation: self.generation(),
                })?;
                let request = self.send_for(hold, body(), fds, true)?;
                sent.after(request);
                Ok(request)
            },
            limit,
            sent,
        )
    }

    /// Withdraws the begin `request` sent on connection `generation`
    /// (`Cancel`, one way): only while that connection is the current
    /// one, whose broker the id means something to, and whose welcome
    /// says it takes cancels. Never waits: on a socket the broker does
    /// not empty, the cancel is owed, behind what is owed already (see
    /// [`Owed`]). Returns whether it was sent or owed.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub fn cancel(&self, generation: u64, request: u64) -> bool {
        // If a reconnect installs a new socket right after this look, the
        // cancel is owed to the dead one, and dropped.
        if self.generation() != generation || lock(&self.welcome).features & features::CANCEL == 0 {
            return false;
        }
        self.send_one_way(generation, RequestBody::Cancel { request })
            .is_ok()
    }

    /// The end-word page of connection generation `generation`, if that is
    /// still the current one and it has a page.
    pub fn end_words(&self, generation: u64) -> Option<Arc<EndWords>> {
        let (current, page) = &*lock(&self.end_words);
        (*current == generation).then(|| page.clone()).flatten()
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Whether the broker of connection `generation`, still the current
    /// one, has been read saying it revoked access `access` (any call
    /// that reads the socket files the `AccessRevoked`).
    pub fn revoked(&self, generation: u64, access: u64) -> bool {
        let mailbox = lock(&self.mailbox);
        access != 0 && self.generation() == generation && mailbox.revoked.contains(&access)
    }

    /// Nobody will collect the answer to request `id` (a begin answered
    /// through a buffer word): drop whatever else comes for it.
    pub fn abandon(&self, id: u64) {
        let mut mailbox = lock(&self.mailbox);
        mailbox.replies.remove(&id);
        mailbox.awaited.remove(&id);
    }

    /// Whether the broker has already answered request `id`. It answers a
    /// cancelled plan before anything it does afterwards, and its messages
    /// to a client keep their order (queued in its outbox or not), so one
    /// round trip settles it: an answer sent before the bit a waiter found
    /// arrives before the reply to this probe. Only for the rare waiter
    /// whose bit another thread of the process may own (see
    /// `await_hand_off`).
    pub fn answered(&self, id: u64) -> bool {
        if let Ok((probe, generation)) = self.send(RequestBody::ListHeaps, &[], true) {
            let _ = self.wait_reply(probe, generation);
        }
        lock(&self.mailbox).replies.contains_key(&id)
    }

    /// Whether the broker hung up on the current socket (checked without
    /// reading, while a thread waits on a buffer word instead).
    pub fn hung_up(&self) -> bool {
        let (socket, _) = self.current_socket();
        let mut fds = [PollFd::new(socket.as_fd(), PollFlags::empty())];
        match poll(&mut fds, PollTimeout::ZERO) {
            Ok(_) => fds[0]
                .revents()
                .is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR)),
            Err(_) => false,
        }
    }

    fn current_socket(&self) -> (Arc<OwnedFd>, u64) {
        let socket = lock(&self.socket);
        (Arc::clone(&socket), self.generation())
    }

    /// Sends a request and returns its id and the connection generation it
    /// went out on, without waiting for the answer. One nobody waits for
    /// (`wait` false: a free or an end, which drops send) and carrying no
    /// fds never waits for room either (see [`Connection::send_one_way`]).
    pub fn send(
        &self,
        body: RequestBody,
        fds: &[BorrowedFd<'_>],
        wait: bool,
    ) -> Result<(u64, u64), Error> {
        self.try_send(body, fds, wait)
            .map_err(|unsent| unsent.error)
    }

    /// As [`Connection::send`], saying which connection a request that
    /// could not be sent was for (see [`Unsent`]).
    fn try_send(
        &self,
        body: RequestBody,
        fds: &[BorrowedFd<'_>],
        wait: bool,
    ) -> Result<(u64, u64), Unsent> {
        let (socket, generation) = self.current_socket();
        self.send_at(&socket, generation, body, fds, wait)
    }

    /// As [`Connection::send`], on `socket`, connection `generation`'s:
    /// behind everything owed to it. A request whose answer is awaited
    /// (or that carries fds) waits for room; the lock on what is owed is
    /// not held meanwhile.
    fn send_at(
        &self,
        socket: &OwnedFd,
        generation: u64,
        body: RequestBody,
        fds: &[BorrowedFd<'_>],
        wait: bool,
    ) -> Result<(u64, u64), Unsent> {
        let unsent = |error| Unsent { error, generation };
        if !wait && fds.is_empty() {
            let id = self.send_one_way(generation, body).map_err(unsent)?;
            return Ok((id, generation));
        }
        let mut id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut flags = 0;
        if !wait {
            id |= UNWAITED;
            flags |= FLAG_NO_REPLY;
        }
        let bytes = encode(id, flags, body, fds.len()).map_err(unsent)?;
        if wait {
            // Before it is sent: another thread may read the answer first.
            lock(&self.mailbox).awaited.insert(id);
        }
        let sent = self
            .send_owed(socket, generation, Room::Forever)
            .and_then(|()| send_message(socket.as_fd(), &bytes, fds, false));
        if let Err(err) = sent {
            if wait {
                lock(&self.mailbox).awaited.remove(&id);
            }
            return Err(unsent(send_error(err)));
        }
        Ok((id, generation))
    }

    /// A request and its reply, reconnecting and retrying once if the
    /// connection turns out to be broken.
    pub fn call(
        &self,
        body: RequestBody,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(ReplyBody, Vec<OwnedFd>), Error> {
        self.call_on(body, fds).map(|(body, fds, _)| (body, fds))
    }

    /// As [`Connection::call`], also returning the request id and the
    /// connection generation it went out on (a `Planned` begin waits for
    /// more messages to that request).
    pub fn call_on(&self, body: RequestBody, fds: &[BorrowedFd<'_>]) -> Result<Answered, Error> {
        self.call_with(|| self.try_send(body.clone(), fds, true), None, &NoHook)
    }

    /// A request sent by `send`, and its reply, reconnecting and sending
    /// it again once if the connection turns out to be broken.
    fn call_with(
        &self,
        send: impl Fn() -> Result<(u64, u64), Unsent>,
        limit: Option<Instant>,
        hook: &dyn SentHook,
    ) -> Result<Answered, Error> {
        let mut retried = false;
        loop {
            // The connection that broke: the one the request went out on,
            // or was to go out on if its send found it dead; not the one
            // current before the send (another thread may have replaced
            // that one meanwhile, and a reconnect from it would find the
            // work done and not reconnect again: the retry went to the
            // same dead connection, and the call failed without ever
            // trying a new one).
            let (result, broken) = match send() {
                Ok((id, sent_on)) => {
                    let answer = self
                        .wait_reply(id, sent_on)
                        .map(|(body, fds)| (body, fds, (id, sent_on)));
                    (answer, sent_on)
                }
                Err(Unsent { error, generation }) => (Err(error), generation),
            };
            match result {
                Err(Error::Disconnected)
                    if !retried && self.reconnect_window.is_some() && hook.wanted() =>
                {
                    retried = true;
                    self.reconnect_for(broken, limit, hook)?;
                }
                other => return other,
            }
        }
    }

    /// The answer to request `id`. A `Planned` one leaves the request
    /// awaited: the begin it answers waits for more (or abandons it).
    pub fn wait_reply(&self, id: u64, generation: u64) -> Result<(ReplyBody, Vec<OwnedFd>), Error> {
        let mut mailbox = lock(&self.mailbox);
        let answer = loop {
            if let Some(incoming) = mailbox.replies.remove(&id) {
                break incoming.into_answer();
            }
            if self.generation() != generation {
                break Err(Error::Disconnected);
            }
            if mailbox.closed.is_some() {
                // A broker that refuses a connection (busy, bad version)
                // says why before it hangs up; any other hang-up is a
                // disconnect, which `call_on` answers by reconnecting.
                break Err(match mailbox.refusal.clone() {
                    Some(err) => Error::Broker(err),
                    None => Error::Disconnected,
                });
            }
            let (guard, mine) = self.read_or_wait(mailbox, None, Some(id));
            mailbox = guard;
            if let Some(incoming) = mine {
                break incoming.into_answer();
            }
        };
        if !matches!(answer, Ok((ReplyBody::Planned { .. }, _))) {
            mailbox.awaited.remove(&id);
        }
        answer
    }

    /// Either becomes the reader for one message or waits for the thread
    /// that is. Returns with the lock held again, and with the reply to
    /// `want` if that is what this thread read (it is handed over directly
    /// rather than filed and looked up again).
    fn read_or_wait<'a>(
        &'a self,
        mut mailbox: MutexGuard<'a, Mailbox>,
        deadline: Option<Instant>,
        want: Option<u64>,
    ) -> (MutexGuard<'a, Mailbox>, Option<Incoming>) {
        if mailbox.reading {
            mailbox.sleepers += 1;
            let mut mailbox = match deadline {
                None => self
                    .arrived
                    .wait(mailbox)
                    .unwrap_or_else(|p| p.into_inner()),
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    self.arrived
                        .wait_timeout(mailbox, left)
                        .map(|(guard, _)| guard)
                        .unwrap_or_else(|p| p.into_inner().0)
                }
            };
            mailbox.sleepers -= 1;
            return (mailbox, None);
        }
        mailbox.reading = true;
        drop(mailbox);
        let (socket, generation) = self.current_socket();
        let received = {
            // Only the reader touches the buffer; reusing it spares zeroing
            // 64 KiB for every message.
            let mut buf = lock(&self.read_buf);
            receive(&socket, &mut buf.0, deadline)
        };
        let mut not_given_back = None;
        match &received {
            // On the socket it came on, whichever is current now: the ids
            // it names are that connection's.
            Ok(Received::FdsLost(message)) => {
                not_given_back = self.give_back(&socket, generation, message);
            }
            // A broker that answers may be reading again: what it is owed
            // need not wait for the client's next request.
            Ok(Received::Message(..)) => {
                let _ = self.send_owed(&socket, generation, Room::Now);
            }
            _ => {}
        }
        let mut mailbox = lock(&self.mailbox);
        mailbox.reading = false;
        let mut mine = None;
        if generation == self.generation() {
            if let Some(err) = not_given_back {
                push_error(&mut mailbox, err);
            }
            // A refusal is the broker's last word only if nothing follows
            // it (see `refusal`); this message may be one again.
            if matches!(
                received,
                Ok(Received::Message(..) | Received::Unreadable { .. } | Received::FdsLost(_))
            ) {
                mailbox.refusal = None;
            }
            match received {
                Ok(Received::Message(ServerMessage::Reply(reply), fds))
                    if want == Some(reply.id) && reply.id & UNWAITED == 0 =>
                {
                    mine = Some(Incoming {
                        result: reply.result.map_err(Error::Broker),
                        fds,
                    });
                }
                Ok(Received::Message(message, fds)) => file_message(&mut mailbox, message, fds),
                Ok(Received::Unreadable { reply_to, why }) => {
                    let err = WireError::new(ErrorCode::ProtocolError, why);
                    mine = fail_reply(
                        &mut mailbox,
                        reply_to,
                        want,
                        Error::Broker(err.clone()),
                        err,
                    );
                }
                Ok(Received::FdsLost(ServerMessage::Reply(reply))) => {
                    let err = WireError::new(
                        ErrorCode::ProtocolError,
                        format!("{FDS_LOST} (answering request {})", reply.id),
                    );
                    mine = fail_reply(&mut mailbox, Some(reply.id), want, Error::FdTableFull, err);
                }
                Ok(Received::FdsLost(ServerMessage::Event(event))) => {
                    let why = format!("{FDS_LOST} (with event {:?})", event.event);
                    push_error(&mut mailbox, WireError::new(ErrorCode::ProtocolError, why));
                }
                Ok(Received::Nothing) => {}
                Err(reason) => mailbox.closed = Some(reason),
            }
        }
        // Another thread may now be the one to read (or its reply is filed).
        if mailbox.sleepers > 0 {
            self.arrived.notify_all();
        }
        (mailbox, mine)
    }

    /// After a call on connection generation `broken` failed with
    /// `Disconnected` outside [`Connection::call_on`] (a hand-off wait):
    /// reconnects if the options allow, and says whether to try again.
    /// Gives up at `limit` if that comes before the end of the reconnect
    /// window.
    pub fn recover_by(
        &self,
        broken: u64,
        limit: Option<Instant>,
        hook: &dyn SentHook,
    ) -> Result<bool, Error> {
        if self.reconnect_window.is_none() || !hook.wanted() {
            return Ok(false);
        }
        self.reconnect_for(broken, limit, hook)?;
        Ok(true)
    }

    /// [`Connection::reconnect`], for a call that may stop waiting
    /// (`hook`): on a thread of its own if the hook has one to give it
    /// ([`SentHook::aside`]), which the caller stops waiting for
    /// (`Disconnected`) within [`ASIDE_LOOK`] of nobody wanting the call.
    /// Once the new broker has answered the hello, a reconnect re-attaches
    /// every held buffer to the end whoever waits (cut off, the buffers
    /// re-attached so far would be released with the socket): with a
    /// broker wedged there, until the window ends, never with
    /// `Duration::MAX`, and a tokio runtime shutting down waits for its
    /// blocking-pool threads, a dropped future's among them. Only the
    /// reconnect's own thread waits that long now. Without a thread to
    /// start, the caller's thread reconnects.
    fn reconnect_for(
        &self,
        broken: u64,
        limit: Option<Instant>,
        hook: &dyn SentHook,
    ) -> Result<(), Error> {
        let (Some(theirs), Some(this)) = (hook.aside(), self.this.upgrade()) else {
            return self.reconnect(broken, limit, hook);
        };
        let (done, result) = std::sync::mpsc::channel();
        let started = std::thread::Builder::new()
            .name("dmabroker-reconnect".into())
            .spawn(move || {
                let _ = done.send(this.reconnect(broken, limit, &*theirs));
            });
        if started.is_err() {
            return self.reconnect(broken, limit, hook);
        }
        loop {
            match result.recv_timeout(ASIDE_LOOK) {
                Ok(reconnected) => return reconnected,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) if hook.wanted() => {}
                // Nobody waits for the answer; or the thread panicked.
                Err(_) => return Err(Error::Disconnected),
            }
        }
    }

    /// Replaces a broken connection (unless another thread already did):
    /// new socket, hello, re-attach of every held buffer. Gives up after the
    /// reconnect window.
    /// Gives up (`Disconnected`) between attempts, or within a slice of a
    /// connect or hello, once nobody waits for the call it serves (`hook`):
    /// a cancelled begin's thread returns at once instead of reconnecting
    /// for the whole window.
    fn reconnect(
        &self,
        broken: u64,
        limit: Option<Instant>,
        hook: &dyn SentHook,
    ) -> Result<(), Error> {
        // Another thread may be reconnecting, for its whole window.
        let _one_at_a_time = loop {
            match self.reconnecting.try_lock() {
                Ok(guard) => break guard,
                Err(std::sync::TryLockError::Poisoned(p)) => break p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock)
                    if limit.is_some_and(|limit| Instant::now() >= limit) =>
                {
                    return Err(out_of_time());
                }
                Err(std::sync::TryLockError::WouldBlock) if !hook.wanted() => {
                    return Err(Error::Disconnected);
                }
                Err(std::sync::TryLockError::WouldBlock) => {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        };
        if self.generation() != broken {
            return Ok(());
        }
        let window = self.reconnect_window.unwrap_or_default();
        let endless = deadline_after(window).is_none();
        let end_of_window = end_of_window(window);
        let deadline = limit.map_or(end_of_window, |limit| limit.min(end_of_window));
        // Given up at the caller's limit: its time ran out, as a broker's
        // `Timeout` says.
        let limited = limit.is_some_and(|limit| limit <= end_of_window);
        let mut backoff = FIRST_BACKOFF;
        loop {
            if !hook.wanted() {
                return Err(Error::Disconnected);
            }
            match self.fresh_connection(deadline, end_of_window, hook) {
                Ok((socket, welcome, page, mut reattached)) => {
                    // Lock order: holds, then mailbox and socket (install).
                    let mut holds = loop {
                        // A hold recorded while the re-attach ran was
                        // granted on the old connection and is unknown to
                        // the new one: re-attached too, by its secret
                        // (dropped, it was lost, although the broker kept
                        // it). Finitely many: each is an answer of the old
                        // connection.
                        let holds = lock(&self.holds);
                        let known: HashSet<(u64, u64)> = reattached.iter().copied().collect();
                        let late: Vec<(u64, Hold)> = holds
                            .iter()
                            .filter(|(buffer, hold)| !known.contains(&(**buffer, hold.serial)))
                            .map(|(buffer, hold)| (*buffer, hold.clone()))
                            .collect();
                        if late.is_empty() {
                            break holds;
                        }
                        drop(holds);
                        let window = end_of_window.max(deadline);
                        match self.reattach_holds(&socket, late, window) {
                            Ok(more) => reattached.extend(more),
                            Err(err) => return Err(err),
                        }
                    };
                    let known: HashSet<(u64, u64)> = reattached.iter().copied().collect();
                    holds.retain(|buffer, hold| known.contains(&(*buffer, hold.serial)));
                    // The generation `install` gives the new socket: only
                    // this thread installs one (`reconnecting`).
                    let next = self.generation() + 1;
                    for (buffer, serial) in reattached {
                        if !is_hold(&holds, buffer, serial) {
                            // Dropped while it was re-attached: its Free
                            // went to the dead connection. Owed to the new
                            // one, ahead of anything sent on it, and never
                            // waited for here: under the holds lock, a
                            // broker not reading hung every thread's drop.
                            let id = self.next_id.fetch_add(1, Ordering::Relaxed) | UNWAITED;
                            let free = encode(id, FLAG_NO_REPLY, RequestBody::Free { buffer }, 0)?;
                            self.owe(Owed {
                                generation: next,
                                bytes: free,
                                given_back: false,
                            });
                        }
                    }
                    self.install(socket, welcome, page);
                    drop(holds);
                    self.send_owed_now();
                    return Ok(());
                }
                // A hello refused for a reason no retry changes (another
                // protocol version): the answer, at once, whatever is left
                // of the window. One the policy does not permit may pass
                // a moment later (a reload, a peer the broker could not
                // pin down for a moment), so it is tried again within a
                // window that ends; a window without end would wait for
                // good.
                Err(
                    err @ Error::Broker(WireError {
                        code: ErrorCode::IncompatibleVersion,
                        ..
                    }),
                ) => return Err(err),
                Err(
                    err @ Error::Broker(WireError {
                        code: ErrorCode::PermissionDenied,
                        ..
                    }),
                ) if endless => return Err(err),
                // A caller's limit is kept to the end (its caller tells a
                // timeout by the deadline having passed); the window alone
                // ends at the last attempt that fits in it.
                Err(err) if limit.is_none() && Instant::now() + backoff >= deadline => {
                    return Err(err)
                }
                // Only a broker still away is the caller's time running
                // out; a refusal (another protocol version) is the answer.
                Err(err) if Instant::now() >= deadline => {
                    return Err(match err {
                        Error::Connect { .. } | Error::Disconnected if limited => out_of_time(),
                        other => other,
                    })
                }
                Err(_) => {
                    let pause_end = Instant::now() + backoff;
                    // In slices: a call nobody waits for any more stops.
                    while hook.wanted() && Instant::now() < pause_end.min(deadline) {
                        let left = pause_end
                            .min(deadline)
                            .saturating_duration_since(Instant::now());
                        std::thread::sleep(left.min(Duration::from_millis(20)));
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// A new socket, welcomed, with every hold re-attached: also returns
    /// the buffers re-attached.
    #[allow(clippy::type_complexity)]
    /// `deadline` bounds the connect and the hello; `reattach_deadline`
    /// (the end of the reconnect window) the re-attaches after them.
    fn fresh_connection(
        &self,
        deadline: Instant,
        reattach_deadline: Instant,
        hook: &dyn SentHook,
    ) -> Result<(OwnedFd, Welcome, Option<Arc<EndWords>>, Vec<(u64, u64)>), Error> {
        // A socket whose broker is not serving yet (socket activation while
        // it restarts) takes the connection and answers nothing, or takes
        // none once its queue is full: the connect and the hello may wait
        // only until the caller's deadline.
        let socket = open_socket(&self.path, Some(deadline), hook)?;
        let (welcome, page) = say_hello(&socket, &self.hello, Some(deadline), hook)?;
        // The broker serves: the re-attaches run to their end within the
        // window, past a caller's short timeout. Cut off there, a caller
        // that only ever waits briefly (an event loop) would start over at
        // every call and never get its buffers back before the broker's
        // grace period drops them.
        let deadline = reattach_deadline.max(deadline);
        let holds: Vec<(u64, Hold)> = lock(&self.holds)
            .iter()
            .map(|(id, h)| (*id, h.clone()))
            .collect();
        let reattached = self.reattach_holds(&socket, holds, deadline)?;
        set_timeout(&socket, sockopt::ReceiveTimeout, None)?;
        Ok((socket, welcome, page, reattached))
    }

    /// Re-attaches `holds` on `socket`, a new connection not installed
    /// yet, within `deadline`; returns those re-attached. A hold the
    /// broker refuses (it no longer has the buffer) is forgotten.
    fn reattach_holds(
        &self,
        socket: &OwnedFd,
        holds: Vec<(u64, Hold)>,
        deadline: Instant,
    ) -> Result<Vec<(u64, u64)>, Error> {
        let mut reattached = Vec::with_capacity(holds.len());
        for (buffer, hold) in holds {
            // Not installed: no other request goes out on it.
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            if hold.secret.is_empty() {
                // Nothing to re-attach it with.
                self.forget_hold(buffer, hold.serial);
                continue;
            }
            let answer = exchange(
                socket,
                id,
                RequestBody::Reattach {
                    buffer,
                    secret: hold.secret.clone(),
                },
                Some(deadline),
                // Every holder's, not only the call's that reconnects: cut
                // off half way, the socket would close with buffers
                // re-attached to it, which the broker then releases.
                &NoHook,
            );
            match answer {
                Ok((ReplyBody::Buffer(info), _)) if info.inode == hold.inode => {
                    reattached.push((buffer, hold.serial));
                }
                Ok(_) | Err(Error::Broker(_)) => {
                    // The broker no longer has it (a restart without an fd
                    // store): requests on it will say UnknownBuffer, and
                    // none will be sent (see `send_for`).
                    self.forget_hold(buffer, hold.serial);
                }
                Err(err) => return Err(err),
            }
        }
        Ok(reattached)
    }

    /// Forgets hold `serial` of `buffer`, if it is still that one.
    fn forget_hold(&self, buffer: u64, serial: u64) {
        let mut holds = lock(&self.holds);
        if is_hold(&holds, buffer, serial) {
            holds.remove(&buffer);
        }
    }

    fn install(&self, socket: OwnedFd, welcome: Welcome, page: Option<Arc<EndWords>>) {
        let mut mailbox = lock(&self.mailbox);
        // One step under the socket lock, which `current_socket` reads
        // both under: a new socket seen with the old generation had its
        // replies dropped as the old connection's.
        let mut current = lock(&self.socket);
        *current = Arc::new(socket);
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        drop(current);
        *lock(&self.end_words) = (generation, page);
        *lock(&self.welcome) = welcome;
        mailbox.replies.clear();
        // They name fences and accesses of the old broker's numbering,
        // which the new one starts again.
        mailbox.events.clear();
        mailbox.events_dropped = false;
        mailbox.revoked.clear();
        mailbox.closed = None;
        mailbox.refusal = None;
        self.reconnects.fetch_add(1, Ordering::Relaxed);
        self.arrived.notify_all();
        drop(mailbox);
        // Owed to the old broker, whose holds ended with its connection
        // (one the reader adds late is dropped at the next send). Not one
        // owed to the new connection already, by a reader as fast.
        let mut owed = lock(&self.owed);
        owed.retain(|o| o.generation >= generation);
        self.owing.store(!owed.is_empty(), Ordering::Release);
    }

    /// Sends what is owed to connection `generation` (see [`Owed`]) on
    /// `socket`, its socket, oldest first, for as long as `room` says to
    /// wait for room. Each is sent (without waiting) under the lock and
    /// taken off only once sent, so that no other sender, finding it
    /// gone, overtakes it; the lock is never held while waiting, so the
    /// reader never waits for a thread blocked on the broker. What the
    /// dead connection was owed is dropped with it.
    ///
    /// A message the socket refuses for good (see [`is_for_a_moment`])
    /// breaks the connection (see [`Connection::break_off`]), which then
    /// reads as gone (`EPIPE`): left at the head of the queue, it was
    /// tried again every 10 ms by every request waiting behind it, none
    /// of which ever went out.
    fn send_owed(&self, socket: &OwnedFd, generation: u64, room: Room) -> Result<(), SendError> {
        if !self.owing.load(Ordering::Acquire) {
            return Ok(());
        }
        loop {
            let full = {
                let mut owed = lock(&self.owed);
                let result = loop {
                    // Generations only grow: an older one's broker is gone.
                    owed.retain(|o| o.generation >= generation);
                    let Some(at) = owed.iter().position(|o| o.generation == generation) else {
                        break Ok(());
                    };
                    match send_message(socket.as_fd(), &owed[at].bytes, &[], true) {
                        Ok(()) => {
                            owed.remove(at);
                        }
                        Err(err) if is_dead(&err) || !is_for_a_moment(&err) => {
                            owed.retain(|o| o.generation != generation);
                            break Err(err);
                        }
                        Err(err) => break Err(err),
                    }
                };
                self.owing.store(!owed.is_empty(), Ordering::Release);
                match result {
                    Err(err) if is_dead(&err) => return Err(err),
                    Err(err) if !is_for_a_moment(&err) => {
                        drop(owed);
                        self.break_off(socket, generation, &err);
                        return Err(SendError::Os(Errno::EPIPE));
                    }
                    Err(err) => err,
                    done => return done,
                }
            };
            if !room.wait_for(socket, &full) {
                return Err(full);
            }
        }
    }

    /// Sends a one-way request without fds on connection `generation`
    /// without ever waiting for room: it is owed (see [`Owed`]), behind
    /// what is owed already, and goes out now if the socket has room,
    /// else as soon as it has. A drop that blocked in `sendmsg` on a
    /// broker that does not read (wedged, or holding this user's
    /// connections back) hung the program's thread. Returns its id; fails
    /// only if the connection is gone.
    fn send_one_way(&self, generation: u64, body: RequestBody) -> Result<u64, Error> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) | UNWAITED;
        let bytes = encode(id, FLAG_NO_REPLY, body, 0)?;
        self.owe(Owed {
            generation,
            bytes,
            given_back: false,
        });
        let (socket, current) = self.current_socket();
        if current != generation {
            // Replaced meanwhile: it is dropped with the old connection.
            return Ok(id);
        }
        match self.send_owed(&socket, generation, Room::Now) {
            Ok(()) => Ok(id),
            Err(err) if is_dead(&err) => Err(send_error(err)),
            Err(_) => {
                if !self.flush_later() && may_wait_here() {
                    // No thread to send it later: this one does, as drops
                    // did. Not a runtime's thread, whose other tasks would
                    // stall meanwhile: there it waits for the next request
                    // or the last handle's let-go, which waits off the
                    // runtime's threads.
                    let _ = self.send_owed(&socket, generation, Room::Forever);
                }
                Ok(id)
            }
        }
    }

    /// Gives up connection `generation` (`socket`), which refused a
    /// message it owed for good (`err`): shut down, so that the broker
    /// reads the hang-up and ends everything this client held on it (what
    /// the lost `End` or `Free` would have ended, and the rest), and
    /// marked closed, so that every call fails `Disconnected` at once and
    /// reconnects if the options allow. Dropping only that message instead
    /// would leave the broker holding its access or buffer for as long as
    /// the connection lasted. `take_errors` says why.
    fn break_off(&self, socket: &OwnedFd, generation: u64, err: &SendError) {
        let why = format!(
            "a message owed to the broker could not be sent ({err}): the connection is closed"
        );
        let _ = nix::sys::socket::shutdown(
            std::os::fd::AsRawFd::as_raw_fd(socket),
            nix::sys::socket::Shutdown::Both,
        );
        let mut mailbox = lock(&self.mailbox);
        // Under the mailbox lock, which `install` takes before it moves
        // the generation on: a newer connection is left alone.
        if generation == self.generation() {
            push_error(
                &mut mailbox,
                WireError::new(ErrorCode::ProtocolError, why.clone()),
            );
            mailbox.closed.get_or_insert(why);
            self.arrived.notify_all();
        }
    }

    /// Sends what is owed to the current connection if the socket has
    /// room, and leaves the rest to the flusher (or the next request).
    fn send_owed_now(&self) {
        let (socket, generation) = self.current_socket();
        if let Err(err) = self.send_owed(&socket, generation, Room::Now) {
            if !is_dead(&err) {
                self.flush_later();
            }
        }
    }

    /// Queues `owed` behind what is owed already.
    fn owe(&self, owed: Owed) {
        let mut queue = lock(&self.owed);
        queue.push_back(owed);
        self.owing.store(true, Ordering::Release);
    }

    /// Starts the flusher unless it runs: a thread that sends what is owed
    /// to the current connection as the socket makes room, and ends when
    /// nothing is owed to it, when it is gone or replaced (a new one drops
    /// what was owed to the old), or when the program has let go of the
    /// connection (see `Drop`). Without it, what a drop owed waited for
    /// the program's next request, which a camera waiting for its next
    /// frame may not make for a long time: a buffer stayed charged to it,
    /// or an ended write kept every reader out. Returns whether a flusher
    /// runs; not if no thread could be started.
    fn flush_later(&self) -> bool {
        #[cfg(test)]
        if self.no_threads.load(Ordering::Acquire) {
            return false;
        }
        if self.flushing.swap(true, Ordering::AcqRel) {
            return true;
        }
        let this = self.this.clone();
        let started = std::thread::Builder::new()
            .name("dmabroker-flush".into())
            .spawn(move || flush(&this));
        if started.is_err() {
            self.flushing.store(false, Ordering::Release);
        }
        started.is_ok()
    }

    /// Gives back (frees) buffer `info`, answered on connection
    /// `generation` in a form no `Buffer` could be made of; as
    /// [`Connection::give_back`], never waiting. Nothing to give back to a
    /// broker that has since been replaced.
    pub fn give_back_buffer(
        &self,
        generation: u64,
        info: &dmabroker_ipc::BufferInfo,
    ) -> Option<WireError> {
        let (socket, current) = self.current_socket();
        if current != generation {
            return None;
        }
        let answer = ServerMessage::Reply(Reply {
            id: 0,
            fds: 0,
            result: Ok(ReplyBody::Buffer(info.clone())),
        });
        self.give_back(&socket, generation, &answer)
    }

    /// Keeps `error` for [`Connection::take_errors`].
    pub fn note_error(&self, error: WireError) {
        push_error(&mut lock(&self.mailbox), error);
    }

    /// Gives back what `message`, which came on connection `generation`
    /// (`socket`) without its fds, gave (see [`give_back_request`]). Never waits:
    /// a reader must never block on a broker that does not read. What the
    /// socket has no room for now is kept for the next send; only if too
    /// much is kept already is it lost, and the error returned says so.
    fn give_back(
        &self,
        socket: &OwnedFd,
        generation: u64,
        message: &ServerMessage,
    ) -> Option<WireError> {
        let (body, what) = give_back_request(message)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) | UNWAITED;
        let bytes = encode(id, FLAG_NO_REPLY, body, 0).ok()?;
        // What is owed already goes first, and may make room under the
        // bound: the broker may be reading again.
        let _ = self.send_owed(socket, generation, Room::Now);
        {
            let owed = lock(&self.owed);
            if owed.iter().filter(|o| o.given_back).count() >= MAX_OWED {
                return Some(WireError::new(
                    ErrorCode::ProtocolError,
                    format!(
                        "{what} could not be given back: {MAX_OWED} give-backs already wait \
                         for room in the socket, so it stays charged to this client until \
                         it disconnects"
                    ),
                ));
            }
        }
        self.owe(Owed {
            generation,
            bytes,
            given_back: true,
        });
        if let Err(err) = self.send_owed(socket, generation, Room::Now) {
            // Without a flusher it waits for the next send or answer: the
            // reader must not wait for room.
            if !is_dead(&err) {
                self.flush_later();
            }
        }
        None
    }

    /// The next event, waiting at most `timeout` (forever with `None`).
    /// The next event, its fds, and the connection generation it came on.
    pub fn next_event(&self, timeout: Option<Duration>) -> Result<Option<EventRead>, Error> {
        self.wait_for_event(timeout, &NoHook, None, Connection::take_found)
    }

    /// As [`Connection::next_event`], for a caller that may stop waiting
    /// (a dropped future) and so takes what it waited for itself, with
    /// [`Connection::take_event`]: says whether an event, or the news of
    /// a reconnect, is there to take, and takes nothing. A thread that
    /// took the event off the mailbox for a future since dropped had to
    /// put it back in front, and a later event another reader took
    /// meanwhile reached the program first.
    ///
    /// The wait for a message looks at `hook` every `slice`, and answers
    /// `false` once nobody wants the event; a reconnect gives up as a
    /// call's does (see [`SentHook::wanted`]), and runs where the hook
    /// says (see [`Connection::reconnect_for`]). The caller's `timeout`
    /// stays the reconnect's limit: slicing that too would make every
    /// slice a new reconnect of its own, never reaching the window's end
    /// to report a broker gone for good.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub fn wait_event_while(
        &self,
        timeout: Option<Duration>,
        hook: &dyn SentHook,
        slice: Option<Duration>,
    ) -> Result<bool, Error> {
        let waiting = |conn: &Connection, mailbox: &mut Mailbox| {
            let news = conn.events_seen.load(Ordering::Acquire) != conn.generation();
            (news || !mailbox.events.is_empty()).then_some(Ok(()))
        };
        Ok(self
            .wait_for_event(timeout, hook, slice, waiting)?
            .is_some())
    }

    /// The news of a reconnect, or else the next event, if either is
    /// there, taken under the mailbox lock; reads and waits for nothing.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub fn take_event(&self) -> Option<Result<EventRead, Error>> {
        self.take_found(&mut lock(&self.mailbox))
    }

    fn take_found(&self, mailbox: &mut Mailbox) -> Option<Result<EventRead, Error>> {
        // Whoever waits for events of an old connection (fences to
        // signal) must hear that they will never come: once for each
        // reconnect, whichever call made it, and whenever it was.
        // `install` bumps the generation under the mailbox lock.
        let generation = self.generation();
        if self.events_seen.swap(generation, Ordering::AcqRel) != generation {
            return Some(Err(Error::Reconnected));
        }
        let (event, fds) = mailbox.events.pop_front()?;
        mailbox.events_dropped = false;
        Some(Ok((event, fds, generation)))
    }

    /// Waits until `found`, asked under the mailbox lock, has something,
    /// reading and reconnecting meanwhile; `Ok(None)` once `timeout` has
    /// passed or nobody wants the event any more (`hook`).
    fn wait_for_event<T>(
        &self,
        timeout: Option<Duration>,
        hook: &dyn SentHook,
        slice: Option<Duration>,
        found: impl Fn(&Connection, &mut Mailbox) -> Option<Result<T, Error>>,
    ) -> Result<Option<T>, Error> {
        let deadline = timeout.and_then(deadline_after);
        let mut mailbox = lock(&self.mailbox);
        // A deadline past (a zero timeout: a program polling between
        // frames) still reads once: an event waiting in the socket has
        // arrived in time, and only reading it can tell.
        let mut looked = false;
        loop {
            if let Some(found) = found(self, &mut mailbox) {
                return found.map(Some);
            }
            if mailbox.closed.is_some() {
                let broken = self.generation();
                // Reconnect, as a call would, within the caller's time: an
                // event loop would otherwise get `Disconnected` forever.
                drop(mailbox);
                match self.recover_by(broken, deadline, hook) {
                    // The news of it is now there for `found` (unless
                    // another reader has told it already).
                    Ok(true) => mailbox = lock(&self.mailbox),
                    Ok(false) => return Err(Error::Disconnected),
                    // The time ran out before the broker was back: nothing
                    // came in time, and the next call tries again.
                    Err(err) if err.code() == Some(ErrorCode::Timeout) => return Ok(None),
                    Err(err) => return Err(err),
                }
                continue;
            }
            if looked && deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(None);
            }
            looked = true;
            let wait_until = match (slice.and_then(deadline_after), deadline) {
                (Some(sliced), Some(deadline)) => Some(sliced.min(deadline)),
                (sliced, deadline) => sliced.or(deadline),
            };
            mailbox = self.read_or_wait(mailbox, wait_until, None).0;
            if !hook.wanted() {
                return Ok(None);
            }
        }
    }

    /// Errors the broker sent for requests nobody waited on (pipelined ends
    /// and frees), oldest first.
    pub fn take_errors(&self) -> Vec<WireError> {
        lock(&self.mailbox).errors.drain(..).collect()
    }
}

#[cfg(test)]
impl Connection {
    /// A connection welcomed on `socket` with `welcome`, whose other end
    /// is a unit test's broker (the lib's tests build buffers on it).
    pub(crate) fn for_tests(socket: OwnedFd, welcome: Welcome) -> Arc<Connection> {
        let hello = Hello {
            version: welcome.version,
            features: 0,
            autofence: None,
            client_name: "test".into(),
        };
        Connection::welcomed(
            Path::new("/nonexistent"),
            hello,
            None,
            socket,
            welcome,
            None,
        )
    }

    /// Holds the calling thread at a test's seam, if one is set (see
    /// `event_seam`); only the first thread to come is held.
    #[cfg(feature = "tokio")]
    pub(crate) fn at_event_seam(&self) {
        let seam = lock(&self.event_seam).take();
        if let Some((reached, release)) = seam {
            let _ = reached.send(());
            let _ = release.recv();
        }
    }
}

/// An event as `Connection::next_event` reads it: with its fds and the
/// connection generation it came on.
pub type EventRead = (Event, Vec<OwnedFd>, u64);

/// One datagram from the broker.
enum Received {
    Message(ServerMessage, Vec<OwnedFd>),
    /// Whole, but the fds that came with it did not (`MSG_CTRUNC`: this
    /// process's fd table was full, and the kernel closed them). Unlike an
    /// unreadable message, its request was carried out: see [`Connection::give_back`].
    FdsLost(ServerMessage),
    /// Read but not understood. A datagram stream stays in step after one
    /// (the next datagram is whole), so only the request it answers, if
    /// its first bytes name one, fails: not the connection, whose holds a
    /// reconnect to the same broker could not take back.
    Unreadable {
        reply_to: Option<u64>,
        why: String,
    },
    /// Nothing before the deadline.
    Nothing,
}

impl Drop for Connection {
    /// See [`Connection::let_go`]; for a connection let go of some other
    /// way than through its [`ProgramHandle`]s.
    fn drop(&mut self) {
        self.let_go();
    }
}

/// The program's share of a connection. Counted, so that the last one the
/// program lets go of gives what is owed its moment (see
/// [`Connection::let_go`]) on the program's own thread: the flusher holds
/// the connection for a moment now and then, and a program dropping its
/// last handle then left the wait to the flusher's thread, which dies with
/// the process if the program exits next, the end unsent.
#[derive(Debug)]
pub(crate) struct ProgramHandle(Arc<Connection>);

impl ProgramHandle {
    pub fn new(conn: Arc<Connection>) -> ProgramHandle {
        conn.handles.fetch_add(1, Ordering::AcqRel);
        ProgramHandle(conn)
    }
}

impl Clone for ProgramHandle {
    fn clone(&self) -> ProgramHandle {
        ProgramHandle::new(Arc::clone(&self.0))
    }
}

impl Drop for ProgramHandle {
    /// The last handle lets go (see [`Connection::let_go`]). Inside a
    /// tokio runtime the wait for room goes to its blocking pool: on the
    /// task's own thread it held a worker (a current-thread runtime's
    /// only one) for up to [`CLOSE_GRACE`], every other task stalled. The
    /// blocking pool keeps it as long as the runtime, which waits for it
    /// when dropped; a runtime shut down without waiting
    /// (`shutdown_background`, `shutdown_timeout`) or a process that exits
    /// first may lose what was owed, as the hang-up without it would
    /// (see docs/protocol.md).
    fn drop(&mut self) {
        if self.0.handles.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        #[cfg(feature = "tokio")]
        if self.0.owing.load(Ordering::Acquire) {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                let conn = Arc::clone(&self.0);
                // Detached; a runtime already shutting down drops the task
                // unrun, and with it `conn`, whose `Drop` then lets go here.
                drop(runtime.spawn_blocking(move || conn.let_go()));
                return;
            }
        }
        self.0.let_go();
    }
}

/// Whether this thread may wait for the broker: not one of a tokio
/// runtime's, whose other tasks (all of them, on a current-thread
/// runtime) would wait with it.
fn may_wait_here() -> bool {
    #[cfg(feature = "tokio")]
    if tokio::runtime::Handle::try_current().is_ok() {
        return false;
    }
    true
}

impl std::ops::Deref for ProgramHandle {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        &self.0
    }
}

impl Connection {
    /// The program let go of the connection: the broker reads its hang-up
    /// as the end of everything it held. An end still owed would be read
    /// as a writer that died mid-frame (the next reader told
    /// `writer_lost`), so what is owed gets a moment for room first. A
    /// drop that blocked did send it, waiting for as long as it took.
    fn let_go(&self) {
        if self.let_go.swap(true, Ordering::AcqRel) || !self.owing.load(Ordering::Acquire) {
            return;
        }
        let (socket, generation) = self.current_socket();
        let _ = self.send_owed(
            &socket,
            generation,
            Room::Until(Instant::now() + CLOSE_GRACE),
        );
    }
}

/// The flusher's loop (see [`Connection::flush_later`]). It holds the
/// connection only while it sends, and wakes every [`FLUSH_POLL_MS`] to
/// see whether the program still holds it.
fn flush(this: &Weak<Connection>) {
    loop {
        let Some(conn) = this.upgrade() else {
            return;
        };
        let (socket, generation) = conn.current_socket();
        match conn.send_owed(&socket, generation, Room::Now) {
            Err(err) if !is_dead(&err) => {
                drop(conn);
                let slice = Duration::from_millis(FLUSH_POLL_MS.into());
                Room::Until(Instant::now() + slice).wait_for(&socket, &err);
            }
            // Nothing left for this connection, or it is gone (what it
            // was owed went with it; the next call reconnects).
            _ => {
                // A swap, not a store: it reads the swap of a thread that
                // owed something after `send_owed` looked and, seeing
                // this flusher still running, left the sending to it; so
                // that thread's `owing` is seen below.
                conn.flushing.swap(false, Ordering::AcqRel);
                if !conn.owing.load(Ordering::Acquire) || conn.flushing.swap(true, Ordering::AcqRel)
                {
                    return;
                }
            }
        }
    }
}

/// How long [`Connection::send_owed`] waits for room in the socket.
#[derive(Clone, Copy)]
enum Room {
    /// Not at all.
    Now,
    /// As long as it takes (a request whose answer is awaited).
    Forever,
    /// Until then (a connection let go of, see `Drop`).
    Until(Instant),
}

impl Room {
    /// Waits for room in `socket` after a send failed with `err`, for as
    /// long as this allows; returns whether to try again. A failure that
    /// was not for room (the kernel short of memory for the message)
    /// waits a moment too, lest a socket that polls writable spin.
    fn wait_for(self, socket: &OwnedFd, err: &SendError) -> bool {
        let left = match self {
            Room::Now => return false,
            Room::Forever => None,
            Room::Until(deadline) => match deadline.checked_duration_since(Instant::now()) {
                Some(left) if !left.is_zero() => Some(left),
                _ => return false,
            },
        };
        if !matches!(err, SendError::Os(Errno::EAGAIN)) {
            std::thread::sleep(left.map_or(ROOM_RETRY, |left| left.min(ROOM_RETRY)));
            return true;
        }
        let timeout = left.map_or(PollTimeout::NONE, |left| {
            PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX)
        });
        let mut fds = [PollFd::new(socket.as_fd(), PollFlags::POLLOUT)];
        let _ = poll(&mut fds, timeout);
        true
    }
}

/// Reads one message, or `Nothing` when the deadline passes first.
/// `Err`: the connection is unusable.
fn receive(
    socket: &OwnedFd,
    buf: &mut [u8],
    deadline: Option<Instant>,
) -> Result<Received, String> {
    if let Some(deadline) = deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(socket.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) | Err(Errno::EINTR) => return Ok(Received::Nothing),
            Ok(_) => {}
            Err(err) => return Err(err.to_string()),
        }
    }
    let mut received = recv_message_into(socket.as_fd(), buf, false);
    if matches!(received, Err(RecvError::Os(Errno::ECONNRESET))) {
        // The broker closed with messages of ours unread: the reset is
        // reported once, ahead of what it sent before closing.
        received = recv_message_into(socket.as_fd(), buf, false);
    }
    match received {
        Ok((len, fds)) => match decode_server_message(&buf[..len]) {
            Ok(message) => Ok(Received::Message(message, fds)),
            Err(err) => Ok(Received::Unreadable {
                reply_to: decode_reply_id(&buf[..len]),
                why: format!("unreadable message from the broker: {err}"),
            }),
        },
        // The bytes are whole, only the fds are gone (and the kernel
        // closed them): what the broker did for the request must be
        // undone, so the message is read as it is.
        Err(err @ (RecvError::ControlTruncated { len } | RecvError::TooManyFds { len, .. })) => {
            match decode_server_message(&buf[..len]) {
                Ok(message) => Ok(Received::FdsLost(message)),
                Err(_) => Ok(Received::Unreadable {
                    reply_to: decode_reply_id(&buf[..len]),
                    why: format!("unreadable message from the broker: {err}"),
                }),
            }
        }
        // Cut short: the rest of the stream is still whole.
        Err(err @ RecvError::Truncated) => Ok(Received::Unreadable {
            reply_to: decode_reply_id(buf),
            why: format!("unreadable message from the broker: {err}"),
        }),
        Err(RecvError::Closed) => Err("the broker closed the connection".into()),
        Err(err) => Err(err.to_string()),
    }
}

/// What a message whose fds were lost says, for `take_errors`.
const FDS_LOST: &str = "a message from the broker lost its fds: this process's fd table was full";

/// The request giving back what the broker gave in an answer whose fds
/// this process had no room for, and words naming it for an error: the
/// broker has counted a buffer (an alloc's, an import's) or an access (a
/// grant's, whose fences' sync_files were lost) as this client's, and no
/// `Buffer` or guard will exist to give it back. Sent one way (see
/// [`Connection::give_back`]). A grant whose fences came as fds is never
/// held in the buffer's word, so `End` ends it.
fn give_back_request(message: &ServerMessage) -> Option<(RequestBody, String)> {
    match message {
        ServerMessage::Reply(Reply {
            result: Ok(ReplyBody::Buffer(info)),
            ..
        }) => Some((
            RequestBody::Free { buffer: info.id },
            format!(
                "buffer {}, allocated for an answer whose fd was lost,",
                info.id
            ),
        )),
        ServerMessage::Reply(Reply {
            result: Ok(ReplyBody::Granted(grant)),
            ..
        }) => Some((
            RequestBody::End {
                access: grant.access,
                fence_slot: None,
            },
            format!(
                "access {}, granted in an answer whose fds were lost,",
                grant.access
            ),
        )),
        _ => None,
    }
}

/// Fails request `reply_to` with `err` for whoever waits for it: returned
/// if that is the reader (`want`), filed if another thread waits. `unwaited`
/// goes to `take_errors` when the message answers no request.
fn fail_reply(
    mailbox: &mut Mailbox,
    reply_to: Option<u64>,
    want: Option<u64>,
    err: Error,
    unwaited: WireError,
) -> Option<Incoming> {
    let failed = Incoming {
        result: Err(err),
        fds: Vec::new(),
    };
    match reply_to {
        Some(id) if want == Some(id) && id & UNWAITED == 0 => return Some(failed),
        Some(id) if mailbox.awaited.contains(&id) => {
            mailbox.replies.insert(id, failed);
        }
        // A request nobody waits for any more.
        Some(id) if id != 0 && id & UNWAITED == 0 => {}
        _ => push_error(mailbox, unwaited),
    }
    None
}

/// An error that answers no waiting caller, kept for `take_errors`.
fn push_error(mailbox: &mut Mailbox, err: WireError) {
    if mailbox.errors.len() == MAX_ASYNC_ERRORS {
        mailbox.errors.pop_front();
    }
    mailbox.errors.push_back(err);
}

fn file_message(mailbox: &mut Mailbox, message: ServerMessage, fds: Vec<OwnedFd>) {
    match message {
        // Id 0 answers a message the broker could not read at all.
        ServerMessage::Reply(reply) if reply.id & UNWAITED != 0 || reply.id == 0 => {
            if let Err(err) = reply.result {
                if reply.id == 0 {
                    mailbox.refusal = Some(err.clone());
                }
                push_error(mailbox, err);
            }
        }
        // Nobody will collect it: dropped, and its fds closed.
        ServerMessage::Reply(reply) if !mailbox.awaited.contains(&reply.id) => {}
        ServerMessage::Reply(reply) => {
            mailbox.replies.insert(
                reply.id,
                Incoming {
                    result: reply.result.map_err(Error::Broker),
                    fds,
                },
            );
        }
        ServerMessage::Event(event) => {
            if let Event::AccessRevoked { access, .. } = event.event {
                if access != 0 {
                    if mailbox.revoked.len() == MAX_REVOKED {
                        mailbox.revoked.pop_front();
                    }
                    mailbox.revoked.push_back(access);
                }
            }
            if mailbox.events.len() >= MAX_QUEUED_EVENTS {
                mailbox.events.pop_front();
                if !std::mem::replace(&mut mailbox.events_dropped, true) {
                    push_error(
                        mailbox,
                        WireError::new(
                            ErrorCode::ProtocolError,
                            format!(
                                "more than {MAX_QUEUED_EVENTS} events went unread: \
                                 the oldest are dropped"
                            ),
                        ),
                    );
                }
            }
            mailbox.events.push_back((event.event, fds));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dmabroker_ipc::PROTOCOL_VERSION;
    use nix::sys::socket::socketpair;

    /// A no-autofence program that waits on its sync_files and never asks
    /// for events kept every `FenceSignalled` it read, for as long as it
    /// ran.
    #[test]
    fn events_nobody_reads_are_kept_up_to_a_bound_and_the_loss_said_once() {
        let mut mailbox = Mailbox::default();
        let signalled = |fence| {
            ServerMessage::Event(dmabroker_ipc::EventMessage {
                fds: 0,
                event: Event::FenceSignalled { fence },
            })
        };
        let sent = MAX_QUEUED_EVENTS as u64 + 100;
        for fence in 0..sent {
            file_message(&mut mailbox, signalled(fence), Vec::new());
        }
        assert_eq!(mailbox.events.len(), MAX_QUEUED_EVENTS);
        assert_eq!(
            mailbox.events.front().map(|(event, _)| event.clone()),
            Some(Event::FenceSignalled { fence: 100 }),
            "the oldest go"
        );
        assert_eq!(mailbox.errors.len(), 1, "{:?}", mailbox.errors);
    }

    fn welcome() -> Welcome {
        Welcome {
            version: PROTOCOL_VERSION,
            features: 0,
            client_id: 1,
            autofence: true,
            default_heap: "memfd".into(),
            instance: "test".into(),
        }
    }

    fn socket() -> OwnedFd {
        pair().0
    }

    fn inode(fd: &OwnedFd) -> u64 {
        nix::sys::stat::fstat(std::os::fd::AsRawFd::as_raw_fd(fd))
            .expect("fstat")
            .st_ino
    }

    /// The socket and the generation are one fact: a reader or a sender
    /// that got the new socket with the old generation read a reply it
    /// then dropped (its waiter slept forever), or sent a request whose
    /// answer nobody collected. The swap and the bump were two steps.
    #[test]
    fn the_current_socket_always_comes_with_its_own_generation() {
        let hello = Hello {
            version: PROTOCOL_VERSION,
            features: 0,
            autofence: None,
            client_name: "test".into(),
        };
        let first = socket();
        let inodes = Arc::new(Mutex::new(vec![inode(&first)]));
        let conn = Connection::welcomed(
            Path::new("/nonexistent"),
            hello,
            None,
            first,
            welcome(),
            None,
        );
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let installer = {
            let (conn, inodes, done) = (Arc::clone(&conn), Arc::clone(&inodes), Arc::clone(&done));
            std::thread::spawn(move || {
                for _ in 0..20_000 {
                    let next = socket();
                    // Recorded before it is installed: generation n is inodes[n].
                    lock(&inodes).push(inode(&next));
                    conn.install(next, welcome(), None);
                }
                done.store(true, Ordering::SeqCst);
            })
        };
        let mut mismatches = 0;
        while !done.load(Ordering::SeqCst) {
            let (socket, generation) = conn.current_socket();
            let expected = lock(&inodes)[generation as usize];
            if inode(&socket) != expected {
                mismatches += 1;
            }
        }
        installer.join().expect("installer");
        assert_eq!(mismatches, 0, "a socket came with another generation");
    }

    /// Thread B's alloc was answered on the old connection; before it
    /// recorded the hold, thread C reconnected (B's buffer unknown to the
    /// re-attach) and allocated a buffer that got the same id. B's late
    /// record must not displace C's hold: B's buffer is lost, C's lives.
    #[test]
    fn a_hold_granted_on_a_replaced_connection_does_not_displace_a_newer_one() {
        let hello = Hello {
            version: PROTOCOL_VERSION,
            features: 0,
            autofence: None,
            client_name: "test".into(),
        };
        let conn = Connection::welcomed(
            Path::new("/nonexistent"),
            hello,
            None,
            socket(),
            welcome(),
            None,
        );
        conn.install(socket(), welcome(), None);
        let newer = conn.remember_hold(1, "dmab1-c", 3, 1);
        let stale = conn.remember_hold(1, "dmab1-b", 2, 0);
        assert_eq!(stale, LOST);
        let holds = lock(&conn.holds);
        assert!(is_hold(&holds, 1, newer), "the newer hold was displaced");
        assert!(!is_hold(&holds, 1, stale));
    }

    fn pair() -> (OwnedFd, OwnedFd) {
        socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .expect("socketpair")
    }

    fn hello() -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            features: 0,
            autofence: None,
            client_name: "test".into(),
        }
    }

    /// Sends without waiting until the socket has no room.
    fn fill(socket: &OwnedFd) {
        while send_message(socket.as_fd(), &[0; 512], &[], true).is_ok() {}
    }

    /// Every request waiting in the broker's end, in order.
    fn drain(broker: &OwnedFd) -> Vec<RequestBody> {
        let mut bodies = Vec::new();
        while let Ok(received) = recv_message(broker.as_fd(), true) {
            if let Ok(request) = dmabroker_ipc::codec::decode_request(&received.bytes) {
                bodies.push(request.body);
            }
        }
        bodies
    }

    /// The next `count` requests the broker's end receives, waiting up to
    /// 10 s for them (what the filling left is skipped). Reading makes
    /// room, which a flusher waits for.
    fn requests_arriving(broker: &OwnedFd, count: usize) -> Vec<RequestBody> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut bodies = Vec::new();
        while bodies.len() < count {
            match recv_message(broker.as_fd(), true) {
                Ok(received) => {
                    if let Ok(request) = dmabroker_ipc::codec::decode_request(&received.bytes) {
                        bodies.push(request.body);
                    }
                }
                Err(err) => {
                    assert!(
                        Instant::now() < deadline,
                        "{} of {count} requests arrived ({err}): {bodies:?}",
                        bodies.len()
                    );
                    let mut fds = [PollFd::new(broker.as_fd(), PollFlags::POLLIN)];
                    let _ = poll(&mut fds, PollTimeout::from(10u16));
                }
            }
        }
        bodies
    }

    fn buffer_answer(buffer: u64) -> ServerMessage {
        ServerMessage::Reply(Reply {
            id: 5,
            fds: 1,
            result: Ok(ReplyBody::Buffer(dmabroker_ipc::BufferInfo {
                id: buffer,
                size: 4096,
                heap: "memfd".into(),
                name: String::new(),
                inode: 1,
                secret: String::new(),
            })),
        })
    }

    /// The calling thread's id, as `/proc` names its folder.
    fn thread_id() -> String {
        let link = std::fs::read_link("/proc/thread-self").expect("/proc/thread-self");
        let tid = link.file_name().expect("a thread id");
        tid.to_string_lossy().into_owned()
    }

    /// Waits (up to 10 s) until thread `tid` of this process sleeps in
    /// `sendmsg`, as the kernel tells (`/proc/self/task/TID/syscall` starts
    /// with the number of the system call a blocked thread is in): a real
    /// sign, not a pause long enough on a fast machine.
    fn await_blocked_in_sendmsg(tid: &str) {
        let path = format!("/proc/self/task/{tid}/syscall");
        let sendmsg = nix::libc::SYS_sendmsg.to_string();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let state = std::fs::read_to_string(&path).expect("the thread's system call");
            if state.split_whitespace().next() == Some(sendmsg.as_str()) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "thread {tid} never blocked in sendmsg: {state}"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// A welcomed connection whose socket has no room left, and the
    /// broker's end of it.
    fn full_connection() -> (Arc<Connection>, OwnedFd) {
        let (ours, broker) = pair();
        fill(&ours);
        let conn = Connection::welcomed(
            Path::new("/nonexistent"),
            hello(),
            None,
            ours,
            welcome(),
            None,
        );
        (conn, broker)
    }

    /// Owes as many give-backs as may be (buffers 0 to 63) on a connection
    /// whose socket has no room; returns its socket and generation.
    fn owe_up_to_the_bound(conn: &Connection) -> (Arc<OwnedFd>, u64) {
        let (socket, generation) = conn.current_socket();
        for buffer in 0..MAX_OWED as u64 {
            assert!(conn
                .give_back(&socket, generation, &buffer_answer(buffer))
                .is_none());
        }
        (socket, generation)
    }

    /// A give-back that finds as many owed as may be, in a socket that
    /// has room again, sends them and goes out too: it used to be
    /// refused as one too many, and its buffer stayed charged to the
    /// client until it disconnected. Found by review.
    #[test]
    fn a_give_back_at_the_bound_sends_what_is_owed_first() {
        let (conn, broker) = full_connection();
        // As if a flusher ran that has not yet found the room: the
        // give-back itself must make it.
        conn.flushing.store(true, Ordering::Release);
        let (socket, generation) = owe_up_to_the_bound(&conn);
        // The broker reads everything: the socket has room again.
        let _ = drain(&broker);
        let lost = conn.give_back(&socket, generation, &buffer_answer(99));
        assert!(lost.is_none(), "lost with room in the socket: {lost:?}");
        assert_eq!(drain(&broker).len(), MAX_OWED + 1);
    }

    /// A give-back the full socket had no room for goes out once the
    /// broker makes room, ahead of any later request, without waiting for
    /// the program's next request (which a quiet program may never make);
    /// dropped, the buffer stayed charged to the client.
    #[test]
    fn a_give_back_without_room_goes_out_once_there_is_room() {
        let (conn, broker) = full_connection();
        let (socket, generation) = conn.current_socket();
        assert!(conn
            .give_back(&socket, generation, &buffer_answer(3))
            .is_none());
        assert!(matches!(
            requests_arriving(&broker, 1)[..],
            [RequestBody::Free { buffer: 3 }]
        ));
        conn.send(RequestBody::ListHeaps, &[], false).expect("send");
        assert!(matches!(
            requests_arriving(&broker, 1)[..],
            [RequestBody::ListHeaps]
        ));
    }

    /// Dropping a buffer (its `Free`) while the broker does not read this
    /// client's socket must not hang the program's thread: it blocked in
    /// `sendmsg` under the holds lock, which every other request on a
    /// buffer takes, until the broker read again. The free is not lost
    /// either: it goes out when the broker makes room, though the
    /// program sends nothing more. Found by review.
    #[test]
    fn a_buffer_dropped_on_a_full_socket_neither_waits_nor_is_lost() {
        let (conn, broker) = full_connection();
        let serial = conn.remember_hold(7, "secret", 1, 0);
        let (done, returned) = std::sync::mpsc::channel();
        let dropper = Arc::clone(&conn);
        std::thread::spawn(move || {
            dropper.release_hold(7, serial);
            let _ = done.send(());
        });
        assert!(
            returned.recv_timeout(Duration::from_secs(10)).is_ok(),
            "the drop waited for a broker that does not read"
        );
        assert!(matches!(
            requests_arriving(&broker, 1)[..],
            [RequestBody::Free { buffer: 7 }]
        ));
    }

    /// Ends and frees a drop could not send go out in the order they were
    /// made, ahead of the next request; then the flusher ends.
    #[test]
    fn what_drops_owe_goes_out_in_order_and_the_flusher_ends() {
        let (conn, broker) = full_connection();
        let end = RequestBody::End {
            access: 9,
            fence_slot: None,
        };
        let sent = conn.send_on(0, end, &[], false).expect("owed, not refused");
        assert_eq!(sent.map(|(_, generation)| generation), Some(0));
        let serial = conn.remember_hold(4, "secret", 1, 0);
        conn.release_hold(4, serial);
        assert_eq!(lock(&conn.owed).len(), 2, "nothing fits a full socket");
        assert!(matches!(
            requests_arriving(&broker, 2)[..],
            [
                RequestBody::End {
                    access: 9,
                    fence_slot: None
                },
                RequestBody::Free { buffer: 4 }
            ]
        ));
        let deadline = Instant::now() + Duration::from_secs(10);
        while conn.flushing.load(Ordering::Acquire) {
            assert!(Instant::now() < deadline, "the flusher never ended");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// What is owed goes out in the order it was made, though another
    /// thread's request drains it while the flusher sends: each sender
    /// took the oldest out of the queue and sent it without the lock, so
    /// a `Free` overtook the `End` of the access before it (the broker
    /// then took the write for one that died, and told the next reader
    /// `writer_lost`) in half of the rounds. Found by review.
    #[test]
    fn what_is_owed_keeps_its_order_while_two_threads_send_it() {
        for _ in 0..10 {
            let (conn, broker) = full_connection();
            let mut made = Vec::new();
            for access in 1..=8 {
                let end = RequestBody::End {
                    access,
                    fence_slot: None,
                };
                conn.send_on(0, end.clone(), &[], false).expect("owed");
                let serial = conn.remember_hold(100 + access, "secret", 1, 0);
                conn.release_hold(100 + access, serial);
                made.extend([
                    end,
                    RequestBody::Free {
                        buffer: 100 + access,
                    },
                ]);
            }
            made.push(RequestBody::ListHeaps);
            let asker = Arc::clone(&conn);
            let asking = std::thread::spawn(move || {
                asker.send(RequestBody::ListHeaps, &[], true).expect("sent");
            });
            let arrived = requests_arriving(&broker, made.len());
            asking.join().expect("asking thread");
            assert_eq!(arrived, made);
        }
    }

    /// A thread that sends what is owed while the flusher runs (the reader,
    /// at every message it receives) must not leave it with nobody to send
    /// it: the flusher, finding the queue empty while the other had the
    /// item out, ended, and the other put it back; the free then waited
    /// for the program's next request. Found by review.
    #[test]
    fn what_is_owed_is_not_stranded_by_another_sender() {
        let (conn, broker) = full_connection();
        let serial = conn.remember_hold(4, "secret", 1, 0);
        conn.release_hold(4, serial);
        let (socket, generation) = conn.current_socket();
        let until = Instant::now() + Duration::from_millis(450);
        while Instant::now() < until {
            let _ = conn.send_owed(&socket, generation, Room::Now);
        }
        assert!(matches!(
            requests_arriving(&broker, 1)[..],
            [RequestBody::Free { buffer: 4 }]
        ));
    }

    /// A drop must not wait behind another thread's request that waits for
    /// room: that request held the holds lock, which the drop takes, for
    /// as long as the broker did not read. Found by review.
    #[test]
    fn a_drop_does_not_wait_behind_another_threads_request() {
        let (conn, broker) = full_connection();
        let asked = conn.remember_hold(3, "secret", 1, 0);
        let dropped = conn.remember_hold(4, "secret", 1, 0);
        let asker = Arc::clone(&conn);
        let (tid, asker_tid) = std::sync::mpsc::channel();
        let asking = std::thread::spawn(move || {
            let _ = tid.send(thread_id());
            let _ = asker.send_for((3, asked), RequestBody::Info { buffer: 3 }, &[], true);
        });
        // Only once the asker sleeps in its `sendmsg` for room: dropped
        // before (after a fixed pause, which a loaded machine may outlast),
        // the drop passed whether or not it would have waited behind it.
        let asker_tid = asker_tid
            .recv_timeout(Duration::from_secs(10))
            .expect("the asker's thread id");
        await_blocked_in_sendmsg(&asker_tid);
        let (done, returned) = std::sync::mpsc::channel();
        let dropper = Arc::clone(&conn);
        std::thread::spawn(move || {
            dropper.release_hold(4, dropped);
            let _ = done.send(());
        });
        assert!(
            returned.recv_timeout(Duration::from_secs(10)).is_ok(),
            "the drop waited behind a request waiting for room"
        );
        let arrived = requests_arriving(&broker, 2);
        asking.join().expect("asking thread");
        assert_eq!(arrived.len(), 2, "{arrived:?}");
    }

    /// A buffer answer to request `id`, of buffer `buffer` (inode 1), with
    /// no fd: a re-attach's.
    fn reattached(id: u64, buffer: u64) -> Vec<u8> {
        let reply = ServerMessage::Reply(Reply {
            id,
            fds: 0,
            result: Ok(ReplyBody::Buffer(dmabroker_ipc::BufferInfo {
                id: buffer,
                size: 4096,
                heap: "memfd".into(),
                name: String::new(),
                inode: 1,
                secret: String::new(),
            })),
        });
        dmabroker_ipc::codec::encode_server_message(&reply).expect("encode")
    }

    /// A hold whose answer came on a connection another thread has
    /// replaced since (the reconnect did not know it) was recorded as
    /// lost, although the client had its secret and the broker kept the
    /// buffer: every call on it then failed, and its drop freed nothing.
    /// It is re-attached on the new connection now.
    #[test]
    fn a_hold_granted_on_a_replaced_connection_is_reattached_on_the_new_one() {
        let (first, _first_broker) = pair();
        let conn = Connection::welcomed(
            Path::new("/nonexistent"),
            hello(),
            None,
            first,
            welcome(),
            None,
        );
        let (second, broker) = pair();
        conn.install(second, welcome(), None);
        let serving = std::thread::spawn(move || {
            let received = recv_message(broker.as_fd(), false).expect("a request");
            let request = dmabroker_ipc::codec::decode_request(&received.bytes).expect("decode");
            send_message(broker.as_fd(), &reattached(request.head.id, 7), &[], false)
                .expect("reply");
            (request.body, broker)
        });
        let serial = conn.keep_hold(7, "dmab1-seven", 1, 0).expect("re-attached");
        assert!(
            is_hold(&lock(&conn.holds), 7, serial),
            "the hold was recorded as lost"
        );
        let (asked, _broker) = serving.join().expect("the test's broker");
        assert_eq!(
            asked,
            RequestBody::Reattach {
                buffer: 7,
                secret: "dmab1-seven".into()
            }
        );
    }

    /// Every request the test's broker end reads until the client side
    /// closes (at most 10 s).
    fn requests_until_closed(broker: &OwnedFd) -> Vec<RequestBody> {
        let mut arrived = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match recv_message(broker.as_fd(), true) {
                Ok(received) => {
                    if let Ok(request) = dmabroker_ipc::codec::decode_request(&received.bytes) {
                        arrived.push(request.body);
                    }
                }
                Err(RecvError::Closed) => return arrived,
                Err(_) => {
                    assert!(Instant::now() < deadline, "never closed: {arrived:?}");
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }

    /// A SEQPACKET socket listening at a fresh path named after `name`
    /// (and this process), as a test's broker.
    fn listening(name: &str) -> (PathBuf, OwnedFd) {
        let path = std::env::temp_dir().join(format!(
            "dmabroker-client-test-{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&path);
        let listener = nix::sys::socket::socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .expect("socket");
        let addr = UnixAddr::new(&path).expect("addr");
        nix::sys::socket::bind(std::os::fd::AsRawFd::as_raw_fd(&listener), &addr).expect("bind");
        nix::sys::socket::listen(
            &listener,
            nix::sys::socket::Backlog::new(4).expect("backlog"),
        )
        .expect("listen");
        (path, listener)
    }

    /// A hold recorded on the old connection while a reconnect re-attached
    /// the others (its answer came before the hang-up) was dropped when
    /// the reconnect finished, although the broker kept the buffer: the
    /// reconnect re-attaches it too now, before it installs the new
    /// socket.
    #[test]
    fn a_hold_recorded_while_a_reconnect_reattaches_is_reattached_too() {
        let (path, listener) = listening("late-hold");
        let (arrived_tx, arrived) = std::sync::mpsc::channel();
        let (go_tx, go) = std::sync::mpsc::channel::<()>();
        let serving = std::thread::spawn(move || {
            let socket = rustix::net::accept(&listener).expect("accept");
            let mut asked = Vec::new();
            while let Ok(received) = recv_message(socket.as_fd(), false) {
                let request =
                    dmabroker_ipc::codec::decode_request(&received.bytes).expect("decode");
                let bytes = match request.body {
                    RequestBody::Hello(_) => {
                        let reply = ServerMessage::Reply(Reply {
                            id: request.head.id,
                            fds: 0,
                            result: Ok(ReplyBody::Welcome(welcome())),
                        });
                        dmabroker_ipc::codec::encode_server_message(&reply).expect("encode")
                    }
                    RequestBody::Reattach { buffer, .. } => {
                        asked.push(buffer);
                        if buffer == 1 {
                            let _ = arrived_tx.send(());
                            let _ = go.recv_timeout(Duration::from_secs(10));
                        }
                        reattached(request.head.id, buffer)
                    }
                    _ => continue,
                };
                send_message(socket.as_fd(), &bytes, &[], false).expect("reply");
            }
            asked
        });
        let (first, first_broker) = pair();
        drop(first_broker);
        let conn = Connection::welcomed(
            &path,
            hello(),
            Some(Duration::from_secs(30)),
            first,
            welcome(),
            None,
        );
        let early = conn.remember_hold(1, "dmab1-one", 1, 0);
        let reconnecting = {
            let conn = Arc::clone(&conn);
            std::thread::spawn(move || conn.reconnect(0, None, &NoHook))
        };
        arrived
            .recv_timeout(Duration::from_secs(10))
            .expect("the first re-attach");
        // Answered on the old connection, recorded now: still current.
        let late = conn.remember_hold(2, "dmab1-two", 1, 0);
        assert_ne!(late, LOST);
        go_tx.send(()).expect("the broker waits");
        reconnecting
            .join()
            .expect("reconnecting thread")
            .expect("reconnected");
        {
            let holds = lock(&conn.holds);
            assert!(is_hold(&holds, 1, early));
            assert!(is_hold(&holds, 2, late), "the late hold was dropped");
        }
        drop(conn);
        let asked = serving.join().expect("the test's broker");
        let _ = std::fs::remove_file(&path);
        assert_eq!(asked, vec![1, 2]);
    }

    /// A broker listening at a fresh path that welcomes each connection
    /// and answers its heaps requests, until its client hangs up; the
    /// path, and the thread (which serves `connections` in turn).
    fn heaps_broker(connections: usize) -> (PathBuf, std::thread::JoinHandle<()>) {
        let (path, listener) = listening("heaps");
        let serving = std::thread::spawn(move || {
            for _ in 0..connections {
                // rustix's accept owns the new fd (nix's is a raw fd, and
                // this crate has no unsafe code, tests included).
                let socket = rustix::net::accept(&listener).expect("accept");
                while let Ok(received) = recv_message(socket.as_fd(), false) {
                    let request =
                        dmabroker_ipc::codec::decode_request(&received.bytes).expect("decode");
                    let body = match request.body {
                        RequestBody::Hello(_) => ReplyBody::Welcome(welcome()),
                        RequestBody::ListHeaps => ReplyBody::Heaps(Vec::new()),
                        _ => continue,
                    };
                    let reply = ServerMessage::Reply(Reply {
                        id: request.head.id,
                        fds: 0,
                        result: Ok(body),
                    });
                    let bytes =
                        dmabroker_ipc::codec::encode_server_message(&reply).expect("encode");
                    send_message(socket.as_fd(), &bytes, &[], false).expect("reply");
                }
            }
        });
        (path, serving)
    }

    /// A call whose send found the connection dead reconnected from the
    /// one current before the send, not the one it was sent on: when
    /// another thread had just replaced the first with one dead already,
    /// the reconnect found the work done, the one retry went to the same
    /// dead connection, and the call failed `Disconnected` without ever
    /// trying a new one. It retries on a new connection now.
    #[test]
    fn a_send_that_finds_a_newer_connection_dead_retries_on_a_new_one() {
        let (path, broker) = heaps_broker(1);
        let (first, first_broker) = pair();
        drop(first_broker);
        let conn = Connection::welcomed(
            &path,
            hello(),
            Some(Duration::from_secs(30)),
            first,
            welcome(),
            None,
        );
        let replaced = AtomicBool::new(false);
        let answer = conn.call_with(
            || {
                if !replaced.swap(true, Ordering::SeqCst) {
                    // Another thread's reconnect, between the call's look
                    // at the generation and its send: to a broker that
                    // died at once.
                    let (dead, dead_broker) = pair();
                    drop(dead_broker);
                    conn.install(dead, welcome(), None);
                }
                conn.try_send(RequestBody::ListHeaps, &[], true)
            },
            None,
            &NoHook,
        );
        assert!(
            matches!(answer, Ok((ReplyBody::Heaps(_), _, _))),
            "{answer:?}"
        );
        drop(conn);
        broker.join().expect("broker");
        let _ = std::fs::remove_file(&path);
    }

    /// A message owed at the head of the queue that the socket refuses for
    /// good (here `ENOTSOCK`: the connection's fd is no socket) was tried
    /// again every 10 ms by each request waiting behind it, which never
    /// went out: the call hung. The connection is given up instead (the
    /// broker hears the hang-up, which ends what the message would have),
    /// the call fails at once, and `take_errors` says why.
    #[test]
    fn a_message_the_socket_refuses_for_good_fails_the_connection() {
        let no_socket = OwnedFd::from(std::fs::File::open("/dev/null").expect("/dev/null"));
        let conn = Connection::welcomed(
            Path::new("/nonexistent"),
            hello(),
            None,
            no_socket,
            welcome(),
            None,
        );
        let end = RequestBody::End {
            access: 9,
            fence_slot: None,
        };
        let _ = conn.send_on(0, end, &[], false);
        let (done, returned) = std::sync::mpsc::channel();
        let asker = Arc::clone(&conn);
        std::thread::spawn(move || {
            let _ = done.send(asker.call(RequestBody::ListHeaps, &[]).map(|_| ()));
        });
        let answer = returned
            .recv_timeout(Duration::from_secs(10))
            .expect("the call waited behind a message the socket refuses");
        assert!(answer.is_err(), "{answer:?}");
        assert!(lock(&conn.owed).is_empty(), "the refused message stayed");
        let errors = conn.take_errors();
        assert!(
            errors
                .iter()
                .any(|e| e.message.contains("could not be sent")),
            "{errors:?}"
        );
    }

    /// An end still owed when the program lets go of the connection goes
    /// out before the hang-up, if the broker makes room within a moment:
    /// lost, the broker took the write for one that died mid-frame and
    /// told the next reader `writer_lost`. Found by review.
    #[test]
    fn an_owed_end_goes_out_before_the_connection_closes() {
        let (conn, broker) = full_connection();
        let end = RequestBody::End {
            access: 9,
            fence_slot: None,
        };
        conn.send_on(0, end, &[], false).expect("owed");
        // The broker reads again only after the program let go.
        let reading = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            requests_until_closed(&broker)
        });
        drop(conn);
        let arrived = reading.join().expect("reading thread");
        assert!(
            matches!(arrived[..], [RequestBody::End { access: 9, .. }]),
            "{arrived:?}"
        );
    }

    /// The program's last handle waits for what is owed on the program's
    /// own thread, though another holds the connection then (the flusher
    /// does, for a moment now and then): the wait ran where the last
    /// strong reference went, the flusher's thread, which dies with the
    /// process if the program exits right after. Found by review.
    #[test]
    fn the_last_program_handle_waits_for_what_is_owed_itself() {
        let (conn, broker) = full_connection();
        let handle = ProgramHandle::new(Arc::clone(&conn));
        let end = RequestBody::End {
            access: 9,
            fence_slot: None,
        };
        handle.send_on(0, end, &[], false).expect("owed");
        let reading = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            requests_arriving(&broker, 1)
        });
        // `conn` stands for the flusher's reference.
        drop(handle);
        assert!(
            !conn.owing.load(Ordering::Acquire),
            "the last handle let go before the end went out"
        );
        let arrived = reading.join().expect("reading thread");
        assert!(
            matches!(arrived[..], [RequestBody::End { access: 9, .. }]),
            "{arrived:?}"
        );
    }

    /// The last handle's let-go and then the connection's `Drop` each gave
    /// what was owed a grace: a program letting go of a connection whose
    /// broker does not read waited two, not the one it is promised. Past
    /// the grace, what is still owed is left to the hang-up.
    #[test]
    fn what_is_owed_gets_one_grace_not_two() {
        let (conn, broker) = full_connection();
        // As if a flusher ran: only the let-go sends.
        conn.flushing.store(true, Ordering::Release);
        let handle = ProgramHandle::new(Arc::clone(&conn));
        let end = RequestBody::End {
            access: 9,
            fence_slot: None,
        };
        handle.send_on(0, end, &[], false).expect("owed");
        // `conn` stands for the flusher's reference: the grace ends
        // without room, the broker not reading.
        drop(handle);
        assert!(conn.owing.load(Ordering::Acquire), "sent without room");
        // The broker reads again as the connection goes.
        let reading = std::thread::spawn(move || requests_until_closed(&broker));
        drop(conn);
        let arrived = reading.join().expect("reading thread");
        assert!(arrived.is_empty(), "a second grace sent it: {arrived:?}");
    }

    /// A process that cannot start a thread sends what a drop owes on the
    /// dropping thread, waiting for room; on a tokio runtime's thread (a
    /// current-thread runtime's only one) that wait stalled every other
    /// task for as long as the broker did not read. There it stays owed,
    /// for the next request or the last handle's let-go.
    #[cfg(feature = "tokio")]
    #[test]
    fn a_drop_on_a_runtime_thread_never_waits_for_room_without_a_flusher() {
        let (conn, _broker) = full_connection();
        conn.no_threads.store(true, Ordering::Release);
        let (done, returned) = std::sync::mpsc::channel();
        let dropper = Arc::clone(&conn);
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("runtime");
            runtime.block_on(async {
                let end = RequestBody::End {
                    access: 9,
                    fence_slot: None,
                };
                let _ = dropper.send_on(0, end, &[], false);
            });
            let _ = done.send(());
        });
        assert!(
            returned.recv_timeout(Duration::from_secs(10)).is_ok(),
            "the drop waited for room on the runtime's thread"
        );
        assert!(conn.owing.load(Ordering::Acquire), "the end was lost");
    }

    /// The flusher must not keep a connection the program let go of: its
    /// socket stayed open, and the broker kept the client's buffers.
    #[test]
    fn the_flusher_lets_a_dropped_connection_close() {
        let (conn, broker) = full_connection();
        let serial = conn.remember_hold(4, "secret", 1, 0);
        conn.release_hold(4, serial);
        assert!(conn.flushing.load(Ordering::Acquire));
        // From before the drop: its own wait for room (at most
        // CLOSE_GRACE, the broker not reading meanwhile) counts too.
        let deadline = Instant::now() + CLOSE_GRACE + Duration::from_secs(10);
        drop(conn);
        loop {
            match recv_message(broker.as_fd(), true) {
                Ok(_) => {}
                Err(RecvError::Closed) => break,
                Err(_) => {
                    assert!(Instant::now() < deadline, "the socket was kept open");
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }

    /// The old broker's holds ended with its connection, and on a new one
    /// the id may name another buffer of this client: nothing owed to the
    /// old one goes to the new one, even one the reader kept late.
    #[test]
    fn a_give_back_owed_to_a_replaced_connection_is_dropped() {
        let (conn, old_broker) = full_connection();
        let (old, old_generation) = conn.current_socket();
        assert!(conn
            .give_back(&old, old_generation, &buffer_answer(3))
            .is_none());
        let (new, broker) = pair();
        conn.install(new, welcome(), None);
        assert!(conn
            .give_back(&old, old_generation, &buffer_answer(4))
            .is_none());
        let _ = drain(&old_broker);
        conn.send(RequestBody::ListHeaps, &[], false).expect("send");
        assert!(matches!(drain(&broker)[..], [RequestBody::ListHeaps]));
        assert!(lock(&conn.owed).is_empty());
    }

    /// Past the bound, a give-back is lost, and `take_errors` must say so.
    #[test]
    fn a_give_back_past_the_bound_says_it_is_lost() {
        let (conn, _broker) = full_connection();
        let (socket, generation) = owe_up_to_the_bound(&conn);
        let lost = conn
            .give_back(&socket, generation, &buffer_answer(99))
            .expect("the lost one is reported");
        assert!(lost.message.contains("buffer 99"), "{lost:?}");
        assert_eq!(lock(&conn.owed).len(), MAX_OWED);
    }

    /// A broker that closes its end with messages of ours unread resets
    /// our socket: the next receive fails `ECONNRESET` once, and what the
    /// broker sent before closing is still queued behind it. Taking the
    /// reset for the end lost the broker's last answer (the reason it cut
    /// the client off).
    #[test]
    fn a_reset_does_not_hide_the_answers_queued_behind_it() {
        let (ours, broker) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .expect("socketpair");
        send_message(ours.as_fd(), b"never read", &[], false).expect("send");
        let last_word = ServerMessage::Reply(dmabroker_ipc::Reply {
            id: 7,
            fds: 0,
            result: Err(WireError::new(ErrorCode::ProtocolError, "cut off")),
        });
        let bytes = dmabroker_ipc::codec::encode_server_message(&last_word).expect("encode");
        send_message(broker.as_fd(), &bytes, &[], false).expect("send");
        drop(broker);
        let mut buf = vec![0u8; dmabroker_ipc::MAX_MESSAGE_SIZE];
        match receive(&ours, &mut buf, None) {
            Ok(Received::Message(message, _)) => assert_eq!(message, last_word),
            Ok(_) => panic!("the broker's last answer was not read"),
            Err(err) => panic!("the broker's last answer was lost: {err}"),
        }
        assert!(
            receive(&ours, &mut buf, None).is_err(),
            "the hang-up follows"
        );
    }
}
