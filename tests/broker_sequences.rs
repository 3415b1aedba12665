//! Property test: arbitrary sequences of requests, hang-ups, deaf clients
//! and passing time against an in-process broker never unbalance its books
//! (every byte charged to exactly one client, every buffer held, nothing
//! naming what is gone), and once every client has left nothing remains.
//! `fuzz/fuzz_targets/broker_requests.rs` runs the same driver under
//! libFuzzer.

mod broker_driver;

use broker_driver::{Body, Driver, Op};
use proptest::prelude::*;

/// Sizes that hit every branch: zero, sub-page, page multiples, over the
/// tight policy's limits, and absurd.
fn size() -> impl Strategy<Value = u64> {
    prop_oneof![
        1 => Just(0u64),
        4 => 1u64..20_000,
        4 => (1u64..40).prop_map(|pages| pages * 4096),
        1 => Just(u64::MAX),
        1 => Just(u64::MAX - 4094),
    ]
}

/// Mostly the client's own buffers or accesses, sometimes raw ids.
fn reference() -> impl Strategy<Value = u8> {
    prop_oneof![6 => 0u8..8, 1 => 128u8..144]
}

fn body() -> impl Strategy<Value = Body> {
    prop_oneof![
        1 => (proptest::bool::weighted(0.9), proptest::option::of(any::<bool>()), any::<bool>())
            .prop_map(|(version_ok, autofence, buffer_words)| Body::Hello { version_ok, autofence, buffer_words }),
        1 => Just(Body::ListHeaps),
        6 => (size(), prop_oneof![4 => 0u8..2, 1 => 2u8..4])
            .prop_map(|(size, heap)| Body::Alloc { size, heap }),
        2 => reference().prop_map(|buffer| Body::Free { buffer }),
        3 => reference().prop_map(|buffer| Body::Export { buffer }),
        8 => prop_oneof![4 => 0u8..4, 1 => 128u8..130].prop_map(|token| Body::Import { token }),
        1 => reference().prop_map(|buffer| Body::Info { buffer }),
        1 => Just(Body::Adopt),
        6 => (reference(), 0u8..5, proptest::option::of(0u16..100))
            .prop_map(|(buffer, access, timeout_ms)| Body::Begin { buffer, access, timeout_ms }),
        5 => (reference(), proptest::bool::weighted(0.1))
            .prop_map(|(access, with_fence)| Body::End { access, with_fence }),
        1 => reference().prop_map(|buffer| Body::Reattach { buffer }),
    ]
}

/// What a hostile holder might write into a buffer word: a writer beside
/// readers, stray bits, a plan nobody made, a foreign epoch, anything.
fn word_garbage() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(1u64 << 37 | 0b11),
        Just(u64::MAX),
        Just(0),
        Just(1u64 << 40 | 7 << 43),
        Just(1u64 << 48 | 1),
        any::<u64>(),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let client = 0u8..8;
    prop_oneof![
        1 => proptest::bool::weighted(0.9).prop_map(|hello| Op::Connect { hello }),
        1 => client.clone().prop_map(|client| Op::Disconnect { client }),
        1 => client.clone().prop_map(|client| Op::ToggleDeaf { client }),
        12 => (client.clone(), body(), proptest::bool::weighted(0.2))
            .prop_map(|(client, body, no_reply)| Op::Request { client, body, no_reply }),
        1 => (client.clone(), proptest::collection::vec(any::<u8>(), 0..40), 0u8..5)
            .prop_map(|(client, bytes, fds)| Op::Raw { client, bytes, fds }),
        2 => (0u16..60).prop_map(|ms| Op::Wait { ms }),
        5 => (client.clone(), reference())
            .prop_map(|(client, access)| Op::EndThroughWord { client, access }),
        1 => (client.clone(), reference(), any::<u8>())
            .prop_map(|(client, access, kind)| Op::Scribble { client, access, kind }),
        8 => (client.clone(), 0u8..8, 0u8..3)
            .prop_map(|(client, buffer, access)| Op::WordBegin { client, buffer, access }),
        8 => (client.clone(), any::<u8>())
            .prop_map(|(client, hold)| Op::WordEnd { client, hold }),
        3 => (client.clone(), any::<u8>())
            .prop_map(|(client, hold)| Op::WordEndLate { client, hold }),
        1 => (client, 0u8..8, word_garbage())
            .prop_map(|(client, buffer, value)| Op::WordScribble { client, buffer, value }),
    ]
}

