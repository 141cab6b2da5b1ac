//! Start-up: connecting, loading everything under the prefix at one
//! revision, and creating the mark and the store id of a new prefix.
//!
//! Invariants: a key this binary cannot trust refuses the start; so does a
//! mark below a recorded range or an announced chunk (it was deleted or
//! rewritten); a missing mark is created only on a new space, so a later
//! missing mark is always a deleted one.

use std::collections::HashMap;
use std::time::Duration;

use super::calls::{connect, etcd_call, get, injected};
use super::carver::Mark;
use super::client::{pb, prefix_end, txn, EtcdClient};
use super::keys::{parse_entry, AnnouncedChunk, Entry, Keys};
use super::{EtcdConfig, PAGE_KEYS};
use crate::failpoint;
use crate::space::{RangeTable, SPACE_START};
use crate::store::{OpenError, Snapshot, WorkerRecord};

/// A connected client and everything under the prefix.
pub(super) struct Loaded {
    pub(super) client: EtcdClient,
    pub(super) keys: Keys,
    pub(super) snapshot: Snapshot,
    pub(super) high_water: Option<Mark>,
    pub(super) revision: i64,
    /// Range keys written without a lease, with their mod revision.
    pub(super) unleased: Vec<UnleasedRange>,
    /// The chunks replicas took, as announced.
    pub(super) chunks: Vec<AnnouncedChunk>,
}

pub(super) async fn connect_and_load(config: &EtcdConfig) -> Result<Loaded, OpenError> {
    let client = connect(config).await?;
    let keys = Keys::new(&config.prefix);
    let (kvs, revision) = read_prefix(config, &client, &keys.root).await?;
    let ParsedSnapshot {
        snapshot,
        high_water,
        unleased,
        chunks,
    } = parse_snapshot(&keys, &kvs)?;
    Ok(Loaded {
        client,
        keys,
        snapshot,
        high_water,
        revision,
        unleased,
        chunks,
    })
}

/// Every key under `prefix`, in pages, all read at one revision.
pub(super) async fn read_prefix(
    config: &EtcdConfig,
    client: &EtcdClient,
    prefix: &str,
) -> Result<(Vec<pb::KeyValue>, i64), OpenError> {
    let end = prefix_end(prefix.as_bytes());
    let mut from = prefix.as_bytes().to_vec();
    let mut revision = 0;
    let mut kvs = Vec::new();
    loop {
        let page = etcd_call(
            config,
            client.range(pb::RangeRequest {
                key: from.clone(),
                range_end: end.clone(),
                limit: PAGE_KEYS,
                revision,
                ..Default::default()
            }),
        )
        .await?;
        if revision == 0 {
            revision = page.header.as_ref().map_or(0, |h| h.revision);
        }
        let more = page.more;
        if let Some(last) = page.kvs.last() {
            from = last.key.clone();
            from.push(0);
        }
        kvs.extend(page.kvs);
        if !more {
            return Ok((kvs, revision));
        }
    }
}

/// A range record written without a lease (by a 0.1 replica).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct UnleasedRange {
    pub(super) key: String,
    /// Its mod revision when loaded.
    pub(super) revision: i64,
}

/// Everything under the prefix, as [`parse_snapshot`] read it.
pub(super) struct ParsedSnapshot {
    pub(super) snapshot: Snapshot,
    /// The mark, if there is one.
    pub(super) high_water: Option<Mark>,
    /// Range keys written without a lease, with their mod revision.
    pub(super) unleased: Vec<UnleasedRange>,
    pub(super) chunks: Vec<AnnouncedChunk>,
}

