//! End words, end to end: the real daemon, real client processes and, where
//! the wire matters, a raw protocol client holding the page itself.
//!
//! A client with the `END_WORDS` feature ends most accesses by flipping a
//! word in a page it shares with the broker, with no message; the broker
//! learns of it when it next decides something about the buffer, and asks
//! for a message (marks the word *watched*) when someone waits. These tests
//! hold the daemon to what users rely on: a silent end frees the buffer for
//! the next process at once, a waiter or a no-autofence client still hears
//! of an end at once, a finished write is never reported lost or revoked,
//! and a client scribbling on its page harms nobody but itself. Each would
//! fail both against a daemon that ignored the words and against one that
//! trusted them blindly.

use std::collections::HashSet;
use std::os::fd::AsFd;
use std::time::Duration;

use dmabroker_client::Access;
use dmabroker_ipc::endwords::{ClientEnd, EndSlot, EndWords, SLOTS};
use dmabroker_ipc::{
    features, AccessId, BufferId, ErrorCode, Grant, Hello, ReplyBody, RequestBody, ShareToken,
    PROTOCOL_VERSION,
};
use dmabroker_suite::dbus::fields::{
    BUFFER_FENCES, CLIENT_ACCESSES_HELD, STATS_GRANTS, STATS_REVOCATIONS, STATS_WRITER_LOST,
    TOTALS_CLIENTS, TOTALS_FENCES, TOTALS_WAITERS,
};
use dmabroker_suite::dbus::DbusDaemon;
use dmabroker_suite::raw::RawClient;
use dmabroker_suite::scripted::{access_of, field, Shared};
use dmabroker_suite::{eventually, Daemon, Scripted};

/// End words are what accesses outside buffer words use (dma-bufs, and
/// clients without buffer words): these processes turn buffer words off so
/// that every access here takes the path under test.
const MESSAGE_PATH: &[&str] = &["--no-buffer-words"];

/// How long a begin that must not be granted is given to prove it.
const STILL_BLOCKED: Duration = Duration::from_millis(200);
/// How soon an end someone waits for must reach them. Generous for a
/// loaded machine; a daemon that only learns of the end at its next
/// decision on the buffer never delivers it at all.
const PROMPTLY: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------------------
// D-Bus helpers.

/// The `SilentEnds` property: accesses retired because their words said
/// ended, with no `End` message.
fn silent_ends(bus: &DbusDaemon) -> u64 {
    bus.counter("SilentEnds")
}

// ---------------------------------------------------------------------------
// A raw client holding its own end-word page.

/// A protocol client that asked for end words and mapped the page itself,
/// so a test can see each grant's slot and write the words as it likes.
struct WordClient {
    raw: RawClient,
    words: EndWords,
}

impl WordClient {
    fn connect(daemon: &Daemon, name: &str) -> WordClient {
        let mut raw = RawClient::connect(daemon.socket());
        let (welcome, fds) = raw.request_fds(RequestBody::Hello(Hello {
            version: PROTOCOL_VERSION,
            features: features::END_WORDS,
            autofence: None,
            client_name: name.into(),
        }));
        let Ok(ReplyBody::Welcome(welcome)) = welcome else {
            panic!("hello refused: {welcome:?}");
        };
        assert_ne!(
            welcome.features & features::END_WORDS,
            0,
            "the daemon did not grant END_WORDS"
        );
        let page = fds.first().expect("the welcome carries the end-word page");
        let words = EndWords::map(page.as_fd()).expect("map the end-word page");
        WordClient { raw, words }
    }

    fn alloc(&mut self) -> BufferId {
        match self.raw.request_fds(RequestBody::Alloc {
            size: 4096,
            heap: None,
            name: Some("words".into()),
        }) {
            (Ok(ReplyBody::Buffer(info)), _fd) => info.id,
            other => panic!("alloc: {other:?}"),
        }
    }

