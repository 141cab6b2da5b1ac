//! What the log holds, kept by the writer in memory so a prune request can
//! be decided without reading the log: every range's reservation time and
//! start, and every worker's registration as compaction writes it again.
//! Pure: records in, decisions out; nothing here does I/O.
//!
//! It follows the log record by record exactly as `recovery::Replay` does
//! (the same rules for a worker first seen in a range, a deregistration of
//! an unknown worker, the highest `rooms_issued`), so "nothing is due" here
//! means a compaction would find nothing to drop. It is rebuilt from the
//! replay whenever the files are read back (at open and after a failure),
//! updated only with records that are durable, and changed by a compaction
//! only once its new generation is committed.
//!
//! Cost: about 50 bytes a worker and 25 a range (a worker's name is shared
//! with what the store hands to the allocator), against the whole state
//! replayed a second time that each retention tick used to build.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use super::format::Record;
use super::recovery::Replay;
use crate::space::DpSize;
use crate::store::PruneRequest;

/// A worker as compaction writes it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct HeldWorker {
    pub(super) dp_size: DpSize,
    /// When it was deregistered (wall clock, ms); `None` while registered.
    pub(super) deregistered_unix_ms: Option<u64>,
    pub(super) rooms_issued: u64,
    /// How many of the log's ranges it owns.
    pub(super) ranges: u64,
}

/// The ranges and workers the log holds (see the module docs).
#[derive(Debug, Default)]
pub(super) struct Holdings {
    /// `(created_unix_ms, start)` of every range: oldest first, so finding
    /// one past a cutoff looks only at ranges older than it.
    pub(super) ranges: BTreeSet<(u64, u64)>,
    pub(super) workers: BTreeMap<Arc<str>, HeldWorker>,
    pub(super) pruned_below: u64,
}

/// Whether retention drops a range reserved at `created_unix_ms` starting at
/// `start` (the rule of `RangeTable::prune`: never one still served from).
pub(super) fn range_is_due(request: &PruneRequest, created_unix_ms: u64, start: u64) -> bool {
    created_unix_ms < request.cutoff_unix_ms && !request.held.contains(&start)
}

/// Whether a worker may be forgotten once `dropped` of its ranges are gone:
/// deregistered before the cutoff, and none of its ranges left.
pub(super) fn worker_is_forgettable(
    worker: &HeldWorker,
    cutoff_unix_ms: u64,
    dropped: u64,
) -> bool {
    worker
        .deregistered_unix_ms
        .is_some_and(|at| at < cutoff_unix_ms)
        && worker.ranges <= dropped
}

impl Holdings {
    /// What a replayed log holds.
    pub(super) fn of_replay(replay: &Replay) -> Self {
        let mut holdings = Holdings {
            pruned_below: replay.pruned_below,
            ..Holdings::default()
        };
        for (name, worker) in &replay.workers {
            holdings.workers.insert(
                name.clone(),
                HeldWorker {
                    dp_size: worker.record.dp_size,
                    deregistered_unix_ms: worker.deregistered_unix_ms,
                    rooms_issued: worker.record.rooms_issued,
                    ranges: 0,
                },
            );
        }
        for owner in replay.ranges.iter() {
            holdings
                .ranges
                .insert((owner.created_unix_ms, owner.range.start()));
            if let Some(worker) = holdings.workers.get_mut(&owner.prefill_worker) {
                worker.ranges += 1;
            }
        }
        holdings
    }