/// `op`, and now and then a `Cancel`. Kept apart from `op` so that the
/// fixed sequences of `generated_sequences_reach_the_interesting_states`
/// stay the ones that reach hand-offs (a new kind in `body` reshuffles
/// every draw).
fn op_or_cancel() -> impl Strategy<Value = Op> {
    prop_oneof![
        24 => op(),
        1 => (0u8..8, reference(), proptest::bool::weighted(0.8)).prop_map(|(client, begin, no_reply)| {
            Op::Request { client, body: Body::Cancel { begin }, no_reply }
        }),
    ]
}

fn run(tight: bool, ops: &[Op]) -> Result<(), TestCaseError> {
    let mut driver = Driver::new(tight);
    for (i, op) in ops.iter().enumerate() {
        if let Err(broken) = driver.step(op) {
            return Err(TestCaseError::fail(format!(
                "after step {i} ({op:?}): {broken}"
            )));
        }
    }
    driver.finish().map_err(TestCaseError::fail)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn request_sequences_keep_the_books_balanced(
        tight in any::<bool>(),
        ops in proptest::collection::vec(op_or_cancel(), 1..200),
    ) {
        run(tight, &ops)?;
    }
}

/// The generated sequences do reach what matters (a proptest that only
/// ever hit refusals would pass vacuously): over a fixed set of sequences,
/// buffers are shared, writers wait and are lost, begins time out, writes
/// are revoked, accesses end through their end words, accesses begin in
/// buffer words and are handed off there, and deaf clients are cut off.
#[test]
fn generated_sequences_reach_the_interesting_states() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let sequences = (any::<bool>(), proptest::collection::vec(op(), 1..200));
    let mut seen = std::collections::BTreeMap::<&str, u64>::new();
    for _ in 0..400 {
        let (tight, ops) = sequences.new_tree(&mut runner).expect("generate").current();
        let mut driver = Driver::new(tight);
        for op in &ops {
            driver.step(op).expect("invariants hold");
        }
        let state = driver.state();
        for (what, n) in [
            ("allocations", state.stats.allocations),
            ("exports", state.stats.exports),
            ("grants", state.stats.grants),
            ("imports", state.stats.imports),
            ("waits", state.stats.waits),
            ("writer_lost", state.stats.writer_lost),
            ("timeouts", state.stats.timeouts),
            ("revocations", state.stats.revocations),
            ("silent_ends", state.stats.silent_ends),
            ("hand_offs_planned", state.stats.hand_offs_planned),
            ("hand_offs", state.stats.hand_offs),
        ] {
            *seen.entry(what).or_default() += n;
        }
        for (code, n) in &state.stats.refusals {
            *seen.entry(code).or_default() += n;
        }
        drop(state);
        *seen.entry("cut_off").or_default() += driver.cut_off;
        *seen.entry("word_begins").or_default() += driver.word_begins;
    }
    eprintln!("reached: {seen:?}");
    for (what, n) in &seen {
        assert!(*n > 0, "no generated sequence reached {what}: {seen:?}");
    }
}

/// A request that wants its reply, for the fixed sequences below.
fn request(client: u8, body: Body) -> Op {
    Op::Request {
        client,
        body,
        no_reply: false,
    }
}

