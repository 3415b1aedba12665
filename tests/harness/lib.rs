//! Test harness for dmabroker's integration tests: starts the real
//! `dmabrokerd` on a private socket, runs real client processes, and
//! measures what a leak would show (the daemon's open fds).

pub mod abandon;
pub mod daemon;
pub mod dbus;
pub mod fake_broker;
pub mod fuse;
pub mod proc;
pub mod raw;
pub mod scripted;
pub mod sdnotify;
pub mod slow_heap;
pub mod systemd1;
pub mod tmp;
pub mod userns;
pub mod vgem;

pub use daemon::{Daemon, DaemonOptions};
pub use fuse::served_within;
pub use scripted::Scripted;
pub use tmp::TempDir;

/// Kernel-tier tests run only where the kernel has the feature; on the
/// host they print why they skip. In the VM (`DMABROKER_REQUIRE_KERNEL=1`)
/// a missing feature is a failure, never a silent pass. One decision for
/// the daemon's own kernel tests and the suite's.
pub use dmabroker_daemon::kernel::require_or_skip as kernel_feature;

/// Polls `check` for up to 5 s: for the broker's side of things that has
/// no signal of its own (a queued request, a noticed hang-up, a timer).
pub fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !check() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Tests that need root (to run clients under other uids) print why they
/// skip elsewhere.
pub fn have_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    dmabroker_daemon::kernel::note_skip(&format!(
        "{test} needs root to run clients under other uids"
    ));
    false
}
