//! dmabroker's policy: which limits apply to which client.
//!
//! dma-heap memory is not charged to the allocating process's cgroup, so
//! without the broker's own accounting any client could pin all of RAM. This
//! crate is the part of that accounting the administrator controls: it reads
//! the policy files, and for each client (identified by the daemon from
//! kernel facts only, never from anything the client says) picks the one rule
//! that applies and hands back the complete set of limits.
//!
//! Loading is all-or-nothing: every entry point returns either a complete new
//! [`Policy`] or an error, never a half-applied one, so that a daemon
//! reloading on SIGHUP can keep running on its old policy when an edit is
//! broken. `docs/policy.md` describes the file format for administrators.
#![forbid(unsafe_code)]

mod acl;
mod error;
mod raw;
mod units;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs;
use std::io::Read as _;
use std::ops::Range;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use error::PolicyError;
pub use units::{format_duration, format_size, parse_duration, parse_size, ByteSize};

use raw::{IdRef, RawFile, RawImportFrom, RawLimits};
use toml::Spanned;

/// Shipped by the distribution package; overwritten on upgrades, so
/// administrators are expected to leave it alone and override it.
pub const VENDOR_POLICY: &str = "/usr/share/dmabroker/policy.toml";
/// The administrator's main file.
pub const ADMIN_POLICY: &str = "/etc/dmabroker/policy.toml";
/// Drop-ins, so that packages and configuration management can each own a
/// file instead of fighting over one.
pub const DROPIN_DIR: &str = "/etc/dmabroker/policy.d";

/// A policy file larger than this is certainly not hand-written; refusing it
/// bounds the work a reload can cause.
const MAX_FILE_SIZE: u64 = 1 << 20;

/// Who a client is, as far as the kernel can vouch for it.
///
/// Every field must come from the kernel (SO_PEERCRED, SO_PEERGROUPS,
/// `/proc/PID/exe` through a pidfd, `/proc/PID/cgroup`): anything the client
/// could state about itself would let it pick its own limits.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    /// Primary group.
    pub gid: u32,
    /// Supplementary groups (the primary one may or may not be repeated).
    pub groups: Vec<u32>,
    /// `None` when the executable could not be read (the process exited),
    /// or the process runs in a mount namespace other than the host's,
    /// where a user may have mounted anything over that path: rules naming
    /// an `exe` then never match, which errs towards the smaller default
    /// limits.
    pub exe: Option<PathBuf>,
    /// The systemd service or scope the process runs in, if any.
    pub unit: Option<String>,
}

impl Identity {
    /// Group rules and group lists treat primary and supplementary groups
    /// alike, as file permissions do.
    pub fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }
}

/// How a client's accesses to buffers are synchronised.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AutofenceMode {
    /// The broker always waits for conflicting accesses itself; a client that
    /// asks to manage fences on its own is refused.
    Required,
    /// The client chooses in its hello; autofence unless it asks otherwise.
    Optional,
    /// The client always runs without autofence, whatever it asks for: for
    /// compositors and the like that fence everything themselves and must
    /// never block in the broker.
    Disabled,
}

impl AutofenceMode {
    /// Combines the policy with the client's hello (`Hello::autofence`).
    ///
    /// Returns whether autofence is on for the connection, or `None` when
    /// the request cannot be granted and the hello must be refused: silently
    /// turning autofence on for a client that said it tracks fences itself
    /// would change what its `begin` means under its feet.
    pub fn grant(self, requested: Option<bool>) -> Option<bool> {
        match (self, requested) {
            (AutofenceMode::Required, Some(false)) => None,
            (AutofenceMode::Required, _) => Some(true),
            (AutofenceMode::Optional, requested) => Some(requested.unwrap_or(true)),
            (AutofenceMode::Disabled, _) => Some(false),
        }
    }

    fn key(self) -> &'static str {
        match self {
            AutofenceMode::Required => "required",
            AutofenceMode::Optional => "optional",
            AutofenceMode::Disabled => "disabled",
        }
    }
}

/// Whose exported buffers a client may import. This is the importer's side
/// of a two-sided consent: the owner must also have `may_export`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImportFrom {
    SameUser,
    Anyone,
    /// Buffers owned by these users or by members of these groups (primary
    /// or supplementary), and always the importer's own user.
    Only {
        users: Vec<u32>,
        groups: Vec<u32>,
    },
}

impl ImportFrom {
    /// Call this on the *importer's* limits. Sharing with oneself is always
    /// allowed because a process could pass the fd over its own socket
    /// anyway; refusing it would only break pipelines split into processes.
    pub fn allows(&self, importer: &Identity, owner: &Identity) -> bool {
        if importer.uid == owner.uid {
            return true;
        }
        match self {
            ImportFrom::SameUser => false,
            ImportFrom::Anyone => true,
            ImportFrom::Only { users, groups } => {
                users.contains(&owner.uid) || groups.iter().any(|g| owner.in_group(*g))
            }
        }
    }
}

