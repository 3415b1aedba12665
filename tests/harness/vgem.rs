//! A stand-in for a device that uses implicit fences, built on the kernel's
//! virtual GEM driver (`vgem`).
//!
//! A real GPU or codec that works on a dma-buf attaches fences to the
//! buffer's reservation object; whoever polls the dma-buf or exports a
//! sync_file from it then waits for that work. vgem lets a test do the same
//! by hand: create a buffer, export it as a dma-buf, attach a fence
//! ([`VgemBuffer::attach_fence`]) and signal it later ([`Vgem::signal`]).
//!
//! # Where this works
//!
//! Only on a kernel with `CONFIG_DRM_VGEM` and the module loaded
//! (`modprobe vgem`), which creates a `/dev/dri/card*` node whose driver
//! name is `vgem`. The build machines have no such device; the real-kernel
//! tier (`tests/vm/run`) loads the module inside its guest.
//! [`VgemError::is_unavailable`] tells "no vgem here" apart from real
//! failures, so a test can skip on the host.
//!
//! # Fence lifetime: the kernel signals vgem fences on its own
//!
//! The kernel arms a timer when it creates a vgem fence and signals the
//! fence when it fires, **10 seconds** after `VGEM_FENCE_ATTACH`
//! (`VGEM_FENCE_TIMEOUT` is `10*HZ` in `drivers/gpu/drm/vgem/vgem_fence.c`),
//! so that a test that forgets a fence cannot hang the machine. Closing the
//! device file (dropping [`Vgem`]) also signals every fence still open on
//! it. Consequences for tests:
//!
//! - "Still blocked" is only meaningful well within 10 s of the attach
//!   (under software emulation the guest's clock still runs in real time,
//!   so keep such windows short: a second or two).
//! - [`Vgem::signal`] of a fence that the timer already signalled fails with
//!   [`VgemError::FenceTimedOut`] (the kernel's `ETIMEDOUT`); the fence is
//!   signalled either way.
//! - A second fence cannot be attached while a conflicting one is pending:
//!   the kernel answers `EBUSY` ([`VgemError::Busy`]). A write fence
//!   conflicts with any pending fence, a read fence with a pending write
//!   fence.
//!
//! # Usage
//!
//! ```no_run
//! # fn demo() -> Result<(), dmabroker_suite::vgem::VgemError> {
//! use dmabroker_suite::vgem::Vgem;
//! let vgem = Vgem::open()?;
//! let buf = vgem.create_buffer(4096)?;
//! let fence = buf.attach_fence(true)?; // a device is writing
//! // ... hand buf.dmabuf() to the code under test; it must wait ...
//! vgem.signal(fence)?; // the device is done
//! # Ok(()) }
//! ```

use std::ffi::c_ulong;
use std::fmt;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------------------
// uAPI: include/uapi/drm/drm.h, drm_mode.h, vgem_drm.h (x86-64 layouts).
// ---------------------------------------------------------------------------

const IOC_WRITE: c_ulong = 1;
const IOC_READ: c_ulong = 2;
const DRM_IOCTL_BASE: c_ulong = b'd' as c_ulong;
const DRM_COMMAND_BASE: c_ulong = 0x40;

const fn ioc(dir: c_ulong, nr: c_ulong, size: usize) -> c_ulong {
    (dir << 30) | ((size as c_ulong) << 16) | (DRM_IOCTL_BASE << 8) | nr
}

/// `struct drm_version`.
#[repr(C)]
struct DrmVersion {
    version_major: libc::c_int,
    version_minor: libc::c_int,
    version_patchlevel: libc::c_int,
    name_len: libc::size_t,
    name: *mut libc::c_char,
    date_len: libc::size_t,
    date: *mut libc::c_char,
    desc_len: libc::size_t,
    desc: *mut libc::c_char,
}

