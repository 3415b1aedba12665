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
    /// $XDG_RUNTIME_DIR/dmabroker/socket, else (no runtime directory)
    /// /tmp/dmabroker-$UID/socket.
    #[arg(long)]
    pub socket: Option<PathBuf>,

    /// Run as the system service (system socket and system bus).
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

    /// Group of the socket file (a name or a numeric gid), for a socket the
    /// daemon binds itself: a system daemon run by hand otherwise has
    /// root's group on it, and its 0660 lets nobody but root in. The
    /// socket unit sets its own `SocketGroup=`.
    #[arg(long, value_parser = parse_group)]
    pub socket_group: Option<u32>,

    /// After a restart, how long holds taken back from the fd store wait
    /// for their clients to re-attach (e.g. `30s`, `500ms`).
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub reattach_grace: std::time::Duration,

    /// How long a new connection may take to say hello before it is
    /// closed: one that never does would hold its place under the
    /// connection cap (and its uid's) for good (e.g. `10s`, `500ms`).
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub hello_timeout: std::time::Duration,

    /// The unit's `FileDescriptorStoreMax=`, for a service manager that
    /// does not tell (systemd before 254 sets no `$FDSTORE`). The broker
    /// keeps two of these slots for the buffer table's record and refuses a
    /// buffer beyond the rest: systemd would silently close its fd, and the
    /// next restart would lose it. `$FDSTORE` overrides this.
    #[arg(long, default_value_t = 16384, value_name = "N")]
    pub fd_store_max: usize,

    /// Most client connections served at once. Default: 4096, or fewer
    /// when the fd limit is low: each connection may have 64 fds its client
    /// has not read, and all of them must fit in half the fd limit, or
    /// clients that never read could stop every fd reaching anyone. A
    /// number given here is served even when they do not fit (logged).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: Option<u32>,

    /// Log lines as text, or as one JSON object per line for a log
    /// collector. Ignored when stderr is the journal's stream (under
    /// systemd): logs then go to the journal natively.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// D-Bus introspection: `system`, `session`, `none` or a bus address.
    /// Default: the system bus for the system service, else the session
    /// bus. An unreachable bus never stops the daemon.
    #[arg(long, value_name = "system|session|none|ADDRESS")]
    pub dbus: Option<String>,

    /// CPUs for the D-Bus thread (e.g. `3` or `2-3,6`), to keep
    /// introspection off the cores the data path runs on. Default: the
    /// daemon's own CPUs. A list the kernel refuses is logged and ignored.
    #[arg(long, value_name = "LIST", value_parser = parse_cpu_list)]
    pub dbus_cpus: Option<CpuList>,
}

/// A set of CPU numbers as `taskset -c` and systemd's `CPUAffinity=`
/// write them: `0`, `2-3,6`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuList(Vec<usize>);

impl CpuList {
    pub fn cpus(&self) -> &[usize] {
        &self.0
    }
}

impl std::fmt::Display for CpuList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text: Vec<String> = self.0.iter().map(usize::to_string).collect();
        f.write_str(&text.join(","))
    }
}

fn parse_cpu_list(text: &str) -> Result<CpuList, String> {
    let bad = || format!("'{text}' is not a CPU list like 3 or 2-3,6");
    let mut cpus = Vec::new();
    for part in text.split(',') {
        let (first, last) = match part.split_once('-') {
            Some((first, last)) => (first, last),
            None => (part, part),
        };
        let first: usize = first.trim().parse().map_err(|_| bad())?;
        let last: usize = last.trim().parse().map_err(|_| bad())?;
        if first > last {
            return Err(bad());
        }
        if last >= nix::sched::CpuSet::count() {
            return Err(format!(
                "CPU {last} in '{text}' is beyond the kernel's CPU set"
            ));
        }
        cpus.extend(first..=last);
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(CpuList(cpus))
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

fn parse_group(text: &str) -> Result<u32, String> {
    if let Ok(gid) = text.parse::<u32>() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(text) {
        Ok(Some(group)) => Ok(group.gid.as_raw()),
        Ok(None) => Err(format!("no group is named '{text}'")),
        Err(err) => Err(format!("cannot look group '{text}' up: {err}")),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_are_read_as_taskset_writes_them() {
        assert_eq!(parse_cpu_list("3").map(|l| l.0), Ok(vec![3]));
        assert_eq!(
            parse_cpu_list("6,2-3,3").map(|l| l.0),
            Ok(vec![2, 3, 6]),
            "sorted, ranges expanded, duplicates once"
        );
        assert_eq!(
            parse_cpu_list("0-1").map(|l| l.to_string()),
            Ok("0,1".into())
        );
    }

    #[test]
    fn bad_cpu_lists_are_refused_with_the_reason() {
        for bad in ["", "x", "3-1", "1,,2", "-1", "1-"] {
            let err = parse_cpu_list(bad).expect_err(bad);
            assert!(err.contains("is not a CPU list"), "{bad}: {err}");
        }
        let err = parse_cpu_list("1000000").expect_err("huge");
        assert!(err.contains("beyond the kernel's CPU set"), "{err}");
    }
}
