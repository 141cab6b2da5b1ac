//! `RoomClient`: rooms for a router with no RPC on the hot path.
//!
//! The client leases blocks of bases with LeaseRooms and makes each room
//! locally as `base + dp_rank`, so `room % dp_size == dp_rank` exactly as if
//! AllocateRoom had answered. One background task per worker refills the
//! lease when it falls under half of the current lease size, and lease sizes
//! double while leases last under a second, so a busy router almost never
//! waits. If leasing fails the client falls back to AllocateRoom.
//!
//! Bases leased but never used (a router restarting, a realignment dropping
//! the rest of a lease) are simply skipped: the room space has 2^63 numbers,
//! and skipping never makes a duplicate. Each base is used at most once.
//!
//! ```no_run
//! # async fn demo() -> Result<(), room_allocator::client::ClientError> {
//! use room_allocator::client::RoomClient;
//! let client = RoomClient::connect("http://127.0.0.1:50051").await?;
//! client.register("prefill-0", 4).await?;
//! let room = client.allocate("prefill-0", 3, 4).await?;
//! assert_eq!(room % 4, 3);
//! # Ok(()) }
//! ```

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use thiserror::Error;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use tracing::{debug, warn};

use crate::pb;
use crate::pb::room_allocator_service_client::RoomAllocatorServiceClient;

/// First lease size; doubles while leases run out within [`FAST_LEASE`].
const INITIAL_LEASE: u32 = 256;
/// Largest lease: LeaseRooms' own limit.
const MAX_LEASE: u32 = 1_000_000;
/// A lease used up faster than this means the next one should be larger.
const FAST_LEASE: Duration = Duration::from_secs(1);
/// Connection attempts back off from this...
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
/// ...to at most this.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Errors of the client, typed where a router would act on them.
#[derive(Debug, Clone, Error)]
pub enum ClientError {
    #[error(
        "prefill_worker {worker:?} is registered with dp_size {registered}, not {requested}; refresh the worker's dp_size or register it again"
    )]
    DpSizeMismatch {
        worker: String,
        registered: u32,
        requested: u32,
    },
    #[error("dp_rank {dp_rank} is out of range for dp_size {dp_size}")]
    RankOutOfRange { dp_rank: u32, dp_size: u32 },
    #[error("cannot connect to {url} after {attempts} attempts: {reason}")]
    Connect {
        url: String,
        attempts: u32,
        reason: String,
    },
    #[error("{}: {}", crate::service::code_name(.0.code()), .0.message())]
    Status(Status),
}

impl From<Status> for ClientError {
    fn from(status: Status) -> Self {
        ClientError::Status(status)
    }
}

/// FNV-1a: worker names are short and trusted, and the hot path hashes one
/// per room; SipHash would be a third of its cost.
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

/// A cheap-to-clone, thread-safe handle; clones share leases.
#[derive(Clone)]
pub struct RoomClient {
    inner: Arc<Inner>,
}

struct Inner {
    rpc: RoomAllocatorServiceClient<Channel>,
    workers: RwLock<FastMap<Box<str>, Arc<WorkerLease>>>,
    /// Where refills run, so `try_allocate` works from any thread.
    runtime: Option<tokio::runtime::Handle>,
}

struct WorkerLease {
    name: Box<str>,
    state: Mutex<LeaseState>,
    refilling: AtomicBool,
}

#[derive(Debug)]
struct LeaseState {
    /// dp_size the leased bases are aligned to; 0 = none leased yet.
    dp_size: u32,
    /// Unused blocks: (next base, bases left).
    blocks: VecDeque<(u64, u64)>,
    available: u64,
    lease_size: u32,
    last_lease_at: Instant,
}

impl LeaseState {
    fn take(&mut self) -> Option<u64> {
        let (next, left) = self.blocks.front_mut()?;
        let base = *next;
        *next += u64::from(self.dp_size);
        *left -= 1;
        if *left == 0 {
            self.blocks.pop_front();
        }
        self.available -= 1;
        Some(base)
    }

    fn low(&self) -> bool {
        self.available <= u64::from(self.lease_size / 2)
    }

    fn drop_leases(&mut self) {
        self.blocks.clear();
        self.available = 0;
    }
}

