//! The messages exchanged between dmabroker and its clients.
//!
//! Every datagram on the socket is one [`Request`] (client to broker) or one
//! [`ServerMessage`] (broker to client), encoded with postcard. File
//! descriptors never appear in a body: a message declares how many fds travel
//! with it (`fds`) and the body refers to them by slot index. The layout of
//! [`RequestHead`] and [`Hello`] is frozen across protocol versions so that
//! any broker can read any client's hello and answer with a clear
//! version error instead of garbage.
//!
//! `docs/protocol.md` is the normative description; keep both in step.

use serde::{Deserialize, Serialize};

/// Bumped on any incompatible change to a message layout.
pub const PROTOCOL_VERSION: u32 = 3;

/// Optional capabilities negotiated in the hello (intersection of both sides).
pub mod features {
    /// The broker sends `FenceSignalled` events for fences without kernel backing
    /// that it listed in a no-autofence grant.
    pub const FENCE_EVENTS: u64 = 1 << 0;
    /// Kernel sync_file fds may accompany grants and device-access ends.
    pub const SYNC_FILES: u64 = 1 << 1;
    /// Buffers can be re-attached with a secret after a broker restart.
    pub const REATTACH: u64 = 1 << 2;
    /// The welcome carries a page of end words (see `endwords`), and grants
    /// may name a slot in it, so most ends need no message.
    pub const END_WORDS: u64 = 1 << 3;
    /// Buffer words: memfd buffers carry a reservation word past their end
    /// that holders begin and end uncontended accesses on (version 3).
    pub const BUFFER_WORDS: u64 = 1 << 4;
    /// The client may withdraw a begin it no longer waits for (`Cancel`),
    /// and such a begin is answered `ErrorCode::Cancelled`.
    pub const CANCEL: u64 = 1 << 5;
    /// Everything this build understands.
    pub const ALL: u64 = FENCE_EVENTS | SYNC_FILES | REATTACH | END_WORDS | BUFFER_WORDS | CANCEL;
}

/// Largest datagram either side accepts; larger ones are refused unread.
pub const MAX_MESSAGE_SIZE: usize = 64 * 1024;
/// Most fds one message may carry. A no-autofence grant is the largest user
/// (one sync_file per outstanding fence); the rest carry at most one.
pub const MAX_FDS_PER_MESSAGE: usize = 32;
/// Most accesses one buffer takes at once, held and queued: each is a
/// fence a conflicting no-autofence grant lists, and that grant must fit in
/// one message (a listed fence is at most 23 bytes).
pub const MAX_ACCESSES_PER_BUFFER: usize = 1024;

pub type BufferId = u64;
pub type AccessId = u64;
pub type ClientId = u64;

/// Request flag: the client does not wait for a success reply. Errors are
/// still answered (with the request id) so that nothing fails silently; this
/// is what lets `end` and `free` be pipelined without a round trip.
pub const FLAG_NO_REPLY: u8 = 1 << 0;

/// The fixed prefix of every request. Decoded on its own when the body is
/// unreadable, so the error reply can still name the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestHead {
    pub id: u64,
    /// Number of fds sent with this message (SCM_RIGHTS).
    pub fds: u8,
    pub flags: u8,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub head: RequestHead,
    pub body: RequestBody,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub version: u32,
    pub features: u64,
    /// `None` lets the policy decide; `Some(false)` asks for no-autofence.
    pub autofence: Option<bool>,
    /// Free text for logs and debugging; never used for decisions.
    pub client_name: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Access {
    CpuRead,
    CpuWrite,
    CpuReadWrite,
    DeviceRead,
    DeviceWrite,
}

impl Access {
    pub fn is_write(self) -> bool {
        matches!(
            self,
            Access::CpuWrite | Access::CpuReadWrite | Access::DeviceWrite
        )
    }

