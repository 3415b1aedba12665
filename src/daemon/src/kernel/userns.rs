//! Who made a process's user namespace: the user it answers to.
//!
//! Any user with a subordinate uid range (most have one, for rootless
//! containers) can run processes as thousands of uids through user
//! namespaces, and `SO_PEERCRED` shows each as the uid it maps to. A
//! bound kept per uid would then be a bound per subordinate uid. The owner
//! of the outermost user namespace below the daemon's (`NS_GET_OWNER_UID`,
//! Linux 4.11) is the one user behind all of them.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;

use nix::errno::Errno;

/// `_IO(NSIO, 0x2)` and `_IO(NSIO, 0x4)` from `linux/nsfs.h` (NSIO 0xb7).
const NS_GET_PARENT: libc::c_ulong = 0xb702;
const NS_GET_OWNER_UID: libc::c_ulong = 0xb704;

/// Nesting of user namespaces the kernel allows (`linux/user_namespace.h`).
const MAX_DEPTH: usize = 32;

/// Whom a process in user namespaces below the daemon's answers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Maker {
    /// A user (as the daemon's namespace sees it) made the outermost of
    /// them: every uid below it is that user's to use.
    User(u32),
    /// Root made the outermost of them with a range of uids: a
    /// container's. Named by that namespace's inode, as all of the
    /// container's uids, and whatever namespaces they make inside it,
    /// answer to the container.
    Container(u32),
}

/// Whom process `pid` answers to through its user namespaces (see
/// [`Maker`]). The outermost namespace below the daemon's decides: its
/// maker can hand out every uid below it, however deep, so a namespace
/// made inside it answers to the same. `None` when the process answers to
/// its own uid: it is in the daemon's own user namespace, or in one not
/// below it (which the kernel does not let the daemon look up through),
/// or directly in one root made for one host user (a setuid sandbox's, a
/// unit's `PrivateUsers=`), where no range is handed out. A namespace
/// made inside such a sandbox answers to the sandbox, as its map cannot
/// be read from below.
pub fn owner_below_ours(pid: i32) -> Result<Option<Maker>, Errno> {
    // The daemon's own, read once: it never changes user namespace.
    static OURS: std::sync::OnceLock<Result<(u64, u64), Errno>> = std::sync::OnceLock::new();
    let ours = (*OURS.get_or_init(|| identity_of("/proc/self/ns/user")))?;
    let path = format!("/proc/{pid}/ns/user");
    let mut ns: OwnedFd = std::fs::File::open(&path)
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?
        .into();
    if identity_of_fd(&ns)? == ours {
        return Ok(None);
    }
    for depth in 0..MAX_DEPTH {
        let parent = match parent_of(&ns) {
            Ok(parent) => parent,
            // The parent is not in the daemon's subtree.
            Err(Errno::EPERM) => return Ok(None),
            Err(errno) => return Err(errno),
        };
        if identity_of_fd(&parent)? != ours {
            ns = parent;
            continue;
        }
        // `ns` is the outermost below the daemon's.
        return Ok(match owner_of(&ns)? {
            0 if depth == 0 && maps_one_host_user(pid, &ns)? => None,
            // Proc inode numbers of namespaces fit 32 bits, and sit at
            // 0xF0000000 and above (`FIRST_CONTAINER_ID`), where no uid
            // is given out.
            0 => Some(Maker::Container(identity_of_fd(&ns)?.1 as u32)),
            owner => Some(Maker::User(owner)),
        });
    }
    // Deeper than the kernel allows: not a namespace the daemon can vouch
    // for.
    Err(Errno::ELOOP)
}

