//! A private `dbus-daemon` for one test, and `busctl`/`dmabrokerctl`
//! pointed at it.
//!
//! The bus listens on a socket in its own scratch folder and is killed when
//! dropped. Two flavours: [`DbusDaemon::start`] is a session-type bus that
//! lets any uid connect, own any name and call anything (the daemon's own
//! checks are what is tested), and [`DbusDaemon::start_system_like`] denies
//! by default like Debian's system bus and includes the project's shipped
//! policy file, so that the file itself is tested.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::tmp::TempDir;

/// The project's D-Bus policy file, as installed into
/// `/usr/share/dbus-1/system.d/`.
pub fn shipped_policy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/org.dmabroker.Broker1.conf")
}

pub const BUS_NAME: &str = "org.dmabroker.Broker1";
pub const OBJECT_PATH: &str = "/org/dmabroker/Broker1";
pub const INTERFACE: &str = "org.dmabroker.Debug1";

const DOCTYPE: &str = r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">"#;

/// Anyone may connect, own names and send anything.
const OPEN_POLICY: &str = r#"
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
  </policy>"#;

/// Debian's system.conf default context, reduced to what matters here:
/// anyone may connect and talk to the bus itself; owning names and calling
/// methods of services needs an explicit allow from the service's file.
const SYSTEM_POLICY: &str = r#"
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Properties"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus" send_member="UpdateActivationEnvironment"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Debug.Stats"/>
  </policy>"#;

#[derive(Debug)]
pub struct DbusDaemon {
    child: Child,
    address: String,
    pub dir: TempDir,
}

impl DbusDaemon {
    /// An open session-type bus.
    pub fn start() -> DbusDaemon {
        DbusDaemon::start_with("session", OPEN_POLICY, None)
    }

    /// A bus that denies by default, like the system bus, plus `include`
    /// (normally [`shipped_policy`]).
    pub fn start_system_like(include: &Path) -> DbusDaemon {
        DbusDaemon::start_with("system", SYSTEM_POLICY, Some(include))
    }

    fn start_with(kind: &str, policy: &str, include: Option<&Path>) -> DbusDaemon {
        let dir = TempDir::new("dbus");
        let socket = dir.path().join("bus");
        let include = include
            .map(|p| format!("  <include>{}</include>\n", p.display()))
            .unwrap_or_default();
        let config = format!(
            "{DOCTYPE}\n<busconfig>\n  <type>{kind}</type>\n  <listen>unix:path={}</listen>\n  \
             <auth>EXTERNAL</auth>\n{policy}\n{include}</busconfig>\n",
            socket.display()
        );
        let config_path = dir.path().join("bus.conf");
        std::fs::write(&config_path, config).expect("write bus config");
        let (child, address) = spawn_bus(dir.path());
        DbusDaemon {
            child,
            address,
            dir,
        }
    }

    /// Kills the bus and starts it again on the same socket, as a restart
    /// of the system's dbus-daemon would.
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(self.dir.path().join("bus"));
        let (child, address) = spawn_bus(self.dir.path());
        self.child = child;
        self.address = address;
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    /// The `dbus-daemon` process, for benchmarks that place it on a CPU.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `--dbus ADDRESS` for [`crate::DaemonOptions::args`]: the socket
    /// alone, without the bus's guid, so that the daemon also accepts the
    /// bus after a [`DbusDaemon::restart`].
    pub fn daemon_args(&self) -> Vec<String> {
        let socket = self.dir.path().join("bus");
        vec!["--dbus".into(), format!("unix:path={}", socket.display())]
    }

    /// `busctl --address=… ARGS`, as root.
    pub fn busctl(&self, args: &[&str]) -> Output {
        Command::new("busctl")
            .arg(format!("--address={}", self.address))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run busctl")
    }

    /// `busctl … ARGS` under another uid and gid with no supplementary
    /// groups.
    pub fn busctl_as(&self, uid: u32, gid: u32, args: &[&str]) -> Output {
        Command::new("setpriv")
            .arg(format!("--reuid={uid}"))
            .arg(format!("--regid={gid}"))
            .arg("--clear-groups")
            .arg("busctl")
            .arg(format!("--address={}", self.address))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run busctl under setpriv")
    }

    /// A daemon whose D-Bus view is on this bus (with `policy` as its
    /// policy file, if given), once it owns its name.
    pub fn start_broker(&self, policy: Option<&str>) -> crate::Daemon {
        let daemon = crate::Daemon::start_with(crate::DaemonOptions {
            policy: policy.map(str::to_owned),
            args: self.daemon_args(),
            ..Default::default()
        });
        self.wait_for_daemon();
        daemon
    }

