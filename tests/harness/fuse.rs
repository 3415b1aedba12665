//! `harness/stalling_fuse.py`: a FUSE server that never answers some
//! requests, for tests showing that a client who controls a slow file
//! (or an administrator's odd heap node) cannot stall the broker for
//! everyone.

use std::io::BufRead;
use std::os::fd::BorrowedFd;
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};

use crate::TempDir;

/// What the server never answers, besides every `POLL`.
#[derive(Clone, Copy, Debug)]
pub enum Stall {
    /// `GETATTR` from this pid (the daemon).
    GetattrOf(u32),
    /// Every `IOCTL`, saying `ioctl` on its stdout when one arrives.
    Ioctl,
    /// Every `FLUSH` (which every `close(2)` of the file sends and waits
    /// for), saying `flush` on its stdout when one arrives.
    Flush,
}

/// The server mounted on a folder of its own, serving one file, a copy of
/// the testclient. Unmounted on drop; killing it first fails whatever it
/// left waiting.
#[derive(Debug)]
pub struct StallingFuse {
    server: Child,
    /// The server's lines, read on a thread of their own, so that a line
    /// that never comes fails the test rather than hanging it.
    said: std::sync::mpsc::Receiver<String>,
    mnt: PathBuf,
    _dir: TempDir,
}

impl StallingFuse {
    /// `None`, saying why, where the test cannot run (not root, no FUSE).
    pub fn mount(test: &str, stall: Stall) -> Option<StallingFuse> {
        if !crate::have_root(test) {
            return None;
        }
        if !std::path::Path::new("/dev/fuse").exists() {
            dmabroker_daemon::kernel::note_skip(&format!("{test}: this kernel has no /dev/fuse"));
            return None;
        }
        let dir = TempDir::new("fuse");
        let mnt = dir.path().join("m");
        std::fs::create_dir(&mnt).expect("mountpoint");
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/harness/stalling_fuse.py"
        );
        let (stall_pid, stall_ioctl) = match stall {
            Stall::GetattrOf(pid) => (pid, "answer-ioctl"),
            Stall::Ioctl => (0, "stall-ioctl"),
            Stall::Flush => (0, "stall-flush"),
        };
        let mut server = Command::new("python3")
            .arg(script)
            .arg(&mnt)
            .arg(crate::daemon::binary("dmabroker-testclient"))
            .arg(stall_pid.to_string())
            .arg(stall_ioctl)
            .stdout(Stdio::piped())
            .spawn()
            .expect("fuse server");
        let stdout = server.stdout.take().expect("the server's stdout");
        let mut fuse = StallingFuse {
            server,
            said: lines_of(stdout),
            mnt,
            _dir: dir,
        };
        match fuse.next_line() {
            Some(line) if line == "mounted" => {}
            said => {
                // A server that gave up (no right to mount here, say) means
                // the test cannot run; one still running is slow or stuck,
                // which no test may take for a missing feature.
                let status = match fuse.server.try_wait() {
                    Ok(None) => {
                        std::thread::sleep(Duration::from_millis(500));
                        fuse.server.try_wait()
                    }
                    status => status,
                };
                assert!(
                    !matches!(status, Ok(None)),
                    "the FUSE server for {test} did not mount within {SERVER_PATIENCE:?} \
                     (it said {said:?}) and is still running"
                );
                dmabroker_daemon::kernel::note_skip(&format!(
                    "{test}: the FUSE server could not mount (it said {said:?}; \
                     exit status {status:?})"
                ));
                return None;
            }
        }
        Some(fuse)
    }

    /// Its one file, a copy of the testclient.
    pub fn file(&self) -> PathBuf {
        self.mnt.join("client")
    }

    /// Waits until the server says it holds an `IOCTL` unanswered.
    pub fn await_ioctl(&mut self) {
        self.await_held("ioctl");
    }

    /// Waits until the server says it holds a `FLUSH` unanswered: someone
    /// is inside a `close(2)` of the file, for good.
    pub fn await_flush(&mut self) {
        self.await_held("flush");
    }

    /// Waits for the server's line for `request`, past those for POLLs
    /// (which [`HeldEpoll`] waits for, and a test may send more of).
    fn await_held(&mut self, request: &str) {
        loop {
            match self.next_line() {
                Some(line) if line == request => return,
                Some(line) if line == "poll" => continue,
                said => panic!("the FUSE server saw no {request} (it said {said:?})"),
            }
        }
    }

    fn next_line(&mut self) -> Option<String> {
        self.said.recv_timeout(SERVER_PATIENCE).ok()
    }
}

