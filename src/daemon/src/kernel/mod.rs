//! The handful of kernel interfaces the broker needs: dma-heaps, dma-buf
//! ioctls, udmabuf, sealed memfds and sync_files.
//!
//! The ioctls are written by hand on top of `nix` instead of using the
//! `dma-heap`/`dma-buf` crates because those lack heap discovery, buffer
//! naming, sync_file export/import and EINTR/EAGAIN restart, all of which the
//! broker depends on. This is the only place in the daemon allowed to contain
//! `unsafe`; everything exported from here is safe and takes `BorrowedFd` /
//! returns `OwnedFd`, so fd ownership is checked by the compiler everywhere
//! else.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::PathBuf;

use nix::errno::Errno;

pub mod dma_buf;
pub mod dma_heap;
pub mod mapping;
pub mod memfd;
pub mod socket;
pub mod sync_file;
mod uapi;
pub mod udmabuf;
pub mod userns;

#[cfg(test)]
pub(crate) mod testutil;

/// Environment variable the VM test runner sets so that a missing kernel
/// feature fails a `kernel_tier_*` test instead of silently skipping it.
pub const REQUIRE_KERNEL_ENV: &str = "DMABROKER_REQUIRE_KERNEL";

/// Errors from the kernel layer. Each carries the operation and the object it
/// was applied to, because a bare errno from an ioctl deep in a fallback chain
/// is useless in a log line.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KernelError {
    /// A syscall or ioctl returned an error.
    #[error("{op} on {target}: {errno}")]
    Sys {
        op: &'static str,
        target: String,
        errno: Errno,
    },
    /// Rejected before reaching the kernel, because the kernel would answer
    /// with a bare EINVAL that does not say which precondition was violated.
    #[error("{op} on {target}: {reason}")]
    Invalid {
        op: &'static str,
        target: String,
        reason: String,
    },
    /// Filesystem-level failure (reading a directory, /proc, ...).
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl KernelError {
    /// The errno, if the failure came from the kernel; lets callers tell
    /// "not supported by this kernel" (ENOTTY) apart from real failures.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            KernelError::Sys { errno, .. } => Some(*errno),
            KernelError::Io { source, .. } => source.raw_os_error().map(Errno::from_raw),
            KernelError::Invalid { .. } => None,
        }
    }

    pub(crate) fn sys(op: &'static str, target: impl Into<String>, errno: Errno) -> Self {
        KernelError::Sys {
            op,
            target: target.into(),
            errno,
        }
    }

    pub(crate) fn invalid(
        op: &'static str,
        target: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        KernelError::Invalid {
            op,
            target: target.into(),
            reason: reason.into(),
        }
    }
}

/// Short description of an fd for error messages.
pub(crate) fn fd_target(fd: BorrowedFd<'_>) -> String {
    format!("fd {}", fd.as_raw_fd())
}

/// Whether `fd`'s inode has no file type: an anonymous inode of a kernel
/// pseudo file system (a dma-buf's is made so), never a device node, a FIFO
/// or a socket, whose fdinfo may be their driver's and take its locks (a
/// tun device's takes `rtnl_lock`, which a client can keep while a FUSE
/// server of its withholds a page its ioctl copies from). Asked with
/// `AT_STATX_DONT_SYNC`, which a device never sees and a FUSE file answers
/// from its cache, not from its server.
pub(crate) fn typeless_inode(fd: BorrowedFd<'_>) -> bool {
    // SAFETY: `statx` is plain old data; all zeroes is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is open for the call; the empty path is a NUL-terminated
    // C string (AT_EMPTY_PATH: the fd itself), and `stx` is a writable
    // `struct statx` the kernel fills.
    let rc = unsafe {
        libc::statx(
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_STATX_DONT_SYNC,
            libc::STATX_TYPE,
            &mut stx,
        )
    };
    rc == 0 && stx.stx_mask & libc::STATX_TYPE != 0 && u32::from(stx.stx_mode) & libc::S_IFMT == 0
}

/// `KCMP_FILE` of `<linux/kcmp.h>`.
const KCMP_FILE: libc::c_int = 0;

/// Whether `a` and `b` are the same open file (`kcmp(KCMP_FILE)`): an equal
/// inode number does not say so everywhere. Before Linux 5.18 (and its
/// backports), a dma-buf's inode number came from `get_next_ino()`, a
/// 32-bit counter shared with pipes and sockets that wraps, so a process
/// that makes a few billion pipes can make a dma-buf whose number is a
/// brokered one's. `None` where the kernel will not say (no `CONFIG_KCMP`,
/// a seccomp filter): the caller falls back to what it can compare. Asks
/// no file system anything (it compares the kernel's file pointers).
pub(crate) fn same_file(a: BorrowedFd<'_>, b: BorrowedFd<'_>) -> Option<bool> {
    let pid = libc::pid_t::try_from(std::process::id()).ok()?;
    // SAFETY: kcmp takes no pointers; it compares two fds of this process,
    // both open for the call (borrowed).
    let order = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            pid,
            pid,
            KCMP_FILE,
            a.as_raw_fd() as libc::c_ulong,
            b.as_raw_fd() as libc::c_ulong,
        )
    };
    match order {
        0 => Some(true),
        1..=3 => Some(false),
        _ => None,
    }
}

