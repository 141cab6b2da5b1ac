//! The etcd store: one room space shared by every allocator replica.
//!
//! # Keys (under `--etcd-prefix`, default `/room-allocator/`)
//! - `v1/high_water`: decimal u64, the end of the highest reserved range.
//! - `v1/ranges/{start:020}`: JSON `{"end", "dp_size", "prefill_worker",
//!   "created_unix_ms"}`; zero-padded so keys sort by start.
//! - `v1/workers/{prefill_worker}`: JSON `{"dp_size", "registered"}`.
//! - `v1/issued/{prefill_worker}`: decimal u64, `rooms_issued` persisted by
//!   replicas as they shut down.
//! - `v1/pruned_below`: decimal u64; ranges ending at or below it were pruned
//!   by retention (so ResolveRank can tell "pruned" from "never issued").
//!
//! # Reserving a range
//! One transaction: if `high_water` still has the mod revision this replica
//! last saw (or does not exist yet) **and** the worker's key still holds the
//! registration the replica is serving, put the new `high_water` and the
//! range record. etcd transactions are linearizable, so two replicas can never
//! both move the mark from the same value: ranges never overlap. A failed
//! compare returns the current values and the replica tries again (or learns
//! of a realignment). A transaction whose outcome is unknown (timeout, lost
//! connection) is never used: the replica rereads and reserves afresh, so at
//! worst a range is reserved and never used.
//!
//! # Registrations
//! Each replica watches `v1/workers/` and also rereads it every
//! [`RESYNC_INTERVAL`]. Changes made on another replica are applied within
//! milliseconds (watch) or at most `RESYNC_INTERVAL` (reread). A replica that
//! has not confirmed the registrations for `--etcd-staleness-secs` (default
//! 10 s) stops handing out rooms (UNAVAILABLE), so no replica keeps issuing
//! rooms aligned to a dp_size that was changed elsewhere for longer than that
//! window. Reservations also compare the registration, so a new range is
//! never reserved for an outdated dp_size.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, KvClient,
    SortOrder, SortTarget, TlsOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use serde_json::json;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use super::{
    IssuedCount, OpenError, Reservation, Snapshot, Store, StoreError, StoreFuture, WorkerRecord,
};
use crate::space::{DpSize, RangeOwner, RangeTable, Room, RoomRange};

/// How often a replica rereads all registrations, besides watching them.
pub const RESYNC_INTERVAL: Duration = Duration::from_secs(1);
/// Compare-and-swap attempts before a reservation gives up; each failure means
/// another replica reserved meanwhile, so this bounds a pathological storm.
const MAX_CAS_ATTEMPTS: usize = 32;

/// How to reach etcd.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    pub prefix: String,
    pub username: Option<String>,
    pub password: Option<String>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Bound on every etcd call; past it a call fails with UNAVAILABLE.
    pub timeout: Duration,
    /// Longest a replica serves rooms without confirming the registrations.
    pub staleness: Duration,
}

/// Key names under the configured prefix.
#[derive(Debug, Clone)]
struct Keys {
    root: String,
}

