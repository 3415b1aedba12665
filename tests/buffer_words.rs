//! Buffer words, end to end: the real daemon and real client processes
//! sharing a memfd buffer whose reservation word lives past its end.
//!
//! An uncontended CPU access begins and ends with a compare-and-swap on the
//! word, with no message; the broker takes the word over before any
//! decision and hands it back when nothing is left to arbitrate; a waiter
//! is handed the buffer by the holder's end through the word. These tests
//! hold that to what users rely on: a writer in the word still excludes
//! every other process, a waiter is still granted promptly and in order,
//! a writer SIGKILLed in the word is still reported lost, the views still
//! show who holds what, and a holder that scribbles on the word harms
//! nobody's arbitration but its own buffer's speed.

use std::time::{Duration, Instant};

use dmabroker_client::{Access, ClientOptions};
use dmabroker_ipc::bufferword::BufferWord;
use dmabroker_suite::dbus::fields::{BUFFER_FENCES, STATS_GRANTS, TOTALS_FENCES, TOTALS_WAITERS};
use dmabroker_suite::dbus::DbusDaemon;
use dmabroker_suite::scripted::{access_of, field, Shared};
use dmabroker_suite::{eventually, Daemon, Scripted};

/// How long a begin that must not be granted is given to prove it.
const STILL_BLOCKED: Duration = Duration::from_millis(200);
/// How soon an end someone waits for must reach them (generous for a
/// loaded machine; a lost wake-up never arrives at all).
const PROMPTLY: Duration = Duration::from_secs(2);

/// The buffer's fences in the D-Bus view: (access, kind, holder, state).
fn fences_of(bus: &DbusDaemon, buffer: &str) -> Vec<(u64, String, u64, String)> {
    let buffers = bus.method("ListBuffers", &[]);
    let listed = buffers
        .as_array()
        .expect("buffer list")
        .iter()
        .find(|b| b[0].as_u64().map(|id| id.to_string()).as_deref() == Some(buffer))
        .cloned()
        .expect("buffer listed");
    listed[BUFFER_FENCES]
        .as_array()
        .expect("fence list")
        .iter()
        .map(|f| {
            (
                f[0].as_u64().expect("access"),
                f[1].as_str().expect("kind").to_owned(),
                f[2].as_u64().expect("holder"),
                f[3].as_str().expect("state").to_owned(),
            )
        })
        .collect()
}

/// Begins `access` and ends it again: after the first (a round trip that
/// gives the client its slot in the word), cycles are held in the word.
/// Another holder of the shared buffer, in this process, with the
/// buffer's word mapped as any holder could map it: what a misbehaving
/// holder writes there is up to the test.
fn holder_with_the_word(
    s: &Shared,
) -> (
    dmabroker_client::Client,
    dmabroker_client::Buffer,
    BufferWord,
) {
    let holder = s.daemon.client();
    let token: dmabroker_client::ShareToken = s.token.parse().expect("token");
    let held = holder.import(&token).expect("import");
    let word = BufferWord::map(held.as_fd(), held.size()).expect("map the word");
    (holder, held, word)
}

fn cycle(client: &mut Scripted, buffer: &str, access: &str) -> String {
    let answer = client.ok(&format!("begin {buffer} {access}"));
    client.ok(&format!("end {}", access_of(&answer)));
    answer
}

