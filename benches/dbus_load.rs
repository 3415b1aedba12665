//! Does D-Bus introspection slow the data path?
//!
//! The real daemon on a private `dbus-daemon`, with some clients and
//! buffers so that snapshots are not trivially small. One client measures
//! begin→grant round trips on a buffer of its own (the data path) in three
//! alternating phases:
//!
//! - quiet: no D-Bus traffic;
//! - floor: 1,000 calls per second to the bus itself (`GetId`), which the
//!   daemon never sees: what D-Bus traffic on this machine costs anyway;
//! - debug: 1,000 calls per second to the daemon's debug interface, every
//!   read-only method and property in turn.
//!
//! The target: the data path's p99 under the debug load within 20% of its
//! p99 when quiet. Phases alternate in short rounds so that drift in the
//! machine's load (other processes on a shared machine) hits all three
//! alike; the verdict uses the median over rounds of each round's p99
//! ratio, which one noisy round cannot swing, and the floor says how much
//! of any excess D-Bus traffic as such accounts for.
//!
//! Placement: on a machine with two CPUs or more, the data path (this
//! process's measuring thread and the daemon's main thread, which serves
//! every client) runs on one CPU and everything D-Bus (the load generator,
//! a process of its own as a monitoring tool would be, `dbus-daemon` and
//! the daemon's `dbus` thread) on another. What is
//! left to measure is what the daemon's design costs the data path: the
//! broker's lock, shared allocator and kernel structures, interrupts. Left
//! to the scheduler on a small machine, the figure measures CPU placement
//! instead: one call costs about 200 µs of CPU across the load generator,
//! the bus and the daemon, and on a 2-vCPU VM a wake-up that lands on the
//! other, halted vCPU costs tens of microseconds by itself (see
//! docs/BENCHMARKS.md for both figures). `DMABROKER_BENCH_PIN=0` leaves
//! placement to the scheduler.
//!
//! `cargo bench --bench dbus_load`; `DMABROKER_BENCH_ROUNDS` (default 20),
//! `DMABROKER_BENCH_ITERS` (round trips per phase, default 5000),
//! `DMABROKER_BENCH_METHOD` (one of the debug methods alone, to find which
//! costs what) and
//! `DMABROKER_BENCH_PACE_US` (time between round trips, default 100; 0
//! spins, which on a small machine measures CPU contention more than the
//! daemon) tune it.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dmabroker_client::{Access, Buffer, Client};
use dmabroker_daemon::dbus::proxy::DebugProxy;
use dmabroker_suite::dbus::DbusDaemon;
use dmabroker_suite::{Daemon, DaemonOptions};
use nix::sched::{sched_setaffinity, CpuSet};
use nix::unistd::Pid;

/// D-Bus calls per second during the loaded phases.
const RATE: u64 = 1000;
const LIMIT: f64 = 1.20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Phase {
    Quiet = 0,
    Floor = 1,
    Debug = 2,
}

const PHASES: [Phase; 3] = [Phase::Quiet, Phase::Floor, Phase::Debug];

/// The debug load's mix, in turn; `DMABROKER_BENCH_METHOD` picks one.
const METHODS: [&str; 7] = [
    "ListBuffers",
    "ListClients",
    "Statistics",
    "GetBuffer",
    "Totals",
    "Heaps",
    "Version",
];

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Which CPU the data path and the D-Bus side run on; `None` leaves it to
/// the scheduler.
#[derive(Clone, Copy, Debug)]
struct Split {
    data_path: usize,
    dbus: usize,
}

fn split() -> Option<Split> {
    if std::env::var("DMABROKER_BENCH_PIN").is_ok_and(|v| v == "0") {
        return None;
    }
    match dmabroker_suite::proc::allowed_cpus()[..] {
        [data_path, dbus, ..] => Some(Split { data_path, dbus }),
        _ => None,
    }
}

