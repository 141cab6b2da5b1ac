//! Durable state behind the allocator: worker registrations and the ranges of
//! the room space reserved for them.
//!
//! A [`Store`] is consulted only off the hot path: when a worker registers,
//! realigns or deregisters, and when a worker's in-memory range runs low. It
//! must make every change durable before its future resolves, because the
//! allocator hands out rooms from a range as soon as `reserve` returns.
//! No backend type escapes this module.

pub mod embedded;
pub mod etcd;
pub mod fs;
#[cfg(test)]
pub mod sim_fs;
pub mod store_id;

use std::collections::BTreeSet;
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::sync::mpsc;

use crate::space::{
    Bounds, DpSize, OverlapError, RangeOwner, RangeTable, Room, RoomRange, SpaceError,
};

pub use embedded::EmbeddedStore;
pub use etcd::{EtcdConfig, EtcdStore};
pub use room_allocator_core::WorkerRecord;

/// The boxed future every store operation returns; boxing keeps `Store`
/// object-safe and costs nothing next to an fsync or an etcd round trip.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// A request for the next range of the space for one worker.
#[derive(Debug, Clone)]
pub struct Reservation {
    pub prefill_worker: Arc<str>,
    pub dp_size: DpSize,
    /// Store revision of the registration the range is for: a shared store
    /// reserves only while the worker's registration still has it.
    pub revision: i64,
    /// Bases wanted; fewer are fine near the end of the space...
    pub want_bases: u64,
    /// ...but never fewer than this (a lease needs its whole block).
    pub need_bases: u64,
    /// The worker's `rooms_issued` so far, persisted with the range so the
    /// count survives restarts (it may lag by the rooms issued since).
    pub rooms_issued: u64,
    /// Wall-clock time of the reservation, for retention.
    pub created_unix_ms: u64,
}

/// A registration change made elsewhere (another replica), to apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUpdate {
    Registration(WorkerRecord),
    /// The worker's record is gone from the store (deregistered long
    /// enough ago that nothing needs it): forget it.
    Forgotten {
        prefill_worker: Arc<str>,
        revision: i64,
    },
}

/// A worker's `rooms_issued`: in all, and since the store was opened.
#[derive(Debug, Clone)]
pub struct IssuedCount {
    pub prefill_worker: Arc<str>,
    pub total: u64,
    pub since_open: u64,
}

/// Everything a store holds, read once when it opens.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub workers: Vec<WorkerRecord>,
    pub ranges: RangeTable,
    /// Ranges ending at or below this were pruned by retention.
    pub pruned_below: u64,
    /// End of the highest range ever reserved (at least `pruned_below`).
    pub high_water: u64,
    /// The retention in force: the store's own when it keeps one (etcd:
    /// one setting for every replica), else the configured one.
    pub retention: Duration,
}

/// What retention asks a store to drop.
#[derive(Debug, Clone)]
pub struct PruneRequest {
    /// Ranges reserved before this (wall clock, ms) are dropped...
    pub cutoff_unix_ms: u64,
    /// ...except these (by start), which this process still serves from.
    pub held: BTreeSet<u64>,
}

/// What a prune did.
#[derive(Debug, Clone, Default)]
pub struct Pruned {
    /// Ranges ending at or below this were pruned (0 if none ever).
    pub pruned_below: u64,
    /// Deregistered workers whose records were dropped: nothing needs them.
    pub forgotten: Vec<Arc<str>>,
    /// The store's revision when they were dropped: a registration with a
    /// later revision brought the worker back and wins.
    pub revision: i64,
}

