//! Allocation, sharing and mapping across real processes through the real
//! daemon (memfd backend on the build machine).

use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use dmabroker_client::{Access, AllocRequest, ErrorCode};
use dmabroker_suite::raw::RawClient;
use dmabroker_suite::scripted::field;
use dmabroker_suite::{Daemon, Scripted};

#[test]
fn two_processes_share_one_buffer_and_see_each_others_writes() {
    let daemon = Daemon::start();
    let baseline = daemon.baseline();
    let mut camera = Scripted::spawn(daemon.socket(), &[]);
    let mut codec = Scripted::spawn(daemon.socket(), &[]);

    let allocated = camera.ok("alloc 5000 name=frame");
    let id = field(&allocated, "id").expect("id").to_owned();
    assert_eq!(
        field(&allocated, "size"),
        Some("8192"),
        "sizes round up to pages"
    );
    let token = camera.ok(&format!("export {id}"));
    let token = field(&token, "token").expect("token").to_owned();

    let imported = codec.ok(&format!("import {token}"));
    assert_eq!(
        field(&imported, "inode"),
        field(&allocated, "inode"),
        "an import is the same kernel object"
    );
    let codec_id = field(&imported, "id").expect("id").to_owned();
    assert_eq!(codec_id, id, "one buffer id for every holder");

    camera.ok(&format!("write {id} 171"));
    let read = codec.ok(&format!("read {codec_id}"));
    assert_eq!(field(&read, "byte"), Some("171"));
    assert_eq!(field(&read, "uniform"), Some("true"));

    codec.ok(&format!("write {codec_id} 66"));
    let read = camera.ok(&format!("read {id}"));
    assert_eq!(field(&read, "byte"), Some("66"));

    // Each process has its own fd of the buffer.
    let fd: i32 = field(&imported, "fd")
        .expect("fd")
        .parse()
        .expect("fd number");
    let link = std::fs::read_link(format!("/proc/{}/fd/{fd}", codec.pid())).expect("fd link");
    assert!(link.to_string_lossy().contains("memfd:"), "{link:?}");

    drop(camera);
    drop(codec);
    daemon.assert_fds_back_to(baseline);
}

#[test]
fn a_buffer_lives_while_any_client_holds_it() {
    let daemon = Daemon::start();
    let baseline = daemon.baseline();
    let owner = daemon.client();
    let holder = daemon.client();
    let connected = daemon.baseline();
    let buffer = owner.alloc(4096).expect("alloc");
    let token = buffer.export().expect("export");
    let shared = holder.import(&token).expect("import");
    {
        let mut w = buffer.begin(Access::CpuWrite).expect("begin");
        w.bytes_mut().expect("bytes").fill(9);
    }
    drop(buffer); // the owner frees; the holder keeps it alive
    let r = shared
        .begin(Access::CpuRead)
        .expect("begin after owner freed");
    assert!(r.bytes().expect("bytes").iter().all(|b| *b == 9));
    drop(r);
    assert_eq!(shared.info().expect("info still works").size, 4096);
    assert!(
        daemon.fd_count() > baseline,
        "the daemon still holds the buffer"
    );
    drop(shared);
    daemon.assert_fds_back_to(connected);
    drop(owner);
    drop(holder);
    daemon.assert_fds_back_to(baseline);
}

#[test]
fn disconnect_releases_everything_even_on_sigkill() {
    let daemon = Daemon::start();
    let baseline = daemon.baseline();
    let mut victim = Scripted::spawn(daemon.socket(), &[]);
    for _ in 0..10 {
        victim.ok("alloc 65536");
    }
    let held = victim.ok("begin 1 w");
    assert!(field(&held, "access").is_some());
    assert!(daemon.fd_count() >= baseline + 11);
    victim.kill(); // SIGKILL
    daemon.assert_fds_back_to(baseline);
}

