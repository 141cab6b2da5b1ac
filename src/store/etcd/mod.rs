//! The etcd store: one room space shared by every allocator replica.
//!
//! # Keys (under `--etcd-prefix`, default `/room-allocator/`)
//! - `v1/high_water`: decimal u64, the end of the highest reserved range.
//! - `v1/ranges/{start:020}`: JSON `{"end", "dp_size", "prefill_worker",
//!   "created_unix_ms"}`; zero-padded so keys sort by start. Attached to an
//!   etcd lease, so etcd itself deletes it after the retention period.
//! - `v1/chunks/{start:020}`: JSON `{"end"}`, a chunk of the space a
//!   replica took (see below); on a range lease.
//! - `v1/workers/{prefill_worker}`: JSON `{"dp_size", "registered"}`. A
//!   deregistered worker's key is attached to a lease too, outliving its
//!   ranges; then it is forgotten.
//! - `v1/issued/{prefill_worker}`: decimal u64, `rooms_issued` persisted by
//!   replicas as they shut down (deleted when the worker is deregistered).
//! - `v1/config/retention_ms`: decimal u64, the fleet's retention: written by
//!   the first replica, honoured by every later one (`room-allocator
//!   retention` changes it).
//! - `v1/pruned_below`: decimal u64, written by 0.1 replicas, which pruned by
//!   their own clocks; read for ResolveRank's answers only.
//! - `v1/ranges_leased`: present once no range record lacks a lease (0.1
//!   wrote them without one): put with a new space's mark, or after one
//!   replica's sweep leased them all (see [`lease`]).
//!
//! A replica loads every key at start but the range records, which grow
//! with the fleet's history: it reads them on demand (see [`snapshot`] and
//! [`lookup`]).
//!
//! # Reserving ranges
//! Each replica takes a **chunk** of the space with one compare-and-swap:
//! if `high_water` still has the mod revision and the value this replica
//! last saw, and no range lies at or above it, put `high_water = end` and
//! announce the chunk in `v1/chunks/{start:020}` (JSON `{"end"}`, on a range
//! lease). etcd transactions are linearizable, so two replicas never both
//! move the mark from the same value: chunks never overlap, and the mark
//! only rises. A mark read lower than this replica saw, or below the end of
//! the highest chunk or of a range above it, was deleted or rewritten by
//! hand: the replica refuses to reserve (and to start). Ranges are
//! carved from the replica's own chunk, in memory, for at most
//! [`CHUNK_LIFETIME`](reserve::CHUNK_LIFETIME) and under the lease the chunk was announced with (so
//! no range outlives its chunk's announcement); chunks start at [`MIN_CHUNK_NUMBERS`](reserve::MIN_CHUNK_NUMBERS) and double
//! while used up sooner. Concurrent reservations are folded into one
//! transaction (at most [`MAX_BATCH`]) that records their ranges if every
//! worker's key still has the revision of the registration being served;
//! reservations whose worker changed get `StaleRegistration` (the allocator
//! follows the change), the rest are carved again. A transaction whose
//! outcome is unknown (timeout, lost connection) is never used: its chunk or
//! its ranges are skipped, so at worst numbers are reserved and never used.
//!
//! # Retention, by etcd's clock
//! Range records are put with a lease of TTL `2 * retention + bucket`, where
//! one lease serves every range reserved within `bucket` (retention / 8,
//! between 1 s and 1 h). etcd deletes the records when the lease expires,
//! timed by the etcd leader's monotonic clock (a leader change only extends
//! leases), so no replica's wall clock decides what is pruned. A replica
//! serves rooms from a range for at most `retention` after reserving it
//! (timed by its own monotonic clock), so every room resolves for at least
//! `retention`. The retention itself is one fleet-wide setting in etcd, at
//! most [`MAX_RETENTION`] (50000 days), so the lease TTL stays within etcd's
//! maximum (9,000,000,000 s): a longer one is refused where it is set.
//!
//! A deregistered worker's key gets a lease of its own that outlives every
//! range of the worker: at least the range TTL of this replica's retention
//! and of the fleet's as etcd holds it then, and at least the remaining TTL
//! of every lease the worker's ranges have (another replica may have
//! reserved them under a longer retention, before it was changed).
//!
//! # Registrations
//! Each replica watches `v1/workers/` and, every [`PROGRESS_INTERVAL`], asks
//! the watch for a progress notification: etcd answers once the watch has
//! delivered every change up to the current revision, which confirms the
//! replica's view. A broken watch is reopened from the last revision seen (all
//! registrations are reread if etcd compacted it). A replica that has not
//! confirmed its view for `--etcd-staleness-secs` (default 10 s) stops handing
//! out rooms (UNAVAILABLE), so no replica keeps issuing rooms aligned to a
//! dp_size that was changed elsewhere for longer than that window.
//! Reservations also compare the registration's revision, so a new range is
//! never reserved for an outdated dp_size.
//!
//! A progress notification alone proves little: a member cut off from its
//! cluster answers it from its own, stale revision. So the watch requires a
//! leader (`hasleader`: such a member cancels it), and each confirmation
//! starts with a linearizable read (a quorum read, which a member without a
//! leader cannot answer); the progress request goes once it answers, and
//! the notification's revision must reach the read's: the view is then
//! confirmed as of when the read was sent. Confirming never moves the
//! revision a broken watch resumes from; only applied events do (see
//! [`watch`]).
//!
//! # etcd versions
//! etcd 3.4 or later (3.4, 3.5, 3.6): progress requests came with 3.4; an
//! older etcd is refused at start, and the version is logged. etcd before
//! 3.4.25 and 3.5.8 (Debian's 3.4.23) may send a progress notification ahead
//! of a new watch's catch-up events; the resume rule above makes that
//! harmless for the resume point, and a watch created at or past the
//! revision it starts from confirms nothing until a linearizable read of
//! the registrations modified since that start is applied (see [`watch`]),
//! so it is harmless for confirmation too, on every version.
//!
//! # Modules
//! One concept each; the decisions that keep rooms unique are pure and
//! apart from the I/O that drives them (the model check runs them too):
//! - [`keys`]: the key layout and the codec of every value (fuzz targets).
//! - [`carver`] (pure): chunks, carving ranges, the mark checks;
//!   [`reserve`]: the reservations' I/O that drives it.
//! - [`watch`] (pure): what a registration watch proves; [`sync`] (pure):
//!   registration sync's decisions; [`registration`]: its stream driver.
//! - [`lease`]: bucket leases, TTLs, deregistration leases;
//!   [`retention`]: the fleet's retention setting.
//! - [`snapshot`]: start-up (load, create the mark and the store id);
//!   [`migrate`]: importing an embedded store; [`lookup`]: ResolveRank's
//!   look-ups in etcd, in windows that do not grow with the number of range
//!   records, at most [`MAX_LOOKUPS_PER_SEC`](lookup::MAX_LOOKUPS_PER_SEC)
//!   a second; [`negative_cache`]: ResolveRank's final misses;
//!   [`calls`]: bounded calls and connecting;
//!   [`client`]: the etcd client.

