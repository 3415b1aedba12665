//! The broker's state machine around a cache sync END that runs off its
//! thread: which grants wait for it, and that nothing it holds back is
//! lost or kept for good.
//!
//! `State` is driven directly, as a connection task drives it, with
//! clients on socketpairs. The dma-buf is a memfd registered as adopted:
//! the broker then treats it as a dma-buf (its implicit fences poll as
//! signalled), and the blocking threads' work, which the test never
//! starts, is reported back by hand: a START as done
//! ([`StartedSync::assumed`]), an END as done or failed.

use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use dmabroker_fence::AccessId;
use dmabroker_ipc::codec::decode_server_message;
use dmabroker_ipc::fdpass::{recv_message, RecvError};
use dmabroker_ipc::{Access, BufferId, ClientId, ErrorCode, ReplyBody, ServerMessage};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

use super::access::Answer;
use super::state::{BufferEntry, BufferOrigin, DaemonLimits, Holder, State};
use super::waits::{CacheSyncError, StartedSync};
use super::{Action, TimeoutTarget};
use crate::heaps::{Backend, HeapConfig, HeapRegistry};
use crate::held_files::HeldFd;
use crate::kernel::KernelError;
use crate::outbox::Outbox;

/// A broker with clients on socketpairs, inside a runtime (the outboxes'
/// sockets are registered with its reactor). Also the bench of the buffer
/// words' tests (`words.rs`).
pub(super) struct Bench {
    pub(super) state: State,
    /// Our ends of the clients' sockets, by client id.
    sockets: Vec<(ClientId, OwnedFd)>,
    next_request: u64,
    pub(super) _runtime: tokio::runtime::Runtime,
}

impl Bench {
    /// Puts the policy `text` in force, as a reload does.
    pub(super) fn use_policy(&mut self, text: &str) {
        let policy = dmabroker_policy::Policy::parse_str(text, std::path::Path::new("test.toml"))
            .expect("policy");
        self.state.replace_policy(policy);
    }

    pub(super) fn new() -> Bench {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let heaps = HeapRegistry::discover(&HeapConfig {
            dma_heap_dir: PathBuf::from("/nonexistent"),
            udmabuf_path: PathBuf::from("/nonexistent"),
            order: None,
            enable_memfd: true,
        });
        let state = State::new(
            heaps,
            dmabroker_policy::Policy::builtin(),
            DaemonLimits::default(),
        );
        Bench {
            state,
            sockets: Vec::new(),
            next_request: 1,
            _runtime: runtime,
        }
    }

    pub(super) fn client(&mut self) -> ClientId {
        let _entered = self._runtime.enter();
        let flags = SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK;
        let (ours, theirs) =
            socketpair(AddressFamily::Unix, SockType::SeqPacket, None, flags).expect("socketpair");
        let peer = crate::identity::peer_of(theirs.as_fd()).expect("peer of a socketpair");
        let interest = tokio::io::Interest::READABLE | tokio::io::Interest::WRITABLE;
        let socket = Arc::new(crate::reactor::register(theirs, interest).expect("register"));
        let id = self
            .state
            .connect(peer, Arc::new(Outbox::new(socket, 256)))
            .expect("a client id");
        // Requests by message (a free) need no hello here.
        if let Some(entry) = self.state.clients.get_mut(&id) {
            entry.hello_done = true;
        }
        self.sockets.push((id, ours));
        id
    }

    /// A buffer held by `holders` (the first owns it): a dma-buf to the
    /// broker when `dma_buf`, else a plain memfd buffer.
    /// Two clients, and a dma-buf both hold.
    fn two_sharing_a_dma_buf(&mut self) -> (ClientId, ClientId, BufferId) {
        let (first, second) = (self.client(), self.client());
        let frame = self.buffer(&[first, second], true);
        (first, second, frame)
    }

    pub(super) fn buffer(&mut self, holders: &[ClientId], dma_buf: bool) -> BufferId {
        let fd = nix::sys::memfd::memfd_create(
            c"cache-end-test",
            nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
        )
        .expect("memfd");
        nix::unistd::ftruncate(&fd, 4096).expect("ftruncate");
        let id = self.state.allocate_buffer_id().expect("an id");
        let origin = if dma_buf {
            BufferOrigin::Adopted
        } else {
            BufferOrigin::Allocated(Backend::Memfd)
        };
        self.state.buffers.insert(
            id,
            BufferEntry {
                id,
                fd: Arc::new(HeldFd::from(fd)),
                size: 4096,
                heap: "test".into(),
                origin,
                name: "test".into(),
                inode: 0,
                owner: holders[0],
                holders: Vec::<Holder>::new(),
                created: SystemTime::now(),
                word: None,
            },
        );
        self.state.arbiter.add_buffer(id);
        for client in holders {
            self.state.add_holder(id, *client);
        }
        id
    }

    /// A memfd buffer held by `holders` with its word page, as the broker
    /// allocates one (mapped at the first begin that may use it).
    pub(super) fn buffer_with_word(&mut self, holders: &[ClientId]) -> BufferId {
        let id = self.buffer(holders, false);
        let entry = self.state.buffers.get_mut(&id).expect("the buffer");
        let size = entry.size + dmabroker_ipc::bufferword::WORD_PAGE;
        nix::unistd::ftruncate(entry.fd.as_fd(), size as i64).expect("ftruncate");
        entry.word = Some(Box::default());
        id
    }

    /// Makes `buffer`'s fd one let go of on `uid`'s closing thread, as a
    /// dma-buf allocated for a client of `uid` is.
    fn release_on_thread_of(&mut self, buffer: BufferId, uid: u32) {
        let entry = self.state.buffers.get_mut(&buffer).expect("the buffer");
        let fd = entry.fd.as_fd().try_clone_to_owned().expect("dup");
        entry.fd = Arc::new(HeldFd::new(
            fd,
            crate::held_files::Release::OnThreadOf { uid, buffer: true },
        ));
    }

    pub(super) fn begin(&mut self, client: ClientId, buffer: BufferId, access: Access) -> u64 {
        self.begin_within(client, buffer, access, None)
    }

    /// Sends a begin; returns its request id.
    pub(super) fn begin_within(
        &mut self,
        client: ClientId,
        buffer: BufferId,
        access: Access,
        timeout_ms: Option<u32>,
    ) -> u64 {
        let request = self.next_request;
        self.next_request += 1;
        let _entered = self._runtime.enter();
        match self
            .state
            .begin(client, request, buffer, access, timeout_ms)
        {
            Ok(Answer::Deferred) => {}
            Ok(Answer::Reply(body, _)) => panic!("a begin answered in place: {body:?}"),
            Err(err) => panic!("begin refused: {err:?}"),
        }
        request
    }

