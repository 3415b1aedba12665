//! The client's `_async` begin against the real daemon, when the caller
//! stops waiting: a `tokio::time::timeout` that expires, or the losing
//! branch of a `select!`, drops the begin's future while the broker still
//! has the request queued. Dropping it cancels the begin at the broker
//! (`Cancel`): the request leaves the queue (or its planned hand-off the
//! buffer's word), so the blocking-pool thread that waited for it returns
//! at once and a runtime shutting down does not wait for the buffer's
//! holder. A grant that beat the cancel is still ended at once, as if the
//! caller had dropped the guard, or every other user of the buffer would
//! wait for the abandoned access until this client exits.

use std::future::Future;
use std::time::Duration;

use dmabroker_client::{Access, AccessGuard, Buffer, Client, ErrorCode};
use dmabroker_suite::abandon::{self, assert_shuts_down_promptly, runtime};
use dmabroker_suite::dbus::fields::{BUFFER_HOLDERS, STATS_GRANTS, TOTALS_FENCES, TOTALS_WAITERS};
use dmabroker_suite::dbus::DbusDaemon;
use dmabroker_suite::eventually;

/// How long the caller waits before it gives up on the begin.
const IMPATIENT: Duration = Duration::from_millis(50);
/// How long a begin that must be granted is given (generous for a loaded
/// machine; an access nobody ends is never given back at all).
const PROMPTLY: Duration = Duration::from_secs(2);

/// `give_up_on` with the caller's patience here.
fn give_up_on(
    runtime: &tokio::runtime::Runtime,
    begin: impl Future<Output = dmabroker_client::Result<AccessGuard>>,
) {
    abandon::give_up_on(runtime, IMPATIENT, begin);
}

/// `wait_impatiently` with the caller's patience here.
fn wait_impatiently<F: Future<Output = dmabroker_client::Result<AccessGuard>>>(
    runtime: &tokio::runtime::Runtime,
    begin: &mut std::pin::Pin<Box<F>>,
) {
    abandon::wait_impatiently(runtime, IMPATIENT, begin);
}

/// A buffer one client allocated and another imported, both on the
/// message path (no buffer words): the two clients (kept by the caller to
/// the test's end, so that no hang-up releases what a test watches), the
/// allocator's buffer and the importer's.
fn shared_by_message(daemon: &dmabroker_suite::Daemon) -> ((Client, Client), Buffer, Buffer) {
    let writer = daemon.message_path_client().expect("writer");
    let reader = daemon.message_path_client().expect("reader");
    let buffer = writer.alloc(4096).expect("alloc");
    let theirs = reader
        .import(&buffer.export().expect("export"))
        .expect("import");
    ((writer, reader), buffer, theirs)
}

/// A write by a third process, after the abandoned begin's access came
/// and went.
#[track_caller]
fn assert_writable(buffer: &Buffer, why: &str) {
    match buffer.begin_timeout(Access::CpuWrite, PROMPTLY) {
        Ok(write) => drop(write),
        Err(err) if err.code() == Some(ErrorCode::Timeout) => {
            panic!("{why}: the abandoned access is still held")
        }
        Err(err) => panic!("{why}: {err}"),
    }
}

/// In the word, racing the cancel: the reader is told `Planned`, and the
/// writer's end hands the buffer over in the word in the very moment the
/// caller gives up; the cancel that follows finds the hand-off carried out
/// and changes nothing. Fails if the hand-off becomes no guard (the word
/// holds the read until the client exits, and the next writer times out).
#[test]
fn an_abandoned_async_begin_ends_the_access_handed_off_to_it() {
    let bus = DbusDaemon::start();
    let daemon = bus.start_broker(None);
    let writer = daemon.client();
    let reader = daemon.client();
    let third = daemon.client();
    let buffer = writer.alloc(4096).expect("alloc");
    let token = buffer.export().expect("export");
    let theirs = reader.import(&token).expect("import");
    let next = third.import(&token).expect("import");
    drop(buffer.begin(Access::CpuWrite).expect("learn the slot"));
    drop(theirs.begin(Access::CpuRead).expect("learn the slot"));
    // Made first, dropped last: a runtime waiting for a begin the write
    // holds up must not be dropped before the write when a check fails.
    let runtime = runtime();
    let write = buffer.begin(Access::CpuWrite).expect("write");
    assert!(write.in_word(), "the write must be held in the word");
    let mut begin = Box::pin(theirs.begin_async(Access::CpuRead, None));
    wait_impatiently(&runtime, &mut begin);
    eventually("the read to be told `Planned`", || {
        bus.counter("HandOffsPlanned") == 1
    });
    // The hand-off happens in this thread, in the word, before the cancel
    // is sent.
    drop(write);
    drop(begin);
    eventually("the hand-off", || bus.counter("HandOffs") == 1);
    assert_writable(&next, "a write after the abandoned hand-off");
    assert_shuts_down_promptly(runtime);
}

