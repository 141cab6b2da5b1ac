//! The chunk carver's decisions, apart from the I/O that drives them: which
//! request to send next (read the mark, take a chunk with one
//! compare-and-swap), what a reply means (taken, beaten, unknown), how big
//! the next chunk is, and whether a mark read from etcd can be trusted.
//!
//! Pure: time comes in as milliseconds since the store's epoch, replies come
//! in as events, and nothing here waits or talks to etcd. The reservation
//! task of the server's etcd store (`room_allocator::store::etcd`) drives
//! it; a model checker can drive the same code.
//!
//! Invariants it keeps:
//! - A range is carved only from a chunk this replica took with a
//!   compare-and-swap that committed (never from one of unknown outcome),
//!   only while the chunk is younger than its lifetime, and only under the
//!   lease the chunk was announced with.
//! - A chunk starts at the mark as last read and ends above it, so the mark
//!   this replica writes only rises.
//! - A mark read below what this replica already used (its own chunks, or an
//!   announced chunk or range read with the mark) is refused: it was deleted
//!   or rewritten, and carving from it would reissue rooms.

use crate::space::{Bounds, DpSize, RoomRange, SpaceError};

/// The high-water mark as etcd held it: its value and the mod revision the
/// next compare-and-swap compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mark {
    pub value: u64,
    pub revision: i64,
}

/// A read of the mark, with the highest end of what was announced with it
/// (the highest chunk, the first range at or above the mark).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MarkRead {
    pub mark: Mark,
    pub highest_announced: u64,
}

/// A mark below the space already reserved: see [`check_mark`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MarkWentBack {
    pub mark: u64,
    pub used: u64,
}

/// The mark of `read`, if it lies at or above `used` (the end of the space
/// this replica saw reserved) and above everything announced with it.
pub fn check_mark(read: MarkRead, used: u64) -> Result<Mark, MarkWentBack> {
    #[cfg(feature = "model-check")]
    if crate::model::mutants::active(crate::model::mutants::Mutant::MarkLoweredAccepted) {
        return Ok(read.mark);
    }
    let used = used.max(read.highest_announced);
    if read.mark.value < used {
        return Err(MarkWentBack {
            mark: read.mark.value,
            used,
        });
    }
    Ok(read.mark)
}

/// A part of the space this replica took with one compare-and-swap on the
/// high-water mark, and carves ranges from: replicas contend for the mark
/// once a chunk, not once a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    pub start: u64,
    /// Where the next range may start.
    pub next: u64,
    /// Exclusive end.
    pub end: u64,
    /// When the request that took it was sent (ms since the store's epoch).
    pub taken_at_ms: u64,
    /// The lease of its announcement, which every range carved from it gets
    /// too: the announcement never expires before those ranges, so the
    /// highest chunk read with the mark covers every live range.
    pub lease: i64,
}

/// What one reservation needs from the carver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Need {
    pub dp_size: DpSize,
    /// Bases wanted; fewer are fine near the end of the space...
    pub want_bases: u64,
    /// ...but never fewer than this.
    pub need_bases: u64,
}

/// The compare-and-swap to send for a chunk: put `high_water = end` and
/// announce `[start, end)` under `lease`, if the mark is still `mark`
/// (value and revision) and no range lies at or above it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRequest {
    pub mark: Mark,
    pub start: u64,
    pub end: u64,
    pub lease: i64,
    pub sent_at_ms: u64,
}

/// What the carver asks for next, for one reservation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// A range carved from the chunk: record it (under the chunk's lease).
    Range(RoomRange),
    /// The space (bounds) cannot hold it.
    Full(SpaceError),
    /// Read the mark (and what was announced above it), then
    /// [`Carver::mark_read`].
    ReadMark,
    /// Send this compare-and-swap, then [`Carver::chunk_reply`].
    TakeChunk(ChunkRequest),
}

/// etcd's answer to a [`ChunkRequest`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkReply {
    /// Committed at this revision.
    Taken { revision: i64 },
    /// The compare failed; the mark as read in the same transaction,
    /// checked by [`check_mark`] (`None`: not read, read it again).
    Beaten { mark: Option<Mark> },
    /// The announcement's lease expired: nothing was written.
    LeaseNotFound,
    /// Timeout or lost connection: it may or may not have committed.
    Unknown,
}

