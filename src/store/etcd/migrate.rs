//! `migrate`: moving an embedded store's state into etcd so that no room
//! issued before is issued again.
//!
//! Invariants: refused if etcd holds ranges or chunks below the embedded
//! store's high-water mark (both stores may have issued those numbers); the
//! mark is raised first (compare-and-swap, never lowered), then the records
//! are copied; safe to run again.

use std::collections::HashSet;

use super::calls::etcd_call;
use super::carver::Mark;
use super::client::{pb, txn};
use super::keys::AnnouncedChunk;
use super::keys::{encode_range, encode_worker};
use super::lease::{bucket_for, lease_ttl_secs};
use super::retention::fleet_retention;
use super::snapshot::{connect_and_load, Load, Loaded};
use super::EtcdConfig;
use crate::failpoint;
use crate::space::Room;
use crate::store::{OpenError, Snapshot};

/// What `migrate` moved into etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportReport {
    pub high_water: u64,
    pub ranges: usize,
    pub workers: usize,
}

/// Whether `embedded` can be moved into etcd: refused if etcd holds ranges
/// or chunks below the embedded store's high-water mark (both stores issued,
/// or may issue, those numbers). Writes nothing, so `migrate` checks before
/// it marks the data dir.
pub async fn check_import(config: &EtcdConfig, embedded: &Snapshot) -> Result<(), OpenError> {
    check_conflicts(&connect_and_load(config, Load::Everything).await?, embedded)
}

pub(super) fn check_conflicts(loaded: &Loaded, embedded: &Snapshot) -> Result<(), OpenError> {
    let Loaded {
        keys,
        snapshot: existing,
        chunks,
        ..
    } = loaded;
    // Every number below the embedded store's mark counts as issued, not
    // only its ranges: ranges pruned by retention (and gaps between ranges)
    // held rooms too, which callers may still hold.
    let used_end = embedded.high_water;
    // Chunks replicas took first (a chunk holds the ranges carved from it,
    // so it names the wider conflict): they issued, or may still issue,
    // rooms anywhere in them.
    if let Some(&AnnouncedChunk { start, end }) = chunks.iter().find(|chunk| chunk.start < used_end)
    {
        return Err(OpenError::CorruptKey {
            key: keys.chunk(start),
            reason: format!(
                "a replica took {start}..{end} of the space, below the embedded store's high-water mark {used_end} (every number below it was issued, or pruned after it was); both may have issued those numbers (or a replica is running), so refusing to merge them"
            ),
        });
    }

    // Ranges in etcd, unless one is the embedded store's own (a rerun).
    for owner in existing.ranges.iter() {
        // The same range as the embedded store's is a rerun's own copy.
        let rerun = Room::try_new(owner.range.start())
            .ok()
            .and_then(|start| embedded.ranges.resolve(start))
            .is_some_and(|mine| mine == owner);
        if !rerun && owner.range.start() < used_end {
            return Err(OpenError::CorruptKey {
                key: keys.range(owner.range.start()),
                reason: format!(
                    "etcd already holds the range {}..{}, below the embedded store's high-water mark {used_end} (every number below it was issued, or pruned after it was); both stores issued those numbers, so refusing to merge them",
                    owner.range.start(),
                    owner.range.end()
                ),
            });
        }
    }

    Ok(())
}

/// Moves an embedded store's state into etcd so that no room issued before
/// can be issued again: first the high-water mark (compare-and-swap, only
/// ever raised), then the range records (so old rooms resolve, expiring by
/// lease like every range) and the registrations etcd does not have yet.
/// Safe to run again.
pub async fn import(config: &EtcdConfig, embedded: &Snapshot) -> Result<ImportReport, OpenError> {
    let loaded = connect_and_load(config, Load::Everything).await?;
    check_conflicts(&loaded, embedded)?;
    let Loaded {
        client,
        keys,
        snapshot: existing,
        high_water,
        chunks,
        ..
    } = loaded;
    let retention = fleet_retention(&client, &keys, config).await?;

    let Mark {
        value: etcd_high_water,
        revision,
    } = high_water.unwrap_or(Mark {
        value: 0,
        revision: 0,
    });
    // Never a mark below what replicas took, whatever etcd's mark says (a
    // missing one included): replicas refuse a mark below a chunk or range.
    let taken_end = chunks
        .iter()
        .map(|chunk| chunk.end)
        .max()
        .unwrap_or(0)
        .max(existing.ranges.high_water());
    let target = embedded.high_water.max(etcd_high_water).max(taken_end);
    if target > etcd_high_water {
        let request = pb::TxnRequest {
            compare: vec![txn::unchanged_since(&keys.high_water(), revision)],
            success: vec![txn::put(&keys.high_water(), target.to_string(), 0)],
            failure: Vec::new(),
        };
        failpoint!(
            "migrate::high_water_send",
            OpenError::Etcd {
                endpoints: config.endpoints.join(","),
                message: "failpoint migrate::high_water_send".into(),
            }
        );
        if !etcd_call(config, client.txn(request)).await?.succeeded {
            return Err(OpenError::CorruptKey {
                key: keys.high_water(),
                reason: "it changed while migrating: a replica is reserving; stop the replicas and run migrate again".into(),
            });
        }
    }
    failpoint!(
        "migrate::high_water",
        OpenError::Etcd {
            endpoints: config.endpoints.join(","),
            message: "failpoint migrate::high_water".into(),
        }
    );

    let lease = etcd_call(
        config,
        client.lease_grant(lease_ttl_secs(retention, bucket_for(retention))),
    )
    .await?
    .id;
    failpoint!(
        "migrate::lease_granted",
        OpenError::Etcd {
            endpoints: config.endpoints.join(","),
            message: "failpoint migrate::lease_granted".into(),
        }
    );
    let mut ops = Vec::new();
    for owner in embedded.ranges.iter() {
        ops.push(txn::put(
            &keys.range(owner.range.start()),
            encode_range(owner),
            lease,
        ));
    }
    let known: HashSet<&str> = existing
        .workers
        .iter()
        .map(|w| &*w.prefill_worker)
        .collect();
    let mut workers = 0;
    for worker in &embedded.workers {
        if known.contains(&*worker.prefill_worker) {
            continue;
        }
        workers += 1;
        // A deregistered worker outlives its ranges by the same lease.
        let worker_lease = if worker.registered { 0 } else { lease };
        ops.push(txn::put(
            &keys.worker(&worker.prefill_worker),
            encode_worker(worker.dp_size, worker.registered),
            worker_lease,
        ));
        if worker.registered {
            ops.push(txn::put(
                &keys.issued(&worker.prefill_worker),
                worker.rooms_issued.to_string(),
                0,
            ));
        }
    }
    while !ops.is_empty() {
        let batch: Vec<pb::RequestOp> = ops.drain(..ops.len().min(100)).collect();
        etcd_call(
            config,
            client.txn(pb::TxnRequest {
                compare: Vec::new(),
                success: batch,
                failure: Vec::new(),
            }),
        )
        .await?;
        failpoint!(
            "migrate::ranges",
            OpenError::Etcd {
                endpoints: config.endpoints.join(","),
                message: "failpoint migrate::ranges".into(),
            }
        );
    }
    Ok(ImportReport {
        high_water: target,
        ranges: embedded.ranges.len(),
        workers,
    })
}
