//! Putting the daemon together: policy, heaps, socket, signals.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use dmabroker_policy::Policy;
use tokio::signal::unix::{signal, SignalKind};

use crate::broker::{Broker, State};
use crate::config::Config;
use crate::heaps::{HeapConfig, HeapRegistry};
use crate::server::{accept_loop, Listener};
use crate::service::fdstore::{
    read_record, store_waiting, Batch, FdStore, RecordError, RecordWriter,
};
use crate::service::inherited::{buffer_id_of, Inherited, Stored, RECORD_PREFIX};
use crate::service::record::StateRecord;
use crate::service::{job, notify, watchdog};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("policy: {0}")]
    Policy(#[from] dmabroker_policy::PolicyError),
    #[error(transparent)]
    Server(#[from] crate::server::ServerError),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error(
        "no heap is usable, so every allocation would fail ({}); the heap order comes from --heaps: leave it out to use every dma-heap found, then udmabuf and memfd",
        describe_unusable(.0)
    )]
    NoUsableHeap(Vec<(String, String)>),
    #[error("the loop accepting clients ended")]
    AcceptEnded,
    #[error("the loop accepting clients failed: {0}")]
    AcceptLost(#[source] tokio::task::JoinError),
}

fn describe_unusable(unusable: &[(String, String)]) -> String {
    if unusable.is_empty() {
        return "the order names no heap".to_owned();
    }
    crate::heaps::describe_tried(unusable)
}

/// Loads the policy the configuration names: explicit files, or the
/// standard locations (built-in defaults when none exist).
pub fn load_policy(config: &Config) -> Result<Policy, dmabroker_policy::PolicyError> {
    if config.policy.is_empty() {
        Policy::load_system()
    } else {
        Policy::load_files(&config.policy)
    }
}

pub async fn run(config: Config, inherited: Inherited) -> Result<(), DaemonError> {
    // First: a stop that comes while the daemon starts (its socket may
    // already take clients) is kept for the loop below and ends it
    // cleanly. Installed after the socket was bound, a SIGTERM in between
    // killed the daemon outright, the socket file left behind.
    let mut sigterm = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;
    let mut sighup = signal(SignalKind::hangup()).map_err(DaemonError::Signals)?;
    let policy = load_policy(&config)?;
    let heaps = HeapRegistry::discover(&HeapConfig {
        dma_heap_dir: config.dma_heap_dir.clone(),
        udmabuf_path: config.udmabuf.clone(),
        order: config.heaps.clone(),
        enable_memfd: true,
    });
    let heap_names: Vec<&str> = heaps.heaps().iter().map(|h| h.name.as_str()).collect();
    tracing::info!(heaps = ?heap_names, default = heaps.default_heap(), "heaps discovered");
    // Nothing to allocate from: a mistyped `--heaps` (or a node not there)
    // would otherwise start a daemon that refuses every allocation. Refused
    // at the start, unless buffers of a previous instance came back: those
    // are still served (see below).
    let unusable = heap_names.is_empty().then(|| heaps.unusable());
    let fd_limit = crate::inflight::raise_fd_limit();
    let fitting = crate::inflight::connection_cap(crate::inflight::MAX_CONNECTIONS, fd_limit);
    let max_connections = match config.max_connections.map(|n| n as usize) {
        Some(asked) if asked > fitting => {
            tracing::warn!(
                fd_limit,
                max_connections = asked,
                fitting,
                "serving more connections than fit the fd limit: clients that never read could use it up, and then no fd would reach any client (raise LimitNOFILE= / ulimit -Hn)"
            );
            asked
        }
        Some(asked) => asked,
        None if fitting < crate::inflight::MAX_CONNECTIONS => {
            tracing::warn!(
                fd_limit,
                max_connections = fitting,
                "connection cap lowered to fit the fd limit: each connection may have {} fds unread, and together they must stay within half of it (raise LimitNOFILE= / ulimit -Hn)",
                crate::inflight::PER_CONNECTION
            );
            fitting
        }
        None => fitting,
    };
    tracing::info!(fd_limit, max_connections, "fd limit");
    let limits = crate::broker::DaemonLimits {
        max_connections,
        hello_timeout: config.hello_timeout,
        ..Default::default()
    };
    let mut state = State::new(heaps, policy, limits);
    state.fd_store = FdStore::from_env(config.fd_store_max).map(Arc::new);
    if let Some(store) = &state.fd_store {
        tracing::info!(
            max = store.capacity.max,
            buffers = store.capacity.buffer_slots(),
            told_by_manager = store.capacity.from_manager,
            "fd store capacity"
        );
    }
    let (restored, writer) = restore(&mut state, inherited.stored);
    if let Some(unusable) = unusable {
        if !restored {
            return Err(DaemonError::NoUsableHeap(unusable));
        }
        tracing::error!(
            heaps = %describe_unusable(&unusable),
            "no heap is usable: every allocation will be refused; the buffers of the previous instance are still served"
        );
    }
    if let Some(store) = &state.fd_store {
        store.set_record_slots(writer.record_slots());
    }
    let persist_wanted = Arc::clone(&state.persist_wanted);
    let broker = Broker::new(state);
    let listener = match inherited.listener {
        Some(fd) => {
            tracing::info!("serving the socket the service manager passed");
            Listener { fd, path: None }
        }
        None => {
            let path = config.socket_path();
            let listener = Listener::bind(
                &path,
                config.system_mode(),
                config.socket_mode,
                config.socket_group,
            )?;
            tracing::info!(socket = %path.display(), "serving");
            if let Some(stall) = start_stall() {
                tokio::time::sleep(stall).await;
            }
            listener
        }
    };
    if restored {
        let grace = config.reattach_grace;
        let broker = Arc::clone(&broker);
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            let dropped = broker.with(|s| s.drop_orphans());
            if dropped > 0 {
                tracing::warn!(
                    dropped,
                    "buffers not re-attached within the grace period were released"
                );
            } else {
                tracing::info!("re-attach grace period over: every hold was re-attached");
            }
        });
    }
    let persisting = broker.lock().fd_store.is_some().then(|| {
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(persist_loop(
            Arc::clone(&broker),
            persist_wanted,
            writer,
            stopped,
        ));
        (task, stop)
    });
    if let Some(interval) = sd_notify::watchdog_enabled() {
        tokio::spawn(watchdog::run(interval));
    }
    watchdog::spawn_test_wedge();
    crate::broker::cache_sync_delay(crate::kernel::dma_buf::SyncPhase::Start);
    crate::broker::cache_sync_delay(crate::kernel::dma_buf::SyncPhase::End);
    last_record_stall();
    tokio::spawn(status_loop(Arc::clone(&broker)));
    let _dbus = crate::dbus::spawn(
        Arc::clone(&broker),
        crate::dbus::BusChoice::from_option(config.dbus.as_deref(), config.system_mode()),
        config.dbus_cpus.clone(),
        {
            let (broker, config) = (Arc::clone(&broker), config.clone());
            move || reload(&broker, &config)
        },
    );

    let listen_fd = listener
        .fd
        .try_clone()
        .map_err(|e| DaemonError::Server(crate::server::ServerError::Reactor(e)))?;
    let mut accepting = tokio::spawn(accept_loop(Arc::clone(&broker), listen_fd));
    notify::ready(&status_line(&broker));
    let accept_ended = loop {
        tokio::select! {
            _ = sigterm.recv() => break None,
            _ = sigint.recv() => break None,
            _ = sighup.recv() => {
                // Off the broker's thread: reading the files (and names
                // of users and groups) may wait, and so may the turn of a
                // D-Bus reload running meanwhile.
                let (broker, config) = (Arc::clone(&broker), config.clone());
                tokio::task::spawn_blocking(move || reload(&broker, &config));
            }
            result = &mut accepting => break Some(result),
        }
    };
    // The one deadline of the last record is taken here.
    let signalled = tokio::time::Instant::now();
    // Before the last record is copied: a request handled during the copy
    // could be answered yet missing from it (a buffer allocated and then
    // dropped by the next instance as unknown).
    broker.with(|s| s.stopping = true);
    // The record's writer stops at once (the record it is writing aside)
    // and waits to be told what to do of the last record: a stop for good
    // stores nothing more, and it is not known yet which this is.
    let persisting = persisting.map(|(task, stop)| {
        let (verdict, awaited) = tokio::sync::oneshot::channel();
        let _ = stop.send(awaited);
        (task, verdict)
    });
    if let Some(result) = accept_ended {
        let err = accept_loop_ended(result);
        tracing::error!(error = %err, "no more clients can connect: exiting with a failure, for the service manager to restart the daemon with the fd store as it is");
        if let Some((task, stop)) = persisting {
            let writer = last_record(
                task,
                stop,
                LastRecord::Until(signalled + LAST_RECORD_PATIENCE),
            )
            .await;
            // A `systemctl stop` meanwhile is not seen (its SIGTERM is read
            // no more), and with a stop job systemd restarts nothing,
            // whatever the exit: it would close the full store. Only a job
            // it runs says so; with none (or no answer), the failure's
            // restart hands the store on, as after a crash.
            let answer = job::ask(job::ASK_PATIENCE).await;
            if answer.other_job() {
                tracing::info!(%answer, "the service manager is stopping the unit meanwhile");
                leave_or_empty_store(&broker, &answer, writer.as_ref()).await;
            }
        }
        listener.remove_path();
        return Err(err);
    }
    tracing::info!("shutting down");
    notify::stopping();
    accepting.abort();
    if let Some((task, stop)) = persisting {
        // Asked before the last record, not beside it: a stop for good
        // then puts nothing more in the store (every buffer would only be
        // taken out again, the manager's queue waited for twice), while a
        // restart still gets its last record by the same deadline.
        let first = job::ask(job::ASK_PATIENCE).await;
        if first.keeps_store() {
            let writer = last_record(
                task,
                stop,
                LastRecord::Until(signalled + LAST_RECORD_PATIENCE),
            )
            .await;
            // The record took up to seconds, during which a `systemctl
            // stop` may have replaced the restart job: only a restart
            // still running now keeps the store.
            let now = job::ask(job::RECHECK_PATIENCE).await;
            if !now.keeps_store() {
                tracing::info!(before = %first, %now, "the restart the service manager was running is not running any more");
            }
            leave_or_empty_store(&broker, &now, writer.as_ref()).await;
        } else {
            // Before the writer is told: a record it is storing now fails
            // rather than follow the removals.
            notify::refuse_fd_stores();
            let writer = last_record(task, stop, LastRecord::Skip).await;
            leave_or_empty_store(&broker, &first, writer.as_ref()).await;
        }
    }
    listener.remove_path();
    // A STOPPING=1 the manager had no room for is still on its way.
    notify::flush(std::time::Duration::from_secs(1));
    Ok(())
}