/// What a [`ChunkReply`] means for the reservation that asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkOutcome {
    /// The chunk is this replica's: carve again.
    Taken,
    /// Another replica moved the mark first, or the lease is gone: try
    /// again later.
    Lost,
    /// Unknown outcome: the reservation fails (the chunk is never used).
    Failed,
}

/// The carver's fixed settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CarverConfig {
    pub bounds: Bounds,
    /// How long a chunk serves (at most the retention, so its announcement,
    /// on a lease of twice that, outlives the carving).
    pub lifetime_ms: u64,
    /// Chunk sizes, in numbers of the space.
    pub min_size: u64,
    pub max_size: u64,
}

/// The reservation task's state: the mark as last seen, and the chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Carver {
    config: CarverConfig,
    mark: Option<Mark>,
    chunk: Option<Chunk>,
    /// Numbers the next chunk takes (at least what its first range needs),
    /// between `min_size` and `max_size`.
    chunk_size: u64,
}

impl Carver {
    /// A carver that knows the mark as loaded at start (if any).
    pub fn new(config: CarverConfig, mark: Option<Mark>) -> Self {
        Self {
            config,
            mark,
            chunk: None,
            chunk_size: config.min_size,
        }
    }

    #[cfg(test)]
    pub fn chunk(&self) -> Option<&Chunk> {
        self.chunk.as_ref()
    }

    #[cfg(test)]
    pub fn mark(&self) -> Option<Mark> {
        self.mark
    }

    /// The next step for `need`, with ranges under `lease` at `now_ms`.
    pub fn carve(&mut self, need: Need, lease: i64, now_ms: u64) -> Step {
        if let Some(chunk) = self.chunk.take() {
            // Ended by age, or by the bucket's lease changing (ranges now
            // get the new lease, which the chunk's announcement lacks).
            let age_ms = now_ms.saturating_sub(chunk.taken_at_ms);
            #[cfg(feature = "model-check")]
            let lease = if crate::model::mutants::active(
                crate::model::mutants::Mutant::RangeOutlivesChunkLease,
            ) {
                chunk.lease
            } else {
                lease
            };
            if chunk.lease != lease || age_ms >= self.config.lifetime_ms {
                if chunk.next - chunk.start < (chunk.end - chunk.start) / 2 {
                    self.chunk_size = (self.chunk_size / 2).max(self.config.min_size);
                }
            } else {
                let inside =
                    Bounds::try_new(chunk.next.max(self.config.bounds.min_room()), chunk.end - 1);
                if let Some(range) = inside.ok().and_then(|inside| {
                    RoomRange::reserve_after(
                        chunk.next,
                        need.dp_size,
                        need.want_bases,
                        need.need_bases,
                        inside,
                    )
                    .ok()
                }) {
                    self.chunk = Some(Chunk {
                        next: range.end(),
                        ..chunk
                    });
                    return Step::Range(range);
                }
                // Used up before it expired: demand outgrew the size.
                self.chunk_size = self.chunk_size.saturating_mul(2).min(self.config.max_size);
            }
        }
        let Some(mark) = self.mark else {
            return Step::ReadMark;
        };
        let bounds = self.config.bounds;
        let start = mark.value.max(bounds.min_room());
        // The space above the mark must hold this reservation's need (with
        // another replica's larger --max-room, the mark may lie above ours).
        #[cfg(feature = "model-check")]
        if crate::model::mutants::active(crate::model::mutants::Mutant::MarkWrittenDown) {
            return Step::TakeChunk(ChunkRequest {
                mark,
                start,
                end: start.saturating_add(self.chunk_size).min(bounds.end()),
                lease,
                sent_at_ms: now_ms,
            });
        }
        let needed = match RoomRange::reserve_after(
            start,
            need.dp_size,
            need.need_bases,
            need.need_bases,
            bounds,
        ) {
            Ok(needed) => needed,
            Err(error) => return Step::Full(error),
        };
        // A new chunk, big enough for this range...
        let numbers = need
            .want_bases
            .saturating_add(1)
            .saturating_mul(u64::from(need.dp_size.get()))
            .max(self.chunk_size);
        // ...and at least the needed range, so the mark only ever rises.
        let end = start
            .saturating_add(numbers)
            .min(bounds.end())
            .max(needed.end());
        Step::TakeChunk(ChunkRequest {
            mark,
            start,
            end,
            lease,
            sent_at_ms: now_ms,
        })
    }

    /// The mark was read (and passed [`check_mark`]).
    pub fn mark_read(&mut self, mark: Mark) {
        self.mark = Some(mark);
    }

