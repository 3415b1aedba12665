//! What a connected Unix socket has sent that its peer has not read yet.
//!
//! The kernel charges every fd sitting unread in a peer's receive queue to
//! the sending user, and refuses to pass more (`ETOOMANYREFS`) once that
//! count exceeds the sender's `RLIMIT_NOFILE` (see `crate::inflight`). The
//! queue itself is out of the sender's reach; `SIOCOUTQ` is the one way to
//! see whether the peer has read everything.

use std::os::fd::{AsRawFd, BorrowedFd};

use super::{fd_target, KernelError};

nix::ioctl_read_bad!(siocoutq, libc::TIOCOUTQ, libc::c_int);

/// Bytes of messages this socket sent that its peer has not read (the
/// buffers they occupy, not their payload). Zero means the peer has read
/// everything, fds included; a peer that closed its end has dropped its
/// queue, which reads as zero too.
pub fn unread_by_peer(socket: BorrowedFd<'_>) -> Result<usize, KernelError> {
    let mut bytes: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (== TIOCOUTQ) on a socket writes one int through the
    // pointer, which points at a live local c_int; a non-socket fd gets
    // ENOTTY/EINVAL and nothing is written.
    unsafe { siocoutq(socket.as_raw_fd(), &mut bytes) }
        .map_err(|errno| KernelError::sys("SIOCOUTQ", fd_target(socket), errno))?;
    Ok(usize::try_from(bytes).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use nix::sys::socket::{recv, send, MsgFlags};

    use crate::kernel::testutil::seqpacket_pair;

    use super::*;

    #[test]
    fn counts_until_the_peer_reads_or_closes() {
        let (ours, peer) = seqpacket_pair(false);
        assert_eq!(unread_by_peer(ours.as_fd()).expect("outq"), 0);
        send(ours.as_raw_fd(), b"one", MsgFlags::empty()).expect("send");
        send(ours.as_raw_fd(), b"two", MsgFlags::empty()).expect("send");
        let two = unread_by_peer(ours.as_fd()).expect("outq");
        assert!(two > 0);
        let mut buf = [0u8; 8];
        recv(peer.as_raw_fd(), &mut buf, MsgFlags::empty()).expect("recv");
        let one = unread_by_peer(ours.as_fd()).expect("outq");
        assert!(0 < one && one < two, "{one} of {two}");
        drop(peer);
        assert_eq!(unread_by_peer(ours.as_fd()).expect("outq"), 0);
    }

    #[test]
    fn a_file_that_is_no_socket_is_an_error() {
        let file = std::fs::File::open("/proc/self/stat").expect("open");
        assert!(unread_by_peer(file.as_fd()).is_err());
    }
}