/// Everything the daemon enforces for one client, always complete: the
/// inheritance from the default section and the built-in defaults has
/// already been applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Allowed heaps in fallback order; `None` means every heap, in the
    /// daemon's own order. An empty list forbids allocating at all (the
    /// client can still import).
    pub heaps: Option<Vec<String>>,
    pub max_buffer_size: u64,
    pub max_total_bytes: u64,
    pub max_buffers: u64,
    pub may_export: bool,
    pub import_from: ImportFrom,
    pub autofence: AutofenceMode,
    /// How long a write access may be held before the broker revokes it;
    /// `None` for no limit.
    pub write_hold_limit: Option<Duration>,
    pub max_queued_requests: u32,
    /// Accesses the broker granted the client that it has not ended.
    /// (Accesses taken in buffer words need no bound of their own: one
    /// per buffer and holder at most.)
    pub max_held_accesses: u32,
    pub max_unread_replies: u32,
    /// Connections the client's uid may have open at once, over all its
    /// processes: without it one user could take every connection the
    /// daemon serves (and with them its fd limit, see the daemon's
    /// `inflight`).
    pub max_uid_connections: u32,
    /// Buffers the client's uid may hold at once, over all its
    /// connections (allocations being carried out included): the
    /// daemon's fd store, which keeps every buffer across a restart, has
    /// room for a fixed number shared by all users, so without it one
    /// user with a few connections could take every slot.
    pub max_uid_buffers: u32,
}

impl Default for Limits {
    /// The built-in defaults: generous enough for a desktop session's
    /// camera and video pipeline with no policy file at all (user mode),
    /// small enough that one client cannot take the machine down.
    fn default() -> Self {
        Limits {
            heaps: None,
            max_buffer_size: 256 << 20,
            max_total_bytes: 1 << 30,
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
        }
    }
}

/// Names one limit, so that refusal messages can quote the key an
/// administrator has to change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LimitKind {
    Heaps,
    MaxBufferSize,
    MaxTotalBytes,
    MaxBuffers,
    MayExport,
    ImportFrom,
    Autofence,
    WriteHoldLimit,
    MaxQueuedRequests,
    MaxHeldAccesses,
    MaxUnreadReplies,
    MaxUidConnections,
    MaxUidBuffers,
}

impl LimitKind {
    /// The key as written in the policy file.
    pub fn key(self) -> &'static str {
        match self {
            LimitKind::Heaps => "heaps",
            LimitKind::MaxBufferSize => "max_buffer_size",
            LimitKind::MaxTotalBytes => "max_total_bytes",
            LimitKind::MaxBuffers => "max_buffers",
            LimitKind::MayExport => "may_export",
            LimitKind::ImportFrom => "import_from",
            LimitKind::Autofence => "autofence",
            LimitKind::WriteHoldLimit => "write_hold_limit",
            LimitKind::MaxQueuedRequests => "max_queued_requests",
            LimitKind::MaxHeldAccesses => "max_held_accesses",
            LimitKind::MaxUnreadReplies => "max_unread_replies",
            LimitKind::MaxUidConnections => "max_uid_connections",
            LimitKind::MaxUidBuffers => "max_uid_buffers",
        }
    }
}

impl Limits {
    /// One limit's value as a person reads it (`512 MiB`, `500ms`).
    pub fn show(&self, kind: LimitKind) -> String {
        match kind {
            LimitKind::Heaps => match &self.heaps {
                None => "all".to_string(),
                Some(heaps) => format!("[{}]", heaps.join(", ")),
            },
            LimitKind::MaxBufferSize => format_size(self.max_buffer_size),
            LimitKind::MaxTotalBytes => format_size(self.max_total_bytes),
            LimitKind::MaxBuffers => self.max_buffers.to_string(),
            LimitKind::MayExport => self.may_export.to_string(),
            LimitKind::ImportFrom => match &self.import_from {
                ImportFrom::SameUser => "same-user".to_string(),
                ImportFrom::Anyone => "anyone".to_string(),
                ImportFrom::Only { users, groups } => {
                    format!("users {users:?} and groups {groups:?}")
                }
            },
            LimitKind::Autofence => self.autofence.key().to_string(),
            LimitKind::WriteHoldLimit => match self.write_hold_limit {
                None => "none".to_string(),
                Some(d) => format_duration(d),
            },
            LimitKind::MaxQueuedRequests => self.max_queued_requests.to_string(),
            LimitKind::MaxHeldAccesses => self.max_held_accesses.to_string(),
            LimitKind::MaxUnreadReplies => self.max_unread_replies.to_string(),
            LimitKind::MaxUidConnections => self.max_uid_connections.to_string(),
            LimitKind::MaxUidBuffers => self.max_uid_buffers.to_string(),
        }
    }
}

/// The outcome of matching one client.
#[derive(Clone, Debug)]
pub struct Resolved {
    /// The winning rule's name, or `"default"` when no rule matched; quoted
    /// in refusals so the administrator knows which rule to edit.
    pub rule: String,
    /// Shared, so that every connection of a client and every request in
    /// flight can hold the limits it started with across a reload.
    pub limits: Arc<Limits>,
}

impl Resolved {
    /// The text a refusal quotes, e.g. `rule 'camera': max_total_bytes 512 MiB`.
    pub fn describe(&self, kind: LimitKind) -> String {
        format!(
            "rule '{}': {} {}",
            self.rule,
            kind.key(),
            self.limits.show(kind)
        )
    }
}

