//! Fds handed to us by the service manager at start (`LISTEN_FDS`,
//! `LISTEN_FDNAMES`): the listening socket (socket activation) and whatever
//! the previous instance put in the fd store.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};

use nix::sys::socket::{getsockname, getsockopt, sockopt, SockType, UnixAddr};

use super::record::StateRecord;

/// Names this daemon gives the fds it stores.
pub const BUFFER_PREFIX: &str = "buf-";
pub const RECORD_PREFIX: &str = "state-";

#[derive(Debug, Default)]
pub struct Inherited {
    pub listener: Option<OwnedFd>,
    pub stored: Stored,
}

/// What the previous instance left in the fd store.
#[derive(Debug, Default)]
pub struct Stored {
    /// Every record, whatever its name, in the order handed over (systemd:
    /// the newest first). Two may share a name (a record stored while an
    /// older one of that name was still there), so none is dropped here:
    /// the restore reads them all and takes the highest generation.
    pub records: Vec<(String, OwnedFd)>,
    /// Buffers by name (`buf-<id>`): the first fd handed over under each
    /// name, until [`Stored::keep_recorded`] has chosen among them.
    pub buffers: HashMap<String, OwnedFd>,
    /// Further fds under a buffer's name, kept open until the record is
    /// read: the one it names (by inode) may be any of them, and only
    /// then is it known which to keep and which to close.
    pub duplicates: Vec<(String, OwnedFd)>,
    /// The name of each fd handed over that nothing here keeps, closed at
    /// once: a buffer's name again (its later fds), a name this daemon
    /// never gives on an fd that is no socket (so from the fd store), or a
    /// socket nothing here serves. The manager still holds and counts
    /// those of its store until their name is removed.
    pub leftovers: Vec<String>,
}

