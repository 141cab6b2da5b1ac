//! The embedded store: a checksummed append-only log plus two commit slots.
//!
//! # Why not an embedded database
//! The state is tiny (registrations and one record per reserved range) and is
//! only ever appended to. redb would work, but it repairs a file in place after
//! an unclean shutdown, while we want every damaged file left exactly as found
//! and a refusal to start. A format we fully control gives that, with no extra
//! dependency and a commit protocol that fits on one screen.
//!
//!
//! # Modules
//! - `format`: file names, the log and commit-slot layout and their codecs (pure).
//! - `recovery`: opening and settling the files after a crash or a failed write.
//! - `writer`: the writer thread, group commit, halting, compaction.
//! - `holdings`: what the log holds, in memory, so a prune with nothing due
//!   is answered without reading the log (pure).
//! - `compaction`: a compaction's streaming pass over the log, in slices.
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

use std::path::Path;
use std::sync::{mpsc, Arc, Mutex};
use std::thread;

use tokio::sync::{oneshot, watch};
use tracing::{info, warn};

use super::fs::{Fs, RealFs};
use super::{
    Health, IssuedCount, OpenError, PruneRequest, Pruned, Reservation, SharedStore, Snapshot,
    Store, StoreError, StoreFuture,
};
use crate::failpoint;
use crate::failpoint::io_error;
use crate::space::{Bounds, DpSize, RoomRange};

mod compaction;
mod format;
mod holdings;
mod recovery;
mod writer;

/// The codecs the fuzz targets drive.
#[cfg(test)]
pub(crate) use format::{decode_commit, encode_record, parse_record, Record};
use format::{Files, LOCK_FILE, MIGRATED_FILE};
use holdings::Holdings;
use recovery::{check_not_migrated, create_dir_durably, io_err_of, prepare_files, settle, Settled};
use writer::{Reply, Request, Writer, WriterState, WriterStatus};

/// The embedded store handle: requests go to one writer thread.
pub struct EmbeddedStore {
    fs: Arc<dyn Fs>,
    requests: Mutex<Option<mpsc::Sender<Request>>>,
    writer: Mutex<Option<thread::JoinHandle<()>>>,
    /// The writer's state and high-water mark, as it last published them.
    status: watch::Receiver<WriterStatus>,
    /// Written when the store was created (see `store_id`).
    store_id: String,
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
        let (status_tx, status) = watch::channel(WriterStatus {
            state: WriterState::Ready,
            high_water,
        });
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
            state: WriterState::Ready,
            status: status_tx,
            holdings: Holdings::of_replay(&loaded.replay),
            compaction: None,
            waiting_prunes: Default::default(),
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

    /// Queues a request built around its reply channel; the future ends
    /// with the writer's answer, or `Closed` once the writer is gone.
    fn submit<T: Send + 'static>(
        &self,
        request: impl FnOnce(Reply<T>) -> Request,
    ) -> StoreFuture<'_, T> {
        let (reply, answer) = oneshot::channel();
        let sent = self
            .requests
            .lock()
            .expect("store sender lock is never poisoned: no code panics while holding it")
            .as_ref()
            .map(|tx| tx.send(request(reply)).is_ok())
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

    fn store_id(&self) -> Option<String> {
        Some(self.store_id.clone())
    }

    fn register(&self, prefill_worker: Arc<str>, dp_size: DpSize) -> StoreFuture<'_, i64> {
        self.submit(|reply| Request::Register {
            worker: prefill_worker,
            dp_size,
            reply,
        })
    }

    fn deregister(&self, prefill_worker: Arc<str>, _dp_size: DpSize) -> StoreFuture<'_, i64> {
        self.submit(|reply| Request::Deregister {
            worker: prefill_worker,
            unix_ms: super::unix_ms(),
            reply,
        })
    }

    fn reserve(&self, reservation: Reservation) -> StoreFuture<'_, RoomRange> {
        self.submit(|reply| Request::Reserve { reservation, reply })
    }

    fn record_issued(&self, counts: Vec<IssuedCount>) -> StoreFuture<'_, ()> {
        let counts = counts
            .into_iter()
            .map(|c| (c.prefill_worker, c.total))
            .collect();
        self.submit(|reply| Request::Issued { counts, reply })
    }

    fn prune(&self, request: PruneRequest) -> StoreFuture<'_, Pruned> {
        self.submit(|reply| Request::Prune { request, reply })
    }

    fn shared(&self) -> Option<&dyn SharedStore> {
        // The only writer of its files: memory is the truth.
        None
    }

    fn health(&self) -> Health {
        // A writer that ended without saying so (it panicked) dropped its
        // sender: that is gone too.
        let ready = if self.status.has_changed().is_err() {
            Err(StoreError::Closed)
        } else {
            self.status.borrow().state.readiness()
        };
        Health {
            reachable: ready.is_ok(),
            ready,
            confirmed_ago: None,
        }
    }

    fn high_water(&self) -> u64 {
        self.status.borrow().high_water
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

#[cfg(test)]
mod tests;
