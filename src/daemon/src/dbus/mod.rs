//! D-Bus introspection: `org.dmabroker.Broker1` at `/org/dmabroker/Broker1`
//! with the `org.dmabroker.Debug1` interface (see `docs/operations.md`).
//!
//! The service runs on a thread and tokio runtime of its own. Message
//! parsing, serialisation and the bus socket then cost the data path
//! nothing; the two only meet at the broker's mutex, which a handler holds
//! just long enough to copy a [view](views). Buffer brokering never depends
//! on D-Bus: when no bus is reachable the daemon logs a warning and keeps
//! trying in the background.

mod allocating;
mod auth;
mod closes;
pub mod proxy;
mod service;
mod signals;
mod snapshot;
pub mod views;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use zbus::connection::Builder;
use zbus::object_server::SignalEmitter;
use zbus::Connection;

use nix::sched::{sched_setaffinity, CpuSet};
use nix::unistd::Pid;

use crate::broker::Broker;
use crate::config::CpuList;
pub use service::DebugError;

pub const BUS_NAME: &str = "org.dmabroker.Broker1";
pub const OBJECT_PATH: &str = "/org/dmabroker/Broker1";
pub const INTERFACE: &str = "org.dmabroker.Debug1";

/// Longest pause between attempts to reach a bus that was not there.
const MAX_RETRY: Duration = Duration::from_secs(60);

/// Which bus to serve on (`--dbus`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BusChoice {
    System,
    Session,
    None,
    /// A bus address such as `unix:path=/run/dbus/system_bus_socket`.
    Address(String),
}

impl BusChoice {
    /// `--dbus` as given, or the default: the system bus for the system
    /// service, the session bus in user mode.
    pub fn from_option(value: Option<&str>, system_mode: bool) -> BusChoice {
        match value {
            Some("system") => BusChoice::System,
            Some("session") => BusChoice::Session,
            Some("none") => BusChoice::None,
            Some(address) => BusChoice::Address(address.to_owned()),
            None if system_mode => BusChoice::System,
            None => BusChoice::Session,
        }
    }

    fn builder(&self) -> zbus::Result<Option<Builder<'static>>> {
        Ok(Some(match self {
            BusChoice::System => Builder::system()?,
            BusChoice::Session => Builder::session()?,
            BusChoice::None => return Ok(None),
            BusChoice::Address(address) => Builder::address(address.as_str())?,
        }))
    }
}

impl fmt::Display for BusChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BusChoice::System => f.write_str("the system bus"),
            BusChoice::Session => f.write_str("the session bus"),
            BusChoice::None => f.write_str("no bus"),
            BusChoice::Address(address) => write!(f, "the bus at {address}"),
        }
    }
}

type ReloadFn = dyn Fn() -> bool + Send + Sync;

/// Reloads the policy the way SIGHUP does ([`crate::daemon::reload`]).
///
/// It runs inside the daemon's runtime context (not on the daemon's thread)
/// because a reload may start broker tasks, which belong to the daemon's
/// runtime, and on a blocking thread because it reads files.
#[derive(Clone)]
pub struct Reloader {
    reload: Arc<ReloadFn>,
    daemon: tokio::runtime::Handle,
}

impl fmt::Debug for Reloader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reloader").finish_non_exhaustive()
    }
}

impl Reloader {
    /// Keeps the handle of the runtime it is called on, which must be the
    /// daemon's; `None` outside any runtime.
    pub fn new(reload: impl Fn() -> bool + Send + Sync + 'static) -> Option<Reloader> {
        Some(Reloader {
            reload: Arc::new(reload),
            daemon: tokio::runtime::Handle::try_current().ok()?,
        })
    }

    /// Whether the new policy is in force.
    pub async fn run(&self) -> bool {
        let reload = Arc::clone(&self.reload);
        let daemon = self.daemon.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            let _context = daemon.enter();
            reload()
        })
        .await;
        outcome.unwrap_or_else(|err| {
            tracing::error!(error = %err, "policy reload task failed");
            false
        })
    }
}

/// Why the service could not be offered on a bus.
#[derive(Debug, thiserror::Error)]
enum ServeError {
    #[error("cannot connect to {bus}: {source}")]
    Connect {
        bus: BusChoice,
        #[source]
        source: zbus::Error,
    },
    #[error("{BUS_NAME} is already owned on {bus} (by another dmabrokerd?)")]
    NameTaken { bus: BusChoice },
}

/// Starts the D-Bus service on its own thread; `None` for `--dbus none` or
/// when the thread cannot be started, neither of which stops the daemon.
/// Call it from the daemon's runtime (see [`Reloader::new`]).
pub fn spawn(
    broker: Arc<Broker>,
    bus: BusChoice,
    cpus: Option<CpuList>,
    reload: impl Fn() -> bool + Send + Sync + 'static,
) -> Option<std::thread::JoinHandle<()>> {
    if bus == BusChoice::None {
        tracing::info!("D-Bus interface disabled (--dbus none)");
        return None;
    }
    let Some(reloader) = Reloader::new(reload) else {
        tracing::warn!(
            "the D-Bus service was started outside the daemon's runtime; continuing without D-Bus"
        );
        return None;
    };
    let thread = std::thread::Builder::new()
        .name("dbus".into())
        .spawn(move || {
            if let Some(cpus) = cpus {
                place_this_thread(&cpus);
            }
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(err) => {
                    tracing::warn!(error = %err, "cannot start the D-Bus runtime; continuing without D-Bus");
                    return;
                }
            };
            runtime.block_on(serve(broker, bus, reloader));
        });
    match thread {
        Ok(thread) => Some(thread),
        Err(err) => {
            tracing::warn!(error = %err, "cannot start the D-Bus thread; continuing without D-Bus");
            None
        }
    }
}

