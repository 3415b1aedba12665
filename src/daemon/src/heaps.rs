//! Allocation backends ("heaps") and the fallback logic between them.
//!
//! A heap is one of: a kernel dma-heap (`/dev/dma_heap/<name>`), udmabuf
//! (memfd pages exported as a dma-buf) or a plain sealed memfd. The registry
//! resolves heap names once at startup and keeps the devices open, so a
//! request only has to pick an order and try it. See `docs/heaps.md`.

use std::collections::HashSet;
use std::fmt;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::kernel::dma_heap::{self, DmaHeap, HeapNode};
use crate::kernel::udmabuf::{self, Udmabuf};
use crate::kernel::{dma_buf, memfd, page_round, KernelError};
use dmabroker_ipc::bufferword::WORD_PAGE;

/// Heap name of the udmabuf backend.
pub const UDMABUF_HEAP: &str = "udmabuf";
/// Heap name of the memfd backend.
pub const MEMFD_HEAP: &str = "memfd";
/// Largest allocation accepted (1 TiB): anything bigger is a client bug or an
/// attack, and catching it early gives a clear error instead of an OOM.
pub const MAX_ALLOCATION: u64 = 1 << 40;

/// How a heap produces buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Backend {
    DmaHeap,
    Udmabuf,
    Memfd,
}