/// `struct drm_mode_create_dumb`.
#[repr(C)]
#[derive(Default)]
struct DrmModeCreateDumb {
    height: u32,
    width: u32,
    bpp: u32,
    flags: u32,
    handle: u32,
    pitch: u32,
    size: u64,
}

/// `struct drm_prime_handle`.
#[repr(C)]
#[derive(Default)]
struct DrmPrimeHandle {
    handle: u32,
    flags: u32,
    fd: i32,
}

/// `struct drm_gem_close`.
#[repr(C)]
#[derive(Default)]
struct DrmGemClose {
    handle: u32,
    pad: u32,
}

/// `struct drm_vgem_fence_attach`.
#[repr(C)]
#[derive(Default)]
struct DrmVgemFenceAttach {
    handle: u32,
    flags: u32,
    out_fence: u32,
    pad: u32,
}

/// `struct drm_vgem_fence_signal`.
#[repr(C)]
#[derive(Default)]
struct DrmVgemFenceSignal {
    fence: u32,
    flags: u32,
}

const DRM_IOCTL_VERSION: c_ulong = ioc(IOC_READ | IOC_WRITE, 0x00, size_of::<DrmVersion>());
const DRM_IOCTL_GEM_CLOSE: c_ulong = ioc(IOC_WRITE, 0x09, size_of::<DrmGemClose>());
const DRM_IOCTL_PRIME_HANDLE_TO_FD: c_ulong =
    ioc(IOC_READ | IOC_WRITE, 0x2d, size_of::<DrmPrimeHandle>());
const DRM_IOCTL_MODE_CREATE_DUMB: c_ulong =
    ioc(IOC_READ | IOC_WRITE, 0xb2, size_of::<DrmModeCreateDumb>());
const DRM_IOCTL_VGEM_FENCE_ATTACH: c_ulong = ioc(
    IOC_READ | IOC_WRITE,
    DRM_COMMAND_BASE + 0x1,
    size_of::<DrmVgemFenceAttach>(),
);
const DRM_IOCTL_VGEM_FENCE_SIGNAL: c_ulong = ioc(
    IOC_WRITE,
    DRM_COMMAND_BASE + 0x2,
    size_of::<DrmVgemFenceSignal>(),
);

/// `DRM_CLOEXEC` is `O_CLOEXEC`, `DRM_RDWR` is `O_RDWR`.
const DRM_CLOEXEC: u32 = libc::O_CLOEXEC as u32;
const DRM_RDWR: u32 = libc::O_RDWR as u32;
const VGEM_FENCE_WRITE: u32 = 0x1;

/// Where DRM device nodes live.
pub const DRI_DIR: &str = "/dev/dri";

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// What can go wrong talking to vgem.
#[derive(Debug)]
pub enum VgemError {
    /// No `/dev/dri/card*` node is driven by vgem (module not loaded, or
    /// the kernel has no `CONFIG_DRM_VGEM`).
    NoDevice {
        /// The card nodes that were looked at, with the driver name each
        /// reported (or why it could not be asked).
        looked_at: Vec<(PathBuf, String)>,
    },
    /// `VGEM_FENCE_ATTACH` answered `EBUSY`: a conflicting fence is still
    /// pending on the buffer.
    Busy,
    /// `VGEM_FENCE_SIGNAL` answered `ETIMEDOUT`: the fence had already been
    /// signalled by the kernel's 10 s timer.
    FenceTimedOut {
        /// The fence's id.
        fence: u32,
    },
    /// Any other system call failure.
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        source: io::Error,
    },
}

impl VgemError {
    fn io(context: impl Into<String>, source: io::Error) -> Self {
        VgemError::Io {
            context: context.into(),
            source,
        }
    }

    /// True when vgem is simply not available on this machine (no device
    /// node, no permission to open one), as opposed to a failure of a
    /// device that exists. Tests use it to decide whether to skip.
    pub fn is_unavailable(&self) -> bool {
        match self {
            VgemError::NoDevice { .. } => true,
            VgemError::Io { source, .. } => matches!(
                source.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied
            ),
            VgemError::Busy | VgemError::FenceTimedOut { .. } => false,
        }
    }
}