    fn export(&mut self, buffer: BufferId) -> ShareToken {
        match self.raw.request(RequestBody::Export { buffer }) {
            Ok(ReplyBody::Exported { token }) => token.parse().expect("token"),
            other => panic!("export: {other:?}"),
        }
    }

    fn import(&mut self, token: &ShareToken) -> BufferId {
        match self.raw.request_fds(RequestBody::Import {
            token: token.to_string(),
        }) {
            (Ok(ReplyBody::Buffer(info)), _fd) => info.id,
            other => panic!("import: {other:?}"),
        }
    }

    /// A begin that must be granted at once.
    fn begin(&mut self, buffer: BufferId, access: Access) -> Grant {
        match self.raw.request(RequestBody::Begin {
            buffer,
            access,
            timeout_ms: Some(1000),
        }) {
            Ok(ReplyBody::Granted(grant)) => grant,
            other => panic!("begin {access:?} on {buffer}: {other:?}"),
        }
    }

    /// Ends an access by message, as a client without a word does.
    fn end_by_message(&mut self, access: AccessId) {
        assert_eq!(
            self.raw.request(RequestBody::End {
                access,
                fence_slot: None
            }),
            Ok(ReplyBody::Ended),
            "end of access {access} by message"
        );
    }
}

/// A word in the normative layout (`docs/protocol.md`, "End words"):
/// bits 0–1 state (0 free, 1 held, 2 ended), bit 2 watched, bits 3–63
/// generation.
fn word(generation: u64, state: u64) -> u64 {
    (generation << 3) | state
}
const ENDED: u64 = 2;

/// A begin that must time out, the buffer being still held.
#[track_caller]
fn assert_times_out<T>(result: dmabroker_client::Result<T>, why: &str) {
    match result {
        Err(err) if err.code() == Some(ErrorCode::Timeout) => {}
        Err(err) => panic!("{why}: expected a timeout, got {err}"),
        Ok(_) => panic!("{why}: granted, but the buffer is still held"),
    }
}

// ---------------------------------------------------------------------------

/// The point of the feature: a client that takes and gives back a buffer
/// nobody else wants sends no `End` at all. Each cycle's end is retired by
/// the next begin (counted in the `SilentEnds` property), so 200 cycles
/// leave 199 retired and the last one ended only in its word, which the
/// views must already treat as gone: a monitoring tool must not show a
/// fence nobody holds.
/// Fails if the client still sends `End` (nothing is retired silently), if
/// the broker ignores the words (the second begin never gets in), or if the
/// views count the unretired last end as held.
#[test]
fn uncontended_cycles_end_without_messages() {
    let bus = DbusDaemon::start();
    let daemon = bus.start_broker(None);
    let client = daemon.message_path_client().expect("connect");
    let buffer = client.alloc(4096).expect("alloc");
    assert_eq!(buffer.heap(), "memfd", "the test heap ends through words");

    const CYCLES: u64 = 200;
    for round in 0..CYCLES {
        let mut guard = buffer
            .begin_timeout(Access::CpuWrite, Duration::from_secs(1))
            .unwrap_or_else(|e| panic!("cycle {round}: {e}"));
        assert!(!guard.writer_lost() && !guard.revoked(), "cycle {round}");
        guard.bytes_mut().expect("map")[0] = round as u8;
        drop(guard);
    }

    assert_eq!(bus.stat(STATS_GRANTS), CYCLES);
    let silent = silent_ends(&bus);
    assert!(
        (CYCLES - 1..=CYCLES).contains(&silent),
        "{silent} of {CYCLES} ends were retired without a message"
    );
    assert_eq!(bus.totals(TOTALS_FENCES), 0, "no fence is in force");
    let buffers = bus.method("ListBuffers", &[]);
    let listed = buffers
        .as_array()
        .expect("buffer list")
        .iter()
        .find(|b| b[0].as_u64() == Some(buffer.id()))
        .expect("buffer listed");
    assert_eq!(listed[BUFFER_FENCES], serde_json::json!([]), "{listed}");
    let clients = bus.method("ListClients", &[]);
    let me = clients
        .as_array()
        .expect("client list")
        .iter()
        .find(|c| c[0].as_u64() == Some(client.id()))
        .expect("client listed");
    assert_eq!(me[CLIENT_ACCESSES_HELD], 0, "{me}");
    // The page is per connection and nothing else was disturbed: the
    // buffer holds the last cycle's byte.
    let guard = buffer.begin(Access::CpuRead).expect("read");
    assert_eq!(guard.bytes().expect("map")[0], (CYCLES - 1) as u8);
}

