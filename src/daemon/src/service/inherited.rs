//! Fds handed to us by the service manager at start (`LISTEN_FDS`,
//! `LISTEN_FDNAMES`): the listening socket (socket activation) and whatever
//! the previous instance put in the fd store.

use std::collections::HashMap;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};

use nix::sys::socket::{getsockname, getsockopt, sockopt, SockType, UnixAddr};

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
    /// Buffers by name (`buf-<id>`). Should a name come twice, the first
    /// handed over, the newest, is kept.
    pub buffers: HashMap<String, OwnedFd>,
}

impl Stored {
    pub fn is_empty(&self) -> bool {
        self.records.is_empty() && self.buffers.is_empty()
    }

    pub fn len(&self) -> usize {
        self.records.len() + self.buffers.len()
    }

    /// Every name, once each.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .records
            .iter()
            .map(|(name, _)| name.clone())
            .chain(self.buffers.keys().cloned())
            .collect();
        names.sort_unstable();
        names.dedup();
        names
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InheritError {
    #[error("invalid LISTEN_FDS/LISTEN_FDNAMES from the service manager: {0}")]
    Environment(std::io::Error),
    #[error("the inherited socket '{name}' is {found}; the socket unit must use ListenSequentialPacket= on a Unix socket")]
    WrongSocket { name: String, found: String },
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
    for (raw, name) in fds {
        // SAFETY: the service manager passed us this fd (LISTEN_FDS counts
        // it, sd_notify set it close-on-exec); nothing else in this process
        // owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        if name.starts_with(RECORD_PREFIX) {
            inherited.stored.records.push((name, fd));
            continue;
        }
        if name.starts_with(BUFFER_PREFIX) {
            inherited.stored.buffers.entry(name).or_insert(fd);
            continue;
        }
        match socket_kind(&fd) {
            Some(SocketKind::SeqPacketListener) if inherited.listener.is_none() => {
                inherited.listener = Some(fd);
            }
            Some(SocketKind::Other(found)) => {
                return Err(InheritError::WrongSocket { name, found })
            }
            _ => tracing::warn!(name, "closing an unexpected inherited fd"),
        }
    }
    Ok(inherited)
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
