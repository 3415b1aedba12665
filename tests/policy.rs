//! Per-client policy enforced on real processes running under different
//! uids (through `setpriv`; the suite runs as root on the build machines and
//! skips with a printed reason elsewhere).

use std::time::{Duration, Instant};

use dmabroker_suite::fuse::{Stall, StallingFuse};
use dmabroker_suite::scripted::field;
use dmabroker_suite::served_within;
use dmabroker_suite::userns;
use dmabroker_suite::{have_root, Daemon, DaemonOptions, Scripted};

const ALICE: u32 = 65501;
const BOB: u32 = 65502;

fn daemon_with(policy: &str) -> Daemon {
    Daemon::start_with(DaemonOptions {
        policy: Some(policy.to_owned()),
        args: vec!["--socket-mode".into(), "0666".into()],
        ..Default::default()
    })
}

fn as_user(daemon: &Daemon, uid: u32, extra: &[&str]) -> Scripted {
    Scripted::spawn_as(daemon.socket(), uid, uid, extra)
}

/// `setpriv` running what follows as `uid` (its own group, no others).
fn setpriv_as(uid: u32) -> std::process::Command {
    let mut cmd = std::process::Command::new("setpriv");
    cmd.args([
        format!("--reuid={uid}"),
        format!("--regid={uid}"),
        "--clear-groups".into(),
    ]);
    cmd
}

fn code(answer: &str) -> &str {
    answer.split_whitespace().nth(1).unwrap_or("")
}

