//! Notable changes in the broker, published for observers (D-Bus signals,
//! the service manager's status line). Publishing never blocks and never
//! fails the data path: with no observer, or a slow one, notices are
//! simply dropped.

use dmabroker_ipc::{AccessId, BufferId, ClientId};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notice {
    ClientConnected {
        client: ClientId,
        uid: u32,
        pid: i32,
    },
    ClientDisconnected {
        client: ClientId,
    },
    BufferAllocated {
        buffer: BufferId,
        size: u64,
        heap: String,
        owner: ClientId,
    },
    BufferFreed {
        buffer: BufferId,
    },
    /// A client died holding write access to the buffer.
    WriterLost {
        buffer: BufferId,
        client: ClientId,
    },
    AccessRevoked {
        buffer: BufferId,
        access: AccessId,
        client: ClientId,
    },
}

/// How many notices an observer may lag behind before it misses some.
pub const NOTICE_BACKLOG: usize = 1024;

pub type NoticeSender = tokio::sync::broadcast::Sender<Notice>;
