//! dma-buf fd operations: naming, CPU-access bracketing, implicit-fence
//! export/import and identification.

use std::ffi::CString;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::stat::fstat;
use nix::sys::statfs::fstatfs;
use nix::unistd::{lseek, Whence};

use super::memfd::truncate_name;
use super::uapi::{self, DmaBufExportSyncFile, DmaBufImportSyncFile};
use super::{fd_target, retry, KernelError};

/// Which CPU access a sync is about, and whether it begins or ends: the
/// ipc crate's, which the client crate uses for a no-autofence client's
/// own cache sync.
pub use dmabroker_ipc::cachesync::{SyncDirection, SyncPhase};

/// Result of [`import_sync_file`]: kernels before 6.0 (or without
/// CONFIG_SYNC_FILE) lack the ioctl, which callers must handle by waiting on
/// the fence themselves instead of treating it as a failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImportOutcome {
    Imported,
    Unsupported,
}

/// Longest name the kernel stores (DMA_BUF_NAME_LEN minus the NUL).
pub const MAX_NAME_LEN: usize = uapi::DMA_BUF_NAME_LEN - 1;

/// Names a dma-buf so it shows up in /proc/PID/fdinfo and debugfs; this is
/// how an operator tells which client owns which buffer. Names longer than
/// 31 bytes are truncated on a character boundary rather than rejected, since
/// the name is diagnostic only.
pub fn set_name(fd: BorrowedFd<'_>, name: &str) -> Result<(), KernelError> {
    const OP: &str = "DMA_BUF_SET_NAME";
    let cname = CString::new(truncate_name(name, MAX_NAME_LEN))
        .map_err(|_| KernelError::invalid(OP, fd_target(fd), "name contains a NUL byte"))?;
    let raw = fd.as_raw_fd();
    retry(|| {
        // SAFETY: `raw` is a live fd for the duration of the call and `cname`
        // is a NUL-terminated string that outlives it; the kernel only reads
        // up to DMA_BUF_NAME_LEN bytes from it.
        unsafe { uapi::dma_buf_set_name(raw, cname.as_ptr()) }
    })
    .map(drop)
    .map_err(|errno| KernelError::sys(OP, fd_target(fd), errno))
}

/// Brackets CPU access to a mapping (see [`dmabroker_ipc::cachesync::sync`]:
/// cache maintenance, and START waits for the buffer's implicit fences).
pub fn sync(
    fd: BorrowedFd<'_>,
    direction: SyncDirection,
    phase: SyncPhase,
) -> Result<(), KernelError> {
    dmabroker_ipc::cachesync::sync(fd, direction, phase)
        .map_err(|errno| KernelError::sys("DMA_BUF_IOCTL_SYNC", fd_target(fd), errno))
}

fn ensure_dma_buf(op: &'static str, fd: BorrowedFd<'_>) -> Result<(), KernelError> {
    if is_dma_buf(fd) {
        Ok(())
    } else {
        Err(KernelError::invalid(op, fd_target(fd), "not a dma-buf"))
    }
}

/// The kernel's read/write flags for export/import. READ|WRITE means the same
/// as WRITE for both ioctls, so a bool captures every distinct case.
fn fence_flags(write: bool) -> u32 {
    if write {
        uapi::DMA_BUF_SYNC_WRITE as u32
    } else {
        uapi::DMA_BUF_SYNC_READ as u32
    }
}

/// Snapshots the buffer's current implicit fences as a sync_file: for a read
/// (`write == false`), the writers a reader must wait for; for a write, every
/// user. Linux 6.0+ with CONFIG_SYNC_FILE; older kernels fail with ENOTTY
/// (see [`KernelError::errno`]).
pub fn export_sync_file(fd: BorrowedFd<'_>, write: bool) -> Result<OwnedFd, KernelError> {
    const OP: &str = "DMA_BUF_IOCTL_EXPORT_SYNC_FILE";
    ensure_dma_buf(OP, fd)?;
    let mut arg = DmaBufExportSyncFile {
        flags: fence_flags(write),
        fd: -1,
    };
    let raw = fd.as_raw_fd();
    retry(|| {
        // SAFETY: `raw` is a live fd and `arg` a valid
        // `struct dma_buf_export_sync_file` the kernel reads and writes.
        unsafe { uapi::dma_buf_export_sync_file(raw, &mut arg) }
    })
    .map_err(|errno| KernelError::sys(OP, fd_target(fd), errno))?;
    // SAFETY: on success the kernel installed a new sync_file fd in `arg.fd`
    // that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(arg.fd) })
}

