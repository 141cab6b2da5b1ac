//! The server: the allocator service on the gRPC port with health and
//! reflection (v1 and v1alpha, which grpcurl 1.8 speaks), the metrics
//! endpoint, the optional plaintext health port, and a graceful shutdown:
//! health turns NOT_SERVING, in-flight calls finish within the drain
//! timeout, background tasks stop, and the counters are persisted before the
//! store closes. Every background task of the server, the allocator and the
//! store is spawned through one [`Lifecycle`]; `serve` is the one place the
//! shutdown's steps are taken, in order.
//!
//! This file owns opening (flags checked, store opened, allocator built) and
//! the serving lifecycle; each other concern has its module:
//! - [`config`] holds [`ServerConfig`] (plain data `main` builds from the
//!   flags) and the start checks `--check-config` runs;
//! - `tls`: the TLS files, their reload, the handshakes;
//! - `token`: the bearer-token file and its reload (the per-call check is
//!   the service's `Auth`);
//! - `health`: `grpc.health.v1`, readiness following the store, the
//!   plaintext health port;
//! - `in_flight` and `grpc_metrics`: the tower layers on the gRPC port (the
//!   in-flight limit and drain; go-grpc-middleware's metrics);
//! - `scrape`: the gauges a metrics scrape refreshes;
//! - `limits`: connection limits of the side listeners.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;
use tower::layer::util::{Identity, Stack};
use tracing::{info, warn};

use crate::allocator::{Allocator, Limits};
use crate::lifecycle::Lifecycle;
use crate::metrics::{self, Metrics};
use crate::pb;
use crate::service::{Auth, RoomAllocatorServiceServer, Service};
use crate::store::{EmbeddedStore, EtcdStore, Store};

pub mod config;
mod grpc_metrics;
mod health;
mod in_flight;
pub(crate) mod limits;
mod scrape;
mod tls;
mod token;

pub use config::{check_config, AuthConfig, ServerConfig, StartError, StoreConfig, TlsConfig};

use config::Checked;
use grpc_metrics::GrpcMetricsLayer;
use in_flight::InFlight;
use tls::Tls;

/// Largest request accepted: every request of the contract is far smaller
/// (a worker name is at most 253 bytes).
const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// How often the certificate and token files are checked for changes: a
/// rotated Secret is in use well within 10 s.
const RELOAD_INTERVAL: Duration = Duration::from_secs(2);

/// Failures while serving; opening failures are [`StartError`]s.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("the gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// An opened store and allocator, ready to serve.
pub struct Server {
    allocator: Allocator,
    /// Every background task of the server, the allocator and the store.
    lifecycle: Lifecycle,
    metrics: Arc<Metrics>,
    drain_delay: Duration,
    drain_timeout: Duration,
    request_timeout: Duration,
    max_connection_age: Duration,
    max_connection_age_grace: Duration,
    max_concurrent_requests: usize,
    tls: Option<Arc<Tls>>,
    auth: Option<(Auth, PathBuf, Vec<String>)>,
    /// Certificate files whose expiry is exported, by their `file` label.
    certificates: Vec<(&'static str, PathBuf)>,
}

impl Server {
    /// Checks the configuration, then opens the store it names (etcd or the
    /// embedded store). Refuses damaged, locked or unreachable data.
    pub async fn open(config: &ServerConfig) -> Result<Self, StartError> {
        let Checked { tls, token } = config::check(config)?;
        let bounds = config.bounds;
        let lifecycle = Lifecycle::new();
        let (store, snapshot): (Arc<dyn Store>, _) = match &config.store {
            StoreConfig::Embedded { data_dir } => {
                let (store, mut snapshot) =
                    EmbeddedStore::open(data_dir, bounds).map_err(|cause| StartError::Store {
                        flag: "--data-dir",
                        value: data_dir.display().to_string(),
                        cause,
                    })?;
                snapshot.retention = config.retention;
                (Arc::new(store), snapshot)
            }
            StoreConfig::Etcd(etcd_config) => {
                let (store, snapshot) = EtcdStore::open(etcd_config.as_ref(), &lifecycle)
                    .await
                    .map_err(|cause| StartError::Store {
                        flag: "--etcd-endpoints",
                        value: etcd_config.endpoints.join(","),
                        cause,
                    })?;
                (Arc::new(store), snapshot)
            }
        };
        let limits = Limits {
            bounds,
            max_workers: config.max_workers,
            store_timeout: config.store_timeout,
            retention: snapshot.retention,
        };
        let metrics = Arc::new(Metrics::new(store.kind()));
        if let Some(store_id) = store.store_id() {
            metrics.set_store_id(&store_id);
        }
        let allocator = Allocator::new(store, snapshot, limits, metrics.clone(), lifecycle.clone());
        let tls = tls.map(|(files, material, server_config)| {
            Arc::new(Tls::new(files, material, server_config))
        });
        let auth = config.auth.as_ref().zip(token).map(|(auth, tokens)| {
            (
                Auth::new(&tokens, auth.allow_unauthenticated_allocation),
                auth.token_file.clone(),
                tokens,
            )
        });
        let (etcd_cert, etcd_ca) = match &config.store {
            StoreConfig::Etcd(etcd) => (etcd.cert.clone(), etcd.ca.clone()),
            StoreConfig::Embedded { .. } => (None, None),
        };
        Ok(Self {
            allocator,
            lifecycle,
            metrics,
            drain_delay: config.drain_delay,
            drain_timeout: config.drain_timeout,
            request_timeout: config.request_timeout,
            max_connection_age: config.max_connection_age,
            max_connection_age_grace: config.max_connection_age_grace,
            max_concurrent_requests: config.max_concurrent_requests,
            tls,
            auth,
            certificates: [
                ("tls", config.tls.as_ref().map(|tls| tls.cert.clone())),
                (
                    "tls_client_ca",
                    config.tls.as_ref().and_then(|tls| tls.client_ca.clone()),
                ),
                ("etcd_client", etcd_cert),
                ("etcd_ca", etcd_ca),
            ]
            .into_iter()
            .filter_map(|(file, path)| Some((file, path?)))
            .collect(),
        })
    }

