//! The fleet's retention: one setting in etcd (`v1/config/retention_ms`),
//! written by the first replica of a prefix, honoured by every later one,
//! changed by `room-allocator retention --set`.
//!
//! Invariant: a retention above [`MAX_RETENTION`] is refused wherever it is
//! set or read, so every range lease TTL (`2 * retention + bucket`) stays
//! within etcd's maximum and every grant can succeed.

use std::time::Duration;

use tracing::{info, warn};

use super::calls::{connect, etcd_call, get, injected};
use super::client::{pb, txn, EtcdClient};
use super::keys::{parse_decimal, Keys};
use super::{EtcdConfig, Shared};
use crate::failpoint;
use crate::store::{OpenError, StoreError};

/// etcd's longest lease TTL (`MaxLeaseTTL` in etcd's lessor): a grant above
/// it fails ("too large lease TTL").
pub(super) const MAX_LEASE_TTL_SECS: u64 = 9_000_000_000;
/// The longest retention, as `--retention` and `retention --set` spell it.
pub(super) const MAX_RETENTION_FLAG: &str = "50000d";
/// The longest retention: a range's lease TTL, `2 * retention + bucket` (the
/// bucket at most an hour), must fit etcd's [`MAX_LEASE_TTL_SECS`].
pub const MAX_RETENTION: Duration = Duration::from_secs(50_000 * 86_400);
const _: () = assert!(2 * MAX_RETENTION.as_secs() + 3600 <= MAX_LEASE_TTL_SECS);

/// Refuses a retention whose range leases etcd could not grant.
pub(super) fn check_retention(retention: Duration, setting: &'static str) -> Result<(), OpenError> {
    if retention > MAX_RETENTION {
        return Err(OpenError::RetentionTooLong {
            setting,
            retention_secs: retention.as_secs(),
            max: MAX_RETENTION_FLAG,
        });
    }
    Ok(())
}

/// The fleet's retention as etcd holds it now (zero if it holds none).
pub(super) async fn fleet_retention_now(shared: &Shared) -> Result<Duration, StoreError> {
    let key = shared.keys.retention();
    let stored = shared
        .timed("read the fleet's retention", shared.client.range(get(&key)))
        .await?;
    match stored.kvs.first() {
        Some(kv) => parse_decimal(&kv.value)
            .map(Duration::from_millis)
            .ok_or_else(|| StoreError::Corrupt {
                key,
                reason: "not a decimal number of milliseconds".into(),
            }),
        None => Ok(Duration::ZERO),
    }
}

/// Settles the fleet's retention: the one etcd holds wins; the first replica
/// of a prefix writes its own.
pub(super) async fn fleet_retention(
    client: &EtcdClient,
    keys: &Keys,
    config: &EtcdConfig,
) -> Result<Duration, OpenError> {
    check_retention(config.retention, "--retention")?;
    let key = keys.retention();
    let endpoints = config.endpoints.join(",");
    let wanted = u64::try_from(config.retention.as_millis()).unwrap_or(u64::MAX);
    for _ in 0..3 {
        let stored = etcd_call(config, client.range(get(&key))).await?;
        if let Some(kv) = stored.kvs.first() {
            let stored_ms = parse_decimal(&kv.value).ok_or_else(|| OpenError::CorruptKey {
                key: key.clone(),
                reason: "not a decimal number of milliseconds".into(),
            })?;
            // Set by a version that did not bound it: every lease grant
            // would fail, so refuse to start rather than serve nothing.
            check_retention(
                Duration::from_millis(stored_ms),
                "the fleet's retention in etcd",
            )?;
            if stored_ms != wanted {
                warn!(
                    fleet_retention_secs = stored_ms as f64 / 1000.0,
                    flag_retention_secs = config.retention.as_secs_f64(),
                    "--retention differs from the fleet's retention in etcd; using the fleet's (change it with `room-allocator retention --set`)"
                );
            }
            return Ok(Duration::from_millis(stored_ms));
        }
        let request = pb::TxnRequest {
            compare: vec![txn::unchanged_since(&key, 0)],
            success: vec![txn::put(&key, wanted.to_string(), 0)],
            failure: Vec::new(),
        };
        let written = etcd_call(config, client.txn(request)).await?;
        failpoint!(
            "etcd::fleet_retention_written",
            injected(config, "etcd::fleet_retention_written")
        );
        if written.succeeded {
            info!(
                retention_secs = config.retention.as_secs_f64(),
                "set the fleet's retention in etcd"
            );
            return Ok(config.retention);
        }
    }
    Err(OpenError::Etcd {
        endpoints,
        message: "the retention key keeps changing; is another tool rewriting it?".into(),
    })
}

/// Shows, or with `new` sets, the fleet's retention in etcd; returns it.
/// Replicas take a new value when they start.
pub async fn retention(config: &EtcdConfig, new: Option<Duration>) -> Result<Duration, OpenError> {
    if let Some(new) = new {
        check_retention(new, "retention --set")?;
    }
    let client = connect(config).await?;
    let keys = Keys::new(&config.prefix);
    let key = keys.retention();
    if let Some(new) = new {
        let ms = u64::try_from(new.as_millis()).unwrap_or(u64::MAX);
        etcd_call(
            config,
            client.put(pb::PutRequest {
                key: key.clone().into_bytes(),
                value: ms.to_string().into_bytes(),
                lease: 0,
                prev_kv: false,
            }),
        )
        .await?;
        failpoint!(
            "etcd::retention_set",
            injected(config, "etcd::retention_set")
        );
        return Ok(new);
    }
    let stored = etcd_call(config, client.range(get(&key))).await?;
    match stored.kvs.first() {
        Some(kv) => parse_decimal(&kv.value)
            .map(Duration::from_millis)
            .ok_or_else(|| OpenError::CorruptKey {
                key,
                reason: "not a decimal number of milliseconds".into(),
            }),
        None => Ok(config.retention),
    }
}
