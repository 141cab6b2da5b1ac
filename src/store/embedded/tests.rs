//! The embedded store's crash cases: on the real file system (torn tails,
//! damage, truncation, foreign files, locks, compaction) and on a simulated
//! one that loses and reorders unsynced writes (power loss) or fails chosen
//! operations.

use super::format::*;
use super::recovery::*;
use super::*;
use crate::space::{RangeOwner, RangeTable, Room, MAX_ROOM};
use crate::store::sim_fs::{Effect, Rng, SimFs};
use proptest::prelude::*;
use std::fs;

fn dp(n: u32) -> DpSize {
    DpSize::try_new(n).expect("valid dp_size")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("test runtime")
}

fn reservation(worker: &str, dp_size: u32, bases: u64) -> Reservation {
    Reservation {
        prefill_worker: Arc::from(worker),
        dp_size: dp(dp_size),
        revision: 0,
        want_bases: bases,
        need_bases: bases,
        rooms_issued: 7,
        created_unix_ms: 1_000,
    }
}

fn prune(cutoff_unix_ms: u64) -> PruneRequest {
    PruneRequest {
        cutoff_unix_ms,
        held: Default::default(),
    }
}

/// Opens the store, registers a worker and reserves two ranges; returns them.
fn populate(dir: &Path) -> Vec<RoomRange> {
    let (store, _) = EmbeddedStore::open(dir, Bounds::FULL).expect("open");
    runtime().block_on(async {
        store
            .register(Arc::from("w"), dp(4))
            .await
            .expect("register");
        let a = store
            .reserve(reservation("w", 4, 10))
            .await
            .expect("reserve");
        let b = store
            .reserve(reservation("w", 4, 10))
            .await
            .expect("reserve");
        store.close().await.expect("close");
        vec![a, b]
    })
}

/// A commit file of the first format (version 1: both slots in the first
/// 1 KiB, 512 bytes apart), as 0.x wrote it: `commit_seq` in its slot, the
/// commit before it in the other.
fn old_commit_file(commit_seq: u64, log_len: u64, generation: u32) -> Vec<u8> {
    let mut bytes = vec![0u8; 2 * SLOT_SPACING_V1 as usize];
    for seq in [commit_seq.saturating_sub(1), commit_seq] {
        let at = (seq % 2 * SLOT_SPACING_V1) as usize;
        let slot = encode_slot_version(COMMIT_VERSION_V1, seq, log_len, generation);
        bytes[at..at + SLOT_LEN].copy_from_slice(&slot);
    }
    bytes
}

fn open_err(dir: &Path) -> OpenError {
    match EmbeddedStore::open(dir, Bounds::FULL) {
        Ok(_) => panic!("the store opened but should have refused"),
        Err(error) => error,
    }
}

#[test]
fn reopening_resumes_past_every_reserved_range() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ranges = populate(dir.path());
    let (store, snapshot) = EmbeddedStore::open(dir.path(), Bounds::FULL).expect("reopen");
    assert_eq!(snapshot.ranges.len(), 2);
    assert_eq!(snapshot.high_water, ranges[1].end());
    assert_eq!(snapshot.workers.len(), 1);
    assert!(snapshot.workers[0].registered);
    assert_eq!(snapshot.workers[0].rooms_issued, 7);
    let room = Room::try_new(ranges[0].start() + 1).expect("room");
    assert_eq!(
        &*snapshot
            .ranges
            .resolve(room)
            .expect("resolves")
            .prefill_worker,
        "w"
    );
    let next = runtime()
        .block_on(store.reserve(reservation("w", 4, 1)))
        .expect("reserve");
    assert!(next.start() >= ranges[1].end());
}

#[test]
fn a_second_open_of_the_same_dir_is_refused_while_the_first_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_store, _) = EmbeddedStore::open(dir.path(), Bounds::FULL).expect("open");
    assert!(matches!(open_err(dir.path()), OpenError::Locked { .. }));
}

#[test]
fn a_torn_unacknowledged_tail_is_cut_and_written_over() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ranges = populate(dir.path());
    let log_path = dir.path().join(LOG_FILE);
    let before = fs::read(&log_path).expect("read");
    let mut bytes = before.clone();
    // Half a record, as a crash in the middle of an append leaves it.
    bytes.extend_from_slice(&[40, 0, 0, 0, 1, 2, 3, 4, 5, 6]);
    fs::write(&log_path, &bytes).expect("write");
    let (store, snapshot) = EmbeddedStore::open(dir.path(), Bounds::FULL).expect("torn tail opens");
    assert_eq!(snapshot.high_water, ranges[1].end());
    assert_eq!(
        fs::read(&log_path).expect("read"),
        before,
        "the tail is cut"
    );
    runtime()
        .block_on(store.reserve(reservation("w", 4, 1)))
        .expect("writes over the tail");
    drop(store);
    let (_, snapshot) = EmbeddedStore::open(dir.path(), Bounds::FULL).expect("reopen");
    assert_eq!(snapshot.ranges.len(), 3);
}

#[test]
fn durable_records_past_the_last_commit_are_adopted_and_committed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ranges = populate(dir.path());
    // Lose the newest commit slot, as a crash during its write would.
    let commit_path = dir.path().join(COMMIT_FILE);
    let mut commit = fs::read(&commit_path).expect("read");
    let spacing = SLOT_SPACING as usize;
    let newest = usize::from(commit[spacing + 16] > commit[16]);
    commit[newest * spacing + 20] ^= 0xff;
    fs::write(&commit_path, &commit).expect("write");
    let (store, snapshot) = EmbeddedStore::open(dir.path(), Bounds::FULL).expect("opens");
    assert_eq!(snapshot.high_water, ranges[1].end());
    drop(store);
    let slot = read_commit(&fs::File::open(&commit_path).expect("open"), &commit_path)
        .expect("a valid slot");
    assert_eq!(
        slot.log_len,
        fs::metadata(dir.path().join(LOG_FILE)).expect("log").len(),
        "opening committed what it adopted"
    );
}

