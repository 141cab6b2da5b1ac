//! ResolveRank's look-ups in etcd: which range holds a room this replica
//! does not hold in memory (another replica reserved it after this one
//! started), read in windows whose size does not grow with the number of
//! range records etcd keeps.
//!
//! # Why every window is bounded
//! etcd 3.4 and 3.5 answer a read by visiting every key between its `key`
//! and `range_end`, whatever its limit: to count them, and (sorted
//! descending) to fetch and sort them all. One descending `limit 1` read
//! over every range below the room, and a count of the whole prefix, took
//! 71 ms with 25,000 records and 175 ms with 100,000. So no read here spans
//! more than a window just below the room, searched as follows.
//!
//! Ranges never overlap, nor do chunks (both are cut from the space above
//! the mark by a compare-and-swap on it), and every range a replica carves
//! lies inside the chunk it was carved from, announced under the same lease
//! (so the chunk's key lives as long as the range's; see the store's docs).
//! A range of 0.1 or imported by `migrate` lies in no chunk, and overlaps
//! none. Hence:
//! - The greatest chunk start at or below the room names the only chunk
//!   that can hold it; the greatest range start at or below it, the only
//!   range that can (a range or chunk starting lower ends at or below that
//!   start).
//! - Each is found by reading windows `[room + 1 - width, room + 1)`, the
//!   first [`FIRST_CHUNK_WINDOW`] numbers wide for chunks (the smallest
//!   chunk) and [`FIRST_RANGE_WINDOW`] for ranges, growing
//!   [`WINDOW_GROWTH`]-fold while empty: an empty window costs etcd nothing,
//!   so the keys etcd visits are those of the first window that holds one,
//!   which lie within [`WINDOW_GROWTH`] times the distance from the room
//!   down to the nearest start. At most [`MAX_ROUNDS`] windows reach the
//!   bottom of the space.
//! - The range windows stop at the chunk's start when the chunk holds the
//!   room (every range that can hold it lies in that chunk), and at its end
//!   when the room lies past it (only a range of no chunk can hold it, and
//!   such a range lies between chunks). So a range window holds at most the
//!   ranges one replica carved from one chunk, within one
//!   [`CHUNK_LIFETIME`](super::reserve::CHUNK_LIFETIME), and a chunk window
//!   the chunks within 16 times the distance from the room down to its
//!   chunk's start: neither grows with the records etcd keeps (the
//!   `etcd_lookup` integration tests count the keys etcd visits through
//!   `room_allocator_etcd_lookup_keys_total`).
//!
//! Rooms below the lowest chunk are known to lie in no chunk without a
//! read: a replica starts with the lowest chunk start (or the mark) it
//! loaded, and raises it past each room its reads proved to lie below every
//! chunk (chunks taken later start at the mark, above such a room). Past a
//! room its reads proved to lie below every chunk and every range, it
//! raises a second floor: rooms below that one are final misses without a
//! read (a miss below every record was final already, and cached). Like
//! every final miss, it assumes no range is imported below it later:
//! `migrate` is for a prefix no replica has served. Between
//! chunks, or below them, only ranges of no chunk lie (0.1's, and those
//! `migrate` imported, side by side), which expire with the retention: the
//! range windows grow there as anywhere, so a window holds the records
//! within 16 times the distance from the room down to the nearest start
//! (`etcd_lookup::rooms_of_ranges_in_no_chunk_are_looked_up_in_bounded_windows`).
//! A room at or above the mark lies in no
//! range (the mark lies above every range, or replicas refuse it): one read
//! from the mark up to the room, which only a mark rewritten by hand leaves
//! a range in, answers it; such a miss is never cached.
//!
//! # One snapshot
//! The first round reads the mark too; every later round reads at the
//! first one's revision, so the answer is one snapshot of etcd, as a single
//! transaction's was. If etcd compacted that revision meanwhile the look-up
//! starts over (at most [`MAX_ATTEMPTS`] times).
//!
//! # A bound per replica
//! A replica sends at most [`MAX_LOOKUPS_PER_SEC`] look-ups a second to
//! etcd (a token bucket of that many, refilled continuously: [`Budget`]);
//! past it ResolveRank answers RESOURCE_EXHAUSTED (`LOOKUPS_THROTTLED`) at
//! once, without asking etcd, so random rooms from any caller cannot load
//! etcd beyond that many look-ups, each of at most [`MAX_ROUNDS`] small
//! transactions. Rooms held in memory and cached misses are not counted: a
//! range found is held from then on, so a router resolving the rooms of
//! other replicas needs one look-up per range.
//!
//! # Final misses
//! A miss is final (cached by [`super::negative_cache`]) only if, in that
//! snapshot, the room lies below the mark and in no chunk: ranges are only
//! carved from chunks, under the chunk's lease, and chunks only above the
//! mark, so a range that will ever hold the room is carved from a chunk
//! announced (and still alive) in the snapshot. A room in a chunk is never
//! cached: the replica that took it may still carve the room.

