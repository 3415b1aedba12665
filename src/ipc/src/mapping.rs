//! A shared mapping of a buffer fd that unmaps itself on drop.
//!
//! The bytes are shared with other processes and devices, so they can change
//! under a reader: callers hold an access from the broker (begin/end) for the
//! time they look at them. That arbitration, not the type system, is what
//! keeps frames whole.

use std::os::fd::BorrowedFd;
use std::ptr::NonNull;

use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};

#[derive(Debug, thiserror::Error)]
pub enum MapError {
    #[error("cannot map an empty buffer")]
    Empty,
    #[error("mmap of {len} bytes failed: {source}")]
    Mmap {
        len: usize,
        source: nix::errno::Errno,
    },
}

/// Always mapped read-write: the broker hands out `O_RDWR` buffers, and
/// whether a caller may write is decided by the access it holds, not by
/// the page protection.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<std::ffi::c_void>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory owned by this value; moving it
// or sharing a reference between threads is no different from doing so with
// the bytes of a Vec. Concurrent writers are arbitrated by the broker.
unsafe impl Send for Mapping {}
// SAFETY: see `Send`; `&Mapping` only gives out `&[u8]`.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd` (opened read-write) shared.
    pub fn new(fd: BorrowedFd<'_>, len: usize) -> Result<Self, MapError> {
        Mapping::at(fd, 0, len)
    }

    /// Maps `len` bytes of `fd` from `offset` (a multiple of the page size).
    pub fn at(fd: BorrowedFd<'_>, offset: u64, len: usize) -> Result<Self, MapError> {
        let offset = i64::try_from(offset).map_err(|_| MapError::Mmap {
            len,
            source: nix::errno::Errno::EOVERFLOW,
        })?;
        let length = std::num::NonZeroUsize::new(len).ok_or(MapError::Empty)?;
        let prot = ProtFlags::PROT_READ | ProtFlags::PROT_WRITE;
        // SAFETY: a fresh MAP_SHARED mapping at an address the kernel picks
        // cannot alias any Rust object; the fd is valid for the call.
        let ptr = unsafe { mmap(None, length, prot, MapFlags::MAP_SHARED, fd, offset) }
            .map_err(|source| MapError::Mmap { len, source })?;
        Ok(Mapping { ptr, len })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr..ptr+len is a live mapping owned by self (unmapped only
        // in Drop), readable by construction.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().cast::<u8>(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and the mapping is PROT_WRITE; `&mut self`
        // makes this the only slice handed out by this value.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().cast::<u8>(), self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len describe exactly the mapping created in `new`, and
        // no slice borrowed from it outlives `self`.
        if let Err(err) = unsafe { munmap(self.ptr, self.len) } {
            // Nothing sensible to do in drop; the address space keeps it.
            eprintln!("dmabroker: munmap failed: {err}");
        }
    }
}

impl std::ops::Deref for Mapping {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl std::ops::DerefMut for Mapping {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}
