//! Fds clients send, until the broker keeps them, and the closing of
//! those it does not keep.
//!
//! Every `close(2)` of a file on a FUSE mount sends the file system's
//! server a FLUSH and waits for the answer, with no limit and no signal
//! that ends it. Any client that can mount FUSE (`fusermount` is there for
//! everyone on most systems) could send such an fd on any message, and
//! the broker's thread, closing what it does not keep, would wait for
//! good: every client stalls. So an fd a client sent is a [`ClientFd`]
//! until the broker has checked it is a kernel object it keeps (a dma-buf
//! to adopt, a sync_file ending an access); dropped before that, it is
//! closed on a thread of its sender's uid. A uid's thread that waits for
//! good holds up only that uid's closes, and a uid with
//! [`MAX_PENDING_PER_UID`] fds waiting to be closed has its connections
//! read no further until they are (see `connection`), so the fds a client
//! parks in the daemon stay bounded.
//!
//! A file more than one user has held (a buffer one imported from
//! another, a fence one handed to another's no-autofence client) is let
//! go of on a thread of those users together ([`Uids`]): each of them can
//! stall its release, and on any one user's thread one user could stall
//! another's frees. Such a thread holds up only the closes of files the
//! same users shared; its waiting closes count, as before, for the user
//! who brought each file in.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};

use crate::held_files::{HeldFd, Release};

/// Fds of every uid waiting to be closed: [`pending`] looks no further
/// while there are none, which is nearly always.
static PENDING: AtomicUsize = AtomicUsize::new(0);

/// Fds of one uid waiting to be closed past which its connections are not
/// read: two messages' worth.
pub const MAX_PENDING_PER_UID: usize = 64;

/// An fd a client sent. Kept with [`ClientFd::keep_if`] once it is known
/// to be safe to close anywhere; dropped, it is closed on its uid's thread.
#[derive(Debug)]
pub struct ClientFd {
    fd: Option<OwnedFd>,
    uid: u32,
}

impl ClientFd {
    pub fn new(fd: OwnedFd, uid: u32) -> ClientFd {
        ClientFd { fd: Some(fd), uid }
    }

    /// Every fd of `fds`, sent by a client of `uid`.
    pub fn all(fds: Vec<OwnedFd>, uid: u32) -> Vec<ClientFd> {
        fds.into_iter().map(|fd| ClientFd::new(fd, uid)).collect()
    }

    /// The fd, to keep, if `check` says it names a kernel object whose
    /// close does not wait (a dma-buf, a sync_file); otherwise it is
    /// dropped, and so closed elsewhere.
    pub fn keep_if(mut self, check: impl FnOnce(BorrowedFd<'_>) -> bool) -> Option<OwnedFd> {
        if self.fd.as_ref().is_some_and(|fd| check(fd.as_fd())) {
            self.fd.take()
        } else {
            None
        }
    }

    /// As [`ClientFd::keep_if`], kept as a file its client holds too (a
    /// pollable one: see `held_files`), let go of on the uid's thread.
    /// `buffer`: it is a buffer's dma-buf.
    pub fn keep_held_if(
        self,
        check: impl FnOnce(BorrowedFd<'_>) -> bool,
        buffer: bool,
    ) -> Option<HeldFd> {
        let uid = self.uid;
        let fd = self.keep_if(check)?;
        Some(HeldFd::new(fd, Release::OnThreadOf { uid, buffer }))
    }
}

/// The users whose closing thread lets go of a file: the one who brought
/// it in and every other it was sent to. Sorted, without repeats, never
/// empty; one uid is that user's own thread.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Uids(Box<[u32]>);

impl Uids {
    pub fn of(uid: u32) -> Uids {
        Uids(Box::new([uid]))
    }

    /// These and `others`.
    pub fn with(&self, others: &[u32]) -> Uids {
        let mut all: Vec<u32> = self.0.iter().chain(others).copied().collect();
        all.sort_unstable();
        all.dedup();
        Uids(all.into_boxed_slice())
    }

    pub fn contains(&self, uid: u32) -> bool {
        self.0.binary_search(&uid).is_ok()
    }

    /// More than one user's: a thread such users share.
    pub fn is_shared(&self) -> bool {
        self.0.len() > 1
    }

    pub fn as_slice(&self) -> &[u32] {
        &self.0
    }
}

impl std::fmt::Display for Uids {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, uid) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("+")?;
            }
            write!(f, "{uid}")?;
        }
        Ok(())
    }
}

impl Drop for ClientFd {
    fn drop(&mut self) {
        if let Some(fd) = self.fd.take() {
            close_elsewhere(self.uid, vec![fd]);
        }
    }
}