/// A fixed sequence through sharing, a queued writer, a hang-up while
/// holding write access and a timeout, so the driver itself is known to
/// reach the interesting states (a proptest that only ever hit refusals
/// would pass vacuously). It also pins a bug a review found: the queued
/// read's timeout outlived its grant (and every client), a task per begin
/// that a client could keep asleep for as long as it chose.
#[test]
fn the_driver_reaches_sharing_and_handover() {
    let mut driver = Driver::new(false);
    let steps = [
        request(
            0,
            Body::Alloc {
                size: 8192,
                heap: 0,
            },
        ),
        request(0, Body::Export { buffer: 1 }),
        request(1, Body::Import { token: 0 }),
        request(
            0,
            Body::Begin {
                buffer: 1,
                access: 1,
                timeout_ms: None,
            },
        ),
        request(
            1,
            Body::Begin {
                buffer: 1,
                access: 0,
                timeout_ms: Some(50),
            },
        ),
    ];
    for op in &steps {
        driver.step(op).expect("step");
    }
    {
        let state = driver.state();
        assert_eq!(state.buffers.len(), 1);
        assert_eq!(state.buffers[&1].holders.len(), 2, "shared by both clients");
        assert_eq!(
            state.accesses.len(),
            1,
            "the write is held, the read queued"
        );
        assert_eq!(state.waiters.len(), 1);
    }
    driver
        .step(&Op::Disconnect { client: 0 })
        .expect("writer hangs up");
    {
        let state = driver.state();
        assert_eq!(
            state.buffers[&1].holders.len(),
            1,
            "the reader still holds it"
        );
        // Granted in the reader's buffer word (it uses them), so counted
        // with the accesses held there.
        assert_eq!(state.live_fence_count(), 1, "the read was granted");
        assert_eq!(
            state.total_charged(),
            8192,
            "the charge moved to the reader"
        );
    }
    driver.finish().expect("nothing left");
}

/// Found by the fuzzer (`fuzz/regressions/broker_requests/stale-scribble`):
/// a client scribbles on the word an *earlier*, finished access of its own
/// was granted. The broker has since given that word to the client's next
/// access, and the scribble (a blind "ended" of the next generation) ends
/// that one silently while another client waits for it. That client
/// chose not to tell the broker; the waiter is served at the broker's
/// next look at the buffer, here the scribbler's next begin, exactly as
/// if the scribbler had ended by message late.
#[test]
fn a_scribble_on_a_reused_word_is_settled_at_the_next_look() {
    let read_again = request(
        0,
        Body::Begin {
            buffer: 0,
            access: 0,
            timeout_ms: None,
        },
    );
    let mut driver = Driver::new(false);
    let steps = [
        request(
            0,
            Body::Alloc {
                size: 4096,
                heap: 0,
            },
        ),
        request(0, Body::Export { buffer: 0 }),
        request(1, Body::Import { token: 0 }),
        // Access 1 (a read, word 0, generation 1), ended by message: the
        // word is free again.
        read_again.clone(),
        request(
            0,
            Body::End {
                access: 0,
                with_fence: false,
            },
        ),
        // Access 2 gets word 0, generation 2; client 2's write waits for
        // it, so the broker watches that word.
        read_again.clone(),
        request(
            1,
            Body::Begin {
                buffer: 0,
                access: 1,
                timeout_ms: None,
            },
        ),
        // Through access 1's stale word: "ended, generation 2, unwatched".
        Op::Scribble {
            client: 0,
            access: 128 + 1,
            kind: 2,
        },
    ];
    for op in &steps {
        driver.step(op).expect("step");
    }
    {
        let state = driver.state();
        assert_eq!(state.waiters.len(), 1, "the write still waits");
        assert_eq!(state.stats.silent_ends, 0);
    }
    driver.step(&read_again).expect("the scribbler reads again");
    {
        let state = driver.state();
        assert_eq!(state.stats.silent_ends, 1, "the scribbled end was retired");
        let writer_granted = state
            .accesses
            .values()
            .any(|a| a.client == 2 && a.kind == dmabroker_ipc::Access::CpuWrite);
        assert!(writer_granted, "the waiting write was granted");
        assert_eq!(state.waiters.len(), 1, "the new read waits behind it");
    }
    driver.finish().expect("nothing left");
}

/// Clients 1 and 2 (both using buffer words, see the driver) share a
/// buffer; each learns its slot with a first begin by message; then client
/// 1 writes in the word (no message) and client 2's read queues behind it
/// and is told `Planned`.
fn writer_in_the_word_and_reader_planned() -> Driver {
    let mut driver = Driver::new(false);
    driver
        .step(&Op::Connect { hello: true })
        .expect("third client");
    let word_begin = |client, access| Op::WordBegin {
        client,
        buffer: 0,
        access,
    };
    let word_end = |client| Op::WordEnd { client, hold: 0 };
    let steps = [
        request(
            1,
            Body::Alloc {
                size: 4096,
                heap: 0,
            },
        ),
        request(1, Body::Export { buffer: 0 }),
        request(2, Body::Import { token: 0 }),
        // First begins go by message and teach each client its slot.
        word_begin(1, 1),
        word_end(1),
        word_begin(2, 0),
        word_end(2),
        // Now in the word.
        word_begin(1, 1),
        word_begin(2, 0),
    ];
    for op in &steps {
        driver.step(op).expect("step");
    }
    driver
}