#[test]
fn damage_inside_the_acknowledged_log_refuses_to_start_and_leaves_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    populate(dir.path());
    let log_path = dir.path().join(LOG_FILE);
    let mut bytes = fs::read(&log_path).expect("read");
    bytes[30] ^= 0x01;
    fs::write(&log_path, &bytes).expect("write");
    let error = open_err(dir.path());
    assert!(matches!(error, OpenError::Corrupt { .. }), "{error}");
    assert!(error.to_string().contains("rooms.log"), "{error}");
    assert_eq!(
        fs::read(&log_path).expect("read"),
        bytes,
        "file left as found"
    );
}

#[test]
fn a_truncated_log_refuses_to_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    populate(dir.path());
    let log_path = dir.path().join(LOG_FILE);
    let bytes = fs::read(&log_path).expect("read");
    fs::write(&log_path, &bytes[..bytes.len() - 3]).expect("write");
    let error = open_err(dir.path());
    assert!(matches!(error, OpenError::Truncated { .. }), "{error}");
    assert!(error.to_string().contains("truncated"), "{error}");
}

#[test]
fn foreign_files_refuse_to_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    populate(dir.path());
    let log_path = dir.path().join(LOG_FILE);
    fs::write(&log_path, b"hello, I am somebody else's file").expect("write");
    assert!(matches!(open_err(dir.path()), OpenError::Foreign { .. }));

    let dir = tempfile::tempdir().expect("tempdir");
    populate(dir.path());
    fs::write(dir.path().join(COMMIT_FILE), vec![7u8; 1024]).expect("write");
    assert!(matches!(open_err(dir.path()), OpenError::Foreign { .. }));
}

#[test]
fn a_missing_file_refuses_to_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    populate(dir.path());
    fs::remove_file(dir.path().join(COMMIT_FILE)).expect("remove");
    assert!(matches!(open_err(dir.path()), OpenError::Missing { .. }));

    let dir = tempfile::tempdir().expect("tempdir");
    populate(dir.path());
    fs::remove_file(dir.path().join(LOG_FILE)).expect("remove");
    assert!(matches!(open_err(dir.path()), OpenError::Missing { .. }));
}

#[test]
fn an_interrupted_first_start_is_initialised_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    fs::write(dir.path().join(LOG_FILE), &LOG_MAGIC[..5]).expect("write");
    let (_, snapshot) = EmbeddedStore::open(dir.path(), Bounds::FULL).expect("opens");
    assert!(snapshot.ranges.is_empty());
}

/// Review defect 4: a `MIGRATED` that cannot be read refuses the start.
#[test]
fn an_unreadable_migrated_mark_refuses_to_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    populate(dir.path());
    // A directory in its place: reading it fails with EISDIR (as root, a
    // mode of 000 would not stop the read).
    fs::create_dir(dir.path().join(MIGRATED_FILE)).expect("mkdir");
    let error = open_err(dir.path());
    assert!(
        matches!(error, OpenError::MigratedUnreadable { .. }),
        "{error}"
    );
    fs::remove_dir(dir.path().join(MIGRATED_FILE)).expect("rmdir");
    fs::write(dir.path().join(MIGRATED_FILE), "pending etcd x\n").expect("mark");
    assert!(matches!(open_err(dir.path()), OpenError::Migrated { .. }));
    let for_migration = EmbeddedOptions {
        bounds: Bounds::FULL,
        for_migration: true,
    };
    // `migrate` itself opens a pending one, to finish it...
    let (store, _) = EmbeddedStore::open_with(dir.path(), for_migration).expect("migrate reruns");
    drop(store);
    // ...but not a complete one.
    fs::write(dir.path().join(MIGRATED_FILE), "complete etcd x\n").expect("mark");
    assert!(matches!(
        EmbeddedStore::open_with(dir.path(), for_migration),
        Err(OpenError::AlreadyMigrated { .. })
    ));
}

#[test]
fn the_space_bounds_are_enforced_and_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bounds = Bounds::try_new(20, 99).expect("bounds");
    let (store, _) = EmbeddedStore::open(dir.path(), bounds).expect("open");
    let rt = runtime();
    let range = rt
        .block_on(store.reserve(Reservation {
            want_bases: 1000,
            need_bases: 1,
            ..reservation("w", 8, 0)
        }))
        .expect("shrinks to fit");
    assert_eq!((range.start(), range.end()), (24, 96));
    let error = rt
        .block_on(store.reserve(reservation("w", 8, 1)))
        .expect_err("nothing fits");
    assert!(matches!(error, StoreError::Space(_)), "{error}");
    drop(store);
    // Bounds that end below the used space would reuse nothing but mislead:
    // refused.
    let lower = Bounds::try_new(1, 50).expect("bounds");
    assert!(matches!(
        EmbeddedStore::open(dir.path(), lower),
        Err(OpenError::BeyondBounds { .. })
    ));
    // Moving past the used space is fine, and never goes back.
    let (store, _) =
        EmbeddedStore::open(dir.path(), Bounds::try_new(1, 1000).expect("b")).expect("open");
    let next = rt
        .block_on(store.reserve(reservation("w", 8, 1)))
        .expect("fits");
    assert!(next.start() >= 96);
}

