//! dmabroker's benchmarks: the real daemon against floors measured in the
//! same run, on the same machine, between the same kinds of processes.
//!
//! Every broker figure is reported as a ratio against a floor: absolute
//! numbers move with the machine, ratios say what the broker itself costs.
//! Floor and broker runs alternate round by round; each ratio is the median
//! of the rounds' ratios, so a burst of unrelated load (or of the host's,
//! on a virtual machine) cannot tilt one side.
//!
//! ```text
//! cargo bench --bench broker                 # everything (about 90 s)
//! cargo bench --bench broker -- --quick      # one short round, rougher figures
//! cargo bench --bench broker -- handoff      # benchmarks whose name contains "handoff"
//! ```
//!
//! Other processes are this executable run again with `__child ROLE ARGS`;
//! a child's stdin is a SOCK_SEQPACKET control socket to the parent, over
//! which fds, tokens, start signals and results travel. Re-executing (rather
//! than forking) keeps every child single-threaded and free of the parent's
//! state.

use std::collections::{BTreeMap, VecDeque};
use std::error::Error;
use std::ffi::CStr;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use dmabroker_client::{Access, Buffer, Client};
use dmabroker_ipc::fdpass::{recv_message_into, send_message, RecvError};
use dmabroker_ipc::mapping::Mapping;
use dmabroker_ipc::MAX_MESSAGE_SIZE;
use dmabroker_suite::{Daemon, DaemonOptions};
use nix::fcntl::{fcntl, FcntlArg, OFlag, SealFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sched::{sched_setaffinity, CpuSet};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use nix::sys::signal::{kill, Signal};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use nix::time::{clock_getcpuclockid, clock_gettime, ClockId};
use nix::unistd::Pid;

type Res<T> = Result<T, Box<dyn Error + Send + Sync>>;

/// A 1080p NV12 frame: 1920 × 1080 luma + half as much chroma.
const FRAME_1080P: usize = 1920 * 1080 * 3 / 2;
/// A 4K (3840 × 2160) NV12 frame.
const FRAME_4K: usize = 3840 * 2160 * 3 / 2;
/// Buffers a client holds in the large case of `scale_buffers`, and in
/// the daemon's memory figure.
const MANY_BUFFERS: usize = 10_000;
/// Buffers the same client holds in the small case.
const FEW_BUFFERS: usize = 10;
/// Connections open at the daemon in the large case of `scale_clients`,
/// the measured one included.
const MANY_CLIENTS: usize = 1_000;
/// Frames in flight between camera and codec.
const RING: usize = 4;
/// Client counts for the many-clients benchmarks.
const CLIENTS: [usize; 3] = [1, 8, 32];
/// The size of a small request, close to an encoded begin or alloc.
const REQUEST_LEN: usize = 32;
/// How long a hand-off writer waits after the reader said it is about to
/// block, so that the reader's begin is queued at the broker (and the raw
/// receiver is asleep in recv) before the clock starts. The same pause is
/// used for the floor so both measure a wake-up from sleep.
const SETTLE: Duration = Duration::from_micros(200);

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("__child") => child::run(&args[1..]),
        _ => run_benchmarks(&args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("broker bench: {err}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// How long and what to run.
#[derive(Debug, Clone)]
struct Settings {
    quick: bool,
    filter: Option<String>,
}

impl Settings {
    /// `cargo bench` passes `--bench`; `cargo test --benches` does not, and
    /// then nothing runs (a debug-build benchmark would only mislead).
    fn parse(args: &[String]) -> Option<Settings> {
        let mut settings = Settings {
            quick: false,
            filter: None,
        };
        let mut bench = false;
        for arg in args {
            match arg.as_str() {
                "--bench" => bench = true,
                "--quick" => settings.quick = true,
                flag if flag.starts_with('-') => eprintln!("ignoring unknown flag {flag}"),
                name => settings.filter = Some(name.to_owned()),
            }
        }
        bench.then_some(settings)
    }

    fn selected(&self, name: &str) -> bool {
        match &self.filter {
            Some(filter) => name.contains(filter.as_str()),
            None => true,
        }
    }

    fn pick<T>(&self, quick: T, full: T) -> T {
        if self.quick {
            quick
        } else {
            full
        }
    }

    /// Latency samples per round.
    fn samples(&self) -> usize {
        self.pick(2_000, 3_000)
    }

    fn handoff_samples(&self) -> usize {
        self.pick(300, 500)
    }

    fn warmup(&self) -> Duration {
        Duration::from_millis(self.pick(100, 150))
    }

    fn window(&self) -> Duration {
        Duration::from_millis(self.pick(300, 500))
    }

    fn ring_window(&self) -> Duration {
        Duration::from_millis(self.pick(500, 800))
    }

    /// Many short rounds rather than a few long ones: each round's ratio
    /// compares runs made moments apart.
    fn rounds(&self) -> usize {
        self.pick(1, 10)
    }
}

fn run_benchmarks(args: &[String]) -> Res<()> {
    let Some(settings) = Settings::parse(args) else {
        println!("broker bench: run it with `cargo bench --bench broker [-- --quick] [FILTER]`");
        return Ok(());
    };
    let started = Instant::now();
    Placement::AllCpus.cpus()?; // remember the CPUs allowed before pinning any
    start_watchdog(Duration::from_secs(settings.pick(120, 600)));
    let mut bench = Bench::new(settings);
    bench.run_all()?;
    if bench.rows.is_empty() && bench.floors.is_empty() {
        println!("no benchmark matches {:?}", bench.settings.filter);
        return Ok(());
    }
    let report = report::markdown(&bench, started.elapsed());
    println!("{report}");
    let path = report_path()?;
    std::fs::write(&path, &report)?;
    println!("written to {}", path.display());
    Ok(())
}

/// The daemon's pid once started, for the watchdog.
static DAEMON_PID: AtomicU32 = AtomicU32::new(0);

/// A benchmark whose processes wait for each other forever is a bug in
/// its choreography; failing (and not leaving the daemon behind) beats
/// hanging a CI job.
fn start_watchdog(limit: Duration) {
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        eprintln!("broker bench: still running after {limit:?}; giving up");
        let pid = DAEMON_PID.load(Ordering::SeqCst);
        if pid != 0 {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        std::process::exit(2);
    });
}

/// `target/bench-report.md`, found from this executable
/// (`target/release/deps/broker-*`).
fn report_path() -> Res<PathBuf> {
    let exe = std::env::current_exe()?;
    let target = exe
        .ancestors()
        .find(|dir| dir.file_name().is_some_and(|n| n == "target"))
        .or_else(|| exe.ancestors().nth(3))
        .ok_or("cannot find the target folder")?;
    Ok(target.join("bench-report.md"))
}

/// A benchmark's figure.
#[derive(Debug, Clone, Copy)]
enum Metric {
    Latency { median: Duration, p99: Duration },
    Rate { per_s: f64, unit: &'static str },
}

impl Metric {
    fn latency(samples: &mut [Duration]) -> Metric {
        samples.sort_unstable();
        let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
        Metric::Latency {
            median: at(0.5),
            p99: at(0.99),
        }
    }

    fn rate(count: u64, window: Duration, unit: &'static str) -> Metric {
        Metric::Rate {
            per_s: count as f64 / window.as_secs_f64(),
            unit,
        }
    }

    /// The headline number: the median latency or the rate.
    fn value(self) -> f64 {
        match self {
            Metric::Latency { median, .. } => median.as_secs_f64(),
            Metric::Rate { per_s, .. } => per_s,
        }
    }

    fn p99(self) -> Option<Duration> {
        match self {
            Metric::Latency { p99, .. } => Some(p99),
            Metric::Rate { .. } => None,
        }
    }
}

/// CPU time per operation: the client's (this process) and the server's
/// (the daemon, or the floor's echo process). Where the time goes.
#[derive(Debug, Clone, Copy, Default)]
struct Cpu {
    client: Option<Duration>,
    server: Option<Duration>,
}

/// One round's result.
#[derive(Debug, Clone, Copy)]
struct Measured {
    metric: Metric,
    cpu: Cpu,
}

impl Measured {
    fn plain(metric: Metric) -> Measured {
        Measured {
            metric,
            cpu: Cpu::default(),
        }
    }

    /// Two costs paid one after the other (alloc's round trip and its
    /// memfd creation).
    fn then(self, other: Measured) -> Measured {
        let add = |a: Option<Duration>, b: Option<Duration>| match (a, b) {
            (None, None) => None,
            (a, b) => Some(a.unwrap_or_default() + b.unwrap_or_default()),
        };
        let metric = match (self.metric, other.metric) {
            (
                Metric::Latency {
                    median: m1,
                    p99: p1,
                },
                Metric::Latency {
                    median: m2,
                    p99: p2,
                },
            ) => Metric::Latency {
                median: m1 + m2,
                p99: p1 + p2,
            },
            (metric, _) => metric,
        };
        Measured {
            metric,
            cpu: Cpu {
                client: add(self.cpu.client, other.cpu.client),
                server: add(self.cpu.server, other.cpu.server),
            },
        }
    }

    /// The median over rounds, component by component.
    fn median_of(rounds: &[Measured]) -> Measured {
        fn median<T: Copy>(
            mut values: Vec<T>,
            cmp: impl Fn(&T, &T) -> std::cmp::Ordering,
        ) -> Option<T> {
            values.sort_by(cmp);
            values.get(values.len() / 2).copied()
        }
        let by_value = |a: &Measured, b: &Measured| a.metric.value().total_cmp(&b.metric.value());
        let mid = median(rounds.to_vec(), by_value).expect("at least one round");
        let durations = |f: fn(&Measured) -> Option<Duration>| {
            median(rounds.iter().filter_map(f).collect(), Ord::cmp)
        };
        let metric = match mid.metric {
            Metric::Latency { median, .. } => Metric::Latency {
                median,
                p99: durations(|m| m.metric.p99()).unwrap_or_default(),
            },
            rate => rate,
        };
        Measured {
            metric,
            cpu: Cpu {
                client: durations(|m| m.cpu.client),
                server: durations(|m| m.cpu.server),
            },
        }
    }
}

/// Lower is better for latencies, higher for rates.
#[derive(Debug, Clone, Copy)]
enum Target {
    AtMost(f64),
    AtLeast(f64),
}

/// A broker benchmark and its floor, measured in alternating rounds.
#[derive(Debug, Clone)]
struct Paired {
    /// Medians over the rounds.
    floor: Measured,
    result: Measured,
    /// Each round's result over the floor measured just before it: the
    /// pairs share the machine's state of the moment (a virtual machine's
    /// host load comes and goes), so their ratios are steadier than the
    /// ratio of medians.
    ratios: Vec<f64>,
}

impl Paired {
    fn ratio(&self) -> f64 {
        let mut ratios = self.ratios.clone();
        ratios.sort_by(f64::total_cmp);
        ratios[ratios.len() / 2]
    }

    fn spread(&self) -> (f64, f64) {
        let min = self.ratios.iter().copied().fold(f64::INFINITY, f64::min);
        let max = self
            .ratios
            .iter()
            .copied()
            .fold(f64::NEG_INFINITY, f64::max);
        (min, max)
    }
}

/// A broker benchmark next to its floor.
#[derive(Debug, Clone)]
struct Row {
    name: String,
    floor_label: String,
    pair: Paired,
    target: Option<Target>,
    note: String,
}

impl Row {
    fn ratio(&self) -> f64 {
        self.pair.ratio()
    }

    fn met(&self) -> Option<bool> {
        Some(match self.target? {
            Target::AtMost(max) => self.ratio() <= max,
            Target::AtLeast(min) => self.ratio() >= min,
        })
    }
}

/// The floors, by name, with what each measures.
const FLOORS: [(&str, &str); 12] = [
    (
        "floor_rtt_fd",
        "(a) SEQPACKET round trip, parent↔child, the reply carries one memfd",
    ),
    (
        "floor_rtt",
        "(a') the same round trip without an fd (informational)",
    ),
    (
        "floor_oneway_rtt_fd",
        "(a+) a one-way message the child reads and does not answer, then the round trip of (a)",
    ),
    (
        "floor_rtt_fd_tokio",
        "(a~) the round trip of (a), the child serving it as the daemon does: a tokio current-thread runtime, the socket in its reactor (AsyncFd, edge-triggered epoll)",
    ),
    (
        "floor_oneway_rtt_fd_tokio",
        "(a~+) (a+) served the same way as (a~)",
    ),
    (
        "floor_oneway",
        "(b) one-way message to a child asleep in recv (CLOCK_MONOTONIC stamps)",
    ),
    (
        "floor_memfd",
        "(c) memfd_create + ftruncate + F_ADD_SEALS + close, in-process",
    ),
    (
        "floor_echo_1",
        "(d) poll() echo server process, 1 client process",
    ),
    (
        "floor_echo_8",
        "(d) poll() echo server process, 8 client processes",
    ),
    (
        "floor_echo_32",
        "(d) poll() echo server process, 32 client processes",
    ),
    (
        "floor_ring",
        "(e) camera→codec over 4 shared 1080p memfds, indices over pipes, no broker",
    ),
    (
        "floor_ring_4k",
        "(e') the same ring with 4K frames (12,441,600 bytes)",
    ),
];

/// Latency benchmarks run on one CPU, throughput benchmarks on all (see
/// [`Placement`]). One client against one server is a latency benchmark in
/// disguise (a strict ping-pong with nothing to run in parallel), so it is
/// pinned too.
/// alloc_only keeps this many buffers before it frees them.
const ALLOC_BATCH: usize = 64;

fn placement_of(name: &str) -> Placement {
    let single_client = name.ends_with("echo_1") || name.ends_with("turns_1");
    let parallel = name.contains("echo") || name.contains("ring") || name.contains("turns");
    if parallel && !single_client {
        Placement::AllCpus
    } else {
        Placement::OneCpu
    }
}

/// Runs the selected benchmarks. Each broker benchmark runs its floors in
/// the same rounds, alternating with its own runs.
struct Bench {
    settings: Settings,
    /// Every round of every floor measured, for the floor table.
    floors: BTreeMap<&'static str, Vec<Measured>>,
    rows: Vec<Row>,
    /// The daemon's memory growth for `MANY_BUFFERS` buffers.
    rss: Option<Rss>,
    /// Every hand-off sample and every floor (b) sample, for the plot.
    handoff_latencies: Vec<Duration>,
    oneway_latencies: Vec<Duration>,
    daemon: Option<Daemon>,
    load_before: f64,
}

/// The daemon's resident memory before and after one client allocated
/// `buffers` 4 KiB buffers.
#[derive(Debug, Clone, Copy)]
struct Rss {
    buffers: usize,
    before_kib: u64,
    after_kib: u64,
}

impl Rss {
    fn delta_kib(self) -> u64 {
        self.after_kib.saturating_sub(self.before_kib)
    }

    fn per_buffer_kib(self) -> f64 {
        self.delta_kib() as f64 / self.buffers as f64
    }
}

impl Bench {
    fn new(settings: Settings) -> Bench {
        Bench {
            settings,
            floors: BTreeMap::new(),
            rows: Vec::new(),
            rss: None,
            handoff_latencies: Vec::new(),
            oneway_latencies: Vec::new(),
            daemon: None,
            load_before: report::load_average(),
        }
    }

    fn run_all(&mut self) -> Res<()> {
        if self.settings.selected("alloc_free") {
            self.alloc_free()?;
        }
        if self.settings.selected("alloc_only") {
            self.alloc_only()?;
        }
        if self.settings.selected("request_rtt") {
            self.request_rtt()?;
        }
        if self.settings.selected("begin_end") {
            self.begin_end(false)?;
        }
        if self.settings.selected("begin_end_by_message") {
            self.begin_end(true)?;
        }
        if self.settings.selected("handoff") {
            self.handoff()?;
        }
        for clients in CLIENTS {
            if self.settings.selected(&format!("turns_{clients}")) {
                self.turns(clients)?;
            }
        }
        if self.settings.selected("ring_broker") {
            self.ring("ring_broker", "floor_ring", FRAME_1080P)?;
        }
        if self.settings.selected("ring_broker_4k") {
            self.ring("ring_broker_4k", "floor_ring_4k", FRAME_4K)?;
        }
        // Before scale_buffers, so that this is the daemon's first growth
        // to that many buffers.
        if self.settings.selected("daemon_rss") {
            self.daemon_rss()?;
        }
        if self.settings.selected("scale_buffers") {
            self.scale_buffers()?;
        }
        if self.settings.selected("scale_clients") {
            self.scale_clients()?;
        }
        // Floors asked for by name that no broker benchmark needed.
        for (name, _) in FLOORS {
            if self.settings.selected(name) && !self.floors.contains_key(name) {
                for _ in 0..self.settings.rounds() {
                    self.floor(name)?;
                }
            }
        }
        if let Some(daemon) = self.daemon.take() {
            let log = daemon.log();
            if !log.trim().is_empty() {
                eprintln!("daemon log (RUST_LOG=warn):\n{log}");
            }
            daemon.stop();
        }
        Ok(())
    }

    /// Measures one round of a floor and keeps it for the floor table.
    fn floor(&mut self, name: &'static str) -> Res<Measured> {
        self.place(placement_of(name))?;
        let s = &self.settings;
        let measured = match name {
            "floor_rtt_fd" => floors::round_trip(s.samples(), true, false, "echo")?,
            "floor_rtt" => floors::round_trip(s.samples(), false, false, "echo")?,
            "floor_oneway_rtt_fd" => floors::round_trip(s.samples(), true, true, "echo")?,
            "floor_rtt_fd_tokio" => floors::round_trip(s.samples(), true, false, "echo-tokio")?,
            "floor_oneway_rtt_fd_tokio" => {
                floors::round_trip(s.samples(), true, true, "echo-tokio")?
            }
            "floor_oneway" => floors::one_way(s.handoff_samples(), &mut self.oneway_latencies)?,
            "floor_memfd" => floors::sealed_memfd(s.samples())?,
            "floor_ring" => floors::ring(s, FRAME_1080P)?,
            "floor_ring_4k" => floors::ring(s, FRAME_4K)?,
            "floor_echo_1" => floors::echo(1, s)?,
            "floor_echo_8" => floors::echo(8, s)?,
            "floor_echo_32" => floors::echo(32, s)?,
            other => return Err(format!("no floor {other}").into()),
        };
        self.floors.entry(name).or_default().push(measured);
        Ok(measured)
    }

    /// Alternates `floor` and `run`, round after round.
    fn paired(
        &mut self,
        floor: &mut dyn FnMut(&mut Bench) -> Res<Measured>,
        run: &mut dyn FnMut(&mut Bench) -> Res<Measured>,
    ) -> Res<Paired> {
        let mut floors = Vec::new();
        let mut results = Vec::new();
        let mut ratios = Vec::new();
        for _ in 0..self.settings.rounds() {
            let f = floor(self)?;
            let r = run(self)?;
            ratios.push(r.metric.value() / f.metric.value());
            floors.push(f);
            results.push(r);
        }
        Ok(Paired {
            floor: Measured::median_of(&floors),
            result: Measured::median_of(&results),
            ratios,
        })
    }

    /// Places this process and the daemon (children follow this process).
    fn place(&mut self, placement: Placement) -> Res<()> {
        Placement::apply(placement, 0)?;
        if let Some(daemon) = &self.daemon {
            placement.apply(daemon.pid())?;
        }
        Ok(())
    }

    /// The daemon, started (once) for the first broker benchmark.
    fn daemon(&mut self) -> Res<&Daemon> {
        if self.daemon.is_none() {
            dmabroker_suite::daemon::build_release_daemon()?;
            let daemon = Daemon::start_with(DaemonOptions {
                env: vec![("RUST_LOG".into(), "warn".into())],
                // The defaults of 4,096 buffers per client and per uid
                // and 256 connections per uid would refuse the scale
                // benchmarks' 10,000 buffers and 1,000 connections.
                policy: Some(format!(
                    "[default]\nmax_buffers = {}\nmax_uid_buffers = {}\nmax_uid_connections = {}\n",
                    2 * MANY_BUFFERS,
                    2 * MANY_BUFFERS,
                    2 * MANY_CLIENTS
                )),
                // scale_clients needs 1,000 connections, whatever the
                // machine's fd limit makes of the default cap.
                args: vec!["--max-connections".into(), "4096".into()],
                ..Default::default()
            });
            DAEMON_PID.store(daemon.pid(), Ordering::SeqCst);
            self.daemon = Some(daemon);
        }
        self.daemon.as_ref().ok_or_else(|| "no daemon".into())
    }

    fn socket(&mut self) -> Res<PathBuf> {
        Ok(self.daemon()?.socket.clone())
    }

    fn daemon_cpu(&mut self) -> Res<CpuClock> {
        CpuClock::of(self.daemon()?.pid())
    }

    fn alloc_free(&mut self) -> Res<()> {
        let client = Client::connect_to(self.socket()?)?;
        self.place(placement_of("alloc_free"))?;
        let daemon = self.daemon_cpu()?;
        // The floor has no free. A free is a one-way message to the
        // daemon, so the ratio is also given against the floor whose round
        // trip follows one, (a+).
        let mut with_free = Vec::new();
        let (mut tokio_rtt, mut tokio_with_free) = (Vec::new(), Vec::new());
        let pair = self.paired(
            &mut |b| {
                let memfd = b.floor("floor_memfd")?;
                with_free.push(b.floor("floor_oneway_rtt_fd")?.then(memfd));
                tokio_rtt.push(b.floor("floor_rtt_fd_tokio")?.then(memfd));
                tokio_with_free.push(b.floor("floor_oneway_rtt_fd_tokio")?.then(memfd));
                Ok(b.floor("floor_rtt_fd")?.then(memfd))
            },
            &mut |b| broker::alloc_free(&client, &daemon, b.settings.samples()),
        )?;
        check_errors(&client)?;
        let with_free = Measured::median_of(&with_free).metric.value();
        let tokio_rtt = Measured::median_of(&tokio_rtt).metric.value();
        let tokio_with_free = Measured::median_of(&tokio_with_free).metric.value();
        let result = pair.result.metric.value();
        self.rows.push(Row {
            name: "alloc_free".into(),
            floor_label: "(a) floor_rtt_fd + (c) floor_memfd".into(),
            pair: pair.clone(),
            target: Some(Target::AtMost(1.2)),
            note: format!(
                "client.alloc(4096) then drop; the free is pipelined, so the daemon handles it \
                 before the next alloc; {:.2}x (a+) floor_oneway_rtt_fd + (c), the floor with a \
                 one-way message for the free; served from tokio as the daemon is, (a~) + (c) \
                 is {:.2}x the issue's floor and alloc_free {:.2}x it, (a~+) + (c) {:.2}x and \
                 alloc_free {:.2}x it",
                result / with_free,
                tokio_rtt / pair.floor.metric.value(),
                result / tokio_rtt,
                tokio_with_free / pair.floor.metric.value(),
                result / tokio_with_free,
            ),
        });
        Ok(())
    }

    /// alloc_free taken apart: the alloc alone, with the frees outside the
    /// timing, so that alloc_free minus this is what a free costs.
    fn alloc_only(&mut self) -> Res<()> {
        let client = Client::connect_to(self.socket()?)?;
        self.place(placement_of("alloc_only"))?;
        let pair = self.paired(
            &mut |b| Ok(b.floor("floor_rtt_fd")?.then(b.floor("floor_memfd")?)),
            &mut |b| broker::alloc_only(&client, b.settings.samples()),
        )?;
        check_errors(&client)?;
        self.rows.push(Row {
            name: "alloc_only".into(),
            floor_label: "(a) floor_rtt_fd + (c) floor_memfd".into(),
            pair,
            target: None,
            note: format!(
                "client.alloc(4096) alone: the buffers are kept and freed {ALLOC_BATCH} at a time \
                 outside the timing, followed by an untimed round trip so that the daemon has \
                 handled those frees before the next timed alloc"
            ),
        });
        Ok(())
    }

    /// What the daemon's message loop and the client library cost per
    /// round trip, with no work behind the request: the part of every
    /// message-path ratio that no handler can win back.
    fn request_rtt(&mut self) -> Res<()> {
        let client = Client::connect_to(self.socket()?)?;
        self.place(placement_of("request_rtt"))?;
        let buffer = client.alloc(4096)?;
        let daemon = self.daemon_cpu()?;
        let pair = self.paired(&mut |b| b.floor("floor_rtt"), &mut |b| {
            broker::request_rtt(&buffer, &daemon, b.settings.samples())
        })?;
        check_errors(&client)?;
        self.rows.push(Row {
            name: "request_rtt".into(),
            floor_label: "(a') floor_rtt".into(),
            pair,
            target: None,
            note: "buffer.info(): a request that only reads the broker's table, answered \
                   without an fd"
                .into(),
        });
        Ok(())
    }

    /// `by_message`: the client turns buffer words off, so every begin is
    /// a round trip through the daemon (what dma-bufs and clients without
    /// words get); otherwise an uncontended cycle stays in the buffer word.
    fn begin_end(&mut self, by_message: bool) -> Res<()> {
        let client = if by_message {
            self.daemon()?.message_path_client()?
        } else {
            Client::connect_to(self.socket()?)?
        };
        self.place(placement_of("begin_end"))?;
        let buffer = client.alloc(4096)?;
        let daemon = self.daemon_cpu()?;
        let mut no_fd = Vec::new();
        let pair = self.paired(
            &mut |b| {
                no_fd.push(b.floor("floor_rtt")?);
                b.floor("floor_rtt_fd")
            },
            &mut |b| broker::begin_end(&buffer, &daemon, b.settings.samples()),
        )?;
        check_errors(&client)?;
        let no_fd = Measured::median_of(&no_fd).metric.value();
        let (name, target, how) = if by_message {
            (
                "begin_end_by_message",
                None,
                "by message (buffer words off): a round trip; the end goes through the end word",
            )
        } else {
            (
                "begin_end",
                Some(Target::AtMost(1.2)),
                "in the buffer word after the first grant: no message either way",
            )
        };
        self.rows.push(Row {
            name: name.into(),
            floor_label: "(a) floor_rtt_fd".into(),
            pair: pair.clone(),
            target,
            note: format!(
                "uncontended begin(CpuWrite) + drop, {how}; {:.2}x the round trip without an fd",
                pair.result.metric.value() / no_fd
            ),
        });
        Ok(())
    }

    fn handoff(&mut self) -> Res<()> {
        let socket = self.socket()?;
        self.place(placement_of("handoff"))?;
        let daemon = self.daemon_cpu()?;
        let pair = self.paired(&mut |b| b.floor("floor_oneway"), &mut |b| {
            let samples = b.settings.handoff_samples();
            broker::handoff(&socket, &daemon, samples, &mut b.handoff_latencies)
        })?;
        self.plot_handoff()?;
        self.rows.push(Row {
            name: "handoff".into(),
            floor_label: "(b) floor_oneway".into(),
            pair: pair.clone(),
            target: Some(Target::AtMost(1.3)),
            note: format!(
                "W drops its CpuWrite guard → R's blocked begin(CpuRead) returns; {:.2}x two \
                 one-way messages (W→daemon, daemon→R)",
                pair.ratio() / 2.0
            ),
        });
        Ok(())
    }

    fn turns(&mut self, clients: usize) -> Res<()> {
        let socket = self.socket()?;
        self.place(placement_of(&format!("turns_{clients}")))?;
        let daemon = self.daemon_cpu()?;
        let floor_name = match clients {
            1 => "floor_echo_1",
            8 => "floor_echo_8",
            32 => "floor_echo_32",
            _ => return Err(format!("no echo floor for {clients} clients").into()),
        };
        let pair = self.paired(&mut |b| b.floor(floor_name), &mut |b| {
            broker::turns(&socket, &daemon, clients, &b.settings)
        })?;
        let cycles = pair.result.metric.value() / 2.0;
        self.rows.push(Row {
            name: format!("turns_{clients}"),
            floor_label: format!("(d) {floor_name}"),
            pair: pair.clone(),
            target: (clients == 32).then_some(Target::AtLeast(0.8)),
            note: format!(
                "{clients} client process(es), one buffer each, begin(CpuWrite)+drop in a loop; begin \
                 and end each count as a transition ({cycles:.0} begin+end cycles/s = {:.2}x the echo \
                 rate)",
                pair.ratio() / 2.0
            ),
        });
        Ok(())
    }

    fn ring(&mut self, name: &str, floor_name: &'static str, frame: usize) -> Res<()> {
        let socket = self.socket()?;
        self.place(placement_of(name))?;
        let daemon = self.daemon_cpu()?;
        let mut waits = Vec::new();
        let pair = self.paired(&mut |b| b.floor(floor_name), &mut |b| {
            let (measured, producer_wait, consumer_wait) =
                broker::ring(&socket, &daemon, &b.settings, frame)?;
            waits.push((producer_wait, consumer_wait));
            Ok(measured)
        })?;
        let median_wait = |pick: fn(&(Metric, Metric)) -> Metric| {
            let rounds: Vec<Measured> = waits.iter().map(|w| Measured::plain(pick(w))).collect();
            report::metric(&Measured::median_of(&rounds).metric)
        };
        let (producer_wait, consumer_wait) = (median_wait(|w| w.0), median_wait(|w| w.1));
        let floor_tag = if frame == FRAME_4K { "(e')" } else { "(e)" };
        self.rows.push(Row {
            name: name.into(),
            floor_label: format!("{floor_tag} {floor_name}"),
            pair,
            target: Some(Target::AtLeast(0.95)),
            note: format!(
                "4 × {frame}-byte buffers: producer begin(CpuWrite)/fill/end, consumer \
                 begin(CpuRead)/checksum/end; indices over pipes as in the floor. Time spent in \
                 begin: producer {producer_wait}, consumer {consumer_wait}"
            ),
        });
        Ok(())
    }

    /// The daemon's resident memory before and after one client allocates
    /// `MANY_BUFFERS` 4 KiB buffers. There is no floor: a memfd's pages
    /// and inode are kernel memory, in nobody's RSS, so the growth is
    /// entirely the daemon's bookkeeping.
    fn daemon_rss(&mut self) -> Res<()> {
        let client = Client::connect_to(self.socket()?)?;
        let pid = self.daemon()?.pid();
        let before_kib = vm_rss_kib(pid)?;
        let buffers = alloc_many(&client, MANY_BUFFERS)?;
        let after_kib = vm_rss_kib(pid)?;
        drop(buffers);
        sync_with_daemon(&client)?;
        check_errors(&client)?;
        self.rss = Some(Rss {
            buffers: MANY_BUFFERS,
            before_kib,
            after_kib,
        });
        Ok(())
    }

    /// begin+end on one buffer while the client holds `MANY_BUFFERS`
    /// buffers, against the same with `FEW_BUFFERS`: how the per-request
    /// cost grows with the daemon's tables. Each round allocates the extra
    /// buffers anew and frees them again, so the small case really is
    /// small.
    fn scale_buffers(&mut self) -> Res<()> {
        // By message: a cycle in the buffer word never reaches the daemon,
        // whose tables are what this is about.
        let client = self.daemon()?.message_path_client()?;
        self.place(placement_of("scale_buffers"))?;
        let few = alloc_many(&client, FEW_BUFFERS)?;
        let daemon = self.daemon_cpu()?;
        let mut small_vs_rtt = Vec::new();
        let pair = self.paired(
            &mut |b| {
                let rtt = b.floor("floor_rtt_fd")?;
                let small =
                    broker::begin_end(&few[FEW_BUFFERS / 2], &daemon, b.settings.samples())?;
                small_vs_rtt.push(small.metric.value() / rtt.metric.value());
                Ok(small)
            },
            &mut |b| {
                let more = alloc_many(&client, MANY_BUFFERS - FEW_BUFFERS)?;
                let large = broker::begin_end(&more[more.len() / 2], &daemon, b.settings.samples());
                drop(more);
                // The frees are pipelined: let the daemon finish them before
                // the next floor runs on the same CPU.
                sync_with_daemon(&client)?;
                large
            },
        )?;
        check_errors(&client)?;
        self.rows.push(scale_row(
            "scale_buffers_10k",
            "scale_buffers_10: the same, client holding 10 buffers",
            pair,
            &small_vs_rtt,
            "begin(CpuWrite)+drop on one buffer while the client holds 10,000 buffers, \
             against the same client holding 10 (the other 9,990 are allocated and freed each \
             round)",
        ));
        Ok(())
    }

    /// One client's begin+end with `MANY_CLIENTS - 1` other connections
    /// open and idle, against the same with no other connection.
    fn scale_clients(&mut self) -> Res<()> {
        let socket = self.socket()?;
        let client = self.daemon()?.message_path_client()?;
        self.place(placement_of("scale_clients"))?;
        let buffer = client.alloc(4096)?;
        let daemon = self.daemon_cpu()?;
        let idle = Proc::spawn(
            "idle-clients",
            &[broker::path_arg(&socket)?, &(MANY_CLIENTS - 1).to_string()],
        )?;
        let mut small_vs_rtt = Vec::new();
        let pair = self.paired(
            &mut |b| {
                let rtt = b.floor("floor_rtt_fd")?;
                let small = broker::begin_end(&buffer, &daemon, b.settings.samples())?;
                small_vs_rtt.push(small.metric.value() / rtt.metric.value());
                Ok(small)
            },
            &mut |b| {
                ctl::send_words(idle.ctl(), &[1], &[])?;
                ctl::recv_word(idle.ctl())?; // all connected
                let large = broker::begin_end(&buffer, &daemon, b.settings.samples());
                ctl::send_words(idle.ctl(), &[0], &[])?;
                ctl::recv_word(idle.ctl())?;
                // Hang-ups are handled after the helper's reply: give the
                // daemon a moment before the next floor shares its CPU.
                std::thread::sleep(Duration::from_millis(50));
                large
            },
        )?;
        idle.finish()?;
        check_errors(&client)?;
        self.rows.push(scale_row(
            "scale_clients_1000",
            "scale_clients_1: the same, no other client connected",
            pair,
            &small_vs_rtt,
            "begin(CpuWrite)+drop of one client while 999 other connections (one helper \
             process) are open and idle, against the same client alone",
        ));
        Ok(())
    }

    /// Draws the hand-off's latency distribution against floor (b)'s.
    /// Only a full run overwrites the committed plot in docs/.
    fn plot_handoff(&self) -> Res<()> {
        let folder = if self.settings.quick || self.settings.filter.is_some() {
            report_path()?
                .parent()
                .ok_or("no target folder")?
                .to_path_buf()
        } else {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("docs")
        };
        let png = plot::latency_cdf(&[
            ("BROKER HANDOFF", plot::BLUE, &self.handoff_latencies),
            ("FLOOR (B) ONE-WAY", plot::ORANGE, &self.oneway_latencies),
        ]);
        let path = folder.join("handoff-latency.png");
        std::fs::write(&path, png)?;
        println!("handoff latency plot written to {}", path.display());
        Ok(())
    }
}

/// A scale row: the large case over the small one, with both against
/// floor (a) in the note (large over (a) is, round by round, the row's
/// ratio times small over (a)).
fn scale_row(name: &str, small_label: &str, pair: Paired, small_vs_rtt: &[f64], what: &str) -> Row {
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let large_vs_rtt: Vec<f64> = pair
        .ratios
        .iter()
        .zip(small_vs_rtt)
        .map(|(large_small, small_rtt)| large_small * small_rtt)
        .collect();
    let note = format!(
        "{what}; against (a) floor_rtt_fd: small case {:.2}x, large case {:.2}x",
        median(small_vs_rtt.to_vec()),
        median(large_vs_rtt)
    );
    Row {
        name: name.into(),
        floor_label: small_label.into(),
        pair,
        target: None,
        note,
    }
}

/// Allocates `count` 4 KiB buffers.
fn alloc_many(client: &Client, count: usize) -> Res<Vec<Buffer>> {
    Ok((0..count)
        .map(|_| client.alloc(4096))
        .collect::<Result<Vec<_>, _>>()?)
}

/// One request with a reply: the daemon handles a connection's messages
/// in order, so once it answers, every pipelined free before it is done.
fn sync_with_daemon(client: &Client) -> Res<()> {
    client.heaps()?;
    Ok(())
}

/// A process's resident set size, from /proc/PID/status.
fn vm_rss_kib(pid: u32) -> Res<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .ok_or("no VmRSS in /proc/PID/status")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .ok_or("malformed VmRSS")?
        .parse()?)
}

/// Pipelined ends and frees report failures asynchronously; a benchmark
/// that silently failed them would measure nothing.
fn check_errors(client: &Client) -> Res<()> {
    let errors = client.take_errors();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(format!("the broker refused pipelined requests: {errors:?}").into())
    }
}

