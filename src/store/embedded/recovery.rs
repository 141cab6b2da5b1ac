//! Opening and settling the embedded store's files: the decisions a
//! restart makes about what the files hold, and the writes that make
//! them consistent before the writer appends again.
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

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use super::format::*;
use crate::failpoint;
use crate::failpoint::io_error;
use crate::space::{DpSize, RangeOwner, RangeTable};
use crate::store::fs::{Fs, FsFile};
use crate::store::{OpenError, Snapshot, WorkerRecord};

/// Refuses a dir that `migrate` marked (a server), or marked complete
/// (`migrate` itself), and one whose mark cannot be read.
pub(super) fn check_not_migrated(
    fs: &dyn Fs,
    dir: &Path,
    for_migration: bool,
) -> Result<(), OpenError> {
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
pub(super) fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    }
}

/// Makes `dir` and any missing parent, one level at a time, syncing the
/// parent of each: a new directory's entry is durable only once its parent
/// is, and a data dir lost to a power loss after rooms were issued would
/// start the room space over.
pub(super) fn create_dir_durably(fs: &dyn Fs, dir: &Path) -> Result<(), OpenError> {
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
pub(super) fn sync_ancestors(fs: &dyn Fs, dir: &Path) -> Result<(), OpenError> {
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

pub(super) fn io_err_of(path: &Path) -> impl FnOnce(std::io::Error) -> OpenError {
    let path = path.to_path_buf();
    move |cause| OpenError::Io { path, cause }
}

/// Makes sure both files exist; returns true if they were just created.
pub(super) fn prepare_files(fs: &dyn Fs, files: &Files) -> Result<bool, OpenError> {
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

pub(super) fn read_commit(file: &dyn FsFile, path: &Path) -> Result<Slot, OpenError> {
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
pub(super) struct Loaded {
    /// The log's bytes up to `end`.
    pub(super) bytes: Vec<u8>,
    pub(super) replay: Replay,
    /// End of the last valid record: where the next commit writes.
    pub(super) end: u64,
    pub(super) next_seq: u64,
    /// Bytes of an invalid (torn) tail past `end`.
    pub(super) torn_tail: u64,
    pub(super) generation: u32,
    /// Log bytes acknowledged by the commit slot (or a finished compaction).
    pub(super) committed: u64,
}

impl Loaded {
    pub(super) fn high_water(&self) -> u64 {
        self.replay.high_water()
    }
}

pub(super) fn read_log(file: &dyn FsFile, path: &Path, slot: Slot) -> Result<Loaded, OpenError> {
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
pub(super) struct Settled {
    pub(super) loaded: Loaded,
    pub(super) log: Box<dyn FsFile>,
    pub(super) commit: Box<dyn FsFile>,
    pub(super) commit_seq: u64,
}

/// What settling writes, decided from what was read (pure, so the crash
/// tests can drive it over every slot and log shape).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct SettlePlan {
    /// Cut the log here: a torn, never acknowledged write follows.
    pub(super) cut_at: Option<u64>,
    /// Write the log again from here to its end and sync it: records past
    /// the commit, read back perhaps only from the page cache, adopted.
    pub(super) rewrite_from: Option<u64>,
    /// The fresh commit's number (see "Opening": it goes over the doubtful
    /// newest slot and keeps the older one, unless that one is not valid).
    pub(super) commit_seq: u64,
}

/// Decides what settling writes: `committed` bytes were acknowledged,
/// records end at `end`, and `torn_tail` invalid bytes follow them.
pub(super) fn plan_settle(slot: Slot, committed: u64, end: u64, torn_tail: u64) -> SettlePlan {
    SettlePlan {
        cut_at: (torn_tail > 0).then_some(end),
        rewrite_from: (end > committed).then_some(committed),
        commit_seq: slot.commit_seq + if slot.other_valid { 2 } else { 1 },
    }
}

/// Reads the files as a restart does, cuts a torn tail, and commits what was
/// adopted (see "Opening" above; "Media assumptions" in the store's docs). Used at open and after any failed write.
pub(super) fn settle(fs: &dyn Fs, files: &Files) -> Result<Settled, OpenError> {
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
    let plan = plan_settle(slot, loaded.committed, loaded.end, loaded.torn_tail);
    if plan.rewrite_from.is_some() {
        warn!(
            file = %files.log.display(),
            bytes = loaded.end - loaded.committed,
            "adopted durable records written after the last commit (a crash before acknowledging them); their rooms count as reserved"
        );
    }
    if let Some(cut_at) = plan.cut_at {
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
        log.set_len(cut_at).map_err(io(&files.log))?;
        failpoint!(
            "embedded::settle_truncate_fsync",
            OpenError::Io {
                path: files.log.clone(),
                cause: io_error("embedded::settle_truncate_fsync"),
            }
        );
        log.sync_data().map_err(io(&files.log))?;
    }
    if let Some(from) = plan.rewrite_from {
        // Read back, but perhaps only from the page cache (after a failed
        // fsync Linux keeps the pages and forgets they were not written):
        // write them again and sync before committing them.
        let at = usize::try_from(from).expect("in memory");
        failpoint!(
            "embedded::settle_rewrite",
            OpenError::Io {
                path: files.log.clone(),
                cause: io_error("embedded::settle_rewrite"),
            }
        );
        log.write_all_at(&loaded.bytes[at..], from)
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
    let commit_seq = plan.commit_seq;
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
pub(super) fn upgrade_commit(fs: &dyn Fs, files: &Files, slot: Slot) -> Result<(), OpenError> {
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
pub(super) struct Replayed {
    pub(super) replay: Replay,
    /// End of the last record applied.
    pub(super) end: u64,
    pub(super) next_seq: u64,
    /// Why replay stopped before the end of `bytes`, if it did.
    pub(super) stopped: Option<String>,
}

pub(super) fn replay_log(bytes: &[u8], generation: u32) -> Replayed {
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

/// A worker as the log describes it.
#[derive(Debug, Clone)]
pub(super) struct LoggedWorker {
    pub(super) record: WorkerRecord,
    /// When it was deregistered (wall clock, ms), if it is.
    pub(super) deregistered_unix_ms: Option<u64>,
}

/// Rebuilds the state a log describes, in order.
pub(super) struct Replay {
    pub(super) generation: u32,
    pub(super) workers: BTreeMap<Arc<str>, LoggedWorker>,
    pub(super) ranges: RangeTable,
    pub(super) pruned_below: u64,
}

impl Replay {
    pub(super) fn new(generation: u32) -> Self {
        Self {
            generation,
            workers: BTreeMap::new(),
            ranges: RangeTable::default(),
            pruned_below: 0,
        }
    }

    pub(super) fn apply(&mut self, seq: u64, record: Record) -> Result<(), String> {
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
    pub(super) fn worker(&mut self, worker: &Arc<str>, dp_size: DpSize) -> &mut LoggedWorker {
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

    pub(super) fn high_water(&self) -> u64 {
        self.ranges.high_water().max(self.pruned_below)
    }

    pub(super) fn into_snapshot(self) -> Snapshot {
        Snapshot {
            high_water: self.high_water(),
            workers: self.workers.into_values().map(|w| w.record).collect(),
            ranges: self.ranges,
            pruned_below: self.pruned_below,
            retention: Duration::ZERO,
        }
    }
}

#[cfg(test)]
mod plan_tests {
    //! The settle decision, driven directly over every slot shape.
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The fresh commit never goes over the only durable slot: with two
        /// valid slots it replaces the newest (perhaps only in the page
        /// cache) and keeps the older; with one, it goes to the other slot.
        /// It is always newer than what was read, so it is the one read next.
        #[test]
        fn the_fresh_commit_keeps_the_slot_that_may_be_the_only_durable_one(
            commit_seq in 0u64..1 << 60,
            other_valid: bool,
            committed in 16u64..1 << 30,
            adopted in 0u64..4096,
            torn_tail in 0u64..4096,
        ) {
            let slot = Slot { commit_seq, log_len: committed, generation: 0, other_valid, version: COMMIT_VERSION };
            let end = committed + adopted;
            let plan = plan_settle(slot, committed, end, torn_tail);
            prop_assert!(plan.commit_seq > commit_seq);
            let older = slot_offset(commit_seq + 1);
            if other_valid {
                prop_assert_ne!(slot_offset(plan.commit_seq), older, "the older valid slot is kept");
            } else {
                prop_assert_ne!(slot_offset(plan.commit_seq), slot_offset(commit_seq), "the only valid slot is kept");
            }
            prop_assert_eq!(plan.cut_at, (torn_tail > 0).then_some(end), "a torn tail is cut right after the last valid record");
            prop_assert_eq!(plan.rewrite_from.is_some(), adopted > 0, "adopted records are written again before they are committed");
            if let Some(from) = plan.rewrite_from {
                prop_assert_eq!(from, committed, "nothing acknowledged is rewritten");
            }
        }
    }
}
