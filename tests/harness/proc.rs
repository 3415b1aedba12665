//! Facts about processes read from /proc.

use std::time::{Duration, Instant};

/// Open fds of a process.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Open fds of a process that are not a connection's (its socket, or the
/// pidfd of its peer): what a buffer, a fence or a file a client sent
/// would add. Connections just closed linger on a closing thread for as
/// long as the scheduler makes it wait, which says nothing about leaks.
pub fn non_connection_fd_count(pid: u32) -> usize {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return 0;
    };
    dir.filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter(|target| {
            let target = target.to_string_lossy();
            !target.starts_with("socket:") && target != "anon_inode:[pidfd]"
        })
        .count()
}

/// Waits until `pid`'s fd count is back at `baseline`; returns the last count.
/// Releases happen asynchronously (a hang-up is noticed by the event loop),
/// so give them a moment rather than sampling once.
pub fn wait_fd_count(pid: u32, baseline: usize, timeout: Duration) -> usize {
    let deadline = Instant::now() + timeout;
    loop {
        let now = fd_count(pid);
        if now == baseline || Instant::now() >= deadline {
            return now;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The fd count once it has been stable for 100 ms: the baseline leaks are
/// measured against (a notify datagram or a connection being torn down
/// come and go).
pub fn stable_fd_count(pid: u32) -> usize {
    let mut last = fd_count(pid);
    let mut stable_since = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(5);
    while stable_since.elapsed() < Duration::from_millis(100) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
        let now = fd_count(pid);
        if now != last {
            last = now;
            stable_since = Instant::now();
        }
    }
    last
}

/// Resident set size in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// The `key: value` lines of /proc/PID/fdinfo/FD.
pub fn fdinfo(pid: u32, fd: i32) -> std::collections::HashMap<String, String> {
    std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// The CPUs the calling thread may run on, in ascending order.
pub fn allowed_cpus() -> Vec<usize> {
    use nix::sched::{sched_getaffinity, CpuSet};
    let allowed =
        sched_getaffinity(nix::unistd::Pid::from_raw(0)).expect("sched_getaffinity of this thread");
    (0..CpuSet::count())
        .filter(|&cpu| allowed.is_set(cpu).unwrap_or(false))
        .collect()
}

/// Sets the soft limit on open fds of process `pid` (`prlimit`), to make
/// its next `accept` or `dup` fail on demand.
pub fn limit_fds(pid: u32, soft: usize) {
    let status = std::process::Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={soft}:"))
        .status()
        .expect("run prlimit");
    assert!(status.success(), "prlimit --nofile={soft}");
}

/// The `how_many` lowest fd numbers `pid` has free: a limit at the first
/// leaves it none, at the second one, and so on.
pub fn free_fds(pid: u32, how_many: usize) -> Vec<usize> {
    let open: std::collections::BTreeSet<usize> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("/proc/PID/fd")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    (0..)
        .filter(|fd| !open.contains(fd))
        .take(how_many)
        .collect()
}

/// Waits until every thread of `pid` is stopped (state `T`): `SIGSTOP`
/// takes effect asynchronously, and a thread still running on another CPU
/// could read what the caller sends next. A thread in an uninterruptible
/// wait (`D`: a closing thread a test keeps stuck in a release) counts as
/// stopped: it stops on its way out of that wait.
pub fn wait_stopped(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let stopped = std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|tasks| {
                tasks.flatten().all(|task| {
                    std::fs::read_to_string(task.path().join("stat"))
                        .ok()
                        .and_then(|stat| {
                            let state = stat.rsplit_once(')')?.1.split_whitespace().next()?;
                            Some(matches!(state, "T" | "t" | "D"))
                        })
                        .unwrap_or(true)
                })
            })
            .unwrap_or(false);
        if stopped {
            return;
        }
        assert!(Instant::now() < deadline, "process {pid} did not stop");
        std::thread::sleep(Duration::from_millis(1));
    }
}