/// CLOCK_MONOTONIC in nanoseconds: one clock for every process on the
/// machine, so timestamps can cross a pipe.
fn now_ns() -> u64 {
    let ts = clock_gettime(ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}

fn sleep_until_ns(deadline: u64) {
    let now = now_ns();
    if deadline > now {
        std::thread::sleep(Duration::from_nanos(deadline - now));
    }
}

/// The CPU time a process (all its threads) has used: read before and
/// after a run to see who spent the time.
#[derive(Debug, Clone, Copy)]
struct CpuClock(ClockId);

impl CpuClock {
    fn of_self() -> CpuClock {
        CpuClock(ClockId::CLOCK_PROCESS_CPUTIME_ID)
    }

    fn of(pid: u32) -> Res<CpuClock> {
        Ok(CpuClock(clock_getcpuclockid(Pid::from_raw(
            i32::try_from(pid)?,
        ))?))
    }

    fn now(self) -> Res<Duration> {
        let ts = clock_gettime(self.0)?;
        Ok(Duration::new(ts.tv_sec() as u64, ts.tv_nsec() as u32))
    }
}

/// Where the processes of a benchmark may run.
///
/// On this kind of machine (a small VM) a wake-up that crosses CPUs costs
/// tens of microseconds when the other CPU is idle, and whether two
/// processes share a CPU is up to the scheduler: unpinned, the same latency
/// benchmark comes out at either ~3 µs or ~60 µs from one run to the next.
/// Latency benchmarks therefore pin every process involved (this one, its
/// children, the daemon) to one CPU, floors and broker alike, and measure
/// the software path; throughput benchmarks need both CPUs and float.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placement {
    OneCpu,
    AllCpus,
}

