//! The server: the allocator service plus `grpc.health.v1`, reflection (v1 and
//! v1alpha, which grpcurl 1.8 speaks), the metrics endpoint, and a graceful
//! shutdown that turns health NOT_SERVING, lets in-flight calls finish within
//! the drain timeout, and persists the counters before the store closes.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch, Notify};
use tonic::server::NamedService;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic_health::ServingStatus;
use tracing::{info, warn};

use crate::allocator::{Allocator, Limits};
use crate::config::ServeArgs;
use crate::metrics::{self, Metrics};
use crate::pb;
use crate::service::{Auth, RoomAllocatorServiceServer, Service};
use crate::store::{EmbeddedStore, EtcdStore, OpenError, Store};

/// An opened store and allocator, ready to serve.
pub struct Server {
    allocator: Allocator,
    metrics: Arc<Metrics>,
    drain_delay: Duration,
    drain_timeout: Duration,
    request_timeout: Duration,
    max_concurrent_requests: usize,
    tls: Option<ServerTlsConfig>,
    auth: Option<Auth>,
}

/// Largest request accepted: every request of the contract is far smaller
/// (a worker name is at most 253 bytes).
const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Why the server cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] OpenError),
    #[error("cannot read {flag} {}: {source}", path.display())]
    Read {
        flag: &'static str,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("--auth-token-file {} is empty; put the token in it", path.display())]
    EmptyToken { path: std::path::PathBuf },
}

fn read_file(flag: &'static str, path: &std::path::Path) -> Result<Vec<u8>, StartError> {
    std::fs::read(path).map_err(|source| StartError::Read {
        flag,
        path: path.to_path_buf(),
        source,
    })
}

/// Failures while serving; opening failures are [`OpenError`]s.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("the gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

const SERVICE_NAME: &str = <RoomAllocatorServiceServer<Service> as NamedService>::NAME;

impl Server {
    /// Reads TLS material and the token, then opens the store named by
    /// `config`: etcd if `--etcd-endpoints` is set, else the embedded store.
    /// Refuses damaged, locked or unreachable data.
    pub async fn open(config: &ServeArgs) -> Result<Self, StartError> {
        let tls = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => {
                let identity = Identity::from_pem(
                    read_file("--tls-cert", cert)?,
                    read_file("--tls-key", key)?,
                );
                let mut tls = ServerTlsConfig::new().identity(identity);
                if let Some(ca) = &config.tls_client_ca {
                    tls = tls
                        .client_ca_root(Certificate::from_pem(read_file("--tls-client-ca", ca)?));
                }
                Some(tls)
            }
            _ => None,
        };
        let auth = match &config.auth_token_file {
            Some(path) => {
                let token = String::from_utf8_lossy(&read_file("--auth-token-file", path)?)
                    .trim()
                    .to_owned();
                if token.is_empty() {
                    return Err(StartError::EmptyToken { path: path.clone() });
                }
                Some(Auth::new(&token, config.auth_required_for_allocation))
            }
            None => None,
        };
        let store_timeout = Duration::from_secs(config.store_timeout_secs);
        let limits = Limits {
            space_end: config.max_room.saturating_add(1),
            max_workers: config.max_workers,
            store_timeout,
            retention: config.retention,
        };
        let (store, snapshot): (Arc<dyn Store>, _) = if config.etcd.etcd_endpoints.is_empty() {
            let (store, snapshot) = EmbeddedStore::open(&config.data_dir, limits.space_end)?;
            (Arc::new(store), snapshot)
        } else {
            let etcd_config = config.etcd.store_config(store_timeout);
            let (store, snapshot) = EtcdStore::open(&etcd_config, limits.space_end).await?;
            (Arc::new(store), snapshot)
        };
        let metrics = Arc::new(Metrics::new());
        let allocator = Allocator::new(store, snapshot, limits, metrics.clone());
        Ok(Self {
            allocator,
            metrics,
            drain_delay: Duration::from_secs(config.drain_delay_secs),
            drain_timeout: Duration::from_secs(config.drain_timeout_secs),
            request_timeout: Duration::from_secs(config.request_timeout_secs),
            max_concurrent_requests: usize::try_from(config.max_concurrent_requests)
                .unwrap_or(usize::MAX),
            tls,
            auth,
        })
    }

    pub fn allocator(&self) -> &Allocator {
        &self.allocator
    }

    /// Serves until `shutdown` completes, then drains and closes the store.
    pub async fn serve(
        self,
        grpc: TcpListener,
        metrics_listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_service_status(SERVICE_NAME, ServingStatus::Serving)
            .await;
        self.allocator.follow_store();
        self.allocator.run_retention();
        let (stop_health, health_stopped) = watch::channel(false);
        if let Some(reachable) = self.allocator.store_reachable() {
            tokio::spawn(follow_reachability(
                reachable,
                health.clone(),
                health_stopped,
            ));
        }
        let reflection_v1 = reflection().build_v1()?;
        let reflection_v1alpha = reflection().build_v1alpha()?;

        let (stop_metrics, metrics_stopped) = watch::channel(false);
        let metrics_task = tokio::spawn(metrics::serve(
            metrics_listener,
            self.metrics.clone(),
            metrics_stopped,
        ));

        let (draining_tx, draining) = oneshot::channel::<()>();
        let drain_delay = self.drain_delay;
        let signal = {
            let health = health.clone();
            async move {
                shutdown.await;
                let _ = stop_health.send(true);
                info!(
                    ?drain_delay,
                    "shutting down: health is NOT_SERVING; still serving for the drain delay"
                );
                for service in ["", SERVICE_NAME] {
                    health
                        .set_service_status(service, ServingStatus::NotServing)
                        .await;
                }
                // Load balancers see NOT_SERVING and move routers away first.
                tokio::time::sleep(drain_delay).await;
                info!("draining in-flight calls");
                let _ = draining_tx.send(());
            }
        };
        let incoming = TcpIncoming::from(grpc).with_nodelay(Some(true));
        let service = Service::new(
            self.allocator.clone(),
            self.metrics.clone(),
            self.auth.clone(),
        );
        let in_flight = InFlight::new(self.max_concurrent_requests);
        let mut builder = tonic::transport::Server::builder().timeout(self.request_timeout);
        if let Some(tls) = self.tls.clone() {
            builder = builder.tls_config(tls)?;
        }
        let serving = builder
            .layer(in_flight.clone())
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(
                RoomAllocatorServiceServer::new(service)
                    .max_decoding_message_size(MAX_REQUEST_BYTES),
            )
            .serve_with_incoming_shutdown(incoming, signal);
        // Idle client connections would hold tonic's graceful shutdown open
        // until they close by themselves; stop as soon as no call is in flight.
        let drain_timeout = self.drain_timeout;
        let drained = async move {
            if draining.await.is_err() {
                std::future::pending::<()>().await;
            }
            if !in_flight.drain(drain_timeout).await {
                warn!(
                    ?drain_timeout,
                    "drain timeout passed; dropping calls still in flight"
                );
            }
        };
        tokio::select! {
            served = serving => served?,
            () = drained => {}
        }

        let _ = stop_metrics.send(true);
        let _ = metrics_task.await;
        match self.allocator.shutdown().await {
            Ok(()) => info!("store closed; bye"),
            // Nothing is lost but the latest rooms_issued counts: every range
            // was durable before its first room left.
            Err(error) => warn!(%error, "could not persist rooms_issued counters at shutdown"),
        }
        Ok(())
    }
}

