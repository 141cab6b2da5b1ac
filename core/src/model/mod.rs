//! The multi-replica protocol, model-checked: [stateright] explores every
//! interleaving (breadth first, so a violation comes with its shortest
//! trace) of replicas running the production's pure core
//! ([`Carver`](crate::etcd::carver::Carver) and
//! [`check_mark`](crate::etcd::carver::check_mark) for chunks,
//! [`WatchProgress`](crate::etcd::watch::WatchProgress) for the
//! registration watch, the allocator's
//! [`WorkerState`](crate::worker::WorkerState)) against an
//! abstract etcd. Compiled with the `model-check` feature only; run it with
//! `scripts/model-check.sh`.
//!
//! What it explores, within small bounds (one worker, two replicas with
//! different --max-room, chunks and ranges of a few numbers, a logical
//! clock of a few ticks):
//! - etcd: compare-and-swap transactions (the mark's value and revision, no
//!   range at or above it; a range only if the worker's registration
//!   revision is unchanged), leases that expire with their records, a
//!   compaction, transactions of unknown outcome (committed or not), a
//!   member that loses its leader (its watch stops at its revision, it
//!   answers progress requests from there, it cannot answer a quorum read),
//!   a hand rewrite of the mark below what was reserved;
//! - the watch: events delivered late, a stream that breaks and resumes from
//!   [`WatchProgress::resume_after`], a progress notification that overtakes
//!   a new watch's catch-up events (etcd 3.4.23) and the catch-up read that
//!   guards against it ([`WatchProgress::created`] and
//!   [`WatchProgress::caught_up`]: until it is applied, no progress
//!   confirms);
//! - replicas: reserve (plan, carve, record, place, each a step, so
//!   realignments and other replicas interleave), allocate, confirm their
//!   view, crash (losing memory) and restart from etcd;
//! - a realignment of the worker's dp_size;
//! - a deregistration (in its own scope, [`Bounded::DEREGISTRATION`]: two
//!   replicas reading different retentions), step by step as
//!   `deregister_worker` takes it: read the worker's range leases and
//!   grant the record's lease, write the record, look again at ranges
//!   written since the read and extend the lease to cover what is left of
//!   it ([`extension_secs`], the production's decision); until that look
//!   is done the call is unanswered and its caller retries it, on any
//!   replica, which deregisters the worker again.
//!
//! Properties, on every state: no number issued twice; every room aligned
//! to the dp_size it was returned with; ResolveRank reports that dp_size;
//! every acknowledged room resolves within retention; the mark only rises
//! (except by the hand rewrite); after a realignment, no replica serves a
//! room of the old dp_size once the staleness window has passed; a
//! deregistered worker's record outlives its ranges (once its
//! DeregisterWorker succeeded), and no replica serves it a room once the
//! staleness window has passed.
//!
//! [stateright]: https://docs.rs/stateright

pub mod mutants;

use std::fmt::Write as _;
use std::hash::{Hash, Hasher};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use stateright::{Checker, Model, Property};

use crate::etcd::carver::{
    check_mark, Carver, CarverConfig, ChunkOutcome, ChunkReply, Mark, MarkRead, Need, Step,
};
use crate::etcd::deregistration::extension_secs;
use crate::etcd::watch::WatchProgress;
use crate::record::WorkerRecord;
use crate::space::{Bounds, DpSize, RoomRange, SPACE_START};
use crate::worker::{Demand, Placed, RefillPlan, WorkerState};

use self::mutants::Mutant;

/// Milliseconds per tick of the logical clock.
const TICK_MS: u64 = 1000;
/// The retention, in ticks: a range serves this long after it is planned
/// (longer than the staleness window, as in production).
const RETENTION: u64 = 3;
/// How long one lease serves new records (the production's bucket).
const BUCKET: u64 = 1;
/// A lease's TTL: twice the retention plus the bucket, as in production.
fn lease_ttl(retention: u64) -> u64 {
    2 * retention + BUCKET
}
/// The staleness window, in ticks.
const STALENESS: u64 = 1;
/// Bases a range asks for (production asks for 1024 or more; the size of a
/// range is no part of the protocol's safety).
const RANGE_BASES: u64 = 2;
/// The dp_size before and after the realignment.
const DP_BEFORE: u32 = 2;
const DP_AFTER: u32 = 3;
/// --max-room of the two replicas: the first lies below what the second
/// may reserve, as after a misconfigured rollout.
const TWO_REPLICAS: &[u64] = &[4, 24];
const ONE_REPLICA: &[u64] = &[24];
/// The deregistration's scope: the deregistering replica (1) reads a
/// shorter retention than the one that reserved ranges (0), as after the
/// fleet's retention was lowered.
const DEREGISTRATION_RETENTIONS: &[u64] = &[RETENTION, 1];
const WORKER: &str = "w";

/// How deep and how wide a check goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounded {
    pub depth: usize,
    /// Ticks of the logical clock.
    pub ticks: u64,
    /// Rooms allocated in all.
    pub allocations: usize,
    /// --max-room of each replica.
    pub max_rooms: &'static [u64],
    /// The retention each replica reads (ticks); empty: [`RETENTION`].
    pub retentions: &'static [u64],
    /// How many of each fault may happen: crash, watch break, leader loss,
    /// compaction, realignment, hand rewrite of the mark, deregistration.
    pub faults: [u8; 7],
    /// Only the last replica deregisters, it reserves nothing, and its
    /// second look runs in the step of its write (neither fails nor waits):
    /// the scope where only a missing second look loses the record early.
    pub prompt_deregistration: bool,
}

