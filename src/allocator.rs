//! The contract's rules over a [`Store`] and the room arithmetic of [`space`].
//!
//! Each worker owns a cursor over its current range and, once that is half
//! used, a second range reserved ahead in the background (double-buffering,
//! as in Meituan's Leaf), so callers wait on the store only if demand outruns
//! a whole range. Range sizes double while ranges last under
//! [`TARGET_RANGE_LIFETIME`] and halve when they last much longer, so a busy
//! worker writes to the store rarely and an idle one wastes little space.
//!
//! Each worker's state (registration, epoch, the range served and the one
//! reserved ahead, sizing) is pure decision code in [`worker`]; this file
//! holds the locks, tasks and store calls that drive it.
//!
//! Invariants:
//! - Every registration change goes through [`Allocator::apply_registration`]
//!   under the worker's state lock: it applies only changes newer than what
//!   the worker holds (by store revision), and a change of dp_size or of
//!   registration bumps the worker's `epoch` and drops its ranges.
//! - A reservation remembers the epoch it was made under. The store may have
//!   committed it by the time it returns, so its range always enters the
//!   [`RangeTable`] (ResolveRank must find it), but rooms come from it only if
//!   the epoch is unchanged: a realignment that overtook the reservation in
//!   flight never gets rooms of the old dp_size (they are skipped instead).
//! - A range enters the [`RangeTable`] before any room from it is handed out,
//!   so every room ever returned resolves.
//! - One reservation per worker is in flight at a time (`Worker::refill`).
//! - A range serves rooms for at most the retention period after it was
//!   reserved (by this process's monotonic clock); stores keep ranges for at
//!   least twice that, so every room resolves for at least the retention.
//!
//! [`space`]: crate::space

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use thiserror::Error;
use tracing::{info, warn};

use crate::lifecycle::Lifecycle;
use crate::metrics::{Counter, Metrics};
pub use crate::names::Escaped;
use crate::names::NameError;
use crate::space::{
    Base, Bounds, DpSize, RangeOwner, RangeTable, Rank, Room, RoomRange, SpaceError,
};
use crate::store::{
    unix_ms, IssuedCount, PruneRequest, Reservation, SharedStore, Snapshot, Store, StoreError,
    StoreUpdate, WorkerRecord,
};

pub use room_allocator_client::limits::{
    DEFAULT_PAGE_SIZE, MAX_LEASE_COUNT, MAX_LEASE_NUMBERS, MAX_PAGE_SIZE, MAX_WORKER_LEN,
};

/// Rounds of "look at the worker, reserve or learn, look again" one call may
/// take before it gives up with UNAVAILABLE (each round is a store call).
const MAX_ROUNDS: usize = 8;

/// Errors of the allocator. Each message says what was wrong and what to do.
#[derive(Debug, Error)]
pub enum Error {
    #[error("prefill_worker is empty; pass the prefill worker's name as routers know it (e.g. its bootstrap host:port)")]
    EmptyWorker,
    #[error(
        "prefill_worker is {len} bytes, over the limit of {MAX_WORKER_LEN}; use a shorter name"
    )]
    WorkerTooLong { len: usize },
    #[error("prefill_worker {worker} contains the control character U+{code:04X}; names are UTF-8 without control characters")]
    WorkerControlCharacter { worker: String, code: u32 },
    #[error(transparent)]
    Space(#[from] SpaceError),
    #[error("count {count} is out of range; lease 1 to {MAX_LEASE_COUNT} bases at a time")]
    LeaseCount { count: u32 },
    #[error("count {count} bases of dp_size {dp_size} is over {MAX_LEASE_NUMBERS} numbers of the room space per call; lease at most {max_count} bases at a time")]
    LeaseTooLarge {
        count: u32,
        dp_size: u32,
        max_count: u64,
    },
    #[error(
        "prefill_worker {worker} is not registered; call RegisterWorker first, or pass its dp_size in AllocateRoom"
    )]
    UnknownWorker { worker: String },
    #[error("prefill_worker {worker} was deregistered; it gets no rooms until RegisterWorker brings it back")]
    Deregistered { worker: String },
    #[error(
        "prefill_worker {worker} is registered with dp_size {registered}, not {requested}; refresh the router's view of the worker, or call RegisterWorker to realign it"
    )]
    DpSizeMismatch {
        worker: String,
        registered: u32,
        requested: u32,
    },
    #[error("room {room} was never issued: it lies in no reserved range")]
    UnknownRoom { room: u64 },
    #[error(
        "room {room} lies in no range still kept: it was issued more than the retention period ({}) ago and its range was pruned, or never issued; rooms resolve for at least the retention period", humantime(*retention)
    )]
    Pruned { room: u64, retention: Duration },
    #[error("{limit} workers are registered, the configured --max-workers; deregister unused workers or raise the limit")]
    TooManyWorkers { limit: usize },
    #[error("page_size {page_size} is negative; pass 0 for the default of {DEFAULT_PAGE_SIZE}, or up to {MAX_PAGE_SIZE}")]
    PageSize { page_size: i32 },
    #[error("page_token is not one this server issued; pass the next_page_token of the previous page, or empty for the first page")]
    PageToken,
    #[error("the store cannot hand out rooms right now ({0}); retry with backoff")]
    Store(StoreError),
    #[error("{}; send `authorization: Bearer <token>` with the server's token", if *.presented { "the bearer token is wrong" } else { "this call needs a bearer token" })]
    Unauthenticated { presented: bool },
    #[error("{} AllocateRoom with a dp_size would register prefill_worker {worker}, which needs the server's token; call RegisterWorker with the token first, or send `authorization: Bearer <token>`", if *.presented { "the bearer token is wrong:" } else { "no bearer token:" })]
    RegistrationNeedsToken { worker: String, presented: bool },
    /// The call would register with [`Registrar::Unchecked`]: nothing was
    /// done; the caller decides and calls again (never a client's answer).
    #[error("AllocateRoom would register a worker before its caller's token was checked")]
    RegistrarUnchecked,
}