/// A uid's two closing threads: one for the files its clients sent or
/// held, one for its connections' sockets, so that a connection's close
/// never waits behind a file's (a freed dma-buf's waits for the service
/// manager: see `FdStore::await_removal`), and refusals, which the daemon
/// stops accepting for when too many wait (see `server::retire`), are not
/// held up by a slow manager.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Lane {
    Files,
    Sockets,
}

type Key = (Uids, Lane);

/// Closes `fds`, sent by a client of `uid`, on that uid's closing thread.
pub fn close_elsewhere(uid: u32, fds: Vec<OwnedFd>) {
    if fds.is_empty() {
        return;
    }
    hand_over(
        (Uids::of(uid), Lane::Files),
        uid,
        fds.into_iter().map(|fd| Box::new(fd) as Parcel),
    );
}

/// Drops `parcel` (a file clients of `uids` have held, or anything
/// holding one: see `held_files`) on those users' closing thread. It
/// counts as one fd waiting to be closed for `bringer`, the user who
/// brought the file in (or had it made), until it is dropped: as when
/// it was closed on that user's own thread, a user is held back only by
/// closes of files it brought in. Counted for every user of the set, a
/// user who stalls a file it shared could hold back everyone it shares
/// with (a compositor importing every user's buffers).
pub fn release_elsewhere(uids: Uids, bringer: u32, parcel: Parcel) {
    hand_over((uids, Lane::Files), bringer, std::iter::once(parcel));
}

/// As [`release_elsewhere`], for a connection's socket (or what holds
/// it), on the uid's thread for sockets.
pub fn release_socket_elsewhere(uid: u32, parcel: Parcel) {
    hand_over((Uids::of(uid), Lane::Sockets), uid, std::iter::once(parcel));
}

/// What a closing thread drops.
pub type Parcel = Box<dyn Send>;

fn hand_over(key: Key, payer: u32, parcels: impl Iterator<Item = Parcel>) {
    let mut closes = closes();
    let Closes {
        queues, pending, ..
    } = &mut *closes;
    let queue = queues.entry(key.clone()).or_default();
    let was_idle = queue.fds.is_empty() && !queue.in_hand;
    let before = queue.fds.len();
    queue.fds.extend(parcels.map(|parcel| (payer, parcel)));
    let added = queue.fds.len() - before;
    *pending.entry(payer).or_default() += added;
    PENDING.fetch_add(added, Ordering::AcqRel);
    let (closing, waiting) = (queue.closing, queue.waiting);
    if waiting {
        // In line already; tried again now, since what refused it may be
        // gone (a thread that could not be spawned).
        let wake = start_waiting(&mut closes);
        drop(closes);
        if wake {
            more().notify_all();
        }
        return;
    }
    if closing {
        // An idle thread of a shared set about to go busy counts as a new
        // one against its users' bound (see `MAX_SHARED_THREADS_PER_UID`).
        if was_idle && key.0.is_shared() && !may_go_busy(&closes.queues, &key) {
            wait_in_line(&mut closes, key);
            return;
        }
        drop(closes);
        // Its thread may be lingering for more.
        more().notify_all();
        return;
    }
    // Kept, if no thread can be had, and tried again when one ends or
    // goes idle, at the next hand-over to it (or by
    // `start_stalled_threads`): closed here, the release of a client's
    // file could stall every client. They count as waiting meanwhile,
    // which holds their users' connections back once there are enough.
    // Queues in line go first.
    if !closes.waiting.is_empty() {
        wait_in_line(&mut closes, key);
        let wake = start_waiting(&mut closes);
        drop(closes);
        if wake {
            more().notify_all();
        }
        return;
    }
    if let Err(err) = start_thread(&mut closes, &key) {
        wait_in_line(&mut closes, key.clone());
        // Once a minute at most: past the bound, every hand-over fails so.
        static NO_THREAD: crate::logging::Throttle =
            crate::logging::Throttle::new(std::time::Duration::from_secs(60));
        if let Some(held_back) = NO_THREAD.admit(std::time::Instant::now()) {
            tracing::warn!(%err, uids = %key.0, held_back, "no thread to close a client's fds on yet");
        }
    }
}

/// Puts `key`'s queue in line for a thread (or, its thread idle, for
/// leave to go busy).
fn wait_in_line(closes: &mut Closes, key: Key) {
    if let Some(queue) = closes.queues.get_mut(&key) {
        queue.waiting = true;
        closes.waiting.push_back(key);
    }
}

/// Closing threads at most, stuck ones included: each user has two, and
/// threads it shares with users it shared files with (see
/// [`MAX_SHARED_THREADS_PER_UID`]). Past the bound a queue waits for a
/// thread (its parcels counted, holding its users' connections back at
/// the bound) until one ends.
const MAX_CLOSING_THREADS: usize = 512;

