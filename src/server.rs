//! The server: the allocator service plus `grpc.health.v1`, reflection (v1 and
//! v1alpha, which grpcurl 1.8 speaks), the metrics endpoint, TLS whose
//! certificates (and the bearer token) are reloaded when their files change,
//! and a graceful shutdown that turns health NOT_SERVING, lets in-flight calls
//! finish within the drain timeout, and persists the counters before the
//! store closes.
//!
//! Health service names:
//! - `""` (the whole server): liveness. SERVING from start until shutdown
//!   begins; a process that answers at all is alive.
//! - `room_allocator.v1.RoomAllocatorService`: readiness. SERVING while this
//!   process can hand out rooms: the embedded store's writes succeed; on etcd,
//!   registrations were confirmed within `--etcd-staleness-secs` (an etcd
//!   outage shorter than that keeps it SERVING: reserved ranges still serve).
//!   NOT_SERVING from shutdown on.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio_rustls::rustls;
use tonic::server::NamedService;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tracing::{error, info, warn};

use crate::allocator::{Allocator, Limits};
use crate::config::ServeArgs;
use crate::metrics::{self, Metrics};
use crate::pb;
use crate::service::{Auth, RoomAllocatorServiceServer, Service};
use crate::space::{Bounds, SpaceError};
use crate::store::{EmbeddedStore, EtcdStore, OpenError, Store};

pub(crate) mod limits;

/// Largest request accepted: every request of the contract is far smaller
/// (a worker name is at most 253 bytes).
const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// How often the certificate and token files are checked for changes: a
/// rotated Secret is in use well within 10 s.
const RELOAD_INTERVAL: Duration = Duration::from_secs(2);
/// How often readiness follows the store.
const READINESS_INTERVAL: Duration = Duration::from_millis(250);
/// A TLS handshake that takes longer is dropped (a stalled client must not
/// hold a connection slot).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

const SERVICE_NAME: &str = <RoomAllocatorServiceServer<Service> as NamedService>::NAME;

/// Why the server cannot start; each names the flag it comes from.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{flag} {value}: {cause}")]
    Store {
        flag: &'static str,
        value: String,
        cause: OpenError,
    },
    #[error("cannot read {flag} {}: {cause}", path.display())]
    Read {
        flag: &'static str,
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("--auth-token-file {} is empty; put the token in it", path.display())]
    EmptyToken { path: PathBuf },
    #[error("--auth-token-file {}: the token must be printable ASCII (it travels as an HTTP header)", path.display())]
    BadToken { path: PathBuf },
    #[error("{flag}: {reason}")]
    Tls { flag: &'static str, reason: String },
    #[error("--min-room/--max-room: {0}")]
    Bounds(SpaceError),
    #[error(
        "--etcd-endpoints {value:?}: {reason}; use e.g. http://127.0.0.1:2379,http://10.0.0.2:2379"
    )]
    Endpoint { value: String, reason: String },
    #[error("--data-dir {}: exists and is not a directory", path.display())]
    DataDirNotDir { path: PathBuf },
    #[error("--etcd-cert and --etcd-key go together; pass both")]
    EtcdIdentity,
    #[error(
        "--allow-unauthenticated-allocation and --auth-required-for-allocation contradict each other; \
         drop one (with --auth-token-file the token is required for every call by default)"
    )]
    AuthFlags,
    #[error("--tls-client-allowed-names {name:?}: not a DNS name or IP address")]
    AllowedName { name: String },
}

/// Failures while serving; opening failures are [`StartError`]s.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("the gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

fn read_file(flag: &'static str, path: &Path) -> Result<Vec<u8>, StartError> {
    std::fs::read(path).map_err(|cause| StartError::Read {
        flag,
        path: path.to_path_buf(),
        cause,
    })
}

/// The TLS files, as flags name them.
#[derive(Debug, Clone)]
struct TlsFiles {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
    /// `--tls-client-allowed-names`: empty allows every client the CA signed.
    allowed_names: Vec<rustls::pki_types::ServerName<'static>>,
}

