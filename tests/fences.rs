//! Fence arbitration between real processes through the real daemon:
//! readers share, writers exclude, waiters are served in order, deaths and
//! timeouts release what they held.

use std::time::{Duration, Instant};

use dmabroker_ipc::{Access, ErrorCode, Event, ReplyBody, RequestBody, ServerMessage};
use dmabroker_suite::raw::RawClient;
use dmabroker_suite::scripted::{access_of, field, Shared};
use dmabroker_suite::{Daemon, DaemonOptions};

/// How long we wait to be sure a blocked begin stays blocked.
const STILL_BLOCKED: Duration = Duration::from_millis(300);

#[test]
fn readers_share_the_buffer() {
    let mut s = Shared::new(Daemon::start(), 8192);
    let mut reader = s.join(&[]);
    // Both held at once: the second begin is answered while the first
    // read is still held (a blocked begin would time `ok` out).
    let a = s.owner.ok(&format!("begin {} r", s.id));
    let b = reader.ok(&format!("begin {} r", s.id));
    for granted in [&a, &b] {
        assert_eq!(field(granted, "writer_lost"), Some("false"), "{granted}");
    }
}

#[test]
fn a_writer_waits_for_readers_and_readers_wait_for_the_writer() {
    let mut s = Shared::new(Daemon::start(), 8192);
    let mut writer = s.join(&[]);
    let read = s.owner.ok(&format!("begin {} r", s.id));

    writer.send(&format!("begin {} w", s.id));
    assert_eq!(
        writer.recv(STILL_BLOCKED),
        None,
        "a writer must wait for the reader"
    );
    s.owner.ok(&format!("end {}", access_of(&read)));
    let granted = writer
        .recv(Duration::from_secs(5))
        .expect("writer granted after the read ended");
    assert!(granted.starts_with("ok"), "{granted}");
    assert_eq!(field(&granted, "writer_lost"), Some("false"));

    s.owner.send(&format!("begin {} r", s.id));
    assert_eq!(
        s.owner.recv(STILL_BLOCKED),
        None,
        "a reader must wait for the writer"
    );
    writer.ok(&format!("fill {} 77", access_of(&granted)));
    writer.ok(&format!("end {}", access_of(&granted)));
    let read = s
        .owner
        .recv(Duration::from_secs(5))
        .expect("reader granted");
    assert!(read.starts_with("ok"), "{read}");
    s.owner.ok(&format!("end {}", access_of(&read)));
    assert_eq!(
        field(&s.owner.ok(&format!("read {}", s.id)), "byte"),
        Some("77")
    );
}

#[test]
fn a_waiting_writer_holds_back_later_readers() {
    let mut s = Shared::new(Daemon::start(), 8192);
    let mut writer = s.join(&[]);
    let mut late_reader = s.join(&[]);
    let first = s.owner.ok(&format!("begin {} r", s.id));
    writer.send(&format!("begin {} w", s.id));
    assert_eq!(writer.recv(STILL_BLOCKED), None);
    late_reader.send(&format!("begin {} r", s.id));
    assert_eq!(
        late_reader.recv(STILL_BLOCKED),
        None,
        "a reader arriving after a waiting writer must not overtake it"
    );
    s.owner.ok(&format!("end {}", access_of(&first)));
    let w = writer.recv(Duration::from_secs(5)).expect("writer first");
    assert!(w.starts_with("ok"), "{w}");
    assert_eq!(
        late_reader.recv(STILL_BLOCKED),
        None,
        "still behind the writer"
    );
    writer.ok(&format!("end {}", access_of(&w)));
    let r = late_reader
        .recv(Duration::from_secs(5))
        .expect("then the reader");
    assert!(r.starts_with("ok"), "{r}");
}

#[test]
fn a_writer_killed_while_writing_hands_over_with_writer_lost_within_100ms() {
    let s = Shared::new(Daemon::start(), 8192);
    let baseline_clients = s.daemon.baseline();
    let mut writer = s.join(&[]);
    let mut reader = s.join(&[]);
    writer.ok(&format!("begin {} w", s.id));
    reader.send(&format!("begin {} r", s.id));
    assert_eq!(reader.recv(STILL_BLOCKED), None);
    let killed = Instant::now();
    writer.kill();
    let granted = reader
        .recv(Duration::from_secs(5))
        .expect("reader granted after the writer died");
    let latency = killed.elapsed();
    assert!(granted.starts_with("ok"), "{granted}");
    assert_eq!(field(&granted, "writer_lost"), Some("true"), "{granted}");
    assert!(
        latency < Duration::from_millis(100),
        "granted {latency:?} after SIGKILL"
    );
    reader.ok(&format!("end {}", access_of(&granted)));
    // The next grant is clean again.
    let again = reader.ok(&format!("begin {} r", s.id));
    assert_eq!(field(&again, "writer_lost"), Some("false"));
    reader.ok(&format!("end {}", access_of(&again)));
    drop(reader);
    s.daemon.assert_fds_back_to(baseline_clients);
}

