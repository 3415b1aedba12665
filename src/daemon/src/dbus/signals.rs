//! Broker notices re-emitted as D-Bus signals.
//!
//! The broker publishes into a bounded broadcast channel and never waits
//! for us; if the bus is slow and we fall behind, the oldest notices are
//! dropped (and counted in the log) rather than slowing the data path.

use tokio::sync::broadcast::error::RecvError;
use tokio::sync::broadcast::Receiver;
use zbus::object_server::SignalEmitter;

use super::service::DebugObject;
use crate::broker::Notice;

/// Emits until the broker stops publishing (`None`), or returns the error
/// of the first signal the bus would not take (the connection is gone).
pub async fn forward(
    mut notices: Receiver<Notice>,
    emitter: SignalEmitter<'static>,
) -> Option<zbus::Error> {
    loop {
        let notice = match notices.recv().await {
            Ok(notice) => notice,
            Err(RecvError::Lagged(missed)) => {
                tracing::warn!(
                    missed,
                    "D-Bus signals fell behind; some notices were not emitted"
                );
                continue;
            }
            Err(RecvError::Closed) => return None,
        };
        if let Err(err) = emit(&emitter, &notice).await {
            return Some(err);
        }
    }
}

async fn emit(emitter: &SignalEmitter<'_>, notice: &Notice) -> zbus::Result<()> {
    match notice {
        Notice::ClientConnected { client, uid, pid } => {
            DebugObject::client_connected(emitter, *client, *uid, *pid).await
        }
        Notice::ClientDisconnected { client } => {
            DebugObject::client_disconnected(emitter, *client).await
        }
        Notice::BufferAllocated {
            buffer,
            size,
            heap,
            owner,
        } => DebugObject::buffer_allocated(emitter, *buffer, *size, heap, *owner).await,
        Notice::BufferFreed { buffer } => DebugObject::buffer_freed(emitter, *buffer).await,
        Notice::WriterLost { buffer, client } => {
            DebugObject::writer_lost(emitter, *buffer, *client).await
        }
        Notice::AccessRevoked {
            buffer,
            access,
            client,
        } => DebugObject::access_revoked(emitter, *buffer, *access, *client).await,
    }
}
