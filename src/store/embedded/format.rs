//! The embedded store's on-disk format: file names, the log header and
//! records, the commit slots (and the version-1 slot layout still read),
//! and their codecs. Pure: bytes in, values out; nothing here does I/O.
//!
//! # Files in the data dir
//! - `LOCK`: empty; an exclusive `flock` while a server runs, so two servers
//!   never share one room space.
//! - `MIGRATED`: written by `room-allocator migrate` before it copies anything
//!   into etcd (`pending <target>`), and again once the copy is complete
//!   (`complete <target>`); the store then refuses to serve (and so does an
//!   unreadable `MIGRATED`: fail closed). `migrate` reruns a pending
//!   migration and refuses a complete one.
//! - `STORE_ID`: the store's id, a UUID written (durably) at its first start
//!   or, for a store from before ids, at its next one (see `store_id`, which
//!   also says when `serve` may create a store and `migrate` may read one).
//! - `rooms.log`: a 16-byte header, `b"RALLOCLG"`, format version (u32 LE),
//!   generation (u32 LE, +1 at each compaction), then records. A record is
//!   `len: u32 LE`, `crc32: u32 LE` of the body, and a body of `len` bytes:
//!   `seq: u64 LE` (1, 2, 3, ... with no gap), `kind: u8`, then fields
//!   (strings are `u16 LE` length + UTF-8):
//!   - 1 register: worker, dp_size u32
//!   - 2 deregister: worker (written by 0.1; read as deregistered at time 0)
//!   - 3 reserve: worker, dp_size u32, start u64, end u64, rooms_issued u64,
//!     created_unix_ms u64
//!   - 4 issued: worker, rooms_issued u64
//!   - 5 pruned: below u64 (ranges ending at or below it were dropped by
//!     retention; the high-water mark is at least this)
//!   - 6 deregister: worker, deregistered_unix_ms u64
//!   - 7 probe: nothing (a write that checks the disk takes writes again)
//! - `rooms.commit`: 8 KiB, two slots at offsets 0 and 4096 (each at the
//!   start of its own 4 KiB block, the rest zeros), each `b"RALLOCCM"`,
//!   version u32 (2), log generation u32, `commit_seq: u64`, `log_len: u64`,
//!   crc32 of the preceding 32 bytes. Commit `n` goes to slot `n % 2`, so
//!   the slot of the previous commit is never written over; numbers may skip
//!   (see "Opening" in `recovery`). Format version 1 (up to issue 16) had the same slots,
//!   version 1, at offsets 0 and 512 of a 1 KiB file, so a device that tears
//!   4 KiB at a time could destroy both: it is still read (by its length),
//!   and upgraded at open: an 8 KiB file holding the same commit (in both
//!   slots, as `n` and `n + 1`, so a version-1 binary finds version 2 in slot
//!   0 and refuses) is written to `rooms.commit.tmp`, fsynced, renamed over
//!   `rooms.commit`, and the directory fsynced. A crash at any step leaves one
//!   whole file or the other, and the old one is upgraded at the next start.
//!
//! A registration's revision is `generation << 40 | seq` of its record: it
//! only grows, across compactions too.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::space::{DpSize, RoomRange};

pub(super) const LOG_FILE: &str = "rooms.log";
pub(super) const COMMIT_FILE: &str = "rooms.commit";
pub(super) const COMPACT_FILE: &str = "rooms.log.compact";
pub(super) const LOCK_FILE: &str = "LOCK";
/// Written by `migrate`: the dir's room space now lives in etcd.
pub(super) const MIGRATED_FILE: &str = "MIGRATED";
pub(super) const LOG_MAGIC: &[u8; 8] = b"RALLOCLG";
pub(super) const COMMIT_MAGIC: &[u8; 8] = b"RALLOCCM";
pub(super) const LOG_VERSION: u32 = 1;
pub(super) const LOG_HEADER_LEN: u64 = 16;
/// The commit file's format: each slot at the start of its own 4 KiB block,
/// so a torn write of one (even on a device that rewrites 4 KiB at a time)
/// cannot reach the other.
pub(super) const COMMIT_VERSION: u32 = 2;
pub(super) const SLOT_SPACING: u64 = 4096;
/// The first format: both slots in the first 1 KiB, 512 bytes apart. Read,
/// and upgraded at open.
pub(super) const COMMIT_VERSION_V1: u32 = 1;
pub(super) const SLOT_SPACING_V1: u64 = 512;
/// A slot: the body, then its crc32.
pub(super) const SLOT_BODY_LEN: usize = 32;
pub(super) const SLOT_LEN: usize = SLOT_BODY_LEN + 4;
/// Larger than any valid record (a worker name is at most 253 bytes); a
/// longer length field is damage, not a record.
pub(super) const MAX_RECORD_LEN: u32 = 4096;
/// Revisions are `generation << REVISION_SHIFT | seq`.
pub(super) const REVISION_SHIFT: u32 = 40;

