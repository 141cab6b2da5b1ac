//! A small etcd v3 client over tonic: the KV, Watch, Lease and Auth calls the
//! etcd store makes, generated with protox from `proto/etcd/rpc.proto`, so
//! the build needs no `protoc` (etcd-client's build script does).
//!
//! It connects to several endpoints (calls are spread over the reachable ones
//! and fail over), speaks TLS and mutual TLS, sends HTTP/2 keep-alives so a
//! silently dead connection is noticed, and authenticates with a user and
//! password: the token goes in the `token` metadata, and a call refused for
//! an expired token is retried once after authenticating again.
//!
//! A password given as a file (`--etcd-password-file`, a mounted Secret) is
//! reread at every authentication and every [`TLS_RELOAD_INTERVAL`], so a
//! password rotated in the Secret is used from the next token refresh on,
//! without a restart: etcd invalidates every token when a password changes,
//! so that refresh comes with the next call. An unreadable or empty file
//! keeps the last password read (and sets
//! `room_allocator_reload_last_success{file="etcd_password"}` to 0). If etcd
//! refuses a newly read password, the one it accepted before is tried once:
//! the Secret may change before etcd's user does.
//!
//! The TLS files (`--etcd-ca`, `--etcd-cert`, `--etcd-key`) are reread every
//! [`TLS_RELOAD_INTERVAL`] while the client lives; when they change, a new
//! channel is built with them and later calls use it. tonic's channel
//! redials with the TLS settings it was built with, so without this every
//! replica would fail its next reconnect once cert-manager renewed the
//! client certificate or rotated the CA: a fleet-wide outage on schedule.
//!
//! Watches require a leader (the `hasleader` metadata, as etcd's clientv3
//! `WithRequireLeader` sends): a member cut off from its cluster cancels
//! them instead of serving its stale revision as if it were current.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Request, Status, Streaming};

use room_allocator_client::cause_chain;

use crate::secret::Secret;

/// Generated etcd types and clients (`etcdserverpb`).
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("etcdserverpb");
}

use pb::auth_client::AuthClient;
use pb::kv_client::KvClient;
use pb::lease_client::LeaseClient;
use pb::maintenance_client::MaintenanceClient;
use pb::watch_client::WatchClient;

/// An etcd call that failed: its gRPC code and what etcd (or the transport) said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdError {
    pub code: Code,
    pub message: String,
}

impl std::fmt::Display for EtcdError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({})",
            self.message,
            room_allocator_client::code_name(self.code)
        )
    }
}

impl std::error::Error for EtcdError {}

impl From<Status> for EtcdError {
    fn from(status: Status) -> Self {
        let message = if status.message().is_empty() {
            cause_chain(&status)
        } else {
            let mut message = status.message().to_owned();
            if let Some(source) = std::error::Error::source(&status) {
                message = format!("{message}: {}", cause_chain(source));
            }
            message
        };
        Self {
            code: status.code(),
            message,
        }
    }
}

impl EtcdError {
    fn config(message: impl Into<String>) -> Self {
        Self {
            code: Code::InvalidArgument,
            message: message.into(),
        }
    }

    /// etcd refused the call's auth token (expired, or the auth store moved on).
    fn is_stale_token(&self) -> bool {
        (self.code == Code::Unauthenticated && self.message.contains("invalid auth token"))
            || self.message.contains("revision of auth store is old")
    }

    /// etcd refused the user name and password.
    fn is_wrong_password(&self) -> bool {
        self.message.contains("authentication failed")
    }
}

/// How to reach etcd. Its `Debug` leaves out the password and the key.
#[derive(Clone, Default)]
pub struct ConnectOptions {
    pub endpoints: Vec<String>,
    pub user: Option<(String, Secret)>,
    /// CA (PEM) to verify etcd's certificate; turns `http://` endpoints into TLS.
    pub ca_pem: Option<Vec<u8>>,
    /// Client certificate and key (PEM) for mutual TLS.
    pub identity_pem: Option<(Vec<u8>, Vec<u8>)>,
    /// Bound on connecting and on each call.
    pub timeout: Duration,
    /// Where `ca_pem` and `identity_pem` came from, to reread them.
    pub tls_files: Option<TlsFiles>,
    /// Where `user`'s password came from, to reread it at each
    /// authentication (`user` holds the copy read at start).
    pub password_file: Option<PathBuf>,
}

