//! Start-up: connecting, loading the prefix at one revision, and creating
//! the mark and the store id of a new prefix.
//!
//! A serving replica loads every key but the range records: the mark, the
//! chunks, the registrations and their counters, the settings. Those are
//! what it serves from, and they do not grow with the fleet's history;
//! range records (a fleet keeps about a million within retention) are read
//! on demand, in bounded windows ([`super::lookup`]). `migrate` loads them
//! all, to check them against the embedded store's.
//!
//! Invariants: a key this binary loads and cannot trust refuses the start;
//! so does a mark below an announced chunk or below a range record (it was
//! deleted or rewritten), which a serving replica checks with bounded reads
//! (a range at or above the mark, then the nearest range below it); a
//! missing mark is created only on a new space, so a later missing mark is
//! always a deleted one.

use std::collections::HashMap;
use std::time::Duration;

use super::calls::{connect, etcd_call, get, injected};
use super::carver::Mark;
use super::client::{pb, prefix_end, txn, EtcdClient};
use super::keys::{parse_entry, range_record, AnnouncedChunk, Entry, Keys};
use super::lookup::{start_of, Search, FIRST_RANGE_WINDOW, MAX_ROUNDS};
use super::{EtcdConfig, PAGE_KEYS};
use crate::failpoint;
use crate::space::{RangeOwner, RangeTable, SPACE_START};
use crate::store::{OpenError, Snapshot, WorkerRecord};

/// A connected client and everything under the prefix.
pub(super) struct Loaded {
    pub(super) client: EtcdClient,
    pub(super) keys: Keys,
    pub(super) snapshot: Snapshot,
    pub(super) high_water: Option<Mark>,
    pub(super) revision: i64,
    /// The chunks replicas took, as announced.
    pub(super) chunks: Vec<AnnouncedChunk>,
    /// Every range record was attached to a lease (`v1/ranges_leased`):
    /// no sweep for 0.1's unleased ones is needed.
    pub(super) ranges_leased: bool,
    /// How many keys were read.
    pub(super) keys_loaded: usize,
}

/// What a start reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Load {
    /// A serving replica: everything but the range records.
    Serving,
    /// `migrate`: the range records too.
    Everything,
}

pub(super) async fn connect_and_load(config: &EtcdConfig, load: Load) -> Result<Loaded, OpenError> {
    let client = connect(config).await?;
    let keys = Keys::new(&config.prefix);
    let root = keys.root.as_bytes();
    let root_end = prefix_end(root);
    let (kvs, revision) = match load {
        Load::Everything => read_span(config, &client, root, &root_end, 0).await?,
        Load::Serving => {
            // Both sides of `v1/ranges/`, at one revision.
            let ranges = keys.ranges();
            let (mut kvs, revision) =
                read_span(config, &client, root, ranges.as_bytes(), 0).await?;
            let ranges_end = prefix_end(ranges.as_bytes());
            let (above, _) = read_span(config, &client, &ranges_end, &root_end, revision).await?;
            kvs.extend(above);
            (kvs, revision)
        }
    };
    let keys_loaded = kvs.len();
    let ranges_leased_key = keys.ranges_leased();
    let ranges_leased = kvs.iter().any(|kv| kv.key == ranges_leased_key.as_bytes());
    let ParsedSnapshot {
        snapshot,
        high_water,
        chunks,
    } = parse_snapshot(&keys, &kvs)?;
    if load == Load::Serving {
        let mark = high_water.map_or(SPACE_START, |mark| mark.value);
        check_no_range_over(config, &client, &keys, mark, revision).await?;
    }
    Ok(Loaded {
        client,
        keys,
        snapshot,
        high_water,
        revision,
        chunks,
        ranges_leased,
        keys_loaded,
    })
}

