//! One compaction's streaming pass, in three phases, each a slice at a
//! time: (1) the live log is read through a bounded buffer, record by
//! record, and the ranges it keeps are written to `rooms.log.compact` as
//! they are read; (2) once it has caught up with the live log, the workers
//! are written from the writer's `Holdings`, a slice of them at a time, all
//! but those it may forget; (3) once all are written, the pass catches up
//! again and the switch closes the file with a `pruned` record. From the
//! end of (1) on, every record committed meanwhile is copied as it is read
//! (workers' records as well as ranges), and at the switch each worker such
//! a record names, or that (2) left out, is written again as the holdings
//! have it, or forgotten if it still may be and no record names it: replay
//! applies records in order, so the compacted log ends with the state the
//! holdings hold. Memory is the buffers, a count of dropped ranges per
//! worker and the names of workers left out or named meanwhile (keyed by
//! the names the holdings already keep), whatever the log's size; no second
//! copy of the state is built.
//!
//! # Why in slices on the writer thread
//! The pass runs on the writer thread, a slice at a time (`SLICE_BYTES` of
//! log), with group commits between slices: reservations wait for at most
//! one slice, not for the whole log. The writer is still the only code that
//! touches the files, so the crash protocol is the one of "Compaction" in
//! `writer`, step for step: the compaction file is not named by anything
//! until its rename, and the rename, the directory fsync and the commit
//! slot of the new generation all happen in one go, with no commit between
//! them. Records committed while the pass runs are appended to the live log
//! and read by the pass like any other (it ends only once it has read up to
//! the live log's end), so the compacted log holds them too. A copy taken
//! off-thread would need a second reader and a hand-over of everything
//! written meanwhile; slices need neither.
//!
//! Output is written in `FLUSH_BYTES` pieces and synced every
//! `SYNC_BYTES`, so the fsync before the rename (failpoint
//! `compact::fsync`) has little left to write and the switch stays short.

use std::collections::{HashMap, HashSet};
use std::ops::Bound;
use std::sync::Arc;

use super::format::*;
use super::holdings::{range_is_due, worker_is_forgettable, HeldWorker, Holdings};
use crate::failpoint;
use crate::failpoint::io_error;
use crate::store::fs::{Fs, FsFile};
use crate::store::PruneRequest;

/// Log bytes read per slice: the longest a reservation waits for a
/// compaction (about a millisecond of parsing and copying).
pub(super) const SLICE_BYTES: u64 = 256 * 1024;
/// Log bytes read at a time (a record is at most `MAX_RECORD_LEN` + 8).
const READ_BYTES: u64 = 64 * 1024;
/// Output buffered before it is written to the compaction file.
const FLUSH_BYTES: usize = 64 * 1024;
/// Output written between fsyncs of the compaction file.
const SYNC_BYTES: u64 = 1024 * 1024;
/// Workers written per slice of phase (2).
const WORKERS_PER_SLICE: usize = 4096;

/// Where a pass stands (see the module docs).
enum Phase {
    /// Reading the log for its ranges.
    Ranges,
    /// Writing the workers after this one (by name), copying what is
    /// committed meanwhile.
    Workers { after: Option<Arc<str>> },
    /// Every worker written; copying what is committed until the switch.
    Tail,
}

/// A compaction's pass, between slices.
pub(super) struct Pass {
    pub(super) request: PruneRequest,
    pub(super) file: Box<dyn FsFile>,
    /// The next live-log byte to read.
    read_at: u64,
    /// Bytes read but not yet parsed: a record cut by the end of a read.
    carry: Vec<u8>,
    /// The sequence number the next live-log record must carry.
    expected_seq: u64,
    /// Output not yet written.
    out: Vec<u8>,
    /// Output written so far (the offset of the next write).
    written: u64,
    /// Output written since the last fsync.
    unsynced: u64,
    /// The sequence number of the next record written.
    pub(super) next_seq: u64,
    pub(super) generation: u32,
    /// The highest end of a range dropped (0 if none).
    pub(super) dropped_below: u64,
    /// Ranges dropped, per owner.
    pub(super) dropped: HashMap<Arc<str>, u64>,
    pub(super) ranges_kept: u64,
    phase: Phase,
    /// Workers phase (2) left out as forgettable.
    omitted: Vec<Arc<str>>,
    /// Workers named by a record copied after phase (1).
    named: HashSet<Arc<str>>,
}

/// A compacted log, written and synced, not yet renamed into place.
pub(super) struct Finished {
    pub(super) file: Box<dyn FsFile>,
    pub(super) len: u64,
    pub(super) next_seq: u64,
    pub(super) generation: u32,
    pub(super) pruned_below: u64,
    pub(super) forgotten: Vec<Arc<str>>,
}

