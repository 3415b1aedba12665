use clap::Parser;
use dmabroker_daemon::config::Config;

/// How long a stopping daemon waits for blocking work still running.
const SHUTDOWN_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

fn main() -> std::process::ExitCode {
    let config = Config::parse();
    dmabroker_daemon::logging::init(config.log_format);
    // Before any thread exists: this clears LISTEN_* from the environment.
    let inherited = match dmabroker_daemon::service::inherited::take() {
        Ok(inherited) => inherited,
        Err(err) => {
            eprintln!("dmabrokerd: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    // One thread: the broker's state is touched by one task at a time anyway,
    // and hand-offs between client tasks then never cross threads.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("dmabrokerd: cannot start the runtime: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(dmabroker_daemon::daemon::run(config, inherited));
    // Dropping the runtime would wait, with no limit, for every thread of
    // its blocking pool: an allocation held in a heap that never answers,
    // or a cache sync waiting for a device's fence, kept a stopped daemon
    // alive until the service manager killed it. `run` has written the
    // last record by now; what is left dies with the process.
    runtime.shutdown_timeout(SHUTDOWN_WAIT);
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err}");
            eprintln!("dmabrokerd: {err}");
            std::process::ExitCode::FAILURE
        }
    }
}
