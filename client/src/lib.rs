//! Thin client for dmabroker: allocate, share, map and arbitrate dma-bufs.
//!
//! ```no_run
//! use dmabroker_client::{Access, Client};
//! let client = Client::connect()?;
//! let frame = client.alloc(3_110_400)?;
//! let token = frame.export()?; // hand `token.to_string()` to the consumer
//! {
//!     let mut write = frame.begin(Access::CpuWrite)?;
//!     write.bytes_mut()?.fill(0x80);
//! } // dropping the guard ends the access: no round trip, and usually no
//!   // message at all (see "Buffer words" in docs/protocol.md)
//! # Ok::<(), dmabroker_client::Error>(())
//! ```
//!
//! Blocking calls by default; with the `tokio` feature the calls that wait
//! for the broker (and so may run a whole reconnect, up to
//! [`ClientOptions::reconnect`]) have `_async` twins that wait on tokio's
//! blocking pool: `connect_async`, `heaps_async`, `alloc_async`,
//! `import_async`, `adopt_async`, `next_event_async`, `Buffer::export_async`,
//! `info_async` and `begin_async`, and `AccessGuard::end_with_fence_async`.
//! They take what the fullest blocking form takes, not the shortest:
//! `connect_async(path, options)` as `connect_with`, `alloc_async(request)`
//! as `alloc_with`, `begin_async(access, timeout)` as `begin_timeout`
//! (`None`: no limit).
//! The last `Client` dropped inside
//! a runtime leaves its wait for the broker to read what is still queued
//! to the runtime's blocking pool, so that its other tasks run meanwhile
//! (the runtime, dropped, waits for it; see docs/protocol.md).
#![forbid(unsafe_code)]

mod connection;
mod error;

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};
use std::time::{Duration, Instant};

use dmabroker_ipc::bufferword::{
    BufferWord, FastSlot, Planned, WordAccess, WordEnd, WordHold, WORD_PAGE,
};
use dmabroker_ipc::cachesync::{self, SyncDirection, SyncPhase};
use dmabroker_ipc::endwords::{ClientEnd, EndSlot, EndWords};
pub use dmabroker_ipc::mapping::Mapping;
use dmabroker_ipc::{features, Hello, ReplyBody, RequestBody, PROTOCOL_VERSION};
pub use dmabroker_ipc::{
    Access, BufferInfo, ErrorCode, Event, HeapInfo, QuotaDetail, ShareToken, WireError,
};
use nix::errno::Errno;

use connection::{Connection, ProgramHandle};
pub use error::{AdoptRefused, Error, FenceRefused, Result};

/// How a connection should behave; the policy has the last word.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// `Some(false)` asks for no-autofence (begin never blocks; you wait for
    /// the returned fences yourself). `None` takes the policy's choice.
    pub autofence: Option<bool>,
    /// Shown in logs and `dmabrokerctl clients`; never used for decisions.
    pub name: String,
    /// When the connection breaks (a broker restart), how long to keep
    /// trying to reconnect and re-attach the held buffers before a call
    /// fails with [`Error::Disconnected`]. `None` never reconnects. A
    /// call with a shorter timeout of its own waits that long for the
    /// broker to answer, but once it has, lets the re-attaches finish
    /// within this window: cut off, they would start over at every short
    /// call and the buffers be lost at the end of the broker's grace
    /// period. A window that ends before every re-attach is answered
    /// fails the call and closes the new connection: the broker releases
    /// what was re-attached on it (those buffers are lost), and the next
    /// call reconnects and re-attaches the rest, which the broker keeps
    /// for its grace period. Keeping such a connection instead would give
    /// up the buffers not yet asked for, and leave the call waiting for a
    /// broker that has stopped answering. `Some(Duration::MAX)` keeps
    /// trying for as long as it takes. The first connect
    /// ([`Client::connect`]) waits for the broker at most this long too
    /// (10 s when `None`). A broker that refuses the hello
    /// for good (`IncompatibleVersion`) fails the call at once with that
    /// refusal, whatever is left of the window; `PermissionDenied`, which
    /// a policy reload may lift, too, but only when the window has no end.
    pub reconnect: Option<Duration>,
    /// Begin and end uncontended CPU accesses of memfd buffers in the
    /// buffer's word, with no message (see "Buffer words" in
    /// docs/protocol.md). Off: every begin is a round trip.
    pub buffer_words: bool,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            autofence: None,
            name: String::new(),
            reconnect: Some(connection::CONNECT_WINDOW),
            buffer_words: true,
        }
    }
}

/// The socket [`Client::connect`] uses: `$DMABROKER_SOCKET`, a per-user
/// daemon's socket if one runs, else the system service's.
pub fn default_socket() -> std::path::PathBuf {
    dmabroker_ipc::paths::client_socket()
}

/// A connection to the broker. Cheap to clone; all clones share it.
#[derive(Clone, Debug)]
pub struct Client {
    conn: ProgramHandle,
}

/// What to allocate.
#[derive(Clone, Debug, Default)]
pub struct AllocRequest {
    pub size: u64,
    /// A heap name (see [`Client::heaps`]); `None` for the broker's default.
    pub heap: Option<String>,
    /// Shown in `/proc/PID/fdinfo` (dma-bufs) and in the broker's views.
    pub name: Option<String>,
}

impl Client {
    /// Connects to the broker at the default path: `$DMABROKER_SOCKET`, a
    /// per-user daemon's socket if one runs, else the system service's.
    ///
    /// The connect and the broker's welcome are waited for at most the
    /// reconnect window ([`ClientOptions::reconnect`], 10 s by default;
    /// 10 s too when it is `None`; no bound for `Duration::MAX`): a socket
    /// that takes the connection but never answers fails with
    /// [`Error::Connect`] (timed out) then, instead of blocking for ever.
    pub fn connect() -> Result<Client> {
        Client::connect_to(default_socket())
    }

    /// As [`Client::connect`], to the socket at `path`.
    pub fn connect_to(path: impl AsRef<Path>) -> Result<Client> {
        Client::connect_with(path, ClientOptions::default())
    }

    /// As [`Client::connect_to`], with `options`; the connect is bounded
    /// by their reconnect window (see [`Client::connect`]).
    pub fn connect_with(path: impl AsRef<Path>, options: ClientOptions) -> Result<Client> {
        let name = if options.name.is_empty() {
            program_name(std::env::args_os().next())
        } else {
            options.name
        };
        let wanted = if options.buffer_words {
            features::ALL
        } else {
            features::ALL & !features::BUFFER_WORDS
        };
        let hello = Hello {
            version: PROTOCOL_VERSION,
            features: wanted,
            autofence: options.autofence,
            client_name: name,
        };
        let conn = Connection::open(path.as_ref(), hello, options.reconnect)?;
        Ok(Client {
            conn: ProgramHandle::new(conn),
        })
    }

    /// This connection's id in the broker's views (`dmabrokerctl clients`).
    /// It changes when the client reconnects.
    pub fn id(&self) -> u64 {
        self.conn.welcome().client_id
    }

    /// Whether begin blocks until the access is granted (autofence) or is
    /// granted at once with the fences to wait for (no-autofence).
    pub fn autofence(&self) -> bool {
        self.conn.welcome().autofence
    }

    pub fn default_heap(&self) -> String {
        self.conn.welcome().default_heap
    }

    /// How often this client reconnected after its connection broke. Each
    /// reconnect loses the accesses held at the time; buffers survive when
    /// the broker kept them (systemd fd store).
    pub fn reconnects(&self) -> u64 {
        self.conn.reconnects()
    }

    pub fn heaps(&self) -> Result<Vec<HeapInfo>> {
        match self.conn.call(RequestBody::ListHeaps, &[])?.0 {
            ReplyBody::Heaps(heaps) => Ok(heaps),
            other => Err(unexpected("heaps", &other)),
        }
    }

    /// Allocates `size` bytes (rounded up to pages) from the default heap.
    pub fn alloc(&self, size: u64) -> Result<Buffer> {
        self.alloc_with(AllocRequest {
            size,
            ..Default::default()
        })
    }

    pub fn alloc_with(&self, request: AllocRequest) -> Result<Buffer> {
        let answered = self.conn.call_on(
            RequestBody::Alloc {
                size: request.size,
                heap: request.heap,
                name: request.name,
            },
            &[],
        )?;
        self.buffer_from(answered)
    }

    /// Takes a share of a buffer another client exported. The fd is this
    /// process's own, of the same kernel object.
    pub fn import(&self, token: &ShareToken) -> Result<Buffer> {
        let answered = self.conn.call_on(
            RequestBody::Import {
                token: token.to_string(),
            },
            &[],
        )?;
        self.buffer_from(answered)
    }

    /// Registers a dma-buf obtained elsewhere (V4L2, a GPU) so the broker
    /// arbitrates it too. Anything but a real dma-buf is refused
    /// (`NotADmaBuf`). On any failure the fd comes back in the error, still
    /// open, so that a refusal that means "try again" (`Busy`) can be
    /// retried without exporting the buffer from its device anew.
    pub fn adopt(
        &self,
        dmabuf: OwnedFd,
        name: Option<&str>,
    ) -> std::result::Result<Buffer, AdoptRefused> {
        let answered = self.conn.call_on(
            RequestBody::Adopt {
                name: name.map(str::to_owned),
            },
            &[dmabuf.as_fd()],
        );
        match answered {
            Ok((ReplyBody::Buffer(info), _, (_, generation))) => {
                match self.keep_hold(&info, generation) {
                    Ok(serial) => Ok(Buffer::new(self.clone(), info, dmabuf, serial)),
                    Err(error) => Err(AdoptRefused { error, dmabuf }),
                }
            }
            Ok((other, _, _)) => Err(AdoptRefused {
                error: unexpected("buffer", &other),
                dmabuf,
            }),
            Err(error) => Err(AdoptRefused { error, dmabuf }),
        }
    }