#[test]
fn allocation_errors_are_clear_and_change_nothing() {
    let daemon = Daemon::start();
    let client = daemon.client();
    let baseline = daemon.baseline();
    let err = client.alloc(0).expect_err("size 0");
    assert_eq!(err.code(), Some(ErrorCode::InvalidArgument), "{err}");
    let err = client.alloc(u64::MAX).expect_err("absurd size");
    assert_eq!(err.code(), Some(ErrorCode::InvalidArgument), "{err}");
    let err = client.alloc(1 << 50).expect_err("larger than any quota");
    assert!(
        matches!(
            err.code(),
            Some(ErrorCode::QuotaExceeded | ErrorCode::InvalidArgument)
        ),
        "{err}"
    );
    let err = client
        .alloc_with(AllocRequest {
            size: 4096,
            heap: Some("no-such-heap".into()),
            name: None,
        })
        .expect_err("unknown heap");
    assert_eq!(err.code(), Some(ErrorCode::UnknownHeap), "{err}");
    assert!(err.to_string().contains("no-such-heap"), "{err}");
    let token = "dmab1-00112233445566778899aabbccddeeff"
        .parse()
        .expect("token syntax");
    let err = client.import(&token).expect_err("unknown token");
    assert_eq!(err.code(), Some(ErrorCode::UnknownToken), "{err}");
    assert_eq!(daemon.fd_count(), baseline, "refusals allocate nothing");
    // And the daemon still serves.
    assert_eq!(client.alloc(4096).expect("alloc").size(), 4096);
}

/// A V4L2 or GPU program adopting a dma-buf lost its fd on any refusal,
/// though some mean "try again" (`Busy`): the client closed it, and the
/// program had to export the buffer from its device anew to retry. The
/// refusal now gives the fd back, still open: here a memfd's, which is
/// not a dma-buf.
#[test]
fn a_refused_adopt_gives_the_fd_back_still_open() {
    let daemon = Daemon::start();
    let client = daemon.client();
    let memfd = nix::sys::memfd::memfd_create(
        c"not-a-dma-buf",
        nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
    )
    .expect("memfd");
    nix::unistd::ftruncate(&memfd, 4096).expect("ftruncate");
    let inode = |fd: &OwnedFd| nix::sys::stat::fstat(fd.as_raw_fd()).expect("fstat").st_ino;
    let before = inode(&memfd);
    let refused = client
        .adopt(memfd, None)
        .expect_err("a memfd is not a dma-buf");
    assert_eq!(refused.code(), Some(ErrorCode::NotADmaBuf), "{refused}");
    assert_eq!(
        inode(&refused.dmabuf),
        before,
        "the same file came back, open"
    );
    // And it is still this process's to use: a second try is refused the
    // same way, not for a closed fd.
    let again = client
        .adopt(refused.dmabuf, None)
        .expect_err("still not a dma-buf");
    assert_eq!(again.code(), Some(ErrorCode::NotADmaBuf), "{again}");
}

#[test]
fn heaps_are_listed_with_memfd_as_embedded_default() {
    let daemon = Daemon::start();
    let client = daemon.client();
    let heaps = client.heaps().expect("heaps");
    assert!(
        heaps
            .iter()
            .any(|h| h.name == "memfd" && h.backend == "memfd"),
        "{heaps:?}"
    );
    assert_eq!(client.default_heap(), "memfd");
    let buffer = client
        .alloc_with(AllocRequest {
            size: 1,
            heap: Some("memfd".into()),
            name: Some("named".into()),
        })
        .expect("alloc from memfd by name");
    assert_eq!(buffer.heap(), "memfd");
    assert_eq!(buffer.name(), "named");
}

#[test]
fn a_client_cannot_touch_a_buffer_it_does_not_hold() {
    let daemon = Daemon::start();
    let mut owner = Scripted::spawn(daemon.socket(), &[]);
    let mut other = Scripted::spawn(daemon.socket(), &[]);
    let allocated = owner.ok("alloc 4096");
    let id = field(&allocated, "id").expect("id").to_owned();
    // `other` guesses the id: the testclient only knows buffers it holds,
    // so go through the raw protocol.
    drop(other.cmd("heaps"));
    let mut raw = RawClient::connect(daemon.socket());
    raw.hello();
    for request in [
        format!("info {id}"),
        format!("export {id}"),
        format!("begin {id}"),
        format!("free {id}"),
    ] {
        let reply = raw.simple(&request);
        assert_eq!(
            reply.expect_err("someone else's buffer"),
            ErrorCode::UnknownBuffer,
            "{request}"
        );
    }
    // The owner's buffer is untouched.
    owner.ok(&format!("write {id} 5"));
    assert_eq!(field(&owner.ok(&format!("read {id}")), "byte"), Some("5"));
}

#[test]
fn sigterm_stops_cleanly_and_removes_the_socket() {
    let daemon = Daemon::start();
    let socket = daemon.socket().to_owned();
    let _client = daemon.client();
    let status = daemon.stop();
    assert!(status.success(), "{status}");
    assert!(!socket.exists(), "socket file left behind");
}

