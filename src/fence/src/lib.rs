//! dmabroker's fence rules (placeholder: being written).
#![forbid(unsafe_code)]
