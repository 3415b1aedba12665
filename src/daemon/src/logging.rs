//! Log setup: `RUST_LOG`-style filter (default `info`). Under systemd
//! (stderr is the stream `$JOURNAL_STREAM` names) logs go to the journal
//! with structured fields; otherwise text (or JSON with `--log-format
//! json`) on stderr.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

fn filter() -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Whether stderr is the journal stream systemd connected the service to.
/// `$JOURNAL_STREAM` is inherited by everything a service starts (a CI
/// runner's jobs, a shell in a tmux server run as a user unit), so it
/// being set says nothing by itself: with the README's command run from
/// such a shell, every line went to the journal and none to the terminal.
/// systemd.exec(5) says to compare its `device:inode` with stderr's.
fn stderr_is_journal(journal_stream: &str, stderr: (u64, u64)) -> bool {
    let Some((device, inode)) = journal_stream.split_once(':') else {
        return false;
    };
    matches!(
        (device.parse::<u64>(), inode.parse::<u64>()),
        (Ok(device), Ok(inode)) if (device, inode) == stderr
    )
}

/// stderr's device and inode, if it is open.
fn stderr_identity() -> Option<(u64, u64)> {
    use std::os::fd::AsRawFd;
    let stat = nix::sys::stat::fstat(std::io::stderr().as_raw_fd()).ok()?;
    Some((stat.st_dev, stat.st_ino))
}

pub fn init(format: LogFormat) {
    let journal = std::env::var("JOURNAL_STREAM")
        .ok()
        .zip(stderr_identity())
        .is_some_and(|(stream, stderr)| stderr_is_journal(&stream, stderr));
    if journal {
        match tracing_journald::layer() {
            Ok(journald) => {
                let installed = tracing_subscriber::registry()
                    .with(filter())
                    .with(
                        journald
                            .with_syslog_identifier("dmabrokerd".into())
                            // The fields as named in the code (`CLIENT`,
                            // `BUFFER`, ...: operations.md), not `F_CLIENT`.
                            .with_field_prefix(None),
                    )
                    .try_init();
                if installed.is_ok() {
                    return;
                }
            }
            Err(err) => eprintln!("dmabrokerd: journal unavailable ({err}); logging to stderr"),
        }
    }
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    if let Err(err) = result {
        eprintln!("dmabrokerd: cannot set up logging: {err}");
    }
}

/// A log line anyone may cause (a refused D-Bus call from any user on the
/// bus), let through at most once per `every`: a loop of such calls would
/// otherwise push the service past journald's rate limit, and the
/// broker's own messages would be dropped with them.
#[derive(Debug)]
pub struct Throttle {
    every: std::time::Duration,
    /// When the last line went out, and how many were held back since.
    state: std::sync::Mutex<(Option<std::time::Instant>, u64)>,
}

impl Throttle {
    pub const fn new(every: std::time::Duration) -> Throttle {
        Throttle {
            every,
            state: std::sync::Mutex::new((None, 0)),
        }
    }

    /// `Some(n)` if this line may go out now, `n` being how many were held
    /// back since the last one; `None` to hold it back.
    pub fn admit(&self, now: std::time::Instant) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (last, held_back) = &mut *state;
        if last.is_some_and(|at| now.saturating_duration_since(at) < self.every) {
            *held_back += 1;
            return None;
        }
        *last = Some(now);
        Some(std::mem::take(held_back))
    }
}

#[cfg(test)]
mod tests {
    use super::{stderr_is_journal, Throttle};
    use std::time::{Duration, Instant};

    /// An inherited `$JOURNAL_STREAM` names another stream than stderr:
    /// logs stay on stderr. Only the exact `device:inode` of stderr counts.
    #[test]
    fn only_the_stream_stderr_is_counts_as_the_journal() {
        assert!(stderr_is_journal("8:12345", (8, 12345)));
        assert!(!stderr_is_journal("8:12345", (8, 12346)));
        assert!(!stderr_is_journal("9:12345", (8, 12345)));
        for garbage in ["", "8", "8:", ":12345", "8:12345:1", "x:y", "-8:12345"] {
            assert!(!stderr_is_journal(garbage, (8, 12345)), "{garbage:?}");
        }
    }

    #[test]
    fn a_throttle_lets_one_line_through_per_period_and_counts_the_rest() {
        let throttle = Throttle::new(Duration::from_secs(60));
        let start = Instant::now();
        assert_eq!(throttle.admit(start), Some(0));
        assert_eq!(throttle.admit(start + Duration::from_secs(1)), None);
        assert_eq!(throttle.admit(start + Duration::from_secs(59)), None);
        assert_eq!(throttle.admit(start + Duration::from_secs(60)), Some(2));
        assert_eq!(throttle.admit(start + Duration::from_secs(61)), None);
    }
}
