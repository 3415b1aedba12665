//! Sending and receiving one message with its fds over SOCK_SEQPACKET.
//!
//! `sendfd` (the project's chosen fd-passing crate) cannot meet the rules
//! this broker needs on the receive path: it receives without
//! `MSG_CMSG_CLOEXEC` (an fd could leak into an exec'd child before we set
//! the flag), hands back `RawFd` instead of owning them, does not report
//! `MSG_CTRUNC`, and has no SOCK_SEQPACKET support. So both directions
//! make the `sendmsg`/`recvmsg` system calls themselves, in this one module
//! (raw `libc::syscall`: glibc's wrappers are thread cancellation points).

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;

use crate::protocol::{MAX_FDS_PER_MESSAGE, MAX_MESSAGE_SIZE};

#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    /// The peer closed its end (a zero-length read).
    #[error("connection closed by peer")]
    Closed,
    #[error("message larger than {MAX_MESSAGE_SIZE} bytes was truncated")]
    Truncated,
    /// The kernel could not give the receiver every fd attached
    /// (`MSG_CTRUNC`): with room in the control buffer for every fd a
    /// message can carry, that is the receiver's fd table full (or a
    /// security module refusing a file), never the sender's doing. The
    /// message's `len` bytes are whole; the fds that did arrive are the
    /// caller's to close.
    #[error("the fds attached to a message could not all be received (no room for them in this process)")]
    ControlTruncated { len: usize },
    /// The sender attached more fds than a message may carry. The
    /// message's `len` bytes are whole; every fd arrived, for the caller
    /// to close.
    #[error("{count} fds arrived with one message, more than the {MAX_FDS_PER_MESSAGE} allowed")]
    TooManyFds { len: usize, count: usize },
    #[error("recvmsg failed: {0}")]
    Os(#[from] Errno),
}

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("at most {MAX_FDS_PER_MESSAGE} fds may travel with one message, not {0}")]
    TooManyFds(usize),
    #[error("sendmsg sent {sent} of {len} bytes")]
    Short { sent: usize, len: usize },
    #[error("sendmsg failed: {0}")]
    Os(#[from] Errno),
}

/// One datagram as it arrived: its bytes and the fds that came with it,
/// already owned (and close-on-exec) so that no early return can leak them.
#[derive(Debug)]
pub struct Received {
    pub bytes: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

/// Sends one message. `nonblocking` adds `MSG_DONTWAIT` (the daemon never
/// blocks on a slow reader: it queues instead). `MSG_NOSIGNAL` keeps a
/// vanished peer from killing us with SIGPIPE.
pub fn send_message(
    socket: BorrowedFd<'_>,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
    nonblocking: bool,
) -> Result<(), SendError> {
    if fds.len() > MAX_FDS_PER_MESSAGE {
        return Err(SendError::TooManyFds(fds.len()));
    }
    let mut flags = libc::MSG_NOSIGNAL;
    if nonblocking {
        flags |= libc::MSG_DONTWAIT;
    }
    // u64 elements keep the control buffer aligned for cmsghdr.
    let mut control = [0u64; CONTROL_WORDS];
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr().cast_mut().cast(),
        iov_len: bytes.len(),
    };
    // SAFETY: zeroed msghdr is a valid "no name, no iov, no control".
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let payload = std::mem::size_of_val(fds) as u32;
        msg.msg_control = control.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE is a pure size computation.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(payload) } as _;
        // SAFETY: the control buffer holds CMSG_SPACE(32 fds) bytes, at
        // least the CMSG_SPACE(payload) declared (at most 32 fds, checked
        // above), so CMSG_FIRSTHDR is non-null and the header and its
        // data lie inside it; the fds are written unaligned-safe.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(payload) as _;
            let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
            for (i, fd) in fds.iter().enumerate() {
                data.add(i).write_unaligned(fd.as_raw_fd());
            }
        }
    }
    loop {
        // The raw system call, not libc's sendmsg: that one is a thread
        // cancellation point and brackets the call with two more library
        // calls, measurable on a path that is mostly this call (we never
        // cancel threads).
        // SAFETY: msg points at live buffers (iov -> bytes, control) that
        // outlive the call, with their true lengths; the kernel only reads
        // them.
        let sent = unsafe {
            libc::syscall(
                libc::SYS_sendmsg,
                socket.as_raw_fd(),
                &msg as *const libc::msghdr,
                flags,
            )
        };
        let result = if sent < 0 {
            Err(Errno::last())
        } else {
            Ok(sent as usize)
        };
        match result {
            Ok(sent) if sent == bytes.len() => return Ok(()),
            Ok(sent) => {
                return Err(SendError::Short {
                    sent,
                    len: bytes.len(),
                })
            }
            Err(Errno::EINTR) => continue,
            Err(err) => return Err(SendError::Os(err)),
        }
    }
}

