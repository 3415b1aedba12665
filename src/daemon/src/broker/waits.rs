//! Waiting for kernel fences without blocking the event loop.
//!
//! A dma-buf fd polls readable once its write fences have signalled and
//! writable once all have; a sync_file polls readable once it signals. Both
//! work with epoll, so tokio's reactor waits for them like for a socket.
//! Each wait gets its own dup of the fd: epoll registrations are per open
//! file description + fd number, and the broker's own fd must stay free.

use std::os::fd::AsFd;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use crate::held_files::HeldDup;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::kernel::dma_buf::{self, SyncDirection, SyncPhase};
use crate::kernel::KernelError;

/// How long a wait whose fd epoll did not take waits before it polls the
/// fd again (and, if epoll could not take it for now, asks epoll again).
const REGISTER_RETRY: Duration = Duration::from_millis(100);

async fn until_ready(fd: HeldDup, interest: Interest) {
    until_ready_with(fd, interest, crate::reactor::try_register::<HeldDup>).await;
}

/// Whether the fd polls ready for `interest` now (poll(2), no wait). A
/// failed poll says not yet: the next look asks again.
fn ready_now(fd: &HeldDup, interest: Interest) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let want = if interest.is_writable() {
        PollFlags::POLLOUT
    } else {
        PollFlags::POLLIN
    };
    let mut fds = [PollFd::new(fd.as_fd(), want)];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(n) if n > 0 => fds[0].revents().is_some_and(|r| r.contains(want)),
        _ => false,
    }
}

