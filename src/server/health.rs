//! Health: `grpc.health.v1` on the gRPC port, and on the optional plaintext
//! health port (`--health-listen`, for kubelet probes when the gRPC port has
//! TLS).
//!
//! Service names:
//! - `""` (the whole server): liveness. SERVING from start until shutdown
//!   begins; a process that answers at all is alive.
//! - `room_allocator.v1.RoomAllocatorService`: readiness. SERVING while this
//!   process can hand out rooms: the embedded store's writes succeed; on etcd,
//!   registrations were confirmed within `--etcd-staleness-secs` (an etcd
//!   outage shorter than that keeps it SERVING: reserved ranges still serve).
//!   NOT_SERVING from shutdown on, for good.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tonic::server::NamedService;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::HealthService;
use tonic_health::ServingStatus;
use tracing::{error, info, warn};

use crate::allocator::Allocator;
use crate::lifecycle::Lifecycle;
use crate::metrics::Metrics;
use crate::service::{RoomAllocatorServiceServer, Service};

use super::limits;

/// How often readiness follows the store.
const READINESS_INTERVAL: Duration = Duration::from_millis(250);

/// The readiness service name.
pub(super) const SERVICE_NAME: &str = <RoomAllocatorServiceServer<Service> as NamedService>::NAME;

/// The health reporter behind one lock with the shutdown flag, so readiness
/// can never turn SERVING again after shutdown turned it NOT_SERVING.
pub(super) struct Health {
    reporter: tonic_health::server::HealthReporter,
    shutting_down: tokio::sync::Mutex<bool>,
}

impl Health {
    pub(super) async fn set_ready(&self, ready: bool) {
        let shutting_down = self.shutting_down.lock().await;
        if *shutting_down {
            return;
        }
        let status = if ready {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        self.reporter.set_service_status(SERVICE_NAME, status).await;
    }

    pub(super) async fn shut_down(&self) {
        let mut shutting_down = self.shutting_down.lock().await;
        *shutting_down = true;
        for service in ["", SERVICE_NAME] {
            self.reporter
                .set_service_status(service, ServingStatus::NotServing)
                .await;
        }
    }
}

/// Readiness follows whether the allocator can hand out rooms.
pub(super) async fn follow_readiness(
    allocator: Allocator,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
) {
    let mut ready = allocator.check_ready().is_ok();
    let mut ticker = tokio::time::interval(READINESS_INTERVAL);
    loop {
        ticker.tick().await;
        let now = allocator.check_ready();
        metrics.ready.set(if now.is_ok() { 1.0 } else { 0.0 });
        if now.is_ok() != ready {
            ready = now.is_ok();
            match &now {
                Ok(()) => info!("ready: can hand out rooms again"),
                Err(error) => warn!(%error, "not ready: cannot hand out rooms"),
            }
            health.set_ready(ready).await;
        }
    }
}

/// The health service, and the handle that sets what it reports.
pub(super) fn service(max_request_bytes: usize) -> (Arc<Health>, HealthServer<HealthService>) {
    let reporter = tonic_health::server::HealthReporter::new();
    let service = HealthServer::new(HealthService::from_health_reporter(reporter.clone()))
        .max_decoding_message_size(max_request_bytes);
    let health = Arc::new(Health {
        reporter,
        shutting_down: tokio::sync::Mutex::new(false),
    });
    (health, service)
}

/// Serves `service` alone on the plaintext health port until shutdown
/// cancels the lifecycle, which also drops its accept loop (it only waits
/// on sockets).
pub(super) fn serve_port(
    listener: TcpListener,
    service: HealthServer<HealthService>,
    request_timeout: Duration,
    lifecycle: &Lifecycle,
) {
    let (connections, incoming) = mpsc::channel(limits::MAX_SIDE_CONNECTIONS);
    lifecycle.spawn_until_cancelled(accept(listener, connections));
    let stopped = lifecycle.token().clone();
    lifecycle.spawn(async move {
        let served = tonic::transport::Server::builder()
            // A request half sent never holds its stream past this.
            .timeout(request_timeout.min(limits::HEADER_READ_TIMEOUT))
            // Nor an idle or stalled connection one of the slots for
            // good: probes open a new connection each time.
            .max_connection_age(limits::SIDE_CONNECTION_AGE)
            .max_connection_age_grace(limits::HEADER_READ_TIMEOUT)
            .add_service(service)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::ReceiverStream::new(incoming),
                stopped.cancelled_owned(),
            )
            .await;
        if let Err(error) = served {
            error!(%error, "the health listener failed");
        }
    });
}

/// Accepts the plaintext health port's connections within its cap, and hands
/// over those that start talking within the header-read timeout.
async fn accept(
    listener: TcpListener,
    connections: mpsc::Sender<Result<limits::Limited, std::io::Error>>,
) {
    let slots = limits::Slots::new();
    loop {
        let connection = slots.accept(&listener, "health").await;
        let connections = connections.clone();
        tokio::spawn(async move {
            if limits::sends_in_time(&connection).await {
                let _ = connections.send(Ok(connection)).await;
            } else {
                tracing::debug!("a health connection sent nothing in time; closed");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn readiness_cannot_turn_serving_after_shutdown_turned_it_off() {
        let reporter = tonic_health::server::HealthReporter::new();
        let service = tonic_health::server::HealthService::from_health_reporter(reporter.clone());
        let health = Health {
            reporter,
            shutting_down: tokio::sync::Mutex::new(false),
        };
        health.set_ready(true).await;
        health.shut_down().await;
        // The follower's late update, the check-then-act window of old.
        health.set_ready(true).await;
        use tonic_health::pb::health_server::Health as _;
        let status = service
            .check(tonic::Request::new(tonic_health::pb::HealthCheckRequest {
                service: SERVICE_NAME.into(),
            }))
            .await
            .expect("known service")
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::NotServing as i32);
    }
}