#[test]
fn a_begin_with_a_timeout_gives_up_and_leaves_the_queue() {
    let mut s = Shared::new(Daemon::start(), 8192);
    let mut waiter = s.join(&[]);
    let mut next = s.join(&[]);
    let held = s.owner.ok(&format!("begin {} w", s.id));
    let started = Instant::now();
    let err = waiter
        .cmd(&format!("begin {} w 150", s.id))
        .expect_err("times out");
    assert!(err.contains("timeout"), "{err}");
    assert!(started.elapsed() >= Duration::from_millis(150));
    // The timed-out request is gone: after the holder ends, the next
    // waiter is granted, not the dead request.
    next.send(&format!("begin {} w", s.id));
    assert_eq!(next.recv(STILL_BLOCKED), None);
    s.owner.ok(&format!("end {}", access_of(&held)));
    let granted = next.recv(Duration::from_secs(5)).expect("granted");
    assert!(granted.starts_with("ok"), "{granted}");
}

#[test]
fn no_autofence_is_never_blocked_and_gets_the_outstanding_fences() {
    // Accesses with lasting ids (held in a buffer word they would have
    // none; tests/buffer_words.rs covers that case).
    let mut s = Shared::new_with(Daemon::start(), 8192, &["--no-buffer-words"]);
    let mut gpu = s.join(&["--no-autofence"]);
    let mut autofenced = s.join(&[]);
    let write = s.owner.ok(&format!("begin {} w", s.id));
    let write_id = access_of(&write);

    let started = Instant::now();
    let granted = gpu.ok(&format!("begin {} dr", s.id));
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "no-autofence must not block"
    );
    assert_eq!(field(&granted, "fences"), Some("1"), "{granted}");
    let fence = field(&granted, "fence_list").expect("fence list");
    let parts: Vec<&str> = fence.split(':').collect();
    assert_eq!(
        parts[0], write_id,
        "the outstanding fence is the writer's access"
    );
    assert_eq!(parts[2], "cpu-write");
    assert_eq!(
        parts[3], "false",
        "a CPU fence has no sync_file: an event comes instead"
    );

    // An autofence client waits for the no-autofence client's fence too.
    autofenced.send(&format!("begin {} w", s.id));
    assert_eq!(autofenced.recv(STILL_BLOCKED), None);

    s.owner.ok(&format!("end {write_id}"));
    let event = gpu.ok("event 5000");
    assert!(
        event.contains(&format!("FenceSignalled {{ fence: {write_id} }}")),
        "{event}"
    );
    assert_eq!(
        autofenced.recv(STILL_BLOCKED),
        None,
        "still fenced by the device read"
    );
    gpu.ok(&format!("end {}", access_of(&granted)));
    let w = autofenced.recv(Duration::from_secs(5)).expect("granted");
    assert!(w.starts_with("ok"), "{w}");
}

/// Access ids are small counters: someone else's access must look exactly
/// like one that does not exist (as someone else's buffer does), and the
/// refusal must change nothing.
#[test]
fn a_client_cannot_end_another_clients_access() {
    // By id: an access in a buffer word has none, and only holders can
    // touch the word at all.
    let mut s = Shared::new_with(Daemon::start(), 8192, &["--no-buffer-words"]);
    let held = s.owner.ok(&format!("begin {} w", s.id));
    let access: u64 = access_of(&held).parse().expect("number");
    let mut intruder = RawClient::connect(s.daemon.socket());
    intruder.hello();
    let mut end = |access| {
        intruder
            .request(RequestBody::End {
                access,
                fence_slot: None,
            })
            .err()
    };
    assert_eq!(
        end(access),
        Some(ErrorCode::UnknownAccess),
        "someone else's"
    );
    assert_eq!(
        end(access + 1_000),
        Some(ErrorCode::UnknownAccess),
        "an access nobody has"
    );
    // Still held: another writer stays blocked.
    let mut other = s.join(&[]);
    other.send(&format!("begin {} w", s.id));
    assert_eq!(
        other.recv(STILL_BLOCKED),
        None,
        "the refused end must change nothing"
    );
    s.owner.ok(&format!("end {access}"));
    assert!(other
        .recv(Duration::from_secs(5))
        .expect("granted")
        .starts_with("ok"));
}

