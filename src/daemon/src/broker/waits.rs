//! Waiting for kernel fences without blocking the event loop.
//!
//! A dma-buf fd polls readable once its write fences have signalled and
//! writable once all have; a sync_file polls readable once it signals. Both
//! work with epoll, so tokio's reactor waits for them like for a socket.
//! Each wait gets its own dup of the fd: epoll registrations are per open
//! file description + fd number, and the broker's own fd must stay free.

use std::os::fd::AsFd;
use std::sync::OnceLock;
use std::time::Duration;

use crate::held_files::HeldDup;

use tokio::io::Interest;

use crate::kernel::dma_buf::{self, SyncDirection, SyncPhase};
use crate::kernel::KernelError;

async fn until_ready(fd: HeldDup, interest: Interest) {
    let Ok(async_fd) = crate::reactor::register(fd, interest) else {
        // Not pollable at all: nothing the kernel will tell us, so do not
        // hold the buffer hostage.
        tracing::warn!("fd cannot be polled; treating its fences as signalled");
        return;
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
/// with [`StartedSync::keep`]; dropped without it (the access ended or
/// went while START waited), it ENDs here, so every START has its END.
#[derive(Debug)]
pub struct StartedSync {
    dmabuf: Option<HeldDup>,
    direction: SyncDirection,
}

impl StartedSync {
    /// Blocks until the kernel lets the CPU access begin.
    pub fn start(dmabuf: HeldDup, direction: SyncDirection) -> Result<StartedSync, KernelError> {
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
}

/// Why a cache sync END off the broker's thread did not happen.
#[derive(Debug, thiserror::Error)]
pub enum CacheEndError {
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error("its blocking thread failed: {0}")]
    Thread(#[from] tokio::task::JoinError),
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
    /// [`cache_end_delay`]).
    pub fn run(&self) -> Result<(), CacheEndError> {
        if let Some(delay) = cache_end_delay() {
            std::thread::sleep(delay);
        }
        dma_buf::sync(self.dmabuf.as_fd(), self.direction, SyncPhase::End)?;
        Ok(())
    }
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

/// The longest [`cache_end_delay`] a test may ask for: the variable is read
/// in every build, and a value left set must not make a daemon useless.
const MAX_CACHE_END_DELAY: Duration = Duration::from_secs(10);

/// Test-only hook: `DMABROKER_TEST_CACHE_END_DELAY_MS=N` makes every cache
/// sync END take N ms longer (at most [`MAX_CACHE_END_DELAY`]), as the
/// cache clean of a big buffer does on a SoC whose devices do not snoop
/// the CPU's caches. On x86 END is nearly free, so without it a test
/// cannot see who waits for one. Read once; warned about at start, as the
/// other test hooks are, so that a value left set shows in the log.
pub fn cache_end_delay() -> Option<Duration> {
    static DELAY: OnceLock<Option<Duration>> = OnceLock::new();
    *DELAY.get_or_init(|| {
        let asked = std::env::var("DMABROKER_TEST_CACHE_END_DELAY_MS")
            .ok()?
            .parse::<u64>()
            .ok()?;
        let delay = Duration::from_millis(asked).min(MAX_CACHE_END_DELAY);
        tracing::warn!(
            asked_ms = asked,
            delay_ms = delay.as_millis() as u64,
            "test hook: every cache sync END is delayed"
        );
        Some(delay)
    })
}
