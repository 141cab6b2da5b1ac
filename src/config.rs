//! Command-line flags. Every flag can also come from the environment as
//! `ROOM_ALLOCATOR_<FLAG>`, which is how the Helm chart configures the server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::space::MAX_ROOM;

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
    /// Tell which worker, rank and dp_size a room belongs to.
    Resolve(ResolveArgs),
    /// List registered workers; one JSON line per worker.
    Workers(ClientArgs),
    /// Ask grpc.health.v1 whether the server (or one service) is serving;
    /// exits 0 only if it is.
    Health(HealthArgs),
    /// Load a server in a closed loop and report rooms/s, latency and a check
    /// of every room (see BENCHMARKS.md).
    Bench(Box<crate::bench::BenchArgs>),
    /// Move an embedded store's high-water mark, ranges and registrations
    /// into etcd, so that no room issued before can be issued again.
    Migrate(Box<MigrateArgs>),
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

    /// Highest room this server may hand out; lower it to split the space
    /// between deployments that must never collide.
    #[arg(long, env = "ROOM_ALLOCATOR_MAX_ROOM", default_value_t = MAX_ROOM,
          value_parser = clap::value_parser!(u64).range(1..=MAX_ROOM))]
    pub max_room: u64,

    /// Most workers the server keeps (registered or deregistered); bounds memory.
    #[arg(long, env = "ROOM_ALLOCATOR_MAX_WORKERS", default_value_t = 100_000)]
    pub max_workers: usize,

    /// On SIGTERM/SIGINT, how long health reports NOT_SERVING while calls are
    /// still served, so load balancers stop sending new ones first.
    #[arg(long, env = "ROOM_ALLOCATOR_DRAIN_DELAY_SECS", default_value_t = 0)]
    pub drain_delay_secs: u64,

    /// After the drain delay, how long in-flight calls may take before the server exits anyway.
    #[arg(long, env = "ROOM_ALLOCATOR_DRAIN_TIMEOUT_SECS", default_value_t = 20)]
    pub drain_timeout_secs: u64,

    /// Server certificate chain (PEM) for TLS on the gRPC port (with --tls-key).
    /// Read at start; rotate by restarting (a rolling restart in etcd mode).
    #[arg(long, env = "ROOM_ALLOCATOR_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// Server private key (PEM: PKCS#8, PKCS#1 RSA or SEC1 EC, e.g. P-256).
    #[arg(long, env = "ROOM_ALLOCATOR_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// CA (PEM) whose client certificates are required (mutual TLS).
    #[arg(long, env = "ROOM_ALLOCATOR_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// File holding a bearer token that RegisterWorker and DeregisterWorker
    /// require (`authorization: Bearer <token>`).
    #[arg(long, env = "ROOM_ALLOCATOR_AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<PathBuf>,

    /// Require the token for every call, allocation and resolve included.
    #[arg(
        long,
        env = "ROOM_ALLOCATOR_AUTH_REQUIRED_FOR_ALLOCATION",
        requires = "auth_token_file"
    )]
    pub auth_required_for_allocation: bool,

    /// Per-call deadline; calls still running then are cancelled.
    #[arg(long, env = "ROOM_ALLOCATOR_REQUEST_TIMEOUT_SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=300))]
    pub request_timeout_secs: u64,

    /// Calls in flight at most; more are refused at once with
    /// RESOURCE_EXHAUSTED instead of queueing without bound.
    #[arg(long, env = "ROOM_ALLOCATOR_MAX_CONCURRENT_REQUESTS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_concurrent_requests: u64,

    /// Check the flags and exit: for deployment pipelines.
    #[arg(long)]
    pub check_config: bool,

    /// Bound on every store operation (fsync, etcd call); past it calls get UNAVAILABLE.
    #[arg(long, env = "ROOM_ALLOCATOR_STORE_TIMEOUT_SECS", default_value_t = 3,
          value_parser = clap::value_parser!(u64).range(1..=60))]
    pub store_timeout_secs: u64,

    /// How long every issued room stays resolvable (e.g. 24h, 90m, 3600s).
    /// Rooms come from a range for at most this long after it is reserved,
    /// and ranges are pruned once twice this old. Keep it above any SGLang
    /// bootstrap timeout.
    #[arg(long, env = "ROOM_ALLOCATOR_RETENTION", default_value = "24h", value_parser = parse_duration)]
    pub retention: Duration,

    #[command(flatten)]
    pub etcd: EtcdArgs,

    /// Tokio worker threads; default: one per core.
    #[arg(long, env = "ROOM_ALLOCATOR_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
}

