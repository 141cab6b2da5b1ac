//! The key layout under the prefix and the codec of every value (see the
//! store's docs for the layout): encoding exactly as a replica writes,
//! decoding that accepts nothing it would not write itself.
//!
//! Invariants: every decoder here is a fuzz target (`crate::fuzz`) and never
//! panics; a range record decodes only if aligned, inside the space, owned
//! by a valid worker name, and keyed by its canonical zero-padded start; a
//! mark only as a decimal without leading zeros (the chunk compare-and-swap
//! compares its bytes); a key that cannot be read refuses (damage never lets
//! a reservation through).

use std::sync::Arc;

use serde_json::json;

use super::carver::Mark;
use super::client::{pb, txn};
use crate::space::{DpSize, RangeOwner, RoomRange};
use crate::store::{StoreError, WorkerRecord};

/// Key names under the configured prefix.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    pub(super) root: String,
}

impl Keys {
    pub(crate) fn new(prefix: &str) -> Self {
        let mut root = prefix.to_owned();
        if !root.ends_with('/') {
            root.push('/');
        }
        root.push_str("v1/");
        Self { root }
    }

    pub(super) fn high_water(&self) -> String {
        format!("{}high_water", self.root)
    }

    pub(super) fn ranges(&self) -> String {
        format!("{}ranges/", self.root)
    }

    pub(super) fn range(&self, start: u64) -> String {
        format!("{}ranges/{start:020}", self.root)
    }

    /// Present once no range record lacks a lease (see `lease`).
    pub(super) fn ranges_leased(&self) -> String {
        format!("{}ranges_leased", self.root)
    }

    pub(super) fn workers(&self) -> String {
        format!("{}workers/", self.root)
    }

    pub(super) fn worker(&self, name: &str) -> String {
        format!("{}workers/{name}", self.root)
    }

    pub(super) fn issued(&self, name: &str) -> String {
        format!("{}issued/{name}", self.root)
    }

    pub(super) fn retention(&self) -> String {
        format!("{}config/retention_ms", self.root)
    }

    pub(super) fn chunks(&self) -> String {
        format!("{}chunks/", self.root)
    }

    pub(super) fn chunk(&self, start: u64) -> String {
        format!("{}chunks/{start:020}", self.root)
    }

    /// Where the chunk or range a key announces ends; a key that cannot be
    /// read refuses (damage never lets a reservation through).
    pub(super) fn announced_end(&self, kv: &pb::KeyValue) -> Result<u64, StoreError> {
        match parse_entry(self, kv) {
            Ok(Entry::Chunk { end, .. }) => Ok(end),
            Ok(Entry::Range(owner)) => Ok(owner.range.end()),
            Ok(_) => Ok(0),
            Err(reason) => Err(StoreError::Corrupt {
                key: String::from_utf8_lossy(&kv.key).into_owned(),
                reason,
            }),
        }
    }
}

/// The mark as written: a decimal with no leading zero, exactly as a
/// replica writes it (the chunk compare-and-swap compares its bytes).
pub(super) fn parse_mark(value: &[u8]) -> Option<u64> {
    parse_decimal(value).filter(|mark| mark.to_string().as_bytes() == value)
}

/// A chunk a replica took, as its key announces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct AnnouncedChunk {
    pub(super) start: u64,
    pub(super) end: u64,
}

/// A chunk announcement, if the key is a canonical chunk start and the end
/// lies above it. A fuzz target through `parse_entry`.
pub(super) fn decode_chunk(key_start: &str, value: &[u8]) -> Option<AnnouncedChunk> {
    let start = parse_decimal(key_start.as_bytes())?;
    if key_start != format!("{start:020}") {
        return None;
    }
    chunk_end(value)
        .filter(|end| *end > start)
        .map(|end| AnnouncedChunk { start, end })
}

