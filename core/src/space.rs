//! The room space: pure arithmetic, no I/O.
//!
//! Rooms are integers in `1..=2^63-1` (SGLang treats 0 as "not ready" and masks
//! rooms to 63 bits). The space is shared by every worker: it is handed out in
//! [`RoomRange`]s, each reserved for one `(prefill_worker, dp_size)`, starting
//! and ending on a multiple of that `dp_size`. Inside a range, each allocation
//! takes one [`Base`] (a multiple of `dp_size`) and the room for rank `r` is
//! `base + r`, so `room % dp_size == r` holds by construction and the decode
//! side recovers the rank with `room % prefill_dp_size`.
//!
//! The [`RangeTable`] maps every reserved range back to its owner, which is how
//! `ResolveRank` works with memory proportional to ranges, not rooms.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::cursor::BaseCursor as Bases;
use thiserror::Error;

/// Largest dp_size accepted; far above any real deployment, low enough that
/// `bases * dp_size` arithmetic stays comfortably inside u64.
pub use crate::limits::MAX_DP_SIZE;
/// Largest room: routers mask bootstrap rooms to 63 bits (signed 64-bit
/// fields elsewhere).
pub use crate::limits::MAX_ROOM;
/// Where the space starts: room 0 means "not ready" to SGLang, so the first
/// range begins at the first multiple of its dp_size that is at least 1.
pub const SPACE_START: u64 = 1;

/// Errors of the room arithmetic; each says which number was wrong.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SpaceError {
    #[error("dp_size must be at least 1; pass the prefill worker's data-parallel size")]
    DpSizeZero,
    #[error("dp_size {dp_size} is over the maximum of {MAX_DP_SIZE}")]
    DpSizeTooLarge { dp_size: u32 },
    #[error(
        "dp_rank {dp_rank} is out of range for dp_size {dp_size}; choose a rank in 0..{dp_size}"
    )]
    RankOutOfRange { dp_rank: u32, dp_size: u32 },
    #[error(
        "room 0 is never issued (SGLang reads 0 as \"not ready\"); pass a room from AllocateRoom"
    )]
    RoomZero,
    #[error(
        "room {room} is over the maximum of 2^63-1 ({MAX_ROOM}); SGLang masks rooms to 63 bits"
    )]
    RoomTooLarge { room: u64 },
    #[error(
        "the room space is used up: {bases} bases of dp_size {dp_size} do not fit between {high_water} and --max-room {max_room}; raise --max-room, or start a new space (a new --etcd-prefix or data dir) with bounds disjoint from this one"
    )]
    Exhausted {
        bases: u64,
        dp_size: u32,
        high_water: u64,
        max_room: u64,
    },
    #[error("--min-room {min_room} is above --max-room {max_room}; the bounds are inclusive and min <= max")]
    EmptyBounds { min_room: u64, max_room: u64 },
}

/// The part of the space one deployment hands out: rooms in
/// `min_room..=max_room`. Two deployments with disjoint bounds never share a
/// room, whatever their stores hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    min_room: u64,
    max_room: u64,
}

impl Bounds {
    /// The whole space, `1..=2^63-1`.
    pub const FULL: Bounds = Bounds {
        min_room: SPACE_START,
        max_room: MAX_ROOM,
    };

    pub fn try_new(min_room: u64, max_room: u64) -> Result<Self, SpaceError> {
        let min_room = Room::try_new(min_room)?.get();
        let max_room = Room::try_new(max_room)?.get();
        if min_room > max_room {
            return Err(SpaceError::EmptyBounds { min_room, max_room });
        }
        Ok(Self { min_room, max_room })
    }

    pub fn min_room(&self) -> u64 {
        self.min_room
    }

    pub fn max_room(&self) -> u64 {
        self.max_room
    }

    /// Exclusive end: ranges end at or below it.
    pub fn end(&self) -> u64 {
        self.max_room + 1
    }

    /// Numbers in the bounds.
    pub fn size(&self) -> u64 {
        self.max_room - self.min_room + 1
    }

    /// Numbers of the bounds at or below `high_water` (used or skipped).
    pub fn used(&self, high_water: u64) -> u64 {
        high_water
            .clamp(self.min_room, self.end())
            .saturating_sub(self.min_room)
    }
}

/// A prefill worker's data-parallel size, `1..=MAX_DP_SIZE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DpSize(u32);

