//! A stand-in for the part of `org.freedesktop.systemd1` the daemon asks
//! at a stop (`src/daemon/src/service/job.rs`), on a private bus: the
//! manager's `GetUnitByPID`, the unit's `Job` property (`(uo)`, `(0, "/")`
//! without a job) and the job's `JobType`, as systemd serves them. Pass
//! [`Systemd1::env`] to the daemon as its system bus.
//!
//! It records every question, in order, and answers with the job it was
//! told of ([`UnitJob`]); [`UnitJob::Silent`] never answers, as a bus or
//! manager going away at shutdown might not.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use zbus::zvariant::{ObjectPath, OwnedObjectPath};

use crate::dbus::DbusDaemon;

pub const UNIT_PATH: &str = "/org/freedesktop/systemd1/unit/dmabroker_2eservice";
pub const JOB_PATH: &str = "/org/freedesktop/systemd1/job/4242";
const JOB_ID: u32 = 4242;

/// What the unit's job is when the daemon asks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UnitJob {
    /// No job: `Job` is `(0, "/")`.
    None,
    /// A running job of this type (`stop`, `restart`, …).
    Running(&'static str),
    /// `GetUnitByPID` never answers.
    Silent,
}

#[derive(Debug)]
struct Shared {
    job: UnitJob,
    /// The job from the next question on, once the daemon has had its
    /// first full answer (see [`Systemd1::replaced_after_first_answer`]).
    then: Option<UnitJob>,
    /// Each question, in order: `GetUnitByPID <pid>`, `Job`, `JobType`.
    asked: Vec<String>,
}

impl Shared {
    /// The daemon has its answer: a job replaced meanwhile shows from now.
    fn answered(&mut self) {
        if let Some(then) = self.then.take() {
            self.job = then;
        }
    }
}

struct Manager(Arc<Mutex<Shared>>);
struct Unit(Arc<Mutex<Shared>>);
struct Job(Arc<Mutex<Shared>>);

fn shared(shared: &Arc<Mutex<Shared>>) -> std::sync::MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

#[zbus::interface(name = "org.freedesktop.systemd1.Manager")]
impl Manager {
    #[zbus(name = "GetUnitByPID")]
    async fn get_unit_by_pid(&self, pid: u32) -> zbus::fdo::Result<OwnedObjectPath> {
        let job = {
            let mut shared = shared(&self.0);
            shared.asked.push(format!("GetUnitByPID {pid}"));
            shared.job.clone()
        };
        if job == UnitJob::Silent {
            std::future::pending::<()>().await;
        }
        Ok(ObjectPath::from_static_str_unchecked(UNIT_PATH).into())
    }
}

#[zbus::interface(name = "org.freedesktop.systemd1.Unit")]
impl Unit {
    #[zbus(property(emits_changed_signal = "false"))]
    async fn job(&self) -> (u32, OwnedObjectPath) {
        let mut shared = shared(&self.0);
        shared.asked.push("Job".into());
        match shared.job {
            UnitJob::Running(_) => (
                JOB_ID,
                ObjectPath::from_static_str_unchecked(JOB_PATH).into(),
            ),
            _ => {
                shared.answered();
                (0, ObjectPath::from_static_str_unchecked("/").into())
            }
        }
    }
}

#[zbus::interface(name = "org.freedesktop.systemd1.Job")]
impl Job {
    #[zbus(property(emits_changed_signal = "false"))]
    async fn job_type(&self) -> String {
        let mut shared = shared(&self.0);
        shared.asked.push("JobType".into());
        let kind = match shared.job {
            UnitJob::Running(kind) => kind.to_owned(),
            _ => "nop".to_owned(),
        };
        shared.answered();
        kind
    }
}

/// A private bus with `org.freedesktop.systemd1` on it. Dropped, the
/// bus goes (and the service with it).
pub struct Systemd1 {
    shared: Arc<Mutex<Shared>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    // Last: the service's connection ends before its bus.
    bus: DbusDaemon,
}

impl std::fmt::Debug for Systemd1 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Systemd1")
            .field("address", &self.bus.address())
            .finish_non_exhaustive()
    }
}

impl Systemd1 {
    /// The stand-in, serving once this returns.
    pub fn start(job: UnitJob) -> Systemd1 {
        Systemd1::serve(job, None)
    }

    /// The stand-in, answering `first` once (until the daemon has read a
    /// job's type, or learnt there is none) and `then` from there on: a
    /// job replaced while the daemon acts on its answer, as a `systemctl
    /// stop` replaces a restart job still stopping the unit.
    pub fn replaced_after_first_answer(first: UnitJob, then: UnitJob) -> Systemd1 {
        Systemd1::serve(first, Some(then))
    }

    fn serve(job: UnitJob, then: Option<UnitJob>) -> Systemd1 {
        let bus = DbusDaemon::start();
        let shared = Arc::new(Mutex::new(Shared {
            job,
            then,
            asked: Vec::new(),
        }));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready, serving) = std::sync::mpsc::channel::<Result<(), String>>();
        let address = bus.address().to_owned();
        let served = Arc::clone(&shared);
        let thread = std::thread::spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(err) => {
                    let _ = ready.send(Err(err.to_string()));
                    return;
                }
            };
            runtime.block_on(async move {
                let connection = async {
                    zbus::connection::Builder::address(address.as_str())?
                        .serve_at("/org/freedesktop/systemd1", Manager(Arc::clone(&served)))?
                        .serve_at(UNIT_PATH, Unit(Arc::clone(&served)))?
                        .serve_at(JOB_PATH, Job(Arc::clone(&served)))?
                        .name("org.freedesktop.systemd1")?
                        .build()
                        .await
                }
                .await;
                match connection {
                    Ok(connection) => {
                        let _ = ready.send(Ok(()));
                        let _ = stopped.await;
                        drop(connection);
                    }
                    Err(err) => {
                        let _ = ready.send(Err(err.to_string()));
                    }
                }
            });
        });
        match serving.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => {}
            Ok(Err(err)) => panic!("the stand-in for systemd could not serve: {err}"),
            Err(err) => panic!("the stand-in for systemd did not start: {err}"),
        }
        Systemd1 {
            shared,
            stop: Some(stop),
            thread: Some(thread),
            bus,
        }
    }

    /// A bus on which nobody owns `org.freedesktop.systemd1`.
    pub fn absent() -> DbusDaemon {
        DbusDaemon::start()
    }

    /// The daemon's environment for this bus as its system bus.
    pub fn env(&self) -> (&'static str, String) {
        ("DBUS_SYSTEM_BUS_ADDRESS", self.bus.address().to_owned())
    }

    /// What the daemon asked so far, in order.
    pub fn asked(&self) -> Vec<String> {
        shared(&self.shared).asked.clone()
    }
}

impl Drop for Systemd1 {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // A silent answer never ends: the runtime's drop cancels it.
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
