//! Test harness for dmabroker's integration tests: starts the real
//! `dmabrokerd` on a private socket, runs real client processes, and
//! measures what a leak would show (the daemon's open fds).

pub mod daemon;
pub mod dbus;
pub mod proc;
pub mod raw;
pub mod scripted;
pub mod sdnotify;
pub mod tmp;
pub mod vgem;

pub use daemon::{Daemon, DaemonOptions};
pub use scripted::Scripted;
pub use tmp::TempDir;

/// Kernel-tier tests run only where the kernel has the feature; on the
/// host they print why they skip. In the VM (`DMABROKER_REQUIRE_KERNEL=1`)
/// a missing feature is a failure, never a silent pass.
pub fn kernel_feature(feature: &str, available: bool) -> bool {
    if available {
        return true;
    }
    if std::env::var_os("DMABROKER_REQUIRE_KERNEL").is_some_and(|v| v == "1") {
        panic!(
            "kernel feature {feature} is required here (DMABROKER_REQUIRE_KERNEL=1) but missing"
        );
    }
    eprintln!("SKIPPED: kernel feature {feature} is not available on this kernel");
    false
}

/// Tests that need root (to run clients under other uids) print why they
/// skip elsewhere.
pub fn have_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    eprintln!("SKIPPED: {test} needs root to run clients under other uids");
    false
}