#[test]
fn concurrent_reservations_share_commits_and_never_overlap() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _) = EmbeddedStore::open(dir.path(), Bounds::FULL).expect("open");
    let store = Arc::new(store);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .expect("runtime");
    let ranges = rt.block_on(async {
        let tasks: Vec<_> = (0..64)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    store
                        .reserve(reservation(&format!("w{i}"), 1 + i % 5, 3))
                        .await
                })
            })
            .collect();
        let mut ranges = Vec::new();
        for task in tasks {
            ranges.push(task.await.expect("task").expect("reserve"));
        }
        ranges
    });
    let mut table = RangeTable::default();
    for range in ranges {
        table
            .insert(RangeOwner {
                prefill_worker: Arc::from("w"),
                range,
                created_unix_ms: 0,
            })
            .expect("disjoint");
    }
}

#[test]
fn compaction_prunes_old_ranges_and_keeps_the_high_water_mark() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = runtime();
    let (store, _) = EmbeddedStore::open(dir.path(), Bounds::FULL).expect("open");
    let old = rt.block_on(async {
        store
            .register(Arc::from("w"), dp(2))
            .await
            .expect("register");
        store.reserve(reservation("w", 2, 5)).await.expect("old")
    });
    let young = rt
        .block_on(store.reserve(Reservation {
            created_unix_ms: 9_000,
            ..reservation("w", 2, 5)
        }))
        .expect("young");
    let last_old = rt
        .block_on(store.reserve(reservation("w", 2, 5)))
        .expect("old again, after the young one");
    // Pruning goes by reservation time alone: both old ranges go.
    let pruned = rt.block_on(store.prune(prune(5_000))).expect("prune");
    assert_eq!(pruned.pruned_below, last_old.end());
    let next = rt
        .block_on(store.reserve(reservation("w", 2, 1)))
        .expect("reserve after compaction");
    assert!(next.start() >= last_old.end(), "never moves back");
    drop(store);

    let (_, snapshot) = EmbeddedStore::open(dir.path(), Bounds::FULL).expect("reopen");
    assert_eq!(snapshot.pruned_below, last_old.end());
    assert_eq!(snapshot.ranges.len(), 2, "the young range and the new one");
    let old_room = Room::try_new(old.start() + 1).expect("room");
    assert!(snapshot.ranges.resolve(old_room).is_none());
    let young_room = Room::try_new(young.start()).expect("room");
    assert!(snapshot.ranges.resolve(young_room).is_some());
    assert!(snapshot.workers[0].registered);
}

#[test]
fn a_held_range_is_never_pruned_whatever_the_clock_says() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = runtime();
    let (store, _) = EmbeddedStore::open(dir.path(), Bounds::FULL).expect("open");
    let held = rt
        .block_on(store.reserve(reservation("w", 1, 5)))
        .expect("reserve");
    let pruned = rt
        .block_on(store.prune(PruneRequest {
            cutoff_unix_ms: u64::MAX,
            held: [held.start()].into(),
        }))
        .expect("prune");
    assert_eq!(pruned.pruned_below, 0);
    drop(store);
    let (_, snapshot) = EmbeddedStore::open(dir.path(), Bounds::FULL).expect("reopen");
    assert_eq!(snapshot.ranges.len(), 1);
}

/// Review defect 3: the compacted log must stay readable, so every later
/// compaction works too and the files stay near the size of what is live.
#[test]
fn every_compaction_works_and_the_log_stays_the_size_of_what_is_live() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = runtime();
    let (store, _) = EmbeddedStore::open(dir.path(), Bounds::FULL).expect("open");
    rt.block_on(store.register(Arc::from("w"), dp(1)))
        .expect("register");
    let log_path = dir.path().join(LOG_FILE);
    let mut sizes = Vec::new();
    for round in 0..20u64 {
        for _ in 0..50 {
            rt.block_on(store.reserve(Reservation {
                created_unix_ms: round,
                ..reservation("w", 1, 4)
            }))
            .expect("reserve");
        }
        // Everything of earlier rounds is past retention now.
        let pruned = rt
            .block_on(store.prune(prune(round)))
            .unwrap_or_else(|e| panic!("compaction {round} failed: {e}"));
        if round > 0 {
            assert!(pruned.pruned_below > 0, "round {round} pruned");
        }
        sizes.push(fs::metadata(&log_path).expect("log").len());
    }
    let (first, last) = (sizes[1], *sizes.last().expect("sizes"));
    assert!(
        last <= first + 256,
        "the log grows with every round: {sizes:?}"
    );
}

#[test]
fn deregistered_workers_are_forgotten_once_nothing_needs_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = runtime();
    let (store, _) = EmbeddedStore::open(dir.path(), Bounds::FULL).expect("open");
    rt.block_on(async {
        for name in ["gone", "stays"] {
            store
                .register(Arc::from(name), dp(1))
                .await
                .expect("register");
        }
        store
            .reserve(Reservation {
                created_unix_ms: 1,
                ..reservation("gone", 1, 3)
            })
            .await
            .expect("reserve");
        store
            .deregister(Arc::from("gone"), dp(1))
            .await
            .expect("deregister");
    });
    let before = super::super::unix_ms();
    // Its range is young: the worker stays (its rooms still resolve).
    let pruned = rt.block_on(store.prune(prune(0))).expect("prune");
    assert!(pruned.forgotten.is_empty());
    let pruned = rt
        .block_on(store.prune(prune(before + 10_000)))
        .expect("prune");
    assert_eq!(pruned.forgotten, vec![Arc::<str>::from("gone")]);
    drop(store);
    let (_, snapshot) = EmbeddedStore::open(dir.path(), Bounds::FULL).expect("reopen");
    let names: Vec<&str> = snapshot
        .workers
        .iter()
        .map(|w| &*w.prefill_worker)
        .collect();
    assert_eq!(names, ["stays"]);
}

