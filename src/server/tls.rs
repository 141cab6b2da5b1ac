//! TLS on the gRPC port: the certificate, key and client CA files
//! (`--tls-cert`, `--tls-key`, `--tls-client-ca`), the rustls config built
//! from them, their reload while serving, and the handshakes.
//!
//! The files are reread every [`RELOAD_INTERVAL`](super::RELOAD_INTERVAL):
//! a changed set that builds a usable config replaces the one in force for
//! new connections (a rotated Secret is in use within seconds, no restart);
//! an unusable one is logged and counted, and the old config stays. A client
//! certificate must name one of `--tls-client-allowed-names` when they are
//! given; the check runs after the handshake, against the verified chain.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_rustls::rustls;
use tracing::{error, info, warn};

use crate::metrics::Metrics;

use super::config::{read_file, StartError};

/// A TLS handshake that takes longer is dropped (a stalled client must not
/// hold a connection slot).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The TLS files, as flags name them.
#[derive(Debug, Clone)]
pub(super) struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
    /// `--tls-client-allowed-names`: empty allows every client the CA signed.
    pub allowed_names: Vec<rustls::pki_types::ServerName<'static>>,
}

impl TlsFiles {
    pub(super) fn read(&self) -> Result<TlsMaterial, StartError> {
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
pub(super) struct TlsMaterial {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

impl TlsMaterial {
    /// A rustls server config: the certificate must parse and match the key,
    /// the client CA (mutual TLS) must hold a usable certificate.
    pub(super) fn config(&self) -> Result<Arc<rustls::ServerConfig>, StartError> {
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

/// The TLS setup in force, swapped when the files change.
pub(super) struct Tls {
    files: TlsFiles,
    current: RwLock<(TlsMaterial, Arc<rustls::ServerConfig>)>,
}

impl Tls {
    pub fn new(files: TlsFiles, material: TlsMaterial, config: Arc<rustls::ServerConfig>) -> Self {
        Self {
            files,
            current: RwLock::new((material, config)),
        }
    }
}

/// Rereads the TLS files every [`RELOAD_INTERVAL`](super::RELOAD_INTERVAL);
/// a changed set that builds a usable config replaces the old one for new
/// connections, a bad one is logged and counted and the old one stays.
pub(super) async fn reload(tls: Arc<Tls>, metrics: Arc<Metrics>) {
    let mut last_attempt = Some(
        tls.current
            .read()
            .expect("tls lock is never poisoned")
            .0
            .clone(),
    );
    let mut ticker = tokio::time::interval(super::RELOAD_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        match tls.files.read() {
            Ok(material) if Some(&material) != last_attempt.as_ref() => {
                last_attempt = Some(material.clone());
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
                if last_attempt.take().is_some() {
                    metrics.reloads.get(&["tls", "failure"]).inc();
                    error!(%error, "cannot read the TLS files; keeping the previous certificate");
                }
            }
        }
    }
}

/// Accepts TCP connections and completes TLS handshakes with the config in
/// force at that moment, feeding finished connections to the server.
pub(super) async fn accept(
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
