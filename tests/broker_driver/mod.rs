//! An in-process broker driven by sequences of requests, shared by the
//! proptest `tests/broker_sequences.rs` and the fuzz target
//! `fuzz/fuzz_targets/broker_requests.rs` (which includes this file).
//!
//! It is the real `State` behind the real `Broker`, with real `Outbox`es
//! on socketpairs, fed encoded requests as a connection task would feed
//! them; only the clock is tokio's paused one, so timeouts and hold limits
//! fire when a sequence says time passes. After every step the broker's
//! books must balance (see [`check_invariants`]).

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use dmabroker_daemon::broker::{Broker, DaemonLimits, Disposition, State};
use dmabroker_daemon::heaps::{HeapConfig, HeapRegistry};
use dmabroker_daemon::outbox::Outbox;
use dmabroker_daemon::{identity, reactor};
use dmabroker_ipc::bufferword::{BufferWord, FastSlot, WordAccess, WordEnd, WordHold};
use dmabroker_ipc::codec::{decode_server_message, encode_request};
use dmabroker_ipc::endwords::{BrokerView, ClientEnd, EndSlot, EndWords};
use dmabroker_ipc::fdpass::{recv_message_into, RecvError};
use dmabroker_ipc::{
    Access, ClientId, Hello, ReplyBody, Request, RequestBody, RequestHead, ServerMessage,
    FLAG_NO_REPLY, MAX_MESSAGE_SIZE, PROTOCOL_VERSION,
};
use dmabroker_policy::Policy;
use nix::sys::socket::{setsockopt, socketpair, sockopt, AddressFamily, SockFlag, SockType};

/// Most connections a sequence may open: enough for every sharing pattern.
pub const MAX_CLIENTS: usize = 8;

/// A small policy that every limit can be hit under within a short sequence.
const TIGHT_POLICY: &str = r#"
[default]
max_buffer_size = "64K"
max_total_bytes = "128K"
max_buffers = 4
max_queued_requests = 2
max_unread_replies = 4
write_hold_limit = "20ms"
"#;

/// One step of a sequence. A client is picked among the live ones by
/// index. A buffer or access reference below 128 names the client's own
/// (its n-th buffer or access, modulo how many it has), so that sequences
/// mostly act on things that exist; from 128 up it is a raw id (`r - 128`),
/// usually someone else's or nobody's.
#[derive(Clone, Debug)]
pub enum Op {
    /// A new connection, with or without its hello.
    Connect { hello: bool },
    /// The client hangs up, as on SIGKILL.
    Disconnect { client: u8 },
    /// The client stops reading its replies (or starts again).
    ToggleDeaf { client: u8 },
    Request {
        client: u8,
        body: Body,
        no_reply: bool,
    },
    /// Any bytes with `fds` fds of /dev/null attached.
    Raw { client: u8, bytes: Vec<u8>, fds: u8 },
    /// Time passes: begin timeouts and write hold limits fire.
    Wait { ms: u16 },
    /// The client ends one of its accesses as the client crate does:
    /// through its end word when the grant named one (a message only if the
    /// word says watched, or is not its own any more), else by message.
    EndThroughWord { client: u8, access: u8 },
    /// The client writes garbage (`kind` picks which) into the word of one
    /// of its accesses, as a buggy or hostile client could.
    Scribble { client: u8, access: u8, kind: u8 },
    /// The client begins an access in one of its buffers' words, as the
    /// client crate does (by message when the word refuses: `Begin`).
    WordBegin { client: u8, buffer: u8, access: u8 },
    /// The client ends one of the accesses it holds in a buffer word (and
    /// sends `WordEnded` when the word says the broker arbitrates).
    WordEnd { client: u8, hold: u8 },
    /// The client writes `value` into one of its buffers' words.
    WordScribble { client: u8, buffer: u8, value: u64 },
    /// As `WordEnd`, but its `WordEnded` message (if it owes one) is still
    /// in flight: it reaches the broker after the next step's own op.
    WordEndLate { client: u8, hold: u8 },
}

#[derive(Clone, Debug)]
pub enum Body {
    Hello {
        version_ok: bool,
        autofence: Option<bool>,
        buffer_words: bool,
    },
    ListHeaps,
    /// `heap`: 0 the default, 1 memfd, 2 a heap this machine lacks, else nonsense.
    Alloc {
        size: u64,
        heap: u8,
    },
    Free {
        buffer: u8,
    },
    Export {
        buffer: u8,
    },
    /// A token seen in an earlier reply (0 the newest), or from 128 up one
    /// nobody issued.
    Import {
        token: u8,
    },
    Info {
        buffer: u8,
    },
    /// Adopt a memfd: not a dma-buf, so refused.
    Adopt,
    Begin {
        buffer: u8,
        access: u8,
        timeout_ms: Option<u16>,
    },
    /// `with_fence` hands over /dev/null as the "sync_file".
    End {
        access: u8,
        with_fence: bool,
    },
    Reattach {
        buffer: u8,
    },
    /// Withdraws a begin: below 128 the client's own begin still waiting
    /// for its answer (its n-th, oldest first; or, with none, its latest
    /// request of any kind), from 128 up a raw request id.
    Cancel {
        begin: u8,
    },
}

