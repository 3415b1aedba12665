//! Smoke tests of the real-kernel tier: they prove that `tests/vm/run`
//! boots a kernel with dma-heaps and vgem and really runs `kernel_tier`
//! tests there.
//!
//! On a machine without `/dev/dma_heap` (the build machines) they print why
//! and pass as skipped, unless `DMABROKER_REQUIRE_KERNEL=1` is set (as the
//! VM guest does), in which case a missing kernel feature is a failure.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use dmabroker_suite::vgem;

const DMA_HEAP_SYSTEM: &str = "/dev/dma_heap/system";

/// True when the environment demands that kernel features be present
/// (inside the VM of `tests/vm/run`).
fn kernel_required() -> bool {
    std::env::var_os("DMABROKER_REQUIRE_KERNEL").is_some_and(|v| v == "1")
}

/// Decides whether a kernel-tier test must skip: returns true (after
/// printing why) when `missing` names a missing feature and the kernel is not
/// required; panics when it is required.
fn skip_because(missing: Option<String>) -> bool {
    match missing {
        None => false,
        Some(reason) if kernel_required() => {
            panic!("DMABROKER_REQUIRE_KERNEL=1 but {reason}")
        }
        Some(reason) => {
            eprintln!("SKIPPED: {reason} (run tests/vm/run for the real-kernel tier)");
            true
        }
    }
}

fn dma_heap_missing() -> Option<String> {
    (!Path::new(DMA_HEAP_SYSTEM).exists())
        .then(|| format!("{DMA_HEAP_SYSTEM} is absent (kernel without CONFIG_DMABUF_HEAPS_SYSTEM)"))
}

/// `struct dma_heap_allocation_data` (include/uapi/linux/dma-heap.h).
#[repr(C)]
#[derive(Default)]
struct DmaHeapAllocationData {
    len: u64,
    fd: u32,
    fd_flags: u32,
    heap_flags: u64,
}

/// `DMA_HEAP_IOCTL_ALLOC = _IOWR('H', 0x0, struct dma_heap_allocation_data)`.
const DMA_HEAP_IOCTL_ALLOC: libc::c_ulong = (3 << 30)
    | ((size_of::<DmaHeapAllocationData>() as libc::c_ulong) << 16)
    | ((b'H' as libc::c_ulong) << 8);

fn dma_heap_alloc(heap: BorrowedFd<'_>, len: u64) -> io::Result<OwnedFd> {
    let mut data = DmaHeapAllocationData {
        len,
        fd_flags: (libc::O_RDWR | libc::O_CLOEXEC) as u32,
        ..Default::default()
    };
    // SAFETY: DMA_HEAP_IOCTL_ALLOC takes a pointer to a `struct
    // dma_heap_allocation_data`, which `DmaHeapAllocationData` mirrors (no
    // pointers inside); `data` is alive and exclusively borrowed for the
    // call, and `heap` is an open descriptor.
    let rc = unsafe { libc::ioctl(heap.as_raw_fd(), DMA_HEAP_IOCTL_ALLOC, &mut data) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(data.fd).map_err(|_| io::Error::other("bad fd from the kernel"))?;
    // SAFETY: on success the kernel installed the new dma-buf descriptor
    // `fd` in this process; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `poll()` on `fd` for `events` with a zero timeout: the ready events.
fn poll_now(fd: BorrowedFd<'_>, events: libc::c_short) -> io::Result<libc::c_short> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    };
    // SAFETY: `pfd` is one valid, exclusively borrowed `pollfd` and the
    // count passed is 1.
    let rc = unsafe { libc::poll(&mut pfd, 1, 0) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(pfd.revents)
}

/// Reads `size:` from `/proc/self/fdinfo/FD` (dma-bufs report it there).
fn fdinfo_size(fd: BorrowedFd<'_>) -> Option<u64> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).ok()?;
    info.lines()
        .find_map(|line| line.strip_prefix("size:"))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
fn dma_heap_ioctl_number_matches_the_kernel_header() {
    // _IOWR('H', 0, struct dma_heap_allocation_data) from linux/dma-heap.h.
    assert_eq!(DMA_HEAP_IOCTL_ALLOC, 0xc018_4800);
}

#[test]
fn kernel_tier_dma_heap_present() {
    if skip_because(dma_heap_missing()) {
        return;
    }
    let heap = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(DMA_HEAP_SYSTEM)
        .unwrap_or_else(|err| panic!("opening {DMA_HEAP_SYSTEM}: {err}"));
    let buf = dma_heap_alloc(heap.as_fd(), 4096)
        .unwrap_or_else(|err| panic!("DMA_HEAP_IOCTL_ALLOC of 4096 bytes: {err}"));
    assert_eq!(
        fdinfo_size(buf.as_fd()),
        Some(4096),
        "fdinfo of the new dma-buf should report its size"
    );
}

#[test]
fn kernel_tier_vgem_fence_blocks_poll() {
    if skip_because(dma_heap_missing()) {
        return;
    }
    let vgem = match vgem::Vgem::open() {
        Ok(vgem) => vgem,
        Err(err) if err.is_unavailable() => {
            if skip_because(Some(err.to_string())) {
                return;
            }
            unreachable!("skip_because panics when the kernel is required");
        }
        Err(err) => panic!("opening vgem: {err}"),
    };
    let buf = vgem
        .create_buffer(4096)
        .unwrap_or_else(|err| panic!("creating a vgem buffer: {err}"));
    assert!(buf.size() >= 4096, "vgem buffer size {}", buf.size());

    let ready = poll_now(buf.dmabuf(), libc::POLLIN).expect("poll before any fence");
    assert_eq!(
        ready & libc::POLLIN,
        libc::POLLIN,
        "an unfenced dma-buf is readable at once"
    );

    let fence = buf
        .attach_fence(true)
        .unwrap_or_else(|err| panic!("attaching a write fence: {err}"));
    let ready = poll_now(buf.dmabuf(), libc::POLLIN).expect("poll with a pending write fence");
    assert_eq!(
        ready & libc::POLLIN,
        0,
        "POLLIN must wait for the pending write fence (revents {ready:#x})"
    );

    vgem.signal(fence)
        .unwrap_or_else(|err| panic!("signalling the write fence: {err}"));
    let ready = poll_now(buf.dmabuf(), libc::POLLIN).expect("poll after signalling");
    assert_eq!(
        ready & libc::POLLIN,
        libc::POLLIN,
        "POLLIN must be ready once the write fence is signalled (revents {ready:#x})"
    );
}