impl Pass {
    /// Creates the compaction file for the generation after `generation`.
    pub(super) fn start(
        fs: &dyn Fs,
        files: &Files,
        request: PruneRequest,
        generation: u32,
    ) -> std::io::Result<Self> {
        failpoint!("compact::write", io_error("compact::write"));
        let file = fs.create(&files.compact)?;
        let generation = generation + 1;
        Ok(Self {
            request,
            file,
            read_at: LOG_HEADER_LEN,
            carry: Vec::new(),
            expected_seq: 1,
            out: encode_log_header(generation),
            written: 0,
            unsynced: 0,
            next_seq: 1,
            generation,
            dropped_below: 0,
            dropped: HashMap::new(),
            ranges_kept: 0,
            phase: Phase::Ranges,
            omitted: Vec::new(),
            named: HashSet::new(),
        })
    }

    /// Runs one slice of the pass; true once it is ready to switch (every
    /// worker written and the live log, `log_len` long, read to its end).
    pub(super) fn advance(
        &mut self,
        log: &dyn FsFile,
        log_len: u64,
        budget: u64,
        holdings: &Holdings,
    ) -> std::io::Result<bool> {
        let caught_up = self.read_log(log, log_len, budget, holdings)?;
        match &self.phase {
            Phase::Ranges => {
                if caught_up {
                    self.phase = Phase::Workers { after: None };
                }
                Ok(false)
            }
            Phase::Workers { after } => {
                let after = after.clone();
                let last = self.write_workers(holdings, after)?;
                self.phase = match last {
                    Some(name) => Phase::Workers { after: Some(name) },
                    None => Phase::Tail,
                };
                Ok(false)
            }
            Phase::Tail => Ok(caught_up),
        }
    }

    /// Writes up to `WORKERS_PER_SLICE` workers after `after`; returns the
    /// last one written, or `None` once there are none left.
    fn write_workers(
        &mut self,
        holdings: &Holdings,
        after: Option<Arc<str>>,
    ) -> std::io::Result<Option<Arc<str>>> {
        let from = match &after {
            Some(name) => Bound::Excluded(name),
            None => Bound::Unbounded,
        };
        let mut last = None;
        for (name, worker) in holdings
            .workers
            .range::<Arc<str>, _>((from, Bound::Unbounded))
            .take(WORKERS_PER_SLICE)
        {
            if self.forgettable(name, worker) {
                self.omitted.push(name.clone());
            } else {
                self.push_worker(name, worker);
            }
            if self.out.len() >= FLUSH_BYTES {
                self.flush()?;
            }
            last = Some(name.clone());
        }
        Ok(last)
    }

    /// A worker's records, as the holdings have it.
    fn push_worker(&mut self, name: &Arc<str>, worker: &HeldWorker) {
        self.push(&Record::Register(name.clone(), worker.dp_size));
        if let Some(unix_ms) = worker.deregistered_unix_ms {
            self.push(&Record::Deregister {
                worker: name.clone(),
                unix_ms,
            });
        }
        self.push(&Record::Issued(name.clone(), worker.rooms_issued));
    }

    /// Reads up to `budget` more bytes of the live log (`log_len` long),
    /// keeping its ranges that are not due; true once all of it is read.
    /// `holdings` lends its workers' names, so counting what is dropped
    /// allocates no name again.
    fn read_log(
        &mut self,
        log: &dyn FsFile,
        log_len: u64,
        budget: u64,
        holdings: &Holdings,
    ) -> std::io::Result<bool> {
        let mut read = 0;
        while self.read_at < log_len && read < budget {
            let want = READ_BYTES.min(log_len - self.read_at);
            let from = self.carry.len();
            self.carry
                .resize(from + usize::try_from(want).expect("64 KiB fits"), 0);
            log.read_exact_at(&mut self.carry[from..], self.read_at)?;
            self.read_at += want;
            read += want;
            let parsed = self.take_records(holdings)?;
            self.carry.drain(..parsed);
            if self.out.len() >= FLUSH_BYTES {
                self.flush()?;
            }
        }
        if self.read_at < log_len {
            return Ok(false);
        }
        if !self.carry.is_empty() {
            // Everything below log_len was committed by this writer.
            return Err(invalid("the log ends inside a record"));
        }
        Ok(true)
    }