impl fmt::Display for VgemError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VgemError::NoDevice { looked_at } => {
                write!(f, "no vgem device under {DRI_DIR} (try `modprobe vgem`)")?;
                if !looked_at.is_empty() {
                    f.write_str("; looked at:")?;
                    for (path, what) in looked_at {
                        write!(f, " {} ({what})", path.display())?;
                    }
                }
                Ok(())
            }
            VgemError::Busy => f.write_str(
                "VGEM_FENCE_ATTACH: a conflicting fence is still pending on the buffer (EBUSY)",
            ),
            VgemError::FenceTimedOut { fence } => write!(
                f,
                "VGEM_FENCE_SIGNAL: fence {fence} had already been signalled by the kernel's \
                 10 s vgem fence timeout (ETIMEDOUT)"
            ),
            VgemError::Io { context, source } => write!(f, "{context}: {source}"),
        }
    }
}

impl std::error::Error for VgemError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            VgemError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl From<VgemError> for io::Error {
    fn from(err: VgemError) -> Self {
        let kind = match &err {
            VgemError::NoDevice { .. } => io::ErrorKind::NotFound,
            VgemError::Busy => io::ErrorKind::Other,
            VgemError::FenceTimedOut { .. } => io::ErrorKind::TimedOut,
            VgemError::Io { source, .. } => source.kind(),
        };
        io::Error::new(kind, err)
    }
}

/// Runs an ioctl whose argument is `arg`, retrying on `EINTR` (as libdrm's
/// `drmIoctl` does).
///
/// # Safety
///
/// `request` must be an ioctl whose argument is a pointer to a `T` that the
/// kernel reads and/or writes in place, and `T` must have the layout the
/// kernel expects for it (every pointer inside it valid for the lengths it
/// states).
unsafe fn drm_ioctl<T>(fd: BorrowedFd<'_>, request: c_ulong, arg: &mut T) -> io::Result<()> {
    loop {
        // SAFETY: the caller guarantees that `request` takes a `*mut T` with
        // this layout; `arg` is a live, exclusive reference for the call and
        // `fd` is an open descriptor for its duration.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request, arg as *mut T) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINTR) {
            return Err(err);
        }
    }
}

/// Asks a DRM node for its driver's name (`DRM_IOCTL_VERSION`).
pub fn driver_name(fd: BorrowedFd<'_>) -> io::Result<String> {
    let mut name = vec![0u8; 64];
    let mut version = DrmVersion {
        version_major: 0,
        version_minor: 0,
        version_patchlevel: 0,
        name_len: name.len(),
        name: name.as_mut_ptr().cast(),
        date_len: 0,
        date: std::ptr::null_mut(),
        desc_len: 0,
        desc: std::ptr::null_mut(),
    };
    // SAFETY: DRM_IOCTL_VERSION takes a `struct drm_version`, which
    // `DrmVersion` mirrors. The kernel copies at most `name_len` bytes to
    // `name`, which points into `name` (alive and unaliased until after the
    // call); `date`/`desc` have length 0, so the kernel writes nothing there.
    unsafe { drm_ioctl(fd, DRM_IOCTL_VERSION, &mut version) }?;
    // On return name_len is the full length of the name, which may exceed
    // what was copied.
    let len = version.name_len.min(name.len());
    name.truncate(len);
    if let Some(nul) = name.iter().position(|&b| b == 0) {
        name.truncate(nul);
    }
    Ok(String::from_utf8_lossy(&name).into_owned())
}

// ---------------------------------------------------------------------------
// Device, buffers, fences
// ---------------------------------------------------------------------------

