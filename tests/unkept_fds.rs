//! Fds a client sends that the daemon does not keep. Every `close(2)` of a
//! file on a FUSE mount waits for its server to answer a FLUSH, with no
//! limit and no signal that ends it, and any user who can mount FUSE can
//! send such an fd on any message. Here the server
//! (`harness/stalling_fuse.py`) never answers FLUSH: the daemon must go on
//! serving everyone else, and the fds such a client parks in it must stay
//! bounded. Found by review.

use std::os::fd::{AsFd, BorrowedFd};
use std::time::Duration;

use dmabroker_ipc::{ErrorCode, RequestBody};
use dmabroker_suite::fuse::{new_client_served, HeldEpoll, Stall, StallingFuse};
use dmabroker_suite::raw::RawClient;
use dmabroker_suite::{have_root, Daemon, Scripted};

const ALICE: u32 = 65501;

/// One test at a time: while one holds the FUSE file open, a process
/// another starts would wait for good in its exec, which closes its copy.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    TURN.lock().unwrap_or_else(|p| p.into_inner())
}

/// A daemon anyone may connect to, and the FUSE server.
fn setup(test: &str) -> Option<(StallingFuse, Daemon)> {
    if !have_root(test) {
        return None;
    }
    let daemon = Daemon::start_with(dmabroker_suite::DaemonOptions {
        args: vec!["--socket-mode".into(), "0666".into()],
        ..Default::default()
    });
    let fuse = StallingFuse::mount(test, Stall::Flush)?;
    Some((fuse, daemon))
}

/// The FUSE server and its file, opened here. Once it is open this
/// process must start no other: an exec closes the new program's copy of
/// every fd, and that close would wait for the FLUSH too. Dropped, the
/// server goes first (every FLUSH it holds then fails), the file after,
/// whether the test passed or not.
struct Opened {
    fuse: StallingFuse,
    file: std::fs::File,
}

impl Opened {
    fn new(fuse: StallingFuse) -> Opened {
        let file = std::fs::File::open(fuse.file()).expect("open the FUSE file");
        Opened { fuse, file }
    }
}

fn adopt(raw: &mut RawClient, fd: BorrowedFd<'_>) {
    let (_, bytes) = raw.encode(RequestBody::Adopt { name: None }, 1);
    raw.send_raw(&bytes, &[fd]);
}

/// An fd on a request that takes none, and one to adopt (not a dma-buf):
/// both refused, and the daemon's close of each waits for good, on a
/// thread of its own. It used to close them on the broker's thread, where
/// every client then waited too.
#[test]
fn an_fd_whose_close_never_returns_does_not_stall_the_daemon() {
    let _turn = one_at_a_time();
    let Some((fuse, daemon)) = setup("an fd whose close never returns") else {
        return;
    };
    let mut opened = Opened::new(fuse);
    let mut raw = RawClient::connect(daemon.socket());
    raw.hello();
    let (_, bytes) = raw.encode(RequestBody::ListHeaps, 0);
    raw.send_raw(&bytes, &[opened.file.as_fd()]);
    let refused = raw.recv_reply().map(|(_, answer)| answer);
    opened.fuse.await_flush();
    let served_after_a_stray_fd = new_client_served(&daemon);

    // Its close waits behind the first, on the same uid's thread.
    adopt(&mut raw, opened.file.as_fd());
    let adopted = raw.recv_reply().map(|(_, answer)| answer);
    let served_after_an_adopt = new_client_served(&daemon);
    // The same client goes on too.
    let heaps = raw.request(RequestBody::ListHeaps);

    drop(opened); // every held FLUSH fails now
    assert_eq!(refused, Some(Err(ErrorCode::ProtocolError)));
    assert!(
        served_after_a_stray_fd,
        "another client was not served while the daemon closed a stray fd"
    );
    assert_eq!(adopted, Some(Err(ErrorCode::NotADmaBuf)));
    assert!(
        served_after_an_adopt,
        "another client was not served while the daemon closed a refused adopt's fd"
    );
    assert!(heaps.is_ok(), "{heaps:?}");
}

