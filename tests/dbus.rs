//! The D-Bus debug interface and `dmabrokerctl`, end to end: a private
//! `dbus-daemon`, the real `dmabrokerd` on it, real client processes, and
//! `busctl`/`dmabrokerctl` reading what they do.

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use dmabroker_suite::dbus::{self, DbusDaemon, BUS_NAME, INTERFACE, OBJECT_PATH};
use dmabroker_suite::scripted::field;
use dmabroker_suite::{eventually, have_root, Daemon, DaemonOptions, Scripted};
use serde_json::Value;

const NOBODY: u32 = 65534;

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn errtext(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}): {}{}",
        out.status,
        errtext(&out),
        text(&out)
    );
    text(&out)
}

/// A buffer with one client writing it and another waiting to read it.
struct Scene {
    bus: DbusDaemon,
    daemon: Daemon,
    owner: Scripted,
    writer: Scripted,
    reader: Scripted,
    buffer: u64,
    access: u64,
}

impl Scene {
    fn new() -> Scene {
        let bus = DbusDaemon::start();
        let daemon = bus.start_broker(None);
        let mut owner = Scripted::spawn(daemon.socket(), &[]);
        let alloc = owner.ok("alloc 65536 name=frame");
        let buffer: u64 = field(&alloc, "id").expect("id").parse().expect("buffer id");
        let token = field(&owner.ok(&format!("export {buffer}")), "token")
            .expect("token")
            .to_owned();
        // The writer's access must keep its id while the views are read,
        // so it stays out of the buffer word (whose accesses the views
        // show too: tests/buffer_words.rs).
        let mut writer = Scripted::spawn(daemon.socket(), &["--no-buffer-words"]);
        writer.ok(&format!("import {token}"));
        let access: u64 = field(&writer.ok(&format!("begin {buffer} w")), "access")
            .expect("access")
            .parse()
            .expect("access id");
        let mut reader = Scripted::spawn(daemon.socket(), &[]);
        reader.ok(&format!("import {token}"));
        // Blocks until the writer ends: its answer comes later.
        reader.send(&format!("begin {buffer} r"));
        let scene = Scene {
            bus,
            daemon,
            owner,
            writer,
            reader,
            buffer,
            access,
        };
        eventually("the reader to queue", || {
            scene.bus.property("Totals")[4].as_u64() == Some(1)
        });
        scene
    }

    /// The daemon's client id of a process, from ListClients.
    fn client_id(&self, process: &Scripted) -> u64 {
        let clients = self.bus.method("ListClients", &[]);
        clients
            .as_array()
            .expect("client list")
            .iter()
            .find(|c| c[2].as_i64() == Some(process.pid() as i64))
            .and_then(|c| c[0].as_u64())
            .expect("client listed")
    }
}

#[test]
fn introspection_shows_the_versioned_interface_and_no_fds() {
    let bus = DbusDaemon::start();
    let _daemon = bus.start_broker(None);
    let out = ok(
        bus.busctl(&["introspect", BUS_NAME, OBJECT_PATH]),
        "busctl introspect",
    );
    let members: Vec<(&str, &str, &str)> = out
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            Some((words.next()?, words.next()?, words.next()?))
        })
        .collect();
    let has = |name: &str, kind: &str, signature: &str| {
        members
            .iter()
            .any(|(n, k, s)| *n == name && *k == kind && *s == signature)
    };
    assert!(has(INTERFACE, "interface", "-"), "{out}");
    for (name, kind, signature) in [
        (".ListClients", "method", "-"),
        (".ListBuffers", "method", "-"),
        (".GetBuffer", "method", "t"),
        (".Statistics", "method", "-"),
        (".ReloadPolicy", "method", "-"),
        (".Version", "property", "s"),
        (".Instance", "property", "s"),
        (".StartedAt", "property", "t"),
        (".Heaps", "property", "a(sstt)"),
        (".Totals", "property", "(ttttt)"),
        (".ClientConnected", "signal", "tui"),
        (".ClientDisconnected", "signal", "t"),
        (".BufferAllocated", "signal", "ttst"),
        (".BufferFreed", "signal", "t"),
        (".WriterLost", "signal", "tt"),
        (".AccessRevoked", "signal", "ttt"),
        (".ListAllocationsInFlight", "method", "-"),
        (".AllocationsInFlight", "property", "t"),
        (".AllocationsRunning", "property", "t"),
        (".CacheSyncsFailed", "property", "t"),
        (".CacheEndsRunning", "property", "t"),
        (".ListCloses", "method", "-"),
        (".ClosesWaiting", "property", "t"),
        (".ClosingThreads", "property", "t"),
    ] {
        assert!(
            has(name, kind, signature),
            "{name} {kind} {signature} missing:\n{out}"
        );
    }
    // Results: lists of clients and buffers with fences and waiters inside.
    assert!(out.contains("a(tuissssstttttt)"), "{out}");
    assert!(out.contains("a(tssstttata(tstsst)a(ttst)t)"), "{out}");
    // Per client, its allocations in flight: (heap, size, name, age).
    assert!(out.contains("a(ttta(stst))"), "{out}");
    // Per closing queue: users, lane, waiting, thread, in line, in hand
    // (µs), held back.
    assert!(out.contains("a(austbbtb)"), "{out}");
    // No method, property or signal of ours carries a file descriptor.
    let ours: Vec<&str> = out
        .lines()
        .skip_while(|l| !l.starts_with(INTERFACE))
        .skip(1)
        .take_while(|l| l.starts_with('.'))
        .collect();
    assert!(ours.len() >= 16, "{out}");
    for line in ours {
        let columns: Vec<&str> = line.split_whitespace().collect();
        assert!(
            !columns[2].contains('h')
                && !columns
                    .get(3)
                    .is_some_and(|r| r.contains('h') && !r.starts_with('"')),
            "an fd in {line}"
        );
    }
}

