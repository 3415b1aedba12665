//! A consumer, as an encoder would be: it imports the camera's buffers and
//! reads every frame it can keep up with, checking each one.
//!
//! ```sh
//! cargo run -p dmabroker-client --example camera -- --fps 30 \
//!     | cargo run -p dmabroker-client --example codec
//! ```
//!
//! At exit (after `--frames`, after `--idle-timeout-ms` without a new frame,
//! or on Ctrl-C) it prints `frames=N torn=N writer_lost=N skipped=N`:
//! frames checked, frames whose checksum did not match (a broker bug when
//! camera and codec both use autofence), grants that said the writer died
//! mid-frame, and frames the camera wrote over before we got to them.

mod frame;

use std::io::BufRead;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use dmabroker_client::{Access, Buffer, ShareToken};
use frame::Contents;

#[derive(Parser)]
#[command(about = "Check the frames a camera writes into shared buffers")]
struct Args {
    /// The broker's socket (default: $DMABROKER_SOCKET or the standard path).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Read the share tokens from this file (one per line) instead of stdin.
    #[arg(long)]
    tokens: Option<PathBuf>,
    /// Tokens to read from stdin: the camera's ring size.
    #[arg(long, default_value_t = 4)]
    buffers: usize,
    /// Stop after checking this many frames.
    #[arg(long)]
    frames: Option<u64>,
    /// Stop when no new frame came for this long (0: never).
    #[arg(long, default_value_t = 5000)]
    idle_timeout_ms: u64,
}

impl Args {
    fn enough(&self, tally: &Tally) -> bool {
        self.frames.is_some_and(|n| tally.frames >= n)
    }
}

/// The counts of the summary line, plus frame numbers that went backwards
/// (the broker mixing up buffers), which fail the run.
#[derive(Default)]
struct Tally {
    frames: u64,
    torn: u64,
    writer_lost: u64,
    skipped: u64,
    backwards: u64,
}

/// Follows the camera round the ring: frame n is in buffer n % ring size.
struct Follower {
    ring: Vec<Buffer>,
    /// The newest frame seen in each buffer.
    newest: Vec<u64>,
    /// Buffers whose last writer died mid-frame: their torn contents were
    /// already reported as `writer_lost` and are not counted again.
    abandoned: Vec<bool>,
    /// The frame we want next; `None` until the first one.
    expected: Option<u64>,
    slot: usize,
    tally: Tally,
}

impl Follower {
    fn new(ring: Vec<Buffer>) -> Follower {
        let n = ring.len();
        Follower {
            ring,
            newest: vec![0; n],
            abandoned: vec![false; n],
            expected: None,
            slot: 0,
            tally: Tally::default(),
        }
    }

    /// Reads the buffer that should hold the next frame. Returns whether a
    /// new frame was there (or a torn one, which also moves us on).
    fn step(&mut self, stop: &AtomicBool) -> dmabroker_client::Result<bool> {
        let slot = self.slot;
        // Waits while the camera is writing this buffer (autofence), or
        // until Ctrl-C.
        let Some(access) = frame::begin_unless_stopped(&self.ring[slot], Access::CpuRead, stop)?
        else {
            return Ok(false);
        };
        let writer_lost = access.writer_lost();
        let contents = frame::check(&access.bytes()?);
        drop(access); // end the read before anything else: the camera may be waiting

        if writer_lost {
            self.tally.writer_lost += 1;
            self.abandoned[slot] = true;
        }
        match contents {
            Contents::Unwritten => Ok(false),
            Contents::Torn if self.abandoned[slot] => Ok(false),
            Contents::Torn => {
                self.tally.torn += 1;
                eprintln!("codec: torn frame in buffer {slot}");
                self.abandoned[slot] = true; // count it once
                self.slot = (slot + 1) % self.ring.len();
                Ok(true)
            }
            Contents::Frame(number) => Ok(self.frame(slot, number)),
        }
    }

    fn frame(&mut self, slot: usize, number: u64) -> bool {
        self.abandoned[slot] = false;
        if number < self.newest[slot] {
            self.tally.backwards += 1;
            eprintln!(
                "codec: buffer {slot} went back from frame {} to {number}",
                self.newest[slot]
            );
        }
        self.newest[slot] = self.newest[slot].max(number);
        match self.expected {
            // The camera has not come round to this buffer yet.
            Some(expected) if number < expected => return false,
            // The camera lapped us: those frames were overwritten unread.
            Some(expected) => self.tally.skipped += number - expected,
            None => {}
        }
        self.tally.frames += 1;
        self.expected = Some(number + 1);
        self.slot = (number + 1) as usize % self.ring.len();
        true
    }
}

fn read_tokens(args: &Args) -> Result<Vec<ShareToken>, Box<dyn std::error::Error>> {
    let lines: Vec<String> = match &args.tokens {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|err| format!("cannot read the tokens from {}: {err}", path.display()))?
            .lines()
            .map(str::to_owned)
            .collect(),
        // The camera keeps running after printing its tokens, so stdin never
        // ends: read exactly as many as it has buffers.
        None => std::io::stdin()
            .lock()
            .lines()
            .map_while(Result::ok)
            .filter(|l| !l.trim().is_empty())
            .take(args.buffers)
            .collect(),
    };
    let tokens = lines
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.trim().parse())
        .collect::<Result<Vec<ShareToken>, _>>()?;
    if tokens.is_empty() {
        return Err("no share tokens given".into());
    }
    Ok(tokens)
}

fn main() -> std::process::ExitCode {
    frame::run("codec", codec)
}

fn codec() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let stop = frame::stop_on_signal();
    let tokens = read_tokens(&args)?;
    let client = frame::connect(args.socket.clone(), "codec")?;
    let ring = tokens
        .iter()
        .map(|token| client.import(token))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| format!("{err} (a camera's tokens work only while that camera runs)"))?;

    let mut follower = Follower::new(ring);
    let idle_timeout = Duration::from_millis(args.idle_timeout_ms);
    let mut last_frame = Instant::now();
    while !stop.load(Ordering::Relaxed) && !args.enough(&follower.tally) {
        if follower.step(&stop)? {
            last_frame = Instant::now();
        } else if args.idle_timeout_ms > 0 && last_frame.elapsed() > idle_timeout {
            break;
        } else {
            // Fences say who may touch a buffer, not when it has news: poll.
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    let t = &follower.tally;
    println!(
        "frames={} torn={} writer_lost={} skipped={}",
        t.frames, t.torn, t.writer_lost, t.skipped
    );
    if t.backwards > 0 {
        return Err(format!("{} frames went backwards", t.backwards).into());
    }
    Ok(())
}
