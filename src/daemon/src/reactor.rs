//! Registering fds with tokio's reactor, in one audited place.

use std::os::fd::AsRawFd;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// `fd` is an owned fd (`OwnedFd`, `HeldDup`): open until it is dropped,
/// and always the same fd. On failure it is closed.
pub fn register<F: AsRawFd + OwnedFdLike>(
    fd: F,
    interest: Interest,
) -> std::io::Result<AsyncFd<F>> {
    try_register(fd, interest).map_err(|(_, err)| err)
}

/// As [`register`], but on failure `fd` comes back, for whoever must see
/// to where it is closed.
pub fn try_register<F: AsRawFd + OwnedFdLike>(
    fd: F,
    interest: Interest,
) -> Result<AsyncFd<F>, (F, std::io::Error)> {
    // SAFETY: `F` owns its fd (`OwnedFdLike`): it is open until dropped, and
    // AsyncFd owns `fd` from here on, so the fd stays open and names the
    // same open file description for the AsyncFd's whole life; as_raw_fd
    // always returns that fd.
    unsafe { AsyncFd::register_with_interest(fd, interest) }.map_err(|e| e.into_parts())
}

/// Types that own one fd for their whole life and never change it.
pub trait OwnedFdLike {}
impl OwnedFdLike for std::os::fd::OwnedFd {}
impl OwnedFdLike for crate::held_files::HeldDup {}