/// Issue 20: a retention tick with nothing due (every range younger than
/// the cutoff or still held, no deregistered worker to forget) is answered
/// from what the writer holds in memory, without reading the log; one with
/// something due still compacts.
#[test]
fn a_prune_with_nothing_due_does_not_read_the_log() {
    let fs = SimFs::new(3);
    let rt = runtime();
    let (store, _) = sim_open(&fs, Bounds::FULL).expect("open");
    let ranges: Vec<RoomRange> = rt.block_on(async {
        store
            .register(Arc::from("w"), dp(2))
            .await
            .expect("register");
        let mut ranges = Vec::new();
        for _ in 0..3 {
            ranges.push(
                store
                    .reserve(reservation("w", 2, 4))
                    .await
                    .expect("reserve"),
            );
        }
        ranges
    });
    let log = Path::new("/data/rooms.log");
    let read_before = fs.bytes_read(log);
    let young = rt.block_on(store.prune(prune(1_000))).expect("prune");
    assert_eq!(young.pruned_below, 0);
    assert!(young.forgotten.is_empty());
    let all_held = rt
        .block_on(store.prune(PruneRequest {
            cutoff_unix_ms: 5_000,
            held: ranges.iter().map(|range| range.start()).collect(),
        }))
        .expect("prune");
    assert_eq!(all_held.pruned_below, 0);
    assert_eq!(
        fs.bytes_read(log),
        read_before,
        "a prune with nothing due read the log"
    );
    let due = rt.block_on(store.prune(prune(5_000))).expect("prune");
    assert_eq!(due.pruned_below, ranges[2].end());
    assert!(
        fs.bytes_read(log) > read_before,
        "the compaction read the log"
    );
    drop(store);
    let (_, snapshot) = sim_open(&fs, Bounds::FULL).expect("reopen");
    assert!(snapshot.ranges.is_empty());
    assert_eq!(snapshot.pruned_below, ranges[2].end());
}

/// Issue 20: a compaction of a log many slices long streams it (records cut
/// by the end of a read included) while reservations go on; what they
/// reserved meanwhile is in the compacted log, what was due is not.
#[test]
fn a_long_compaction_streams_in_slices_while_reservations_go_on() {
    let fs = SimFs::new(5);
    let rt = runtime();
    let (store, _) = sim_open(&fs, Bounds::FULL).expect("open");
    let old: Vec<RoomRange> = rt.block_on(async {
        let mut old = Vec::new();
        // About 60 bytes a record: several slices of log.
        for i in 0..12_000u32 {
            let worker = format!("w{}", i % 50);
            old.push(
                store
                    .reserve(reservation(&worker, 2, 1))
                    .await
                    .expect("reserve"),
            );
        }
        old
    });
    assert!(
        fs.contents(Path::new("/data/rooms.log"))
            .expect("log")
            .len() as u64
            > 2 * super::compaction::SLICE_BYTES
    );
    let (pruned, young) = rt.block_on(async {
        tokio::join!(store.prune(prune(5_000)), async {
            let mut young = Vec::new();
            for i in 0..200 {
                if i == 1 {
                    // Registered while the compaction runs (most likely):
                    // kept.
                    store
                        .register(Arc::from("w7"), dp(2))
                        .await
                        .expect("register during the compaction");
                }
                young.push(
                    store
                        .reserve(Reservation {
                            created_unix_ms: 9_000,
                            ..reservation("young", 2, 1)
                        })
                        .await
                        .expect("reserve during the compaction"),
                );
            }
            young
        })
    });
    let pruned = pruned.expect("prune");
    assert_eq!(pruned.pruned_below, old.last().expect("old").end());
    drop(store);
    let (_, snapshot) = sim_open(&fs, Bounds::FULL).expect("reopen");
    assert_eq!(snapshot.ranges.len(), young.len(), "only the young ranges");
    for range in &young {
        let owner = snapshot
            .ranges
            .resolve(Room::try_new(range.start()).expect("room"))
            .expect("a range reserved during the compaction resolves");
        assert_eq!(owner.range, *range);
    }
    assert_eq!(snapshot.high_water, young.last().expect("young").end());
    // Workers first seen in a range, all of whose ranges went: forgotten,
    // but for the one registered meanwhile.
    let names: Vec<(&str, bool)> = snapshot
        .workers
        .iter()
        .map(|w| (&*w.prefill_worker, w.registered))
        .collect();
    assert_eq!(names, [("w7", true), ("young", false)]);
    // Reported forgotten only if its registration came after the switch
    // (then the registration, at a later revision, wins).
    let w7_forgotten = pruned.forgotten.contains(&Arc::<str>::from("w7"));
    assert_eq!(pruned.forgotten.len(), 49 + usize::from(w7_forgotten));
}

fn sim_open(fs: &Arc<SimFs>, bounds: Bounds) -> Result<(EmbeddedStore, Snapshot), OpenError> {
    sim_open_at(fs, Path::new("/data"), bounds)
}

fn sim_open_at(
    fs: &Arc<SimFs>,
    dir: &Path,
    bounds: Bounds,
) -> Result<(EmbeddedStore, Snapshot), OpenError> {
    EmbeddedStore::open_on(
        Arc::new(fs.clone()),
        dir,
        EmbeddedOptions {
            bounds,
            for_migration: false,
        },
    )
}

