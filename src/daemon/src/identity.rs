//! Who is on the other end of a connection, from the kernel only.
//!
//! Nothing a client says about itself counts for policy: uid, gid and groups
//! come from `SO_PEERCRED`/`SO_PEERGROUPS`, the process from a pidfd
//! (`SO_PEERPIDFD`, Linux 6.5+) so that a recycled pid cannot be mistaken
//! for the client, and the executable and systemd unit from `/proc` read
//! while that pidfd proves the process is still the one that connected.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::PathBuf;

use dmabroker_policy::Identity;
use nix::errno::Errno;
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};

/// Socket options missing from nix 0.29 (values from asm-generic/socket.h).
const SO_PEERGROUPS: libc::c_int = 59;
const SO_PEERPIDFD: libc::c_int = 77;

#[derive(Debug)]
pub struct Peer {
    pub identity: Identity,
    /// The user the peer answers to, for bounds that must hold per user:
    /// its uid, or for a process in a user namespace a user made below the
    /// daemon's, that user's (see `kernel::userns`). The processes of a
    /// container (a namespace root made with a range of uids) count as one,
    /// named by the container's namespace: all of its uids are one
    /// tenant's to switch between, and every container as root would
    /// share one count.
    /// A peer whose namespace the daemon cannot read (the process gone
    /// before it was pinned, which a namespaced client can arrange by
    /// passing its socket on, or the daemon short of fds to pin it)
    /// counts as [`UNACCOUNTED_UID`].
    pub accountable_uid: u32,
    pub pid: i32,
    /// Kept for the life of the connection: it pins the identity of the pid.
    pub pidfd: Option<OwnedFd>,
}

/// The one user every peer whose namespace could not be read counts as:
/// shared, so that such peers cannot have a bound each.
pub const UNACCOUNTED_UID: u32 = u32::MAX - 1;

/// Where the accountable ids of containers start: namespaces' proc inode
/// numbers sit at 0xF0000000 and above, where no uid is given out.
pub const FIRST_CONTAINER_ID: u32 = 0xf000_0000;

/// Whether an accountable id names a container (see [`FIRST_CONTAINER_ID`]).
pub fn is_container_id(id: u32) -> bool {
    (FIRST_CONTAINER_ID..UNACCOUNTED_UID).contains(&id)
}

impl Peer {
    /// Whom a refusal of a limit counted per user names: `uid U`, and
    /// whom that uid counts as when it is not itself.
    pub fn counted_as_text(&self) -> String {
        let (uid, counted_as) = (self.identity.uid, self.accountable_uid);
        if counted_as == uid {
            format!("uid {uid}")
        } else if counted_as == UNACCOUNTED_UID {
            format!("uid {uid}, counted with every peer not identified")
        } else if counted_as >= FIRST_CONTAINER_ID {
            format!("uid {uid}, counted with its container (user namespace {counted_as})")
        } else {
            format!("uid {uid}, counted as uid {counted_as}, who made its user namespace")
        }
    }

    /// The user who made the peer's user namespace, when the peer counts
    /// as a user other than its own uid: that user's own rule then bounds
    /// what is counted per user too, or a stricter rule for them would not
    /// reach the subordinate uids they connect as.
    pub fn counted_as_its_maker(&self) -> Option<u32> {
        let counted_as = self.accountable_uid;
        (counted_as != self.identity.uid
            && counted_as != UNACCOUNTED_UID
            && counted_as < FIRST_CONTAINER_ID)
            .then_some(counted_as)
    }
}

/// The user a process of `uid`, `pid`, answers to (see
/// [`Peer::accountable_uid`]); `None` when its namespace cannot be read.
fn accountable(uid: u32, pid: i32) -> Option<u32> {
    use crate::kernel::userns::Maker;
    match crate::kernel::userns::owner_below_ours(pid) {
        Ok(None) => Some(uid),
        Ok(Some(Maker::User(maker) | Maker::Container(maker))) => Some(maker),
        Err(_) => None,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("SO_PEERCRED failed: {0}")]
    PeerCred(Errno),
    #[error("SO_PEERGROUPS failed: {0}")]
    PeerGroups(Errno),
}