pub(super) const KIND_REGISTER: u8 = 1;
pub(super) const KIND_DEREGISTER_V0: u8 = 2;
pub(super) const KIND_RESERVE: u8 = 3;
pub(super) const KIND_ISSUED: u8 = 4;
pub(super) const KIND_PRUNED: u8 = 5;
pub(super) const KIND_DEREGISTER: u8 = 6;
pub(super) const KIND_PROBE: u8 = 7;

/// The store's paths.
#[derive(Debug, Clone)]
pub(super) struct Files {
    pub(super) dir: PathBuf,
    pub(super) log: PathBuf,
    pub(super) commit: PathBuf,
    pub(super) compact: PathBuf,
}

impl Files {
    pub(super) fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            log: dir.join(LOG_FILE),
            commit: dir.join(COMMIT_FILE),
            compact: dir.join(COMPACT_FILE),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Slot {
    pub(super) commit_seq: u64,
    pub(super) log_len: u64,
    pub(super) generation: u32,
    /// The other slot holds a valid (older) commit too.
    pub(super) other_valid: bool,
    /// The commit file's format (a version-1 file is upgraded at open).
    pub(super) version: u32,
}

/// Where commit `commit_seq` goes (commit `n` goes to slot `n % 2`).
pub(super) fn slot_offset(commit_seq: u64) -> u64 {
    (commit_seq % 2) * SLOT_SPACING
}

pub(super) fn encode_log_header(generation: u32) -> Vec<u8> {
    let mut header = Vec::with_capacity(16);
    header.extend_from_slice(LOG_MAGIC);
    header.extend_from_slice(&LOG_VERSION.to_le_bytes());
    header.extend_from_slice(&generation.to_le_bytes());
    header
}

pub(super) fn encode_slot(commit_seq: u64, log_len: u64, generation: u32) -> Vec<u8> {
    encode_slot_version(COMMIT_VERSION, commit_seq, log_len, generation)
}

pub(super) fn encode_slot_version(
    version: u32,
    commit_seq: u64,
    log_len: u64,
    generation: u32,
) -> Vec<u8> {
    let mut slot = Vec::with_capacity(SLOT_LEN);
    slot.extend_from_slice(COMMIT_MAGIC);
    slot.extend_from_slice(&version.to_le_bytes());
    slot.extend_from_slice(&generation.to_le_bytes());
    slot.extend_from_slice(&commit_seq.to_le_bytes());
    slot.extend_from_slice(&log_len.to_le_bytes());
    let crc = crc32fast::hash(&slot);
    slot.extend_from_slice(&crc.to_le_bytes());
    slot
}

/// Why a commit file is unusable; `read_commit` turns it into an [`OpenError`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CommitProblem {
    TooShort(u64),
    Foreign,
    Version(u32),
    BothDamaged,
    /// A slot whose checksum holds but which we never wrote: commit `n`
    /// goes to slot `n % 2`, so a slot elsewhere is damage, not a torn write.
    Misplaced {
        slot: usize,
        commit_seq: u64,
    },
    /// A valid slot of the other format than the file's length says: a
    /// version-2 file cut short, or a version-1 file grown.
    WrongLayout {
        slot: usize,
        version: u32,
    },
}

/// The newest valid slot of a commit file's bytes: (commit_seq, generation,
/// log_len). A fuzz target: never panics, and accepts only slots whose
/// checksum holds, each in the position its commit_seq puts it.
#[cfg(test)]
pub(crate) fn decode_commit(bytes: &[u8]) -> Result<(u64, u32, u64), CommitProblem> {
    decode_slots(bytes).map(|slot| (slot.commit_seq, slot.generation, slot.log_len))
}

