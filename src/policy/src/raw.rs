//! The file as serde sees it: one struct per table, nothing resolved yet.
//!
//! Every check that concerns a single value happens during deserialization,
//! so the TOML reader attaches the value's exact position to the message for
//! free. Checks that need more than one value, or the user database, happen
//! later and use the `Spanned` wrappers kept here for that purpose.

use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use toml::Spanned;

use crate::units::{parse_duration, parse_size};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFile {
    pub admins: Option<RawAdmins>,
    pub default: Option<RawLimits>,
    #[serde(default)]
    pub rule: Vec<RawRule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAdmins {
    #[serde(default)]
    pub users: Vec<Spanned<IdRef>>,
    #[serde(default)]
    pub groups: Vec<Spanned<IdRef>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLimits {
    pub heaps: Option<Heaps>,
    pub max_buffer_size: Option<Size>,
    pub max_total_bytes: Option<Size>,
    pub max_buffers: Option<u64>,
    pub may_export: Option<bool>,
    pub import_from: Option<RawImportFrom>,
    pub autofence: Option<RawAutofence>,
    pub write_hold_limit: Option<HoldLimit>,
    pub max_queued_requests: Option<Positive>,
    pub max_held_accesses: Option<Positive>,
    pub max_unread_replies: Option<Positive>,
    pub max_uid_connections: Option<Positive>,
    pub max_uid_buffers: Option<Positive>,
}

/// Same limit fields as [`RawLimits`], written out again because serde's
/// `flatten` cannot be combined with `deny_unknown_fields`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRule {
    pub name: Spanned<RuleName>,
    pub enabled: Option<bool>,
    pub user: Option<Spanned<IdRef>>,
    pub group: Option<Spanned<IdRef>>,
    pub exe: Option<ExePath>,
    pub unit: Option<UnitName>,

    pub heaps: Option<Heaps>,
    pub max_buffer_size: Option<Size>,
    pub max_total_bytes: Option<Size>,
    pub max_buffers: Option<u64>,
    pub may_export: Option<bool>,
    pub import_from: Option<RawImportFrom>,
    pub autofence: Option<RawAutofence>,
    pub write_hold_limit: Option<HoldLimit>,
    pub max_queued_requests: Option<Positive>,
    pub max_held_accesses: Option<Positive>,
    pub max_unread_replies: Option<Positive>,
    pub max_uid_connections: Option<Positive>,
    pub max_uid_buffers: Option<Positive>,
}

impl RawRule {
    pub fn split_limits(&mut self) -> RawLimits {
        RawLimits {
            heaps: self.heaps.take(),
            max_buffer_size: self.max_buffer_size.take(),
            max_total_bytes: self.max_total_bytes.take(),
            max_buffers: self.max_buffers.take(),
            may_export: self.may_export.take(),
            import_from: self.import_from.take(),
            autofence: self.autofence.take(),
            write_hold_limit: self.write_hold_limit.take(),
            max_queued_requests: self.max_queued_requests.take(),
            max_held_accesses: self.max_held_accesses.take(),
            max_unread_replies: self.max_unread_replies.take(),
            max_uid_connections: self.max_uid_connections.take(),
            max_uid_buffers: self.max_uid_buffers.take(),
        }
    }
}

#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum RawAutofence {
    Required,
    Optional,
    Disabled,
}

/// A user or group as written: names are looked up only after the whole file
/// parsed, so that a syntax error is reported before any NSS traffic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum IdRef {
    Id(u32),
    Name(String),
}