impl Bounded {
    /// The bounded check of the test command: every fault, two replicas.
    pub const DEFAULT: Bounded = Bounded {
        depth: 8,
        ticks: 4,
        allocations: 2,
        max_rooms: TWO_REPLICAS,
        retentions: &[],
        faults: [1, 2, 1, 1, 1, 1, 0],
        prompt_deregistration: false,
    };
    /// The deregistration's own scope (the test command runs it too): a
    /// replica deregisters the worker while the other reserves, with a
    /// longer retention, and both crash, break watches and confirm.
    pub const DEREGISTRATION: Bounded = Bounded {
        depth: 9,
        ticks: 4,
        allocations: 1,
        max_rooms: &[24, 24],
        retentions: DEREGISTRATION_RETENTIONS,
        faults: [1, 0, 0, 0, 0, 0, 1],
        prompt_deregistration: false,
    };
    /// `--long`.
    pub const LONG: Bounded = Bounded {
        depth: 10,
        ticks: 6,
        allocations: 3,
        max_rooms: TWO_REPLICAS,
        retentions: &[],
        faults: [1, 2, 1, 1, 1, 1, 0],
        prompt_deregistration: false,
    };

    /// The scope a mutant's defect lives in: the faults it needs, deep
    /// enough for its shortest trace (every other fault off keeps the
    /// breadth-first search small enough to reach that depth).
    pub fn for_mutant(mutant: Mutant) -> Bounded {
        let only = |faults: [u8; 6], depth, ticks, allocations, max_rooms| Bounded {
            depth,
            ticks,
            allocations,
            max_rooms,
            retentions: &[],
            faults: [
                faults[0], faults[1], faults[2], faults[3], faults[4], faults[5], 0,
            ],
            prompt_deregistration: false,
        };
        match mutant {
            Mutant::RealignOvertakesReservation => only([0, 0, 0, 0, 1, 0], 9, 0, 1, ONE_REPLICA),
            Mutant::MarkWrittenDown => only([0; 6], 10, 0, 0, TWO_REPLICAS),
            Mutant::MarkLoweredAccepted => only([0, 0, 0, 0, 0, 1], 12, 0, 3, ONE_REPLICA),
            Mutant::RangeOutlivesChunkLease => only([0; 6], 12, 1, 2, ONE_REPLICA),
            Mutant::ConfirmWithoutLeader => only([0, 0, 1, 0, 1, 0], 13, 3, 1, ONE_REPLICA),
            Mutant::ResumePastUnappliedEvents => only([0, 2, 0, 0, 1, 0], 15, 2, 1, ONE_REPLICA),
            Mutant::UnknownOutcomeReused => only([0; 6], 12, 0, 2, TWO_REPLICAS),
            Mutant::ProgressOvertakesCatchUp => only([0, 1, 0, 0, 1, 0], 13, 3, 1, ONE_REPLICA),
            Mutant::DeregistrationWithoutSecondLook => Bounded {
                depth: 10,
                ticks: 3,
                allocations: 0,
                faults: [0, 0, 0, 0, 0, 0, 1],
                prompt_deregistration: true,
                ..Bounded::DEREGISTRATION
            },
        }
    }

    /// The retention replica `r` reads, in ticks.
    fn retention(&self, r: usize) -> u64 {
        self.retentions.get(r).copied().unwrap_or(RETENTION)
    }
}

/// The protocol model.
#[derive(Debug, Clone)]
pub struct Protocol {
    pub bounds: Bounded,
}

/// A record on a lease: a chunk announcement or a range.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    start: u64,
    end: u64,
    /// The range's dp_size (0 for a chunk).
    dp_size: u32,
    lease: i64,
    /// The revision that wrote it.
    revision: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Etcd {
    revision: i64,
    mark: Mark,
    /// The highest mark a transaction ever wrote.
    highest_mark: u64,
    chunks: Vec<Record>,
    ranges: Vec<Record>,
    /// Leases and the tick they expire at.
    leases: Vec<(i64, u64)>,
    next_lease: i64,
    /// The worker's registrations: (revision, dp_size, registered), oldest
    /// first.
    registrations: Vec<(i64, u32, bool)>,
    /// The lease of the worker's record, once deregistered.
    worker_lease: Option<i64>,
    /// The deregistered record expired: the worker is forgotten.
    forgotten: bool,
    /// The tick the worker was first deregistered.
    deregistered_at: Option<u64>,
    /// Revisions at or below this were compacted.
    compacted: i64,
    /// The tick a realignment was applied, and the dp_size before it.
    realigned: Option<(u64, u32)>,
    hand_rewritten: bool,
}

impl Etcd {
    fn registration(&self) -> (i64, u32, bool) {
        let (revision, dp_size, registered) = self
            .registrations
            .last()
            .copied()
            .unwrap_or((0, DP_BEFORE, false));
        (revision, dp_size, registered && !self.forgotten)
    }

    /// When `lease` expires, if it is alive.
    fn lease_expiry(&self, lease: i64) -> Option<u64> {
        self.leases
            .iter()
            .find(|&&(id, _)| id == lease)
            .map(|&(_, at)| at)
    }

    /// The longest remaining TTL of the worker's ranges written after
    /// revision `after` (`longest_range_lease_secs`).
    fn longest_range_lease(&self, after: i64, now: u64) -> u64 {
        self.ranges
            .iter()
            .filter(|r| r.revision > after)
            .filter_map(|r| self.lease_expiry(r.lease))
            .map(|at| at.saturating_sub(now))
            .max()
            .unwrap_or(0)
    }

    fn highest_chunk_end(&self) -> u64 {
        self.chunks.iter().map(|c| c.end).max().unwrap_or(0)
    }

    fn highest_record_end(&self) -> u64 {
        self.ranges
            .iter()
            .map(|r| r.end)
            .max()
            .unwrap_or(0)
            .max(self.highest_chunk_end())
    }

    fn lease_alive(&self, lease: i64) -> bool {
        self.leases.iter().any(|&(id, _)| id == lease)
    }

    /// What a mark read returns: the mark and the highest chunk (and, after
    /// a failed swap, the first range at or above the mark).
    fn mark_read(&self, with_range_above: bool) -> MarkRead {
        let mut highest_announced = self.highest_chunk_end();
        if with_range_above {
            if let Some(range) = self
                .ranges
                .iter()
                .filter(|r| r.start >= self.mark.value)
                .min_by_key(|r| r.start)
            {
                highest_announced = highest_announced.max(range.end);
            }
        }
        MarkRead {
            mark: self.mark,
            highest_announced,
        }
    }

