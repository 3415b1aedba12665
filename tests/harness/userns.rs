//! Clients in a user namespace: how a user with a subordinate uid range
//! (`/etc/subuid`, `newuidmap`) shows up to the daemon as uids of that
//! range. Mapped here by root without `newuidmap`, which the build
//! machines lack: the child makes the namespace as its maker, and the test
//! writes its maps, as `newuidmap` would.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use crate::Scripted;

/// The first uid (and gid) of the host's that [`spawn_in_user_namespace`]
/// maps uid 0 of the namespace to.
pub const OUTER_BASE: u32 = 300_000;
/// Uids the namespace maps.
const RANGE: u32 = 1000;

/// A testclient in a user namespace of its own, made by `maker` (a uid of
/// the host's), as the namespace's uid and gid `inner` (below 1,000): to
/// the daemon a process of uid `OUTER_BASE + inner`.
pub fn spawn_in_user_namespace(socket: &Path, maker: u32, inner: u32, extra: &[&str]) -> Scripted {
    let mut cmd = Command::new(crate::daemon::binary("dmabroker-testclient"));
    let maps = in_user_namespace(&mut cmd, maker, inner);
    let client = Scripted::spawn_wrapped(cmd, socket, extra);
    maps.written();
    client
}

/// Makes `cmd` run as described for [`spawn_in_user_namespace`]. The maps
/// are written once the child has made its namespace (while the caller is
/// inside `spawn`, which returns only after the child's exec): call
/// [`Maps::written`] after.
pub fn in_user_namespace(cmd: &mut Command, maker: u32, inner: u32) -> Maps {
    mapped_namespace(cmd, maker, inner, RANGE)
}

/// Makes `cmd` run as uid (and gid) `inner` in a user namespace of its own
/// that maps `inner` alone to itself, made by root: a setuid sandbox's or
/// a unit's `PrivateUsers=`. Call [`Maps::written`] after spawning.
pub fn in_single_uid_namespace(cmd: &mut Command, inner: u32) -> Maps {
    mapped_namespace(cmd, 0, inner, 1)
}

/// Makes `cmd` run as uid `inner` of the user namespace process `holder`
/// is in, inside a further namespace of its own (left unmapped, as the
/// daemon needs no map to see its uid): what a container's user does with
/// `unshare -U`.
pub fn in_namespace_made_inside(cmd: &mut Command, holder: u32, inner: u32) {
    let outer = std::fs::File::open(format!("/proc/{holder}/ns/user")).expect("holder's namespace");
    let outer: OwnedFd = outer.into();
    let outer_raw = outer.as_raw_fd();
    // SAFETY: between fork and exec, only system calls (no allocation, no
    // locks): setns, setgroups, setresgid, setresuid, unshare. The raw fd
    // is open in the child: the closure, which the child runs, owns it.
    unsafe {
        cmd.pre_exec(move || {
            let _keep = &outer;
            if libc::setns(outer_raw, libc::CLONE_NEWUSER) != 0
                || libc::setgroups(0, std::ptr::null()) != 0
                || libc::setresgid(inner, inner, inner) != 0
                || libc::setresuid(inner, inner, inner) != 0
                || libc::unshare(libc::CLONE_NEWUSER) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A namespace `maker` makes, whose uids 0 to `range` the test maps to the
/// host's from `OUTER_BASE` (from `inner` for a range of one).
fn mapped_namespace(cmd: &mut Command, maker: u32, inner: u32, range: u32) -> Maps {
    assert!(inner < RANGE);
    let (ready_r, ready_w) = pipe();
    let (mapped_r, mapped_w) = pipe();
    let (ready_w_raw, mapped_r_raw) = (ready_w.as_raw_fd(), mapped_r.as_raw_fd());
    // SAFETY: between fork and exec, only system calls (no allocation, no
    // locks): setgroups, setresgid, setresuid, unshare, getpid, write,
    // read. The two raw fds are open in the child: the parent keeps them
    // (in `Maps`) until the child has exec'd.
    unsafe {
        cmd.pre_exec(move || {
            // The maker's own, as it would be when it runs `unshare`.
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setresgid(maker, maker, maker) != 0
                || libc::setresuid(maker, maker, maker) != 0
                || libc::unshare(libc::CLONE_NEWUSER) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            let pid = libc::getpid();
            let said = libc::write(ready_w_raw, (&pid as *const libc::pid_t).cast(), 4);
            let mut answer = 0u8;
            let heard = libc::read(mapped_r_raw, (&mut answer as *mut u8).cast(), 1);
            if said != 4 || heard != 1 || answer != b'm' {
                return Err(std::io::Error::other(
                    "the namespace's maps were not written",
                ));
            }
            if libc::setresgid(inner, inner, inner) != 0
                || libc::setgroups(0, std::ptr::null()) != 0
                || libc::setresuid(inner, inner, inner) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let writer = std::thread::spawn(move || {
        let mut ready = std::fs::File::from(ready_r);
        let mut pid = [0u8; 4];
        ready.read_exact(&mut pid).expect("the child's pid");
        let pid = i32::from_ne_bytes(pid);
        let map = if range == 1 {
            format!("{inner} {} 1\n", OUTER_BASE + inner)
        } else {
            format!("0 {OUTER_BASE} {range}\n")
        };
        std::fs::write(format!("/proc/{pid}/uid_map"), &map).expect("uid_map");
        std::fs::write(format!("/proc/{pid}/gid_map"), &map).expect("gid_map");
        std::fs::File::from(mapped_w)
            .write_all(b"m")
            .expect("tell the child");
    });
    Maps {
        writer,
        _child_ends: (ready_w, mapped_r),
    }
}

/// The writing of a child's maps (see [`in_user_namespace`]).
#[derive(Debug)]
pub struct Maps {
    writer: std::thread::JoinHandle<()>,
    _child_ends: (OwnedFd, OwnedFd),
}

impl Maps {
    pub fn written(self) {
        self.writer.join().expect("the maps written");
    }
}

fn pipe() -> (OwnedFd, OwnedFd) {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe")
}
