//! The embedded store: a checksummed append-only log plus two commit slots.
//!
//! # Why not an embedded database
//! The state is tiny (registrations and one record per reserved range) and is
//! only ever appended to. redb would work, but it repairs a file in place after
//! an unclean shutdown, while we want every damaged file left exactly as found
//! and a refusal to start. A 300-line format we fully control gives that, with
//! no extra dependency and a commit protocol that fits on one screen.
//!
//! # Files in the data dir
//! - `LOCK`: empty; an exclusive `flock` while a server runs, so two servers
//!   never share one room space.
//! - `MIGRATED`: written by `room-allocator migrate`, naming the etcd the
//!   space moved to; the store then refuses to open.
//! - `rooms.log`: a 16-byte header, `b"RALLOCLG"`, format version (u32 LE),
//!   generation (u32 LE, +1 at each compaction), then records. A record is `len: u32 LE`, `crc32: u32 LE` of
//!   the body, and a body of `len` bytes: `seq: u64 LE` (1, 2, 3, ... with no
//!   gap), `kind: u8`, then fields (strings are `u16 LE` length + UTF-8):
//!   - 1 register: worker, dp_size u32
//!   - 2 deregister: worker
//!   - 3 reserve: worker, dp_size u32, start u64, end u64, rooms_issued u64,
//!     created_unix_ms u64
//!   - 4 issued: worker, rooms_issued u64
//!   - 5 pruned: below u64 (ranges ending at or below it were dropped by
//!     retention; the high-water mark is at least this)
//! - `rooms.commit`: two 512-byte slots at offsets 0 and 512, each
//!   `b"RALLOCCM"`, version u32, log generation u32, `commit_seq: u64`,
//!   `log_len: u64`, crc32 of the preceding 32 bytes. Commit `n` goes to slot
//!   `n % 2`, so the slot of the previous commit is never written over.
//!
//! # Commit protocol
//! A writer thread takes every queued request (group commit), appends their
//! records at the end of the log, fsyncs the log, then writes the other
//! commit slot with the new `log_len` and fsyncs it. Only then are callers
//! answered, so a range is durable before any room in it leaves the process.
//! On an I/O error nothing is answered with success and the in-memory state is
//! left as before; the next attempt writes over the failed bytes.
//!
//! # Opening, and the crash cases
//! The valid slot with the highest `commit_seq` says how many log bytes were
//! acknowledged. Every record below `log_len` must parse and checksum, and the
//! file must be at least that long: otherwise the store refuses to open (corrupt
//! or truncated), naming the file and leaving it untouched. Past `log_len`,
//! records that are complete and valid are adopted too: a crash between the
//! log fsync and the slot write leaves them durable but unacknowledged, and a
//! newest slot damaged after its acknowledgment looks the same, so counting
//! them as reserved is the answer that is safe in both cases (at worst some
//! numbers are skipped). The first invalid record past `log_len` is a torn
//! write of an unacknowledged commit; it is ignored and later written over.
//! A log holding only its header and no commit file is an interrupted first
//! start and is initialised again; any other missing file is refused.
//!
//! # Compaction (retention)
//! Pruning old ranges rewrites the log: the current registrations, counters,
//! the ranges kept and a `pruned` record go to `rooms.log.compact` with the
//! next generation, which is fsynced and renamed over `rooms.log` (and the
//! directory fsynced) before the commit slot names the new generation. A log
//! one generation ahead of the commit slot is therefore a compaction that
//! finished its rename: it is complete, and every byte of it must be valid. A
//! leftover `rooms.log.compact` is a compaction that did not get that far and
//! is removed.
//!
//! # Media assumptions
//! fsync (`sync_data`) makes written bytes durable; a torn write damages at
//! most the bytes being written; the two slots lie in different 512-byte
//! sectors. Checksums catch torn or rotted bytes; they are not cryptographic.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;

use tokio::sync::oneshot;
use tracing::{info, warn};

use super::{
    IssuedCount, OpenError, Reservation, Snapshot, Store, StoreError, StoreFuture, WorkerRecord,
};
use crate::space::{DpSize, RangeOwner, RangeTable, RoomRange};

const LOG_FILE: &str = "rooms.log";
const COMMIT_FILE: &str = "rooms.commit";
const LOCK_FILE: &str = "LOCK";
const LOG_MAGIC: &[u8; 8] = b"RALLOCLG";
const COMMIT_MAGIC: &[u8; 8] = b"RALLOCCM";
const FORMAT_VERSION: u32 = 1;
const LOG_HEADER_LEN: u64 = 16;
/// One slot per 512-byte sector, so a torn slot write cannot reach the other.
const SLOT_LEN: u64 = 512;
const SLOT_BODY_LEN: usize = 32;
/// Larger than any valid record (a worker name is at most 253 bytes); a
/// longer length field is damage, not a record.
const MAX_RECORD_LEN: u32 = 4096;
/// Most requests folded into one group commit; bounds the batch's memory.
const MAX_BATCH: usize = 1024;

const KIND_REGISTER: u8 = 1;
const KIND_DEREGISTER: u8 = 2;
const KIND_RESERVE: u8 = 3;
const KIND_ISSUED: u8 = 4;
const KIND_PRUNED: u8 = 5;
const COMPACT_FILE: &str = "rooms.log.compact";
/// Written by `migrate`: the dir's room space now lives in etcd.
const MIGRATED_FILE: &str = "MIGRATED";

/// The embedded store handle: requests go to one writer thread.
pub struct EmbeddedStore {
    requests: Mutex<Option<mpsc::Sender<Request>>>,
    writer: Mutex<Option<thread::JoinHandle<()>>>,
}

