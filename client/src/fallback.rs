//! The outage fallback: when the allocator cannot be reached, a rank-aligned
//! random room from a region the allocator never hands out.
//!
//! Why a region of its own: allocator rooms are dense (consecutive numbers
//! for consecutive requests), so a random room anywhere in the allocator's
//! space is likely to equal one it issued or will issue. A region disjoint
//! from the server's `--min-room..=--max-room` (learned through
//! GetRoomSpace at connect, and refused if it overlaps) can only collide with
//! other fallback rooms.
//!
//! # Odds of a collision inside the region
//!
//! A fallback room for rank `r` of `dp_size` is drawn uniformly among the
//! `N = region_size / dp_size` aligned numbers of the region (a block of
//! `num` rooms among those whose whole block fits). Rooms of different ranks
//! never meet, so for `k` fallback rooms drawn for one rank, by all clients
//! together during outages whose rooms are still in flight, the chance that
//! two are equal is at most `k^2 / (2 N)` (the birthday bound); blocks of
//! `num` rooms overlap when their starts are within `num - 1`, so for blocks
//! it is at most `k^2 * (2 num - 1) / (2 N)`. With the region `2^62..=2^63-1`
//! (`N = 2^62 / dp_size`), `dp_size = 8` and a million fallback rooms of one
//! rank: `10^12 / 2^60`, under 1e-6. The draw is SipHash-1-3 of a counter,
//! keyed by the operating system's randomness per client (std's
//! `RandomState`), so clients in different processes draw independently.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::limits::MAX_ROOM;

/// A fallback region checked against the contract's bounds: `1 <= start <=
/// end <= 2^63-1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Region {
    pub start: u64,
    pub end: u64,
}

impl Region {
    pub fn try_new(region: &RangeInclusive<u64>) -> Result<Self, String> {
        let (start, end) = (*region.start(), *region.end());
        if start == 0 || end > MAX_ROOM || start > end {
            return Err(format!(
                "the outage fallback region {start}..={end} is not a non-empty part of the room space 1..={MAX_ROOM}"
            ));
        }
        Ok(Self { start, end })
    }

    /// Refuses a region that shares a number with the allocator's rooms: a
    /// fallback room there could equal one the allocator hands out.
    pub fn check_disjoint(&self, min_room: u64, max_room: u64) -> Result<(), String> {
        if self.end < min_room || self.start > max_room {
            return Ok(());
        }
        Err(format!(
            "the outage fallback region {}..={} overlaps the rooms the allocator hands out, {min_room}..={max_room} (its --min-room/--max-room), so a fallback room could equal an allocator room; leave the region to fallback, e.g. serve with --max-room 4611686018427387903 and fall back from 4611686018427387904 (2^62) to {MAX_ROOM}",
            self.start, self.end
        ))
    }

    /// The room at `draw` among the region's rooms `room` with `room %
    /// dp_size == first_rank` whose block `room..room + num` fits in the
    /// region; `None` when none does (a region smaller than the block).
    /// `dp_size` and `num` are at least 1 and `first_rank < dp_size`.
    pub fn pick(&self, first_rank: u32, dp_size: u32, num: u64, draw: u64) -> Option<u64> {
        let dp_size = u64::from(dp_size);
        let first_rank = u64::from(first_rank);
        // The first aligned number at or above start.
        let first = self
            .start
            .checked_add((first_rank + dp_size - self.start % dp_size) % dp_size)?;
        let last_start = self.end.checked_sub(num.checked_sub(1)?)?;
        if first > last_start {
            return None;
        }
        let choices = (last_start - first) / dp_size + 1;
        // The bias of `%` is below choices / 2^64: nothing next to the odds above.
        Some(first + (draw % choices) * dp_size)
    }
}

/// Independent 64-bit draws. std seeds `RandomState` once per thread and
/// then only steps it, so children forked from one parent would all draw
/// the same sequence (the same fallback rooms, in the same order): each draw
/// also hashes the process id and the instance's creation time.
pub(crate) struct Draws {
    keys: RandomState,
    created_ns: u128,
    counter: AtomicU64,
}

