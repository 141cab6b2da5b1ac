//! The embedded store: a checksummed append-only log plus two commit slots.
//!
//! # Why not an embedded database
//! The state is tiny (registrations and one record per reserved range) and is
//! only ever appended to. redb would work, but it repairs a file in place after
//! an unclean shutdown, while we want every damaged file left exactly as found
//! and a refusal to start. A format we fully control gives that, with no extra
//! dependency and a commit protocol that fits on one screen.
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
//!   (see "Opening"). Format version 1 (up to issue 16) had the same slots,
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
//! exactly as a restart would ("settling" them, below). Once that succeeds it
//! takes writes again, past everything the files hold. So a caller is told a
//! range is reserved only when it is durable, and a range that may be durable
//! is never reserved again. A failed rename of a compaction counts as a
//! failure after it: a rename may take effect and still report an error (an
//! NFS retry that gets ENOENT, a journal error).
//!
//! # Opening (and settling after a failure), and the crash cases
//! The valid slot with the highest `commit_seq` says how many log bytes were
//! acknowledged. Every record below `log_len` must parse and checksum, and the
//! file must be at least that long: otherwise the store refuses to open (corrupt
//! or truncated), naming the file and leaving it untouched. Past `log_len`,
//! records that are complete and valid are adopted too: a crash between the
//! log fsync and the slot write leaves them durable but unacknowledged, and a
//! newest slot damaged after its acknowledgment looks the same, so counting
//! them as reserved is the answer that is safe in both cases (at worst some
//! numbers are skipped). The first invalid record past `log_len` is a torn
//! write of an unacknowledged commit: the file is cut there, so stray bytes
//! of it can never be read as records later. A log holding only its header
//! and no commit file is an interrupted first start and is initialised again;
//! any other missing file is refused. Settling always ends with a fresh
//! commit slot for what the files hold (records adopted past the commit and
//! a compacted log included), fsynced after the log and the directory, before
//! the writer takes writes: so a later torn append is never inside the
//! acknowledged region, and the newest slot read back, which may exist only
//! in the page cache (its fsync failed, or the process died before it), is
//! never the only one standing when the writer next writes over the other
//! slot. The fresh slot goes over that doubtful newest slot (its number
//! skips one), keeping the older, durable one, unless the older one is not
//! valid (then the newest is the only slot there is).
//!
//! The data dir and any missing parent are made one level at a time, the
//! parent of each fsynced: a directory entry is durable only once its parent
//! is, and a data dir lost after rooms were issued would start the room
//! space over.
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
//! failure after it halts the writer until the files are settled (above).
//! Deregistered workers are dropped by compaction once their deregistration
//! is older than the cutoff and none of their ranges is left.
//!
//! # Media assumptions
//! fsync (`sync_data`) makes written bytes durable, and a directory fsync
//! makes the entries of that directory (creations, renames, removals, new
//! subdirectories) durable; unsynced writes may be lost, reordered, or torn
//! at any byte; a write cut by a power loss damages at most the 4 KiB blocks
//! it touches (a device with 4 KiB physical sectors may garble the whole
//! block), which is why the two commit slots lie in different 4 KiB blocks.
//! The log's last block is exposed the same way: a torn append can damage
//! acknowledged records sharing its block, which the checksums catch and
//! the store then refuses to start (never a reissue). A failed fsync may have
//! persisted some, all or none of the data, while reads still return it.
//! Checksums catch torn or rotted bytes; they are not cryptographic.
//! `sim_fs` tests the protocol against a file system that does all of this
//! (see its docs for exactly what it models).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::Duration;

use tokio::sync::oneshot;
use tracing::{error, info, warn};

use super::fs::{Fs, FsFile, FsLock, RealFs};
use super::{
    IssuedCount, OpenError, PruneRequest, Pruned, Reservation, Snapshot, Store, StoreError,
    StoreFuture, WorkerRecord,
};
use crate::failpoint;
use crate::failpoint::io_error;
use crate::space::{Bounds, DpSize, RangeOwner, RangeTable, RoomRange};

const LOG_FILE: &str = "rooms.log";
const COMMIT_FILE: &str = "rooms.commit";
const COMPACT_FILE: &str = "rooms.log.compact";
const LOCK_FILE: &str = "LOCK";
/// Written by `migrate`: the dir's room space now lives in etcd.
const MIGRATED_FILE: &str = "MIGRATED";
const LOG_MAGIC: &[u8; 8] = b"RALLOCLG";
const COMMIT_MAGIC: &[u8; 8] = b"RALLOCCM";
const LOG_VERSION: u32 = 1;
const LOG_HEADER_LEN: u64 = 16;
/// The commit file's format: each slot at the start of its own 4 KiB block,
/// so a torn write of one (even on a device that rewrites 4 KiB at a time)
/// cannot reach the other.
const COMMIT_VERSION: u32 = 2;
const SLOT_SPACING: u64 = 4096;
/// The first format: both slots in the first 1 KiB, 512 bytes apart. Read,
/// and upgraded at open.
const COMMIT_VERSION_V1: u32 = 1;
const SLOT_SPACING_V1: u64 = 512;
/// A slot: the body, then its crc32.
const SLOT_BODY_LEN: usize = 32;
const SLOT_LEN: usize = SLOT_BODY_LEN + 4;
/// Larger than any valid record (a worker name is at most 253 bytes); a
/// longer length field is damage, not a record.
const MAX_RECORD_LEN: u32 = 4096;
/// Most requests folded into one group commit; bounds the batch's memory.
const MAX_BATCH: usize = 1024;
/// How often a halted or failing writer reads its files back or probes.
const RECOVERY_INTERVAL: Duration = Duration::from_secs(1);
/// Revisions are `generation << REVISION_SHIFT | seq`.
const REVISION_SHIFT: u32 = 40;

const KIND_REGISTER: u8 = 1;
const KIND_DEREGISTER_V0: u8 = 2;
const KIND_RESERVE: u8 = 3;
const KIND_ISSUED: u8 = 4;
const KIND_PRUNED: u8 = 5;
const KIND_DEREGISTER: u8 = 6;
const KIND_PROBE: u8 = 7;

