//! Counters for debugging and operations (D-Bus `Statistics`, `STATUS=`).

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use dmabroker_ipc::ErrorCode;

/// How many recent wait times feed the percentiles: enough for a stable p99,
/// small enough to sort on demand.
const WAIT_SAMPLES: usize = 4096;

#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub allocations: u64,
    pub frees: u64,
    pub imports: u64,
    pub exports: u64,
    pub adoptions: u64,
    pub grants: u64,
    /// Grants that had to wait (queued, or held back by kernel fences).
    pub waits: u64,
    /// `DMA_BUF_IOCTL_SYNC` calls that succeeded (start and end each
    /// count; an END running off the broker's thread counts once done).
    pub cache_syncs: u64,
    /// `DMA_BUF_IOCTL_SYNC` calls that failed (logged; the access goes on).
    pub cache_syncs_failed: u64,
    /// CPU transitions on memfd buffers, which have no caches to manage.
    pub cache_syncs_skipped: u64,
    pub writer_lost: u64,
    pub revocations: u64,
    pub timeouts: u64,
    /// Accesses their clients ended through their end words, retired
    /// without an `End` message.
    pub silent_ends: u64,
    pub kernel_fences_imported: u64,
    /// Queued begins told to wait on the buffer's word for a hand-off.
    pub hand_offs_planned: u64,
    /// Of those, granted by the holder's end through the word.
    pub hand_offs: u64,
    pub refusals: BTreeMap<&'static str, u64>,
    wait_samples: VecDeque<Duration>,
}

impl Stats {
    pub fn refused(&mut self, code: ErrorCode) {
        *self.refusals.entry(code.name()).or_default() += 1;
    }

    pub fn waited(&mut self, wait: Duration) {
        self.waits += 1;
        if self.wait_samples.len() == WAIT_SAMPLES {
            self.wait_samples.pop_front();
        }
        self.wait_samples.push_back(wait);
    }

    /// (p50, p99) of recent waits; zero when nothing waited yet.
    pub fn wait_percentiles(&self) -> (Duration, Duration) {
        if self.wait_samples.is_empty() {
            return (Duration::ZERO, Duration::ZERO);
        }
        let mut sorted: Vec<Duration> = self.wait_samples.iter().copied().collect();
        sorted.sort_unstable();
        let at = |q: f64| sorted[((sorted.len() - 1) as f64 * q).round() as usize];
        (at(0.50), at(0.99))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_recent_waits() {
        let mut s = Stats::default();
        assert_eq!(s.wait_percentiles(), (Duration::ZERO, Duration::ZERO));
        for ms in 1..=100 {
            s.waited(Duration::from_millis(ms));
        }
        let (p50, p99) = s.wait_percentiles();
        assert_eq!(p50, Duration::from_millis(51));
        assert_eq!(p99, Duration::from_millis(99));
        assert_eq!(s.waits, 100);
    }
}
