//! Smoke tests of the real-kernel tier: they prove that `tests/vm/run`
//! boots a kernel with dma-heaps and vgem and really runs `kernel_tier`
//! tests there.
//!
//! On a machine without `/dev/dma_heap` (the build machines) they print why
//! and pass as skipped, unless `DMABROKER_REQUIRE_KERNEL=1` is set (as the
//! VM guest does), in which case a missing kernel feature is a failure.

use std::os::fd::AsFd;
use std::path::Path;

use dmabroker_daemon::kernel::dma_buf::implicit_fences_signalled;
use dmabroker_daemon::kernel::dma_heap::DmaHeap;
use dmabroker_daemon::kernel::fdinfo;
use dmabroker_suite::{kernel_feature, vgem};

const DMA_HEAP_SYSTEM: &str = "/dev/dma_heap/system";

fn have_system_heap() -> bool {
    kernel_feature(
        "dma-heap `system` (CONFIG_DMABUF_HEAPS_SYSTEM)",
        Path::new(DMA_HEAP_SYSTEM).exists(),
    )
}

#[test]
fn kernel_tier_dma_heap_present() {
    if !have_system_heap() {
        return;
    }
    let heap = DmaHeap::open(DMA_HEAP_SYSTEM).expect("open the system heap");
    let buf = heap
        .alloc(4096)
        .expect("DMA_HEAP_IOCTL_ALLOC of 4096 bytes");
    let info = fdinfo(buf.as_fd()).expect("fdinfo");
    assert_eq!(
        info.get("size").map(String::as_str),
        Some("4096"),
        "fdinfo of the new dma-buf should report its size: {info:?}"
    );
}

#[test]
fn kernel_tier_vgem_fence_blocks_poll() {
    if !have_system_heap() {
        return;
    }
    let vgem = match vgem::Vgem::open() {
        Ok(vgem) => vgem,
        Err(err) if err.is_unavailable() => {
            if !kernel_feature(&format!("vgem ({err})"), false) {
                return;
            }
            unreachable!("kernel_feature panics when the kernel is required");
        }
        Err(err) => panic!("opening vgem: {err}"),
    };
    let buf = vgem
        .create_buffer(4096)
        .unwrap_or_else(|err| panic!("creating a vgem buffer: {err}"));
    assert!(buf.size() >= 4096, "vgem buffer size {}", buf.size());
    assert!(
        implicit_fences_signalled(buf.dmabuf(), false),
        "an unfenced dma-buf is readable at once"
    );

    let fence = buf
        .attach_fence(true)
        .unwrap_or_else(|err| panic!("attaching a write fence: {err}"));
    assert!(
        !implicit_fences_signalled(buf.dmabuf(), false),
        "POLLIN must wait for the pending write fence"
    );

    vgem.signal(fence)
        .unwrap_or_else(|err| panic!("signalling the write fence: {err}"));
    assert!(
        implicit_fences_signalled(buf.dmabuf(), false),
        "POLLIN must be ready once the write fence is signalled"
    );
}