use std::sync::atomic::Ordering;

use super::client::{pb, txn};
use super::keys::{chunk_end, parse_decimal, range_record, Keys};
use super::reserve::MIN_CHUNK_NUMBERS;
use super::Shared;
use crate::space::{RangeOwner, Room, SPACE_START};
use crate::store::StoreError;

/// The first chunk window: the smallest chunk a replica takes.
pub(super) const FIRST_CHUNK_WINDOW: u64 = MIN_CHUNK_NUMBERS;
/// The first range window: four of the smallest range a worker reserves
/// with dp_size 1 (1024 bases).
pub(super) const FIRST_RANGE_WINDOW: u64 = 1 << 12;
/// How much wider each window is than the last, while empty.
pub(super) const WINDOW_GROWTH: u64 = 16;
/// Rounds of reads at most: from 2^12, 13 windows 16 times wider each reach
/// 2^64, the whole space; one more for safety.
pub(super) const MAX_ROUNDS: usize = 14;
/// Look-ups started over after etcd compacted the revision they read at.
pub(super) const MAX_ATTEMPTS: usize = 3;

/// Look-ups a replica sends to etcd per second, at most; also the burst.
pub(crate) const MAX_LOOKUPS_PER_SEC: u32 = 1000;

/// The look-ups a replica sends per second: [`MAX_LOOKUPS_PER_SEC`]; a
/// binary built with failpoints takes a lower one from
/// `ROOM_ALLOCATOR_TEST_LOOKUPS_PER_SEC`, so a test can exceed it through
/// the binary however slowly a loaded machine lets calls arrive.
pub(super) fn lookups_per_sec() -> u32 {
    #[cfg(feature = "failpoints")]
    if let Some(rate) = std::env::var("ROOM_ALLOCATOR_TEST_LOOKUPS_PER_SEC")
        .ok()
        .and_then(|rate| rate.parse::<u32>().ok())
        .filter(|rate| (1..=MAX_LOOKUPS_PER_SEC).contains(rate))
    {
        return rate;
    }
    MAX_LOOKUPS_PER_SEC
}

/// A token bucket of look-ups: `per_sec` tokens, refilled at that rate.
/// Time comes in as ms since the store's epoch.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Budget {
    per_sec: u32,
    tokens: f64,
    at_ms: u64,
}

impl Budget {
    pub(super) fn new(now_ms: u64, per_sec: u32) -> Self {
        Self {
            per_sec,
            tokens: f64::from(per_sec),
            at_ms: now_ms,
        }
    }

    pub(super) fn per_sec(&self) -> u32 {
        self.per_sec
    }

    /// Takes one look-up from the budget; false if none is left.
    pub(super) fn take(&mut self, now_ms: u64) -> bool {
        let rate = f64::from(self.per_sec);
        let elapsed_ms = now_ms.saturating_sub(self.at_ms);
        // Exact below 2^53 ms (285,000 years).
        self.tokens = (self.tokens + elapsed_ms as f64 * rate / 1000.0).min(rate);
        self.at_ms = self.at_ms.max(now_ms);
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }
}

/// A search for the greatest key at or below a room, among keys that start
/// at or above a floor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Search<T> {
    Looking {
        floor: u64,
        width: u64,
    },
    /// The greatest start at or below the room, and what its key holds.
    Found(u64, T),
    /// No key starts between the floor and the room.
    Nothing,
}

impl<T> Search<T> {
    pub(super) fn new(width: u64) -> Self {
        Self::Looking { floor: 0, width }
    }

    /// The starts `[low, high)` of the next window to read, if still looking.
    pub(super) fn window(&self, room: u64) -> Option<(u64, u64)> {
        match self {
            Self::Looking { floor, width } => {
                let high = room.saturating_add(1);
                Some((high.saturating_sub(*width).max(*floor), high))
            }
            _ => None,
        }
    }