/// Failures of a store; the allocator reports all but `Space` as UNAVAILABLE.
#[derive(Debug, Clone, Error)]
pub enum StoreError {
    #[error("cannot write {}: {cause}; check free space and permissions of the data dir", path.display())]
    Io {
        path: PathBuf,
        cause: Arc<io::Error>,
    },
    #[error(transparent)]
    Space(#[from] SpaceError),
    #[error("the store is shut down")]
    Closed,
    #[error("the store broke its promise that no two ranges share a room: for {worker:?} it returned {overlap}, so no room is served from it; stop this server and check that no other server shares its data dir or etcd prefix")]
    Overlap {
        worker: Arc<str>,
        overlap: OverlapError,
    },
    #[error("the embedded store stopped writing after {reason}; it resumes once it has read its files back, or restart the server")]
    Halted { reason: String },
    #[error("etcd failed to {operation}: {message}")]
    Etcd {
        operation: &'static str,
        message: String,
    },
    #[error("etcd did not {operation} within {after:?}")]
    Timeout {
        operation: &'static str,
        after: Duration,
    },
    #[error("the registration of {worker:?} changed in the store")]
    StaleRegistration {
        worker: Arc<str>,
        /// What the store holds now; `None` if the worker is gone.
        current: Option<Box<WorkerRecord>>,
    },
    #[error("{attempts} reservation attempts in a row lost to other replicas")]
    Contention { attempts: usize },
    #[error("etcd key {key} is damaged ({reason}); fix or restore it")]
    Corrupt { key: String, reason: String },
    #[error("worker registrations were last confirmed with etcd {:.1}s ago, over the {:.1}s staleness window", age.as_secs_f64(), window.as_secs_f64())]
    Stale { age: Duration, window: Duration },
    #[error("over {per_sec} look-ups a second in etcd for rooms this replica does not hold; retry with backoff, or ask the replica that issued the rooms")]
    LookupsThrottled { per_sec: u32 },
    #[error("failpoint {0} injected a failure")]
    Injected(&'static str),
}

/// Why a store refused to open. Each names the file or key and leaves it untouched.
#[derive(Debug, Error)]
pub enum OpenError {
    #[error("cannot use {}: {cause}", path.display())]
    Io { path: PathBuf, cause: io::Error },
    #[error(
        "{} is locked by another room-allocator; two servers must never share a data dir (they would issue the same rooms)",
        path.display()
    )]
    Locked { path: PathBuf },
    #[error(
        "{} is not a room-allocator file (bad magic); refusing to start rather than start the room space over. Point --data-dir at the right directory",
        path.display()
    )]
    Foreign { path: PathBuf },
    #[error(
        "{} has format version {found}, this binary reads version {supported}; run a newer room-allocator",
        path.display()
    )]
    UnsupportedVersion {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error(
        "{} is corrupt at byte {offset}: {reason}. Refusing to start so that no room is issued twice; restore the data dir from a backup or move it aside knowingly",
        path.display()
    )]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error(
        "{} is truncated: {actual} bytes, but {committed} bytes were acknowledged. Refusing to start so that no room is issued twice; restore the data dir from a backup",
        path.display()
    )]
    Truncated {
        path: PathBuf,
        committed: u64,
        actual: u64,
    },
    #[error(
        "{} says this data dir was migrated to etcd ({target}); serving from it again would issue its rooms twice. Run with --etcd-endpoints instead (or finish the migration: rerun `room-allocator migrate`)",
        path.display()
    )]
    Migrated { path: PathBuf, target: String },
    #[error(
        "{} says this data dir was already migrated to etcd ({target}); there is nothing left to migrate. Serve from etcd",
        path.display()
    )]
    AlreadyMigrated { path: PathBuf, target: String },
    #[error(
        "cannot read {} ({cause}); it marks a data dir migrated to etcd, so refusing to start rather than risk serving rooms etcd now owns. Fix its permissions, or remove it only if no migration ever ran",
        path.display()
    )]
    MigratedUnreadable { path: PathBuf, cause: io::Error },
    #[error(
        "cannot reach etcd at {endpoints}: {message}; check --etcd-endpoints and that etcd is up"
    )]
    Etcd { endpoints: String, message: String },
    #[error("etcd at {endpoints} did not answer within {after:?}; check --etcd-endpoints and that etcd is up")]
    EtcdTimeout { endpoints: String, after: Duration },
    #[error("etcd key {key} is damaged: {reason}. Refusing to start so that no room is issued twice; restore it from a backup")]
    CorruptKey { key: String, reason: String },
    #[error(
        "{} is missing while {} exists; the data dir is incomplete. Refusing to start so that no room is issued twice",
        missing.display(),
        present.display()
    )]
    Missing { missing: PathBuf, present: PathBuf },
    #[error(
        "{} holds no room-allocator store (it is missing, empty, or holds something else); migrate moves an existing store only and changed nothing. Point --data-dir at the data dir the embedded server ran on",
        dir.display()
    )]
    NoStore { dir: PathBuf },
    #[error(
        "{} holds no room-allocator store but is not empty ({entry:?} is there); refusing to start a new room space in it (rooms would start over at 1). Check --data-dir and that its volume is mounted; to start a new store knowingly, use a missing or empty directory",
        dir.display()
    )]
    NotAStore { dir: PathBuf, entry: String },
    #[error(
        "{} held a room-allocator store ({trace} is still there) but its rooms.log and rooms.commit are gone; refusing to start a new room space in it (rooms would start over at 1 and repeat the lost store's). Restore the two files from where they went; to abandon that space knowingly, start on a new empty directory with bounds (--min-room) above every room it issued",
        dir.display()
    )]
    StoreGone { dir: PathBuf, trace: String },
    #[error(
        "the store has reserved rooms up to {high_water}, past --max-room {max_room}: nothing is left to hand out, and handing out rooms below it again would repeat them. Raise --max-room, or give this deployment a new store (data dir or --etcd-prefix) with bounds disjoint from every other"
    )]
    BeyondBounds { high_water: u64, max_room: u64 },
    #[error(
        "{setting} {retention_secs}s is longer than etcd can keep a range: a range's lease TTL (twice the retention plus up to an hour) must fit etcd's maximum of 9,000,000,000 s; use at most {max} (about 136 years)"
    )]
    RetentionTooLong {
        setting: &'static str,
        retention_secs: u64,
        max: &'static str,
    },
    #[error(
        "etcd at {endpoints} is version {version}; room-allocator needs etcd 3.4 or later (3.4, 3.5, 3.6: watch progress requests confirm a replica's view). Upgrade etcd"
    )]
    EtcdVersion { endpoints: String, version: String },
}