    fn record(&self) -> WorkerRecord {
        let (revision, dp_size, registered) = self.registration();
        WorkerRecord {
            prefill_worker: WORKER.into(),
            dp_size: dp(dp_size),
            registered,
            revision,
            rooms_issued: 0,
        }
    }
}

/// A reservation in flight, step by step.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Inflight {
    Idle,
    Planned {
        plan: RefillPlan,
        serve_until: u64,
    },
    Carved {
        plan: RefillPlan,
        range: RoomRange,
        lease: i64,
        serve_until: u64,
    },
    Arrived {
        epoch: u64,
        range: RoomRange,
        serve_until: u64,
    },
}

/// A deregistration in flight (`deregister_worker`), step by step.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Deregistering {
    /// The worker's range leases read at `read_at`; a lease of `ttl`
    /// granted at tick `granted_at`.
    Granted {
        lease: i64,
        ttl: u64,
        granted_at: u64,
        read_at: i64,
    },
    /// The record written at `revision`: the second look is next.
    Written {
        ttl: u64,
        granted_at: u64,
        read_at: i64,
        revision: i64,
    },
}

#[derive(Debug, Clone)]
struct Replica {
    alive: bool,
    /// The retention it read, in ticks.
    retention: u64,
    deregistering: Option<Deregistering>,
    carver: Carver,
    /// The end of the space this replica saw reserved (`Shared::high_water`).
    used: u64,
    /// The bucket lease and the tick it was granted.
    lease: Option<(i64, u64)>,
    worker: WorkerState,
    watch: WatchProgress,
    /// The last revision the watch stream delivered.
    stream: i64,
    /// The revision etcd created a new watch at, while one progress may
    /// still overtake its catch-up events (those up to that revision; etcd
    /// before 3.4.25).
    overtakable: Option<i64>,
    /// The catch-up read the new watch owes (`WatchProgress::created`),
    /// from this revision, until it is applied.
    catch_up_from: Option<i64>,
    confirmed_ms: u64,
    /// The member it talks to lost its leader at this revision.
    leaderless: Option<i64>,
    inflight: Inflight,
}

/// One room handed out.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Issued {
    room: u64,
    dp_size: u32,
    tick: u64,
    replica: usize,
}

/// The whole system.
#[derive(Debug, Clone)]
pub struct State {
    now: u64,
    etcd: Etcd,
    replicas: Vec<Replica>,
    issued: Vec<Issued>,
    /// A number was issued twice while a record still covered it.
    duplicate: bool,
    /// A transaction wrote the mark below one written before.
    mark_went_down: bool,
    /// A DeregisterWorker started and not yet answered with success (its
    /// second look not done: it failed, its replica died, or it is under
    /// way). Its caller retries until it succeeds, on any replica.
    deregistration_unacknowledged: bool,
    /// Faults left to inject (crash, watch break, leader loss, compaction,
    /// realignment, hand rewrite of the mark, deregistration).
    faults: [u8; 7],
}

// The pure core's types hold cursors and instants without `Hash`; their
// `Debug` shows every field, so it identifies a state.
impl Hash for State {
    fn hash<H: Hasher>(&self, hasher: &mut H) {
        format!("{self:?}").hash(hasher);
    }
}

impl PartialEq for State {
    fn eq(&self, other: &Self) -> bool {
        format!("{self:?}") == format!("{other:?}")
    }
}

const CRASH: usize = 0;
const BREAK: usize = 1;
const LEADER: usize = 2;
const COMPACT: usize = 3;
const REALIGN: usize = 4;
const REWRITE: usize = 5;
const DEREGISTER: usize = 6;

/// The outcome of a chunk's compare-and-swap as the replica learns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    Known,
    UnknownCommitted,
    UnknownLost,
}

/// One step of the system.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Action {
    Tick,
    Allocate(usize),
    Plan(usize),
    Carve(usize, Outcome),
    Record(usize),
    Place(usize),
    Deliver(usize),
    Ask(usize),
    Progress(usize),
    CatchUp(usize),
    BreakWatch(usize),
    LoseLeader(usize),
    Crash(usize),
    Restart(usize),
    Compact,
    Realign,
    RewriteMark(u64),
    DeregRead(usize),
    DeregWrite(usize),
    DeregLook(usize),
}

fn dp(dp_size: u32) -> DpSize {
    DpSize::try_new(dp_size).expect("the model's dp_sizes are valid")
}

fn instant(tick: u64) -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now) + Duration::from_secs(tick)
}

fn carver_config(max_room: u64, retention: u64) -> CarverConfig {
    CarverConfig {
        bounds: Bounds::try_new(SPACE_START, max_room).expect("valid model bounds"),
        lifetime_ms: retention * TICK_MS,
        min_size: 8,
        max_size: 16,
    }
}

/// A replica as `open` leaves it: loaded from etcd, or `None` if it
/// refuses to start (a mark below a record).
fn start(max_room: u64, retention: u64, etcd: &Etcd, now: u64) -> Option<Replica> {
    if etcd.mark.value < etcd.highest_record_end() {
        return None;
    }
    let mut worker = WorkerState::new(instant(now));
    worker.apply(&etcd.record());
    Some(Replica {
        alive: true,
        retention,
        deregistering: None,
        carver: Carver::new(carver_config(max_room, retention), Some(etcd.mark)),
        used: etcd.mark.value,
        lease: None,
        worker,
        watch: WatchProgress::new(etcd.revision),
        stream: etcd.revision,
        // Created at the revision it loaded: no catch-up events.
        overtakable: None,
        catch_up_from: None,
        confirmed_ms: now * TICK_MS,
        leaderless: None,
        inflight: Inflight::Idle,
    })
}

