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
/// or directly in one root made that maps single uids only (a setuid
/// sandbox's, a unit's `PrivateUsers=`), where the kernel's uids are the
/// host's own users and no range is handed out.
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
            0 if depth == 0 && maps_single_uids(pid)? => None,
            // Proc inode numbers of namespaces fit 32 bits, and sit at
            // 0xF0000000 and above (`FIRST_CONTAINER_ID`), where no uid
            // is given out.
            0 => Some(Maker::Container(identity_of_fd(&ns)?.1 as u32)),
            owner => Some(Maker::User(owner)),
        });
    }
    Ok(None)
}

/// Whether the user namespace process `pid` is in maps each of its uids
/// on its own (every line of `uid_map` one uid long), not a range.
fn maps_single_uids(pid: i32) -> Result<bool, Errno> {
    let map = std::fs::read_to_string(format!("/proc/{pid}/uid_map"))
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
    Ok(single_uid_lines(&map))
}

/// See [`maps_single_uids`]; an unreadable line counts as a range.
fn single_uid_lines(uid_map: &str) -> bool {
    uid_map
        .lines()
        .filter(|line| !line.trim().is_empty())
        .all(|line| line.split_whitespace().nth(2) == Some("1"))
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
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipping: needs root to run a process as another user");
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
                eprintln!("skipping: cannot run setpriv: {err}");
                return None;
            }
        };
        let pid = child.id() as i32;
        let ours = identity_of("/proc/self/ns/user").expect("our namespace");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut maker = None;
        while std::time::Instant::now() < deadline {
            // Each exec of the chain may still be on its way to sleep.
            let cmdline =
                std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if cmdline.starts_with("sleep") {
                assert_ne!(
                    identity_of(&format!("/proc/{pid}/ns/user")).ok(),
                    Some(ours)
                );
                maker = Some(owner_below_ours(pid));
                break;
            }
            if child.try_wait().ok().flatten().is_some() {
                eprintln!("skipping: user namespaces unavailable to uid {uid} here");
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
        maker
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

    #[test]
    fn uid_maps_of_single_uids_and_of_ranges() {
        assert!(single_uid_lines("         0          0          1\n"));
        assert!(single_uid_lines("0 0 1\n1000 1000 1\n"));
        assert!(!single_uid_lines("0 100000 65536\n"));
        assert!(!single_uid_lines("0 0 1\n1 100000 65535\n"));
        assert!(!single_uid_lines("0 0\n"));
    }

    /// Namespaces root made (a container's) answer to the container, not
    /// to root, whom every container would share.
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