/// `register`: how the fd is put in the reactor (a test's stand-in can
/// fail it).
///
/// Epoll refusing the fd: `EPERM` (not pollable) counts as signalled;
/// `ENOMEM` and `ENOSPC` (the user's epoll watches used up) may pass, so
/// epoll is asked again every [`REGISTER_RETRY`]; any other error (`EINVAL`,
/// `ELOOP`, the reactor shutting down) will not, and is not asked again.
/// Until epoll takes the fd, it is polled directly at each of those
/// periods, so a fence that signals meanwhile is seen all the same: the
/// fence is never taken as signalled before it is, nor kept for good
/// after.
async fn until_ready_with<R>(mut fd: HeldDup, interest: Interest, mut register: R)
where
    R: FnMut(HeldDup, Interest) -> Result<AsyncFd<HeldDup>, (HeldDup, std::io::Error)>,
{
    let mut warned = false;
    let async_fd = loop {
        match register(fd, interest) {
            Ok(async_fd) => break async_fd,
            // Not pollable at all: nothing the kernel will tell us, so do
            // not hold the buffer hostage.
            Err((_, err)) if err.raw_os_error() == Some(libc::EPERM) => {
                tracing::warn!("fd cannot be polled; treating its fences as signalled");
                return;
            }
            // Pollable, but not now: the fence is still the device's, and
            // taking it as signalled would let the next access in while
            // the device works. Ask again in a while, looking meanwhile.
            Err((back, err)) if matches!(err.raw_os_error(), Some(libc::ENOMEM | libc::ENOSPC)) => {
                if !std::mem::replace(&mut warned, true) {
                    tracing::warn!(error = %err, "cannot watch a kernel fence for now; polling it until epoll can");
                }
                fd = back;
                if ready_now(&fd, interest) {
                    return;
                }
                tokio::time::sleep(REGISTER_RETRY).await;
            }
            // Epoll will not take it, now or later: poll it until it
            // signals.
            Err((back, err)) => {
                tracing::warn!(error = %err, "cannot watch a kernel fence; polling it until it signals");
                while !ready_now(&back, interest) {
                    tokio::time::sleep(REGISTER_RETRY).await;
                }
                return;
            }
        }
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
pub async fn implicit_fences(dmabuf: HeldDup, write: bool) {
    let interest = if write {
        Interest::WRITABLE
    } else {
        Interest::READABLE
    };
    until_ready(dmabuf, interest).await;
}

pub async fn sync_file(fd: HeldDup) {
    until_ready(fd, Interest::READABLE).await;
}

/// A cache sync START that has been issued, to be paired with its END.
///
/// START waits in the kernel for the dma-buf's implicit fences, and a
/// device may add one after the broker last polled, so START runs on a
/// blocking thread, never on the broker's. The access takes the END over
/// with [`StartedSync::keep`]; if the access went while START waited, the
/// END goes to a blocking thread with [`StartedSync::into_end`], and the
/// buffer's grants wait for it. Dropped with neither (its task gone with
/// the runtime), it ENDs where it drops, so every START has its END.
#[derive(Debug)]
pub struct StartedSync {
    dmabuf: Option<HeldDup>,
    direction: SyncDirection,
}

impl StartedSync {
    /// Blocks until the kernel lets the CPU access begin.
    /// (Plus the test hook's [`cache_sync_delay`].)
    pub fn start(dmabuf: HeldDup, direction: SyncDirection) -> Result<StartedSync, KernelError> {
        if let Some(delay) = cache_sync_delay(SyncPhase::Start) {
            std::thread::sleep(delay);
        }
        dma_buf::sync(dmabuf.as_fd(), direction, SyncPhase::Start)?;
        Ok(StartedSync {
            dmabuf: Some(dmabuf),
            direction,
        })
    }

    /// A START taken as done, for tests that drive the broker's state
    /// without its blocking threads (and without a dma-buf).
    #[cfg(test)]
    pub fn assumed(dmabuf: HeldDup, direction: SyncDirection) -> StartedSync {
        StartedSync {
            dmabuf: Some(dmabuf),
            direction,
        }
    }

    /// The access owes the END now (it ENDs with the buffer's own fd).
    pub fn keep(mut self) {
        self.dmabuf = None;
    }

    /// The END owed by a START whose access went while it ran, to be run
    /// off the broker's thread as any other END is (dropped unkept, it
    /// would END wherever it drops: on the broker's thread, once START has
    /// returned).
    pub fn into_end(mut self) -> Option<CacheEnd> {
        let dmabuf = self.dmabuf.take()?;
        Some(CacheEnd::new(dmabuf, self.direction))
    }
}

/// Why a cache sync off the broker's thread did not happen.
#[derive(Debug, thiserror::Error)]
pub enum CacheSyncError {
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error("its blocking thread ended before it was done")]
    Thread,
    #[error("no blocking thread could be had for it")]
    NoThread,
}

/// A cache sync END still to be issued, on a copy of the buffer's fd.
///
/// On a SoC whose devices do not snoop the CPU's caches, END cleans the
/// buffer's lines out of them: time in proportion to the buffer, which on
/// the broker's one thread every client waited for. So it runs on a
/// blocking thread, and the broker holds back the buffer's next grants
/// until it is done (`State::cache_end_done`). The copy keeps the file
/// open meanwhile and is never its last: dropped wherever the END ends,
/// it leaves the last release to the buffer's `HeldFd`.
#[derive(Debug)]
pub struct CacheEnd {
    dmabuf: HeldDup,
    direction: SyncDirection,
}

impl CacheEnd {
    pub fn new(dmabuf: HeldDup, direction: SyncDirection) -> CacheEnd {
        CacheEnd { dmabuf, direction }
    }

    /// Blocks for as long as the kernel's END takes (plus the test hook's
    /// [`cache_sync_delay`]); the copy of the fd goes where it ran.
    pub fn run(self) -> Result<(), CacheSyncError> {
        if let Some(delay) = cache_sync_delay(SyncPhase::End) {
            std::thread::sleep(delay);
        }
        dma_buf::sync(self.dmabuf.as_fd(), self.direction, SyncPhase::End)?;
        Ok(())
    }
}

/// What became of work handed to tokio's blocking pool ([`off_thread`]).
pub enum OffThread<W, T> {
    Done(T),
    /// tokio could have no thread for it: the work, not begun, comes back.
    NoThread(W),
    /// Its thread ended without a result (the work panicked, or the
    /// runtime is shutting down).
    Failed,
}

/// Runs `work` on a blocking thread, exactly once, and gives its result.
///
/// tokio panics when it can start no thread for blocking work, but only
/// after it has queued the work, which a thread may then pick up later
/// (or already has). Whoever finds the work in its slot first does it:
/// the queued job, or the caller, given it back as
/// [`OffThread::NoThread`]. The other finds nothing and does nothing, so
/// no sync is issued twice, and no fd is kept until a job queued in vain
/// runs.
pub async fn off_thread<W, T>(work: W) -> OffThread<W, T>
where
    W: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    begin_off_thread(work).finish().await
}