impl Keys {
    fn new(prefix: &str) -> Self {
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

    fn pruned_below(&self) -> String {
        format!("{}pruned_below", self.root)
    }
}

/// The registration a worker key holds; its exact bytes are compared in
/// reservation transactions, so it is always encoded the same way.
fn encode_worker(dp_size: DpSize, registered: bool) -> String {
    json!({ "dp_size": dp_size.get(), "registered": registered }).to_string()
}

fn decode_worker(value: &[u8]) -> Option<(DpSize, bool)> {
    let value: serde_json::Value = serde_json::from_slice(value).ok()?;
    let dp_size = u32::try_from(value["dp_size"].as_u64()?).ok()?;
    let registered = value["registered"].as_bool()?;
    Some((DpSize::try_new(dp_size).ok()?, registered))
}

/// A range record's value; its start is in the key.
fn encode_range(owner: &RangeOwner) -> String {
    json!({
        "end": owner.range.end(),
        "dp_size": owner.range.dp_size().get(),
        "prefill_worker": &*owner.prefill_worker,
        "created_unix_ms": owner.created_unix_ms,
    })
    .to_string()
}

/// The registration a worker key holds, as the allocator applies it.
fn worker_record(prefill_worker: Arc<str>, kv: &etcd_client::KeyValue) -> Option<WorkerRecord> {
    let (dp_size, registered) = decode_worker(kv.value())?;
    Some(WorkerRecord {
        prefill_worker,
        dp_size,
        registered,
        rooms_issued: 0,
        revision: kv.mod_revision(),
    })
}

fn decode_range(key_start: &str, value: &[u8]) -> Option<RangeOwner> {
    let start: u64 = key_start.parse().ok()?;
    let value: serde_json::Value = serde_json::from_slice(value).ok()?;
    let end = value["end"].as_u64()?;
    let dp_size = DpSize::try_new(u32::try_from(value["dp_size"].as_u64()?).ok()?).ok()?;
    let worker = value["prefill_worker"].as_str()?;
    Some(RangeOwner {
        prefill_worker: Arc::from(worker),
        range: RoomRange::from_parts(start, end, dp_size)?,
        created_unix_ms: value["created_unix_ms"].as_u64()?,
    })
}

fn unavailable(operation: &'static str, error: etcd_client::Error) -> StoreError {
    StoreError::Etcd {
        operation,
        source: Arc::new(error),
    }
}

/// The etcd store handle.
pub struct EtcdStore {
    kv: KvClient,
    keys: Keys,
    timeout: Duration,
    limit: u64,
    staleness: Duration,
    /// `high_water` and its mod revision as last seen; `None` = reread first.
    /// The async lock also keeps one reservation per replica in flight.
    high_water: tokio::sync::Mutex<Option<(u64, i64)>>,
    /// When the registrations were last confirmed, in ms since `epoch`.
    confirmed_ms: Arc<AtomicU64>,
    epoch: Instant,
    updates: Mutex<Option<mpsc::UnboundedReceiver<WorkerRecord>>>,
    reachable: watch::Receiver<bool>,
    sync_task: tokio::task::JoinHandle<()>,
}

impl EtcdStore {
    /// Connects, loads everything under the prefix, and starts following
    /// registrations. Refuses to start if etcd cannot be reached in time or
    /// holds data this binary cannot trust.
    pub async fn open(config: &EtcdConfig, limit: u64) -> Result<(Self, Snapshot), OpenError> {
        let Loaded {
            client,
            keys,
            snapshot,
            high_water,
            revision,
        } = connect_and_load(config).await?;
        let kv = client.kv_client();
        info!(
            endpoints = %config.endpoints.join(","),
            prefix = %keys.root,
            ranges = snapshot.ranges.len(),
            workers = snapshot.workers.len(),
            high_water = high_water.map_or(0, |(hw, _)| hw),
            "opened the etcd store"
        );

        let epoch = Instant::now();
        let confirmed_ms = Arc::new(AtomicU64::new(0));
        let (updates_tx, updates_rx) = mpsc::unbounded_channel();
        let (reachable_tx, reachable) = watch::channel(true);
        let sync = RegistrationSync {
            client,
            keys: keys.clone(),
            timeout: config.timeout,
            epoch,
            confirmed_ms: confirmed_ms.clone(),
            updates: updates_tx,
            reachable: reachable_tx,
        };
        let sync_task = tokio::spawn(sync.run(revision));
        let store = Self {
            kv,
            keys,
            timeout: config.timeout,
            limit,
            staleness: config.staleness,
            high_water: tokio::sync::Mutex::new(high_water),
            confirmed_ms,
            epoch,
            updates: Mutex::new(Some(updates_rx)),
            reachable,
            sync_task,
        };
        Ok((store, snapshot))
    }

