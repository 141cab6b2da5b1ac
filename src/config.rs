//! Command-line flags. Every flag of `serve`, `migrate`, `retention` (but
//! `--set`) and the client commands can also come from the environment as
//! `ROOM_ALLOCATOR_<FLAG>` (how the Helm chart configures the server);
//! `bench` flags have no variables. Boolean variables take true/false,
//! 1/0, yes/no, on/off.
//!
//! Numeric bounds live in [`BOUNDS`] and the duration grammar in
//! [`DURATION_PATTERN`]: clap enforces them, and `room-allocator
//! config-schema` prints them, so the Helm chart's schema is tested against
//! the binary's own limits.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::secret::Secret;
use crate::server::{AuthConfig, ServerConfig, StartError, StoreConfig, TlsConfig};
use crate::space::{Bounds, MAX_ROOM};

/// Inclusive bounds of every numeric `serve` flag: (flag, min, max).
pub const BOUNDS: &[(&str, u64, u64)] = &[
    ("--max-workers", 1, 10_000_000),
    ("--drain-delay-secs", 0, 3600),
    ("--drain-timeout-secs", 0, 3600),
    ("--request-timeout-secs", 1, 300),
    ("--max-connection-age-secs", 1, 86400),
    ("--max-connection-age-grace-secs", 1, 3600),
    ("--max-concurrent-requests", 1, 1_000_000),
    ("--store-timeout-secs", 1, 60),
    ("--etcd-staleness-secs", 2, 3600),
    ("--worker-threads", 1, 1024),
    ("--min-room", 1, MAX_ROOM),
    ("--max-room", 1, MAX_ROOM),
];

/// The bounds of `flag` from [`BOUNDS`].
const fn bound(flag: &str) -> (u64, u64) {
    let mut i = 0;
    while i < BOUNDS.len() {
        let (name, min, max) = BOUNDS[i];
        if str_eq(name, flag) {
            return (min, max);
        }
        i += 1;
    }
    panic!("a flag without bounds")
}

const fn str_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// The grammar of durations (`--retention`): 1 to 6 digits, no leading zero,
/// and an optional unit (s, m, h, d). The chart's schema uses the same.
pub const DURATION_PATTERN: &str = "^[1-9][0-9]{0,5}[smhd]?$";

#[derive(Debug, Parser)]
#[command(name = "room-allocator", version, about, propagate_version = true)]
pub struct Cli {
    /// Log format on standard error.
    #[arg(long, global = true, env = "ROOM_ALLOCATOR_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the allocator server.
    Serve(Box<ServeArgs>),
    /// Register a prefill worker with its dp_size (or realign it).
    Register(RegisterArgs),
    /// Allocate rooms for a worker and rank; one JSON line per room.
    Allocate(AllocateArgs),
    /// Lease a block of bases for a worker; one JSON line.
    Lease(LeaseArgs),
    /// Tell which worker, rank and dp_size a room belongs to.
    Resolve(ResolveArgs),
    /// List registered workers (every page); one JSON line per worker.
    Workers(ClientArgs),
    /// Deregister a worker: no new rooms for it until it registers again.
    Deregister(DeregisterArgs),
    /// Ask grpc.health.v1 whether the server (or one service) is serving;
    /// exits 0 only if it is.
    Health(HealthArgs),
    /// Load a server in a closed loop and report rooms/s, latency and a check
    /// of every room (see BENCHMARKS.md).
    Bench(Box<crate::bench::BenchArgs>),
    /// Move an embedded store's high-water mark, ranges and registrations
    /// into etcd, so that no room issued before can be issued again.
    Migrate(Box<MigrateArgs>),
    /// Show the fleet's retention stored in etcd, or change it with --set
    /// (replicas take it when they start).
    Retention(Box<RetentionArgs>),
    /// Print the flags' bounds as JSON (the Helm chart's tests use it).
    #[command(hide = true)]
    ConfigSchema,
}