/// Tells the stopped record's writer what to do of the last record
/// (`last`) and waits for it, within a bound (a writer that does not
/// return in time is left behind: hence the refusal of any store after a
/// stop for good's removals); gives it back, `None` if it was lost.
async fn last_record(
    task: tokio::task::JoinHandle<Option<RecordWriter>>,
    verdict: tokio::sync::oneshot::Sender<LastRecord>,
    last: LastRecord,
) -> Option<RecordWriter> {
    let _ = verdict.send(last);
    // One deadline from the signal on; the record being written when it
    // came may still wait its own patience first.
    match tokio::time::timeout(
        LAST_RECORD_PATIENCE + RECORD_PATIENCE + Duration::from_secs(1),
        task,
    )
    .await
    {
        Ok(Ok(kept)) => kept,
        Ok(Err(err)) => {
            tracing::error!(error = %err, "the writer of the buffer table record failed");
            None
        }
        Err(_) => {
            tracing::warn!("the last record of the buffer table was not written in time");
            None
        }
    }
}

/// The accept loop ended on its own (an error, a panic, or a return it
/// never makes but for one): no new client can connect, and the daemon
/// exits with this error, so with a failure. Not through the stop path:
/// nobody asked for a stop, and the unit has no job to ask about. A
/// failure is what `Restart=on-failure` (the shipped unit) restarts, and
/// systemd keeps the fd store across that restart, as across a crash: the
/// next instance gets every buffer back, with the last record written
/// first. Exiting 0, as this once did, let systemd count the unit as
/// stopped for good and close a full store (the hang `job` is about);
/// emptying the store instead would be safe for PID 1 but lose every
/// client's buffers for a fault of the daemon's own. A unit without
/// `Restart=` is left as after a crash (docs/operations.md).
fn accept_loop_ended(
    result: Result<Result<(), crate::server::ServerError>, tokio::task::JoinError>,
) -> DaemonError {
    match result {
        Ok(Ok(())) => DaemonError::AcceptEnded,
        Ok(Err(err)) => err.into(),
        Err(join) => DaemonError::AcceptLost(join),
    }
}

/// At a stop, once the last record is written: unless the service
/// manager is restarting the unit (`answer`, see `service::job`), every
/// fd the daemon put in its store is taken out again, and the daemon
/// waits (up to [`TAKE_OUT_PATIENCE`]) for the manager to have read the
/// removals. systemd closes the store of a unit stopped for good after the
/// daemon has exited, and its close of a dma-buf no client holds any more
/// would be that buffer's last release, which a client can make wait for
/// good (see `held_files`): PID 1 would hang. Taken out first, the
/// buffers' last releases are the daemon's own exit's, or a client's.
async fn leave_or_empty_store(
    broker: &Arc<Broker>,
    answer: &job::Answer,
    writer: Option<&RecordWriter>,
) {
    let Some(store) = broker.lock().fd_store.clone() else {
        return;
    };
    if answer.keeps_store() {
        tracing::info!(
            %answer,
            "the service manager is restarting the unit: the fd store keeps every buffer for the next instance"
        );
        return;
    }
    // Nothing goes in behind the removals (a writer that overran its
    // time, an allocation finishing on the blocking pool).
    notify::refuse_fd_stores();
    let records = writer
        .map(RecordWriter::record_names)
        .unwrap_or_else(|| RecordWriter::default().record_names());
    let (names, buffers) = {
        let state = broker.lock();
        let ids = state.buffer_ids();
        let buffers = ids.len();
        (store.names_in_store(ids, records), buffers)
    };
    tracing::info!(
        %answer,
        buffers,
        names = names.len(),
        "the unit is not being restarted: taking every buffer out of the fd store before exiting, so that the service manager's close of it is no buffer's last release"
    );
    match take_out(store, names).await {
        Ok(removed) => {
            tracing::info!(
                removed,
                "the service manager has read the removals from the fd store"
            );
        }
        Err(err) => tracing::warn!(
            error = %err,
            "the fd store may still hold buffers when the service manager closes it"
        ),
    }
}

