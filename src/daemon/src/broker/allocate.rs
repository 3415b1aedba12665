//! Allocations: checked on the broker's thread, carried out there when
//! they cannot block (a memfd), or on a blocking thread when they may (a
//! dma-heap zeroes every page before it returns, udmabuf pins every page,
//! and a heap node may be anything), then admitted to the table.
//!
//! An allocation carried out elsewhere is answered when it is done. Until
//! then it counts against its client's quota, and against the fd store's
//! slots, as the buffer it will be, so no number of them in flight lets a
//! client past its limits, and the allocations running for every client
//! are bounded too. A client that goes meanwhile has the allocation
//! abandoned: the buffer its thread makes is closed, off the broker's
//! thread if big, and the thread counts until it is done.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use dmabroker_ipc::{BufferId, ClientId, ErrorCode, ReplyBody, WireError};

use super::access::Answer;
use super::requests::{alloc_error, shown_name};
use super::state::{BufferEntry, BufferOrigin, PendingAllocation, State};
use super::{Action, TaskOwner};
use crate::heaps::{AllocError, AllocPlan, Allocation, Backend, HeapRegistry};
use crate::held_files::HeldFd;

/// Allocations one client may have carried out off the broker's thread at
/// once. Each takes a blocking thread for as long as its heap takes; a
/// client asking for more is answered `Busy`, to try again.
pub const MAX_ALLOCATING_PER_CLIENT: usize = 8;

/// Allocations carried out off the broker's thread at once, for every
/// client together, counting those whose clients went before they were
/// done (their threads go on until the heap returns): a client that asks
/// for 8, hangs up and asks again must not take every thread of the pool,
/// nor make heaps zero pages for nobody without bound. One more is
/// answered `Busy`.
pub const MAX_ALLOCATIONS_RUNNING: usize = 16;

/// One allocation on a blocking thread, counted in the broker's
/// `allocations_running` until its thread is done with the heap (or the
/// allocation never started: the count goes with this).
#[derive(Debug)]
pub struct Running(Arc<AtomicUsize>);