/// After the first grant, every uncontended cycle happens in the word: the
/// broker grants nothing more (its grant count stands still), and the data
/// still goes from one process to the next. Fails if the client still
/// asks the broker (grants grow) or the word is not shared (stale bytes).
#[test]
fn uncontended_cycles_never_reach_the_broker() {
    let bus = DbusDaemon::start();
    let mut s = Shared::new(bus.start_broker(None), 4096);
    let mut other = s.join(&[]);
    let first = cycle(&mut s.owner, &s.id, "w");
    assert_eq!(field(&first, "word"), Some("true"), "{first}");
    cycle(&mut other, &s.id, "r");
    let grants = bus.stat(STATS_GRANTS);
    for round in 0..50u32 {
        let write = s.owner.ok(&format!("begin {} w", s.id));
        assert_eq!(
            field(&write, "word"),
            Some("true"),
            "round {round}: {write}"
        );
        s.owner
            .ok(&format!("fill {} {}", access_of(&write), round % 251));
        s.owner.ok(&format!("end {}", access_of(&write)));
        let read = other.ok(&format!("read {}", s.id));
        assert_eq!(
            field(&read, "byte"),
            Some((round % 251).to_string().as_str()),
            "{read}"
        );
        assert_eq!(field(&read, "uniform"), Some("true"), "{read}");
    }
    assert_eq!(bus.stat(STATS_GRANTS), grants, "the broker saw the cycles");
    assert_eq!(bus.totals(TOTALS_FENCES), 0);
}

/// A writer holding the buffer in its word keeps every other process out:
/// the reader's begin goes to the broker, which takes the word over, sees
/// the writer, and queues the reader; the writer's end hands the buffer
/// over through the word. Fails if the reader gets in while the writer
/// holds (torn frame), or is never woken (lost wake-up), or the hand-off
/// is not carried out in the word.
#[test]
fn a_writer_in_the_word_excludes_and_then_hands_off() {
    let bus = DbusDaemon::start();
    let mut s = Shared::new(bus.start_broker(None), 1 << 20);
    let mut reader = s.join(&[]);
    cycle(&mut s.owner, &s.id, "w");
    cycle(&mut reader, &s.id, "r");
    for round in 1..=5u32 {
        let write = s.owner.ok(&format!("begin {} w", s.id));
        assert_eq!(field(&write, "word"), Some("true"), "{write}");
        s.owner.ok(&format!("fill {} {round}", access_of(&write)));
        reader.send(&format!("read {}", s.id));
        eventually("the reader to queue", || bus.totals(TOTALS_WAITERS) == 1);
        assert_eq!(reader.recv(STILL_BLOCKED), None, "read while written");
        s.owner.ok(&format!("end {}", access_of(&write)));
        let read = reader.granted_within(PROMPTLY, "reader after the write");
        assert_eq!(
            field(&read, "byte"),
            Some(round.to_string().as_str()),
            "{read}"
        );
        assert_eq!(field(&read, "uniform"), Some("true"), "{read}");
        assert_eq!(field(&read, "writer_lost"), Some("false"), "{read}");
    }
    assert_eq!(
        bus.counter("HandOffs"),
        5,
        "every hand-off went through the word"
    );
    eventually("the word to be handed back", || {
        bus.totals(TOTALS_FENCES) == 0 && bus.totals(TOTALS_WAITERS) == 0
    });
    // Handed back: the next uncontended cycle is in the word again.
    let again = cycle(&mut s.owner, &s.id, "w");
    assert_eq!(field(&again, "word"), Some("true"), "{again}");
}

/// Readers share in the word, and a writer waits for the last of them.
/// Fails if two readers exclude each other, or the writer gets in while
/// one still reads.
#[test]
fn readers_share_in_the_word_and_a_writer_waits_for_the_last() {
    let bus = DbusDaemon::start();
    let mut s = Shared::new(bus.start_broker(None), 4096);
    let mut a = s.join(&[]);
    let mut b = s.join(&[]);
    cycle(&mut a, &s.id, "r");
    cycle(&mut b, &s.id, "r");
    cycle(&mut s.owner, &s.id, "w");
    let ra = a.ok(&format!("begin {} r", s.id));
    let rb = b.ok(&format!("begin {} r", s.id));
    assert_eq!(field(&ra, "word"), Some("true"), "{ra}");
    assert_eq!(field(&rb, "word"), Some("true"), "{rb}");
    let fences = fences_of(&bus, &s.id);
    assert_eq!(fences.len(), 2, "{fences:?}");
    assert!(
        fences.iter().all(|f| f.1 == "cpu-read" && f.3 == "word"),
        "{fences:?}"
    );

    s.owner.send(&format!("begin {} w", s.id));
    eventually("the writer to queue", || bus.totals(TOTALS_WAITERS) == 1);
    a.ok(&format!("end {}", access_of(&ra)));
    assert_eq!(s.owner.recv(STILL_BLOCKED), None, "written while b reads");
    b.ok(&format!("end {}", access_of(&rb)));
    let write = s.owner.granted_within(PROMPTLY, "writer after the readers");
    assert_eq!(field(&write, "writer_lost"), Some("false"), "{write}");
}