/// Health follows the store: NOT_SERVING while no range can be reserved, so
/// load balancers send routers to replicas that can. Stops at shutdown.
async fn follow_reachability(
    mut reachable: watch::Receiver<bool>,
    health: tonic_health::server::HealthReporter,
    mut stopped: watch::Receiver<bool>,
) {
    loop {
        let status = if *reachable.borrow_and_update() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        if *stopped.borrow() {
            return;
        }
        for service in ["", SERVICE_NAME] {
            health.set_service_status(service, status).await;
        }
        tokio::select! {
            changed = reachable.changed() => if changed.is_err() { return },
            _ = stopped.wait_for(|stop| *stop) => return,
        }
    }
}

fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}

/// Counts calls being served, so shutdown knows when the drain is done, and
/// once closed refuses new calls: after the drain no call touches the
/// allocator, so the counters persisted at shutdown are complete.
#[derive(Clone)]
struct InFlight {
    /// Calls in flight, plus [`CLOSED`] once the drain is over.
    calls: Arc<AtomicUsize>,
    idle: Arc<Notify>,
    /// More calls than this are shed at once.
    max: usize,
}

/// Why a call was refused before it reached a service.
enum Refused {
    Closed,
    Overloaded(usize),
}

const CLOSED: usize = 1 << (usize::BITS - 1);

/// Decrements the count when a call's response is ready (or it is dropped).
struct InFlightGuard(InFlight);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if self.0.calls.fetch_sub(1, Ordering::AcqRel) & !CLOSED == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl InFlight {
    fn new(max: usize) -> Self {
        Self {
            calls: Arc::default(),
            idle: Arc::default(),
            max: max.clamp(1, CLOSED - 1),
        }
    }

    fn enter(&self) -> Result<InFlightGuard, Refused> {
        let before = self.calls.fetch_add(1, Ordering::AcqRel);
        let guard = InFlightGuard(self.clone());
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
    async fn drain(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.idle.notified();
            if self
                .calls
                .compare_exchange(0, CLOSED, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                self.calls.fetch_or(CLOSED, Ordering::AcqRel);
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

impl<S, B> tower::Service<http::Request<B>> for InFlightService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

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
                return Box::pin(std::future::ready(Ok(status.into_http())));
            }
        };
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await;
            drop(guard);
            response
        })
    }
}
