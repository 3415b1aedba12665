//! Mirrors of the kernel uapi structs and ioctl numbers from
//! `<linux/dma-heap.h>`, `<linux/dma-buf.h>`, `<linux/udmabuf.h>` and
//! `<linux/sync_file.h>`. Kept in one place so the test at the bottom can
//! check every one of them against the C headers: a wrong size silently
//! changes the ioctl number and the kernel answers ENOTTY.

use nix::sys::ioctl::ioctl_num_type;

/// `struct dma_heap_allocation_data`
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct DmaHeapAllocationData {
    pub len: u64,
    pub fd: u32,
    pub fd_flags: u32,
    pub heap_flags: u64,
}

// `DMA_BUF_IOCTL_SYNC` is the client crate's too (a no-autofence client
// syncs its own CPU accesses): one definition, in the ipc crate, checked
// against the headers here with the rest.
pub(crate) use dmabroker_ipc::cachesync::{DMA_BUF_SYNC_READ, DMA_BUF_SYNC_WRITE};

/// `struct dma_buf_export_sync_file`
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct DmaBufExportSyncFile {
    pub flags: u32,
    pub fd: i32,
}

/// `struct dma_buf_import_sync_file`
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct DmaBufImportSyncFile {
    pub flags: u32,
    pub fd: i32,
}

/// `struct udmabuf_create`
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct UdmabufCreate {
    pub memfd: u32,
    pub flags: u32,
    pub offset: u64,
    pub size: u64,
}

/// `struct sync_file_info`
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct SyncFileInfo {
    pub name: [u8; 32],
    pub status: i32,
    pub flags: u32,
    pub num_fences: u32,
    pub pad: u32,
    pub sync_fence_info: u64,
}

/// Includes the terminating NUL, so names are at most 31 bytes.
pub(crate) const DMA_BUF_NAME_LEN: usize = 32;
/// `DMA_BUF_MAGIC` from `<linux/magic.h>`: f_type of the dma-buf pseudo fs.
pub(crate) const DMA_BUF_MAGIC: i64 = 0x444d_4142;

pub(crate) const UDMABUF_FLAGS_CLOEXEC: u32 = 0x01;

pub(crate) const DMA_HEAP_IOCTL_ALLOC: ioctl_num_type =
    nix::request_code_readwrite!(b'H', 0x0, std::mem::size_of::<DmaHeapAllocationData>());
/// The `_B` variant encodes a 64-bit size; the argument is still the
/// pointer to the name itself, not a pointer to a pointer. The kernel accepts
/// both `_A` and `_B`; `_B` is the one that matches a 64-bit userspace.
pub(crate) const DMA_BUF_SET_NAME_B: ioctl_num_type =
    nix::request_code_write!(b'b', 1, std::mem::size_of::<u64>());
pub(crate) const DMA_BUF_IOCTL_EXPORT_SYNC_FILE: ioctl_num_type =
    nix::request_code_readwrite!(b'b', 2, std::mem::size_of::<DmaBufExportSyncFile>());
pub(crate) const DMA_BUF_IOCTL_IMPORT_SYNC_FILE: ioctl_num_type =
    nix::request_code_write!(b'b', 3, std::mem::size_of::<DmaBufImportSyncFile>());
pub(crate) const UDMABUF_CREATE: ioctl_num_type =
    nix::request_code_write!(b'u', 0x42, std::mem::size_of::<UdmabufCreate>());
pub(crate) const SYNC_IOC_FILE_INFO: ioctl_num_type =
    nix::request_code_readwrite!(b'>', 4, std::mem::size_of::<SyncFileInfo>());