/// A write ended through its word must free the buffer for another process
/// right away: no `End` will ever come, so the broker has to read the word
/// when the other process asks. Ping-pong between two processes so that
/// both pages, and slot reuse across generations, are exercised. Fails
/// (the begin times out) if the broker waits for a message, and fails on
/// the flags if it retires the silent end as a death or a revocation.
#[test]
fn a_silent_end_lets_another_process_in_at_once() {
    let mut s = Shared::new_with(Daemon::start(), 4096, MESSAGE_PATH);
    let mut other = s.join(&[]);
    for round in 0..10 {
        for (name, client) in [("owner", &mut s.owner), ("other", &mut other)] {
            // No `End` ever comes for the other's write: a broker that
            // waited for one would time this begin out.
            let granted = client
                .cmd(&format!("begin {} w 300", s.id))
                .unwrap_or_else(|e| panic!("round {round}: {name} not let in: {e}"));
            assert_eq!(field(&granted, "writer_lost"), Some("false"), "{granted}");
            assert_eq!(field(&granted, "revoked"), Some("false"), "{granted}");
            client.ok(&format!("fill {} {round}", access_of(&granted)));
            client.ok(&format!("end {}", access_of(&granted)));
        }
    }
    let read = s.owner.ok(&format!("read {}", s.id));
    assert_eq!(field(&read, "byte"), Some("9"), "{read}");
    assert_eq!(field(&read, "uniform"), Some("true"), "{read}");
}

/// An end someone waits for must be heard at once, though the holder's
/// client sends `End` only when its word says *watched*. Two links: the
/// writer's word is marked when a waiter queues; and a grant handed to a
/// waiter while another still waits must start watched, or the chain
/// stalls at its second link. Fails if either mark is missing (the waiter
/// is never granted: nothing else looks at the buffer).
#[test]
fn a_watched_end_is_heard_at_once() {
    let bus = DbusDaemon::start();
    let mut s = Shared::new_with(bus.start_broker(None), 4096, MESSAGE_PATH);
    let mut writer = s.join(&[]);
    let mut reader = s.join(&[]);
    let held = s.owner.ok(&format!("begin {} w", s.id));

    writer.send(&format!("begin {} w", s.id));
    eventually("the writer to queue", || bus.totals(TOTALS_WAITERS) == 1);
    reader.send(&format!("begin {} r", s.id));
    eventually("the reader to queue", || bus.totals(TOTALS_WAITERS) == 2);
    assert_eq!(writer.recv(Duration::ZERO), None, "granted while held");

    s.owner.ok(&format!("end {}", access_of(&held)));
    let write = writer.granted_within(PROMPTLY, "writer after the first end");
    assert_eq!(field(&write, "writer_lost"), Some("false"), "{write}");
    assert_eq!(
        reader.recv(STILL_BLOCKED),
        None,
        "the reader must wait for the second writer"
    );

    writer.ok(&format!("end {}", access_of(&write)));
    let read = reader.granted_within(PROMPTLY, "reader after the second end");
    assert_eq!(field(&read, "writer_lost"), Some("false"), "{read}");
    assert_eq!(bus.totals(TOTALS_WAITERS), 0);
}

