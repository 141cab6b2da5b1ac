//! Fuzzing of every decoder of bytes that come from disk or etcd, on the
//! stable toolchain: a mutation loop (bit flips, interesting numbers, cuts,
//! inserts, splices) over valid encodings, with checksums fixed up half the
//! time so mutations reach the field parsers behind them.
//!
//! Properties, for every input: the decoder never panics, and never accepts
//! a corrupt record: what it accepts is canonical (it encodes back to the
//! same bytes) or satisfies the invariants a record must (ranges aligned and
//! inside the space, dp_size valid, names valid, keys canonical).
//!
//! A short run is part of `cargo test` (`FUZZ_ITERATIONS`, default 20,000
//! per target; `FUZZ_SEED` varies the run); `scripts/fuzz.sh` runs long. An input that breaks a property is
//! saved under `fuzz/regressions/<target>/` and replayed by every later run.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::Arc;

use crate::space::{DpSize, RangeOwner, RoomRange, MAX_ROOM};
use crate::store::embedded::{decode_commit, encode_record, parse_record, Record};
use crate::store::etcd::client::pb::KeyValue;
use crate::store::etcd::{
    decode_range, decode_worker, encode_range, encode_worker, parse_decimal, parse_entry, Entry,
    Keys,
};
use crate::store::sim_fs::Rng;

/// A decoder under test: checks one input, `Err` names the broken property.
type Target = fn(&[u8]) -> Result<(), String>;