impl Stored {
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
            && self.buffers.is_empty()
            && self.duplicates.is_empty()
            && self.leftovers.is_empty()
    }

    pub fn len(&self) -> usize {
        self.records.len() + self.buffers.len() + self.duplicates.len() + self.leftovers.len()
    }

    /// Of the fds under one buffer's name, keeps the one `record` names
    /// (its kind, inode and size, as the restore checks them: an inode
    /// number alone is unique only within a file system), whichever was
    /// handed over first, and closes the others
    /// (they become leftovers: the manager still counts them until the
    /// name's removal). Without a record, or when none of them is the
    /// recorded one, the first handed over stays, as before.
    pub fn keep_recorded(&mut self, record: Option<&StateRecord>) {
        if self.duplicates.is_empty() {
            return;
        }
        let recorded: HashMap<String, &super::record::BufferRecord> = record
            .map(|r| {
                r.buffers
                    .iter()
                    .map(|b| (super::fdstore::buffer_name(b.id), b))
                    .collect()
            })
            .unwrap_or_default();
        let is = |fd: &OwnedFd, wanted: &super::record::BufferRecord| {
            crate::broker::matches_record(fd, wanted).is_some()
        };
        for (name, fd) in std::mem::take(&mut self.duplicates) {
            let wanted = recorded.get(&name).copied();
            let closed = match (self.buffers.get_mut(&name), wanted) {
                (Some(kept), Some(wanted)) if !is(kept, wanted) && is(&fd, wanted) => {
                    std::mem::replace(kept, fd)
                }
                (Some(_), _) => fd,
                // Not reached: a duplicate is only taken beside a buffer.
                (None, _) => {
                    self.buffers.insert(name, fd);
                    continue;
                }
            };
            tracing::warn!(name, "closing a second fd of a buffer's name");
            drop(closed);
            self.leftovers.push(name);
        }
    }

    /// Every name, once each.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .records
            .iter()
            .map(|(name, _)| name.clone())
            .chain(self.buffers.keys().cloned())
            .chain(self.duplicates.iter().map(|(name, _)| name.clone()))
            .chain(self.leftovers.iter().cloned())
            .collect();
        names.sort_unstable();
        names.dedup();
        names
    }

    /// Each name of a buffer or of a leftover with the fds of it beyond
    /// the first: the manager counts them all, and they go only with the
    /// name's removal.
    pub fn extra_fds(&self) -> HashMap<String, usize> {
        let mut extra: HashMap<String, usize> = HashMap::new();
        for name in &self.leftovers {
            let first = !self.buffers.contains_key(name) && !extra.contains_key(name);
            let fds = extra.entry(name.clone()).or_default();
            if !first {
                *fds += 1;
            }
        }
        extra.retain(|_, fds| *fds > 0);
        extra
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InheritError {
    #[error("invalid LISTEN_FDS/LISTEN_FDNAMES from the service manager: {0}")]
    Environment(std::io::Error),
    #[error("the inherited socket '{name}' is {found}; the socket unit must use ListenSequentialPacket= on a Unix socket")]
    WrongSocket { name: String, found: String },
}

/// A name this daemon gives a buffer (`buf-<id>`, the id as it writes it):
/// anything else under the prefix (`buf-01`) is a name it never gives, and
/// leaves the store like one.
fn is_buffer_name(name: &str) -> bool {
    buffer_id_of(name).is_some()
}

/// The id of a buffer's name as this daemon gives it (`buf-<id>`, the id
/// as it writes it, no higher than it hands out): `buf-01` is none, nor is
/// an id above `MAX_BUFFER_ID`, which no instance gave and which would
/// bring the count of ids to its end (see `State::allocate_buffer_id`).
pub fn buffer_id_of(name: &str) -> Option<u64> {
    name.strip_prefix(BUFFER_PREFIX)
        .and_then(|id| id.parse::<u64>().ok())
        .filter(|&id| id <= crate::broker::MAX_BUFFER_ID && super::fdstore::buffer_name(id) == name)
}

/// Takes the inherited fds and clears the environment so that nothing we
/// spawn could mistake them for its own.
///
/// Must run before any other thread exists (it edits the environment).
pub fn take() -> Result<Inherited, InheritError> {
    // SAFETY: called from main() before the tokio runtime (or any other
    // thread) starts, which is the precondition of env::remove_var.
    let fds = unsafe { sd_notify::listen_fds_with_names_and_unset_env() }
        .map_err(InheritError::Environment)?;
    let mut inherited = Inherited::default();
    // Sockets of a socket unit of another kind than the listener's, each
    // with what it is.
    let mut wrong: Vec<(String, String, OwnedFd)> = Vec::new();
    // Still among the socket units' fds: systemd passes them first, then
    // the fd store's (`service_collect_fds`).
    let mut among_socket_units = true;
    for (raw, name) in fds {
        // SAFETY: the service manager passed us this fd (LISTEN_FDS counts
        // it, sd_notify set it close-on-exec); nothing else in this process
        // owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        if name.starts_with(RECORD_PREFIX) {
            among_socket_units = false;
            inherited.stored.records.push((name, fd));
            continue;
        }
        if is_buffer_name(&name) {
            among_socket_units = false;
            match inherited.stored.buffers.entry(name) {
                Entry::Vacant(slot) => {
                    slot.insert(fd);
                }
                // Which one is the buffer the record says (see
                // `Stored::keep_recorded`).
                Entry::Occupied(kept) => {
                    let name = kept.key().clone();
                    inherited.stored.duplicates.push((name, fd));
                }
            }
            continue;
        }
        let kind = socket_kind(&fd);
        among_socket_units &= kind.is_some() && is_socket_unit_name(&name);
        let from_socket_unit = among_socket_units;
        match kind {
            Some(SocketKind::SeqPacketListener) if inherited.listener.is_none() => {
                inherited.listener = Some(fd);
            }
            // Decided once every fd is seen: whether it is where the
            // listener should be.
            Some(SocketKind::Other(found)) if from_socket_unit => wrong.push((name, found, fd)),
            // A second listener of the socket units: not in the store.
            Some(SocketKind::SeqPacketListener) if from_socket_unit => {
                tracing::warn!(name, "closing an unexpected inherited socket");
            }
            // A socket in the fd store, which this daemon never puts one
            // in: whatever its kind, it is no misconfigured listener, and
            // failing for it would fail every restart.
            Some(SocketKind::SeqPacketListener) => {
                close_unexpected_socket(&mut inherited.stored, name, "a second listener", fd);
            }
            Some(SocketKind::Other(found)) => {
                close_unexpected_socket(&mut inherited.stored, name, &found, fd);
            }
            None => {
                tracing::warn!(
                    name,
                    "closing an inherited fd of a name this daemon never gives"
                );
                inherited.stored.leftovers.push(name);
            }
        }
    }
    // A socket unit's socket of the wrong kind and no listener: the socket
    // unit is misconfigured (ListenStream=, say), and serving a socket of
    // our own instead would leave its clients unserved, so start-up stops
    // with the fix. Beside the listener it is only unexpected (another
    // socket unit's): aborting for it made every restart fail until the
    // start limit, which loses the fd store.
    if inherited.listener.is_none() {
        if let Some((name, found, _)) = wrong.into_iter().next() {
            return Err(InheritError::WrongSocket { name, found });
        }
        return Ok(inherited);
    }
    for (name, found, fd) in wrong {
        // Not in the fd store: nothing to remove.
        tracing::warn!(name, found, "closing an unexpected inherited socket");
        drop(fd);
    }
    Ok(inherited)
}