/// What `/proc/self/fd/N` names for `fd`: `/dmabuf:…`, `anon_inode:sync_file`,
/// a path. Reading the link asks no file system anything, where `fstat`,
/// `fstatfs`, `lseek` or an ioctl on a client's fd may go to a FUSE server
/// the client runs, which can leave the broker's one thread waiting for
/// good; so a client's fd is looked at this way before any of those.
pub(crate) fn fd_link(fd: BorrowedFd<'_>) -> Option<String> {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

/// How many times an EAGAIN is retried before giving up. EINTR is always
/// retried (it only means a signal arrived); EAGAIN from these ioctls is a
/// transient "try again" from the driver, but an unbounded loop would spin
/// forever on a driver that keeps returning it.
const MAX_EAGAIN_RETRIES: u32 = 100;

/// Restarts an ioctl on EINTR/EAGAIN, as libdrm's `drmIoctl` does: the dma-buf
/// ioctls may be interrupted while waiting for fences and are safe to reissue.
pub(crate) fn retry<T>(mut f: impl FnMut() -> nix::Result<T>) -> nix::Result<T> {
    let mut again = 0;
    loop {
        match f() {
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) if again < MAX_EAGAIN_RETRIES => {
                again += 1;
                std::thread::yield_now();
            }
            other => return other,
        }
    }
}

/// The system page size; every backend hands out whole pages, and udmabuf
/// rejects anything not page-aligned.
pub fn page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions; it only reads a
    // configuration value.
    let ps = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if ps > 0 {
        ps as u64
    } else {
        4096
    }
}

/// Rounds `size` up to a whole number of pages; `None` on overflow so callers
/// can report an absurd size instead of wrapping around to a tiny buffer.
pub fn page_round(size: u64) -> Option<u64> {
    let ps = page_size();
    size.checked_add(ps - 1).map(|s| s / ps * ps)
}

/// True when the test runner demands real kernel features
/// (`DMABROKER_REQUIRE_KERNEL=1`).
pub fn kernel_required() -> bool {
    std::env::var(REQUIRE_KERNEL_ENV).is_ok_and(|v| v == "1")
}

/// Decides whether a `kernel_tier_*` test runs. On the build host the devices
/// are usually missing and the test should skip visibly rather than pass
/// silently; inside the VM runner a missing device is a broken image and must
/// fail.
///
/// Returns `true` when the test should run.
///
/// # Panics
///
/// When `available` is false and `DMABROKER_REQUIRE_KERNEL=1` is set.
pub fn require_or_skip(feature: &str, available: bool) -> bool {
    if available {
        return true;
    }
    if kernel_required() {
        panic!("{feature} is not available but {REQUIRE_KERNEL_ENV}=1 requires it");
    }
    note_skip(&format!(
        "{feature} not available on this kernel (set {REQUIRE_KERNEL_ENV}=1 to fail instead)"
    ));
    false
}

/// Where skipped tests say why, one line each, so that `tests/run` can list
/// them: the test harness captures a passing test's output, and a skip
/// printed only there would pass silently.
pub const SKIP_LOG_ENV: &str = "DMABROKER_SKIP_LOG";

/// Tests: says why a test skips, on stderr and in `$DMABROKER_SKIP_LOG`.
pub fn note_skip(why: &str) {
    eprintln!("SKIPPED: {why}");
    if let Some(path) = std::env::var_os(SKIP_LOG_ENV) {
        use std::io::Write;
        let logged = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
            // One write of the whole line: with O_APPEND, lines written
            // by tests running at once do not interleave.
            .and_then(|mut log| log.write_all(format!("{why}\n").as_bytes()));
        if let Err(err) = logged {
            eprintln!("cannot record the skip in ${SKIP_LOG_ENV}: {err}");
        }
    }
}

/// Parses `/proc/self/fdinfo/<fd>` into key/value pairs. For dma-bufs this is
/// where the kernel reports `size`, `exp_name` and `name`, which is the only
/// way to check from userspace that naming and sizing actually took effect.
/// Read as bytes: any holder of a dma-buf may name it with bytes that are
/// not UTF-8, which the kernel prints as they are, and a read as text then
/// failed (an adopt of that dma-buf was refused as not one).
pub fn fdinfo(fd: BorrowedFd<'_>) -> Result<HashMap<String, String>, KernelError> {
    let path = PathBuf::from(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()));
    let bytes = std::fs::read(&path).map_err(|source| KernelError::Io {
        op: "read",
        path: path.clone(),
        source,
    })?;
    Ok(parse_fdinfo(&String::from_utf8_lossy(&bytes)))
}

