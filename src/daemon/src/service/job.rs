//! At a stop: is the service manager restarting the unit, or stopping it
//! for good? Asked of systemd over the system bus.
//!
//! systemd closes a service's fd store once the unit is inactive (or
//! failed) with no job left for it (`unit_release_resources`), unless
//! `FileDescriptorStorePreserve=yes`. Its close of a dma-buf nobody else
//! holds is that buffer's last release, which a client can make wait for
//! good (an epoll watching the buffer whose lock it holds; see
//! `held_files`): PID 1, and the whole system with it, would hang at
//! `systemctl stop`. So a daemon told to stop takes its fds out of the
//! store before it exits, unless the store is to be handed to the next
//! instance: a `restart` job (`systemctl restart`, `try-restart`) is one
//! job, which stops the unit (the SIGTERM the daemon sees) and then turns
//! into a start, and the store stays while it runs. (`reload-or-restart`
//! of this unit, which has `ExecReload=`, is a reload: a SIGHUP.) Any other answer, or none in time, counts as a stop for good:
//! PID 1's safety comes before keeping the buffers.
//!
//! A `restart` answer is asked for again once the last record is written,
//! right before the store is left as it is: only a second `restart` keeps
//! it. Still not covered: a restart job cancelled between that second
//! answer and the daemon's exit (up to two seconds: a STOPPING=1 the
//! manager had no room for, and the blocking work still running, are
//! given one each), a restart whose start never
//! succeeds (the start limit hit: the store is then released with the
//! daemon's fds in it), and a crash (nothing runs; `Restart=on-failure`
//! keeps the store anyway).

use std::fmt;
use std::time::Duration;

use zbus::proxy::CacheProperties;
use zbus::zvariant::OwnedObjectPath;

/// How long the whole question may take: at shutdown the bus may be going
/// away, and a stop must not wait for it.
pub const ASK_PATIENCE: Duration = Duration::from_secs(1);

/// How long the second question may take: a restart is asked about again
/// right before the store is left to it, as the last record took seconds
/// and a `systemctl stop` may have replaced the restart job meanwhile.
/// As long as the first: it opens a connection of its own, and on a
/// machine loaded enough to make the last record slow, a shorter wait
/// would take a real restart for a stop for good (no answer in time
/// counts as one) and lose every client's buffers.
pub const RECHECK_PATIENCE: Duration = ASK_PATIENCE;

/// The job type that keeps the store. systemd collapses `try-restart`
/// into `restart` (or into nothing) when it installs the job, so a job
/// the bus shows is never a `try-restart`; a `restart` is patched into a
/// `start` once its stop part is done, which is after the daemon exited.
const RESTART: &str = "restart";

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Manager",
    default_service = "org.freedesktop.systemd1",
    default_path = "/org/freedesktop/systemd1",
    gen_blocking = false
)]
trait Manager {
    #[zbus(name = "GetUnitByPID")]
    fn get_unit_by_pid(&self, pid: u32) -> zbus::Result<OwnedObjectPath>;
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Unit",
    default_service = "org.freedesktop.systemd1",
    gen_blocking = false
)]
trait Unit {
    /// The unit's job: its id and object, `(0, "/")` when it has none.
    #[zbus(property(emits_changed_signal = "false"))]
    fn job(&self) -> zbus::Result<(u32, OwnedObjectPath)>;
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Job",
    default_service = "org.freedesktop.systemd1",
    gen_blocking = false
)]
trait Job {
    #[zbus(property(emits_changed_signal = "false"))]
    fn job_type(&self) -> zbus::Result<String>;
}

/// What the manager said of the unit at the stop.
#[derive(Debug)]
pub enum Answer {
    /// A job of `kind` runs for the unit.
    Job { unit: String, id: u32, kind: String },
    /// The unit has no job: a SIGTERM nobody asked systemd for, which it
    /// counts as a clean exit, and restarts nothing.
    NoJob { unit: String },
    /// No answer: the bus or systemd could not be reached, or did not
    /// answer in time.
    Unknown(AskError),
}

impl Answer {
    /// Whether the manager keeps the fd store for the next instance.
    pub fn keeps_store(&self) -> bool {
        matches!(self, Answer::Job { kind, .. } if is_restart(kind))
    }

