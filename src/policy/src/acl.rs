//! Who a file's POSIX access ACL lets write it. The mode bits do not say:
//! with an ACL, the group bits show the ACL's mask, and a named user or
//! group in it may write whoever owns the file. A root-owned 0664 policy
//! file with `user:bob:rw` passed the mode check, and bob could raise his
//! own limits at the next reload.

use std::io;
use std::os::fd::AsFd;

/// The extended attribute the kernel keeps a file's access ACL in.
const ACCESS_ACL: &str = "system.posix_acl_access";
/// `POSIX_ACL_XATTR_VERSION` of `linux/posix_acl_xattr.h`.
const XATTR_VERSION: u32 = 2;
const HEADER_LEN: usize = 4;
/// `struct posix_acl_xattr_entry`: tag (u16), perm (u16), id (u32).
const ENTRY_LEN: usize = 8;
const TAG_USER_OBJ: u16 = 0x01;
const TAG_USER: u16 = 0x02;
const TAG_GROUP_OBJ: u16 = 0x04;
const TAG_GROUP: u16 = 0x08;
const TAG_MASK: u16 = 0x10;
const TAG_OTHER: u16 = 0x20;
const KNOWN_TAGS: [u16; 6] = [
    TAG_USER_OBJ,
    TAG_USER,
    TAG_GROUP_OBJ,
    TAG_GROUP,
    TAG_MASK,
    TAG_OTHER,
];
const PERM_WRITE: u16 = 0x02;
/// An access ACL's size is bounded by the kernel's limit on an xattr value.
const MAX_ACL_LEN: usize = 64 * 1024;

/// A named user or group the ACL lets write (its entry and the mask both
/// grant it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AclWriter {
    User(u32),
    Group(u32),
}

/// Who an access ACL lets write, besides the owner and others (whose
/// entries the mode bits show as they are).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Acl {
    pub named_writers: Vec<AclWriter>,
    /// Whether the owning group may write: its entry, as masked. The mode's
    /// group bits show the mask instead, which a named entry may have
    /// widened without the owning group getting anything.
    pub owning_group_writes: bool,
}

/// `file`'s access ACL; `None` when it has none, or sits on a file system
/// without them.
pub(crate) fn access_acl(file: impl AsFd) -> io::Result<Option<Acl>> {
    let mut value = vec![0u8; MAX_ACL_LEN];
    let read = rustix::fs::fgetxattr(file.as_fd(), ACCESS_ACL, &mut value[..]);
    acl_read(read, value)
}

/// As [`access_acl`], for a file named by `path` (a folder the daemon may
/// search but not list, which it cannot open for reading).
pub(crate) fn access_acl_at(path: &std::path::Path) -> io::Result<Option<Acl>> {
    let mut value = vec![0u8; MAX_ACL_LEN];
    let read = rustix::fs::getxattr(path, ACCESS_ACL, &mut value[..]);
    acl_read(read, value)
}

fn acl_read(read: rustix::io::Result<usize>, mut value: Vec<u8>) -> io::Result<Option<Acl>> {
    match read {
        Ok(len) => {
            value.truncate(len);
            parse(&value)
                .map(Some)
                .map_err(|message| io::Error::new(io::ErrorKind::InvalidData, message))
        }
        Err(rustix::io::Errno::NODATA | rustix::io::Errno::OPNOTSUPP) => Ok(None),
        Err(errno) => Err(errno.into()),
    }
}

/// An ACL in the kernel's xattr form. A form this code does not know (a
/// version, a size, a tag) is an error, never "no writers".
pub(crate) fn parse(acl: &[u8]) -> Result<Acl, String> {
    let Some((header, body)) = acl.split_first_chunk::<HEADER_LEN>() else {
        return Err(format!("an access ACL of {} bytes", acl.len()));
    };
    let version = u32::from_le_bytes(*header);
    if version != XATTR_VERSION || body.len() % ENTRY_LEN != 0 {
        return Err(format!(
            "an access ACL of version {version} and {} bytes, which this daemon cannot read",
            acl.len()
        ));
    }
    let entries: Vec<(u16, u16, u32)> = body
        .chunks_exact(ENTRY_LEN)
        .map(|e| {
            (
                u16::from_le_bytes([e[0], e[1]]),
                u16::from_le_bytes([e[2], e[3]]),
                u32::from_le_bytes([e[4], e[5], e[6], e[7]]),
            )
        })
        .collect();
    if let Some((tag, _, _)) = entries.iter().find(|(tag, _, _)| !KNOWN_TAGS.contains(tag)) {
        return Err(format!(
            "an access ACL with an entry of unknown tag {tag:#x}"
        ));
    }
    // Without a mask (no named entries), nothing is masked.
    let mask = entries
        .iter()
        .find(|(tag, _, _)| *tag == TAG_MASK)
        .map_or(u16::MAX, |(_, perm, _)| *perm);
    let writes = |perm: u16| perm & mask & PERM_WRITE != 0;
    Ok(Acl {
        named_writers: entries
            .iter()
            .filter(|(_, perm, _)| writes(*perm))
            .filter_map(|(tag, _, id)| match *tag {
                TAG_USER => Some(AclWriter::User(*id)),
                TAG_GROUP => Some(AclWriter::Group(*id)),
                _ => None,
            })
            .collect(),
        owning_group_writes: entries
            .iter()
            .any(|(tag, perm, _)| *tag == TAG_GROUP_OBJ && writes(*perm)),
    })
}

/// An access ACL in the kernel's xattr form, for tests that set one.
#[cfg(test)]
pub(crate) fn encode(entries: &[(u16, u16, u32)]) -> Vec<u8> {
    let mut out = XATTR_VERSION.to_le_bytes().to_vec();
    for (tag, perm, id) in entries {
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&perm.to_le_bytes());
        out.extend_from_slice(&id.to_le_bytes());
    }
    out
}

#[cfg(test)]
pub(crate) mod tag {
    pub const USER_OBJ: u16 = super::TAG_USER_OBJ;
    pub const USER: u16 = super::TAG_USER;
    pub const GROUP_OBJ: u16 = super::TAG_GROUP_OBJ;
    pub const GROUP: u16 = super::TAG_GROUP;
    pub const MASK: u16 = super::TAG_MASK;
    pub const OTHER: u16 = super::TAG_OTHER;
    pub const UNDEFINED_ID: u32 = u32::MAX;
}
