//! dma-heap discovery and allocation (`/dev/dma_heap/*`, Linux 5.6+).
//!
//! Heap names are whatever the platform registers (`system`, `linux,cma`,
//! `reserved`, vendor carve-outs, ...), so nothing here assumes a particular
//! name: the directory is listed and every node is a candidate.

use std::fs::OpenOptions;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use super::uapi::{self, DmaHeapAllocationData};
use super::{retry, KernelError};

/// Where the kernel creates dma-heap nodes.
pub const DEFAULT_DMA_HEAP_DIR: &str = "/dev/dma_heap";

/// A dma-heap device node found by [`discover`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeapNode {
    /// The heap's name as registered by the kernel (the node's file name).
    pub name: String,
    pub path: PathBuf,
}

/// Lists every heap node in `dir`, sorted by name.
///
/// A missing directory yields an empty list rather than an error: it simply
/// means the kernel has no dma-heaps (CONFIG_DMABUF_HEAPS=n or pre-5.6),
/// which is a normal configuration that the caller falls back from. Nodes
/// are not filtered by file type so that a misconfigured node is reported
/// when it is opened or used instead of vanishing silently.
pub fn discover(dir: &Path) -> Result<Vec<HeapNode>, KernelError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(KernelError::Io {
                op: "list dma-heap directory",
                path: dir.to_owned(),
                source,
            })
        }
    };
    let mut nodes = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| KernelError::Io {
            op: "list dma-heap directory",
            path: dir.to_owned(),
            source,
        })?;
        let path = entry.path();
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            tracing::warn!(path = %path.display(), "skipping dma-heap node with a non-UTF-8 name");
            continue;
        };
        if name.starts_with('.') {
            continue;
        }
        // Follow symlinks: udev may link heaps under friendlier names.
        if std::fs::metadata(&path).is_ok_and(|m| m.is_dir()) {
            continue;
        }
        nodes.push(HeapNode { name, path });
    }
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(nodes)
}

/// An open dma-heap. Kept open for the daemon's lifetime so that allocation
/// does not depend on the node still being accessible (e.g. after dropping
/// privileges or entering a mount namespace).
#[derive(Debug)]
pub struct DmaHeap {
    fd: OwnedFd,
    name: String,
    path: PathBuf,
}