#[derive(Debug, Clone, Args)]
pub struct MigrateArgs {
    /// The embedded store to migrate (no server may be running on it).
    #[arg(
        long,
        env = "ROOM_ALLOCATOR_DATA_DIR",
        default_value = "./room-allocator-data"
    )]
    pub data_dir: PathBuf,

    /// Bound on each etcd call.
    #[arg(long, env = "ROOM_ALLOCATOR_STORE_TIMEOUT_SECS", default_value_t = 3,
          value_parser = clap::value_parser!(u64).range(1..=60))]
    pub store_timeout_secs: u64,

    /// The fleet's retention, if etcd has none yet (see `serve --retention`).
    #[arg(long, env = "ROOM_ALLOCATOR_RETENTION", default_value = "24h", value_parser = parse_duration)]
    pub retention: Duration,

    /// Migrate a store that holds nothing (no worker, no range). Without
    /// it such a store is refused: where rooms were issued, an empty store
    /// is the wrong dir or an unmounted volume.
    #[arg(long)]
    pub allow_empty: bool,

    #[command(flatten)]
    pub etcd: EtcdArgs,
}

#[derive(Debug, Clone, Args)]
pub struct RetentionArgs {
    /// The new retention for every replica of the prefix (e.g. 48h).
    #[arg(long, value_parser = parse_duration)]
    pub set: Option<Duration>,