impl Backend {
    /// Stable name used on the wire, in logs and in configuration.
    pub fn name(self) -> &'static str {
        match self {
            Backend::DmaHeap => "dma-heap",
            Backend::Udmabuf => "udmabuf",
            Backend::Memfd => "memfd",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A usable heap as reported to clients.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeapDesc {
    pub name: String,
    pub backend: Backend,
}

/// Where to look for heaps and in which order to use them.
#[derive(Clone, Debug)]
pub struct HeapConfig {
    pub dma_heap_dir: PathBuf,
    pub udmabuf_path: PathBuf,
    /// Fallback order by heap name. `None`: every discovered dma-heap
    /// ("system" first, then by name), then "udmabuf", then "memfd". Names
    /// that do not resolve are kept as known-but-unavailable so that a client
    /// asking for them falls back instead of getting "unknown heap".
    pub order: Option<Vec<String>>,
    pub enable_memfd: bool,
}

impl Default for HeapConfig {
    fn default() -> Self {
        HeapConfig {
            dma_heap_dir: PathBuf::from(dma_heap::DEFAULT_DMA_HEAP_DIR),
            udmabuf_path: PathBuf::from(udmabuf::DEFAULT_UDMABUF_PATH),
            order: None,
            enable_memfd: true,
        }
    }
}

/// A freshly allocated buffer.
#[derive(Debug)]
pub struct Allocation {
    pub fd: OwnedFd,
    /// The heap that actually served the request (after any fallback).
    pub heap: String,
    pub backend: Backend,
    /// Page-rounded size in bytes.
    pub size: u64,
    pub inode: u64,
    /// Heaps tried before `heap` succeeded, with the reason each failed; empty
    /// when the first choice worked. Lets the caller tell a client why it got
    /// a memfd instead of the CMA buffer it asked for.
    pub fallbacks: Vec<(String, String)>,
}

/// Why an allocation was refused.
#[derive(Debug, thiserror::Error)]
pub enum AllocError {
    #[error("unknown heap '{name}' (available: {})", available.join(", "))]
    UnknownHeap {
        name: String,
        available: Vec<String>,
    },
    #[error("invalid size {size}: {reason}")]
    InvalidSize { size: u64, reason: String },
    #[error("heap '{heap}' is not allowed")]
    HeapNotAllowed { heap: String },
    #[error("no heap could allocate {size} bytes ({})", describe_tried(tried))]
    Exhausted {
        size: u64,
        /// `(heap, error)` for every heap tried, in order.
        tried: Vec<(String, String)>,
    },
}

/// `heap: why` for each heap, as allocation errors and the start's
/// refusal list them.
pub(crate) fn describe_tried(tried: &[(String, String)]) -> String {
    if tried.is_empty() {
        return "no usable heap".to_owned();
    }
    tried
        .iter()
        .map(|(heap, err)| format!("{heap}: {err}"))
        .collect::<Vec<_>>()
        .join("; ")
}

#[derive(Debug)]
enum Source {
    DmaHeap(DmaHeap),
    Udmabuf(Udmabuf),
    Memfd,
    /// Configured or discovered, but not usable; the reason is reported when
    /// a client asks for it by name.
    Unavailable(String),
}

#[derive(Debug)]
struct Entry {
    desc: HeapDesc,
    source: Source,
}

impl Entry {
    fn usable(&self) -> bool {
        !matches!(self.source, Source::Unavailable(_))
    }

    /// Whether allocating here may take long: a dma-heap zeroes (and may
    /// compact or reclaim for) every page before it returns, udmabuf pins
    /// every page, and a heap node is whatever the administrator put in
    /// the heap directory, so the time taken is unbounded. A memfd takes
    /// no pages at all (they come at first touch); an unavailable heap
    /// fails at once.
    fn may_block(&self) -> bool {
        matches!(self.source, Source::DmaHeap(_) | Source::Udmabuf(_))
    }
}

/// The heaps known to the daemon, in fallback order.
#[derive(Debug)]
pub struct HeapRegistry {
    entries: Vec<Entry>,
    usable: Vec<HeapDesc>,
}

impl HeapRegistry {
    /// Opens every heap once. Failures are logged and the heap is kept as
    /// unavailable rather than aborting startup: a daemon with only memfd is
    /// still useful, and CMA or udmabuf may simply be absent on this board.
    pub fn discover(cfg: &HeapConfig) -> HeapRegistry {
        let nodes = dma_heap::discover(&cfg.dma_heap_dir).unwrap_or_else(|err| {
            tracing::warn!(%err, "cannot list dma-heaps; continuing without them");
            Vec::new()
        });
        let order = match &cfg.order {
            Some(order) => {
                let mut seen = HashSet::new();
                order
                    .iter()
                    .filter(|n| seen.insert(n.as_str()))
                    .cloned()
                    .collect()
            }
            None => default_order(&nodes, cfg.enable_memfd),
        };
        let entries: Vec<Entry> = order
            .into_iter()
            .map(|name| open_entry(cfg, &nodes, name))
            .collect();
        let usable = entries
            .iter()
            .filter(|e| e.usable())
            .map(|e| e.desc.clone())
            .collect();
        HeapRegistry { entries, usable }
    }

    /// The heaps of the order that cannot be used, each with why.
    pub fn unusable(&self) -> Vec<(String, String)> {
        self.entries
            .iter()
            .filter_map(|e| match &e.source {
                Source::Unavailable(why) => Some((e.desc.name.clone(), why.clone())),
                _ => None,
            })
            .collect()
    }

    /// Usable heaps in fallback order; the first is the default.
    pub fn heaps(&self) -> &[HeapDesc] {
        &self.usable
    }

    /// The default heap, or "" when no heap at all is usable (memfd disabled
    /// and no devices), in which case every allocation fails.
    pub fn default_heap(&self) -> &str {
        self.usable.first().map_or("", |h| h.name.as_str())
    }

    /// The heaps a client whose policy allows `allowed` may allocate from,
    /// in the order an allocation that names none tries them (the policy's
    /// order, see [`HeapRegistry::allocate`]): a client is shown what it
    /// can use, not heaps it would be refused.
    pub fn heaps_for(&self, allowed: Option<&[String]>) -> Vec<&HeapDesc> {
        match allowed {
            None => self.usable.iter().collect(),
            Some(allowed) => {
                let mut seen = HashSet::new();
                allowed
                    .iter()
                    .filter(|name| seen.insert(name.as_str()))
                    .filter_map(|name| self.usable.iter().find(|h| &h.name == name))
                    .collect()
            }
        }
    }

    /// The heap an allocation naming none comes from for a client whose
    /// policy allows `allowed`: what its `Welcome` calls its default, so
    /// that naming it is never refused. "" when it may use none.
    pub fn default_for(&self, allowed: Option<&[String]>) -> &str {
        self.heaps_for(allowed)
            .first()
            .map_or("", |h| h.name.as_str())
    }

    fn entry(&self, name: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.desc.name == name)
    }

    /// Allocates `size` bytes (rounded up to pages) named `name`: the
    /// [`HeapRegistry::plan`] carried out at once.
    pub fn allocate(
        &self,
        requested: Option<&str>,
        allowed: Option<&[String]>,
        size: u64,
        name: &str,
    ) -> Result<Allocation, AllocError> {
        let plan = self.plan(requested, allowed, size)?;
        self.carry_out(plan, name)
    }

    /// Which heaps an allocation of `size` bytes tries, in order, without
    /// allocating anything: the broker carries out on its own thread what
    /// cannot block (see [`HeapRegistry::carry_out_in_place`]) and the
    /// rest on a thread that may wait.
    ///
    /// `requested` is tried first (the default when `None`), then the rest of
    /// the fallback order: the client's `allowed` list when policy restricts
    /// heaps, the registry order otherwise. Heaps outside `allowed` are never
    /// used. Argument errors are reported here, before anything is allocated.
    pub fn plan(
        &self,
        requested: Option<&str>,
        allowed: Option<&[String]>,
        size: u64,
    ) -> Result<AllocPlan, AllocError> {
        let size = checked_size(size)?;
        if let Some(req) = requested {
            if self.entry(req).is_none() {
                return Err(AllocError::UnknownHeap {
                    name: req.to_owned(),
                    available: self.usable.iter().map(|h| h.name.clone()).collect(),
                });
            }
            if allowed.is_some_and(|a| !a.iter().any(|h| h == req)) {
                return Err(AllocError::HeapNotAllowed {
                    heap: req.to_owned(),
                });
            }
        }
        if allowed.is_some_and(|a| a.is_empty()) {
            return Err(AllocError::HeapNotAllowed {
                heap: requested.unwrap_or(self.default_heap()).to_owned(),
            });
        }

        let index = |name: &str| self.entries.iter().position(|e| e.desc.name == name);
        // The effective fallback order, restricted to what policy allows.
        let order: Vec<usize> = match allowed {
            Some(allowed) => {
                let mut seen = HashSet::new();
                allowed
                    .iter()
                    .filter(|n| seen.insert(n.as_str()))
                    .filter_map(|n| index(n))
                    .collect()
            }
            None => (0..self.entries.len()).collect(),
        };
        // An explicitly requested heap is tried even when unavailable, so its
        // reason shows up in `fallbacks`; otherwise unavailable heaps were
        // already reported at startup and are skipped silently.
        let requested_index = requested.and_then(index);
        let mut candidates: Vec<usize> = requested_index.into_iter().collect();
        candidates.extend(
            order
                .iter()
                .copied()
                .filter(|&i| self.entries[i].usable() && Some(i) != requested_index),
        );
        let tried = if candidates.is_empty() {
            order
                .iter()
                .map(|&i| {
                    let entry = &self.entries[i];
                    (entry.desc.name.clone(), unavailable_reason(entry))
                })
                .collect()
        } else {
            Vec::new()
        };
        let trying = Arc::new(HeapInTry::at(candidates.first().copied()));
        Ok(AllocPlan {
            size,
            candidates,
            tried,
            trying,
        })
    }

    /// Tries the heaps of `plan` in order until one serves it. `plan` must
    /// come from this registry.
    pub fn carry_out(&self, mut plan: AllocPlan, name: &str) -> Result<Allocation, AllocError> {
        let label = name.replace('\0', "_");
        while !plan.candidates.is_empty() {
            let index = plan.candidates.remove(0);
            plan.trying.set(Some(index));
            if let Some(allocation) = self.try_heap(&mut plan, index, &label) {
                return Ok(allocation);
            }
        }
        Err(plan.exhausted())
    }

    /// Carries out the start of `plan` that cannot block (memfd heaps),
    /// here. `Some` with the outcome if that settles it: a heap served it,
    /// or no heap is left to try. `None` if the heaps left may block: carry
    /// out the rest of `plan` on a thread that may wait for them.
    pub fn carry_out_in_place(
        &self,
        plan: &mut AllocPlan,
        name: &str,
    ) -> Option<Result<Allocation, AllocError>> {
        let label = name.replace('\0', "_");
        while let Some(&index) = plan.candidates.first() {
            plan.trying.set(Some(index));
            if self.entries.get(index).is_some_and(Entry::may_block) {
                return None;
            }
            plan.candidates.remove(0);
            if let Some(allocation) = self.try_heap(plan, index, &label) {
                return Some(Ok(allocation));
            }
        }
        Some(Err(plan.exhausted()))
    }

    /// The name of the heap `trying` says, "" before the first heap or
    /// after the last.
    pub fn heap_in_try(&self, trying: &HeapInTry) -> &str {
        trying
            .get()
            .and_then(|index| self.entries.get(index))
            .map_or("", |e| e.desc.name.as_str())
    }

    /// One heap of `plan`; its failure is recorded in the plan.
    fn try_heap(&self, plan: &mut AllocPlan, index: usize, label: &str) -> Option<Allocation> {
        let entry = self.entries.get(index)?;
        let size = plan.size;
        match allocate_from(entry, size, label) {
            Ok((fd, inode)) => {
                let tried = std::mem::take(&mut plan.tried);
                if !tried.is_empty() {
                    tracing::info!(heap = %entry.desc.name, ?tried, size, "allocation fell back");
                }
                Some(Allocation {
                    fd,
                    heap: entry.desc.name.clone(),
                    backend: entry.desc.backend,
                    size,
                    inode,
                    fallbacks: tried,
                })
            }
            Err(err) => {
                tracing::warn!(heap = %entry.desc.name, %err, size, "allocation failed, trying next heap");
                plan.tried.push((entry.desc.name.clone(), err));
                None
            }
        }
    }
}

/// What an allocation will try (see [`HeapRegistry::plan`]).
#[derive(Clone, Debug)]
pub struct AllocPlan {
    /// Page-rounded.
    size: u64,
    /// Indices into the registry's entries, in the order they are still
    /// to be tried.
    candidates: Vec<usize>,
    /// The heaps that failed so far and why (every heap in the order and
    /// why it is unusable, when none is usable).
    tried: Vec<(String, String)>,
    /// The heap being tried, for whoever watches from another thread.
    trying: Arc<HeapInTry>,
}

/// Which heap an allocation is trying now: written by the thread carrying
/// out its plan before each heap, read by the debug views on another
/// thread without waiting for it (a heap may hold that thread for good).
/// Only a registry entry's index, named by
/// [`HeapRegistry::heap_in_try`].
#[derive(Debug)]
pub struct HeapInTry(AtomicUsize);

impl HeapInTry {
    /// No heap: the plan has none left, or had none.
    const NONE: usize = usize::MAX;