#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// The allocator's URL.
    #[arg(
        long,
        env = "ROOM_ALLOCATOR_SERVER",
        default_value = "http://127.0.0.1:50051"
    )]
    pub server: String,

    /// Deadline for each call, in seconds.
    #[arg(long, env = "ROOM_ALLOCATOR_TIMEOUT_SECS", default_value_t = 10)]
    pub timeout_secs: u64,

    /// CA (PEM) to verify an https:// server.
    #[arg(long, env = "ROOM_ALLOCATOR_TLS_CA")]
    pub tls_ca: Option<PathBuf>,

    /// Bearer token to send (for servers run with --auth-token-file).
    #[arg(long, env = "ROOM_ALLOCATOR_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct HealthArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The service to ask about; empty asks about the whole server.
    #[arg(long, default_value = "")]
    pub service: String,
}

#[derive(Debug, Clone, Args)]
pub struct RegisterArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The prefill worker's name.
    #[arg(long)]
    pub worker: String,
    /// The prefill worker's data-parallel size.
    #[arg(long)]
    pub dp_size: u32,
}

#[derive(Debug, Clone, Args)]
pub struct AllocateArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The prefill worker's name.
    #[arg(long)]
    pub worker: String,
    /// The prefill rank the room is for.
    #[arg(long)]
    pub rank: u32,
    /// The dp_size the caller expects; registers an unknown worker. 0 = as registered.
    #[arg(long, default_value_t = 0)]
    pub dp_size: u32,
    /// How many rooms to allocate.
    #[arg(long, default_value_t = 1)]
    pub count: u64,
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

    /// etcd user name (with --etcd-password).
    #[arg(long, env = "ROOM_ALLOCATOR_ETCD_USERNAME", requires = "etcd_password")]
    pub etcd_username: Option<String>,

    /// etcd password; prefer the environment variable over the flag.
    #[arg(
        long,
        env = "ROOM_ALLOCATOR_ETCD_PASSWORD",
        hide_env_values = true,
        requires = "etcd_username"
    )]
    pub etcd_password: Option<String>,

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
          value_parser = clap::value_parser!(u64).range(2..=3600))]
    pub etcd_staleness_secs: u64,
}

/// Parses `90s`, `15m`, `24h`, `7d` (or plain seconds); at least one second.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration; use e.g. 90s, 15m, 24h or 7d"))?;
    let seconds_per_unit = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => {
            return Err(format!(
                "unknown unit {unit:?} in {text:?}; use s, m, h or d"
            ))
        }
    };
    let seconds = number
        .checked_mul(seconds_per_unit)
        .filter(|s| *s >= 1)
        .ok_or_else(|| format!("{text:?} is out of range; use 1s or more"))?;
    Ok(Duration::from_secs(seconds))
}

impl EtcdArgs {
    /// The etcd store's settings, with `timeout` bounding each call.
    pub fn store_config(&self, timeout: Duration) -> crate::store::EtcdConfig {
        crate::store::EtcdConfig {
            endpoints: self.etcd_endpoints.clone(),
            prefix: self.etcd_prefix.clone(),
            username: self.etcd_username.clone(),
            password: self.etcd_password.clone(),
            ca: self.etcd_ca.clone(),
            cert: self.etcd_cert.clone(),
            key: self.etcd_key.clone(),
            timeout,
            staleness: Duration::from_secs(self.etcd_staleness_secs),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_and_reject_nonsense() {
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("h").is_err());
    }
}