/// A no-autofence client is told which fences to wait for and then waits
/// for `FenceSignalled`: the holder of a listed fence must end by message
/// so the event goes out at once. And a fence already ended through its
/// word must not be listed at all, or the client would wait for an event
/// about an access that is already over. Fails if the broker does not mark
/// listed fences watched (no event) or does not settle before granting (a
/// stale fence in the list).
#[test]
fn no_autofence_clients_still_hear_of_every_end() {
    let mut s = Shared::new_with(Daemon::start(), 4096, MESSAGE_PATH);
    let mut gpu = s.join(&["--no-autofence"]);

    // A live write is listed, and its end is signalled promptly.
    let write = access_of(&s.owner.ok(&format!("begin {} w", s.id)));
    let read = gpu.ok(&format!("begin {} dr", s.id));
    assert_eq!(field(&read, "fences"), Some("1"), "{read}");
    let listed = field(&read, "fence_list").expect("fence list");
    assert!(
        listed.starts_with(&format!("{write}:")) && listed.ends_with(":cpu-write:false"),
        "the writer's fence, without a sync_file: {listed}"
    );
    s.owner.ok(&format!("end {write}"));
    let event = gpu
        .cmd(&format!("event {}", PROMPTLY.as_millis()))
        .unwrap_or_else(|e| panic!("no FenceSignalled within {PROMPTLY:?}: {e}"));
    assert!(
        event.contains(&format!("FenceSignalled {{ fence: {write} }}")),
        "{event}"
    );
    gpu.ok(&format!("end {}", access_of(&read)));

    // A write already ended through its word is not listed.
    let write = access_of(&s.owner.ok(&format!("begin {} w", s.id)));
    s.owner.ok(&format!("end {write}"));
    let read = gpu.ok(&format!("begin {} dr", s.id));
    assert_eq!(
        field(&read, "fences"),
        Some("0"),
        "a silently ended write is still listed: {read}"
    );
    gpu.ok(&format!("end {}", access_of(&read)));
    let stray = gpu.cmd("event 100");
    assert_eq!(stray, Err("err NoEvent".into()), "no event for it either");
}

/// A process that finished its write (silently) and then crashed did not
/// lose it: the next reader must not be told the contents may be torn.
/// The death is waited for on the bus so that the hang-up, not the
/// reader's begin, is what retires the write. The contrast, a process
/// killed while writing, must still be reported, so the test fails whether
/// the broker ignores the words at hang-up or stops reporting lost writers.
#[test]
fn a_client_killed_after_a_silent_end_lost_no_write() {
    let bus = DbusDaemon::start();
    let s = Shared::new_with(bus.start_broker(None), 4096, MESSAGE_PATH);
    let mut reader = s.join(&[]);

    let mut finished = s.join(&[]);
    let write = access_of(&finished.ok(&format!("begin {} w", s.id)));
    finished.ok(&format!("fill {write} 42"));
    finished.ok(&format!("end {write}"));
    let clients = bus.totals(TOTALS_CLIENTS);
    finished.kill();
    eventually("the hang-up to be handled", || {
        bus.totals(TOTALS_CLIENTS) == clients - 1
    });
    // The premise: the write ended through its word, and the hang-up (not
    // the read, whose own silent end the broker may retire too) is what
    // retired it.
    assert_eq!(
        silent_ends(&bus),
        1,
        "the finished write was not a silent end"
    );
    let read = reader.ok(&format!("read {}", s.id));
    assert_eq!(field(&read, "writer_lost"), Some("false"), "{read}");
    assert_eq!(field(&read, "byte"), Some("42"), "{read}");
    assert_eq!(field(&read, "uniform"), Some("true"), "{read}");
    assert_eq!(bus.stat(STATS_WRITER_LOST), 0);

    let mut crashed = s.join(&[]);
    let write = access_of(&crashed.ok(&format!("begin {} w", s.id)));
    crashed.ok(&format!("fill {write} 7"));
    let clients = bus.totals(TOTALS_CLIENTS);
    crashed.kill();
    eventually("the hang-up to be handled", || {
        bus.totals(TOTALS_CLIENTS) == clients - 1
    });
    let read = reader.ok(&format!("read {}", s.id));
    assert_eq!(field(&read, "writer_lost"), Some("true"), "{read}");
    assert_eq!(bus.stat(STATS_WRITER_LOST), 1);
}

