#![allow(clippy::unwrap_used)]

use super::*;
use proptest::prelude::*;

/// A fixed user database, so the tests do not depend on the machine's.
struct FakeNames;

impl NameLookup for FakeNames {
    fn user(&self, name: &str) -> Result<Option<u32>, String> {
        Ok(match name {
            "root" => Some(0),
            "alice" => Some(1000),
            "bob" => Some(1001),
            "camera" => Some(990),
            _ => None,
        })
    }

    fn group(&self, name: &str) -> Result<Option<u32>, String> {
        Ok(match name {
            "root" => Some(0),
            "wheel" => Some(10),
            "video" => Some(44),
            "render" => Some(105),
            _ => None,
        })
    }
}

const ORIGIN: &str = "/etc/dmabroker/policy.toml";

/// A skip `tests/run` lists after the host tier (cargo hides a passing
/// test's output): the line goes to `$DMABROKER_SKIP_LOG` too, as the
/// daemon crate's `kernel::note_skip` writes it (this crate cannot use
/// that one: the daemon depends on it).
fn note_skip(why: &str) {
    use std::io::Write;
    eprintln!("SKIPPED: {why}");
    if let Some(path) = std::env::var_os("DMABROKER_SKIP_LOG") {
        let logged = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
            .and_then(|mut log| log.write_all(format!("policy: {why}\n").as_bytes()));
        if let Err(err) = logged {
            eprintln!("cannot record the skip in $DMABROKER_SKIP_LOG: {err}");
        }
    }
}

fn parse_many(texts: &[(&str, &str)]) -> Result<Policy, PolicyError> {
    let mut builder = Builder::default();
    for (origin, text) in texts {
        builder.apply(parse_fragment(text, Path::new(origin), &FakeNames)?);
    }
    Ok(builder.finish())
}

fn parse(text: &str) -> Policy {
    match parse_many(&[(ORIGIN, text)]) {
        Ok(policy) => policy,
        Err(e) => panic!("unexpected error: {e}"),
    }
}

fn error(text: &str) -> String {
    match parse_many(&[(ORIGIN, text)]) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(e) => e.to_string(),
    }
}

/// Asserts the error names `path:line` and mentions `needle`.
#[track_caller]
fn assert_error(text: &str, line: usize, needle: &str) {
    let message = error(text);
    let location = format!("{ORIGIN}:{line}:");
    assert!(
        message.starts_with(&location),
        "expected {location} in {message:?}"
    );
    assert!(
        message.contains(needle),
        "expected {needle:?} in {message:?}"
    );
}

fn who(uid: u32, gid: u32) -> Identity {
    Identity {
        uid,
        gid,
        ..Identity::default()
    }
}

fn with_exe(mut id: Identity, exe: &str) -> Identity {
    id.exe = Some(PathBuf::from(exe));
    id
}

fn with_unit(mut id: Identity, unit: &str) -> Identity {
    id.unit = Some(unit.to_string());
    id
}

const MIB: u64 = 1 << 20;

#[test]
fn builtin_defaults() {
    let policy = Policy::builtin();
    assert!(policy.sources().is_empty());
    let resolved = policy.resolve(&who(1000, 1000));
    assert_eq!(resolved.rule, "default");
    let expected = Limits {
        heaps: None,
        max_buffer_size: 256 * MIB,
        max_total_bytes: 1024 * MIB,
        max_buffers: 4096,
        may_export: true,
        import_from: ImportFrom::SameUser,
        autofence: AutofenceMode::Optional,
        write_hold_limit: None,
        max_queued_requests: 64,
        max_held_accesses: 4096,
        max_unread_replies: 256,
        max_uid_connections: 256,
        max_uid_buffers: 4096,
    };
    assert_eq!(*resolved.limits, expected);
    assert!(policy.is_admin(0, &[]));
    assert!(!policy.is_admin(1000, &[1000, 10]));
}

#[test]
fn empty_file_is_builtin() {
    let policy = parse("# nothing here\n");
    assert_eq!(**policy.default_limits(), Limits::default());
    assert_eq!(policy.sources(), [PathBuf::from(ORIGIN)]);
}

#[test]
fn every_default_key() {
    let policy = parse(
        r#"
        admins = { users = ["alice", 1234], groups = ["wheel"] }
        [default]
        heaps = ["system", "udmabuf", "memfd"]
        max_buffer_size = "64 MiB"
        max_total_bytes = "1G"
        max_buffers = 100
        may_export = false
        import_from = { users = ["bob", 7], groups = ["video"] }
        autofence = "required"
        write_hold_limit = "500ms"
        max_queued_requests = 8
        max_held_accesses = 32
        max_unread_replies = 16
        max_uid_connections = 12
        max_uid_buffers = 300
        "#,
    );
    let limits = policy.resolve(&who(5, 5)).limits;
    assert_eq!(
        *limits,
        Limits {
            heaps: Some(vec!["system".into(), "udmabuf".into(), "memfd".into()]),
            max_buffer_size: 64 * MIB,
            max_total_bytes: 1024 * MIB,
            max_buffers: 100,
            may_export: false,
            import_from: ImportFrom::Only {
                users: vec![1001, 7],
                groups: vec![44]
            },
            autofence: AutofenceMode::Required,
            write_hold_limit: Some(Duration::from_millis(500)),
            max_queued_requests: 8,
            max_held_accesses: 32,
            max_unread_replies: 16,
            max_uid_connections: 12,
            max_uid_buffers: 300,
        }
    );
    assert!(policy.is_admin(1000, &[]));
    assert!(policy.is_admin(1234, &[]));
    assert!(policy.is_admin(5, &[5, 10]));
    assert!(!policy.is_admin(5, &[5, 44]));
    assert!(policy.is_admin(0, &[]));
}

#[test]
fn admins_as_a_table_section() {
    let policy = parse("[admins]\ngroups = [10]\n");
    assert!(policy.is_admin(1000, &[10]));
    assert!(!policy.is_admin(1000, &[]));
}

/// The user's own rule is one naming the user and nothing narrower; a
/// rule for some of their processes (a unit, an exe, a group) is not, nor
/// is another user's, and without a rule of theirs the default applies.
#[test]
fn a_users_own_rule_names_only_the_user() {
    let policy = parse(
        r#"
        [[rule]]
        name = "alice"
        user = "alice"
        max_uid_connections = 4

        [[rule]]
        name = "alice-camera"
        user = "alice"
        unit = "camera.service"
        max_uid_connections = 100

        [[rule]]
        name = "video"
        group = "video"
        max_uid_connections = 200

        [[rule]]
        name = "alice-video"
        user = "alice"
        group = "video"
        max_uid_connections = 300

        [[rule]]
        name = "bob-off"
        user = "bob"
        enabled = false
        "#,
    );
    let alice = policy.resolve_user(1000);
    assert_eq!(alice.rule, "alice");
    assert_eq!(alice.limits.max_uid_connections, 4);
    assert_eq!(policy.resolve_user(1001).rule, "default");
    assert_eq!(policy.resolve_user(990).rule, "default");
}

