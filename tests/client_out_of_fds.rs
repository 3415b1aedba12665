//! A client process whose fd table is full when the broker's answer brings
//! it an fd: the kernel drops the fd (`MSG_CTRUNC`), the answer's bytes are
//! whole, and what the broker gave (a buffer, an access) must be given back,
//! or it stays charged to the client until it disconnects.
//!
//! A test binary of its own: filling the fd table starves every thread of
//! the process, so the tests here also take turns (`ONE_AT_A_TIME`).

use std::os::fd::{AsFd, OwnedFd};
use std::sync::mpsc::channel;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use dmabroker_client::{Access, Client, Error};
use dmabroker_ipc::{
    BufferInfo, Grant, OutstandingFence, Reply, ReplyBody, RequestBody, ServerMessage,
};
use dmabroker_suite::fake_broker::{self, FakeBroker};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

/// Every fd this process may open is taken (the soft limit lowered to 256
/// for the while, so that filling the table is quick).
struct FdTableFull {
    fillers: Vec<OwnedFd>,
    limit: libc::rlimit,
}

impl FdTableFull {
    fn new() -> FdTableFull {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: plain system calls on a local struct.
        unsafe {
            assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
            let lower = libc::rlimit {
                rlim_cur: limit.rlim_cur.min(256),
                rlim_max: limit.rlim_max,
            };
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lower), 0);
        }
        let null = std::fs::File::open("/dev/null").expect("/dev/null");
        let mut fillers = vec![OwnedFd::from(null)];
        while let Ok(fd) = fillers[0].try_clone() {
            fillers.push(fd);
        }
        FdTableFull { fillers, limit }
    }
}

impl Drop for FdTableFull {
    fn drop(&mut self) {
        self.fillers.clear();
        // SAFETY: a plain system call on a local struct.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &self.limit) };
    }
}

fn assert_fd_table_full(err: &Error) {
    assert!(
        matches!(err, Error::FdTableFull),
        "not the fd-table error: {err:?}"
    );
    assert_eq!(err.code(), None, "the broker refused nothing");
}

/// A camera program that ran into its fd limit while allocating: the
/// broker's `Buffer` reply arrived with its fd cut off, whole otherwise.
/// The client failed the alloc with a `ProtocolError`, but the broker had
/// allocated the buffer and counted it as this client's: nothing ever freed
/// it (no `Buffer` existed to drop), so each retry leaked a buffer against
/// the client's quota until it disconnected.
#[test]
fn an_alloc_answered_while_out_of_fds_frees_the_buffer_it_cannot_take() {
    let _turn = one_at_a_time();
    let (fd, inode) = fake_broker::memfd();
    let broker = FakeBroker::start(1, move |socket, _, id, body| {
        match body {
            RequestBody::Alloc { .. } => fake_broker::reply_with_buffer(socket, id, &fd, inode),
            RequestBody::ListHeaps => {
                fake_broker::reply(socket, id, Ok(ReplyBody::Heaps(Vec::new())))
            }
            _ => {}
        }
        true
    });
    let client = Client::connect_to(&broker.path).expect("connect");
    let alloc = {
        let _full = FdTableFull::new();
        client.alloc(4096)
    };
    let err = alloc.expect_err("no room for the buffer's fd");
    assert_fd_table_full(&err);
    // A round trip: anything the client sent before it has arrived.
    client.heaps().expect("heaps");
    let seen = broker.seen();
    assert!(
        seen.iter()
            .any(|body| matches!(body, RequestBody::Free { buffer: 1 })),
        "the buffer the broker allocated for the failed alloc was never freed: {seen:?}"
    );
    drop(client);
    broker.join();
}

/// A no-autofence grant lists the fences in its way with their sync_files.
/// With no room for them, the begin failed, but the broker had granted the
/// access: nobody ended it, and every other user of the buffer waited for
/// it until the client disconnected.
#[test]
fn a_grant_answered_while_out_of_fds_ends_the_access_it_cannot_take() {
    let _turn = one_at_a_time();
    let (fd, inode) = fake_broker::memfd();
    let broker = FakeBroker::start(1, move |socket, _, id, body| {
        match body {
            RequestBody::Alloc { .. } => fake_broker::reply_with_buffer(socket, id, &fd, inode),
            RequestBody::Begin { access, .. } => {
                let grant = Grant {
                    fences: vec![OutstandingFence {
                        id: 4,
                        kind: Access::DeviceWrite,
                        holder: 2,
                        sync_file_slot: Some(0),
                    }],
                    ..fake_broker::grant(9, *access)
                };
                let message = ServerMessage::Reply(Reply {
                    id,
                    fds: 1,
                    result: Ok(ReplyBody::Granted(grant)),
                });
                // Any fd stands for the fence's sync_file: it never arrives.
                fake_broker::send(socket, &message, &[fd.as_fd()]);
            }
            RequestBody::ListHeaps => {
                fake_broker::reply(socket, id, Ok(ReplyBody::Heaps(Vec::new())))
            }
            _ => {}
        }
        true
    });
    let client = Client::connect_to(&broker.path).expect("connect");
    let buffer = client.alloc(4096).expect("alloc");
    let begun = {
        let _full = FdTableFull::new();
        buffer.begin(Access::DeviceRead)
    };
    let err = begun.expect_err("no room for the fence's sync_file");
    assert_fd_table_full(&err);
    client.heaps().expect("heaps");
    let seen = broker.seen();
    assert!(
        seen.iter().any(|body| matches!(
            body,
            RequestBody::End {
                access: 9,
                fence_slot: None
            }
        )),
        "the access granted to the failed begin was never ended: {seen:?}"
    );
    drop((buffer, client));
    broker.join();
}