/// By message, with no timeout, while the writer keeps its write: dropping
/// the begin's future takes the read out of the broker's queue, and the
/// runtime shuts down at once. Fails on a begin that goes on waiting on the
/// blocking pool for a grant that comes only once the writer ends: the
/// queue keeps the read, and dropping the runtime waits for the writer.
#[test]
fn an_abandoned_async_begin_leaves_the_queue_and_lets_the_runtime_go() {
    let bus = DbusDaemon::start();
    let daemon = bus.start_broker(None);
    let (_clients, buffer, theirs) = shared_by_message(&daemon);
    // Made first, dropped last (see above).
    let runtime = runtime();
    let write = buffer.begin(Access::CpuWrite).expect("write");
    give_up_on(&runtime, theirs.begin_async(Access::CpuRead, None));
    eventually("the cancelled read to leave the queue", || {
        bus.totals(TOTALS_WAITERS) == 0
    });
    assert_eq!(bus.totals(TOTALS_FENCES), 1, "only the write is held");
    assert_shuts_down_promptly(runtime);
    let grants = bus.stat(STATS_GRANTS);
    drop(write);
    // Nothing was granted for the cancelled read: the reader's own write
    // is the next grant, and it comes at once.
    let mine = theirs
        .begin_timeout(Access::CpuWrite, PROMPTLY)
        .expect("the reader's write after its cancelled read");
    drop(mine);
    assert_eq!(bus.stat(STATS_GRANTS), grants + 1, "a grant for nobody");
    eventually("every access to end", || bus.totals(TOTALS_FENCES) == 0);
}

/// In the word, with no timeout: the read is told `Planned` and sleeps on
/// the buffer's word; dropping its future cancels the plan, so the
/// sleeping thread wakes, the runtime shuts down at once, and the writer's
/// end hands the buffer to nobody. Fails on a waiter that sleeps on the
/// word until the writer ends (and is then handed a read nobody wanted).
#[test]
fn an_abandoned_planned_begin_cancels_its_hand_off() {
    let bus = DbusDaemon::start();
    let daemon = bus.start_broker(None);
    let writer = daemon.client();
    let reader = daemon.client();
    let third = daemon.client();
    let buffer = writer.alloc(4096).expect("alloc");
    let token = buffer.export().expect("export");
    let theirs = reader.import(&token).expect("import");
    let next = third.import(&token).expect("import");
    drop(buffer.begin(Access::CpuWrite).expect("learn the slot"));
    drop(theirs.begin(Access::CpuRead).expect("learn the slot"));
    // Made first, dropped last: a runtime waiting for a begin the write
    // holds up must not be dropped before the write when a check fails.
    let runtime = runtime();
    let write = buffer.begin(Access::CpuWrite).expect("write");
    assert!(write.in_word(), "the write must be held in the word");
    let mut begin = Box::pin(theirs.begin_async(Access::CpuRead, None));
    wait_impatiently(&runtime, &mut begin);
    eventually("the read to be told `Planned`", || {
        bus.counter("HandOffsPlanned") == 1
    });
    drop(begin);
    eventually("the cancelled read to leave the queue", || {
        bus.totals(TOTALS_WAITERS) == 0
    });
    assert_shuts_down_promptly(runtime);
    drop(write);
    assert_writable(&next, "a write after the cancelled plan");
    assert_eq!(
        bus.counter("HandOffs"),
        0,
        "handed off to a cancelled begin"
    );
    let again = theirs
        .begin_timeout(Access::CpuWrite, PROMPTLY)
        .expect("the reader's write after its cancelled read");
    drop(again);
}

