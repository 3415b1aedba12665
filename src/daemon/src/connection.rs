//! One task per client connection: receive, hand each message to the
//! broker, clean up on hang-up.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use dmabroker_ipc::codec::decode_request_head;
use dmabroker_ipc::fdpass::{recv_message_into_keeping, RecvError};
use dmabroker_ipc::{ErrorCode, WireError, MAX_MESSAGE_SIZE};
use nix::errno::Errno;

use crate::broker::Broker;
use crate::broker::Disposition;
use crate::client_fds;
use crate::identity;
use crate::outbox::Outbox;
use crate::server::{UidConnections, UidSlot};

/// Messages one connection may have handled before the others get a turn.
const MESSAGES_PER_TURN: usize = 32;

/// How often a connection held back for its uid's fds waiting to be
/// closed looks again.
const FDS_CLOSING_POLL: std::time::Duration = std::time::Duration::from_millis(50);

/// Serves one accepted (non-blocking) connection until it hangs up.
pub async fn serve(broker: Arc<Broker>, socket: OwnedFd, uids: Arc<UidConnections>) {
    let peer = match identity::peer_of(socket.as_fd()) {
        Ok(peer) => peer,
        Err(err) => {
            tracing::warn!(error = %err, "cannot identify a connecting peer; closing it");
            let uid = identity::peer_uid(socket.as_fd());
            crate::server::retire(socket, uid, None);
            return;
        }
    };
    // Held to the end of this task, the wait for a cut-off client
    // included, and then to the socket's last close.
    let uid_slot = match take_uid_slot(&broker, &uids, &peer) {
        Ok(slot) => slot,
        Err(refusal) => {
            crate::server::refuse(socket, refusal, peer.accountable_uid);
            return;
        }
    };
    let socket = match crate::reactor::try_register(
        socket,
        // Readable only: a writable interest would wake the loop for every
        // reply the client reads. The outbox asks for writability itself,
        // only while a client's socket is full.
        tokio::io::Interest::READABLE,
    ) {
        Ok(fd) => Arc::new(fd),
        Err((socket, err)) => {
            tracing::error!(error = %err, "cannot register a connection with the reactor");
            crate::server::retire(socket, peer.accountable_uid, Some(uid_slot));
            return;
        }
    };
    let outbox = Arc::new(Outbox::new(Arc::clone(&socket), 256));
    // The uid for log lines, and the one whose bounds on closes apply.
    let (pid, uid, accountable) = (peer.pid, peer.identity.uid, peer.accountable_uid);
    let connected = broker.with(|s| {
        s.connect(peer, Arc::clone(&outbox))
            .map(|client| (client, s.limits.hello_timeout))
    });
    let (client, hello_timeout) = match connected {
        Ok(connected) => connected,
        // Every connection id is used (see `broker::MAX_CLIENT_ID`): the
        // client is told why, and the socket goes as a refusal's.
        Err(err) => {
            tracing::error!(pid, uid, error = %err, "cannot take a connection");
            drop(outbox);
            match Arc::try_unwrap(socket) {
                Ok(registered) => {
                    drop(uid_slot);
                    crate::server::refuse(registered.into_inner(), err.into(), accountable);
                }
                Err(shared) => crate::client_fds::release_socket_elsewhere(
                    accountable,
                    Box::new((shared, uid_slot)),
                ),
            }
            return;
        }
    };
    let writer = tokio::spawn(Arc::clone(&outbox).run_writer());
    let mut buf = vec![0u8; MAX_MESSAGE_SIZE];
    // Dropped once the hello is handled: polled with every wake-up, it
    // cost a served connection about 0.4 µs per request.
    let hello_deadline = tokio::time::Instant::now() + hello_timeout;
    let mut hello_due = Some(Box::pin(tokio::time::sleep_until(hello_deadline)));
    'connection: loop {
        // Not read while too many of its uid's fds wait to be closed (a
        // FUSE file whose FLUSH its server holds): what a client parks in
        // the daemon stays bounded.
        if client_fds::pending(accountable) >= client_fds::MAX_PENDING_PER_UID {
            held_back(pid, uid, accountable);
            while client_fds::pending(accountable) >= client_fds::MAX_PENDING_PER_UID {
                // Cut off meanwhile (another client's grant overflowed
                // its queue): nothing more will be read, and its holds
                // must not wait for its user's closes.
                if outbox.cut_off() {
                    break 'connection;
                }
                // A closing thread that could not be started is tried
                // again here too: nothing else may hand this uid anything
                // to close.
                client_fds::start_stalled_threads();
                tokio::time::sleep(FDS_CLOSING_POLL).await;
            }
        }
        let ready = match hello_due.as_mut() {
            None => socket.readable().await,
            Some(due) => {
                let due_now = tokio::select! {
                    // What the client sent first: a daemon stopped (or
                    // starved) past the timeout reads a hello that waited
                    // for it.
                    biased;
                    ready = socket.readable() => Some(ready),
                    () = due => None,
                };
                match due_now {
                    Some(ready) => ready,
                    None if broker.lock().said_hello(client) => {
                        hello_due = None;
                        continue;
                    }
                    None => {
                        no_hello(pid, uid, hello_timeout);
                        break;
                    }
                }
            }
        };
        let mut guard = match ready {
            Ok(guard) => guard,
            Err(_) => break,
        };
        // Drain what is queued, one wake-up for many messages, but at most
        // a turn's worth: a client that sends as fast as we read must not
        // keep every other connection waiting.
        let mut handled = 0;
        loop {
            // Cut off for not reading its replies: what it queued since is
            // not carried out (allocations, grants) for answers that can
            // no longer reach it. (A client that merely hung up is read to
            // the end: a pipelined end or free must still count.)
            if outbox.cut_off() {
                break 'connection;
            }
            // Checked right before each read, with nothing awaited in
            // between: every connection of a uid, woken together, would
            // otherwise read a message of up to 32 fds each.
            if client_fds::pending(accountable) >= client_fds::MAX_PENDING_PER_UID {
                break;
            }
            // Fds of a message refused on receipt: closed elsewhere, as
            // every client fd the broker does not keep (`client_fds`).
            let mut dropped = Vec::new();
            let received = guard.try_io(|fd| {
                recv_message_into_keeping(fd.get_ref().as_fd(), &mut buf, true, &mut dropped)
                    .map_err(|err| match err {
                        RecvError::Os(Errno::EAGAIN) => io::Error::from(io::ErrorKind::WouldBlock),
                        other => io::Error::other(other),
                    })
            });
            client_fds::close_elsewhere(accountable, dropped);
            let disposition = match received {
                Err(_would_block) => break,
                Ok(Ok((len, fds))) => {
                    let waiting_for_hello = hello_due.is_some();
                    let mut said_hello = false;
                    let disposition = broker.with(|s| {
                        if s.stopping {
                            client_fds::close_elsewhere(accountable, fds);
                            return None;
                        }
                        let disposition = s.handle_message(client, &buf[..len], fds);
                        said_hello = waiting_for_hello && s.said_hello(client);
                        Some(disposition)
                    });
                    if said_hello {
                        hello_due = None;
                    } else if waiting_for_hello && tokio::time::Instant::now() >= hello_deadline {
                        // Never idle, so never waiting on the timer: a
                        // client that keeps a request queued (each one
                        // answered "hello first") is timed out here.
                        no_hello(pid, uid, hello_timeout);
                        break 'connection;
                    }
                    disposition
                }
                Ok(Err(err)) => match err.get_ref().and_then(|e| e.downcast_ref::<RecvError>()) {
                    // The client closed with answers of ours unread: the
                    // reset is reported once, ahead of what it sent last
                    // (a pipelined end or free), which is still to be read.
                    Some(RecvError::Os(Errno::ECONNRESET)) => continue,
                    // The kernel could not give the daemon the fds (its
                    // fd table full): no fault of the client's. Decided
                    // by the flag alone: a look at the fd table now
                    // would race with fds closed meanwhile (those of
                    // this very message among them), and a client whose
                    // request came at the wrong moment was answered
                    // ProtocolError and counted towards a disconnect.
                    Some(RecvError::ControlTruncated { len }) => {
                        let len = *len;
                        broker.with(|s| {
                            (!s.stopping).then(|| s.refuse_for_lack_of_fds(client, &buf[..len]))
                        })
                    }
                    Some(RecvError::Truncated) | Some(RecvError::TooManyFds { .. }) => {
                        let message = err.to_string();
                        // Too many fds, the bytes arrived whole: their head
                        // names the request the refusal answers. (A
                        // truncated datagram's may not be readable.)
                        let id = match err.get_ref().and_then(|e| e.downcast_ref::<RecvError>()) {
                            Some(RecvError::TooManyFds { len, .. }) => buf
                                .get(..*len)
                                .and_then(decode_request_head)
                                .map_or(0, |head| head.id),
                            _ => 0,
                        };
                        broker.with(|s| {
                            (!s.stopping).then(|| {
                                s.refuse_malformed(
                                    client,
                                    id,
                                    WireError::new(ErrorCode::ProtocolError, message),
                                )
                            })
                        })
                    }
                    _ => break 'connection,
                },
            };
            match disposition {
                Some(Disposition::Continue) => {}
                Some(Disposition::Disconnect) => break 'connection,
                // The daemon stops: this message is left unanswered (the
                // client library retries it on the next daemon), and the
                // connection is neither served nor released, so that its
                // holds stay in the last record.
                None => std::future::pending::<()>().await,
            }
            handled += 1;
            if handled == MESSAGES_PER_TURN {
                break;
            }
        }
        if handled == MESSAGES_PER_TURN {
            drop(guard);
            tokio::task::yield_now().await;
        }
    }
    broker.with(|s| s.disconnect(client));
    outbox.close();
    writer.abort();
    // Gone once awaited, with its copy of the socket (see below).
    let _ = writer.await;
    crate::server::stop_reading(socket.get_ref().as_fd(), accountable);
    let fds_maybe_unread = outbox.fds_maybe_unread();
    // Nothing but the socket (and this connection's places) is kept.
    drop((outbox, buf));
    if fds_maybe_unread > 0 {
        keep_until_read(socket.get_ref(), pid, uid).await;
    }
    // The outbox, the writer and the broker's entry let go of theirs, this
    // is the socket's last fd: it goes to the uid's thread.
    match Arc::try_unwrap(socket) {
        Ok(registered) => {
            crate::server::retire(registered.into_inner(), accountable, Some(uid_slot))
        }
        // Not expected: whoever else holds it closes it, unless this copy
        // is the last after all, which then goes to the uid's thread too.
        Err(shared) => {
            tracing::error!(pid, uid, "a connection's socket is still shared at its end");
            crate::client_fds::release_socket_elsewhere(accountable, Box::new((shared, uid_slot)));
        }
    }
}