    /// Records the hold of a buffer an answer on connection `generation`
    /// gave (see `Connection::keep_hold`): its serial. A reconnect that
    /// ran meanwhile did not know it: it is re-attached, or the call fails.
    fn keep_hold(&self, info: &BufferInfo, generation: u64) -> Result<u64> {
        self.conn
            .keep_hold(info.id, &info.secret, info.inode, generation)
    }

    /// A buffer from the answer to an alloc or an import, on the
    /// connection generation the answer came on.
    ///
    /// The buffer's fd is slot 0, the one fd of the answer, and must be the
    /// file the answer names (its inode): a `Buffer` wrapping another file
    /// would map memory the broker does not arbitrate. An answer that does
    /// not hold to that is a protocol error, and the buffer the broker
    /// counted for it is given back (freed), since no `Buffer` will exist
    /// to free it.
    fn buffer_from(&self, answered: connection::Answered) -> Result<Buffer> {
        let (body, fds, (_, generation)) = answered;
        match body {
            ReplyBody::Buffer(info) => match buffer_fd(&info, fds) {
                Ok(fd) => {
                    let serial = self.keep_hold(&info, generation)?;
                    Ok(Buffer::new(self.clone(), info, fd, serial))
                }
                Err(why) => {
                    if let Some(lost) = self.conn.give_back_buffer(generation, &info) {
                        self.conn.note_error(lost);
                    }
                    Err(Error::Protocol(format!("buffer {}: {why}", info.id)))
                }
            },
            other => Err(unexpected("buffer", &other)),
        }
    }

    /// The next event (fence signalled, access revoked), waiting at most
    /// `timeout`; `Ok(None)` when none came in time. `Some(Duration::ZERO)`
    /// polls: it waits for nothing, but still reads an event that has
    /// already arrived, so a single-threaded loop can ask between frames.
    /// After a broker restart
    /// it reconnects as other calls do (`Ok(None)` if the broker does not
    /// answer within `timeout`; once it answers, re-attaching the held
    /// buffers runs to its end, which may take longer, within
    /// [`ClientOptions::reconnect`]) and returns [`Error::Reconnected`]:
    /// events of the old connection are dropped, since the new broker
    /// numbers fences and accesses anew, so whatever the caller waited to
    /// hear of will never come.
    pub fn next_event(&self, timeout: Option<Duration>) -> Result<Option<Event>> {
        Ok(self.conn.next_event(timeout)?.map(|(event, _, _)| event))
    }

    /// Errors for requests sent without waiting (ends, frees), oldest first,
    /// and what the client itself could not do with no caller to tell: a
    /// message whose fds were lost, and a give-back of an
    /// [`Error::FdTableFull`] answer that could not be kept for sending
    /// (the buffer or access stays charged until the client disconnects).
    pub fn take_errors(&self) -> Vec<WireError> {
        self.conn.take_errors()
    }
}