/// The end a chunk announcement holds; `None` if it is unreadable.
pub(super) fn chunk_end(value: &[u8]) -> Option<u64> {
    serde_json::from_slice::<serde_json::Value>(value)
        .ok()?
        .get("end")?
        .as_u64()
}

/// The registration a worker key holds; its exact bytes are compared when a
/// replica registers, so it is always encoded the same way.
pub(crate) fn encode_worker(dp_size: DpSize, registered: bool) -> String {
    json!({ "dp_size": dp_size.get(), "registered": registered }).to_string()
}

/// What a worker key holds (its name is in the key, its revision is the
/// key's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WorkerValue {
    pub(crate) dp_size: DpSize,
    /// False once deregistered (the key then expires by lease).
    pub(crate) registered: bool,
}

/// A fuzz target: never panics; accepts only a valid dp_size and a flag.
pub(crate) fn decode_worker(value: &[u8]) -> Option<WorkerValue> {
    let value: serde_json::Value = serde_json::from_slice(value).ok()?;
    let dp_size = u32::try_from(value["dp_size"].as_u64()?).ok()?;
    let registered = value["registered"].as_bool()?;
    Some(WorkerValue {
        dp_size: DpSize::try_new(dp_size).ok()?,
        registered,
    })
}

/// A range record's value; its start is in the key.
pub(crate) fn encode_range(owner: &RangeOwner) -> String {
    json!({
        "end": owner.range.end(),
        "dp_size": owner.range.dp_size().get(),
        "prefill_worker": &*owner.prefill_worker,
        "created_unix_ms": owner.created_unix_ms,
    })
    .to_string()
}

/// A fuzz target: never panics; accepts only an aligned range inside the
/// space, owned by a valid worker name, whose key is its canonical start.
pub(crate) fn decode_range(key_start: &str, value: &[u8]) -> Option<RangeOwner> {
    let start: u64 = parse_decimal(key_start.as_bytes())?;
    if key_start != format!("{start:020}") {
        return None;
    }
    let value: serde_json::Value = serde_json::from_slice(value).ok()?;
    let end = value["end"].as_u64()?;
    let dp_size = DpSize::try_new(u32::try_from(value["dp_size"].as_u64()?).ok()?).ok()?;
    let worker = value["prefill_worker"].as_str()?;
    crate::names::validate_worker(worker).ok()?;
    Some(RangeOwner {
        prefill_worker: Arc::from(worker),
        range: RoomRange::from_parts(start, end, dp_size)?,
        created_unix_ms: value["created_unix_ms"].as_u64()?,
    })
}

/// The range record `kv` holds, if its key lies under `ranges` (the range
/// prefix, [`Keys::ranges`]) and it decodes ([`decode_range`]).
pub(super) fn range_record(ranges: &str, kv: &pb::KeyValue) -> Option<RangeOwner> {
    let start = std::str::from_utf8(&kv.key).ok()?.strip_prefix(ranges)?;
    decode_range(start, &kv.value)
}

