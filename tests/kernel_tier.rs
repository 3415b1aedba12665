//! The broker's own behaviour on a real kernel (the real-kernel tier,
//! `tests/vm/run`): buffers from `/dev/dma_heap/system` and udmabuf, passed
//! between processes and named in fdinfo; cache syncs around CPU accesses;
//! the kernel's implicit fences (a vgem "device") honoured for autofence
//! and no-autofence readers; a device write ended with a sync_file that
//! keeps the buffer fenced, in the broker and in the dma-buf itself.
//!
//! On a machine without these devices (the build machines) every test
//! prints why it skips; in the VM (`DMABROKER_REQUIRE_KERNEL=1`) a missing
//! device fails the test.

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use dmabroker_client::{Access, AllocRequest, Buffer, Client};
use dmabroker_daemon::kernel::{dma_buf, sync_file};
use dmabroker_ipc::{ReplyBody, RequestBody};
use dmabroker_suite::abandon;
use dmabroker_suite::daemon::binary;
use dmabroker_suite::fuse::{new_client_served, HeldEpoll, Stall, StallingFuse};
use dmabroker_suite::proc::{free_fds, limit_fds};
use dmabroker_suite::raw::RawClient;
use dmabroker_suite::scripted::{field, PROMPT};
use dmabroker_suite::sdnotify::ServiceManager;
use dmabroker_suite::vgem::{FenceHandle, Vgem, VgemBuffer, VgemError};
use dmabroker_suite::{have_root, kernel_feature, Daemon, DaemonOptions, Scripted};

/// How long a begin must stay unanswered to count as held. Well within the
/// 10 s after which the kernel signals a vgem fence by itself.
const STILL_BLOCKED: Duration = Duration::from_secs(2);

/// How long a daemon may take to say READY: a start in the emulated guest
/// takes seconds, and only a failing run waits this long.
const DAEMON_START: Duration = Duration::from_secs(60);

fn have_dma_heap() -> bool {
    kernel_feature(
        "dma-heap `system` (/dev/dma_heap/system)",
        Path::new("/dev/dma_heap/system").exists(),
    )
}

/// A FUSE server whose POLL is never answered, for a held epoll; `None`,
/// saying why, where there can be none.
fn stalling_fuse(test: &str) -> Option<StallingFuse> {
    if !have_root(test) || !kernel_feature("FUSE (/dev/fuse)", Path::new("/dev/fuse").exists()) {
        return None;
    }
    let fuse = StallingFuse::mount(test, Stall::GetattrOf(0));
    assert!(
        fuse.is_some() || std::env::var_os("DMABROKER_REQUIRE_KERNEL").is_none(),
        "the FUSE server could not mount"
    );
    fuse
}

fn have_udmabuf() -> bool {
    kernel_feature("udmabuf (/dev/udmabuf)", Path::new("/dev/udmabuf").exists())
}

/// The vgem device, or `None` (after saying why) where there is none.
fn vgem() -> Option<Vgem> {
    match Vgem::open() {
        Ok(vgem) => Some(vgem),
        Err(err) if err.is_unavailable() => {
            kernel_feature(&format!("vgem ({err})"), false);
            None
        }
        Err(err) => panic!("opening vgem: {err}"),
    }
}

/// A "GPU" buffer of vgem's and the broker buffer `owner` adopted from it.
fn adopted_gpu_buffer<'v>(vgem: &'v Vgem, owner: &Client) -> (VgemBuffer<'v>, Buffer) {
    let gpu_buffer = vgem.create_buffer(8192).expect("vgem buffer");
    let adopted = owner
        .adopt(
            gpu_buffer.try_clone_dmabuf().expect("dup"),
            Some("gpu-frame"),
        )
        .expect("adopting a vgem dma-buf");
    (gpu_buffer, adopted)
}

/// A buffer of `size` bytes from the `system` dma-heap, allocated by
/// `client`.
fn system_buffer(client: &Client, size: u64, name: Option<&str>) -> Buffer {
    client
        .alloc_with(AllocRequest {
            size,
            heap: Some("system".into()),
            name: name.map(str::to_owned),
        })
        .expect("alloc from the system heap")
}

/// A client process that imported the buffer `token` shares: it and its id
/// of the buffer.
fn importer(daemon: &Daemon, token: &impl std::fmt::Display, extra: &[&str]) -> (Scripted, String) {
    let mut client = Scripted::spawn(daemon.socket(), extra);
    let id = field(&client.ok(&format!("import {token}")), "id")
        .expect("id")
        .to_owned();
    (client, id)
}

/// A daemon that uses the machine's real dma-heaps and udmabuf.
/// A daemon on the real dma-heaps whose fds the test can count to the last
/// one: no D-Bus, whose reconnect attempts would open fds of their own.
fn fd_countable_daemon() -> Daemon {
    Daemon::start_with(DaemonOptions {
        args: ["--dma-heap-dir", "/dev/dma_heap", "--dbus", "none"]
            .map(String::from)
            .to_vec(),
        ..Default::default()
    })
}

fn real_kernel_daemon() -> Daemon {
    Daemon::start_with(DaemonOptions {
        args: [
            "--dma-heap-dir",
            "/dev/dma_heap",
            "--udmabuf",
            "/dev/udmabuf",
        ]
        .map(String::from)
        .to_vec(),
        ..Default::default()
    })
}

/// A device write on a buffer, ended with the fence of a vgem write still
/// under way, which this process watches with an epoll it holds locked
/// (its own copy sent and closed): the daemon's copy is the last, and its
/// release waits for good once the fence has signalled.
struct WatchedFence<'v> {
    _gpu_buffer: VgemBuffer<'v>,
    fence: FenceHandle,
    attached: Instant,
    held: HeldEpoll,
}

fn end_device_write_with_a_watched_fence<'v>(
    vgem: &'v Vgem,
    frame: &Buffer,
    fuse: &mut StallingFuse,
) -> WatchedFence<'v> {
    let render = frame.begin(Access::DeviceWrite).expect("device write");
    let gpu_buffer = vgem.create_buffer(4096).expect("vgem buffer");
    let fence = gpu_buffer.attach_fence(true).expect("attach a write fence");
    let attached = Instant::now();
    let done =
        dma_buf::export_sync_file(gpu_buffer.dmabuf(), false).expect("export the GPU's fence");
    let held = HeldEpoll::new(fuse, done.as_fd());
    render
        .end_with_fence(done)
        .expect("end the device write with its fence");
    WatchedFence {
        _gpu_buffer: gpu_buffer,
        fence,
        attached,
        held,
    }
}

/// A daemon on the real dma-heaps, with `policy`, that clients of other
/// uids can reach, and whose fds the test can count (no D-Bus).
fn daemon_for_two_users(policy: &str) -> Daemon {
    Daemon::start_with(DaemonOptions {
        policy: Some(policy.to_owned()),
        args: [
            "--dma-heap-dir",
            "/dev/dma_heap",
            "--dbus",
            "none",
            "--socket-mode",
            "0666",
        ]
        .map(String::from)
        .to_vec(),
        ..Default::default()
    })
}

/// What [`own_free_goes_on`] saw, with a shared file's release stuck.
struct OwnFree {
    before: usize,
    left: usize,
    stuck: usize,
}

impl OwnFree {
    /// The user's own freed buffer was let go of, and the shared file's
    /// release was really stuck meanwhile (else the test tells nothing).
    fn assert(&self, own: &str, shared: &str) {
        let OwnFree {
            before,
            left,
            stuck,
        } = self;
        assert!(
            left <= before,
            "{own} still open in the daemon behind {shared} ({left} fds, {before} before)"
        );
        // At least: another close may be under way at the moment of looking.
        assert!(
            *stuck >= 1,
            "{shared} was not stuck before the own free, so this tells nothing"
        );
    }
}

/// Runs `alloc_and_free` (a user's own buffer, allocated and freed) once
/// a shared file's release is stuck (a closing thread of the daemon's in
/// it, waited for: the daemon hands the release over when it gets to it),
/// and waits for the daemon's fd count to come back.
fn own_free_goes_on(daemon: &Daemon, alloc_and_free: impl FnOnce()) -> OwnFree {
    let deadline = Instant::now() + PROMPT;
    let mut stuck = stuck_closing_threads(daemon);
    while stuck == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        stuck = stuck_closing_threads(daemon);
    }
    let before = daemon.baseline();
    alloc_and_free();
    let deadline = Instant::now() + PROMPT;
    while daemon.fd_count() > before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    OwnFree {
        before,
        left: daemon.fd_count(),
        stuck,
    }
}

/// The daemon's closing threads stuck in a release (in uninterruptible
/// sleep: a release waiting on a held epoll's mutex). A stuck release's fd
/// is already gone from `/proc/PID/fd`: `close(2)` takes it out before it
/// lets go of the file.
fn stuck_closing_threads(daemon: &Daemon) -> usize {
    let dir = format!("/proc/{}/task", daemon.pid());
    std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {dir}: {e}"))
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("stat")).ok())
        .filter(|stat| {
            // `pid (comm) state ...`; comm is cut to 15 bytes.
            stat.contains("(dmabroker-fdclo)")
                && stat
                    .rsplit_once(')')
                    .is_some_and(|(_, rest)| rest.trim_start().starts_with('D'))
        })
        .count()
}

/// `/proc/PID/fdinfo/FD` as key/value pairs.
fn fdinfo(pid: u32, fd: &str) -> HashMap<String, String> {
    let path = format!("/proc/{pid}/fdinfo/{fd}");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    text.lines()
        .filter_map(|line| line.split_once(':'))
        .map(|(key, value)| (key.trim().to_owned(), value.trim().to_owned()))
        .collect()
}

/// The kernel's inode of a process's fd (not the broker's word for it).
fn inode_of(pid: u32, fd: &str) -> u64 {
    let path = format!("/proc/{pid}/fd/{fd}");
    std::fs::metadata(&path)
        .unwrap_or_else(|e| panic!("stat {path}: {e}"))
        .ino()
}

/// While a reader waits for a device, the broker must go on serving
/// everyone else: the wait must not be a blocking ioctl in the daemon (a
/// `DMA_BUF_IOCTL_SYNC` would sit until the fence signals).
fn assert_still_serving(client: &Client) {
    let asked = Instant::now();
    client.heaps().expect("a request while a reader waits");
    assert!(
        asked.elapsed() < Duration::from_secs(3),
        "the broker took {:?} to answer while a reader waited for a device fence",
        asked.elapsed()
    );
}

