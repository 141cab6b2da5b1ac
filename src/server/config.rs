//! What the server is configured with, and the checks a start makes before
//! it opens the store or binds a port (`serve --check-config` runs exactly
//! these).
//!
//! [`ServerConfig`] is plain data: `main` builds it from the flags
//! (`ServeArgs::server_config`), so the server never sees clap's types and a
//! test or a benchmark can build one directly. Every [`StartError`] names the
//! flag it comes from, because the operator fixes a flag, not a field.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio_rustls::rustls;

use crate::space::{Bounds, SpaceError};
use crate::store::{EtcdConfig, OpenError};

use super::tls::{TlsFiles, TlsMaterial};
use super::token::read_token;

/// Everything [`Server::open`](super::Server::open) and
/// [`Server::serve`](super::Server::serve) need from the operator.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// `--min-room`/`--max-room`: the part of the space this deployment hands out.
    pub bounds: Bounds,
    pub store: StoreConfig,
    /// `--max-workers`.
    pub max_workers: usize,
    /// `--store-timeout-secs`: bound on every store operation.
    pub store_timeout: Duration,
    /// `--retention`.
    pub retention: Duration,
    /// `--drain-delay-secs`.
    pub drain_delay: Duration,
    /// `--drain-timeout-secs`.
    pub drain_timeout: Duration,
    /// `--request-timeout-secs`.
    pub request_timeout: Duration,
    /// `--max-connection-age-secs`.
    pub max_connection_age: Duration,
    /// `--max-connection-age-grace-secs`.
    pub max_connection_age_grace: Duration,
    /// `--max-concurrent-requests`.
    pub max_concurrent_requests: usize,
    /// TLS on the gRPC port; `None` serves plaintext.
    pub tls: Option<TlsConfig>,
    /// The bearer token; `None` lets every caller in.
    pub auth: Option<AuthConfig>,
}

/// Where the rooms are kept.
#[derive(Debug, Clone)]
pub enum StoreConfig {
    /// `--data-dir`: the embedded store, one server per directory.
    Embedded { data_dir: PathBuf },
    /// `--etcd-endpoints` and the other `--etcd-*` flags; built with the
    /// same bounds, store timeout and retention as the [`ServerConfig`].
    Etcd(Box<EtcdConfig>),
}

/// `--tls-cert`, `--tls-key`, `--tls-client-ca`, `--tls-client-allowed-names`.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Mutual TLS: clients must present a certificate this CA signed.
    pub client_ca: Option<PathBuf>,
    /// With a client CA, the names one of which a client certificate must
    /// carry; empty allows every client the CA signed.
    pub client_allowed_names: Vec<String>,
}

/// `--auth-token-file` and `--allow-unauthenticated-allocation`.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub token_file: PathBuf,
    /// Calls that only hand out or read rooms need no token.
    pub allow_unauthenticated_allocation: bool,
}

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

pub(super) fn read_file(flag: &'static str, path: &Path) -> Result<Vec<u8>, StartError> {
    std::fs::read(path).map_err(|cause| StartError::Read {
        flag,
        path: path.to_path_buf(),
        cause,
    })
}

/// Everything a start needs that can be checked without opening the store
/// or binding a port.
pub(super) struct Checked {
    pub tls: Option<(TlsFiles, TlsMaterial, Arc<rustls::ServerConfig>)>,
    pub token: Option<Vec<String>>,
}

pub(super) fn check(config: &ServerConfig) -> Result<Checked, StartError> {
    let tls = match &config.tls {
        Some(tls) => {
            let allowed_names = tls
                .client_allowed_names
                .iter()
                .map(|name| {
                    rustls::pki_types::ServerName::try_from(name.trim().to_owned())
                        .map_err(|_| StartError::AllowedName { name: name.clone() })
                })
                .collect::<Result<_, _>>()?;
            let files = TlsFiles {
                cert: tls.cert.clone(),
                key: tls.key.clone(),
                client_ca: tls.client_ca.clone(),
                allowed_names,
            };
            let material = files.read()?;
            let server_config = material.config()?;
            Some((files, material, server_config))
        }
        None => None,
    };
    let token = config
        .auth
        .as_ref()
        .map(|auth| read_token(&auth.token_file))
        .transpose()?;
    match &config.store {
        StoreConfig::Embedded { data_dir } => {
            if data_dir.exists() && !data_dir.is_dir() {
                return Err(StartError::DataDirNotDir {
                    path: data_dir.clone(),
                });
            }
        }
        StoreConfig::Etcd(etcd) => {
            for endpoint in &etcd.endpoints {
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
            if etcd.cert.is_some() != etcd.key.is_some() {
                return Err(StartError::EtcdIdentity);
            }
            for (flag, path) in [
                ("--etcd-ca", &etcd.ca),
                ("--etcd-cert", &etcd.cert),
                ("--etcd-key", &etcd.key),
            ] {
                if let Some(path) = path {
                    read_file(flag, path)?;
                }
            }
        }
    }
    Ok(Checked { tls, token })
}

/// Validates `config` as a start would, without opening the store or
/// binding a port (`serve --check-config`).
pub fn check_config(config: &ServerConfig) -> Result<(), StartError> {
    check(config).map(drop)
}