/// A loaded policy: immutable, cheap to share; a reload builds a new one.
#[derive(Clone, Debug)]
pub struct Policy {
    default: Arc<Limits>,
    /// In effective file order (a rule overridden by a later file takes the
    /// later file's place), which is what breaks specificity ties.
    rules: Vec<Rule>,
    admins: Admins,
    sources: Vec<PathBuf>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy::builtin()
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Admins {
    users: Vec<u32>,
    groups: Vec<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Rule {
    name: String,
    enabled: bool,
    matcher: Matcher,
    limits: Arc<Limits>,
    origin: PathBuf,
    line: usize,
}

/// A rule's criteria, already resolved to ids.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Matcher {
    uid: Option<u32>,
    gid: Option<u32>,
    exe: Option<PathBuf>,
    unit: Option<String>,
}

/// Ordered by number of criteria first, then by their weight: exe and unit
/// weigh 4, user 2, group 1. Exe and unit weigh most because they name one
/// program or service; a user usually runs many programs, and a group spans
/// many users. The count comes first so that narrowing a rule by adding a
/// criterion always makes it win over the rule it narrows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Specificity {
    criteria: u8,
    weight: u8,
}

impl Matcher {
    fn is_empty(&self) -> bool {
        self.uid.is_none() && self.gid.is_none() && self.exe.is_none() && self.unit.is_none()
    }

    fn matches(&self, who: &Identity) -> bool {
        self.uid.map_or(true, |uid| who.uid == uid)
            && self.gid.map_or(true, |gid| who.in_group(gid))
            && self
                .exe
                .as_ref()
                .map_or(true, |exe| who.exe.as_deref() == Some(exe.as_path()))
            && self
                .unit
                .as_ref()
                .map_or(true, |unit| who.unit.as_deref() == Some(unit.as_str()))
    }

    fn specificity(&self) -> Specificity {
        let parts = [
            (self.exe.is_some(), 4),
            (self.unit.is_some(), 4),
            (self.uid.is_some(), 2),
            (self.gid.is_some(), 1),
        ];
        let given = parts.iter().filter(|(set, _)| *set);
        Specificity {
            criteria: given.clone().map(|_| 1).sum(),
            weight: given.map(|(_, w)| w).sum(),
        }
    }
}

impl Policy {
    /// The policy in force when no file exists at all (user mode).
    pub fn builtin() -> Policy {
        Policy {
            default: Arc::new(Limits::default()),
            rules: Vec::new(),
            admins: Admins::default(),
            sources: Vec::new(),
        }
    }

    /// One file's worth of policy, from text, over the built-in defaults.
    /// `origin` is used only in error messages and [`Policy::sources`].
    /// Touches no file; the only outside state it reads is the user and
    /// group database, because names must be pinned to ids at load time
    /// (the kernel reports ids, and a lookup per connection could block).
    pub fn parse_str(text: &str, origin: &Path) -> Result<Policy, PolicyError> {
        let mut builder = Builder::default();
        builder.apply(parse_fragment(text, origin, &SystemNames)?);
        Ok(builder.finish())
    }

    /// Loads exactly these files, in order, later ones overriding earlier
    /// ones; every one must exist, since a path given explicitly that is
    /// missing is a mistake rather than an absent optional file.
    pub fn load_files(paths: &[PathBuf]) -> Result<Policy, PolicyError> {
        let mut builder = Builder::default();
        for path in paths {
            let text = read_policy_file(path)?;
            builder.apply(parse_fragment(&text, path, &SystemNames)?);
        }
        Ok(builder.finish())
    }

    /// Loads the standard locations: [`VENDOR_POLICY`], [`ADMIN_POLICY`],
    /// then `*.toml` in [`DROPIN_DIR`] in byte order of their names.
    pub fn load_system() -> Result<Policy, PolicyError> {
        Policy::load_system_from(Path::new("/"))
    }

    /// [`Policy::load_system`] with every standard path taken relative to
    /// `root`, so tests (and image builders) can point it at a tree of
    /// their own.
    pub fn load_system_from(root: &Path) -> Result<Policy, PolicyError> {
        let under_root = |path: &str| root.join(path.trim_start_matches('/'));
        let mut builder = Builder::default();
        for path in [VENDOR_POLICY, ADMIN_POLICY] {
            check_own_folder_of(&under_root(path))?;
        }
        for path in [under_root(VENDOR_POLICY), under_root(ADMIN_POLICY)] {
            match read_policy_file(&path) {
                Ok(text) => builder.apply(parse_fragment(&text, &path, &SystemNames)?),
                // Absent is fine; a dangling symlink (the file's, or a
                // folder's on its way) is not, since it most likely points
                // at configuration that failed to deploy.
                Err(PolicyError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    no_dangling_link_to(&path, root)?;
                }
                Err(e) => return Err(e),
            }
        }
        for path in dropins(&under_root(DROPIN_DIR), root)? {
            let text = read_policy_file(&path)?;
            builder.apply(parse_fragment(&text, &path, &SystemNames)?);
        }
        Ok(builder.finish())
    }