impl Running {
    fn start(count: &Arc<AtomicUsize>) -> Running {
        count.fetch_add(1, Ordering::AcqRel);
        Running(Arc::clone(count))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A buffer made on a blocking thread and not yet taken into the table.
/// Whoever drops it unclaimed (an allocation abandoned with its client:
/// tokio drops a finished task's output wherever its handle goes, the
/// broker's thread included) closes it like any freed buffer, a big one
/// on the closer's thread.
#[derive(Debug)]
pub struct Unclaimed(Option<Allocation>);

impl Unclaimed {
    fn claim(mut self) -> Option<Allocation> {
        self.0.take()
    }
}

impl Drop for Unclaimed {
    fn drop(&mut self) {
        if let Some(allocation) = self.0.take() {
            close_unadmitted(allocation);
        }
    }
}

/// An allocation request as it arrived.
#[derive(Debug, Clone, Copy)]
pub(super) struct Asked<'a> {
    pub request_id: u64,
    /// The client wants an answer (it always does, but for a request sent
    /// with `FLAG_NO_REPLY`).
    pub reply: bool,
    pub size: u64,
    pub heap: Option<&'a str>,
    pub name: Option<&'a str>,
}

/// An allocation being carried out on a blocking thread: what its answer
/// needs once it is done.
#[derive(Debug)]
pub struct Deferred {
    client: ClientId,
    number: u64,
    request_id: u64,
    reply: bool,
    label: String,
}

impl Deferred {
    pub(super) fn owner(&self) -> TaskOwner {
        TaskOwner::Allocation {
            client: self.client,
            number: self.number,
        }
    }
}

/// An allocation handed to a blocking thread ([`start`]).
pub(super) type Started = super::waits::Begun<Box<dyn FnOnce() -> Carried + Send>, Carried>;

/// What carrying out an allocation made.
type Carried = Result<Unclaimed, AllocError>;

/// Starts carrying out `plan` on a blocking thread, at once (not from a
/// task that may be aborted before it runs: `running` must go with the
/// thread). It waits first for the closes queued before it, so that pages
/// a client freed just before are back when the heap is asked. With no
/// thread to be had, the work comes back undone ([`finish`] drops it,
/// and `running` with it): tokio queues it before it says so, and run
/// later by a thread that turns up, it would allocate for nobody, holding
/// its place among the allocations running until then.
pub(super) fn start(
    heaps: Arc<HeapRegistry>,
    plan: AllocPlan,
    kernel_name: String,
    running: Running,
) -> Started {
    let work: Box<dyn FnOnce() -> Carried + Send> = Box::new(move || {
        let _running = running;
        crate::closer::wait_for_earlier_closes();
        heaps
            .carry_out(plan, &kernel_name)
            .map(|made| Unclaimed(Some(made)))
    });
    super::waits::begin_off_thread(work)
}

/// The outcome of a started allocation.
pub(super) async fn finish(started: Started) -> Result<Unclaimed, WireError> {
    match started.finish().await {
        super::waits::OffThread::Done(done) => done.map_err(alloc_error),
        super::waits::OffThread::NoThread(undone) => {
            drop(undone);
            tracing::error!("no thread to carry out an allocation on");
            Err(WireError::new(
                ErrorCode::Busy,
                "the daemon has no thread to carry out the allocation on: try again",
            ))
        }
        super::waits::OffThread::Failed => {
            tracing::error!("allocation thread failed");
            Err(WireError::new(
                ErrorCode::Internal,
                "the allocation failed in the daemon: its thread ended without a result",
            ))
        }
    }
}

impl State {
    pub(super) fn alloc(
        &mut self,
        client: ClientId,
        asked: Asked<'_>,
    ) -> Result<Answer, WireError> {
        let Asked {
            request_id,
            reply,
            size,
            heap,
            name,
        } = asked;
        if size == 0 {
            return Err(WireError::new(
                ErrorCode::InvalidArgument,
                "size must not be 0",
            ));
        }
        // Rounded to the kernel's page size, as the heaps round it (16 or
        // 64 KiB pages on some arm64 kernels): the quota check must see the
        // size that will be charged.
        let rounded = crate::kernel::page_round(size).ok_or_else(|| {
            WireError::new(ErrorCode::InvalidArgument, format!("size {size} is absurd"))
        })?;
        let entry = self
            .clients
            .get(&client)
            .ok_or_else(|| WireError::new(ErrorCode::Internal, "unknown client"))?;
        let allowed = entry.resolved.limits.heaps.clone();
        if let (Some(requested), Some(allowed)) = (heap, &allowed) {
            if !allowed.iter().any(|h| h == requested) {
                return Err(WireError::new(
                    ErrorCode::PermissionDenied,
                    format!(
                        "rule '{}': heap '{requested}' is not allowed (allowed: {})",
                        entry.resolved.rule,
                        allowed.join(", ")
                    ),
                ));
            }
        }
        let pid = entry.peer.pid;
        let allocating = entry.allocating.len();
        self.check_quota(client, rounded, true, None)?;
        self.check_store_slot()?;
        let mut plan = self
            .heaps
            .plan(heap, allowed.as_deref(), rounded)
            .map_err(alloc_error)?;
        let label = name.filter(|n| !n.is_empty()).unwrap_or("buffer");
        let kernel_name = kernel_name(label, pid);
        if let Some(done) = self.heaps.carry_out_in_place(&mut plan, &kernel_name) {
            let allocation = done.map_err(alloc_error)?;
            return self.admit_allocation(client, allocation, label);
        }
        // The heaps left may block: on a thread of the blocking pool.
        if allocating >= MAX_ALLOCATING_PER_CLIENT {
            return Err(WireError::new(
                ErrorCode::Busy,
                format!(
                    "{allocating} allocations of yours are still being carried out \
                     (at most {MAX_ALLOCATING_PER_CLIENT}): try again when one is answered"
                ),
            ));
        }
        let running = self.allocations_running.load(Ordering::Acquire);
        if running >= MAX_ALLOCATIONS_RUNNING {
            return Err(WireError::new(
                ErrorCode::Busy,
                format!(
                    "the daemon is carrying out {running} allocations from device heaps \
                     (at most {MAX_ALLOCATIONS_RUNNING}): try again"
                ),
            ));
        }
        self.allocations_started += 1;
        let number = self.allocations_started;
        let pending = PendingAllocation {
            number,
            size: plan.size(),
            name: shown_name(label),
            heap: plan.heap_in_try(),
            since: std::time::Instant::now(),
        };
        if let Some(c) = self.clients.get_mut(&client) {
            c.allocating.push(pending);
            let uid = c.peer.accountable_uid;
            self.uid_allocations(uid, 1, 0);
        }
        self.allocations_in_flight += 1;
        self.defer(Action::Allocate {
            deferred: Deferred {
                client,
                number,
                request_id,
                reply,
                label: label.to_owned(),
            },
            heaps: Arc::clone(&self.heaps),
            plan,
            kernel_name,
            running: Running::start(&self.allocations_running),
        });
        Ok(Answer::Deferred)
    }