#[test]
fn criteria_must_all_match() {
    let policy = parse(
        r#"
        [[rule]]
        name = "camera"
        user = "camera"
        unit = "camera.service"
        max_buffers = 1
        "#,
    );
    let camera = with_unit(who(990, 990), "camera.service");
    assert_eq!(policy.resolve(&camera).rule, "camera");
    assert_eq!(policy.resolve(&who(990, 990)).rule, "default");
    assert_eq!(
        policy
            .resolve(&with_unit(who(1000, 1000), "camera.service"))
            .rule,
        "default"
    );
    assert_eq!(
        policy
            .resolve(&with_unit(who(990, 990), "other.service"))
            .rule,
        "default"
    );
}

#[test]
fn each_criterion() {
    let policy = parse(
        r#"
        [[rule]]
        name = "by-uid"
        user = 1000
        [[rule]]
        name = "by-group"
        group = "video"
        [[rule]]
        name = "by-exe"
        exe = "/usr/bin/weston"
        [[rule]]
        name = "by-unit"
        unit = "codec.scope"
        "#,
    );
    assert_eq!(policy.resolve(&who(1000, 1000)).rule, "by-uid");
    assert_eq!(policy.resolve(&who(5, 44)).rule, "by-group");
    let mut supplementary = who(5, 5);
    supplementary.groups = vec![3, 44];
    assert_eq!(policy.resolve(&supplementary).rule, "by-group");
    assert_eq!(
        policy.resolve(&with_exe(who(5, 5), "/usr/bin/weston")).rule,
        "by-exe"
    );
    assert_eq!(
        policy
            .resolve(&with_exe(who(5, 5), "/usr/bin/weston2"))
            .rule,
        "default"
    );
    assert_eq!(
        policy.resolve(&with_unit(who(5, 5), "codec.scope")).rule,
        "by-unit"
    );
    assert_eq!(policy.resolve(&who(5, 5)).rule, "default");
}

#[test]
fn exe_paths_compare_by_component() {
    let policy = parse("[[rule]]\nname = \"w\"\nexe = \"/usr//bin/weston/\"\n");
    assert_eq!(
        policy.resolve(&with_exe(who(5, 5), "/usr/bin/weston")).rule,
        "w"
    );
}

#[test]
fn specificity_order() {
    // Rules listed from most to least specific, so file order (later wins
    // ties) can never be what makes the expected rule win.
    let policy = parse(
        r#"
        [[rule]]
        name = "exe+unit+user"
        exe = "/bin/x"
        unit = "x.service"
        user = 1000
        [[rule]]
        name = "exe+unit"
        exe = "/bin/x"
        unit = "x.service"
        [[rule]]
        name = "exe+user"
        exe = "/bin/x"
        user = 1000
        [[rule]]
        name = "exe+group"
        exe = "/bin/x"
        group = 44
        [[rule]]
        name = "user+group"
        user = 1000
        group = 44
        [[rule]]
        name = "exe"
        exe = "/bin/x"
        [[rule]]
        name = "user"
        user = 1000
        [[rule]]
        name = "group"
        group = 44
        "#,
    );
    let base = who(1000, 44);
    let full = with_unit(with_exe(base.clone(), "/bin/x"), "x.service");
    assert_eq!(policy.resolve(&full).rule, "exe+unit+user");
    let mut other_user = full.clone();
    other_user.uid = 1001;
    assert_eq!(policy.resolve(&other_user).rule, "exe+unit");
    assert_eq!(
        policy.resolve(&with_exe(base.clone(), "/bin/x")).rule,
        "exe+user"
    );
    assert_eq!(
        policy.resolve(&with_exe(who(1001, 44), "/bin/x")).rule,
        "exe+group"
    );
    assert_eq!(policy.resolve(&base).rule, "user+group");
    assert_eq!(
        policy.resolve(&with_exe(who(1001, 1), "/bin/x")).rule,
        "exe"
    );
    assert_eq!(policy.resolve(&who(1000, 1)).rule, "user");
    assert_eq!(policy.resolve(&who(1001, 44)).rule, "group");
}

#[test]
fn two_criteria_beat_one_heavy_one() {
    // Count first: narrowing any rule by one more criterion must win.
    let policy = parse(
        r#"
        [[rule]]
        name = "user+group"
        user = 1000
        group = 44
        [[rule]]
        name = "exe"
        exe = "/bin/x"
        "#,
    );
    assert_eq!(
        policy.resolve(&with_exe(who(1000, 44), "/bin/x")).rule,
        "user+group"
    );
}

#[test]
fn ties_go_to_the_later_rule() {
    let policy = parse(
        r#"
        [[rule]]
        name = "first"
        exe = "/bin/x"
        [[rule]]
        name = "by-unit"
        unit = "x.service"
        [[rule]]
        name = "second"
        exe = "/bin/x"
        "#,
    );
    assert_eq!(
        policy.resolve(&with_exe(who(1, 1), "/bin/x")).rule,
        "second"
    );
    // exe and unit weigh the same: file order decides between them too.
    let both = with_unit(with_exe(who(1, 1), "/bin/x"), "x.service");
    assert_eq!(policy.resolve(&both).rule, "second");
}

#[test]
fn disabled_rules_never_match() {
    let policy = parse(
        r#"
        [[rule]]
        name = "off"
        enabled = false
        user = 1000
        [[rule]]
        name = "off-and-empty"
        enabled = false
        "#,
    );
    assert_eq!(policy.resolve(&who(1000, 1000)).rule, "default");
    assert_eq!(
        policy.rule_names().collect::<Vec<_>>(),
        ["off", "off-and-empty"]
    );
}

#[test]
fn inheritance() {
    let policy = parse(
        r#"
        [default]
        max_total_bytes = "256M"
        heaps = ["system"]
        write_hold_limit = "2s"

        [[rule]]
        name = "camera"
        user = "camera"
        max_buffers = 10

        [[rule]]
        name = "compositor"
        group = "video"
        heaps = "all"
        write_hold_limit = "none"
        autofence = "disabled"
        "#,
    );
    let camera = policy.resolve(&who(990, 990));
    assert_eq!(camera.rule, "camera");
    let l = &camera.limits;
    assert_eq!(l.max_buffers, 10); // the rule's own
    assert_eq!(l.max_total_bytes, 256 * MIB); // from [default]
    assert_eq!(l.heaps.as_deref(), Some(&["system".to_string()][..]));
    assert_eq!(l.write_hold_limit, Some(Duration::from_secs(2)));
    assert_eq!(l.max_buffer_size, 256 * MIB); // built-in
    assert_eq!(l.max_queued_requests, 64); // built-in

    let compositor = policy.resolve(&who(5, 44));
    assert_eq!(compositor.rule, "compositor");
    assert_eq!(compositor.limits.heaps, None);
    assert_eq!(compositor.limits.write_hold_limit, None);
    assert_eq!(compositor.limits.autofence, AutofenceMode::Disabled);
    assert_eq!(compositor.limits.max_total_bytes, 256 * MIB);
}

