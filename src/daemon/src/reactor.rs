//! Registering fds with tokio's reactor, in one audited place.

use std::os::fd::OwnedFd;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

pub fn register(fd: OwnedFd, interest: Interest) -> std::io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd is open until dropped, and AsyncFd owns it from here
    // on, so the fd stays open and names the same open file description for
    // the AsyncFd's whole life; OwnedFd::as_raw_fd always returns that fd.
    unsafe { AsyncFd::register_with_interest(fd, interest) }.map_err(|e| e.into())
}
