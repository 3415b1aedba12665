//! test harness placeholder