    /// A method's first return value, parsed from `busctl --json=short`.
    pub fn method(&self, name: &str, args: &[&str]) -> serde_json::Value {
        let v: serde_json::Value =
            serde_json::from_str(&self.call_json(name, args)).expect("busctl JSON");
        v["data"][0].clone()
    }

    /// A property's value, parsed from `busctl --json=short`.
    pub fn property(&self, name: &str) -> serde_json::Value {
        let v: serde_json::Value =
            serde_json::from_str(&self.property_json(name)).expect("busctl JSON");
        v["data"].clone()
    }

    /// Field `index` of the `Totals` property (src/daemon/src/dbus/views.rs).
    pub fn totals(&self, index: usize) -> u64 {
        self.property("Totals")[index]
            .as_u64()
            .expect("Totals field")
    }

    /// Field `index` of the `Statistics` method's answer.
    pub fn stat(&self, index: usize) -> u64 {
        self.method("Statistics", &[])[index]
            .as_u64()
            .expect("Statistics field")
    }

    /// A counter property (`SilentEnds`, `HandOffs`, ...).
    pub fn counter(&self, property: &str) -> u64 {
        self.property(property).as_u64().expect(property)
    }

    /// A method of the debug interface, answered as `busctl --json=short`.
    pub fn call_json(&self, method: &str, args: &[&str]) -> String {
        let mut argv = vec![
            "--json=short",
            "call",
            BUS_NAME,
            OBJECT_PATH,
            INTERFACE,
            method,
        ];
        argv.extend_from_slice(args);
        let out = self.busctl(&argv);
        assert!(
            out.status.success(),
            "busctl call {method} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A property of the debug interface, as `busctl --json=short`.
    pub fn property_json(&self, name: &str) -> String {
        let out = self.busctl(&[
            "--json=short",
            "get-property",
            BUS_NAME,
            OBJECT_PATH,
            INTERFACE,
            name,
        ]);
        assert!(
            out.status.success(),
            "busctl get-property {name} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn name_has_owner(&self, name: &str) -> bool {
        let out = self.busctl(&[
            "call",
            "org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "NameHasOwner",
            "s",
            name,
        ]);
        String::from_utf8_lossy(&out.stdout).trim() == "b true"
    }

    /// Waits (up to 10 s) until the daemon owns its name on this bus.
    pub fn wait_for_daemon(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.name_has_owner(BUS_NAME) {
            assert!(
                Instant::now() < deadline,
                "dmabrokerd never took {BUS_NAME} on the test bus"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `dmabrokerctl --address=… ARGS`.
    pub fn ctl(&self, args: &[&str]) -> Output {
        self.ctl_command(args).output().expect("run dmabrokerctl")
    }

    /// The command line of [`DbusDaemon::ctl`], for running it some other
    /// way (in a pseudo-terminal, under another uid).
    pub fn ctl_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(crate::daemon::binary("dmabrokerctl"));
        cmd.arg(format!("--address={}", self.address))
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("bus.log")).unwrap_or_default()
    }
}

/// Starts `dbus-daemon` on `dir/bus.conf`, returning it and its address.
fn spawn_bus(dir: &Path) -> (Child, String) {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("bus.log"))
        .expect("bus log");
    let mut child = Command::new("dbus-daemon")
        .arg(format!("--config-file={}", dir.join("bus.conf").display()))
        .args(["--nofork", "--print-address"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("spawn dbus-daemon (Debian package dbus-daemon)");
    let stdout = child.stdout.take().expect("dbus-daemon stdout");
    let mut address = String::new();
    let read = BufReader::new(stdout).read_line(&mut address);
    let address = address.trim().to_owned();
    if read.is_err() || address.is_empty() {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "dbus-daemon printed no address:\n{}",
            std::fs::read_to_string(dir.join("bus.log")).unwrap_or_default()
        );
    }
    (child, address)
}

impl Drop for DbusDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Field indices of the debug interface's structs, as `busctl --json`
/// lists them (src/daemon/src/dbus/views.rs is the definition).
pub mod fields {
    pub const TOTALS_CLIENTS: usize = 0;
    pub const TOTALS_FENCES: usize = 3;
    pub const TOTALS_WAITERS: usize = 4;
    pub const STATS_GRANTS: usize = 5;
    pub const STATS_WRITER_LOST: usize = 11;
    pub const STATS_REVOCATIONS: usize = 12;
    pub const CLIENT_ACCESSES_HELD: usize = 10;
    pub const BUFFER_HOLDERS: usize = 7;
    pub const BUFFER_FENCES: usize = 8;
}
