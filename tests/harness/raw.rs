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
        let fd = socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None)
            .expect("socket");
        connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &UnixAddr::new(path).expect("addr"))
            .expect("connect");
        RawClient { fd, next: 1 }
    }

    pub fn request(&mut self, body: RequestBody) -> Result<ReplyBody, ErrorCode> {
        let id = self.next;
        self.next += 1;
        let bytes = encode_request(&Request {
            head: RequestHead { id, fds: 0, flags: 0 },
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

    pub fn hello(&mut self) {
        self.request(RequestBody::Hello(Hello {
            version: PROTOCOL_VERSION,
            features: 0,
            autofence: None,
            client_name: "raw".into(),
        }))
        .expect("hello");
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
