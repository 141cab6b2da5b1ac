//! `RoomClient`, its builder, and the types its calls return.

use std::collections::HashMap;
use std::future::Future;
use std::hash::{BuildHasherDefault, Hasher};
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};
use tracing::debug;

use crate::error::{cause_chain, Error};
use crate::fallback::{Draws, Region};
use crate::fork;
use crate::lease::{Block, LeaseState};
use crate::limits::{MAX_LEASE_COUNT, MAX_LEASE_NUMBERS};
use crate::pb;
use crate::pb::room_allocator_service_client::RoomAllocatorServiceClient;

/// First lease size; doubles while leases run out within [`FAST_LEASE`].
const INITIAL_LEASE: u32 = 256;
/// A lease used up faster than this means the next one should be larger.
const FAST_LEASE: Duration = Duration::from_secs(1);
/// Default bound on a lease's life: a realignment made by another router
/// reaches this one within it even if no refill happens meanwhile. Matches
/// the server's default `--etcd-staleness-secs`.
const DEFAULT_MAX_LEASE_AGE: Duration = Duration::from_secs(10);
/// Default per-call deadline: the server's default `--request-timeout-secs`.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Connection attempts back off from this...
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
/// ...to at most this.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Workers per ListWorkers page when `workers()` pages through them all.
const WORKERS_PAGE_SIZE: i32 = 1000;
/// With several endpoints, one that cannot be reached is skipped for this
/// long, doubling while it keeps failing...
const FIRST_ENDPOINT_PAUSE: Duration = Duration::from_millis(500);
/// ...up to this; then one call tries it again.
const MAX_ENDPOINT_PAUSE: Duration = Duration::from_secs(30);
/// Default bound on getting a room from the allocator before an outage
/// fallback room is used: a leased room costs microseconds and a lease a
/// round trip of about a millisecond in one data centre, so tens of
/// milliseconds mean the allocator is not answering, while a router's
/// request (its prefill alone) takes far longer than the wait.
const DEFAULT_ALLOCATION_DEADLINE: Duration = Duration::from_millis(50);

/// A worker as the server has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerInfo {
    pub prefill_worker: String,
    pub dp_size: u32,
    /// Rooms from AllocateRoom plus bases from LeaseRooms issued for it.
    pub rooms_issued: u64,
}

/// Who a room was issued for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub prefill_worker: String,
    /// `room % dp_size`: the prefill rank SGLang's decode side pulls from.
    pub dp_rank: u32,
    /// The dp_size in force when the room was issued.
    pub dp_size: u32,
}

/// The part of the room space a server hands out (GetRoomSpace): its
/// `--min-room` and `--max-room`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoomSpace {
    pub min_room: u64,
    pub max_room: u64,
}

/// What the outage fallback callback is told about each fallback room (or
/// block, or batch item): see [`RoomClientBuilder::outage_fallback`].
#[derive(Debug)]
pub struct FallbackRoom<'a> {
    pub prefill_worker: &'a str,
    /// The rank of the room (of the block's first room).
    pub dp_rank: u32,
    pub dp_size: u32,
    pub room: u64,
    /// Consecutive numbers the room starts: 1, or `num` of `allocate_block`.
    pub num: u64,
    /// Why the allocator gave no room: unreachable, UNAVAILABLE, or no
    /// answer within the allocation deadline.
    pub cause: &'a Error,
}

/// Called for every fallback room; must be cheap and must not block.
type FallbackCallback = Arc<dyn Fn(&FallbackRoom<'_>) + Send + Sync>;

/// The outage fallback of a client that has one.
struct Fallback {
    region: Region,
    deadline: Duration,
    on_fallback: Option<FallbackCallback>,
    draws: Draws,
    /// Fallback rooms handed out (a block or a batch item counts one).
    rooms: AtomicU64,
}

/// Whether an error means the allocator could not be reached or could not
/// reserve: the only failures the outage fallback stands in for. A refusal
/// (a stale dp_size, a deregistered worker, a full space) is returned.
fn is_outage(error: &Error) -> bool {
    match error {
        Error::Connect { .. } => true,
        Error::Status(status) => matches!(
            status.code(),
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled
        ),
        _ => false,
    }
}

/// A raw block of bases from LeaseRooms: `first_base + i * dp_size` for `i <
/// count`; the room for rank `r` is `base + r`. Use each base once, within
/// `valid_for`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub first_base: u64,
    pub count: u32,
    pub dp_size: u32,
    pub valid_for: Duration,
}

impl From<pb::WorkerInfo> for WorkerInfo {
    fn from(info: pb::WorkerInfo) -> Self {
        Self {
            prefill_worker: info.prefill_worker,
            dp_size: info.dp_size,
            rooms_issued: info.rooms_issued,
        }
    }
}

/// FNV-1a: worker names are short, and the hot path hashes one per room;
/// SipHash would be a third of its cost.
#[derive(Default)]
struct Fnv(u64);

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut hash = if self.0 == 0 {
            0xcbf2_9ce4_8422_2325
        } else {
            self.0
        };
        for byte in bytes {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.0 = hash;
    }
}

type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<Fnv>>;

/// Adds the bearer token and the deadline to every call.
#[derive(Clone)]
struct CallOptions {
    token: Option<MetadataValue<Ascii>>,
    timeout: Duration,
}

impl Interceptor for CallOptions {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(token) = &self.token {
            request
                .metadata_mut()
                .insert("authorization", token.clone());
        }
        // The server ends the call at this deadline too (grpc-timeout).
        request.set_timeout(self.timeout);
        Ok(request)
    }
}

type Rpc = RoomAllocatorServiceClient<InterceptedService<Channel, CallOptions>>;

/// Builds a [`RoomClient`] with options; see the crate docs.
#[derive(Clone)]
pub struct RoomClientBuilder {
    endpoints: Vec<String>,
    token: Option<String>,
    ca_pem: Option<Vec<u8>>,
    identity_pem: Option<(Vec<u8>, Vec<u8>)>,
    domain_name: Option<String>,
    timeout: Duration,
    connect_timeout: Duration,
    keep_alive: Option<(Duration, Duration)>,
    patience: Duration,
    max_lease_age: Duration,
    fallback_region: Option<RangeInclusive<u64>>,
    allocation_deadline: Duration,
    on_fallback: Option<FallbackCallback>,
}

impl RoomClientBuilder {
    fn new(endpoints: Vec<String>) -> Self {
        Self {
            endpoints,
            token: None,
            ca_pem: None,
            identity_pem: None,
            domain_name: None,
            timeout: DEFAULT_TIMEOUT,
            connect_timeout: Duration::from_secs(5),
            keep_alive: None,
            patience: Duration::from_secs(30),
            max_lease_age: DEFAULT_MAX_LEASE_AGE,
            fallback_region: None,
            allocation_deadline: DEFAULT_ALLOCATION_DEADLINE,
            on_fallback: None,
        }
    }