/// How long a test waits for the FUSE server to say something.
const SERVER_PATIENCE: Duration = Duration::from_secs(30);

/// The lines of `stdout`, trimmed, as they come.
fn lines_of(stdout: ChildStdout) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line.trim().to_owned()).is_err() {
                break;
            }
        }
    });
    rx
}

impl Drop for StallingFuse {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
    }
}

/// Whether `client` is answered within `limit` (asked from a thread of its
/// own, which a stalled daemon may leave waiting).
pub fn served_within(client: dmabroker_client::Client, limit: Duration) -> bool {
    answered_within(limit, move || client.heaps().is_ok())
}

/// Whether `ask` returns true within `limit`, run on a thread of its own
/// (left behind if it does not): for a question a stalled daemon would
/// never answer, a connection's hello included.
pub fn answered_within(limit: Duration, ask: impl FnOnce() -> bool + Send + 'static) -> bool {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(ask());
    });
    rx.recv_timeout(limit) == Ok(true)
}

/// An epoll watching a file, whose lock a thread of this process holds
/// for good: the thread adds the FUSE server's file to the epoll, and
/// waits inside for the answer to POLL, which never comes. The last
/// release of the watched file, wherever it happens (no close(2) is
/// needed: the last fd of a freed buffer, a socket's queued message),
/// then waits for that lock. A client can do this to any file it has
/// held that can be polled. Let go of once the server is gone.
#[derive(Debug)]
pub struct HeldEpoll {
    epoll: std::sync::Arc<Epoll>,
    holder: std::thread::JoinHandle<()>,
}

impl HeldEpoll {
    pub fn new(fuse: &mut StallingFuse, watched: BorrowedFd<'_>) -> HeldEpoll {
        HeldEpoll::watching(fuse, &[watched])
    }

    /// As [`HeldEpoll::new`], watching every file of `watched`.
    pub fn watching(fuse: &mut StallingFuse, watched: &[BorrowedFd<'_>]) -> HeldEpoll {
        let file = std::fs::File::open(fuse.file()).expect("open the FUSE file");
        let epoll =
            std::sync::Arc::new(Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).expect("epoll"));
        for fd in watched {
            epoll
                .add(fd, EpollEvent::new(EpollFlags::EPOLLIN, 1))
                .expect("watch the file");
        }
        let held = std::sync::Arc::clone(&epoll);
        let holder = std::thread::spawn(move || {
            let _ = held.add(&file, EpollEvent::new(EpollFlags::EPOLLIN, 2));
        });
        // The server hears the POLL from inside the add, the lock held.
        fuse.await_held("poll");
        HeldEpoll { epoll, holder }
    }

    /// Waits for the holder, which returns once `fuse` is dropped (its
    /// POLL fails then), and closes the epoll.
    pub fn let_go(self, fuse: StallingFuse) {
        drop(fuse);
        let _ = self.holder.join();
        drop(self.epoll);
    }
}

/// Whether a new client of this process's uid is served (connects and
/// lists the heaps) within 10 s (a stalled daemon never answers; a slow
/// machine may take a second).
pub fn new_client_served(daemon: &crate::Daemon) -> bool {
    let socket = daemon.socket().to_owned();
    answered_within(Duration::from_secs(10), move || {
        dmabroker_client::Client::connect_to(&socket)
            .and_then(|c| c.heaps())
            .is_ok()
    })
}
