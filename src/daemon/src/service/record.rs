//! The buffer table as kept in the fd store across restarts: enough to
//! rebuild every buffer (ids, sizes, heaps, names, inodes, holders'
//! re-attach secrets), never any access state.

use serde::{Deserialize, Serialize};

/// Bumped when the record's layout changes; a record of another version is
/// ignored (its buffers are dropped rather than misread).
pub const RECORD_VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateRecord {
    pub version: u32,
    /// Higher wins when two records survive (see `fdstore`).
    pub generation: u64,
    pub next_buffer: u64,
    pub buffers: Vec<BufferRecord>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BufferRecord {
    pub id: u64,
    pub size: u64,
    pub heap: String,
    pub origin: OriginRecord,
    pub name: String,
    pub inode: u64,
    pub holders: Vec<HolderRecord>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OriginRecord {
    DmaHeap,
    Udmabuf,
    Memfd,
    Adopted,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HolderRecord {
    pub secret: String,
    pub uid: u32,
    pub owner: bool,
}

impl StateRecord {
    pub fn encode(&self) -> Result<Vec<u8>, postcard::Error> {
        postcard::to_stdvec(self)
    }

    pub fn decode(bytes: &[u8]) -> Option<StateRecord> {
        postcard::from_bytes::<StateRecord>(bytes)
            .ok()
            .filter(|r| r.version == RECORD_VERSION)
    }
}
