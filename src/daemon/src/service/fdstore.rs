//! The service manager's fd store (`FDSTORE=1`): every live buffer's fd and
//! a record of the table, so a restarted broker takes them back.
//!
//! The record is a sealed memfd, rewritten after changes (debounced by the
//! caller). Two names alternate (`state-a`, `state-b`): the new record is
//! stored before the old one is removed, so a crash in between leaves at
//! least one, and the restore picks the higher generation. The name is the
//! one the stored record does not have, not one chosen by the generation:
//! after a record that could not be stored, the next one would otherwise
//! take the name of the one stored, which then stayed (removing a name
//! removes every fd of it, so it could not be removed).
//!
//! The store is bounded (`FileDescriptorStoreMax=`), and systemd closes an
//! fd sent to a full store without telling the sender. So the broker knows
//! the bound ([`Capacity`]) and never sends more fds than fit: two slots
//! stay free for the records, and a buffer that would need a slot beyond
//! the rest is refused (see `State::check_store_slot`).

use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Mutex;

use sd_notify::NotifyState;

use super::inherited::{BUFFER_PREFIX, RECORD_PREFIX};
use super::notify;
use super::record::StateRecord;
use crate::kernel::memfd;

/// Slots of the store kept for the record: the new one is stored before
/// the old one is removed, so for a moment there are two.
pub const RECORD_SLOTS: usize = 2;

/// How many fds the service manager keeps for us.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    /// `FileDescriptorStoreMax=`.
    pub max: usize,
    /// Whether the manager said so (`$FDSTORE`) or `--fd-store-max` did.
    pub from_manager: bool,
}

impl Capacity {
    /// `$FDSTORE` when the manager sets it (systemd ≥ 254 does whenever
    /// `FileDescriptorStoreMax=` is above 0), else `fallback`.
    pub fn from_env(fallback: usize) -> Capacity {
        let told = std::env::var("FDSTORE").ok();
        match told.as_deref().map(str::parse::<usize>) {
            Some(Ok(max)) => Capacity {
                max,
                from_manager: true,
            },
            Some(Err(err)) => {
                tracing::warn!(
                    value = told.as_deref().unwrap_or_default(),
                    error = %err,
                    fallback,
                    "cannot read $FDSTORE; using --fd-store-max"
                );
                Capacity {
                    max: fallback,
                    from_manager: false,
                }
            }
            None => Capacity {
                max: fallback,
                from_manager: false,
            },
        }
    }

    /// Buffers the store can keep besides the records.
    pub fn buffer_slots(&self) -> usize {
        self.max.saturating_sub(RECORD_SLOTS)
    }
}

/// Buffers in and out of the store: cheap notifications the broker sends
/// as buffers come and go.
#[derive(Debug)]
pub struct FdStore {
    pub capacity: Capacity,
    /// Entries whose removal could not be sent (the daemon had no fd for
    /// the notify socket): still in the store, so still taking slots, and
    /// sent again with the next change to the store.
    unremoved: Mutex<Vec<String>>,
    /// Buffers that could not be put in the store (the manager's queue
    /// full, no fd for the message): sent again with the next change to the
    /// store and by the record's writer until they are in.
    unstored: Mutex<Vec<u64>>,
}

/// The table's record in the store. Owned by the task that rewrites it, so
/// encoding and storing happen outside the broker's lock.
#[derive(Debug, Default)]
pub struct RecordWriter {
    /// Generation of the last record stored (or taken back at start).
    generation: u64,
    /// The record most recently stored, to be removed after the next one.
    current: Option<String>,
    /// A previous record whose removal could not be sent: removed before
    /// the next record is stored, which would otherwise make a third
    /// record fd in the store and take a buffer's slot.
    stale: Option<String>,
}

pub fn buffer_name(id: u64) -> String {
    format!("{BUFFER_PREFIX}{id}")
}

/// The name for the next record: the other one than the stored record's.
fn next_record_name(current: Option<&str>) -> String {
    let a = format!("{RECORD_PREFIX}a");
    if current == Some(a.as_str()) {
        format!("{RECORD_PREFIX}b")
    } else {
        a
    }
}

impl FdStore {
    /// Only under a service manager; `None` means there is nowhere to keep
    /// anything. `fallback_max`: `--fd-store-max`, for a manager that does
    /// not say how many fds it keeps.
    pub fn from_env(fallback_max: usize) -> Option<FdStore> {
        super::notify::enabled().then(|| FdStore {
            capacity: Capacity::from_env(fallback_max),
            unremoved: Mutex::new(Vec::new()),
            unstored: Mutex::new(Vec::new()),
        })
    }

    /// Entries gone from the table but perhaps not from the store.
    pub fn unremoved(&self) -> usize {
        self.unremoved_names().len()
    }

