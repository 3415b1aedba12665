//! The systemd service, without systemd as PID 1: systemd's own tools check
//! the units, `systemd-socket-activate` does real socket activation, and a
//! stand-in speaking the notify protocol (tests/harness/sdnotify.rs) plays
//! the service manager across a SIGKILL and restart.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use dmabroker_client::{Access, AllocRequest, Client, ClientOptions};
use dmabroker_ipc::{ErrorCode, ReplyBody, RequestBody};
use dmabroker_suite::abandon;
use dmabroker_suite::daemon::binary;
use dmabroker_suite::proc::{limit_fds, stable_fd_count, wait_fd_count};
use dmabroker_suite::raw::RawClient;
use dmabroker_suite::scripted::field;
use dmabroker_suite::sdnotify::{Received, ServiceManager};
use dmabroker_suite::systemd1::{Systemd1, UnitJob};
use dmabroker_suite::{Daemon, DaemonOptions, Scripted, TempDir};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The units as installed, but pointing at the binary under test.
fn installed_units(dir: &TempDir) -> (PathBuf, PathBuf) {
    let service = std::fs::read_to_string(repo().join("systemd/dmabroker.service"))
        .expect("service unit")
        .replace(
            "/usr/bin/dmabrokerd",
            &binary("dmabrokerd").display().to_string(),
        );
    let socket =
        std::fs::read_to_string(repo().join("systemd/dmabroker.socket")).expect("socket unit");
    let service_path = dir.path().join("dmabroker.service");
    let socket_path = dir.path().join("dmabroker.socket");
    std::fs::write(&service_path, service).expect("write unit");
    std::fs::write(&socket_path, socket).expect("write unit");
    (service_path, socket_path)
}

#[test]
fn units_pass_systemd_analyze_verify() {
    let dir = TempDir::new("units");
    let (service, socket) = installed_units(&dir);
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&socket)
        .arg(&service)
        .output()
        .expect("systemd-analyze (Debian package systemd) must be installed");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "verify failed:\n{stderr}");
    assert!(!stderr.contains("Unknown"), "verify warned:\n{stderr}");
}

/// Every value of `key=` in a unit's text, split on whitespace.
fn unit_values(unit: &str, key: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|line| line.trim().strip_prefix(key)?.strip_prefix('='))
        .flat_map(|value| value.split_whitespace().map(str::to_owned))
        .collect()
}

/// systemd hands a service's `RuntimeDirectory=` (and the other `*Directory=`
/// folders) to its `User=` and `Group=` at each start, chowning everything
/// in them: with the client socket in one, the first activation turned
/// `root:video 0660` into `dmabroker:dmabroker 0660`, and every `video`
/// member after the first client was refused until the socket unit was
/// restarted, then again after each boot. The socket's folder belongs to
/// tmpfiles and the socket unit; no folder of the service's may hold it.
#[test]
fn the_client_socket_is_in_no_folder_systemd_hands_to_the_service() {
    let service =
        std::fs::read_to_string(repo().join("systemd/dmabroker.service")).expect("service unit");
    let socket =
        std::fs::read_to_string(repo().join("systemd/dmabroker.socket")).expect("socket unit");
    let listen = unit_values(&socket, "ListenSequentialPacket");
    assert_eq!(listen.len(), 1, "one socket: {listen:?}");
    let listen = PathBuf::from(&listen[0]);
    for (key, root) in [
        ("RuntimeDirectory", "/run"),
        ("StateDirectory", "/var/lib"),
        ("CacheDirectory", "/var/cache"),
        ("LogsDirectory", "/var/log"),
    ] {
        for folder in unit_values(&service, key) {
            // `name` or `name:symlink`, relative to the type's root.
            let folder = folder.split(':').next().unwrap_or_default().to_owned();
            let folder = PathBuf::from(root).join(folder);
            assert!(
                !listen.starts_with(&folder),
                "{key}={} holds the client socket {}: systemd chowns it to the service's user",
                folder.display(),
                listen.display()
            );
        }
    }
}

