//! Command-line configuration of `dmabrokerd`.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// dmabroker daemon: allocates dma-bufs, passes their fds to clients and
/// arbitrates CPU/device access with reader-writer fences.
#[derive(Clone, Debug, Parser)]
#[command(name = "dmabrokerd", version)]
pub struct Config {
    /// Socket to serve. Default: $DMABROKER_SOCKET, else
    /// /run/dmabroker/socket (system service), else
    /// $XDG_RUNTIME_DIR/dmabroker/socket.
    #[arg(long)]
    pub socket: Option<PathBuf>,

    /// Run as the system service (system socket and policy locations).
    /// Default: on when started by systemd as root.
    #[arg(long)]
    pub system: bool,

    /// Policy file(s), read in order, instead of the standard locations.
    #[arg(long = "policy", value_name = "PATH")]
    pub policy: Vec<PathBuf>,

    /// Heap fallback order by name (e.g. `system,udmabuf,memfd`). Default:
    /// every dma-heap found, then udmabuf, then memfd.
    #[arg(long, value_delimiter = ',')]
    pub heaps: Option<Vec<String>>,

    /// Where to look for dma-heap nodes.
    #[arg(long, default_value = "/dev/dma_heap")]
    pub dma_heap_dir: PathBuf,

    /// The udmabuf device.
    #[arg(long, default_value = "/dev/udmabuf")]
    pub udmabuf: PathBuf,

    /// Permissions of the socket file (octal). Default: 0660 for the system
    /// service (the socket's group decides who may connect), 0600 in user
    /// mode.
    #[arg(long, value_parser = parse_mode)]
    pub socket_mode: Option<u32>,

    /// After a restart, how long holds taken back from the fd store wait
    /// for their clients to re-attach (e.g. `30s`, `500ms`).
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub reattach_grace: std::time::Duration,

    /// Most client connections served at once.
    #[arg(long, default_value_t = 4096)]
    pub max_connections: usize,

    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// D-Bus introspection: `system`, `session`, `none` or a bus address.
    /// Default: the system bus for the system service, else the session
    /// bus. An unreachable bus never stops the daemon.
    #[arg(long, value_name = "system|session|none|ADDRESS")]
    pub dbus: Option<String>,
}

impl Config {
    /// System mode when asked, or when systemd starts us as root.
    pub fn system_mode(&self) -> bool {
        self.system
            || (nix::unistd::geteuid().is_root() && std::env::var_os("INVOCATION_ID").is_some())
    }

    pub fn socket_path(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(|| dmabroker_ipc::paths::daemon_socket(self.system_mode()))
    }
}

fn parse_mode(text: &str) -> Result<u32, String> {
    u32::from_str_radix(text.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("'{text}' is not an octal file mode like 0660"))
}

fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    dmabroker_policy::parse_duration(text)?
        .ok_or_else(|| format!("'{text}' is not a duration like 30s"))
}