impl DpSize {
    pub fn try_new(dp_size: u32) -> Result<Self, SpaceError> {
        match dp_size {
            0 => Err(SpaceError::DpSizeZero),
            n if n > MAX_DP_SIZE => Err(SpaceError::DpSizeTooLarge { dp_size }),
            n => Ok(Self(n)),
        }
    }

    pub fn get(self) -> u32 {
        self.0
    }

    fn as_u64(self) -> u64 {
        u64::from(self.0)
    }
}

/// A data-parallel rank, valid for one [`DpSize`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rank(u32);

impl Rank {
    pub fn try_new(dp_rank: u32, dp_size: DpSize) -> Result<Self, SpaceError> {
        if dp_rank < dp_size.get() {
            Ok(Self(dp_rank))
        } else {
            Err(SpaceError::RankOutOfRange {
                dp_rank,
                dp_size: dp_size.get(),
            })
        }
    }

    pub fn get(self) -> u32 {
        self.0
    }
}

/// A bootstrap room, `1..=MAX_ROOM`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Room(u64);

impl Room {
    pub fn try_new(room: u64) -> Result<Self, SpaceError> {
        match room {
            0 => Err(SpaceError::RoomZero),
            n if n > MAX_ROOM => Err(SpaceError::RoomTooLarge { room }),
            n => Ok(Self(n)),
        }
    }

    pub fn get(self) -> u64 {
        self.0
    }

    /// The rank SGLang's decode side derives: `room % dp_size`.
    pub fn rank(self, dp_size: DpSize) -> Rank {
        let rank = self.0 % dp_size.as_u64();
        Rank(u32::try_from(rank).expect("a remainder of a u32 divisor fits in u32"))
    }
}

/// A multiple of dp_size inside a reserved range; `base + rank` is a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Base(u64);

impl Base {
    pub fn get(self) -> u64 {
        self.0
    }

    /// The room for `rank`. Cannot overflow or leave the space: a base lies in
    /// a range that ends on a multiple of dp_size no later than `MAX_ROOM + 1`,
    /// so `base + rank < base + dp_size <= range end`, and `base >= dp_size >= 1`
    /// unless rank > 0.
    pub fn room(self, rank: Rank) -> Room {
        let room = self.0 + u64::from(rank.get());
        debug_assert!((1..=MAX_ROOM).contains(&room));
        Room(room)
    }
}

/// A reserved range `[start, end)` of the space for one dp_size: both ends are
/// multiples of `dp_size`, `start >= 1` and `end <= MAX_ROOM + 1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoomRange {
    start: u64,
    end: u64,
    dp_size: DpSize,
}

impl RoomRange {
    /// The next range for `dp_size` at or after `high_water` and inside
    /// `bounds`: `want` bases, or as many as fit but at least `need`.
    pub fn reserve_after(
        high_water: u64,
        dp_size: DpSize,
        want: u64,
        need: u64,
        bounds: Bounds,
    ) -> Result<Self, SpaceError> {
        let exhausted = SpaceError::Exhausted {
            bases: need,
            dp_size: dp_size.get(),
            high_water,
            max_room: bounds.max_room(),
        };
        let limit = bounds.end();
        let d = dp_size.as_u64();
        let from = high_water.max(bounds.min_room()).max(SPACE_START);
        let Some(start) = from.checked_next_multiple_of(d) else {
            return Err(exhausted);
        };
        let fits = limit.saturating_sub(start) / d;
        let bases = want.min(fits);
        if bases == 0 || bases < need {
            return Err(exhausted);
        }
        // Cannot overflow: bases * d <= limit - start.
        let end = start + bases * d;
        Ok(Self {
            start,
            end,
            dp_size,
        })
    }

    /// Rebuilds a range read back from a store, checking its invariants so a
    /// damaged record cannot produce misaligned rooms.
    pub fn from_parts(start: u64, end: u64, dp_size: DpSize) -> Option<Self> {
        let d = dp_size.as_u64();
        let aligned = start.is_multiple_of(d) && end.is_multiple_of(d);
        (aligned && start >= SPACE_START && start < end && end <= MAX_ROOM + 1).then_some(Self {
            start,
            end,
            dp_size,
        })
    }

    pub fn start(&self) -> u64 {
        self.start
    }