// The `_bad` variants take the request number as given, so the constants above
// (which the header test checks) are exactly what reaches the kernel.
nix::ioctl_readwrite_bad!(dma_heap_alloc, DMA_HEAP_IOCTL_ALLOC, DmaHeapAllocationData);
nix::ioctl_write_ptr_bad!(dma_buf_set_name, DMA_BUF_SET_NAME_B, libc::c_char);
nix::ioctl_readwrite_bad!(
    dma_buf_export_sync_file,
    DMA_BUF_IOCTL_EXPORT_SYNC_FILE,
    DmaBufExportSyncFile
);
nix::ioctl_write_ptr_bad!(
    dma_buf_import_sync_file,
    DMA_BUF_IOCTL_IMPORT_SYNC_FILE,
    DmaBufImportSyncFile
);
nix::ioctl_write_ptr_bad!(udmabuf_create, UDMABUF_CREATE, UdmabufCreate);
nix::ioctl_readwrite_bad!(sync_file_info, SYNC_IOC_FILE_INFO, SyncFileInfo);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::testutil::TempDir;
    use dmabroker_ipc::cachesync::{
        DmaBufSync, DMA_BUF_IOCTL_SYNC, DMA_BUF_SYNC_END, DMA_BUF_SYNC_RW, DMA_BUF_SYNC_START,
    };
    use std::collections::HashMap;
    use std::mem::{offset_of, size_of};
    use std::path::Path;
    use std::process::Command;

    const HEADERS: [&str; 5] = [
        "/usr/include/linux/dma-heap.h",
        "/usr/include/linux/dma-buf.h",
        "/usr/include/linux/udmabuf.h",
        "/usr/include/linux/sync_file.h",
        "/usr/include/linux/magic.h",
    ];

    const PROGRAM: &str = r#"