/// The name a client without one gives in its hello: its `argv[0]`, which
/// need not be UTF-8 (`std::env::args` would panic on it).
fn program_name(arg0: Option<std::ffi::OsString>) -> String {
    arg0.map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn unexpected(expected: &'static str, got: &ReplyBody) -> Error {
    Error::UnexpectedReply {
        expected,
        got: got.kind().to_owned(),
    }
}

/// The `timeout_ms` of a begin that may wait `timeout`, in a call whose
/// own deadline is `deadline`. Rounded up: 0 tells the broker to give up
/// at once. No limit only when the call has no deadline either (a timeout
/// too long for an `Instant`, `Duration::MAX`: how a caller says "no
/// limit"), since the longest limit the wire can say is one a begin could
/// outwait. Any other timeout is a limit, and one longer than the wire can
/// say (past `u32::MAX` ms, some 49.7 days) asks for the longest it can:
/// sent as none, a 50-day wait could last forever.
fn wire_timeout(timeout: Option<Duration>, deadline: Option<Instant>) -> Option<u32> {
    let timeout = timeout?;
    deadline?;
    Some(u32::try_from(timeout.as_nanos().div_ceil(1_000_000)).unwrap_or(u32::MAX))
}

/// A buffer this client holds. Dropping it frees the hold (pipelined: no
/// round trip) once its guards are gone too: an [`AccessGuard`] keeps the
/// hold, and so its access, until it ends, even when the `Buffer` it came
/// from goes first (`client.import(&token)?.begin(Access::CpuRead)?`).
/// So while such a guard lives, the client still holds the buffer: an
/// import or adopt of the same buffer is refused `InvalidArgument`
/// ("already holding") until the guard ends.
/// The memory lives on while other clients hold it.
#[derive(Debug)]
pub struct Buffer {
    /// Shared with begins that outlive their caller's wait (see
    /// [`Buffer::begin_async`]): such a begin must still be able to build
    /// its guard, and so end the access it is granted, after the caller
    /// stopped waiting.
    state: Arc<BufferState>,
    /// The hold, shared with the buffer's guards (not with its state: a
    /// begin the caller gave up on must not keep it). Kept for its drop.
    _hold: Arc<HoldRelease>,
}

/// A hold of a buffer, freed when the `Buffer` and every guard of it are
/// gone. Freeing it while a guard lived released the guard's access at the
/// broker, which granted it to another client while the guard still handed
/// out the bytes.
#[derive(Debug)]
struct HoldRelease {
    client: Client,
    buffer: u64,
    serial: u64,
    /// `BufferState::released`.
    released: Arc<AtomicBool>,
}

impl Drop for HoldRelease {
    /// Frees the hold. A guard's own end goes out first: the guard's
    /// `Drop` ends its access before its fields, this among them, drop.
    /// Freeing answers a begin still waiting on the buffer with an error.
    fn drop(&mut self) {
        self.released.store(true, Ordering::SeqCst);
        self.client.conn.release_hold(self.buffer, self.serial);
    }
}

#[derive(Debug)]
struct BufferState {
    client: Client,
    info: BufferInfo,
    /// Shared with the guards that owe its cache sync's END (see
    /// [`OwnSync`]), which must outlive a dropped `Buffer`.
    fd: Arc<BufferFile>,
    /// Which hold of `info.id` this is, in the connection's book (see
    /// `Connection::send_for`).
    serial: u64,
    /// Mapped at the first CPU access and kept: mapping a frame per access
    /// would cost a page fault per page per frame.
    mapping: OnceLock<Arc<RwLock<Mapping>>>,
    /// This holder's slot in the buffer's word, from the last grant that
    /// named one, with the connection generation it belongs to.
    word_slot: Mutex<Option<(u64, FastSlot)>>,
    /// The word, mapped before the first CPU begin that may be granted in
    /// it (see `map_word_before_asking`).
    word: OnceLock<Arc<BufferWord>>,
    /// Whether the buffer's file has a word page past its end (a memfd
    /// buffer's does; a dma-buf has none).
    has_word_page: OnceLock<bool>,
    /// Threads of this process inside a begin on this buffer, plus guards
    /// held in its word (the low [`USERS_LIVE`] bits), and how many begins
    /// there have ever been (the bits above, see [`Users`]). A hand-off
    /// waiter that finds its holder's bit while it was alone here all
    /// along knows the bit is its own, and spares the round trip that
    /// would tell it otherwise (see `await_hand_off`).
    users: Arc<AtomicU64>,
    /// The hold, while the `Buffer` or a guard of it keeps it: each guard
    /// takes a share (see [`HoldRelease`]).
    hold: Weak<HoldRelease>,
    /// The caller dropped its `Buffer` and its guards (and the hold was
    /// freed) while a begin of `begin_async` may still run on the
    /// blocking pool.
    released: Arc<AtomicBool>,
}

/// The bits of `BufferState::users` that count the live users.
const USERS_LIVE: u64 = (1 << 32) - 1;
/// One begin in `BufferState::users`: a live user, and one more begun.
const ONE_BEGIN: u64 = (1 << 32) + 1;

/// `BufferState::users` as a hand-off waiter read it.
#[derive(Clone, Copy, Debug)]
struct Users(u64);

impl Users {
    /// Whether a bit of the waiter's holder in the word may have been a
    /// sibling's at any moment between `self` (read before the word) and
    /// `after` (read after it): a sibling was live then, is live now, or
    /// began meanwhile. The live count alone was not enough: a sibling
    /// whose bit the waiter saw could end, and give its count back,
    /// before the waiter counted, and the waiter then took that bit for
    /// its hand-off (an access nobody held, and its request's answer, a
    /// `Timeout`, dropped).
    fn sibling_possible(self, after: Users) -> bool {
        self.0 & USERS_LIVE > 1 || after.0 & USERS_LIVE > 1 || after.0 >> 32 != self.0 >> 32
    }
}

/// One count in `BufferState::users`, given back when dropped.
#[derive(Debug)]
struct UserTicket(Arc<AtomicU64>);

impl Drop for UserTicket {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Buffer {
    /// `serial`: the hold's, recorded (see `Client::keep_hold`).
    fn new(client: Client, info: BufferInfo, fd: OwnedFd, serial: u64) -> Buffer {
        let released = Arc::new(AtomicBool::new(false));
        let hold = Arc::new(HoldRelease {
            client: client.clone(),
            buffer: info.id,
            serial,
            released: Arc::clone(&released),
        });
        Buffer {
            state: Arc::new(BufferState {
                client,
                info,
                fd: Arc::new(BufferFile {
                    fd,
                    no_cache_sync: AtomicBool::new(false),
                }),
                serial,
                mapping: OnceLock::new(),
                word_slot: Mutex::new(None),
                word: OnceLock::new(),
                has_word_page: OnceLock::new(),
                users: Arc::new(AtomicU64::new(0)),
                hold: Arc::downgrade(&hold),
                released,
            }),
            _hold: hold,
        }
    }

    pub fn id(&self) -> u64 {
        self.state.info.id
    }

    /// Bytes, rounded up to whole pages.
    pub fn size(&self) -> u64 {
        self.state.info.size
    }

    pub fn heap(&self) -> &str {
        &self.state.info.heap
    }

    pub fn name(&self) -> &str {
        &self.state.info.name
    }

    /// The kernel object's inode: equal for every holder of the buffer.
    pub fn inode(&self) -> u64 {
        self.state.info.inode
    }

    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.state.fd.as_fd()
    }

    /// A new shared mapping of the whole buffer, unmapped on drop. Hold an
    /// access (see [`Buffer::begin`]) while looking at its bytes.
    ///
    /// Prefer [`AccessGuard::bytes`] and [`AccessGuard::bytes_mut`]: they
    /// share one mapping per buffer and never let a `&mut [u8]` alias
    /// another view in this process. Each `map()` is a mapping of its own,
    /// and its bytes change whenever another mapping of the buffer (this
    /// process's or another's) writes them: Rust's rules for slices assume
    /// they do not, so write through one mapping at a time, under a write
    /// access, and do not keep a slice of one across a write through
    /// another.
    pub fn map(&self) -> Result<Mapping> {
        Ok(Mapping::new(
            self.state.fd.as_fd(),
            self.state.mapped_len()?,
        )?)
    }

    /// A token another process can import this buffer with.
    pub fn export(&self) -> Result<ShareToken> {
        self.state.export()
    }

    /// Begins an access; with autofence, blocks until granted.
    pub fn begin(&self, access: Access) -> Result<AccessGuard> {
        self.state.begin_inner(access, None)
    }

    /// As [`Buffer::begin`], but gives up with `ErrorCode::Timeout` after
    /// `timeout` (and the request leaves the queue). Across a broker
    /// restart the timeout bounds the wait for the new broker to answer;
    /// once it has, re-attaching the client's buffers runs to its end
    /// (within [`ClientOptions::reconnect`]) and may take longer. A timeout
    /// too long to end (`Duration::MAX`) is no limit at all; any other is
    /// a limit, and one longer than the broker can be told (`u32::MAX` ms,
    /// some 49.7 days) gives up after that long instead.
    ///
    /// The broker keeps the limit: it answers `Timeout` when it is over. A
    /// broker that has stopped answering at all (stopped with a signal,
    /// wedged) holds this call, as it holds every other, until it answers
    /// or hangs up; the shipped service's watchdog (`WatchdogSec=10s`)
    /// restarts a wedged broker, and the begin then goes on with the new
    /// one as above. (Giving up on the client's side alone could leave the
    /// access granted to nobody, or handed over in the buffer's word to a
    /// caller that has left.)
    pub fn begin_timeout(&self, access: Access, timeout: Duration) -> Result<AccessGuard> {
        self.state.begin_inner(access, Some(timeout))
    }

    /// Asks the broker for this buffer's current facts.
    pub fn info(&self) -> Result<BufferInfo> {
        self.state.buffer_info()
    }
}

impl BufferState {
    /// The buffer's id and this hold's serial: what a request on it shows.
    fn hold(&self) -> (u64, u64) {
        (self.info.id, self.serial)
    }

    fn export(&self) -> Result<ShareToken> {
        let export = RequestBody::Export {
            buffer: self.info.id,
        };
        match self.client.conn.call_for(self.hold(), export, &[])?.0 {
            ReplyBody::Exported { token } => Ok(token.parse()?),
            other => Err(unexpected("exported", &other)),
        }
    }

    fn buffer_info(&self) -> Result<BufferInfo> {
        let info = RequestBody::Info {
            buffer: self.info.id,
        };
        match self.client.conn.call_for(self.hold(), info, &[])?.0 {
            ReplyBody::Buffer(info) => Ok(info),
            other => Err(unexpected("buffer", &other)),
        }
    }

    fn mapped_word(&self) -> Result<Arc<BufferWord>> {
        if let Some(word) = self.word.get() {
            return Ok(Arc::clone(word));
        }
        let word = Arc::new(BufferWord::map(self.fd.as_fd(), self.info.size)?);
        Ok(Arc::clone(self.word.get_or_init(|| word)))
    }

    /// Maps the word before asking the broker for a CPU access it may
    /// grant in the word. A grant held in a word this process cannot map
    /// (out of mappings or memory) could never be ended: its bit would
    /// keep every other user of the buffer waiting until the buffer is
    /// freed. Failing here, the begin leaves nothing behind.
    fn map_word_before_asking(&self, access: Access) -> Result<()> {
        if self.word.get().is_some() || WordAccess::of(access).is_none() {
            return Ok(());
        }
        let has_page = *self.has_word_page.get_or_init(|| {
            nix::sys::stat::fstat(std::os::fd::AsRawFd::as_raw_fd(&self.fd.as_fd())).is_ok_and(
                |st| {
                    // A size from the broker: no overflow on an absurd one.
                    self.info
                        .size
                        .checked_add(WORD_PAGE)
                        .is_some_and(|needed| st.st_size as u64 >= needed)
                },
            )
        });
        let negotiated = || self.client.conn.welcome().features & features::BUFFER_WORDS != 0;
        if has_page && negotiated() {
            self.mapped_word()?;
        }
        Ok(())
    }

    /// The slot, with its connection generation, if it belongs to the
    /// current connection (a reconnect voids it until the next grant names
    /// one).
    fn current_slot(&self) -> Option<(FastSlot, u64)> {
        let (generation, slot) = (*self.word_slot.lock().unwrap_or_else(|p| p.into_inner()))?;
        (generation == self.client.conn.generation()).then_some((slot, generation))
    }

    fn learn_slot(&self, generation: u64, slot: FastSlot) {
        *self.word_slot.lock().unwrap_or_else(|p| p.into_inner()) = Some((generation, slot));
    }

    /// An uncontended CPU access, taken in the word with no message.
    fn try_word_begin(&self, access: Access) -> Option<AccessGuard> {
        let kind = WordAccess::of(access)?;
        let (slot, generation) = self.current_slot()?;
        let word = Arc::clone(self.word.get()?);
        let mapping = self.shared_mapping().ok()?;
        let hold = word.try_begin(slot, kind)?;
        Some(self.word_guard(word, hold, Some(mapping), access, generation))
    }

    fn shared_mapping(&self) -> Result<Arc<RwLock<Mapping>>> {
        if let Some(mapping) = self.mapping.get() {
            return Ok(Arc::clone(mapping));
        }
        let mapping = Arc::new(RwLock::new(Mapping::new(
            self.fd.as_fd(),
            self.mapped_len()?,
        )?));
        Ok(Arc::clone(self.mapping.get_or_init(|| mapping)))
    }

    fn mapped_len(&self) -> Result<usize> {
        usize::try_from(self.info.size)
            .map_err(|_| Error::Protocol("buffer larger than the address space".into()))
    }

    /// A begin asking the broker to wait at most `timeout`, of a call
    /// whose own deadline is `deadline` (`None`: it has none).
    fn begin_request(
        &self,
        access: Access,
        timeout: Option<Duration>,
        deadline: Option<Instant>,
    ) -> RequestBody {
        RequestBody::Begin {
            buffer: self.info.id,
            access,
            timeout_ms: wire_timeout(timeout, deadline),
        }
    }

    /// Counts a begin in `users`, before anything it does can put a bit in
    /// the word: a sibling that sees the bit then sees the count.
    fn ticket(&self) -> UserTicket {
        self.users.fetch_add(ONE_BEGIN, Ordering::SeqCst);
        UserTicket(Arc::clone(&self.users))
    }

    /// The users count as it is now (see [`Users`]).
    fn users(&self) -> Users {
        Users(self.users.load(Ordering::SeqCst))
    }

    fn begin_inner(&self, access: Access, timeout: Option<Duration>) -> Result<AccessGuard> {
        let ticket = self.ticket();
        let guard = match self.try_word_begin(access) {
            Some(guard) => guard,
            None => self.begin_with_broker(access, timeout, &connection::NoHook)?,
        };
        Ok(guard.counted(ticket))
    }

    /// Everything but the fast path in the word: the broker's answer, a
    /// planned hand-off, and one reconnect. Blocks until it has a guard,
    /// or until a cancel (`sent`, see `nonblocking::BeginCancel`) ends the
    /// wait.
    fn begin_with_broker(
        &self,
        access: Access,
        timeout: Option<Duration>,
        sent: &dyn connection::SentHook,
    ) -> Result<AccessGuard> {
        // The timeout bounds the whole call: a begin sent again after a
        // reconnect asks for what is left of it, and the reconnect gives
        // up when it is over unless the new broker has answered (its
        // re-attaches then run to their end: see `fresh_connection`).
        // No deadline for a timeout too long to have one (`Duration::MAX`).
        let deadline = timeout.and_then(connection::deadline_after);
        // The first request asks for the caller's timeout itself; only one
        // sent again asks for what is left.
        let first = std::cell::Cell::new(true);
        let asked = || match (first.replace(false), deadline) {
            (false, Some(deadline)) => Some(deadline.saturating_duration_since(Instant::now())),
            _ => timeout,
        };
        let mut retried = false;
        loop {
            // Again after a reconnect: the new broker may offer words.
            self.map_word_before_asking(access)?;
            let (body, fds, (id, generation)) = self.client.conn.call_for_until(
                self.hold(),
                || self.begin_request(access, asked(), deadline),
                &[],
                deadline,
                sent,
            )?;
            let resolved = self.resolve_plan((body, fds), access, id, generation);
            if !matches!(resolved, Ok(Resolved::Reply(_))) {
                // Whatever the broker still sends for it goes unread.
                self.client.conn.abandon(id);
            }
            match resolved {
                Ok(Resolved::Reply(reply)) => return self.guard_from(reply, generation),
                Ok(Resolved::HandedOff(guard)) => return Ok(guard),
                // The broker went away while we slept on the word: begin
                // again on a new connection, as any other call would
                // (unless nobody waits for it any more).
                Err(Error::Disconnected)
                    if !retried
                        && sent.before().is_ok()
                        && self.client.conn.recover_by(generation, deadline, sent)? =>
                {
                    retried = true;
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// A `Planned` answer: sleep on the word until the holder hands the
    /// buffer over (no message follows) or the broker cancels the plan (its
    /// answer follows as a message, possibly another `Planned`).
    fn resolve_plan(
        &self,
        mut reply: (ReplyBody, Vec<OwnedFd>),
        access: Access,
        id: u64,
        generation: u64,
    ) -> Result<Resolved> {
        loop {
            let ReplyBody::Planned { word: slot } = reply.0 else {
                return Ok(Resolved::Reply(reply));
            };
            let (word, kind) = self.planned(slot, access, generation)?;
            let waiter = Waiter {
                conn: &self.client.conn,
                request: (id, generation),
                users: &|| self.users(),
            };
            if await_hand_off(&waiter, &word, slot, kind)? {
                return Ok(Resolved::HandedOff(
                    self.handed_off(word, slot, access, generation)?,
                ));
            }
            if self.released.load(Ordering::SeqCst) {
                // The free may have released a hand-off carried out for
                // this begin before it looked (its bit gone with the hold):
                // no answer would ever come.
                self.client.conn.abandon(id);
                return Err(Error::Broker(WireError::new(
                    ErrorCode::UnknownBuffer,
                    "the buffer was dropped while this begin waited",
                )));
            }
            reply = self.client.conn.wait_reply(id, generation)?;
        }
    }

    /// What waiting for a planned hand-off needs: the word, mapped.
    fn planned(
        &self,
        slot: FastSlot,
        access: Access,
        generation: u64,
    ) -> Result<(Arc<BufferWord>, WordAccess)> {
        let kind = WordAccess::of(access)
            .ok_or_else(|| Error::Protocol("a hand-off planned for a device access".into()))?;
        self.learn_slot(generation, slot);
        Ok((self.mapped_word()?, kind))
    }

    /// A guard for an access held in the word: the broker has no id for it
    /// and no news (lost writer, revocation) to carry. `generation`: the
    /// connection whose word it is (its `WordEnded` goes there or nowhere).
    fn word_guard(
        &self,
        word: Arc<BufferWord>,
        hold: WordHold,
        mapping: Option<Arc<RwLock<Mapping>>>,
        access: Access,
        generation: u64,
    ) -> AccessGuard {
        AccessGuard {
            client: self.client.clone(),
            buffer: self.info.id,
            mapping,
            access: 0,
            kind: access,
            writer_lost: false,
            revoked: false,
            fences: Vec::new(),
            end_word: None,
            word_hold: Some((word, hold)),
            generation,
            ended: false,
            ticket: None,
            own_sync: None,
            _hold: self.hold.upgrade(),
        }
    }

    fn handed_off(
        &self,
        word: Arc<BufferWord>,
        slot: FastSlot,
        access: Access,
        generation: u64,
    ) -> Result<AccessGuard> {
        let hold = WordHold {
            slot,
            write: access.is_write(),
        };
        // On failure the guard drops and ends the access in the word.
        let mut guard = self.word_guard(word, hold, None, access, generation);
        guard.mapping = Some(self.shared_mapping()?);
        Ok(guard)
    }

    /// `generation`: the connection the grant came on; its end word is only
    /// meaningful in that connection's page.
    fn guard_from(&self, reply: (ReplyBody, Vec<OwnedFd>), generation: u64) -> Result<AccessGuard> {
        let (body, fds) = reply;
        let grant = match body {
            ReplyBody::Granted(grant) => grant,
            other => return Err(unexpected("granted", &other)),
        };
        let mut fds: Vec<Option<OwnedFd>> = fds.into_iter().map(Some).collect();
        let fences = grant
            .fences
            .iter()
            .map(|f| Fence {
                id: f.id,
                kind: f.kind,
                holder: f.holder,
                sync_file: f
                    .sync_file_slot
                    .and_then(|slot| fds.get_mut(usize::from(slot)).and_then(Option::take)),
            })
            .collect();
        let word_hold = match grant.word {
            Some(slot) => {
                self.learn_slot(generation, slot);
                let hold = WordHold {
                    slot,
                    write: grant.kind.is_write(),
                };
                Some((self.mapped_word()?, hold))
            }
            None => None,
        };
        let mut guard = AccessGuard {
            client: self.client.clone(),
            buffer: self.info.id,
            mapping: None,
            // The broker's id for an access in the word lasts only while it
            // arbitrates the buffer (it names bits anew each time).
            access: if word_hold.is_some() { 0 } else { grant.access },
            kind: grant.kind,
            writer_lost: grant.writer_lost,
            revoked: grant.revoked,
            fences,
            end_word: grant
                .end_slot
                .and_then(|at| Some((self.client.conn.end_words(generation)?, at))),
            word_hold,
            generation,
            ended: false,
            ticket: None,
            own_sync: None,
            _hold: self.hold.upgrade(),
        };
        if grant.kind.is_cpu() {
            // The broker syncs only an autofence client's CPU accesses:
            // its START would block a no-autofence grant on the device's
            // fences, which such a client waits for where it chooses.
            // (Accesses held in a word are of memfds, which have no cache
            // sync: only broker grants can be of a dma-buf.)
            if !self.client.conn.welcome().autofence {
                guard.own_sync = Some(OwnSync {
                    file: Arc::clone(&self.fd),
                    direction: SyncDirection::of(grant.kind),
                    started: Mutex::new(false),
                });
            }
            // On failure the guard drops here and ends the access.
            guard.mapping = Some(self.shared_mapping()?);
        }
        Ok(guard)
    }
}

/// Who waits for a planned hand-off: its connection, its request (id and
/// connection generation), and the count of this process's threads that
/// use the same buffer (see [`Users`]).
struct Waiter<'a> {
    conn: &'a Connection,
    request: (u64, u64),
    users: &'a dyn Fn() -> Users,
}

/// How long a hand-off waiter sleeps on the word before it checks that the
/// broker is still there.
const PLAN_SLICE: Duration = Duration::from_millis(100);

/// Sleeps on the word until the planned hand-off happens (true) or the
/// broker cancels it (false: its answer comes by message). The plan is the
/// broker's of connection `generation`: once another thread has replaced
/// that connection, nobody will cancel it, so the wait ends as for a hang-up.
fn await_hand_off(
    waiter: &Waiter<'_>,
    word: &BufferWord,
    slot: FastSlot,
    kind: WordAccess,
) -> Result<bool> {
    let (conn, (id, generation)) = (waiter.conn, waiter.request);
    loop {
        let before = (waiter.users)();
        let planned = word.await_plan(slot, kind, PLAN_SLICE);
        let siblings = || before.sibling_possible((waiter.users)());
        match planned {
            // Handed off on a connection since replaced: the broker of
            // the new one knows nothing of it, and the old one's holds
            // (this bit among them) ended with it. Begin again there.
            Planned::Granted if conn.generation() != generation => return Err(Error::Disconnected),
            // A bit of this holder's, but the broker answered meanwhile:
            // the plan was cancelled and the bit is another thread's.
            Planned::Granted if siblings() && conn.answered(id) => return Ok(false),
            Planned::Granted => {
                conn.abandon(id);
                return Ok(true);
            }
            Planned::Cancelled => return Ok(false),
            Planned::Waiting if conn.generation() != generation || conn.hung_up() => {
                return Err(Error::Disconnected)
            }
            // The plan the word shows may be a sibling's at the same index
            // and of the same kind, made when the broker withdrew this one
            // (a timeout, a cancel) and answered it: the word then never
            // changes for this waiter, which slept until the sibling's
            // hand-off, however long the holder in its way took.
            Planned::Waiting if siblings() && conn.answered(id) => return Ok(false),
            Planned::Waiting => {}
        }
    }
}

/// What a begin's answer turned out to be.
enum Resolved {
    Reply((ReplyBody, Vec<OwnedFd>)),
    HandedOff(AccessGuard),
}

/// The fd of a buffer answer: its only one, of the file the answer names.
fn buffer_fd(info: &BufferInfo, fds: Vec<OwnedFd>) -> std::result::Result<OwnedFd, String> {
    let count = fds.len();
    let Some(fd) = fds.into_iter().next() else {
        return Err("the answer came without its fd".into());
    };
    if count != 1 {
        return Err(format!("the answer came with {count} fds, not 1"));
    }
    let inode = nix::sys::stat::fstat(std::os::fd::AsRawFd::as_raw_fd(&fd))
        .map_err(|err| format!("the answer's fd cannot be looked at: {err}"))?
        .st_ino;
    if inode != info.inode {
        return Err(format!(
            "the answer's fd is inode {inode}, not the buffer's {}",
            info.inode
        ));
    }
    Ok(fd)
}

/// A fence a no-autofence client must wait for before its hardware or its
/// CPU touches the buffer (for the CPU, [`AccessGuard::bytes`] waits only
/// for a dma-buf's own kernel fences, `holder` 0).
#[derive(Debug)]
pub struct Fence {
    pub id: u64,
    pub kind: Access,
    /// The client holding it; 0 for the dma-buf's own kernel fences.
    pub holder: u64,
    /// Poll it readable (or hand it to hardware) to wait. Without one, wait
    /// for `Event::FenceSignalled { fence: id }`.
    pub sync_file: Option<OwnedFd>,
}

/// A granted access. Dropping it ends the access without a round trip:
/// through its end word when the broker gave it one and nobody waits for
/// it (no message at all), else with a pipelined `End`.
#[derive(Debug)]
pub struct AccessGuard {
    client: Client,
    buffer: u64,
    mapping: Option<Arc<RwLock<Mapping>>>,
    access: u64,
    kind: Access,
    writer_lost: bool,
    revoked: bool,
    fences: Vec<Fence>,
    /// Where to end without a message, if the broker gave it a word.
    end_word: Option<(Arc<EndWords>, EndSlot)>,
    /// Held in the buffer's word (begun there, handed over there, or
    /// granted there by the broker): ended there too.
    word_hold: Option<(Arc<BufferWord>, WordHold)>,
    /// The connection generation the grant came on. Access ids are that
    /// connection's broker's: after a reconnect the access is gone, and
    /// its id may name another access of this client on the new one.
    generation: u64,
    ended: bool,
    /// Held in the word: counted among the buffer's users while it lives.
    ticket: Option<UserTicket>,
    /// A CPU access of a no-autofence client: its cache sync is this
    /// guard's to do (see [`OwnSync`]).
    own_sync: Option<OwnSync>,
    /// The buffer's hold, kept while the access lives: freed with the
    /// `Buffer` dropped first, it ended the access at the broker. `None`
    /// only for a guard a begin of `begin_async` made after its caller
    /// dropped the `Buffer` (the guard is dropped there, at once). Kept
    /// for its drop.
    _hold: Option<Arc<HoldRelease>>,
}

/// A buffer's file, and whether it has shown it has no cache sync.
#[derive(Debug)]
struct BufferFile {
    fd: OwnedFd,
    /// `DMA_BUF_IOCTL_SYNC` answered `ENOTTY` (a memfd: coherent CPU
    /// memory, nothing to sync): not asked again.
    no_cache_sync: AtomicBool,
}

impl AsFd for BufferFile {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// The cache sync of a no-autofence client's CPU access, which the broker
/// leaves to the client: it must not block the grant (a no-autofence
/// client is never blocked there), and the kernel's START waits for the
/// dma-buf's implicit fences. A CPU that touches the bytes must wait for
/// those anyway, so START comes where it does: at the access's first
/// [`AccessGuard::bytes`] or [`AccessGuard::bytes_mut`]. END comes when
/// the guard ends, however it ends, before the broker hears of the end:
/// the next holder (a device that does not snoop the CPU's caches) must
/// find the lines written back.
#[derive(Debug)]
struct OwnSync {
    file: Arc<BufferFile>,
    direction: SyncDirection,
    /// START succeeded and its END is owed. Behind a lock so that sibling
    /// threads reading through one guard wait for the one START.
    started: Mutex<bool>,
}

impl OwnSync {
    /// START, once per access (again after an END), unless the buffer
    /// has shown it has no cache sync.
    fn start(&self) -> Result<()> {
        let mut started = self.started.lock().unwrap_or_else(|p| p.into_inner());
        if *started || self.file.no_cache_sync.load(Ordering::Relaxed) {
            return Ok(());
        }
        match cachesync::sync(self.file.as_fd(), self.direction, SyncPhase::Start) {
            Ok(()) => *started = true,
            Err(Errno::ENOTTY) => self.file.no_cache_sync.store(true, Ordering::Relaxed),
            Err(errno) => return Err(Error::CacheSync(errno)),
        }
        Ok(())
    }

    /// The END a START owes, if one does.
    fn end(&self) -> Result<()> {
        let mut started = self.started.lock().unwrap_or_else(|p| p.into_inner());
        if !std::mem::replace(&mut *started, false) {
            return Ok(());
        }
        cachesync::sync(self.file.as_fd(), self.direction, SyncPhase::End).map_err(Error::CacheSync)
    }
}

/// The bytes of a buffer during a CPU access, for reading.
///
/// Every guard of a buffer in this process shares one mapping, behind a
/// reader-writer lock: any number of `Bytes` live at once (readers share),
/// a [`BytesMut`] excludes them, so no `&[u8]` ever aliases a `&mut [u8]`.
/// (A no-autofence client may hold a read and a write at once; its
/// `bytes_mut` then waits until its `Bytes` are dropped, without holding
/// back new ones. Asking for `bytes_mut` while the same thread keeps a
/// `Bytes` never returns.)
///
/// ```
/// # fn f(guard: &dmabroker_client::AccessGuard) -> dmabroker_client::Result<()> {
/// let bytes = guard.bytes()?;
/// let _first = bytes[0];
/// # Ok(())
/// # }
/// ```
///
/// ```compile_fail
/// # fn f(guard: &dmabroker_client::AccessGuard) -> dmabroker_client::Result<()> {
/// let mut bytes = guard.bytes()?;
/// bytes[0] = 1; // a read access gives no way to write
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Bytes<'a> {
    mapping: RwLockReadGuard<'a, Mapping>,
}

impl std::ops::Deref for Bytes<'_> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.mapping.as_slice()
    }
}

/// The bytes of a buffer during a CPU write access (see [`Bytes`]).
#[derive(Debug)]
pub struct BytesMut<'a> {
    mapping: RwLockWriteGuard<'a, Mapping>,
}

impl std::ops::Deref for BytesMut<'_> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.mapping.as_slice()
    }
}

