//! The broker: one owner of every buffer, client and fence.
//!
//! All state lives in [`State`] behind one mutex that is never held across
//! an `.await`: connection tasks lock it for the synchronous handling of one
//! message and unlock before they wait again. Work that must wait (timeouts,
//! hold limits, kernel fences) is described as an [`Action`] while locked
//! and spawned as a task after unlocking; those tasks lock again when their
//! event arrives. Everything runs on one tokio thread, so the mutex is only
//! contended by the D-Bus view.

mod access;
mod allocate;
#[cfg(test)]
mod cache_end_tests;
mod endpage;
mod notice;
mod persist;
mod requests;
mod state;
mod waits;
mod words;

use crate::held_files::HeldDup;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};
use waits::{CacheSyncError, OffThread};

use dmabroker_fence::{AccessId, WaiterId};
use dmabroker_ipc::ClientId;

pub use endpage::EndPage;
pub use notice::{Notice, NoticeSender, NOTICE_BACKLOG};
pub(crate) use persist::matches_record;
pub use persist::{RestoreSummary, ORPHAN};
pub use requests::Disposition;
pub use state::{
    AccessEntry, BufferEntry, BufferOrigin, ClientEntry, ClientIdsExhausted, DaemonLimits,
    IdsExhausted, State, Subscriber, UidHeld, MAX_BUFFER_ID, MAX_CLIENT_ID,
};
pub use waits::cache_sync_delay;
pub use words::WordState;
pub use words::WORD_PATROL;

/// Deferred work produced while the state was locked.
#[derive(Debug)]
pub enum Action {
    /// Looks at the words of the buffers someone waits on, every
    /// `words::WORD_PATROL`, for as long as there are any. The patrol's
    /// number (see `State::word_patrol`).
    PatrolWords(u64),
    /// A queued begin (or one waiting for kernel fences) gives up.
    Timeout {
        target: TimeoutTarget,
        after: Duration,
    },
    /// A write access exceeds the client's hold limit.
    HoldLimit { access: AccessId, after: Duration },
    /// Grant once the dma-buf's implicit kernel fences allow this access.
    AwaitImplicit {
        access: AccessId,
        dmabuf: HeldDup,
        write: bool,
    },
    /// A device access was handed over with a sync_file: keep the fence
    /// until it signals.
    AwaitSyncFile {
        access: AccessId,
        sync_file: HeldDup,
    },
    /// Carries out an allocation that may block on a blocking thread, then
    /// admits and answers it (see `allocate`).
    Allocate {
        deferred: allocate::Deferred,
        heaps: Arc<crate::heaps::HeapRegistry>,
        plan: crate::heaps::AllocPlan,
        kernel_name: String,
        running: allocate::Running,
    },
    /// Cache sync START for a CPU grant on a dma-buf, on a blocking thread
    /// (it waits for fences in the kernel); the grant is sent after it.
    /// `buffer`: the access's, for the END it owes should the access go
    /// meanwhile (`State::cache_sync_started`).
    CacheSyncStart {
        access: AccessId,
        buffer: dmabroker_ipc::BufferId,
        dmabuf: HeldDup,
        direction: crate::kernel::dma_buf::SyncDirection,
    },
    /// Cache sync END of a CPU access on a dma-buf, on a blocking thread;
    /// the buffer's next grants wait for it (`State::cache_end_done`).
    CacheSyncEnd {
        buffer: dmabroker_ipc::BufferId,
        end: waits::CacheEnd,
    },
}

#[derive(Clone, Copy, Debug)]
pub enum TimeoutTarget {
    Waiter(WaiterId),
    Access(AccessId),
}

/// What a started action's task is for; the task dies with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TaskOwner {
    Waiter(WaiterId),
    Access(AccessId),
    /// The broker's one word patrol, which stops itself.
    WordPatrol,
    /// An allocation carried out off the broker's thread (its number, see
    /// `ClientEntry::allocating`).
    Allocation {
        client: ClientId,
        number: u64,
    },
}

impl Action {
    /// `None` for a task nothing may stop: a cache sync START or END
    /// holds back the buffer's grants from the moment its access goes
    /// (an END's has gone already) until it reports back, which it must.
    fn owner(&self) -> Option<TaskOwner> {
        Some(match self {
            Action::PatrolWords(_) => TaskOwner::WordPatrol,
            Action::Allocate { deferred, .. } => deferred.owner(),
            Action::Timeout {
                target: TimeoutTarget::Waiter(waiter),
                ..
            } => TaskOwner::Waiter(*waiter),
            Action::Timeout {
                target: TimeoutTarget::Access(access),
                ..
            }
            | Action::HoldLimit { access, .. }
            | Action::AwaitImplicit { access, .. }
            | Action::AwaitSyncFile { access, .. } => TaskOwner::Access(*access),
            Action::CacheSyncStart { .. } | Action::CacheSyncEnd { .. } => return None,
        })
    }
}