    /// Ends `access` by message, as its client's guard does.
    pub(super) fn end(&mut self, client: ClientId, access: AccessId) {
        let _entered = self._runtime.enter();
        self.state.end(client, access, None).expect("end");
    }

    /// The deferred actions, with the START of each CPU grant on a dma-buf
    /// reported back as done (the grant then goes out); returns the
    /// buffers whose ENDs were asked for.
    fn run_starts(&mut self) -> Vec<BufferId> {
        let _entered = self._runtime.enter();
        let mut ends = Vec::new();
        for action in self.state.take_actions() {
            match action {
                Action::CacheSyncStart {
                    access,
                    buffer,
                    dmabuf,
                    direction,
                } => {
                    let started = StartedSync::assumed(dmabuf, direction);
                    self.state.cache_sync_started(access, buffer, Ok(started));
                }
                Action::CacheSyncEnd { buffer, .. } => ends.push(buffer),
                _ => {}
            }
        }
        ends
    }

    /// A START taken out of the actions while it ran (`start_in_flight`)
    /// returns, done.
    fn start_returns(&mut self, start: Action) {
        let Action::CacheSyncStart {
            access,
            buffer,
            dmabuf,
            direction,
        } = start
        else {
            panic!("not a START: {start:?}")
        };
        let _entered = self._runtime.enter();
        let started = StartedSync::assumed(dmabuf, direction);
        self.state.cache_sync_started(access, buffer, Ok(started));
    }

    /// An END of `buffer` returns, done or failed.
    fn end_done(&mut self, buffer: BufferId, ended: Result<(), CacheSyncError>) {
        let _entered = self._runtime.enter();
        self.state.cache_end_done(buffer, ended);
    }

    /// Every message `client` has been sent since the last look (until
    /// the broker let it go).
    pub(super) fn received(&self, client: ClientId) -> Vec<ServerMessage> {
        let (_, socket) = self
            .sockets
            .iter()
            .find(|(id, _)| *id == client)
            .expect("a client of the bench");
        let mut messages = Vec::new();
        loop {
            match recv_message(socket.as_fd(), true) {
                Ok(got) => messages.push(decode_server_message(&got.bytes).expect("decode")),
                Err(RecvError::Os(nix::errno::Errno::EAGAIN)) => return messages,
                // A client the broker let go (a hang-up): all it was sent.
                Err(RecvError::Closed) => return messages,
                Err(err) => panic!("reading a client's messages: {err:?}"),
            }
        }
    }

    /// Every reply `client` has been sent since the last look: request id
    /// and what it says.
    pub(super) fn replies(&self, client: ClientId) -> Vec<(u64, Result<ReplyBody, ErrorCode>)> {
        self.received(client)
            .into_iter()
            .filter_map(|message| match message {
                ServerMessage::Reply(reply) => Some((reply.id, reply.result.map_err(|e| e.code))),
                ServerMessage::Event(_) => None,
            })
            .collect()
    }

    /// The access `client`'s begin `request` was granted (sent or not).
    pub(super) fn access_of(&self, client: ClientId, request: u64) -> AccessId {
        *self
            .state
            .accesses
            .iter()
            .find(|(_, a)| a.client == client && a.request_id == request)
            .expect("the begin's access")
            .0
    }

    /// Whether `client` was sent the grant of its begin `request`.
    pub(super) fn granted(&self, client: ClientId, request: u64) -> bool {
        self.replies(client)
            .iter()
            .any(|(id, r)| *id == request && matches!(r, Ok(ReplyBody::Granted(_))))
    }

    /// Whether the grant `client` was sent for its begin `request` said
    /// `writer_lost`; `None` if it was sent none.
    pub(super) fn told_writer_lost(&self, client: ClientId, request: u64) -> Option<bool> {
        self.replies(client)
            .iter()
            .find_map(|(id, reply)| match reply {
                Ok(ReplyBody::Granted(grant)) if *id == request => Some(grant.writer_lost),
                _ => None,
            })
    }

    /// A write by `writer`, granted, then ended: its END is running.
    fn write_then_end(&mut self, writer: ClientId, buffer: BufferId) {
        let write = self.begin(writer, buffer, Access::CpuWrite);
        assert!(self.run_starts().is_empty());
        assert!(self.granted(writer, write), "the write is granted");
        let access = self.access_of(writer, write);
        self.end(writer, access);
    }
}

fn failed_end() -> Result<(), CacheSyncError> {
    Err(CacheSyncError::Kernel(KernelError::Sys {
        op: "DMA_BUF_IOCTL_SYNC",
        target: "test".into(),
        errno: nix::errno::Errno::EIO,
    }))
}

/// A reader queued behind a writer is granted by the writer's end, but its
/// START and its reply wait for the writer's END; other buffers and
/// clients are not held back meanwhile.
#[test]
fn a_grant_waits_for_the_cache_end_of_its_buffer_only() {
    let mut bench = Bench::new();
    let (writer, reader, other) = (bench.client(), bench.client(), bench.client());
    let frame = bench.buffer(&[writer, reader], true);
    let elsewhere = bench.buffer(&[other], true);
    let write = bench.begin(writer, frame, Access::CpuWrite);
    assert!(bench.run_starts().is_empty());
    assert!(bench.granted(writer, write));
    let read = bench.begin(reader, frame, Access::CpuRead);
    bench.end(writer, bench.access_of(writer, write));
    assert_eq!(bench.run_starts(), vec![frame], "one END, no START yet");
    assert!(
        !bench.granted(reader, read),
        "granted before the END was done"
    );

    let unrelated = bench.begin(other, elsewhere, Access::CpuWrite);
    bench.run_starts();
    assert!(
        bench.granted(other, unrelated),
        "another buffer waits for nothing"
    );

    let syncs = bench.state.stats.cache_syncs;

    bench.end_done(frame, Ok(()));
    assert_eq!(
        bench.state.stats.cache_syncs,
        syncs + 1,
        "the END counts once done"
    );
    assert!(bench.state.cache_ends.is_empty());
    assert!(bench.run_starts().is_empty());
    assert!(bench.granted(reader, read), "granted once the END is done");
}