    pub fn is_cpu(self) -> bool {
        matches!(
            self,
            Access::CpuRead | Access::CpuWrite | Access::CpuReadWrite
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            Access::CpuRead => "cpu-read",
            Access::CpuWrite => "cpu-write",
            Access::CpuReadWrite => "cpu-read-write",
            Access::DeviceRead => "device-read",
            Access::DeviceWrite => "device-write",
        }
    }
}

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestBody {
    /// Must be the first request on a connection, and only the first.
    Hello(Hello),
    ListHeaps,
    /// Replied with `Buffer` and the buffer's fd in slot 0.
    Alloc {
        size: u64,
        heap: Option<String>,
        name: Option<String>,
    },
    Free {
        buffer: BufferId,
    },
    Export {
        buffer: BufferId,
    },
    /// Replied with `Buffer` and the client's own fd of the buffer in slot 0.
    Import {
        token: String,
    },
    Info {
        buffer: BufferId,
    },
    /// Registers a dma-buf obtained elsewhere (V4L2, a GPU); the fd is slot 0.
    Adopt {
        name: Option<String>,
    },
    Begin {
        buffer: BufferId,
        access: Access,
        /// Autofence only: give up after this long with `Timeout`.
        timeout_ms: Option<u32>,
    },
    /// Ends an access. With `fence_slot`, a device access is handed over
    /// with its hardware's completion fence (a sync_file fd in that slot).
    End {
        access: AccessId,
        fence_slot: Option<u8>,
    },
    /// After a broker restart: take back a buffer held before it.
    Reattach {
        buffer: BufferId,
        secret: String,
    },
    /// An access held in the buffer's word was ended there while the word
    /// said the broker arbitrates: look at the word now. Sent without
    /// waiting for a reply.
    WordEnded {
        buffer: BufferId,
    },
    /// Withdraws this connection's begin `request` (its request id) if it
    /// is still queued: the begin is answered `Cancelled`. One already
    /// answered, or unknown, is left alone. Feature `CANCEL` only; sent
    /// without waiting for a reply.
    Cancel {
        request: u64,
    },
}

impl RequestBody {
    /// The number of fds a well-formed request of this kind carries.
    pub fn expected_fds(&self) -> usize {
        match self {
            RequestBody::Adopt { .. } => 1,
            RequestBody::End {
                fence_slot: Some(_),
                ..
            } => 1,
            _ => 0,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            RequestBody::Hello(_) => "hello",
            RequestBody::ListHeaps => "list-heaps",
            RequestBody::Alloc { .. } => "alloc",
            RequestBody::Free { .. } => "free",
            RequestBody::Export { .. } => "export",
            RequestBody::Import { .. } => "import",
            RequestBody::Info { .. } => "info",
            RequestBody::Adopt { .. } => "adopt",
            RequestBody::Begin { .. } => "begin",
            RequestBody::End { .. } => "end",
            RequestBody::Reattach { .. } => "reattach",
            RequestBody::WordEnded { .. } => "word-ended",
            RequestBody::Cancel { .. } => "cancel",
        }
    }
}

/// What `{:?}` writes in place of a share token or a re-attach secret.
/// Either one in a log would let anyone who reads the log take the
/// buffer: a token imports it, a secret re-attaches it after a restart.
const HIDDEN: &str = "..";

/// As derived, but without the share token of `Import` or the secret of
/// `Reattach` (see [`HIDDEN`]): a client or test that logs the request it
/// sends must not leak them.
impl std::fmt::Debug for RequestBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RequestBody::Hello(hello) => f.debug_tuple("Hello").field(hello).finish(),
            RequestBody::ListHeaps => f.write_str("ListHeaps"),
            RequestBody::Alloc { size, heap, name } => f
                .debug_struct("Alloc")
                .field("size", size)
                .field("heap", heap)
                .field("name", name)
                .finish(),
            RequestBody::Free { buffer } => f.debug_struct("Free").field("buffer", buffer).finish(),
            RequestBody::Export { buffer } => {
                f.debug_struct("Export").field("buffer", buffer).finish()
            }
            RequestBody::Import { .. } => f.debug_struct("Import").field("token", &HIDDEN).finish(),
            RequestBody::Info { buffer } => f.debug_struct("Info").field("buffer", buffer).finish(),
            RequestBody::Adopt { name } => f.debug_struct("Adopt").field("name", name).finish(),
            RequestBody::Begin {
                buffer,
                access,
                timeout_ms,
            } => f
                .debug_struct("Begin")
                .field("buffer", buffer)
                .field("access", access)
                .field("timeout_ms", timeout_ms)
                .finish(),
            RequestBody::End { access, fence_slot } => f
                .debug_struct("End")
                .field("access", access)
                .field("fence_slot", fence_slot)
                .finish(),
            RequestBody::Reattach { buffer, .. } => f
                .debug_struct("Reattach")
                .field("buffer", buffer)
                .field("secret", &HIDDEN)
                .finish(),
            RequestBody::WordEnded { buffer } => {
                f.debug_struct("WordEnded").field("buffer", buffer).finish()
            }
            RequestBody::Cancel { request } => {
                f.debug_struct("Cancel").field("request", request).finish()
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerMessage {
    Reply(Reply),
    Event(EventMessage),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    /// The id of the request this answers.
    pub id: u64,
    pub fds: u8,
    pub result: Result<ReplyBody, WireError>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventMessage {
    pub fds: u8,
    pub event: Event,
}

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplyBody {
    Welcome(Welcome),
    Heaps(Vec<HeapInfo>),
    /// Alloc and import carry the buffer's fd in slot 0; adopt, reattach
    /// and info carry none (the client has the fd already).
    Buffer(BufferInfo),
    Freed,
    Exported {
        token: String,
    },
    Granted(Grant),
    Ended,
    /// The begin is queued, and the holder in its way will hand the buffer
    /// over through the word: wait on the word (see `bufferword`). If the
    /// plan is cancelled, the answer to the same request comes later as a
    /// message (`Granted`, `Planned` again, or an error).
    Planned {
        word: crate::bufferword::FastSlot,
    },
}

/// As derived, but without the share token of `Exported` (see
/// [`HIDDEN`]); a `Buffer`'s secret is hidden by `BufferInfo`'s own.
impl std::fmt::Debug for ReplyBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReplyBody::Welcome(welcome) => f.debug_tuple("Welcome").field(welcome).finish(),
            ReplyBody::Heaps(heaps) => f.debug_tuple("Heaps").field(heaps).finish(),
            ReplyBody::Buffer(info) => f.debug_tuple("Buffer").field(info).finish(),
            ReplyBody::Freed => f.write_str("Freed"),
            ReplyBody::Exported { .. } => {
                f.debug_struct("Exported").field("token", &HIDDEN).finish()
            }
            ReplyBody::Granted(grant) => f.debug_tuple("Granted").field(grant).finish(),
            ReplyBody::Ended => f.write_str("Ended"),
            ReplyBody::Planned { word } => f.debug_struct("Planned").field("word", word).finish(),
        }
    }
}