    /// Exclusive end; the high-water mark after this range.
    pub fn end(&self) -> u64 {
        self.end
    }

    pub fn dp_size(&self) -> DpSize {
        self.dp_size
    }

    pub fn bases(&self) -> u64 {
        (self.end - self.start) / self.dp_size.as_u64()
    }

    pub fn contains(&self, room: Room) -> bool {
        (self.start..self.end).contains(&room.get())
    }

    /// Hands the bases out in order, each once.
    pub fn cursor(self) -> BaseCursor {
        BaseCursor {
            bases: Bases::new(self.start, self.bases(), self.dp_size.get())
                .expect("a range's start is aligned and its bases end at or below MAX_ROOM + 1"),
            range: self,
        }
    }
}

/// The unissued rest of a range; each base comes out at most once. The
/// taking is the client crate's cursor (one implementation of the double
/// buffer for the server's worker state and a router's leases); this adds
/// the range it came from and the space's types.
#[derive(Debug, Clone)]
pub struct BaseCursor {
    bases: Bases,
    range: RoomRange,
}

impl BaseCursor {
    pub fn dp_size(&self) -> DpSize {
        self.range.dp_size
    }

    pub fn range(&self) -> RoomRange {
        self.range
    }

    pub fn remaining(&self) -> u64 {
        self.bases.remaining()
    }

    /// Takes one base.
    pub fn take(&mut self) -> Option<Base> {
        self.bases.take().map(Base)
    }

    /// Takes `count` consecutive bases and returns the first, or nothing if
    /// fewer than `count` remain.
    pub fn take_block(&mut self, count: u64) -> Option<Base> {
        self.bases.take_run(count).map(Base)
    }
}

/// Who a reserved range belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeOwner {
    pub prefill_worker: Arc<str>,
    pub range: RoomRange,
    /// Wall-clock reservation time, for retention.
    pub created_unix_ms: u64,
}

/// Every reserved range, keyed by start, for `ResolveRank`.
#[derive(Debug, Default)]
pub struct RangeTable {
    by_start: BTreeMap<u64, RangeOwner>,
}

/// A range that overlaps one already in the table: the store handed out the
/// same numbers twice, which must stop the server rather than be served.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("range {start}..{end} overlaps the reserved range {other_start}..{other_end}")]
pub struct OverlapError {
    pub start: u64,
    pub end: u64,
    pub other_start: u64,
    pub other_end: u64,
}

impl RangeTable {
    pub fn insert(&mut self, owner: RangeOwner) -> Result<(), OverlapError> {
        let RoomRange { start, end, .. } = owner.range;
        let before = self.by_start.range(..end).next_back();
        if let Some((_, other)) = before {
            if other.range.end > start {
                return Err(OverlapError {
                    start,
                    end,
                    other_start: other.range.start,
                    other_end: other.range.end,
                });
            }
        }
        self.by_start.insert(start, owner);
        Ok(())
    }

    /// The range holding `room`, if any was ever reserved for it.
    pub fn resolve(&self, room: Room) -> Option<&RangeOwner> {
        self.by_start
            .range(..=room.get())
            .next_back()
            .map(|(_, owner)| owner)
            .filter(|owner| owner.range.contains(room))
    }

    pub fn len(&self) -> usize {
        self.by_start.len()
    }

    /// Drops ranges reserved before `cutoff_unix_ms`, except those starting at
    /// one of `held` (still being served from: a wall clock that jumped must
    /// not prune them); returns the highest end dropped (0 if none).
    pub fn prune(&mut self, cutoff_unix_ms: u64, held: &BTreeSet<u64>) -> u64 {
        let mut pruned_below = 0;
        self.by_start.retain(|start, owner| {
            let keep = owner.created_unix_ms >= cutoff_unix_ms || held.contains(start);
            if !keep {
                pruned_below = pruned_below.max(owner.range.end);
            }
            keep
        });
        pruned_below
    }

    /// The workers that own at least one range.
    pub fn owners(&self) -> std::collections::HashSet<&str> {
        self.by_start
            .values()
            .map(|owner| &*owner.prefill_worker)
            .collect()
    }

    /// The lowest range, if any.
    pub fn first(&self) -> Option<&RangeOwner> {
        self.by_start.values().next()
    }

    pub fn iter(&self) -> impl Iterator<Item = &RangeOwner> {
        self.by_start.values()
    }

