//! Where the broker's socket lives.
//!
//! One rule for daemon and clients: `$DMABROKER_SOCKET` wins; the system
//! service uses `/run/dmabroker/socket`; a per-user daemon uses
//! `$XDG_RUNTIME_DIR/dmabroker/socket`.

use std::path::PathBuf;

pub const ENV_SOCKET: &str = "DMABROKER_SOCKET";
pub const SYSTEM_SOCKET: &str = "/run/dmabroker/socket";

/// The user-mode path: under `$XDG_RUNTIME_DIR`, or, on a machine without a
/// login session (CI, containers), a per-uid folder in /tmp that the daemon
/// creates with mode 0700.
pub fn user_socket() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|dir| !dir.is_empty()) {
        Some(dir) => PathBuf::from(dir).join("dmabroker").join("socket"),
        None => PathBuf::from(format!(
            "/tmp/dmabroker-{}/socket",
            nix::unistd::getuid().as_raw()
        )),
    }
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
/// one is listening, else the system service.
pub fn client_socket() -> PathBuf {
    if let Some(path) = std::env::var_os(ENV_SOCKET).filter(|p| !p.is_empty()) {
        return PathBuf::from(path);
    }
    let user = user_socket();
    if user.exists() {
        user
    } else {
        PathBuf::from(SYSTEM_SOCKET)
    }
}