/// Our end of one connection.
struct Conn {
    id: ClientId,
    socket: Option<OwnedFd>,
    deaf: bool,
    /// The end-word page from the welcome, and the words grants named.
    page: Option<EndWords>,
    words: HashMap<u64, EndSlot>,
    /// Buffer words of the memfd buffers it got, and its slot in each.
    buffer_words: HashMap<u64, BufferWord>,
    slots: HashMap<u64, FastSlot>,
    /// Accesses it holds in buffer words: (buffer, hold).
    in_words: Vec<(u64, WordHold)>,
    /// Begins answered `Planned`, by request id: (buffer, slot, access).
    plans: HashMap<u64, (u64, FastSlot, WordAccess)>,
    /// What each outstanding begin asked for, by request id.
    begins: HashMap<u64, (u64, Access)>,
    /// Begins answered by a hand-off in the word, as the client crate's
    /// `abandon` remembers them: a stale `Planned` for one is dropped, and
    /// any other answer is a broker bug.
    abandoned: std::collections::HashSet<u64>,
}

pub struct Driver {
    /// Shared so that a step can stay inside it (`enter`) while `self`
    /// changes: the broker spawns its timers on the current runtime.
    runtime: Arc<tokio::runtime::Runtime>,
    broker: Arc<Broker>,
    conns: Vec<Conn>,
    tokens: Vec<String>,
    next_request: u64,
    /// Reused for every read: a fresh 64 KiB buffer per read would dominate
    /// a fuzzing run.
    scratch: Vec<u8>,
    /// Clients the broker cut off (queue overflow) rather than they it.
    pub cut_off: u64,
    /// Accesses begun in a buffer word, with no message.
    pub word_begins: u64,
    /// Words (client, slot) a client scribbled on: a blind write can end
    /// an access silently while someone waits (the waiter then waits until
    /// the broker next looks, as it would for a client that never ended),
    /// so the no-lost-wake-up check holds only for accesses in other words.
    /// By slot, not access: a client may scribble on a word its grant
    /// named long after the broker gave that word to a later grant.
    scribbled: std::collections::HashSet<(ClientId, u16)>,
    /// Buffers whose words someone scribbled on: the broker may have
    /// believed a blind write, so the word checks skip them.
    scribbled_words: std::collections::HashSet<u64>,
    /// `WordEnded` messages in flight (client, buffer): delivered after the
    /// next step's op (by client id: the op may change which live slot is
    /// whose).
    in_flight: Vec<(ClientId, u64)>,
}

fn heaps() -> HeapRegistry {
    HeapRegistry::discover(&HeapConfig {
        dma_heap_dir: PathBuf::from("/nonexistent"),
        udmabuf_path: PathBuf::from("/nonexistent"),
        order: None,
        enable_memfd: true,
    })
}

fn dev_null() -> OwnedFd {
    std::fs::File::open("/dev/null")
        .expect("open /dev/null")
        .into()
}

fn access_kind(n: u8) -> Access {
    match n % 5 {
        0 => Access::CpuRead,
        1 => Access::CpuWrite,
        2 => Access::CpuReadWrite,
        3 => Access::DeviceRead,
        _ => Access::DeviceWrite,
    }
}

impl Driver {
    /// A broker with the built-in policy, or a tight one, and two clients
    /// that have said hello.
    pub fn new(tight: bool) -> Driver {
        let policy = if tight {
            Policy::parse_str(TIGHT_POLICY, Path::new("tight.toml")).expect("tight policy")
        } else {
            Policy::builtin()
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .map(Arc::new)
            .expect("tokio runtime");
        let state = State::new(heaps(), policy, DaemonLimits::default());
        let mut driver = Driver {
            runtime,
            broker: Broker::new(state),
            conns: Vec::new(),
            tokens: Vec::new(),
            next_request: 1,
            scratch: vec![0; MAX_MESSAGE_SIZE],
            cut_off: 0,
            word_begins: 0,
            scribbled: std::collections::HashSet::new(),
            scribbled_words: std::collections::HashSet::new(),
            in_flight: Vec::new(),
        };
        let runtime = Arc::clone(&driver.runtime);
        let _entered = runtime.enter();
        for _ in 0..2 {
            driver.connect(true);
        }
        driver
    }

    /// The broker's state, for checks beyond the invariants (the fuzz
    /// target, which includes this file too, needs none).
    #[allow(dead_code)]
    pub fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.broker.lock()
    }

