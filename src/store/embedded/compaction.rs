//! One compaction's streaming pass: the live log is read through a bounded
//! buffer, record by record, and the ranges it keeps are written to
//! `rooms.log.compact` as they are read; the workers' records (from the
//! writer's `Holdings`) and a `pruned` record close the file. Memory is the
//! buffers plus a count of dropped ranges per worker, whatever the log's
//! size; no second copy of the state is built.
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

use std::collections::HashMap;
use std::sync::Arc;

use super::format::*;
use super::holdings::{range_is_due, Holdings};
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
        })
    }

    /// Reads up to `budget` more bytes of the live log (`log_len` long),
    /// keeping its ranges that are not due; true once all of it is read.
    pub(super) fn advance(
        &mut self,
        log: &dyn FsFile,
        log_len: u64,
        budget: u64,
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
            let parsed = self.take_records()?;
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
    fn take_records(&mut self) -> std::io::Result<usize> {
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
            if let Record::Reserve {
                worker,
                range,
                created_unix_ms,
                ..
            } = record
            {
                if range_is_due(&self.request, created_unix_ms, range.start()) {
                    self.dropped_below = self.dropped_below.max(range.end());
                    *self.dropped.entry(worker).or_insert(0) += 1;
                } else {
                    // Its rooms_issued is in the worker's `issued` record.
                    let kept = Record::Reserve {
                        worker,
                        range,
                        rooms_issued: 0,
                        created_unix_ms,
                    };
                    encode_record(&mut self.out, self.next_seq, &kept);
                    self.next_seq += 1;
                    self.ranges_kept += 1;
                }
            }
        }
    }

    /// The workers this compaction forgets, given what it dropped.
    pub(super) fn forgets(&self, holdings: &Holdings) -> Vec<Arc<str>> {
        holdings.forgettable(self.request.cutoff_unix_ms, &self.dropped)
    }

    /// Writes the workers (all but `forgotten`) and the `pruned` record,
    /// then syncs the file: ready to be renamed into place.
    pub(super) fn finish(
        mut self,
        holdings: &Holdings,
        forgotten: Vec<Arc<str>>,
    ) -> std::io::Result<Finished> {
        let forgotten_set: std::collections::HashSet<&Arc<str>> = forgotten.iter().collect();
        for (name, worker) in &holdings.workers {
            if forgotten_set.contains(name) {
                continue;
            }
            self.push(&Record::Register(name.clone(), worker.dp_size));
            if let Some(unix_ms) = worker.deregistered_unix_ms {
                self.push(&Record::Deregister {
                    worker: name.clone(),
                    unix_ms,
                });
            }
            self.push(&Record::Issued(name.clone(), worker.rooms_issued));
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
