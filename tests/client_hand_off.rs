//! Planned hand-offs in a buffer's word when two threads of one process
//! begin on the same `Buffer`, from a broker played by the test. Both
//! threads are one holder to the word (one index), so a waiter cannot
//! tell its own hand-off or plan from a sibling's by the word alone: a
//! waiter took a sibling's bit for its hand-off, and one whose plan was
//! withdrawn slept through a sibling's plan at its index, its answer
//! unread. Found by review.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dmabroker_client::{Access, Client, ErrorCode};
use dmabroker_ipc::bufferword::{BufferWord, FastSlot, WordAccess, WordEnd, WordHold};
use dmabroker_ipc::codec::decode_request;
use dmabroker_ipc::fdpass::recv_message;
use dmabroker_ipc::{features, ReplyBody, RequestBody, Welcome, WireError, PROTOCOL_VERSION};
use dmabroker_suite::fake_broker::{self, reply};
use dmabroker_suite::tmp::TempDir;
use nix::sys::socket::accept;

/// How long the other process (holder index 1) keeps its write.
const HOLD: Duration = Duration::from_secs(3);

/// The buffer both brokers below share out: 4 KiB and the word page past
/// it, and its inode.
fn buffer_with_word() -> (OwnedFd, u64) {
    let (fd, inode) = fake_broker::memfd();
    nix::unistd::ftruncate(&fd, 8192).expect("ftruncate");
    (fd, inode)
}

/// Answers what every connection starts with, a hello (buffer words and
/// cancels offered) and the test's one alloc (buffer 1, `fd`); false for
/// anything else, left to the test's broker.
fn answer_setup(socket: &OwnedFd, id: u64, body: &RequestBody, fd: &OwnedFd, inode: u64) -> bool {
    match body {
        RequestBody::Hello(_) => reply(
            socket,
            id,
            Ok(ReplyBody::Welcome(Welcome {
                version: PROTOCOL_VERSION,
                features: features::BUFFER_WORDS | features::CANCEL,
                client_id: 1,
                autofence: true,
                default_heap: "memfd".into(),
                instance: "hand-off".into(),
            })),
        ),
        RequestBody::Alloc { .. } => fake_broker::reply_with_buffer(socket, id, fd, inode),
        RequestBody::ListHeaps => reply(socket, id, Ok(ReplyBody::Heaps(Vec::new()))),
        _ => return false,
    }
    true
}

/// A socket path in a folder of its own, removed with the `TempDir`.
fn socket_path(tag: &str) -> (TempDir, PathBuf) {
    let dir = TempDir::new(&format!("hand-off-{tag}"));
    let path = dir.path().join("socket");
    (dir, path)
}

#[derive(Clone, Copy, PartialEq)]
enum Trigger {
    /// The first begin times out when the second arrives.
    TimeoutAtSecondBegin,
    /// The first begin is cancelled (`Cancel`).
    OnCancel,
}

/// A broker whose buffer 1 is written, in the word, by another process
/// (index 1) for `HOLD` once planned. The first begin (index 0) is
/// answered `Planned`; when it is withdrawn (timeout or Cancel), the
/// broker does what `take_over_word` + `settle_touched` do: cancel the
/// plan (waking the waiter), answer the first request, and plan the hand
/// off for the next waiter in the queue, the second begin of the same
/// holder (same index, same kind).
fn broker(path: &Path, trigger: Trigger, planned_tx: Sender<()>) -> std::thread::JoinHandle<()> {
    let listener = fake_broker::listening_at(path);
    std::thread::spawn(move || {
        let (fd, inode) = buffer_with_word();
        let word = Arc::new(BufferWord::map(fd.as_fd(), 4096).expect("word"));
        let waiter = FastSlot { index: 0, epoch: 0 };
        let holder = FastSlot { index: 1, epoch: 0 };
        let raw = accept(listener.as_raw_fd()).expect("accept");
        // SAFETY: accept just created it.
        let socket = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut first = None;
        let mut second = None;
        let replan = |socket: &OwnedFd, first: u64, second: u64, why: WireError| {
            // take_over_word cancels the plan (waking the waiter) and
            // settle_touched plans the hand-off for the new head, the same
            // index and kind: a waiter not scheduled in between sees the
            // word as it was. The test leaves it as it was.
            reply(socket, first, Err(why));
            reply(socket, second, Ok(ReplyBody::Planned { word: waiter }));
            let word = Arc::clone(&word);
            std::thread::spawn(move || {
                std::thread::sleep(HOLD);
                let write = WordHold {
                    slot: holder,
                    write: true,
                };
                assert_eq!(word.end(write), WordEnd::HandedOff);
            });
        };
        while let Ok(message) = recv_message(socket.as_fd(), false) {
            let request = decode_request(&message.bytes).expect("decode");
            let id = request.head.id;
            match request.body {
                _ if answer_setup(&socket, id, &request.body, &fd, inode) => {}
                RequestBody::Begin { .. } if first.is_none() => {
                    word.reset(0, true).expect("uncontended");
                    assert!(
                        word.grant(holder, WordAccess::Write).expect("uncontended"),
                        "holder writes"
                    );
                    assert!(word
                        .plan(word.load(), waiter.index, WordAccess::Read)
                        .expect("uncontended"));
                    reply(&socket, id, Ok(ReplyBody::Planned { word: waiter }));
                    first = Some(id);
                    planned_tx.send(()).expect("tell");
                }
                RequestBody::Begin { .. } => {
                    second = Some(id);
                    if trigger == Trigger::TimeoutAtSecondBegin {
                        let why = WireError::new(ErrorCode::Timeout, "not granted within 100 ms");
                        replan(&socket, first.expect("first begin"), id, why);
                    }
                }
                RequestBody::Cancel { request }
                    if trigger == Trigger::OnCancel && Some(request) == first =>
                {
                    let why = WireError::new(ErrorCode::Cancelled, "withdrawn");
                    replan(&socket, request, second.expect("second queued"), why);
                }
                _ => {}
            }
        }
    })
}