/// The CPUs this benchmark was started on (all of them, unless someone
/// ran it under `taskset`), read before any pinning.
static ALLOWED_CPUS: OnceLock<Vec<usize>> = OnceLock::new();

impl Placement {
    fn cpus(self) -> Res<CpuSet> {
        let allowed = ALLOWED_CPUS.get_or_init(dmabroker_suite::proc::allowed_cpus);
        let chosen = match self {
            Placement::AllCpus => &allowed[..],
            Placement::OneCpu => &allowed[..allowed.len().min(1)],
        };
        if chosen.is_empty() {
            return Err("no CPU allowed".into());
        }
        let mut set = CpuSet::new();
        for &cpu in chosen {
            set.set(cpu)?;
        }
        Ok(set)
    }

    /// Applies to every thread of `pid` (0: this process); children
    /// spawned afterwards inherit it.
    fn apply(self, pid: u32) -> Res<()> {
        let set = self.cpus()?;
        let dir = match pid {
            0 => "/proc/self/task".to_owned(),
            pid => format!("/proc/{pid}/task"),
        };
        for task in std::fs::read_dir(dir)? {
            let tid: i32 = task?.file_name().to_string_lossy().parse()?;
            sched_setaffinity(Pid::from_raw(tid), &set)?;
        }
        Ok(())
    }
}