    /// Runs one step, then lets the broker's tasks run, reads what it sent
    /// and checks the books.
    pub fn step(&mut self, op: &Op) -> Result<(), String> {
        let runtime = Arc::clone(&self.runtime);
        let _entered = runtime.enter();
        let arriving = std::mem::take(&mut self.in_flight);
        match op {
            Op::Connect { hello } => self.connect(*hello),
            Op::Disconnect { client } => self.hang_up(*client as usize),
            Op::ToggleDeaf { client } => {
                if let Some(conn) = self.conn_mut(*client as usize) {
                    conn.deaf = !conn.deaf;
                }
            }
            Op::Request {
                client,
                body,
                no_reply,
            } => self.request(*client as usize, body.clone(), *no_reply),
            Op::Raw { client, bytes, fds } => self.raw(*client as usize, bytes, *fds),
            Op::Wait { ms } => {
                let sleep = tokio::time::sleep(Duration::from_millis((*ms).into()));
                self.runtime.block_on(sleep);
            }
            Op::EndThroughWord { client, access } => {
                self.end_through_word(*client as usize, *access)
            }
            Op::Scribble {
                client,
                access,
                kind,
            } => self.scribble(*client as usize, *access, *kind),
            Op::WordBegin {
                client,
                buffer,
                access,
            } => self.word_begin(*client as usize, *buffer, *access),
            Op::WordEnd { client, hold } => self.word_end(*client as usize, *hold, false),
            Op::WordEndLate { client, hold } => self.word_end(*client as usize, *hold, true),
            Op::WordScribble {
                client,
                buffer,
                value,
            } => self.word_scribble(*client as usize, *buffer, *value),
        }
        // Messages in flight since the previous step arrive after this
        // step's own.
        self.deliver_in_flight(arriving);
        self.settle();
        self.read_replies()?;
        self.resolve_plans();
        let state = self.broker.lock();
        check_invariants(&state)?;
        check_no_end_unheard(&state, &self.scribbled)?;
        let mut unsettled = self.scribbled_words.clone();
        unsettled.extend(self.in_flight.iter().map(|(_, buffer)| *buffer));
        check_words(&state, &unsettled)
    }

    fn word_begin(&mut self, slot: usize, buffer: u8, access: u8) {
        self.ensure_a_client();
        let Some(client) = self.conn_mut(slot).map(|c| c.id) else {
            return;
        };
        let buffer = self.buffer_ref(client, buffer);
        let kind = access_kind(access);
        let taken = self.conn_mut(slot).and_then(|conn| {
            let word_kind = WordAccess::of(kind)?;
            let at = *conn.slots.get(&buffer)?;
            let hold = conn.buffer_words.get(&buffer)?.try_begin(at, word_kind)?;
            conn.in_words.push((buffer, hold));
            Some(())
        });
        if taken.is_some() {
            self.word_begins += 1;
        } else {
            let body = RequestBody::Begin {
                buffer,
                access: kind,
                timeout_ms: None,
            };
            self.send_body(slot, body, Vec::new(), false);
        }
    }

    fn word_end(&mut self, slot: usize, hold: u8, late: bool) {
        let Some(conn) = self.conn_mut(slot) else {
            return;
        };
        if conn.in_words.is_empty() {
            return;
        }
        let (buffer, hold) = conn
            .in_words
            .remove(usize::from(hold) % conn.in_words.len());
        let ended = conn.buffer_words.get(&buffer).map(|w| w.end(hold));
        if matches!(ended, Some(WordEnd::Tell | WordEnd::HandedOff)) {
            if late {
                let client = self.conn_mut(slot).map(|c| c.id);
                self.in_flight.extend(client.map(|c| (c, buffer)));
            } else {
                self.send_body(slot, RequestBody::WordEnded { buffer }, Vec::new(), true);
            }
        }
    }

    /// Sends messages that were in flight, from clients still connected.
    fn deliver_in_flight(&mut self, messages: Vec<(ClientId, u64)>) {
        for (client, buffer) in messages {
            let slot = self
                .conns
                .iter()
                .filter(|c| c.socket.is_some())
                .position(|c| c.id == client);
            if let Some(slot) = slot {
                self.send_body(slot, RequestBody::WordEnded { buffer }, Vec::new(), true);
            }
        }
    }

    fn word_scribble(&mut self, slot: usize, buffer: u8, value: u64) {
        let Some(client) = self.conn_mut(slot).map(|c| c.id) else {
            return;
        };
        let buffer = self.buffer_ref(client, buffer);
        if let Some(word) = self
            .conn_mut(slot)
            .and_then(|c| c.buffer_words.get(&buffer))
        {
            word.scribble(value);
            self.scribbled_words.insert(buffer);
        }
    }

    /// A client whose begin was answered `Planned` looks at the word, as
    /// the client crate does when woken: handed over (it holds the access
    /// now), cancelled (a message follows), or still planned.
    fn resolve_plans(&mut self) {
        for conn in self.conns.iter_mut().filter(|c| c.socket.is_some()) {
            let mut settled = Vec::new();
            for (id, (buffer, at, kind)) in &conn.plans {
                let Some(word) = conn.buffer_words.get(buffer).map(BufferWord::load) else {
                    settled.push(*id);
                    continue;
                };
                if word.next() == Some((at.index, *kind)) {
                    continue;
                }
                settled.push(*id);
                if word.epoch() == at.epoch && word.holds(at.index) {
                    conn.in_words.push((
                        *buffer,
                        WordHold {
                            slot: *at,
                            write: kind.is_write(),
                        },
                    ));
                    conn.begins.remove(id);
                    conn.abandoned.insert(*id);
                }
            }
            for id in settled {
                conn.plans.remove(&id);
            }
        }
    }

    /// A sequence never runs dry: when everyone has left, a new client
    /// (with its hello) turns up for the next request.
    fn ensure_a_client(&mut self) {
        if self.conns.iter().all(|c| c.socket.is_none()) {
            self.connect(true);
        }
    }