/// The embedded store handle: requests go to one writer thread.
pub struct EmbeddedStore {
    fs: Arc<dyn Fs>,
    requests: Mutex<Option<mpsc::Sender<Request>>>,
    writer: Mutex<Option<thread::JoinHandle<()>>>,
    status: Arc<WriterStatus>,
    /// Written when the store was created (see `store_id`).
    store_id: String,
}

/// What the writer thread tells the rest of the process.
#[derive(Debug, Default)]
struct WriterStatus {
    /// The last write failed (or the writer is halted) and nothing has
    /// succeeded since.
    failing: AtomicBool,
    /// The writer thread has ended.
    gone: AtomicBool,
    high_water: AtomicU64,
}

enum Op {
    Register(Arc<str>, DpSize),
    Deregister { worker: Arc<str>, unix_ms: u64 },
    Reserve(Reservation),
    Issued(Vec<(Arc<str>, u64)>),
    Prune(PruneRequest),
}

enum Outcome {
    Revision(i64),
    Reserved(RoomRange),
    Pruned(Pruned),
    Done,
}

struct Request {
    op: Op,
    reply: oneshot::Sender<Result<Outcome, StoreError>>,
}

/// How to open the store.
#[derive(Debug, Clone, Copy)]
pub struct EmbeddedOptions {
    pub bounds: Bounds,
    /// `migrate` opens a dir whose migration is pending (to finish it).
    pub for_migration: bool,
}

impl EmbeddedStore {
    /// Opens (or creates) the store in `dir` for a server, returning what it
    /// holds; rooms are reserved inside `bounds`.
    pub fn open(dir: &Path, bounds: Bounds) -> Result<(Self, Snapshot), OpenError> {
        super::store_id::check_data_dir(dir, super::store_id::DataDirUse::Serve)?;
        Self::open_with(
            dir,
            EmbeddedOptions {
                bounds,
                for_migration: false,
            },
        )
    }

    /// Opens the store with options (see [`EmbeddedOptions`]).
    pub fn open_with(dir: &Path, options: EmbeddedOptions) -> Result<(Self, Snapshot), OpenError> {
        Self::open_on(Arc::new(RealFs), dir, options)
    }

    /// Opens the store on any file system (tests use one that loses unsynced
    /// writes): makes the dir (durably), takes its lock for the life of the
    /// writer, checks `MIGRATED`, then reads (or first sets up) the files.
    pub fn open_on(
        fs: Arc<dyn Fs>,
        dir: &Path,
        options: EmbeddedOptions,
    ) -> Result<(Self, Snapshot), OpenError> {
        let bounds = options.bounds;
        create_dir_durably(&*fs, dir)?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = match fs.try_lock(&lock_path) {
            Ok(Some(lock)) => lock,
            Ok(None) => return Err(OpenError::Locked { path: lock_path }),
            Err(cause) => {
                return Err(OpenError::Io {
                    path: lock_path,
                    cause,
                })
            }
        };
        check_not_migrated(&*fs, dir, options.for_migration)?;
        let files = Files::new(dir);
        let fresh = prepare_files(&*fs, &files)?;
        if fs
            .file_len(&files.compact)
            .map_err(io_err_of(&files.compact))?
            .is_some()
        {
            // A compaction that died before its rename; the log is intact.
            // (Not synced: if the removal is lost, the next start removes
            // it again.)
            failpoint!(
                "embedded::remove_compact",
                OpenError::Io {
                    path: files.compact.clone(),
                    cause: io_error("embedded::remove_compact"),
                }
            );
            fs.remove_file(&files.compact)
                .map_err(io_err_of(&files.compact))?;
        }
        let Settled {
            loaded,
            log,
            commit,
            commit_seq,
        } = settle(&*fs, &files)?;
        let high_water = loaded.high_water();
        super::check_bounds(high_water, bounds)?;
        let (store_id, id_written) = super::store_id::read_or_create(&*fs, dir)?;
        if fresh {
            // Loud: where a store was expected (an unmounted volume, a
            // mistyped --data-dir), a new space repeats every room.
            warn!(
                dir = %dir.display(),
                store_id = %store_id,
                "created a new embedded store: a new room space starting at room 1. If this data dir should have held a store, stop this server now"
            );
        } else {
            if id_written {
                info!(dir = %dir.display(), store_id = %store_id, "the embedded store had no id (it predates store ids); wrote one");
            }
            info!(
                dir = %dir.display(),
                store_id = %store_id,
                ranges = loaded.replay.ranges.len(),
                workers = loaded.replay.workers.len(),
                high_water,
                "opened the embedded store; resuming past every reserved range"
            );
        }
        let status = Arc::new(WriterStatus::default());
        status.high_water.store(high_water, Ordering::Release);
        let writer = Writer {
            fs: fs.clone(),
            files,
            log,
            commit,
            _lock: lock,
            log_len: loaded.end,
            next_seq: loaded.next_seq,
            commit_seq,
            generation: loaded.generation,
            high_water,
            bounds,
            halted: None,
            status: status.clone(),
        };
        let snapshot = loaded.replay.into_snapshot();
        let (tx, rx) = mpsc::channel();
        let handle = thread::Builder::new()
            .name("room-allocator-store".into())
            .spawn(move || writer.run(rx))
            .map_err(io_err_of(dir))?;
        let store = Self {
            fs,
            requests: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(handle)),
            status,
            store_id,
        };
        Ok((store, snapshot))
    }

    /// Marks the dir as moved to etcd (`target`), durably, while this store
    /// holds its lock: no server can open it from here on. `migrate` marks
    /// it pending before copying anything, so a crash at any later point
    /// leaves a dir that refuses to serve (rerun `migrate` to finish), and
    /// complete once the copy is done.
    pub fn mark_migrated(&self, dir: &Path, target: &str, complete: bool) -> std::io::Result<()> {
        failpoint!("migrate::mark", io_error("migrate::mark"));
        let path = dir.join(MIGRATED_FILE);
        let tmp = dir.join("MIGRATED.tmp");
        let state = if complete { "complete" } else { "pending" };
        failpoint!("migrate::mark_write", io_error("migrate::mark_write"));
        let file = self.fs.create(&tmp)?;
        file.write_all_at(format!("{state} {target}\n").as_bytes(), 0)?;
        failpoint!("migrate::mark_fsync", io_error("migrate::mark_fsync"));
        file.sync_data()?;
        failpoint!("migrate::mark_rename", io_error("migrate::mark_rename"));
        self.fs.rename(&tmp, &path)?;
        failpoint!(
            "migrate::mark_dir_fsync",
            io_error("migrate::mark_dir_fsync")
        );
        self.fs.sync_dir(dir)
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

/// Refuses a dir that `migrate` marked (a server), or marked complete
/// (`migrate` itself), and one whose mark cannot be read.
fn check_not_migrated(fs: &dyn Fs, dir: &Path, for_migration: bool) -> Result<(), OpenError> {
    let path = dir.join(MIGRATED_FILE);
    match fs.read(&path) {
        Ok(mark) => {
            let mark = String::from_utf8_lossy(&mark).trim().to_owned();
            if for_migration && !mark.starts_with("complete") {
                return Ok(());
            }
            if for_migration {
                return Err(OpenError::AlreadyMigrated { path, target: mark });
            }
            Err(OpenError::Migrated { path, target: mark })
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(cause) => Err(OpenError::MigratedUnreadable { path, cause }),
    }
}

/// The directory holding `path` (`.` for a bare relative name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    }
}

/// Makes `dir` and any missing parent, one level at a time, syncing the
/// parent of each: a new directory's entry is durable only once its parent
/// is, and a data dir lost to a power loss after rooms were issued would
/// start the room space over.
fn create_dir_durably(fs: &dyn Fs, dir: &Path) -> Result<(), OpenError> {
    let mut missing = Vec::new();
    let mut at = dir;
    while !fs.dir_exists(at).map_err(io_err_of(at))? {
        missing.push(at);
        match at.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => at = parent,
            _ => break,
        }
    }
    for dir in missing.into_iter().rev() {
        failpoint!(
            "embedded::create_dir",
            OpenError::Io {
                path: dir.to_path_buf(),
                cause: io_error("embedded::create_dir"),
            }
        );
        match fs.create_dir(dir) {
            Ok(()) => {}
            // Made by someone else meanwhile: sync its parent all the same.
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(cause) => {
                return Err(OpenError::Io {
                    path: dir.to_path_buf(),
                    cause,
                })
            }
        }
        let parent = parent_dir(dir);
        failpoint!(
            "embedded::create_dir_sync",
            OpenError::Io {
                path: parent.to_path_buf(),
                cause: io_error("embedded::create_dir_sync"),
            }
        );
        fs.sync_dir(parent).map_err(io_err_of(parent))?;
    }
    Ok(())
}