/// A fixed sequence through buffer words: a write begun in the word with
/// no message, a reader queued behind it and told `Planned`, the writer's
/// end handing the buffer over in the word, and the word handed back once
/// only bits are left. Clients 1 and 2 use buffer words (client 0 does
/// not, see the driver).
#[test]
fn the_driver_reaches_a_hand_off_in_the_word() {
    let mut driver = writer_in_the_word_and_reader_planned();
    let word_end = |client| Op::WordEnd { client, hold: 0 };
    assert_eq!(driver.word_begins, 1, "the second write began in the word");
    {
        let state = driver.state();
        assert_eq!(state.waiters.len(), 1, "the read waits");
        assert_eq!(state.stats.hand_offs_planned, 1);
    }
    driver.step(&word_end(1)).expect("the writer ends");
    {
        let state = driver.state();
        assert_eq!(state.stats.hand_offs, 1, "handed over in the word");
        assert_eq!(state.waiters.len(), 0);
        assert_eq!(state.live_fence_count(), 1, "the reader holds it");
        let ws = state
            .buffers
            .values()
            .next()
            .and_then(|b| b.word.as_deref());
        assert!(
            ws.is_some_and(|ws| !ws.taken),
            "only a bit left: handed back"
        );
    }
    driver.step(&word_end(2)).expect("the reader ends");
    assert_eq!(driver.state().live_fence_count(), 0);
    driver.finish().expect("nothing left");
}

/// Regression: a holder clears `DAEMON` while the broker has the word
/// taken, with a writer queued behind two readers held in the word. Their
/// ends are then silent (no `WordEnded`): without a look of its own the
/// broker never learned the buffer was free. The word patrol finds the
/// tampered word within `WORD_PATROL`, breaks it and grants the writer, and
/// stops with the last waiter (no task left behind).
#[test]
fn the_word_patrol_breaks_a_word_whose_daemon_bit_a_holder_cleared() {
    const DAEMON: u64 = 1 << 39;
    let mut driver = Driver::new(false);
    driver
        .step(&Op::Connect { hello: true })
        .expect("third client");
    let word_begin = |client| Op::WordBegin {
        client,
        buffer: 0,
        access: 0,
    };
    let word_end = |client| Op::WordEnd { client, hold: 0 };
    let steps = [
        request(
            1,
            Body::Alloc {
                size: 4096,
                heap: 0,
            },
        ),
        request(1, Body::Export { buffer: 0 }),
        request(2, Body::Import { token: 0 }),
        request(1, Body::Export { buffer: 0 }),
        request(0, Body::Import { token: 0 }),
        // First begins go by message and teach each client its slot.
        word_begin(1),
        word_end(1),
        word_begin(2),
        word_end(2),
        // Two reads in the word; client 0 (no words) asks for a write.
        word_begin(1),
        word_begin(2),
        request(
            0,
            Body::Begin {
                buffer: 0,
                access: 1,
                timeout_ms: None,
            },
        ),
    ];
    for op in &steps {
        driver.step(op).expect("step");
    }
    let word = {
        let state = driver.state();
        assert_eq!(state.waiters.len(), 1, "the write waits");
        state
            .buffers
            .values()
            .next()
            .and_then(|b| b.word.as_deref())
            .and_then(|ws| ws.peek())
            .expect("a mapped word")
    };
    assert!(word.daemon(), "taken over for the queued write: {word:?}");
    driver
        .step(&Op::WordScribble {
            client: 1,
            buffer: 0,
            value: word.0 & !DAEMON,
        })
        .expect("the holder clears DAEMON");
    driver.step(&word_end(1)).expect("a silent end");
    driver.step(&word_end(2)).expect("a silent end");
    assert_eq!(driver.state().waiters.len(), 1, "nobody told the broker");
    driver
        .step(&Op::Wait {
            ms: u16::try_from(dmabroker_daemon::broker::WORD_PATROL.as_millis() + 100).expect("ms"),
        })
        .expect("time passes");
    {
        let state = driver.state();
        assert_eq!(state.waiters.len(), 0, "the write was granted");
        let only_the_write = state.accesses.len() == 1
            && state
                .accesses
                .values()
                .all(|a| a.kind == dmabroker_ipc::Access::CpuWrite);
        assert!(only_the_write, "{:?}", state.accesses);
        assert_eq!(state.task_count(), 0, "the patrol stopped");
    }
    driver.finish().expect("nothing left");
}