/// A writer SIGKILLed while holding the buffer in its word: the broker
/// cannot have seen the write begin, yet the next grant must say
/// `writer_lost`, promptly, and the buffer must not stay locked. Fails if
/// the dead client's bit is ignored (no flag) or never cleared (the
/// reader waits forever).
#[test]
fn a_writer_killed_in_the_word_is_reported_lost() {
    let daemon = Daemon::start();
    let baseline = daemon.baseline();
    let mut s = Shared::new(daemon, 4096);
    let mut reader = s.join(&[]);
    cycle(&mut s.owner, &s.id, "w");
    let write = s.owner.ok(&format!("begin {} w", s.id));
    assert_eq!(field(&write, "word"), Some("true"), "{write}");
    s.owner.kill();
    let read = reader
        .cmd(&format!("begin {} r 2000", s.id))
        .expect("the reader gets in after the writer died");
    assert_eq!(field(&read, "writer_lost"), Some("true"), "{read}");
    reader.ok(&format!("end {}", access_of(&read)));
    let again = cycle(&mut reader, &s.id, "w");
    assert_eq!(field(&again, "writer_lost"), Some("false"), "{again}");
    drop(reader);
    s.daemon.assert_fds_back_to(baseline);
}

/// A planned hand-off that times out: the waiter gets `Timeout` and
/// leaves the queue; the holder's end later finds nobody to hand over to,
/// and the buffer is free for the next process. Fails if the cancelled
/// plan is still carried out (the buffer stays held by a client that gave
/// up) or the waiter sleeps past its timeout.
#[test]
fn a_planned_waiter_that_times_out_leaves_the_buffer_free() {
    let bus = DbusDaemon::start();
    let mut s = Shared::new(bus.start_broker(None), 4096);
    let mut waiter = s.join(&[]);
    let mut third = s.join(&[]);
    cycle(&mut s.owner, &s.id, "w");
    cycle(&mut waiter, &s.id, "r");
    cycle(&mut third, &s.id, "r");
    let write = s.owner.ok(&format!("begin {} w", s.id));
    let started = Instant::now();
    let refused = waiter
        .cmd(&format!("begin {} r 300", s.id))
        .expect_err("granted while written");
    assert!(refused.contains("timeout"), "{refused}");
    assert!(
        started.elapsed() < PROMPTLY,
        "the timeout took {:?}",
        started.elapsed()
    );
    assert_eq!(bus.counter("HandOffsPlanned"), 1);
    s.owner.ok(&format!("end {}", access_of(&write)));
    let next = third
        .cmd(&format!("begin {} w 1000", s.id))
        .expect("the buffer is free after the timeout");
    assert_eq!(field(&next, "writer_lost"), Some("false"), "{next}");
    assert_eq!(
        bus.counter("HandOffs"),
        0,
        "no hand-off to a client that gave up"
    );
}