    fn unremoved_names(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
        self.unremoved.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends the removals that failed before, in order, until one fails
    /// again (the manager's queue is still full: the rest would too).
    pub fn retry_removals(&self) {
        let mut names = self.unremoved_names();
        if names.is_empty() {
            return;
        }
        let sent = names.iter().take_while(|name| remove(name)).count();
        names.drain(..sent);
        if names.is_empty() {
            tracing::info!("every removal from the fd store is sent");
        }
    }

    /// Puts a new buffer in the store; one that cannot go in now is
    /// remembered and sent again (see [`FdStore::retry_stores`]), or the
    /// next instance would drop it although a client holds it.
    pub fn store_buffer(&self, id: u64, fd: BorrowedFd<'_>) {
        self.retry_removals();
        let mut ids = self.unstored_ids();
        // Behind the ones still out, whose sends would fail first.
        if !ids.is_empty() || !store(id, fd) {
            if ids.is_empty() {
                tracing::warn!(
                    buffer = id,
                    "cannot put buffers in the fd store (the service manager has no room or is gone); they will be sent again"
                );
            }
            ids.push(id);
        }
    }

    fn unstored_ids(&self) -> std::sync::MutexGuard<'_, Vec<u64>> {
        self.unstored.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends the buffers that could not be put in the store before, in
    /// order, until one fails again (the rest would too), forgetting freed
    /// ones (`fd_of` gives a live buffer's fd); and the removals that
    /// failed. Returns how many buffers are still out.
    pub fn retry_stores<'a>(&self, fd_of: impl Fn(u64) -> Option<BorrowedFd<'a>>) -> usize {
        self.retry_removals();
        let mut ids = self.unstored_ids();
        if ids.is_empty() {
            return 0;
        }
        let mut kept = Vec::with_capacity(ids.len());
        let mut blocked = false;
        for &id in ids.iter() {
            match fd_of(id) {
                None => {}
                Some(_) if blocked => kept.push(id),
                Some(fd) if !store(id, fd) => {
                    blocked = true;
                    kept.push(id);
                }
                Some(_) => {}
            }
        }
        *ids = kept;
        if ids.is_empty() {
            tracing::info!("every buffer is in the fd store again");
        }
        ids.len()
    }

    /// Takes up to `limit` of the buffers still out of the store, oldest
    /// first, for a sender that may wait for the manager: while it has
    /// them, no other send of them is made (a buffer stored twice takes two
    /// of the store's slots). It gives back those it could not send
    /// ([`FdStore::give_back`]).
    pub fn take_unstored(&self, limit: usize) -> Vec<u64> {
        let mut ids = self.unstored_ids();
        let n = limit.min(ids.len());
        ids.drain(..n).collect()
    }

    /// Buffers a sender took and could not send: out of the store still,
    /// ahead of the rest.
    pub fn give_back(&self, unsent: &[u64]) {
        if unsent.is_empty() {
            return;
        }
        let mut ids = self.unstored_ids();
        let rest = std::mem::take(&mut *ids);
        ids.extend_from_slice(unsent);
        ids.extend(rest);
    }

    /// Buffers still out of the store (not counting any a sender has
    /// taken).
    pub fn unstored_count(&self) -> usize {
        self.unstored_ids().len()
    }

    pub fn remove(&self, name: &str) {
        self.retry_removals();
        let mut names = self.unremoved_names();
        // Behind the ones still out, whose sends would fail first. Only
        // buffers are remembered: a record's name is used again by a later
        // record, which a late removal would delete (a stale record costs
        // nothing but its slot; the restore takes the newest).
        if (!names.is_empty() || !remove(name)) && name.starts_with(BUFFER_PREFIX) {
            if names.is_empty() {
                tracing::warn!(
                    name,
                    "cannot remove an entry from the fd store (the service manager has no room or is gone); it keeps its slot until it is sent again"
                );
            }
            names.push(name.to_owned());
        }
    }

    pub fn remove_buffer(&self, id: u64) {
        self.remove(&buffer_name(id));
    }
}

/// Puts buffer `id`'s fd in the store; false when the message could not
/// be sent (logged by the caller, once for a run of failures).
fn store(id: u64, fd: BorrowedFd<'_>) -> bool {
    let name = buffer_name(id);
    match notify::try_send(&[NotifyState::FdStore, NotifyState::FdName(&name)], &[fd]) {
        Ok(()) => true,
        Err(err) => {
            tracing::debug!(buffer = id, error = %err, "cannot put a buffer in the fd store");
            false
        }
    }
}

/// [`store`], waiting until `deadline` for room in the manager's queue:
/// off the broker's thread only.
pub fn store_waiting(id: u64, fd: BorrowedFd<'_>, deadline: std::time::Instant) -> bool {
    let name = buffer_name(id);
    notify::send_waiting(
        &[NotifyState::FdStore, NotifyState::FdName(&name)],
        &[fd],
        deadline,
    )
    .is_ok()
}