/// The etcd TLS files, as flags name them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// The contents of [`TlsFiles`]: the CA and the client certificate and key.
type TlsPem = (Option<Vec<u8>>, Option<(Vec<u8>, Vec<u8>)>);

impl TlsFiles {
    fn read(&self) -> std::io::Result<TlsPem> {
        let ca = self.ca.as_ref().map(std::fs::read).transpose()?;
        let identity = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => Some((std::fs::read(cert)?, std::fs::read(key)?)),
            _ => None,
        };
        Ok((ca, identity))
    }
}

/// How often the etcd TLS files are checked for changes, as the server's
/// own certificate files are.
pub const TLS_RELOAD_INTERVAL: Duration = Duration::from_secs(2);

/// The last etcd TLS reload of this process: 0 none configured, 1 the files
/// in use are the newest (or unchanged), 2 the newest are unusable.
static TLS_RELOAD_STATE: AtomicU8 = AtomicU8::new(0);

/// Whether the last reload of the etcd TLS files succeeded (`None` without
/// etcd TLS files), for `room_allocator_reload_last_success{file="etcd_tls"}`.
pub fn tls_reload_succeeded() -> Option<bool> {
    match TLS_RELOAD_STATE.load(Ordering::Relaxed) {
        0 => None,
        state => Some(state == 1),
    }
}

impl std::fmt::Debug for ConnectOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectOptions")
            .field("endpoints", &self.endpoints)
            .field("user", &self.user)
            .field("ca_pem", &self.ca_pem.as_ref().map(|_| "<pem>"))
            .field(
                "identity_pem",
                &self.identity_pem.as_ref().map(|_| "<redacted>"),
            )
            .field("timeout", &self.timeout)
            .field("tls_files", &self.tls_files)
            .field("password_file", &self.password_file)
            .finish()
    }
}

/// The last read of the etcd password file in this process: 0 none
/// configured, 1 read, 2 unreadable or empty (the last password read stays).
static PASSWORD_RELOAD_STATE: AtomicU8 = AtomicU8::new(0);

/// Whether the last read of `--etcd-password-file` succeeded (`None`
/// without one), for `room_allocator_reload_last_success{file="etcd_password"}`.
pub fn password_reload_succeeded() -> Option<bool> {
    match PASSWORD_RELOAD_STATE.load(Ordering::Relaxed) {
        0 => None,
        state => Some(state == 1),
    }
}

/// Reads an etcd password file: its content without one trailing newline
/// (`echo` and editors add one; a Secret's value usually has none).
pub fn read_password(path: &Path) -> std::io::Result<Secret> {
    let bytes = std::fs::read(path)?;
    let mut text = String::from_utf8(bytes).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "the etcd password file is not UTF-8 text",
        )
    })?;
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    if text.is_empty() {
        // Most likely caught mid-write, or a Secret key that is not set.
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "the etcd password file is empty; write the password into it",
        ));
    }
    Ok(Secret::from(text))
}

/// Who this client is to etcd, and where its password comes from.
struct Credentials {
    name: String,
    /// The password last read (or given), sent at the next authentication.
    password: RwLock<Secret>,
    /// The password etcd last accepted, tried again once if it refuses a
    /// newer one read from the file.
    accepted: RwLock<Option<Secret>>,
    file: Option<PathBuf>,
}

impl Credentials {
    /// Rereads the password file, if any; a failed read keeps the last
    /// password read, logged once per run of failures.
    fn refresh(&self) -> Secret {
        if let Some(path) = &self.file {
            match read_password(path) {
                Ok(password) => {
                    if PASSWORD_RELOAD_STATE.swap(1, Ordering::Relaxed) == 2 {
                        tracing::info!(path = %path.display(), "the etcd password file is readable again");
                    }
                    *self
                        .password
                        .write()
                        .expect("password lock is never poisoned") = password;
                }
                Err(error) => {
                    if PASSWORD_RELOAD_STATE.swap(2, Ordering::Relaxed) != 2 {
                        tracing::warn!(path = %path.display(), %error, "cannot read the etcd password file; authenticating with the last password read until it is fixed");
                    }
                }
            }
        }
        self.password
            .read()
            .expect("password lock is never poisoned")
            .clone()
    }
}

/// A connected etcd client; clones share the connection and the token.
#[derive(Clone)]
pub struct EtcdClient {
    /// Replaced when the TLS files change; calls take the current one.
    channel: Arc<RwLock<Channel>>,
    user: Option<Arc<Credentials>>,
    token: Arc<RwLock<Option<MetadataValue<Ascii>>>>,
}

