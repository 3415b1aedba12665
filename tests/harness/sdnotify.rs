//! A stand-in for the service manager, speaking systemd's real protocols:
//! it owns the listening socket (like a `.socket` unit), receives
//! `NOTIFY_SOCKET` datagrams (`READY=1`, `STATUS=`, `WATCHDOG=1`,
//! `STOPPING=1`, `FDSTORE=1` with fds and `FDNAME=`, `FDSTOREREMOVE=1`),
//! keeps the fd store, and starts the daemon with `LISTEN_FDS`,
//! `LISTEN_FDNAMES` and `LISTEN_PID` exactly as systemd passes them.
//!
//! The store is kept as systemd keeps it: one list, each new fd put first
//! (`LIST_PREPEND` in `service_add_fd_store`), handed over in that order,
//! so the newest first; several fds may share a name, and
//! `FDSTOREREMOVE=1` removes every fd of the name.
//!
//! With a store maximum ([`ServiceManager::with_fd_store_max`]) it behaves
//! as systemd does with `FileDescriptorStoreMax=`: it tells the daemon the
//! maximum in `$FDSTORE` (systemd ≥ 254), and an fd sent to a full store
//! is closed, silently for the sender ("Hit fd store limit", `EXFULL`, in
//! systemd's log only), even one of a file the store holds already: the
//! maximum is checked before the store is searched for the same file.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::sys::socket::{
    bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
};

use crate::tmp::TempDir;

/// What the daemon told the manager, in order.
#[derive(Debug, Default)]
pub struct Received {
    /// The manager reads nothing while set (see [`ServiceManager::busy`]).
    paused: bool,
    /// How long the manager takes over each datagram (a slow PID 1).
    pub read_delay: Duration,
    /// The reader is parked, holding the datagram it read last.
    parked: bool,
    pub messages: Vec<(Instant, String)>,
    /// The fd store as systemd keeps it: the newest first.
    pub store: Vec<(String, OwnedFd)>,
    /// `FileDescriptorStoreMax=`, when the store is bounded.
    pub store_max: Option<usize>,
    /// Names of the fds a full store refused (and closed), in order.
    pub refused: Vec<String>,
}

impl Received {
    pub fn count(&self, line: &str) -> usize {
        self.messages
            .iter()
            .filter(|(_, m)| m.lines().any(|l| l == line))
            .count()
    }

    pub fn times_of(&self, line: &str) -> Vec<Instant> {
        self.messages
            .iter()
            .filter(|(_, m)| m.lines().any(|l| l == line))
            .map(|(t, _)| *t)
            .collect()
    }

    pub fn statuses(&self) -> Vec<String> {
        self.messages
            .iter()
            .flat_map(|(_, m)| {
                m.lines()
                    .filter_map(|l| l.strip_prefix("STATUS="))
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// How many records (`state-*`) the daemon has sent to the store.
    pub fn records_sent(&self) -> usize {
        self.record_times().len()
    }

    /// When each record (`state-*`) was sent to the store, in order.
    pub fn record_times(&self) -> Vec<Instant> {
        self.messages
            .iter()
            .filter(|(_, m)| {
                m.lines().any(|l| l == "FDSTORE=1")
                    && m.lines().any(|l| l.starts_with("FDNAME=state-"))
            })
            .map(|(t, _)| *t)
            .collect()
    }

    /// How many buffers (`buf-*`) are in the store.
    pub fn buffers_stored(&self) -> usize {
        self.stored_names()
            .iter()
            .filter(|n| n.starts_with("buf-"))
            .count()
    }

    /// The name of every fd in the store, the newest first (a name twice
    /// if two fds have it).
    pub fn stored_names(&self) -> Vec<String> {
        self.store.iter().map(|(name, _)| name.clone()).collect()
    }

    /// Fds in the store, whatever their names.
    pub fn stored_fds(&self) -> usize {
        self.store.len()
    }

    /// Stores `fds` under `name` as systemd's `service_add_fd_store_set`
    /// does: one at a time, and once the store is full the rest are closed.
    fn store_fds(&mut self, name: String, fds: Vec<OwnedFd>) {
        for fd in fds {
            // The maximum first, as `service_add_fd_store` checks it
            // (`EXFULL`) before it looks for the same file: a full store
            // refuses even an fd of a file it holds, with a warning in
            // systemd's log.
            if self.store_max.is_some_and(|max| self.stored_fds() >= max) {
                self.refused.push(name.clone());
                drop(fd);
                continue;
            }
            // systemd keeps one entry per open file: an fd of a file it
            // holds already is closed (`service_add_fd_store`, same_fd()).
            if self.store.iter().any(|(_, held)| same_file(held, &fd)) {
                continue;
            }
            self.store.insert(0, (name.clone(), fd));
        }
    }
}

/// See [`ServiceManager::hold_reading`].
#[derive(Debug)]
pub struct HeldReading<'a> {
    manager: &'a ServiceManager,
}

impl Drop for HeldReading<'_> {
    fn drop(&mut self) {
        self.manager.received().paused = false;
        self.manager.received.1.notify_all();
    }
}

/// See [`ServiceManager::busy`].
pub struct Busy<'a> {
    manager: &'a ServiceManager,
    /// Fillers the manager will have read once the queue is drained.
    fillers: usize,
}

