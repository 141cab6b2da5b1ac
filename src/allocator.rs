//! The contract's rules over a [`Store`] and the room arithmetic of [`space`].
//!
//! Each worker owns a cursor over its current range and, once that is half
//! used, a second range reserved ahead in the background (double-buffering,
//! as in Meituan's Leaf), so callers wait on the store only if demand outruns
//! a whole range. Range sizes double while ranges last under
//! [`TARGET_RANGE_LIFETIME`] and halve when they last much longer, so a busy
//! worker fsyncs rarely and an idle one wastes little of the space.
//!
//! Invariants:
//! - A worker's cursors are always of its current dp_size: a realignment
//!   drops them, and a range reserved for an older size is discarded (its
//!   numbers are skipped, never reissued).
//! - A range enters the [`RangeTable`] before any room from it is handed out,
//!   so every room ever returned resolves.
//! - One reservation per worker is in flight at a time (`Worker::refill`),
//!   which also serializes registration changes with reservations.
//!
//! [`space`]: crate::space

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use thiserror::Error;
use tracing::{info, warn};

use prometheus_client::metrics::counter::Counter;

use crate::metrics::{MethodLabels, Metrics, StoreLabels};
use crate::space::{
    Base, BaseCursor, DpSize, RangeOwner, RangeTable, Rank, Room, RoomRange, SpaceError,
};
use crate::store::{unix_ms, IssuedCount, Reservation, Snapshot, Store, StoreError, WorkerRecord};

/// Longest prefill_worker accepted: a DNS name, the longest name routers use.
pub const MAX_WORKER_LEN: usize = 253;
/// Largest LeaseRooms block: a million bases is minutes of traffic for the
/// busiest router, and bounds what one call can take from the space.
pub const MAX_LEASE_COUNT: u32 = 1_000_000;
/// Smallest range reserved: a restart skips at most this many bases per worker.
const MIN_RANGE_BASES: u64 = 1024;
/// Largest range reserved: 2^26 bases is minutes of traffic at millions/s.
const MAX_RANGE_BASES: u64 = 1 << 26;
/// Ranges are sized to last about this long, so fsyncs stay rare.
const TARGET_RANGE_LIFETIME: Duration = Duration::from_secs(10);

/// Errors of the allocator. Each message says what was wrong and what to do.
#[derive(Debug, Error)]
pub enum Error {
    #[error("prefill_worker is empty; pass the prefill worker's name as routers know it")]
    EmptyWorker,
    #[error(
        "prefill_worker is {len} bytes, over the limit of {MAX_WORKER_LEN}; use a shorter name"
    )]
    WorkerTooLong { len: usize },
    #[error(transparent)]
    Space(#[from] SpaceError),
    #[error("count {count} is out of range; lease 1 to {MAX_LEASE_COUNT} bases at a time")]
    LeaseCount { count: u32 },
    #[error(
        "prefill_worker {worker:?} is not registered; call RegisterWorker first, or pass its dp_size in AllocateRoom"
    )]
    UnknownWorker { worker: String },
    #[error(
        "prefill_worker {worker:?} is registered with dp_size {registered}, not {requested}; refresh the router's view of the worker, or call RegisterWorker to realign it"
    )]
    DpSizeMismatch {
        worker: String,
        registered: u32,
        requested: u32,
    },
    #[error("room {room} was never issued: it lies in no reserved range")]
    UnknownRoom { room: u64 },
    #[error(
        "room {room} was issued more than the retention period ({retention:?}) ago and its range was pruned; rooms resolve for at least that long"
    )]
    Pruned { room: u64, retention: Duration },
    #[error("{limit} workers are registered, the configured --max-workers; deregister unused workers or raise the limit")]
    TooManyWorkers { limit: usize },
    #[error("the store cannot reserve rooms right now ({0}); retry with backoff")]
    Store(StoreError),
    #[error("{}; send `authorization: Bearer <token>` with the server's token", if *.presented { "the bearer token is wrong" } else { "this call needs a bearer token" })]
    Unauthenticated { presented: bool },
}

impl From<StoreError> for Error {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Space(space) => Error::Space(space),
            other => Error::Store(other),
        }
    }
}

/// A worker as clients see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerInfo {
    pub prefill_worker: String,
    pub dp_size: DpSize,
    pub rooms_issued: u64,
}

/// A block of leased bases: `first_base + i * dp_size` for `i < count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub first_base: Base,
    pub count: u32,
    pub dp_size: DpSize,
}

/// Who a room belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub prefill_worker: Arc<str>,
    pub dp_rank: Rank,
    pub dp_size: DpSize,
}

#[derive(Debug, Clone)]
pub struct Limits {
    /// Exclusive end of the space this allocator hands out.
    pub space_end: u64,
    pub max_workers: usize,
    /// Longest a call waits for the store before it gets UNAVAILABLE.
    pub store_timeout: Duration,
    /// Rooms come from a range for at most this long after it was reserved,
    /// and ranges are pruned once twice this old: every room resolves for at
    /// least this long.
    pub retention: Duration,
}

/// The allocator handle; clones share state.
#[derive(Clone)]
pub struct Allocator {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn Store>,
    workers: RwLock<HashMap<Arc<str>, Arc<Worker>>>,
    ranges: RwLock<RangeTable>,
    /// Ranges ending at or below this were pruned.
    pruned_below: AtomicU64,
    limits: Limits,
    metrics: Arc<Metrics>,
    /// Resolved once: label lookups would cost as much as the allocation.
    allocated_rooms: Counter,
    leased_bases: Counter,
}

