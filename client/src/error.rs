use std::os::fd::OwnedFd;
use std::path::PathBuf;

use dmabroker_ipc::{ErrorCode, QuotaDetail, WireError};

use crate::AccessGuard;

/// Everything a dmabroker call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to dmabroker at {}: {source} (is dmabrokerd running? set DMABROKER_SOCKET to its socket)", path.display())]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The broker refused the request; [`Error::code`] says why.
    #[error("dmabroker refused: {0}")]
    Broker(WireError),
    #[error("protocol error talking to dmabroker: {0}")]
    Protocol(String),
    #[error("the connection to dmabroker was lost")]
    Disconnected,
    /// The broker went away and the client connected again, re-attaching
    /// its buffers: fences and accesses it was told of before are void
    /// (events about them will never come). Calls may go on.
    #[error(
        "the connection to dmabroker was made again: fences and accesses from before are void"
    )]
    Reconnected,
    #[error("cannot map buffer: {0}")]
    Map(#[from] dmabroker_ipc::mapping::MapError),
    #[error("invalid share token: {0}")]
    Token(#[from] dmabroker_ipc::token::TokenError),
    #[error("the broker sent {got} where {expected} was expected")]
    UnexpectedReply { expected: &'static str, got: String },
    #[error("this access does not allow {0}")]
    AccessMode(&'static str),
    #[error("async task failed: {0}")]
    Task(String),
    /// The broker carried the request out, but this process had no room in
    /// its fd table (`EMFILE`) for the fds of the answer, and the kernel
    /// dropped them. What the answer gave is handed back (a buffer freed,
    /// an access ended), so nothing stays charged to this client: close
    /// some fds and ask again. It is handed back without waiting for the
    /// broker, which may not be reading: when the socket has no room for
    /// it, it goes out ahead of the next message the client sends on that
    /// connection (or once the broker answers anything), and a connection
    /// that ends first ends the charge with it. Only when 64 give-backs
    /// wait so already is one lost, and [`Client::take_errors`] says so.
    /// The broker refused nothing, so [`Error::code`] is `None`.
    ///
    /// [`Client::take_errors`]: crate::Client::take_errors
    #[error("this process's fd table is full (EMFILE): the fds of dmabroker's answer could not be received, and what it gave is handed back")]
    FdTableFull,
    /// The CPU's cache sync of a no-autofence access to a dma-buf
    /// (`DMA_BUF_IOCTL_SYNC`, which this crate issues for such a client:
    /// the broker syncs only autofence clients' accesses) failed. At
    /// `bytes()`, the bytes were not handed out; at the end, the access
    /// was ended all the same. [`Error::code`] is `None`.
    #[error("the cache sync of the dma-buf (DMA_BUF_IOCTL_SYNC) failed: {0}")]
    CacheSync(#[source] nix::errno::Errno),
}

impl Error {
    /// The broker's error code, when the broker refused.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Broker(err) => Some(err.code),
            _ => None,
        }
    }

    /// Figures of a `QuotaExceeded` refusal.
    pub fn quota(&self) -> Option<QuotaDetail> {
        match self {
            Error::Broker(err) => err.quota,
            _ => None,
        }
    }
}

/// An [`AccessGuard::end_with_fence`] that did not take effect. The access
/// is still held by `guard`: dropping it ends the access at once, without
/// the fence, so readers may then see the buffer before the device is done.
#[derive(Debug, thiserror::Error)]
#[error("the access was not ended with its fence (it is still held): {error}")]
pub struct FenceRefused {
    #[source]
    pub error: Error,
    /// Boxed: a guard is large, and this travels in a `Result`.
    pub guard: Box<AccessGuard>,
    pub sync_file: OwnedFd,
}

impl FenceRefused {
    pub(crate) fn new(error: Error, guard: AccessGuard, sync_file: OwnedFd) -> FenceRefused {
        FenceRefused {
            error,
            guard: Box::new(guard),
            sync_file,
        }
    }

    /// The broker's error code, when the broker refused.
    pub fn code(&self) -> Option<ErrorCode> {
        self.error.code()
    }
}

/// A [`Client::adopt`](crate::Client::adopt) that did not take effect: the
/// dma-buf comes back, still open. Some refusals mean "try again" (`Busy`
/// while a restarted broker waits for the buffer's owner to re-attach, or
/// while the daemon is out of fds), and a V4L2 or GPU program could not
/// retry if the fd were closed: it would have to export the buffer anew.
#[derive(Debug, thiserror::Error)]
#[error("the dma-buf was not adopted (its fd is given back): {error}")]
pub struct AdoptRefused {
    #[source]
    pub error: Error,
    pub dmabuf: OwnedFd,
}

impl AdoptRefused {
    /// The broker's error code, when the broker refused.
    pub fn code(&self) -> Option<ErrorCode> {
        self.error.code()
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
