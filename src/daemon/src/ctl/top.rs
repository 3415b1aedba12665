//! `dmabrokerctl top`: clients by bytes or by how long they wait, with
//! daemon-wide rates, refreshed every second (like `pw-top`).

use std::io::Write;
use std::time::{Duration, Instant};

use clap::ValueEnum;
use serde::Serialize;
use tokio::signal::unix::{signal, Signal, SignalKind};

use super::allocating;
use super::bus::Daemon;
use super::error::CtlError;
use super::format::{bytes, json, micros, or_dash};
use super::table::Table;
use super::terminal::{Keys, Screen, CLEAR};
use crate::dbus::views::{ClientAllocations, ClientView, Statistics, Totals};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SortKey {
    /// Bytes charged, largest first.
    Bytes,
    /// Longest current wait, then most requests waiting.
    Wait,
}

#[derive(Clone, Debug)]
pub struct TopOptions {
    pub sort: SortKey,
    pub interval: Duration,
    /// Stop after this many refreshes (like `top -n`).
    pub iterations: Option<u64>,
    pub json: bool,
}

/// One refresh, as `--json` prints it (one object per line).
#[derive(Debug, Serialize)]
struct Frame {
    sort: SortKey,
    totals: Totals,
    statistics: Statistics,
    /// Per second since the previous refresh; absent on the first.
    rates: Option<Rates>,
    clients: Vec<ClientView>,
    /// The clients with allocations in flight (see `ctl::allocating`);
    /// left out against a daemon too old to say.
    #[serde(skip_serializing_if = "Option::is_none")]
    allocations_in_flight: Option<Vec<ClientAllocations>>,
}

#[derive(Clone, Copy, Debug, Serialize)]
struct Rates {
    grants: f64,
    waits: f64,
    allocations: f64,
    frees: f64,
}

fn rates(before: &Statistics, now: &Statistics, elapsed: Duration) -> Rates {
    let secs = elapsed.as_secs_f64().max(1e-3);
    let per_sec = |a: u64, b: u64| b.saturating_sub(a) as f64 / secs;
    Rates {
        grants: per_sec(before.grants, now.grants),
        waits: per_sec(before.waits, now.waits),
        allocations: per_sec(before.allocations, now.allocations),
        frees: per_sec(before.frees, now.frees),
    }
}

fn sort(clients: &mut [ClientView], key: SortKey) {
    match key {
        SortKey::Bytes => clients.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.id.cmp(&b.id))),
        SortKey::Wait => clients.sort_by(|a, b| {
            b.longest_wait_us
                .cmp(&a.longest_wait_us)
                .then(b.requests_waiting.cmp(&a.requests_waiting))
                .then(a.id.cmp(&b.id))
        }),
    }
}

pub async fn run(daemon: &Daemon, options: TopOptions) -> Result<(), CtlError> {
    // Listened for from the start, before the screen is taken over, and
    // through the whole loop, a refresh's calls included: a signal that
    // came while nothing listened was lost (once tokio's handler is in,
    // SIGINT no longer kills the process), and a daemon that stopped
    // answering then left `top` deaf to Ctrl-C. Quitting this way leaves
    // the terminal as it was.
    let mut quit = Quit::listen()?;
    let screen = if options.json {
        None
    } else {
        Some(Screen::enter())
    };
    // Under --json, no keys: a frame redrawn for one was a line more for
    // the script reading them, and raw mode (tcsetattr) from the
    // background of an interactive shell stops `top` with SIGTTOU, as
    // reading its stdin there would with SIGTTIN.
    let mut keys = (!options.json).then(Keys::listen);
    let mut view = View {
        sort: options.sort,
        last: None,
        json: options.json,
    };
    let mut previous: Option<(Statistics, Instant)> = None;
    let mut shown = 0u64;
    let mut ticker = tokio::time::interval(options.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut keys_open = true;
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                let frame = tokio::select! {
                    frame = fetch(daemon, view.sort, &mut previous) => frame?,
                    _ = quit.asked() => break,
                };
                draw(&frame, daemon, &options, screen.as_ref())?;
                view.last = Some(frame);
                shown += 1;
                if options.iterations.is_some_and(|n| shown >= n) {
                    break;
                }
            }
            key = next_key(keys.as_mut()), if keys_open => match key {
                Some(key) => match view.press(key) {
                    Press::Quit => break,
                    Press::Draw(frame) => draw(frame, daemon, &options, screen.as_ref())?,
                    Press::Nothing => {}
                },
                None => keys_open = false,
            },
            _ = quit.asked() => break,
        }
    }
    Ok(())
}