/// Syncs every directory above `dir` (up to `/`, or `.` for a relative
/// path) before a first start writes anything: an earlier attempt may have
/// made `dir` or a parent and failed before syncing its parent, and this
/// start, finding them, made nothing. Ancestors this process may not read
/// are skipped with a warning (they were not made by us).
fn sync_ancestors(fs: &dyn Fs, dir: &Path) -> Result<(), OpenError> {
    let mut at = dir;
    while at.parent().is_some() {
        let parent = parent_dir(at);
        failpoint!(
            "embedded::first_start_sync_parents",
            OpenError::Io {
                path: parent.to_path_buf(),
                cause: io_error("embedded::first_start_sync_parents"),
            }
        );
        match fs.sync_dir(parent) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::PermissionDenied => {
                warn!(dir = %parent.display(), %error, "cannot sync a parent of the data dir; make sure its entries are durable");
            }
            Err(cause) => {
                return Err(OpenError::Io {
                    path: parent.to_path_buf(),
                    cause,
                })
            }
        }
        if parent == Path::new(".") {
            break;
        }
        at = parent;
    }
    Ok(())
}

fn io_err_of(path: &Path) -> impl FnOnce(std::io::Error) -> OpenError {
    let path = path.to_path_buf();
    move |cause| OpenError::Io { path, cause }
}

impl Store for EmbeddedStore {
    fn kind(&self) -> &'static str {
        "embedded"
    }

    fn store_id(&self) -> Option<String> {
        Some(self.store_id.clone())
    }

    fn register(&self, prefill_worker: Arc<str>, dp_size: DpSize) -> StoreFuture<'_, i64> {
        let done = self.submit(Op::Register(prefill_worker, dp_size));
        Box::pin(async move {
            match done.await? {
                Outcome::Revision(revision) => Ok(revision),
                _ => unreachable!("the writer answers a registration with its revision"),
            }
        })
    }

    fn deregister(&self, prefill_worker: Arc<str>, _dp_size: DpSize) -> StoreFuture<'_, i64> {
        let done = self.submit(Op::Deregister {
            worker: prefill_worker,
            unix_ms: super::unix_ms(),
        });
        Box::pin(async move {
            match done.await? {
                Outcome::Revision(revision) => Ok(revision),
                _ => unreachable!("the writer answers a deregistration with its revision"),
            }
        })
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

    fn prune(&self, request: PruneRequest) -> StoreFuture<'_, Pruned> {
        let done = self.submit(Op::Prune(request));
        Box::pin(async move {
            match done.await? {
                Outcome::Pruned(pruned) => Ok(pruned),
                _ => unreachable!("the writer answers a prune with what it pruned"),
            }
        })
    }

    fn check_ready(&self) -> Result<(), StoreError> {
        if self.status.gone.load(Ordering::Acquire) {
            return Err(StoreError::Closed);
        }
        if self.status.failing.load(Ordering::Acquire) {
            return Err(StoreError::Halted {
                reason: "a failed write".into(),
            });
        }
        Ok(())
    }

    fn high_water(&self) -> u64 {
        self.status.high_water.load(Ordering::Acquire)
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

/// The store's paths.
#[derive(Debug, Clone)]
struct Files {
    dir: PathBuf,
    log: PathBuf,
    commit: PathBuf,
    compact: PathBuf,
}

impl Files {
    fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            log: dir.join(LOG_FILE),
            commit: dir.join(COMMIT_FILE),
            compact: dir.join(COMPACT_FILE),
        }
    }
}