impl std::ops::DerefMut for BytesMut<'_> {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.mapping.as_mut_slice()
    }
}

/// The mapping for writing, once no `Bytes` of it lives. Not `write()`:
/// std's lock then holds back new readers, and a thread that looks at the
/// bytes again while holding a `Bytes` (as its read access allows) would
/// deadlock with this writer, which waits for that very `Bytes`. A writer
/// waits here only in a no-autofence client holding a read and a write of
/// one buffer at once (arbitration keeps them apart otherwise), so polling
/// costs nothing elsewhere.
fn write_without_queueing(mapping: &RwLock<Mapping>) -> RwLockWriteGuard<'_, Mapping> {
    let mut pause = Duration::from_micros(10);
    loop {
        match mapping.try_write() {
            Ok(guard) => return guard,
            Err(std::sync::TryLockError::Poisoned(p)) => return p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(1));
            }
        }
    }
}

impl AccessGuard {
    /// Keeps `ticket` if the access is held in the word; else it is given
    /// back now.
    fn counted(mut self, ticket: UserTicket) -> AccessGuard {
        if self.word_hold.is_some() {
            self.ticket = Some(ticket);
        }
        self
    }

    /// The broker's id for the access (its fence id in the views). 0 for an
    /// access held in the buffer's word: the broker names those anew each
    /// time it takes the word over, so no id would stay true.
    pub fn id(&self) -> u64 {
        self.access
    }