    /// The `n`-th live connection (modulo how many there are).
    fn conn_mut(&mut self, n: usize) -> Option<&mut Conn> {
        let live = self.conns.iter().filter(|c| c.socket.is_some()).count();
        if live == 0 {
            return None;
        }
        self.conns
            .iter_mut()
            .filter(|c| c.socket.is_some())
            .nth(n % live)
    }

    fn connect(&mut self, hello: bool) {
        if self.conns.iter().filter(|c| c.socket.is_some()).count() >= MAX_CLIENTS {
            return;
        }
        let flags = SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK;
        let (ours, theirs) =
            socketpair(AddressFamily::Unix, SockType::SeqPacket, None, flags).expect("socketpair");
        // A small send buffer, so that a client that stops reading fills
        // it, and then its queue, within a few replies.
        let _ = setsockopt(&theirs, sockopt::SndBuf, &4096);
        let peer = identity::peer_of(theirs.as_fd()).expect("peer of a socketpair");
        let interest = tokio::io::Interest::READABLE | tokio::io::Interest::WRITABLE;
        let socket = Arc::new(reactor::register(theirs, interest).expect("register"));
        let outbox = Arc::new(Outbox::new(socket, 256));
        let id = self
            .broker
            .with(|s| s.connect(peer, Arc::clone(&outbox)))
            .expect("a client id");
        self.runtime.spawn(outbox.run_writer());
        // Two connections in three use buffer words, so that sequences mix
        // both kinds of client on the same buffers.
        let buffer_words = !self.conns.len().is_multiple_of(3);
        self.conns.push(Conn {
            id,
            socket: Some(ours),
            deaf: false,
            page: None,
            words: HashMap::new(),
            buffer_words: HashMap::new(),
            slots: HashMap::new(),
            in_words: Vec::new(),
            plans: HashMap::new(),
            begins: HashMap::new(),
            abandoned: std::collections::HashSet::new(),
        });
        if hello {
            let hello = Body::Hello {
                version_ok: true,
                autofence: None,
                buffer_words,
            };
            let newest = self.conns.iter().filter(|c| c.socket.is_some()).count() - 1;
            self.request(newest, hello, false);
        }
    }

    /// See [`Op`] for what a reference names.
    fn resolve(&self, reference: u8, own: impl Fn(&State) -> Vec<u64>) -> u64 {
        if reference >= 128 {
            return u64::from(reference - 128);
        }
        let own = own(&self.broker.lock());
        match own.len() {
            0 => u64::from(reference),
            n => own[usize::from(reference) % n],
        }
    }

    /// Newest first (older tokens more often name freed buffers); from 128
    /// up, or before any export, a well-formed token nobody issued.
    fn token_ref(&self, reference: u8) -> String {
        match self.tokens.len() {
            n if n > 0 && reference < 128 => {
                self.tokens[n - 1 - usize::from(reference) % n].clone()
            }
            _ => format!("dmab1-{reference:032x}"),
        }
    }

    fn buffer_ref(&self, client: ClientId, reference: u8) -> u64 {
        self.resolve(reference, |state| {
            state
                .clients
                .get(&client)
                .map(|c| c.buffers.iter().copied().collect())
                .unwrap_or_default()
        })
    }

    fn access_ref(&self, client: ClientId, reference: u8) -> u64 {
        self.resolve(reference, |state| {
            let mut own: Vec<u64> = state
                .accesses
                .iter()
                .filter(|(_, a)| a.client == client)
                .map(|(id, _)| *id)
                .collect();
            own.sort_unstable();
            own
        })
    }

    /// See [`Body::Cancel`].
    fn begin_ref(&self, client: ClientId, reference: u8) -> u64 {
        if reference >= 128 {
            return u64::from(reference - 128);
        }
        let Some(conn) = self.conns.iter().find(|c| c.id == client) else {
            return 0;
        };
        let mut waiting: Vec<u64> = conn.begins.keys().copied().collect();
        waiting.sort_unstable();
        match waiting.len() {
            0 => self.next_request.saturating_sub(1),
            n => waiting[usize::from(reference) % n],
        }
    }

    /// What the connection task does when the client hangs up or must go.
    fn hang_up(&mut self, slot: usize) {
        let Some(conn) = self.conn_mut(slot) else {
            return;
        };
        if conn.socket.take().is_some() {
            let id = conn.id;
            self.broker.with(|s| s.disconnect(id));
        }
    }