impl Protocol {
    fn fresh(&self, replica: &Replica, now: u64) -> bool {
        // As `EtcdStore::check_fresh`: stale once older than the window.
        (now * TICK_MS).saturating_sub(replica.confirmed_ms) <= STALENESS * TICK_MS
    }

    /// The events of the worker's key a watch has not delivered yet.
    fn undelivered(etcd: &Etcd, replica: &Replica) -> Option<(i64, u32, bool)> {
        etcd.registrations
            .iter()
            .copied()
            .find(|&(revision, _, _)| revision > replica.stream)
            .filter(|&(revision, _, _)| replica.leaderless.is_none_or(|at| revision <= at))
    }

    /// The bucket lease, granted anew once `BUCKET` old.
    fn bucket_lease(etcd: &mut Etcd, replica: &mut Replica, now: u64) -> i64 {
        if let Some((id, granted)) = replica.lease {
            if now < granted + BUCKET && etcd.lease_alive(id) {
                return id;
            }
        }
        let id = etcd.next_lease;
        etcd.next_lease += 1;
        etcd.leases.push((id, now + lease_ttl(replica.retention)));
        replica.lease = Some((id, now));
        id
    }

    /// The reservation task's `carve`, against the abstract etcd.
    fn carve(state: &mut State, r: usize, outcome: Outcome) -> Option<()> {
        let now = state.now;
        let Inflight::Planned { plan, serve_until } = state.replicas[r].inflight.clone() else {
            return None;
        };
        let State {
            etcd,
            replicas,
            mark_went_down,
            ..
        } = state;
        let replica = &mut replicas[r];
        let lease = Self::bucket_lease(etcd, replica, now);
        let need = Need {
            dp_size: plan.dp_size,
            want_bases: plan.want_bases.min(RANGE_BASES),
            need_bases: plan.need_bases,
        };
        replica.inflight = Inflight::Idle;
        let (mut chunks_taken, mut reads) = (0, 0);
        while chunks_taken < 2 && reads < 2 {
            match replica.carver.carve(need, lease, now * TICK_MS) {
                Step::Range(range) => {
                    replica.inflight = Inflight::Carved {
                        plan,
                        range,
                        lease,
                        serve_until,
                    };
                    return Some(());
                }
                Step::Full(_) => return Some(()),
                Step::ReadMark => {
                    reads += 1;
                    match check_mark(etcd.mark_read(false), replica.used) {
                        Ok(mark) => replica.carver.mark_read(mark),
                        Err(went_back) => {
                            replica.used = replica.used.max(went_back.used);
                            replica.carver.forget_mark();
                            return Some(());
                        }
                    }
                }
                Step::TakeChunk(request) => {
                    chunks_taken += 1;
                    let swapped = etcd.mark == request.mark
                        && !etcd.ranges.iter().any(|r| r.start >= request.mark.value);
                    let committed = swapped && outcome != Outcome::UnknownLost;
                    if committed {
                        etcd.revision += 1;
                        if request.end < etcd.highest_mark {
                            *mark_went_down = true;
                        }
                        etcd.highest_mark = etcd.highest_mark.max(request.end);
                        etcd.mark = Mark {
                            value: request.end,
                            revision: etcd.revision,
                        };
                        etcd.chunks.push(Record {
                            start: request.start,
                            end: request.end,
                            dp_size: 0,
                            lease: request.lease,
                            revision: etcd.revision,
                        });
                    }
                    let reply = if outcome != Outcome::Known {
                        ChunkReply::Unknown
                    } else if swapped {
                        ChunkReply::Taken {
                            revision: etcd.revision,
                        }
                    } else {
                        match check_mark(etcd.mark_read(true), replica.used) {
                            Ok(mark) => {
                                replica.used = replica.used.max(mark.value);
                                ChunkReply::Beaten { mark: Some(mark) }
                            }
                            // `take_chunk` fails the reservation; the carver
                            // treats it as of unknown outcome.
                            Err(went_back) => {
                                replica.used = replica.used.max(went_back.used);
                                replica.carver.chunk_reply(request, ChunkReply::Unknown);
                                return Some(());
                            }
                        }
                    };
                    match replica.carver.chunk_reply(request, reply) {
                        ChunkOutcome::Taken => replica.used = replica.used.max(request.end),
                        ChunkOutcome::Lost | ChunkOutcome::Failed => return Some(()),
                    }
                }
            }
        }
        Some(())
    }

    /// The range transaction of `commit_ranges`, if a range was carved.
    fn record(state: &mut State, r: usize) -> Option<()> {
        let replica = &mut state.replicas[r];
        if !replica.alive || !matches!(replica.inflight, Inflight::Carved { .. }) {
            return None;
        }
        let Inflight::Carved {
            plan,
            range,
            lease,
            serve_until,
        } = replica.inflight.clone()
        else {
            return Some(());
        };
        replica.inflight = Inflight::Idle;
        let etcd = &mut state.etcd;
        if !etcd.lease_alive(lease) {
            return Some(());
        }
        if etcd.registration().0 != plan.revision {
            // StaleRegistration: the allocator follows the change.
            let record = etcd.record();
            state.replicas[r].worker.apply(&record);
            return Some(());
        }
        etcd.revision += 1;
        etcd.ranges.push(Record {
            start: range.start(),
            end: range.end(),
            dp_size: plan.dp_size.get(),
            lease,
            revision: etcd.revision,
        });
        state.replicas[r].inflight = Inflight::Arrived {
            epoch: plan.epoch,
            range,
            serve_until,
        };
        Some(())
    }

