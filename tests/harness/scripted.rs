//! A real client process (`dmabroker-testclient`) driven line by line.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::Duration;

#[derive(Debug)]
pub struct Scripted {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
}

/// Patience for a reply that should come promptly.
pub const PROMPT: Duration = Duration::from_secs(30);

impl Scripted {
    pub fn spawn(socket: &Path, extra: &[&str]) -> Scripted {
        Scripted::spawn_cmd(
            Command::new(crate::daemon::binary("dmabroker-testclient")),
            socket,
            extra,
        )
    }

    /// Runs the client under another uid/gid (with no supplementary
    /// groups) through `setpriv`; the test harness runs as root.
    pub fn spawn_as(socket: &Path, uid: u32, gid: u32, extra: &[&str]) -> Scripted {
        let mut cmd = Command::new("setpriv");
        cmd.arg(format!("--reuid={uid}"))
            .arg(format!("--regid={gid}"))
            .arg("--clear-groups")
            .arg(crate::daemon::binary("dmabroker-testclient"));
        Scripted::spawn_cmd(cmd, socket, extra)
    }

    /// As [`Scripted::spawn_as`], with a copy of `fd` left open in the
    /// client (for `adopt-inherited N`); returns the client and N.
    pub fn spawn_as_with_fd(
        socket: &Path,
        uid: u32,
        gid: u32,
        fd: BorrowedFd<'_>,
        extra: &[&str],
    ) -> (Scripted, i32) {
        // F_DUPFD leaves the copy without close-on-exec, so the client
        // inherits it; far above the fds a test process normally has.
        let inherited = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_DUPFD(500))
            .expect("dup the fd to pass on");
        let client = Scripted::spawn_as(socket, uid, gid, extra);
        nix::unistd::close(inherited).expect("close the parent's copy");
        (client, inherited)
    }

    /// As [`Scripted::spawn_as`], with these supplementary groups.
    pub fn spawn_with_groups(
        socket: &Path,
        uid: u32,
        gid: u32,
        groups: &[u32],
        extra: &[&str],
    ) -> Scripted {
        let groups: Vec<String> = groups.iter().map(u32::to_string).collect();
        let mut cmd = Command::new("setpriv");
        cmd.arg(format!("--reuid={uid}"))
            .arg(format!("--regid={gid}"))
            .arg(format!("--groups={}", groups.join(",")))
            .arg(crate::daemon::binary("dmabroker-testclient"));
        Scripted::spawn_cmd(cmd, socket, extra)
    }

    /// Runs the client through a wrapper command of the test's own (which
    /// must end by exec'ing the testclient with the arguments appended).
    pub fn spawn_wrapped(cmd: Command, socket: &Path, extra: &[&str]) -> Scripted {
        Scripted::spawn_cmd(cmd, socket, extra)
    }

    fn spawn_cmd(mut cmd: Command, socket: &Path, extra: &[&str]) -> Scripted {
        cmd.arg("--socket").arg(socket).args(extra);
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn dmabroker-testclient");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut client = Scripted {
            child,
            stdin,
            lines,
        };
        let hello = client.recv(PROMPT).expect("testclient greeting");
        assert!(
            hello.starts_with("ready"),
            "testclient did not connect: {hello}"
        );
        client
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn send(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").expect("write to testclient");
        self.stdin.flush().expect("flush testclient");
    }

    /// The next output line, or `None` after `timeout`.
    pub fn recv(&mut self, timeout: Duration) -> Option<String> {
        match self.lines.recv_timeout(timeout) {
            Ok(line) => Some(line),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => {
                Some("err Disconnected testclient exited".into())
            }
        }
    }

    /// Sends a command and returns `Ok(rest)` for `ok rest` or `Err(line)`.
    pub fn cmd(&mut self, line: &str) -> Result<String, String> {
        self.send(line);
        let reply = self
            .recv(PROMPT)
            .unwrap_or_else(|| panic!("testclient gave no answer to `{line}`"));
        match reply.strip_prefix("ok") {
            Some(rest) => Ok(rest.trim().to_owned()),
            None => Err(reply),
        }
    }

    /// As `cmd`, panicking on an error answer.
    pub fn ok(&mut self, line: &str) -> String {
        self.cmd(line)
            .unwrap_or_else(|e| panic!("`{line}` failed: {e}"))
    }

    /// Waits for the answer to a command already sent (a begin), which
    /// must be a success.
    pub fn granted_within(&mut self, within: Duration, what: &str) -> String {
        let answer = self
            .recv(within)
            .unwrap_or_else(|| panic!("{what}: not granted within {within:?}"));
        assert!(answer.starts_with("ok"), "{what}: {answer}");
        answer
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Parses `key=value` words of a testclient answer.
pub fn field<'a>(answer: &'a str, key: &str) -> Option<&'a str> {
    answer
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

/// A daemon and one buffer that `owner` allocated and exported, for tests
/// in which other processes join it.
#[derive(Debug)]
pub struct Shared {
    pub daemon: crate::Daemon,
    pub owner: Scripted,
    pub id: String,
    pub token: String,
    /// Flags every process of the test gets (the owner and each joiner).
    common: Vec<String>,
}

impl Shared {
    /// `owner` allocates `size` bytes (named `frame`) on `daemon` and
    /// exports them.
    pub fn new(daemon: crate::Daemon, size: u64) -> Shared {
        Shared::new_with(daemon, size, &[])
    }

    /// As [`Shared::new`], with `common` flags for every process: say,
    /// `--no-buffer-words` for tests of the message path, where every
    /// access has a lasting broker id.
    pub fn new_with(daemon: crate::Daemon, size: u64, common: &[&str]) -> Shared {
        let mut owner = Scripted::spawn(daemon.socket(), common);
        let allocated = owner.ok(&format!("alloc {size} name=frame"));
        let id = field(&allocated, "id").expect("id").to_owned();
        let token = owner.ok(&format!("export {id}"));
        let token = field(&token, "token").expect("token").to_owned();
        Shared {
            daemon,
            owner,
            id,
            token,
            common: common.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    /// Another process holding the buffer (`extra`: its command-line flags).
    pub fn join(&self, extra: &[&str]) -> Scripted {
        let mut flags: Vec<&str> = self.common.iter().map(String::as_str).collect();
        flags.extend_from_slice(extra);
        let mut client = Scripted::spawn(self.daemon.socket(), &flags);
        client.ok(&format!("import {}", self.token));
        client
    }
}

/// The access id in a `begin` answer.
pub fn access_of(answer: &str) -> String {
    field(answer, "access").expect("access id").to_owned()
}