fn humantime(duration: Duration) -> String {
    let secs = duration.as_secs();
    match secs {
        s if s % 86_400 == 0 && s > 0 => format!("{}d", s / 86_400),
        s if s % 3600 == 0 && s > 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 && s > 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

impl From<StoreError> for Error {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Space(space) => Error::Space(space),
            other => Error::Store(other),
        }
    }
}

/// Whether a call may register a worker as a side effect (AllocateRoom with
/// a dp_size): with a token configured, only a caller that presented it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registrar {
    Allowed,
    Denied {
        presented: bool,
    },
    /// Not decided yet (a token is set and allocation is open to callers
    /// without it): a known worker's rooms need no decision, so the token is
    /// checked only if the call would register; then the call ends with
    /// [`Error::RegistrarUnchecked`] and is made again, decided.
    Unchecked,
}

/// A worker as clients see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerInfo {
    pub prefill_worker: String,
    pub dp_size: DpSize,
    pub rooms_issued: u64,
}

/// One page of ListWorkers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerPage {
    pub workers: Vec<WorkerInfo>,
    /// Empty on the last page.
    pub next_page_token: String,
}

/// A block of leased bases: `first_base + i * dp_size` for `i < count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub first_base: Base,
    pub count: u32,
    pub dp_size: DpSize,
    /// Use the bases within this long; later their rooms might not resolve
    /// for the whole retention period.
    pub valid_for: Duration,
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
    /// The part of the space this allocator hands out.
    pub bounds: Bounds,
    /// Most workers registered at once.
    pub max_workers: usize,
    /// Longest a call waits for the store before it gets UNAVAILABLE.
    pub store_timeout: Duration,
    /// Rooms come from a range for at most this long after it was reserved,
    /// and stores keep ranges for at least twice this: every room resolves
    /// for at least this long.
    pub retention: Duration,
}

/// What the gauges show, read at scrape time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gauges {
    pub workers_registered: usize,
    pub workers_limit: usize,
    pub space_used: u64,
    pub space_size: u64,
    pub ranges_held: usize,
    pub store_reachable: bool,
    pub registrations_confirmed_age: Option<Duration>,
    pub ready: bool,
}

/// The allocator handle; clones share state.
#[derive(Clone)]
pub struct Allocator {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn Store>,
    workers: RwLock<Workers>,
    /// Workers registered now (not counting deregistered ones).
    registered: AtomicUsize,
    ranges: RwLock<RangeTable>,
    /// Ranges ending at or below this were pruned.
    pruned_below: AtomicU64,
    limits: Limits,
    metrics: Arc<Metrics>,
    /// Owns the prefetches, retention and the follower of the store's
    /// updates: shutdown ends them before the store closes.
    lifecycle: Lifecycle,
    /// Resolved once: label lookups would cost as much as the allocation.
    allocated_rooms: Arc<Counter>,
    leased_bases: Arc<Counter>,
}

/// Every worker this process knows of (registered, or deregistered and kept
/// while its ranges are), by name, and the names in order for paging.
#[derive(Default)]
struct Workers {
    by_name: HashMap<Arc<str>, Arc<Worker>>,
    names: BTreeSet<Arc<str>>,
}

struct Worker {
    name: Arc<str>,
    state: Mutex<WorkerState>,
    /// Held while a reservation for this worker is in flight; never held by
    /// the hot path, and never by registration changes (they bump `epoch`).
    refill: tokio::sync::Mutex<()>,
}