    /// An allocation carried out on a blocking thread is done: admitted
    /// and answered, unless its client has gone, or the daemon is stopping
    /// (its last record of the table is being written): then it is closed
    /// and not answered, as no request is while the daemon stops, so that
    /// the client library asks the next daemon.
    pub(super) fn allocation_done(
        &mut self,
        deferred: Deferred,
        result: Result<Unclaimed, WireError>,
    ) {
        // Done: nothing left to abort.
        self.tasks_done(deferred.owner());
        let Deferred {
            client,
            number,
            request_id,
            reply,
            label,
        } = deferred;
        let was_pending = self.clients.get_mut(&client).and_then(|c| {
            let at = c.allocating.iter().position(|a| a.number == number)?;
            c.allocating.remove(at);
            Some(c.peer.accountable_uid)
        });
        let Some(uid) = was_pending else {
            // Its client went, and `disconnect` counted it out; an
            // unclaimed buffer closes itself.
            return;
        };
        self.uid_allocations(uid, 0, 1);
        self.allocations_in_flight = self.allocations_in_flight.saturating_sub(1);
        if self.stopping {
            return;
        }
        let answer = match result.map(Unclaimed::claim) {
            Ok(Some(allocation)) => self.admit_allocation(client, allocation, &label),
            Ok(None) => Err(WireError::new(
                ErrorCode::Internal,
                "the allocation was lost in the daemon",
            )),
            Err(err) => Err(err),
        };
        match answer {
            Ok(Answer::Reply(body, fds)) if reply => {
                self.reply(client, request_id, Ok(body), fds);
            }
            Ok(_) => {}
            Err(err) => self.reply(client, request_id, Err(err), Vec::new()),
        }
    }

    /// Takes a new buffer into the table, held by and charged to `client`
    /// (whose quota was checked when it asked). With no id left for it
    /// (see `State::allocate_buffer_id`), the buffer is let go of and the
    /// client told why.
    fn admit_allocation(
        &mut self,
        client: ClientId,
        allocation: Allocation,
        label: &str,
    ) -> Result<Answer, WireError> {
        let id = match self.allocate_buffer_id() {
            Ok(id) => id,
            Err(err) => {
                tracing::error!(error = %err, "an allocation is refused");
                close_unadmitted(allocation);
                return Err(err.into());
            }
        };
        let origin = BufferOrigin::Allocated(allocation.backend);
        let uid = self
            .clients
            .get(&client)
            .map_or(0, |c| c.peer.accountable_uid);
        let release = origin.release(allocation.size, uid);
        let fd = Arc::new(HeldFd::new(allocation.fd, release));
        self.buffers.insert(
            id,
            BufferEntry {
                id,
                fd: Arc::clone(&fd),
                size: allocation.size,
                heap: allocation.heap,
                origin,
                name: shown_name(label),
                inode: allocation.inode,
                owner: client,
                holders: Vec::new(),
                created: SystemTime::now(),
                word: (allocation.backend == Backend::Memfd).then(Box::<super::WordState>::default),
            },
        );
        self.arbiter.add_buffer(id);
        if let Some(c) = self.clients.get_mut(&client) {
            c.charged_bytes += allocation.size;
        }
        let secret = self.add_holder(id, client);
        self.store_buffer(id);
        self.stats.allocations += 1;
        self.notice_allocated(id, client);
        Ok(Answer::Reply(
            ReplyBody::Buffer(self.buffer_info(id, secret)),
            vec![fd],
        ))
    }