/// Busy threads shared with other users (see [`Uids`]) past which a user
/// does not get a thread for one more set of users: a user who stalls
/// every file it is sent would otherwise take a thread per set of users
/// it shares with. Which of a set's users stalls its closes is not known,
/// so a set gets a thread while any one of its users is under this: a
/// user sharing with a staller is not held up in what it shares with
/// others, and a staller gets more threads only with users it has not
/// stalled four of yet. Idle threads do not count (a thread busy with
/// frees now and then is not stuck, and a set waiting behind idle threads
/// would wait for their lingering to end), but an idle one going busy
/// again is held to the bound as a new one would be.
const MAX_SHARED_THREADS_PER_UID: usize = 4;

/// Closing threads running or lingering.
static THREADS: AtomicUsize = AtomicUsize::new(0);

/// Why a closing thread was not started.
#[derive(Debug, thiserror::Error)]
enum NoThread {
    #[error("each of uids {0} is among {MAX_SHARED_THREADS_PER_UID} busy closing threads shared with other users")]
    SharedBound(Uids),
    #[error("{MAX_CLOSING_THREADS} closing threads already run")]
    Bound,
    #[error("cannot start a closing thread: {0}")]
    Spawn(std::io::Error),
}

/// Whether `key`'s queue may have a busy thread: it is one user's, or one
/// of its users is among fewer busy shared threads (its own not counted)
/// than the bound.
fn may_go_busy(queues: &HashMap<Key, Queue>, key: &Key) -> bool {
    under_the_bound(&busy_shared_counts(queues, Some(key)), key)
}

/// Whether `key`'s queue may go busy with `busy` shared threads by user:
/// it is one user's, or one of its users is among fewer than the bound.
fn under_the_bound(busy: &HashMap<u32, usize>, key: &Key) -> bool {
    !key.0.is_shared()
        || key
            .0
            .as_slice()
            .iter()
            .any(|uid| busy.get(uid).copied().unwrap_or(0) < MAX_SHARED_THREADS_PER_UID)
}

/// Starts the closing thread of `key`'s queue (which must be there),
/// within the bounds.
fn start_thread(closes: &mut Closes, key: &Key) -> Result<(), NoThread> {
    if !may_go_busy(&closes.queues, key) {
        return Err(NoThread::SharedBound(key.0.clone()));
    }
    spawn_thread(closes, key)
}

/// Starts the closing thread of `key`'s queue, within the bound on
/// threads; the caller has checked the shared bound.
fn spawn_thread(closes: &mut Closes, key: &Key) -> Result<(), NoThread> {
    let Some(queue) = closes.queues.get_mut(key) else {
        return Ok(());
    };
    #[cfg(test)]
    if tests::spawn_fails_for(&key.0) {
        return Err(NoThread::Spawn(std::io::Error::from(
            std::io::ErrorKind::WouldBlock,
        )));
    }
    if THREADS.fetch_add(1, Ordering::AcqRel) >= MAX_CLOSING_THREADS {
        THREADS.fetch_sub(1, Ordering::AcqRel);
        return Err(NoThread::Bound);
    }
    let thread_key = key.clone();
    let spawned = std::thread::Builder::new()
        .name("dmabroker-fdclose".into())
        .spawn(move || {
            close_all_of(&thread_key);
            THREADS.fetch_sub(1, Ordering::AcqRel);
            // Its place may be what a waiting queue needs.
            start_stalled_threads();
        });
    if let Err(err) = spawned {
        THREADS.fetch_sub(1, Ordering::AcqRel);
        return Err(NoThread::Spawn(err));
    }
    queue.closing = true;
    queue.waiting = false;
    Ok(())
}

/// Tries again, oldest first, to start the closing threads that could not
/// be started (and to let idle ones held back go busy): their users'
/// parcels wait for one (see [`hand_over`]).
pub fn start_stalled_threads() {
    let mut closes = closes();
    if closes.waiting.is_empty() {
        return;
    }
    let wake = start_waiting(&mut closes);
    drop(closes);
    if wake {
        more().notify_all();
    }
}

/// [`start_stalled_threads`] under the lock: `true` if an idle thread was
/// let go busy and must be woken. The busy shared threads are counted
/// once (a queue in line is not busy), not once per set in line.
fn start_waiting(closes: &mut Closes) -> bool {
    let mut busy = busy_shared_counts(&closes.queues, None);
    let gone_busy = |busy: &mut HashMap<u32, usize>, key: &Key| {
        if key.0.is_shared() {
            for uid in key.0.as_slice() {
                *busy.entry(*uid).or_default() += 1;
            }
        }
    };
    let mut wake = false;
    // Once a spawn fails, none is tried again this time; idle threads
    // further in line may still go busy, needing none.
    let mut can_spawn = true;
    let mut still = VecDeque::new();
    while let Some(key) = closes.waiting.pop_front() {
        let Some(queue) = closes.queues.get_mut(&key) else {
            continue;
        };
        if queue.fds.is_empty() {
            queue.waiting = false;
            continue;
        }
        if !under_the_bound(&busy, &key) {
            // Every user of that set is busy enough: another set may
            // still go.
            still.push_back(key);
            continue;
        }
        if queue.closing {
            // An idle thread held back from going busy.
            queue.waiting = false;
            wake = true;
            gone_busy(&mut busy, &key);
            continue;
        }
        if !can_spawn {
            still.push_back(key);
            continue;
        }
        match spawn_thread(closes, &key) {
            Ok(()) => gone_busy(&mut busy, &key),
            Err(_) => {
                still.push_back(key);
                can_spawn = false;
            }
        }
    }
    still.append(&mut closes.waiting);
    closes.waiting = still;
    wake
}

