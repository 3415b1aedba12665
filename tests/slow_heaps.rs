//! A heap that takes its time: a dma-heap zeroes every page before it
//! returns, udmabuf pins every page, and a heap node may be anything the
//! administrator put in the heap directory. Here the node is a FUSE file
//! whose server never answers the allocation's ioctl, until the test kills
//! it (then the ioctl fails, and the allocation falls back to memfd). The
//! broker must go on serving everyone else meanwhile, keep the waiting
//! allocation within its client's quota, and leak nothing if the client
//! goes before it is answered.

use std::sync::mpsc::{channel, Receiver};
use std::time::Duration;

use dmabroker_client::{AllocRequest, Buffer, Client, ErrorCode};
use dmabroker_ipc::{ReplyBody, RequestBody};
use dmabroker_suite::fuse::answered_within;
use dmabroker_suite::raw::RawClient;
use dmabroker_suite::scripted::field;
use dmabroker_suite::slow_heap::SlowHeap;
use dmabroker_suite::{eventually, Scripted};

const MIB: u64 = 1 << 20;

fn from_slow_heap(size: u64) -> AllocRequest {
    AllocRequest {
        size,
        heap: Some("slow".into()),
        name: Some("frame".into()),
    }
}

fn memfd(size: u64) -> AllocRequest {
    AllocRequest {
        size,
        heap: Some("memfd".into()),
        name: None,
    }
}

/// Runs `client.alloc_with(request)` on a thread of its own.
fn alloc_on_thread(
    client: &std::sync::Arc<Client>,
    request: AllocRequest,
) -> Receiver<dmabroker_client::Result<Buffer>> {
    let (tx, rx) = channel();
    let client = std::sync::Arc::clone(client);
    std::thread::spawn(move || {
        let _ = tx.send(client.alloc_with(request));
    });
    rx
}

/// The heap's node was seen, and is listed first: the default heap.
#[test]
fn a_heap_node_that_never_answers_is_listed_like_any_other() {
    let Some(slow) = SlowHeap::start("slow heap listed", None) else {
        return;
    };
    let heaps = slow.daemon.client().heaps().expect("heaps");
    let names: Vec<&str> = heaps.iter().map(|h| h.name.as_str()).collect();
    assert_eq!(names.first(), Some(&"slow"), "{names:?}");
}

/// While one client's allocation waits in its heap, other clients are
/// served, allocations from other heaps included, and the waiting client
/// is answered once the heap gives up (by the fallback to memfd).
#[test]
fn an_allocation_waiting_in_its_heap_does_not_stall_other_clients() {
    let Some(mut slow) = SlowHeap::start("slow heap, others served", None) else {
        return;
    };
    let baseline = slow.daemon.baseline();
    let mut camera = Scripted::spawn(slow.daemon.socket(), &[]);
    camera.send(&format!("alloc {} heap=slow name=frame", 4 * MIB));
    slow.await_ioctl();

    // Connecting is asked too: a hello is served by the broker's thread.
    let socket = slow.daemon.socket().to_owned();
    let served = answered_within(Duration::from_secs(3), move || {
        Client::connect_to(&socket).and_then(|c| c.heaps()).is_ok()
    });
    let socket = slow.daemon.socket().to_owned();
    let other_heap_served = answered_within(Duration::from_secs(3), move || {
        Client::connect_to(&socket)
            .and_then(|c| c.alloc_with(memfd(64 * 1024)))
            .is_ok_and(|b| b.heap() == "memfd")
    });
    assert!(
        served,
        "a new client was not served while an allocation waited in its heap"
    );
    assert!(
        other_heap_served,
        "a memfd allocation was not served while another waited in its heap"
    );
    assert_eq!(
        camera.recv(Duration::from_millis(200)),
        None,
        "answered while its heap still held the allocation"
    );

    slow.release();
    let answer = camera
        .recv(Duration::from_secs(10))
        .expect("the allocation is answered once its heap gives up");
    assert_eq!(field(&answer, "heap"), Some("memfd"), "{answer}");
    assert_eq!(field(&answer, "size"), Some("4194304"), "{answer}");
    let id = field(&answer, "id").expect("id").to_owned();
    camera.send(&format!("free {id}"));
    assert_eq!(camera.recv(Duration::from_secs(5)).as_deref(), Some("ok"));
    drop(camera);
    slow.daemon.assert_fds_back_to(baseline);
}