mod calls;
// The decisions, pure, in the core crate (where the model checker drives
// them too).
pub(crate) use room_allocator_core::etcd::{carver, deregistration, watch};
pub mod client;
mod keys;
mod lease;
mod lookup;
mod migrate;
mod negative_cache;
mod registration;
mod reserve;
mod retention;
mod snapshot;
mod sync;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tracing::info;

use self::calls::{get, revision_of, timed};
use self::client::{pb, txn, ConnectOptions, EtcdClient, EtcdError};
use self::keys::worker_record;
pub(crate) use self::keys::{counter_guard, encode_worker, Keys};
use self::lease::{
    bucket_for, lease_ttl_secs, longest_range_lease_secs, sweep_unleased, BucketLease, LongestLease,
};
pub use self::migrate::{check_import, import, ImportReport};
use self::negative_cache::NegativeCache;
use self::registration::RegistrationSync;
use self::reserve::{run_reservations, PendingReservation};
use self::retention::{fleet_retention, fleet_retention_now};
pub use self::retention::{retention, MAX_RETENTION};
use self::snapshot::{connect_and_load, create_high_water, read_or_create_store_id, Load, Loaded};
use super::{
    Health, IssuedCount, OpenError, PruneRequest, Pruned, Reservation, SharedStore, Snapshot,
    Store, StoreError, StoreFuture, StoreUpdate, WorkerRecord,
};
use crate::failpoint;
use crate::lifecycle::Lifecycle;
use crate::space::{Bounds, DpSize, RangeOwner, Room, RoomRange};