    async fn timed<T>(
        &self,
        operation: &'static str,
        call: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(result) => result.map_err(|error| unavailable(operation, error)),
            Err(_) => Err(StoreError::Timeout {
                operation,
                after: self.timeout,
            }),
        }
    }

    async fn put_worker(&self, worker: Arc<str>, value: String) -> Result<i64, StoreError> {
        let mut kv = self.kv.clone();
        let response = self
            .timed(
                "write the registration",
                kv.put(self.keys.worker(&worker), value, None),
            )
            .await?;
        Ok(response.header().map_or(0, |h| h.revision()))
    }

    async fn reserve_range(&self, r: Reservation) -> Result<RoomRange, StoreError> {
        let mut cached = self.high_water.lock().await;
        let hw_key = self.keys.high_water();
        let worker_key = self.keys.worker(&r.prefill_worker);
        let expected_worker = encode_worker(r.dp_size, true);
        for _ in 0..MAX_CAS_ATTEMPTS {
            let (high_water, revision) = match *cached {
                Some(seen) => seen,
                None => {
                    let mut kv = self.kv.clone();
                    let response = self
                        .timed("read the high-water mark", kv.get(hw_key.clone(), None))
                        .await?;
                    parse_high_water(response.kvs().first())?
                }
            };
            let range = RoomRange::reserve_after(
                high_water,
                r.dp_size,
                r.want_bases,
                r.need_bases,
                self.limit,
            )?;
            let record = encode_range(&RangeOwner {
                prefill_worker: r.prefill_worker.clone(),
                range,
                created_unix_ms: r.created_unix_ms,
            });
            let txn = Txn::new()
                .when([
                    unchanged_since(&hw_key, revision),
                    Compare::value(
                        worker_key.clone(),
                        CompareOp::Equal,
                        expected_worker.clone(),
                    ),
                ])
                .and_then([
                    TxnOp::put(hw_key.clone(), range.end().to_string(), None),
                    TxnOp::put(self.keys.range(range.start()), record, None),
                ])
                .or_else([
                    TxnOp::get(hw_key.clone(), None),
                    TxnOp::get(worker_key.clone(), None),
                ]);
            let mut kv = self.kv.clone();
            let response = match self.timed("reserve a range", kv.txn(txn)).await {
                Ok(response) => response,
                Err(error) => {
                    // Unknown outcome: the range may or may not be recorded.
                    // Never use it; reread the mark next time.
                    *cached = None;
                    return Err(error);
                }
            };
            if response.succeeded() {
                let revision = response.header().map_or(0, |h| h.revision());
                *cached = Some((range.end(), revision));
                return Ok(range);
            }
            let mut current_hw = None;
            let mut current_worker = None;
            for (i, op) in response.op_responses().into_iter().enumerate() {
                if let TxnOpResponse::Get(get) = op {
                    match i {
                        0 => current_hw = Some(parse_high_water(get.kvs().first())?),
                        _ => current_worker = Some(get.kvs().first().cloned()),
                    }
                }
            }
            *cached = current_hw;
            let worker_kv = current_worker.flatten();
            if worker_kv.as_ref().map(|kv| kv.value()) != Some(expected_worker.as_bytes()) {
                let record = worker_kv.and_then(|kv| worker_record(r.prefill_worker.clone(), &kv));
                return Err(StoreError::StaleRegistration {
                    worker: r.prefill_worker.clone(),
                    current: record.map(Box::new),
                });
            }
            debug!("high-water mark moved under us; retrying the reservation");
        }
        Err(StoreError::Contention {
            attempts: MAX_CAS_ATTEMPTS,
        })
    }