#[test]
fn a_write_held_past_its_limit_is_revoked() {
    let options = DaemonOptions {
        policy: Some("[default]\nwrite_hold_limit = \"200ms\"\n".into()),
        ..Default::default()
    };
    let mut s = Shared::new(Daemon::start_with(options), 8192);
    let mut reader = s.join(&[]);
    s.owner.ok(&format!("begin {} w", s.id));
    reader.send(&format!("begin {} r", s.id));
    let granted = reader
        .recv(Duration::from_secs(5))
        .expect("granted once the write is revoked");
    assert!(granted.starts_with("ok"), "{granted}");
    assert_eq!(field(&granted, "revoked"), Some("true"), "{granted}");
    let event = s.owner.ok("event 5000");
    assert!(event.contains("AccessRevoked"), "{event}");
}

/// A `Free` while the access is held (the client crate sends none while
/// a guard lives: a raw client).
#[test]
fn freeing_a_buffer_while_holding_access_releases_it() {
    let s = Shared::new(Daemon::start(), 8192);
    let mut other = s.join(&[]);
    let mut holder = RawClient::connect(s.daemon.socket());
    holder.hello();
    let buffer = holder.import(s.token.clone());
    let write = holder.request(RequestBody::Begin {
        buffer,
        access: Access::CpuWrite,
        timeout_ms: None,
    });
    assert!(matches!(write, Ok(ReplyBody::Granted(_))), "{write:?}");
    other.send(&format!("begin {} r", s.id));
    assert_eq!(other.recv(STILL_BLOCKED), None);
    assert_eq!(
        holder.request(RequestBody::Free { buffer }),
        Ok(ReplyBody::Freed)
    );
    let granted = other
        .recv(Duration::from_secs(5))
        .expect("granted after the holder freed");
    assert!(granted.starts_with("ok"), "{granted}");
    assert_eq!(
        field(&granted, "writer_lost"),
        Some("true"),
        "an unfinished write is reported"
    );
}

#[test]
fn a_refused_end_with_fence_leaves_the_access_held_and_endable() {
    let mut s = Shared::new(Daemon::start(), 8192);
    let mut reader = s.join(&[]);
    let write = access_of(&s.owner.ok(&format!("begin {} dw", s.id)));

    let refused = s
        .owner
        .cmd(&format!("end-with-non-fence {write}"))
        .expect_err("a pipe is not a sync_file");
    assert!(refused.starts_with("err invalid-argument"), "{refused}");
    reader.send(&format!("begin {} r", s.id));
    assert_eq!(
        reader.recv(STILL_BLOCKED),
        None,
        "a refused fenced end must not end the device write"
    );

    // The guard came back: ending it lets the reader in.
    s.owner.ok(&format!("end {write}"));
    let granted = reader
        .recv(Duration::from_secs(5))
        .expect("reader granted once the write is ended");
    assert!(granted.starts_with("ok"), "{granted}");
    assert_eq!(field(&granted, "writer_lost"), Some("false"), "{granted}");
}

/// Readers share, in a process too: two reads held at once, by one thread
/// or two, can both look at the bytes. All guards of a buffer share one
/// mapping, and its lock once let only one `Bytes` live at a time: the
/// second `bytes()` in the same thread deadlocked, and readers in two
/// threads took turns.
#[test]
fn two_reads_held_in_one_thread_both_see_the_bytes() {
    let daemon = Daemon::start();
    let (done, outcome) = std::sync::mpsc::channel();
    let socket = daemon.socket().to_owned();
    std::thread::spawn(move || {
        let client = dmabroker_client::Client::connect_to(&socket).expect("connect");
        let frame = client.alloc(8192).expect("alloc");
        {
            let mut write = frame.begin(Access::CpuWrite).expect("write");
            write.bytes_mut().expect("bytes").fill(42);
        }
        let first = frame.begin(Access::CpuRead).expect("first read");
        let second = frame.begin(Access::CpuRead).expect("second read");
        let a = first.bytes().expect("bytes of the first");
        let b = second.bytes().expect("bytes of the second");
        let _ = done.send((a[0], b[8191]));
    });
    let seen = outcome
        .recv_timeout(Duration::from_secs(10))
        .expect("the second bytes() did not deadlock");
    assert_eq!(seen, (42, 42));
}