#[test]
fn later_files_override() {
    let vendor = r#"
        admins = { users = ["alice"] }
        [default]
        max_buffers = 10
        max_total_bytes = "1G"
        [[rule]]
        name = "camera"
        user = "camera"
        max_buffers = 100
        [[rule]]
        name = "video"
        group = "video"
        max_buffers = 50
        [[rule]]
        name = "other-video"
        group = "video"
        max_buffers = 51
    "#;
    let admin = r#"
        admins = { groups = ["wheel"] }
        [default]
        max_buffers = 20
        [[rule]]
        name = "camera"
        user = "camera"
        max_total_bytes = "2G"
        [[rule]]
        name = "video"
        group = "video"
        max_buffers = 60
    "#;
    let policy = parse_many(&[("/vendor.toml", vendor), ("/admin.toml", admin)]).unwrap();
    // [default] merges key by key.
    assert_eq!(policy.default_limits().max_buffers, 20);
    assert_eq!(policy.default_limits().max_total_bytes, 1 << 30);
    // A redefined rule is replaced whole, not merged with the old one.
    let camera = policy.resolve(&who(990, 990));
    assert_eq!(camera.limits.max_buffers, 20);
    assert_eq!(camera.limits.max_total_bytes, 2 << 30);
    // ...and moves to the later position, winning the tie it used to lose.
    assert_eq!(policy.resolve(&who(5, 44)).rule, "video");
    assert_eq!(
        policy.rule_names().collect::<Vec<_>>(),
        ["other-video", "camera", "video"]
    );
    // `admins` is replaced whole.
    assert!(!policy.is_admin(1000, &[]));
    assert!(policy.is_admin(1000, &[10]));
    assert_eq!(
        policy.sources(),
        [PathBuf::from("/vendor.toml"), PathBuf::from("/admin.toml")]
    );
}

/// `max_uid_buffers` is inherited from `[default]`, set by a rule, merged
/// key by key from later files' `[default]`, and quoted by its key.
#[test]
fn max_uid_buffers_inherits_and_merges() {
    let vendor = r#"
        [default]
        max_uid_buffers = 1000
        [[rule]]
        name = "camera"
        user = "camera"
        max_uid_buffers = 64
        [[rule]]
        name = "video"
        group = "video"
        max_buffers = 5
    "#;
    let admin = r#"
        [default]
        max_buffers = 20
    "#;
    let policy = parse_many(&[("/vendor.toml", vendor), ("/admin.toml", admin)]).unwrap();
    assert_eq!(policy.default_limits().max_uid_buffers, 1000);
    let camera = policy.resolve(&who(990, 990));
    assert_eq!(camera.limits.max_uid_buffers, 64);
    assert_eq!(
        camera.describe(LimitKind::MaxUidBuffers),
        "rule 'camera': max_uid_buffers 64"
    );
    let video = policy.resolve(&who(5, 44));
    assert_eq!(video.rule, "video");
    assert_eq!(video.limits.max_uid_buffers, 1000); // from [default]
    assert_eq!(video.limits.max_buffers, 5);

    let later = r#"
        [default]
        max_uid_buffers = 2000
    "#;
    let policy = parse_many(&[("/vendor.toml", vendor), ("/later.toml", later)]).unwrap();
    assert_eq!(policy.default_limits().max_uid_buffers, 2000);
    assert_eq!(policy.resolve(&who(5, 44)).limits.max_uid_buffers, 2000);
    assert_eq!(policy.resolve(&who(990, 990)).limits.max_uid_buffers, 64);
    // Not set anywhere: the built-in 4096.
    assert_eq!(
        parse("[default]\nmax_buffers = 3\n")
            .default_limits()
            .max_uid_buffers,
        4096
    );
}

#[test]
fn import_from_allows() {
    let alice = Identity {
        uid: 1000,
        gid: 1000,
        groups: vec![44],
        ..Identity::default()
    };
    let alice2 = who(1000, 1000);
    let bob = who(1001, 1001);
    let camera = Identity {
        uid: 990,
        gid: 990,
        groups: vec![44],
        ..Identity::default()
    };
    assert!(ImportFrom::SameUser.allows(&alice, &alice2));
    assert!(!ImportFrom::SameUser.allows(&alice, &bob));
    assert!(ImportFrom::Anyone.allows(&alice, &bob));
    let only_camera = ImportFrom::Only {
        users: vec![990],
        groups: vec![],
    };
    assert!(only_camera.allows(&alice, &camera));
    assert!(only_camera.allows(&alice, &alice2));
    assert!(!only_camera.allows(&alice, &bob));
    assert!(!only_camera.allows(&camera, &alice));
    // Groups are the owner's, primary or supplementary, not the importer's.
    let only_video = ImportFrom::Only {
        users: vec![],
        groups: vec![44],
    };
    assert!(only_video.allows(&bob, &camera));
    assert!(only_video.allows(&bob, &who(5, 44)));
    assert!(!only_video.allows(&alice, &bob));
}

#[test]
fn autofence_grant() {
    use AutofenceMode::*;
    assert_eq!(Required.grant(None), Some(true));
    assert_eq!(Required.grant(Some(true)), Some(true));
    assert_eq!(Required.grant(Some(false)), None);
    assert_eq!(Optional.grant(None), Some(true));
    assert_eq!(Optional.grant(Some(false)), Some(false));
    assert_eq!(Disabled.grant(None), Some(false));
    assert_eq!(Disabled.grant(Some(true)), Some(false));
}

#[test]
fn refusal_text() {
    let policy = parse("[[rule]]\nname = \"camera\"\nuser = 990\nmax_total_bytes = \"512 MiB\"\n");
    let resolved = policy.resolve(&who(990, 990));
    assert_eq!(
        resolved.describe(LimitKind::MaxTotalBytes),
        "rule 'camera': max_total_bytes 512 MiB"
    );
    assert_eq!(
        resolved.describe(LimitKind::Heaps),
        "rule 'camera': heaps all"
    );
    let default = policy.resolve(&who(1, 1));
    assert_eq!(
        default.describe(LimitKind::WriteHoldLimit),
        "rule 'default': write_hold_limit none"
    );
}