impl TlsFiles {
    fn read(&self) -> Result<TlsMaterial, StartError> {
        Ok(TlsMaterial {
            cert: read_file("--tls-cert", &self.cert)?,
            key: read_file("--tls-key", &self.key)?,
            client_ca: self
                .client_ca
                .as_ref()
                .map(|ca| read_file("--tls-client-ca", ca))
                .transpose()?,
        })
    }
}

/// The bytes of the TLS files, to build a config from and to notice changes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TlsMaterial {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

impl TlsMaterial {
    /// A rustls server config: the certificate must parse and match the key,
    /// the client CA (mutual TLS) must hold a usable certificate.
    fn config(&self) -> Result<Arc<rustls::ServerConfig>, StartError> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = |flag, reason: String| StartError::Tls { flag, reason };
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&self.cert)
            .collect::<Result<_, _>>()
            .map_err(|e| tls("--tls-cert", format!("not a PEM certificate chain ({e})")))?;
        if certs.is_empty() {
            return Err(tls("--tls-cert", "holds no PEM certificate".into()));
        }
        let key = PrivateKeyDer::from_pem_slice(&self.key).map_err(|e| {
            tls(
                "--tls-key",
                format!("not a PEM private key (PKCS#8, PKCS#1 or SEC1): {e}"),
            )
        })?;
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| tls("--tls-cert", e.to_string()))?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(pem) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(pem) {
                    let cert = cert.map_err(|e| {
                        tls("--tls-client-ca", format!("not a PEM certificate ({e})"))
                    })?;
                    roots.add(cert).map_err(|e| {
                        tls("--tls-client-ca", format!("unusable CA certificate: {e}"))
                    })?;
                }
                if roots.is_empty() {
                    return Err(tls("--tls-client-ca", "holds no PEM certificate".into()));
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .map_err(|e| tls("--tls-client-ca", e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_single_cert(certs, key).map_err(|e| {
            tls(
                "--tls-cert/--tls-key",
                format!("the certificate and key do not go together: {e}"),
            )
        })?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}

/// Everything a start needs that can be checked without opening the store
/// or binding a port: `--check-config` runs exactly this.
struct Checked {
    bounds: Bounds,
    tls: Option<(TlsFiles, TlsMaterial, Arc<rustls::ServerConfig>)>,
    token: Option<(PathBuf, Vec<String>)>,
}

/// The tokens of `--auth-token-file`: one per line (several while a new
/// token is rolled out), blank lines ignored.
fn read_token(path: &Path) -> Result<Vec<String>, StartError> {
    let bytes = read_file("--auth-token-file", path)?;
    let text = String::from_utf8_lossy(&bytes);
    let tokens: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .map(str::to_owned)
        .collect();
    if tokens.is_empty() {
        return Err(StartError::EmptyToken {
            path: path.to_path_buf(),
        });
    }
    if !tokens
        .iter()
        .all(|token| token.bytes().all(|b| b.is_ascii_graphic() || b == b' '))
    {
        return Err(StartError::BadToken {
            path: path.to_path_buf(),
        });
    }
    Ok(tokens)
}

fn check(config: &ServeArgs) -> Result<Checked, StartError> {
    let bounds = Bounds::try_new(config.min_room, config.max_room).map_err(StartError::Bounds)?;
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => {
            let allowed_names = config
                .tls_client_allowed_names
                .iter()
                .map(|name| {
                    rustls::pki_types::ServerName::try_from(name.trim().to_owned())
                        .map_err(|_| StartError::AllowedName { name: name.clone() })
                })
                .collect::<Result<_, _>>()?;
            let files = TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: config.tls_client_ca.clone(),
                allowed_names,
            };
            let material = files.read()?;
            let server_config = material.config()?;
            Some((files, material, server_config))
        }
        _ => None,
    };
    if config.allow_unauthenticated_allocation && config.auth_required_for_allocation {
        return Err(StartError::AuthFlags);
    }
    let token = config
        .auth_token_file
        .as_ref()
        .map(|path| read_token(path).map(|token| (path.clone(), token)))
        .transpose()?;
    let etcd = &config.etcd;
    if etcd.etcd_endpoints.is_empty() {
        if config.data_dir.exists() && !config.data_dir.is_dir() {
            return Err(StartError::DataDirNotDir {
                path: config.data_dir.clone(),
            });
        }
    } else {
        for endpoint in &etcd.etcd_endpoints {
            let reason = match endpoint.parse::<http::Uri>() {
                Err(error) => Some(error.to_string()),
                Ok(uri) if uri.host().is_none() => Some("no host".to_owned()),
                Ok(uri) if !matches!(uri.scheme_str(), None | Some("http" | "https")) => {
                    Some("the scheme must be http or https".to_owned())
                }
                Ok(_) => None,
            };
            if let Some(reason) = reason {
                return Err(StartError::Endpoint {
                    value: endpoint.clone(),
                    reason,
                });
            }
        }
        if etcd.etcd_cert.is_some() != etcd.etcd_key.is_some() {
            return Err(StartError::EtcdIdentity);
        }
        for (flag, path) in [
            ("--etcd-ca", &etcd.etcd_ca),
            ("--etcd-cert", &etcd.etcd_cert),
            ("--etcd-key", &etcd.etcd_key),
        ] {
            if let Some(path) = path {
                read_file(flag, path)?;
            }
        }
    }
    Ok(Checked { bounds, tls, token })
}

