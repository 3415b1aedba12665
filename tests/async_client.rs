//! The client's `_async` begin against the real daemon, when the caller
//! stops waiting: a `tokio::time::timeout` that expires, or the losing
//! branch of a `select!`, drops the begin's future while the broker still
//! has the request queued. Nothing the caller can see is left holding the
//! buffer then, so nothing may hold it: the access the broker grants
//! afterwards (by message, or handed over in the buffer's word) must end
//! at once, as if the caller had dropped the guard, or every other user
//! of the buffer waits for the abandoned access until this client exits.

use std::future::Future;
use std::time::Duration;

use dmabroker_client::{Access, AccessGuard, Buffer, ErrorCode};
use dmabroker_suite::dbus::fields::{TOTALS_FENCES, TOTALS_WAITERS};
use dmabroker_suite::dbus::DbusDaemon;
use dmabroker_suite::eventually;

/// How long the caller waits before it gives up on the begin.
const IMPATIENT: Duration = Duration::from_millis(50);
/// How long a begin that must be granted is given (generous for a loaded
/// machine; an access nobody ends is never given back at all).
const PROMPTLY: Duration = Duration::from_secs(2);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Runs `begin` under a timeout that expires (the buffer is held), so its
/// future is dropped with the begin still waiting.
fn give_up_on(
    runtime: &tokio::runtime::Runtime,
    begin: impl Future<Output = dmabroker_client::Result<AccessGuard>>,
) {
    let outcome = runtime.block_on(async { tokio::time::timeout(IMPATIENT, begin).await });
    assert!(outcome.is_err(), "granted while held: {outcome:?}");
}

/// A write by a third process, after the abandoned begin's access came
/// and went.
#[track_caller]
fn assert_writable(buffer: &Buffer, why: &str) {
    match buffer.begin_timeout(Access::CpuWrite, PROMPTLY) {
        Ok(write) => drop(write),
        Err(err) if err.code() == Some(ErrorCode::Timeout) => {
            panic!("{why}: the abandoned access is still held")
        }
        Err(err) => panic!("{why}: {err}"),
    }
}

/// By message: the read is queued behind a write, the caller gives up,
/// the write ends and the broker grants the read to a reply nobody reads.
/// Fails if that grant becomes no guard (the read is held until the
/// client exits, and the next writer times out).
#[test]
fn an_abandoned_async_begin_ends_the_access_granted_to_it() {
    let bus = DbusDaemon::start();
    let daemon = bus.start_broker(None);
    let writer = daemon.message_path_client().expect("writer");
    let reader = daemon.message_path_client().expect("reader");
    let third = daemon.message_path_client().expect("third");
    let buffer = writer.alloc(4096).expect("alloc");
    let token = buffer.export().expect("export");
    let theirs = reader.import(&token).expect("import");
    let next = third.import(&token).expect("import");
    let write = buffer.begin(Access::CpuWrite).expect("write");

    let runtime = runtime();
    give_up_on(&runtime, theirs.begin_async(Access::CpuRead, None));
    eventually("the abandoned read to queue", || {
        bus.totals(TOTALS_WAITERS) == 1
    });
    drop(write);
    assert_writable(&next, "a write after the abandoned read");
    eventually("every access to end", || bus.totals(TOTALS_FENCES) == 0);
    drop(runtime);
}

/// In the word: the reader is told `Planned`, the caller gives up, and the
/// writer's end hands the buffer over in the word to a slot nobody will
/// end. Fails if the hand-off becomes no guard (the word holds the read
/// until the client exits, and the next writer times out).
#[test]
fn an_abandoned_async_begin_ends_the_access_handed_off_to_it() {
    let bus = DbusDaemon::start();
    let daemon = bus.start_broker(None);
    let writer = daemon.client();
    let reader = daemon.client();
    let third = daemon.client();
    let buffer = writer.alloc(4096).expect("alloc");
    let token = buffer.export().expect("export");
    let theirs = reader.import(&token).expect("import");
    let next = third.import(&token).expect("import");
    drop(buffer.begin(Access::CpuWrite).expect("learn the slot"));
    drop(theirs.begin(Access::CpuRead).expect("learn the slot"));
    let write = buffer.begin(Access::CpuWrite).expect("write");
    assert!(write.in_word(), "the write must be held in the word");

    let runtime = runtime();
    give_up_on(&runtime, theirs.begin_async(Access::CpuRead, None));
    eventually("the abandoned read to be told `Planned`", || {
        bus.counter("HandOffsPlanned") == 1
    });
    drop(write);
    eventually("the hand-off", || bus.counter("HandOffs") == 1);
    assert_writable(&next, "a write after the abandoned hand-off");
    drop(runtime);
}

/// The caller gives up and then drops the buffer: the hold is freed at
/// once, which answers the begin still queued for it, not when the begin
/// would have been granted. Fails if the abandoned begin keeps the hold
/// (and its place in the queue) alive until the writer ends.
#[test]
fn a_buffer_dropped_after_an_abandoned_async_begin_leaves_the_queue() {
    let bus = DbusDaemon::start();
    let daemon = bus.start_broker(None);
    let writer = daemon.message_path_client().expect("writer");
    let reader = daemon.message_path_client().expect("reader");
    let buffer = writer.alloc(4096).expect("alloc");
    let theirs = reader
        .import(&buffer.export().expect("export"))
        .expect("import");
    let write = buffer.begin(Access::CpuWrite).expect("write");

    let runtime = runtime();
    give_up_on(&runtime, theirs.begin_async(Access::CpuRead, None));
    eventually("the abandoned read to queue", || {
        bus.totals(TOTALS_WAITERS) == 1
    });
    drop(theirs);
    eventually("the freed hold to leave the queue", || {
        bus.totals(TOTALS_WAITERS) == 0
    });
    assert_eq!(bus.totals(TOTALS_FENCES), 1, "only the write is held");
    drop(write);
    drop(runtime);
}