    /// etcd answered `request`.
    pub fn chunk_reply(&mut self, request: ChunkRequest, reply: ChunkReply) -> ChunkOutcome {
        match reply {
            ChunkReply::Taken { revision } => {
                self.mark = Some(Mark {
                    value: request.end,
                    revision,
                });
                self.chunk = Some(Chunk {
                    start: request.start,
                    next: request.start,
                    end: request.end,
                    // Timed from before the request: the lease was granted
                    // earlier still, so the announcement outlives the carving.
                    taken_at_ms: request.sent_at_ms,
                    lease: request.lease,
                });
                ChunkOutcome::Taken
            }
            ChunkReply::Beaten { mark } => {
                self.mark = mark;
                ChunkOutcome::Lost
            }
            ChunkReply::LeaseNotFound => ChunkOutcome::Lost,
            #[cfg(feature = "model-check")]
            ChunkReply::Unknown
                if crate::model::mutants::active(
                    crate::model::mutants::Mutant::UnknownOutcomeReused,
                ) =>
            {
                self.chunk_reply(
                    request,
                    ChunkReply::Taken {
                        revision: request.mark.revision,
                    },
                )
            }
            ChunkReply::Unknown => {
                // Never used: reread the mark next time.
                self.mark = None;
                self.chunk = None;
                ChunkOutcome::Failed
            }
        }
    }

    /// Reading the mark failed, or it was refused: read it again next time.
    pub fn forget_mark(&mut self) {
        self.mark = None;
    }
}

/// What became of one reservation in a transaction that recorded ranges
/// only if every worker's registration still had the revision reserved for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordVerdict {
    /// Recorded: the range is the caller's.
    Recorded,
    /// Its worker was unchanged (another's changed): carve again.
    Retry,
    /// Its worker's registration changed: the caller follows the change.
    Stale,
}