/// An open vgem device node (`/dev/dri/cardN` whose driver is `vgem`).
///
/// Dropping it closes the node, which makes the kernel signal every fence
/// still pending on it.
#[derive(Debug)]
pub struct Vgem {
    fd: OwnedFd,
    path: PathBuf,
}

/// A fence attached to a vgem buffer, to be passed to [`Vgem::signal`].
///
/// Not signalling it is harmless: the kernel signals it after 10 s, or when
/// the [`Vgem`] it came from is dropped.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a vgem fence blocks the buffer until signalled (or until the kernel's 10 s timeout)"]
pub struct FenceHandle {
    id: u32,
    write: bool,
}

impl FenceHandle {
    /// The fence's id on its device file.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Whether this is a write (exclusive) fence rather than a read one.
    pub fn is_write(&self) -> bool {
        self.write
    }
}

/// A vgem buffer object (a "dumb" buffer) and the dma-buf exported from it.
///
/// Dropping it closes the GEM handle; the dma-buf fd (and clones of it, in
/// this or other processes) keeps the memory alive on its own.
#[derive(Debug)]
pub struct VgemBuffer<'dev> {
    vgem: &'dev Vgem,
    handle: u32,
    size: u64,
    dmabuf: OwnedFd,
}

impl Vgem {
    /// Opens the first `/dev/dri/card*` node whose driver is vgem.
    pub fn open() -> Result<Vgem, VgemError> {
        Self::open_in(Path::new(DRI_DIR))
    }

    /// Like [`Vgem::open`], looking in `dri_dir` instead of `/dev/dri`.
    pub fn open_in(dri_dir: &Path) -> Result<Vgem, VgemError> {
        let mut cards: Vec<PathBuf> = match std::fs::read_dir(dri_dir) {
            Ok(entries) => entries
                .filter_map(|entry| entry.ok())
                .map(|entry| entry.path())
                .filter(|path| {
                    path.file_name()
                        .and_then(|name| name.to_str())
                        .is_some_and(|name| name.starts_with("card"))
                })
                .collect(),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(err) => return Err(VgemError::io(format!("listing {}", dri_dir.display()), err)),
        };
        cards.sort();
        let mut looked_at = Vec::new();
        for card in cards {
            match Self::open_path(&card) {
                Ok(vgem) => return Ok(vgem),
                Err(err) => looked_at.push((card, err.to_string())),
            }
        }
        Err(VgemError::NoDevice { looked_at })
    }

