//! The buffer table as kept in the fd store across restarts: enough to
//! rebuild every buffer (ids, sizes, heaps, names, inodes, holders'
//! re-attach secrets), never any access state.

use serde::{Deserialize, Serialize};

/// Bumped when the record's layout changes; a record of a version this
/// daemon does not know is ignored (its buffers are dropped rather than
/// misread). Version 1, before holders' clients were recorded, is read
/// and taken as holds of unknown clients (`HolderRecord::client` 0).
pub const RECORD_VERSION: u32 = 2;

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
    #[error("it is a record of version {found}; this daemon reads versions 1 to {RECORD_VERSION}")]
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
    /// The connection it was held by, as the record knows it (a client id
    /// of the instance that wrote it, or the one that connection took its
    /// holds over from): a new connection re-attaches the holds of one
    /// only, so that the holds of several cannot be gathered onto one
    /// past its limits. 0: not known (a version 1 record).
    pub client: u64,
}

/// The layout of version 1, read only to be converted.
mod v1 {
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    pub struct StateRecord {
        pub version: u32,
        pub generation: u64,
        pub next_buffer: u64,
        pub buffers: Vec<BufferRecord>,
    }

    #[derive(Debug, Deserialize)]
    pub struct BufferRecord {
        pub id: u64,
        pub size: u64,
        pub heap: String,
        pub origin: super::OriginRecord,
        pub name: String,
        pub inode: u64,
        pub holders: Vec<HolderRecord>,
    }

    #[derive(Debug, Deserialize)]
    pub struct HolderRecord {
        pub secret: String,
        pub uid: u32,
        pub owner: bool,
    }

    impl From<StateRecord> for super::StateRecord {
        fn from(old: StateRecord) -> super::StateRecord {
            super::StateRecord {
                version: super::RECORD_VERSION,
                generation: old.generation,
                next_buffer: old.next_buffer,
                buffers: old
                    .buffers
                    .into_iter()
                    .map(|b| super::BufferRecord {
                        id: b.id,
                        size: b.size,
                        heap: b.heap,
                        origin: b.origin,
                        name: b.name,
                        inode: b.inode,
                        holders: b
                            .holders
                            .into_iter()
                            .map(|h| super::HolderRecord {
                                secret: h.secret,
                                uid: h.uid,
                                owner: h.owner,
                                client: 0,
                            })
                            .collect(),
                    })
                    .collect(),
            }
        }
    }
}

impl StateRecord {
    pub fn encode(&self) -> Result<Vec<u8>, postcard::Error> {
        postcard::to_stdvec(self)
    }

    pub fn decode(bytes: &[u8]) -> Result<StateRecord, DecodeError> {
        // The version comes first in every layout.
        let (version, _) = postcard::take_from_bytes::<u32>(bytes)?;
        let record = match version {
            1 => StateRecord::from(postcard::from_bytes::<v1::StateRecord>(bytes)?),
            RECORD_VERSION => postcard::from_bytes::<StateRecord>(bytes)?,
            found => return Err(DecodeError::Version { found }),
        };
        if record.generation > MAX_GENERATION {
            return Err(DecodeError::Generation {
                found: record.generation,
            });
        }
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record written by a daemon before holders' clients were recorded
    /// (version 1) is still taken back, its holds of unknown clients: read
    /// as this version's layout, it was refused, and every buffer lost.
    #[test]
    fn a_version_1_record_is_read_with_unknown_clients() {
        #[derive(Serialize)]
        struct OldHolder {
            secret: String,
            uid: u32,
            owner: bool,
        }
        #[derive(Serialize)]
        struct OldBuffer {
            id: u64,
            size: u64,
            heap: String,
            origin: OriginRecord,
            name: String,
            inode: u64,
            holders: Vec<OldHolder>,
        }
        #[derive(Serialize)]
        struct OldRecord {
            version: u32,
            generation: u64,
            next_buffer: u64,
            buffers: Vec<OldBuffer>,
        }
        let old = OldRecord {
            version: 1,
            generation: 7,
            next_buffer: 3,
            buffers: vec![OldBuffer {
                id: 2,
                size: 4096,
                heap: "memfd".into(),
                origin: OriginRecord::Memfd,
                name: "frame".into(),
                inode: 99,
                holders: vec![OldHolder {
                    secret: "s".into(),
                    uid: 1000,
                    owner: true,
                }],
            }],
        };
        let bytes = postcard::to_stdvec(&old).expect("encode");
        let record = StateRecord::decode(&bytes).expect("a version 1 record is read");
        assert_eq!(record.version, RECORD_VERSION);
        assert_eq!((record.generation, record.next_buffer), (7, 3));
        assert_eq!(
            record.buffers[0].holders,
            vec![HolderRecord {
                secret: "s".into(),
                uid: 1000,
                owner: true,
                client: 0,
            }]
        );
        let current = StateRecord {
            version: RECORD_VERSION,
            ..record
        };
        let again = StateRecord::decode(&current.encode().expect("encode")).expect("decode");
        assert_eq!(again, current);
        let mut future = current.encode().expect("encode");
        future[0] = RECORD_VERSION as u8 + 1;
        assert!(matches!(
            StateRecord::decode(&future),
            Err(DecodeError::Version { .. })
        ));
    }
}