/// A no-autofence client is never blocked: a begin against a writer held
/// in the word is granted at once and lists that writer's access as a
/// fence to wait for, then an event when it ends. Fails if the word's
/// holder is invisible to the broker's fence list, or its end (no message
/// needed for the word alone) never produces the event.
#[test]
fn no_autofence_clients_see_word_holders_as_fences() {
    let mut s = Shared::new(Daemon::start(), 4096);
    let mut hw = s.join(&["--no-autofence"]);
    cycle(&mut s.owner, &s.id, "w");
    let write = s.owner.ok(&format!("begin {} w", s.id));
    let granted = hw
        .cmd(&format!("begin {} r", s.id))
        .expect("no-autofence is never blocked");
    assert_eq!(field(&granted, "fences"), Some("1"), "{granted}");
    let listed = field(&granted, "fence_list")
        .expect("fence list")
        .to_owned();
    let fence = listed.split(':').next().expect("fence id").to_owned();
    assert!(listed.contains(":cpu-write:"), "{listed}");
    s.owner.ok(&format!("end {}", access_of(&write)));
    let event = hw.ok("event 2000");
    assert!(
        event.contains(&format!("FenceSignalled {{ fence: {fence} }}")),
        "{event} for {fence}"
    );
}

/// A holder that writes garbage into the word (a writer together with
/// readers) breaks only that buffer's fast path: the broker notices at its
/// next look, tells the next grant the contents may be torn, and from
/// then on arbitrates every access by message, correctly. The daemon
/// stays up and other buffers keep their words. Fails if the broker trusts
/// the garbage (a writer it never granted blocks everyone, or readers are
/// let in beside a "writer"), or panics.
#[test]
fn a_scribbled_word_falls_back_to_messages_for_that_buffer_only() {
    let mut s = Shared::new(Daemon::start(), 4096);
    let mut other = s.join(&[]);
    cycle(&mut s.owner, &s.id, "w");
    // A holder maps the word like any holder could, and scribbles.
    let client = s.daemon.client();
    let mine = client.alloc(4096).expect("alloc");
    let (_victim, _held, word) = holder_with_the_word(&s);
    word.scribble(1 << 37 | 0b11); // a writer and two readers
    let read = other
        .cmd(&format!("begin {} r 2000", s.id))
        .expect("the broker must not believe the garbage");
    assert_eq!(field(&read, "writer_lost"), Some("true"), "{read}");
    assert_eq!(field(&read, "word"), Some("false"), "{read}");
    other.ok(&format!("end {}", access_of(&read)));
    let write = s.owner.ok(&format!("begin {} w", s.id));
    assert_eq!(field(&write, "word"), Some("false"), "{write}");
    // Arbitration by message still excludes.
    other.send(&format!("begin {} r", s.id));
    assert_eq!(other.recv(STILL_BLOCKED), None, "read while written");
    s.owner.ok(&format!("end {}", access_of(&write)));
    other.granted_within(PROMPTLY, "reader after the write");
    // Another buffer is unaffected.
    let mut g = mine.begin(Access::CpuWrite).expect("begin");
    g.bytes_mut().expect("bytes")[0] = 1;
    drop(g);
    let g = mine.begin(Access::CpuWrite).expect("begin");
    assert!(g.in_word(), "the other buffer still uses its word");
}

/// A holder that erases the planned hand-off from the word (any holder can
/// write it) must not leave the waiter hanging: the broker took "no plan
/// left" for "carried out", recorded a hand-off the waiter never saw, and
/// sent no reply; the waiter, seeing no plan and no bit, waited for that
/// reply forever, past its own timeout. Now it is told its begin failed,
/// and the buffer is not left held for it.
#[test]
fn a_hand_off_erased_from_the_word_fails_the_begin_instead_of_hanging() {
    const NEXT_FIELDS: u64 = 0xff << 40; // NEXT, NEXT_KIND, NEXT_IDX
    let bus = DbusDaemon::start();
    let mut s = Shared::new(bus.start_broker(None), 4096);
    let mut waiter = s.join(&[]);
    cycle(&mut s.owner, &s.id, "w");
    cycle(&mut waiter, &s.id, "r");
    let (_meddler, _held, word) = holder_with_the_word(&s);

    let write = s.owner.ok(&format!("begin {} w", s.id));
    assert_eq!(field(&write, "word"), Some("true"), "{write}");
    waiter.send(&format!("begin {} r 500", s.id));
    eventually("the hand-off to be planned", || {
        bus.counter("HandOffsPlanned") == 1 && word.load().0 & NEXT_FIELDS != 0
    });
    word.scribble(word.load().0 & !NEXT_FIELDS);
    s.owner.ok(&format!("end {}", access_of(&write)));
    let answer = waiter
        .recv(PROMPTLY)
        .expect("the waiter is answered after the write");
    assert!(answer.starts_with("err busy"), "{answer}");
    s.owner
        .cmd(&format!("begin {} w 1000", s.id))
        .expect("nobody holds the buffer for the waiter");
    let read = waiter.cmd(&format!("begin {} r 2000", s.id));
    assert!(read.is_err(), "still written: {read:?}");
}

