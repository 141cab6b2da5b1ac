//! One worker's state, apart from the locks, tasks and store calls that
//! drive it: its registration as this process applied it, the epoch that
//! registration changes bump, the range being served and the one reserved
//! ahead ([`Ahead`]: an explicit state, not flags), and the range sizing.
//!
//! Pure: time comes in as an [`Instant`] the caller reads, and every
//! decision is a method returning what to do. The server's `Allocator`
//! holds it under the worker's lock; a model checker can drive the same
//! code.
//!
//! Invariants it keeps:
//! - A registration change (dp_size, or registered/deregistered) bumps the
//!   epoch and drops both ranges; a change older than the one applied (by
//!   store revision) is ignored.
//! - A range reserved under an epoch serves rooms only if the epoch is
//!   still the same when it arrives ([`WorkerState::place`]): a realignment
//!   that overtook the reservation never gets rooms of the old dp_size.
//! - A range serves only until its `serve_until` (reservation + retention).

use std::time::{Duration, Instant};

use crate::record::WorkerRecord;
use crate::space::{Base, BaseCursor, DpSize, RoomRange};

/// Smallest range reserved: a restart skips at most this many bases per worker.
pub const MIN_RANGE_BASES: u64 = 1024;
/// Largest range reserved, in bases: minutes of traffic at millions/s...
const MAX_RANGE_BASES: u64 = 1 << 26;
/// ...and in numbers of the space, so a large dp_size does not eat it faster.
const MAX_RANGE_NUMBERS: u64 = 1 << 32;
/// Ranges are sized to last about this long, so store writes stay rare and
/// the range table (kept for twice the retention) stays small: a busy worker
/// adds about 576 ranges a day.
const TARGET_RANGE_LIFETIME: Duration = Duration::from_secs(300);

/// A range being served, and until when.
#[derive(Debug, Clone)]
pub struct Held {
    pub cursor: BaseCursor,
    /// Past this (reservation + retention) no room comes from it.
    pub serve_until: Instant,
}

impl Held {
    fn remaining(&self) -> u64 {
        self.cursor.remaining()
    }

    /// Can serve `count` bases that stay usable for `validity` after `now`.
    fn can_serve(&self, count: u64, now: Instant, validity: Duration) -> bool {
        self.remaining() >= count && self.serve_until.saturating_duration_since(now) > validity
    }
}

/// The range reserved ahead of need (double-buffering, as in Meituan's
/// Leaf): at most one reservation ahead is in flight.
#[derive(Debug, Clone)]
pub enum Ahead {
    /// Nothing reserved ahead, nothing being reserved.
    Empty,
    /// A reservation ahead is in flight.
    Reserving,
    /// A range reserved ahead, served once the current one cannot serve.
    Reserved(Held),
}

/// What a caller needs from a worker's ranges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Demand {
    /// `count` consecutive bases, usable for `validity` from now.
    Bases { count: u64, validity: Duration },
    /// A range reserved ahead; nothing is taken.
    Prefetch,
}

/// Bases taken from a worker's range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Taken {
    pub first_base: Base,
    pub dp_size: DpSize,
    /// How long the bases stay usable.
    pub valid_for: Duration,
    /// The range ahead should be reserved now: [`Ahead::Reserving`] was
    /// entered; the caller starts the reservation and ends it with
    /// [`WorkerState::prefetch_ended`].
    pub prefetch: bool,
}

/// What applying a registration record did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Older than the registration applied: ignored.
    Outdated,
    /// Applied; `changed` says the epoch was bumped and ranges dropped.
    Applied { was_registered: bool, changed: bool },
}

/// What became of a reserved range that arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placed {
    /// Served now.
    Current,
    /// Served once the current range cannot serve.
    Ahead,
    /// A registration change overtook the reservation: its rooms would be
    /// aligned to the old dp_size, so they are skipped.
    Overtaken,
}

/// A reservation the state asks for: see [`WorkerState::plan_refill`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefillPlan {
    pub dp_size: DpSize,
    pub revision: i64,
    pub epoch: u64,
    pub want_bases: u64,
    pub need_bases: u64,
}

/// One worker's state: see the module docs.
#[derive(Debug, Clone)]
pub struct WorkerState {
    pub dp_size: DpSize,
    pub registered: bool,
    /// Store revision of the registration in force; older changes are ignored.
    pub revision: i64,
    /// Bumped whenever dp_size or the registration changes.
    pub epoch: u64,
    current: Option<Held>,
    ahead: Ahead,
    pub rooms_issued: u64,
    /// `rooms_issued` when the store was opened (what it already holds).
    pub rooms_issued_at_open: u64,
    range_bases: u64,
    current_since: Instant,
}

impl WorkerState {
    /// A worker not yet registered (its first record is applied next).
    pub fn new(now: Instant) -> Self {
        Self {
            dp_size: DpSize::try_new(1).expect("1 is a valid dp_size"),
            registered: false,
            revision: i64::MIN,
            epoch: 0,
            current: None,
            ahead: Ahead::Empty,
            rooms_issued: 0,
            rooms_issued_at_open: 0,
            range_bases: MIN_RANGE_BASES,
            current_since: now,
        }
    }

