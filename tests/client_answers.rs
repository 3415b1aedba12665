//! Buffer answers a client cannot make a `Buffer` of, from a broker played
//! by the test (a broker's bug, or something else listening at the socket
//! path): the fd of an alloc's answer is slot 0, its only one, and the
//! file the answer names. A client that took the last fd of the answer
//! wrapped whatever came last, and mapped memory the broker does not
//! arbitrate; one whose answer came without its fd left the buffer
//! charged to itself until it disconnected.

use std::os::fd::{AsFd, OwnedFd};

use dmabroker_client::{Client, Error};
use dmabroker_ipc::{Reply, ReplyBody, RequestBody, ServerMessage};
use dmabroker_suite::fake_broker::{self, FakeBroker};

/// Answers the alloc with buffer 1 (the inode of `named`) and `sent` as
/// its fds, then heaps (a round trip the test uses to know a give-back
/// had time to arrive).
fn broker_answering_with(named: u64, sent: Vec<OwnedFd>) -> FakeBroker {
    let mut sent = Some(sent);
    FakeBroker::start(1, move |socket, _, id, body| {
        match body {
            RequestBody::Alloc { .. } => {
                let fds = sent.take().unwrap_or_default();
                let message = ServerMessage::Reply(Reply {
                    id,
                    fds: u8::try_from(fds.len()).expect("a few fds"),
                    result: Ok(ReplyBody::Buffer(fake_broker::buffer_info(named))),
                });
                let borrowed: Vec<_> = fds.iter().map(|fd| fd.as_fd()).collect();
                fake_broker::send(socket, &message, &borrowed);
            }
            RequestBody::ListHeaps => {
                fake_broker::reply(socket, id, Ok(ReplyBody::Heaps(Vec::new())));
            }
            _ => {}
        }
        true
    })
}

/// The alloc fails with a protocol error, and the broker is given the
/// buffer back (a `Free` of buffer 1 arrives before the next request).
fn refused_and_given_back(broker: FakeBroker) {
    let client = Client::connect_to(&broker.path).expect("connect");
    match client.alloc(4096) {
        Err(Error::Protocol(why)) => assert!(why.contains("buffer 1"), "{why}"),
        Ok(buffer) => panic!(
            "a Buffer was made of an answer it cannot be made of (its fd: inode {})",
            nix::sys::stat::fstat(std::os::fd::AsRawFd::as_raw_fd(&buffer.as_fd()))
                .map(|st| st.st_ino)
                .unwrap_or(0)
        ),
        Err(other) => panic!("{other}"),
    }
    client.heaps().expect("heaps");
    let seen = broker.seen();
    let freed = seen
        .iter()
        .position(|r| *r == RequestBody::Free { buffer: 1 });
    let heaps = seen.iter().position(|r| *r == RequestBody::ListHeaps);
    assert!(
        freed.is_some() && freed < heaps,
        "buffer 1 was not given back: {seen:?}"
    );
    drop(client);
    broker.join();
}

#[test]
fn a_buffer_answer_with_two_fds_makes_no_buffer_and_gives_it_back() {
    let (buffer, inode) = fake_broker::memfd();
    let (other, _) = fake_broker::memfd();
    refused_and_given_back(broker_answering_with(inode, vec![buffer, other]));
}

#[test]
fn a_buffer_answer_with_the_fd_of_another_file_makes_no_buffer_and_gives_it_back() {
    let (_buffer, inode) = fake_broker::memfd();
    let (other, _) = fake_broker::memfd();
    refused_and_given_back(broker_answering_with(inode, vec![other]));
}

#[test]
fn a_buffer_answer_without_its_fd_gives_the_buffer_back() {
    let (_buffer, inode) = fake_broker::memfd();
    refused_and_given_back(broker_answering_with(inode, Vec::new()));
}

/// `{:?}` of a buffer or a client (a `tracing::debug!(?buffer)` in a
/// camera program) wrote every hold's re-attach secret into the journal,
/// which lets any process of the holder's uid take the buffer over after a
/// broker restart.
#[test]
fn debug_output_of_a_buffer_and_its_client_shows_no_secret() {
    let (buffer, inode) = fake_broker::memfd();
    let broker = broker_answering_with(inode, vec![buffer]);
    let client = Client::connect_to(&broker.path).expect("connect");
    let buffer = client.alloc(4096).expect("alloc");
    let secret = fake_broker::buffer_info(inode).secret;
    let secret_digits = secret.trim_start_matches("dmab1-");
    let shown = format!(
        "{buffer:?} {client:?} {:?}",
        fake_broker::buffer_info(inode)
    );
    assert!(shown.contains("inode"), "{shown}");
    assert!(!shown.contains(secret_digits), "the secret shows: {shown}");
    drop(buffer);
    drop(client);
    broker.join();
}