    async fn add_issued(&self, counts: Vec<IssuedCount>) -> Result<(), StoreError> {
        for count in counts.into_iter().filter(|c| c.since_open > 0) {
            let key = self.keys.issued(&count.prefill_worker);
            for _ in 0..MAX_CAS_ATTEMPTS {
                let mut kv = self.kv.clone();
                let current = self
                    .timed("read rooms_issued", kv.get(key.clone(), None))
                    .await?;
                let (old, guard) =
                    counter_guard(current.kvs().first(), &key).ok_or(StoreError::CorruptCounter)?;
                let new = old.saturating_add(count.since_open).to_string();
                let txn = Txn::new()
                    .when([guard])
                    .and_then([TxnOp::put(key.clone(), new, None)]);
                let mut kv = self.kv.clone();
                if self
                    .timed("write rooms_issued", kv.txn(txn))
                    .await?
                    .succeeded()
                {
                    break;
                }
            }
        }
        Ok(())
    }

    /// Deletes ranges created before `cutoff_unix_ms`, oldest first, and
    /// raises `pruned_below` in the same transaction.
    async fn prune_ranges(&self, cutoff_unix_ms: u64) -> Result<u64, StoreError> {
        const BATCH: i64 = 256;
        let prefix = self.keys.ranges();
        loop {
            let mut kv = self.kv.clone();
            let marker = self
                .timed("read pruned_below", kv.get(self.keys.pruned_below(), None))
                .await?;
            let (old_below, guard) = counter_guard(marker.kvs().first(), &self.keys.pruned_below())
                .ok_or(StoreError::CorruptCounter)?;
            let batch = self
                .timed(
                    "list old ranges",
                    kv.get(
                        prefix.clone(),
                        Some(GetOptions::new().with_prefix().with_limit(BATCH)),
                    ),
                )
                .await?;
            let mut deletes = Vec::new();
            let mut below = old_below;
            for kv in batch.kvs() {
                let Some(owner) = kv
                    .key_str()
                    .ok()
                    .and_then(|key| key.strip_prefix(&prefix))
                    .and_then(|start| decode_range(start, kv.value()))
                else {
                    continue;
                };
                // Ranges are reserved in order of start, so the first young
                // one ends the old ones (up to clock skew, which only delays).
                if owner.created_unix_ms >= cutoff_unix_ms {
                    break;
                }
                below = below.max(owner.range.end());
                deletes.push(TxnOp::delete(kv.key().to_vec(), None));
            }
            if deletes.is_empty() {
                return Ok(old_below);
            }
            let count = deletes.len();
            deletes.push(TxnOp::put(
                self.keys.pruned_below(),
                below.to_string(),
                None,
            ));
            let txn = Txn::new().when([guard]).and_then(deletes);
            if self.timed("prune ranges", kv.txn(txn)).await?.succeeded() {
                info!(
                    ranges = count,
                    pruned_below = below,
                    "pruned ranges past retention from etcd"
                );
                if i64::try_from(count).unwrap_or(i64::MAX) < BATCH {
                    return Ok(below);
                }
            }
        }
    }

    async fn find_range(&self, room: Room) -> Result<Option<RangeOwner>, StoreError> {
        let options = GetOptions::new()
            .with_range(self.keys.range(room.get().saturating_add(1)))
            .with_sort(SortTarget::Key, SortOrder::Descend)
            .with_limit(1);
        let mut kv = self.kv.clone();
        let response = self
            .timed("look up a range", kv.get(self.keys.range(0), Some(options)))
            .await?;
        let prefix = self.keys.ranges();
        Ok(response.kvs().first().and_then(|kv| {
            let key = kv.key_str().ok()?;
            let owner = decode_range(key.strip_prefix(&prefix)?, kv.value())?;
            owner.range.contains(room).then_some(owner)
        }))
    }
}

/// A connected client and everything under the prefix.
struct Loaded {
    client: Client,
    keys: Keys,
    snapshot: Snapshot,
    high_water: Option<(u64, i64)>,
    revision: i64,
}

