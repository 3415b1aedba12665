//! The daemon's copies of files its clients hold too, and where the last
//! of them is let go of.
//!
//! The last release of a file that can be watched with epoll (a dma-buf,
//! a sync_file) takes the lock of every epoll watching it, and a client
//! can hold such a lock for good: a thread of its own, adding a FUSE file
//! to that epoll, waits inside for an answer to POLL that its FUSE server
//! never sends. A client that watches its buffer's dma-buf that way,
//! closes its own copy and frees the buffer leaves the daemon the last
//! copy; released on the broker's thread, it would stall every client.
//! So the daemon's copies of such files are [`HeldFd`]s that know where
//! they are let go of: on a closing thread of the uid that brought the
//! file in (see `client_fds`), where a release that waits for good holds
//! up only that uid. Once the file is sent to a client of another uid
//! (an import, a fence handed to a no-autofence client), that user can
//! stall its release as well, and it is let go of on a thread of all the
//! users it was sent to instead ([`HeldFd::sent_to`]): on the first
//! user's own, the second could stall every close of the first.
//!
//! A memfd cannot be watched with epoll (it has no poll), nor can a file
//! the daemon made and has not sent yet: those close where they drop,
//! except that a big buffer's pages go back on the closer's thread
//! (`closer`), since that takes time in proportion to them.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, OnceLock};

use crate::client_fds::Uids;

/// Where a [`HeldFd`]'s file is let go of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Release {
    /// Where it drops: a file no client can have watched.
    Here,
    /// A memfd buffer of `size` bytes: here when small, on the closer's
    /// thread when big.
    Pages { size: u64 },
    /// On the closing thread of `uid`: a pollable file a client of `uid`
    /// brought in or was given (and of every other uid it was since sent
    /// to, see [`HeldFd::sent_to`]). `buffer`: a buffer's dma-buf, whose
    /// pages a device allocation may be waiting for
    /// (`closer::CloseTicket`).
    OnThreadOf { uid: u32, buffer: bool },
}

/// An fd of the daemon's that lets go of its file as its [`Release`] says:
/// dropped, it hands its fd to the thread that is to close it.
pub struct HeldFd {
    /// `Some` until the drop takes it.
    fd: Option<OwnedFd>,
    release: Release,
    /// What that thread waits for first (see [`HeldFd::first_wait_for`]).
    first: OnceLock<Wait>,
    /// Its close ticket, when taken before the drop (see
    /// [`HeldFd::take_close_ticket`]).
    ticket: OnceLock<crate::closer::CloseTicket>,
    /// Other uids than the release's its file was sent to (see
    /// [`HeldFd::sent_to`]).
    others: Mutex<Vec<u32>>,
}

/// A wait made on a closing thread before a close.
pub type Wait = Box<dyn FnOnce() + Send + Sync>;

impl std::fmt::Debug for HeldFd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeldFd")
            .field("fd", &self.fd)
            .field("release", &self.release)
            .field("waits_first", &self.first.get().is_some())
            .field("ticket", &self.ticket.get())
            .field("others", &self.others())
            .finish()
    }
}

impl HeldFd {
    pub fn new(fd: OwnedFd, release: Release) -> HeldFd {
        HeldFd {
            fd: Some(fd),
            release,
            first: OnceLock::new(),
            ticket: OnceLock::new(),
            others: Mutex::new(Vec::new()),
        }
    }

    /// Notes that the file is being sent to a client of `uid` (before the
    /// send: once it has it, it can watch it). A file let go of on a
    /// closing thread is from then on let go of on the thread of every
    /// uid it was sent to together; others are not watched by clients.
    pub fn sent_to(&self, uid: u32) {
        let Release::OnThreadOf { uid: first, .. } = self.release else {
            return;
        };
        if uid == first {
            return;
        }
        let mut others = self.others.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(at) = others.binary_search(&uid) {
            others.insert(at, uid);
        }
    }