/// Pins one thread (`0`: the calling one); a process id names its main
/// thread only, so other threads of that process keep their own placement.
fn pin(tid: u32, cpu: usize) {
    let mut set = CpuSet::new();
    set.set(cpu).expect("CPU number in range");
    let tid = i32::try_from(tid).expect("thread id");
    sched_setaffinity(Pid::from_raw(tid), &set).expect("sched_setaffinity");
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// `pace` apart (back to back when zero): a pipeline begins and ends
/// accesses per frame, it does not spin on them.
fn measure(buffer: &Buffer, iterations: usize, pace: Duration) -> Vec<Duration> {
    let mut samples = Vec::with_capacity(iterations);
    let mut next = Instant::now();
    for _ in 0..iterations {
        next += pace;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let start = Instant::now();
        let guard = buffer.begin(Access::CpuWrite).expect("begin");
        samples.push(start.elapsed());
        guard.end().expect("end");
    }
    samples.sort_unstable();
    samples
}

/// What the load thread shares with the measuring one.
struct Load {
    phase: AtomicU8,
    stop: AtomicBool,
    answered: AtomicU64,
}

/// Calls at [`RATE`] per second while the phase asks for it, each call in
/// its own task so that a slow reply does not lower the rate.
fn load(address: String, buffer: u64, shared: Arc<Load>) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let connection = zbus::connection::Builder::address(address.as_str())
            .expect("address")
            .build()
            .await
            .expect("connect to the test bus");
        let bus = zbus::fdo::DBusProxy::new(&connection)
            .await
            .expect("bus proxy");
        let debug = DebugProxy::builder(&connection)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
            .expect("debug proxy");
        let mut ticker = tokio::time::interval(Duration::from_micros(1_000_000 / RATE));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let only = std::env::var("DMABROKER_BENCH_METHOD").ok().map(|m| {
            METHODS
                .iter()
                .position(|known| *known == m)
                .unwrap_or_else(|| panic!("DMABROKER_BENCH_METHOD: one of {METHODS:?}"))
                as u64
        });
        let mut n = 0u64;
        while !shared.stop.load(Ordering::Relaxed) {
            ticker.tick().await;
            let phase = shared.phase.load(Ordering::Relaxed);
            if phase == Phase::Quiet as u8 {
                continue;
            }
            n += 1;
            let (bus, debug, shared) = (bus.clone(), debug.clone(), Arc::clone(&shared));
            tokio::spawn(async move {
                let ok = if phase == Phase::Floor as u8 {
                    bus.get_id().await.is_ok()
                } else {
                    let pick = match only {
                        Some(method) => method,
                        None => n % 7,
                    };
                    match pick {
                        0 => debug.list_buffers().await.is_ok(),
                        1 => debug.list_clients().await.is_ok(),
                        2 => debug.statistics().await.is_ok(),
                        3 => debug.get_buffer(buffer).await.is_ok(),
                        4 => debug.totals().await.is_ok(),
                        5 => debug.heaps().await.is_ok(),
                        _ => debug.version().await.is_ok(),
                    }
                };
                if ok {
                    shared.answered.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
}

#[derive(Default)]
struct Tally {
    samples: Vec<Duration>,
    calls: u64,
    time: Duration,
}

/// The load generator's process: this executable run again as
/// `__load ADDRESS BUFFER CPU|-`, like a monitoring tool would be a
/// process of its own. (As a thread of the measuring process it shared
/// that process's address space, so its allocator's unmaps interrupted
/// the data path's CPU.) Commands arrive on stdin, one byte each: a
/// [`Phase`], or [`REPORT`] to write the number of answered calls so far
/// to stdout; end of input stops it.
fn load_child(args: &[String]) {
    let [address, buffer, cpu] = args else {
        panic!("usage: __load ADDRESS BUFFER CPU|-");
    };
    if let Ok(cpu) = cpu.parse() {
        pin(0, cpu);
    }
    let buffer: u64 = buffer.parse().expect("buffer id");
    let shared = Arc::new(Load {
        phase: AtomicU8::new(Phase::Quiet as u8),
        stop: AtomicBool::new(false),
        answered: AtomicU64::new(0),
    });
    let commands = Arc::clone(&shared);
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        let mut byte = [0u8; 1];
        while std::io::stdin().read_exact(&mut byte).is_ok() {
            if byte[0] == REPORT {
                let answered = commands.answered.load(Ordering::Relaxed);
                let mut out = std::io::stdout().lock();
                out.write_all(&answered.to_ne_bytes()).expect("report");
                out.flush().expect("report");
            } else {
                commands.phase.store(byte[0], Ordering::Relaxed);
            }
        }
        commands.stop.store(true, Ordering::Relaxed);
    });
    load(address.clone(), buffer, shared);
}

/// Asks the load generator for its count of answered calls.
const REPORT: u8 = 0xff;

/// The measuring side's handle on the load generator's process.
struct Loader {
    child: std::process::Child,
    commands: std::process::ChildStdin,
    reports: std::process::ChildStdout,
}

impl Loader {
    fn spawn(address: &str, buffer: u64, cpu: Option<usize>) -> Loader {
        let mut child = std::process::Command::new(std::env::current_exe().expect("own path"))
            .args(["__load", address, &buffer.to_string()])
            .arg(cpu.map_or("-".to_owned(), |cpu| cpu.to_string()))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start the load generator");
        let commands = child.stdin.take().expect("its stdin");
        let reports = child.stdout.take().expect("its stdout");
        Loader {
            child,
            commands,
            reports,
        }
    }

    fn send(&mut self, byte: u8) {
        use std::io::Write;
        self.commands
            .write_all(&[byte])
            .expect("command the load generator");
    }

    fn set_phase(&mut self, phase: Phase) {
        self.send(phase as u8);
    }

    fn answered(&mut self) -> u64 {
        use std::io::Read;
        self.send(REPORT);
        let mut count = [0u8; 8];
        self.reports
            .read_exact(&mut count)
            .expect("the load generator's count");
        u64::from_ne_bytes(count)
    }

    fn stop(self) {
        let Loader {
            mut child,
            commands,
            reports,
        } = self;
        drop((commands, reports));
        let _ = child.wait();
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("__load") {
        load_child(&args[1..]);
        return;
    }
    // `cargo bench` passes --bench; `cargo test --benches` does not, and a
    // benchmark has nothing to check there.
    if !args.iter().any(|a| a == "--bench") {
        return;
    }
    let rounds = env_or("DMABROKER_BENCH_ROUNDS", 20).max(1);
    let iterations = env_or("DMABROKER_BENCH_ITERS", 5_000).max(100);
    let pace = Duration::from_micros(env_or("DMABROKER_BENCH_PACE_US", 100) as u64);
    if let Err(err) = dmabroker_suite::daemon::build_release_daemon() {
        panic!("{err}");
    }
    let bus = DbusDaemon::start();
    let split = split();
    let mut args = bus.daemon_args();
    if let Some(split) = split {
        args.extend(["--dbus-cpus".into(), split.dbus.to_string()]);
    }
    let daemon = Daemon::start_with(DaemonOptions {
        args,
        env: vec![("RUST_LOG".into(), "warn".into())],
        ..Default::default()
    });
    bus.wait_for_daemon();

    // Background: 8 clients with 16 buffers each.
    let others: Vec<(Client, Vec<Buffer>)> = (0..8)
        .map(|_| {
            let client = daemon.client();
            let buffers = (0..16)
                .map(|_| client.alloc(64 << 10).expect("alloc"))
                .collect();
            (client, buffers)
        })
        .collect();
    // The measured client asks the daemon for every begin: in its buffer
    // word an uncontended begin would never reach the daemon, and this
    // bench is about what the D-Bus side costs the daemon's data path.
    let client = daemon.message_path_client().expect("connect");
    let buffer = client.alloc(4096).expect("alloc");
    let detailed = others[0].1[0].id();

    let placement = match split {
        Some(split) => {
            // The daemon's D-Bus thread went to its CPU by --dbus-cpus.
            pin(0, split.data_path);
            pin(daemon.pid(), split.data_path);
            pin(bus.pid(), split.dbus);
            format!(
                "data path (this client, the daemon's main thread) on CPU {}, \
                 D-Bus (load generator process, dbus-daemon, the daemon's dbus thread) on CPU {}",
                split.data_path, split.dbus
            )
        }
        None => "left to the scheduler".to_owned(),
    };
    let mut loader = Loader::spawn(bus.address(), detailed, split.map(|s| s.dbus));

    measure(&buffer, iterations / 4, pace); // warm-up
    let mut tallies: [Tally; 3] = Default::default();
    // Per round: p99 of floor and of debug over p99 of quiet.
    let mut round_ratios: Vec<(f64, f64)> = Vec::new();
    println!(
        "dbus_load: {rounds} rounds of {iterations} begin/end round trips {pace:?} apart; \
         phases: quiet, {RATE} calls/s to the bus (floor), {RATE} calls/s to the daemon (debug)"
    );
    println!("dbus_load: placement: {placement}");
    for round in 1..=rounds {
        let mut line = format!("  round {round:>2}:");
        let mut round_p99 = [Duration::ZERO; 3];
        for phase in PHASES {
            loader.set_phase(phase);
            std::thread::sleep(Duration::from_millis(100));
            let before = loader.answered();
            let start = Instant::now();
            let samples = measure(&buffer, iterations, pace);
            let took = start.elapsed();
            let calls = loader.answered() - before;
            round_p99[phase as usize] = percentile(&samples, 0.99);
            line.push_str(&format!(
                " {phase:?} p50 {:>6.1?} p99 {:>7.1?}",
                percentile(&samples, 0.5),
                percentile(&samples, 0.99)
            ));
            if phase != Phase::Quiet {
                line.push_str(&format!(" ({:.0}/s)", calls as f64 / took.as_secs_f64()));
            }
            line.push_str(" |");
            let tally = &mut tallies[phase as usize];
            tally.samples.extend(samples);
            tally.calls += calls;
            tally.time += took;
        }
        loader.set_phase(Phase::Quiet);
        let quiet = round_p99[0].as_secs_f64();
        round_ratios.push((
            round_p99[1].as_secs_f64() / quiet,
            round_p99[2].as_secs_f64() / quiet,
        ));
        println!("{}", line.trim_end_matches(" |"));
    }
    loader.stop();

    let mut p99 = [Duration::ZERO; 3];
    for phase in PHASES {
        let tally = &mut tallies[phase as usize];
        tally.samples.sort_unstable();
        p99[phase as usize] = percentile(&tally.samples, 0.99);
        println!(
            "dbus_load: {phase:?}: p50 {:.1?}, p99 {:.1?}{}",
            percentile(&tally.samples, 0.5),
            p99[phase as usize],
            if phase == Phase::Quiet {
                String::new()
            } else {
                format!(
                    " at {:.0} calls/s",
                    tally.calls as f64 / tally.time.as_secs_f64()
                )
            }
        );
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let floor = median(round_ratios.iter().map(|r| r.0).collect());
    let debug = median(round_ratios.iter().map(|r| r.1).collect());
    let pooled = p99[2].as_secs_f64() / p99[0].as_secs_f64();
    println!(
        "dbus_load: p99 debug/quiet: median of rounds {debug:.2}, pooled {pooled:.2} \
         (target <= {LIMIT:.2}: {}); floor/quiet: median {floor:.2}; {}",
        if debug <= LIMIT { "met" } else { "NOT MET" },
        if split.is_some() {
            "data path and D-Bus on CPUs of their own"
        } else {
            "placement left to the scheduler"
        },
    );
    drop(others);
}