/// The grant wins: the write ends and the broker grants the queued read
/// before the caller gives up, so the future holds a finished begin (its
/// guard made on the blocking pool, no cancel left to send; the broker's
/// side of a late cancel is in tests/broker_sequences.rs), and dropping it
/// drops the guard, which ends the read at once.
/// Then the two orders at random: the write's end and the cancel sent
/// back to back on two connections, twenty times; either way nothing may
/// be left holding the buffer.
#[test]
fn a_cancel_that_races_a_grant_leaves_no_access_behind() {
    let bus = DbusDaemon::start();
    let daemon = bus.start_broker(None);
    let writer = daemon.message_path_client().expect("writer");
    let reader = daemon.message_path_client().expect("reader");
    let third = daemon.message_path_client().expect("third");
    let buffer = writer.alloc(4096).expect("alloc");
    let token = buffer.export().expect("export");
    let theirs = reader.import(&token).expect("import");
    let next = third.import(&token).expect("import");
    let runtime = runtime();

    let write = buffer.begin(Access::CpuWrite).expect("write");
    let mut begin = Box::pin(theirs.begin_async(Access::CpuRead, None));
    wait_impatiently(&runtime, &mut begin);
    eventually("the read to queue", || bus.totals(TOTALS_WAITERS) == 1);
    drop(write);
    eventually("the read to be granted", || {
        bus.totals(TOTALS_WAITERS) == 0 && bus.totals(TOTALS_FENCES) == 1
    });
    drop(begin);
    assert_writable(&next, "a write after a cancel that lost the race");

    for round in 0..20 {
        let write = buffer.begin(Access::CpuWrite).expect("write");
        let mut begin = Box::pin(theirs.begin_async(Access::CpuRead, None));
        wait_impatiently(&runtime, &mut begin);
        eventually("the read to queue", || bus.totals(TOTALS_WAITERS) == 1);
        drop(write);
        drop(begin);
        assert_writable(&next, &format!("round {round}: a write after the race"));
    }
    eventually("every access to end", || bus.totals(TOTALS_FENCES) == 0);
    assert_eq!(bus.totals(TOTALS_WAITERS), 0);
    assert_shuts_down_promptly(runtime);
}

/// The caller gives up and then drops the buffer: the hold is freed at
/// once, not when the begin would have been granted. Fails if the
/// abandoned begin's share of the buffer keeps the hold alive until the
/// writer ends.
#[test]
fn a_buffer_dropped_after_an_abandoned_async_begin_leaves_the_queue() {
    let bus = DbusDaemon::start();
    let daemon = bus.start_broker(None);
    let (_clients, buffer, theirs) = shared_by_message(&daemon);
    let write = buffer.begin(Access::CpuWrite).expect("write");

    let runtime = runtime();
    give_up_on(&runtime, theirs.begin_async(Access::CpuRead, None));
    let id = buffer.id();
    drop(theirs);
    // The reader's hold goes now, while the write is still held: only the
    // writer holds the buffer (the begin's own share of the buffer must
    // not keep the hold).
    eventually("the dropped buffer's hold to go", || {
        let buffers = bus.method("ListBuffers", &[]);
        buffers.as_array().is_some_and(|all| {
            all.iter().any(|b| {
                b[0].as_u64() == Some(id)
                    && b[BUFFER_HOLDERS].as_array().is_some_and(|h| h.len() == 1)
            })
        })
    });
    assert_eq!(bus.totals(TOTALS_WAITERS), 0, "nothing queued");
    assert_eq!(bus.totals(TOTALS_FENCES), 1, "only the write is held");
    drop(write);
    drop(runtime);
}