impl std::fmt::Debug for Busy<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Busy")
            .field("fillers", &self.fillers)
            .finish()
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.manager.received().paused = false;
        self.manager.received.1.notify_all();
        let fillers = self.fillers;
        self.manager.wait_for(
            "the manager to read its queue",
            Duration::from_secs(5),
            |r| r.count("FILLER=1") >= fillers,
        );
    }
}

#[derive(Debug)]
pub struct ServiceManager {
    pub dir: TempDir,
    pub socket_path: PathBuf,
    listener: OwnedFd,
    /// Whether the daemon is handed the listener, as a socket unit does
    /// (see [`ServiceManager::without_socket_unit`]).
    socket_unit: bool,
    notify_path: PathBuf,
    received: Arc<(Mutex<Received>, Condvar)>,
}

/// Whether two fds are the same open file, as systemd's `same_fd()`
/// decides for its fd store.
fn same_file(a: &OwnedFd, b: &OwnedFd) -> bool {
    let stat = |fd: &OwnedFd| {
        nix::sys::stat::fstat(fd.as_raw_fd())
            .ok()
            .map(|s| (s.st_dev, s.st_ino))
    };
    match (stat(a), stat(b)) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

/// Applies one datagram; returns the fds the manager lets go of (removed
/// from the store, or that came with a message that keeps none, as
/// `BARRIER=1`'s), to be closed once the lock is let go: as in PID 1, such
/// a close may be a file's last release, which can wait.
fn apply(received: &mut Received, text: &str, fds: Vec<OwnedFd>) -> Vec<OwnedFd> {
    let lines: Vec<&str> = text.lines().collect();
    let name = lines
        .iter()
        .find_map(|l| l.strip_prefix("FDNAME="))
        .unwrap_or("stored")
        .to_owned();
    received.messages.push((Instant::now(), text.to_owned()));
    if lines.contains(&"FDSTORE=1") {
        received.store_fds(name, fds);
        Vec::new()
    } else if lines.contains(&"FDSTOREREMOVE=1") {
        let (gone, kept) = std::mem::take(&mut received.store)
            .into_iter()
            .partition(|(stored, _)| *stored == name);
        received.store = kept;
        gone.into_iter().map(|(_, fd)| fd).chain(fds).collect()
    } else {
        fds
    }
}

impl ServiceManager {
    /// Creates the client socket (SOCK_SEQPACKET, as `ListenSequentialPacket=`)
    /// and the notify socket.
    pub fn new() -> ServiceManager {
        Self::with_socket_type(SockType::SeqPacket)
    }

    /// A manager whose fd store holds at most `max` fds
    /// (`FileDescriptorStoreMax=max`).
    pub fn with_fd_store_max(max: usize) -> ServiceManager {
        let manager = Self::new();
        manager.received().store_max = Some(max);
        manager
    }

    /// A service without a socket unit: the daemon is handed only the fd
    /// store and binds a socket of its own (pass it `--socket`, another
    /// path than [`ServiceManager::socket_path`]).
    pub fn without_socket_unit(mut self) -> ServiceManager {
        self.socket_unit = false;
        self
    }

    pub fn with_socket_type(kind: SockType) -> ServiceManager {
        let dir = TempDir::new("sdnotify");
        let socket_path = dir.path().join("socket");
        let listener =
            socket(AddressFamily::Unix, kind, SockFlag::SOCK_CLOEXEC, None).expect("socket");
        bind(
            listener.as_raw_fd(),
            &UnixAddr::new(&socket_path).expect("addr"),
        )
        .expect("bind");
        listen(&listener, Backlog::new(64).expect("backlog")).expect("listen");
        let notify_path = dir.path().join("notify");
        let notify = UnixDatagram::bind(&notify_path).expect("notify socket");
        let received = Arc::new((Mutex::new(Received::default()), Condvar::new()));
        let sink = Arc::clone(&received);
        std::thread::spawn(move || loop {
            let Ok(message) = dmabroker_ipc::fdpass::recv_message(notify.as_fd(), false) else {
                break;
            };
            let text = String::from_utf8_lossy(&message.bytes).into_owned();
            let (lock, cond) = &*sink;
            let mut received = lock.lock().expect("lock");
            while received.paused {
                received.parked = true;
                cond.notify_all();
                received = cond.wait(received).expect("wait");
            }
            received.parked = false;
            let delay = received.read_delay;
            let let_go = apply(&mut received, &text, message.fds);
            cond.notify_all();
            drop(received);
            drop(let_go);
            if !delay.is_zero() {
                std::thread::sleep(delay);
            }
        });
        ServiceManager {
            dir,
            socket_path,
            listener,
            socket_unit: true,
            notify_path,
            received,
        }
    }

    /// The manager busy, as PID 1 at boot: it reads nothing while this
    /// lives, and its notify socket's queue is full
    /// (`net.unix.max_dgram_qlen`), so the daemon's next datagram finds no
    /// room. Dropped, it returns once the manager has read the queue.
    pub fn busy(&self) -> Busy<'_> {
        let read_before = {
            let mut received = self.received();
            received.paused = true;
            received.count("FILLER=1")
        };
        let filler = UnixDatagram::unbound().expect("socket");
        filler.connect(&self.notify_path).expect("connect");
        // Whatever the reader reads next, it parks with it: only then is
        // a full queue sure to stay full.
        filler
            .send(b"FILLER=1\n")
            .expect("a datagram to park the reader on");
        self.wait_for("the manager to stop reading", Duration::from_secs(5), |r| {
            r.parked
        });
        filler.set_nonblocking(true).expect("non-blocking");
        // Room for a queue of any length (`net.unix.max_dgram_qlen` is 512
        // under systemd's sysctl defaults): the filler's own send buffer
        // must not run out first.
        let _ = nix::sys::socket::setsockopt(
            &filler,
            nix::sys::socket::sockopt::SndBufForce,
            &(64 << 20),
        );
        let mut queued = 1;
        while filler.send(b"FILLER=1\n").is_ok() {
            queued += 1;
            assert!(queued < 100_000, "the notify socket's queue never fills");
        }
        let probe = UnixDatagram::unbound().expect("socket");
        probe.connect(&self.notify_path).expect("connect");
        probe.set_nonblocking(true).expect("non-blocking");
        assert!(
            probe.send(b"PROBE=1\n").is_err(),
            "the notify queue is not full after {queued} datagrams"
        );
        Busy {
            manager: self,
            fillers: read_before + queued,
        }
    }

    pub fn received(&self) -> std::sync::MutexGuard<'_, Received> {
        self.received.0.lock().expect("lock")
    }

    /// Waits until `check` holds for what was received.
    /// Holds the manager's reading while it lives, as a PID 1 busy for a
    /// moment: the next datagram waits in the reader, not applied yet.
    /// Dropped, the reader goes on.
    pub fn hold_reading(&self) -> HeldReading<'_> {
        self.received().paused = true;
        HeldReading { manager: self }
    }

    /// Sends `line` to the notify socket, as another service would: read
    /// after everything sent before it.
    pub fn send_marker(&self, line: &str) {
        let sender = UnixDatagram::unbound().expect("socket");
        sender
            .send_to(format!("{line}\n").as_bytes(), &self.notify_path)
            .expect("send a marker");
    }

    /// Whether `check` holds within `timeout` (as [`ServiceManager::wait_for`],
    /// without failing the test). Never waits on the lock while the reader
    /// holds it for long: it holds it only to apply a datagram.
    pub fn seen_within(&self, timeout: Duration, check: impl Fn(&Received) -> bool) -> bool {
        let (lock, cond) = &*self.received;
        let deadline = Instant::now() + timeout;
        let mut received = lock.lock().expect("lock");
        while !check(&received) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            received = cond.wait_timeout(received, left).expect("wait").0;
        }
        true
    }

    pub fn wait_for(&self, what: &str, timeout: Duration, check: impl Fn(&Received) -> bool) {
        let (lock, cond) = &*self.received;
        let deadline = Instant::now() + timeout;
        let mut received = lock.lock().expect("lock");
        while !check(&received) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "timed out waiting for {what}; got {:?}",
                received.messages
            );
            received = cond.wait_timeout(received, left).expect("wait").0;
        }
    }

    /// Waits until `buffers` buffers and a record are in the fd store, then
    /// lets the debounced record catch up with the latest change (an
    /// import, a re-attach), as a broker that dies next would have left it.
    pub fn wait_until_recorded(&self, buffers: usize) {
        self.wait_for(
            "the buffers and their record in the store",
            Duration::from_secs(5),
            |r| {
                r.buffers_stored() == buffers
                    && r.stored_names().iter().any(|n| n.starts_with("state-"))
            },
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    /// Waits until the daemon has sent a record after the first `seen`
    /// (see [`Received::records_sent`]) and then no other for a while. The
    /// first record after a change may have been copied just before it
    /// (the daemon writes one 50 ms after a change, and may have been
    /// writing one already); the change then brings another within the
    /// quiet period.
    pub fn wait_for_record_after(&self, seen: usize) {
        const QUIET: Duration = Duration::from_millis(250);
        self.wait_for("a new record in the store", Duration::from_secs(5), |r| {
            r.records_sent() > seen
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let last = self.received().record_times().last().copied();
            if last.is_some_and(|t| t.elapsed() >= QUIET) {
                return;
            }
            assert!(Instant::now() < deadline, "records kept coming");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the daemon the way systemd would: the listening socket (the
    /// socket unit's fds come first) and every fd in the store passed from
    /// fd 3 on, named, the newest first.
    pub fn start_daemon(
        &self,
        binary: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        log: &Path,
    ) -> Child {
        let received = self.received();
        let store_max = received.store_max;
        let mut fds: Vec<OwnedFd> = Vec::new();
        let mut names: Vec<String> = Vec::new();
        if self.socket_unit {
            fds.push(self.listener.try_clone().expect("dup listener"));
            names.push("dmabroker.socket".to_owned());
        }
        for (name, fd) in &received.store {
            fds.push(fd.try_clone().expect("dup stored fd"));
            names.push(name.clone());
        }
        drop(received);
        // Park the fds above the range they must land in, so that placing
        // them at 3.. in the child can never overwrite one not yet placed.
        let parked: Vec<OwnedFd> = fds
            .iter()
            .map(|fd| {
                let raw =
                    nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(1000))
                        .expect("F_DUPFD_CLOEXEC");
                // SAFETY: fcntl just created `raw` for us.
                unsafe { OwnedFd::from_raw_fd(raw) }
            })
            .collect();
        drop(fds);
        let sources: Vec<i32> = parked.iter().map(|fd| fd.as_raw_fd()).collect();
        let mut cmd = Command::new("sh");
        // `exec` keeps sh's pid, so $$ is the daemon's pid: LISTEN_PID.
        cmd.arg("-c")
            .arg("export LISTEN_PID=$$; exec \"$0\" \"$@\"")
            .arg(binary)
            .args(args)
            .env("LISTEN_FDS", sources.len().to_string())
            .env("LISTEN_FDNAMES", names.join(":"))
            .env("NOTIFY_SOCKET", &self.notify_path)
            // No system bus unless the test gives one (a stand-in for
            // systemd's, tests/harness/systemd1.rs): the daemon asks it
            // at a stop whether the unit is being restarted, and must not
            // ask the host's.
            .env(
                "DBUS_SYSTEM_BUS_ADDRESS",
                format!(
                    "unix:path={}",
                    self.dir.path().join("no-system-bus").display()
                ),
            )
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).expect("log"));
        if let Some(max) = store_max {
            cmd.env("FDSTORE", max.to_string());
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        // SAFETY: the closure runs in the forked child before exec and only
        // calls dup2, which is async-signal-safe; `sources` is a plain Vec
        // of ints owned by this stack frame, read but not allocated there.
        unsafe {
            cmd.pre_exec(move || {
                for (i, src) in sources.iter().enumerate() {
                    if libc::dup2(*src, 3 + i as i32) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("start dmabrokerd");
        drop(parked);
        child
    }
}

impl Default for ServiceManager {
    fn default() -> Self {
        Self::new()
    }
}
