//! Reservations: the I/O that drives the pure chunk carver
//! ([`super::carver`]): concurrent reservations folded into one
//! transaction, chunks of the space taken by compare-and-swap on the mark,
//! ranges carved from the chunk and recorded if each worker's registration
//! is unchanged.
//!
//! Invariants: a range leaves the process only after the transaction that
//! records it committed; a transaction of unknown outcome is never used
//! (its chunk or ranges are skipped); a mark read below what this replica
//! saw, or below an announced chunk or range, refuses to reserve.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use room_allocator_client::backoff::{Backoff, Jitter};
use serde_json::json;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::carver::{
    check_mark, record_verdicts, Carver, CarverConfig, ChunkOutcome, ChunkReply, ChunkRequest,
    Mark, MarkRead, Need, RecordVerdict, Step,
};
use super::client::{pb, prefix_end, txn};
use super::keys::{encode_range, parse_high_water, worker_record, Keys};
use super::{Shared, MAX_BATCH};
use crate::failpoint;
use crate::space::{Bounds, RangeOwner, RoomRange};
use crate::store::{Reservation, StoreError};

/// Longest pause before retrying a reservation another replica beat; a
/// random pause up to this (growing with the attempts) keeps the replicas
/// of a registration storm from colliding round after round.
pub(super) const MAX_CAS_BACKOFF: Duration = Duration::from_millis(20);
/// The pause before a batch retries: 2 ms doubling to [`MAX_CAS_BACKOFF`],
/// drawn from zero up to that (full jitter), so replicas beaten at the mark
/// together do not retry together.
const CAS_BACKOFF: Backoff = Backoff::new(Duration::from_millis(2), MAX_CAS_BACKOFF, Jitter::Full);
/// Largest chunk of the space a replica takes at once (see [`super::carver::Chunk`]).
pub(super) const MAX_CHUNK_NUMBERS: u64 = 1 << 32;
/// A replica's first chunk; chunks double while used up before they expire
/// and halve while they expire less than half used, so an idle or restarted
/// replica skips little of a small --max-room space.
pub(super) const MIN_CHUNK_NUMBERS: u64 = 1 << 16;
/// A replica carves from a chunk for at most this long (and at most the
/// retention, so the chunk's announcement, on a lease of twice that, outlives
/// the carving), then takes a new one; ResolveRank treats rooms of announced
/// chunks as possibly still to come.
pub(super) const CHUNK_LIFETIME: Duration = Duration::from_secs(60);

/// Where the used space ends, for [`Shared::seen_mark`]: the mark and the
/// highest chunk. Chunk keys are few (one per chunk taken within twice the
/// retention), so sorting them costs etcd little; range keys are many, and
/// are checked by the chunk compare-and-swap instead (see [`take_chunk`]).
pub(super) fn mark_reads(keys: &Keys) -> Vec<pb::RequestOp> {
    let chunks = keys.chunks();
    vec![
        txn::get(&keys.high_water()),
        txn::last_in(chunks.as_bytes().to_vec(), prefix_end(chunks.as_bytes())),
    ]
}

impl Shared {
    /// The high-water mark as etcd holds it (from the reads of
    /// [`mark_reads`], and after a failed compare-and-swap the first range
    /// at or above the mark it compared), refused if it lies below what this
    /// replica saw or below the end of a chunk or range announced (the key
    /// was deleted or rewritten; a replica that never saw the higher value
    /// can tell only from those): reserving from there would reissue rooms.
    pub(super) fn seen_mark(&self, reads: &[&pb::RangeResponse]) -> Result<Mark, StoreError> {
        let key = self.keys.high_water();
        let first_kv = |i: usize| reads.get(i).and_then(|read| read.kvs.first());
        let repair = "put back a mark at or above the end of every key under v1/chunks/ and v1/ranges/ (never lower: rooms below it were issued)";
        let Some(kv) = first_kv(0) else {
            return Err(StoreError::Corrupt {
                key,
                reason: format!(
                    "it is missing (every replica creates it at start, so it was deleted); {repair}"
                ),
            });
        };
        let mut highest_announced = 0;
        for kv in (1..reads.len()).filter_map(first_kv) {
            highest_announced = highest_announced.max(self.keys.announced_end(kv)?);
        }
        let read = MarkRead {
            mark: parse_high_water(kv, &key)?,
            highest_announced,
        };
        check_mark(read, self.high_water.load(Ordering::Acquire)).map_err(|went_back| {
            // Remembered, so later reads refuse here without sending a
            // swap whose compare would scan the ranges above the bad mark.
            self.high_water.fetch_max(went_back.used, Ordering::AcqRel);
            StoreError::Corrupt {
                key,
                reason: format!(
                    "it went back to {} below {}, the end of the space already reserved (it was deleted or rewritten); {repair}",
                    went_back.mark, went_back.used
                ),
            }
        })
    }
}