/// Signals a vgem fence, failing the test if the kernel's own 10 s timeout
/// got there first (then "held until signalled" was not what we saw).
fn signal(vgem: &Vgem, fence: FenceHandle, attached: Instant) {
    match vgem.signal(fence) {
        Ok(()) => {}
        Err(err @ VgemError::FenceTimedOut { .. }) => panic!(
            "{err}: {:?} passed since the attach, too long to tell whether the broker waited for it",
            attached.elapsed()
        ),
        Err(err) => panic!("signalling the vgem fence: {err}"),
    }
}

/// One process allocates from `heap` and exports, another imports: the
/// kernel names the buffer after its exporter and the requester, both fds
/// are the same kernel object, and each process sees the other's writes.
fn allocate_and_share(heap: &str, exporter: &str) {
    let daemon = real_kernel_daemon();
    let mut camera = Scripted::spawn(daemon.socket(), &[]);
    let mut codec = Scripted::spawn(daemon.socket(), &[]);

    let allocated = camera.ok(&format!("alloc 5000 heap={heap} name=cam0"));
    assert_eq!(
        field(&allocated, "heap"),
        Some(heap),
        "no fallback to another heap: {allocated}"
    );
    assert_eq!(
        field(&allocated, "size"),
        Some("8192"),
        "sizes round up to pages"
    );
    let id = field(&allocated, "id").expect("id").to_owned();
    let camera_fd = field(&allocated, "fd").expect("fd").to_owned();

    let info = fdinfo(camera.pid(), &camera_fd);
    assert_eq!(
        info.get("exp_name").map(String::as_str),
        Some(exporter),
        "{info:?}"
    );
    assert_eq!(
        info.get("size").map(String::as_str),
        Some("8192"),
        "{info:?}"
    );
    let name = info.get("name").map(String::as_str).unwrap_or_default();
    assert!(
        name.contains("cam0") && name.contains(&camera.pid().to_string()),
        "fdinfo names the buffer after the request and the requesting process: {info:?}"
    );

    let token = camera.ok(&format!("export {id}"));
    let token = field(&token, "token").expect("token");
    let imported = codec.ok(&format!("import {token}"));
    let codec_fd = field(&imported, "fd").expect("fd");
    let kernel_inode = inode_of(camera.pid(), &camera_fd);
    assert_eq!(
        inode_of(codec.pid(), codec_fd),
        kernel_inode,
        "both fds are one dma-buf"
    );
    assert_eq!(
        field(&imported, "inode"),
        Some(kernel_inode.to_string().as_str())
    );
    assert_eq!(
        fdinfo(codec.pid(), codec_fd)
            .get("exp_name")
            .map(String::as_str),
        Some(exporter)
    );

    camera.ok(&format!("write {id} 171"));
    let read = codec.ok(&format!("read {id}"));
    assert_eq!(field(&read, "byte"), Some("171"), "{read}");
    assert_eq!(field(&read, "uniform"), Some("true"), "{read}");
    codec.ok(&format!("write {id} 66"));
    assert_eq!(field(&camera.ok(&format!("read {id}")), "byte"), Some("66"));
}

#[test]
fn kernel_tier_system_heap_buffers_are_shared_between_processes() {
    if !have_dma_heap() {
        return;
    }
    allocate_and_share("system", "system");
}

#[test]
fn kernel_tier_udmabuf_buffers_are_shared_between_processes() {
    if !have_udmabuf() {
        return;
    }
    allocate_and_share("udmabuf", "udmabuf");
}

/// A dma-buf the broker already arbitrates, adopted by another client that
/// got its fd some other way, is the same buffer, not a second one: were it
/// a second entry, the broker would let that client read while the first
/// writes, and only one of the two would survive a restart (systemd's fd
/// store keeps one copy of a file).
#[test]
fn kernel_tier_adopting_a_brokered_dma_buf_joins_its_arbitration() {
    if !have_dma_heap() {
        return;
    }
    let daemon = real_kernel_daemon();
    let camera = daemon.client();
    let frame = system_buffer(&camera, 4096, Some("frame"));
    let display = daemon.client();
    let passed = frame.as_fd().try_clone_to_owned().expect("dup");
    let adopted = display
        .adopt(passed, Some("frame-again"))
        .expect("adopting a brokered dma-buf");
    assert_eq!(adopted.id(), frame.id(), "the same buffer, not a new one");
    assert_eq!(adopted.inode(), frame.inode());

    let write = frame.begin(Access::CpuWrite).expect("the camera writes");
    match adopted.begin_timeout(Access::CpuRead, Duration::from_millis(300)) {
        Err(err) => assert_eq!(err.code(), Some(dmabroker_ipc::ErrorCode::Timeout), "{err}"),
        Ok(_) => panic!("a read of the adopted buffer was granted during the camera's write"),
    }
    drop(write);
    drop(
        adopted
            .begin(Access::CpuRead)
            .expect("read after the write"),
    );

    // A second adoption by a holder is refused, as before; the buffer
    // lives on while either client holds it.
    let again = frame.as_fd().try_clone_to_owned().expect("dup");
    let err = display.adopt(again, None).expect_err("adopting twice");
    assert_eq!(
        err.code(),
        Some(dmabroker_ipc::ErrorCode::InvalidArgument),
        "{err}"
    );
    drop(frame);
    assert!(adopted.info().is_ok(), "the display still holds it");
}

/// Any holder of a dma-buf may name it with bytes that are not UTF-8
/// (`DMA_BUF_SET_NAME_B` takes any bytes, and the kernel prints them as
/// they are). The daemon read the buffer's fdinfo as text, failed, and
/// refused an adopt of that dma-buf as not being one.
#[test]
fn kernel_tier_a_dma_buf_named_with_bytes_that_are_not_utf8_can_be_adopted() {
    if !have_dma_heap() {
        return;
    }
    let daemon = real_kernel_daemon();
    let camera = daemon.client();
    let frame = system_buffer(&camera, 4096, Some("frame"));
    // _IOW('b', 1, u64): DMA_BUF_SET_NAME_B, as in <linux/dma-buf.h>.
    const DMA_BUF_SET_NAME_B: libc::c_ulong = 0x4008_6201;
    let name = b"\xff\xfe\0";
    // SAFETY: the fd is a live dma-buf for the call, and `name` is a
    // NUL-terminated byte string that outlives it; the kernel reads at
    // most DMA_BUF_NAME_LEN bytes of it.
    let named = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&frame.as_fd()),
            DMA_BUF_SET_NAME_B,
            name.as_ptr(),
        )
    };
    assert_eq!(
        named,
        0,
        "DMA_BUF_SET_NAME_B: {}",
        std::io::Error::last_os_error()
    );
    let display = daemon.client();
    let passed = frame.as_fd().try_clone_to_owned().expect("dup");
    let adopted = display
        .adopt(passed, Some("renamed"))
        .expect("adopting a dma-buf whose name is not UTF-8");
    assert_eq!(adopted.id(), frame.id(), "the same buffer, not a new one");
}

/// After a broker restart a buffer waits for its holders to re-attach. A
/// client adopting its dma-buf before the owner is back cannot be checked
/// against the owner's user yet: that is "try again" (`Busy`), not the
/// permanent-sounding refusal it got, whatever the policy said.
#[test]
fn kernel_tier_adopting_a_restored_dma_buf_before_its_owner_is_back_is_busy() {
    if !have_dma_heap() {
        return;
    }
    let manager = ServiceManager::new();
    let start = |name: &str| {
        let log = manager.dir.path().join(format!("{name}.log"));
        let readies = manager.received().count("READY=1");
        let args = ["--dma-heap-dir", "/dev/dma_heap", "--dbus", "none"];
        let child = manager.start_daemon(&binary("dmabrokerd"), &args, &[], &log);
        manager.wait_for("READY=1", DAEMON_START, |r| r.count("READY=1") > readies);
        child
    };
    let mut first = start("first");
    let camera = Client::connect_to(&manager.socket_path).expect("camera");
    let frame = system_buffer(&camera, 4096, None);
    manager.wait_until_recorded(1);
    first.kill().expect("SIGKILL");
    first.wait().expect("reap");

    let mut second = start("second");
    let display = Client::connect_to(&manager.socket_path).expect("display");
    let dup = || frame.as_fd().try_clone_to_owned().expect("dup");
    let err = display
        .adopt(dup(), None)
        .expect_err("the owner has not re-attached yet");
    assert_eq!(err.code(), Some(dmabroker_ipc::ErrorCode::Busy), "{err}");
    camera.heaps().expect("the camera re-attaches");
    // "Try again" with the same fd: the refusal gave it back.
    let adopted = display
        .adopt(err.dmabuf, None)
        .expect("adopted once the owner is back");
    assert_eq!(adopted.id(), frame.id());
    drop((adopted, frame));
    second.kill().expect("SIGKILL");
    second.wait().expect("reap");
}

/// An `End` with a sync_file that the daemon cannot take over (it is out of
/// fds for its copy) is refused and changes nothing: the access is still
/// held and can be ended again. The copy was once made after the arbiter
/// had handed the access to a wait that then never started, so the buffer
/// stayed fenced until every holder left.
#[test]
fn kernel_tier_an_end_with_a_fence_the_daemon_cannot_copy_changes_nothing() {
    if !have_dma_heap() {
        return;
    }
    let daemon = fd_countable_daemon();
    let mut writer = RawClient::connect(daemon.socket());
    writer.hello();
    let (allocated, fds) = writer.request_fds(RequestBody::Alloc {
        size: 4096,
        heap: Some("system".into()),
        name: None,
    });
    let buffer = match allocated {
        Ok(ReplyBody::Buffer(info)) => info.id,
        other => panic!("alloc: {other:?}"),
    };
    let dmabuf = fds.into_iter().next().expect("the buffer's fd");
    let access = match writer.request(RequestBody::Begin {
        buffer,
        access: dmabroker_ipc::Access::DeviceWrite,
        timeout_ms: None,
    }) {
        Ok(ReplyBody::Granted(grant)) => grant.access,
        other => panic!("begin: {other:?}"),
    };
    let fence = dma_buf::export_sync_file(dmabuf.as_fd(), true).expect("a sync_file");
    // Room for the fd that arrives with the End, none for the daemon's copy.
    let pid = daemon.pid();
    dmabroker_suite::proc::stable_fd_count(pid);
    let free = free_fds(pid, 2);
    limit_fds(pid, free[1]);
    let (_, bytes) = writer.encode(
        RequestBody::End {
            access,
            fence_slot: Some(0),
        },
        1,
    );
    writer.send_raw(&bytes, &[fence.as_fd()]);
    let refused = writer.recv_reply().expect("an answer");
    limit_fds(pid, 1024);
    assert_eq!(
        refused.1.clone().err(),
        Some(dmabroker_ipc::ErrorCode::Internal),
        "the end was refused for the copy, not for the fd that came with it: {refused:?}"
    );
    // Nothing changed: the access is still this client's to end.
    assert!(
        writer
            .request(RequestBody::End {
                access,
                fence_slot: None,
            })
            .is_ok(),
        "the access was no longer held"
    );
    let mut reader = RawClient::connect(daemon.socket());
    reader.hello();
    let token = writer.export(buffer);
    let shared = reader.import(token);
    match reader.request(RequestBody::Begin {
        buffer: shared,
        access: dmabroker_ipc::Access::CpuRead,
        timeout_ms: Some(2000),
    }) {
        Ok(ReplyBody::Granted(_)) => {}
        other => panic!("the buffer stayed fenced: {other:?}"),
    }
}