/// Busy closing threads shared with other users (with a parcel in hand
/// or one they may take), by user, `except` that one's.
fn busy_shared_counts(queues: &HashMap<Key, Queue>, except: Option<&Key>) -> HashMap<u32, usize> {
    let mut counts = HashMap::new();
    for (key, queue) in queues {
        if key.0.is_shared() && is_busy(queue) && Some(key) != except {
            for uid in key.0.as_slice() {
                *counts.entry(*uid).or_default() += 1;
            }
        }
    }
    counts
}

/// A thread with a parcel in hand, or one it may take.
fn is_busy(queue: &Queue) -> bool {
    queue.closing && (queue.in_hand || (!queue.fds.is_empty() && !queue.waiting))
}

/// Wakes closing threads lingering for more (see [`close_all_of`]).
fn more() -> &'static Condvar {
    static MORE: Condvar = Condvar::new();
    &MORE
}

/// How long a closing thread with nothing left waits for more before it
/// ends: frees come in bursts, and a thread is dear to start on the
/// broker's thread.
const LINGER: std::time::Duration = std::time::Duration::from_secs(1);

/// Fds of `uid` waiting to be closed, the one being closed included:
/// those of files it brought in and shared with other users too (see
/// [`release_elsewhere`]).
pub fn pending(uid: u32) -> usize {
    if PENDING.load(Ordering::Acquire) == 0 {
        return 0;
    }
    closes().pending.get(&uid).copied().unwrap_or(0)
}

#[derive(Default)]
struct Queue {
    /// Each with the user it counts for (see [`release_elsewhere`]).
    fds: VecDeque<(u32, Parcel)>,
    /// A thread is closing these fds (or lingering for more).
    closing: bool,
    /// That thread has one in hand.
    in_hand: bool,
    /// In line for a thread (see [`Closes::waiting`]).
    waiting: bool,
    /// Since when the parcel in hand has been dropping (see
    /// [`queues_now`]).
    in_hand_since: Option<std::time::Instant>,
}

#[derive(Default)]
struct Closes {
    queues: HashMap<Key, Queue>,
    /// Parcels waiting or in hand, by the user each counts for (see
    /// [`release_elsewhere`]), whatever queue it is in.
    pending: HashMap<u32, usize>,
    /// Queues with parcels and no thread, oldest first.
    waiting: VecDeque<Key>,
}

fn closes() -> MutexGuard<'static, Closes> {
    static CLOSES: OnceLock<Mutex<Closes>> = OnceLock::new();
    CLOSES
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// The closing thread of `key`: closes its queue, one parcel at a time
/// and never under the lock, until it has been empty for [`LINGER`].
fn close_all_of(key: &Key) {
    loop {
        let next = {
            let mut closes = closes();
            let quiet_until = std::time::Instant::now() + LINGER;
            loop {
                let Some(queue) = closes.queues.get_mut(key) else {
                    return;
                };
                // Not while in line: held back from going busy.
                if !queue.waiting {
                    if let Some(next) = queue.fds.pop_front() {
                        queue.in_hand = true;
                        queue.in_hand_since = Some(std::time::Instant::now());
                        break next;
                    }
                }
                let left = quiet_until.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    if queue.fds.is_empty() {
                        closes.queues.remove(key);
                    } else {
                        // Its parcels stay in line for a thread of their own.
                        queue.closing = false;
                    }
                    return;
                }
                // Woken for any uid's parcels: looks again, until its own
                // time is up.
                closes = more()
                    .wait_timeout(closes, left)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        };
        // A parcel that panics as it drops (none should) must not leave
        // the uid counted as busy for good.
        let (payer, parcel) = next;
        let dropped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(parcel)));
        if dropped.is_err() {
            tracing::error!(uids = %key.0, "closing a client's file panicked");
        }
        let idle_with_others_waiting = {
            let mut closes = closes();
            let Closes {
                queues,
                pending,
                waiting,
            } = &mut *closes;
            if let Some(count) = pending.get_mut(&payer) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    pending.remove(&payer);
                }
            }
            let queue = queues.get_mut(key);
            let idle = queue.is_some_and(|q| {
                q.in_hand = false;
                q.in_hand_since = None;
                q.fds.is_empty()
            });
            idle && key.0.is_shared() && !waiting.is_empty()
        };
        PENDING.fetch_sub(1, Ordering::AcqRel);
        if idle_with_others_waiting {
            // Idle, it no longer counts against its users' shared threads.
            start_stalled_threads();
        }
    }
}

