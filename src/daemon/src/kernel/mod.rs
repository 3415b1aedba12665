//! Kernel interfaces (placeholder: being written).