/// Two ENDs of one buffer running: a grant waits for both.
#[test]
fn a_grant_waits_for_every_cache_end_of_its_buffer() {
    let mut bench = Bench::new();
    let (first, second, writer) = (bench.client(), bench.client(), bench.client());
    let frame = bench.buffer(&[first, second, writer], true);
    let reads = [
        bench.begin(first, frame, Access::CpuRead),
        bench.begin(second, frame, Access::CpuRead),
    ];
    bench.run_starts();
    let write = bench.begin(writer, frame, Access::CpuWrite);
    bench.end(first, bench.access_of(first, reads[0]));
    bench.end(second, bench.access_of(second, reads[1]));
    assert_eq!(bench.run_starts(), vec![frame, frame]);
    bench.end_done(frame, Ok(()));
    assert!(bench.run_starts().is_empty());
    assert!(
        !bench.granted(writer, write),
        "granted with an END still running"
    );
    bench.end_done(frame, Ok(()));
    bench.run_starts();
    assert!(bench.granted(writer, write));
}

/// Grants that owe no cache sync through the daemon wait all the same: a
/// device read (a device must not read lines still dirty in the CPU's
/// caches) and a no-autofence client's read, granted at once by the
/// arbiter, whose client issues its own START before it reads (a START
/// that overtook the END's clean could drop the writer's lines on a
/// machine that does not snoop). The one wait a no-autofence grant has
/// (fences.md rule 3).
#[test]
fn device_and_no_autofence_grants_wait_for_the_cache_end_too() {
    let mut bench = Bench::new();
    let (writer, device, manual) = (bench.client(), bench.client(), bench.client());
    if let Some(entry) = bench.state.clients.get_mut(&manual) {
        entry.autofence = false;
    }
    let frame = bench.buffer(&[writer, device, manual], true);
    bench.write_then_end(writer, frame);
    let scan = bench.begin(device, frame, Access::DeviceRead);
    let peek = bench.begin(manual, frame, Access::CpuRead);
    bench.run_starts();
    assert!(!bench.granted(device, scan), "a device read before the END");
    assert!(
        !bench.granted(manual, peek),
        "a no-autofence read before the END"
    );
    bench.end_done(frame, Ok(()));
    bench.run_starts();
    assert!(bench.granted(device, scan));
    assert!(bench.granted(manual, peek));
}

/// A failed END is counted and logged, and holds nothing back for good.
#[test]
fn a_failed_cache_end_is_counted_and_lets_the_grants_go() {
    let mut bench = Bench::new();
    let (writer, reader, frame) = bench.two_sharing_a_dma_buf();
    bench.write_then_end(writer, frame);
    let read = bench.begin(reader, frame, Access::CpuRead);
    assert_eq!(bench.run_starts(), vec![frame]);
    let (syncs, failed) = (
        bench.state.stats.cache_syncs,
        bench.state.stats.cache_syncs_failed,
    );
    bench.end_done(frame, failed_end());
    assert_eq!(bench.state.stats.cache_syncs, syncs);
    assert_eq!(bench.state.stats.cache_syncs_failed, failed + 1);
    bench.run_starts();
    assert!(bench.granted(reader, read));
    assert!(bench.state.cache_ends.is_empty());
}

/// A grant held back behind an END whose client frees the buffer is
/// answered like any begin still waiting, and once every holder has gone
/// (the buffer freed while its END runs) the END's return finds nothing to
/// grant and leaves nothing behind.
#[test]
fn a_buffer_freed_while_its_cache_end_runs_leaves_nothing_parked() {
    let mut bench = Bench::new();
    let (writer, reader, frame) = bench.two_sharing_a_dma_buf();
    bench.write_then_end(writer, frame);
    bench.replies(writer);
    let read = bench.begin(reader, frame, Access::CpuRead);
    assert_eq!(bench.run_starts(), vec![frame]);
    {
        let _entered = bench._runtime.enter();
        let free = bench
            .state
            .handle_message(reader, &free_request(frame), Vec::new());
        assert_eq!(free, super::Disposition::Continue);
        bench.state.disconnect(writer);
    }
    let answers = bench.replies(reader);
    assert!(
        answers
            .iter()
            .any(|(id, r)| *id == read && *r == Err(ErrorCode::UnknownBuffer)),
        "the held-back begin is answered: {answers:?}"
    );
    assert!(bench.state.buffers.is_empty(), "the buffer is freed");
    bench.end_done(frame, Ok(()));
    assert!(bench.run_starts().is_empty());
    assert!(bench.state.cache_ends.is_empty());
    assert!(bench.state.accesses.is_empty());
    assert!(
        bench.replies(reader).is_empty(),
        "nothing more for the reader"
    );
}

/// A held-back grant whose client hangs up, or whose begin times out, is
/// dropped; the grant behind it goes out when the END is done.
#[test]
fn a_held_back_grant_that_goes_does_not_hold_up_the_next() {
    let mut bench = Bench::new();
    let (writer, gone, patient, hasty) = (
        bench.client(),
        bench.client(),
        bench.client(),
        bench.client(),
    );
    let frame = bench.buffer(&[writer, gone, patient, hasty], true);
    bench.write_then_end(writer, frame);
    bench.begin(gone, frame, Access::CpuRead);
    let quick = bench.begin_within(hasty, frame, Access::CpuRead, Some(5));
    let read = bench.begin(patient, frame, Access::CpuRead);
    let actions = bench.state.take_actions();
    let quick_access = bench.access_of(hasty, quick);
    assert!(
        actions.iter().any(|a| matches!(
            a,
            Action::Timeout { target: TimeoutTarget::Access(id), .. } if *id == quick_access
        )),
        "a held-back grant keeps its begin's timeout: {actions:?}"
    );
    {
        let _entered = bench._runtime.enter();
        bench.state.disconnect(gone);
        bench.state.timed_out(TimeoutTarget::Access(quick_access));
    }
    assert!(
        bench
            .replies(hasty)
            .iter()
            .any(|(id, r)| *id == quick && *r == Err(ErrorCode::Timeout)),
        "the timed-out begin is answered"
    );
    bench.end_done(frame, Ok(()));
    bench.run_starts();
    assert!(bench.granted(patient, read));
    assert!(bench.replies(hasty).is_empty());
}

/// A memfd has no caches: its END is counted as skipped at once, no task
/// runs and nothing is held back.
#[test]
fn a_memfd_access_owes_no_cache_end_and_holds_nothing_back() {
    let mut bench = Bench::new();
    let (writer, reader) = (bench.client(), bench.client());
    let plain = bench.buffer(&[writer, reader], false);
    let skipped = bench.state.stats.cache_syncs_skipped;
    bench.write_then_end(writer, plain);
    let read = bench.begin(reader, plain, Access::CpuRead);
    assert!(bench.run_starts().is_empty(), "no END to run");
    assert!(bench.state.cache_ends.is_empty());
    assert!(bench.granted(reader, read), "granted at once");
    assert_eq!(bench.state.stats.cache_syncs_skipped, skipped + 3);
}