    /// Parses every whole record in `carry`; returns the bytes they take.
    fn take_records(&mut self, holdings: &Holdings) -> std::io::Result<usize> {
        let mut at = 0;
        loop {
            let rest = &self.carry[at..];
            let Some(header) = rest.get(..4) else {
                return Ok(at);
            };
            let len = u32::from_le_bytes(header.try_into().expect("4 bytes"));
            if len > MAX_RECORD_LEN {
                return Err(invalid(&format!("a record claims {len} bytes")));
            }
            let whole = 8 + usize::try_from(len).expect("u32 fits in usize");
            if rest.len() < whole {
                return Ok(at);
            }
            let (record, _) = parse_record(&rest[..whole], self.expected_seq)
                .map_err(|reason| invalid(&reason))?;
            self.expected_seq += 1;
            at += whole;
            // After phase (1), what is committed is copied as it comes.
            let copying = !matches!(self.phase, Phase::Ranges);
            let shared = |worker: Arc<str>| {
                holdings
                    .workers
                    .get_key_value(&worker)
                    .map_or(worker, |(name, _)| name.clone())
            };
            match record {
                Record::Reserve {
                    worker,
                    range,
                    rooms_issued,
                    created_unix_ms,
                } => {
                    let worker = shared(worker);
                    if copying {
                        self.named.insert(worker.clone());
                    }
                    if range_is_due(&self.request, created_unix_ms, range.start()) {
                        self.dropped_below = self.dropped_below.max(range.end());
                        *self.dropped.entry(worker).or_insert(0) += 1;
                    } else {
                        self.push(&Record::Reserve {
                            worker,
                            range,
                            rooms_issued,
                            created_unix_ms,
                        });
                        self.ranges_kept += 1;
                    }
                }
                Record::Register(ref worker, _)
                | Record::Deregister { ref worker, .. }
                | Record::Issued(ref worker, _)
                    if copying =>
                {
                    self.named.insert(shared(worker.clone()));
                    self.push(&record);
                }
                // Phase (2) writes the workers as the holdings have them.
                Record::Register(..)
                | Record::Deregister { .. }
                | Record::Issued(..)
                | Record::Pruned(_)
                | Record::Probe => {}
            }
        }
    }

    /// Closes the file (see the module docs): each worker left out or
    /// named meanwhile is written again as the holdings have it, unless it
    /// may be forgotten and no record names it; then the `pruned` record,
    /// and a sync. Ready to be renamed into place.
    pub(super) fn finish(mut self, holdings: &Holdings) -> std::io::Result<Finished> {
        let mut forgotten = Vec::new();
        let omitted = std::mem::take(&mut self.omitted);
        let named = std::mem::take(&mut self.named);
        for name in omitted.iter().filter(|name| !named.contains(*name)) {
            let Some(worker) = holdings.workers.get(name) else {
                continue;
            };
            if self.forgettable(name, worker) {
                forgotten.push(name.clone());
            } else {
                self.push_worker(name, worker);
            }
            if self.out.len() >= FLUSH_BYTES {
                self.flush()?;
            }
        }
        // A worker a copied record names is in the compacted log already:
        // it is kept, as the holdings have it now.
        for name in &named {
            if let Some(worker) = holdings.workers.get(name) {
                self.push_worker(name, worker);
            }
            if self.out.len() >= FLUSH_BYTES {
                self.flush()?;
            }
        }
        let pruned_below = holdings.pruned_below.max(self.dropped_below);
        self.push(&Record::Pruned(pruned_below));
        self.flush()?;
        failpoint!("compact::fsync", io_error("compact::fsync"));
        self.file.sync_data()?;
        Ok(Finished {
            file: self.file,
            len: self.written,
            next_seq: self.next_seq,
            generation: self.generation,
            pruned_below,
            forgotten,
        })
    }

    /// Whether the pass has dropped nothing and may forget no one: then
    /// there is nothing to switch to.
    pub(super) fn drops_nothing(&self, holdings: &Holdings) -> bool {
        self.dropped.is_empty()
            && self.omitted.iter().all(|name| {
                self.named.contains(name)
                    || holdings
                        .workers
                        .get(name)
                        .is_none_or(|worker| !self.forgettable(name, worker))
            })
    }

    /// Whether `worker` may be forgotten, given what this pass dropped.
    fn forgettable(&self, name: &Arc<str>, worker: &HeldWorker) -> bool {
        let dropped = self.dropped.get(name).copied().unwrap_or(0);
        worker_is_forgettable(worker, self.request.cutoff_unix_ms, dropped)
    }

    fn push(&mut self, record: &Record) {
        encode_record(&mut self.out, self.next_seq, record);
        self.next_seq += 1;
    }

    /// Writes the buffered output; syncs every `SYNC_BYTES`, so the final
    /// fsync is short.
    fn flush(&mut self) -> std::io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        self.file.write_all_at(&self.out, self.written)?;
        let len = u64::try_from(self.out.len()).expect("a buffer fits in u64");
        self.written += len;
        self.unsynced += len;
        self.out.clear();
        if self.unsynced >= SYNC_BYTES {
            self.file.sync_data()?;
            self.unsynced = 0;
        }
        Ok(())
    }
}

fn invalid(reason: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, reason.to_owned())
}