#[test]
fn every_method_shows_fences_and_waiters_of_real_clients() {
    let mut scene = Scene::new();
    let bus = &scene.bus;
    let owner = scene.client_id(&scene.owner);
    let writer = scene.client_id(&scene.writer);
    let reader = scene.client_id(&scene.reader);

    // Version, heaps, totals.
    assert_eq!(bus.property("Version"), env!("CARGO_PKG_VERSION"));
    assert!(bus
        .property("Instance")
        .as_str()
        .is_some_and(|s| !s.is_empty()));
    assert!(bus
        .property("StartedAt")
        .as_u64()
        .is_some_and(|t| t > 1_600_000_000));
    assert_eq!(
        bus.property("Heaps"),
        serde_json::json!([["memfd", "memfd", 1, 65536]])
    );
    assert_eq!(
        bus.property("Totals"),
        serde_json::json!([3, 1, 65536, 1, 1])
    );

    // Clients: (id, uid, pid, name, exe, unit, rule, autofence, buffers,
    // bytes, held, waiting, longest wait, connected at).
    let clients = bus.method("ListClients", &[]);
    let clients = clients.as_array().expect("clients");
    assert_eq!(clients.len(), 3);
    let row = |id: u64| {
        clients
            .iter()
            .find(|c| c[0] == id)
            .expect("client row")
            .clone()
    };
    let o = row(owner);
    assert_eq!(o[1], 0, "uid");
    assert_eq!(o[2], scene.owner.pid() as i64, "pid");
    assert_eq!(o[3], "testclient");
    assert!(
        o[4].as_str()
            .is_some_and(|e| e.ends_with("dmabroker-testclient")),
        "{o}"
    );
    assert_eq!(o[6], "default");
    assert_eq!(o[7], "autofence");
    assert_eq!(
        (o[8].clone(), o[9].clone()),
        (1.into(), 65536.into()),
        "owner is charged"
    );
    let w = row(writer);
    assert_eq!(
        (w[10].clone(), w[11].clone()),
        (1.into(), 0.into()),
        "writer holds one access"
    );
    let r = row(reader);
    assert_eq!(
        (r[10].clone(), r[11].clone()),
        (0.into(), 1.into()),
        "reader waits"
    );
    assert!(
        r[12].as_u64().is_some_and(|us| us > 0),
        "reader's wait has an age: {r}"
    );

    // Buffers: (id, heap, backend, name, size, inode, owner, holders,
    // fences, waiters, created at).
    let buffers = bus.method("ListBuffers", &[]);
    let b = &buffers[0];
    assert_eq!(buffers.as_array().map(Vec::len), Some(1));
    assert_eq!(b[0], scene.buffer);
    assert_eq!(
        (b[1].clone(), b[3].clone(), b[4].clone()),
        ("memfd".into(), "frame".into(), 65536.into())
    );
    assert!(b[5].as_u64().is_some_and(|i| i > 0), "inode");
    assert_eq!(b[6], owner);
    assert_eq!(b[7], serde_json::json!([owner, writer, reader]));
    let fences = b[8].as_array().expect("fences");
    assert_eq!(fences.len(), 1, "{b}");
    assert_eq!(fences[0][0], scene.access);
    assert_eq!(fences[0][1], "cpu-write");
    assert_eq!(fences[0][2], writer);
    assert_eq!(fences[0][3], "held");
    assert_eq!(fences[0][4], "autofence");
    assert!(fences[0][5].as_u64().is_some_and(|age| age > 0));
    let waiters = b[9].as_array().expect("waiters");
    assert_eq!(waiters.len(), 1, "{b}");
    assert_eq!(waiters[0][1], reader);
    assert_eq!(waiters[0][2], "cpu-read");

    // One buffer in detail: (buffer, holders, share tokens, dma-buf).
    let detail = bus.method("GetBuffer", &["t", &scene.buffer.to_string()]);
    for i in [0, 1, 2, 3, 4, 5, 6, 7, 10] {
        assert_eq!(detail[0][i], b[i], "field {i} of {detail}");
    }
    assert_eq!(detail[0][8][0][0], scene.access);
    assert_eq!(detail[0][9][0][1], reader);
    let holders = detail[1].as_array().expect("holders");
    assert_eq!(holders.len(), 3);
    assert_eq!(holders[0][0], owner);
    assert_eq!(holders[0][1], scene.owner.pid() as i64);
    assert_eq!(detail[2], 1, "the owner's one share token: {detail}");
    assert_eq!(detail[3], false, "memfd is not a dma-buf");
    let missing = bus.busctl(&[
        "call",
        BUS_NAME,
        OBJECT_PATH,
        INTERFACE,
        "GetBuffer",
        "t",
        "999",
    ]);
    assert!(!missing.status.success());
    assert!(
        errtext(&missing).contains("no buffer has id 999"),
        "{}",
        errtext(&missing)
    );

    // The writer ends: the reader gets in after a measured wait.
    scene.writer.ok(&format!("end {}", scene.access));
    let granted = scene
        .reader
        .recv(Duration::from_secs(10))
        .expect("reader granted");
    assert!(granted.starts_with("ok access="), "{granted}");
    // Statistics: (allocations, frees, imports, exports, adoptions, grants,
    // waits, p50, p99, cache syncs, skipped, writer lost, revocations,
    // timeouts, kernel fences, refusals).
    let stats = bus.method("Statistics", &[]);
    assert_eq!(stats[0], 1, "allocations {stats}");
    assert_eq!(stats[2], 2, "imports {stats}");
    assert_eq!(stats[3], 1, "exports {stats}");
    assert_eq!(stats[5], 2, "grants {stats}");
    assert_eq!(stats[6], 1, "waits {stats}");
    assert!(stats[7].as_u64().is_some_and(|p50| p50 > 0), "p50 {stats}");
    assert!(stats[8].as_u64() >= stats[7].as_u64(), "p99 {stats}");
    assert!(stats[15].is_object(), "refusals by reason {stats}");
    let after = bus.method("ListBuffers", &[]);
    assert_eq!(after[0][8][0][1], "cpu-read");
    assert_eq!(after[0][8][0][2], reader);
    assert_eq!(after[0][9], serde_json::json!([]));
}

#[test]
fn refusals_are_counted_by_reason() {
    let bus = DbusDaemon::start();
    let daemon = bus.start_broker(Some("[default]\nmax_buffer_size = \"64K\"\n"));
    let mut client = Scripted::spawn(daemon.socket(), &[]);
    let refused = client.cmd("alloc 1048576").expect_err("too large");
    let code = refused
        .split_whitespace()
        .nth(1)
        .expect("error code")
        .to_owned();
    let stats = bus.method("Statistics", &[]);
    assert_eq!(stats[15][code.as_str()], 1, "{stats}");
}

/// `busctl monitor` on the daemon's name, line by line.
struct Monitor {
    child: std::process::Child,
    lines: mpsc::Receiver<Value>,
}

impl Monitor {
    fn start(bus: &DbusDaemon) -> Monitor {
        let mut child = Command::new("busctl")
            .arg(format!("--address={}", bus.address()))
            .args(["--json=short", "monitor", BUS_NAME])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("busctl monitor");
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    if tx.send(v).is_err() {
                        break;
                    }
                }
            }
        });
        // It says so on stderr once the bus has made it a monitor.
        let mut first = String::new();
        let _ = BufReader::new(stderr).read_line(&mut first);
        assert!(
            first.contains("Monitoring"),
            "busctl monitor did not start: {first}"
        );
        Monitor { child, lines }
    }

    /// Waits for the signal `member` and returns its arguments.
    fn expect(&self, member: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let message = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no {member} signal"));
            if message["type"] == "signal" && message["member"] == member {
                assert_eq!(message["interface"], INTERFACE);
                assert_eq!(message["path"], OBJECT_PATH);
                return message["payload"]["data"].clone();
            }
        }
    }

    /// Every signal of the interface up to and including `member` with
    /// arguments `data`, as (member, arguments), oldest first.
    fn signals_until(&self, member: &str, data: &Value) -> Vec<(String, Value)> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut signals = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let message = self.lines.recv_timeout(left).unwrap_or_else(|_| {
                panic!("no {member} {data} signal after {} others", signals.len())
            });
            if message["type"] != "signal" || message["interface"] != INTERFACE {
                continue;
            }
            let name = message["member"].as_str().expect("member").to_owned();
            let args = message["payload"]["data"].clone();
            let last = name == member && args == *data;
            signals.push((name, args));
            if last {
                return signals;
            }
        }
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn signals_follow_clients_buffers_and_lost_writers() {
    let bus = DbusDaemon::start();
    let daemon = bus.start_broker(None);
    let monitor = Monitor::start(&bus);

    let mut writer = Scripted::spawn(daemon.socket(), &[]);
    let connected = monitor.expect("ClientConnected");
    let id = connected[0].as_u64().expect("client id");
    assert_eq!(connected[1], 0, "uid");
    assert_eq!(connected[2], writer.pid() as i64, "pid");

    let scratch: u64 = field(&writer.ok("alloc 8192"), "id")
        .expect("id")
        .parse()
        .expect("id");
    assert_eq!(
        monitor.expect("BufferAllocated"),
        serde_json::json!([scratch, 8192, "memfd", id])
    );
    let shared: u64 = field(&writer.ok("alloc 4096"), "id")
        .expect("id")
        .parse()
        .expect("id");
    assert_eq!(
        monitor.expect("BufferAllocated"),
        serde_json::json!([shared, 4096, "memfd", id])
    );
    let token = field(&writer.ok(&format!("export {shared}")), "token")
        .expect("token")
        .to_owned();
    let mut reader = Scripted::spawn(daemon.socket(), &[]);
    let reader_id = monitor.expect("ClientConnected")[0].as_u64().expect("id");
    reader.ok(&format!("import {token}"));

    // The writer dies holding the shared buffer while the reader waits.
    writer.ok(&format!("begin {shared} w"));
    reader.send(&format!("begin {shared} r"));
    eventually("the reader to queue", || {
        bus.property("Totals")[4].as_u64() == Some(1)
    });
    writer.kill();
    assert_eq!(
        monitor.expect("WriterLost"),
        serde_json::json!([shared, id])
    );
    // Only the buffer nobody else holds is freed.
    assert_eq!(monitor.expect("BufferFreed"), serde_json::json!([scratch]));
    assert_eq!(
        monitor.expect("ClientDisconnected"),
        serde_json::json!([id])
    );
    let granted = reader
        .recv(Duration::from_secs(10))
        .expect("reader granted");
    assert!(granted.contains("writer_lost=true"), "{granted}");
    let stats = bus.method("Statistics", &[]);
    assert_eq!(stats[11], 1, "writer lost: {stats}");

    reader.kill();
    assert_eq!(monitor.expect("BufferFreed"), serde_json::json!([shared]));
    assert_eq!(
        monitor.expect("ClientDisconnected"),
        serde_json::json!([reader_id])
    );
}

#[test]
fn signals_report_revoked_accesses() {
    let bus = DbusDaemon::start();
    let daemon = bus.start_broker(Some("[default]\nwrite_hold_limit = \"200ms\"\n"));
    let monitor = Monitor::start(&bus);
    let mut client = Scripted::spawn(daemon.socket(), &[]);
    let id = monitor.expect("ClientConnected")[0].as_u64().expect("id");
    let buffer: u64 = field(&client.ok("alloc 4096"), "id")
        .expect("id")
        .parse()
        .expect("id");
    let access: u64 = field(&client.ok(&format!("begin {buffer} w")), "access")
        .expect("access")
        .parse()
        .expect("access id");
    assert_eq!(
        monitor.expect("AccessRevoked"),
        serde_json::json!([buffer, access, id])
    );
    let stats = bus.method("Statistics", &[]);
    assert_eq!(stats[12], 1, "revocations: {stats}");
}