/// Whether `ns`, the user namespace process `pid` is in, maps one host
/// user (see [`one_host_user`]). `/proc/PID/uid_map` shows the map of the
/// namespace the process is in when it is read: one it moved into since
/// `ns` was opened (`unshare`, with no map yet) would pass for a sandbox.
/// A process can only move deeper, so the same namespace after the read
/// proves the map was `ns`'s.
fn maps_one_host_user(pid: i32, ns: &OwnedFd) -> Result<bool, Errno> {
    let map = std::fs::read_to_string(format!("/proc/{pid}/uid_map"))
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
    let still_there = identity_of(&format!("/proc/{pid}/ns/user"))? == identity_of_fd(ns)?;
    Ok(still_there && one_host_user(&map))
}

/// Whether a `uid_map` (as the daemon reads it: host uids second) gives
/// its namespace one host user: every line one uid long, and at most one
/// of them for a host uid other than root (root as itself, `0 0 1`, is
/// what `PrivateUsers=` adds). Root can write up to 340 lines of one uid
/// each, and whoever is root inside may become any of them. An
/// unreadable line counts as a range, an empty map as none written yet.
fn one_host_user(uid_map: &str) -> bool {
    let (mut lines, mut others) = (0, 0);
    for line in uid_map.lines().filter(|line| !line.trim().is_empty()) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields[..] {
            [_, "0", "1"] => {}
            [_, _, "1"] => others += 1,
            _ => return false,
        }
        lines += 1;
    }
    lines > 0 && others <= 1
}

/// (device, inode): what names a namespace.
fn identity_of(path: &str) -> Result<(u64, u64), Errno> {
    let meta = std::fs::metadata(path)
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
    Ok((meta.dev(), meta.ino()))
}

fn identity_of_fd(fd: &OwnedFd) -> Result<(u64, u64), Errno> {
    let stat = nix::sys::stat::fstat(fd.as_raw_fd())?;
    Ok((stat.st_dev, stat.st_ino))
}

