//! Where the broker's socket lives.
//!
//! One rule for daemon and clients: `$DMABROKER_SOCKET` wins; the system
//! service uses `/run/dmabroker/socket`; a per-user daemon uses
//! `$XDG_RUNTIME_DIR/dmabroker/socket`.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

pub const ENV_SOCKET: &str = "DMABROKER_SOCKET";
pub const SYSTEM_SOCKET: &str = "/run/dmabroker/socket";

/// The user-mode path: under `$XDG_RUNTIME_DIR`, or, on a machine without a
/// login session (CI, containers), a per-uid folder in /tmp that the daemon
/// creates with mode 0700 (see [`tmp_dir_problem`]).
pub fn user_socket() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|dir| !dir.is_empty()) {
        Some(dir) => PathBuf::from(dir).join("dmabroker").join("socket"),
        None => tmp_dir(nix::unistd::getuid().as_raw()).join("socket"),
    }
}

/// The per-uid folder in /tmp for the user-mode socket.
fn tmp_dir(uid: u32) -> PathBuf {
    PathBuf::from(format!("/tmp/dmabroker-{uid}"))
}

/// Whether `path` is in this uid's /tmp folder (see [`tmp_dir_problem`]).
pub fn in_tmp_dir(path: &Path) -> bool {
    path.parent() == Some(tmp_dir(nix::unistd::getuid().as_raw()).as_path())
}

/// Why the /tmp folder `dir` must not be trusted with `uid`'s socket, if
/// it must not. Anyone may create `/tmp/dmabroker-UID` before that user
/// does: a folder another uid owns, or one others may write to, could hold
/// a socket that is not the user's broker (it would receive every buffer
/// the user's programs adopt, and hand them memory of its choosing).
pub fn tmp_dir_problem(dir: &Path, uid: u32) -> Option<String> {
    let meta = match std::fs::symlink_metadata(dir) {
        Ok(meta) => meta,
        Err(err) => return Some(format!("cannot inspect {}: {err}", dir.display())),
    };
    if !meta.file_type().is_dir() {
        return Some(format!("{} is not a folder", dir.display()));
    }
    if meta.uid() != uid {
        return Some(format!(
            "{} belongs to uid {}, not {uid}",
            dir.display(),
            meta.uid()
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Some(format!(
            "{} may be written by others (mode {:o})",
            dir.display(),
            meta.mode() & 0o7777
        ));
    }
    None
}

/// The daemon's default: system path when it runs as the system service.
pub fn daemon_socket(system_service: bool) -> PathBuf {
    if let Some(path) = std::env::var_os(ENV_SOCKET).filter(|p| !p.is_empty()) {
        return PathBuf::from(path);
    }
    if system_service {
        return PathBuf::from(SYSTEM_SOCKET);
    }
    user_socket()
}

/// The client's default: the environment, else a per-user daemon's socket if
/// one is listening (in /tmp only in a folder that is the user's own), else
/// the system service.
pub fn client_socket() -> PathBuf {
    if let Some(path) = std::env::var_os(ENV_SOCKET).filter(|p| !p.is_empty()) {
        return PathBuf::from(path);
    }
    let user = user_socket();
    let trusted = !in_tmp_dir(&user)
        || user
            .parent()
            .is_some_and(|dir| tmp_dir_problem(dir, nix::unistd::getuid().as_raw()).is_none());
    if trusted && user.exists() {
        user
    } else {
        PathBuf::from(SYSTEM_SOCKET)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A fresh folder under the system's temporary folder, removed after.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(tag: &str) -> Scratch {
            let dir =
                std::env::temp_dir().join(format!("dmabroker-paths-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir(&dir).expect("create");
            Scratch(dir)
        }

        fn chmod(&self, mode: u32) {
            std::fs::set_permissions(&self.0, std::fs::Permissions::from_mode(mode))
                .expect("chmod");
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn me() -> u32 {
        nix::unistd::getuid().as_raw()
    }

    #[test]
    fn the_users_own_private_folder_is_trusted() {
        let dir = Scratch::new("private");
        dir.chmod(0o700);
        assert_eq!(tmp_dir_problem(&dir.0, me()), None);
        dir.chmod(0o755);
        assert_eq!(tmp_dir_problem(&dir.0, me()), None, "readable is fine");
    }

    #[test]
    fn a_folder_others_may_write_is_not() {
        let dir = Scratch::new("open");
        dir.chmod(0o777);
        let why = tmp_dir_problem(&dir.0, me()).expect("refused");
        assert!(why.contains("may be written by others"), "{why}");
        dir.chmod(0o720);
        assert!(tmp_dir_problem(&dir.0, me()).is_some(), "group-writable");
    }

    #[test]
    fn another_uids_folder_is_not() {
        let dir = Scratch::new("foreign");
        dir.chmod(0o700);
        let why = tmp_dir_problem(&dir.0, me() + 1).expect("refused");
        assert!(why.contains("belongs to uid"), "{why}");
    }

    #[test]
    fn a_symlink_or_a_missing_folder_is_not() {
        let dir = Scratch::new("link");
        dir.chmod(0o700);
        let link = dir.0.join("link");
        std::os::unix::fs::symlink(&dir.0, &link).expect("symlink");
        assert!(tmp_dir_problem(&link, me()).is_some(), "a symlink");
        assert!(tmp_dir_problem(&dir.0.join("missing"), me()).is_some());
    }
}