/// operations.md: signals are best-effort: past 1,024 notices behind, the
/// oldest are dropped, and the daemon logs how many, rather than slowing
/// the broker. The bus is stopped (`SIGSTOP`) while a client allocates
/// and frees 3,000 buffers, so the daemon's connection to it fills and
/// its signals fall behind: every request is still answered, and once
/// the bus runs again a monitor gets the signals sent before the stall,
/// then the newest 1,024, in order; the log's count is the difference,
/// and the view and its signals go on.
#[test]
fn signals_past_1024_behind_are_dropped_and_counted_while_the_broker_serves_on() {
    const PAIRS: usize = 3000;
    const KEPT: usize = 1024;
    let bus = DbusDaemon::start();
    let daemon = bus.start_broker(None);
    let monitor = Monitor::start(&bus);
    let mut client = Scripted::spawn(daemon.socket(), &[]);
    let id = monitor.expect("ClientConnected")[0]
        .as_u64()
        .expect("client id");

    let bus_pid = nix::unistd::Pid::from_raw(bus.pid() as i32);
    nix::sys::signal::kill(bus_pid, nix::sys::signal::Signal::SIGSTOP).expect("stop the bus");
    dmabroker_suite::proc::wait_stopped(bus.pid());
    let mut published = Vec::with_capacity(2 * PAIRS);
    for _ in 0..PAIRS {
        let buffer: u64 = field(&client.ok("alloc 4096"), "id")
            .expect("id")
            .parse()
            .expect("buffer id");
        client.ok(&format!("free {buffer}"));
        published.push((
            "BufferAllocated".to_owned(),
            serde_json::json!([buffer, 4096, "memfd", id]),
        ));
        published.push(("BufferFreed".to_owned(), serde_json::json!([buffer])));
    }
    // The free is one-way: a request behind it is answered once it is
    // done, so every notice is published before the bus runs again.
    client.ok("heaps");
    nix::sys::signal::kill(bus_pid, nix::sys::signal::Signal::SIGCONT).expect("resume the bus");

    let (member, args) = published.last().cloned().expect("notices");
    let received = monitor.signals_until(&member, &args);
    assert!(
        received.len() >= KEPT && received.len() < published.len(),
        "{} of {} signals arrived",
        received.len(),
        published.len()
    );
    let sent_before = received.len() - KEPT;
    assert!(
        received[..sent_before] == published[..sent_before],
        "the signals sent before the stall are the first notices"
    );
    assert!(
        received[sent_before..] == published[published.len() - KEPT..],
        "then come the newest {KEPT}: the oldest were dropped"
    );
    let missed = published.len() - received.len();
    eprintln!(
        "{} notices: {sent_before} signalled before the stall, the newest {KEPT} after, {missed} dropped",
        published.len()
    );
    let log = daemon.log();
    let line = log
        .lines()
        .find(|l| l.contains("D-Bus signals fell behind"))
        .unwrap_or_else(|| panic!("no warning in the log:\n{}", daemon.log_tail()));
    assert!(
        line.contains(&format!("missed={missed}")),
        "{missed} signals were dropped: {line}"
    );

    // The daemon stayed on the bus: its view answers and signals go on.
    assert_eq!(bus.totals(dbus::fields::TOTALS_CLIENTS), 1);
    let next: u64 = field(&client.ok("alloc 4096"), "id")
        .expect("id")
        .parse()
        .expect("buffer id");
    assert_eq!(
        monitor.expect("BufferAllocated"),
        serde_json::json!([next, 4096, "memfd", id])
    );
}

fn ctl_as(bus: &DbusDaemon, uid: u32, args: &[&str]) -> Output {
    Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={uid}"))
        .arg("--clear-groups")
        .arg(dmabroker_suite::daemon::binary("dmabrokerctl"))
        .arg(format!("--address={}", bus.address()))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run dmabrokerctl under setpriv")
}

#[test]
fn reload_policy_is_for_administrators_only() {
    if !have_root("reload_policy_is_for_administrators_only") {
        return;
    }
    let bus = DbusDaemon::start();
    let daemon = bus.start_broker(Some("[default]\nmax_buffer_size = \"1M\"\n"));

    // Another uid is refused, whatever it sends.
    let refused = ctl_as(&bus, NOBODY, &["reload"]);
    assert_eq!(refused.status.code(), Some(4), "{}", errtext(&refused));
    assert!(
        errtext(&refused).contains("permission denied"),
        "{}",
        errtext(&refused)
    );
    assert!(
        errtext(&refused).contains("uid 65534 is not an administrator"),
        "{}",
        errtext(&refused)
    );
    let raw = bus.busctl_as(
        NOBODY,
        NOBODY,
        &["call", BUS_NAME, OBJECT_PATH, INTERFACE, "ReloadPolicy"],
    );
    assert!(!raw.status.success());
    assert!(errtext(&raw).contains("Access denied"), "{}", errtext(&raw));
    // ...while reading stays open to it.
    ok(ctl_as(&bus, NOBODY, &["clients"]), "clients as nobody");

    // Root is accepted, and the new policy is in force afterwards.
    std::fs::write(
        &daemon.policy_path,
        "[default]\nmax_buffer_size = \"16K\"\n",
    )
    .expect("policy");
    let mut before = Scripted::spawn(daemon.socket(), &[]);
    before.ok("alloc 65536");
    assert_eq!(
        ok(bus.ctl(&["reload"]), "reload as root"),
        "Policy reloaded.\n"
    );
    let mut after = Scripted::spawn(daemon.socket(), &[]);
    assert!(
        after.cmd("alloc 65536").is_err(),
        "the reloaded limit applies"
    );
    let json: Value =
        serde_json::from_str(&ok(bus.ctl(&["--json", "reload"]), "reload --json")).expect("JSON");
    assert_eq!(json["reloaded"], true);

    // A broken file fails the call and keeps the policy in force.
    std::fs::write(&daemon.policy_path, "[default\nmax_buffer_size = ").expect("policy");
    let broken = bus.ctl(&["reload"]);
    assert_eq!(broken.status.code(), Some(1));
    assert!(
        errtext(&broken).contains("could not be loaded"),
        "{}",
        errtext(&broken)
    );
    let mut later = Scripted::spawn(daemon.socket(), &[]);
    later.ok("alloc 16384");
    assert!(
        later.cmd("alloc 65536").is_err(),
        "the previous policy stays"
    );

    // An administrator named by the policy is accepted without being root.
    std::fs::write(&daemon.policy_path, "admins = { users = [65534] }\n").expect("policy");
    ok(bus.ctl(&["reload"]), "reload naming nobody as admin");
    ok(
        ctl_as(&bus, NOBODY, &["reload"]),
        "reload as a policy admin",
    );
}