#[test]
fn malformed_toml() {
    assert_error("[default]\nmax_buffers = 4\nmay_export = tru\n", 3, "");
    assert_error("[default\n", 1, "");
    assert_error(
        "\n\n[default]\nmax_buffers = 1\nmax_buffers = 2\n",
        5,
        "duplicate key",
    );
    let message = error("[default]\nmax_buffers = 4\nmay_export = tru\n");
    assert!(message.contains(":3:14:"), "{message}");
}

#[test]
fn unknown_keys() {
    assert_error(
        "[default]\nmax_buffers = 4\nmax_bufers = 5\n",
        3,
        "unknown field `max_bufers`",
    );
    assert_error(
        "\n[[rule]]\nname = \"x\"\nuser = 1\nusr = 2\n",
        5,
        "unknown field `usr`",
    );
    assert_error("\nwhatever = 1\n", 2, "unknown field `whatever`");
    assert_error(
        "[admins]\nusers = [1]\nroles = []\n",
        3,
        "unknown field `roles`",
    );
    assert_error(
        "[default]\n\nimport_from = { users = [1], grups = [2] }\n",
        3,
        "unknown field `grups`",
    );
}

#[test]
fn wrong_types() {
    assert_error("[default]\n\nmay_export = \"yes\"\n", 3, "invalid type");
    assert_error("[default]\nmax_buffers = \"many\"\n", 2, "invalid type");
    assert_error("[default]\nmax_buffers = -1\n", 2, "");
    assert_error("[default]\nheaps = \"system\"\n", 2, "expected a list");
    assert_error(
        "[default]\nheaps = [\"system\", \"system\"]\n",
        2,
        "listed twice",
    );
    assert_error("[default]\nheaps = [\"../x\"]\n", 2, "invalid heap name");
    assert_error(
        "[default]\nautofence = \"sometimes\"\n",
        2,
        "unknown variant `sometimes`",
    );
    assert_error(
        "[default]\nimport_from = \"everyone\"\n",
        2,
        "invalid import_from",
    );
    assert_error(
        "[default]\n\n\nmax_queued_requests = 0\n",
        4,
        "must be from 1",
    );
    assert_error(
        "[default]\nmax_unread_replies = 5000000000\n",
        2,
        "must be from 1",
    );
    assert_error("[default]\nmax_unread_replies = \"9\"\n", 2, "invalid type");
    assert_error("[default]\nmax_uid_buffers = 0\n", 2, "must be from 1");
    assert_error(
        "[[rule]]\nname = \"x\"\nuser = 3\nmax_uid_buffers = -1\n",
        4,
        "must be from 1",
    );
    assert_error(
        "[default]\nmax_uid_buffers = 4294967296\n",
        2,
        "must be from 1",
    );
    assert_error("[[rule]]\nname = \"x\"\nuser = -3\n", 3, "not negative");
    assert_error(
        "[[rule]]\nname = \"x\"\nuser = 4294967295\n",
        3,
        "out of range",
    );
    assert_error("default = 3\n", 1, "invalid type");
}

#[test]
fn bad_sizes_and_durations() {
    assert_error(
        "[default]\nmax_buffer_size = \"12 MB\"\n",
        2,
        "invalid size \"12 MB\"",
    );
    assert_error("[default]\n\nmax_total_bytes = \"1.5G\"\n", 3, "fractions");
    assert_error("[default]\nmax_total_bytes = -5\n", 2, "not negative");
    assert_error("[default]\nmax_total_bytes = \"lots\"\n", 2, "invalid size");
    assert_error("[default]\nwrite_hold_limit = \"5m\"\n", 2, "ambiguous");
    assert_error("[default]\nwrite_hold_limit = \"0s\"\n", 2, "\"none\"");
    assert_error(
        "[default]\nwrite_hold_limit = \"2 fortnights\"\n",
        2,
        "unknown unit",
    );
    assert_error(
        "[default]\nwrite_hold_limit = 500\n",
        2,
        "a unit is required",
    );
}

#[test]
fn rule_validation() {
    assert_error("[[rule]]\nuser = 1\n", 1, "missing field `name`");
    assert_error(
        "[[rule]]\nname = \"a\"\nuser = 1\n\n[[rule]]\nuser = 1\n",
        5,
        "missing field `name`",
    );
    assert_error("[[rule]]\nname = \"default\"\nuser = 1\n", 2, "reserved");
    assert_error(
        "[[rule]]\nname = \"two words\"\nuser = 1\n",
        2,
        "invalid rule name",
    );
    assert_error(
        "\n[[rule]]\nname = \"everyone\"\nmax_buffers = 1\n",
        3,
        "no criteria",
    );
    assert_error(
        "[[rule]]\nname = \"a\"\nuser = 1\n[[rule]]\nname = \"a\"\nuser = 2\n",
        5,
        "already defined on line 2",
    );
    assert_error("[[rule]]\nname = \"a\"\nexe = \"weston\"\n", 3, "absolute");
    assert_error(
        "[[rule]]\nname = \"a\"\nexe = \"/usr/bin/../bin/weston\"\n",
        3,
        "canonical",
    );
    assert_error(
        "[[rule]]\nname = \"a\"\nunit = \"camera\"\n",
        3,
        ".service or .scope",
    );
    assert_error(
        "[[rule]]\nname = \"a\"\nunit = \"user.slice\"\n",
        3,
        ".service or .scope",
    );
}

#[test]
fn unknown_names() {
    assert_error(
        "[[rule]]\nname = \"a\"\n\nuser = \"nobody-here\"\n",
        4,
        "unknown user 'nobody-here'",
    );
    assert_error(
        "[[rule]]\nname = \"a\"\ngroup = \"nogroup-here\"\n",
        3,
        "unknown group 'nogroup-here'",
    );
    assert_error(
        "[default]\nimport_from = { users = [\n  \"alice\",\n  \"mallory\",\n] }\n",
        4,
        "unknown user 'mallory'",
    );
    assert_error(
        "admins = { groups = [\"wheel\", \"staff\"] }\n",
        1,
        "unknown group 'staff'",
    );
    // A quoted number is a name; the error says how to write the id.
    assert_error(
        "[[rule]]\nname = \"a\"\nuser = \"1000\"\n",
        3,
        "unknown user '1000': quoted, it is a name; for the numeric id, write it without quotes (user = 1000)",
    );
    assert_error(
        "[[rule]]\nname = \"a\"\ngroup = \"44\"\n",
        3,
        "write it without quotes (group = 44)",
    );
    // Only the located form is shown: path:line, no column.
    let message = error("\n[[rule]]\nname = \"a\"\nuser = \"mallory\"\n");
    assert_eq!(message, format!("{ORIGIN}:4: unknown user 'mallory'"));
}