/// Whether `name` is one systemd gives a socket unit's fd: the unit's
/// `FileDescriptorName=`, by default the unit's own name (`*.socket`; the
/// shipped unit names it `dmabroker.socket` explicitly), or `unknown`, the
/// name of every fd passed without `LISTEN_FDNAMES` (a manager without an
/// fd store, such as `systemd-socket-activate`). An fd-store entry has the
/// name it was stored with (`FDNAME=`, by default `stored`).
fn is_socket_unit_name(name: &str) -> bool {
    name.ends_with(".socket") || name == "unknown"
}

/// Closes a socket the fd store handed over, which nothing here serves,
/// and leaves its name to be removed from the store like any other
/// leftover: it keeps its slot there until its name is removed, and a
/// slot the daemon does not count makes the store fuller than it thinks,
/// so that a record it sends to a store it counts as having room is
/// refused (systemd closes it, `EXFULL`) and the previous one removed
/// after it, leaving none.
fn close_unexpected_socket(stored: &mut Stored, name: String, found: &str, fd: OwnedFd) {
    tracing::warn!(name, found, "closing an unexpected inherited socket");
    drop(fd);
    stored.leftovers.push(name);
}

enum SocketKind {
    SeqPacketListener,
    Other(String),
}

fn socket_kind(fd: &OwnedFd) -> Option<SocketKind> {
    let kind = getsockopt(fd, sockopt::SockType).ok()?;
    let unix = getsockname::<UnixAddr>(std::os::fd::AsRawFd::as_raw_fd(&fd.as_fd())).is_ok();
    let listening = getsockopt(fd, sockopt::AcceptConn).unwrap_or(false);
    if unix && listening && kind == SockType::SeqPacket {
        Some(SocketKind::SeqPacketListener)
    } else {
        Some(SocketKind::Other(format!(
            "a {}{:?} socket{}",
            if unix { "Unix " } else { "non-Unix " },
            kind,
            if listening {
                ""
            } else {
                " that is not listening"
            }
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fd() -> OwnedFd {
        crate::kernel::memfd::create_sealed("leftover", 1).expect("memfd")
    }

    /// The manager counts every fd of a name and removes them all with
    /// it: a buffer's name again is an fd beyond the buffer's, and of a
    /// name this daemon never gives every fd beyond the first (which the
    /// name's removal, pending, counts).
    #[test]
    fn fds_beyond_the_first_of_a_name_are_extra() {
        let stored = Stored {
            records: Vec::new(),
            buffers: HashMap::from([("buf-1".to_owned(), fd()), ("buf-2".to_owned(), fd())]),
            duplicates: Vec::new(),
            leftovers: ["buf-1", "stray", "stray", "stray", "other"]
                .map(str::to_owned)
                .to_vec(),
        };
        assert_eq!(
            stored.extra_fds(),
            HashMap::from([("buf-1".to_owned(), 1), ("stray".to_owned(), 2)])
        );
        assert_eq!(stored.len(), 7);
        assert_eq!(stored.names(), ["buf-1", "buf-2", "other", "stray"]);
    }

    /// A buffer's name with an id above those this daemon hands out is
    /// none it gave: taken for one, it brought the count of ids to the end
    /// of `u64`. Found by review.
    #[test]
    fn a_buffer_name_above_the_highest_id_is_none_of_ours() {
        use crate::broker::MAX_BUFFER_ID;
        use crate::service::fdstore::buffer_name;
        assert_eq!(
            buffer_id_of(&buffer_name(MAX_BUFFER_ID)),
            Some(MAX_BUFFER_ID)
        );
        assert_eq!(buffer_id_of(&buffer_name(MAX_BUFFER_ID + 1)), None);
        assert_eq!(buffer_id_of(&buffer_name(u64::MAX)), None);
        assert_eq!(buffer_id_of("buf-01"), None);
        assert!(!is_buffer_name(&buffer_name(u64::MAX)));
    }

    fn recording(buffers: &[(u64, &OwnedFd)]) -> StateRecord {
        StateRecord {
            version: crate::service::record::RECORD_VERSION,
            generation: 1,
            next_buffer: 10,
            buffers: buffers
                .iter()
                .map(|(id, fd)| crate::service::record::BufferRecord {
                    id: *id,
                    size: 1,
                    heap: "memfd".into(),
                    origin: crate::service::record::OriginRecord::Memfd,
                    name: String::new(),
                    inode: crate::kernel::dma_buf::inode(fd.as_fd()).expect("inode"),
                    holders: Vec::new(),
                })
                .collect(),
        }
    }

    /// Of two fds under a buffer's name the one the record names is kept,
    /// whichever came first; the other is closed and left to the name's
    /// removal. The first was kept whatever the record said, and the
    /// restore then dropped the buffer as not the recorded one.
    #[test]
    fn of_two_fds_of_a_buffers_name_the_recorded_one_is_kept() {
        let (impostor, buffer) = (fd(), fd());
        let buffer_inode = crate::kernel::dma_buf::inode(buffer.as_fd()).expect("inode");
        let record = recording(&[(1, &buffer)]);
        let mut stored = Stored {
            buffers: HashMap::from([("buf-1".to_owned(), impostor)]),
            duplicates: vec![("buf-1".to_owned(), buffer)],
            ..Stored::default()
        };
        assert_eq!(stored.len(), 2);
        stored.keep_recorded(Some(&record));
        let kept = stored.buffers.get("buf-1").expect("buf-1 kept");
        assert_eq!(
            crate::kernel::dma_buf::inode(kept.as_fd()).ok(),
            Some(buffer_inode),
            "the recorded fd is kept"
        );
        assert!(stored.duplicates.is_empty());
        assert_eq!(stored.leftovers, ["buf-1"], "the other is closed");
        assert_eq!(stored.extra_fds(), HashMap::from([("buf-1".to_owned(), 1)]));
    }

    /// Without a record, or when the first is the recorded one, the first
    /// handed over stays.
    #[test]
    fn without_a_say_from_the_record_the_first_fd_stays() {
        for recorded_first in [false, true] {
            let (first, second) = (fd(), fd());
            let first_inode = crate::kernel::dma_buf::inode(first.as_fd()).expect("inode");
            let record = recording(&[(1, &first)]);
            let mut stored = Stored {
                buffers: HashMap::from([("buf-1".to_owned(), first)]),
                duplicates: vec![("buf-1".to_owned(), second)],
                ..Stored::default()
            };
            stored.keep_recorded(recorded_first.then_some(&record));
            let kept = stored.buffers.get("buf-1").expect("buf-1 kept");
            assert_eq!(
                crate::kernel::dma_buf::inode(kept.as_fd()).ok(),
                Some(first_inode)
            );
            assert_eq!(stored.leftovers, ["buf-1"]);
        }
    }
}
