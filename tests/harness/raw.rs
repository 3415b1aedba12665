//! A raw protocol client, for requests the client crate never sends.
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use dmabroker_ipc::codec::{decode_server_message, encode_request};
use dmabroker_ipc::fdpass::{recv_message, send_message};
use dmabroker_ipc::*;
use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};

#[derive(Debug)]
pub struct RawClient {
    fd: OwnedFd,
    next: u64,
}

impl RawClient {
    pub fn connect(path: &Path) -> RawClient {
        let fd = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .expect("socket");
        connect(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            &UnixAddr::new(path).expect("addr"),
        )
        .expect("connect");
        // A reply that never comes fails the test instead of hanging it.
        nix::sys::socket::setsockopt(
            &fd,
            nix::sys::socket::sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(10, 0),
        )
        .expect("SO_RCVTIMEO");
        RawClient { fd, next: 1 }
    }

    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Sends any bytes with any fds, bypassing every check of ours.
    pub fn send_raw(&mut self, bytes: &[u8], fds: &[std::os::fd::BorrowedFd<'_>]) {
        self.try_send_raw(bytes, fds).expect("raw sendmsg");
    }

    /// [`RawClient::send_raw`] for a test where the broker may already have
    /// hung up (`EPIPE`, `ECONNRESET`).
    pub fn try_send_raw(
        &mut self,
        bytes: &[u8],
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> nix::Result<usize> {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        let raw: Vec<i32> = fds.iter().map(std::os::fd::AsRawFd::as_raw_fd).collect();
        let cmsgs = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsgs };
        sendmsg::<UnixAddr>(
            std::os::fd::AsRawFd::as_raw_fd(&self.fd),
            &[std::io::IoSlice::new(bytes)],
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
    }

    /// The next message from the broker; `None` once it hung up.
    pub fn recv(&mut self) -> Option<(ServerMessage, Vec<OwnedFd>)> {
        match recv_message(self.fd.as_fd(), false) {
            Ok(got) => Some((decode_server_message(&got.bytes).expect("decode"), got.fds)),
            Err(dmabroker_ipc::fdpass::RecvError::Os(nix::errno::Errno::EAGAIN)) => {
                panic!("no message from the broker within 10 s")
            }
            Err(_) => None,
        }
    }

    /// The next reply's id and error code (`Ok` for success).
    pub fn recv_reply(&mut self) -> Option<(u64, Result<ReplyBody, ErrorCode>)> {
        match self.recv()? {
            (ServerMessage::Reply(reply), _) => Some((reply.id, reply.result.map_err(|e| e.code))),
            (ServerMessage::Event(e), _) => panic!("unexpected event {e:?}"),
        }
    }

    pub fn encode(&mut self, body: RequestBody, declared_fds: u8) -> (u64, Vec<u8>) {
        let id = self.next;
        self.next += 1;
        let bytes = encode_request(&Request {
            head: RequestHead {
                id,
                fds: declared_fds,
                flags: 0,
            },
            body,
        })
        .expect("encode");
        (id, bytes)
    }

    /// Sends a request carrying no fd without waiting for its answer:
    /// its id, to find the answer among later ones ([`RawClient::replies`]).
    pub fn send_request(&mut self, body: RequestBody) -> u64 {
        let (id, bytes) = self.encode(body, 0);
        self.send_raw(&bytes, &[]);
        id
    }

    /// The next `count` replies, by id.
    pub fn replies(
        &mut self,
        count: usize,
    ) -> std::collections::HashMap<u64, Result<ReplyBody, ErrorCode>> {
        (0..count)
            .map(|_| self.recv_reply().expect("a reply"))
            .collect()
    }

    /// A request the broker answers only when it fails (`FLAG_NO_REPLY`,
    /// as the client library sends frees).
    pub fn encode_one_way(&mut self, body: RequestBody) -> Vec<u8> {
        let id = self.next;
        self.next += 1;
        encode_request(&Request {
            head: RequestHead {
                id,
                fds: 0,
                flags: FLAG_NO_REPLY,
            },
            body,
        })
        .expect("encode")
    }

    pub fn request(&mut self, body: RequestBody) -> Result<ReplyBody, ErrorCode> {
        let id = self.next;
        self.next += 1;
        let bytes = encode_request(&Request {
            head: RequestHead {
                id,
                fds: 0,
                flags: 0,
            },
            body,
        })
        .expect("encode");
        send_message(self.fd.as_fd(), &bytes, &[], false).expect("send");
        let got = recv_message(self.fd.as_fd(), false).expect("recv");
        match decode_server_message(&got.bytes).expect("decode") {
            ServerMessage::Reply(reply) => {
                assert_eq!(reply.id, id);
                reply.result.map_err(|e| e.code)
            }
            ServerMessage::Event(e) => panic!("unexpected event {e:?}"),
        }
    }

    /// [`RawClient::request`], also returning the fds the reply carried
    /// (the welcome's end-word page, an allocated buffer's fd).
    pub fn request_fds(
        &mut self,
        body: RequestBody,
    ) -> (Result<ReplyBody, ErrorCode>, Vec<OwnedFd>) {
        let (id, bytes) = self.encode(body, 0);
        send_message(self.fd.as_fd(), &bytes, &[], false).expect("send");
        let got = recv_message(self.fd.as_fd(), false).expect("recv");
        match decode_server_message(&got.bytes).expect("decode") {
            ServerMessage::Reply(reply) => {
                assert_eq!(reply.id, id);
                (reply.result.map_err(|e| e.code), got.fds)
            }
            ServerMessage::Event(e) => panic!("unexpected event {e:?}"),
        }
    }

    pub fn hello(&mut self) {
        self.hello_with(None);
    }

    /// The hello of a client that waits for fences itself.
    pub fn hello_no_autofence(&mut self) {
        self.hello_with(Some(false));
    }

    /// The hello of a client that waits for fences itself and asks for
    /// `features` (`dmabroker_ipc::features`).
    pub fn hello_no_autofence_with(&mut self, features: u64) {
        self.hello_features(Some(false), features);
    }

    fn hello_with(&mut self, autofence: Option<bool>) {
        self.hello_features(autofence, 0);
    }

    fn hello_features(&mut self, autofence: Option<bool>, features: u64) {
        self.request(RequestBody::Hello(Hello {
            version: PROTOCOL_VERSION,
            features,
            autofence,
            client_name: "raw".into(),
        }))
        .expect("hello");
    }

    /// A 4 KiB buffer of the default heap: its id.
    pub fn alloc(&mut self) -> u64 {
        match self.request(RequestBody::Alloc {
            size: 4096,
            heap: None,
            name: None,
        }) {
            Ok(ReplyBody::Buffer(info)) => info.id,
            other => panic!("alloc: {other:?}"),
        }
    }

    pub fn export(&mut self, buffer: u64) -> String {
        match self.request(RequestBody::Export { buffer }) {
            Ok(ReplyBody::Exported { token }) => token,
            other => panic!("export: {other:?}"),
        }
    }

    /// The importer's id of the buffer.
    pub fn import(&mut self, token: String) -> u64 {
        match self.request(RequestBody::Import { token }) {
            Ok(ReplyBody::Buffer(info)) => info.id,
            other => panic!("import: {other:?}"),
        }
    }

    pub fn simple(&mut self, line: &str) -> Result<ReplyBody, ErrorCode> {
        let mut words = line.split_whitespace();
        let verb = words.next().expect("verb");
        let buffer: u64 = words.next().expect("id").parse().expect("id");
        let body = match verb {
            "info" => RequestBody::Info { buffer },
            "export" => RequestBody::Export { buffer },
            "free" => RequestBody::Free { buffer },
            "begin" => RequestBody::Begin {
                buffer,
                access: Access::CpuRead,
                timeout_ms: Some(100),
            },
            other => panic!("unknown verb {other}"),
        };
        self.request(body)
    }
}