#[test]
fn real_name_lookup() {
    let policy = Policy::parse_str(
        "admins = { users = [\"root\"], groups = [\"root\"] }\n[[rule]]\nname = \"r\"\nuser = \"root\"\n",
        Path::new("inline.toml"),
    )
    .unwrap();
    assert_eq!(policy.resolve(&who(0, 0)).rule, "r");
    let err = Policy::parse_str(
        "[[rule]]\nname = \"r\"\nuser = \"dmabroker-no-such-user-x\"\n",
        Path::new("inline.toml"),
    )
    .unwrap_err();
    assert!(
        err.to_string().starts_with("inline.toml:3: unknown user"),
        "{err}"
    );
    assert_eq!(err.line(), Some(3));
    assert_eq!(err.path(), Path::new("inline.toml"));
}

#[test]
fn line_numbers_survive_multibyte_text() {
    let message = error("# ünïcödé comment ✓\n[default]\nmay_export = \"ja\" # ✓\n");
    assert!(message.starts_with(&format!("{ORIGIN}:3:14:")), "{message}");
}

#[test]
fn example_policy_is_valid() {
    let text = include_str!("../../../systemd/policy.toml");
    let policy = parse_many(&[("systemd/policy.toml", text)]).unwrap();
    let camera = with_unit(who(990, 990), "camera.service");
    let resolved = policy.resolve(&camera);
    assert_eq!(resolved.rule, "camera");
    assert_eq!(
        resolved.limits.heaps.as_deref(),
        Some(&["system".to_string()][..])
    );
    assert_eq!(resolved.limits.max_queued_requests, 64);
    let weston = with_exe(who(1000, 1000), "/usr/bin/weston");
    assert_eq!(policy.resolve(&weston).rule, "default");
    let mut weston_video = weston.clone();
    weston_video.groups = vec![44];
    let compositor = policy.resolve(&weston_video);
    assert_eq!(compositor.rule, "compositor");
    assert_eq!(compositor.limits.autofence, AutofenceMode::Disabled);
    assert_eq!(compositor.limits.write_hold_limit, None);
    let codec = policy.resolve(&with_exe(who(5, 44), "/usr/libexec/codecd"));
    assert_eq!(codec.rule, "codec");
    assert!(codec.limits.import_from.allows(&who(5, 44), &camera));
    assert!(!codec
        .limits
        .import_from
        .allows(&who(5, 44), &who(1000, 1000)));
    assert!(policy.is_admin(1000, &[10]));
}

#[test]
fn worked_example_from_docs() {
    // Keep in step with the worked example in docs/policy.md.
    let policy = parse(
        r#"
        [default]
        max_total_bytes = "256 MiB"

        [[rule]]
        name = "video-group"
        group = "video"
        max_total_bytes = "512 MiB"

        [[rule]]
        name = "alice"
        user = "alice"
        max_buffers = 100

        [[rule]]
        name = "weston"
        exe = "/usr/bin/weston"
        autofence = "disabled"

        [[rule]]
        name = "alice-weston"
        user = "alice"
        exe = "/usr/bin/weston"
        max_total_bytes = "2 GiB"
        "#,
    );
    let alice = Identity {
        uid: 1000,
        gid: 1000,
        groups: vec![44],
        ..Identity::default()
    };
    assert_eq!(policy.resolve(&alice).rule, "alice");
    assert_eq!(policy.resolve(&alice).limits.max_total_bytes, 256 * MIB);
    let alice_weston = with_exe(alice.clone(), "/usr/bin/weston");
    let r = policy.resolve(&alice_weston);
    assert_eq!(r.rule, "alice-weston");
    assert_eq!(r.limits.autofence, AutofenceMode::Optional);
    assert_eq!(r.limits.max_total_bytes, 2048 * MIB);
    let bob_weston = Identity {
        uid: 1001,
        gid: 1001,
        groups: vec![44],
        exe: Some("/usr/bin/weston".into()),
        unit: None,
    };
    assert_eq!(policy.resolve(&bob_weston).rule, "weston");
    assert_eq!(
        policy.resolve(&bob_weston).limits.max_total_bytes,
        256 * MIB
    );
    assert_eq!(policy.resolve(&who(1001, 44)).rule, "video-group");
    assert_eq!(policy.resolve(&who(1002, 1002)).rule, "default");
}

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "dmabroker-policy-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    fn write(&self, rel: &str, text: &str) -> PathBuf {
        let path = self.0.join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[test]
fn system_locations_in_order() {
    let root = TempDir::new("system");
    let vendor = root.write(
        "usr/share/dmabroker/policy.toml",
        "[default]\nmax_buffers = 1\nmax_unread_replies = 7\n[[rule]]\nname = \"r\"\nuser = 5\nmax_buffers = 100\n",
    );
    let admin = root.write("etc/dmabroker/policy.toml", "[default]\nmax_buffers = 2\n");
    let b = root.write(
        "etc/dmabroker/policy.d/20-b.toml",
        "[default]\nmax_buffers = 4\n",
    );
    let a = root.write(
        "etc/dmabroker/policy.d/10-a.toml",
        "[default]\nmax_buffers = 3\n[[rule]]\nname = \"r\"\nuser = 5\nmax_buffers = 200\n",
    );
    root.write("etc/dmabroker/policy.d/README", "not toml at all [");
    root.write("etc/dmabroker/policy.d/.#20-b.toml", "editor lock [");
    root.write("etc/dmabroker/policy.d/30-c.toml~", "backup [");

    let policy = Policy::load_system_from(&root.0).unwrap();
    assert_eq!(policy.sources(), [vendor, admin, a, b]);
    assert_eq!(policy.default_limits().max_buffers, 4);
    assert_eq!(policy.default_limits().max_unread_replies, 7);
    let r = policy.resolve(&who(5, 5));
    assert_eq!((r.rule.as_str(), r.limits.max_buffers), ("r", 200));
}