async fn connect_and_load(config: &EtcdConfig) -> Result<Loaded, OpenError> {
    let endpoints = config.endpoints.join(",");
    let etcd_err = |source: etcd_client::Error| OpenError::Etcd {
        endpoints: endpoints.clone(),
        source,
    };
    let timeout_err = || OpenError::EtcdTimeout {
        endpoints: endpoints.clone(),
        after: config.timeout,
    };
    let mut options = ConnectOptions::new()
        .with_timeout(config.timeout)
        .with_connect_timeout(config.timeout)
        .with_keep_alive(Duration::from_secs(5), config.timeout);
    if let (Some(user), Some(password)) = (&config.username, &config.password) {
        options = options.with_user(user.clone(), password.clone());
    }
    if config.ca.is_some() || config.cert.is_some() {
        options = options.with_tls(tls_options(config)?);
    }
    let client = tokio::time::timeout(
        config.timeout,
        Client::connect(&config.endpoints, Some(options)),
    )
    .await
    .map_err(|_| timeout_err())?
    .map_err(etcd_err)?;
    let mut kv = client.kv_client();
    let keys = Keys::new(&config.prefix);
    let loaded = tokio::time::timeout(
        config.timeout,
        kv.get(keys.root.clone(), Some(GetOptions::new().with_prefix())),
    )
    .await
    .map_err(|_| timeout_err())?
    .map_err(etcd_err)?;
    let revision = loaded.header().map_or(0, |h| h.revision());
    let (snapshot, high_water) = parse_snapshot(&keys, loaded.kvs())?;
    Ok(Loaded {
        client,
        keys,
        snapshot,
        high_water,
        revision,
    })
}

/// What `migrate` moved into etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportReport {
    pub high_water: u64,
    pub ranges: usize,
    pub workers: usize,
}

/// Moves an embedded store's state into etcd so that no room issued before
/// can be issued again: first the high-water mark (compare-and-swap, only
/// ever raised), then the range records (so old rooms resolve) and the
/// registrations etcd does not have yet. Safe to run again.
pub async fn import(config: &EtcdConfig, embedded: &Snapshot) -> Result<ImportReport, OpenError> {
    let Loaded {
        client,
        keys,
        snapshot: existing,
        high_water,
        ..
    } = connect_and_load(config).await?;
    let endpoints = config.endpoints.join(",");
    let etcd_err = |source: etcd_client::Error| OpenError::Etcd {
        endpoints: endpoints.clone(),
        source,
    };
    let mut kv = client.kv_client();

    // Ranges already in etcd must be the same ones (a rerun), never others
    // over the same numbers: that would mean both stores issued them.
    let mut merged = RangeTable::default();
    for owner in existing.ranges.iter() {
        let _ = merged.insert(owner.clone());
    }
    for owner in embedded.ranges.iter() {
        let rerun = Room::try_new(owner.range.start())
            .ok()
            .and_then(|start| existing.ranges.resolve(start))
            .is_some_and(|other| other == owner);
        if !rerun {
            merged.insert(owner.clone()).map_err(|overlap| OpenError::CorruptKey {
                key: keys.range(overlap.other_start),
                reason: format!(
                    "etcd already holds a range over the embedded store's {}..{}; both stores issued those numbers, so refusing to merge them",
                    overlap.start, overlap.end
                ),
            })?;
        }
    }

    let target = embedded
        .ranges
        .high_water()
        .max(embedded.pruned_below)
        .max(high_water.map_or(0, |(hw, _)| hw));
    let guard = unchanged_since(&keys.high_water(), high_water.map_or(0, |(_, rev)| rev));
    let raised = kv
        .txn(Txn::new().when([guard]).and_then([TxnOp::put(
            keys.high_water(),
            target.to_string(),
            None,
        )]))
        .await
        .map_err(etcd_err)?;
    if !raised.succeeded() {
        return Err(OpenError::CorruptKey {
            key: keys.high_water(),
            reason: "it changed while migrating: a replica is reserving; stop the replicas and run migrate again".into(),
        });
    }

    let mut ops = vec![TxnOp::put(
        keys.pruned_below(),
        existing.pruned_below.max(embedded.pruned_below).to_string(),
        None,
    )];
    for owner in embedded.ranges.iter() {
        ops.push(TxnOp::put(
            keys.range(owner.range.start()),
            encode_range(owner),
            None,
        ));
    }
    let known: std::collections::HashSet<&str> = existing
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
        ops.push(TxnOp::put(
            keys.worker(&worker.prefill_worker),
            encode_worker(worker.dp_size, worker.registered),
            None,
        ));
        ops.push(TxnOp::put(
            keys.issued(&worker.prefill_worker),
            worker.rooms_issued.to_string(),
            None,
        ));
    }
    // etcd caps a transaction at 128 operations by default.
    while !ops.is_empty() {
        let batch: Vec<TxnOp> = ops.drain(..ops.len().min(100)).collect();
        kv.txn(Txn::new().and_then(batch)).await.map_err(etcd_err)?;
    }
    Ok(ImportReport {
        high_water: target,
        ranges: embedded.ranges.len(),
        workers,
    })
}