/// A reservation waiting for the next transaction.
pub(super) struct PendingReservation {
    pub(super) reservation: Reservation,
    pub(super) reply: oneshot::Sender<Result<RoomRange, StoreError>>,
}

/// Reservations, folded into one transaction per round trip.
///
/// Ends at `stop`, between batches: a batch in flight runs to its answer
/// (each of its calls is bounded by the store timeout), so shutdown never
/// leaves a reservation's transaction of unknown outcome behind; callers
/// still queued get `Closed`.
pub(super) async fn run_reservations(
    shared: Arc<Shared>,
    mut queue: mpsc::UnboundedReceiver<PendingReservation>,
    mark: Option<Mark>,
    stop: CancellationToken,
) {
    let max_size = max_chunk_numbers(shared.bounds);
    let config = CarverConfig {
        bounds: shared.bounds,
        lifetime_ms: u64::try_from(CHUNK_LIFETIME.min(shared.retention).as_millis())
            .unwrap_or(u64::MAX),
        min_size: MIN_CHUNK_NUMBERS.min(max_size),
        max_size,
    };
    let mut carver = Carver::new(config, mark);
    loop {
        let first = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            first = queue.recv() => match first {
                Some(first) => first,
                None => break,
            },
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        // A caller that gave up (timeout) no longer needs a range.
        batch.retain(|pending| !pending.reply.is_closed());
        if !batch.is_empty() {
            reserve_batch(&shared, batch, &mut carver).await;
        }
    }
}

/// The most numbers one chunk takes: a sliver of the bounds (so even a small
/// --min-room/--max-room space is shared by many replicas and restarts), at
/// most 2^32 (a restart skips the rest of its chunk).
pub(super) fn max_chunk_numbers(bounds: Bounds) -> u64 {
    (bounds.size() / 4096).clamp(1, MAX_CHUNK_NUMBERS)
}

/// Reserves a range for every request in `batch` (one transaction, more if
/// registrations changed meanwhile), or answers why not.
pub(super) async fn reserve_batch(
    shared: &Shared,
    mut batch: Vec<PendingReservation>,
    carver: &mut Carver,
) {
    // Beaten by other replicas at the mark, the batch retries (with a random
    // pause) until its callers would have given up anyway: the store timeout.
    let deadline = Instant::now() + shared.timeout;
    let mut attempts = 0;
    while Instant::now() < deadline && !batch.is_empty() {
        attempts += 1;
        let lease = match shared.bucket_lease().await {
            Ok(lease) => lease,
            Err(error) => return answer_all(batch, &error),
        };
        // Carve each request's range from the chunk; take a new chunk when
        // it runs out (or is too old to be announced in etcd any more).
        let mut planned = Vec::with_capacity(batch.len());
        let mut waiting = Vec::new();
        for pending in batch.drain(..) {
            match carve(shared, carver, &pending.reservation, lease).await {
                Carve::Range(range) => planned.push((pending, range)),
                Carve::Full(space) => {
                    let _ = pending.reply.send(Err(StoreError::Space(space)));
                }
                Carve::Lost => waiting.push(pending),
                Carve::Failed(error) => {
                    let _ = pending.reply.send(Err(error));
                }
            }
        }
        if !planned.is_empty() {
            batch.extend(commit_ranges(shared, planned, lease).await);
        }
        batch.extend(waiting);
        if !batch.is_empty() {
            debug!(
                attempts,
                "retrying reservations (a registration changed, or another replica took the chunk)"
            );
            let retry = u32::try_from(attempts - 1).unwrap_or(u32::MAX);
            tokio::time::sleep(CAS_BACKOFF.delay(retry)).await;
        }
    }
    if !batch.is_empty() {
        answer_all(batch, &StoreError::Contention { attempts });
    }
}

/// What carving one range gave.
pub(super) enum Carve {
    Range(RoomRange),
    /// The space (bounds) cannot hold it.
    Full(crate::space::SpaceError),
    /// Another replica moved the mark first: try again.
    Lost,
    Failed(StoreError),
}

