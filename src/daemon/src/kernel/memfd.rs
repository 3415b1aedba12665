//! Sealed memfds: the backing of the `memfd` backend and of udmabufs.
//!
//! Seals are what make a memfd safe to share: once a client has mapped the
//! buffer, nobody (the daemon included) can shrink it under the mapping and
//! turn the client's next access into a SIGBUS.

use std::ffi::CString;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};

use super::{fd_target, KernelError};

/// The kernel limit on a memfd name (NAME_MAX minus the "memfd:" prefix).
pub const MEMFD_NAME_MAX: usize = 249;

/// Creates a memfd for the memfd backend: fixed size, contents writable,
/// seals locked (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) so that the size
/// a client was promised can never change.
pub fn create_sealed(name: &str, size: u64) -> Result<OwnedFd, KernelError> {
    let fd = create(name, size)?;
    add_seals(
        &fd,
        SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL,
    )?;
    Ok(fd)
}

/// Creates a memfd to back a udmabuf. udmabuf requires F_SEAL_SHRINK and
/// refuses F_SEAL_WRITE, and it pins the pages itself, so no other seal is
/// added.
pub fn create_for_udmabuf(name: &str, size: u64) -> Result<OwnedFd, KernelError> {
    let fd = create(name, size)?;
    add_seals(&fd, SealFlag::F_SEAL_SHRINK)?;
    Ok(fd)
}

/// The seals currently set on `fd`. Fails with EINVAL for files that do not
/// support sealing (anything that is not shmem/hugetlbfs).
pub fn seals(fd: BorrowedFd<'_>) -> Result<SealFlag, KernelError> {
    fcntl(fd.as_raw_fd(), FcntlArg::F_GET_SEALS)
        .map(SealFlag::from_bits_retain)
        .map_err(|errno| KernelError::sys("F_GET_SEALS", fd_target(fd), errno))
}

/// Whether `fd` is a memfd. F_GET_SEALS also succeeds on plain tmpfs files,
/// so the /proc link (`/memfd:NAME (deleted)`) decides when /proc is
/// available; without /proc, sealability is the best available answer.
pub fn is_memfd(fd: BorrowedFd<'_>) -> bool {
    if seals(fd).is_err() {
        return false;
    }
    match std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())) {
        Ok(target) => target.to_string_lossy().starts_with("/memfd:"),
        Err(_) => true,
    }
}