    fn at(index: Option<usize>) -> HeapInTry {
        HeapInTry(AtomicUsize::new(index.unwrap_or(Self::NONE)))
    }

    fn set(&self, index: Option<usize>) {
        self.0.store(index.unwrap_or(Self::NONE), Ordering::Relaxed);
    }

    fn get(&self) -> Option<usize> {
        Some(self.0.load(Ordering::Relaxed)).filter(|&i| i != Self::NONE)
    }
}

impl AllocPlan {
    /// The page-rounded size the allocation will have.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Which heap the plan is at, as it is carried out (the first it will
    /// try, until then).
    pub fn heap_in_try(&self) -> Arc<HeapInTry> {
        Arc::clone(&self.trying)
    }

    fn exhausted(&mut self) -> AllocError {
        AllocError::Exhausted {
            size: self.size,
            tried: std::mem::take(&mut self.tried),
        }
    }
}

fn unavailable_reason(entry: &Entry) -> String {
    match &entry.source {
        Source::Unavailable(reason) => reason.clone(),
        _ => "not tried".to_owned(),
    }
}

/// Validates and page-rounds a requested size.
fn checked_size(size: u64) -> Result<u64, AllocError> {
    let invalid = |reason: &str| AllocError::InvalidSize {
        size,
        reason: reason.to_owned(),
    };
    if size == 0 {
        return Err(invalid("zero-size allocation"));
    }
    if size > MAX_ALLOCATION {
        return Err(invalid("larger than the 1 TiB limit"));
    }
    match page_round(size) {
        Some(rounded) if rounded <= MAX_ALLOCATION => Ok(rounded),
        Some(_) => Err(invalid("larger than the 1 TiB limit once page-rounded")),
        None => Err(invalid("overflows when rounded up to the page size")),
    }
}

/// "system" first because it is the heap every kernel with dma-heaps has and
/// the one that cannot run out the way CMA does; the rest by name so the
/// order is stable across boots.
fn default_order(nodes: &[HeapNode], enable_memfd: bool) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for node in nodes {
        if node.name == UDMABUF_HEAP || node.name == MEMFD_HEAP {
            tracing::warn!(heap = %node.name, "dma-heap shadows a built-in backend name; ignored");
            continue;
        }
        names.push(node.name.clone());
    }
    names.sort_by_key(|n| (n != "system", n.clone()));
    names.push(UDMABUF_HEAP.to_owned());
    if enable_memfd {
        names.push(MEMFD_HEAP.to_owned());
    }
    names
}