    /// Picks the enabled rule whose criteria all match and that is most
    /// specific; among equally specific ones the later in file order wins.
    /// Without any, the default section applies.
    pub fn resolve(&self, who: &Identity) -> Resolved {
        self.most_specific(|matcher| matcher.matches(who))
    }

    /// The rule for `uid` itself, as opposed to one of its processes: the
    /// rule that applies where the broker knows the user and nothing else,
    /// such as the user who made a namespace whose processes are counted
    /// as theirs. Only rules naming at most a user can be meant for it
    /// alone; one that also names a group, an exe or a unit is for some of
    /// the user's processes, and a group cannot be known without reading
    /// the user database.
    pub fn resolve_user(&self, uid: u32) -> Resolved {
        self.most_specific(|matcher| {
            matcher.gid.is_none()
                && matcher.exe.is_none()
                && matcher.unit.is_none()
                && matcher.uid.map_or(true, |named| named == uid)
        })
    }

    fn most_specific(&self, matches: impl Fn(&Matcher) -> bool) -> Resolved {
        let mut best: Option<(&Rule, Specificity)> = None;
        for rule in self
            .rules
            .iter()
            .filter(|r| r.enabled && matches(&r.matcher))
        {
            let specificity = rule.matcher.specificity();
            let better = match best {
                None => true,
                // `>=`: on a tie the later rule wins.
                Some((_, best)) => specificity >= best,
            };
            if better {
                best = Some((rule, specificity));
            }
        }
        match best {
            Some((rule, _)) => Resolved {
                rule: rule.name.clone(),
                limits: Arc::clone(&rule.limits),
            },
            None => Resolved {
                rule: "default".to_string(),
                limits: Arc::clone(&self.default),
            },
        }
    }

    /// Whether a caller may use state-changing admin methods. `gids` should
    /// hold the primary and the supplementary groups. Root always may: it
    /// could edit the policy file anyway.
    pub fn is_admin(&self, uid: u32, gids: &[u32]) -> bool {
        uid == 0
            || self.admins.users.contains(&uid)
            || gids.iter().any(|g| self.admins.groups.contains(g))
    }

    /// The files this policy was built from, in the order they were applied;
    /// empty for the built-in policy.
    pub fn sources(&self) -> &[PathBuf] {
        &self.sources
    }

    /// The default section's limits after inheritance from the built-ins.
    pub fn default_limits(&self) -> &Arc<Limits> {
        &self.default
    }

    /// Rule names in effective order, for status output and D-Bus.
    pub fn rule_names(&self) -> impl Iterator<Item = &str> + '_ {
        self.rules.iter().map(|r| r.name.as_str())
    }

    /// The effective policy as one self-contained policy file: every limit
    /// spelled out, names replaced by the ids they resolved to. Loading the
    /// output gives an equivalent policy, which makes it suitable both for
    /// "what is in force" dumps and for freezing a policy into an image.
    pub fn to_toml(&self) -> String {
        let mut out = String::from("# Effective dmabroker policy");
        if self.sources.is_empty() {
            out.push_str(" (built-in defaults)\n");
        } else {
            out.push_str(", loaded from:\n");
            for source in &self.sources {
                let _ = writeln!(out, "#   {}", source.display());
            }
        }
        if self.admins != Admins::default() {
            let _ = writeln!(
                out,
                "\nadmins = {{ users = {}, groups = {} }}",
                id_list(&self.admins.users),
                id_list(&self.admins.groups)
            );
        }
        out.push_str("\n[default]\n");
        write_limits(&mut out, &self.default);
        for rule in &self.rules {
            let _ = writeln!(out, "\n# {}:{}", rule.origin.display(), rule.line);
            out.push_str("[[rule]]\n");
            let _ = writeln!(out, "name = {}", toml_string(&rule.name));
            if !rule.enabled {
                out.push_str("enabled = false\n");
            }
            if let Some(uid) = rule.matcher.uid {
                let _ = writeln!(out, "user = {uid}");
            }
            if let Some(gid) = rule.matcher.gid {
                let _ = writeln!(out, "group = {gid}");
            }
            if let Some(exe) = &rule.matcher.exe {
                let _ = writeln!(out, "exe = {}", toml_string(&exe.to_string_lossy()));
            }
            if let Some(unit) = &rule.matcher.unit {
                let _ = writeln!(out, "unit = {}", toml_string(unit));
            }
            write_limits(&mut out, &rule.limits);
        }
        out
    }
}

fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn id_list(ids: &[u32]) -> String {
    let ids: Vec<String> = ids.iter().map(u32::to_string).collect();
    format!("[{}]", ids.join(", "))
}

