//! Bounded etcd calls: every call a replica makes ends within its timeout,
//! with a `StoreError` (serving) or an `OpenError` (start-up and tools) that
//! names the operation; and connecting, which refuses an etcd too old to
//! answer watch progress requests (see the store's docs on etcd versions).
//!
//! Invariant: no etcd call here waits unbounded; a timeout is an error of
//! unknown outcome to its caller, never a success.

use std::time::Duration;

use super::client::{pb, txn, EtcdClient, EtcdError};
use super::EtcdConfig;
use crate::store::{OpenError, StoreError};
use tracing::info;

pub(super) fn etcd_error(operation: &'static str, error: EtcdError) -> StoreError {
    StoreError::Etcd {
        operation,
        message: error.to_string(),
    }
}

/// Runs an etcd call within `timeout`.
pub(super) async fn timed<T>(
    timeout: Duration,
    operation: &'static str,
    call: impl std::future::Future<Output = Result<T, EtcdError>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(timeout, call).await {
        Ok(result) => result.map_err(|error| etcd_error(operation, error)),
        Err(_) => Err(StoreError::Timeout {
            operation,
            after: timeout,
        }),
    }
}

/// The error a failpoint injects into a start-up or tool call.
#[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
pub(super) fn injected(config: &EtcdConfig, name: &str) -> OpenError {
    OpenError::Etcd {
        endpoints: config.endpoints.join(","),
        message: format!("failpoint {name}"),
    }
}

/// The mod revision of `key` as a transaction read it.
pub(super) fn revision_of(response: &pb::TxnResponse, key: &str) -> Result<i64, StoreError> {
    txn::ranges(response)
        .last()
        .and_then(|range| range.kvs.first())
        .map(|kv| kv.mod_revision)
        .ok_or_else(|| StoreError::Corrupt {
            key: key.to_owned(),
            reason: "it vanished right after it was written".into(),
        })
}

pub(super) fn get(key: &str) -> pb::RangeRequest {
    pb::RangeRequest {
        key: key.as_bytes().to_vec(),
        ..Default::default()
    }
}

/// Runs an etcd call at start-up: bounded, and failures are `OpenError`s.
pub(super) async fn etcd_call<T>(
    config: &EtcdConfig,
    call: impl std::future::Future<Output = Result<T, EtcdError>>,
) -> Result<T, OpenError> {
    let endpoints = config.endpoints.join(",");
    match tokio::time::timeout(config.timeout, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(OpenError::Etcd {
            endpoints,
            message: error.to_string(),
        }),
        Err(_) => Err(OpenError::EtcdTimeout {
            endpoints,
            after: config.timeout,
        }),
    }
}

/// Connects, and refuses an etcd too old to confirm a replica's view.
pub(super) async fn connect(config: &EtcdConfig) -> Result<EtcdClient, OpenError> {
    let options = config.connect_options()?;
    let client = etcd_call(config, EtcdClient::connect(&options)).await?;
    let status = etcd_call(config, client.status()).await?;
    if !version_supported(&status.version) {
        return Err(OpenError::EtcdVersion {
            endpoints: config.endpoints.join(","),
            version: status.version,
        });
    }
    info!(etcd_version = %status.version, "connected to etcd");
    Ok(client)
}

/// The oldest etcd (major, minor) that answers watch progress requests.
pub(super) const MIN_ETCD_VERSION: (u32, u32) = (3, 4);

/// Whether etcd `version` ("3.4.23") is at least [`MIN_ETCD_VERSION`].
pub(super) fn version_supported(version: &str) -> bool {
    let mut parts = version.split('.').map(str::parse::<u32>);
    match (parts.next(), parts.next()) {
        (Some(Ok(major)), Some(Ok(minor))) => (major, minor) >= MIN_ETCD_VERSION,
        _ => false,
    }
}

#[cfg(test)]
mod version_tests {
    #[test]
    fn etcd_from_3_4_on_is_supported() {
        for (version, supported) in [
            ("3.4.23", true),
            ("3.5.17", true),
            ("3.6.0", true),
            ("4.0.0", true),
            ("3.3.27", false),
            ("2.3.8", false),
            ("", false),
            ("three", false),
        ] {
            assert_eq!(super::version_supported(version), supported, "{version:?}");
        }
    }
}
