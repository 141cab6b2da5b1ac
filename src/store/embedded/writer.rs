//! The embedded store's writer: the one thread that appends to the log,
//! group-commits, compacts, and halts and settles after a failure.
//!
//! # Commit protocol
//! A writer thread takes every queued request (group commit), appends their
//! records at the end of the log, fsyncs the log, then writes the other
//! commit slot with the new `log_len` and fsyncs it. Only then are callers
//! answered, so a range is durable before any room in it leaves the process.
//!
//! # Failures while running
//! After any failed write or fsync the writer no longer trusts its idea of the
//! files (a failed fsync may or may not have reached the disk): it answers
//! UNAVAILABLE, stops taking writes, and every second reads the files back
//! exactly as a restart would ("settling" them, see `recovery`). Once that succeeds it
//! takes writes again, past everything the files hold. So a caller is told a
//! range is reserved only when it is durable, and a range that may be durable
//! is never reserved again. A failed rename of a compaction counts as a
//! failure after it: a rename may take effect and still report an error (an
//! NFS retry that gets ENOENT, a journal error).
//!
//! # Compaction (retention)
//! Pruning old ranges rewrites the log: the current registrations, counters,
//! the ranges kept and a `pruned` record go to `rooms.log.compact` with the
//! next generation, which is fsynced and renamed over `rooms.log` (and the
//! directory fsynced) before the commit slot names the new generation. A log
//! one generation ahead of the commit slot is therefore a compaction that
//! finished its rename: it is complete, and every byte of it must be valid. A
//! leftover `rooms.log.compact` is a compaction that did not get that far and
//! is removed. A failure before the rename leaves the live log as it was; a
//! failure after it halts the writer until the files are settled.
//! Deregistered workers are dropped by compaction once their deregistration
//! is older than the cutoff and none of their ranges is left.
//!
//! A prune request is first decided against the writer's `Holdings` (what
//! the log holds, kept in memory): one that would drop nothing is answered
//! at once, without reading the log. One that would drop something runs as
//! a streaming pass, a slice at a time between group commits (see
//! `compaction` for why, and why the protocol above is unchanged); prunes
//! that arrive meanwhile wait for it and are decided afresh after it.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch};
use tracing::{error, info, warn};

use super::compaction::{Finished, Pass, SLICE_BYTES};
use super::format::*;
use super::holdings::Holdings;
use super::recovery::*;
use crate::failpoint;
use crate::failpoint::io_error;
use crate::space::{Bounds, DpSize, RoomRange};
use crate::store::fs::{Fs, FsFile, FsLock};
use crate::store::{PruneRequest, Pruned, Reservation, StoreError};

/// Most requests folded into one group commit; bounds the batch's memory.
pub(super) const MAX_BATCH: usize = 1024;
/// How often a halted or failing writer reads its files back or probes.
pub(super) const RECOVERY_INTERVAL: Duration = Duration::from_secs(1);

/// Where the writer stands. One value, so no reader can see a combination
/// the writer never was in (halted but ready, gone but failing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum WriterState {
    /// Takes writes; the last one (if any) succeeded.
    Ready,
    /// The files were read back after a failure and writes are taken again,
    /// but none has succeeded yet: not ready until one does (an idle writer
    /// probes the disk with a record that holds nothing).
    Failing,
    /// A write failed: the files' state is unknown until they are read back,
    /// and every request is refused until then.
    Halted { reason: String },
    /// The writer thread has ended; nothing more is written.
    Gone,
}

/// What an idle writer does at its next tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum IdleWork {
    Nothing,
    /// Read the files back (settle them).
    Settle,
    /// Write a probe record: readiness returns only with a write that succeeds.
    Probe,
}

impl WriterState {
    /// The state after a write (or a probe) that succeeded or failed.
    pub(super) fn after_write(&self, result: Result<(), &StoreError>) -> WriterState {
        match (self, result) {
            (WriterState::Gone, _) => WriterState::Gone,
            (_, Ok(())) => WriterState::Ready,
            (_, Err(error)) => WriterState::Halted {
                reason: error.to_string(),
            },
        }
    }