fn iterations() -> u64 {
    std::env::var("FUZZ_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000)
}

/// Mixed into every target's generator, so long runs explore afresh.
fn seed() -> u64 {
    std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn regressions(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/regressions")
        .join(target)
}

/// Runs `check` on `input`; a panic or a broken property saves the input as
/// a regression and fails the test.
fn run_one(target: &str, check: Target, input: &[u8]) {
    let outcome = catch_unwind(AssertUnwindSafe(|| check(input)))
        .unwrap_or_else(|panic| Err(format!("panicked: {panic:?}")));
    if let Err(broken) = outcome {
        let dir = regressions(target);
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join(format!("{:08x}.bin", crc32fast::hash(input)));
        let _ = std::fs::write(&path, input);
        panic!(
            "fuzz target {target}: {broken}; input saved to {}",
            path.display()
        );
    }
}

/// Replays saved regressions, then mutates the seeds.
fn fuzz(target: &str, check: Target, seeds: &[Vec<u8>], fix_up: fn(&mut [u8])) {
    if let Ok(entries) = std::fs::read_dir(regressions(target)) {
        for entry in entries.flatten() {
            let input = std::fs::read(entry.path()).expect("a saved regression");
            run_one(target, check, &input);
        }
    }
    for seed in seeds {
        run_one(target, check, seed);
    }
    let mut rng = Rng::new(u64::from(crc32fast::hash(target.as_bytes())) ^ 0x5eed ^ seed());
    for _ in 0..iterations() {
        let mut input = seeds[rng.below(seeds.len() as u64) as usize].clone();
        for _ in 0..=rng.below(4) {
            mutate(&mut input, seeds, &mut rng);
        }
        if rng.coin() {
            fix_up(&mut input);
        }
        run_one(target, check, &input);
    }
}

const INTERESTING: [u64; 12] = [
    0,
    1,
    2,
    0x7f,
    0x80,
    0xff,
    0xffff,
    0xffff_ffff,
    1 << 32,
    MAX_ROOM,
    MAX_ROOM + 1,
    u64::MAX,
];

fn mutate(input: &mut Vec<u8>, seeds: &[Vec<u8>], rng: &mut Rng) {
    let len = input.len() as u64;
    let at = |rng: &mut Rng| rng.below(len.max(1)) as usize;
    match rng.below(8) {
        0 if !input.is_empty() => {
            let i = at(rng);
            input[i] ^= 1 << rng.below(8);
        }
        1 if !input.is_empty() => {
            let i = at(rng);
            input[i] = INTERESTING[rng.below(6) as usize] as u8;
        }
        2 if input.len() >= 8 => {
            let i = rng.below(len - 7) as usize;
            let value = INTERESTING[rng.below(INTERESTING.len() as u64) as usize];
            input[i..i + 8].copy_from_slice(&value.to_le_bytes());
        }
        3 if input.len() >= 4 => {
            let i = rng.below(len - 3) as usize;
            let value = INTERESTING[rng.below(INTERESTING.len() as u64) as usize] as u32;
            input[i..i + 4].copy_from_slice(&value.to_le_bytes());
        }
        4 => {
            let cut = at(rng);
            input.truncate(cut);
        }
        5 => {
            let i = at(rng).min(input.len());
            let n = rng.below(16) as usize;
            let bytes: Vec<u8> = (0..n).map(|_| rng.below(256) as u8).collect();
            input.splice(i..i, bytes);
        }
        6 if !input.is_empty() => {
            let from = at(rng);
            let to = (from + rng.below(16) as usize).min(input.len());
            input.drain(from..to);
        }
        _ => {
            // Splice another seed in.
            let other = &seeds[rng.below(seeds.len() as u64) as usize];
            let i = at(rng).min(input.len());
            let j = rng.below(other.len() as u64 + 1) as usize;
            input.truncate(i);
            input.extend_from_slice(&other[j..]);
        }
    }
}

fn no_fix_up(_: &mut [u8]) {}

// --- the embedded log's records ---------------------------------------------

/// Rewrites a record's length and checksum to match its body.
fn fix_record(input: &mut [u8]) {
    if input.len() >= 8 {
        let body_len = u32::try_from(input.len() - 8).unwrap_or(u32::MAX);
        input[..4].copy_from_slice(&body_len.to_le_bytes());
        let crc = crc32fast::hash(&input[8..]);
        input[4..8].copy_from_slice(&crc.to_le_bytes());
    }
}

fn record_seeds() -> Vec<Vec<u8>> {
    let dp = |n| DpSize::try_new(n).expect("dp");
    let records = [
        Record::Register(Arc::from("prefill-0:8998"), dp(8)),
        Record::Deregister {
            worker: Arc::from("w"),
            unix_ms: 1_700_000_000_000,
        },
        Record::Reserve {
            worker: Arc::from("w"),
            range: RoomRange::from_parts(1024, 9216, dp(8)).expect("range"),
            rooms_issued: 77,
            created_unix_ms: 1_700_000_000_000,
        },
        Record::Issued(Arc::from("w"), 123),
        Record::Pruned(1 << 40),
        Record::Probe,
    ];
    records
        .iter()
        .map(|record| {
            let mut buf = Vec::new();
            encode_record(&mut buf, 1, record);
            buf
        })
        .collect()
}

fn check_record(input: &[u8]) -> Result<(), String> {
    let Ok((record, len)) = parse_record(input, 1) else {
        return Ok(());
    };
    let mut again = Vec::new();
    encode_record(&mut again, 1, &record);
    if input.get(16) == Some(&2) {
        // 0.1's deregistration (kind 2, no time): canonical in its own form.
        again = legacy_deregister(&record).ok_or("kind 2 decoded as something else")?;
    }
    let len = usize::try_from(len).map_err(|e| e.to_string())?;
    if input.get(..len) != Some(&again[..]) {
        return Err(format!("accepted a non-canonical record: {record:?}"));
    }
    if let Record::Reserve { range, .. } = &record {
        let d = u64::from(range.dp_size().get());
        if range.start() % d != 0 || range.end() % d != 0 || range.end() > MAX_ROOM + 1 {
            return Err(format!("accepted a misaligned range: {record:?}"));
        }
    }
    Ok(())
}

/// 0.1's deregister record: kind 2 and the name, no time.
fn legacy_deregister(record: &Record) -> Option<Vec<u8>> {
    let Record::Deregister { worker, unix_ms: 0 } = record else {
        return None;
    };
    let mut body = 1u64.to_le_bytes().to_vec();
    body.push(2);
    body.extend_from_slice(&u16::try_from(worker.len()).ok()?.to_le_bytes());
    body.extend_from_slice(worker.as_bytes());
    let mut record = u32::try_from(body.len()).ok()?.to_le_bytes().to_vec();
    record.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    record.extend_from_slice(&body);
    Some(record)
}

#[test]
fn log_records_never_panic_and_accept_only_valid_canonical_records() {
    fuzz("log_record", check_record, &record_seeds(), fix_record);
}

// --- the commit slots --------------------------------------------------------

fn commit_seeds() -> Vec<Vec<u8>> {
    let slot = |seq: u64, len: u64, generation: u32| {
        let mut slot = Vec::new();
        slot.extend_from_slice(b"RALLOCCM");
        slot.extend_from_slice(&1u32.to_le_bytes());
        slot.extend_from_slice(&generation.to_le_bytes());
        slot.extend_from_slice(&seq.to_le_bytes());
        slot.extend_from_slice(&len.to_le_bytes());
        let crc = crc32fast::hash(&slot);
        slot.extend_from_slice(&crc.to_le_bytes());
        slot.resize(512, 0);
        slot
    };
    let mut both = slot(4, 1000, 2);
    both.extend_from_slice(&slot(5, 1200, 2));
    let mut one = slot(0, 16, 0);
    one.resize(1024, 0);
    // Format version 2: the slots 4 KiB apart.
    let mut v2 = vec![0u8; 8192];
    for (at, mut slot) in [(0, slot(6, 1000, 3)), (4096, slot(7, 1300, 3))] {
        slot[8..12].copy_from_slice(&2u32.to_le_bytes());
        let crc = crc32fast::hash(&slot[..32]);
        slot[32..36].copy_from_slice(&crc.to_le_bytes());
        v2[at..at + 36].copy_from_slice(&slot[..36]);
    }
    vec![both, one, v2]
}

/// Where the slots of a commit file of this length are, and their version.
fn commit_layout(len: usize) -> (usize, u32) {
    if len >= 8192 {
        (4096, 2)
    } else {
        (512, 1)
    }
}

/// Rewrites each slot's checksum to match its body.
fn fix_slots(input: &mut [u8]) {
    let (spacing, _) = commit_layout(input.len());
    for start in [0usize, spacing] {
        if input.len() >= start + 36 {
            let crc = crc32fast::hash(&input[start..start + 32]);
            input[start + 32..start + 36].copy_from_slice(&crc.to_le_bytes());
        }
    }
}

fn check_commit(input: &[u8]) -> Result<(), String> {
    let Ok((seq, generation, len)) = decode_commit(input) else {
        return Ok(());
    };
    // The accepted slot is one whose checksum holds, of the version the
    // file's length says, in the position its commit number puts it, and
    // the newest of those.
    let (spacing, version) = commit_layout(input.len());
    let read_seq =
        |start: usize| u64::from_le_bytes(input[start + 16..start + 24].try_into().expect("8"));
    let valid = |start: usize| {
        let slot = &input[start..start + 36];
        &slot[..8] == b"RALLOCCM"
            && slot[8..12] == version.to_le_bytes()
            && slot[32..36] == crc32fast::hash(&slot[..32]).to_le_bytes()
            && read_seq(start) % 2 == (start / spacing) as u64
    };
    let candidates: Vec<usize> = [0usize, spacing]
        .into_iter()
        .filter(|s| valid(*s))
        .collect();
    let newest = candidates
        .iter()
        .copied()
        .max_by_key(|s| read_seq(*s))
        .ok_or("accepted a commit file with no valid slot")?;
    let slot = &input[newest..newest + 36];
    let expected = (
        read_seq(newest),
        u32::from_le_bytes(slot[12..16].try_into().expect("4")),
        u64::from_le_bytes(slot[24..32].try_into().expect("8")),
    );
    if (seq, generation, len) != expected {
        return Err(format!(
            "accepted {:?}, the newest valid slot says {expected:?}",
            (seq, generation, len)
        ));
    }
    Ok(())
}

#[test]
fn commit_slots_never_panic_and_accept_only_a_checksummed_newest_slot() {
    fuzz("commit_slot", check_commit, &commit_seeds(), fix_slots);
}

// --- etcd keys and values ----------------------------------------------------

fn range_value_seeds() -> Vec<Vec<u8>> {
    let owner = RangeOwner {
        prefill_worker: Arc::from("prefill-0:8998"),
        range: RoomRange::from_parts(1024, 9216, DpSize::try_new(8).expect("dp")).expect("range"),
        created_unix_ms: 1_700_000_000_000,
    };
    // Key and value in one input: `start` NUL `value`.
    let mut seed = format!("{:020}", owner.range.start()).into_bytes();
    seed.push(0);
    seed.extend_from_slice(encode_range(&owner).as_bytes());
    vec![seed]
}

fn check_range_record(input: &[u8]) -> Result<(), String> {
    let split = input.iter().position(|b| *b == 0).unwrap_or(input.len());
    let Ok(key) = std::str::from_utf8(&input[..split]) else {
        return Ok(());
    };
    let value = input.get(split + 1..).unwrap_or_default();
    let Some(owner) = decode_range(key, value) else {
        return Ok(());
    };
    let range = owner.range;
    let d = u64::from(range.dp_size().get());
    if key != format!("{:020}", range.start()) {
        return Err(format!("accepted a non-canonical key {key:?}"));
    }
    if range.start() % d != 0
        || range.end() % d != 0
        || range.start() == 0
        || range.end() > MAX_ROOM + 1
    {
        return Err(format!("accepted an invalid range {owner:?}"));
    }
    crate::allocator::validate_worker(&owner.prefill_worker)
        .map_err(|e| format!("accepted a bad name: {e}"))?;
    Ok(())
}

#[test]
fn etcd_range_records_never_panic_and_accept_only_valid_ranges() {
    fuzz(
        "etcd_range",
        check_range_record,
        &range_value_seeds(),
        no_fix_up,
    );
}

fn check_worker_value(input: &[u8]) -> Result<(), String> {
    if let Some(value) = decode_worker(input) {
        // Whatever shape it had, it means exactly this registration.
        let canonical = encode_worker(value.dp_size, value.registered);
        if decode_worker(canonical.as_bytes()) != Some(value) {
            return Err(format!("{canonical} does not decode back"));
        }
    }
    Ok(())
}

#[test]
fn etcd_registrations_never_panic_and_accept_only_valid_dp_sizes() {
    let seeds = vec![
        encode_worker(DpSize::try_new(4).expect("dp"), true).into_bytes(),
        encode_worker(DpSize::try_new(65536).expect("dp"), false).into_bytes(),
    ];
    fuzz("etcd_worker", check_worker_value, &seeds, no_fix_up);
}

fn check_decimal(input: &[u8]) -> Result<(), String> {
    if let Some(value) = parse_decimal(input) {
        if value.to_string().as_bytes() != input && !input.starts_with(b"0") {
            return Err(format!("accepted {input:?} as {value}"));
        }
    }
    Ok(())
}

#[test]
fn etcd_counters_never_panic_and_accept_only_plain_decimals() {
    let seeds = vec![
        b"1".to_vec(),
        b"18446744073709551615".to_vec(),
        b"9216".to_vec(),
    ];
    fuzz("etcd_decimal", check_decimal, &seeds, no_fix_up);
}

/// A whole key-value of the prefix: `key` NUL `value`.
fn check_entry(input: &[u8]) -> Result<(), String> {
    let split = input.iter().position(|b| *b == 0).unwrap_or(input.len());
    let kv = KeyValue {
        key: input[..split].to_vec(),
        value: input.get(split + 1..).unwrap_or_default().to_vec(),
        ..KeyValue::default()
    };
    match parse_entry(&Keys::new("/room-allocator/"), &kv) {
        Ok(Entry::Range(owner)) => {
            let d = u64::from(owner.range.dp_size().get());
            if owner.range.start() % d != 0 || owner.range.end() > MAX_ROOM + 1 {
                return Err(format!("accepted {owner:?}"));
            }
        }
        Ok(Entry::Worker(record)) => {
            crate::allocator::validate_worker(&record.prefill_worker)
                .map_err(|e| format!("accepted a bad name: {e}"))?;
        }
        Ok(Entry::Chunk { start, end }) => {
            // The key's start, read here independently of the decoder.
            let key_start = kv.key.rsplit(|b| *b == b'/').next().unwrap_or_default();
            if parse_decimal(key_start) != Some(start) || end <= start {
                return Err(format!("accepted a chunk {start}..{end}"));
            }
        }
        _ => {}
    }
    Ok(())
}

#[test]
fn etcd_snapshot_entries_never_panic_and_accept_only_valid_ones() {
    let entry = |key: &str, value: &str| {
        let mut seed = key.as_bytes().to_vec();
        seed.push(0);
        seed.extend_from_slice(value.as_bytes());
        seed
    };
    let range = &range_value_seeds()[0];
    let split = range.iter().position(|b| *b == 0).expect("split");
    let range_value = std::str::from_utf8(&range[split + 1..]).expect("utf8");
    let seeds = vec![
        entry("/room-allocator/v1/high_water", "9216"),
        entry(
            "/room-allocator/v1/workers/prefill-0",
            r#"{"dp_size":4,"registered":true}"#,
        ),
        entry("/room-allocator/v1/issued/prefill-0", "42"),
        entry(
            "/room-allocator/v1/ranges/00000000000000001024",
            range_value,
        ),
        entry("/room-allocator/v1/config/retention_ms", "86400000"),
        entry(
            "/room-allocator/v1/chunks/00000000000000001024",
            r#"{"end":66560}"#,
        ),
    ];
    fuzz("etcd_entry", check_entry, &seeds, no_fix_up);
}