/// A program ending thousands of accesses in a burst (each drop a
/// pipelined one-way `End`) while another thread allocates with its fd
/// table full, and the broker busy for a moment: the `Free` for the
/// buffer whose fd was lost found the socket's send buffer full of ends.
/// Sent without waiting, it was dropped without a word, and the buffer
/// stayed charged to the client until it disconnected, though the alloc's
/// `FdTableFull` said it had been handed back.
#[test]
fn a_give_back_that_finds_the_socket_full_is_sent_once_there_is_room() {
    const GUARDS: u64 = 2_000;
    let _turn = one_at_a_time();
    let (fd, inode) = fake_broker::memfd();
    let (alloc_seen, alloc_arrived) = channel();
    let mut allocs = 0;
    let broker = FakeBroker::start(1, move |socket, _, id, body| {
        match body {
            RequestBody::Alloc { .. } => {
                allocs += 1;
                if allocs == 1 {
                    fake_broker::reply_with_buffer(socket, id, &fd, inode);
                } else {
                    // Busy for a moment: reads nothing while the ends
                    // fill the client's socket, answers the alloc with a
                    // buffer whose fd the client has no room for, and
                    // still reads nothing for a moment.
                    let _ = alloc_seen.send(());
                    std::thread::sleep(Duration::from_secs(1));
                    let info = BufferInfo {
                        id: 2,
                        ..fake_broker::buffer_info(inode)
                    };
                    let message = ServerMessage::Reply(Reply {
                        id,
                        fds: 1,
                        result: Ok(ReplyBody::Buffer(info)),
                    });
                    fake_broker::send(socket, &message, &[fd.as_fd()]);
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
            RequestBody::Begin { access, .. } => {
                let grant = fake_broker::grant(id, *access);
                fake_broker::reply(socket, id, Ok(ReplyBody::Granted(grant)));
            }
            RequestBody::ListHeaps => {
                fake_broker::reply(socket, id, Ok(ReplyBody::Heaps(Vec::new())))
            }
            _ => {}
        }
        true
    });
    let client = Client::connect_to(&broker.path).expect("connect");
    let buffer = client.alloc(4096).expect("alloc");
    let guards: Vec<_> = (0..GUARDS)
        .map(|_| buffer.begin(Access::DeviceRead).expect("begin"))
        .collect();
    let dropper = std::thread::spawn(move || {
        // Once the broker has stopped reading: the ends fill the socket.
        alloc_arrived.recv().expect("the second alloc");
        drop(guards);
    });
    let alloc = {
        let _full = FdTableFull::new();
        client.alloc(4096)
    };
    let err = alloc.expect_err("no room for the buffer's fd");
    assert_fd_table_full(&err);
    dropper.join().expect("dropper");
    // A round trip: anything the client sent before it has arrived.
    client.heaps().expect("heaps");
    let seen = broker.seen();
    let ends = seen
        .iter()
        .filter(|body| matches!(body, RequestBody::End { .. }))
        .count();
    assert_eq!(ends as u64, GUARDS, "every access was ended");
    assert!(
        seen.iter()
            .any(|body| matches!(body, RequestBody::Free { buffer: 2 })),
        "the buffer the broker allocated for the failed alloc was never freed"
    );
    drop((buffer, client));
    broker.join();
}

/// The same as the alloc above against the real daemon, with
/// `max_buffers = 1`: after one alloc failed for lack of fds in this
/// process, the client held no `Buffer` at all, yet its next alloc was
/// refused `QuotaExceeded`: the broker still charged it the buffer nobody
/// could free.
#[test]
fn an_alloc_answered_while_out_of_fds_is_not_charged_to_the_client() {
    let _turn = one_at_a_time();
    let daemon = dmabroker_suite::Daemon::start_with(dmabroker_suite::DaemonOptions {
        policy: Some("[default]\nmax_buffers = 1\n".to_owned()),
        ..Default::default()
    });
    let client = daemon.client();
    let alloc = {
        let _full = FdTableFull::new();
        client.alloc(4096)
    };
    let err = alloc.expect_err("no room for the buffer's fd");
    assert_fd_table_full(&err);
    let buffer = match client.alloc(4096) {
        Ok(buffer) => buffer,
        Err(err) => panic!("the second alloc, holding no buffer: {err}"),
    };
    assert!(buffer.map().is_ok(), "a buffer that works");
}