/// The next key pressed; `None` once there are no more (stdin closed) or
/// none are read.
async fn next_key(keys: Option<&mut Keys>) -> Option<u8> {
    keys?.presses.recv().await
}

/// The order `top` sorts by and the frame it showed last, which a new
/// order redraws at once rather than a refresh later.
#[derive(Debug)]
struct View {
    sort: SortKey,
    last: Option<Frame>,
    /// Keys do nothing: `--json` prints a line per refresh and no other.
    json: bool,
}

/// What a key press asks of the loop.
#[derive(Debug)]
enum Press<'a> {
    Quit,
    /// This frame, shown again in the new order.
    Draw(&'a Frame),
    Nothing,
}

impl View {
    fn press(&mut self, key: u8) -> Press<'_> {
        if self.json {
            return Press::Nothing;
        }
        let sort_key = match key {
            b'q' => return Press::Quit,
            b'b' => SortKey::Bytes,
            b'w' => SortKey::Wait,
            _ => return Press::Nothing,
        };
        self.sort = sort_key;
        match self.last.as_mut() {
            Some(frame) => {
                frame.sort = sort_key;
                sort(&mut frame.clients, sort_key);
                Press::Draw(frame)
            }
            None => Press::Nothing,
        }
    }
}

/// SIGINT (Ctrl-C) and SIGTERM, which end `top` as `q` does.
struct Quit {
    interrupt: Signal,
    terminate: Signal,
}

