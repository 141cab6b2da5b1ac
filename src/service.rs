//! The gRPC glue: requests in, allocator calls, responses out. Domain errors
//! become statuses in exactly one place, `impl From<Error> for Status`.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use tonic::{Code, Request, Response, Status};
use tracing::{debug, info, instrument, warn};

use crate::allocator::{Allocator, Error, Escaped, Registrar, WorkerInfo};
use crate::metrics::Metrics;
use crate::pb;
use crate::pb::room_allocator_service_server::RoomAllocatorService;
use crate::space::SpaceError;

pub use crate::pb::room_allocator_service_server::RoomAllocatorServiceServer;
pub use room_allocator_client::{code_name, ERROR_REASON, REGISTERED_DP_SIZE};

/// The status code of an error and its machine-readable reason, sent as
/// `error-reason` metadata.
fn classify(error: &Error) -> (Code, &'static str) {
    match error {
        Error::EmptyWorker
        | Error::WorkerTooLong { .. }
        | Error::WorkerControlCharacter { .. }
        | Error::LeaseCount { .. }
        | Error::LeaseTooLarge { .. }
        | Error::PageSize { .. }
        | Error::PageToken
        | Error::Space(
            SpaceError::DpSizeZero
            | SpaceError::DpSizeTooLarge { .. }
            | SpaceError::RankOutOfRange { .. }
            | SpaceError::RoomZero
            | SpaceError::RoomTooLarge { .. }
            | SpaceError::EmptyBounds { .. },
        ) => (Code::InvalidArgument, "INVALID_ARGUMENT"),
        Error::UnknownWorker { .. } => (Code::NotFound, "WORKER_NOT_FOUND"),
        Error::Deregistered { .. } => (Code::FailedPrecondition, "WORKER_DEREGISTERED"),
        Error::DpSizeMismatch { .. } => (Code::FailedPrecondition, "DP_SIZE_MISMATCH"),
        Error::UnknownRoom { .. } => (Code::NotFound, "ROOM_NOT_FOUND"),
        Error::Pruned { .. } => (Code::NotFound, "ROOM_PRUNED"),
        Error::Space(SpaceError::Exhausted { .. }) => (Code::ResourceExhausted, "SPACE_EXHAUSTED"),
        Error::TooManyWorkers { .. } => (Code::ResourceExhausted, "TOO_MANY_WORKERS"),
        Error::Store(_) => (Code::Unavailable, "STORE_UNAVAILABLE"),
        Error::Unauthenticated { .. } | Error::RegistrationNeedsToken { .. } => {
            (Code::Unauthenticated, "UNAUTHENTICATED")
        }
    }
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        let (code, reason) = classify(&error);
        let mut status = Status::new(code, error.to_string());
        status.metadata_mut().insert(
            ERROR_REASON,
            reason.parse().expect("reasons are valid metadata"),
        );
        if let Error::DpSizeMismatch { registered, .. } = &error {
            // Machine-readable too, so clients need not parse the message.
            status.metadata_mut().insert(
                REGISTERED_DP_SIZE,
                registered
                    .to_string()
                    .parse()
                    .expect("digits are valid metadata"),
            );
        }
        status
    }
}

/// Who may call what: with a token, RegisterWorker and DeregisterWorker
/// always need it, and so does registering through AllocateRoom; the other
/// calls need it when `all` is set. Any of several tokens is accepted (a
/// rotation adds the new token, moves the callers, then drops the old one),
/// and they can be replaced while serving.
#[derive(Clone)]
pub struct Auth {
    expected: Arc<RwLock<Vec<String>>>,
    all: bool,
}

impl Auth {
    pub fn new(tokens: &[String], all: bool) -> Self {
        Self {
            expected: Arc::new(RwLock::new(tokens.iter().map(|t| bearer(t)).collect())),
            all,
        }
    }

    /// Takes new tokens (a rotated `--auth-token-file`) for later calls.
    pub fn replace(&self, tokens: &[String]) {
        *self.expected.write().expect("token lock is never poisoned") =
            tokens.iter().map(|t| bearer(t)).collect();
    }

    /// Whether the request carries the token: `Err` says how it fails.
    fn verify<T>(&self, request: &Request<T>) -> Result<(), Error> {
        let presented = request
            .metadata()
            .get("authorization")
            .map(|value| value.as_bytes());
        let expected = self.expected.read().expect("token lock is never poisoned");
        match presented {
            // Every token compared, so timing does not tell which matched.
            Some(value)
                if expected.iter().fold(false, |any, token| {
                    constant_time_eq(value, token.as_bytes()) | any
                }) =>
            {
                Ok(())
            }
            Some(_) => Err(Error::Unauthenticated { presented: true }),
            None => Err(Error::Unauthenticated { presented: false }),
        }
    }