/// Moves the calling thread (the D-Bus one) onto `cpus` (`--dbus-cpus`).
/// Introspection is never worth refusing to start over: a list the kernel
/// refuses (CPUs offline or outside the service's cpuset) is logged.
fn place_this_thread(cpus: &CpuList) {
    let mut set = CpuSet::new();
    for &cpu in cpus.cpus() {
        if let Err(err) = set.set(cpu) {
            tracing::warn!(cpu, error = %err, "--dbus-cpus: no such CPU; ignored");
        }
    }
    match sched_setaffinity(Pid::from_raw(0), &set) {
        Ok(()) => tracing::info!(cpus = %cpus, "D-Bus thread placed"),
        Err(err) => tracing::warn!(
            cpus = %cpus,
            error = %err,
            "cannot place the D-Bus thread on these CPUs; it runs wherever the daemon does"
        ),
    }
}

/// Connects, serves until the connection is lost, and starts over; gives
/// up only if another daemon owns the name.
async fn serve(broker: Arc<Broker>, bus: BusChoice, reloader: Reloader) {
    let mut delay = Duration::from_secs(1);
    let mut warned = false;
    loop {
        match connect(&broker, &bus, &reloader).await {
            Ok(connection) => {
                tracing::info!(bus = %bus, name = BUS_NAME, "D-Bus interface available");
                delay = Duration::from_secs(1);
                warned = false;
                if run_connection(&broker, connection).await.is_break() {
                    return;
                }
            }
            Err(err @ ServeError::NameTaken { .. }) => {
                tracing::warn!("{err}; continuing without D-Bus");
                return;
            }
            Err(err) if !warned => {
                tracing::warn!(
                    "{err}; buffer brokering continues without D-Bus, retrying in the background"
                );
                warned = true;
            }
            Err(err) => tracing::debug!("{err}; retrying"),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(MAX_RETRY);
    }
}

async fn connect(
    broker: &Arc<Broker>,
    bus: &BusChoice,
    reloader: &Reloader,
) -> Result<Connection, ServeError> {
    let connect_error = |source| ServeError::Connect {
        bus: bus.clone(),
        source,
    };
    let Some(builder) = bus.builder().map_err(connect_error)? else {
        return Err(connect_error(zbus::Error::Unsupported));
    };
    let service = service::DebugObject::new(Arc::clone(broker), reloader.clone());
    // Neither takes the name from another daemon nor lets one take it: two
    // daemons on one bus is a mistake to report, not to paper over.
    let built = builder
        .allow_name_replacements(false)
        .replace_existing_names(false)
        .serve_at(OBJECT_PATH, service)
        .and_then(|b| b.name(BUS_NAME))
        .map_err(connect_error)?
        .build()
        .await;
    match built {
        Ok(connection) => Ok(connection),
        Err(zbus::Error::NameTaken) => Err(ServeError::NameTaken { bus: bus.clone() }),
        Err(source) => Err(connect_error(source)),
    }
}

/// Forwards notices as signals until the connection closes (`Continue`:
/// reconnect) or the broker stops publishing (`Break`).
async fn run_connection(broker: &Broker, connection: Connection) -> std::ops::ControlFlow<()> {
    // Subscribed only now: notices from while we were away are history,
    // and the views show where that history led.
    let notices = broker.lock().subscribe();
    let emitter = match SignalEmitter::new(&connection, OBJECT_PATH) {
        Ok(emitter) => emitter.into_owned(),
        Err(err) => {
            tracing::warn!(error = %err, "cannot emit D-Bus signals");
            connection.closed().await;
            return std::ops::ControlFlow::Continue(());
        }
    };
    tokio::select! {
        outcome = signals::forward(notices, emitter) => match outcome {
            Some(err) => {
                tracing::warn!(error = %err, "lost the D-Bus connection; reconnecting");
                std::ops::ControlFlow::Continue(())
            }
            None => std::ops::ControlFlow::Break(()),
        },
        () = connection.closed() => {
            tracing::warn!("the D-Bus connection closed; reconnecting");
            std::ops::ControlFlow::Continue(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bus_choice_defaults_follow_the_mode() {
        assert_eq!(BusChoice::from_option(None, true), BusChoice::System);
        assert_eq!(BusChoice::from_option(None, false), BusChoice::Session);
        assert_eq!(
            BusChoice::from_option(Some("system"), false),
            BusChoice::System
        );
        assert_eq!(
            BusChoice::from_option(Some("session"), true),
            BusChoice::Session
        );
        assert_eq!(BusChoice::from_option(Some("none"), true), BusChoice::None);
        assert_eq!(
            BusChoice::from_option(Some("unix:path=/run/bus"), true),
            BusChoice::Address("unix:path=/run/bus".into())
        );
    }

    #[test]
    fn no_reloader_outside_a_runtime() {
        assert!(Reloader::new(|| true).is_none());
    }
}