fn open_entry(cfg: &HeapConfig, nodes: &[HeapNode], name: String) -> Entry {
    let (backend, source) = match name.as_str() {
        UDMABUF_HEAP => (
            Backend::Udmabuf,
            match Udmabuf::open_path(&cfg.udmabuf_path) {
                Ok(dev) => Source::Udmabuf(dev),
                Err(err) => {
                    if err.errno() == Some(nix::errno::Errno::ENOENT) {
                        tracing::info!(path = %cfg.udmabuf_path.display(), "no udmabuf device");
                    } else {
                        tracing::warn!(%err, "udmabuf unavailable");
                    }
                    Source::Unavailable(err.to_string())
                }
            },
        ),
        MEMFD_HEAP => (
            Backend::Memfd,
            if cfg.enable_memfd {
                Source::Memfd
            } else {
                tracing::warn!("heap order lists memfd but the memfd backend is disabled");
                Source::Unavailable("memfd backend disabled".to_owned())
            },
        ),
        _ => (
            Backend::DmaHeap,
            match nodes.iter().find(|n| n.name == name) {
                Some(node) => match DmaHeap::open(&node.path) {
                    Ok(heap) => Source::DmaHeap(heap),
                    Err(err) => {
                        tracing::warn!(heap = %name, %err, "dma-heap cannot be opened; skipped");
                        Source::Unavailable(err.to_string())
                    }
                },
                None => {
                    let reason = format!("no dma-heap '{name}' in {}", cfg.dma_heap_dir.display());
                    tracing::warn!(heap = %name, "configured heap not present; skipped");
                    Source::Unavailable(reason)
                }
            },
        ),
    };
    Entry {
        desc: HeapDesc { name, backend },
        source,
    }
}

