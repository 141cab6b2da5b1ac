//! gRPC server metrics, a tower layer on the gRPC port:
//! go-grpc-middleware's families (`grpc_server_started_total`,
//! `grpc_server_handled_total`, `grpc_server_handling_seconds`) for every
//! call to every service, with bounded labels (paths this server does not
//! serve are all "unknown") and codes as grpc-go prints them, so dashboards
//! and alerts made for Go services work unchanged.
//!
//! Every call is recorded exactly once: when its response is ready, or, when
//! it is dropped first, as DeadlineExceeded or Canceled. Calls the allocator
//! service never saw (shed by the in-flight limit, refused during shutdown)
//! are also counted in `room_allocator_requests_total` here.
//!
//! The series of each known path (and of every unknown one), by code, are
//! resolved once, on their first use: a call costs no label lookup.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use crate::metrics::{self, ByCode, Counter, Histogram, Method, Metrics, Series};

/// go-grpc-middleware's server metrics for every call to every service,
/// with `--request-timeout-secs` to tell a timed-out call from a cancelled one.
#[derive(Clone)]
pub(super) struct GrpcMetricsLayer {
    pub metrics: Arc<Metrics>,
    /// `--request-timeout-secs`.
    pub request_timeout: Duration,
}

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetricsService {
            inner,
            series: Arc::new(AllSeries::new(self.metrics.clone())),
            request_timeout: self.request_timeout,
        }
    }
}

#[derive(Clone)]
pub struct GrpcMetricsService<S> {
    inner: S,
    series: Arc<AllSeries>,
    request_timeout: Duration,
}

/// The (type, service, method) labels of the paths this server serves.
const KNOWN: &[(&str, &str, &str)] = &[
    ("unary", metrics::SERVICE, "RegisterWorker"),
    ("unary", metrics::SERVICE, "AllocateRoom"),
    ("unary", metrics::SERVICE, "LeaseRooms"),
    ("unary", metrics::SERVICE, "ResolveRank"),
    ("unary", metrics::SERVICE, "ListWorkers"),
    ("unary", metrics::SERVICE, "DeregisterWorker"),
    ("unary", metrics::SERVICE, "GetRoomSpace"),
    ("unary", "grpc.health.v1.Health", "Check"),
    ("server_stream", "grpc.health.v1.Health", "Watch"),
    (
        "bidi_stream",
        "grpc.reflection.v1.ServerReflection",
        "ServerReflectionInfo",
    ),
    (
        "bidi_stream",
        "grpc.reflection.v1alpha.ServerReflection",
        "ServerReflectionInfo",
    ),
];

/// The labels of every path this server does not serve: bounded.
const UNKNOWN: (&str, &str, &str) = ("unary", "unknown", "unknown");

/// The index in [`KNOWN`] of a request path, or `KNOWN.len()` for a path
/// this server does not serve.
fn path_index(path: &str) -> usize {
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let (service, method) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    KNOWN
        .iter()
        .position(|(_, s, m)| *s == service && *m == method)
        .unwrap_or(KNOWN.len())
}

