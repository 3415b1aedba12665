//! dmabroker daemon library (placeholder).
pub mod kernel;