/// A client that turned buffer words off never holds accesses in the
/// word: every begin is a round trip the broker sees. Fails if it is given
/// a slot anyway.
#[test]
fn a_client_without_buffer_words_always_asks_the_broker() {
    let bus = DbusDaemon::start();
    let daemon = bus.start_broker(None);
    let off = daemon.message_path_client().expect("connect");
    let buffer = off.alloc(4096).expect("alloc");
    for _ in 0..3 {
        let guard = buffer.begin(Access::CpuWrite).expect("begin");
        assert!(!guard.in_word());
    }
    assert_eq!(bus.stat(STATS_GRANTS), 3);
}

/// A client whose policy sets a hold limit needs the broker to see every
/// write (to revoke it in time): it never gets a slot in the word, and a
/// write held too long is still revoked. Fails if the write is taken in
/// the word, where the broker could not time it.
#[test]
fn a_hold_limit_keeps_writes_out_of_the_word() {
    let bus = DbusDaemon::start();
    let daemon = bus.start_broker(Some("[default]\nwrite_hold_limit = \"200ms\"\n"));
    let client = daemon.client();
    let buffer = client.alloc(4096).expect("alloc");
    for _ in 0..3 {
        let guard = buffer.begin(Access::CpuWrite).expect("begin");
        assert!(!guard.in_word());
    }
    let held = buffer.begin(Access::CpuWrite).expect("begin");
    assert!(!held.in_word());
    let event = client
        .next_event(Some(PROMPTLY))
        .expect("event")
        .expect("revoked in time");
    assert!(
        matches!(event, dmabroker_client::Event::AccessRevoked { .. }),
        "{event:?}"
    );
}

/// A waiter asleep on the word for a planned hand-off is not reading its
/// socket, yet it must notice the broker's death as a waiter on the socket
/// would (within its 100 ms slices), not sleep until the holder ends.
/// Fails if the planned wait never looks at the connection.
#[test]
fn a_planned_waiter_notices_the_broker_going_away() {
    let bus = DbusDaemon::start();
    let daemon = bus.start_broker(None);
    let no_reconnect = || ClientOptions {
        reconnect: None,
        ..Default::default()
    };
    let holder = daemon.client_with(no_reconnect()).expect("holder");
    let waiter = daemon.client_with(no_reconnect()).expect("waiter");
    let buffer = holder.alloc(4096).expect("alloc");
    let theirs = waiter
        .import(&buffer.export().expect("export"))
        .expect("import");
    drop(buffer.begin(Access::CpuWrite).expect("learn the slot"));
    drop(theirs.begin(Access::CpuRead).expect("learn the slot"));
    let _write = buffer.begin(Access::CpuWrite).expect("write in the word");
    assert!(_write.in_word());
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let result = theirs.begin(Access::CpuRead).map(|g| g.in_word());
        let _ = tx.send(Instant::now());
        result
    });
    eventually("the waiter to be told `Planned`", || {
        bus.counter("HandOffsPlanned") == 1
    });
    std::thread::sleep(STILL_BLOCKED);
    assert!(rx.try_recv().is_err(), "granted while written");
    let stopped = Instant::now();
    daemon.stop();
    let returned = rx.recv_timeout(PROMPTLY).expect("the waiter noticed");
    let result = reader.join().expect("reader thread");
    assert!(
        matches!(result, Err(dmabroker_client::Error::Disconnected)),
        "{result:?}"
    );
    assert!(returned.duration_since(stopped) < PROMPTLY);
}

