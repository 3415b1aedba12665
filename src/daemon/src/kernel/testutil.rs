//! Test helpers shared by the kernel and heaps tests (no `tempfile` dependency
//! in the daemon crate).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A pipe's write end, and whether its read end sees every writer gone:
/// for tests of where and when an fd is closed.
pub(crate) fn watched_pipe() -> (std::os::fd::OwnedFd, impl Fn() -> bool) {
    use std::os::fd::AsRawFd;
    let (read, write) = nix::unistd::pipe().expect("pipe");
    nix::fcntl::fcntl(
        read.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )
    .expect("nonblocking");
    let closed = move || {
        let mut byte = [0u8; 1];
        matches!(nix::unistd::read(read.as_raw_fd(), &mut byte), Ok(0))
    };
    (write, closed)
}

/// A connected SOCK_SEQPACKET pair (close-on-exec), the daemon's kind of
/// client connection.
pub(crate) fn seqpacket_pair(nonblocking: bool) -> (std::os::fd::OwnedFd, std::os::fd::OwnedFd) {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    let mut flags = SockFlag::SOCK_CLOEXEC;
    if nonblocking {
        flags |= SockFlag::SOCK_NONBLOCK;
    }
    socketpair(AddressFamily::Unix, SockType::SeqPacket, None, flags).expect("socketpair")
}

/// A runtime as the daemon's: one thread, every driver on.
pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// A directory under the system temp dir, removed on drop.
#[derive(Debug)]
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    pub(crate) fn new(tag: &str) -> TempDir {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("dmabrokerd-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Checks what `/proc/self/fdinfo` says about a dma-buf: the name set on it,
/// the exporter (heap) and the size.
pub(crate) fn assert_fdinfo(
    fd: std::os::fd::BorrowedFd<'_>,
    name: &str,
    exporter: &str,
    size: u64,
) {
    let info = super::fdinfo(fd).expect("fdinfo");
    assert_eq!(info.get("name").map(String::as_str), Some(name), "{info:?}");
    assert_eq!(
        info.get("exp_name").map(String::as_str),
        Some(exporter),
        "{info:?}"
    );
    assert_eq!(info.get("size"), Some(&size.to_string()), "{info:?}");
}