/// Issue 16, defect 3: `serve` on a fresh machine makes its data dir (and
/// missing parents). Until the parent of each is synced, the new entry is
/// not durable: a power loss after rooms were issued could take the whole
/// dir, and the next start would begin from room 1 again.
#[test]
fn a_data_dir_made_at_start_survives_a_power_loss_with_its_rooms() {
    let rt = runtime();
    let dir = Path::new("/srv/room-allocator/data");
    for seed in 0..16 {
        let fs = SimFs::new(seed);
        let (store, _) = sim_open_at(&fs, dir, Bounds::FULL).expect("first start");
        let acked = rt
            .block_on(store.reserve(reservation("w", 2, 4)))
            .expect("reserve");
        drop(store);
        let after = fs.power_loss(seed);
        let (_, snapshot) = sim_open_at(&after, dir, Bounds::FULL).expect("reopen");
        assert!(
            snapshot.high_water >= acked.end(),
            "seed {seed}: rooms {}..{} were issued, then a power loss, and the store starts over from room {}",
            acked.start(),
            acked.end(),
            snapshot.high_water.max(1)
        );
    }
}

/// A compaction fails at `failing` (an operation of the simulated file
/// system, with `effect` of it done); whatever the writer acknowledges then,
/// before and after, must survive any power loss.
fn a_failed_compaction_then_power_loss(failing: (&'static str, &str, Effect)) {
    let (kind, path, effect) = failing;
    let fs = SimFs::new(7);
    let rt = runtime();
    let (store, _) = sim_open(&fs, Bounds::FULL).expect("open");
    let mut acked = Vec::new();
    for _ in 0..3 {
        acked.push(
            rt.block_on(store.reserve(reservation("w", 2, 4)))
                .expect("reserve"),
        );
    }
    let young = rt
        .block_on(store.reserve(Reservation {
            created_unix_ms: 5_000,
            ..reservation("w", 2, 4)
        }))
        .expect("young");
    acked.push(young);
    fs.fail_next_with(kind, Path::new(path), effect);
    let error = rt
        .block_on(store.prune(prune(2_000)))
        .expect_err("the injected failure");
    assert!(matches!(error, StoreError::Io { .. }), "{error}");
    // Whatever the writer answers now must be true on disk.
    for _ in 0..5 {
        if let Ok(range) = rt.block_on(store.reserve(Reservation {
            created_unix_ms: 9_000,
            ..reservation("w", 2, 4)
        })) {
            acked.push(range);
        }
    }
    drop(store);
    for seed in 0..20 {
        let after = fs.power_loss(seed);
        let (_, snapshot) = sim_open(&after, Bounds::FULL)
            .unwrap_or_else(|e| panic!("{kind} {path}: reopen after power loss {seed}: {e}"));
        for range in &acked {
            let covered = snapshot.high_water >= range.end();
            assert!(
                covered,
                "{kind} {path}: acknowledged range {}..{} lost (high water {})",
                range.start(),
                range.end(),
                snapshot.high_water
            );
        }
    }
}

/// Review defect 2: a compaction that fails after its rename (here the
/// directory fsync, or the slot write) must not let the writer append to
/// the unlinked old log and call it durable. On the simulated file system
/// the old log is an orphan after the rename: anything "committed" to it is
/// gone after a power loss, and its rooms would be issued again.
#[test]
fn a_compaction_that_fails_after_its_rename_never_acknowledges_lost_writes() {
    a_failed_compaction_then_power_loss(("fsync dir", "/data", Effect::None));
    a_failed_compaction_then_power_loss(("write", "/data/rooms.commit", Effect::None));
}

/// Issue 16, defect 2: a rename that reports an error after it took effect
/// (NFS retries a RENAME and gets ENOENT; a journal error). The writer
/// cannot know which log is live, so it must treat any rename error like a
/// failure after the rename: halt and read the files back.
#[test]
fn a_rename_that_took_effect_but_reported_an_error_never_acknowledges_lost_writes() {
    a_failed_compaction_then_power_loss(("rename", "/data/rooms.log", Effect::All));
    a_failed_compaction_then_power_loss(("rename", "/data/rooms.log", Effect::None));
}

/// Review defect 7: a compaction renamed into place without its commit
/// slot, then a crash, a restart, and a torn append: the next start must
/// not find the torn bytes inside the "acknowledged" region. The append's
/// fsync fails, so which of its sectors reach the disk depends on the
/// simulated file system's seed: every seed runs the whole story.
#[test]
fn a_crash_after_an_interrupted_compaction_then_a_torn_append_still_opens() {
    let rt = runtime();
    for seed in 0..32 {
        let fs = SimFs::new(seed);
        {
            let (store, _) = sim_open(&fs, Bounds::FULL).expect("open");
            rt.block_on(store.reserve(reservation("w", 1, 4)))
                .expect("old");
            // Young ranges of long names: the next append spans a sector
            // boundary of the compacted log.
            for i in 0..3 {
                rt.block_on(store.reserve(Reservation {
                    created_unix_ms: 9_000,
                    ..reservation(&format!("{i}{}", "w".repeat(200)), 1, 4)
                }))
                .expect("young");
            }
            // The rename (and the directory fsync) happen, the slot write fails.
            fs.fail_next("write", Path::new("/data/rooms.commit"));
            rt.block_on(store.prune(prune(5_000)))
                .expect_err("slot write fails");
        }
        // Power off: the rename was synced, the slot never written.
        let fs = fs.power_loss(seed);
        let (store, snapshot) = sim_open(&fs, Bounds::FULL).expect("adopts the compaction");
        let before = snapshot.high_water;
        // The next append is written, its fsync fails, the power goes.
        fs.cut_power_at(fs.ops() + 1);
        let _ = rt.block_on(store.reserve(reservation(&"x".repeat(200), 1, 4)));
        drop(store);
        let after = fs.power_loss(seed);
        let (_, snapshot) = sim_open(&after, Bounds::FULL)
            .unwrap_or_else(|e| panic!("seed {seed}: refused to open after a torn append: {e}"));
        assert!(snapshot.high_water >= before);
    }
}

/// Issue 16, defect 4 (review defect 7 by another route): the commit slot
/// of a new generation is written but its fsync fails, having persisted
/// nothing, while reads still see it. Reading the files back then must not
/// trust that slot: if the next slot written lands over the other one and
/// is torn by a power loss, neither slot names the log's generation, and the
/// store refuses to start. Torn slot writes depend on the seed.
#[test]
fn a_failed_fsync_of_a_new_generations_commit_then_power_loss_still_opens() {
    let rt = runtime();
    let commit = Path::new("/data/rooms.commit");
    for seed in 0..32 {
        let fs = SimFs::new(seed);
        let (store, _) = sim_open(&fs, Bounds::FULL).expect("open");
        let mut acked = Vec::new();
        for created_unix_ms in [500, 2_000, 9_000] {
            acked.push(
                rt.block_on(store.reserve(Reservation {
                    created_unix_ms,
                    ..reservation("w", 1, 4)
                }))
                .expect("reserve"),
            );
        }
        // Two compactions in a row: two generations ahead of the slot
        // before them.
        rt.block_on(store.prune(prune(1_000))).expect("compaction");
        fs.fail_next("fsync", commit);
        rt.block_on(store.prune(prune(3_000)))
            .expect_err("the slot fsync fails");
        // The next slot written is torn by a power loss.
        fs.cut_power_after("write", commit);
        if let Ok(range) = rt.block_on(store.reserve(reservation("w", 1, 4))) {
            acked.push(range);
        }
        drop(store);
        let after = fs.power_loss(seed);
        let (_, snapshot) = sim_open(&after, Bounds::FULL)
            .unwrap_or_else(|e| panic!("seed {seed}: refused to open: {e}"));
        for range in &acked {
            assert!(
                snapshot.high_water >= range.end(),
                "seed {seed}: lost {range:?}"
            );
        }
    }
}

/// Issue 16, defect 6: on a device that writes (and tears) 4 KiB at a
/// time, a commit slot write cut by a power loss garbles its whole page.
/// Both slots in one page: both gone, and the store refuses to start.
#[test]
fn a_torn_page_under_a_commit_slot_write_leaves_the_other_slot() {
    let rt = runtime();
    let commit = Path::new("/data/rooms.commit");
    for seed in 0..16 {
        let fs = SimFs::new(seed);
        fs.tear_whole_pages(commit);
        let (store, _) = sim_open(&fs, Bounds::FULL).expect("open");
        let mut acked = Vec::new();
        for _ in 0..3 {
            acked.push(
                rt.block_on(store.reserve(reservation("w", 1, 4)))
                    .expect("reserve"),
            );
        }
        fs.cut_power_after("write", commit);
        let _ = rt.block_on(store.reserve(reservation("w", 1, 4)));
        drop(store);
        let after = fs.power_loss(seed);
        let (_, snapshot) = sim_open(&after, Bounds::FULL)
            .unwrap_or_else(|e| panic!("seed {seed}: refused to open: {e}"));
        for range in &acked {
            assert!(
                snapshot.high_water >= range.end(),
                "seed {seed}: lost {range:?}"
            );
        }
    }
}

/// A data dir as the first format left it: a log with a registration and
/// one range, and a version-1 commit file acknowledging all of it.
fn old_format_files() -> (Vec<u8>, Vec<u8>, RoomRange) {
    let range = RoomRange::from_parts(4, 44, dp(4)).expect("range");
    let mut log = encode_log_header(0);
    encode_record(&mut log, 1, &Record::Register(Arc::from("w"), dp(4)));
    encode_record(
        &mut log,
        2,
        &Record::Reserve {
            worker: Arc::from("w"),
            range,
            rooms_issued: 3,
            created_unix_ms: 1_000,
        },
    );
    let commit = old_commit_file(1, log.len() as u64, 0);
    (log, commit, range)
}

/// The commit file is of format version 2, and a reader of version 1 only
/// (which reads slot 0 at offset 0) finds version 2 there and refuses.
fn assert_upgraded(commit: &[u8]) {
    assert_eq!(commit.len(), 2 * SLOT_SPACING as usize, "the new layout");
    assert!(decode_commit(commit).is_ok());
    assert_eq!(&commit[..8], COMMIT_MAGIC);
    assert_eq!(
        commit[8..12],
        COMMIT_VERSION.to_le_bytes(),
        "slot 0 says version 2"
    );
    assert_eq!(
        commit[32..36],
        crc32fast::hash(&commit[..32]).to_le_bytes(),
        "slot 0 is valid, so an old binary refuses rather than reading slot 1 of the old layout"
    );
}

/// Issue 16, defect 6: data dirs of the first format (both slots in one
/// 1 KiB) are read as before and upgraded at open.
#[test]
fn an_old_format_data_dir_is_read_and_upgraded_to_separate_4_kib_slots() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (log, commit, range) = old_format_files();
    fs::write(dir.path().join(LOG_FILE), &log).expect("log");
    fs::write(dir.path().join(COMMIT_FILE), &commit).expect("commit");
    let (store, snapshot) = EmbeddedStore::open(dir.path(), Bounds::FULL).expect("opens");
    assert_eq!(snapshot.high_water, range.end());
    assert_eq!(snapshot.workers[0].rooms_issued, 3);
    assert_upgraded(&fs::read(dir.path().join(COMMIT_FILE)).expect("commit"));
    let next = runtime()
        .block_on(store.reserve(reservation("w", 4, 2)))
        .expect("reserve");
    assert!(next.start() >= range.end());
    drop(store);
    let (_, snapshot) = EmbeddedStore::open(dir.path(), Bounds::FULL).expect("reopens");
    assert_eq!(snapshot.high_water, next.end());
    assert_eq!(snapshot.ranges.len(), 2);
    assert!(!dir.path().join("rooms.commit.tmp").exists());
}