/// One attempt on one heap. Returns the fd and its inode.
fn allocate_from(entry: &Entry, size: u64, name: &str) -> Result<(OwnedFd, u64), String> {
    let fd = match &entry.source {
        Source::DmaHeap(heap) => {
            let fd = heap.alloc(size).map_err(|e| e.to_string())?;
            name_dma_buf(&fd, name);
            fd
        }
        Source::Udmabuf(dev) => {
            let backing = memfd::create_for_udmabuf(name, size).map_err(|e| e.to_string())?;
            // The udmabuf pins the pages; the memfd itself is not needed after.
            let fd = dev
                .create(backing.as_fd(), 0, size)
                .map_err(|e| e.to_string())?;
            name_dma_buf(&fd, name);
            fd
        }
        // One page more than the buffer: its reservation word lives past
        // the end, where only its holders can map it (see `bufferword`).
        Source::Memfd => memfd::create_sealed(name, size + WORD_PAGE).map_err(|e| e.to_string())?,
        Source::Unavailable(reason) => return Err(reason.clone()),
    };
    let inode = dma_buf::inode(fd.as_fd()).map_err(|e: KernelError| e.to_string())?;
    Ok((fd, inode))
}

/// The name is diagnostic only (fdinfo, debugfs), so failing to set it must
/// not fail the allocation.
fn name_dma_buf(fd: &OwnedFd, name: &str) {
    if let Err(err) = dma_buf::set_name(fd.as_fd(), name) {
        tracing::warn!(%err, name, "cannot name dma-buf");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::mapping::Mapping;
    use crate::kernel::testutil::TempDir;
    use crate::kernel::{fdinfo, page_size, require_or_skip};
    use std::os::fd::AsRawFd;
    use std::path::Path;

    fn host_config(dir: &Path) -> HeapConfig {
        HeapConfig {
            dma_heap_dir: dir.to_owned(),
            udmabuf_path: dir.join("no-udmabuf"),
            order: None,
            enable_memfd: true,
        }
    }

    fn memfd_only() -> HeapRegistry {
        HeapRegistry::discover(&host_config(Path::new("/nonexistent/dma_heap")))
    }

    /// A dma-heap directory whose nodes are regular files: they open fine but
    /// every ioctl fails with ENOTTY, like a heap that has run dry.
    fn fake_heaps(names: &[&str]) -> TempDir {
        let dir = TempDir::new("heaps");
        for name in names {
            std::fs::write(dir.path().join(name), b"").expect("write fake heap");
        }
        dir
    }

    fn names(reg: &HeapRegistry) -> Vec<&str> {
        reg.heaps().iter().map(|h| h.name.as_str()).collect()
    }

    #[test]
    fn backend_names() {
        assert_eq!(Backend::DmaHeap.name(), "dma-heap");
        assert_eq!(Backend::Udmabuf.name(), "udmabuf");
        assert_eq!(Backend::Memfd.name(), "memfd");
        assert_eq!(Backend::Memfd.to_string(), "memfd");
    }

    #[test]
    fn memfd_allocation_is_sealed_named_and_rounded() {
        let reg = memfd_only();
        assert_eq!(names(&reg), ["memfd"]);
        assert_eq!(reg.default_heap(), "memfd");
        let ps = page_size();
        let a = reg
            .allocate(None, None, ps + 1, "cam0:client42")
            .expect("allocate");
        assert_eq!(a.heap, "memfd");
        assert_eq!(a.backend, Backend::Memfd);
        assert_eq!(a.size, 2 * ps);
        assert!(a.fallbacks.is_empty());
        // One page more: the buffer's word.
        assert_eq!(
            dma_buf::size(a.fd.as_fd()).expect("size"),
            2 * ps + WORD_PAGE
        );
        assert_eq!(a.inode, dma_buf::inode(a.fd.as_fd()).expect("inode"));
        assert!(memfd::is_memfd(a.fd.as_fd()));
        let link = std::fs::read_link(format!("/proc/self/fd/{}", a.fd.as_raw_fd())).expect("link");
        assert!(
            link.to_string_lossy().starts_with("/memfd:cam0:client42"),
            "{link:?}"
        );
        let seals = memfd::seals(a.fd.as_fd()).expect("seals");
        use nix::fcntl::SealFlag;
        assert!(
            seals.contains(SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL)
        );

        let map = Mapping::new(a.fd.as_fd(), a.size as usize, true).expect("map");
        map.write_at(0, b"hello").expect("write");

        let b = reg
            .allocate(Some("memfd"), None, 1, "x")
            .expect("explicit memfd");
        assert_ne!(a.inode, b.inode);
        // NUL bytes in the name do not make the allocation fail.
        reg.allocate(None, None, 1, "a\0b").expect("NUL in name");
    }

    #[test]
    fn invalid_sizes_are_rejected() {
        let reg = memfd_only();
        for size in [0, MAX_ALLOCATION + 1, u64::MAX, u64::MAX - 1] {
            let err = reg.allocate(None, None, size, "x").expect_err("bad size");
            assert!(
                matches!(err, AllocError::InvalidSize { size: s, .. } if s == size),
                "{err}"
            );
        }
        let a = reg.allocate(None, None, 1, "x").expect("one byte");
        assert_eq!(a.size, page_size());
    }

    #[test]
    fn unknown_heap_lists_available_ones() {
        let reg = memfd_only();
        let err = reg
            .allocate(Some("linux,cma"), None, 4096, "x")
            .expect_err("unknown");
        match &err {
            AllocError::UnknownHeap { name, available } => {
                assert_eq!(name, "linux,cma");
                assert_eq!(available, &["memfd".to_owned()]);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(err.to_string().contains("linux,cma"), "{err}");
    }

    /// heaps.md: a dma-heap that happens to be called like a built-in
    /// backend is ignored, so "memfd" and "udmabuf" always name ours: an
    /// allocation asking for "memfd" gets a sealed memfd, not a device's
    /// buffer (here one that would fail every ioctl).
    #[test]
    fn a_dma_heap_named_like_a_built_in_backend_is_ignored() {
        let dir = fake_heaps(&["memfd", "udmabuf", "system"]);
        let reg = HeapRegistry::discover(&host_config(dir.path()));
        assert_eq!(names(&reg), ["system", "memfd"]);
        let memfd = reg.heaps().iter().find(|h| h.name == "memfd");
        assert_eq!(memfd.map(|h| h.backend), Some(Backend::Memfd));
        let a = reg.allocate(Some("memfd"), None, 4096, "x").expect("memfd");
        assert_eq!((a.heap.as_str(), a.backend), ("memfd", Backend::Memfd));
        assert!(a.fallbacks.is_empty(), "{:?}", a.fallbacks);
    }

    #[test]
    fn failing_dma_heap_falls_back_and_records_why() {
        let dir = fake_heaps(&["system", "linux,cma"]);
        let reg = HeapRegistry::discover(&host_config(dir.path()));
        // system first, then by name; udmabuf is absent so not listed.
        assert_eq!(names(&reg), ["system", "linux,cma", "memfd"]);
        assert_eq!(reg.default_heap(), "system");
        assert_eq!(reg.heaps()[0].backend, Backend::DmaHeap);

        let a = reg
            .allocate(None, None, 4096, "cam0:client42")
            .expect("fallback");
        assert_eq!(a.backend, Backend::Memfd);
        let tried: Vec<&str> = a.fallbacks.iter().map(|(h, _)| h.as_str()).collect();
        assert_eq!(tried, ["system", "linux,cma"]);
        for (heap, why) in &a.fallbacks {
            assert!(why.contains("DMA_HEAP_IOCTL_ALLOC"), "{heap}: {why}");
            assert!(why.contains("ENOTTY"), "{heap}: {why}");
        }

        // Asking for the missing udmabuf explicitly says why it was skipped.
        let a = reg
            .allocate(Some("udmabuf"), None, 4096, "x")
            .expect("fallback");
        assert_eq!(a.heap, "memfd");
        assert_eq!(a.fallbacks[0].0, "udmabuf");
        assert!(a.fallbacks[0].1.contains("no-udmabuf"), "{:?}", a.fallbacks);
    }

    /// The debug views name the heap an allocation in flight is at: the
    /// first it will try until it is carried out, then each in turn.
    #[test]
    fn a_plan_says_which_heap_it_is_trying() {
        let dir = fake_heaps(&["system", "linux,cma"]);
        let reg = HeapRegistry::discover(&host_config(dir.path()));
        let mut plan = reg.plan(Some("linux,cma"), None, 4096).expect("plan");
        let trying = plan.heap_in_try();
        assert_eq!(reg.heap_in_try(&trying), "linux,cma");
        assert!(reg.carry_out_in_place(&mut plan, "x").is_none());
        assert_eq!(reg.heap_in_try(&trying), "linux,cma");
        let a = reg.carry_out(plan, "x").expect("fallback");
        assert_eq!(a.heap, "memfd");
        assert_eq!(reg.heap_in_try(&trying), "memfd");

        // A memfd-first plan is at memfd, and nothing is at no heap.
        let plan = reg.plan(Some("memfd"), None, 4096).expect("plan");
        assert_eq!(reg.heap_in_try(&plan.heap_in_try()), "memfd");
        assert_eq!(reg.heap_in_try(&HeapInTry::at(None)), "");
    }

    #[test]
    fn allowed_list_restricts_and_orders_fallback() {
        let dir = fake_heaps(&["system", "linux,cma"]);
        let reg = HeapRegistry::discover(&host_config(dir.path()));
        let allow = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();

        // Only system allowed: no fallback to memfd.
        let only_system = allow(&["system"]);
        let err = reg
            .allocate(None, Some(&only_system), 4096, "x")
            .expect_err("system fails");
        match &err {
            AllocError::Exhausted { tried, size } => {
                assert_eq!(*size, 4096);
                assert_eq!(tried.len(), 1);
                assert_eq!(tried[0].0, "system");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(err.to_string().contains("ENOTTY"), "{err}");

        // The client's order decides the default.
        let memfd_first = allow(&["memfd", "system"]);
        let a = reg
            .allocate(None, Some(&memfd_first), 4096, "x")
            .expect("memfd");
        assert_eq!(a.heap, "memfd");
        assert!(a.fallbacks.is_empty());

        // Explicit request first, then the client's order.
        let order = allow(&["linux,cma", "system", "memfd"]);
        let a = reg
            .allocate(Some("system"), Some(&order), 4096, "x")
            .expect("fallback");
        let tried: Vec<&str> = a.fallbacks.iter().map(|(h, _)| h.as_str()).collect();
        assert_eq!(tried, ["system", "linux,cma"]);
        assert_eq!(a.heap, "memfd");

        let err = reg
            .allocate(Some("memfd"), Some(&only_system), 4096, "x")
            .expect_err("not allowed");
        assert!(
            matches!(&err, AllocError::HeapNotAllowed { heap } if heap == "memfd"),
            "{err}"
        );
        let err = reg
            .allocate(None, Some(&[]), 4096, "x")
            .expect_err("nothing allowed");
        assert!(matches!(err, AllocError::HeapNotAllowed { .. }), "{err}");

        // Unknown names in the policy are ignored, not fatal.
        let with_unknown = allow(&["vendor,secure", "memfd"]);
        let a = reg
            .allocate(None, Some(&with_unknown), 4096, "x")
            .expect("memfd");
        assert_eq!(a.heap, "memfd");
    }

    #[test]
    fn configured_order_and_unavailable_heaps() {
        let dir = fake_heaps(&["system", "reserved"]);
        std::os::unix::fs::symlink(dir.path().join("gone"), dir.path().join("broken"))
            .expect("symlink");
        let cfg = HeapConfig {
            order: Some(vec![
                "linux,cma".into(),
                "memfd".into(),
                "broken".into(),
                "system".into(),
                "memfd".into(),
            ]),
            ..host_config(dir.path())
        };
        let reg = HeapRegistry::discover(&cfg);
        assert_eq!(names(&reg), ["memfd", "system"]);
        assert_eq!(reg.default_heap(), "memfd");

        // Configured but absent / unopenable: falls back, with the reason.
        let a = reg
            .allocate(Some("linux,cma"), None, 4096, "x")
            .expect("fallback");
        assert_eq!(a.heap, "memfd");
        assert_eq!(a.fallbacks.len(), 1);
        assert!(
            a.fallbacks[0].1.contains("no dma-heap 'linux,cma'"),
            "{:?}",
            a.fallbacks
        );
        let a = reg
            .allocate(Some("broken"), None, 4096, "x")
            .expect("fallback");
        assert_eq!(a.fallbacks[0].0, "broken");
        assert!(
            a.fallbacks[0].1.contains("open dma-heap"),
            "{:?}",
            a.fallbacks
        );

        // Discovered but not configured: unknown to clients.
        let err = reg
            .allocate(Some("reserved"), None, 4096, "x")
            .expect_err("excluded");
        assert!(matches!(err, AllocError::UnknownHeap { .. }), "{err}");

        // Default order skips unopenable nodes too.
        let reg = HeapRegistry::discover(&host_config(dir.path()));
        assert_eq!(names(&reg), ["system", "reserved", "memfd"]);
    }

    /// A client whose policy lists heaps is told its own default and shown
    /// its own heaps: the daemon's default (here `system`) was announced
    /// to a client that may use only `memfd`, and naming it was refused.
    #[test]
    fn a_clients_default_and_heaps_follow_its_allowed_list() {
        let dir = fake_heaps(&["system", "reserved"]);
        let reg = HeapRegistry::discover(&host_config(dir.path()));
        let shown = |allowed: Option<&[String]>| -> Vec<String> {
            reg.heaps_for(allowed)
                .iter()
                .map(|h| h.name.clone())
                .collect()
        };
        assert_eq!(reg.default_for(None), "system");
        assert_eq!(shown(None), ["system", "reserved", "memfd"]);

        let memfd_first: Vec<String> = ["linux,cma", "memfd", "reserved", "memfd"]
            .map(String::from)
            .to_vec();
        assert_eq!(reg.default_for(Some(&memfd_first)), "memfd");
        assert_eq!(shown(Some(&memfd_first)), ["memfd", "reserved"]);
        let from_default = reg
            .allocate(None, Some(&memfd_first), 4096, "x")
            .expect("alloc");
        assert_eq!(from_default.heap, reg.default_for(Some(&memfd_first)));

        assert_eq!(reg.default_for(Some(&[])), "");
        assert!(shown(Some(&[])).is_empty());
    }

    #[test]
    fn no_usable_heap_is_exhausted() {
        let cfg = HeapConfig {
            enable_memfd: false,
            ..host_config(Path::new("/nonexistent/dma_heap"))
        };
        let reg = HeapRegistry::discover(&cfg);
        assert!(reg.heaps().is_empty());
        assert_eq!(reg.default_heap(), "");
        let err = reg.allocate(None, None, 4096, "x").expect_err("nothing");
        match err {
            AllocError::Exhausted { tried, .. } => {
                assert_eq!(tried.len(), 1);
                assert_eq!(tried[0].0, "udmabuf");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn kernel_tier_heaps_allocate_from_system() {
        let available = Path::new("/dev/dma_heap/system").exists();
        if !require_or_skip("dma-heap `system` (/dev/dma_heap/system)", available) {
            return;
        }
        let reg = HeapRegistry::discover(&HeapConfig::default());
        assert_eq!(reg.default_heap(), "system");
        let ps = page_size();
        let a = reg
            .allocate(None, None, 3 * ps + 1, "cam0:client42")
            .expect("allocate");
        assert_eq!(a.heap, "system");
        assert_eq!(a.backend, Backend::DmaHeap);
        assert_eq!(a.size, 4 * ps);
        assert!(a.fallbacks.is_empty(), "{:?}", a.fallbacks);
        assert!(dma_buf::is_dma_buf(a.fd.as_fd()));
        assert_eq!(a.inode, dma_buf::inode(a.fd.as_fd()).expect("inode"));
        crate::kernel::testutil::assert_fdinfo(a.fd.as_fd(), "cam0:client42", "system", 4 * ps);
    }

    #[test]
    fn kernel_tier_heaps_allocate_from_udmabuf() {
        let available = Path::new(udmabuf::DEFAULT_UDMABUF_PATH).exists();
        if !require_or_skip("udmabuf (/dev/udmabuf)", available) {
            return;
        }
        let reg = HeapRegistry::discover(&HeapConfig::default());
        assert!(names(&reg).contains(&"udmabuf"), "{:?}", names(&reg));
        let ps = page_size();
        let a = reg
            .allocate(Some("udmabuf"), None, 2 * ps, "cam1:client7")
            .expect("allocate");
        assert_eq!(a.heap, "udmabuf");
        assert_eq!(a.backend, Backend::Udmabuf);
        assert!(a.fallbacks.is_empty(), "{:?}", a.fallbacks);
        assert!(dma_buf::is_dma_buf(a.fd.as_fd()));
        let info = fdinfo(a.fd.as_fd()).expect("fdinfo");
        assert_eq!(
            info.get("exp_name").map(String::as_str),
            Some("udmabuf"),
            "{info:?}"
        );
        assert_eq!(
            info.get("name").map(String::as_str),
            Some("cam1:client7"),
            "{info:?}"
        );
        assert_eq!(dma_buf::size(a.fd.as_fd()).expect("size"), 2 * ps);
        let map = Mapping::new(a.fd.as_fd(), a.size as usize, true).expect("map");
        map.write_at(ps as usize - 2, b"span").expect("write");
        let mut back = [0u8; 4];
        map.read_at(ps as usize - 2, &mut back).expect("read");
        assert_eq!(&back, b"span");
    }
}
