//! The buffer table as kept in the fd store across restarts: enough to
//! rebuild every buffer (ids, sizes, heaps, names, inodes, holders'
//! re-attach secrets), never any access state.

use serde::{Deserialize, Serialize};

/// Bumped when the record's layout changes; a record of another version is
/// ignored (its buffers are dropped rather than misread).
pub const RECORD_VERSION: u32 = 1;

/// The highest generation a record is taken with. The writer counts up by
/// one a record, at most one every 50 ms: it would take 14 billion years
/// to get here from 0, so a record beyond it is none this daemon wrote,
/// and its next record's generation would overflow.
pub const MAX_GENERATION: u64 = i64::MAX as u64;

/// Why bytes from the fd store are not taken for a record.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("it is no record of the buffer table: {0}")]
    Malformed(#[from] postcard::Error),
    #[error("it is a record of version {found}; this daemon reads version {RECORD_VERSION}")]
    Version { found: u32 },
    #[error("its generation {found} is above any this daemon's writer reaches ({MAX_GENERATION})")]
    Generation { found: u64 },
}

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

    pub fn decode(bytes: &[u8]) -> Result<StateRecord, DecodeError> {
        let record = postcard::from_bytes::<StateRecord>(bytes)?;
        if record.version != RECORD_VERSION {
            return Err(DecodeError::Version {
                found: record.version,
            });
        }
        if record.generation > MAX_GENERATION {
            return Err(DecodeError::Generation {
                found: record.generation,
            });
        }
        Ok(record)
    }
}