/// How a store is doing, read at once so readiness, the metrics and the
/// health check agree.
#[derive(Debug, Clone)]
pub struct Health {
    /// Whether this process can hand out rooms: (embedded) its writes
    /// succeed, (shared) its registrations are fresh. Readiness follows it.
    pub ready: Result<(), StoreError>,
    /// Whether the store answered its last request (for the metrics).
    pub reachable: bool,
    /// How long ago the registrations were last confirmed (shared stores).
    pub confirmed_ago: Option<Duration>,
}

/// Durable registrations and range reservations: what every store does.
pub trait Store: Send + Sync + 'static {
    /// Short name for logs and metric labels.
    fn kind(&self) -> &'static str;

    /// The id written into the store when it was created (see `store_id`),
    /// if the store keeps one.
    fn store_id(&self) -> Option<String>;

    /// The shared-store capability, if other processes write the same store
    /// (etcd replicas): then memory may lag behind it, and the allocator
    /// asks the store before it refuses. `None` for a single writer, whose
    /// memory is the truth.
    fn shared(&self) -> Option<&dyn SharedStore>;

    /// Records that `prefill_worker` is registered with `dp_size`, unless it
    /// already is; returns the registration's revision.
    fn register(&self, prefill_worker: Arc<str>, dp_size: DpSize) -> StoreFuture<'_, i64>;

    /// Records that `prefill_worker` gets no new rooms; returns the revision.
    /// The record is kept while its ranges are, then forgotten.
    fn deregister(&self, prefill_worker: Arc<str>, dp_size: DpSize) -> StoreFuture<'_, i64>;

    /// Reserves the next range of the space, aligned to `dp_size`, durably
    /// and past every range reserved before, if the worker's registration
    /// still has the reservation's revision.
    fn reserve(&self, reservation: Reservation) -> StoreFuture<'_, RoomRange>;

    /// Persists `rooms_issued` counters, e.g. at shutdown.
    fn record_issued(&self, counts: Vec<IssuedCount>) -> StoreFuture<'_, ()>;

    /// Drops what retention no longer needs. Stores that expire ranges by
    /// themselves (etcd leases) do nothing.
    fn prune(&self, request: PruneRequest) -> StoreFuture<'_, Pruned>;

    /// Readiness, reachability and the registrations' age, now.
    fn health(&self) -> Health;

    /// The highest mark this process knows: every range ends at or below it.
    fn high_water(&self) -> u64;

    /// Flushes and releases the store; later calls fail with `Closed`.
    fn close(&self) -> StoreFuture<'_, ()>;
}

/// What a store written by several processes (etcd replicas) adds: memory
/// is only a cache of it, so a miss or a refusal is checked with the store
/// first, and changes made elsewhere arrive as updates.
pub trait SharedStore: Send + Sync {
    /// The range holding `room`, which is not in memory: another replica
    /// may have reserved it.
    fn lookup(&self, room: Room) -> StoreFuture<'_, Option<RangeOwner>>;

    /// Whether a room in no range is known to be older than every range the
    /// store still keeps (pruned, as far as anyone can tell).
    fn missing_is_pruned(&self, room: Room) -> bool;

    /// A worker's registration as stored: another replica may have changed
    /// it.
    fn lookup_worker(&self, prefill_worker: &str) -> StoreFuture<'_, Option<WorkerRecord>>;

    /// Registration changes made elsewhere, to apply as they come; once.
    fn take_updates(&self) -> Option<mpsc::UnboundedReceiver<StoreUpdate>>;

    /// Whether rooms already reserved may be handed out now: refused once
    /// the registrations could not be confirmed for too long (a
    /// realignment elsewhere may have gone unseen).
    fn check_fresh(&self) -> Result<(), StoreError>;
}

/// Refuses a store whose used space reaches past the configured bounds.
pub fn check_bounds(high_water: u64, bounds: Bounds) -> Result<(), OpenError> {
    if high_water > bounds.end() {
        return Err(OpenError::BeyondBounds {
            high_water,
            max_room: bounds.max_room(),
        });
    }
    Ok(())
}

/// Milliseconds since the Unix epoch, for range timestamps.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