/// The decoders the fuzz targets drive (`crate::fuzz`).
#[cfg(test)]
pub(crate) use self::keys::{
    decode_range, decode_worker, encode_range, parse_decimal, parse_entry, Entry,
};

/// How often a replica asks its watch to confirm it is caught up.
pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);
/// Compare-and-swap attempts on a counter (rooms_issued) before giving up;
/// each failure means another replica wrote it meanwhile.
const MAX_CAS_ATTEMPTS: usize = 32;
/// Reservations folded into one transaction: each takes a compare and a put,
/// and etcd allows 128 operations per transaction branch by default.
const MAX_BATCH: usize = 60;
/// Keys per page when reading a whole prefix: far below gRPC's 4 MiB.
const PAGE_KEYS: i64 = 5000;

/// How to reach etcd, and the settings replicas share through it.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    pub prefix: String,
    pub username: Option<String>,
    pub password: Option<crate::secret::Secret>,
    /// Holds the password instead of `password`; reread at each authentication.
    pub password_file: Option<PathBuf>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Bound on every etcd call; past it a call fails with UNAVAILABLE.
    pub timeout: Duration,
    /// Longest a replica serves rooms without confirming the registrations.
    pub staleness: Duration,
    /// `--retention`: written to etcd by the first replica of a prefix.
    pub retention: Duration,
    /// The part of the space this deployment hands out.
    pub bounds: Bounds,
}

impl EtcdConfig {
    /// Reads the TLS files and builds the client's options.
    pub fn connect_options(&self) -> Result<ConnectOptions, OpenError> {
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|cause| OpenError::Io {
                path: path.clone(),
                cause,
            })
        };
        let identity_pem = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => Some((read(cert)?, read(key)?)),
            _ => None,
        };
        // A password file must be readable at start; later a bad one only
        // keeps the last password read.
        let password = match &self.password_file {
            Some(path) => Some(client::read_password(path).map_err(|cause| OpenError::Io {
                path: path.clone(),
                cause,
            })?),
            None => self.password.clone(),
        };
        Ok(ConnectOptions {
            endpoints: self.endpoints.clone(),
            user: self.username.clone().zip(password),
            password_file: self.password_file.clone(),
            ca_pem: self.ca.as_ref().map(read).transpose()?,
            identity_pem,
            timeout: self.timeout,
            tls_files: (self.ca.is_some() || self.cert.is_some()).then(|| client::TlsFiles {
                ca: self.ca.clone(),
                cert: self.cert.clone(),
                key: self.key.clone(),
            }),
        })
    }
}

/// What the store's tasks share with it.
struct Shared {
    client: EtcdClient,
    keys: Keys,
    timeout: Duration,
    bounds: Bounds,
    retention: Duration,
    bucket: Duration,
    lease: tokio::sync::Mutex<Option<BucketLease>>,
    /// `high_water` as last seen (a lower bound of etcd's).
    high_water: AtomicU64,
    /// No chunk alive now or taken later starts below this (see
    /// [`lookup`]): rooms below it lie in no chunk.
    chunk_floor: AtomicU64,
    /// No range or chunk alive now or reserved later holds a room below
    /// this (see [`lookup`]): a room below it is a final miss, unread.
    record_floor: AtomicU64,
    /// When the registrations were last confirmed, in ms since `epoch`.
    confirmed_ms: AtomicU64,
    epoch: Instant,
    reachable: AtomicBool,
}