#[test]
fn system_locations_missing_is_builtin() {
    let root = TempDir::new("empty");
    let policy = Policy::load_system_from(&root.0).unwrap();
    assert!(policy.sources().is_empty());
    assert_eq!(**policy.default_limits(), Limits::default());

    // A dangling symlink is not mistaken for an absent file.
    let admin = root.0.join("etc/dmabroker/policy.toml");
    fs::create_dir_all(admin.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(root.0.join("nowhere.toml"), &admin).unwrap();
    let err = Policy::load_system_from(&root.0).unwrap_err();
    assert!(matches!(err, PolicyError::Io { .. }), "{err}");
    assert_eq!(err.path(), admin);
    fs::remove_file(&admin).unwrap();

    // Only a drop-in, no main files.
    let dropin = root.write(
        "etc/dmabroker/policy.d/50-x.toml",
        "[default]\nmax_buffers = 9\n",
    );
    let policy = Policy::load_system_from(&root.0).unwrap();
    assert_eq!(policy.sources(), [dropin]);
    assert_eq!(policy.default_limits().max_buffers, 9);
}

#[test]
fn broken_dropin_fails_whole_load() {
    let root = TempDir::new("broken");
    root.write("etc/dmabroker/policy.toml", "[default]\nmax_buffers = 2\n");
    let bad = root.write(
        "etc/dmabroker/policy.d/10-bad.toml",
        "[default]\n\nmax_buffers = \"x\"\n",
    );
    let err = Policy::load_system_from(&root.0).unwrap_err();
    let message = err.to_string();
    assert!(
        message.starts_with(&format!("{}:3:", bad.display())),
        "{message}"
    );
    assert!(matches!(err, PolicyError::Syntax { line: 3, .. }));
}

#[test]
fn load_files_explicit() {
    let dir = TempDir::new("files");
    let one = dir.write("one.toml", "[default]\nmax_buffers = 1\n");
    let two = dir.write("two.toml", "[default]\nmax_buffers = 2\n");
    let policy = Policy::load_files(&[two.clone(), one.clone()]).unwrap();
    assert_eq!(policy.default_limits().max_buffers, 1);
    assert_eq!(policy.sources(), [two.clone(), one.clone()]);

    let missing = dir.0.join("missing.toml");
    let err = Policy::load_files(&[one, missing.clone()]).unwrap_err();
    assert!(matches!(err, PolicyError::Io { .. }));
    assert!(
        err.to_string().starts_with(&missing.display().to_string()),
        "{err}"
    );

    let err = Policy::load_files(std::slice::from_ref(&dir.0)).unwrap_err();
    assert!(matches!(err, PolicyError::Insecure { .. }), "{err}");

    assert!(Policy::load_files(&[]).unwrap().sources().is_empty());
}

/// A file that is not UTF-8 is refused with where it stops being so, like
/// every other content error: the reader's own error named no line.
#[test]
fn a_file_that_is_not_utf8_says_where() {
    let dir = TempDir::new("utf8");
    let path = dir.write("bad.toml", "[default]\n");
    let mut bytes = fs::read(&path).unwrap();
    bytes.extend_from_slice(b"max_buffers = 1 # caf\xe9\n");
    fs::write(&path, &bytes).unwrap();
    let err = Policy::load_files(std::slice::from_ref(&path)).unwrap_err();
    assert!(
        err.to_string()
            .starts_with(&format!("{}:2:22: not valid UTF-8", path.display())),
        "{err}"
    );
}

/// policy.md: a policy file over 1 MiB is refused before it is read; one
/// of exactly 1 MiB (a comment padding valid TOML) still loads.
#[test]
fn refuses_files_over_one_mib() {
    let dir = TempDir::new("size");
    let body = "[default]\nmax_buffers = 1\n#";
    let padding = usize::try_from(MIB).unwrap() - body.len() - 1;
    let just_fits = format!("{body}{}\n", "x".repeat(padding));
    assert_eq!(just_fits.len() as u64, MIB);
    let path = dir.write("policy.toml", &just_fits);
    Policy::load_files(&[path]).expect("1 MiB loads");

    let too_large = format!("{body}{}\n", "x".repeat(padding + 1));
    let path = dir.write("policy.toml", &too_large);
    let err = Policy::load_files(&[path]).unwrap_err();
    assert!(
        matches!(err, PolicyError::Insecure { .. })
            && err.to_string().contains("larger than 1 MiB"),
        "{err}"
    );
}

#[test]
fn refuses_files_others_can_write() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = TempDir::new("perms");
    let path = dir.write("policy.toml", "[default]\nmax_buffers = 1\n");
    fs::set_permissions(&path, fs::Permissions::from_mode(0o666)).unwrap();
    let err = Policy::load_files(&[path]).unwrap_err();
    assert!(err.to_string().contains("writable by everyone"), "{err}");

    let root = TempDir::new("perms-dir");
    root.write("etc/dmabroker/policy.d/10-a.toml", "");
    fs::set_permissions(
        root.0.join("etc/dmabroker/policy.d"),
        fs::Permissions::from_mode(0o777),
    )
    .unwrap();
    let err = Policy::load_system_from(&root.0).unwrap_err();
    assert!(matches!(err, PolicyError::Insecure { .. }), "{err}");
}

#[test]
fn rendered_policy_round_trips() {
    let text = include_str!("../../../systemd/policy.toml");
    let policy = parse_many(&[("systemd/policy.toml", text)]).unwrap();
    let rendered = policy.to_toml();
    let again = parse(&rendered);
    assert_equivalent(&policy, &again);
    assert!(
        rendered.contains("max_total_bytes = \"1 GiB\""),
        "{rendered}"
    );
    assert!(rendered.contains("# systemd/policy.toml:"), "{rendered}");
    assert!(Policy::builtin().to_toml().contains("(built-in defaults)"));
}

fn assert_equivalent(a: &Policy, b: &Policy) {
    assert_eq!(a.default, b.default);
    assert_eq!(a.admins, b.admins);
    assert_eq!(a.rules.len(), b.rules.len());
    for (x, y) in a.rules.iter().zip(&b.rules) {
        assert_eq!(
            (&x.name, x.enabled, &x.matcher, &x.limits),
            (&y.name, y.enabled, &y.matcher, &y.limits)
        );
    }
}

fn arb_ids() -> impl Strategy<Value = Vec<u32>> {
    prop::collection::btree_set(0..u32::MAX, 0..4).prop_map(|s| s.into_iter().collect())
}

fn arb_limits() -> impl Strategy<Value = Limits> {
    let heaps = prop::option::of(
        prop::sample::subsequence(
            vec!["system", "udmabuf", "memfd", "linux,cma", "reserved"],
            0..=5,
        )
        .prop_shuffle()
        .prop_map(|v| v.into_iter().map(String::from).collect::<Vec<_>>()),
    );
    let size = prop_oneof![
        any::<u64>(),
        (0u64..1 << 20, 0u32..4).prop_map(|(n, s)| n << (10 * s))
    ];
    let import_from = prop_oneof![
        Just(ImportFrom::SameUser),
        Just(ImportFrom::Anyone),
        (arb_ids(), arb_ids()).prop_map(|(users, groups)| ImportFrom::Only { users, groups }),
    ];
    let autofence = prop_oneof![
        Just(AutofenceMode::Required),
        Just(AutofenceMode::Optional),
        Just(AutofenceMode::Disabled)
    ];
    let hold = prop::option::of((1u64..100_000_000_000).prop_map(Duration::from_millis));
    (
        heaps,
        size.clone(),
        size,
        0..=i64::MAX as u64,
        any::<bool>(),
        import_from,
        autofence,
        hold,
        1..=u32::MAX,
        1..=u32::MAX,
        1..=u32::MAX,
        // Paired: proptest's tuples stop at twelve.
        (1..=u32::MAX, 1..=u32::MAX),
    )
        .prop_map(
            |(
                heaps,
                max_buffer_size,
                max_total_bytes,
                max_buffers,
                may_export,
                import_from,
                autofence,
                write_hold_limit,
                max_queued_requests,
                max_held_accesses,
                max_unread_replies,
                (max_uid_connections, max_uid_buffers),
            )| Limits {
                heaps,
                max_buffer_size,
                max_total_bytes,
                max_buffers,
                may_export,
                import_from,
                autofence,
                write_hold_limit,
                max_queued_requests,
                max_held_accesses,
                max_unread_replies,
                max_uid_connections,
                max_uid_buffers,
            },
        )
}