/// An autofence reader's grant on a dma-buf the device is writing must wait
/// for the device's fence, and the daemon waits for it on a copy of the
/// buffer's fd. Out of fds for that copy, it granted at once ("granting
/// now"): the reader read while the device wrote. (Its cache sync then
/// waited for the fence in place, stopping every client.) The begin is
/// answered `Busy` instead, and the buffer stays the device's.
#[test]
fn kernel_tier_a_grant_the_daemon_has_no_fd_to_wait_for_is_refused_not_given_early() {
    let Some(vgem) = vgem() else {
        return;
    };
    let (id, answer, again) = read_begun_with_no_fd_to_spare(&vgem, false, Some(5000));
    assert_eq!(
        answer.expect("an answer"),
        (id, Err(dmabroker_ipc::ErrorCode::Busy)),
        "answered while the device still writes"
    );
    match again {
        Ok(ReplyBody::Granted(_)) => {}
        other => panic!("the read was not granted once the device was done: {other:?}"),
    }
}

/// What a raw client's request is answered.
type RawAnswer = Result<ReplyBody, dmabroker_ipc::ErrorCode>;

/// A CPU read begun (autofence or not) on an adopted vgem buffer a device
/// is writing, sent while the daemon has not one fd to spare; then, the
/// fds given back and the device done, the same begin again (with
/// `timeout_ms`). Returns the first begin's id and answer, and the second
/// begin's answer; the daemon is checked to serve others in between.
fn read_begun_with_no_fd_to_spare(
    vgem: &Vgem,
    no_autofence: bool,
    timeout_ms: Option<u32>,
) -> (u64, Option<(u64, RawAnswer)>, RawAnswer) {
    let daemon = fd_countable_daemon();
    let owner = daemon.client();
    let (gpu_buffer, adopted) = adopted_gpu_buffer(vgem, &owner);
    let token = adopted.export().expect("export");
    let mut reader = RawClient::connect(daemon.socket());
    if no_autofence {
        reader.hello_no_autofence();
    } else {
        reader.hello();
    }
    let shared = reader.import(token.to_string());

    let fence = gpu_buffer.attach_fence(true).expect("attach a write fence");
    let attached = Instant::now();
    let pid = daemon.pid();
    // Ended connections close on a thread of their own: wait for them.
    dmabroker_suite::proc::stable_fd_count(pid);
    limit_fds(pid, free_fds(pid, 1)[0]);
    let id = reader.send_request(RequestBody::Begin {
        buffer: shared,
        access: dmabroker_ipc::Access::CpuRead,
        timeout_ms: None,
    });
    let answer = reader.recv_reply();
    limit_fds(pid, 1024);
    assert_still_serving(&owner);
    signal(vgem, fence, attached);
    let again = reader.request(RequestBody::Begin {
        buffer: shared,
        access: dmabroker_ipc::Access::CpuRead,
        timeout_ms,
    });
    (id, answer, again)
}

/// The same for a no-autofence reader, whose grant carries the device's
/// fence (fence 0) for it to wait on: a daemon that cannot export that
/// fence (here out of fds; out of memory alike) sent the grant without it,
/// and the reader, told of nothing to wait for, read while the device
/// still wrote. Only a kernel without the export (`ENOTTY`) has nothing to
/// list; any other failure answers the begin `Busy`.
#[test]
fn kernel_tier_a_no_autofence_grant_whose_kernel_fence_cannot_be_exported_is_refused() {
    let Some(vgem) = vgem() else {
        return;
    };
    let (id, answer, again) = read_begun_with_no_fd_to_spare(&vgem, true, None);
    assert_eq!(
        answer.map(|(got, reply)| (got, reply.map(|_| ()))),
        Some((id, Err(dmabroker_ipc::ErrorCode::Busy))),
        "granted without the device's fence while the device still writes"
    );
    match again {
        Ok(ReplyBody::Granted(grant)) => assert!(grant.fences.is_empty(), "{grant:?}"),
        other => panic!("the read was not granted once the device was done: {other:?}"),
    }
}

/// A grant withdrawn for want of an fd (here: for the CPU read's cache
/// sync) gives back the news it carried: the writer died mid-write, so the
/// contents may be torn. It was lost with the withdrawn grant, and the
/// reader's next begin was granted as if the write had finished.
#[test]
fn kernel_tier_a_withdrawn_grant_keeps_the_lost_writer_news_for_the_next() {
    if !have_dma_heap() {
        return;
    }
    let daemon = fd_countable_daemon();
    let mut writer = RawClient::connect(daemon.socket());
    writer.hello();
    let buffer = match writer.request(RequestBody::Alloc {
        size: 4096,
        heap: Some("system".into()),
        name: None,
    }) {
        Ok(ReplyBody::Buffer(info)) => info.id,
        other => panic!("alloc: {other:?}"),
    };
    let mut reader = RawClient::connect(daemon.socket());
    reader.hello();
    let shared = reader.import(writer.export(buffer));
    match writer.request(RequestBody::Begin {
        buffer,
        access: dmabroker_ipc::Access::CpuWrite,
        timeout_ms: None,
    }) {
        Ok(ReplyBody::Granted(_)) => {}
        other => panic!("begin: {other:?}"),
    }
    let begin_read = RequestBody::Begin {
        buffer: shared,
        access: dmabroker_ipc::Access::CpuRead,
        timeout_ms: None,
    };
    let (id, bytes) = reader.encode(begin_read.clone(), 0);
    reader.send_raw(&bytes, &[]);
    // Queued behind the write; then the daemon runs out of fds and the
    // writer dies mid-write, which grants the read.
    let pid = daemon.pid();
    // Ended connections close on a thread of their own: wait for them.
    dmabroker_suite::proc::stable_fd_count(pid);
    limit_fds(pid, free_fds(pid, 1)[0]);
    drop(writer);
    let answer = reader.recv_reply().expect("an answer");
    limit_fds(pid, 1024);
    assert_eq!(answer, (id, Err(dmabroker_ipc::ErrorCode::Busy)));
    match reader.request(begin_read) {
        Ok(ReplyBody::Granted(grant)) => {
            assert!(
                grant.writer_lost,
                "the lost writer's news was lost: {grant:?}"
            )
        }
        other => panic!("the read was not granted: {other:?}"),
    }
}

/// Holding a brokered dma-buf's fd is not consent to share it: adopting
/// it is an import from its owner, and another user's client needs the
/// import rule's permission. Without it, it is refused and nothing changes.
#[test]
fn kernel_tier_adopting_another_users_brokered_dma_buf_needs_import_permission() {
    if !have_dma_heap() {
        return;
    }
    // The default rule: import_from "same-user".
    let daemon = Daemon::start_with(DaemonOptions {
        args: ["--dma-heap-dir", "/dev/dma_heap", "--socket-mode", "0666"]
            .map(String::from)
            .to_vec(),
        ..Default::default()
    });
    let camera = daemon.client();
    let frame = system_buffer(&camera, 4096, None);
    let baseline = daemon.baseline();
    let (mut stranger, fd) =
        Scripted::spawn_as_with_fd(daemon.socket(), 4242, 4242, frame.as_fd(), &[]);
    let refused = stranger
        .cmd(&format!("adopt-inherited {fd}"))
        .expect_err("another user adopting the camera's buffer");
    assert!(refused.starts_with("err permission-denied"), "{refused}");
    assert!(
        !refused.contains(&format!("buffer {}", frame.id())),
        "a client without permission is not told which buffer it is: {refused}"
    );
    // Still the camera's alone: its write is not held back by anyone.
    drop(
        frame
            .begin_timeout(Access::CpuWrite, Duration::from_secs(1))
            .expect("write"),
    );
    stranger.kill();
    daemon.assert_fds_back_to(baseline);
}

#[test]
fn kernel_tier_cpu_accesses_to_dma_heap_buffers_sync_caches() {
    if !have_dma_heap() {
        return;
    }
    let daemon = real_kernel_daemon();
    let mut client = Scripted::spawn(daemon.socket(), &[]);
    let dma = client.ok("alloc 4096 heap=system name=synced");
    let dma = field(&dma, "id").expect("id").to_owned();
    let memfd = client.ok("alloc 4096 heap=memfd name=plain");
    assert_eq!(field(&memfd, "heap"), Some("memfd"), "{memfd}");
    let memfd = field(&memfd, "id").expect("id").to_owned();

    for id in [&dma, &memfd] {
        let write = client.ok(&format!("begin {id} w"));
        let access = field(&write, "access").expect("access");
        client.ok(&format!("fill {access} 42"));
        client.ok(&format!("end {access}"));
        let read = client.ok(&format!("begin {id} r"));
        client.ok(&format!("end {}", field(&read, "access").expect("access")));
    }
    assert_eq!(
        field(&client.ok(&format!("read {dma}")), "byte"),
        Some("42")
    );
    // `read` ends its access without waiting; a round trip after it makes
    // sure the daemon has handled that end, and the END that end began
    // runs off the broker's thread: the log has it once it is done.
    client.ok("heaps");
    await_cache_end(&daemon, &dma, 3);

    // Each of the three CPU accesses to the dma-buf was bracketed by
    // DMA_BUF_IOCTL_SYNC; the memfd, which has no caches, got none.
    let log = daemon.log();
    let syncs = |id: &str, phase: &str| {
        log.matches(&format!("cache sync buffer={id} phase={phase}"))
            .count()
    };
    assert_eq!(
        syncs(&dma, "Start"),
        3,
        "cache sync START per CPU access; log:\n{log}"
    );
    assert_eq!(
        syncs(&dma, "End"),
        3,
        "cache sync END per CPU access; log:\n{log}"
    );
    assert_eq!(
        syncs(&memfd, "Start") + syncs(&memfd, "End"),
        0,
        "no cache sync on a memfd; log:\n{log}"
    );
}

