//! dmabroker client (placeholder).
#![forbid(unsafe_code)]