    fn encode_body(&self, client: ClientId, body: Body) -> (RequestBody, Vec<OwnedFd>) {
        let fds = Vec::new();
        let request = match body {
            Body::Hello {
                version_ok,
                autofence,
                buffer_words,
            } => RequestBody::Hello(Hello {
                version: if version_ok {
                    PROTOCOL_VERSION
                } else {
                    PROTOCOL_VERSION + 1
                },
                features: if buffer_words {
                    dmabroker_ipc::features::ALL
                } else {
                    dmabroker_ipc::features::ALL & !dmabroker_ipc::features::BUFFER_WORDS
                },
                autofence,
                client_name: "driver".into(),
            }),
            Body::ListHeaps => RequestBody::ListHeaps,
            Body::Alloc { size, heap } => RequestBody::Alloc {
                size,
                heap: match heap % 4 {
                    0 => None,
                    1 => Some("memfd".into()),
                    2 => Some("system".into()),
                    _ => Some("\u{0}nonsense".into()),
                },
                name: Some("seq".into()),
            },
            Body::Free { buffer } => RequestBody::Free {
                buffer: self.buffer_ref(client, buffer),
            },
            Body::Export { buffer } => RequestBody::Export {
                buffer: self.buffer_ref(client, buffer),
            },
            Body::Import { token } => RequestBody::Import {
                token: self.token_ref(token),
            },
            Body::Info { buffer } => RequestBody::Info {
                buffer: self.buffer_ref(client, buffer),
            },
            Body::Adopt => {
                let memfd = nix::sys::memfd::memfd_create(
                    c"adopt",
                    nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
                )
                .expect("memfd");
                return (RequestBody::Adopt { name: None }, vec![memfd]);
            }
            Body::Begin {
                buffer,
                access,
                timeout_ms,
            } => RequestBody::Begin {
                buffer: self.buffer_ref(client, buffer),
                access: access_kind(access),
                timeout_ms: timeout_ms.map(u32::from),
            },
            Body::End { access, with_fence } => {
                let request = RequestBody::End {
                    access: self.access_ref(client, access),
                    fence_slot: with_fence.then_some(0),
                };
                let fds = if with_fence { vec![dev_null()] } else { fds };
                return (request, fds);
            }
            Body::Reattach { buffer } => RequestBody::Reattach {
                buffer: self.buffer_ref(client, buffer),
                secret: "not-a-secret".into(),
            },
            Body::Cancel { begin } => RequestBody::Cancel {
                request: self.begin_ref(client, begin),
            },
        };
        (request, fds)
    }

    fn request(&mut self, slot: usize, body: Body, no_reply: bool) {
        self.ensure_a_client();
        let Some(client) = self.conn_mut(slot).map(|c| c.id) else {
            return;
        };
        let (body, fds) = self.encode_body(client, body);
        self.send_body(slot, body, fds, no_reply);
    }

    fn send_body(&mut self, slot: usize, body: RequestBody, fds: Vec<OwnedFd>, no_reply: bool) {
        let id = self.next_request;
        self.next_request += 1;
        if let (RequestBody::Begin { buffer, access, .. }, Some(conn)) =
            (&body, self.conn_mut(slot))
        {
            conn.begins.insert(id, (*buffer, *access));
        }
        let request = Request {
            head: RequestHead {
                id,
                fds: fds.len() as u8,
                flags: if no_reply { FLAG_NO_REPLY } else { 0 },
            },
            body,
        };
        let bytes = encode_request(&request).expect("encode a request");
        self.deliver(slot, &bytes, fds);
    }

    /// The word a grant named for the `reference`d access of this client.
    fn word_of(&mut self, slot: usize, reference: u8) -> Option<(u64, EndSlot)> {
        let client = self.conn_mut(slot)?.id;
        let access = self.access_ref(client, reference);
        let at = *self.conn_mut(slot)?.words.get(&access)?;
        Some((access, at))
    }

    fn end_through_word(&mut self, slot: usize, reference: u8) {
        self.ensure_a_client();
        let Some(client) = self.conn_mut(slot).map(|c| c.id) else {
            return;
        };
        let access = self.access_ref(client, reference);
        let ended = self.word_of(slot, reference).and_then(|(_, at)| {
            let conn = self.conn_mut(slot)?;
            conn.words.remove(&access);
            Some(conn.page.as_ref()?.end(at))
        });
        if ended != Some(ClientEnd::Silent) {
            let end = RequestBody::End {
                access,
                fence_slot: None,
            };
            self.send_body(slot, end, Vec::new(), true);
        }
    }

    fn scribble(&mut self, slot: usize, reference: u8, kind: u8) {
        let Some((_, at)) = self.word_of(slot, reference) else {
            return;
        };
        if let Some(client) = self.conn_mut(slot).map(|c| c.id) {
            self.scribbled.insert((client, at.slot));
        }
        let generation = at.generation;
        let garbage = match kind % 5 {
            0 => 0,
            1 => u64::MAX,
            // "ended" with the wrong generation, and with the right one but
            // a state that does not exist.
            2 => (generation.wrapping_add(1) << 3) | 2,
            3 => (generation << 3) | 3,
            // A genuine silent end, written blindly instead of by CAS.
            _ => (generation << 3) | 2,
        };
        if let Some(page) = self.conn_mut(slot).and_then(|c| c.page.as_ref()) {
            page.scribble(at.slot, garbage);
        }
    }

    fn raw(&mut self, slot: usize, bytes: &[u8], fds: u8) {
        self.ensure_a_client();
        let fds = (0..fds % 5).map(|_| dev_null()).collect();
        self.deliver(slot, bytes, fds);
    }

    /// Hands a datagram to the broker exactly as the connection task does.
    fn deliver(&mut self, slot: usize, bytes: &[u8], fds: Vec<OwnedFd>) {
        let Some(conn) = self.conn_mut(slot) else {
            return;
        };
        if conn.socket.is_none() {
            return;
        }
        let id = conn.id;
        let disposition = self.broker.with(|s| s.handle_message(id, bytes, fds));
        if disposition == Disposition::Disconnect {
            self.hang_up(slot);
        }
    }

    /// Lets the outboxes' writer tasks and any expired timers run.
    fn settle(&mut self) {
        self.runtime.block_on(async {
            for _ in 0..4 {
                tokio::task::yield_now().await;
            }
        });
    }

