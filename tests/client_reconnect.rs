//! The client crate against a scripted broker: how a call behaves when the
//! broker hangs up with errors of earlier, unwaited requests still unread.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use dmabroker_client::{Client, ClientOptions};
use dmabroker_ipc::codec::{decode_request, encode_server_message};
use dmabroker_ipc::fdpass::{recv_message, send_message};
use dmabroker_ipc::{
    ErrorCode, Reply, ReplyBody, RequestBody, ServerMessage, Welcome, WireError, PROTOCOL_VERSION,
};
use dmabroker_suite::tmp::TempDir;
use nix::sys::socket::{
    accept, bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
};

fn reply(socket: &OwnedFd, id: u64, result: Result<ReplyBody, WireError>) {
    let message = ServerMessage::Reply(Reply { id, fds: 0, result });
    let bytes = encode_server_message(&message).expect("encode");
    send_message(socket.as_fd(), &bytes, &[], false).expect("send");
}

fn welcome() -> ReplyBody {
    ReplyBody::Welcome(Welcome {
        version: PROTOCOL_VERSION,
        features: 0,
        client_id: 1,
        autofence: true,
        default_heap: "memfd".into(),
        instance: "scripted".into(),
    })
}

/// A broker that answers hellos and heaps; on its first connection it
/// answers the first heaps request with an error of an earlier unwaited
/// request (id with bit 63) and hangs up, as a broker that restarts does.
fn scripted_broker(path: &Path) -> std::thread::JoinHandle<()> {
    let listener = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .expect("socket");
    bind(listener.as_raw_fd(), &UnixAddr::new(path).expect("addr")).expect("bind");
    listen(&listener, Backlog::new(4).expect("backlog")).expect("listen");
    std::thread::spawn(move || {
        for connection in 1..=2 {
            let raw = accept(listener.as_raw_fd()).expect("accept");
            // SAFETY: accept just created `raw` for us.
            let socket = unsafe { OwnedFd::from_raw_fd(raw) };
            while let Ok(message) = recv_message(socket.as_fd(), false) {
                let request = decode_request(&message.bytes).expect("decode");
                match request.body {
                    RequestBody::Hello(_) => reply(&socket, request.head.id, Ok(welcome())),
                    RequestBody::ListHeaps if connection == 1 => {
                        let stale = WireError::new(ErrorCode::UnknownAccess, "no access 7");
                        reply(&socket, (1 << 63) | 99, Err(stale));
                        break;
                    }
                    RequestBody::ListHeaps => {
                        reply(&socket, request.head.id, Ok(ReplyBody::Heaps(Vec::new())))
                    }
                    _ => {}
                }
            }
        }
    })
}

/// Errors of pipelined requests (an end, a free) wait in the client for
/// `take_errors`. A hang-up is not one of them: the call it interrupts
/// must reconnect and retry, and the old error must stay for
/// `take_errors`, not be handed to that call as its answer.
#[test]
fn a_hang_up_reconnects_even_with_errors_of_earlier_requests_unread() {
    let dir = TempDir::new("scripted-broker");
    let path = dir.path().join("socket");
    let broker = scripted_broker(&path);
    let options = ClientOptions {
        reconnect: Some(Duration::from_secs(5)),
        ..Default::default()
    };
    let client = Client::connect_with(&path, options).expect("connect");
    let heaps = client.heaps();
    assert!(
        heaps.is_ok(),
        "the call reconnects and is answered: {heaps:?}"
    );
    assert_eq!(client.reconnects(), 1);
    let errors = client.take_errors();
    assert!(
        matches!(&errors[..], [err] if err.code == ErrorCode::UnknownAccess),
        "the earlier request's error is kept for take_errors: {errors:?}"
    );
    drop(client);
    broker.join().expect("scripted broker");
}