/// begin_timeout(100 ms) must come back with Timeout about when the broker
/// answers it, not when a sibling's planned hand-off happens.
#[test]
fn a_timed_out_planned_begin_returns_though_a_sibling_is_planned_at_its_index() {
    let (_dir, path) = socket_path("timeout");
    let (planned_tx, planned) = channel();
    let broker = broker(&path, Trigger::TimeoutAtSecondBegin, planned_tx);
    let client = Client::connect_to(&path).expect("connect");
    let frame = Arc::new(client.alloc(4096).expect("alloc"));
    let first = {
        let frame = Arc::clone(&frame);
        std::thread::spawn(move || {
            let start = Instant::now();
            let result = frame
                .begin_timeout(Access::CpuRead, Duration::from_millis(100))
                .map(|g| g.in_word());
            (result.map_err(|e| e.code()), start.elapsed())
        })
    };
    planned
        .recv_timeout(Duration::from_secs(5))
        .expect("planned");
    std::thread::sleep(Duration::from_millis(100));
    let second = frame.begin(Access::CpuRead).expect("second read");
    assert!(second.in_word());
    let (result, took) = first.join().expect("first");
    drop(second);
    drop(frame);
    drop(client);
    broker.join().expect("broker");
    assert_eq!(result, Err(Some(ErrorCode::Timeout)));
    assert!(
        took < Duration::from_secs(1),
        "begin_timeout(100 ms) took {took:?}: it slept on the word through the sibling's plan"
    );
}

/// The blocking-pool thread of a dropped begin_async "returns at once".
#[test]
fn a_cancelled_async_begin_leaves_the_pool_though_a_sibling_is_planned_at_its_index() {
    let (_dir, path) = socket_path("cancel");
    let (planned_tx, planned) = channel();
    let broker = broker(&path, Trigger::OnCancel, planned_tx);
    let client = Client::connect_to(&path).expect("connect");
    let frame = Arc::new(client.alloc(4096).expect("alloc"));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let task = {
        let frame = Arc::clone(&frame);
        runtime.spawn(async move { frame.begin_async(Access::CpuRead, None).await.map(drop) })
    };
    // Let the task start and send its begin.
    runtime.block_on(async {
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
    });
    planned
        .recv_timeout(Duration::from_secs(5))
        .expect("planned");
    let second = {
        let frame = Arc::clone(&frame);
        std::thread::spawn(move || frame.begin(Access::CpuRead).map(|g| g.in_word()))
    };
    std::thread::sleep(Duration::from_millis(100)); // second queued
    task.abort();
    runtime.block_on(async {
        let _ = task.await;
    });
    let start = Instant::now();
    runtime.shutdown_timeout(Duration::from_secs(2));
    let took = start.elapsed();
    assert!(second.join().expect("second").expect("second read"));
    drop(frame);
    drop(client);
    broker.join().expect("broker");
    assert!(
        took < Duration::from_millis(1500),
        "the cancelled begin's pool thread was still asleep on the word after {took:?}"
    );
}