/// Regression: the holder's `WordEnded` after a hand-off is still in flight
/// when the waiter, already holding the buffer, ends that access and tells
/// the broker. The broker must record the hand-off (the plan was carried
/// out: nothing was left to cancel) even though the waiter's bit is gone
/// again; it once took the missing bit for a cancelled plan and granted
/// the waiter by message, a grant its client had stopped listening for,
/// leaving a read nobody would ever end. (It may answer the request with
/// `Busy`, for a waiter whose plan a holder erased; this one drops it.)
#[test]
fn a_hand_off_ended_before_the_broker_heard_of_it_is_still_recorded() {
    let mut driver = writer_in_the_word_and_reader_planned();
    assert_eq!(driver.state().stats.hand_offs_planned, 1);
    // The writer hands over; its message is still on the way when the
    // reader ends (and tells) in the same step.
    driver
        .step(&Op::WordEndLate { client: 1, hold: 0 })
        .expect("the writer ends");
    driver
        .step(&Op::WordEnd { client: 2, hold: 0 })
        .expect("the reader ends");
    {
        let state = driver.state();
        assert_eq!(state.stats.hand_offs, 1, "recorded as a hand-off");
        assert_eq!(state.waiters.len(), 0);
        assert_eq!(state.live_fence_count(), 0, "no access left behind");
        assert!(state.accesses.is_empty(), "{:?}", state.accesses);
    }
    driver.finish().expect("nothing left");
}

/// `Cancel` names a request by the client's own id. Of another client's
/// queued begin, of the client's own granted begin, or of an id nobody
/// sent, it changes nothing and costs nothing (answered `Ended`, never a
/// protocol error, however often: cancels cross answers as a matter of
/// course). Of the client's own queued begin, it takes the begin out of
/// the queue and answers it `Cancelled`.
#[test]
fn a_cancel_withdraws_only_the_clients_own_queued_begin() {
    let mut driver = Driver::new(false);
    let steps = [
        request(
            0,
            Body::Alloc {
                size: 4096,
                heap: 0,
            },
        ),
        request(0, Body::Export { buffer: 0 }),
        request(1, Body::Import { token: 0 }),
        request(
            0,
            Body::Begin {
                buffer: 0,
                access: 1,
                timeout_ms: None,
            },
        ),
        request(
            1,
            Body::Begin {
                buffer: 0,
                access: 0,
                timeout_ms: None,
            },
        ),
    ];
    for op in &steps {
        driver.step(op).expect("step");
    }
    let (granted, queued) = {
        let state = driver.state();
        assert_eq!(state.accesses.len(), 1, "the write is held");
        assert_eq!(state.waiters.len(), 1, "the read is queued");
        let granted = state.accesses.values().next().map(|a| a.request_id);
        let queued = state.waiters.values().next().map(|w| w.request_id);
        (granted.expect("write"), queued.expect("read"))
    };
    let raw = |id: u64| Body::Cancel {
        begin: 128 + u8::try_from(id).expect("a small request id"),
    };
    let stale = [
        // Another client's queued begin, by its id.
        request(0, raw(queued)),
        // Another client's granted begin.
        request(1, raw(granted)),
        // Nobody's.
        request(1, raw(100)),
    ];
    for op in &stale {
        driver.step(op).expect("a stale cancel");
    }
    // The client's own granted begin, more often than protocol errors
    // are forgiven.
    for _ in 0..10 {
        driver
            .step(&request(0, raw(granted)))
            .expect("a cancel of a granted begin");
    }
    {
        let state = driver.state();
        assert_eq!(state.clients.len(), 2, "nobody was cut off");
        assert_eq!(state.accesses.len(), 1, "the write is still held");
        assert_eq!(state.waiters.len(), 1, "the read still waits");
        assert_eq!(state.stats.refusals.get("cancelled"), None);
    }
    driver
        .step(&request(1, raw(queued)))
        .expect("the reader cancels");
    {
        let state = driver.state();
        assert_eq!(state.waiters.len(), 0, "the read left the queue");
        assert_eq!(state.accesses.len(), 1, "the write is still held");
        assert_eq!(state.stats.refusals.get("cancelled"), Some(&1));
        assert_eq!(state.task_count(), 0, "no timer for a cancelled begin");
    }
    driver.finish().expect("nothing left");
}