/// Times `op` `samples` times after a 10% warm-up, with the CPU this
/// process and `server` spent per operation.
fn time_ops(
    samples: usize,
    server: Option<CpuClock>,
    mut op: impl FnMut() -> Res<()>,
) -> Res<Measured> {
    for _ in 0..samples / 10 {
        op()?;
    }
    let client = CpuClock::of_self();
    let cpu_before = (client.now()?, server.map(CpuClock::now).transpose()?);
    let mut times = Vec::with_capacity(samples);
    for _ in 0..samples {
        let start = Instant::now();
        op()?;
        times.push(start.elapsed());
    }
    let per_op = |before: Duration, after: Duration| (after - before) / samples as u32;
    let server_after = server.map(CpuClock::now).transpose()?;
    Ok(Measured {
        metric: Metric::latency(&mut times),
        cpu: Cpu {
            client: Some(per_op(cpu_before.0, client.now()?)),
            server: cpu_before.1.zip(server_after).map(|(b, a)| per_op(b, a)),
        },
    })
}

fn seqpacket_pair() -> Res<(OwnedFd, OwnedFd)> {
    Ok(socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?)
}

/// `(read end, write end)`, close-on-exec so no child inherits a stray
/// writer (which would keep the reader from ever seeing end-of-file).
fn pipe() -> Res<(File, File)> {
    let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    Ok((File::from(read), File::from(write)))
}

/// What the daemon's memfd heap does per allocation.
fn sealed_memfd(size: usize) -> Res<OwnedFd> {
    const NAME: &CStr = c"dmabroker-bench";
    let fd = memfd_create(
        NAME,
        MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING,
    )?;
    nix::unistd::ftruncate(&fd, i64::try_from(size)?)?;
    let seals = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL;
    fcntl(fd.as_raw_fd(), FcntlArg::F_ADD_SEALS(seals))?;
    Ok(fd)
}

/// The control channel between the parent and a child: small messages of
/// u64 words (with fds when needed) or text.
mod ctl {
    use super::*;

    pub fn send_words(fd: BorrowedFd<'_>, words: &[u64], fds: &[BorrowedFd<'_>]) -> Res<()> {
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
        send_message(fd, &bytes, fds, false)?;
        Ok(())
    }

    pub fn recv_words(fd: BorrowedFd<'_>) -> Res<(Vec<u64>, Vec<OwnedFd>)> {
        let mut buf = vec![0u8; MAX_MESSAGE_SIZE];
        let (len, fds) = recv_message_into(fd, &mut buf, false)?;
        let words = buf[..len]
            .chunks_exact(8)
            .map(|c| u64::from_ne_bytes(c.try_into().expect("8-byte chunk")))
            .collect();
        Ok((words, fds))
    }

    pub fn recv_word(fd: BorrowedFd<'_>) -> Res<u64> {
        recv_words(fd)?
            .0
            .first()
            .copied()
            .ok_or_else(|| "empty control message".into())
    }

    pub fn send_text(fd: BorrowedFd<'_>, text: &str) -> Res<()> {
        send_message(fd, text.as_bytes(), &[], false)?;
        Ok(())
    }

    pub fn recv_text(fd: BorrowedFd<'_>) -> Res<String> {
        let mut buf = vec![0u8; MAX_MESSAGE_SIZE];
        let (len, _) = recv_message_into(fd, &mut buf, false)?;
        Ok(String::from_utf8(buf[..len].to_vec())?)
    }

    pub fn send_latency(fd: BorrowedFd<'_>, metric: Metric) -> Res<()> {
        match metric {
            Metric::Latency { median, p99 } => {
                send_words(fd, &[median.as_nanos() as u64, p99.as_nanos() as u64], &[])
            }
            Metric::Rate { .. } => Err("not a latency".into()),
        }
    }

    /// Every sample, not just the median and p99: the plot needs the
    /// whole distribution. A few thousand words fit in one message.
    pub fn send_samples(fd: BorrowedFd<'_>, samples: &[Duration]) -> Res<()> {
        let words: Vec<u64> = samples.iter().map(|d| d.as_nanos() as u64).collect();
        send_words(fd, &words, &[])
    }

    pub fn recv_samples(fd: BorrowedFd<'_>) -> Res<Vec<Duration>> {
        let (words, _) = recv_words(fd)?;
        if words.is_empty() {
            return Err("no samples".into());
        }
        Ok(words.into_iter().map(Duration::from_nanos).collect())
    }

    pub fn recv_latency(fd: BorrowedFd<'_>) -> Res<Metric> {
        let (words, _) = recv_words(fd)?;
        match words[..] {
            [median, p99] => Ok(Metric::Latency {
                median: Duration::from_nanos(median),
                p99: Duration::from_nanos(p99),
            }),
            _ => Err("malformed latency report".into()),
        }
    }
}