/// The broker stops reading (it is stopping) with the begin queued, the
/// caller gives up (its `Cancel` waits unread in the socket), then the
/// broker dies. The begin's thread saw the hang-up, reconnected for the
/// whole reconnect window (10 s) and only then noticed nobody waited, and
/// the runtime's shutdown waited for it.
#[test]
fn a_cancelled_begin_does_not_reconnect_for_nobody() {
    let daemon = dmabroker_suite::Daemon::start();
    let (_clients, buffer, theirs) = shared_by_message(&daemon);
    let runtime = runtime();
    let write = buffer.begin(Access::CpuWrite).expect("write");
    let mut begin = Box::pin(theirs.begin_async(Access::CpuRead, None));
    wait_impatiently(&runtime, &mut begin);
    daemon.signal(nix::sys::signal::Signal::SIGSTOP);
    drop(begin);
    daemon.signal(nix::sys::signal::Signal::SIGKILL);
    assert_shuts_down_promptly(runtime);
    drop((write, theirs, buffer));
}

/// As above, with the broker dead first: the begin's thread is already
/// reconnecting (to nobody) when the caller gives up, and stops there.
#[test]
fn a_begin_given_up_on_while_reconnecting_stops_reconnecting() {
    let daemon = dmabroker_suite::Daemon::start();
    let (_clients, buffer, theirs) = shared_by_message(&daemon);
    let runtime = runtime();
    let write = buffer.begin(Access::CpuWrite).expect("write");
    let mut begin = Box::pin(theirs.begin_async(Access::CpuRead, None));
    wait_impatiently(&runtime, &mut begin);
    daemon.signal(nix::sys::signal::Signal::SIGKILL);
    // Long enough for the begin's thread to see the hang-up and start
    // reconnecting.
    std::thread::sleep(Duration::from_millis(200));
    drop(begin);
    assert_shuts_down_promptly(runtime);
    drop((write, theirs, buffer));
}

/// How many buffers the test of a drop in a task frees at once: more
/// frees than a socket's send buffer holds (about 280 small messages at
/// the kernel's default 208 KiB), so some are still owed at the drop.
const FREED_AT_ONCE: u64 = 400;

/// The last `Client` dropped in a task of a current-thread runtime, with
/// frees still owed to a broker that is not reading: the drop's wait for
/// room (up to 1 s, so that the broker hears them before the hang-up) held
/// the runtime's only thread, so no other task ran until it was over; a
/// broker that reads again only once another task has run (here, the
/// task tells it) lost the frees that had not fit. The wait goes to the
/// runtime's blocking pool, which the runtime waits for when dropped: the
/// other task runs at once, and every free arrives before the hang-up.
#[test]
fn the_last_client_dropped_in_a_task_lets_the_runtime_run_while_its_frees_wait() {
    use dmabroker_ipc::{Reply, ReplyBody, RequestBody, ServerMessage};
    use dmabroker_suite::fake_broker::{self, FakeBroker};
    use std::os::fd::AsFd;

    let (other_ran, ran) = std::sync::mpsc::channel::<()>();
    let (memfd, inode) = fake_broker::memfd();
    let (mut allocated, mut waited) = (0, false);
    let broker = FakeBroker::start(1, move |socket, _, id, body| {
        match body {
            RequestBody::Alloc { .. } => {
                allocated += 1;
                let mut info = fake_broker::buffer_info(inode);
                info.id = allocated;
                let answer = ServerMessage::Reply(Reply {
                    id,
                    fds: 1,
                    result: Ok(ReplyBody::Buffer(info)),
                });
                fake_broker::send(socket, &answer, &[memfd.as_fd()]);
            }
            // Busy from the first free until the other task has run.
            RequestBody::Free { .. } if !waited => {
                waited = true;
                let _ = ran.recv_timeout(Duration::from_secs(10));
            }
            _ => {}
        }
        true
    });
    let options = dmabroker_client::ClientOptions {
        reconnect: None,
        buffer_words: false,
        ..Default::default()
    };
    let client = Client::connect_with(&broker.path, options).expect("connect");
    let frames: Vec<Buffer> = (0..FREED_AT_ONCE)
        .map(|_| client.alloc(4096).expect("alloc"))
        .collect();
    // Their frees fill the socket; the rest are owed.
    drop(frames);
    let runtime = runtime();
    runtime.block_on(async move {
        // Runs once the dropping task lets the runtime's thread go.
        let other = tokio::spawn(async move {
            let _ = other_ran.send(());
        });
        drop(client);
        other.await.expect("the other task");
    });
    drop(runtime);
    let freed = broker
        .seen_to_the_end()
        .iter()
        .filter(|request| matches!(request, RequestBody::Free { .. }))
        .count();
    assert_eq!(
        freed as u64, FREED_AT_ONCE,
        "frees lost: the drop held the runtime until its grace was over"
    );
}