/// Carves `r`'s range from the chunk, taking a new chunk (one
/// compare-and-swap on the mark) when needed: the I/O of [`Carver`]'s steps.
pub(super) async fn carve(
    shared: &Shared,
    carver: &mut Carver,
    r: &Reservation,
    lease: i64,
) -> Carve {
    let need = Need {
        dp_size: r.dp_size,
        want_bases: r.want_bases,
        need_bases: r.need_bases,
    };
    // At most two chunks per range: one taken, one more if the first could
    // not hold it (then another replica's chunk came in between).
    let mut chunks_taken = 0;
    let mut reads = 0;
    // Bounded: each pass reads the mark (at most twice) or takes a chunk.
    while chunks_taken < 2 && reads < 2 {
        match carver.carve(need, lease, shared.elapsed_ms()) {
            Step::Range(range) => return Carve::Range(range),
            Step::Full(space) => return Carve::Full(space),
            Step::ReadMark => {
                reads += 1;
                match read_mark(shared).await {
                    Ok(mark) => carver.mark_read(mark),
                    Err(error) => {
                        carver.forget_mark();
                        return Carve::Failed(error);
                    }
                }
            }
            Step::TakeChunk(request) => {
                chunks_taken += 1;
                let reply = match take_chunk(shared, request).await {
                    Ok(reply) => reply,
                    Err(error) => {
                        // Unknown outcome: the carver never uses the chunk.
                        carver.chunk_reply(request, ChunkReply::Unknown);
                        return Carve::Failed(error);
                    }
                };
                match carver.chunk_reply(request, reply) {
                    ChunkOutcome::Taken => {
                        shared.high_water.fetch_max(request.end, Ordering::AcqRel);
                    }
                    ChunkOutcome::Lost => {
                        if reply == ChunkReply::LeaseNotFound {
                            shared.drop_lease(lease).await;
                        }
                        return Carve::Lost;
                    }
                    // Only a reply of unknown outcome fails, handled above.
                    ChunkOutcome::Failed => return Carve::Lost,
                }
            }
        }
    }
    Carve::Lost
}

/// The mark as etcd holds it now, checked (see [`Shared::seen_mark`]).
pub(super) async fn read_mark(shared: &Shared) -> Result<Mark, StoreError> {
    let request = pb::TxnRequest {
        compare: Vec::new(),
        success: mark_reads(&shared.keys),
        failure: Vec::new(),
    };
    let response = shared
        .timed("read the high-water mark", shared.client.txn(request))
        .await?;
    shared.seen_mark(&txn::ranges(&response))
}

/// Sends the compare-and-swap of `request`: a chunk of the space announced
/// in `v1/chunks/` (so ResolveRank knows rooms in it may still be issued).
/// `Err` is a transaction of unknown outcome (or a mark refused when it was
/// read back): never used.
pub(super) async fn take_chunk(
    shared: &Shared,
    request: ChunkRequest,
) -> Result<ChunkReply, StoreError> {
    let ChunkRequest {
        mark,
        start,
        end,
        lease,
        ..
    } = request;
    let hw_key = shared.keys.high_water();
    let chunk_key = shared.keys.chunk(start);
    let ranges_above = shared.keys.range(mark.value);
    let ranges_end = prefix_end(shared.keys.ranges().as_bytes());
    let request = pb::TxnRequest {
        // The value too: a restore of etcd's data may reuse revisions. And
        // no range at or above the mark: one would mean the mark was
        // rewritten below it (a cheap compare: healthy, the span is empty).
        compare: vec![
            txn::unchanged_since(&hw_key, mark.revision),
            txn::value_is(&hw_key, &mark.value.to_string()),
            txn::none_in(&ranges_above, ranges_end.clone()),
        ],
        success: vec![
            txn::put(&hw_key, end.to_string(), 0),
            txn::put(&chunk_key, json!({ "end": end }).to_string(), lease),
        ],
        failure: [
            mark_reads(&shared.keys),
            vec![txn::get_range(pb::RangeRequest {
                key: ranges_above.into_bytes(),
                range_end: ranges_end,
                limit: 1,
                ..Default::default()
            })],
        ]
        .concat(),
    };
    let sent = async {
        failpoint!("etcd::chunk_send", StoreError::Injected("etcd::chunk_send"));
        let response = shared
            .timed("take a chunk of the space", shared.client.txn(request))
            .await?;
        failpoint!(
            "etcd::chunk_committed",
            StoreError::Injected("etcd::chunk_committed")
        );
        Ok(response)
    };
    let response = match sent.await {
        Ok(response) => response,
        Err(StoreError::Etcd { message, .. }) if message.contains("lease not found") => {
            return Ok(ChunkReply::LeaseNotFound);
        }
        Err(error) => return Err(error),
    };
    if response.succeeded {
        let revision = response.header.as_ref().map_or(0, |h| h.revision);
        return Ok(ChunkReply::Taken { revision });
    }
    let reads = txn::ranges(&response);
    if reads.is_empty() {
        return Ok(ChunkReply::Beaten { mark: None });
    }
    let seen = shared.seen_mark(&reads)?;
    shared.high_water.fetch_max(seen.value, Ordering::AcqRel);
    Ok(ChunkReply::Beaten { mark: Some(seen) })
}

