//! Begins given up on: a caller's `tokio::time::timeout` that expires, or
//! the losing branch of a `select!`, drops an `_async` begin's future while
//! the broker still has it queued. These run that, and check what a
//! program on its way out relies on: dropping the runtime does not wait
//! for the abandoned begin.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use dmabroker_client::{AccessGuard, Result};

/// How long a runtime may take to shut down with nothing left to wait for
/// (generous for a loaded machine; one that waits for the broker waits
/// until the buffer's holder ends, perhaps never).
pub const SHUTDOWN: Duration = Duration::from_secs(5);

/// A current-thread runtime, as a small program's.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Runs `begin` under a timeout of `patience` that must expire (the buffer
/// is held), so its future is dropped with the begin still waiting.
#[track_caller]
pub fn give_up_on(
    runtime: &tokio::runtime::Runtime,
    patience: Duration,
    begin: impl Future<Output = Result<AccessGuard>>,
) {
    let outcome = runtime.block_on(async { tokio::time::timeout(patience, begin).await });
    assert!(outcome.is_err(), "granted while held: {outcome:?}");
}

/// As [`give_up_on`], but the future stays with the caller, to drop later.
#[track_caller]
pub fn wait_impatiently<F: Future<Output = Result<AccessGuard>>>(
    runtime: &tokio::runtime::Runtime,
    patience: Duration,
    begin: &mut Pin<Box<F>>,
) {
    let outcome = runtime.block_on(async { tokio::time::timeout(patience, begin.as_mut()).await });
    assert!(outcome.is_err(), "granted while held: {outcome:?}");
}

/// Runs `drop_it` on a thread of its own and fails if it takes longer than
/// `SHUTDOWN`, so that a test fails rather than hangs; `what` names it.
#[track_caller]
pub fn assert_returns_promptly(what: &str, drop_it: impl FnOnce() + Send + 'static) {
    let (done, dropped) = std::sync::mpsc::channel();
    let start = Instant::now();
    std::thread::spawn(move || {
        drop_it();
        let _ = done.send(());
    });
    if dropped.recv_timeout(SHUTDOWN).is_err() {
        panic!(
            "{what} still waits for the abandoned begin after {:?}",
            start.elapsed()
        );
    }
}

/// Drops the runtime, as a program does on its way out: a blocking-pool
/// thread still waiting for the broker holds the drop until the broker
/// answers (on a buffer held by someone else, perhaps never).
#[track_caller]
pub fn assert_shuts_down_promptly(runtime: tokio::runtime::Runtime) {
    assert_returns_promptly("the runtime", move || drop(runtime));
}
