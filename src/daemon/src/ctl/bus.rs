//! Finding the daemon: which bus, and whether anyone serves on it.

use clap::ValueEnum;
use zbus::connection::Builder;
use zbus::fdo::DBusProxy;
use zbus::names::BusName;
use zbus::proxy::CacheProperties;
use zbus::Connection;

use super::error::CtlError;
use crate::dbus::proxy::DebugProxy;
use crate::dbus::BUS_NAME;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BusKind {
    /// The system bus if the daemon is there, else the session bus.
    Auto,
    System,
    Session,
}

/// A connection to a bus on which the daemon's name has an owner.
#[derive(Debug)]
pub struct Daemon {
    pub proxy: DebugProxy<'static>,
    /// For messages: "the system bus", "the bus at unix:path=…".
    pub bus: String,
}

impl Daemon {
    /// Maps a failed call to a message naming this bus.
    pub fn error(&self, what: &'static str, err: zbus::Error) -> CtlError {
        CtlError::from_call(what, &self.bus, err)
    }

    /// The answer of a call to a member newer than the interface (the
    /// allocations in flight), `None` from a daemon that has no such
    /// member: one started before an upgrade installed this tool still
    /// answers the rest, and should not make `clients` fail.
    pub fn newer<T>(
        &self,
        what: &'static str,
        answer: zbus::Result<T>,
    ) -> Result<Option<T>, CtlError> {
        match answer {
            Ok(value) => Ok(Some(value)),
            Err(err) if is_unknown_member(&err) => Ok(None),
            Err(err) => Err(self.error(what, err)),
        }
    }
}

/// Whether the daemon answered that it has no such method or property.
fn is_unknown_member(err: &zbus::Error) -> bool {
    let name = match err {
        zbus::Error::MethodError(name, _, _) => name.to_string(),
        zbus::Error::FDO(fdo) => zbus::DBusError::name(fdo.as_ref()).to_string(),
        _ => return false,
    };
    matches!(
        name.as_str(),
        "org.freedesktop.DBus.Error.UnknownMethod" | "org.freedesktop.DBus.Error.UnknownProperty"
    )
}

/// Connects to the bus given by `--address`, or by `--bus`.
pub async fn find(kind: BusKind, address: Option<&str>) -> Result<Daemon, CtlError> {
    if let Some(address) = address {
        return on_bus(Target::Address(address), &format!("the bus at {address}")).await;
    }
    match kind {
        BusKind::System => on_bus(Target::System, "the system bus").await,
        BusKind::Session => on_bus(Target::Session, "the session bus").await,
        BusKind::Auto => {
            let system = match on_bus(Target::System, "the system bus").await {
                Ok(daemon) => return Ok(daemon),
                Err(err) => err,
            };
            on_bus(Target::Session, "the session bus")
                .await
                .map_err(|session| neither_bus(system, session))
        }
    }
}

/// What `--bus auto` reports when neither bus has the daemon.
fn neither_bus(system: CtlError, session: CtlError) -> CtlError {
    match (system, session) {
        // Both buses are up and neither has the daemon.
        (CtlError::NotRunning { .. }, CtlError::NotRunning { .. }) => CtlError::NotRunning {
            bus: "the system bus or the session bus".into(),
        },
        // The system bus answered: that the daemon is not on it is the
        // news (a socket-activated service is not, until its first
        // client), not the session bus a server or `sudo` has none of.
        (CtlError::NotRunning { .. }, CtlError::BusUnreachable { .. }) => CtlError::NotRunning {
            bus: "the system bus (and there is no session bus to look on)".into(),
        },
        // The session bus answered: a daemon run by hand (user mode)
        // would be there, and that it is not is the news, with why the
        // system bus could not be asked.
        (CtlError::BusUnreachable { source, .. }, CtlError::NotRunning { .. }) => {
            CtlError::NotRunning {
                bus: format!("the session bus (and the system bus cannot be reached: {source})"),
            }
        }
        // Neither answered: both reasons, and how to get a bus.
        (
            CtlError::BusUnreachable { source: system, .. },
            CtlError::BusUnreachable {
                source: session, ..
            },
        ) => CtlError::NoBus { system, session },
        // A daemon may well be behind the unreachable one: the system
        // bus's error is the one to show.
        (system @ CtlError::BusUnreachable { .. }, _) => system,
        (_, session) => session,
    }
}