/// The newest valid slot, whether the other is valid too, and the file's
/// format (by its length: 8 KiB for version 2, 1 KiB for version 1).
pub(super) fn decode_slots(bytes: &[u8]) -> Result<Slot, CommitProblem> {
    let len = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
    let (file_version, spacing) = if len >= 2 * SLOT_SPACING {
        (COMMIT_VERSION, SLOT_SPACING)
    } else if len >= 2 * SLOT_SPACING_V1 {
        (COMMIT_VERSION_V1, SLOT_SPACING_V1)
    } else {
        return Err(CommitProblem::TooShort(len));
    };
    let spacing = usize::try_from(spacing).expect("4 KiB fits");
    let slots = [&bytes[..SLOT_LEN], &bytes[spacing..spacing + SLOT_LEN]];
    if slots.iter().all(|slot| &slot[..8] != COMMIT_MAGIC) {
        return Err(CommitProblem::Foreign);
    }
    let mut best: Option<(u64, u32, u64)> = None;
    let mut valid_slots = 0;
    for (index, slot) in slots.into_iter().enumerate() {
        let mut reader = Reader::new(slot);
        let (magic, version, generation, commit_seq, log_len) = (
            reader.bytes(8),
            reader.u32(),
            reader.u32(),
            reader.u64(),
            reader.u64(),
        );
        let crc = reader.u32();
        let valid = magic == Some(&COMMIT_MAGIC[..])
            && crc == Some(crc32fast::hash(&slot[..SLOT_BODY_LEN]));
        let (true, Some(version), Some(generation), Some(commit_seq), Some(log_len)) =
            (valid, version, generation, commit_seq, log_len)
        else {
            continue;
        };
        if version != COMMIT_VERSION && version != COMMIT_VERSION_V1 {
            return Err(CommitProblem::Version(version));
        }
        if version != file_version {
            return Err(CommitProblem::WrongLayout {
                slot: index,
                version,
            });
        }
        if commit_seq % 2 != index as u64 {
            return Err(CommitProblem::Misplaced {
                slot: index,
                commit_seq,
            });
        }
        valid_slots += 1;
        if best.is_none_or(|(seq, ..)| commit_seq > seq) {
            best = Some((commit_seq, generation, log_len));
        }
    }
    best.map(|(commit_seq, generation, log_len)| Slot {
        commit_seq,
        log_len,
        generation,
        other_valid: valid_slots == 2,
        version: file_version,
    })
    .ok_or(CommitProblem::BothDamaged)
}

/// One log record, as parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Record {
    Register(Arc<str>, DpSize),
    Deregister {
        worker: Arc<str>,
        unix_ms: u64,
    },
    Reserve {
        worker: Arc<str>,
        range: RoomRange,
        rooms_issued: u64,
        created_unix_ms: u64,
    },
    Issued(Arc<str>, u64),
    Pruned(u64),
    Probe,
}

/// Parses the record at the start of `bytes`, which must carry sequence
/// number `expected_seq`; returns it and its length. A fuzz target: never
/// panics, and accepts only a record whose checksum holds and whose fields
/// are valid (a range aligned to its dp_size, names of at most 253 bytes).
pub(crate) fn parse_record(bytes: &[u8], expected_seq: u64) -> Result<(Record, u64), String> {
    let mut header = Reader::new(bytes);
    let (Some(len), Some(crc)) = (header.u32(), header.u32()) else {
        return Err("a record header is cut short".into());
    };
    if len > MAX_RECORD_LEN {
        return Err(format!("a record claims {len} bytes"));
    }
    let body = header
        .bytes(usize::try_from(len).expect("u32 fits in usize"))
        .ok_or("a record is cut short")?;
    if crc32fast::hash(body) != crc {
        return Err("a record fails its checksum".into());
    }
    let mut reader = Reader::new(body);
    let seq = reader.u64().ok_or("a record has no sequence number")?;
    if seq != expected_seq {
        return Err(format!("record {seq} found where {expected_seq} belongs"));
    }
    let kind = reader.u8().ok_or("a record has no kind")?;
    let bad = || format!("record {seq} of kind {kind} has bad fields");
    let record = match kind {
        KIND_REGISTER => Record::Register(
            reader.worker().ok_or_else(bad)?,
            reader
                .u32()
                .and_then(|n| DpSize::try_new(n).ok())
                .ok_or_else(bad)?,
        ),
        KIND_DEREGISTER_V0 => Record::Deregister {
            worker: reader.worker().ok_or_else(bad)?,
            unix_ms: 0,
        },
        KIND_DEREGISTER => Record::Deregister {
            worker: reader.worker().ok_or_else(bad)?,
            unix_ms: reader.u64().ok_or_else(bad)?,
        },
        KIND_RESERVE => {
            let worker = reader.worker().ok_or_else(bad)?;
            let dp_size = reader.u32().and_then(|n| DpSize::try_new(n).ok());
            let (start, end, rooms_issued, created) =
                (reader.u64(), reader.u64(), reader.u64(), reader.u64());
            let range = match (dp_size, start, end) {
                (Some(d), Some(start), Some(end)) => RoomRange::from_parts(start, end, d),
                _ => None,
            };
            Record::Reserve {
                worker,
                range: range.ok_or_else(bad)?,
                rooms_issued: rooms_issued.ok_or_else(bad)?,
                created_unix_ms: created.ok_or_else(bad)?,
            }
        }
        KIND_PRUNED => Record::Pruned(reader.u64().ok_or_else(bad)?),
        KIND_ISSUED => Record::Issued(
            reader.worker().ok_or_else(bad)?,
            reader.u64().ok_or_else(bad)?,
        ),
        KIND_PROBE => Record::Probe,
        _ => return Err(format!("record {seq} has unknown kind {kind}")),
    };
    if !reader.is_empty() {
        return Err(bad());
    }
    Ok((record, 8 + u64::from(len)))
}

