//! The client's calls that take a time limit, against a broker played by
//! the test: the shortest limit still looks at what has arrived.

use std::os::fd::OwnedFd;
use std::time::Duration;

use dmabroker_client::Client;
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