    /// Reads everything the broker sent to clients that still read. Every
    /// message must decode; tokens are kept for later imports. A hang-up
    /// from the broker's side (a client whose queue overflowed) is handled
    /// as the connection task would.
    fn read_replies(&mut self) -> Result<(), String> {
        let mut hung_up = Vec::new();
        for (slot, conn) in self.conns.iter_mut().enumerate() {
            let Some(socket) = conn.socket.as_ref().filter(|_| !conn.deaf) else {
                continue;
            };
            let mut heard = Heard {
                tokens: &mut self.tokens,
                page: &mut conn.page,
                words: &mut conn.words,
                buffer_words: &mut conn.buffer_words,
                slots: &mut conn.slots,
                in_words: &mut conn.in_words,
                plans: &mut conn.plans,
                begins: &mut conn.begins,
                abandoned: &conn.abandoned,
            };
            if !drain(socket.as_fd(), &mut self.scratch, &mut heard)? {
                hung_up.push(slot);
            }
        }
        for slot in hung_up {
            self.cut_off += 1;
            self.hang_up(slot);
        }
        Ok(())
    }

    /// Every client hangs up; afterwards the broker must hold nothing.
    pub fn finish(&mut self) -> Result<(), String> {
        let runtime = Arc::clone(&self.runtime);
        let _entered = runtime.enter();
        let arriving = std::mem::take(&mut self.in_flight);
        self.deliver_in_flight(arriving);
        for slot in 0..self.conns.len() {
            self.hang_up(slot);
        }
        self.settle();
        let state = self.broker.lock();
        check_invariants(&state)?;
        if !state.buffers.is_empty()
            || !state.clients.is_empty()
            || !state.accesses.is_empty()
            || state.task_count() != 0
        {
            return Err(format!(
                "after every client left: {} buffers, {} clients, {} accesses, {} tasks remain",
                state.buffers.len(),
                state.clients.len(),
                state.accesses.len(),
                state.task_count()
            ));
        }
        drop(state);
        // Timers and waits belong to accesses and waiters; with those gone
        // none may still sleep (a begin's timeout may be 49 days away).
        self.settle();
        let alive = self.runtime.metrics().num_alive_tasks();
        if alive != 0 {
            return Err(format!(
                "after every client left: {alive} tasks still alive"
            ));
        }
        Ok(())
    }
}

/// What a client keeps from the broker's messages.
struct Heard<'a> {
    tokens: &'a mut Vec<String>,
    page: &'a mut Option<EndWords>,
    words: &'a mut HashMap<u64, EndSlot>,
    buffer_words: &'a mut HashMap<u64, BufferWord>,
    slots: &'a mut HashMap<u64, FastSlot>,
    in_words: &'a mut Vec<(u64, WordHold)>,
    plans: &'a mut HashMap<u64, (u64, FastSlot, WordAccess)>,
    begins: &'a mut HashMap<u64, (u64, Access)>,
    abandoned: &'a std::collections::HashSet<u64>,
}

/// Reads all queued messages; `Ok(false)` when the broker hung up.
fn drain(socket: BorrowedFd<'_>, buf: &mut [u8], heard: &mut Heard<'_>) -> Result<bool, String> {
    loop {
        let (len, fds) = match recv_message_into(socket, buf, true) {
            Ok(received) => received,
            Err(RecvError::Os(nix::errno::Errno::EAGAIN)) => return Ok(true),
            Err(RecvError::Closed) => return Ok(false),
            Err(err) => return Err(format!("reading the broker's reply: {err}")),
        };
        let message = decode_server_message(&buf[..len])
            .map_err(|e| format!("the broker sent an undecodable message: {e}"))?;
        let declared = match &message {
            ServerMessage::Reply(reply) => reply.fds,
            ServerMessage::Event(event) => event.fds,
        };
        if usize::from(declared) != fds.len() {
            return Err(format!(
                "a message declares {declared} fds but carries {}",
                fds.len()
            ));
        }
        if let ServerMessage::Reply(reply) = message {
            if heard.abandoned.contains(&reply.id) {
                // A stale plan, or the broker not finding the waiter's bit
                // (it had ended already): the client drops both. A grant
                // would be an access nobody ends.
                let dropped = match &reply.result {
                    Ok(ReplyBody::Planned { .. }) => true,
                    Err(err) => err.code == dmabroker_ipc::ErrorCode::Busy,
                    Ok(_) => false,
                };
                if dropped {
                    continue;
                }
                return Err(format!(
                    "request {} was handed its access in the word, then answered {:?}",
                    reply.id, reply.result
                ));
            }
            let begin = heard.begins.get(&reply.id).copied();
            if !matches!(reply.result, Ok(ReplyBody::Planned { .. })) {
                heard.plans.remove(&reply.id);
                heard.begins.remove(&reply.id);
            }
            match reply.result {
                Ok(ReplyBody::Buffer(info)) if info.heap == "memfd" => {
                    if let Some(fd) = fds.first() {
                        let word = BufferWord::map(fd.as_fd(), info.size)
                            .map_err(|e| format!("cannot map a buffer word: {e}"))?;
                        heard.buffer_words.insert(info.id, word);
                    }
                }
                Ok(ReplyBody::Planned { word }) => {
                    let Some((buffer, kind)) = begin else {
                        return Err(format!("`Planned` for request {}, not a begin", reply.id));
                    };
                    let kind = WordAccess::of(kind)
                        .ok_or_else(|| format!("`Planned` for a device access: {kind:?}"))?;
                    heard.slots.insert(buffer, word);
                    heard.plans.insert(reply.id, (buffer, word, kind));
                }
                Ok(ReplyBody::Exported { token }) => heard.tokens.push(token),
                Ok(ReplyBody::Welcome(_)) => {
                    if let Some(fd) = fds.first() {
                        let page = EndWords::map(fd.as_fd())
                            .map_err(|e| format!("cannot map the end-word page: {e}"))?;
                        *heard.page = Some(page);
                    }
                }
                Ok(ReplyBody::Granted(grant)) => {
                    if let Some(at) = grant.end_slot {
                        heard.words.insert(grant.access, at);
                    }
                    if let Some(at) = grant.word {
                        heard.slots.insert(grant.buffer, at);
                        heard.in_words.push((
                            grant.buffer,
                            WordHold {
                                slot: at,
                                write: grant.kind.is_write(),
                            },
                        ));
                    }
                }
                _ => {}
            }
        }
    }
}