    /// Whether the access is held in the buffer's word (see "Buffer words"
    /// in docs/protocol.md).
    pub fn in_word(&self) -> bool {
        self.word_hold.is_some()
    }

    pub fn buffer(&self) -> u64 {
        self.buffer
    }

    pub fn access(&self) -> Access {
        self.kind
    }

    /// The previous writer died while writing: the contents may be torn.
    pub fn writer_lost(&self) -> bool {
        self.writer_lost
    }

    /// The previous writer's access was revoked for holding it too long.
    pub fn revoked(&self) -> bool {
        self.revoked
    }

    /// No-autofence: the fences still outstanding at grant time.
    pub fn fences(&self) -> &[Fence] {
        &self.fences
    }

    pub fn take_fences(&mut self) -> Vec<Fence> {
        std::mem::take(&mut self.fences)
    }

    /// The buffer's bytes (CPU accesses only).
    ///
    /// An autofence client's access was granted once every conflicting
    /// fence had ended: the bytes are the CPU's. A no-autofence client's
    /// was granted at once, and this waits for little of what
    /// [`AccessGuard::fences`] lists: the access's first call on a
    /// dma-buf issues the cache sync START (`DMA_BUF_IOCTL_SYNC`), which
    /// waits only for the dma-buf's own kernel fences (the grant's fence
    /// with `holder` 0); on a memfd it issues nothing and waits for
    /// nothing. Wait yourself, before this call, for every other fence
    /// listed (other clients' accesses, `holder` not 0): poll its
    /// `sync_file` readable, or wait for [`Event::FenceSignalled`] naming
    /// its id ([`Client::next_event`]); on a memfd, for every fence listed.
    ///
    /// Once the access is gone, fails and hands out nothing: with
    /// [`Error::Disconnected`] once the client has replaced the connection
    /// it was granted on (a reconnect after the broker went away, which
    /// released it with that connection; a hang-up not yet noticed by any
    /// call is not looked for here); with `UnknownAccess` ([`Error::Broker`])
    /// once the broker took it back (`AccessRevoked`): for an access held
    /// in the buffer's word, when its bit has left the word; for another,
    /// once the client has read the broker's `AccessRevoked` (every call
    /// that waits for the broker reads what has arrived, and
    /// [`Client::next_event`] returns it). The guard still ends as usual.
    pub fn bytes(&self) -> Result<Bytes<'_>> {
        let mapping = self
            .mapping
            .as_ref()
            .ok_or(Error::AccessMode("CPU reads"))?;
        self.still_held()?;
        self.start_own_sync()?;
        Ok(Bytes {
            mapping: mapping.read().unwrap_or_else(|p| p.into_inner()),
        })
    }

    /// The buffer's bytes for writing (CPU write accesses only). Fails
    /// once the access is gone, as [`AccessGuard::bytes`] does.
    pub fn bytes_mut(&mut self) -> Result<BytesMut<'_>> {
        let mapping = self
            .mapping
            .as_ref()
            .filter(|_| self.kind.is_write())
            .ok_or(Error::AccessMode("CPU writes"))?;
        self.still_held()?;
        self.start_own_sync()?;
        Ok(BytesMut {
            mapping: write_without_queueing(mapping),
        })
    }

    /// Whether the access still lives (see [`AccessGuard::bytes`]): the
    /// bytes of an access the broker released are another client's.
    fn still_held(&self) -> Result<()> {
        if self.client.conn.generation() != self.generation {
            return Err(Error::Disconnected);
        }
        let revoked = match &self.word_hold {
            // What its end checks: a bit of this epoch, of this kind.
            Some((word, hold)) => {
                let now = word.load();
                now.epoch() != hold.slot.epoch || !now.has(hold.slot.index, hold.write)
            }
            None => self.client.conn.revoked(self.generation, self.access),
        };
        match revoked {
            true => Err(Error::Broker(WireError::new(
                ErrorCode::UnknownAccess,
                "the broker revoked this access (AccessRevoked)",
            ))),
            false => Ok(()),
        }
    }

    /// The cache sync START a no-autofence client's access owes before
    /// its bytes are touched (see [`OwnSync`]).
    fn start_own_sync(&self) -> Result<()> {
        self.own_sync.as_ref().map_or(Ok(()), OwnSync::start)
    }

    /// Ends the access now; errors arrive later through
    /// [`Client::take_errors`] (the end is pipelined). Never waits for the
    /// broker: an end its socket has no room for is kept and sent as soon
    /// as it has, before anything sent after it. A failed cache sync END
    /// (no-autofence, see [`AccessGuard::bytes`]) is returned once the
    /// access is ended all the same.
    pub fn end(mut self) -> Result<()> {
        self.finish()
    }

    /// The cache sync END first (a no-autofence client's), then the end
    /// of the access: through the end word when the broker gave one and
    /// is not watching it (no message at all); otherwise with a pipelined
    /// `End`.
    fn finish(&mut self) -> Result<()> {
        self.ended = true;
        let synced = self.own_sync.as_ref().map_or(Ok(()), OwnSync::end);
        self.end_access()?;
        synced
    }

    fn end_access(&mut self) -> Result<()> {
        if let Some((word, hold)) = self.word_hold.take() {
            let ended = word.end(hold);
            if ended == WordEnd::HandedOff {
                // The waiter just woken is often put on this CPU (the
                // scheduler wakes affine, and on a one- or two-core board
                // there is little choice); the `WordEnded` below would wake
                // the broker too, and whichever the scheduler picks first
                // runs first. The waiter is the one a frame is late for:
                // let it have the CPU before the broker's bookkeeping. With
                // nothing else to run here, this returns at once.
                let _ = nix::sched::sched_yield();
            }
            return match ended {
                WordEnd::Silent | WordEnd::NotMine => Ok(()),
                // Contended: the word changed under every attempt (another
                // holder writing it without pause) and the access is still
                // held in it. No message can take a holder's bit out of the
                // word (an `End` needs an id the broker never gave it), so
                // the broker is told to look: if it arbitrates the buffer,
                // it settles, and a word that defeats its attempts too is
                // broken, which revokes what the word held.
                WordEnd::Tell | WordEnd::HandedOff | WordEnd::Contended => {
                    // On the word's own connection only: the buffer's id
                    // may name another buffer after a reconnect.
                    self.client.conn.send_on(
                        self.generation,
                        RequestBody::WordEnded {
                            buffer: self.buffer,
                        },
                        &[],
                        false,
                    )?;
                    Ok(())
                }
            };
        }
        if let Some((page, at)) = self.end_word.take() {
            match page.end(at) {
                ClientEnd::Silent => return Ok(()),
                ClientEnd::Tell | ClientEnd::NotMine => {}
            }
        }
        // Nothing once the connection is replaced: the access died with it
        // (see `generation`).
        self.client.conn.send_on(
            self.generation,
            RequestBody::End {
                access: self.access,
                fence_slot: None,
            },
            &[],
            false,
        )?;
        Ok(())
    }

    /// Ends a device access with the hardware's completion fence (a
    /// sync_file): the buffer stays fenced until it signals.
    ///
    /// A refusal (the fd is not a sync_file, the broker cannot keep a copy,
    /// the connection is gone) changes nothing: the access is still held,
    /// and the guard and the sync_file come back in the error. Ending the
    /// guard without its fence would let readers in before the device is
    /// done, so whoever gets it back decides: wait for the fence and
    /// [`AccessGuard::end`], or try again. One refusal is not the
    /// broker's: an answer that arrived unreadable (`ProtocolError`)
    /// leaves open whether the broker took the fence, and if it did, a
    /// retry is refused as already ended (`InvalidArgument`).
    pub fn end_with_fence(mut self, sync_file: OwnedFd) -> Result<(), FenceRefused> {
        if self.word_hold.is_some() {
            // Only CPU accesses live in the word; the guard ends it on drop.
            return Err(FenceRefused::new(
                Error::AccessMode("device accesses"),
                self,
                sync_file,
            ));
        }
        // Not `call`: a retry after a reconnect would send this
        // connection's access id on the next one.
        let answered = self
            .client
            .conn
            .send_on(
                self.generation,
                RequestBody::End {
                    access: self.access,
                    fence_slot: Some(0),
                },
                &[sync_file.as_fd()],
                true,
            )
            .and_then(|sent| {
                // The access died with its connection (see `generation`).
                let (id, generation) = sent.ok_or(Error::Disconnected)?;
                self.client.conn.wait_reply(id, generation)
            });
        match answered {
            Ok(_) => {
                self.ended = true;
                // The broker cleared the end word when it took the fence.
                self.end_word = None;
                Ok(())
            }
            Err(error) => Err(FenceRefused::new(error, self, sync_file)),
        }
    }
}

