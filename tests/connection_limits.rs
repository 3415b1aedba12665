//! The daemon's limits on connections, against real processes: the cap on
//! connections served at once, what a client over it is told, and the
//! accept loop surviving a shortage of file descriptors.

use std::time::{Duration, Instant};

use dmabroker_client::Client;
use dmabroker_ipc::{ErrorCode, Hello, ReplyBody, RequestBody, PROTOCOL_VERSION};
use dmabroker_suite::proc::{fd_count, free_fds, limit_fds};
use dmabroker_suite::raw::RawClient;
use dmabroker_suite::{Daemon, DaemonOptions};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// A daemon serving at most `max` connections, none of them yet: the
/// readiness probe's connection ended and its socket closed (on a thread
/// of its own, a moment after), so it holds no place under the cap.
fn daemon_serving_at_most(max: usize) -> Daemon {
    let daemon = Daemon::start_with(DaemonOptions {
        args: vec!["--max-connections".into(), max.to_string()],
        ..Default::default()
    });
    dmabroker_suite::proc::stable_fd_count(daemon.pid());
    daemon
}

fn hello() -> RequestBody {
    RequestBody::Hello(Hello {
        version: PROTOCOL_VERSION,
        features: 0,
        autofence: None,
        client_name: "raw".into(),
    })
}

/// What a connection's first message is answered with: the welcome, or
/// the error the broker refused the connection with (it speaks first).
fn first_answer(raw: &mut RawClient) -> Result<(), ErrorCode> {
    let (_, bytes) = raw.encode(hello(), 0);
    let _ = raw.try_send_raw(&bytes, &[]);
    match raw.recv_reply() {
        Some((_, Ok(ReplyBody::Welcome(_)))) => Ok(()),
        Some((_, Err(code))) => Err(code),
        other => panic!("neither a welcome nor an error: {other:?}"),
    }
}

/// A client over the cap is told `Busy`, even when its hello (the client
/// library sends one as soon as it connects) is already waiting. The
/// broker closed the refused socket with that hello unread, and closing a
/// Unix socket with unread data resets the peer's: the client saw
/// `ECONNRESET`, not the answer.
#[test]
fn a_client_over_the_cap_is_told_busy() {
    let daemon = daemon_serving_at_most(2);
    let _first = Client::connect_to(daemon.socket()).expect("first");
    let _second = Client::connect_to(daemon.socket()).expect("second");
    let pid = Pid::from_raw(daemon.pid() as i32);
    // Connected (into the backlog) and the hello sent before the daemon
    // accepts the connection.
    daemon.signal(Signal::SIGSTOP);
    let mut third = RawClient::connect(daemon.socket());
    let (_, bytes) = third.encode(hello(), 0);
    third.send_raw(&bytes, &[]);
    kill(pid, Signal::SIGCONT).expect("SIGCONT");
    match third.recv_reply() {
        Some((0, Err(ErrorCode::Busy))) => {}
        other => panic!("the third client was not told Busy: {other:?}"),
    }
    // And through the client library, hello and all.
    match Client::connect_to(daemon.socket()) {
        Err(err) => assert_eq!(err.code(), Some(ErrorCode::Busy), "{err}"),
        Ok(_) => panic!("a third client was served at a cap of 2"),
    }
}

/// Connections that arrive together are all accepted in one wake-up, and
/// the cap counted only the connections already registered: a burst went
/// past it by as many as were waiting.
#[test]
fn a_burst_of_connections_does_not_overshoot_the_cap() {
    let daemon = daemon_serving_at_most(2);
    let pid = Pid::from_raw(daemon.pid() as i32);
    // All of them wait in the backlog when the daemon next looks.
    daemon.signal(Signal::SIGSTOP);
    let mut clients: Vec<RawClient> = (0..12)
        .map(|_| RawClient::connect(daemon.socket()))
        .collect();
    kill(pid, Signal::SIGCONT).expect("SIGCONT");
    let mut served = 0;
    for raw in &mut clients {
        match first_answer(raw) {
            Ok(()) => served += 1,
            Err(ErrorCode::Busy) => {}
            Err(other) => panic!("refused with {other:?}, not Busy"),
        }
    }
    assert_eq!(served, 2, "served {served} connections at a cap of 2");
}

