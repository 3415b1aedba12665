//! A daemon whose first heap never answers: its node, "slow", is the file
//! of a [`StallingFuse`] that holds every `IOCTL` (a dma-heap's
//! allocation) unanswered until it is released (then the ioctl fails, and
//! the allocation falls back to memfd). For tests of allocations held in
//! flight: tests/slow_heaps.rs, and the views of them in tests/dbus.rs.

use std::os::unix::fs::symlink;

use crate::fuse::{Stall, StallingFuse};
use crate::{Daemon, DaemonOptions, TempDir};

/// The daemon, its heap directory and the FUSE server.
#[derive(Debug)]
pub struct SlowHeap {
    // Dropped first: the daemon outlives the server it waits on.
    fuse: Option<StallingFuse>,
    pub daemon: Daemon,
    _heaps: TempDir,
}

impl SlowHeap {
    /// `None`, saying why, where the test cannot run (see
    /// [`StallingFuse::mount`]).
    pub fn start(test: &str, policy: Option<&str>) -> Option<SlowHeap> {
        SlowHeap::start_with(test, policy, Vec::new())
    }

    /// As [`SlowHeap::start`], with more arguments for the daemon (a bus
    /// to serve its D-Bus view on, say).
    pub fn start_with(test: &str, policy: Option<&str>, args: Vec<String>) -> Option<SlowHeap> {
        let fuse = StallingFuse::mount(test, Stall::Ioctl)?;
        let heaps = TempDir::new("heaps");
        symlink(fuse.file(), heaps.path().join("slow")).expect("heap node");
        let mut all = vec![
            "--dma-heap-dir".into(),
            heaps.path().display().to_string(),
            "--udmabuf".into(),
            "/nonexistent".into(),
        ];
        all.extend(args);
        let daemon = Daemon::start_with(DaemonOptions {
            policy: policy.map(str::to_owned),
            args: all,
            ..Default::default()
        });
        Some(SlowHeap {
            fuse: Some(fuse),
            daemon,
            _heaps: heaps,
        })
    }

    /// Waits until an allocation is held in the heap's ioctl.
    pub fn await_ioctl(&mut self) {
        if let Some(fuse) = self.fuse.as_mut() {
            fuse.await_ioctl();
        }
    }

    /// Kills the server: the held ioctl fails, and its allocation falls
    /// back to the next heap.
    pub fn release(&mut self) {
        self.fuse = None;
    }
}