/// Why the take-out at a stop for good came to no end (see [`take_out`]).
#[derive(Debug, thiserror::Error)]
enum TakeOutFailed {
    #[error(transparent)]
    Store(#[from] crate::service::fdstore::TakeOutError),
    #[error("its thread ended without an answer (it panicked)")]
    Lost,
    #[error("its thread did not answer within {0:?}")]
    TimedOut(Duration),
}

/// Takes `names` out of the store (see [`FdStore::take_out`]) within
/// [`TAKE_OUT_PATIENCE`] and a margin, whatever happens: on a thread of
/// its own, not the blocking pool, which at a stop may be full (its
/// threads held by heaps or fences that do not answer) and would queue it
/// for good; awaited with a timeout, so a take-out that overran its
/// deadline (a lock held) cannot hold the exit up. A thread that cannot be
/// created (the unit's `TasksMax=`) is no panic: the take-out then runs
/// here, on the runtime's thread, which nothing else needs any more, bounded
/// by its own deadline.
async fn take_out(store: Arc<FdStore>, names: Vec<String>) -> Result<usize, TakeOutFailed> {
    let deadline = std::time::Instant::now() + TAKE_OUT_PATIENCE;
    let (answer, answered) = tokio::sync::oneshot::channel();
    let on_its_thread = {
        let (store, names) = (Arc::clone(&store), names.clone());
        std::thread::Builder::new()
            .name("dmabroker-takeout".into())
            .spawn(move || {
                let _ = answer.send(store.take_out(&names, deadline));
            })
    };
    if let Err(err) = on_its_thread {
        tracing::warn!(error = %err, "cannot start a thread to take the buffers out of the fd store: taking them out on the runtime's thread");
        return Ok(store.take_out(&names, deadline)?);
    }
    let patience = TAKE_OUT_PATIENCE + TAKE_OUT_MARGIN;
    match tokio::time::timeout(patience, answered).await {
        Ok(Ok(taken)) => Ok(taken?),
        Ok(Err(_)) => Err(TakeOutFailed::Lost),
        Err(_) => Err(TakeOutFailed::TimedOut(patience)),
    }
}

/// A broken policy file never replaces a working policy.
pub fn reload(broker: &Arc<Broker>, config: &Config) -> bool {
    // One reload at a time: a D-Bus reload runs on a blocking thread, and
    // a SIGHUP meanwhile would otherwise read the files after it yet could
    // replace the policy before it, leaving the older files in force.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    // SIGHUP and D-Bus ReloadPolicy both come here, so the service manager
    // hears about every reload.
    notify::reloading();
    let reloaded = match load_policy(config) {
        Ok(policy) => {
            broker.with(|s| s.replace_policy(policy));
            tracing::info!("policy reloaded");
            true
        }
        Err(err) => {
            tracing::error!(error = %err, "policy reload failed; keeping the current policy");
            false
        }
    };
    notify::reloaded(&status_line(broker));
    reloaded
}

/// Takes back what a previous instance left in the fd store. Returns
/// whether anything was restored (re-attach grace then applies) and the
/// writer that continues its record.
fn restore(state: &mut State, mut stored: Stored) -> (bool, RecordWriter) {
    if stored.is_empty() {
        return (false, RecordWriter::default());
    }
    let latest = latest_record(&stored.records);
    // Of several fds under one buffer's name, the recorded one is the
    // buffer, whichever was handed over first.
    stored.keep_recorded(latest.as_ref().map(|(_, record)| record));
    let names = stored.names();
    // Before any removal of those names: sent, it takes them all.
    if let Some(store) = &state.fd_store {
        store.set_extra_fds(stored.extra_fds());
    }
    // No id of a previous instance is handed out again, whatever became of
    // its record: a removal of an old `buf-N` still waiting for room in the
    // manager's queue would otherwise remove a new buffer N.
    // An id above those this daemon hands out is none it gave, and is not
    // one to go on from (see `broker::MAX_BUFFER_ID`).
    let above_stored = names
        .iter()
        .filter_map(|name| buffer_id_of(name))
        .max()
        .map_or(0, |id| id.saturating_add(1));
    state.bump_next_buffer_id(above_stored);
    let Some((record_name, record)) = latest else {
        tracing::warn!(
            fds = stored.len(),
            "fd store holds no readable record; dropping its fds"
        );
        if let Some(store) = &state.fd_store {
            for name in names.iter().filter(|n| !n.starts_with(RECORD_PREFIX)) {
                store.remove(name);
            }
            state.persist_wanted.notify_one();
        }
        // Only now that their removals are sent (see `let_go_of_unkept`).
        for (name, fd) in std::mem::take(&mut stored.buffers) {
            state.let_go_of_unkept(&name, fd);
        }
        // Removed by the record's writer before its first record.
        return (false, RecordWriter::fresh(record_fds(&stored.records)));
    };
    let mut summary = state.restore(&record, std::mem::take(&mut stored.buffers));
    // Whatever was not taken back must leave the store too. Other records
    // are removed by the record's writer before its first record (waiting
    // for room, and tried again until they are gone); older records
    // sharing the kept record's name go with the next record, which is
    // stored under the other name and then removes this one.
    if let Some(store) = &state.fd_store {
        for name in &names {
            // A live buffer's own name only: `buf-01` parses as buffer 1
            // too, but the restore took only `buf-1`.
            let kept = name.starts_with(RECORD_PREFIX)
                || buffer_id_of(name).is_some_and(|id| state.buffers.contains_key(&id));
            if !kept {
                store.remove(name);
            }
        }
        // A new record at once: it replaces any stale one and records
        // what the restore changed.
        state.persist_wanted.notify_one();
    }
    // Only now that their removals are sent (see `let_go_of_unkept`).
    for (name, fd) in std::mem::take(&mut summary.not_kept) {
        state.let_go_of_unkept(&name, fd);
    }
    if let Some(store) = &state.fd_store {
        let slots = store.capacity.buffer_slots();
        if state.buffers.len() > slots {
            tracing::warn!(
                buffers = state.buffers.len(),
                slots,
                "more buffers were taken back than the fd store now keeps \
                 (FileDescriptorStoreMax= was lowered?): new buffers are \
                 refused, and the record taken back stays in the store in \
                 place of a new one, until enough are freed"
            );
        }
    }
    tracing::info!(
        restored = summary.restored,
        lost = summary.lost,
        unknown = summary.unknown_fds,
        "buffers taken back from the fd store"
    );
    let (kept, stale): (Vec<_>, Vec<_>) = record_fds(&stored.records)
        .into_iter()
        .partition(|(name, _)| *name == record_name);
    let kept_fds = kept.iter().map(|(_, fds)| fds).sum();
    let writer = RecordWriter::continuing(record_name, record.generation, kept_fds, stale);
    (summary.restored > 0, writer)
}

/// Each record name in the store with how many fds it has, in the order
/// handed over: systemd counts fds, not names, and removing a name removes
/// every fd of it.
fn record_fds(records: &[(String, OwnedFd)]) -> Vec<(String, usize)> {
    let mut counted: Vec<(String, usize)> = Vec::new();
    for (name, _) in records {
        match counted.iter_mut().find(|(known, _)| known == name) {
            Some((_, fds)) => *fds += 1,
            None => counted.push((name.clone(), 1)),
        }
    }
    counted
}

/// The record of the highest generation among all stored, whatever their
/// names: two may share one (see `Stored`), and the one handed over last
/// is then the oldest.
fn latest_record(records: &[(String, OwnedFd)]) -> Option<(String, StateRecord)> {
    let mut best: Option<(String, StateRecord)> = None;
    for (name, fd) in records {
        let record = match read_record(fd) {
            Ok(record) => record,
            Err(err) => {
                tracing::warn!(name, error = %err, "unreadable record in the fd store; ignoring it");
                continue;
            }
        };
        if best
            .as_ref()
            .is_none_or(|(_, b)| record.generation > b.generation)
        {
            best = Some((name.clone(), record));
        }
    }
    best
}

/// Writes the record of the buffer table 50 ms after a change (changes
/// come in bursts), and once more when the daemon stops: a change made
/// within those 50 ms would otherwise be missing, and the next instance
/// would drop a buffer its client still holds; but not at a stop for
/// good (see [`LastRecord`]). Gives the writer back at the end (`None` if
/// it was lost): its records are to be removed at a stop for good.
///
/// A record or a buffer that could not be stored (out of fds, the
/// manager's socket gone) is tried again after [`RETRY_FIRST`], doubling up to
/// [`RETRY_MAX`], whether or not the table changes meanwhile: until one is
/// stored, the store's record lacks the latest buffers and holds.
async fn persist_loop(
    broker: Arc<Broker>,
    wanted: Arc<tokio::sync::Notify>,
    mut writer: RecordWriter,
    mut stopped: tokio::sync::oneshot::Receiver<Stopped>,
) -> Option<RecordWriter> {
    let mut retry: Option<Duration> = None;
    let reoffer = reoffer_period();
    // The wait before the next offer of an unchanged record: doubled by
    // each offer, back to `reoffer` with each change (see
    // `next_reoffer`).
    let mut reoffer_in = reoffer;
    // A failure was warned about: its end is worth an info line too.
    let mut warned = false;
    // In a run of tries the store had no slot for: warned about once.
    let mut no_room = false;
    let stop_at = loop {
        let delay = match retry {
            Some(delay) => delay,
            None => {
                tokio::select! {
                    _ = wanted.notified() => writer.table_changed(),
                    // Everything is in, as far as the daemon can know:
                    // the record is offered again in case the manager
                    // dropped it (see `RecordWriter::reoffer`), unless
                    // the store is full by the daemon's own count.
                    _ = tokio::time::sleep(reoffer_in) => {
                        reoffer_in = next_reoffer(reoffer_in, reoffer);
                        if !store_has_a_free_slot(&broker, &writer) {
                            continue;
                        }
                        match reoffer_record(writer, &mut stopped).await {
                            Reoffered::Done(kept) => writer = kept,
                            Reoffered::Stopped(kept, at) => {
                                writer = kept;
                                break at;
                            }
                            Reoffered::Lost => return None,
                        }
                        continue;
                    }
                    at = &mut stopped => break at.ok(),
                }
                RECORD_DEBOUNCE
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            // Without a slot for the record, a free is what makes one: the
            // next try follows it, not the end of the back-off.
            _ = wanted.notified(), if no_room => {
                writer.table_changed();
                tokio::select! {
                    _ = tokio::time::sleep(RECORD_DEBOUNCE) => {}
                    at = &mut stopped => break at.ok(),
                }
            }
            at = &mut stopped => break at.ok(),
        }
        let (kept, written) = store_record(&broker, writer, RECORD_PATIENCE).await?;
        writer = kept;
        // A try follows a change (or a failure): a new record, perhaps,
        // which the manager may drop as it may any, so the offers of it
        // start over at the period.
        reoffer_in = reoffer;
        retry = match (written, retry) {
            (Written::Stored, _) => {
                if std::mem::take(&mut warned) {
                    tracing::info!("the buffer table record is stored again");
                }
                if let Some(store) = &broker.lock().fd_store {
                    store.note_progress();
                }
                None
            }
            // Paced by the writer's own wait for room: no back-off (the
            // fd store logs the run of failures once).
            (Written::Behind, _) => Some(RETRY_FIRST),
            (Written::Failed, previous) => {
                warned = true;
                let next = backed_off(previous);
                tracing::warn!(
                    retry_in_ms = next.as_millis() as u64,
                    "the buffer table record will be written again"
                );
                Some(next)
            }
            (Written::NoRoom { buffer_fds, max }, previous) => {
                if !no_room {
                    warned = true;
                    tracing::warn!(
                        buffer_fds,
                        max,
                        "the fd store has no slot for a new record of the buffer table \
                         (FileDescriptorStoreMax= lowered?): the previous record stays in \
                         it until enough buffers are freed; holds taken meanwhile \
                         (imports) are not recorded"
                    );
                }
                Some(backed_off(previous))
            }
        };
        no_room = matches!(written, Written::NoRoom { .. });
    };
    // At stop: the last record, and what is still out of the store, get
    // their last chance until the stop's deadline (taken at the signal), a
    // batch at a time while each makes progress.
    let last = match stop_at {
        Some(verdict) => verdict.await.ok(),
        None => None,
    };
    let until = match last {
        Some(LastRecord::Until(at)) => at,
        Some(LastRecord::Skip) => return Some(writer),
        None => tokio::time::Instant::now() + LAST_RECORD_PATIENCE,
    };
    let mut writer = writer;
    let mut out = broker.lock().buffers_out_of_store();
    loop {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        let (kept, written) = store_record(&broker, writer, left).await?;
        let now_out = broker.lock().buffers_out_of_store();
        if written == Written::Stored || now_out >= out || left.is_zero() {
            return Some(kept);
        }
        (writer, out) = (kept, now_out);
    }
}

/// A stop, as [`persist_loop`] is told of it at the signal: what to do
/// of the last record follows on this, once the daemon knows.
type Stopped = tokio::sync::oneshot::Receiver<LastRecord>;

/// A test hook's wait: `variable`'s milliseconds, at most 10 s, warned
/// about (`what` it delays) when set; `None` when it is not.
fn test_stall(variable: &str, what: &str) -> Option<Duration> {
    let asked = std::env::var(variable).ok()?.parse::<u64>().ok()?;
    let stall = Duration::from_millis(asked).min(Duration::from_secs(10));
    tracing::warn!(
        variable,
        asked_ms = asked,
        stall_ms = stall.as_millis() as u64,
        "test hook: {what}"
    );
    Some(stall)
}

/// Test hook: how long the start waits once the socket is bound, before
/// the rest (`DMABROKER_TEST_START_STALL_MS`, at most 10 s): a stop that
/// comes then must still end the daemon cleanly.
fn start_stall() -> Option<Duration> {
    test_stall(
        "DMABROKER_TEST_START_STALL_MS",
        "the start waits once the socket is bound",
    )
}

/// Test-only hook: `DMABROKER_TEST_LAST_RECORD_STALL_MS=N` makes every
/// record written once the daemon is stopping wait N ms (at most 10 s)
/// before it is sent, as on a blocking pool too busy to run it: a writer
/// that overruns its time, so that tests can show nothing it sends then
/// goes into the store behind a stop for good's removals. Read once;
/// warned about at start.
fn last_record_stall() -> Option<Duration> {
    static STALL: std::sync::OnceLock<Option<Duration>> = std::sync::OnceLock::new();
    *STALL.get_or_init(|| {
        test_stall(
            "DMABROKER_TEST_LAST_RECORD_STALL_MS",
            "records written at a stop wait before they are sent",
        )
    })
}

/// What the record's writer does at a stop (see [`Stopped`]).
#[derive(Clone, Copy, Debug)]
enum LastRecord {
    /// A restart: the last record, and the buffers still out of the
    /// store, until this deadline (taken at the signal).
    Until(tokio::time::Instant),
    /// A stop for good: the store is to be emptied, so nothing more goes
    /// in; the writer comes back at once (or once the record it is
    /// writing is done).
    Skip,
}

/// Offers the stored record to the manager again (see
/// [`RecordWriter::reoffer`]), on the blocking pool: it may wait up to
/// [`RECORD_PATIENCE`] for room in the manager's queue, in slices of
/// [`REOFFER_SLICE`] with a look at `stopped` between them, so that a stop
/// meanwhile waits a slice at most for the writer, not the whole patience
/// out of the last record's deadline. An offer that could not be sent is
/// only logged: the next period offers it again.
async fn reoffer_record(
    mut writer: RecordWriter,
    stopped: &mut tokio::sync::oneshot::Receiver<Stopped>,
) -> Reoffered {
    let give_up = std::time::Instant::now() + RECORD_PATIENCE;
    loop {
        let slice_end = (std::time::Instant::now() + REOFFER_SLICE).min(give_up);
        let mut offer = tokio::task::spawn_blocking(move || {
            let result = writer.reoffer(slice_end);
            (writer, result)
        });
        let mut stop = None;
        let offered = tokio::select! {
            offered = &mut offer => offered,
            at = &mut *stopped => {
                // Received once: the caller stops with it.
                stop = Some(at.ok());
                offer.await
            }
        };
        let (kept, result) = match offered {
            Ok(offered) => offered,
            Err(err) => {
                tracing::error!(error = %err, "offering the buffer table record again failed; no more records");
                return Reoffered::Lost;
            }
        };
        writer = kept;
        // Still no room in the manager's queue, and patience left: the
        // next slice, unless the daemon is stopping.
        let again = matches!(&result, Err(err) if err.is_would_block())
            && std::time::Instant::now() < give_up;
        match result {
            Ok(true) => tracing::debug!("the stored record was offered to the fd store again"),
            Ok(false) => {}
            Err(_) if again && stop.is_none() => {}
            Err(err) => tracing::debug!(error = %err, "cannot offer the record again"),
        }
        if let Some(at) = stop {
            return Reoffered::Stopped(writer, at);
        }
        if !again {
            return Reoffered::Done(writer);
        }
    }
}

/// What became of an offer of the record (see [`reoffer_record`]).
enum Reoffered {
    /// Offered, or not (logged): the writer back.
    Done(RecordWriter),
    /// The daemon is stopping: the writer back, with the stop (`None` if
    /// its sender went without a word).
    Stopped(RecordWriter, Option<Stopped>),
    /// The blocking task failed, and the writer with it.
    Lost,
}

/// The wait before the next offer of an unchanged record, after one
/// offer waited `current`: twice as long, up to [`REOFFER_BACKOFF`] times
/// `period`. systemd checks its store's maximum before it looks for the
/// same file in it (`service_add_fd_store`: `EXFULL` first), so an offer
/// to a store it counts full is refused even for a record it holds, with
/// a warning in PID 1's log ("Cannot store more fds than
/// FileDescriptorStoreMax="). That is the very case the offers are for
/// (it counts more than the daemon does: a lowered maximum under a
/// running daemon), and it lasts until buffers are freed, which change
/// the table: with a fixed period it was a warning a minute for as long.
/// Doubled, a dropped record still goes back in within a bounded time of
/// the store having room, and the log gets a handful of lines.
fn next_reoffer(current: Duration, period: Duration) -> Duration {
    (current * 2).min(period * REOFFER_BACKOFF)
}

/// Whether the fd store, as the daemon counts it, has a slot free: with
/// none, the manager (counting the same) refuses an offer of the record
/// with a warning whether or not it holds it, and a record it dropped
/// could not go back in anyway.
fn store_has_a_free_slot(broker: &Arc<Broker>, writer: &RecordWriter) -> bool {
    let room = {
        let state = broker.lock();
        let live = state.buffers.len();
        state.fd_store.as_ref().map(|store| store.room(live))
    };
    writer.fits(room)
}

/// [`RECORD_REOFFER`], or for tests `DMABROKER_TEST_RECORD_REOFFER_MS`.
/// The variable is read in every build, so it is bounded: at `0` the
/// writer would send PID 1 one record datagram after another, as fast as
/// its queue takes them. It is warned about at start, as the other test
/// hook (`DMABROKER_TEST_WEDGE_AFTER_MS`) is, so that a value left set on
/// a production unit shows in its log.
fn reoffer_period() -> Duration {
    let Some(asked) = std::env::var("DMABROKER_TEST_RECORD_REOFFER_MS")
        .ok()
        .and_then(|ms| ms.parse::<u64>().ok())
    else {
        return RECORD_REOFFER;
    };
    let period = bounded_reoffer_period(asked);
    tracing::warn!(
        asked_ms = asked,
        period_ms = period.as_millis() as u64,
        "test hook: the stored record is offered to the fd store again this often"
    );
    period
}

/// `DMABROKER_TEST_RECORD_REOFFER_MS`'s period, no shorter than
/// [`RECORD_REOFFER_FLOOR`].
fn bounded_reoffer_period(asked_ms: u64) -> Duration {
    Duration::from_millis(asked_ms).max(RECORD_REOFFER_FLOOR)
}

/// The wait before the next try after one that failed: doubling from
/// [`RETRY_FIRST`] up to [`RETRY_MAX`].
fn backed_off(previous: Option<Duration>) -> Duration {
    previous.map_or(RETRY_FIRST, |d| (d * 2).min(RETRY_MAX))
}

/// How long after a change the record is written: changes come in bursts.
const RECORD_DEBOUNCE: Duration = Duration::from_millis(50);
/// First wait before a record that could not be stored is tried again.
const RETRY_FIRST: Duration = Duration::from_millis(100);
/// Longest wait between tries.
const RETRY_MAX: Duration = Duration::from_secs(5);
/// How long a stored record goes, with the table unchanged, before it is
/// offered to the manager again (see [`RecordWriter::reoffer`]): one
/// datagram, and nothing for a manager that holds it.
const RECORD_REOFFER: Duration = Duration::from_secs(60);
/// How long one slice of an offer of the record waits for room in the
/// manager's queue before the offer looks whether the daemon is stopping
/// (see `reoffer_record`).
const REOFFER_SLICE: Duration = Duration::from_millis(50);
/// How many times the re-offer period the wait between offers of an
/// unchanged record grows to (see `next_reoffer`): 32 minutes with
/// [`RECORD_REOFFER`].
const REOFFER_BACKOFF: u32 = 32;
/// The shortest re-offer period the test hook may ask for: short enough
/// for a test, one datagram per period at most for the manager.
const RECORD_REOFFER_FLOOR: Duration = Duration::from_millis(50);

/// Buffers copied into the record per turn of the state lock: half a
/// microsecond or so each (their holders and secrets are cloned), so a
/// turn keeps the broker's thread from requests for some 60 µs.
const RECORD_CHUNK: usize = 128;

/// Writes the record without stalling the broker: the table is copied a
/// chunk at a time, letting requests in between (with 60,000 buffers one
/// copy held the lock for tens of milliseconds), and encoded and stored on
/// the blocking pool, off the broker's only thread, where it may wait up
/// to `patience` for room in the manager's queue. Buffers that could not
/// go into the store when they were allocated go first, the same way: one
/// the next instance is not handed is dropped whatever the record says,
/// so until every one is in, the record counts as not stored. A buffer
/// allocated or freed meanwhile may be missing from or left in this
/// record; its change asked for the next one. The table is copied only
/// when it changed since the writer's latest record: a try while the
/// manager has no room sends that one again, or nothing once it is in.
/// Gives the writer back with whether the record was stored, `None` if the
/// writer was lost.
async fn store_record(
    broker: &Arc<Broker>,
    mut writer: RecordWriter,
    patience: Duration,
) -> Option<(RecordWriter, Written)> {
    broker.lock().retry_buffer_stores();
    let Batch {
        fds: unstored,
        error: not_taken,
    } = take_batch(broker);
    let taken: Vec<u64> = unstored.iter().map(|(id, _)| *id).collect();
    let wanted = Arc::clone(&broker.lock().persist_wanted);
    if changed_unseen(&wanted).await {
        writer.table_changed();
    }
    let room_now = || {
        let state = broker.lock();
        let live = state.buffers.len();
        state.fd_store.as_ref().map(|store| store.room(live))
    };
    let room = room_now();
    // Without a slot for a record, a copy of the table (and its encoding)
    // would be made only to be held back: each change while there is no
    // room made a new one. The one copy is made once a record fits, and
    // has every change since; meanwhile the try still removes stale
    // records and sends the buffers out of the store.
    let fresh = if writer.needs_record() && writer.fits(room) {
        Some(copy_record(broker, writer.next_generation()).await)
    } else {
        None
    };
    let generation = fresh.as_ref().map(|record| record.generation);
    // After a copy, the room as it is now; without one, the room it was
    // not made for, so that the writer says `NoRoom` rather than find
    // nothing to send.
    let room = if fresh.is_some() { room_now() } else { room };
    let stall = if broker.lock().stopping {
        last_record_stall()
    } else {
        None
    };
    let stored = tokio::task::spawn_blocking(move || {
        if let Some(stall) = stall {
            std::thread::sleep(stall);
        }
        let deadline = std::time::Instant::now() + patience;
        let (sent, stopped) = send_batch(&unstored, deadline);
        let (sent, unsent): (Vec<u64>, Vec<u64>) = {
            let ids: Vec<u64> = unstored.iter().map(|(id, _)| *id).collect();
            (ids[..sent].to_vec(), ids[sent..].to_vec())
        };
        let result = writer.store(fresh, room, deadline);
        (writer, result, (sent, unsent), stopped)
    })
    .await;
    match stored {
        Ok((writer, result, (sent, unsent), stopped)) => {
            let out = {
                let state = broker.lock();
                state.buffers_sent(&sent, &unsent);
                if let Some(store) = &state.fd_store {
                    store.set_record_slots(writer.record_slots());
                    store.set_record_owed(result.is_err());
                    // No room is no failure to send: the persist loop
                    // says so, once.
                    if result
                        .as_ref()
                        .is_err_and(|err| !matches!(err, RecordError::NoRoom { .. }))
                    {
                        store.note_failure("the buffer table record");
                    }
                }
                state.buffers_out_of_store()
            };
            let batch_error = not_taken.or(stopped);
            // Buffers out of the store for a reason waiting does not cure
            // come first, whatever became of the record: reported as a
            // `NoRoom` (said once per run, as "no slot for a new record")
            // their error was never told, and they were tried again only
            // at the pace of frees.
            let hard_batch_error = batch_error.as_ref().filter(|err| !is_no_room_yet(err));
            if let Some(err) = hard_batch_error {
                tracing::warn!(
                    error = %err,
                    buffers = out,
                    record = result.as_ref().err().map(tracing::field::display),
                    "cannot put buffers in the fd store"
                );
            }
            let outcome = match &result {
                Err(RecordError::NoRoom {
                    buffer_fds, max, ..
                }) if hard_batch_error.is_none() => Written::NoRoom {
                    buffer_fds: *buffer_fds,
                    max: *max,
                },
                Err(err @ (RecordError::Encode(_) | RecordError::Send(_)))
                    if !err.is_would_block() =>
                {
                    tracing::warn!(error = %err, ?generation, "cannot store the buffer table record");
                    Written::Failed
                }
                // The record may be in, but buffers stay out of the store
                // for a reason waiting does not cure: tried again every
                // 100 ms, they would be tried forever, silently.
                _ if hard_batch_error.is_some() => Written::Failed,
                Err(_) => Written::Behind,
                // An older record still in the store: the next try
                // removes it (the store matches the table only then).
                Ok(()) if out == 0 && writer.stale_count() == 0 => Written::Stored,
                Ok(()) => Written::Behind,
            };
            if outcome == Written::Behind {
                tracing::debug!(
                    buffers = out,
                    "the service manager has no room yet: the fd store does not match the table"
                );
            }
            Some((writer, outcome))
        }
        Err(err) => {
            // Nothing is known of their sends: out still (systemd ignores
            // a second fd of a file it holds; a lost buffer costs more).
            broker.lock().buffers_sent(&[], &taken);
            tracing::error!(error = %err, "storing the buffer table record failed; no more records");
            None
        }
    }
}

/// Up to [`STORE_BATCH`] buffers still out of the fd store, each with a
/// copy of its fd, and why any could not be copied.
fn take_batch(broker: &Arc<Broker>) -> Batch {
    let state = broker.lock();
    match &state.fd_store {
        Some(store) => store.take_batch(STORE_BATCH, |id| {
            state.buffers.get(&id).map(|entry| &entry.fd)
        }),
        None => Batch::default(),
    }
}

/// Sends `batch` in order, waiting until `deadline` for room, until one
/// send fails (the rest would too). Returns how many went, and the error
/// the sends stopped on.
fn send_batch(
    batch: &[(u64, crate::held_files::HeldDup)],
    deadline: std::time::Instant,
) -> (usize, Option<std::io::Error>) {
    for (sent, (id, fd)) in batch.iter().enumerate() {
        if let Err(err) = store_waiting(*id, fd.as_fd(), deadline) {
            return (sent, Some(err));
        }
    }
    (batch.len(), None)
}

/// Whether a send failed only because the manager's queue had no room
/// yet: worth trying again soon. Any other error (the manager's socket
/// gone, out of fds) is not cured by waiting.
fn is_no_room_yet(err: &std::io::Error) -> bool {
    err.kind() == std::io::ErrorKind::WouldBlock
}

/// Whether the table changed since the last look without the loop
/// noticing: every change wakes `wanted`, which keeps the wake-up of a
/// change nobody waited for, and this takes it. Looked at before the copy,
/// so a change after the look is in the next record.
async fn changed_unseen(wanted: &tokio::sync::Notify) -> bool {
    tokio::select! {
        biased;
        () = wanted.notified() => true,
        () = std::future::ready(()) => false,
    }
}

/// Copies of the table a record may start before one is kept whatever
/// changed meanwhile (see [`copy_record`]).
const RECORD_COPY_TRIES: u32 = 3;

/// The table's record, copied [`RECORD_CHUNK`] buffers per turn of the
/// state lock. A connection's recorded id changing between two chunks (a
/// re-attach taking one over, the grace period's end) would have the
/// record name its holds by two ids, and the next instance refuse the
/// second group's re-attach: the copy starts again then, up to
/// [`RECORD_COPY_TRIES`] times; past that the record goes as it is, and
/// the change has asked for the next one.
async fn copy_record(broker: &Arc<Broker>, generation: u64) -> StateRecord {
    let mut tries = 1;
    'copy: loop {
        let (ids, epoch) = {
            let state = broker.lock();
            (state.buffer_ids(), state.recorded_as_epoch())
        };
        let mut buffers = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(RECORD_CHUNK) {
            {
                let state = broker.lock();
                if state.recorded_as_epoch() != epoch && tries < RECORD_COPY_TRIES {
                    tries += 1;
                    continue 'copy;
                }
                buffers.extend(state.buffer_records(chunk));
            }
            tokio::task::yield_now().await;
        }
        return broker.lock().record_of(generation, buffers);
    }
}

/// What one record's writing achieved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Written {
    /// The record, and the store matches the table.
    Stored,
    /// The manager had no room for all of it yet: worth trying again
    /// soon (the writer waits for room itself, so this paces itself).
    Behind,
    /// The store has no slot for a new record (more buffers than
    /// `FileDescriptorStoreMax=` now keeps): the previous record stays,
    /// and a new one goes once buffers are freed.
    NoRoom { buffer_fds: usize, max: usize },
    /// An error waiting does not cure (out of fds, the manager gone),
    /// storing the record or a buffer still out of the store: tried again
    /// with a back-off, warned about.
    Failed,
}