    /// Bound on each etcd call.
    #[arg(long, env = "ROOM_ALLOCATOR_STORE_TIMEOUT_SECS", default_value_t = 3,
          value_parser = clap::value_parser!(u64).range(1..=60))]
    pub store_timeout_secs: u64,

    #[command(flatten)]
    pub etcd: EtcdArgs,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address for gRPC; port 0 picks a free port (the bound address is logged).
    #[arg(long, env = "ROOM_ALLOCATOR_LISTEN", default_value = "0.0.0.0:50051")]
    pub listen: SocketAddr,

    /// Directory of the embedded store; created if missing. One server per directory.
    #[arg(
        long,
        env = "ROOM_ALLOCATOR_DATA_DIR",
        default_value = "./room-allocator-data"
    )]
    pub data_dir: PathBuf,

    /// Address for Prometheus metrics at /metrics.
    #[arg(
        long,
        env = "ROOM_ALLOCATOR_METRICS_LISTEN",
        default_value = "0.0.0.0:9090"
    )]
    pub metrics_listen: SocketAddr,

    /// Address of a plaintext listener serving only grpc.health.v1, for
    /// kubelet gRPC probes when the gRPC port has TLS. Off by default.
    #[arg(long, env = "ROOM_ALLOCATOR_HEALTH_LISTEN")]
    pub health_listen: Option<SocketAddr>,

    /// Lowest room this deployment hands out. Deployments with disjoint
    /// [--min-room, --max-room] never share a room.
    #[arg(long, env = "ROOM_ALLOCATOR_MIN_ROOM", default_value_t = 1,
          value_parser = clap::value_parser!(u64).range(bound("--min-room").0..=bound("--min-room").1))]
    pub min_room: u64,

    /// Highest room this deployment hands out (inclusive).
    #[arg(long, env = "ROOM_ALLOCATOR_MAX_ROOM", default_value_t = MAX_ROOM,
          value_parser = clap::value_parser!(u64).range(bound("--max-room").0..=bound("--max-room").1))]
    pub max_room: u64,

    /// Most workers registered at once (deregistered ones do not count);
    /// more registrations get RESOURCE_EXHAUSTED. On etcd the limit is per
    /// replica, not fleet-wide: each replica counts the workers it knows of
    /// and refuses past its own limit, so replicas with different limits
    /// disagree, and registrations racing on several replicas may pass it.
    #[arg(long, env = "ROOM_ALLOCATOR_MAX_WORKERS", default_value_t = 100_000,
          value_parser = clap::value_parser!(u64).range(bound("--max-workers").0..=bound("--max-workers").1))]
    pub max_workers: u64,

    /// On SIGTERM/SIGINT, how long health reports NOT_SERVING while calls are
    /// still served, so load balancers stop sending new ones first.
    #[arg(long, env = "ROOM_ALLOCATOR_DRAIN_DELAY_SECS", default_value_t = 0,
          value_parser = clap::value_parser!(u64).range(bound("--drain-delay-secs").0..=bound("--drain-delay-secs").1))]
    pub drain_delay_secs: u64,

    /// After the drain delay, how long in-flight calls may take before the server exits anyway.
    #[arg(long, env = "ROOM_ALLOCATOR_DRAIN_TIMEOUT_SECS", default_value_t = 20,
          value_parser = clap::value_parser!(u64).range(bound("--drain-timeout-secs").0..=bound("--drain-timeout-secs").1))]
    pub drain_timeout_secs: u64,

    /// Server certificate chain (PEM) for TLS on the gRPC port (with --tls-key).
    /// Reloaded when the file changes (new connections use the new one).
    #[arg(long, env = "ROOM_ALLOCATOR_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// Server private key (PEM: PKCS#8, PKCS#1 RSA or SEC1 EC, e.g. P-256).
    #[arg(long, env = "ROOM_ALLOCATOR_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// CA (PEM) whose client certificates are required (mutual TLS).
    #[arg(long, env = "ROOM_ALLOCATOR_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// With --tls-client-ca, accept only client certificates carrying one of
    /// these names (DNS names or IP addresses, comma-separated) in their
    /// subject alternative names; others are closed after the handshake.
    #[arg(
        long,
        env = "ROOM_ALLOCATOR_TLS_CLIENT_ALLOWED_NAMES",
        requires = "tls_client_ca",
        value_delimiter = ','
    )]
    pub tls_client_allowed_names: Vec<String>,

    /// File holding the bearer token that every RoomAllocatorService call
    /// requires (`authorization: Bearer <token>`; health and reflection stay
    /// open); several tokens, one per line, are all accepted (to rotate
    /// without a gap). Reloaded when the file changes.
    #[arg(long, env = "ROOM_ALLOCATOR_AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<PathBuf>,

    /// Require the token for every call, allocation and resolve included:
    /// the default with --auth-token-file; accepted for older deployments.
    #[arg(
        long,
        env = "ROOM_ALLOCATOR_AUTH_REQUIRED_FOR_ALLOCATION",
        requires = "auth_token_file",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub auth_required_for_allocation: bool,

    /// Let callers without the token use AllocateRoom, LeaseRooms,
    /// ResolveRank, ListWorkers and GetRoomSpace (registering, also through
    /// AllocateRoom, and deregistering still need it). Risk: anyone who can
    /// reach the port can then reserve up to 2^24 numbers a call, use up a
    /// narrowed --min-room/--max-room space and grow the store, and list
    /// the workers. Refused together with --auth-required-for-allocation.
    #[arg(
        long,
        env = "ROOM_ALLOCATOR_ALLOW_UNAUTHENTICATED_ALLOCATION",
        requires = "auth_token_file",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub allow_unauthenticated_allocation: bool,

    /// Per-call deadline; calls still running then are cancelled.
    #[arg(long, env = "ROOM_ALLOCATOR_REQUEST_TIMEOUT_SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(bound("--request-timeout-secs").0..=bound("--request-timeout-secs").1))]
    pub request_timeout_secs: u64,

    /// Age after which a client connection is told to go away (HTTP/2
    /// GOAWAY) and the client reconnects, so routers spread onto replicas
    /// added by a scale-up or a rollout instead of staying on the old ones.
    #[arg(long, env = "ROOM_ALLOCATOR_MAX_CONNECTION_AGE_SECS", default_value_t = 300,
          value_parser = clap::value_parser!(u64).range(bound("--max-connection-age-secs").0..=bound("--max-connection-age-secs").1))]
    pub max_connection_age_secs: u64,

    /// After --max-connection-age-secs, how long calls in flight on the old
    /// connection may take before it is closed anyway; keep it at or above
    /// --request-timeout-secs.
    #[arg(long, env = "ROOM_ALLOCATOR_MAX_CONNECTION_AGE_GRACE_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(bound("--max-connection-age-grace-secs").0..=bound("--max-connection-age-grace-secs").1))]
    pub max_connection_age_grace_secs: u64,

    /// Calls in flight at most; more are refused at once with
    /// RESOURCE_EXHAUSTED instead of queueing without bound.
    #[arg(long, env = "ROOM_ALLOCATOR_MAX_CONCURRENT_REQUESTS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(bound("--max-concurrent-requests").0..=bound("--max-concurrent-requests").1))]
    pub max_concurrent_requests: u64,

    /// Check everything a start would (flags, files, TLS pair, endpoints)
    /// and exit: for deployment pipelines.
    #[arg(long, env = "ROOM_ALLOCATOR_CHECK_CONFIG",
          value_parser = clap::builder::BoolishValueParser::new())]
    pub check_config: bool,

    /// Bound on every store operation (fsync, etcd call); past it calls get UNAVAILABLE.
    #[arg(long, env = "ROOM_ALLOCATOR_STORE_TIMEOUT_SECS", default_value_t = 3,
          value_parser = clap::value_parser!(u64).range(bound("--store-timeout-secs").0..=bound("--store-timeout-secs").1))]
    pub store_timeout_secs: u64,

    /// How long every issued room stays resolvable (e.g. 24h, 90m, 3600s).
    /// Rooms come from a range for at most this long after it is reserved,
    /// and ranges are pruned once twice this old. Keep it above any SGLang
    /// bootstrap timeout. On etcd, the fleet's value in etcd wins (see
    /// `room-allocator retention`).
    #[arg(long, env = "ROOM_ALLOCATOR_RETENTION", default_value = "24h", value_parser = parse_duration)]
    pub retention: Duration,

    #[command(flatten)]
    pub etcd: EtcdArgs,

    /// Tokio worker threads; default: one per core.
    #[arg(long, env = "ROOM_ALLOCATOR_WORKER_THREADS",
          value_parser = clap::value_parser!(u64).range(bound("--worker-threads").0..=bound("--worker-threads").1))]
    pub worker_threads: Option<u64>,
}