fn write_limits(out: &mut String, limits: &Limits) {
    let heaps = match &limits.heaps {
        None => "\"all\"".to_string(),
        Some(heaps) => {
            let heaps: Vec<String> = heaps.iter().map(|h| toml_string(h)).collect();
            format!("[{}]", heaps.join(", "))
        }
    };
    let import_from = match &limits.import_from {
        ImportFrom::SameUser => "\"same-user\"".to_string(),
        ImportFrom::Anyone => "\"anyone\"".to_string(),
        ImportFrom::Only { users, groups } => {
            format!(
                "{{ users = {}, groups = {} }}",
                id_list(users),
                id_list(groups)
            )
        }
    };
    let _ = writeln!(out, "heaps = {heaps}");
    let _ = writeln!(
        out,
        "max_buffer_size = {}",
        units::size_literal(limits.max_buffer_size)
    );
    let _ = writeln!(
        out,
        "max_total_bytes = {}",
        units::size_literal(limits.max_total_bytes)
    );
    // Clamped: beyond what TOML can spell, and far beyond any real count.
    let max_buffers = i64::try_from(limits.max_buffers).unwrap_or(i64::MAX);
    let _ = writeln!(out, "max_buffers = {max_buffers}");
    let _ = writeln!(out, "may_export = {}", limits.may_export);
    let _ = writeln!(out, "import_from = {import_from}");
    let _ = writeln!(out, "autofence = \"{}\"", limits.autofence.key());
    let _ = writeln!(
        out,
        "write_hold_limit = {}",
        units::duration_literal(limits.write_hold_limit)
    );
    let _ = writeln!(out, "max_queued_requests = {}", limits.max_queued_requests);
    let _ = writeln!(out, "max_held_accesses = {}", limits.max_held_accesses);
    let _ = writeln!(out, "max_unread_replies = {}", limits.max_unread_replies);
    let _ = writeln!(out, "max_uid_connections = {}", limits.max_uid_connections);
    let _ = writeln!(out, "max_uid_buffers = {}", limits.max_uid_buffers);
}

/// Limits as one file sets them: `None` wherever the file is silent, so that
/// a later file, or inheritance, can fill them in.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct PartialLimits {
    heaps: Option<Option<Vec<String>>>,
    max_buffer_size: Option<u64>,
    max_total_bytes: Option<u64>,
    max_buffers: Option<u64>,
    may_export: Option<bool>,
    import_from: Option<ImportFrom>,
    autofence: Option<AutofenceMode>,
    write_hold_limit: Option<Option<Duration>>,
    max_queued_requests: Option<u32>,
    max_held_accesses: Option<u32>,
    max_unread_replies: Option<u32>,
    max_uid_connections: Option<u32>,
    max_uid_buffers: Option<u32>,
}

impl PartialLimits {
    /// Field by field: what `later` sets wins.
    fn overlay(&mut self, later: PartialLimits) {
        macro_rules! take {
            ($($field:ident),*) => { $( if later.$field.is_some() { self.$field = later.$field; } )* };
        }
        take!(
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
            max_uid_buffers
        );
    }

    fn apply_to(&self, base: &Limits) -> Limits {
        Limits {
            heaps: self.heaps.clone().unwrap_or_else(|| base.heaps.clone()),
            max_buffer_size: self.max_buffer_size.unwrap_or(base.max_buffer_size),
            max_total_bytes: self.max_total_bytes.unwrap_or(base.max_total_bytes),
            max_buffers: self.max_buffers.unwrap_or(base.max_buffers),
            may_export: self.may_export.unwrap_or(base.may_export),
            import_from: self
                .import_from
                .clone()
                .unwrap_or_else(|| base.import_from.clone()),
            autofence: self.autofence.unwrap_or(base.autofence),
            write_hold_limit: self.write_hold_limit.unwrap_or(base.write_hold_limit),
            max_queued_requests: self.max_queued_requests.unwrap_or(base.max_queued_requests),
            max_held_accesses: self.max_held_accesses.unwrap_or(base.max_held_accesses),
            max_unread_replies: self.max_unread_replies.unwrap_or(base.max_unread_replies),
            max_uid_connections: self.max_uid_connections.unwrap_or(base.max_uid_connections),
            max_uid_buffers: self.max_uid_buffers.unwrap_or(base.max_uid_buffers),
        }
    }
}

/// One file, parsed and with names resolved, not yet merged with others.
#[derive(Debug)]
struct Fragment {
    origin: PathBuf,
    admins: Option<Admins>,
    default: PartialLimits,
    rules: Vec<RuleDef>,
}

#[derive(Debug)]
struct RuleDef {
    name: String,
    enabled: bool,
    matcher: Matcher,
    limits: PartialLimits,
    line: usize,
}

/// Merges fragments in order. Kept separate from parsing so that the merge
/// rules (what overrides what) live in exactly one place.
#[derive(Debug, Default)]
struct Builder {
    default: PartialLimits,
    rules: Vec<(RuleDef, PathBuf)>,
    admins: Admins,
    sources: Vec<PathBuf>,
}

impl Builder {
    fn apply(&mut self, fragment: Fragment) {
        self.default.overlay(fragment.default);
        // The whole list is replaced, not extended: a site must be able to
        // take away admin rights the vendor file grants.
        if let Some(admins) = fragment.admins {
            self.admins = admins;
        }
        for rule in fragment.rules {
            // A rule redefined by a later file replaces the earlier one
            // entirely and moves to the later position, so it also wins
            // specificity ties the way a drop-in is expected to.
            self.rules.retain(|(r, _)| r.name != rule.name);
            self.rules.push((rule, fragment.origin.clone()));
        }
        self.sources.push(fragment.origin);
    }