/// The broker's books balance: every byte is charged to exactly one client
/// (each client's charge is the bytes of the buffers it owns),
/// every buffer is held, holds, charges and accesses only name buffers
/// and clients that exist, and each uid's count of buffers is its holds'.
pub fn check_invariants(state: &State) -> Result<(), String> {
    if state.total_charged() != state.total_bytes() {
        return Err(format!(
            "clients are charged {} bytes but live buffers hold {}",
            state.total_charged(),
            state.total_bytes()
        ));
    }
    for buffer in state.buffers.values() {
        if buffer.holders.is_empty() {
            return Err(format!("buffer {} lives on with no holder", buffer.id));
        }
        if !buffer.held_by(buffer.owner) {
            return Err(format!(
                "buffer {} is charged to {}, who does not hold it",
                buffer.id, buffer.owner
            ));
        }
        for holder in &buffer.holders {
            let listed = state
                .clients
                .get(&holder.client)
                .is_some_and(|c| c.buffers.contains(&buffer.id));
            if !listed {
                return Err(format!(
                    "buffer {} is held by client {} who does not list it",
                    buffer.id, holder.client
                ));
            }
        }
    }
    for client in state.clients.values() {
        for id in &client.buffers {
            if !state.buffers.get(id).is_some_and(|b| b.held_by(client.id)) {
                return Err(format!(
                    "client {} lists buffer {id}, which it does not hold",
                    client.id
                ));
            }
        }
        let held: u64 = client
            .buffers
            .iter()
            .filter_map(|id| state.buffers.get(id))
            .map(|b| b.size)
            .sum();
        if client.held_bytes != held {
            return Err(format!(
                "client {} counts {} held bytes, but its buffers hold {held}",
                client.id, client.held_bytes
            ));
        }
        // The totals alone balance when a charge stays with a client that
        // let the buffer go instead of moving to the next holder.
        let owned: u64 = state
            .buffers
            .values()
            .filter(|b| b.owner == client.id)
            .map(|b| b.size)
            .sum();
        if client.charged_bytes != owned {
            return Err(format!(
                "client {} is charged {} bytes, but the buffers it owns hold {owned}",
                client.id, client.charged_bytes
            ));
        }
    }
    check_fences_are_accesses(state)?;
    // What max_uid_buffers counts, kept as holds come and go, is what
    // the tables hold.
    state.check_uid_held()?;
    let mut words_in_use = std::collections::HashSet::new();
    for (id, access) in &state.accesses {
        if !state.buffers.contains_key(&access.buffer) {
            return Err(format!(
                "access {id} is on buffer {}, which is gone",
                access.buffer
            ));
        }
        if let Some(at) = access.end_slot {
            if !words_in_use.insert((access.client, at.slot)) {
                return Err(format!(
                    "access {id} shares word {} of client {} with another",
                    at.slot, access.client
                ));
            }
        }
    }
    Ok(())
}

