//! [`RoomClient`], the API: the contract's calls, and the leases behind
//! `allocate` (a background refill per worker, expiry on a timer, the outage
//! fallback). Options and connecting are the builder's (`builder.rs`);
//! endpoints, failover and error explanations the transport's
//! (`transport.rs`); what calls return is in `types.rs`.

use std::collections::HashMap;
use std::future::Future;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use tonic::{Code, Status};
use tracing::debug;

use crate::builder::{RoomClientBuilder, DEFAULT_MAX_LEASE_AGE, DEFAULT_TIMEOUT};
use crate::error::Error;
use crate::fallback::{Draws, Region};
use crate::fork;
use crate::lease::{Block, LeaseState};
use crate::limits::{MAX_LEASE_COUNT, MAX_LEASE_NUMBERS};
use crate::pb;
use crate::transport::{CallOptions, Context, Rpc, Transport};
use crate::types::{FallbackCallback, FallbackRoom, Lease, Resolved, RoomSpace, WorkerInfo};

/// First lease size; doubles while leases run out within [`FAST_LEASE`].
const INITIAL_LEASE: u32 = 256;
/// A lease used up faster than this means the next one should be larger.
const FAST_LEASE: Duration = Duration::from_secs(1);
/// Workers per ListWorkers page when `workers()` pages through them all.
const WORKERS_PAGE_SIZE: i32 = 1000;

/// The outage fallback of a client that has one.
pub(crate) struct Fallback {
    pub region: Region,
    deadline: Duration,
    on_fallback: Option<FallbackCallback>,
    draws: Draws,
    /// Fallback rooms handed out (a block or a batch item counts one).
    rooms: AtomicU64,
}

impl Fallback {
    pub fn new(region: Region, deadline: Duration, on_fallback: Option<FallbackCallback>) -> Self {
        Self {
            region,
            deadline,
            on_fallback,
            draws: Draws::new(),
            rooms: AtomicU64::new(0),
        }
    }
}

/// Whether an error means the allocator could not be reached or could not
/// reserve: the only failures the outage fallback stands in for. A refusal
/// (a stale dp_size, a deregistered worker, a full space) is returned.
fn is_outage(error: &Error) -> bool {
    match error {
        Error::Connect { .. } => true,
        Error::Status(status) => matches!(
            status.code(),
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled
        ),
        _ => false,
    }
}

/// FNV-1a: worker names are short, and the hot path hashes one per room;
/// SipHash would be a third of its cost.
#[derive(Default)]
struct Fnv(u64);

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut hash = if self.0 == 0 {
            0xcbf2_9ce4_8422_2325
        } else {
            self.0
        };
        for byte in bytes {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.0 = hash;
    }
}

type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<Fnv>>;

/// A cheap-to-clone, thread-safe handle; clones share connections and leases.
/// Not usable across `fork()`: a forked child builds its own (see the crate
/// docs, "Processes that fork").
#[derive(Clone)]
pub struct RoomClient {
    inner: Arc<Inner>,
}

struct Inner {
    /// The endpoints; calls fail over among them.
    transport: Transport,
    workers: RwLock<FastMap<Box<str>, Arc<WorkerLease>>>,
    /// Where refills and lease expiry run, so `try_allocate` works from any thread.
    runtime: Option<tokio::runtime::Handle>,
    max_lease_age: Duration,
    /// The fork generation of the process that made the client: a copy in a
    /// forked child refuses to work (see `fork.rs`).
    fork_generation: u64,
    fallback: Option<Fallback>,
}

struct WorkerLease {
    name: Box<str>,
    state: Mutex<LeaseState>,
    /// A background refill is running.
    refilling: AtomicBool,
    /// One lease in flight per worker: concurrent callers wait for it rather
    /// than leasing a block each.
    refill: tokio::sync::Mutex<()>,
}

impl WorkerLease {
    fn lock(&self) -> std::sync::MutexGuard<'_, LeaseState> {
        self.state
            .lock()
            .expect("lease lock is never poisoned: nothing panics while holding it")
    }
}

impl RoomClient {
    /// Connects to `url` (`http://host:port`, `https://...`, or `host:port`),
    /// retrying with backoff for up to 30 s.
    pub async fn connect(url: impl AsRef<str>) -> Result<Self, Error> {
        Self::builder([url.as_ref()]).connect().await
    }