/// Truncates a name to `max` bytes without splitting a UTF-8 character.
pub(crate) fn truncate_name(name: &str, max: usize) -> &str {
    if name.len() <= max {
        return name;
    }
    let mut end = max;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

fn create(name: &str, size: u64) -> Result<OwnedFd, KernelError> {
    const OP: &str = "memfd_create";
    let target = || format!("memfd {name:?}");
    if size == 0 {
        return Err(KernelError::invalid(OP, target(), "zero-size memfd"));
    }
    let len = i64::try_from(size)
        .map_err(|_| KernelError::invalid(OP, target(), format!("size {size} too large")))?;
    let cname = CString::new(truncate_name(name, MEMFD_NAME_MAX))
        .map_err(|_| KernelError::invalid(OP, target(), "name contains a NUL byte"))?;
    let base = MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING;
    // MFD_NOEXEC_SEAL (6.3+) keeps the buffer non-executable and avoids the
    // kernel's warning / refusal under vm.memfd_noexec; older kernels reject
    // the unknown flag with EINVAL, so retry without it.
    let noexec = MemFdCreateFlag::from_bits_retain(libc::MFD_NOEXEC_SEAL);
    let fd = match memfd_create(&cname, base | noexec) {
        Err(Errno::EINVAL) => memfd_create(&cname, base),
        other => other,
    }
    .map_err(|errno| KernelError::sys(OP, target(), errno))?;
    nix::unistd::ftruncate(&fd, len)
        .map_err(|errno| KernelError::sys("ftruncate", target(), errno))?;
    Ok(fd)
}

fn add_seals(fd: &OwnedFd, seals: SealFlag) -> Result<(), KernelError> {
    use std::os::fd::AsFd;
    fcntl(fd.as_raw_fd(), FcntlArg::F_ADD_SEALS(seals))
        .map(drop)
        .map_err(|errno| KernelError::sys("F_ADD_SEALS", fd_target(fd.as_fd()), errno))
}

/// An unsealed memfd, to check that code refuses one.
#[cfg(test)]
pub(crate) fn create_unsealed_for_test(name: &str, size: u64) -> OwnedFd {
    create(name, size).expect("memfd_create")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::dma_buf;
    use crate::kernel::testutil::TempDir;
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::fd::AsFd;

    #[test]
    fn sealed_memfd_has_size_and_refuses_resizing() {
        let fd = create_sealed("test-buffer", 3 * 4096).expect("create");
        assert_eq!(dma_buf::size(fd.as_fd()).expect("size"), 3 * 4096);
        let s = seals(fd.as_fd()).expect("seals");
        assert!(s.contains(SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL));
        assert!(!s.contains(SealFlag::F_SEAL_WRITE));
        assert_eq!(nix::unistd::ftruncate(&fd, 4096), Err(Errno::EPERM));
        assert_eq!(nix::unistd::ftruncate(&fd, 4 * 4096), Err(Errno::EPERM));
        // F_SEAL_SEAL: no further seals, in particular no F_SEAL_WRITE that
        // would break clients' writable mappings.
        assert_eq!(
            fcntl(
                fd.as_raw_fd(),
                FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_WRITE)
            ),
            Err(Errno::EPERM)
        );
        // Contents stay writable.
        let mut file = std::fs::File::from(fd);
        file.write_all(b"payload").expect("write");
        file.seek(SeekFrom::Start(0)).expect("seek");
        let mut back = [0u8; 7];
        file.read_exact(&mut back).expect("read");
        assert_eq!(&back, b"payload");
    }

    /// heaps.md: a memfd buffer is made with `MFD_NOEXEC_SEAL` where the
    /// kernel has it (6.3 on): no exec bit, and sealed so none can be set,
    /// so a client cannot map a buffer it shares as code.
    #[test]
    fn memfd_buffers_are_never_executable_where_the_kernel_can_seal_them_so() {
        use std::os::unix::fs::PermissionsExt;
        const F_SEAL_EXEC: i32 = 0x0020;
        let probe = memfd_create(
            c"noexec-probe",
            MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::from_bits_retain(libc::MFD_NOEXEC_SEAL),
        );
        if matches!(probe, Err(Errno::EINVAL)) {
            crate::kernel::note_skip("MFD_NOEXEC_SEAL needs Linux 6.3");
            return;
        }
        for fd in [
            create_sealed("noexec", 4096).expect("create"),
            create_for_udmabuf("noexec-udmabuf", 4096).expect("create"),
        ] {
            let file = std::fs::File::from(fd.try_clone().expect("dup"));
            let mode = file.metadata().expect("stat").permissions().mode();
            assert_eq!(mode & 0o111, 0, "mode {mode:o}");
            let sealed = seals(fd.as_fd()).expect("seals");
            assert_ne!(sealed.bits() & F_SEAL_EXEC, 0, "seals {sealed:?}");
        }
    }

    #[test]
    fn udmabuf_backing_is_shrink_sealed_only() {
        let fd = create_for_udmabuf("udmabuf-backing", 4096).expect("create");
        let s = seals(fd.as_fd()).expect("seals");
        assert!(s.contains(SealFlag::F_SEAL_SHRINK));
        assert!(
            !s.intersects(SealFlag::F_SEAL_WRITE | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL)
        );
        assert_eq!(nix::unistd::ftruncate(&fd, 0), Err(Errno::EPERM));
    }

    #[test]
    fn memfd_name_is_visible_and_truncated() {
        let fd = create_sealed("cam0:client42", 4096).expect("create");
        let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("link");
        assert!(
            link.to_string_lossy().starts_with("/memfd:cam0:client42"),
            "{link:?}"
        );

        let long = "é".repeat(200); // 400 bytes
        let fd = create_sealed(&long, 4096).expect("create long");
        let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("link");
        let shown = link.to_string_lossy();
        let name = shown
            .strip_prefix("/memfd:")
            .and_then(|s| s.strip_suffix(" (deleted)"))
            .expect("memfd link");
        assert_eq!(name, "é".repeat(124)); // 248 bytes: the char boundary at or below 249
    }

    #[test]
    fn invalid_arguments_are_rejected() {
        assert!(matches!(
            create_sealed("x", 0),
            Err(KernelError::Invalid { .. })
        ));
        assert!(matches!(
            create_sealed("a\0b", 4096),
            Err(KernelError::Invalid { .. })
        ));
        assert!(matches!(
            create_sealed("x", u64::MAX),
            Err(KernelError::Invalid { .. })
        ));
    }

    #[test]
    fn is_memfd_distinguishes_files() {
        let fd = create_sealed("probe", 4096).expect("create");
        assert!(is_memfd(fd.as_fd()));
        let dir = TempDir::new("memfd");
        let path = dir.path().join("plain");
        std::fs::write(&path, b"x").expect("write");
        let file = std::fs::File::open(&path).expect("open");
        assert!(!is_memfd(file.as_fd()));
    }

    #[test]
    fn truncate_name_respects_char_boundaries() {
        assert_eq!(truncate_name("abc", 5), "abc");
        assert_eq!(truncate_name("abcdef", 3), "abc");
        assert_eq!(truncate_name("aé", 2), "a");
        assert_eq!(truncate_name("", 0), "");
    }
}