/// A broker for the sibling-count race: each begin with a timeout (thread
/// A) is answered `Planned` (index 0, read) behind a write of index 1;
/// then the broker times it out: answers `Timeout`, and leaves the word
/// handed back and idle (one store, which also wakes A). Begins without a
/// timeout (thread B, which found the word taken) are granted by message.
fn racing_broker(
    path: &Path,
    timed_begins: Arc<std::sync::atomic::AtomicU64>,
) -> std::thread::JoinHandle<()> {
    let listener = fake_broker::listening_at(path);
    std::thread::spawn(move || {
        let (fd, inode) = buffer_with_word();
        let word = BufferWord::map(fd.as_fd(), 4096).expect("word");
        let waiter = FastSlot { index: 0, epoch: 0 };
        let holder = FastSlot { index: 1, epoch: 0 };
        let raw = accept(listener.as_raw_fd()).expect("accept");
        // SAFETY: accept just created it.
        let socket = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut next_access = 100;
        while let Ok(message) = recv_message(socket.as_fd(), false) {
            let request = decode_request(&message.bytes).expect("decode");
            let id = request.head.id;
            match request.body {
                _ if answer_setup(&socket, id, &request.body, &fd, inode) => {}
                RequestBody::Begin {
                    timeout_ms: Some(_),
                    ..
                } => {
                    timed_begins.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    // Wait for B's access in the word to end, as a real
                    // broker's take-over would find it (or queue A).
                    let deadline = Instant::now() + Duration::from_secs(1);
                    while word.load().readers() != 0 && Instant::now() < deadline {
                        std::hint::spin_loop();
                    }
                    word.reset(0, true).expect("uncontended");
                    assert!(
                        word.grant(holder, WordAccess::Write).expect("uncontended"),
                        "holder writes"
                    );
                    assert!(word
                        .plan(word.load(), waiter.index, WordAccess::Read)
                        .expect("uncontended"));
                    reply(&socket, id, Ok(ReplyBody::Planned { word: waiter }));
                    std::thread::sleep(Duration::from_micros(300));
                    let why = WireError::new(ErrorCode::Timeout, "not granted in time");
                    reply(&socket, id, Err(why));
                    // Plan cancelled, holder gone, word handed back.
                    word.reset(0, false).expect("uncontended");
                }
                RequestBody::Begin { access, .. } => {
                    next_access += 1;
                    let grant = dmabroker_ipc::Grant {
                        access: next_access,
                        buffer: 1,
                        kind: access,
                        writer_lost: false,
                        revoked: false,
                        fences: Vec::new(),
                        end_slot: None,
                        word: None,
                    };
                    reply(&socket, id, Ok(ReplyBody::Granted(grant)));
                }
                _ => {}
            }
        }
    })
}

/// A waiter that finds its index's bit checks for siblings only after
/// reading the word: a sibling whose bit it saw may have ended (and given
/// its ticket back) in between, and the waiter then takes that bit for its
/// hand-off: a guard for an access nobody holds, and its request's answer
/// (Timeout) dropped.
#[test]
fn a_sibling_that_ends_between_the_waiters_look_and_its_count_is_not_a_hand_off() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let (_dir, path) = socket_path("race");
    let timed_begins = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let broker = racing_broker(&path, Arc::clone(&timed_begins));
    let client = Client::connect_to(&path).expect("connect");
    let frame = Arc::new(client.alloc(4096).expect("alloc"));
    let stop = Arc::new(AtomicBool::new(false));
    let sibling = {
        let (frame, stop) = (Arc::clone(&frame), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut in_word = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let guard = frame.begin(Access::CpuRead).expect("sibling read");
                in_word += u64::from(guard.in_word());
                drop(guard);
            }
            in_word
        })
    };
    let mut phantom = 0;
    let mut timeouts = 0;
    let mut fast = 0;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) && phantom == 0 && timeouts < 300 {
        let asked = timed_begins.load(Ordering::SeqCst);
        match frame.begin_timeout(Access::CpuRead, Duration::from_secs(10)) {
            // Begun in the word without asking: legitimate.
            Ok(_) if timed_begins.load(Ordering::SeqCst) == asked => fast += 1,
            // Asked, planned, and timed out by the broker: a phantom.
            Ok(guard) => {
                assert!(guard.in_word());
                phantom += 1;
            }
            Err(err) => {
                assert_eq!(err.code(), Some(ErrorCode::Timeout), "{err}");
                timeouts += 1;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let sibling_in_word = sibling.join().expect("sibling");
    drop(frame);
    drop(client);
    broker.join().expect("broker");
    eprintln!("fast {fast}, timeouts {timeouts}, phantom grants {phantom}, sibling reads in word {sibling_in_word}");
    assert_eq!(
        phantom, 0,
        "after {timeouts} correct timeouts, a timed-out waiter took a sibling's bit for its hand-off"
    );
}