    /// Follows one durable record, as `Replay::apply` does.
    pub(super) fn apply(&mut self, record: &Record) {
        match record {
            Record::Register(name, dp_size) => {
                let worker = self.worker(name, *dp_size);
                worker.dp_size = *dp_size;
                worker.deregistered_unix_ms = None;
            }
            Record::Deregister { worker, unix_ms } => {
                if let Some(worker) = self.workers.get_mut(worker) {
                    worker.deregistered_unix_ms = Some(*unix_ms);
                }
            }
            Record::Reserve {
                worker,
                range,
                rooms_issued,
                created_unix_ms,
            } => {
                let entry = self.worker(worker, range.dp_size());
                entry.rooms_issued = entry.rooms_issued.max(*rooms_issued);
                entry.ranges += 1;
                self.ranges.insert((*created_unix_ms, range.start()));
            }
            Record::Issued(worker, rooms_issued) => {
                if let Some(worker) = self.workers.get_mut(worker) {
                    worker.rooms_issued = worker.rooms_issued.max(*rooms_issued);
                }
            }
            Record::Pruned(below) => self.pruned_below = self.pruned_below.max(*below),
            Record::Probe => {}
        }
    }

    /// A worker's entry; one first seen in a range is not registered (as in
    /// `Replay::worker`).
    fn worker(&mut self, name: &Arc<str>, dp_size: DpSize) -> &mut HeldWorker {
        self.workers.entry(name.clone()).or_insert(HeldWorker {
            dp_size,
            deregistered_unix_ms: Some(0),
            rooms_issued: 0,
            ranges: 0,
        })
    }

    /// Whether compacting for `request` would drop anything: a range past
    /// the cutoff that is not held, or a deregistered worker with no range.
    /// Looks only at ranges older than the cutoff (oldest first) and, when
    /// none is due, at the workers.
    pub(super) fn prune_due(&self, request: &PruneRequest) -> bool {
        let range_due = self
            .ranges
            .iter()
            .take_while(|(created, _)| *created < request.cutoff_unix_ms)
            .any(|&(created, start)| range_is_due(request, created, start));
        range_due
            || self
                .workers
                .values()
                .any(|worker| worker_is_forgettable(worker, request.cutoff_unix_ms, 0))
    }

