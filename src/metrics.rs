//! Every metric the server exports, with its help text, and the `/metrics`
//! endpoint that serves them in the Prometheus text format.
//!
//! Labels are bounded: `method` is one of the six rpcs, `code` one of the
//! gRPC codes, `store` one of the store kinds. Worker names are never labels:
//! a fleet may have thousands of them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, warn};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    pub method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub method: &'static str,
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreLabels {
    pub store: &'static str,
}

/// Request latency buckets, 50 µs to ~1.6 s: allocation is in-memory and
/// should sit in the lowest buckets; the tail shows waits on the store.
fn latency_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.000_05, 2.0, 16)
}

pub struct Metrics {
    registry: Registry,
    pub rooms_issued: Family<MethodLabels, Counter>,
    pub ranges_reserved: Family<StoreLabels, Counter>,
    pub store_errors: Family<StoreLabels, Counter>,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Family<RequestLabels, Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("room_allocator");
        let rooms_issued = Family::<MethodLabels, Counter>::default();
        registry.register(
            "rooms_issued",
            "Rooms handed out by AllocateRoom, plus bases handed out by LeaseRooms",
            rooms_issued.clone(),
        );
        let ranges_reserved = Family::<StoreLabels, Counter>::default();
        registry.register(
            "ranges_reserved",
            "Ranges of the room space durably reserved in the store",
            ranges_reserved.clone(),
        );
        let store_errors = Family::<StoreLabels, Counter>::default();
        registry.register(
            "store_errors",
            "Store operations that failed (each failed caller got UNAVAILABLE)",
            store_errors.clone(),
        );
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "gRPC requests to RoomAllocatorService by method and status code",
            requests.clone(),
        );
        let request_duration = Family::<RequestLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(latency_buckets())
        });
        registry.register(
            "request_duration_seconds",
            "Time to answer RoomAllocatorService requests, by method and status code",
            request_duration.clone(),
        );
        Self {
            registry,
            rooms_issued,
            ranges_reserved,
            store_errors,
            requests,
            request_duration,
        }
    }

    pub fn observe_request(&self, method: &'static str, code: &'static str, elapsed: Duration) {
        let labels = RequestLabels { method, code };
        self.requests.get_or_create(&labels).inc();
        self.request_duration
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
    }

    pub fn render(&self) -> String {
        let mut text = String::new();
        encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        let (stream, peer) = match accepted {
            Ok(conn) => conn,
            Err(error) => {
                warn!(%error, "metrics listener failed to accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(serve_connection(stream, peer, metrics));
    }
}

async fn serve_connection(stream: tokio::net::TcpStream, peer: SocketAddr, metrics: Arc<Metrics>) {
    let service = service_fn(move |request: Request<hyper::body::Incoming>| {
        let metrics = metrics.clone();
        async move {
            let response = if request.uri().path() == "/metrics" {
                Response::builder()
                    .header(
                        hyper::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )
                    .body(Full::new(Bytes::from(metrics.render())))
            } else {
                Response::builder()
                    .status(StatusCode::NOT_FOUND)
                    .body(Full::new(Bytes::from_static(b"metrics are at /metrics\n")))
            };
            response
        }
    });
    if let Err(error) = http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await
    {
        debug!(%error, %peer, "metrics connection ended with an error");
    }
}