impl EtcdClient {
    /// Connects to the first endpoint that answers (trying each once), then
    /// spreads calls over all of them; authenticates if a user is given.
    pub async fn connect(options: &ConnectOptions) -> Result<Self, EtcdError> {
        if options.endpoints.is_empty() {
            return Err(EtcdError::config("no etcd endpoint given"));
        }
        let endpoints = options
            .endpoints
            .iter()
            .map(|url| endpoint(url, options))
            .collect::<Result<Vec<_>, _>>()?;
        let mut failure = None;
        let mut reachable = false;
        for (url, endpoint) in options.endpoints.iter().zip(&endpoints) {
            match endpoint.connect().await {
                Ok(_) => {
                    reachable = true;
                    break;
                }
                Err(error) => failure = Some(format!("{url}: {}", cause_chain(&error))),
            }
        }
        if !reachable {
            return Err(EtcdError {
                code: Code::Unavailable,
                message: failure.unwrap_or_default(),
            });
        }
        let client = Self {
            channel: Arc::new(RwLock::new(balanced(endpoints))),
            user: options.user.clone().map(|(name, password)| {
                Arc::new(Credentials {
                    name,
                    password: RwLock::new(password),
                    accepted: RwLock::new(None),
                    file: options.password_file.clone(),
                })
            }),
            token: Arc::default(),
        };
        if let Some(user) = client.user.as_ref().filter(|user| user.file.is_some()) {
            PASSWORD_RELOAD_STATE.store(1, Ordering::Relaxed);
            tokio::spawn(reread_password(Arc::downgrade(user)));
        }
        if let Some(files) = &options.tls_files {
            TLS_RELOAD_STATE.store(1, Ordering::Relaxed);
            tokio::spawn(reload_tls(
                Arc::downgrade(&client.channel),
                options.clone(),
                files.clone(),
            ));
        }
        if client.user.is_some() {
            client.authenticate().await?;
        }
        Ok(client)
    }

    /// The channel in force.
    fn channel(&self) -> Channel {
        self.channel
            .read()
            .expect("channel lock is never poisoned")
            .clone()
    }

    /// Gets a new token with the newest password (rereading the file).
    async fn authenticate(&self) -> Result<(), EtcdError> {
        let Some(user) = &self.user else {
            return Ok(());
        };
        let password = user.refresh();
        let token = match self.token_for(&user.name, &password).await {
            Ok(token) => {
                *user
                    .accepted
                    .write()
                    .expect("password lock is never poisoned") = Some(password);
                token
            }
            Err(error) if error.is_wrong_password() => {
                let accepted = user
                    .accepted
                    .read()
                    .expect("password lock is never poisoned")
                    .clone();
                // The Secret changed before etcd's user did: the old password
                // still works until it does.
                match accepted.filter(|accepted| *accepted != password) {
                    Some(accepted) => {
                        let token = self.token_for(&user.name, &accepted).await?;
                        tracing::warn!(user = %user.name, "etcd refused the password just read from the etcd password file; authenticated with the one it accepted before (change the user's password in etcd to the file's)");
                        token
                    }
                    None => return Err(error),
                }
            }
            Err(error) => return Err(error),
        };
        *self.token.write().expect("token lock is never poisoned") = Some(token);
        Ok(())
    }