    /// `deregister_worker`'s second look, after its write.
    fn second_look(state: &mut State, r: usize) -> Option<()> {
        let now = state.now;
        let etcd = &mut state.etcd;
        let replica = &mut state.replicas[r];
        let Some(Deregistering::Written {
            ttl,
            granted_at,
            read_at,
            revision,
        }) = replica.deregistering
        else {
            return None;
        };
        if !replica.alive {
            return None;
        }
        replica.deregistering = None;
        // A range reserved between the read and the write may outlive
        // what is left of the record's lease: the record gets one to
        // match, unless the worker registered again meanwhile. The
        // production's decision, with the logical clock.
        let late = etcd.longest_range_lease(read_at, now);
        // The call answers success once this look is done.
        state.deregistration_unacknowledged = false;
        let extension = extension_secs(ttl, now.saturating_sub(granted_at), late);
        if let Some(extension) =
            extension.filter(|_| !mutants::active(Mutant::DeregistrationWithoutSecondLook))
        {
            let lease = etcd.next_lease;
            etcd.next_lease += 1;
            etcd.leases.push((lease, now + extension));
            if etcd.registration().0 == revision {
                let (_, dp_size, _) = etcd.registration();
                etcd.revision += 1;
                etcd.registrations.push((etcd.revision, dp_size, false));
                etcd.worker_lease = Some(lease);
            }
        }
        Some(())
    }