    /// The last key of the window just read (`None`: it held none).
    pub(super) fn answer(&mut self, room: u64, last: Option<(u64, T)>) {
        let Some((low, _)) = self.window(room) else {
            return;
        };
        let Self::Looking { floor, width } = *self else {
            return;
        };
        *self = match last {
            Some((start, value)) => Self::Found(start, value),
            None if low <= floor => Self::Nothing,
            None => Self::Looking {
                floor,
                width: width.saturating_mul(WINDOW_GROWTH),
            },
        };
    }

    /// No key this search looks for starts below `floor`.
    pub(super) fn raise_floor(&mut self, room: u64, floor: u64) {
        if let Self::Looking { floor: current, .. } = self {
            *current = (*current).max(floor);
            if *current > room {
                *self = Self::Nothing;
            }
        }
    }

    /// The next window reaches down to the floor.
    pub(super) fn widen_to_floor(&mut self) {
        if let Self::Looking { width, .. } = self {
            *width = u64::MAX;
        }
    }

    pub(super) fn is_done(&self) -> bool {
        !matches!(self, Self::Looking { .. })
    }
}

/// Where a range holding the room can start, given the chunk search's
/// answer: in the chunk that holds the room, or past the chunk below it
/// (`None` end: the chunk's value is unreadable, so it may hold the room).
pub(super) fn range_floor(room: u64, chunk: &Search<Option<u64>>) -> Option<u64> {
    match chunk {
        Search::Looking { .. } => None,
        Search::Nothing => Some(0),
        Search::Found(start, end) => Some(match end {
            Some(end) if *end <= room => *end,
            _ => *start,
        }),
    }
}

/// Floors the range search by the chunk search's answer (see
/// [`range_floor`]). Between chunks or below them only a range of no chunk
/// (0.1's, imported) can hold the room; the windows keep growing there
/// too, since `migrate` imports an embedded store's ranges side by side:
/// a window down to the floor at once would hold every one below the room.
pub(super) fn bound_ranges(
    room: u64,
    chunks: &Search<Option<u64>>,
    ranges: &mut Search<Option<RangeOwner>>,
) {
    if let Some(floor) = range_floor(room, chunks) {
        ranges.raise_floor(room, floor);
    }
}

/// True if the chunk search's answer is a chunk that may hold the room.
pub(super) fn in_a_chunk(room: u64, chunk: &Search<Option<u64>>) -> bool {
    matches!(chunk, Search::Found(_, end) if end.is_none_or(|end| room < end))
}

/// What a look-up found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Lookup {
    pub(super) owner: Option<RangeOwner>,
    /// For a final miss, whether the room lies below every live range and
    /// chunk (ResolveRank then says "pruned"); `None` for a hit or a miss
    /// that is not final.
    pub(super) final_miss: Option<bool>,
}

impl Lookup {
    const NOT_FINAL: Self = Self {
        owner: None,
        final_miss: None,
    };
}

/// The range record a range search found, if it decodes and holds `room`;
/// `Err(())` if it does not decode (then nothing is concluded).
fn holder(ranges: &Search<Option<RangeOwner>>, room: u64) -> Result<Option<RangeOwner>, ()> {
    match ranges {
        Search::Found(_, None) => Err(()),
        Search::Found(_, Some(owner)) => Ok(Room::try_new(room)
            .ok()
            .filter(|room| owner.range.contains(*room))
            .map(|_| owner.clone())),
        _ => Ok(None),
    }
}

/// The start a chunk or range key names after `prefix`, if canonical.
pub(super) fn start_of(key: &[u8], prefix: &str) -> Option<u64> {
    let start = std::str::from_utf8(key).ok()?.strip_prefix(prefix)?;
    parse_decimal(start.as_bytes()).filter(|value| format!("{value:020}") == start)
}

impl Shared {
    /// The range that holds `room`, read in bounded windows (see the
    /// module's docs); counts the keys etcd went through.
    pub(super) async fn look_up(&self, room: u64) -> Result<Lookup, StoreError> {
        crate::metrics::ETCD_LOOKUPS.inc();
        let mut attempts = 0;
        loop {
            attempts += 1;
            match self.look_up_once(room).await {
                Err(StoreError::Etcd { message, .. })
                    if message.contains("compacted") && attempts < MAX_ATTEMPTS => {}
                result => return result,
            }
        }
    }