    /// Opens `path` and checks that its driver is vgem.
    pub fn open_path(path: &Path) -> Result<Vgem, VgemError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|err| VgemError::io(format!("opening {}", path.display()), err))?;
        let fd = OwnedFd::from(file);
        let name = driver_name(fd.as_fd()).map_err(|err| {
            VgemError::io(format!("DRM_IOCTL_VERSION on {}", path.display()), err)
        })?;
        if name != "vgem" {
            return Err(VgemError::io(
                format!("{}", path.display()),
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("driver is {name:?}, not \"vgem\""),
                ),
            ));
        }
        Ok(Vgem {
            fd,
            path: path.to_owned(),
        })
    }

    /// The device node this was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates a buffer of at least `size` bytes (the kernel rounds up to
    /// whole pages; [`VgemBuffer::size`] is the real size) and exports it as
    /// a read-write, close-on-exec dma-buf.
    pub fn create_buffer(&self, size: u64) -> Result<VgemBuffer<'_>, VgemError> {
        // A dumb buffer is width x height pixels of bpp bits: lay `size` out
        // as rows of 4096 bytes (1024 pixels of 32 bits).
        const ROW: u64 = 4096;
        let rows = size.max(1).div_ceil(ROW);
        let height = u32::try_from(rows).map_err(|_| {
            VgemError::io(
                "creating a vgem buffer",
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("size {size} is too large"),
                ),
            )
        })?;
        let mut create = DrmModeCreateDumb {
            height,
            width: (ROW / 4) as u32,
            bpp: 32,
            ..Default::default()
        };
        // SAFETY: DRM_IOCTL_MODE_CREATE_DUMB takes a `struct
        // drm_mode_create_dumb`, mirrored by `DrmModeCreateDumb` (no
        // pointers); `self.fd` is an open DRM node.
        unsafe { drm_ioctl(self.fd.as_fd(), DRM_IOCTL_MODE_CREATE_DUMB, &mut create) }.map_err(
            |err| {
                VgemError::io(
                    format!(
                        "DRM_IOCTL_MODE_CREATE_DUMB ({size} bytes) on {}",
                        self.path.display()
                    ),
                    err,
                )
            },
        )?;
        let handle = create.handle;
        let dmabuf = match self.export(handle) {
            Ok(fd) => fd,
            Err(err) => {
                self.close_handle(handle);
                return Err(err);
            }
        };
        Ok(VgemBuffer {
            vgem: self,
            handle,
            size: create.size,
            dmabuf,
        })
    }

    /// Exports GEM `handle` as a dma-buf (`DRM_IOCTL_PRIME_HANDLE_TO_FD`
    /// with `DRM_CLOEXEC | DRM_RDWR`).
    fn export(&self, handle: u32) -> Result<OwnedFd, VgemError> {
        let mut prime = DrmPrimeHandle {
            handle,
            flags: DRM_CLOEXEC | DRM_RDWR,
            fd: -1,
        };
        // SAFETY: DRM_IOCTL_PRIME_HANDLE_TO_FD takes a `struct
        // drm_prime_handle`, mirrored by `DrmPrimeHandle` (no pointers).
        unsafe { drm_ioctl(self.fd.as_fd(), DRM_IOCTL_PRIME_HANDLE_TO_FD, &mut prime) }
            .map_err(|err| VgemError::io("DRM_IOCTL_PRIME_HANDLE_TO_FD", err))?;
        if prime.fd < 0 {
            return Err(VgemError::io(
                "DRM_IOCTL_PRIME_HANDLE_TO_FD",
                io::Error::other(format!("kernel returned fd {}", prime.fd)),
            ));
        }
        // SAFETY: on success the kernel installed a new descriptor `prime.fd`
        // in this process's table; nothing else owns it, so it is ours to
        // own and close exactly once.
        Ok(unsafe { OwnedFd::from_raw_fd(prime.fd) })
    }

    /// Attaches a new fence to GEM `handle` (`DRM_IOCTL_VGEM_FENCE_ATTACH`).
    fn attach(&self, handle: u32, write: bool) -> Result<FenceHandle, VgemError> {
        let mut attach = DrmVgemFenceAttach {
            handle,
            flags: if write { VGEM_FENCE_WRITE } else { 0 },
            ..Default::default()
        };
        // SAFETY: DRM_IOCTL_VGEM_FENCE_ATTACH takes a `struct
        // drm_vgem_fence_attach`, mirrored by `DrmVgemFenceAttach` (no
        // pointers); `self.fd` is an open vgem node.
        match unsafe { drm_ioctl(self.fd.as_fd(), DRM_IOCTL_VGEM_FENCE_ATTACH, &mut attach) } {
            Ok(()) => Ok(FenceHandle {
                id: attach.out_fence,
                write,
            }),
            Err(err) if err.raw_os_error() == Some(libc::EBUSY) => Err(VgemError::Busy),
            Err(err) => Err(VgemError::io(
                format!(
                    "DRM_IOCTL_VGEM_FENCE_ATTACH ({} fence on handle {handle})",
                    if write { "write" } else { "read" }
                ),
                err,
            )),
        }
    }

    /// Signals `fence` (`DRM_IOCTL_VGEM_FENCE_SIGNAL`): the simulated device
    /// has finished with the buffer.
    ///
    /// Fails with [`VgemError::FenceTimedOut`] when the kernel's 10 s timer
    /// got there first (the fence is signalled all the same).
    pub fn signal(&self, fence: FenceHandle) -> Result<(), VgemError> {
        let mut signal = DrmVgemFenceSignal {
            fence: fence.id,
            flags: 0,
        };
        // SAFETY: DRM_IOCTL_VGEM_FENCE_SIGNAL takes a `struct
        // drm_vgem_fence_signal`, mirrored by `DrmVgemFenceSignal` (no
        // pointers); `self.fd` is an open vgem node.
        match unsafe { drm_ioctl(self.fd.as_fd(), DRM_IOCTL_VGEM_FENCE_SIGNAL, &mut signal) } {
            Ok(()) => Ok(()),
            Err(err) if err.raw_os_error() == Some(libc::ETIMEDOUT) => {
                Err(VgemError::FenceTimedOut { fence: fence.id })
            }
            Err(err) => Err(VgemError::io(
                format!("DRM_IOCTL_VGEM_FENCE_SIGNAL (fence {})", fence.id),
                err,
            )),
        }
    }

    fn close_handle(&self, handle: u32) {
        let mut close = DrmGemClose { handle, pad: 0 };
        // SAFETY: DRM_IOCTL_GEM_CLOSE takes a `struct drm_gem_close`,
        // mirrored by `DrmGemClose` (no pointers). A failure leaves only a
        // handle that closing the device releases, so it is ignored.
        let _ = unsafe { drm_ioctl(self.fd.as_fd(), DRM_IOCTL_GEM_CLOSE, &mut close) };
    }
}