/// An allocation still waiting counts against the client's quota as the
/// buffer it will be: a second one that would take the client past
/// `max_total_bytes` is refused at once, not admitted because the first
/// is not in the table yet.
#[test]
fn an_allocation_waiting_in_its_heap_counts_against_the_quota() {
    let policy = "[default]\nmax_total_bytes = \"6 MiB\"\n";
    let Some(mut slow) = SlowHeap::start("slow heap, quota", Some(policy)) else {
        return;
    };
    let client = std::sync::Arc::new(slow.daemon.client());
    let waiting = alloc_on_thread(&client, from_slow_heap(4 * MIB));
    slow.await_ioctl();

    let second = alloc_on_thread(&client, memfd(4 * MIB))
        .recv_timeout(Duration::from_secs(3))
        .expect("the second allocation is answered at once");
    let err = second.expect_err("over quota with the waiting allocation");
    assert_eq!(err.code(), Some(ErrorCode::QuotaExceeded), "{err}");
    // Within the quota with it: admitted.
    let small = client.alloc_with(memfd(MIB)).expect("1 MiB more fits");

    slow.release();
    let first = waiting
        .recv_timeout(Duration::from_secs(10))
        .expect("answered once its heap gives up")
        .expect("the waiting allocation");
    assert_eq!(first.size(), 4 * MIB);
    let err = client
        .alloc_with(memfd(2 * MIB))
        .expect_err("the quota is full");
    assert_eq!(err.code(), Some(ErrorCode::QuotaExceeded), "{err}");
    drop(small);
    drop(first);
}

/// An allocation still waiting counts against its user's
/// `max_uid_buffers` too, on every connection of the user, as the buffer
/// it will be; once answered it counts as that buffer, and once its
/// client goes it counts no more (the count is kept apart from the
/// connections, `State::uid_held`, and must let go of it both ways).
#[test]
fn an_allocation_waiting_in_its_heap_counts_for_its_user() {
    let policy = "[default]\nmax_uid_buffers = 2\n";
    let Some(mut slow) = SlowHeap::start("slow heap, user's buffers", Some(policy)) else {
        return;
    };
    let mut camera = Scripted::spawn(slow.daemon.socket(), &[]);
    let pid = camera.pid();
    camera.send(&format!("alloc {} heap=slow", 4 * MIB));
    slow.await_ioctl();
    let other = slow.daemon.client();
    let one = other.alloc_with(memfd(MIB)).expect("the second of two");
    let err = other
        .alloc_with(memfd(MIB))
        .expect_err("one buffer and one waiting allocation are two");
    assert_eq!(err.code(), Some(ErrorCode::QuotaExceeded), "{err}");
    assert!(err.to_string().contains("max_uid_buffers"), "{err}");

    camera.kill();
    eventually("the daemon to see the client go", || {
        disconnected(&slow.daemon.log(), pid)
    });
    let two = other
        .alloc_with(memfd(MIB))
        .expect("the abandoned allocation counts no more");
    drop((one, two));
    slow.release();
}

/// A client killed while its allocation waits: the allocation is
/// abandoned, and whatever the heap makes once it answers is closed, not
/// kept for nobody.
#[test]
fn a_client_killed_while_its_allocation_waits_leaks_nothing() {
    let Some(mut slow) = SlowHeap::start("slow heap, client killed", None) else {
        return;
    };
    let baseline = slow.daemon.baseline();
    let mut camera = Scripted::spawn(slow.daemon.socket(), &[]);
    let pid = camera.pid();
    camera.send(&format!("alloc {} heap=slow", 4 * MIB));
    slow.await_ioctl();
    camera.kill();
    eventually("the daemon to see the client go", || {
        disconnected(&slow.daemon.log(), pid)
    });

    slow.release();
    // The fallback allocation is made, for nobody, and closed.
    eventually("the abandoned allocation to be carried out", || {
        slow.daemon.log().contains("allocation fell back")
    });
    slow.daemon.assert_fds_back_to(baseline);
    let listed = slow.daemon.client().heaps().expect("still serving");
    assert!(!listed.is_empty());
}

/// A daemon told to stop while an allocation waits in its heap stops. It
/// used to say it was shutting down and then wait, with no limit, for the
/// allocation's thread (dropping tokio's runtime joins its blocking pool),
/// until the service manager killed it. Found by review.
///
/// This heap's server has read the ioctl and never answers it, and the
/// kernel lets no signal end a FUSE request its server holds: that one
/// thread stays until the server goes, whatever the daemon does. So what
/// is checked is that the daemon is done with everything else: its main
/// thread has returned (and with it the process's exit began) rather than
/// waiting for the blocking pool.
#[test]
fn the_daemon_stops_while_an_allocation_waits_in_its_heap() {
    let Some(mut slow) = SlowHeap::start("slow heap, stop", None) else {
        return;
    };
    let mut camera = Scripted::spawn(slow.daemon.socket(), &[]);
    camera.send(&format!("alloc {} heap=slow", 4 * MIB));
    slow.await_ioctl();
    slow.daemon.signal(nix::sys::signal::Signal::SIGTERM);
    let pid = slow.daemon.pid();
    // The third field of /proc/PID/stat: the main thread's state, `Z`
    // once it has exited (the process's other threads may linger).
    let main_thread_exited = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
            stat.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X']))
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !main_thread_exited() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let exited = main_thread_exited();
    // Let the allocation go, so the rest of the process can.
    slow.release();
    assert!(
        exited,
        "dmabrokerd's main thread did not return within 10 s of SIGTERM while an \
         allocation waited; log:\n{}",
        slow.daemon.log_tail()
    );
    eventually("the daemon's process to end", || !slow.daemon.is_running());
    assert!(
        !slow.daemon.socket().exists(),
        "the socket is removed at the stop"
    );
}

