//! A broker played by the test itself, for what the real daemon will not
//! do on demand: answer at a chosen moment, or with fds a client has no
//! room for. It welcomes every hello and hands the rest to the test.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver};
use std::thread::JoinHandle;

use dmabroker_ipc::codec::{decode_request, encode_server_message};
use dmabroker_ipc::fdpass::{recv_message, send_message};
use dmabroker_ipc::{
    BufferInfo, Reply, ReplyBody, RequestBody, ServerMessage, Welcome, WireError, PROTOCOL_VERSION,
};
use nix::sys::socket::{
    accept, bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
};

use crate::tmp::TempDir;

/// What the test does with one request: gets the connection's socket, the
/// connection's number (from 1), the request's id and its body; `false`
/// hangs up on that connection.
pub trait Answer: FnMut(&OwnedFd, usize, u64, &RequestBody) -> bool + Send + 'static {}
impl<F: FnMut(&OwnedFd, usize, u64, &RequestBody) -> bool + Send + 'static> Answer for F {}

#[derive(Debug)]
pub struct FakeBroker {
    /// Kept while the broker listens in it.
    _dir: TempDir,
    pub path: PathBuf,
    seen: Receiver<RequestBody>,
    thread: Option<JoinHandle<()>>,
}

impl FakeBroker {
    /// Serves `connections` client connections one after the other, each
    /// until its client hangs up or `answer` says to hang up.
    pub fn start(connections: usize, mut answer: impl Answer) -> FakeBroker {
        let dir = TempDir::new("fake-broker");
        let path = dir.path().join("socket");
        let listener = listening_at(&path);
        let (seen_tx, seen) = channel();
        let thread = std::thread::spawn(move || {
            for connection in 1..=connections {
                let raw = accept(listener.as_raw_fd()).expect("accept");
                // SAFETY: accept just created `raw` for us.
                let socket = unsafe { OwnedFd::from_raw_fd(raw) };
                while let Ok(message) = recv_message(socket.as_fd(), false) {
                    let request = decode_request(&message.bytes).expect("decode");
                    let (id, body) = (request.head.id, request.body);
                    // Before it is answered: a test that has the answer
                    // finds the request among those seen.
                    let _ = seen_tx.send(body.clone());
                    let go_on = match &body {
                        RequestBody::Hello(_) => {
                            reply(&socket, id, Ok(welcome()));
                            true
                        }
                        body => answer(&socket, connection, id, body),
                    };
                    if !go_on {
                        break;
                    }
                }
            }
        });
        FakeBroker {
            _dir: dir,
            path,
            seen,
            thread: Some(thread),
        }
    }

    /// Every request received since the last look, hellos included.
    pub fn seen(&self) -> Vec<RequestBody> {
        self.seen.try_iter().collect()
    }

    /// Waits for the broker to serve its last connection to the end (its
    /// client hangs up); a panic of the test's `answer` fails the test.
    pub fn join(mut self) {
        if let Some(thread) = self.thread.take() {
            thread.join().expect("the fake broker panicked");
        }
    }

    /// As [`FakeBroker::join`], then every request received since the
    /// last look: all that arrived before the hang-up.
    pub fn seen_to_the_end(mut self) -> Vec<RequestBody> {
        if let Some(thread) = self.thread.take() {
            thread.join().expect("the fake broker panicked");
        }
        self.seen()
    }
}

/// A scripted broker's listening socket at `path`.
pub fn listening_at(path: &Path) -> OwnedFd {
    let listener = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .expect("socket");
    bind(listener.as_raw_fd(), &UnixAddr::new(path).expect("addr")).expect("bind");
    listen(&listener, Backlog::new(4).expect("backlog")).expect("listen");
    listener
}

/// A no-autofence welcome offering no features: every begin is a message.
pub fn welcome() -> ReplyBody {
    ReplyBody::Welcome(Welcome {
        version: PROTOCOL_VERSION,
        features: 0,
        client_id: 1,
        autofence: false,
        default_heap: "memfd".into(),
        instance: "fake".into(),
    })
}

pub fn send(socket: &OwnedFd, message: &ServerMessage, fds: &[BorrowedFd<'_>]) {
    let bytes = encode_server_message(message).expect("encode");
    send_message(socket.as_fd(), &bytes, fds, false).expect("send");
}

pub fn reply(socket: &OwnedFd, id: u64, result: Result<ReplyBody, WireError>) {
    send(
        socket,
        &ServerMessage::Reply(Reply { id, fds: 0, result }),
        &[],
    );
}

/// A grant of access `access` of `kind` on buffer 1, with no fences to
/// wait for and no slot in the buffer's word.
pub fn grant(access: u64, kind: dmabroker_ipc::Access) -> dmabroker_ipc::Grant {
    dmabroker_ipc::Grant {
        access,
        buffer: 1,
        kind,
        writer_lost: false,
        revoked: false,
        fences: Vec::new(),
        end_slot: None,
        word: None,
    }
}

/// The fake broker's buffer 1 (4 KiB), as an alloc's answer describes it.
pub fn buffer_info(inode: u64) -> BufferInfo {
    BufferInfo {
        id: 1,
        size: 4096,
        heap: "memfd".into(),
        name: "frame".into(),
        inode,
        secret: "dmab1-00112233445566778899aabbccddeeff".into(),
    }
}

/// A 4 KiB memfd to stand for the fake broker's buffer, and its inode.
pub fn memfd() -> (OwnedFd, u64) {
    let fd = nix::sys::memfd::memfd_create(c"fake", nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)
        .expect("memfd");
    nix::unistd::ftruncate(&fd, 4096).expect("ftruncate");
    let inode = nix::sys::stat::fstat(fd.as_raw_fd()).expect("fstat").st_ino;
    (fd, inode)
}

/// Answers an alloc with buffer 1 and its fd.
pub fn reply_with_buffer(socket: &OwnedFd, id: u64, fd: &OwnedFd, inode: u64) {
    let message = ServerMessage::Reply(Reply {
        id,
        fds: 1,
        result: Ok(ReplyBody::Buffer(buffer_info(inode))),
    });
    send(socket, &message, &[fd.as_fd()]);
}
