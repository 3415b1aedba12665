//! The terminal for `top`: an alternate screen that is restored however
//! `top` ends, and single key presses without waiting for Enter.

use std::io::{IsTerminal, Read, Write};

use nix::sys::termios::{self, LocalFlags, SetArg, SpecialCharacterIndices, Termios};
use tokio::sync::mpsc;

/// Clears the alternate screen and homes the cursor before a frame.
pub const CLEAR: &str = "\x1b[H\x1b[2J";

/// The alternate screen, while it lives; a no-op when stdout is not a
/// terminal (frames are then simply printed one after another).
#[derive(Debug)]
pub struct Screen {
    active: bool,
}

impl Screen {
    pub fn enter() -> Screen {
        let mut stdout = std::io::stdout();
        let active = stdout.is_terminal();
        if active {
            // Alternate screen, cursor hidden.
            let _ = write!(stdout, "\x1b[?1049h\x1b[?25l");
            let _ = stdout.flush();
        }
        Screen { active }
    }

    pub fn is_terminal(&self) -> bool {
        self.active
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        if self.active {
            let mut stdout = std::io::stdout();
            let _ = write!(stdout, "\x1b[?25h\x1b[?1049l");
            let _ = stdout.flush();
        }
    }
}

/// Key presses from stdin. While it lives, a terminal on stdin delivers
/// each key at once and does not echo it; Ctrl-C still interrupts.
#[derive(Debug)]
pub struct Keys {
    saved: Option<Termios>,
    pub presses: mpsc::UnboundedReceiver<u8>,
}

impl Keys {
    pub fn listen() -> Keys {
        let stdin = std::io::stdin();
        let saved = if stdin.is_terminal() {
            termios::tcgetattr(&stdin).ok().and_then(|saved| {
                let mut raw = saved.clone();
                raw.local_flags
                    .remove(LocalFlags::ICANON | LocalFlags::ECHO);
                raw.control_chars[SpecialCharacterIndices::VMIN as usize] = 1;
                raw.control_chars[SpecialCharacterIndices::VTIME as usize] = 0;
                termios::tcsetattr(&stdin, SetArg::TCSANOW, &raw)
                    .ok()
                    .map(|()| saved)
            })
        } else {
            None
        };
        let (tx, presses) = mpsc::unbounded_channel();
        // A blocking read has no async form for stdin in tokio without an
        // extra feature; a thread that ends with the process is simpler.
        let spawned = std::thread::Builder::new()
            .name("keys".into())
            .spawn(move || {
                let mut byte = [0u8; 1];
                let mut stdin = std::io::stdin();
                while let Ok(1) = stdin.read(&mut byte) {
                    if tx.send(byte[0]).is_err() {
                        break;
                    }
                }
            });
        if spawned.is_err() {
            // No key handling then: `top` still runs and Ctrl-C ends it.
        }
        Keys { saved, presses }
    }
}

impl Drop for Keys {
    fn drop(&mut self) {
        if let Some(saved) = &self.saved {
            let _ = termios::tcsetattr(std::io::stdin(), SetArg::TCSANOW, saved);
        }
    }
}