/// A child process running one role, with its control socket.
struct Proc {
    child: std::process::Child,
    ctl: OwnedFd,
}

impl Proc {
    fn spawn(role: &str, args: &[&str]) -> Res<Proc> {
        let (ours, theirs) = seqpacket_pair()?;
        let child = Command::new(std::env::current_exe()?)
            .arg("__child")
            .arg(role)
            .args(args)
            .stdin(Stdio::from(theirs))
            .stdout(Stdio::null())
            .spawn()?;
        Ok(Proc { child, ctl: ours })
    }

    fn ctl(&self) -> BorrowedFd<'_> {
        self.ctl.as_fd()
    }

    fn cpu(&self) -> Res<CpuClock> {
        CpuClock::of(self.child.id())
    }

    /// Closes the control socket (the child's cue to finish) and checks
    /// that the child exited cleanly.
    fn finish(self) -> Res<()> {
        let Proc { mut child, ctl } = self;
        drop(ctl);
        let status = child.wait()?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("bench child failed: {status}").into())
        }
    }
}

/// Starts a timed window in every child at the same instant of the shared
/// monotonic clock, after a warm-up; returns the summed count of operations
/// completed inside it and the CPU `server` spent during it.
fn run_window(procs: &[Proc], server: CpuClock, settings: &Settings) -> Res<(u64, Duration)> {
    for proc in procs {
        ctl::recv_word(proc.ctl())?; // ready
    }
    let start = now_ns() + settings.warmup().as_nanos() as u64;
    let end = start + settings.window().as_nanos() as u64;
    for proc in procs {
        ctl::send_words(proc.ctl(), &[start, end], &[])?;
    }
    sleep_until_ns(start);
    let before = server.now()?;
    sleep_until_ns(end);
    let server_cpu = server.now()? - before;
    let mut total = 0;
    for proc in procs {
        total += ctl::recv_word(proc.ctl())?;
    }
    Ok((total, server_cpu))
}

/// The expected checksum of a `frame`-byte frame filled with `byte`.
fn frame_sum(byte: u8, frame: usize) -> u64 {
    u64::from_ne_bytes([byte; 8]).wrapping_mul((frame / 8) as u64)
}

/// Sums a frame as u64 words: reads every byte, as a codec would.
fn checksum(frame: &[u8]) -> u64 {
    frame.chunks_exact(8).fold(0u64, |sum, w| {
        sum.wrapping_add(u64::from_ne_bytes(w.try_into().expect("8 bytes")))
    })
}

/// Consecutive frames get different contents, so a stale frame is caught.
fn frame_byte(seq: u64) -> u8 {
    (seq % 251) as u8 + 1
}

fn check_frame(bytes: &[u8], byte: u8, frame: usize) -> Res<()> {
    if checksum(&bytes[..frame]) == frame_sum(byte, frame) {
        Ok(())
    } else {
        Err("frame checksum mismatch: the consumer saw a torn or stale frame".into())
    }
}

/// What a ring run did.
#[derive(Debug)]
struct RingRun {
    /// Frames the consumer returned within the window.
    frames: u64,
    window: Duration,
    /// Frames produced in all, warm-up included.
    produced: u64,
}

/// The camera side of a ring: fills a free buffer, passes its index on,
/// takes indices back. `fill(index, byte)` writes one frame (taking and
/// ending whatever access the variant needs).
fn produce_frames(
    fill: &mut dyn FnMut(usize, u8) -> Res<()>,
    to_consumer: &mut File,
    from_consumer: &mut File,
    settings: &Settings,
) -> Res<RingRun> {
    let mut free: VecDeque<usize> = (0..RING).collect();
    let mut seq = 0u64;
    let mut consumed = 0u64;
    let warmup_end = Instant::now() + settings.warmup();
    let mut window: Option<Instant> = None;
    loop {
        if free.is_empty() {
            let mut idx = [0u8; 8];
            from_consumer.read_exact(&mut idx)?;
            free.push_back(usize::try_from(u64::from_ne_bytes(idx))?);
            match window {
                Some(started) => {
                    consumed += 1;
                    if started.elapsed() >= settings.ring_window() {
                        return Ok(RingRun {
                            frames: consumed,
                            window: started.elapsed(),
                            produced: seq,
                        });
                    }
                }
                None if Instant::now() >= warmup_end => window = Some(Instant::now()),
                None => {}
            }
        }
        let idx = free.pop_front().ok_or("ring underflow")?;
        fill(idx, frame_byte(seq))?;
        let message: Vec<u8> = [idx as u64, seq]
            .iter()
            .flat_map(|w| w.to_ne_bytes())
            .collect();
        to_consumer.write_all(&message)?;
        seq += 1;
    }
}

/// The codec side of a ring: takes an index, checks the frame, returns the
/// index, until the producer closes the pipe.
fn consume_frames(
    check: &mut dyn FnMut(usize, u8) -> Res<()>,
    from_producer: &mut File,
    to_producer: &mut File,
) -> Res<()> {
    let mut message = [0u8; 16];
    loop {
        match from_producer.read_exact(&mut message) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(err) => return Err(err.into()),
        }
        let idx = u64::from_ne_bytes(message[..8].try_into()?);
        let seq = u64::from_ne_bytes(message[8..].try_into()?);
        check(usize::try_from(idx)?, frame_byte(seq))?;
        to_producer.write_all(&idx.to_ne_bytes())?;
    }
}

/// The floors: the same work with nothing but the kernel in between.
mod floors {
    use super::*;

    /// Parent sends a request-sized message, the child echoes it (with a
    /// memfd attached when `with_fd`), as the broker answers an alloc.
    /// The parent reuses its receive buffer: the cheapest correct client.
    /// `one_way_first`: each round trip follows a one-way message that
    /// the child reads and does not answer, as the daemon reads a free
    /// before the next alloc.
    pub fn round_trip(
        samples: usize,
        with_fd: bool,
        one_way_first: bool,
        server: &str,
    ) -> Res<Measured> {
        let child = Proc::spawn(server, &[])?;
        let mut request = [0u8; REQUEST_LEN];
        request[0] = u8::from(with_fd);
        let mut one_way = [0u8; REQUEST_LEN];
        one_way[0] = 2;
        let mut buf = vec![0u8; MAX_MESSAGE_SIZE];
        let measured = time_ops(samples, Some(child.cpu()?), || {
            if one_way_first {
                send_message(child.ctl(), &one_way, &[], false)?;
            }
            send_message(child.ctl(), &request, &[], false)?;
            let (_, fds) = recv_message_into(child.ctl(), &mut buf, false)?;
            drop(fds); // closing the fd is part of the client's cost too
            Ok(())
        })?;
        child.finish()?;
        Ok(measured)
    }

    /// Parent waits for the child to be about to block, pauses, and sends a
    /// timestamp; the child subtracts it from its own on arrival.
    pub fn one_way(samples: usize, sink: &mut Vec<Duration>) -> Res<Measured> {
        let child = Proc::spawn("oneway", &[&samples.to_string()])?;
        let child_cpu = child.cpu()?;
        let cpu_before = child_cpu.now()?;
        let cycles = samples + samples / 10;
        for _ in 0..cycles {
            ctl::recv_word(child.ctl())?; // about to block in recv
            std::thread::sleep(SETTLE);
            ctl::send_words(child.ctl(), &[now_ns()], &[])?;
        }
        let mut times = ctl::recv_samples(child.ctl())?;
        sink.extend_from_slice(&times);
        let metric = Metric::latency(&mut times);
        let receiver_cpu = child_cpu.now()? - cpu_before;
        child.finish()?;
        Ok(Measured {
            metric,
            // The receiver's CPU per wake-up: the daemon's counterpart.
            cpu: Cpu {
                client: None,
                server: Some(receiver_cpu / u32::try_from(cycles)?),
            },
        })
    }

    pub fn sealed_memfd(samples: usize) -> Res<Measured> {
        time_ops(samples, None, || {
            drop(super::sealed_memfd(4096)?);
            Ok(())
        })
    }

    /// `clients` processes doing request/reply against one poll() server
    /// process; requests per second.
    pub fn echo(clients: usize, settings: &Settings) -> Res<Measured> {
        let server = Proc::spawn("echo-server", &[])?;
        let mut procs = Vec::with_capacity(clients);
        let mut server_ends = Vec::with_capacity(clients);
        for _ in 0..clients {
            let (client_end, server_end) = seqpacket_pair()?;
            let proc = Proc::spawn("echo-client", &[])?;
            ctl::send_words(proc.ctl(), &[], &[client_end.as_fd()])?;
            procs.push(proc);
            server_ends.push(server_end);
        }
        let borrowed: Vec<BorrowedFd<'_>> = server_ends.iter().map(|fd| fd.as_fd()).collect();
        ctl::send_words(server.ctl(), &[], &borrowed)?;
        drop(borrowed);
        drop(server_ends);
        let (total, server_cpu) = run_window(&procs, server.cpu()?, settings)?;
        for proc in procs {
            proc.finish()?;
        }
        server.finish()?;
        Ok(Measured {
            metric: Metric::rate(total, settings.window(), "req/s"),
            cpu: Cpu {
                client: None,
                server: Some(server_cpu / u32::try_from(total.max(1))?),
            },
        })
    }

    /// Camera→codec with shared memfds and pipes only.
    pub fn ring(settings: &Settings, frame: usize) -> Res<Measured> {
        let consumer = Proc::spawn("ring-raw", &[&frame.to_string()])?;
        let buffers = (0..RING)
            .map(|_| super::sealed_memfd(frame))
            .collect::<Res<Vec<_>>>()?;
        let (from_producer, mut to_consumer) = pipe()?;
        let (mut from_consumer, to_producer) = pipe()?;
        let mut fds: Vec<BorrowedFd<'_>> = buffers.iter().map(|fd| fd.as_fd()).collect();
        fds.push(from_producer.as_fd());
        fds.push(to_producer.as_fd());
        ctl::send_words(consumer.ctl(), &[], &fds)?;
        drop(fds);
        drop((from_producer, to_producer));
        let mut maps = buffers
            .iter()
            .map(|fd| Mapping::new(fd.as_fd(), frame))
            .collect::<Result<Vec<_>, _>>()?;
        let mut fill = |idx: usize, byte: u8| -> Res<()> {
            maps[idx][..frame].fill(byte);
            Ok(())
        };
        let run = produce_frames(&mut fill, &mut to_consumer, &mut from_consumer, settings)?;
        drop(to_consumer);
        consumer.finish()?;
        Ok(Measured::plain(Metric::rate(
            run.frames, run.window, "frames/s",
        )))
    }
}

/// The same work through the real daemon.
mod broker {
    use super::*;