/// The series of one path (or of every unknown one), each resolved on its
/// first use.
struct PathSeries {
    labels: (&'static str, &'static str, &'static str),
    /// The allocator service's method of the path, if it is one.
    method: Option<Method>,
    started: Series<Counter>,
    handling: Series<Histogram>,
    handled: ByCode<Counter>,
}

/// The series of every path, by [`path_index`].
struct AllSeries {
    metrics: Arc<Metrics>,
    paths: Vec<PathSeries>,
}

impl AllSeries {
    fn new(metrics: Arc<Metrics>) -> Self {
        let paths = KNOWN
            .iter()
            .chain([&UNKNOWN])
            .map(|&(kind, service, method)| PathSeries {
                labels: (kind, service, method),
                method: Method::ALL
                    .into_iter()
                    .find(|m| service == metrics::SERVICE && m.name() == method),
                started: Series::default(),
                handling: Series::default(),
                handled: ByCode::default(),
            })
            .collect();
        Self { metrics, paths }
    }
}

/// A gRPC code as grpc-go's `codes.Code.String()` prints it.
fn grpc_go_code(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

/// One call's outcome, recorded exactly once: when its response is ready,
/// or, when the call is dropped first, as DeadlineExceeded (its deadline
/// passed: tonic's timeout wraps this layer and drops the call) or Canceled
/// (the client reset the stream). Without the drop, the calls an incident is
/// made of would never reach `grpc_server_handled_total`, and `started -
/// handled` would grow for good.
struct CallRecord {
    series: Arc<AllSeries>,
    /// The call's path, by [`path_index`].
    path: usize,
    started: Instant,
    /// The sooner of `--request-timeout-secs` and the client's grpc-timeout.
    deadline: Duration,
    recorded: bool,
}

/// Marks a response that the allocator service never saw (shed, or refused
/// during shutdown), so that its `room_allocator_requests_total` count comes
/// from the metrics layer instead.
#[derive(Clone, Copy)]
pub(super) struct NotServed;

/// tokio's timers fire up to a millisecond late, never early; the record's
/// clock starts a little after tonic's, so allow for both.
const DEADLINE_SLACK: Duration = Duration::from_millis(5);

impl CallRecord {
    /// `counted` says whether the allocator service already counted the call
    /// in `room_allocator_requests_total`.
    fn record(&mut self, code: tonic::Code, counted: bool) {
        if std::mem::replace(&mut self.recorded, true) {
            return;
        }
        let elapsed = self.started.elapsed();
        let metrics = &self.series.metrics;
        let path = &self.series.paths[self.path];
        let (kind, service, method) = path.labels;
        path.handling
            .get(&metrics.grpc_handling, &[kind, service, method])
            .observe(elapsed);
        path.handled
            .of(code)
            .get(
                &metrics.grpc_handled,
                &[kind, service, method, grpc_go_code(code)],
            )
            .inc();
        if let (false, Some(method)) = (counted, path.method) {
            // This family names codes as the contract does (UNAVAILABLE).
            metrics.observe_request(method, code, elapsed);
        }
    }
}

impl Drop for CallRecord {
    fn drop(&mut self) {
        if self.recorded {
            // The usual case: no clock read for a call already recorded.
            return;
        }
        let code = if self.started.elapsed() + DEADLINE_SLACK >= self.deadline {
            tonic::Code::DeadlineExceeded
        } else {
            tonic::Code::Cancelled
        };
        self.record(code, false);
    }
}

/// The `grpc-timeout` header (gRPC over HTTP/2: up to 8 digits and a unit).
fn grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.checked_mul(3600)?),
        "M" => Duration::from_secs(amount.checked_mul(60)?),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

pin_project_lite::pin_project! {
    /// A call's response, recorded when it is ready; a call dropped first is
    /// recorded by its record's drop.
    pub struct RecordedResponse<F> {
        #[pin]
        response: F,
        record: CallRecord,
    }
}

impl<F, E> Future for RecordedResponse<F>
where
    F: Future<Output = Result<http::Response<tonic::body::Body>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = ready!(this.response.poll(cx));
        // An error answers trailers-only: its code is in the headers. A
        // unary success carries grpc-status 0 in its trailers.
        let (code, counted) = match &response {
            Ok(response) => (
                response
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .map_or(tonic::Code::Ok, tonic::Code::from),
                response.extensions().get::<NotServed>().is_none(),
            ),
            Err(_) => (tonic::Code::Unknown, false),
        };
        this.record.record(code, counted);
        Poll::Ready(response)
    }
}

impl<S, B> tower::Service<http::Request<B>> for GrpcMetricsService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = RecordedResponse<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let path = path_index(request.uri().path());
        let series = &self.series.paths[path];
        let (kind, service, method) = series.labels;
        series
            .started
            .get(&self.series.metrics.grpc_started, &[kind, service, method])
            .inc();
        let client_deadline = request
            .headers()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(grpc_timeout);
        let record = CallRecord {
            series: self.series.clone(),
            path,
            started: Instant::now(),
            deadline: client_deadline.map_or(self.request_timeout, |client| {
                client.min(self.request_timeout)
            }),
            recorded: false,
        };
        RecordedResponse {
            response: self.inner.call(request),
            record,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_labels_are_bounded_and_codes_are_grpc_gos() {
        let series = AllSeries::new(Arc::new(Metrics::new("embedded")));
        let labels = |path| series.paths[path_index(path)].labels;
        assert_eq!(
            labels("/room_allocator.v1.RoomAllocatorService/AllocateRoom"),
            ("unary", metrics::SERVICE, "AllocateRoom")
        );
        assert_eq!(labels("/evil.Service/x"), UNKNOWN);
        assert_eq!(labels("/grpc.health.v1.Health/Check").2, "Check");
        assert_eq!(
            series.paths[path_index("/room_allocator.v1.RoomAllocatorService/LeaseRooms")].method,
            Some(Method::LeaseRooms)
        );
        assert_eq!(
            series.paths[path_index("/grpc.health.v1.Health/Check")].method,
            None
        );
        assert_eq!(grpc_go_code(tonic::Code::Cancelled), "Canceled");
        assert_eq!(
            grpc_go_code(tonic::Code::FailedPrecondition),
            "FailedPrecondition"
        );
    }
}