    #[cfg_attr(not(test), allow(dead_code))]
    pub fn ahead(&self) -> &Ahead {
        &self.ahead
    }

    /// Applies `record` unless it is older than the registration in force.
    pub fn apply(&mut self, record: &WorkerRecord) -> Applied {
        if record.revision < self.revision {
            // Older than what is applied (a late watch event).
            return Applied::Outdated;
        }
        let was_registered = self.registered;
        self.revision = record.revision;
        let changed = self.dp_size != record.dp_size || was_registered != record.registered;
        if changed {
            self.epoch += 1;
            self.drop_ranges();
            self.dp_size = record.dp_size;
            self.registered = record.registered;
        }
        Applied::Applied {
            was_registered,
            changed,
        }
    }

    /// Takes `count` consecutive bases usable for `validity`, moving on to
    /// the range reserved ahead when the current one cannot serve them. The
    /// rest of a range that cannot is skipped, never reissued.
    pub fn take(&mut self, count: u64, now: Instant, validity: Duration) -> Option<Taken> {
        if self.current.as_ref().is_some_and(|h| h.serve_until <= now) {
            self.current = None;
        }
        if matches!(&self.ahead, Ahead::Reserved(h) if h.serve_until <= now) {
            self.ahead = Ahead::Empty;
        }
        if !self
            .current
            .as_ref()
            .is_some_and(|c| c.can_serve(count, now, validity))
        {
            let Ahead::Reserved(next) = &self.ahead else {
                return None;
            };
            if !next.can_serve(count, now, validity) {
                return None;
            }
            let Ahead::Reserved(next) = std::mem::replace(&mut self.ahead, Ahead::Empty) else {
                return None;
            };
            self.current = Some(next);
            self.current_since = now;
        }
        let current = self.current.as_mut()?;
        let first_base = current.cursor.take_block(count)?;
        let valid_for = current.serve_until.saturating_duration_since(now);
        self.rooms_issued += count;
        let prefetch = self.wants_prefetch();
        if prefetch {
            self.ahead = Ahead::Reserving;
        }
        Some(Taken {
            first_base,
            dp_size: self.dp_size,
            valid_for,
            prefetch,
        })
    }

    /// A reservation ahead (started by [`Taken::prefetch`]) ended, with a
    /// range placed or not.
    pub fn prefetch_ended(&mut self) {
        if matches!(self.ahead, Ahead::Reserving) {
            self.ahead = Ahead::Empty;
        }
    }

    /// True if a range on hand meets `demand`.
    pub fn has(&self, demand: Demand, now: Instant) -> bool {
        let ahead = match &self.ahead {
            Ahead::Reserved(held) => Some(held),
            Ahead::Empty | Ahead::Reserving => None,
        };
        match demand {
            Demand::Bases { count, validity } => [self.current.as_ref(), ahead]
                .into_iter()
                .flatten()
                .any(|held| held.can_serve(count, now, validity)),
            Demand::Prefetch => ahead.is_some(),
        }
    }

    /// True when the current range is half used and nothing is reserved
    /// ahead or being reserved.
    fn wants_prefetch(&self) -> bool {
        let low = self
            .current
            .as_ref()
            .is_none_or(|c| c.remaining() <= c.cursor.range().bases() / 2);
        low && matches!(self.ahead, Ahead::Empty)
    }

    /// The reservation to make for `demand`, or `None` if the worker is not
    /// registered or a range on hand meets it (the caller looks again).
    pub fn plan_refill(&mut self, demand: Demand, now: Instant) -> Option<RefillPlan> {
        if !self.registered || self.has(demand, now) {
            return None;
        }
        let need_bases = match demand {
            Demand::Bases { count, .. } => count,
            Demand::Prefetch => 1,
        };
        Some(RefillPlan {
            dp_size: self.dp_size,
            revision: self.revision,
            epoch: self.epoch,
            want_bases: self.next_range_bases(now).max(need_bases),
            need_bases,
        })
    }

    /// Size of the next range: grows while ranges are used up quickly.
    fn next_range_bases(&mut self, now: Instant) -> u64 {
        let lifetime = now.saturating_duration_since(self.current_since);
        if lifetime < TARGET_RANGE_LIFETIME / 2 {
            // Grow faster the faster the range went: a busy worker reaches
            // its size in a few ranges, not one doubling each.
            let factor = if lifetime < TARGET_RANGE_LIFETIME / 64 {
                8
            } else {
                2
            };
            self.range_bases = self.range_bases.saturating_mul(factor);
        } else if lifetime > TARGET_RANGE_LIFETIME * 4 {
            self.range_bases /= 2;
        }
        let max = (MAX_RANGE_NUMBERS / u64::from(self.dp_size.get())).clamp(1, MAX_RANGE_BASES);
        self.range_bases = self.range_bases.clamp(MIN_RANGE_BASES.min(max), max);
        self.range_bases
    }

