//! The gRPC glue: requests in, allocator calls, responses out. Domain errors
//! become statuses in exactly one place, `impl From<Error> for Status`.

use std::future::Future;
use std::time::Instant;

use tonic::{Code, Request, Response, Status};
use tracing::{debug, instrument, warn};

use crate::allocator::{Allocator, Error, WorkerInfo};
use crate::metrics::Metrics;
use crate::pb;
use crate::pb::room_allocator_service_server::RoomAllocatorService;
use crate::space::SpaceError;
use std::sync::Arc;

pub use crate::pb::room_allocator_service_server::RoomAllocatorServiceServer;

/// Metadata key on FAILED_PRECONDITION for a dp_size mismatch: the dp_size
/// the worker is registered with.
pub const REGISTERED_DP_SIZE: &str = "registered-dp-size";

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        let code = match &error {
            Error::EmptyWorker
            | Error::WorkerTooLong { .. }
            | Error::LeaseCount { .. }
            | Error::Space(
                SpaceError::DpSizeZero
                | SpaceError::DpSizeTooLarge { .. }
                | SpaceError::RankOutOfRange { .. }
                | SpaceError::RoomZero
                | SpaceError::RoomTooLarge { .. },
            ) => Code::InvalidArgument,
            Error::UnknownWorker { .. } | Error::UnknownRoom { .. } | Error::Pruned { .. } => {
                Code::NotFound
            }
            Error::DpSizeMismatch { .. } => Code::FailedPrecondition,
            Error::Space(SpaceError::Exhausted { .. }) | Error::TooManyWorkers { .. } => {
                Code::ResourceExhausted
            }
            Error::Store(_) => Code::Unavailable,
            Error::Unauthenticated { .. } => Code::Unauthenticated,
        };
        let mut status = Status::new(code, error.to_string());
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

/// The canonical name of a gRPC code, as grpcurl and other stacks print it.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Who may call what: with a token, RegisterWorker and DeregisterWorker
/// always need it, the other calls when `all` is set.
#[derive(Clone)]
pub struct Auth {
    expected: String,
    all: bool,
}

impl Auth {
    pub fn new(token: &str, all: bool) -> Self {
        Self {
            expected: format!("Bearer {}", token.trim()),
            all,
        }
    }

    fn check<T>(&self, request: &Request<T>, admin: bool) -> Result<(), Error> {
        if !admin && !self.all {
            return Ok(());
        }
        let presented = request
            .metadata()
            .get("authorization")
            .map(|value| value.as_bytes());
        match presented {
            Some(value) if constant_time_eq(value, self.expected.as_bytes()) => Ok(()),
            Some(_) => Err(Error::Unauthenticated { presented: true }),
            None => Err(Error::Unauthenticated { presented: false }),
        }
    }
}

/// Compares without an early exit, so timing does not reveal the token.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

/// `RoomAllocatorService` over an [`Allocator`].
pub struct Service {
    allocator: Allocator,
    metrics: Arc<Metrics>,
    auth: Option<Auth>,
}

impl Service {
    pub fn new(allocator: Allocator, metrics: Arc<Metrics>, auth: Option<Auth>) -> Self {
        Self {
            allocator,
            metrics,
            auth,
        }
    }

    /// Every rpc: check the token, run `call` on the request, then count,
    /// time and log the outcome.
    async fn handle<R, T, F>(
        &self,
        method: &'static str,
        admin: bool,
        request: Request<R>,
        call: impl FnOnce(R) -> F,
    ) -> Result<Response<T>, Status>
    where
        F: Future<Output = Result<T, Error>>,
    {
        let started = Instant::now();
        let authorized = self
            .auth
            .as_ref()
            .map_or(Ok(()), |auth| auth.check(&request, admin));
        let result = match authorized {
            Ok(()) => call(request.into_inner()).await,
            Err(denied) => Err(denied),
        };
        self.finish(method, started, result)
    }

    /// Counts and times one call, and logs its outcome at the level it deserves.
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
            Err(status) if code == Code::Unavailable => {
                warn!(
                    code = code_name(code),
                    message = status.message(),
                    "request failed"
                )
            }
            Err(status) => debug!(
                code = code_name(code),
                message = status.message(),
                "request refused"
            ),
            Ok(_) => debug!("request served"),
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
    #[instrument(level = "debug", skip_all, fields(worker = %request.get_ref().prefill_worker, dp_size = request.get_ref().dp_size))]
    async fn register_worker(
        &self,
        request: Request<pb::RegisterWorkerRequest>,
    ) -> Result<Response<pb::RegisterWorkerResponse>, Status> {
        self.handle("RegisterWorker", true, request, |request| async move {
            self.allocator
                .register(&request.prefill_worker, request.dp_size)
                .await
                .map(|info| pb::RegisterWorkerResponse {
                    worker: Some(worker_info(info)),
                })
        })
        .await
    }

    #[instrument(level = "debug", skip_all, fields(worker = %request.get_ref().prefill_worker, dp_rank = request.get_ref().dp_rank, dp_size = request.get_ref().dp_size))]
    async fn allocate_room(
        &self,
        request: Request<pb::AllocateRoomRequest>,
    ) -> Result<Response<pb::AllocateRoomResponse>, Status> {
        self.handle("AllocateRoom", false, request, |request| async move {
            self.allocator
                .allocate(&request.prefill_worker, request.dp_rank, request.dp_size)
                .await
                .map(|(room, dp_size)| pb::AllocateRoomResponse {
                    room: room.get(),
                    dp_size: dp_size.get(),
                })
        })
        .await
    }

    #[instrument(level = "debug", skip_all, fields(worker = %request.get_ref().prefill_worker, count = request.get_ref().count))]
    async fn lease_rooms(
        &self,
        request: Request<pb::LeaseRoomsRequest>,
    ) -> Result<Response<pb::LeaseRoomsResponse>, Status> {
        self.handle("LeaseRooms", false, request, |request| async move {
            self.allocator
                .lease(&request.prefill_worker, request.count)
                .await
                .map(|lease| pb::LeaseRoomsResponse {
                    first_base: lease.first_base.get(),
                    count: lease.count,
                    dp_size: lease.dp_size.get(),
                })
        })
        .await
    }

    #[instrument(level = "debug", skip_all, fields(room = request.get_ref().room))]
    async fn resolve_rank(
        &self,
        request: Request<pb::ResolveRankRequest>,
    ) -> Result<Response<pb::ResolveRankResponse>, Status> {
        self.handle("ResolveRank", false, request, |request| async move {
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

    #[instrument(level = "debug", skip_all)]
    async fn list_workers(
        &self,
        request: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        self.handle("ListWorkers", false, request, |_| async move {
            let workers = self.allocator.list().into_iter().map(worker_info).collect();
            Ok(pb::ListWorkersResponse { workers })
        })
        .await
    }

    #[instrument(level = "debug", skip_all, fields(worker = %request.get_ref().prefill_worker))]
    async fn deregister_worker(
        &self,
        request: Request<pb::DeregisterWorkerRequest>,
    ) -> Result<Response<pb::DeregisterWorkerResponse>, Status> {
        self.handle("DeregisterWorker", true, request, |request| async move {
            self.allocator
                .deregister(&request.prefill_worker)
                .await
                .map(|()| pb::DeregisterWorkerResponse {})
        })
        .await
    }
}