/// Says (once a minute at most) that a connection is read no further
/// while its user's closes are behind: a client stalling its own closes
/// (a FUSE file whose FLUSH is held), or a service manager slow to read
/// (see `FdStore::await_removal`). Without it, an operator saw a client
/// hang for no stated reason.
fn held_back(pid: i32, uid: u32, counted_as: u32) {
    static HELD_BACK: crate::logging::Throttle =
        crate::logging::Throttle::new(std::time::Duration::from_secs(60));
    if let Some(held_back) = HELD_BACK.admit(std::time::Instant::now()) {
        tracing::warn!(
            pid,
            uid,
            counted_as,
            held_back,
            waiting = client_fds::pending(counted_as),
            "connection read no further until its user's files waiting to be closed are closed"
        );
    }
}

fn no_hello(pid: i32, uid: u32, timeout: std::time::Duration) {
    tracing::warn!(
        pid,
        uid,
        ?timeout,
        "connection closed: no hello within the hello timeout"
    );
}

/// The connection's place among its uid's, or the refusal to send when
/// the uid is at its rule's `max_uid_connections`.
fn take_uid_slot(
    broker: &Broker,
    uids: &Arc<UidConnections>,
    peer: &identity::Peer,
) -> Result<UidSlot, WireError> {
    let policy = Arc::clone(&broker.lock().policy);
    // Counted per user: the processes of a user namespace count as the
    // user who made it, or a user with a subordinate uid range would have
    // the limit once per uid of it. The stricter of the process's rule and
    // its maker's applies, so neither is escaped through the other.
    let own = policy.resolve(&peer.identity);
    let resolved = match peer.counted_as_its_maker() {
        Some(maker) => {
            let makers = policy.resolve_user(maker);
            if makers.limits.max_uid_connections < own.limits.max_uid_connections {
                makers
            } else {
                own
            }
        }
        None => own,
    };
    let limit = resolved.limits.max_uid_connections;
    let (uid, counted_as) = (peer.identity.uid, peer.accountable_uid);
    uids.take(counted_as, limit).map_err(|open| {
        tracing::warn!(
            uid,
            counted_as,
            pid = peer.pid,
            rule = %resolved.rule,
            limit,
            "connection refused: the uid is at its max_uid_connections"
        );
        let whose = peer.counted_as_text();
        let mut error = WireError::new(
            ErrorCode::QuotaExceeded,
            format!(
                "rule '{}': max_uid_connections limit {limit}, in use {open}, requested 1 ({whose})",
                resolved.rule
            ),
        );
        error.quota = Some(dmabroker_ipc::QuotaDetail {
            limit: u64::from(limit),
            in_use: u64::from(open),
            requested: 1,
        });
        error
    })
}

/// Keeps a connection whose client may have fds unread (and so keeps its
/// place under the connection cap and among its uid's) until the client
/// has read everything or closed: the fds stay charged to the daemon until
/// then, whatever the daemon does with its own end (see `crate::inflight`).
/// A connection with only fd-less answers unread is let go at once: those
/// cost the daemon nothing.
async fn keep_until_read(socket: &OwnedFd, pid: i32, uid: u32) {
    let unread = match crate::kernel::socket::unread_by_peer(socket.as_fd()) {
        Ok(0) | Err(_) => return,
        Ok(bytes) => bytes,
    };
    tracing::warn!(
        pid,
        uid,
        unread_bytes = unread,
        "connection closed with messages its client has not read; it keeps its place under the connection cap until the client reads them or closes"
    );
    let _ = crate::inflight::until_read(socket, crate::inflight::RECHECK_CUT_OFF).await;
    tracing::info!(
        pid,
        uid,
        "a closed connection's client has read or closed: its place is free"
    );
}
