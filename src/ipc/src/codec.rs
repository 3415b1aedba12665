//! Turning messages into datagram bodies and back.
//!
//! SOCK_SEQPACKET preserves message boundaries, so a body is exactly one
//! postcard value with no length prefix; trailing bytes are an error (they
//! would mean the peer and we disagree about the layout).

use serde::{de::DeserializeOwned, Serialize};

use crate::protocol::{Request, RequestHead, ServerMessage, MAX_MESSAGE_SIZE};

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("message of {size} bytes exceeds the {max}-byte limit")]
    TooLarge { size: usize, max: usize },
    #[error("cannot encode message: {0}")]
    Encode(postcard::Error),
    #[error("malformed message: {0}")]
    Decode(postcard::Error),
    #[error("malformed message: {0} trailing bytes after the body")]
    TrailingBytes(usize),
}

/// Room for every common message (begin, grant, end, alloc, buffer reply)
/// at once: growing a Vec from empty reallocated four or five times per
/// message, a visible part of an uncontended transition.
const USUAL_MESSAGE_SIZE: usize = 256;

fn within_limit(bytes: &[u8]) -> Result<(), CodecError> {
    if bytes.len() > MAX_MESSAGE_SIZE {
        return Err(CodecError::TooLarge {
            size: bytes.len(),
            max: MAX_MESSAGE_SIZE,
        });
    }
    Ok(())
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    let mut bytes = Vec::with_capacity(USUAL_MESSAGE_SIZE);
    encode_into(value, &mut bytes)?;
    Ok(bytes)
}

/// Encodes into `buf`, cleared first.
fn encode_into<T: Serialize>(value: &T, buf: &mut Vec<u8>) -> Result<(), CodecError> {
    buf.clear();
    *buf = postcard::to_extend(value, std::mem::take(buf)).map_err(CodecError::Encode)?;
    within_limit(buf)
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    within_limit(bytes)?;
    let (value, rest) = postcard::take_from_bytes(bytes).map_err(CodecError::Decode)?;
    if !rest.is_empty() {
        return Err(CodecError::TrailingBytes(rest.len()));
    }
    Ok(value)
}

pub fn encode_request(request: &Request) -> Result<Vec<u8>, CodecError> {
    encode(request)
}

pub fn decode_request(bytes: &[u8]) -> Result<Request, CodecError> {
    decode(bytes)
}

/// Reads only the head of a request whose body may be unreadable (an unknown
/// request kind from a newer client, say), so the error can name its id.
pub fn decode_request_head(bytes: &[u8]) -> Option<RequestHead> {
    postcard::take_from_bytes::<RequestHead>(bytes)
        .ok()
        .map(|(head, _)| head)
}

pub fn encode_server_message(message: &ServerMessage) -> Result<Vec<u8>, CodecError> {
    encode(message)
}

/// Encodes into `buf` (cleared first), so a sender that writes the bytes
/// out at once can reuse one buffer instead of allocating per message.
pub fn encode_server_message_into(
    message: &ServerMessage,
    buf: &mut Vec<u8>,
) -> Result<(), CodecError> {
    encode_into(message, buf)
}

pub fn decode_server_message(bytes: &[u8]) -> Result<ServerMessage, CodecError> {
    decode(bytes)
}