/// The shipped sysusers and tmpfiles files, as systemd's own tools apply
/// them to a private root, make what operations.md says: a system user
/// `dmabroker` with a group of its own (which the udev rule gives the heap
/// nodes), in group `video` too (the socket's, so the service's own
/// clients reach it), with no login shell; and the socket's folder
/// `/run/dmabroker`, 0755 root:root.
#[test]
fn the_shipped_sysusers_and_tmpfiles_files_make_the_user_and_the_socket_folder() {
    use std::os::unix::fs::MetadataExt;
    if !nix::unistd::geteuid().is_root() {
        dmabroker_daemon::kernel::note_skip(
            "systemd-tmpfiles needs root to give the folder it makes to root",
        );
        return;
    }
    let root = TempDir::new("sysroot");
    std::fs::create_dir_all(root.path().join("etc")).expect("etc");
    for (tool, file, extra) in [
        (
            "systemd-sysusers",
            "systemd/sysusers.d/dmabroker.conf",
            None,
        ),
        (
            "systemd-tmpfiles",
            "systemd/tmpfiles.d/dmabroker.conf",
            Some("--create"),
        ),
    ] {
        let out = Command::new(tool)
            .arg(format!("--root={}", root.path().display()))
            .args(extra)
            .arg(repo().join(file))
            .output()
            .unwrap_or_else(|e| panic!("{tool} (Debian package systemd): {e}"));
        assert!(
            out.status.success(),
            "{tool} {file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let read = |path: &str| std::fs::read_to_string(root.path().join(path)).expect(path);
    let (passwd, group) = (read("etc/passwd"), read("etc/group"));
    let fields = |text: &str, name: &str| -> Vec<String> {
        text.lines()
            .map(|line| line.split(':').map(str::to_owned).collect::<Vec<_>>())
            .find(|f| f.first().is_some_and(|n| n == name))
            .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
    };
    let user = fields(&passwd, "dmabroker");
    let own_group = fields(&group, "dmabroker");
    assert_eq!(user[3], own_group[2], "the user's primary group is its own");
    assert!(user[6].ends_with("nologin"), "no login shell: {user:?}");
    let video = fields(&group, "video");
    assert!(
        video[3].split(',').any(|member| member == "dmabroker"),
        "in group video: {video:?}"
    );
    let folder = std::fs::metadata(root.path().join("run/dmabroker")).expect("the socket folder");
    assert!(folder.is_dir());
    assert_eq!(
        (folder.mode() & 0o7777, folder.uid(), folder.gid()),
        (0o755, 0, 0)
    );
}

#[test]
fn service_hardening_exposure_is_at_most_1_0() {
    let dir = TempDir::new("security");
    let (service, _) = installed_units(&dir);
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&service)
        .output()
        .expect("systemd-analyze security");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure level in:\n{stdout}"));
    let level: f64 = line
        .split(':')
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the level from {line}"));
    assert!(level <= 1.0, "exposure {level} > 1.0:\n{stdout}");
}

#[test]
fn socket_activation_serves_a_client_that_connected_before_the_daemon_existed() {
    let dir = TempDir::new("activate");
    let socket = dir.path().join("socket");
    let log = dir.path().join("daemon.log");
    let mut activator = Command::new("systemd-socket-activate")
        .arg("--seqpacket")
        .arg("-l")
        .arg(&socket)
        .arg(binary("dmabrokerd"))
        .args([
            "--dma-heap-dir",
            "/nonexistent",
            "--udmabuf",
            "/nonexistent",
        ])
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("systemd-socket-activate (Debian package systemd)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "systemd-socket-activate never listened"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // No daemon runs yet: the connection waits in the backlog and the
    // activator starts dmabrokerd for it.
    let client = Client::connect_to(&socket).expect("served through socket activation");
    let buffer = client.alloc(4096).expect("alloc");
    assert_eq!(buffer.size(), 4096);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.contains("serving the socket the service manager passed"),
        "{text}"
    );
    drop(buffer);
    drop(client);
    let _ = activator.kill();
    let _ = activator.wait();
}

#[test]
fn a_stream_socket_from_the_manager_is_refused_with_a_clear_error() {
    let manager = ServiceManager::with_socket_type(nix::sys::socket::SockType::Stream);
    let log = manager.dir.path().join("daemon.log");
    let mut daemon = manager.start_daemon(&binary("dmabrokerd"), &[], &[], &log);
    let status = daemon.wait().expect("wait");
    assert!(!status.success());
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(text.contains("ListenSequentialPacket="), "{text}");
}

struct Running {
    child: Child,
    log: PathBuf,
}

impl Running {
    fn start(manager: &ServiceManager, name: &str, env: &[(&str, &str)]) -> Running {
        Running::start_with(manager, name, env, &[])
    }

    fn start_with(
        manager: &ServiceManager,
        name: &str,
        env: &[(&str, &str)],
        extra: &[&str],
    ) -> Running {
        let readies = manager.received().count("READY=1");
        let running = Running::spawn(manager, name, env, extra);
        manager.wait_for("READY=1", Duration::from_secs(10), |r| {
            r.count("READY=1") > readies
        });
        running
    }

    /// Started, not waited for: its READY=1 may not reach a busy manager.
    fn spawn(
        manager: &ServiceManager,
        name: &str,
        env: &[(&str, &str)],
        extra: &[&str],
    ) -> Running {
        let log = manager.dir.path().join(format!("{name}.log"));
        let mut args = vec![
            "--dma-heap-dir",
            "/nonexistent",
            "--udmabuf",
            "/nonexistent",
            "--dbus",
            "none",
        ];
        args.extend_from_slice(extra);
        let child = manager.start_daemon(&binary("dmabrokerd"), &args, env, &log);
        Running { child, log }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn readiness_status_and_stopping_are_reported() {
    let manager = ServiceManager::new();
    let mut daemon = Running::start(&manager, "notify", &[]);
    let client = Client::connect_to(&manager.socket_path).expect("connect");
    let _buffer = client.alloc(8192).expect("alloc");
    manager.wait_for("STATUS with a buffer", Duration::from_secs(5), |r| {
        r.statuses()
            .iter()
            .any(|s| s == "1 clients, 1 buffers, 8192 bytes")
    });
    // A reload is announced (RELOADING=1 ... READY=1) as systemd expects.
    let pid = nix::unistd::Pid::from_raw(daemon.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
    manager.wait_for("RELOADING=1 then READY=1", Duration::from_secs(5), |r| {
        r.count("RELOADING=1") == 1 && r.count("READY=1") == 2
    });
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    manager.wait_for("STOPPING=1", Duration::from_secs(5), |r| {
        r.count("STOPPING=1") == 1
    });
    assert!(daemon.child.wait().expect("wait").success());
}

#[test]
fn a_wedged_event_loop_stops_the_watchdog_pings() {
    let manager = ServiceManager::new();
    let daemon = Running::start(
        &manager,
        "watchdog",
        &[
            ("WATCHDOG_USEC", "100000"),
            ("DMABROKER_TEST_WEDGE_AFTER_MS", "600"),
        ],
    );
    let started = Instant::now();
    manager.wait_for("watchdog pings", Duration::from_secs(5), |r| {
        r.count("WATCHDOG=1") >= 4
    });
    std::thread::sleep(Duration::from_millis(1200).saturating_sub(started.elapsed()));
    let wedged_at = manager.received().count("WATCHDOG=1");
    std::thread::sleep(Duration::from_millis(500));
    let later = manager.received().count("WATCHDOG=1");
    assert_eq!(
        later,
        wedged_at,
        "pings went on although the loop is wedged:\n{}",
        daemon.log()
    );
    assert!(daemon.log().contains("wedging the event loop now"));
}

#[test]
fn a_sigkilled_broker_restarts_with_every_buffer_and_clients_reattach() {
    let manager = ServiceManager::new();
    let first = Running::start(&manager, "first", &[]);
    let baseline = stable_fd_count(first.pid());
    let options = ClientOptions {
        name: "camera".into(),
        ..Default::default()
    };
    let camera = Client::connect_with(&manager.socket_path, options).expect("camera");
    let codec = Client::connect_to(&manager.socket_path).expect("codec");
    let frames: Vec<_> = (0..3)
        .map(|_| camera.alloc(65536).expect("alloc"))
        .collect();
    for (i, frame) in frames.iter().enumerate() {
        let mut w = frame.begin(Access::CpuWrite).expect("begin");
        w.bytes_mut().expect("bytes").fill(i as u8 + 1);
    }
    let token = frames[0].export().expect("export");
    let shared = codec.import(&token).expect("import");
    let inodes: Vec<u64> = frames.iter().map(|f| f.inode()).collect();
    // The codec is writing when the broker dies.
    let held = shared.begin(Access::CpuWrite).expect("write access");
    manager.wait_until_recorded(3);

    drop(first); // SIGKILL
    let second = Running::start(&manager, "second", &[]);
    assert_logged(&second, "buffers taken back from the fd store");

    // Same buffers, same kernel objects, same contents.
    for (i, frame) in frames.iter().enumerate() {
        let r = frame.begin(Access::CpuRead).expect("begin after restart");
        if i == 0 {
            assert!(
                r.writer_lost(),
                "the write in flight at the crash is reported lost"
            );
        }
        assert!(r.bytes().expect("bytes").iter().all(|b| *b == i as u8 + 1));
        drop(r);
        assert_eq!(frame.info().expect("info").inode, inodes[i]);
    }
    assert_eq!(camera.reconnects(), 1);
    drop(held); // no end is sent: the access died with the old broker
    let w = shared
        .begin(Access::CpuWrite)
        .expect("the codec writes again");
    drop(w);
    assert_eq!(codec.reconnects(), 1);

    // Nothing leaks: freeing everything empties the store and brings the
    // new daemon to the first one's idle fd count.
    drop(frames);
    drop(shared);
    drop(camera);
    drop(codec);
    manager.wait_for(
        "buffers removed from the store",
        Duration::from_secs(5),
        |r| r.buffers_stored() == 0,
    );
    assert_eq!(
        wait_fd_count(second.pid(), baseline, Duration::from_secs(5)),
        baseline,
        "{}",
        second.log()
    );
}

/// Clients that begin in a buffer's word make no call a restart would
/// fail: after one, they went on beginning in the word the previous
/// instance left, which the new one reset only when it first looked at it
/// for a client allowed to use words. So a client without words was
/// granted a write by message while a word user began another in the word.
#[test]
fn word_users_cannot_begin_in_a_word_left_by_the_previous_instance() {
    let manager = ServiceManager::new();
    let first = Running::start(&manager, "first", &[]);
    let camera = Client::connect_to(&manager.socket_path).expect("camera");
    let frame = camera.alloc(65536).expect("alloc");
    let display = Client::connect_with(
        &manager.socket_path,
        ClientOptions {
            buffer_words: false,
            ..Default::default()
        },
    )
    .expect("display");
    let shown = display
        .import(&frame.export().expect("export"))
        .expect("import");
    // The camera learns its slot and then begins and ends in the word.
    for _ in 0..3 {
        drop(frame.begin(Access::CpuWrite).expect("write"));
    }
    manager.wait_until_recorded(1);

    drop(first); // SIGKILL
    let _second = Running::start(&manager, "second", &[]);
    let displaying = shown
        .begin(Access::CpuWrite)
        .expect("the display writes after the restart");
    match frame.begin_timeout(Access::CpuWrite, Duration::from_millis(300)) {
        Err(err) => assert_eq!(err.code(), Some(dmabroker_ipc::ErrorCode::Timeout), "{err}"),
        Ok(_) => panic!("the camera began a write in the word while the display wrote"),
    }
    drop(displaying);
    drop(
        frame
            .begin(Access::CpuWrite)
            .expect("the camera writes after the display"),
    );
}

/// After a restart the bytes of a buffer are charged to its owner again,
/// not to whichever holder re-attached first: an importer that happened to
/// make the first call was charged for the camera's buffers (and refused
/// its own allocations), and the camera for nothing.
#[test]
fn after_a_restart_buffers_are_charged_to_their_owner_not_the_first_to_reattach() {
    let manager = ServiceManager::new();
    let policy = manager.dir.path().join("policy.toml");
    std::fs::write(&policy, "[default]\nmax_total_bytes = \"3 MiB\"\n").expect("policy");
    let policy = policy.to_str().expect("utf-8 path").to_owned();
    let first = Running::start_with(&manager, "first", &[], &["--policy", &policy]);
    let camera = Client::connect_to(&manager.socket_path).expect("camera");
    let codec = Client::connect_to(&manager.socket_path).expect("codec");
    let frames: Vec<_> = (0..2)
        .map(|_| camera.alloc(1 << 20).expect("alloc"))
        .collect();
    let imported: Vec<_> = frames
        .iter()
        .map(|f| codec.import(&f.export().expect("export")).expect("import"))
        .collect();
    manager.wait_until_recorded(2);

    drop(first); // SIGKILL
    let _second = Running::start_with(&manager, "second", &[], &["--policy", &policy]);
    codec.heaps().expect("the codec re-attaches first");
    camera.heaps().expect("the camera re-attaches");
    let own = codec
        .alloc(2 << 20)
        .expect("the codec is charged only for what it allocates");
    let err = camera
        .alloc(2 << 20)
        .expect_err("the camera is still charged for its 2 MiB");
    assert_eq!(
        err.code(),
        Some(dmabroker_ipc::ErrorCode::QuotaExceeded),
        "{err}"
    );
    drop((own, imported, frames));
}

/// `systemctl restart` right after a change: the record of the buffer
/// table is written 50 ms after a change, and a broker told to stop before
/// then left a record without the new buffer. The next instance dropped
/// the buffer's fd as unknown, and its client lost it.
#[test]
fn a_broker_stopped_right_after_an_alloc_still_records_the_buffer() {
    let systemd = Systemd1::start(UnitJob::Running("restart"));
    let bus = systemd.env();
    let manager = ServiceManager::new();
    let mut first = Running::start(&manager, "first", &[(bus.0, &bus.1)]);
    let client = Client::connect_to(&manager.socket_path).expect("connect");
    let buffer = client.alloc(4096).expect("alloc");
    {
        let mut w = buffer.begin(Access::CpuWrite).expect("begin");
        w.bytes_mut().expect("bytes").fill(7);
    }
    let pid = nix::unistd::Pid::from_raw(first.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    assert!(first.child.wait().expect("wait").success());

    let _second = Running::start(&manager, "second", &[]);
    // A request, so the client reconnects and re-attaches (a begin would
    // stay in the buffer's word).
    let info = buffer
        .info()
        .expect("the buffer is still there after the restart");
    assert_eq!(info.inode, buffer.inode());
    assert_eq!(client.reconnects(), 1);
    let read = buffer.begin(Access::CpuRead).expect("read after restart");
    assert!(read.bytes().expect("bytes").iter().all(|b| *b == 7));
}

/// The `_async` twins reconnect after a broker restart as the blocking
/// calls do: they sent and waited on their own, and failed `Disconnected`
/// from then on.
#[test]
fn async_calls_reconnect_after_a_restart() {
    let manager = ServiceManager::new();
    let first = Running::start(&manager, "first", &[]);
    let options = ClientOptions {
        buffer_words: false,
        ..Default::default()
    };
    let client = Client::connect_with(&manager.socket_path, options).expect("connect");
    let frame = client.alloc(4096).expect("alloc");
    manager.wait_until_recorded(1);
    let runtime = abandon::runtime();

    drop(first);
    let _second = Running::start(&manager, "second", &[]);
    let more = runtime
        .block_on(client.alloc_async(AllocRequest {
            size: 4096,
            ..Default::default()
        }))
        .expect("an async alloc after the restart");
    assert_eq!(client.reconnects(), 1);
    let write = runtime
        .block_on(frame.begin_async(Access::CpuWrite, None))
        .expect("an async begin on a re-attached buffer");
    drop(write);
    drop(more);
}

/// Fails the test, with the new instance's log, if `buffer` did not come
/// back across the restart.
fn assert_back(buffer: &dmabroker_client::Buffer, second: &Running) {
    if let Err(err) = buffer.info() {
        panic!(
            "buffer {} was lost at the restart: {err}\n{}",
            buffer.id(),
            second.log()
        );
    }
}

/// Waits until the daemon's log says `line`.
/// Asserts that the daemon's log has `line` by now.
#[track_caller]
fn assert_logged(daemon: &Running, line: &str) {
    assert!(
        daemon.log().contains(line),
        "no '{line}':\n{}",
        daemon.log()
    );
}

fn wait_for_log(daemon: &Running, line: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !daemon.log().contains(line) {
        assert!(Instant::now() < deadline, "no '{line}':\n{}", daemon.log());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A buffer kept by one holder while another's hold expired: dropping the
/// expired hold changed the table but not its record, so the record kept
/// the dropped holder's secret, and after the next restart that hold was
/// back, to expire a second time (or be re-attached by a client whose
/// hold had already been released).
#[test]
fn an_expired_hold_is_gone_from_the_record_too() {
    let manager = ServiceManager::new();
    let first = Running::start(&manager, "first", &[]);
    let owner = Client::connect_to(&manager.socket_path).expect("owner");
    let frame = owner.alloc(4096).expect("alloc");
    let token = frame.export().expect("export");
    let leaving = ClientOptions {
        reconnect: None,
        ..Default::default()
    };
    let importer = Client::connect_with(&manager.socket_path, leaving).expect("importer");
    let _imported = importer.import(&token).expect("import");
    manager.wait_until_recorded(1);
    // Long enough for the owner to re-attach on a slow machine.
    let grace = ["--reattach-grace", "2s"];

    drop(first);
    let second = Running::start_with(&manager, "second", &[], &grace);
    frame.info().expect("the owner re-attaches");
    wait_for_log(&second, "not re-attached within the grace period");
    std::thread::sleep(Duration::from_millis(200));

    drop(second);
    let third = Running::start_with(&manager, "third", &[], &grace);
    frame.info().expect("the owner re-attaches again");
    // The grace period ends either way; then the log says which.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !third.log().contains("grace period") {
        assert!(
            Instant::now() < deadline,
            "no end of the grace period:\n{}",
            third.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        !third
            .log()
            .contains("not re-attached within the grace period"),
        "the expired hold came back with the restart:\n{}",
        third.log()
    );
}

#[test]
fn buffers_nobody_reattaches_are_released_after_the_grace_period() {
    let manager = ServiceManager::new();
    let first = Running::start(&manager, "first", &[]);
    let options = ClientOptions {
        reconnect: None,
        ..Default::default()
    };
    let client = Client::connect_with(&manager.socket_path, options).expect("connect");
    let buffer = client.alloc(4096).expect("alloc");
    manager.wait_until_recorded(1);
    drop(first);
    let second = Running::start_with(&manager, "second", &[], &["--reattach-grace", "300ms"]);
    assert!(second.log().contains("restored=1"), "{}", second.log());
    // The old client does not reconnect: its hold expires and the buffer
    // leaves the store.
    manager.wait_for(
        "the orphaned buffer released",
        Duration::from_secs(5),
        |r| r.buffers_stored() == 0,
    );
    // The store is told before the line is logged: give the log a moment.
    wait_for_log(&second, "not re-attached within the grace period");
    drop(buffer);
    drop(client);
}

/// A full fd store lost every buffer at the next restart. systemd closes an
/// fd sent to a full store (`FileDescriptorStoreMax=`) and tells the sender
/// nothing; the daemon then removed the previous record after the refused
/// new one, so the store held buffers and no record, and the restarted
/// broker dropped them all. Now the broker keeps two slots for the records
/// and refuses a buffer that would need a slot beyond them.
#[test]
fn a_full_fd_store_keeps_every_buffer_across_a_restart() {
    const MAX: usize = 6;
    let manager = ServiceManager::with_fd_store_max(MAX);
    let first = Running::start(&manager, "first", &[]);
    let camera = Client::connect_to(&manager.socket_path).expect("camera");
    let codec = Client::connect_to(&manager.socket_path).expect("codec");
    let mut frames = Vec::new();
    let mut refusals = Vec::new();
    for _ in 0..MAX {
        match camera.alloc(4096) {
            Ok(frame) => frames.push(frame),
            Err(err) => refusals.push(err),
        }
    }
    // A change that needs a new record but no new slot.
    let seen = manager.received().records_sent();
    let shared = codec
        .import(&frames[0].export().expect("export"))
        .expect("an import needs no slot in the store");
    manager.wait_for_record_after(seen);

    drop(first); // SIGKILL
    let second = Running::start(&manager, "second", &[]);
    for frame in &frames {
        assert_back(frame, &second);
    }
    shared.info().expect("the import is re-attached too");
    assert!(
        manager.received().refused.is_empty(),
        "the store was overfilled: it refused {:?}",
        manager.received().refused
    );
    assert_eq!(frames.len(), MAX - 2, "two slots stay for the records");
    assert_eq!(refusals.len(), 2);
    for err in &refusals {
        assert_eq!(
            err.code(),
            Some(dmabroker_ipc::ErrorCode::QuotaExceeded),
            "{err}"
        );
        assert!(
            err.to_string().contains("FileDescriptorStoreMax=6"),
            "the refusal names the setting to raise: {err}"
        );
    }
    // Freeing a buffer frees its slot.
    drop(shared);
    let last = frames.pop().expect("a frame");
    drop(last);
    let again = camera.alloc(4096).expect("a freed slot is used again");
    drop(again);
}

/// A buffer freed while the daemon has no fd to spare stays in the store:
/// removing it takes a notify socket. Its slot was counted free all the
/// same, so the next buffer overfilled the store, systemd refused the next
/// record, and the restart found no record and dropped every buffer.
#[test]
fn a_buffer_whose_removal_from_the_store_failed_keeps_its_slot() {
    const MAX: usize = 6;
    let manager = ServiceManager::with_fd_store_max(MAX);
    let first = Running::start(&manager, "first", &[]);
    let camera = Client::connect_to(&manager.socket_path).expect("camera");
    let codec = Client::connect_to(&manager.socket_path).expect("codec");
    let mut frames: Vec<_> = (0..MAX - 2)
        .map(|_| camera.alloc(4096).expect("alloc within the store's slots"))
        .collect();
    manager.wait_until_recorded(MAX - 2);

    // The manager busy, its queue full: the removal cannot be sent.
    let busy = manager.busy();
    let freed = frames.pop().expect("a frame");
    drop(freed);
    camera.heaps().expect("the free was handled");
    wait_for_log(
        &first,
        "cannot put buffers in the fd store or take them out",
    );
    // Its slot is taken while the removal waits: one more buffer would be
    // beyond the store's maximum, which systemd drops without a word.
    let refused = camera
        .alloc(4096)
        .expect_err("the freed buffer still takes its slot");
    assert_eq!(refused.code(), Some(ErrorCode::QuotaExceeded), "{refused}");
    drop(busy);

    // Its slot is not free until the removal is sent: the next alloc
    // sends it again first, and only then takes the slot.
    let seen = manager.received().records_sent();
    let again = camera
        .alloc(4096)
        .expect("the slot is free once the removal is sent again");
    let shared = codec
        .import(&frames[0].export().expect("export"))
        .expect("import");
    manager.wait_for_record_after(seen);
    drop(first); // SIGKILL
    let second = Running::start(&manager, "second", &[]);
    let refused = manager.received().refused.clone();
    assert!(
        refused.is_empty(),
        "the store was overfilled: it refused {refused:?}"
    );
    for frame in frames.iter().chain([&again, &shared]) {
        assert_back(frame, &second);
    }
}

/// A record that could not be written was never written again, and the
/// next one took the name of the record before it (the names went by the
/// generation's parity): the store then held two records of that name,
/// systemd hands the newest first, and the restart kept the last one of a
/// name, the oldest. Buffers allocated after the failure were dropped
/// although their clients held them.
#[test]
fn a_failed_record_write_loses_no_buffer_at_the_next_restart() {
    let manager = ServiceManager::new();
    let first = Running::start(&manager, "first", &[]);
    let camera = Client::connect_to(&manager.socket_path).expect("camera");
    let codec = Client::connect_to(&manager.socket_path).expect("codec");
    let early = camera.alloc(4096).expect("alloc");
    manager.wait_until_recorded(1);
    let second_early = camera.alloc(4096).expect("alloc");
    manager.wait_until_recorded(2);

    // No fd to spare (0, 1 and 2 are open): the record of the import
    // cannot be written (its memfd, the notify socket).
    let token = early.export().expect("export");
    limit_fds(first.pid(), 3);
    let shared = codec.import(&token).expect("an import needs no new fd");
    wait_for_log(&first, "cannot store the buffer table record");
    limit_fds(first.pid(), 1024);
    // Tried again with no other change.
    wait_for_log(&first, "the buffer table record is stored again");
    let late = camera.alloc(4096).expect("alloc after the failure");
    manager.wait_until_recorded(3);

    drop(first); // SIGKILL
    let second = Running::start(&manager, "second", &[]);
    for (what, buffer) in [
        ("the import made while the record failed", &shared),
        ("the buffer allocated after the failure", &late),
        ("a buffer from before", &early),
        ("another buffer from before", &second_early),
    ] {
        if let Err(err) = buffer.info() {
            panic!(
                "{what} (buffer {}) was lost at the restart: {err}\n{}",
                buffer.id(),
                second.log()
            );
        }
    }
}

/// A buffer allocated after the last record is in the store but not in
/// the record: the restart drops it, and took its next id from the record,
/// so that buffer's id was handed out again, to a buffer its old client
/// might still name.
#[test]
fn ids_of_buffers_dropped_at_a_restart_are_not_handed_out_again() {
    // The kill must come within the 50 ms before the record would include
    // the second buffer: on a loaded machine it may not, so a few tries.
    for _ in 0..5 {
        if let Some((dropped, next)) = next_id_after_a_dropped_buffer() {
            assert!(next > dropped, "buffer id {next} was handed out again");
            return;
        }
    }
    panic!("the record always caught up before the kill; nothing was tested");
}

/// The id of a buffer dropped at a restart and of the next one
/// allocated; `None` if the record had caught up with it after all.
fn next_id_after_a_dropped_buffer() -> Option<(u64, u64)> {
    let manager = ServiceManager::new();
    let first = Running::start(&manager, "first", &[]);
    let client = Client::connect_to(&manager.socket_path).expect("connect");
    let recorded = client.alloc(4096).expect("alloc");
    manager.wait_until_recorded(1);
    // Its fd was stored before the reply; its record comes 50 ms later.
    let unrecorded = client.alloc(4096).expect("alloc");
    drop(first); // SIGKILL
    manager.wait_for(
        "the second buffer in the store",
        Duration::from_secs(5),
        |r| r.buffers_stored() == 2,
    );

    let second = Running::start(&manager, "second", &[]);
    if !second.log().contains("unknown=1") {
        return None;
    }
    recorded.info().expect("the recorded buffer re-attaches");
    let next = client.alloc(4096).expect("alloc after the restart");
    Some((unrecorded.id(), next.id()))
}

/// The secret of a hold a raw client gets: the reply to `body`.
fn raw_hold(raw: &mut RawClient, body: RequestBody) -> (u64, String) {
    match raw.request(body) {
        Ok(ReplyBody::Buffer(info)) => (info.id, info.secret),
        other => panic!("expected a buffer: {other:?}"),
    }
}

/// Re-attaching is taking back a hold one had, under the same rules as
/// taking a new one: a connection that presents the secrets of two holds
/// of one buffer (its own and an importer's) gets the first, and the
/// second is refused as an import of a buffer already held would be. It
/// was granted, listing the connection twice among the holders, past the
/// `max_buffers` limit too.
#[test]
fn a_connection_cannot_reattach_two_holds_of_one_buffer() {
    let manager = ServiceManager::new();
    let first = Running::start(&manager, "first", &[]);
    let mut owner = RawClient::connect(&manager.socket_path);
    owner.hello();
    let (buffer, owners) = raw_hold(
        &mut owner,
        RequestBody::Alloc {
            size: 4096,
            heap: None,
            name: None,
        },
    );
    let token = owner.export(buffer);
    let mut importer = RawClient::connect(&manager.socket_path);
    importer.hello();
    let (_, importers) = raw_hold(&mut importer, RequestBody::Import { token });
    manager.wait_until_recorded(1);

    drop(first); // SIGKILL
    let _second = Running::start(&manager, "second", &[]);
    let mut both = RawClient::connect(&manager.socket_path);
    both.hello();
    let id = raw_reattach(&mut both, buffer, owners);
    assert_eq!(id, buffer);
    let second = both.request(RequestBody::Reattach {
        buffer,
        secret: importers,
    });
    assert_eq!(second, Err(ErrorCode::InvalidArgument), "{second:?}");
}

/// A re-attach secret proves a hold only for the uid that held it: any uid
/// that presented it took the hold back, and the owner's charge with it,
/// past its own rules' `import_from` and the holder's `may_export`, and the
/// client that held it then found its buffer gone. Another uid is now told
/// no such hold waits, and the holder's uid still re-attaches it.
#[test]
fn a_reattach_secret_works_only_for_the_uid_that_held_the_buffer() {
    const ALICE: u32 = 65501;
    if !dmabroker_suite::have_root("a re-attach as another uid") {
        return;
    }
    let manager = ServiceManager::new();
    let first = Running::start(&manager, "first", &[]);
    let mut owner = RawClient::connect(&manager.socket_path);
    owner.hello();
    let (buffer, secret) = raw_hold(
        &mut owner,
        RequestBody::Alloc {
            size: 4096,
            heap: None,
            name: None,
        },
    );
    manager.wait_until_recorded(1);

    drop(first); // SIGKILL
    let _second = Running::start(&manager, "second", &[]);
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&manager.socket_path, std::fs::Permissions::from_mode(0o777))
            .expect("let another uid connect");
    }
    let mut alice =
        dmabroker_suite::scripted::Scripted::spawn_as(&manager.socket_path, ALICE, ALICE, &[]);
    let answer = alice
        .cmd(&format!("raw-reattach {buffer} {secret}"))
        .expect_err("another uid's re-attach");
    assert!(answer.starts_with("err unknown-buffer"), "{answer}");
    let mut again = RawClient::connect(&manager.socket_path);
    again.hello();
    let id = raw_reattach(&mut again, buffer, secret);
    assert_eq!(id, buffer, "the holder's uid re-attaches it");
}

/// A hold not yet re-attached was written to the next record with no uid
/// (`uid_of(ORPHAN)`), so after a second restart within the grace period
/// its own uid could no longer re-attach it. The hold keeps its uid
/// through any number of restarts: still its own, still not another's.
#[test]
fn a_hold_survives_two_restarts_before_it_is_reattached() {
    const ALICE: u32 = 65501;
    let manager = ServiceManager::new();
    let first = Running::start(&manager, "first", &[]);
    let mut owner = RawClient::connect(&manager.socket_path);
    owner.hello();
    let (buffer, secret) = raw_hold(
        &mut owner,
        RequestBody::Alloc {
            size: 4096,
            heap: None,
            name: None,
        },
    );
    manager.wait_until_recorded(1);
    drop(first); // SIGKILL
    let second = Running::start(&manager, "second", &[]);
    // Someone else allocates: the second instance writes a new record,
    // the owner's hold still orphaned in it.
    let seen = manager.received().records_sent();
    let mut other = RawClient::connect(&manager.socket_path);
    other.hello();
    let _ = raw_hold(
        &mut other,
        RequestBody::Alloc {
            size: 4096,
            heap: None,
            name: None,
        },
    );
    manager.wait_for_record_after(seen);
    drop(second); // SIGKILL, still within the grace period
    let _third = Running::start(&manager, "third", &[]);
    if dmabroker_suite::have_root("another uid's re-attach after two restarts") {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&manager.socket_path, std::fs::Permissions::from_mode(0o777))
            .expect("let another uid connect");
        let mut alice =
            dmabroker_suite::scripted::Scripted::spawn_as(&manager.socket_path, ALICE, ALICE, &[]);
        let refused = alice
            .cmd(&format!("raw-reattach {buffer} {secret}"))
            .expect_err("another uid's re-attach");
        assert!(refused.starts_with("err unknown-buffer"), "{refused}");
    }
    let mut again = RawClient::connect(&manager.socket_path);
    again.hello();
    let answer = again.request(RequestBody::Reattach { buffer, secret });
    assert!(
        matches!(answer, Ok(ReplyBody::Buffer(ref info)) if info.id == buffer),
        "the holder's own uid cannot re-attach after a second restart: {answer:?}"
    );
}

/// A raw connection's allocation of `size` bytes: its id and secret.
fn raw_alloc(raw: &mut RawClient, size: u64) -> (u64, String) {
    raw_hold(
        raw,
        RequestBody::Alloc {
            size,
            heap: None,
            name: None,
        },
    )
}

/// Re-attaches a hold that must be taken back; its buffer's id.
fn raw_reattach(raw: &mut RawClient, buffer: u64, secret: String) -> u64 {
    raw_hold(raw, RequestBody::Reattach { buffer, secret }).0
}

/// A raw connection, said hello on.
fn raw_connection(manager: &ServiceManager) -> RawClient {
    let mut raw = RawClient::connect(&manager.socket_path);
    raw.hello();
    raw
}

/// A broker started under a policy of `limit` bytes a connection, with
/// its policy file's path.
fn limited(manager: &ServiceManager, name: &str, limit: &str) -> (Running, String) {
    let policy = manager.dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        format!("[default]\nmax_total_bytes = \"{limit}\"\n"),
    )
    .expect("policy");
    let policy = policy.to_str().expect("utf-8 path").to_owned();
    let running = Running::start_with(manager, name, &[], &["--policy", &policy]);
    (running, policy)
}

/// Re-attaches were never checked against the limits, so a connection
/// that allocated its whole quota after a restart then re-attached the
/// buffer another connection had allocated before it, charged twice its
/// limit, and more at every restart. A re-attach on a connection that
/// took a buffer of its own first is checked as an allocation now, and a
/// refused one leaves the hold for its holder's own re-attach.
#[test]
fn a_reattach_after_an_alloc_of_ones_own_is_checked_against_the_limits() {
    let manager = ServiceManager::new();
    let (first, policy) = limited(&manager, "first", "64 KiB");
    let mut owner = raw_connection(&manager);
    let (buffer, secret) = raw_alloc(&mut owner, 64 << 10);
    manager.wait_until_recorded(1);

    drop(first); // SIGKILL
    let _second = Running::start_with(&manager, "second", &[], &["--policy", &policy]);
    let mut greedy = raw_connection(&manager);
    let _own = raw_alloc(&mut greedy, 64 << 10);
    let refused = greedy.request(RequestBody::Reattach {
        buffer,
        secret: secret.clone(),
    });
    assert_eq!(refused, Err(ErrorCode::QuotaExceeded), "{refused:?}");
    let mut honest = raw_connection(&manager);
    let id = raw_reattach(&mut honest, buffer, secret);
    assert_eq!(id, buffer, "the hold is left for its own re-attach");
}

/// Holds a connection has yet to re-attach count against its limits: a
/// connection that re-attached one of its two 32 KiB buffers and then
/// allocated 32 KiB would have 96 KiB under a 64 KiB limit once it
/// re-attached the other, and the next record all of it as one
/// connection's.
#[test]
fn holds_not_yet_reattached_count_against_a_new_allocation() {
    let manager = ServiceManager::new();
    let (first, policy) = limited(&manager, "first", "64 KiB");
    let mut owner = raw_connection(&manager);
    let (one, one_secret) = raw_alloc(&mut owner, 32 << 10);
    let (two, two_secret) = raw_alloc(&mut owner, 32 << 10);
    manager.wait_until_recorded(2);

    drop(first); // SIGKILL
    let _second = Running::start_with(&manager, "second", &[], &["--policy", &policy]);
    let mut again = raw_connection(&manager);
    raw_reattach(&mut again, one, one_secret);
    let refused = again.request(RequestBody::Alloc {
        size: 32 << 10,
        heap: None,
        name: None,
    });
    assert_eq!(refused, Err(ErrorCode::QuotaExceeded), "{refused:?}");
    let id = raw_reattach(&mut again, two, two_secret);
    assert_eq!(id, two, "the other hold is still re-attached");
}

/// After a restart the holds nobody has re-attached yet count against
/// their user's `max_uid_buffers`, each buffer once (two frames, one of
/// them held by a camera and a codec, are two): they counted for nobody
/// until a connection began re-attaching them, so a connection of the
/// user that re-attached nothing was allowed the limit again during the
/// grace period, and the user had up to twice the limit once its holds
/// came back. Failed before (the fourth buffer allocated).
#[test]
fn holds_not_yet_reattached_count_against_their_users_buffers() {
    let manager = ServiceManager::new();
    let policy = manager.dir.path().join("policy.toml");
    std::fs::write(&policy, "[default]\nmax_uid_buffers = 3\n").expect("policy");
    let policy = policy.to_str().expect("utf-8 path").to_owned();
    let first = Running::start_with(&manager, "first", &[], &["--policy", &policy]);
    let mut camera = raw_connection(&manager);
    let mut codec = raw_connection(&manager);
    let frames: Vec<(u64, String)> = (0..2).map(|_| raw_alloc(&mut camera, 4096)).collect();
    let token = match camera.request(RequestBody::Export {
        buffer: frames[0].0,
    }) {
        Ok(ReplyBody::Exported { token }) => token,
        other => panic!("export: {other:?}"),
    };
    let (shared, codec_secret) = raw_hold(&mut codec, RequestBody::Import { token });
    manager.wait_until_recorded(2);

    drop(first); // SIGKILL
    let _second = Running::start_with(&manager, "second", &[], &["--policy", &policy]);
    let mut other = raw_connection(&manager);
    let alloc = |raw: &mut RawClient| {
        raw.request(RequestBody::Alloc {
            size: 4096,
            heap: None,
            name: None,
        })
    };
    assert!(alloc(&mut other).is_ok(), "two frames waiting, one more");
    let refused = alloc(&mut other);
    assert_eq!(refused, Err(ErrorCode::QuotaExceeded), "{refused:?}");
    let mut camera = raw_connection(&manager);
    for (buffer, secret) in frames {
        assert_eq!(raw_reattach(&mut camera, buffer, secret), buffer);
    }
    let mut codec = raw_connection(&manager);
    assert_eq!(raw_reattach(&mut codec, shared, codec_secret), shared);
    let refused = alloc(&mut other);
    assert_eq!(
        refused,
        Err(ErrorCode::QuotaExceeded),
        "re-attached, still three"
    );
}

/// A connection re-attaches the holds of one connection from before the
/// restart: gathering the holds of several onto one charged it their
/// sum, several times its limits, and the next record had them all as
/// one connection's, to be gathered with more after the next restart.
#[test]
fn a_connection_reattaches_the_holds_of_one_connection_from_before_the_restart() {
    let manager = ServiceManager::new();
    let (first, policy) = limited(&manager, "first", "64 KiB");
    let mut a = raw_connection(&manager);
    let (a_buffer, a_secret) = raw_alloc(&mut a, 64 << 10);
    let mut b = raw_connection(&manager);
    let (b_buffer, b_secret) = raw_alloc(&mut b, 64 << 10);
    manager.wait_until_recorded(2);

    drop(first); // SIGKILL
    let _second = Running::start_with(&manager, "second", &[], &["--policy", &policy]);
    let mut both = raw_connection(&manager);
    let id = raw_reattach(&mut both, a_buffer, a_secret);
    assert_eq!(id, a_buffer);
    let refused = both.request(RequestBody::Reattach {
        buffer: b_buffer,
        secret: b_secret.clone(),
    });
    assert_eq!(refused, Err(ErrorCode::PermissionDenied), "{refused:?}");
    let mut own = raw_connection(&manager);
    let id = raw_reattach(&mut own, b_buffer, b_secret);
    assert_eq!(id, b_buffer, "the hold is left for a connection of its own");
}

/// A restart in the middle of a connection's re-attaches leaves its holds
/// one connection's in the next record, re-attached or not: recorded
/// under the new connection's own id, the ones it re-attached would have
/// been another connection's than the ones it had not, and its next
/// re-attach refused half of them.
#[test]
fn a_restart_between_two_reattaches_keeps_the_holds_one_connections() {
    let manager = ServiceManager::new();
    let first = Running::start(&manager, "first", &[]);
    let mut owner = raw_connection(&manager);
    let (one, one_secret) = raw_alloc(&mut owner, 4096);
    let (two, two_secret) = raw_alloc(&mut owner, 4096);
    manager.wait_until_recorded(2);

    drop(first); // SIGKILL
    let second = Running::start(&manager, "second", &[]);
    let seen = manager.received().records_sent();
    let mut halfway = raw_connection(&manager);
    raw_reattach(&mut halfway, one, one_secret.clone());
    manager.wait_for_record_after(seen);
    drop(second); // SIGKILL, one hold re-attached, one not
    let _third = Running::start(&manager, "third", &[]);
    let mut again = raw_connection(&manager);
    for (buffer, secret) in [(one, one_secret), (two, two_secret)] {
        let id = raw_reattach(&mut again, buffer, secret);
        assert_eq!(id, buffer);
    }
}

/// A client whose next connection re-attaches while its previous one is
/// still open (its end not yet read) has the holds of both recorded as
/// one connection's once the previous one is gone: the second connection
/// takes the first's recorded id over, and after another restart all of
/// them re-attach on one connection. Recorded under the second's own id,
/// the hold it re-attached would be another connection's than the one
/// still waiting, and one of them refused.
#[test]
fn a_second_connection_takes_over_the_recorded_id_when_the_first_goes() {
    let manager = ServiceManager::new();
    let first = Running::start(&manager, "first", &[]);
    let mut owner = raw_connection(&manager);
    let holds: Vec<(u64, String)> = (0..3).map(|_| raw_alloc(&mut owner, 4096)).collect();
    manager.wait_until_recorded(3);

    drop(first); // SIGKILL
    let second = Running::start(&manager, "second", &[]);
    let reattach = |raw: &mut RawClient, (buffer, secret): &(u64, String)| {
        let id = raw_reattach(raw, *buffer, secret.clone());
        assert_eq!(id, *buffer);
    };
    let mut previous = raw_connection(&manager);
    reattach(&mut previous, &holds[0]);
    let mut next = raw_connection(&manager);
    reattach(&mut next, &holds[1]);
    let seen = manager.received().records_sent();
    drop(previous); // its buffer goes with it
    manager.wait_until_recorded(2);
    manager.wait_for_record_after(seen);
    drop(second); // SIGKILL, the third hold still waiting
    let _third = Running::start(&manager, "third", &[]);
    let mut again = raw_connection(&manager);
    reattach(&mut again, &holds[1]);
    reattach(&mut again, &holds[2]);
}

/// A second connection re-attaching for the same connection from before
/// the restart counts that one's waiting holds against its limits too:
/// it takes the recorded id over when the first goes (see above), and
/// with them its new buffer would make that connection's holds more than
/// its limits in the next record.
#[test]
fn a_second_connection_counts_the_waiting_holds_too() {
    let manager = ServiceManager::new();
    let (first, policy) = limited(&manager, "first", "64 KiB");
    let mut owner = raw_connection(&manager);
    let holds: Vec<(u64, String)> = (0..3).map(|_| raw_alloc(&mut owner, 16 << 10)).collect();
    manager.wait_until_recorded(3);

    drop(first); // SIGKILL
    let _second = Running::start_with(&manager, "second", &[], &["--policy", &policy]);
    let mut previous = raw_connection(&manager);
    let mut next = raw_connection(&manager);
    for (raw, (buffer, secret)) in [(&mut previous, &holds[0]), (&mut next, &holds[1])] {
        let id = raw_reattach(raw, *buffer, secret.clone());
        assert_eq!(id, *buffer);
    }
    // 16 KiB re-attached, 16 KiB waiting: 48 KiB more is over 64 KiB.
    let refused = next.request(RequestBody::Alloc {
        size: 48 << 10,
        heap: None,
        name: None,
    });
    assert_eq!(refused, Err(ErrorCode::QuotaExceeded), "{refused:?}");
    let _ = raw_alloc(&mut next, 32 << 10);
}

/// A new instance numbers its connections above every connection its
/// record names: numbered from 1 again, a connection that allocated its
/// quota after a restart had the id of one whose holds still waited, and
/// after the next restart the holds of both re-attached on one
/// connection, twice its limit.
#[test]
fn a_new_connection_is_not_taken_for_one_a_record_names() {
    let manager = ServiceManager::new();
    let (first, policy) = limited(&manager, "first", "64 KiB");
    let mut before = raw_connection(&manager);
    let waiting = raw_alloc(&mut before, 64 << 10);
    manager.wait_until_recorded(1);

    drop(first); // SIGKILL
    let second = Running::start_with(&manager, "second", &[], &["--policy", &policy]);
    let seen = manager.received().records_sent();
    let mut fresh = raw_connection(&manager);
    let own = raw_alloc(&mut fresh, 64 << 10);
    manager.wait_for_record_after(seen);
    drop(second); // SIGKILL, the first hold still waiting
    let _third = Running::start_with(&manager, "third", &[], &["--policy", &policy]);
    let mut gatherer = raw_connection(&manager);
    let id = raw_reattach(&mut gatherer, waiting.0, waiting.1);
    assert_eq!(id, waiting.0);
    let refused = gatherer.request(RequestBody::Reattach {
        buffer: own.0,
        secret: own.1,
    });
    assert_eq!(refused, Err(ErrorCode::PermissionDenied), "{refused:?}");
}

/// A re-attach takes back a hold that was within the limits when it was
/// taken; checked against them again, a hold whose charge grew since (an
/// importer left it the owner's charge) or a policy reloaded with lower
/// limits refused it, and the client lost a buffer it held.
#[test]
fn a_restart_under_tighter_limits_keeps_every_buffer_clients_hold() {
    let manager = ServiceManager::new();
    let policy = manager.dir.path().join("policy.toml");
    std::fs::write(&policy, "[default]\nmax_total_bytes = \"1 MiB\"\n").expect("policy");
    let policy = policy.to_str().expect("utf-8 path").to_owned();
    let first = Running::start_with(&manager, "first", &[], &["--policy", &policy]);
    let camera = Client::connect_to(&manager.socket_path).expect("camera");
    let frames: Vec<_> = (0..4)
        .map(|_| camera.alloc(256 << 10).expect("alloc within 1 MiB"))
        .collect();
    manager.wait_until_recorded(4);

    drop(first); // SIGKILL
    std::fs::write(&policy, "[default]\nmax_total_bytes = \"512 KiB\"\n").expect("policy");
    let second = Running::start_with(&manager, "second", &[], &["--policy", &policy]);
    for frame in &frames {
        assert_back(frame, &second);
    }
    let err = camera
        .alloc(4096)
        .expect_err("over the new limit, a new buffer is refused");
    assert_eq!(err.code(), Some(ErrorCode::QuotaExceeded), "{err}");
}

/// A service manager slow to read its notify socket (PID 1 busy, as at
/// boot) lets the socket's queue fill (`net.unix.max_dgram_qlen`, 10 by
/// default, 512 under systemd's own sysctl defaults). Every notify
/// datagram was a blocking send, from the broker's only thread under its
/// lock, so the next alloc (its buffer going into the store) stalled every
/// client until the manager read again. Now nothing waits for the
/// manager, and a buffer that could not go into the store goes in once
/// the manager reads again: none is lost at the next restart.
#[test]
fn a_manager_slow_to_read_stalls_no_client_and_loses_no_buffer() {
    const FRAMES: usize = 40;
    let manager = ServiceManager::new();
    let first = Running::start(&manager, "first", &[]);
    let camera = Client::connect_to(&manager.socket_path).expect("camera");
    camera.heaps().expect("connected");

    let (done_tx, done) = std::sync::mpsc::channel();
    let frames = {
        let busy = manager.busy();
        let allocating = {
            let camera = camera.clone();
            std::thread::spawn(move || {
                // Paced, as a loaded machine would: the record's writer
                // takes some of them while later ones still fail.
                let frames: Vec<_> = (0..FRAMES)
                    .map(|_| {
                        std::thread::sleep(Duration::from_millis(4));
                        camera.alloc(4096).expect("alloc")
                    })
                    .collect();
                let _ = done_tx.send(());
                frames
            })
        };
        let in_time = done.recv_timeout(Duration::from_secs(5));
        drop(busy);
        let frames = allocating.join().expect("allocating thread");
        assert!(
            in_time.is_ok(),
            "allocs stalled while the manager did not read its notify socket"
        );
        frames
    };
    // They went in late, sent again once the manager read.
    wait_for_log(&first, "cannot put buffers in the fd store");
    manager.wait_until_recorded(FRAMES);
    wait_for_log(&first, "every buffer is in the fd store again");
    // Said once for the run of failures, not once per buffer per retry.
    assert_eq!(
        first
            .log()
            .matches("cannot put buffers in the fd store")
            .count(),
        1,
        "{}",
        first.log()
    );

    drop(first); // SIGKILL
    let second = Running::start(&manager, "second", &[]);
    for frame in &frames {
        assert_back(frame, &second);
    }
}

/// Stopped (`systemctl restart`) while the manager is busy with buffers
/// not yet in its store: the daemon's last record, and those buffers, went
/// out with one try each that found no room, and the next instance dropped
/// buffers clients held. At stop they now wait for room (up to 4 s), and
/// `STOPPING=1` is not lost with the notify thread.
#[test]
fn a_broker_stopped_while_the_manager_is_busy_keeps_every_buffer() {
    const FRAMES: usize = 20;
    let systemd = Systemd1::start(UnitJob::Running("restart"));
    let bus = systemd.env();
    let manager = ServiceManager::new();
    let mut first = Running::start(&manager, "first", &[(bus.0, &bus.1)]);
    let camera = Client::connect_to(&manager.socket_path).expect("camera");
    camera.heaps().expect("connected");
    let frames: Vec<_>;
    {
        let _busy = manager.busy();
        frames = (0..FRAMES)
            .map(|_| camera.alloc(4096).expect("alloc"))
            .collect();
        wait_for_log(&first, "cannot put buffers in the fd store");
        let pid = nix::unistd::Pid::from_raw(first.pid() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        wait_for_log(&first, "shutting down");
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(
        first.child.wait().expect("wait").success(),
        "{}",
        first.log()
    );
    assert_eq!(
        manager.received().count("STOPPING=1"),
        1,
        "STOPPING=1 was lost"
    );
    let second = Running::start(&manager, "second", &[]);
    for frame in &frames {
        assert_back(frame, &second);
    }
}

/// A watchdog ping the manager had no room for is offered again as soon
/// as it has, not only at the next period: two dropped in a row would let
/// the watchdog fire on a healthy broker.
#[test]
fn a_watchdog_ping_the_manager_had_no_room_for_follows_once_it_reads() {
    let manager = ServiceManager::new();
    // Pings every 2 s.
    let _daemon = Running::start(&manager, "watchdog-busy", &[("WATCHDOG_USEC", "4000000")]);
    manager.wait_for("a first ping", Duration::from_secs(5), |r| {
        r.count("WATCHDOG=1") >= 1
    });
    let busy = manager.busy();
    // Long enough for a ping to come due and find no room.
    std::thread::sleep(Duration::from_millis(2500));
    let pings = manager.received().count("WATCHDOG=1");
    drop(busy);
    // Within a second of the manager reading again, well before the next
    // period would have sent one.
    manager.wait_for("the ping that found no room", Duration::from_secs(1), |r| {
        r.count("WATCHDOG=1") > pings
    });
}

/// Buffers freed while a slow manager catches up on the ones it had no
/// room for: the record's writer sends those late, off the broker's
/// thread, and a buffer freed meanwhile (its removal sent first) was put
/// back in the store after its removal, keeping a freed buffer's memory in
/// PID 1 and a slot nobody counted, until the next restart. The store must
/// end up holding exactly the live buffers, each once.
#[test]
fn buffers_freed_while_the_manager_catches_up_do_not_come_back_to_the_store() {
    let manager = ServiceManager::new();
    let first = Running::start(&manager, "first", &[]);
    let camera = Client::connect_to(&manager.socket_path).expect("camera");
    camera.heaps().expect("connected");
    let mut frames: Vec<_>;
    {
        let _busy = manager.busy();
        frames = (0..60)
            .map(|_| camera.alloc(4096).expect("alloc"))
            .collect();
        // The record's writer takes its batch of late buffers and waits.
        std::thread::sleep(Duration::from_millis(300));
        manager.received().read_delay = Duration::from_millis(3);
        for _ in 0..30 {
            drop(frames.pop());
        }
        camera.heaps().expect("the frees were handled");
    }
    let mut live: Vec<String> = frames.iter().map(|f| format!("buf-{}", f.id())).collect();
    live.sort();
    let stored = || {
        let mut names: Vec<String> = manager
            .received()
            .stored_names()
            .into_iter()
            .filter(|n| n.starts_with("buf-"))
            .collect();
        names.sort();
        names
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while stored() != live {
        assert!(
            Instant::now() < deadline,
            "the store holds {:?}, the live buffers are {live:?}\n{}",
            stored(),
            first.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A `begin_async` given up on while its client reconnects to a socket the
/// manager holds but nobody serves yet (the broker died, socket
/// activation keeps the socket): the connect succeeds and the hello waits
/// for an answer. It waited for the whole reconnect window (10 s), with
/// nobody wanting the begin any more, and the runtime's shutdown with it.
#[test]
fn a_cancelled_begin_stops_waiting_for_a_hello_nobody_answers() {
    let manager = ServiceManager::new();
    let first = Running::start(&manager, "first", &[]);
    let options = ClientOptions {
        buffer_words: false,
        ..Default::default()
    };
    let writer = Client::connect_with(&manager.socket_path, options.clone()).expect("writer");
    let reader = Client::connect_with(&manager.socket_path, options).expect("reader");
    let buffer = writer.alloc(4096).expect("alloc");
    let theirs = reader
        .import(&buffer.export().expect("export"))
        .expect("import");
    let write = buffer.begin(Access::CpuWrite).expect("write");
    let runtime = abandon::runtime();
    let mut begin = Box::pin(theirs.begin_async(Access::CpuRead, None));
    abandon::wait_impatiently(&runtime, Duration::from_millis(50), &mut begin);
    // SIGKILL; the manager keeps the listening socket.
    drop(first);
    // The begin's thread reconnects: connected, its hello unanswered.
    std::thread::sleep(Duration::from_millis(300));
    drop(begin);
    abandon::assert_shuts_down_promptly(runtime);
    drop((write, theirs, buffer));
}

/// A manager busy for seconds, then idle: the buffers it had no room for
/// go in as soon as it has room. The record's writer backed off as for an
/// error (doubling up to 5 s) although it waits for room itself, so
/// buffers clients held stayed out of the store for seconds after the
/// manager was back, and a crash then would have lost them.
#[test]
fn buffers_go_into_the_store_soon_after_a_long_busy_spell() {
    const FRAMES: usize = 5;
    let manager = ServiceManager::new();
    let _first = Running::start(&manager, "first", &[]);
    let camera = Client::connect_to(&manager.socket_path).expect("camera");
    let frames: Vec<_>;
    {
        let _busy = manager.busy();
        frames = (0..FRAMES)
            .map(|_| camera.alloc(4096).expect("alloc"))
            .collect();
        // Long enough for a doubling back-off to reach seconds.
        std::thread::sleep(Duration::from_millis(9500));
    }
    let released = Instant::now();
    manager.wait_for("every buffer in the store", Duration::from_secs(10), |r| {
        r.buffers_stored() == FRAMES
    });
    assert!(
        released.elapsed() < Duration::from_millis(1500),
        "the buffers went into the store {:?} after the manager had room",
        released.elapsed()
    );
    drop(frames);
}

/// A sealed-or-not memfd holding `bytes`, to seed the stand-in's store.
fn memfd_with(name: &str, bytes: &[u8]) -> std::os::fd::OwnedFd {
    use std::io::Write;
    let fd = nix::sys::memfd::memfd_create(
        &std::ffi::CString::new(name).expect("name"),
        nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
    )
    .expect("memfd");
    let mut file = std::fs::File::from(fd);
    file.write_all(bytes).expect("write");
    file.into()
}

/// A restart that finds no readable record (a crash before the first
/// one, a record of another version) drops the old buffers' fds, and with
/// the manager busy their removals wait. Ids started again at 1, so the
/// new buffer 1's late store was followed by the old `buf-1`'s removal,
/// which took the new buffer out of the store: lost at the next restart.
/// The unreadable record, one fd too many meanwhile, is removed too.
#[test]
fn a_restart_without_a_record_reuses_no_old_buffer_id() {
    let manager = ServiceManager::new();
    {
        let mut received = manager.received();
        received
            .store
            .push(("state-a".into(), memfd_with("state-a", b"not a record")));
        received
            .store
            .push(("buf-1".into(), memfd_with("buf-1", &[0; 4096])));
    }
    let busy = manager.busy();
    let first = Running::spawn(&manager, "first", &[], &[]);
    wait_for_log(&first, "fd store holds no readable record");
    let camera = Client::connect_to(&manager.socket_path).expect("camera");
    let frame = camera.alloc(4096).expect("alloc");
    assert!(frame.id() > 1, "an old buffer's id was handed out again");
    drop(busy);
    let name = format!("buf-{}", frame.id());
    manager.wait_for(
        "the new buffer alone in the store, and a readable record",
        Duration::from_secs(10),
        |r| {
            let names = r.stored_names();
            names.iter().filter(|n| n.starts_with("buf-")).count() == 1
                && names.contains(&name)
                && names.iter().filter(|n| n.starts_with("state-")).count() == 1
                && r.records_sent() > 0
        },
    );
    drop(first); // SIGKILL
    let second = Running::start(&manager, "second", &[]);
    assert_back(&frame, &second);
}

/// Two records under one name (older versions stored them so) in a full
/// store: the restore counted record names, not fds, so it left no slot
/// for its first new record. An alloc took the last slot, systemd refused
/// the new record silently (the store was at its maximum), and the two
/// old ones were then removed: no record at all, and a crash then would
/// have lost every buffer.
#[test]
fn two_records_of_one_name_leave_room_for_the_next_record() {
    const MAX: usize = 6;
    let manager = ServiceManager::with_fd_store_max(MAX);
    let first = Running::start(&manager, "first", &[]);
    let camera = Client::connect_to(&manager.socket_path).expect("camera");
    let frames: Vec<_> = (0..MAX - 3)
        .map(|_| camera.alloc(4096).expect("alloc"))
        .collect();
    manager.wait_until_recorded(MAX - 3);
    drop(first); // SIGKILL
                 // A second, older record of the same name beside the last one.
    {
        let mut received = manager.received();
        let (name, fd) = received
            .store
            .iter()
            .find(|(name, _)| name.starts_with("state-"))
            .map(|(name, fd)| (name.clone(), fd.try_clone().expect("dup")))
            .expect("a record in the store");
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut std::fs::File::from(fd), &mut bytes).expect("read");
        received
            .store
            .push((name.clone(), memfd_with(&name, &bytes)));
    }
    let second = Running::start(&manager, "second", &[]);
    // Refused until the new record has replaced the two old ones.
    let deadline = Instant::now() + Duration::from_secs(5);
    let extra = loop {
        match camera.alloc(4096) {
            Ok(frame) => break frame,
            Err(err) if err.code() == Some(ErrorCode::QuotaExceeded) => {
                assert!(Instant::now() < deadline, "{err}\n{}", second.log());
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(err) => panic!("{err}"),
        }
    };
    let seen = manager.received().records_sent();
    manager.wait_for_record_after(seen);
    let received = manager.received();
    assert!(
        received.refused.is_empty(),
        "the store was overfilled: it refused {:?}",
        received.refused
    );
    assert!(
        received
            .stored_names()
            .iter()
            .any(|n| n.starts_with("state-")),
        "no record left in the store: {:?}",
        received.stored_names()
    );
    drop(received);
    drop((frames, extra));
}

/// An older record of the other name beside the one kept (a crash
/// between storing a record and removing the one before), and the
/// manager busy: the writer must remove the older record before its next
/// record, and while that removal waits the store holds two records,
/// exactly the two slots kept for them. The restore counted the older
/// record as a third, so the last buffer that fits was refused until the
/// manager read again.
#[test]
fn a_pending_removal_of_an_old_record_takes_no_slot_of_a_buffer() {
    const MAX: usize = 6;
    let manager = ServiceManager::with_fd_store_max(MAX);
    let first = Running::start(&manager, "first", &[]);
    let camera = Client::connect_to(&manager.socket_path).expect("camera");
    let mut frames: Vec<_> = (0..MAX - 3)
        .map(|_| camera.alloc(4096).expect("alloc"))
        .collect();
    manager.wait_until_recorded(MAX - 3);
    drop(first); // SIGKILL
    {
        // The same record again under the other name, older in the store.
        let mut received = manager.received();
        let (name, fd) = received
            .store
            .iter()
            .find(|(name, _)| name.starts_with("state-"))
            .map(|(name, fd)| (name.clone(), fd.try_clone().expect("dup")))
            .expect("a record in the store");
        let other = if name == "state-a" {
            "state-b"
        } else {
            "state-a"
        };
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut std::fs::File::from(fd), &mut bytes).expect("read");
        received
            .store
            .push((other.to_owned(), memfd_with(other, &bytes)));
    }
    let busy = manager.busy();
    let second = Running::spawn(&manager, "second", &[], &[]);
    wait_for_log(&second, "buffers taken back from the fd store");
    // Three buffers and two records: one slot left.
    let last = camera
        .alloc(4096)
        .unwrap_or_else(|err| panic!("the last slot was refused: {err}\n{}", second.log()));
    frames.push(last);
    let refused = camera
        .alloc(4096)
        .expect_err("a buffer beyond FileDescriptorStoreMax=");
    assert_eq!(refused.code(), Some(ErrorCode::QuotaExceeded), "{refused}");
    assert!(
        refused.to_string().contains("fd store is full")
            && refused.to_string().contains("FileDescriptorStoreMax=6"),
        "the refusal names the store and its setting: {refused}"
    );
    drop(busy);

    manager.wait_until_recorded(MAX - 2);
    manager.wait_for(
        "the older record out of the store",
        Duration::from_secs(5),
        |r| {
            r.stored_names()
                .iter()
                .filter(|n| n.starts_with("state-"))
                .count()
                == 1
        },
    );
    let refused = manager.received().refused.clone();
    assert!(
        refused.is_empty(),
        "the store was overfilled: it refused {refused:?}"
    );
    drop(second); // SIGKILL
    let third = Running::start(&manager, "third", &[]);
    for frame in &frames {
        assert_back(frame, &third);
    }
}

/// `FileDescriptorStoreMax=` lowered across a restart, below what the
/// store holds: systemd closes every fd sent to it, silently, until enough
/// are removed. The new instance sent its first record all the same, and
/// then removed the record it had taken back: the store held buffers and
/// no record, and the next crash lost every buffer clients held. The
/// writer now sends no record that cannot fit (the live buffers, the
/// record fds in the store and the new one over the maximum): the record
/// taken back stays, warned about once, and a new one goes in once frees
/// make room.
#[test]
fn a_lowered_store_max_keeps_a_record_in_the_store() {
    let manager = ServiceManager::with_fd_store_max(8);
    let first = Running::start(&manager, "first", &[]);
    let camera = Client::connect_to(&manager.socket_path).expect("camera");
    let mut frames: Vec<_> = (0..5).map(|_| camera.alloc(4096).expect("alloc")).collect();
    manager.wait_until_recorded(5);
    // SIGKILL; FileDescriptorStoreMax=4 now: the store (5 buffers, 1
    // record) is over.
    drop(first);
    manager.received().store_max = Some(4);
    let second = Running::start(&manager, "second", &[]);
    for frame in &frames {
        assert_back(frame, &second);
    }
    // The holds re-attached: the writer has tried to write a record since.
    std::thread::sleep(Duration::from_millis(500));
    let (names, refused) = {
        let r = manager.received();
        (r.stored_names(), r.refused.clone())
    };
    assert!(
        refused.is_empty(),
        "a record was sent to a full store: {refused:?}\n{}",
        second.log()
    );
    assert_eq!(
        second
            .log()
            .matches("the fd store has no slot for a new record")
            .count(),
        1,
        "warned once for the run\n{}",
        second.log()
    );
    drop(second); // SIGKILL
    let third = Running::start(&manager, "third", &[]);
    for frame in &frames {
        if let Err(err) = frame.info() {
            panic!(
                "buffer {} lost after the second crash: {err}\nstore before it: {names:?}\n{}",
                frame.id(),
                third.log()
            );
        }
    }

    // Two buffers, the record and the new one fit in four slots: freeing
    // three makes room for the new record, which replaces the old one.
    let seen = manager.received().records_sent();
    frames.truncate(2);
    manager.wait_for_record_after(seen);
    {
        let r = manager.received();
        assert!(
            r.refused.is_empty(),
            "the store was overfilled: it refused {:?}",
            r.refused
        );
        assert_eq!(
            (r.buffers_stored(), r.stored_fds()),
            (2, 3),
            "two buffers and one record: {:?}",
            r.stored_names()
        );
    }
    drop(third); // SIGKILL
    let fourth = Running::start(&manager, "fourth", &[]);
    for frame in &frames {
        assert_back(frame, &fourth);
    }
}

/// Fds handed back at a restart that nothing keeps: a second fd under a
/// buffer's name (the daemon keeps the first) and an fd of a name the
/// daemon never gives. The daemon closed them, but the manager still held
/// and counted them: the broker counted its slots without them, so it
/// admitted buffers beyond FileDescriptorStoreMax=, systemd refused the
/// next record silently and the record before it was removed. Now the
/// unknown name is removed from the store, and the second fd of a live
/// buffer's name (which goes only with that name's removal) takes a slot
/// until then.
#[test]
fn fds_the_restart_closes_are_out_of_the_store_or_take_a_slot() {
    const MAX: usize = 6;
    let manager = ServiceManager::with_fd_store_max(MAX);
    let first = Running::start(&manager, "first", &[]);
    let camera = Client::connect_to(&manager.socket_path).expect("camera");
    let mut frames: Vec<_> = (0..2).map(|_| camera.alloc(4096).expect("alloc")).collect();
    manager.wait_until_recorded(2);
    drop(first); // SIGKILL
    {
        // Handed over after the ones there (the oldest): the first fd of
        // the buffer's name is the buffer.
        let mut received = manager.received();
        let name = format!("buf-{}", frames[0].id());
        let duplicate = memfd_with(&name, b"an older fd of that name");
        received.store.push((name, duplicate));
        received
            .store
            .push(("stray".to_owned(), memfd_with("stray", b"not ours")));
        assert_eq!(received.stored_fds(), 5);
    }
    let second = Running::start(&manager, "second", &[]);
    for frame in &frames {
        assert_back(frame, &second);
    }
    manager.wait_for(
        "the stray fd out of the store",
        Duration::from_secs(5),
        |r| !r.stored_names().iter().any(|n| n == "stray"),
    );
    // Two buffers, the second fd of one's name, and two slots for the
    // records: one buffer more fits.
    frames.push(camera.alloc(4096).expect("the last slot"));
    let refused = camera
        .alloc(4096)
        .expect_err("the second fd of a buffer's name takes a slot");
    assert_eq!(refused.code(), Some(ErrorCode::QuotaExceeded), "{refused}");
    let seen = manager.received().records_sent();
    let codec = Client::connect_to(&manager.socket_path).expect("codec");
    let shared = codec
        .import(&frames[1].export().expect("export"))
        .expect("a change that needs a new record");
    manager.wait_for_record_after(seen);
    let refused = manager.received().refused.clone();
    assert!(
        refused.is_empty(),
        "the store was overfilled: it refused {refused:?}\n{}",
        second.log()
    );
    drop(second); // SIGKILL
    let third = Running::start(&manager, "third", &[]);
    for frame in frames.iter().chain([&shared]) {
        assert_back(frame, &third);
    }
}

/// A second fd under a live buffer's name takes a slot until that buffer's
/// removal, but nothing can be done about it before: counted as owed, it
/// made every try of the record's writer `Behind`, retried every 100 ms for
/// the buffer's whole life although the record and every buffer were in.
#[test]
fn a_duplicate_of_a_live_buffers_name_does_not_keep_the_writer_spinning() {
    let manager = ServiceManager::with_fd_store_max(16);
    let first = Running::start(&manager, "first", &[]);
    let camera = Client::connect_to(&manager.socket_path).expect("camera");
    let frames: Vec<_> = (0..2).map(|_| camera.alloc(4096).expect("alloc")).collect();
    manager.wait_until_recorded(2);
    drop(first); // SIGKILL
    {
        let mut received = manager.received();
        let name = format!("buf-{}", frames[0].id());
        let duplicate = memfd_with(&name, b"an older fd of that name");
        received.store.push((name, duplicate));
    }
    let second = Running::start(&manager, "second", &[]);
    for frame in &frames {
        assert_back(frame, &second);
    }
    // Everything settled: the record is in, no change comes.
    std::thread::sleep(Duration::from_millis(1000));
    let line = "the service manager has no room yet";
    let before = second.log().matches(line).count();
    std::thread::sleep(Duration::from_millis(2000));
    let during = second.log().matches(line).count() - before;
    assert!(
        during <= 2,
        "the writer retried {during} times in 2 s with nothing owed\n{}",
        second.log()
    );
}

/// `buf-01` (a name this daemon never gives) parsed as buffer 1: the
/// restore kept it when buffer 1 was live although it took only `buf-1`,
/// so it was neither removed nor counted; the store overfilled, the next
/// record was refused silently, and the one before removed. Only a
/// buffer's own name is a buffer's now; anything else is removed.
#[test]
fn a_name_that_only_parses_as_a_live_buffer_is_removed_or_counted() {
    const MAX: usize = 6;
    let manager = ServiceManager::with_fd_store_max(MAX);
    let first = Running::start(&manager, "first", &[]);
    let camera = Client::connect_to(&manager.socket_path).expect("camera");
    let mut frames: Vec<_> = (0..2).map(|_| camera.alloc(4096).expect("alloc")).collect();
    manager.wait_until_recorded(2);
    drop(first); // SIGKILL
    {
        let mut received = manager.received();
        let name = format!("buf-0{}", frames[0].id());
        received
            .store
            .push((name.clone(), memfd_with(&name, b"not ours")));
    }
    let second = Running::start(&manager, "second", &[]);
    for frame in &frames {
        assert_back(frame, &second);
    }
    std::thread::sleep(Duration::from_millis(500));
    // Admitted as long as check_store_slot sees room.
    while let Ok(frame) = camera.alloc(4096) {
        frames.push(frame);
    }
    let seen = manager.received().records_sent();
    let codec = Client::connect_to(&manager.socket_path).expect("codec");
    let _shared = codec
        .import(&frames[1].export().expect("export"))
        .expect("a change that needs a new record");
    manager.wait_for_record_after(seen);
    let r = manager.received();
    assert!(
        r.refused.is_empty(),
        "the store was overfilled: it refused {:?}; store {:?}",
        r.refused,
        r.stored_names()
    );
}

/// Two fds under one buffer's name, the one the record names handed over
/// second (systemd hands the newest first, so an fd stored later under
/// that name comes first): the restart kept the first fd of the name,
/// found it was not the recorded buffer and dropped the buffer, although
/// the recorded one was right behind it. The fd whose inode the record
/// names is kept now, and the other is closed.
#[test]
fn of_two_fds_under_a_buffers_name_the_recorded_one_is_kept() {
    let manager = ServiceManager::new();
    let first = Running::start(&manager, "first", &[]);
    let camera = Client::connect_to(&manager.socket_path).expect("camera");
    let frames: Vec<_> = (0..2).map(|_| camera.alloc(4096).expect("alloc")).collect();
    manager.wait_until_recorded(2);
    drop(first); // SIGKILL
    {
        // Newer than the buffer's fd, so handed over before it.
        let mut received = manager.received();
        let name = format!("buf-{}", frames[0].id());
        let impostor = memfd_with(&name, &[0; 4096]);
        received.store.insert(0, (name, impostor));
    }
    let second = Running::start(&manager, "second", &[]);
    for frame in &frames {
        assert_back(frame, &second);
    }
    assert_logged(&second, "closing a second fd of a buffer's name");
}

/// A record the manager dropped after it was sent (systemd closes an fd
/// sent to a full store and tells nobody; here the store was full because
/// `FileDescriptorStoreMax=` was lowered under the running daemon, which
/// cannot know) was counted as stored: nothing sent it again until the
/// table changed, and the record before it had been removed, so a crash
/// meanwhile lost every buffer. The writer now offers the record it
/// stored again from time to time; systemd keeps one entry per open file,
/// so an offer of a record it holds takes no second slot (to a store it
/// counts full it is refused, see the next test), and one it dropped goes
/// in once there is room.
#[test]
fn a_record_the_manager_dropped_is_offered_again_without_a_change() {
    let manager = ServiceManager::new();
    let reoffer = [("DMABROKER_TEST_RECORD_REOFFER_MS", "300")];
    let first = Running::start(&manager, "first", &reoffer);
    let camera = Client::connect_to(&manager.socket_path).expect("camera");
    let codec = Client::connect_to(&manager.socket_path).expect("codec");
    let frames: Vec<_> = (0..2).map(|_| camera.alloc(4096).expect("alloc")).collect();
    manager.wait_until_recorded(2);
    // The store full as it stands: the next record is refused.
    let full = manager.received().stored_fds();
    manager.received().store_max = Some(full);
    let seen = manager.received().records_sent();
    let shared = codec
        .import(&frames[0].export().expect("export"))
        .expect("a change that needs a new record");
    manager.wait_for_record_after(seen);
    assert!(
        !manager.received().refused.is_empty(),
        "the stand-in did not refuse the record"
    );
    // Room again, and no change to the table.
    manager.received().store_max = None;
    manager.wait_for(
        "the dropped record offered again",
        Duration::from_secs(5),
        |r| r.stored_names().iter().any(|n| n.starts_with("state-")),
    );
    drop(first); // SIGKILL
    let second = Running::start(&manager, "second", &reoffer);
    for frame in frames.iter().chain([&shared]) {
        assert_back(frame, &second);
    }
}

/// A socket the daemon does not expect beside its listener (a stream
/// socket under a name it never gives: a second socket unit's, or one
/// left in the fd store) aborted start-up as if it were a misconfigured
/// listener, and with `Restart=on-failure` the unit soon hit its start
/// limit and the store was gone. It is closed with a warning now; only a
/// wrong socket where the listener should be is refused.
///
/// Closed, it was not removed from the store either: the manager kept it
/// in a slot the daemon did not count, so with the store full by the
/// daemon's count the next record was refused (`EXFULL`) and the one
/// before it removed, leaving no record for a crash to restore from. Its
/// name is removed like any other leftover's now.
#[test]
fn an_unexpected_socket_beside_the_listener_is_closed() {
    // Four buffers and the records' two slots.
    let manager = ServiceManager::with_fd_store_max(6);
    let (stray, _peer) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    manager
        .received()
        .store
        .push(("stray-socket".to_owned(), stray.into()));
    let daemon = Running::start(&manager, "first", &[]);
    assert_logged(&daemon, "closing an unexpected inherited socket");
    manager.wait_for("the stray socket's removal", Duration::from_secs(5), |r| {
        !r.stored_names().iter().any(|n| n == "stray-socket")
    });
    // Fill the buffers' slots, then a change that needs a new record.
    let camera = Client::connect_to(&manager.socket_path).expect("served");
    let frames: Vec<_> = (0..4).map(|_| camera.alloc(4096).expect("alloc")).collect();
    manager.wait_until_recorded(4);
    let seen = manager.received().records_sent();
    let codec = Client::connect_to(&manager.socket_path).expect("codec");
    let _shared = codec
        .import(&frames[0].export().expect("export"))
        .expect("a change that needs a new record");
    manager.wait_for_record_after(seen);
    let r = manager.received();
    assert!(
        r.refused.is_empty(),
        "the store was overfilled: it refused {:?}; store {:?}",
        r.refused,
        r.stored_names()
    );
    assert!(
        r.stored_names().iter().any(|n| n.starts_with("state-")),
        "no record in the store: {:?}",
        r.stored_names()
    );
}

/// Without a socket unit (supported: the daemon binds a socket of its
/// own), the first socket of the wrong kind the fd store handed over was
/// taken for a misconfigured listener and start-up failed, every restart
/// again until the start limit, which loses the store. Only a socket
/// unit's socket (its fds come first, named after the unit) can be that
/// listener: a socket from the store is a leftover, closed and removed.
#[test]
fn a_socket_in_the_fd_store_without_a_socket_unit_is_a_leftover() {
    let manager = ServiceManager::new().without_socket_unit();
    let (stray, _peer) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    manager
        .received()
        .store
        .push(("stray-socket".to_owned(), stray.into()));
    let own = manager.dir.path().join("own-socket");
    let own_arg = own.display().to_string();
    let daemon = Running::start_with(&manager, "first", &[], &["--socket", &own_arg]);
    let client = Client::connect_to(&own).expect("served on its own socket");
    drop(client.alloc(4096).expect("alloc"));
    assert_logged(&daemon, "closing an unexpected inherited socket");
    manager.wait_for("the stray socket's removal", Duration::from_secs(5), |r| {
        !r.stored_names().iter().any(|n| n == "stray-socket")
    });
}

/// `DMABROKER_TEST_RECORD_REOFFER_MS` is read in every build, and at `0`
/// the writer offered its record to the manager in a tight loop, one
/// datagram after another to PID 1. The period is bounded below now, and
/// the hook, like the other test hook, is warned about at start.
#[test]
fn a_zero_record_reoffer_period_does_not_flood_the_manager() {
    let manager = ServiceManager::new();
    let first = Running::start(
        &manager,
        "first",
        &[("DMABROKER_TEST_RECORD_REOFFER_MS", "0")],
    );
    let camera = Client::connect_to(&manager.socket_path).expect("camera");
    let _frame = camera.alloc(4096).expect("alloc");
    manager.wait_until_recorded(1);
    let before = manager.received().records_sent();
    std::thread::sleep(Duration::from_millis(500));
    let offered = manager.received().records_sent() - before;
    // 50 ms at the shortest: ten in 500 ms, with room for scheduling.
    assert!(offered <= 12, "{offered} record datagrams in 500 ms");
    assert_logged(&first, "test hook: the stored record is offered");
}

/// systemd checks its store's maximum before it looks for the same file
/// (`service_add_fd_store`: `EXFULL` first), so a record offered again to
/// a store it counts full is refused although it holds it, with a warning
/// in PID 1's log. That lasts for as long as the store stays full (a
/// lowered `FileDescriptorStoreMax=`, until buffers are freed), and the
/// writer offered it again every period all that while. The offers of an
/// unchanged record back off now, doubling the wait each time.
#[test]
fn offers_of_a_record_to_a_store_the_manager_counts_full_back_off() {
    let manager = ServiceManager::new();
    let reoffer = [("DMABROKER_TEST_RECORD_REOFFER_MS", "200")];
    let _first = Running::start(&manager, "first", &reoffer);
    let camera = Client::connect_to(&manager.socket_path).expect("camera");
    let _frames: Vec<_> = (0..2).map(|_| camera.alloc(4096).expect("alloc")).collect();
    manager.wait_until_recorded(2);
    // Lowered under the running daemon: full as it stands, record in.
    {
        let mut r = manager.received();
        r.store_max = Some(r.stored_fds());
    }
    std::thread::sleep(Duration::from_millis(3000));
    let r = manager.received();
    let refused = r.refused.iter().filter(|n| n.starts_with("state-")).count();
    // Every 200 ms: about 15. Doubling from 200 ms: at 200, 600, 1400
    // and 3000 ms.
    assert!(
        (1..=4).contains(&refused),
        "{refused} offers refused in 3 s: {:?}",
        r.refused
    );
    assert!(
        r.stored_names().iter().any(|n| n.starts_with("state-")),
        "{:?}",
        r.stored_names()
    );
}

/// An offer of the record again waits up to a second for room in a busy
/// manager's queue, and a stop during it waited that out before the last
/// record was written (and the daemon could exit). The offer looks at the
/// stop every 50 ms now.
#[test]
fn a_stop_during_an_offer_of_the_record_is_not_held_up() {
    const PERIOD_MS: u64 = 300;
    // A restart: a stop for good would then take the buffer out of the
    // store, which waits for the busy manager too.
    let systemd = Systemd1::start(UnitJob::Running("restart"));
    let bus = systemd.env();
    let manager = ServiceManager::new();
    let reoffer = [
        ("DMABROKER_TEST_RECORD_REOFFER_MS", "300"),
        (bus.0, bus.1.as_str()),
    ];
    let mut first = Running::start(&manager, "first", &reoffer);
    let camera = Client::connect_to(&manager.socket_path).expect("camera");
    let _frame = camera.alloc(4096).expect("alloc");
    manager.wait_until_recorded(1);
    let stopped_in = {
        let _busy = manager.busy();
        // An offer that found no room all its second: the next comes after
        // the period doubled once for every offer so far, and also waits
        // its second out.
        wait_for_log(&first, "cannot offer the record again");
        let offers = {
            let log = first.log();
            log.matches("the stored record was offered to the fd store again")
                .count()
                + log.matches("cannot offer the record again").count()
        };
        let next_in = Duration::from_millis(PERIOD_MS << offers);
        std::thread::sleep(next_in + Duration::from_millis(200));
        let pid = nix::unistd::Pid::from_raw(first.pid() as i32);
        let signalled = Instant::now();
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        assert!(
            first.child.wait().expect("wait").success(),
            "{}",
            first.log()
        );
        signalled.elapsed()
    };
    // Its STOPPING=1 found no room either, and waits 1 s for it; the
    // offer under way had 800 ms left.
    assert!(
        stopped_in < Duration::from_millis(1500),
        "stopped in {stopped_in:?}:\n{}",
        first.log()
    );
}

/// SIGTERM to `daemon`, as systemd's stop of the unit sends it.
fn terminate(daemon: &Running) {
    let pid = nix::unistd::Pid::from_raw(daemon.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
}

/// SIGTERM to `daemon`, and its exit, which must be a success.
#[track_caller]
fn stop_cleanly(daemon: &mut Running) {
    terminate(daemon);
    assert!(
        daemon.child.wait().expect("wait").success(),
        "{}",
        daemon.log()
    );
}

/// What `daemon` asks systemd's stand-in once, of a unit with a job.
fn questions_with_a_job(daemon: &Running) -> [String; 3] {
    [
        format!("GetUnitByPID {}", daemon.pid()),
        "Job".into(),
        "JobType".into(),
    ]
}

/// The name of every `FDSTOREREMOVE=1`, with its place among the
/// messages.
fn removals(r: &Received) -> Vec<(usize, String)> {
    r.messages
        .iter()
        .enumerate()
        .filter(|(_, (_, m))| m.lines().any(|l| l == "FDSTOREREMOVE=1"))
        .filter_map(|(i, (_, m))| {
            m.lines()
                .find_map(|l| l.strip_prefix("FDNAME="))
                .map(|name| (i, name.to_owned()))
        })
        .collect()
}

/// Fails unless each of `ids` was removed from the store, nothing was
/// stored after the first removal, a `BARRIER=1` came after the last
/// removal, and the store holds no buffer and no record any more: a stop
/// for good left systemd nothing to close.
fn assert_taken_out(manager: &ServiceManager, ids: &[u64], daemon: &Running) {
    let r = manager.received();
    let removed = removals(&r);
    for id in ids {
        assert!(
            removed.iter().any(|(_, name)| *name == format!("buf-{id}")),
            "buf-{id} was not removed from the store: {removed:?}\n{}",
            daemon.log()
        );
    }
    let first = removed.iter().map(|(i, _)| *i).min().unwrap_or(0);
    assert!(
        r.messages[first..]
            .iter()
            .all(|(_, m)| !m.lines().any(|l| l == "FDSTORE=1")),
        "stored after the removals: {:?}\n{}",
        r.messages,
        daemon.log()
    );
    let last = removed.iter().map(|(i, _)| *i).max().unwrap_or(0);
    assert!(
        r.messages[last..]
            .iter()
            .any(|(_, m)| m.lines().any(|l| l == "BARRIER=1")),
        "no barrier behind the removals: {:?}\n{}",
        r.messages,
        daemon.log()
    );
    assert!(
        r.stored_names()
            .iter()
            .all(|n| !n.starts_with("buf-") && !n.starts_with("state-")),
        "left in the store: {:?}\n{}",
        r.stored_names(),
        daemon.log()
    );
}

/// Buffers of a client that holds them across the stop, for the store.
fn frames(manager: &ServiceManager) -> (Client, Vec<dmabroker_client::Buffer>) {
    let camera = Client::connect_to(&manager.socket_path).expect("camera");
    let frames: Vec<_> = (0..3)
        .map(|i| {
            let frame = camera.alloc(4096).expect("alloc");
            let mut w = frame.begin(Access::CpuWrite).expect("begin");
            w.bytes_mut().expect("bytes").fill(i + 1);
            drop(w);
            frame
        })
        .collect();
    manager.wait_until_recorded(frames.len());
    (camera, frames)
}

/// `systemctl stop` (a stop job): systemd closes the unit's fd store once
/// the daemon has exited, and its close of a dma-buf no client holds any
/// more was that buffer's last release, which a client can make wait for
/// good (an epoll watching the buffer, its lock held): PID 1 hung. Now
/// every buffer and record is taken out of the store first, and the
/// daemon exits only once the manager has read a barrier behind the
/// removals (held here, as a busy PID 1 would).
#[test]
fn a_stop_takes_every_buffer_out_of_the_store_before_the_daemon_exits() {
    let systemd = Systemd1::start(UnitJob::Running("stop"));
    let bus = systemd.env();
    let manager = ServiceManager::new();
    let mut first = Running::start(&manager, "first", &[(bus.0, &bus.1)]);
    let (_camera, frames) = frames(&manager);
    let held = manager.hold_reading();
    terminate(&first);
    dmabroker_suite::eventually("the daemon to ask for its job's type", || {
        systemd.asked().iter().any(|q| q == "JobType")
    });
    // Its removals and the barrier wait in the manager's queue: the
    // daemon, which waits up to 10 s for them to be read, is still there.
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        first.child.try_wait().expect("try_wait").is_none(),
        "the daemon exited before the manager read its removals:\n{}",
        first.log()
    );
    drop(held);
    assert!(
        first.child.wait().expect("wait").success(),
        "{}",
        first.log()
    );
    assert_eq!(systemd.asked(), questions_with_a_job(&first));
    let ids: Vec<u64> = frames.iter().map(|f| f.id()).collect();
    assert_taken_out(&manager, &ids, &first);
    let log = first.log();
    assert!(log.contains("the unit is not being restarted"), "{log}");
    assert!(log.contains("has a stop job"), "{log}");
    assert!(
        log.contains("the service manager has read the removals"),
        "{log}"
    );
}

/// `systemctl restart` (a restart job): the store is handed to the next
/// instance, so nothing is taken out of it and every buffer comes back.
#[test]
fn a_restart_leaves_every_buffer_in_the_store_for_the_next_instance() {
    let systemd = Systemd1::start(UnitJob::Running("restart"));
    let bus = systemd.env();
    let manager = ServiceManager::new();
    let mut first = Running::start(&manager, "first", &[(bus.0, &bus.1)]);
    let (camera, frames) = frames(&manager);
    stop_cleanly(&mut first);
    // Asked again once the last record was written: still a restart.
    let once = questions_with_a_job(&first);
    assert_eq!(
        systemd.asked(),
        [once.clone(), once].concat(),
        "{}",
        first.log()
    );
    {
        let r = manager.received();
        let removed = removals(&r);
        assert!(
            removed.iter().all(|(_, name)| !name.starts_with("buf-")),
            "buffers were taken out of the store: {removed:?}"
        );
        assert_eq!(r.buffers_stored(), frames.len(), "{:?}", r.stored_names());
    }
    assert_logged(&first, "restarting the unit");

    let second = Running::start(&manager, "second", &[]);
    for (i, frame) in frames.iter().enumerate() {
        assert_back(frame, &second);
        let read = frame.begin(Access::CpuRead).expect("read after restart");
        assert!(read
            .bytes()
            .expect("bytes")
            .iter()
            .all(|b| *b == i as u8 + 1));
    }
    assert_eq!(camera.reconnects(), 1);
}

/// A SIGTERM with no job for the unit (`kill`, not `systemctl`): the
/// daemon exits 0, which `Restart=on-failure` does not restart, and
/// systemd closes the store. Taken out first.
#[test]
fn a_sigterm_with_no_job_takes_every_buffer_out_of_the_store() {
    let systemd = Systemd1::start(UnitJob::None);
    let bus = systemd.env();
    let manager = ServiceManager::new();
    let mut first = Running::start(&manager, "first", &[(bus.0, &bus.1)]);
    let (_camera, frames) = frames(&manager);
    stop_cleanly(&mut first);
    assert_eq!(
        systemd.asked(),
        [format!("GetUnitByPID {}", first.pid()), "Job".into()]
    );
    let ids: Vec<u64> = frames.iter().map(|f| f.id()).collect();
    assert_taken_out(&manager, &ids, &first);
    assert!(first.log().contains("has no job"), "{}", first.log());
}

/// No systemd to ask (a bus without it, as in a container, or no bus at
/// all): the daemon cannot know a restart is coming, and PID 1's safety
/// comes first.
#[test]
fn a_sigterm_with_no_systemd_on_the_bus_takes_every_buffer_out_of_the_store() {
    let bus = Systemd1::absent();
    let manager = ServiceManager::new();
    let mut first = Running::start(
        &manager,
        "first",
        &[("DBUS_SYSTEM_BUS_ADDRESS", bus.address())],
    );
    let (_camera, frames) = frames(&manager);
    stop_cleanly(&mut first);
    let ids: Vec<u64> = frames.iter().map(|f| f.id()).collect();
    assert_taken_out(&manager, &ids, &first);
    assert_logged(&first, "systemd does not say which unit");
}

/// A bus that never answers (going away at shutdown): the daemon asks for
/// a second at most, then takes the buffers out; its exit is not held up
/// beyond that.
#[test]
fn a_bus_that_never_answers_holds_the_stop_up_a_second_and_the_buffers_are_taken_out() {
    let systemd = Systemd1::start(UnitJob::Silent);
    let bus = systemd.env();
    let manager = ServiceManager::new();
    let mut first = Running::start(&manager, "first", &[(bus.0, &bus.1)]);
    let (_camera, frames) = frames(&manager);
    let signalled = Instant::now();
    stop_cleanly(&mut first);
    let stopped_in = signalled.elapsed();
    assert_eq!(systemd.asked(), [format!("GetUnitByPID {}", first.pid())]);
    let ids: Vec<u64> = frames.iter().map(|f| f.id()).collect();
    assert_taken_out(&manager, &ids, &first);
    assert_logged(&first, "no answer within 1s");
    // The question's second, and the last record's writing beside it;
    // far from the 10 s the removals could wait for a busy manager.
    assert!(
        stopped_in < Duration::from_secs(6),
        "stopped in {stopped_in:?}:\n{}",
        first.log()
    );
}

/// Under a user manager (`systemctl --user`), which sets `$MANAGERPID`,
/// the manager to ask is on the session bus, not the system bus: a
/// restart there keeps the store too.
#[test]
fn under_a_user_manager_the_session_bus_is_asked() {
    let systemd = Systemd1::start(UnitJob::Running("restart"));
    let (_, address) = systemd.env();
    let manager = ServiceManager::new();
    let manager_pid = std::process::id().to_string();
    let mut first = Running::start(
        &manager,
        "first",
        &[
            ("MANAGERPID", &manager_pid),
            ("DBUS_SESSION_BUS_ADDRESS", &address),
        ],
    );
    let (_camera, frames) = frames(&manager);
    stop_cleanly(&mut first);
    assert_eq!(systemd.asked().len(), 6, "{}", first.log());
    let r = manager.received();
    assert!(
        removals(&r)
            .iter()
            .all(|(_, name)| !name.starts_with("buf-")),
        "{:?}",
        removals(&r)
    );
    assert_eq!(r.buffers_stored(), frames.len());
}

/// A restart job replaced by `systemctl stop` while the daemon wrote its
/// last record (seconds, with a busy manager): the daemon acted on the
/// answer it had at the signal, left the store full to a unit stopped for
/// good, and PID 1 made the buffers' last releases. A restart is asked
/// about again right before the store is left to it.
#[test]
fn a_restart_replaced_by_a_stop_during_the_last_record_takes_every_buffer_out() {
    let systemd = Systemd1::replaced_after_first_answer(
        UnitJob::Running("restart"),
        UnitJob::Running("stop"),
    );
    let bus = systemd.env();
    let manager = ServiceManager::new();
    let mut first = Running::start(&manager, "first", &[(bus.0, &bus.1)]);
    let (_camera, frames) = frames(&manager);
    stop_cleanly(&mut first);
    let once = questions_with_a_job(&first);
    assert_eq!(
        systemd.asked(),
        [once.clone(), once].concat(),
        "{}",
        first.log()
    );
    let ids: Vec<u64> = frames.iter().map(|f| f.id()).collect();
    assert_taken_out(&manager, &ids, &first);
    let log = first.log();
    assert!(log.contains("is not running any more"), "{log}");
    assert!(log.contains("has a stop job"), "{log}");
}

/// A stop for good spent up to seconds putting the last record (and
/// buffers still out of the store) into the store, only to take them all
/// out again. The question comes first now: told it is no restart, the
/// daemon stores nothing more after its `STOPPING=1`, though the table
/// changed right before the signal.
#[test]
fn a_stop_for_good_puts_nothing_more_in_the_store() {
    let systemd = Systemd1::start(UnitJob::Running("stop"));
    let bus = systemd.env();
    let manager = ServiceManager::new();
    let mut first = Running::start(&manager, "first", &[(bus.0, &bus.1)]);
    let (camera, mut frames) = frames(&manager);
    // Within the 50 ms before its record would be written.
    frames.push(camera.alloc(4096).expect("alloc"));
    stop_cleanly(&mut first);
    let ids: Vec<u64> = frames.iter().map(|f| f.id()).collect();
    assert_taken_out(&manager, &ids, &first);
    let r = manager.received();
    let stopping = r
        .messages
        .iter()
        .position(|(_, m)| m.lines().any(|l| l == "STOPPING=1"))
        .expect("STOPPING=1");
    let stored: Vec<&String> = r.messages[stopping..]
        .iter()
        .filter(|(_, m)| m.lines().any(|l| l == "FDSTORE=1"))
        .map(|(_, m)| m)
        .collect();
    assert!(
        stored.is_empty(),
        "stored after STOPPING=1: {stored:?}\n{}",
        first.log()
    );
}

/// The loop accepting clients ended (a panic stands in for a bug in it):
/// the daemon exited 0 without a word, which `Restart=on-failure` does not
/// restart, and systemd closed a store full of buffers (the hang a stop
/// for good avoids). It exits with a failure now, which the unit restarts
/// with the store as it is, the last record written first: the buffers
/// come back, as after a crash.
#[test]
fn an_accept_loop_that_ends_exits_with_a_failure_and_leaves_the_store_to_the_restart() {
    let systemd = Systemd1::start(UnitJob::None);
    let bus = systemd.env();
    let manager = ServiceManager::new();
    let mut first = Running::start(
        &manager,
        "first",
        &[
            (bus.0, &bus.1),
            ("DMABROKER_TEST_ACCEPT_PANIC_AFTER_MS", "1500"),
        ],
    );
    let (camera, frames) = frames(&manager);
    let status = first.child.wait().expect("wait");
    assert_eq!(status.code(), Some(1), "{}", first.log());
    // Asked whether a stop came meanwhile: no job runs.
    assert_eq!(
        systemd.asked(),
        [format!("GetUnitByPID {}", first.pid()), "Job".into()],
        "{}",
        first.log()
    );
    {
        let r = manager.received();
        assert!(removals(&r).is_empty(), "{:?}", removals(&r));
        assert_eq!(r.count("STOPPING=1"), 0, "{:?}", r.messages);
        assert_eq!(r.buffers_stored(), frames.len(), "{:?}", r.stored_names());
    }
    assert_logged(&first, "exiting with a failure");

    let second = Running::start(&manager, "second", &[]);
    for frame in &frames {
        assert_back(frame, &second);
    }
    assert_eq!(camera.reconnects(), 1);
}

/// A `systemctl stop` while the accept loop's failure was being handled
/// (its last record written) was not seen: the signal is read no more,
/// and with a stop job running systemd restarts nothing, whatever the
/// exit, and closed the store full. The daemon asks once the record is
/// written, and a stop job takes every buffer out.
#[test]
fn a_stop_while_a_failed_accept_loop_is_handled_takes_every_buffer_out() {
    let systemd = Systemd1::start(UnitJob::Running("stop"));
    let bus = systemd.env();
    let manager = ServiceManager::new();
    let mut first = Running::start(
        &manager,
        "first",
        &[
            (bus.0, &bus.1),
            ("DMABROKER_TEST_ACCEPT_PANIC_AFTER_MS", "1500"),
        ],
    );
    let (_camera, frames) = frames(&manager);
    let status = first.child.wait().expect("wait");
    assert_eq!(status.code(), Some(1), "{}", first.log());
    let ids: Vec<u64> = frames.iter().map(|frame| frame.id()).collect();
    assert_taken_out(&manager, &ids, &first);
}

/// A record's writer that overran its time at a stop (its blocking task
/// not yet run) sent its record after the daemon had taken every name out
/// of the store: the manager kept that record, and closed it as the last
/// holder. Here the restart job is replaced by a stop while the last
/// record is written, the writer is held past its bound (7 s) and wakes
/// while the removals wait in the held manager's queue: its record is
/// refused, not queued behind them.
#[test]
fn a_record_written_late_at_a_stop_for_good_does_not_follow_the_removals() {
    let systemd = Systemd1::replaced_after_first_answer(
        UnitJob::Running("restart"),
        UnitJob::Running("stop"),
    );
    let bus = systemd.env();
    let manager = ServiceManager::new();
    let mut first = Running::start(
        &manager,
        "first",
        &[
            (bus.0, &bus.1),
            ("DMABROKER_TEST_LAST_RECORD_STALL_MS", "9000"),
        ],
    );
    let camera = Client::connect_to(&manager.socket_path).expect("camera");
    // Within the 50 ms before its record would be written: the last
    // record has it.
    let frame = camera.alloc(4096).expect("alloc");
    let held = manager.hold_reading();
    terminate(&first);
    // The daemon gives up on the writer at 6 s, the writer wakes at 9 s
    // (margins of seconds, for a loaded machine); the removals and the
    // barrier wait in the queue meanwhile, for up to 11 s more.
    std::thread::sleep(Duration::from_millis(10_500));
    assert!(
        first.child.try_wait().expect("try_wait").is_none(),
        "the daemon exited before the manager read its removals:\n{}",
        first.log()
    );
    drop(held);
    assert!(
        first.child.wait().expect("wait").success(),
        "{}",
        first.log()
    );
    assert_taken_out(&manager, &[frame.id()], &first);
    assert_logged(
        &first,
        "the last record of the buffer table was not written in time",
    );
}

/// journald's native protocol, as far as a datagram of `KEY=value` lines
/// and length-prefixed binary values goes (systemd's `journal-native`
/// documentation): the fields of one entry.
fn journal_fields(datagram: &[u8]) -> std::collections::HashMap<String, String> {
    let mut fields = std::collections::HashMap::new();
    let mut rest = datagram;
    while !rest.is_empty() {
        let line_end = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
        let line = &rest[..line_end];
        if let Some(eq) = line.iter().position(|&b| b == b'=') {
            fields.insert(
                String::from_utf8_lossy(&line[..eq]).into_owned(),
                String::from_utf8_lossy(&line[eq + 1..]).into_owned(),
            );
            rest = rest.get(line_end + 1..).unwrap_or_default();
        } else {
            // KEY\n, a little-endian u64 length, the value, \n.
            let after = rest.get(line_end + 1..).unwrap_or_default();
            let (len, value) = after.split_at(8.min(after.len()));
            let len = u64::from_le_bytes(len.try_into().expect("a value's length")) as usize;
            fields.insert(
                String::from_utf8_lossy(line).into_owned(),
                String::from_utf8_lossy(&value[..len]).into_owned(),
            );
            rest = value.get(len + 1..).unwrap_or_default();
        }
    }
    fields
}

/// A daemon in a mount namespace of its own whose
/// `/run/systemd/journal` is `journal` (a folder of the test's, where
/// it may bind a socket; `None`: an empty folder, no journal), with
/// `$JOURNAL_STREAM` set to the device and inode of its fd `stream_fd`
/// (2 for its stderr, the harness's log file). tracing-journald sends to
/// the fixed path `/run/systemd/journal/socket`.
fn daemon_with_journal(journal: Option<&std::path::Path>, stream_fd: u8) -> Daemon {
    let bind = match journal {
        Some(folder) => format!(
            "mount --bind '{}' /run/systemd/journal && ",
            folder.display()
        ),
        None => String::new(),
    };
    let script = format!(
        "mount -t tmpfs dmabroker-test /run && mkdir -p /run/systemd/journal && {bind}\
         export JOURNAL_STREAM=\"$(stat -L -c %d:%i /proc/self/fd/{stream_fd})\" && exec \"$@\""
    );
    Daemon::start_with(DaemonOptions {
        args: vec!["--dbus".into(), "none".into()],
        wrapper: vec![
            "unshare".into(),
            "--mount".into(),
            "--propagation".into(),
            "private".into(),
            "sh".into(),
            "-c".into(),
            script,
            "sh".into(),
        ],
        ..Default::default()
    })
}

/// operations.md: logs go to the journal with structured fields (`CLIENT`,
/// `BUFFER`, ...) when stderr is the stream `$JOURNAL_STREAM` names, and
/// only then; if the journal cannot be reached, the daemon says so and
/// logs to stderr. No journald runs here: the test binds the journal's
/// socket itself, in a mount namespace of the daemon's own, and reads
/// the native protocol's datagrams.
#[test]
fn logs_go_to_the_journal_only_when_stderr_is_its_stream() {
    if !dmabroker_suite::have_root("logs to the journal (a mount namespace of the daemon's own)") {
        return;
    }
    let folder = TempDir::new("journal");
    let journal = std::os::unix::net::UnixDatagram::bind(folder.path().join("socket"))
        .expect("bind the journal socket");
    journal
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("SO_RCVTIMEO");
    // The next entry whose message is `message`, with a field of value
    // `value` (the harness's own connection, to see that the daemon is
    // ready, is logged too).
    let entry = |message: &str, value: &str| loop {
        let mut datagram = vec![0u8; 65536];
        let len = journal
            .recv(&mut datagram)
            .unwrap_or_else(|e| panic!("no '{message}' entry in the journal: {e}"));
        let fields = journal_fields(&datagram[..len]);
        if fields.get("MESSAGE").map(String::as_str) == Some(message)
            && fields.values().any(|v| v == value)
        {
            return fields;
        }
    };

    let daemon = daemon_with_journal(Some(folder.path()), 2);
    let mut client = Scripted::spawn(daemon.socket(), &[]);
    let connected = entry("client connected", &client.pid().to_string());
    assert_eq!(
        connected.get("SYSLOG_IDENTIFIER").map(String::as_str),
        Some("dmabrokerd"),
        "{connected:?}"
    );
    assert_eq!(
        connected.get("PID").map(String::as_str),
        Some(client.pid().to_string().as_str()),
        "the client's pid as a field of its own: {connected:?}"
    );
    assert!(
        connected
            .get("CLIENT")
            .is_some_and(|id| id.parse::<u64>().is_ok()),
        "{connected:?}"
    );
    let id = field(&client.ok("alloc 4096"), "id")
        .expect("id")
        .to_owned();
    client.ok(&format!("free {id}"));
    let freed = entry("buffer freed", &id);
    assert_eq!(freed.get("BUFFER"), Some(&id), "{freed:?}");
    assert!(
        !daemon.log().contains("client connected"),
        "logged to stderr too:\n{}",
        daemon.log()
    );
    drop(client);
    drop(daemon);
    // What it sent until it was killed.
    journal.set_nonblocking(true).expect("O_NONBLOCK");
    let mut datagram = vec![0u8; 65536];
    while journal.recv(&mut datagram).is_ok() {}

    // `$JOURNAL_STREAM` inherited, naming another stream (its stdin,
    // /dev/null): stderr it is, and nothing reaches the journal.
    let daemon = daemon_with_journal(Some(folder.path()), 0);
    let _client = Scripted::spawn(daemon.socket(), &[]);
    dmabroker_suite::eventually("the connect logged on stderr", || {
        daemon.log().contains("client connected")
    });
    match journal.recv(&mut datagram) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        Err(e) => panic!("the journal socket: {e}"),
        Ok(len) => panic!(
            "an entry reached the journal: {:?}",
            journal_fields(&datagram[..len])
        ),
    }
    drop(daemon);

    // The stream is stderr but no journal listens: it says so, and logs
    // to stderr.
    let daemon = daemon_with_journal(None, 2);
    let _client = Scripted::spawn(daemon.socket(), &[]);
    dmabroker_suite::eventually("the connect logged on stderr", || {
        daemon.log().contains("client connected")
    });
    assert!(
        daemon
            .log()
            .starts_with("dmabrokerd: journal unavailable ("),
        "{}",
        daemon.log()
    );
}
