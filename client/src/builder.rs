//! [`RoomClientBuilder`]: the options of a client (endpoints, token, TLS,
//! deadlines, keep-alive, lease age, the outage fallback) and `connect`,
//! which checks them, reaches one endpoint through the transport, and, with
//! an outage fallback, checks its region against the server's bounds.

use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Endpoint;

use crate::client::{Fallback, RoomClient};
use crate::error::{cause_chain, Error};
use crate::fallback::Region;
use crate::transport::{CallOptions, Context, Transport};
use crate::types::{FallbackCallback, FallbackRoom};

/// Default bound on a lease's life: a realignment made by another router
/// reaches this one within it even if no refill happens meanwhile. Matches
/// the server's default `--etcd-staleness-secs`.
pub(crate) const DEFAULT_MAX_LEASE_AGE: Duration = Duration::from_secs(10);
/// Default per-call deadline: the server's default `--request-timeout-secs`.
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default bound on getting a room from the allocator before an outage
/// fallback room is used: a leased room costs microseconds and a lease a
/// round trip of about a millisecond in one data centre, so tens of
/// milliseconds mean the allocator is not answering, while a router's
/// request (its prefill alone) takes far longer than the wait.
const DEFAULT_ALLOCATION_DEADLINE: Duration = Duration::from_millis(50);

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
    pub(crate) fn new(endpoints: Vec<String>) -> Self {
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
        let contexts = urls.iter().map(|url| self.context(url));
        let options = CallOptions {
            token,
            timeout: self.timeout,
        };
        let transport =
            Transport::connect(contexts.zip(endpoints).collect(), options, self.patience).await?;
        let fallback = region.map(|region| {
            Fallback::new(region, self.allocation_deadline, self.on_fallback.clone())
        });
        let client = RoomClient::new(transport, self.max_lease_age, fallback);
        if let Some(fallback) = client.fallback() {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_means_http_or_https_with_tls() {
        let plain = RoomClient::builder(["127.0.0.1:50051"]);
        assert_eq!(plain.url("127.0.0.1:50051"), "http://127.0.0.1:50051");
        assert_eq!(plain.url("https://a:1"), "https://a:1");
        let tls = plain.ca_certificate_pem(b"pem".to_vec());
        assert_eq!(tls.url("a:1"), "https://a:1");
    }
}