/// Adds a sync_file to the buffer's implicit fences, so implicitly synced
/// users (GL, V4L2, KMS) wait for work the broker only knows as an explicit
/// fence. With `write == false` the fence is added as a read fence (later
/// writers wait for it), otherwise as a write fence (everyone waits). ENOTTY
/// (kernel < 6.0) is reported as [`ImportOutcome::Unsupported`], not as an
/// error.
pub fn import_sync_file(
    fd: BorrowedFd<'_>,
    sync_file: BorrowedFd<'_>,
    write: bool,
) -> Result<ImportOutcome, KernelError> {
    const OP: &str = "DMA_BUF_IOCTL_IMPORT_SYNC_FILE";
    // Checked first so that ENOTTY really means "kernel lacks the ioctl" and
    // not "this fd is not a dma-buf".
    ensure_dma_buf(OP, fd)?;
    let arg = DmaBufImportSyncFile {
        flags: fence_flags(write),
        fd: sync_file.as_raw_fd(),
    };
    let raw = fd.as_raw_fd();
    match retry(|| {
        // SAFETY: `raw` and `arg.fd` are live fds borrowed for the call, and
        // `arg` is a valid `struct dma_buf_import_sync_file` the kernel reads.
        unsafe { uapi::dma_buf_import_sync_file(raw, &arg) }
    }) {
        Ok(_) => Ok(ImportOutcome::Imported),
        Err(Errno::ENOTTY) => Ok(ImportOutcome::Unsupported),
        Err(errno) => Err(KernelError::sys(OP, fd_target(fd), errno)),
    }
}

/// Whether `fd` is a dma-buf, by the magic of the filesystem it lives on.
/// For the daemon's own fds; a client's goes through [`is_foreign_dma_buf`].
pub fn is_dma_buf(fd: BorrowedFd<'_>) -> bool {
    // f_type is i64 on glibc/x86-64 but narrower or unsigned elsewhere.
    #[allow(clippy::unnecessary_cast)]
    fstatfs(fd).is_ok_and(|s| s.filesystem_type().0 as i64 == uapi::DMA_BUF_MAGIC)
}

/// Whether a client's `fd` is a dma-buf, asked without reaching the file
/// system it lives on: a file of a FUSE mount the client runs would send
/// `fstatfs` (and then `lseek`, `fstat`) to its server, which could leave
/// the broker's one thread waiting for good. Four looks, each safe for
/// what the ones before let through:
/// - its `/proc` link must be `/dmabuf:…` (`anon_inode:dmabuf` before
///   Linux 5.3). This alone rules out every other anonymous inode, whose
///   fdinfo may take locks a client can hold: an epoll's waits for the
///   epoll's mutex, which a thread of the client's keeps while a FUSE
///   server withholds its answer to a poll, and that wait cannot be
///   interrupted, not even by SIGKILL;
/// - its inode must have no file type, as a dma-buf's has none: the link
///   is a path, which a mount namespace of the client's could show for a
///   device node of its choice (`/dev/net/tun` bound at `/dmabuf:x`, whose
///   fdinfo takes `rtnl_lock`), a FIFO or a socket;
/// - its fdinfo must have `exp_name:`, which only a dma-buf's prints (a
///   file of a file system that claims no type gets the generic fdinfo);
/// - and then the file system's magic.
pub fn is_foreign_dma_buf(fd: BorrowedFd<'_>) -> bool {
    let named = super::fd_link(fd)
        .is_some_and(|link| link.starts_with("/dmabuf:") || link == "anon_inode:dmabuf");
    named
        && super::typeless_inode(fd)
        && super::fdinfo(fd).is_ok_and(|info| info.contains_key("exp_name"))
        && is_dma_buf(fd)
}