/// How long a thread that finds the state locked spins before it sleeps.
/// Nobody holds the lock for longer than a few microseconds (one message,
/// or one chunk of a D-Bus list). A sleeping waiter must be woken through
/// the kernel, and when its CPU has gone idle meanwhile that wake-up costs
/// more than the whole hold: tens of microseconds on a VM whose vCPU
/// halted. Measured by `benches/dbus_load.rs`.
const SPIN_BEFORE_SLEEP: Duration = Duration::from_micros(50);

/// Attempts between two looks at the clock while spinning.
const SPINS_PER_CLOCK_READ: u32 = 32;

#[derive(Debug)]
pub struct Broker {
    state: Mutex<State>,
    /// Threads waiting for the state in [`Broker::lock`] (counted only once
    /// they find it taken): see [`Broker::let_waiters_in`].
    waiting: AtomicUsize,
}

impl Broker {
    pub fn new(state: State) -> Arc<Self> {
        Arc::new(Broker {
            state: Mutex::new(state),
            waiting: AtomicUsize::new(0),
        })
    }

    /// Called between two holds of a long read (the D-Bus view's lists, a
    /// chunk at a time): lets whoever waits for the state have it first,
    /// waiting up to `within` for them to take it. The mutex is not fair:
    /// a thread that unlocks and locks again at once wins against one that
    /// went to sleep waiting, every time, so without this a long list kept
    /// the broker's thread out for the whole list, not one chunk.
    pub fn let_waiters_in(&self, within: Duration) {
        if self.waiting.load(Ordering::Acquire) == 0 {
            return;
        }
        let start = Instant::now();
        while self.waiting.load(Ordering::Acquire) > 0 && start.elapsed() < within {
            std::hint::spin_loop();
            std::thread::yield_now();
        }
    }