impl Shared {
    async fn timed<T>(
        &self,
        operation: &'static str,
        call: impl std::future::Future<Output = Result<T, EtcdError>>,
    ) -> Result<T, StoreError> {
        timed(self.timeout, operation, call).await
    }

    fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// The etcd store handle.
pub struct EtcdStore {
    shared: Arc<Shared>,
    staleness: Duration,
    reservations: mpsc::UnboundedSender<PendingReservation>,
    updates: Mutex<Option<mpsc::UnboundedReceiver<StoreUpdate>>>,
    misses: Mutex<NegativeCache>,
    /// Look-ups left this second (see [`lookup`]).
    lookup_budget: Mutex<lookup::Budget>,
    /// ResolveRank says "pruned" for rooms below this (0.1's marker).
    legacy_pruned_below: u64,
    /// Owns the store's tasks (the registration watch, the reservation
    /// batcher, the leasing of old range records); `close` ends them.
    lifecycle: Lifecycle,
    /// `v1/store_id`: one id for every replica of the prefix.
    store_id: String,
}

impl EtcdStore {
    /// How long ago the watch last confirmed the registrations.
    fn confirmed_ago(&self) -> Duration {
        let confirmed = Duration::from_millis(self.shared.confirmed_ms.load(Ordering::Acquire));
        self.shared.epoch.elapsed().saturating_sub(confirmed)
    }

    /// Connects, settles the fleet's retention, loads the prefix but its
    /// range records (see [`snapshot`]), and starts following
    /// registrations. Refuses to start if etcd cannot be reached in time or
    /// holds data this binary cannot trust among what it loads, or a mark
    /// below a chunk or range.
    /// Its tasks are spawned through `lifecycle`.
    pub async fn open(
        config: &EtcdConfig,
        lifecycle: &Lifecycle,
    ) -> Result<(Self, Snapshot), OpenError> {
        let Loaded {
            client,
            keys,
            mut snapshot,
            high_water,
            revision,
            chunks,
            ranges_leased,
            keys_loaded,
        } = connect_and_load(config, Load::Serving).await?;
        // Chunks taken from now on start at the mark, at or above it.
        let chunk_floor = chunks
            .iter()
            .map(|chunk| chunk.start)
            .min()
            .unwrap_or(u64::MAX)
            .min(snapshot.high_water);
        super::check_bounds(snapshot.high_water, config.bounds)?;
        let retention = fleet_retention(&client, &keys, config).await?;
        snapshot.retention = retention;
        // A new space is created with `v1/ranges_leased`.
        let sweep = !ranges_leased && high_water.is_some();
        if high_water.is_none() {
            create_high_water(config, &client, &keys).await?;
        }
        let store_id = read_or_create_store_id(config, &client, &keys).await?;
        info!(
            endpoints = %config.endpoints.join(","),
            prefix = %keys.root,
            store_id = %store_id,
            keys_loaded,
            workers = snapshot.workers.len(),
            high_water = snapshot.high_water,
            retention_secs = retention.as_secs_f64(),
            "opened the etcd store"
        );
        let shared = Arc::new(Shared {
            client,
            keys,
            timeout: config.timeout,
            bounds: config.bounds,
            retention,
            bucket: bucket_for(retention),
            lease: tokio::sync::Mutex::new(None),
            high_water: AtomicU64::new(snapshot.high_water),
            chunk_floor: AtomicU64::new(chunk_floor),
            record_floor: AtomicU64::new(0),
            confirmed_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            reachable: AtomicBool::new(true),
        });
        let (updates_tx, updates_rx) = mpsc::unbounded_channel();
        let known = snapshot
            .workers
            .iter()
            .map(|w| w.prefill_worker.clone())
            .collect();
        let sync = RegistrationSync::new(shared.clone(), updates_tx, known, revision);
        let (reservations, queue) = mpsc::unbounded_channel();
        // The batcher ends between batches (a batch in flight gets its
        // answer). The watch only reads, so it is dropped where it waits;
        // so is the leasing of old range records: each is a compare-and-put
        // of its own, harmless whether or not it committed (those left are
        // leased at the next start).
        lifecycle.spawn_until_cancelled(sync.run());
        lifecycle.spawn(run_reservations(
            shared.clone(),
            queue,
            high_water,
            lifecycle.token().clone(),
        ));
        if sweep {
            lifecycle.spawn_until_cancelled(sweep_unleased(shared.clone()));
        }
        let store = Self {
            shared,
            staleness: config.staleness,
            reservations,
            updates: Mutex::new(Some(updates_rx)),
            misses: Mutex::new(NegativeCache::default()),
            lookup_budget: Mutex::new(lookup::Budget::new(0, lookup::lookups_per_sec())),
            legacy_pruned_below: snapshot.pruned_below,
            lifecycle: lifecycle.clone(),
            store_id,
        };
        Ok((store, snapshot))
    }

