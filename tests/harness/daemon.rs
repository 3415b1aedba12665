//! The real `dmabrokerd`, started on a private socket for one test.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::tmp::TempDir;

/// Finds a workspace binary next to the running test executable
/// (`target/<profile>/deps/test-*` → `target/<profile>/NAME`), building it
/// if it is missing. `DMABROKER_BIN_DIR` overrides the folder.
/// `cargo bench` builds the benchmark's package, not the daemon's binary:
/// benchmarks call this first (a no-op when it is up to date) so that
/// their figures are today's code.
pub fn build_release_daemon() -> Result<(), String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--release", "--quiet", "--bin", "dmabrokerd"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .map_err(|err| format!("cannot run cargo: {err}"))?;
    if status.success() {
        Ok(())
    } else {
        Err("`cargo build --release --bin dmabrokerd` failed".into())
    }
}

pub fn binary(name: &str) -> PathBuf {
    let dir = match std::env::var_os("DMABROKER_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let exe = std::env::current_exe().expect("current_exe");
            let deps = exe.parent().expect("test exe folder");
            if deps.file_name().is_some_and(|n| n == "deps") {
                deps.parent().expect("profile folder").to_owned()
            } else {
                deps.to_owned()
            }
        }
    };
    let path = dir.join(name);
    if !path.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let release = dir.file_name().is_some_and(|n| n == "release");
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--workspace", "--bins"]);
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build");
        assert!(status.success(), "cargo build of {name} failed");
    }
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins`",
        path.display()
    );
    assert_fresh(&path);
    path
}

/// `cargo test` does not rebuild binaries of other packages: a daemon older
/// than its sources would test yesterday's code and pass wrongly. Cargo's
/// own dep-info file next to the binary lists exactly the sources it was
/// built from (a test-only module does not count).
fn assert_fresh(binary: &Path) {
    let Ok(built) = std::fs::metadata(binary).and_then(|m| m.modified()) else {
        return;
    };
    let Ok(depinfo) = std::fs::read_to_string(binary.with_extension("d")) else {
        return;
    };
    let sources = depinfo.split_once(": ").map_or("", |(_, deps)| deps);
    for source in sources.split_whitespace() {
        let Ok(modified) = std::fs::metadata(source).and_then(|m| m.modified()) else {
            continue;
        };
        assert!(
            modified <= built,
            "{} is older than {source}: run `cargo build --workspace --bins` first (tests/run does)",
            binary.display()
        );
    }
}

#[derive(Debug, Default, Clone)]
pub struct DaemonOptions {
    /// Policy file contents (written to the daemon's folder).
    pub policy: Option<String>,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Run as this uid (and gid) instead of the suite's root: without
    /// root's exemptions from the kernel's limits.
    pub run_as: Option<u32>,
    /// Soft and hard limit on the daemon's open fds.
    pub fd_limit: Option<u64>,
    /// A command the daemon runs under, given the daemon's command line
    /// as its arguments (so it must end by exec'ing them: say, `unshare`
    /// with a shell script of the test's own).
    pub wrapper: Vec<String>,
}

#[derive(Debug)]
pub struct Daemon {
    child: Child,
    pub socket: PathBuf,
    pub policy_path: PathBuf,
    log: PathBuf,
    pub dir: TempDir,
}

impl Daemon {
    pub fn start() -> Daemon {
        Daemon::start_with(DaemonOptions::default())
    }

    pub fn start_with(options: DaemonOptions) -> Daemon {
        let dir = TempDir::new("daemon");
        let socket = dir.path().join("socket");
        let log = dir.path().join("daemon.log");
        let policy_path = dir.path().join("policy.toml");
        let mut cmd = match (options.fd_limit, options.run_as) {
            (None, None) if options.wrapper.is_empty() => Command::new(binary("dmabrokerd")),
            (None, None) => {
                let mut cmd = Command::new(&options.wrapper[0]);
                cmd.args(&options.wrapper[1..]).arg(binary("dmabrokerd"));
                cmd
            }
            (limit, uid) => {
                assert!(
                    options.wrapper.is_empty(),
                    "a wrapper with an fd limit or another uid is not supported"
                );
                // Both tools exec the next, so the child is the daemon.
                let mut cmd = Command::new("prlimit");
                if let Some(limit) = limit {
                    cmd.arg(format!("--nofile={limit}:{limit}"));
                }
                cmd.arg("--");
                if let Some(uid) = uid {
                    cmd.arg("setpriv")
                        .arg(format!("--reuid={uid}"))
                        .arg(format!("--regid={uid}"))
                        .arg("--clear-groups");
                }
                cmd.arg(binary("dmabrokerd"));
                cmd
            }
        };
        cmd.arg("--socket").arg(&socket);
        // Tests never depend on the machine's /dev (the VM tier passes its
        // own --dma-heap-dir when it wants real heaps).
        if !options.args.iter().any(|a| a == "--dma-heap-dir") {
            cmd.args([
                "--dma-heap-dir",
                "/nonexistent",
                "--udmabuf",
                "/nonexistent",
            ]);
        }
        if let Some(policy) = &options.policy {
            std::fs::write(&policy_path, policy).expect("write policy");
            cmd.arg("--policy").arg(&policy_path);
        }
        cmd.args(&options.args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "debug".into()),
            )
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"));
        for (k, v) in &options.env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn dmabrokerd");
        let mut daemon = Daemon {
            child,
            socket,
            policy_path,
            log,
            dir,
        };
        daemon.wait_ready();
        daemon
    }

    fn wait_ready(&mut self) {
        // Seconds in the emulated guest of the kernel tier; only a failing
        // run waits this long.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("dmabrokerd exited early ({status}):\n{}", self.log());
            }
            if self.socket.exists() && dmabroker_client::Client::connect_to(&self.socket).is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "dmabrokerd never became ready:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn fd_count(&self) -> usize {
        crate::proc::fd_count(self.pid())
    }

    /// The fd count once the daemon is idle (stable for 100 ms): the
    /// baseline leaks are measured against.
    pub fn baseline(&self) -> usize {
        crate::proc::stable_fd_count(self.pid())
    }

    /// Waits (up to 15 s) for the daemon's fd count to return to `baseline`.
    pub fn assert_fds_back_to(&self, baseline: usize) {
        let now = crate::proc::wait_fd_count(self.pid(), baseline, Duration::from_secs(15));
        assert_eq!(
            now,
            baseline,
            "daemon fd count did not return to baseline; log:\n{}",
            self.log_tail()
        );
    }

    pub fn client(&self) -> dmabroker_client::Client {
        dmabroker_client::Client::connect_to(&self.socket).expect("connect to test daemon")
    }

    pub fn client_with(
        &self,
        options: dmabroker_client::ClientOptions,
    ) -> dmabroker_client::Result<dmabroker_client::Client> {
        dmabroker_client::Client::connect_with(&self.socket, options)
    }

    /// A client with buffer words turned off: every begin is a round trip
    /// the daemon sees (the message path that dma-bufs always take).
    pub fn message_path_client(&self) -> dmabroker_client::Result<dmabroker_client::Client> {
        self.client_with(dmabroker_client::ClientOptions {
            buffer_words: false,
            ..Default::default()
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// A `SIGSTOP` returns once the daemon has stopped: a test that stops
    /// it to queue things before it reads them must not race it.
    pub fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.pid() as i32), signal).expect("signal daemon");
        if signal == Signal::SIGSTOP {
            crate::proc::wait_stopped(self.pid());
        }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(mut self) -> ExitStatus {
        self.signal(Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(Instant::now() < deadline, "dmabrokerd ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