/// Validates `config` as a start would, without opening the store or
/// binding a port (`serve --check-config`).
pub fn check_config(config: &ServeArgs) -> Result<(), StartError> {
    check(config).map(drop)
}

/// The TLS setup in force, swapped when the files change.
struct Tls {
    files: TlsFiles,
    current: RwLock<(TlsMaterial, Arc<rustls::ServerConfig>)>,
}

/// An opened store and allocator, ready to serve.
pub struct Server {
    allocator: Allocator,
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
    /// Checks the flags, then opens the store they name: etcd if
    /// `--etcd-endpoints` is set, else the embedded store. Refuses damaged,
    /// locked or unreachable data.
    pub async fn open(config: &ServeArgs) -> Result<Self, StartError> {
        let Checked { bounds, tls, token } = check(config)?;
        let store_timeout = Duration::from_secs(config.store_timeout_secs);
        let (store, snapshot): (Arc<dyn Store>, _) = if config.etcd.etcd_endpoints.is_empty() {
            let (store, mut snapshot) =
                EmbeddedStore::open(&config.data_dir, bounds).map_err(|cause| {
                    StartError::Store {
                        flag: "--data-dir",
                        value: config.data_dir.display().to_string(),
                        cause,
                    }
                })?;
            snapshot.retention = config.retention;
            (Arc::new(store), snapshot)
        } else {
            let etcd_config = config
                .etcd
                .store_config(store_timeout, config.retention, bounds);
            let (store, snapshot) =
                EtcdStore::open(&etcd_config)
                    .await
                    .map_err(|cause| StartError::Store {
                        flag: "--etcd-endpoints",
                        value: config.etcd.etcd_endpoints.join(","),
                        cause,
                    })?;
            (Arc::new(store), snapshot)
        };
        let limits = Limits {
            bounds,
            max_workers: config.max_workers(),
            store_timeout,
            retention: snapshot.retention,
        };
        let metrics = Arc::new(Metrics::new(store.kind()));
        if let Some(store_id) = store.store_id() {
            metrics.set_store_id(&store_id);
        }
        let allocator = Allocator::new(store, snapshot, limits, metrics.clone());
        let tls = tls.map(|(files, material, server_config)| {
            Arc::new(Tls {
                files,
                current: RwLock::new((material, server_config)),
            })
        });
        let auth = token.map(|(path, tokens)| {
            (
                Auth::new(&tokens, config.allow_unauthenticated_allocation),
                path,
                tokens,
            )
        });
        Ok(Self {
            allocator,
            metrics,
            drain_delay: Duration::from_secs(config.drain_delay_secs),
            drain_timeout: Duration::from_secs(config.drain_timeout_secs),
            request_timeout: Duration::from_secs(config.request_timeout_secs),
            max_connection_age: Duration::from_secs(config.max_connection_age_secs),
            max_connection_age_grace: Duration::from_secs(config.max_connection_age_grace_secs),
            max_concurrent_requests: usize::try_from(config.max_concurrent_requests)
                .unwrap_or(usize::MAX),
            tls,
            auth,
            certificates: [
                ("tls", &config.tls_cert),
                ("tls_client_ca", &config.tls_client_ca),
                ("etcd_client", &config.etcd.etcd_cert),
                ("etcd_ca", &config.etcd.etcd_ca),
            ]
            .into_iter()
            .filter_map(|(file, path)| Some((file, path.clone()?)))
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
        let reporter = tonic_health::server::HealthReporter::new();
        let health_service = tonic_health::pb::health_server::HealthServer::new(
            tonic_health::server::HealthService::from_health_reporter(reporter.clone()),
        )
        .max_decoding_message_size(MAX_REQUEST_BYTES);
        let health = Arc::new(Health {
            reporter,
            shutting_down: tokio::sync::Mutex::new(false),
        });
        health.set_ready(self.allocator.check_ready().is_ok()).await;
        let mut tasks = vec![self.allocator.run_retention()];
        tasks.extend(self.allocator.follow_store());
        tasks.push(tokio::spawn(follow_readiness(
            self.allocator.clone(),
            health.clone(),
            self.metrics.clone(),
        )));
        if self.tls.is_some() || self.auth.is_some() {
            tasks.push(tokio::spawn(reload_files(
                self.tls.clone(),
                self.auth.clone(),
                self.metrics.clone(),
            )));
        }
        let reflection_v1 = reflection()
            .build_v1()?
            .max_decoding_message_size(MAX_REQUEST_BYTES);
        let reflection_v1alpha = reflection()
            .build_v1alpha()?
            .max_decoding_message_size(MAX_REQUEST_BYTES);

        let (stop_side, side_stopped) = watch::channel(false);
        let refresh = {
            let allocator = self.allocator.clone();
            let metrics = self.metrics.clone();
            let certificates = self.certificates.clone();
            Arc::new(move || {
                refresh_gauges(&allocator, &metrics);
                refresh_certificates(&certificates, &metrics);
            }) as Arc<dyn Fn() + Send + Sync>
        };
        let metrics_task = tokio::spawn(metrics::serve(
            metrics_listener,
            self.metrics.clone(),
            refresh,
            side_stopped.clone(),
        ));
        let health_task = health_listener.map(|listener| {
            let mut stopped = side_stopped.clone();
            let service = health_service.clone();
            let (connections, incoming) = mpsc::channel(limits::MAX_SIDE_CONNECTIONS);
            tasks.push(tokio::spawn(accept_health(listener, connections)));
            let request_timeout = self.request_timeout;
            tokio::spawn(async move {
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
                        async move {
                            let _ = stopped.wait_for(|stop| *stop).await;
                        },
                    )
                    .await;
                if let Err(error) = served {
                    error!(%error, "the health listener failed");
                }
            })
        });

        let (draining_tx, draining) = oneshot::channel::<()>();
        let drain_delay = self.drain_delay;
        let signal = {
            let health = health.clone();
            async move {
                shutdown.await;
                health.shut_down().await;
                info!(
                    drain_delay_secs = drain_delay.as_secs_f64(),
                    "shutting down: health is NOT_SERVING; still serving for the drain delay"
                );
                // Load balancers see NOT_SERVING and move routers away first.
                tokio::time::sleep(drain_delay).await;
                info!("draining in-flight calls");
                let _ = draining_tx.send(());
            }
        };
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
            .layer(GrpcMetricsLayer {
                metrics: self.metrics.clone(),
                request_timeout: self.request_timeout,
            })
            .layer(in_flight.clone())
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(
                RoomAllocatorServiceServer::new(service)
                    .max_decoding_message_size(MAX_REQUEST_BYTES),
            );
        let serving: Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>> =
            match &self.tls {
                None => Box::pin(router.serve_with_incoming_shutdown(
                    TcpIncoming::from(grpc).with_nodelay(Some(true)),
                    signal,
                )),
                Some(tls) => {
                    let (connections, incoming) = mpsc::channel(64);
                    tasks.push(tokio::spawn(accept_tls(grpc, tls.clone(), connections)));
                    Box::pin(router.serve_with_incoming_shutdown(
                        tokio_stream::wrappers::ReceiverStream::new(incoming),
                        signal,
                    ))
                }
            };
        // Idle client connections would hold tonic's graceful shutdown open
        // until they close by themselves; stop as soon as no call is in flight.
        let drain_timeout = self.drain_timeout;
        let drained = async move {
            if draining.await.is_err() {
                std::future::pending::<()>().await;
            }
            if !in_flight.drain(drain_timeout).await {
                warn!(
                    drain_timeout_secs = drain_timeout.as_secs_f64(),
                    "drain timeout passed; dropping calls still in flight"
                );
            }
        };
        tokio::select! {
            served = serving => served?,
            () = drained => {}
        }

        // Every background task stops here, before the store closes.
        for task in &tasks {
            task.abort();
        }
        let _ = stop_side.send(true);
        let _ = metrics_task.await;
        if let Some(task) = health_task {
            let _ = task.await;
        }
        match self.allocator.shutdown().await {
            Ok(()) => info!("store closed; bye"),
            // Nothing is lost but the latest rooms_issued counts: every range
            // was durable before its first room left.
            Err(error) => warn!(%error, "could not persist rooms_issued counters at shutdown"),
        }
        Ok(())
    }
}

/// The health reporter behind one lock with the shutdown flag, so readiness
/// can never turn SERVING again after shutdown turned it NOT_SERVING.
struct Health {
    reporter: tonic_health::server::HealthReporter,
    shutting_down: tokio::sync::Mutex<bool>,
}

impl Health {
    async fn set_ready(&self, ready: bool) {
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

    async fn shut_down(&self) {
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
async fn follow_readiness(allocator: Allocator, health: Arc<Health>, metrics: Arc<Metrics>) {
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

fn refresh_gauges(allocator: &Allocator, metrics: &Metrics) {
    let gauges = allocator.gauges();
    metrics
        .workers_registered
        .set(gauges.workers_registered as f64);
    metrics.workers_limit.set(gauges.workers_limit as f64);
    metrics.space_used.set(gauges.space_used as f64);
    metrics.space_size.set(gauges.space_size as f64);
    metrics.ranges_held.set(gauges.ranges_held as f64);
    metrics
        .store_reachable
        .set(if gauges.store_reachable { 1.0 } else { 0.0 });
    metrics.registrations_confirmed_age.set(
        gauges
            .registrations_confirmed_age
            .map_or(0.0, |age| age.as_secs_f64()),
    );
    metrics.ready.set(if gauges.ready { 1.0 } else { 0.0 });
}

/// Exports when each certificate file expires, read at scrape time so a
/// renewed file shows at once (the files are small; scrapes are rare).
fn refresh_certificates(certificates: &[(&'static str, PathBuf)], metrics: &Metrics) {
    for (file, path) in certificates {
        // Mid-swap, or not a certificate: the reload reports that.
        if let Ok(Some(not_after)) = std::fs::read(path).map(|pem| soonest_not_after(&pem)) {
            metrics
                .certificate_not_after
                .get(&[file])
                .set(not_after as f64);
        }
    }
    if let Some(succeeded) = crate::store::etcd::client::tls_reload_succeeded() {
        metrics
            .reload_last_success
            .get(&["etcd_tls"])
            .set(if succeeded { 1.0 } else { 0.0 });
    }
}

/// The soonest notAfter (unix seconds) of the PEM certificates in `pem`.
fn soonest_not_after(pem: &[u8]) -> Option<i64> {
    x509_parser::pem::Pem::iter_from_buffer(pem)
        .filter_map(Result::ok)
        .filter(|block| block.label == "CERTIFICATE")
        .filter_map(|block| {
            block
                .parse_x509()
                .ok()
                .map(|cert| cert.validity().not_after.timestamp())
        })
        .min()
}

/// Rereads the TLS files and the token file every [`RELOAD_INTERVAL`]; a
/// changed file that builds a usable config replaces the old one for new
/// connections, a bad one is logged and counted and the old one stays.
async fn reload_files(
    tls: Option<Arc<Tls>>,
    auth: Option<(Auth, PathBuf, Vec<String>)>,
    metrics: Arc<Metrics>,
) {
    let mut last_tls_attempt = tls.as_ref().map(|tls| {
        tls.current
            .read()
            .expect("tls lock is never poisoned")
            .0
            .clone()
    });
    let mut last_token = auth.as_ref().map(|(_, _, token)| token.clone());
    let mut last_token_failure: Option<String> = None;
    let mut ticker = tokio::time::interval(RELOAD_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        if let Some(tls) = &tls {
            match tls.files.read() {
                Ok(material) if Some(&material) != last_tls_attempt.as_ref() => {
                    last_tls_attempt = Some(material.clone());
                    match material.config() {
                        Ok(config) => {
                            *tls.current.write().expect("tls lock is never poisoned") =
                                (material, config);
                            metrics.reloads.get(&["tls", "success"]).inc();
                            metrics.reload_last_success.get(&["tls"]).set(1.0);
                            info!("reloaded the TLS certificate; new connections use it");
                        }
                        Err(error) => {
                            metrics.reloads.get(&["tls", "failure"]).inc();
                            metrics.reload_last_success.get(&["tls"]).set(0.0);
                            error!(%error, "the new TLS files are unusable; keeping the previous certificate");
                        }
                    }
                }
                Ok(_) => {}
                Err(error) => {
                    // Mid-swap, or gone: try again next tick; count once.
                    metrics.reload_last_success.get(&["tls"]).set(0.0);
                    if last_tls_attempt.take().is_some() {
                        metrics.reloads.get(&["tls", "failure"]).inc();
                        error!(%error, "cannot read the TLS files; keeping the previous certificate");
                    }
                }
            }
        }
        if let Some((auth, path, _)) = &auth {
            match read_token(path) {
                Ok(token) if Some(&token) != last_token.as_ref() => {
                    auth.replace(&token);
                    last_token = Some(token);
                    last_token_failure = None;
                    metrics.reloads.get(&["token", "success"]).inc();
                    metrics.reload_last_success.get(&["token"]).set(1.0);
                    info!("reloaded the bearer token");
                }
                Ok(_) => {}
                Err(error) => {
                    metrics.reload_last_success.get(&["token"]).set(0.0);
                    let text = error.to_string();
                    if last_token_failure.as_ref() != Some(&text) {
                        metrics.reloads.get(&["token", "failure"]).inc();
                        error!(%error, "the token file is unusable; keeping the previous token");
                        last_token_failure = Some(text);
                        // Reload the same token again once the file is fixed.
                        last_token = None;
                    }
                }
            }
        }
    }
}

/// Accepts TCP connections and completes TLS handshakes with the config in
/// force at that moment, feeding finished connections to the server.
async fn accept_tls(
    listener: TcpListener,
    tls: Arc<Tls>,
    connections: mpsc::Sender<
        Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>, std::io::Error>,
    >,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                warn!(%error, "the gRPC listener failed to accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let config = tls
            .current
            .read()
            .expect("tls lock is never poisoned")
            .1
            .clone();
        let connections = connections.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let acceptor = tokio_rustls::TlsAcceptor::from(config);
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(stream)) if !client_allowed(&stream, &tls.files.allowed_names) => {
                    tracing::debug!(%peer, "client certificate names none of --tls-client-allowed-names; closed")
                }
                Ok(Ok(stream)) => {
                    let _ = connections.send(Ok(stream)).await;
                }
                Ok(Err(error)) => {
                    tracing::debug!(%peer, %error, "TLS handshake failed")
                }
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        });
    }
}

/// Accepts the plaintext health port's connections within its cap, and hands
/// over those that start talking within the header-read timeout.
async fn accept_health(
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

/// Whether the client's certificate (verified against `--tls-client-ca` in
/// the handshake) carries one of `allowed` in its subject alternative names;
/// with no names given, every verified client is allowed.
fn client_allowed(
    stream: &tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    allowed: &[rustls::pki_types::ServerName<'static>],
) -> bool {
    if allowed.is_empty() {
        return true;
    }
    let Some(cert) = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
    else {
        return false;
    };
    let Ok(cert) = rustls::server::ParsedCertificate::try_from(cert) else {
        return false;
    };
    allowed
        .iter()
        .any(|name| rustls::client::verify_server_name(&cert, name).is_ok())
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

type BoxResponseFuture<S, B> = Pin<
    Box<
        dyn Future<
                Output = Result<
                    <S as tower::Service<http::Request<B>>>::Response,
                    <S as tower::Service<http::Request<B>>>::Error,
                >,
            > + Send,
    >,
>;

impl<S, B> tower::Service<http::Request<B>> for InFlightService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxResponseFuture<S, B>;

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
                let mut response = status.into_http();
                response.extensions_mut().insert(NotServed);
                return Box::pin(std::future::ready(Ok(response)));
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

/// go-grpc-middleware's server metrics for every call to every service,
/// with `--request-timeout-secs` to tell a timed-out call from a cancelled one.
#[derive(Clone)]
struct GrpcMetricsLayer {
    metrics: Arc<Metrics>,
    request_timeout: Duration,
}

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetricsService {
            inner,
            metrics: self.metrics.clone(),
            request_timeout: self.request_timeout,
        }
    }
}

#[derive(Clone)]
pub struct GrpcMetricsService<S> {
    inner: S,
    metrics: Arc<Metrics>,
    request_timeout: Duration,
}

/// The (type, service, method) labels of a request path; bounded: paths this
/// server does not serve are all "unknown".
fn grpc_labels(path: &str) -> (&'static str, &'static str, &'static str) {
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
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let (service, method) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    KNOWN
        .iter()
        .find(|(_, s, m)| *s == service && *m == method)
        .copied()
        .unwrap_or(("unary", "unknown", "unknown"))
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
    metrics: Arc<Metrics>,
    labels: (&'static str, &'static str, &'static str),
    started: Instant,
    /// The sooner of `--request-timeout-secs` and the client's grpc-timeout.
    deadline: Duration,
    recorded: bool,
}

/// Marks a response that the allocator service never saw (shed, or refused
/// during shutdown), so that its `room_allocator_requests_total` count comes
/// from the metrics layer instead.
#[derive(Clone, Copy)]
struct NotServed;

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
        let (kind, service, method) = self.labels;
        let elapsed = self.started.elapsed();
        self.metrics
            .grpc_handling
            .get(&[kind, service, method])
            .observe(elapsed);
        self.metrics
            .grpc_handled
            .get(&[kind, service, method, grpc_go_code(code)])
            .inc();
        if !counted && service == metrics::SERVICE {
            // This family names codes as the contract does (UNAVAILABLE).
            self.metrics
                .observe_request(method, crate::service::code_name(code), elapsed);
        }
    }
}

impl Drop for CallRecord {
    fn drop(&mut self) {
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

impl<S, B> tower::Service<http::Request<B>> for GrpcMetricsService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxResponseFuture<S, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let (kind, service, method) = grpc_labels(request.uri().path());
        self.metrics
            .grpc_started
            .get(&[kind, service, method])
            .inc();
        let client_deadline = request
            .headers()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(grpc_timeout);
        let mut record = CallRecord {
            metrics: self.metrics.clone(),
            labels: (kind, service, method),
            started: Instant::now(),
            deadline: client_deadline.map_or(self.request_timeout, |client| {
                client.min(self.request_timeout)
            }),
            recorded: false,
        };
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await;
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
            record.record(code, counted);
            response
        })
    }
}

/// The address a listener actually bound, for the "listening" log line.
pub fn bound(listener: &TcpListener) -> Option<SocketAddr> {
    listener.local_addr().ok()
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

    #[test]
    fn grpc_labels_are_bounded_and_codes_are_grpc_gos() {
        assert_eq!(
            grpc_labels("/room_allocator.v1.RoomAllocatorService/AllocateRoom"),
            ("unary", metrics::SERVICE, "AllocateRoom")
        );
        assert_eq!(
            grpc_labels("/evil.Service/x"),
            ("unary", "unknown", "unknown")
        );
        assert_eq!(grpc_go_code(tonic::Code::Cancelled), "Canceled");
        assert_eq!(
            grpc_go_code(tonic::Code::FailedPrecondition),
            "FailedPrecondition"
        );
    }
}