/// Sends `count` allocations from the slow heap on `raw` without waiting
/// for answers, each one seen held in the heap.
fn hold_allocations(slow: &mut SlowHeap, raw: &mut RawClient, count: usize) {
    for _ in 0..count {
        let (_, bytes) = raw.encode(
            RequestBody::Alloc {
                size: 4 * MIB,
                heap: Some("slow".into()),
                name: None,
            },
            0,
        );
        raw.send_raw(&bytes, &[]);
        slow.await_ioctl();
    }
}

/// Allocations whose clients went still take a thread each until their
/// heap returns, so they count against the daemon's bound on allocations
/// running. A client that asked for 8, hung up and asked again had them
/// counted against nothing: each round left 8 more threads waiting in the
/// heap (or zeroing pages for nobody). Found by review.
#[test]
fn allocations_of_clients_gone_still_count_until_their_heap_returns() {
    let Some(mut slow) = SlowHeap::start("slow heap, abandoned", None) else {
        return;
    };
    let pid = slow.daemon.pid();
    let threads = || {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|tasks| tasks.count())
            .unwrap_or(0)
    };
    let before = threads();
    for round in 1..=2 {
        let mut raw = RawClient::connect(slow.daemon.socket());
        raw.hello();
        hold_allocations(&mut slow, &mut raw, 8);
        drop(raw);
        eventually("the daemon to see the client go", || {
            slow.daemon.log().matches("client disconnected").count() >= round
        });
    }
    // 16 running for nobody: the next one is refused, not started.
    let mut raw = RawClient::connect(slow.daemon.socket());
    raw.hello();
    let refused = raw.request(RequestBody::Alloc {
        size: 4 * MIB,
        heap: Some("slow".into()),
        name: None,
    });
    assert_eq!(refused, Err(ErrorCode::Busy));
    // 16 for the allocations, and the closer's thread (started with the
    // first allocation that waits for it).
    assert!(
        threads() <= before + 17,
        "{} threads, {before} before",
        threads()
    );
    // Allocations that cannot block are not held back by them.
    let memfd = raw.request(RequestBody::Alloc {
        size: 4 * MIB,
        heap: Some("memfd".into()),
        name: None,
    });
    assert!(matches!(memfd, Ok(ReplyBody::Buffer(_))), "{memfd:?}");

    // Once the heap returns, their threads are done and counted out.
    slow.release();
    let served = raw.request(RequestBody::Alloc {
        size: 4 * MIB,
        heap: Some("slow".into()),
        name: None,
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut served = served;
    while served == Err(ErrorCode::Busy) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        served = raw.request(RequestBody::Alloc {
            size: 4 * MIB,
            heap: Some("slow".into()),
            name: None,
        });
    }
    assert!(
        matches!(served, Ok(ReplyBody::Buffer(ref info)) if info.heap == "memfd"),
        "{served:?}"
    );
}

/// A client with as many allocations waiting in a device heap as it may
/// have still allocates from memfd at once: a memfd allocation is carried
/// out on the broker's thread, even when a device heap follows memfd in
/// its fallback order (it used to go to the blocking pool, and be refused
/// `Busy` here). Found by review.
#[test]
fn memfd_allocations_are_carried_out_in_place_whatever_follows_them() {
    let policy = "[default]\nheaps = [\"memfd\", \"slow\"]\n";
    let Some(mut slow) = SlowHeap::start("slow heap, memfd in place", Some(policy)) else {
        return;
    };
    let mut raw = RawClient::connect(slow.daemon.socket());
    raw.hello();
    hold_allocations(&mut slow, &mut raw, 8);
    let memfd = raw.request(RequestBody::Alloc {
        size: 4 * MIB,
        heap: Some("memfd".into()),
        name: None,
    });
    assert!(matches!(memfd, Ok(ReplyBody::Buffer(_))), "{memfd:?}");
    // The default heap, memfd first in the client's order, likewise.
    let default = raw.request(RequestBody::Alloc {
        size: MIB,
        heap: None,
        name: None,
    });
    assert!(
        matches!(default, Ok(ReplyBody::Buffer(ref info)) if info.heap == "memfd"),
        "{default:?}"
    );
    let ninth = raw.request(RequestBody::Alloc {
        size: MIB,
        heap: Some("slow".into()),
        name: None,
    });
    assert_eq!(ninth, Err(ErrorCode::Busy), "a ninth device allocation");
}

/// Whether the daemon's log says the client of `pid` disconnected: on one
/// line. Anywhere in the log, "client disconnected" (another client's)
/// and "pid=PID" (this one's connect) were there before this client's
/// disconnect was handled, and a test went on too early.
fn disconnected(log: &str, pid: u32) -> bool {
    log.lines()
        .any(|l| l.contains("client disconnected") && l.contains(&format!(" pid={pid} ")))
}