/// Makes sure both files exist; returns true if they were just created.
fn prepare_files(fs: &dyn Fs, files: &Files) -> Result<bool, OpenError> {
    let log_len = fs.file_len(&files.log).map_err(io_err_of(&files.log))?;
    let commit_len = fs
        .file_len(&files.commit)
        .map_err(io_err_of(&files.commit))?;
    match (log_len, commit_len) {
        (Some(_), Some(_)) => return Ok(false),
        (None, Some(_)) => {
            return Err(OpenError::Missing {
                missing: files.log.clone(),
                present: files.commit.clone(),
            })
        }
        (Some(len), None) if len > LOG_HEADER_LEN => {
            return Err(OpenError::Missing {
                missing: files.commit.clone(),
                present: files.log.clone(),
            })
        }
        (Some(_), None) => {
            // At most a header: a first start that died before its first
            // commit, so nothing was ever issued. Its header write may be
            // torn anywhere (each byte written or still zero); anything
            // else is foreign and refused.
            let bytes = fs
                .open(&files.log)
                .and_then(|f| f.read_all())
                .map_err(io_err_of(&files.log))?;
            let header = encode_log_header(0);
            let torn_header = bytes
                .iter()
                .zip(&header)
                .all(|(byte, expected)| *byte == 0 || byte == expected);
            if !torn_header {
                return Err(OpenError::Foreign {
                    path: files.log.clone(),
                });
            }
        }
        (None, None) => {}
    }
    sync_ancestors(fs, &files.dir)?;
    failpoint!(
        "embedded::first_start_log",
        OpenError::Io {
            path: files.log.clone(),
            cause: io_error("embedded::first_start_log"),
        }
    );
    let log = fs.create(&files.log).map_err(io_err_of(&files.log))?;
    log.write_all_at(&encode_log_header(0), 0)
        .map_err(io_err_of(&files.log))?;
    failpoint!(
        "embedded::first_start_log_fsync",
        OpenError::Io {
            path: files.log.clone(),
            cause: io_error("embedded::first_start_log_fsync"),
        }
    );
    log.sync_data().map_err(io_err_of(&files.log))?;
    // The commit file appears whole or not at all: write aside, then rename.
    let tmp = files.commit.with_extension("commit.tmp");
    failpoint!(
        "embedded::first_start_commit",
        OpenError::Io {
            path: tmp.clone(),
            cause: io_error("embedded::first_start_commit"),
        }
    );
    let commit = fs.create(&tmp).map_err(io_err_of(&tmp))?;
    let mut slots = vec![0u8; 2 * SLOT_SPACING as usize];
    let first = encode_slot(0, LOG_HEADER_LEN, 0);
    slots[..first.len()].copy_from_slice(&first);
    commit.write_all_at(&slots, 0).map_err(io_err_of(&tmp))?;
    failpoint!(
        "embedded::first_start_commit_fsync",
        OpenError::Io {
            path: tmp.clone(),
            cause: io_error("embedded::first_start_commit_fsync"),
        }
    );
    commit.sync_data().map_err(io_err_of(&tmp))?;
    failpoint!(
        "embedded::first_start_rename",
        OpenError::Io {
            path: files.commit.clone(),
            cause: io_error("embedded::first_start_rename"),
        }
    );
    fs.rename(&tmp, &files.commit)
        .map_err(io_err_of(&files.commit))?;
    failpoint!(
        "embedded::first_start_dir_fsync",
        OpenError::Io {
            path: files.dir.clone(),
            cause: io_error("embedded::first_start_dir_fsync"),
        }
    );
    fs.sync_dir(&files.dir).map_err(io_err_of(&files.dir))?;
    Ok(true)
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    commit_seq: u64,
    log_len: u64,
    generation: u32,
    /// The other slot holds a valid (older) commit too.
    other_valid: bool,
    /// The commit file's format (a version-1 file is upgraded at open).
    version: u32,
}

/// Where commit `commit_seq` goes (commit `n` goes to slot `n % 2`).
fn slot_offset(commit_seq: u64) -> u64 {
    (commit_seq % 2) * SLOT_SPACING
}

fn encode_log_header(generation: u32) -> Vec<u8> {
    let mut header = Vec::with_capacity(16);
    header.extend_from_slice(LOG_MAGIC);
    header.extend_from_slice(&LOG_VERSION.to_le_bytes());
    header.extend_from_slice(&generation.to_le_bytes());
    header
}

fn encode_slot(commit_seq: u64, log_len: u64, generation: u32) -> Vec<u8> {
    encode_slot_version(COMMIT_VERSION, commit_seq, log_len, generation)
}