/// Out of file descriptors, the accept loop pauses. It cleared the
/// listener's readiness first, and with edge-triggered epoll nothing woke
/// it again until yet another client connected: a client already waiting
/// was never accepted, however many fds came free.
#[test]
fn connections_waiting_while_fds_ran_out_are_accepted_once_there_are_fds() {
    let daemon = Daemon::start();
    let pid = daemon.pid();
    let open = fd_count(pid);
    assert!(open > 3, "{open} fds");
    // No fd to spare (0, 1 and 2 are open): the next accept fails with
    // EMFILE.
    limit_fds(pid, 3);
    let mut waiting = RawClient::connect(daemon.socket());
    let (_, bytes) = waiting.encode(hello(), 0);
    waiting.send_raw(&bytes, &[]);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !daemon.log().contains("out of file descriptors") {
        assert!(
            std::time::Instant::now() < deadline,
            "the daemon never ran out of fds:\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    limit_fds(pid, 1024);
    match waiting.recv_reply() {
        Some((_, Ok(ReplyBody::Welcome(_)))) => {}
        other => panic!("the waiting client was not served: {other:?}"),
    }
}

/// A second daemon started on a live daemon's socket must leave it alone.
/// It took any failure of its probe connect for "nobody listens", and a
/// live daemon whose backlog is full answers `EAGAIN`: the second daemon
/// removed the socket and served in its place, and every later client
/// reached it instead of the daemon holding their buffers.
#[test]
fn a_second_daemon_does_not_take_a_busy_daemons_socket() {
    let daemon = Daemon::start();
    let pid = Pid::from_raw(daemon.pid() as i32);
    daemon.signal(Signal::SIGSTOP);
    // Fill its backlog: connects that do not wait.
    let mut waiting = Vec::new();
    loop {
        let fd = nix::sys::socket::socket(
            nix::sys::socket::AddressFamily::Unix,
            nix::sys::socket::SockType::SeqPacket,
            nix::sys::socket::SockFlag::SOCK_NONBLOCK | nix::sys::socket::SockFlag::SOCK_CLOEXEC,
            None,
        )
        .expect("socket");
        let addr = nix::sys::socket::UnixAddr::new(daemon.socket()).expect("addr");
        match nix::sys::socket::connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr) {
            Ok(()) => waiting.push(fd),
            Err(nix::errno::Errno::EAGAIN) => break,
            Err(err) => panic!("connect: {err}"),
        }
        assert!(waiting.len() < 100_000, "the backlog never filled");
    }
    let second = std::process::Command::new(dmabroker_suite::daemon::binary("dmabrokerd"))
        .arg("--socket")
        .arg(daemon.socket())
        .args([
            "--dma-heap-dir",
            "/nonexistent",
            "--udmabuf",
            "/nonexistent",
        ])
        .args(["--dbus", "none"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn a second daemon");
    let started = std::time::Instant::now();
    let mut second = second;
    let status = loop {
        if let Some(status) = second.try_wait().expect("wait") {
            break Some(status);
        }
        if started.elapsed() > Duration::from_secs(5) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    kill(pid, Signal::SIGCONT).expect("SIGCONT");
    drop(waiting);
    let Some(status) = status else {
        let _ = second.kill();
        let _ = second.wait();
        panic!("the second daemon took the socket and served");
    };
    assert!(!status.success(), "the second daemon must refuse to start");
    // Once it has caught up with the connections it found waiting (it may
    // answer Busy while it has not).
    dmabroker_suite::eventually("the first daemon to serve again", || {
        Client::connect_to(daemon.socket()).is_ok()
    });
}

/// Pins every thread of `pid` (0: the calling thread) to `cpu`.
fn pin(pid: u32, cpu: usize) {
    use nix::sched::{sched_setaffinity, CpuSet};
    let mut set = CpuSet::new();
    set.set(cpu).expect("cpu");
    let tids: Vec<i32> = if pid == 0 {
        vec![0]
    } else {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .expect("tasks")
            .map(|t| {
                t.expect("task")
                    .file_name()
                    .to_string_lossy()
                    .parse()
                    .expect("tid")
            })
            .collect()
    };
    for tid in tids {
        sched_setaffinity(Pid::from_raw(tid), &set).expect("sched_setaffinity");
    }
}

/// A refused connection is read until its client hangs up, so that the
/// client gets `Busy` rather than a reset. Read until empty in one go, a
/// client that kept sending faster than the broker reads (two threads on
/// a CPU of their own here) held the broker's only thread: nobody else was
/// served until it stopped.
#[test]
fn a_refused_client_that_keeps_sending_does_not_stall_the_broker() {
    let cpus = dmabroker_suite::proc::allowed_cpus();
    if cpus.len() < 2 {
        dmabroker_daemon::kernel::note_skip(
            "a refused client flooding: needs two CPUs, one for the broker and one for the sender",
        );
        return;
    }
    let daemon = daemon_serving_at_most(1);
    pin(daemon.pid(), cpus[0]);
    let mut served = RawClient::connect(daemon.socket());
    served.hello();
    let baseline = fd_count(daemon.pid());
    let refused = RawClient::connect(daemon.socket());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flooders: Vec<_> = (0..2)
        .map(|_| {
            let fd = refused.fd().try_clone_to_owned().expect("dup");
            let stop = std::sync::Arc::clone(&stop);
            let cpu = cpus[1];
            std::thread::spawn(move || {
                pin(0, cpu);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = nix::sys::socket::send(
                        std::os::fd::AsRawFd::as_raw_fd(&fd),
                        &[0u8; 1],
                        nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
                    );
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    // Within RawClient's 10 s receive timeout, or the test fails.
    let answered = served.request(RequestBody::ListHeaps);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for flooder in flooders {
        flooder.join().expect("flooder");
    }
    assert!(answered.is_ok(), "{answered:?}");
    drop(refused);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while fd_count(daemon.pid()) != baseline {
        assert!(
            std::time::Instant::now() < deadline,
            "the refused connection's fd stayed open"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A daemon out of fds cannot take the fds a request brings: the kernel
/// drops them and flags the message's control data as cut short, exactly
/// as for a client that attached too many. That is the daemon's shortage,
/// not the client's fault: the request is answered under its own id with
/// `Busy` (try again), and the client is not counted as misbehaving. It
/// was answered `ProtocolError` under id 0, and after eight such requests
/// the client was disconnected and lost every buffer it held.
#[test]
fn requests_whose_fds_a_daemon_out_of_fds_cannot_take_are_busy_not_malformed() {
    let daemon = Daemon::start();
    let mut raw = RawClient::connect(daemon.socket());
    raw.hello();
    let held = raw.alloc();
    let pid = daemon.pid();
    // Connections that ended (the readiness probe's) close on a thread of
    // their own: once they have, no fd below the limit comes free.
    dmabroker_suite::proc::stable_fd_count(pid);
    limit_fds(pid, free_fds(pid, 1)[0]);
    let null = std::fs::File::open("/dev/null").expect("/dev/null");
    for _ in 0..10 {
        let (id, bytes) = raw.encode(RequestBody::Adopt { name: None }, 1);
        raw.send_raw(&bytes, &[std::os::fd::AsFd::as_fd(&null)]);
        let (answered, result) = raw.recv_reply().expect("an answer");
        assert_eq!((answered, result.err()), (id, Some(ErrorCode::Busy)));
    }
    limit_fds(pid, 1024);
    match raw.request(RequestBody::Info { buffer: held }) {
        Ok(ReplyBody::Buffer(info)) => assert_eq!(info.id, held),
        other => panic!("the client lost its connection or its buffer: {other:?}"),
    }
}

/// A raw connection that has said hello and then only sends.
fn deaf_connection(daemon: &Daemon) -> RawClient {
    let mut raw = RawClient::connect(daemon.socket());
    raw.hello();
    raw
}

/// Imports `buffer` and gives it back, `times` times or until the broker
/// cuts the connection off, reading nothing: each import's reply carries
/// an fd, left in the socket. How many went out.
fn import_without_reading(raw: &mut RawClient, token: &str, buffer: u64, times: usize) -> usize {
    for sent in 0..times {
        let (_, import) = raw.encode(
            RequestBody::Import {
                token: token.to_owned(),
            },
            0,
        );
        let free = raw.encode_one_way(RequestBody::Free { buffer });
        if raw.try_send_raw(&import, &[]).is_err() || raw.try_send_raw(&free, &[]).is_err() {
            return sent;
        }
    }
    times
}

/// The kernel charges every fd a client has not read yet to the user that
/// sent it and, once that count passes the sender's fd limit, refuses to
/// pass any more. A few connections that asked for buffers and never read
/// the answers took the daemon there (a socket holds about 280 of them),
/// and from then on no reply carrying an fd reached any client. Each
/// connection now has a bound of unread fds, and the connection cap keeps
/// their sum within the fd limit. (The daemon runs as a uid of its own:
/// root is exempt from the check, and the count is per user, so nothing
/// else may pass fds as uid 65531 meanwhile, another run of this test
/// included.)
#[test]
fn clients_that_never_read_cannot_stop_fds_reaching_other_clients() {
    if !dmabroker_suite::have_root("clients_that_never_read_cannot_stop_fds_reaching_other_clients")
    {
        return;
    }
    let daemon = Daemon::start_with(DaemonOptions {
        run_as: Some(65531),
        fd_limit: Some(2048),
        ..Default::default()
    });
    let baseline = daemon.baseline();
    let owner = daemon.client();
    let shared = owner.alloc(4096).expect("alloc");
    let token = shared.export().expect("export").to_string();

    // Ten connections, 400 imports each: 4,000 fds if nothing held them
    // back, twice the daemon's limit.
    let mut deaf: Vec<RawClient> = (0..10).map(|_| deaf_connection(&daemon)).collect();
    for raw in &mut deaf {
        import_without_reading(raw, &token, shared.id(), 400);
    }

    // Everyone else still gets buffers.
    let camera = daemon.client();
    let display = daemon.client();
    for _ in 0..20 {
        let frame = camera.alloc(4096).expect("alloc while others do not read");
        let token = frame.export().expect("export");
        let seen = display
            .import(&token)
            .expect("import while others do not read");
        frame.map().expect("map")[0] = 0x5a;
        assert_eq!(seen.map().expect("map")[0], 0x5a);
    }
    assert!(
        !daemon.log().contains("Too many references"),
        "{}",
        daemon.log_tail()
    );

    // The connections cut off are let go as their clients close.
    drop((camera, display, shared, owner, deaf));
    daemon.assert_fds_back_to(baseline);
}

/// A connection cut off for not reading keeps its place under the
/// connection cap while its client has fds unread: closing the daemon's end
/// would not take them back from the client, so a client could otherwise
/// pile up fds without bound through connections the cap no longer counts.
/// The place is free again once the client reads them.
#[test]
fn a_connection_cut_off_with_fds_unread_counts_until_its_client_reads_them() {
    let daemon = daemon_serving_at_most(3);
    let owner = daemon.client();
    let shared = owner.alloc(4096).expect("alloc");
    let token = shared.export().expect("export").to_string();
    let mut deaf = deaf_connection(&daemon);
    let sent = import_without_reading(&mut deaf, &token, shared.id(), 5000);
    assert!(sent < 5000, "never cut off");

    // Owner, the cut-off connection, and one more.
    let mut second = RawClient::connect(daemon.socket());
    assert_eq!(first_answer(&mut second), Ok(()));
    // For a second, ample time to have let the cut-off connection go,
    // the cap stays full.
    let full_until = std::time::Instant::now() + Duration::from_secs(1);
    while std::time::Instant::now() < full_until {
        let mut over = RawClient::connect(daemon.socket());
        assert_eq!(first_answer(&mut over), Err(ErrorCode::Busy));
        std::thread::sleep(Duration::from_millis(50));
    }

    // The client reads what was sent before the cut: fds, then the end.
    let mut fds = 0;
    while let Some((_, received)) = deaf.recv() {
        fds += received.len();
    }
    assert!(fds > 0, "the replies sent before the cut carry fds");
    dmabroker_suite::eventually("the cut-off connection's place to be free", || {
        let mut next = RawClient::connect(daemon.socket());
        first_answer(&mut next) == Ok(())
    });
}

/// A client cut off with replies still queued for it (it stopped reading,
/// then hung up its sending side) never gets them, and the fds they carry
/// must go with them, even while it keeps its end open to read what was
/// sent before. They were once kept until the client closed: buffers the
/// broker had freed and charged to no one, one set per cut-off connection.
#[test]
fn a_cut_off_client_keeping_its_socket_open_pins_no_queued_fds() {
    let daemon = Daemon::start();
    let baseline = daemon.baseline();
    let mut deaf = deaf_connection(&daemon);
    for _ in 0..200 {
        let (_, alloc) = deaf.encode(
            RequestBody::Alloc {
                size: 4096,
                heap: None,
                name: None,
            },
            0,
        );
        deaf.send_raw(&alloc, &[]);
    }
    nix::sys::socket::shutdown(
        std::os::fd::AsRawFd::as_raw_fd(&deaf.fd()),
        nix::sys::socket::Shutdown::Write,
    )
    .expect("shutdown");
    // The connection is kept (fds it was sent are unread): its socket, and
    // nothing else.
    dmabroker_suite::eventually("the cut-off connection to be kept", || {
        daemon
            .log()
            .contains("connection closed with messages its client has not read")
    });
    dmabroker_suite::eventually("the queued replies' fds to be closed", || {
        fd_count(daemon.pid()) == baseline + 1
    });
    drop(deaf);
    daemon.assert_fds_back_to(baseline);
}

/// A connection that never says hello held its place under the connection
/// cap (and its uid's) for good: a few uids could fill the cap with
/// silent connections and refuse everyone else. It is closed once
/// `--hello-timeout` passes without a hello; a client that said hello
/// stays, however long it is silent after.
#[test]
fn a_connection_that_never_says_hello_is_closed_after_the_hello_timeout() {
    let daemon = Daemon::start_with(DaemonOptions {
        args: vec!["--hello-timeout".into(), "300ms".into()],
        ..Default::default()
    });
    let client = Client::connect_to(daemon.socket()).expect("connect");
    // Before the connect: the daemon's timer starts at its accept, after.
    let started = Instant::now();
    let mut silent = RawClient::connect(daemon.socket());
    assert!(silent.recv().is_none(), "the broker closes it");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(5),
        "closed after {waited:?}"
    );
    std::thread::sleep(Duration::from_millis(300));
    client
        .heaps()
        .expect("a client that said hello is still served");
    assert!(
        daemon.log().contains("no hello"),
        "the closing is logged:\n{}",
        daemon.log_tail()
    );
}

/// A connection that keeps a request always queued and never says hello:
/// each request is answered "hello first", and the connection loop, never
/// idle, never looked at its hello timer. The deadline is now also checked
/// as each message is handled before a hello.
#[test]
fn a_connection_that_keeps_sending_without_a_hello_is_closed_too() {
    let daemon = Daemon::start_with(DaemonOptions {
        args: vec!["--hello-timeout".into(), "300ms".into()],
        ..Default::default()
    });
    let mut raw = RawClient::connect(daemon.socket());
    let (_, request) = raw.encode(RequestBody::ListHeaps, 0);
    let sender = raw.fd().try_clone_to_owned().expect("dup");
    let sending = std::thread::spawn(move || {
        // Until the broker hangs up (EPIPE): never a moment with nothing
        // queued for it.
        while nix::sys::socket::send(
            std::os::fd::AsRawFd::as_raw_fd(&sender),
            &request,
            nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
        )
        .is_ok()
        {}
    });
    let started = Instant::now();
    let mut answers = 0;
    while raw.recv().is_some() {
        answers += 1;
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "still served after {answers} requests with no hello"
        );
    }
    sending.join().expect("sender");
    assert!(answers > 0, "the requests were answered until the timeout");
}

/// A client that sends allocations without reading the answers, each
/// followed by a `Free` of the id to come (ids are sequential): past the
/// 64 fds a connection may have unread, the answers waited in the daemon,
/// each keeping its buffer's fd open, and the frees went through, so the
/// daemon kept dozens of buffers open (hundreds, up to the reply cap) for
/// answers nobody read, charged to no one, past `max_buffers`. A free of
/// a buffer whose answer still waits in the daemon is refused `Busy`
/// now: those buffers stay held and charged, and the quota stops them.
#[test]
fn a_buffer_whose_answer_waits_in_the_daemon_cannot_be_freed() {
    let daemon = Daemon::start_with(DaemonOptions {
        policy: Some("[default]\nmax_buffers = 8\n".into()),
        ..Default::default()
    });
    let mut raw = RawClient::connect(daemon.socket());
    raw.hello();
    let alloc = || RequestBody::Alloc {
        size: 4096,
        heap: None,
        name: None,
    };
    let first = match raw.request(alloc()) {
        Ok(ReplyBody::Buffer(info)) => info.id,
        other => panic!("{other:?}"),
    };
    let free = raw.encode_one_way(RequestBody::Free { buffer: first });
    raw.send_raw(&free, &[]);
    // A round trip: the free has been handled.
    raw.request(RequestBody::ListHeaps).expect("heaps");
    dmabroker_suite::proc::stable_fd_count(daemon.pid());
    let baseline = fd_count(daemon.pid());
    // Few enough that all of it fits in the socket unread, the answers
    // and the refusals (under the reply cap: the client is not cut off).
    let rounds: u64 = 100;
    let mut allocs = std::collections::HashSet::new();
    for i in 1..=rounds {
        let (id, alloc) = raw.encode(alloc(), 0);
        allocs.insert(id);
        raw.send_raw(&alloc, &[]);
        let free = raw.encode_one_way(RequestBody::Free { buffer: first + i });
        raw.send_raw(&free, &[]);
    }
    let (last, heaps) = raw.encode(RequestBody::ListHeaps, 0);
    raw.send_raw(&heaps, &[]);
    // Time for the daemon to read all of it (it answers the round trip
    // last, once the client reads).
    std::thread::sleep(Duration::from_millis(500));
    let kept = fd_count(daemon.pid()).saturating_sub(baseline);
    let (mut buffers, mut over_quota, mut busy_frees) = (0, 0, 0);
    loop {
        let (id, result) = raw.recv_reply().expect("a reply");
        if id == last {
            break;
        }
        match (allocs.contains(&id), result) {
            (true, Ok(ReplyBody::Buffer(_))) => buffers += 1,
            (true, Err(ErrorCode::QuotaExceeded)) => over_quota += 1,
            (false, Err(ErrorCode::Busy)) => busy_frees += 1,
            // The free of an id whose allocation was refused.
            (false, Err(ErrorCode::UnknownBuffer)) => {}
            (_, other) => panic!("request {id}: {other:?}"),
        }
    }
    assert!(
        kept <= 8 + 2,
        "the daemon keeps {kept} fds open for answers nobody has read, past max_buffers = 8"
    );
    assert!(
        busy_frees > 0,
        "no free of an unsent answer's buffer refused"
    );
    assert!(over_quota > 0, "the held buffers never reached the quota");
    assert_eq!(buffers + over_quota, rounds, "every allocation answered");
}
