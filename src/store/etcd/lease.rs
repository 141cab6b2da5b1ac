//! etcd leases: the bucket lease range records and chunk announcements are
//! put with (one lease per `bucket` of reservations, TTL `2 * retention +
//! bucket`), the longest lease a worker's ranges have (so a deregistration
//! outlives them), and attaching 0.1's unleased range records to a lease.
//!
//! Invariants: a range record's lease outlives the retention twice over, so
//! every room resolves for at least `retention` after its range stops
//! serving; a lease etcd no longer has is forgotten, never reused.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::calls::get;
use super::client::{pb, prefix_end, txn};
use super::keys::range_record;
use super::{Shared, MAX_BATCH, PAGE_KEYS};
use crate::failpoint;
use crate::store::StoreError;

/// The lease ranges reserved now are attached to.
#[derive(Debug, Clone, Copy)]
pub(super) struct BucketLease {
    pub(super) id: i64,
    pub(super) granted_at: Instant,
}

impl Shared {
    /// The lease for records put now: reused for `bucket`, then a new one.
    pub(super) async fn bucket_lease(&self) -> Result<i64, StoreError> {
        let mut lease = self.lease.lock().await;
        if let Some(current) = *lease {
            if current.granted_at.elapsed() < self.bucket {
                return Ok(current.id);
            }
        }
        let granted_at = Instant::now();
        let granted = self
            .timed(
                "grant a lease",
                self.client
                    .lease_grant(lease_ttl_secs(self.retention, self.bucket)),
            )
            .await?;
        failpoint!(
            "etcd::lease_granted",
            StoreError::Injected("etcd::lease_granted")
        );
        *lease = Some(BucketLease {
            id: granted.id,
            granted_at,
        });
        Ok(granted.id)
    }

    /// Forgets a lease etcd no longer has (it expired while unused).
    pub(super) async fn drop_lease(&self, id: i64) {
        let mut lease = self.lease.lock().await;
        if lease.is_some_and(|l| l.id == id) {
            *lease = None;
        }
    }
}

/// Lease TTL for ranges: twice the retention, plus the bucket a lease serves.
pub(super) fn lease_ttl_secs(retention: Duration, bucket: Duration) -> i64 {
    let ttl = (retention * 2 + bucket).as_secs_f64().ceil();
    // Far below i64::MAX seconds: retention is parsed from a u64 of seconds.
    ttl.min(9.0e18) as i64
}

/// How long one lease serves reservations.
pub(super) fn bucket_for(retention: Duration) -> Duration {
    (retention / 8).clamp(Duration::from_secs(1), Duration::from_secs(3600))
}

/// What [`longest_range_lease_secs`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct LongestLease {
    /// The longest remaining TTL, in seconds (0 if none).
    pub(super) ttl_secs: i64,
    /// The revision the range keys were read at.
    pub(super) read_at: i64,
}

/// The longest remaining TTL of the leases `worker`'s ranges written after
/// revision `after` have: one read of the range keys (deregistrations are
/// rare), then one lease query per distinct lease (one per bucket and
/// replica).
pub(super) async fn longest_range_lease_secs(
    shared: &Shared,
    worker: &str,
    after: i64,
) -> Result<LongestLease, StoreError> {
    let ranges = shared.keys.ranges();
    let end = prefix_end(ranges.as_bytes());
    let mut from = ranges.clone().into_bytes();
    let mut revision = 0;
    let mut leases = HashSet::new();
    loop {
        let page = shared
            .timed(
                "read the worker's ranges",
                shared.client.range(pb::RangeRequest {
                    key: from.clone(),
                    range_end: end.clone(),
                    limit: PAGE_KEYS,
                    revision,
                    min_mod_revision: if after > 0 { after + 1 } else { 0 },
                    ..Default::default()
                }),
            )
            .await?;
        if revision == 0 {
            revision = page.header.as_ref().map_or(0, |h| h.revision);
        }
        for kv in &page.kvs {
            let owner = range_record(&ranges, kv);
            if kv.lease != 0 && owner.is_some_and(|owner| &*owner.prefill_worker == worker) {
                leases.insert(kv.lease);
            }
        }
        if let Some(last) = page.kvs.last() {
            from = last.key.clone();
            from.push(0);
        }
        if !page.more {
            break;
        }
    }
    let mut longest = 0;
    for lease in leases {
        let remaining = shared
            .timed(
                "read a range lease's TTL",
                shared.client.lease_time_to_live(lease),
            )
            .await?;
        longest = longest.max(remaining.ttl);
    }
    Ok(LongestLease {
        ttl_secs: longest,
        read_at: revision,
    })
}

/// A range record written without a lease (by a 0.1 replica).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct UnleasedRange {
    pub(super) key: String,
}

/// Keys a sweep reads per call, at most (keys only: far below gRPC's 4 MiB).
const SWEEP_PAGE: i64 = 5000;
/// The sweep's first window, in numbers: 16,384 of the smallest ranges.
const SWEEP_FIRST_WIDTH: u64 = 1 << 24;
/// How much a sweep window widens while it holds few keys, and narrows
/// when it held more than a page.
const SWEEP_GROWTH: u64 = 16;
/// A pause between the sweep's reads, so it never loads etcd much.
const SWEEP_PAUSE: Duration = Duration::from_millis(10);

