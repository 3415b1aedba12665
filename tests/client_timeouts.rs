//! The client's calls that take a time limit, against a broker played by
//! the test: the shortest limit still looks at what has arrived, and the
//! longest means "no limit" rather than a panic.

use std::os::fd::OwnedFd;
use std::time::Duration;

use dmabroker_client::{Access, Client, ClientOptions};
use dmabroker_ipc::{Event, EventMessage, ReplyBody, RequestBody, ServerMessage};
use dmabroker_suite::fake_broker::{self, FakeBroker};

/// Heaps are answered, then an event follows on its own.
fn heaps_then_event(socket: &OwnedFd, _: usize, id: u64, body: &RequestBody) -> bool {
    if let RequestBody::ListHeaps = body {
        fake_broker::reply(socket, id, Ok(ReplyBody::Heaps(Vec::new())));
        let event = ServerMessage::Event(EventMessage {
            fds: 0,
            event: Event::FenceSignalled { fence: 5 },
        });
        fake_broker::send(socket, &event, &[]);
    }
    true
}

/// A single-threaded no-autofence client polls for fence events between
/// frames with `next_event(Some(Duration::ZERO))`. The event was already in
/// the socket, but a zero timeout returned `None` before ever reading it:
/// the program never heard of the fence.
#[test]
fn next_event_with_a_zero_timeout_reads_what_is_waiting_in_the_socket() {
    let broker = FakeBroker::start(1, heaps_then_event);
    let client = Client::connect_to(&broker.path).expect("connect");
    client.heaps().expect("heaps");
    // The event is sent right after the heaps reply: give it time to arrive.
    std::thread::sleep(Duration::from_millis(200));
    let polled = client.next_event(Some(Duration::ZERO)).expect("no error");
    assert_eq!(
        polled,
        Some(Event::FenceSignalled { fence: 5 }),
        "an event already in the socket was not returned by a zero-timeout poll"
    );
    assert_eq!(
        client.next_event(Some(Duration::ZERO)).expect("no error"),
        None,
        "nothing more came"
    );
    drop(client);
    broker.join();
}

/// `Duration::MAX` as "no limit" panicked (Instant overflow) instead of
/// waiting for the event.
#[test]
fn next_event_with_the_longest_timeout_waits_for_the_event() {
    let broker = FakeBroker::start(1, heaps_then_event);
    let client = Client::connect_to(&broker.path).expect("connect");
    client.heaps().expect("heaps");
    let event = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        client.next_event(Some(Duration::MAX))
    }));
    let event = event.expect("next_event(Some(Duration::MAX)) panicked");
    assert_eq!(
        event.expect("no error"),
        Some(Event::FenceSignalled { fence: 5 })
    );
    drop(client);
    broker.join();
}

/// A broker whose one buffer (a memfd standing for it) is granted to every
/// begin at once.
fn allocating_and_granting() -> FakeBroker {
    let (fd, inode) = fake_broker::memfd();
    FakeBroker::start(1, move |socket, _, id, body| {
        match body {
            RequestBody::Alloc { .. } => fake_broker::reply_with_buffer(socket, id, &fd, inode),
            RequestBody::Begin { access, .. } => {
                let grant = fake_broker::grant(7, *access);
                fake_broker::reply(socket, id, Ok(ReplyBody::Granted(grant)));
            }
            _ => {}
        }
        true
    })
}

/// `begin_timeout(access, Duration::MAX)` panicked (Instant overflow)
/// instead of waiting as long as it takes.
#[test]
fn begin_timeout_with_the_longest_timeout_is_granted() {
    let broker = allocating_and_granting();
    let client = Client::connect_to(&broker.path).expect("connect");
    let buffer = client.alloc(4096).expect("alloc");
    let begun = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        buffer.begin_timeout(Access::CpuRead, Duration::MAX)
    }));
    let guard = begun
        .expect("begin_timeout(Duration::MAX) panicked")
        .expect("granted");
    assert_eq!(guard.id(), 7);
    // Not the longest limit the wire can say (49 days): none.
    let seen = broker.seen();
    assert!(
        seen.iter().any(|body| matches!(
            body,
            RequestBody::Begin {
                timeout_ms: None,
                ..
            }
        )),
        "{seen:?}"
    );
    drop((guard, buffer, client));
    broker.join();
}