impl ReplyBody {
    /// The answer's kind, for messages about an answer that was not the
    /// one expected: its `{:?}` may carry a share token.
    pub fn kind(&self) -> &'static str {
        match self {
            ReplyBody::Welcome(_) => "welcome",
            ReplyBody::Heaps(_) => "heaps",
            ReplyBody::Buffer(_) => "buffer",
            ReplyBody::Freed => "freed",
            ReplyBody::Exported { .. } => "exported",
            ReplyBody::Granted(_) => "granted",
            ReplyBody::Ended => "ended",
            ReplyBody::Planned { .. } => "planned",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    pub version: u32,
    pub features: u64,
    pub client_id: ClientId,
    /// The autofence mode in force for this connection.
    pub autofence: bool,
    pub default_heap: String,
    /// Identifies this broker instance; changes when it restarts.
    pub instance: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeapInfo {
    pub name: String,
    pub backend: String,
}

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BufferInfo {
    pub id: BufferId,
    pub size: u64,
    pub heap: String,
    pub name: String,
    pub inode: u64,
    /// Proof of holding, for `Reattach` after a broker restart. Only sent to
    /// the holder with alloc/import/adopt; empty in `Info`.
    pub secret: String,
}

/// Without the secret, which `{:?}` of a buffer (or of a client holding
/// one) would otherwise write into a journal: with it, any process of the
/// holder's uid could take the buffer over after a restart.
impl std::fmt::Debug for BufferInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BufferInfo")
            .field("id", &self.id)
            .field("size", &self.size)
            .field("heap", &self.heap)
            .field("name", &self.name)
            .field("inode", &self.inode)
            .field("secret", &if self.secret.is_empty() { "" } else { ".." })
            .finish()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub access: AccessId,
    pub buffer: BufferId,
    pub kind: Access,
    /// The previous writer died holding write access: the contents may be torn.
    pub writer_lost: bool,
    /// The previous writer's access was revoked for exceeding its hold limit.
    pub revoked: bool,
    /// No-autofence only: the conflicting fences still outstanding.
    pub fences: Vec<OutstandingFence>,
    /// The access's word in the connection's end-word page: end it there,
    /// and send `End` only if the word says the broker is watching.
    /// `None`: end by message.
    pub end_slot: Option<crate::endwords::EndSlot>,
    /// The access is held in the buffer's word, under this slot: end it
    /// there (and send `WordEnded` when the word says the broker
    /// arbitrates). It also refreshes the holder's slot, whose epoch may
    /// have moved on. Never together with `end_slot`.
    pub word: Option<crate::bufferword::FastSlot>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutstandingFence {
    pub id: AccessId,
    pub kind: Access,
    pub holder: ClientId,
    /// Slot of a sync_file fd backing this fence, when the kernel has one.
    /// Without it the client waits for a `FenceSignalled` event.
    pub sync_file_slot: Option<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// A fence listed in a no-autofence grant has ended.
    FenceSignalled { fence: AccessId },
    /// The client's access exceeded its hold limit and was taken away.
    AccessRevoked { access: AccessId, buffer: BufferId },
}

/// The closed set of error codes. New codes need a protocol version bump,
/// or a feature bit: a code only sent to a client that negotiated the
/// feature it came with (`Cancelled`) is never read by one that does not
/// know it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The message could not be decoded or broke a framing rule.
    ProtocolError,
    IncompatibleVersion,
    /// A request came before the hello, or a second hello.
    HelloRequired,
    InvalidArgument,
    UnknownHeap,
    UnknownBuffer,
    UnknownToken,
    UnknownAccess,
    PermissionDenied,
    /// A policy limit, or the daemon's own limit on buffers (the service
    /// manager's fd store is full); the message names which.
    QuotaExceeded,
    /// The heap had no memory for it (after trying the fallbacks).
    OutOfMemory,
    Timeout,
    /// Adopt of something that is not a dma-buf.
    NotADmaBuf,
    /// The broker is at one of its limits (connections, a client's queued
    /// requests or allocations in flight, a buffer's accesses): try again.
    Busy,
    Unsupported,
    Internal,
    /// The client withdrew the begin with `Cancel` (feature `CANCEL`).
    Cancelled,
}

impl ErrorCode {
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::ProtocolError => "protocol-error",
            ErrorCode::IncompatibleVersion => "incompatible-version",
            ErrorCode::HelloRequired => "hello-required",
            ErrorCode::InvalidArgument => "invalid-argument",
            ErrorCode::UnknownHeap => "unknown-heap",
            ErrorCode::UnknownBuffer => "unknown-buffer",
            ErrorCode::UnknownToken => "unknown-token",
            ErrorCode::UnknownAccess => "unknown-access",
            ErrorCode::PermissionDenied => "permission-denied",
            ErrorCode::QuotaExceeded => "quota-exceeded",
            ErrorCode::OutOfMemory => "out-of-memory",
            ErrorCode::Timeout => "timeout",
            ErrorCode::NotADmaBuf => "not-a-dma-buf",
            ErrorCode::Busy => "busy",
            ErrorCode::Unsupported => "unsupported",
            ErrorCode::Internal => "internal",
            ErrorCode::Cancelled => "cancelled",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Figures of a quota refusal, so a client can report or adapt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaDetail {
    pub limit: u64,
    pub in_use: u64,
    pub requested: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireError {
    pub code: ErrorCode,
    pub message: String,
    pub quota: Option<QuotaDetail>,
}

impl WireError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        WireError {
            code,
            message: message.into(),
            quota: None,
        }
    }
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "3f9c1e0a7b5d42c8a1e6f0b9d7c3a5e1";

