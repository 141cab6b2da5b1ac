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
//! [`CHUNK_LIFETIME`] and under the lease the chunk was announced with (so
//! no range outlives its chunk's announcement); chunks start at [`MIN_CHUNK_NUMBERS`] and double
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

pub(crate) mod carver;
pub mod client;
pub(crate) mod watch;

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use self::carver::{
    check_mark, record_verdicts, Carver, CarverConfig, ChunkOutcome, ChunkReply, ChunkRequest,
    Mark, MarkRead, Need, RecordVerdict, Step,
};
use self::client::{pb, prefix_end, txn, ConnectOptions, EtcdClient, EtcdError};
use self::watch::WatchProgress;
use super::{
    IssuedCount, OpenError, PruneRequest, Pruned, Reservation, Snapshot, Store, StoreError,
    StoreFuture, StoreUpdate, WorkerRecord,
};
use crate::failpoint;
use crate::space::{Bounds, DpSize, RangeOwner, RangeTable, Room, RoomRange, SPACE_START};

/// How often a replica asks its watch to confirm it is caught up.
pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);
/// Compare-and-swap attempts on a counter (rooms_issued) before giving up;
/// each failure means another replica wrote it meanwhile.
const MAX_CAS_ATTEMPTS: usize = 32;
/// Longest pause before retrying a reservation another replica beat; a
/// random pause up to this (growing with the attempts) keeps the replicas
/// of a registration storm from colliding round after round.
const MAX_CAS_BACKOFF: Duration = Duration::from_millis(20);
/// Largest chunk of the space a replica takes at once (see [`carver::Chunk`]).
const MAX_CHUNK_NUMBERS: u64 = 1 << 32;
/// A replica's first chunk; chunks double while used up before they expire
/// and halve while they expire less than half used, so an idle or restarted
/// replica skips little of a small --max-room space.
const MIN_CHUNK_NUMBERS: u64 = 1 << 16;
/// A replica carves from a chunk for at most this long (and at most the
/// retention, so the chunk's announcement, on a lease of twice that, outlives
/// the carving), then takes a new one; ResolveRank treats rooms of announced
/// chunks as possibly still to come.
const CHUNK_LIFETIME: Duration = Duration::from_secs(60);
/// Reservations folded into one transaction: each takes a compare and a put,
/// and etcd allows 128 operations per transaction branch by default.
const MAX_BATCH: usize = 60;
/// Keys per page when reading a whole prefix: far below gRPC's 4 MiB.
const PAGE_KEYS: i64 = 5000;
/// Rooms remembered as not in any range, so repeated misses skip etcd.
const NEGATIVE_CACHE: usize = 65_536;
/// etcd's longest lease TTL (`MaxLeaseTTL` in etcd's lessor): a grant above
/// it fails ("too large lease TTL").
const MAX_LEASE_TTL_SECS: u64 = 9_000_000_000;
/// The longest retention, as `--retention` and `retention --set` spell it.
const MAX_RETENTION_FLAG: &str = "50000d";
/// The longest retention: a range's lease TTL, `2 * retention + bucket` (the
/// bucket at most an hour), must fit etcd's [`MAX_LEASE_TTL_SECS`].
pub const MAX_RETENTION: Duration = Duration::from_secs(50_000 * 86_400);
const _: () = assert!(2 * MAX_RETENTION.as_secs() + 3600 <= MAX_LEASE_TTL_SECS);
/// The oldest etcd (major, minor) that answers watch progress requests.
const MIN_ETCD_VERSION: (u32, u32) = (3, 4);