/// The inode number: together with the device it identifies a buffer across
/// processes and fd duplicates.
pub fn inode(fd: BorrowedFd<'_>) -> Result<u64, KernelError> {
    fstat(fd.as_raw_fd())
        .map(|st| st.st_ino)
        .map_err(|errno| KernelError::sys("fstat", fd_target(fd), errno))
}

/// Size in bytes. dma-bufs report st_size 0, and their size is only
/// available via lseek(SEEK_END) (which does not move the file offset for
/// dma-bufs); everything else uses fstat so no shared offset is disturbed.
pub fn size(fd: BorrowedFd<'_>) -> Result<u64, KernelError> {
    if is_dma_buf(fd) {
        lseek(fd.as_raw_fd(), 0, Whence::SeekEnd)
            .map(|s| s as u64)
            .map_err(|errno| KernelError::sys("lseek(SEEK_END)", fd_target(fd), errno))
    } else {
        fstat(fd.as_raw_fd())
            .map(|st| st.st_size as u64)
            .map_err(|errno| KernelError::sys("fstat", fd_target(fd), errno))
    }
}

/// Non-blocking check of a dma-buf's implicit fences: a reader needs the
/// write fences signalled (POLLIN), a writer needs all of them (POLLOUT).
/// Any error reads as "not signalled", which makes callers wait rather than
/// grant access too early. Only meaningful on dma-bufs; other files poll as
/// always ready.
pub fn implicit_fences_signalled(fd: BorrowedFd<'_>, write: bool) -> bool {
    let want = if write {
        PollFlags::POLLOUT
    } else {
        PollFlags::POLLIN
    };
    let mut fds = [PollFd::new(fd, want)];
    match retry(|| poll(&mut fds, PollTimeout::ZERO)) {
        Ok(n) if n > 0 => fds[0].revents().is_some_and(|r| r.contains(want)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::dma_heap::{DmaHeap, DEFAULT_DMA_HEAP_DIR};
    use crate::kernel::testutil::TempDir;
    use crate::kernel::{fdinfo, memfd, require_or_skip, sync_file};
    use std::os::fd::AsFd;
    use std::path::Path;

    fn system_buffer(len: u64) -> Option<OwnedFd> {
        let path = Path::new(DEFAULT_DMA_HEAP_DIR).join("system");
        if !require_or_skip("dma-heap `system` (/dev/dma_heap/system)", path.exists()) {
            return None;
        }
        let heap = DmaHeap::open(&path).expect("open system heap");
        Some(heap.alloc(len).expect("alloc"))
    }

    #[test]
    fn non_dma_bufs_are_recognised() {
        let mfd = memfd::create_sealed("not-a-dmabuf", 4096).expect("memfd");
        assert!(!is_dma_buf(mfd.as_fd()));
        assert!(!is_foreign_dma_buf(mfd.as_fd()));
        let dir = TempDir::new("dmabuf");
        let path = dir.path().join("plain");
        std::fs::write(&path, [1u8; 100]).expect("write");
        let file = std::fs::File::open(&path).expect("open");
        assert!(!is_dma_buf(file.as_fd()));
        assert_eq!(size(file.as_fd()).expect("size"), 100);
        assert_eq!(size(mfd.as_fd()).expect("size"), 4096);
        let meta = std::fs::metadata(&path).expect("metadata");
        assert_eq!(
            inode(file.as_fd()).expect("inode"),
            std::os::unix::fs::MetadataExt::ino(&meta)
        );
    }

    #[test]
    fn dma_buf_ioctls_on_other_files_fail_with_context() {
        let mfd = memfd::create_sealed("not-a-dmabuf", 4096).expect("memfd");
        let err = set_name(mfd.as_fd(), "x").expect_err("memfd has no name ioctl");
        assert_eq!(err.errno(), Some(Errno::ENOTTY));
        assert!(err.to_string().contains("DMA_BUF_SET_NAME"), "{err}");
        let err = sync(mfd.as_fd(), SyncDirection::Read, SyncPhase::Start).expect_err("sync");
        assert_eq!(err.errno(), Some(Errno::ENOTTY));
        // Not "Unsupported": the fd is wrong, not the kernel.
        let other = memfd::create_sealed("other", 4096).expect("memfd");
        let err =
            import_sync_file(mfd.as_fd(), other.as_fd(), true).expect_err("import into memfd");
        assert!(matches!(err, KernelError::Invalid { .. }), "{err}");
        assert!(export_sync_file(mfd.as_fd(), false).is_err());
        assert!(set_name(mfd.as_fd(), "a\0b").is_err());
    }

    #[test]
    fn kernel_tier_dma_buf_set_name_and_fdinfo() {
        let Some(fd) = system_buffer(8192) else {
            return;
        };
        set_name(fd.as_fd(), "cam0:client42").expect("set_name");
        crate::kernel::testutil::assert_fdinfo(fd.as_fd(), "cam0:client42", "system", 8192);
        assert_eq!(size(fd.as_fd()).expect("size"), 8192);
        assert!(inode(fd.as_fd()).expect("inode") > 0);

        // Over-long names are truncated to 31 bytes on a char boundary.
        let long = format!("{}é{}", "a".repeat(30), "b".repeat(10));
        set_name(fd.as_fd(), &long).expect("set long name");
        let info = fdinfo(fd.as_fd()).expect("fdinfo");
        assert_eq!(info.get("name").map(String::as_str), Some(&*"a".repeat(30)));
    }

    #[test]
    fn kernel_tier_dma_buf_sync_start_end() {
        let Some(fd) = system_buffer(4096) else {
            return;
        };
        for dir in [
            SyncDirection::Read,
            SyncDirection::Write,
            SyncDirection::ReadWrite,
        ] {
            sync(fd.as_fd(), dir, SyncPhase::Start).expect("sync start");
            sync(fd.as_fd(), dir, SyncPhase::End).expect("sync end");
        }
    }

    #[test]
    fn kernel_tier_dma_buf_export_sync_file_idle_is_signalled() {
        let Some(fd) = system_buffer(4096) else {
            return;
        };
        assert!(implicit_fences_signalled(fd.as_fd(), false));
        assert!(implicit_fences_signalled(fd.as_fd(), true));
        for write in [false, true] {
            let sf = export_sync_file(fd.as_fd(), write).expect("export sync_file");
            assert!(!is_dma_buf(sf.as_fd()));
            assert_eq!(
                sync_file::status(sf.as_fd()).expect("status"),
                sync_file::SyncFileStatus::Signalled
            );
            assert!(sync_file::is_signalled(sf.as_fd()).expect("is_signalled"));
            assert_eq!(
                sync_file::foreign_status(sf.as_fd()).expect("named anon_inode:sync_file"),
                sync_file::SyncFileStatus::Signalled
            );
            assert!(!is_foreign_dma_buf(sf.as_fd()));
        }
    }

    #[test]
    fn kernel_tier_dma_buf_import_sync_file() {
        let Some(fd) = system_buffer(4096) else {
            return;
        };
        let sf = export_sync_file(fd.as_fd(), true).expect("export");
        let outcome = import_sync_file(fd.as_fd(), sf.as_fd(), true).expect("import");
        // In the VM (6.12, which has it) a missing ioctl fails here.
        if !require_or_skip(
            "DMA_BUF_IOCTL_IMPORT_SYNC_FILE",
            outcome == ImportOutcome::Imported,
        ) {
            return;
        }
        // The imported fence was already signalled, so the buffer stays idle.
        assert!(implicit_fences_signalled(fd.as_fd(), true));
        assert_eq!(
            import_sync_file(fd.as_fd(), sf.as_fd(), false).expect("import read"),
            ImportOutcome::Imported
        );
    }

    #[test]
    fn kernel_tier_dma_buf_is_dma_buf_for_heap_buffers() {
        let Some(fd) = system_buffer(4096) else {
            return;
        };
        assert!(is_dma_buf(fd.as_fd()));
        assert!(
            super::super::typeless_inode(fd.as_fd()),
            "a dma-buf's inode has no type"
        );
        assert!(is_foreign_dma_buf(fd.as_fd()), "its fdinfo has exp_name");
    }
}
