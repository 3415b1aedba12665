//! udmabuf (`/dev/udmabuf`, Linux 4.20+): turns pages of a memfd into a
//! dma-buf. Useful where no dma-heap exists but consumers insist on a real
//! dma-buf fd (e.g. for fdinfo, sync ioctls or import into a GPU driver).

use std::fs::OpenOptions;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::fcntl::SealFlag;

use super::uapi::{self, UdmabufCreate};
use super::{dma_buf, fd_target, memfd, page_size, retry, KernelError};

/// Where the udmabuf misc device lives.
pub const DEFAULT_UDMABUF_PATH: &str = "/dev/udmabuf";

/// The open udmabuf device.
#[derive(Debug)]
pub struct Udmabuf {
    fd: OwnedFd,
    path: PathBuf,
}

impl Udmabuf {
    /// Opens [`DEFAULT_UDMABUF_PATH`].
    pub fn open() -> Result<Udmabuf, KernelError> {
        Udmabuf::open_path(DEFAULT_UDMABUF_PATH)
    }

    /// Opens a udmabuf device at a non-standard path (containers, tests).
    pub fn open_path(path: impl AsRef<Path>) -> Result<Udmabuf, KernelError> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| KernelError::Io {
                op: "open udmabuf",
                path: path.to_owned(),
                source,
            })?;
        Ok(Udmabuf {
            fd: file.into(),
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates a dma-buf over `size` bytes of `memfd` starting at `offset`.
    /// The dma-buf pins the pages, so the memfd may be closed afterwards.
    ///
    /// The kernel's preconditions are checked here first because it reports
    /// every one of them as a bare EINVAL: the memfd must carry F_SEAL_SHRINK
    /// (so the pages cannot vanish) and must not carry F_SEAL_WRITE /
    /// F_SEAL_FUTURE_WRITE (the dma-buf is writable), and offset and size
    /// must be page-aligned and inside the file.
    pub fn create(
        &self,
        memfd: BorrowedFd<'_>,
        offset: u64,
        size: u64,
    ) -> Result<OwnedFd, KernelError> {
        const OP: &str = "UDMABUF_CREATE";
        let target = || self.path.display().to_string();
        let invalid = |reason: String| KernelError::invalid(OP, target(), reason);
        let ps = page_size();
        if size == 0 {
            return Err(invalid("zero-size udmabuf".into()));
        }
        // The page size is a power of two.
        if offset & (ps - 1) != 0 || size & (ps - 1) != 0 {
            return Err(invalid(format!(
                "offset {offset} and size {size} must be multiples of the page size {ps}"
            )));
        }
        let seals = memfd::seals(memfd).map_err(|e| {
            invalid(format!(
                "backing {} is not a sealable memfd: {e}",
                fd_target(memfd)
            ))
        })?;
        if !seals.contains(SealFlag::F_SEAL_SHRINK) {
            return Err(invalid("backing memfd lacks F_SEAL_SHRINK".into()));
        }
        if seals.intersects(SealFlag::F_SEAL_WRITE | SealFlag::F_SEAL_FUTURE_WRITE) {
            return Err(invalid("backing memfd is write-sealed".into()));
        }
        let backing = dma_buf::size(memfd)?;
        if !matches!(offset.checked_add(size), Some(end) if end <= backing) {
            return Err(invalid(format!(
                "range {offset}+{size} exceeds the {backing}-byte memfd"
            )));
        }
        let arg = UdmabufCreate {
            memfd: memfd.as_raw_fd() as u32,
            flags: uapi::UDMABUF_FLAGS_CLOEXEC,
            offset,
            size,
        };
        let raw = self.fd.as_raw_fd();
        let newfd = retry(|| {
            // SAFETY: `raw` and `arg.memfd` are live fds for the duration of
            // the call, and `arg` is a valid `struct udmabuf_create` the
            // kernel only reads.
            unsafe { uapi::udmabuf_create(raw, &arg) }
        })
        .map_err(|errno| KernelError::sys(OP, target(), errno))?;
        // SAFETY: UDMABUF_CREATE returns a freshly installed dma-buf fd that
        // nothing else in the process owns.
        Ok(unsafe { OwnedFd::from_raw_fd(newfd) })
    }
}

impl AsFd for Udmabuf {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::mapping::Mapping;
    use crate::kernel::testutil::TempDir;
    use crate::kernel::{fdinfo, require_or_skip};
    use nix::errno::Errno;

    fn device() -> Option<Udmabuf> {
        let available = Path::new(DEFAULT_UDMABUF_PATH).exists();
        if !require_or_skip("udmabuf (/dev/udmabuf)", available) {
            return None;
        }
        Some(Udmabuf::open().expect("open /dev/udmabuf"))
    }

    #[test]
    fn preconditions_are_checked_before_the_ioctl() {
        // A regular file stands in for the device: anything reaching the
        // ioctl fails with ENOTTY, so Invalid proves the early check fired.
        let dir = TempDir::new("udmabuf");
        let path = dir.path().join("udmabuf");
        std::fs::write(&path, b"").expect("write");
        let dev = Udmabuf::open_path(&path).expect("open stand-in");
        let ps = page_size();
        let good = memfd::create_for_udmabuf("backing", 4 * ps).expect("memfd");
        let sealed_all = memfd::create_sealed("sealed", 4 * ps).expect("memfd");
        let unsealed = memfd::create_unsealed_for_test("unsealed", 4 * ps);
        let plain = std::fs::File::open(&path).expect("open");

        let invalid =
            |r: Result<OwnedFd, KernelError>| matches!(r, Err(KernelError::Invalid { .. }));
        assert!(invalid(dev.create(good.as_fd(), 0, 0)));
        assert!(invalid(dev.create(good.as_fd(), 1, ps)));
        assert!(invalid(dev.create(good.as_fd(), 0, ps + 1)));
        assert!(invalid(dev.create(good.as_fd(), 0, 5 * ps)));
        assert!(invalid(dev.create(good.as_fd(), 4 * ps, ps)));
        assert!(invalid(dev.create(good.as_fd(), u64::MAX - ps + 1, ps)));
        assert!(invalid(dev.create(unsealed.as_fd(), 0, ps)));
        assert!(invalid(dev.create(plain.as_fd(), 0, ps)));
        // F_SEAL_GROW|F_SEAL_SEAL is fine for udmabuf; only write seals are not.
        let err = dev
            .create(sealed_all.as_fd(), 0, ps)
            .expect_err("not a device");
        assert_eq!(err.errno(), Some(Errno::ENOTTY), "{err}");
        let err = dev
            .create(good.as_fd(), ps, 3 * ps)
            .expect_err("not a device");
        assert_eq!(err.errno(), Some(Errno::ENOTTY), "{err}");
    }

    #[test]
    fn kernel_tier_udmabuf_create_maps_memfd_bytes() {
        let Some(dev) = device() else { return };
        let ps = page_size() as usize;
        let backing = memfd::create_for_udmabuf("udmabuf-test", 4 * ps as u64).expect("memfd");
        let pattern: Vec<u8> = (0..4 * ps).map(|i| (i % 253) as u8).collect();
        {
            let map = Mapping::new(backing.as_fd(), 4 * ps, true).expect("map memfd");
            map.write_at(0, &pattern).expect("write memfd");
        }

        let buf = dev
            .create(backing.as_fd(), 0, 4 * ps as u64)
            .expect("create");
        assert!(dma_buf::is_dma_buf(buf.as_fd()));
        assert!(!dma_buf::is_dma_buf(backing.as_fd()));
        assert_eq!(dma_buf::size(buf.as_fd()).expect("size"), 4 * ps as u64);
        let info = fdinfo(buf.as_fd()).expect("fdinfo");
        assert_eq!(
            info.get("exp_name").map(String::as_str),
            Some("udmabuf"),
            "{info:?}"
        );
        let fl =
            nix::fcntl::fcntl(buf.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFD).expect("F_GETFD");
        assert_ne!(fl & libc::FD_CLOEXEC, 0);

        // The udmabuf pins the pages: closing the memfd keeps the contents.
        drop(backing);
        let map = Mapping::new(buf.as_fd(), 4 * ps, false).expect("map udmabuf");
        let mut back = vec![0u8; 4 * ps];
        map.read_at(0, &mut back).expect("read");
        assert!(
            back == pattern,
            "udmabuf mapping does not show the memfd's bytes"
        );
    }

    #[test]
    fn kernel_tier_udmabuf_offset_window() {
        let Some(dev) = device() else { return };
        let ps = page_size() as usize;
        let backing = memfd::create_for_udmabuf("udmabuf-window", 3 * ps as u64).expect("memfd");
        {
            let map = Mapping::new(backing.as_fd(), 3 * ps, true).expect("map memfd");
            map.write_at(ps, b"second page").expect("write");
        }
        let buf = dev
            .create(backing.as_fd(), ps as u64, ps as u64)
            .expect("create");
        dma_buf::set_name(buf.as_fd(), "window").expect("set_name");
        let map = Mapping::new(buf.as_fd(), ps, false).expect("map");
        let mut back = [0u8; 11];
        map.read_at(0, &mut back).expect("read");
        assert_eq!(&back, b"second page");
    }
}
