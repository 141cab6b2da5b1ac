//! Rooms known to lie in no range, so repeated ResolveRank misses skip etcd.
//!
//! Invariant: only a final miss is cached (below the mark and outside every
//! chunk: ranges are only carved from chunks, and chunks only above the
//! mark), so a cached miss never hides a range; bounded, oldest first out.

use std::collections::{HashMap, VecDeque};

/// Rooms remembered as not in any range, so repeated misses skip etcd.
pub(super) const NEGATIVE_CACHE: usize = 65_536;

/// Rooms known to lie in no range, with whether they are older than every
/// live range; bounded, oldest entries go first.
#[derive(Default)]
pub(super) struct NegativeCache {
    rooms: HashMap<u64, bool>,
    order: VecDeque<u64>,
}

impl NegativeCache {
    pub(super) fn get(&self, room: u64) -> Option<bool> {
        self.rooms.get(&room).copied()
    }

    pub(super) fn insert(&mut self, room: u64, below_oldest: bool) {
        if self.rooms.insert(room, below_oldest).is_none() {
            self.order.push_back(room);
            if self.order.len() > NEGATIVE_CACHE {
                if let Some(old) = self.order.pop_front() {
                    self.rooms.remove(&old);
                }
            }
        }
    }
}
