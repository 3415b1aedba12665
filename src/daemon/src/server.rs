//! The listening socket: created (or inherited), accepted from, removed on
//! shutdown.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::errno::Errno;
use nix::sys::socket::{
    accept4, bind, connect, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
};

use crate::broker::Broker;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot create {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("another dmabrokerd is already serving {0}")]
    InUse(PathBuf),
    #[error("cannot {op} socket {path}: {source}")]
    Socket {
        op: &'static str,
        path: PathBuf,
        source: Errno,
    },
    #[error("cannot register the listening socket: {0}")]
    Reactor(std::io::Error),
}

/// A listening SOCK_SEQPACKET socket and the path to remove at exit (none
/// when it was inherited from systemd, which owns the path).
#[derive(Debug)]
pub struct Listener {
    pub fd: OwnedFd,
    pub path: Option<PathBuf>,
}

impl Listener {
    /// Binds `path`, replacing a stale socket file left by a crash but never
    /// one a live daemon is serving.
    pub fn bind(path: &Path, system: bool, mode: Option<u32>) -> Result<Listener, ServerError> {
        let sock_err = |op, source| ServerError::Socket {
            op,
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent() {
            if !dir.exists() {
                std::fs::create_dir_all(dir).map_err(|source| ServerError::CreateDir {
                    path: dir.to_owned(),
                    source,
                })?;
                let mode = if system { 0o755 } else { 0o700 };
                let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode));
            }
        }
        let addr = UnixAddr::new(path).map_err(|e| sock_err("address", e))?;
        if path.exists() {
            let probe = new_socket().map_err(|e| sock_err("create", e))?;
            match connect(probe.as_raw_fd(), &addr) {
                Ok(()) => return Err(ServerError::InUse(path.to_owned())),
                Err(_) => {
                    let _ = std::fs::remove_file(path);
                }
            }
        }
        let fd = new_socket().map_err(|e| sock_err("create", e))?;
        bind(fd.as_raw_fd(), &addr).map_err(|e| sock_err("bind", e))?;
        let mode = mode.unwrap_or(if system { 0o660 } else { 0o600 });
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode));
        listen(&fd, Backlog::new(512).unwrap_or(Backlog::MAXCONN))
            .map_err(|e| sock_err("listen", e))?;
        Ok(Listener {
            fd,
            path: Some(path.to_owned()),
        })
    }

    pub fn remove_path(&self) {
        if let Some(path) = &self.path {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn new_socket() -> Result<OwnedFd, Errno> {
    socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
}

/// Accepts connections forever, one task each. Connections over the cap
/// are told `Busy` and closed.
pub async fn accept_loop(broker: Arc<Broker>, listener: OwnedFd) -> Result<(), ServerError> {
    let _ = nix::fcntl::fcntl(
        listener.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    );
    let listener = crate::reactor::register(listener, tokio::io::Interest::READABLE)
        .map_err(ServerError::Reactor)?;
    loop {
        let mut guard = match listener.readable().await {
            Ok(guard) => guard,
            Err(err) => return Err(ServerError::Reactor(err)),
        };
        loop {
            match accept4(
                listener.get_ref().as_raw_fd(),
                SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            ) {
                Ok(raw) => {
                    // SAFETY: accept4 just returned this new fd; we own it.
                    let conn = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
                    let (count, max) = {
                        let state = broker.lock();
                        (state.connection_count(), state.limits.max_connections)
                    };
                    if count >= max {
                        refuse_busy(conn.as_fd(), max);
                        continue;
                    }
                    tokio::spawn(crate::connection::serve(Arc::clone(&broker), conn));
                }
                Err(Errno::EAGAIN) => {
                    guard.clear_ready();
                    break;
                }
                Err(Errno::EINTR | Errno::ECONNABORTED) => continue,
                Err(err @ (Errno::EMFILE | Errno::ENFILE)) => {
                    tracing::error!(error = %err, "out of file descriptors; pausing accept");
                    guard.clear_ready();
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    break;
                }
                Err(err) => {
                    tracing::warn!(error = %err, "accept failed");
                    guard.clear_ready();
                    break;
                }
            }
        }
    }
}

fn refuse_busy(conn: std::os::fd::BorrowedFd<'_>, max: usize) {
    use dmabroker_ipc::{codec, ErrorCode, Reply, ServerMessage, WireError};
    let message = ServerMessage::Reply(Reply {
        id: 0,
        fds: 0,
        result: Err(WireError::new(
            ErrorCode::Busy,
            format!("the broker serves at most {max} connections"),
        )),
    });
    if let Ok(bytes) = codec::encode_server_message(&message) {
        let _ = dmabroker_ipc::fdpass::send_message(conn, &bytes, &[], true);
    }
    tracing::warn!(max, "connection refused: at the connection limit");
}