    async fn token_for(
        &self,
        name: &str,
        password: &Secret,
    ) -> Result<MetadataValue<Ascii>, EtcdError> {
        let response = AuthClient::new(self.channel())
            .authenticate(pb::AuthenticateRequest {
                name: name.to_owned(),
                password: password.expose().to_owned(),
            })
            .await?
            .into_inner();
        response
            .token
            .parse()
            .map_err(|_| EtcdError::config("etcd sent an auth token that is not ASCII"))
    }

    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(token) = self
            .token
            .read()
            .expect("token lock is never poisoned")
            .clone()
        {
            request.metadata_mut().insert("token", token);
        }
        request
    }

    /// Runs a unary call; once more after authenticating again if etcd
    /// refused the token.
    async fn unary<T, R, F, Fut>(&self, message: T, call: F) -> Result<R, EtcdError>
    where
        T: Clone,
        F: Fn(Channel, Request<T>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<R>, Status>>,
    {
        match call(self.channel(), self.request(message.clone())).await {
            Ok(response) => Ok(response.into_inner()),
            Err(status) => {
                let error = EtcdError::from(status);
                if self.user.is_none() || !error.is_stale_token() {
                    return Err(error);
                }
                self.authenticate().await?;
                Ok(call(self.channel(), self.request(message))
                    .await?
                    .into_inner())
            }
        }
    }

    pub async fn range(&self, request: pb::RangeRequest) -> Result<pb::RangeResponse, EtcdError> {
        self.unary(request, |channel, request| async move {
            KvClient::new(channel).range(request).await
        })
        .await
    }

    pub async fn put(&self, request: pb::PutRequest) -> Result<pb::PutResponse, EtcdError> {
        self.unary(request, |channel, request| async move {
            KvClient::new(channel).put(request).await
        })
        .await
    }

    pub async fn delete(
        &self,
        request: pb::DeleteRangeRequest,
    ) -> Result<pb::DeleteRangeResponse, EtcdError> {
        self.unary(request, |channel, request| async move {
            KvClient::new(channel).delete_range(request).await
        })
        .await
    }

    pub async fn txn(&self, request: pb::TxnRequest) -> Result<pb::TxnResponse, EtcdError> {
        self.unary(request, |channel, request| async move {
            KvClient::new(channel).txn(request).await
        })
        .await
    }

    pub async fn lease_grant(&self, ttl_secs: i64) -> Result<pb::LeaseGrantResponse, EtcdError> {
        let request = pb::LeaseGrantRequest {
            ttl: ttl_secs,
            id: 0,
        };
        self.unary(request, |channel, request| async move {
            LeaseClient::new(channel).lease_grant(request).await
        })
        .await
    }

    pub async fn lease_time_to_live(
        &self,
        id: i64,
    ) -> Result<pb::LeaseTimeToLiveResponse, EtcdError> {
        let request = pb::LeaseTimeToLiveRequest { id, keys: false };
        self.unary(request, |channel, request| async move {
            LeaseClient::new(channel).lease_time_to_live(request).await
        })
        .await
    }

    /// The answering member's status; its `version` is etcd's.
    pub async fn status(&self) -> Result<pb::StatusResponse, EtcdError> {
        self.unary(pb::StatusRequest {}, |channel, request| async move {
            MaintenanceClient::new(channel).status(request).await
        })
        .await
    }

    /// Opens a watch stream: `requests` creates the watch and can ask for
    /// progress (a response carrying the revision the watch has caught up
    /// to). Keep `requests` open for as long as the watch should last: etcd
    /// ends a watch whose client stopped sending.
    pub async fn watch(
        &self,
        requests: tokio::sync::mpsc::Receiver<pb::WatchRequest>,
    ) -> Result<Streaming<pb::WatchResponse>, EtcdError> {
        let requests = tokio_stream::wrappers::ReceiverStream::new(requests);
        let mut client = WatchClient::new(self.channel());
        let mut request = self.request(requests);
        // etcd's key for clientv3.WithRequireLeader: a member without a
        // leader cancels the watch ("no leader") rather than keep it open
        // on a revision the rest of the cluster has moved past.
        request
            .metadata_mut()
            .insert("hasleader", MetadataValue::from_static("true"));
        match client.watch(request).await {
            Ok(response) => Ok(response.into_inner()),
            Err(status) => {
                let error = EtcdError::from(status);
                if self.user.is_some() && error.is_stale_token() {
                    self.authenticate().await?;
                }
                Err(error)
            }
        }
    }

    /// Adds a user (tests and tools set up etcd auth with it).
    pub async fn user_add(&self, name: &str, password: &str) -> Result<(), EtcdError> {
        let request = pb::AuthUserAddRequest {
            name: name.to_owned(),
            password: password.to_owned(),
            options: None,
        };
        self.unary(request, |channel, request| async move {
            AuthClient::new(channel).user_add(request).await
        })
        .await
        .map(drop)
    }

    /// Changes a user's password (tests rotate it with this).
    pub async fn user_change_password(&self, name: &str, password: &str) -> Result<(), EtcdError> {
        let request = pb::AuthUserChangePasswordRequest {
            name: name.to_owned(),
            password: password.to_owned(),
        };
        self.unary(request, |channel, request| async move {
            AuthClient::new(channel).user_change_password(request).await
        })
        .await
        .map(drop)
    }

    pub async fn user_grant_role(&self, user: &str, role: &str) -> Result<(), EtcdError> {
        let request = pb::AuthUserGrantRoleRequest {
            user: user.to_owned(),
            role: role.to_owned(),
        };
        self.unary(request, |channel, request| async move {
            AuthClient::new(channel).user_grant_role(request).await
        })
        .await
        .map(drop)
    }

    pub async fn auth_enable(&self) -> Result<(), EtcdError> {
        self.unary(pb::AuthEnableRequest {}, |channel, request| async move {
            AuthClient::new(channel).auth_enable(request).await
        })
        .await
        .map(drop)
    }
}