    async fn register_worker(&self, worker: Arc<str>, dp_size: DpSize) -> Result<i64, StoreError> {
        let key = self.shared.keys.worker(&worker);
        let value = encode_worker(dp_size, true);
        // Written only if it differs from what etcd holds (not from what this
        // replica believes: another replica may have realigned the worker).
        let request = pb::TxnRequest {
            compare: vec![txn::value_is(&key, &value)],
            success: vec![txn::get(&key)],
            failure: vec![txn::put(&key, value.clone(), 0), txn::get(&key)],
        };
        failpoint!(
            "etcd::register_send",
            StoreError::Injected("etcd::register_send")
        );
        let response = self
            .shared
            .timed("write the registration", self.shared.client.txn(request))
            .await?;
        failpoint!("etcd::registered", StoreError::Injected("etcd::registered"));
        revision_of(&response, &key)
    }

    async fn deregister_worker(
        &self,
        worker: Arc<str>,
        dp_size: DpSize,
    ) -> Result<i64, StoreError> {
        let shared = &self.shared;
        let key = shared.keys.worker(&worker);
        let value = encode_worker(dp_size, false);
        // The record outlives every range of the worker: those reserved
        // under this replica's retention or the fleet's (read now), and
        // those whose leases a replica granted under a longer retention
        // since changed. A worker deregistered already is written again
        // the same way (the allocator calls this for a retry on a shared
        // store), so a retry repairs what a failed or interrupted second
        // look left.
        let fleet = fleet_retention_now(shared).await?;
        let retention = shared.retention.max(fleet);
        let LongestLease {
            ttl_secs: longest,
            read_at,
        } = longest_range_lease_secs(shared, &worker, 0).await?;
        // etcd rounds a remaining TTL down: a second more covers the rest.
        let ttl = lease_ttl_secs(retention, bucket_for(retention)).max(longest + 1);
        // Before the grant is sent: what is left of the lease at the second
        // look is then never overestimated.
        let granting = Instant::now();
        let lease = shared
            .timed(
                "grant the deregistration's lease",
                shared.client.lease_grant(ttl),
            )
            .await?
            .id;
        let request = pb::TxnRequest {
            compare: Vec::new(),
            success: vec![
                txn::put(&key, value.clone(), lease),
                txn::delete(&shared.keys.issued(&worker)),
                txn::get(&key),
            ],
            failure: Vec::new(),
        };
        failpoint!(
            "etcd::deregister_send",
            StoreError::Injected("etcd::deregister_send")
        );
        let response = shared
            .timed("write the deregistration", shared.client.txn(request))
            .await?;
        failpoint!(
            "etcd::deregistered",
            StoreError::Injected("etcd::deregistered")
        );
        let mut revision = revision_of(&response, &key)?;
        // A range reserved for it between that read and the write (none
        // after: reservations compare the registration's revision) may
        // outlive what is left of the record's lease (not the TTL granted:
        // the range's bucket lease may have been granted after it): then
        // the record gets one to match.
        let late = longest_range_lease_secs(shared, &worker, read_at)
            .await?
            .ttl_secs;
        let elapsed = granting.elapsed();
        let elapsed_secs = elapsed.as_secs() + u64::from(elapsed.subsec_nanos() > 0);
        let extension = deregistration::extension_secs(
            u64::try_from(ttl).unwrap_or(0),
            elapsed_secs,
            u64::try_from(late).unwrap_or(0),
        );
        if let Some(extension) = extension {
            // Below i64::MAX: one more than a TTL etcd reported.
            let extension = i64::try_from(extension).unwrap_or(i64::MAX);
            let lease = shared
                .timed(
                    "grant the deregistration's lease",
                    shared.client.lease_grant(extension),
                )
                .await?
                .id;
            // Unless the worker registered again meanwhile.
            let request = pb::TxnRequest {
                compare: vec![txn::unchanged_since(&key, revision)],
                success: vec![txn::put(&key, value, lease), txn::get(&key)],
                failure: Vec::new(),
            };
            let response = shared
                .timed("extend the deregistration", shared.client.txn(request))
                .await?;
            if response.succeeded {
                revision = revision_of(&response, &key)?;
            }
        }
        Ok(revision)
    }