/// A grant held in the word by a process that cannot map the word (out of
/// mappings, `ENOMEM`) could never be ended: its bit stayed set, and every
/// other user of the buffer waited for it until the buffer was freed. The
/// word is now mapped before the broker is asked, so the begin fails
/// first and leaves nothing held.
#[test]
fn a_holder_that_cannot_map_the_word_holds_nothing_in_it() {
    // The client process maps until it cannot: bounded by the kernel's
    // per-process count, which some systems raise to billions.
    let max_maps: u64 = std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(u64::MAX);
    if max_maps > 1 << 18 {
        eprintln!("skipped: vm.max_map_count is {max_maps}; using it up would take too long");
        return;
    }
    let daemon = Daemon::start();
    let s = Shared::new(daemon, 1 << 20);
    let mut stuck = s.join(&[]);
    let mut other = s.join(&[]);
    let exhausted = stuck.ok("exhaust-mappings");
    assert!(
        field(&exhausted, "mappings").is_some_and(|n| n != "0"),
        "{exhausted}"
    );
    let refused = stuck
        .cmd(&format!("begin {} w", s.id))
        .expect_err("a begin whose word cannot be mapped");
    assert!(refused.starts_with("err"), "{refused}");
    // The other process is not kept waiting for an access nobody holds.
    let granted = other.ok(&format!("begin {} w 2000", s.id));
    other.ok(&format!("end {}", access_of(&granted)));
}

/// A holder that does not erase the planned hand-off but changes its kind
/// (NEXT_KIND read -> write; a legal-looking word, so the broker does not
/// break it). The planned waiter, finding its plan gone and no bit yet,
/// goes back to its socket; the holder's end then hands a *write* to the
/// waiter's index. The broker took any bit at the index for the hand-off:
/// the begin was never answered, past its own timeout, and a write bit
/// nobody would ever clear stayed in the word, so nobody could write again.
#[test]
fn a_hand_off_whose_kind_was_changed_still_answers_the_waiter() {
    const NEXT_FIELDS: u64 = 0xff << 40; // NEXT, NEXT_KIND, NEXT_IDX
    const NEXT_KIND_WRITE: u64 = 1 << 41;
    let bus = DbusDaemon::start();
    let mut s = Shared::new(bus.start_broker(None), 4096);
    let mut waiter = s.join(&[]);
    cycle(&mut s.owner, &s.id, "w");
    cycle(&mut waiter, &s.id, "r");
    let (_meddler, _held, word) = holder_with_the_word(&s);

    let write = s.owner.ok(&format!("begin {} w", s.id));
    assert_eq!(field(&write, "word"), Some("true"), "{write}");
    waiter.send(&format!("begin {} r 2000", s.id));
    eventually("the hand-off to be planned", || {
        bus.counter("HandOffsPlanned") == 1 && word.load().0 & NEXT_FIELDS != 0
    });
    // Same waiter index, other kind: not an impossible word.
    let planned = word.load().0;
    word.scribble(planned | NEXT_KIND_WRITE);
    assert!(!word.load().is_impossible());
    // The waiter's next look (100 ms slices) finds no plan for it and no
    // bit: it waits for a reply.
    std::thread::sleep(Duration::from_millis(400));
    s.owner.ok(&format!("end {}", access_of(&write)));
    let answer = waiter.recv(Duration::from_secs(4));
    let answer = answer.unwrap_or_else(|| {
        panic!(
            "the waiter's begin (timeout 2000 ms) was never answered; word now {:#x}",
            word.load().0
        )
    });
    assert!(answer.starts_with("err busy"), "{answer}");
    // The stray write bit left with the failed hand-off: the buffer is
    // free for anyone, the waiter included.
    let again = waiter.ok(&format!("begin {} w 2000", s.id));
    waiter.ok(&format!("end {}", access_of(&again)));
    let again = s.owner.ok(&format!("begin {} r 2000", s.id));
    s.owner.ok(&format!("end {}", access_of(&again)));
}