/// Rereads the password file every [`TLS_RELOAD_INTERVAL`] until the client
/// is dropped, so `room_allocator_reload_last_success{file="etcd_password"}`
/// shows a broken file before the next authentication needs it.
async fn reread_password(user: Weak<Credentials>) {
    let mut ticker = tokio::time::interval(TLS_RELOAD_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(user) = user.upgrade() else {
            return;
        };
        user.refresh();
    }
}

/// One channel over `endpoints`, dialled lazily.
fn balanced(endpoints: Vec<Endpoint>) -> Channel {
    if endpoints.len() == 1 {
        endpoints[0].connect_lazy()
    } else {
        Channel::balance_list(endpoints.into_iter())
    }
}

/// Rereads the TLS files every [`TLS_RELOAD_INTERVAL`] until the client is
/// dropped; changed files that make a usable TLS setting replace the channel
/// (calls in flight finish on the old one), unusable ones are logged and the
/// old channel stays.
async fn reload_tls(channel: Weak<RwLock<Channel>>, mut options: ConnectOptions, files: TlsFiles) {
    let mut last = (options.ca_pem.clone(), options.identity_pem.clone());
    let mut ticker = tokio::time::interval(TLS_RELOAD_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(current) = channel.upgrade() else {
            return;
        };
        let pem = match files.read() {
            Ok(pem) => pem,
            Err(error) => {
                // Mid-swap, or gone: try again next tick.
                if TLS_RELOAD_STATE.swap(2, Ordering::Relaxed) != 2 {
                    tracing::error!(%error, "cannot read the etcd TLS files; keeping the connection settings in use");
                }
                continue;
            }
        };
        if pem == last {
            continue;
        }
        (options.ca_pem, options.identity_pem) = pem.clone();
        let built = options
            .endpoints
            .iter()
            .map(|url| endpoint(url, &options))
            .collect::<Result<Vec<_>, _>>();
        match built {
            Ok(endpoints) => {
                *current.write().expect("channel lock is never poisoned") = balanced(endpoints);
                TLS_RELOAD_STATE.store(1, Ordering::Relaxed);
                tracing::info!("reloaded the etcd TLS files; new calls use them");
            }
            Err(error) => {
                TLS_RELOAD_STATE.store(2, Ordering::Relaxed);
                tracing::error!(%error, "the new etcd TLS files are unusable; keeping the previous ones");
            }
        }
        last = pem;
    }
}

fn endpoint(url: &str, options: &ConnectOptions) -> Result<Endpoint, EtcdError> {
    let tls = options.ca_pem.is_some() || options.identity_pem.is_some();
    let url = match (url.split_once("://"), tls) {
        (Some(("http", rest)), true) => format!("https://{rest}"),
        (Some(_), _) => url.to_owned(),
        (None, true) => format!("https://{url}"),
        (None, false) => format!("http://{url}"),
    };
    let mut endpoint = Endpoint::from_shared(url.clone())
        .map_err(|error| {
            EtcdError::config(format!(
                "{url:?} is not an etcd endpoint URL ({error}); use e.g. http://127.0.0.1:2379"
            ))
        })?
        .connect_timeout(options.timeout)
        .timeout(options.timeout)
        .tcp_nodelay(true)
        // A connection that died silently (a partition) is noticed and redialled.
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(options.timeout)
        .keep_alive_while_idle(true);
    if url.starts_with("https://") {
        let mut config = ClientTlsConfig::new();
        if let Some(ca) = &options.ca_pem {
            config = config.ca_certificate(Certificate::from_pem(ca));
        }
        if let Some((cert, key)) = &options.identity_pem {
            config = config.identity(Identity::from_pem(cert, key));
        }
        endpoint = endpoint.tls_config(config).map_err(|error| {
            EtcdError::config(format!("bad etcd TLS settings: {}", cause_chain(&error)))
        })?;
    }
    Ok(endpoint)
}