    /// Adds each worker's rooms issued since open to its counter, a batch
    /// of workers per transaction (read, then compare-and-put all; a batch
    /// another replica raced is read again), so a shutdown with 100,000
    /// workers takes seconds, not minutes.
    async fn add_issued(&self, counts: Vec<IssuedCount>) -> Result<(), StoreError> {
        let counts: Vec<IssuedCount> = counts.into_iter().filter(|c| c.since_open > 0).collect();
        for batch in counts.chunks(MAX_BATCH) {
            let keys: Vec<String> = batch
                .iter()
                .map(|c| self.shared.keys.issued(&c.prefill_worker))
                .collect();
            let mut written = false;
            for _ in 0..MAX_CAS_ATTEMPTS {
                let read = pb::TxnRequest {
                    compare: Vec::new(),
                    success: keys.iter().map(|key| txn::get(key)).collect(),
                    failure: Vec::new(),
                };
                let current = self
                    .shared
                    .timed("read rooms_issued", self.shared.client.txn(read))
                    .await?;
                let reads = txn::ranges(&current);
                let mut compare = Vec::with_capacity(batch.len());
                let mut success = Vec::with_capacity(batch.len());
                for (i, (count, key)) in batch.iter().zip(&keys).enumerate() {
                    let kv = reads.get(i).and_then(|r| r.kvs.first());
                    let (old, guard) =
                        counter_guard(kv, key).ok_or_else(|| StoreError::Corrupt {
                            key: key.clone(),
                            reason: "not a decimal number".into(),
                        })?;
                    compare.push(guard);
                    success.push(txn::put(
                        key,
                        old.saturating_add(count.since_open).to_string(),
                        0,
                    ));
                }
                let request = pb::TxnRequest {
                    compare,
                    success,
                    failure: Vec::new(),
                };
                let response = self
                    .shared
                    .timed("write rooms_issued", self.shared.client.txn(request))
                    .await?;
                failpoint!(
                    "etcd::issued_written",
                    StoreError::Injected("etcd::issued_written")
                );
                if response.succeeded {
                    written = true;
                    break;
                }
            }
            if !written {
                return Err(StoreError::Contention {
                    attempts: MAX_CAS_ATTEMPTS,
                });
            }
        }
        Ok(())
    }

    /// True if no range or chunk holds `room`, now or later (see
    /// [`lookup`]): it lies below one a look-up proved to lie below them all.
    fn below_every_record(&self, room: Room) -> bool {
        room.get() < self.shared.record_floor.load(Ordering::Acquire)
    }

    /// The range that holds `room`, from etcd (see [`lookup`]); a final miss
    /// is remembered, so asking again costs etcd nothing.
    async fn find_range(&self, room: Room) -> Result<Option<RangeOwner>, StoreError> {
        if self.below_every_record(room) {
            // No read, and nothing cached: `missing_is_pruned` says so too.
            return Ok(None);
        }
        let (allowed, per_sec) = {
            let mut budget = self
                .lookup_budget
                .lock()
                .expect("look-up budget lock is never poisoned");
            (budget.take(self.shared.elapsed_ms()), budget.per_sec())
        };
        if !allowed {
            return Err(StoreError::LookupsThrottled { per_sec });
        }
        let found = self.shared.look_up(room.get()).await?;
        if let Some(below_oldest) = found.final_miss {
            self.misses
                .lock()
                .expect("negative cache lock is never poisoned")
                .insert(room.get(), below_oldest);
        }
        Ok(found.owner)
    }
}

impl Store for EtcdStore {
    fn kind(&self) -> &'static str {
        "etcd"
    }