/// A holder writes where only the broker writes while it arbitrates the
/// buffer (`tamper`), with a writer queued behind two readers held in the
/// word. Cleared `DAEMON` made the readers' ends silent (no `WordEnded`);
/// a changed epoch or a plan the broker never made made it stop looking
/// at the word: either way the broker never learned the buffer was free,
/// and the writer (no timeout) waited until some other decision touched
/// the buffer, even after the meddler had gone. The word patrol breaks
/// such a word within a second and the writer is granted, told the
/// contents may be torn.
fn a_tampered_word_does_not_strand_a_queued_writer(tamper: impl Fn(&BufferWord)) {
    let bus = DbusDaemon::start();
    let mut s = Shared::new(bus.start_broker(None), 4096);
    let mut reader = s.join(&[]);
    let mut writer = s.join(&[]);
    cycle(&mut s.owner, &s.id, "r");
    cycle(&mut reader, &s.id, "r");
    let (meddler, held, word) = holder_with_the_word(&s);

    let a = s.owner.ok(&format!("begin {} r", s.id));
    let b = reader.ok(&format!("begin {} r", s.id));
    assert_eq!(field(&a, "word"), Some("true"), "{a}");
    assert_eq!(field(&b, "word"), Some("true"), "{b}");
    writer.send(&format!("begin {} w", s.id));
    eventually("the writer to queue", || bus.totals(TOTALS_WAITERS) == 1);
    tamper(&word);
    s.owner.ok(&format!("end {}", access_of(&a)));
    reader.ok(&format!("end {}", access_of(&b)));
    let answer = writer.recv(Duration::from_secs(5)).unwrap_or_else(|| {
        panic!(
            "both readers ended, yet the queued writer is not granted (word {:#x})",
            word.load().0
        )
    });
    assert_eq!(field(&answer, "writer_lost"), Some("true"), "{answer}");
    assert_eq!(field(&answer, "word"), Some("false"), "{answer}");
    writer.ok(&format!("end {}", access_of(&answer)));
    // Broken for good: by message from now on, and still exclusive.
    let again = s.owner.ok(&format!("begin {} w 2000", s.id));
    assert_eq!(field(&again, "word"), Some("false"), "{again}");
    reader.send(&format!("begin {} r", s.id));
    assert_eq!(reader.recv(STILL_BLOCKED), None, "read while written");
    s.owner.ok(&format!("end {}", access_of(&again)));
    reader.granted_within(PROMPTLY, "reader after the write");
    drop((word, held, meddler));
}

#[test]
fn a_cleared_daemon_bit_does_not_strand_a_queued_writer() {
    const DAEMON: u64 = 1 << 39;
    a_tampered_word_does_not_strand_a_queued_writer(|word| {
        word.scribble(word.load().0 & !DAEMON);
    });
}

#[test]
fn a_changed_epoch_does_not_strand_a_queued_writer() {
    const EPOCH_ONE: u64 = 1 << 48;
    a_tampered_word_does_not_strand_a_queued_writer(|word| {
        word.scribble(word.load().0.wrapping_add(EPOCH_ONE));
    });
}