enum Target<'a> {
    System,
    Session,
    Address(&'a str),
}

async fn on_bus(target: Target<'_>, bus: &str) -> Result<Daemon, CtlError> {
    let unreachable = |source| CtlError::BusUnreachable {
        bus: bus.to_owned(),
        source: Box::new(source),
    };
    let builder = match target {
        Target::System => Builder::system(),
        Target::Session => Builder::session(),
        Target::Address(address) => Builder::address(address),
    }
    .map_err(unreachable)?;
    let connection: Connection = builder.build().await.map_err(unreachable)?;
    let name = BusName::try_from(BUS_NAME).map_err(|e| unreachable(e.into()))?;
    let owned = DBusProxy::new(&connection)
        .await
        .map_err(unreachable)?
        .name_has_owner(name)
        .await
        .map_err(|e| unreachable(e.into()))?;
    if !owned {
        return Err(CtlError::NotRunning {
            bus: bus.to_owned(),
        });
    }
    let proxy = DebugProxy::builder(&connection)
        .cache_properties(CacheProperties::No)
        .build()
        .await
        .map_err(unreachable)?;
    Ok(Daemon {
        proxy,
        bus: bus.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_unknown_member_is_taken_for_an_older_daemon() {
        let fdo = |e: zbus::fdo::Error| zbus::Error::FDO(Box::new(e));
        assert!(is_unknown_member(&fdo(zbus::fdo::Error::UnknownMethod(
            "ListAllocationsInFlight".into()
        ))));
        assert!(is_unknown_member(&fdo(zbus::fdo::Error::UnknownProperty(
            "AllocationsInFlight".into()
        ))));
        assert!(!is_unknown_member(&fdo(zbus::fdo::Error::AccessDenied(
            "no".into()
        ))));
        assert!(!is_unknown_member(&zbus::Error::InvalidReply));
    }

    /// The system bus answered without the daemon and there is no session
    /// bus (a server, `sudo`): the message named only the session bus,
    /// not that the system bus has no daemon.
    #[test]
    fn auto_says_the_system_bus_has_no_daemon_when_there_is_no_session_bus() {
        let not_running = |bus: &str| CtlError::NotRunning { bus: bus.into() };
        let unreachable = |bus: &str| CtlError::BusUnreachable {
            bus: bus.into(),
            source: Box::new(zbus::Error::InvalidReply),
        };
        let shown = |system, session| neither_bus(system, session).to_string();

        let text = shown(
            not_running("the system bus"),
            unreachable("the session bus"),
        );
        assert!(
            text.starts_with("dmabrokerd is not running on the system bus"),
            "{text}"
        );
        assert!(text.contains("no session bus"), "{text}");
        let text = shown(
            not_running("the system bus"),
            not_running("the session bus"),
        );
        assert!(text.contains("the system bus or the session bus"), "{text}");
        // A daemon run by hand is on the session bus: with the session
        // bus up and no daemon on it, that is what is said (it said the
        // system bus could not be reached).
        let text = shown(
            unreachable("the system bus"),
            not_running("the session bus"),
        );
        assert!(
            text.starts_with("dmabrokerd is not running on the session bus"),
            "{text}"
        );
        assert!(text.contains("the system bus cannot be reached"), "{text}");
        // No bus at all (ssh, a container, CI): both named, and how to
        // get one (it named the system bus alone).
        let err = neither_bus(
            unreachable("the system bus"),
            unreachable("the session bus"),
        );
        assert_eq!(err.exit_code(), 3);
        let text = err.to_string();
        assert!(
            text.starts_with("cannot reach the system bus")
                && text.contains("nor the session bus")
                && text.contains("dbus-run-session")
                && text.contains("--address"),
            "{text}"
        );
    }
}