    /// Locks the state for reading or for a change whose follow-ups the
    /// caller does not need run (the D-Bus view). Prefer [`Broker::with`].
    pub fn lock(&self) -> MutexGuard<'_, State> {
        // Every state change is completed before the lock is released or a
        // panic is caught at the task boundary; a poisoned lock would only
        // mean a bug already logged, and refusing service forever would be
        // worse than going on.
        if let Some(state) = self.try_lock() {
            return state;
        }
        // Contended: only now is the clock worth reading.
        self.waiting.fetch_add(1, Ordering::AcqRel);
        let state = self.lock_contended();
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        state
    }

    fn lock_contended(&self) -> MutexGuard<'_, State> {
        let start = Instant::now();
        loop {
            for _ in 0..SPINS_PER_CLOCK_READ {
                std::hint::spin_loop();
                if let Some(state) = self.try_lock() {
                    return state;
                }
            }
            if start.elapsed() >= SPIN_BEFORE_SLEEP {
                return self.state.lock().unwrap_or_else(|p| p.into_inner());
            }
        }
    }

    /// The state if nobody holds it (poisoned or not, see [`Broker::lock`]).
    fn try_lock(&self) -> Option<MutexGuard<'_, State>> {
        match self.state.try_lock() {
            Ok(state) => Some(state),
            Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }

    /// Runs `f` on the locked state, then starts whatever it deferred.
    /// The tasks are started before the lock is let go, so that each is
    /// recorded with its owner before anything can remove the owner.
    pub fn with<R>(self: &Arc<Self>, f: impl FnOnce(&mut State) -> R) -> R {
        let mut state = self.lock();
        let result = f(&mut state);
        state.settle_touched();
        for action in state.take_actions() {
            let owner = action.owner();
            let task = self.start(action);
            if let Some(owner) = owner {
                state.adopt_task(owner, task);
            }
        }
        result
    }

    /// Spawns an action's task. Spawning does not run it: it waits for
    /// the state, which the caller holds, before it does anything.
    fn start(self: &Arc<Self>, action: Action) -> tokio::task::AbortHandle {
        let broker = Arc::clone(self);
        let task = match action {
            Action::PatrolWords(patrol) => tokio::spawn(async move {
                loop {
                    tokio::time::sleep(words::WORD_PATROL).await;
                    if !broker.with(|s| s.patrol_words(patrol)) {
                        break;
                    }
                }
            }),
            Action::Allocate {
                deferred,
                heaps,
                plan,
                kernel_name,
                running,
            } => {
                // Begun here, under the lock: tokio's panic for want of
                // a thread is caught where the work is handed over.
                let started = allocate::start(heaps, plan, kernel_name, running);
                tokio::spawn(async move {
                    let result = allocate::finish(started).await;
                    broker.with(|s| s.allocation_done(deferred, result));
                })
            }
            Action::Timeout { target, after } => tokio::spawn(async move {
                tokio::time::sleep(after).await;
                broker.with(|s| s.timed_out(target));
            }),
            Action::HoldLimit { access, after } => tokio::spawn(async move {
                tokio::time::sleep(after).await;
                broker.with(|s| s.hold_limit_exceeded(access));
            }),
            Action::AwaitImplicit {
                access,
                dmabuf,
                write,
            } => tokio::spawn(async move {
                waits::implicit_fences(dmabuf, write).await;
                broker.with(|s| s.implicit_fences_done(access));
            }),
            Action::AwaitSyncFile { access, sync_file } => tokio::spawn(async move {
                waits::sync_file(sync_file).await;
                broker.with(|s| s.kernel_fence_signalled(access));
            }),
            Action::CacheSyncStart {
                access,
                buffer,
                dmabuf,
                direction,
            } => tokio::spawn(async move {
                // Nothing aborts this task: an access gone while START ran
                // still owes its END, which the buffer's grants wait for
                // (`State::cache_sync_started`). START waits for the
                // device in the kernel: never on this
                // thread, so with no thread for it, it fails (logged and
                // counted; the begin is answered Busy, not granted
                // unsynced).
                let started =
                    match waits::off_thread(move || waits::StartedSync::start(dmabuf, direction))
                        .await
                    {
                        OffThread::Done(started) => started.map_err(CacheSyncError::from),
                        OffThread::NoThread(_) => Err(CacheSyncError::NoThread),
                        OffThread::Failed => Err(CacheSyncError::Thread),
                    };
                broker.with(|s| s.cache_sync_started(access, buffer, started));
            }),
            Action::CacheSyncEnd { buffer, end } => tokio::spawn(async move {
                let ended = match waits::off_thread(move || end.run()).await {
                    OffThread::Done(ended) => ended,
                    // The END must happen all the same (the next grant may
                    // be a device's read): here, as it always did.
                    OffThread::NoThread(end) => {
                        tracing::warn!(
                            buffer,
                            "no thread for a cache sync END; it runs on the broker's"
                        );
                        end()
                    }
                    OffThread::Failed => Err(CacheSyncError::Thread),
                };
                broker.with(|s| s.cache_end_done(buffer, ended));
            }),
        };
        task.abort_handle()
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Barrier;

    use super::*;
    use crate::heaps::{HeapConfig, HeapRegistry};

    fn broker() -> Arc<Broker> {
        let heaps = HeapRegistry::discover(&HeapConfig {
            dma_heap_dir: PathBuf::from("/nonexistent"),
            udmabuf_path: PathBuf::from("/nonexistent"),
            order: None,
            enable_memfd: true,
        });
        Broker::new(State::new(
            heaps,
            dmabroker_policy::Policy::builtin(),
            DaemonLimits::default(),
        ))
    }

    /// A waiter gets the lock only once the holder lets go, whether the
    /// hold ends while it spins or after it went to sleep.
    #[test]
    fn the_lock_is_exclusive_while_spinning_and_after_sleeping() {
        for hold in [Duration::from_micros(5), SPIN_BEFORE_SLEEP * 20] {
            let broker = broker();
            let released = Arc::new(AtomicBool::new(false));
            let holding = Arc::new(Barrier::new(2));
            let holder = {
                let (broker, released, holding) = (
                    Arc::clone(&broker),
                    Arc::clone(&released),
                    Arc::clone(&holding),
                );
                std::thread::spawn(move || {
                    let state = broker.lock();
                    holding.wait();
                    std::thread::sleep(hold);
                    released.store(true, Ordering::SeqCst);
                    drop(state);
                })
            };
            holding.wait();
            let state = broker.lock();
            assert!(
                released.load(Ordering::SeqCst),
                "lock taken while held ({hold:?})"
            );
            drop(state);
            holder.join().expect("holder");
        }
    }

    /// A thread between two holds of a long read lets a thread waiting for
    /// the state (asleep by then) have it before it locks again.
    #[test]
    fn a_long_reader_lets_a_waiting_thread_in_between_its_holds() {
        let broker = broker();
        let state = broker.lock();
        let waiter_in = Arc::new(AtomicBool::new(false));
        let waiter = {
            let (broker, waiter_in) = (Arc::clone(&broker), Arc::clone(&waiter_in));
            std::thread::spawn(move || {
                let _state = broker.lock();
                waiter_in.store(true, Ordering::SeqCst);
            })
        };
        // Asleep on the mutex by now, past its spin.
        while broker.waiting.load(Ordering::SeqCst) == 0 {
            std::thread::yield_now();
        }
        std::thread::sleep(SPIN_BEFORE_SLEEP * 4);
        drop(state);
        broker.let_waiters_in(Duration::from_secs(10));
        let again = broker.lock();
        assert!(
            waiter_in.load(Ordering::SeqCst),
            "the reader locked again before the waiter had its turn"
        );
        drop(again);
        waiter.join().expect("waiter");
        assert_eq!(broker.waiting.load(Ordering::SeqCst), 0);
    }

    /// A panic while the state was locked must not stop the broker: the
    /// next lock, uncontended or waited for, still gets the state.
    #[test]
    fn a_poisoned_lock_still_serves() {
        let broker = broker();
        let poisoner = Arc::clone(&broker);
        let _ = std::thread::spawn(move || {
            let _state = poisoner.lock();
            panic!("poison the lock");
        })
        .join();
        assert!(broker.state.is_poisoned());
        assert_eq!(broker.lock().clients.len(), 0);
    }
}