/// Everything under the prefix, checked: a key this binary cannot trust
/// refuses the start. A fuzz target through `parse_entry`.
pub(super) fn parse_snapshot(
    keys: &Keys,
    kvs: &[pb::KeyValue],
) -> Result<ParsedSnapshot, OpenError> {
    let mut ranges = RangeTable::default();
    let mut workers = std::collections::BTreeMap::new();
    let mut issued = HashMap::new();
    let mut high_water = None;
    let mut pruned_below = 0;
    let mut chunks = Vec::new();
    let mut unleased = Vec::new();
    for kv in kvs {
        let key = String::from_utf8_lossy(&kv.key);
        let corrupt = |reason: &str| OpenError::CorruptKey {
            key: key.to_string(),
            reason: reason.to_owned(),
        };
        match parse_entry(keys, kv).map_err(|reason| corrupt(&reason))? {
            Entry::HighWater(value) => {
                high_water = Some(Mark {
                    value,
                    revision: kv.mod_revision,
                })
            }
            Entry::PrunedBelow(below) => pruned_below = below,
            Entry::Range(owner) => {
                if kv.lease == 0 {
                    unleased.push(UnleasedRange {
                        key: key.to_string(),
                        revision: kv.mod_revision,
                    });
                }
                ranges
                    .insert(owner)
                    .map_err(|overlap| corrupt(&overlap.to_string()))?;
            }
            Entry::Worker(record) => {
                workers.insert(record.prefill_worker.clone(), record);
            }
            Entry::Issued(worker, count) => {
                issued.insert(worker, count);
            }
            Entry::Chunk { start, end } => chunks.push(AnnouncedChunk { start, end }),
            Entry::Other => {}
        }
    }
    let hw = high_water.map_or(SPACE_START, |mark| mark.value);
    if ranges.high_water() > hw {
        return Err(OpenError::CorruptKey {
            key: keys.high_water(),
            reason: format!(
                "the high-water mark {hw} is below the reserved range ending at {}",
                ranges.high_water()
            ),
        });
    }
    let chunks_end = chunks
        .iter()
        .map(|chunk| chunk.end)
        .max()
        .unwrap_or(SPACE_START);
    if chunks_end > hw {
        return Err(OpenError::CorruptKey {
            key: keys.high_water(),
            reason: format!(
                "the high-water mark {hw} is below the chunk a replica took ending at {chunks_end} (it was deleted or rewritten); put back a mark at or above it"
            ),
        });
    }
    let workers = workers
        .into_values()
        .map(|record| WorkerRecord {
            rooms_issued: issued.get(&record.prefill_worker).copied().unwrap_or(0),
            ..record
        })
        .collect();
    Ok(ParsedSnapshot {
        snapshot: Snapshot {
            workers,
            ranges,
            pruned_below,
            high_water: hw.max(pruned_below),
            retention: Duration::ZERO,
        },
        high_water,
        unleased,
        chunks,
    })
}

/// Writes the mark of a new space (unless a replica just did), so that a
/// missing mark is always a deleted one, never mistaken for an empty space.
pub(super) async fn create_high_water(
    config: &EtcdConfig,
    client: &EtcdClient,
    keys: &Keys,
) -> Result<(), OpenError> {
    let key = keys.high_water();
    let request = pb::TxnRequest {
        compare: vec![txn::unchanged_since(&key, 0)],
        success: vec![txn::put(&key, SPACE_START.to_string(), 0)],
        failure: Vec::new(),
    };
    etcd_call(config, client.txn(request)).await?;
    failpoint!(
        "etcd::high_water_created",
        injected(config, "etcd::high_water_created")
    );
    Ok(())
}

/// The prefix's store id, `v1/store_id` (see `store_id`): put if absent (by
/// the first replica, or the first start after ids came), then read, so
/// every replica of the prefix reports the one that won. Older binaries
/// ignore the key.
pub(super) async fn read_or_create_store_id(
    config: &EtcdConfig,
    client: &EtcdClient,
    keys: &Keys,
) -> Result<String, OpenError> {
    let key = format!("{}store_id", keys.root);
    let candidate = crate::store::store_id::new_uuid_v4().map_err(|error| OpenError::Etcd {
        endpoints: config.endpoints.join(","),
        message: format!("cannot make a store id: {error}"),
    })?;
    let request = pb::TxnRequest {
        compare: vec![txn::unchanged_since(&key, 0)],
        success: vec![txn::put(&key, candidate, 0)],
        failure: Vec::new(),
    };
    etcd_call(config, client.txn(request)).await?;
    let stored = etcd_call(config, client.range(get(&key))).await?;
    let value = stored
        .kvs
        .first()
        .map(|kv| kv.value.clone())
        .unwrap_or_default();
    match std::str::from_utf8(&value) {
        Ok(id) if crate::store::store_id::is_uuid(id) => Ok(id.to_owned()),
        _ => Err(OpenError::CorruptKey {
            key,
            reason: format!(
                "it holds {:?}, not a store id (a UUID); delete it to have a new one written",
                String::from_utf8_lossy(&value)
            ),
        }),
    }
}