/// A decimal u64 with nothing else around it (no sign, no spaces).
pub(crate) fn parse_decimal(value: &[u8]) -> Option<u64> {
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// The registration a worker key holds, as the allocator applies it; none
/// under a name the contract refuses (written by hand or another tool):
/// once applied, a worker's name is not checked again before it gets rooms.
pub(super) fn worker_record(prefill_worker: Arc<str>, kv: &pb::KeyValue) -> Option<WorkerRecord> {
    crate::names::validate_worker(&prefill_worker).ok()?;
    let WorkerValue {
        dp_size,
        registered,
    } = decode_worker(&kv.value)?;
    Some(WorkerRecord {
        prefill_worker,
        dp_size,
        registered,
        rooms_issued: 0,
        revision: kv.mod_revision,
    })
}

/// A decimal counter key's value and the compare that guards its update
/// (unchanged since read, or still absent); `None` if it is not a number.
pub(crate) fn counter_guard(kv: Option<&pb::KeyValue>, key: &str) -> Option<(u64, pb::Compare)> {
    Some(match kv {
        Some(kv) => (
            parse_decimal(&kv.value)?,
            txn::unchanged_since(key, kv.mod_revision),
        ),
        None => (0, txn::unchanged_since(key, 0)),
    })
}

pub(super) fn parse_high_water(kv: &pb::KeyValue, key: &str) -> Result<Mark, StoreError> {
    parse_mark(&kv.value)
        .map(|value| Mark {
            value,
            revision: kv.mod_revision,
        })
        .ok_or_else(|| StoreError::Corrupt {
            key: key.to_owned(),
            reason: NOT_A_MARK.into(),
        })
}

pub(super) const NOT_A_MARK: &str = "not a decimal number without leading zeros";

/// One key of the prefix, decoded.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Entry {
    HighWater(u64),
    PrunedBelow(u64),
    Range(RangeOwner),
    /// A chunk a replica took.
    Chunk {
        start: u64,
        end: u64,
    },
    Worker(WorkerRecord),
    Issued(Arc<str>, u64),
    /// Not ours to read (config, or keys of a later version).
    Other,
}

/// Decodes one key-value of the prefix. A fuzz target: never panics, and
/// accepts nothing it would not write itself.
pub(crate) fn parse_entry(keys: &Keys, kv: &pb::KeyValue) -> Result<Entry, String> {
    let key = std::str::from_utf8(&kv.key).map_err(|_| "not UTF-8".to_owned())?;
    let Some(name) = key.strip_prefix(&keys.root) else {
        return Ok(Entry::Other);
    };
    let number = || parse_decimal(&kv.value).ok_or_else(|| "not a decimal number".to_owned());
    Ok(if name == "high_water" {
        Entry::HighWater(parse_mark(&kv.value).ok_or_else(|| NOT_A_MARK.to_owned())?)
    } else if name == "pruned_below" {
        Entry::PrunedBelow(number()?)
    } else if let Some(start) = name.strip_prefix("ranges/") {
        Entry::Range(
            decode_range(start, &kv.value)
                .ok_or_else(|| "not a valid, aligned range record".to_owned())?,
        )
    } else if let Some(start) = name.strip_prefix("chunks/") {
        let AnnouncedChunk { start, end } = decode_chunk(start, &kv.value)
            .ok_or_else(|| "not a valid chunk announcement".to_owned())?;
        Entry::Chunk { start, end }
    } else if let Some(worker) = name.strip_prefix("workers/") {
        crate::names::validate_worker(worker).map_err(|e| e.to_string())?;
        Entry::Worker(
            worker_record(Arc::from(worker), kv)
                .ok_or_else(|| "not a valid registration".to_owned())?,
        )
    } else if let Some(worker) = name.strip_prefix("issued/") {
        crate::names::validate_worker(worker).map_err(|e| e.to_string())?;
        Entry::Issued(Arc::from(worker), number()?)
    } else {
        Entry::Other
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `v1/ranges_leased` (issue 20 item 4) is a new key, no new format
    /// for an old one: this decoder, unchanged in that branch since 0.1's
    /// successors, reads it (and any key a later version adds) as nothing
    /// of its own, so replicas of the version before run beside it.
    #[test]
    fn a_key_a_later_version_adds_is_read_as_none_of_ours() {
        let keys = Keys::new("/room-allocator/");
        for key in [keys.ranges_leased(), format!("{}some_later_key", keys.root)] {
            let kv = pb::KeyValue {
                key: key.clone().into_bytes(),
                value: b"1".to_vec(),
                ..Default::default()
            };
            assert_eq!(parse_entry(&keys, &kv), Ok(Entry::Other), "{key}");
        }
        // It sorts past every range key: a read of the range records never
        // returns it, and the start-up read of the rest does.
        let ranges_end = super::super::client::prefix_end(keys.ranges().as_bytes());
        assert!(keys.ranges_leased().into_bytes() >= ranges_end);
    }
}
