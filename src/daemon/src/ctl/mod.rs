//! `dmabrokerctl`: the daemon's D-Bus debug interface from the command
//! line. Tables for people, `--json` for scripts; see `docs/operations.md`.

mod allocating;
mod bus;
mod closes;
mod error;
mod format;
mod render;
mod table;
mod terminal;
mod top;

use std::io::Write;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde::Serialize;

pub use bus::BusKind;
pub use error::CtlError;
pub use top::SortKey;

/// Inspect a running dmabrokerd over D-Bus.
#[derive(Debug, Parser)]
#[command(name = "dmabrokerctl", version)]
pub struct Cli {
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,

    /// Which bus to look for the daemon on.
    #[arg(long, value_enum, default_value_t = BusKind::Auto, global = true)]
    pub bus: BusKind,

    /// A bus address (e.g. `unix:path=/run/dbus/system_bus_socket`)
    /// instead of --bus.
    #[arg(long, global = true, value_name = "ADDRESS", conflicts_with = "bus")]
    pub address: Option<String>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Version, uptime, totals, heaps and statistics.
    Status,
    /// Heaps in fallback order with their buffers and bytes.
    Heaps,
    /// Connected clients with their buffers, bytes, accesses and waits.
    Clients,
    /// Buffers with their holders, current fences and waiters.
    Buffers,
    /// One buffer in detail.
    Buffer {
        /// The buffer's id (see `buffers`).
        id: u64,
    },
    /// A live view of clients, refreshed every second.
    Top {
        /// Order clients by bytes charged or by how long they wait.
        #[arg(long, value_enum, default_value_t = SortKey::Bytes)]
        sort: SortKey,
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 1.0, value_parser = parse_interval)]
        interval: f64,
        /// Stop after this many refreshes.
        #[arg(short = 'n', long)]
        iterations: Option<u64>,
    },
    /// Queues of the closing threads with closes waiting: whose clients
    /// hang behind a stuck close.
    Closes,
    /// Re-read the policy files (administrators only).
    Reload,
}

fn parse_interval(text: &str) -> Result<f64, String> {
    let secs: f64 = text.parse().map_err(|e| format!("{e}"))?;
    if (0.1..=3600.0).contains(&secs) {
        Ok(secs)
    } else {
        Err("must be between 0.1 and 3600 seconds".into())
    }
}

pub async fn run(cli: Cli) -> Result<(), CtlError> {
    let daemon = bus::find(cli.bus, cli.address.as_deref()).await?;
    let proxy = &daemon.proxy;
    match cli.command {
        Command::Status => {
            let status = render::Status {
                bus: daemon.bus.clone(),
                version: proxy
                    .version()
                    .await
                    .map_err(|e| daemon.error("Version", e))?,
                instance: proxy
                    .instance()
                    .await
                    .map_err(|e| daemon.error("Instance", e))?,
                started_at: proxy
                    .started_at()
                    .await
                    .map_err(|e| daemon.error("StartedAt", e))?,
                totals: proxy
                    .totals()
                    .await
                    .map_err(|e| daemon.error("Totals", e))?,
                heaps: proxy.heaps().await.map_err(|e| daemon.error("Heaps", e))?,
                statistics: proxy
                    .statistics()
                    .await
                    .map_err(|e| daemon.error("Statistics", e))?,
                silent_ends: proxy
                    .silent_ends()
                    .await
                    .map_err(|e| daemon.error("SilentEnds", e))?,
                cache_syncs_failed: daemon
                    .newer("CacheSyncsFailed", proxy.cache_syncs_failed().await)?,
                cache_ends_running: daemon
                    .newer("CacheEndsRunning", proxy.cache_ends_running().await)?,
                allocations_in_flight: daemon
                    .newer("AllocationsInFlight", proxy.allocations_in_flight().await)?,
                allocations_running: daemon
                    .newer("AllocationsRunning", proxy.allocations_running().await)?,
                closes_waiting: daemon.newer("ClosesWaiting", proxy.closes_waiting().await)?,
                closing_threads: daemon.newer("ClosingThreads", proxy.closing_threads().await)?,
                hand_offs: (
                    proxy
                        .hand_offs_planned()
                        .await
                        .map_err(|e| daemon.error("HandOffsPlanned", e))?,
                    proxy
                        .hand_offs()
                        .await
                        .map_err(|e| daemon.error("HandOffs", e))?,
                ),
            };
            print(cli.json, &status, render::status)
        }
        Command::Heaps => {
            let heaps = proxy.heaps().await.map_err(|e| daemon.error("Heaps", e))?;
            print(cli.json, &heaps, |h| render::heaps(h))
        }
        Command::Clients => {
            let clients = proxy
                .list_clients()
                .await
                .map_err(|e| daemon.error("ListClients", e))?;
            let in_flight = allocating::fetch(&daemon).await?;
            let text = render::clients(&clients) + &allocating::section(in_flight.as_deref());
            print(
                cli.json,
                &allocating::rows(clients, in_flight.as_deref()),
                |_| text,
            )
        }
        Command::Buffers => {
            let buffers = proxy
                .list_buffers()
                .await
                .map_err(|e| daemon.error("ListBuffers", e))?;
            print(cli.json, &buffers, |b| render::buffers(b))
        }
        Command::Buffer { id } => {
            let detail = proxy.get_buffer(id).await.map_err(|e| match &e {
                zbus::Error::MethodError(name, _, _)
                    if name.as_str() == "org.dmabroker.Error.NoSuchBuffer" =>
                {
                    CtlError::NoSuchBuffer(id)
                }
                _ => daemon.error("GetBuffer", e),
            })?;
            print(cli.json, &detail, render::buffer)
        }
        Command::Top {
            sort,
            interval,
            iterations,
        } => {
            top::run(
                &daemon,
                top::TopOptions {
                    sort,
                    interval: Duration::from_secs_f64(interval),
                    iterations,
                    json: cli.json,
                },
            )
            .await
        }
        Command::Closes => {
            let queues = closes::fetch(&daemon).await?;
            print(cli.json, &queues, |q| closes::table(q))
        }
        Command::Reload => {
            proxy
                .reload_policy()
                .await
                .map_err(|e| daemon.error("ReloadPolicy", e))?;
            print(cli.json, &serde_json::json!({ "reloaded": true }), |_| {
                "Policy reloaded.\n".to_owned()
            })
        }
    }
}

fn print<T: Serialize + ?Sized>(
    json: bool,
    value: &T,
    human: impl FnOnce(&T) -> String,
) -> Result<(), CtlError> {
    let mut stdout = std::io::stdout().lock();
    if json {
        writeln!(stdout, "{}", format::json(value, true)?)?;
    } else {
        stdout.write_all(human(value).as_bytes())?;
    }
    stdout.flush()?;
    Ok(())
}