/// How long the slow broker below takes to answer a heaps request.
const SLOW_ANSWER: Duration = Duration::from_millis(1000);

/// The calls that wait for the broker had no `_async` twin (`heaps`,
/// `adopt`, `next_event`, `export`, `info`, `end_with_fence`): called in a
/// task, each held the runtime's thread for as long as the broker took
/// (a reconnect: up to 10 s), and on a current-thread runtime no other
/// task ran meanwhile. `heaps_async` waits on the blocking pool: a task
/// ticking every 10 ms keeps ticking while a broker takes 1 s to answer.
#[test]
fn an_async_call_lets_other_tasks_run_while_a_slow_broker_answers() {
    use dmabroker_ipc::{ReplyBody, RequestBody};
    use dmabroker_suite::fake_broker::{self, FakeBroker};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    let broker = FakeBroker::start(1, |socket, _, id, body| {
        if let RequestBody::ListHeaps = body {
            std::thread::sleep(SLOW_ANSWER);
            fake_broker::reply(socket, id, Ok(ReplyBody::Heaps(Vec::new())));
        }
        true
    });
    let client = Client::connect_to(&broker.path).expect("connect");
    let ticks = Arc::new(AtomicU64::new(0));
    let runtime = runtime();
    let counted = Arc::clone(&ticks);
    runtime.block_on(async move {
        let ticker = tokio::spawn(async move {
            loop {
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        client.heaps_async().await.expect("heaps");
        ticker.abort();
    });
    drop(runtime);
    let ticked = ticks.load(Ordering::SeqCst);
    assert!(
        ticked >= 20,
        "the other task ticked {ticked} times in the {SLOW_ANSWER:?} the broker took"
    );
    broker.join();
}

/// A `next_event_async` dropped while it waits (a `select!` taking another
/// branch) leaves the event its blocking-pool thread reads afterwards for
/// the next call, not lost with the future.
#[test]
fn an_event_read_for_a_dropped_async_wait_is_kept_for_the_next_call() {
    use dmabroker_ipc::{Event, EventMessage, ReplyBody, RequestBody, ServerMessage};
    use dmabroker_suite::fake_broker::{self, FakeBroker};

    let broker = FakeBroker::start(1, |socket, _, id, body| {
        if let RequestBody::ListHeaps = body {
            fake_broker::reply(socket, id, Ok(ReplyBody::Heaps(Vec::new())));
            std::thread::sleep(Duration::from_millis(300));
            let event = ServerMessage::Event(EventMessage {
                fds: 0,
                event: Event::FenceSignalled { fence: 9 },
            });
            fake_broker::send(socket, &event, &[]);
        }
        true
    });
    let client = Client::connect_to(&broker.path).expect("connect");
    client.heaps().expect("heaps");
    let runtime = runtime();
    let waited = runtime.block_on(async {
        tokio::time::timeout(
            Duration::from_millis(50),
            client.next_event_async(Some(Duration::from_secs(3))),
        )
        .await
    });
    assert!(waited.is_err(), "the event came early: {waited:?}");
    // The blocking-pool thread reads the event meanwhile.
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(
        client
            .next_event(Some(Duration::from_secs(3)))
            .expect("no error"),
        Some(Event::FenceSignalled { fence: 9 }),
        "the event read for the dropped wait was lost"
    );
    drop(runtime);
    drop(client);
    broker.join();
}

/// A `next_event_async(None)` dropped while it waits (a `select!` taking a
/// ticker's or Ctrl-C's branch) let its blocking-pool thread wait for an
/// event for ever, holding a `Client` and so the connection: a runtime
/// shutting down waits for its blocking threads, and a program that
/// returned from `main` never exited while no event came. The thread now
/// looks between slices of its wait whether the future is still there.
#[test]
fn a_dropped_wait_for_events_without_a_timeout_lets_the_runtime_shut_down() {
    use dmabroker_ipc::{ReplyBody, RequestBody};
    use dmabroker_suite::fake_broker::{self, FakeBroker};

    let broker = FakeBroker::start(1, |socket, _, id, body| {
        if let RequestBody::ListHeaps = body {
            fake_broker::reply(socket, id, Ok(ReplyBody::Heaps(Vec::new())));
        }
        true
    });
    let client = Client::connect_to(&broker.path).expect("connect");
    client.heaps().expect("heaps");
    let runtime = runtime();
    let waited = runtime.block_on(async {
        tokio::select! {
            event = client.next_event_async(None) => Some(event),
            () = tokio::time::sleep(Duration::from_millis(50)) => None,
        }
    });
    assert!(waited.is_none(), "an event came from nowhere: {waited:?}");
    let (done, shut_down) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        drop(runtime);
        let _ = done.send(());
    });
    assert!(
        shut_down.recv_timeout(Duration::from_secs(10)).is_ok(),
        "the runtime's shutdown still waits for the dropped wait's thread"
    );
    drop(client);
    broker.join();
}

/// A `next_event_async(None)` whose broker goes away for good reports it
/// once the reconnect window ends, as `next_event(None)` does. The first
/// fix for a dropped wait's thread waited in slices of 100 ms, each with
/// a reconnect limited to its slice: every slice began a new window, so
/// the window never ended, and the event loop waited for ever on a broker
/// that was gone, reconnecting four times a slice. Found by a review.
#[test]
fn a_wait_for_events_reports_a_broker_gone_for_good() {
    use dmabroker_ipc::{ReplyBody, RequestBody};
    use dmabroker_suite::fake_broker::{self, FakeBroker};

    let broker = FakeBroker::start(1, |socket, _, id, body| {
        if let RequestBody::ListHeaps = body {
            fake_broker::reply(socket, id, Ok(ReplyBody::Heaps(Vec::new())));
            // Hangs up, and listens no more.
            return false;
        }
        true
    });
    let options = dmabroker_client::ClientOptions {
        reconnect: Some(Duration::from_millis(300)),
        ..Default::default()
    };
    let client = Client::connect_with(&broker.path, options).expect("connect");
    client.heaps().expect("heaps");
    broker.join();
    let runtime = runtime();
    let waited = runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), client.next_event_async(None)).await
    });
    match waited {
        Ok(Err(_)) => {}
        Ok(Ok(event)) => panic!("an event from a broker gone: {event:?}"),
        Err(_) => panic!("still waiting 10 s after the broker went for good"),
    }
}