/// Receives one message into a fresh buffer. See [`recv_message_into`].
pub fn recv_message(socket: BorrowedFd<'_>, nonblocking: bool) -> Result<Received, RecvError> {
    let mut buf = vec![0u8; MAX_MESSAGE_SIZE];
    let (len, fds) = recv_message_into(socket, &mut buf, nonblocking)?;
    buf.truncate(len);
    Ok(Received { bytes: buf, fds })
}

/// Receives one message into `buf` (at least [`MAX_MESSAGE_SIZE`] bytes),
/// returning its length and fds. The fds are received close-on-exec and
/// owned before any check can fail, so every error path closes them.
///
/// This calls `recvmsg(2)` itself rather than through nix: when the control
/// data is truncated nix refuses to walk it, yet the kernel has already
/// installed the fds that fit into our table, and they must be closed.
pub fn recv_message_into(
    socket: BorrowedFd<'_>,
    buf: &mut [u8],
    nonblocking: bool,
) -> Result<(usize, Vec<OwnedFd>), RecvError> {
    let mut dropped = Vec::new();
    recv_message_into_keeping(socket, buf, nonblocking, &mut dropped)
}

/// As [`recv_message_into`], but on an error the fds that did arrive are
/// put in `dropped` instead of being closed here: closing an fd a peer
/// sent may wait without end (a file whose FUSE server never answers the
/// FLUSH every `close(2)` sends), and the daemon closes them elsewhere.
pub fn recv_message_into_keeping(
    socket: BorrowedFd<'_>,
    buf: &mut [u8],
    nonblocking: bool,
    dropped: &mut Vec<OwnedFd>,
) -> Result<(usize, Vec<OwnedFd>), RecvError> {
    // u64 elements keep the control buffer aligned for cmsghdr.
    let mut control = [0u64; CONTROL_WORDS];
    let mut flags = libc::MSG_CMSG_CLOEXEC;
    if nonblocking {
        flags |= libc::MSG_DONTWAIT;
    }
    loop {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: zeroed msghdr is a valid "no name, no iov, no control".
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control) as _;
        // The raw system call, as in `send_message`.
        // SAFETY: msg points at live buffers (iov -> buf, control) that
        // outlive the call, with their true lengths.
        let received = unsafe {
            libc::syscall(
                libc::SYS_recvmsg,
                socket.as_raw_fd(),
                &mut msg as *mut libc::msghdr,
                flags,
            )
        };
        if received < 0 {
            match Errno::last() {
                Errno::EINTR => continue,
                err => return Err(RecvError::Os(err)),
            }
        }
        let fds = take_fds(&msg);
        if msg.msg_flags & libc::MSG_TRUNC != 0 {
            dropped.extend(fds);
            return Err(RecvError::Truncated);
        }
        if msg.msg_flags & libc::MSG_CTRUNC != 0 {
            dropped.extend(fds);
            return Err(RecvError::ControlTruncated {
                len: received as usize,
            });
        }
        if fds.len() > MAX_FDS_PER_MESSAGE {
            let count = fds.len();
            dropped.extend(fds);
            return Err(RecvError::TooManyFds {
                len: received as usize,
                count,
            });
        }
        if received == 0 && fds.is_empty() {
            return Err(RecvError::Closed);
        }
        return Ok((received as usize, fds));
    }
}