/// Issue 16, defect 6: the upgrade is crash-safe at every step. The power
/// is cut (or one operation fails, perhaps having taken effect) at each
/// step of the first open of an old-format dir; the next start opens, holds
/// the range, and is upgraded.
#[test]
fn a_power_loss_or_failure_at_any_step_of_the_upgrade_keeps_the_store() {
    let (log, commit, range) = old_format_files();
    let data = Path::new("/data");
    let mut upgraded_at = None;
    for step in 0..16u64 {
        for seed in 0..8 {
            for cut_power in [true, false] {
                let fs = SimFs::new(seed);
                fs.put_durable(&data.join(LOG_FILE), &log);
                fs.put_durable(&data.join(COMMIT_FILE), &commit);
                if cut_power {
                    fs.cut_power_at(step);
                } else {
                    fs.fail_op(step);
                }
                let first = sim_open(&fs, Bounds::FULL);
                if first.is_ok() && upgraded_at.is_none() {
                    upgraded_at = Some(step);
                }
                drop(first);
                let after = fs.power_loss(seed);
                let (_, snapshot) = sim_open(&after, Bounds::FULL).unwrap_or_else(|e| {
                    panic!("step {step}, seed {seed}, power cut {cut_power}: refused: {e}")
                });
                assert_eq!(snapshot.high_water, range.end());
                assert_upgraded(&after.contents(&data.join(COMMIT_FILE)).expect("commit"));
            }
        }
    }
    assert!(upgraded_at.is_some(), "some step is past the upgrade");
}