    fn others(&self) -> Vec<u32> {
        self.others
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whose closing thread lets go of the file, when it is let go of on
    /// one.
    pub fn closing_uids(&self) -> Option<Uids> {
        match self.release {
            Release::OnThreadOf { uid, .. } => Some(self.uids_with(uid)),
            Release::Here | Release::Pages { .. } => None,
        }
    }

    /// `first` and every other uid the file was sent to.
    fn uids_with(&self, first: u32) -> Uids {
        Uids::of(first).with(&self.others())
    }

    /// Has the closing thread wait for `wait` before it lets go of the
    /// file: for another holder of the file that must let go first (the
    /// service manager's fd store, see `FdStore::await_removal`). Only
    /// for files let go of on a closing thread; the first wait set counts.
    pub fn first_wait_for(&self, wait: Wait) {
        let _ = self.first.set(wait);
    }

    /// Takes a buffer's close ticket now, not at the drop: for a buffer
    /// freed while a copy of the daemon's (a cache sync on a blocking
    /// thread, see `broker::waits::CacheEnd`) keeps its file open. Its
    /// pages come back only once that copy is done and the close is made,
    /// and a device allocation asked for meanwhile must wait for them
    /// (`closer::wait_for_earlier_closes`), as it would had the buffer's
    /// close been handed over at the free. The close itself is still made
    /// where the drop hands it (the uid's closing thread), with this
    /// ticket. Only for a buffer's dma-buf; taking it twice changes nothing.
    /// (A freed buffer is sent to nobody new, so the thread it names is
    /// the one the close goes to.)
    pub fn take_close_ticket(&self) {
        if let (Release::OnThreadOf { buffer: true, .. }, Some(uids)) =
            (self.release, self.closing_uids())
        {
            let _ = self.ticket.get_or_init(|| crate::closer::ticket_of(uids));
        }
    }

    pub fn release(&self) -> Release {
        self.release
    }
}

/// Another fd of a held file, for what needs an fd of its own (an epoll
/// registration, a cache sync on a blocking thread). It keeps the file's
/// [`HeldFd`] alive until after its own fd is closed, so that close, made
/// wherever it drops, is never the file's last release: dups cost no
/// hand-over.
#[derive(Debug)]
pub struct HeldDup {
    // Dropped in this order: the dup first, while the anchor keeps the
    // file; then the anchor, which knows where to let go of it.
    fd: OwnedFd,
    _anchor: Arc<HeldFd>,
}

impl HeldDup {
    pub fn of(held: &Arc<HeldFd>) -> std::io::Result<HeldDup> {
        Ok(HeldDup {
            fd: held.as_fd().try_clone_to_owned()?,
            _anchor: Arc::clone(held),
        })
    }
}

impl AsFd for HeldDup {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for HeldDup {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl From<OwnedFd> for HeldFd {
    fn from(fd: OwnedFd) -> HeldFd {
        HeldFd::new(fd, Release::Here)
    }
}

impl AsFd for HeldFd {
    #[allow(clippy::expect_used)]
    fn as_fd(&self) -> BorrowedFd<'_> {
        // Only the drop takes the fd, and nothing can borrow it after.
        self.fd
            .as_ref()
            .expect("a HeldFd's fd is taken only by its drop")
            .as_fd()
    }
}

impl AsRawFd for HeldFd {
    fn as_raw_fd(&self) -> RawFd {
        self.as_fd().as_raw_fd()
    }
}

impl Drop for HeldFd {
    fn drop(&mut self) {
        let Some(fd) = self.fd.take() else {
            return;
        };
        match self.release {
            Release::Here => drop(fd),
            Release::Pages { size } => crate::closer::close_buffer(fd, size),
            Release::OnThreadOf { uid, buffer } => {
                let uids = self.uids_with(uid);
                let closing = Closing {
                    first: self.first.take(),
                    _fd: fd,
                    _ticket: self
                        .ticket
                        .take()
                        .or_else(|| buffer.then(|| crate::closer::ticket_of(uids.clone()))),
                };
                crate::client_fds::release_elsewhere(uids, uid, Box::new(closing));
            }
        }
    }
}

/// A file on its closing thread: waits for what it must, then closes
/// (fields drop in order: the fd, then its ticket).
struct Closing {
    first: Option<Wait>,
    _fd: OwnedFd,
    _ticket: Option<crate::closer::CloseTicket>,
}

impl Drop for Closing {
    fn drop(&mut self) {
        if let Some(wait) = self.first.take() {
            wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::kernel::testutil::watched_pipe as pipe;

    /// A file a client brought in is let go of on its uid's thread, even
    /// when a dup outlives the daemon's own copy: the broker's thread never
    /// makes the last release, however the copies are dropped.
    #[test]
    fn a_client_held_file_and_its_dups_are_let_go_of_on_the_uids_thread() {
        const UID: u32 = 4_000_000_011;
        let (fd, closed) = pipe();
        let held = Arc::new(HeldFd::new(
            fd,
            Release::OnThreadOf {
                uid: UID,
                buffer: false,
            },
        ));
        let dup = HeldDup::of(&held).expect("dup");
        drop(held);
        assert!(!closed(), "closed while a dup was open");
        drop(dup);
        eventually("closed", &closed);
        // Counted down just after the close.
        eventually("nothing pending", || crate::client_fds::pending(UID) == 0);
    }

    fn eventually(what: &str, check: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !check() {
            assert!(std::time::Instant::now() < deadline, "never {what}");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// A file sent to a client of another uid is let go of on a thread of
    /// both uids: while its release waits, the closes of the uid that
    /// brought it in go on, and it counts as waiting for that uid alone.
    #[test]
    fn a_file_sent_to_another_uid_is_let_go_of_on_a_thread_of_both() {
        const ALICE: u32 = 4_000_000_012;
        const BOB: u32 = 4_000_000_013;
        let (fd, closed) = pipe();
        let shared = HeldFd::new(
            fd,
            Release::OnThreadOf {
                uid: ALICE,
                buffer: false,
            },
        );
        shared.sent_to(BOB);
        shared.sent_to(ALICE);
        assert_eq!(shared.closing_uids(), Some(Uids::of(ALICE).with(&[BOB])));
        // Stands for a release that waits on a lock Bob holds.
        let entered = Arc::new(std::sync::Barrier::new(2));
        let (release_tx, release) = std::sync::mpsc::channel::<()>();
        let release = Mutex::new(release);
        let inside = Arc::clone(&entered);
        shared.first_wait_for(Box::new(move || {
            inside.wait();
            let _ = release
                .lock()
                .map(|r| r.recv_timeout(std::time::Duration::from_secs(30)));
        }));
        drop(shared);
        entered.wait();
        let (own, own_closed) = pipe();
        drop(HeldFd::new(
            own,
            Release::OnThreadOf {
                uid: ALICE,
                buffer: false,
            },
        ));
        eventually("Alice's own file closed", &own_closed);
        assert!(!closed());
        // Counted for Alice, who brought it in: a stall of hers does not
        // hold Bob back.
        eventually("only the shared file pending, for Alice", || {
            (
                crate::client_fds::pending(ALICE),
                crate::client_fds::pending(BOB),
            ) == (1, 0)
        });
        release_tx.send(()).expect("release");
        eventually("the shared file closed", &closed);
        eventually("nothing pending", || {
            crate::client_fds::pending(ALICE) + crate::client_fds::pending(BOB) == 0
        });
    }

    /// Files the daemon lets go of in place are nobody's to stall, sent
    /// or not.
    #[test]
    fn a_file_let_go_of_in_place_names_no_closing_thread() {
        let (fd, _) = pipe();
        let here = HeldFd::from(fd);
        here.sent_to(7);
        assert_eq!(here.closing_uids(), None);
    }

    /// A file only the daemon has held closes where it drops.
    #[test]
    fn a_file_no_client_held_closes_in_place() {
        let (fd, closed) = pipe();
        drop(HeldFd::from(fd));
        assert!(closed());
    }
}