impl Draws {
    pub fn new() -> Self {
        Self {
            keys: RandomState::new(),
            created_ns: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
            counter: AtomicU64::new(0),
        }
    }

    pub fn next(&self) -> u64 {
        self.next_in(std::process::id())
    }

    fn next_in(&self, pid: u32) -> u64 {
        self.keys.hash_one((
            pid,
            self.created_ns,
            self.counter.fetch_add(1, Ordering::Relaxed),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_region_must_lie_in_the_room_space_and_miss_the_allocators_rooms() {
        assert!(Region::try_new(&(0..=10)).is_err());
        let (start, end) = (10, 9);
        assert!(Region::try_new(&(start..=end)).is_err(), "empty");
        assert!(Region::try_new(&(1..=MAX_ROOM + 1)).is_err());
        let upper = Region::try_new(&((1 << 62)..=MAX_ROOM)).expect("valid");
        assert!(upper.check_disjoint(1, (1 << 62) - 1).is_ok());
        let refused = upper
            .check_disjoint(1, MAX_ROOM)
            .expect_err("the default bounds");
        assert!(
            refused.contains("--max-room 4611686018427387903"),
            "{refused}"
        );
        assert!(
            upper.check_disjoint(1 << 62, 1 << 62).is_err(),
            "one shared number"
        );
        let lower = Region::try_new(&(1..=999)).expect("valid");
        assert!(lower.check_disjoint(1000, MAX_ROOM).is_ok());
        assert!(lower.check_disjoint(999, MAX_ROOM).is_err());
    }

    #[test]
    fn picks_are_aligned_and_whole_blocks_stay_inside_the_region() {
        let region = Region::try_new(&(10..=40)).expect("valid");
        let draws = Draws::new();
        for _ in 0..2000 {
            let draw = draws.next();
            for (rank, dp_size, num) in [(0, 1, 1), (3, 4, 1), (2, 4, 7), (0, 8, 15), (7, 8, 1)] {
                let room = region.pick(rank, dp_size, num, draw).expect("fits");
                assert_eq!(room % u64::from(dp_size), u64::from(rank));
                assert!(room >= 10 && room + num - 1 <= 40, "{room} + {num}");
            }
        }
        // Extremes: every choice reachable, and a block too large refused.
        assert_eq!(region.pick(2, 4, 1, 0), Some(10));
        assert_eq!(region.pick(2, 4, 1, 7), Some(38));
        assert_eq!(region.pick(2, 4, 1, 8), Some(10));
        assert_eq!(region.pick(0, 1, 32, 0), None);
        assert_eq!(
            Region::try_new(&(5..=6)).expect("valid").pick(3, 4, 1, 0),
            None
        );
        let top = Region::try_new(&((1 << 62)..=MAX_ROOM)).expect("valid");
        assert_eq!(top.pick(0, 1, 1, u64::MAX), Some(MAX_ROOM));
        assert_eq!(top.pick(1, 2, 1, u64::MAX), Some(MAX_ROOM));
    }

    /// What fork() copies: the same keys, time and counter. Only the
    /// process id tells the children apart, and it must.
    #[test]
    fn copies_of_one_instance_in_different_processes_draw_differently() {
        let parent = Draws::new();
        let copy = || Draws {
            keys: parent.keys.clone(),
            created_ns: parent.created_ns,
            counter: AtomicU64::new(parent.counter.load(Ordering::Relaxed)),
        };
        let (child_a, child_b) = (copy(), copy());
        let a: Vec<u64> = (0..4).map(|_| child_a.next_in(1001)).collect();
        let b: Vec<u64> = (0..4).map(|_| child_b.next_in(1002)).collect();
        assert!(a.iter().all(|draw| !b.contains(draw)), "{a:?} {b:?}");
    }

    #[test]
    fn draws_differ_between_calls_and_between_instances() {
        let (a, b) = (Draws::new(), Draws::new());
        let first = a.next();
        assert_ne!(first, a.next());
        assert_ne!(first, b.next());
    }
}