    fn finish(self) -> Policy {
        let default = self.default.apply_to(&Limits::default());
        let rules = self
            .rules
            .into_iter()
            .map(|(def, origin)| Rule {
                limits: Arc::new(def.limits.apply_to(&default)),
                name: def.name,
                enabled: def.enabled,
                matcher: def.matcher,
                origin,
                line: def.line,
            })
            .collect();
        Policy {
            default: Arc::new(default),
            rules,
            admins: self.admins,
            sources: self.sources,
        }
    }
}

/// Name lookups behind a trait so that parsing can be tested against a fixed
/// user database instead of whatever the test machine has.
trait NameLookup {
    fn user(&self, name: &str) -> Result<Option<u32>, String>;
    fn group(&self, name: &str) -> Result<Option<u32>, String>;
}

/// The real thing: NSS through nix (getpwnam_r / getgrnam_r).
struct SystemNames;

impl NameLookup for SystemNames {
    fn user(&self, name: &str) -> Result<Option<u32>, String> {
        nix::unistd::User::from_name(name)
            .map(|u| u.map(|u| u.uid.as_raw()))
            .map_err(|e| e.desc().to_string())
    }

    fn group(&self, name: &str) -> Result<Option<u32>, String> {
        nix::unistd::Group::from_name(name)
            .map(|g| g.map(|g| g.gid.as_raw()))
            .map_err(|e| e.desc().to_string())
    }
}

/// Maps byte offsets to 1-based line and column for messages.
struct Positions<'a> {
    text: &'a str,
    origin: &'a Path,
}

impl Positions<'_> {
    fn line_col(&self, offset: usize) -> (usize, usize) {
        let mut offset = offset.min(self.text.len());
        while !self.text.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        (line, before[line_start..].chars().count() + 1)
    }

    fn invalid(&self, span: Range<usize>, message: String) -> PolicyError {
        PolicyError::Invalid {
            path: self.origin.to_path_buf(),
            line: self.line_col(span.start).0,
            message,
        }
    }

    fn syntax(&self, error: &toml::de::Error) -> PolicyError {
        let (line, column) = match error.span() {
            Some(span) => self.line_col(span.start),
            None => (1, 1),
        };
        PolicyError::Syntax {
            path: self.origin.to_path_buf(),
            line,
            column,
            // One line, so that a reload failure is one log line.
            message: error.message().trim_end().replace('\n', "; "),
        }
    }
}

#[derive(Clone, Copy)]
enum IdKind {
    User,
    Group,
}

