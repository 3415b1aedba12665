//! dmabroker's wire protocol, shared by the daemon and the client crate.
//!
//! This crate is deliberately small and free of any async runtime so that
//! the client stays thin. It holds the only `unsafe` the client side needs:
//! `sendmsg`/`recvmsg` with `SCM_RIGHTS` (in [`fdpass`]) and `mmap` (in
//! [`mapping`]), the cache sync `DMA_BUF_IOCTL_SYNC` (in [`cachesync`]),
//! and the atomics on the shared end-word page (in
//! [`endwords`]) and on buffer words, with their futex (in [`bufferword`]).

pub mod bufferword;
pub mod cachesync;
pub mod codec;
pub mod contention;
pub mod endwords;
pub mod fdpass;
pub mod mapping;
pub mod paths;
pub mod protocol;
pub mod token;

pub use protocol::*;
pub use token::ShareToken;