/// How to reach etcd, and the settings replicas share through it.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    pub prefix: String,
    pub username: Option<String>,
    pub password: Option<crate::secret::Secret>,
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
        Ok(ConnectOptions {
            endpoints: self.endpoints.clone(),
            user: self.username.clone().zip(self.password.clone()),
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

/// Key names under the configured prefix.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    root: String,
}

impl Keys {
    pub(crate) fn new(prefix: &str) -> Self {
        let mut root = prefix.to_owned();
        if !root.ends_with('/') {
            root.push('/');
        }
        root.push_str("v1/");
        Self { root }
    }

    fn high_water(&self) -> String {
        format!("{}high_water", self.root)
    }

    fn ranges(&self) -> String {
        format!("{}ranges/", self.root)
    }

    fn range(&self, start: u64) -> String {
        format!("{}ranges/{start:020}", self.root)
    }

    fn workers(&self) -> String {
        format!("{}workers/", self.root)
    }

    fn worker(&self, name: &str) -> String {
        format!("{}workers/{name}", self.root)
    }

    fn issued(&self, name: &str) -> String {
        format!("{}issued/{name}", self.root)
    }

    fn retention(&self) -> String {
        format!("{}config/retention_ms", self.root)
    }

    fn chunks(&self) -> String {
        format!("{}chunks/", self.root)
    }

    fn chunk(&self, start: u64) -> String {
        format!("{}chunks/{start:020}", self.root)
    }

    /// Where the chunk or range a key announces ends; a key that cannot be
    /// read refuses (damage never lets a reservation through).
    fn announced_end(&self, kv: &pb::KeyValue) -> Result<u64, StoreError> {
        match parse_entry(self, kv) {
            Ok(Entry::Chunk { end, .. }) => Ok(end),
            Ok(Entry::Range(owner)) => Ok(owner.range.end()),
            Ok(_) => Ok(0),
            Err(reason) => Err(StoreError::Corrupt {
                key: String::from_utf8_lossy(&kv.key).into_owned(),
                reason,
            }),
        }
    }
}

/// Where the used space ends, for [`Shared::seen_mark`]: the mark and the
/// highest chunk. Chunk keys are few (one per chunk taken within twice the
/// retention), so sorting them costs etcd little; range keys are many, and
/// are checked by the chunk compare-and-swap instead (see [`take_chunk`]).
fn mark_reads(keys: &Keys) -> Vec<pb::RequestOp> {
    let chunks = keys.chunks();
    vec![
        txn::get(&keys.high_water()),
        txn::last_in(chunks.as_bytes().to_vec(), prefix_end(chunks.as_bytes())),
    ]
}

/// The mark as written: a decimal with no leading zero, exactly as a
/// replica writes it (the chunk compare-and-swap compares its bytes).
fn parse_mark(value: &[u8]) -> Option<u64> {
    parse_decimal(value).filter(|mark| mark.to_string().as_bytes() == value)
}

/// A chunk announcement's start and end, if the key is a canonical chunk
/// start and the end lies above it. A fuzz target through `parse_entry`.
fn decode_chunk(key_start: &str, value: &[u8]) -> Option<(u64, u64)> {
    let start = parse_decimal(key_start.as_bytes())?;
    if key_start != format!("{start:020}") {
        return None;
    }
    chunk_end(value)
        .filter(|end| *end > start)
        .map(|end| (start, end))
}

/// The end a chunk announcement holds; `None` if it is unreadable.
fn chunk_end(value: &[u8]) -> Option<u64> {
    serde_json::from_slice::<serde_json::Value>(value)
        .ok()?
        .get("end")?
        .as_u64()
}

/// The registration a worker key holds; its exact bytes are compared when a
/// replica registers, so it is always encoded the same way.
pub(crate) fn encode_worker(dp_size: DpSize, registered: bool) -> String {
    json!({ "dp_size": dp_size.get(), "registered": registered }).to_string()
}

/// A fuzz target: never panics; accepts only a valid dp_size and a flag.
pub(crate) fn decode_worker(value: &[u8]) -> Option<(DpSize, bool)> {
    let value: serde_json::Value = serde_json::from_slice(value).ok()?;
    let dp_size = u32::try_from(value["dp_size"].as_u64()?).ok()?;
    let registered = value["registered"].as_bool()?;
    Some((DpSize::try_new(dp_size).ok()?, registered))
}

/// A range record's value; its start is in the key.
pub(crate) fn encode_range(owner: &RangeOwner) -> String {
    json!({
        "end": owner.range.end(),
        "dp_size": owner.range.dp_size().get(),
        "prefill_worker": &*owner.prefill_worker,
        "created_unix_ms": owner.created_unix_ms,
    })
    .to_string()
}

/// A fuzz target: never panics; accepts only an aligned range inside the
/// space, owned by a valid worker name, whose key is its canonical start.
pub(crate) fn decode_range(key_start: &str, value: &[u8]) -> Option<RangeOwner> {
    let start: u64 = parse_decimal(key_start.as_bytes())?;
    if key_start != format!("{start:020}") {
        return None;
    }
    let value: serde_json::Value = serde_json::from_slice(value).ok()?;
    let end = value["end"].as_u64()?;
    let dp_size = DpSize::try_new(u32::try_from(value["dp_size"].as_u64()?).ok()?).ok()?;
    let worker = value["prefill_worker"].as_str()?;
    crate::allocator::validate_worker(worker).ok()?;
    Some(RangeOwner {
        prefill_worker: Arc::from(worker),
        range: RoomRange::from_parts(start, end, dp_size)?,
        created_unix_ms: value["created_unix_ms"].as_u64()?,
    })
}

/// A decimal u64 with nothing else around it (no sign, no spaces).
pub(crate) fn parse_decimal(value: &[u8]) -> Option<u64> {
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// The registration a worker key holds, as the allocator applies it.
fn worker_record(prefill_worker: Arc<str>, kv: &pb::KeyValue) -> Option<WorkerRecord> {
    let (dp_size, registered) = decode_worker(&kv.value)?;
    Some(WorkerRecord {
        prefill_worker,
        dp_size,
        registered,
        rooms_issued: 0,
        revision: kv.mod_revision,
    })
}

fn etcd_error(operation: &'static str, error: EtcdError) -> StoreError {
    StoreError::Etcd {
        operation,
        message: error.to_string(),
    }
}

/// Runs an etcd call within `timeout`.
async fn timed<T>(
    timeout: Duration,
    operation: &'static str,
    call: impl std::future::Future<Output = Result<T, EtcdError>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(timeout, call).await {
        Ok(result) => result.map_err(|error| etcd_error(operation, error)),
        Err(_) => Err(StoreError::Timeout {
            operation,
            after: timeout,
        }),
    }
}

/// The lease ranges reserved now are attached to.
#[derive(Debug, Clone, Copy)]
struct BucketLease {
    id: i64,
    granted_at: Instant,
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

    /// The lease for records put now: reused for `bucket`, then a new one.
    async fn bucket_lease(&self) -> Result<i64, StoreError> {
        let mut lease = self.lease.lock().await;
        if let Some(current) = *lease {
            if current.granted_at.elapsed() < self.bucket {
                return Ok(current.id);
            }
        }
        let granted_at = Instant::now();
        let granted = self
            .timed(
                "grant a lease",
                self.client
                    .lease_grant(lease_ttl_secs(self.retention, self.bucket)),
            )
            .await?;
        failpoint!(
            "etcd::lease_granted",
            StoreError::Injected("etcd::lease_granted")
        );
        *lease = Some(BucketLease {
            id: granted.id,
            granted_at,
        });
        Ok(granted.id)
    }

    /// The high-water mark as etcd holds it (from the reads of
    /// [`mark_reads`], and after a failed compare-and-swap the first range
    /// at or above the mark it compared), refused if it lies below what this
    /// replica saw or below the end of a chunk or range announced (the key
    /// was deleted or rewritten; a replica that never saw the higher value
    /// can tell only from those): reserving from there would reissue rooms.
    fn seen_mark(&self, reads: &[&pb::RangeResponse]) -> Result<Mark, StoreError> {
        let key = self.keys.high_water();
        let first_kv = |i: usize| reads.get(i).and_then(|read| read.kvs.first());
        let repair = "put back a mark at or above the end of every key under v1/chunks/ and v1/ranges/ (never lower: rooms below it were issued)";
        let Some(kv) = first_kv(0) else {
            return Err(StoreError::Corrupt {
                key,
                reason: format!(
                    "it is missing (every replica creates it at start, so it was deleted); {repair}"
                ),
            });
        };
        let mut highest_announced = 0;
        for kv in (1..reads.len()).filter_map(first_kv) {
            highest_announced = highest_announced.max(self.keys.announced_end(kv)?);
        }
        let read = MarkRead {
            mark: parse_high_water(kv, &key)?,
            highest_announced,
        };
        check_mark(read, self.high_water.load(Ordering::Acquire)).map_err(|went_back| {
            // Remembered, so later reads refuse here without sending a
            // swap whose compare would scan the ranges above the bad mark.
            self.high_water.fetch_max(went_back.used, Ordering::AcqRel);
            StoreError::Corrupt {
                key,
                reason: format!(
                    "it went back to {} below {}, the end of the space already reserved (it was deleted or rewritten); {repair}",
                    went_back.mark, went_back.used
                ),
            }
        })
    }

    /// Forgets a lease etcd no longer has (it expired while unused).
    async fn drop_lease(&self, id: i64) {
        let mut lease = self.lease.lock().await;
        if lease.is_some_and(|l| l.id == id) {
            *lease = None;
        }
    }

    fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// Lease TTL for ranges: twice the retention, plus the bucket a lease serves.
fn lease_ttl_secs(retention: Duration, bucket: Duration) -> i64 {
    let ttl = (retention * 2 + bucket).as_secs_f64().ceil();
    // Far below i64::MAX seconds: retention is parsed from a u64 of seconds.
    ttl.min(9.0e18) as i64
}

/// How long one lease serves reservations.
fn bucket_for(retention: Duration) -> Duration {
    (retention / 8).clamp(Duration::from_secs(1), Duration::from_secs(3600))
}

/// A reservation waiting for the next transaction.
struct PendingReservation {
    reservation: Reservation,
    reply: oneshot::Sender<Result<RoomRange, StoreError>>,
}

/// Rooms known to lie in no range, with whether they are older than every
/// live range; bounded, oldest entries go first.
#[derive(Default)]
struct NegativeCache {
    rooms: HashMap<u64, bool>,
    order: VecDeque<u64>,
}

impl NegativeCache {
    fn get(&self, room: u64) -> Option<bool> {
        self.rooms.get(&room).copied()
    }

    fn insert(&mut self, room: u64, below_oldest: bool) {
        if self.rooms.insert(room, below_oldest).is_none() {
            self.order.push_back(room);
            if self.order.len() > NEGATIVE_CACHE {
                if let Some(old) = self.order.pop_front() {
                    self.rooms.remove(&old);
                }
            }
        }
    }
}

/// The etcd store handle.
pub struct EtcdStore {
    shared: Arc<Shared>,
    staleness: Duration,
    reservations: mpsc::UnboundedSender<PendingReservation>,
    updates: Mutex<Option<mpsc::UnboundedReceiver<StoreUpdate>>>,
    misses: Mutex<NegativeCache>,
    /// ResolveRank says "pruned" for rooms below this (0.1's marker).
    legacy_pruned_below: u64,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// `v1/store_id`: one id for every replica of the prefix.
    store_id: String,
}

impl EtcdStore {
    /// Connects, settles the fleet's retention, loads everything under the
    /// prefix, and starts following registrations. Refuses to start if etcd
    /// cannot be reached in time or holds data this binary cannot trust.
    pub async fn open(config: &EtcdConfig) -> Result<(Self, Snapshot), OpenError> {
        let Loaded {
            client,
            keys,
            mut snapshot,
            high_water,
            revision,
            unleased,
            ..
        } = connect_and_load(config).await?;
        super::check_bounds(snapshot.high_water, config.bounds)?;
        let retention = fleet_retention(&client, &keys, config).await?;
        snapshot.retention = retention;
        if high_water.is_none() {
            create_high_water(config, &client, &keys).await?;
        }
        let store_id = read_or_create_store_id(config, &client, &keys).await?;
        info!(
            endpoints = %config.endpoints.join(","),
            prefix = %keys.root,
            store_id = %store_id,
            ranges = snapshot.ranges.len(),
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
        let sync = RegistrationSync {
            shared: shared.clone(),
            updates: updates_tx,
            known,
        };
        let (reservations, queue) = mpsc::unbounded_channel();
        let mut tasks = vec![
            tokio::spawn(sync.run(revision)),
            tokio::spawn(run_reservations(shared.clone(), queue, high_water)),
        ];
        if !unleased.is_empty() {
            tasks.push(tokio::spawn(lease_unleased(shared.clone(), unleased)));
        }
        let store = Self {
            shared,
            staleness: config.staleness,
            reservations,
            updates: Mutex::new(Some(updates_rx)),
            misses: Mutex::new(NegativeCache::default()),
            legacy_pruned_below: snapshot.pruned_below,
            tasks,
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
        // since changed. All in the one write: a caller retrying a failed
        // deregistration finds the worker deregistered and writes nothing.
        let fleet = fleet_retention_now(shared).await?;
        let retention = shared.retention.max(fleet);
        let (longest, read_at) = longest_range_lease_secs(shared, &worker, 0).await?;
        // etcd rounds a remaining TTL down: a second more covers the rest.
        let ttl = lease_ttl_secs(retention, bucket_for(retention)).max(longest + 1);
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
        // after: reservations compare the registration's revision) may have
        // a longer lease still: then the record gets one to match.
        let (late, _) = longest_range_lease_secs(shared, &worker, read_at).await?;
        if late + 1 > ttl {
            let lease = shared
                .timed(
                    "grant the deregistration's lease",
                    shared.client.lease_grant(late + 1),
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

    async fn find_range(&self, room: Room) -> Result<Option<RangeOwner>, StoreError> {
        let keys = &self.shared.keys;
        let ranges = keys.ranges();
        let at_or_below = |prefix_key: String, upto: String| {
            txn::last_in(prefix_key.into_bytes(), upto.into_bytes())
        };
        let after = room.get().saturating_add(1);
        // One snapshot: the range at or below the room, the lowest range
        // still kept, the high-water mark, and the chunk at or below it.
        let request = pb::TxnRequest {
            compare: Vec::new(),
            success: vec![
                at_or_below(keys.range(0), keys.range(after)),
                txn::get_range(pb::RangeRequest {
                    key: ranges.clone().into_bytes(),
                    range_end: prefix_end(ranges.as_bytes()),
                    limit: 1,
                    keys_only: true,
                    ..Default::default()
                }),
                txn::get(&keys.high_water()),
                at_or_below(keys.chunk(0), keys.chunk(after)),
            ],
            failure: Vec::new(),
        };
        let response = self
            .shared
            .timed("look up a range", self.shared.client.txn(request))
            .await?;
        let reads = txn::ranges(&response);
        let decode = |kv: &pb::KeyValue| {
            let key = std::str::from_utf8(&kv.key).ok()?;
            decode_range(key.strip_prefix(&ranges)?, &kv.value)
        };
        if let Some(owner) = reads
            .first()
            .and_then(|r| r.kvs.first())
            .and_then(decode)
            .filter(|owner| owner.range.contains(room))
        {
            return Ok(Some(owner));
        }
        let oldest = reads.get(1).and_then(|r| r.kvs.first()).and_then(|kv| {
            std::str::from_utf8(&kv.key)
                .ok()?
                .strip_prefix(&ranges)?
                .parse::<u64>()
                .ok()
        });
        let high_water = reads
            .get(2)
            .and_then(|r| r.kvs.first())
            .and_then(|kv| parse_decimal(&kv.value))
            .unwrap_or(SPACE_START);
        // A replica may still carve a range over the room from a live chunk.
        let in_a_chunk = reads
            .get(3)
            .and_then(|r| r.kvs.first())
            .is_some_and(|kv| chunk_end(&kv.value).is_none_or(|end| room.get() < end));
        if room.get() < high_water && !in_a_chunk {
            // Below the mark and outside every chunk a miss is final: ranges
            // are only carved from chunks, and chunks only above the mark.
            let below_oldest = oldest.is_none_or(|start| room.get() < start);
            self.misses
                .lock()
                .expect("negative cache lock is never poisoned")
                .insert(room.get(), below_oldest);
        }
        Ok(None)
    }
}

/// Writes the mark of a new space (unless a replica just did), so that a
/// missing mark is always a deleted one, never mistaken for an empty space.
async fn create_high_water(
    config: &EtcdConfig,
    client: &EtcdClient,
    keys: &Keys,
) -> Result<(), OpenError> {
    let key = keys.high_water();
    let request = pb::TxnRequest {
        compare: vec![txn::unchanged_since(&key, 0)],
        success: vec![txn::put(&key, SPACE_START.to_string(), 0)],
        failure: Vec::new(),
    };
    etcd_call(config, client.txn(request)).await?;
    failpoint!(
        "etcd::high_water_created",
        injected(config, "etcd::high_water_created")
    );
    Ok(())
}

/// The error a failpoint injects into a start-up or tool call.
#[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
fn injected(config: &EtcdConfig, name: &str) -> OpenError {
    OpenError::Etcd {
        endpoints: config.endpoints.join(","),
        message: format!("failpoint {name}"),
    }
}

/// Refuses a retention whose range leases etcd could not grant.
fn check_retention(retention: Duration, setting: &'static str) -> Result<(), OpenError> {
    if retention > MAX_RETENTION {
        return Err(OpenError::RetentionTooLong {
            setting,
            retention_secs: retention.as_secs(),
            max: MAX_RETENTION_FLAG,
        });
    }
    Ok(())
}

/// The fleet's retention as etcd holds it now (zero if it holds none).
async fn fleet_retention_now(shared: &Shared) -> Result<Duration, StoreError> {
    let key = shared.keys.retention();
    let stored = shared
        .timed("read the fleet's retention", shared.client.range(get(&key)))
        .await?;
    match stored.kvs.first() {
        Some(kv) => parse_decimal(&kv.value)
            .map(Duration::from_millis)
            .ok_or_else(|| StoreError::Corrupt {
                key,
                reason: "not a decimal number of milliseconds".into(),
            }),
        None => Ok(Duration::ZERO),
    }
}

/// The longest remaining TTL, in seconds, of the leases `worker`'s ranges
/// written after revision `after` have (0 if none), and the revision read
/// at: one read of the range keys (deregistrations are rare), then one
/// lease query per distinct lease (one per bucket and replica).
async fn longest_range_lease_secs(
    shared: &Shared,
    worker: &str,
    after: i64,
) -> Result<(i64, i64), StoreError> {
    let ranges = shared.keys.ranges();
    let end = prefix_end(ranges.as_bytes());
    let mut from = ranges.clone().into_bytes();
    let mut revision = 0;
    let mut leases = HashSet::new();
    loop {
        let page = shared
            .timed(
                "read the worker's ranges",
                shared.client.range(pb::RangeRequest {
                    key: from.clone(),
                    range_end: end.clone(),
                    limit: PAGE_KEYS,
                    revision,
                    min_mod_revision: if after > 0 { after + 1 } else { 0 },
                    ..Default::default()
                }),
            )
            .await?;
        if revision == 0 {
            revision = page.header.as_ref().map_or(0, |h| h.revision);
        }
        for kv in &page.kvs {
            let owner = std::str::from_utf8(&kv.key)
                .ok()
                .and_then(|key| key.strip_prefix(&ranges))
                .and_then(|start| decode_range(start, &kv.value));
            if kv.lease != 0 && owner.is_some_and(|owner| &*owner.prefill_worker == worker) {
                leases.insert(kv.lease);
            }
        }
        if let Some(last) = page.kvs.last() {
            from = last.key.clone();
            from.push(0);
        }
        if !page.more {
            break;
        }
    }
    let mut longest = 0;
    for lease in leases {
        let remaining = shared
            .timed(
                "read a range lease's TTL",
                shared.client.lease_time_to_live(lease),
            )
            .await?;
        longest = longest.max(remaining.ttl);
    }
    Ok((longest, revision))
}

/// The mod revision of `key` as a transaction read it.
fn revision_of(response: &pb::TxnResponse, key: &str) -> Result<i64, StoreError> {
    txn::ranges(response)
        .last()
        .and_then(|range| range.kvs.first())
        .map(|kv| kv.mod_revision)
        .ok_or_else(|| StoreError::Corrupt {
            key: key.to_owned(),
            reason: "it vanished right after it was written".into(),
        })
}

fn get(key: &str) -> pb::RangeRequest {
    pb::RangeRequest {
        key: key.as_bytes().to_vec(),
        ..Default::default()
    }
}

/// Settles the fleet's retention: the one etcd holds wins; the first replica
/// of a prefix writes its own.
async fn fleet_retention(
    client: &EtcdClient,
    keys: &Keys,
    config: &EtcdConfig,
) -> Result<Duration, OpenError> {
    check_retention(config.retention, "--retention")?;
    let key = keys.retention();
    let endpoints = config.endpoints.join(",");
    let wanted = u64::try_from(config.retention.as_millis()).unwrap_or(u64::MAX);
    for _ in 0..3 {
        let stored = etcd_call(config, client.range(get(&key))).await?;
        if let Some(kv) = stored.kvs.first() {
            let stored_ms = parse_decimal(&kv.value).ok_or_else(|| OpenError::CorruptKey {
                key: key.clone(),
                reason: "not a decimal number of milliseconds".into(),
            })?;
            // Set by a version that did not bound it: every lease grant
            // would fail, so refuse to start rather than serve nothing.
            check_retention(
                Duration::from_millis(stored_ms),
                "the fleet's retention in etcd",
            )?;
            if stored_ms != wanted {
                warn!(
                    fleet_retention_secs = stored_ms as f64 / 1000.0,
                    flag_retention_secs = config.retention.as_secs_f64(),
                    "--retention differs from the fleet's retention in etcd; using the fleet's (change it with `room-allocator retention --set`)"
                );
            }
            return Ok(Duration::from_millis(stored_ms));
        }
        let request = pb::TxnRequest {
            compare: vec![txn::unchanged_since(&key, 0)],
            success: vec![txn::put(&key, wanted.to_string(), 0)],
            failure: Vec::new(),
        };
        let written = etcd_call(config, client.txn(request)).await?;
        failpoint!(
            "etcd::fleet_retention_written",
            injected(config, "etcd::fleet_retention_written")
        );
        if written.succeeded {
            info!(
                retention_secs = config.retention.as_secs_f64(),
                "set the fleet's retention in etcd"
            );
            return Ok(config.retention);
        }
    }
    Err(OpenError::Etcd {
        endpoints,
        message: "the retention key keeps changing; is another tool rewriting it?".into(),
    })
}

/// Shows, or with `new` sets, the fleet's retention in etcd; returns it.
/// Replicas take a new value when they start.
pub async fn retention(config: &EtcdConfig, new: Option<Duration>) -> Result<Duration, OpenError> {
    if let Some(new) = new {
        check_retention(new, "retention --set")?;
    }
    let client = connect(config).await?;
    let keys = Keys::new(&config.prefix);
    let key = keys.retention();
    if let Some(new) = new {
        let ms = u64::try_from(new.as_millis()).unwrap_or(u64::MAX);
        etcd_call(
            config,
            client.put(pb::PutRequest {
                key: key.clone().into_bytes(),
                value: ms.to_string().into_bytes(),
                lease: 0,
                prev_kv: false,
            }),
        )
        .await?;
        failpoint!(
            "etcd::retention_set",
            injected(config, "etcd::retention_set")
        );
        return Ok(new);
    }
    let stored = etcd_call(config, client.range(get(&key))).await?;
    match stored.kvs.first() {
        Some(kv) => parse_decimal(&kv.value)
            .map(Duration::from_millis)
            .ok_or_else(|| OpenError::CorruptKey {
                key,
                reason: "not a decimal number of milliseconds".into(),
            }),
        None => Ok(config.retention),
    }
}

/// Runs an etcd call at start-up: bounded, and failures are `OpenError`s.
async fn etcd_call<T>(
    config: &EtcdConfig,
    call: impl std::future::Future<Output = Result<T, EtcdError>>,
) -> Result<T, OpenError> {
    let endpoints = config.endpoints.join(",");
    match tokio::time::timeout(config.timeout, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(OpenError::Etcd {
            endpoints,
            message: error.to_string(),
        }),
        Err(_) => Err(OpenError::EtcdTimeout {
            endpoints,
            after: config.timeout,
        }),
    }
}

/// Connects, and refuses an etcd too old to confirm a replica's view.
async fn connect(config: &EtcdConfig) -> Result<EtcdClient, OpenError> {
    let options = config.connect_options()?;
    let client = etcd_call(config, EtcdClient::connect(&options)).await?;
    let status = etcd_call(config, client.status()).await?;
    if !version_supported(&status.version) {
        return Err(OpenError::EtcdVersion {
            endpoints: config.endpoints.join(","),
            version: status.version,
        });
    }
    info!(etcd_version = %status.version, "connected to etcd");
    Ok(client)
}

/// Whether etcd `version` ("3.4.23") is at least [`MIN_ETCD_VERSION`].
fn version_supported(version: &str) -> bool {
    let mut parts = version.split('.').map(str::parse::<u32>);
    match (parts.next(), parts.next()) {
        (Some(Ok(major)), Some(Ok(minor))) => (major, minor) >= MIN_ETCD_VERSION,
        _ => false,
    }
}

#[cfg(test)]
mod version_tests {
    #[test]
    fn etcd_from_3_4_on_is_supported() {
        for (version, supported) in [
            ("3.4.23", true),
            ("3.5.17", true),
            ("3.6.0", true),
            ("4.0.0", true),
            ("3.3.27", false),
            ("2.3.8", false),
            ("", false),
            ("three", false),
        ] {
            assert_eq!(super::version_supported(version), supported, "{version:?}");
        }
    }
}

/// Reservations, folded into one transaction per round trip.
async fn run_reservations(
    shared: Arc<Shared>,
    mut queue: mpsc::UnboundedReceiver<PendingReservation>,
    mark: Option<Mark>,
) {
    let max_size = max_chunk_numbers(shared.bounds);
    let config = CarverConfig {
        bounds: shared.bounds,
        lifetime_ms: u64::try_from(CHUNK_LIFETIME.min(shared.retention).as_millis())
            .unwrap_or(u64::MAX),
        min_size: MIN_CHUNK_NUMBERS.min(max_size),
        max_size,
    };
    let mut carver = Carver::new(config, mark);
    let mut rng = Jitter::new();
    while let Some(first) = queue.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        // A caller that gave up (timeout) no longer needs a range.
        batch.retain(|pending| !pending.reply.is_closed());
        if !batch.is_empty() {
            reserve_batch(&shared, batch, &mut carver, &mut rng).await;
        }
    }
}

/// The most numbers one chunk takes: a sliver of the bounds (so even a small
/// --min-room/--max-room space is shared by many replicas and restarts), at
/// most 2^32 (a restart skips the rest of its chunk).
fn max_chunk_numbers(bounds: Bounds) -> u64 {
    (bounds.size() / 4096).clamp(1, MAX_CHUNK_NUMBERS)
}

/// Reserves a range for every request in `batch` (one transaction, more if
/// registrations changed meanwhile), or answers why not.
async fn reserve_batch(
    shared: &Shared,
    mut batch: Vec<PendingReservation>,
    carver: &mut Carver,
    rng: &mut Jitter,
) {
    // Beaten by other replicas at the mark, the batch retries (with a random
    // pause) until its callers would have given up anyway: the store timeout.
    let deadline = Instant::now() + shared.timeout;
    let mut attempts = 0;
    while Instant::now() < deadline && !batch.is_empty() {
        attempts += 1;
        let lease = match shared.bucket_lease().await {
            Ok(lease) => lease,
            Err(error) => return answer_all(batch, &error),
        };
        // Carve each request's range from the chunk; take a new chunk when
        // it runs out (or is too old to be announced in etcd any more).
        let mut planned = Vec::with_capacity(batch.len());
        let mut waiting = Vec::new();
        for pending in batch.drain(..) {
            match carve(shared, carver, &pending.reservation, lease).await {
                Carve::Range(range) => planned.push((pending, range)),
                Carve::Full(space) => {
                    let _ = pending.reply.send(Err(StoreError::Space(space)));
                }
                Carve::Lost => waiting.push(pending),
                Carve::Failed(error) => {
                    let _ = pending.reply.send(Err(error));
                }
            }
        }
        if !planned.is_empty() {
            batch.extend(commit_ranges(shared, planned, lease).await);
        }
        batch.extend(waiting);
        if !batch.is_empty() {
            debug!(
                attempts,
                "retrying reservations (a registration changed, or another replica took the chunk)"
            );
            let ceiling = MAX_CAS_BACKOFF.min(Duration::from_millis(1 << attempts.min(5)));
            tokio::time::sleep(rng.below(ceiling)).await;
        }
    }
    if !batch.is_empty() {
        answer_all(batch, &StoreError::Contention { attempts });
    }
}

/// What carving one range gave.
enum Carve {
    Range(RoomRange),
    /// The space (bounds) cannot hold it.
    Full(crate::space::SpaceError),
    /// Another replica moved the mark first: try again.
    Lost,
    Failed(StoreError),
}

/// Carves `r`'s range from the chunk, taking a new chunk (one
/// compare-and-swap on the mark) when needed: the I/O of [`Carver`]'s steps.
async fn carve(shared: &Shared, carver: &mut Carver, r: &Reservation, lease: i64) -> Carve {
    let need = Need {
        dp_size: r.dp_size,
        want_bases: r.want_bases,
        need_bases: r.need_bases,
    };
    // At most two chunks per range: one taken, one more if the first could
    // not hold it (then another replica's chunk came in between).
    let mut chunks_taken = 0;
    let mut reads = 0;
    // Bounded: each pass reads the mark (at most twice) or takes a chunk.
    while chunks_taken < 2 && reads < 2 {
        match carver.carve(need, lease, shared.elapsed_ms()) {
            Step::Range(range) => return Carve::Range(range),
            Step::Full(space) => return Carve::Full(space),
            Step::ReadMark => {
                reads += 1;
                match read_mark(shared).await {
                    Ok(mark) => carver.mark_read(mark),
                    Err(error) => {
                        carver.forget_mark();
                        return Carve::Failed(error);
                    }
                }
            }
            Step::TakeChunk(request) => {
                chunks_taken += 1;
                let reply = match take_chunk(shared, request).await {
                    Ok(reply) => reply,
                    Err(error) => {
                        // Unknown outcome: the carver never uses the chunk.
                        carver.chunk_reply(request, ChunkReply::Unknown);
                        return Carve::Failed(error);
                    }
                };
                match carver.chunk_reply(request, reply) {
                    ChunkOutcome::Taken => {
                        shared.high_water.fetch_max(request.end, Ordering::AcqRel);
                    }
                    ChunkOutcome::Lost => {
                        if reply == ChunkReply::LeaseNotFound {
                            shared.drop_lease(lease).await;
                        }
                        return Carve::Lost;
                    }
                    // Only a reply of unknown outcome fails, handled above.
                    ChunkOutcome::Failed => return Carve::Lost,
                }
            }
        }
    }
    Carve::Lost
}

/// The mark as etcd holds it now, checked (see [`Shared::seen_mark`]).
async fn read_mark(shared: &Shared) -> Result<Mark, StoreError> {
    let request = pb::TxnRequest {
        compare: Vec::new(),
        success: mark_reads(&shared.keys),
        failure: Vec::new(),
    };
    let response = shared
        .timed("read the high-water mark", shared.client.txn(request))
        .await?;
    shared.seen_mark(&txn::ranges(&response))
}

/// Sends the compare-and-swap of `request`: a chunk of the space announced
/// in `v1/chunks/` (so ResolveRank knows rooms in it may still be issued).
/// `Err` is a transaction of unknown outcome (or a mark refused when it was
/// read back): never used.
async fn take_chunk(shared: &Shared, request: ChunkRequest) -> Result<ChunkReply, StoreError> {
    let ChunkRequest {
        mark,
        start,
        end,
        lease,
        ..
    } = request;
    let hw_key = shared.keys.high_water();
    let chunk_key = shared.keys.chunk(start);
    let ranges_above = shared.keys.range(mark.value);
    let ranges_end = prefix_end(shared.keys.ranges().as_bytes());
    let request = pb::TxnRequest {
        // The value too: a restore of etcd's data may reuse revisions. And
        // no range at or above the mark: one would mean the mark was
        // rewritten below it (a cheap compare: healthy, the span is empty).
        compare: vec![
            txn::unchanged_since(&hw_key, mark.revision),
            txn::value_is(&hw_key, &mark.value.to_string()),
            txn::none_in(&ranges_above, ranges_end.clone()),
        ],
        success: vec![
            txn::put(&hw_key, end.to_string(), 0),
            txn::put(&chunk_key, json!({ "end": end }).to_string(), lease),
        ],
        failure: [
            mark_reads(&shared.keys),
            vec![txn::get_range(pb::RangeRequest {
                key: ranges_above.into_bytes(),
                range_end: ranges_end,
                limit: 1,
                ..Default::default()
            })],
        ]
        .concat(),
    };
    let sent = async {
        failpoint!("etcd::chunk_send", StoreError::Injected("etcd::chunk_send"));
        let response = shared
            .timed("take a chunk of the space", shared.client.txn(request))
            .await?;
        failpoint!(
            "etcd::chunk_committed",
            StoreError::Injected("etcd::chunk_committed")
        );
        Ok(response)
    };
    let response = match sent.await {
        Ok(response) => response,
        Err(StoreError::Etcd { message, .. }) if message.contains("lease not found") => {
            return Ok(ChunkReply::LeaseNotFound);
        }
        Err(error) => return Err(error),
    };
    if response.succeeded {
        let revision = response.header.as_ref().map_or(0, |h| h.revision);
        return Ok(ChunkReply::Taken { revision });
    }
    let reads = txn::ranges(&response);
    if reads.is_empty() {
        return Ok(ChunkReply::Beaten { mark: None });
    }
    let seen = shared.seen_mark(&reads)?;
    shared.high_water.fetch_max(seen.value, Ordering::AcqRel);
    Ok(ChunkReply::Beaten { mark: Some(seen) })
}

/// Writes the planned ranges in one transaction, if every worker's
/// registration still has the revision they were reserved for. Answers
/// each caller; returns the requests to retry (their worker was unchanged,
/// another's changed).
async fn commit_ranges(
    shared: &Shared,
    planned: Vec<(PendingReservation, RoomRange)>,
    lease: i64,
) -> Vec<PendingReservation> {
    let mut compare = Vec::with_capacity(planned.len());
    let mut success = Vec::with_capacity(planned.len());
    let mut failure = Vec::with_capacity(planned.len());
    for (pending, range) in &planned {
        let r = &pending.reservation;
        let worker_key = shared.keys.worker(&r.prefill_worker);
        compare.push(txn::unchanged_since(&worker_key, r.revision));
        let record = encode_range(&RangeOwner {
            prefill_worker: r.prefill_worker.clone(),
            range: *range,
            created_unix_ms: r.created_unix_ms,
        });
        success.push(txn::put(&shared.keys.range(range.start()), record, lease));
        failure.push(txn::get(&worker_key));
    }
    let request = pb::TxnRequest {
        compare,
        success,
        failure,
    };
    let sent = async {
        failpoint!(
            "etcd::reserve_send",
            StoreError::Injected("etcd::reserve_send")
        );
        let response = shared
            .timed("reserve ranges", shared.client.txn(request))
            .await?;
        failpoint!(
            "etcd::reserve_committed",
            StoreError::Injected("etcd::reserve_committed")
        );
        Ok(response)
    };
    let response = match sent.await {
        Ok(response) => response,
        Err(StoreError::Etcd { message, .. }) if message.contains("lease not found") => {
            // Nothing was written; the ranges stay carved (skipped).
            shared.drop_lease(lease).await;
            return planned.into_iter().map(|(pending, _)| pending).collect();
        }
        Err(error) => {
            // Unknown outcome: the ranges may or may not be recorded. They
            // stay carved from the chunk, so they are never used again.
            let pending = planned.into_iter().map(|(pending, _)| pending).collect();
            answer_all(pending, &error);
            return Vec::new();
        }
    };
    if response.succeeded {
        for (pending, range) in planned {
            let _ = pending.reply.send(Ok(range));
        }
        return Vec::new();
    }
    // A registration changed: its callers learn of it; the others retry.
    let reads = txn::ranges(&response);
    let current = |i: usize| reads.get(i).and_then(|read| read.kvs.first());
    let reserved_for: Vec<i64> = planned
        .iter()
        .map(|(pending, _)| pending.reservation.revision)
        .collect();
    let revisions: Vec<Option<i64>> = (0..planned.len())
        .map(|i| current(i).map(|kv| kv.mod_revision))
        .collect();
    let verdicts = record_verdicts(false, &reserved_for, &revisions);
    let mut retry = Vec::new();
    for (i, ((pending, _), verdict)) in planned.into_iter().zip(verdicts).enumerate() {
        let r = &pending.reservation;
        if verdict == RecordVerdict::Retry {
            retry.push(pending);
        } else {
            let record = current(i)
                .and_then(|kv| worker_record(r.prefill_worker.clone(), kv))
                .map(Box::new);
            let _ = pending.reply.send(Err(StoreError::StaleRegistration {
                worker: r.prefill_worker.clone(),
                current: record,
            }));
        }
    }
    retry
}

/// Random pauses for retries (xorshift; quality is irrelevant here).
struct Jitter(u64);

impl Jitter {
    fn new() -> Self {
        let seed = u64::from(std::process::id())
            ^ u64::try_from(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() & u128::from(u64::MAX)),
            )
            .unwrap_or(0);
        Self(seed | 1)
    }

    fn below(&mut self, ceiling: Duration) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX).max(1);
        Duration::from_nanos(self.0 % nanos)
    }
}

fn answer_all(batch: Vec<PendingReservation>, error: &StoreError) {
    for pending in batch {
        let _ = pending.reply.send(Err(error.clone()));
    }
}

/// Attaches range records written without a lease (by 0.1 replicas, which
/// pruned by their own clocks) to a lease, so etcd expires them too.
async fn lease_unleased(shared: Arc<Shared>, keys: Vec<(String, i64)>) {
    for chunk in keys.chunks(MAX_BATCH) {
        loop {
            let result = async {
                let lease = shared.bucket_lease().await?;
                let mut ops = Vec::new();
                for (key, _) in chunk {
                    let current = shared
                        .timed("read a range", shared.client.range(get(key)))
                        .await?;
                    let Some(kv) = current.kvs.first() else {
                        continue;
                    };
                    if kv.lease == 0 {
                        ops.push((key.clone(), kv.value.clone(), kv.mod_revision));
                    }
                }
                for (key, value, revision) in ops {
                    let request = pb::TxnRequest {
                        compare: vec![txn::unchanged_since(&key, revision)],
                        success: vec![txn::put(&key, value, lease)],
                        failure: Vec::new(),
                    };
                    shared
                        .timed("lease a range", shared.client.txn(request))
                        .await?;
                    failpoint!(
                        "etcd::range_leased",
                        StoreError::Injected("etcd::range_leased")
                    );
                }
                Ok::<(), StoreError>(())
            }
            .await;
            match result {
                Ok(()) => break,
                Err(error) => {
                    warn!(%error, "attaching old range records to a lease failed; retrying");
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            }
        }
    }
    info!(
        ranges = keys.len(),
        "range records of an older version now expire by lease"
    );
}

impl Store for EtcdStore {
    fn kind(&self) -> &'static str {
        "etcd"
    }

    fn store_id(&self) -> Option<String> {
        Some(self.store_id.clone())
    }

    fn shared(&self) -> bool {
        true
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
            || self
                .misses
                .lock()
                .expect("negative cache lock is never poisoned")
                .get(room.get())
                .unwrap_or(false)
    }

    fn check_fresh(&self) -> Result<(), StoreError> {
        let confirmed = Duration::from_millis(self.shared.confirmed_ms.load(Ordering::Acquire));
        let age = self.shared.epoch.elapsed().saturating_sub(confirmed);
        if age > self.staleness {
            return Err(StoreError::Stale {
                age,
                window: self.staleness,
            });
        }
        Ok(())
    }

    fn reachable(&self) -> bool {
        self.shared.reachable.load(Ordering::Acquire)
    }

    fn confirmed_ago(&self) -> Option<Duration> {
        let confirmed = Duration::from_millis(self.shared.confirmed_ms.load(Ordering::Acquire));
        Some(self.shared.epoch.elapsed().saturating_sub(confirmed))
    }

    fn high_water(&self) -> u64 {
        self.shared.high_water.load(Ordering::Acquire)
    }

    fn take_updates(&self) -> Option<mpsc::UnboundedReceiver<StoreUpdate>> {
        self.updates
            .lock()
            .expect("updates lock is never poisoned")
            .take()
    }

    fn close(&self) -> StoreFuture<'_, ()> {
        for task in &self.tasks {
            task.abort();
        }
        Box::pin(async { Ok(()) })
    }
}

/// A connected client and everything under the prefix.
struct Loaded {
    client: EtcdClient,
    keys: Keys,
    snapshot: Snapshot,
    high_water: Option<Mark>,
    revision: i64,
    /// Range keys written without a lease, with their mod revision.
    unleased: Vec<(String, i64)>,
    /// The chunks replicas took, as announced.
    chunks: Vec<AnnouncedChunk>,
}

async fn connect_and_load(config: &EtcdConfig) -> Result<Loaded, OpenError> {
    let client = connect(config).await?;
    let keys = Keys::new(&config.prefix);
    let (kvs, revision) = read_prefix(config, &client, &keys.root).await?;
    let ParsedSnapshot {
        snapshot,
        high_water,
        unleased,
        chunks,
    } = parse_snapshot(&keys, &kvs)?;
    Ok(Loaded {
        client,
        keys,
        snapshot,
        high_water,
        revision,
        unleased,
        chunks,
    })
}

/// Every key under `prefix`, in pages, all read at one revision.
async fn read_prefix(
    config: &EtcdConfig,
    client: &EtcdClient,
    prefix: &str,
) -> Result<(Vec<pb::KeyValue>, i64), OpenError> {
    let end = prefix_end(prefix.as_bytes());
    let mut from = prefix.as_bytes().to_vec();
    let mut revision = 0;
    let mut kvs = Vec::new();
    loop {
        let page = etcd_call(
            config,
            client.range(pb::RangeRequest {
                key: from.clone(),
                range_end: end.clone(),
                limit: PAGE_KEYS,
                revision,
                ..Default::default()
            }),
        )
        .await?;
        if revision == 0 {
            revision = page.header.as_ref().map_or(0, |h| h.revision);
        }
        let more = page.more;
        if let Some(last) = page.kvs.last() {
            from = last.key.clone();
            from.push(0);
        }
        kvs.extend(page.kvs);
        if !more {
            return Ok((kvs, revision));
        }
    }
}

/// A decimal counter key's value and the compare that guards its update
/// (unchanged since read, or still absent); `None` if it is not a number.
pub(crate) fn counter_guard(kv: Option<&pb::KeyValue>, key: &str) -> Option<(u64, pb::Compare)> {
    Some(match kv {
        Some(kv) => (
            parse_decimal(&kv.value)?,
            txn::unchanged_since(key, kv.mod_revision),
        ),
        None => (0, txn::unchanged_since(key, 0)),
    })
}

fn parse_high_water(kv: &pb::KeyValue, key: &str) -> Result<Mark, StoreError> {
    parse_mark(&kv.value)
        .map(|value| Mark {
            value,
            revision: kv.mod_revision,
        })
        .ok_or_else(|| StoreError::Corrupt {
            key: key.to_owned(),
            reason: NOT_A_MARK.into(),
        })
}

/// Everything under the prefix, as [`parse_snapshot`] read it.
struct ParsedSnapshot {
    snapshot: Snapshot,
    /// The mark, if there is one.
    high_water: Option<Mark>,
    /// Range keys written without a lease, with their mod revision.
    unleased: Vec<(String, i64)>,
    chunks: Vec<AnnouncedChunk>,
}

/// A chunk a replica took, as its key announces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct AnnouncedChunk {
    start: u64,
    end: u64,
}

/// Everything under the prefix, checked: a key this binary cannot trust
/// refuses the start. A fuzz target through `parse_entry`.
fn parse_snapshot(keys: &Keys, kvs: &[pb::KeyValue]) -> Result<ParsedSnapshot, OpenError> {
    let mut ranges = RangeTable::default();
    let mut workers = std::collections::BTreeMap::new();
    let mut issued = HashMap::new();
    let mut high_water = None;
    let mut pruned_below = 0;
    let mut chunks = Vec::new();
    let mut unleased = Vec::new();
    for kv in kvs {
        let key = String::from_utf8_lossy(&kv.key);
        let corrupt = |reason: &str| OpenError::CorruptKey {
            key: key.to_string(),
            reason: reason.to_owned(),
        };
        match parse_entry(keys, kv).map_err(|reason| corrupt(&reason))? {
            Entry::HighWater(value) => {
                high_water = Some(Mark {
                    value,
                    revision: kv.mod_revision,
                })
            }
            Entry::PrunedBelow(below) => pruned_below = below,
            Entry::Range(owner) => {
                if kv.lease == 0 {
                    unleased.push((key.to_string(), kv.mod_revision));
                }
                ranges
                    .insert(owner)
                    .map_err(|overlap| corrupt(&overlap.to_string()))?;
            }
            Entry::Worker(record) => {
                workers.insert(record.prefill_worker.clone(), record);
            }
            Entry::Issued(worker, count) => {
                issued.insert(worker, count);
            }
            Entry::Chunk { start, end } => chunks.push(AnnouncedChunk { start, end }),
            Entry::Other => {}
        }
    }
    let hw = high_water.map_or(SPACE_START, |mark| mark.value);
    if ranges.high_water() > hw {
        return Err(OpenError::CorruptKey {
            key: keys.high_water(),
            reason: format!(
                "the high-water mark {hw} is below the reserved range ending at {}",
                ranges.high_water()
            ),
        });
    }
    let chunks_end = chunks
        .iter()
        .map(|chunk| chunk.end)
        .max()
        .unwrap_or(SPACE_START);
    if chunks_end > hw {
        return Err(OpenError::CorruptKey {
            key: keys.high_water(),
            reason: format!(
                "the high-water mark {hw} is below the chunk a replica took ending at {chunks_end} (it was deleted or rewritten); put back a mark at or above it"
            ),
        });
    }
    let workers = workers
        .into_values()
        .map(|record| WorkerRecord {
            rooms_issued: issued.get(&record.prefill_worker).copied().unwrap_or(0),
            ..record
        })
        .collect();
    Ok(ParsedSnapshot {
        snapshot: Snapshot {
            workers,
            ranges,
            pruned_below,
            high_water: hw.max(pruned_below),
            retention: Duration::ZERO,
        },
        high_water,
        unleased,
        chunks,
    })
}

const NOT_A_MARK: &str = "not a decimal number without leading zeros";

/// One key of the prefix, decoded.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Entry {
    HighWater(u64),
    PrunedBelow(u64),
    Range(RangeOwner),
    /// A chunk a replica took.
    Chunk {
        start: u64,
        end: u64,
    },
    Worker(WorkerRecord),
    Issued(Arc<str>, u64),
    /// Not ours to read (config, or keys of a later version).
    Other,
}

/// Decodes one key-value of the prefix. A fuzz target: never panics, and
/// accepts nothing it would not write itself.
pub(crate) fn parse_entry(keys: &Keys, kv: &pb::KeyValue) -> Result<Entry, String> {
    let key = std::str::from_utf8(&kv.key).map_err(|_| "not UTF-8".to_owned())?;
    let Some(name) = key.strip_prefix(&keys.root) else {
        return Ok(Entry::Other);
    };
    let number = || parse_decimal(&kv.value).ok_or_else(|| "not a decimal number".to_owned());
    Ok(if name == "high_water" {
        Entry::HighWater(parse_mark(&kv.value).ok_or_else(|| NOT_A_MARK.to_owned())?)
    } else if name == "pruned_below" {
        Entry::PrunedBelow(number()?)
    } else if let Some(start) = name.strip_prefix("ranges/") {
        Entry::Range(
            decode_range(start, &kv.value)
                .ok_or_else(|| "not a valid, aligned range record".to_owned())?,
        )
    } else if let Some(start) = name.strip_prefix("chunks/") {
        let (start, end) = decode_chunk(start, &kv.value)
            .ok_or_else(|| "not a valid chunk announcement".to_owned())?;
        Entry::Chunk { start, end }
    } else if let Some(worker) = name.strip_prefix("workers/") {
        crate::allocator::validate_worker(worker).map_err(|e| e.to_string())?;
        Entry::Worker(
            worker_record(Arc::from(worker), kv)
                .ok_or_else(|| "not a valid registration".to_owned())?,
        )
    } else if let Some(worker) = name.strip_prefix("issued/") {
        crate::allocator::validate_worker(worker).map_err(|e| e.to_string())?;
        Entry::Issued(Arc::from(worker), number()?)
    } else {
        Entry::Other
    })
}

/// Follows `v1/workers/`: a watch for promptness, progress requests to
/// confirm the view is caught up, and a full reread when the watch broke
/// past what etcd still has.
struct RegistrationSync {
    shared: Arc<Shared>,
    updates: mpsc::UnboundedSender<StoreUpdate>,
    /// Workers the allocator knows of: a reread that lacks one forgets it.
    known: HashSet<Arc<str>>,
}

impl RegistrationSync {
    /// Follows the registrations applied up to `applied` (the snapshot's
    /// revision), forever.
    async fn run(mut self, mut applied: i64) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let started = Instant::now();
            match self.watch(applied).await {
                WatchEnd::Compacted => match self.reread().await {
                    Ok(seen) => applied = seen,
                    Err(error) => self.unreachable(&error),
                },
                WatchEnd::Failed(error, seen) => {
                    applied = applied.max(seen);
                    self.unreachable(&error);
                }
            }
            if started.elapsed() > Duration::from_secs(10) {
                backoff = Duration::from_millis(100);
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    fn unreachable(&self, error: &str) {
        if self.shared.reachable.swap(false, Ordering::AcqRel) {
            warn!(%error, "etcd is unreachable; serving only from reserved ranges until the staleness window ends");
        }
    }

    /// Watches from `applied + 1` until the watch breaks; returns how, with
    /// the last revision applied.
    ///
    /// A watch etcd created at a revision at or past its start owes a
    /// catch-up read before progress may confirm the view ([`watch`]): the
    /// registrations modified since the start, read linearizably and applied
    /// as events. That read misses a worker key deleted since the start,
    /// which is safe: a worker key is deleted only when the lease of its
    /// deregistration expires, at least `2 * retention` after the
    /// deregistration, so a deletion the read misses with no later put of
    /// the key means a deregistration missed too, at least that long ago.
    /// By then no range the replica holds for the worker can serve (each
    /// was reserved before the deregistration, whose revision the
    /// reservation compared, and serves for at most `retention`), and a new
    /// reservation compares the registration's revision and fails
    /// (`StaleRegistration`): the stale view hands out nothing, and the
    /// stream still delivers both events.
    async fn watch(&mut self, applied: i64) -> WatchEnd {
        let mut progress = WatchProgress::new(applied);
        let failed = |error: String, progress: &WatchProgress| {
            WatchEnd::Failed(error, progress.resume_after())
        };
        let prefix = self.shared.keys.workers();
        let (requests, request_stream) = mpsc::channel(4);
        let create = pb::WatchRequest {
            request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
                pb::WatchCreateRequest {
                    key: prefix.clone().into_bytes(),
                    range_end: prefix_end(prefix.as_bytes()),
                    start_revision: applied + 1,
                    ..Default::default()
                },
            )),
        };
        if requests.send(create).await.is_err() {
            return failed("the watch request stream closed".into(), &progress);
        }
        let opened = tokio::time::timeout(
            self.shared.timeout,
            self.shared.client.watch(request_stream),
        )
        .await;
        let mut stream = match opened {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => return failed(error.to_string(), &progress),
            Err(_) => return failed("no answer to the watch".into(), &progress),
        };
        let mut ticker = tokio::time::interval(PROGRESS_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The quorum read of the outstanding request, while in flight.
        let mut quorum: Option<QuorumRead> = None;
        // The catch-up read the watch owes (see `watch`), while in flight.
        let mut catch_up: Option<CatchUpRead> = None;
        loop {
            tokio::select! {
                message = stream.message() => {
                    let response = match message {
                        Ok(Some(response)) => response,
                        Ok(None) => return failed("etcd ended the watch".into(), &progress),
                        Err(status) => return failed(EtcdError::from(status).to_string(), &progress),
                    };
                    if response.compact_revision > 0 {
                        return WatchEnd::Compacted;
                    }
                    if response.canceled {
                        return failed(format!("etcd cancelled the watch: {}", response.cancel_reason), &progress);
                    }
                    if response.created {
                        // A response without a header confirms nothing.
                        let revision = response.header.as_ref().map_or(i64::MAX, |h| h.revision);
                        if let Some(from) = progress.created(revision) {
                            catch_up = Some(Box::pin(read_workers(self.shared.clone(), from)));
                        }
                    }
                    for event in &response.events {
                        if let Some(kv) = &event.kv {
                            self.apply(event.r#type, kv);
                            progress.applied(kv.mod_revision);
                        }
                    }
                    if response.events.is_empty() && !response.created {
                        // A progress notification: the watch delivered every
                        // change up to its revision (as the member knows it).
                        let revision = response.header.as_ref().map_or(0, |h| h.revision);
                        if let Some(asked) = progress.progress(revision) {
                            self.confirm(asked);
                        }
                    }
                }
                read = async { quorum.as_mut().expect("polled only while a read is in flight").await }, if quorum.is_some() => {
                    quorum = None;
                    match read {
                        Ok(revision) => {
                            progress.quorum_read(revision);
                            let request = pb::WatchRequest {
                                request_union: Some(pb::watch_request::RequestUnion::ProgressRequest(
                                    pb::WatchProgressRequest {},
                                )),
                            };
                            if requests.send(request).await.is_err() {
                                return failed("the watch request stream closed".into(), &progress);
                            }
                        }
                        Err(error) => {
                            debug!(%error, "the quorum read that confirms the view failed; it stays unconfirmed");
                            progress.quorum_failed();
                        }
                    }
                }
                read = async { catch_up.as_mut().expect("polled only while a read is in flight").await }, if catch_up.is_some() => {
                    catch_up = None;
                    match read {
                        Ok((kvs, revision)) => {
                            // As events, older than the stream's replays
                            // of them; the resume point stays (see `watch`).
                            for kv in &kvs {
                                self.apply(pb::event::EventType::Put as i32, kv);
                            }
                            progress.caught_up(revision);
                        }
                        Err(error) => return failed(format!("the catch-up read of the registrations failed: {error}"), &progress),
                    }
                }
                _ = ticker.tick() => {
                    if let Some(sent) = progress.asked_at() {
                        let waited = Duration::from_millis(self.shared.elapsed_ms().saturating_sub(sent));
                        if waited > self.shared.timeout {
                            return failed(format!("the watch did not confirm progress within {:?}", self.shared.timeout), &progress);
                        }
                        continue;
                    }
                    if progress.catching_up() {
                        // Nothing confirms before the catch-up read is
                        // applied, and that read ends in its timeout.
                        continue;
                    }
                    progress.asked(self.shared.elapsed_ms());
                    quorum = Some(Box::pin(quorum_revision(self.shared.clone())));
                }
            }
        }
    }

    fn confirm(&self, asked_ms: u64) {
        self.shared
            .confirmed_ms
            .fetch_max(asked_ms, Ordering::AcqRel);
        if !self.shared.reachable.swap(true, Ordering::AcqRel) {
            info!("etcd is reachable again");
        }
    }

    fn apply(&mut self, kind: i32, kv: &pb::KeyValue) {
        let prefix = self.shared.keys.workers();
        let Some(name) = std::str::from_utf8(&kv.key)
            .ok()
            .and_then(|key| key.strip_prefix(&prefix))
        else {
            return;
        };
        let name: Arc<str> = Arc::from(name);
        if kind == pb::event::EventType::Delete as i32 {
            self.known.remove(&name);
            let _ = self.updates.send(StoreUpdate::Forgotten {
                prefill_worker: name,
                revision: kv.mod_revision,
            });
            return;
        }
        match worker_record(name.clone(), kv) {
            Some(record) => {
                self.known.insert(name);
                let _ = self.updates.send(StoreUpdate::Registration(record));
            }
            None => {
                warn!(worker = %name.escape_debug(), "ignoring an unreadable registration in etcd")
            }
        }
    }

    /// Rereads every registration (the watch fell behind a compaction);
    /// workers no longer there are forgotten. Returns the read's revision.
    async fn reread(&mut self) -> Result<i64, String> {
        let asked = self.shared.elapsed_ms();
        let prefix = self.shared.keys.workers();
        let (kvs, revision) = read_workers(self.shared.clone(), 0)
            .await
            .map_err(|e| e.to_string())?;
        let mut seen = HashSet::new();
        for kv in &kvs {
            if let Some(name) = std::str::from_utf8(&kv.key)
                .ok()
                .and_then(|key| key.strip_prefix(&prefix))
            {
                seen.insert(Arc::<str>::from(name));
            }
            self.apply(pb::event::EventType::Put as i32, kv);
        }
        let gone: Vec<Arc<str>> = self.known.difference(&seen).cloned().collect();
        for name in gone {
            self.known.remove(&name);
            let _ = self.updates.send(StoreUpdate::Forgotten {
                prefill_worker: name,
                revision,
            });
        }
        self.confirm(asked);
        Ok(revision)
    }
}

/// Why a watch ended.
enum WatchEnd {
    /// etcd compacted past the revision the watch needed: reread everything.
    Compacted,
    /// The watch broke; the last revision applied, to resume after.
    Failed(String, i64),
}

/// The registrations modified at or after `min_mod_revision` (0: all), by
/// a linearizable read in pages at one revision; with that revision.
/// Deleted keys are not seen: only a deregistered worker's key is deleted
/// (its lease expired), and see `RegistrationSync::watch` for why the
/// catch-up read may miss that.
async fn read_workers(
    shared: Arc<Shared>,
    min_mod_revision: i64,
) -> Result<(Vec<pb::KeyValue>, i64), StoreError> {
    let prefix = shared.keys.workers();
    let end = prefix_end(prefix.as_bytes());
    let mut from = prefix.into_bytes();
    let mut revision = 0;
    let mut kvs = Vec::new();
    loop {
        let page = shared
            .timed(
                "read the registrations",
                shared.client.range(pb::RangeRequest {
                    key: from.clone(),
                    range_end: end.clone(),
                    limit: PAGE_KEYS,
                    revision,
                    min_mod_revision,
                    ..Default::default()
                }),
            )
            .await?;
        if revision == 0 {
            // A response without a header: a read at "now" again would
            // not be one view, so take none.
            revision = page.header.as_ref().map_or(0, |h| h.revision);
            if revision == 0 {
                return Err(StoreError::Etcd {
                    operation: "read the registrations",
                    message: "the answer carried no revision; retrying".into(),
                });
            }
        }
        if let Some(last) = page.kvs.last() {
            from = last.key.clone();
            from.push(0);
        }
        let more = page.more && !page.kvs.is_empty();
        kvs.extend(page.kvs);
        if !more {
            return Ok((kvs, revision));
        }
    }
}

/// A catch-up read in flight (see `RegistrationSync::watch`).
type CatchUpRead = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<(Vec<pb::KeyValue>, i64), StoreError>> + Send>,
>;

/// A linearizable read in flight, answering the cluster's revision.
type QuorumRead =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<i64, StoreError>> + Send>>;

/// The cluster's current revision, by a linearizable read (etcd's default
/// for Range: the member checks with the leader, so a member cut off from
/// its cluster cannot answer).
async fn quorum_revision(shared: Arc<Shared>) -> Result<i64, StoreError> {
    let request = pb::RangeRequest {
        key: shared.keys.high_water().into_bytes(),
        count_only: true,
        ..Default::default()
    };
    let response = shared
        .timed("read the cluster's revision", shared.client.range(request))
        .await?;
    // A response without a header confirms nothing.
    Ok(response.header.map_or(i64::MAX, |h| h.revision))
}

/// The prefix's store id, `v1/store_id` (see `store_id`): put if absent (by
/// the first replica, or the first start after ids came), then read, so
/// every replica of the prefix reports the one that won. Older binaries
/// ignore the key.
async fn read_or_create_store_id(
    config: &EtcdConfig,
    client: &EtcdClient,
    keys: &Keys,
) -> Result<String, OpenError> {
    let key = format!("{}store_id", keys.root);
    let candidate = super::store_id::new_uuid_v4().map_err(|error| OpenError::Etcd {
        endpoints: config.endpoints.join(","),
        message: format!("cannot make a store id: {error}"),
    })?;
    let request = pb::TxnRequest {
        compare: vec![txn::unchanged_since(&key, 0)],
        success: vec![txn::put(&key, candidate, 0)],
        failure: Vec::new(),
    };
    etcd_call(config, client.txn(request)).await?;
    let stored = etcd_call(config, client.range(get(&key))).await?;
    let value = stored
        .kvs
        .first()
        .map(|kv| kv.value.clone())
        .unwrap_or_default();
    match std::str::from_utf8(&value) {
        Ok(id) if super::store_id::is_uuid(id) => Ok(id.to_owned()),
        _ => Err(OpenError::CorruptKey {
            key,
            reason: format!(
                "it holds {:?}, not a store id (a UUID); delete it to have a new one written",
                String::from_utf8_lossy(&value)
            ),
        }),
    }
}

/// What `migrate` moved into etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportReport {
    pub high_water: u64,
    pub ranges: usize,
    pub workers: usize,
}

/// Whether `embedded` can be moved into etcd: refused if etcd holds ranges
/// or chunks below the embedded store's high-water mark (both stores issued,
/// or may issue, those numbers). Writes nothing, so `migrate` checks before
/// it marks the data dir.
pub async fn check_import(config: &EtcdConfig, embedded: &Snapshot) -> Result<(), OpenError> {
    check_conflicts(&connect_and_load(config).await?, embedded)
}

fn check_conflicts(loaded: &Loaded, embedded: &Snapshot) -> Result<(), OpenError> {
    let Loaded {
        keys,
        snapshot: existing,
        chunks,
        ..
    } = loaded;
    // Every number below the embedded store's mark counts as issued, not
    // only its ranges: ranges pruned by retention (and gaps between ranges)
    // held rooms too, which callers may still hold.
    let used_end = embedded.high_water;
    // Chunks replicas took first (a chunk holds the ranges carved from it,
    // so it names the wider conflict): they issued, or may still issue,
    // rooms anywhere in them.
    if let Some(&AnnouncedChunk { start, end }) = chunks.iter().find(|chunk| chunk.start < used_end)
    {
        return Err(OpenError::CorruptKey {
            key: keys.chunk(start),
            reason: format!(
                "a replica took {start}..{end} of the space, below the embedded store's high-water mark {used_end} (every number below it was issued, or pruned after it was); both may have issued those numbers (or a replica is running), so refusing to merge them"
            ),
        });
    }

    // Ranges in etcd, unless one is the embedded store's own (a rerun).
    for owner in existing.ranges.iter() {
        // The same range as the embedded store's is a rerun's own copy.
        let rerun = Room::try_new(owner.range.start())
            .ok()
            .and_then(|start| embedded.ranges.resolve(start))
            .is_some_and(|mine| mine == owner);
        if !rerun && owner.range.start() < used_end {
            return Err(OpenError::CorruptKey {
                key: keys.range(owner.range.start()),
                reason: format!(
                    "etcd already holds the range {}..{}, below the embedded store's high-water mark {used_end} (every number below it was issued, or pruned after it was); both stores issued those numbers, so refusing to merge them",
                    owner.range.start(),
                    owner.range.end()
                ),
            });
        }
    }

    Ok(())
}

/// Moves an embedded store's state into etcd so that no room issued before
/// can be issued again: first the high-water mark (compare-and-swap, only
/// ever raised), then the range records (so old rooms resolve, expiring by
/// lease like every range) and the registrations etcd does not have yet.
/// Safe to run again.
pub async fn import(config: &EtcdConfig, embedded: &Snapshot) -> Result<ImportReport, OpenError> {
    let loaded = connect_and_load(config).await?;
    check_conflicts(&loaded, embedded)?;
    let Loaded {
        client,
        keys,
        snapshot: existing,
        high_water,
        chunks,
        ..
    } = loaded;
    let retention = fleet_retention(&client, &keys, config).await?;

    let Mark {
        value: etcd_high_water,
        revision,
    } = high_water.unwrap_or(Mark {
        value: 0,
        revision: 0,
    });
    // Never a mark below what replicas took, whatever etcd's mark says (a
    // missing one included): replicas refuse a mark below a chunk or range.
    let taken_end = chunks
        .iter()
        .map(|chunk| chunk.end)
        .max()
        .unwrap_or(0)
        .max(existing.ranges.high_water());
    let target = embedded.high_water.max(etcd_high_water).max(taken_end);
    if target > etcd_high_water {
        let request = pb::TxnRequest {
            compare: vec![txn::unchanged_since(&keys.high_water(), revision)],
            success: vec![txn::put(&keys.high_water(), target.to_string(), 0)],
            failure: Vec::new(),
        };
        failpoint!(
            "migrate::high_water_send",
            OpenError::Etcd {
                endpoints: config.endpoints.join(","),
                message: "failpoint migrate::high_water_send".into(),
            }
        );
        if !etcd_call(config, client.txn(request)).await?.succeeded {
            return Err(OpenError::CorruptKey {
                key: keys.high_water(),
                reason: "it changed while migrating: a replica is reserving; stop the replicas and run migrate again".into(),
            });
        }
    }
    failpoint!(
        "migrate::high_water",
        OpenError::Etcd {
            endpoints: config.endpoints.join(","),
            message: "failpoint migrate::high_water".into(),
        }
    );

    let lease = etcd_call(
        config,
        client.lease_grant(lease_ttl_secs(retention, bucket_for(retention))),
    )
    .await?
    .id;
    failpoint!(
        "migrate::lease_granted",
        OpenError::Etcd {
            endpoints: config.endpoints.join(","),
            message: "failpoint migrate::lease_granted".into(),
        }
    );
    let mut ops = Vec::new();
    for owner in embedded.ranges.iter() {
        ops.push(txn::put(
            &keys.range(owner.range.start()),
            encode_range(owner),
            lease,
        ));
    }
    let known: HashSet<&str> = existing
        .workers
        .iter()
        .map(|w| &*w.prefill_worker)
        .collect();
    let mut workers = 0;
    for worker in &embedded.workers {
        if known.contains(&*worker.prefill_worker) {
            continue;
        }
        workers += 1;
        // A deregistered worker outlives its ranges by the same lease.
        let worker_lease = if worker.registered { 0 } else { lease };
        ops.push(txn::put(
            &keys.worker(&worker.prefill_worker),
            encode_worker(worker.dp_size, worker.registered),
            worker_lease,
        ));
        if worker.registered {
            ops.push(txn::put(
                &keys.issued(&worker.prefill_worker),
                worker.rooms_issued.to_string(),
                0,
            ));
        }
    }
    while !ops.is_empty() {
        let batch: Vec<pb::RequestOp> = ops.drain(..ops.len().min(100)).collect();
        etcd_call(
            config,
            client.txn(pb::TxnRequest {
                compare: Vec::new(),
                success: batch,
                failure: Vec::new(),
            }),
        )
        .await?;
        failpoint!(
            "migrate::ranges",
            OpenError::Etcd {
                endpoints: config.endpoints.join(","),
                message: "failpoint migrate::ranges".into(),
            }
        );
    }
    Ok(ImportReport {
        high_water: target,
        ranges: embedded.ranges.len(),
        workers,
    })
}