/// A stop that comes while the daemon starts, its socket already bound
/// (clients may connect), ends it cleanly. The signal handlers were set
/// only after the bind and the rest of the start: a SIGTERM in between
/// killed the daemon outright, its socket file left behind (a CI run of
/// `a_user_daemon_trusts_only_its_own_private_tmp_folder` hit it). The
/// start waits once bound (a test hook) so that the stop comes then.
#[test]
fn a_sigterm_while_the_daemon_starts_stops_it_cleanly() {
    let dir = dmabroker_suite::tmp::TempDir::new("stop-at-start");
    let socket = dir.path().join("socket");
    let mut daemon = std::process::Command::new(dmabroker_suite::daemon::binary("dmabrokerd"))
        .arg("--socket")
        .arg(&socket)
        .args([
            "--dma-heap-dir",
            "/nonexistent",
            "--udmabuf",
            "/nonexistent",
        ])
        .env("DMABROKER_TEST_START_STALL_MS", "3000")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("spawn the daemon");
    dmabroker_suite::eventually("the daemon's socket", || socket.exists());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let status = daemon.wait().expect("wait");
    assert!(status.success(), "{status}");
    assert!(!socket.exists(), "socket file left behind");
}

#[test]
fn a_second_daemon_refuses_a_socket_in_use() {
    let daemon = Daemon::start();
    let out = std::process::Command::new(dmabroker_suite::daemon::binary("dmabrokerd"))
        .arg("--socket")
        .arg(daemon.socket())
        .output()
        .expect("run second daemon");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("already serving"), "{stderr}");
    // The first one still serves.
    let client = daemon.client();
    client.alloc(4096).expect("alloc");
    std::thread::sleep(Duration::from_millis(10));
}

/// A heap order naming only heaps this machine lacks (a typo, a node not
/// there) started a daemon with no heap at all, whose every allocation was
/// refused as out of memory. It refuses to start now, saying why each heap
/// of the order is unusable, and leaves no socket behind.
#[test]
fn a_daemon_with_no_usable_heap_refuses_to_start() {
    let dir = dmabroker_suite::tmp::TempDir::new("no-usable-heap");
    let socket = dir.path().join("socket");
    let mut daemon = std::process::Command::new(dmabroker_suite::daemon::binary("dmabrokerd"))
        .arg("--socket")
        .arg(&socket)
        .args(["--heaps", "system", "--dma-heap-dir"])
        .arg(dir.path().join("no-heaps-here"))
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run the daemon");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while daemon.try_wait().expect("wait").is_none() {
        if std::time::Instant::now() >= deadline {
            let _ = daemon.kill();
            let _ = daemon.wait();
            panic!("the daemon started and served with no heap");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = daemon.wait_with_output().expect("its output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("no heap is usable")
            && stderr.contains("system: no dma-heap 'system' in")
            && stderr.contains("--heaps"),
        "{stderr}"
    );
    assert!(!socket.exists(), "a socket was left behind");
}

#[test]
fn exporting_again_returns_the_same_token() {
    let daemon = Daemon::start();
    let client = daemon.client();
    let buffer = client.alloc(4096).expect("alloc");
    let first = buffer.export().expect("export");
    for _ in 0..100 {
        assert_eq!(buffer.export().expect("export again"), first);
    }
    let other = daemon.client();
    assert_eq!(other.import(&first).expect("import").id(), buffer.id());
}

/// A user daemon without `XDG_RUNTIME_DIR` puts its socket in
/// `/tmp/dmabroker-UID`, a name anyone can create first. It makes the
/// folder itself (0700), and refuses one another uid owns or others may
/// write to: a socket there could be anyone's. It once used whatever it
/// found.
#[test]
fn a_user_daemon_trusts_only_its_own_private_tmp_folder() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    const UID: u32 = 65533;
    let dir = std::path::PathBuf::from(format!("/tmp/dmabroker-{UID}"));
    let _ = std::fs::remove_dir_all(&dir);
    let user_daemon = || {
        let mut cmd = std::process::Command::new("setpriv");
        cmd.arg(format!("--reuid={UID}"))
            .arg(format!("--regid={UID}"))
            .arg("--clear-groups")
            .arg(dmabroker_suite::daemon::binary("dmabrokerd"))
            .args([
                "--dma-heap-dir",
                "/nonexistent",
                "--udmabuf",
                "/nonexistent",
            ])
            .env_remove("XDG_RUNTIME_DIR")
            .env_remove("DMABROKER_SOCKET")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("INVOCATION_ID")
            .stdin(std::process::Stdio::null());
        cmd
    };

    // Made by someone else (root here), writable by all: refused.
    std::fs::create_dir(&dir).expect("create the folder first");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let mut refused = user_daemon()
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn the user daemon");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while refused.try_wait().expect("wait").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = refused.kill();
            let _ = refused.wait();
            let _ = std::fs::remove_dir_all(&dir);
            panic!("the user daemon serves from a folder anyone could have made");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = refused.wait_with_output().expect("its output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("refusing the socket's folder"), "{stderr}");
    assert!(!dir.join("socket").exists(), "bound a socket there");

    // No folder yet: it makes its own, private.
    std::fs::remove_dir_all(&dir).expect("remove");
    let mut daemon = user_daemon().spawn().expect("spawn the user daemon");
    let socket = dir.join("socket");
    dmabroker_suite::eventually("the user daemon's socket", || socket.exists());
    let meta = std::fs::metadata(&dir).expect("the folder");
    assert_eq!((meta.uid(), meta.mode() & 0o777), (UID, 0o700));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    assert!(daemon.wait().expect("wait").success());
    let _ = std::fs::remove_dir_all(&dir);
}

/// In system mode the socket's folder must let other users' clients in,
/// whatever umask the daemon was started with: it was created through
/// the umask (0700 under `umask 077`), and non-root clients got EACCES.
#[test]
fn a_system_daemon_makes_its_socket_folder_reachable_under_any_umask() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = dmabroker_suite::TempDir::new("system-umask");
    let dir = tmp.path().join("run");
    let socket = dir.join("socket");
    let mut daemon = std::process::Command::new("sh")
        .arg("-c")
        .arg("umask 077; exec \"$@\"")
        .arg("sh")
        .arg(dmabroker_suite::daemon::binary("dmabrokerd"))
        .args([
            "--system",
            "--dma-heap-dir",
            "/nonexistent",
            "--udmabuf",
            "/nonexistent",
        ])
        .arg("--socket")
        .arg(&socket)
        .env_remove("NOTIFY_SOCKET")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn the system daemon");
    dmabroker_suite::eventually("the system daemon's socket", || socket.exists());
    let mode = std::fs::metadata(&dir)
        .expect("the folder")
        .permissions()
        .mode()
        & 0o777;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let _ = daemon.wait();
    assert_eq!(mode, 0o755, "mode {mode:o}");
}