/// A client that sends such fds again and again parks at most a few
/// dozen in the daemon: past that its connection is read no further until
/// they are closed, while clients of other users are served. Once the
/// server is gone everything is closed and the client read again.
#[test]
fn fds_parked_by_a_client_stay_bounded_and_others_are_served() {
    let _turn = one_at_a_time();
    let Some((fuse, daemon)) = setup("fds parked by a client") else {
        return;
    };
    let baseline = daemon.baseline();
    let mut honest = Scripted::spawn_as(daemon.socket(), ALICE, ALICE, &[]);
    let mut opened = Opened::new(fuse);
    let mut raw = RawClient::connect(daemon.socket());
    raw.hello();
    const SENT: usize = 100;
    for _ in 0..SENT {
        adopt(&mut raw, opened.file.as_fd());
    }
    opened.fuse.await_flush();
    // Past its bound the connection is not read: the count settles, at
    // the bound (64) and the two connections' sockets and pages.
    let parked = dmabroker_suite::proc::stable_fd_count(daemon.pid()) - baseline;
    honest.send("heaps");
    let honest_answer = honest.recv(Duration::from_secs(3));

    drop(opened);
    assert!(
        parked <= 64 + 8,
        "{parked} fds of {SENT} sent parked in the daemon for one client's closes"
    );
    let answer = honest_answer.expect("a client of another user was not served");
    assert!(answer.starts_with("ok heaps="), "{answer}");
    // And the operator is told why the client hangs.
    assert!(
        daemon.log().contains(
            "connection read no further until its user's files waiting to be closed are closed"
        ),
        "{}",
        daemon.log()
    );
    // Read again once they are closed: every adopt is answered.
    for i in 0..SENT {
        let answer = raw.recv_reply().map(|(_, answer)| answer);
        assert_eq!(answer, Some(Err(ErrorCode::NotADmaBuf)), "adopt {i}");
    }
    drop(raw);
    drop(honest);
    daemon.assert_fds_back_to(baseline);
}

