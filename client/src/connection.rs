//! The client's end of the socket: requests out, replies matched to their
//! request ids, events queued.
//!
//! Any thread may call; whichever thread needs a message first becomes the
//! reader and files what it receives for the others (a condvar wakes them),
//! so there is no background thread and no runtime.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use dmabroker_ipc::codec::{decode_server_message, encode_request};
use dmabroker_ipc::fdpass::{recv_message, send_message, RecvError};
use dmabroker_ipc::{
    Event, ReplyBody, Request, RequestBody, RequestHead, ServerMessage, WireError, FLAG_NO_REPLY,
};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};

use crate::error::Error;

/// Requests sent without waiting for success get ids with this bit set, so
/// an error answering one is recognised as belonging to no waiting caller.
const UNWAITED: u64 = 1 << 63;
/// Most asynchronous errors remembered for `take_errors`.
const MAX_ASYNC_ERRORS: usize = 64;

/// A reply and the fds that came with it.
#[derive(Debug)]
pub(crate) struct Incoming {
    pub result: Result<ReplyBody, WireError>,
    pub fds: Vec<OwnedFd>,
}

#[derive(Debug, Default)]
struct Mailbox {
    replies: HashMap<u64, Incoming>,
    events: VecDeque<(Event, Vec<OwnedFd>)>,
    errors: VecDeque<WireError>,
    reading: bool,
    closed: Option<String>,
}

#[derive(Debug)]
pub(crate) struct Connection {
    socket: OwnedFd,
    next_id: AtomicU64,
    mailbox: Mutex<Mailbox>,
    arrived: Condvar,
}

impl Connection {
    pub fn open(path: &Path) -> Result<Arc<Self>, Error> {
        let connect_err = |source: std::io::Error| Error::Connect {
            path: path.to_owned(),
            source,
        };
        let socket = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| connect_err(e.into()))?;
        let addr = UnixAddr::new(path).map_err(|e| connect_err(e.into()))?;
        connect(std::os::fd::AsRawFd::as_raw_fd(&socket), &addr)
            .map_err(|e| connect_err(e.into()))?;
        Ok(Arc::new(Connection {
            socket,
            next_id: AtomicU64::new(1),
            mailbox: Mutex::new(Mailbox::default()),
            arrived: Condvar::new(),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Mailbox> {
        self.mailbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends a request and returns its id without waiting.
    pub fn send(&self, body: RequestBody, fds: &[BorrowedFd<'_>], wait: bool) -> Result<u64, Error> {
        let mut id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut flags = 0;
        if !wait {
            id |= UNWAITED;
            flags |= FLAG_NO_REPLY;
        }
        let request = Request {
            head: RequestHead {
                id,
                fds: fds.len() as u8,
                flags,
            },
            body,
        };
        let bytes = encode_request(&request).map_err(|e| Error::Protocol(e.to_string()))?;
        send_message(self.socket.as_fd(), &bytes, fds, false).map_err(|e| match e {
            dmabroker_ipc::fdpass::SendError::Os(nix::errno::Errno::EPIPE)
            | dmabroker_ipc::fdpass::SendError::Os(nix::errno::Errno::ECONNRESET) => {
                Error::Disconnected
            }
            other => Error::Protocol(other.to_string()),
        })?;
        Ok(id)
    }

    pub fn call(&self, body: RequestBody, fds: &[BorrowedFd<'_>]) -> Result<(ReplyBody, Vec<OwnedFd>), Error> {
        let id = self.send(body, fds, true)?;
        self.wait_reply(id)
    }

    pub fn wait_reply(&self, id: u64) -> Result<(ReplyBody, Vec<OwnedFd>), Error> {
        let mut mailbox = self.lock();
        loop {
            if let Some(incoming) = mailbox.replies.remove(&id) {
                return match incoming.result {
                    Ok(body) => Ok((body, incoming.fds)),
                    Err(err) => Err(Error::Broker(err)),
                };
            }
            if mailbox.closed.is_some() {
                // A broker that refuses a connection (busy, bad version)
                // says why before it hangs up.
                return Err(match mailbox.errors.pop_back() {
                    Some(err) => Error::Broker(err),
                    None => Error::Disconnected,
                });
            }
            mailbox = self.read_or_wait(mailbox, None);
        }
    }

    /// Either becomes the reader for one message or waits for the thread
    /// that is. Returns with the lock held again.
    fn read_or_wait<'a>(
        &'a self,
        mut mailbox: MutexGuard<'a, Mailbox>,
        deadline: Option<Instant>,
    ) -> MutexGuard<'a, Mailbox> {
        if mailbox.reading {
            return match deadline {
                None => self.arrived.wait(mailbox).unwrap_or_else(|p| p.into_inner()),
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    self.arrived
                        .wait_timeout(mailbox, left)
                        .map(|(guard, _)| guard)
                        .unwrap_or_else(|p| p.into_inner().0)
                }
            };
        }
        mailbox.reading = true;
        drop(mailbox);
        let received = self.receive(deadline);
        let mut mailbox = self.lock();
        mailbox.reading = false;
        match received {
            Ok(Some((message, fds))) => file_message(&mut mailbox, message, fds),
            Ok(None) => {}
            Err(reason) => mailbox.closed = Some(reason),
        }
        self.arrived.notify_all();
        mailbox
    }

    /// Reads one message, or `None` when the deadline passes first.
    fn receive(&self, deadline: Option<Instant>) -> Result<Option<(ServerMessage, Vec<OwnedFd>)>, String> {
        if let Some(deadline) = deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
            let mut fds = [PollFd::new(self.socket.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(ms)) {
                Ok(0) => return Ok(None),
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => return Ok(None),
                Err(err) => return Err(err.to_string()),
            }
        }
        match recv_message(self.socket.as_fd(), false) {
            Ok(received) => match decode_server_message(&received.bytes) {
                Ok(message) => Ok(Some((message, received.fds))),
                Err(err) => Err(format!("undecodable message from the broker: {err}")),
            },
            Err(RecvError::Closed) => Err("the broker closed the connection".into()),
            Err(err) => Err(err.to_string()),
        }
    }

    /// The next event, waiting at most `timeout` (forever with `None`).
    pub fn next_event(&self, timeout: Option<Duration>) -> Result<Option<(Event, Vec<OwnedFd>)>, Error> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut mailbox = self.lock();
        loop {
            if let Some(event) = mailbox.events.pop_front() {
                return Ok(Some(event));
            }
            if mailbox.closed.is_some() {
                return Err(Error::Disconnected);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(None);
            }
            mailbox = self.read_or_wait(mailbox, deadline);
        }
    }

    /// Errors the broker sent for requests nobody waited on (pipelined ends
    /// and frees), oldest first.
    pub fn take_errors(&self) -> Vec<WireError> {
        self.lock().errors.drain(..).collect()
    }
}

fn file_message(mailbox: &mut Mailbox, message: ServerMessage, fds: Vec<OwnedFd>) {
    match message {
        // Id 0 answers a message the broker could not read at all.
        ServerMessage::Reply(reply) if reply.id & UNWAITED != 0 || reply.id == 0 => {
            if let Err(err) = reply.result {
                if mailbox.errors.len() == MAX_ASYNC_ERRORS {
                    mailbox.errors.pop_front();
                }
                mailbox.errors.push_back(err);
            }
        }
        ServerMessage::Reply(reply) => {
            mailbox.replies.insert(
                reply.id,
                Incoming {
                    result: reply.result,
                    fds,
                },
            );
        }
        ServerMessage::Event(event) => mailbox.events.push_back((event.event, fds)),
    }
}