/// Cancelling a begin told `Planned` cancels the hand-off in the word:
/// the waiter is woken (its index's plan gone from the word), answered
/// `Cancelled`, and the holder's end hands the buffer to nobody.
#[test]
fn a_cancelled_planned_begin_takes_its_plan_out_of_the_word() {
    let mut driver = writer_in_the_word_and_reader_planned();
    assert_eq!(driver.state().stats.hand_offs_planned, 1);
    driver
        .step(&request(2, Body::Cancel { begin: 0 }))
        .expect("the reader cancels");
    {
        let state = driver.state();
        assert_eq!(state.waiters.len(), 0, "the read left the queue");
        assert_eq!(state.stats.refusals.get("cancelled"), Some(&1));
        let word = state
            .buffers
            .values()
            .next()
            .and_then(|b| b.word.as_deref())
            .and_then(|ws| ws.peek())
            .expect("the buffer's word");
        assert_eq!(word.next(), None, "the plan is still in the word");
    }
    driver
        .step(&Op::WordEnd { client: 1, hold: 0 })
        .expect("the writer ends");
    {
        let state = driver.state();
        assert_eq!(state.stats.hand_offs, 0, "handed off to a cancelled begin");
        assert_eq!(state.live_fence_count(), 0, "no access left behind");
    }
    driver.finish().expect("nothing left");
}

/// The hand-off beat the cancel: the holder's end handed the buffer over
/// in the word before the cancel arrived, with its `WordEnded` still on
/// the way. The cancel finds the plan carried out, records the hand-off
/// (the waiter holds the read) and answers nothing; the waiter's end then
/// leaves nothing behind.
#[test]
fn a_cancel_after_the_hand_off_records_it_and_answers_nothing() {
    let mut driver = writer_in_the_word_and_reader_planned();
    driver
        .step(&Op::WordEndLate { client: 1, hold: 0 })
        .expect("the writer hands over");
    let planned = {
        let state = driver.state();
        state.waiters.values().next().map(|w| w.request_id)
    };
    let planned = planned.expect("the hand-off is not recorded yet");
    driver
        .step(&request(
            2,
            Body::Cancel {
                begin: 128 + u8::try_from(planned).expect("a small request id"),
            },
        ))
        .expect("the reader cancels too late");
    {
        let state = driver.state();
        assert_eq!(state.stats.hand_offs, 1, "recorded as a hand-off");
        assert_eq!(state.waiters.len(), 0);
        assert_eq!(state.stats.refusals.get("cancelled"), None);
        assert_eq!(state.live_fence_count(), 1, "the reader holds it");
    }
    driver
        .step(&Op::WordEnd { client: 2, hold: 0 })
        .expect("the reader ends");
    assert_eq!(driver.state().live_fence_count(), 0);
    driver.finish().expect("nothing left");
}

/// The books balance client by client: an owner's `Free` moves its charge
/// to the longest-standing remaining holder, the one then named owner. A
/// charge moved to another holder kept the totals equal (the only check
/// the driver made), so the books could be wrong client by client with
/// nothing noticing until that client left. Each step checks the books.
#[test]
fn a_charge_moves_to_the_holder_then_named_owner() {
    let mut driver = Driver::new(false);
    let steps = [
        Op::Connect { hello: true },
        Op::Connect { hello: true },
        Op::Connect { hello: true },
        request(
            0,
            Body::Alloc {
                size: 8192,
                heap: 0,
            },
        ),
        request(0, Body::Export { buffer: 1 }),
        request(1, Body::Import { token: 0 }),
        request(2, Body::Import { token: 0 }),
        request(0, Body::Free { buffer: 1 }),
    ];
    for op in &steps {
        driver.step(op).expect("step");
    }
    {
        let state = driver.state();
        assert_eq!(state.buffers[&1].holders.len(), 2, "two importers hold it");
    }
    // No `finish`: its hang-ups would move the charge again, and the
    // totals would catch a wrong one there; the step's check must.
}