    fn store_id(&self) -> Option<String> {
        Some(self.store_id.clone())
    }

    fn shared(&self) -> Option<&dyn SharedStore> {
        Some(self)
    }

    fn register(&self, prefill_worker: Arc<str>, dp_size: DpSize) -> StoreFuture<'_, i64> {
        Box::pin(self.register_worker(prefill_worker, dp_size))
    }

    fn deregister(&self, prefill_worker: Arc<str>, dp_size: DpSize) -> StoreFuture<'_, i64> {
        Box::pin(self.deregister_worker(prefill_worker, dp_size))
    }

    fn reserve(&self, reservation: Reservation) -> StoreFuture<'_, RoomRange> {
        let (reply, answer) = oneshot::channel();
        let queued = self
            .reservations
            .send(PendingReservation { reservation, reply })
            .is_ok();
        Box::pin(async move {
            if !queued {
                return Err(StoreError::Closed);
            }
            answer.await.map_err(|_| StoreError::Closed)?
        })
    }

    fn record_issued(&self, counts: Vec<IssuedCount>) -> StoreFuture<'_, ()> {
        Box::pin(self.add_issued(counts))
    }

    fn prune(&self, _request: PruneRequest) -> StoreFuture<'_, Pruned> {
        // etcd expires ranges by lease, by its own clock.
        let pruned_below = self.legacy_pruned_below;
        Box::pin(async move {
            Ok(Pruned {
                pruned_below,
                ..Pruned::default()
            })
        })
    }

    fn health(&self) -> Health {
        Health {
            ready: self.check_fresh(),
            reachable: self.shared.reachable.load(Ordering::Acquire),
            confirmed_ago: Some(self.confirmed_ago()),
        }
    }

    fn high_water(&self) -> u64 {
        self.shared.high_water.load(Ordering::Acquire)
    }

    fn close(&self) -> StoreFuture<'_, ()> {
        // The server ended the tasks already; this makes sure for any other
        // caller.
        Box::pin(async {
            self.lifecycle.shutdown().await;
            Ok(())
        })
    }
}

impl SharedStore for EtcdStore {
    fn lookup_worker(&self, prefill_worker: &str) -> StoreFuture<'_, Option<WorkerRecord>> {
        let key = self.shared.keys.worker(prefill_worker);
        let name: Arc<str> = Arc::from(prefill_worker);
        Box::pin(async move {
            let response = self
                .shared
                .timed("read a registration", self.shared.client.range(get(&key)))
                .await?;
            Ok(response.kvs.first().and_then(|kv| worker_record(name, kv)))
        })
    }

    fn lookup(&self, room: Room) -> StoreFuture<'_, Option<RangeOwner>> {
        Box::pin(async move {
            let cached = self
                .misses
                .lock()
                .expect("negative cache lock is never poisoned")
                .get(room.get());
            if cached.is_some() {
                return Ok(None);
            }
            self.find_range(room).await
        })
    }

    fn missing_is_pruned(&self, room: Room) -> bool {
        room.get() < self.legacy_pruned_below
            || self.below_every_record(room)
            || self
                .misses
                .lock()
                .expect("negative cache lock is never poisoned")
                .get(room.get())
                .unwrap_or(false)
    }

    fn take_updates(&self) -> Option<mpsc::UnboundedReceiver<StoreUpdate>> {
        self.updates
            .lock()
            .expect("updates lock is never poisoned")
            .take()
    }

    fn check_fresh(&self) -> Result<(), StoreError> {
        let age = self.confirmed_ago();
        if age > self.staleness {
            return Err(StoreError::Stale {
                age,
                window: self.staleness,
            });
        }
        Ok(())
    }
}