/// A word broken under a holder that still has its bit: its access is
/// taken away (the writer queued behind it is granted at once), so it is
/// told, as a hold limit's revocation is told, instead of reading on
/// unaware next to a writer.
#[test]
fn a_holder_still_in_a_broken_word_is_told_its_access_is_revoked() {
    let bus = DbusDaemon::start();
    let mut s = Shared::new(bus.start_broker(None), 4096);
    let mut writer = s.join(&[]);
    cycle(&mut s.owner, &s.id, "r");
    let (meddler, held, word) = holder_with_the_word(&s);
    let read = s.owner.ok(&format!("begin {} r", s.id));
    assert_eq!(field(&read, "word"), Some("true"), "{read}");
    writer.send(&format!("begin {} w", s.id));
    eventually("the writer to queue", || bus.totals(TOTALS_WAITERS) == 1);
    // A writer next to the reader: impossible. Found by the word patrol.
    word.scribble(word.load().0 | 1 << 37 | 3 << 32);
    let write = writer
        .recv(Duration::from_secs(5))
        .expect("the writer is granted once the word is broken");
    assert_eq!(field(&write, "writer_lost"), Some("true"), "{write}");
    // Named by the broker's id for the access and by the buffer: a guard
    // held in the word has no id of its own (`AccessGuard::id` is 0).
    let event = s.owner.ok("event 2000");
    assert!(
        event.contains("AccessRevoked") && event.contains(&format!("buffer: {} ", s.id)),
        "{event} after {read}"
    );
    writer.ok(&format!("end {}", access_of(&write)));
    drop((word, held, meddler));
}

/// A word broken at the broker's first take-over (here another epoch,
/// written by a holder while the word was the holders'): the reader still
/// in it had begun with no message, so no access of the broker's stood for
/// its bit, and it was dropped untold while a writer was granted at once.
/// It is told, with access 0 (its guard's id) and the buffer.
#[test]
fn a_holder_in_a_word_broken_at_first_take_over_is_told() {
    const EPOCH_ONE: u64 = 1 << 48;
    let bus = DbusDaemon::start();
    let mut s = Shared::new(bus.start_broker(None), 4096);
    let mut writer = s.join(&[]);
    cycle(&mut s.owner, &s.id, "r");
    let (meddler, held, word) = holder_with_the_word(&s);
    let read = s.owner.ok(&format!("begin {} r", s.id));
    assert_eq!(field(&read, "word"), Some("true"), "{read}");
    assert!(!word.load().daemon(), "handed back: a fast begin");
    word.scribble(word.load().0.wrapping_add(EPOCH_ONE));
    let write = writer.ok(&format!("begin {} w 2000", s.id));
    assert_eq!(field(&write, "writer_lost"), Some("true"), "{write}");
    let event = s.owner.ok("event 2000");
    assert!(
        event.contains("AccessRevoked { access: 0, buffer: "),
        "the reader still in the word got {event} while {write} writes"
    );
    writer.ok(&format!("end {}", access_of(&write)));
    drop((word, held, meddler));
}

/// A no-autofence reader is handed a writer held in the word as a fence to
/// wait on; then another holder clears `DAEMON`, so the writer's end in
/// the word is silent. Nobody waits in the broker's queue, so nothing
/// made the broker look again: the reader waited for `FenceSignalled`
/// until some other decision touched the buffer. The word patrol also
/// watches words whose holders' fences someone was handed.
#[test]
fn a_fence_handed_out_is_signalled_though_a_holder_cleared_daemon() {
    const DAEMON: u64 = 1 << 39;
    let mut s = Shared::new(Daemon::start(), 4096);
    let mut hw = s.join(&["--no-autofence"]);
    cycle(&mut s.owner, &s.id, "w");
    let (meddler, held, word) = holder_with_the_word(&s);
    let write = s.owner.ok(&format!("begin {} w", s.id));
    assert_eq!(field(&write, "word"), Some("true"), "{write}");
    let granted = hw
        .cmd(&format!("begin {} r", s.id))
        .expect("no-autofence is never blocked");
    let listed = field(&granted, "fence_list")
        .expect("fence list")
        .to_owned();
    let fence = listed.split(':').next().expect("fence id").to_owned();
    assert!(word.load().daemon(), "taken over for the grant");
    word.scribble(word.load().0 & !DAEMON);
    s.owner.ok(&format!("end {}", access_of(&write)));
    let event = hw.ok("event 5000");
    assert!(
        event.contains(&format!("FenceSignalled {{ fence: {fence} }}")),
        "{event} for {fence}"
    );
    drop((word, held, meddler));
}