/// A `Free` of `buffer`, encoded as a client sends it.
pub(super) fn free_request(buffer: BufferId) -> Vec<u8> {
    dmabroker_ipc::codec::encode_request(&dmabroker_ipc::Request {
        head: dmabroker_ipc::RequestHead {
            id: 1_000,
            fds: 0,
            flags: 0,
        },
        body: dmabroker_ipc::RequestBody::Free { buffer },
    })
    .expect("encode")
}

/// The START of `client`'s begin `request`, taken out of the deferred
/// actions and not reported back: it is still running.
/// `reader`'s read of `frame` granted with its START in flight (the START
/// taken out of the actions, for the test to run), and `writer`'s write
/// queued behind it: the read's request, the START, the write's request.
fn read_starting_with_a_write_behind(
    bench: &mut Bench,
    reader: ClientId,
    writer: ClientId,
    frame: BufferId,
) -> (u64, Action, u64) {
    let read = bench.begin(reader, frame, Access::CpuRead);
    let start = start_in_flight(bench);
    let write = bench.begin(writer, frame, Access::CpuWrite);
    (read, start, write)
}

fn start_in_flight(bench: &mut Bench) -> Action {
    let mut actions = bench.state.take_actions();
    let at = actions
        .iter()
        .position(|a| matches!(a, Action::CacheSyncStart { .. }))
        .expect("a START was asked for");
    let start = actions.swap_remove(at);
    assert!(
        start.owner().is_none(),
        "a START belongs to no access: its access's removal must not abort it"
    );
    start
}

/// An access that goes while its START runs (here its client hangs up)
/// leaves that START, and the END it then owes, to run after it: the
/// grant made by its going waits for both, and the END runs off the
/// broker's thread.
#[test]
fn a_grant_waits_for_the_start_and_end_of_an_access_gone_while_starting() {
    let mut bench = Bench::new();
    let (reader, writer, frame) = bench.two_sharing_a_dma_buf();
    let (_, start, write) = read_starting_with_a_write_behind(&mut bench, reader, writer, frame);
    {
        let _entered = bench._runtime.enter();
        bench.state.disconnect(reader);
    }
    assert!(bench.run_starts().is_empty(), "nothing runs yet");
    assert!(
        !bench.granted(writer, write),
        "granted while the gone access's START was running"
    );
    bench.start_returns(start);
    assert_eq!(
        bench.run_starts(),
        vec![frame],
        "the START it had is ENDed off the broker's thread"
    );
    assert!(!bench.granted(writer, write), "granted before that END");
    bench.end_done(frame, Ok(()));
    bench.run_starts();
    assert!(bench.granted(writer, write));
    assert!(bench.state.cache_ends.is_empty());
}

/// A START that fails for an access gone meanwhile owes no END, and the
/// grants it held back go on at once.
#[test]
fn a_failed_start_of_a_gone_access_lets_the_grants_go() {
    let mut bench = Bench::new();
    let (reader, writer, frame) = bench.two_sharing_a_dma_buf();
    let (_, start, write) = read_starting_with_a_write_behind(&mut bench, reader, writer, frame);
    {
        let _entered = bench._runtime.enter();
        bench.state.disconnect(reader);
    }
    assert!(bench.run_starts().is_empty());
    assert!(!bench.granted(writer, write));
    let Action::CacheSyncStart { access, buffer, .. } = start else {
        unreachable!()
    };
    let failed = bench.state.stats.cache_syncs_failed;
    {
        let _entered = bench._runtime.enter();
        bench
            .state
            .cache_sync_started(access, buffer, Err(failed_sync().into()));
    }
    assert_eq!(bench.state.stats.cache_syncs_failed, failed + 1);
    assert!(bench.run_starts().is_empty(), "no END is owed");
    assert!(bench.granted(writer, write));
    assert!(bench.state.cache_ends.is_empty());
}

/// A START that never ran, for want of a thread, sent its grant out
/// unsynced, as after a failed ioctl. The begin is answered Busy now, and
/// whoever waited behind it is served.
#[test]
fn a_start_with_no_thread_answers_the_begin_busy() {
    let mut bench = Bench::new();
    let (reader, writer, frame) = bench.two_sharing_a_dma_buf();
    let (read, start, write) = read_starting_with_a_write_behind(&mut bench, reader, writer, frame);
    let Action::CacheSyncStart { access, buffer, .. } = start else {
        unreachable!()
    };
    {
        let _entered = bench._runtime.enter();
        bench
            .state
            .cache_sync_started(access, buffer, Err(super::waits::CacheSyncError::NoThread));
    }
    let answers = bench.replies(reader);
    assert!(
        answers.contains(&(read, Err(ErrorCode::Busy))),
        "the read: {answers:?}"
    );
    assert!(bench.run_starts().is_empty());
    assert!(bench.granted(writer, write), "the writer behind it");
    assert!(bench.state.cache_ends.is_empty());
}

/// A grant held back behind an END and withdrawn (its begin timed out)
/// leaves nothing parked: what its reply would have carried goes with it,
/// not when the END returns.
#[test]
fn a_withdrawn_grant_leaves_nothing_parked() {
    let mut bench = Bench::new();
    let (writer, reader, frame) = bench.two_sharing_a_dma_buf();
    bench.write_then_end(writer, frame);
    let read = bench.begin_within(reader, frame, Access::CpuRead, Some(5));
    let access = bench.access_of(reader, read);
    assert_eq!(bench.run_starts(), vec![frame]);
    assert_eq!(bench.state.cache_ends[&frame].parked.len(), 1);
    {
        let _entered = bench._runtime.enter();
        bench.state.timed_out(TimeoutTarget::Access(access));
    }
    assert!(
        bench.state.cache_ends[&frame].parked.is_empty(),
        "the withdrawn grant is still parked"
    );
    assert_eq!(bench.state.cache_ends[&frame].running, 1);
    bench.end_done(frame, Ok(()));
    assert!(bench.state.cache_ends.is_empty());
}