impl<'de> Deserialize<'de> for IdRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = IdRef;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a name or a numeric id")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<IdRef, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom(format!("invalid id {v}: ids are not negative")))
                    .and_then(|v| self.visit_u64(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<IdRef, E> {
                // (uid_t)-1 means "no id" to the kernel (setresuid, chown), so
                // no process ever has it and a rule naming it is a typo.
                match u32::try_from(v) {
                    Ok(id) if id != u32::MAX => Ok(IdRef::Id(id)),
                    _ => Err(E::custom(format!("invalid id {v}: out of range"))),
                }
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<IdRef, E> {
                if v.is_empty()
                    || v.chars()
                        .any(|c| c.is_whitespace() || c.is_control() || c == ':')
                {
                    return Err(E::custom(format!("invalid user or group name {v:?}")));
                }
                Ok(IdRef::Name(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

impl fmt::Display for IdRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdRef::Id(id) => write!(f, "{id}"),
            IdRef::Name(name) => write!(f, "'{name}'"),
        }
    }
}

/// A queue bound: zero would make every request fail, which is never what
/// an administrator meant.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Positive(pub u32);

impl<'de> Deserialize<'de> for Positive {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Positive;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a whole number from 1 to 4294967295")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Positive, E> {
                match u32::try_from(v) {
                    Ok(n) if n > 0 => Ok(Positive(n)),
                    _ => Err(E::custom(format!(
                        "invalid value {v}: must be from 1 to {}",
                        u32::MAX
                    ))),
                }
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Positive, E> {
                self.visit_i64(i64::try_from(v).unwrap_or(-1))
            }
        }
        d.deserialize_any(V)
    }
}

/// A byte count: an integer, or a string with a binary suffix.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Size(pub u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size in bytes, or a string such as \"256 MiB\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Size, E> {
                u64::try_from(v)
                    .map(Size)
                    .map_err(|_| E::custom(format!("invalid size {v}: sizes are not negative")))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Size, E> {
                Ok(Size(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Size, E> {
                parse_size(v).map(Size).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// `write_hold_limit`: a duration string, or `"none"` so that a rule can lift
/// a limit its default section sets.
#[derive(Clone, Copy, Debug)]
pub(crate) struct HoldLimit(pub Option<Duration>);

impl<'de> Deserialize<'de> for HoldLimit {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = HoldLimit;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration string such as \"500ms\" or \"2s\", or \"none\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<HoldLimit, E> {
                Err(E::custom(format!(
                    "invalid duration {v}: a unit is required, e.g. \"{v}ms\" or \"{v}s\""
                )))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<HoldLimit, E> {
                parse_duration(v).map(HoldLimit).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// `heaps`: a list in fallback order, or `"all"` so that a rule can lift a
/// restriction its default section sets.
#[derive(Clone, Debug)]
pub(crate) struct Heaps(pub Option<Vec<String>>);

impl<'de> Deserialize<'de> for Heaps {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Heaps;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of heap names, or \"all\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Heaps, E> {
                if v == "all" {
                    Ok(Heaps(None))
                } else {
                    Err(E::custom(format!(
                        "invalid heaps {v:?}: expected a list such as [\"{v}\"] or \"all\""
                    )))
                }
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Heaps, A::Error> {
                let mut heaps: Vec<String> = Vec::new();
                while let Some(name) = seq.next_element::<String>()? {
                    // Heap names become paths under /dev/dma_heap and tokens in
                    // log lines; anything that could escape either is refused.
                    if name.is_empty()
                        || name.len() > 128
                        || name == "."
                        || name == ".."
                        || name
                            .chars()
                            .any(|c| c == '/' || c.is_control() || c.is_whitespace())
                    {
                        return Err(de::Error::custom(format!("invalid heap name {name:?}")));
                    }
                    if heaps.contains(&name) {
                        return Err(de::Error::custom(format!("heap {name:?} listed twice")));
                    }
                    heaps.push(name);
                }
                Ok(Heaps(Some(heaps)))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Clone, Debug)]
pub(crate) enum RawImportFrom {
    SameUser,
    Anyone,
    Only(RawOnly),
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawOnly {
    #[serde(default)]
    pub users: Vec<Spanned<IdRef>>,
    #[serde(default)]
    pub groups: Vec<Spanned<IdRef>>,
}

impl<'de> Deserialize<'de> for RawImportFrom {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawImportFrom;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "\"same-user\", \"anyone\" or a table { users = [...], groups = [...] }",
                )
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawImportFrom, E> {
                match v {
                    "same-user" => Ok(RawImportFrom::SameUser),
                    "anyone" => Ok(RawImportFrom::Anyone),
                    _ => Err(E::custom(format!(
                        "invalid import_from {v:?}: expected \"same-user\", \"anyone\" or a table {{ users = [...], groups = [...] }}"
                    ))),
                }
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawImportFrom, A::Error> {
                RawOnly::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(RawImportFrom::Only)
            }
        }
        d.deserialize_any(V)
    }
}

/// A rule's name shows up in refusal messages, logs and D-Bus replies, so it
/// is kept to characters that cannot confuse any of them.
#[derive(Clone, Debug)]
pub(crate) struct RuleName(pub String);

impl<'de> Deserialize<'de> for RuleName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        if name == "default" {
            return Err(de::Error::custom(
                "rule name \"default\" is reserved for the [default] section",
            ));
        }
        let ok_char = |c: char| c.is_ascii_alphanumeric() || "._-@:+".contains(c);
        if name.is_empty() || name.len() > 64 || !name.chars().all(ok_char) {
            return Err(de::Error::custom(format!(
                "invalid rule name {name:?}: use 1 to 64 letters, digits and . _ - @ : +"
            )));
        }
        Ok(RuleName(name))
    }
}

/// `/proc/PID/exe` is always absolute and canonical, so a relative or
/// `..`-laden path could never match; refusing it turns a silent non-match
/// into an error at load time.
#[derive(Clone, Debug)]
pub(crate) struct ExePath(pub PathBuf);

impl<'de> Deserialize<'de> for ExePath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let path = Path::new(&s);
        if !path.is_absolute() {
            return Err(de::Error::custom(format!(
                "invalid exe {s:?}: must be an absolute path"
            )));
        }
        if s.contains('\0')
            || path
                .components()
                .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
        {
            return Err(de::Error::custom(format!(
                "invalid exe {s:?}: must be the canonical path (no . or .. components)"
            )));
        }
        if path.parent().is_none() {
            return Err(de::Error::custom(format!(
                "invalid exe {s:?}: not a file path"
            )));
        }
        Ok(ExePath(path.components().collect()))
    }
}

/// Only services and scopes hold processes (slices are inner cgroup nodes),
/// so those are the only unit names a client can ever be found in.
#[derive(Clone, Debug)]
pub(crate) struct UnitName(pub String);

impl<'de> Deserialize<'de> for UnitName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let stem = s
            .strip_suffix(".service")
            .or_else(|| s.strip_suffix(".scope"));
        match stem {
            Some(stem)
                if !stem.is_empty()
                    && s.len() <= 255
                    && !s.chars().any(|c| c == '/' || c.is_whitespace() || c.is_control()) =>
            {
                Ok(UnitName(s))
            }
            _ => Err(de::Error::custom(format!(
                "invalid unit {s:?}: expected a full systemd unit name ending in .service or .scope, e.g. \"camera.service\""
            ))),
        }
    }
}