    pub fn alloc_free(client: &Client, daemon: &CpuClock, samples: usize) -> Res<Measured> {
        time_ops(samples, Some(*daemon), || {
            drop(client.alloc(4096)?);
            Ok(())
        })
    }

    /// Only the allocations are timed. No CPU figures: the daemon's CPU
    /// clock cannot be stopped while it handles the untimed frees.
    pub fn alloc_only(client: &Client, samples: usize) -> Res<Measured> {
        let warmup = samples / 10;
        let mut held = Vec::with_capacity(ALLOC_BATCH);
        let mut times = Vec::with_capacity(samples);
        for i in 0..warmup + samples {
            let start = Instant::now();
            let buffer = client.alloc(4096)?;
            let took = start.elapsed();
            if i >= warmup {
                times.push(took);
            }
            held.push(buffer);
            if held.len() == ALLOC_BATCH {
                held.clear();
                // Answered only after the frees queued before it.
                client.heaps()?;
            }
        }
        Ok(Measured::plain(Metric::latency(&mut times)))
    }

    pub fn request_rtt(buffer: &Buffer, daemon: &CpuClock, samples: usize) -> Res<Measured> {
        time_ops(samples, Some(*daemon), || {
            buffer.info()?;
            Ok(())
        })
    }

    pub fn begin_end(buffer: &Buffer, daemon: &CpuClock, samples: usize) -> Res<Measured> {
        time_ops(samples, Some(*daemon), || {
            drop(buffer.begin(Access::CpuWrite)?);
            Ok(())
        })
    }

    /// This process is the writer W; the child is the reader R, blocked in
    /// begin(CpuRead) when W ends. R reports now − (W's time just before
    /// the end).
    pub fn handoff(
        socket: &Path,
        daemon: &CpuClock,
        samples: usize,
        sink: &mut Vec<Duration>,
    ) -> Res<Measured> {
        let client = Client::connect_to(socket)?;
        let buffer = client.alloc(4096)?;
        let reader = Proc::spawn("handoff-reader", &[path_arg(socket)?, &samples.to_string()])?;
        ctl::send_text(reader.ctl(), &buffer.export()?.to_string())?;
        let daemon_before = daemon.now()?;
        for _ in 0..samples + samples / 10 {
            let guard = buffer.begin(Access::CpuWrite)?;
            ctl::send_words(reader.ctl(), &[1], &[])?; // holding
            ctl::recv_word(reader.ctl())?; // R is about to block in begin
            std::thread::sleep(SETTLE);
            let t0 = now_ns();
            drop(guard);
            ctl::send_words(reader.ctl(), &[t0], &[])?;
            // Only begin again once R has had its turn: were R's begin to
            // reach the broker after our next one (a loaded machine can
            // delay R past SETTLE), each would wait for the other.
            ctl::recv_word(reader.ctl())?;
        }
        let daemon_cpu = daemon.now()? - daemon_before;
        let mut times = ctl::recv_samples(reader.ctl())?;
        sink.extend_from_slice(&times);
        let metric = Metric::latency(&mut times);
        reader.finish()?;
        check_errors(&client)?;
        let cycles = u32::try_from(samples + samples / 10)?;
        Ok(Measured {
            metric,
            // Four messages per cycle: W's end and begin, R's begin and end.
            cpu: Cpu {
                client: None,
                server: Some(daemon_cpu / cycles),
            },
        })
    }

    /// Begin+end cycles of `clients` processes, each on its own buffer;
    /// transitions (begins and ends) per second.
    pub fn turns(
        socket: &Path,
        daemon: &CpuClock,
        clients: usize,
        settings: &Settings,
    ) -> Res<Measured> {
        let procs = (0..clients)
            .map(|_| Proc::spawn("turns-client", &[path_arg(socket)?]))
            .collect::<Res<Vec<_>>>()?;
        let (cycles, daemon_cpu) = run_window(&procs, *daemon, settings)?;
        for proc in procs {
            proc.finish()?;
        }
        let transitions = 2 * cycles;
        Ok(Measured {
            metric: Metric::rate(transitions, settings.window(), "transitions/s"),
            cpu: Cpu {
                client: None,
                server: Some(daemon_cpu / u32::try_from(transitions.max(1))?),
            },
        })
    }

    /// Camera→codec through the broker: this process produces, the child
    /// imports and consumes; the pipes carry indices as in the floor, and
    /// the broker's fences guard every access.
    /// Also returns how long the producer's and the consumer's begins took.
    pub fn ring(
        socket: &Path,
        daemon: &CpuClock,
        settings: &Settings,
        frame: usize,
    ) -> Res<(Measured, Metric, Metric)> {
        let client = Client::connect_to(socket)?;
        let buffers = (0..RING)
            .map(|_| client.alloc(frame as u64))
            .collect::<Result<Vec<_>, _>>()?;
        let consumer = Proc::spawn("ring-broker", &[path_arg(socket)?, &frame.to_string()])?;
        for buffer in &buffers {
            ctl::send_text(consumer.ctl(), &buffer.export()?.to_string())?;
        }
        let (from_producer, mut to_consumer) = pipe()?;
        let (mut from_consumer, to_producer) = pipe()?;
        ctl::send_words(
            consumer.ctl(),
            &[],
            &[from_producer.as_fd(), to_producer.as_fd()],
        )?;
        drop((from_producer, to_producer));
        let mut waits = Vec::new();
        let mut fill = |idx: usize, byte: u8| -> Res<()> {
            let asked = Instant::now();
            let mut guard = buffers[idx].begin(Access::CpuWrite)?;
            waits.push(asked.elapsed());
            guard.bytes_mut()?[..frame].fill(byte);
            drop(guard);
            Ok(())
        };
        let daemon_before = daemon.now()?;
        let run = produce_frames(&mut fill, &mut to_consumer, &mut from_consumer, settings)?;
        let daemon_cpu = daemon.now()? - daemon_before;
        drop(to_consumer);
        let consumer_wait = ctl::recv_latency(consumer.ctl())?;
        consumer.finish()?;
        check_errors(&client)?;
        let measured = Measured {
            metric: Metric::rate(run.frames, run.window, "frames/s"),
            cpu: Cpu {
                client: None,
                server: Some(daemon_cpu / u32::try_from(run.produced.max(1))?),
            },
        };
        Ok((measured, Metric::latency(&mut waits), consumer_wait))
    }

    pub fn path_arg(path: &Path) -> Res<&str> {
        path.to_str()
            .ok_or_else(|| "socket path is not UTF-8".into())
    }
}

/// What the re-executed children do.
mod child {
    use super::*;

    pub fn run(args: &[String]) -> Res<()> {
        let ctl = std::io::stdin().as_fd().try_clone_to_owned()?;
        let ctl = ctl.as_fd();
        let arg = |i: usize| {
            args.get(i)
                .map(String::as_str)
                .ok_or("missing child argument")
        };
        match arg(0)? {
            "echo" => echo(ctl),
            "echo-tokio" => echo_tokio(ctl),
            "oneway" => one_way(ctl, arg(1)?.parse()?),
            "echo-server" => echo_server(ctl),
            "echo-client" => echo_client(ctl),
            "ring-raw" => ring_raw(ctl, arg(1)?.parse()?),
            "handoff-reader" => handoff_reader(ctl, arg(1)?, arg(2)?.parse()?),
            "turns-client" => turns_client(ctl, arg(1)?),
            "ring-broker" => ring_broker(ctl, arg(1)?, arg(2)?.parse()?),
            "idle-clients" => idle_clients(ctl, arg(1)?, arg(2)?.parse()?),
            other => Err(format!("unknown child role {other}").into()),
        }
    }

    /// Echoes each message back on the control socket, attaching a memfd
    /// when the first byte asks for one, until the parent hangs up.
    fn echo(ctl: BorrowedFd<'_>) -> Res<()> {
        let memfd = super::sealed_memfd(4096)?;
        let mut buf = vec![0u8; MAX_MESSAGE_SIZE];
        loop {
            let len = match recv_message_into(ctl, &mut buf, false) {
                Ok((len, _)) => len,
                Err(RecvError::Closed) => return Ok(()),
                Err(err) => return Err(err.into()),
            };
            echo_back(ctl, &buf[..len], memfd.as_fd())?;
        }
    }

    /// The echo's answer to `message`: none for a one-way message (first
    /// byte 2, as a free is to the daemon), the message itself otherwise,
    /// with `memfd` attached when the first byte is 1.
    fn echo_back(socket: BorrowedFd<'_>, message: &[u8], memfd: BorrowedFd<'_>) -> Res<()> {
        let fds = match message.first() {
            Some(2) => return Ok(()),
            Some(1) => vec![memfd],
            _ => Vec::new(),
        };
        send_message(socket, message, &fds, false)?;
        Ok(())
    }