impl AsFd for Vgem {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl VgemBuffer<'_> {
    /// The buffer's GEM handle on its device file.
    pub fn handle(&self) -> u32 {
        self.handle
    }

    /// The buffer's size in bytes, as the kernel made it.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The exported dma-buf.
    pub fn dmabuf(&self) -> BorrowedFd<'_> {
        self.dmabuf.as_fd()
    }

    /// A new descriptor for the same dma-buf (to send to another process,
    /// or to keep after the buffer is dropped).
    pub fn try_clone_dmabuf(&self) -> Result<OwnedFd, VgemError> {
        self.dmabuf
            .try_clone()
            .map_err(|err| VgemError::io("duplicating the vgem dma-buf fd", err))
    }

    /// Attaches a fence as a device would when it starts working on the
    /// buffer: a write fence (`write == true`, exclusive: readers such as
    /// `poll(POLLIN)` wait for it) or a read fence (only writers wait).
    pub fn attach_fence(&self, write: bool) -> Result<FenceHandle, VgemError> {
        self.vgem.attach(self.handle, write)
    }

    /// Same as [`Vgem::signal`] on this buffer's device.
    pub fn signal(&self, fence: FenceHandle) -> Result<(), VgemError> {
        self.vgem.signal(fence)
    }
}

impl Drop for VgemBuffer<'_> {
    fn drop(&mut self) {
        self.vgem.close_handle(self.handle);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        // Values as computed by the C macros in drm.h / vgem_drm.h.
        assert_eq!(DRM_IOCTL_VERSION, 0xc040_6400);
        assert_eq!(DRM_IOCTL_GEM_CLOSE, 0x4008_6409);
        assert_eq!(DRM_IOCTL_PRIME_HANDLE_TO_FD, 0xc00c_642d);
        assert_eq!(DRM_IOCTL_MODE_CREATE_DUMB, 0xc020_64b2);
        assert_eq!(DRM_IOCTL_VGEM_FENCE_ATTACH, 0xc010_6441);
        assert_eq!(DRM_IOCTL_VGEM_FENCE_SIGNAL, 0x4008_6442);
    }

    #[test]
    fn missing_dri_dir_is_unavailable() {
        let err = Vgem::open_in(Path::new("/nonexistent/dri")).expect_err("no such dir");
        assert!(err.is_unavailable(), "{err}");
    }
}