fn parse_fdinfo(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|line| {
            // Split at the first colon only: dma-buf names may contain colons.
            let (key, value) = line.split_once(':')?;
            Some((key.trim().to_owned(), value.trim().to_owned()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    /// Device nodes, FIFOs, sockets and files have a type; an anonymous
    /// inode (an eventfd's here, a dma-buf's in the kernel tier) has none.
    #[test]
    fn only_anonymous_inodes_are_typeless() {
        let null = std::fs::File::open("/dev/null").expect("/dev/null");
        assert!(!typeless_inode(null.as_fd()), "a device node");
        let memfd = memfd::create_sealed("typed", 4096).expect("memfd");
        assert!(!typeless_inode(memfd.as_fd()), "a file");
        let (a, _b) = testutil::seqpacket_pair(false);
        assert!(!typeless_inode(a.as_fd()), "a socket");
        let (read, _write) = nix::unistd::pipe().expect("pipe");
        assert!(!typeless_inode(read.as_fd()), "a FIFO");
        // SAFETY: no pointers; returns a new fd or -1.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        assert!(raw >= 0, "eventfd");
        // SAFETY: `raw` was just created for us and nothing else owns it.
        let event = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
        assert!(typeless_inode(event.as_fd()), "an anonymous inode");
    }

    /// Two fds of one open file are the same file; two files, or two opens
    /// of one path, are not. A kernel that will not say is a skip.
    #[test]
    fn same_file_tells_one_open_file_from_another() {
        let memfd = memfd::create_sealed("same", 4096).expect("memfd");
        let dup = memfd.try_clone().expect("dup");
        let other = memfd::create_sealed("other", 4096).expect("memfd");
        let Some(same) = same_file(memfd.as_fd(), dup.as_fd()) else {
            note_skip("kcmp(KCMP_FILE) is not available here");
            return;
        };
        assert!(same, "a dup is the same open file");
        assert_eq!(same_file(memfd.as_fd(), other.as_fd()), Some(false));
        let null_a = std::fs::File::open("/dev/null").expect("/dev/null");
        let null_b = std::fs::File::open("/dev/null").expect("/dev/null");
        assert_eq!(
            same_file(null_a.as_fd(), null_b.as_fd()),
            Some(false),
            "two opens of one path are two files"
        );
    }

    #[test]
    fn page_round_rounds_up_and_detects_overflow() {
        let ps = page_size();
        assert!(ps.is_power_of_two());
        assert_eq!(page_round(1), Some(ps));
        assert_eq!(page_round(ps), Some(ps));
        assert_eq!(page_round(ps + 1), Some(2 * ps));
        assert_eq!(page_round(0), Some(0));
        assert_eq!(page_round(u64::MAX), None);
    }

    #[test]
    fn parse_fdinfo_keeps_colons_in_values() {
        let map =
            parse_fdinfo("pos:\t0\nflags:\t02000002\nexp_name:\tsystem\nname:\tcam0:client42\n");
        assert_eq!(map["pos"], "0");
        assert_eq!(map["exp_name"], "system");
        assert_eq!(map["name"], "cam0:client42");
    }

    #[test]
    fn fdinfo_reads_own_fd() {
        let file = std::fs::File::open("/proc/self/status").expect("open");
        let map = fdinfo(file.as_fd()).expect("fdinfo");
        assert!(map.contains_key("flags"), "{map:?}");
        assert!(map.contains_key("pos"), "{map:?}");
    }

    #[test]
    fn retry_restarts_eintr_and_bounds_eagain() {
        let mut calls = 0;
        let r = retry(|| {
            calls += 1;
            if calls < 3 {
                Err(Errno::EINTR)
            } else {
                Ok(calls)
            }
        });
        assert_eq!(r, Ok(3));

        let mut calls = 0u32;
        let r: nix::Result<()> = retry(|| {
            calls += 1;
            Err(Errno::EAGAIN)
        });
        assert_eq!(r, Err(Errno::EAGAIN));
        assert_eq!(calls, MAX_EAGAIN_RETRIES + 1);
    }

    #[test]
    fn require_or_skip_runs_when_available() {
        // Its skip path runs in every kernel-tier test on the host, which
        // `tests/run` lists; an imaginary feature here would join the list.
        assert!(require_or_skip("anything", true));
    }

    #[test]
    fn errors_carry_context() {
        let e = KernelError::sys(
            "DMA_HEAP_IOCTL_ALLOC",
            "/dev/dma_heap/system",
            Errno::ENOMEM,
        );
        let msg = e.to_string();
        assert!(msg.contains("DMA_HEAP_IOCTL_ALLOC"), "{msg}");
        assert!(msg.contains("/dev/dma_heap/system"), "{msg}");
        assert!(msg.contains("ENOMEM"), "{msg}");
        assert_eq!(e.errno(), Some(Errno::ENOMEM));
    }
}