    /// A builder for several endpoints, a token, TLS, deadlines and keep-alive.
    pub fn builder<I, S>(endpoints: I) -> RoomClientBuilder
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        RoomClientBuilder::new(
            endpoints
                .into_iter()
                .map(|e| e.as_ref().to_owned())
                .collect(),
        )
    }

    /// Uses an existing channel (no token, default deadline). Called inside a
    /// tokio runtime, refills run there; otherwise in whatever runtime calls
    /// [`allocate`](Self::allocate).
    pub fn from_channel(channel: Channel) -> Self {
        let options = CallOptions {
            token: None,
            timeout: DEFAULT_TIMEOUT,
        };
        let context = Context {
            url: "the channel".into(),
            tls: false,
            identity: false,
        };
        Self::new(
            Transport::from_channel(context, channel, options),
            DEFAULT_MAX_LEASE_AGE,
            None,
        )
    }

    pub(crate) fn new(
        transport: Transport,
        max_lease_age: Duration,
        fallback: Option<Fallback>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                transport,
                workers: RwLock::new(FastMap::default()),
                runtime: tokio::runtime::Handle::try_current().ok(),
                max_lease_age,
                fork_generation: fork::register_and_get(),
                fallback,
            }),
        }
    }

    /// Sends one call through the transport (which fails over among the
    /// endpoints); a copy in a forked child refuses at once.
    async fn call<Q, R, F, Fut>(&self, request: Q, send: F) -> Result<R, Status>
    where
        Q: Clone,
        F: Fn(Rpc, Q) -> Fut,
        Fut: Future<Output = Result<tonic::Response<R>, Status>>,
    {
        self.check_same_process()?;
        self.inner.transport.call(request, send).await
    }

    /// The outage fallback, for `connect` to check its region.
    pub(crate) fn fallback(&self) -> Option<&Fallback> {
        self.inner.fallback.as_ref()
    }

    /// Registers (or realigns) a prefill worker; an admin call when the
    /// server has a token.
    pub async fn register(&self, prefill_worker: &str, dp_size: u32) -> Result<WorkerInfo, Error> {
        let request = pb::RegisterWorkerRequest {
            prefill_worker: prefill_worker.to_owned(),
            dp_size,
        };
        let response = self
            .call(request, |mut rpc, request| async move {
                rpc.register_worker(request).await
            })
            .await
            .map_err(|status| Error::from_status(prefill_worker, dp_size, status))?;
        if let Some(worker) = self.lease_of(prefill_worker) {
            let mut state = worker.lock();
            if state.dp_size != dp_size {
                state.drop_leases();
            }
        }
        response
            .worker
            .map(WorkerInfo::from)
            .ok_or_else(|| Error::Status(Status::internal("the server sent no worker")))
    }

    /// Stops new rooms for a worker until it is registered again; an admin
    /// call when the server has a token.
    pub async fn deregister(&self, prefill_worker: &str) -> Result<(), Error> {
        let request = pb::DeregisterWorkerRequest {
            prefill_worker: prefill_worker.to_owned(),
        };
        self.call(request, |mut rpc, request| async move {
            rpc.deregister_worker(request).await
        })
        .await
        .map_err(|status| Error::from_status(prefill_worker, 0, status))?;
        if let Some(worker) = self.lease_of(prefill_worker) {
            worker.lock().drop_leases();
        }
        Ok(())
    }

    /// Which worker, rank and dp_size `room` was issued for.
    pub async fn resolve(&self, room: u64) -> Result<Resolved, Error> {
        let response = self
            .call(
                pb::ResolveRankRequest { room },
                |mut rpc, request| async move { rpc.resolve_rank(request).await },
            )
            .await?;
        Ok(Resolved {
            prefill_worker: response.prefill_worker,
            dp_rank: response.dp_rank,
            dp_size: response.dp_size,
        })
    }

    /// Every registered worker, sorted by name (pages through ListWorkers).
    pub async fn workers(&self) -> Result<Vec<WorkerInfo>, Error> {
        let mut workers = Vec::new();
        let mut page_token = String::new();
        loop {
            let request = pb::ListWorkersRequest {
                page_size: WORKERS_PAGE_SIZE,
                page_token,
            };
            let page = self
                .call(request, |mut rpc, request| async move {
                    rpc.list_workers(request).await
                })
                .await?;
            workers.extend(page.workers.into_iter().map(WorkerInfo::from));
            if page.next_page_token.is_empty() {
                return Ok(workers);
            }
            page_token = page.next_page_token;
        }
    }

    /// One raw LeaseRooms call, not kept by the client: for tools, and
    /// routers that manage their own leases. `dp_size` 0 = as registered.
    pub async fn lease_rooms(
        &self,
        prefill_worker: &str,
        count: u32,
        dp_size: u32,
    ) -> Result<Lease, Error> {
        let request = pb::LeaseRoomsRequest {
            prefill_worker: prefill_worker.to_owned(),
            count,
            dp_size,
        };
        let response = self
            .call(request, |mut rpc, request| async move {
                rpc.lease_rooms(request).await
            })
            .await
            .map_err(|status| Error::from_status(prefill_worker, dp_size, status))?;
        Ok(Lease {
            first_base: response.first_base,
            count: response.count,
            dp_size: response.dp_size,
            valid_for: Duration::from_millis(response.valid_for_ms),
        })
    }

    /// A room for (`prefill_worker`, `dp_rank`) from the local lease, with no
    /// RPC; `None` when the lease is empty or of another dp_size (then call
    /// [`allocate`](Self::allocate)). Starts a refill when the lease runs low.
    pub fn try_allocate(&self, prefill_worker: &str, dp_rank: u32, dp_size: u32) -> Option<u64> {
        if fork::generation() != self.inner.fork_generation {
            // A copy in a forked child: the leased bases are the parent's.
            return None;
        }
        let worker = self.lease_of(prefill_worker)?;
        let mut state = worker.lock();
        if state.dp_size != dp_size || dp_rank >= dp_size {
            return None;
        }
        if self.inner.runtime.is_none() {
            // No timer drops expired blocks: check here.
            state.drop_expired(Instant::now());
        }
        let base = state.take()?;
        if state.low() && !worker.refilling.swap(true, Ordering::AcqRel) {
            drop(state);
            self.spawn_refill(worker);
        }
        Some(base + u64::from(dp_rank))
    }

    /// A room for (`prefill_worker`, `dp_rank`) aligned to `dp_size`, the
    /// size the router believes the worker has: from the lease when it can,
    /// else after leasing, else by AllocateRoom (which registers a worker
    /// that was never registered, if the server lets this client).
    pub async fn allocate(
        &self,
        prefill_worker: &str,
        dp_rank: u32,
        dp_size: u32,
    ) -> Result<u64, Error> {
        if dp_rank >= dp_size {
            return Err(Error::RankOutOfRange { dp_rank, dp_size });
        }
        // Before the refill lock too: a forked copy of it may be held forever.
        self.check_same_process().map_err(Error::Status)?;
        if let Some(room) = self.try_allocate(prefill_worker, dp_rank, dp_size) {
            return Ok(room);
        }
        let allocation = self.allocate_slow(prefill_worker, dp_rank, dp_size);
        match self.bounded(prefill_worker, dp_size, allocation).await {
            Outcome::Done(result) => result,
            Outcome::Outage(fallback, cause) => {
                self.fallback_room(fallback, prefill_worker, dp_rank, dp_size, 1, &cause)
            }
        }
    }

    /// `allocate` once the lease had no room: lease (one caller at a time
    /// per worker), else AllocateRoom.
    async fn allocate_slow(
        &self,
        prefill_worker: &str,
        dp_rank: u32,
        dp_size: u32,
    ) -> Result<u64, Error> {
        let worker = self.worker(prefill_worker);
        {
            let _one_lease = worker.refill.lock().await;
            if let Some(room) = self.try_allocate(prefill_worker, dp_rank, dp_size) {
                return Ok(room);
            }
            adopt_dp_size(&worker, dp_size);
            match self.refill_locked(&worker, dp_size, 1).await {
                Ok(()) => {}
                Err(error @ (Error::DpSizeMismatch { .. } | Error::Deregistered { .. })) => {
                    return Err(error)
                }
                Err(error) => debug!(%error, "leasing failed; falling back to AllocateRoom"),
            }
        }
        if let Some(room) = self.try_allocate(prefill_worker, dp_rank, dp_size) {
            return Ok(room);
        }
        self.allocate_by_rpc(prefill_worker, dp_rank, dp_size).await
    }

    /// Rooms for a batch, one per rank of `dp_ranks`, in order, each aligned
    /// to its own rank: all from the lease in one take when it holds enough,
    /// else after leasing enough (one lease per 2^24 numbers of the room
    /// space), else one AllocateRoom each. Each room is a single number:
    /// for a request SGLang expands into `room + i`, use
    /// [`allocate_block`](Self::allocate_block). With an outage fallback,
    /// a batch the allocator cannot serve gets fallback rooms, all of it.
    pub async fn allocate_many(
        &self,
        prefill_worker: &str,
        dp_ranks: &[u32],
        dp_size: u32,
    ) -> Result<Vec<u64>, Error> {
        if let Some(&dp_rank) = dp_ranks.iter().find(|&&dp_rank| dp_rank >= dp_size) {
            return Err(Error::RankOutOfRange { dp_rank, dp_size });
        }
        self.check_same_process().map_err(Error::Status)?;
        if dp_ranks.is_empty() {
            return Ok(Vec::new());
        }
        if let Some(rooms) = self.try_allocate_many(prefill_worker, dp_ranks, dp_size) {
            return Ok(rooms);
        }
        let allocation = self.allocate_many_slow(prefill_worker, dp_ranks, dp_size);
        match self.bounded(prefill_worker, dp_size, allocation).await {
            Outcome::Done(result) => result,
            Outcome::Outage(fallback, cause) => dp_ranks
                .iter()
                .map(|&dp_rank| {
                    self.fallback_room(fallback, prefill_worker, dp_rank, dp_size, 1, &cause)
                })
                .collect(),
        }
    }

    /// The batch from the lease in one take, or `None` (nothing taken).
    fn try_allocate_many(
        &self,
        prefill_worker: &str,
        dp_ranks: &[u32],
        dp_size: u32,
    ) -> Option<Vec<u64>> {
        if fork::generation() != self.inner.fork_generation {
            return None;
        }
        let worker = self.lease_of(prefill_worker)?;
        let mut state = worker.lock();
        if state.dp_size != dp_size {
            return None;
        }
        if self.inner.runtime.is_none() {
            state.drop_expired(Instant::now());
        }
        let bases = state.take_many(dp_ranks.len())?;
        if state.low() && !worker.refilling.swap(true, Ordering::AcqRel) {
            drop(state);
            self.spawn_refill(worker);
        }
        Some(
            bases
                .into_iter()
                .zip(dp_ranks)
                .map(|(base, &dp_rank)| base + u64::from(dp_rank))
                .collect(),
        )
    }

    async fn allocate_many_slow(
        &self,
        prefill_worker: &str,
        dp_ranks: &[u32],
        dp_size: u32,
    ) -> Result<Vec<u64>, Error> {
        let worker = self.worker(prefill_worker);
        let needed = u64::try_from(dp_ranks.len()).unwrap_or(u64::MAX);
        // Enough leases for the batch, and one more for bases that expire
        // meanwhile: the loop is bounded by the batch, not by time.
        let leases = needed / max_lease_count(dp_size) + 2;
        {
            let _one_lease = worker.refill.lock().await;
            adopt_dp_size(&worker, dp_size);
            for _ in 0..leases {
                if let Some(rooms) = self.try_allocate_many(prefill_worker, dp_ranks, dp_size) {
                    return Ok(rooms);
                }
                let missing = needed.saturating_sub(worker.lock().available);
                let missing = u32::try_from(missing).unwrap_or(u32::MAX);
                match self.refill_locked(&worker, dp_size, missing).await {
                    Ok(()) => {}
                    Err(error @ (Error::DpSizeMismatch { .. } | Error::Deregistered { .. })) => {
                        return Err(error)
                    }
                    Err(error) => {
                        debug!(%error, "leasing failed; falling back to AllocateRoom");
                        break;
                    }
                }
            }
        }
        if let Some(rooms) = self.try_allocate_many(prefill_worker, dp_ranks, dp_size) {
            return Ok(rooms);
        }
        let mut rooms = Vec::with_capacity(dp_ranks.len());
        for &dp_rank in dp_ranks {
            rooms.push(
                self.allocate_by_rpc(prefill_worker, dp_rank, dp_size)
                    .await?,
            );
        }
        Ok(rooms)
    }

    /// The first room of `num` consecutive numbers no one else gets: room
    /// `r` with `r % dp_size == first_rank`, and every number of `r..r +
    /// num` this client's alone, so item `i` of a request SGLang expands into
    /// `room + i` lands on rank `(first_rank + i) % dp_size` and meets no
    /// other request's room. (A router rotating ranks then moves on by
    /// `num`.)
    ///
    /// Why it holds: a lease's bases `first_base + j * dp_size` (`j <
    /// count`) cover `[first_base, first_base + count * dp_size)` with no
    /// gap, and the server never hands a number of it to anyone else; the
    /// block takes `ceil((first_rank + num) / dp_size)` consecutive bases of
    /// one lease, so its numbers lie inside them, and uses each base once.
    /// The other ranks' numbers of those bases go unused.
    ///
    /// Fails with [`Error::BlockSize`] when `num` is 0 or the bases needed do
    /// not fit in one lease (2^24 numbers of the room space). With an outage
    /// fallback, a fallback block lies wholly inside the fallback region.
    pub async fn allocate_block(
        &self,
        prefill_worker: &str,
        first_rank: u32,
        num: u32,
        dp_size: u32,
    ) -> Result<u64, Error> {
        if first_rank >= dp_size {
            return Err(Error::RankOutOfRange {
                dp_rank: first_rank,
                dp_size,
            });
        }
        let max_bases = max_lease_count(dp_size);
        let max = (max_bases * u64::from(dp_size)).saturating_sub(u64::from(first_rank));
        if num == 0 || u64::from(num) > max {
            return Err(Error::BlockSize { num, dp_size, max });
        }
        self.check_same_process().map_err(Error::Status)?;
        // num >= 1, so the block's last number is first_rank + num - 1
        // past its first base.
        let bases = (u64::from(first_rank) + u64::from(num) - 1) / u64::from(dp_size) + 1;
        if let Some(room) = self.try_allocate_block(prefill_worker, first_rank, bases, dp_size) {
            return Ok(room);
        }
        let allocation = self.allocate_block_slow(prefill_worker, first_rank, bases, dp_size);
        match self.bounded(prefill_worker, dp_size, allocation).await {
            Outcome::Done(result) => result,
            Outcome::Outage(fallback, cause) => self.fallback_room(
                fallback,
                prefill_worker,
                first_rank,
                dp_size,
                u64::from(num),
                &cause,
            ),
        }
    }

    /// `bases` consecutive bases of one leased block, as a room for
    /// `first_rank`; `None` when no block has that many left.
    fn try_allocate_block(
        &self,
        prefill_worker: &str,
        first_rank: u32,
        bases: u64,
        dp_size: u32,
    ) -> Option<u64> {
        if fork::generation() != self.inner.fork_generation {
            return None;
        }
        let worker = self.lease_of(prefill_worker)?;
        let mut state = worker.lock();
        if state.dp_size != dp_size {
            return None;
        }
        if self.inner.runtime.is_none() {
            state.drop_expired(Instant::now());
        }
        let base = state.take_run(bases)?;
        if state.low() && !worker.refilling.swap(true, Ordering::AcqRel) {
            drop(state);
            self.spawn_refill(worker);
        }
        Some(base + u64::from(first_rank))
    }

    async fn allocate_block_slow(
        &self,
        prefill_worker: &str,
        first_rank: u32,
        bases: u64,
        dp_size: u32,
    ) -> Result<u64, Error> {
        let worker = self.worker(prefill_worker);
        let _one_lease = worker.refill.lock().await;
        adopt_dp_size(&worker, dp_size);
        // One lease of at least `bases` bases is one block that holds the
        // run; a second try covers a lease that expired on arrival.
        for _ in 0..2 {
            if let Some(room) = self.try_allocate_block(prefill_worker, first_rank, bases, dp_size)
            {
                return Ok(room);
            }
            let at_least = u32::try_from(bases).unwrap_or(u32::MAX);
            self.refill_locked(&worker, dp_size, at_least).await?;
        }
        self.try_allocate_block(prefill_worker, first_rank, bases, dp_size)
            .ok_or_else(|| {
                Error::Status(Status::unavailable(format!(
                    "two leases of at least {bases} bases each brought no block of {bases} bases for {:?}; retry",
                    prefill_worker.escape_debug().to_string()
                )))
            })
    }

    /// Runs an allocation the lease could not serve: as it is without an
    /// outage fallback; with one, bounded by the allocation deadline, and an
    /// outage (unreachable, UNAVAILABLE, the deadline) is returned for the
    /// caller to use fallback rooms.
    async fn bounded<T>(
        &self,
        prefill_worker: &str,
        dp_size: u32,
        allocation: impl Future<Output = Result<T, Error>>,
    ) -> Outcome<'_, T> {
        let Some(fallback) = &self.inner.fallback else {
            return Outcome::Done(allocation.await);
        };
        match tokio::time::timeout(fallback.deadline, allocation).await {
            Ok(Err(error)) if is_outage(&error) => Outcome::Outage(fallback, error),
            Ok(result) => Outcome::Done(result),
            Err(_elapsed) => {
                // The lease in flight was abandoned; let one go on in the
                // background (bounded by the call timeout) so the next
                // calls find rooms as soon as the allocator answers again.
                if let Some(worker) = self.lease_of(prefill_worker) {
                    if worker.lock().dp_size == dp_size
                        && !worker.refilling.swap(true, Ordering::AcqRel)
                    {
                        self.spawn_refill(worker);
                    }
                }
                Outcome::Outage(
                    fallback,
                    Error::Status(Status::deadline_exceeded(format!(
                        "no room from the allocator within the allocation deadline of {:?}",
                        fallback.deadline
                    ))),
                )
            }
        }
    }

    /// A fallback room (the first of `num`), counted and reported.
    fn fallback_room(
        &self,
        fallback: &Fallback,
        prefill_worker: &str,
        dp_rank: u32,
        dp_size: u32,
        num: u64,
        cause: &Error,
    ) -> Result<u64, Error> {
        let Some(room) = fallback
            .region
            .pick(dp_rank, dp_size, num, fallback.draws.next())
        else {
            return Err(Error::Config(format!(
                "the allocator gave no room ({cause}) and the outage fallback region {}..={} holds no block of {num} rooms from rank {dp_rank} of dp_size {dp_size}; give a larger region",
                fallback.region.start, fallback.region.end
            )));
        };
        fallback.rooms.fetch_add(1, Ordering::Relaxed);
        if let Some(callback) = &fallback.on_fallback {
            callback(&FallbackRoom {
                prefill_worker,
                dp_rank,
                dp_size,
                room,
                num,
                cause,
            });
        }
        debug!(worker = %prefill_worker.escape_debug(), dp_rank, dp_size, room, num, %cause, "outage fallback room");
        Ok(room)
    }

    /// Fallback rooms handed out so far (a block or a batch item counts
    /// one); 0 without an outage fallback. Export it as a router metric,
    /// e.g. `room_allocator_client_fallback_rooms_total`.
    pub fn fallback_rooms(&self) -> u64 {
        self.inner
            .fallback
            .as_ref()
            .map_or(0, |fallback| fallback.rooms.load(Ordering::Relaxed))
    }

    /// The part of the room space the server hands out (GetRoomSpace).
    pub async fn room_space(&self) -> Result<RoomSpace, Error> {
        let response = self
            .call(pb::GetRoomSpaceRequest {}, |mut rpc, request| async move {
                rpc.get_room_space(request).await
            })
            .await?;
        Ok(RoomSpace {
            min_room: response.min_room,
            max_room: response.max_room,
        })
    }

    /// Makes the first requests as cheap as the later ones: connects to
    /// every endpoint (`connect` reaches only one) and leases rooms for each
    /// `(prefill_worker, dp_size)`, so the next `allocate` for them takes a
    /// leased room with no RPC. Fails if no endpoint answers, or with the
    /// first worker's error (a stale dp_size, a deregistered worker).
    pub async fn warm_up(&self, workers: &[(&str, u32)]) -> Result<(), Error> {
        self.check_same_process().map_err(Error::Status)?;
        self.inner
            .transport
            .reach_all()
            .await
            .map_err(Error::Status)?;
        for &(prefill_worker, dp_size) in workers {
            let worker = self.worker(prefill_worker);
            let _one_lease = worker.refill.lock().await;
            adopt_dp_size(&worker, dp_size);
            if worker.lock().available == 0 {
                self.refill_locked(&worker, dp_size, 1).await?;
            }
        }
        Ok(())
    }

    async fn allocate_by_rpc(
        &self,
        prefill_worker: &str,
        dp_rank: u32,
        dp_size: u32,
    ) -> Result<u64, Error> {
        self.allocate_room(prefill_worker, dp_rank, dp_size)
            .await
            .map(|(room, _)| room)
    }

    /// One raw AllocateRoom call (no lease): the room and the dp_size it is
    /// aligned to. `dp_size` 0 = as registered; another value registers a
    /// worker never registered (an admin act when the server has a token).
    pub async fn allocate_room(
        &self,
        prefill_worker: &str,
        dp_rank: u32,
        dp_size: u32,
    ) -> Result<(u64, u32), Error> {
        let request = pb::AllocateRoomRequest {
            prefill_worker: prefill_worker.to_owned(),
            dp_rank,
            dp_size,
        };
        let response = self
            .call(request, |mut rpc, request| async move {
                rpc.allocate_room(request).await
            })
            .await
            .map_err(|status| Error::from_status(prefill_worker, dp_size, status))?;
        let aligned = response.dp_size != 0
            && response.room % u64::from(response.dp_size) == u64::from(dp_rank);
        if !aligned || (dp_size != 0 && response.dp_size != dp_size) {
            // The server broke its contract; never hand such a room on.
            return Err(Error::Status(Status::internal(format!(
                "the server returned room {} of dp_size {} for rank {dp_rank} of dp_size {dp_size}",
                response.room, response.dp_size
            ))));
        }
        Ok((response.room, response.dp_size))
    }

    /// Refuses a copy of the client in a forked child: its leased bases are
    /// the parent's, who hands them out too, and its connections need the
    /// parent's runtime, so its calls would wait forever.
    fn check_same_process(&self) -> Result<(), Status> {
        if fork::generation() == self.inner.fork_generation {
            return Ok(());
        }
        Err(Status::failed_precondition(
            "this RoomClient was made before fork() and this is the forked child: its leases are the parent's and its connections run on the parent's tokio runtime; build a new RoomClient (and runtime) in the child",
        ))
    }

    fn lease_of(&self, prefill_worker: &str) -> Option<Arc<WorkerLease>> {
        self.inner
            .workers
            .read()
            .expect("worker map lock is never poisoned")
            .get(prefill_worker)
            .cloned()
    }

    fn worker(&self, prefill_worker: &str) -> Arc<WorkerLease> {
        if let Some(worker) = self.lease_of(prefill_worker) {
            return worker;
        }
        self.inner
            .workers
            .write()
            .expect("worker map lock is never poisoned")
            .entry(prefill_worker.into())
            .or_insert_with(|| {
                Arc::new(WorkerLease {
                    name: prefill_worker.into(),
                    state: Mutex::new(LeaseState::new(INITIAL_LEASE)),
                    refilling: AtomicBool::new(false),
                    refill: tokio::sync::Mutex::new(()),
                })
            })
            .clone()
    }

    fn runtime(&self) -> Option<tokio::runtime::Handle> {
        self.inner
            .runtime
            .clone()
            .or_else(|| tokio::runtime::Handle::try_current().ok())
    }

    fn spawn_refill(&self, worker: Arc<WorkerLease>) {
        let Some(runtime) = self.runtime() else {
            // No runtime to refill in: the next `allocate` leases inline.
            worker.refilling.store(false, Ordering::Release);
            return;
        };
        let client = self.clone();
        runtime.spawn(async move {
            if let Ok(_one_lease) = worker.refill.try_lock() {
                let dp_size = worker.lock().dp_size;
                if let Err(error) = client.refill_locked(&worker, dp_size, 1).await {
                    debug!(worker = %worker.name.escape_debug(), %error, "refilling the room lease failed; the next allocate leases or falls back to AllocateRoom");
                }
            }
            worker.refilling.store(false, Ordering::Release);
        });
    }

    /// Leases one more block for `worker` at `dp_size`, of at least
    /// `at_least` bases as far as one lease may hold (the caller holds the
    /// worker's refill lock). A mismatch or a deregistration drops the lease.
    async fn refill_locked(
        &self,
        worker: &Arc<WorkerLease>,
        dp_size: u32,
        at_least: u32,
    ) -> Result<(), Error> {
        let count = {
            let mut state = worker.lock();
            let max = u32::try_from(max_lease_count(dp_size)).expect("clamped to MAX_LEASE_COUNT");
            let sized =
                state.next_lease_size(Instant::now(), FAST_LEASE, INITIAL_LEASE.min(max), max);
            sized.max(at_least.min(max))
        };
        let sent_at = Instant::now();
        let lease = match self.lease_rooms(&worker.name, count, dp_size).await {
            Ok(lease) => lease,
            Err(error) => {
                if matches!(
                    error,
                    Error::DpSizeMismatch { .. } | Error::Deregistered { .. }
                ) {
                    worker.lock().drop_leases();
                }
                return Err(error);
            }
        };
        if lease.dp_size != dp_size || lease.first_base % u64::from(dp_size) != 0 {
            return Err(Error::Status(Status::internal(format!(
                "the server leased bases from {} of dp_size {} for dp_size {dp_size}",
                lease.first_base, lease.dp_size
            ))));
        }
        // Measured from before the call: the server's clock started earlier
        // than the response arrived.
        let valid_for = if lease.valid_for.is_zero() {
            self.inner.max_lease_age
        } else {
            lease.valid_for.min(self.inner.max_lease_age)
        };
        let Some(block) = Block::new(lease.first_base, lease.count, dp_size, sent_at + valid_for)
        else {
            return Err(Error::Status(Status::internal(format!(
                "the server leased {} bases from {} of dp_size {dp_size}, past the last number",
                lease.count, lease.first_base
            ))));
        };
        {
            let mut state = worker.lock();
            if state.dp_size != dp_size {
                // The caller switched dp_size meanwhile; skip these bases.
                return Ok(());
            }
            state.push(block);
        }
        self.expire_later(worker, block.expires_at);
        Ok(())
    }

    /// Drops the worker's expired blocks when `at` comes, so the hot path
    /// never reads a clock.
    fn expire_later(&self, worker: &Arc<WorkerLease>, at: Instant) {
        let Some(runtime) = self.runtime() else {
            return;
        };
        let worker: Weak<WorkerLease> = Arc::downgrade(worker);
        runtime.spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            if let Some(worker) = worker.upgrade() {
                worker.lock().drop_expired(Instant::now());
            }
        });
    }
}

