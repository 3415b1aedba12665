//! Log setup: `RUST_LOG`-style filter (default `info`). Under systemd
//! (`$JOURNAL_STREAM` set) logs go to the journal with structured fields;
//! otherwise text (or JSON with `--log-format json`) on stderr.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

fn filter() -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"))
}

pub fn init(format: LogFormat) {
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        match tracing_journald::layer() {
            Ok(journald) => {
                let installed = tracing_subscriber::registry()
                    .with(filter())
                    .with(journald.with_syslog_identifier("dmabrokerd".into()))
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