#[test]
fn dmabrokerctl_tables_and_json() {
    let scene = Scene::new();
    let bus = &scene.bus;
    let owner = scene.client_id(&scene.owner);
    let writer = scene.client_id(&scene.writer);
    let reader = scene.client_id(&scene.reader);
    let json = |args: &[&str]| -> Value {
        let mut argv = vec!["--json"];
        argv.extend_from_slice(args);
        serde_json::from_str(&ok(bus.ctl(&argv), &args.join(" "))).expect("dmabrokerctl JSON")
    };

    let status = ok(bus.ctl(&["status"]), "status");
    assert!(
        status.contains(&format!("dmabrokerd {}", env!("CARGO_PKG_VERSION"))),
        "{status}"
    );
    assert!(status.contains("Clients:     3\n"), "{status}");
    assert!(status.contains("Buffers:     1 (64 KiB)\n"), "{status}");
    assert!(
        status.contains("Fences:      1 held, 1 waiting\n"),
        "{status}"
    );
    assert!(
        status.contains("HEAP   BACKEND  BUFFERS   BYTES\nmemfd  memfd          1  64 KiB\n"),
        "{status}"
    );
    let s = json(&["status"]);
    assert_eq!(s["totals"]["clients"], 3);
    assert_eq!(s["heaps"][0]["name"], "memfd");
    assert_eq!(s["statistics"]["allocations"], 1);

    let heaps = ok(bus.ctl(&["heaps"]), "heaps");
    assert_eq!(
        heaps,
        "HEAP   BACKEND  BUFFERS   BYTES\nmemfd  memfd          1  64 KiB\n"
    );
    assert_eq!(
        json(&["heaps"]),
        serde_json::json!([{"name": "memfd", "backend": "memfd", "buffers": 1, "bytes": 65536}])
    );

    let clients = ok(bus.ctl(&["clients"]), "clients");
    let lines: Vec<&str> = clients.lines().collect();
    assert_eq!(lines.len(), 4, "{clients}");
    for word in [
        "ID", "PID", "UID", "NAME", "BYTES", "HELD", "WAITING", "LONGEST", "EXE",
    ] {
        assert!(
            lines[0].split_whitespace().any(|w| w == word),
            "{word} in {}",
            lines[0]
        );
    }
    let owner_line = lines
        .iter()
        .find(|l| l.split_whitespace().next() == Some(&owner.to_string()))
        .expect("owner row");
    assert!(
        owner_line.contains("64 KiB") && owner_line.contains("dmabroker-testclient"),
        "{owner_line}"
    );
    let c = json(&["clients"]);
    let reader_json = c
        .as_array()
        .expect("array")
        .iter()
        .find(|c| c["id"] == reader)
        .expect("reader")
        .clone();
    assert_eq!(reader_json["requests_waiting"], 1);
    assert_eq!(reader_json["pid"], scene.reader.pid() as i64);

    let buffers = ok(bus.ctl(&["buffers"]), "buffers");
    assert!(buffers.starts_with("ID  HEAP   NAME"), "{buffers}");
    assert!(
        buffers.contains(&format!("cpu-write #{} c{writer}", scene.access)),
        "{buffers}"
    );
    assert!(
        buffers.contains(&format!("cpu-read c{reader}")),
        "{buffers}"
    );
    assert!(
        buffers.contains(&format!("{owner}, {writer}, {reader}")),
        "{buffers}"
    );
    let b = json(&["buffers"]);
    assert_eq!(b[0]["fences"][0]["kind"], "cpu-write");
    assert_eq!(b[0]["waiters"][0]["client"], reader);

    let id = scene.buffer.to_string();
    let detail = ok(bus.ctl(&["buffer", &id]), "buffer ID");
    assert!(detail.contains("Name:         frame\n"), "{detail}");
    assert!(
        detail.contains("Size:         64 KiB (65536 bytes)\n"),
        "{detail}"
    );
    let fences = detail.split("\nFences:\n").nth(1).expect("fences section");
    assert!(
        fences
            .lines()
            .nth(1)
            .is_some_and(|l| l.contains("cpu-write") && l.contains("held")),
        "{detail}"
    );
    let waiters = detail
        .split("\nWaiters:\n")
        .nth(1)
        .expect("waiters section");
    assert!(
        waiters
            .lines()
            .nth(1)
            .is_some_and(|l| l.contains("cpu-read")),
        "{detail}"
    );
    let d = json(&["buffer", &id]);
    assert_eq!(d["buffer"]["id"], scene.buffer);
    assert_eq!(d["holders"].as_array().map(Vec::len), Some(3));

    let missing = bus.ctl(&["buffer", "999"]);
    assert_eq!(missing.status.code(), Some(1));
    assert_eq!(errtext(&missing), "dmabrokerctl: no buffer has id 999\n");

    let reload = ok(bus.ctl(&["reload"]), "reload");
    assert_eq!(reload, "Policy reloaded.\n");
    drop(scene.daemon);
}