impl Worker {
    fn new(name: Arc<str>, now: Instant) -> Self {
        Self {
            name,
            state: Mutex::new(WorkerState::new(now)),
            refill: tokio::sync::Mutex::new(()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WorkerState> {
        self.state
            .lock()
            .expect("worker state lock is never poisoned: nothing panics while holding it")
    }
}

/// Bases [`Allocator::take_bases`] took, and what the caller's check made
/// of the dp_size they were taken under.
struct TakenBases<T> {
    taken: Taken,
    checked: T,
}

/// What one look at a worker decided.
enum Step<'a, T> {
    Done(T),
    AskStore(&'a dyn SharedStore),
    Refill,
}

impl Allocator {
    /// Builds the allocator over an opened store and what it holds; its
    /// tasks are spawned through `lifecycle`.
    pub fn new(
        store: Arc<dyn Store>,
        snapshot: Snapshot,
        limits: Limits,
        metrics: Arc<Metrics>,
        lifecycle: Lifecycle,
    ) -> Self {
        let allocated_rooms = metrics.rooms_issued.get(&["AllocateRoom"]);
        let leased_bases = metrics.rooms_issued.get(&["LeaseRooms"]);
        let allocator = Self {
            inner: Arc::new(Inner {
                store,
                workers: RwLock::default(),
                registered: AtomicUsize::new(0),
                ranges: RwLock::new(snapshot.ranges),
                pruned_below: AtomicU64::new(snapshot.pruned_below),
                limits,
                metrics,
                lifecycle,
                allocated_rooms,
                leased_bases,
            }),
        };
        for record in snapshot.workers {
            let rooms_issued = record.rooms_issued;
            if let Some(worker) = allocator.apply_registration(&record, false) {
                let mut state = worker.lock();
                state.rooms_issued = rooms_issued;
                state.rooms_issued_at_open = rooms_issued;
            }
        }
        let registered = allocator.inner.registered.load(Ordering::Acquire);
        if registered > allocator.inner.limits.max_workers {
            warn!(
                registered,
                max_workers = allocator.inner.limits.max_workers,
                "more workers are registered than --max-workers; new registrations are refused until some are deregistered"
            );
        }
        allocator
    }

    pub fn store_kind(&self) -> &'static str {
        self.inner.store.kind()
    }

    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// Whether this process can hand out rooms now (readiness).
    pub fn check_ready(&self) -> Result<(), StoreError> {
        self.inner.store.health().ready
    }

    /// The gauges' values now.
    pub fn gauges(&self) -> Gauges {
        let workers: Vec<Arc<Worker>> = self.read_workers().by_name.values().cloned().collect();
        let ranges_held = workers
            .iter()
            .map(|worker| worker.lock().held_starts().count())
            .sum();
        let bounds = self.inner.limits.bounds;
        let health = self.inner.store.health();
        Gauges {
            workers_registered: self.inner.registered.load(Ordering::Acquire),
            workers_limit: self.inner.limits.max_workers,
            space_used: bounds.used(self.inner.store.high_water()),
            space_size: bounds.size(),
            ranges_held,
            store_reachable: health.reachable,
            registrations_confirmed_age: health.confirmed_ago,
            ready: health.ready.is_ok(),
        }
    }

    /// Registers `prefill_worker` with `dp_size`, or realigns it.
    pub async fn register(&self, prefill_worker: &str, dp_size: u32) -> Result<WorkerInfo, Error> {
        validate_worker(prefill_worker)?;
        let dp_size = DpSize::try_new(dp_size)?;
        self.register_worker(prefill_worker, dp_size).await
    }

    async fn register_worker(
        &self,
        prefill_worker: &str,
        dp_size: DpSize,
    ) -> Result<WorkerInfo, Error> {
        let known = self.worker(prefill_worker);
        let registered_here = known.as_ref().map(|worker| {
            let state = worker.lock();
            (state.registered, state.dp_size)
        });
        if self.inner.store.shared().is_none() && registered_here == Some((true, dp_size)) {
            // A single writer: memory is the truth, nothing to write.
            let worker = known.expect("known above");
            return Ok(info_of(&worker, &worker.lock()));
        }
        // A new registration takes a slot of --max-workers before it is
        // written, so concurrent registrations cannot overshoot the limit.
        let takes_slot = !registered_here.is_some_and(|(registered, _)| registered);
        if takes_slot && !self.take_slot() {
            return Err(Error::TooManyWorkers {
                limit: self.inner.limits.max_workers,
            });
        }
        let name: Arc<str> = known.map_or_else(|| Arc::from(prefill_worker), |w| w.name.clone());
        let revision = match self
            .with_store(self.inner.store.register(name.clone(), dp_size))
            .await
        {
            Ok(revision) => revision,
            Err(error) => {
                if takes_slot {
                    self.inner.registered.fetch_sub(1, Ordering::AcqRel);
                }
                return Err(error);
            }
        };
        let record = WorkerRecord {
            prefill_worker: name.clone(),
            dp_size,
            registered: true,
            rooms_issued: 0,
            revision,
        };
        let old = registered_here.filter(|(registered, _)| *registered);
        let worker = self
            .apply_registration(&record, takes_slot)
            .ok_or(Error::TooManyWorkers {
                limit: self.inner.limits.max_workers,
            })?;
        let state = worker.lock();
        info!(
            worker = %Escaped(&name),
            dp_size = dp_size.get(),
            old_dp_size = old.map(|(_, old)| old.get()),
            "registered worker"
        );
        Ok(info_of(&worker, &state))
    }

    /// Takes a slot of --max-workers; false if none is left.
    fn take_slot(&self) -> bool {
        let max = self.inner.limits.max_workers;
        self.inner
            .registered
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    /// The one place registration changes are applied (see the invariants
    /// above); `slot_taken` says the caller already counted a new
    /// registration. Returns the worker, unless the record is about a worker
    /// this process does not know and need not learn (a deregistration).
    fn apply_registration(&self, record: &WorkerRecord, slot_taken: bool) -> Option<Arc<Worker>> {
        let worker = match self.worker(&record.prefill_worker) {
            Some(worker) => worker,
            None => self.insert_worker(&record.prefill_worker),
        };
        let applied = worker.lock().apply(record);
        let Applied::Applied { was_registered, .. } = applied else {
            if slot_taken {
                self.inner.registered.fetch_sub(1, Ordering::AcqRel);
            }
            return Some(worker);
        };
        if was_registered && !record.registered {
            info!(worker = %Escaped(&worker.name), "worker deregistered");
        }
        match (was_registered, record.registered) {
            (false, true) if slot_taken => {}
            (false, true) => {
                self.inner.registered.fetch_add(1, Ordering::AcqRel);
            }
            (true, false) => {
                self.inner.registered.fetch_sub(1, Ordering::AcqRel);
            }
            _ if slot_taken => {
                self.inner.registered.fetch_sub(1, Ordering::AcqRel);
            }
            _ => {}
        }
        Some(worker)
    }

    /// Forgets a worker the store dropped, unless a registration newer than
    /// `revision` brought it back.
    fn forget(&self, prefill_worker: &str, revision: i64) {
        let mut workers = self.write_workers();
        let Some(worker) = workers.by_name.get(prefill_worker).cloned() else {
            return;
        };
        let state = worker.lock();
        if state.revision > revision {
            return;
        }
        if state.registered {
            self.inner.registered.fetch_sub(1, Ordering::AcqRel);
        }
        drop(state);
        workers.by_name.remove(prefill_worker);
        workers.names.remove(prefill_worker);
    }

    /// One room for (`prefill_worker`, `dp_rank`); `dp_size` 0 means "as
    /// registered", another value registers a worker never registered (if
    /// `registrar` allows) and must match the registered one.
    pub async fn allocate(
        &self,
        prefill_worker: &str,
        dp_rank: u32,
        dp_size: u32,
        registrar: Registrar,
    ) -> Result<(Room, DpSize), Error> {
        let TakenBases {
            taken,
            checked: rank,
        } = self
            .take_bases(
                prefill_worker,
                dp_size,
                Some(registrar),
                Demand::Bases {
                    count: 1,
                    validity: Duration::ZERO,
                },
                |dp_size| Rank::try_new(dp_rank, dp_size).map_err(Error::from),
            )
            .await?;
        self.inner.allocated_rooms.inc();
        Ok((taken.first_base.room(rank), taken.dp_size))
    }

    /// A block of `count` bases for `prefill_worker`; `dp_size` 0 means "as
    /// registered", another value must match it. Never registers.
    pub async fn lease(
        &self,
        prefill_worker: &str,
        count: u32,
        dp_size: u32,
    ) -> Result<Lease, Error> {
        if count == 0 || count > MAX_LEASE_COUNT {
            validate_worker(prefill_worker)?;
            return Err(Error::LeaseCount { count });
        }
        // A lease is usable for at least half the retention.
        let validity = self.inner.limits.retention / 2;
        let check = |dp_size: DpSize| {
            let max_count = MAX_LEASE_NUMBERS / u64::from(dp_size.get());
            if u64::from(count) > max_count {
                return Err(Error::LeaseTooLarge {
                    count,
                    dp_size: dp_size.get(),
                    max_count,
                });
            }
            Ok(())
        };
        let demand = Demand::Bases {
            count: u64::from(count),
            validity,
        };
        let TakenBases { taken, checked: () } = self
            .take_bases(prefill_worker, dp_size, None, demand, check)
            .await?;
        self.inner.leased_bases.inc_by(u64::from(count));
        Ok(Lease {
            first_base: taken.first_base,
            count,
            dp_size: taken.dp_size,
            valid_for: taken.valid_for,
        })
    }

    /// Takes bases for the worker. `check` validates the request against the
    /// dp_size in force, under the same lock as the take, so a concurrent
    /// realignment cannot slip between them. A worker this process does not
    /// know, or knows with another dp_size or as deregistered, is looked up
    /// in a shared store once before any refusal: another replica may have
    /// changed it a moment ago.
    async fn take_bases<T>(
        &self,
        prefill_worker: &str,
        requested_dp_size: u32,
        registrar: Option<Registrar>,
        demand: Demand,
        check: impl Fn(DpSize) -> Result<T, Error>,
    ) -> Result<TakenBases<T>, Error> {
        // A known worker's name was checked when it became known (the stores
        // refuse invalid names, etcd's watch included): only an unknown one
        // is checked here. A name too long to be valid is refused before it
        // is hashed under the workers' lock.
        let mut known = None;
        if prefill_worker.len() <= MAX_WORKER_LEN {
            known = self.worker(prefill_worker);
        }
        if known.is_none() {
            validate_worker(prefill_worker)?;
        }
        let requested = match requested_dp_size {
            0 => None,
            n => Some(DpSize::try_new(n)?),
        };
        if let Some(dp_size) = requested {
            // Reject a bad request before it registers anyone.
            check(dp_size)?;
        }
        let Demand::Bases { count, validity } = demand else {
            unreachable!("callers take bases");
        };
        let shared = self.inner.store.shared();
        let mut asked_store = false;
        for _ in 0..MAX_ROUNDS {
            let Some(worker) = known.take().or_else(|| self.worker(prefill_worker)) else {
                if let Some(shared) = shared.filter(|_| !asked_store) {
                    asked_store = true;
                    self.learn(shared, prefill_worker).await?;
                    continue;
                }
                match (requested, registrar) {
                    (Some(dp_size), Some(Registrar::Allowed)) => {
                        self.register_worker(prefill_worker, dp_size).await?;
                        continue;
                    }
                    (Some(_), Some(Registrar::Unchecked)) => return Err(Error::RegistrarUnchecked),
                    (Some(_), Some(Registrar::Denied { presented })) => {
                        return Err(Error::RegistrationNeedsToken {
                            worker: Escaped(prefill_worker).to_string(),
                            presented,
                        })
                    }
                    _ => return Err(unknown(prefill_worker)),
                }
            };
            let now = Instant::now();
            let step = {
                let mut state = worker.lock();
                let stale_view =
                    !state.registered || requested.is_some_and(|dp_size| dp_size != state.dp_size);
                if let Some(shared) = shared.filter(|_| stale_view && !asked_store) {
                    Step::AskStore(shared)
                } else if !state.registered {
                    return Err(Error::Deregistered {
                        worker: Escaped(prefill_worker).to_string(),
                    });
                } else if let Some(dp_size) = requested.filter(|d| *d != state.dp_size) {
                    return Err(Error::DpSizeMismatch {
                        worker: Escaped(prefill_worker).to_string(),
                        registered: state.dp_size.get(),
                        requested: dp_size.get(),
                    });
                } else {
                    let checked = check(state.dp_size)?;
                    if let Some(shared) = shared {
                        shared.check_fresh().map_err(Error::Store)?;
                    }
                    match state.take(count, now, validity) {
                        Some(taken) => {
                            if taken.prefetch {
                                drop(state);
                                self.spawn_prefetch(worker.clone());
                            }
                            Step::Done(TakenBases { taken, checked })
                        }
                        None => Step::Refill,
                    }
                }
            };
            match step {
                Step::Done(taken) => return Ok(taken),
                Step::AskStore(shared) => {
                    asked_store = true;
                    self.learn(shared, prefill_worker).await?;
                }
                Step::Refill => self.refill(&worker, demand).await?,
            }
        }
        Err(Error::Store(StoreError::Contention {
            attempts: MAX_ROUNDS,
        }))
    }

    /// Reserves a range ahead in a task of the lifecycle: one spawned once
    /// shutdown began never runs, and one waiting for the worker's refill
    /// lock stops there (see `refill_locked`), so none reaches a closed store.
    fn spawn_prefetch(&self, worker: Arc<Worker>) {
        let allocator = self.clone();
        self.inner.lifecycle.spawn(async move {
            if let Err(error) = allocator.refill(&worker, Demand::Prefetch).await {
                // Callers will retry the reservation themselves when the
                // current range runs dry, and get the error then.
                warn!(worker = %Escaped(&worker.name), %error, "reserving a range ahead failed");
            }
            worker.lock().prefetch_ended();
        });
    }

    /// Reserves a range for `worker` unless one that meets `demand` appeared
    /// while waiting for the worker's refill lock.
    async fn refill(&self, worker: &Arc<Worker>, demand: Demand) -> Result<(), Error> {
        let timeout = self.inner.limits.store_timeout;
        tokio::time::timeout(timeout, self.refill_locked(worker, demand))
            .await
            .unwrap_or(Err(Error::Store(StoreError::Timeout {
                operation: "reserve a range",
                after: timeout,
            })))
    }

    async fn refill_locked(&self, worker: &Arc<Worker>, demand: Demand) -> Result<(), Error> {
        // No reservation starts once shutdown began: the store closes as
        // soon as the tasks and calls in flight ended. One that started
        // finishes (it is a durable write).
        let token = self.inner.lifecycle.token();
        let _refill = tokio::select! {
            refill = worker.refill.lock() => refill,
            () = token.cancelled() => return Err(Error::Store(StoreError::Closed)),
        };
        if token.is_cancelled() {
            return Err(Error::Store(StoreError::Closed));
        }
        let (reservation, epoch, serve_until) = {
            let mut state = worker.lock();
            let now = Instant::now();
            let Some(plan) = state.plan_refill(demand, now) else {
                // The caller looks again and acts on what it sees.
                return Ok(());
            };
            let reservation = Reservation {
                prefill_worker: worker.name.clone(),
                dp_size: plan.dp_size,
                revision: plan.revision,
                want_bases: plan.want_bases,
                need_bases: plan.need_bases,
                rooms_issued: state.rooms_issued,
                created_unix_ms: unix_ms(),
            };
            // Timed from before the store call: the store keeps the range
            // for twice the retention from a moment after this.
            (reservation, plan.epoch, now + self.inner.limits.retention)
        };
        let dp_size = reservation.dp_size;
        let created_unix_ms = reservation.created_unix_ms;
        let range = match self.inner.store.reserve(reservation).await {
            Err(StoreError::StaleRegistration { current, .. }) => {
                // Another replica changed the registration: follow it, and
                // let the caller look again under the new one.
                match current {
                    Some(record) => {
                        info!(worker = %Escaped(&worker.name), dp_size = record.dp_size.get(), registered = record.registered, "registration changed on another replica");
                        self.apply_registration(&record, false);
                    }
                    None => {
                        let revision = worker.lock().revision;
                        info!(worker = %Escaped(&worker.name), "worker is gone from the store");
                        self.forget(&worker.name, revision);
                    }
                }
                return Ok(());
            }
            other => self.with_store(std::future::ready(other)).await?,
        };
        self.inner
            .metrics
            .ranges_reserved
            .get(&[self.inner.store.kind()])
            .inc();
        // The store committed it: it resolves whatever happens next.
        self.record_range(&worker.name, range, created_unix_ms)?;
        let placed = worker
            .lock()
            .place(epoch, range, serve_until, Instant::now());
        if placed == Placed::Overtaken {
            // A registration change overtook this reservation: its rooms
            // would be aligned to the old dp_size. Skip them.
            info!(
                worker = %Escaped(&worker.name),
                dp_size = dp_size.get(),
                start = range.start(),
                end = range.end(),
                "a registration change overtook this reservation; its rooms are skipped"
            );
            return Ok(());
        }
        info!(
            worker = %Escaped(&worker.name),
            dp_size = dp_size.get(),
            start = range.start(),
            end = range.end(),
            bases = range.bases(),
            "reserved range"
        );
        Ok(())
    }

    fn record_range(
        &self,
        worker: &Arc<str>,
        range: RoomRange,
        created_unix_ms: u64,
    ) -> Result<(), Error> {
        self.inner
            .ranges
            .write()
            .expect("range table lock is never poisoned")
            .insert(RangeOwner {
                prefill_worker: worker.clone(),
                range,
                created_unix_ms,
            })
            .map_err(|overlap| {
                // The store broke its one promise; refuse to serve from it.
                warn!(%overlap, "store returned a range that overlaps a reserved one");
                Error::Store(StoreError::Overlap {
                    worker: worker.clone(),
                    overlap,
                })
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
                // Another replica may have reserved it; remember what we
                // learn. A single writer has every range in memory.
                let shared = self.inner.store.shared();
                let found = match shared {
                    Some(shared) => self.with_store(shared.lookup(room)).await?,
                    None => None,
                };
                let owner = found.ok_or_else(|| {
                    let pruned = room.get() < self.inner.pruned_below.load(Ordering::Acquire)
                        || shared.is_some_and(|shared| shared.missing_is_pruned(room));
                    if pruned {
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

    /// Drops what retention no longer needs: ranges reserved more than twice
    /// the retention ago (never one still served from), and deregistered
    /// workers none of whose ranges is left.
    pub async fn prune_expired(&self) -> Result<(), Error> {
        let retention_ms =
            u64::try_from(self.inner.limits.retention.as_millis()).unwrap_or(u64::MAX);
        let cutoff = unix_ms().saturating_sub(retention_ms.saturating_mul(2));
        let held = self.held_starts();
        let pruned = self
            .with_store(self.inner.store.prune(PruneRequest {
                cutoff_unix_ms: cutoff,
                held: held.clone(),
            }))
            .await?;
        self.inner
            .pruned_below
            .fetch_max(pruned.pruned_below, Ordering::AcqRel);
        for name in &pruned.forgotten {
            self.forget(name, pruned.revision);
        }
        let mut ranges = self
            .inner
            .ranges
            .write()
            .expect("range table lock is never poisoned");
        if self.inner.store.shared().is_some() {
            // Only a cache of what the store holds, which expires ranges by
            // itself a lease bucket later; an entry dropped early is looked
            // up again.
            let margin_ms = (retention_ms / 8).clamp(1000, 3_600_000);
            ranges.prune(cutoff.saturating_sub(margin_ms), &held);
        } else {
            let below = ranges.prune(cutoff, &held);
            self.inner.pruned_below.fetch_max(below, Ordering::AcqRel);
        }
        Ok(())
    }

    fn held_starts(&self) -> BTreeSet<u64> {
        let workers: Vec<Arc<Worker>> = self.read_workers().by_name.values().cloned().collect();
        workers
            .iter()
            .flat_map(|worker| worker.lock().held_starts().collect::<Vec<_>>())
            .collect()
    }

    /// Prunes expired ranges every quarter of the retention period (between
    /// 1 s and 10 min) until shutdown; a prune under way finishes first.
    pub fn run_retention(&self) {
        let interval = (self.inner.limits.retention / 4)
            .clamp(Duration::from_secs(1), Duration::from_secs(600));
        let allocator = self.clone();
        let token = self.inner.lifecycle.token().clone();
        self.inner.lifecycle.spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = ticker.tick() => {}
                    () = token.cancelled() => return,
                }
                match allocator.prune_expired().await {
                    Ok(()) => {}
                    Err(Error::Store(StoreError::Closed)) => return,
                    Err(error) => warn!(%error, "pruning expired ranges failed; will retry"),
                }
            }
        });
    }

    /// Follows registration changes made elsewhere (other replicas), if the
    /// store reports any, until shutdown or the store closes. Applying one
    /// writes memory only, so the task stops at any of its waits.
    pub fn follow_store(&self) {
        let Some(mut updates) = self
            .inner
            .store
            .shared()
            .and_then(|shared| shared.take_updates())
        else {
            return;
        };
        let allocator = self.clone();
        self.inner.lifecycle.spawn_until_cancelled(async move {
            while let Some(update) = updates.recv().await {
                // A test holds each event back (`return(MS)`), as a slow
                // watch would, without blocking a runtime thread.
                #[cfg(feature = "failpoints")]
                if let Some(ms) = fail::eval("allocator::apply_update_late", |ms| {
                    ms.and_then(|ms| ms.parse::<u64>().ok())
                })
                .flatten()
                {
                    tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                }
                allocator.apply_update(update);
            }
        });
    }

    /// Applies one change the store reported.
    pub fn apply_update(&self, update: StoreUpdate) {
        crate::failpoint!("allocator::apply_update");
        match update {
            StoreUpdate::Registration(record) => {
                self.apply_registration(&record, false);
            }
            StoreUpdate::Forgotten {
                prefill_worker,
                revision,
            } => self.forget(&prefill_worker, revision),
        }
    }

    /// Applies what a shared store holds for a worker.
    async fn learn(&self, shared: &dyn SharedStore, prefill_worker: &str) -> Result<(), Error> {
        let stored = self
            .with_store(shared.lookup_worker(prefill_worker))
            .await?;
        if let Some(record) = stored {
            self.apply_registration(&record, false);
        }
        Ok(())
    }

    /// One page of registered workers, sorted by name (AIP-158).
    pub fn list(&self, page_size: i32, page_token: &str) -> Result<WorkerPage, Error> {
        let page_size = match page_size {
            n if n < 0 => return Err(Error::PageSize { page_size }),
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        let page_size = usize::try_from(page_size).expect("positive");
        let after = match page_token {
            "" => None,
            token => Some(decode_page_token(token).ok_or(Error::PageToken)?),
        };
        let workers = self.read_workers();
        let candidates = match &after {
            Some(name) => workers.names.range::<str, _>((
                std::ops::Bound::Excluded(name.as_str()),
                std::ops::Bound::Unbounded,
            )),
            None => workers.names.range::<str, _>(..),
        };
        let mut page = Vec::with_capacity(page_size.min(1024));
        let mut more = false;
        for name in candidates {
            let Some(worker) = workers.by_name.get(name) else {
                continue;
            };
            let state = worker.lock();
            if !state.registered {
                continue;
            }
            if page.len() == page_size {
                more = true;
                break;
            }
            page.push(info_of(worker, &state));
        }
        let next_page_token = match (more, page.last()) {
            (true, Some(last)) => encode_page_token(&last.prefill_worker),
            _ => String::new(),
        };
        Ok(WorkerPage {
            workers: page,
            next_page_token,
        })
    }

    /// Stops new rooms for `prefill_worker` until it registers again; its
    /// rooms still resolve. Deregistering a deregistered worker changes
    /// nothing but the record's lease on a shared store (see below).
    pub async fn deregister(&self, prefill_worker: &str) -> Result<(), Error> {
        validate_worker(prefill_worker)?;
        if let Some(shared) = self.inner.store.shared() {
            // Registered (or realigned) on another replica a moment ago, perhaps.
            self.learn(shared, prefill_worker).await?;
        }
        let worker = self
            .worker(prefill_worker)
            .ok_or_else(|| unknown(prefill_worker))?;
        let (registered, dp_size) = {
            let state = worker.lock();
            (state.registered, state.dp_size)
        };
        // On a shared store a worker deregistered already is deregistered
        // again: the store rereads its ranges and rewrites the record with a
        // lease covering them (idempotent), so the caller's retry repairs
        // what a failed or interrupted deregistration left (a record whose
        // lease a range outlives). The embedded store writes it once.
        if !registered && self.inner.store.shared().is_none() {
            return Ok(());
        }
        let revision = self
            .with_store(self.inner.store.deregister(worker.name.clone(), dp_size))
            .await?;
        self.apply_registration(
            &WorkerRecord {
                prefill_worker: worker.name.clone(),
                dp_size,
                registered: false,
                rooms_issued: 0,
                revision,
            },
            false,
        );
        Ok(())
    }

    /// Ends the lifecycle's tasks (the server has done so already: this
    /// only makes sure, for any other caller), then persists the
    /// `rooms_issued` counters and closes the store: no task of this process
    /// reaches the store after it is closed (a gRPC call the drain timeout
    /// gave up on may; see the README's "Shutdown").
    pub async fn shutdown(&self) -> Result<(), Error> {
        self.inner.lifecycle.shutdown().await;
        let counts = self
            .read_workers()
            .by_name
            .values()
            .filter_map(|worker| {
                let state = worker.lock();
                state.registered.then(|| IssuedCount {
                    prefill_worker: worker.name.clone(),
                    total: state.rooms_issued,
                    since_open: state.rooms_issued - state.rooms_issued_at_open,
                })
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
            if !matches!(
                error,
                StoreError::Space(_)
                    | StoreError::StaleRegistration { .. }
                    | StoreError::LookupsThrottled { .. }
            ) {
                warn!(store = self.inner.store.kind(), %error, "store operation failed");
                self.inner
                    .metrics
                    .store_errors
                    .get(&[self.inner.store.kind()])
                    .inc();
            }
            Error::from(error)
        })
    }

    fn read_workers(&self) -> std::sync::RwLockReadGuard<'_, Workers> {
        self.inner
            .workers
            .read()
            .expect("worker map lock is never poisoned")
    }

    fn write_workers(&self) -> std::sync::RwLockWriteGuard<'_, Workers> {
        self.inner
            .workers
            .write()
            .expect("worker map lock is never poisoned")
    }

    fn worker(&self, prefill_worker: &str) -> Option<Arc<Worker>> {
        self.read_workers().by_name.get(prefill_worker).cloned()
    }

    /// The worker's entry, created (unregistered, revision -inf) if new.
    fn insert_worker(&self, prefill_worker: &Arc<str>) -> Arc<Worker> {
        let mut workers = self.write_workers();
        if let Some(worker) = workers.by_name.get(prefill_worker) {
            return worker.clone();
        }
        let worker = Arc::new(Worker::new(prefill_worker.clone(), Instant::now()));
        workers
            .by_name
            .insert(prefill_worker.clone(), worker.clone());
        workers.names.insert(prefill_worker.clone());
        worker
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
        worker: Escaped(prefill_worker).to_string(),
    }
}

/// A prefill_worker: 1 to 253 bytes of UTF-8 without control characters
/// (U+0000-U+001F, U+007F-U+009F); see [`crate::names`].
pub fn validate_worker(prefill_worker: &str) -> Result<(), Error> {
    Ok(crate::names::validate_worker(prefill_worker)?)
}

impl From<NameError> for Error {
    fn from(error: NameError) -> Self {
        match error {
            NameError::Empty => Error::EmptyWorker,
            NameError::TooLong { len } => Error::WorkerTooLong { len },
            NameError::ControlCharacter { worker, code } => {
                Error::WorkerControlCharacter { worker, code }
            }
        }
    }
}

/// Page tokens: hex of a version byte, the name's CRC-32 and the name, so a
/// token the server did not issue (or a truncated one) is refused, and any
/// replica accepts any other's.
fn encode_page_token(last: &str) -> String {
    let mut bytes = vec![1u8];
    bytes.extend_from_slice(&crc32fast::hash(last.as_bytes()).to_le_bytes());
    bytes.extend_from_slice(last.as_bytes());
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn decode_page_token(token: &str) -> Option<String> {
    if !token.len().is_multiple_of(2) || token.len() > 2 * (5 + MAX_WORKER_LEN) {
        return None;
    }
    let bytes: Vec<u8> = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(token.get(i..i + 2)?, 16).ok())
        .collect::<Option<_>>()?;
    let (&version, rest) = bytes.split_first()?;
    let (crc, name) = rest.split_at_checked(4)?;
    let name = std::str::from_utf8(name).ok()?;
    (version == 1
        && crc == crc32fast::hash(name.as_bytes()).to_le_bytes()
        && validate_worker(name).is_ok())
    .then(|| name.to_owned())
}

#[cfg(test)]
mod tests;
/// One worker's state: pure, in the core crate.
pub(crate) use room_allocator_core::worker;

use self::worker::{Applied, Demand, Placed, Taken, WorkerState};