/// A client holding one buffer of a fake broker that hangs up right after
/// allocating it and comes back wedged in its `Reattach`, answered once
/// the test sends on the returned sender; no end to the reconnect window.
/// Two connections only: a re-attach cut off would make the client
/// connect a third time, which nobody accepts.
fn wedged_in_re_attach() -> (
    dmabroker_suite::fake_broker::FakeBroker,
    Client,
    Buffer,
    std::sync::mpsc::Sender<()>,
) {
    use dmabroker_ipc::{ReplyBody, RequestBody};
    use dmabroker_suite::fake_broker::{self, FakeBroker};

    let (memfd, inode) = fake_broker::memfd();
    let (go, wedged) = std::sync::mpsc::channel::<()>();
    let broker = FakeBroker::start(2, move |socket, _, id, body| {
        match body {
            RequestBody::Alloc { .. } => {
                fake_broker::reply_with_buffer(socket, id, &memfd, inode);
                return false;
            }
            RequestBody::Reattach { .. } => {
                let _ = wedged.recv();
                let info = fake_broker::buffer_info(inode);
                fake_broker::reply(socket, id, Ok(ReplyBody::Buffer(info)));
            }
            RequestBody::ListHeaps => {
                fake_broker::reply(socket, id, Ok(ReplyBody::Heaps(Vec::new())));
            }
            _ => {}
        }
        true
    });
    let options = dmabroker_client::ClientOptions {
        reconnect: Some(Duration::MAX),
        ..Default::default()
    };
    let client = Client::connect_with(&broker.path, options).expect("connect");
    let held = client.alloc(4096).expect("alloc");
    (broker, client, held, go)
}