    fn next(&self, last: &State, action: Action) -> Option<State> {
        let mut state = last.clone();
        let now = state.now;
        match action {
            Action::Tick => {
                if now >= self.bounds.ticks {
                    return None;
                }
                state.now += 1;
                let now = state.now;
                let etcd = &mut state.etcd;
                let expired: Vec<i64> = etcd
                    .leases
                    .iter()
                    .filter(|&&(_, at)| at <= now)
                    .map(|&(id, _)| id)
                    .collect();
                if !expired.is_empty() {
                    if etcd
                        .worker_lease
                        .is_some_and(|lease| expired.contains(&lease))
                    {
                        // etcd deletes the deregistered record.
                        etcd.worker_lease = None;
                        etcd.forgotten = true;
                    }
                    etcd.leases.retain(|(id, _)| !expired.contains(id));
                    etcd.chunks.retain(|c| !expired.contains(&c.lease));
                    etcd.ranges.retain(|r| !expired.contains(&r.lease));
                    etcd.revision += 1;
                }
            }
            Action::Allocate(r) => {
                if state.issued.len() >= self.bounds.allocations {
                    return None;
                }
                let replica = &mut state.replicas[r];
                if !replica.alive || !replica.worker.registered || !self.fresh(replica, now) {
                    return None;
                }
                let taken = replica.worker.take(1, instant(now), Duration::ZERO)?;
                if taken.prefetch {
                    // The model reserves ahead through `Plan` like any refill.
                    replica.worker.prefetch_ended();
                }
                // Rank 0: the room is the base.
                let room = taken.first_base.get();
                let covered = state
                    .etcd
                    .ranges
                    .iter()
                    .chain(&state.etcd.chunks)
                    .any(|rec| rec.start <= room && room < rec.end);
                if state.issued.iter().any(|i| i.room == room)
                    && (covered || !state.etcd.hand_rewritten)
                {
                    state.duplicate = true;
                }
                state.issued.push(Issued {
                    room,
                    dp_size: taken.dp_size.get(),
                    tick: now,
                    replica: r,
                });
            }
            Action::Plan(r) => {
                if self.bounds.prompt_deregistration && r + 1 == state.replicas.len() {
                    return None;
                }
                let replica = &mut state.replicas[r];
                if !replica.alive || replica.inflight != Inflight::Idle {
                    return None;
                }
                let plan = replica.worker.plan_refill(
                    Demand::Bases {
                        count: 1,
                        validity: Duration::ZERO,
                    },
                    instant(now),
                )?;
                replica.inflight = Inflight::Planned {
                    plan,
                    serve_until: now + replica.retention,
                };
            }
            Action::Carve(r, outcome) => {
                if !state.replicas[r].alive {
                    return None;
                }
                Self::carve(&mut state, r, outcome)?;
            }
            Action::Record(r) => Self::record(&mut state, r)?,
            Action::Place(r) => {
                let replica = &mut state.replicas[r];
                let Inflight::Arrived {
                    epoch,
                    range,
                    serve_until,
                } = replica.inflight.clone()
                else {
                    return None;
                };
                if !replica.alive {
                    return None;
                }
                replica.inflight = Inflight::Idle;
                let placed = replica
                    .worker
                    .place(epoch, range, instant(serve_until), instant(now));
                let _ = placed == Placed::Overtaken;
            }
            Action::Deliver(r) => {
                let etcd = &state.etcd;
                let replica = &mut state.replicas[r];
                if !replica.alive {
                    return None;
                }
                let (revision, dp_size, registered) = Self::undelivered(etcd, replica)?;
                replica.worker.apply(&WorkerRecord {
                    prefill_worker: WORKER.into(),
                    dp_size: dp(dp_size),
                    registered,
                    revision,
                    rooms_issued: 0,
                });
                replica.watch.applied(revision);
                replica.stream = revision;
            }
            Action::Ask(r) => {
                let revision = state.etcd.revision;
                let replica = &mut state.replicas[r];
                if !replica.alive || replica.watch.asked_at().is_some() {
                    return None;
                }
                replica.watch.asked(now * TICK_MS);
                // The quorum read answers at once, unless the member has no
                // leader: then it hangs until it times out, and the request
                // confirms nothing meanwhile.
                if replica.leaderless.is_none() {
                    replica.watch.quorum_read(revision);
                }
            }
            Action::Progress(r) => {
                let etcd = &state.etcd;
                let undelivered = Self::undelivered(etcd, &state.replicas[r]);
                let caught_up = undelivered.is_none();
                let replica = &mut state.replicas[r];
                let asked = replica.watch.asked_at().is_some();
                if !replica.alive {
                    return None;
                }
                let revision = match replica.leaderless {
                    // Answered from the member's own, stale revision.
                    Some(at) if asked => at,
                    Some(_) => return None,
                    None if caught_up && asked => etcd.revision,
                    // etcd 3.4.23: a progress overtakes a new watch's
                    // catch-up events (answering the outstanding request,
                    // if any, at the revision etcd is at).
                    None if undelivered.is_some_and(|(first, _, _)| {
                        replica.overtakable.is_some_and(|created| first <= created)
                    }) =>
                    {
                        replica.overtakable = None;
                        etcd.revision
                    }
                    None => return None,
                };
                if let Some(sent_ms) = replica.watch.progress(revision) {
                    replica.confirmed_ms = replica.confirmed_ms.max(sent_ms);
                }
            }
            Action::BreakWatch(r) => {
                if state.faults[BREAK] == 0 || !state.replicas[r].alive {
                    return None;
                }
                state.faults[BREAK] -= 1;
                let etcd = &state.etcd;
                let record = etcd.record();
                let replica = &mut state.replicas[r];
                let resume = replica.watch.resume_after();
                if resume < etcd.compacted {
                    // Compacted past the resume point: reread everything.
                    replica.worker.apply(&record);
                    replica.watch = WatchProgress::new(etcd.revision);
                    replica.stream = etcd.revision;
                    replica.overtakable = None;
                    replica.catch_up_from = None;
                } else {
                    // etcd creates the watch at the revision its member is
                    // at; what lies between the resume point and that is
                    // catch-up, delivered later.
                    let created = replica.leaderless.unwrap_or(etcd.revision);
                    replica.watch = WatchProgress::new(resume);
                    replica.stream = resume;
                    replica.overtakable = (created > resume).then_some(created);
                    replica.catch_up_from = replica.watch.created(created);
                }
            }
            Action::CatchUp(r) => {
                let etcd = &state.etcd;
                let record = etcd.record();
                let revision = etcd.revision;
                let replica = &mut state.replicas[r];
                // A linearizable read: a member without a leader cannot
                // answer it (the watch then times out and breaks).
                if !replica.alive || replica.leaderless.is_some() {
                    return None;
                }
                let from = replica.catch_up_from.take()?;
                // The worker keys modified at or after `from`, applied as
                // events; the resume point stays.
                if record.revision >= from {
                    replica.worker.apply(&record);
                }
                replica.watch.caught_up(revision);
            }
            Action::LoseLeader(r) => {
                if state.faults[LEADER] == 0 || !state.replicas[r].alive {
                    return None;
                }
                state.faults[LEADER] -= 1;
                state.replicas[r].leaderless = Some(state.etcd.revision);
            }
            Action::Crash(r) => {
                if state.faults[CRASH] == 0 || !state.replicas[r].alive {
                    return None;
                }
                state.faults[CRASH] -= 1;
                state.replicas[r].alive = false;
            }
            Action::Restart(r) => {
                if state.replicas[r].alive {
                    return None;
                }
                state.replicas[r] = start(
                    self.bounds.max_rooms[r],
                    self.bounds.retention(r),
                    &state.etcd,
                    now,
                )?;
            }
            Action::DeregRead(r) => {
                let etcd = &mut state.etcd;
                let replica = &mut state.replicas[r];
                // The caller's retry of a DeregisterWorker not answered
                // with success: on a shared store the allocator runs the
                // store's deregistration again for a worker deregistered
                // already (the record still there: once it expired the
                // worker is unknown).
                let retry = state.deregistration_unacknowledged
                    && !etcd.registration().2
                    && !etcd.forgotten;
                if (state.faults[DEREGISTER] == 0 && !retry)
                    || (self.bounds.prompt_deregistration && r + 1 != self.bounds.max_rooms.len())
                    || !replica.alive
                    || replica.deregistering.is_some()
                    || !(etcd.registration().2 || retry)
                {
                    return None;
                }
                if !retry {
                    state.faults[DEREGISTER] -= 1;
                }
                state.deregistration_unacknowledged = true;
                // As `deregister_worker`: the record outlives the ranges
                // reserved under this replica's retention and every range
                // lease read now (etcd rounds a remaining TTL down: a
                // second more).
                let read_at = etcd.revision;
                let ttl = lease_ttl(replica.retention).max(etcd.longest_range_lease(0, now) + 1);
                let lease = etcd.next_lease;
                etcd.next_lease += 1;
                etcd.leases.push((lease, now + ttl));
                replica.deregistering = Some(Deregistering::Granted {
                    lease,
                    ttl,
                    granted_at: now,
                    read_at,
                });
            }
            Action::DeregWrite(r) => {
                let etcd = &mut state.etcd;
                let replica = &mut state.replicas[r];
                let Some(Deregistering::Granted {
                    lease,
                    ttl,
                    granted_at,
                    read_at,
                }) = replica.deregistering
                else {
                    return None;
                };
                if !replica.alive {
                    return None;
                }
                replica.deregistering = None;
                if !etcd.lease_alive(lease) {
                    // The put fails: the lease is gone.
                    return Some(state);
                }
                let (_, dp_size, _) = etcd.registration();
                etcd.revision += 1;
                etcd.registrations.push((etcd.revision, dp_size, false));
                etcd.worker_lease = Some(lease);
                etcd.forgotten = false;
                etcd.deregistered_at.get_or_insert(now);
                replica.deregistering = Some(Deregistering::Written {
                    ttl,
                    granted_at,
                    read_at,
                    revision: etcd.revision,
                });
                if self.bounds.prompt_deregistration {
                    Self::second_look(&mut state, r)?;
                }
            }
            Action::DeregLook(r) => Self::second_look(&mut state, r)?,
            Action::Compact => {
                if state.faults[COMPACT] == 0 {
                    return None;
                }
                state.faults[COMPACT] -= 1;
                state.etcd.compacted = state.etcd.revision;
            }
            Action::Realign => {
                if state.faults[REALIGN] == 0 {
                    return None;
                }
                state.faults[REALIGN] -= 1;
                let etcd = &mut state.etcd;
                let (_, before, _) = etcd.registration();
                etcd.revision += 1;
                etcd.registrations.push((etcd.revision, DP_AFTER, true));
                etcd.realigned = Some((now, before));
            }
            Action::RewriteMark(value) => {
                if state.faults[REWRITE] == 0 || value >= state.etcd.mark.value {
                    return None;
                }
                state.faults[REWRITE] -= 1;
                let etcd = &mut state.etcd;
                etcd.revision += 1;
                etcd.mark = Mark {
                    value,
                    revision: etcd.revision,
                };
                etcd.hand_rewritten = true;
            }
        }
        Some(state)
    }
}