/// `prefix`'s range end: the keys that start with it are `[prefix, end)`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff: every key from the prefix on.
    vec![0]
}

/// Builders for the compares and operations of a transaction.
pub mod txn {
    use super::pb;
    use super::pb::compare::{CompareResult, CompareTarget, TargetUnion};

    /// `key` still has `mod_revision` (0: it still does not exist).
    pub fn unchanged_since(key: &str, mod_revision: i64) -> pb::Compare {
        if mod_revision == 0 {
            none_in(key, Vec::new())
        } else {
            pb::Compare {
                result: CompareResult::Equal as i32,
                target: CompareTarget::Mod as i32,
                key: key.as_bytes().to_vec(),
                range_end: Vec::new(),
                target_union: Some(TargetUnion::ModRevision(mod_revision)),
            }
        }
    }

    /// No key in `key..range_end` exists (an empty end: `key` alone).
    pub fn none_in(key: &str, range_end: Vec<u8>) -> pb::Compare {
        pb::Compare {
            result: CompareResult::Equal as i32,
            target: CompareTarget::Create as i32,
            key: key.as_bytes().to_vec(),
            range_end,
            target_union: Some(TargetUnion::CreateRevision(0)),
        }
    }

    /// `key` holds exactly `value`.
    pub fn value_is(key: &str, value: &str) -> pb::Compare {
        pb::Compare {
            result: CompareResult::Equal as i32,
            target: CompareTarget::Value as i32,
            key: key.as_bytes().to_vec(),
            range_end: Vec::new(),
            target_union: Some(TargetUnion::Value(value.as_bytes().to_vec())),
        }
    }

    pub fn put(key: &str, value: impl Into<Vec<u8>>, lease: i64) -> pb::RequestOp {
        pb::RequestOp {
            request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
                key: key.as_bytes().to_vec(),
                value: value.into(),
                lease,
                prev_kv: false,
            })),
        }
    }

    pub fn get(key: &str) -> pb::RequestOp {
        pb::RequestOp {
            request: Some(pb::request_op::Request::RequestRange(pb::RangeRequest {
                key: key.as_bytes().to_vec(),
                ..Default::default()
            })),
        }
    }

    /// The last key in `key..range_end` (etcd sorts what the range holds).
    pub fn last_in(key: Vec<u8>, range_end: Vec<u8>) -> pb::RequestOp {
        get_range(pb::RangeRequest {
            key,
            range_end,
            limit: 1,
            sort_order: pb::range_request::SortOrder::Descend as i32,
            sort_target: pb::range_request::SortTarget::Key as i32,
            ..Default::default()
        })
    }

    pub fn get_range(request: pb::RangeRequest) -> pb::RequestOp {
        pb::RequestOp {
            request: Some(pb::request_op::Request::RequestRange(request)),
        }
    }

    pub fn delete(key: &str) -> pb::RequestOp {
        pb::RequestOp {
            request: Some(pb::request_op::Request::RequestDeleteRange(
                pb::DeleteRangeRequest {
                    key: key.as_bytes().to_vec(),
                    ..Default::default()
                },
            )),
        }
    }

    /// The key-values a transaction's range operations read, in order.
    pub fn ranges(response: &pb::TxnResponse) -> Vec<&pb::RangeResponse> {
        response
            .responses
            .iter()
            .filter_map(|op| match &op.response {
                Some(pb::response_op::Response::ResponseRange(range)) => Some(range),
                _ => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_file_loses_one_trailing_newline_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("password");
        for (content, password) in [
            ("s3cret", "s3cret"),
            ("s3cret\n", "s3cret"),
            ("s3cret\r\n", "s3cret"),
            ("s3cret\n\n", "s3cret\n"),
            (" s3cret ", " s3cret "),
        ] {
            std::fs::write(&path, content).expect("write");
            let read = read_password(&path).expect("a password");
            assert_eq!(read.expose(), password, "{content:?}");
        }
        for content in ["", "\n"] {
            std::fs::write(&path, content).expect("write");
            let error = read_password(&path).expect_err("empty");
            assert!(error.to_string().contains("empty"), "{error}");
        }
        std::fs::write(&path, [0xff, 0xfe]).expect("write");
        assert!(read_password(&path).is_err(), "not UTF-8");
        assert!(read_password(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn a_prefix_ends_where_its_last_byte_rolls_over() {
        assert_eq!(prefix_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }
}