fn tls_options(config: &EtcdConfig) -> Result<TlsOptions, OpenError> {
    let read = |path: &PathBuf| {
        std::fs::read(path).map_err(|source| OpenError::Io {
            path: path.clone(),
            source,
        })
    };
    let mut tls = TlsOptions::new();
    if let Some(ca) = &config.ca {
        tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
    }
    match (&config.cert, &config.key) {
        (Some(cert), Some(key)) => {
            tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        (None, None) => {}
        (Some(path), None) | (None, Some(path)) => {
            return Err(OpenError::Io {
                path: path.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "--etcd-cert and --etcd-key go together; pass both",
                ),
            })
        }
    }
    Ok(tls)
}

/// A decimal counter key's value and the compare that guards its update
/// (unchanged since read, or still absent); `None` if it is not a number.
pub(crate) fn counter_guard(
    kv: Option<&etcd_client::KeyValue>,
    key: &str,
) -> Option<(u64, Compare)> {
    Some(match kv {
        Some(kv) => (
            parse_decimal(kv.value())?,
            unchanged_since(key, kv.mod_revision()),
        ),
        None => (0, unchanged_since(key, 0)),
    })
}

/// The compare that `key` still has `mod_revision` (0: it still does not exist).
fn unchanged_since(key: &str, mod_revision: i64) -> Compare {
    if mod_revision == 0 {
        Compare::create_revision(key, CompareOp::Equal, 0)
    } else {
        Compare::mod_revision(key, CompareOp::Equal, mod_revision)
    }
}

fn parse_decimal(value: &[u8]) -> Option<u64> {
    std::str::from_utf8(value).ok()?.parse().ok()
}

fn parse_high_water(kv: Option<&etcd_client::KeyValue>) -> Result<(u64, i64), StoreError> {
    match kv {
        None => Ok((crate::space::SPACE_START, 0)),
        Some(kv) => parse_decimal(kv.value())
            .map(|hw| (hw, kv.mod_revision()))
            .ok_or(StoreError::CorruptCounter),
    }
}