/// Shared by the two scribbling tests: a raw client that owns and
/// exported a buffer, and a well-behaved client (this process) holding it.
struct Scribbler {
    daemon: Daemon,
    scribbler: WordClient,
    buffer: BufferId,
    token: ShareToken,
    theirs: dmabroker_client::Buffer,
}

fn scribbler() -> Scribbler {
    let daemon = Daemon::start();
    let mut scribbler = WordClient::connect(&daemon, "scribbler");
    let buffer = scribbler.alloc();
    let token = scribbler.export(buffer);
    let theirs = daemon.client().import(&token).expect("import");
    Scribbler {
        daemon,
        scribbler,
        buffer,
        token,
        theirs,
    }
}

impl Scribbler {
    /// The daemon is alive and serves a newcomer.
    fn assert_still_serving(&mut self) {
        assert!(
            self.daemon.is_running(),
            "the daemon died:\n{}",
            self.daemon.log_tail()
        );
        let newcomer = self.daemon.client();
        drop(newcomer.alloc(4096).expect("still serving"));
    }
}

const GARBAGE_KINDS: usize = 5;

/// Words that are not `at`'s held or ended word: garbage, another
/// generation's end (a stale or guessed word), a state that does not exist.
fn garbage_for(at: EndSlot) -> [(&'static str, u64); GARBAGE_KINDS] {
    [
        ("zero", 0),
        ("all ones", u64::MAX),
        ("ended, next generation", word(at.generation + 1, ENDED)),
        (
            "ended, older generation",
            word(at.generation.wrapping_sub(1), ENDED),
        ),
        ("no such state", word(at.generation, 3)),
    ]
}

/// The page is the client's own memory: it can write anything there. A
/// word the broker does not recognise (garbage, another generation's
/// word, a state that does not exist) must count as *held*, the access
/// then ending only by message, never as an end: otherwise a buggy
/// client's stray store would let others into a buffer it is still
/// writing. The scribbler's page keeps working for later grants, and the
/// daemon keeps serving.
#[test]
fn scribbled_words_are_not_ends() {
    let mut s = scribbler();
    for round in 0..GARBAGE_KINDS {
        let grant = s.scribbler.begin(s.buffer, Access::CpuWrite);
        let at = grant.end_slot.expect("a memfd write gets an end word");
        let (what, value) = garbage_for(at)[round];
        s.scribbler.words.scribble(at.slot, value);
        assert_times_out(
            s.theirs.begin_timeout(Access::CpuRead, STILL_BLOCKED),
            &format!("{what}: the scribbled write was taken for an end"),
        );
        // The broker gave the word up: it is not the access's any more,
        // so a client ends by message, as this one now does.
        assert_eq!(s.scribbler.words.end(at), ClientEnd::NotMine, "{what}");
        s.scribbler.end_by_message(grant.access);
        let read = s
            .theirs
            .begin_timeout(Access::CpuRead, PROMPTLY)
            .unwrap_or_else(|e| panic!("{what}: not released by the End message: {e}"));
        assert!(!read.writer_lost() && !read.revoked(), "{what}");
        drop(read);
    }

    // The page still works: a fresh grant's word is written anew by the
    // broker, and a proper end through it frees the buffer.
    let grant = s.scribbler.begin(s.buffer, Access::CpuWrite);
    let at = grant.end_slot.expect("the scribbler still gets words");
    assert_eq!(s.scribbler.words.end(at), ClientEnd::Silent);
    let read = s
        .theirs
        .begin_timeout(Access::CpuRead, PROMPTLY)
        .expect("a proper silent end frees the buffer");
    assert!(!read.writer_lost() && !read.revoked());
    drop(read);
    s.assert_still_serving();
}

/// Every connection has its own page, and the broker must read an
/// access's word in its holder's page, nowhere else. Here the buffer's
/// owner writes into every word of its own page exactly the word that
/// would end another client's write (same generation, state ended): that
/// write must stay held until its holder ends it.
#[test]
fn a_page_cannot_end_another_clients_access() {
    let mut s = scribbler();
    let mut victim = WordClient::connect(&s.daemon, "victim");
    assert_eq!(victim.import(&s.token), s.buffer);
    let grant = victim.begin(s.buffer, Access::CpuWrite);
    let at = grant.end_slot.expect("a memfd write gets an end word");
    for slot in 0..SLOTS as u16 {
        s.scribbler.words.scribble(slot, word(at.generation, ENDED));
    }
    assert_times_out(
        s.theirs.begin_timeout(Access::CpuRead, STILL_BLOCKED),
        "another client's page ended the victim's write",
    );
    // The wait marked the victim's word: its end comes as a message.
    assert_eq!(victim.words.end(at), ClientEnd::Tell);
    victim.end_by_message(grant.access);
    let read = s
        .theirs
        .begin_timeout(Access::CpuRead, PROMPTLY)
        .expect("released by the victim's End");
    assert!(!read.writer_lost() && !read.revoked());
    drop(read);
    s.assert_still_serving();
}

/// A page has SLOTS words; a client may hold more accesses than that, and
/// the ones granted without a word must end by message. Holding 520 reads
/// (several on each of a few buffers: it is the count per connection that
/// matters) and dropping them all must leave every buffer free for a
/// writer in another process. Fails if grants past the page are refused or
/// mishandled, or if their ends (or the silent ones) are lost.
#[test]
fn more_accesses_than_words_all_end() {
    const BUFFERS: usize = 8;
    const HELD_ACCESSES: usize = SLOTS + BUFFERS;
    let daemon = Daemon::start();
    let holder = daemon.client();
    let buffers: Vec<dmabroker_client::Buffer> = (0..BUFFERS)
        .map(|_| holder.alloc(4096).expect("alloc"))
        .collect();
    let mut writer = Scripted::spawn(daemon.socket(), &[]);
    let mut ids = Vec::new();
    for buffer in &buffers {
        let token = buffer.export().expect("export");
        let imported = writer.ok(&format!("import {token}"));
        ids.push(field(&imported, "id").expect("id").to_owned());
    }

    let guards: Vec<dmabroker_client::AccessGuard> = (0..HELD_ACCESSES)
        .map(|i| {
            buffers[i % BUFFERS]
                .begin_timeout(Access::CpuRead, Duration::from_secs(1))
                .unwrap_or_else(|e| panic!("read {i} of {HELD_ACCESSES}: {e}"))
        })
        .collect();
    assert_eq!(guards.len(), HELD_ACCESSES);
    drop(guards);

    for id in &ids {
        let granted = writer
            .cmd(&format!("begin {id} w 1000"))
            .unwrap_or_else(|e| panic!("buffer {id} still held after every read ended: {e}"));
        assert_eq!(field(&granted, "writer_lost"), Some("false"), "{granted}");
        writer.ok(&format!("end {}", access_of(&granted)));
    }
}

/// When a client's page is full, the broker sweeps it for words that say
/// ended (on buffers nobody has touched since), so the client gets words
/// again; but the sweep must retire only those. A raw client holds 512
/// reads with words (half on A, half on B), proves a further grant gets
/// none, ends the A half through the words, and keeps granting until a
/// word comes back. Then a writer must get A at once and still wait for
/// B. Fails if the sweep never happens, or retires live accesses.
#[test]
fn a_full_page_is_swept_for_ended_words_only() {
    let daemon = Daemon::start();
    let mut holder = WordClient::connect(&daemon, "holder");
    let (a, b, c) = (holder.alloc(), holder.alloc(), holder.alloc());
    let writer = daemon.client();
    let on_a = writer.import(&holder.export(a)).expect("import a");
    let on_b = writer.import(&holder.export(b)).expect("import b");

    let mut slots = HashSet::new();
    let mut reads = (Vec::new(), Vec::new());
    for i in 0..SLOTS {
        let (buffer, list) = if i % 2 == 0 {
            (a, &mut reads.0)
        } else {
            (b, &mut reads.1)
        };
        let grant = holder.begin(buffer, Access::CpuRead);
        let at = grant
            .end_slot
            .unwrap_or_else(|| panic!("read {i}: the page has a free word"));
        assert!(slots.insert(at.slot), "slot {} handed out twice", at.slot);
        list.push((grant.access, at));
    }
    let extra = holder.begin(c, Access::CpuRead);
    assert_eq!(extra.end_slot, None, "a full page has no word to give");

    for (access, at) in &reads.0 {
        assert_eq!(
            holder.words.end(*at),
            ClientEnd::Silent,
            "read {access}: nobody watches A"
        );
    }
    let mut more = 0;
    loop {
        let grant = holder.begin(c, Access::CpuRead);
        if grant.end_slot.is_some() {
            break;
        }
        more += 1;
        assert!(
            more < SLOTS,
            "{more} grants and the ended words were never swept"
        );
    }

    let write = on_a
        .begin_timeout(Access::CpuWrite, PROMPTLY)
        .expect("every read of A ended");
    assert!(!write.writer_lost());
    drop(write);
    assert_times_out(
        on_b.begin_timeout(Access::CpuWrite, STILL_BLOCKED),
        "the sweep retired live reads of B",
    );
    // The writer's wait marked B's reads: each end is told by message.
    for (access, at) in &reads.1 {
        assert_eq!(holder.words.end(*at), ClientEnd::Tell, "read {access}");
        holder.end_by_message(*access);
    }
    drop(
        on_b.begin_timeout(Access::CpuWrite, PROMPTLY)
            .expect("every read of B ended"),
    );
}

/// A hold limit exists to take back a write someone sits on, not one that
/// is over: a write ended through its word before the limit must not be
/// revoked (the holder would be told it lost an access it gave back, and
/// the next reader that its data was cut short). The broker must look at
/// the word when the limit fires: `SilentEnds` going to 1 with nobody
/// else touching the buffer shows that it did. A write really held past
/// the limit is still revoked, so the test fails if the limit is simply
/// not enforced.
#[test]
fn a_hold_limit_spares_a_write_ended_through_its_word() {
    let bus = DbusDaemon::start();
    let daemon = bus.start_broker(Some("[default]\nwrite_hold_limit = \"200ms\"\n"));
    let mut client = Scripted::spawn(daemon.socket(), &[]);
    let buffer = field(&client.ok("alloc 4096"), "id")
        .expect("id")
        .to_owned();

    let write = access_of(&client.ok(&format!("begin {buffer} w")));
    client.ok(&format!("end {write}"));
    // Nothing else decides about this buffer: only the limit's timer can
    // retire the silent end, so this is the sign that the timer has fired
    // (and that the end was silent, the premise of the test).
    eventually("the hold-limit timer to retire the ended write", || {
        silent_ends(&bus) == 1
    });
    assert_eq!(bus.stat(STATS_REVOCATIONS), 0);
    assert_eq!(
        client.cmd("event 100"),
        Err("err NoEvent".into()),
        "an ended write was revoked"
    );

    let write = access_of(&client.ok(&format!("begin {buffer} w")));
    let event = client
        .cmd("event 5000")
        .unwrap_or_else(|e| panic!("a write held past its limit was not revoked: {e}"));
    assert!(
        event.contains(&format!(
            "AccessRevoked {{ access: {write}, buffer: {buffer} }}"
        )),
        "{event}"
    );
    assert_eq!(bus.stat(STATS_REVOCATIONS), 1);
}
