//! dmabroker daemon: allocates dma-bufs from the kernel's heaps, passes
//! their fds to clients over a Unix socket and arbitrates CPU and device
//! access with reader-writer fences. See `docs/architecture.md`.

pub mod broker;
pub mod client_fds;
pub mod closer;
pub mod config;
pub mod connection;
pub mod ctl;
pub mod daemon;
pub mod dbus;
pub mod heaps;
pub mod held_files;
pub mod identity;
pub mod inflight;
pub mod kernel;
pub mod logging;
pub mod outbox;
pub mod reactor;
pub mod server;
pub mod service;
pub mod stats;
pub mod text;
