//! What the `camera` example writes and the `codec` example checks, shared
//! by both (copy it along with them).
//!
//! A frame fills the whole buffer: a header of three little-endian words
//! (magic, frame number, checksum) and a body whose every word names the
//! frame and its own position. A reader that overlaps a write sees body
//! words of two frames, or an old header over a new body, and the checksum
//! no longer matches: that is a torn frame.

// Each example uses only its half: the camera writes, the codec checks.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dmabroker_client::{Access, AccessGuard, Buffer, Client, ClientOptions, ErrorCode};

use nix::sys::signal::{SigSet, Signal};

/// `DMABFRM1`: a buffer nobody has written yet is all zeros instead.
const MAGIC: u64 = u64::from_le_bytes(*b"DMABFRM1");
const HEADER: usize = 3 * 8;

/// What a reader found in a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Contents {
    /// Still zeros: the camera has not reached this buffer yet.
    Unwritten,
    /// A whole frame with this number.
    Frame(u64),
    /// Header and body disagree: someone read while someone else wrote.
    Torn,
}

fn body_word(frame: u64, index: usize) -> u64 {
    (frame << 32) ^ index as u64
}

fn mix(sum: u64, word: u64) -> u64 {
    (sum ^ word)
        .wrapping_mul(0x0000_0100_0000_01b3)
        .rotate_left(23)
}

fn word_at(bytes: &[u8], index: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[index * 8..index * 8 + 8]);
    u64::from_le_bytes(word)
}

/// Writes frame `frame` over all of `bytes`. The header goes last, so a
/// reader that overlapped the write sees an old header over a new body.
pub fn write(bytes: &mut [u8], frame: u64) {
    let (header, body) = bytes.split_at_mut(HEADER);
    let mut sum = frame;
    for (index, word) in body.chunks_exact_mut(8).enumerate() {
        let value = body_word(frame, index);
        word.copy_from_slice(&value.to_le_bytes());
        sum = mix(sum, value);
    }
    header[16..24].copy_from_slice(&sum.to_le_bytes());
    header[8..16].copy_from_slice(&frame.to_le_bytes());
    header[..8].copy_from_slice(&MAGIC.to_le_bytes());
}

/// Reads the header and recomputes the checksum over the whole body.
pub fn check(bytes: &[u8]) -> Contents {
    let (header, body) = bytes.split_at(HEADER);
    let (magic, frame, stored) = (word_at(header, 0), word_at(header, 1), word_at(header, 2));
    if magic == 0 && frame == 0 && stored == 0 {
        return Contents::Unwritten;
    }
    let sum = (0..body.len() / 8).fold(frame, |sum, i| mix(sum, word_at(body, i)));
    if magic == MAGIC && sum == stored {
        Contents::Frame(frame)
    } else {
        Contents::Torn
    }
}

/// Ctrl-C (SIGINT) or SIGTERM sets the returned flag instead of killing the
/// process, so the main loop stops between two frames and never leaves a
/// write half done (readers would be told `writer_lost`). Call it before
/// starting any other thread: the signals are blocked in every thread and
/// taken by one that only waits for them.
pub fn stop_on_signal() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    if signals.thread_block().is_ok() {
        let flag = Arc::clone(&stop);
        std::thread::spawn(move || {
            if signals.wait().is_ok() {
                flag.store(true, Ordering::Relaxed);
            }
        });
    }
    stop
}

/// Runs an example's `body` and reports its error the way a user reads
/// it: `main` returning the error would print its `Debug` form
/// (`Connect { path: .., source: Os { .. } }`), which hides the message
/// the client crate wrote for people ("is dmabrokerd running?").
pub fn run(
    name: &str,
    body: impl FnOnce() -> Result<(), Box<dyn std::error::Error>>,
) -> std::process::ExitCode {
    match body() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("{name}: {err}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Connects under `name` (shown by `dmabrokerctl clients`) to `--socket`,
/// or to the default socket.
///
/// Both examples rely on autofence: their `begin` must wait until the
/// other side is done with the buffer (without it, a begin is granted at
/// once with fences to wait for, which they do not, and frames tear). So
/// they ask for it, and give up with a clear error when the policy runs
/// them without it anyway (`autofence = "disabled"`).
pub fn connect(socket: Option<PathBuf>, name: &str) -> Result<Client, Box<dyn std::error::Error>> {
    let options = ClientOptions {
        name: name.into(),
        autofence: Some(true),
        ..Default::default()
    };
    let client = Client::connect_with(
        socket.unwrap_or_else(dmabroker_client::default_socket),
        options,
    )?;
    if !client.autofence() {
        return Err(format!(
            "{name}: the broker's policy runs this client without autofence \
             (autofence = \"disabled\"), and this example relies on it: \
             its begin would not wait for the other side's accesses"
        )
        .into());
    }
    Ok(client)
}

/// How long a wait for an access goes before it looks at the stop flag.
const STOP_CHECK: Duration = Duration::from_millis(100);

/// Begins `access` on `buffer`, waiting in slices of [`STOP_CHECK`] so that
/// Ctrl-C (`stop`) ends the wait too: `None` once stopped. (A plain `begin`
/// waits for as long as the other side holds the buffer, and the signal
/// only sets the flag.) Each slice that times out leaves the buffer's queue
/// and joins it again, behind whoever came meanwhile.
pub fn begin_unless_stopped(
    buffer: &Buffer,
    access: Access,
    stop: &AtomicBool,
) -> dmabroker_client::Result<Option<AccessGuard>> {
    loop {
        if stop.load(Ordering::Relaxed) {
            return Ok(None);
        }
        match buffer.begin_timeout(access, STOP_CHECK) {
            Ok(guard) => return Ok(Some(guard)),
            Err(err) if err.code() == Some(ErrorCode::Timeout) => {}
            Err(err) => return Err(err),
        }
    }
}