enum Op {
    Register(Arc<str>, DpSize),
    Deregister(Arc<str>),
    Reserve(Reservation),
    Issued(Vec<(Arc<str>, u64)>),
    Prune(u64),
}

enum Outcome {
    Done,
    Reserved(RoomRange),
    Pruned(u64),
}

struct Request {
    op: Op,
    reply: oneshot::Sender<Result<Outcome, StoreError>>,
}

impl EmbeddedStore {
    /// Opens (or creates) the store in `dir`, returning what it holds.
    /// `limit` is the exclusive end of the space this store may reserve.
    pub fn open(dir: &Path, limit: u64) -> Result<(Self, Snapshot), OpenError> {
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| OpenError::Io { path, source }
        };
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Err(OpenError::Locked { path: lock_path }),
            Err(TryLockError::Error(source)) => {
                return Err(OpenError::Io {
                    path: lock_path,
                    source,
                })
            }
        }

        let migrated_path = dir.join(MIGRATED_FILE);
        if let Ok(target) = fs::read_to_string(&migrated_path) {
            return Err(OpenError::Migrated {
                path: migrated_path,
                target: target.trim().to_owned(),
            });
        }
        let log_path = dir.join(LOG_FILE);
        let commit_path = dir.join(COMMIT_FILE);
        let fresh = prepare_files(dir, &log_path, &commit_path)?;
        let commit = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&commit_path)
            .map_err(io_err(&commit_path))?;
        let log = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&log_path)
            .map_err(io_err(&log_path))?;

        let slot = read_commit(&commit, &commit_path)?;
        let loaded = read_log(&log, &log_path, slot)?;
        let compact_path = dir.join(COMPACT_FILE);
        if compact_path.exists() {
            // A compaction that died before its rename; the log is intact.
            fs::remove_file(&compact_path).map_err(io_err(&compact_path))?;
        }
        if fresh {
            info!(dir = %dir.display(), "created a new embedded store");
        } else {
            info!(
                dir = %dir.display(),
                ranges = loaded.snapshot.ranges.len(),
                workers = loaded.snapshot.workers.len(),
                high_water = loaded.snapshot.ranges.high_water(),
                "opened the embedded store; resuming past every reserved range"
            );
        }
        if loaded.end > loaded.committed {
            warn!(
                file = %log_path.display(),
                bytes = loaded.end - loaded.committed,
                "adopted durable records written after the last commit (a crash before acknowledging them); their rooms count as reserved"
            );
        }
        if loaded.torn_tail > 0 {
            warn!(
                file = %log_path.display(),
                offset = loaded.end,
                bytes = loaded.torn_tail,
                "ignoring a torn, never acknowledged write at the end of the log"
            );
        }

        let writer = Writer {
            log,
            commit,
            log_path,
            commit_path,
            _lock: lock,
            log_len: loaded.end,
            next_record_seq: loaded.next_seq,
            commit_seq: slot.commit_seq,
            generation: loaded.generation,
            high_water: loaded
                .snapshot
                .ranges
                .high_water()
                .max(loaded.snapshot.pruned_below),
            limit,
            dir: dir.to_path_buf(),
        };
        let (tx, rx) = mpsc::channel();
        let handle = thread::Builder::new()
            .name("room-allocator-store".into())
            .spawn(move || writer.run(rx))
            .map_err(io_err(dir))?;
        let store = Self {
            requests: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(handle)),
        };
        Ok((store, loaded.snapshot))
    }

    /// Marks the dir as moved to etcd (`target`), durably; later opens refuse.
    pub fn mark_migrated(dir: &Path, target: &str) -> std::io::Result<()> {
        let path = dir.join(MIGRATED_FILE);
        let file = File::create(&path)?;
        file.write_all_at(format!("{target}\n").as_bytes(), 0)?;
        file.sync_all()?;
        File::open(dir)?.sync_all()
    }

    fn submit(&self, op: Op) -> StoreFuture<'_, Outcome> {
        let (reply, answer) = oneshot::channel();
        let sent = self
            .requests
            .lock()
            .expect("store sender lock is never poisoned: no code panics while holding it")
            .as_ref()
            .map(|tx| tx.send(Request { op, reply }).is_ok())
            .unwrap_or(false);
        Box::pin(async move {
            if !sent {
                return Err(StoreError::Closed);
            }
            answer.await.map_err(|_| StoreError::Closed)?
        })
    }
}

impl Store for EmbeddedStore {
    fn kind(&self) -> &'static str {
        "embedded"
    }

    fn register(&self, prefill_worker: Arc<str>, dp_size: DpSize) -> StoreFuture<'_, i64> {
        let done = self.submit(Op::Register(prefill_worker, dp_size));
        Box::pin(async move { done.await.map(|_| 0) })
    }

    fn deregister(&self, prefill_worker: Arc<str>, _dp_size: DpSize) -> StoreFuture<'_, i64> {
        let done = self.submit(Op::Deregister(prefill_worker));
        Box::pin(async move { done.await.map(|_| 0) })
    }

    fn reserve(&self, reservation: Reservation) -> StoreFuture<'_, RoomRange> {
        let done = self.submit(Op::Reserve(reservation));
        Box::pin(async move {
            match done.await? {
                Outcome::Reserved(range) => Ok(range),
                _ => unreachable!("the writer answers a reserve with a range"),
            }
        })
    }

    fn record_issued(&self, counts: Vec<IssuedCount>) -> StoreFuture<'_, ()> {
        let counts = counts
            .into_iter()
            .map(|c| (c.prefill_worker, c.total))
            .collect();
        let done = self.submit(Op::Issued(counts));
        Box::pin(async move { done.await.map(|_| ()) })
    }

    fn prune(&self, cutoff_unix_ms: u64) -> StoreFuture<'_, u64> {
        let done = self.submit(Op::Prune(cutoff_unix_ms));
        Box::pin(async move {
            match done.await? {
                Outcome::Pruned(below) => Ok(below),
                _ => unreachable!("the writer answers a prune with a mark"),
            }
        })
    }

    fn close(&self) -> StoreFuture<'_, ()> {
        // Dropping the sender ends the writer after it drains the queue.
        drop(
            self.requests
                .lock()
                .expect("store sender lock is never poisoned")
                .take(),
        );
        let handle = self
            .writer
            .lock()
            .expect("store writer lock is never poisoned")
            .take();
        Box::pin(async move {
            if let Some(handle) = handle {
                tokio::task::spawn_blocking(move || handle.join())
                    .await
                    .ok();
            }
            Ok(())
        })
    }
}

