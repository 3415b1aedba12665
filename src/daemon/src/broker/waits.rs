//! Waiting for kernel fences without blocking the event loop.
//!
//! A dma-buf fd polls readable once its write fences have signalled and
//! writable once all have; a sync_file polls readable once it signals. Both
//! work with epoll, so tokio's reactor waits for them like for a socket.
//! Each wait gets its own dup of the fd: epoll registrations are per open
//! file description + fd number, and the broker's own fd must stay free.

use std::os::fd::OwnedFd;

use tokio::io::Interest;

async fn until_ready(fd: OwnedFd, interest: Interest) {
    let Ok(async_fd) = crate::reactor::register(fd, interest) else {
        // Not pollable at all: nothing the kernel will tell us, so do not
        // hold the buffer hostage.
        tracing::warn!("fd cannot be polled; treating its fences as signalled");
        return;
    };
    loop {
        let ready = if interest.is_writable() {
            async_fd.writable().await.map(|mut g| {
                g.retain_ready();
            })
        } else {
            async_fd.readable().await.map(|mut g| {
                g.retain_ready();
            })
        };
        if ready.is_ok() {
            return;
        }
    }
}

/// Waits for the implicit fences that conflict with an access: a read waits
/// for the kernel's write fences, a write for all of them.
pub async fn implicit_fences(dmabuf: OwnedFd, write: bool) {
    let interest = if write {
        Interest::WRITABLE
    } else {
        Interest::READABLE
    };
    until_ready(dmabuf, interest).await;
}

pub async fn sync_file(fd: OwnedFd) {
    until_ready(fd, Interest::READABLE).await;
}