/// Text to fragment. Pure apart from name lookups, which go through `names`.
fn parse_fragment(
    text: &str,
    origin: &Path,
    names: &dyn NameLookup,
) -> Result<Fragment, PolicyError> {
    let pos = Positions { text, origin };
    let raw: RawFile = toml::from_str(text).map_err(|e| pos.syntax(&e))?;

    let resolve_id = |spanned: &Spanned<IdRef>, kind: IdKind| -> Result<u32, PolicyError> {
        let name = match spanned.get_ref() {
            IdRef::Id(id) => return Ok(*id),
            IdRef::Name(name) => name,
        };
        let (what, found) = match kind {
            IdKind::User => ("user", names.user(name)),
            IdKind::Group => ("group", names.group(name)),
        };
        match found {
            Ok(Some(id)) => Ok(id),
            // A quoted number is a name to TOML, and is looked up as one
            // (a name of digits alone is rare, but legal in /etc/passwd):
            // an administrator who meant the id is told how to write it.
            Ok(None) if !name.is_empty() && name.bytes().all(|b| b.is_ascii_digit()) => Err(pos
                .invalid(
                    spanned.span(),
                    format!(
                        "unknown {what} '{name}': quoted, it is a name; for the numeric id, \
                         write it without quotes ({what} = {name})"
                    ),
                )),
            Ok(None) => Err(pos.invalid(spanned.span(), format!("unknown {what} '{name}'"))),
            Err(e) => Err(pos.invalid(
                spanned.span(),
                format!("cannot look up {what} '{name}': {e}"),
            )),
        }
    };
    let resolve_ids = |list: &[Spanned<IdRef>], kind: IdKind| -> Result<Vec<u32>, PolicyError> {
        let mut ids = Vec::with_capacity(list.len());
        for item in list {
            let id = resolve_id(item, kind)?;
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        Ok(ids)
    };
    let convert_limits = |raw: RawLimits| -> Result<PartialLimits, PolicyError> {
        let import_from = match raw.import_from {
            None => None,
            Some(RawImportFrom::SameUser) => Some(ImportFrom::SameUser),
            Some(RawImportFrom::Anyone) => Some(ImportFrom::Anyone),
            Some(RawImportFrom::Only(only)) => Some(ImportFrom::Only {
                users: resolve_ids(&only.users, IdKind::User)?,
                groups: resolve_ids(&only.groups, IdKind::Group)?,
            }),
        };
        Ok(PartialLimits {
            heaps: raw.heaps.map(|h| h.0),
            max_buffer_size: raw.max_buffer_size.map(|s| s.0),
            max_total_bytes: raw.max_total_bytes.map(|s| s.0),
            max_buffers: raw.max_buffers,
            may_export: raw.may_export,
            import_from,
            autofence: raw.autofence.map(|a| match a {
                raw::RawAutofence::Required => AutofenceMode::Required,
                raw::RawAutofence::Optional => AutofenceMode::Optional,
                raw::RawAutofence::Disabled => AutofenceMode::Disabled,
            }),
            write_hold_limit: raw.write_hold_limit.map(|h| h.0),
            max_queued_requests: raw.max_queued_requests.map(|n| n.0),
            max_held_accesses: raw.max_held_accesses.map(|n| n.0),
            max_unread_replies: raw.max_unread_replies.map(|n| n.0),
            max_uid_connections: raw.max_uid_connections.map(|n| n.0),
            max_uid_buffers: raw.max_uid_buffers.map(|n| n.0),
        })
    };

    let admins = match raw.admins {
        None => None,
        Some(admins) => Some(Admins {
            users: resolve_ids(&admins.users, IdKind::User)?,
            groups: resolve_ids(&admins.groups, IdKind::Group)?,
        }),
    };
    let default = match raw.default {
        None => PartialLimits::default(),
        Some(limits) => convert_limits(limits)?,
    };

    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut rules = Vec::with_capacity(raw.rule.len());
    for mut raw_rule in raw.rule {
        let name = raw_rule.name.get_ref().0.clone();
        let name_span = raw_rule.name.span();
        let line = pos.line_col(name_span.start).0;
        if let Some(first) = seen.insert(name.clone(), line) {
            return Err(pos.invalid(
                name_span,
                format!("rule '{name}' is already defined on line {first}; rule names must be unique within a file"),
            ));
        }
        let matcher = Matcher {
            uid: raw_rule
                .user
                .as_ref()
                .map(|u| resolve_id(u, IdKind::User))
                .transpose()?,
            gid: raw_rule
                .group
                .as_ref()
                .map(|g| resolve_id(g, IdKind::Group))
                .transpose()?,
            exe: raw_rule.exe.take().map(|e| e.0),
            unit: raw_rule.unit.take().map(|u| u.0),
        };
        let enabled = raw_rule.enabled.unwrap_or(true);
        if enabled && matcher.is_empty() {
            return Err(pos.invalid(
                name_span,
                format!(
                    "rule '{name}' has no criteria (user, group, exe, unit); limits for everyone belong in [default]"
                ),
            ));
        }
        let limits = convert_limits(raw_rule.split_limits())?;
        rules.push(RuleDef {
            name,
            enabled,
            matcher,
            limits,
            line,
        });
    }

    Ok(Fragment {
        origin: origin.to_path_buf(),
        admins,
        default,
        rules,
    })
}

/// Reads one policy file after checking that only root (or the daemon's own
/// user, for user mode) can have written it: the policy decides how much
/// unaccounted memory clients may pin, so a file anyone else can edit would
/// hand them that decision.
fn read_policy_file(path: &Path) -> Result<String, PolicyError> {
    let io = |source| PolicyError::Io {
        path: path.to_path_buf(),
        source,
    };
    // Checked before opening: opening a FIFO for reading would block.
    let meta = fs::metadata(path).map_err(io)?;
    if !meta.is_file() {
        return Err(PolicyError::Insecure {
            path: path.to_path_buf(),
            message: "not a regular file".to_string(),
        });
    }
    // Without waiting even so: a FIFO put in its place since would block
    // the open (a regular file reads the same with O_NONBLOCK).
    let file = {
        use std::os::unix::fs::OpenOptionsExt as _;
        fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NONBLOCK)
            .open(path)
            .map_err(io)?
    };
    // Checked on the open file, which is what will actually be read.
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(PolicyError::Insecure {
            path: path.to_path_buf(),
            message: "not a regular file".to_string(),
        });
    }
    check_open_file(path, &file)?;
    let too_large = || PolicyError::Insecure {
        path: path.to_path_buf(),
        message: format!("larger than {}", format_size(MAX_FILE_SIZE)),
    };
    if meta.len() > MAX_FILE_SIZE {
        return Err(too_large());
    }
    let mut bytes = Vec::new();
    file.take(MAX_FILE_SIZE + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    // Grown since it was looked at.
    if bytes.len() as u64 > MAX_FILE_SIZE {
        return Err(too_large());
    }
    String::from_utf8(bytes).map_err(|err| not_utf8(path, &err))
}

/// Where a policy file stops being UTF-8, in the `path:line:column` form of
/// every other content error (the reader says only "not valid UTF-8").
fn not_utf8(path: &Path, err: &std::string::FromUtf8Error) -> PolicyError {
    let good = &err.as_bytes()[..err.utf8_error().valid_up_to()];
    let line = good.iter().filter(|b| **b == b'\n').count() + 1;
    let line_start = good.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    let column = String::from_utf8_lossy(&good[line_start..]).chars().count() + 1;
    PolicyError::Syntax {
        path: path.to_path_buf(),
        line,
        column,
        message: "not valid UTF-8".to_string(),
    }
}

