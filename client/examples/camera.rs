//! A producer, as a camera driver would be: it fills a ring of buffers
//! with frames and shares them with whoever has the tokens.
//!
//! ```sh
//! cargo build --release -p dmabroker-client --examples
//! target/release/examples/camera --fps 30 | target/release/examples/codec
//! ```
//!
//! The codec must run while the camera does: the camera's exit frees the
//! buffers and revokes its tokens. `--buffers` must be the same for both
//! (the codec reads that many tokens).
//!
//! It prints one share token per buffer on stdout, then writes frames into
//! the buffers in turn until `--frames` are done or Ctrl-C. Each write waits
//! (in `begin`) until the readers of that buffer are done with it, so a
//! consumer never sees a half-written frame.

mod frame;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clap::Parser;
use dmabroker_client::{Access, AllocRequest, Buffer};

/// One 1080p NV12 frame: 1920 × 1080 luma bytes plus half as many chroma.
const FULL_HD_NV12: u64 = 1920 * 1080 * 3 / 2;

#[derive(Parser)]
#[command(about = "Produce numbered, checksummed frames into a ring of shared buffers")]
struct Args {
    /// The broker's socket (default: $DMABROKER_SOCKET or the standard path).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Buffers in the ring.
    #[arg(long, default_value_t = 4)]
    buffers: usize,
    /// Bytes per frame.
    #[arg(long, default_value_t = FULL_HD_NV12)]
    size: u64,
    /// Frame width in pixels (NV12); with --height, replaces --size.
    #[arg(long, requires = "height")]
    width: Option<u64>,
    #[arg(long, requires = "width")]
    height: Option<u64>,
    /// Frames to produce (default: until Ctrl-C).
    #[arg(long)]
    frames: Option<u64>,
    /// Frames per second (default: as fast as the readers allow).
    #[arg(long)]
    fps: Option<f64>,
}

impl Args {
    fn frame_size(&self) -> u64 {
        match (self.width, self.height) {
            (Some(w), Some(h)) => w * h * 3 / 2,
            _ => self.size,
        }
    }
}

fn main() -> std::process::ExitCode {
    frame::run("camera", camera)
}

fn camera() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let stop = frame::stop_on_signal();
    let client = frame::connect(args.socket.clone(), "camera")?;

    // Allocate the ring and hand out one token per buffer. The buffers stay
    // alive as long as anyone holds them, even after this process exits.
    let ring: Vec<Buffer> = (0..args.buffers.max(1))
        .map(|_| {
            client.alloc_with(AllocRequest {
                size: args.frame_size(),
                name: Some("camera-frame".into()),
                ..Default::default()
            })
        })
        .collect::<Result<_, _>>()?;
    for buffer in &ring {
        println!("{}", buffer.export()?);
    }

    let period = args
        .fps
        .filter(|f| *f > 0.0)
        .map(|f| Duration::from_secs_f64(1.0 / f));
    let mut next_due = Instant::now();
    let mut produced = 0;
    // Frame numbers start at 1 and frame n goes to buffer n % ring size,
    // which is how the codec knows where to look for the next one.
    for number in 1.. {
        if stop.load(Ordering::Relaxed) || args.frames.is_some_and(|n| produced >= n) {
            break;
        }
        let buffer = &ring[number as usize % ring.len()];
        // Waits while codecs still read this buffer (autofence), or until
        // Ctrl-C.
        let Some(mut access) = frame::begin_unless_stopped(buffer, Access::CpuWrite, &stop)? else {
            break;
        };
        frame::write(&mut access.bytes_mut()?, number);
        drop(access); // ends the write: waiting readers are granted now
        produced += 1;

        if let Some(period) = period {
            next_due += period;
            std::thread::sleep(next_due.saturating_duration_since(Instant::now()));
        }
    }
    eprintln!("camera: frames={produced}");
    Ok(())
}