/// One closing queue as [`queues_now`] copied it: what an operator needs
/// to see why a user's clients hang (its closes stuck, its connections
/// held back) without reading the logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloseQueueSnapshot {
    /// The users whose closes these are (see [`Uids`]): sorted, never
    /// empty; more than one for files several users have held.
    pub users: Vec<u32>,
    /// `files` or `sockets` (see [`Lane`]).
    pub lane: &'static str,
    /// Parcels queued, and the one in hand: each counts towards the
    /// [`pending`] of the user who brought its file in.
    pub waiting: usize,
    /// A thread runs the queue (busy, or lingering for more).
    pub has_thread: bool,
    /// It waits in line for a thread, or, its thread idle, for leave to
    /// go busy again (see [`start_stalled_threads`]).
    pub in_line: bool,
    /// Since when the close in hand has been going on; `None` with none
    /// in hand.
    pub in_hand_since: Option<std::time::Instant>,
    /// One of its users has [`MAX_PENDING_PER_UID`] closes waiting or
    /// more: that user's connections are read no further.
    pub held_back: bool,
}

/// Queues [`queues_now`] copies at most: any bus user may ask, and the
/// copy is made under the lock every hand-over takes (and, while any
/// close waits, every read of every connection).
pub const MAX_QUEUES_SHOWN: usize = 1024;

/// The closing queues with closes waiting or one in hand (idle ones,
/// lingering for more, are left out), by users then lane: at most
/// [`MAX_QUEUES_SHOWN`], those in hand the longest first when there are
/// more. One hold of the lock, which copies a few numbers and the users
/// of each such queue and drops nothing under it.
pub fn queues_now() -> Vec<CloseQueueSnapshot> {
    let mut queues: Vec<CloseQueueSnapshot> = {
        let closes = closes();
        let held_back = |uids: &Uids| {
            uids.as_slice()
                .iter()
                .any(|uid| closes.pending.get(uid).copied().unwrap_or(0) >= MAX_PENDING_PER_UID)
        };
        let mut busy: Vec<(&Key, &Queue)> = closes
            .queues
            .iter()
            .filter(|(_, queue)| queue.in_hand || !queue.fds.is_empty())
            .collect();
        if busy.len() > MAX_QUEUES_SHOWN {
            // `None` (nothing in hand) sorts first: put those last.
            busy.sort_unstable_by_key(|(_, queue)| {
                (queue.in_hand_since.is_none(), queue.in_hand_since)
            });
            busy.truncate(MAX_QUEUES_SHOWN);
        }
        busy.into_iter()
            .map(|((uids, lane), queue)| CloseQueueSnapshot {
                users: uids.as_slice().to_vec(),
                lane: match lane {
                    Lane::Files => "files",
                    Lane::Sockets => "sockets",
                },
                waiting: queue.fds.len() + usize::from(queue.in_hand),
                has_thread: queue.closing,
                in_line: queue.waiting,
                in_hand_since: queue.in_hand_since,
                held_back: held_back(uids),
            })
            .collect()
    };
    queues.sort_unstable_by(|a, b| (&a.users, a.lane).cmp(&(&b.users, b.lane)));
    queues
}

/// Closes waiting, every user's, the ones in hand included (each parcel
/// once, however many users it counts for). Read without the lock: a
/// close that just returned may count for a moment yet.
pub fn waiting_now() -> usize {
    PENDING.load(Ordering::Acquire)
}