/// A no-autofence client may hold a read and a write of one buffer at once
/// (it waits for fences itself), and its `bytes_mut` then waits for its
/// `Bytes` to go. Meanwhile the reading thread must still be able to look
/// again: with a lock that lets a waiting writer hold back new readers,
/// its second `bytes()` deadlocked with the writer waiting for its first.
#[test]
fn a_waiting_bytes_mut_does_not_hold_back_the_reader_it_waits_for() {
    let daemon = Daemon::start();
    let (done, outcome) = std::sync::mpsc::channel();
    let socket = daemon.socket().to_owned();
    std::thread::spawn(move || {
        let options = dmabroker_client::ClientOptions {
            autofence: Some(false),
            ..Default::default()
        };
        let client = dmabroker_client::Client::connect_with(&socket, options).expect("connect");
        let frame = std::sync::Arc::new(client.alloc(8192).expect("alloc"));
        let first = frame.begin(Access::CpuRead).expect("read");
        let looking = first.bytes().expect("bytes");
        let writer = {
            let frame = std::sync::Arc::clone(&frame);
            std::thread::spawn(move || {
                let mut write = frame.begin(Access::CpuWrite).expect("write, not blocked");
                write.bytes_mut().expect("bytes_mut").fill(7);
            })
        };
        std::thread::sleep(Duration::from_millis(100)); // the writer waits
        let second = frame.begin(Access::CpuRead).expect("second read");
        let again = second.bytes().expect("bytes again");
        let seen = (looking[0], again[0]);
        drop((again, looking));
        writer.join().expect("writer");
        let _ = done.send(seen);
    });
    let seen = outcome
        .recv_timeout(Duration::from_secs(10))
        .expect("the reader's second bytes() deadlocked with the waiting writer");
    assert_eq!(seen, (0, 0), "the writer waited for the reads");
}

/// A no-autofence client's CPU access syncs the CPU's caches itself (the
/// broker syncs only autofence clients'): the client crate issues
/// `DMA_BUF_IOCTL_SYNC` at the first `bytes()` and at the end. A memfd
/// answers it `ENOTTY`, having no caches to sync: the guards of a memfd
/// buffer must work as before, the write seen by the next read, a second
/// access of the buffer (which no longer asks the kernel) too. Granted by
/// message (no buffer words), the only grants that carry the sync.
#[test]
fn a_no_autofence_cpu_access_to_a_memfd_needs_no_cache_sync() {
    let daemon = Daemon::start();
    let client = daemon
        .client_with(dmabroker_client::ClientOptions {
            autofence: Some(false),
            buffer_words: false,
            ..Default::default()
        })
        .expect("connect");
    assert!(!client.autofence());
    let frame = client.alloc(8192).expect("alloc");
    assert_eq!(frame.heap(), "memfd");
    for value in [7, 9] {
        let mut write = frame.begin(Access::CpuWrite).expect("write");
        assert!(!write.in_word());
        write.bytes_mut().expect("bytes_mut of a memfd").fill(value);
        write.end().expect("the end of a memfd write");
        let read = frame.begin(Access::CpuRead).expect("read");
        assert_eq!(read.bytes().expect("bytes of a memfd")[8191], value);
        drop(read);
    }
}

/// A raw client that has said hello asking for no-autofence.
fn no_autofence(daemon: &Daemon) -> RawClient {
    let mut raw = RawClient::connect(daemon.socket());
    raw.hello_no_autofence();
    raw
}

/// A buffer `owner` allocated and `other` imported: (owner's id, other's id).
fn shared_buffer(owner: &mut RawClient, other: &mut RawClient) -> (u64, u64) {
    let buffer = owner.alloc();
    let token = owner.export(buffer);
    (buffer, other.import(token))
}

fn begin(raw: &mut RawClient, buffer: u64, access: Access) -> dmabroker_ipc::Grant {
    match raw.request(RequestBody::Begin {
        buffer,
        access,
        timeout_ms: None,
    }) {
        Ok(ReplyBody::Granted(grant)) => grant,
        other => panic!("begin: {other:?}"),
    }
}

fn end(raw: &mut RawClient, access: u64) {
    raw.request(RequestBody::End {
        access,
        fence_slot: None,
    })
    .expect("end");
}