impl Drop for AccessGuard {
    fn drop(&mut self) {
        if !self.ended {
            let _ = self.finish();
        }
    }
}

#[cfg(feature = "tokio")]
mod nonblocking {
    //! `_async` twins of the calls that wait for the broker. The wait runs
    //! on tokio's blocking pool, so any runtime flavour works.

    use super::*;
    use std::sync::MutexGuard;

    /// The shared state of a begin running on tokio's blocking pool and the
    /// future waiting for it (see [`Buffer::begin_async`]): which request the
    /// begin waits on, and whether the future was dropped. Whichever of the two
    /// comes second, the request sent or the future dropped, sends the
    /// `Cancel`, so that exactly one goes out for each request, and none for a
    /// begin that has finished.
    #[derive(Debug, Default)]
    struct BeginCancel {
        state: Mutex<CancelState>,
    }

    #[derive(Debug, Default)]
    struct CancelState {
        /// The future was dropped: nobody waits for the begin's answer.
        cancelled: bool,
        /// The begin has its answer: there is nothing left to cancel.
        finished: bool,
        /// The request the begin waits on (id, connection generation).
        request: Option<(u64, u64)>,
    }

    /// The answer a begin gets that was cancelled before it was sent.
    fn cancelled_before_sent() -> Error {
        Error::Broker(WireError::new(
            ErrorCode::Cancelled,
            "the begin was cancelled before it was sent",
        ))
    }

    impl BeginCancel {
        fn state(&self) -> MutexGuard<'_, CancelState> {
            self.state.lock().unwrap_or_else(|p| p.into_inner())
        }

        /// The future is gone: cancels the request the begin waits on, if any
        /// (later ones are cancelled as they are sent).
        fn cancel(&self, conn: &Connection) {
            let request = {
                let mut state = self.state();
                state.cancelled = true;
                if state.finished {
                    return;
                }
                state.request
            };
            if let Some((id, generation)) = request {
                conn.cancel(generation, id);
            }
        }

        /// The begin returned: nothing to cancel any more.
        fn finish(&self) {
            self.state().finished = true;
        }