/// Closing threads running or lingering for more, stuck ones included
/// (at most [`MAX_CLOSING_THREADS`]).
pub fn threads_now() -> usize {
    THREADS.load(Ordering::Acquire)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::kernel::testutil::watched_pipe as pipe;

    fn eventually(what: &str, check: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !check() {
            assert!(std::time::Instant::now() < deadline, "{what}");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// A client's fd dropped unkept is closed, on another thread, and its
    /// uid's count goes back to nothing; a kept one stays open.
    #[test]
    fn an_unkept_client_fd_is_closed_elsewhere_and_a_kept_one_stays() {
        const UID: u32 = 4_000_000_001;
        let (dropped, dropped_closed) = pipe();
        let (refused, refused_closed) = pipe();
        let (kept, kept_closed) = pipe();
        let mut fds = ClientFd::all(vec![dropped, refused, kept], UID);
        let kept = fds.pop().and_then(|fd| fd.keep_if(|_| true)).expect("kept");
        let refused = fds.pop().and_then(|fd| fd.keep_if(|_| false));
        assert!(refused.is_none());
        drop(fds);
        eventually("the refused fd closed", &refused_closed);
        eventually("the dropped fd closed", &dropped_closed);
        eventually("nothing pending", || pending(UID) == 0);
        assert!(!kept_closed(), "a kept fd was closed");
        drop(kept);
        assert!(kept_closed());
    }

    /// Closes of one uid wait behind each other, not behind another uid's.
    #[test]
    fn a_uid_whose_close_waits_holds_up_only_its_own() {
        const STUCK: u32 = 4_000_000_002;
        const OTHER: u32 = 4_000_000_003;
        // Stands for a FUSE file whose FLUSH is never answered.
        let (stuck, release) = stuck_release();
        release_elsewhere(Uids::of(STUCK), STUCK, stuck);
        let (queued, queued_closed) = pipe();
        close_elsewhere(STUCK, vec![queued]);
        let (other, other_closed) = pipe();
        close_elsewhere(OTHER, vec![other]);
        eventually("the other uid's fd closed", &other_closed);
        assert_eq!(pending(STUCK), 2, "both of the stuck uid's fds wait");
        assert!(!queued_closed());
        release.send(()).expect("release");
        eventually("the stuck uid's fds closed", &queued_closed);
        eventually("nothing of the stuck uid's pending", || pending(STUCK) == 0);
    }

    /// Stands for a file whose release waits on a lock a client holds:
    /// its drop waits until the returned sender lets it go.
    struct StuckRelease(std::sync::mpsc::Receiver<()>);

    impl Drop for StuckRelease {
        fn drop(&mut self) {
            let _ = self.0.recv_timeout(std::time::Duration::from_secs(30));
        }
    }

    fn stuck_release() -> (Parcel, std::sync::mpsc::Sender<()>) {
        let (release, stuck) = std::sync::mpsc::channel();
        (Box::new(StuckRelease(stuck)), release)
    }

    /// Stalls a close on the thread of each of `sets`; the senders let
    /// them go.
    fn stall(sets: &[Uids]) -> Vec<std::sync::mpsc::Sender<()>> {
        sets.iter()
            .map(|uids| {
                let (parcel, release) = stuck_release();
                release_elsewhere(uids.clone(), uids.as_slice()[0], parcel);
                release
            })
            .collect()
    }

    fn pair(a: u32, b: u32) -> Uids {
        Uids::of(a).with(&[b])
    }

    /// A user among many stalled threads shared with a staller (or with
    /// several) is not held up in what it shares with anyone else: a set
    /// with one user under the bound gets a thread. Found by review: the
    /// bound charged to every user held up a victim's closes with an
    /// outsider, and a hub's with its fifth consumer.
    #[test]
    fn a_set_with_one_user_under_the_bound_gets_a_thread() {
        const VICTIM: u32 = 4_000_000_030;
        const STALLER: u32 = 4_000_000_031;
        const OUTSIDER: u32 = 4_000_000_032;
        let sets: Vec<Uids> = (0..MAX_SHARED_THREADS_PER_UID as u32)
            .map(|i| pair(VICTIM, STALLER).with(&[STALLER + 100 + i]))
            .collect();
        let releases = stall(&sets);
        let (theirs, theirs_closed) = pipe();
        release_elsewhere(pair(VICTIM, OUTSIDER), VICTIM, Box::new(theirs));
        eventually("the file shared with the outsider closed", &theirs_closed);
        eventually("nothing of the outsider's pending", || {
            pending(OUTSIDER) == 0
        });
        assert_eq!(pending(VICTIM), MAX_SHARED_THREADS_PER_UID);
        drop(releases);
        eventually("nothing of the victim's pending", || pending(VICTIM) == 0);
    }

    /// A set all of whose users are among as many busy shared threads as
    /// they may be waits for a thread (a user who stalls every file it is
    /// sent takes a bounded number of threads with the same users), and
    /// gets one as soon as one of them goes idle; sets of other users go on
    /// meanwhile.
    #[test]
    fn a_set_whose_users_are_all_at_the_bound_waits_until_one_is_not() {
        const S: u32 = 4_000_000_040;
        const X1: u32 = 4_000_000_041;
        const X2: u32 = 4_000_000_042;
        const OTHERS: u32 = 4_000_000_050;
        // S among four; X1 and X2 among four each, one with S.
        let mut sets = vec![
            pair(S, X1),
            pair(S, X2),
            pair(S, OTHERS),
            pair(S, OTHERS + 1),
        ];
        for i in 0..MAX_SHARED_THREADS_PER_UID as u32 - 1 {
            sets.push(pair(X1, OTHERS + 2 + i));
            sets.push(pair(X2, OTHERS + 6 + i));
        }
        let mut releases = stall(&sets);
        let all_three = pair(S, X1).with(&[X2]);
        let (waiting, waiting_closed) = pipe();
        release_elsewhere(all_three, S, Box::new(waiting));
        let (theirs, theirs_closed) = pipe();
        release_elsewhere(
            pair(OTHERS + 20, OTHERS + 21),
            OTHERS + 20,
            Box::new(theirs),
        );
        eventually("the strangers' file closed", &theirs_closed);
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(!waiting_closed(), "a thread for users all at the bound");
        assert_eq!(pending(S), MAX_SHARED_THREADS_PER_UID + 1);
        // S's thread with OTHERS gets through its close and is idle: S is
        // among three busy ones, and the waiting set starts at once.
        drop(releases.remove(2));
        eventually("the waiting set's file closed", &waiting_closed);
        drop(releases);
        for uid in [S, X1, X2] {
            eventually("nothing pending", || pending(uid) == 0);
        }
    }

    /// `s` and `x` each among as many busy shared threads as they may be
    /// (with users from `others` on), and the thread of their own set
    /// idle this moment (it lingers for a second): the senders let the
    /// stalled closes go.
    fn at_the_bound_with_an_idle_thread(
        s: u32,
        x: u32,
        others: u32,
    ) -> Vec<std::sync::mpsc::Sender<()>> {
        let mut own = stall(&[pair(s, x)]);
        let sets: Vec<Uids> = (0..MAX_SHARED_THREADS_PER_UID as u32)
            .flat_map(|i| [pair(s, others + i), pair(x, others + 10 + i)])
            .collect();
        let releases = stall(&sets);
        drop(own.remove(0));
        eventually("their own set's thread idle", || {
            pending(s) == MAX_SHARED_THREADS_PER_UID
        });
        releases
    }

    /// A shared set's thread that went idle, going busy again, is held to
    /// the bound as a new thread would be: a staller could otherwise open
    /// threads with quick closes and stall them all within their linger.
    /// Found by review.
    #[test]
    fn an_idle_shared_thread_going_busy_is_held_to_the_bound() {
        const S: u32 = 4_000_000_070;
        const X: u32 = 4_000_000_071;
        const OTHERS: u32 = 4_000_000_080;
        let mut releases = at_the_bound_with_an_idle_thread(S, X, OTHERS);
        let (later, later_closed) = pipe();
        release_elsewhere(pair(S, X), S, Box::new(later));
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(!later_closed(), "an idle thread went busy past the bound");
        {
            let busy = busy_shared_counts(&closes().queues, None);
            assert_eq!(
                (busy.get(&S).copied(), busy.get(&X).copied()),
                (
                    Some(MAX_SHARED_THREADS_PER_UID),
                    Some(MAX_SHARED_THREADS_PER_UID)
                )
            );
        }
        // One of S's gets through: the set may go busy.
        drop(releases.remove(0));
        eventually("the later close", &later_closed);
        drop(releases);
        for uid in [S, X] {
            eventually("nothing pending", || pending(uid) == 0);
        }
    }

    /// The uid whose threads cannot be spawned, standing for a
    /// `pthread_create` that fails (a uid of the test's own, so that no
    /// other test is touched).
    static SPAWN_FAILS_FOR: Mutex<Option<u32>> = Mutex::new(None);

    pub(super) fn spawn_fails_for(uids: &Uids) -> bool {
        SPAWN_FAILS_FOR
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|uid| uids.contains(uid))
    }

    /// Spawns for `uid` fail until the guard drops. One such test at a time.
    fn failing_spawns_for(uid: u32) -> impl Drop {
        static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
        struct Failing(#[allow(dead_code)] MutexGuard<'static, ()>);
        impl Drop for Failing {
            fn drop(&mut self) {
                *SPAWN_FAILS_FOR.lock().unwrap_or_else(|p| p.into_inner()) = None;
            }
        }
        let turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
        *SPAWN_FAILS_FOR.lock().unwrap_or_else(|p| p.into_inner()) = Some(uid);
        Failing(turn)
    }

    /// A queue refused a thread (no thread could be spawned) is tried again
    /// at the next hand-over to it, not only when some other thread ends.
    /// Found by review.
    #[test]
    fn a_queue_refused_a_thread_is_tried_again_at_its_next_hand_over() {
        const UID: u32 = 4_000_000_090;
        let failing = failing_spawns_for(UID);
        let (first, first_closed) = pipe();
        close_elsewhere(UID, vec![first]);
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!first_closed());
        drop(failing);
        let (second, second_closed) = pipe();
        close_elsewhere(UID, vec![second]);
        eventually("the first fd closed", &first_closed);
        eventually("the second fd closed", &second_closed);
        eventually("nothing pending", || pending(UID) == 0);
    }

    /// An idle shared thread held back for the bound goes busy once it may,
    /// even behind a queue in line whose thread cannot be spawned: it needs
    /// no new thread, and lingering out it would lose the one it has.
    /// Found by review.
    #[test]
    fn a_held_back_idle_thread_goes_busy_behind_a_failed_spawn() {
        const S: u32 = 4_000_000_110;
        const X: u32 = 4_000_000_111;
        const OTHERS: u32 = 4_000_000_120;
        const REFUSED: u32 = 4_000_000_130;
        let mut releases = at_the_bound_with_an_idle_thread(S, X, OTHERS);
        let failing = failing_spawns_for(REFUSED);
        let (refused, refused_closed) = pipe();
        close_elsewhere(REFUSED, vec![refused]);
        let (later, later_closed) = pipe();
        release_elsewhere(pair(S, X), S, Box::new(later));
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!later_closed(), "an idle thread went busy past the bound");
        drop(releases.remove(0));
        eventually("the held-back close", &later_closed);
        assert!(!refused_closed());
        drop(failing);
        start_stalled_threads();
        eventually("the refused uid's close", &refused_closed);
        drop(releases);
        for uid in [S, X, REFUSED] {
            eventually("nothing pending", || pending(uid) == 0);
        }
    }

    fn queue_of(uids: &[u32], lane: &str) -> Option<CloseQueueSnapshot> {
        queues_now()
            .into_iter()
            .find(|q| q.users == uids && q.lane == lane)
    }

    /// The snapshot shows a stuck close: its users, lane, what waits
    /// behind it, its thread and how long it has been in hand; and, once
    /// it returns, nothing waiting.
    #[test]
    fn the_snapshot_shows_a_stuck_close_until_it_returns() {
        const STUCK: u32 = 4_000_000_200;
        let (stuck, release) = stuck_release();
        release_elsewhere(Uids::of(STUCK), STUCK, stuck);
        let (queued, queued_closed) = pipe();
        close_elsewhere(STUCK, vec![queued]);
        eventually("the stuck close in hand", || {
            queue_of(&[STUCK], "files").is_some_and(|q| q.in_hand_since.is_some())
        });
        let queue = queue_of(&[STUCK], "files").expect("the stuck uid's queue");
        assert_eq!(
            (
                queue.waiting,
                queue.has_thread,
                queue.in_line,
                queue.held_back
            ),
            (2, true, false, false),
            "{queue:?}"
        );
        assert!(threads_now() >= 1);
        assert!(waiting_now() >= 2);
        assert!(queue_of(&[STUCK], "sockets").is_none());
        let since = queue.in_hand_since;
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert_eq!(
            queue_of(&[STUCK], "files").and_then(|q| q.in_hand_since),
            since,
            "the same close in hand, since the same moment"
        );
        release.send(()).expect("release");
        eventually("the stuck uid's fds closed", &queued_closed);
        eventually("nothing of the stuck uid's waiting", || {
            queue_of(&[STUCK], "files").is_none_or(|q| q.waiting == 0 && q.in_hand_since.is_none())
        });
    }

    /// A set of users whose closes are stuck, with as many waiting behind
    /// as hold a user back, shows as held back, and so does every other
    /// queue of the user they count for (who brought the files in); the
    /// other user's own queue does not: it is not held back by them.
    #[test]
    fn the_snapshot_says_which_queues_are_held_back() {
        const STUCK: u32 = 4_000_000_210;
        const SHARER: u32 = 4_000_000_211;
        let shared = pair(STUCK, SHARER);
        let releases = stall(std::slice::from_ref(&shared));
        for _ in 1..MAX_PENDING_PER_UID {
            release_elsewhere(shared.clone(), STUCK, Box::new(()));
        }
        // A close of each user's own, stuck too.
        let own_releases = stall(&[Uids::of(STUCK), Uids::of(SHARER)]);
        let in_hand = [&[STUCK, SHARER][..], &[STUCK][..], &[SHARER][..]];
        eventually("the three closes in hand", || {
            in_hand
                .iter()
                .all(|users| queue_of(users, "files").is_some_and(|q| q.in_hand_since.is_some()))
        });
        let queue = queue_of(&[STUCK, SHARER], "files").expect("the shared queue");
        assert_eq!(queue.waiting, MAX_PENDING_PER_UID, "{queue:?}");
        assert!(queue.held_back && queue.has_thread, "{queue:?}");
        let stuck_own = queue_of(&[STUCK], "files").expect("the bringer's own queue");
        assert_eq!(
            (stuck_own.waiting, stuck_own.held_back),
            (1, true),
            "{stuck_own:?}"
        );
        let sharer_own = queue_of(&[SHARER], "files").expect("the sharer's own queue");
        assert_eq!(
            (sharer_own.waiting, sharer_own.held_back),
            (1, false),
            "{sharer_own:?}"
        );
        assert_eq!(pending(SHARER), 1);
        drop(releases);
        drop(own_releases);
        // Idle queues are not shown.
        eventually("nothing shown", || {
            in_hand
                .iter()
                .all(|users| queue_of(users, "files").is_none())
        });
    }
}