#[test]
fn kernel_tier_an_autofence_reader_waits_for_a_device_write_fence_on_an_adopted_buffer() {
    let Some(vgem) = vgem() else {
        return;
    };
    let daemon = real_kernel_daemon();
    let owner = daemon.client();
    let (gpu_buffer, adopted) = adopted_gpu_buffer(&vgem, &owner);
    let token = adopted.export().expect("export");
    let mut reader = Scripted::spawn(daemon.socket(), &[]);
    let imported = reader.ok(&format!("import {token}"));
    assert_eq!(
        field(&imported, "inode"),
        Some(adopted.inode().to_string().as_str())
    );
    let id = field(&imported, "id").expect("id").to_owned();

    let fence = gpu_buffer.attach_fence(true).expect("attach a write fence");
    let attached = Instant::now();
    reader.send(&format!("begin {id} r"));
    assert_eq!(
        reader.recv(STILL_BLOCKED),
        None,
        "a CPU reader must wait while the device writes"
    );
    assert_still_serving(&owner);
    signal(&vgem, fence, attached);
    let granted = reader
        .recv(PROMPT)
        .expect("the read is granted once the device is done");
    assert!(granted.starts_with("ok"), "{granted}");
    reader.ok(&format!(
        "end {}",
        field(&granted, "access").expect("access")
    ));
}

/// A device writer dies mid-frame: the next grant must warn that the
/// contents may be torn (`writer_lost`). When that next grant was a read
/// held back by the device's fence, and its reader died before the fence
/// signalled, the warning went with the reader, who never heard it, and
/// the reader after was handed the torn frame without it.
#[test]
fn kernel_tier_a_lost_writer_is_told_past_a_reader_that_died_waiting_for_the_device() {
    let Some(vgem) = vgem() else {
        return;
    };
    let daemon = real_kernel_daemon();
    let owner = daemon.client();
    let (gpu_buffer, adopted) = adopted_gpu_buffer(&vgem, &owner);
    let token = adopted.export().expect("export");
    let (mut writer, writer_id) = importer(&daemon, &token, &[]);
    writer.ok(&format!("begin {writer_id} dw"));
    let writer_pid = writer.pid();
    writer.kill();
    await_disconnect(&daemon, writer_pid);

    let (mut reader, reader_id) = importer(&daemon, &token, &[]);
    let fence = gpu_buffer.attach_fence(true).expect("attach a write fence");
    let attached = Instant::now();
    reader.send(&format!("begin {reader_id} r"));
    // Granted by the broker, with the news, and held back for the fence:
    // the case at hand (a read queued behind the writer would leave the
    // news on the buffer whatever became of it).
    let held_back = format!(
        "grant held back for the dma-buf's kernel fences buffer={} ",
        adopted.id()
    );
    await_log(&daemon, &held_back, PROMPT);
    assert!(
        daemon
            .log()
            .lines()
            .any(|line| line.contains(&held_back) && line.contains("writer_lost=true")),
        "the held-back read did not take the news; log:\n{}",
        daemon.log_tail()
    );
    assert_eq!(
        reader.recv(Duration::from_millis(500)),
        None,
        "the read is held back by the device's fence"
    );
    let reader_pid = reader.pid();
    reader.kill();
    await_disconnect(&daemon, reader_pid);
    signal(&vgem, fence, attached);

    let read = adopted
        .begin_timeout(Access::CpuRead, PROMPT)
        .expect("the owner's read");
    assert!(
        read.writer_lost(),
        "the reader after the one that died was not told the writer was lost; log:\n{}",
        daemon.log_tail()
    );
}

/// Waits until the daemon has logged the disconnect of the client in
/// process `pid`.
fn await_disconnect(daemon: &Daemon, pid: u32) {
    let pid = format!(" pid={pid} ");
    await_log_line(
        daemon,
        &format!("client disconnected ...{pid}"),
        PROMPT,
        |line| line.contains("client disconnected") && line.contains(&pid),
    );
}

#[test]
fn kernel_tier_a_no_autofence_reader_gets_the_device_write_fence_as_a_sync_file() {
    let Some(vgem) = vgem() else {
        return;
    };
    let daemon = real_kernel_daemon();
    let owner = daemon.client();
    let (gpu_buffer, adopted) = adopted_gpu_buffer(&vgem, &owner);
    let token = adopted.export().expect("export");
    let (mut reader, id) = importer(&daemon, &token, &["--no-autofence"]);

    let fence = gpu_buffer.attach_fence(true).expect("attach a write fence");
    let attached = Instant::now();
    // No-autofence: granted at once, with the kernel's fence to wait for.
    let granted = reader.ok(&format!("begin {id} r"));
    assert_eq!(
        field(&granted, "fence_list"),
        Some("0:0:device-write:true"),
        "the dma-buf's own fences come as fence 0 of holder 0 with a sync_file: {granted}"
    );
    let access = field(&granted, "access").expect("access").to_owned();
    let states = reader.ok(&format!("fences {access}"));
    assert_eq!(
        field(&states, "sync_files"),
        Some("0:0:pending"),
        "{states}"
    );

    signal(&vgem, fence, attached);
    let states = reader.ok(&format!("fences {access}"));
    assert_eq!(
        field(&states, "sync_files"),
        Some("0:0:signalled"),
        "{states}"
    );
    reader.ok(&format!("end {access}"));

    // With the device done, a new grant has nothing to wait for.
    let granted = reader.ok(&format!("begin {id} r"));
    assert_eq!(field(&granted, "fences"), Some("0"), "{granted}");
}

/// A kprobe on the dma-buf ioctl, traced in an instance of its own for one
/// thread: what shows that a cache sync START and END were issued, and
/// with which flags (a START that waits also shows as the thread blocked
/// in the ioctl, see [`blocked_in_cache_sync`]). Root only, with the
/// kernel's kprobe events (x86-64 registers: the request is the second
/// argument, the user's `struct dma_buf_sync` the third).
struct SyncTrace {
    tracefs: std::path::PathBuf,
    group: String,
    instance: std::path::PathBuf,
}

impl SyncTrace {
    fn of_thread(tid: i32) -> SyncTrace {
        let tracefs = Path::new("/sys/kernel/tracing").to_owned();
        if !tracefs.join("instances").exists() {
            let mounted = std::process::Command::new("mount")
                .args(["-t", "tracefs", "nodev"])
                .arg(&tracefs)
                .status()
                .expect("running mount");
            assert!(mounted.success(), "cannot mount tracefs: {mounted}");
        }
        let group = format!("dmabroker_{}", std::process::id());
        let instance = tracefs.join(format!("instances/{group}"));
        let trace = SyncTrace {
            tracefs,
            group,
            instance,
        };
        std::fs::create_dir(&trace.instance).expect("a trace instance");
        trace.append(
            "kprobe_events",
            &format!(
                "p:{}/ioctl dma_buf_ioctl cmd=%si:x32 flags=+u0(%dx):u64",
                trace.group
            ),
        );
        let event = trace.instance.join(format!("events/{}/ioctl", trace.group));
        std::fs::write(event.join("filter"), format!("common_pid == {tid}")).expect("filter");
        std::fs::write(event.join("enable"), "1").expect("enable the kprobe");
        trace
    }

    fn append(&self, file: &str, line: &str) {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(self.tracefs.join(file))
            .unwrap_or_else(|err| panic!("opening {file}: {err}"));
        writeln!(f, "{line}").unwrap_or_else(|err| panic!("writing {line:?} to {file}: {err}"));
    }

    /// How many `DMA_BUF_IOCTL_SYNC` calls with `flags` the thread made.
    fn syncs(&self, flags: u64) -> usize {
        let trace =
            std::fs::read_to_string(self.instance.join("trace")).expect("reading the trace");
        let wanted = format!("cmd=0x40086200 flags={flags}");
        trace
            .lines()
            .filter(|line| !line.starts_with('#') && line.trim_end().ends_with(&wanted))
            .count()
    }
}

impl Drop for SyncTrace {
    fn drop(&mut self) {
        let event = self.instance.join(format!("events/{}/ioctl", self.group));
        let _ = std::fs::write(event.join("enable"), "0");
        let _ = std::fs::remove_dir(&self.instance);
        let _ = std::fs::OpenOptions::new()
            .append(true)
            .open(self.tracefs.join("kprobe_events"))
            .and_then(|mut f| {
                use std::io::Write;
                writeln!(f, "-:{}/ioctl", self.group)
            });
    }
}

/// Whether thread `tid` of this process is blocked in
/// `ioctl(_, DMA_BUF_IOCTL_SYNC, _)` now (`/proc/.../syscall`: the
/// system call's number and arguments while it sleeps in one).
fn blocked_in_cache_sync(tid: i32) -> bool {
    let syscall =
        std::fs::read_to_string(format!("/proc/self/task/{tid}/syscall")).unwrap_or_default();
    let fields: Vec<&str> = syscall.split_whitespace().collect();
    fields.first() == Some(&libc::SYS_ioctl.to_string().as_str())
        && fields.get(2) == Some(&format!("{:#x}", 0x4008_6200_u32).as_str())
}