/// The most fds the kernel lets one message carry (`SCM_MAX_FD`).
const SCM_MAX_FD: usize = 253;

/// Room for one SCM_RIGHTS header and every fd a message can carry, in
/// 8-byte words, though at most [`MAX_FDS_PER_MESSAGE`] are accepted: with
/// less room the kernel would let go of the rest itself, on the receiving
/// thread, and the last release of a peer's file can wait for good (a
/// file watched by an epoll whose lock the peer holds). Received, they are
/// the caller's to close where it chooses.
const CONTROL_WORDS: usize =
    (std::mem::size_of::<libc::cmsghdr>() + SCM_MAX_FD * std::mem::size_of::<RawFd>()).div_ceil(8);

/// Wraps every fd the kernel put in `msg`'s control data in an `OwnedFd`.
fn take_fds(msg: &libc::msghdr) -> Vec<OwnedFd> {
    let mut fds = Vec::new();
    // SAFETY: msg was filled by a successful recvmsg; CMSG_FIRSTHDR and
    // CMSG_NXTHDR only return headers that lie within msg_controllen (which
    // the kernel sets to what it wrote, whole fds only, even when it
    // truncates), and CMSG_DATA points inside such a header.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let header = libc::CMSG_LEN(0) as usize;
                let count = ((*cmsg).cmsg_len as usize).saturating_sub(header)
                    / std::mem::size_of::<RawFd>();
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                for i in 0..count {
                    let raw = data.add(i).read_unaligned();
                    // The kernel just installed `raw` for us; nobody else owns it.
                    fds.push(OwnedFd::from_raw_fd(raw));
                }
            }
            cmsg = libc::CMSG_NXTHDR(msg, cmsg);
        }
    }
    fds
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{
        sendmsg, socketpair, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr,
    };
    use std::io::IoSlice;
    use std::os::fd::AsFd;

    fn pair() -> (OwnedFd, OwnedFd) {
        socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .expect("socketpair")
    }

    fn has_cloexec(fd: BorrowedFd<'_>) -> bool {
        let flags =
            nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFD).expect("F_GETFD");
        flags & libc_fd_cloexec() != 0
    }

    fn libc_fd_cloexec() -> i32 {
        nix::fcntl::FdFlag::FD_CLOEXEC.bits()
    }

    /// Sends "x" with `raw` attached, past our own sender's checks: what
    /// a peer that bypasses it can send.
    fn send_raw_fds(socket: &OwnedFd, raw: &[RawFd]) {
        let iov = [IoSlice::new(b"x")];
        sendmsg::<UnixAddr>(
            socket.as_raw_fd(),
            &iov,
            &[ControlMessage::ScmRights(raw)],
            MsgFlags::empty(),
            None,
        )
        .expect("raw sendmsg");
    }

    /// Whether every copy of `q`'s peer is closed: a count of open fds
    /// would race with the other tests running in this process.
    fn peer_gone(q: &OwnedFd) -> bool {
        let mut byte = [0u8; 1];
        matches!(
            nix::sys::socket::recv(q.as_raw_fd(), &mut byte, MsgFlags::MSG_DONTWAIT),
            Ok(0)
        )
    }

    /// Fds of a message refused on receipt are handed to the caller to
    /// close, not closed here.
    #[test]
    fn a_truncated_message_hands_its_fds_back() {
        let (a, b) = pair();
        let (p, q) = pair();
        let big = vec![0u8; 128];
        send_message(a.as_fd(), &big, &[p.as_fd()], false).expect("send");
        drop(p);
        let mut small = [0u8; 16];
        let mut dropped = Vec::new();
        let got = recv_message_into_keeping(b.as_fd(), &mut small, false, &mut dropped);
        assert!(matches!(got, Err(RecvError::Truncated)), "{got:?}");
        assert_eq!(dropped.len(), 1);
        assert!(!peer_gone(&q), "closed before the caller let go");
        drop(dropped);
        assert!(peer_gone(&q));
    }

    #[test]
    fn message_and_fds_arrive_together_and_cloexec() {
        let (a, b) = pair();
        let (p1, p2) = pair();
        send_message(a.as_fd(), b"hello", &[p1.as_fd(), p2.as_fd()], false).expect("send");
        let got = recv_message(b.as_fd(), false).expect("recv");
        assert_eq!(got.bytes, b"hello");
        assert_eq!(got.fds.len(), 2);
        for fd in &got.fds {
            assert!(has_cloexec(fd.as_fd()), "received fd must be close-on-exec");
        }
    }

    #[test]
    fn fds_never_attach_to_the_next_message() {
        let (a, b) = pair();
        let (p1, _p2) = pair();
        send_message(a.as_fd(), b"first", &[p1.as_fd()], false).expect("send");
        send_message(a.as_fd(), b"second", &[], false).expect("send");
        let first = recv_message(b.as_fd(), false).expect("recv");
        let second = recv_message(b.as_fd(), false).expect("recv");
        assert_eq!(
            (first.bytes.as_slice(), first.fds.len()),
            (&b"first"[..], 1)
        );
        assert_eq!(
            (second.bytes.as_slice(), second.fds.len()),
            (&b"second"[..], 0)
        );
    }

    #[test]
    fn too_many_fds_is_refused_on_both_sides() {
        let (a, b) = pair();
        let (p, q) = pair();
        let many: Vec<BorrowedFd<'_>> = (0..MAX_FDS_PER_MESSAGE + 1).map(|_| p.as_fd()).collect();
        assert!(matches!(
            send_message(a.as_fd(), b"x", &many, false),
            Err(SendError::TooManyFds(_))
        ));
        // A peer that bypasses our sender: raw sendmsg with too many fds.
        let raw: Vec<RawFd> = many.iter().map(|fd| fd.as_raw_fd()).collect();
        send_raw_fds(&a, &raw);
        drop(many);
        drop(p);
        assert!(matches!(
            recv_message(b.as_fd(), false),
            Err(RecvError::TooManyFds { count, .. }) if count == MAX_FDS_PER_MESSAGE + 1
        ));
        assert!(peer_gone(&q), "fds of a refused message must be closed");
    }

    /// Every fd of a message carrying more than it may is received, and
    /// handed to the caller, none let go of by the kernel on this thread.
    #[test]
    fn every_fd_of_a_message_with_too_many_is_handed_back() {
        let (a, b) = pair();
        let (p, _q) = pair();
        let raw: Vec<RawFd> = (0..SCM_MAX_FD).map(|_| p.as_raw_fd()).collect();
        send_raw_fds(&a, &raw);
        let mut buf = [0u8; 64];
        let mut dropped = Vec::new();
        let got = recv_message_into_keeping(b.as_fd(), &mut buf, false, &mut dropped);
        assert!(
            matches!(
                got,
                Err(RecvError::TooManyFds {
                    len: 1,
                    count: SCM_MAX_FD
                })
            ),
            "{got:?}"
        );
        assert_eq!(dropped.len(), SCM_MAX_FD);
    }

    #[test]
    fn oversized_message_is_truncated_error() {
        let (a, b) = pair();
        nix::sys::socket::setsockopt(&a, nix::sys::socket::sockopt::SndBuf, &(1 << 20))
            .expect("sndbuf");
        let big = vec![1u8; MAX_MESSAGE_SIZE + 10];
        send_message(a.as_fd(), &big, &[], false).expect("send");
        assert!(matches!(
            recv_message(b.as_fd(), false),
            Err(RecvError::Truncated)
        ));
    }

    #[test]
    fn closed_peer_reads_as_closed() {
        let (a, b) = pair();
        drop(a);
        assert!(matches!(
            recv_message(b.as_fd(), false),
            Err(RecvError::Closed)
        ));
    }
}