fn parse_snapshot(
    keys: &Keys,
    kvs: &[etcd_client::KeyValue],
) -> Result<(Snapshot, Option<(u64, i64)>), OpenError> {
    let corrupt = |key: &str, reason: &str| OpenError::CorruptKey {
        key: key.to_owned(),
        reason: reason.to_owned(),
    };
    let mut ranges = RangeTable::default();
    let mut workers = std::collections::BTreeMap::new();
    let mut issued = std::collections::HashMap::new();
    let mut high_water = None;
    let mut pruned_below = 0;
    for kv in kvs {
        let key = kv
            .key_str()
            .map_err(|_| corrupt("(binary key)", "not UTF-8"))?;
        let Some(name) = key.strip_prefix(&keys.root) else {
            continue;
        };
        if name == "pruned_below" {
            pruned_below =
                parse_decimal(kv.value()).ok_or_else(|| corrupt(key, "not a decimal number"))?;
        } else if name == "high_water" {
            high_water =
                Some(parse_high_water(Some(kv)).map_err(|_| corrupt(key, "not a decimal number"))?);
        } else if let Some(start) = name.strip_prefix("ranges/") {
            let owner = decode_range(start, kv.value())
                .ok_or_else(|| corrupt(key, "not a valid, aligned range record"))?;
            ranges
                .insert(owner)
                .map_err(|overlap| corrupt(key, &overlap.to_string()))?;
        } else if let Some(worker) = name.strip_prefix("workers/") {
            let record = worker_record(Arc::from(worker), kv)
                .ok_or_else(|| corrupt(key, "not a valid registration"))?;
            workers.insert(worker.to_owned(), record);
        } else if let Some(worker) = name.strip_prefix("issued/") {
            let count =
                parse_decimal(kv.value()).ok_or_else(|| corrupt(key, "not a decimal number"))?;
            issued.insert(worker.to_owned(), count);
        }
    }
    let hw = high_water.map_or(crate::space::SPACE_START, |(hw, _)| hw);
    if ranges.high_water() > hw {
        return Err(corrupt(
            &keys.high_water(),
            &format!(
                "the high-water mark {hw} is below the reserved range ending at {}",
                ranges.high_water()
            ),
        ));
    }
    let workers = workers
        .into_iter()
        .map(|(name, record)| WorkerRecord {
            rooms_issued: issued.get(&name).copied().unwrap_or(0),
            ..record
        })
        .collect();
    Ok((
        Snapshot {
            workers,
            ranges,
            pruned_below,
        },
        high_water,
    ))
}

/// Follows `v1/workers/`: a watch for promptness, a reread every
/// [`RESYNC_INTERVAL`] to confirm freshness and catch anything missed.
struct RegistrationSync {
    client: Client,
    keys: Keys,
    timeout: Duration,
    epoch: Instant,
    confirmed_ms: Arc<AtomicU64>,
    updates: mpsc::UnboundedSender<WorkerRecord>,
    reachable: watch::Sender<bool>,
}

impl RegistrationSync {
    async fn run(self, mut revision: i64) {
        let mut ticker = tokio::time::interval(RESYNC_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let started = tokio::time::timeout(
                self.timeout,
                self.client.watch_client().watch(
                    self.keys.workers(),
                    Some(
                        WatchOptions::new()
                            .with_prefix()
                            .with_start_revision(revision + 1),
                    ),
                ),
            )
            .await;
            let mut stream = match started {
                Ok(Ok((_watcher, stream))) => Some(stream),
                _ => None,
            };
            loop {
                tokio::select! {
                    message = async {
                        match stream.as_mut() {
                            Some(stream) => stream.message().await,
                            None => std::future::pending().await,
                        }
                    } => match message {
                        Ok(Some(response)) if !response.canceled() => {
                            for event in response.events() {
                                if let Some(kv) = event.kv() {
                                    revision = revision.max(kv.mod_revision());
                                    self.send(kv);
                                }
                            }
                        }
                        // Broken or cancelled (e.g. compacted): watch anew.
                        _ => break,
                    },
                    _ = ticker.tick() => {
                        match self.resync().await {
                            Some(seen) => {
                                revision = revision.max(seen);
                                if stream.is_none() {
                                    break;
                                }
                            }
                            None => {
                                stream = None;
                            }
                        }
                    }
                }
            }
        }
    }

