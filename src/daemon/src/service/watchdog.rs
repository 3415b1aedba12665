//! Watchdog pings from the event loop itself: if the loop wedges, the pings
//! stop and the service manager kills and restarts the daemon.

use std::time::Duration;

/// Pings at half the interval the manager asked for (`WATCHDOG_USEC`), as
/// sd_watchdog_enabled(3) recommends.
pub async fn run(interval: Duration) {
    let period = (interval / 2).max(Duration::from_millis(10));
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        // A ping the manager had no room for (its queue full) is offered
        // again soon, up to the next tick: dropped, two in a row could let
        // the watchdog fire on a healthy broker once the manager reads.
        let next_tick = tokio::time::Instant::now() + period;
        while !super::notify::watchdog() && tokio::time::Instant::now() + PING_RETRY < next_tick {
            tokio::time::sleep(PING_RETRY).await;
        }
    }
}

/// Pause between offers of a ping the manager had no room for.
const PING_RETRY: Duration = Duration::from_millis(50);

/// Test-only hook: `DMABROKER_TEST_WEDGE_AFTER_MS=N` blocks the event loop
/// thread for good after N ms, so tests can show the watchdog pings stop.
/// Inert unless that variable is set.
pub fn spawn_test_wedge() {
    let Some(after) = std::env::var("DMABROKER_TEST_WEDGE_AFTER_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    else {
        return;
    };
    tracing::warn!(after_ms = after, "test hook: the event loop will wedge");
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(after)).await;
        tracing::warn!("test hook: wedging the event loop now");
        // Deliberately blocking inside the runtime: that is the failure the
        // watchdog exists to catch.
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    });
}