/// Removes every fd stored under `name` (`FDSTOREREMOVE=1`); false when
/// the message could not be sent (logged by the caller, once for a run of
/// failures).
fn remove(name: &str) -> bool {
    match notify::try_send(
        &[NotifyState::FdStoreRemove, NotifyState::FdName(name)],
        &[],
    ) {
        Ok(()) => true,
        Err(err) => {
            tracing::debug!(name, error = %err, "cannot remove an entry from the fd store");
            false
        }
    }
}

/// [`remove`] for the record's writer, waiting until `deadline` for room.
fn remove_waiting(name: &str, deadline: std::time::Instant) -> bool {
    match notify::send_waiting(
        &[NotifyState::FdStoreRemove, NotifyState::FdName(name)],
        &[],
        deadline,
    ) {
        Ok(()) => true,
        Err(err) => {
            tracing::warn!(name, error = %err, "cannot remove an old record from the fd store");
            false
        }
    }
}

impl RecordWriter {
    /// After a restore: the record taken back is the one to replace, and
    /// new records must outrank it.
    pub fn continuing(name: String, generation: u64) -> RecordWriter {
        RecordWriter {
            generation,
            current: Some(name),
            stale: None,
        }
    }

    pub fn next_generation(&mut self) -> u64 {
        self.generation += 1;
        self.generation
    }

    /// Stores `record`, then drops the previous one. On failure nothing
    /// changed: the previous record stays the one to replace.
    /// Waits for room in the manager's queue until `deadline`: runs off
    /// the broker's thread.
    pub fn store(
        &mut self,
        record: &StateRecord,
        deadline: std::time::Instant,
    ) -> std::io::Result<()> {
        if let Some(stale) = &self.stale {
            if !remove_waiting(stale, deadline) {
                return Err(std::io::Error::other(format!(
                    "cannot remove the previous record {stale} from the fd store"
                )));
            }
            self.stale = None;
        }
        let bytes = record.encode().map_err(std::io::Error::other)?;
        let name = next_record_name(self.current.as_deref());
        let fd = sealed_copy(&name, &bytes)?;
        notify::send_waiting(
            &[NotifyState::FdStore, NotifyState::FdName(&name)],
            &[fd.as_fd()],
            deadline,
        )?;
        if let Some(old) = self.current.replace(name.clone()) {
            if old != name && !remove_waiting(&old, deadline) {
                self.stale = Some(old);
            }
        }
        Ok(())
    }
}

pub(crate) fn sealed_copy(name: &str, bytes: &[u8]) -> std::io::Result<OwnedFd> {
    // Sized exactly and sealed against growing or shrinking: the record
    // cannot be truncated under the next instance's reader.
    let fd = memfd::create_sealed(&format!("dmabroker-{name}"), bytes.len().max(1) as u64)
        .map_err(std::io::Error::other)?;
    let mut file = std::fs::File::from(fd);
    file.write_all(bytes)?;
    Ok(OwnedFd::from(file))
}

/// Reads a stored record back.
pub fn read_record(fd: &OwnedFd) -> Option<StateRecord> {
    use std::io::{Read, Seek};
    let mut file = std::fs::File::from(fd.try_clone().ok()?);
    file.rewind().ok()?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).ok()?;
    StateRecord::decode(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store_with(unstored: &[u64]) -> FdStore {
        FdStore {
            capacity: Capacity {
                max: 16,
                from_manager: false,
            },
            unremoved: Mutex::new(Vec::new()),
            unstored: Mutex::new(unstored.to_vec()),
        }
    }

    /// Buffers a sender took are no one else's to send while it has them
    /// (stored twice, a buffer takes two slots), and those it could not
    /// send come back ahead of the rest, in order.
    #[test]
    fn taken_buffers_are_out_of_the_list_until_given_back_in_order() {
        let store = store_with(&[1, 2, 3, 4]);
        assert_eq!(store.take_unstored(2), vec![1, 2]);
        assert_eq!(store.unstored_count(), 2);
        assert_eq!(
            store.retry_stores(|_| None),
            0,
            "only 3 and 4 were left to try"
        );
        let store = store_with(&[3, 4]);
        store.give_back(&[2]);
        assert_eq!(store.take_unstored(10), vec![2, 3, 4]);
    }

    /// The names alternate with what is stored, whatever the generation:
    /// a failed store leaves `current` alone, and the next record still
    /// takes the other name.
    #[test]
    fn the_next_record_takes_the_name_the_stored_one_does_not_have() {
        assert_eq!(next_record_name(None), "state-a");
        assert_eq!(next_record_name(Some("state-a")), "state-b");
        assert_eq!(next_record_name(Some("state-b")), "state-a");
    }
}