/// Sends `fds` on a message declaring none, behind a hello the daemon
/// refuses: it closes the connection with them still queued.
fn send_stray(daemon: &Daemon, fds: &[BorrowedFd<'_>]) -> RawClient {
    let mut raw = RawClient::connect(daemon.socket());
    let (_, bytes) = raw.encode(
        RequestBody::Hello(dmabroker_ipc::Hello {
            version: 0xdead,
            features: 0,
            autofence: None,
            client_name: "stray".into(),
        }),
        0,
    );
    raw.send_raw(&bytes, &[]);
    let (_, bytes) = raw.encode(RequestBody::ListHeaps, 0);
    raw.send_raw(&bytes, fds);
    raw
}

/// Two ways the kernel itself lets go of a client's files on the thread
/// that receives: more fds on a message than it had room for (it used to
/// take 32 and drop the rest itself), and the messages still queued on a
/// connection it closes (a hello refused: read out with no room for fds,
/// or purged by the socket's close). With a file whose last release
/// waits for good, either stalled every client. Now every fd is taken
/// and closed on its uid's thread. Found by review.
#[test]
fn files_the_kernel_would_let_go_of_on_receipt_do_not_stall_the_daemon() {
    let _turn = one_at_a_time();
    if !have_root("files let go of on receipt") {
        return;
    }
    for case in ["a 33rd fd", "a closed connection's queue"] {
        let daemon = Daemon::start();
        let Some(mut fuse) = StallingFuse::mount(case, Stall::GetattrOf(0)) else {
            return;
        };
        let (read_end, _write_end) = nix::unistd::pipe().expect("pipe");
        let held = HeldEpoll::new(&mut fuse, read_end.as_fd());
        let null = std::fs::File::open("/dev/null").expect("/dev/null");
        // Stopped from the last hello it answers until this process's
        // copy is gone: had the daemon closed its copy first, this
        // process's close would be the last release, and wait for good.
        let raw = if case == "a 33rd fd" {
            let mut fds = vec![null.as_fd(); 32];
            fds.push(read_end.as_fd());
            let mut raw = RawClient::connect(daemon.socket());
            raw.hello();
            daemon.signal(nix::sys::signal::Signal::SIGSTOP);
            let (_, bytes) = raw.encode(RequestBody::ListHeaps, 0);
            raw.send_raw(&bytes, &fds);
            raw
        } else {
            daemon.signal(nix::sys::signal::Signal::SIGSTOP);
            send_stray(&daemon, &[read_end.as_fd()])
        };
        // The daemon has the last copy now, in flight.
        drop(read_end);
        daemon.signal(nix::sys::signal::Signal::SIGCONT);
        let served = new_client_served(&daemon);
        held.let_go(fuse);
        drop(raw);
        assert!(served, "{case}: another client was not served");
    }
}

/// A connection the daemon closes (its hello refused) is read out before
/// its socket closes, the fds handed to the uid's closing thread: also
/// only up to the bound. It read out everything, and a client could
/// queue a hundred fds behind a refused hello and park them all.
#[test]
fn a_closed_connection_is_read_out_only_up_to_the_bound() {
    let _turn = one_at_a_time();
    let Some((fuse, daemon)) = setup("a closed connection read out") else {
        return;
    };
    let baseline = daemon.baseline();
    // Of another user: this process's own uid is over the bound by the
    // end, and its connections are read no further until the fds are
    // closed, as they should not be.
    let mut honest = Scripted::spawn_as(daemon.socket(), ALICE, ALICE, &[]);
    let opened = Opened::new(fuse);
    const QUEUED: usize = 100;
    let fds = vec![opened.file.as_fd(); QUEUED];
    // All of it queued before the daemon reads the hello and shuts the
    // connection for reading (sends after that fail).
    daemon.signal(nix::sys::signal::Signal::SIGSTOP);
    let raw = send_stray_each(&daemon, &fds);
    daemon.signal(nix::sys::signal::Signal::SIGCONT);
    // The connection is gone: the count settles.
    let parked = dmabroker_suite::proc::stable_fd_count(daemon.pid()).saturating_sub(baseline);
    honest.send("heaps");
    let served = honest.recv(Duration::from_secs(3));
    drop(opened);
    drop(raw);
    drop(honest);
    assert!(
        parked <= 64 + 8,
        "{parked} fds of {QUEUED} queued behind a refused hello parked in the daemon"
    );
    assert!(
        served.is_some_and(|answer| answer.starts_with("ok heaps=")),
        "a client of another user was not served"
    );
    daemon.assert_fds_back_to(baseline);
}

/// A refused hello, then one message per fd of `fds`, each carrying it.
fn send_stray_each(daemon: &Daemon, fds: &[BorrowedFd<'_>]) -> RawClient {
    let mut raw = send_stray(daemon, &[]);
    for fd in fds {
        let (_, bytes) = raw.encode(RequestBody::ListHeaps, 0);
        raw.send_raw(&bytes, &[*fd]);
    }
    raw
}

/// A connection's socket closes with messages its client queued still in
/// it: the read-out before the close stops at an empty message, which
/// reads like the end. The socket's close then let go, on the broker's
/// thread, of the files the rest carried, and with a file whose last
/// release waits (watched by a held epoll) every client stalled. The
/// daemon now makes a connection's last close on its uid's thread. Found
/// by review.
#[test]
fn a_socket_closed_with_files_still_queued_does_not_stall_the_daemon() {
    let _turn = one_at_a_time();
    if !have_root("a socket closed with files queued") {
        return;
    }
    let daemon = Daemon::start();
    let Some(mut fuse) =
        StallingFuse::mount("a socket closed with files queued", Stall::GetattrOf(0))
    else {
        return;
    };
    let (read_end, _write_end) = nix::unistd::pipe().expect("pipe");
    let held = HeldEpoll::new(&mut fuse, read_end.as_fd());
    let mut raw = RawClient::connect(daemon.socket());
    raw.hello();
    // Queued together: serving ends at the first empty message, the
    // read-out at the second, and the third stays in the socket.
    daemon.signal(nix::sys::signal::Signal::SIGSTOP);
    raw.send_raw(&[], &[]);
    raw.send_raw(&[], &[]);
    let (_, bytes) = raw.encode(RequestBody::ListHeaps, 0);
    raw.send_raw(&bytes, &[read_end.as_fd()]);
    // The daemon's socket has the last copy now.
    drop(read_end);
    daemon.signal(nix::sys::signal::Signal::SIGCONT);
    let served = new_client_served(&daemon);
    held.let_go(fuse);
    drop(raw);
    assert!(served, "another client was not served");
}

/// A refused connection holds no place under any limit, and its socket
/// waits for its uid's closing thread like any other. A client whose
/// closing thread is stuck could leave refused sockets there without
/// bound, then (once they were capped) have one closed on the broker's
/// thread with a file whose release waits still queued in it: every
/// client stalled. Past the cap the daemon now accepts nothing until
/// refusals are closed: clients being served go on, and accepting
/// resumes once the closes do. Found by review.
#[test]
fn refusals_left_to_a_stuck_closing_thread_never_stall_the_broker() {
    const REFUSED: usize = 300;
    let _turn = one_at_a_time();
    if !have_root("refusals left to a stuck closing thread") {
        return;
    }
    let daemon = Daemon::start_with(dmabroker_suite::DaemonOptions {
        policy: Some("[default]\nmax_uid_connections = 1\n".into()),
        args: vec!["--socket-mode".into(), "0666".into()],
        ..Default::default()
    });
    let Some(mut fuse) = StallingFuse::mount("refusals left to a stuck thread", Stall::Flush)
    else {
        return;
    };
    // Of another user, started before the FUSE file is open here.
    let mut honest = Scripted::spawn_as(daemon.socket(), ALICE, ALICE, &[]);
    let baseline = daemon.baseline();
    let pipes: Vec<_> = (0..REFUSED)
        .map(|_| nix::unistd::pipe().expect("pipe"))
        .collect();
    let read_ends: Vec<BorrowedFd<'_>> = pipes.iter().map(|(r, _)| r.as_fd()).collect();
    let held = HeldEpoll::watching(&mut fuse, &read_ends);
    let Opened { mut fuse, file } = Opened::new(fuse);
    // This uid's one connection: a stray fd whose close never returns
    // leaves its closing thread stuck for good.
    // (The readiness probe's connection may be counted for a moment yet.)
    let hello = || {
        RequestBody::Hello(dmabroker_ipc::Hello {
            version: dmabroker_ipc::PROTOCOL_VERSION,
            features: 0,
            autofence: None,
            client_name: "stuck".into(),
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut stuck = loop {
        let mut raw = RawClient::connect(daemon.socket());
        if raw.request(hello()).is_ok() {
            break raw;
        }
        assert!(std::time::Instant::now() < deadline, "never served");
        std::thread::sleep(Duration::from_millis(20));
    };
    let (_, bytes) = stuck.encode(RequestBody::ListHeaps, 0);
    stuck.send_raw(&bytes, &[file.as_fd()]);
    let _ = stuck.recv_reply();
    fuse.await_flush();
    // Connections over its limit, each refused, each with a hello and a
    // file of its own whose last release would wait, all queued before
    // the daemon reads any.
    daemon.signal(nix::sys::signal::Signal::SIGSTOP);
    let refused: Vec<RawClient> = pipes
        .into_iter()
        .map(|(read_end, _write_end)| {
            let mut raw = RawClient::connect(daemon.socket());
            let (_, hello) = raw.encode(hello(), 0);
            let _ = raw.try_send_raw(&hello, &[]);
            let (_, bytes) = raw.encode(RequestBody::ListHeaps, 0);
            let _ = raw.try_send_raw(&bytes, &[read_end.as_fd()]);
            raw
        })
        .collect();
    daemon.signal(nix::sys::signal::Signal::SIGCONT);
    // The refusals' files are the daemon's alone now.
    let settled = dmabroker_suite::proc::stable_fd_count(daemon.pid());
    honest.send("heaps");
    let served = honest.recv(Duration::from_secs(3));
    drop(refused);
    held.let_go(fuse);
    drop(file);
    drop(stuck);
    drop(honest);
    assert!(
        served.is_some_and(|answer| answer.starts_with("ok heaps=")),
        "a client being served stalled"
    );
    // Once the stuck closes go on, the refusals are closed and the daemon
    // accepts again: a new client of yet another user is served.
    const BOB: u32 = 65502;
    let mut later = Scripted::spawn_as(daemon.socket(), BOB, BOB, &[]);
    later.ok("heaps");
    assert!(
        settled.saturating_sub(baseline) <= 256 + 64 + 64 + 8,
        "{} fds kept for refused connections",
        settled.saturating_sub(baseline)
    );
}