/// Runs `top` in a pseudo-terminal through `script`, typing `keys` after
/// `delay` if given.
fn top_in_pty(bus: &DbusDaemon, args: &str, keys: Option<(Duration, &str)>) -> (Output, Duration) {
    let ctl = dmabroker_suite::daemon::binary("dmabrokerctl");
    let command = format!("{} --address='{}' top {args}", ctl.display(), bus.address());
    let started = Instant::now();
    let mut child = Command::new("script")
        .args(["-q", "-e", "-c", &command, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("script(1) from util-linux");
    let mut stdin = child.stdin.take().expect("stdin");
    if let Some((delay, keys)) = keys {
        std::thread::sleep(delay);
        use std::io::Write;
        stdin.write_all(keys.as_bytes()).expect("type into the pty");
        stdin.flush().expect("flush");
    }
    let out = child.wait_with_output().expect("script output");
    drop(stdin);
    (out, started.elapsed())
}

#[test]
fn dmabrokerctl_top_refreshes_in_a_pseudo_terminal() {
    let scene = Scene::new();
    let bus = &scene.bus;
    let (out, took) = top_in_pty(bus, "-n 3 --sort wait", Some((Duration::ZERO, "")));
    let screen = ok(out, "top -n 3");
    assert_eq!(
        screen.matches("\x1b[H\x1b[2J").count(),
        3,
        "three refreshes:\n{screen}"
    );
    assert!(
        screen.contains("\x1b[?1049h") && screen.contains("\x1b[?1049l"),
        "alternate screen entered and left"
    );
    assert!(
        took >= Duration::from_millis(1900),
        "refreshes a second apart, took {took:?}"
    );
    let last = screen.rsplit("\x1b[H\x1b[2J").next().expect("last frame");
    assert!(last.contains("sorted by wait"), "{last}");
    assert!(
        last.contains("clients 3  buffers 1 (64 KiB)  fences 1  waiters 1"),
        "{last}"
    );
    // Sorted by wait: the waiting reader comes first.
    let reader = scene.client_id(&scene.reader);
    let first_row = last
        .lines()
        .find(|l| l.trim_start().starts_with("ID"))
        .and_then(|_| {
            last.lines()
                .skip_while(|l| !l.trim_start().starts_with("ID"))
                .nth(1)
        });
    assert!(
        first_row.is_some_and(|l| l.split_whitespace().next() == Some(&reader.to_string())),
        "reader first in:\n{last}"
    );
    assert!(
        last.contains("grants 0/s"),
        "rates from the second refresh on:\n{last}"
    );

    // `q` quits a view that would otherwise run forever.
    let (out, took) = top_in_pty(bus, "", Some((Duration::from_millis(1500), "q")));
    let screen = ok(out, "top until q");
    assert!(took < Duration::from_secs(8), "q ended top after {took:?}");
    assert!(screen.matches("\x1b[H\x1b[2J").count() >= 1);
    assert!(
        screen.ends_with("\x1b[?25h\x1b[?1049l"),
        "terminal restored: {:?}",
        &screen[screen.len().saturating_sub(40)..]
    );

    // --json: one object per refresh, also in a terminal.
    let (out, _) = top_in_pty(bus, "-n 2 --json", None);
    let frames = ok(out, "top --json");
    let frames: Vec<Value> = frames
        .lines()
        .map(|l| serde_json::from_str(l.trim()).expect("one JSON frame per line"))
        .collect();
    assert_eq!(frames.len(), 2);
    assert_eq!(frames[1]["totals"]["waiters"], 1);
    assert!(frames[0]["rates"].is_null() && frames[1]["rates"]["grants"].is_number());
}

#[test]
fn dmabrokerctl_explains_a_missing_daemon_or_bus() {
    let bus = DbusDaemon::start();
    let out = bus.ctl(&["status"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        errtext(&out).contains("dmabrokerd is not running on the bus at"),
        "{}",
        errtext(&out)
    );

    let nowhere = Command::new(dmabroker_suite::daemon::binary("dmabrokerctl"))
        .args(["--address=unix:path=/nonexistent/bus", "clients"])
        .output()
        .expect("dmabrokerctl");
    assert_eq!(nowhere.status.code(), Some(3));
    assert!(
        errtext(&nowhere).contains("cannot reach the bus at unix:path=/nonexistent/bus"),
        "{}",
        errtext(&nowhere)
    );
}

/// operations.md: exit code 2 is wrong usage, told before any bus is
/// asked (no bus here at all), so a script can tell it from "no daemon"
/// (3).
#[test]
fn dmabrokerctl_wrong_usage_exits_2() {
    for args in [
        &["frobnicate"][..],
        &["--no-such-flag", "status"],
        &["--bus", "elsewhere", "status"],
        &["buffer", "not-a-number"],
        &[],
    ] {
        let out = Command::new(dmabroker_suite::daemon::binary("dmabrokerctl"))
            .args(args)
            .env("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/nonexistent/system")
            .env("DBUS_SESSION_BUS_ADDRESS", "unix:path=/nonexistent/session")
            .output()
            .expect("dmabrokerctl");
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", errtext(&out));
        let said = errtext(&out);
        assert!(
            said.contains("error:") || said.contains("Usage:"),
            "{args:?}: {said}"
        );
    }
}

/// operations.md: `--bus auto` (the default) uses the system bus if the
/// daemon is there and the session bus otherwise; `--bus system` and
/// `--bus session` insist on one; anything else is wrong usage. Two
/// private buses stand for the system and the session bus
/// (`DBUS_SYSTEM_BUS_ADDRESS`, `DBUS_SESSION_BUS_ADDRESS`), each with a
/// daemon of its own: the instance `status` shows, read from each bus
/// with busctl, says which bus `dmabrokerctl` really asked.
#[test]
fn dmabrokerctl_bus_choices_ask_the_bus_they_name() {
    let system = DbusDaemon::start();
    let session = DbusDaemon::start();
    let ctl = |args: &[&str]| {
        Command::new(dmabroker_suite::daemon::binary("dmabrokerctl"))
            .args(args)
            .env("DBUS_SYSTEM_BUS_ADDRESS", system.address())
            .env("DBUS_SESSION_BUS_ADDRESS", session.address())
            .stdin(Stdio::null())
            .output()
            .expect("dmabrokerctl")
    };
    // Which bus and which daemon `status` found.
    let found = |args: &[&str]| {
        let mut argv = args.to_vec();
        argv.extend(["--json", "status"]);
        let status: Value = serde_json::from_str(&ok(ctl(&argv), "status")).expect("status JSON");
        (
            status["bus"].as_str().expect("bus").to_owned(),
            status["instance"].as_str().expect("instance").to_owned(),
        )
    };
    let instance = |bus: &DbusDaemon| {
        bus.property("Instance")
            .as_str()
            .expect("Instance")
            .to_owned()
    };
    let not_on = |args: &[&str], bus: &str| {
        let out = ctl(args);
        assert_eq!(out.status.code(), Some(3), "{args:?}: {}", errtext(&out));
        assert!(
            errtext(&out).contains(&format!("dmabrokerd is not running on {bus} (")),
            "{args:?}: {}",
            errtext(&out)
        );
    };

    let on_system = system.start_broker(None);
    let on_session = session.start_broker(None);
    let (a, b) = (instance(&system), instance(&session));
    assert_ne!(a, b, "two daemons, two instances");
    let system_a = ("the system bus".to_owned(), a.clone());
    let session_b = ("the session bus".to_owned(), b.clone());
    assert_eq!(found(&["--bus", "system"]), system_a);
    assert_eq!(found(&["--bus", "session"]), session_b);
    assert_eq!(found(&["--bus", "auto"]), system_a, "auto prefers system");
    assert_eq!(found(&[]), system_a, "auto is the default");

    // No daemon on the system bus: auto falls back to the session bus,
    // `--bus system` does not.
    drop(on_system);
    eventually("the name to go from the system bus", || {
        !system.name_has_owner(BUS_NAME)
    });
    assert_eq!(found(&["--bus", "auto"]), session_b);
    assert_eq!(found(&[]), session_b);
    not_on(&["--bus", "system", "status"], "the system bus");

    // A daemon on the system bus again and none on the session bus:
    // `--bus session` does not fall back to the system bus.
    let _on_system = system.start_broker(None);
    let c = instance(&system);
    drop(on_session);
    eventually("the name to go from the session bus", || {
        !session.name_has_owner(BUS_NAME)
    });
    not_on(&["--bus", "session", "status"], "the session bus");
    assert_eq!(found(&["--bus", "auto"]), ("the system bus".to_owned(), c));

    // Any other choice is wrong usage, told with the choices there are.
    let out = ctl(&["--bus", "elsewhere", "status"]);
    assert_eq!(out.status.code(), Some(2), "{}", errtext(&out));
    let said = errtext(&out);
    assert!(
        said.contains("invalid value 'elsewhere' for '--bus <BUS>'")
            && said.contains("[possible values: auto, system, session]"),
        "{said}"
    );
}

#[test]
fn the_daemon_serves_clients_without_a_bus() {
    for bus in ["unix:path=/nonexistent/bus", "none"] {
        let daemon = Daemon::start_with(DaemonOptions {
            args: vec!["--dbus".into(), bus.into()],
            ..Default::default()
        });
        let mut client = Scripted::spawn(daemon.socket(), &[]);
        let id = field(&client.ok("alloc 4096"), "id")
            .expect("id")
            .to_owned();
        client.ok(&format!("write {id} 7"));
        if bus != "none" {
            eventually("a warning about the bus", || {
                daemon.log().contains("continues without D-Bus")
            });
        }
    }
}

#[test]
fn the_daemon_comes_back_on_a_restarted_bus() {
    let mut bus = DbusDaemon::start();
    let daemon = bus.start_broker(None);
    let mut client = Scripted::spawn(daemon.socket(), &[]);
    bus.restart();
    // Brokering never stopped.
    client.ok("alloc 4096");
    bus.wait_for_daemon();
    assert_eq!(bus.property("Totals")[1], 1, "the view is back");
    let monitor = Monitor::start(&bus);
    client.ok("alloc 4096");
    monitor.expect("BufferAllocated");
    assert!(
        daemon.log().contains("reconnecting"),
        "{}",
        daemon.log_tail()
    );
}

#[test]
fn the_shipped_policy_lets_root_own_the_name_and_everyone_read() {
    if !have_root("the_shipped_policy_lets_root_own_the_name_and_everyone_read") {
        return;
    }
    let bus = DbusDaemon::start_system_like(&dbus::shipped_policy());
    let daemon = bus.start_broker(None);
    let _client = Scripted::spawn(daemon.socket(), &[]);

    // Everyone may introspect and read.
    let introspect = bus.busctl_as(NOBODY, NOBODY, &["introspect", BUS_NAME, OBJECT_PATH]);
    assert!(introspect.status.success(), "{}", errtext(&introspect));
    assert!(text(&introspect).contains(".ListBuffers"));
    let clients = ctl_as(&bus, NOBODY, &["--json", "clients"]);
    assert!(clients.status.success(), "{}", errtext(&clients));
    let clients: Value = serde_json::from_str(&text(&clients)).expect("JSON");
    assert_eq!(clients.as_array().map(Vec::len), Some(1));
    let props = bus.busctl_as(
        NOBODY,
        NOBODY,
        &["get-property", BUS_NAME, OBJECT_PATH, INTERFACE, "Version"],
    );
    assert!(props.status.success(), "{}", errtext(&props));

    // The bus lets the call through; the daemon refuses it.
    let reload = ctl_as(&bus, NOBODY, &["reload"]);
    assert_eq!(reload.status.code(), Some(4), "{}", errtext(&reload));
    assert!(
        errtext(&reload).contains("not an administrator"),
        "{}",
        errtext(&reload)
    );

    // Only root may own the name.
    let own = bus.busctl_as(
        NOBODY,
        NOBODY,
        &[
            "call",
            "org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "RequestName",
            "su",
            BUS_NAME,
            "4",
        ],
    );
    assert!(!own.status.success(), "nobody must not own {BUS_NAME}");
    assert!(
        errtext(&own).contains("ccess denied") || errtext(&own).contains("not allowed"),
        "{}",
        errtext(&own)
    );
    // Methods of other services stay denied: the file opens ours only.
    let other = bus.busctl_as(
        NOBODY,
        NOBODY,
        &["call", BUS_NAME, OBJECT_PATH, "org.example.Other", "Poke"],
    );
    assert!(!other.status.success());
    // Refused by the bus, not by the daemon (which would answer an unknown
    // interface, failing the call all the same).
    assert!(
        errtext(&other).contains("ccess denied"),
        "{}",
        errtext(&other)
    );
    assert!(
        bus.log().is_empty() || !bus.log().contains("Failed to parse"),
        "{}",
        bus.log()
    );
}

/// Reading another user's `/proc/PID/exe` needs ptrace access, and the
/// unit hides other users' processes (`ProtectProc=invisible`); the daemon
/// reads it with `CAP_SYS_PTRACE`. So D-Bus shows a client's executable and
/// unit only to the client's own uid and to administrators: it once showed
/// every client's to anyone on the bus.
#[test]
fn other_users_executables_are_shown_only_to_administrators() {
    if !have_root("other_users_executables_are_shown_only_to_administrators") {
        return;
    }
    let bus = DbusDaemon::start_system_like(&dbus::shipped_policy());
    let daemon = bus.start_broker(None);
    let _client = Scripted::spawn(daemon.socket(), &[]);
    let exe_of = |listing: Output| -> String {
        assert!(listing.status.success(), "{}", errtext(&listing));
        let clients: Value = serde_json::from_str(&text(&listing)).expect("JSON");
        clients[0]["exe"].as_str().expect("exe").to_owned()
    };

    let as_root = Command::new(dmabroker_suite::daemon::binary("dmabrokerctl"))
        .arg(format!("--address={}", bus.address()))
        .args(["--json", "clients"])
        .stdin(Stdio::null())
        .output()
        .expect("dmabrokerctl");
    assert!(
        exe_of(as_root).ends_with("dmabroker-testclient"),
        "root sees the executable"
    );
    let as_nobody = ctl_as(&bus, NOBODY, &["--json", "clients"]);
    assert_eq!(exe_of(as_nobody), "", "another uid sees root's executable");
}

/// The lists are copied a few entries per hold of the broker's lock (so a
/// grant never waits for a whole table). Across those chunks nothing may
/// go missing, repeat or come out of order, and the heap counts must still
/// add up to the totals.
#[test]
fn long_lists_are_whole_and_in_order() {
    const CLIENTS: usize = 37;
    const BUFFERS_EACH: usize = 3;
    let bus = DbusDaemon::start();
    let daemon = bus.start_broker(None);
    let clients: Vec<_> = (0..CLIENTS).map(|_| daemon.client()).collect();
    let mut buffers = Vec::new();
    let mut expected_bytes = 0u64;
    for (i, client) in clients.iter().enumerate() {
        for j in 0..BUFFERS_EACH {
            let size = 4096 * (1 + ((i + j) % 4) as u64);
            buffers.push(client.alloc(size).expect("alloc"));
            expected_bytes += size;
        }
    }
    let mut ids: Vec<u64> = buffers.iter().map(|b| b.id()).collect();
    ids.sort_unstable();

    let listed = bus.method("ListBuffers", &[]);
    let listed: Vec<u64> = listed
        .as_array()
        .expect("buffers")
        .iter()
        .map(|row| row[0].as_u64().expect("buffer id"))
        .collect();
    assert_eq!(listed, ids, "every buffer once, by id");

    let rows = bus.method("ListClients", &[]);
    let rows = rows.as_array().expect("clients");
    let client_ids: Vec<u64> = rows.iter().map(|r| r[0].as_u64().expect("id")).collect();
    assert_eq!(
        client_ids.len(),
        CLIENTS,
        "every client once: {client_ids:?}"
    );
    assert!(
        client_ids.windows(2).all(|w| w[0] < w[1]),
        "by id: {client_ids:?}"
    );
    assert!(
        rows.iter().all(|r| r[8] == BUFFERS_EACH as u64),
        "each client holds its buffers: {rows:?}"
    );

    let total = (CLIENTS * BUFFERS_EACH) as u64;
    assert_eq!(
        bus.property("Heaps"),
        serde_json::json!([["memfd", "memfd", total, expected_bytes]])
    );
    let totals = bus.property("Totals");
    assert_eq!(
        (totals[1].as_u64(), totals[2].as_u64()),
        (Some(total), Some(expected_bytes))
    );

    // Freed buffers leave every list.
    drop(buffers.split_off(10));
    eventually("the freed buffers to leave the list", || {
        bus.method("ListBuffers", &[]).as_array().map(Vec::len) == Some(10)
    });
}

/// operations.md: `ListBuffers` fails with `org.dmabroker.Error.TooLarge`
/// when its answer would be over 16 MiB (past the system bus's 32 MiB the
/// bus would disconnect the daemon), and `GetBuffer` still shows each
/// buffer. One client holds 128 reads on each of 1,920 buffers: as D-Bus
/// marshals them (72 bytes a read's fence, `(tstsst)`) the list would be
/// some 17 MiB. The call is refused by that name, `dmabrokerctl buffers`
/// says why, the daemon stays on the bus, and once the reads end the list
/// is answered again.
#[test]
fn list_buffers_too_large_for_the_bus_is_refused_and_the_daemon_stays_on_it() {
    use dmabroker_ipc::{Access, RequestBody};
    use dmabroker_suite::raw::RawClient;
    const BUFFERS: usize = 1920;
    const READS: usize = 128;
    const BATCH: usize = 128;
    let bus = DbusDaemon::start();
    let daemon = bus.start_broker(Some("[default]\nmax_held_accesses = 1000000\n"));
    // The raw client asks for no buffer words: every read is a fence the
    // broker holds, with an id.
    let mut client = RawClient::connect(daemon.socket());
    client.hello();
    let buffers: Vec<u64> = (0..BUFFERS).map(|_| client.alloc()).collect();
    // Another holder keeps the buffers once the reader has gone.
    let mut keeper = RawClient::connect(daemon.socket());
    keeper.hello();
    for &buffer in &buffers {
        let token = client.export(buffer);
        keeper.import(token);
    }
    let begins: Vec<u64> = buffers.iter().flat_map(|&buffer| [buffer; READS]).collect();
    // In batches, each one's replies read before the next is sent: they
    // never pile up past the connection's cap on unread replies.
    for batch in begins.chunks(BATCH) {
        for &buffer in batch {
            client.send_request(RequestBody::Begin {
                buffer,
                access: Access::CpuRead,
                timeout_ms: None,
            });
        }
        for (id, answer) in client.replies(batch.len()) {
            assert!(answer.is_ok(), "begin {id}: {answer:?}");
        }
    }
    assert_eq!(
        bus.totals(dbus::fields::TOTALS_FENCES),
        (BUFFERS * READS) as u64
    );

    let list = || {
        Command::new("dbus-send")
            .arg(format!("--bus={}", bus.address()))
            .args(["--print-reply", "--reply-timeout=120000"])
            .arg(format!("--dest={BUS_NAME}"))
            .arg(OBJECT_PATH)
            .arg(format!("{INTERFACE}.ListBuffers"))
            .stdin(Stdio::null())
            .output()
            .expect("dbus-send")
    };
    let refused = list();
    assert!(!refused.status.success(), "ListBuffers answered");
    assert!(
        errtext(&refused).contains(&format!(
            "Error org.dmabroker.Error.TooLarge: the list of {BUFFERS} buffers would be over 16 MiB"
        )),
        "{}",
        errtext(&refused)
    );
    let out = bus.ctl(&["buffers"]);
    assert_eq!(out.status.code(), Some(1), "{}", errtext(&out));
    assert!(
        errtext(&out).contains("would be over 16 MiB")
            && errtext(&out).contains("GetBuffer shows one buffer"),
        "{}",
        errtext(&out)
    );

    // Still on the bus: each buffer is shown, with all its reads.
    assert!(bus.name_has_owner(BUS_NAME), "{}", daemon.log_tail());
    let last = buffers[BUFFERS - 1].to_string();
    let detail = bus.method("GetBuffer", &["t", &last]);
    assert_eq!(
        detail[0][dbus::fields::BUFFER_FENCES]
            .as_array()
            .map(Vec::len),
        Some(READS)
    );

    // With the reads gone the list fits and is answered, every buffer
    // in it.
    drop(client);
    eventually("the reads to end", || {
        bus.totals(dbus::fields::TOTALS_FENCES) == 0
    });
    assert_eq!(
        bus.method("ListBuffers", &[]).as_array().map(Vec::len),
        Some(BUFFERS)
    );
}

/// `Cpus_allowed_list` of one thread of `pid`, found by name.
fn thread_cpus(pid: u32, name: &str) -> String {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks");
    for task in tasks.filter_map(Result::ok) {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() == name {
            let status = std::fs::read_to_string(task.path().join("status")).expect("status");
            return status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .expect("Cpus_allowed_list")
                .trim()
                .to_owned();
        }
    }
    panic!("no thread named {name} in {pid}");
}

/// `--dbus-cpus` moves the D-Bus thread, and only it, so that an operator
/// can keep introspection off the data path's cores; a list the kernel
/// refuses leaves it where it was and the interface still answers.
#[test]
fn dbus_cpus_places_the_dbus_thread_only() {
    let cpus = dmabroker_suite::proc::allowed_cpus();
    let last = *cpus.last().expect("some CPU");
    let bus = DbusDaemon::start();
    let mut args = bus.daemon_args();
    args.extend(["--dbus-cpus".into(), last.to_string()]);
    let daemon = Daemon::start_with(DaemonOptions {
        args,
        ..Default::default()
    });
    bus.wait_for_daemon();
    let main_thread = thread_cpus(daemon.pid(), "dmabrokerd");
    assert_eq!(thread_cpus(daemon.pid(), "dbus"), last.to_string());
    if cpus.len() > 1 {
        assert_ne!(
            main_thread,
            last.to_string(),
            "the data path stays where it was"
        );
    }
    assert_eq!(bus.property("Version"), env!("CARGO_PKG_VERSION"));
    drop(daemon);

    // CPU 1023 exists in no CPU set this machine offers.
    let bus = DbusDaemon::start();
    let mut args = bus.daemon_args();
    args.extend(["--dbus-cpus".into(), "1023".into()]);
    let daemon = Daemon::start_with(DaemonOptions {
        args,
        ..Default::default()
    });
    bus.wait_for_daemon();
    assert_eq!(thread_cpus(daemon.pid(), "dbus"), main_thread);
    assert_eq!(bus.property("Version"), env!("CARGO_PKG_VERSION"));
    assert!(
        daemon.log().contains("cannot place the D-Bus thread"),
        "{}",
        daemon.log()
    );
}

/// A client's hello name and buffer name are its own text and may hold a
/// NUL byte, which no D-Bus string may: the bus dropped the daemon's
/// connection at every `ListClients` naming such a client. The views
/// answer, showing the NUL as U+FFFD, and the daemon stays on the bus.
#[test]
fn a_nul_in_a_clients_names_does_not_break_the_views() {
    use dmabroker_ipc::{Hello, RequestBody, PROTOCOL_VERSION};
    let bus = DbusDaemon::start();
    let daemon = bus.start_broker(None);
    let mut raw = dmabroker_suite::raw::RawClient::connect(daemon.socket());
    raw.request(RequestBody::Hello(Hello {
        version: PROTOCOL_VERSION,
        features: 0,
        autofence: None,
        client_name: "evil\0name".into(),
    }))
    .expect("hello");
    raw.request(RequestBody::Alloc {
        size: 4096,
        heap: None,
        name: Some("buf\0name".into()),
    })
    .expect("alloc");
    let out = bus.busctl(&[
        "--json=short",
        "call",
        BUS_NAME,
        OBJECT_PATH,
        INTERFACE,
        "ListClients",
    ]);
    let listed = out.status.success();
    let err = errtext(&out);
    // Back on the bus within 5 s (the daemon reconnects to a lost bus)?
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut on_bus = false;
    while !on_bus && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        on_bus = bus.name_has_owner(BUS_NAME);
    }
    assert!(
        listed && on_bus,
        "ListClients answered: {listed} ({err}); daemon still on the bus: {on_bus}; bus log:\n{}",
        bus.log()
    );
    let clients = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(clients.contains("evil\u{fffd}name"), "{clients}");
    let buffers = bus.busctl(&[
        "--json=short",
        "call",
        BUS_NAME,
        OBJECT_PATH,
        INTERFACE,
        "ListBuffers",
    ]);
    let buffers_text = String::from_utf8_lossy(&buffers.stdout).into_owned();
    assert!(
        buffers.status.success() && buffers_text.contains("buf\u{fffd}name"),
        "ListBuffers: {buffers_text} ({})",
        errtext(&buffers)
    );
}

/// `top` quits on Ctrl-C (SIGINT) also while a refresh waits for the
/// daemon. It used to make a new `ctrl_c()` future at each pass of its
/// loop: once the first had installed tokio's handler, SIGINT no longer
/// killed it, and a SIGINT that came while no such future existed (during
/// a refresh) was lost, so a wedged daemon left `top` deaf to Ctrl-C.
#[test]
fn top_quits_on_sigint_while_a_refresh_waits_for_the_daemon() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let bus = DbusDaemon::start();
    let daemon = bus.start_broker(None);
    let mut top = bus
        .ctl_command(&["top", "--interval", "0.2", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("dmabrokerctl top");
    let stdout = top.stdout.take().expect("stdout");
    let (tx, frames) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // A few frames: the loop has been round more than once by now.
    let started = (0..3).all(|_| frames.recv_timeout(Duration::from_secs(10)).is_ok());
    if !started {
        let _ = top.kill();
        let _ = top.wait();
        panic!("top showed no frames");
    }
    // The daemon stops answering: top's next refresh waits for it.
    daemon.signal(Signal::SIGSTOP);
    std::thread::sleep(Duration::from_millis(600));
    kill(Pid::from_raw(top.id() as i32), Signal::SIGINT).expect("SIGINT to top");
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut exited = None;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = top.try_wait() {
            exited = Some(status);
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    daemon.signal(Signal::SIGCONT);
    let Some(status) = exited else {
        let _ = top.kill();
        let _ = top.wait();
        panic!("dmabrokerctl top ignored SIGINT while a refresh waited");
    };
    assert!(
        status.success(),
        "top quit on SIGINT, but said it failed: {status}"
    );
}

/// An adopted dma-buf is a new buffer in the views, and its free is
/// announced with `BufferFreed`: its adoption is announced with
/// `BufferAllocated` (heap "adopted"). It was not, so a tool following the
/// signals saw a free of a buffer it had never heard of. Needs vgem (the
/// real-kernel tier, tests/vm/run).
#[test]
fn kernel_tier_adopting_a_dma_buf_is_announced_like_an_allocation() {
    let vgem = match dmabroker_suite::vgem::Vgem::open() {
        Ok(vgem) => vgem,
        Err(err) if err.is_unavailable() => {
            dmabroker_suite::kernel_feature(&format!("vgem ({err})"), false);
            return;
        }
        Err(err) => panic!("opening vgem: {err}"),
    };
    let bus = DbusDaemon::start();
    let daemon = bus.start_broker(None);
    let monitor = Monitor::start(&bus);
    let client = daemon.client();
    let owner = monitor.expect("ClientConnected")[0]
        .as_u64()
        .expect("client id");
    let gpu_buffer = vgem.create_buffer(8192).expect("vgem buffer");
    let adopted = client
        .adopt(
            gpu_buffer.try_clone_dmabuf().expect("dup"),
            Some("gpu-frame"),
        )
        .expect("adopting a vgem dma-buf");
    assert_eq!(
        monitor.expect("BufferAllocated"),
        serde_json::json!([adopted.id(), adopted.size(), "adopted", owner])
    );
    let id = adopted.id();
    drop(adopted);
    assert_eq!(monitor.expect("BufferFreed"), serde_json::json!([id]));
}

/// A client's allocation held in its heap (a FUSE heap node that never
/// answers the ioctl) counts against its quota, so a second one is
/// refused `QuotaExceeded` while `ListClients` shows the client with no
/// buffer and no byte. The allocations in flight are shown by members of
/// their own, and by `dmabrokerctl clients`, `status` and `top`; once
/// the heap gives up (and the allocation falls back to memfd) they are
/// gone, and the buffer is the client's. Needs root, for FUSE.
#[test]
fn allocations_in_flight_are_shown_until_they_are_answered() {
    use dmabroker_client::{AllocRequest, ErrorCode};
    use dmabroker_suite::slow_heap::SlowHeap;
    const MIB: u64 = 1 << 20;
    let bus = DbusDaemon::start();
    let policy = "[default]\nmax_total_bytes = \"6 MiB\"\n";
    let Some(mut slow) = SlowHeap::start_with(
        "allocations in flight over D-Bus",
        Some(policy),
        bus.daemon_args(),
    ) else {
        return;
    };
    bus.wait_for_daemon();
    let client = std::sync::Arc::new(slow.daemon.client());
    let (tx, answered) = mpsc::channel();
    let camera = std::sync::Arc::clone(&client);
    std::thread::spawn(move || {
        let _ = tx.send(camera.alloc_with(AllocRequest {
            size: 4 * MIB,
            heap: Some("slow".into()),
            name: Some("frame".into()),
        }));
    });
    slow.await_ioctl();
    let refused = client
        .alloc_with(AllocRequest {
            size: 4 * MIB,
            heap: Some("memfd".into()),
            name: None,
        })
        .expect_err("over quota with the allocation in flight");
    assert_eq!(refused.code(), Some(ErrorCode::QuotaExceeded), "{refused}");

    // ListClients: (id, uid, pid, ..., buffers 8, bytes 9, ...): nothing.
    let clients = bus.method("ListClients", &[]);
    let row = clients
        .as_array()
        .expect("clients")
        .iter()
        .find(|c| c[2].as_i64() == Some(i64::from(std::process::id() as i32)))
        .expect("this process's client")
        .clone();
    let id = row[0].as_u64().expect("client id");
    assert_eq!((row[8].as_u64(), row[9].as_u64()), (Some(0), Some(0)));

    // The members of their own.
    assert_eq!(bus.counter("AllocationsInFlight"), 1);
    assert_eq!(bus.counter("AllocationsRunning"), 1);
    let in_flight = bus.method("ListAllocationsInFlight", &[]);
    let age = in_flight[0][3][0][3].as_u64().expect("age");
    assert!(age > 0, "{in_flight}");
    assert_eq!(
        in_flight,
        serde_json::json!([[id, 1, 4 * MIB, [["slow", 4 * MIB, "frame", age]]]])
    );

    // dmabrokerctl: the clients table as before, the allocation under it.
    let table = ok(bus.ctl(&["clients"]), "clients");
    let (clients_table, section) = table
        .split_once("\nAllocations in flight")
        .unwrap_or_else(|| panic!("no allocations in flight in:\n{table}"));
    assert_eq!(clients_table.lines().count(), 2, "{table}");
    let rows: Vec<Vec<&str>> = section
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows[0],
        ["CLIENT", "HEAP", "NAME", "SIZE", "AGE"],
        "{table}"
    );
    assert_eq!(
        rows[1][..5],
        [id.to_string().as_str(), "slow", "frame", "4", "MiB"],
        "{table}"
    );
    let json: Value = serde_json::from_str(&ok(bus.ctl(&["--json", "clients"]), "clients --json"))
        .expect("clients JSON");
    let mine = &json[0];
    assert_eq!(
        (mine["id"].as_u64(), mine["bytes"].as_u64()),
        (Some(id), Some(0))
    );
    assert_eq!(mine["allocations_in_flight"]["count"], 1);
    assert_eq!(mine["allocations_in_flight"]["bytes"], 4 * MIB);
    assert_eq!(
        mine["allocations_in_flight"]["allocations"][0]["heap"],
        "slow"
    );
    let status = ok(bus.ctl(&["status"]), "status");
    assert!(
        status.contains("In flight:   1 allocations (1 heap threads running)\n"),
        "{status}"
    );
    let top = ok(bus.ctl(&["top", "-n", "1"]), "top -n 1");
    assert!(top.contains("allocating 1 (4 MiB)\n"), "{top}");
    let top_row = top
        .lines()
        .find(|l| l.split_whitespace().next() == Some(&id.to_string()))
        .unwrap_or_else(|| panic!("no row of client {id} in:\n{top}"));
    // Before EXE, whose long paths would push it out of sight.
    let header: Vec<&str> = top
        .lines()
        .find(|l| l.trim_start().starts_with("ID "))
        .unwrap_or_else(|| panic!("no header in:\n{top}"))
        .split_whitespace()
        .collect();
    assert_eq!(header[header.len() - 2..], ["ALLOCATING", "EXE"], "{top}");
    let cells: Vec<&str> = top_row.split_whitespace().collect();
    assert_eq!(
        cells[cells.len() - 4..cells.len() - 1],
        ["1", "(4", "MiB)"],
        "{top}"
    );

    // The heap gives up: the allocation falls back to memfd, is answered,
    // and is in flight no more.
    slow.release();
    let buffer = answered
        .recv_timeout(Duration::from_secs(10))
        .expect("answered once its heap gives up")
        .expect("the allocation, from memfd");
    assert_eq!(buffer.heap(), "memfd");
    assert_eq!(bus.counter("AllocationsInFlight"), 0);
    eventually("the allocation's thread to be done", || {
        bus.counter("AllocationsRunning") == 0
    });
    assert_eq!(
        bus.method("ListAllocationsInFlight", &[]),
        serde_json::json!([])
    );
    let table = ok(bus.ctl(&["clients"]), "clients");
    assert!(!table.contains("in flight"), "{table}");
    assert_eq!(table.lines().count(), 2, "{table}");
    let json: Value = serde_json::from_str(&ok(bus.ctl(&["--json", "clients"]), "clients --json"))
        .expect("clients JSON");
    assert_eq!(json[0]["bytes"], 4 * MIB);
    assert_eq!(json[0]["allocations_in_flight"]["count"], 0);
    let top = ok(bus.ctl(&["top", "-n", "1"]), "top -n 1");
    assert!(top.contains("allocating 0 (0 B)\n"), "{top}");
}

/// A client's file whose close never returns (a FUSE file whose FLUSH
/// nobody answers, sent to be adopted: refused, the daemon closes its
/// copy on the closing thread of the client's user, which waits for good)
/// is shown: `ListCloses` lists that user's files queue with a thread and
/// the close in hand, its age growing; `ClosesWaiting` and
/// `ClosingThreads` count it; `dmabrokerctl closes` and `status` say so.
/// Once the FUSE server is gone the close returns and the queue is listed
/// no more. Before these members, a user whose clients hung behind a
/// stuck close could be told apart only in the log. Needs root, for FUSE.
#[test]
fn a_stuck_close_is_shown_until_it_returns() {
    use dmabroker_suite::fuse::{Stall, StallingFuse};
    const ALICE: u32 = 65501;
    if !have_root("a stuck close shown over D-Bus") {
        return;
    }
    let bus = DbusDaemon::start();
    let mut args = bus.daemon_args();
    args.extend(["--socket-mode".to_owned(), "0666".to_owned()]);
    let daemon = Daemon::start_with(DaemonOptions {
        args,
        ..Default::default()
    });
    bus.wait_for_daemon();
    // The client opens the FUSE file, never this process: each busctl and
    // dmabrokerctl started here would close a copy of it at its exec, and
    // wait for that FLUSH too. The client keeps its own copy open, so only
    // the daemon's close waits. Declared before the server so that it is
    // dropped after it (whatever the outcome): its copy's close at exit
    // then fails at once instead of waiting for good.
    let mut client = Scripted::spawn_as(daemon.socket(), ALICE, ALICE, &[]);
    let Some(mut fuse) = StallingFuse::mount("a stuck close shown over D-Bus", Stall::Flush) else {
        return;
    };
    let refused = client.cmd(&format!("adopt-file {}", fuse.file().display()));
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.starts_with("err not-a-dma-buf")),
        "{refused:?}"
    );
    // The daemon's close of its copy, in hand on ALICE's closing thread.
    fuse.await_flush();

    // (users, lane, waiting, has_thread, in_line, in_hand_us, held_back)
    let alices = || -> Option<Value> {
        bus.method("ListCloses", &[])
            .as_array()
            .expect("ListCloses: a list")
            .iter()
            .find(|q| q[0] == serde_json::json!([ALICE]) && q[1] == "files")
            .cloned()
    };
    let queue = alices().expect("ALICE's files queue listed");
    assert!(queue[2].as_u64().is_some_and(|n| n >= 1), "{queue}");
    assert_eq!(queue[3], true, "a thread runs it: {queue}");
    assert_eq!(queue[4], false, "not in line: {queue}");
    assert_eq!(
        queue[6], false,
        "one close is no reason to hold back: {queue}"
    );
    let in_hand = queue[5].as_u64().expect("in_hand_us");
    assert!(in_hand > 0, "{queue}");
    eventually("the close in hand to age", || {
        alices().and_then(|q| q[5].as_u64()) > Some(in_hand)
    });
    assert!(bus.counter("ClosesWaiting") >= 1);
    assert!(bus.counter("ClosingThreads") >= 1);
    // Its user's clients are served meanwhile.
    client.ok("heaps");

    // dmabrokerctl: the table, the JSON and the status line.
    let table = ok(bus.ctl(&["closes"]), "closes");
    let header: Vec<&str> = table
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["USERS", "LANE", "WAITING", "THREAD", "IN", "HAND", "FOR", "HELD", "BACK"],
        "{table}"
    );
    let row: Vec<&str> = table
        .lines()
        .find(|l| l.starts_with(&format!("{ALICE} ")))
        .unwrap_or_else(|| panic!("no row of uid {ALICE} in:\n{table}"))
        .split_whitespace()
        .collect();
    assert_eq!(row.len(), 6, "{table}");
    assert_eq!(row[1], "files", "{table}");
    assert!(row[2].parse::<u64>().is_ok_and(|n| n >= 1), "{table}");
    assert_eq!((row[3], row[5]), ("yes", "no"), "{table}");
    assert_ne!(row[4], "-", "a close in hand has an age: {table}");
    let json: Value = serde_json::from_str(&ok(bus.ctl(&["--json", "closes"]), "closes --json"))
        .expect("closes JSON");
    let mine = json
        .as_array()
        .expect("closes JSON: a list")
        .iter()
        .find(|q| q["users"] == serde_json::json!([ALICE]) && q["lane"] == "files")
        .unwrap_or_else(|| panic!("no queue of uid {ALICE} in {json}"));
    assert_eq!(mine["has_thread"], true, "{json}");
    assert!(mine["in_hand_us"].as_u64() > Some(0), "{json}");
    let status = ok(bus.ctl(&["status"]), "status");
    let closes_line: Vec<&str> = status
        .lines()
        .find(|l| l.starts_with("Closes:"))
        .unwrap_or_else(|| panic!("no Closes line in:\n{status}"))
        .split_whitespace()
        .collect();
    // Closes: N waiting (M closing threads)
    assert_eq!(closes_line.len(), 6, "{status}");
    assert_eq!(
        (closes_line[2], &closes_line[4..]),
        ("waiting", &["closing", "threads)"][..]),
        "{status}"
    );
    for count in [closes_line[1], closes_line[3].trim_start_matches('(')] {
        assert!(count.parse::<u64>().is_ok_and(|n| n >= 1), "{status}");
    }
    let json: Value = serde_json::from_str(&ok(bus.ctl(&["--json", "status"]), "status --json"))
        .expect("status JSON");
    assert!(json["closes_waiting"].as_u64() >= Some(1), "{json}");
    assert!(json["closing_threads"].as_u64() >= Some(1), "{json}");

    // The server goes: the held FLUSH fails, the close returns.
    drop(fuse);
    eventually("the close to return", || alices().is_none());
    eventually("no close waiting", || bus.counter("ClosesWaiting") == 0);
    eventually("no queue listed", || {
        bus.method("ListCloses", &[]) == serde_json::json!([])
    });
    assert_eq!(
        ok(bus.ctl(&["closes"]), "closes"),
        "No closes are waiting.\n"
    );
    client.ok("heaps");
}