    /// The state after the files were read back: still not ready, as the
    /// disk has not yet taken a write since it failed one.
    pub(super) fn after_settle(&self, settled: bool) -> WriterState {
        match self {
            WriterState::Halted { .. } if settled => WriterState::Failing,
            other => other.clone(),
        }
    }

    /// Whether requests are written (else refused with this error).
    pub(super) fn refusal(&self) -> Option<StoreError> {
        match self {
            WriterState::Ready | WriterState::Failing => None,
            WriterState::Halted { reason } => Some(StoreError::Halted {
                reason: reason.clone(),
            }),
            WriterState::Gone => Some(StoreError::Closed),
        }
    }

    /// What readiness reports: only `Ready` is ready.
    pub(super) fn readiness(&self) -> Result<(), StoreError> {
        match self {
            WriterState::Ready => Ok(()),
            WriterState::Failing | WriterState::Halted { .. } => Err(StoreError::Halted {
                reason: "a failed write".into(),
            }),
            WriterState::Gone => Err(StoreError::Closed),
        }
    }

    pub(super) fn idle_work(&self) -> IdleWork {
        match self {
            WriterState::Halted { .. } => IdleWork::Settle,
            WriterState::Failing => IdleWork::Probe,
            WriterState::Ready | WriterState::Gone => IdleWork::Nothing,
        }
    }
}

/// What the writer publishes, through one `watch` channel: its state and
/// the high-water mark of what it has made durable.
#[derive(Debug, Clone)]
pub(super) struct WriterStatus {
    pub(super) state: WriterState,
    pub(super) high_water: u64,
}

/// The answer to one request, typed by the request's kind.
pub(super) type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// A request to the writer, carrying the channel for its own kind of answer.
pub(super) enum Request {
    Register {
        worker: Arc<str>,
        dp_size: DpSize,
        reply: Reply<i64>,
    },
    Deregister {
        worker: Arc<str>,
        unix_ms: u64,
        reply: Reply<i64>,
    },
    Reserve {
        reservation: Reservation,
        reply: Reply<RoomRange>,
    },
    Issued {
        counts: Vec<(Arc<str>, u64)>,
        reply: Reply<()>,
    },
    Prune {
        request: PruneRequest,
        reply: Reply<Pruned>,
    },
}

