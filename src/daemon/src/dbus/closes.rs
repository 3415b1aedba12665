//! The queues of the daemon's closing threads (`client_fds`), for the
//! views: copied in one hold of their own lock (not the broker's state
//! lock), ages computed after.

use std::time::Instant;

use super::views::CloseQueue;
use crate::client_fds::CloseQueueSnapshot;

/// The queues with closes waiting or one in hand, by users then lane,
/// with the age of each close in hand as of now.
pub fn list() -> Vec<CloseQueue> {
    finish(crate::client_fds::queues_now(), Instant::now())
}

/// The views of `queues` that have anything to close: idle queues (a
/// thread lingering for more) are left out.
fn finish(queues: Vec<CloseQueueSnapshot>, now: Instant) -> Vec<CloseQueue> {
    queues
        .into_iter()
        .filter(|q| q.waiting > 0 || q.in_hand_since.is_some())
        .map(|q| CloseQueue {
            users: q.users,
            lane: q.lane.to_owned(),
            waiting: q.waiting as u64,
            has_thread: q.has_thread,
            in_line: q.in_line,
            in_hand_us: q.in_hand_since.map_or(0, |since| {
                u64::try_from(now.saturating_duration_since(since).as_micros()).unwrap_or(u64::MAX)
            }),
            held_back: q.held_back,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(users: &[u32], waiting: usize, since: Option<Instant>) -> CloseQueueSnapshot {
        CloseQueueSnapshot {
            users: users.to_vec(),
            lane: "files",
            waiting,
            has_thread: true,
            in_line: false,
            in_hand_since: since,
            held_back: false,
        }
    }

    #[test]
    fn idle_queues_are_left_out_and_closes_in_hand_aged() {
        let now = Instant::now();
        let earlier = now - std::time::Duration::from_millis(5);
        let views = finish(
            vec![
                snapshot(&[1000], 0, None),
                snapshot(&[1000, 1001], 3, Some(earlier)),
                snapshot(&[1002], 2, None),
            ],
            now,
        );
        let shown: Vec<(&[u32], u64, u64)> = views
            .iter()
            .map(|v| (v.users.as_slice(), v.waiting, v.in_hand_us))
            .collect();
        assert_eq!(shown, [(&[1000, 1001][..], 3, 5000), (&[1002][..], 2, 0)]);
        assert_eq!(views[0].lane, "files");
    }
}