/// `MIGRATED` goes through the file system like the store's files: a power
/// cut (or a failure, perhaps having taken effect) at any step of writing it
/// leaves either no mark (`migrate` failed, copied nothing, and the dir still
/// serves) or the whole mark, never a torn one that a server might misread.
#[test]
fn a_power_loss_at_any_step_of_marking_migrated_leaves_no_mark_or_a_whole_one() {
    let data = Path::new("/data");
    let mut marked = false;
    for step in 0..8u64 {
        for seed in 0..8 {
            for cut_power in [true, false] {
                let fs = SimFs::new(seed);
                let (store, _) = sim_open(&fs, Bounds::FULL).expect("open");
                let at = fs.ops() + step;
                if cut_power {
                    fs.cut_power_at(at);
                } else {
                    fs.fail_op(at);
                }
                let result = store.mark_migrated(data, "etcd http://127.0.0.1:2379", false);
                drop(store);
                let after = fs.power_loss(seed);
                match sim_open(&after, Bounds::FULL) {
                    Ok(_) => assert!(
                        result.is_err(),
                        "step {step}, seed {seed}: the mark was reported written, then lost"
                    ),
                    Err(OpenError::Migrated { target, .. }) => {
                        assert_eq!(target, "pending etcd http://127.0.0.1:2379");
                        marked = true;
                    }
                    Err(error) => {
                        panic!("step {step}, seed {seed}, power cut {cut_power}: {error}")
                    }
                }
            }
        }
    }
    assert!(marked, "some step is past the mark");
}

#[derive(Debug, Clone)]
enum StoreOp {
    Register(u8, u32),
    Deregister(u8),
    Reserve(u8, u32, u64, u64),
    Prune(u64),
    Issued(u8),
}

fn store_op() -> impl Strategy<Value = StoreOp> {
    prop_oneof![
        1 => (0u8..3, 1u32..5).prop_map(|(w, d)| StoreOp::Register(w, d)),
        1 => (0u8..3).prop_map(StoreOp::Deregister),
        6 => (0u8..3, 1u32..5, 1u64..50, 0u64..10).prop_map(|(w, d, b, t)| StoreOp::Reserve(w, d, b, t)),
        1 => (0u64..10).prop_map(StoreOp::Prune),
        1 => (0u8..3).prop_map(StoreOp::Issued),
    ]
}