/// Buffers out of the fd store sent per record (each needs a copy of its
/// fd meanwhile).
const STORE_BATCH: usize = 256;
/// How long one record's writing may wait for room in the manager's queue.
const RECORD_PATIENCE: Duration = Duration::from_secs(1);
/// How long after the stop signal the last record, and buffers still out
/// of the store, may wait for room.
const LAST_RECORD_PATIENCE: Duration = Duration::from_secs(4);
/// How long, at a stop for good, the removals from the store and the
/// barrier behind them may wait for the manager: a manager merely slow
/// (busy stopping other units, its queue full) is worth waiting for, as
/// giving up leaves it a copy to close; one that never reads must not keep
/// the daemon from exiting, and systemd's stop timeout (90 s by default)
/// is far beyond this.
const TAKE_OUT_PATIENCE: Duration = Duration::from_secs(10);
/// Beyond [`TAKE_OUT_PATIENCE`], how long the take-out's thread may take
/// to answer before the daemon exits without it: each of its steps ends at
/// the deadline, so only something unforeseen (a lock held) needs it.
const TAKE_OUT_MARGIN: Duration = Duration::from_secs(1);

fn status_line(broker: &Arc<Broker>) -> String {
    let state = broker.lock();
    format!(
        "{} clients, {} buffers, {} bytes",
        state.connection_count(),
        state.buffers.len(),
        state.total_bytes()
    )
}

