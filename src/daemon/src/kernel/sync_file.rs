//! sync_file status queries: the broker needs to know whether a fence a client
//! handed over (or one exported from a buffer) has already signalled before
//! deciding to grant access or to wait.

use std::os::fd::{AsRawFd, BorrowedFd};

use super::uapi::{self, SyncFileInfo};
use super::{fd_target, retry, KernelError};

/// State of the fence(s) in a sync_file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncFileStatus {
    /// Signalled successfully.
    Signalled,
    /// Not yet signalled.
    Pending,
    /// Signalled with an error (the producing work failed); waiters are
    /// released, but the buffer contents are suspect.
    Error,
}

/// [`status`] of a client's fd: one whose `/proc` link is not
/// `anon_inode:sync_file` (a path always starts with `/`) is refused before
/// the ioctl, which on a file of a client's FUSE mount would go to its
/// server: unanswered, or answered with success.
pub fn foreign_status(fd: BorrowedFd<'_>) -> Result<SyncFileStatus, KernelError> {
    if super::fd_link(fd).as_deref() != Some("anon_inode:sync_file") {
        return Err(KernelError::sys(
            "SYNC_IOC_FILE_INFO (not a sync_file by its /proc link)",
            fd_target(fd),
            nix::errno::Errno::EINVAL,
        ));
    }
    status(fd)
}

/// Queries SYNC_IOC_FILE_INFO without fetching per-fence details. Unlike
/// poll(), this fails (ENOTTY/EINVAL) on an fd that is not a sync_file, so a
/// client cannot pass a regular file that always polls as ready.
pub fn status(fd: BorrowedFd<'_>) -> Result<SyncFileStatus, KernelError> {
    // num_fences == 0 asks only for the summary; flags and pad must be zero.
    let mut info = SyncFileInfo::default();
    let raw = fd.as_raw_fd();
    retry(|| {
        // SAFETY: `raw` is a live fd and `info` a valid, zeroed
        // `struct sync_file_info`; with num_fences == 0 the kernel does not
        // dereference `sync_fence_info`.
        unsafe { uapi::sync_file_info(raw, &mut info) }
    })
    .map_err(|errno| KernelError::sys("SYNC_IOC_FILE_INFO", fd_target(fd), errno))?;
    Ok(match info.status {
        1 => SyncFileStatus::Signalled,
        0 => SyncFileStatus::Pending,
        _ => SyncFileStatus::Error,
    })
}

/// Whether waiting on the sync_file would return immediately; a fence that
/// signalled with an error counts as signalled.
pub fn is_signalled(fd: BorrowedFd<'_>) -> Result<bool, KernelError> {
    status(fd).map(|s| s != SyncFileStatus::Pending)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::memfd;
    use std::os::fd::AsFd;

    #[test]
    fn status_rejects_non_sync_files() {
        let fd = memfd::create_sealed("not-a-fence", 4096).expect("memfd");
        let err = status(fd.as_fd()).expect_err("memfd is not a sync_file");
        assert!(err.to_string().contains("SYNC_IOC_FILE_INFO"), "{err}");
        assert!(is_signalled(fd.as_fd()).is_err());
        let err = foreign_status(fd.as_fd()).expect_err("nor from a client");
        assert!(err.to_string().contains("/proc link"), "{err}");
    }
    // Signalled sync_files are covered by the dma_buf export tests
    // (kernel_tier_dma_buf_export_sync_file_idle_is_signalled).
}