    /// Once a compaction's generation is committed: what it dropped is gone.
    pub(super) fn compacted(
        &mut self,
        request: &PruneRequest,
        dropped: &HashMap<Arc<str>, u64>,
        forgotten: &[Arc<str>],
        pruned_below: u64,
    ) {
        self.ranges
            .retain(|&(created, start)| !range_is_due(request, created, start));
        for (name, count) in dropped {
            if let Some(worker) = self.workers.get_mut(name) {
                worker.ranges = worker.ranges.saturating_sub(*count);
            }
        }
        for name in forgotten {
            self.workers.remove(name);
        }
        self.pruned_below = self.pruned_below.max(pruned_below);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::space::RoomRange;

    fn dp(n: u32) -> DpSize {
        DpSize::try_new(n).expect("valid dp_size")
    }

    fn request(cutoff_unix_ms: u64, held: &[u64]) -> PruneRequest {
        PruneRequest {
            cutoff_unix_ms,
            held: held.iter().copied().collect(),
        }
    }

    fn reserve(worker: &str, start: u64, created_unix_ms: u64) -> Record {
        Record::Reserve {
            worker: Arc::from(worker),
            range: RoomRange::from_parts(start, start + 4, dp(2)).expect("aligned range"),
            rooms_issued: 3,
            created_unix_ms,
        }
    }

    /// The workers a compaction for `cutoff_unix_ms` forgets, given how many
    /// ranges of each it dropped (what `compaction` decides per worker).
    fn forgettable(
        holdings: &Holdings,
        cutoff_unix_ms: u64,
        dropped: &HashMap<Arc<str>, u64>,
    ) -> Vec<Arc<str>> {
        holdings
            .workers
            .iter()
            .filter(|(name, worker)| {
                let dropped = dropped.get(*name).copied().unwrap_or(0);
                worker_is_forgettable(worker, cutoff_unix_ms, dropped)
            })
            .map(|(name, _)| name.clone())
            .collect()
    }

    fn holdings(records: &[Record]) -> Holdings {
        let mut holdings = Holdings::default();
        for record in records {
            holdings.apply(record);
        }
        holdings
    }

    #[test]
    fn nothing_is_due_when_every_range_is_younger_than_the_cutoff() {
        let held = holdings(&[
            Record::Register(Arc::from("w"), dp(2)),
            reserve("w", 2, 1_000),
            reserve("w", 6, 2_000),
        ]);
        assert!(!held.prune_due(&request(1_000, &[])));
        assert!(held.prune_due(&request(1_001, &[])));
    }

    #[test]
    fn a_held_range_past_the_cutoff_is_not_due_but_one_beside_it_is() {
        let held = holdings(&[reserve("w", 2, 10), reserve("w", 6, 20)]);
        assert!(!held.prune_due(&request(15, &[2])));
        assert!(!held.prune_due(&request(u64::MAX, &[2, 6])));
        assert!(held.prune_due(&request(u64::MAX, &[2])));
    }

    #[test]
    fn a_deregistered_worker_is_due_only_without_ranges_and_past_the_cutoff() {
        let mut held = holdings(&[
            Record::Register(Arc::from("w"), dp(2)),
            Record::Deregister {
                worker: Arc::from("w"),
                unix_ms: 100,
            },
        ]);
        assert!(!held.prune_due(&request(100, &[])), "not before the cutoff");
        assert!(held.prune_due(&request(101, &[])));
        assert_eq!(
            forgettable(&held, 101, &HashMap::new()),
            vec![Arc::<str>::from("w")]
        );
        // A range it owns (young, or held) keeps it.
        held.apply(&reserve("w", 2, 500));
        assert!(!held.prune_due(&request(101, &[])));
        assert!(forgettable(&held, 101, &HashMap::new()).is_empty());
        // Registered again: never forgotten.
        held.apply(&Record::Register(Arc::from("w"), dp(2)));
        assert!(!held.prune_due(&request(u64::MAX, &[2])));
    }

    #[test]
    fn a_deregistration_of_an_unknown_worker_is_ignored_as_replay_does() {
        let held = holdings(&[Record::Deregister {
            worker: Arc::from("stranger"),
            unix_ms: 1,
        }]);
        assert!(held.workers.is_empty());
        assert!(!held.prune_due(&request(u64::MAX, &[])));
    }

    #[test]
    fn a_worker_first_seen_in_a_range_counts_as_deregistered_at_zero() {
        let mut held = holdings(&[reserve("w", 2, 50)]);
        let worker = held.workers[&Arc::<str>::from("w")];
        assert_eq!(worker.deregistered_unix_ms, Some(0));
        assert_eq!(worker.rooms_issued, 3);
        let req = request(100, &[]);
        let dropped = HashMap::from([(Arc::<str>::from("w"), 1)]);
        let forgotten = forgettable(&held, 100, &dropped);
        assert_eq!(forgotten, vec![Arc::<str>::from("w")]);
        held.compacted(&req, &dropped, &forgotten, 6);
        assert!(held.ranges.is_empty());
        assert!(held.workers.is_empty());
        assert_eq!(held.pruned_below, 6);
        assert!(!held.prune_due(&req), "nothing is due once compacted");
    }

    #[test]
    fn compacting_keeps_what_is_young_or_held() {
        let mut held = holdings(&[
            Record::Register(Arc::from("w"), dp(2)),
            reserve("w", 2, 10),
            reserve("w", 6, 10),
            reserve("w", 10, 30),
            Record::Issued(Arc::from("w"), 9),
        ]);
        let req = request(20, &[6]);
        assert!(held.prune_due(&req));
        let dropped = HashMap::from([(Arc::<str>::from("w"), 1)]);
        held.compacted(&req, &dropped, &[], 6);
        assert_eq!(
            held.ranges.iter().copied().collect::<Vec<_>>(),
            [(10, 6), (30, 10)]
        );
        let worker = held.workers[&Arc::<str>::from("w")];
        assert_eq!((worker.ranges, worker.rooms_issued), (2, 9));
        assert!(!held.prune_due(&req));
    }
}
