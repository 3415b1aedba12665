//! Fds in flight: the ones the broker has sent that a client has not read.
//!
//! Linux charges every fd passed over a Unix socket to the sending user
//! until the receiver reads it, and once that user's count exceeds the
//! sender's `RLIMIT_NOFILE` it refuses to pass any more (`ETOOMANYREFS`),
//! unless the sender has `CAP_SYS_RESOURCE` or `CAP_SYS_ADMIN`, which the
//! service does not. Left alone, a few connections that ask for buffers and
//! never read the answers (each socket holds about 280 of them) pushed the
//! daemon past its limit, and from then on every reply carrying an fd, to
//! every client, failed and cost that client its connection.
//!
//! The bound has three parts:
//! - a connection may have at most [`PER_CONNECTION`] fds unread; further
//!   messages carrying fds wait in its outbox until its client reads
//!   (`crate::outbox`), where they count against `max_unread_replies` like
//!   any reply that does not fit;
//! - a connection cut off with fds possibly unread keeps its place under
//!   the connection cap until its client has read everything or closed
//!   ([`until_read`]): closing the daemon's end would not take them back;
//! - the default connection cap is lowered, if need be, so that
//!   connections × [`PER_CONNECTION`] stays within half the fd limit
//!   ([`connection_cap`]). The other half is a margin for what the daemon
//!   cannot see: fds an earlier run sent that are still unread on dead
//!   connections (the charge outlives the run). (An administrator may ask
//!   for more connections than fit, with `--max-connections`; the log
//!   says what that risks.)
//!
//! A user daemon shares its uid, and so the count, with the user's other
//! programs, and the kernel checks each sender against its own limit
//! (often a soft 1,024): fds the user's clients leave unread can stop the
//! user's other programs passing fds, as any of the user's programs that
//! stops reading already could. The bound protects the daemon, not the
//! user from their own programs.

use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use dmabroker_ipc::MAX_FDS_PER_MESSAGE;
use nix::sys::resource::{getrlimit, setrlimit, Resource};

use crate::kernel::socket::unread_by_peer;
use crate::kernel::KernelError;

/// Fds one connection may have unread before the next message carrying
/// fds waits for its client to read. Counted since the client was last
/// seen with nothing unread, so a client that reads but keeps several
/// requests in flight may wait a moment at every 64th fd; the client
/// library waits for each answer it asks for, and never does.
pub const PER_CONNECTION: usize = 64;

// A message is sent whole or not at all, so the biggest must fit alone.
const _: () = assert!(PER_CONNECTION >= MAX_FDS_PER_MESSAGE);

/// The connection cap when the fd limit allows it and `--max-connections`
/// does not say otherwise.
pub const MAX_CONNECTIONS: usize = 4096;

/// How a wait for a client to read looks again when no wake-up came: after
/// `first`, then twice as long each time up to `most`.
#[derive(Clone, Copy, Debug)]
pub struct Recheck {
    pub first: Duration,
    pub most: Duration,
}

/// A live client: its reads wake the wait (see [`until_read`]), so the
/// timer only backs them up (a read's wake-up can come a moment before
/// the kernel's count drops), and a client that stops reading for good
/// costs a look a second, not a steady tick.
pub const RECHECK_LIVE: Recheck = Recheck {
    first: Duration::from_millis(100),
    most: Duration::from_secs(1),
};

/// A connection already cut off has no wake-ups (its socket is shut down
/// both ways, which reads as a hang-up from then on). Most such clients
/// read their last answer or close at once, and are let go within
/// milliseconds; one that does not is looked at once a second.
pub const RECHECK_CUT_OFF: Recheck = Recheck {
    first: Duration::from_millis(5),
    most: Duration::from_secs(1),
};

/// Raises the soft limit on open fds to the hard limit, and returns the
/// limit in effect. The daemon holds an fd per buffer and per connection,
/// and the limit also bounds its fds in flight; the usual soft default of
/// 1,024 is there for programs that use `select`, which this one does not.
pub fn raise_fd_limit() -> u64 {
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    if soft >= hard {
        return soft;
    }
    match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
        Ok(()) => hard,
        Err(err) => {
            tracing::warn!(soft, hard, error = %err, "cannot raise the fd limit");
            soft
        }
    }
}

/// The connection cap that keeps the fds all connections may have unread
/// within half of `fd_limit`: `configured`, or less when the limit is low
/// (never below one connection).
pub fn connection_cap(configured: usize, fd_limit: u64) -> usize {
    let budget = usize::try_from(fd_limit / 2).unwrap_or(usize::MAX);
    configured.min(budget / PER_CONNECTION).max(1)
}