impl Quit {
    fn listen() -> Result<Quit, CtlError> {
        Ok(Quit {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    async fn asked(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}

async fn fetch(
    daemon: &Daemon,
    sort_key: SortKey,
    previous: &mut Option<(Statistics, Instant)>,
) -> Result<Frame, CtlError> {
    let proxy = &daemon.proxy;
    let totals = proxy
        .totals()
        .await
        .map_err(|e| daemon.error("Totals", e))?;
    let statistics = proxy
        .statistics()
        .await
        .map_err(|e| daemon.error("Statistics", e))?;
    let mut clients = proxy
        .list_clients()
        .await
        .map_err(|e| daemon.error("ListClients", e))?;
    sort(&mut clients, sort_key);
    let allocations_in_flight = allocating::fetch(daemon).await?;
    let now = Instant::now();
    let rates = previous
        .as_ref()
        .map(|(before, at)| rates(before, &statistics, now.duration_since(*at)));
    *previous = Some((statistics.clone(), now));
    Ok(Frame {
        sort: sort_key,
        totals,
        statistics,
        rates,
        clients,
        allocations_in_flight,
    })
}

fn draw(
    frame: &Frame,
    daemon: &Daemon,
    options: &TopOptions,
    screen: Option<&Screen>,
) -> Result<(), CtlError> {
    let mut stdout = std::io::stdout().lock();
    if options.json {
        writeln!(stdout, "{}", json(frame, false)?)?;
    } else {
        let on_terminal = screen.is_some_and(Screen::is_terminal);
        let text = render(frame, daemon, options);
        if on_terminal {
            write!(stdout, "{CLEAR}{text}")?;
        } else {
            writeln!(stdout, "{text}")?;
        }
    }
    stdout.flush()?;
    Ok(())
}

fn render(frame: &Frame, daemon: &Daemon, options: &TopOptions) -> String {
    let t = &frame.totals;
    let s = &frame.statistics;
    let sort_name = match frame.sort {
        SortKey::Bytes => "bytes",
        SortKey::Wait => "wait",
    };
    let mut out = format!(
        "dmabroker top on {}, every {}s, sorted by {sort_name} (q quits, b: bytes, w: wait)\n",
        daemon.bus,
        options.interval.as_secs_f64()
    );
    let in_flight = frame.allocations_in_flight.as_deref();
    out.push_str(&format!(
        "clients {}  buffers {} ({})  fences {}  waiters {}",
        t.clients,
        t.buffers,
        bytes(t.bytes),
        t.fences,
        t.waiters,
    ));
    if let Some(in_flight) = in_flight {
        let (allocating, allocating_bytes) = allocating::sum(in_flight);
        out.push_str(&format!(
            "  allocating {allocating} ({})",
            bytes(allocating_bytes)
        ));
    }
    out.push('\n');
    let rate = |f: fn(&Rates) -> f64| {
        frame
            .rates
            .as_ref()
            .map_or("-".to_owned(), |r| format!("{:.0}/s", f(r)))
    };
    out.push_str(&format!(
        "grants {}  waits {} (p50 {}, p99 {})  allocs {}  frees {}  writer lost {}  revoked {}\n\n",
        rate(|r| r.grants),
        rate(|r| r.waits),
        micros(s.wait_p50_us),
        micros(s.wait_p99_us),
        rate(|r| r.allocations),
        rate(|r| r.frees),
        s.writer_lost,
        s.revocations
    ));
    // ALLOCATING before EXE, whose long paths would push it far right;
    // none against a daemon too old to say.
    let mut columns = vec![
        ">ID", ">PID", ">UID", "NAME", ">BUFFERS", ">BYTES", ">HELD", ">WAITING", ">LONGEST",
        "FENCING",
    ];
    if in_flight.is_some() {
        columns.push(">ALLOCATING");
    }
    columns.push("EXE");
    let mut table = Table::new(&columns);
    for c in &frame.clients {
        let mut row = vec![
            c.id.to_string(),
            c.pid.to_string(),
            c.uid.to_string(),
            or_dash(&c.name),
            c.buffers.to_string(),
            bytes(c.bytes),
            c.accesses_held.to_string(),
            c.requests_waiting.to_string(),
            if c.longest_wait_us == 0 {
                "-".to_owned()
            } else {
                micros(c.longest_wait_us)
            },
            c.autofence.clone(),
        ];
        if let Some(in_flight) = in_flight {
            row.push(allocating::cell(in_flight, c.id));
        }
        row.push(or_dash(&c.exe));
        table.row(row);
    }
    out.push_str(&table.render());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(id: u64, bytes: u64, wait: u64) -> ClientView {
        ClientView {
            id,
            bytes,
            longest_wait_us: wait,
            ..Default::default()
        }
    }

    fn frame(clients: Vec<ClientView>) -> Frame {
        Frame {
            sort: SortKey::Bytes,
            totals: Totals::default(),
            statistics: Statistics::default(),
            rates: None,
            clients,
            allocations_in_flight: None,
        }
    }

    #[test]
    fn a_sort_key_redraws_the_last_frame_in_its_order() {
        let mut view = View {
            sort: SortKey::Bytes,
            last: Some(frame(vec![client(1, 10, 500), client(2, 30, 0)])),
            json: false,
        };
        match view.press(b'w') {
            Press::Draw(f) => {
                assert_eq!(f.sort, SortKey::Wait);
                assert_eq!(f.clients.iter().map(|c| c.id).collect::<Vec<_>>(), [1, 2]);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(view.press(b'q'), Press::Quit));
        assert!(matches!(view.press(b'x'), Press::Nothing));
    }

    /// `--json` prints one line per refresh for scripts: a key (stdin a
    /// terminal) prints no line of its own, and quits nothing either.
    #[test]
    fn under_json_keys_draw_nothing() {
        let mut view = View {
            sort: SortKey::Bytes,
            last: Some(frame(vec![client(1, 10, 500), client(2, 30, 0)])),
            json: true,
        };
        for key in [b'b', b'w', b'q'] {
            let press = view.press(key);
            assert!(matches!(press, Press::Nothing), "{key}: {press:?}");
        }
        assert_eq!(view.sort, SortKey::Bytes);
    }

    #[test]
    fn sorts_by_bytes_or_wait() {
        let mut clients = vec![client(1, 10, 500), client(2, 30, 0), client(3, 20, 900)];
        sort(&mut clients, SortKey::Bytes);
        assert_eq!(clients.iter().map(|c| c.id).collect::<Vec<_>>(), [2, 3, 1]);
        sort(&mut clients, SortKey::Wait);
        assert_eq!(clients.iter().map(|c| c.id).collect::<Vec<_>>(), [3, 1, 2]);
    }
}