impl RoomClient {
    /// Connects to `url`, retrying with backoff for up to `patience`.
    pub async fn connect_with_patience(url: &str, patience: Duration) -> Result<Self, ClientError> {
        let endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(|error| ClientError::Connect {
                url: url.to_owned(),
                attempts: 0,
                reason: error.to_string(),
            })?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true);
        let deadline = Instant::now() + patience;
        let mut backoff = FIRST_BACKOFF;
        let mut attempts = 0;
        loop {
            attempts += 1;
            match endpoint.connect().await {
                Ok(channel) => return Ok(Self::from_channel(channel)),
                Err(error) if Instant::now() + backoff > deadline => {
                    return Err(ClientError::Connect {
                        url: url.to_owned(),
                        attempts,
                        reason: error.to_string(),
                    })
                }
                Err(error) => {
                    debug!(%url, %error, ?backoff, "connect failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Connects to `url`, retrying with backoff for up to 30 s.
    pub async fn connect(url: &str) -> Result<Self, ClientError> {
        Self::connect_with_patience(url, Duration::from_secs(30)).await
    }

    /// Uses an existing channel (e.g. with TLS or a load balancer). Called
    /// inside a tokio runtime, refills run there; otherwise they run in
    /// whatever runtime calls [`allocate`](Self::allocate).
    pub fn from_channel(channel: Channel) -> Self {
        Self {
            inner: Arc::new(Inner {
                rpc: RoomAllocatorServiceClient::new(channel),
                workers: RwLock::new(FastMap::default()),
                runtime: tokio::runtime::Handle::try_current().ok(),
            }),
        }
    }

    /// Registers (or realigns) a prefill worker.
    pub async fn register(&self, prefill_worker: &str, dp_size: u32) -> Result<(), ClientError> {
        self.inner
            .rpc
            .clone()
            .register_worker(pb::RegisterWorkerRequest {
                prefill_worker: prefill_worker.to_owned(),
                dp_size,
            })
            .await?;
        Ok(())
    }

    /// Which worker, rank and dp_size `room` belongs to.
    pub async fn resolve(&self, room: u64) -> Result<pb::ResolveRankResponse, ClientError> {
        let response = self
            .inner
            .rpc
            .clone()
            .resolve_rank(pb::ResolveRankRequest { room })
            .await?;
        Ok(response.into_inner())
    }

    /// A room for (`prefill_worker`, `dp_rank`) from the local lease, with no
    /// RPC; `None` when the lease is empty or of another dp_size (then call
    /// [`allocate`](Self::allocate)). Starts a refill when the lease runs low.
    pub fn try_allocate(&self, prefill_worker: &str, dp_rank: u32, dp_size: u32) -> Option<u64> {
        let worker = self
            .inner
            .workers
            .read()
            .expect("worker map lock is never poisoned")
            .get(prefill_worker)
            .cloned()?;
        let mut state = worker.state.lock().expect("lease lock is never poisoned");
        if state.dp_size != dp_size || dp_rank >= dp_size {
            return None;
        }
        let base = state.take()?;
        if state.low() && !worker.refilling.swap(true, Ordering::AcqRel) {
            drop(state);
            self.spawn_refill(worker);
        }
        Some(base + u64::from(dp_rank))
    }

    /// A room for (`prefill_worker`, `dp_rank`), aligned to `dp_size`: from
    /// the lease when it can, else after leasing, else by AllocateRoom.
    pub async fn allocate(
        &self,
        prefill_worker: &str,
        dp_rank: u32,
        dp_size: u32,
    ) -> Result<u64, ClientError> {
        if dp_rank >= dp_size {
            return Err(ClientError::RankOutOfRange { dp_rank, dp_size });
        }
        if let Some(room) = self.try_allocate(prefill_worker, dp_rank, dp_size) {
            return Ok(room);
        }
        let worker = self.worker(prefill_worker);
        {
            let mut state = worker.state.lock().expect("lease lock is never poisoned");
            if state.dp_size != dp_size {
                // The caller's view of the worker changed: the old lease is of
                // no use for the new alignment.
                state.drop_leases();
                state.dp_size = dp_size;
            }
        }
        match self.refill_leased(&worker, dp_size).await {
            Ok(()) => {
                if let Some(room) = self.try_allocate(prefill_worker, dp_rank, dp_size) {
                    return Ok(room);
                }
            }
            Err(mismatch @ ClientError::DpSizeMismatch { .. }) => return Err(mismatch),
            Err(error) => debug!(%error, "leasing failed; falling back to AllocateRoom"),
        }
        self.allocate_by_rpc(prefill_worker, dp_rank, dp_size).await
    }

    async fn allocate_by_rpc(
        &self,
        prefill_worker: &str,
        dp_rank: u32,
        dp_size: u32,
    ) -> Result<u64, ClientError> {
        let result = self
            .inner
            .rpc
            .clone()
            .allocate_room(pb::AllocateRoomRequest {
                prefill_worker: prefill_worker.to_owned(),
                dp_rank,
                dp_size,
            })
            .await;
        match result {
            Ok(response) => Ok(response.into_inner().room),
            Err(status) if status.code() == Code::FailedPrecondition => {
                Err(self.mismatch(prefill_worker, dp_size, None, status))
            }
            Err(status) => Err(status.into()),
        }
    }

    fn mismatch(
        &self,
        prefill_worker: &str,
        requested: u32,
        registered: Option<u32>,
        status: Status,
    ) -> ClientError {
        let registered = registered.or_else(|| {
            status
                .metadata()
                .get(crate::service::REGISTERED_DP_SIZE)?
                .to_str()
                .ok()?
                .parse()
                .ok()
        });
        match registered {
            Some(registered) => ClientError::DpSizeMismatch {
                worker: prefill_worker.to_owned(),
                registered,
                requested,
            },
            None => ClientError::Status(status),
        }
    }

    fn worker(&self, prefill_worker: &str) -> Arc<WorkerLease> {
        if let Some(worker) = self
            .inner
            .workers
            .read()
            .expect("worker map lock is never poisoned")
            .get(prefill_worker)
        {
            return worker.clone();
        }
        self.inner
            .workers
            .write()
            .expect("worker map lock is never poisoned")
            .entry(prefill_worker.into())
            .or_insert_with(|| {
                Arc::new(WorkerLease {
                    name: prefill_worker.into(),
                    state: Mutex::new(LeaseState {
                        dp_size: 0,
                        blocks: VecDeque::new(),
                        available: 0,
                        lease_size: INITIAL_LEASE,
                        last_lease_at: Instant::now(),
                    }),
                    refilling: AtomicBool::new(false),
                })
            })
            .clone()
    }

    fn spawn_refill(&self, worker: Arc<WorkerLease>) {
        let Some(runtime) = self
            .inner
            .runtime
            .clone()
            .or_else(|| tokio::runtime::Handle::try_current().ok())
        else {
            // No runtime to refill in: the next `allocate` leases inline.
            worker.refilling.store(false, Ordering::Release);
            return;
        };
        let client = self.clone();
        runtime.spawn(async move {
            let dp_size = worker.state.lock().expect("lease lock").dp_size;
            if let Err(error) = client.refill_leased(&worker, dp_size).await {
                warn!(worker = %worker.name, %error, "refilling the room lease failed; allocation falls back to AllocateRoom");
            }
            worker.refilling.store(false, Ordering::Release);
        });
    }

    /// Leases one more block for `worker` at `dp_size`, growing the lease
    /// size while leases run out fast.
    async fn refill_leased(&self, worker: &WorkerLease, dp_size: u32) -> Result<(), ClientError> {
        let count = {
            let mut state = worker.state.lock().expect("lease lock");
            let now = Instant::now();
            if now.duration_since(state.last_lease_at) < FAST_LEASE {
                state.lease_size = state.lease_size.saturating_mul(2).min(MAX_LEASE);
            } else if now.duration_since(state.last_lease_at) > FAST_LEASE * 10 {
                state.lease_size = (state.lease_size / 2).max(INITIAL_LEASE);
            }
            state.last_lease_at = now;
            state.lease_size
        };
        let request = pb::LeaseRoomsRequest {
            prefill_worker: worker.name.to_string(),
            count,
        };
        let mut rpc = self.inner.rpc.clone();
        let lease = match rpc.lease_rooms(request.clone()).await {
            Ok(response) => response.into_inner(),
            Err(status) if status.code() == Code::NotFound => {
                // An unknown worker: register it with the caller's dp_size
                // (as AllocateRoom would), then lease.
                self.register(&worker.name, dp_size).await?;
                rpc.lease_rooms(request).await?.into_inner()
            }
            Err(status) => return Err(status.into()),
        };
        if lease.dp_size != dp_size {
            let status = Status::failed_precondition("leased bases have another dp_size");
            return Err(self.mismatch(&worker.name, dp_size, Some(lease.dp_size), status));
        }
        let mut state = worker.state.lock().expect("lease lock");
        if state.dp_size == lease.dp_size {
            state
                .blocks
                .push_back((lease.first_base, u64::from(lease.count)));
            state.available += u64::from(lease.count);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_hands_out_each_base_once_in_order() {
        let mut state = LeaseState {
            dp_size: 4,
            blocks: VecDeque::from([(8, 2), (100, 1)]),
            available: 3,
            lease_size: 4,
            last_lease_at: Instant::now(),
        };
        assert_eq!(state.take(), Some(8));
        assert_eq!(state.take(), Some(12));
        assert!(state.low());
        assert_eq!(state.take(), Some(100));
        assert_eq!(state.take(), None);
        assert_eq!(state.available, 0);
    }

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
