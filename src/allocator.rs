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
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use thiserror::Error;
use tracing::{info, warn};

use crate::metrics::{Metrics, MethodLabels, StoreLabels};
use crate::space::{
    Base, BaseCursor, DpSize, Rank, RangeOwner, RangeTable, Room, RoomRange, SpaceError,
};
use crate::store::{Reservation, Snapshot, Store, StoreError};

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
    #[error("prefill_worker is {len} bytes, over the limit of {MAX_WORKER_LEN}; use a shorter name")]
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
    #[error("{limit} workers are registered, the configured --max-workers; deregister unused workers or raise the limit")]
    TooManyWorkers { limit: usize },
    #[error("the store cannot reserve rooms right now ({0}); retry with backoff")]
    Store(StoreError),
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
    limits: Limits,
    metrics: Arc<Metrics>,
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
    current: Option<BaseCursor>,
    next: Option<BaseCursor>,
    prefetching: bool,
    rooms_issued: u64,
    range_bases: u64,
    current_since: Instant,
}

/// What a caller needs from a worker's cursors.
#[derive(Debug, Clone, Copy)]
enum Demand {
    /// `count` consecutive bases.
    Bases(u64),
    /// A range reserved ahead; nothing is taken.
    Prefetch,
}

impl WorkerState {
    fn lock(worker: &Worker) -> std::sync::MutexGuard<'_, WorkerState> {
        worker
            .state
            .lock()
            .expect("worker state lock is never poisoned: nothing panics while holding it")
    }

    /// Takes `count` consecutive bases, moving on to the reserved-ahead range
    /// when the current one cannot serve them. The rest of a range too short
    /// for a block is skipped, never reissued.
    fn take(&mut self, count: u64, now: Instant) -> Option<Base> {
        if let Some(base) = self.current.as_mut().and_then(|c| c.take_block(count)) {
            return Some(base);
        }
        if self.next.as_ref().is_some_and(|n| n.remaining() >= count) {
            self.current = self.next.take();
            self.current_since = now;
            return self.current.as_mut().and_then(|c| c.take_block(count));
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
            .is_none_or(|c| c.remaining() <= c.range().bases() / 2);
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
                let worker = Arc::new(Worker {
                    name: record.prefill_worker.clone(),
                    state: Mutex::new(WorkerState {
                        dp_size: record.dp_size,
                        registered: record.registered,
                        current: None,
                        next: None,
                        prefetching: false,
                        rooms_issued: record.rooms_issued,
                        range_bases: MIN_RANGE_BASES,
                        current_since: now,
                    }),
                    refill: tokio::sync::Mutex::new(()),
                });
                (record.prefill_worker, worker)
            })
            .collect();
        Self {
            inner: Arc::new(Inner {
                store,
                workers: RwLock::new(workers),
                ranges: RwLock::new(snapshot.ranges),
                limits,
                metrics,
            }),
        }
    }

    pub fn store_kind(&self) -> &'static str {
        self.inner.store.kind()
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
        self.with_store(self.inner.store.register(worker.name.clone(), dp_size))
            .await?;
        let mut state = WorkerState::lock(worker);
        let old = state.registered.then_some(state.dp_size.get());
        if state.dp_size != dp_size {
            state.drop_ranges();
        }
        state.dp_size = dp_size;
        state.registered = true;
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
        self.inner
            .metrics
            .rooms_issued
            .get_or_create(&MethodLabels { method: "AllocateRoom" })
            .inc();
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
        self.inner
            .metrics
            .rooms_issued
            .get_or_create(&MethodLabels { method: "LeaseRooms" })
            .inc_by(u64::from(count));
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
        let worker = match (self.worker(prefill_worker), requested) {
            (Some(worker), _) => worker,
            (None, Some(_)) => self.worker_entry(prefill_worker)?,
            (None, None) => return Err(unknown(prefill_worker)),
        };
        loop {
            let now = Instant::now();
            let mut register_with = None;
            {
                let mut state = WorkerState::lock(&worker);
                match (state.registered, requested) {
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
                        if let Some(base) = state.take(count, now) {
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
            }
        };
        let dp_size = reservation.dp_size;
        let range = self
            .with_store(self.inner.store.reserve(reservation))
            .await?;
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
        self.record_range(&worker.name, range)?;
        let mut state = WorkerState::lock(worker);
        // The refill lock kept registration changes out, so dp_size holds.
        debug_assert_eq!(state.dp_size, dp_size);
        let cursor = range.cursor();
        match &state.current {
            Some(current) if current.remaining() > 0 => state.next = Some(cursor),
            _ => {
                state.current = Some(cursor);
                state.current_since = Instant::now();
            }
        }
        Ok(())
    }

    fn record_range(&self, worker: &Arc<str>, range: RoomRange) -> Result<(), Error> {
        let mut ranges = self
            .inner
            .ranges
            .write()
            .expect("range table lock is never poisoned");
        ranges
            .insert(RangeOwner {
                prefill_worker: worker.clone(),
                range,
            })
            .map_err(|overlap| {
                // The store broke its one promise; refuse to serve from it.
                warn!(%overlap, "store returned a range that overlaps a reserved one");
                Error::Store(StoreError::Closed)
            })
    }

    /// Which worker, rank and dp_size `room` was issued for.
    pub fn resolve(&self, room: u64) -> Result<Resolved, Error> {
        let room = Room::try_new(room)?;
        let ranges = self
            .inner
            .ranges
            .read()
            .expect("range table lock is never poisoned");
        let owner = ranges
            .resolve(room)
            .ok_or(Error::UnknownRoom { room: room.get() })?;
        let dp_size = owner.range.dp_size();
        Ok(Resolved {
            prefill_worker: owner.prefill_worker.clone(),
            dp_rank: room.rank(dp_size),
            dp_size,
        })
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
        let worker = self
            .worker(prefill_worker)
            .ok_or_else(|| unknown(prefill_worker))?;
        let _refill = worker.refill.lock().await;
        if !WorkerState::lock(&worker).registered {
            return Err(unknown(prefill_worker));
        }
        self.with_store(self.inner.store.deregister(worker.name.clone()))
            .await?;
        let mut state = WorkerState::lock(&worker);
        state.registered = false;
        state.drop_ranges();
        info!(worker = %worker.name, "deregistered worker");
        Ok(())
    }

    /// Persists the `rooms_issued` counters and closes the store.
    pub async fn shutdown(&self) -> Result<(), Error> {
        let counts = self
            .read_workers()
            .values()
            .map(|worker| (worker.name.clone(), WorkerState::lock(worker).rooms_issued))
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
        let worker = Arc::new(Worker {
            name: name.clone(),
            state: Mutex::new(WorkerState {
                dp_size: DpSize::try_new(1).expect("1 is a valid dp_size"),
                registered: false,
                current: None,
                next: None,
                prefetching: false,
                rooms_issued: 0,
                range_bases: MIN_RANGE_BASES,
                current_since: Instant::now(),
            }),
            refill: tokio::sync::Mutex::new(()),
        });
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
