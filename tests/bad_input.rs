//! Bad input gets a clear error or a disconnect, changes nothing, leaks no
//! fd, and never stops the daemon serving everyone else.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use dmabroker_ipc::{
    Access, ErrorCode, Hello, RequestBody, MAX_ACCESSES_PER_BUFFER, PROTOCOL_VERSION,
};
use dmabroker_suite::raw::RawClient;
use dmabroker_suite::Daemon;

fn some_fds(n: usize) -> Vec<OwnedFd> {
    (0..n)
        .map(|_| {
            std::fs::File::open("/dev/null")
                .expect("open /dev/null")
                .into()
        })
        .collect()
}

fn borrowed(fds: &[OwnedFd]) -> Vec<BorrowedFd<'_>> {
    fds.iter().map(|f| f.as_fd()).collect()
}

fn hello_body(version: u32) -> RequestBody {
    RequestBody::Hello(Hello {
        version,
        features: 0,
        autofence: None,
        client_name: "bad".into(),
    })
}

/// The daemon still serves a well-behaved client.
fn still_serving(daemon: &Daemon) {
    let client = daemon.client();
    assert_eq!(client.alloc(4096).expect("alloc").size(), 4096);
}

#[test]
fn garbage_truncated_and_unknown_messages_get_protocol_errors() {
    let daemon = Daemon::start();
    let baseline = daemon.baseline();
    let mut raw = RawClient::connect(daemon.socket());
    raw.hello();

    raw.send_raw(b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff", &[]);
    let (id, result) = raw.recv_reply().expect("reply to garbage");
    assert_eq!((id, result.err()), (0, Some(ErrorCode::ProtocolError)));

    let (_, full) = raw.encode(
        RequestBody::Alloc {
            size: 4096,
            heap: Some("memfd".into()),
            name: Some("x".into()),
        },
        0,
    );
    raw.send_raw(&full[..full.len() - 3], &[]);
    let (_, result) = raw.recv_reply().expect("reply to truncated");
    assert_eq!(result.err(), Some(ErrorCode::ProtocolError));

    // A request kind from the future: the head is readable, so the error
    // names the request.
    let (id, mut unknown) = raw.encode(RequestBody::ListHeaps, 0);
    let last = unknown.len() - 1;
    unknown[last] = 0x7f;
    raw.send_raw(&unknown, &[]);
    assert_eq!(
        raw.recv_reply().expect("reply"),
        (id, Err(ErrorCode::ProtocolError))
    );

    let oversized = vec![0u8; dmabroker_ipc::MAX_MESSAGE_SIZE + 100];
    raw.send_raw(&oversized, &[]);
    let (_, result) = raw.recv_reply().expect("reply to oversized");
    assert_eq!(result.err(), Some(ErrorCode::ProtocolError));

    // Nothing was allocated, and the connection still works.
    assert!(raw.request(RequestBody::ListHeaps).is_ok());
    drop(raw);
    still_serving(&daemon);
    daemon.assert_fds_back_to(baseline);
}

#[test]
fn fds_that_do_not_belong_are_refused_and_closed() {
    let daemon = Daemon::start();
    let baseline = daemon.baseline();
    let mut raw = RawClient::connect(daemon.socket());
    raw.hello();
    let fds = some_fds(3);

    // More fds than declared.
    let (id, bytes) = raw.encode(RequestBody::ListHeaps, 1);
    raw.send_raw(&bytes, &borrowed(&fds));
    assert_eq!(
        raw.recv_reply().expect("reply"),
        (id, Err(ErrorCode::ProtocolError))
    );

    // Declared, but the request takes none.
    let (id, bytes) = raw.encode(RequestBody::ListHeaps, 1);
    raw.send_raw(&bytes, &borrowed(&fds[..1]));
    assert_eq!(
        raw.recv_reply().expect("reply"),
        (id, Err(ErrorCode::ProtocolError))
    );

    // Fewer than declared.
    let (id, bytes) = raw.encode(RequestBody::Adopt { name: None }, 2);
    raw.send_raw(&bytes, &borrowed(&fds[..1]));
    assert_eq!(
        raw.recv_reply().expect("reply"),
        (id, Err(ErrorCode::ProtocolError))
    );

    // A foreign fd offered for adoption: not a dma-buf.
    let (id, bytes) = raw.encode(RequestBody::Adopt { name: None }, 1);
    raw.send_raw(&bytes, &borrowed(&fds[..1]));
    assert_eq!(
        raw.recv_reply().expect("reply"),
        (id, Err(ErrorCode::NotADmaBuf))
    );

    // A flood: 253 fds (SCM_MAX_FD) on one message.
    let flood = some_fds(253);
    let (flood_id, bytes) = raw.encode(RequestBody::ListHeaps, 253);
    raw.send_raw(&bytes, &borrowed(&flood));
    // Answered under its own id: its bytes arrived whole (it was id 0,
    // which answers no request).
    assert_eq!(
        raw.recv_reply().expect("reply to fd flood"),
        (flood_id, Err(ErrorCode::ProtocolError))
    );

    assert!(
        raw.request(RequestBody::ListHeaps).is_ok(),
        "connection survives"
    );
    drop(raw);
    still_serving(&daemon);
    daemon.assert_fds_back_to(baseline);
}

#[test]
fn the_hello_comes_first_and_versions_must_match() {
    let daemon = Daemon::start();
    let mut raw = RawClient::connect(daemon.socket());
    assert_eq!(
        raw.request(RequestBody::ListHeaps).err(),
        Some(ErrorCode::HelloRequired)
    );
    raw.hello();
    assert_eq!(
        raw.request(hello_body(PROTOCOL_VERSION)).err(),
        Some(ErrorCode::HelloRequired),
        "a second hello is refused"
    );

    let mut old = RawClient::connect(daemon.socket());
    assert_eq!(
        old.request(hello_body(PROTOCOL_VERSION + 41)).err(),
        Some(ErrorCode::IncompatibleVersion)
    );
    assert!(
        old.recv().is_none(),
        "an incompatible client is disconnected"
    );
    still_serving(&daemon);
}

#[test]
fn double_free_and_unknown_ids_are_refused() {
    let daemon = Daemon::start();
    let mut raw = RawClient::connect(daemon.socket());
    raw.hello();
    let buffer = match raw.request(RequestBody::Alloc {
        size: 4096,
        heap: None,
        name: None,
    }) {
        Ok(dmabroker_ipc::ReplyBody::Buffer(info)) => info.id,
        other => panic!("alloc: {other:?}"),
    };
    assert!(raw.request(RequestBody::Free { buffer }).is_ok());
    assert_eq!(
        raw.request(RequestBody::Free { buffer }).err(),
        Some(ErrorCode::UnknownBuffer)
    );
    assert_eq!(
        raw.request(RequestBody::Info { buffer: 999_999 }).err(),
        Some(ErrorCode::UnknownBuffer)
    );
    assert_eq!(
        raw.request(RequestBody::End {
            access: 424_242,
            fence_slot: None
        })
        .err(),
        Some(ErrorCode::UnknownAccess)
    );
    assert_eq!(
        raw.request(RequestBody::Import {
            token: "not a token".into()
        })
        .err(),
        Some(ErrorCode::UnknownToken)
    );
}

#[test]
fn a_client_that_keeps_sending_garbage_is_disconnected() {
    let daemon = Daemon::start();
    let baseline = daemon.baseline();
    let mut raw = RawClient::connect(daemon.socket());
    raw.hello();
    let mut hung_up = false;
    for _ in 0..32 {
        // The broker answers the last malformed message it accepts and
        // hangs up at once, so the next send may already find it gone.
        if raw.try_send_raw(b"\x00\x01garbage", &[]).is_err() || raw.recv().is_none() {
            hung_up = true;
            break;
        }
    }
    assert!(
        hung_up,
        "the daemon keeps talking to a client that only sends garbage"
    );
    drop(raw);
    still_serving(&daemon);
    daemon.assert_fds_back_to(baseline);
}

/// A client cut off with messages of its own still unread reads every
/// answer the broker sent it, then the hang-up. A socket closed with its
/// peer's messages unread resets the peer, which then saw `ECONNRESET`
/// where the broker's last answers (the reason it was cut off) were.
#[test]
fn a_client_cut_off_with_messages_unread_reads_its_last_answers_first() {
    use dmabroker_ipc::codec::decode_server_message;
    use dmabroker_ipc::fdpass::{recv_message, RecvError};
    use dmabroker_ipc::ServerMessage;
    let daemon = Daemon::start();
    let baseline = daemon.baseline();
    let mut raw = RawClient::connect(daemon.socket());
    raw.hello();
    // Far more than the broker takes (it cuts a client off at its 8th
    // malformed message), all queued before it reads any of them.
    daemon.signal(nix::sys::signal::Signal::SIGSTOP);
    for _ in 0..64 {
        raw.send_raw(b"\x00\x01garbage", &[]);
    }
    daemon.signal(nix::sys::signal::Signal::SIGCONT);
    let mut answers = 0;
    loop {
        match recv_message(raw.fd(), false) {
            Ok(got) => match decode_server_message(&got.bytes).expect("decode") {
                ServerMessage::Reply(reply) => {
                    assert_eq!(
                        reply.result.map_err(|e| e.code),
                        Err(ErrorCode::ProtocolError)
                    );
                    answers += 1;
                }
                other => panic!("unexpected {other:?}"),
            },
            Err(RecvError::Closed) => break,
            Err(err) => panic!("after {answers} answers: {err}"),
        }
    }
    assert_eq!(
        answers, 8,
        "every malformed message up to the cut-off is answered"
    );
    drop(raw);
    still_serving(&daemon);
    daemon.assert_fds_back_to(baseline);
}

/// A client that closes with answers of the broker's unread resets the
/// broker's socket, and the broker's next receive fails `ECONNRESET`
/// ahead of what the client sent last. Taken for the hang-up, a writer's
/// pipelined `End` sent just before it exited was never handled: the
/// write counted as a writer's death and the next reader was told the
/// frame was torn.
#[test]
fn a_writer_that_ends_and_closes_with_answers_unread_is_not_taken_for_dead() {
    use dmabroker_ipc::fdpass::send_message;
    use dmabroker_ipc::ReplyBody;
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let daemon = Daemon::start();
    let mut writer = RawClient::connect(daemon.socket());
    writer.hello();
    let buffer = writer.alloc();
    let token = writer.export(buffer);
    let mut reader = RawClient::connect(daemon.socket());
    reader.hello();
    let theirs = reader.import(token);
    let access = match writer.request(RequestBody::Begin {
        buffer,
        access: Access::CpuWrite,
        timeout_ms: None,
    }) {
        Ok(ReplyBody::Granted(grant)) => grant.access,
        other => panic!("begin: {other:?}"),
    };
    // An answer the writer will never read, there before it closes.
    let (_, info) = writer.encode(RequestBody::Info { buffer }, 0);
    writer.send_raw(&info, &[]);
    let mut ready = [PollFd::new(writer.fd(), PollFlags::POLLIN)];
    assert_eq!(
        poll(&mut ready, PollTimeout::from(10_000u16)).expect("poll"),
        1,
        "the info answer"
    );
    // The end and the close reach the broker together.
    daemon.signal(nix::sys::signal::Signal::SIGSTOP);
    let end = writer.encode_one_way(RequestBody::End {
        access,
        fence_slot: None,
    });
    send_message(writer.fd(), &end, &[], false).expect("send the end");
    drop(writer);
    daemon.signal(nix::sys::signal::Signal::SIGCONT);

    match reader.request(RequestBody::Begin {
        buffer: theirs,
        access: Access::CpuRead,
        timeout_ms: Some(5_000),
    }) {
        Ok(ReplyBody::Granted(grant)) => assert!(
            !grant.writer_lost,
            "a write ended before its writer closed was reported lost"
        ),
        other => panic!("begin: {other:?}"),
    }
}

/// A message that decodes but breaks the protocol in its body (an fd slot
/// that does not exist) counts towards the cut-off like garbage does: the
/// count must not be reset by the very message that breaks it.
#[test]
fn a_client_that_keeps_naming_a_missing_fd_slot_is_disconnected() {
    let daemon = Daemon::start();
    let baseline = daemon.baseline();
    let mut raw = RawClient::connect(daemon.socket());
    raw.hello();
    let fence = some_fds(1);
    let mut hung_up = false;
    for _ in 0..32 {
        let (_, bytes) = raw.encode(
            RequestBody::End {
                access: 1,
                fence_slot: Some(5),
            },
            1,
        );
        if raw.try_send_raw(&bytes, &borrowed(&fence)).is_err() {
            hung_up = true;
            break;
        }
        match raw.recv_reply() {
            Some((_, result)) => assert_eq!(result.err(), Some(ErrorCode::ProtocolError)),
            None => {
                hung_up = true;
                break;
            }
        }
    }
    assert!(
        hung_up,
        "the daemon keeps talking to a client that only breaks the protocol"
    );
    drop(raw);
    still_serving(&daemon);
    daemon.assert_fds_back_to(baseline);
}

/// A refusal quotes what was asked for. A request near the size limit must
/// still get its answer: a reply that would not fit was never sent, and the
/// client waited forever.
#[test]
fn a_request_near_the_size_limit_still_gets_its_refusal() {
    let daemon = Daemon::start();
    let mut raw = RawClient::connect(daemon.socket());
    raw.hello();
    let huge = "h".repeat(dmabroker_ipc::MAX_MESSAGE_SIZE - 40);
    let request = RequestBody::Alloc {
        size: 4096,
        heap: Some(huge.clone()),
        name: None,
    };
    assert!(raw.encode(request.clone(), 0).1.len() <= dmabroker_ipc::MAX_MESSAGE_SIZE);
    assert!(
        matches!(
            raw.request(request).err(),
            Some(ErrorCode::UnknownHeap | ErrorCode::InvalidArgument)
        ),
        "an unknown, absurdly long heap name is refused"
    );
    let (_, reply) = raw.encode(RequestBody::Import { token: huge }, 0);
    raw.send_raw(&reply, &[]);
    let (_, result) = raw.recv_reply().expect("a reply to an absurdly long token");
    assert_eq!(result.err(), Some(ErrorCode::UnknownToken));
    still_serving(&daemon);
}

/// Every access on a buffer is a fence that a conflicting no-autofence
/// grant lists. Unbounded, a client holding some 13,000 reads made the next
/// writer's grant too large to send: the writer waited forever while the
/// broker counted its write as held. One buffer takes a bounded number of
/// accesses, and a grant listing all of them fits in a message.
#[test]
fn a_buffer_takes_a_bounded_number_of_accesses_and_every_grant_is_sent() {
    let daemon = Daemon::start();
    let no_autofence = || {
        let mut raw = RawClient::connect(daemon.socket());
        raw.hello_no_autofence();
        raw
    };
    let mut writer = no_autofence();
    let buffer = writer.alloc();
    let token = writer.export(buffer);
    let mut readers = no_autofence();
    let shared = readers.import(token);
    let read = || RequestBody::Begin {
        buffer: shared,
        access: Access::CpuRead,
        timeout_ms: None,
    };
    let mut reads = Vec::new();
    for n in 0..MAX_ACCESSES_PER_BUFFER {
        match readers.request(read()) {
            Ok(dmabroker_ipc::ReplyBody::Granted(grant)) => reads.push(grant.access),
            other => panic!("read {n}: {other:?}"),
        }
    }
    assert_eq!(
        readers.request(read()).err(),
        Some(ErrorCode::Busy),
        "one more than the buffer takes is refused"
    );
    match writer.request(RequestBody::Begin {
        buffer,
        access: Access::CpuWrite,
        timeout_ms: None,
    }) {
        Err(ErrorCode::Busy) => {}
        other => panic!("the full buffer refuses the write too: {other:?}"),
    }
    // With room for one more, the write is granted, listing every read.
    let ended = reads.pop().expect("a read");
    assert!(readers
        .request(RequestBody::End {
            access: ended,
            fence_slot: None,
        })
        .is_ok());
    match writer.request(RequestBody::Begin {
        buffer,
        access: Access::CpuWrite,
        timeout_ms: None,
    }) {
        Ok(dmabroker_ipc::ReplyBody::Granted(grant)) => {
            assert_eq!(grant.fences.len(), MAX_ACCESSES_PER_BUFFER - 1)
        }
        other => panic!("the write: {other:?}"),
    }
    still_serving(&daemon);
}

#[test]
fn a_slow_reader_gets_every_queued_reply_in_order() {
    // More replies than the socket buffer holds: the rest wait in the
    // client's outbox and must follow, in order, as it reads.
    let daemon = Daemon::start();
    let mut raw = RawClient::connect(daemon.socket());
    raw.hello();
    let mut ids = Vec::new();
    for _ in 0..400 {
        let (id, bytes) = raw.encode(RequestBody::ListHeaps, 0);
        raw.send_raw(&bytes, &[]);
        ids.push(id);
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    for id in ids {
        let (got, result) = raw.recv_reply().expect("every reply arrives");
        assert_eq!(got, id, "replies stay in request order");
        assert!(result.is_ok());
    }
    still_serving(&daemon);
}

/// `Cancel` is feature bit 5: a client that did not ask for it in its
/// hello (it could not read the `Cancelled` answer) is refused
/// `Unsupported`, under the cancel's own id, and its begin stays queued
/// and is granted as if nothing had been sent.
#[test]
fn a_cancel_without_the_feature_is_unsupported_and_changes_nothing() {
    let daemon = Daemon::start();
    let mut owner = RawClient::connect(daemon.socket());
    owner.hello();
    let buffer = owner.alloc();
    let token = owner.export(buffer);
    let mut reader = RawClient::connect(daemon.socket());
    reader.hello();
    let theirs = reader.import(token);
    let write = match owner.request(RequestBody::Begin {
        buffer,
        access: Access::CpuWrite,
        timeout_ms: None,
    }) {
        Ok(dmabroker_ipc::ReplyBody::Granted(grant)) => grant.access,
        other => panic!("write: {other:?}"),
    };
    let begin = reader.send_request(RequestBody::Begin {
        buffer: theirs,
        access: Access::CpuRead,
        timeout_ms: None,
    });
    assert_eq!(
        reader.request(RequestBody::Cancel { request: begin }),
        Err(ErrorCode::Unsupported)
    );
    owner
        .request(RequestBody::End {
            access: write,
            fence_slot: None,
        })
        .expect("end the write");
    match reader.recv_reply() {
        Some((id, Ok(dmabroker_ipc::ReplyBody::Granted(_)))) if id == begin => {}
        other => panic!("the queued read after a refused cancel: {other:?}"),
    }
    still_serving(&daemon);
}
