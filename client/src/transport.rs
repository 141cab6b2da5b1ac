//! The transport: the endpoints a client talks to, how a call fails over
//! among them, and what a transport failure is explained as.
//!
//! Every endpoint is a [`Target`]: a channel with the call options (token,
//! deadline) and a pause. A call starts at each endpoint in turn; one that
//! cannot be reached, or answers UNAVAILABLE, is skipped for a while (the
//! [`ENDPOINT_PAUSE`] backoff) and the call goes on to the next, so a dead
//! replica costs at most one failed attempt per pause. Any other status is
//! the server's answer and is returned as it is: another replica would say
//! the same.
//!
//! Transport failures are rewritten to say what happened, where, and the
//! likely mistake (a wrong port, TLS on one side only, a missing client
//! certificate), with the status gRPC specifies for them.

use std::future::Future;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};
use tracing::debug;

use crate::backoff::{Backoff, Jitter};
use crate::error::{cause_chain, Error};
use crate::pb;
use crate::pb::room_allocator_service_client::RoomAllocatorServiceClient;

/// Connection attempts back off from 50 ms to at most 2 s.
const CONNECT_BACKOFF: Backoff = Backoff::new(
    Duration::from_millis(50),
    Duration::from_secs(2),
    Jitter::Equal,
);
/// With several endpoints, one that cannot be reached is skipped for up to
/// 500 ms, doubling while it keeps failing, up to 30 s; then one call tries
/// it again.
const ENDPOINT_PAUSE: Backoff = Backoff::new(
    Duration::from_millis(500),
    Duration::from_secs(30),
    Jitter::Equal,
);

/// Adds the bearer token and the deadline to every call.
#[derive(Clone)]
pub(crate) struct CallOptions {
    pub token: Option<MetadataValue<Ascii>>,
    pub timeout: Duration,
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

pub(crate) type Rpc = RoomAllocatorServiceClient<InterceptedService<Channel, CallOptions>>;

/// What a transport failure's explanation depends on.
#[derive(Debug, Clone)]
pub(crate) struct Context {
    pub url: String,
    /// The endpoint is https.
    pub tls: bool,
    /// A client certificate is presented.
    pub identity: bool,
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
        let failures = self.failures.fetch_add(1, Ordering::Relaxed);
        let pause = ENDPOINT_PAUSE.delay(failures);
        let until = epoch.elapsed().saturating_add(pause);
        self.paused_until_ms.store(
            u64::try_from(until.as_millis()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }
}

/// The endpoints of one client and the calls' failover among them.
pub(crate) struct Transport {
    /// One per endpoint; calls fail over among them.
    targets: Vec<Target>,
    /// Where the next call starts, so calls spread over the endpoints.
    next: AtomicUsize,
    /// Time origin of `Target::paused_until_ms`.
    epoch: Instant,
    /// Each call's deadline, for messages.
    timeout: Duration,
}

impl Transport {
    /// Connects: retries (by [`CONNECT_BACKOFF`]) until one endpoint answers
    /// or `patience` runs out; the error names the underlying cause. The
    /// others connect at their first call.
    pub async fn connect(
        endpoints: Vec<(Context, Endpoint)>,
        options: CallOptions,
        patience: Duration,
    ) -> Result<Self, Error> {
        let deadline = Instant::now() + patience;
        let mut attempt = 0u32;
        // Endpoints are tried in order: those before the one that answered
        // failed this round.
        let (answered, channel) = 'connected: loop {
            let mut failure = None;
            for (i, (context, endpoint)) in endpoints.iter().enumerate() {
                match endpoint.connect().await {
                    Ok(channel) => break 'connected (i, channel),
                    Err(error) => {
                        failure = Some((context.url.clone(), explain(&error, context)));
                    }
                }
            }
            let Some((url, reason)) = failure else {
                return Err(Error::Config("no endpoint given".into()));
            };
            let pause = CONNECT_BACKOFF.delay(attempt);
            if Instant::now() + pause > deadline {
                return Err(Error::Connect { url, reason });
            }
            debug!(%url, %reason, ?pause, "connect failed; retrying");
            tokio::time::sleep(pause).await;
            attempt = attempt.saturating_add(1);
        };
        // One answered. Calls fail over among all of them (see `call`).
        let epoch = Instant::now();
        let timeout = options.timeout;
        let mut channel = Some(channel);
        let targets = endpoints
            .into_iter()
            .enumerate()
            .map(|(i, (context, endpoint))| {
                let channel = match channel.take_if(|_| i == answered) {
                    Some(channel) => channel,
                    None => endpoint.connect_lazy(),
                };
                let target = Target::new(context, channel, options.clone());
                if i < answered {
                    target.failed(epoch);
                }
                target
            })
            .collect();
        Ok(Self::new(targets, epoch, timeout))
    }