fn encode_slot_version(version: u32, commit_seq: u64, log_len: u64, generation: u32) -> Vec<u8> {
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
fn decode_slots(bytes: &[u8]) -> Result<Slot, CommitProblem> {
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

fn read_commit(file: &dyn FsFile, path: &Path) -> Result<Slot, OpenError> {
    let bytes = file.read_all().map_err(io_err_of(path))?;
    match decode_slots(&bytes) {
        Ok(slot) => Ok(slot),
        Err(CommitProblem::TooShort(actual)) => Err(OpenError::Truncated {
            path: path.to_path_buf(),
            committed: 2 * SLOT_SPACING,
            actual,
        }),
        Err(CommitProblem::Foreign) => Err(OpenError::Foreign {
            path: path.to_path_buf(),
        }),
        Err(CommitProblem::Version(found)) => Err(OpenError::UnsupportedVersion {
            path: path.to_path_buf(),
            found,
            supported: COMMIT_VERSION,
        }),
        Err(CommitProblem::BothDamaged) => Err(OpenError::Corrupt {
            path: path.to_path_buf(),
            offset: 0,
            reason: "both commit slots fail their checksum".into(),
        }),
        Err(CommitProblem::Misplaced { slot, commit_seq }) => Err(OpenError::Corrupt {
            path: path.to_path_buf(),
            offset: slot as u64 * SLOT_SPACING,
            reason: format!(
                "slot {slot} holds commit {commit_seq}, which belongs in the other slot"
            ),
        }),
        Err(CommitProblem::WrongLayout { slot, version }) => Err(OpenError::Corrupt {
            path: path.to_path_buf(),
            offset: 0,
            reason: format!(
                "slot {slot} is of format version {version}, which the file's length ({} bytes) does not fit",
                bytes.len()
            ),
        }),
    }
}

/// What the files hold, read as a restart reads them.
struct Loaded {
    /// The log's bytes up to `end`.
    bytes: Vec<u8>,
    replay: Replay,
    /// End of the last valid record: where the next commit writes.
    end: u64,
    next_seq: u64,
    /// Bytes of an invalid (torn) tail past `end`.
    torn_tail: u64,
    generation: u32,
    /// Log bytes acknowledged by the commit slot (or a finished compaction).
    committed: u64,
}

impl Loaded {
    fn high_water(&self) -> u64 {
        self.replay.high_water()
    }
}

fn read_log(file: &dyn FsFile, path: &Path, slot: Slot) -> Result<Loaded, OpenError> {
    let bytes = file.read_all().map_err(io_err_of(path))?;
    let actual = u64::try_from(bytes.len()).expect("a file length fits in u64");
    if bytes.len() < LOG_MAGIC.len() || &bytes[..8] != LOG_MAGIC {
        return Err(OpenError::Foreign {
            path: path.to_path_buf(),
        });
    }
    let mut header = Reader::new(&bytes[8..]);
    let version = header.u32();
    if version != Some(LOG_VERSION) {
        return Err(OpenError::UnsupportedVersion {
            path: path.to_path_buf(),
            found: version.unwrap_or(0),
            supported: LOG_VERSION,
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
        end,
        next_seq,
        stopped,
    } = replay_log(&bytes, generation);
    if end < committed {
        // Damage (or the end of a record) inside the acknowledged region.
        return Err(OpenError::Corrupt {
            path: path.to_path_buf(),
            offset: end,
            reason: stopped.unwrap_or_else(|| {
                format!("the last commit covers {committed} bytes but records end at {end}")
            }),
        });
    }
    let mut bytes = bytes;
    bytes.truncate(usize::try_from(end).expect("the log was read into memory"));
    Ok(Loaded {
        bytes,
        replay,
        end,
        next_seq,
        torn_tail: actual - end,
        generation,
        committed,
    })
}

/// The files read back and made consistent: ready for the next append.
struct Settled {
    loaded: Loaded,
    log: Box<dyn FsFile>,
    commit: Box<dyn FsFile>,
    commit_seq: u64,
}

/// Reads the files as a restart does, cuts a torn tail, and commits what was
/// adopted (see "Opening" above). Used at open and after any failed write.
fn settle(fs: &dyn Fs, files: &Files) -> Result<Settled, OpenError> {
    let mut commit = fs.open(&files.commit).map_err(io_err_of(&files.commit))?;
    let log = fs.open(&files.log).map_err(io_err_of(&files.log))?;
    let mut slot = read_commit(&*commit, &files.commit)?;
    let loaded = read_log(&*log, &files.log, slot)?;
    if slot.version == COMMIT_VERSION_V1 {
        // Only a store that reads back whole is upgraded.
        upgrade_commit(fs, files, slot)?;
        commit = fs.open(&files.commit).map_err(io_err_of(&files.commit))?;
        slot = read_commit(&*commit, &files.commit)?;
    }
    let io = |path: &Path| io_err_of(path);
    if loaded.end > loaded.committed {
        warn!(
            file = %files.log.display(),
            bytes = loaded.end - loaded.committed,
            "adopted durable records written after the last commit (a crash before acknowledging them); their rooms count as reserved"
        );
    }
    if loaded.torn_tail > 0 {
        warn!(
            file = %files.log.display(),
            offset = loaded.end,
            bytes = loaded.torn_tail,
            "cutting a torn, never acknowledged write from the end of the log"
        );
        failpoint!(
            "embedded::settle_truncate",
            OpenError::Io {
                path: files.log.clone(),
                cause: io_error("embedded::settle_truncate"),
            }
        );
        log.set_len(loaded.end).map_err(io(&files.log))?;
        failpoint!(
            "embedded::settle_truncate_fsync",
            OpenError::Io {
                path: files.log.clone(),
                cause: io_error("embedded::settle_truncate_fsync"),
            }
        );
        log.sync_data().map_err(io(&files.log))?;
    }
    if loaded.end > loaded.committed {
        // Read back, but perhaps only from the page cache (after a failed
        // fsync Linux keeps the pages and forgets they were not written):
        // write them again and sync before committing them.
        let from = usize::try_from(loaded.committed).expect("in memory");
        failpoint!(
            "embedded::settle_rewrite",
            OpenError::Io {
                path: files.log.clone(),
                cause: io_error("embedded::settle_rewrite"),
            }
        );
        log.write_all_at(&loaded.bytes[from..], loaded.committed)
            .map_err(io(&files.log))?;
        failpoint!(
            "embedded::settle_rewrite_fsync",
            OpenError::Io {
                path: files.log.clone(),
                cause: io_error("embedded::settle_rewrite_fsync"),
            }
        );
        log.sync_data().map_err(io(&files.log))?;
    }
    // A compaction's rename may not be durable yet: make it so before a
    // commit slot names its generation.
    failpoint!(
        "embedded::settle_dir_fsync",
        OpenError::Io {
            path: files.dir.clone(),
            cause: io_error("embedded::settle_dir_fsync"),
        }
    );
    fs.sync_dir(&files.dir).map_err(io(&files.dir))?;
    // Always a fresh, synced commit before the writer goes on, even when
    // nothing was adopted: the newest slot read back may exist only in the
    // page cache (its fsync failed, or the process died before it), and
    // the writer's next commit would go over the other slot, perhaps the
    // only durable one. The fresh commit goes over the doubtful slot,
    // keeping the other, unless the other is not valid (then the newest
    // was read from the disk itself, or it is the only slot there is).
    let commit_seq = slot.commit_seq + if slot.other_valid { 2 } else { 1 };
    failpoint!(
        "embedded::settle_commit",
        OpenError::Io {
            path: files.commit.clone(),
            cause: io_error("embedded::settle_commit"),
        }
    );
    commit
        .write_all_at(
            &encode_slot(commit_seq, loaded.end, loaded.generation),
            slot_offset(commit_seq),
        )
        .map_err(io(&files.commit))?;
    failpoint!(
        "embedded::settle_commit_fsync",
        OpenError::Io {
            path: files.commit.clone(),
            cause: io_error("embedded::settle_commit_fsync"),
        }
    );
    commit.sync_data().map_err(io(&files.commit))?;
    Ok(Settled {
        loaded,
        log,
        commit,
        commit_seq,
    })
}

/// Rewrites a version-1 commit file (both slots in one 1 KiB) as version 2
/// (each slot in its own 4 KiB block), holding the same commit. Written
/// aside, synced and renamed over the old file, so a crash at any step
/// leaves one whole file or the other: the old one is upgraded again at
/// the next start. Both slots of the new file are valid (the commit, and
/// the same again as the next commit), so a binary that reads only version
/// 1 finds version 2 in slot 0 and refuses, rather than reading slot 1 of
/// the old layout.
fn upgrade_commit(fs: &dyn Fs, files: &Files, slot: Slot) -> Result<(), OpenError> {
    let tmp = files.commit.with_extension("commit.tmp");
    let io = |path: &Path| io_err_of(path);
    let mut bytes = vec![0u8; 2 * SLOT_SPACING as usize];
    for commit_seq in [slot.commit_seq, slot.commit_seq + 1] {
        let at = usize::try_from(slot_offset(commit_seq)).expect("4 KiB fits");
        bytes[at..at + SLOT_LEN].copy_from_slice(&encode_slot(
            commit_seq,
            slot.log_len,
            slot.generation,
        ));
    }
    failpoint!(
        "embedded::upgrade_write",
        OpenError::Io {
            path: tmp.clone(),
            cause: io_error("embedded::upgrade_write"),
        }
    );
    let file = fs.create(&tmp).map_err(io(&tmp))?;
    file.write_all_at(&bytes, 0).map_err(io(&tmp))?;
    failpoint!(
        "embedded::upgrade_fsync",
        OpenError::Io {
            path: tmp.clone(),
            cause: io_error("embedded::upgrade_fsync"),
        }
    );
    file.sync_data().map_err(io(&tmp))?;
    failpoint!(
        "embedded::upgrade_rename",
        OpenError::Io {
            path: files.commit.clone(),
            cause: io_error("embedded::upgrade_rename"),
        }
    );
    fs.rename(&tmp, &files.commit).map_err(io(&files.commit))?;
    failpoint!(
        "embedded::upgrade_dir_fsync",
        OpenError::Io {
            path: files.dir.clone(),
            cause: io_error("embedded::upgrade_dir_fsync"),
        }
    );
    fs.sync_dir(&files.dir).map_err(io(&files.dir))?;
    info!(
        file = %files.commit.display(),
        "upgraded the commit file to format version 2 (each commit slot in its own 4 KiB block)"
    );
    Ok(())
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

fn replay_log(bytes: &[u8], generation: u32) -> Replayed {
    let mut replay = Replay::new(generation);
    let mut end = LOG_HEADER_LEN;
    let mut next_seq = 1;
    let mut stopped = None;
    loop {
        let rest = &bytes[usize::try_from(end).expect("the log was read into memory")..];
        if rest.is_empty() {
            break;
        }
        match parse_record(rest, next_seq)
            .and_then(|(record, len)| replay.apply(next_seq, record).map(|()| len))
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

fn put_str(buf: &mut Vec<u8>, s: &str) {
    let len = u16::try_from(s.len()).expect("worker names are validated to 253 bytes");
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

/// A worker as the log describes it.
#[derive(Debug, Clone)]
struct LoggedWorker {
    record: WorkerRecord,
    /// When it was deregistered (wall clock, ms), if it is.
    deregistered_unix_ms: Option<u64>,
}

/// Rebuilds the state a log describes, in order.
struct Replay {
    generation: u32,
    workers: BTreeMap<Arc<str>, LoggedWorker>,
    ranges: RangeTable,
    pruned_below: u64,
}

impl Replay {
    fn new(generation: u32) -> Self {
        Self {
            generation,
            workers: BTreeMap::new(),
            ranges: RangeTable::default(),
            pruned_below: 0,
        }
    }

    fn apply(&mut self, seq: u64, record: Record) -> Result<(), String> {
        let revision = revision(self.generation, seq);
        match record {
            Record::Register(worker, dp_size) => {
                let entry = self.worker(&worker, dp_size);
                entry.record.dp_size = dp_size;
                entry.record.registered = true;
                entry.record.revision = revision;
                entry.deregistered_unix_ms = None;
            }
            Record::Deregister { worker, unix_ms } => {
                if let Some(entry) = self.workers.get_mut(&worker) {
                    entry.record.registered = false;
                    entry.record.revision = revision;
                    entry.deregistered_unix_ms = Some(unix_ms);
                }
            }
            Record::Reserve {
                worker,
                range,
                rooms_issued,
                created_unix_ms,
            } => {
                let entry = self.worker(&worker, range.dp_size());
                entry.record.rooms_issued = entry.record.rooms_issued.max(rooms_issued);
                let prefill_worker = entry.record.prefill_worker.clone();
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
                    entry.record.rooms_issued = entry.record.rooms_issued.max(rooms_issued);
                }
            }
            Record::Probe => {}
        }
        Ok(())
    }

    /// The worker's entry; one created by a range alone is not registered.
    fn worker(&mut self, worker: &Arc<str>, dp_size: DpSize) -> &mut LoggedWorker {
        self.workers
            .entry(worker.clone())
            .or_insert_with(|| LoggedWorker {
                record: WorkerRecord {
                    prefill_worker: worker.clone(),
                    dp_size,
                    registered: false,
                    rooms_issued: 0,
                    revision: 0,
                },
                deregistered_unix_ms: Some(0),
            })
    }

    fn high_water(&self) -> u64 {
        self.ranges.high_water().max(self.pruned_below)
    }

    fn into_snapshot(self) -> Snapshot {
        Snapshot {
            high_water: self.high_water(),
            workers: self.workers.into_values().map(|w| w.record).collect(),
            ranges: self.ranges,
            pruned_below: self.pruned_below,
            retention: Duration::ZERO,
        }
    }
}

fn revision(generation: u32, seq: u64) -> i64 {
    let revision = (u64::from(generation) << REVISION_SHIFT) | (seq & ((1 << REVISION_SHIFT) - 1));
    i64::try_from(revision).unwrap_or(i64::MAX)
}

/// Owns the files; the only code that writes them.
struct Writer {
    fs: Arc<dyn Fs>,
    files: Files,
    log: Box<dyn FsFile>,
    commit: Box<dyn FsFile>,
    /// Held for the life of the writer: the flock on `LOCK`.
    _lock: FsLock,
    log_len: u64,
    next_seq: u64,
    commit_seq: u64,
    generation: u32,
    high_water: u64,
    bounds: Bounds,
    /// Why writes stopped, until the files are settled again.
    halted: Option<String>,
    status: Arc<WriterStatus>,
}

impl Writer {
    fn run(mut self, requests: mpsc::Receiver<Request>) {
        loop {
            match requests.recv_timeout(RECOVERY_INTERVAL) {
                Ok(first) => {
                    let mut batch = vec![first];
                    while batch.len() < MAX_BATCH {
                        match requests.try_recv() {
                            Ok(request) => batch.push(request),
                            Err(_) => break,
                        }
                    }
                    if self.halted.is_some() {
                        self.recover();
                    }
                    match self.halted.clone() {
                        Some(reason) => {
                            for request in batch {
                                let _ = request.reply.send(Err(StoreError::Halted {
                                    reason: reason.clone(),
                                }));
                            }
                        }
                        None => self.commit_batch(batch),
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => self.tick(),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        self.status.gone.store(true, Ordering::Release);
    }

    /// Idle: a halted writer settles its files, a failing one probes the
    /// disk, so readiness comes back without waiting for a caller.
    fn tick(&mut self) {
        if self.halted.is_some() {
            self.recover();
        } else if self.status.failing.load(Ordering::Acquire) {
            let mut probe = Vec::new();
            encode_record(&mut probe, self.next_seq, &Record::Probe);
            if self.append_and_commit(&probe).is_ok() {
                self.next_seq += 1;
            }
        }
    }

    /// Stops writes until the files are settled; readiness stays off until
    /// a write succeeds again.
    fn halt(&mut self, reason: String) {
        error!(%reason, "the embedded store stopped taking writes until it has read its files back");
        self.halted = Some(reason);
        self.status.failing.store(true, Ordering::Release);
    }

    /// Reads the files back as a restart would and resumes past everything
    /// they hold (see "Failures while running").
    fn recover(&mut self) {
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
                self.log = settled.log;
                self.commit = settled.commit;
                self.status
                    .high_water
                    .store(self.high_water, Ordering::Release);
                // Readiness returns with the next successful write (a probe).
                self.halted = None;
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

    fn commit_batch(&mut self, batch: Vec<Request>) {
        let mut buf = Vec::new();
        let mut seq = self.next_seq;
        let mut high_water = self.high_water;
        let mut answers = Vec::with_capacity(batch.len());
        let mut pending_prune = None;
        for Request { op, reply } in batch {
            let record = match op {
                Op::Register(worker, dp_size) => Ok(Record::Register(worker, dp_size)),
                Op::Deregister { worker, unix_ms } => Ok(Record::Deregister { worker, unix_ms }),
                Op::Reserve(r) => RoomRange::reserve_after(
                    high_water,
                    r.dp_size,
                    r.want_bases,
                    r.need_bases,
                    self.bounds,
                )
                .map(|range| {
                    high_water = range.end();
                    Record::Reserve {
                        worker: r.prefill_worker,
                        range,
                        rooms_issued: r.rooms_issued,
                        created_unix_ms: r.created_unix_ms,
                    }
                })
                .map_err(StoreError::Space),
                Op::Prune(request) => {
                    // Compaction needs everything before it on disk first.
                    answers.push((reply, Err(StoreError::Closed)));
                    pending_prune = Some((answers.len() - 1, request));
                    continue;
                }
                Op::Issued(counts) => {
                    for (worker, rooms_issued) in counts {
                        encode_record(&mut buf, seq, &Record::Issued(worker, rooms_issued));
                        seq += 1;
                    }
                    answers.push((reply, Ok(Outcome::Done)));
                    continue;
                }
            };
            let outcome = record.map(|record| {
                encode_record(&mut buf, seq, &record);
                let outcome = match record {
                    Record::Reserve { range, .. } => Outcome::Reserved(range),
                    _ => Outcome::Revision(revision(self.generation, seq)),
                };
                seq += 1;
                outcome
            });
            answers.push((reply, outcome));
        }

        if !buf.is_empty() {
            if let Err(error) = self.append_and_commit(&buf) {
                for (reply, _) in answers {
                    let _ = reply.send(Err(error.clone()));
                }
                return;
            }
            self.next_seq = seq;
            self.high_water = high_water;
            self.status.high_water.store(high_water, Ordering::Release);
        }
        if let Some((index, request)) = pending_prune {
            answers[index].1 = self.compact(&request).map(Outcome::Pruned);
        }
        for (reply, outcome) in answers {
            // A caller that gave up is fine: its range is simply skipped.
            let _ = reply.send(outcome);
        }
    }

    fn io_error(&self, path: &Path, source: std::io::Error) -> StoreError {
        StoreError::Io {
            path: path.to_path_buf(),
            cause: Arc::new(source),
        }
    }

    /// Appends `records` and commits them; on any failure halts (the files'
    /// state is then unknown until settled again).
    fn append_and_commit(&mut self, records: &[u8]) -> Result<(), StoreError> {
        let result = self.try_append_and_commit(records);
        match &result {
            Ok(()) => {
                if self.status.failing.swap(false, Ordering::AcqRel) {
                    info!("the embedded store's writes succeed again");
                }
            }
            Err(error) => {
                warn!(%error, "embedded store write failed; nothing in this batch was acknowledged");
                self.halt(error.to_string());
            }
        }
        result
    }

    fn try_append_and_commit(&mut self, records: &[u8]) -> Result<(), StoreError> {
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

    /// Rewrites the log without what retention no longer needs (see
    /// "Compaction" above); the new log state is assigned once, at the end.
    fn compact(&mut self, request: &PruneRequest) -> Result<Pruned, StoreError> {
        let log_path = self.files.log.clone();
        let mut bytes = vec![0u8; usize::try_from(self.log_len).expect("the log fits in memory")];
        self.log
            .read_exact_at(&mut bytes, 0)
            .map_err(|e| self.io_error(&log_path, e))?;
        let Replayed {
            mut replay,
            stopped,
            ..
        } = replay_log(&bytes, self.generation);
        if let Some(reason) = stopped {
            // Everything below log_len was written and read back by us.
            return Err(self.io_error(
                &log_path,
                std::io::Error::new(std::io::ErrorKind::InvalidData, reason),
            ));
        }
        let pruned = replay.ranges.prune(request.cutoff_unix_ms, &request.held);
        let owners: std::collections::HashSet<Arc<str>> = replay
            .ranges
            .iter()
            .map(|owner| owner.prefill_worker.clone())
            .collect();
        let forgotten: Vec<Arc<str>> = replay
            .workers
            .values()
            .filter(|w| {
                w.deregistered_unix_ms
                    .is_some_and(|at| at < request.cutoff_unix_ms)
                    && !owners.contains(&w.record.prefill_worker)
            })
            .map(|w| w.record.prefill_worker.clone())
            .collect();
        if pruned == 0 && forgotten.is_empty() {
            return Ok(Pruned {
                pruned_below: replay.pruned_below,
                forgotten,
                revision: revision(self.generation, self.next_seq),
            });
        }
        for name in &forgotten {
            replay.workers.remove(name);
        }
        let pruned_below = replay.pruned_below.max(pruned);
        let generation = self.generation + 1;
        let mut log = encode_log_header(generation);
        let mut seq = 1;
        let mut push = |log: &mut Vec<u8>, record: Record| {
            encode_record(log, seq, &record);
            seq += 1;
        };
        for worker in replay.workers.values() {
            let name = worker.record.prefill_worker.clone();
            push(
                &mut log,
                Record::Register(name.clone(), worker.record.dp_size),
            );
            if let Some(unix_ms) = worker.deregistered_unix_ms {
                push(
                    &mut log,
                    Record::Deregister {
                        worker: name.clone(),
                        unix_ms,
                    },
                );
            }
            push(&mut log, Record::Issued(name, worker.record.rooms_issued));
        }
        for owner in replay.ranges.iter() {
            push(
                &mut log,
                Record::Reserve {
                    worker: owner.prefill_worker.clone(),
                    range: owner.range,
                    rooms_issued: 0,
                    created_unix_ms: owner.created_unix_ms,
                },
            );
        }
        push(&mut log, Record::Pruned(pruned_below));

        let compacted = self.write_compacted(&log)?;
        // The new log is in place: from here any failure leaves the files in
        // a state only reading them back can tell.
        if let Err(error) = self.commit_compaction(generation, &log) {
            self.halt(error.to_string());
            return Err(error);
        }
        self.log = compacted;
        self.log_len = u64::try_from(log.len()).expect("fits");
        self.next_seq = seq;
        self.generation = generation;
        info!(
            ranges_kept = replay.ranges.len(),
            workers_forgotten = forgotten.len(),
            pruned_below,
            log_bytes = self.log_len,
            "compacted the embedded store's log"
        );
        Ok(Pruned {
            pruned_below,
            forgotten,
            revision: revision(generation, 0),
        })
    }

    /// Writes the compacted log aside, fsyncs it and renames it over the
    /// live log. A failure before the rename leaves the live log as it was;
    /// a failed rename halts the writer, as it may have happened.
    fn write_compacted(&mut self, log: &[u8]) -> Result<Box<dyn FsFile>, StoreError> {
        let path = self.files.compact.clone();
        let written = (|| {
            failpoint!("compact::write", io_error("compact::write"));
            let file = self.fs.create(&path)?;
            file.write_all_at(log, 0)?;
            failpoint!("compact::fsync", io_error("compact::fsync"));
            file.sync_data()?;
            Ok(file)
        })();
        let file = match written {
            Ok(file) => file,
            Err(error) => {
                let _ = self.fs.remove_file(&path);
                return Err(self.io_error(&path, error));
            }
        };
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
        Ok(file)
    }

    /// Makes the rename durable, then commits the new generation.
    fn commit_compaction(&mut self, generation: u32, log: &[u8]) -> Result<(), StoreError> {
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
        let new_len = u64::try_from(log.len()).expect("fits");
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

    /// A worker name: UTF-8 that passes the same checks as a request's.
    fn worker(&mut self) -> Option<Arc<str>> {
        let len = self.array().map(u16::from_le_bytes)?;
        let bytes = self.bytes(usize::from(len))?;
        let name = std::str::from_utf8(bytes).ok()?;
        crate::allocator::validate_worker(name).ok()?;
        Some(Arc::from(name))
    }

    fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

#[cfg(test)]
mod tests;