    /// A range reserved under `epoch` arrived, to serve until `serve_until`.
    pub fn place(
        &mut self,
        epoch: u64,
        range: RoomRange,
        serve_until: Instant,
        now: Instant,
    ) -> Placed {
        #[cfg(feature = "model-check")]
        let epoch = if crate::model::mutants::active(
            crate::model::mutants::Mutant::RealignOvertakesReservation,
        ) {
            self.epoch
        } else {
            epoch
        };
        if self.epoch != epoch {
            return Placed::Overtaken;
        }
        let held = Held {
            cursor: range.cursor(),
            serve_until,
        };
        match &self.current {
            Some(current) if current.remaining() > 0 => {
                self.ahead = Ahead::Reserved(held);
                Placed::Ahead
            }
            _ => {
                self.current = Some(held);
                self.current_since = now;
                Placed::Current
            }
        }
    }

    fn drop_ranges(&mut self) {
        self.current = None;
        if let Ahead::Reserved(_) = self.ahead {
            self.ahead = Ahead::Empty;
        }
    }

    /// Where the ranges on hand start (they are never pruned).
    pub fn held_starts(&self) -> impl Iterator<Item = u64> + '_ {
        let ahead = match &self.ahead {
            Ahead::Reserved(held) => Some(held),
            Ahead::Empty | Ahead::Reserving => None,
        };
        [self.current.as_ref(), ahead]
            .into_iter()
            .flatten()
            .map(|held| held.cursor.range().start())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::space::Bounds;
    use std::sync::Arc;

    fn record(dp_size: u32, registered: bool, revision: i64) -> WorkerRecord {
        WorkerRecord {
            prefill_worker: Arc::from("w"),
            dp_size: DpSize::try_new(dp_size).expect("valid dp_size"),
            registered,
            revision,
            rooms_issued: 0,
        }
    }

    fn range(after: u64, dp_size: &DpSize, bases: u64) -> RoomRange {
        let bounds = Bounds::try_new(1, 1 << 40).expect("valid bounds");
        RoomRange::reserve_after(after, *dp_size, bases, bases, bounds).expect("fits")
    }

    #[test]
    fn a_realignment_that_overtakes_a_reservation_gets_none_of_its_rooms() {
        let now = Instant::now();
        let mut state = WorkerState::new(now);
        state.apply(&record(2, true, 1));
        let plan = state
            .plan_refill(
                Demand::Bases {
                    count: 1,
                    validity: Duration::ZERO,
                },
                now,
            )
            .expect("a registered worker without ranges refills");
        // Realigned to dp_size 4 while the dp_size-2 reservation is in flight.
        state.apply(&record(4, true, 2));
        let old = range(1, &plan.dp_size, 4);
        let later = now + Duration::from_secs(60);
        assert_eq!(state.place(plan.epoch, old, later, now), Placed::Overtaken);
        assert_eq!(state.take(1, now, Duration::ZERO), None);
    }

    #[test]
    fn an_older_registration_is_ignored() {
        let now = Instant::now();
        let mut state = WorkerState::new(now);
        state.apply(&record(2, true, 5));
        assert_eq!(state.apply(&record(4, true, 3)), Applied::Outdated);
        assert_eq!(state.dp_size.get(), 2);
    }

    #[test]
    fn the_range_ahead_is_reserved_once_half_used_and_served_next() {
        let now = Instant::now();
        let until = now + Duration::from_secs(60);
        let mut state = WorkerState::new(now);
        state.apply(&record(1, true, 1));
        let dp_size = state.dp_size;
        state.place(state.epoch, range(1, &dp_size, 4), until, now);
        let first = state.take(1, now, Duration::ZERO).expect("a base");
        assert!(!first.prefetch, "3 of 4 left: not yet");
        let second = state.take(1, now, Duration::ZERO).expect("a base");
        assert!(second.prefetch, "half used: reserve ahead");
        assert!(matches!(state.ahead(), Ahead::Reserving));
        assert!(
            !state.take(1, now, Duration::ZERO).expect("a base").prefetch,
            "one reservation ahead at a time"
        );
        assert_eq!(
            state.place(state.epoch, range(100, &dp_size, 4), until, now),
            Placed::Ahead
        );
        state.prefetch_ended();
        assert!(matches!(state.ahead(), Ahead::Reserved(_)));
        state.take(1, now, Duration::ZERO).expect("the last base");
        let next = state
            .take(1, now, Duration::ZERO)
            .expect("from the range ahead");
        assert_eq!(next.first_base.get(), 100);
        assert!(matches!(state.ahead(), Ahead::Empty));
    }

    #[test]
    fn no_base_comes_from_a_range_past_its_serve_until() {
        let now = Instant::now();
        let until = now + Duration::from_secs(60);
        let mut state = WorkerState::new(now);
        state.apply(&record(1, true, 1));
        let dp_size = state.dp_size;
        state.place(state.epoch, range(1, &dp_size, 8), until, now);
        assert!(state
            .take(1, until - Duration::from_millis(1), Duration::ZERO)
            .is_some());
        assert_eq!(state.take(1, until, Duration::ZERO), None);
    }
}