/// Waits until `socket`'s peer has read everything sent to it, or closed
/// its end (which drops what it had not read). A socket registered for
/// writability is woken as its peer reads, so a reading client is noticed
/// at once; `recheck` bounds the wait where no wake-up comes, and is the
/// only signal for a socket that is shut down. An error (the socket is no
/// socket) ends the wait.
pub async fn until_read(socket: &OwnedFd, recheck: Recheck) -> Result<(), KernelError> {
    let mut waiter = socket
        .try_clone()
        .ok()
        .and_then(|dup| crate::reactor::register(dup, tokio::io::Interest::WRITABLE).ok());
    let mut next = recheck.first;
    loop {
        if unread_by_peer(socket.as_fd())? == 0 {
            return Ok(());
        }
        let wait = next;
        next = (next * 2).min(recheck.most);
        let Some(registered) = &waiter else {
            tokio::time::sleep(wait).await;
            continue;
        };
        let woken = tokio::select! {
            guard = registered.writable() => match guard {
                // A socket shut down both ways reads as a hang-up from
                // then on: no more wake-ups to wait for, and the dup goes
                // (a connection kept for long costs one fd).
                Ok(guard) if guard.ready().is_write_closed() => None,
                Ok(mut guard) => {
                    guard.clear_ready();
                    Some(true)
                }
                Err(_) => None,
            },
            () = tokio::time::sleep(wait) => Some(false),
        };
        match woken {
            None => waiter = None,
            // The client is reading: look again soon if this was not yet
            // its last read.
            Some(true) => next = recheck.first,
            Some(false) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use nix::sys::socket::{recv, send, MsgFlags};

    use crate::kernel::testutil::{runtime, seqpacket_pair};

    use super::*;

    #[test]
    fn the_cap_keeps_every_connections_unread_fds_within_half_the_limit() {
        assert_eq!(connection_cap(4096, 524_288), 4096);
        assert_eq!(connection_cap(4096, 65_536), 512);
        assert_eq!(connection_cap(4096, 2048), 16);
        assert_eq!(connection_cap(10, 2048), 10);
        assert_eq!(connection_cap(4096, 64), 1, "never no connection at all");
        for limit in [1024u64, 4096, 20_000, 65_536, 1 << 20] {
            let cap = connection_cap(usize::MAX, limit);
            assert!((cap * PER_CONNECTION) as u64 <= limit / 2, "{limit}");
        }
    }

    #[test]
    fn the_limit_is_raised_to_the_hard_one() {
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
        assert_eq!(raise_fd_limit(), hard);
        assert_eq!(
            getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit").0,
            hard
        );
    }

    /// The wait ends when the client reads its last message, without
    /// waiting out the recheck: the read is what wakes it.
    #[test]
    fn a_wait_ends_when_the_peer_reads_the_last_message() {
        let (ours, peer) = seqpacket_pair(true);
        for _ in 0..3 {
            send(ours.as_raw_fd(), b"reply", MsgFlags::empty()).expect("send");
        }
        let runtime = runtime();
        let started = std::time::Instant::now();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 16];
            for _ in 0..3 {
                std::thread::sleep(Duration::from_millis(20));
                recv(peer.as_raw_fd(), &mut buf, MsgFlags::empty()).expect("recv");
            }
            peer
        });
        runtime
            .block_on(async {
                tokio::time::timeout(
                    Duration::from_secs(30),
                    until_read(
                        &ours,
                        Recheck {
                            first: Duration::from_secs(3600),
                            most: Duration::from_secs(3600),
                        },
                    ),
                )
                .await
            })
            .expect("woken by the last read, not the recheck")
            .expect("wait");
        assert!(started.elapsed() >= Duration::from_millis(60));
        assert_eq!(unread_by_peer(ours.as_fd()).expect("outq"), 0);
        drop(reader.join());
    }

    /// A shut-down socket (a connection cut off) has no wake-ups; the
    /// recheck still notices its peer closing.
    #[test]
    fn a_wait_on_a_shut_down_socket_ends_when_the_peer_closes() {
        let (ours, peer) = seqpacket_pair(true);
        send(ours.as_raw_fd(), b"unread", MsgFlags::empty()).expect("send");
        nix::sys::socket::shutdown(ours.as_raw_fd(), nix::sys::socket::Shutdown::Both)
            .expect("shutdown");
        let runtime = runtime();
        let closer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            drop(peer);
        });
        runtime
            .block_on(async {
                tokio::time::timeout(Duration::from_secs(30), until_read(&ours, RECHECK_CUT_OFF))
                    .await
            })
            .expect("ended")
            .expect("wait");
        closer.join().expect("closer");
    }
}