    /// As [`echo`], served the way the daemon serves a connection: a tokio
    /// current-thread runtime with the socket in its reactor, every
    /// message read until `EAGAIN`. What the daemon's runtime costs before
    /// the daemon does anything.
    fn echo_tokio(ctl: BorrowedFd<'_>) -> Res<()> {
        let socket = ctl.try_clone_to_owned()?;
        let flags = OFlag::from_bits_truncate(fcntl(socket.as_raw_fd(), FcntlArg::F_GETFL)?);
        fcntl(
            socket.as_raw_fd(),
            FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK),
        )?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()?;
        runtime.block_on(async move {
            let socket =
                dmabroker_daemon::reactor::register(socket, tokio::io::Interest::READABLE)?;
            let memfd = super::sealed_memfd(4096)?;
            let mut buf = vec![0u8; MAX_MESSAGE_SIZE];
            loop {
                let mut guard = socket.readable().await?;
                loop {
                    let received = guard.try_io(|fd| {
                        recv_message_into(fd.get_ref().as_fd(), &mut buf, true).map_err(|err| {
                            match err {
                                RecvError::Os(nix::errno::Errno::EAGAIN) => {
                                    std::io::Error::from(std::io::ErrorKind::WouldBlock)
                                }
                                other => std::io::Error::other(other),
                            }
                        })
                    });
                    let len = match received {
                        Err(_would_block) => break,
                        Ok(Ok((len, _))) => len,
                        Ok(Err(err)) => {
                            return match err.get_ref().and_then(|e| e.downcast_ref()) {
                                Some(RecvError::Closed) => Ok(()),
                                _ => Err(err.into()),
                            };
                        }
                    };
                    echo_back(socket.get_ref().as_fd(), &buf[..len], memfd.as_fd())?;
                }
            }
        })
    }

    fn one_way(ctl: BorrowedFd<'_>, samples: usize) -> Res<()> {
        let mut times = Vec::with_capacity(samples);
        for i in 0..samples + samples / 10 {
            ctl::send_words(ctl, &[0], &[])?;
            let t0 = ctl::recv_word(ctl)?;
            let t1 = now_ns();
            if i >= samples / 10 {
                times.push(Duration::from_nanos(t1.saturating_sub(t0)));
            }
        }
        ctl::send_samples(ctl, &times)
    }

    /// Serves every socket the parent hands over with poll(): drains each
    /// readable socket, answering each message, as the daemon does.
    fn echo_server(ctl: BorrowedFd<'_>) -> Res<()> {
        let (_, mut sockets) = ctl::recv_words(ctl)?;
        let mut buf = vec![0u8; MAX_MESSAGE_SIZE];
        while !sockets.is_empty() {
            let mut fds: Vec<PollFd<'_>> = sockets
                .iter()
                .map(|s| PollFd::new(s.as_fd(), PollFlags::POLLIN))
                .collect();
            poll(&mut fds, PollTimeout::NONE)?;
            let ready: Vec<bool> = fds.iter().map(|p| p.any().unwrap_or(false)).collect();
            drop(fds);
            let mut closed = Vec::new();
            for (i, socket) in sockets.iter().enumerate().filter(|(i, _)| ready[*i]) {
                loop {
                    match recv_message_into(socket.as_fd(), &mut buf, true) {
                        Ok((len, _)) => send_message(socket.as_fd(), &buf[..len], &[], false)?,
                        Err(RecvError::Os(nix::errno::Errno::EAGAIN)) => break,
                        Err(_) => {
                            closed.push(i);
                            break;
                        }
                    }
                }
            }
            for i in closed.into_iter().rev() {
                sockets.swap_remove(i);
            }
        }
        Ok(())
    }

    /// Counts operations completed inside the parent's window.
    fn count_in_window(ctl: BorrowedFd<'_>, mut op: impl FnMut() -> Res<()>) -> Res<()> {
        ctl::send_words(ctl, &[0], &[])?; // ready
        let (window, _) = ctl::recv_words(ctl)?;
        let [start, end] = window[..] else {
            return Err("malformed window".into());
        };
        let mut count = 0u64;
        loop {
            op()?;
            let now = now_ns();
            if now >= end {
                break;
            }
            if now >= start {
                count += 1;
            }
        }
        ctl::send_words(ctl, &[count], &[])
    }

    fn echo_client(ctl: BorrowedFd<'_>) -> Res<()> {
        let (_, mut fds) = ctl::recv_words(ctl)?;
        let socket = fds.pop().ok_or("echo client got no socket")?;
        let request = [0u8; REQUEST_LEN];
        let mut buf = vec![0u8; MAX_MESSAGE_SIZE];
        count_in_window(ctl, || {
            send_message(socket.as_fd(), &request, &[], false)?;
            recv_message_into(socket.as_fd(), &mut buf, false)?;
            Ok(())
        })
    }

    fn ring_raw(ctl: BorrowedFd<'_>, frame: usize) -> Res<()> {
        let (_, mut fds) = ctl::recv_words(ctl)?;
        if fds.len() != RING + 2 {
            return Err("ring consumer got the wrong fds".into());
        }
        let mut to_producer = File::from(fds.pop().ok_or("no pipe")?);
        let mut from_producer = File::from(fds.pop().ok_or("no pipe")?);
        let maps = fds
            .iter()
            .map(|fd| Mapping::new(fd.as_fd(), frame))
            .collect::<Result<Vec<_>, _>>()?;
        let mut check = |idx: usize, byte: u8| check_frame(&maps[idx], byte, frame);
        consume_frames(&mut check, &mut from_producer, &mut to_producer)
    }

    fn handoff_reader(ctl: BorrowedFd<'_>, socket: &str, samples: usize) -> Res<()> {
        let client = Client::connect_to(socket)?;
        let buffer = client.import(&ctl::recv_text(ctl)?.parse()?)?;
        let mut times = Vec::with_capacity(samples);
        for i in 0..samples + samples / 10 {
            ctl::recv_word(ctl)?; // W holds the write access
            ctl::send_words(ctl, &[0], &[])?;
            let guard = buffer.begin(Access::CpuRead)?;
            let t1 = now_ns();
            let t0 = ctl::recv_word(ctl)?;
            drop(guard);
            ctl::send_words(ctl, &[0], &[])?; // done: W may begin again
            if i >= samples / 10 {
                times.push(Duration::from_nanos(t1.saturating_sub(t0)));
            }
        }
        check_errors(&client)?;
        ctl::send_samples(ctl, &times)
    }

    fn turns_client(ctl: BorrowedFd<'_>, socket: &str) -> Res<()> {
        let client = Client::connect_to(socket)?;
        let buffer = client.alloc(4096)?;
        count_in_window(ctl, || {
            drop(buffer.begin(Access::CpuWrite)?);
            Ok(())
        })?;
        check_errors(&client)
    }

    /// Holds `count` idle connections to the daemon while the parent says
    /// so (word 1: open them, word 0: close them); one process, so that a
    /// thousand clients do not mean a thousand processes to schedule.
    fn idle_clients(ctl: BorrowedFd<'_>, socket: &str, count: usize) -> Res<()> {
        let mut clients = Vec::with_capacity(count);
        loop {
            let open = match ctl::recv_words(ctl) {
                Ok((words, _)) => words.first() == Some(&1),
                Err(err) => match err.downcast_ref::<RecvError>() {
                    Some(RecvError::Closed) => return Ok(()),
                    _ => return Err(err),
                },
            };
            if open {
                for _ in clients.len()..count {
                    clients.push(Client::connect_to(socket)?);
                }
            } else {
                clients.clear();
            }
            ctl::send_words(ctl, &[clients.len() as u64], &[])?;
        }
    }

    fn ring_broker(ctl: BorrowedFd<'_>, socket: &str, frame: usize) -> Res<()> {
        let client = Client::connect_to(socket)?;
        let buffers = (0..RING)
            .map(|_| Ok(client.import(&ctl::recv_text(ctl)?.parse()?)?))
            .collect::<Res<Vec<_>>>()?;
        let (_, mut fds) = ctl::recv_words(ctl)?;
        let mut to_producer = File::from(fds.pop().ok_or("no pipe")?);
        let mut from_producer = File::from(fds.pop().ok_or("no pipe")?);
        let mut waits = Vec::new();
        let mut check = |idx: usize, byte: u8| -> Res<()> {
            let asked = Instant::now();
            let guard = buffers[idx].begin(Access::CpuRead)?;
            waits.push(asked.elapsed());
            check_frame(&guard.bytes()?, byte, frame)?;
            drop(guard);
            Ok(())
        };
        consume_frames(&mut check, &mut from_producer, &mut to_producer)?;
        check_errors(&client)?;
        ctl::send_latency(ctl, Metric::latency(&mut waits))
    }
}

/// The report: one table of broker benchmarks against their floors, the
/// floors themselves, and the CPU split.
mod report {
    use super::*;

    fn micros(d: Duration) -> String {
        format!("{:.2} µs", d.as_secs_f64() * 1e6)
    }

    pub fn metric(m: &Metric) -> String {
        match m {
            Metric::Latency { median, p99 } => {
                format!("{} (p99 {})", micros(*median), micros(*p99))
            }
            Metric::Rate { per_s, unit } => format!("{per_s:.0} {unit}"),
        }
    }

    fn target(t: Option<Target>) -> String {
        match t {
            Some(Target::AtMost(x)) => format!("≤ {x}x"),
            Some(Target::AtLeast(x)) => format!("≥ {x}x"),
            None => "–".into(),
        }
    }

    fn cpu(d: Option<Duration>) -> String {
        d.map_or_else(|| "–".into(), micros)
    }

    pub fn markdown(bench: &Bench, took: Duration) -> String {
        let settings = &bench.settings;
        let mut out = String::new();
        let mode = if settings.quick { "quick" } else { "full" };
        let _ = writeln!(
            out,
            "## dmabroker benchmarks ({mode} run: {} round(s), {:.0} s; kernel {}, {} CPUs)\n",
            settings.rounds(),
            took.as_secs_f64(),
            kernel_release(),
            Placement::AllCpus
                .cpus()
                .map_or(0, |set| (0..CpuSet::count())
                    .filter(|&c| set.is_set(c).unwrap_or(false))
                    .count())
        );
        let _ = writeln!(
            out,
            "Load average (1 min) before: {:.2}, after: {:.2}. Anything above ~0.3 means other \
             work shared the CPUs and the ratios are less trustworthy.\n",
            bench.load_before,
            load_average()
        );
        if !bench.rows.is_empty() || bench.rss.is_some() {
            broker_table(&mut out, &bench.rows, bench.rss);
        }
        let _ = writeln!(out, "| Floor | Value | What |\n|---|---|---|");
        for (name, what) in FLOORS {
            if let Some(rounds) = bench.floors.get(name) {
                let _ = writeln!(
                    out,
                    "| {name} | {} | {what} |",
                    metric(&Measured::median_of(rounds).metric)
                );
            }
        }
        out
    }

    fn broker_table(out: &mut String, rows: &[Row], rss: Option<Rss>) {
        let _ = writeln!(
            out,
            "| Benchmark | Result | Floor | Floor value | Ratio | Rounds' range | Target | Met |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
        for row in rows {
            let met = match row.met() {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "–",
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {:.2}x | {:.2}–{:.2}x | {} | {} |",
                row.name,
                metric(&row.pair.result.metric),
                row.floor_label,
                metric(&row.pair.floor.metric),
                row.ratio(),
                row.pair.spread().0,
                row.pair.spread().1,
                target(row.target),
                met
            );
        }
        if let Some(rss) = rss {
            let _ = writeln!(
                out,
                "| daemon_rss_10k | +{} KiB for {} buffers ({:.2} KiB per buffer) | none: memfd \
                 pages and inodes are kernel memory | – | – | – | – | – |",
                rss.delta_kib(),
                rss.buffers,
                rss.per_buffer_kib()
            );
        }
        let _ = writeln!(
            out,
            "\nCPU per operation (begin+end or alloc+free cycle, transition or request, hand-off \
             cycle, frame): who spends the time.\n\n\
             | Benchmark | client CPU | daemon CPU | floor client CPU | floor server CPU |\n\
             |---|---|---|---|---|"
        );
        for row in rows {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} |",
                row.name,
                cpu(row.pair.result.cpu.client),
                cpu(row.pair.result.cpu.server),
                cpu(row.pair.floor.cpu.client),
                cpu(row.pair.floor.cpu.server)
            );
        }
        let _ = writeln!(out, "\nNotes:\n");
        for row in rows {
            let place = match placement_of(&row.name) {
                Placement::OneCpu => "all processes pinned to one CPU",
                Placement::AllCpus => "all CPUs",
            };
            let _ = writeln!(out, "- {} ({place}): {}", row.name, row.note);
        }
        if let Some(rss) = rss {
            let _ = writeln!(
                out,
                "- daemon_rss_10k: the daemon's VmRSS {} KiB before and {} KiB after one client \
                 allocated {} 4 KiB buffers",
                rss.before_kib, rss.after_kib, rss.buffers
            );
        }
        let _ = writeln!(out);
    }

    /// The 1-minute load average: other processes competing for the CPUs
    /// skew every figure here.
    pub fn load_average() -> f64 {
        std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|l| l.split_whitespace().next().and_then(|v| v.parse().ok()))
            .unwrap_or(f64::NAN)
    }

    fn kernel_release() -> String {
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|r| r.trim().to_owned())
            .unwrap_or_else(|_| "?".into())
    }
}

