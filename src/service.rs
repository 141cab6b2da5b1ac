//! The gRPC glue: requests in, allocator calls, responses out. Domain errors
//! become statuses in exactly one place, `impl From<Error> for Status`.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use subtle::ConstantTimeEq;
use tonic::{Code, Request, Response, Status};
use tracing::{debug, info, instrument, warn};

use crate::allocator::{Allocator, Error, Escaped, Registrar, WorkerInfo};
use crate::metrics::{Method, Metrics};
use crate::pb;
use crate::pb::room_allocator_service_server::RoomAllocatorService;
use crate::secret::Secret;
use crate::space::SpaceError;
use crate::store::StoreError;

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
        // A store that broke its promise (an overlapping range) serves no
        // room from it; to the caller it is a store that cannot hand out
        // rooms, like every other store failure (the log says which).
        Error::Store(StoreError::Overlap { .. }) => (Code::Unavailable, "STORE_UNAVAILABLE"),
        // The caller's rate, not the store's health.
        Error::Store(StoreError::LookupsThrottled { .. }) => {
            (Code::ResourceExhausted, "LOOKUPS_THROTTLED")
        }
        Error::Store(_) => (Code::Unavailable, "STORE_UNAVAILABLE"),
        Error::Unauthenticated { .. } | Error::RegistrationNeedsToken { .. } => {
            (Code::Unauthenticated, "UNAUTHENTICATED")
        }
        // The service decides and calls again: never reaches a client.
        Error::RegistrarUnchecked => (Code::Internal, "INTERNAL"),
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

/// Who may call what: with a token, every call of the allocator service
/// needs it (health and reflection are other services and stay open), unless
/// `open_allocation` (`--allow-unauthenticated-allocation`) opens the calls
/// that only hand out or read rooms again; RegisterWorker, DeregisterWorker
/// and registering through AllocateRoom always need it. Any of several
/// tokens is accepted (a rotation adds the new token, moves the callers,
/// then drops the old one), and they can be replaced while serving.
#[derive(Clone)]
pub struct Auth {
    expected: Arc<RwLock<Vec<Secret>>>,
    open_allocation: bool,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("open_allocation", &self.open_allocation)
            .finish_non_exhaustive()
    }
}

impl Auth {
    pub fn new(tokens: &[String], open_allocation: bool) -> Self {
        Self {
            expected: Arc::new(RwLock::new(secrets(tokens))),
            open_allocation,
        }
    }

    /// Takes new tokens (a rotated `--auth-token-file`) for later calls.
    pub fn replace(&self, tokens: &[String]) {
        *self.expected.write().expect("token lock is never poisoned") = secrets(tokens);
    }

    /// Whether the request carries the token: `Err` says how it fails.
    fn verify<T>(&self, request: &Request<T>) -> Result<(), Error> {
        let Some(value) = request.metadata().get("authorization") else {
            return Err(Error::Unauthenticated { presented: false });
        };
        let presented = bearer_credentials(value.as_bytes());
        let expected = self.expected.read().expect("token lock is never poisoned");
        // Every token compared in constant time (subtle), so timing tells
        // neither which one matched nor how much of one did.
        let matched = expected.iter().fold(subtle::Choice::from(0), |any, token| {
            any | token
                .expose()
                .as_bytes()
                .ct_eq(presented.unwrap_or_default())
        });
        if presented.is_some() && bool::from(matched) {
            Ok(())
        } else {
            Err(Error::Unauthenticated { presented: true })
        }
    }

    fn check<T>(&self, request: &Request<T>, admin: bool) -> Result<(), Error> {
        if !admin && self.open_allocation {
            return Ok(());
        }
        self.verify(request)
    }

    /// Whether the call may go ahead ([`Auth::check`]) and, if so, whether
    /// AllocateRoom may register a worker for this caller: with the token
    /// checked once a call, and not at all for an open call
    /// ([`Registrar::Unchecked`]: see [`Auth::registrar`]).
    fn authorize<T>(&self, request: &Request<T>, admin: bool) -> Result<Registrar, Error> {
        if admin || !self.open_allocation {
            // The check verified the token: a caller that passed it may register.
            return self.check(request, admin).map(|()| Registrar::Allowed);
        }
        Ok(Registrar::Unchecked)
    }

    /// Whether the caller may register a worker: it presented the token.
    fn registrar<T>(&self, request: &Request<T>) -> Registrar {
        match self.verify(request) {
            Ok(()) => Registrar::Allowed,
            Err(Error::Unauthenticated { presented }) => Registrar::Denied { presented },
            Err(_) => Registrar::Denied { presented: true },
        }
    }
}

fn secrets(tokens: &[String]) -> Vec<Secret> {
    tokens.iter().map(|t| Secret::new(t.trim())).collect()
}