struct Worker {
    name: Arc<str>,
    state: Mutex<WorkerState>,
    /// Held while a reservation or registration change for this worker is in
    /// flight; never held by the hot path.
    refill: tokio::sync::Mutex<()>,
}

#[derive(Debug)]
struct WorkerState {
    dp_size: DpSize,
    registered: bool,
    current: Option<Held>,
    next: Option<Held>,
    prefetching: bool,
    rooms_issued: u64,
    /// `rooms_issued` when the store was opened (what it already holds).
    rooms_issued_at_open: u64,
    /// Store revision of the registration in force; older updates are ignored.
    revision: i64,
    range_bases: u64,
    current_since: Instant,
}

/// A range being served, and when it was reserved (for retention).
#[derive(Debug)]
struct Held {
    cursor: BaseCursor,
    reserved_at: Instant,
}

impl Held {
    fn remaining(&self) -> u64 {
        self.cursor.remaining()
    }
}

/// What a caller needs from a worker's cursors.
#[derive(Debug, Clone, Copy)]
enum Demand {
    /// `count` consecutive bases.
    Bases(u64),
    /// A range reserved ahead; nothing is taken.
    Prefetch,
}

impl Worker {
    fn new(record: &WorkerRecord, now: Instant) -> Self {
        Self {
            name: record.prefill_worker.clone(),
            state: Mutex::new(WorkerState {
                dp_size: record.dp_size,
                registered: record.registered,
                current: None,
                next: None,
                prefetching: false,
                rooms_issued: record.rooms_issued,
                rooms_issued_at_open: record.rooms_issued,
                revision: record.revision,
                range_bases: MIN_RANGE_BASES,
                current_since: now,
            }),
            refill: tokio::sync::Mutex::new(()),
        }
    }
}

impl WorkerState {
    /// Applies a registration read from the store; true if anything changed.
    fn apply(&mut self, dp_size: DpSize, registered: bool, revision: i64) -> bool {
        self.revision = self.revision.max(revision);
        let changed = self.dp_size != dp_size || self.registered != registered;
        if changed {
            self.drop_ranges();
        }
        self.dp_size = dp_size;
        self.registered = registered;
        changed
    }

    fn lock(worker: &Worker) -> std::sync::MutexGuard<'_, WorkerState> {
        worker
            .state
            .lock()
            .expect("worker state lock is never poisoned: nothing panics while holding it")
    }

    /// Takes `count` consecutive bases, moving on to the reserved-ahead range
    /// when the current one cannot serve them. The rest of a range too short
    /// for a block is skipped, never reissued.
    fn take(&mut self, count: u64, now: Instant, retention: Duration) -> Option<Base> {
        // A range past retention is left: another replica may prune it soon.
        for held in [&mut self.current, &mut self.next] {
            if held
                .as_ref()
                .is_some_and(|h| now.saturating_duration_since(h.reserved_at) > retention)
            {
                *held = None;
            }
        }
        if let Some(base) = self
            .current
            .as_mut()
            .and_then(|c| c.cursor.take_block(count))
        {
            return Some(base);
        }
        if self.next.as_ref().is_some_and(|n| n.remaining() >= count) {
            self.current = self.next.take();
            self.current_since = now;
            return self
                .current
                .as_mut()
                .and_then(|c| c.cursor.take_block(count));
        }
        None
    }

    fn has(&self, demand: Demand) -> bool {
        match demand {
            Demand::Bases(count) => [&self.current, &self.next]
                .into_iter()
                .flatten()
                .any(|c| c.remaining() >= count),
            Demand::Prefetch => self.next.is_some(),
        }
    }

    /// True when the current range is half used and nothing is reserved ahead.
    fn wants_prefetch(&self) -> bool {
        let low = self
            .current
            .as_ref()
            .is_none_or(|c| c.remaining() <= c.cursor.range().bases() / 2);
        low && self.next.is_none() && !self.prefetching
    }

    /// Size of the next range: grows while ranges are used up quickly.
    fn next_range_bases(&mut self, now: Instant) -> u64 {
        let lifetime = now.saturating_duration_since(self.current_since);
        if lifetime < TARGET_RANGE_LIFETIME / 2 {
            self.range_bases = self.range_bases.saturating_mul(2);
        } else if lifetime > TARGET_RANGE_LIFETIME * 4 {
            self.range_bases /= 2;
        }
        self.range_bases = self.range_bases.clamp(MIN_RANGE_BASES, MAX_RANGE_BASES);
        self.range_bases
    }

    fn drop_ranges(&mut self) {
        self.current = None;
        self.next = None;
    }
}

impl Allocator {
    /// Builds the allocator over an opened store and what it holds.
    pub fn new(
        store: Arc<dyn Store>,
        snapshot: Snapshot,
        limits: Limits,
        metrics: Arc<Metrics>,
    ) -> Self {
        let now = Instant::now();
        let workers = snapshot
            .workers
            .into_iter()
            .map(|record| {
                let worker = Arc::new(Worker::new(&record, now));
                (record.prefill_worker, worker)
            })
            .collect();
        let counter = |method| {
            metrics
                .rooms_issued
                .get_or_create(&MethodLabels { method })
                .clone()
        };
        let (allocated_rooms, leased_bases) = (counter("AllocateRoom"), counter("LeaseRooms"));
        Self {
            inner: Arc::new(Inner {
                store,
                workers: RwLock::new(workers),
                ranges: RwLock::new(snapshot.ranges),
                pruned_below: AtomicU64::new(snapshot.pruned_below),
                limits,
                allocated_rooms,
                leased_bases,
                metrics,
            }),
        }
    }