impl ServeArgs {
    /// `--max-workers` as a count.
    pub fn max_workers(&self) -> usize {
        usize::try_from(self.max_workers).unwrap_or(usize::MAX)
    }

    /// The server's configuration, for [`Server::open`](crate::server::Server::open)
    /// and `--check-config`. Refuses what the flags alone get wrong (the
    /// bounds, contradicting auth flags); the files are checked by the server.
    pub fn server_config(&self) -> Result<ServerConfig, StartError> {
        let bounds = Bounds::try_new(self.min_room, self.max_room).map_err(StartError::Bounds)?;
        if self.allow_unauthenticated_allocation && self.auth_required_for_allocation {
            return Err(StartError::AuthFlags);
        }
        let store_timeout = Duration::from_secs(self.store_timeout_secs);
        let store = if self.etcd.etcd_endpoints.is_empty() {
            StoreConfig::Embedded {
                data_dir: self.data_dir.clone(),
            }
        } else {
            StoreConfig::Etcd(Box::new(self.etcd.store_config(
                store_timeout,
                self.retention,
                bounds,
            )))
        };
        Ok(ServerConfig {
            bounds,
            store,
            max_workers: self.max_workers(),
            store_timeout,
            retention: self.retention,
            drain_delay: Duration::from_secs(self.drain_delay_secs),
            drain_timeout: Duration::from_secs(self.drain_timeout_secs),
            request_timeout: Duration::from_secs(self.request_timeout_secs),
            max_connection_age: Duration::from_secs(self.max_connection_age_secs),
            max_connection_age_grace: Duration::from_secs(self.max_connection_age_grace_secs),
            max_concurrent_requests: usize::try_from(self.max_concurrent_requests)
                .unwrap_or(usize::MAX),
            tls: match (&self.tls_cert, &self.tls_key) {
                (Some(cert), Some(key)) => Some(TlsConfig {
                    cert: cert.clone(),
                    key: key.clone(),
                    client_ca: self.tls_client_ca.clone(),
                    client_allowed_names: self.tls_client_allowed_names.clone(),
                }),
                _ => None,
            },
            auth: self.auth_token_file.as_ref().map(|token_file| AuthConfig {
                token_file: token_file.clone(),
                allow_unauthenticated_allocation: self.allow_unauthenticated_allocation,
            }),
        })
    }
}