pub fn peer_of(socket: BorrowedFd<'_>) -> Result<Peer, IdentityError> {
    let cred = getsockopt(&socket, PeerCredentials).map_err(IdentityError::PeerCred)?;
    let pid = cred.pid();
    let groups = peer_groups(socket).map_err(IdentityError::PeerGroups)?;
    let maker = || accountable(cred.uid(), pid);
    let (pidfd, (exe, unit), maker) = match peer_pidfd(socket) {
        PidfdLookup::Pinned(pidfd) => {
            let exe = executable(pid);
            let unit = systemd_unit(pid);
            let maker = maker();
            // Only trust what we read if the process is still the one the
            // pidfd names; otherwise the pid may already be someone else's.
            let read = if process_alive(pidfd.as_fd()) {
                ((exe, unit), maker)
            } else {
                ((None, None), None)
            };
            (Some(pidfd), read.0, read.1)
        }
        // A kernel without SO_PEERPIDFD (before 6.5): /proc is the best
        // there is, and a pid reused in between could lend the client
        // another process's exe and unit (docs/policy.md says so).
        PidfdLookup::Unsupported => (None, (executable(pid), systemd_unit(pid)), maker()),
        // The kernel has pidfds but gave none: the peer has exited (it
        // may have passed its socket on), so its pid may be anyone's; or
        // the daemon is short of fds or memory, and cannot pin it either.
        // The daemon short of fds or memory: the peer is likely there, but
        // nothing /proc says of it can be pinned, its namespace included.
        // It counts in the shared count: counted as its uid, a subordinate
        // uid would be a user of its own whenever the daemon runs short.
        PidfdLookup::Failed(errno @ (Errno::EMFILE | Errno::ENFILE | Errno::ENOMEM)) => {
            tracing::warn!(pid, error = %errno, "cannot pin a connecting peer with a pidfd; rules naming an exe or a unit will not match it, and it counts with every peer not identified");
            (None, (None, None), None)
        }
        // Gone (ESRCH, EINVAL or ENOENT, depending on the kernel): nothing
        // it says of itself through /proc can be trusted, its namespace
        // included, and it counts in the shared count.
        PidfdLookup::Failed(_) => (None, (None, None), None),
    };
    Ok(Peer {
        accountable_uid: maker.unwrap_or(UNACCOUNTED_UID),
        identity: Identity {
            uid: cred.uid(),
            gid: cred.gid(),
            groups,
            exe,
            unit,
        },
        pid,
        pidfd,
    })
}

/// The peer's supplementary groups. Policy rules match on them, so a peer
/// whose groups cannot be read is refused rather than served as if it had
/// none (it would escape every rule written for one of its groups).
fn peer_groups(socket: BorrowedFd<'_>) -> Result<Vec<u32>, Errno> {
    const GID: usize = std::mem::size_of::<libc::gid_t>();
    // Most processes have a handful; the kernel says how many more
    // (ERANGE, with the size it needs) when they do not fit.
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = (groups.len() * GID) as libc::socklen_t;
        // SAFETY: `groups` is a writable buffer of `len` bytes that
        // outlives the call; the kernel writes at most `len` bytes and
        // updates `len`.
        let rc = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let wanted = len as usize / GID;
        match Errno::result(rc) {
            Ok(_) => {
                groups.truncate(wanted);
                return Ok(groups);
            }
            // The groups are the peer's credentials at connect time, so
            // the size the kernel asks for does not change between tries.
            Err(Errno::ERANGE) if wanted > groups.len() => groups.resize(wanted, 0),
            // A kernel before 4.13 has no SO_PEERGROUPS for anyone: rules
            // can then only match the primary gid (docs/policy.md).
            Err(Errno::ENOPROTOOPT) => return Ok(Vec::new()),
            Err(errno) => return Err(errno),
        }
    }
}

/// The peer's executable, for a peer in the host's mount and user
/// namespaces only. The link in `/proc` names the file as the client's own
/// mount namespace sees it, where any user may bind-mount its own program
/// over `/usr/bin/weston` (`unshare -Urm`); and in a user namespace of its
/// own a process may point its exe link at any file it can open
/// (`PR_SET_MM_MAP`, with the capability it has there), without leaving
/// the host's mount namespace. No process returns to the host's user
/// namespace once out of it. Looking the path up to compare files would
/// reach whatever file system the client chose, a FUSE server of its own
/// among them, which could leave the broker's one thread waiting for
/// good; reading links asks no file system anything. The exe is read
/// first: namespaces joined after it was read do not excuse it.
fn executable(pid: i32) -> Option<PathBuf> {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    let host = host_namespaces()?;
    let theirs = namespaces_of(&pid.to_string())?;
    (theirs == *host).then_some(exe)
}

/// A process's mount and user namespaces, by their links.
fn namespaces_of(pid: &str) -> Option<(PathBuf, PathBuf)> {
    Some((
        std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok()?,
        std::fs::read_link(format!("/proc/{pid}/ns/user")).ok()?,
    ))
}

/// PID 1's namespaces (the daemon's own mount namespace may be private:
/// the unit's `PrivateMounts=`), or the daemon's where PID 1's cannot be
/// read (a user daemon; said once, since `exe` rules then match only
/// clients in the daemon's own namespaces).
fn host_namespaces() -> Option<&'static (PathBuf, PathBuf)> {
    static HOST: std::sync::OnceLock<Option<(PathBuf, PathBuf)>> = std::sync::OnceLock::new();
    HOST.get_or_init(|| {
        namespaces_of("1").or_else(|| {
            tracing::warn!(
                "cannot read PID 1's namespaces (no CAP_SYS_PTRACE?): exe rules match only clients in the daemon's own mount and user namespaces"
            );
            namespaces_of("self")
        })
    })
    .as_ref()
}

/// What `SO_PEERPIDFD` gave.
enum PidfdLookup {
    Pinned(OwnedFd),
    /// The kernel has no such option.
    Unsupported,
    /// It has, and gave none (the peer has exited, or we are out of fds).
    Failed(Errno),
}