/// Refuses `file` (at `path`) if anyone but root or the daemon's own user
/// could change it: by its owner, its mode bits, or its POSIX ACL (whose
/// named users and groups the mode bits do not show, and whose mask the
/// group bits show in place of the owning group's own permission). An ACL
/// that cannot be read refuses the file too.
fn check_open_file(path: &Path, file: &fs::File) -> Result<(), PolicyError> {
    let io = |source| PolicyError::Io {
        path: path.to_path_buf(),
        source,
    };
    let meta = file.metadata().map_err(io)?;
    let acl = acl::access_acl(file).map_err(io)?;
    check_writers(path, &meta, acl)
}

/// [`check_writers`] for a file's metadata and access ACL.
fn check_writers(
    path: &Path,
    meta: &fs::Metadata,
    acl: Option<acl::Acl>,
) -> Result<(), PolicyError> {
    let euid = nix::unistd::geteuid().as_raw();
    let egid = nix::unistd::getegid().as_raw();
    let insecure = |message: String| PolicyError::Insecure {
        path: path.to_path_buf(),
        message,
    };
    if meta.uid() != 0 && meta.uid() != euid {
        return Err(insecure(format!(
            "owned by uid {}, not by root",
            meta.uid()
        )));
    }
    if meta.mode() & 0o002 != 0 {
        return Err(insecure("writable by everyone".to_string()));
    }
    let group_writes = acl
        .as_ref()
        .map_or(meta.mode() & 0o020 != 0, |acl| acl.owning_group_writes);
    if group_writes && meta.gid() != 0 && meta.gid() != egid {
        return Err(insecure(format!("writable by group {}", meta.gid())));
    }
    for writer in acl.map(|acl| acl.named_writers).unwrap_or_default() {
        match writer {
            acl::AclWriter::User(uid) if uid != 0 && uid != euid => {
                return Err(insecure(format!("writable by uid {uid} (its ACL)")));
            }
            acl::AclWriter::Group(gid) if gid != 0 && gid != egid => {
                return Err(insecure(format!("writable by group {gid} (its ACL)")));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Opens a folder to look at, never blocking: `O_DIRECTORY` refuses a
/// FIFO or a device node in its place (opened for reading, a FIFO waits
/// for a writer, and a device may act on being opened).
fn open_folder(path: &Path) -> std::io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_DIRECTORY | nix::libc::O_NONBLOCK)
        .open(path)
}

/// [`check_writers`] for the folder of dmabroker's own that holds the
/// policy file `path` (`/etc/dmabroker`, `/usr/share/dmabroker`): whoever
/// may write it may take the file out (or rename `policy.d`), and an
/// absent file is no error. The folders above are the system's, and are
/// not judged here: an odd `/usr` must not stop the daemon. Looked at by
/// path, which needs only the right to search it, as reading the file
/// does.
fn check_own_folder_of(path: &Path) -> Result<(), PolicyError> {
    let Some(folder) = path.parent() else {
        return Ok(());
    };
    let io = |source| PolicyError::Io {
        path: folder.to_path_buf(),
        source,
    };
    let meta = match fs::metadata(folder) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(e)),
    };
    if !meta.is_dir() {
        return Err(PolicyError::Insecure {
            path: folder.to_path_buf(),
            message: "not a directory".to_string(),
        });
    }
    let acl = acl::access_acl_at(folder).map_err(io)?;
    check_writers(folder, &meta, acl)
}

/// An error if `path` (absent) is absent only because it, or a folder on
/// its way below `root`, is a symbolic link to nothing: configuration that
/// failed to deploy (a link into a file system not mounted yet), whose
/// restrictions would be dropped without a word if taken for "no file".
fn no_dangling_link_to(path: &Path, root: &Path) -> Result<(), PolicyError> {
    let dangling = path
        .ancestors()
        .take_while(|folder| folder.starts_with(root) && *folder != root)
        .find(|link| {
            fs::symlink_metadata(link).is_ok_and(|m| m.file_type().is_symlink())
                && fs::metadata(link).is_err()
        });
    match dangling {
        None => Ok(()),
        Some(link) => Err(PolicyError::Io {
            path: link.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "a symbolic link to nothing (configuration not deployed?)",
            ),
        }),
    }
}

/// The drop-in files in application order. A missing directory is fine; an
/// unreadable or insecure one is not, since silently skipping it would drop
/// whatever restrictions it holds.
fn dropins(dir: &Path, root: &Path) -> Result<Vec<PathBuf>, PolicyError> {
    let io = |source| PolicyError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let folder = match open_folder(dir) {
        Ok(folder) => folder,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            no_dangling_link_to(dir, root)?;
            return Ok(Vec::new());
        }
        Err(e) if e.raw_os_error() == Some(nix::libc::ENOTDIR) => {
            return Err(PolicyError::Insecure {
                path: dir.to_path_buf(),
                message: "not a directory".to_string(),
            })
        }
        Err(e) => return Err(io(e)),
    };
    // A user who may write the folder may take a drop-in out.
    check_open_file(dir, &folder)?;
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(io)? {
        let name = entry.map_err(io)?.file_name();
        let bytes = name.as_encoded_bytes();
        // Dot files are editor swap and lock files (`.#10-camera.toml`), not
        // configuration.
        if bytes.ends_with(b".toml") && !bytes.starts_with(b".") {
            names.push(name);
        }
    }
    names.sort();
    Ok(names.into_iter().map(|name| dir.join(name)).collect())
}

#[cfg(test)]
mod tests;