/// [`off_thread`], with the work handed to the blocking pool now, not when
/// a task first polls: what the work holds (an allocation's place among
/// those running) must go with it at once, whatever becomes of the task
/// that waits for it.
pub fn begin_off_thread<W, T>(work: W) -> Begun<W, T>
where
    W: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    begin_off_thread_with(work, |job| drop(tokio::task::spawn_blocking(job)))
}

/// Work [`begin_off_thread`] handed over, or could not.
pub enum Begun<W, T> {
    Running(tokio::sync::oneshot::Receiver<T>),
    NoThread(W),
}

impl<W, T> Begun<W, T> {
    /// Waits for the work's result (see [`off_thread`]).
    pub async fn finish(self) -> OffThread<W, T> {
        match self {
            Begun::NoThread(work) => OffThread::NoThread(work),
            Begun::Running(result) => match result.await {
                Ok(made) => OffThread::Done(made),
                Err(_) => OffThread::Failed,
            },
        }
    }
}

/// A job as [`off_thread`] hands it to its spawner.
type Job = Box<dyn FnOnce() + Send + 'static>;

/// [`begin_off_thread`] with the spawner given (tests stand in for
/// tokio's).
fn begin_off_thread_with<W, T>(work: W, spawn: impl FnOnce(Job)) -> Begun<W, T>
where
    W: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let slot = Arc::new(Mutex::new(Some(work)));
    let (done, result) = tokio::sync::oneshot::channel();
    let queued = Arc::clone(&slot);
    let job: Job = Box::new(move || {
        let work = queued.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(work) = work {
            // Nobody waiting for it (the runtime going down): what it
            // made drops here, off the broker's thread.
            let _ = done.send(work());
        }
    });
    let spawned = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| spawn(job)));
    if spawned.is_err() {
        let work = slot.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(work) = work {
            return Begun::NoThread(work);
        }
        // A thread took the queued job after all: its result comes.
    }
    Begun::Running(result)
}

/// [`off_thread`] with the spawner given.
#[cfg(test)]
async fn off_thread_with<W, T>(work: W, spawn: impl FnOnce(Job)) -> OffThread<W, T>
where
    W: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    begin_off_thread_with(work, spawn).finish().await
}

impl Drop for StartedSync {
    fn drop(&mut self) {
        if let Some(fd) = self.dmabuf.take() {
            if let Err(err) = dma_buf::sync(fd.as_fd(), self.direction, SyncPhase::End) {
                tracing::warn!(error = %err, "cache sync END for an access that went meanwhile failed");
            }
        }
    }
}

/// The longest [`cache_sync_delay`] a test may ask for: the variables are
/// read in every build, and a value left set must not make a daemon
/// useless.
const MAX_CACHE_SYNC_DELAY: Duration = Duration::from_secs(10);