    fn check<T>(&self, request: &Request<T>, admin: bool) -> Result<(), Error> {
        if !admin && !self.all {
            return Ok(());
        }
        self.verify(request)
    }

    /// Whether AllocateRoom may register a worker for this caller.
    fn registrar<T>(&self, request: &Request<T>) -> Registrar {
        match self.verify(request) {
            Ok(()) => Registrar::Allowed,
            Err(Error::Unauthenticated { presented }) => Registrar::Denied { presented },
            Err(_) => Registrar::Denied { presented: true },
        }
    }
}

fn bearer(token: &str) -> String {
    format!("Bearer {}", token.trim())
}

/// Compares without an early exit, so timing does not reveal the token.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

/// At most [`REFUSED_LOGS_PER_SECOND`] "request refused" lines a second; the
/// rest are counted and the count is logged with the next line let through.
struct RefusalLog {
    second: AtomicU64,
    logged: AtomicU64,
    suppressed: AtomicU64,
    epoch: Instant,
}

/// Refused calls logged per second at most: a misconfigured router retrying
/// in a loop must not flood the log (the metrics count every one).
const REFUSED_LOGS_PER_SECOND: u64 = 10;

impl RefusalLog {
    fn new() -> Self {
        Self {
            second: AtomicU64::new(0),
            logged: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// `Some(suppressed so far)` if this line may be logged.
    fn admit(&self) -> Option<u64> {
        let now = self.epoch.elapsed().as_secs();
        if self.second.swap(now, Ordering::AcqRel) != now {
            self.logged.store(0, Ordering::Release);
        }
        if self.logged.fetch_add(1, Ordering::AcqRel) < REFUSED_LOGS_PER_SECOND {
            Some(self.suppressed.swap(0, Ordering::AcqRel))
        } else {
            self.suppressed.fetch_add(1, Ordering::AcqRel);
            None
        }
    }
}

/// `RoomAllocatorService` over an [`Allocator`].
pub struct Service {
    allocator: Allocator,
    metrics: Arc<Metrics>,
    auth: Option<Auth>,
    refusals: RefusalLog,
}

impl Service {
    pub fn new(allocator: Allocator, metrics: Arc<Metrics>, auth: Option<Auth>) -> Self {
        Self {
            allocator,
            metrics,
            auth,
            refusals: RefusalLog::new(),
        }
    }

    /// Every rpc: check the token, run `call` on the request, then count,
    /// time and log the outcome.
    async fn handle<R, T, F>(
        &self,
        method: &'static str,
        admin: bool,
        request: Request<R>,
        call: impl FnOnce(R, Registrar) -> F,
    ) -> Result<Response<T>, Status>
    where
        F: Future<Output = Result<T, Error>>,
    {
        let started = Instant::now();
        let (authorized, registrar) = match &self.auth {
            None => (Ok(()), Registrar::Allowed),
            Some(auth) => (auth.check(&request, admin), auth.registrar(&request)),
        };
        let result = match authorized {
            Ok(()) => call(request.into_inner(), registrar).await,
            Err(denied) => Err(denied),
        };
        self.finish(method, started, result)
    }

    /// Counts and times one call, and logs its outcome at the level it
    /// deserves: store failures at warn, refusals at info (rate-limited).
    fn finish<T>(
        &self,
        method: &'static str,
        started: Instant,
        result: Result<T, Error>,
    ) -> Result<Response<T>, Status> {
        let result = result.map_err(Status::from);
        let code = result.as_ref().map_or_else(|s| s.code(), |_| Code::Ok);
        self.metrics
            .observe_request(method, code_name(code), started.elapsed());
        match &result {
            Err(status) if code == Code::Unavailable => warn!(
                method,
                code = code_name(code),
                error = status.message(),
                "request failed"
            ),
            Err(status) => {
                if let Some(suppressed) = self.refusals.admit() {
                    info!(
                        method,
                        code = code_name(code),
                        error = status.message(),
                        suppressed_since_last = suppressed,
                        "request refused"
                    );
                }
            }
            Ok(_) => debug!(method, "request served"),
        }
        result.map(Response::new)
    }
}

fn worker_info(info: WorkerInfo) -> pb::WorkerInfo {
    pb::WorkerInfo {
        prefill_worker: info.prefill_worker,
        dp_size: info.dp_size.get(),
        rooms_issued: info.rooms_issued,
    }
}

#[tonic::async_trait]
impl RoomAllocatorService for Service {
    #[instrument(level = "debug", skip_all, fields(worker = %Escaped(&request.get_ref().prefill_worker), dp_size = request.get_ref().dp_size))]
    async fn register_worker(
        &self,
        request: Request<pb::RegisterWorkerRequest>,
    ) -> Result<Response<pb::RegisterWorkerResponse>, Status> {
        self.handle("RegisterWorker", true, request, |request, _| async move {
            self.allocator
                .register(&request.prefill_worker, request.dp_size)
                .await
                .map(|info| pb::RegisterWorkerResponse {
                    worker: Some(worker_info(info)),
                })
        })
        .await
    }

    #[instrument(level = "debug", skip_all, fields(worker = %Escaped(&request.get_ref().prefill_worker), dp_rank = request.get_ref().dp_rank, dp_size = request.get_ref().dp_size))]
    async fn allocate_room(
        &self,
        request: Request<pb::AllocateRoomRequest>,
    ) -> Result<Response<pb::AllocateRoomResponse>, Status> {
        self.handle(
            "AllocateRoom",
            false,
            request,
            |request, registrar| async move {
                self.allocator
                    .allocate(
                        &request.prefill_worker,
                        request.dp_rank,
                        request.dp_size,
                        registrar,
                    )
                    .await
                    .map(|(room, dp_size)| pb::AllocateRoomResponse {
                        room: room.get(),
                        dp_size: dp_size.get(),
                    })
            },
        )
        .await
    }

    #[instrument(level = "debug", skip_all, fields(worker = %Escaped(&request.get_ref().prefill_worker), count = request.get_ref().count, dp_size = request.get_ref().dp_size))]
    async fn lease_rooms(
        &self,
        request: Request<pb::LeaseRoomsRequest>,
    ) -> Result<Response<pb::LeaseRoomsResponse>, Status> {
        self.handle("LeaseRooms", false, request, |request, _| async move {
            self.allocator
                .lease(&request.prefill_worker, request.count, request.dp_size)
                .await
                .map(|lease| pb::LeaseRoomsResponse {
                    first_base: lease.first_base.get(),
                    count: lease.count,
                    dp_size: lease.dp_size.get(),
                    valid_for_ms: u64::try_from(lease.valid_for.as_millis()).unwrap_or(u64::MAX),
                })
        })
        .await
    }

    #[instrument(level = "debug", skip_all, fields(room = request.get_ref().room))]
    async fn resolve_rank(
        &self,
        request: Request<pb::ResolveRankRequest>,
    ) -> Result<Response<pb::ResolveRankResponse>, Status> {
        self.handle("ResolveRank", false, request, |request, _| async move {
            self.allocator
                .resolve(request.room)
                .await
                .map(|resolved| pb::ResolveRankResponse {
                    prefill_worker: resolved.prefill_worker.to_string(),
                    dp_rank: resolved.dp_rank.get(),
                    dp_size: resolved.dp_size.get(),
                })
        })
        .await
    }

    #[instrument(level = "debug", skip_all, fields(page_size = request.get_ref().page_size))]
    async fn list_workers(
        &self,
        request: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        self.handle("ListWorkers", false, request, |request, _| async move {
            let page = self
                .allocator
                .list(request.page_size, &request.page_token)?;
            Ok(pb::ListWorkersResponse {
                workers: page.workers.into_iter().map(worker_info).collect(),
                next_page_token: page.next_page_token,
            })
        })
        .await
    }

    #[instrument(level = "debug", skip_all, fields(worker = %Escaped(&request.get_ref().prefill_worker)))]
    async fn deregister_worker(
        &self,
        request: Request<pb::DeregisterWorkerRequest>,
    ) -> Result<Response<pb::DeregisterWorkerResponse>, Status> {
        self.handle("DeregisterWorker", true, request, |request, _| async move {
            self.allocator
                .deregister(&request.prefill_worker)
                .await
                .map(|()| pb::DeregisterWorkerResponse {})
        })
        .await
    }

    #[instrument(level = "debug", skip_all)]
    async fn get_room_space(
        &self,
        request: Request<pb::GetRoomSpaceRequest>,
    ) -> Result<Response<pb::RoomSpace>, Status> {
        self.handle("GetRoomSpace", false, request, |_, _| async move {
            let bounds = self.allocator.limits().bounds;
            Ok(pb::RoomSpace {
                min_room: bounds.min_room(),
                max_room: bounds.max_room(),
            })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_logs_are_rate_limited_and_count_what_they_drop() {
        let log = RefusalLog::new();
        let admitted = (0..100).filter(|_| log.admit().is_some()).count();
        assert_eq!(admitted as u64, REFUSED_LOGS_PER_SECOND);
        assert_eq!(
            log.suppressed.load(Ordering::Acquire),
            100 - REFUSED_LOGS_PER_SECOND
        );
    }

    #[test]
    fn every_error_carries_its_reason() {
        let status = Status::from(Error::DpSizeMismatch {
            worker: "\"w\"".into(),
            registered: 4,
            requested: 8,
        });
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(
            status.metadata().get(ERROR_REASON).map(|v| v.to_str().ok()),
            Some(Some("DP_SIZE_MISMATCH"))
        );
        assert_eq!(
            status
                .metadata()
                .get(REGISTERED_DP_SIZE)
                .map(|v| v.to_str().ok()),
            Some(Some("4"))
        );
    }
}