/// A no-autofence client is never blocked at its begin, and the broker
/// does no cache sync for it (its START would block the grant on the
/// device); the CPU's caches must be synced all the same, or a CPU on a
/// non-coherent machine reads stale lines. The client crate issues
/// `DMA_BUF_IOCTL_SYNC` START at the access's first `bytes()`, where the
/// kernel also waits for the device's write, and END at its end. Before,
/// nobody issued either: `bytes()` returned at once while the device still
/// wrote. Here the read is granted at once, listing the device's fence,
/// and `bytes()` is seen blocked in the START until the fence is
/// signalled, then returns; a kprobe on the ioctl counts one START and one
/// END of a read on the reading thread.
#[test]
fn kernel_tier_a_no_autofence_cpu_read_syncs_the_cache_itself_where_it_touches_the_bytes() {
    let Some(vgem) = vgem() else {
        return;
    };
    let daemon = real_kernel_daemon();
    let owner = daemon.client();
    let (gpu_buffer, adopted) = adopted_gpu_buffer(&vgem, &owner);
    let token = adopted.export().expect("export");
    let reader = daemon
        .client_with(dmabroker_client::ClientOptions {
            autofence: Some(false),
            ..Default::default()
        })
        .expect("a no-autofence client");
    let shared = reader.import(&token).expect("import");

    let fence = gpu_buffer.attach_fence(true).expect("attach a write fence");
    let attached = Instant::now();
    let read = shared
        .begin_timeout(Access::CpuRead, PROMPT)
        .expect("a no-autofence read is granted at once");
    let listed: Vec<(u64, u64, bool)> = read
        .fences()
        .iter()
        .map(|f| (f.id, f.holder, f.sync_file.is_some()))
        .collect();
    assert_eq!(
        listed,
        [(0, 0, true)],
        "the grant lists the dma-buf's own fence"
    );

    let signalled = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let returned = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let looker = {
        let (signalled, returned) = (signalled.clone(), returned.clone());
        std::thread::spawn(move || {
            tid_tx.send(nix::unistd::gettid().as_raw()).expect("tid");
            go_rx.recv().expect("go");
            let first = read.bytes().expect("bytes").first().copied();
            let after_signal = signalled.load(std::sync::atomic::Ordering::SeqCst);
            returned.store(true, std::sync::atomic::Ordering::SeqCst);
            read.end().expect("end");
            (first, after_signal)
        })
    };
    let tid = tid_rx.recv().expect("the thread's id");
    let trace = SyncTrace::of_thread(tid);
    go_tx.send(()).expect("go");
    let deadline = Instant::now() + PROMPT;
    while !blocked_in_cache_sync(tid) {
        assert!(
            !returned.load(std::sync::atomic::Ordering::SeqCst),
            "bytes() returned while the device still wrote (no cache sync START)"
        );
        assert!(
            Instant::now() < deadline,
            "bytes() never reached the cache sync START"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    signalled.store(true, std::sync::atomic::Ordering::SeqCst);
    signal(&vgem, fence, attached);
    let (first, after_signal) = looker.join().expect("the reading thread");
    assert!(first.is_some());
    assert!(
        after_signal,
        "bytes() returned before the fence was signalled"
    );
    // DMA_BUF_SYNC_READ, with START (0) and with END (4).
    assert_eq!(
        [trace.syncs(1), trace.syncs(1 | 4)],
        [1, 1],
        "one cache sync START and one END of a read on the reading thread"
    );
}

/// A no-autofence grant can list an access whose own grant is still held
/// back by the dma-buf's kernel fences. That access got its end word only
/// when the device finished, unwatched since nobody was queued, so its
/// holder ended it without a message and the no-autofence client's
/// `FenceSignalled` never came: it waited for that fence forever.
#[test]
fn kernel_tier_a_no_autofence_client_hears_the_end_of_a_grant_that_waited_for_the_device() {
    let Some(vgem) = vgem() else {
        return;
    };
    let daemon = real_kernel_daemon();
    let owner = daemon.client();
    let (gpu_buffer, adopted) = adopted_gpu_buffer(&vgem, &owner);
    let token = adopted.export().expect("export");
    let (mut writer, writer_id) = importer(&daemon, &token, &[]);
    let (mut reader, reader_id) = importer(&daemon, &token, &["--no-autofence"]);

    let fence = gpu_buffer.attach_fence(true).expect("attach a write fence");
    let attached = Instant::now();
    // Decided at once, held back until the device's write is done.
    writer.send(&format!("begin {writer_id} dw"));
    // Once the broker has decided the writer's begin, a reader's grant
    // lists it (beside the dma-buf's own fence 0:0).
    let deadline = Instant::now() + Duration::from_secs(5);
    let writer_access = loop {
        let listed = reader.ok(&format!("begin {reader_id} dr"));
        let fence_list = field(&listed, "fence_list").unwrap_or("").to_owned();
        let listed_writer = fence_list
            .split(',')
            .find(|f| !f.is_empty() && !f.starts_with("0:0:"))
            .and_then(|f| f.split(':').next())
            .map(str::to_owned);
        if let Some(access) = listed_writer {
            break access;
        }
        reader.ok(&format!(
            "end {}",
            field(&listed, "access").expect("access")
        ));
        assert!(
            Instant::now() < deadline,
            "the writer's begin never reached the broker"
        );
        std::thread::sleep(Duration::from_millis(20));
    };

    signal(&vgem, fence, attached);
    let granted = writer
        .recv(Duration::from_secs(5))
        .expect("the writer is granted once the device is done");
    let access = field(&granted, "access").expect("access").to_owned();
    assert_eq!(access, writer_access, "{granted}");
    writer.ok(&format!("end {access}"));

    let event = reader
        .cmd("event 3000")
        .expect("the reader hears that the writer's access ended");
    assert!(
        event.contains("FenceSignalled") && event.contains(&writer_access),
        "{event}"
    );
}

#[test]
fn kernel_tier_a_device_write_ended_with_a_sync_file_fences_the_buffer_until_it_signals() {
    if !have_dma_heap() {
        return;
    }
    let Some(vgem) = vgem() else {
        return;
    };
    let daemon = real_kernel_daemon();
    let producer = daemon.client();
    let frame = system_buffer(&producer, 8192, Some("frame"));
    let token = frame.export().expect("export");
    let (mut reader, id) = importer(&daemon, &token, &[]);

    // The "hardware" renders into the frame; its completion fence comes
    // from another device's buffer, as a GPU's out-fence would.
    let render = frame.begin(Access::DeviceWrite).expect("device write");
    let gpu_buffer = vgem.create_buffer(4096).expect("vgem buffer");
    let fence = gpu_buffer.attach_fence(true).expect("attach a write fence");
    let attached = Instant::now();
    let done =
        dma_buf::export_sync_file(gpu_buffer.dmabuf(), false).expect("export the GPU's fence");
    assert_eq!(
        sync_file::status(done.as_fd()).expect("status"),
        sync_file::SyncFileStatus::Pending
    );
    render
        .end_with_fence(done)
        .expect("end the device write with its fence");

    // Implicitly synced users of the dma-buf (any process) see the fence...
    let exported = reader.ok(&format!("export-sync-file {id} r"));
    assert_eq!(field(&exported, "state"), Some("pending"), "{exported}");
    // ...and the broker holds CPU readers until it signals.
    reader.send(&format!("begin {id} r"));
    assert_eq!(
        reader.recv(STILL_BLOCKED),
        None,
        "a reader must wait for the device write's fence"
    );
    assert_still_serving(&producer);
    signal(&vgem, fence, attached);
    let granted = reader
        .recv(PROMPT)
        .expect("the read is granted once the fence signals");
    assert!(granted.starts_with("ok"), "{granted}");
    let exported = reader.ok(&format!("export-sync-file {id} r"));
    assert_eq!(field(&exported, "state"), Some("signalled"), "{exported}");
    reader.ok(&format!(
        "end {}",
        field(&granted, "access").expect("access")
    ));
}

/// A message carries at most `MAX_FDS_PER_MESSAGE` fds. A no-autofence
/// grant whose accesses' completion fences already fill them must still
/// hand over the dma-buf's own fence (the one a writer needs most), not
/// grow past the cap: the broker refused to send such a grant and dropped
/// the client's connection.
#[test]
fn kernel_tier_a_no_autofence_grant_keeps_a_slot_for_the_dma_bufs_own_fence() {
    let Some(vgem) = vgem() else {
        return;
    };
    let daemon = real_kernel_daemon();
    let owner = daemon.client();
    // Kept: the device buffer lives as long as the test.
    let (_frame_device, frame) = adopted_gpu_buffer(&vgem, &owner);
    let token = frame.export().expect("export");
    let (mut writer, id) = importer(&daemon, &token, &["--no-autofence"]);

    // As many device reads as a message has fd slots, each handed over
    // with the pending completion fence of another device's work.
    let gpu = vgem.create_buffer(4096).expect("vgem buffer");
    let gpu_fence = gpu.attach_fence(true).expect("attach a write fence");
    let attached = Instant::now();
    let reads = dmabroker_ipc::MAX_FDS_PER_MESSAGE;
    for _ in 0..reads {
        let read = frame.begin(Access::DeviceRead).expect("device read");
        let done = dma_buf::export_sync_file(gpu.dmabuf(), false).expect("export the GPU's fence");
        read.end_with_fence(done)
            .expect("end the read with its fence");
    }

    let granted = writer.ok(&format!("begin {id} w"));
    let listed: Vec<&str> = field(&granted, "fence_list")
        .expect("fence list")
        .split(',')
        .collect();
    assert_eq!(
        listed.len(),
        reads + 1,
        "every read and the dma-buf's own fence: {granted}"
    );
    assert!(
        listed.contains(&"0:0:device-write:true"),
        "the dma-buf's own fence comes with its sync_file: {granted}"
    );
    assert_eq!(
        listed.iter().filter(|f| f.ends_with(":true")).count(),
        reads,
        "as many sync_files as fit in one message: {granted}"
    );
    assert_still_serving(&owner);

    signal(&vgem, gpu_fence, attached);
    writer.ok(&format!(
        "end {}",
        field(&granted, "access").expect("access")
    ));
}

/// An autofence begin on a dma-buf whose device is still busy waits for
/// the kernel's fences with a dup of the buffer's fd. A begin that gives up
/// (its timeout) must give that fd back at once, not when the device
/// finishes: a client could otherwise pile up the broker's fds by retrying.
#[test]
fn kernel_tier_a_begin_that_times_out_on_kernel_fences_keeps_no_fd() {
    let Some(vgem) = vgem() else {
        return;
    };
    let daemon = real_kernel_daemon();
    let owner = daemon.client();
    let (gpu_buffer, adopted) = adopted_gpu_buffer(&vgem, &owner);
    let fence = gpu_buffer.attach_fence(true).expect("attach a write fence");
    let attached = Instant::now();
    let baseline = daemon.baseline();
    for _ in 0..10 {
        match adopted.begin_timeout(Access::CpuRead, Duration::from_millis(100)) {
            Err(err) => assert_eq!(err.code(), Some(dmabroker_ipc::ErrorCode::Timeout), "{err}"),
            Ok(_) => panic!("a read must wait for the device's write"),
        }
    }
    // Back while the device is still busy: vgem ends the fence by itself
    // 10 s after the attach, and fds given back only then would be a leak
    // this test is for.
    let before_vgem_gives_up = Duration::from_secs(8).saturating_sub(attached.elapsed());
    let now = dmabroker_suite::proc::wait_fd_count(daemon.pid(), baseline, before_vgem_gives_up);
    assert_eq!(
        now,
        baseline,
        "the timed-out begins kept the daemon's fds while the device was busy ({:?} since the attach)",
        attached.elapsed()
    );
    signal(&vgem, fence, attached);
}

/// Freeing a buffer answers the client's own begins still waiting on it.
/// A begin already granted but held back by the dma-buf's kernel fences
/// was dropped silently, and its request never got an answer.
#[test]
fn kernel_tier_freeing_a_buffer_answers_a_begin_waiting_for_its_kernel_fences() {
    let Some(vgem) = vgem() else {
        return;
    };
    let daemon = real_kernel_daemon();
    let owner = daemon.client();
    let (gpu_buffer, adopted) = adopted_gpu_buffer(&vgem, &owner);
    let token = adopted.export().expect("export").to_string();
    let mut raw = RawClient::connect(daemon.socket());
    raw.hello();
    let buffer = match raw.request(RequestBody::Import { token }) {
        Ok(ReplyBody::Buffer(info)) => info.id,
        other => panic!("import: {other:?}"),
    };
    let fence = gpu_buffer.attach_fence(true).expect("attach a write fence");
    let attached = Instant::now();
    a_free_answers_the_waiting_read(&mut raw, buffer, "the begin is answered");
    signal(&vgem, fence, attached);
}

/// The cache sync that begins a CPU access waits in the kernel for the
/// dma-buf's fences, and a device can add one after the broker last
/// looked. That wait must hold back only this grant: the broker issued it
/// on its one thread with its state locked, and served nobody until the
/// device finished.
#[test]
fn kernel_tier_a_fence_added_just_before_the_cache_sync_holds_back_only_that_grant() {
    let Some(vgem) = vgem() else {
        return;
    };
    let daemon = real_kernel_daemon();
    let owner = daemon.client();
    let (gpu_buffer, adopted) = adopted_gpu_buffer(&vgem, &owner);
    let token = adopted.export().expect("export");
    let (mut reader, id) = importer(&daemon, &token, &[]);
    let first = gpu_buffer.attach_fence(true).expect("attach a write fence");
    let attached = Instant::now();
    reader.send(&format!("begin {id} r"));
    assert_eq!(
        reader.recv(STILL_BLOCKED),
        None,
        "a reader waits for the device's write"
    );
    // The device finishes, and at once starts writing again: the broker
    // sees the first fence signal and begins the read's cache sync, which
    // then waits for the second.
    signal(&vgem, first, attached);
    let second = gpu_buffer
        .attach_fence(true)
        .expect("attach the next write");
    let attached = Instant::now();
    assert_still_serving(&owner);
    signal(&vgem, second, attached);
    let granted = reader
        .recv(PROMPT)
        .expect("the read is granted once the device is done");
    assert!(granted.starts_with("ok"), "{granted}");
    reader.ok(&format!(
        "end {}",
        field(&granted, "access").expect("access")
    ));
}

/// How much longer the slow-END tests make every cache sync END take
/// (`DMABROKER_TEST_CACHE_END_DELAY_MS`): far longer than a few round
/// trips in the emulated guest, so that what happens while an END runs is
/// told by the order of events, not by timing them.
const SLOW_END: Duration = Duration::from_secs(3);

/// A daemon on the real dma-heaps whose cache sync ENDs take [`SLOW_END`]
/// longer, as a big frame's cache clean does on a SoC whose devices do not
/// snoop the CPU's caches. No D-Bus, so that its fds can be counted.
fn slow_end_daemon() -> Daemon {
    slow_sync_daemon("DMABROKER_TEST_CACHE_END_DELAY_MS", SLOW_END)
}

/// A daemon on the real dma-heaps whose cache syncs of one phase take `by`
/// longer (the test hook `variable`). No D-Bus, so that its fds can be
/// counted.
fn slow_sync_daemon(variable: &str, by: Duration) -> Daemon {
    Daemon::start_with(DaemonOptions {
        args: ["--dma-heap-dir", "/dev/dma_heap", "--dbus", "none"]
            .map(String::from)
            .to_vec(),
        env: vec![(variable.into(), by.as_millis().to_string())],
        ..Default::default()
    })
}

/// The daemon's log line for a cache sync of `buffer` in `phase`.
fn cache_sync_line(buffer: &str, phase: &str) -> String {
    format!("cache sync buffer={buffer} phase={phase}")
}

/// Waits (up to `limit`) for the daemon to log `line`.
fn await_log(daemon: &Daemon, line: &str, limit: Duration) {
    await_log_line(daemon, line, limit, |logged| logged.contains(line));
}

/// Waits (up to `limit`) for a line of the daemon's log that `matches`;
/// `what` names it if none comes.
fn await_log_line(daemon: &Daemon, what: &str, limit: Duration, matches: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + limit;
    while !daemon.log().lines().any(&matches) {
        assert!(
            Instant::now() < deadline,
            "no '{what}' in the daemon's log:\n{}",
            daemon.log_tail()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits (up to [`SLOW_END`] and a prompt more) for the daemon to log the
/// `count`-th cache sync END of `buffer`.
fn await_cache_end(daemon: &Daemon, buffer: &str, count: usize) {
    let deadline = Instant::now() + SLOW_END + PROMPT;
    let line = cache_sync_line(buffer, "End");
    while daemon.log().matches(&line).count() < count {
        assert!(
            Instant::now() < deadline,
            "fewer than {count} cache sync ENDs of buffer {buffer}; log:\n{}",
            daemon.log_tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The cache sync that ends a CPU access is, on a SoC whose devices do not
/// snoop the CPU's caches, a cache clean as long as the buffer
/// (milliseconds for a 4K frame). Issued on the broker's one thread, it
/// held up every client. It must hold back only the next grant of its own
/// buffer: the writer's next request and another client's allocation are
/// answered while it runs, and the reader waiting for the buffer is
/// granted only once it is done (a device must not read lines still dirty
/// in the CPU's caches, and the reader's START comes after the END).
#[test]
fn kernel_tier_a_slow_cache_end_holds_back_only_its_buffers_next_grant() {
    if !have_dma_heap() {
        return;
    }
    let daemon = slow_end_daemon();
    let writer = daemon.client();
    let other = daemon.client();
    let frame = system_buffer(&writer, 65536, Some("slow-end"));
    let id = frame.id().to_string();
    let token = frame.export().expect("export");
    let (mut reader, reader_id) = importer(&daemon, &token, &[]);
    let mut write = frame.begin(Access::CpuWrite).expect("write");
    write.bytes_mut().expect("map").fill(0x5a);
    reader.send(&format!("begin {reader_id} r"));
    assert_eq!(
        reader.recv(Duration::from_secs(1)),
        None,
        "the reader waits for the writer"
    );
    drop(write);
    // Handled after the write's `End` on the same connection, so after its
    // END began.
    writer.heaps().expect("the writer's next request");
    other.alloc(4096).expect("another client's allocation");
    let log = daemon.log();
    assert_eq!(
        log.matches(&cache_sync_line(&id, "End")).count(),
        0,
        "both requests must be answered while the END runs, not after it; log:\n{log}"
    );
    let granted = reader
        .recv(SLOW_END + PROMPT)
        .expect("the reader is granted once the END is done");
    assert!(granted.starts_with("ok"), "{granted}");
    let log = daemon.log();
    let end = log
        .find(&cache_sync_line(&id, "End"))
        .unwrap_or_else(|| panic!("the reader was granted before the END was done; log:\n{log}"));
    let read_start = log
        .rfind(&cache_sync_line(&id, "Start"))
        .expect("the read's START");
    assert!(
        end < read_start,
        "the read's START must follow the write's END; log:\n{log}"
    );
    assert_eq!(
        field(&reader.ok(&format!("read {reader_id}")), "byte"),
        Some("90"),
        "the reader sees the write"
    );
    reader.ok(&format!(
        "end {}",
        field(&granted, "access").expect("access")
    ));
}

/// How much longer the slow-START test makes every cache sync START take
/// (`DMABROKER_TEST_CACHE_START_DELAY_MS`), as a START waiting in the
/// kernel for a device's fence does: long enough for a client to die in
/// it, in the emulated guest too.
const SLOW_START: Duration = Duration::from_secs(3);

/// A CPU access whose client dies while its cache sync START runs still
/// owes the buffer the END of that START: the START cannot be stopped,
/// and a device must not be given the buffer while the CPU's caches are
/// being brought in, nor before they are cleaned again. So the next grant
/// (here a device write, which has no START of its own to wait behind)
/// goes out only after the dead reader's START has returned and its END
/// is done, told by the order of the daemon's log lines, not by timing.
#[test]
fn kernel_tier_a_reader_killed_during_its_cache_start_holds_back_the_next_grant_until_its_end() {
    if !have_dma_heap() {
        return;
    }
    let daemon = slow_sync_daemon("DMABROKER_TEST_CACHE_START_DELAY_MS", SLOW_START);
    let owner = daemon.client();
    let frame = system_buffer(&owner, 65536, Some("slow-start"));
    let id = frame.id().to_string();
    let token = frame.export().expect("export");
    let (mut reader, reader_id) = importer(&daemon, &token, &[]);
    reader.send(&format!("begin {reader_id} r"));
    let sent_off = format!("cache sync START sent off buffer={id} ");
    await_log(&daemon, &sent_off, PROMPT);
    reader.kill();
    let write = frame
        .begin_timeout(Access::DeviceWrite, SLOW_START + PROMPT)
        .expect("the device write, once the dead reader's cache syncs are done");
    let log = daemon.log();
    let start = log.find(&cache_sync_line(&id, "Start")).unwrap_or_else(|| {
        panic!("the device write was granted while the dead reader's START still ran; log:\n{log}")
    });
    assert!(
        log[start..].contains(&cache_sync_line(&id, "End")),
        "the device write was granted before the END the dead reader's START owed; log:\n{log}"
    );
    // And the case at hand was the one tested: the hang-up was handled
    // while the START ran, not after it returned with a grant to the dead.
    assert!(
        log.contains(&format!(
            "cache sync START returned for an access that went; its END is owed buffer={id} "
        )),
        "the reader's hang-up was not handled while its START ran; log:\n{log}"
    );
    drop(write);
    owner.heaps().expect("the owner is served after the write");
}

/// A buffer whose holders go while the cache sync ending its last write
/// still runs: a begin held back behind that END is answered when its
/// client frees the buffer, the writer dies, and once the END is done on
/// its own copy of the buffer's fd the daemon holds nothing of it.
#[test]
fn kernel_tier_a_buffer_freed_while_its_cache_end_runs_leaves_nothing_behind() {
    if !have_dma_heap() {
        return;
    }
    let daemon = slow_end_daemon();
    let baseline = daemon.baseline();
    let mut writer = Scripted::spawn(daemon.socket(), &[]);
    let id = field(&writer.ok("alloc 65536 heap=system name=freed"), "id")
        .expect("id")
        .to_owned();
    let token = field(&writer.ok(&format!("export {id}")), "token")
        .expect("token")
        .to_owned();
    let mut reader = RawClient::connect(daemon.socket());
    reader.hello();
    let theirs = match reader.request(RequestBody::Import { token }) {
        Ok(ReplyBody::Buffer(info)) => info.id,
        other => panic!("import: {other:?}"),
    };
    let write = writer.ok(&format!("begin {id} w"));
    writer.ok(&format!("end {}", field(&write, "access").expect("access")));
    // The `End` is handled before this: the END runs now.
    writer.ok("heaps");
    a_free_answers_the_waiting_read(
        &mut reader,
        theirs,
        "the begin, held back behind the END, is answered by the free",
    );
    // The last holder goes while the END still runs.
    writer.kill();
    drop(reader);
    await_cache_end(&daemon, &id, 1);
    let log = daemon.log();
    let freed = log
        .find(&format!("buffer freed buffer={id} "))
        .unwrap_or_else(|| panic!("buffer {id} not freed; log:\n{log}"));
    assert!(
        freed < log.find(&cache_sync_line(&id, "End")).unwrap_or(0),
        "the buffer must be freed while its END runs; log:\n{log}"
    );
    assert_still_serving(&daemon.client());
    daemon.assert_fds_back_to(baseline);
}

/// A no-autofence client that begins and cancels again and again while a
/// cache sync END of the buffer runs: each grant, held back behind the
/// END, carries a sync_file of the dma-buf's pending device fence, which
/// the daemon exported for it. The cancels must let go of them at once;
/// kept with the parked grants until the END returned, they grew the
/// daemon's fds at the rate of the loop.
#[test]
fn kernel_tier_begins_cancelled_during_a_slow_cache_end_keep_no_fds() {
    const ROUNDS: usize = 16;
    let Some(vgem) = vgem() else {
        return;
    };
    let daemon = slow_end_daemon();
    let owner = daemon.client();
    let (gpu_buffer, adopted) = adopted_gpu_buffer(&vgem, &owner);
    let id = adopted.id().to_string();
    let token = adopted.export().expect("export");
    let mut reader = RawClient::connect(daemon.socket());
    reader.hello_no_autofence_with(
        dmabroker_ipc::features::FENCE_EVENTS
            | dmabroker_ipc::features::SYNC_FILES
            | dmabroker_ipc::features::CANCEL,
    );
    let theirs = reader.import(token.to_string());
    let write = adopted.begin(Access::CpuWrite).expect("write");
    drop(write);
    // Handled after the write's `End`: its END runs now.
    owner.heaps().expect("the owner's next request");
    let fence = gpu_buffer.attach_fence(true).expect("attach a write fence");
    let attached = Instant::now();
    let baseline = daemon.fd_count();
    for _ in 0..ROUNDS {
        let begin = reader.send_request(RequestBody::Begin {
            buffer: theirs,
            access: Access::CpuRead,
            timeout_ms: None,
        });
        let cancel = reader.send_request(RequestBody::Cancel { request: begin });
        let answers = reader.replies(2);
        assert_eq!(
            answers.get(&begin).and_then(|r| r.as_ref().err()),
            Some(&dmabroker_ipc::ErrorCode::Cancelled),
            "the begin, held back behind the END, is cancelled: {answers:?}"
        );
        assert!(
            answers.get(&cancel).is_some_and(|r| r.is_ok()),
            "{answers:?}"
        );
    }
    let end_line = cache_sync_line(&id, "End");
    let ended = || daemon.log().contains(&end_line);
    assert!(
        !ended(),
        "the END must still run after the loop for this to tell anything; log:\n{}",
        daemon.log_tail()
    );
    // The exported sync_files are let go of on a closing thread: soon, and
    // before the END returns (read in that order: fds, then the END).
    let deadline = Instant::now() + SLOW_END + PROMPT;
    let mut most = 0;
    let (held, ended_then) = loop {
        let held = daemon.fd_count().saturating_sub(baseline);
        let ended_then = ended();
        most = most.max(held);
        if held <= 2 || ended_then || Instant::now() >= deadline {
            break (held, ended_then);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        held <= 2 && !ended_then,
        "up to {most} fds more than before {ROUNDS} cancelled begins, {held} left when the END had returned: {ended_then}"
    );
    signal(&vgem, fence, attached);
    await_cache_end(&daemon, &id, 1);
    assert_still_serving(&owner);
}

/// A `begin_async` given up on while its read is held back for a device's
/// write fence (the broker waits for the dma-buf's implicit fences before
/// it grants): the cancel withdraws the held-back grant. The runtime shuts
/// down while the device still writes, nobody is granted the abandoned
/// read when the device finishes, and a writer gets in at once.
#[test]
fn kernel_tier_a_cancelled_begin_held_back_for_a_device_fence_leaves_nothing_behind() {
    let Some(vgem) = vgem() else {
        return;
    };
    let daemon = real_kernel_daemon();
    let owner = daemon.client();
    let (gpu_buffer, adopted) = adopted_gpu_buffer(&vgem, &owner);
    let token = adopted.export().expect("export");
    let reader = daemon.client();
    let theirs = reader.import(&token).expect("import");
    let fence = gpu_buffer.attach_fence(true).expect("attach a write fence");
    let attached = Instant::now();

    let runtime = abandon::runtime();
    // Granted while the device writes, it would fail here.
    abandon::give_up_on(
        &runtime,
        Duration::from_millis(300),
        theirs.begin_async(Access::CpuRead, None),
    );
    // Dropping the runtime waits for its blocking threads: the abandoned
    // begin's must return now, not when the device is done.
    abandon::assert_shuts_down_promptly(runtime);
    assert_still_serving(&owner);
    signal(&vgem, fence, attached);
    let write = adopted
        .begin_timeout(Access::CpuWrite, Duration::from_secs(3))
        .expect("a write once the device is done: the abandoned read holds nothing");
    drop(write);
    drop(theirs);
}

/// The last release of a dma-buf takes the lock of every epoll watching
/// it, and a client can hold such a lock for good (`HeldEpoll`). A client
/// that watches its buffer that way, then frees it, leaves the daemon the
/// last copy: let go of on the broker's thread, it stalled every client.
/// The daemon lets go of a dma-buf on a thread of the uid it was allocated
/// for. Found by review.
#[test]
fn kernel_tier_a_freed_dma_buf_whose_release_waits_does_not_stall_the_daemon() {
    if !have_dma_heap() {
        return;
    }
    let Some(mut fuse) = stalling_fuse("a freed dma-buf whose release waits") else {
        return;
    };
    let daemon = real_kernel_daemon();
    let client = daemon.client();
    let buffer = system_buffer(&client, 8192, Some("watched"));
    let held = HeldEpoll::new(&mut fuse, buffer.as_fd());
    // This process's fd closes and the buffer is freed: the daemon's fd is
    // the last.
    drop(buffer);
    let served = new_client_served(&daemon);
    held.let_go(fuse);
    assert!(served, "another client was not served");
    assert_still_serving(&client);
}

/// A dma-buf one user shared with another was let go of on the closing
/// thread of the user it was allocated for, and the importer, watching it
/// with an epoll it holds locked, stalled that user's every close: Alice's
/// next freed buffer stayed open in the daemon, and after 64 such her
/// connections were read no further. A file sent to other users is let go
/// of on a thread of all of them now, and Alice's own closes go on. Found
/// by review.
#[test]
fn kernel_tier_a_shared_dma_buf_whose_release_waits_holds_up_none_of_its_owners_own_closes() {
    const ALICE: u32 = 65501;
    if !have_dma_heap() {
        return;
    }
    let daemon = daemon_for_two_users(&format!(
        "[[rule]]\nname = \"root-imports\"\nuser = 0\nimport_from = {{ users = [{ALICE}] }}\n"
    ));
    // After the daemon, so dropped before it should the test fail: the
    // daemon's exit would wait on the held epoll.
    let Some(mut fuse) = stalling_fuse("a shared dma-buf whose release waits") else {
        return;
    };
    let mut alice = Scripted::spawn_as(daemon.socket(), ALICE, ALICE, &[]);
    let allocated = alice.ok("alloc 8192 heap=system name=shared");
    let shared = field(&allocated, "id").expect("id").to_owned();
    let token = field(&alice.ok(&format!("export {shared}")), "token")
        .expect("token")
        .to_owned();
    // The importer (this process, another user) watches it, closes its
    // copy and frees it; Alice frees it: the daemon's copy is the last, and
    // its release waits for good.
    let importer = daemon.client();
    let imported = importer
        .import(&token.parse().expect("token"))
        .expect("import Alice's buffer");
    let held = HeldEpoll::new(&mut fuse, imported.as_fd());
    drop(imported);
    alice.ok(&format!("free {shared}"));
    // Alice's own buffer, freed: the daemon lets go of it.
    let own_closed = own_free_goes_on(&daemon, || {
        let own = field(&alice.ok("alloc 8192 heap=system name=own"), "id")
            .expect("id")
            .to_owned();
        alice.ok(&format!("free {own}"));
    });
    held.let_go(fuse);
    own_closed.assert("Alice's own freed buffer", "the shared buffer's release");
    assert!(new_client_served(&daemon), "another client was not served");
    alice.ok("alloc 4096");
}

/// The same with a fence: the sync_file a producer ended its device write
/// with, handed to a no-autofence reader of another user, was let go of on
/// the producer's thread once it signalled, where the reader could stall
/// it (here the stall is the producer's own epoll: what is tested is
/// where the release runs). It is let go of on a thread of both users
/// now, and the producer's own closes go on.
#[test]
fn kernel_tier_a_fence_handed_to_another_users_reader_holds_up_none_of_the_producers_own_closes() {
    const ALICE: u32 = 65501;
    if !have_dma_heap() {
        return;
    }
    let Some(vgem) = vgem() else {
        return;
    };
    let daemon = daemon_for_two_users(&format!(
        "[default]\nautofence = \"optional\"\n\n\
         [[rule]]\nname = \"alice-imports\"\nuser = {ALICE}\nimport_from = {{ users = [0] }}\n"
    ));
    // After the daemon, so dropped before it should the test fail.
    let Some(mut fuse) = stalling_fuse("a fence handed to another user whose release waits") else {
        return;
    };
    let producer = daemon.client();
    let frame = system_buffer(&producer, 8192, Some("frame"));
    let token = frame.export().expect("export");
    let mut reader = Scripted::spawn_as(daemon.socket(), ALICE, ALICE, &["--no-autofence"]);
    let id = field(&reader.ok(&format!("import {token}")), "id")
        .expect("id")
        .to_owned();
    let WatchedFence {
        _gpu_buffer,
        fence,
        attached,
        held,
    } = end_device_write_with_a_watched_fence(&vgem, &frame, &mut fuse);
    // No-autofence: granted at once, with the producer's fence to wait on.
    let granted = reader.ok(&format!("begin {id} r"));
    let sync_files = field(&granted, "fence_list").unwrap_or("");
    assert!(
        sync_files.contains(":true"),
        "the reader was handed the fence as a sync_file: {granted}"
    );
    let access = field(&granted, "access").expect("access").to_owned();
    reader.ok(&format!("end {access}"));
    // Signalled, the daemon lets go of the sync_file: the last copy, whose
    // release waits for good.
    signal(&vgem, fence, attached);
    let own_closed = own_free_goes_on(&daemon, || {
        drop(system_buffer(&producer, 8192, Some("own")));
    });
    held.let_go(fuse);
    own_closed.assert("the producer's own freed buffer", "the fence's release");
    assert!(new_client_served(&daemon), "another client was not served");
}

/// The same with a device access's completion fence: the daemon keeps the
/// sync_file a client ended its access with until it signals, and its
/// release once it has, with the client's copy long closed, was the last.
#[test]
fn kernel_tier_a_signalled_fence_whose_release_waits_does_not_stall_the_daemon() {
    if !have_dma_heap() {
        return;
    }
    let Some(vgem) = vgem() else {
        return;
    };
    let Some(mut fuse) = stalling_fuse("a signalled fence whose release waits") else {
        return;
    };
    let daemon = real_kernel_daemon();
    let producer = daemon.client();
    let frame = system_buffer(&producer, 8192, Some("frame"));
    let WatchedFence {
        _gpu_buffer,
        fence,
        attached,
        held,
    } = end_device_write_with_a_watched_fence(&vgem, &frame, &mut fuse);
    // The daemon's wait ends, and it lets go of the sync_file.
    signal(&vgem, fence, attached);
    let served = new_client_served(&daemon);
    held.let_go(fuse);
    assert!(served, "another client was not served");
    let read = frame
        .begin(Access::CpuRead)
        .expect("a read once the fence signalled");
    drop(read);
}

/// Under systemd every buffer's fd is in the fd store too, and the service
/// manager closes its copy when it reads the daemon's `FDSTOREREMOVE`,
/// which is usually after the daemon let go of its own: PID 1 made a
/// freed dma-buf's last release, and a client watching the buffer with an
/// epoll it holds locked stalled the service manager. The daemon's closing
/// thread now waits for the manager to have read the removal first. Found
/// by review.
#[test]
fn kernel_tier_the_service_manager_never_makes_a_freed_dma_bufs_last_release() {
    if !have_dma_heap() {
        return;
    }
    let Some(mut fuse) = stalling_fuse("the service manager's last release") else {
        return;
    };
    let manager = ServiceManager::new();
    let log = manager.dir.path().join("daemon.log");
    let args = ["--dma-heap-dir", "/dev/dma_heap", "--dbus", "none"];
    let mut daemon = manager.start_daemon(&binary("dmabrokerd"), &args, &[], &log);
    manager.wait_for("READY=1", DAEMON_START, |r| r.count("READY=1") > 0);
    let client = Client::connect_to(&manager.socket_path).expect("connect");
    let buffer = system_buffer(&client, 8192, Some("stored"));
    manager.wait_until_recorded(1);
    let held = HeldEpoll::new(&mut fuse, buffer.as_fd());
    {
        // The manager busy for a moment: the removal waits in its reader,
        // while the daemon frees the buffer (and, before, let go of its
        // copy at once).
        let _busy = manager.hold_reading();
        drop(buffer);
        client.heaps().expect("the free is handled");
        std::thread::sleep(Duration::from_millis(500));
    }
    manager.send_marker("MARKER=1");
    let read_on = manager.seen_within(Duration::from_secs(3), |r| r.count("MARKER=1") > 0);
    held.let_go(fuse);
    let _ = daemon.kill();
    let _ = daemon.wait();
    assert!(
        read_on,
        "the service manager stalled in the last release of a freed dma-buf"
    );
}

/// Sends a read's begin of `buffer` and, behind it, the buffer's free: the
/// free is answered `Freed`, and the begin, still waiting (`what`),
/// `UnknownBuffer`.
#[track_caller]
fn a_free_answers_the_waiting_read(
    raw: &mut RawClient,
    buffer: dmabroker_ipc::BufferId,
    what: &str,
) {
    let begin = raw.send_request(RequestBody::Begin {
        buffer,
        access: Access::CpuRead,
        timeout_ms: None,
    });
    let free = raw.send_request(RequestBody::Free { buffer });
    let answers = raw.replies(2);
    assert!(
        matches!(answers.get(&free), Some(Ok(ReplyBody::Freed))),
        "{answers:?}"
    );
    assert_eq!(
        answers.get(&begin).and_then(|r| r.as_ref().err()),
        Some(&dmabroker_ipc::ErrorCode::UnknownBuffer),
        "{what}: {answers:?}"
    );
}

/// Ends a device write on `frame` with the fence of a vgem write still
/// under way; returns what ending it answered, with the fence to signal.
fn end_device_write_with_an_unsignalled_fence<'v>(
    vgem: &'v Vgem,
    frame: &Buffer,
) -> (
    Result<(), dmabroker_client::FenceRefused>,
    VgemBuffer<'v>,
    FenceHandle,
    Instant,
) {
    let render = frame.begin(Access::DeviceWrite).expect("device write");
    let gpu_buffer = vgem.create_buffer(4096).expect("vgem buffer");
    let fence = gpu_buffer.attach_fence(true).expect("attach a write fence");
    let attached = Instant::now();
    let done =
        dma_buf::export_sync_file(gpu_buffer.dmabuf(), false).expect("export the GPU's fence");
    (render.end_with_fence(done), gpu_buffer, fence, attached)
}

/// An access ended with a kernel fence is its device's: it leaves its
/// client's count of held accesses, and stays when the client goes, while
/// the daemon keeps the sync_file (two fds) until the fence signals. So
/// such accesses count per uid, connections gone included, against
/// `max_held_accesses`: before, one client could end accesses with fences
/// that never signal, reconnect and go on, until the daemon's fd table was
/// full and every client was refused. One over the limit is refused
/// `QuotaExceeded` and changes nothing (the access is still held); once
/// the fences signal, fences are taken again.
#[test]
fn kernel_tier_accesses_ended_with_unsignalled_fences_count_per_uid_against_max_held_accesses() {
    let Some(vgem) = vgem() else {
        return;
    };
    let daemon = Daemon::start_with(DaemonOptions {
        policy: Some("[default]\nmax_held_accesses = 2\n".to_owned()),
        args: ["--dma-heap-dir", "/dev/dma_heap", "--dbus", "none"]
            .map(String::from)
            .to_vec(),
        ..Default::default()
    });
    let first = daemon.client();
    let frames: Vec<Buffer> = (0..3).map(|_| first.alloc(4096).expect("alloc")).collect();
    let mut fences = Vec::new();
    for frame in &frames[..2] {
        let (ended, gpu_buffer, fence, attached) =
            end_device_write_with_an_unsignalled_fence(&vgem, frame);
        ended.unwrap_or_else(|refused| panic!("ending with a fence: {}", refused.error));
        fences.push((gpu_buffer, fence, attached));
    }

    // Two awaited fences of this uid: a third is refused, and the access
    // it would have ended is still held.
    let (ended, _gpu_buffer, third, third_attached) =
        end_device_write_with_an_unsignalled_fence(&vgem, &frames[2]);
    let refused = ended.expect_err("a third awaited fence is over the limit");
    assert_eq!(
        refused.error.code(),
        Some(dmabroker_ipc::ErrorCode::QuotaExceeded),
        "{}",
        refused.error
    );
    assert!(
        refused
            .error
            .to_string()
            .contains("max_held_accesses limit 2, in use 2"),
        "{}",
        refused.error
    );
    let reader = daemon.client();
    let token = frames[2].export().expect("export");
    let imported = reader.import(&token).expect("import");
    let read = imported
        .begin_timeout(Access::CpuRead, Duration::from_millis(300))
        .expect_err("the refused end changed nothing: the device write is still held");
    assert_eq!(
        read.code(),
        Some(dmabroker_ipc::ErrorCode::Timeout),
        "{read}"
    );
    (*refused.guard).end().expect("ending without the fence");
    drop(imported);
    drop(reader);

    // The client goes and comes back: its awaited fences still count, on
    // buffers another holder keeps (a buffer freed by its last holder
    // takes its fences' sync_files with it).
    let keeper = daemon.client();
    let kept: Vec<Buffer> = frames[..2]
        .iter()
        .map(|frame| {
            let token = frame.export().expect("export");
            keeper.import(&token).expect("import")
        })
        .collect();
    drop(frames);
    drop(first);
    let again = daemon.client();
    let frame = again.alloc(4096).expect("alloc");
    let (ended, _gpu_buffer, fourth, fourth_attached) =
        end_device_write_with_an_unsignalled_fence(&vgem, &frame);
    let refused = ended.expect_err("the fences of a connection gone still count");
    assert_eq!(
        refused.error.code(),
        Some(dmabroker_ipc::ErrorCode::QuotaExceeded),
        "{}",
        refused.error
    );

    // Once the devices are done, a fence is taken again.
    for (_gpu_buffer, fence, attached) in fences {
        signal(&vgem, fence, attached);
    }
    signal(&vgem, third, third_attached);
    let mut retry = refused;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match (*retry.guard).end_with_fence(retry.sync_file) {
            Ok(()) => break,
            Err(refused) if Instant::now() < deadline => {
                assert_eq!(
                    refused.error.code(),
                    Some(dmabroker_ipc::ErrorCode::QuotaExceeded)
                );
                std::thread::sleep(Duration::from_millis(20));
                retry = refused;
            }
            Err(refused) => panic!(
                "the fences signalled, yet ending with one is refused: {}",
                refused.error
            ),
        }
    }
    signal(&vgem, fourth, fourth_attached);
    drop(kept);
}
