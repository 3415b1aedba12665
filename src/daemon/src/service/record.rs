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
    /// The user the hold counts for (`Peer::accountable_uid`): until it is
    /// re-attached, `max_uid_buffers` counts it for them, and for a
    /// process of a user namespace or a container that is not `uid`.
    /// `None`: not known (a record of a daemon that did not keep it; the
    /// hold then counts for `uid`).
    ///
    /// Not in the record's layout but in what follows it (see
    /// [`StateRecord::encode`]): postcard has no optional fields, so a
    /// field here would make a new version, and every older daemon would
    /// drop all the buffers of such a record on a downgrade.
    #[serde(skip)]
    pub accountable_uid: Option<u32>,
}

/// What follows a record of this version's layout: holders' facts kept
/// since the layout was fixed. Older daemons stop reading at the end of
/// the record (`postcard::from_bytes` leaves the rest), so they still
/// take back every buffer; this one takes a record without it (written
/// by an older daemon) as one knowing none of them. Anything added later
/// goes after these fields, for the same reason.
#[derive(Debug, Serialize, Deserialize)]
struct Trailer {
    /// Every hold's `HolderRecord::accountable_uid`, in the order of the
    /// buffers and of their holders; `u32::MAX` for `None`.
    accountable_uids: Vec<u32>,
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
                                accountable_uid: None,
                            })
                            .collect(),
                    })
                    .collect(),
            }
        }
    }
}

impl StateRecord {
    /// The record, then its [`Trailer`].
    pub fn encode(&self) -> Result<Vec<u8>, postcard::Error> {
        let mut bytes = postcard::to_stdvec(self)?;
        let trailer = Trailer {
            accountable_uids: self
                .holders()
                .map(|h| h.accountable_uid.unwrap_or(u32::MAX))
                .collect(),
        };
        bytes.extend(postcard::to_stdvec(&trailer)?);
        Ok(bytes)
    }

    pub fn decode(bytes: &[u8]) -> Result<StateRecord, DecodeError> {
        // The version comes first in every layout.
        let (version, _) = postcard::take_from_bytes::<u32>(bytes)?;
        let record = match version {
            1 => StateRecord::from(postcard::from_bytes::<v1::StateRecord>(bytes)?),
            RECORD_VERSION => {
                let (mut record, rest) = postcard::take_from_bytes::<StateRecord>(bytes)?;
                record.read_trailer(rest);
                record
            }
            found => return Err(DecodeError::Version { found }),
        };
        if record.generation > MAX_GENERATION {
            return Err(DecodeError::Generation {
                found: record.generation,
            });
        }
        Ok(record)
    }

    fn holders(&self) -> impl Iterator<Item = &HolderRecord> {
        self.buffers.iter().flat_map(|b| &b.holders)
    }

    /// Takes what the [`Trailer`] in `rest` says. One that does not
    /// decode or does not match the record is ignored, not taken for a
    /// broken record: the buffers and holds are all there, and only
    /// whom a hold counts for until re-attached is not known.
    fn read_trailer(&mut self, rest: &[u8]) {
        if rest.is_empty() {
            return;
        }
        let holds = self.holders().count();
        let uids = match postcard::take_from_bytes::<Trailer>(rest) {
            Ok((trailer, _)) if trailer.accountable_uids.len() == holds => trailer.accountable_uids,
            Ok((trailer, _)) => {
                tracing::warn!(
                    holds,
                    uids = trailer.accountable_uids.len(),
                    "the record's trailer names another number of holds; each hold not \
                     re-attached counts for its recorded uid"
                );
                return;
            }
            Err(err) => {
                tracing::warn!(error = %err, "the record's trailer is unreadable; each hold \
                     not re-attached counts for its recorded uid");
                return;
            }
        };
        let holders = self.buffers.iter_mut().flat_map(|b| &mut b.holders);
        for (holder, uid) in holders.zip(uids) {
            holder.accountable_uid = (uid != u32::MAX).then_some(uid);
        }
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
                accountable_uid: None,
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

    /// A hold's accountable uid (whom it counts for until re-attached)
    /// survives a restart in what follows the record: a daemon that does
    /// not know it stops reading before it and still takes back every
    /// buffer (a field of the record would be a new version, whose
    /// buffers such a daemon drops), and this one reads a record without
    /// it, or with one that does not match, as knowing none. Failed
    /// before (the uids were not kept).
    #[test]
    fn accountable_uids_follow_the_record_and_older_daemons_still_read_it() {
        #[derive(Debug, Deserialize)]
        struct OldHolder {
            secret: String,
            uid: u32,
            _owner: bool,
            client: u64,
        }
        #[derive(Debug, Deserialize)]
        struct OldBuffer {
            id: u64,
            _size: u64,
            _heap: String,
            _origin: OriginRecord,
            _name: String,
            _inode: u64,
            holders: Vec<OldHolder>,
        }
        #[derive(Debug, Deserialize)]
        struct OldRecord {
            version: u32,
            _generation: u64,
            _next_buffer: u64,
            buffers: Vec<OldBuffer>,
        }
        let holder = |secret: &str, uid: u32, accountable_uid: Option<u32>| HolderRecord {
            secret: secret.into(),
            uid,
            owner: false,
            client: 5,
            accountable_uid,
        };
        let buffer = |id: u64, holders: Vec<HolderRecord>| BufferRecord {
            id,
            size: 4096,
            heap: "memfd".into(),
            origin: OriginRecord::Memfd,
            name: "frame".into(),
            inode: 99,
            holders,
        };
        let record = StateRecord {
            version: RECORD_VERSION,
            generation: 3,
            next_buffer: 3,
            buffers: vec![
                buffer(
                    1,
                    vec![
                        holder("a", 100_000, Some(1000)),
                        holder("b", 1000, Some(1000)),
                    ],
                ),
                buffer(2, vec![holder("c", 1001, Some(0xf000_0001))]),
                buffer(3, vec![holder("d", 1002, None)]),
            ],
        };
        let bytes = record.encode().expect("encode");
        assert_eq!(StateRecord::decode(&bytes).expect("decode"), record);
        let old: OldRecord = postcard::from_bytes(&bytes).expect("an older daemon reads it");
        assert_eq!(old.version, RECORD_VERSION);
        let holds: Vec<(u64, &str, u32, u64)> = old
            .buffers
            .iter()
            .flat_map(|b| {
                b.holders
                    .iter()
                    .map(|h| (b.id, h.secret.as_str(), h.uid, h.client))
            })
            .collect();
        assert_eq!(
            holds,
            [
                (1, "a", 100_000, 5),
                (1, "b", 1000, 5),
                (2, "c", 1001, 5),
                (3, "d", 1002, 5)
            ]
        );
        let unknown = |record: &StateRecord| {
            let mut record = record.clone();
            for h in record.buffers.iter_mut().flat_map(|b| &mut b.holders) {
                h.accountable_uid = None;
            }
            record
        };
        let older = postcard::to_stdvec(&record).expect("encode");
        assert_eq!(
            StateRecord::decode(&older).expect("an older daemon's record"),
            unknown(&record)
        );
        let mut mismatched = older.clone();
        let one_uid = Trailer {
            accountable_uids: vec![1000],
        };
        mismatched.extend(postcard::to_stdvec(&one_uid).expect("encode"));
        let mut garbage = older.clone();
        garbage.extend_from_slice(&[0xff; 3]);
        for (what, bytes) in [("mismatched", mismatched), ("garbage", garbage)] {
            let read = StateRecord::decode(&bytes).expect(what);
            assert_eq!(read, unknown(&record), "{what}");
        }
    }
}