    /// A request or reply written with `{:?}` (a client's debug log, a
    /// failed test's assertion) shows no token or secret: whoever reads
    /// the log could import the buffer, or take it over after a restart.
    #[test]
    fn debug_output_hides_tokens_and_secrets() {
        let shown = [
            format!(
                "{:?}",
                RequestBody::Import {
                    token: TOKEN.into()
                }
            ),
            format!(
                "{:?}",
                RequestBody::Reattach {
                    buffer: 4,
                    secret: TOKEN.into()
                }
            ),
            format!(
                "{:?}",
                ReplyBody::Exported {
                    token: TOKEN.into()
                }
            ),
        ];
        for text in &shown {
            assert!(!text.contains(TOKEN), "{text}");
        }
        assert_eq!(shown[0], r#"Import { token: ".." }"#);
        assert_eq!(shown[1], r#"Reattach { buffer: 4, secret: ".." }"#);
        assert_eq!(shown[2], r#"Exported { token: ".." }"#);
    }

    /// The other messages read as the derived `Debug` would write them.
    #[test]
    fn debug_output_of_other_messages_is_as_derived() {
        assert_eq!(
            format!(
                "{:?}",
                RequestBody::Begin {
                    buffer: 2,
                    access: Access::CpuRead,
                    timeout_ms: Some(5)
                }
            ),
            "Begin { buffer: 2, access: CpuRead, timeout_ms: Some(5) }"
        );
        assert_eq!(format!("{:?}", RequestBody::ListHeaps), "ListHeaps");
        assert_eq!(format!("{:?}", ReplyBody::Ended), "Ended");
        assert_eq!(
            format!("{:?}", RequestBody::Free { buffer: 9 }),
            "Free { buffer: 9 }"
        );
    }
}