/// The hand-off latency plot: cumulative distributions drawn into an
/// indexed-colour image and written as a PNG, with a 3×5 pixel font for
/// the labels. Small enough to carry here rather than a plotting crate.
mod plot {
    use super::*;

    const WIDTH: usize = 640;
    const HEIGHT: usize = 400;
    const LEFT: usize = 60;
    const RIGHT: usize = 20;
    const TOP: usize = 40;
    const BOTTOM: usize = 50;
    /// Font pixels are drawn as SCALE × SCALE squares.
    const SCALE: usize = 2;

    // Palette indices.
    const WHITE: u8 = 0;
    const BLACK: u8 = 1;
    const GREY: u8 = 2;
    pub const BLUE: u8 = 3;
    pub const ORANGE: u8 = 4;
    const PALETTE: [[u8; 3]; 5] = [
        [255, 255, 255],
        [0, 0, 0],
        [215, 215, 215],
        [31, 119, 180],
        [255, 127, 14],
    ];

    /// One CDF curve per series (label, colour, samples), over a shared
    /// latency axis from 0 to the largest series' 99.5th percentile.
    pub fn latency_cdf(series: &[(&str, u8, &Vec<Duration>)]) -> Vec<u8> {
        let sorted: Vec<(&str, u8, Vec<f64>)> = series
            .iter()
            .map(|(label, colour, samples)| {
                let mut us: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e6).collect();
                us.sort_by(f64::total_cmp);
                (*label, *colour, us)
            })
            .collect();
        let high = sorted
            .iter()
            .filter(|(_, _, us)| !us.is_empty())
            .map(|(_, _, us)| us[(us.len() * 995 / 1000).min(us.len() - 1)])
            .fold(1.0, f64::max);
        let step = tick_step(high);
        let x_max = (high / step).ceil() * step;
        let mut canvas = Canvas::new();
        canvas.axes(x_max, step);
        // The legend goes bottom right, where both curves have reached 1.
        let legend_top = HEIGHT - BOTTOM - 20 - 14 * sorted.len();
        for (i, (label, colour, us)) in sorted.iter().enumerate() {
            canvas.curve(us, x_max, *colour);
            let y = legend_top + i * 14;
            canvas.rect(LEFT + 290, y, 16, 6, *colour);
            let label = format!("{label} N={}", us.len());
            canvas.text(LEFT + 312, y - 2, &label, BLACK);
        }
        canvas.text(LEFT, 12, "HANDOFF LATENCY: FRACTION OF SAMPLES <= X", BLACK);
        canvas.text(WIDTH / 2 - 40, HEIGHT - 18, "LATENCY (US)", BLACK);
        png(&canvas.pixels)
    }

    /// 1, 2 or 5 times a power of ten, giving at most about 8 ticks.
    fn tick_step(high: f64) -> f64 {
        let raw = high / 8.0;
        let power = 10f64.powf(raw.log10().floor());
        [1.0, 2.0, 5.0, 10.0]
            .iter()
            .map(|m| m * power)
            .find(|&s| s >= raw)
            .unwrap_or(10.0 * power)
    }

    struct Canvas {
        pixels: Vec<u8>,
    }

    impl Canvas {
        fn new() -> Canvas {
            Canvas {
                pixels: vec![WHITE; WIDTH * HEIGHT],
            }
        }

        fn set(&mut self, x: usize, y: usize, colour: u8) {
            if x < WIDTH && y < HEIGHT {
                self.pixels[y * WIDTH + x] = colour;
            }
        }

        fn rect(&mut self, x: usize, y: usize, w: usize, h: usize, colour: u8) {
            for dy in 0..h {
                for dx in 0..w {
                    self.set(x + dx, y + dy, colour);
                }
            }
        }

        fn plot_width() -> usize {
            WIDTH - LEFT - RIGHT
        }

        fn plot_height() -> usize {
            HEIGHT - TOP - BOTTOM
        }

        /// Grid, axes and tick labels: latency ticks every `step` µs,
        /// fractions every 0.25.
        fn axes(&mut self, x_max: f64, step: f64) {
            let (w, h) = (Self::plot_width(), Self::plot_height());
            let ticks = (x_max / step).round() as usize;
            for i in 0..=ticks {
                let x = LEFT + i * w / ticks;
                self.rect(x, TOP, 1, h, GREY);
                let label = format!("{}", step * i as f64);
                self.text(
                    x.saturating_sub(label.len() * 4 * SCALE / 2),
                    TOP + h + 8,
                    &label,
                    BLACK,
                );
            }
            for (i, label) in ["1", "0.75", "0.5", "0.25", "0"].iter().enumerate() {
                let y = TOP + i * h / 4;
                self.rect(LEFT, y, w, 1, GREY);
                self.text(LEFT - 8 - label.len() * 4 * SCALE, y - 5, label, BLACK);
            }
            self.rect(LEFT, TOP + h, w, 1, BLACK);
            self.rect(LEFT, TOP, 1, h, BLACK);
        }

        /// The empirical CDF of `sorted` (µs), two pixels thick.
        fn curve(&mut self, sorted: &[f64], x_max: f64, colour: u8) {
            if sorted.is_empty() {
                return;
            }
            let (w, h) = (Self::plot_width(), Self::plot_height());
            let mut previous_y = TOP + h;
            for px in 0..=w {
                let latency = x_max * px as f64 / w as f64;
                let below = sorted.partition_point(|&v| v <= latency);
                let y = TOP + h - below * h / sorted.len();
                let (from, to) = (y.min(previous_y), y.max(previous_y));
                self.rect(LEFT + px, from.saturating_sub(1), 2, to - from + 2, colour);
                previous_y = y;
            }
        }

        fn text(&mut self, x: usize, y: usize, text: &str, colour: u8) {
            for (i, c) in text.chars().enumerate() {
                let Some(rows) = glyph(c) else { continue };
                for (row, bits) in rows.iter().enumerate() {
                    for (col, pixel) in bits.chars().enumerate() {
                        if pixel == '#' {
                            let px = x + (i * 4 + col) * SCALE;
                            self.rect(px, y + row * SCALE, SCALE, SCALE, colour);
                        }
                    }
                }
            }
        }
    }

    /// A 3×5 font covering the labels' characters.
    fn glyph(c: char) -> Option<[&'static str; 5]> {
        Some(match c {
            '0' => ["###", "#.#", "#.#", "#.#", "###"],
            '1' => [".#.", "##.", ".#.", ".#.", "###"],
            '2' => ["###", "..#", "###", "#..", "###"],
            '3' => ["###", "..#", "###", "..#", "###"],
            '4' => ["#.#", "#.#", "###", "..#", "..#"],
            '5' => ["###", "#..", "###", "..#", "###"],
            '6' => ["###", "#..", "###", "#.#", "###"],
            '7' => ["###", "..#", "..#", "..#", "..#"],
            '8' => ["###", "#.#", "###", "#.#", "###"],
            '9' => ["###", "#.#", "###", "..#", "###"],
            '.' => ["...", "...", "...", "...", ".#."],
            ':' => ["...", ".#.", "...", ".#.", "..."],
            '-' => ["...", "...", "###", "...", "..."],
            '=' => ["...", "###", "...", "###", "..."],
            '<' => ["..#", ".#.", "#..", ".#.", "..#"],
            '(' => [".#.", "#..", "#..", "#..", ".#."],
            ')' => [".#.", "..#", "..#", "..#", ".#."],
            'A' => [".#.", "#.#", "###", "#.#", "#.#"],
            'B' => ["##.", "#.#", "##.", "#.#", "##."],
            'C' => [".##", "#..", "#..", "#..", ".##"],
            'D' => ["##.", "#.#", "#.#", "#.#", "##."],
            'E' => ["###", "#..", "##.", "#..", "###"],
            'F' => ["###", "#..", "##.", "#..", "#.."],
            'G' => [".##", "#..", "#.#", "#.#", ".##"],
            'H' => ["#.#", "#.#", "###", "#.#", "#.#"],
            'I' => ["###", ".#.", ".#.", ".#.", "###"],
            'K' => ["#.#", "#.#", "##.", "#.#", "#.#"],
            'L' => ["#..", "#..", "#..", "#..", "###"],
            'M' => ["#.#", "###", "###", "#.#", "#.#"],
            'N' => ["##.", "#.#", "#.#", "#.#", "#.#"],
            'O' => [".#.", "#.#", "#.#", "#.#", ".#."],
            'P' => ["##.", "#.#", "##.", "#..", "#.."],
            'R' => ["##.", "#.#", "##.", "#.#", "#.#"],
            'S' => [".##", "#..", ".#.", "..#", "##."],
            'T' => ["###", ".#.", ".#.", ".#.", ".#."],
            'U' => ["#.#", "#.#", "#.#", "#.#", "###"],
            'W' => ["#.#", "#.#", "###", "###", "#.#"],
            'X' => ["#.#", "#.#", ".#.", "#.#", "#.#"],
            'Y' => ["#.#", "#.#", ".#.", ".#.", ".#."],
            _ => return None,
        })
    }

    /// An 8-bit indexed-colour PNG. The image data goes in "stored"
    /// (uncompressed) deflate blocks: a valid zlib stream with no
    /// compressor to carry.
    fn png(pixels: &[u8]) -> Vec<u8> {
        let mut scanlines = Vec::with_capacity((WIDTH + 1) * HEIGHT);
        for row in pixels.chunks(WIDTH) {
            scanlines.push(0); // filter: none
            scanlines.extend_from_slice(row);
        }
        let mut header = Vec::new();
        header.extend_from_slice(&(WIDTH as u32).to_be_bytes());
        header.extend_from_slice(&(HEIGHT as u32).to_be_bytes());
        header.extend_from_slice(&[8, 3, 0, 0, 0]); // 8 bits, palette
        let palette: Vec<u8> = PALETTE.iter().flatten().copied().collect();
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        chunk(&mut out, b"IHDR", &header);
        chunk(&mut out, b"PLTE", &palette);
        chunk(&mut out, b"IDAT", &zlib_stored(&scanlines));
        chunk(&mut out, b"IEND", &[]);
        out
    }

    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let start = out.len();
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        let crc = crc32(&out[start..]);
        out.extend_from_slice(&crc.to_be_bytes());
    }

    fn zlib_stored(data: &[u8]) -> Vec<u8> {
        let mut out = vec![0x78, 0x01]; // deflate, 32 KiB window, no dictionary
        let blocks: Vec<&[u8]> = data.chunks(u16::MAX as usize).collect();
        for (i, block) in blocks.iter().enumerate() {
            out.push(u8::from(i + 1 == blocks.len())); // BFINAL, BTYPE = stored
            let len = block.len() as u16;
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(&(!len).to_le_bytes());
            out.extend_from_slice(block);
        }
        out.extend_from_slice(&adler32(data).to_be_bytes());
        out
    }

    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &byte in bytes {
            crc ^= u32::from(byte);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    fn adler32(bytes: &[u8]) -> u32 {
        let (mut a, mut b) = (1u32, 0u32);
        for &byte in bytes {
            a = (a + u32::from(byte)) % 65_521;
            b = (b + a) % 65_521;
        }
        (b << 16) | a
    }
}