fn arb_matcher() -> impl Strategy<Value = Matcher> {
    (
        prop::option::of(0..u32::MAX),
        prop::option::of(0..u32::MAX),
        prop::option::of("/[a-z]{1,6}/[a-zA-Z0-9 _\"'\\\\é#=-]{1,10}".prop_map(PathBuf::from)),
        prop::option::of("[a-z0-9@_-]{1,12}\\.(service|scope)"),
    )
        .prop_map(|(uid, gid, exe, unit)| Matcher {
            uid,
            gid,
            exe,
            unit,
        })
}

fn arb_policy() -> impl Strategy<Value = Policy> {
    let rule = (
        "[A-Za-z0-9._@:+-]{1,12}",
        any::<bool>(),
        arb_matcher(),
        arb_limits(),
    );
    (
        arb_limits(),
        prop::collection::vec(rule, 0..6),
        arb_ids(),
        arb_ids(),
    )
        .prop_map(|(default, rules, users, groups)| Policy {
            default: Arc::new(default),
            rules: rules
                .into_iter()
                .enumerate()
                .map(|(i, (name, enabled, mut matcher, limits))| {
                    if enabled && matcher.is_empty() {
                        matcher.uid = Some(i as u32);
                    }
                    Rule {
                        // Unique, and never the reserved "default".
                        name: format!("{name}-{i}"),
                        enabled,
                        matcher,
                        limits: Arc::new(limits),
                        origin: PathBuf::from("generated.toml"),
                        line: 1,
                    }
                })
                .collect(),
            admins: Admins { users, groups },
            sources: vec![PathBuf::from("generated.toml")],
        })
}

/// Fragments that look like policy files, so that the fuzzing gets past the
/// TOML grammar and into the value checks.
fn tomlish() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("[default]".to_string()),
        Just("[[rule]]".to_string()),
        Just("[admins]".to_string()),
        Just("name = \"x\"".to_string()),
        "(user|group|exe|unit|heaps|max_buffer_size|max_total_bytes|max_buffers|may_export|import_from|autofence|write_hold_limit|max_queued_requests|max_held_accesses|max_unread_replies|max_uid_connections|max_uid_buffers|users|groups|enabled|admins) = ",
        "\"[a-zA-Z0-9 ./@,:é-]{0,12}\"",
        "-?[0-9]{1,21}",
        Just("true".to_string()),
        Just("[".to_string()),
        Just("]".to_string()),
        Just("{ users = [".to_string()),
        Just("}".to_string()),
        Just(",".to_string()),
        Just("\n".to_string()),
        any::<String>(),
    ];
    prop::collection::vec(piece, 0..40).prop_map(|v| v.concat())
}

proptest! {
    #[test]
    fn parse_never_panics(text in any::<String>()) {
        let _ = parse_fragment(&text, Path::new("fuzz.toml"), &FakeNames);
    }

    #[test]
    fn parse_never_panics_on_tomlish(text in tomlish()) {
        if let Err(e) = parse_many(&[("fuzz.toml", &text)]) {
            // Whatever went wrong, the message is located.
            prop_assert!(e.to_string().starts_with("fuzz.toml:"), "{}", e);
        }
    }

    #[test]
    fn rendered_valid_policy_round_trips(policy in arb_policy()) {
        let rendered = policy.to_toml();
        let again = match parse_many(&[("rendered.toml", &rendered)]) {
            Ok(p) => p,
            Err(e) => return Err(TestCaseError::fail(format!("{e}\n{rendered}"))),
        };
        assert_equivalent(&policy, &again);
    }

    #[test]
    fn sizes_round_trip(n in any::<u64>()) {
        let lit = units::size_literal(n);
        let text = format!("[default]\nmax_total_bytes = {lit}\n");
        prop_assert_eq!(parse(&text).default.max_total_bytes, n);
    }
}

/// Sets `path`'s access ACL; `false` (after saying why) where the file
/// system keeps none.
fn set_access_acl(path: &Path, entries: &[(u16, u16, u32)]) -> bool {
    match rustix::fs::setxattr(
        path,
        "system.posix_acl_access",
        &crate::acl::encode(entries),
        rustix::fs::XattrFlags::empty(),
    ) {
        Ok(()) => true,
        Err(rustix::io::Errno::OPNOTSUPP) => {
            note_skip(&format!("{} keeps no POSIX ACLs", path.display()));
            false
        }
        Err(err) => panic!("setting an ACL on {}: {err}", path.display()),
    }
}

/// An ACL naming `user` with `perm` (and the mask `mask`), besides the
/// owner's rw, the group's r and others' r of a 0644 file.
fn acl_naming_user(user: u32, perm: u16, mask: u16) -> Vec<(u16, u16, u32)> {
    use crate::acl::tag;
    vec![
        (tag::USER_OBJ, 6, tag::UNDEFINED_ID),
        (tag::USER, perm, user),
        (tag::GROUP_OBJ, 4, tag::UNDEFINED_ID),
        (tag::MASK, mask, tag::UNDEFINED_ID),
        (tag::OTHER, 4, tag::UNDEFINED_ID),
    ]
}

