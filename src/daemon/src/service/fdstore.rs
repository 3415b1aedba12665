//! The service manager's fd store (`FDSTORE=1`): every live buffer's fd and
//! a record of the table, so a restarted broker takes them back.
//!
//! The record is a sealed memfd, rewritten after changes (debounced by the
//! caller). Two names alternate (`state-a`, `state-b`): the new record is
//! stored before the old one is removed, so a crash in between leaves at
//! least one, and the restore picks the higher generation.

use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use sd_notify::NotifyState;

use super::inherited::{BUFFER_PREFIX, RECORD_PREFIX};
use super::record::StateRecord;
use crate::kernel::memfd;

/// Buffers in and out of the store: cheap notifications the broker sends
/// as buffers come and go.
#[derive(Debug, Default)]
pub struct FdStore;

/// The table's record in the store. Owned by the task that rewrites it, so
/// encoding and storing happen outside the broker's lock.
#[derive(Debug, Default)]
pub struct RecordWriter {
    /// Generation of the last record stored (or taken back at start).
    generation: u64,
    /// The record most recently stored, to be removed after the next one.
    current: Option<String>,
}

pub fn buffer_name(id: u64) -> String {
    format!("{BUFFER_PREFIX}{id}")
}

fn record_name(generation: u64) -> String {
    format!(
        "{RECORD_PREFIX}{}",
        if generation.is_multiple_of(2) {
            "a"
        } else {
            "b"
        }
    )
}

impl FdStore {
    /// Only under a service manager; `None` means there is nowhere to keep
    /// anything.
    pub fn from_env() -> Option<FdStore> {
        super::notify::enabled().then(FdStore::default)
    }

    pub fn store_buffer(&self, id: u64, fd: BorrowedFd<'_>) {
        let name = buffer_name(id);
        if let Err(err) =
            sd_notify::notify_with_fds(&[NotifyState::FdStore, NotifyState::FdName(&name)], &[fd])
        {
            tracing::warn!(buffer = id, error = %err, "cannot put a buffer in the fd store");
        }
    }

    pub fn remove(&self, name: &str) {
        if let Err(err) =
            sd_notify::notify(&[NotifyState::FdStoreRemove, NotifyState::FdName(name)])
        {
            tracing::warn!(name, error = %err, "cannot remove an entry from the fd store");
        }
    }

    pub fn remove_buffer(&self, id: u64) {
        self.remove(&buffer_name(id));
    }
}

impl RecordWriter {
    /// After a restore: the record taken back is the one to replace, and
    /// new records must outrank it.
    pub fn continuing(name: String, generation: u64) -> RecordWriter {
        RecordWriter {
            generation,
            current: Some(name),
        }
    }

    pub fn next_generation(&mut self) -> u64 {
        self.generation += 1;
        self.generation
    }

    /// Stores `record`, then drops the previous one.
    pub fn store(&mut self, record: &StateRecord) -> std::io::Result<()> {
        let bytes = record.encode().map_err(std::io::Error::other)?;
        let name = record_name(record.generation);
        let fd = sealed_copy(&name, &bytes)?;
        sd_notify::notify_with_fds(
            &[NotifyState::FdStore, NotifyState::FdName(&name)],
            &[fd.as_fd()],
        )?;
        if let Some(old) = self.current.replace(name.clone()) {
            if old != name {
                FdStore.remove(&old);
            }
        }
        Ok(())
    }
}

fn sealed_copy(name: &str, bytes: &[u8]) -> std::io::Result<OwnedFd> {
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
