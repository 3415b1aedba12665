//! What can go wrong in `dmabrokerctl`, worded for the person at the
//! terminal, with an exit code per kind for scripts.

use crate::dbus::BUS_NAME;

#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("cannot reach {bus}: {source}")]
    BusUnreachable {
        bus: String,
        #[source]
        source: Box<zbus::Error>,
    },
    #[error(
        "dmabrokerd is not running on {bus} (nobody owns {BUS_NAME}); start it, or pick the \
         bus it serves with --bus or --address"
    )]
    NotRunning { bus: String },
    /// Neither bus answered `--bus auto`: shown with both reasons and how
    /// to get one, since a daemon run by hand publishes on the session
    /// bus, which ssh sessions, containers and CI jobs often lack.
    #[error(
        "cannot reach the system bus ({system}) nor the session bus ({session}); a dmabrokerd \
         run by hand publishes on the session bus: run it and dmabrokerctl under one \
         (`dbus-run-session -- sh`), or give dmabrokerd `--dbus ADDRESS` and dmabrokerctl \
         `--address ADDRESS`"
    )]
    NoBus {
        system: Box<zbus::Error>,
        session: Box<zbus::Error>,
    },
    #[error("permission denied: {0}")]
    AccessDenied(String),
    #[error("no buffer has id {0}")]
    NoSuchBuffer(u64),
    #[error("{what} failed: {message}")]
    Call { what: &'static str, message: String },
    #[error("cannot write the output: {0}")]
    Output(#[from] std::io::Error),
    #[error("cannot encode JSON: {0}")]
    Json(#[from] serde_json::Error),
}

impl CtlError {
    /// The reader of our output went away (`dmabrokerctl clients | head`):
    /// nothing left to report to anyone.
    pub fn is_broken_pipe(&self) -> bool {
        let kind = match self {
            CtlError::Output(err) => Some(err.kind()),
            CtlError::Json(err) => err.io_error_kind(),
            _ => None,
        };
        kind == Some(std::io::ErrorKind::BrokenPipe)
    }

    /// 1: the request failed; 3: no daemon or no bus; 4: not allowed.
    /// (2 is clap's, for usage errors.)
    pub fn exit_code(&self) -> u8 {
        match self {
            CtlError::BusUnreachable { .. }
            | CtlError::NotRunning { .. }
            | CtlError::NoBus { .. } => 3,
            CtlError::AccessDenied(_) => 4,
            _ => 1,
        }
    }

    /// Sorts a failed call by the D-Bus error name the bus or the daemon
    /// answered with.
    pub fn from_call(what: &'static str, bus: &str, err: zbus::Error) -> CtlError {
        let (name, message) = match &err {
            zbus::Error::MethodError(name, message, _) => {
                (name.to_string(), message.clone().unwrap_or_default())
            }
            zbus::Error::FDO(fdo) => {
                let name = zbus::DBusError::name(fdo.as_ref()).to_string();
                let message = zbus::DBusError::description(fdo.as_ref())
                    .unwrap_or_default()
                    .to_owned();
                (name, message)
            }
            _ => {
                return CtlError::Call {
                    what,
                    message: err.to_string(),
                }
            }
        };
        match name.as_str() {
            "org.freedesktop.DBus.Error.ServiceUnknown"
            | "org.freedesktop.DBus.Error.NameHasNoOwner" => CtlError::NotRunning {
                bus: bus.to_owned(),
            },
            "org.freedesktop.DBus.Error.AccessDenied" => CtlError::AccessDenied(message),
            _ => CtlError::Call {
                what,
                message: if message.is_empty() { name } else { message },
            },
        }
    }
}