#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// The allocator: `host:port` (plaintext), `http://host:port`, or
    /// `https://host:port` (with --tls-ca).
    #[arg(
        long,
        env = "ROOM_ALLOCATOR_SERVER",
        default_value = "http://127.0.0.1:50051"
    )]
    pub server: String,

    /// Deadline for each call, in seconds.
    #[arg(long, env = "ROOM_ALLOCATOR_TIMEOUT_SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub timeout_secs: u64,

    /// CA (PEM) to verify the server's certificate; `host:port` then means https.
    #[arg(long, env = "ROOM_ALLOCATOR_TLS_CA")]
    pub tls_ca: Option<PathBuf>,

    /// Client certificate (PEM) for a server that requires mutual TLS (with --tls-key).
    #[arg(long, env = "ROOM_ALLOCATOR_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// Client private key (PEM) for mutual TLS (with --tls-cert).
    #[arg(long, env = "ROOM_ALLOCATOR_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// The name the server's certificate must carry, if not the host in --server.
    #[arg(long, env = "ROOM_ALLOCATOR_TLS_SERVER_NAME")]
    pub tls_server_name: Option<String>,

    /// Bearer token to send (for servers run with --auth-token-file).
    #[arg(long, env = "ROOM_ALLOCATOR_TOKEN", hide_env_values = true)]
    pub token: Option<Secret>,
}

#[derive(Debug, Clone, Args)]
pub struct HealthArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The service to ask about; empty asks about the whole server
    /// (liveness), room_allocator.v1.RoomAllocatorService about readiness.
    #[arg(long, env = "ROOM_ALLOCATOR_SERVICE", default_value = "")]
    pub service: String,
}

#[derive(Debug, Clone, Args)]
pub struct RegisterArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The prefill worker's name.
    #[arg(long, env = "ROOM_ALLOCATOR_WORKER")]
    pub worker: String,
    /// The prefill worker's data-parallel size.
    #[arg(long, env = "ROOM_ALLOCATOR_DP_SIZE")]
    pub dp_size: u32,
}

#[derive(Debug, Clone, Args)]
pub struct DeregisterArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The prefill worker's name.
    #[arg(long, env = "ROOM_ALLOCATOR_WORKER")]
    pub worker: String,
}

#[derive(Debug, Clone, Args)]
pub struct AllocateArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The prefill worker's name.
    #[arg(long, env = "ROOM_ALLOCATOR_WORKER")]
    pub worker: String,
    /// The prefill rank the room is for.
    #[arg(long, env = "ROOM_ALLOCATOR_RANK")]
    pub rank: u32,
    /// The dp_size the caller expects; registers an unknown worker. 0 = as registered.
    #[arg(long, env = "ROOM_ALLOCATOR_DP_SIZE", default_value_t = 0)]
    pub dp_size: u32,
    /// How many rooms to allocate (at least 1).
    #[arg(long, env = "ROOM_ALLOCATOR_COUNT", default_value_t = 1,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub count: u64,
}

#[derive(Debug, Clone, Args)]
pub struct LeaseArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The prefill worker's name.
    #[arg(long, env = "ROOM_ALLOCATOR_WORKER")]
    pub worker: String,
    /// How many bases to lease (1 to 1,000,000; at most 2^24 / dp_size).
    #[arg(long, env = "ROOM_ALLOCATOR_COUNT",
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub count: u32,
    /// The dp_size the caller expects; 0 = as registered.
    #[arg(long, env = "ROOM_ALLOCATOR_DP_SIZE", default_value_t = 0)]
    pub dp_size: u32,
}

#[derive(Debug, Clone, Args)]
pub struct ResolveArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The room to resolve.
    pub room: u64,
}

/// etcd flags: with `--etcd-endpoints`, replicas share one room space in etcd
/// instead of the embedded store.
#[derive(Debug, Clone, Args)]
pub struct EtcdArgs {
    /// etcd endpoints, comma-separated (e.g. http://127.0.0.1:2379); switches to the etcd store.
    #[arg(long, env = "ROOM_ALLOCATOR_ETCD_ENDPOINTS", value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,