/// A root-owned 0644 file whose ACL lets another user write it showed as
/// 0664 with group root, which the mode check let through: that user could
/// rewrite the policy and have it obeyed at the next reload.
#[test]
fn refuses_files_and_dropin_folders_an_acl_lets_others_write() {
    const NOBODY: u32 = 65534;
    let dir = TempDir::new("acl");
    let path = dir.write("policy.toml", "[default]\nmax_buffers = 1\n");
    if !set_access_acl(&path, &acl_naming_user(NOBODY, 6, 6)) {
        return;
    }
    let err = Policy::load_files(std::slice::from_ref(&path)).unwrap_err();
    assert!(matches!(err, PolicyError::Insecure { .. }), "{err}");
    assert!(
        err.to_string().contains("writable by uid 65534 (its ACL)"),
        "{err}"
    );
    // Masked out, or granting only reading, it lets nobody else write.
    assert!(set_access_acl(&path, &acl_naming_user(NOBODY, 6, 4)));
    Policy::load_files(std::slice::from_ref(&path)).expect("write masked out");
    assert!(set_access_acl(&path, &acl_naming_user(NOBODY, 4, 6)));
    Policy::load_files(std::slice::from_ref(&path)).expect("read only");
    // Root may write, as the mode bits allow.
    assert!(set_access_acl(&path, &acl_naming_user(0, 6, 6)));
    Policy::load_files(std::slice::from_ref(&path)).expect("root may write");

    // A drop-in folder another user may write: one who may take a drop-in
    // (and the restrictions in it) out.
    let root = TempDir::new("acl-dir");
    root.write("etc/dmabroker/policy.d/10-a.toml", "");
    let dropins = root.0.join("etc/dmabroker/policy.d");
    assert!(set_access_acl(&dropins, &acl_naming_user(NOBODY, 7, 7)));
    let err = Policy::load_system_from(&root.0).unwrap_err();
    assert!(
        matches!(&err, PolicyError::Insecure { path, .. } if *path == dropins),
        "{err}"
    );
}

#[test]
fn acls_of_an_unknown_form_are_refused_not_read_as_granting_nothing() {
    use crate::acl::{parse, tag, AclWriter};
    let named = crate::acl::encode(&acl_naming_user(1000, 6, 6));
    let acl = parse(&named).unwrap();
    assert_eq!(acl.named_writers, vec![AclWriter::User(1000)]);
    assert!(!acl.owning_group_writes, "group::r--");
    let mut other_version = named.clone();
    other_version[0] = 3;
    assert!(parse(&other_version).is_err());
    assert!(parse(&named[..named.len() - 1]).is_err());
    assert!(parse(&named[..3]).is_err());
    let unknown_tag = crate::acl::encode(&[(0x40, 6, 0)]);
    assert!(parse(&unknown_tag).is_err());
    // Without a mask entry nothing is masked.
    let unmasked = crate::acl::encode(&[(tag::GROUP, 2, 44), (tag::GROUP_OBJ, 6, 0)]);
    let acl = parse(&unmasked).unwrap();
    assert_eq!(acl.named_writers, vec![AclWriter::Group(44)]);
    assert!(acl.owning_group_writes);
}

/// With an ACL the mode's group bits show its mask: a file of group 44
/// that only root may write by its ACL (`user:0:rw`, so the mask is rw)
/// showed as group-writable and was refused, naming a group that may not
/// write; one whose owning group may write is still refused.
#[test]
fn the_owning_group_may_write_only_by_its_own_acl_entry() {
    use crate::acl::tag;
    let dir = TempDir::new("acl-group");
    let path = dir.write("policy.toml", "[default]\nmax_buffers = 1\n");
    if std::os::unix::fs::chown(&path, None, Some(44)).is_err() {
        note_skip("cannot give a file to group 44 (not root)");
        return;
    }
    let entries = |group_perm: u16| {
        vec![
            (tag::USER_OBJ, 6, tag::UNDEFINED_ID),
            (tag::USER, 6, 0),
            (tag::GROUP_OBJ, group_perm, tag::UNDEFINED_ID),
            (tag::MASK, 6, tag::UNDEFINED_ID),
            (tag::OTHER, 4, tag::UNDEFINED_ID),
        ]
    };
    if !set_access_acl(&path, &entries(4)) {
        return;
    }
    Policy::load_files(std::slice::from_ref(&path)).expect("group 44 may only read");
    assert!(set_access_acl(&path, &entries(6)));
    let err = Policy::load_files(std::slice::from_ref(&path)).unwrap_err();
    assert!(err.to_string().contains("writable by group 44"), "{err}");
}

/// The folders holding the policy files: whoever may write one may take a
/// file out of it (or rename `policy.d`), and an absent file is no error.
#[test]
fn refuses_a_configuration_folder_an_acl_lets_others_write() {
    let root = TempDir::new("acl-etc");
    root.write("etc/dmabroker/policy.toml", "[default]\nmax_buffers = 1\n");
    let etc = root.0.join("etc/dmabroker");
    if !set_access_acl(&etc, &acl_naming_user(65534, 7, 7)) {
        return;
    }
    let err = Policy::load_system_from(&root.0).unwrap_err();
    assert!(
        matches!(&err, PolicyError::Insecure { path, .. } if *path == etc),
        "{err}"
    );
}

/// A FIFO (or a device node) in place of `policy.d` was opened for its
/// ACL, which for a FIFO waits for a writer: the daemon never started, and
/// a reload never ended.
#[test]
fn a_fifo_in_place_of_the_dropin_folder_is_refused_at_once() {
    let root = TempDir::new("fifo-dropins");
    fs::create_dir_all(root.0.join("etc/dmabroker")).unwrap();
    let dropins = root.0.join("etc/dmabroker/policy.d");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &dropins,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let at = root.0.clone();
    std::thread::spawn(move || {
        let _ = tx.send(
            Policy::load_system_from(&at)
                .map(|_| ())
                .map_err(|e| e.to_string()),
        );
    });
    let loaded = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("loading the policy did not return");
    let err = loaded.unwrap_err();
    assert!(err.contains("not a directory"), "{err}");
}

/// A standard policy location that is a symbolic link to nothing (into a
/// file system not mounted yet, say) was taken for "no file": a reload
/// then dropped the restrictions in it without a word.
#[test]
fn a_dangling_link_on_the_way_to_a_policy_location_is_an_error() {
    let root = TempDir::new("dangling");
    root.write("etc/dmabroker/policy.toml", "[default]\nmax_buffers = 1\n");
    Policy::load_system_from(&root.0).expect("no drop-in folder is fine");
    let dropins = root.0.join("etc/dmabroker/policy.d");
    std::os::unix::fs::symlink(root.0.join("not-deployed"), &dropins).unwrap();
    let err = Policy::load_system_from(&root.0).unwrap_err();
    assert!(
        matches!(&err, PolicyError::Io { path, .. } if *path == dropins),
        "{err}"
    );

    // The whole configuration folder.
    let root = TempDir::new("dangling-etc");
    fs::create_dir_all(root.0.join("etc")).unwrap();
    let etc = root.0.join("etc/dmabroker");
    std::os::unix::fs::symlink(root.0.join("not-deployed"), &etc).unwrap();
    let err = Policy::load_system_from(&root.0).unwrap_err();
    assert!(
        matches!(&err, PolicyError::Io { path, .. } if *path == etc),
        "{err}"
    );
}
