//! Life as a systemd service: socket activation, readiness and status
//! notifications, the watchdog, and the fd store that lets a restarted
//! broker keep every buffer.
//!
//! Everything here is inert when the daemon is not started by a service
//! manager (`NOTIFY_SOCKET` / `LISTEN_FDS` unset).

pub mod fdstore;
pub mod inherited;
pub mod job;
pub mod notify;
pub mod record;
pub mod watchdog;