impl DmaHeap {
    /// Opens a heap node O_RDWR|O_CLOEXEC (std always sets O_CLOEXEC).
    pub fn open(path: impl AsRef<Path>) -> Result<DmaHeap, KernelError> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| KernelError::Io {
                op: "open dma-heap",
                path: path.to_owned(),
                source,
            })?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        Ok(DmaHeap {
            fd: file.into(),
            name,
            path: path.to_owned(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Allocates a dma-buf of `len` bytes. The returned fd is O_RDWR so that
    /// clients can mmap it writable, and O_CLOEXEC so it never leaks into a
    /// child the daemon spawns; it is passed to clients explicitly.
    pub fn alloc(&self, len: u64) -> Result<OwnedFd, KernelError> {
        let target = || self.path.display().to_string();
        if len == 0 {
            return Err(KernelError::invalid(
                "DMA_HEAP_IOCTL_ALLOC",
                target(),
                "zero-length allocation",
            ));
        }
        let mut data = DmaHeapAllocationData {
            len,
            fd: 0,
            fd_flags: (libc::O_RDWR | libc::O_CLOEXEC) as u32,
            heap_flags: 0,
        };
        let raw = self.fd.as_raw_fd();
        retry(|| {
            // SAFETY: `raw` is a valid fd borrowed from `self.fd` for the
            // duration of the call, and `data` is a live, correctly laid out
            // `struct dma_heap_allocation_data` the kernel reads and writes.
            unsafe { uapi::dma_heap_alloc(raw, &mut data) }
        })
        .map_err(|errno| KernelError::sys("DMA_HEAP_IOCTL_ALLOC", target(), errno))?;
        // SAFETY: on success the kernel installed a new fd in `data.fd` that
        // nothing else in this process refers to; we take sole ownership.
        Ok(unsafe { OwnedFd::from_raw_fd(data.fd as i32) })
    }
}

impl AsFd for DmaHeap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::dma_buf;
    use crate::kernel::mapping::Mapping;
    use crate::kernel::require_or_skip;
    use crate::kernel::testutil::TempDir;

    fn system_heap() -> Option<DmaHeap> {
        let path = Path::new(DEFAULT_DMA_HEAP_DIR).join("system");
        if !require_or_skip("dma-heap `system` (/dev/dma_heap/system)", path.exists()) {
            return None;
        }
        Some(DmaHeap::open(&path).expect("open system heap"))
    }

    #[test]
    fn discover_missing_dir_is_empty() {
        let nodes = discover(Path::new("/nonexistent/dma_heap")).expect("discover");
        assert!(nodes.is_empty());
    }

    #[test]
    fn discover_lists_every_node_sorted() {
        let dir = TempDir::new("discover");
        for name in ["system", "linux,cma", "reserved", ".hidden"] {
            std::fs::write(dir.path().join(name), b"").expect("write");
        }
        std::fs::create_dir(dir.path().join("subdir")).expect("mkdir");
        let names: Vec<_> = discover(dir.path())
            .expect("discover")
            .into_iter()
            .map(|n| n.name)
            .collect();
        assert_eq!(names, ["linux,cma", "reserved", "system"]);
    }

    #[test]
    fn alloc_on_a_non_heap_reports_the_path_and_errno() {
        let dir = TempDir::new("fakeheap");
        let path = dir.path().join("system");
        std::fs::write(&path, b"").expect("write");
        let heap = DmaHeap::open(&path).expect("open regular file");
        assert_eq!(heap.name(), "system");
        let err = heap.alloc(4096).expect_err("regular file is not a heap");
        assert_eq!(err.errno(), Some(nix::errno::Errno::ENOTTY));
        assert!(err.to_string().contains("system"), "{err}");
        let err = heap.alloc(0).expect_err("zero length");
        assert!(matches!(err, KernelError::Invalid { .. }), "{err}");
    }

    #[test]
    fn open_missing_node_fails_with_path() {
        let err = DmaHeap::open("/nonexistent/dma_heap/system").expect_err("missing");
        assert!(
            err.to_string().contains("/nonexistent/dma_heap/system"),
            "{err}"
        );
    }

    #[test]
    fn kernel_tier_dma_heap_discovery_finds_system() {
        let dir = Path::new(DEFAULT_DMA_HEAP_DIR);
        if !require_or_skip("dma-heaps (/dev/dma_heap)", dir.exists()) {
            return;
        }
        let nodes = discover(dir).expect("discover");
        assert!(nodes.iter().any(|n| n.name == "system"), "{nodes:?}");
    }

    #[test]
    fn kernel_tier_dma_heap_alloc_sizes() {
        let Some(heap) = system_heap() else { return };
        for len in [4096u64, 1 << 20] {
            let fd = heap.alloc(len).expect("alloc");
            assert!(dma_buf::is_dma_buf(fd.as_fd()));
            assert_eq!(dma_buf::size(fd.as_fd()).expect("size"), len);
            let info = crate::kernel::fdinfo(fd.as_fd()).expect("fdinfo");
            assert_eq!(
                info.get("size").map(String::as_str),
                Some(&*len.to_string())
            );
            assert_eq!(info.get("exp_name").map(String::as_str), Some("system"));
            // O_CLOEXEC on the returned dma-buf fd.
            let fl =
                nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFD).expect("F_GETFD");
            assert_ne!(fl & libc::FD_CLOEXEC, 0);
        }
    }

    #[test]
    fn kernel_tier_dma_heap_mmap_write_read() {
        let Some(heap) = system_heap() else { return };
        let len = 1 << 20;
        let fd = heap.alloc(len as u64).expect("alloc");
        let map = Mapping::new(fd.as_fd(), len, true).expect("mmap");
        let pattern: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        dma_buf::sync(
            fd.as_fd(),
            dma_buf::SyncDirection::Write,
            dma_buf::SyncPhase::Start,
        )
        .expect("sync start");
        map.write_at(0, &pattern).expect("write");
        dma_buf::sync(
            fd.as_fd(),
            dma_buf::SyncDirection::Write,
            dma_buf::SyncPhase::End,
        )
        .expect("sync end");
        drop(map);

        let map = Mapping::new(fd.as_fd(), len, false).expect("mmap again");
        let mut back = vec![0u8; len];
        dma_buf::sync(
            fd.as_fd(),
            dma_buf::SyncDirection::Read,
            dma_buf::SyncPhase::Start,
        )
        .expect("sync read start");
        map.read_at(0, &mut back).expect("read");
        dma_buf::sync(
            fd.as_fd(),
            dma_buf::SyncDirection::Read,
            dma_buf::SyncPhase::End,
        )
        .expect("sync read end");
        assert!(back == pattern, "contents differ after remapping");
    }
}