fn parent_of(ns: &OwnedFd) -> Result<OwnedFd, Errno> {
    // SAFETY: NS_GET_PARENT takes no argument and returns a new fd (or -1),
    // which nothing else owns.
    let fd = unsafe { libc::ioctl(ns.as_raw_fd(), NS_GET_PARENT) };
    let fd = Errno::result(fd)?;
    // SAFETY: a new fd the ioctl just returned, owned here from now on.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn owner_of(ns: &OwnedFd) -> Result<u32, Errno> {
    let mut uid: libc::uid_t = 0;
    // SAFETY: NS_GET_OWNER_UID writes one uid_t to the pointer, which
    // points at `uid`, alive for the call.
    let rc = unsafe {
        libc::ioctl(
            ns.as_raw_fd(),
            NS_GET_OWNER_UID,
            &mut uid as *mut libc::uid_t,
        )
    };
    Errno::result(rc)?;
    Ok(uid)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This process is in the daemon's user namespace: nobody above it.
    #[test]
    fn a_process_in_our_namespace_has_no_owner_below_ours() {
        assert_eq!(owner_below_ours(std::process::id() as i32), Ok(None));
    }

    /// What `owner_below_ours` says of a process run in two nested user
    /// namespaces (`unshare -Ur unshare -Ur`) by `uid` (through
    /// `setpriv`); `None` where the test cannot run here.
    fn maker_of_nested_chain(uid: u32) -> Option<Result<Option<Maker>, Errno>> {
        maker_of_chain(uid, 2)
    }

    /// The same with `depth` namespaces, each made by `unshare -Ur`.
    fn maker_of_chain(uid: u32, depth: usize) -> Option<Result<Option<Maker>, Errno>> {
        in_chain(uid, depth, owner_below_ours)
    }

    /// What `look` says of the pid of a process run in `depth` nested
    /// user namespaces (each made by `unshare -Ur`) by `uid`; `None` where
    /// the test cannot run here.
    fn in_chain<T>(uid: u32, depth: usize, look: impl FnOnce(i32) -> T) -> Option<T> {
        if !nix::unistd::geteuid().is_root() {
            crate::kernel::note_skip(
                "a user-namespace test needs root to run a process as another user",
            );
            return None;
        }
        let mut args = vec![
            format!("--reuid={uid}"),
            format!("--regid={uid}"),
            "--clear-groups".to_owned(),
        ];
        for _ in 0..depth {
            args.extend(["unshare".to_owned(), "-Ur".to_owned()]);
        }
        args.extend(["sleep".to_owned(), "30".to_owned()]);
        let mut child = match std::process::Command::new("setpriv").args(&args).spawn() {
            Ok(child) => child,
            Err(err) => {
                crate::kernel::note_skip(&format!(
                    "a user-namespace test cannot run setpriv: {err}"
                ));
                return None;
            }
        };
        let pid = child.id() as i32;
        let ours = identity_of("/proc/self/ns/user").expect("our namespace");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut looked = None;
        while std::time::Instant::now() < deadline {
            // Each exec of the chain may still be on its way to sleep.
            let cmdline =
                std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if cmdline.starts_with("sleep") {
                assert_ne!(
                    identity_of(&format!("/proc/{pid}/ns/user")).ok(),
                    Some(ours)
                );
                looked = Some(look(pid));
                break;
            }
            if child.try_wait().ok().flatten().is_some() {
                crate::kernel::note_skip(&format!(
                    "user namespaces are unavailable to uid {uid} here"
                ));
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
        looked
    }

    /// A process of another user in nested user namespaces of its own
    /// answers to that user, whatever uid it has in them.
    #[test]
    fn a_process_in_nested_user_namespaces_answers_to_their_maker() {
        const ALICE: u32 = 65501;
        if let Some(maker) = maker_of_nested_chain(ALICE) {
            assert_eq!(maker, Ok(Some(Maker::User(ALICE))));
        }
    }

    /// A namespace root made that maps one uid (root's own, here) hands
    /// out no range: its process answers to its own uid, not to a
    /// container of its own, or every such sandbox a setuid helper makes
    /// for a user would be a count of its own.
    #[test]
    fn a_namespace_root_made_for_single_uids_answers_to_the_uid() {
        if let Some(maker) = maker_of_chain(0, 1) {
            assert_eq!(maker, Ok(None));
        }
    }

    /// The map is read by pid, so it is the map of whatever namespace the
    /// process is in by then: read for a namespace the process is no
    /// longer in (it made one more meanwhile), it vouches for nothing.
    #[test]
    fn a_map_read_after_the_process_moved_on_is_not_its_namespaces() {
        let checked = in_chain(0, 1, |pid| {
            let now = std::fs::File::open(format!("/proc/{pid}/ns/user"))
                .map(OwnedFd::from)
                .expect("its namespace");
            let before = std::fs::File::open("/proc/self/ns/user")
                .map(OwnedFd::from)
                .expect("ours");
            (
                maps_one_host_user(pid, &now),
                maps_one_host_user(pid, &before),
            )
        });
        if let Some((now, before)) = checked {
            assert_eq!(now, Ok(true), "its own namespace, mapping root alone");
            assert_eq!(before, Ok(false), "a namespace it has left");
        }
    }

    #[test]
    fn uid_maps_of_one_host_user_and_of_more() {
        assert!(one_host_user("         0       1000          1\n"));
        assert!(one_host_user("0 0 1\n1000 1000 1\n"));
        assert!(one_host_user("0 0 1\n"));
        assert!(!one_host_user("0 100000 65536\n"));
        assert!(!one_host_user("0 0 1\n1 100000 65535\n"));
        assert!(!one_host_user("0 100000 1\n1000 1000 1\n"));
        assert!(!one_host_user("0 0\n"));
        assert!(!one_host_user(""));
    }

    /// A namespace made inside one root made answers to the outer one (a
    /// container), not to root, whom every container would share, nor
    /// to its own maker.
    #[test]
    fn namespaces_root_made_answer_to_their_container() {
        if let Some(maker) = maker_of_nested_chain(0) {
            assert!(
                matches!(maker, Ok(Some(Maker::Container(inode))) if inode >= crate::identity::FIRST_CONTAINER_ID),
                "{maker:?}"
            );
        }
    }
}