/// Rewrites the policy file and reloads with SIGHUP; returns once the
/// daemon logged the outcome.
fn reload(daemon: &Daemon, policy: &str, expect: &str) {
    let before = daemon.log().matches(expect).count();
    std::fs::write(&daemon.policy_path, policy).expect("write policy");
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(5);
    while daemon.log().matches(expect).count() == before {
        assert!(
            Instant::now() < deadline,
            "no '{expect}' in the log:\n{}",
            daemon.log_tail()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_client_denied_a_heap_is_refused_before_anything_is_allocated() {
    if !have_root("policy: denied heap") {
        return;
    }
    let daemon = daemon_with(&format!(
        "[[rule]]\nname = \"no-memfd\"\nuser = {ALICE}\nheaps = [\"system\"]\n"
    ));
    let mut alice = as_user(&daemon, ALICE, &[]);
    let baseline = daemon.baseline();
    let err = alice
        .cmd("alloc 4096 heap=memfd")
        .expect_err("memfd denied");
    assert_eq!(code(&err), "permission-denied", "{err}");
    assert!(
        err.contains("no-memfd"),
        "the refusal names the rule: {err}"
    );
    assert_eq!(daemon.fd_count(), baseline, "nothing was allocated");
    // Another user is not affected.
    let mut bob = as_user(&daemon, BOB, &[]);
    bob.ok("alloc 4096 heap=memfd");
}

#[test]
fn quota_refuses_exactly_at_the_limit_and_each_user_has_its_own() {
    if !have_root("policy: quota") {
        return;
    }
    let daemon = daemon_with("[default]\nmax_total_bytes = \"64 KiB\"\n");
    let mut alice = as_user(&daemon, ALICE, &[]);
    for i in 0..16 {
        alice
            .cmd("alloc 4096")
            .unwrap_or_else(|e| panic!("allocation {i} refused: {e}"));
    }
    let err = alice.cmd("alloc 4096").expect_err("17th is over the limit");
    assert_eq!(code(&err), "quota-exceeded", "{err}");
    assert!(
        err.contains("limit 65536, in use 65536, requested 4096"),
        "{err}"
    );
    assert!(err.contains("rule 'default'"), "{err}");
    let mut bob = as_user(&daemon, BOB, &[]);
    for _ in 0..16 {
        bob.ok("alloc 4096");
    }
    // Freeing makes room again.
    alice.ok("free 1");
    alice.ok("alloc 4096");
}

/// The daemon keeps every buffer in the service manager's fd store, whose
/// room is shared by all users: `max_buffers` alone is per connection, so
/// one user with a few connections could take every slot.
/// `max_uid_buffers` counts the buffers of all the uid's connections,
/// imported ones too; another user has a count of its own.
#[test]
fn max_uid_buffers_counts_every_connection_of_the_user() {
    if !have_root("policy: max_uid_buffers") {
        return;
    }
    let daemon = daemon_with("[default]\nmax_uid_buffers = 3\n");
    let mut first = as_user(&daemon, ALICE, &[]);
    let mut second = as_user(&daemon, ALICE, &[]);
    let a = field(&first.ok("alloc 4096"), "id").expect("id").to_owned();
    let b = field(&first.ok("alloc 4096"), "id").expect("id").to_owned();
    let c = field(&second.ok("alloc 4096"), "id")
        .expect("id")
        .to_owned();
    let refusal =
        format!("rule 'default': max_uid_buffers limit 3, in use 3, requested 1 (uid {ALICE})");
    for (who, client) in [("first", &mut first), ("second", &mut second)] {
        let err = client
            .cmd("alloc 4096")
            .expect_err("the user holds three buffers over its two connections");
        assert_eq!(code(&err), "quota-exceeded", "{who}: {err}");
        assert!(err.contains(&refusal), "{who}: {err}");
    }
    // Another user is not affected.
    let mut bob = as_user(&daemon, BOB, &[]);
    for _ in 0..3 {
        bob.ok("alloc 4096");
    }
    let err = bob.cmd("alloc 4096").expect_err("bob's own three");
    assert!(
        err.contains(&format!(
            "max_uid_buffers limit 3, in use 3, requested 1 (uid {BOB})"
        )),
        "{err}"
    );
    // An import of one of the user's buffers is no new buffer of the
    // user's: not refused at the limit, and counted once.
    let token = field(&first.ok(&format!("export {a}")), "token")
        .expect("token")
        .to_owned();
    second.ok(&format!("import {token}"));
    let err = first
        .cmd("alloc 4096")
        .expect_err("still three buffers of the user's");
    assert!(err.contains(&refusal), "{err}");
    // Freeing one makes room again.
    first.ok(&format!("free {b}"));
    second.ok(&format!("free {c}"));
    first.ok("alloc 4096");
}

/// The product's main use: a camera and a codec of one user share every
/// frame, allocated by one and imported by the other. Each frame takes
/// one slot of the fd store, and counts once against `max_uid_buffers`:
/// the user can still allocate up to the limit. Failed before: each
/// shared frame counted once for each connection, and the second frame's
/// import was refused ("in use 3").
#[test]
fn a_buffer_two_connections_of_a_user_hold_counts_once() {
    if !have_root("policy: max_uid_buffers counts a shared buffer once") {
        return;
    }
    let daemon = daemon_with("[default]\nmax_uid_buffers = 3\n");
    let mut camera = as_user(&daemon, ALICE, &[]);
    let mut codec = as_user(&daemon, ALICE, &[]);
    for _ in 0..3 {
        let frame = field(&camera.ok("alloc 4096"), "id")
            .expect("id")
            .to_owned();
        let token = field(&camera.ok(&format!("export {frame}")), "token")
            .expect("token")
            .to_owned();
        codec.ok(&format!("import {token}"));
    }
    let refusal =
        format!("rule 'default': max_uid_buffers limit 3, in use 3, requested 1 (uid {ALICE})");
    for (who, client) in [("camera", &mut camera), ("codec", &mut codec)] {
        let err = client
            .cmd("alloc 4096")
            .expect_err("three frames are the user's three buffers");
        assert_eq!(code(&err), "quota-exceeded", "{who}: {err}");
        assert!(err.contains(&refusal), "{who}: {err}");
    }
}

/// Every access the broker grants is an entry in its tables; without a
/// bound of its own, one client could hold millions (1,024 reads on each of
/// its 4,096 buffers). `max_held_accesses` refuses the one over the limit,
/// and ending one makes room.
#[test]
fn held_accesses_are_limited_per_client() {
    if !have_root("policy: held accesses") {
        return;
    }
    let daemon = daemon_with("[default]\nmax_held_accesses = 2\n");
    let mut alice = as_user(&daemon, ALICE, &["--no-buffer-words"]);
    for _ in 0..2 {
        alice.ok("alloc 4096");
    }
    let first = alice.ok("begin 1 r");
    alice.ok("begin 1 r");
    let err = alice.cmd("begin 2 r").expect_err("a third access");
    assert_eq!(code(&err), "quota-exceeded", "{err}");
    assert!(err.contains("max_held_accesses limit 2, in use 2"), "{err}");
    alice.ok(&format!(
        "end {}",
        field(&first, "access").expect("access id")
    ));
    alice.ok("begin 2 r");
    // Each client has its own.
    let mut bob = as_user(&daemon, BOB, &["--no-buffer-words"]);
    let frame = bob.ok("alloc 4096");
    bob.ok(&format!("begin {} r", field(&frame, "id").expect("id")));
}

#[test]
fn the_most_specific_rule_wins() {
    if !have_root("policy: rule specificity") {
        return;
    }
    let exe = dmabroker_suite::daemon::binary("dmabroker-testclient");
    let exe = exe.canonicalize().expect("canonical exe path");
    let daemon = daemon_with(&format!(
        "[default]\nmax_buffers = 8\n\n\
         [[rule]]\nname = \"alice\"\nuser = {ALICE}\nmax_buffers = 4\n\n\
         [[rule]]\nname = \"alice-testclient\"\nuser = {ALICE}\nexe = \"{}\"\nmax_buffers = 2\n",
        exe.display()
    ));
    let mut alice = as_user(&daemon, ALICE, &[]);
    alice.ok("alloc 4096");
    alice.ok("alloc 4096");
    let err = alice.cmd("alloc 4096").expect_err("user+exe rule allows 2");
    assert!(err.contains("rule 'alice-testclient'"), "{err}");
    let mut bob = as_user(&daemon, BOB, &[]);
    for _ in 0..8 {
        bob.ok("alloc 4096");
    }
    assert!(bob
        .cmd("alloc 4096")
        .expect_err("default allows 8")
        .contains("rule 'default'"));
}

/// `SO_PEERGROUPS` fills a buffer of the caller's size. A client in more
/// groups than the daemon's first guess must still match the rules written
/// for its groups; it matched none, and so escaped every group rule.
#[test]
fn a_client_in_hundreds_of_groups_still_matches_its_group_rule() {
    if !have_root("policy: many supplementary groups") {
        return;
    }
    let groups: Vec<u32> = (70_000..70_300).collect();
    let daemon = daemon_with(
        "[default]\nmax_buffers = 8\n\n\
         [[rule]]\nname = \"crowd\"\ngroup = 70299\nmax_buffers = 1\n",
    );
    let mut member = Scripted::spawn_with_groups(daemon.socket(), ALICE, ALICE, &groups, &[]);
    member.ok("alloc 4096");
    let err = member
        .cmd("alloc 4096")
        .expect_err("the group's rule allows one buffer");
    assert!(err.contains("rule 'crowd'"), "{err}");
}

#[test]
fn imports_across_users_need_the_importers_rule() {
    if !have_root("policy: import across users") {
        return;
    }
    let daemon = daemon_with(&format!(
        "[[rule]]\nname = \"bob-imports\"\nuser = {BOB}\nimport_from = {{ users = [{ALICE}] }}\n"
    ));
    let mut alice = as_user(&daemon, ALICE, &[]);
    let mut bob = as_user(&daemon, BOB, &[]);
    let mut eve = as_user(&daemon, 65503, &[]);
    alice.ok("alloc 4096");
    let token = field(&alice.ok("export 1"), "token")
        .expect("token")
        .to_owned();
    let err = eve
        .cmd(&format!("import {token}"))
        .expect_err("eve may not import alice's buffer");
    assert_eq!(code(&err), "permission-denied", "{err}");
    bob.ok(&format!("import {token}"));
    // A guessed token is just unknown.
    let err = eve
        .cmd("import dmab1-0123456789abcdef0123456789abcdef")
        .expect_err("guessed");
    assert_eq!(code(&err), "unknown-token", "{err}");
    // A token dies with its exporter's hold.
    drop(alice);
    std::thread::sleep(Duration::from_millis(200));
    let mut bob2 = as_user(&daemon, BOB, &[]);
    let err = bob2
        .cmd(&format!("import {token}"))
        .expect_err("exporter gone");
    assert_eq!(code(&err), "unknown-token", "{err}");
}

#[test]
fn export_can_be_forbidden() {
    let daemon = daemon_with("[default]\nmay_export = false\n");
    let mut client = Scripted::spawn(daemon.socket(), &[]);
    client.ok("alloc 4096");
    let err = client.cmd("export 1").expect_err("export forbidden");
    assert_eq!(code(&err), "permission-denied", "{err}");
    assert!(err.contains("may_export"), "{err}");
}

#[test]
fn autofence_required_refuses_no_autofence_and_optional_allows_it() {
    if !have_root("policy: autofence modes") {
        return;
    }
    let daemon = daemon_with(&format!(
        "[default]\nautofence = \"optional\"\n\n\
         [[rule]]\nname = \"strict\"\nuser = {ALICE}\nautofence = \"required\"\n"
    ));
    let out = setpriv_as(ALICE)
        .arg(dmabroker_suite::daemon::binary("dmabroker-testclient"))
        .arg("--socket")
        .arg(daemon.socket())
        .arg("--no-autofence")
        .output()
        .expect("run testclient");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("err permission-denied"), "{stdout}");
    assert!(stdout.contains("strict"), "{stdout}");
    // Optional lets it choose: Bob asked for none and is told he has
    // none (connecting alone would pass with autofence forced on too).
    let out = setpriv_as(BOB)
        .arg(dmabroker_suite::daemon::binary("dmabroker-testclient"))
        .arg("--socket")
        .arg(daemon.socket())
        .arg("--no-autofence")
        .output()
        .expect("run testclient");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let ready = stdout.lines().next().unwrap_or_default();
    assert!(ready.starts_with("ready "), "{stdout}");
    assert!(
        ready.split_whitespace().any(|w| w == "autofence=false"),
        "optional did not let Bob go without autofence: {ready}"
    );
}

#[test]
fn a_reload_applies_to_new_requests_and_a_broken_file_keeps_the_old_policy() {
    let daemon = daemon_with("[default]\nmax_buffers = 4\n");
    let mut client = Scripted::spawn(daemon.socket(), &[]);
    for _ in 0..3 {
        client.ok("alloc 4096");
    }
    reload(&daemon, "[default]\nmax_buffers = 2\n", "policy reloaded");
    // Held buffers stay valid...
    client.ok("write 1 3");
    assert_eq!(field(&client.ok("read 3"), "byte"), Some("0"));
    // ...but new requests see the tighter limit.
    let err = client.cmd("alloc 4096").expect_err("over the new limit");
    assert!(err.contains("limit 2, in use 3"), "{err}");

    reload(
        &daemon,
        "[default]\nmax_buffers = \"many\"\n",
        "policy reload failed",
    );
    assert!(
        daemon.log().contains("policy.toml:2"),
        "the error names file and line"
    );
    let err = client
        .cmd("alloc 4096")
        .expect_err("the old (tight) policy still applies");
    assert!(err.contains("limit 2"), "{err}");
}

/// policy.md: `max_unread_replies` — "a reload applies a new value to
/// connected clients at once". A client connected under a cap of 100,000
/// that stops reading after the reload lowered it to 16 is cut off, as a
/// new one would be; under the old cap it got every reply.
#[test]
fn a_reload_lowers_max_unread_replies_for_connected_clients() {
    use dmabroker_ipc::codec::{decode_server_message, encode_request};
    use dmabroker_ipc::fdpass::{recv_message, send_message};
    use dmabroker_ipc::{Request, RequestBody, RequestHead};
    use std::os::fd::AsFd;
    const SENT: u64 = 2000;
    let daemon = daemon_with("[default]\nmax_unread_replies = 100000\n");
    let mut deaf = dmabroker_suite::raw::RawClient::connect(daemon.socket());
    deaf.hello();
    // A send that blocks for good fails the test instead of hanging it.
    nix::sys::socket::setsockopt(
        &deaf.fd(),
        nix::sys::socket::sockopt::SendTimeout,
        &nix::sys::time::TimeVal::new(5, 0),
    )
    .expect("SO_SNDTIMEO");
    reload(
        &daemon,
        "[default]\nmax_unread_replies = 16\n",
        "policy reloaded",
    );
    let mut sent = 0;
    for id in 1..=SENT {
        let bytes = encode_request(&Request {
            head: RequestHead {
                id: 1000 + id,
                fds: 0,
                flags: 0,
            },
            body: RequestBody::ListHeaps,
        })
        .expect("encode");
        if send_message(deaf.fd(), &bytes, &[], false).is_err() {
            break;
        }
        sent += 1;
    }
    // Every reply it was sent, up to the hang-up (or up to the last, if
    // it was never cut off).
    let mut read = 0;
    while read < sent {
        match recv_message(deaf.fd().as_fd(), false) {
            Ok(message) => {
                decode_server_message(&message.bytes).expect("decodable");
                read += 1;
            }
            Err(_) => break,
        }
    }
    assert!(
        read < sent,
        "the client got all {sent} replies: the reload's cap of 16 did not apply to it"
    );
    dmabroker_suite::eventually("the cut-off to be logged", || {
        daemon.log().contains("client not reading its replies")
    });
    // Others are served.
    Scripted::spawn(daemon.socket(), &[]).ok("alloc 4096");
}

/// policy.md: on a reload "every connected client is matched again and
/// gets the new limits for its new requests". A `write_hold_limit` added
/// by a reload times a write a client connected before it begins after
/// it: the write is revoked and the reader queued behind it granted.
#[test]
fn a_reload_adding_a_write_hold_limit_revokes_connected_clients_writes() {
    let daemon = daemon_with("[default]\n");
    let mut writer = Scripted::spawn(daemon.socket(), &[]);
    let id = field(&writer.ok("alloc 8192"), "id")
        .expect("id")
        .to_owned();
    let token = field(&writer.ok(&format!("export {id}")), "token")
        .expect("token")
        .to_owned();
    let mut reader = Scripted::spawn(daemon.socket(), &[]);
    reader.ok(&format!("import {token}"));
    reload(
        &daemon,
        "[default]\nwrite_hold_limit = \"200ms\"\n",
        "policy reloaded",
    );
    writer.ok(&format!("begin {id} w"));
    reader.send(&format!("begin {id} r"));
    let granted = reader
        .recv(Duration::from_secs(10))
        .expect("the reader granted once the write is revoked");
    assert!(granted.starts_with("ok"), "{granted}");
    assert_eq!(field(&granted, "revoked"), Some("true"), "{granted}");
    let event = writer.ok("event 5000");
    assert!(event.contains("AccessRevoked"), "{event}");
}

/// policy.md: `may_export` is "checked when a token is created: a token
/// made before a reload that sets `false` keeps working while its exporter
/// holds the buffer". After the reload the token is still imported, no
/// holder may make a new one, and the token dies with its exporter's hold.
#[test]
fn a_token_made_before_a_reload_forbidding_exports_keeps_working() {
    let daemon = daemon_with("[default]\nmay_export = true\n");
    let mut owner = Scripted::spawn(daemon.socket(), &[]);
    let id = field(&owner.ok("alloc 4096"), "id").expect("id").to_owned();
    let token = field(&owner.ok(&format!("export {id}")), "token")
        .expect("token")
        .to_owned();
    reload(
        &daemon,
        "[default]\nmay_export = false\n",
        "policy reloaded",
    );
    let mut first = Scripted::spawn(daemon.socket(), &[]);
    let imported = first
        .cmd(&format!("import {token}"))
        .unwrap_or_else(|e| panic!("the token made before the reload was refused: {e}"));
    let theirs = field(&imported, "id").expect("id").to_owned();
    for (who, client, buffer) in [
        ("owner", &mut owner, &id),
        ("importer", &mut first, &theirs),
    ] {
        let err = client
            .cmd(&format!("export {buffer}"))
            .expect_err("a new token after the reload");
        assert_eq!(code(&err), "permission-denied", "{who}: {err}");
        assert!(err.contains("may_export"), "{who}: {err}");
    }
    let mut second = Scripted::spawn(daemon.socket(), &[]);
    second.ok(&format!("import {token}"));
    // Its exporter lets go: the token goes with its hold.
    owner.ok(&format!("free {id}"));
    owner.ok("heaps"); // the free has been handled
    let err = Scripted::spawn(daemon.socket(), &[])
        .cmd(&format!("import {token}"))
        .expect_err("the exporter let go");
    assert_eq!(code(&err), "unknown-token", "{err}");
}

/// policy.md: `import_from = { groups = [...] }` lists exporters by group,
/// "primary or supplementary". Bob may import from members of one group:
/// from Alice while her process has it as a supplementary group (her
/// primary group is her own), not from her process without it, nor from
/// anyone else.
#[test]
fn import_from_a_group_matches_an_exporters_supplementary_group() {
    if !have_root("policy: import_from by supplementary group") {
        return;
    }
    const CREW: u32 = 70_500;
    let daemon = daemon_with(&format!(
        "[[rule]]\nname = \"bob-imports-crew\"\nuser = {BOB}\n\
         import_from = {{ groups = [{CREW}] }}\n"
    ));
    let token_of = |exporter: &mut Scripted| {
        let id = field(&exporter.ok("alloc 4096"), "id")
            .expect("id")
            .to_owned();
        field(&exporter.ok(&format!("export {id}")), "token")
            .expect("token")
            .to_owned()
    };
    let mut bob = as_user(&daemon, BOB, &[]);

    let mut alice_in_crew =
        Scripted::spawn_with_groups(daemon.socket(), ALICE, ALICE, &[CREW], &[]);
    let token = token_of(&mut alice_in_crew);
    bob.cmd(&format!("import {token}"))
        .unwrap_or_else(|e| panic!("an exporter in group {CREW} (supplementary) was refused: {e}"));

    let mut alice_alone = as_user(&daemon, ALICE, &[]);
    let mut eve = as_user(&daemon, 65503, &[]);
    for exporter in [&mut alice_alone, &mut eve] {
        let token = token_of(exporter);
        let err = bob
            .cmd(&format!("import {token}"))
            .expect_err("an exporter outside the group");
        assert_eq!(code(&err), "permission-denied", "{err}");
        assert!(err.contains("bob-imports-crew"), "{err}");
    }
}

#[test]
fn the_charge_moves_to_the_remaining_holder_when_the_owner_leaves() {
    // Bob's quota fits one 64 KiB buffer. While Alice owns the buffer he
    // imported, he can still allocate his own; once she leaves, her buffer
    // is charged to him and his next allocation is refused.
    let daemon = daemon_with("[default]\nmax_total_bytes = \"128 KiB\"\n");
    let mut alice = Scripted::spawn(daemon.socket(), &[]);
    let mut bob = Scripted::spawn(daemon.socket(), &[]);
    alice.ok("alloc 65536");
    let token = field(&alice.ok("export 1"), "token")
        .expect("token")
        .to_owned();
    bob.ok(&format!("import {token}"));
    bob.ok("alloc 65536");
    bob.ok("free 2");
    let gone_before = daemon.log().matches("client disconnected").count();
    alice.kill();
    let deadline = Instant::now() + Duration::from_secs(5);
    while daemon.log().matches("client disconnected").count() == gone_before {
        assert!(
            Instant::now() < deadline,
            "alice's hang-up was never noticed"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // The shared buffer lives on, now charged to Bob.
    let err = bob
        .cmd("alloc 131072")
        .expect_err("bob now carries alice's 64 KiB");
    assert!(err.contains("in use 65536, requested 131072"), "{err}");
    bob.ok("alloc 65536");
    assert_eq!(field(&bob.ok("read 1"), "uniform"), Some("true"));
}

/// One user must not take every connection the broker serves (and with
/// them its fd limit): `max_uid_connections` counts the connections of
/// all of a uid's processes, each uid against its own rule. One more is
/// refused `QuotaExceeded`, naming the rule; other users still connect;
/// and a place comes free when one of the uid's connections closes.
#[test]
fn a_uid_at_its_connection_limit_is_refused_and_other_users_are_not() {
    if !have_root("policy: max_uid_connections") {
        return;
    }
    let daemon = daemon_with(&format!(
        "[[rule]]\nname = \"root-few\"\nuser = 0\nmax_uid_connections = 2\n\n\
         [[rule]]\nname = \"alice-one\"\nuser = {ALICE}\nmax_uid_connections = 1\n"
    ));
    let connect = || dmabroker_client::Client::connect_to(daemon.socket());
    // The readiness probe's connection may be counted for a moment yet.
    let mut held = Vec::new();
    for _ in 0..2 {
        let deadline = Instant::now() + Duration::from_secs(5);
        let client = loop {
            match connect() {
                Ok(client) => break client,
                Err(err) => assert!(Instant::now() < deadline, "{err}"),
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        held.push(client);
    }
    // uid 0's third connection, from another process: counted per uid,
    // not per process.
    let third = first_line_of_client_as(&daemon, 0);
    assert!(
        third.starts_with("err quota-exceeded")
            && third.contains("rule 'root-few': max_uid_connections limit 2, in use 2"),
        "uid 0's third connection, from another process: {third}"
    );
    let err = connect().expect_err("a third connection of uid 0");
    assert_eq!(
        err.code(),
        Some(dmabroker_ipc::ErrorCode::QuotaExceeded),
        "{err}"
    );

    // Alice has a rule of her own, and her limit is counted apart.
    let mut alice = as_user(&daemon, ALICE, &[]);
    alice.ok("alloc 4096");
    let second = first_line_of_client_as(&daemon, ALICE);
    assert!(
        second.starts_with("err quota-exceeded")
            && second.contains("rule 'alice-one': max_uid_connections limit 1, in use 1"),
        "alice's second process: {second}"
    );

    drop(held.pop());
    dmabroker_suite::eventually("a place of uid 0 to come free", || connect().is_ok());
}

/// What a client process run as `uid` says first: `ready …`, or `err CODE
/// message` when its connection is refused (it then exits).
fn first_line_of_client_as(daemon: &Daemon, uid: u32) -> String {
    first_line_of(
        setpriv_as(uid).arg(dmabroker_suite::daemon::binary("dmabroker-testclient")),
        daemon.socket(),
    )
}

/// What the testclient `cmd` runs says first, served by `socket`.
fn first_line_of(cmd: &mut std::process::Command, socket: &std::path::Path) -> String {
    let output = cmd
        .arg("--socket")
        .arg(socket)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run dmabroker-testclient");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// A connection's byte quota was laundered through a second connection
/// of the same uid: imports were not checked against `max_total_bytes`
/// (only charges were, and an import is charged only once the owner lets
/// go), so A allocated a full quota, B imported it, A freed, A allocated
/// again, ... and B ended up charged eight times its limit. The limit now
/// bounds everything a connection holds when it takes a buffer.
#[test]
fn byte_quota_is_not_laundered_through_an_importer() {
    let daemon = daemon_with("[default]\nmax_total_bytes = \"64 KiB\"\n");
    let mut a = Scripted::spawn(daemon.socket(), &[]);
    let mut b = Scripted::spawn(daemon.socket(), &[]);
    for round in 0..8 {
        let allocated = a
            .cmd("alloc 65536")
            .unwrap_or_else(|e| panic!("round {round}: A's allocation refused: {e}"));
        let id = field(&allocated, "id").expect("id").to_owned();
        let token = field(&a.ok(&format!("export {id}")), "token")
            .expect("token")
            .to_owned();
        if let Err(e) = b.cmd(&format!("import {token}")) {
            // The fixed behaviour: B may not take on more than its quota.
            assert_eq!(code(&e), "quota-exceeded", "round {round}: {e}");
            return;
        }
        a.ok(&format!("free {id}"));
    }
    // Both connections together are allowed 2 x 64 KiB.
    a.ok("heaps"); // A's last free has been handled
    let err = b.cmd("alloc 4096").expect_err("B is over its quota");
    let in_use: u64 = err
        .split("in use ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no in-use figure: {err}"));
    assert!(
        in_use <= 65536,
        "B is charged {in_use} bytes against a 64 KiB max_total_bytes: {err}"
    );
}

/// `/proc/PID/exe` names the executable as the client's own mount
/// namespace sees it: any user who may create a user namespace
/// (`unshare -Urm`) could bind-mount its own program over any path there
/// and be matched by that path's `exe` rule. The path now counts only if
/// it leads the daemon to the file the process runs.
#[test]
fn exe_rules_cannot_be_claimed_from_a_private_mount_namespace() {
    if !have_root("exe rules from a private mount namespace") {
        return;
    }
    let probe = setpriv_as(ALICE).args(["unshare", "-Urm", "true"]).status();
    if !probe.is_ok_and(|s| s.success()) {
        dmabroker_daemon::kernel::note_skip("unprivileged user namespaces are unavailable here");
        return;
    }
    let daemon = daemon_with(&format!(
        "[default]\nmax_buffers = 1\n\n\
         [[rule]]\nname = \"alice-true\"\nuser = {ALICE}\nexe = \"/usr/bin/true\"\nmax_buffers = 100\n"
    ));
    // Alice's testclient, as itself: the default's single buffer.
    let mut plain = as_user(&daemon, ALICE, &[]);
    plain.ok("alloc 4096");
    let err = plain.cmd("alloc 4096").expect_err("default allows one");
    assert!(err.contains("rule 'default'"), "{err}");
    // The same program, bind-mounted over /usr/bin/true in Alice's own
    // (unprivileged) namespace.
    let mut cmd = setpriv_as(ALICE);
    cmd.args(["unshare", "-Urm", "sh", "-c"])
        .arg("mount --bind \"$0\" /usr/bin/true && exec /usr/bin/true \"$@\"")
        .arg(dmabroker_suite::daemon::binary("dmabroker-testclient"));
    let mut spoofed = Scripted::spawn_wrapped(cmd, daemon.socket(), &[]);
    spoofed.ok("alloc 4096");
    let second = spoofed.cmd("alloc 4096");
    assert!(
        second.is_err(),
        "Alice's own testclient got rule 'alice-true' (max_buffers 100) by posing as /usr/bin/true"
    );
}

/// The mount namespace is compared on its own too: `unshare -Urm` makes a
/// user namespace as well, so the test above passes on the user-namespace
/// check alone. Here root makes a private mount namespace only (the
/// host's user namespace), bind-mounts Alice's testclient over the
/// rule's path there, and runs it as Alice: its exe link says
/// `/usr/bin/true`, and it still gets the default.
#[test]
fn exe_rules_cannot_be_claimed_from_a_private_mount_namespace_alone() {
    if !have_root("exe rules from a private mount namespace alone") {
        return;
    }
    let daemon = daemon_with(&format!(
        "[default]\nmax_buffers = 1\n\n\
         [[rule]]\nname = \"alice-true\"\nuser = {ALICE}\nexe = \"/usr/bin/true\"\nmax_buffers = 100\n"
    ));
    let mut cmd = std::process::Command::new("unshare");
    cmd.args(["-m", "--propagation", "private", "sh", "-c"])
        .arg(format!(
            "mount --bind \"$0\" /usr/bin/true && \
             exec setpriv --reuid={ALICE} --regid={ALICE} --clear-groups /usr/bin/true \"$@\""
        ))
        .arg(dmabroker_suite::daemon::binary("dmabroker-testclient"));
    let mut spoofed = Scripted::spawn_wrapped(cmd, daemon.socket(), &[]);
    spoofed.ok("alloc 4096");
    let second = spoofed
        .cmd("alloc 4096")
        .expect_err("the default allows one buffer");
    assert!(
        second.contains("rule 'default'"),
        "Alice's own testclient got rule 'alice-true' from a private mount namespace: {second}"
    );
}

/// In a user namespace of its own a process may point its exe link at any
/// file it can open (`PR_SET_MM_MAP`, with the capability it has there)
/// without leaving the host's mount namespace, so the mount namespace alone
/// did not make the link trustworthy. A client in another user namespace
/// is now matched by no `exe` rule, whatever its link says: here Alice's
/// own testclient, which a rule names, run in a user namespace of its own
/// (`unshare -U`), gets the default.
#[test]
fn exe_rules_do_not_match_a_client_in_a_user_namespace_of_its_own() {
    if !have_root("exe rules from a user namespace") {
        return;
    }
    let user_namespace = |program: &str| {
        let mut cmd = setpriv_as(ALICE);
        cmd.args(["unshare", "-U", program]);
        cmd
    };
    if !user_namespace("true").status().is_ok_and(|s| s.success()) {
        dmabroker_daemon::kernel::note_skip("unprivileged user namespaces are unavailable here");
        return;
    }
    let testclient = dmabroker_suite::daemon::binary("dmabroker-testclient");
    let daemon = daemon_with(&format!(
        "[default]\nmax_buffers = 1\n\n\
         [[rule]]\nname = \"alice-testclient\"\nuser = {ALICE}\nexe = \"{}\"\nmax_buffers = 100\n",
        testclient.display()
    ));
    // As itself, in the host's namespaces, the rule is Alice's.
    let mut plain = as_user(&daemon, ALICE, &[]);
    plain.ok("alloc 4096");
    plain.ok("alloc 4096");
    let program = testclient.to_str().expect("utf-8 path");
    let mut namespaced = Scripted::spawn_wrapped(user_namespace(program), daemon.socket(), &[]);
    namespaced.ok("alloc 4096");
    let second = namespaced
        .cmd("alloc 4096")
        .expect_err("the default allows one");
    assert!(second.contains("rule 'default'"), "{second}");
}

/// A client run from a FUSE mount (`allow_other`) whose server never
/// answers the daemon: looking up the client's executable to compare files
/// (as a first fix of exe spoofing did) asked that server for GETATTR on
/// the broker's one thread, and every client stalled. Identifying a client
/// reads links only.
#[test]
fn a_client_run_from_a_stalling_fuse_mount_does_not_stall_the_daemon() {
    let daemon = daemon_with("[default]\n");
    let honest = dmabroker_client::Client::connect_to(daemon.socket()).expect("connect");
    honest.heaps().expect("served before");
    let Some(fuse) = StallingFuse::mount(
        "a client run from a FUSE mount",
        Stall::GetattrOf(daemon.pid()),
    ) else {
        return;
    };
    let mut fused = std::process::Command::new(fuse.file())
        .arg("--socket")
        .arg(daemon.socket())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("client from the FUSE mount");
    // Until the daemon has identified it (or, stalled, never will): the
    // honest client's turn must come after that look, not before.
    let identified = format!("pid={}", fused.id());
    let deadline = Instant::now() + Duration::from_secs(5);
    while !daemon.log().contains(&identified) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let served = served_within(honest, Duration::from_secs(3));
    drop(fuse);
    let _ = fused.kill();
    let _ = fused.wait();
    assert!(
        served,
        "an honest client was not served while the daemon looked at a FUSE-backed exe"
    );
}

/// A client hands over, to be adopted, an epoll whose lock a thread of its
/// own holds: the thread's `epoll_ctl(ADD)` of a file on its FUSE mount
/// waits for an answer to `POLL` the server never gives. Reading the
/// epoll's fdinfo (to ask whether it is a dma-buf) waited for that lock,
/// uninterruptibly: every client stalled, and not even SIGKILL ended the
/// daemon. A client's fd is now looked at by its `/proc` link first, and
/// an epoll is refused by that alone.
#[test]
fn an_epoll_a_client_holds_locked_is_refused_without_stalling_the_daemon() {
    use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
    let daemon = daemon_with("[default]\n");
    let honest = dmabroker_client::Client::connect_to(daemon.socket()).expect("connect");
    honest.heaps().expect("served before");
    let Some(fuse) = StallingFuse::mount(
        "an epoll held on a FUSE poll",
        Stall::GetattrOf(daemon.pid()),
    ) else {
        return;
    };
    let file = std::fs::File::open(fuse.file()).expect("open the FUSE file");
    let epoll = std::sync::Arc::new(Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).expect("epoll"));
    let holder = std::sync::Arc::clone(&epoll);
    // Returns once the server is gone; it waits for a POLL answer, holding
    // the epoll's lock, until then.
    let held = std::thread::spawn(move || {
        let _ = holder.add(&file, EpollEvent::new(EpollFlags::EPOLLIN, 0));
    });
    std::thread::sleep(Duration::from_millis(300));
    let (mut client, inherited) = Scripted::spawn_as_with_fd(
        daemon.socket(),
        0,
        0,
        std::os::fd::AsFd::as_fd(&epoll.0),
        &[],
    );
    client.send(&format!("adopt-inherited {inherited}"));
    let served = served_within(honest, Duration::from_secs(3));
    let answer = client.recv(Duration::from_secs(3));
    drop(fuse);
    let _ = held.join();
    assert!(
        served,
        "an honest client was not served while the daemon looked at the epoll"
    );
    let answer = answer.expect("the adopt is answered");
    assert!(answer.starts_with("err not-a-dma-buf"), "{answer}");
}

/// What a client of uid `inner` of a namespace `maker` made says first.
fn first_words_in_user_namespace(socket: &std::path::Path, maker: u32, inner: u32) -> String {
    first_words(socket, |cmd| {
        Some(userns::in_user_namespace(cmd, maker, inner))
    })
}

/// What a testclient says first, run as `prepare` sets it up (and the maps
/// it returns written).
fn first_words(
    socket: &std::path::Path,
    prepare: impl FnOnce(&mut std::process::Command) -> Option<userns::Maps>,
) -> String {
    let mut cmd =
        std::process::Command::new(dmabroker_suite::daemon::binary("dmabroker-testclient"));
    let maps = prepare(&mut cmd);
    let first = first_line_of(&mut cmd, socket);
    if let Some(maps) = maps {
        maps.written();
    }
    first
}

/// A container's user who made a namespace of their own inside it
/// (`unshare -U`) counted as that user's host uid: each of the
/// container's 65,536 uids could be a count of its own again, with its
/// own closing threads. The outermost namespace below the daemon's
/// decides now.
#[test]
fn a_namespace_made_inside_a_container_counts_with_the_container() {
    if !have_root("policy: a namespace inside a container") {
        return;
    }
    let daemon = daemon_with(&format!(
        "[[rule]]\nname = \"container-two\"\nuser = {}\nmax_uid_connections = 1\n",
        userns::OUTER_BASE + 2
    ));
    let mut first = userns::spawn_in_user_namespace(daemon.socket(), 0, 1, &[]);
    first.ok("alloc 4096");
    let refused = first_words(daemon.socket(), |cmd| {
        userns::in_namespace_made_inside(cmd, first.pid(), 2);
        None
    });
    assert!(
        refused.starts_with("err quota-exceeded")
            && refused.contains("rule 'container-two': max_uid_connections limit 1, in use 1")
            && refused.contains("counted with its container"),
        "uid 2 of the container, in a namespace of its own: {refused}"
    );
}

/// A namespace root made for one uid (a setuid sandbox's, a unit's
/// `PrivateUsers=`) counted as a container of its own: each sandbox a
/// user started was a fresh count. Its process counts as its uid now.
#[test]
fn a_namespace_root_made_for_one_uid_counts_as_that_uid() {
    if !have_root("policy: a single-uid namespace") {
        return;
    }
    let uid = userns::OUTER_BASE + 5;
    let daemon = daemon_with(&format!(
        "[[rule]]\nname = \"sandboxed\"\nuser = {uid}\nmax_uid_connections = 1\n"
    ));
    let mut outside = Scripted::spawn_as(daemon.socket(), uid, uid, &[]);
    outside.ok("alloc 4096");
    let refused = first_words(daemon.socket(), |cmd| {
        Some(userns::in_single_uid_namespace(cmd, 5))
    });
    assert!(
        refused.starts_with("err quota-exceeded")
            && refused.contains(&format!(
                "rule 'sandboxed': max_uid_connections limit 1, in use 1, requested 1 (uid {uid})"
            )),
        "uid {uid} in a sandbox: {refused}"
    );
}

/// The uids of Alice's namespace were counted as Alice but each checked
/// against its own rule, `[default]`: a stricter rule for Alice did not
/// reach them, and with them she had the default's limit. The stricter of
/// the process's rule and its maker's applies now.
#[test]
fn a_makers_own_connection_limit_holds_for_the_uids_of_their_namespace() {
    if !have_root("policy: a maker's max_uid_connections in their user namespace") {
        return;
    }
    let daemon = daemon_with(&format!(
        "[[rule]]\nname = \"alice-one\"\nuser = {ALICE}\nmax_uid_connections = 1\n"
    ));
    let mut first = userns::spawn_in_user_namespace(daemon.socket(), ALICE, 1, &[]);
    first.ok("alloc 4096");
    let refused = first_words_in_user_namespace(daemon.socket(), ALICE, 2);
    assert!(
        refused.starts_with("err quota-exceeded")
            && refused.contains("rule 'alice-one': max_uid_connections limit 1, in use 1")
            && refused.contains(&format!("counted as uid {ALICE}")),
        "a second uid of Alice's namespace: {refused}"
    );
    // Another user's namespace is not bound by Alice's rule.
    let of_root = first_words_in_user_namespace(daemon.socket(), 0, 2);
    assert!(
        of_root.starts_with("ready"),
        "uid 2 of a container: {of_root}"
    );
    drop(first);
    dmabroker_suite::eventually("Alice's place to come free", || {
        first_words_in_user_namespace(daemon.socket(), ALICE, 2).starts_with("ready")
    });
}

/// `max_uid_buffers` as `max_uid_connections`: a process of Alice's user
/// namespace is counted as Alice and held to the stricter of its own rule
/// (`[default]`, 4,096) and Alice's, so a rule giving Alice less reaches
/// the uids of her namespaces too. Found by a review: the check read the
/// process's own rule only.
#[test]
fn a_makers_own_buffer_limit_holds_for_the_uids_of_their_namespace() {
    if !have_root("policy: a maker's max_uid_buffers in their user namespace") {
        return;
    }
    let daemon = daemon_with(&format!(
        "[[rule]]\nname = \"alice-two\"\nuser = {ALICE}\nmax_uid_buffers = 2\n"
    ));
    let mut first = userns::spawn_in_user_namespace(daemon.socket(), ALICE, 1, &[]);
    first.ok("alloc 4096");
    first.ok("alloc 4096");
    let refused = first
        .cmd("alloc 4096")
        .expect_err("a third buffer of Alice's");
    assert!(
        refused.contains("quota-exceeded")
            && refused.contains("rule 'alice-two': max_uid_buffers limit 2, in use 2")
            && refused.contains(&format!("counted as uid {ALICE}")),
        "a process of Alice's namespace: {refused}"
    );
}

/// A user with a subordinate uid range connects as any uid of it from a
/// user namespace (here Alice's, with uids 300,000 on), and each counted
/// as a user of its own: `max_uid_connections` was a limit per
/// subordinate uid, so per user only the daemon's connection cap bounded
/// it. Processes in a user namespace now count as the user who made it;
/// a namespace root made (a container's, `PrivateUsers=`) counts as the
/// container, not with root or anyone else.
#[test]
fn processes_in_a_user_namespace_count_against_its_makers_connection_limit() {
    if !have_root("policy: max_uid_connections across a user namespace") {
        return;
    }
    let daemon = daemon_with(
        "[[rule]]\nname = \"namespaced-three\"\nuser = 300003\nmax_uid_connections = 2\n",
    );
    let third = |maker: u32| first_words_in_user_namespace(daemon.socket(), maker, 3);
    // Processes of two other uids of Alice's namespace, each the first of
    // its uid, and each under the default's 256.
    let mut first = userns::spawn_in_user_namespace(daemon.socket(), ALICE, 1, &[]);
    first.ok("alloc 4096");
    let mut second = userns::spawn_in_user_namespace(daemon.socket(), ALICE, 2, &[]);
    second.ok("alloc 4096");
    // A third uid's first connection: counted with theirs, against its
    // rule's 2.
    let refused = third(ALICE);
    assert!(
        refused.starts_with("err quota-exceeded")
            && refused.contains("rule 'namespaced-three': max_uid_connections limit 2, in use 2")
            && refused.contains(&format!("counted as uid {ALICE}")),
        "a third uid of Alice's namespace: {refused}"
    );
    // Another user is not counted with them, nor is the same uid of a
    // container (a namespace root made).
    let root = dmabroker_client::Client::connect_to(daemon.socket()).expect("root connects");
    root.heaps().expect("root is served");
    let of_root = third(0);
    assert!(
        of_root.starts_with("ready"),
        "uid 3 of a container: {of_root}"
    );
    drop((first, second));
    dmabroker_suite::eventually("places of the namespace's maker to come free", || {
        third(ALICE).starts_with("ready")
    });
}

/// A client whose `heaps` list leaves out the daemon's default heap was
/// still told that heap as its default (`Welcome`) and shown every heap
/// (`ListHeaps`): naming the default it was given was refused, and an
/// allocation naming none came from another heap than announced. It is
/// told the first heap of its own list and shown only its own heaps.
#[test]
fn a_client_is_told_the_default_and_the_heaps_its_policy_allows() {
    // A node that opens, so `system` is the daemon's default; allocations
    // from it would fail, which this test never asks for.
    let heap_dir = dmabroker_suite::tmp::TempDir::new("heaps");
    std::fs::write(heap_dir.path().join("system"), b"").expect("fake heap node");
    let heap_dir_arg = heap_dir.path().to_str().expect("utf-8 path").to_owned();
    let daemon = Daemon::start_with(DaemonOptions {
        policy: Some(
            "[default]\nheaps = [\"memfd\"]\n\n\
             [[rule]]\nname = \"root\"\nuser = 0\nheaps = \"all\"\n"
                .to_owned(),
        ),
        args: vec![
            "--socket-mode".into(),
            "0666".into(),
            "--dma-heap-dir".into(),
            heap_dir_arg,
        ],
        ..Default::default()
    });
    let root = daemon.client();
    assert_eq!(root.default_heap(), "system", "root may use every heap");
    let all: Vec<String> = root
        .heaps()
        .expect("heaps")
        .into_iter()
        .map(|h| h.name)
        .collect();
    assert_eq!(all, ["system", "memfd"]);

    let mut alice = as_user(&daemon, ALICE, &[]);
    let default = alice.ok("default-heap");
    assert_eq!(field(&default, "default_heap"), Some("memfd"), "{default}");
    let heaps = alice.ok("heaps");
    assert!(
        heaps.contains("memfd") && !heaps.contains("system"),
        "Alice is shown only the heaps she may use: {heaps}"
    );
    let alloc = alice.ok("alloc 4096 heap=memfd");
    assert_eq!(field(&alloc, "heap"), Some("memfd"), "{alloc}");
}