/// A dma-buf freed while its END runs takes its close ticket at the free:
/// a device allocation started meanwhile waits for the pages the END's
/// copy still keeps, not only for closes handed over before it.
#[test]
fn a_buffer_freed_while_its_cache_end_runs_takes_its_close_ticket_at_once() {
    const UID: u32 = 4_000_000_031;
    let mut bench = Bench::new();
    let writer = bench.client();
    let frame = bench.buffer(&[writer], true);
    bench.release_on_thread_of(frame, UID);
    bench.write_then_end(writer, frame);
    let end = bench
        .state
        .take_actions()
        .into_iter()
        .find(|a| matches!(a, Action::CacheSyncEnd { .. }))
        .expect("an END");
    {
        let _entered = bench._runtime.enter();
        bench.state.disconnect(writer);
    }
    assert!(bench.state.buffers.is_empty(), "the buffer is freed");
    assert_eq!(
        crate::closer::open_tickets_of(UID),
        1,
        "no close ticket while the END keeps the buffer"
    );
    drop(end);
    bench.end_done(frame, Ok(()));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while crate::closer::open_tickets_of(UID) > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the close never ended"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

fn failed_sync() -> KernelError {
    KernelError::Sys {
        op: "DMA_BUF_IOCTL_SYNC",
        target: "test".into(),
        errno: nix::errno::Errno::EIO,
    }
}

/// How a client whose grant is still held back goes.
#[derive(Clone, Copy, Debug)]
enum Goes {
    HangsUp,
    Frees,
}

/// A device writer dies on a dma-buf; the next read takes the news
/// (`writer_lost`) and is held back by its cache sync START, and its
/// client goes before the START returns. The news went with it: the next
/// reader was granted the possibly torn frame with no warning. Returns
/// whether the next reader is told.
fn next_reader_told_of_the_lost_writer(goes: Goes) -> bool {
    let mut bench = Bench::new();
    let (writer, reader, next) = (bench.client(), bench.client(), bench.client());
    let frame = bench.buffer(&[writer, reader, next], true);
    let write = bench.begin(writer, frame, Access::DeviceWrite);
    bench.run_starts();
    assert!(bench.granted(writer, write));
    {
        let _entered = bench._runtime.enter();
        bench.state.disconnect(writer);
    }
    assert!(bench.state.arbiter.owes_marks(frame));
    bench.begin(reader, frame, Access::CpuRead);
    let start = start_in_flight(&mut bench);
    assert!(
        !bench.state.arbiter.owes_marks(frame),
        "the held-back read took the news"
    );
    {
        let _entered = bench._runtime.enter();
        match goes {
            Goes::HangsUp => bench.state.disconnect(reader),
            Goes::Frees => {
                let _ = bench
                    .state
                    .handle_message(reader, &free_request(frame), Vec::new());
            }
        }
    }
    bench.start_returns(start);
    for buffer in bench.run_starts() {
        bench.end_done(buffer, Ok(()));
    }
    let again = bench.begin(next, frame, Access::CpuRead);
    bench.run_starts();
    bench
        .told_writer_lost(next, again)
        .expect("the next read is granted")
}

#[test]
fn a_lost_writer_is_told_to_the_next_reader_when_a_held_back_reader_hangs_up() {
    assert!(next_reader_told_of_the_lost_writer(Goes::HangsUp));
}

#[test]
fn a_lost_writer_is_told_to_the_next_reader_when_a_held_back_reader_frees() {
    assert!(next_reader_told_of_the_lost_writer(Goes::Frees));
}

/// A write granted but held back behind an END, whose client hangs up
/// before it is sent, was never the client's: the next reader is not told
/// of a lost writer (a frame dropped for nothing), and no lost writer is
/// noticed.
#[test]
fn a_write_never_sent_is_no_lost_writer() {
    let mut bench = Bench::new();
    let (writer, reader, frame) = bench.two_sharing_a_dma_buf();
    bench.write_then_end(reader, frame);
    let write = bench.begin(writer, frame, Access::CpuWrite);
    assert!(!bench.granted(writer, write), "parked behind the END");
    {
        let _entered = bench._runtime.enter();
        bench.state.disconnect(writer);
    }
    for buffer in bench.run_starts() {
        bench.end_done(buffer, Ok(()));
    }
    let read = bench.begin(reader, frame, Access::CpuRead);
    bench.run_starts();
    let told = bench
        .told_writer_lost(reader, read)
        .expect("the read is granted");
    assert!(!told, "a write never sent was taken for a lost one");
}

/// A client's write waits in the queue behind its own read, held in the
/// buffer's word; the client ends the read in the word and goes (hangs up,
/// or frees the buffer) before its `WordEnded` is sent. The settle its
/// going makes retired the read and served the queue: the write was
/// granted to the client going, then released at once as a lost write,
/// and the next reader was told `writer_lost` for a write that never
/// began. Its queued begins now leave the queue before anything settles.
/// Returns whether the next reader is told a writer was lost.
fn next_reader_told_of_a_write_that_was_only_queued(goes: Goes) -> bool {
    let mut bench = Bench::new();
    let (client, next) = (bench.client(), bench.client());
    if let Some(entry) = bench.state.clients.get_mut(&client) {
        entry.buffer_words = true;
    }
    let frame = bench.buffer_with_word(&[client, next]);
    let read = bench.begin(client, frame, Access::CpuRead);
    let slot = bench
        .received(client)
        .iter()
        .find_map(|message| match message {
            ServerMessage::Reply(reply) if reply.id == read => match &reply.result {
                Ok(ReplyBody::Granted(grant)) => grant.word,
                _ => None,
            },
            _ => None,
        })
        .expect("the read is granted in the word");
    let write = bench.begin(client, frame, Access::CpuWrite);
    assert!(!bench.granted(client, write), "queued behind its own read");
    let entry = bench.state.buffers.get(&frame).expect("the buffer");
    let word = dmabroker_ipc::bufferword::BufferWord::map(entry.fd.as_fd(), entry.size)
        .expect("map the word");
    word.end(dmabroker_ipc::bufferword::WordHold { slot, write: false });
    {
        let _entered = bench._runtime.enter();
        match goes {
            Goes::HangsUp => bench.state.disconnect(client),
            Goes::Frees => {
                let _ = bench
                    .state
                    .handle_message(client, &free_request(frame), Vec::new());
            }
        }
        bench.state.settle_touched();
    }
    let again = bench.begin(next, frame, Access::CpuRead);
    bench
        .told_writer_lost(next, again)
        .expect("the next read is granted")
}

#[test]
fn a_write_queued_by_a_client_that_hangs_up_is_no_lost_writer() {
    assert!(!next_reader_told_of_a_write_that_was_only_queued(
        Goes::HangsUp
    ));
}

#[test]
fn a_write_queued_by_a_client_that_frees_is_no_lost_writer() {
    assert!(!next_reader_told_of_a_write_that_was_only_queued(
        Goes::Frees
    ));
}

/// A no-autofence client listed a fence without a sync_file waits for its
/// `FenceSignalled`, and hangs up first: nobody waits for the fence any
/// more. Its subscriber list was left empty in the map, and the key alone
/// counts the fence as watched (its end by message, its buffer's word kept
/// from being handed back).
#[test]
fn a_fence_whose_only_subscriber_hangs_up_is_watched_no_more() {
    let mut bench = Bench::new();
    let (writer, manual) = (bench.client(), bench.client());
    if let Some(entry) = bench.state.clients.get_mut(&manual) {
        entry.autofence = false;
    }
    let frame = bench.buffer(&[writer, manual], false);
    let write = bench.begin(writer, frame, Access::CpuWrite);
    assert!(bench.granted(writer, write));
    let fence = bench.access_of(writer, write);
    let peek = bench.begin(manual, frame, Access::CpuRead);
    assert!(
        bench.granted(manual, peek),
        "granted at once, listing the write"
    );
    assert!(bench.state.fence_subscribers.contains_key(&fence));
    {
        let _entered = bench._runtime.enter();
        bench.state.disconnect(manual);
    }
    assert!(
        !bench.state.fence_subscribers.contains_key(&fence),
        "still watched for a client that is gone"
    );
}

/// Another client holds a read; `client` queues a write, then a read
/// behind it, and goes (hangs up, or frees the buffer). Its begins left
/// their queue one at a time, and the write's leaving served the queue:
/// the read, at its head now and beside the other's read, was granted to
/// the client going (a grant on a buffer being freed, or at a hang-up).
/// They now all leave before the queue is served. Returns the answers
/// `client` was sent to its two begins, and the grants made meanwhile.
fn answers_to_the_begins_of_a_client_that_goes(goes: Goes) -> (Vec<Result<(), ErrorCode>>, u64) {
    let mut bench = Bench::new();
    let (holder, client) = (bench.client(), bench.client());
    let frame = bench.buffer(&[holder, client], false);
    let read = bench.begin(holder, frame, Access::CpuRead);
    assert!(bench.granted(holder, read), "the holder reads");
    let write = bench.begin(client, frame, Access::CpuWrite);
    let queued_read = bench.begin(client, frame, Access::CpuRead);
    assert!(bench.replies(client).is_empty(), "both queued");
    let grants = bench.state.stats.grants;
    {
        let _entered = bench._runtime.enter();
        match goes {
            Goes::HangsUp => bench.state.disconnect(client),
            Goes::Frees => {
                let _ = bench
                    .state
                    .handle_message(client, &free_request(frame), Vec::new());
            }
        }
        bench.state.settle_touched();
    }
    let replies = bench.replies(client);
    let answers = [write, queued_read]
        .iter()
        .filter_map(|request| {
            replies
                .iter()
                .find(|(id, _)| id == request)
                .map(|(_, answer)| answer.as_ref().map(|_| ()).map_err(|code| *code))
        })
        .collect();
    let granted = replies
        .iter()
        .filter(|(_, answer)| matches!(answer, Ok(ReplyBody::Granted(_))))
        .count();
    assert_eq!(granted as u64, bench.state.stats.grants - grants);
    (answers, bench.state.stats.grants - grants)
}

#[test]
fn the_begins_of_a_client_that_frees_are_answered_unknown_buffer() {
    let (answers, grants) = answers_to_the_begins_of_a_client_that_goes(Goes::Frees);
    assert_eq!(
        answers,
        vec![Err(ErrorCode::UnknownBuffer), Err(ErrorCode::UnknownBuffer)]
    );
    assert_eq!(grants, 0, "nothing granted");
}

#[test]
fn the_begins_of_a_client_that_hangs_up_are_never_granted() {
    let (answers, grants) = answers_to_the_begins_of_a_client_that_goes(Goes::HangsUp);
    assert!(answers.is_empty(), "nobody to answer: {answers:?}");
    assert_eq!(grants, 0, "nothing granted");
}

/// The clients subscribed to `fence`'s `FenceSignalled`.
fn subscribers_of(bench: &Bench, fence: AccessId) -> Vec<ClientId> {
    bench
        .state
        .fence_subscribers
        .get(&fence)
        .map(|subscribers| subscribers.iter().map(|s| s.client).collect())
        .unwrap_or_default()
}

/// A no-autofence client's write, granted at once but parked behind a
/// cache sync END, lists fences its client must wait for without a
/// sync_file (another client's device read, and the client's own write
/// sent earlier), which subscribes the client to their
/// `FenceSignalled`. Its client cancels it before the END returns: the
/// grant is withdrawn, never sent, and the subscriptions it made must go
/// with it, while the one the earlier grant made (sent, listing the
/// device read) stays. Subscriptions were kept once per client and
/// fence, so the withdrawn grant's stayed until each fence ended: an
/// event for a fence the client was never told of, and, meanwhile, the
/// fence counted as watched.
#[test]
fn a_withdrawn_parked_grant_drops_its_subscriptions_at_once() {
    let mut bench = Bench::new();
    let (device, reader, manual) = (bench.client(), bench.client(), bench.client());
    if let Some(entry) = bench.state.clients.get_mut(&manual) {
        entry.autofence = false;
        entry.cancel = true;
    }
    let frame = bench.buffer(&[device, reader, manual], true);
    let scan = bench.begin(device, frame, Access::DeviceRead);
    assert!(bench.run_starts().is_empty());
    assert!(bench.granted(device, scan), "the device reads");
    let scanning = bench.access_of(device, scan);
    let read = bench.begin(reader, frame, Access::CpuRead);
    assert!(bench.run_starts().is_empty());
    assert!(bench.granted(reader, read), "the CPU reads");
    let first = bench.begin(manual, frame, Access::CpuWrite);
    assert!(
        bench.granted(manual, first),
        "granted at once, listing both reads"
    );
    let writing = bench.access_of(manual, first);
    let reading = bench.access_of(reader, read);
    bench.end(reader, reading);
    let second = bench.begin(manual, frame, Access::CpuWrite);
    assert!(
        !bench.granted(manual, second),
        "parked behind the read's END"
    );
    assert_eq!(subscribers_of(&bench, scanning), vec![manual]);
    assert_eq!(subscribers_of(&bench, writing), vec![manual]);

    {
        let _entered = bench._runtime.enter();
        bench.state.cancel(manual, second).expect("cancel");
    }
    let replies = bench.replies(manual);
    assert!(
        replies
            .iter()
            .any(|(id, r)| *id == second && *r == Err(ErrorCode::Cancelled)),
        "the parked write is withdrawn: {replies:?}"
    );
    assert!(
        subscribers_of(&bench, writing).is_empty(),
        "the withdrawn grant's subscription stayed"
    );
    assert!(
        !bench.state.fence_subscribers.contains_key(&writing),
        "a fence nobody waits for is watched no more"
    );
    assert_eq!(
        subscribers_of(&bench, scanning),
        vec![manual],
        "the sent grant's subscription stays"
    );

    for buffer in bench.run_starts() {
        bench.end_done(buffer, Ok(()));
    }
    bench.end(device, scanning);
    let told: Vec<AccessId> = bench
        .received(manual)
        .iter()
        .filter_map(|message| match message {
            ServerMessage::Event(event) => match event.event {
                dmabroker_ipc::Event::FenceSignalled { fence } => Some(fence),
                _ => None,
            },
            ServerMessage::Reply(_) => None,
        })
        .collect();
    assert_eq!(told, vec![scanning], "told once, of the device read only");
}

/// Random sequences on the bench: autofence and no-autofence clients
/// begin, end, cancel and time out accesses on a dma-buf (whose CPU
/// grants wait for their cache sync START, and whose grants park behind
/// its ENDs) and a memfd, STARTs and ENDs return (an END now and then
/// failed), clients free the buffers and hang up. After every step the
/// arbiter and the broker's tables name the same accesses and waiters
/// (see `check_tables`); once every client is gone and every END has
/// returned, nothing is left. The request sequences of
/// `tests/broker_sequences.rs` run memfd buffers only: a test outside
/// the daemon has no dma-buf to give it, and no cache sync to hold back.
mod sequences {
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Step {
        Begin { client: u8, dma_buf: bool, kind: u8 },
        End { client: u8, access: u8 },
        Cancel { client: u8, begin: u8 },
        TimesOut { which: u8 },
        StartsReturn,
        EndReturns { failed: bool },
        Free { client: u8, dma_buf: bool },
        HangUp { client: u8 },
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            8 => (0u8..3, any::<bool>(), 0u8..5)
                .prop_map(|(client, dma_buf, kind)| Step::Begin { client, dma_buf, kind }),
            5 => (0u8..3, any::<u8>()).prop_map(|(client, access)| Step::End { client, access }),
            2 => (0u8..3, any::<u8>()).prop_map(|(client, begin)| Step::Cancel { client, begin }),
            1 => any::<u8>().prop_map(|which| Step::TimesOut { which }),
            4 => Just(Step::StartsReturn),
            3 => proptest::bool::weighted(0.2).prop_map(|failed| Step::EndReturns { failed }),
            1 => (0u8..3, any::<bool>()).prop_map(|(client, dma_buf)| Step::Free { client, dma_buf }),
            1 => (0u8..3).prop_map(|client| Step::HangUp { client }),
        ]
    }

    fn kind(n: u8) -> Access {
        match n % 5 {
            0 => Access::CpuRead,
            1 => Access::CpuWrite,
            2 => Access::CpuReadWrite,
            3 => Access::DeviceRead,
            _ => Access::DeviceWrite,
        }
    }

    /// The arbiter and the broker's tables name the same accesses and
    /// waiters; subscriptions name live fences and clients; a parked
    /// grant waits for an END still running; what `max_uid_buffers`
    /// counts is the holds' (frees and hang-ups let go of them).
    fn check_tables(state: &State) -> Result<(), String> {
        for (id, access) in &state.accesses {
            let fence = state
                .arbiter
                .fence(*id)
                .ok_or_else(|| format!("access {id} is no fence of the arbiter"))?;
            if fence.holder != access.client || fence.buffer != access.buffer {
                return Err(format!("access {id}: another holder or buffer: {fence:?}"));
            }
            let kernel = fence.state == dmabroker_fence::FenceState::AwaitingKernelFence;
            if kernel != access.sync_file.is_some() {
                return Err(format!("access {id}: {:?} and its sync_file", fence.state));
            }
        }
        if state.arbiter.fence_total() != state.accesses.len() {
            return Err(format!(
                "{} fences, {} accesses",
                state.arbiter.fence_total(),
                state.accesses.len()
            ));
        }
        for id in state.waiters.keys() {
            if state.arbiter.waiter_buffer(*id).is_none() {
                return Err(format!("waiter {id} waits in no queue"));
            }
        }
        if state.arbiter.waiter_total() != state.waiters.len() {
            return Err(format!(
                "{} queued, {} waiters",
                state.arbiter.waiter_total(),
                state.waiters.len()
            ));
        }
        for (fence, subscribers) in &state.fence_subscribers {
            if !state.accesses.contains_key(fence) {
                return Err(format!("fence {fence} is gone, yet subscribed to"));
            }
            for s in subscribers {
                if s.grants == 0 || !state.clients.contains_key(&s.client) {
                    return Err(format!("fence {fence}: subscriber {s:?}"));
                }
            }
            if subscribers.is_empty() {
                return Err(format!("fence {fence}: watched for nobody"));
            }
        }
        for (buffer, ends) in &state.cache_ends {
            if !ends.parked.is_empty() && ends.running == 0 {
                return Err(format!("buffer {buffer}: grants parked behind no END"));
            }
        }
        state.check_uid_held()
    }

    struct Run {
        bench: Bench,
        clients: [ClientId; 3],
        gone: [bool; 3],
        frames: [BufferId; 2],
        begins: [Vec<u64>; 3],
        ends: Vec<BufferId>,
        /// Steps after which a grant was parked behind an END, a grant
        /// was held back (for its START, or parked), and a fence was
        /// subscribed to: what `sequences_reach_parking` counts.
        seen: [u64; 3],
    }

    impl Run {
        fn new() -> Run {
            let mut bench = Bench::new();
            let clients = [bench.client(), bench.client(), bench.client()];
            for (n, client) in clients.iter().enumerate() {
                if let Some(entry) = bench.state.clients.get_mut(client) {
                    entry.cancel = true;
                    entry.autofence = n != 2;
                }
            }
            let frames = [bench.buffer(&clients, false), bench.buffer(&clients, true)];
            Run {
                bench,
                clients,
                gone: [false; 3],
                frames,
                begins: Default::default(),
                ends: Vec::new(),
                seen: [0; 3],
            }
        }

        fn starts_return(&mut self) {
            let ends = self.bench.run_starts();
            self.ends.extend(ends);
        }

        fn step(&mut self, step: &Step) {
            let bench = &mut self.bench;
            let at = |n: u8| usize::from(n) % 3;
            match *step {
                Step::Begin {
                    client,
                    dma_buf,
                    kind: k,
                } => {
                    if self.gone[at(client)] {
                        return;
                    }
                    let request = bench.next_request;
                    bench.next_request += 1;
                    let frame = self.frames[usize::from(dma_buf)];
                    let _entered = bench._runtime.enter();
                    let begun =
                        bench
                            .state
                            .begin(self.clients[at(client)], request, frame, kind(k), None);
                    if begun.is_ok() {
                        self.begins[at(client)].push(request);
                    }
                }
                Step::End { client, access } => {
                    let id = self.clients[at(client)];
                    let mut own: Vec<AccessId> = bench
                        .state
                        .accesses
                        .iter()
                        .filter(|(_, a)| a.client == id)
                        .map(|(access, _)| *access)
                        .collect();
                    own.sort_unstable();
                    if own.is_empty() {
                        return;
                    }
                    let access = own[usize::from(access) % own.len()];
                    let _entered = bench._runtime.enter();
                    let _ = bench.state.end(id, access, None);
                }
                Step::Cancel { client, begin } => {
                    let begins = &self.begins[at(client)];
                    if self.gone[at(client)] || begins.is_empty() {
                        return;
                    }
                    let request = begins[usize::from(begin) % begins.len()];
                    let _entered = bench._runtime.enter();
                    let _ = bench.state.cancel(self.clients[at(client)], request);
                }
                Step::TimesOut { which } => {
                    let mut targets: Vec<(u8, u64)> = bench
                        .state
                        .accesses
                        .iter()
                        .filter(|(_, a)| a.pending.is_some())
                        .map(|(id, _)| (0, *id))
                        .chain(bench.state.waiters.keys().map(|id| (1, *id)))
                        .collect();
                    targets.sort_unstable();
                    if targets.is_empty() {
                        return;
                    }
                    let target = match targets[usize::from(which) % targets.len()] {
                        (0, id) => TimeoutTarget::Access(id),
                        (_, id) => TimeoutTarget::Waiter(id),
                    };
                    let _entered = bench._runtime.enter();
                    bench.state.timed_out(target);
                }
                Step::StartsReturn => self.starts_return(),
                Step::EndReturns { failed } => {
                    if self.ends.is_empty() {
                        return;
                    }
                    let buffer = self.ends.remove(0);
                    let ended = if failed { failed_end() } else { Ok(()) };
                    bench.end_done(buffer, ended);
                }
                Step::Free { client, dma_buf } => {
                    let frame = self.frames[usize::from(dma_buf)];
                    let _entered = bench._runtime.enter();
                    let _ = bench.state.handle_message(
                        self.clients[at(client)],
                        &free_request(frame),
                        Vec::new(),
                    );
                }
                Step::HangUp { client } => {
                    if std::mem::replace(&mut self.gone[at(client)], true) {
                        return;
                    }
                    let _entered = bench._runtime.enter();
                    bench.state.disconnect(self.clients[at(client)]);
                }
            }
            let _entered = self.bench._runtime.enter();
            self.bench.state.settle_touched();
            drop(_entered);
            for (n, client) in self.clients.iter().enumerate() {
                if !self.gone[n] {
                    self.bench.received(*client);
                }
            }
            let state = &self.bench.state;
            let seen = [
                state.cache_ends.values().any(|e| !e.parked.is_empty()),
                state.accesses.values().any(|a| a.pending.is_some()),
                !state.fence_subscribers.is_empty(),
            ];
            for (count, seen) in self.seen.iter_mut().zip(seen) {
                *count += u64::from(seen);
            }
        }

        /// Everyone hangs up and every START and END returns: nothing may
        /// be left.
        fn finish(&mut self) -> Result<(), String> {
            for client in 0..3 {
                self.step(&Step::HangUp { client });
            }
            // A START that returns for an access gone defers the END it
            // owes: that one is taken at the next look.
            for _ in 0..64 {
                self.starts_return();
                self.starts_return();
                if self.ends.is_empty() {
                    break;
                }
                while !self.ends.is_empty() {
                    self.step(&Step::EndReturns { failed: false });
                }
            }
            let state = &self.bench.state;
            check_tables(state)?;
            if !state.accesses.is_empty()
                || !state.waiters.is_empty()
                || !state.cache_ends.is_empty()
                || !state.fence_subscribers.is_empty()
                || !state.buffers.is_empty()
            {
                return Err(format!(
                    "left: {} accesses, {} waiters, {} buffers with ENDs, {} fences watched, {} buffers",
                    state.accesses.len(),
                    state.waiters.len(),
                    state.cache_ends.len(),
                    state.fence_subscribers.len(),
                    state.buffers.len()
                ));
            }
            Ok(())
        }
    }

    /// The generated sequences do park grants behind ENDs, hold grants
    /// back, subscribe no-autofence clients to fences, and time out and
    /// cancel (a property test that never got there would pass for
    /// nothing).
    #[test]
    fn sequences_reach_parking() {
        use proptest::strategy::ValueTree;
        use proptest::test_runner::TestRunner;
        let mut runner = TestRunner::deterministic();
        let sequences = proptest::collection::vec(step(), 1..80);
        let (mut seen, mut timeouts, mut cancelled) = ([0u64; 3], 0, 0);
        for _ in 0..64 {
            let steps = sequences.new_tree(&mut runner).expect("generate").current();
            let mut run = Run::new();
            for step in &steps {
                run.step(step);
            }
            for (total, n) in seen.iter_mut().zip(run.seen) {
                *total += n;
            }
            timeouts += run.bench.state.stats.timeouts;
            cancelled += run
                .bench
                .state
                .stats
                .refusals
                .iter()
                .filter(|(code, _)| code.contains("cancel"))
                .map(|(_, n)| n)
                .sum::<u64>();
        }
        assert!(
            seen.iter().all(|n| *n > 0) && timeouts > 0 && cancelled > 0,
            "parked, held back, subscribed: {seen:?}; timeouts {timeouts}, cancelled {cancelled}"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

        #[test]
        fn parked_and_held_back_grants_keep_the_tables_in_step(
            steps in proptest::collection::vec(step(), 1..80),
        ) {
            let mut run = Run::new();
            for (i, step) in steps.iter().enumerate() {
                run.step(step);
                if let Err(broken) = check_tables(&run.bench.state) {
                    return Err(TestCaseError::fail(format!("after step {i} ({step:?}): {broken}")));
                }
            }
            run.finish().map_err(TestCaseError::fail)?;
        }
    }
}