impl Model for Protocol {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        let etcd = Etcd {
            revision: 2,
            mark: Mark {
                value: SPACE_START,
                revision: 1,
            },
            highest_mark: SPACE_START,
            chunks: Vec::new(),
            ranges: Vec::new(),
            leases: Vec::new(),
            next_lease: 1,
            registrations: vec![(2, DP_BEFORE, true)],
            worker_lease: None,
            forgotten: false,
            deregistered_at: None,
            compacted: 0,
            realigned: None,
            hand_rewritten: false,
        };
        let replicas = self
            .bounds
            .max_rooms
            .iter()
            .enumerate()
            .map(|(r, &max_room)| {
                start(max_room, self.bounds.retention(r), &etcd, 0)
                    .expect("a fresh etcd holds no records")
            })
            .collect();
        vec![State {
            now: 0,
            etcd,
            replicas,
            issued: Vec::new(),
            duplicate: false,
            mark_went_down: false,
            deregistration_unacknowledged: false,
            faults: self.bounds.faults,
        }]
    }

    fn actions(&self, state: &State, actions: &mut Vec<Action>) {
        actions.push(Action::Tick);
        for r in 0..state.replicas.len() {
            actions.extend([
                Action::Allocate(r),
                Action::Plan(r),
                Action::Carve(r, Outcome::Known),
                Action::Carve(r, Outcome::UnknownCommitted),
                Action::Carve(r, Outcome::UnknownLost),
                Action::Record(r),
                Action::Place(r),
                Action::Deliver(r),
                Action::Ask(r),
                Action::Progress(r),
                Action::CatchUp(r),
                Action::BreakWatch(r),
                Action::LoseLeader(r),
                Action::Crash(r),
                Action::Restart(r),
            ]);
            if state.faults[DEREGISTER] > 0
                || state.deregistration_unacknowledged
                || state.replicas[r].deregistering.is_some()
            {
                actions.extend([
                    Action::DeregRead(r),
                    Action::DeregWrite(r),
                    Action::DeregLook(r),
                ]);
            }
        }
        actions.extend([Action::Compact, Action::Realign]);
        // A hand rewrite into the space reserved: to the start, or into a
        // live range (which the swap's "no range at or above" cannot see).
        actions.push(Action::RewriteMark(SPACE_START));
        for range in &state.etcd.ranges {
            if range.end - range.start > 1 {
                actions.push(Action::RewriteMark(range.start + 1));
            }
        }
    }

    fn next_state(&self, last: &State, action: Action) -> Option<State> {
        self.next(last, action)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always("no number issued twice", |_, s: &State| !s.duplicate),
            Property::always(
                "every room aligned to the dp_size it was returned with",
                |_, s: &State| s.issued.iter().all(|i| i.room % u64::from(i.dp_size) == 0),
            ),
            Property::always(
                "ResolveRank reports the dp_size the room was returned with",
                |_, s: &State| {
                    s.issued.iter().all(|i| {
                        s.etcd
                            .ranges
                            .iter()
                            .filter(|r| r.start <= i.room && i.room < r.end)
                            .all(|r| r.dp_size == i.dp_size)
                    })
                },
            ),
            Property::always(
                "every acknowledged room resolves within retention",
                |m: &Protocol, s: &State| {
                    s.issued
                        .iter()
                        .filter(|i| s.now < i.tick + m.bounds.retention(i.replica))
                        .all(|i| {
                            s.etcd
                                .ranges
                                .iter()
                                .any(|r| r.start <= i.room && i.room < r.end)
                        })
                },
            ),
            Property::always("the mark only rises", |_, s: &State| !s.mark_went_down),
            // What lets a mark check trust the highest chunk: the swap's
            // "no range at or above the mark" cannot see a range that
            // straddles a mark rewritten into it.
            Property::always(
                "every range is on the lease of the chunk it was carved from",
                |_, s: &State| {
                    s.etcd.ranges.iter().all(|r| {
                        s.etcd
                            .chunks
                            .iter()
                            .filter(|c| c.start <= r.start && r.end <= c.end)
                            .all(|c| c.lease == r.lease)
                    })
                },
            ),
            Property::always(
                "every live range lies inside a live chunk announcement",
                |_, s: &State| {
                    s.etcd.ranges.iter().all(|r| {
                        s.etcd
                            .chunks
                            .iter()
                            .any(|c| c.start <= r.start && r.end <= c.end)
                    })
                },
            ),
            Property::always(
                "a deregistered worker's record outlives its ranges",
                // Once its DeregisterWorker succeeded: before, the caller
                // retries (a crash between the write and the second look
                // leaves the first grant's lease until a retry).
                |_, s: &State| {
                    !s.etcd.forgotten || s.etcd.ranges.is_empty() || s.deregistration_unacknowledged
                },
            ),
            Property::always(
                "no room for a deregistered worker past the staleness window",
                |_, s: &State| {
                    let Some(at) = s.etcd.deregistered_at else {
                        return true;
                    };
                    s.issued.iter().all(|i| i.tick <= at + STALENESS)
                },
            ),
            Property::always(
                "no room of the old dp_size past the staleness window after a realignment",
                |_, s: &State| {
                    let Some((at, before)) = s.etcd.realigned else {
                        return true;
                    };
                    s.issued
                        .iter()
                        .all(|i| i.dp_size != before || i.tick <= at + STALENESS)
                },
            ),
        ]
    }

    fn within_boundary(&self, _state: &State) -> bool {
        true
    }
}

/// What a check found.
#[derive(Debug, Clone)]
pub struct Report {
    pub states: usize,
    pub unique: usize,
    pub depth: usize,
    pub properties: usize,
    /// Each violated property, with its shortest trace as readable steps.
    pub violations: Vec<(String, Vec<String>)>,
    pub elapsed: Duration,
}