    /// Key prefix in etcd; deployments with different prefixes have separate room spaces.
    #[arg(
        long,
        env = "ROOM_ALLOCATOR_ETCD_PREFIX",
        default_value = "/room-allocator/"
    )]
    pub etcd_prefix: String,

    /// etcd user name (with --etcd-password or --etcd-password-file).
    #[arg(
        long,
        env = "ROOM_ALLOCATOR_ETCD_USERNAME",
        requires = "etcd_password_source"
    )]
    pub etcd_username: Option<String>,

    /// etcd password; prefer the environment variable over the flag, and
    /// --etcd-password-file over both (a rotated password needs no restart).
    #[arg(
        long,
        env = "ROOM_ALLOCATOR_ETCD_PASSWORD",
        hide_env_values = true,
        requires = "etcd_username",
        group = "etcd_password_source"
    )]
    pub etcd_password: Option<Secret>,

    /// File holding the etcd password (one trailing newline is not part of
    /// it). Reread at every authentication with etcd, so a password rotated
    /// in the file (a mounted Secret) is used from the next token refresh
    /// on; an unreadable or empty file keeps the last password read. Must
    /// be readable at start.
    #[arg(
        long,
        env = "ROOM_ALLOCATOR_ETCD_PASSWORD_FILE",
        requires = "etcd_username",
        group = "etcd_password_source"
    )]
    pub etcd_password_file: Option<PathBuf>,

    /// CA certificate (PEM) to verify etcd's TLS certificate.
    #[arg(long, env = "ROOM_ALLOCATOR_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,

    /// Client certificate (PEM) for mutual TLS with etcd (with --etcd-key).
    #[arg(long, env = "ROOM_ALLOCATOR_ETCD_CERT", requires = "etcd_key")]
    pub etcd_cert: Option<PathBuf>,

    /// Client key (PEM) for mutual TLS with etcd (with --etcd-cert).
    #[arg(long, env = "ROOM_ALLOCATOR_ETCD_KEY", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,

    /// Longest a replica hands out rooms without confirming worker
    /// registrations with etcd; bounds how long a dp_size change made on
    /// another replica can go unseen.
    #[arg(long, env = "ROOM_ALLOCATOR_ETCD_STALENESS_SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(bound("--etcd-staleness-secs").0..=bound("--etcd-staleness-secs").1))]
    pub etcd_staleness_secs: u64,
}

/// Parses `90s`, `15m`, `24h`, `7d` (or plain seconds): [`DURATION_PATTERN`].
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || {
        format!(
            "{text:?} is not a duration; use 1 to 6 digits and a unit, e.g. 90s, 15m, 24h or 7d"
        )
    };
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    if number.is_empty() || number.len() > 6 || number.starts_with('0') {
        return Err(bad());
    }
    let number: u64 = number.parse().map_err(|_| bad())?;
    let seconds_per_unit = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    Ok(Duration::from_secs(number * seconds_per_unit))
}

impl EtcdArgs {
    /// The etcd store's settings, with `timeout` bounding each call.
    pub fn store_config(
        &self,
        timeout: Duration,
        retention: Duration,
        bounds: Bounds,
    ) -> crate::store::EtcdConfig {
        crate::store::EtcdConfig {
            endpoints: self.etcd_endpoints.clone(),
            prefix: self.etcd_prefix.clone(),
            username: self.etcd_username.clone(),
            password: self.etcd_password.clone(),
            password_file: self.etcd_password_file.clone(),
            ca: self.etcd_ca.clone(),
            cert: self.etcd_cert.clone(),
            key: self.etcd_key.clone(),
            timeout,
            staleness: Duration::from_secs(self.etcd_staleness_secs),
            retention,
            bounds,
        }
    }
}