    pub fn is_empty(&self) -> bool {
        self.by_start.is_empty()
    }

    /// End of the highest range, or `SPACE_START` when empty.
    pub fn high_water(&self) -> u64 {
        self.by_start
            .values()
            .next_back()
            .map_or(SPACE_START, |owner| owner.range.end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn dp(n: u32) -> DpSize {
        DpSize::try_new(n).expect("test dp_size is valid")
    }

    #[test]
    fn validating_constructors_reject_out_of_range_values() {
        assert_eq!(DpSize::try_new(0), Err(SpaceError::DpSizeZero));
        assert_eq!(
            DpSize::try_new(MAX_DP_SIZE + 1),
            Err(SpaceError::DpSizeTooLarge {
                dp_size: MAX_DP_SIZE + 1
            })
        );
        assert!(DpSize::try_new(MAX_DP_SIZE).is_ok());
        assert!(Rank::try_new(3, dp(4)).is_ok());
        assert!(Rank::try_new(4, dp(4)).is_err());
        assert_eq!(Room::try_new(0), Err(SpaceError::RoomZero));
        assert!(Room::try_new(MAX_ROOM).is_ok());
        assert!(Room::try_new(MAX_ROOM + 1).is_err());
    }

    #[test]
    fn first_range_skips_room_zero() {
        let range = RoomRange::reserve_after(0, dp(1), 4, 4, Bounds::FULL).expect("fits");
        assert_eq!((range.start(), range.end()), (1, 5));
        let range = RoomRange::reserve_after(SPACE_START, dp(8), 2, 2, Bounds::FULL).expect("fits");
        assert_eq!((range.start(), range.end()), (8, 24));
    }

    #[test]
    fn last_room_of_the_space_is_reachable_and_the_next_is_not() {
        let d = dp(1);
        let range = RoomRange::reserve_after(MAX_ROOM, d, 1, 1, Bounds::FULL).expect("one fits");
        let mut cursor = range.cursor();
        let base = cursor.take().expect("one base");
        assert_eq!(
            base.room(Rank::try_new(0, d).expect("rank")).get(),
            MAX_ROOM
        );
        assert!(RoomRange::reserve_after(range.end(), d, 1, 1, Bounds::FULL).is_err());
    }

    #[test]
    fn range_table_rejects_overlap() {
        let mut table = RangeTable::default();
        let owner = |start, end| RangeOwner {
            prefill_worker: Arc::from("w"),
            range: RoomRange::from_parts(start, end, dp(2)).expect("aligned"),
            created_unix_ms: start,
        };
        table.insert(owner(2, 10)).expect("first");
        assert!(table.insert(owner(8, 12)).is_err());
        assert!(table.insert(owner(2, 4)).is_err());
        table.insert(owner(10, 12)).expect("adjacent is fine");
        assert_eq!(table.high_water(), 12);
        assert_eq!(
            table.prune(5, &BTreeSet::from([2])),
            0,
            "a held range stays, however old"
        );
        assert_eq!(
            table.prune(5, &BTreeSet::new()),
            10,
            "drops the range created at 2"
        );
        assert_eq!(table.len(), 1);
    }

    proptest! {
        #[test]
        fn rooms_are_rank_aligned_and_in_bounds(
            high_water in 0u64..=MAX_ROOM,
            dp_size in 1u32..=MAX_DP_SIZE,
            bases in 1u64..1000,
            rank_seed in any::<u32>(),
        ) {
            let d = dp(dp_size);
            let rank = Rank::try_new(rank_seed % dp_size, d).expect("reduced rank");
            match RoomRange::reserve_after(high_water, d, bases, bases, Bounds::FULL) {
                Ok(range) => {
                    prop_assert_eq!(range.start() % u64::from(dp_size), 0);
                    prop_assert!(range.start() >= high_water);
                    prop_assert_eq!(range.bases(), bases);
                    let mut cursor = range.cursor();
                    let mut last = None;
                    while let Some(base) = cursor.take() {
                        prop_assert_eq!(base.get() % u64::from(dp_size), 0);
                        let room = base.room(rank);
                        prop_assert!(room.get() >= 1 && room.get() <= MAX_ROOM);
                        prop_assert_eq!(room.rank(d), rank);
                        prop_assert!(range.contains(room));
                        prop_assert!(last < Some(room));
                        last = Some(room);
                    }
                }
                Err(SpaceError::Exhausted { .. }) => {
                    // Only when the range really does not fit.
                    let start = u128::from(high_water.max(1)).next_multiple_of(u128::from(dp_size));
                    prop_assert!(start + u128::from(bases) * u128::from(dp_size) > u128::from(MAX_ROOM) + 1);
                }
                Err(other) => prop_assert!(false, "unexpected {other}"),
            }
        }

        #[test]
        fn a_range_near_the_limit_shrinks_to_fit_but_never_below_need(
            high_water in 1u64..10_000,
            dp_size in 1u32..=64,
            want in 1u64..500,
            need_seed in any::<u64>(),
            min_room in 1u64..5_000,
            limit in 1u64..20_000,
        ) {
            let need = 1 + need_seed % want;
            let Ok(bounds) = Bounds::try_new(min_room, limit) else {
                prop_assert!(min_room > limit);
                return Ok(());
            };
            match RoomRange::reserve_after(high_water, dp(dp_size), want, need, bounds) {
                Ok(range) => {
                    prop_assert!(range.end() <= limit + 1);
                    prop_assert!(range.start() >= min_room);
                    prop_assert!(range.bases() >= need && range.bases() <= want);
                    prop_assert!(range.start() >= high_water);
                    // Every room of every base, rank included, lies in the bounds.
                    prop_assert!(range.end() - 1 <= bounds.max_room());
                }
                Err(SpaceError::Exhausted { .. }) => {
                    let start = high_water.max(min_room).next_multiple_of(u64::from(dp_size));
                    prop_assert!(start + need * u64::from(dp_size) > limit + 1);
                }
                Err(other) => prop_assert!(false, "unexpected {other}"),
            }
        }

        #[test]
        fn consecutive_reservations_are_disjoint_and_move_forward(
            sizes in proptest::collection::vec((1u32..=64, 1u64..64), 1..40),
        ) {
            let mut table = RangeTable::default();
            let mut high_water = SPACE_START;
            for (dp_size, bases) in sizes {
                let range = RoomRange::reserve_after(high_water, dp(dp_size), bases, bases, Bounds::FULL)
                    .expect("small ranges fit");
                prop_assert!(range.start() >= high_water);
                high_water = range.end();
                table.insert(RangeOwner { prefill_worker: Arc::from("w"), range, created_unix_ms: 0 })
                    .expect("reservations never overlap");
                prop_assert_eq!(table.high_water(), high_water);
            }
        }

        #[test]
        fn blocks_from_a_cursor_never_overlap(
            dp_size in 1u32..=16,
            takes in proptest::collection::vec(1u64..8, 1..50),
        ) {
            let d = dp(dp_size);
            let range = RoomRange::reserve_after(SPACE_START, d, 100, 100, Bounds::FULL).expect("fits");
            let mut cursor = range.cursor();
            let mut seen = std::collections::BTreeSet::new();
            for count in takes {
                let before = cursor.remaining();
                match cursor.take_block(count) {
                    Some(first) => {
                        for i in 0..count {
                            prop_assert!(seen.insert(first.get() + i * u64::from(dp_size)));
                        }
                        prop_assert_eq!(cursor.remaining(), before - count);
                    }
                    None => prop_assert!(before < count),
                }
            }
        }

        #[test]
        fn resolve_finds_exactly_the_reserved_numbers(
            ranges in proptest::collection::vec((1u32..=8, 1u64..8, 0u64..20), 1..20),
            probe in 0u64..2000,
        ) {
            let mut table = RangeTable::default();
            let mut high_water = SPACE_START;
            let mut reserved = Vec::new();
            for (dp_size, bases, gap) in ranges {
                let range = RoomRange::reserve_after(high_water + gap, dp(dp_size), bases, bases, Bounds::FULL)
                    .expect("fits");
                high_water = range.end();
                reserved.push(range);
                table.insert(RangeOwner { prefill_worker: Arc::from(format!("w{dp_size}")), range, created_unix_ms: 0 })
                    .expect("disjoint");
            }
            if let Ok(room) = Room::try_new(probe) {
                let expected = reserved.iter().find(|r| r.contains(room));
                let found = table.resolve(room).map(|owner| owner.range);
                prop_assert_eq!(found.as_ref(), expected);
            }
        }
    }
}