impl Drop for EmbeddedStore {
    /// Ends the writer and releases the lock before the handle is gone, so a
    /// store can be reopened right after it is dropped.
    fn drop(&mut self) {
        if let Ok(requests) = self.requests.get_mut() {
            drop(requests.take());
        }
        if let Some(handle) = self.writer.get_mut().ok().and_then(Option::take) {
            let _ = handle.join();
        }
    }
}

/// Makes sure both files exist; returns true if they were just created.
fn prepare_files(dir: &Path, log_path: &Path, commit_path: &Path) -> Result<bool, OpenError> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| OpenError::Io { path, source }
    };
    let log_meta = fs::metadata(log_path).ok();
    let commit_exists = commit_path.exists();
    match (log_meta, commit_exists) {
        (Some(_), true) => return Ok(false),
        (None, true) => {
            return Err(OpenError::Missing {
                missing: log_path.to_path_buf(),
                present: commit_path.to_path_buf(),
            })
        }
        (Some(meta), false) if meta.len() > LOG_HEADER_LEN => {
            return Err(OpenError::Missing {
                missing: commit_path.to_path_buf(),
                present: log_path.to_path_buf(),
            })
        }
        (Some(_), false) => {
            // At most a header: a first start that died before its first
            // commit, so nothing was ever issued. Foreign content is refused.
            let bytes = fs::read(log_path).map_err(io_err(log_path))?;
            if !LOG_MAGIC.starts_with(&bytes[..bytes.len().min(LOG_MAGIC.len())]) {
                return Err(OpenError::Foreign {
                    path: log_path.to_path_buf(),
                });
            }
        }
        (None, false) => {}
    }
    let header = encode_log_header(0);
    let log = File::create(log_path).map_err(io_err(log_path))?;
    log.write_all_at(&header, 0).map_err(io_err(log_path))?;
    log.sync_all().map_err(io_err(log_path))?;
    // The commit file appears whole or not at all: write aside, then rename.
    let tmp = commit_path.with_extension("commit.tmp");
    let commit = File::create(&tmp).map_err(io_err(&tmp))?;
    let mut slots = vec![0u8; 2 * SLOT_LEN as usize];
    let first = encode_slot(0, LOG_HEADER_LEN, 0);
    slots[..first.len()].copy_from_slice(&first);
    commit.write_all_at(&slots, 0).map_err(io_err(&tmp))?;
    commit.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, commit_path).map_err(io_err(commit_path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))?;
    Ok(true)
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    commit_seq: u64,
    log_len: u64,
    generation: u32,
}

fn encode_log_header(generation: u32) -> Vec<u8> {
    let mut header = Vec::with_capacity(16);
    header.extend_from_slice(LOG_MAGIC);
    header.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    header.extend_from_slice(&generation.to_le_bytes());
    header
}

fn encode_slot(commit_seq: u64, log_len: u64, generation: u32) -> Vec<u8> {
    let mut slot = Vec::with_capacity(SLOT_BODY_LEN + 4);
    slot.extend_from_slice(COMMIT_MAGIC);
    slot.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    slot.extend_from_slice(&generation.to_le_bytes());
    slot.extend_from_slice(&commit_seq.to_le_bytes());
    slot.extend_from_slice(&log_len.to_le_bytes());
    let crc = crc32fast::hash(&slot);
    slot.extend_from_slice(&crc.to_le_bytes());
    slot
}