/// The verdicts of a range transaction: `succeeded`, or else for each
/// reservation the revision it was made for and its worker's revision as
/// read in the failure branch (`None`: the key is gone).
pub fn record_verdicts(
    succeeded: bool,
    reserved_for: &[i64],
    current: &[Option<i64>],
) -> Vec<RecordVerdict> {
    reserved_for
        .iter()
        .enumerate()
        .map(|(i, &revision)| {
            if succeeded {
                RecordVerdict::Recorded
            } else if current.get(i).copied().flatten() == Some(revision) {
                RecordVerdict::Retry
            } else {
                RecordVerdict::Stale
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> CarverConfig {
        CarverConfig {
            bounds: Bounds::try_new(1, 1 << 40).expect("valid bounds"),
            lifetime_ms: 60_000,
            min_size: 64,
            max_size: 1024,
        }
    }

    fn need(dp_size: u32, bases: u64) -> Need {
        Need {
            dp_size: DpSize::try_new(dp_size).expect("valid dp_size"),
            want_bases: bases,
            need_bases: bases,
        }
    }

    fn take(carver: &mut Carver, need: Need, lease: i64, now_ms: u64, revision: i64) -> u64 {
        let mut step = carver.carve(need, lease, now_ms);
        if step == Step::ReadMark {
            carver.mark_read(Mark {
                value: 1,
                revision: 1,
            });
            step = carver.carve(need, lease, now_ms);
        }
        let Step::TakeChunk(request) = step else {
            panic!("expected a chunk request, got {step:?}");
        };
        assert_eq!(
            carver.chunk_reply(request, ChunkReply::Taken { revision }),
            ChunkOutcome::Taken
        );
        request.end
    }

    #[test]
    fn a_chunk_starts_at_the_mark_and_the_next_mark_is_its_end() {
        let mut carver = Carver::new(config(), None);
        assert_eq!(carver.carve(need(4, 4), 7, 0), Step::ReadMark);
        carver.mark_read(Mark {
            value: 100,
            revision: 3,
        });
        let Step::TakeChunk(request) = carver.carve(need(4, 4), 7, 0) else {
            panic!("no chunk request");
        };
        assert_eq!(request.start, 100);
        assert!(request.end > request.start, "the mark must rise");
        carver.chunk_reply(request, ChunkReply::Taken { revision: 9 });
        assert_eq!(
            carver.mark(),
            Some(Mark {
                value: request.end,
                revision: 9
            })
        );
        let Step::Range(range) = carver.carve(need(4, 4), 7, 10) else {
            panic!("no range from the chunk");
        };
        assert!(range.start() >= 100 && range.end() <= request.end);
    }

    #[test]
    fn a_chunk_of_unknown_outcome_is_never_carved_and_the_mark_is_read_again() {
        let mut carver = Carver::new(
            config(),
            Some(Mark {
                value: 1,
                revision: 1,
            }),
        );
        let Step::TakeChunk(request) = carver.carve(need(2, 2), 7, 0) else {
            panic!("no chunk request");
        };
        assert_eq!(
            carver.chunk_reply(request, ChunkReply::Unknown),
            ChunkOutcome::Failed
        );
        assert_eq!(carver.chunk(), None);
        assert_eq!(carver.carve(need(2, 2), 7, 0), Step::ReadMark);
    }

    #[test]
    fn no_range_outlives_its_chunk_lifetime_or_lease() {
        let mut carver = Carver::new(config(), None);
        take(&mut carver, need(1, 1), 7, 0, 2);
        assert!(matches!(
            carver.carve(need(1, 1), 7, 59_999),
            Step::Range(_)
        ));
        assert!(
            matches!(carver.carve(need(1, 1), 7, 60_000), Step::TakeChunk(_)),
            "carved from an expired chunk"
        );
        take(&mut carver, need(1, 1), 7, 60_000, 3);
        assert!(
            matches!(carver.carve(need(1, 1), 8, 60_001), Step::TakeChunk(_)),
            "carved under a lease the chunk was not announced with"
        );
    }

    #[test]
    fn chunks_double_while_used_up_and_halve_while_mostly_unused() {
        let mut carver = Carver::new(config(), None);
        let end = take(&mut carver, need(1, 64), 7, 0, 2);
        assert_eq!(end, 1 + 65, "first chunk: one range's worth");
        assert!(matches!(carver.carve(need(1, 64), 7, 1), Step::Range(_)));
        // Used up: the next one doubles.
        let Step::TakeChunk(request) = carver.carve(need(1, 64), 7, 1) else {
            panic!("no chunk request");
        };
        assert_eq!(request.end - request.start, 128);
        carver.chunk_reply(request, ChunkReply::Taken { revision: 3 });
        // Expired almost unused: the next one halves.
        let Step::TakeChunk(request) = carver.carve(need(1, 1), 7, 60_001) else {
            panic!("no chunk request");
        };
        assert_eq!(request.end - request.start, 64);
    }

    #[test]
    fn a_beaten_swap_rereads_or_reuses_the_mark_read_with_it() {
        let mut carver = Carver::new(
            config(),
            Some(Mark {
                value: 1,
                revision: 1,
            }),
        );
        let Step::TakeChunk(request) = carver.carve(need(1, 1), 7, 0) else {
            panic!("no chunk request");
        };
        let seen = Mark {
            value: 500,
            revision: 4,
        };
        assert_eq!(
            carver.chunk_reply(request, ChunkReply::Beaten { mark: Some(seen) }),
            ChunkOutcome::Lost
        );
        let Step::TakeChunk(request) = carver.carve(need(1, 1), 7, 0) else {
            panic!("no chunk request");
        };
        assert_eq!(request.mark, seen);
        assert_eq!(request.start, 500);
        carver.chunk_reply(request, ChunkReply::Beaten { mark: None });
        assert_eq!(carver.carve(need(1, 1), 7, 0), Step::ReadMark);
    }

    #[test]
    fn a_mark_below_what_was_used_or_announced_is_refused() {
        let mark = Mark {
            value: 100,
            revision: 5,
        };
        let read = |highest_announced| MarkRead {
            mark,
            highest_announced,
        };
        assert_eq!(check_mark(read(100), 100), Ok(mark));
        assert_eq!(
            check_mark(read(0), 101),
            Err(MarkWentBack {
                mark: 100,
                used: 101
            }),
            "below this replica's own chunk"
        );
        assert_eq!(
            check_mark(read(150), 0),
            Err(MarkWentBack {
                mark: 100,
                used: 150
            }),
            "below another replica's announced chunk"
        );
    }

    #[test]
    fn a_realignment_in_the_same_transaction_is_stale_and_the_others_retry() {
        assert_eq!(
            record_verdicts(false, &[3, 4, 5], &[Some(3), Some(9), None]),
            vec![
                RecordVerdict::Retry,
                RecordVerdict::Stale,
                RecordVerdict::Stale
            ]
        );
        assert_eq!(
            record_verdicts(true, &[3], &[]),
            vec![RecordVerdict::Recorded]
        );
    }
}
