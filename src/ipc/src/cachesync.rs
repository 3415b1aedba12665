//! `DMA_BUF_IOCTL_SYNC`: the CPU's cache sync around an access to a
//! dma-buf's mapping. One definition for both sides: the daemon brackets
//! the CPU accesses of autofence clients with it, and the client crate
//! those of a no-autofence client (whose grants the daemon does not sync,
//! since syncing at the grant would block it on the device's fences). The
//! uapi struct and numbers live here, where the daemon's header test
//! (`kernel::uapi`) checks them against `<linux/dma-buf.h>`.

use std::os::fd::{AsRawFd, BorrowedFd};

use nix::errno::Errno;

/// `struct dma_buf_sync`
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct DmaBufSync {
    pub flags: u64,
}

pub const DMA_BUF_SYNC_READ: u64 = 1;
pub const DMA_BUF_SYNC_WRITE: u64 = 2;
pub const DMA_BUF_SYNC_RW: u64 = DMA_BUF_SYNC_READ | DMA_BUF_SYNC_WRITE;
pub const DMA_BUF_SYNC_START: u64 = 0;
pub const DMA_BUF_SYNC_END: u64 = 4;

pub const DMA_BUF_IOCTL_SYNC: nix::sys::ioctl::ioctl_num_type =
    nix::request_code_write!(b'b', 0, std::mem::size_of::<DmaBufSync>());

// The `_bad` variant takes the request number as given, so the constant
// above (which the header test checks) is exactly what reaches the kernel.
nix::ioctl_write_ptr_bad!(dma_buf_sync, DMA_BUF_IOCTL_SYNC, DmaBufSync);

/// Which CPU access a sync is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncDirection {
    Read,
    Write,
    ReadWrite,
}

impl SyncDirection {
    fn bits(self) -> u64 {
        match self {
            SyncDirection::Read => DMA_BUF_SYNC_READ,
            SyncDirection::Write => DMA_BUF_SYNC_WRITE,
            SyncDirection::ReadWrite => DMA_BUF_SYNC_RW,
        }
    }

    /// The direction of an access's cache sync: a device access's is that
    /// of the CPU access it stands for (only the daemon's views use it).
    pub fn of(access: crate::Access) -> SyncDirection {
        use crate::Access;
        match access {
            Access::CpuRead | Access::DeviceRead => SyncDirection::Read,
            Access::CpuWrite | Access::DeviceWrite => SyncDirection::Write,
            Access::CpuReadWrite => SyncDirection::ReadWrite,
        }
    }
}

/// Whether a CPU access is beginning or ending.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncPhase {
    Start,
    End,
}

/// How many times in a row an `EAGAIN` is tried again before it is
/// returned: the kernel's START answers it while a fence wait is
/// interrupted by a reservation change, which passes; a driver that always
/// answers it must not spin the caller forever.
const MAX_EAGAIN_RETRIES: u32 = 100;

/// Brackets CPU access to a mapping of a dma-buf: required for
/// correctness on non-coherent heaps (the cache maintenance happens here),
/// and START also waits for the buffer's implicit fences (a read for the
/// writers, a write for everyone), which is why it can block and be
/// interrupted (`EINTR` is retried, `EAGAIN` a bounded number of times). A
/// file that is not a dma-buf (a memfd) answers `ENOTTY`.
pub fn sync(fd: BorrowedFd<'_>, direction: SyncDirection, phase: SyncPhase) -> nix::Result<()> {
    let flags = direction.bits()
        | match phase {
            SyncPhase::Start => DMA_BUF_SYNC_START,
            SyncPhase::End => DMA_BUF_SYNC_END,
        };
    let arg = DmaBufSync { flags };
    let raw = fd.as_raw_fd();
    let mut again = 0;
    loop {
        // SAFETY: `raw` is a live fd for the duration of the call (borrowed
        // from `fd`) and `arg` a valid `struct dma_buf_sync` on this stack
        // frame, which the kernel only reads.
        match unsafe { dma_buf_sync(raw, &arg) } {
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) if again < MAX_EAGAIN_RETRIES => {
                again += 1;
                std::thread::yield_now();
            }
            done => return done.map(drop),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn a_file_that_is_not_a_dma_buf_answers_enotty() {
        let file = std::fs::File::open("/dev/null").expect("/dev/null");
        assert_eq!(
            sync(file.as_fd(), SyncDirection::Read, SyncPhase::Start),
            Err(Errno::ENOTTY)
        );
    }
}