    pub fn store_kind(&self) -> &'static str {
        self.inner.store.kind()
    }

    /// Whether the store can be reached, if it can tell.
    pub fn store_reachable(&self) -> Option<tokio::sync::watch::Receiver<bool>> {
        self.inner.store.reachable()
    }

    /// Registers `prefill_worker` with `dp_size`, or realigns it.
    pub async fn register(&self, prefill_worker: &str, dp_size: u32) -> Result<WorkerInfo, Error> {
        validate_worker(prefill_worker)?;
        let dp_size = DpSize::try_new(dp_size)?;
        let worker = self.worker_entry(prefill_worker)?;
        self.register_worker(&worker, dp_size).await
    }

    async fn register_worker(&self, worker: &Worker, dp_size: DpSize) -> Result<WorkerInfo, Error> {
        let _refill = worker.refill.lock().await;
        let unchanged = {
            let state = WorkerState::lock(worker);
            (state.registered && state.dp_size == dp_size).then(|| info_of(worker, &state))
        };
        if let Some(info) = unchanged {
            return Ok(info);
        }
        let revision = self
            .with_store(self.inner.store.register(worker.name.clone(), dp_size))
            .await?;
        let mut state = WorkerState::lock(worker);
        let old = state.registered.then_some(state.dp_size.get());
        state.apply(dp_size, true, revision);
        info!(worker = %worker.name, dp_size = dp_size.get(), old_dp_size = ?old, "registered worker");
        Ok(info_of(worker, &state))
    }

    /// One room for (`prefill_worker`, `dp_rank`); `dp_size` 0 means "as registered".
    pub async fn allocate(
        &self,
        prefill_worker: &str,
        dp_rank: u32,
        dp_size: u32,
    ) -> Result<(Room, DpSize), Error> {
        let (base, dp_size, rank) = self
            .take_bases(prefill_worker, dp_size, 1, |dp_size| {
                Rank::try_new(dp_rank, dp_size).map_err(Error::from)
            })
            .await?;
        self.inner.allocated_rooms.inc();
        Ok((base.room(rank), dp_size))
    }

    /// A block of `count` bases for `prefill_worker`.
    pub async fn lease(&self, prefill_worker: &str, count: u32) -> Result<Lease, Error> {
        if count == 0 || count > MAX_LEASE_COUNT {
            validate_worker(prefill_worker)?;
            return Err(Error::LeaseCount { count });
        }
        let (first_base, dp_size, ()) = self
            .take_bases(prefill_worker, 0, u64::from(count), |_| Ok(()))
            .await?;
        self.inner.leased_bases.inc_by(u64::from(count));
        Ok(Lease {
            first_base,
            count,
            dp_size,
        })
    }

    /// Takes `count` bases for the worker, registering it first when the
    /// caller named a dp_size for an unknown worker. `check` validates the
    /// request against the dp_size in force, under the same lock as the take,
    /// so a concurrent realignment cannot slip between them.
    async fn take_bases<T>(
        &self,
        prefill_worker: &str,
        requested_dp_size: u32,
        count: u64,
        check: impl Fn(DpSize) -> Result<T, Error>,
    ) -> Result<(Base, DpSize, T), Error> {
        validate_worker(prefill_worker)?;
        let requested = match requested_dp_size {
            0 => None,
            n => Some(DpSize::try_new(n)?),
        };
        if let Some(dp_size) = requested {
            // Reject a bad request before it registers anyone.
            check(dp_size)?;
        }
        // A worker this replica does not know as registered is looked up in
        // the store once before any decision: another replica may have just
        // registered it, and then its dp_size, not the caller's, is in force.
        let mut asked_store = false;
        let worker = match (self.worker(prefill_worker), requested) {
            (Some(worker), _) => worker,
            (None, Some(_)) => self.worker_entry(prefill_worker)?,
            (None, None) => {
                asked_store = true;
                self.learn(prefill_worker).await?;
                self.worker(prefill_worker)
                    .ok_or_else(|| unknown(prefill_worker))?
            }
        };
        loop {
            let now = Instant::now();
            let mut register_with = None;
            let mut ask_store = false;
            {
                let mut state = WorkerState::lock(&worker);
                match (state.registered, requested) {
                    (false, _) if !asked_store => ask_store = true,
                    (false, None) => return Err(unknown(prefill_worker)),
                    (false, Some(dp_size)) => register_with = Some(dp_size),
                    (true, Some(dp_size)) if dp_size != state.dp_size => {
                        return Err(Error::DpSizeMismatch {
                            worker: prefill_worker.to_owned(),
                            registered: state.dp_size.get(),
                            requested: dp_size.get(),
                        })
                    }
                    (true, _) => {
                        let checked = check(state.dp_size)?;
                        self.inner.store.check_fresh().map_err(Error::Store)?;
                        if let Some(base) = state.take(count, now, self.inner.limits.retention) {
                            state.rooms_issued += count;
                            let dp_size = state.dp_size;
                            if state.wants_prefetch() {
                                state.prefetching = true;
                                drop(state);
                                self.spawn_prefetch(worker.clone());
                            }
                            return Ok((base, dp_size, checked));
                        }
                    }
                }
            }
            if ask_store {
                asked_store = true;
                self.learn(prefill_worker).await?;
                continue;
            }
            match register_with {
                Some(dp_size) => {
                    self.register_worker(&worker, dp_size).await?;
                }
                None => self.refill(&worker, Demand::Bases(count)).await?,
            }
        }
    }

    fn spawn_prefetch(&self, worker: Arc<Worker>) {
        let allocator = self.clone();
        tokio::spawn(async move {
            if let Err(error) = allocator.refill(&worker, Demand::Prefetch).await {
                // Callers will retry the reservation themselves when the
                // current range runs dry, and get the error then.
                warn!(worker = %worker.name, %error, "reserving a range ahead failed");
            }
            WorkerState::lock(&worker).prefetching = false;
        });
    }

    /// Reserves a range for `worker` unless one that meets `demand` appeared
    /// while waiting for the worker's refill lock.
    async fn refill(&self, worker: &Worker, demand: Demand) -> Result<(), Error> {
        let timeout = self.inner.limits.store_timeout;
        tokio::time::timeout(timeout, self.refill_locked(worker, demand))
            .await
            .unwrap_or(Err(Error::Store(StoreError::Timeout {
                operation: "reserve a range",
                after: timeout,
            })))
    }

    async fn refill_locked(&self, worker: &Worker, demand: Demand) -> Result<(), Error> {
        let _refill = worker.refill.lock().await;
        let reservation = {
            let mut state = WorkerState::lock(worker);
            if !state.registered {
                return Err(unknown(&worker.name));
            }
            if state.has(demand) {
                return Ok(());
            }
            let need = match demand {
                Demand::Bases(count) => count,
                Demand::Prefetch => 1,
            };
            let want = state.next_range_bases(Instant::now()).max(need);
            Reservation {
                prefill_worker: worker.name.clone(),
                dp_size: state.dp_size,
                want_bases: want,
                need_bases: need,
                rooms_issued: state.rooms_issued,
                created_unix_ms: unix_ms(),
            }
        };
        let dp_size = reservation.dp_size;
        let created_unix_ms = reservation.created_unix_ms;
        let reserved_at = Instant::now();
        let range = match self.inner.store.reserve(reservation).await {
            Err(StoreError::StaleRegistration {
                worker: name,
                current,
            }) => {
                // Another replica changed the registration: follow it, and let
                // the caller look again under the new one.
                let mut state = WorkerState::lock(worker);
                let changed = match current {
                    Some(record) => state.apply(record.dp_size, record.registered, record.revision),
                    None => {
                        let (dp_size, revision) = (state.dp_size, state.revision);
                        state.apply(dp_size, false, revision)
                    }
                };
                info!(worker = %name, dp_size = state.dp_size.get(), registered = state.registered, "registration changed on another replica");
                if changed {
                    return Ok(());
                }
                return Err(Error::Store(StoreError::StaleRegistration {
                    worker: name,
                    current: None,
                }));
            }
            other => self.with_store(std::future::ready(other)).await?,
        };
        self.inner
            .metrics
            .ranges_reserved
            .get_or_create(&StoreLabels {
                store: self.inner.store.kind(),
            })
            .inc();
        info!(
            worker = %worker.name,
            dp_size = dp_size.get(),
            start = range.start(),
            end = range.end(),
            bases = range.bases(),
            "reserved range"
        );
        self.record_range(&worker.name, range, created_unix_ms)?;
        let mut state = WorkerState::lock(worker);
        // The refill lock kept registration changes out, so dp_size holds.
        debug_assert_eq!(state.dp_size, dp_size);
        let cursor = Held {
            cursor: range.cursor(),
            reserved_at,
        };
        match &state.current {
            Some(current) if current.remaining() > 0 => state.next = Some(cursor),
            _ => {
                state.current = Some(cursor);
                state.current_since = Instant::now();
            }
        }
        Ok(())
    }

    fn record_range(
        &self,
        worker: &Arc<str>,
        range: RoomRange,
        created_unix_ms: u64,
    ) -> Result<(), Error> {
        let mut ranges = self
            .inner
            .ranges
            .write()
            .expect("range table lock is never poisoned");
        ranges
            .insert(RangeOwner {
                prefill_worker: worker.clone(),
                range,
                created_unix_ms,
            })
            .map_err(|overlap| {
                // The store broke its one promise; refuse to serve from it.
                warn!(%overlap, "store returned a range that overlaps a reserved one");
                Error::Store(StoreError::Closed)
            })
    }

    /// Which worker, rank and dp_size `room` was issued for.
    pub async fn resolve(&self, room: u64) -> Result<Resolved, Error> {
        let room = Room::try_new(room)?;
        let known = self
            .inner
            .ranges
            .read()
            .expect("range table lock is never poisoned")
            .resolve(room)
            .cloned();
        let owner = match known {
            Some(owner) => owner,
            None => {
                // Another replica may have reserved it; remember what we learn.
                let found = self.with_store(self.inner.store.lookup(room)).await?;
                let owner = found.ok_or_else(|| {
                    if room.get() < self.inner.pruned_below.load(Ordering::Acquire) {
                        Error::Pruned {
                            room: room.get(),
                            retention: self.inner.limits.retention,
                        }
                    } else {
                        Error::UnknownRoom { room: room.get() }
                    }
                })?;
                let _ = self
                    .inner
                    .ranges
                    .write()
                    .expect("range table lock is never poisoned")
                    .insert(owner.clone());
                owner
            }
        };
        let dp_size = owner.range.dp_size();
        Ok(Resolved {
            prefill_worker: owner.prefill_worker.clone(),
            dp_rank: room.rank(dp_size),
            dp_size,
        })
    }

    /// Prunes ranges reserved more than twice the retention period ago.
    pub async fn prune_expired(&self) -> Result<(), Error> {
        let retention_ms =
            u64::try_from(self.inner.limits.retention.as_millis()).unwrap_or(u64::MAX);
        let cutoff = unix_ms().saturating_sub(retention_ms.saturating_mul(2));
        let below = self.with_store(self.inner.store.prune(cutoff)).await?;
        self.inner.pruned_below.fetch_max(below, Ordering::AcqRel);
        let pruned_here = self
            .inner
            .ranges
            .write()
            .expect("range table lock is never poisoned")
            .prune(cutoff);
        self.inner
            .pruned_below
            .fetch_max(pruned_here, Ordering::AcqRel);
        Ok(())
    }

    /// Prunes expired ranges every quarter of the retention period (between
    /// 1 s and 10 min) until the store closes.
    pub fn run_retention(&self) {
        let interval = (self.inner.limits.retention / 4)
            .clamp(Duration::from_secs(1), Duration::from_secs(600));
        let allocator = self.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                match allocator.prune_expired().await {
                    Ok(()) => {}
                    Err(Error::Store(StoreError::Closed)) => return,
                    Err(error) => warn!(%error, "pruning expired ranges failed; will retry"),
                }
            }
        });
    }

    /// Follows registration changes made elsewhere (other replicas), if the
    /// store reports any. Runs until the store closes.
    pub fn follow_store(&self) {
        let Some(mut updates) = self.inner.store.take_updates() else {
            return;
        };
        let allocator = self.clone();
        tokio::spawn(async move {
            while let Some(record) = updates.recv().await {
                allocator.apply_update(record);
            }
        });
    }

    /// Applies what the store holds for a worker this replica does not know
    /// as registered (single-writer stores have nothing more to say).
    async fn learn(&self, prefill_worker: &str) -> Result<(), Error> {
        let stored = self
            .with_store(self.inner.store.lookup_worker(prefill_worker))
            .await?;
        if let Some(record) = stored {
            self.apply_update(record);
        }
        Ok(())
    }

    fn apply_update(&self, record: WorkerRecord) {
        let worker = match self.worker_entry(&record.prefill_worker) {
            Ok(worker) => worker,
            Err(error) => {
                warn!(worker = %record.prefill_worker, %error, "cannot follow a registration");
                return;
            }
        };
        let mut state = WorkerState::lock(&worker);
        if record.revision <= state.revision {
            return;
        }
        let old = (state.dp_size.get(), state.registered);
        if state.apply(record.dp_size, record.registered, record.revision) {
            info!(
                worker = %worker.name,
                dp_size = record.dp_size.get(),
                registered = record.registered,
                old_dp_size = old.0,
                was_registered = old.1,
                "registration changed in the store"
            );
        }
    }

    /// Registered workers, sorted by name.
    pub fn list(&self) -> Vec<WorkerInfo> {
        let workers: Vec<Arc<Worker>> = self.read_workers().values().cloned().collect();
        let mut infos: Vec<WorkerInfo> = workers
            .iter()
            .filter_map(|worker| {
                let state = WorkerState::lock(worker);
                state.registered.then(|| info_of(worker, &state))
            })
            .collect();
        infos.sort_by(|a, b| a.prefill_worker.cmp(&b.prefill_worker));
        infos
    }

    /// Stops new rooms for `prefill_worker`; its rooms still resolve.
    pub async fn deregister(&self, prefill_worker: &str) -> Result<(), Error> {
        validate_worker(prefill_worker)?;
        let known = self
            .worker(prefill_worker)
            .is_some_and(|worker| WorkerState::lock(&worker).registered);
        if !known {
            // Registered on another replica a moment ago, perhaps.
            self.learn(prefill_worker).await?;
        }
        let worker = self
            .worker(prefill_worker)
            .ok_or_else(|| unknown(prefill_worker))?;
        let _refill = worker.refill.lock().await;
        let dp_size = {
            let state = WorkerState::lock(&worker);
            if !state.registered {
                return Err(unknown(prefill_worker));
            }
            state.dp_size
        };
        let revision = self
            .with_store(self.inner.store.deregister(worker.name.clone(), dp_size))
            .await?;
        WorkerState::lock(&worker).apply(dp_size, false, revision);
        info!(worker = %worker.name, "deregistered worker");
        Ok(())
    }

    /// Persists the `rooms_issued` counters and closes the store.
    pub async fn shutdown(&self) -> Result<(), Error> {
        let counts = self
            .read_workers()
            .values()
            .map(|worker| {
                let state = WorkerState::lock(worker);
                IssuedCount {
                    prefill_worker: worker.name.clone(),
                    total: state.rooms_issued,
                    since_open: state.rooms_issued - state.rooms_issued_at_open,
                }
            })
            .collect();
        let recorded = self.inner.store.record_issued(counts).await;
        self.inner.store.close().await?;
        recorded.map_err(Error::from)
    }

    async fn with_store<T>(
        &self,
        operation: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, Error> {
        operation.await.map_err(|error| {
            if !matches!(error, StoreError::Space(_)) {
                warn!(store = self.inner.store.kind(), %error, "store operation failed");
                self.inner
                    .metrics
                    .store_errors
                    .get_or_create(&StoreLabels {
                        store: self.inner.store.kind(),
                    })
                    .inc();
            }
            Error::from(error)
        })
    }

    fn read_workers(&self) -> std::sync::RwLockReadGuard<'_, HashMap<Arc<str>, Arc<Worker>>> {
        self.inner
            .workers
            .read()
            .expect("worker map lock is never poisoned")
    }

    fn worker(&self, prefill_worker: &str) -> Option<Arc<Worker>> {
        self.read_workers().get(prefill_worker).cloned()
    }

    /// The worker's entry, created unregistered if new.
    fn worker_entry(&self, prefill_worker: &str) -> Result<Arc<Worker>, Error> {
        if let Some(worker) = self.worker(prefill_worker) {
            return Ok(worker);
        }
        let mut workers = self
            .inner
            .workers
            .write()
            .expect("worker map lock is never poisoned");
        if let Some(worker) = workers.get(prefill_worker) {
            return Ok(worker.clone());
        }
        if workers.len() >= self.inner.limits.max_workers {
            return Err(Error::TooManyWorkers {
                limit: self.inner.limits.max_workers,
            });
        }
        let name: Arc<str> = Arc::from(prefill_worker);
        let unregistered = WorkerRecord {
            prefill_worker: name.clone(),
            dp_size: DpSize::try_new(1).expect("1 is a valid dp_size"),
            registered: false,
            rooms_issued: 0,
            revision: 0,
        };
        let worker = Arc::new(Worker::new(&unregistered, Instant::now()));
        workers.insert(name, worker.clone());
        Ok(worker)
    }
}

