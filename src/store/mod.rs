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

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::sync::{mpsc, watch};

use crate::space::{DpSize, RangeOwner, RangeTable, Room, RoomRange, SpaceError};

pub use embedded::EmbeddedStore;
pub use etcd::{EtcdConfig, EtcdStore};

/// The boxed future every store operation returns; boxing keeps `Store`
/// object-safe and costs nothing next to an fsync or an etcd round trip.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// A request for the next range of the space for one worker.
#[derive(Debug, Clone)]
pub struct Reservation {
    pub prefill_worker: Arc<str>,
    pub dp_size: DpSize,
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

/// A worker as last persisted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerRecord {
    pub prefill_worker: Arc<str>,
    pub dp_size: DpSize,
    /// False once deregistered: its ranges still resolve, no new rooms.
    pub registered: bool,
    pub rooms_issued: u64,
    /// Store revision of this registration (etcd's mod revision; 0 for the
    /// embedded store, which has one writer). Newer wins.
    pub revision: i64,
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
}

/// Failures of a store; the allocator reports all but `Space` as UNAVAILABLE.
#[derive(Debug, Clone, Error)]
pub enum StoreError {
    #[error("cannot write {}: {source}; check free space and permissions of the data dir", path.display())]
    Io {
        path: PathBuf,
        source: Arc<io::Error>,
    },
    #[error(transparent)]
    Space(#[from] SpaceError),
    #[error("the store is shut down")]
    Closed,
    #[error("etcd failed to {operation}: {source}")]
    Etcd {
        operation: &'static str,
        source: Arc<dyn std::error::Error + Send + Sync>,
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
    #[error("a counter key in etcd (high_water, pruned_below or issued/*) is not a number; fix or restore it")]
    CorruptCounter,
    #[error("worker registrations were last confirmed with etcd {age:?} ago, over the {window:?} staleness window")]
    Stale { age: Duration, window: Duration },
}

/// Why a store refused to open. Each names the file and leaves it untouched.
#[derive(Debug, Error)]
pub enum OpenError {
    #[error("cannot use {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
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
        "{} says this data dir was migrated to etcd ({target}); serving from it again would issue its rooms twice. Run with --etcd-endpoints instead",
        path.display()
    )]
    Migrated { path: PathBuf, target: String },
    #[error(
        "cannot reach etcd at {endpoints}: {source}; check --etcd-endpoints and that etcd is up"
    )]
    Etcd {
        endpoints: String,
        source: etcd_client::Error,
    },
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
}

/// Durable registrations and range reservations.
pub trait Store: Send + Sync + 'static {
    /// Short name for logs and metric labels.
    fn kind(&self) -> &'static str;

    /// Records that `prefill_worker` is registered with `dp_size`; returns
    /// the registration's revision.
    fn register(&self, prefill_worker: Arc<str>, dp_size: DpSize) -> StoreFuture<'_, i64>;

    /// Records that `prefill_worker` gets no new rooms; returns the revision.
    fn deregister(&self, prefill_worker: Arc<str>, dp_size: DpSize) -> StoreFuture<'_, i64>;

    /// Reserves the next range of the space, aligned to `dp_size`, durably
    /// and past every range reserved before, if the worker is still
    /// registered with that dp_size.
    fn reserve(&self, reservation: Reservation) -> StoreFuture<'_, RoomRange>;

    /// Persists `rooms_issued` counters, e.g. at shutdown.
    fn record_issued(&self, counts: Vec<IssuedCount>) -> StoreFuture<'_, ()>;

    /// Drops ranges reserved before `cutoff_unix_ms` (retention); returns the
    /// highest end pruned so far, 0 if none.
    fn prune(&self, cutoff_unix_ms: u64) -> StoreFuture<'_, u64>;

    /// The range holding `room` if it is not in memory: another replica may
    /// have reserved it. Single-writer stores have everything in memory.
    fn lookup(&self, _room: Room) -> StoreFuture<'_, Option<RangeOwner>> {
        Box::pin(async { Ok(None) })
    }

    /// A worker's registration as stored, for a worker not known in memory:
    /// another replica may have registered it. Single-writer stores have
    /// everything in memory.
    fn lookup_worker(&self, _prefill_worker: &str) -> StoreFuture<'_, Option<WorkerRecord>> {
        Box::pin(async { Ok(None) })
    }

    /// Whether rooms may be served from memory now: a shared store refuses
    /// once it could not confirm the registrations for too long.
    fn check_fresh(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Registration changes made elsewhere, to apply as they come; once.
    fn take_updates(&self) -> Option<mpsc::UnboundedReceiver<WorkerRecord>> {
        None
    }

    /// Whether the store can be reached, for the health service.
    fn reachable(&self) -> Option<watch::Receiver<bool>> {
        None
    }

    /// Flushes and releases the store; later calls fail with `Closed`.
    fn close(&self) -> StoreFuture<'_, ()>;
}

/// Milliseconds since the Unix epoch, for range timestamps.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