/// The request id a reply names, read from its first bytes alone: a client
/// that cannot read the rest (a broker bug, a truncated datagram) can still
/// fail that one request instead of the connection.
pub fn decode_reply_id(bytes: &[u8]) -> Option<u64> {
    // `ServerMessage::Reply` is variant 0, and a reply begins with its id.
    match postcard::take_from_bytes::<(u32, u64)>(bytes) {
        Ok(((0, id), _)) => Some(id),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::*;

    fn request(body: RequestBody) -> Request {
        Request {
            head: RequestHead {
                id: 7,
                fds: 0,
                flags: 0,
            },
            body,
        }
    }

    #[test]
    fn a_replys_id_reads_from_its_first_bytes_alone() {
        let reply = ServerMessage::Reply(Reply {
            id: 1 << 40,
            fds: 0,
            result: Ok(ReplyBody::Freed),
        });
        let bytes = encode_server_message(&reply).expect("encode");
        assert_eq!(decode_reply_id(&bytes), Some(1 << 40));
        assert_eq!(decode_reply_id(&bytes[..bytes.len() - 1]), Some(1 << 40));
        let event = ServerMessage::Event(EventMessage {
            fds: 0,
            event: Event::FenceSignalled { fence: 3 },
        });
        let bytes = encode_server_message(&event).expect("encode");
        assert_eq!(decode_reply_id(&bytes), None);
        assert_eq!(decode_reply_id(&[0xff, 0xff]), None);
    }

    #[test]
    fn requests_round_trip() {
        let bodies = vec![
            RequestBody::Hello(Hello {
                version: PROTOCOL_VERSION,
                features: features::ALL,
                autofence: Some(false),
                client_name: "cam".into(),
            }),
            RequestBody::Alloc {
                size: 4096,
                heap: Some("system".into()),
                name: None,
            },
            RequestBody::Begin {
                buffer: 3,
                access: Access::CpuReadWrite,
                timeout_ms: Some(10),
            },
            RequestBody::End {
                access: 9,
                fence_slot: Some(0),
            },
            RequestBody::Cancel { request: u64::MAX },
        ];
        for body in bodies {
            let req = request(body);
            let bytes = encode_request(&req).expect("encode");
            assert_eq!(decode_request(&bytes).expect("decode"), req);
            assert_eq!(decode_request_head(&bytes), Some(req.head));
        }
    }

    /// The wire numbers docs/protocol.md gives the kinds added after
    /// version 3 first shipped: appended, so nothing before them moved.
    #[test]
    fn cancel_and_cancelled_are_appended() {
        let bytes = encode_request(&request(RequestBody::Cancel { request: 5 })).expect("encode");
        // Head (id 7, no fds, no flags), then variant 12 and the id.
        assert_eq!(bytes, [7, 0, 0, 12, 5]);
        let reply = ServerMessage::Reply(Reply {
            id: 7,
            fds: 0,
            result: Err(WireError::new(ErrorCode::Cancelled, "")),
        });
        let bytes = encode_server_message(&reply).expect("encode");
        // Reply, id, fds, Err, then the code's variant 16.
        assert_eq!(bytes[..5], [0, 7, 0, 1, 16]);
    }

    #[test]
    fn unknown_request_kind_keeps_its_head_readable() {
        let mut bytes = encode_request(&request(RequestBody::ListHeaps)).expect("encode");
        // The body's variant index is the last byte here; make it one no version knows.
        let last = bytes.len() - 1;
        bytes[last] = 0x7f;
        assert!(matches!(decode_request(&bytes), Err(CodecError::Decode(_))));
        assert_eq!(decode_request_head(&bytes).map(|h| h.id), Some(7));
    }

    #[test]
    fn trailing_bytes_and_oversize_are_refused() {
        let mut bytes = encode_request(&request(RequestBody::ListHeaps)).expect("encode");
        bytes.push(0);
        assert!(matches!(
            decode_request(&bytes),
            Err(CodecError::TrailingBytes(1))
        ));
        let huge = vec![0u8; MAX_MESSAGE_SIZE + 1];
        assert!(matches!(
            decode_request(&huge),
            Err(CodecError::TooLarge { .. })
        ));
    }

    #[test]
    fn truncated_messages_are_refused() {
        let bytes = encode_request(&request(RequestBody::Alloc {
            size: 1 << 40,
            heap: Some("system".into()),
            name: Some("frame".into()),
        }))
        .expect("encode");
        for cut in 0..bytes.len() {
            assert!(decode_request(&bytes[..cut]).is_err(), "cut at {cut}");
        }
    }

    proptest::proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = decode_request(&bytes);
            let _ = decode_server_message(&bytes);
            let _ = decode_request_head(&bytes);
        }
    }
}