fn peer_pidfd(socket: BorrowedFd<'_>) -> PidfdLookup {
    let mut fd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `fd` is a writable c_int and `len` its size; on success the
    // kernel stores a new pidfd (O_CLOEXEC) that we then own.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            (&mut fd as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return match Errno::last() {
            Errno::ENOPROTOOPT => PidfdLookup::Unsupported,
            errno => PidfdLookup::Failed(errno),
        };
    }
    if fd < 0 {
        return PidfdLookup::Failed(Errno::EBADF);
    }
    // SAFETY: the kernel just created `fd` for us; nothing else owns it.
    PidfdLookup::Pinned(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A pidfd of a process that has exited polls readable.
fn process_alive(pidfd: BorrowedFd<'_>) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(pidfd, PollFlags::POLLIN)];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(0))
}

/// The systemd unit from the unified cgroup path, e.g. `camera.service`.
fn systemd_unit(pid: i32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    unit_from_cgroup(&text)
}

pub fn unit_from_cgroup(text: &str) -> Option<String> {
    let path = text
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .or_else(|| {
            text.lines()
                .find_map(|l| l.split_once(":name=systemd:").map(|(_, p)| p))
        })?;
    path.rsplit('/')
        .find(|part| part.ends_with(".service") || part.ends_with(".scope"))
        .map(str::to_owned)
}

/// The identity's executable as the views and logs show it, as names are
/// shown ([`crate::text::shown`]): any user may put a terminal control or
/// a right-to-left override in the name of a program it runs. Policy
/// matches the path as it is (`Identity::exe`), never this.
pub fn exe_display(exe: &Option<PathBuf>) -> String {
    exe.as_ref()
        .map(|p| crate::text::shown(&p.display().to_string()))
        .unwrap_or_default()
}

/// The identity's systemd unit as [`exe_display`] shows the exe: a user
/// names the scopes in the cgroup tree delegated to it as it likes.
pub fn unit_display(unit: &Option<String>) -> String {
    unit.as_deref().map(crate::text::shown).unwrap_or_default()
}

/// Only the accountable uid (see [`Peer::accountable_uid`]) of a
/// connection's peer, for one not identified in full (a refusal at
/// accept).
/// Pinned as [`peer_of`] pins it: a peer gone before it was pinned may
/// have passed its socket on, and its pid, and so its namespace, may be
/// anyone's by now.
pub fn peer_uid(conn: BorrowedFd<'_>) -> u32 {
    let Ok(cred) = getsockopt(&conn, PeerCredentials) else {
        return UNACCOUNTED_UID;
    };
    let maker = match peer_pidfd(conn) {
        PidfdLookup::Pinned(pidfd) => {
            let maker = accountable(cred.uid(), cred.pid());
            maker.filter(|_| process_alive(pidfd.as_fd()))
        }
        PidfdLookup::Unsupported => accountable(cred.uid(), cred.pid()),
        PidfdLookup::Failed(_) => None,
    };
    maker.unwrap_or(UNACCOUNTED_UID)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

    #[test]
    fn unit_is_read_from_the_unified_hierarchy() {
        assert_eq!(
            unit_from_cgroup("0::/system.slice/camera.service\n").as_deref(),
            Some("camera.service")
        );
        assert_eq!(
            unit_from_cgroup("0::/user.slice/user-1000.slice/user@1000.service/app.slice/app-gnome-foo-123.scope\n")
                .as_deref(),
            Some("app-gnome-foo-123.scope")
        );
        assert_eq!(unit_from_cgroup("0::/\n"), None);
    }

    /// Any user may name its program or, in its delegated cgroup tree,
    /// its scope with terminal controls or a right-to-left override: the
    /// views and logs show them as names are shown.
    #[test]
    fn exe_and_unit_are_shown_without_controls_or_reordering() {
        let exe = Some(PathBuf::from("/tmp/x\u{9b}2J\u{202e}gpj.exe"));
        let shown = exe_display(&exe);
        assert!(
            !shown.chars().any(crate::text::is_hidden_control),
            "{shown:?}"
        );
        assert_eq!(shown, "/tmp/x\u{fffd}2J\u{fffd}gpj.exe");
        let unit = unit_from_cgroup(
            "0::/user.slice/user-1000.slice/user@1000.service/app.slice/a\u{1b}[2J\u{2066}b.scope\n",
        );
        assert_eq!(
            unit.as_deref(),
            Some("a\u{1b}[2J\u{2066}b.scope"),
            "policy sees it as it is"
        );
        assert_eq!(unit_display(&unit), "a\u{fffd}[2J\u{fffd}b.scope");
        assert_eq!(exe_display(&None), "");
        assert_eq!(unit_display(&None), "");
    }

    #[test]
    fn peer_of_a_socketpair_is_ourselves() {
        let (a, _b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .expect("socketpair");
        let peer = peer_of(a.as_fd()).expect("peer");
        assert_eq!(peer.pid, std::process::id() as i32);
        assert_eq!(peer.identity.uid, nix::unistd::getuid().as_raw());
        assert_eq!(
            peer.identity.exe.as_deref(),
            std::env::current_exe().ok().as_deref()
        );
    }
}