/// Finds the range records written without a lease (by 0.1 replicas, which
/// pruned by their own clocks) and attaches them to one, so etcd expires
/// them too; then writes `v1/ranges_leased`, so later starts skip this.
/// Runs in the background once per prefix (a new space gets the key with
/// its mark): start-up never reads the range records. So a 0.1 replica
/// still running after the sweep leaves its new records unleased: replace
/// every 0.1 replica before the first of this version starts.
///
/// The records are read keys only, in windows of the number space that
/// hold about a page each (etcd 3.4 visits every key of a read's window
/// whatever its limit, so paging through the whole prefix would visit
/// the records quadratically often). A failed call starts the sweep over
/// in 5 s; records leased already are skipped.
pub(super) async fn sweep_unleased(shared: Arc<Shared>) {
    loop {
        match sweep_once(&shared).await {
            Ok(leased) => {
                info!(
                    leased,
                    "every range record expires by lease (range records of an older version leased)"
                );
                return;
            }
            Err(error) => {
                warn!(%error, "attaching old range records to a lease failed; retrying");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    }
}

async fn sweep_once(shared: &Shared) -> Result<usize, StoreError> {
    let keys = &shared.keys;
    let prefix = keys.ranges();
    let prefix_end = prefix_end(prefix.as_bytes());
    let mut leased = 0;
    let mut low: u64 = 0;
    let mut width = SWEEP_FIRST_WIDTH;
    loop {
        let high = low.checked_add(width);
        // The first window starts at the prefix, the last ends at its end:
        // keys that are not canonical starts are swept too.
        let mut from = match low {
            0 => prefix.clone().into_bytes(),
            _ => keys.range(low).into_bytes(),
        };
        let end = high.map_or_else(|| prefix_end.clone(), |high| keys.range(high).into_bytes());
        let mut pages = 0;
        let mut seen = 0;
        loop {
            let page = shared
                .timed(
                    "read the range keys",
                    shared.client.range(pb::RangeRequest {
                        key: from.clone(),
                        range_end: end.clone(),
                        limit: SWEEP_PAGE,
                        keys_only: true,
                        ..Default::default()
                    }),
                )
                .await?;
            pages += 1;
            seen += page.kvs.len();
            // A key that is not UTF-8 is no record any version wrote.
            let unleased: Vec<UnleasedRange> = page
                .kvs
                .iter()
                .filter(|kv| kv.lease == 0)
                .filter_map(|kv| String::from_utf8(kv.key.clone()).ok())
                .map(|key| UnleasedRange { key })
                .collect();
            for batch in unleased.chunks(MAX_BATCH) {
                leased += lease_unleased(shared, batch).await?;
            }
            tokio::time::sleep(SWEEP_PAUSE).await;
            match page.kvs.last() {
                Some(last) if page.more => {
                    from = last.key.clone();
                    from.push(0);
                }
                _ => break,
            }
        }
        let Some(high) = high else {
            break;
        };
        low = high;
        if pages > 1 {
            width = (width / SWEEP_GROWTH).max(1);
        } else if seen < (SWEEP_PAGE as usize) / (SWEEP_GROWTH as usize) {
            width = width.saturating_mul(SWEEP_GROWTH);
        }
    }
    shared
        .timed(
            "write v1/ranges_leased",
            shared.client.txn(pb::TxnRequest {
                compare: Vec::new(),
                success: vec![txn::put(&keys.ranges_leased(), "1", 0)],
                failure: Vec::new(),
            }),
        )
        .await?;
    Ok(leased)
}

/// Attaches `keys` to the current bucket lease where they still have none
/// (read again, then compare-and-put each); returns how many it leased.
async fn lease_unleased(shared: &Shared, keys: &[UnleasedRange]) -> Result<usize, StoreError> {
    let lease = shared.bucket_lease().await?;
    let mut ops = Vec::new();
    for UnleasedRange { key } in keys {
        let current = shared
            .timed("read a range", shared.client.range(get(key)))
            .await?;
        let Some(kv) = current.kvs.first() else {
            continue;
        };
        if kv.lease == 0 {
            ops.push((key.clone(), kv.value.clone(), kv.mod_revision));
        }
    }
    let leased = ops.len();
    for (key, value, revision) in ops {
        let request = pb::TxnRequest {
            compare: vec![txn::unchanged_since(&key, revision)],
            success: vec![txn::put(&key, value, lease)],
            failure: Vec::new(),
        };
        let response = shared
            .timed("lease a range", shared.client.txn(request))
            .await?;
        failpoint!(
            "etcd::range_leased",
            StoreError::Injected("etcd::range_leased")
        );
        if !response.succeeded {
            // Rewritten meanwhile (by a 0.1 replica): the sweep starts over.
            return Err(StoreError::Etcd {
                operation: "lease a range",
                message: format!("{key} changed while it was being leased"),
            });
        }
    }
    Ok(leased)
}