/// A 50-day `begin_timeout` is longer than the wire's `timeout_ms` can
/// say (u32::MAX ms, about 49.7 days), but an `Instant` holds it: it is a
/// limit, not "no limit". It was sent as `timeout_ms: None`, and the begin
/// could wait forever; the longest limit the wire can say is the nearest.
#[test]
fn begin_timeout_longer_than_the_wire_can_say_asks_for_the_longest_limit() {
    let broker = allocating_and_granting();
    let client = Client::connect_to(&broker.path).expect("connect");
    let buffer = client.alloc(4096).expect("alloc");
    let fifty_days = Duration::from_secs(50 * 24 * 3600);
    let guard = buffer
        .begin_timeout(Access::CpuRead, fifty_days)
        .expect("granted");
    let seen = broker.seen();
    let asked: Vec<_> = seen
        .iter()
        .filter_map(|body| match body {
            RequestBody::Begin { timeout_ms, .. } => Some(*timeout_ms),
            _ => None,
        })
        .collect();
    assert_eq!(
        asked,
        [Some(u32::MAX)],
        "a 50-day begin timeout was not sent as the longest limit: {seen:?}"
    );
    drop((guard, buffer, client));
    broker.join();
}

/// `begin_async(access, Some(Duration::MAX))` panicked on the blocking
/// pool (Instant overflow), and the future failed with a task error.
#[test]
fn begin_async_with_the_longest_timeout_is_granted() {
    let broker = allocating_and_granting();
    let client = Client::connect_to(&broker.path).expect("connect");
    let buffer = client.alloc(4096).expect("alloc");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let guard = runtime
        .block_on(buffer.begin_async(Access::CpuRead, Some(Duration::MAX)))
        .expect("begin_async(Some(Duration::MAX)) granted");
    assert_eq!(guard.id(), 7);
    drop((guard, buffer, client));
    broker.join();
}

/// `ClientOptions::reconnect = Some(Duration::MAX)` ("keep trying") made
/// the first reconnect panic (Instant overflow) when the broker restarted.
#[test]
fn a_reconnect_window_of_the_longest_duration_reconnects() {
    // The first connection hangs up at the first heaps request; the second
    // answers it.
    let broker = FakeBroker::start(2, |socket, connection, id, body| {
        if let RequestBody::ListHeaps = body {
            if connection == 1 {
                return false;
            }
            fake_broker::reply(socket, id, Ok(ReplyBody::Heaps(Vec::new())));
        }
        true
    });
    let options = ClientOptions {
        reconnect: Some(Duration::MAX),
        ..Default::default()
    };
    let client = Client::connect_with(&broker.path, options).expect("connect");
    let heaps = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| client.heaps()));
    heaps
        .expect("a reconnect with a window of Duration::MAX panicked")
        .expect("heaps after the reconnect");
    assert_eq!(client.reconnects(), 1);
    drop(client);
    broker.join();
}

/// A socket that takes the connection but never answers the hello (a
/// broker stopped with a signal, something else listening): the connect
/// blocked for ever, with no bound at all. It gives up at the end of the
/// reconnect window, with a connect error that says it timed out.
#[test]
fn a_connect_whose_hello_is_never_answered_gives_up_at_the_window() {
    let dir = dmabroker_suite::tmp::TempDir::new("silent-broker");
    let path = dir.path().join("socket");
    // Listening, never accepting: the kernel's queue takes the connect.
    let _listener = fake_broker::listening_at(&path);
    let (done, connected) = std::sync::mpsc::channel();
    let connecting = path.clone();
    std::thread::spawn(move || {
        let options = ClientOptions {
            reconnect: Some(Duration::from_millis(300)),
            ..Default::default()
        };
        let started = std::time::Instant::now();
        let answer = Client::connect_with(&connecting, options).map(drop);
        let _ = done.send((answer, started.elapsed()));
    });
    let (answer, took) = connected
        .recv_timeout(Duration::from_secs(10))
        .expect("the connect never returned");
    match answer {
        Err(dmabroker_client::Error::Connect { source, .. }) => {
            assert_eq!(source.kind(), std::io::ErrorKind::TimedOut, "{source}");
        }
        other => panic!("not a timed-out connect: {other:?}"),
    }
    assert!(
        took >= Duration::from_millis(300),
        "gave up early: {took:?}"
    );
}

/// With a short reconnect window, a connect that failed for a reason of
/// its own (no socket there) once the window had passed was reported as
/// timed out, hiding the reason. Only a wait that ran out is told as one.
#[test]
fn a_connect_refused_for_its_own_reason_keeps_it_however_short_the_window() {
    let dir = dmabroker_suite::tmp::TempDir::new("no-broker");
    let options = ClientOptions {
        reconnect: Some(Duration::ZERO),
        ..Default::default()
    };
    match Client::connect_with(dir.path().join("socket"), options) {
        Err(dmabroker_client::Error::Connect { source, .. }) => {
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound, "{source}");
        }
        other => panic!("not a failed connect: {:?}", other.map(drop)),
    }
}