impl Request {
    /// Answers with `error` whatever the kind.
    fn refuse(self, error: StoreError) {
        // A caller that gave up is fine: nothing was written for it.
        match self {
            Request::Register { reply, .. } | Request::Deregister { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            Request::Reserve { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            Request::Issued { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            Request::Prune { reply, .. } => {
                let _ = reply.send(Err(error));
            }
        }
    }
}

/// A batch's answer, held until its records are durable.
enum Pending {
    Revision(Reply<i64>, Result<i64, StoreError>),
    Reserved(Reply<RoomRange>, Result<RoomRange, StoreError>),
    Done(Reply<()>),
}

impl Pending {
    /// Sends the answer, or `failed` in its place when the batch's write failed.
    fn answer(self, failed: Option<&StoreError>) {
        // A caller that gave up is fine: its range is simply skipped.
        match (self, failed) {
            (Pending::Revision(reply, _), Some(error)) => {
                let _ = reply.send(Err(error.clone()));
            }
            (Pending::Revision(reply, answer), None) => {
                let _ = reply.send(answer);
            }
            (Pending::Reserved(reply, _), Some(error)) => {
                let _ = reply.send(Err(error.clone()));
            }
            (Pending::Reserved(reply, answer), None) => {
                let _ = reply.send(answer);
            }
            (Pending::Done(reply), Some(error)) => {
                let _ = reply.send(Err(error.clone()));
            }
            (Pending::Done(reply), None) => {
                let _ = reply.send(Ok(()));
            }
        }
    }
}

/// Owns the files; the only code that writes them.
pub(super) struct Writer {
    pub(super) fs: Arc<dyn Fs>,
    pub(super) files: Files,
    pub(super) log: Box<dyn FsFile>,
    pub(super) commit: Box<dyn FsFile>,
    /// Held for the life of the writer: the flock on `LOCK`.
    pub(super) _lock: FsLock,
    pub(super) log_len: u64,
    pub(super) next_seq: u64,
    pub(super) commit_seq: u64,
    pub(super) generation: u32,
    pub(super) high_water: u64,
    pub(super) bounds: Bounds,
    pub(super) state: WriterState,
    /// Where `state` and `high_water` are published (dropped with the
    /// writer, which readers also take as `Gone`).
    pub(super) status: watch::Sender<WriterStatus>,
    /// What the log holds up to `log_len`, so a prune with nothing due
    /// never reads it.
    pub(super) holdings: Holdings,
    /// The compaction under way, if any.
    pub(super) compaction: Option<Compacting>,
    /// Prunes that arrived while a compaction ran, in order.
    pub(super) waiting_prunes: VecDeque<(PruneRequest, Reply<Pruned>)>,
}

/// A compaction under way: its pass, who asked, and what it has cost the
/// writer so far (for the log line that reports it).
pub(super) struct Compacting {
    pass: Pass,
    reply: Reply<Pruned>,
    started: Instant,
    slices: u64,
    longest_slice: Duration,
}

impl Writer {
    pub(super) fn run(mut self, requests: mpsc::Receiver<Request>) {
        loop {
            // While a compaction runs the writer never waits: a slice of it
            // runs whenever no request is queued, and after every batch.
            let received = if self.compaction.is_some() {
                match requests.try_recv() {
                    Ok(request) => Ok(request),
                    Err(mpsc::TryRecvError::Empty) => {
                        self.compaction_slice();
                        continue;
                    }
                    Err(mpsc::TryRecvError::Disconnected) => {
                        Err(mpsc::RecvTimeoutError::Disconnected)
                    }
                }
            } else {
                requests.recv_timeout(RECOVERY_INTERVAL)
            };
            match received {
                Ok(first) => {
                    let mut batch = vec![first];
                    while batch.len() < MAX_BATCH {
                        match requests.try_recv() {
                            Ok(request) => batch.push(request),
                            Err(_) => break,
                        }
                    }
                    if self.state.idle_work() == IdleWork::Settle {
                        self.recover();
                    }
                    match self.state.refusal() {
                        Some(error) => {
                            for request in batch {
                                request.refuse(error.clone());
                            }
                        }
                        None => self.commit_batch(batch),
                    }
                    if self.compaction.is_some() {
                        self.compaction_slice();
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => self.tick(),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    // Every prune asked for is answered, as before the
                    // writer went: each slice reads more of a log that no
                    // longer grows, or fails and ends the compaction.
                    while self.compaction.is_some() {
                        self.compaction_slice();
                    }
                    break;
                }
            }
        }
        self.set_state(WriterState::Gone);
    }

    /// Changes the state and publishes it.
    fn set_state(&mut self, state: WriterState) {
        if let WriterState::Halted { reason } = &state {
            error!(%reason, "the embedded store stopped taking writes until it has read its files back");
        }
        if let Some(error) = state.refusal() {
            // The files will be read back before any write: a pass over
            // the log as it was cannot go on.
            self.abandon_compactions(error);
        }
        if state != self.state {
            self.state = state.clone();
            self.status.send_modify(|status| status.state = state);
        }
    }

    /// Publishes a new high-water mark.
    fn publish_high_water(&self) {
        let high_water = self.high_water;
        self.status
            .send_modify(|status| status.high_water = high_water);
    }

    /// Idle: a halted writer settles its files, a failing one probes the
    /// disk, so readiness comes back without waiting for a caller.
    pub(super) fn tick(&mut self) {
        match self.state.idle_work() {
            IdleWork::Settle => self.recover(),
            IdleWork::Probe => {
                let mut probe = Vec::new();
                encode_record(&mut probe, self.next_seq, &Record::Probe);
                if self.append_and_commit(&probe).is_ok() {
                    self.next_seq += 1;
                }
            }
            IdleWork::Nothing => {}
        }
    }

    /// Stops writes until the files are settled; readiness stays off until
    /// a write succeeds again.
    pub(super) fn halt(&mut self, reason: String) {
        self.set_state(WriterState::Halted { reason });
    }

    /// Reads the files back as a restart would and resumes past everything
    /// they hold (see "Failures while running").
    pub(super) fn recover(&mut self) {
        match settle(&*self.fs, &self.files) {
            Ok(settled) => {
                let loaded = &settled.loaded;
                if loaded.high_water() < self.high_water {
                    // A range acknowledged in this process is not on disk:
                    // the disk broke its promise. Never go below it anyway.
                    error!(
                        on_disk = loaded.high_water(),
                        in_memory = self.high_water,
                        "the log lost acknowledged reservations; keeping the in-memory high-water mark"
                    );
                }
                self.high_water = self.high_water.max(loaded.high_water());
                self.log_len = loaded.end;
                self.next_seq = loaded.next_seq;
                self.generation = loaded.generation;
                self.commit_seq = settled.commit_seq;
                self.holdings = Holdings::of_replay(&loaded.replay);
                self.log = settled.log;
                self.commit = settled.commit;
                self.publish_high_water();
                // Readiness returns with the next successful write (a probe).
                let state = self.state.after_settle(true);
                self.set_state(state);
                info!(
                    high_water = self.high_water,
                    "the embedded store read its files back and takes writes again"
                );
            }
            Err(error) => {
                warn!(%error, "the embedded store cannot read its files back yet; retrying");
            }
        }
    }

    /// Writes the batch's records in one commit, then answers each request;
    /// prunes run after it, as compaction needs everything before it on disk.
    pub(super) fn commit_batch(&mut self, batch: Vec<Request>) {
        let mut buf = Vec::new();
        let mut seq = self.next_seq;
        let mut high_water = self.high_water;
        let mut answers = Vec::with_capacity(batch.len());
        let mut prunes = Vec::new();
        // Followed by the holdings once durable.
        let mut records = Vec::with_capacity(batch.len());
        for request in batch {
            match request {
                Request::Register {
                    worker,
                    dp_size,
                    reply,
                } => {
                    let record = Record::Register(worker, dp_size);
                    encode_record(&mut buf, seq, &record);
                    records.push(record);
                    answers.push(Pending::Revision(reply, Ok(revision(self.generation, seq))));
                    seq += 1;
                }
                Request::Deregister {
                    worker,
                    unix_ms,
                    reply,
                } => {
                    let record = Record::Deregister { worker, unix_ms };
                    encode_record(&mut buf, seq, &record);
                    records.push(record);
                    answers.push(Pending::Revision(reply, Ok(revision(self.generation, seq))));
                    seq += 1;
                }
                Request::Reserve {
                    reservation: r,
                    reply,
                } => {
                    let reserved = RoomRange::reserve_after(
                        high_water,
                        r.dp_size,
                        r.want_bases,
                        r.need_bases,
                        self.bounds,
                    )
                    .map_err(StoreError::Space);
                    if let Ok(range) = reserved {
                        high_water = range.end();
                        let record = Record::Reserve {
                            worker: r.prefill_worker,
                            range,
                            rooms_issued: r.rooms_issued,
                            created_unix_ms: r.created_unix_ms,
                        };
                        encode_record(&mut buf, seq, &record);
                        records.push(record);
                        seq += 1;
                    }
                    answers.push(Pending::Reserved(reply, reserved));
                }
                Request::Issued { counts, reply } => {
                    for (worker, rooms_issued) in counts {
                        let record = Record::Issued(worker, rooms_issued);
                        encode_record(&mut buf, seq, &record);
                        records.push(record);
                        seq += 1;
                    }
                    answers.push(Pending::Done(reply));
                }
                Request::Prune { request, reply } => prunes.push((request, reply)),
            }
        }

        if !buf.is_empty() {
            if let Err(error) = self.append_and_commit(&buf) {
                for pending in answers {
                    pending.answer(Some(&error));
                }
                for (_, reply) in prunes {
                    let _ = reply.send(Err(error.clone()));
                }
                return;
            }
            self.next_seq = seq;
            self.high_water = high_water;
            self.publish_high_water();
            for record in &records {
                self.holdings.apply(record);
            }
        }
        for pending in answers {
            pending.answer(None);
        }
        for (request, reply) in prunes {
            self.prune(request, reply);
        }
    }

    /// Answers a prune with nothing due at once; starts a compaction for
    /// one with something due, or queues it behind the one under way.
    pub(super) fn prune(&mut self, request: PruneRequest, reply: Reply<Pruned>) {
        // A compaction that halted the writer leaves later ones refused.
        if let Some(error) = self.state.refusal() {
            let _ = reply.send(Err(error));
            return;
        }
        if self.compaction.is_some() {
            self.waiting_prunes.push_back((request, reply));
            return;
        }
        if !self.holdings.prune_due(&request) {
            let _ = reply.send(Ok(self.pruned_nothing()));
            return;
        }
        match Pass::start(&*self.fs, &self.files, request, self.generation) {
            Ok(pass) => {
                self.compaction = Some(Compacting {
                    pass,
                    reply,
                    started: Instant::now(),
                    slices: 0,
                    longest_slice: Duration::ZERO,
                })
            }
            Err(error) => {
                let _ = self.fs.remove_file(&self.files.compact);
                let _ = reply.send(Err(self.io_error(&self.files.compact, error)));
            }
        }
    }

    /// What a prune that drops nothing answers.
    fn pruned_nothing(&self) -> Pruned {
        Pruned {
            pruned_below: self.holdings.pruned_below,
            forgotten: Vec::new(),
            revision: revision(self.generation, self.next_seq),
        }
    }

    /// Runs one slice of the compaction under way; at the end of the log,
    /// switches to the compacted one and starts the next waiting prune.
    pub(super) fn compaction_slice(&mut self) {
        let Some(mut compacting) = self.compaction.take() else {
            return;
        };
        let began = Instant::now();
        let advanced =
            compacting
                .pass
                .advance(&*self.log, self.log_len, SLICE_BYTES, &self.holdings);
        compacting.slices += 1;
        compacting.longest_slice = compacting.longest_slice.max(began.elapsed());
        match advanced {
            Ok(false) => self.compaction = Some(compacting),
            Ok(true) => {
                let Compacting {
                    pass,
                    reply,
                    started,
                    slices,
                    longest_slice,
                } = compacting;
                let began = Instant::now();
                let pruned = self.switch_to_compacted(pass);
                let switch = began.elapsed();
                if let Ok(pruned) = &pruned {
                    info!(
                        ranges_kept = self.holdings.ranges.len(),
                        workers_forgotten = pruned.forgotten.len(),
                        pruned_below = pruned.pruned_below,
                        log_bytes = self.log_len,
                        slices,
                        longest_slice_ms = longest_slice.as_secs_f64() * 1e3,
                        switch_ms = switch.as_secs_f64() * 1e3,
                        total_ms = started.elapsed().as_secs_f64() * 1e3,
                        "compacted the embedded store's log"
                    );
                }
                let _ = reply.send(pruned);
                while self.compaction.is_none() {
                    let Some((request, reply)) = self.waiting_prunes.pop_front() else {
                        break;
                    };
                    self.prune(request, reply);
                }
            }
            Err(error) => {
                let _ = self.fs.remove_file(&self.files.compact);
                let error = self.io_error(&self.files.compact, error);
                warn!(%error, "compacting the embedded store's log failed; the log is as it was");
                let _ = compacting.reply.send(Err(error));
            }
        }
    }

    /// Ends the compaction under way and refuses the waiting prunes: the
    /// writer stopped taking writes (or is gone).
    fn abandon_compactions(&mut self, error: StoreError) {
        if let Some(compacting) = self.compaction.take() {
            let _ = self.fs.remove_file(&self.files.compact);
            let _ = compacting.reply.send(Err(error.clone()));
        }
        for (_, reply) in self.waiting_prunes.drain(..) {
            let _ = reply.send(Err(error.clone()));
        }
    }

    pub(super) fn io_error(&self, path: &Path, source: std::io::Error) -> StoreError {
        StoreError::Io {
            path: path.to_path_buf(),
            cause: Arc::new(source),
        }
    }

    /// Appends `records` and commits them; on any failure halts (the files'
    /// state is then unknown until settled again).
    pub(super) fn append_and_commit(&mut self, records: &[u8]) -> Result<(), StoreError> {
        let result = self.try_append_and_commit(records);
        match &result {
            Ok(()) => {
                if self.state == WriterState::Failing {
                    info!("the embedded store's writes succeed again");
                }
                let state = self.state.after_write(Ok(()));
                self.set_state(state);
            }
            Err(error) => {
                warn!(%error, "embedded store write failed; nothing in this batch was acknowledged");
                let state = self.state.after_write(Err(error));
                self.set_state(state);
            }
        }
        result
    }

    pub(super) fn try_append_and_commit(&mut self, records: &[u8]) -> Result<(), StoreError> {
        let log = self.files.log.clone();
        let commit = self.files.commit.clone();
        failpoint!(
            "embedded::log_write",
            self.io_error(&log, io_error("embedded::log_write"))
        );
        self.log
            .write_all_at(records, self.log_len)
            .map_err(|e| self.io_error(&log, e))?;
        // The failpoint's error is the fsync's own result, so code that
        // ignored the fsync's errors would ignore it too (and its test fail).
        // A closure so the failpoint's `return` ends it, not the function.
        #[allow(clippy::redundant_closure_call)]
        let synced = (|| {
            failpoint!("embedded::log_fsync", io_error("embedded::log_fsync"));
            self.log.sync_data()
        })();
        synced.map_err(|e| self.io_error(&log, e))?;
        let new_len = self.log_len + u64::try_from(records.len()).expect("a batch fits in u64");
        let commit_seq = self.commit_seq + 1;
        failpoint!(
            "embedded::slot_write",
            self.io_error(&commit, io_error("embedded::slot_write"))
        );
        self.commit
            .write_all_at(
                &encode_slot(commit_seq, new_len, self.generation),
                slot_offset(commit_seq),
            )
            .map_err(|e| self.io_error(&commit, e))?;
        // A closure so the failpoint's `return` ends it, not the function.
        #[allow(clippy::redundant_closure_call)]
        let synced = (|| {
            failpoint!("embedded::slot_fsync", io_error("embedded::slot_fsync"));
            self.commit.sync_data()
        })();
        synced.map_err(|e| self.io_error(&commit, e))?;
        failpoint!(
            "embedded::committed",
            StoreError::Injected("embedded::committed")
        );
        self.log_len = new_len;
        self.commit_seq = commit_seq;
        Ok(())
    }

    /// Closes a pass that has read the whole log: writes and syncs the
    /// compacted log, renames it over the live one and commits its
    /// generation (see "Compaction" above); the new log state is assigned
    /// once, at the end. A pass that would drop nothing (the log changed
    /// since it was decided) is discarded.
    pub(super) fn switch_to_compacted(&mut self, pass: Pass) -> Result<Pruned, StoreError> {
        if pass.drops_nothing(&self.holdings) {
            let _ = self.fs.remove_file(&self.files.compact);
            return Ok(self.pruned_nothing());
        }
        let request = pass.request.clone();
        let dropped = pass.dropped.clone();
        let finished = match pass.finish(&self.holdings) {
            Ok(finished) => finished,
            Err(error) => {
                let _ = self.fs.remove_file(&self.files.compact);
                return Err(self.io_error(&self.files.compact, error));
            }
        };
        let Finished {
            file,
            len,
            next_seq,
            generation,
            pruned_below,
            forgotten,
        } = finished;
        self.rename_compacted()?;
        // The new log is in place: from here any failure leaves the files in
        // a state only reading them back can tell.
        if let Err(error) = self.commit_compaction(generation, len) {
            self.halt(error.to_string());
            return Err(error);
        }
        self.log = file;
        self.log_len = len;
        self.next_seq = next_seq;
        self.generation = generation;
        self.holdings
            .compacted(&request, &dropped, &forgotten, pruned_below);
        Ok(Pruned {
            pruned_below,
            forgotten,
            revision: revision(generation, 0),
        })
    }

    /// Renames the synced compaction file over the live log. A failed
    /// rename halts the writer, as it may have happened.
    pub(super) fn rename_compacted(&mut self) -> Result<(), StoreError> {
        let path = self.files.compact.clone();
        failpoint!(
            "compact::rename",
            self.io_error(&self.files.log, io_error("compact::rename"))
        );
        if let Err(error) = self.fs.rename(&path, &self.files.log) {
            // A rename may take effect and still report an error (NFS
            // retries it and gets ENOENT; a journal error): which log is
            // live is unknown until the files are read back.
            let error = self.io_error(&self.files.log, error);
            self.halt(error.to_string());
            return Err(error);
        }
        Ok(())
    }

    /// Makes the rename durable, then commits the new generation.
    pub(super) fn commit_compaction(
        &mut self,
        generation: u32,
        new_len: u64,
    ) -> Result<(), StoreError> {
        let dir = self.files.dir.clone();
        let commit = self.files.commit.clone();
        // A closure so the failpoint's `return` ends it, not the function.
        #[allow(clippy::redundant_closure_call)]
        let synced = (|| {
            failpoint!("compact::dir_fsync", io_error("compact::dir_fsync"));
            self.fs.sync_dir(&dir)
        })();
        synced.map_err(|e| self.io_error(&dir, e))?;
        let commit_seq = self.commit_seq + 1;
        failpoint!(
            "compact::slot_write",
            self.io_error(&commit, io_error("compact::slot_write"))
        );
        self.commit
            .write_all_at(
                &encode_slot(commit_seq, new_len, generation),
                slot_offset(commit_seq),
            )
            .map_err(|e| self.io_error(&commit, e))?;
        // A closure so the failpoint's `return` ends it, not the function.
        #[allow(clippy::redundant_closure_call)]
        let synced = (|| {
            failpoint!("compact::slot_fsync", io_error("compact::slot_fsync"));
            self.commit.sync_data()
        })();
        synced.map_err(|e| self.io_error(&commit, e))?;
        self.commit_seq = commit_seq;
        Ok(())
    }
}

#[cfg(test)]
mod state_tests {
    //! The writer's state transitions, driven directly.
    use super::*;

    fn failed() -> StoreError {
        StoreError::Injected("embedded::log_fsync")
    }

    #[test]
    fn a_failed_write_halts_and_refuses_with_its_reason() {
        let halted = WriterState::Ready.after_write(Err(&failed()));
        let reason = failed().to_string();
        assert_eq!(
            halted,
            WriterState::Halted {
                reason: reason.clone()
            }
        );
        assert!(matches!(halted.refusal(), Some(StoreError::Halted { reason: r }) if r == reason));
        assert!(halted.readiness().is_err());
        assert_eq!(halted.idle_work(), IdleWork::Settle);
    }

    #[test]
    fn settled_files_take_writes_but_readiness_waits_for_a_successful_write() {
        let halted = WriterState::Ready.after_write(Err(&failed()));
        assert_eq!(
            halted.after_settle(false),
            halted,
            "a failed settle stays halted"
        );
        let failing = halted.after_settle(true);
        assert_eq!(failing, WriterState::Failing);
        assert!(failing.refusal().is_none(), "writes are taken again");
        assert!(
            failing.readiness().is_err(),
            "not ready before a write succeeds"
        );
        assert_eq!(failing.idle_work(), IdleWork::Probe);
        let ready = failing.after_write(Ok(()));
        assert_eq!(ready, WriterState::Ready);
        assert!(ready.readiness().is_ok());
        assert_eq!(ready.idle_work(), IdleWork::Nothing);
        assert_eq!(
            WriterState::Failing.after_write(Err(&failed())),
            WriterState::Halted {
                reason: failed().to_string()
            },
            "a failed probe halts again"
        );
    }

    #[test]
    fn settling_never_makes_a_ready_writer_failing() {
        assert_eq!(WriterState::Ready.after_settle(true), WriterState::Ready);
    }

    #[test]
    fn a_gone_writer_stays_gone_and_refuses_as_closed() {
        for result in [Ok(()), Err(&failed())] {
            assert_eq!(WriterState::Gone.after_write(result), WriterState::Gone);
        }
        assert_eq!(WriterState::Gone.after_settle(true), WriterState::Gone);
        assert!(matches!(
            WriterState::Gone.refusal(),
            Some(StoreError::Closed)
        ));
        assert!(matches!(
            WriterState::Gone.readiness(),
            Err(StoreError::Closed)
        ));
    }
}