/// A system daemon run by hand bound its socket 0660 with root's group,
/// so nobody but root could connect (the socket unit sets `SocketGroup=`,
/// a daemon by hand had no way to). `--socket-group` gives the socket its
/// group before anyone can connect: a member of that group is served,
/// and a group that does not exist stops the start with the reason.
#[test]
fn a_system_daemon_run_by_hand_lets_the_socket_group_in() {
    use std::os::unix::fs::MetadataExt;
    const VIDEO: u32 = 44;
    const NOBODY: u32 = 65534;
    if !dmabroker_suite::have_root("--socket-group") {
        return;
    }
    let tmp = dmabroker_suite::TempDir::new("socket-group");
    let socket = tmp.path().join("socket");
    let system_daemon = |group: &str| {
        let mut cmd = std::process::Command::new(dmabroker_suite::daemon::binary("dmabrokerd"));
        cmd.args([
            "--system",
            "--dbus",
            "none",
            "--dma-heap-dir",
            "/nonexistent",
            "--udmabuf",
            "/nonexistent",
            "--socket-group",
            group,
        ])
        .arg("--socket")
        .arg(&socket)
        .env_remove("NOTIFY_SOCKET")
        .stdin(std::process::Stdio::null());
        cmd
    };

    let refused = system_daemon("no-such-group-here")
        .output()
        .expect("run the daemon");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "started with an unknown group");
    assert!(
        stderr.contains("no group is named 'no-such-group-here'"),
        "{stderr}"
    );

    /// Stopped even when an assertion fails first.
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut daemon = KillOnDrop(
        system_daemon(&VIDEO.to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn the system daemon"),
    );
    dmabroker_suite::eventually("the system daemon's socket", || socket.exists());
    let meta = std::fs::metadata(&socket).expect("the socket");
    assert_eq!((meta.gid(), meta.mode() & 0o777), (VIDEO, 0o660));
    // Not root, not the socket's owner: in through the group alone.
    let mut member = std::process::Command::new("setpriv");
    member
        .arg(format!("--reuid={NOBODY}"))
        .arg(format!("--regid={NOBODY}"))
        .arg(format!("--groups={VIDEO}"))
        .arg(dmabroker_suite::daemon::binary("dmabroker-testclient"));
    let mut client = Scripted::spawn_wrapped(member, &socket, &[]);
    client.ok("alloc 4096");
    drop(client);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    assert!(daemon.0.wait().expect("wait").success());
}