    /// Sends `authorization: Bearer <token>` on every call (for servers run
    /// with `--auth-token-file`); over plaintext too, as the server accepts it.
    pub fn bearer_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Verifies the server's certificate against this CA (PEM). Endpoints
    /// given as `host:port` then mean `https://host:port`.
    pub fn ca_certificate_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.ca_pem = Some(pem.into());
        self
    }

    /// Presents this certificate chain and key (PEM) for mutual TLS.
    pub fn client_identity_pem(
        mut self,
        cert_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
    ) -> Self {
        self.identity_pem = Some((cert_pem.into(), key_pem.into()));
        self
    }

    /// The name to verify the server's certificate against, when it is not
    /// the endpoint's host (e.g. connecting by IP).
    pub fn tls_domain_name(mut self, name: impl Into<String>) -> Self {
        self.domain_name = Some(name.into());
        self
    }

    /// Deadline of each call (default 10 s); the server stops working on a
    /// call past it too.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Bound on establishing each connection (default 5 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// HTTP/2 keep-alive: a ping every `interval`, and the connection is
    /// dropped (and redialled) if no answer comes within `timeout`. Off by
    /// default.
    pub fn keep_alive(mut self, interval: Duration, timeout: Duration) -> Self {
        self.keep_alive = Some((interval, timeout));
        self
    }

    /// How long `connect` keeps retrying (with backoff) until an endpoint
    /// answers (default 30 s).
    pub fn connect_patience(mut self, patience: Duration) -> Self {
        self.patience = patience;
        self
    }

    /// Longest a leased base is kept before it is dropped unused (default
    /// 10 s; the server's own bound on the lease, `valid_for_ms`, applies
    /// too). A realignment made by another router reaches this client within
    /// this time even when nothing triggers a refill. Expiry runs on a timer
    /// of the client's runtime, so the hot path reads no clock (a read costs
    /// about as much as a whole `try_allocate`): while that runtime is
    /// blocked or shut down and `try_allocate` is called from other threads,
    /// expired bases are used late by as long (still unique and aligned).
    pub fn max_lease_age(mut self, age: Duration) -> Self {
        self.max_lease_age = age;
        self
    }

    /// Opts in to the outage fallback: when no leased room is left and the
    /// allocator gives none within the [allocation
    /// deadline](Self::allocation_deadline) (it cannot be reached, answers
    /// UNAVAILABLE, or is too slow), `allocate`, `allocate_many` and
    /// `allocate_block` return a rank-aligned random room from `region`
    /// instead of failing. Refusals (a stale dp_size, a deregistered worker,
    /// RESOURCE_EXHAUSTED for a full space or an overloaded server) are
    /// still returned: the allocator answered.
    ///
    /// `region` must miss every room the allocator hands out: `connect`
    /// reads the server's bounds (GetRoomSpace, from the first replica that
    /// answers) and refuses an overlapping region with [`Error::Config`].
    /// It is checked once: every replica of the room space must run with
    /// those bounds for as long as the client lives (a replica restarted
    /// with a `--max-room` reaching into the region, or another replica of
    /// the prefix with other bounds, voids the check; restart the clients
    /// after changing bounds). The default bounds (`1..=2^63-1`)
    /// leave no region, so the operator leaves one, e.g. the server with
    /// `--max-room 4611686018427387903` and the region `2^62..=2^63-1`.
    /// Fallback rooms can only collide with other fallback rooms; the odds
    /// are in the crate docs. They are counted
    /// ([`RoomClient::fallback_rooms`]) and reported to
    /// [`on_fallback`](Self::on_fallback); ResolveRank does not know them.
    pub fn outage_fallback(mut self, region: RangeInclusive<u64>) -> Self {
        self.fallback_region = Some(region);
        self
    }

    /// With an [outage fallback](Self::outage_fallback), longest an
    /// allocation waits for the allocator when no leased room is left
    /// (default 50 ms) before it uses a fallback room; separate from the
    /// per-call [`timeout`](Self::timeout). A lease that arrives later still
    /// serves later calls.
    pub fn allocation_deadline(mut self, deadline: Duration) -> Self {
        self.allocation_deadline = deadline;
        self
    }

    /// Called once for every fallback room, e.g. to count it in the
    /// router's metrics or log it; must be cheap and must not block.
    pub fn on_fallback(
        mut self,
        callback: impl Fn(&FallbackRoom<'_>) + Send + Sync + 'static,
    ) -> Self {
        self.on_fallback = Some(Arc::new(callback));
        self
    }

    fn has_tls(&self) -> bool {
        self.ca_pem.is_some() || self.identity_pem.is_some()
    }

    /// `host:port` means http (https when a CA or identity is set).
    fn url(&self, endpoint: &str) -> String {
        if endpoint.contains("://") {
            endpoint.to_owned()
        } else if self.has_tls() {
            format!("https://{endpoint}")
        } else {
            format!("http://{endpoint}")
        }
    }

    fn endpoint(&self, url: &str) -> Result<Endpoint, Error> {
        let mut endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(|error| {
                Error::Config(format!(
                    "{url:?} is not a URL ({error}); use e.g. http://127.0.0.1:50051 or 127.0.0.1:50051"
                ))
            })?
            .connect_timeout(self.connect_timeout)
            .timeout(self.timeout)
            .tcp_nodelay(true);
        if let Some((interval, timeout)) = self.keep_alive {
            endpoint = endpoint
                .http2_keep_alive_interval(interval)
                .keep_alive_timeout(timeout)
                .keep_alive_while_idle(true);
        }
        if url.starts_with("https://") {
            endpoint = self.with_tls(endpoint)?;
        }
        Ok(endpoint)
    }

    #[cfg(feature = "tls")]
    fn with_tls(&self, endpoint: Endpoint) -> Result<Endpoint, Error> {
        use tonic::transport::{Certificate, ClientTlsConfig, Identity};
        let mut tls = ClientTlsConfig::new();
        #[cfg(feature = "tls-native-roots")]
        {
            tls = tls.with_native_roots();
        }
        if let Some(ca) = &self.ca_pem {
            tls = tls.ca_certificate(Certificate::from_pem(ca));
        }
        if let Some((cert, key)) = &self.identity_pem {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        if let Some(name) = &self.domain_name {
            tls = tls.domain_name(name.clone());
        }
        endpoint
            .tls_config(tls)
            .map_err(|error| Error::Config(format!("bad TLS settings: {}", cause_chain(&error))))
    }

    #[cfg(not(feature = "tls"))]
    fn with_tls(&self, _endpoint: Endpoint) -> Result<Endpoint, Error> {
        Err(Error::Config(
            "https:// needs the `tls` feature of room-allocator-client".into(),
        ))
    }

    /// Connects: retries with backoff until one endpoint answers or the
    /// patience runs out; the error names the underlying cause (connection
    /// refused, DNS, a peer that does not speak HTTP/2). With several
    /// endpoints, calls are spread over the reachable ones and fail over.
    pub async fn connect(self) -> Result<RoomClient, Error> {
        if self.endpoints.is_empty() {
            return Err(Error::Config("no endpoint given".into()));
        }
        let region = match &self.fallback_region {
            Some(region) => Some(Region::try_new(region).map_err(Error::Config)?),
            None => None,
        };
        let token = match &self.token {
            Some(token) => Some(
                format!("Bearer {}", token.trim())
                    .parse::<MetadataValue<Ascii>>()
                    .map_err(|_| {
                        Error::Config("the bearer token must be printable ASCII".into())
                    })?,
            ),
            None => None,
        };
        let urls: Vec<String> = self.endpoints.iter().map(|e| self.url(e)).collect();
        let endpoints = urls
            .iter()
            .map(|url| self.endpoint(url))
            .collect::<Result<Vec<_>, _>>()?;
        let deadline = Instant::now() + self.patience;
        let mut backoff = FIRST_BACKOFF;
        // Endpoints are tried in order: those before the one that answered
        // failed this round.
        let (answered, channel) = 'connected: loop {
            let mut failure = None;
            for (i, (url, endpoint)) in urls.iter().zip(&endpoints).enumerate() {
                match endpoint.connect().await {
                    Ok(channel) => break 'connected (i, channel),
                    Err(error) => {
                        failure = Some((url.clone(), explain(&error, &self.context(url))));
                    }
                }
            }
            let (url, reason) = failure.expect("at least one endpoint was tried");
            if Instant::now() + backoff > deadline {
                return Err(Error::Connect { url, reason });
            }
            debug!(%url, %reason, ?backoff, "connect failed; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        };
        let options = CallOptions {
            token,
            timeout: self.timeout,
        };
        // One answered. The others connect at their first call, and calls
        // fail over among all of them (see `RoomClient::call`).
        let epoch = Instant::now();
        let mut channel = Some(channel);
        let targets = urls
            .iter()
            .zip(&endpoints)
            .enumerate()
            .map(|(i, (url, endpoint))| {
                let channel = if i == answered {
                    channel.take().expect("one channel answered")
                } else {
                    endpoint.connect_lazy()
                };
                let target = Target::new(self.context(url), channel, options.clone());
                if i < answered {
                    target.failed(epoch);
                }
                target
            })
            .collect();
        let fallback = region.map(|region| Fallback {
            region,
            deadline: self.allocation_deadline,
            on_fallback: self.on_fallback.clone(),
            draws: Draws::new(),
            rooms: AtomicU64::new(0),
        });
        let client = RoomClient::new(targets, epoch, self.timeout, self.max_lease_age, fallback);
        if let Some(fallback) = &client.inner.fallback {
            // Checked once, at connect: a server's bounds are fixed while it
            // runs, and the docs above require every replica of the room
            // space to share them while the client lives.
            let space = client.room_space().await?;
            fallback
                .region
                .check_disjoint(space.min_room, space.max_room)
                .map_err(Error::Config)?;
        }
        Ok(client)
    }

    fn context(&self, url: &str) -> Context {
        Context {
            url: url.to_owned(),
            tls: url.starts_with("https://"),
            identity: self.identity_pem.is_some(),
        }
    }
}

/// What a transport failure's explanation depends on.
#[derive(Debug, Clone)]
struct Context {
    url: String,
    tls: bool,
    identity: bool,
}

/// One endpoint: its calls, and whether calls skip it for now.
struct Target {
    context: Context,
    rpc: Rpc,
    /// Skipped until this many ms past `Inner::epoch` (0: not skipped).
    paused_until_ms: AtomicU64,
    /// Transport failures in a row.
    failures: AtomicU32,
}

impl Target {
    fn new(context: Context, channel: Channel, options: CallOptions) -> Self {
        Self {
            context,
            rpc: RoomAllocatorServiceClient::with_interceptor(channel, options),
            paused_until_ms: AtomicU64::new(0),
            failures: AtomicU32::new(0),
        }
    }

    fn answered(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
            self.paused_until_ms.store(0, Ordering::Relaxed);
        }
    }

    /// Could not be reached: skip it for a while, longer each time in a row.
    fn failed(&self, epoch: Instant) {
        let failures = self.failures.fetch_add(1, Ordering::Relaxed).min(16);
        let pause = FIRST_ENDPOINT_PAUSE
            .saturating_mul(1 << failures)
            .min(MAX_ENDPOINT_PAUSE);
        let until = epoch.elapsed().saturating_add(pause);
        self.paused_until_ms.store(
            u64::try_from(until.as_millis()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }
}

/// Whether a call failed here (transport, deadline) rather than at the
/// server: only a local failure carries a source error; the server's
/// statuses come decoded from the response.
fn failed_locally(status: &Status) -> bool {
    std::error::Error::source(status).is_some()
}

/// A local failure as a status that says what happened and where, with a
/// hint: a deadline is DEADLINE_EXCEEDED (tonic says CANCELLED), a failed
/// connection UNAVAILABLE (tonic often says UNKNOWN), as gRPC specifies.
fn explain_status(status: &Status, context: &Context, timeout: Duration) -> Status {
    let mut cause = std::error::Error::source(status);
    let mut chain = String::new();
    while let Some(error) = cause {
        if error.downcast_ref::<tonic::TimeoutExpired>().is_some() {
            return Status::deadline_exceeded(format!(
                "{}: no answer within the client's deadline of {timeout:?}; the server may be overloaded or stuck",
                context.url
            ));
        }
        cause = error.source();
    }
    if let Some(source) = std::error::Error::source(status) {
        chain = cause_chain(source);
    }
    if !chain.starts_with(status.message()) {
        chain = format!("{}: {chain}", status.message());
    }
    let code = match status.code() {
        Code::Unknown => Code::Unavailable,
        code => code,
    };
    let hint = hint(&chain, context);
    Status::new(code, format!("{}: {chain}{hint}", context.url))
}

/// A transport error's real cause, with a hint for the usual mistakes.
fn explain(error: &tonic::transport::Error, context: &Context) -> String {
    let chain = cause_chain(error);
    let hint = hint(&chain, context);
    format!("{chain}{hint}")
}

/// What a transport error's cause chain most likely means, for the usual
/// mistakes: a wrong port, a name that does not resolve, a peer that is not
/// a gRPC server, TLS on one side only, a missing client certificate.
fn hint(chain: &str, context: &Context) -> &'static str {
    let chain = chain.to_ascii_lowercase();
    let has = |needle: &str| chain.contains(needle);
    if has("connection refused") {
        "; nothing listens there: is `room-allocator serve` running, on that port?"
    } else if has("dns error") || has("failed to lookup address") {
        "; the host name does not resolve (DNS lookup failed)"
    } else if has("certificaterequired") || has("certificate required") {
        "; the server requires a client certificate (mutual TLS): give one (--tls-cert and --tls-key, or client_identity_pem)"
    } else if has("keep-alive") || has("keep alive") {
        "; the server stopped answering HTTP/2 keep-alive pings: is it stuck or unreachable?"
    } else if has("frame with invalid size")
        || has("http2 error")
        || has("http/1")
        || has("invalid http version")
    {
        if context.tls {
            "; the peer does not speak gRPC (HTTP/2) over TLS: is it the right port?"
        } else {
            "; the peer does not speak gRPC (HTTP/2): is it the metrics port, or a TLS port reached with http:// (then give the CA, --tls-ca)?"
        }
    } else if has("certificate") || has("unknownissuer") || has("notvalidforname") {
        "; TLS failed: check the CA (--tls-ca) and the server name (--tls-server-name)"
    } else if has("broken pipe")
        || has("connection reset")
        || has("connection closed")
        || has("unexpected eof")
    {
        match (context.tls, context.identity) {
            (true, false) => "; the server closed the connection after the TLS handshake: it probably requires a client certificate (mutual TLS); give one (--tls-cert and --tls-key, or client_identity_pem)",
            (true, true) => "; the server closed the connection: it may have refused the client certificate (TLS), or stopped",
            (false, _) => "; the peer closed the connection: a peer that does not speak gRPC (HTTP/2) does that (the metrics port? a TLS port reached with http://?), and so does a server that stopped",
        }
    } else {
        ""
    }
}

/// A cheap-to-clone, thread-safe handle; clones share connections and leases.
/// Not usable across `fork()`: a forked child builds its own (see the crate
/// docs, "Processes that fork").
#[derive(Clone)]
pub struct RoomClient {
    inner: Arc<Inner>,
}

struct Inner {
    /// One per endpoint; calls fail over among them.
    targets: Vec<Target>,
    /// Where the next call starts, so calls spread over the endpoints.
    next: AtomicUsize,
    /// Time origin of `Target::paused_until_ms`.
    epoch: Instant,
    /// Each call's deadline, for messages.
    timeout: Duration,
    workers: RwLock<FastMap<Box<str>, Arc<WorkerLease>>>,
    /// Where refills and lease expiry run, so `try_allocate` works from any thread.
    runtime: Option<tokio::runtime::Handle>,
    max_lease_age: Duration,
    /// The fork generation of the process that made the client: a copy in a
    /// forked child refuses to work (see `fork.rs`).
    fork_generation: u64,
    fallback: Option<Fallback>,
}

struct WorkerLease {
    name: Box<str>,
    state: Mutex<LeaseState>,
    /// A background refill is running.
    refilling: AtomicBool,
    /// One lease in flight per worker: concurrent callers wait for it rather
    /// than leasing a block each.
    refill: tokio::sync::Mutex<()>,
}

impl WorkerLease {
    fn lock(&self) -> std::sync::MutexGuard<'_, LeaseState> {
        self.state
            .lock()
            .expect("lease lock is never poisoned: nothing panics while holding it")
    }
}

impl RoomClient {
    /// Connects to `url` (`http://host:port`, `https://...`, or `host:port`),
    /// retrying with backoff for up to 30 s.
    pub async fn connect(url: impl AsRef<str>) -> Result<Self, Error> {
        Self::builder([url.as_ref()]).connect().await
    }

    /// A builder for several endpoints, a token, TLS, deadlines and keep-alive.
    pub fn builder<I, S>(endpoints: I) -> RoomClientBuilder
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        RoomClientBuilder::new(
            endpoints
                .into_iter()
                .map(|e| e.as_ref().to_owned())
                .collect(),
        )
    }

    /// Uses an existing channel (no token, default deadline). Called inside a
    /// tokio runtime, refills run there; otherwise in whatever runtime calls
    /// [`allocate`](Self::allocate).
    pub fn from_channel(channel: Channel) -> Self {
        let options = CallOptions {
            token: None,
            timeout: DEFAULT_TIMEOUT,
        };
        let context = Context {
            url: "the channel".into(),
            tls: false,
            identity: false,
        };
        Self::new(
            vec![Target::new(context, channel, options)],
            Instant::now(),
            DEFAULT_TIMEOUT,
            DEFAULT_MAX_LEASE_AGE,
            None,
        )
    }

    fn new(
        targets: Vec<Target>,
        epoch: Instant,
        timeout: Duration,
        max_lease_age: Duration,
        fallback: Option<Fallback>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                targets,
                next: AtomicUsize::new(0),
                epoch,
                timeout,
                workers: RwLock::new(FastMap::default()),
                runtime: tokio::runtime::Handle::try_current().ok(),
                max_lease_age,
                fork_generation: fork::register_and_get(),
                fallback,
            }),
        }
    }

    /// Sends one call. With several endpoints, calls start at each in turn;
    /// one that cannot be reached (connection refused or broken, deadline)
    /// or answers UNAVAILABLE (a replica cut off from etcd) is skipped for a
    /// while and the call goes to the next, so a dead replica costs at most
    /// one failed attempt per pause. Any other status the server sent is
    /// returned as it is: another replica would say the same.
    async fn call<Q, R, F, Fut>(&self, request: Q, send: F) -> Result<R, Status>
    where
        Q: Clone,
        F: Fn(Rpc, Q) -> Fut,
        Fut: Future<Output = Result<tonic::Response<R>, Status>>,
    {
        self.check_same_process()?;
        let inner = &*self.inner;
        let targets = &inner.targets;
        let count = targets.len();
        let start = if count == 1 {
            0
        } else {
            inner.next.fetch_add(1, Ordering::Relaxed) % count
        };
        let now_ms = u64::try_from(inner.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        let skipped = |i: &usize| targets[*i].paused_until_ms.load(Ordering::Relaxed) > now_ms;
        // Endpoints not skipped first; skipped ones only if those fail too.
        let order = (0..count).map(|i| (start + i) % count);
        let order = order
            .clone()
            .filter(|i| !skipped(i))
            .chain(order.filter(skipped));
        let mut failure = None;
        for i in order {
            let target = &targets[i];
            match send(target.rpc.clone(), request.clone()).await {
                Ok(response) => {
                    target.answered();
                    return Ok(response.into_inner());
                }
                Err(status) => {
                    let local = failed_locally(&status);
                    if !local && status.code() != Code::Unavailable {
                        target.answered();
                        return Err(status);
                    }
                    let status = if local {
                        explain_status(&status, &target.context, inner.timeout)
                    } else {
                        status
                    };
                    if count > 1 {
                        debug!(url = %target.context.url, %status, "endpoint failed; trying the next");
                        target.failed(inner.epoch);
                    }
                    failure = Some(status);
                }
            }
        }
        Err(failure.expect("every client has an endpoint"))
    }

    /// Registers (or realigns) a prefill worker; an admin call when the
    /// server has a token.
    pub async fn register(&self, prefill_worker: &str, dp_size: u32) -> Result<WorkerInfo, Error> {
        let request = pb::RegisterWorkerRequest {
            prefill_worker: prefill_worker.to_owned(),
            dp_size,
        };
        let response = self
            .call(request, |mut rpc, request| async move {
                rpc.register_worker(request).await
            })
            .await
            .map_err(|status| Error::from_status(prefill_worker, dp_size, status))?;
        if let Some(worker) = self.lease_of(prefill_worker) {
            let mut state = worker.lock();
            if state.dp_size != dp_size {
                state.drop_leases();
            }
        }
        response
            .worker
            .map(WorkerInfo::from)
            .ok_or_else(|| Error::Status(Status::internal("the server sent no worker")))
    }

    /// Stops new rooms for a worker until it is registered again; an admin
    /// call when the server has a token.
    pub async fn deregister(&self, prefill_worker: &str) -> Result<(), Error> {
        let request = pb::DeregisterWorkerRequest {
            prefill_worker: prefill_worker.to_owned(),
        };
        self.call(request, |mut rpc, request| async move {
            rpc.deregister_worker(request).await
        })
        .await
        .map_err(|status| Error::from_status(prefill_worker, 0, status))?;
        if let Some(worker) = self.lease_of(prefill_worker) {
            worker.lock().drop_leases();
        }
        Ok(())
    }

    /// Which worker, rank and dp_size `room` was issued for.
    pub async fn resolve(&self, room: u64) -> Result<Resolved, Error> {
        let response = self
            .call(
                pb::ResolveRankRequest { room },
                |mut rpc, request| async move { rpc.resolve_rank(request).await },
            )
            .await?;
        Ok(Resolved {
            prefill_worker: response.prefill_worker,
            dp_rank: response.dp_rank,
            dp_size: response.dp_size,
        })
    }

    /// Every registered worker, sorted by name (pages through ListWorkers).
    pub async fn workers(&self) -> Result<Vec<WorkerInfo>, Error> {
        let mut workers = Vec::new();
        let mut page_token = String::new();
        loop {
            let request = pb::ListWorkersRequest {
                page_size: WORKERS_PAGE_SIZE,
                page_token,
            };
            let page = self
                .call(request, |mut rpc, request| async move {
                    rpc.list_workers(request).await
                })
                .await?;
            workers.extend(page.workers.into_iter().map(WorkerInfo::from));
            if page.next_page_token.is_empty() {
                return Ok(workers);
            }
            page_token = page.next_page_token;
        }
    }

    /// One raw LeaseRooms call, not kept by the client: for tools, and
    /// routers that manage their own leases. `dp_size` 0 = as registered.
    pub async fn lease_rooms(
        &self,
        prefill_worker: &str,
        count: u32,
        dp_size: u32,
    ) -> Result<Lease, Error> {
        let request = pb::LeaseRoomsRequest {
            prefill_worker: prefill_worker.to_owned(),
            count,
            dp_size,
        };
        let response = self
            .call(request, |mut rpc, request| async move {
                rpc.lease_rooms(request).await
            })
            .await
            .map_err(|status| Error::from_status(prefill_worker, dp_size, status))?;
        Ok(Lease {
            first_base: response.first_base,
            count: response.count,
            dp_size: response.dp_size,
            valid_for: Duration::from_millis(response.valid_for_ms),
        })
    }

    /// A room for (`prefill_worker`, `dp_rank`) from the local lease, with no
    /// RPC; `None` when the lease is empty or of another dp_size (then call
    /// [`allocate`](Self::allocate)). Starts a refill when the lease runs low.
    pub fn try_allocate(&self, prefill_worker: &str, dp_rank: u32, dp_size: u32) -> Option<u64> {
        if fork::generation() != self.inner.fork_generation {
            // A copy in a forked child: the leased bases are the parent's.
            return None;
        }
        let worker = self.lease_of(prefill_worker)?;
        let mut state = worker.lock();
        if state.dp_size != dp_size || dp_rank >= dp_size {
            return None;
        }
        if self.inner.runtime.is_none() {
            // No timer drops expired blocks: check here.
            state.drop_expired(Instant::now());
        }
        let base = state.take()?;
        if state.low() && !worker.refilling.swap(true, Ordering::AcqRel) {
            drop(state);
            self.spawn_refill(worker);
        }
        Some(base + u64::from(dp_rank))
    }

    /// A room for (`prefill_worker`, `dp_rank`) aligned to `dp_size`, the
    /// size the router believes the worker has: from the lease when it can,
    /// else after leasing, else by AllocateRoom (which registers a worker
    /// that was never registered, if the server lets this client).
    pub async fn allocate(
        &self,
        prefill_worker: &str,
        dp_rank: u32,
        dp_size: u32,
    ) -> Result<u64, Error> {
        if dp_rank >= dp_size {
            return Err(Error::RankOutOfRange { dp_rank, dp_size });
        }
        // Before the refill lock too: a forked copy of it may be held forever.
        self.check_same_process().map_err(Error::Status)?;
        if let Some(room) = self.try_allocate(prefill_worker, dp_rank, dp_size) {
            return Ok(room);
        }
        let allocation = self.allocate_slow(prefill_worker, dp_rank, dp_size);
        match self.bounded(prefill_worker, dp_size, allocation).await {
            Outcome::Done(result) => result,
            Outcome::Outage(fallback, cause) => {
                self.fallback_room(fallback, prefill_worker, dp_rank, dp_size, 1, &cause)
            }
        }
    }

    /// `allocate` once the lease had no room: lease (one caller at a time
    /// per worker), else AllocateRoom.
    async fn allocate_slow(
        &self,
        prefill_worker: &str,
        dp_rank: u32,
        dp_size: u32,
    ) -> Result<u64, Error> {
        let worker = self.worker(prefill_worker);
        {
            let _one_lease = worker.refill.lock().await;
            if let Some(room) = self.try_allocate(prefill_worker, dp_rank, dp_size) {
                return Ok(room);
            }
            adopt_dp_size(&worker, dp_size);
            match self.refill_locked(&worker, dp_size, 1).await {
                Ok(()) => {}
                Err(error @ (Error::DpSizeMismatch { .. } | Error::Deregistered { .. })) => {
                    return Err(error)
                }
                Err(error) => debug!(%error, "leasing failed; falling back to AllocateRoom"),
            }
        }
        if let Some(room) = self.try_allocate(prefill_worker, dp_rank, dp_size) {
            return Ok(room);
        }
        self.allocate_by_rpc(prefill_worker, dp_rank, dp_size).await
    }

    /// Rooms for a batch, one per rank of `dp_ranks`, in order, each aligned
    /// to its own rank: all from the lease in one take when it holds enough,
    /// else after leasing enough (one lease per 2^24 numbers of the room
    /// space), else one AllocateRoom each. Each room is a single number:
    /// for a request SGLang expands into `room + i`, use
    /// [`allocate_block`](Self::allocate_block). With an outage fallback,
    /// a batch the allocator cannot serve gets fallback rooms, all of it.
    pub async fn allocate_many(
        &self,
        prefill_worker: &str,
        dp_ranks: &[u32],
        dp_size: u32,
    ) -> Result<Vec<u64>, Error> {
        if let Some(&dp_rank) = dp_ranks.iter().find(|&&dp_rank| dp_rank >= dp_size) {
            return Err(Error::RankOutOfRange { dp_rank, dp_size });
        }
        self.check_same_process().map_err(Error::Status)?;
        if dp_ranks.is_empty() {
            return Ok(Vec::new());
        }
        if let Some(rooms) = self.try_allocate_many(prefill_worker, dp_ranks, dp_size) {
            return Ok(rooms);
        }
        let allocation = self.allocate_many_slow(prefill_worker, dp_ranks, dp_size);
        match self.bounded(prefill_worker, dp_size, allocation).await {
            Outcome::Done(result) => result,
            Outcome::Outage(fallback, cause) => dp_ranks
                .iter()
                .map(|&dp_rank| {
                    self.fallback_room(fallback, prefill_worker, dp_rank, dp_size, 1, &cause)
                })
                .collect(),
        }
    }

    /// The batch from the lease in one take, or `None` (nothing taken).
    fn try_allocate_many(
        &self,
        prefill_worker: &str,
        dp_ranks: &[u32],
        dp_size: u32,
    ) -> Option<Vec<u64>> {
        if fork::generation() != self.inner.fork_generation {
            return None;
        }
        let worker = self.lease_of(prefill_worker)?;
        let mut state = worker.lock();
        if state.dp_size != dp_size {
            return None;
        }
        if self.inner.runtime.is_none() {
            state.drop_expired(Instant::now());
        }
        let bases = state.take_many(dp_ranks.len())?;
        if state.low() && !worker.refilling.swap(true, Ordering::AcqRel) {
            drop(state);
            self.spawn_refill(worker);
        }
        Some(
            bases
                .into_iter()
                .zip(dp_ranks)
                .map(|(base, &dp_rank)| base + u64::from(dp_rank))
                .collect(),
        )
    }

    async fn allocate_many_slow(
        &self,
        prefill_worker: &str,
        dp_ranks: &[u32],
        dp_size: u32,
    ) -> Result<Vec<u64>, Error> {
        let worker = self.worker(prefill_worker);
        let needed = u64::try_from(dp_ranks.len()).unwrap_or(u64::MAX);
        // Enough leases for the batch, and one more for bases that expire
        // meanwhile: the loop is bounded by the batch, not by time.
        let leases = needed / max_lease_count(dp_size) + 2;
        {
            let _one_lease = worker.refill.lock().await;
            adopt_dp_size(&worker, dp_size);
            for _ in 0..leases {
                if let Some(rooms) = self.try_allocate_many(prefill_worker, dp_ranks, dp_size) {
                    return Ok(rooms);
                }
                let missing = needed.saturating_sub(worker.lock().available);
                let missing = u32::try_from(missing).unwrap_or(u32::MAX);
                match self.refill_locked(&worker, dp_size, missing).await {
                    Ok(()) => {}
                    Err(error @ (Error::DpSizeMismatch { .. } | Error::Deregistered { .. })) => {
                        return Err(error)
                    }
                    Err(error) => {
                        debug!(%error, "leasing failed; falling back to AllocateRoom");
                        break;
                    }
                }
            }
        }
        if let Some(rooms) = self.try_allocate_many(prefill_worker, dp_ranks, dp_size) {
            return Ok(rooms);
        }
        let mut rooms = Vec::with_capacity(dp_ranks.len());
        for &dp_rank in dp_ranks {
            rooms.push(
                self.allocate_by_rpc(prefill_worker, dp_rank, dp_size)
                    .await?,
            );
        }
        Ok(rooms)
    }

    /// The first room of `num` consecutive numbers no one else gets: room
    /// `r` with `r % dp_size == first_rank`, and every number of `r..r +
    /// num` this client's alone, so item `i` of a request SGLang expands into
    /// `room + i` lands on rank `(first_rank + i) % dp_size` and meets no
    /// other request's room. (A router rotating ranks then moves on by
    /// `num`.)
    ///
    /// Why it holds: a lease's bases `first_base + j * dp_size` (`j <
    /// count`) cover `[first_base, first_base + count * dp_size)` with no
    /// gap, and the server never hands a number of it to anyone else; the
    /// block takes `ceil((first_rank + num) / dp_size)` consecutive bases of
    /// one lease, so its numbers lie inside them, and uses each base once.
    /// The other ranks' numbers of those bases go unused.
    ///
    /// Fails with [`Error::BlockSize`] when `num` is 0 or the bases needed do
    /// not fit in one lease (2^24 numbers of the room space). With an outage
    /// fallback, a fallback block lies wholly inside the fallback region.
    pub async fn allocate_block(
        &self,
        prefill_worker: &str,
        first_rank: u32,
        num: u32,
        dp_size: u32,
    ) -> Result<u64, Error> {
        if first_rank >= dp_size {
            return Err(Error::RankOutOfRange {
                dp_rank: first_rank,
                dp_size,
            });
        }
        let max_bases = max_lease_count(dp_size);
        let max = (max_bases * u64::from(dp_size)).saturating_sub(u64::from(first_rank));
        if num == 0 || u64::from(num) > max {
            return Err(Error::BlockSize { num, dp_size, max });
        }
        self.check_same_process().map_err(Error::Status)?;
        // num >= 1, so the block's last number is first_rank + num - 1
        // past its first base.
        let bases = (u64::from(first_rank) + u64::from(num) - 1) / u64::from(dp_size) + 1;
        if let Some(room) = self.try_allocate_block(prefill_worker, first_rank, bases, dp_size) {
            return Ok(room);
        }
        let allocation = self.allocate_block_slow(prefill_worker, first_rank, bases, dp_size);
        match self.bounded(prefill_worker, dp_size, allocation).await {
            Outcome::Done(result) => result,
            Outcome::Outage(fallback, cause) => self.fallback_room(
                fallback,
                prefill_worker,
                first_rank,
                dp_size,
                u64::from(num),
                &cause,
            ),
        }
    }

    /// `bases` consecutive bases of one leased block, as a room for
    /// `first_rank`; `None` when no block has that many left.
    fn try_allocate_block(
        &self,
        prefill_worker: &str,
        first_rank: u32,
        bases: u64,
        dp_size: u32,
    ) -> Option<u64> {
        if fork::generation() != self.inner.fork_generation {
            return None;
        }
        let worker = self.lease_of(prefill_worker)?;
        let mut state = worker.lock();
        if state.dp_size != dp_size {
            return None;
        }
        if self.inner.runtime.is_none() {
            state.drop_expired(Instant::now());
        }
        let base = state.take_run(bases)?;
        if state.low() && !worker.refilling.swap(true, Ordering::AcqRel) {
            drop(state);
            self.spawn_refill(worker);
        }
        Some(base + u64::from(first_rank))
    }

    async fn allocate_block_slow(
        &self,
        prefill_worker: &str,
        first_rank: u32,
        bases: u64,
        dp_size: u32,
    ) -> Result<u64, Error> {
        let worker = self.worker(prefill_worker);
        let _one_lease = worker.refill.lock().await;
        adopt_dp_size(&worker, dp_size);
        // One lease of at least `bases` bases is one block that holds the
        // run; a second try covers a lease that expired on arrival.
        for _ in 0..2 {
            if let Some(room) = self.try_allocate_block(prefill_worker, first_rank, bases, dp_size)
            {
                return Ok(room);
            }
            let at_least = u32::try_from(bases).unwrap_or(u32::MAX);
            self.refill_locked(&worker, dp_size, at_least).await?;
        }
        self.try_allocate_block(prefill_worker, first_rank, bases, dp_size)
            .ok_or_else(|| {
                Error::Status(Status::unavailable(format!(
                    "two leases of at least {bases} bases each brought no block of {bases} bases for {:?}; retry",
                    prefill_worker.escape_debug().to_string()
                )))
            })
    }

    /// Runs an allocation the lease could not serve: as it is without an
    /// outage fallback; with one, bounded by the allocation deadline, and an
    /// outage (unreachable, UNAVAILABLE, the deadline) is returned for the
    /// caller to use fallback rooms.
    async fn bounded<T>(
        &self,
        prefill_worker: &str,
        dp_size: u32,
        allocation: impl Future<Output = Result<T, Error>>,
    ) -> Outcome<'_, T> {
        let Some(fallback) = &self.inner.fallback else {
            return Outcome::Done(allocation.await);
        };
        match tokio::time::timeout(fallback.deadline, allocation).await {
            Ok(Err(error)) if is_outage(&error) => Outcome::Outage(fallback, error),
            Ok(result) => Outcome::Done(result),
            Err(_elapsed) => {
                // The lease in flight was abandoned; let one go on in the
                // background (bounded by the call timeout) so the next
                // calls find rooms as soon as the allocator answers again.
                if let Some(worker) = self.lease_of(prefill_worker) {
                    if worker.lock().dp_size == dp_size
                        && !worker.refilling.swap(true, Ordering::AcqRel)
                    {
                        self.spawn_refill(worker);
                    }
                }
                Outcome::Outage(
                    fallback,
                    Error::Status(Status::deadline_exceeded(format!(
                        "no room from the allocator within the allocation deadline of {:?}",
                        fallback.deadline
                    ))),
                )
            }
        }
    }

    /// A fallback room (the first of `num`), counted and reported.
    fn fallback_room(
        &self,
        fallback: &Fallback,
        prefill_worker: &str,
        dp_rank: u32,
        dp_size: u32,
        num: u64,
        cause: &Error,
    ) -> Result<u64, Error> {
        let Some(room) = fallback
            .region
            .pick(dp_rank, dp_size, num, fallback.draws.next())
        else {
            return Err(Error::Config(format!(
                "the allocator gave no room ({cause}) and the outage fallback region {}..={} holds no block of {num} rooms from rank {dp_rank} of dp_size {dp_size}; give a larger region",
                fallback.region.start, fallback.region.end
            )));
        };
        fallback.rooms.fetch_add(1, Ordering::Relaxed);
        if let Some(callback) = &fallback.on_fallback {
            callback(&FallbackRoom {
                prefill_worker,
                dp_rank,
                dp_size,
                room,
                num,
                cause,
            });
        }
        debug!(worker = %prefill_worker.escape_debug(), dp_rank, dp_size, room, num, %cause, "outage fallback room");
        Ok(room)
    }

    /// Fallback rooms handed out so far (a block or a batch item counts
    /// one); 0 without an outage fallback. Export it as a router metric,
    /// e.g. `room_allocator_client_fallback_rooms_total`.
    pub fn fallback_rooms(&self) -> u64 {
        self.inner
            .fallback
            .as_ref()
            .map_or(0, |fallback| fallback.rooms.load(Ordering::Relaxed))
    }

    /// The part of the room space the server hands out (GetRoomSpace).
    pub async fn room_space(&self) -> Result<RoomSpace, Error> {
        let response = self
            .call(pb::GetRoomSpaceRequest {}, |mut rpc, request| async move {
                rpc.get_room_space(request).await
            })
            .await?;
        Ok(RoomSpace {
            min_room: response.min_room,
            max_room: response.max_room,
        })
    }

    /// Makes the first requests as cheap as the later ones: connects to
    /// every endpoint (`connect` reaches only one) and leases rooms for each
    /// `(prefill_worker, dp_size)`, so the next `allocate` for them takes a
    /// leased room with no RPC. Fails if no endpoint answers, or with the
    /// first worker's error (a stale dp_size, a deregistered worker).
    pub async fn warm_up(&self, workers: &[(&str, u32)]) -> Result<(), Error> {
        self.check_same_process().map_err(Error::Status)?;
        let mut failure = None;
        let mut answered = false;
        for target in &self.inner.targets {
            let mut rpc = target.rpc.clone();
            match rpc.get_room_space(pb::GetRoomSpaceRequest {}).await {
                Ok(_) => {
                    target.answered();
                    answered = true;
                }
                Err(status) => {
                    let status = if failed_locally(&status) {
                        explain_status(&status, &target.context, self.inner.timeout)
                    } else {
                        status
                    };
                    failure = Some(status);
                }
            }
        }
        if !answered {
            if let Some(status) = failure {
                return Err(Error::Status(status));
            }
        }
        for &(prefill_worker, dp_size) in workers {
            let worker = self.worker(prefill_worker);
            let _one_lease = worker.refill.lock().await;
            adopt_dp_size(&worker, dp_size);
            if worker.lock().available == 0 {
                self.refill_locked(&worker, dp_size, 1).await?;
            }
        }
        Ok(())
    }

    async fn allocate_by_rpc(
        &self,
        prefill_worker: &str,
        dp_rank: u32,
        dp_size: u32,
    ) -> Result<u64, Error> {
        self.allocate_room(prefill_worker, dp_rank, dp_size)
            .await
            .map(|(room, _)| room)
    }

    /// One raw AllocateRoom call (no lease): the room and the dp_size it is
    /// aligned to. `dp_size` 0 = as registered; another value registers a
    /// worker never registered (an admin act when the server has a token).
    pub async fn allocate_room(
        &self,
        prefill_worker: &str,
        dp_rank: u32,
        dp_size: u32,
    ) -> Result<(u64, u32), Error> {
        let request = pb::AllocateRoomRequest {
            prefill_worker: prefill_worker.to_owned(),
            dp_rank,
            dp_size,
        };
        let response = self
            .call(request, |mut rpc, request| async move {
                rpc.allocate_room(request).await
            })
            .await
            .map_err(|status| Error::from_status(prefill_worker, dp_size, status))?;
        let aligned = response.dp_size != 0
            && response.room % u64::from(response.dp_size) == u64::from(dp_rank);
        if !aligned || (dp_size != 0 && response.dp_size != dp_size) {
            // The server broke its contract; never hand such a room on.
            return Err(Error::Status(Status::internal(format!(
                "the server returned room {} of dp_size {} for rank {dp_rank} of dp_size {dp_size}",
                response.room, response.dp_size
            ))));
        }
        Ok((response.room, response.dp_size))
    }

    /// Refuses a copy of the client in a forked child: its leased bases are
    /// the parent's, who hands them out too, and its connections need the
    /// parent's runtime, so its calls would wait forever.
    fn check_same_process(&self) -> Result<(), Status> {
        if fork::generation() == self.inner.fork_generation {
            return Ok(());
        }
        Err(Status::failed_precondition(
            "this RoomClient was made before fork() and this is the forked child: its leases are the parent's and its connections run on the parent's tokio runtime; build a new RoomClient (and runtime) in the child",
        ))
    }

    fn lease_of(&self, prefill_worker: &str) -> Option<Arc<WorkerLease>> {
        self.inner
            .workers
            .read()
            .expect("worker map lock is never poisoned")
            .get(prefill_worker)
            .cloned()
    }

    fn worker(&self, prefill_worker: &str) -> Arc<WorkerLease> {
        if let Some(worker) = self.lease_of(prefill_worker) {
            return worker;
        }
        self.inner
            .workers
            .write()
            .expect("worker map lock is never poisoned")
            .entry(prefill_worker.into())
            .or_insert_with(|| {
                Arc::new(WorkerLease {
                    name: prefill_worker.into(),
                    state: Mutex::new(LeaseState::new(INITIAL_LEASE)),
                    refilling: AtomicBool::new(false),
                    refill: tokio::sync::Mutex::new(()),
                })
            })
            .clone()
    }

    fn runtime(&self) -> Option<tokio::runtime::Handle> {
        self.inner
            .runtime
            .clone()
            .or_else(|| tokio::runtime::Handle::try_current().ok())
    }

    fn spawn_refill(&self, worker: Arc<WorkerLease>) {
        let Some(runtime) = self.runtime() else {
            // No runtime to refill in: the next `allocate` leases inline.
            worker.refilling.store(false, Ordering::Release);
            return;
        };
        let client = self.clone();
        runtime.spawn(async move {
            if let Ok(_one_lease) = worker.refill.try_lock() {
                let dp_size = worker.lock().dp_size;
                if let Err(error) = client.refill_locked(&worker, dp_size, 1).await {
                    debug!(worker = %worker.name.escape_debug(), %error, "refilling the room lease failed; the next allocate leases or falls back to AllocateRoom");
                }
            }
            worker.refilling.store(false, Ordering::Release);
        });
    }

    /// Leases one more block for `worker` at `dp_size`, of at least
    /// `at_least` bases as far as one lease may hold (the caller holds the
    /// worker's refill lock). A mismatch or a deregistration drops the lease.
    async fn refill_locked(
        &self,
        worker: &Arc<WorkerLease>,
        dp_size: u32,
        at_least: u32,
    ) -> Result<(), Error> {
        let count = {
            let mut state = worker.lock();
            let max = u32::try_from(max_lease_count(dp_size)).expect("clamped to MAX_LEASE_COUNT");
            let sized =
                state.next_lease_size(Instant::now(), FAST_LEASE, INITIAL_LEASE.min(max), max);
            sized.max(at_least.min(max))
        };
        let sent_at = Instant::now();
        let lease = match self.lease_rooms(&worker.name, count, dp_size).await {
            Ok(lease) => lease,
            Err(error) => {
                if matches!(
                    error,
                    Error::DpSizeMismatch { .. } | Error::Deregistered { .. }
                ) {
                    worker.lock().drop_leases();
                }
                return Err(error);
            }
        };
        if lease.dp_size != dp_size || lease.first_base % u64::from(dp_size) != 0 {
            return Err(Error::Status(Status::internal(format!(
                "the server leased bases from {} of dp_size {} for dp_size {dp_size}",
                lease.first_base, lease.dp_size
            ))));
        }
        // Measured from before the call: the server's clock started earlier
        // than the response arrived.
        let valid_for = if lease.valid_for.is_zero() {
            self.inner.max_lease_age
        } else {
            lease.valid_for.min(self.inner.max_lease_age)
        };
        let Some(block) = Block::new(lease.first_base, lease.count, dp_size, sent_at + valid_for)
        else {
            return Err(Error::Status(Status::internal(format!(
                "the server leased {} bases from {} of dp_size {dp_size}, past the last number",
                lease.count, lease.first_base
            ))));
        };
        {
            let mut state = worker.lock();
            if state.dp_size != dp_size {
                // The caller switched dp_size meanwhile; skip these bases.
                return Ok(());
            }
            state.push(block);
        }
        self.expire_later(worker, block.expires_at);
        Ok(())
    }

    /// Drops the worker's expired blocks when `at` comes, so the hot path
    /// never reads a clock.
    fn expire_later(&self, worker: &Arc<WorkerLease>, at: Instant) {
        let Some(runtime) = self.runtime() else {
            return;
        };
        let worker: Weak<WorkerLease> = Arc::downgrade(worker);
        runtime.spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            if let Some(worker) = worker.upgrade() {
                worker.lock().drop_expired(Instant::now());
            }
        });
    }
}