    pub fn allocator(&self) -> &Allocator {
        &self.allocator
    }

    /// Serves until `shutdown` completes, then drains and closes the store.
    /// `health` is an optional plaintext listener serving only
    /// `grpc.health.v1` (for kubelet probes when the gRPC port has TLS).
    pub async fn serve(
        self,
        grpc: TcpListener,
        metrics_listener: TcpListener,
        health_listener: Option<TcpListener>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let lifecycle = &self.lifecycle;
        let (health, health_service) = health::service(MAX_REQUEST_BYTES);
        health.set_ready(self.allocator.check_ready().is_ok()).await;
        self.allocator.run_retention();
        self.allocator.follow_store();
        // These only wait and read (timers, files, sockets): safe to drop
        // where they wait.
        lifecycle.spawn_until_cancelled(health::follow_readiness(
            self.allocator.clone(),
            health.clone(),
            self.metrics.clone(),
        ));
        if let Some(tls) = &self.tls {
            lifecycle.spawn_until_cancelled(tls::reload(tls.clone(), self.metrics.clone()));
        }
        if let Some((auth, path, tokens)) = &self.auth {
            lifecycle.spawn_until_cancelled(token::reload(
                auth.clone(),
                path.clone(),
                tokens.clone(),
                self.metrics.clone(),
            ));
        }
        let reflection_v1 = reflection()
            .build_v1()?
            .max_decoding_message_size(MAX_REQUEST_BYTES);
        let reflection_v1alpha = reflection()
            .build_v1alpha()?
            .max_decoding_message_size(MAX_REQUEST_BYTES);

        let refresh = {
            let allocator = self.allocator.clone();
            let metrics = self.metrics.clone();
            let certificates = self.certificates.clone();
            Arc::new(move || {
                scrape::refresh_gauges(&allocator, &metrics);
                scrape::refresh_certificates(&certificates, &metrics);
            }) as Arc<dyn Fn() + Send + Sync>
        };
        lifecycle.spawn(metrics::serve(
            metrics_listener,
            self.metrics.clone(),
            refresh,
            lifecycle.token().clone(),
        ));
        if let Some(listener) = health_listener {
            health::serve_port(
                listener,
                health_service.clone(),
                self.request_timeout,
                lifecycle,
            );
        }

        let service = Service::new(
            self.allocator.clone(),
            self.metrics.clone(),
            self.auth.as_ref().map(|(auth, ..)| auth.clone()),
        );
        let in_flight = InFlight::new(self.max_concurrent_requests);
        let router = tonic::transport::Server::builder()
            .timeout(self.request_timeout)
            // Routers keep their connections for good: without an age, a
            // replica added by a scale-up or a rollout gets no calls.
            .max_connection_age(self.max_connection_age)
            .max_connection_age_grace(self.max_connection_age_grace)
            .layer(grpc_layers(
                self.metrics.clone(),
                self.request_timeout,
                in_flight.clone(),
            ))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(
                RoomAllocatorServiceServer::new(service)
                    .max_decoding_message_size(MAX_REQUEST_BYTES),
            );
        // Cancelled to stop accepting; not the lifecycle's token, which
        // ends the tasks only once the calls in flight drained.
        let stop_accepting = CancellationToken::new();
        let mut serving: Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>> =
            match &self.tls {
                None => Box::pin(router.serve_with_incoming_shutdown(
                    TcpIncoming::from(grpc).with_nodelay(Some(true)),
                    stop_accepting.clone().cancelled_owned(),
                )),
                Some(tls) => {
                    let (connections, incoming) = mpsc::channel(64);
                    lifecycle.spawn_until_cancelled(tls::accept(grpc, tls.clone(), connections));
                    Box::pin(router.serve_with_incoming_shutdown(
                        tokio_stream::wrappers::ReceiverStream::new(incoming),
                        stop_accepting.clone().cancelled_owned(),
                    ))
                }
            };

        // The shutdown, in order: each step starts when the one before
        // ended (or the server stopped by itself: then straight to 3).
        'serving: {
            tokio::select! {
                served = &mut serving => { served?; break 'serving; }
                () = shutdown => {}
            }
            // 1. Health NOT_SERVING; still serving for the drain delay, so load
            //    balancers move routers away first.
            health.shut_down().await;
            info!(
                drain_delay_secs = self.drain_delay.as_secs_f64(),
                "shutting down: health is NOT_SERVING; still serving for the drain delay"
            );
            tokio::select! {
                served = &mut serving => { served?; break 'serving; }
                () = tokio::time::sleep(self.drain_delay) => {}
            }
            // 2. Stop accepting, and drain the calls in flight. Idle client
            //    connections would hold tonic's graceful shutdown open until they
            //    close by themselves: stop as soon as no call is in flight.
            info!("draining in-flight calls");
            stop_accepting.cancel();
            let drain_timeout = self.drain_timeout;
            tokio::select! {
                served = &mut serving => served?,
                drained = in_flight.drain(drain_timeout) => if !drained {
                    warn!(
                        drain_timeout_secs = drain_timeout.as_secs_f64(),
                        "drain timeout passed; dropping calls still in flight"
                    );
                },
            }
        }
        drop(serving);
        // 3. Cancel every background task and 4. wait for each to end: a
        //    task in a durable write finishes it, none starts another.
        lifecycle.shutdown().await;
        // 5. Persist the counters and 6. close the store.
        match self.allocator.shutdown().await {
            Ok(()) => info!("store closed; bye"),
            // Nothing is lost but the latest rooms_issued counts: every range
            // was durable before its first room left.
            Err(error) => warn!(%error, "could not persist rooms_issued counters at shutdown"),
        }
        Ok(())
    }
}

fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}

/// The tower layers of the gRPC port, outermost first.
type GrpcLayers = Stack<InFlight, Stack<GrpcMetricsLayer, Identity>>;

/// The gRPC metrics layer outermost, so every call is counted once (timed
/// out, cancelled and shed ones too), then the in-flight limit.
fn grpc_layers(
    metrics: Arc<Metrics>,
    request_timeout: Duration,
    in_flight: InFlight,
) -> GrpcLayers {
    tower::ServiceBuilder::new()
        .layer(GrpcMetricsLayer {
            metrics,
            request_timeout,
        })
        .layer(in_flight)
        .into_inner()
}

/// `inner` behind the gRPC port's layers, stacked as `serve` stacks them: for
/// the benches, which measure what the layers cost per call.
#[doc(hidden)]
pub fn with_grpc_layers<S, B>(
    inner: S,
    metrics: Arc<Metrics>,
    request_timeout: Duration,
    max_concurrent_requests: usize,
) -> impl tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>, Error = S::Error>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
{
    use tower::Layer as _;
    grpc_layers(
        metrics,
        request_timeout,
        InFlight::new(max_concurrent_requests),
    )
    .layer(inner)
}

/// The address a listener actually bound, for the "listening" log line.
pub fn bound(listener: &TcpListener) -> Option<SocketAddr> {
    listener.local_addr().ok()
}