/// Test-only hooks: `DMABROKER_TEST_CACHE_END_DELAY_MS=N` makes every cache
/// sync END take N ms longer, as the cache clean of a big buffer does on a
/// SoC whose devices do not snoop the CPU's caches;
/// `DMABROKER_TEST_CACHE_START_DELAY_MS=N` does the same to every START
/// run off the broker's thread, as a START waiting in the kernel for a
/// device's fence does. Both at most [`MAX_CACHE_SYNC_DELAY`]. On x86 both
/// syncs are nearly free, so without them a test cannot see who waits for
/// one, or what happens while one runs. Read once; warned about at start,
/// as the other test hooks are, so that a value left set shows in the log.
pub fn cache_sync_delay(phase: SyncPhase) -> Option<Duration> {
    static END: OnceLock<Option<Duration>> = OnceLock::new();
    static START: OnceLock<Option<Duration>> = OnceLock::new();
    let (cell, variable) = match phase {
        SyncPhase::End => (&END, "DMABROKER_TEST_CACHE_END_DELAY_MS"),
        SyncPhase::Start => (&START, "DMABROKER_TEST_CACHE_START_DELAY_MS"),
    };
    *cell.get_or_init(|| {
        let asked = std::env::var(variable).ok()?.parse::<u64>().ok()?;
        let delay = Duration::from_millis(asked).min(MAX_CACHE_SYNC_DELAY);
        tracing::warn!(
            variable,
            asked_ms = asked,
            delay_ms = delay.as_millis() as u64,
            "test hook: every cache sync of this phase is delayed"
        );
        Some(delay)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    /// Work that counts how often it ran.
    fn counted(runs: &Arc<AtomicUsize>) -> impl FnOnce() -> usize + Send + 'static {
        let runs = Arc::clone(runs);
        move || runs.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Work handed back for want of a thread is handed back at once, not
    /// when a task first polls, and what it holds goes when the caller
    /// drops it (an allocation's place among those running), not when a
    /// thread turns up for the queued job, which then does nothing.
    #[test]
    fn work_handed_back_lets_go_of_what_it_holds_when_dropped() {
        let held = Arc::new(());
        let holding = Arc::clone(&held);
        let mut queued = None;
        let begun: Begun<_, ()> = begin_off_thread_with(
            move || {
                let _held = holding;
            },
            |job| {
                queued = Some(job);
                panic!("OS can't spawn worker thread (test)");
            },
        );
        let Begun::NoThread(work) = begun else {
            panic!("the work was not handed back");
        };
        drop(work);
        assert_eq!(
            Arc::strong_count(&held),
            1,
            "the work still holds its place"
        );
        queued.expect("the job was queued")();
        assert_eq!(Arc::strong_count(&held), 1);
    }

    /// tokio queues the job, then panics for want of a thread: the caller
    /// gets the work back to do itself, and the job, run later by a thread
    /// that turns up, does nothing.
    #[test]
    fn work_queued_by_a_spawn_that_panicked_runs_once() {
        let runs = Arc::new(AtomicUsize::new(0));
        let mut queued = None;
        let got = runtime().block_on(off_thread_with(counted(&runs), |job| {
            queued = Some(job);
            panic!("OS can't spawn worker thread (test)");
        }));
        let OffThread::NoThread(work) = got else {
            panic!("the work was not given back");
        };
        assert_eq!(work(), 1);
        (queued.expect("the job was queued"))();
        assert_eq!(runs.load(Ordering::SeqCst), 1, "the work ran twice");
    }

    /// A thread took the queued job before the spawn panicked: its result
    /// is the answer, and the caller does not do the work again.
    #[test]
    fn work_taken_by_a_thread_before_the_spawn_panicked_is_not_done_again() {
        let runs = Arc::new(AtomicUsize::new(0));
        let got = runtime().block_on(off_thread_with(counted(&runs), |job| {
            std::thread::spawn(job).join().expect("the job");
            panic!("OS can't spawn worker thread (test)");
        }));
        assert!(matches!(got, OffThread::Done(1)));
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    /// The usual case: done on one of tokio's blocking threads.
    #[test]
    fn work_runs_on_a_blocking_thread() {
        let got = runtime().block_on(off_thread(|| {
            std::thread::current().name().map(str::to_owned)
        }));
        let OffThread::Done(thread) = got else {
            panic!("not done");
        };
        assert_ne!(thread, std::thread::current().name().map(str::to_owned));
    }

    /// A sync_file that epoll cannot take for now (out of memory, or the
    /// user's watches used up) is still the device's: it was taken as
    /// signalled, and the access queued behind it granted while the device
    /// still worked. Only `EPERM` (a file that cannot be polled) counts as
    /// signalled; `ENOMEM` and `ENOSPC` are tried again until the fd is
    /// watched, and the wait ends when it is ready, not before.
    #[test]
    fn a_fence_epoll_cannot_take_for_now_is_waited_for_all_the_same() {
        let (read, write) = nix::unistd::pipe().expect("pipe");
        let held = Arc::new(crate::held_files::HeldFd::new(
            read,
            crate::held_files::Release::Here,
        ));
        let fd = HeldDup::of(&held).expect("dup");
        let tries = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&tries);
        let register = move |fd: HeldDup, interest: Interest| {
            if counted.fetch_add(1, Ordering::SeqCst) == 0 {
                Err((fd, std::io::Error::from_raw_os_error(libc::ENOMEM)))
            } else {
                crate::reactor::try_register(fd, interest)
            }
        };
        let rt = runtime();
        let waited = rt.block_on(async {
            let wait = tokio::spawn(until_ready_with(fd, Interest::READABLE, register));
            // Long enough for the retry: still waiting, the pipe empty.
            tokio::time::sleep(REGISTER_RETRY * 3).await;
            let still_waiting = !wait.is_finished();
            nix::unistd::write(&write, b"x").expect("write");
            let done = tokio::time::timeout(Duration::from_secs(10), wait).await;
            (still_waiting, done.is_ok())
        });
        assert_eq!(
            waited,
            (true, true),
            "(waiting while unsignalled, done once signalled)"
        );
        assert!(tries.load(Ordering::SeqCst) >= 2, "registered again");
    }

    /// A pipe's read end, empty (unsignalled), as a fence to wait for:
    /// the wait's dup, and the write end that signals it.
    fn unsignalled_fence() -> (HeldDup, std::os::fd::OwnedFd) {
        let (read, write) = nix::unistd::pipe().expect("pipe");
        let held = Arc::new(crate::held_files::HeldFd::new(
            read,
            crate::held_files::Release::Here,
        ));
        (HeldDup::of(&held).expect("dup"), write)
    }

    /// Waits on a fence whose registration always fails with `errno`,
    /// signalled after a few retry periods: whether it was still waiting
    /// before, whether it ended after, and how often it asked epoll.
    fn wait_never_registered(errno: i32) -> (bool, bool, usize) {
        let (fd, write) = unsignalled_fence();
        let tries = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&tries);
        let register = move |fd: HeldDup, _: Interest| {
            counted.fetch_add(1, Ordering::SeqCst);
            Err::<AsyncFd<HeldDup>, _>((fd, std::io::Error::from_raw_os_error(errno)))
        };
        let (still_waiting, done) = runtime().block_on(async {
            let wait = tokio::spawn(until_ready_with(fd, Interest::READABLE, register));
            tokio::time::sleep(REGISTER_RETRY * 3).await;
            let still_waiting = !wait.is_finished();
            nix::unistd::write(&write, b"x").expect("write");
            let done = tokio::time::timeout(Duration::from_secs(10), wait).await;
            (still_waiting, done.is_ok())
        });
        (still_waiting, done, tries.load(Ordering::SeqCst))
    }

    /// A registration epoll refuses for good but for `EPERM` (`EINVAL`,
    /// `ELOOP`, a reactor shutting down) is not asked again: the fence is
    /// polled directly until it signals. Before, it was asked again every
    /// 100 ms forever, and the access stayed fenced for good although its
    /// fence signalled.
    #[test]
    fn a_fence_epoll_refuses_for_good_is_polled_until_it_signals() {
        let (still_waiting, done, tries) = wait_never_registered(libc::EINVAL);
        assert!(still_waiting, "waiting while unsignalled");
        assert!(done, "done once signalled");
        assert_eq!(tries, 1, "not asked again");
    }

    /// A fence epoll cannot take for now (`ENOSPC`), and still cannot when
    /// it signals, is seen signalled meanwhile by polling it directly.
    /// Before, only a registration could end the wait.
    #[test]
    fn a_fence_signalled_while_epoll_cannot_take_it_is_seen() {
        let (still_waiting, done, tries) = wait_never_registered(libc::ENOSPC);
        assert!(still_waiting, "waiting while unsignalled");
        assert!(done, "done once signalled");
        assert!(tries >= 2, "asked again: {tries}");
    }

    /// A file epoll refuses for good (`EPERM`: not pollable) counts as
    /// signalled: nothing would ever tell the daemon otherwise.
    #[test]
    fn a_fence_that_cannot_be_polled_counts_as_signalled() {
        let (read, _write) = nix::unistd::pipe().expect("pipe");
        let held = Arc::new(crate::held_files::HeldFd::new(
            read,
            crate::held_files::Release::Here,
        ));
        let fd = HeldDup::of(&held).expect("dup");
        let register = |fd: HeldDup, _: Interest| {
            Err::<AsyncFd<HeldDup>, _>((fd, std::io::Error::from_raw_os_error(libc::EPERM)))
        };
        let done = runtime().block_on(async {
            tokio::time::timeout(
                Duration::from_secs(10),
                until_ready_with(fd, Interest::READABLE, register),
            )
            .await
        });
        assert!(done.is_ok());
    }

    /// Work that panics on its thread is reported as failed.
    #[test]
    fn work_that_panics_is_reported_failed() {
        let got: OffThread<_, ()> = runtime().block_on(off_thread(|| panic!("test")));
        assert!(matches!(got, OffThread::Failed));
    }
}