/// The fences a client is told have signalled before the answer to one
/// more request, which also shows the connection is still up.
fn signalled_before_a_reply(raw: &mut RawClient, buffer: u64) -> Vec<u64> {
    let (id, bytes) = raw.encode(RequestBody::Info { buffer }, 0);
    raw.send_raw(&bytes, &[]);
    let mut fences = Vec::new();
    loop {
        match raw.recv() {
            Some((ServerMessage::Event(message), _)) => match message.event {
                Event::FenceSignalled { fence } => fences.push(fence),
                other => panic!("unexpected event {other:?}"),
            },
            Some((ServerMessage::Reply(reply), _)) if reply.id == id => return fences,
            Some((ServerMessage::Reply(reply), _)) => panic!("unexpected reply {reply:?}"),
            None => panic!("the broker hung up after {} fence events", fences.len()),
        }
    }
}

/// A no-autofence client that begins again while the same fence is still
/// outstanding is told once when that fence ends: a subscription per grant
/// sent the event once per begin, and grew the broker's memory with every
/// begin for as long as the fence lasted.
#[test]
fn a_fence_listed_in_many_grants_is_announced_once() {
    let daemon = Daemon::start();
    let mut reader = no_autofence(&daemon);
    let mut writer = no_autofence(&daemon);
    let (read_on, write_on) = shared_buffer(&mut reader, &mut writer);
    let read = begin(&mut reader, read_on, Access::CpuRead).access;
    for _ in 0..5 {
        let grant = begin(&mut writer, write_on, Access::CpuWrite);
        assert_eq!(grant.fences.len(), 1, "the read is listed");
        end(&mut writer, grant.access);
    }
    end(&mut reader, read);
    assert_eq!(signalled_before_a_reply(&mut writer, write_on), vec![read]);
}

/// Events a client has not read yet count against its unread-replies cap,
/// so another client ending many listed fences at once could get a live
/// no-autofence client cut off. Each signalled fence is owed exactly one
/// event, which the broker keeps however slowly the client reads.
#[test]
fn many_fences_ending_at_once_do_not_cut_off_the_client_waiting_for_them() {
    let daemon = Daemon::start();
    let mut readers = no_autofence(&daemon);
    let mut writer = no_autofence(&daemon);
    let (read_on, write_on) = shared_buffer(&mut readers, &mut writer);
    let reads: Vec<u64> = (0..1000)
        .map(|_| begin(&mut readers, read_on, Access::CpuRead).access)
        .collect();
    let grant = begin(&mut writer, write_on, Access::CpuWrite);
    assert_eq!(grant.fences.len(), reads.len());
    // The writer reads nothing while every read ends.
    for &read in &reads {
        end(&mut readers, read);
    }
    let mut told = signalled_before_a_reply(&mut writer, write_on);
    told.sort_unstable();
    assert_eq!(told, reads, "every read's end, once each");
}

/// A guard begun on a `Buffer` that is dropped at once (a temporary:
/// `client.import(&token)?.begin(..)?`) keeps the hold, and so its
/// access: another client's write waits until the guard goes. Before, the
/// temporary's drop freed the hold, the broker released the read and
/// granted the queued write while `bytes()` still handed out the
/// mapping. Found by review. `client` makes the reader's connection.
fn a_guard_outlives_its_temporary_buffer(
    client: impl Fn(&Daemon) -> dmabroker_client::Client,
    common: &[&str],
) {
    let s = Shared::new_with(Daemon::start(), 8192, common);
    let mut writer = s.join(&[]);
    let reader = client(&s.daemon);
    let token: dmabroker_client::ShareToken = s.token.parse().expect("token");
    let guard = reader
        .import(&token)
        .expect("import")
        .begin(Access::CpuRead)
        .expect("read granted");
    writer.send(&format!("begin {} w", s.id));
    assert_eq!(
        writer.recv(STILL_BLOCKED),
        None,
        "the write must wait for the guard of the dropped buffer"
    );
    assert_eq!(guard.bytes().expect("bytes").len(), 8192);
    drop(guard);
    let granted = writer
        .recv(Duration::from_secs(5))
        .expect("the write is granted once the guard goes");
    assert!(granted.starts_with("ok"), "{granted}");
    // The access ended before the hold was freed, and both were taken.
    assert_eq!(reader.take_errors(), Vec::new());
    writer.ok(&format!("end {}", access_of(&granted)));
}

#[test]
fn a_guard_outlives_its_temporary_buffer_in_the_word() {
    a_guard_outlives_its_temporary_buffer(Daemon::client, &[]);
}

#[test]
fn a_guard_outlives_its_temporary_buffer_by_message() {
    a_guard_outlives_its_temporary_buffer(
        |daemon| daemon.message_path_client().expect("connect"),
        &["--no-buffer-words"],
    );
}