#include <stdio.h>
#include <stddef.h>
#include <fcntl.h>
#include <linux/dma-heap.h>
#include <linux/dma-buf.h>
#include <linux/udmabuf.h>
#include <linux/sync_file.h>
#include <linux/magic.h>
#define P(name, expr) printf("%s %llu\n", name, (unsigned long long)(expr))
int main(void) {
    P("sizeof_dma_heap_allocation_data", sizeof(struct dma_heap_allocation_data));
    P("offset_dma_heap_allocation_data_fd", offsetof(struct dma_heap_allocation_data, fd));
    P("offset_dma_heap_allocation_data_fd_flags", offsetof(struct dma_heap_allocation_data, fd_flags));
    P("offset_dma_heap_allocation_data_heap_flags", offsetof(struct dma_heap_allocation_data, heap_flags));
    P("DMA_HEAP_IOCTL_ALLOC", DMA_HEAP_IOCTL_ALLOC);
    P("sizeof_dma_buf_sync", sizeof(struct dma_buf_sync));
    P("DMA_BUF_IOCTL_SYNC", DMA_BUF_IOCTL_SYNC);
    P("DMA_BUF_SYNC_READ", DMA_BUF_SYNC_READ);
    P("DMA_BUF_SYNC_WRITE", DMA_BUF_SYNC_WRITE);
    P("DMA_BUF_SYNC_RW", DMA_BUF_SYNC_RW);
    P("DMA_BUF_SYNC_START", DMA_BUF_SYNC_START);
    P("DMA_BUF_SYNC_END", DMA_BUF_SYNC_END);
    P("DMA_BUF_NAME_LEN", DMA_BUF_NAME_LEN);
    P("DMA_BUF_SET_NAME_B", DMA_BUF_SET_NAME_B);
    P("sizeof_dma_buf_export_sync_file", sizeof(struct dma_buf_export_sync_file));
    P("offset_dma_buf_export_sync_file_fd", offsetof(struct dma_buf_export_sync_file, fd));
    P("DMA_BUF_IOCTL_EXPORT_SYNC_FILE", DMA_BUF_IOCTL_EXPORT_SYNC_FILE);
    P("sizeof_dma_buf_import_sync_file", sizeof(struct dma_buf_import_sync_file));
    P("offset_dma_buf_import_sync_file_fd", offsetof(struct dma_buf_import_sync_file, fd));
    P("DMA_BUF_IOCTL_IMPORT_SYNC_FILE", DMA_BUF_IOCTL_IMPORT_SYNC_FILE);
    P("DMA_BUF_MAGIC", DMA_BUF_MAGIC);
    P("sizeof_udmabuf_create", sizeof(struct udmabuf_create));
    P("offset_udmabuf_create_flags", offsetof(struct udmabuf_create, flags));
    P("offset_udmabuf_create_offset", offsetof(struct udmabuf_create, offset));
    P("offset_udmabuf_create_size", offsetof(struct udmabuf_create, size));
    P("UDMABUF_CREATE", UDMABUF_CREATE);
    P("UDMABUF_FLAGS_CLOEXEC", UDMABUF_FLAGS_CLOEXEC);
    P("sizeof_sync_file_info", sizeof(struct sync_file_info));
    P("offset_sync_file_info_status", offsetof(struct sync_file_info, status));
    P("offset_sync_file_info_num_fences", offsetof(struct sync_file_info, num_fences));
    P("offset_sync_file_info_sync_fence_info", offsetof(struct sync_file_info, sync_fence_info));
    P("SYNC_IOC_FILE_INFO", SYNC_IOC_FILE_INFO);
    return 0;
}
"#;

    /// ioctl numbers are 32-bit values; `ioctl_num_type` is c_ulong on glibc
    /// but c_int on musl, where a plain cast would sign-extend.
    fn num(n: ioctl_num_type) -> u64 {
        u64::from(n as u32)
    }

    fn rust_values() -> Vec<(&'static str, u64)> {
        vec![
            (
                "sizeof_dma_heap_allocation_data",
                size_of::<DmaHeapAllocationData>() as u64,
            ),
            (
                "offset_dma_heap_allocation_data_fd",
                offset_of!(DmaHeapAllocationData, fd) as u64,
            ),
            (
                "offset_dma_heap_allocation_data_fd_flags",
                offset_of!(DmaHeapAllocationData, fd_flags) as u64,
            ),
            (
                "offset_dma_heap_allocation_data_heap_flags",
                offset_of!(DmaHeapAllocationData, heap_flags) as u64,
            ),
            ("DMA_HEAP_IOCTL_ALLOC", num(DMA_HEAP_IOCTL_ALLOC)),
            ("sizeof_dma_buf_sync", size_of::<DmaBufSync>() as u64),
            ("DMA_BUF_IOCTL_SYNC", num(DMA_BUF_IOCTL_SYNC)),
            ("DMA_BUF_SYNC_READ", DMA_BUF_SYNC_READ),
            ("DMA_BUF_SYNC_WRITE", DMA_BUF_SYNC_WRITE),
            ("DMA_BUF_SYNC_RW", DMA_BUF_SYNC_RW),
            ("DMA_BUF_SYNC_START", DMA_BUF_SYNC_START),
            ("DMA_BUF_SYNC_END", DMA_BUF_SYNC_END),
            ("DMA_BUF_NAME_LEN", DMA_BUF_NAME_LEN as u64),
            ("DMA_BUF_SET_NAME_B", num(DMA_BUF_SET_NAME_B)),
            (
                "sizeof_dma_buf_export_sync_file",
                size_of::<DmaBufExportSyncFile>() as u64,
            ),
            (
                "offset_dma_buf_export_sync_file_fd",
                offset_of!(DmaBufExportSyncFile, fd) as u64,
            ),
            (
                "DMA_BUF_IOCTL_EXPORT_SYNC_FILE",
                num(DMA_BUF_IOCTL_EXPORT_SYNC_FILE),
            ),
            (
                "sizeof_dma_buf_import_sync_file",
                size_of::<DmaBufImportSyncFile>() as u64,
            ),
            (
                "offset_dma_buf_import_sync_file_fd",
                offset_of!(DmaBufImportSyncFile, fd) as u64,
            ),
            (
                "DMA_BUF_IOCTL_IMPORT_SYNC_FILE",
                num(DMA_BUF_IOCTL_IMPORT_SYNC_FILE),
            ),
            ("DMA_BUF_MAGIC", DMA_BUF_MAGIC as u64),
            ("sizeof_udmabuf_create", size_of::<UdmabufCreate>() as u64),
            (
                "offset_udmabuf_create_flags",
                offset_of!(UdmabufCreate, flags) as u64,
            ),
            (
                "offset_udmabuf_create_offset",
                offset_of!(UdmabufCreate, offset) as u64,
            ),
            (
                "offset_udmabuf_create_size",
                offset_of!(UdmabufCreate, size) as u64,
            ),
            ("UDMABUF_CREATE", num(UDMABUF_CREATE)),
            ("UDMABUF_FLAGS_CLOEXEC", UDMABUF_FLAGS_CLOEXEC as u64),
            ("sizeof_sync_file_info", size_of::<SyncFileInfo>() as u64),
            (
                "offset_sync_file_info_status",
                offset_of!(SyncFileInfo, status) as u64,
            ),
            (
                "offset_sync_file_info_num_fences",
                offset_of!(SyncFileInfo, num_fences) as u64,
            ),
            (
                "offset_sync_file_info_sync_fence_info",
                offset_of!(SyncFileInfo, sync_fence_info) as u64,
            ),
            ("SYNC_IOC_FILE_INFO", num(SYNC_IOC_FILE_INFO)),
        ]
    }

    #[test]
    fn known_ioctl_numbers_on_x86_64_and_aarch64() {
        // Independent of the C compiler: values from the asm-generic encoding,
        // which x86-64 and arm64 share.
        if cfg!(any(target_arch = "x86_64", target_arch = "aarch64")) {
            assert_eq!(num(DMA_HEAP_IOCTL_ALLOC), 0xc018_4800);
            assert_eq!(num(DMA_BUF_IOCTL_SYNC), 0x4008_6200);
            assert_eq!(num(DMA_BUF_SET_NAME_B), 0x4008_6201);
            assert_eq!(num(DMA_BUF_IOCTL_EXPORT_SYNC_FILE), 0xc008_6202);
            assert_eq!(num(DMA_BUF_IOCTL_IMPORT_SYNC_FILE), 0x4008_6203);
            assert_eq!(num(UDMABUF_CREATE), 0x4018_7542);
            assert_eq!(num(SYNC_IOC_FILE_INFO), 0xc038_3e04);
        }
    }

    #[test]
    fn uapi_matches_kernel_headers() {
        if let Some(missing) = HEADERS.iter().find(|h| !Path::new(h).exists()) {
            crate::kernel::note_skip(&format!(
                "uapi header {missing} not installed; cannot compare ioctl numbers"
            ));
            return;
        }
        let dir = TempDir::new("uapi");
        let src = dir.path().join("uapi.c");
        let bin = dir.path().join("uapi");
        std::fs::write(&src, PROGRAM).expect("write C source");
        let cc = match Command::new("cc").arg("-o").arg(&bin).arg(&src).output() {
            Ok(out) => out,
            Err(e) => {
                crate::kernel::note_skip(&format!(
                    "cannot run `cc` ({e}); cannot compare ioctl numbers"
                ));
                return;
            }
        };
        assert!(
            cc.status.success(),
            "cc failed: {}",
            String::from_utf8_lossy(&cc.stderr)
        );
        let out = Command::new(&bin).output().expect("run uapi probe");
        assert!(out.status.success());
        let stdout = String::from_utf8(out.stdout).expect("utf8");
        let c: HashMap<&str, u64> = stdout
            .lines()
            .filter_map(|l| {
                let (k, v) = l.split_once(' ')?;
                Some((k, v.parse().ok()?))
            })
            .collect();
        let rust = rust_values();
        assert_eq!(c.len(), rust.len(), "probe output: {stdout}");
        for (name, value) in rust {
            assert_eq!(
                c.get(name).copied(),
                Some(value),
                "{name}: C says {:?}, Rust says {value:#x}",
                c.get(name).map(|v| format!("{v:#x}"))
            );
        }
    }
}
