//! Putting the daemon together: policy, heaps, socket, signals.

use std::sync::Arc;

use dmabroker_policy::Policy;
use tokio::signal::unix::{signal, SignalKind};

use crate::broker::{Broker, State};
use crate::config::Config;
use crate::heaps::{HeapConfig, HeapRegistry};
use crate::server::{accept_loop, Listener};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("policy: {0}")]
    Policy(#[from] dmabroker_policy::PolicyError),
    #[error(transparent)]
    Server(#[from] crate::server::ServerError),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
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

pub async fn run(config: Config) -> Result<(), DaemonError> {
    let policy = load_policy(&config)?;
    let heaps = HeapRegistry::discover(&HeapConfig {
        dma_heap_dir: config.dma_heap_dir.clone(),
        udmabuf_path: config.udmabuf.clone(),
        order: config.heaps.clone(),
        enable_memfd: true,
    });
    let heap_names: Vec<&str> = heaps.heaps().iter().map(|h| h.name.as_str()).collect();
    tracing::info!(heaps = ?heap_names, default = heaps.default_heap(), "heaps discovered");
    let limits = crate::broker::DaemonLimits {
        max_connections: config.max_connections,
        ..Default::default()
    };
    let broker = Broker::new(State::new(heaps, policy, limits));
    let path = config.socket_path();
    let listener = Listener::bind(&path, config.system_mode(), config.socket_mode)?;
    tracing::info!(socket = %path.display(), "serving");

    let mut sigterm = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;
    let mut sighup = signal(SignalKind::hangup()).map_err(DaemonError::Signals)?;
    let listen_fd = listener.fd.try_clone().map_err(|e| {
        DaemonError::Server(crate::server::ServerError::Reactor(e))
    })?;
    let mut accepting = tokio::spawn(accept_loop(Arc::clone(&broker), listen_fd));
    loop {
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = sighup.recv() => {
                reload(&broker, &config);
            }
            result = &mut accepting => {
                listener.remove_path();
                return match result {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(err)) => Err(err.into()),
                    Err(join) => {
                        tracing::error!(error = %join, "accept loop ended unexpectedly");
                        Ok(())
                    }
                };
            }
        }
    }
    tracing::info!("shutting down");
    accepting.abort();
    listener.remove_path();
    Ok(())
}

/// A broken policy file never replaces a working policy.
pub fn reload(broker: &Arc<Broker>, config: &Config) -> bool {
    match load_policy(config) {
        Ok(policy) => {
            broker.with(|s| s.replace_policy(policy));
            tracing::info!("policy reloaded");
            true
        }
        Err(err) => {
            tracing::error!(error = %err, "policy reload failed; keeping the current policy");
            false
        }
    }
}