    /// One endpoint over an existing channel.
    pub fn from_channel(context: Context, channel: Channel, options: CallOptions) -> Self {
        let timeout = options.timeout;
        Self::new(
            vec![Target::new(context, channel, options)],
            Instant::now(),
            timeout,
        )
    }

    fn new(targets: Vec<Target>, epoch: Instant, timeout: Duration) -> Self {
        Self {
            targets,
            next: AtomicUsize::new(0),
            epoch,
            timeout,
        }
    }

    /// Sends one call. With several endpoints, calls start at each in turn;
    /// one that cannot be reached (connection refused or broken, deadline)
    /// or answers UNAVAILABLE (a replica cut off from etcd) is skipped for a
    /// while and the call goes to the next, so a dead replica costs at most
    /// one failed attempt per pause. Any other status the server sent is
    /// returned as it is: another replica would say the same.
    pub async fn call<Q, R, F, Fut>(&self, request: Q, send: F) -> Result<R, Status>
    where
        Q: Clone,
        F: Fn(Rpc, Q) -> Fut,
        Fut: Future<Output = Result<tonic::Response<R>, Status>>,
    {
        let targets = &self.targets;
        let count = targets.len();
        let start = if count == 1 {
            0
        } else {
            self.next.fetch_add(1, Ordering::Relaxed) % count
        };
        let now_ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
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
                        explain_status(&status, &target.context, self.timeout)
                    } else {
                        status
                    };
                    if count > 1 {
                        debug!(url = %target.context.url, %status, "endpoint failed; trying the next");
                        target.failed(self.epoch);
                    }
                    failure = Some(status);
                }
            }
        }
        Err(failure.expect("every client has an endpoint"))
    }

    /// Reaches every endpoint (one GetRoomSpace each), so none is connected
    /// lazily at a later call; fails only when none answers.
    pub async fn reach_all(&self) -> Result<(), Status> {
        let mut failure = None;
        let mut answered = false;
        for target in &self.targets {
            let mut rpc = target.rpc.clone();
            match rpc.get_room_space(pb::GetRoomSpaceRequest {}).await {
                Ok(_) => {
                    target.answered();
                    answered = true;
                }
                Err(status) => {
                    let status = if failed_locally(&status) {
                        explain_status(&status, &target.context, self.timeout)
                    } else {
                        status
                    };
                    failure = Some(status);
                }
            }
        }
        match failure {
            Some(status) if !answered => Err(status),
            _ => Ok(()),
        }
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
pub(crate) fn explain(error: &tonic::transport::Error, context: &Context) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

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

    #[tokio::test]
    async fn an_unreachable_endpoint_is_skipped_longer_each_time_in_a_row_up_to_the_cap() {
        let channel = Endpoint::from_static("http://127.0.0.1:1").connect_lazy();
        let options = CallOptions {
            token: None,
            timeout: Duration::from_secs(1),
        };
        let target = Target::new(context(false, false), channel, options);
        let epoch = Instant::now();
        for failures in 0..12 {
            target.failed(epoch);
            let until = Duration::from_millis(target.paused_until_ms.load(Ordering::Relaxed));
            let ceiling = ENDPOINT_PAUSE.ceiling(failures);
            assert!(
                until >= ceiling / 2 && until <= epoch.elapsed() + ceiling,
                "failure {failures}: skipped until {until:?}, ceiling {ceiling:?}"
            );
        }
        assert_eq!(ENDPOINT_PAUSE.ceiling(11), Duration::from_secs(30));
        target.answered();
        assert_eq!(target.paused_until_ms.load(Ordering::Relaxed), 0);
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
}