/// Encodes `record` with sequence number `seq` (the inverse of `parse_record`).
pub(crate) fn encode_record(buf: &mut Vec<u8>, seq: u64, record: &Record) {
    let header_at = buf.len();
    buf.extend_from_slice(&[0u8; 8]);
    let body_at = buf.len();
    buf.extend_from_slice(&seq.to_le_bytes());
    match record {
        Record::Register(worker, dp_size) => {
            buf.push(KIND_REGISTER);
            put_str(buf, worker);
            buf.extend_from_slice(&dp_size.get().to_le_bytes());
        }
        Record::Deregister { worker, unix_ms } => {
            buf.push(KIND_DEREGISTER);
            put_str(buf, worker);
            buf.extend_from_slice(&unix_ms.to_le_bytes());
        }
        Record::Reserve {
            worker,
            range,
            rooms_issued,
            created_unix_ms,
        } => {
            buf.push(KIND_RESERVE);
            put_str(buf, worker);
            buf.extend_from_slice(&range.dp_size().get().to_le_bytes());
            buf.extend_from_slice(&range.start().to_le_bytes());
            buf.extend_from_slice(&range.end().to_le_bytes());
            buf.extend_from_slice(&rooms_issued.to_le_bytes());
            buf.extend_from_slice(&created_unix_ms.to_le_bytes());
        }
        Record::Issued(worker, rooms_issued) => {
            buf.push(KIND_ISSUED);
            put_str(buf, worker);
            buf.extend_from_slice(&rooms_issued.to_le_bytes());
        }
        Record::Pruned(below) => {
            buf.push(KIND_PRUNED);
            buf.extend_from_slice(&below.to_le_bytes());
        }
        Record::Probe => buf.push(KIND_PROBE),
    }
    let len = u32::try_from(buf.len() - body_at).expect("records are far below 4 GiB");
    let crc = crc32fast::hash(&buf[body_at..]);
    buf[header_at..header_at + 4].copy_from_slice(&len.to_le_bytes());
    buf[header_at + 4..body_at].copy_from_slice(&crc.to_le_bytes());
}

pub(super) fn put_str(buf: &mut Vec<u8>, s: &str) {
    let len = u16::try_from(s.len()).expect("worker names are validated to 253 bytes");
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

pub(super) fn revision(generation: u32, seq: u64) -> i64 {
    let revision = (u64::from(generation) << REVISION_SHIFT) | (seq & ((1 << REVISION_SHIFT) - 1));
    i64::try_from(revision).unwrap_or(i64::MAX)
}

/// Little-endian reads that return None instead of running off the end.
pub(super) struct Reader<'a> {
    pub(super) bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(super) fn new(bytes: &'a [u8]) -> Self {
        Self { bytes }
    }

    pub(super) fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.bytes.split_at_checked(n)?;
        self.bytes = rest;
        Some(head)
    }

    pub(super) fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.bytes(N)?.try_into().ok()
    }

    pub(super) fn u8(&mut self) -> Option<u8> {
        self.array::<1>().map(|[b]| b)
    }

    pub(super) fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_le_bytes)
    }

    pub(super) fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_le_bytes)
    }

    /// A worker name: UTF-8 that passes the same checks as a request's.
    pub(super) fn worker(&mut self) -> Option<Arc<str>> {
        let len = self.array().map(u16::from_le_bytes)?;
        let bytes = self.bytes(usize::from(len))?;
        let name = std::str::from_utf8(bytes).ok()?;
        crate::names::validate_worker(name).ok()?;
        Some(Arc::from(name))
    }

    pub(super) fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}