/// Refuses a mark with a range record at or above it, or one holding it
/// (the mark was lowered by hand: chunks taken from it would overlap the
/// range), in bounded reads: from the mark up (empty when healthy), then
/// windows below it down to the nearest range start ([`Search`]: ranges
/// never overlap, so only the nearest can reach past the mark). What
/// `parse_snapshot` checks for a prefix loaded whole.
async fn check_no_range_over(
    config: &EtcdConfig,
    client: &EtcdClient,
    keys: &Keys,
    mark: u64,
    revision: i64,
) -> Result<(), OpenError> {
    let ranges = keys.ranges();
    let below_range = |kv: &pb::KeyValue, owner: Option<RangeOwner>| OpenError::CorruptKey {
        key: keys.high_water(),
        reason: format!(
            "the high-water mark {mark} is below the reserved range {} ending at {}",
            String::from_utf8_lossy(&kv.key),
            owner.map_or_else(|| "?".to_owned(), |owner| owner.range.end().to_string())
        ),
    };
    let read = |key: Vec<u8>, range_end: Vec<u8>, descend: bool| {
        etcd_call(
            config,
            client.range(pb::RangeRequest {
                key,
                range_end,
                limit: 1,
                revision,
                sort_order: if descend {
                    pb::range_request::SortOrder::Descend as i32
                } else {
                    0
                },
                sort_target: pb::range_request::SortTarget::Key as i32,
                ..Default::default()
            }),
        )
    };
    let above = read(
        keys.range(mark).into_bytes(),
        prefix_end(ranges.as_bytes()),
        false,
    )
    .await?;
    if let Some(kv) = above.kvs.first() {
        return Err(below_range(kv, range_record(&ranges, kv)));
    }
    let Some(room) = mark.checked_sub(1) else {
        return Ok(());
    };
    let mut nearest: Search<pb::KeyValue> = Search::new(FIRST_RANGE_WINDOW);
    for _ in 0..MAX_ROUNDS {
        let Some((low, high)) = nearest.window(room) else {
            break;
        };
        let found = read(
            keys.range(low).into_bytes(),
            keys.range(high).into_bytes(),
            true,
        )
        .await?;
        nearest.answer(
            room,
            found.kvs.into_iter().next().map(|kv| {
                // A key that is not a canonical start sorts among them; it
                // is checked as if it started at the room.
                (start_of(&kv.key, &ranges).unwrap_or(room), kv)
            }),
        );
    }
    let Search::Found(_, kv) = nearest else {
        return Ok(());
    };
    let owner = range_record(&ranges, &kv).ok_or_else(|| OpenError::CorruptKey {
        key: String::from_utf8_lossy(&kv.key).into_owned(),
        reason: "not a valid, aligned range record".to_owned(),
    })?;
    if owner.range.end() > mark {
        return Err(below_range(&kv, Some(owner)));
    }
    Ok(())
}

/// Every key in `[from, end)`, in pages, all read at one revision (`0`:
/// the current one, returned).
pub(super) async fn read_span(
    config: &EtcdConfig,
    client: &EtcdClient,
    from: &[u8],
    end: &[u8],
    mut revision: i64,
) -> Result<(Vec<pb::KeyValue>, i64), OpenError> {
    let end = end.to_vec();
    let mut from = from.to_vec();
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

/// Everything under the prefix, as [`parse_snapshot`] read it.
pub(super) struct ParsedSnapshot {
    pub(super) snapshot: Snapshot,
    /// The mark, if there is one.
    pub(super) high_water: Option<Mark>,
    pub(super) chunks: Vec<AnnouncedChunk>,
}

/// The keys loaded (see [`Load`]), checked: a key this binary cannot trust
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
        chunks,
    })
}

/// Writes the mark of a new space (unless a replica just did), so that a
/// missing mark is always a deleted one, never mistaken for an empty space;
/// and `v1/ranges_leased` (see [`Loaded::ranges_leased`]).
pub(super) async fn create_high_water(
    config: &EtcdConfig,
    client: &EtcdClient,
    keys: &Keys,
) -> Result<(), OpenError> {
    let key = keys.high_water();
    // A new space holds no range of 0.1: none to sweep for, ever.
    let request = pb::TxnRequest {
        compare: vec![txn::unchanged_since(&key, 0)],
        success: vec![
            txn::put(&key, SPACE_START.to_string(), 0),
            txn::put(&keys.ranges_leased(), "1", 0),
        ],
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