        /// Refuses what the begin would still do (send, reconnect) once
        /// its future is gone.
        fn still_wanted(&self) -> Result<()> {
            match self.state().cancelled {
                true => Err(cancelled_before_sent()),
                false => Ok(()),
            }
        }
    }

    /// A `BeginCancel` with the connection its cancels go to, as the blocking
    /// begin sees it.
    struct CancelHook<'a> {
        cancel: &'a Arc<BeginCancel>,
        conn: &'a Connection,
    }

    impl connection::SentHook for CancelHook<'_> {
        fn before(&self) -> Result<()> {
            self.cancel.still_wanted()
        }

        fn after(&self, (id, generation): (u64, u64)) {
            let cancelled = {
                let mut state = self.cancel.state();
                state.request = Some((id, generation));
                state.cancelled
            };
            // Dropped while this request went out: the drop did not know it.
            if cancelled {
                self.conn.cancel(generation, id);
            }
        }

        fn aside(&self) -> Option<Arc<dyn connection::SentHook + Send + Sync>> {
            Some(Arc::new(Cancelled(Arc::clone(self.cancel))))
        }
    }

    /// Whether a begin's future is still there, for a reconnect on a
    /// thread of its own (see [`connection::SentHook::aside`]).
    struct Cancelled(Arc<BeginCancel>);

    impl connection::SentHook for Cancelled {
        fn before(&self) -> Result<()> {
            self.0.still_wanted()
        }

        fn after(&self, _: (u64, u64)) {}
    }

    impl Client {
        pub async fn connect_async(
            path: std::path::PathBuf,
            options: ClientOptions,
        ) -> Result<Client> {
            tokio::task::spawn_blocking(move || Client::connect_with(path, options))
                .await
                .map_err(|e| Error::Task(e.to_string()))?
        }

        /// The blocking call on the blocking pool: it reconnects after a
        /// broker restart as the blocking one does, and if this future is
        /// dropped first, the buffer it got is dropped there, which frees
        /// it (no hold is left behind).
        pub async fn alloc_async(&self, request: AllocRequest) -> Result<Buffer> {
            let client = self.clone();
            tokio::task::spawn_blocking(move || client.alloc_with(request))
                .await
                .map_err(|e| Error::Task(e.to_string()))?
        }

        /// As [`Client::alloc_async`].
        pub async fn import_async(&self, token: &ShareToken) -> Result<Buffer> {
            let (client, token) = (self.clone(), *token);
            tokio::task::spawn_blocking(move || client.import(&token))
                .await
                .map_err(|e| Error::Task(e.to_string()))?
        }

        /// As [`Client::heaps`], on the blocking pool (it reconnects after
        /// a broker restart as the blocking one does).
        pub async fn heaps_async(&self) -> Result<Vec<HeapInfo>> {
            let client = self.clone();
            tokio::task::spawn_blocking(move || client.heaps())
                .await
                .map_err(|e| Error::Task(e.to_string()))?
        }

        /// As [`Client::adopt`], on the blocking pool. A refusal gives the
        /// fd back, as the blocking one does, also when the runtime shut
        /// down before the call ran (`Error::Task`); dropped, this future
        /// leaves the buffer it got to the blocking pool, where it is
        /// dropped (freed), and a refused fd is closed there.
        pub async fn adopt_async(
            &self,
            dmabuf: OwnedFd,
            name: Option<&str>,
        ) -> std::result::Result<Buffer, AdoptRefused> {
            let (client, name) = (self.clone(), name.map(str::to_owned));
            let kept = Arc::new(Mutex::new(Some(dmabuf)));
            let taken = Arc::clone(&kept);
            let task = tokio::task::spawn_blocking(move || {
                let dmabuf = lock(&taken).take()?;
                Some(client.adopt(dmabuf, name.as_deref()))
            });
            match task.await {
                Ok(Some(adopted)) => adopted,
                // The fd is still here: the call never ran.
                failed => match lock(&kept).take() {
                    Some(dmabuf) => Err(AdoptRefused {
                        error: Error::Task(task_failure(failed.err())),
                        dmabuf,
                    }),
                    // It ran and panicked with the fd: as the blocking
                    // call would have, on the caller's thread.
                    None => match failed {
                        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                        _ => unreachable_fd(),
                    },
                },
            }
        }

        /// As [`Client::next_event`], on the blocking pool. Events come
        /// in the order the broker sent them, also across futures
        /// dropped (a `select!` taking another branch) and other
        /// readers of the same client: the blocking-pool thread only
        /// waits until an event (or the news of a reconnect,
        /// `Error::Reconnected`) is there, and this future takes it off
        /// the queue in the poll that returns it. A future dropped
        /// before then has taken nothing, so nothing is lost or needs
        /// putting back (put back, it came after a later event another
        /// call had taken meanwhile). Dropped, its blocking-pool thread
        /// ends within 100 ms (a runtime shutting down waits for it). A
        /// reconnect it began runs on a thread of its own, which gives
        /// up at its next attempt, unless the new broker has answered
        /// the hello: the held buffers are then re-attached to the end
        /// (cut off, those re-attached so far would be released with the
        /// socket), within [`ClientOptions::reconnect`].
        pub async fn next_event_async(&self, timeout: Option<Duration>) -> Result<Option<Event>> {
            let deadline = timeout.and_then(connection::deadline_after);
            loop {
                if let Some(found) = self.conn.take_event() {
                    return found.map(|(event, _, _)| Some(event));
                }
                let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
                let wanted = Arc::new(AtomicBool::new(true));
                let on_drop = NotWanted(Arc::clone(&wanted));
                let client = self.clone();
                let task = tokio::task::spawn_blocking(move || {
                    // Looking every slice of its wait whether the future is
                    // still there: a wait for ever, its future dropped, would
                    // otherwise keep this thread (and the `Client` it holds,
                    // so the connection) until an event came, and a runtime
                    // shutting down waits for its threads.
                    let found = client.conn.wait_event_while(
                        left,
                        &StillWanted(wanted),
                        Some(EVENT_WAIT_SLICE),
                    );
                    #[cfg(test)]
                    if matches!(found, Ok(true)) {
                        client.conn.at_event_seam();
                    }
                    found
                });
                let found = task.await.map_err(|e| Error::Task(e.to_string()));
                drop(on_drop);
                if !found?? {
                    return Ok(None);
                }
                // Nothing there any more: another call took it first.
                // Waits again, within what is left of the timeout (a
                // zero one still reads once more).
            }
        }
    }

    /// How long a `next_event_async` waits on the blocking pool before it
    /// looks whether its future is still there.
    const EVENT_WAIT_SLICE: Duration = Duration::from_millis(100);

    /// Whether a `next_event_async`'s future is still there to take what
    /// its blocking-pool thread waits for.
    struct StillWanted(Arc<AtomicBool>);

    impl connection::SentHook for StillWanted {
        fn before(&self) -> Result<()> {
            if self.0.load(Ordering::Acquire) {
                Ok(())
            } else {
                Err(Error::Disconnected)
            }
        }

        fn after(&self, _: (u64, u64)) {}

        fn aside(&self) -> Option<Arc<dyn connection::SentHook + Send + Sync>> {
            Some(Arc::new(StillWanted(Arc::clone(&self.0))))
        }
    }

    /// Tells a `next_event_async`'s thread that its future is gone.
    struct NotWanted(Arc<AtomicBool>);

    impl Drop for NotWanted {
        fn drop(&mut self) {
            self.0.store(false, Ordering::Release);
        }
    }

    fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
        mutex.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Why a blocking-pool task gave no answer.
    fn task_failure(error: Option<tokio::task::JoinError>) -> String {
        error.map_or_else(
            || "the call did not run".to_owned(),
            |error| error.to_string(),
        )
    }

    /// A call that ran took its fd with it, and returned or panicked.
    fn unreachable_fd() -> ! {
        panic!("a blocking-pool call that ran neither returned nor panicked")
    }

    impl Buffer {
        /// As [`Buffer::export`], on the blocking pool (it reconnects
        /// after a broker restart as the blocking one does).
        pub async fn export_async(&self) -> Result<ShareToken> {
            let state = Arc::clone(&self.state);
            tokio::task::spawn_blocking(move || state.export())
                .await
                .map_err(|e| Error::Task(e.to_string()))?
        }

        /// As [`Buffer::info`], on the blocking pool.
        pub async fn info_async(&self) -> Result<BufferInfo> {
            let state = Arc::clone(&self.state);
            tokio::task::spawn_blocking(move || state.buffer_info())
                .await
                .map_err(|e| Error::Task(e.to_string()))?
        }

        /// As [`Buffer::begin_timeout`], or [`Buffer::begin`] with `None`.
        /// The wait runs on tokio's blocking pool.
        ///
        /// Dropping this future (a `timeout` expiring, a `select!` taking
        /// another branch) cancels the begin: the client sends `Cancel`,
        /// the broker takes the request out of the buffer's queue (and a
        /// hand-off planned for it out of the buffer's word) and answers
        /// it, and the blocking-pool thread returns at once, so a runtime
        /// shutting down does not wait for the buffer's holder. No access
        /// is left behind either: a grant that crossed the cancel is made
        /// into a guard on the blocking pool, with the begin's own share of
        /// the buffer, and dropped there, which ends it at once. (Made
        /// here instead, it would be lost with the future and never ended,
        /// and every other user of the buffer would wait for it until this
        /// client disconnects.) If the broker hangs up meanwhile, the
        /// thread does not reconnect for a begin nobody waits for; but a
        /// reconnect whose hello the new broker has answered re-attaches
        /// every held buffer to the end first (cut off, the buffers
        /// re-attached so far would be released with the socket), on a
        /// thread of its own, which the runtime does not wait for. Two
        /// cases keep the thread until the broker answers (give a
        /// `timeout` where that matters): a broker that predates `Cancel`
        /// (no feature bit 5 in its welcome) is not sent one, and a broker
        /// that has stopped reading its socket (wedged, with its queue
        /// full) cannot be sent one, since the drop never waits.
        pub async fn begin_async(
            &self,
            access: Access,
            timeout: Option<Duration>,
        ) -> Result<AccessGuard> {
            let ticket = self.state.ticket();
            // Granted in the word without waiting: nothing to cancel.
            if let Some(guard) = self.state.try_word_begin(access) {
                return Ok(guard.counted(ticket));
            }
            let state = Arc::clone(&self.state);
            let cancel = Arc::new(BeginCancel::default());
            let on_drop = CancelOnDrop {
                cancel: Arc::clone(&cancel),
                client: self.state.client.clone(),
            };
            let task = tokio::task::spawn_blocking(move || {
                let hook = CancelHook {
                    cancel: &cancel,
                    conn: &state.client.conn,
                };
                let begun = state.begin_with_broker(access, timeout, &hook);
                cancel.finish();
                begun.map(|guard| guard.counted(ticket))
            });
            let begun = task.await.map_err(|e| Error::Task(e.to_string()));
            drop(on_drop);
            begun?
        }
    }

    impl AccessGuard {
        /// As [`AccessGuard::end_with_fence`], on the blocking pool. A
        /// refusal gives the guard and the sync_file back, also when the
        /// runtime shut down before the call ran (`Error::Task`). Keep
        /// this future until it finishes: dropped, a refusal is dropped on
        /// the blocking pool, and the guard with it, which ends the access
        /// without its fence (readers may then come in before the device
        /// is done).
        pub async fn end_with_fence_async(self, sync_file: OwnedFd) -> Result<(), FenceRefused> {
            let kept = Arc::new(Mutex::new(Some((self, sync_file))));
            let taken = Arc::clone(&kept);
            let task = tokio::task::spawn_blocking(move || {
                let (guard, sync_file) = lock(&taken).take()?;
                Some(guard.end_with_fence(sync_file))
            });
            match task.await {
                Ok(Some(ended)) => ended,
                failed => match lock(&kept).take() {
                    Some((guard, sync_file)) => Err(FenceRefused::new(
                        Error::Task(task_failure(failed.err())),
                        guard,
                        sync_file,
                    )),
                    None => match failed {
                        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                        _ => unreachable_fd(),
                    },
                },
            }
        }
    }

    /// Cancels the begin when the future waiting for it is dropped before
    /// it finished (once it has finished, there is nothing to cancel).
    struct CancelOnDrop {
        cancel: Arc<BeginCancel>,
        client: Client,
    }

    impl Drop for CancelOnDrop {
        fn drop(&mut self) {
            self.cancel.cancel(&self.client.conn);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStringExt;

    #[test]
    fn a_program_name_that_is_not_utf8_is_still_a_name() {
        let name = program_name(Some(std::ffi::OsString::from_vec(b"cam\xffera".to_vec())));
        assert_eq!(name, "cam\u{fffd}era");
        assert_eq!(program_name(None), "");
    }

    /// The request the test's broker end `broker` receives next (id and
    /// body), waiting up to 5 s for it; `None` if none came.
    fn next_request(broker: &OwnedFd) -> Option<(u64, RequestBody)> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let mut fds = [PollFd::new(broker.as_fd(), PollFlags::POLLIN)];
        if poll(&mut fds, PollTimeout::from(5000u16)).ok()? == 0 {
            return None;
        }
        let received = dmabroker_ipc::fdpass::recv_message(broker.as_fd(), false).ok()?;
        let request = dmabroker_ipc::codec::decode_request(&received.bytes).ok()?;
        Some((request.head.id, request.body))
    }

    /// A client welcomed (with `features`) on one end of a socket pair,
    /// and the other end, where a test plays the broker.
    fn client_on_socketpair(features: u64) -> (Client, std::os::fd::OwnedFd) {
        use dmabroker_ipc::Welcome;
        use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

        let (ours, broker) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .expect("socketpair");
        let welcome = Welcome {
            version: PROTOCOL_VERSION,
            features,
            client_id: 1,
            autofence: true,
            default_heap: "memfd".into(),
            instance: "test".into(),
        };
        let client = Client {
            conn: ProgramHandle::new(Connection::for_tests(ours, welcome)),
        };
        (client, broker)
    }

    /// A holder writing the buffer's word without pause (every attempt
    /// at changing it fails, through the test hook): the begin goes by
    /// message, and the end, which cannot take the bit out, sends
    /// `WordEnded` so that the broker looks. Before, the client's loops on
    /// the word were unbounded (the hook went unasked, and they spun for
    /// as long as the other holder went on, in a guard's drop for the
    /// end): the begin was taken in the word and the end was silent.
    #[test]
    fn a_word_that_never_lets_a_change_stick_sends_the_begin_and_the_end_by_message() {
        use dmabroker_ipc::codec::encode_server_message;
        use dmabroker_ipc::{Grant, Reply, ServerMessage};

        let (client, broker) = client_on_socketpair(features::BUFFER_WORDS);
        let memfd = nix::sys::memfd::memfd_create(
            c"contended",
            nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
        )
        .expect("memfd");
        nix::unistd::ftruncate(&memfd, 8192).expect("ftruncate");
        let inode = nix::sys::stat::fstat(std::os::fd::AsRawFd::as_raw_fd(&memfd))
            .expect("fstat")
            .st_ino;
        let brokers_word = BufferWord::map(memfd.as_fd(), 4096).expect("word");
        let info = BufferInfo {
            id: 1,
            size: 4096,
            heap: "memfd".into(),
            name: String::new(),
            inode,
            secret: "dmab1-test".into(),
        };
        let serial = client.keep_hold(&info, 0).expect("recorded");
        let buffer = Buffer::new(
            client.clone(),
            info,
            memfd.try_clone().expect("dup"),
            serial,
        );
        let slot = FastSlot { index: 0, epoch: 0 };
        let mut hooked = BufferWord::map(memfd.as_fd(), 4096).expect("word");
        hooked.interfere(|_| true);
        buffer
            .state
            .word
            .set(Arc::new(hooked))
            .expect("not mapped yet");
        buffer.state.learn_slot(0, slot);

        let broker = std::thread::spawn(move || {
            let mut seen = Vec::new();
            let Some((id, begin)) = next_request(&broker) else {
                return (seen, brokers_word.load());
            };
            seen.push(begin);
            // Granted in the word, the word handed back: an end that
            // sticks is silent.
            brokers_word.take_over().expect("uncontended");
            assert!(brokers_word
                .grant(slot, WordAccess::Read)
                .expect("uncontended"));
            assert!(brokers_word
                .hand_back(brokers_word.load(), None)
                .expect("uncontended"));
            let grant = Grant {
                access: 0,
                buffer: 1,
                kind: Access::CpuRead,
                writer_lost: false,
                revoked: false,
                fences: Vec::new(),
                end_slot: None,
                word: Some(slot),
            };
            let answer = ServerMessage::Reply(Reply {
                id,
                fds: 0,
                result: Ok(ReplyBody::Granted(grant)),
            });
            let bytes = encode_server_message(&answer).expect("encode");
            dmabroker_ipc::fdpass::send_message(broker.as_fd(), &bytes, &[], false).expect("send");
            seen.extend(next_request(&broker).map(|(_, body)| body));
            (seen, brokers_word.load())
        });
        let guard = buffer.begin(Access::CpuRead);
        drop(guard);
        let (seen, word) = broker.join().expect("the test's broker");
        assert!(
            matches!(seen.first(), Some(RequestBody::Begin { .. })),
            "the begin was not sent: {seen:?}"
        );
        assert_eq!(seen.get(1), Some(&RequestBody::WordEnded { buffer: 1 }));
        assert!(word.has(0, false), "the bit is still in the word");
    }

    /// Events of one connection reach the program in the order the broker
    /// sent them, also across a `next_event_async` dropped (a `select!`
    /// taking another branch) while its blocking-pool thread has found
    /// one. That thread took the first event off the mailbox and put it
    /// back in front only once it saw its future gone: the next call's
    /// thread, reading meanwhile, took the second event and returned it
    /// first. The test holds the first thread there (`event_seam`).
    #[cfg(feature = "tokio")]
    #[test]
    fn events_found_for_a_dropped_async_wait_keep_their_order() {
        use dmabroker_ipc::codec::encode_server_message;
        use dmabroker_ipc::{EventMessage, ServerMessage};
        use std::future::Future;
        use std::task::Poll;

        let (client, broker) = client_on_socketpair(0);
        for fence in [1, 2] {
            let event = ServerMessage::Event(EventMessage {
                fds: 0,
                event: Event::FenceSignalled { fence },
            });
            let bytes = encode_server_message(&event).expect("encode");
            dmabroker_ipc::fdpass::send_message(broker.as_fd(), &bytes, &[], false).expect("send");
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let (reached_tx, reached) = std::sync::mpsc::channel();
        // Dropped, also by a failed assertion's unwinding, before the
        // runtime, whose drop waits for the held thread.
        let (release, held) = std::sync::mpsc::channel::<()>();
        *client.conn.event_seam.lock().expect("seam") = Some((reached_tx, held));
        let (first, second) = runtime.block_on(async {
            let mut dropped = Box::pin(client.next_event_async(None));
            std::future::poll_fn(|cx| {
                assert!(dropped.as_mut().poll(cx).is_pending(), "no thread waited");
                Poll::Ready(())
            })
            .await;
            reached
                .recv_timeout(Duration::from_secs(10))
                .expect("the dropped wait's thread found no event");
            drop(dropped);
            let first = client.next_event_async(Some(Duration::from_secs(5))).await;
            drop(release);
            let second = client.next_event_async(Some(Duration::from_secs(5))).await;
            (first, second)
        });
        assert_eq!(
            (first.expect("no error"), second.expect("no error")),
            (
                Some(Event::FenceSignalled { fence: 1 }),
                Some(Event::FenceSignalled { fence: 2 })
            ),
            "the events came out of order"
        );
    }

    #[test]
    fn only_a_timeout_without_a_deadline_is_sent_as_no_limit() {
        let limit = |t: Duration| wire_timeout(Some(t), connection::deadline_after(t));
        assert_eq!(limit(Duration::MAX), None);
        assert_eq!(limit(Duration::from_secs(50 * 24 * 3600)), Some(u32::MAX));
        assert_eq!(
            limit(Duration::from_millis(u64::from(u32::MAX) + 1)),
            Some(u32::MAX)
        );
        assert_eq!(limit(Duration::from_nanos(1)), Some(1), "rounded up");
        assert_eq!(limit(Duration::ZERO), Some(0));
        assert_eq!(wire_timeout(None, None), None);
    }
}