/// Most bases one LeaseRooms call may take at `dp_size`: the server's
/// limits on the count and on the numbers of the room space per call.
fn max_lease_count(dp_size: u32) -> u64 {
    (MAX_LEASE_NUMBERS / u64::from(dp_size.max(1))).clamp(1, u64::from(MAX_LEASE_COUNT))
}

/// Makes `dp_size` the worker's lease alignment (the caller holds its refill
/// lock), and drops expired blocks.
fn adopt_dp_size(worker: &WorkerLease, dp_size: u32) {
    let mut state = worker.lock();
    if state.dp_size != dp_size {
        // The caller's view of the worker changed: the old lease is of no
        // use for the new alignment.
        state.drop_leases();
        state.dp_size = dp_size;
    }
    state.drop_expired(Instant::now());
}

/// How an allocation the lease could not serve ended.
enum Outcome<'a, T> {
    /// The allocator's answer (or a refusal).
    Done(Result<T, Error>),
    /// An outage, and the client's fallback to stand in for it.
    Outage(&'a Fallback, Error),
}

impl std::fmt::Debug for RoomClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoomClient").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_spreads_worker_names() {
        let hash = |s: &str| {
            let mut h = Fnv::default();
            h.write(s.as_bytes());
            h.finish()
        };
        assert_ne!(hash("prefill-0"), hash("prefill-1"));
    }
}