    /// Rereads every registration; returns the read's revision on success.
    async fn resync(&self) -> Option<i64> {
        let started = self.elapsed_ms();
        let mut kv = self.client.kv_client();
        let read = tokio::time::timeout(
            self.timeout,
            kv.get(self.keys.workers(), Some(GetOptions::new().with_prefix())),
        )
        .await;
        match read {
            Ok(Ok(response)) => {
                for kv in response.kvs() {
                    self.send(kv);
                }
                self.confirmed_ms.fetch_max(started, Ordering::AcqRel);
                self.reachable
                    .send_if_modified(|up| !std::mem::replace(up, true));
                response.header().map(|h| h.revision())
            }
            failed => {
                let error = match failed {
                    Ok(Err(error)) => error.to_string(),
                    _ => format!("no answer within {:?}", self.timeout),
                };
                if self
                    .reachable
                    .send_if_modified(|up| std::mem::replace(up, false))
                {
                    warn!(%error, "etcd is unreachable; serving only from reserved ranges until the staleness window ends");
                }
                None
            }
        }
    }

    fn send(&self, kv: &etcd_client::KeyValue) {
        let Some(name) = kv
            .key_str()
            .ok()
            .and_then(|key| key.strip_prefix(&self.keys.workers()))
        else {
            return;
        };
        match worker_record(Arc::from(name), kv) {
            Some(record) => {
                let _ = self.updates.send(record);
            }
            None => warn!(worker = name, "ignoring an unreadable registration in etcd"),
        }
    }

    fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

impl Store for EtcdStore {
    fn kind(&self) -> &'static str {
        "etcd"
    }

    fn register(&self, prefill_worker: Arc<str>, dp_size: DpSize) -> StoreFuture<'_, i64> {
        Box::pin(self.put_worker(prefill_worker, encode_worker(dp_size, true)))
    }

    fn deregister(&self, prefill_worker: Arc<str>, dp_size: DpSize) -> StoreFuture<'_, i64> {
        Box::pin(self.put_worker(prefill_worker, encode_worker(dp_size, false)))
    }

    fn reserve(&self, reservation: Reservation) -> StoreFuture<'_, RoomRange> {
        Box::pin(self.reserve_range(reservation))
    }

    fn record_issued(&self, counts: Vec<IssuedCount>) -> StoreFuture<'_, ()> {
        Box::pin(self.add_issued(counts))
    }

    fn prune(&self, cutoff_unix_ms: u64) -> StoreFuture<'_, u64> {
        Box::pin(self.prune_ranges(cutoff_unix_ms))
    }

    fn lookup_worker(&self, prefill_worker: &str) -> StoreFuture<'_, Option<WorkerRecord>> {
        let key = self.keys.worker(prefill_worker);
        let name: Arc<str> = Arc::from(prefill_worker);
        Box::pin(async move {
            let mut kv = self.kv.clone();
            let response = self.timed("read a registration", kv.get(key, None)).await?;
            Ok(response
                .kvs()
                .first()
                .and_then(|kv| worker_record(name, kv)))
        })
    }

    fn lookup(&self, room: Room) -> StoreFuture<'_, Option<RangeOwner>> {
        Box::pin(self.find_range(room))
    }

    fn check_fresh(&self) -> Result<(), StoreError> {
        let confirmed = Duration::from_millis(self.confirmed_ms.load(Ordering::Acquire));
        let age = self.epoch.elapsed().saturating_sub(confirmed);
        if age > self.staleness {
            return Err(StoreError::Stale {
                age,
                window: self.staleness,
            });
        }
        Ok(())
    }

    fn take_updates(&self) -> Option<mpsc::UnboundedReceiver<WorkerRecord>> {
        self.updates
            .lock()
            .expect("updates lock is never poisoned")
            .take()
    }

    fn reachable(&self) -> Option<watch::Receiver<bool>> {
        Some(self.reachable.clone())
    }

    fn close(&self) -> StoreFuture<'_, ()> {
        self.sync_task.abort();
        Box::pin(async { Ok(()) })
    }
}
