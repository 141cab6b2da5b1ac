//! The in-flight limit, a tower layer on the gRPC port: it counts the calls
//! being served, sheds those past `--max-concurrent-requests` at once with
//! RESOURCE_EXHAUSTED (instead of queueing without bound), and is what the
//! shutdown drain waits on. Once the drain is over it refuses every new call
//! with UNAVAILABLE, so no call touches the allocator after the counters are
//! persisted at shutdown.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::sync::Notify;

use super::grpc_metrics::NotServed;

/// Counts calls being served, so shutdown knows when the drain is done, and
/// once closed refuses new calls: after the drain no call touches the
/// allocator, so the counters persisted at shutdown are complete.
#[derive(Clone)]
pub(super) struct InFlight {
    count: Arc<Count>,
    /// More calls than this are shed at once.
    max: usize,
}

/// What the layer and every call's guard share: one reference to clone a
/// call, not one per field.
#[derive(Default)]
struct Count {
    /// Calls in flight, plus [`CLOSED`] once the drain is over.
    calls: AtomicUsize,
    idle: Notify,
}

/// Why a call was refused before it reached a service.
enum Refused {
    Closed,
    Overloaded(usize),
}

const CLOSED: usize = 1 << (usize::BITS - 1);

/// Decrements the count when a call's response is ready (or it is dropped).
struct InFlightGuard(Arc<Count>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if self.0.calls.fetch_sub(1, Ordering::AcqRel) & !CLOSED == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl InFlight {
    pub(super) fn new(max: usize) -> Self {
        Self {
            count: Arc::default(),
            max: max.clamp(1, CLOSED - 1),
        }
    }

    fn enter(&self) -> Result<InFlightGuard, Refused> {
        let before = self.count.calls.fetch_add(1, Ordering::AcqRel);
        let guard = InFlightGuard(self.count.clone());
        if before & CLOSED != 0 {
            return Err(Refused::Closed);
        }
        if before >= self.max {
            return Err(Refused::Overloaded(self.max));
        }
        Ok(guard)
    }

    /// Waits until no call is in flight, then refuses new ones; false if
    /// `timeout` passed first (it closes all the same).
    pub(super) async fn drain(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.count.idle.notified();
            if self
                .count
                .calls
                .compare_exchange(0, CLOSED, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                self.count.calls.fetch_or(CLOSED, Ordering::AcqRel);
                return false;
            }
        }
    }
}

impl<S> tower::Layer<S> for InFlight {
    type Service = InFlightService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        InFlightService {
            inner,
            in_flight: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct InFlightService<S> {
    inner: S,
    in_flight: InFlight,
}

pin_project_lite::pin_project! {
    /// A call's response, the call counted in flight until it is ready (or
    /// dropped); or, for a call refused, the refusal.
    pub struct InFlightResponse<F> {
        #[pin]
        response: Option<F>,
        guard: Option<InFlightGuard>,
        refusal: Option<http::Response<tonic::body::Body>>,
    }
}

impl<F, E> Future for InFlightResponse<F>
where
    F: Future<Output = Result<http::Response<tonic::body::Body>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Some(response) = this.response.as_pin_mut() else {
            return Poll::Ready(Ok(this.refusal.take().expect(
                "a refusal is answered once: a future is not polled after it is ready",
            )));
        };
        let response = ready!(response.poll(cx));
        this.guard.take();
        Poll::Ready(response)
    }
}

impl<S, B> tower::Service<http::Request<B>> for InFlightService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = InFlightResponse<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let guard = match self.in_flight.enter() {
            Ok(guard) => guard,
            Err(refused) => {
                let status = match refused {
                    Refused::Closed => tonic::Status::unavailable(
                        "the server is shutting down; retry on another replica or once it is back",
                    ),
                    Refused::Overloaded(max) => tonic::Status::resource_exhausted(format!(
                        "the server is overloaded ({max} calls in flight, --max-concurrent-requests); retry with backoff"
                    )),
                };
                let mut refusal = status.into_http();
                refusal.extensions_mut().insert(NotServed);
                return InFlightResponse {
                    response: None,
                    guard: None,
                    refusal: Some(refusal),
                };
            }
        };
        InFlightResponse {
            response: Some(self.inner.call(request)),
            guard: Some(guard),
            refusal: None,
        }
    }
}