/// The arbiter and the broker's tables name the same accesses and
/// waiters: every fence the arbiter holds is an access entry of the same
/// client and buffer, handed to the kernel exactly when the entry keeps a
/// sync_file, and every access entry is such a fence (an entry without a
/// fence is an access the broker still answers for, or ends, that nobody
/// arbitrates; a fence without one holds the buffer for good, since
/// nothing the broker keeps would ever end it). The same for queued
/// begins and their waiter entries.
fn check_fences_are_accesses(state: &State) -> Result<(), String> {
    for (id, access) in &state.accesses {
        let Some(fence) = state.arbiter.fence(*id) else {
            return Err(format!(
                "access {id} of client {} on buffer {} is no fence of the arbiter",
                access.client, access.buffer
            ));
        };
        if fence.holder != access.client || fence.buffer != access.buffer {
            return Err(format!(
                "access {id}: the arbiter's fence is client {}'s on buffer {}, the table's \
                 client {}'s on buffer {}",
                fence.holder, fence.buffer, access.client, access.buffer
            ));
        }
        // By its name: this package (and the fuzz target, which includes
        // this file) reaches the fence crate only through the daemon's.
        let kernel = format!("{:?}", fence.state) == "AwaitingKernelFence";
        if kernel != access.sync_file.is_some() {
            return Err(format!(
                "access {id}: the arbiter's fence is {:?}, but the table {} a sync_file",
                fence.state,
                if access.sync_file.is_some() {
                    "keeps"
                } else {
                    "has no"
                }
            ));
        }
    }
    for buffer in state.buffers.keys() {
        for fence in state.arbiter.fences(*buffer) {
            if !state.accesses.contains_key(&fence.id) {
                return Err(format!(
                    "buffer {buffer}: the arbiter's fence {} (client {}) is no access of the table",
                    fence.id, fence.holder
                ));
            }
        }
        for waiter in state.arbiter.waiters(*buffer) {
            if !state.waiters.contains_key(&waiter.id) {
                return Err(format!(
                    "buffer {buffer}: the arbiter's waiter {} (client {}) is no waiter of the table",
                    waiter.id, waiter.client
                ));
            }
        }
    }
    // With the above, equal totals leave no fence or waiter on a buffer
    // the broker forgot.
    if state.arbiter.fence_total() != state.accesses.len() {
        return Err(format!(
            "the arbiter holds {} fences, the table {} accesses",
            state.arbiter.fence_total(),
            state.accesses.len()
        ));
    }
    for id in state.waiters.keys() {
        let queued = state
            .arbiter
            .waiter_buffer(*id)
            .is_some_and(|b| state.buffers.contains_key(&b));
        if !queued {
            return Err(format!(
                "waiter {id} of the table waits in no queue of a live buffer"
            ));
        }
    }
    if state.arbiter.waiter_total() != state.waiters.len() {
        return Err(format!(
            "the arbiter queues {} begins, the table {}",
            state.arbiter.waiter_total(),
            state.waiters.len()
        ));
    }
    Ok(())
}

/// No lost wake-up through end words: on a buffer where someone waits,
/// every fence's end must reach the broker at once, so none may be ended
/// through a word the broker is not watching.
fn check_no_end_unheard(
    state: &State,
    scribbled: &std::collections::HashSet<(ClientId, u16)>,
) -> Result<(), String> {
    for buffer in state.buffers.keys() {
        if !state.arbiter.has_waiters(*buffer) {
            continue;
        }
        let mut index = 0;
        while let Some(fence) = state.arbiter.fence_id_at(*buffer, index) {
            index += 1;
            let Some(access) = state.accesses.get(&fence) else {
                continue;
            };
            let Some(at) = access.end_slot else {
                continue;
            };
            if scribbled.contains(&(access.client, at.slot)) {
                continue;
            }
            let view = state
                .clients
                .get(&access.client)
                .and_then(|c| c.end_page.as_ref())
                .map(|page| page.peek(at));
            if view == Some(BrokerView::Ended) {
                return Err(format!(
                    "buffer {buffer} has waiters, but fence {fence} ended through a word \
                     the broker is not watching: nobody would wake them"
                ));
            }
        }
    }
    Ok(())
}

/// Buffer words and the arbiter agree: a word the broker has not taken
/// over is the whole reservation (the arbiter has nothing on the buffer);
/// a taken one holds a bit for every access the broker keeps in it, so no
/// end can have gone unheard while the broker arbitrates; and a planned
/// hand-off names the head of the queue, waiting for one access only.
fn check_words(state: &State, scribbled: &std::collections::HashSet<u64>) -> Result<(), String> {
    for buffer in state.buffers.values() {
        let Some(ws) = buffer.word.as_deref() else {
            continue;
        };
        if ws.broken || scribbled.contains(&buffer.id) {
            continue;
        }
        let Some(word) = ws.peek() else {
            continue;
        };
        if !ws.taken {
            if state.arbiter.fence_id_at(buffer.id, 0).is_some()
                || state.arbiter.has_waiters(buffer.id)
            {
                return Err(format!(
                    "buffer {}: the word was handed back, but the arbiter still has fences or waiters",
                    buffer.id
                ));
            }
            if word.daemon() {
                return Err(format!(
                    "buffer {}: handed back, yet DAEMON is set",
                    buffer.id
                ));
            }
            continue;
        }
        if !word.daemon() {
            return Err(format!(
                "buffer {}: taken over, yet DAEMON is clear",
                buffer.id
            ));
        }
        for (id, access) in state.accesses.iter().filter(|(_, a)| a.buffer == buffer.id) {
            let Some(bit) = access.word_bit else {
                continue;
            };
            if !word.has(bit.index, bit.write) {
                return Err(format!(
                    "buffer {}: access {id} ended in the word, but the broker never heard",
                    buffer.id
                ));
            }
        }
        if let Some((index, _)) = word.next() {
            let head = state.arbiter.head_waiter(buffer.id);
            let owner = buffer
                .holders
                .iter()
                .find(|h| h.word_index == Some(index))
                .map(|h| h.client);
            if head.map(|h| h.client) != owner || state.arbiter.fence_count(buffer.id) != 1 {
                return Err(format!(
                    "buffer {}: a hand-off is planned to index {index}, which is not the lone waiter's",
                    buffer.id
                ));
            }
        }
    }
    Ok(())
}