/// A regular expression for decimal numbers in `1..=max` without leading
/// zeros: for schemas that hold numbers too large for JSON (and Helm's
/// float64 values) as strings.
pub fn decimal_at_most_pattern(max: u64) -> String {
    let digits: Vec<u32> = max
        .to_string()
        .chars()
        .map(|c| c.to_digit(10).expect("a digit"))
        .collect();
    let n = digits.len();
    let mut alternatives = Vec::new();
    if n > 1 {
        alternatives.push(format!("[1-9][0-9]{{0,{}}}", n - 2));
    }
    // n digits, equal to `max` up to position i, lower at i, anything after.
    for i in 0..n {
        let low = if i == 0 { 1 } else { 0 };
        if digits[i] > low {
            let prefix: String = digits[..i].iter().map(|d| d.to_string()).collect();
            let below = format!("[{low}-{}]", digits[i] - 1);
            let rest = if n - i - 1 > 0 {
                format!("[0-9]{{{}}}", n - i - 1)
            } else {
                String::new()
            };
            alternatives.push(format!("{prefix}{below}{rest}"));
        }
    }
    alternatives.push(max.to_string());
    format!("^({})$", alternatives.join("|"))
}

/// The JSON `config-schema` prints: every numeric bound, and the patterns.
pub fn schema_json() -> serde_json::Value {
    let bounds: serde_json::Map<String, serde_json::Value> = BOUNDS
        .iter()
        .map(|(flag, min, max)| {
            (
                (*flag).to_owned(),
                serde_json::json!({ "minimum": min, "maximum": max }),
            )
        })
        .collect();
    serde_json::json!({
        "bounds": bounds,
        "duration_pattern": DURATION_PATTERN,
        "room_pattern": decimal_at_most_pattern(MAX_ROOM),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_and_reject_nonsense() {
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
        assert_eq!(
            parse_duration("999999d").map(|d| d.as_secs()),
            Ok(86_399_913_600)
        );
        for bad in [
            "0s",
            "0",
            "5 parsecs",
            "h",
            "",
            "1000000s",
            "01s",
            " 1s",
            "1s ",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_room_pattern_accepts_exactly_one_to_the_maximum() {
        let pattern = decimal_at_most_pattern(MAX_ROOM);
        let matches = |s: &str| {
            // A tiny matcher for the pattern's shape is overkill; compare
            // with the numeric truth on edge cases via the alternatives.
            let body = pattern.trim_start_matches("^(").trim_end_matches(")$");
            body.split('|')
                .any(|alternative| matches_simple(alternative, s))
        };
        for ok in [
            "1",
            "9",
            "10",
            "9223372036854775807",
            "9223372036854775799",
            "999999999999999999",
            "1000000000000000000",
        ] {
            assert!(matches(ok), "{ok} {pattern}");
        }
        for bad in [
            "0",
            "01",
            "9223372036854775808",
            "9300000000000000000",
            "10000000000000000000",
            "",
        ] {
            assert!(!matches(bad), "{bad} {pattern}");
        }
    }

    /// Matches the pattern's alternatives: literal digits, `[a-b]`, and
    /// `[0-9]{n}` / `[0-9]{0,n}`.
    fn matches_simple(alternative: &str, text: &str) -> bool {
        let mut rest = text.as_bytes();
        let mut pattern = alternative.as_bytes();
        while !pattern.is_empty() {
            if pattern[0] == b'[' {
                let (lo, hi) = (pattern[1], pattern[3]);
                pattern = &pattern[5..];
                let (min, max) = if pattern.first() == Some(&b'{') {
                    let close = pattern.iter().position(|b| *b == b'}').expect("}");
                    let inner = std::str::from_utf8(&pattern[1..close]).expect("utf8");
                    pattern = &pattern[close + 1..];
                    match inner.split_once(',') {
                        Some((a, b)) => (a.parse().expect("n"), b.parse().expect("n")),
                        None => (inner.parse().expect("n"), inner.parse().expect("n")),
                    }
                } else {
                    (1, 1)
                };
                let mut taken = 0;
                while taken < max && rest.first().is_some_and(|c| (lo..=hi).contains(c)) {
                    rest = &rest[1..];
                    taken += 1;
                }
                if taken < min {
                    return false;
                }
            } else {
                if rest.first() != Some(&pattern[0]) {
                    return false;
                }
                rest = &rest[1..];
                pattern = &pattern[1..];
            }
        }
        rest.is_empty()
    }
}