impl Report {
    /// The summary line `scripts/model-check.sh` ends with.
    pub fn summary(&self) -> String {
        format!(
            "model: {} states, {} unique, depth {}, {} properties held, {} violated",
            self.states,
            self.unique,
            self.depth,
            self.properties - self.violations.len(),
            self.violations.len()
        )
    }

    /// The violations and their traces, for people.
    pub fn traces(&self) -> String {
        let mut out = String::new();
        for (property, steps) in &self.violations {
            let _ = writeln!(out, "violated: {property}");
            for (i, step) in steps.iter().enumerate() {
                let _ = writeln!(out, "  {:>2}. {step}", i + 1);
            }
        }
        out
    }
}

fn describe(action: &Action) -> String {
    match action {
        Action::Tick => "the clock ticks (leases due expire)".into(),
        Action::Allocate(r) => format!("replica {r} allocates a room"),
        Action::Plan(r) => format!("replica {r} plans a reservation"),
        Action::Carve(r, Outcome::Known) => {
            format!("replica {r} carves a range (taking a chunk if needed)")
        }
        Action::Carve(r, Outcome::UnknownCommitted) => {
            format!("replica {r} carves; its chunk swap commits but the reply is lost")
        }
        Action::Carve(r, Outcome::UnknownLost) => {
            format!("replica {r} carves; its chunk swap times out uncommitted")
        }
        Action::Record(r) => format!("replica {r} records its range in etcd"),
        Action::Place(r) => format!("replica {r} gets the recorded range back"),
        Action::Deliver(r) => format!("replica {r}'s watch delivers the next registration event"),
        Action::Ask(r) => format!("replica {r} asks for confirmation (sends the quorum read)"),
        Action::Progress(r) => format!("replica {r} gets a progress notification"),
        Action::CatchUp(r) => format!(
            "replica {r} applies its new watch's catch-up read (registrations modified since its start)"
        ),
        Action::BreakWatch(r) => format!("replica {r}'s watch breaks and resumes"),
        Action::LoseLeader(r) => format!("the etcd member replica {r} talks to loses its leader"),
        Action::Crash(r) => format!("replica {r} crashes"),
        Action::Restart(r) => format!("replica {r} restarts from etcd"),
        Action::Compact => "etcd compacts its history".into(),
        Action::Realign => {
            format!("the worker is realigned from dp_size {DP_BEFORE} to {DP_AFTER}")
        }
        Action::RewriteMark(v) => format!("an operator rewrites the mark to {v}"),
        Action::DeregRead(r) => format!(
            "replica {r} deregisters the worker: reads its ranges' leases, grants the record's lease"
        ),
        Action::DeregWrite(r) => format!("replica {r} writes the deregistered record"),
        Action::DeregLook(r) => {
            format!("replica {r} looks again at ranges written since its read")
        }
    }
}

fn outcome_of(last: &State, next: &State) -> String {
    let mut notes = Vec::new();
    if next.issued.len() > last.issued.len() {
        if let Some(i) = next.issued.last() {
            notes.push(format!("room {} with dp_size {}", i.room, i.dp_size));
        }
    }
    if next.etcd.mark != last.etcd.mark {
        notes.push(format!("mark {}", next.etcd.mark.value));
    }
    if next.now != last.now {
        notes.push(format!("t={}", next.now));
    }
    if notes.is_empty() {
        String::new()
    } else {
        format!(" -> {}", notes.join(", "))
    }
}

/// Runs the bounded check (with `mutant` switched on, if any).
pub fn check(bounds: Bounded, mutant: Option<Mutant>, threads: usize) -> Report {
    mutants::set(mutant);
    let started = Instant::now();
    let model = Protocol { bounds };
    let properties = model.properties().len();
    let checker = model
        .checker()
        .threads(threads.max(1))
        .target_max_depth(bounds.depth)
        .spawn_bfs()
        .join();
    let mut violations = Vec::new();
    for (name, path) in checker.discoveries() {
        let pairs: Vec<(State, Option<Action>)> = path.into();
        let mut steps = Vec::new();
        for window in pairs.windows(2) {
            if let [(last, Some(action)), (next, _)] = window {
                steps.push(format!("{}{}", describe(action), outcome_of(last, next)));
            }
        }
        violations.push((name.to_string(), steps));
    }
    violations.sort();
    mutants::set(None);
    Report {
        states: checker.state_count(),
        unique: checker.unique_state_count(),
        depth: checker.max_depth(),
        properties,
        violations,
        elapsed: started.elapsed(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One test for the bounded check and every mutant: the mutant switch
    /// is process-wide, so they must not run concurrently.
    #[test]
    fn the_protocol_holds_and_every_mutant_is_caught() {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        let report = check(Bounded::DEFAULT, None, threads);
        println!("{}", report.summary());
        assert!(report.violations.is_empty(), "{}", report.traces());
        let report = check(Bounded::DEREGISTRATION, None, threads);
        println!("deregistration: {}", report.summary());
        assert!(report.violations.is_empty(), "{}", report.traces());
        // The deregistration mutant's scope is its own (see
        // `prompt_deregistration`): without the mutant it holds, so the
        // violation below is the mutant's.
        let scope = Bounded::for_mutant(Mutant::DeregistrationWithoutSecondLook);
        let report = check(scope, None, threads);
        println!(
            "deregistration-without-second-look's scope: {}",
            report.summary()
        );
        assert!(report.violations.is_empty(), "{}", report.traces());
        for mutant in Mutant::ALL {
            let report = check(Bounded::for_mutant(mutant), Some(mutant), threads);
            println!("{}: {}", mutant.name(), report.summary());
            print!("{}", report.traces());
            assert!(
                !report.violations.is_empty(),
                "mutant {} was not caught: {}",
                mutant.name(),
                report.summary()
            );
        }
    }
}