/// Writes the planned ranges in one transaction, if every worker's
/// registration still has the revision they were reserved for. Answers
/// each caller; returns the requests to retry (their worker was unchanged,
/// another's changed).
pub(super) async fn commit_ranges(
    shared: &Shared,
    planned: Vec<(PendingReservation, RoomRange)>,
    lease: i64,
) -> Vec<PendingReservation> {
    let mut compare = Vec::with_capacity(planned.len());
    let mut success = Vec::with_capacity(planned.len());
    let mut failure = Vec::with_capacity(planned.len());
    for (pending, range) in &planned {
        let r = &pending.reservation;
        let worker_key = shared.keys.worker(&r.prefill_worker);
        compare.push(txn::unchanged_since(&worker_key, r.revision));
        let record = encode_range(&RangeOwner {
            prefill_worker: r.prefill_worker.clone(),
            range: *range,
            created_unix_ms: r.created_unix_ms,
        });
        success.push(txn::put(&shared.keys.range(range.start()), record, lease));
        failure.push(txn::get(&worker_key));
    }
    let request = pb::TxnRequest {
        compare,
        success,
        failure,
    };
    let sent = async {
        failpoint!(
            "etcd::reserve_send",
            StoreError::Injected("etcd::reserve_send")
        );
        let response = shared
            .timed("reserve ranges", shared.client.txn(request))
            .await?;
        failpoint!(
            "etcd::reserve_committed",
            StoreError::Injected("etcd::reserve_committed")
        );
        Ok(response)
    };
    let response = match sent.await {
        Ok(response) => response,
        Err(StoreError::Etcd { message, .. }) if message.contains("lease not found") => {
            // Nothing was written; the ranges stay carved (skipped).
            shared.drop_lease(lease).await;
            return planned.into_iter().map(|(pending, _)| pending).collect();
        }
        Err(error) => {
            // Unknown outcome: the ranges may or may not be recorded. They
            // stay carved from the chunk, so they are never used again.
            let pending = planned.into_iter().map(|(pending, _)| pending).collect();
            answer_all(pending, &error);
            return Vec::new();
        }
    };
    if response.succeeded {
        for (pending, range) in planned {
            let _ = pending.reply.send(Ok(range));
        }
        return Vec::new();
    }
    // A registration changed: its callers learn of it; the others retry.
    let reads = txn::ranges(&response);
    let current = |i: usize| reads.get(i).and_then(|read| read.kvs.first());
    let reserved_for: Vec<i64> = planned
        .iter()
        .map(|(pending, _)| pending.reservation.revision)
        .collect();
    let revisions: Vec<Option<i64>> = (0..planned.len())
        .map(|i| current(i).map(|kv| kv.mod_revision))
        .collect();
    let verdicts = record_verdicts(false, &reserved_for, &revisions);
    let mut retry = Vec::new();
    for (i, ((pending, _), verdict)) in planned.into_iter().zip(verdicts).enumerate() {
        let r = &pending.reservation;
        if verdict == RecordVerdict::Retry {
            retry.push(pending);
        } else {
            let record = current(i)
                .and_then(|kv| worker_record(r.prefill_worker.clone(), kv))
                .map(Box::new);
            let _ = pending.reply.send(Err(StoreError::StaleRegistration {
                worker: r.prefill_worker.clone(),
                current: record,
            }));
        }
    }
    retry
}

pub(super) fn answer_all(batch: Vec<PendingReservation>, error: &StoreError) {
    for pending in batch {
        let _ = pending.reply.send(Err(error.clone()));
    }
}