/// The credentials of an `authorization` value in the `Bearer` scheme, whose
/// name is case-insensitive (RFC 9110, 11.1); `None` for another scheme.
fn bearer_credentials(value: &[u8]) -> Option<&[u8]> {
    const SCHEME: &[u8] = b"bearer";
    let scheme = value.get(..SCHEME.len())?;
    let rest = value.get(SCHEME.len()..)?;
    if !scheme.eq_ignore_ascii_case(SCHEME) || rest.first() != Some(&b' ') {
        return None;
    }
    let start = rest.iter().position(|&b| b != b' ')?;
    let credentials = &rest[start..];
    let end = credentials
        .iter()
        .rposition(|&b| b != b' ')
        .map_or(0, |last| last + 1);
    Some(&credentials[..end])
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
        method: Method,
        admin: bool,
        request: Request<R>,
        call: impl FnOnce(R, Registrar) -> F,
    ) -> Result<Response<T>, Status>
    where
        F: Future<Output = Result<T, Error>>,
    {
        let started = Instant::now();
        let result = match self.authorize(&request, admin) {
            Ok(registrar) => call(request.into_inner(), registrar).await,
            Err(denied) => Err(denied),
        };
        self.finish(method, started, result)
    }

    fn authorize<R>(&self, request: &Request<R>, admin: bool) -> Result<Registrar, Error> {
        match &self.auth {
            None => Ok(Registrar::Allowed),
            Some(auth) => auth.authorize(request, admin),
        }
    }

    /// AllocateRoom on an authorized request; a registrar left unchecked is
    /// decided (the token checked) only if the call would register.
    async fn allocate(
        &self,
        request: &Request<pb::AllocateRoomRequest>,
        registrar: Registrar,
    ) -> Result<pb::AllocateRoomResponse, Error> {
        let call = request.get_ref();
        let allocate = |registrar| {
            self.allocator
                .allocate(&call.prefill_worker, call.dp_rank, call.dp_size, registrar)
        };
        let (room, dp_size) = match allocate(registrar).await {
            Err(Error::RegistrarUnchecked) => {
                let decided = self
                    .auth
                    .as_ref()
                    .map_or(Registrar::Allowed, |auth| auth.registrar(request));
                allocate(decided).await
            }
            allocated => allocated,
        }?;
        Ok(pb::AllocateRoomResponse {
            room: room.get(),
            dp_size: dp_size.get(),
        })
    }

    /// Counts and times one call, and logs its outcome at the level it
    /// deserves: store failures at warn, refusals at info (rate-limited).
    fn finish<T>(
        &self,
        method: Method,
        started: Instant,
        result: Result<T, Error>,
    ) -> Result<Response<T>, Status> {
        let result = result.map_err(Status::from);
        let code = result.as_ref().map_or_else(|s| s.code(), |_| Code::Ok);
        self.metrics
            .observe_request(method, code, started.elapsed());
        let method = method.name();
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
        self.handle(
            Method::RegisterWorker,
            true,
            request,
            |request, _| async move {
                self.allocator
                    .register(&request.prefill_worker, request.dp_size)
                    .await
                    .map(|info| pb::RegisterWorkerResponse {
                        worker: Some(worker_info(info)),
                    })
            },
        )
        .await
    }

    #[instrument(level = "debug", skip_all, fields(worker = %Escaped(&request.get_ref().prefill_worker), dp_rank = request.get_ref().dp_rank, dp_size = request.get_ref().dp_size))]
    async fn allocate_room(
        &self,
        request: Request<pb::AllocateRoomRequest>,
    ) -> Result<Response<pb::AllocateRoomResponse>, Status> {
        let started = Instant::now();
        let result = match self.authorize(&request, false) {
            Ok(registrar) => self.allocate(&request, registrar).await,
            Err(denied) => Err(denied),
        };
        self.finish(Method::AllocateRoom, started, result)
    }

    #[instrument(level = "debug", skip_all, fields(worker = %Escaped(&request.get_ref().prefill_worker), count = request.get_ref().count, dp_size = request.get_ref().dp_size))]
    async fn lease_rooms(
        &self,
        request: Request<pb::LeaseRoomsRequest>,
    ) -> Result<Response<pb::LeaseRoomsResponse>, Status> {
        self.handle(
            Method::LeaseRooms,
            false,
            request,
            |request, _| async move {
                self.allocator
                    .lease(&request.prefill_worker, request.count, request.dp_size)
                    .await
                    .map(|lease| pb::LeaseRoomsResponse {
                        first_base: lease.first_base.get(),
                        count: lease.count,
                        dp_size: lease.dp_size.get(),
                        valid_for_ms: u64::try_from(lease.valid_for.as_millis())
                            .unwrap_or(u64::MAX),
                    })
            },
        )
        .await
    }

    #[instrument(level = "debug", skip_all, fields(room = request.get_ref().room))]
    async fn resolve_rank(
        &self,
        request: Request<pb::ResolveRankRequest>,
    ) -> Result<Response<pb::ResolveRankResponse>, Status> {
        self.handle(
            Method::ResolveRank,
            false,
            request,
            |request, _| async move {
                self.allocator
                    .resolve(request.room)
                    .await
                    .map(|resolved| pb::ResolveRankResponse {
                        prefill_worker: resolved.prefill_worker.to_string(),
                        dp_rank: resolved.dp_rank.get(),
                        dp_size: resolved.dp_size.get(),
                    })
            },
        )
        .await
    }

    #[instrument(level = "debug", skip_all, fields(page_size = request.get_ref().page_size))]
    async fn list_workers(
        &self,
        request: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        self.handle(
            Method::ListWorkers,
            false,
            request,
            |request, _| async move {
                let page = self
                    .allocator
                    .list(request.page_size, &request.page_token)?;
                Ok(pb::ListWorkersResponse {
                    workers: page.workers.into_iter().map(worker_info).collect(),
                    next_page_token: page.next_page_token,
                })
            },
        )
        .await
    }

    #[instrument(level = "debug", skip_all, fields(worker = %Escaped(&request.get_ref().prefill_worker)))]
    async fn deregister_worker(
        &self,
        request: Request<pb::DeregisterWorkerRequest>,
    ) -> Result<Response<pb::DeregisterWorkerResponse>, Status> {
        self.handle(
            Method::DeregisterWorker,
            true,
            request,
            |request, _| async move {
                self.allocator
                    .deregister(&request.prefill_worker)
                    .await
                    .map(|()| pb::DeregisterWorkerResponse {})
            },
        )
        .await
    }

    #[instrument(level = "debug", skip_all)]
    async fn get_room_space(
        &self,
        request: Request<pb::GetRoomSpaceRequest>,
    ) -> Result<Response<pb::RoomSpace>, Status> {
        self.handle(Method::GetRoomSpace, false, request, |_, _| async move {
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
    fn an_overlapping_range_is_unavailable_and_not_reported_as_a_shutdown() {
        let error = Error::Store(StoreError::Overlap {
            worker: "w".into(),
            overlap: crate::space::OverlapError {
                start: 8,
                end: 16,
                other_start: 12,
                other_end: 20,
            },
        });
        let status = Status::from(error);
        assert_eq!(status.code(), Code::Unavailable);
        assert!(
            status
                .message()
                .contains("range 8..16 overlaps the reserved range 12..20"),
            "{}",
            status.message()
        );
        assert!(
            !status.message().contains("shut down"),
            "{}",
            status.message()
        );
        assert!(
            status.message().contains("no other server shares"),
            "{}",
            status.message()
        );
    }

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

    fn request(authorization: Option<&str>) -> Request<()> {
        let mut request = Request::new(());
        if let Some(value) = authorization {
            request
                .metadata_mut()
                .insert("authorization", value.parse().expect("ascii"));
        }
        request
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive_and_the_token_exact() {
        let auth = Auth::new(&["s3cret".into(), "next token".into()], false);
        for accepted in [
            "Bearer s3cret",
            "bearer s3cret",
            "BEARER   s3cret ",
            "Bearer next token",
        ] {
            assert!(auth.verify(&request(Some(accepted))).is_ok(), "{accepted}");
        }
        for refused in [
            "Bearer S3cret",
            "Bearer s3cre",
            "Bearer s3crett",
            "Basic s3cret",
            "Bearers3cret",
            "Bearer",
            "s3cret",
        ] {
            assert!(
                matches!(
                    auth.verify(&request(Some(refused))),
                    Err(Error::Unauthenticated { presented: true })
                ),
                "{refused}"
            );
        }
        assert!(matches!(
            auth.verify(&request(None)),
            Err(Error::Unauthenticated { presented: false })
        ));
    }

    #[test]
    fn with_a_token_every_call_needs_it_unless_allocation_is_opened() {
        let strict = Auth::new(&["s3cret".into()], false);
        assert!(strict.check(&request(None), false).is_err());
        assert!(strict.check(&request(None), true).is_err());
        let open = Auth::new(&["s3cret".into()], true);
        assert!(open.check(&request(None), false).is_ok());
        assert!(open.check(&request(None), true).is_err());
        // One check a call also says who may register through AllocateRoom.
        for (auth, admin, authorization, verdict) in [
            (
                &strict,
                false,
                Some("Bearer s3cret"),
                Some(Registrar::Allowed),
            ),
            (
                &strict,
                true,
                Some("Bearer s3cret"),
                Some(Registrar::Allowed),
            ),
            (&strict, false, Some("Bearer wrong"), None),
            // An open call is not checked until it would register.
            (
                &open,
                false,
                Some("Bearer s3cret"),
                Some(Registrar::Unchecked),
            ),
            (&open, false, None, Some(Registrar::Unchecked)),
            (&open, true, None, None),
        ] {
            assert_eq!(
                auth.authorize(&request(authorization), admin).ok(),
                verdict,
                "{authorization:?} admin={admin}"
            );
        }
        for (authorization, decided) in [
            (Some("Bearer s3cret"), Registrar::Allowed),
            (Some("Bearer wrong"), Registrar::Denied { presented: true }),
            (None, Registrar::Denied { presented: false }),
        ] {
            assert_eq!(
                open.registrar(&request(authorization)),
                decided,
                "{authorization:?}"
            );
        }
        assert!(!format!("{open:?}").contains("s3cret"));
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