/// Runs `ops` over lives, each ended by a power loss: in life `n` the power
/// is cut at operation `cuts[n]` counted from the start of its open, so it
/// may go during the first start's set-up, during an open's recovery, or
/// while serving (and `failures[n]` makes one operation fail, perhaps
/// having taken effect). After every power loss, the last life included
/// (a clean open with no faults), it checks that each acknowledged range
/// is still reserved (the high-water mark covers it, and it resolves unless
/// it was pruned), and at the end that ranges never overlap.
fn power_losses(
    ops: Vec<StoreOp>,
    cuts: Vec<u64>,
    failures: Vec<u64>,
    seed: u64,
) -> Result<(), TestCaseError> {
    let rt = runtime();
    let mut fs = SimFs::new(seed);
    let mut acked: Vec<RoomRange> = Vec::new();
    let mut rng = Rng::new(seed);
    let mut ops = ops.into_iter();
    for life in 0..=cuts.len() {
        // The last life has no faults: a clean start after the last loss.
        let cut = cuts.get(life).copied();
        let last = cut.is_none();
        if let Some(cut) = cut {
            let start = fs.ops();
            fs.cut_power_at(start + cut);
            if let Some(failure) = failures.get(life) {
                fs.fail_op(start + failure);
            }
        }
        // Injected I/O errors are one-shot: an open they fail is retried.
        let mut opened = sim_open(&fs, Bounds::FULL);
        for _ in 0..3 {
            if let Err(OpenError::Io { .. }) = opened {
                opened = sim_open(&fs, Bounds::FULL);
            }
        }
        let (store, snapshot) = match opened {
            Ok(opened) => opened,
            // The power went during the open: on to the power loss.
            Err(OpenError::Io { .. }) if !last => {
                fs = fs.power_loss(rng.next_u64());
                continue;
            }
            Err(error) => {
                prop_assert!(
                    false,
                    "a power loss left files that refuse to open (life {life}): {error}"
                );
                unreachable!()
            }
        };
        for range in &acked {
            prop_assert!(
                snapshot.high_water >= range.end(),
                "acknowledged {}..{} is past the high water {} (life {life})",
                range.start(),
                range.end(),
                snapshot.high_water
            );
            let resolves = snapshot
                .ranges
                .resolve(Room::try_new(range.start()).expect("room"))
                .is_some_and(|owner| owner.range == *range);
            prop_assert!(
                resolves || range.end() <= snapshot.pruned_below,
                "acknowledged {}..{} neither resolves nor was pruned (life {life})",
                range.start(),
                range.end()
            );
        }
        if last {
            break;
        }
        for op in ops.by_ref().take(8) {
            let name = |w: u8| Arc::<str>::from(format!("w{w}"));
            let result = rt.block_on(async {
                match op {
                    StoreOp::Register(w, d) => store.register(name(w), dp(d)).await.map(drop),
                    StoreOp::Deregister(w) => store.deregister(name(w), dp(1)).await.map(drop),
                    StoreOp::Reserve(w, d, bases, t) => store
                        .reserve(Reservation {
                            prefill_worker: name(w),
                            dp_size: dp(d),
                            revision: 0,
                            want_bases: bases,
                            need_bases: 1,
                            rooms_issued: 0,
                            created_unix_ms: t,
                        })
                        .await
                        .map(|range| acked.push(range)),
                    StoreOp::Prune(cutoff) => store.prune(prune(cutoff)).await.map(drop),
                    StoreOp::Issued(w) => {
                        store
                            .record_issued(vec![IssuedCount {
                                prefill_worker: name(w),
                                total: 5,
                                since_open: 5,
                            }])
                            .await
                    }
                }
            });
            // After a failure the writer halts; the next request makes it
            // read its files back (recovery), perhaps as the power goes.
            let _ = result;
        }
        drop(store);
        fs = fs.power_loss(rng.next_u64());
    }
    // Acknowledged ranges never overlap one another.
    let mut table = RangeTable::default();
    for range in &acked {
        prop_assert!(
            table
                .insert(RangeOwner {
                    prefill_worker: Arc::from("x"),
                    range: *range,
                    created_unix_ms: 0,
                })
                .is_ok(),
            "range {}..{} acknowledged twice",
            range.start(),
            range.end()
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn power_loss_at_any_write_keeps_every_acknowledged_range_and_reissues_none(
        ops in proptest::collection::vec(store_op(), 1..60),
        cuts in proptest::collection::vec(0u64..60, 1..6),
        seed in any::<u64>(),
    ) {
        power_losses(ops, cuts, Vec::new(), seed)?;
    }

    #[test]
    fn failed_writes_and_fsyncs_then_power_loss_keep_every_acknowledged_range(
        ops in proptest::collection::vec(store_op(), 1..60),
        cuts in proptest::collection::vec(0u64..60, 1..6),
        failures in proptest::collection::vec(0u64..30, 1..6),
        seed in any::<u64>(),
    ) {
        power_losses(ops, cuts, failures, seed)?;
    }
}

#[test]
fn commit_slots_decode_only_when_their_checksum_holds() {
    let spacing = SLOT_SPACING as usize;
    let mut bytes = vec![0u8; 2 * spacing];
    bytes[..SLOT_LEN].copy_from_slice(&encode_slot(4, 100, 2));
    assert_eq!(decode_commit(&bytes), Ok((4, 2, 100)));
    // A checksummed slot where its commit number does not go: damage.
    let mut misplaced = bytes.clone();
    misplaced[spacing..spacing + SLOT_LEN].copy_from_slice(&encode_slot(6, 100, 2));
    assert!(matches!(
        decode_commit(&misplaced),
        Err(CommitProblem::Misplaced {
            slot: 1,
            commit_seq: 6
        })
    ));
    // A version-2 file cut to the old length: not read as the old layout.
    assert!(matches!(
        decode_commit(&bytes[..2 * SLOT_SPACING_V1 as usize]),
        Err(CommitProblem::WrongLayout {
            slot: 0,
            version: 2
        })
    ));
    bytes[20] ^= 1;
    assert_eq!(decode_commit(&bytes), Err(CommitProblem::BothDamaged));
    assert_eq!(
        decode_commit(&bytes[..10]),
        Err(CommitProblem::TooShort(10))
    );
    // The first format still reads: slots 512 bytes apart, version 1.
    let old = old_commit_file(5, 300, 1);
    assert_eq!(decode_commit(&old), Ok((5, 1, 300)));
}

#[test]
fn records_round_trip_exactly() {
    let records = [
        Record::Register(Arc::from("w"), dp(3)),
        Record::Deregister {
            worker: Arc::from("w"),
            unix_ms: 42,
        },
        Record::Reserve {
            worker: Arc::from("w"),
            range: RoomRange::from_parts(8, 24, dp(4)).expect("range"),
            rooms_issued: 9,
            created_unix_ms: 77,
        },
        Record::Issued(Arc::from("w"), 5),
        Record::Pruned(1 << 40),
        Record::Probe,
    ];
    for (i, record) in records.iter().enumerate() {
        let mut buf = Vec::new();
        let seq = i as u64 + 1;
        encode_record(&mut buf, seq, record);
        let (decoded, len) = parse_record(&buf, seq).expect("decodes");
        assert_eq!(&decoded, record);
        assert_eq!(len, buf.len() as u64);
    }
    let _ = MAX_ROOM;
}