fn info_of(worker: &Worker, state: &WorkerState) -> WorkerInfo {
    WorkerInfo {
        prefill_worker: worker.name.to_string(),
        dp_size: state.dp_size,
        rooms_issued: state.rooms_issued,
    }
}

fn unknown(prefill_worker: &str) -> Error {
    Error::UnknownWorker {
        worker: prefill_worker.to_owned(),
    }
}

fn validate_worker(prefill_worker: &str) -> Result<(), Error> {
    match prefill_worker.len() {
        0 => Err(Error::EmptyWorker),
        len if len > MAX_WORKER_LEN => Err(Error::WorkerTooLong { len }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::space::MAX_ROOM;
    use crate::store::EmbeddedStore;
    use proptest::prelude::*;
    use std::collections::BTreeMap;
    use std::path::Path;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// Wraps the embedded store and fails every write after the first `budget`,
    /// as a full disk would.
    struct FailingStore {
        inner: EmbeddedStore,
        budget: AtomicU64,
    }

    impl FailingStore {
        fn spend(&self) -> Result<(), StoreError> {
            let ok = self
                .budget
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| b.checked_sub(1))
                .is_ok();
            ok.then_some(()).ok_or_else(|| StoreError::Io {
                path: "rooms.log".into(),
                source: Arc::new(std::io::Error::from_raw_os_error(28)),
            })
        }
    }

    impl Store for FailingStore {
        fn kind(&self) -> &'static str {
            "failing"
        }
        fn register(&self, w: Arc<str>, d: DpSize) -> crate::store::StoreFuture<'_, i64> {
            match self.spend() {
                Ok(()) => self.inner.register(w, d),
                Err(e) => Box::pin(async move { Err(e) }),
            }
        }
        fn deregister(&self, w: Arc<str>, d: DpSize) -> crate::store::StoreFuture<'_, i64> {
            match self.spend() {
                Ok(()) => self.inner.deregister(w, d),
                Err(e) => Box::pin(async move { Err(e) }),
            }
        }
        fn reserve(&self, r: Reservation) -> crate::store::StoreFuture<'_, RoomRange> {
            match self.spend() {
                Ok(()) => self.inner.reserve(r),
                Err(e) => Box::pin(async move { Err(e) }),
            }
        }
        fn prune(&self, cutoff: u64) -> crate::store::StoreFuture<'_, u64> {
            self.inner.prune(cutoff)
        }
        fn record_issued(&self, c: Vec<IssuedCount>) -> crate::store::StoreFuture<'_, ()> {
            self.inner.record_issued(c)
        }
        fn close(&self) -> crate::store::StoreFuture<'_, ()> {
            self.inner.close()
        }
    }

    fn open(dir: &Path, budget: u64, space_end: u64) -> Allocator {
        open_with(dir, budget, space_end, 16)
    }

    fn open_with(dir: &Path, budget: u64, space_end: u64, max_workers: usize) -> Allocator {
        let (store, snapshot) = EmbeddedStore::open(dir, space_end).expect("open store");
        let store = FailingStore {
            inner: store,
            budget: AtomicU64::new(budget),
        };
        Allocator::new(
            Arc::new(store),
            snapshot,
            Limits {
                space_end,
                max_workers,
                store_timeout: Duration::from_secs(5),
                retention: Duration::from_secs(86_400),
            },
            Arc::new(Metrics::new()),
        )
    }

    #[derive(Debug, Clone)]
    enum Op {
        Register(usize, u32),
        Allocate(usize, u32, u32),
        Lease(usize, u32),
        Resolve(u64),
        Deregister(usize),
        Restart,
    }

    const WORKERS: [&str; 5] = ["a", "b", "c", "d", "e"];

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            2 => (0..5usize, 0u32..6).prop_map(|(w, d)| Op::Register(w, d)),
            8 => (0..5usize, 0u32..6, 0u32..6).prop_map(|(w, r, d)| Op::Allocate(w, r, d)),
            2 => (0..5usize, 0u32..3000).prop_map(|(w, c)| Op::Lease(w, c)),
            2 => (0u64..40_000).prop_map(Op::Resolve),
            1 => (0..5usize).prop_map(Op::Deregister),
            1 => Just(Op::Restart),
        ]
    }

    /// What the contract says must hold, kept the simplest way.
    #[derive(Default)]
    struct Model {
        /// Registered workers and their dp_size.
        workers: BTreeMap<&'static str, u32>,
        /// Every number handed out (a room, or every room of a leased base),
        /// with its owner and dp_size.
        issued: BTreeMap<u64, (&'static str, u32)>,
    }

    impl Model {
        fn issue(&mut self, number: u64, owner: (&'static str, u32)) -> Result<(), TestCaseError> {
            prop_assert!(
                self.issued.insert(number, owner).is_none(),
                "number {number} handed out twice"
            );
            Ok(())
        }
    }

    fn run_ops(ops: Vec<Op>, budget: u64, space_end: u64) -> Result<(), TestCaseError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let mut allocator = open(dir.path(), budget, space_end);
            let mut model = Model::default();
            for op in ops {
                match op {
                    Op::Register(w, d) => {
                        let name = WORKERS[w];
                        let result = allocator.register(name, d).await;
                        match result {
                            Ok(info) => {
                                prop_assert_eq!(info.dp_size.get(), d);
                                model.workers.insert(name, d);
                            }
                            Err(Error::Space(SpaceError::DpSizeZero)) => prop_assert_eq!(d, 0),
                            Err(Error::Store(_)) => {}
                            Err(other) => prop_assert!(false, "register: {other}"),
                        }
                    }
                    Op::Allocate(w, r, d) => {
                        let name = WORKERS[w];
                        let registered = model.workers.get(name).copied();
                        match allocator.allocate(name, r, d).await {
                            Ok((room, dp_size)) => {
                                let size = dp_size.get();
                                prop_assert!(registered.is_none_or(|s| s == size));
                                prop_assert!(d == 0 || d == size);
                                prop_assert_eq!(room.get() % u64::from(size), u64::from(r));
                                prop_assert!(room.get() >= 1 && room.get() <= MAX_ROOM);
                                model.workers.insert(name, size);
                                model.issue(room.get(), (name, size))?;
                            }
                            Err(Error::UnknownWorker { .. }) => {
                                prop_assert!(registered.is_none() && d == 0)
                            }
                            Err(Error::DpSizeMismatch {
                                registered: reg,
                                requested,
                                ..
                            }) => {
                                prop_assert_eq!(Some(reg), registered);
                                prop_assert_eq!(requested, d);
                            }
                            Err(Error::Space(SpaceError::RankOutOfRange { dp_size, .. })) => {
                                prop_assert!(r >= dp_size);
                            }
                            Err(
                                error @ (Error::Space(SpaceError::Exhausted { .. })
                                | Error::Store(_)),
                            ) => {
                                if matches!(error, Error::Space(_)) {
                                    prop_assert!(space_end <= MAX_ROOM);
                                }
                                // A registration by dp_size is durable before the
                                // reservation that failed; take it from the truth.
                                if registered.is_none() && d != 0 {
                                    if let Some(info) = allocator
                                        .list()
                                        .into_iter()
                                        .find(|i| i.prefill_worker == name)
                                    {
                                        prop_assert_eq!(info.dp_size.get(), d);
                                        model.workers.insert(name, d);
                                    }
                                }
                            }
                            Err(other) => prop_assert!(false, "allocate: {other}"),
                        }
                    }
                    Op::Lease(w, count) => {
                        let name = WORKERS[w];
                        match allocator.lease(name, count).await {
                            Ok(lease) => {
                                let size = lease.dp_size.get();
                                prop_assert_eq!(Some(size), model.workers.get(name).copied());
                                prop_assert_eq!(lease.first_base.get() % u64::from(size), 0);
                                for i in 0..u64::from(count) {
                                    let base = lease.first_base.get() + i * u64::from(size);
                                    for rank in 0..u64::from(size) {
                                        model.issue(base + rank, (name, size))?;
                                    }
                                }
                            }
                            Err(Error::LeaseCount { .. }) => prop_assert_eq!(count, 0),
                            Err(Error::UnknownWorker { .. }) => {
                                prop_assert!(!model.workers.contains_key(name))
                            }
                            Err(Error::Space(SpaceError::Exhausted { .. })) => {
                                prop_assert!(space_end <= MAX_ROOM)
                            }
                            Err(Error::Store(_)) => {}
                            Err(other) => prop_assert!(false, "lease: {other}"),
                        }
                    }
                    Op::Resolve(room) => match allocator.resolve(room).await {
                        Ok(resolved) => {
                            if let Some((name, size)) = model.issued.get(&room) {
                                prop_assert_eq!(&*resolved.prefill_worker, *name);
                                prop_assert_eq!(resolved.dp_size.get(), *size);
                                prop_assert_eq!(
                                    u64::from(resolved.dp_rank.get()),
                                    room % u64::from(*size)
                                );
                            }
                        }
                        Err(Error::Space(SpaceError::RoomZero)) => prop_assert_eq!(room, 0),
                        Err(Error::UnknownRoom { .. }) => {
                            prop_assert!(!model.issued.contains_key(&room))
                        }
                        Err(other) => prop_assert!(false, "resolve: {other}"),
                    },
                    Op::Deregister(w) => {
                        let name = WORKERS[w];
                        match allocator.deregister(name).await {
                            Ok(()) => {
                                prop_assert!(model.workers.remove(name).is_some())
                            }
                            Err(Error::UnknownWorker { .. }) => {
                                prop_assert!(!model.workers.contains_key(name))
                            }
                            Err(Error::Store(_)) => {}
                            Err(other) => prop_assert!(false, "deregister: {other}"),
                        }
                    }
                    Op::Restart => {
                        allocator.shutdown().await.expect("shutdown");
                        drop(allocator);
                        allocator = open(dir.path(), budget, space_end);
                        // Registrations survive the restart.
                        let listed: BTreeMap<String, u32> = allocator
                            .list()
                            .into_iter()
                            .map(|w| (w.prefill_worker, w.dp_size.get()))
                            .collect();
                        let expected: BTreeMap<String, u32> = model
                            .workers
                            .iter()
                            .map(|(w, d)| (w.to_string(), *d))
                            .collect();
                        prop_assert_eq!(listed, expected);
                    }
                }
            }
            // Every room ever handed out still resolves to its owner.
            for (room, (name, size)) in model.issued.iter().step_by(97) {
                let resolved = allocator
                    .resolve(*room)
                    .await
                    .expect("issued rooms resolve");
                prop_assert_eq!(&*resolved.prefill_worker, *name);
                prop_assert_eq!(resolved.dp_size.get(), *size);
            }
            Ok(())
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        #[test]
        fn random_operations_with_restarts_match_the_model(
            ops in proptest::collection::vec(op(), 1..80),
        ) {
            run_ops(ops, u64::MAX, MAX_ROOM + 1)?;
        }

        #[test]
        fn a_store_that_starts_failing_gives_unavailable_and_never_a_duplicate(
            ops in proptest::collection::vec(op(), 1..80),
            budget in 0u64..8,
        ) {
            run_ops(ops, budget, MAX_ROOM + 1)?;
        }

        #[test]
        fn a_small_configured_space_is_exhausted_cleanly(
            ops in proptest::collection::vec(op(), 1..80),
        ) {
            run_ops(ops, u64::MAX, 30_000)?;
        }
    }

    #[tokio::test]
    async fn realignment_changes_later_rooms_and_keeps_earlier_ones_resolving() {
        let dir = tempfile::tempdir().expect("tempdir");
        let allocator = open(dir.path(), u64::MAX, MAX_ROOM + 1);
        allocator.register("w", 4).await.expect("register");
        let (old, _) = allocator.allocate("w", 3, 0).await.expect("allocate");
        allocator.register("w", 8).await.expect("realign");
        let (new, size) = allocator.allocate("w", 7, 0).await.expect("allocate");
        assert_eq!((new.get() % 8, size.get()), (7, 8));
        assert_eq!(
            allocator
                .resolve(old.get())
                .await
                .expect("old")
                .dp_size
                .get(),
            4
        );
        assert_eq!(
            allocator
                .resolve(new.get())
                .await
                .expect("new")
                .dp_size
                .get(),
            8
        );
        assert!(matches!(
            allocator.allocate("w", 1, 4).await,
            Err(Error::DpSizeMismatch {
                registered: 8,
                requested: 4,
                ..
            })
        ));
    }

    #[tokio::test]
    async fn the_worker_limit_is_resource_exhausted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let allocator = open_with(dir.path(), u64::MAX, MAX_ROOM + 1, 4);
        for name in ["a", "b", "c", "d"] {
            allocator.register(name, 1).await.expect("register");
        }
        assert!(matches!(
            allocator.register("e", 1).await,
            Err(Error::TooManyWorkers { limit: 4 })
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_callers_never_share_a_room() {
        let dir = tempfile::tempdir().expect("tempdir");
        let allocator = open(dir.path(), u64::MAX, MAX_ROOM + 1);
        allocator.register("w", 3).await.expect("register");
        let tasks: Vec<_> = (0..8u32)
            .map(|task| {
                let allocator = allocator.clone();
                tokio::spawn(async move {
                    let mut rooms = Vec::new();
                    for _ in 0..5000 {
                        let (room, _) = allocator.allocate("w", task % 3, 0).await.expect("room");
                        rooms.push(room.get());
                    }
                    rooms
                })
            })
            .collect();
        let mut all = std::collections::HashSet::new();
        for task in tasks {
            for room in task.await.expect("task") {
                assert!(all.insert(room), "room {room} twice");
            }
        }
        assert_eq!(all.len(), 40_000);
    }
}