/// `STATUS=` for `systemctl status`, refreshed when it changes.
async fn status_loop(broker: Arc<Broker>) {
    if !notify::enabled() {
        return;
    }
    let mut last = String::new();
    let mut ticker = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        ticker.tick().await;
        let line = status_line(&broker);
        // Not sent (the manager had no room): offered again next tick.
        if line != last && notify::status(&line) {
            last = line;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::testutil::runtime;
    use crate::service::fdstore::sealed_copy;
    use crate::service::record::RECORD_VERSION;

    fn stored(name: &str, generation: u64) -> (String, OwnedFd) {
        let record = StateRecord {
            version: RECORD_VERSION,
            generation,
            next_buffer: generation,
            buffers: Vec::new(),
        };
        let bytes = record.encode().expect("encode");
        (name.to_owned(), sealed_copy(name, &bytes).expect("memfd"))
    }

    /// The test hook's period is read in production too: `0` made the
    /// writer offer its record to PID 1 in a tight loop.
    #[test]
    fn offers_of_an_unchanged_record_back_off() {
        let period = Duration::from_secs(60);
        let mut wait = period;
        let mut waits = Vec::new();
        for _ in 0..8 {
            wait = next_reoffer(wait, period);
            waits.push(wait.as_secs() / 60);
        }
        assert_eq!(waits, [2, 4, 8, 16, 32, 32, 32, 32]);
    }

    #[test]
    fn the_test_reoffer_period_is_bounded_below() {
        assert_eq!(bounded_reoffer_period(0), RECORD_REOFFER_FLOOR);
        assert_eq!(bounded_reoffer_period(1), RECORD_REOFFER_FLOOR);
        assert_eq!(bounded_reoffer_period(300), Duration::from_millis(300));
    }

    /// systemd hands the store over the newest first, and two records may
    /// share a name: the restore took the last of a name, the oldest.
    #[test]
    fn the_restore_takes_the_highest_generation_whatever_the_names() {
        let records = [
            stored("state-a", 7),
            stored("state-b", 6),
            stored("state-a", 5),
        ];
        let (name, record) = latest_record(&records).expect("a record");
        assert_eq!((name.as_str(), record.generation), ("state-a", 7));
        let reversed = [
            stored("state-a", 5),
            stored("state-b", 6),
            stored("state-a", 7),
        ];
        let (_, record) = latest_record(&reversed).expect("a record");
        assert_eq!(record.generation, 7);
    }

    fn broker() -> Arc<Broker> {
        let heaps = crate::heaps::HeapRegistry::discover(&crate::heaps::HeapConfig {
            dma_heap_dir: std::path::PathBuf::from("/nonexistent"),
            udmabuf_path: std::path::PathBuf::from("/nonexistent"),
            order: None,
            enable_memfd: true,
        });
        Broker::new(State::new(
            heaps,
            dmabroker_policy::Policy::builtin(),
            crate::broker::DaemonLimits::default(),
        ))
    }

    /// A connection's recorded id changing between two chunks of the
    /// record's copy (here the grace period's end, between the first and
    /// the second chunk) starts the copy again: before, the record named
    /// the first chunk's holds by the id the connection had taken over
    /// and the second's by its own, and after a restart the client's
    /// re-attaches of the second group were refused and those buffers
    /// lost. Found by review.
    #[test]
    fn a_record_copied_across_a_change_of_recorded_ids_names_one_id() {
        use crate::service::record::{BufferRecord, HolderRecord, OriginRecord};
        use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
        let broker = broker();
        runtime().block_on(async {
            let page = dmabroker_ipc::bufferword::WORD_PAGE;
            let count = RECORD_CHUNK as u64 + 1;
            let mut buffers = Vec::new();
            let mut fds = std::collections::HashMap::new();
            for id in 1..=count {
                let fd = crate::kernel::memfd::create_sealed("frame", 4096 + page).expect("memfd");
                buffers.push(BufferRecord {
                    id,
                    size: 4096,
                    heap: "memfd".into(),
                    origin: OriginRecord::Memfd,
                    name: "frame".into(),
                    inode: crate::kernel::dma_buf::inode(fd.as_fd()).expect("inode"),
                    holders: vec![HolderRecord {
                        secret: format!("secret-{id}"),
                        uid: 1000,
                        owner: true,
                        client: 5,
                        accountable_uid: None,
                    }],
                });
                fds.insert(crate::service::fdstore::buffer_name(id), fd);
            }
            let record = StateRecord {
                version: crate::service::record::RECORD_VERSION,
                generation: 1,
                next_buffer: count + 1,
                buffers,
            };
            assert_eq!(broker.lock().restore(&record, fds).restored, count as usize);
            // A connection that re-attached every hold for connection 5.
            let flags = SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK;
            let (_ours, theirs) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, flags)
                .expect("socketpair");
            let peer = crate::identity::peer_of(theirs.as_fd()).expect("peer");
            let interest = tokio::io::Interest::READABLE | tokio::io::Interest::WRITABLE;
            let socket = Arc::new(crate::reactor::register(theirs, interest).expect("register"));
            let outbox = Arc::new(crate::outbox::Outbox::new(socket, 256));
            let client = broker.lock().connect(peer, outbox).expect("a client id");
            {
                let mut state = broker.lock();
                for entry in state.buffers.values_mut() {
                    entry.holders[0].client = client;
                    entry.holders[0].restored_client = None;
                    entry.owner = client;
                }
                let c = state.clients.get_mut(&client).expect("connected");
                c.recorded_as = 5;
            }
            let (copied, dropped) = tokio::join!(
                biased;
                copy_record(&broker, 2),
                async { broker.lock().drop_orphans() },
            );
            assert_eq!(dropped, 0);
            let named: std::collections::BTreeSet<u64> = copied
                .buffers
                .iter()
                .flat_map(|b| &b.holders)
                .map(|h| h.client)
                .collect();
            assert_eq!(copied.buffers.len(), count as usize);
            assert_eq!(named, [client].into(), "one id for the connection's holds");
        });
    }

    /// While the manager had no room, every try (about once a second)
    /// copied the whole table and encoded it again, each a new generation,
    /// although nothing had changed. A try with the table unchanged now
    /// stores the record it has, or nothing once that one is in.
    #[test]
    fn tries_with_the_table_unchanged_encode_no_new_record() {
        let broker = broker();
        runtime().block_on(async {
            let mut writer = RecordWriter::default();
            for _ in 0..3 {
                (writer, _) = store_record(&broker, writer, Duration::ZERO)
                    .await
                    .expect("the writer");
            }
            assert_eq!(
                writer.next_generation(),
                2,
                "one record copied and encoded for three tries"
            );
        });
    }

    /// A change, told by the broker as for any change to the table, is in
    /// the next try's record: copied and encoded afresh.
    #[test]
    fn a_try_after_a_change_encodes_a_new_record() {
        let broker = broker();
        runtime().block_on(async {
            let (writer, _) = store_record(&broker, RecordWriter::default(), Duration::ZERO)
                .await
                .expect("the writer");
            broker.lock().persist_wanted.notify_one();
            let (mut writer, _) = store_record(&broker, writer, Duration::ZERO)
                .await
                .expect("the writer");
            assert_eq!(writer.next_generation(), 3, "a record per change");
        });
    }

    /// Once the latest record is in, a try with the table unchanged sends
    /// no record, so what is still behind (buffers out of the store) is
    /// all it does; when their sends fail with an error waiting does not
    /// cure (the manager's socket gone, out of fds), the try is `Failed`:
    /// warned about and backed off. It was `Behind` (since 3538195), tried
    /// again every 100 ms forever, silently. Runs in its own process (see
    /// [`a_hard_failure_behind_a_stored_record_backs_off`]).
    /// A manager's notify socket, named after `test`, set as this
    /// process's `NOTIFY_SOCKET`: for the tests that run alone in a
    /// process of their own (see [`run_alone`]).
    fn notified_manager(test: &str) -> (std::os::unix::net::UnixDatagram, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("dmab-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("notify");
        let manager = std::os::unix::net::UnixDatagram::bind(&path).expect("bind");
        // SAFETY: the only test of its process (see `run_alone`), which
        // has no other thread reading the environment yet.
        unsafe { std::env::set_var("NOTIFY_SOCKET", &path) };
        (manager, path)
    }

    /// A broker under a manager at `NOTIFY_SOCKET` whose fd store keeps
    /// `max` fds, with one memfd buffer (id 1) taken back from a record, as
    /// after a restart; and a copy of that buffer's fd.
    fn restored_broker(max: usize) -> (Arc<Broker>, OwnedFd) {
        use std::os::fd::AsFd;
        let broker = broker();
        let page = dmabroker_ipc::bufferword::WORD_PAGE;
        let fd = crate::kernel::memfd::create_sealed("frame", 4096 + page).expect("memfd");
        let record = StateRecord {
            version: RECORD_VERSION,
            generation: 1,
            next_buffer: 2,
            buffers: vec![crate::service::record::BufferRecord {
                id: 1,
                size: 4096,
                heap: "memfd".into(),
                origin: crate::service::record::OriginRecord::Memfd,
                name: "frame".into(),
                inode: crate::kernel::dma_buf::inode(fd.as_fd()).expect("inode"),
                holders: vec![crate::service::record::HolderRecord {
                    secret: "dmab1-00112233445566778899aabbccddeeff".into(),
                    uid: 1000,
                    owner: true,
                    client: 0,
                    accountable_uid: None,
                }],
            }],
        };
        let copy = fd.try_clone().expect("dup");
        broker.with(|s| {
            s.fd_store = FdStore::from_env(max).map(Arc::new);
            let fds = std::collections::HashMap::from([("buf-1".to_owned(), fd)]);
            assert_eq!(s.restore(&record, fds).restored, 1);
        });
        (broker, copy)
    }

    /// Runs `name`, an ignored test of this module that sets
    /// `NOTIFY_SOCKET` (which every test of a process would see), in a
    /// process of its own, without the caller's `NOTIFY_SOCKET` or
    /// `FDSTORE`.
    fn run_alone(name: &str) {
        let name = format!("daemon::tests::{name}");
        let output = std::process::Command::new(std::env::current_exe().expect("test binary"))
            .args(["--exact", &name, "--ignored", "--test-threads=1"])
            .env_remove("NOTIFY_SOCKET")
            .env_remove("FDSTORE")
            .output()
            .expect("run the test in its own process");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && stdout.contains("1 passed"),
            "{name} failed in its own process:\n{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Once the latest record is in, a try with the table unchanged sends
    /// no record, so what is still behind (buffers out of the store) is
    /// all it does; when their sends fail with an error waiting does not
    /// cure (the manager's socket gone, out of fds), the try is `Failed`:
    /// warned about and backed off. It was `Behind` (since 3538195), tried
    /// again every 100 ms forever, silently. Runs in its own process (see
    /// [`a_hard_failure_behind_a_stored_record_backs_off`]).
    #[test]
    #[ignore = "sets NOTIFY_SOCKET for the whole process: run by a_hard_failure_behind_a_stored_record_backs_off in a process of its own"]
    fn hard_failure_behind_a_stored_record_in_its_own_process() {
        use std::os::fd::AsFd;
        let (receiver, path) = notified_manager("hard-failure");
        let (broker, copy) = restored_broker(16);
        runtime().block_on(async {
            let (writer, written) = store_record(&broker, RecordWriter::default(), Duration::ZERO)
                .await
                .expect("the writer");
            assert_eq!(written, Written::Stored, "the record is in");
            // The manager's socket goes away; the buffer's send fails.
            drop(receiver);
            std::fs::remove_file(&path).expect("rm");
            broker.lock().fd_store.as_ref().expect("store").store_buffer(1, copy.as_fd());
            assert_eq!(broker.lock().buffers_out_of_store(), 1);
            let (_, written) = store_record(&broker, writer, Duration::from_millis(200))
                .await
                .expect("the writer");
            assert_eq!(
                written,
                Written::Failed,
                "an error waiting does not cure is Failed (backed off, warned), not Behind (100 ms, silent)"
            );
        });
        let _ = path.parent().map(std::fs::remove_dir);
    }

    /// [`hard_failure_behind_a_stored_record_in_its_own_process`], in a
    /// process of its own: it points `NOTIFY_SOCKET`, which every test
    /// of this process would see, at a manager it then takes away.
    #[test]
    fn a_hard_failure_behind_a_stored_record_backs_off() {
        run_alone("hard_failure_behind_a_stored_record_in_its_own_process");
    }

    /// A store with no slot for a new record (`NoRoom`) and a buffer
    /// whose send fails for a reason waiting does not cure (here the
    /// manager's socket is gone): the try said only `NoRoom`, warned
    /// about once as "no slot for a new record", and the buffer's own
    /// error was never reported. It is `Failed` now, warned with its
    /// error. Runs in its own process (see
    /// [`a_hard_batch_failure_is_not_hidden_by_no_room`]).
    #[test]
    #[ignore = "sets NOTIFY_SOCKET for the whole process: run by a_hard_batch_failure_is_not_hidden_by_no_room in a process of its own"]
    fn hard_batch_failure_without_room_in_its_own_process() {
        use std::os::fd::AsFd;
        let path = std::env::temp_dir().join(format!("dmab-no-manager-{}", std::process::id()));
        // SAFETY: the only test of its process (see the caller), which
        // has no other thread reading the environment yet.
        unsafe { std::env::set_var("NOTIFY_SOCKET", &path) };
        // One buffer and the record taken back fill a store of two: no
        // slot for the next record.
        let (broker, copy) = restored_broker(2);
        broker
            .lock()
            .fd_store
            .as_ref()
            .expect("store")
            .store_buffer(1, copy.as_fd());
        assert_eq!(broker.lock().buffers_out_of_store(), 1);
        runtime().block_on(async {
            let writer = RecordWriter::continuing("state-a".into(), 1, 1, Vec::new());
            let (_, written) = store_record(&broker, writer, Duration::from_millis(200))
                .await
                .expect("the writer");
            assert_eq!(
                written,
                Written::Failed,
                "the buffer's own error is reported, not hidden behind NoRoom"
            );
        });
    }

    #[test]
    fn a_hard_batch_failure_is_not_hidden_by_no_room() {
        run_alone("hard_batch_failure_without_room_in_its_own_process");
    }

    /// While the store has no slot for a new record, every change woke
    /// the writer, which copied and encoded the whole table (a new
    /// generation each time) only to find no room for it. A try with no
    /// room copies nothing: the one copy is made once a record fits.
    /// Runs in its own process (see
    /// [`no_copy_of_the_table_while_no_record_fits`]).
    #[test]
    #[ignore = "sets NOTIFY_SOCKET for the whole process: run by no_copy_of_the_table_while_no_record_fits in a process of its own"]
    fn no_copy_without_room_in_its_own_process() {
        let (_manager, path) = notified_manager("no-room");
        let (broker, _) = restored_broker(2);
        runtime().block_on(async {
            let mut writer = RecordWriter::continuing("state-a".into(), 1, 1, Vec::new());
            for _ in 0..3 {
                let written;
                (writer, written) = store_record(&broker, writer, Duration::ZERO)
                    .await
                    .expect("the writer");
                assert!(matches!(written, Written::NoRoom { .. }), "{written:?}");
                // A change, as the loop is woken by while there is no room.
                broker.lock().persist_wanted.notify_one();
                writer.table_changed();
            }
            assert_eq!(
                writer.next_generation(),
                2,
                "no copy of the table was made while no record fitted"
            );
        });
        let _ = std::fs::remove_file(&path);
        let _ = path.parent().map(std::fs::remove_dir);
    }

    #[test]
    fn no_copy_of_the_table_while_no_record_fits() {
        run_alone("no_copy_without_room_in_its_own_process");
    }
}