/// Most bases one LeaseRooms call may take at `dp_size`: the server's
/// limits on the count and on the numbers of the room space per call.
fn max_lease_count(dp_size: u32) -> u64 {
    (MAX_LEASE_NUMBERS / u64::from(dp_size.max(1))).clamp(1, u64::from(MAX_LEASE_COUNT))
}

/// Makes `dp_size` the worker's lease alignment (the caller holds its refill
/// lock), and drops expired blocks.
fn adopt_dp_size(worker: &WorkerLease, dp_size: u32) {
    let mut state = worker.lock();
    if state.dp_size != dp_size {
        // The caller's view of the worker changed: the old lease is of no
        // use for the new alignment.
        state.drop_leases();
        state.dp_size = dp_size;
    }
    state.drop_expired(Instant::now());
}

/// How an allocation the lease could not serve ended.
enum Outcome<'a, T> {
    /// The allocator's answer (or a refusal).
    Done(Result<T, Error>),
    /// An outage, and the client's fallback to stand in for it.
    Outage(&'a Fallback, Error),
}

impl std::fmt::Debug for RoomClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoomClient").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_spreads_worker_names() {
        let hash = |s: &str| {
            let mut h = Fnv::default();
            h.write(s.as_bytes());
            h.finish()
        };
        assert_ne!(hash("prefill-0"), hash("prefill-1"));
    }

    fn context(tls: bool, identity: bool) -> Context {
        Context {
            url: "http://a:1".into(),
            tls,
            identity,
        }
    }

    #[test]
    fn hints_name_the_likely_cause_of_a_transport_failure() {
        let plain = context(false, false);
        let cases = [
            (
                "tcp connect error: Connection refused (os error 111)",
                &plain,
                "nothing listens",
            ),
            (
                "dns error: failed to lookup address information",
                &plain,
                "does not resolve",
            ),
            (
                "connection error detected: frame with invalid size",
                &plain,
                "does not speak gRPC (HTTP/2)",
            ),
            (
                "stream closed because of a broken pipe",
                &plain,
                "does not speak gRPC (HTTP/2)",
            ),
            (
                "received fatal alert: CertificateRequired",
                &context(true, false),
                "requires a client certificate",
            ),
            (
                "stream closed because of a broken pipe",
                &context(true, false),
                "requires a client certificate",
            ),
            (
                "invalid peer certificate: UnknownIssuer",
                &context(true, false),
                "check the CA",
            ),
            ("keep-alive timed out", &plain, "keep-alive"),
        ];
        for (chain, context, expected) in cases {
            assert!(
                hint(chain, context).contains(expected),
                "{chain}: {}",
                hint(chain, context)
            );
        }
        assert_eq!(hint("something else", &plain), "");
    }

    #[test]
    fn a_client_deadline_is_deadline_exceeded_and_server_statuses_are_not_local() {
        let timeout = Status::from_error(Box::new(tonic::TimeoutExpired(())));
        assert_eq!(timeout.code(), Code::Cancelled, "what tonic says");
        assert!(failed_locally(&timeout));
        let explained =
            explain_status(&timeout, &context(false, false), Duration::from_millis(500));
        assert_eq!(explained.code(), Code::DeadlineExceeded);
        assert!(explained.message().contains("500ms"), "{explained:?}");
        assert!(!failed_locally(&Status::unavailable("the store is down")));
    }

    #[test]
    fn host_port_means_http_or_https_with_tls() {
        let plain = RoomClient::builder(["127.0.0.1:50051"]);
        assert_eq!(plain.url("127.0.0.1:50051"), "http://127.0.0.1:50051");
        assert_eq!(plain.url("https://a:1"), "https://a:1");
        let tls = plain.ca_certificate_pem(b"pem".to_vec());
        assert_eq!(tls.url("a:1"), "https://a:1");
    }
}
