//! The allocations in flight, for the views: copied with the state locked,
//! ages computed after.
//!
//! One hold of the lock is enough, unlike the client and buffer lists
//! (see [`super::snapshot`]): what is copied is bounded per client by
//! `MAX_ALLOCATING_PER_CLIENT` (8), and in all by about the allocations
//! running at once (`MAX_ALLOCATIONS_RUNNING`, 16): about, because an
//! allocation stops counting as running when its heap thread is done, a
//! moment before its answer takes it off its client's list, so the lists
//! can briefly hold a few more. The pass that finds them looks at each
//! client's list without copying anything.

use std::time::Instant;

use super::views::{AllocationInFlight, ClientAllocations};
use crate::broker::State;

/// One client's allocations as copied under the lock; see [`finish`].
#[derive(Debug)]
pub struct RawClientAllocations {
    client: u64,
    /// (heap being tried, size, name, asked for at), in the order asked
    /// for: oldest first.
    allocations: Vec<(String, u64, String, Instant)>,
}

/// The clients with any allocation in flight, by id.
pub fn copy(state: &State) -> Vec<RawClientAllocations> {
    let mut raw: Vec<RawClientAllocations> = state
        .clients
        .values()
        .filter(|c| !c.allocating.is_empty())
        .map(|c| RawClientAllocations {
            client: c.id,
            allocations: c
                .allocating
                .iter()
                .map(|a| {
                    (
                        state.heaps.heap_in_try(&a.heap).to_owned(),
                        a.size,
                        a.name.clone(),
                        a.since,
                    )
                })
                .collect(),
        })
        .collect();
    raw.sort_unstable_by_key(|r| r.client);
    raw
}

/// The views of what [`copy`] took, with their ages as of now.
pub fn finish(raw: Vec<RawClientAllocations>) -> Vec<ClientAllocations> {
    let now = Instant::now();
    raw.into_iter()
        .map(|r| {
            let allocations: Vec<AllocationInFlight> = r
                .allocations
                .into_iter()
                .map(|(heap, size, name, since)| AllocationInFlight {
                    heap,
                    size,
                    name,
                    age_us: u64::try_from(now.saturating_duration_since(since).as_micros())
                        .unwrap_or(u64::MAX),
                })
                .collect();
            ClientAllocations {
                client: r.client,
                count: allocations.len() as u64,
                bytes: allocations.iter().map(|a| a.size).sum(),
                allocations,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finish_counts_and_ages_in_the_order_asked() {
        let now = Instant::now();
        let earlier = now - std::time::Duration::from_millis(5);
        let raw = vec![RawClientAllocations {
            client: 3,
            allocations: vec![
                ("system".into(), 4096, "a".into(), earlier),
                ("udmabuf".into(), 8192, "b".into(), now),
            ],
        }];
        let views = finish(raw);
        assert_eq!(views.len(), 1);
        let v = &views[0];
        assert_eq!((v.client, v.count, v.bytes), (3, 2, 12288));
        let names: Vec<(&str, &str)> = v
            .allocations
            .iter()
            .map(|a| (a.heap.as_str(), a.name.as_str()))
            .collect();
        assert_eq!(names, [("system", "a"), ("udmabuf", "b")]);
        assert!(v.allocations[0].age_us >= 5000);
        assert!(v.allocations[0].age_us > v.allocations[1].age_us);
    }
}
