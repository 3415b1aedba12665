//! A safe shared mapping of a buffer fd, so that code and tests outside
//! `kernel/` can touch buffer contents without `unsafe`.
//!
//! The mapping never hands out `&[u8]` into the shared memory: other processes
//! and devices may write it at any time, which would break the aliasing
//! guarantees of a Rust reference. Contents are copied in and out instead.

use std::ffi::c_void;
use std::num::NonZeroUsize;
use std::os::fd::BorrowedFd;
use std::ptr::NonNull;

use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};

use super::{dma_buf, fd_target, memfd, KernelError};

/// A MAP_SHARED mapping of the first `len` bytes of a dma-buf or sealed memfd,
/// unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<c_void>,
    len: usize,
    writable: bool,
}

impl Mapping {
    /// Maps `len` bytes from offset 0.
    ///
    /// Only dma-bufs and memfds sealed against shrinking are accepted: for any
    /// other file another process could truncate it under the mapping and turn
    /// the next access into a SIGBUS that kills the daemon.
    pub fn new(fd: BorrowedFd<'_>, len: usize, writable: bool) -> Result<Mapping, KernelError> {
        const OP: &str = "mmap";
        let shrink_sealed =
            memfd::seals(fd).is_ok_and(|s| s.contains(nix::fcntl::SealFlag::F_SEAL_SHRINK));
        if !dma_buf::is_dma_buf(fd) && !shrink_sealed {
            return Err(KernelError::invalid(
                OP,
                fd_target(fd),
                "only dma-bufs and shrink-sealed memfds can be mapped safely",
            ));
        }
        let size = dma_buf::size(fd)?;
        let nz_len = NonZeroUsize::new(len)
            .ok_or_else(|| KernelError::invalid(OP, fd_target(fd), "zero-length mapping"))?;
        if len as u64 > size {
            return Err(KernelError::invalid(
                OP,
                fd_target(fd),
                format!("mapping {len} bytes of a {size}-byte buffer"),
            ));
        }
        let prot = if writable {
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE
        } else {
            ProtFlags::PROT_READ
        };
        // SAFETY: a fresh MAP_SHARED mapping at a kernel-chosen address cannot
        // overlap any existing Rust object; the fd is valid for the call and
        // the mapping stays valid after the fd is closed.
        let ptr = unsafe { mmap(None, nz_len, prot, MapFlags::MAP_SHARED, fd, 0) }
            .map_err(|errno| KernelError::sys(OP, fd_target(fd), errno))?;
        Ok(Mapping { ptr, len, writable })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check_range(&self, op: &'static str, offset: usize, n: usize) -> Result<(), KernelError> {
        match offset.checked_add(n) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(KernelError::invalid(
                op,
                "mapping",
                format!("range {offset}+{n} outside a {}-byte mapping", self.len),
            )),
        }
    }

    /// Copies `buf.len()` bytes starting at `offset` out of the mapping.
    pub fn read_at(&self, offset: usize, buf: &mut [u8]) -> Result<(), KernelError> {
        self.check_range("read mapping", offset, buf.len())?;
        // SAFETY: the range was checked to lie inside the live mapping, and
        // `buf` is a distinct Rust allocation, so the regions do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.as_ptr().cast::<u8>().add(offset),
                buf.as_mut_ptr(),
                buf.len(),
            );
        }
        Ok(())
    }

    /// Copies `data` into the mapping at `offset`.
    pub fn write_at(&self, offset: usize, data: &[u8]) -> Result<(), KernelError> {
        self.check_range("write mapping", offset, data.len())?;
        if !self.writable {
            return Err(KernelError::invalid(
                "write mapping",
                "mapping",
                "mapping is read-only",
            ));
        }
        // SAFETY: the range lies inside the live, PROT_WRITE mapping, and
        // `data` is a distinct Rust allocation, so the regions do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                self.ptr.as_ptr().cast::<u8>().add(offset),
                data.len(),
            );
        }
        Ok(())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` describe exactly the mapping created in `new`,
        // and no reference into it can outlive `self`.
        if let Err(errno) = unsafe { munmap(self.ptr, self.len) } {
            tracing::warn!(error = %errno, len = self.len, "munmap failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::testutil::TempDir;
    use std::os::fd::AsFd;

    #[test]
    fn maps_a_sealed_memfd() {
        let fd = memfd::create_sealed("map-test", 8192).expect("memfd");
        let map = Mapping::new(fd.as_fd(), 8192, true).expect("mmap");
        map.write_at(4090, b"hello world").expect("write");
        let mut back = [0u8; 11];
        map.read_at(4090, &mut back).expect("read");
        assert_eq!(&back, b"hello world");
        assert!(map.write_at(8190, b"xyz").is_err());
        assert!(map.read_at(usize::MAX, &mut back).is_err());
        assert!(Mapping::new(fd.as_fd(), 8193, false).is_err());
        assert!(Mapping::new(fd.as_fd(), 0, false).is_err());

        let ro = Mapping::new(fd.as_fd(), 8192, false).expect("mmap ro");
        assert!(ro.write_at(0, b"x").is_err());
        let mut first = [0u8; 5];
        ro.read_at(4090, &mut first).expect("read ro");
        assert_eq!(&first, b"hello");
    }

    #[test]
    fn refuses_files_that_can_shrink() {
        let dir = TempDir::new("mapping");
        let path = dir.path().join("plain");
        std::fs::write(&path, [0u8; 4096]).expect("write");
        let file = std::fs::File::open(&path).expect("open");
        let err = Mapping::new(file.as_fd(), 4096, false).expect_err("regular file");
        assert!(matches!(err, KernelError::Invalid { .. }), "{err}");
        let unsealed = memfd::create_unsealed_for_test("unsealed", 4096);
        assert!(Mapping::new(unsealed.as_fd(), 4096, false).is_err());
    }
}