    async fn look_up_once(&self, room: u64) -> Result<Lookup, StoreError> {
        let keys = &self.keys;
        let (chunk_prefix, range_prefix) = (keys.chunks(), keys.ranges());
        let mut chunks: Search<Option<u64>> = Search::new(FIRST_CHUNK_WINDOW);
        let mut ranges: Search<Option<RangeOwner>> = Search::new(FIRST_RANGE_WINDOW);
        let mut revision = 0;
        let mut mark = None;
        let chunk_floor = self.chunk_floor.load(Ordering::Acquire);
        chunks.raise_floor(room, chunk_floor);
        // A room below the lowest chunk needs no chunk read: its range
        // search reads down to its floor from the first round.
        bound_ranges(room, &chunks, &mut ranges);
        for round in 0..MAX_ROUNDS {
            let below_mark = mark.is_none_or(|mark| room < mark);
            // Only a room below the mark needs its chunk (to be cached).
            let chunk_window = chunks.window(room).filter(|_| below_mark);
            let range_window = ranges.window(room);
            let read = |key: fn(&Keys, u64) -> String, (low, high): (u64, u64)| {
                txn::get_range(pb::RangeRequest {
                    key: key(keys, low).into_bytes(),
                    range_end: key(keys, high).into_bytes(),
                    limit: 1,
                    sort_order: pb::range_request::SortOrder::Descend as i32,
                    sort_target: pb::range_request::SortTarget::Key as i32,
                    revision,
                    ..Default::default()
                })
            };
            let mut success = Vec::with_capacity(3);
            if round == 0 {
                success.push(txn::get(&keys.high_water()));
            }
            success.extend(chunk_window.map(|window| read(Keys::chunk, window)));
            success.extend(range_window.map(|window| read(Keys::range, window)));
            let response = self
                .timed(
                    "look up a range",
                    self.client.txn(pb::TxnRequest {
                        compare: Vec::new(),
                        success,
                        failure: Vec::new(),
                    }),
                )
                .await?;
            let all = txn::ranges(&response);
            crate::metrics::ETCD_LOOKUP_KEYS.inc_by(
                all.iter()
                    .map(|read| u64::try_from(read.count).unwrap_or(0))
                    .sum(),
            );
            let mut reads = all.into_iter().map(|read| read.kvs.first());
            if round == 0 {
                revision = response.header.as_ref().map_or(0, |h| h.revision);
                mark = Some(
                    reads
                        .next()
                        .flatten()
                        .and_then(|kv| parse_decimal(&kv.value))
                        .unwrap_or(SPACE_START),
                );
            }
            if chunk_window.is_some() {
                let last = reads.next().flatten().map(|kv| {
                    // An unreadable key counts as a chunk that holds the room.
                    let start = start_of(&kv.key, &chunk_prefix).unwrap_or(room);
                    (start, chunk_end(&kv.value))
                });
                chunks.answer(room, last);
            }
            if range_window.is_some() {
                let last = reads.next().flatten().map(|kv| {
                    let owner = range_record(&range_prefix, kv);
                    (start_of(&kv.key, &range_prefix).unwrap_or(room), owner)
                });
                ranges.answer(room, last);
            }
            bound_ranges(room, &chunks, &mut ranges);
            // A damaged record where the range would be: nothing to conclude
            // (NOT_FOUND, never cached; only a hand-written record can be
            // damaged, and a start checks the one nearest below the mark).
            let Ok(found) = holder(&ranges, room) else {
                return Ok(Lookup::NOT_FINAL);
            };
            if found.is_some() {
                return Ok(Lookup {
                    owner: found,
                    final_miss: None,
                });
            }
            if let Some(mark) = mark.filter(|mark| room >= *mark) {
                // Ranges lie below the mark (a replica refuses a mark below
                // one): only a mark damaged by hand leaves one above it,
                // between the mark and the room, read at once. A range
                // straddling such a mark, starting more than the first
                // window below the room, is not found: NOT_FOUND, never
                // cached, while replicas refuse to start or reserve under
                // that mark. Not final: a range may still be carved over
                // the room.
                ranges.raise_floor(room, mark);
                ranges.widen_to_floor();
                if ranges.is_done() {
                    return Ok(Lookup::NOT_FINAL);
                }
                continue;
            }
            if chunks.is_done() && ranges.is_done() {
                let below_oldest =
                    matches!(chunks, Search::Nothing) && matches!(ranges, Search::Nothing);
                if matches!(chunks, Search::Nothing) {
                    // No chunk started at or below the room in this
                    // snapshot, and later ones start at or above its mark,
                    // which lies above the room: none ever will.
                    self.chunk_floor.fetch_max(room + 1, Ordering::AcqRel);
                }
                if below_oldest {
                    // Nor did a range (ranges are carved from chunks):
                    // rooms up to this one need no read any more.
                    self.record_floor.fetch_max(room + 1, Ordering::AcqRel);
                }
                return Ok(Lookup {
                    owner: None,
                    final_miss: (!in_a_chunk(room, &chunks)).then_some(below_oldest),
                });
            }
        }
        Ok(Lookup::NOT_FINAL)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a search over `starts` (sorted), as the reads would; returns
    /// its answer and the keys each window held.
    fn search(starts: &[u64], room: u64, floor: u64) -> (Search<()>, Vec<usize>) {
        let mut search = Search::new(FIRST_RANGE_WINDOW);
        search.raise_floor(room, floor);
        let mut visited = Vec::new();
        for _ in 0..MAX_ROUNDS {
            let Some((low, high)) = search.window(room) else {
                break;
            };
            let inside: Vec<u64> = starts
                .iter()
                .copied()
                .filter(|s| (low..high).contains(s))
                .collect();
            visited.push(inside.len());
            search.answer(room, inside.last().map(|s| (*s, ())));
        }
        (search, visited)
    }

    #[test]
    fn the_greatest_start_at_or_below_the_room_is_found_whatever_its_distance() {
        let starts = [5, 1 << 20, (1 << 40) + 3];
        for (room, expected) in [
            (4, None),
            (5, Some(5)),
            (6, Some(5)),
            ((1 << 20) - 1, Some(5)),
            (1 << 20, Some(1 << 20)),
            ((1 << 40) + 2, Some(1 << 20)),
            (u64::MAX - 1, Some((1 << 40) + 3)),
        ] {
            let found = match search(&starts, room, 0).0 {
                Search::Found(start, ()) => Some(start),
                Search::Nothing => None,
                Search::Looking { .. } => panic!("room {room}: still looking after every round"),
            };
            assert_eq!(found, expected, "room {room}");
        }
    }

    #[test]
    fn a_search_visits_only_the_first_window_that_holds_a_key() {
        // A million ranges of 1024 numbers: the room's range lies in the
        // first window, which holds a few of them.
        let starts: Vec<u64> = (0..1_000_000u64).map(|i| 1 + i * 1024).collect();
        let room = 1 + 700_000 * 1024 + 100;
        let (found, visited) = search(&starts, room, 0);
        assert_eq!(found, Search::Found(1 + 700_000 * 1024, ()));
        assert!(visited.iter().sum::<usize>() <= 4, "visited {visited:?}");
    }

    #[test]
    fn a_search_stops_at_its_floor_and_never_reads_below_it() {
        let starts = [10, 20];
        let (found, visited) = search(&starts, 1 << 30, 21);
        assert_eq!(found, Search::Nothing);
        assert_eq!(visited.iter().sum::<usize>(), 0);
        assert_eq!(
            search(&starts, 15, 16).0,
            Search::Nothing,
            "a floor above the room"
        );
    }

    #[test]
    fn look_ups_past_the_budget_are_refused_until_it_refills() {
        let mut budget = Budget::new(0, MAX_LOOKUPS_PER_SEC);
        for i in 0..MAX_LOOKUPS_PER_SEC {
            assert!(budget.take(0), "look-up {i} of the burst");
        }
        assert!(!budget.take(0), "one past the burst");
        assert!(!budget.take(0));
        // One more a millisecond at 1000 a second.
        assert!(budget.take(1));
        assert!(!budget.take(1));
        // A second idle refills the bucket, never past the burst.
        assert!(budget.take(60_000));
        let taken = (0..2 * MAX_LOOKUPS_PER_SEC)
            .filter(|_| budget.take(60_000))
            .count();
        assert_eq!(taken, MAX_LOOKUPS_PER_SEC as usize - 1);
    }

    #[test]
    fn ranges_are_looked_for_in_the_chunk_that_holds_the_room_or_past_the_one_below_it() {
        assert_eq!(range_floor(50, &Search::Found(10, Some(100))), Some(10));
        assert_eq!(range_floor(150, &Search::Found(10, Some(100))), Some(100));
        assert_eq!(
            range_floor(150, &Search::Found(10, None)),
            Some(10),
            "an unreadable chunk may hold the room"
        );
        assert_eq!(range_floor(150, &Search::Nothing), Some(0));
        assert_eq!(
            range_floor(150, &Search::Looking { floor: 0, width: 1 }),
            None
        );
        assert!(in_a_chunk(50, &Search::Found(10, Some(100))));
        assert!(in_a_chunk(150, &Search::Found(10, None)));
        assert!(!in_a_chunk(100, &Search::Found(10, Some(100))));
        assert!(!in_a_chunk(100, &Search::Nothing));
    }
}