fn read_commit(file: &File, path: &Path) -> Result<Slot, OpenError> {
    let mut bytes = [0u8; 2 * SLOT_LEN as usize];
    let len = file
        .metadata()
        .map_err(|source| OpenError::Io {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    if len < 2 * SLOT_LEN {
        return Err(OpenError::Truncated {
            path: path.to_path_buf(),
            committed: 2 * SLOT_LEN,
            actual: len,
        });
    }
    file.read_exact_at(&mut bytes, 0)
        .map_err(|source| OpenError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    let slots: Vec<&[u8]> = bytes.chunks(SLOT_LEN as usize).collect();
    if slots.iter().all(|slot| &slot[..8] != COMMIT_MAGIC) {
        return Err(OpenError::Foreign {
            path: path.to_path_buf(),
        });
    }
    let mut best: Option<Slot> = None;
    for slot in slots {
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
        if !valid {
            continue;
        }
        let (Some(version), Some(generation), Some(commit_seq), Some(log_len)) =
            (version, generation, commit_seq, log_len)
        else {
            continue;
        };
        if version != FORMAT_VERSION {
            return Err(OpenError::UnsupportedVersion {
                path: path.to_path_buf(),
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        if best.is_none_or(|b| commit_seq > b.commit_seq) {
            best = Some(Slot {
                commit_seq,
                log_len,
                generation,
            });
        }
    }
    best.ok_or_else(|| OpenError::Corrupt {
        path: path.to_path_buf(),
        offset: 0,
        reason: "both commit slots fail their checksum".into(),
    })
}

struct Loaded {
    snapshot: Snapshot,
    /// End of the last valid record: where the next commit writes.
    end: u64,
    next_seq: u64,
    /// Bytes of an invalid (torn) tail past `end`.
    torn_tail: u64,
    generation: u32,
    /// Log bytes acknowledged by the commit slot (or a finished compaction).
    committed: u64,
}

fn read_log(file: &File, path: &Path, slot: Slot) -> Result<Loaded, OpenError> {
    let to_open_err = |source| OpenError::Io {
        path: path.to_path_buf(),
        source,
    };
    let actual = file.metadata().map_err(to_open_err)?.len();
    let mut bytes = Vec::new();
    {
        use std::io::Read;
        (&*file).read_to_end(&mut bytes).map_err(to_open_err)?;
    }
    if bytes.len() < LOG_MAGIC.len() || &bytes[..8] != LOG_MAGIC {
        return Err(OpenError::Foreign {
            path: path.to_path_buf(),
        });
    }
    let mut header = Reader::new(&bytes[8..]);
    let version = header.u32();
    if version != Some(FORMAT_VERSION) {
        return Err(OpenError::UnsupportedVersion {
            path: path.to_path_buf(),
            found: version.unwrap_or(0),
            supported: FORMAT_VERSION,
        });
    }
    let generation = header.u32().unwrap_or(u32::MAX);
    let committed = if generation == slot.generation {
        slot.log_len
    } else if Some(generation) == slot.generation.checked_add(1) {
        // A compaction renamed its complete, fsynced log into place but did
        // not write the commit slot: all of it counts as acknowledged.
        actual
    } else {
        return Err(OpenError::Corrupt {
            path: path.to_path_buf(),
            offset: 12,
            reason: format!(
                "log generation {generation} does not match the commit's generation {}",
                slot.generation
            ),
        });
    };
    if actual < committed {
        return Err(OpenError::Truncated {
            path: path.to_path_buf(),
            committed,
            actual,
        });
    }

    let Replayed {
        replay,
        end: offset,
        next_seq,
        stopped,
    } = replay_log(&bytes);
    if offset < committed {
        // Damage (or the end of a record) inside the acknowledged region.
        return Err(OpenError::Corrupt {
            path: path.to_path_buf(),
            offset,
            reason: stopped.unwrap_or_else(|| {
                format!("the last commit covers {committed} bytes but records end at {offset}")
            }),
        });
    }
    Ok(Loaded {
        snapshot: replay.finish(),
        end: offset,
        next_seq,
        torn_tail: actual - offset,
        generation,
        committed,
    })
}

/// The state a log's records describe, up to the first record that does not
/// parse or apply; whether that is damage or a torn tail is the caller's call.
struct Replayed {
    replay: Replay,
    /// End of the last record applied.
    end: u64,
    next_seq: u64,
    /// Why replay stopped before the end of `bytes`, if it did.
    stopped: Option<String>,
}

fn replay_log(bytes: &[u8]) -> Replayed {
    let mut replay = Replay::default();
    let mut end = LOG_HEADER_LEN;
    let mut next_seq = 1;
    let mut stopped = None;
    loop {
        let rest = &bytes[usize::try_from(end).expect("the log was read into memory")..];
        if rest.is_empty() {
            break;
        }
        match parse_record(rest, next_seq)
            .and_then(|(record, len)| replay.apply(record).map(|()| len))
        {
            Ok(len) => {
                end += len;
                next_seq += 1;
            }
            Err(reason) => {
                stopped = Some(reason);
                break;
            }
        }
    }
    Replayed {
        replay,
        end,
        next_seq,
        stopped,
    }
}

enum Record {
    Register(Arc<str>, DpSize),
    Deregister(Arc<str>),
    Reserve {
        worker: Arc<str>,
        range: RoomRange,
        rooms_issued: u64,
        created_unix_ms: u64,
    },
    Issued(Arc<str>, u64),
    Pruned(u64),
}

fn parse_record(bytes: &[u8], expected_seq: u64) -> Result<(Record, u64), String> {
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
            reader.string().ok_or_else(bad)?,
            reader
                .u32()
                .and_then(|n| DpSize::try_new(n).ok())
                .ok_or_else(bad)?,
        ),
        KIND_DEREGISTER => Record::Deregister(reader.string().ok_or_else(bad)?),
        KIND_RESERVE => {
            let worker = reader.string().ok_or_else(bad)?;
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
            reader.string().ok_or_else(bad)?,
            reader.u64().ok_or_else(bad)?,
        ),
        _ => return Err(format!("record {seq} has unknown kind {kind}")),
    };
    if !reader.is_empty() {
        return Err(bad());
    }
    Ok((record, 8 + u64::from(len)))
}

/// Rebuilds the state a log describes, in order.
#[derive(Default)]
struct Replay {
    workers: BTreeMap<Arc<str>, WorkerRecord>,
    ranges: RangeTable,
    pruned_below: u64,
}

impl Replay {
    fn apply(&mut self, record: Record) -> Result<(), String> {
        match record {
            Record::Register(worker, dp_size) => {
                let entry = self.worker(&worker, dp_size);
                entry.dp_size = dp_size;
                entry.registered = true;
            }
            Record::Deregister(worker) => {
                if let Some(entry) = self.workers.get_mut(&worker) {
                    entry.registered = false;
                }
            }
            Record::Reserve {
                worker,
                range,
                rooms_issued,
                created_unix_ms,
            } => {
                let entry = self.worker(&worker, range.dp_size());
                entry.rooms_issued = entry.rooms_issued.max(rooms_issued);
                let prefill_worker = entry.prefill_worker.clone();
                self.ranges
                    .insert(RangeOwner {
                        prefill_worker,
                        range,
                        created_unix_ms,
                    })
                    .map_err(|overlap| overlap.to_string())?;
            }
            Record::Pruned(below) => self.pruned_below = self.pruned_below.max(below),
            Record::Issued(worker, rooms_issued) => {
                if let Some(entry) = self.workers.get_mut(&worker) {
                    entry.rooms_issued = entry.rooms_issued.max(rooms_issued);
                }
            }
        }
        Ok(())
    }

    /// The worker's entry; one created by a range alone is not registered.
    fn worker(&mut self, worker: &Arc<str>, dp_size: DpSize) -> &mut WorkerRecord {
        self.workers
            .entry(worker.clone())
            .or_insert_with(|| WorkerRecord {
                prefill_worker: worker.clone(),
                dp_size,
                registered: false,
                rooms_issued: 0,
                revision: 0,
            })
    }

    fn finish(self) -> Snapshot {
        Snapshot {
            workers: self.workers.into_values().collect(),
            ranges: self.ranges,
            pruned_below: self.pruned_below,
        }
    }
}

/// Owns the files; the only code that writes them.
struct Writer {
    log: File,
    commit: File,
    log_path: PathBuf,
    commit_path: PathBuf,
    /// Held for the life of the writer: the flock on `LOCK`.
    _lock: File,
    log_len: u64,
    next_record_seq: u64,
    commit_seq: u64,
    generation: u32,
    high_water: u64,
    limit: u64,
    dir: PathBuf,
}

impl Writer {
    fn run(mut self, requests: mpsc::Receiver<Request>) {
        while let Ok(first) = requests.recv() {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match requests.try_recv() {
                    Ok(request) => batch.push(request),
                    Err(_) => break,
                }
            }
            self.commit_batch(batch);
        }
    }

    fn commit_batch(&mut self, batch: Vec<Request>) {
        let mut buf = Vec::new();
        let mut seq = self.next_record_seq;
        let mut high_water = self.high_water;
        let mut answers = Vec::with_capacity(batch.len());
        let mut pending_prune = None;
        for Request { op, reply } in batch {
            let outcome = match op {
                Op::Register(worker, dp_size) => {
                    encode_record(&mut buf, seq, KIND_REGISTER, |b| {
                        put_str(b, &worker);
                        b.extend_from_slice(&dp_size.get().to_le_bytes());
                    });
                    Ok(Outcome::Done)
                }
                Op::Deregister(worker) => {
                    encode_record(&mut buf, seq, KIND_DEREGISTER, |b| put_str(b, &worker));
                    Ok(Outcome::Done)
                }
                Op::Reserve(r) => {
                    match RoomRange::reserve_after(
                        high_water,
                        r.dp_size,
                        r.want_bases,
                        r.need_bases,
                        self.limit,
                    ) {
                        Ok(range) => {
                            high_water = range.end();
                            encode_reserve(
                                &mut buf,
                                seq,
                                &r.prefill_worker,
                                range,
                                r.rooms_issued,
                                r.created_unix_ms,
                            );
                            Ok(Outcome::Reserved(range))
                        }
                        Err(space) => Err(StoreError::Space(space)),
                    }
                }
                Op::Prune(cutoff_unix_ms) => {
                    // Compaction needs everything before it on disk first.
                    answers.push((reply, Err(StoreError::Closed)));
                    let index = answers.len() - 1;
                    pending_prune = Some((index, cutoff_unix_ms));
                    continue;
                }
                Op::Issued(counts) => {
                    for (worker, rooms_issued) in counts {
                        encode_record(&mut buf, seq, KIND_ISSUED, |b| {
                            put_str(b, &worker);
                            b.extend_from_slice(&rooms_issued.to_le_bytes());
                        });
                        seq += 1;
                    }
                    // `seq` already advanced past this op's records.
                    answers.push((reply, Ok(Outcome::Done)));
                    continue;
                }
            };
            if outcome.is_ok() {
                seq += 1;
            }
            answers.push((reply, outcome));
        }

        if !buf.is_empty() {
            if let Err(error) = self.append_and_commit(&buf) {
                warn!(error = %error, "embedded store write failed; nothing in this batch was acknowledged");
                for (reply, _) in answers {
                    let _ = reply.send(Err(error.clone()));
                }
                return;
            }
            self.next_record_seq = seq;
            self.high_water = high_water;
        }
        if let Some((index, cutoff_unix_ms)) = pending_prune {
            answers[index].1 = self.compact(cutoff_unix_ms).map(Outcome::Pruned);
        }
        for (reply, outcome) in answers {
            // A caller that gave up is fine: its range is simply skipped.
            let _ = reply.send(outcome);
        }
    }

    /// Rewrites the log without ranges reserved before `cutoff_unix_ms`;
    /// returns the highest end pruned so far (see "Compaction" above).
    fn compact(&mut self, cutoff_unix_ms: u64) -> Result<u64, StoreError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Io {
                path,
                source: Arc::new(source),
            }
        };
        let mut bytes = vec![0u8; usize::try_from(self.log_len).expect("the log fits in memory")];
        self.log
            .read_exact_at(&mut bytes, 0)
            .map_err(io(&self.log_path))?;
        let Replayed {
            mut replay,
            stopped,
            ..
        } = replay_log(&bytes);
        if let Some(reason) = stopped {
            // Everything below log_len was written and read back by us.
            return Err(StoreError::Io {
                path: self.log_path.clone(),
                source: Arc::new(std::io::Error::new(std::io::ErrorKind::InvalidData, reason)),
            });
        }
        let pruned = replay.ranges.prune(cutoff_unix_ms);
        if pruned == 0 {
            return Ok(replay.pruned_below);
        }
        let pruned_below = replay.pruned_below.max(pruned);

        let generation = self.generation + 1;
        let mut log = encode_log_header(generation);
        let mut seq = 1;
        for worker in replay.workers.values() {
            encode_record(&mut log, seq, KIND_REGISTER, |b| {
                put_str(b, &worker.prefill_worker);
                b.extend_from_slice(&worker.dp_size.get().to_le_bytes());
            });
            seq += 1;
            if !worker.registered {
                encode_record(&mut log, seq, KIND_DEREGISTER, |b| {
                    put_str(b, &worker.prefill_worker)
                });
                seq += 1;
            }
            encode_record(&mut log, seq, KIND_ISSUED, |b| {
                put_str(b, &worker.prefill_worker);
                b.extend_from_slice(&worker.rooms_issued.to_le_bytes());
            });
            seq += 1;
        }
        for owner in replay.ranges.iter() {
            encode_reserve(
                &mut log,
                seq,
                &owner.prefill_worker,
                owner.range,
                0,
                owner.created_unix_ms,
            );
            seq += 1;
        }
        encode_record(&mut log, seq, KIND_PRUNED, |b| {
            b.extend_from_slice(&pruned_below.to_le_bytes())
        });
        seq += 1;

        let compact_path = self.dir.join(COMPACT_FILE);
        let compacted = File::create(&compact_path).map_err(io(&compact_path))?;
        compacted.write_all_at(&log, 0).map_err(io(&compact_path))?;
        compacted.sync_all().map_err(io(&compact_path))?;
        fs::rename(&compact_path, &self.log_path).map_err(io(&self.log_path))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))?;
        self.log = compacted;
        let new_len = u64::try_from(log.len()).expect("fits");
        let commit_seq = self.commit_seq + 1;
        self.commit
            .write_all_at(
                &encode_slot(commit_seq, new_len, generation),
                (commit_seq % 2) * SLOT_LEN,
            )
            .map_err(io(&self.commit_path))?;
        self.commit.sync_data().map_err(io(&self.commit_path))?;
        self.commit_seq = commit_seq;
        self.generation = generation;
        self.log_len = new_len;
        self.next_record_seq = seq;
        info!(
            ranges_kept = replay.ranges.len(),
            pruned_below, "compacted the embedded store's log"
        );
        Ok(pruned_below)
    }

    fn append_and_commit(&mut self, records: &[u8]) -> Result<(), StoreError> {
        let log_err = |source| StoreError::Io {
            path: self.log_path.clone(),
            source: Arc::new(source),
        };
        self.log
            .write_all_at(records, self.log_len)
            .map_err(log_err)?;
        self.log.sync_data().map_err(log_err)?;
        let new_len = self.log_len + u64::try_from(records.len()).expect("a batch fits in u64");
        let commit_seq = self.commit_seq + 1;
        let slot_offset = (commit_seq % 2) * SLOT_LEN;
        let commit_err = |source| StoreError::Io {
            path: self.commit_path.clone(),
            source: Arc::new(source),
        };
        self.commit
            .write_all_at(
                &encode_slot(commit_seq, new_len, self.generation),
                slot_offset,
            )
            .map_err(commit_err)?;
        self.commit.sync_data().map_err(commit_err)?;
        self.log_len = new_len;
        self.commit_seq = commit_seq;
        Ok(())
    }
}

