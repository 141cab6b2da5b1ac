//! The server: the allocator service plus `grpc.health.v1`, reflection (v1 and
//! v1alpha, which grpcurl 1.8 speaks), the metrics endpoint, and a graceful
//! shutdown that turns health NOT_SERVING, lets in-flight calls finish within
//! the drain timeout, and persists the counters before the store closes.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tonic::server::NamedService;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tracing::{info, warn};

use crate::allocator::{Allocator, Limits};
use crate::config::ServeArgs;
use crate::metrics::{self, Metrics};
use crate::pb;
use crate::service::{RoomAllocatorServiceServer, Service};
use crate::store::{EmbeddedStore, OpenError};

/// An opened store and allocator, ready to serve.
pub struct Server {
    allocator: Allocator,
    metrics: Arc<Metrics>,
    drain_timeout: Duration,
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
    /// Opens the store named by `config`; refuses damaged or locked data.
    pub fn open(config: &ServeArgs) -> Result<Self, OpenError> {
        let limits = Limits {
            space_end: config.max_room.saturating_add(1),
            max_workers: config.max_workers,
        };
        let (store, snapshot) = EmbeddedStore::open(&config.data_dir, limits.space_end)?;
        let metrics = Arc::new(Metrics::new());
        let allocator = Allocator::new(Arc::new(store), snapshot, limits, metrics.clone());
        Ok(Self {
            allocator,
            metrics,
            drain_timeout: Duration::from_secs(config.drain_timeout_secs),
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
        let reflection_v1 = reflection().build_v1()?;
        let reflection_v1alpha = reflection().build_v1alpha()?;

        let (stop_metrics, metrics_stopped) = watch::channel(false);
        let metrics_task = tokio::spawn(metrics::serve(
            metrics_listener,
            self.metrics.clone(),
            metrics_stopped,
        ));

        let (draining_tx, draining) = oneshot::channel::<()>();
        let signal = {
            let health = health.clone();
            async move {
                shutdown.await;
                info!("shutting down: health is NOT_SERVING, draining in-flight calls");
                for service in ["", SERVICE_NAME] {
                    health
                        .set_service_status(service, ServingStatus::NotServing)
                        .await;
                }
                let _ = draining_tx.send(());
            }
        };
        let incoming = TcpIncoming::from(grpc).with_nodelay(Some(true));
        let service = Service::new(self.allocator.clone(), self.metrics.clone());
        let serving = tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(RoomAllocatorServiceServer::new(service))
            .serve_with_incoming_shutdown(incoming, signal);
        let drain_timeout = self.drain_timeout;
        let drain_deadline = async move {
            if draining.await.is_ok() {
                tokio::time::sleep(drain_timeout).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            served = serving => served?,
            () = drain_deadline => warn!(?drain_timeout, "drain timeout passed; dropping calls still in flight"),
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

fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}