/// Until the broker of [`wedged_in_re_attach`] has the `Reattach`.
async fn re_attach_arrives(broker: &dmabroker_suite::fake_broker::FakeBroker) {
    use dmabroker_ipc::RequestBody;
    while !broker
        .seen()
        .iter()
        .any(|body| matches!(body, RequestBody::Reattach { .. }))
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The runtime whose future was dropped mid re-attach shuts down at once,
/// and the `Reattach`, answered later, still installs the new connection
/// (the client's next call is answered on it).
fn assert_the_runtime_goes_and_the_re_attach_ends(
    runtime: tokio::runtime::Runtime,
    client: &Client,
    go: &std::sync::mpsc::Sender<()>,
) {
    assert_shuts_down_promptly(runtime);
    // Long enough for a thread giving up with its future (in 100 ms
    // slices) to have cut the re-attach off.
    std::thread::sleep(Duration::from_millis(500));
    let _ = go.send(());
    let (answered, heaps) = std::sync::mpsc::channel();
    let asking = client.clone();
    std::thread::spawn(move || {
        let _ = answered.send(asking.heaps().map(|_| ()));
    });
    heaps
        .recv_timeout(Duration::from_secs(10))
        .expect("the re-attach was cut off: the client connected again")
        .expect("heaps on the re-attached connection");
}

/// A `next_event_async(None)` whose thread reconnects, with no end to the
/// reconnect window, to a broker that answers the hello and then no
/// `Reattach`: dropped, its future let the runtime shut down only once the
/// re-attach ended, which was never. A re-attach runs to its end whoever
/// waits (cut off, the buffers re-attached so far would be released with
/// the socket), so it runs on a thread of its own, which the blocking-pool
/// thread stops waiting for once the future is gone; answered later, it
/// still installs the new connection, and the next call hears of it.
#[test]
fn a_dropped_wait_for_events_does_not_keep_the_runtime_through_a_wedged_re_attach() {
    let (broker, client, held, go) = wedged_in_re_attach();
    let runtime = runtime();
    let waited = runtime.block_on(async {
        tokio::select! {
            event = client.next_event_async(None) => Some(event),
            () = re_attach_arrives(&broker) => None,
        }
    });
    assert!(waited.is_none(), "the wait ended first: {waited:?}");
    assert_the_runtime_goes_and_the_re_attach_ends(runtime, &client, &go);
    // The dropped future took nothing: the news of the reconnect is
    // there for the next call, once.
    let news = client.next_event(Some(Duration::ZERO));
    assert!(
        matches!(news, Err(dmabroker_client::Error::Reconnected)),
        "{news:?}"
    );
    let after = client.next_event(Some(Duration::ZERO));
    assert!(matches!(after, Ok(None)), "{after:?}");
    drop((held, client));
    broker.join();
}

/// As for the wait for events, a `begin_async` given up on while its
/// thread re-attaches, with no end to the reconnect window, to a broker
/// wedged there: the runtime waited for the re-attach for ever.
#[test]
fn an_abandoned_begin_does_not_keep_the_runtime_through_a_wedged_re_attach() {
    let (broker, client, held, go) = wedged_in_re_attach();
    let runtime = runtime();
    let begun = runtime.block_on(async {
        tokio::select! {
            begun = held.begin_async(Access::CpuRead, None) => Some(begun),
            () = re_attach_arrives(&broker) => None,
        }
    });
    assert!(begun.is_none(), "the begin ended first: {begun:?}");
    assert_the_runtime_goes_and_the_re_attach_ends(runtime, &client, &go);
    drop((held, client));
    broker.join();
}