fn encode_record(buf: &mut Vec<u8>, seq: u64, kind: u8, fields: impl FnOnce(&mut Vec<u8>)) {
    let header_at = buf.len();
    buf.extend_from_slice(&[0u8; 8]);
    let body_at = buf.len();
    buf.extend_from_slice(&seq.to_le_bytes());
    buf.push(kind);
    fields(buf);
    let len = u32::try_from(buf.len() - body_at).expect("records are far below 4 GiB");
    let crc = crc32fast::hash(&buf[body_at..]);
    buf[header_at..header_at + 4].copy_from_slice(&len.to_le_bytes());
    buf[header_at + 4..body_at].copy_from_slice(&crc.to_le_bytes());
}

fn encode_reserve(
    buf: &mut Vec<u8>,
    seq: u64,
    worker: &str,
    range: RoomRange,
    rooms_issued: u64,
    created_unix_ms: u64,
) {
    encode_record(buf, seq, KIND_RESERVE, |b| {
        put_str(b, worker);
        b.extend_from_slice(&range.dp_size().get().to_le_bytes());
        b.extend_from_slice(&range.start().to_le_bytes());
        b.extend_from_slice(&range.end().to_le_bytes());
        b.extend_from_slice(&rooms_issued.to_le_bytes());
        b.extend_from_slice(&created_unix_ms.to_le_bytes());
    });
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    let len = u16::try_from(s.len()).expect("worker names are validated to 253 bytes");
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

/// Little-endian reads that return None instead of running off the end.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes }
    }

    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.bytes.split_at_checked(n)?;
        self.bytes = rest;
        Some(head)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.bytes(N)?.try_into().ok()
    }

    fn u8(&mut self) -> Option<u8> {
        self.array::<1>().map(|[b]| b)
    }

    fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_le_bytes)
    }

    fn string(&mut self) -> Option<Arc<str>> {
        let len = self.array().map(u16::from_le_bytes)?;
        let bytes = self.bytes(usize::from(len))?;
        std::str::from_utf8(bytes).ok().map(Arc::from)
    }

    fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::space::{Room, MAX_ROOM};

    const LIMIT: u64 = MAX_ROOM + 1;

    fn dp(n: u32) -> DpSize {
        DpSize::try_new(n).expect("valid dp_size")
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("test runtime")
    }

    fn reservation(worker: &str, dp_size: u32, bases: u64) -> Reservation {
        Reservation {
            prefill_worker: Arc::from(worker),
            dp_size: dp(dp_size),
            want_bases: bases,
            need_bases: bases,
            rooms_issued: 7,
            created_unix_ms: 1_000,
        }
    }

    /// Opens the store, registers a worker and reserves two ranges; returns them.
    fn populate(dir: &Path) -> Vec<RoomRange> {
        let (store, _) = EmbeddedStore::open(dir, LIMIT).expect("open");
        runtime().block_on(async {
            store
                .register(Arc::from("w"), dp(4))
                .await
                .expect("register");
            let a = store
                .reserve(reservation("w", 4, 10))
                .await
                .expect("reserve");
            let b = store
                .reserve(reservation("w", 4, 10))
                .await
                .expect("reserve");
            store.close().await.expect("close");
            vec![a, b]
        })
    }

    fn open_err(dir: &Path) -> OpenError {
        match EmbeddedStore::open(dir, LIMIT) {
            Ok(_) => panic!("the store opened but should have refused"),
            Err(error) => error,
        }
    }

    #[test]
    fn reopening_resumes_past_every_reserved_range() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ranges = populate(dir.path());
        let (store, snapshot) = EmbeddedStore::open(dir.path(), LIMIT).expect("reopen");
        assert_eq!(snapshot.ranges.len(), 2);
        assert_eq!(snapshot.ranges.high_water(), ranges[1].end());
        assert_eq!(snapshot.workers.len(), 1);
        assert!(snapshot.workers[0].registered);
        assert_eq!(snapshot.workers[0].rooms_issued, 7);
        let room = Room::try_new(ranges[0].start() + 1).expect("room");
        assert_eq!(
            &*snapshot
                .ranges
                .resolve(room)
                .expect("resolves")
                .prefill_worker,
            "w"
        );
        let next = runtime()
            .block_on(store.reserve(reservation("w", 4, 1)))
            .expect("reserve");
        assert!(next.start() >= ranges[1].end());
    }

    #[test]
    fn a_second_open_of_the_same_dir_is_refused_while_the_first_runs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_store, _) = EmbeddedStore::open(dir.path(), LIMIT).expect("open");
        assert!(matches!(open_err(dir.path()), OpenError::Locked { .. }));
    }

    #[test]
    fn a_torn_unacknowledged_tail_is_ignored_and_written_over() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ranges = populate(dir.path());
        let log_path = dir.path().join(LOG_FILE);
        let mut bytes = fs::read(&log_path).expect("read");
        // Half a record, as a crash in the middle of an append leaves it.
        bytes.extend_from_slice(&[40, 0, 0, 0, 1, 2, 3, 4, 5, 6]);
        fs::write(&log_path, &bytes).expect("write");
        let (store, snapshot) = EmbeddedStore::open(dir.path(), LIMIT).expect("torn tail opens");
        assert_eq!(snapshot.ranges.high_water(), ranges[1].end());
        runtime()
            .block_on(store.reserve(reservation("w", 4, 1)))
            .expect("writes over the tail");
        drop(store);
        let (_, snapshot) = EmbeddedStore::open(dir.path(), LIMIT).expect("reopen");
        assert_eq!(snapshot.ranges.len(), 3);
    }

    #[test]
    fn durable_records_past_the_last_commit_are_adopted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ranges = populate(dir.path());
        // Lose the newest commit slot, as a crash during its write would.
        let commit_path = dir.path().join(COMMIT_FILE);
        let mut commit = fs::read(&commit_path).expect("read");
        let newest = usize::from(commit[SLOT_LEN as usize + 16] > commit[16]);
        commit[newest * SLOT_LEN as usize + 20] ^= 0xff;
        fs::write(&commit_path, &commit).expect("write");
        let (_, snapshot) = EmbeddedStore::open(dir.path(), LIMIT).expect("opens");
        assert_eq!(snapshot.ranges.high_water(), ranges[1].end());
    }

    #[test]
    fn damage_inside_the_acknowledged_log_refuses_to_start_and_leaves_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        populate(dir.path());
        let log_path = dir.path().join(LOG_FILE);
        let mut bytes = fs::read(&log_path).expect("read");
        bytes[30] ^= 0x01;
        fs::write(&log_path, &bytes).expect("write");
        let error = open_err(dir.path());
        assert!(matches!(error, OpenError::Corrupt { .. }), "{error}");
        assert!(error.to_string().contains("rooms.log"), "{error}");
        assert_eq!(
            fs::read(&log_path).expect("read"),
            bytes,
            "file left as found"
        );
    }

    #[test]
    fn a_truncated_log_refuses_to_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        populate(dir.path());
        let log_path = dir.path().join(LOG_FILE);
        let bytes = fs::read(&log_path).expect("read");
        fs::write(&log_path, &bytes[..bytes.len() - 3]).expect("write");
        let error = open_err(dir.path());
        assert!(matches!(error, OpenError::Truncated { .. }), "{error}");
        let error_msg = error.to_string();
        assert!(error_msg.contains("truncated"), "{error_msg}");
    }

    #[test]
    fn foreign_files_refuse_to_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        populate(dir.path());
        let log_path = dir.path().join(LOG_FILE);
        fs::write(&log_path, b"hello, I am somebody else's file").expect("write");
        assert!(matches!(open_err(dir.path()), OpenError::Foreign { .. }));

        let dir = tempfile::tempdir().expect("tempdir");
        populate(dir.path());
        fs::write(dir.path().join(COMMIT_FILE), vec![7u8; 1024]).expect("write");
        assert!(matches!(open_err(dir.path()), OpenError::Foreign { .. }));
    }

    #[test]
    fn a_missing_file_refuses_to_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        populate(dir.path());
        fs::remove_file(dir.path().join(COMMIT_FILE)).expect("remove");
        assert!(matches!(open_err(dir.path()), OpenError::Missing { .. }));

        let dir = tempfile::tempdir().expect("tempdir");
        populate(dir.path());
        fs::remove_file(dir.path().join(LOG_FILE)).expect("remove");
        assert!(matches!(open_err(dir.path()), OpenError::Missing { .. }));
    }

    #[test]
    fn an_interrupted_first_start_is_initialised_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join(LOG_FILE), &LOG_MAGIC[..5]).expect("write");
        let (_, snapshot) = EmbeddedStore::open(dir.path(), LIMIT).expect("opens");
        assert!(snapshot.ranges.is_empty());
    }

    #[test]
    fn the_space_limit_is_enforced_and_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _) = EmbeddedStore::open(dir.path(), 100).expect("open");
        let rt = runtime();
        let range = rt
            .block_on(store.reserve(Reservation {
                want_bases: 1000,
                need_bases: 1,
                ..reservation("w", 8, 0)
            }))
            .expect("shrinks to fit");
        assert_eq!((range.start(), range.end()), (8, 96));
        let error = rt
            .block_on(store.reserve(reservation("w", 8, 1)))
            .expect_err("nothing fits");
        assert!(matches!(error, StoreError::Space(_)), "{error}");
    }

    #[test]
    fn concurrent_reservations_share_commits_and_never_overlap() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _) = EmbeddedStore::open(dir.path(), LIMIT).expect("open");
        let store = Arc::new(store);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .expect("runtime");
        let ranges = rt.block_on(async {
            let tasks: Vec<_> = (0..64)
                .map(|i| {
                    let store = store.clone();
                    tokio::spawn(async move {
                        store
                            .reserve(reservation(&format!("w{i}"), 1 + i % 5, 3))
                            .await
                    })
                })
                .collect();
            let mut ranges = Vec::new();
            for task in tasks {
                ranges.push(task.await.expect("task").expect("reserve"));
            }
            ranges
        });
        let mut table = RangeTable::default();
        for range in ranges {
            table
                .insert(RangeOwner {
                    prefill_worker: Arc::from("w"),
                    range,
                    created_unix_ms: 0,
                })
                .expect("disjoint");
        }
    }

    #[test]
    fn compaction_prunes_old_ranges_and_keeps_the_high_water_mark() {
        let dir = tempfile::tempdir().expect("tempdir");
        let rt = runtime();
        let (store, _) = EmbeddedStore::open(dir.path(), LIMIT).expect("open");
        let old = rt.block_on(async {
            store
                .register(Arc::from("w"), dp(2))
                .await
                .expect("register");
            store.reserve(reservation("w", 2, 5)).await.expect("old")
        });
        let young = rt
            .block_on(store.reserve(Reservation {
                created_unix_ms: 9_000,
                ..reservation("w", 2, 5)
            }))
            .expect("young");
        let last_old = rt
            .block_on(store.reserve(reservation("w", 2, 5)))
            .expect("old again, after the young one");
        // Pruning goes by reservation time alone: both old ranges go.
        let below = rt.block_on(store.prune(5_000)).expect("prune");
        assert_eq!(below, last_old.end());
        let next = rt
            .block_on(store.reserve(reservation("w", 2, 1)))
            .expect("reserve after compaction");
        assert!(next.start() >= last_old.end(), "never moves back");
        drop(store);

        let (_, snapshot) = EmbeddedStore::open(dir.path(), LIMIT).expect("reopen");
        assert_eq!(snapshot.pruned_below, last_old.end());
        assert_eq!(snapshot.ranges.len(), 2, "the young range and the new one");
        let old_room = Room::try_new(old.start() + 1).expect("room");
        assert!(snapshot.ranges.resolve(old_room).is_none());
        let young_room = Room::try_new(young.start()).expect("room");
        assert!(snapshot.ranges.resolve(young_room).is_some());
        assert!(snapshot.workers[0].registered);
    }

    #[test]
    fn a_compaction_interrupted_after_its_rename_is_adopted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let rt = runtime();
        let (store, _) = EmbeddedStore::open(dir.path(), LIMIT).expect("open");
        let old = rt
            .block_on(store.reserve(reservation("w", 1, 3)))
            .expect("old");
        let commit_before = fs::read(dir.path().join(COMMIT_FILE)).expect("read");
        rt.block_on(store.prune(5_000)).expect("prune");
        drop(store);
        // Put back the commit file as it was before the compaction's slot write.
        fs::write(dir.path().join(COMMIT_FILE), &commit_before).expect("write");
        fs::write(dir.path().join(COMPACT_FILE), b"half a compaction").expect("write");
        let (store, snapshot) = EmbeddedStore::open(dir.path(), LIMIT).expect("adopts");
        assert_eq!(snapshot.pruned_below, old.end());
        assert!(snapshot.ranges.is_empty());
        assert!(!dir.path().join(COMPACT_FILE).exists(), "leftover removed");
        let next = rt
            .block_on(store.reserve(reservation("w", 1, 1)))
            .expect("reserve");
        assert!(next.start() >= old.end());
    }
}