    /// Tells observers of a new buffer in the table (an allocated or an
    /// adopted one).
    pub(super) fn notice_allocated(&self, buffer: BufferId, owner: ClientId) {
        if let Some(b) = self.buffers.get(&buffer) {
            self.notice(super::Notice::BufferAllocated {
                buffer,
                size: b.size,
                heap: b.heap.clone(),
                owner,
            });
        }
    }

    /// Allocations being carried out off the broker's thread for clients
    /// still here, each counted against its client's quota (the debug
    /// views).
    pub fn allocations_in_flight(&self) -> usize {
        self.allocations_in_flight
    }

    /// Threads carrying out allocations, those of clients gone included:
    /// past [`MAX_ALLOCATIONS_RUNNING`] an allocation that may block is
    /// refused `Busy` (the debug views).
    pub fn allocations_running(&self) -> usize {
        self.allocations_running.load(Ordering::Acquire)
    }

    /// Forgets `client`'s allocations still being carried out (it is
    /// going): their tasks are aborted, and what their threads make is
    /// closed there.
    pub(super) fn abandon_allocations(&mut self, client: ClientId) {
        let (pending, uid) = self
            .clients
            .get_mut(&client)
            .map(|c| (std::mem::take(&mut c.allocating), c.peer.accountable_uid))
            .unwrap_or_default();
        self.allocations_in_flight = self.allocations_in_flight.saturating_sub(pending.len());
        if !pending.is_empty() {
            self.uid_allocations(uid, 0, pending.len());
        }
        for allocation in pending {
            self.abort_tasks(TaskOwner::Allocation {
                client,
                number: allocation.number,
            });
        }
    }
}

/// A buffer made for nobody: closed off the broker's thread if big.
fn close_unadmitted(allocation: Allocation) {
    let size = allocation.size;
    crate::closer::close_buffer(allocation.fd, size);
}

/// The name a buffer gets in the kernel (see docs/heaps.md, "Naming"):
/// `label:pid`, at most [`dma_buf::MAX_NAME_LEN`] bytes on every backend,
/// the label cut (at a character boundary) so that the pid always shows,
/// and shown as names are in the views (control characters as U+FFFD).
/// An operator reading `/proc/PID/fdinfo` or debugfs finds who owns the
/// memory by it: cut from the end, a 31-byte label left no pid, or
/// showed one of its own, and a newline in it wrote lines of the
/// client's choosing (`exp_name:`, `size:`) into what the kernel prints.
pub(crate) fn kernel_name(label: &str, pid: i32) -> String {
    let suffix = format!(":{pid}");
    let room = crate::kernel::dma_buf::MAX_NAME_LEN.saturating_sub(suffix.len());
    let mut name = String::with_capacity(crate::kernel::dma_buf::MAX_NAME_LEN);
    for c in label.chars().map(crate::text::shown_char) {
        if name.len() + c.len_utf8() > room {
            break;
        }
        name.push(c);
    }
    name.push_str(&suffix);
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pid survives any label, and nothing the client put in the
    /// label can start a line of its own in what the kernel prints.
    #[test]
    fn a_kernel_name_keeps_its_pid_and_no_control_characters() {
        let padded = format!("gnome-shell:1742{}", " ".repeat(40));
        let name = kernel_name(&padded, 4242);
        assert!(name.ends_with(":4242"), "{name:?}");
        assert!(
            name.len() <= crate::kernel::dma_buf::MAX_NAME_LEN,
            "{name:?}"
        );
        let forged = kernel_name("x\nexp_name:\tsystem\nsize:\t1", 7);
        assert!(
            !forged.contains('\n') && !forged.contains('\t'),
            "{forged:?}"
        );
        assert!(forged.ends_with(":7"));
        assert_eq!(kernel_name("camera", 12), "camera:12");
        // Cut at a character boundary: four bytes a character.
        let wide = kernel_name(&"\u{1f4f7}".repeat(10), 123);
        assert_eq!(wide, format!("{}:123", "\u{1f4f7}".repeat(6)));
    }
}