    /// Whether a job other than a restart runs for the unit: systemd then
    /// restarts nothing, whatever the exit, and releases the store.
    pub fn other_job(&self) -> bool {
        matches!(self, Answer::Job { kind, .. } if !is_restart(kind))
    }
}

impl fmt::Display for Answer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Answer::Job { unit, id, kind } => write!(f, "{unit} has a {kind} job ({id})"),
            Answer::NoJob { unit } => write!(f, "{unit} has no job"),
            Answer::Unknown(err) => write!(f, "no answer: {err}"),
        }
    }
}

/// Whether a job of this type keeps the store (see [`RESTART`]).
pub fn is_restart(kind: &str) -> bool {
    kind == RESTART
}

/// Why the manager gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum AskError {
    #[error("cannot reach the service manager's bus: {0}")]
    Bus(#[source] zbus::Error),
    #[error("systemd does not say which unit pid {pid} belongs to: {source}")]
    Unit {
        pid: u32,
        #[source]
        source: zbus::Error,
    },
    #[error("cannot read the job of {unit}: {source}")]
    Job {
        unit: String,
        #[source]
        source: zbus::Error,
    },
    #[error("cannot read the type of job {job}: {source}")]
    JobType {
        job: String,
        #[source]
        source: zbus::Error,
    },
    #[error("no answer within {0:?}")]
    TimedOut(Duration),
    #[error("the task asking was lost: {0}")]
    Lost(#[source] tokio::task::JoinError),
}

/// Asks systemd for the job of the daemon's own unit: the unit of its
/// pid, that unit's `Job`, and if it has one, its `JobType`. The system
/// manager is on the system bus (`$DBUS_SYSTEM_BUS_ADDRESS`, else the
/// standard socket); a user manager, which sets `$MANAGERPID` for its
/// services, on the user's session bus. Gives up after `patience`.
pub async fn ask(patience: Duration) -> Answer {
    match tokio::time::timeout(patience, ask_unbounded()).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(err)) => Answer::Unknown(err),
        Err(_) => Answer::Unknown(AskError::TimedOut(patience)),
    }
}

async fn ask_unbounded() -> Result<Answer, AskError> {
    let builder = if std::env::var_os("MANAGERPID").is_some() {
        zbus::connection::Builder::session()
    } else {
        zbus::connection::Builder::system()
    };
    let bus = builder
        .map_err(AskError::Bus)?
        .build()
        .await
        .map_err(AskError::Bus)?;
    let pid = std::process::id();
    let manager = ManagerProxy::new(&bus)
        .await
        .map_err(|source| AskError::Unit { pid, source })?;
    let unit_path = manager
        .get_unit_by_pid(pid)
        .await
        .map_err(|source| AskError::Unit { pid, source })?;
    let unit = unit_path.to_string();
    let unit_job = |source| AskError::Job {
        unit: unit.clone(),
        source,
    };
    let (id, job_path) = UnitProxy::builder(&bus)
        .path(unit_path.clone())
        .map_err(unit_job)?
        .cache_properties(CacheProperties::No)
        .build()
        .await
        .map_err(unit_job)?
        .job()
        .await
        .map_err(unit_job)?;
    if id == 0 {
        return Ok(Answer::NoJob { unit });
    }
    let job = job_path.to_string();
    let job_type = |source| AskError::JobType {
        job: job.clone(),
        source,
    };
    let kind = JobProxy::builder(&bus)
        .path(job_path.clone())
        .map_err(job_type)?
        .cache_properties(CacheProperties::No)
        .build()
        .await
        .map_err(job_type)?
        .job_type()
        .await
        .map_err(job_type)?;
    Ok(Answer::Job { unit, id, kind })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only a restart hands the store to a next instance; a stop, any
    /// other job, no job and no answer all end with systemd closing it.
    #[test]
    fn only_a_restart_job_keeps_the_store() {
        let job = |kind: &str| Answer::Job {
            unit: "/org/freedesktop/systemd1/unit/dmabroker_2eservice".into(),
            id: 7,
            kind: kind.into(),
        };
        assert!(job("restart").keeps_store());
        for kind in ["stop", "start", "reload", "verify-active", "nop", ""] {
            assert!(!job(kind).keeps_store(), "{kind}");
        }
        assert!(!Answer::NoJob { unit: "u".into() }.keeps_store());
        assert!(!Answer::Unknown(AskError::TimedOut(ASK_PATIENCE)).keeps_store());
    }
}
